"""NSF, "Let Samples Speak" (Li et al., 2025): per-dimension affine feature map + new head.

No group labels are ever used. All geometry happens on standardised embeddings
``z = x * a + c`` (statistics of ``inputs``; folded back at the end).

1. Class prototypes = class means of ``z``. *Outliers* of a class are its samples whose own
   prototype is farther (euclidean) than another class's.
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
   (``transforms.AFFINE``), then the standardisation.
5. ``identity_reg`` is chosen from ``identity_reg_grid`` on a held-out part of
   ``inputs`` (class-stratified) by ``selection`` (:mod:`repair.selection`; ``auto`` is
   the label-free default; ``"worst_inferred_group"``: class x correct/incorrect under
   the original head); all candidates are one batched solver call (per-problem feature
   maps). The final map and head are refitted on all of ``inputs`` with the chosen
   strength. The standardisation, prototypes and outliers are :mod:`repair.probing`'s
   (``nsf_space``, ``dispersion``): ``repair probe`` reports the same dispersion.

Config fields (:class:`NSFConfig`):

- ``identity_reg_grid`` (0.001, 0.01, 0.1, 1.0): strengths of the pull of ``T`` to identity.
- ``holdout_fraction`` (0.5): share of ``inputs`` held out to score candidates.
- ``selection`` ("auto"): "auto" | "worst_class" | "worst_inferred_group".
- ``l2`` (1.0): L2 strength of the head on ``T(z)`` (sklearn ``1/C``, weights sum to n).
- ``min_scale`` (0.0): floor for ``w`` (keeps every dimension usable if > 0).
- ``tol`` (1e-4), ``max_iter`` (1000): solver settings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import solver as S
from ..config import setting
from ..probing import dispersion, nearest_class, nsf_space
from ..selection import Criterion, Holdout, head_predictions, select_and_refit
from . import AFFINE, RepairInputs, RepairOutput, register_method

__all__ = ["NSFConfig", "nsf", "fit_affine_map", "class_targets"]


@dataclass
class NSFConfig:
    identity_reg_grid: tuple = setting((0.001, 0.01, 0.1, 1.0), ge=0, nonempty=True)
    holdout_fraction: float = setting(0.5, gt=0, lt=1)
    selection: str = setting("auto", choices=("auto", "worst_class", "worst_inferred_group"))
    l2: float = setting(1.0, ge=0)
    min_scale: float = setting(0.0, ge=0)
    tol: float = setting(1e-4, gt=0)
    max_iter: int = setting(1000, ge=1, le=1_000_000)


def class_targets(Z: torch.Tensor, y: torch.Tensor, num_classes: int):
    """Prototypes, outlier flags and per-class targets (see module docstring).
    Classes absent from ``y`` get a NaN prototype and are never nearest."""
    protos, outlier = dispersion(Z, y, num_classes)     # repair probe's dispersion, one code path
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
        resc = (~correct) & (nearest_class(TZ, targets) == y)    # T was fitted toward the targets
        use = correct | resc
        ws.append(w)
        cs.append(c)
        sw.append(S.class_balanced_weights(y, C, mask=use))
        rescued.append(int(resc.sum()))
    return torch.stack(ws), torch.stack(cs), torch.stack(sw), rescued, n_out


def _freeze(cfg: NSFConfig, diag: dict) -> NSFConfig:
    """Refit with the identity regulariser the inner selection chose."""
    return dataclasses.replace(cfg, identity_reg_grid=(diag["chosen"]["identity_reg"],))

@register_method("nsf", summary="Let Samples Speak: per-dimension affine map pulling samples to "
                                "class targets between inlier/outlier modes, head retrained (no groups)",
                 config=NSFConfig, groups="never", freeze=_freeze, transform=AFFINE)
def nsf(inputs: RepairInputs, cfg: NSFConfig) -> RepairOutput:
    gen, X, y, W0, b0, lg0 = inputs.prepared()
    C = W0.shape[0]
    pred0 = lg0.argmax(1)
    crit = Criterion.resolve(cfg.selection, has_groups=False, y=y, ref_logits=lg0)
    Z, a, sh = nsf_space(X)                 # the space repair probe measures dispersion in
    rhos = [float(r) for r in cfg.identity_reg_grid]

    def fit(idx, which):
        rs = [rhos[i] for i in which]
        ws, cs, sw, rescued, n_out = _prepare(Z[idx], y[idx], pred0[idx], C, rs, cfg.min_scale)
        W, b, info = S.fit_logreg(Z[idx], y[idx], C, sample_weight=sw, l2=cfg.l2,
                                  feature_scale=ws, feature_shift=cs, standardize=False,
                                  tol=cfg.tol, max_iter=cfg.max_iter, device=inputs.device)
        # W, b act on z (the solver folded T); fold the standardisation
        W, b = AFFINE.fold(W.cpu(), b.cpu(), {"scale": a, "shift": sh})
        return W, b, ws, rescued, n_out, info

    sel = select_and_refit(len(rhos), fit, lambda f, idx: head_predictions(X[idx], f[0], f[1]), y,
                           criterion=crit, score_strata=crit.strata(y, lg0), split_strata=y,
                           scheme=Holdout(cfg.holdout_fraction, clusters=inputs.clusters), seed=gen)
    Wf, bf, ws, resc, n_out, info = sel.final
    fitted = sel.fold_fits[0] if sel.fold_fits else None
    w = ws[0]
    diag = {
        "chosen": {"identity_reg": rhos[sel.best]},
        "selection": sel.describe(),
        "n_rescued": resc[0],
        "n_outliers_per_class": n_out,
        "n_misclassified_original": int((pred0 != y).sum()),
        "scale_summary": {"min": float(w.min()), "median": float(w.median()), "max": float(w.max())},
        "most_shrunk_dims": [int(i) for i in torch.argsort(w.abs())[:20].tolist()],
        "candidates": sel.candidates([{"identity_reg": r, "n_rescued": fitted[3][i] if fitted else None}
                                      for i, r in enumerate(rhos)]),
        "solver_converged": bool(info["converged"][0]),
    }
    return RepairOutput(W=Wf[0].float().contiguous(), b=bf[0].float().contiguous(), diagnostics=diag)
