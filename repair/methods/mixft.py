"""Data-mixing fine-tuning (``mixft``): repair the backbone, not only the head.

After Xue, Payani, Yang, Mirzasoleiman (2023), "Eliminating Spurious Correlations from
Pre-trained Models via Data Mixing" (arXiv 2305.14521): a model keeps a spurious
attribute when that attribute is predictive of a class; fine-tuning on data in which
examples carrying each attribute are mixed into the examples of *every* class (label
kept) leaves no attribute predictive, so the network itself -- not only its head --
unlearns the shortcut. Here the mixing runs on the repair set:

1. **Groups.** With ``--group-by``: class x attribute. Without: inferred (``inferred``):
   ``errors`` = class x (correctly / incorrectly classified by the original model) --
   the misclassified samples of a class are the ones carrying another class's spurious
   attribute -- or ``clusters`` = class x k-means cluster of the original model's
   embeddings (``n_clusters`` per class, seeded k-means++).
2. **Batches.** Each training batch draws its samples ``x`` group-balanced (a group
   uniformly, then a member) from the training part of the repair set.
3. **Mixing.** A share ``mix_fraction`` of the batch is mixed, each ``x`` (label ``y``)
   with a partner ``s`` from a group drawn uniformly among the groups of ``x``'s own class
   (``partner: same_class``, the default: every attribute value of the class is
   interpolated into every sample of it) or among all groups (``any_class``: the
   attribute of ``s`` is independent of ``y``, a literal reading of "mix the attribute
   examples into every class"), then a member uniformly: ``(1 - lambda) * x + lambda * s``,
   label ``y`` kept; ``lambda = mix_weight`` (0.3), or ``2 * mix_weight * Beta(mix_beta,
   mix_beta)`` clipped to [0, 1] when ``mix_beta > 0``. Images are mixed in pixel space
   after the model's own preprocessing (normalisation is affine, so this equals mixing
   the raw pixels), after the train-time ``augment`` of both. Texts are mixed inside the
   network at ``mix_point``: 0 = token embeddings (padding zeroed, attention mask the
   union of both), k = the output of encoder layer k (the partner's contextual hidden
   states, zero at its padding, under the sample's mask); the default -1 is the input of
   the first trained layer (see :meth:`repair.modelrepair.trainable.TrainableModel.mixed_logits`).
4. **Training** (:func:`repair.modelrepair.finetune.train`): cross-entropy on the mixed and unmixed
   samples, early-stopped on the *unmixed* held-out part by the selection criterion
   (``auto``: worst group with group labels, else worst class), the best state restored
   (the starting point competes: a run that never beats it changes nothing). ``head_init:
   refit`` first replaces the head by a group-balanced L2 logistic regression on the
   frozen embeddings (LP-FT; strength chosen on the held-out part). What trains
   (``scope``): ``all``, ``last:N`` (the head and the N blocks before it), ``head``,
   ``names:REGEX``; with ``lora: true`` the scope's Linear / ungrouped Conv2d layers get
   ``peft`` LoRA adapters (rank ``lora_rank``) instead, merged into their weights before
   saving (the output loads with timm / transformers alone). BatchNorm statistics stay
   frozen (``freeze_bn``).
5. **Settling** (``settle``, :func:`repair.modelrepair.finetune.settle`): the early-stopped
   weights are not taken as they are. For each ``alpha`` in ``settle_alphas`` (0.5, 1) the
   network is put at ``start + alpha * (tuned - start)`` (WiSE-FT interpolation) and scored
   on the held-out part with a group-balanced head refitted on that body (``settle: refit``,
   the default: "body from the model repair, head from DFR"; ``either`` also scores its own
   interpolated head, ``interpolate`` only that); the best candidate by the same criterion
   is kept. Everything stays ordinary
   weights of the original architecture (the method returns the changed tensors).

Paper vs. choices made here. The paper's full text was not reachable offline when this
was written, only its abstract: "leverage a small set of examples with spurious
attributes, and balance the spurious attributes across all classes via data mixing",
applied by fine-tuning pre-trained ResNet50s and BERT. The mixing rule above follows
that; everything the abstract leaves open is a setting whose default was measured on
the benchmark tasks (``bench/_work/tasks``; seed 0; figures on the separate test
split; one thread on a 2-core machine shared with other jobs, so the times are CPU
seconds of the fit, wall clock was 4-8x more):

- ``partner``: coloured MNIST label-free (all layers, 6 epochs) same_class 94.0 WGA /
  95.1 acc vs any_class 88.7 / 94.0; demo 72.3 / 86.4 vs 72.7 / 86.5 -> same_class.
- text mix point, SST-2 label-free, last 2 layers trained, lr 1e-4, 4 epochs: token
  embeddings -> no gain (the held-out worst class never beat the original's, so the
  original was kept: test 15.5 WGA / 59.8 acc, same for same_class and for unmixed
  balanced fine-tuning), output of layer 4 (the trained layers' input) 41.5 / 71.7 ->
  default = the input of the first trained layer (token embeddings when all train).
- inferred groups, demo label-free: errors 72.3 / 86.4 vs k-means clusters 70.1 / 85.7
  -> errors.
- ``scope: auto``: everything trains, images and texts, on the CPU and on CUDA (MobileNetV2 at
  64 px: 50-56 CPU s for 800 images; the demo ResNet 8-12 s). Texts trained only their last 2
  layers on the CPU until the twentieth session (MiniLM: ~1.7 CPU s per step of 32 vs ~4x that
  for all layers), everything on CUDA. A lent GPU showed what that cost: on ``sst2_capped``,
  label-free, test WGA over seeds 0-2, every layer (CUDA) 76.5 / 78.0 / 79.0 balanced and
  66.5 / 60.5 / 69.0 skewed, where the last two (CPU) gave 64.5 / 64.5 / 66.0 and 60.5 x 3 (the
  early stopping kept the start: the last two layers of a tag classifier do not learn the
  sentiment from 750 sentences); the same seed 0 on that machine's CPU 64.5, and every layer on
  the development machine's CPU 76.0 in 391 s (1 thread, shared): the gain is the scope, not
  the device or bfloat16 (CUDA without autocast: 77.2 balanced). ``bench/RESULTS.md`` has the
  runs. A time ``--budget`` (10 minutes by default) still bounds a long-text repair set.
- ``keep: best`` (early stopping at the best held-out evaluation, the default) against ``keep: tail``
  (the schedule run to its end, the states at the evaluations of its second half averaged) and
  ``keep: last``, each settled, label-free, test WGA mean +- std over seeds 0-2 (bench rows
  ``mixft``, ``mixft-tail``, ``mixft-last``; twenty-first session): ``sst2_capped`` balanced 77.2 +- 1.3
  / 77.5 +- 2.6 / -, skewed 68.3 +- 8.0 / 65.0 +- 4.4 / 66.0 +- 3.5; coloured MNIST balanced 92.8 +- 1.0 /
  91.2 +- 1.1 / 92.7 +- 1.1, skewed 84.1 +- 4.1 / 80.3 +- 0.3 / 79.8 +- 2.9; demo balanced 80.4 +- 2.8 /
  81.6 +- 2.2 / 81.7 +- 1.8, skewed 83.3 +- 3.9 / 82.3 +- 4.3 / 80.9 +- 4.8. The averaged run is steadier
  on two of three skewed sets and lower on all three -> best stays the default. Unsettled (``settle:
  off``, the run's own head), the averaged run is the steadiest on the skewed demo (87.7 +- 1.3, against
  81.7 +- 8.7 early-stopped) but far below on the balanced demo (71.2 +- 0.9) and on the capped skewed
  set (63.0 +- 5.4) -> settling by a refitted head stays. A soup of three tail-averaged runs (``members:
  3, keep: tail, patience: 0``, row ``mixft-tail-soup3``) is within std 3 on all six sets: capped 79.2 +- 1.0
  / 66.7 +- 2.3, MNIST 92.2 +- 0.9 / 82.7 +- 1.9, demo 82.3 +- 1.3 / 81.9 +- 3.0 (balanced / skewed), lower
  than the default on every skewed set, three times the training (632-669 s per capped run, the 600 s
  budget shared by the members) -> an option, not the default.
- ``settle_strength: heldout`` (the default until the twenty-seventh session: each settled body's
  refitted head takes the L2 strength its held-out part scores best) against ``average`` (no strength chosen: the heads of the whole grid
  averaged, each at unit logit spread) and ``average_1se`` (those within one standard error of the
  best), label-free, test WGA over seeds 0-2 (rows ``mixft-avgl2``, ``mixft-avg1se``; twenty-second
  session): skewed demo 83.3 +- 3.9 / 83.7 +- 0.8 / 85.1 +- 1.0, skewed coloured MNIST 84.1 +- 4.1 /
  83.9 +- 1.9 / 84.0 +- 3.5, balanced coloured MNIST 92.8 +- 1.0 / 91.2 +- 2.3 / 91.2 +- 2.3, balanced
  demo 80.4 +- 2.8 / 81.6 +- 1.8 / 81.6 +- 1.8; ``sst2_capped`` balanced 77.2 +- 1.3 / 75.5 +- 1.3,
  skewed 68.3 +- 8.0 / 67.2 +- 11.3 (seed 0's early-stopped body is poor with any refitted head). The
  strength choice was the skewed image sets' spread, not the capped text task's; the balanced sets pay
  1.6-1.7 points -> options, not the default. With no held-out choice at all (``keep: tail``,
  ``settle_alphas: [1.0]``, ``settle_strength: average``; row ``mixft-tail-avgl2-a1``): std <= 3 on five
  of six sets, 1.1-1.8 points under the default on four, capped skewed 66.5 +- 5.1 (the trained body
  itself differs by seed there).
- ``settle_strength: auto`` (the default since the twenty-seventh session; ``settle_strength_for``):
  ``average`` under the worst inferred group criterion (label-free on a skewed repair set: its held-out
  score rests on the dozen held-out rows of each group the original model gets wrong, too few to choose
  a strength on), ``heldout`` under any other -- so the balanced sets and the runs with group labels are
  unchanged. Skewed sets, seeds 0-2 (report builds): ``sst2_negation`` 61.0 +- 1.0 (``heldout`` 60.3 +-
  2.5), coloured MNIST 83.9 +- 1.9 (84.1 +- 4.1), demo 83.7 +- 0.8 (83.3 +- 3.9), ``sst2_capped`` 67.2 +-
  11.3 (68.3 +- 8.0). More seeds, side by side in one run: demo (this session's build) seeds 0-9 84.7 +-
  3.6 against 84.3 +- 5.1, coloured MNIST seeds 0-5 85.5 +- 1.9 against 83.3 +- 3.7, ``sst2_capped``
  seeds 0-5 68.7 +- 7.5 against 67.0 +- 6.5 (with ``early_stop: after_gain``, below; seed 0's body is
  poor with any head). ``clp`` and ``recompose`` keep ``heldout``.
- ``early_stop: after_gain`` (the default since the twenty-seventh session; ``anytime`` before; the
  other model repairs' ``auto`` since the twenty-eighth applies it under the worst inferred group
  criterion only, where mixft's collapse was measured; mixft keeps it everywhere): patience counts
  only once an evaluation has beaten the start. At lr 1e-4 the held-out score of a skewed set often
  collapses (the model predicts one class) for one to three epochs and then recovers; with ``anytime`` a collapse as long as the patience ended the run at its
  start, the original model (``sst2_capped`` skewed seed 3: 59.5, and 55.0 averaged; with
  ``after_gain`` 70.5). No run of seeds 0-2 on the visible sets stopped there, so their figures are
  unchanged. A third of the learning rate (lr 3e-5, row ``mixft-lr3e5``) collapsed longer and stopped
  at the start on every capped skewed seed (60.5 / 48.0 / 59.5), ``sst2_negation`` skewed 53.5 / 55.5 /
  58.0; on the demo and coloured MNIST (this session's builds) it was no steadier -> lr 1e-4 stays.
- ``cross_fit: 2`` (twenty-third session; rows ``mixft-cf2``, ``mixft-cf2-p0`` = the built-in recipe
  ``mixft-crossfit``, ``patience: 0``), label-free, test WGA over seeds 0-2, against the default:
  capped balanced 76.0 +- 5.3 / 78.7 +- 1.2 (default 77.2 +- 1.3), capped skewed 65.0 +- 7.3 /
  69.7 +- 4.5 (68.3 +- 8.0), coloured MNIST balanced 91.4 +- 3.5 / 92.2 +- 2.3 (92.8 +- 1.0), skewed
  85.8 +- 0.8 / 82.9 +- 2.6 (84.1 +- 4.1), demo balanced 79.1 +- 1.7 both (80.4 +- 2.8), skewed
  87.2 +- 2.4 both (83.3 +- 3.9). With early stopping, member 1 of the capped skewed seed 2 collapsed
  to one class for two evaluations and stopped at the start (58.0; 72.0 with patience 0). Twice the
  training; sst2_negation balanced 71.3 +- 0.8 (72.5 +- 0.9; 540-621 s a run, twenty-fifth session),
  skewed 56.2 +- 3.0 (default 60.3 +- 2.5) -> an option and a recipe, not the
  default. Since the twenty-fourth session recipe ``auto-ft`` runs it on its own two folds
  (``ModelRepairInputs.folds``): the members' out-of-fold predictions are what auto-ft scores against the
  head, and the members' average is the model it returns (bench row ``auto-ft``, bench/analysis.md).
  Twenty-sixth session: after each member but the last, the caller's ``stop_check`` gets that member's
  fold predicted at every point settling could choose (``settle(..., every_point=True)``) and can end the
  run (``CannotWin``): auto-ft's bound, as its fold-by-fold path had one.
- SST-2 is where ``mixft`` does NOT yet reach the issue's target (label-free test WGA >=
  the best last-layer row + 5, about 75): ``head_init: refit`` + last 2 layers, lr 1e-4,
  8 epochs kept the refitted head (68.5 / 77.2, the last-layer level; fine-tuning first
  fell to a 40% held-out worst class, then climbed back to 67%); the defaults with
  any_class partners and lr 2e-4 reached 57.0 / 76.1, with group labels (same_class,
  lr 1e-4, 8 epochs) 69.5 / 76.9 -- the level of the last-layer rows, not above. One
  SST-2 fit (750 training sentences, 8 epochs, last 2 layers) costs ~350 CPU s. Coloured MNIST and the
  demo meet theirs: MNIST label-free 94.0 / 95.1 (best last-layer label-free row 84.9),
  with groups 92.8 / 95.0 (87.5); demo with groups 84.8 / 90.9 (in-process) and
  87.7 / 91.4 (``repair fix``, CPU default threads), label-free 72.3-78.3 (below the
  last-layer rows, 84-89: worst class on the held-out part is a weak proxy there).
- ``bench`` task ``sst2_capped`` (issue 19: ERM a pure tag classifier, test WGA 0.0; every head
  <= 68.5, label-free ``auto`` 65.3 balanced / 62.0 skewed over seeds 0-2), label-free, test
  WGA / acc per seed 0, 1, 2, 1 torch thread at load average 8-13 on the shared 2 cores:
  defaults (last 2 layers, lr 1e-4, before ``settle`` existed) 0.0 / 50.0 on seed 0 (training
  collapsed to one class; the loss stayed at 0.69); ``head_init: refit``, lr 5e-4, 4 epochs,
  ``patience: 0``, settled: balanced 71.0 / 81.0, 65.0 / 73.8, 59.5 / 78.5 (accuracy above
  every head, 73-74, but the held-out *worst class* it selects by does not follow the test
  worst group: seed 1 kept the LP-FT start, seed 2 the last fine-tuned state), skewed
  60.0 / 69.4, 56.5 / 75.4, 51.5 / 69.1 (the fine-tuned states never beat the LP-FT start on
  the ~13 held-out samples of each inferred minority group, so the refitted head on the
  original body is what comes back, fitted on 75% of the data). 750-920 s per balanced run,
  240-640 s skewed, peak RSS 740-790 MiB. The same with ``selection: worst_inferred_group``
  (on this task the inferred groups are the true groups): balanced 71.0 / 81.0, 65.0 / 73.8,
  71.0 / 79.1 (69.0 +- 3.5; seeds 0 and 2 chose the head refitted on the fine-tuned body, seed 1
  the LP-FT start again), 500-520 s per run. Not yet the issue's target (best label-free head
  65.3 + 5, std <= 3).
- skewed repair sets (minority groups 20% of the majority, per class): with group labels
  it works (demo 89.5 / 91.8, MNIST 86.0 / 91.3); label-free it keeps the original model
  (demo 36.8, MNIST 50.5 test WGA): on skewed data the original's held-out worst *class*
  is already high (87-92%), so no fine-tuned state beats it -- the label-free criterion
  cannot see the shortcut there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import above, setting
from ..modelrepair.finetune import (EARLY_STOPS, SETTLE_STRENGTHS, LoopConfig, Session, SettleSettings, cross_fit,
                                    draw_batch, refit_head, settle_by, train)
from ..selection import SELECTION_NAMES
from ..modelrepair.trainable import AUGMENTATIONS, check_scope
from . import CannotWin, ModelRepairInputs, ModelRepairOutput, register_model_repair


@dataclass
class MixFTConfig(LoopConfig, SettleSettings):
    lr: float = setting(1e-4, gt=0)
    # mixft's own defaults (the other model repairs: early_stop auto, settle_strength heldout): see the notes above
    early_stop: str = setting("after_gain", choices=EARLY_STOPS, only_if={"patience": above(0)},
                              doc="anytime = patience counts from the start; after_gain (the default) = only once "
                                  "an evaluation has beaten the start: a run never stops early back at its starting "
                                  "point (on skewed sets the held-out score often collapses for a few epochs before "
                                  "it recovers); auto = after_gain under the worst inferred group criterion only")
    settle_strength: str = setting("auto", choices=SETTLE_STRENGTHS, only_if={"settle": ("refit", "either")},
                                   doc="the L2 strength of each refitted head: auto (the default) = average "
                                       "under the worst inferred group criterion (a skewed repair set, label-free), "
                                       "else heldout; heldout = chosen for each body on the held-out part; "
                                       "heldout_1se, original, average, average_1se: see SettleSettings")
    epochs: float = setting(8.0, gt=0, doc="epochs over the training part (a steps or epochs --budget overrides)")
    scope: str = setting("auto", doc="auto (= all: every layer) | head | all | last:N | names:REGEX")
    lora: bool = setting(False, doc="train peft LoRA adapters on the scope's layers (merged before saving)")
    lora_rank: int = setting(8, ge=1, le=4096, only_if={"lora": (True,)})
    lora_alpha: float = setting(16.0, gt=0, only_if={"lora": (True,)})
    # the mixing settings do nothing when no row of a batch is mixed (mix_fraction 0): refused when changed
    mix_weight: float = setting(0.3, ge=0, le=1, doc="lambda: the partner's share of a mixed input",
                                only_if={"mix_fraction": above(0)})
    mix_beta: float = setting(0.0, ge=0, doc="> 0: lambda = 2 * mix_weight * Beta(b, b), clipped to [0, 1]",
                              only_if={"mix_fraction": above(0)})
    mix_fraction: float = setting(1.0, ge=0, le=1, doc="share of each batch that is mixed")
    partner: str = setting("same_class", choices=("same_class", "any_class"), only_if={"mix_fraction": above(0)})
    head_init: str = setting("original", choices=("original", "refit"),
                             doc="refit: start from a group-balanced L2 logistic head on the frozen embeddings (LP-FT)")
    inferred: str = setting("errors", choices=("errors", "clusters"), doc="groups without --group-by")
    n_clusters: int = setting(2, ge=2, le=1000, doc="inferred: clusters per class", only_if={"inferred": ("clusters",)})
    mix_point: int = setting(-1, ge=-1, le=1000, doc="texts: -1 = the input of the first trained layer, 0 = token "
                                            "embeddings, k = output of encoder layer k",
                             only_if={"mix_fraction": above(0)})
    holdout_fraction: float = setting(0.25, gt=0, lt=1, only_if={"cross_fit": (1,)})
    sampling: str = setting("balanced", choices=("balanced", "uniform"))
    augment: str = setting("none", choices=AUGMENTATIONS)
    selection: str = setting("auto", choices=SELECTION_NAMES)
    cross_fit: int = setting(1, ge=1, le=10,
                             doc="k > 1: cross-fitting -- k members, each trained on all folds but one and "
                                 "early-stopped on that one, averaged into one model; settling judged on the "
                                 "out-of-fold predictions of every repair row (k trainings; holdout_fraction "
                                 "unused)")

    def validate(self):
        check_scope(self.scope, ("auto",))
        if self.lora and self.scope == "head":
            raise ValueError("setting 'lora': LoRA adapters need a scope beyond the head")
        if self.cross_fit > 1 and (self.lora or self.members > 1):
            raise ValueError("setting 'cross_fit': not with 'lora' or 'members' > 1 (cross-fitting's members "
                             "are its soup)")


def _kmeans_groups(X: torch.Tensor, y: torch.Tensor, k: int, gen: torch.Generator, iters: int = 25) -> torch.Tensor:
    """class * k + (seeded k-means++ cluster of the L2-normalised rows within the class)."""
    X = F.normalize(X.float(), dim=1)
    out = torch.empty(y.numel(), dtype=torch.long)
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).flatten()
        Z = X[rows]
        kk = min(k, rows.numel())
        centers = Z[torch.randint(0, Z.shape[0], (1,), generator=gen)]
        for _ in range(kk - 1):                      # k-means++ seeding
            d = torch.cdist(Z, centers).min(1).values.pow(2)
            centers = torch.cat([centers, Z[torch.multinomial(d + 1e-12, 1, generator=gen)]])
        for _ in range(iters):
            assign = torch.cdist(Z, centers).argmin(1)
            for j in range(kk):
                if (assign == j).any():
                    centers[j] = Z[assign == j].mean(0)
        out[rows] = c * k + torch.cdist(Z, centers).argmin(1)
    return out


class _Mixer:
    """Group-balanced draws of samples and their mixing partners from the training part."""

    def __init__(self, train_idx: torch.Tensor, groups: torch.Tensor, y: torch.Tensor, cfg: MixFTConfig):
        self.pool, self.cfg, self.y = train_idx, cfg, y
        self.g = groups[train_idx]

    def samples(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return draw_batch(self.pool, self.g if self.cfg.sampling == "balanced" else None, n, gen)

    def partners(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A partner per sample: from a group drawn uniformly among all groups (``any_class``)
        or among the groups of the sample's class (``same_class``), then a member uniformly."""
        if self.cfg.partner == "any_class":
            return draw_batch(self.pool, self.g, idx.numel(), gen)
        out = torch.empty(idx.numel(), dtype=torch.long)
        yi, yp = self.y[idx], self.y[self.pool]
        for c in torch.unique(yi).tolist():
            slots = torch.nonzero(yi == c).flatten()
            own = yp == c
            out[slots] = draw_batch(self.pool[own], self.g[own], slots.numel(), gen)
        return out

    def weights(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.cfg.mix_beta > 0:
            # Beta(b, b) as Ga / (Ga + Gb), drawn from the private generator (torch.distributions
            # would use the global RNG)
            b = torch.full((n,), float(self.cfg.mix_beta), dtype=torch.float32)
            ga, gb = torch._standard_gamma(b, generator=gen), torch._standard_gamma(b, generator=gen)
            return (2 * self.cfg.mix_weight * ga / (ga + gb)).clamp(0.0, 1.0)
        return torch.full((n,), float(self.cfg.mix_weight), dtype=torch.float32)


def _refit_head(tm, sess, X: torch.Tensor, groups: torch.Tensor) -> dict:
    """Linear probing before fine-tuning (LP-FT): :func:`repair.modelrepair.finetune.refit_head`
    on the frozen embeddings, written into the head."""
    W, b, info = refit_head(sess, X, groups)
    with torch.no_grad():
        tm.head.weight.copy_(W.to(tm.head.weight))
        if tm.head.bias is not None:
            tm.head.bias.copy_(b.to(tm.head.bias))
    return info


def _mix_point(tm, trained: list, asked: int):
    """Texts: the mix point asked for, or (-1) the input of the first trained layer (the
    output of the last frozen one; the token embeddings when they train). Images: None."""
    if tm.modality != "text":
        return None
    tm.check_mix_point(asked)          # also checked before any work (pipeline._check_scopes)
    points = tm.mix_points()
    if asked >= 0:
        return asked
    params = dict(tm.module.named_parameters())
    train_ids = {id(params[n]) for n in trained}
    frozen = 0
    for mod in points:
        if any(id(p) in train_ids for p in mod.parameters()):
            break
        frozen += 1
    return max(0, frozen - 1)


@register_model_repair("mixft", summary="data-mixing fine-tuning (Xue et al. 2023): every attribute mixed into every "
                                        "class (label kept), the network fine-tuned on it, early-stopped on the "
                                        "held-out criterion", config=MixFTConfig, groups="optional")
def mixft(inputs: ModelRepairInputs, config: MixFTConfig) -> ModelRepairOutput:
    cfg = config
    sess = Session(inputs, holdout_fraction=cfg.holdout_fraction, selection=cfg.selection)
    tm = sess.model
    dev = sess.device
    tm.module.to(dev)
    gen = torch.Generator().manual_seed(int(inputs.seed) + 7)
    clusters = sess.group_source != "given" and cfg.inferred == "clusters"
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), dev) if clusters or cfg.head_init == "refit" else None
    if clusters:
        groups, source = _kmeans_groups(X, sess.y, cfg.n_clusters, gen), "inferred: clusters"
    else:
        groups, source = sess.groups, ("given" if sess.group_source == "given" else "inferred: errors")
    mixer = _Mixer(sess.train_idx, groups, sess.y, cfg)
    scope = "all" if cfg.scope == "auto" else cfg.scope
    names = tm.select(scope)
    point = _mix_point(tm, names, cfg.mix_point)
    before = tm.state()
    refit = None
    if cfg.head_init == "refit" and cfg.cross_fit == 1:
        refit = _refit_head(tm, sess, X, groups)
    n_mix = int(round(cfg.mix_fraction * cfg.batch_size))

    def step(i: int, g: torch.Generator) -> torch.Tensor:
        idx = mixer.samples(cfg.batch_size, g)
        mixed, clean = idx[:n_mix], idx[n_mix:]
        parts = []
        if mixed.numel():
            partner = mixer.partners(mixed, g)
            lam = mixer.weights(mixed.numel(), g)
            parts.append(tm.mixed_logits(sess.encoded, mixed, partner, lam, dev, point=point,
                                         augment=cfg.augment, generator=g))
        if clean.numel():
            x = tm.batch(sess.encoded, clean, dev)
            if not isinstance(x, dict):
                x = tm.augment(x, cfg.augment, g)
            parts.append(tm.logits(x))
        return F.cross_entropy(torch.cat(parts), sess.y[idx].to(dev))

    def run(params, budget=inputs.budget, seed=inputs.seed, desc="mixft"):
        return train(params, step, sess.evaluator(cfg), cfg, steps_per_epoch=sess.steps_per_epoch(cfg.batch_size),
                     budget=budget, seed=seed, device=dev, progress=inputs.progress, desc=desc,
                     buffers=tm.running_stats(cfg.freeze_bn), criterion=sess.criterion)

    members, member_heads = None, []
    if cfg.cross_fit > 1:
        def run_member(j: int, budget):
            # this member's fold is the session's split now: its mixing pool, its LP-FT head
            nonlocal mixer
            mixer = _Mixer(sess.train_idx, groups, sess.y, cfg)
            if cfg.head_init == "refit":
                member_heads.append(_refit_head(tm, sess, X, groups))
            return run(params, budget, int(inputs.seed) + j, f"mixft {j + 1}/{cfg.cross_fit}")

        def after_member(done: list) -> None:
            # the caller's bound (auto-ft): the members so far, at every point settling could choose
            pts = settle_by(cfg, sess, before, groups, members=done, every_point=True)
            why = None if pts is None else inputs.stop_check(pts["rows"], pts["points"])
            if why:
                raise CannotWin(why)

        check = after_member if inputs.stop_check is not None and inputs.folds is not None else None
        with tm.training(names, freeze_bn=cfg.freeze_bn) as params:
            res, members = cross_fit(sess, cfg.cross_fit, params, run_member, budget=inputs.budget,
                                     buffers=tm.running_stats(cfg.freeze_bn), after_member=check)

    lora_info = None
    if cfg.lora:
        head = tm.select("head")
        targets = tm.lora_targets([n for n in names if n not in set(head)])
        with tm.lora(targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha) as adapters:
            with tm.training(adapters + head, freeze_bn=cfg.freeze_bn) as params:
                res = run(params)
        lora_info = {"wrapped_layers": len(targets), "adapter_tensors": len(adapters), "rank": cfg.lora_rank}
    elif members is None:
        with tm.training(names, freeze_bn=cfg.freeze_bn) as params:
            res = run(params)
    settled = settle_by(cfg, sess, before, groups, members=members)
    oof = settled.pop("oof_pred", None) if settled else None
    changed = tm.changed(before)
    counts = (torch.bincount(groups[sess.train_idx]).tolist() if members is None else
              [torch.bincount(groups[tr]).tolist() for _, tr, _ in members])
    session = sess.describe()
    if members is not None:
        session = {**session, "n_train": None, "n_heldout": None, "cross_fit": cfg.cross_fit,
                   "fold_sizes": [int(ho.numel()) for _, _, ho in members]}
        refit = member_heads or None
    sizes = ([c for c in counts if c > 0] if members is None else [[c for c in m if c > 0] for m in counts])
    return ModelRepairOutput(tensors=changed, steps=res.steps, oof_pred=oof, diagnostics={
        "scope": scope, "lora": lora_info, "head_refit": refit, "trainable_tensors": len(names), "groups": source,
        "warnings": tm.scope_notes(scope, "mixft"),
        "mixing": {"partner": cfg.partner, "mix_weight": cfg.mix_weight, "mix_beta": cfg.mix_beta,
                   "mix_fraction": cfg.mix_fraction, "mix_point": point,
                   "space": "token embeddings" if point == 0 else (
                       f"output of layer {point}" if tm.modality == "text" else "preprocessed pixels"),
                   "group_sizes_train": sizes},
        "settle": settled, "session": session, "loop": res.describe()})
