"""DFR: Deep Feature Reweighting (Kirichenko, Izmailov & Wilson, 2022), last-layer part.

Two protocols (``protocol``), both refit the head on ``inputs`` only, with groups
from ``inputs.groups`` when given (``group_source="auto"``/``"given"``), else
*inferred* groups = class x (correct / incorrect under the original head), the
convention of :func:`repair.selection.inferred_groups`.

``protocol="fast"`` (default): a group-balanced L2 logistic head, ``C`` chosen by
2-fold cross-validated worst-group accuracy.

1. Standardise the features over all rows; constant features are dropped (their
   weight is 0). Groups larger than ``group_cap * n_g`` rows (``n_g`` below) are
   thinned to that many rows (bounded cost on big unbalanced sets). Split the rows in
   two halves stratified by group (seeded).
2. On each half, fit L2 logistic regressions (sklearn's binary ``C`` convention:
   ``sum_i w_i CE_i + ||v||^2 / (2C)``, intercept free) for every ``C`` in ``c_grid``,
   with *expected* group-balanced weights instead of random subsamples: every row
   gets ``n_g / count(its group)``, ``n_g = max(smallest group, min_subsample_per_group)``
   -- the average of DFR's subsample indicators, so one weighted fit replaces the
   average over subsamples and ``C`` means what it means for a DFR subsample.
   Both halves and the whole ``C`` path are ONE solver call, warm-started from the strongest
   penalty: :func:`repair.solver.fit_binary_l2_path` (batched damped Newton, primal or
   Gram-matrix form) on small problems, :func:`repair.solver.fit_binary_l2_path_lbfgs`
   (batched L-BFGS on one copy of the fitted rows, the standardisation folded into the
   parameters) on large ones; the rule is :func:`repair.solver.path_solver` (estimated cost and
   Newton's per-problem copies against a memory budget; ``solver`` forces one). Same objective
   either way.
3. Score every ``C`` by worst-group accuracy of the cross-validated predictions
   (each row predicted by the head of the half it is not in; ties: mean accuracy,
   then ``c_grid`` order). Two classes: the head is the average of the two half heads at the
   chosen ``C`` (no refit), one binary logit ``v.x + c`` returned as the 2-row head
   ``[-v/2, v/2]`` (softmax = the fitted sigmoid). More classes: the strengths are scored with
   one-vs-rest binary fits (argmax of their logits); the head is ONE multinomial (softmax) fit
   at the chosen ``C`` on all rows (a half holds few rows of each class when there are many),
   by L-BFGS with the standardisation folded in (the model scikit-learn's lbfgs fits; at
   1,000 classes the one-vs-rest refit was 0.3 worst-group points below it).

No repeated refits: on the benchmark tasks (800-1000 rows,
128-1280 features) it takes 8-40 ms on one CPU thread, 17-150x less than the paper
protocol with sklearn's liblinear (``bench/references.py``) with given groups and
5-12x less with inferred groups (there the paper's subsamples are tiny), at equal
test worst-group accuracy with given groups and equal or higher with inferred ones
(L2 vs L1 made no systematic difference there; the 2-fold choice of ``C`` is less
noisy than one half-split, and the weighted fit uses every row).

``protocol="bagged"``: the paper protocol below with an L2 penalty (two classes: every
subsample and strength solved in one batched call, Newton or -- larger -- L-BFGS on each
subsample's block of rows; more classes: FISTA, or -- larger -- one subsample at a time by
L-BFGS, see :func:`repair.solver.fit_logreg`) -- the robust choice for unequal groups. Its
strength is chosen by the worst group's mean probability of the true class on the held-out part
(``tune_score``), not by its accuracy: the held-out groups hold a few dozen rows, their accuracy
moves by whole rows and its minimum jumped by 10-20 points between neighbouring strengths.

``protocol="paper"``: the paper's ``dfr_val`` protocol (made batched; the exact
recipe of the paper, kept for reproduction):

1. Split ``inputs`` stratified by group (seeded; ``holdout_fraction`` held out). For every strength
   ``C`` in ``c_grid`` fit an L1 logistic regression (sklearn's ``C`` convention, see
   :mod:`repair.solver`) on ``n_tune_refits`` group-balanced subsamples of the fit
   part; score the (averaged) head on the held-out part by worst-group accuracy. All
   ``len(c_grid) * n_tune_refits`` fits are ONE batched solver call.
2. With the chosen ``C`` fit ``n_refits`` heads on group-balanced subsamples of *all*
   of ``inputs`` (ONE batched call with (K, N) 0/1 sample weights) and average them.

Features are standardised with statistics of the fitted rows and the
standardisation is folded back into the head (:func:`fold_head`).

Group-balanced subsample: every group contributes ``n_g = max(smallest group,
min_subsample_per_group)`` samples; groups with fewer members keep all of them,
up-weighted to a total of ``n_g`` (a no-op when every group has at least
``min_subsample_per_group`` members, i.e. exact DFR then; it avoids degenerate
subsamples when an inferred "misclassified" group has 2 members).

:func:`fit_balanced_l1` is the reusable fitting core of the paper protocol (also
used by ``mix``): it takes a ``problem_builder`` that turns (X, y, groups) into the
per-problem training data, so variants only change how the training sets are built.

Config fields (:class:`DFRConfig`, stable names for recipes):

- ``protocol`` ("auto"): "fast", "bagged", "paper" (see above), or "auto": "bagged" when the
  groups in use are very unequal within the classes (:func:`repair.selection.group_imbalance`
  >= ``IMBALANCE_THRESHOLD``, e.g. a repair set skewed like deployment data, or rare errors of
  the original model) and a group-balanced subsample is small next to the feature count
  (<= ``BAG_ROWS_PER_FEATURE`` rows per feature) but still holds ``BAG_MIN_ROWS_PER_CLASS`` rows of
  each class (with many classes and small groups it holds one or two: nothing to fit a head on),
  else "fast". Measured (``bench/analysis.md``): reweighting all rows
  (fast) uses every sample and wins on balanced repair sets, but on skewed ones the averaged
  group-balanced subsamples win by 3-13 points of test worst-group accuracy -- importance
  weights lose their effect on nearly separable data, subsampling does not (Idrissi et al. 2022).
- ``c_grid`` (None = the protocol's grid): inverse penalty strengths tried (sklearn
  ``C``); fast: L2, :data:`FAST_C_GRID` (10, 3, 1, .3, .1, .03, .01, .003, .001); paper: L1, (1, .7, .3, .1, .07, .03, .01).
- ``n_refits`` (20): paper and bagged only: balanced refits averaged into the final head.
- ``n_tune_refits`` (1): paper and bagged only: balanced subsamples per ``C`` during tuning.
- ``tune_score`` ("auto"): how the held-out part scores each ``C`` in the subsample protocols:
  "accuracy" (worst-group accuracy, the paper's), "probability" (the worst group's mean
  probability of the true class, :func:`repair.selection.probability_scores`), or "auto":
  "probability" for the bagged protocol, "accuracy" for the paper's (kept exact). Measured
  (``python -m bench.tune_score``, 10 seeds, ``bench/analysis.md``): label-free on the skewed
  capped text set 64.4 +- 4.8 test worst-group with accuracy, 66.7 +- 4.6 with probability
  (``mix``: 63.0 +- 6.4 -> 65.8 +- 3.9); over all 24 bagged settings +0.7 on average, at most 1.0
  lower (the skewed demo, label-free). The fast protocol's two-fold choice always scores by accuracy.

  These four settings, changed from their defaults with ``protocol: fast``, and ``group_cap`` or
  ``solver`` changed with ``protocol: paper`` or ``bagged``, are refused (they would do nothing);
  ``protocol: auto`` takes them all (it runs either).
- ``holdout_fraction`` (0.5): paper and bagged only: share of ``inputs`` held out to score the
  strengths during tuning (the fast protocol always uses two halves, each scoring the other).
- ``group_source`` ("auto"): "auto" (given if available else inferred), "given", "inferred".
- ``min_subsample_per_group`` (0): floor of the per-group subsample size (paper, bagged) /
  of the per-group total weight ``n_g`` (fast), see above; 0 is the paper's rule (measured
  better than 20 on the skewed sets: 76.9 vs 70.0 test WGA on mnist_color).
- ``standardize`` (True): standardise features before the fit (folded back).

- ``group_cap`` (4.0): fast only: a group with more than ``group_cap * n_g`` rows is
  thinned to that many (seeded random) rows before the split, so the cost stays
  bounded on large unbalanced repair sets (DFR itself keeps ``n_g``); None or 0 = all
  rows. No effect when groups are balanced.
- ``solver`` ("auto"): fast protocol, two classes: "newton", "lbfgs" or "auto" (see step 2).
- ``tol``, ``max_iter`` (None = the protocol's defaults): solver stopping rule and
  iteration cap. fast (1e-3, 50): Newton decrement (predicted objective gap) per unit
  of sample weight, Newton steps per path point (L-BFGS: its quasi-Newton decrement and
  last decrease, 10x as many iterations); paper (1e-4, 2000): gradient-mapping
  norm of the mean loss, FISTA iterations. The fast protocol's many-class head (one
  multinomial L-BFGS fit) stops at the largest gradient entry of the mean objective: 1e-4
  (or ``tol`` when tighter) and 1,000 iterations (or 10x ``max_iter`` when set, as the path).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import solver as S
from .. import threads
from ..config import setting
from ..selection import (IMBALANCE_THRESHOLD, SCORES, Criterion, Holdout, KFold, group_imbalance,
                         head_logits, inferred_groups, select_and_refit)
from . import AFFINE, RepairInputs, RepairOutput, register_method

__all__ = ["DFRConfig", "dfr", "fit_balanced_l1", "resolve_groups", "subsample_problems",
           "run_balanced_protocol", "run_fast_protocol", "resolved", "tune_score", "PAPER_C_GRID", "FAST_C_GRID"]


PAPER_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
#: the fast protocol's strengths. It reaches down to 0.001: its weighted fit uses every row, and with
#: tens of thousands of rows (the 50k x 2,048 scale benchmark, two classes) the chosen strength sat at
#: the old grid's edge (0.03, 2.4 points of worst-group accuracy below the DFR protocol); down to 0.001
#: it matched the protocol (the stronger penalties are the cheap start of the warm-started path)
FAST_C_GRID = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
#: the auto protocol bags only while a balanced subsample has at most this many rows per feature:
#: there a weighted fit can (nearly) separate the data and the weights lose their effect; with more
#: rows the weighted fit on all of them is as robust and far cheaper (the 50k x 2048 scale benchmark)
BAG_ROWS_PER_FEATURE = 4
#: ... and while it holds at least this many rows per class: with many classes and small groups a
#: balanced subsample holds a row or two of each class (1,000 classes, 50 rows each), too few to fit
#: a head on, and each of the bagged refits is a full C-way fit (the 1,000-class scale benchmark)
BAG_MIN_ROWS_PER_CLASS = 10
#: the protocols that may run the subsample protocol (its refits, held-out part and score) and the fast one
SUBSAMPLE_PROTOCOLS, FAST_PROTOCOLS = ("auto", "bagged", "paper"), ("auto", "fast")
_DEFAULTS = {"paper": {"c_grid": PAPER_C_GRID, "tol": 1e-4, "max_iter": 2000},
             "bagged": {"c_grid": PAPER_C_GRID, "tol": 1e-4, "max_iter": 2000},
             "fast": {"c_grid": FAST_C_GRID, "tol": 1e-3, "max_iter": 50}}


@dataclass
class DFRConfig:
    protocol: str = setting("auto", choices=("auto", "fast", "bagged", "paper"))
    c_grid: Optional[tuple] = setting(None, gt=0, nonempty=True)
    # the subsample protocols' settings (run_balanced_protocol), and the fast protocol's (_run_fast): one
    # that another protocol never reads is refused when changed (``auto`` may run either)
    n_refits: int = setting(20, ge=1, le=1000, only_if={"protocol": SUBSAMPLE_PROTOCOLS})
    n_tune_refits: int = setting(1, ge=1, le=1000, only_if={"protocol": SUBSAMPLE_PROTOCOLS})
    holdout_fraction: float = setting(0.5, gt=0, lt=1, only_if={"protocol": SUBSAMPLE_PROTOCOLS})
    tune_score: str = setting("auto", choices=("auto",) + SCORES, only_if={"protocol": SUBSAMPLE_PROTOCOLS})
    group_source: str = setting("auto", choices=("auto", "given", "inferred"))
    min_subsample_per_group: int = setting(0, ge=0, le=10_000_000)
    standardize: bool = True
    tol: Optional[float] = setting(None, gt=0)
    max_iter: Optional[int] = setting(None, ge=1, le=1_000_000)
    group_cap: Optional[float] = setting(4.0, ge=0, only_if={"protocol": FAST_PROTOCOLS})
    solver: str = setting("auto", choices=("auto", "newton", "lbfgs"), only_if={"protocol": FAST_PROTOCOLS})


def resolved(cfg, name: str):
    """``cfg.<name>``, or the protocol's default when it is None."""
    v = getattr(cfg, name)
    if v is not None:
        return v
    protocol = "fast" if cfg.protocol == "auto" else cfg.protocol
    if protocol not in _DEFAULTS:
        raise ValueError(f"protocol must be auto, fast, bagged or paper, got {cfg.protocol!r}")
    return _DEFAULTS[protocol][name]


def tune_score(cfg) -> str:
    """How the subsample protocols score each strength on the held-out part (``tune_score``; "auto":
    the mean probability of the true class for the bagged protocol, accuracy for the paper's)."""
    if cfg.tune_score != "auto":
        return cfg.tune_score
    return "probability" if cfg.protocol == "bagged" else "accuracy"


# --- groups and training-set builders ------------------------------------------------------

def resolve_groups(inputs: RepairInputs, group_source: str):
    """(groups (N,) int64 cpu, source name) for balancing and selection."""
    if group_source not in ("auto", "given", "inferred"):
        raise ValueError(f"group_source must be auto/given/inferred, got {group_source!r}")
    if group_source == "given" and inputs.groups is None:
        from ..errors import BadInput

        raise BadInput("group_source 'given' needs group labels (give --group-by)")
    if inputs.groups is not None and group_source in ("auto", "given"):
        return inputs.groups.long().cpu().clone(), "given"
    with torch.no_grad():
        lg = inputs.X.float().cpu() @ inputs.W.float().cpu().T + inputs.b.float().cpu()
    return inferred_groups(lg, inputs.y.cpu()), "inferred"


ProblemBuilder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Generator, int],
                          tuple]


def subsample_problems(X, y, groups, n_problems, generator, min_per_group):
    """DFR training sets: the data itself with (K, N) group-balanced subsample weights, no mixed rows."""
    w = S.balanced_subsample_weights(groups, n_problems, generator, min_per_group=min_per_group)
    return X, y, w, None


def fit_balanced_l1(X: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, num_classes: int,
                    c_values, n_per_c: int, cfg, generator: torch.Generator, device: str,
                    problem_builder: Optional[ProblemBuilder] = None):
    """Fit ``len(c_values) * n_per_c`` heads (``cfg.penalty``: L1 or L2) in ONE solver call and average the
    ``n_per_c`` heads of each ``C``. Returns ``(W (len(c),C,D), b (len(c),C), info)``
    (on ``device``). ``problem_builder(X, y, groups, K, generator, min_per_group)``
    returns ``(X_fit, y_fit, sample_weight (K, N_fit), row_mix)``, ``row_mix`` the mixed rows
    (:class:`repair.solver.mixing.RowMix`) the problems also have, or None; default: balanced
    subsamples."""
    builder = problem_builder or subsample_problems
    c_values = [float(c) for c in c_values]
    K = len(c_values) * n_per_c
    Xf, yf, w, row_mix = builder(X, y, groups, K, generator, int(cfg.min_subsample_per_group))
    inv = torch.tensor([1.0 / c for c in c_values for _ in range(n_per_c)], dtype=torch.float32)
    pen = {"l1": inv} if cfg.protocol == "paper" else {"l2": inv}      # bagged: L2 (batched Newton)
    W, b, info = S.fit_logreg(Xf, yf, num_classes, sample_weight=w, **pen,
                              standardize=cfg.standardize, tol=float(resolved(cfg, "tol")),
                              max_iter=int(resolved(cfg, "max_iter")),
                              device=device, row_mix=row_mix)
    D = W.shape[-1]
    W = W.view(len(c_values), n_per_c, num_classes, D).mean(1)
    b = b.view(len(c_values), n_per_c, num_classes).mean(1)
    info = dict(info)
    rows = (w > 0).sum(1)
    if row_mix is not None:
        rows = rows + (row_mix.w > 0).sum(1)
    info["rows_per_problem"] = [int(v) for v in rows.tolist()]
    return W, b, info


def _group_diag(groups: torch.Tensor, source: str) -> dict:
    counts = torch.bincount(groups, minlength=int(groups.max()) + 1 if groups.numel() else 0).tolist()
    return {"group_source": source, "n_groups_present": int(sum(1 for c in counts if c > 0)),
            "group_counts": [int(c) for c in counts]}


def _diag(method_name: str, protocol: str, chosen: float, sel, gdiag: dict, c_grid) -> dict:
    """The diagnostics both protocols share."""
    return {"method": method_name, "protocol": protocol, "chosen": {"C": chosen}, "selection": sel.describe(),
            **gdiag, "candidates": sel.candidates([{"C": c} for c in c_grid])}


def run_balanced_protocol(inputs: RepairInputs, cfg, problem_builder: Optional[ProblemBuilder] = None,
                          method_name: str = "dfr") -> RepairOutput:
    """The paper protocol: tune ``C`` on a held-out part by worst-group accuracy, then
    average balanced refits on all inputs (shared by ``dfr`` with ``protocol="paper"``
    and ``mix``)."""
    if cfg.protocol not in ("paper", "bagged"):
        raise ValueError(f"run_balanced_protocol runs protocol 'paper' or 'bagged', got {cfg.protocol!r}")
    c_grid = tuple(float(c) for c in resolved(cfg, "c_grid"))
    gen = torch.Generator().manual_seed(int(inputs.seed))
    X = inputs.X.detach().float().cpu()
    y = inputs.y.detach().long().cpu()
    C = inputs.num_classes
    groups, source = resolve_groups(inputs, cfg.group_source)
    crit = Criterion.resolve("auto", has_groups=True)        # the groups in use (given or inferred)
    score = tune_score(cfg)

    def fit(idx, which):
        Wt, bt, info = fit_balanced_l1(X[idx], y[idx], groups[idx], C, [c_grid[i] for i in which],
                                       cfg.n_tune_refits, cfg, gen, inputs.device, problem_builder)
        return Wt, bt, info

    # logits (K, n, C): the probability score needs them, the accuracy takes their argmax
    sel = select_and_refit(len(c_grid), fit, lambda f, idx: head_logits(X[idx], f[0], f[1]), y,
                           criterion=crit, score_strata=groups, scheme=Holdout(cfg.holdout_fraction, clusters=inputs.clusters),
                           seed=gen, refit=False, score=score)
    chosen = c_grid[sel.best]
    Wf, bf, finfo = fit_balanced_l1(X, y, groups, C, [chosen], cfg.n_refits, cfg, gen,
                                    inputs.device, problem_builder)
    diag = {
        **_diag(method_name, cfg.protocol, chosen, sel, _group_diag(groups, source), c_grid),
        "tune_score": score,
        "final_rows_per_refit": int(max(finfo["rows_per_problem"])),
        "final_solver_iters_max": int(max(finfo["n_iter"])),
        "final_solver_converged": bool(all(finfo["converged"])),
        "final_nonzero_features": int((Wf[0].abs().amax(0) > 0).sum()),
    }
    return RepairOutput(W=Wf[0].detach().float().cpu().contiguous(),
                        b=bf[0].detach().float().cpu().contiguous(), diagnostics=diag)


def _fold_problems(Z, y, groups, folds, num_classes, min_per_group):
    """Per-fold binary problems (one per fold for 2 classes, one-vs-rest otherwise):
    ``(Z (K,n,d), t (K,n), w (K,n), n_tasks)``, every fold's rows gathered and padded to
    a common length ``n`` with zero weights (problems are fold-major)."""
    n = max(int(f.numel()) for f in folds)
    tasks = [1] if num_classes == 2 else list(range(num_classes))
    idx, ws = [], []
    for f in folds:
        pad = n - f.numel()
        w = S.expected_balanced_weights(groups[f], min_per_group)
        idx.append(torch.cat([f, f[:1].expand(pad)]) if pad else f)
        ws.append(torch.cat([w, torch.zeros(pad, dtype=w.dtype)]) if pad else w)
    idx = torch.stack(idx)                                              # (F,n)
    Zf = Z.index_select(0, idx.flatten().to(Z.device)).view(len(folds), 1, n, -1)
    Zf = Zf.expand(-1, len(tasks), -1, -1).reshape(len(folds) * len(tasks), n, -1)
    t = torch.stack([(y[idx] == c) for c in tasks], 1).reshape(-1, n).double()
    w = torch.stack(ws).unsqueeze(1).expand(-1, len(tasks), -1).reshape(-1, n).double()
    return Zf, t, w, len(tasks)


def _head_from_binary(v: torch.Tensor, c: torch.Tensor, num_classes: int):
    """Binary scores (T=1, D) -> 2-row head ``[-v/2, v/2]`` (softmax = the fitted
    sigmoid); one-vs-rest scores (T=C, D) are the head as they are."""
    if num_classes == 2:
        return torch.stack([-0.5 * v[0], 0.5 * v[0]]), torch.stack([-0.5 * c[0], 0.5 * c[0]])
    return v, c


def _capped_rows(groups: torch.Tensor, cfg, gen: torch.Generator) -> Optional[torch.Tensor]:
    """Sorted row indices keeping at most ``group_cap * n_g`` (seeded random) rows of
    every group, or None when no group is that large (or no cap)."""
    cap = cfg.group_cap
    if not cap or cap <= 0 or groups.numel() == 0:
        return None
    counts = torch.bincount(groups)
    n_g = max(int(counts[counts > 0].min()), int(cfg.min_subsample_per_group))
    limit = max(1, int(cap * n_g))
    if int(counts.max()) <= limit:
        return None
    keep = []
    for g in torch.nonzero(counts).flatten().tolist():
        idx = torch.nonzero(groups == g).flatten()
        if idx.numel() > limit:
            idx = idx[torch.randperm(idx.numel(), generator=gen)[:limit]]
        keep.append(idx)
    return torch.sort(torch.cat(keep)).values


def run_fast_protocol(inputs: RepairInputs, cfg, method_name: str = "dfr") -> RepairOutput:
    """The fast protocol (see the module docstring): ``C`` chosen by 2-fold
    cross-validated worst-group accuracy along a warm-started L2 path; the head is
    the average of the two fold heads at that ``C``."""
    c_grid = tuple(float(c) for c in resolved(cfg, "c_grid"))
    tol, max_iter = float(resolved(cfg, "tol")), int(resolved(cfg, "max_iter"))
    dev = torch.device(inputs.device)
    N, D = inputs.X.shape
    with threads.for_small_work(N * D * min(N, D), dev, small=1e9):
        return _run_fast(inputs, cfg, c_grid, tol, max_iter, dev, method_name)


def _run_fast(inputs, cfg, c_grid, tol, max_iter, dev, method_name):
    gen = torch.Generator().manual_seed(int(inputs.seed))
    X = inputs.X.detach().to(dev, torch.float32)
    y = inputs.y.detach().long().cpu()
    C = inputs.num_classes
    N, D = X.shape
    groups, source = resolve_groups(inputs, cfg.group_source)
    n_rows = N
    gdiag = _group_diag(groups, source)
    keep = _capped_rows(groups, cfg, gen)
    clusters = inputs.clusters
    if keep is not None:                  # large groups thinned to group_cap * n_g rows
        y, groups = y[keep], groups[keep]
        clusters = None if clusters is None else clusters[keep.cpu()]
        N = keep.numel()
    T = 1 if C == 2 else C
    # constant features carry no signal (their weight is exactly 0 under an L2 penalty)
    active = torch.nonzero(X.amax(0) > X.amin(0)).flatten()
    if active.numel() == 0:
        active = torch.zeros(1, dtype=torch.long, device=dev)
    if cfg.solver == "auto":
        solver, why = S.path_solver((N + 1) // 2, int(active.numel()), 2 * T, float(X.numel() * 4), blocks=2)
    else:
        solver, why = cfg.solver, "set in the configuration"
    order = sorted(range(len(c_grid)), key=lambda i: c_grid[i])      # strong penalty first
    pos = [order.index(i) for i in range(len(c_grid))]               # c_grid index -> path index
    l2 = [1.0 / c_grid[i] for i in order]
    make = _newton_fits if solver == "newton" else _lbfgs_fits
    fit_folds, predict, head, infos = make(X, y, groups, keep, active, cfg, C, T, l2, pos, tol, max_iter, dev)

    crit = Criterion.resolve("auto", has_groups=True)                # the groups in use
    sel = select_and_refit(len(c_grid), lambda idx, which: fit_folds([idx], which)[0], predict, y,
                           criterion=crit, score_strata=groups, scheme=KFold(2, clusters=clusters), seed=gen,
                           refit=False, fit_folds=fit_folds)
    # one strength, or too few rows for two folds: one fit on all rows. More than two classes: the
    # head is refitted on all rows too, along the path up to the chosen strength -- a half holds a
    # few rows of each class when there are many (1,000 classes, ~8 rows each: the average of the
    # two half heads was 1.4 worst-group points below scikit-learn's fit on all rows at the same
    # strength, the refit 0.3)
    refit = sel.worst is None or C > 2
    if refit:
        sel.fold_fits = []               # scored already: their (classes x strengths x features) go first
    j = pos[sel.best]
    chosen = c_grid[sel.best]
    softmax_info = None
    if C > 2:
        # the head itself: ONE multinomial (softmax) fit on all rows at the chosen strength -- the
        # model a many-class head is (the one-vs-rest fits only score the strengths: at 1,000 classes
        # their refit on all rows was 0.3 worst-group points below scikit-learn's multinomial fit)
        del fit_folds, predict, head     # and with them the path's copy of the rows
        W, b, softmax_info = _softmax_head(X, y, groups, keep, active, cfg, C, 1.0 / chosen, dev)
        # one strength (or too few rows for two folds): no path was fitted, the head is the only fit
        if not infos:
            solver, why = "lbfgs", "one strength: only the multinomial head was fitted"
        info = infos[-1] if infos else {"form": "softmax", "n_iter": [softmax_info["n_iter"]],
                                        "converged": [softmax_info["converged"]], "n_factor": [0]}
    else:
        fits = fit_folds([torch.arange(N)], None, upto=pos[sel.best]) if refit else sel.fold_fits
        W, b = head(fits, j)
        info = infos[-1]
    diag = {
        **_diag(method_name, "fast", chosen, sel, gdiag, c_grid),
        "tune_score": "accuracy",
        "head_from": ("one multinomial fit on all rows" if C > 2 else
                      "one fit on all rows" if refit else "average of the two fold heads"),
        "rows_fitted": int(N),
        "rows_given": int(n_rows),
        "fold_sizes": [int(f.numel()) for f in sel.folds] if sel.folds else [int(N)],
        "active_features": int(active.numel()),
        "solver": solver,
        "solver_rule": why,
        "solver_form": info["form"],
        "solver_iters": int(sum(info["n_iter"])),
        "solver_converged": bool(all(info["converged"])),
    }
    if solver == "newton":
        diag["solver_factorizations"] = int(sum(info["n_factor"]))
    if softmax_info is not None:
        diag.update({"head_iters": int(softmax_info["n_iter"]), "head_converged": bool(softmax_info["converged"])})
    return RepairOutput(W=W.detach().float().cpu().contiguous(), b=b.detach().float().cpu().contiguous(),
                        diagnostics=diag)


#: the multinomial head's stopping rule: the largest gradient entry of the mean objective (the rule
#: of the bagged and paper protocols' solver, at their tolerance; ``tol`` is the path's, a Newton
#: decrement). The passes run in float32: far tighter is round-off. At 1,000 classes (the scale
#: benchmark) 1e-4 took 12 iterations; 1e-6 took 51 and moved the test worst-group accuracy by 0.03
SOFTMAX_TOL = _DEFAULTS["bagged"]["tol"]
SOFTMAX_MAX_ITER = 1000


def _softmax_head(X, y, groups, keep, active, cfg, C, l2, dev):
    """The many-class head: one group-balanced (expected weights, as the path) multinomial L2
    logistic regression on all fitted rows at penalty ``l2`` by L-BFGS
    (:func:`repair.solver.lbfgs.fit_softmax_l2_lbfgs`), the standardisation folded into the
    parameters (never formed; constant features get ``scale = shift = 0``). Memory beyond the
    embeddings: the kept rows' copy when the group cap thinned them, and (rows x classes) logits.
    Stops at :data:`SOFTMAX_TOL` (or the configuration's ``tol`` when tighter) / :data:`SOFTMAX_MAX_ITER`
    (or ten L-BFGS iterations per ``max_iter`` step when set). Returns ``(W (C, D), b (C,), info)`` acting on raw rows."""
    D = X.shape[1]
    if cfg.standardize:
        scale, shift = S.standardization(X)          # statistics over all rows given (before any thinning)
    else:
        scale, shift = torch.ones(D, dtype=X.dtype, device=dev), torch.zeros(D, dtype=X.dtype, device=dev)
    on = torch.zeros(D, dtype=torch.bool, device=dev)
    on[active] = True
    scale, shift = torch.where(on, scale, 0.0), torch.where(on, shift, 0.0)
    Xr = X if keep is None else X.index_select(0, keep.to(dev))
    w = S.expected_balanced_weights(groups, int(cfg.min_subsample_per_group))
    # the user's, when set, as the L-BFGS path takes them: max_iter counts Newton steps (L-BFGS gets ten
    # per step), and tol only tightens the head's own (the path's tol is another rule: spelling out the
    # fast protocol's default 1e-3 must not loosen the head)
    tol = SOFTMAX_TOL if cfg.tol is None else min(SOFTMAX_TOL, float(cfg.tol))
    max_iter = SOFTMAX_MAX_ITER if cfg.max_iter is None else S.lbfgs.ITERS_PER_NEWTON_STEP * int(cfg.max_iter)
    Wi, bi, info = S.lbfgs.fit_softmax_l2_lbfgs(Xr, y.to(dev), w.to(dev), C, l2, scale=scale, shift=shift,
                                                tol=tol, max_iter=max_iter)
    W, b = S.fold_affine(Wi, bi, scale.double(), shift.double())
    return W, b, info


def _newton_fits(X, y, groups, keep, active, cfg, C, T, l2, pos, tol, max_iter, dev):
    """Damped Newton (small problems): the standardised active features are copied once and
    every fold's rows are gathered per problem (:func:`repair.solver.fit_binary_l2_path`)."""
    D = X.shape[1]
    Xa = X if active.numel() == D else X.index_select(1, active)
    if cfg.standardize:
        scale, shift = S.standardization(Xa)       # statistics over all rows given (before any thinning)
    if keep is not None:
        Xa = Xa.index_select(0, keep.to(dev))
    if cfg.standardize:
        Z = Xa * scale + shift
    else:
        Z = Xa
        scale, shift = (torch.ones(active.numel(), dtype=X.dtype, device=dev),
                        torch.zeros(active.numel(), dtype=X.dtype, device=dev))
    Da = Z.shape[1]
    L = len(l2)
    infos = []

    def fit_folds(trains, which, upto=None):
        """Every fold's training set and the whole C path in ONE batched Newton call (``upto``,
        where the path may stop, is not used: on problems of Newton's size the path is cheap)."""
        Zf, tf, wf, _ = _fold_problems(Z, y, groups, trains, C, int(cfg.min_subsample_per_group))
        V, c, info = S.fit_binary_l2_path(Zf, tf.to(dev), wf.to(dev), l2, tol=tol, max_iter=max_iter,
                                          num_threads=None)
        infos.append(info)
        V = V.to(torch.float32).view(len(trains), T, L, Da)
        c = c.to(torch.float32).view(len(trains), T, L)
        return [(V[k], c[k]) for k in range(len(trains))]

    def predict(f, idx):
        V, c = f                                                      # (T,L,Da), (T,L)
        u = (V.reshape(T * L, Da) @ Z[idx.to(dev)].T).reshape(T, L, -1) + c.unsqueeze(-1)
        pred = (u[0] > 0).long() if C == 2 else u.argmax(0)           # (L, n) in path order
        return pred[pos].cpu()                                        # c_grid order

    def head(fits, j):
        Vs = torch.stack([f[0][:, j] for f in fits]).mean(0)
        cs = torch.stack([f[1][:, j] for f in fits]).mean(0)
        Wi, bi = _head_from_binary(Vs, cs, C)
        Wa, b = S.fold_affine(Wi, bi, scale, shift)
        return torch.zeros(Wa.shape[0], D, dtype=Wa.dtype, device=dev).index_copy_(1, active, Wa), b

    return fit_folds, predict, head, infos


#: rows per chunk when predicting on the embeddings in place (bounds the temporaries)
_PREDICT_CHUNK = 4096


def _lbfgs_fits(X, y, groups, keep, active, cfg, C, T, l2, pos, tol, max_iter, dev):
    """L-BFGS (large problems, :func:`repair.solver.fit_binary_l2_path_lbfgs`): the
    standardisation is folded into the parameters (``x~ = x * scale + shift`` is never formed,
    constant features get ``scale = shift = 0``) and every fold is one contiguous block of ONE
    copy of the fitted rows, all its tasks sharing each pass over them. Memory beyond the
    embeddings: that copy (at most the embeddings' size, usually less after the group cap) and
    the per-block logits."""
    N_all, D = X.shape
    if cfg.standardize:
        scale, shift = S.standardization(X)          # statistics over all rows given, in chunks
    else:
        scale, shift = torch.ones(D, dtype=X.dtype, device=dev), torch.zeros(D, dtype=X.dtype, device=dev)
    if active.numel() != D:
        on = torch.zeros(D, dtype=torch.bool, device=dev)
        on[active] = True
        scale, shift = torch.where(on, scale, 0.0), torch.where(on, shift, 0.0)
    rows_of = keep.to(dev) if keep is not None else None             # kept row -> row of X
    L = len(l2)
    infos = []

    held = {}                                                        # the last copy, to predict from

    def fit_folds(trains, which, upto=None):
        """The path (up to path index ``upto``, default all of it) on every fold's rows."""
        path = l2 if upto is None else l2[:int(upto) + 1]
        rows = torch.cat(trains).to(dev)
        Xc = X.index_select(0, rows if rows_of is None else rows_of[rows])
        held.clear()
        held.update({"Xc": Xc, "rows": rows.cpu()})
        bounds = torch.tensor([0] + [int(tr.numel()) for tr in trains]).cumsum(0).tolist()
        blocks = list(zip(bounds[:-1], bounds[1:]))
        yr = y[rows.cpu()]
        w = torch.cat([S.expected_balanced_weights(groups[tr], int(cfg.min_subsample_per_group)) for tr in trains])
        t = (yr == 1).view(-1, 1) if C == 2 else torch.nn.functional.one_hot(yr, C).bool()
        V, c, info = S.fit_binary_l2_path_lbfgs(Xc, blocks, t.to(dev, torch.float32), w.to(dev), path,
                                                scale=scale, shift=shift, tol=tol,
                                                max_iter=S.lbfgs.ITERS_PER_NEWTON_STEP * max_iter)
        infos.append(info)
        return [(V[k], c[k].to(torch.float32)) for k in range(len(trains))]

    def effective(V, c):
        """(P*Lg, D) weights and (P*Lg,) biases acting on raw rows, for fits V (P, Lg, D), c (P, Lg)."""
        Vf = V.reshape(-1, D)
        return Vf * scale, c.reshape(-1) + Vf @ shift

    def rows_for(idx, lo, hi):
        """Rows ``idx[lo:hi]``: a view of the fitted copy when they are a contiguous stretch of it
        (a held-out fold is the other fold's training block), else gathered from X."""
        rows = held.get("rows")
        if rows is not None and idx.numel():
            hit = torch.nonzero(rows == idx[0]).flatten()
            if hit.numel() == 1:
                start = int(hit[0])
                if start + idx.numel() <= rows.numel() and torch.equal(rows[start:start + idx.numel()], idx.cpu()):
                    return held["Xc"][start + lo:start + hi]
        r = idx[lo:hi].to(dev)
        return X.index_select(0, r if rows_of is None else rows_of[r])

    def predict(f, idx):
        V, c = f                                                     # (T, L, D), (T, L) standardised space
        out = []
        # a few path points at a time: their raw-row weights within ~16 MiB (1,000 classes x 2,048
        # features: one point, 8 MiB), and the logits of a row chunk within ~32 MiB
        per = max(1, min(L, int(2 ** 24 // max(1, 4 * T * D))))
        for j0 in range(0, L, per):
            Lg = min(L, j0 + per) - j0
            We, be = effective(V[:, j0:j0 + Lg], c[:, j0:j0 + Lg])
            step = max(64, min(_PREDICT_CHUNK, int(2 ** 23 // max(1, T * Lg))))
            preds = []
            for lo in range(0, idx.numel(), step):
                xr = rows_for(idx, lo, min(idx.numel(), lo + step))
                u = torch.addmm(be.unsqueeze(0), xr, We.T).view(-1, T, Lg)     # (rows, T, Lg), no copy
                preds.append(((u[:, 0] > 0).long() if C == 2 else u.argmax(1)).T)
                del u
            out.append(torch.cat(preds, 1))
            del We, be
        return torch.cat(out, 0)[pos].cpu()                          # c_grid order

    def head(fits, j):
        held.clear()                                                 # the copy is no longer needed
        Vs = torch.stack([f[0][:, j] for f in fits]).mean(0)
        cs = torch.stack([f[1][:, j] for f in fits]).mean(0)
        Wi, bi = _head_from_binary(Vs, cs, C)
        return S.fold_affine(Wi, bi, scale, shift)

    return fit_folds, predict, head, infos


def _freeze(cfg: DFRConfig, diag: dict) -> DFRConfig:
    """Refit with the strength (and, for ``auto``, the protocol) the inner selection chose."""
    return dataclasses.replace(cfg, c_grid=(diag["chosen"]["C"],), protocol=diag["protocol"])

@register_method("dfr", summary="Deep Feature Reweighting: group-balanced logistic head, C chosen by "
                                "worst-group accuracy on held-out data (protocol auto: fast L2 reweighting, or "
                                "bagged group-balanced refits on skewed groups; protocol=paper for the paper's L1 one)",
                 config=DFRConfig, groups="optional", freeze=_freeze, transform=AFFINE)
def dfr(inputs: RepairInputs, config: DFRConfig) -> RepairOutput:
    if config.protocol != "auto":
        out = (run_fast_protocol(inputs, config, "dfr") if config.protocol == "fast"
               else run_balanced_protocol(inputs, config, None, "dfr"))
        return out
    groups, _ = resolve_groups(inputs, config.group_source)
    imb = group_imbalance(groups, inputs.y)
    counts = torch.bincount(groups)
    rows = int((counts > 0).sum()) * max(int(counts[counts > 0].min()), int(config.min_subsample_per_group))
    D = int(inputs.X.shape[1])
    per_class = rows / max(1, int(inputs.num_classes))
    chosen = "bagged" if (imb >= IMBALANCE_THRESHOLD and rows <= BAG_ROWS_PER_FEATURE * D
                          and per_class >= BAG_MIN_ROWS_PER_CLASS) else "fast"
    cfg = dataclasses.replace(config, protocol=chosen)
    out = (run_fast_protocol(inputs, cfg, "dfr") if chosen == "fast" else run_balanced_protocol(inputs, cfg, None, "dfr"))
    out.diagnostics.update({"protocol_rule": f"auto: group imbalance {imb:.2f} (bagged from {IMBALANCE_THRESHOLD}), "
                                             f"balanced subsample of {rows} rows for {D} features (bagged up to "
                                             f"{BAG_ROWS_PER_FEATURE}x), {per_class:.1f} rows per class (bagged "
                                             f"from {BAG_MIN_ROWS_PER_CLASS})"})
    return out
