"""DFR: Deep Feature Reweighting (Kirichenko, Izmailov & Wilson, 2022), last-layer part.

Protocol (``dfr_val`` in the paper's code, made batched):

1. Groups: ``inputs.groups`` when given (``group_source="auto"``/``"given"``), else
   *inferred* groups = class x (correct / incorrect under the original head), the
   convention of :func:`repair.solver.inferred_groups`.
2. Split ``inputs`` in two halves stratified by group (seeded). For every strength
   ``C`` in ``c_grid`` fit an L1 logistic regression (sklearn's ``C`` convention, see
   :mod:`repair.solver`) on ``n_tune_refits`` group-balanced subsamples of the first
   half; score the (averaged) head on the second half by worst-group accuracy. All
   ``len(c_grid) * n_tune_refits`` fits are ONE batched solver call.
3. With the chosen ``C`` fit ``n_refits`` heads on group-balanced subsamples of *all*
   of ``inputs`` (ONE batched call with (K, N) 0/1 sample weights) and average them.

Features are standardised with statistics of the fitted rows and the
standardisation is folded back into the head (:func:`fold_head`).

Group-balanced subsample: every group contributes ``n_g = max(smallest group,
min_subsample_per_group)`` samples; groups with fewer members keep all of them,
up-weighted to a total of ``n_g`` (a no-op when every group has at least
``min_subsample_per_group`` members, i.e. exact DFR then; it avoids degenerate
subsamples when an inferred "misclassified" group has 2 members).

:func:`fit_balanced_l1` is the reusable fitting core (also used by ``mix``): it
takes a ``problem_builder`` that turns (X, y, groups) into the per-problem training
data, so variants only change how the training sets are built.

Config fields (:class:`DFRConfig`, stable names for recipes):

- ``c_grid`` (1, .7, .3, .1, .07, .03, .01): inverse L1 strengths tried (sklearn ``C``).
- ``n_refits`` (20): balanced refits averaged into the final head.
- ``n_tune_refits`` (1): balanced subsamples per ``C`` during tuning (heads averaged).
- ``tune_fraction`` (0.5): share of ``inputs`` fitted on during tuning (the rest scores).
- ``group_source`` ("auto"): "auto" (given if available else inferred), "given", "inferred".
- ``min_subsample_per_group`` (20): floor of the per-group subsample size (see above).
- ``standardize`` (True): standardise features before the L1 fit (folded back).
- ``tol`` (1e-4), ``max_iter`` (2000): solver stopping rule (gradient-mapping norm of
  the mean loss) and iteration cap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import RepairInputs, RepairOutput, register_method
from .. import solver as S

__all__ = ["DFRConfig", "dfr", "fit_balanced_l1", "resolve_groups", "subsample_problems",
           "apply_transform", "fold_head", "example_transform", "run_balanced_protocol"]


@dataclass
class DFRConfig:
    c_grid: tuple = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
    n_refits: int = 20
    n_tune_refits: int = 1
    tune_fraction: float = 0.5
    group_source: str = "auto"
    min_subsample_per_group: int = 20
    standardize: bool = True
    tol: float = 1e-4
    max_iter: int = 2000


# --- folding (standardisation) ------------------------------------------------------------

def apply_transform(X: torch.Tensor, transform: dict) -> torch.Tensor:
    """The feature map the fitted head sees: ``X * scale + shift`` (standardisation)."""
    return X * transform["scale"] + transform["shift"]


def fold_head(W: torch.Tensor, b: torch.Tensor, transform: dict):
    """Head on ``apply_transform(X)`` -> equivalent head on raw ``X``."""
    return S.fold_affine(W, b, transform["scale"], transform["shift"])


def example_transform(D: int, generator: torch.Generator) -> dict:
    """A random transform of the kind this method uses (for fold tests)."""
    X = torch.randn(50, D, generator=generator) * 3 + 1
    scale, shift = S.standardization(X)
    return {"scale": scale, "shift": shift}


# --- groups and training-set builders ------------------------------------------------------

def resolve_groups(inputs: RepairInputs, group_source: str):
    """(groups (N,) int64 cpu, source name) for balancing and selection."""
    if group_source not in ("auto", "given", "inferred"):
        raise ValueError(f"group_source must be auto/given/inferred, got {group_source!r}")
    if group_source == "given" and inputs.groups is None:
        raise ValueError("group_source='given' but no group labels were provided")
    if inputs.groups is not None and group_source in ("auto", "given"):
        return inputs.groups.long().cpu().clone(), "given"
    with torch.no_grad():
        lg = inputs.X.float().cpu() @ inputs.W.float().cpu().T + inputs.b.float().cpu()
    return S.inferred_groups(lg, inputs.y.cpu()), "inferred"


ProblemBuilder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Generator, int],
                          tuple]


def subsample_problems(X, y, groups, n_problems, generator, min_per_group):
    """DFR training sets: the data itself with (K, N) group-balanced subsample weights."""
    w = S.balanced_subsample_weights(groups, n_problems, generator, min_per_group=min_per_group)
    return X, y, w


def fit_balanced_l1(X: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, num_classes: int,
                    c_values, n_per_c: int, cfg, generator: torch.Generator, device: str,
                    problem_builder: Optional[ProblemBuilder] = None):
    """Fit ``len(c_values) * n_per_c`` L1 heads in ONE solver call and average the
    ``n_per_c`` heads of each ``C``. Returns ``(W (len(c),C,D), b (len(c),C), info)``
    (on ``device``). ``problem_builder(X, y, groups, K, generator, min_per_group)``
    returns ``(X_fit, y_fit, sample_weight (K, N_fit))``; default: balanced subsamples."""
    builder = problem_builder or subsample_problems
    c_values = [float(c) for c in c_values]
    K = len(c_values) * n_per_c
    Xf, yf, w = builder(X, y, groups, K, generator, int(cfg.min_subsample_per_group))
    l1 = torch.tensor([1.0 / c for c in c_values for _ in range(n_per_c)])
    W, b, info = S.fit_logreg(Xf, yf, num_classes, sample_weight=w, l1=l1,
                              standardize=cfg.standardize, tol=cfg.tol, max_iter=cfg.max_iter,
                              device=device)
    D = W.shape[-1]
    W = W.view(len(c_values), n_per_c, num_classes, D).mean(1)
    b = b.view(len(c_values), n_per_c, num_classes).mean(1)
    info = dict(info)
    info["rows_per_problem"] = [int(v) for v in (w > 0).sum(1).tolist()]
    return W, b, info


def run_balanced_protocol(inputs: RepairInputs, cfg, problem_builder: Optional[ProblemBuilder] = None,
                          method_name: str = "dfr") -> RepairOutput:
    """Tune ``C`` on a held-out half by worst-group accuracy, refit on all inputs
    (shared by ``dfr`` and ``mix``)."""
    if not cfg.c_grid:
        raise ValueError("c_grid is empty")
    if cfg.n_refits < 1 or cfg.n_tune_refits < 1:
        raise ValueError("n_refits and n_tune_refits must be >= 1")
    gen = torch.Generator().manual_seed(int(inputs.seed))
    X = inputs.X.detach().float().cpu()
    y = inputs.y.detach().long().cpu()
    C = inputs.num_classes
    groups, source = resolve_groups(inputs, cfg.group_source)
    n_groups = int(groups.max()) + 1 if groups.numel() else 0

    tr, ho = S.stratified_split(groups, cfg.tune_fraction, gen)
    tune_scores = []
    chosen = float(cfg.c_grid[0])
    if len(cfg.c_grid) > 1 and ho.numel() > 0:
        Wt, bt, tinfo = fit_balanced_l1(X[tr], y[tr], groups[tr], C, cfg.c_grid, cfg.n_tune_refits,
                                        cfg, gen, inputs.device, problem_builder)
        worst, mean = S.selection_scores(X[ho], y[ho], Wt, bt, groups[ho])
        best = S.pick_best(worst, mean)
        chosen = float(cfg.c_grid[best])
        tune_scores = [{"C": float(c), "heldout_worst_group_acc": float(worst[i]),
                        "heldout_mean_acc": float(mean[i]), "solver_iters": int(tinfo["n_iter"][i * cfg.n_tune_refits])}
                       for i, c in enumerate(cfg.c_grid)]
    Wf, bf, finfo = fit_balanced_l1(X, y, groups, C, [chosen], cfg.n_refits, cfg, gen,
                                    inputs.device, problem_builder)
    counts = torch.bincount(groups, minlength=n_groups).tolist()
    diag = {
        "method": method_name,
        "chosen_C": chosen,
        "group_source": source,
        "n_groups_present": int(sum(1 for c in counts if c > 0)),
        "group_counts": [int(c) for c in counts],
        "tuning": tune_scores,
        "n_tune_fit": int(tr.numel()),
        "n_tune_heldout": int(ho.numel()),
        "final_rows_per_refit": int(max(finfo["rows_per_problem"])),
        "final_solver_iters_max": int(max(finfo["n_iter"])),
        "final_solver_converged": bool(all(finfo["converged"])),
        "final_nonzero_features": int((Wf[0].abs().amax(0) > 0).sum()),
    }
    return RepairOutput(W=Wf[0].detach().float().cpu().contiguous(),
                        b=bf[0].detach().float().cpu().contiguous(), diagnostics=diag)


@register_method("dfr", summary="Deep Feature Reweighting: L1 logistic head on group-balanced "
                                "subsamples, C tuned on a held-out half by worst-group accuracy",
                 config=DFRConfig, needs_groups=False, uses_groups=True)
def dfr(inputs: RepairInputs, config: DFRConfig) -> RepairOutput:
    return run_balanced_protocol(inputs, config, None, "dfr")
