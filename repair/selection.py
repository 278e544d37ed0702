"""Selection, in one place: the criterion, the seeded stratified splitter, and
"select on held-out data, then refit".

Every repair method that chooses among settings (a penalty, a mask threshold, a
reweighting temperature) and ``repair fix``'s comparison of recipe candidates go
through :func:`select_and_refit`, so they split, score and pick the same way.

Criterion (:class:`Criterion`)
------------------------------
A candidate is scored by the accuracy of its *worst* stratum on data it was not
fitted on (ties: higher mean accuracy, then the earlier candidate):

- ``worst_group``: strata = the groups in use: the user's group labels (class x
  attribute) or, for a method that balances groups it inferred itself (``dfr``,
  ``mix`` without labels), those inferred groups;
- ``worst_class``: strata = classes;
- ``worst_inferred_group``: strata = class x (correctly / incorrectly classified by
  the original model) (:func:`inferred_groups`).

``auto`` -- the default everywhere -- is defined here and only here: ``worst_group``
when groups are in use; without group labels it depends on the repair set
(:func:`label_free_criterion`): when the original model's errors are rare within
the classes -- the inferred groups (class x correct/incorrect) are very unequal,
as on a repair set skewed like deployment data -- ``worst_inferred_group``, else
``worst_class``. Measured on the benchmark's balanced and skewed repair sets
(``bench/analysis.md``): worst-class accuracy is blind to a skewed minority inside a
class (on the skewed SST-2 set it chose heads at ERM level), while the worst
inferred group, good there, over-rewards heads that flip the original model's hard
errors on balanced sets (LaBonte et al. 2023 found worst-class accuracy a good
label-free proxy on balanced ones).

A stratum's held-out rows are scored by their accuracy; a caller may ask for the mean
probability the candidate gives their true class instead (``score="probability"``,
:func:`probability_scores`): the same criterion, measured without the whole-row steps of a
small stratum (the bagged DFR protocol's choice of strength uses it).

Splits
------
:func:`stratified_split` is the one splitter: seeded, every stratum spread over the
parts in proportion, every stratum keeping at least one sample in the first
(fit) part. Everywhere, a ``*_fraction`` setting is the share HELD OUT of fitting
(``holdout_fraction``: scored on; ``report_fraction``: reported on). Given ``clusters=``
(:meth:`repair.data.RepairData.duplicate_ids`; also a field of :class:`Holdout` and
:class:`KFold`), identical samples always fall on one side of every split, so a held-out
figure is never inflated by copies of what was fitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

Tensor = torch.Tensor

CRITERIA = ("worst_group", "worst_class", "worst_inferred_group")
SELECTION_NAMES = ("auto",) + CRITERIA
LABEL_FREE_DEFAULT = "worst_class"
#: mean within-class ratio largest / smallest group above which groups count as "very unequal"
IMBALANCE_THRESHOLD = 4.5

DESCRIPTIONS = {
    "worst_group": "worst-group accuracy",
    "worst_class": "worst-class accuracy",
    "worst_inferred_group": "worst inferred-group accuracy (groups = class x correctly/incorrectly "
                            "classified by the original model)",
}


# ----------------------------------------------------------------------------- scoring helpers
def needs_group_labels(selection: str) -> bool:
    """Whether the selection criterion ``selection`` (a recipe's or a method's ``selection``) is
    measured on the group labels, so that it cannot run without them."""
    return selection == "worst_group"


def _as_preds(logits_or_preds: Tensor) -> Tensor:
    if logits_or_preds.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool):
        return logits_or_preds.long()
    return logits_or_preds.argmax(-1)


def inferred_groups(logits_or_preds: Tensor, y: Tensor) -> Tensor:
    """Pseudo-groups without group labels: ``2*y + (pred != y)``, i.e. class x
    (correctly / incorrectly classified) under a reference model."""
    pred = _as_preds(logits_or_preds)
    return y.long() * 2 + (pred != y).long()


def inferred_group_names(class_names: Sequence[str]) -> list[str]:
    """Names of :func:`inferred_groups` ids: ``2*c`` correct, ``2*c+1`` misclassified."""
    return [f"{c}|{'misclassified' if w else 'correct'}" for c in class_names for w in (0, 1)]


def group_accuracies(logits_or_preds: Tensor, y: Tensor, groups: Tensor,
                     num_groups: Optional[int] = None) -> Tensor:
    """Per-group accuracy of (N,C) logits / (N,) predictions, or a batch (K,N,C) / (K,N):
    (G,) or (K,G); groups without samples are NaN."""
    pred = _as_preds(logits_or_preds)
    groups = groups.to(pred.device).long()
    y = y.to(pred.device)
    G = int(num_groups) if num_groups is not None else (int(groups.max()) + 1 if groups.numel() else 0)
    squeeze = pred.dim() == 1
    if squeeze:
        pred = pred.unsqueeze(0)
    correct = (pred == y.unsqueeze(0)).float()
    counts = torch.zeros(G, dtype=torch.float32, device=pred.device).index_add_(
        0, groups, torch.ones_like(groups, dtype=torch.float32))
    hits = torch.zeros(pred.shape[0], G, dtype=torch.float32, device=pred.device).index_add_(1, groups, correct)
    acc = hits / counts.unsqueeze(0)
    acc[:, counts == 0] = float("nan")
    return acc[0] if squeeze else acc


def worst_group_accuracy(logits_or_preds: Tensor, y: Tensor, groups: Tensor,
                         num_groups: Optional[int] = None):
    """Minimum accuracy over the non-empty groups: a float for one model, (K,) for a batch."""
    acc = group_accuracies(logits_or_preds, y, groups, num_groups)
    worst = torch.nan_to_num(acc, nan=float("inf")).min(-1).values
    return float(worst) if worst.dim() == 0 else worst


def scores_from_preds(pred: Tensor, y: Tensor, strata: Tensor) -> tuple[Tensor, Tensor]:
    """``(worst-stratum accuracy (K,), mean accuracy (K,))`` of (K,N) predictions, CPU float64."""
    pred = _as_preds(pred)
    if pred.dim() == 1:
        pred = pred.unsqueeze(0)
    y = y.to(pred.device)
    worst = worst_group_accuracy(pred, y, strata.to(pred.device))
    mean = (pred == y.unsqueeze(0)).double().mean(1)
    return worst.double().cpu(), mean.cpu()


#: how :func:`select_and_refit` scores a stratum's held-out rows: by their accuracy, or by the mean
#: probability the candidate gives their true class (:func:`probability_scores`)
SCORES = ("accuracy", "probability")


def _true_class_probability(logits: Tensor, y: Tensor) -> Tensor:
    """(K,N,C) or (N,C) logits -> (K,N) softmax probability of each row's class ``y``, CPU float64."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    y = y.to(logits.device).long()
    logp = logits.float().log_softmax(-1)          # one (K,N,C) float32 copy, the logits' own size
    return logp.gather(2, y.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(2).double().exp().cpu()


def _worst_stratum_mean(values: Tensor, strata: Tensor) -> Tensor:
    """(K,N) per-row values -> (K,) the smallest per-stratum mean over the strata present."""
    strata = strata.cpu().long()
    G = int(strata.max()) + 1 if strata.numel() else 0
    n = torch.zeros(G, dtype=torch.float64).index_add_(0, strata, torch.ones(strata.numel(), dtype=torch.float64))
    sums = torch.zeros(values.shape[0], G, dtype=torch.float64).index_add_(1, strata, values)
    means = sums / n.clamp_min(1)
    means[:, n == 0] = float("inf")
    return means.min(1).values


def probability_scores(logits: Tensor, y: Tensor, strata: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`scores_from_preds` with each stratum scored by the mean softmax probability that
    (K,N,C) ``logits`` give its rows' true class -- the accuracy the stratum would have in
    expectation if the candidate's predictions were drawn from its probabilities -- instead of the
    share it gets right. ``(worst (K,), mean accuracy (K,))`` CPU float64 (the accuracy, not the
    probability, is the tie-break and what is reported).

    Why: a held-out stratum of a few dozen rows moves its accuracy by whole rows, and its
    minimum over strata jumps from one penalty strength to the next by 10-20 points where the
    test curve is smooth (the bagged DFR protocol's tuning on the skewed capped text task); the
    probabilities move continuously with the strength. Measured for the bagged protocol
    (``python -m bench.tune_score``, 10 seeds, 24 method x repair set x group settings,
    ``bench/analysis.md``): test worst-group +0.7 points on average (16 higher, 7 lower, at most
    1.0 lower; up to +4.2 on the skewed capped text set), with a smaller spread over seeds on most."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    worst = _worst_stratum_mean(_true_class_probability(logits, y), strata)
    mean = (logits.argmax(-1).cpu() == y.cpu().long().unsqueeze(0)).double().mean(1)
    return worst, mean


#: pseudo-samples that pull a stratum's held-out accuracy toward its classes' (:func:`shrunk_scores`)
SHRINK_SAMPLES = 8


def _shrunk_strata(pred: Tensor, y: Tensor, strata: Tensor, prior: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per stratum of (K,N) predictions: ``(shrunk score (K,G), samples (G,), hits (K,G), correct
    (K,N))``; absent strata score ``inf`` (see :func:`shrunk_scores`)."""
    y = y.to(pred.device).long()
    strata = strata.to(pred.device).long()
    correct = (pred == y.unsqueeze(0)).double()                               # (K, N)
    C, G = int(y.max()) + 1, int(strata.max()) + 1
    n_c = torch.zeros(C, dtype=torch.float64, device=pred.device).index_add_(0, y, torch.ones_like(correct[0]))
    acc_c = torch.zeros(pred.shape[0], C, dtype=torch.float64, device=pred.device).index_add_(1, y, correct)
    acc_c = acc_c / n_c.clamp_min(1)
    n_s = torch.zeros(G, dtype=torch.float64, device=pred.device).index_add_(0, strata, torch.ones_like(correct[0]))
    hits = torch.zeros(pred.shape[0], G, dtype=torch.float64, device=pred.device).index_add_(1, strata, correct)
    a_s = torch.zeros_like(hits).index_add_(1, strata, acc_c[:, y]) / n_s.clamp_min(1)
    score = (hits + prior * a_s) / (n_s + prior)
    score[:, n_s == 0] = float("inf")
    return score, n_s, hits, correct


def shrunk_scores(pred: Tensor, y: Tensor, strata: Tensor, prior: float = SHRINK_SAMPLES) -> tuple[Tensor, Tensor]:
    """:func:`scores_from_preds` for one small held-out part: each stratum's accuracy is shrunk
    toward the accuracy of its members' classes by ``prior`` pseudo-samples,
    ``(hits_s + prior * a_s) / (n_s + prior)`` with ``a_s`` the mean over the stratum's members of
    their class's accuracy. A group of four held-out samples (the original model's few errors in a
    skewed repair set) otherwise scores 0, 25, 50, 75 or 100% and alone decides early stopping and
    settling; with the shrinkage it counts for a third of its own score. Strata that are the
    classes are unchanged (worst class). ``(worst (K,), mean (K,))`` CPU float64."""
    pred = _as_preds(pred)
    if pred.dim() == 1:
        pred = pred.unsqueeze(0)
    score, _, _, correct = _shrunk_strata(pred, y, strata, prior)
    return score.min(1).values.cpu(), correct.mean(1).cpu()


def head_logits(X: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """Logits of a head (C,D) -> (N,C), or of a stack of heads (K,C,D) -> (K,N,C)."""
    X = X.to(W.device, W.dtype)
    b = b.to(W.device, W.dtype)
    if W.dim() == 2:
        return X @ W.T + b
    return torch.matmul(X.unsqueeze(0), W.transpose(1, 2)) + b.unsqueeze(1)


def head_predictions(X: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """Predicted classes of a head (C,D) -> (N,), or a stack of heads (K,C,D) -> (K,N)."""
    return head_logits(X, W, b).argmax(-1)


def average_heads(W: Tensor, b: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """One head (C,D), (C,) averaging a stack of heads ``W`` (K,C,D), ``b`` (K,C), each first scaled
    to unit spread of its class-centred logits on embeddings ``X`` so that no head dominates by its
    scale (a weakly penalised head has larger weights). Heads are linear: the average of their scaled
    logits is this one head's logits. The one home of the rule (``choosing.ensemble`` averages the
    best heads of a recipe with it; a refitted head averaged over the strength grid, ``settle_strength:
    average``)."""
    Ws, bs = [], []
    for Wk, bk in zip(W, b):
        lg = X @ Wk.T + bk
        s = (lg - lg.mean(1, keepdim=True)).std().clamp_min(1e-8)
        Ws.append(Wk / s)
        bs.append(bk / s)
    return torch.stack(Ws).mean(0), torch.stack(bs).mean(0)


def pick_best(worst: Tensor, mean: Tensor, tie: float = 1e-9) -> int:
    """Index of the best candidate: max worst-stratum accuracy, then max mean accuracy,
    then the first."""
    best = float(worst.max())
    cand = [i for i in range(worst.numel()) if float(worst[i]) >= best - tie]
    return max(cand, key=lambda i: (float(mean[i]), -i))


# ----------------------------------------------------------------------------- leaving the simpler choice
#: a changed model replaces the simpler one it is compared with (a head, the original body) only when
#: its held-out criterion is at least this much higher (a fraction): a smaller edge is one or two
#: samples of the worst group, noise, and a model repair costs a training run and changes the whole
#: network (measured: on the demo a 0.3-point edge chose mixft, which then scored 5.7 points below the
#: head on the test split)
MIN_GAIN = 0.01

#: standard errors of the simpler choice's worst-stratum accuracy the changed model must gain
#: (:func:`required_gain`)
REQUIRED_Z = 2.0


def score_standard_error(pred: Tensor, y: Tensor, strata: Tensor, prior: float = 0.0) -> float:
    """One standard error of the score of predictions ``pred`` (n,) on their worst stratum (see
    :func:`required_gain`, which asks for :data:`REQUIRED_Z` of them): with ``prior`` > 0 of the
    shrunk score (:func:`shrunk_scores`), the accuracy's times ``n / (n + prior)``; the accuracy's
    at the Agresti-Coull estimate ``(hits + 2) / (n + 4)`` over ``n + 4`` samples; of strata tied
    for worst, the least certain one."""
    pred = _as_preds(pred)
    if pred.dim() == 1:
        pred = pred.unsqueeze(0)
    score, n_s, hits, _ = _shrunk_strata(pred, y, strata, float(prior))
    p = (hits[0] + 2.0) / (n_s + 4.0)
    se = (p * (1.0 - p) / (n_s + 4.0)).sqrt() * n_s / (n_s + float(prior))
    worst = score[0] <= score[0].min() + 1e-12             # tied worst strata: the least certain one
    return float(se[worst].max())


def required_gain(pred: Tensor, y: Tensor, strata: Tensor, prior: float = 0.0) -> float:
    """The held-out edge a changed model needs over the simpler choice whose predictions are
    ``pred`` (a head's out-of-fold predictions in ``auto-ft``; the original body with a refitted
    head when a model repair settles): :data:`REQUIRED_Z` standard errors of that choice's score
    on its worst stratum, and at least :data:`MIN_GAIN`. The one rule for "is the change worth it"
    (:mod:`repair.choosing`, :func:`repair.modelrepair.finetune.settle`).

    The stratum is the one the comparison scores: the worst by accuracy, or with ``prior`` > 0 by
    the shrunk score the caller compares (:func:`shrunk_scores`), whose standard error is the
    accuracy's times ``n / (n + prior)``. The accuracy's standard error is taken at the
    Agresti-Coull estimate ``(hits + 2) / (n + 4)`` over ``n + 4`` samples, so that a stratum
    the choice gets all right or all wrong (a handful of samples) does not count as certain; of
    strata tied for worst, the least certain one.

    Why two standard errors: a worst group of 15 samples (the original model's few errors in a
    skewed repair set) moves by 6.7 points per sample; measured on the demo, a 13-point out-of-fold
    edge there (one standard error) chose mixft, 4.5 points below the head on test; on the balanced
    demo a 1.6-point edge (0.7 standard errors) chose it, 2.4 points below."""
    return max(MIN_GAIN, REQUIRED_Z * score_standard_error(pred, y, strata, prior))


# ----------------------------------------------------------------------------- criterion
@dataclass(frozen=True)
class Criterion:
    """How held-out predictions are scored (see the module docstring)."""
    name: str
    reason: str = field(default="", compare=False)     # why ``auto`` chose it, when it did

    def __post_init__(self):
        if self.name not in CRITERIA:
            raise ValueError(f"unknown selection criterion {self.name!r}; one of {', '.join(SELECTION_NAMES)}")

    @classmethod
    def resolve(cls, selection: str = "auto", *, has_groups: bool, y: Optional[Tensor] = None,
                ref_logits: Optional[Tensor] = None) -> "Criterion":
        """``auto`` -> ``worst_group`` when groups are in use, else :func:`label_free_criterion`
        of ``y`` and the original model's ``ref_logits`` (:data:`LABEL_FREE_DEFAULT` when they are
        not given). ``worst_group`` without groups is :class:`repair.errors.BadInput`."""
        if selection == "auto":
            if has_groups:
                return cls("worst_group")
            if y is not None and ref_logits is not None:
                return label_free_criterion(y, ref_logits)
            return cls(LABEL_FREE_DEFAULT)
        crit = cls(selection)
        if needs_group_labels(crit.name) and not has_groups:
            from .errors import BadInput       # the user's choice of criterion (a recipe, a setting): exit 2

            raise BadInput("the selection criterion worst_group needs group labels (give --group-by)")
        return crit

    def strata(self, y: Tensor, ref_logits: Optional[Tensor] = None,
               groups: Optional[Tensor] = None) -> Tensor:
        """The ids whose worst accuracy is the score. ``ref_logits``: the original model's
        logits (for inferred groups)."""
        if self.name == "worst_group":
            if groups is None:
                raise ValueError("the selection criterion worst_group needs group labels")
            return groups.long()
        if self.name == "worst_class":
            return y.long()
        if ref_logits is None:
            raise ValueError("worst_inferred_group needs the original model's logits")
        return inferred_groups(ref_logits, y)

    def describe(self, groups_source: str = "given", has_groups: bool = False) -> str:
        """In words, for the report. ``has_groups``: group labels were given (a criterion that does not
        use them was then the recipe's choice, not the want of labels)."""
        if self.name == "worst_group":
            return ("worst-group accuracy (given group labels)" if groups_source == "given"
                    else "worst-group accuracy over the inferred groups")
        why = "group labels given, not used to select" if has_groups else "no group labels"
        return DESCRIPTIONS[self.name] + f" ({why}" + (f"; {self.reason}" if self.reason else "") + ")"


def group_imbalance(groups: Tensor, y: Tensor) -> float:
    """Mean over classes of (largest / smallest) group size within the class (1 = equal groups;
    classes with one group count 1)."""
    groups, y = groups.long().cpu(), y.long().cpu()
    ratios = []
    for c in torch.unique(y).tolist():
        counts = torch.bincount(groups[y == c])
        counts = counts[counts > 0].double()
        ratios.append(float(counts.max() / counts.min()) if counts.numel() > 1 else 1.0)
    return sum(ratios) / len(ratios) if ratios else 1.0


def label_free_criterion(y: Tensor, ref_logits: Tensor) -> "Criterion":
    """The label-free criterion for a repair set: ``worst_inferred_group`` when the inferred
    groups are very unequal (:func:`group_imbalance` >= :data:`IMBALANCE_THRESHOLD`: the original
    model is rarely wrong inside a class, so its errors are where a hidden minority shows),
    else ``worst_class``."""
    imb = group_imbalance(inferred_groups(ref_logits, y), y)
    if imb >= IMBALANCE_THRESHOLD:
        return Criterion("worst_inferred_group", f"the original model's errors are rare within the classes "
                                                 f"(inferred-group imbalance {imb:.1f} >= {IMBALANCE_THRESHOLD})")
    return Criterion("worst_class", f"inferred-group imbalance {imb:.1f} < {IMBALANCE_THRESHOLD}")


# ----------------------------------------------------------------------------- splitting
def _generator(seed_or_gen: Union[int, torch.Generator]) -> torch.Generator:
    if isinstance(seed_or_gen, torch.Generator):
        return seed_or_gen
    return torch.Generator().manual_seed(int(seed_or_gen))


def _units(strata: Tensor, clusters: Optional[Tensor]) -> dict[int, list[Tensor]]:
    """Per stratum, its units in ascending order of first index: single samples, or with
    ``clusters`` the sets of samples sharing a cluster id (a cluster belongs to the stratum of its
    first sample)."""
    out: dict[int, list[Tensor]] = {}
    if clusters is None:
        for s in torch.unique(strata).tolist():
            out[s] = list(torch.nonzero(strata == s).flatten().split(1))
        return out
    clusters = clusters.long().cpu().reshape(-1)
    if clusters.numel() != strata.numel():
        raise ValueError(f"clusters has {clusters.numel()} entries, the data {strata.numel()}")
    _, inverse = torch.unique(clusters, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    members = order.split(torch.bincount(inverse).tolist())        # per cluster, ascending indices
    members = sorted((m for m in members if m.numel()), key=lambda m: int(m[0]))
    for m in members:
        out.setdefault(int(strata[m[0]]), []).append(m)
    return dict(sorted(out.items()))


def stratified_split(strata: Tensor, fractions: Union[float, Sequence[float]],
                     seed: Union[int, torch.Generator], min_per_part: int = 1,
                     clusters: Optional[Tensor] = None) -> list[Tensor]:
    """Split indices ``0..N-1`` into ``[rest, part_1, ..., part_k]`` where part ``j`` holds
    about ``fractions[j]`` of every stratum (rounded half up). A stratum keeps at least one
    sample in ``rest``; a held-out part gets at least ``min_per_part`` of a stratum when the
    stratum has enough samples for every part. Seeded (an int or a CPU generator);
    sorted int64 CPU index tensors.

    ``clusters`` (N,): ids of samples that must stay together (identical samples,
    :meth:`repair.data.RepairData.duplicate_ids`): every cluster falls whole into one part, so
    no copy of a sample is on both sides of the split. A cluster counts in the stratum of its
    first sample; within a stratum, clusters are shuffled and each part takes the next ones
    whose sizes keep it closest to its share (a cluster too big for the share left goes to a
    later part or the rest). All-singleton clusters give exactly the split without ``clusters``."""
    fr = [float(fractions)] if isinstance(fractions, (int, float)) else [float(f) for f in fractions]
    if any(f < 0 for f in fr) or sum(fr) > 1.0 + 1e-9:
        raise ValueError(f"split fractions must be >= 0 and sum to at most 1, got {fr}")
    gen = _generator(seed)
    strata = strata.long().cpu()
    parts: list[list[Tensor]] = [[] for _ in range(len(fr) + 1)]
    if clusters is None:
        return _singleton_split(strata, fr, gen, min_per_part, parts)
    for units in _units(strata, clusters).values():
        units = [units[i] for i in torch.randperm(len(units), generator=gen).tolist()]
        n = sum(u.numel() for u in units)
        start = 0
        for j, f in enumerate(fr):
            take = _share(f, n, start, len(fr), min_per_part)
            got, left = 0, []
            for k, u in enumerate(units):
                # a unit joins while the part stays nearer its share; one unit always stays for rest
                if 2 * got + u.numel() <= 2 * take and (len(left) + len(units) - k) > 1:
                    parts[j + 1].append(u)
                    got += u.numel()
                else:
                    left.append(u)
            units = left
            start += got
        parts[0].extend(units)
    empty = torch.zeros(0, dtype=torch.long)
    return [torch.sort(torch.cat(p)).values if p else empty for p in parts]


def _share(f: float, n: int, start: int, n_parts: int, min_per_part: int) -> int:
    """Samples a held-out part with fraction ``f`` takes from a stratum of ``n`` (``start`` already
    given to earlier parts): ``f * n`` rounded half up, at least ``min_per_part`` when the stratum
    has enough for every part, and always leaving one for the rest."""
    take = int(math.floor(f * n + 0.5))
    if n >= n_parts * min_per_part + 1 and f > 0:
        take = max(take, min_per_part)
    return min(take, max(n - start - 1, 0))


def _singleton_split(strata: Tensor, fr: list, gen: torch.Generator, min_per_part: int, parts: list) -> list:
    """:func:`stratified_split` without clusters, on index tensors (every unit one sample, so a
    part takes exactly the next ``take`` shuffled samples of a stratum): the same split, the same
    random numbers, without a tensor per sample (50,000 rows: 0.17 s -> a few ms)."""
    order = torch.argsort(strata, stable=True)
    _, counts = torch.unique_consecutive(strata[order], return_counts=True)
    for idx in order.split(counts.tolist()):                    # per stratum, ascending indices
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n = idx.numel()
        start = 0
        for j, f in enumerate(fr):
            take = _share(f, n, start, len(fr), min_per_part)
            parts[j + 1].append(idx[start:start + take])
            start += take
        parts[0].append(idx[start:])
    empty = torch.zeros(0, dtype=torch.long)
    return [torch.sort(torch.cat(p)).values if p else empty for p in parts]


# ----------------------------------------------------------------------------- select, refit
@dataclass(frozen=True)
class Holdout:
    """Fit on the rest, score on a held-out ``fraction`` (stratified). ``clusters``: ids of
    samples that must stay on one side (see :func:`stratified_split`)."""
    fraction: float = 0.5
    clusters: Optional[Tensor] = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        return f"held-out {round(100 * self.fraction)}%"


@dataclass(frozen=True)
class KFold:
    """K-fold cross-validation: every row scored by a fit that did not see it; the
    criterion is computed once over all out-of-fold predictions. With ``repeats`` > 1 the
    whole cross-validation is repeated on new random folds and the scores are averaged
    (their standard error is kept): a choice that does not flip with the folds."""
    folds: int = 2
    repeats: int = 1
    #: ids of samples that must share a fold (identical samples; see :func:`stratified_split`)
    clusters: Optional[Tensor] = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        rep = f", {self.repeats} repeats averaged" if self.repeats > 1 else ""
        return f"{self.folds}-fold cross-validation (out-of-fold predictions{rep})"


@dataclass(frozen=True)
class Given:
    """An explicit (fit, held-out) split made by the caller (when candidates are built
    from the fit part, e.g. NeuronTune's masks)."""
    fit: Tensor
    held: Tensor

    def describe(self) -> str:
        return "held-out part"


Scheme = Union[Holdout, KFold, Given]


@dataclass
class Selection:
    """What :func:`select_and_refit` found. ``worst``/``mean``: per candidate, on held-out
    predictions (None when there was nothing to choose). ``final``: the chosen candidate
    refitted on all rows (None without refit); ``fold_fits``: the fits made for scoring."""
    best: int
    criterion: Criterion
    scheme: Optional[Scheme]
    worst: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    n_fit: int = 0
    n_heldout: int = 0
    final: Any = None
    fold_fits: list = field(default_factory=list)
    folds: list = field(default_factory=list)
    worst_se: Optional[Tensor] = None       # standard error of ``worst`` over repeated folds
    #: candidates left out of the repeats after the first (``select_and_refit(contend=...)``): index ->
    #: why; their scores are their first repeat's, and they rank below every candidate kept
    dropped: dict = field(default_factory=dict)
    repeats_scored: Optional[list] = None   # per candidate: repeats its score averages

    def ranked(self) -> list[int]:
        """Candidate indices from best to worst (``pick_best``'s order: worst, then mean, then first;
        the candidates ``dropped`` after the first repeat last)."""
        if self.worst is None:
            return [self.best]
        return sorted(range(self.worst.numel()),
                      key=lambda i: (i in self.dropped, -float(self.worst[i]), -float(self.mean[i]), i))

    def candidates(self, labels: Sequence[Any]) -> list[dict]:
        """One row per candidate (the diagnostics vocabulary): ``candidate``,
        ``heldout_worst``, ``heldout_mean``."""
        if self.worst is None:
            return []
        return [{"candidate": lab, "heldout_worst": float(self.worst[i]), "heldout_mean": float(self.mean[i]),
                 **({"heldout_worst_se": float(self.worst_se[i])} if self.worst_se is not None else {})}
                for i, lab in enumerate(labels)]

    def describe(self) -> dict:
        return {"criterion": self.criterion.name,
                "scheme": None if self.scheme is None or self.worst is None else self.scheme.describe(),
                "n_fit": int(self.n_fit), "n_heldout": int(self.n_heldout)}


def kfold_parts(scheme: KFold, split_strata: Tensor, seed: Union[int, torch.Generator]) -> list[list[Tensor]]:
    """The held-out folds of every repeat of ``scheme`` (stratified by ``split_strata``), drawn in
    order from ``seed`` (a generator, or a seed for a new one): what :func:`select_and_refit` scores
    on. Stops at a repeat whose draw leaves fewer than two non-empty folds (too few rows)."""
    gen = _generator(seed)
    K = max(2, int(scheme.folds))
    out = []
    for _ in range(max(1, int(scheme.repeats))):
        parts = [p for p in stratified_split(split_strata, [1.0 / K] * (K - 1), gen, clusters=scheme.clusters)
                 if p.numel()]
        if len(parts) < 2:
            break
        out.append(parts)
    return out


FitFn = Callable[[Tensor, list], Any]
PredictFn = Callable[[Any, Tensor], Tensor]


def select_and_refit(n_candidates: int, fit: FitFn, predict: PredictFn, y: Tensor, *,
                     criterion: Criterion, score_strata: Tensor, split_strata: Optional[Tensor] = None,
                     scheme: Scheme = Holdout(0.5), seed: Union[int, torch.Generator] = 0,
                     refit: bool = True, fit_folds: Optional[Callable[[list, list], list]] = None,
                     score: str = "accuracy", contend: Optional[int] = None) -> Selection:
    """Choose among ``n_candidates`` on held-out data, then refit the chosen one on everything.

    ``fit(train_idx, which)``: fit candidates ``which`` (a list of indices) on rows
    ``train_idx``; returns anything ``predict`` understands. ``predict(fitted, idx)``:
    predictions (len(which), len(idx)) (classes, or logits) for rows ``idx``.
    ``score_strata`` (N,): the criterion's ids for every row; ``split_strata`` (N,):
    what the split is stratified by (default: ``score_strata``). With one candidate
    (or no held-out rows) nothing is scored and only the refit runs. ``fit_folds(train_sets,
    which) -> [fitted per training set]``: optional, fits the training sets of every fold of every
    repeat in one call (a batched solver, or fits run side by side); default: ``fit`` once per fold.
    ``score`` (:data:`SCORES`): "accuracy" (the default) scores each stratum by its accuracy;
    "probability" by the mean probability of the true class (:func:`probability_scores`;
    ``predict`` must then return logits).

    ``contend`` (repeated K-fold only): how many of the best candidates the caller takes (an
    ensemble of the best ``contend``). Every candidate is scored on the first repeat; one whose score
    there is below the ``contend``-th best's by more than the gain a change needs
    (:func:`required_gain` of that candidate's out-of-fold predictions: two standard errors of its
    worst stratum, at least :data:`MIN_GAIN`) is not refitted on the further repeats, which only
    firm up the order of close candidates: its score is its first repeat's, it ranks below every
    candidate kept, and ``Selection.dropped`` says why. None: every candidate on every repeat. Needs
    ``score="accuracy"`` (the gain rule is in accuracy points)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    soft = score == "probability"
    if soft and contend is not None:          # the gain rule is in accuracy points
        raise ValueError("contend needs score='accuracy'")
    N = int(y.shape[0])
    all_idx = torch.arange(N)
    split_strata = score_strata if split_strata is None else split_strata
    gen = _generator(seed)
    every = list(range(n_candidates))
    sel = Selection(best=0, criterion=criterion, scheme=scheme, n_fit=N)
    if n_candidates > 1:
        if isinstance(scheme, KFold):
            repeats = kfold_parts(scheme, split_strata, gen)
            trains = [[torch.sort(torch.cat([p for j, p in enumerate(parts) if j != k])).values
                       for k in range(len(parts))] for parts in repeats]

            def fit_all(sets, which):
                return (fit_folds(sets, which) if fit_folds is not None else [fit(t, which) for t in sets]) if sets else []

            def scored(fits, parts, which):
                # out-of-fold predictions of candidates ``which`` on one repeat: their (worst, mean), preds
                pred = torch.empty(len(which), N, dtype=torch.long)
                prob = torch.empty(len(which), N, dtype=torch.float64) if soft else None
                for f, held in zip(fits, parts):
                    out = predict(f, held)
                    pred[:, held] = _as_preds(out).cpu()
                    if soft:
                        prob[:, held] = _true_class_probability(out, y[held])
                w, m = scores_from_preds(pred, y, score_strata)
                if soft:
                    w = _worst_stratum_mean(prob, score_strata)
                return w, m, pred

            per = [[] for _ in every]            # per candidate: its (worst, mean) on every repeat it had

            def run_repeats(reps, tr, which):
                # every fold fit of repeats ``reps`` in one call (a batched or parallel fit_folds has them all
                # at once), then each repeat scored; returns the last repeat's predictions
                fits_flat, at, pred = fit_all([t for ts in tr for t in ts], which), 0, None
                for parts in reps:
                    fits = fits_flat[at:at + len(parts)]
                    at += len(parts)
                    if not sel.fold_fits:        # the first repeat's fits and folds are kept
                        sel.fold_fits, sel.folds = list(fits), parts
                    w, m, pred = scored(fits, parts, which)
                    for j, i in enumerate(which):
                        per[i].append((w[j], m[j]))
                return pred

            racing = contend is not None and len(repeats) > 1
            # racing: the first repeat for every candidate, then the further repeats of the candidates kept
            pred = run_repeats(repeats[:1] if racing else repeats, trains[:1] if racing else trains, every)
            if racing:
                w1, m1 = torch.stack([p[0][0] for p in per]), torch.stack([p[0][1] for p in per])
                k = min(max(1, int(contend)), n_candidates)
                kth = sorted(every, key=lambda i: (-float(w1[i]), -float(m1[i]), i))[k - 1]
                for i in every:
                    need = required_gain(pred[i], y, score_strata)
                    if float(w1[i]) + need < float(w1[kth]) - 1e-12:
                        sel.dropped[i] = (f"{100 * (float(w1[kth]) - float(w1[i])):.1f} points below the "
                                          f"{_ordinal(k)} best on the first repeat, more than "
                                          f"the {100 * need:.1f} it would need: not refitted on the further repeats")
                run_repeats(repeats[1:], trains[1:], [i for i in every if i not in sel.dropped])
            if any(per):
                # each candidate's mean (and standard error) over the repeats it was scored on
                W_ = [torch.stack([a for a, _ in p]) for p in per]
                sel.worst = torch.stack([v.mean(0) for v in W_])
                sel.mean = torch.stack([torch.stack([b for _, b in p]).mean(0) for p in per])
                sel.worst_se = torch.stack([v.std(0, unbiased=True) / len(v) ** 0.5 if len(v) > 1
                                            else torch.zeros_like(v[0]) for v in W_])
                sel.repeats_scored = [len(p) for p in per]
                sel.n_heldout = N
        else:
            if isinstance(scheme, Given):
                rest, held = scheme.fit, scheme.held
            else:
                rest, held = stratified_split(split_strata, [scheme.fraction], gen, clusters=scheme.clusters)
            if held.numel() and rest.numel():
                f = fit(rest, every)
                sel.fold_fits.append(f)
                out = predict(f, held)
                sel.worst, sel.mean = (probability_scores(out, y[held], score_strata[held]) if soft
                                       else scores_from_preds(_as_preds(out).cpu(), y[held], score_strata[held]))
                sel.n_fit, sel.n_heldout = int(rest.numel()), int(held.numel())
                sel.folds = [held]
        if sel.worst is not None:
            sel.best = sel.ranked()[0] if sel.dropped else pick_best(sel.worst, sel.mean)
    if refit:
        sel.final = fit(all_idx, [sel.best])
    return sel


def _ordinal(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


# ----------------------------------------------------------------------------- honesty checks
#: fewest samples of a stratum in the data a choice is made on (about 10 per held-out fold with 2 folds)
MIN_FOR_CHOICE = 20
#: fewest samples of a group in the data a reported figure is measured on
MIN_FOR_REPORT = 10


def support_warnings(strata: Tensor, names: Sequence[str], *, what: str, minimum: int,
                     among: Optional[Tensor] = None, clusters: Optional[Tensor] = None) -> list[str]:
    """One plain sentence per stratum with fewer than ``minimum`` samples: its accuracy -- and so a
    worst-stratum score -- is then too noisy to rest a choice or a figure on. The standard error
    of an accuracy near 70% measured on n samples is about 46/sqrt(n) points. ``among`` (the strata
    of the whole set ``strata`` was drawn from): a stratum it has that ``strata`` lacks gets a sentence
    too (no figure speaks for it). ``clusters`` (one id per row of ``strata``, identical samples sharing
    one): copies of one sample count once, as :func:`figure_warnings` counts them."""
    out = []
    strata = strata.long().cpu()
    counts = torch.bincount(strata, minlength=len(names))
    whole = None if among is None else torch.bincount(among.long().cpu(), minlength=len(names)).tolist()
    for i, n in enumerate(counts.tolist()):
        distinct = None if clusters is None or n == 0 else int(clusters.cpu()[strata == i].unique().numel())
        if n == 0 and whole is not None and whole[i] > 0:
            out.append(_absent(what, names[i]))
        elif distinct is not None and distinct < min(n, minimum):
            out.append(_too_few_distinct(what, names[i], distinct, n, minimum))
        elif 0 < n < minimum:
            out.append(_too_few(what, names[i], n, minimum))
    return out


def _absent(what: str, name: str) -> str:
    return f"{what}: group {name} has no samples in it, so no figure speaks for it"


def _too_few(what: str, name: str, n: int, minimum: int, kind: str = "group") -> str:
    se = 100 * math.sqrt(0.21 / n)
    return (f"{what}: {kind} {name} has only {n} samples (fewer than {minimum}); its accuracy is uncertain by about "
            f"+-{se:.0f} points, so {'the choice' if 'choos' in what else 'the figure'} can be wrong")


def _too_few_distinct(what: str, name: str, distinct: int, n: int, minimum: int, kind: str = "group") -> str:
    return _too_few(what, name, distinct, minimum, kind).replace(
        f"has only {distinct} samples", f"has only {distinct} distinct samples ({n} rows)")


def _support(what: str, row: dict, minimum: int, kind: str = "group") -> Optional[str]:
    """The warning for a figure's row (a group or a class) with fewer than ``minimum`` samples, copies of
    one sample counted once (its ``n_distinct``, :func:`repair.api.mark_duplicates`); None with enough
    or none."""
    n = int(row.get("n") or 0)
    distinct = row.get("n_distinct")
    if distinct is not None and 0 < int(distinct) < min(n, minimum):
        return _too_few_distinct(what, row["name"], int(distinct), n, minimum, kind)
    if 0 < n < minimum:
        return _too_few(what, row["name"], n, minimum, kind)
    return None


def figure_warnings(figures: dict, *, what: str, minimum: int = MIN_FOR_REPORT) -> list[str]:
    """:func:`support_warnings` for figures already measured (a :func:`repair.metrics.evaluate` result,
    with ``absent_groups`` where the caller knows them): a group with fewer than ``minimum`` samples,
    and a group of the data's group column with none (``absent_groups``, or listed with ``n`` 0). Without
    groups, the inferred groups (``per_inferred_group``) with a few samples: one the data has none of is
    not a group the figures miss (the original model simply made no such errors there). A class of the
    model with no samples (its accuracy unmeasured: worst-class accuracy is over the others) and, where
    worst-class accuracy is the headline (no groups, given or inferred), a class with a few."""
    out, seen = [], set()
    classes = figures.get("per_class") or []
    empty = [str(c["name"]) for c in classes if not c.get("n")]
    if empty:
        out.append(f"{what}: no samples of class(es) {', '.join(empty)}, so their accuracy is not measured and "
                   "worst-class accuracy is over the other classes")
    if figures.get("per_group") is None and not figures.get("per_inferred_group"):
        out += [w for w in (_support(what, c, minimum, kind="class") for c in classes) if w]
    given = figures.get("per_group")
    for g in (given if given is not None else figures.get("per_inferred_group") or []):
        n = int(g.get("n") or 0)
        w = _support(what, g, minimum)
        if w:
            out.append(w)
        elif n == 0 and given is not None:
            out.append(_absent(what, g["name"]))
            seen.add(g["name"])
    for name in figures.get("absent_groups") or []:
        if name not in seen:
            out.append(_absent(what, name))
            seen.add(name)
    return out


__all__ = ["IMBALANCE_THRESHOLD", "group_imbalance", "label_free_criterion", "CRITERIA", "MIN_FOR_CHOICE", "MIN_FOR_REPORT", "support_warnings", "figure_warnings", "SELECTION_NAMES", "LABEL_FREE_DEFAULT", "Criterion", "stratified_split", "Holdout",
           "KFold", "Given", "Selection", "kfold_parts", "select_and_refit", "pick_best", "scores_from_preds",
           "head_predictions", "head_logits", "average_heads", "inferred_groups", "inferred_group_names", "group_accuracies",
           "worst_group_accuracy", "MIN_GAIN", "REQUIRED_Z", "required_gain", "score_standard_error",
           "SCORES", "probability_scores"]
