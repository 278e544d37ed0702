"""AFR: Automatic Feature Reweighting (Qiu, Potapczynski, Izmailov & Wilson, 2023), last layer.

Per-sample weights from the ORIGINAL head's confidence in the true class,
``w_i ∝ exp(-gamma * p_i(y_i))``, re-normalised so that every class has the same
total weight (total 1). The head is initialised at the original head and trained
with the weighted cross-entropy plus an L2 pull toward the original head:

    sum_i w_i CE_i  +  pull/2 * ||theta - theta_orig||^2  +  l2/2 * ||W||^2

(mean-scale: the weights sum to 1; coordinates are the solver's standardised ones,
folded back, see :mod:`repair.solver`). ``gamma`` and ``pull`` come from small grids:
all ``len(gamma_grid) * len(pull_grid)`` candidates are ONE batched solver call on
a fit part of ``inputs``; the held-out part scores them by the selection criterion:

- ``"auto"``: worst-group accuracy with the given group labels if present, else
  worst-class accuracy (a good proxy for worst-group accuracy in model selection,
  LaBonte et al. 2023; on our benchmarks the worst *inferred* group, class x
  correct/incorrect under the original head, chose large gammas that over-corrected:
  e.g. demo test WGA 48-62% against 82-90% with worst-class);
- ``"worst_group"``, ``"worst_inferred_group"``, ``"worst_class"``: explicit.

Group labels are only used for that selection (never for the weights). With
``refit_on_all`` the chosen candidate is refitted on all of ``inputs``.

Config fields (:class:`AFRConfig`):

- ``gamma_grid`` (0, 1, 2, 4, 8, 12, 16, 20): reweighting temperatures tried.
- ``pull_grid`` (0.001, 0.01, 0.1): strengths of the L2 pull to the original head.
- ``l2`` (1e-4): plain L2 on the weights (keeps ``pull=0`` well posed).
- ``holdout_fraction`` (0.5): share of ``inputs`` held out to score candidates.
- ``selection`` ("auto"): see above.
- ``refit_on_all`` (True): refit the chosen candidate on all ``inputs``.
- ``standardize`` (True), ``tol`` (1e-4), ``max_iter`` (500): solver settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import RepairInputs, RepairOutput, register_method
from .. import solver as S
from .dfr import apply_transform, example_transform, fold_head  # same folding (standardisation)

__all__ = ["AFRConfig", "afr", "afr_weights", "apply_transform", "fold_head", "example_transform"]


@dataclass
class AFRConfig:
    gamma_grid: tuple = (0.0, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 20.0)
    pull_grid: tuple = (0.001, 0.01, 0.1)
    l2: float = 1e-4
    holdout_fraction: float = 0.5
    selection: str = "auto"
    refit_on_all: bool = True
    standardize: bool = True
    tol: float = 1e-4
    max_iter: int = 500


def afr_weights(p_true: torch.Tensor, y: torch.Tensor, num_classes: int, gammas) -> torch.Tensor:
    """(G, N) weights ``exp(-gamma p_i)`` normalised so each present class sums to
    ``1 / n_present_classes`` (rows sum to 1)."""
    gam = torch.as_tensor(list(gammas), dtype=torch.float64).view(-1, 1)
    # subtract the per-class minimum exponent for numerical safety (cancels in the normalisation)
    logits = -gam * p_true.double().view(1, -1)
    w = torch.zeros_like(logits)
    present = [c for c in range(num_classes) if bool((y == c).any())]
    for c in present:
        m = y == c
        lc = logits[:, m]
        ec = torch.exp(lc - lc.max(1, keepdim=True).values)
        w[:, m] = ec / ec.sum(1, keepdim=True) / len(present)
    return w.float()


@register_method("afr", summary="Automatic Feature Reweighting: head retrained from the original with "
                                "exp(-gamma p_true) class-balanced weights and an L2 pull to the original",
                 config=AFRConfig, needs_groups=False, uses_groups=True)
def afr(inputs: RepairInputs, config: AFRConfig) -> RepairOutput:
    cfg = config
    if not cfg.gamma_grid or not cfg.pull_grid:
        raise ValueError("gamma_grid and pull_grid must be non-empty")
    gen = torch.Generator().manual_seed(int(inputs.seed))
    X, y, W0, b0 = inputs.cpu_tensors()
    C = inputs.num_classes
    lg0 = X @ W0.T + b0
    p_true = torch.softmax(lg0, 1).gather(1, y.view(-1, 1)).squeeze(1)
    groups = None if inputs.groups is None else inputs.groups.long().cpu()
    selection = cfg.selection
    if selection == "auto":
        selection = "worst_group" if groups is not None else "worst_class"
    strata, crit = S.resolve_selection_groups(selection, y, lg0, groups)

    gammas = [float(g) for g in cfg.gamma_grid]
    pulls = [float(p) for p in cfg.pull_grid]
    cand = [(g, p) for g in gammas for p in pulls]

    def fit(idx, cands):
        w = afr_weights(p_true[idx], y[idx], C, [g for g, _ in cands])
        pull = torch.tensor([p for _, p in cands])
        return S.fit_logreg(X[idx], y[idx], C, sample_weight=w, l2=cfg.l2, ref_pull=pull,
                            init_W=W0, init_b=b0, ref_W=W0, ref_b=b0, standardize=cfg.standardize,
                            tol=cfg.tol, max_iter=cfg.max_iter, device=inputs.device)

    fit_idx, ho_idx = S.stratified_split(strata, 1.0 - cfg.holdout_fraction, gen)
    scores = []
    best = 0
    if len(cand) > 1 and ho_idx.numel() > 0:
        Wk, bk, info = fit(fit_idx, cand)
        worst, mean = S.selection_scores(X[ho_idx], y[ho_idx], Wk, bk, strata[ho_idx])
        best = S.pick_best(worst, mean)
        scores = [{"gamma": g, "pull": p, "heldout_worst_acc": float(worst[i]),
                   "heldout_mean_acc": float(mean[i]), "solver_iters": int(info["n_iter"][i])}
                  for i, (g, p) in enumerate(cand)]
        Wb, bb, conv = Wk[best], bk[best], bool(info["converged"][best])
    if not scores or cfg.refit_on_all:
        Wf, bf, finfo = fit(torch.arange(X.shape[0]), [cand[best]])
        Wb, bb, conv = Wf[0], bf[0], bool(finfo["converged"][0])
    g_best, p_best = cand[best]
    w_all = afr_weights(p_true, y, C, [g_best])[0]
    diag = {
        "chosen_gamma": g_best,
        "chosen_pull": p_best,
        "selection": crit,
        "candidates": scores,
        "n_fit": int(fit_idx.numel()),
        "n_heldout": int(ho_idx.numel()),
        "refit_on_all": bool(cfg.refit_on_all or not scores),
        "solver_converged": conv,
        "weight_effective_sample_size": float(1.0 / (w_all.double() ** 2).sum()),
        "weight_max_share": float(w_all.max()),
    }
    return RepairOutput(W=Wb.detach().float().cpu().contiguous(),
                        b=bb.detach().float().cpu().contiguous(), diagnostics=diag)
