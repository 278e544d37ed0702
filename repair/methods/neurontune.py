"""NeuronTune (Zheng et al., 2025): suppress spurious neurons, retrain the head.

No group labels are ever used.

1. Split ``inputs`` into an *identification* part and a *held-out* part (seeded,
   stratified by class).
2. On the identification part, with the ORIGINAL head's predictions, for every class
   ``y`` with both correctly and incorrectly classified samples and every embedding
   dimension ``i``::

       delta_i^y = median(x_i | class y, misclassified) - median(x_i | class y, correct)

   (``delta_scale="std"`` divides by the dimension's std on the identification part;
   default ``"raw"`` as in the paper). A dimension is *spurious* for class ``y`` when
   ``delta_i^y > lambda``: it is more active exactly on the samples the head gets wrong.
3. Aggregation over classes (``aggregation``):

   - ``"union"`` (default): masked if spurious for ANY class, i.e.
     ``max_y delta_i^y > lambda``. A neuron that drives the errors of one class is
     already harmful: the head's score for the wrong class rises with it;
   - ``"all"``: masked only if spurious for EVERY considered class
     (``min_y delta_i^y > lambda``), a more conservative choice.

4. ``lambda`` candidates: the ``threshold_quantiles`` of the positive aggregated
   deltas, plus "no masking" (``include_no_mask``). For each candidate a head is
   retrained on the masked identification part (class-balanced weights, L2, all
   candidates in ONE batched solver call with per-problem feature masks, warm-started
   at the masked original head) and scored on the held-out part by ``selection``:
   ``"worst_class"`` (default) or ``"worst_inferred_group"`` (groups = class x
   correct/incorrect under the original head).
5. The chosen mask is kept; the head is retrained on all of ``inputs`` (masked,
   class-balanced) and the mask is folded in: ``W' = W diag(m)`` (:func:`fold_head`),
   so masked dimensions have exactly zero weight.

Config fields (:class:`NeuronTuneConfig`):

- ``identification_fraction`` (0.5): share of ``inputs`` used to find spurious neurons
  and to fit candidate heads; the rest scores candidates.
- ``aggregation`` ("union"): "union" | "all" (see above).
- ``threshold_quantiles`` (0.5, 0.75, 0.9, 0.95, 0.98): lambda candidates as quantiles
  of the positive aggregated deltas.
- ``include_no_mask`` (True): also consider masking nothing.
- ``delta_scale`` ("raw"): "raw" | "std".
- ``selection`` ("worst_class"): "worst_class" | "worst_inferred_group" (worst-class
  accuracy is the label-free default throughout ``repair``: see :mod:`repair.fix`).
- ``l2`` (1.0): L2 strength of the retrained head (sklearn ``1/C``, weights sum to n).
- ``standardize`` (True), ``tol`` (1e-4), ``max_iter`` (1000): solver settings.
- ``report_top`` (50): how many suppressed neurons (largest delta first) to list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import RepairInputs, RepairOutput, register_method
from .. import solver as S

__all__ = ["NeuronTuneConfig", "neurontune", "neuron_deltas", "apply_transform", "fold_head",
           "example_transform"]


@dataclass
class NeuronTuneConfig:
    identification_fraction: float = 0.5
    aggregation: str = "union"
    threshold_quantiles: tuple = (0.5, 0.75, 0.9, 0.95, 0.98)
    include_no_mask: bool = True
    delta_scale: str = "raw"
    selection: str = "worst_class"
    l2: float = 1.0
    standardize: bool = True
    tol: float = 1e-4
    max_iter: int = 1000
    report_top: int = 50


def apply_transform(X: torch.Tensor, transform: dict) -> torch.Tensor:
    """Neuron suppression: ``X * mask``."""
    return X * transform["mask"]


def fold_head(W: torch.Tensor, b: torch.Tensor, transform: dict):
    """Head on masked embeddings -> head on raw embeddings: ``(W diag(m), b)``."""
    return S.fold_affine(W, b, transform["mask"], None)


def example_transform(D: int, generator: torch.Generator) -> dict:
    return {"mask": (torch.rand(D, generator=generator) > 0.3).float()}


def neuron_deltas(X: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, num_classes: int,
                  delta_scale: str = "raw"):
    """Per-class deltas (C, D) (NaN rows for skipped classes) and per-class counts."""
    D = X.shape[1]
    deltas = torch.full((num_classes, D), float("nan"))
    if delta_scale == "std":
        sd = X.std(0, unbiased=False).clamp_min(1e-8)
    elif delta_scale == "raw":
        sd = None
    else:
        raise ValueError(f"delta_scale must be 'raw' or 'std', got {delta_scale!r}")
    counts = []
    for c in range(num_classes):
        m = y == c
        wrong = m & (pred != c)
        right = m & (pred == c)
        counts.append({"class": c, "n": int(m.sum()), "misclassified": int(wrong.sum()),
                       "correct": int(right.sum())})
        if int(wrong.sum()) == 0 or int(right.sum()) == 0:
            continue
        d = X[wrong].median(0).values - X[right].median(0).values
        deltas[c] = d if sd is None else d / sd
    return deltas, counts


@register_method("neurontune", summary="NeuronTune: zero embedding dimensions that are more active on "
                                       "misclassified samples, retrain the head (no group labels)",
                 config=NeuronTuneConfig, needs_groups=False, uses_groups=False)
def neurontune(inputs: RepairInputs, config: NeuronTuneConfig) -> RepairOutput:
    cfg = config
    if cfg.aggregation not in ("union", "all"):
        raise ValueError(f"aggregation must be 'union' or 'all', got {cfg.aggregation!r}")
    if cfg.selection not in ("worst_inferred_group", "worst_class"):
        raise ValueError("selection must be 'worst_inferred_group' or 'worst_class'")
    gen = torch.Generator().manual_seed(int(inputs.seed))
    X, y, W0, b0 = inputs.cpu_tensors()
    C, D = W0.shape
    lg0 = X @ W0.T + b0
    pred0 = lg0.argmax(1)
    strata, crit = S.resolve_selection_groups(cfg.selection, y, lg0, None)

    id_idx, ho_idx = S.stratified_split(y, cfg.identification_fraction, gen)
    deltas, counts = neuron_deltas(X[id_idx], y[id_idx], pred0[id_idx], C, cfg.delta_scale)
    valid = ~torch.isnan(deltas[:, 0])
    if bool(valid.any()):
        dv = deltas[valid]
        agg = dv.max(0).values if cfg.aggregation == "union" else dv.min(0).values
    else:
        agg = torch.full((D,), float("-inf"))
    pos = agg[agg > 0]
    lambdas = []
    if cfg.include_no_mask or pos.numel() == 0:
        lambdas.append(float("inf"))
    if pos.numel() > 0:
        qs = torch.quantile(pos.double(), torch.tensor([float(q) for q in cfg.threshold_quantiles],
                                                       dtype=torch.float64))
        for q in qs.tolist():
            if all(abs(q - l) > 1e-12 for l in lambdas):
                lambdas.append(float(q))
    masks = torch.stack([(agg > lam).logical_not().float() if lam != float("inf") else torch.ones(D)
                         for lam in lambdas])                       # (K, D) 1 = keep

    def fit(idx, ms):
        w = S.class_balanced_weights(y[idx], C)
        # warm start: the original head with the suppressed dimensions removed
        return S.fit_logreg(X[idx], y[idx], C, sample_weight=w, l2=cfg.l2, feature_scale=ms,
                            init_W=W0 * ms.unsqueeze(1), init_b=b0.expand(ms.shape[0], C),
                            standardize=cfg.standardize, tol=cfg.tol, max_iter=cfg.max_iter,
                            device=inputs.device)

    best, scores = 0, []
    if len(lambdas) > 1 and ho_idx.numel() > 0:
        Wk, bk, _ = fit(id_idx, masks)
        worst, mean = S.selection_scores(X[ho_idx], y[ho_idx], Wk, bk, strata[ho_idx])
        best = S.pick_best(worst, mean)
        scores = [{"lambda": (None if lam == float("inf") else lam),
                   "n_suppressed": int((masks[i] == 0).sum()),
                   "heldout_worst_acc": float(worst[i]), "heldout_mean_acc": float(mean[i])}
                  for i, lam in enumerate(lambdas)]
    mask = masks[best]
    Wf, bf, finfo = fit(torch.arange(X.shape[0]), mask.unsqueeze(0))
    # the solver already folds its feature mask; folding again is idempotent and makes
    # the guarantee explicit: masked dimensions carry exactly zero weight
    Wout, bout = fold_head(Wf[0].cpu(), bf[0].cpu(), {"mask": mask})
    supp = torch.nonzero(mask == 0).flatten()
    order = torch.argsort(agg[supp], descending=True)
    top = supp[order][: int(cfg.report_top)]
    lam = lambdas[best]
    diag = {
        "chosen_lambda": None if lam == float("inf") else lam,
        "aggregation": cfg.aggregation,
        "selection": crit,
        "n_suppressed": int(supp.numel()),
        "suppressed_top": [{"dim": int(i), "delta": float(agg[i])} for i in top.tolist()],
        "per_class": counts,
        "candidates": scores,
        "n_identification": int(id_idx.numel()),
        "n_heldout": int(ho_idx.numel()),
        "solver_converged": bool(finfo["converged"][0]),
    }
    return RepairOutput(W=Wout.float().contiguous(), b=bout.float().contiguous(), diagnostics=diag)
