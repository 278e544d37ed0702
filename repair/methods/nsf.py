"""NSF, "Let Samples Speak" (Li et al., 2025): per-dimension affine feature map + new head.

No group labels are ever used. All geometry happens on standardised embeddings
``z = x * a + c`` (statistics of ``inputs``; folded back at the end).

1. Class prototypes = class means of ``z``. *Outliers* of a class are its samples whose
   nearest prototype (euclidean) belongs to another class.
2. Target of class ``k``: midpoint of the class's inlier mean and outlier mean (the
   inlier mean when the class has <= 1 outlier). Pulling every sample toward a point
   between the two modes of its class removes what separates the modes (spurious)
   and keeps what separates classes (core).
3. Per-dimension affine map ``T(f) = (f + beta) * w - beta`` (= ``w*f + (w-1)*beta``),
   fitted to minimise the class-balanced mean of ``||T(z_i) - target_{y_i}||^2`` plus
   ``identity_reg * (||w - 1||^2 + ||(w-1)*beta||^2)`` (a regulariser toward the
   identity). The paper fits ``T`` by gradient descent; the objective is a 2x2 ridge
   regression per dimension, so we use its exact closed-form minimiser instead (same
   objective, no learning-rate / epoch settings). Dimensions whose value does not
   track the class target are shrunk (small ``w``).
4. Training set of the new head: samples correctly classified by the original head plus
   *rescued* samples (misclassified by the original head, but whose nearest target
   after ``T`` is their own class), with class-balanced weights. The head is fitted on
   ``T(z)`` (L2 penalty in ``T``-space, so shrunk dimensions are costly to use) by the
   shared solver and ``T`` is folded back: ``W' = W diag(w)``, ``b' = b + W((w-1)*beta)``
   (:func:`fold_head`), then the standardisation.
5. ``identity_reg`` is chosen from ``identity_reg_grid`` on a held-out part of
   ``inputs`` (class-stratified) by ``selection`` (``"worst_class"``, default; or
   ``"worst_inferred_group"``: class x correct/incorrect under the original head); all
   candidates are one batched solver call (per-problem feature maps). The final map
   and head are refitted on all of ``inputs`` with the chosen strength.

Config fields (:class:`NSFConfig`):

- ``identity_reg_grid`` (0.001, 0.01, 0.1, 1.0): strengths of the pull of ``T`` to identity.
- ``holdout_fraction`` (0.5): share of ``inputs`` held out to score candidates.
- ``selection`` ("worst_class"): "worst_class" | "worst_inferred_group" (worst-class
  accuracy is the label-free default throughout ``repair``: see :mod:`repair.fix`).
- ``l2`` (1.0): L2 strength of the head on ``T(z)`` (sklearn ``1/C``, weights sum to n).
- ``min_scale`` (0.0): floor for ``w`` (keeps every dimension usable if > 0).
- ``tol`` (1e-4), ``max_iter`` (1000): solver settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import RepairInputs, RepairOutput, register_method
from .. import solver as S

__all__ = ["NSFConfig", "nsf", "fit_affine_map", "class_targets", "apply_transform", "fold_head",
           "example_transform"]


@dataclass
class NSFConfig:
    identity_reg_grid: tuple = (0.001, 0.01, 0.1, 1.0)
    holdout_fraction: float = 0.5
    selection: str = "worst_class"
    l2: float = 1.0
    min_scale: float = 0.0
    tol: float = 1e-4
    max_iter: int = 1000


def apply_transform(X: torch.Tensor, transform: dict) -> torch.Tensor:
    """``T(f) = (f + beta) * w - beta``."""
    return (X + transform["beta"]) * transform["w"] - transform["beta"]


def fold_head(W: torch.Tensor, b: torch.Tensor, transform: dict):
    """Head on ``T(f)`` -> head on ``f``: ``W' = W diag(w)``, ``b' = b + W ((w-1) * beta)``."""
    w, beta = transform["w"], transform["beta"]
    return S.fold_affine(W, b, w, (w - 1.0) * beta)


def example_transform(D: int, generator: torch.Generator) -> dict:
    return {"w": torch.rand(D, generator=generator) * 2, "beta": torch.randn(D, generator=generator)}


def class_targets(Z: torch.Tensor, y: torch.Tensor, num_classes: int):
    """Prototypes, outlier flags and per-class targets (see module docstring).
    Classes absent from ``y`` get a NaN prototype and are never nearest."""
    D = Z.shape[1]
    protos = torch.full((num_classes, D), float("nan"))
    for c in range(num_classes):
        m = y == c
        if bool(m.any()):
            protos[c] = Z[m].mean(0)
    d = torch.cdist(Z, torch.nan_to_num(protos, nan=0.0))
    d[:, torch.isnan(protos[:, 0])] = float("inf")
    outlier = d.argmin(1) != y
    targets = protos.clone()
    n_out = []
    for c in range(num_classes):
        m = y == c
        mo = m & outlier
        mi = m & ~outlier
        n_out.append(int(mo.sum()))
        if int(mo.sum()) > 1 and bool(mi.any()):
            targets[c] = 0.5 * (Z[mi].mean(0) + Z[mo].mean(0))
        elif bool(mi.any()):
            targets[c] = Z[mi].mean(0)
    return protos, outlier, targets, n_out


def fit_affine_map(Z: torch.Tensor, T: torch.Tensor, weight: torch.Tensor, rho: float,
                   min_scale: float = 0.0):
    """Closed-form minimiser of ``sum_i weight_i (w z_i + c - T_i)^2 / sum(weight) +
    rho ((w-1)^2 + c^2)`` per dimension. Returns ``(w, c)`` with ``c = (w-1)*beta``."""
    p = (weight / weight.sum()).double().view(-1, 1)
    Zd, Td = Z.double(), T.double()
    m1 = (p * Zd).sum(0)
    m2 = (p * Zd * Zd).sum(0)
    t1 = (p * Td).sum(0)
    zt = (p * Zd * Td).sum(0)
    a11, a12, a22 = m2 + rho, m1, 1.0 + rho
    r1, r2 = zt + rho, t1
    det = (a11 * a22 - a12 * a12).clamp_min(1e-12)
    w = (r1 * a22 - a12 * r2) / det
    c = (a11 * r2 - a12 * r1) / det
    if min_scale > 0:
        w = w.clamp_min(min_scale)
    return w.float(), c.float()


def _beta(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``beta`` with ``(w-1)*beta = c`` (0 where ``w == 1``: a pure shift is a bias)."""
    dw = w - 1.0
    safe = dw.abs() > 1e-6
    return torch.where(safe, c / torch.where(safe, dw, torch.ones_like(dw)), torch.zeros_like(c))


def _prepare(Z, y, pred0, C, rhos, min_scale):
    """Per candidate: map (w, c), training weights. Returns stacked tensors + stats."""
    _, outlier, targets, n_out = class_targets(Z, y, C)
    Ti = torch.nan_to_num(targets, nan=0.0)[y]
    cw = S.class_balanced_weights(y, C)
    correct = pred0 == y
    ws, cs, sw, rescued = [], [], [], []
    for rho in rhos:
        w, c = fit_affine_map(Z, Ti, cw, float(rho), min_scale)
        TZ = Z * w + c
        d = torch.cdist(TZ, torch.nan_to_num(targets, nan=0.0))    # T was fitted toward the targets
        d[:, torch.isnan(targets[:, 0])] = float("inf")
        resc = (~correct) & (d.argmin(1) == y)
        use = correct | resc
        ws.append(w)
        cs.append(c)
        sw.append(S.class_balanced_weights(y, C, mask=use))
        rescued.append(int(resc.sum()))
    return torch.stack(ws), torch.stack(cs), torch.stack(sw), rescued, n_out


@register_method("nsf", summary="Let Samples Speak: per-dimension affine map pulling samples to "
                                "class targets between inlier/outlier modes, head retrained (no groups)",
                 config=NSFConfig, needs_groups=False, uses_groups=False)
def nsf(inputs: RepairInputs, config: NSFConfig) -> RepairOutput:
    cfg = config
    if not cfg.identity_reg_grid:
        raise ValueError("identity_reg_grid must be non-empty")
    if cfg.selection not in ("worst_inferred_group", "worst_class"):
        raise ValueError("selection must be 'worst_inferred_group' or 'worst_class'")
    gen = torch.Generator().manual_seed(int(inputs.seed))
    X, y, W0, b0 = inputs.cpu_tensors()
    C = W0.shape[0]
    lg0 = X @ W0.T + b0
    pred0 = lg0.argmax(1)
    strata, crit = S.resolve_selection_groups(cfg.selection, y, lg0, None)
    a, sh = S.standardization(X)
    Z = X * a + sh

    def fit(idx, rhos):
        ws, cs, sw, rescued, n_out = _prepare(Z[idx], y[idx], pred0[idx], C, rhos, cfg.min_scale)
        W, b, info = S.fit_logreg(Z[idx], y[idx], C, sample_weight=sw, l2=cfg.l2,
                                  feature_scale=ws, feature_shift=cs, standardize=False,
                                  tol=cfg.tol, max_iter=cfg.max_iter, device=inputs.device)
        # W, b act on z (the solver folded T); fold the standardisation
        W, b = S.fold_affine(W.cpu(), b.cpu(), a, sh)
        return W, b, ws, cs, rescued, n_out, info

    rhos = [float(r) for r in cfg.identity_reg_grid]
    fit_idx, ho_idx = S.stratified_split(y, 1.0 - cfg.holdout_fraction, gen)
    best, scores = 0, []
    if len(rhos) > 1 and ho_idx.numel() > 0:
        Wk, bk, _, _, resc, _, _ = fit(fit_idx, rhos)
        worst, mean = S.selection_scores(X[ho_idx], y[ho_idx], Wk, bk, strata[ho_idx])
        best = S.pick_best(worst, mean)
        scores = [{"identity_reg": r, "n_rescued": resc[i], "heldout_worst_acc": float(worst[i]),
                   "heldout_mean_acc": float(mean[i])} for i, r in enumerate(rhos)]
    Wf, bf, ws, cs, resc, n_out, info = fit(torch.arange(X.shape[0]), [rhos[best]])
    w = ws[0]
    diag = {
        "chosen_identity_reg": rhos[best],
        "selection": crit,
        "n_rescued": resc[0],
        "n_outliers_per_class": n_out,
        "n_misclassified_original": int((pred0 != y).sum()),
        "scale_summary": {"min": float(w.min()), "median": float(w.median()), "max": float(w.max())},
        "most_shrunk_dims": [int(i) for i in torch.argsort(w.abs())[:20].tolist()],
        "candidates": scores,
        "n_fit": int(fit_idx.numel()),
        "n_heldout": int(ho_idx.numel()),
        "solver_converged": bool(info["converged"][0]),
    }
    return RepairOutput(W=Wf[0].float().contiguous(), b=bf[0].float().contiguous(), diagnostics=diag)
