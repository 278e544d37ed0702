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
   at the masked original head) and scored on the held-out part by ``selection``
   (:func:`repair.selection.select_and_refit`; ``auto`` is the label-free default,
   ``"worst_inferred_group"``: groups = class x correct/incorrect under the original head).
5. The chosen mask is kept; the head is retrained on all of ``inputs`` (masked,
   class-balanced) and the mask is folded in: ``W' = W diag(m)`` (``transforms.MASK``),
   so masked dimensions have exactly zero weight. The deltas are
   :func:`repair.probing.neuron_deltas`, the numbers ``repair probe`` shows.

Config fields (:class:`NeuronTuneConfig`):

- ``holdout_fraction`` (0.5): share of ``inputs`` held out to score the candidates; the
  rest identifies the spurious neurons and fits the candidate heads.
- ``aggregation`` ("union"): "union" | "all" (see above).
- ``threshold_quantiles`` (0.5, 0.75, 0.9, 0.95, 0.98): lambda candidates as quantiles
  of the positive aggregated deltas; empty only with ``include_no_mask`` (no candidate else).
- ``include_no_mask`` (True): also consider masking nothing.
- ``delta_scale`` ("raw"): "raw" | "std".
- ``selection`` ("auto"): the criterion of :mod:`repair.selection` (NeuronTune never
  sees group labels, so ``auto`` is the label-free default).
- ``l2`` (1.0): L2 strength of the retrained head (sklearn ``1/C``, weights sum to n).
- ``standardize`` (True), ``tol`` (1e-4), ``max_iter`` (1000): solver settings.
- ``report_top`` (50): how many suppressed neurons (largest delta first) to list.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import solver as S
from ..config import setting
from ..probing import neuron_deltas
from ..selection import Criterion, Given, head_predictions, select_and_refit, stratified_split
from . import MASK, RepairInputs, RepairOutput, register_method

__all__ = ["NeuronTuneConfig", "neurontune"]


@dataclass
class NeuronTuneConfig:
    holdout_fraction: float = setting(0.5, gt=0, lt=1)
    aggregation: str = setting("union", choices=("union", "all"))
    threshold_quantiles: tuple = setting((0.5, 0.75, 0.9, 0.95, 0.98), ge=0, le=1,
                                         nonempty={"include_no_mask": (False,)})   # else no candidate
    include_no_mask: bool = True
    delta_scale: str = setting("raw", choices=("raw", "std"))
    selection: str = setting("auto", choices=("auto", "worst_class", "worst_inferred_group"))
    l2: float = setting(1.0, ge=0)
    standardize: bool = True
    tol: float = setting(1e-4, gt=0)
    max_iter: int = setting(1000, ge=1, le=1_000_000)
    report_top: int = setting(50, ge=0, le=100_000)


def _freeze(cfg: NeuronTuneConfig, diag: dict) -> NeuronTuneConfig:
    """Refit with the threshold quantile the inner selection chose (or no mask)."""
    q = diag["chosen"].get("quantile")
    if q is None:
        return dataclasses.replace(cfg, threshold_quantiles=(), include_no_mask=True)
    return dataclasses.replace(cfg, threshold_quantiles=(q,), include_no_mask=False)

@register_method("neurontune", summary="NeuronTune: zero embedding dimensions that are more active on "
                                       "misclassified samples, retrain the head (no group labels)",
                 config=NeuronTuneConfig, groups="never", freeze=_freeze, transform=MASK)
def neurontune(inputs: RepairInputs, cfg: NeuronTuneConfig) -> RepairOutput:
    gen, X, y, W0, b0, lg0 = inputs.prepared()
    C, D = W0.shape
    pred0 = lg0.argmax(1)
    crit = Criterion.resolve(cfg.selection, has_groups=False, y=y, ref_logits=lg0)

    id_idx, ho_idx = stratified_split(y, [cfg.holdout_fraction], gen, clusters=inputs.clusters)
    deltas, counts = neuron_deltas(X[id_idx], y[id_idx], pred0[id_idx], C, cfg.delta_scale)
    valid = ~torch.isnan(deltas[:, 0])
    if bool(valid.any()):
        dv = deltas[valid]
        agg = dv.max(0).values if cfg.aggregation == "union" else dv.min(0).values
    else:
        agg = torch.full((D,), float("-inf"), dtype=deltas.dtype)
    pos = agg[agg > 0]
    lambdas, quantiles = [], []
    if cfg.include_no_mask or pos.numel() == 0 or not cfg.threshold_quantiles:
        lambdas.append(float("inf"))
        quantiles.append(None)
    if pos.numel() > 0 and cfg.threshold_quantiles:
        qs = torch.quantile(pos.double(), torch.tensor([float(q) for q in cfg.threshold_quantiles],
                                                       dtype=torch.float64))
        for qv, lam in zip(cfg.threshold_quantiles, qs.tolist()):
            if all(abs(lam - l) > 1e-12 for l in lambdas):
                lambdas.append(float(lam))
                quantiles.append(float(qv))
    masks = torch.stack([(agg > lam).logical_not().float() if lam != float("inf") else torch.ones(D, dtype=torch.float32)
                         for lam in lambdas])                       # (K, D) 1 = keep

    def fit(idx, which):
        ms = masks[which]
        w = S.class_balanced_weights(y[idx], C)
        # warm start: the original head with the suppressed dimensions removed
        W, b, info = S.fit_logreg(X[idx], y[idx], C, sample_weight=w, l2=cfg.l2, feature_scale=ms,
                                  init_W=W0 * ms.unsqueeze(1), init_b=b0.expand(ms.shape[0], C),
                                  standardize=cfg.standardize, tol=cfg.tol, max_iter=cfg.max_iter,
                                  device=inputs.device)
        return W.cpu(), b.cpu(), info

    sel = select_and_refit(len(lambdas), fit, lambda f, idx: head_predictions(X[idx], f[0], f[1]), y,
                           criterion=crit, score_strata=crit.strata(y, lg0), scheme=Given(id_idx, ho_idx),
                           seed=gen)
    best = sel.best
    mask = masks[best]
    Wf, bf, finfo = sel.final
    # the solver already folds its feature mask; folding again is idempotent and makes
    # the guarantee explicit: masked dimensions carry exactly zero weight
    Wout, bout = MASK.fold(Wf[0], bf[0], {"mask": mask})
    supp = torch.nonzero(mask == 0).flatten()
    order = torch.argsort(agg[supp], descending=True)
    top = supp[order][: int(cfg.report_top)]
    lam = lambdas[best]
    cands = sel.candidates([{"lambda": None if l == float("inf") else l,
                             "neurons_suppressed": int((masks[i] == 0).sum())} for i, l in enumerate(lambdas)])
    diag = {
        "chosen": {"lambda": None if lam == float("inf") else lam, "quantile": quantiles[best]},
        "aggregation": cfg.aggregation,
        "selection": sel.describe(),
        "neurons_suppressed": int(supp.numel()),
        "suppressed_top": [{"dim": int(i), "delta": float(agg[i])} for i in top.tolist()],
        "per_class": counts,
        "candidates": cands,
        "solver_converged": bool(finfo["converged"][0]),
    }
    return RepairOutput(W=Wout.float().contiguous(), b=bout.float().contiguous(), diagnostics=diag)
