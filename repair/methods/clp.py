"""CLP: retraining with Causal Logit Perturbation (Zhou et al. 2025, arXiv:2505.15246), a model repair.

The network's last blocks (``scope``) are trained with a per-sample logit offset
``delta = g(characteristics)`` added to the logits in the loss, where ``g`` is a small MLP
(the *perturbation network*) over ten training characteristics of each sample: its loss,
logit margin (p_y minus the largest other probability), ||1 - softmax||, the cosine between
its feature (the head's input) and its class's weight vector, the entropy of its prediction,
its class prior, its class's mean loss over the last epoch, its class's weight norm, and its
loss and margin relative to its class's last-epoch means.

``g`` is learnt online by meta-learning, every ``meta_every`` steps:

1. a *virtual* step of the trainable tensors on the perturbed loss,
   ``theta' = theta - virtual_lr * grad / rms(grad)`` of ``CE(f(x; theta) + delta, y)`` (one
   SGD step, scaled per tensor to the size of an Adam step, the rms a constant), kept
   differentiable in ``g``'s parameters and evaluated with :func:`torch.func.functional_call`
   (no copy of the model; the real tensors are never written);
2. the *meta loss* of ``theta'`` on a small meta batch drawn group-balanced (given groups, else
   class x correctly/incorrectly classified by the original model) from the repair set's
   training part, made causal with foreground masks: *factual* images (the object pasted onto
   the background of an image of another class, label kept; cross-entropy) and
   *counterfactual* images (the object infilled, only the background left; the target is
   "not y": ``-log(1 - p_y)``); its gradient updates ``g`` (Adam);
3. the *real* update of the model on ``CE(f(x) + delta.detach(), y)`` (``delta`` from the
   updated ``g``) plus ``saliency_weight`` times the saliency penalty, through the shared loop
   (:func:`repair.modelrepair.finetune.train`: optimiser, schedule, clipping, early stopping on the
   held-out criterion with the best state kept, AMP, ``--budget``, and a progress bar with the
   loss, the meta loss, the mean |delta| and the held-out criterion).
4. **Settling** (``settle``, shared with mixft and recompose:
   :func:`repair.modelrepair.finetune.settle_by`): the kept weights are interpolated with the
   original ones (``settle_alphas``, WiSE-FT; 0, 0.5 and 1 here, alpha 0 being the original
   body) and every point gets a group-balanced head refitted on its body (``settle: either``
   also scores each moved body's own head); the best on the held-out part is the result
   (``settle: off`` keeps the early-stopped weights as they are).

``g`` is made once and lives for the whole run; its last layer starts at zero, so training
starts as plain fine-tuning and departs from it only as far as the meta loss asks. Its
offsets are centred within each label of the batch: they re-weight and re-margin samples
relative to others of their class but cannot shift a whole class, which the model would
learn as a logit bias and carry, reversed, to test time (measured uncentred on mnist_color:
``g`` drifted to +1.5 on one class within 50 steps and the held-out accuracy of that class
fell from 78% to 23%).

**Saliency penalty** (``saliency_weight``, off by default): the share of the input-gradient
energy of each sample's logit margin (``z_y - logsumexp_{c != y} z_c``) that falls on the
background (``1 - mask``), averaged over ``saliency_batch`` samples of each batch: in [0, 1],
scale-free, and exactly zero when the mask covers the whole image. It is not part of the
virtual step (it does not depend on ``g``). Off by default because it did not help on the
benchmark's image tasks even with their true masks (demo, last two blocks: 73.6% test
worst-group accuracy with it at weight 10 against 76.4% without; mnist_color: 50.5% against
80.3%) and its double backward costs several forward passes per sample.

**Causal knowledge (masks)**: foreground masks from ``--masks DIR`` (:mod:`repair.modelrepair.masks`; with
``--train`` the masks of both sets are found relative to the common parent folder of the two
data folders) when given; otherwise from the model's own attribution: Grad-CAM
(:mod:`repair.modelrepair.attribution`, written here rather than taken from captum: no extra dependency,
one forward and backward per batch, and smooth object-level maps that can be thresholded into
a mask, where raw input gradients are pixel noise) of the original model for each image's
label, on the finest map with at least 1/8 of the input side (the last maps of small inputs
are 2x2 or 1x1), thresholded at ``mask_quantile``. Those masks are poor on a shortcut model,
which attributes to the shortcut: measured on the benchmark's models, the map puts 0.20-0.26
of its mass on the object (0.11-0.15 by chance), 0.10-0.11 at the last map. The meta data
still come out group-balanced, and the diagnostics say where the masks came from; give
``--masks`` whenever they exist.

**Text models are refused** (registered for images only). The token-level counterpart --
attribution over tokens, counterfactuals with the attributed tokens masked and target "not y"
-- marks as causal the tokens a shortcut model leans on: on the benchmark's SST-2 negation
model, gradient x input puts 14.8% of its mass on negation words that are 6.8% of the tokens,
and the top-attributed token is a negation word in 39% of the sentences that have one, so
those counterfactuals would teach the shortcut rather than remove it.

**Data**: with ``--train`` the loop trains on that data (``sampling: uniform`` as in the
paper, the perturbations doing the re-weighting; ``balanced``: class x given groups when the
data has the ``--group-by`` column, else classes) and meta-learns on the repair set; without
it, the repair set's training part is both the training and the meta data (the diagnostics
say so). Either way a seeded share of the repair set (``holdout_fraction``) is held out for
early stopping.

**Ablation**: ``meta: false, saliency_weight: 0`` is the same loop on the same data without
the perturbation network and the saliency term -- plain fine-tuning; as a recipe::

    name: clp-ablation
    candidates:
      - method: clp
        params: {meta: false, saliency_weight: 0}

The authors' released script re-creates ``g`` (and a model copy) every batch, computes the
saliency term from an input gradient it never asks for, under ``no_grad``, refers to
undefined names, and its ``g`` emits one number per sample added to every logit (which
cross-entropy ignores); here ``g`` persists, emits one offset per class (bounded by
``perturbation_scale``), and the saliency term is differentiable.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import above, setting
from ..errors import BadInput
from ..modelrepair.finetune import (MAX_BATCH, SETTLE_ALPHAS_WITH_ORIGINAL, TRAIN, LoopConfig, Session, SettleSettings, draw_batch,
                                    settle_alphas_setting, settle_by, train)
from ..modelrepair.masks import MASKS
from ..selection import SELECTION_NAMES
from ..modelrepair.trainable import AUGMENTATIONS, check_scope
from . import ModelRepairInputs, ModelRepairOutput, register_model_repair

N_CHARACTERISTICS = 10
CHARACTERISTICS = ("loss", "margin", "one_minus_softmax_norm", "feature_class_cosine", "entropy", "class_prior",
                   "class_last_epoch_loss", "class_weight_norm", "relative_loss", "relative_margin")


#: samples of each batch the saliency term is computed on (its default)
SALIENCY_BATCH = 8


@dataclass
class ClpConfig(LoopConfig, SettleSettings):
    lr: float = setting(1e-3, gt=0)
    epochs: float = setting(6.0, gt=0, doc="epochs over the training data (a steps or epochs --budget overrides)")
    scope: str = setting("last:2", doc="head | all | last:N | names:REGEX")
    patience: int = setting(0, ge=0, doc="evaluations without improvement before stopping; 0 = run the budget "
                                         "(the best evaluated state is kept either way)")
    holdout_fraction: float = setting(0.25, gt=0, lt=1, doc="share of the repair set held out for early stopping")
    sampling: str = setting("uniform", choices=("balanced", "uniform"), doc="training batches")
    augment: str = setting("flip_crop", choices=AUGMENTATIONS)
    selection: str = setting("auto", choices=SELECTION_NAMES)
    meta: bool = setting(True, doc="learn the perturbation network (false: no perturbation, no meta step)")
    saliency_weight: float = setting(0.0, ge=0, doc="weight of the background input-gradient share; 0 = off")
    saliency_batch: int = setting(SALIENCY_BATCH, ge=0, le=MAX_BATCH, doc="samples of each batch the saliency term is computed on; 0 = all")
    masks: str = setting("auto", choices=("auto", "given", "attribution"),
                         doc="auto: --masks when given, else the model's Grad-CAM")
    mask_quantile: float = setting(0.7, gt=0, lt=1, doc="attribution masks: the pixels above this quantile",
                                   only_if={"masks": ("auto", "attribution")})
    meta_batch_size: int = setting(32, ge=2, le=MAX_BATCH, only_if={"meta": (True,)})
    meta_every: int = setting(1, ge=1, le=1_000_000, doc="a meta step every N training steps", only_if={"meta": (True,)})
    meta_lr: float = setting(1e-3, gt=0, doc="Adam learning rate of the perturbation network", only_if={"meta": (True,)})
    meta_weight_decay: float = setting(1e-4, ge=0, only_if={"meta": (True,)})
    virtual_lr: float = setting(1e-3, gt=0, doc="size of the virtual step: each tensor moves by this RMS", only_if={"meta": (True,)})
    hidden_size: int = setting(100, ge=1, le=65536, only_if={"meta": (True,)})
    num_layers: int = setting(2, ge=1, le=64, only_if={"meta": (True,)})
    perturbation_scale: float = setting(2.0, gt=0, doc="bound on each logit offset", only_if={"meta": (True,)})
    factual: bool = setting(True, doc="meta images: object pasted on another class's background",
                            only_if={"meta": (True,)})
    counterfactual_weight: float = setting(1.0, ge=0, doc="weight of the 'not y' loss on object-less meta images",
                                           only_if={"meta": (True,)})
    infill: str = setting("mean", choices=("mean", "shuffle"), doc="how the object is removed",
                          only_if={"meta": (True,), "counterfactual_weight": above(0)})
    settle_alphas: tuple = settle_alphas_setting(SETTLE_ALPHAS_WITH_ORIGINAL)

    def validate(self):
        check_scope(self.scope)
        if self.batch_size < 2:
            raise ValueError("setting 'batch_size': the perturbation network normalises over a batch; use >= 2")
        if self.saliency_weight == 0 and self.saliency_batch != SALIENCY_BATCH:
            raise ValueError("setting 'saliency_batch': has no effect with saliency_weight: 0 (the saliency term "
                             "is off); leave it out or give saliency_weight")


class PerturbationNet(nn.Module):
    """g: characteristics (N, 10) -> logit offsets (N, C) in [-scale, scale]. The inputs are
    batch-normalised (their scales differ by orders of magnitude); the output layer starts
    at zero (no perturbation)."""

    def __init__(self, num_classes: int, hidden: int = 100, layers: int = 2, scale: float = 2.0):
        super().__init__()
        self.scale = float(scale)
        self.norm = nn.BatchNorm1d(N_CHARACTERISTICS)
        dims = [N_CHARACTERISTICS] + [hidden] * layers
        self.body = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.out = nn.Linear(hidden, num_classes)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(self.out(self.body(self.norm(c))))


def centre_by_label(delta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``delta`` minus the mean of ``delta`` over the samples of the same label in the batch."""
    C = delta.shape[1]
    sums = torch.zeros(C, C, device=delta.device, dtype=delta.dtype).index_add(0, y, delta)
    counts = torch.bincount(y, minlength=C).clamp_min(1).to(delta.dtype)
    return delta - (sums / counts[:, None])[y]


def characteristics(feat: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, W: torch.Tensor,
                    prior: torch.Tensor, class_loss: torch.Tensor, class_margin: torch.Tensor) -> torch.Tensor:
    """(N, 10) detached training characteristics (:data:`CHARACTERISTICS`, in order)."""
    with torch.no_grad():
        feat, logits, W = feat.float(), logits.float(), W.float()
        logp = F.log_softmax(logits, 1)
        p = logp.exp()
        loss = -logp.gather(1, y[:, None]).squeeze(1)
        margin = p.gather(1, y[:, None]).squeeze(1) - p.scatter(1, y[:, None], -1.0).amax(1)
        Wy = W[y]
        cols = [loss, margin, (1 - p).norm(dim=1), F.cosine_similarity(feat, Wy, dim=1),
                -(p * logp).sum(1), prior[y], class_loss[y], Wy.norm(dim=1),
                loss - class_loss[y], margin - class_margin[y]]
        return torch.stack(cols, 1)


def saliency_share(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the share of each sample's input-gradient energy (of its logit
    margin) on the background ``1 - mask``; differentiable (``x`` must require grad and
    ``logits`` depend on it). Zero when the mask covers the whole image."""
    others = logits.float().scatter(1, y[:, None], float("-inf"))
    margin = logits.float().gather(1, y[:, None]).squeeze(1) - torch.logsumexp(others, 1)
    gx, = torch.autograd.grad(margin.sum(), x, create_graph=True)
    energy = gx.float().pow(2).sum(1, keepdim=True)
    total = energy.flatten(1).sum(1)
    background = (energy * (1 - mask)).flatten(1).sum(1)
    return (background / (total + 1e-12 + 1e-6 * total.detach().mean())).mean()


def remove_object(x: torch.Tensor, mask: torch.Tensor, how: str, generator: torch.Generator) -> torch.Tensor:
    """Counterfactual images: the object (``mask``) replaced by the image's mean background
    colour (``mean``) or by its own pixels shuffled (``shuffle``)."""
    if how == "shuffle":
        n, c, h, w = x.shape
        perm = torch.randperm(h * w, generator=generator).to(x.device)
        fill = x.flatten(2)[:, :, perm].view_as(x)
    else:
        bg = 1 - mask
        fill = ((x * bg).sum((2, 3), keepdim=True) / bg.sum((2, 3), keepdim=True).clamp_min(1.0)).expand_as(x)
    return x * (1 - mask) + fill * mask


def swap_background(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Factual images: each object pasted onto the background of another image of the batch
    (of another class when the batch has one; that image's own object infilled)."""
    n = x.shape[0]
    if n < 2:
        return x
    yc = y.cpu()
    allowed = yc[None, :] != yc[:, None]
    alone = ~allowed.any(1)                       # a row whose class fills the batch: any other image
    allowed[alone] = ~torch.eye(n, dtype=torch.bool)[alone]
    partner = torch.multinomial(allowed.float(), 1, generator=generator).squeeze(1).to(x.device)
    backgrounds = remove_object(x, mask, "mean", generator)[partner]
    return x * mask + backgrounds * (1 - mask)


class _ClassStats:
    """Per-class mean loss and margin of the last epoch (during the first epoch: of the steps
    so far)."""

    def __init__(self, num_classes: int, steps_per_epoch: int):
        self.every = max(1, steps_per_epoch)
        self.sums = torch.zeros(2, num_classes, dtype=torch.float32)
        self.counts = torch.zeros(num_classes, dtype=torch.float32)
        self.last: Optional[torch.Tensor] = None

    def means(self) -> torch.Tensor:
        """(2, C): mean loss and mean margin per class."""
        return self.sums / self.counts.clamp_min(1) if self.last is None else self.last

    def add(self, i: int, y: torch.Tensor, loss: torch.Tensor, margin: torch.Tensor) -> None:
        y = y.cpu()
        self.sums[0].index_add_(0, y, loss.cpu())
        self.sums[1].index_add_(0, y, margin.cpu())
        self.counts.index_add_(0, y, torch.ones_like(loss.cpu()))
        if (i + 1) % self.every == 0:
            now = self.sums / self.counts.clamp_min(1)
            self.last = now if self.last is None else torch.where(self.counts > 0, now, self.last)
            self.sums.zero_()
            self.counts.zero_()


@dataclass
class _Pool:
    """Images a loop draws from: encoded inputs, labels, masks, and the rows it may use."""
    x: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor
    groups: Optional[torch.Tensor]          # one id per row of ``rows`` (balanced sampling), or None
    masks: Optional[torch.Tensor] = None

    def draw(self, n: int, balanced: bool, generator: torch.Generator) -> torch.Tensor:
        return draw_batch(self.rows, self.groups if balanced else None, n, generator)


class ClpRun:
    """One CLP repair in progress (see the module docstring): the session, the pools, the
    perturbation network ``g`` and its optimiser, and :meth:`step` for the shared loop."""

    def __init__(self, inputs: ModelRepairInputs, cfg: ClpConfig):
        if inputs.model.modality != "image":
            raise BadInput("clp repairs image models only (see repair/methods/clp.py: token attribution "
                           "marks a text model's shortcut words as causal)")
        self.inputs, self.cfg = inputs, cfg
        self.sess = sess = Session(inputs, holdout_fraction=cfg.holdout_fraction, selection=cfg.selection)
        self.tm = tm = sess.model
        self.dev = sess.device
        tm.module.to(self.dev)            # before the masks: Grad-CAM runs the model on the session's device
        self.names = tm.select(cfg.scope)
        C = inputs.num_classes
        train_set = inputs.resources.get("train")
        meta_groups = sess.groups[sess.train_idx]
        self.meta_pool = _Pool(sess.encoded, sess.y, sess.train_idx, meta_groups)
        if train_set is not None:
            ty = train_set.y.long().cpu()
            tg = train_set.groups.long().cpu() if (train_set.groups is not None and inputs.groups is not None) else ty
            self.train_pool = _Pool(tm.encode(train_set.items), ty, torch.arange(ty.numel()), tg)
            self.data_note = (f"trained on --train ({ty.numel()} samples); meta data: the repair set's training "
                              f"part ({sess.train_idx.numel()} samples)")
        else:
            self.train_pool = self.meta_pool
            self.data_note = (f"no --train: the repair set's training part ({sess.train_idx.numel()} samples) is "
                              "both the training and the meta data")
        self.mask_note = self._load_masks(train_set)
        self.prior = torch.bincount(self.train_pool.y[self.train_pool.rows], minlength=C).float()
        self.prior = self.prior / self.prior.sum()
        self.steps_per_epoch = max(1, math.ceil(self.train_pool.rows.numel() / cfg.batch_size))
        self.stats = _ClassStats(C, self.steps_per_epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(inputs.seed))
            self.g = PerturbationNet(C, cfg.hidden_size, cfg.num_layers, cfg.perturbation_scale).to(self.dev)
        self.g_opt = torch.optim.Adam(self.g.parameters(), lr=cfg.meta_lr, weight_decay=cfg.meta_weight_decay)
        self.meta_steps = 0

    # ------------------------------------------------------------------ masks
    def _needs_masks(self) -> bool:
        c = self.cfg
        return c.saliency_weight > 0 or (c.meta and (c.factual or c.counterfactual_weight > 0))

    def _load_masks(self, train_set) -> dict:
        if not self._needs_masks():
            return {"source": "none (not used)"}
        given = self.inputs.resources.get("masks")
        source = self.cfg.masks
        if source == "auto":
            source = "given" if given is not None else "attribution"
        if source == "given":                  # object_masks says so when --masks is missing
            from ..modelrepair.masks import mask_files, mask_sets

            root = Path(self.inputs.resources.get("data_root") or Path(self.inputs.items[0]).parent)
            # where each image's mask is: the one rule the check at the start applies too (mask_sets); an
            # image of either set never takes a mask the other set's image takes
            sets = mask_sets(self.inputs.items, root, None if train_set is None else train_set.items,
                             None if train_set is None else train_set.source)
            found = mask_files(Path(given), sets) if given is not None else []
            if train_set is not None:
                self.train_pool.masks = self._masks("given", self.train_pool, train_set.items, sets[0][1])
            self.meta_pool.masks = self._masks("given", self.meta_pool, self.inputs.items, sets[-1][1])
            # no machine path in what the model records (its provenance is the same for the same
            # inputs in another folder): the masks by how many were read
            return {"source": "given (--masks)", "mask_files": int(sum(len(f) for f in found)),
                    "foreground_share": round(float(self.meta_pool.masks.mean()), 4)}
        side = self._min_side()
        for pool in {id(p): p for p in (self.meta_pool, self.train_pool)}.values():
            pool.masks = self._masks("attribution", pool, None, None)
        return {"source": "model attribution (Grad-CAM of the original model, target = label)",
                "map_side": side, "quantile": self.cfg.mask_quantile,
                "foreground_share": round(float(self.meta_pool.masks.mean()), 4)}

    def _min_side(self) -> int:
        # the finest Grad-CAM map with at least 1/8 of the input side (small inputs' last maps are 2x2)
        return max(2, self.meta_pool.x.shape[-1] // 8)

    def _masks(self, source: str, pool: _Pool, items, root) -> torch.Tensor:
        """The masks of ``pool`` from the shared mask sources (:func:`repair.modelrepair.masks.object_masks`)."""
        from ..modelrepair.masks import object_masks

        res = {"masks": self.inputs.resources.get("masks"), "data_root": root}
        m, _ = object_masks(source, self.tm, items, pool.x, pool.y, res, None, [], self.dev, self.cfg.mask_quantile,
                            min_side=self._min_side(), who="clp")
        return m

    # ------------------------------------------------------------------ one step
    def _batch(self, pool: _Pool, n: int, balanced: bool, gen: torch.Generator):
        idx = pool.draw(n, balanced, gen)
        x = pool.x[idx]
        m = pool.masks[idx] if pool.masks is not None else None
        if self.cfg.augment != "none":
            if m is None:
                x = self.tm.augment(x, self.cfg.augment, gen)
            else:
                xm = self.tm.augment(torch.cat([x, m], 1), self.cfg.augment, gen)
                x, m = xm[:, :-1], xm[:, -1:]
        return x.to(self.dev), pool.y[idx].to(self.dev), (None if m is None else m.to(self.dev))

    def perturbation(self, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """g's logit offsets for a batch, centred within each label (see the module docstring)."""
        return centre_by_label(self.g(c), y)

    def params(self) -> dict:
        named = dict(self.tm.module.named_parameters())
        return {n: named[n] for n in self.names}

    def virtual_step(self, z: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> dict:
        """theta' = theta - virtual_lr * grad / rms(grad) per tensor (the rms a constant) of the
        perturbed loss CE(z + g(c), y): differentiable in g, the real tensors untouched. ``z``:
        the real model's logits on the training batch (with graph). The per-tensor scaling gives
        the virtual step the size of an Adam step whatever the model's gradient scale (a plain
        SGD step of a fixed rate overshoots on some networks and vanishes on others)."""
        params = self.params()
        loss = F.cross_entropy(z.float() + self.perturbation(c, y), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, retain_graph=True,
                                    allow_unused=True)
        lr = self.cfg.virtual_lr
        return {n: p if gr is None else p - lr * gr / (gr.detach().pow(2).mean().sqrt() + 1e-12)
                for (n, p), gr in zip(params.items(), grads)}

    def meta_loss(self, virtual: dict, gen: torch.Generator) -> torch.Tensor:
        """The loss of the virtually updated model on a group-balanced meta batch (factual
        images: CE; counterfactual images: -log(1 - p_y))."""
        from torch.func import functional_call

        cfg = self.cfg
        x, y, m = self._batch(self.meta_pool, cfg.meta_batch_size, True, gen)
        parts = [swap_background(x, m, y, gen) if (cfg.factual and m is not None) else x]
        n_cf = cfg.meta_batch_size // 2 if (cfg.counterfactual_weight > 0 and m is not None) else 0
        if n_cf:
            parts.append(remove_object(x[:n_cf], m[:n_cf], cfg.infill, gen))
        logits = functional_call(self.tm.module, virtual, (torch.cat(parts),)).float()
        loss = F.cross_entropy(logits[:x.shape[0]], y)
        if n_cf:
            p_y = F.softmax(logits[x.shape[0]:], 1).gather(1, y[:n_cf, None]).squeeze(1)
            loss = loss + cfg.counterfactual_weight * -torch.log1p(-p_y.clamp(max=1 - 1e-6)).mean()
        return loss

    def step(self, i: int, gen: torch.Generator) -> dict:
        cfg = self.cfg
        x, y, m = self._batch(self.train_pool, cfg.batch_size, cfg.sampling == "balanced", gen)
        feat, z = self.tm.features_and_logits(x)
        out: dict = {}
        delta = None
        if cfg.meta:
            c = characteristics(feat, z, y, self.tm.head.weight, self.prior.to(z.device),
                                *[t.to(z.device) for t in self.stats.means()])
            self.stats.add(i, y, c[:, 0], c[:, 1])
            if i % cfg.meta_every == 0:
                meta = self.meta_loss(self.virtual_step(z, c, y), gen)
                grads = torch.autograd.grad(meta, list(self.g.parameters()))
                for p, gr in zip(self.g.parameters(), grads):
                    p.grad = gr
                self.g_opt.step()
                self.g_opt.zero_grad(set_to_none=True)
                self.meta_steps += 1
                out["meta"] = float(meta.detach())
            with torch.no_grad():
                delta = self.perturbation(c, y)
            out["delta"] = float(delta.abs().mean())
        loss = F.cross_entropy(z.float() + (0 if delta is None else delta), y)
        if cfg.saliency_weight > 0 and m is not None:
            k = cfg.saliency_batch or x.shape[0]     # the double backward costs ~10 forwards per sample
            xs = x[:k].detach().requires_grad_(True)
            s = saliency_share(self.tm.logits(xs), y[:k], xs, m[:k])
            loss = loss + cfg.saliency_weight * s
            out["sal"] = float(s.detach())
        out["loss"] = loss
        return out


@contextlib.contextmanager
def twice_differentiable(cfg: "ClpConfig"):
    """clp's training differentiates the network twice (the meta step's virtual update, the saliency
    penalty's input gradient): attention runs by torch's math kernel meanwhile (the fused ones have no
    double backward; clp on a timm ViT was an internal error), and an operator torch cannot differentiate
    twice is exit 2 naming it with the setting that reaches it (MobileNetV3's hard sigmoid: within
    ``scope: all`` for the meta step, anywhere for the saliency penalty)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except (RuntimeError, NotImplementedError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "derivative for" not in msg or "not implemented" not in msg:
            raise
        op = msg.split("derivative for", 1)[1].split(" is not implemented")[0].strip()
        if cfg.saliency_weight > 0:
            how = ("its saliency penalty differentiates the input gradient through the whole network, whatever "
                   "the scope: give saliency_weight: 0, or another recipe")
        else:
            how = (f"its meta step reaches it within scope {cfg.scope!r}: give a scope that leaves those layers "
                   "out (the default, last:2), meta: false, or another recipe")
        raise BadInput(f"clp differentiates the network twice and torch has no second derivative of {op}, which "
                       f"this model runs; {how}") from None


@register_model_repair("clp", summary="retraining with Causal Logit Perturbation (Zhou et al. 2025): a meta-learnt "
                                     "per-sample logit perturbation, a background saliency penalty and "
                                     "counterfactual/factual meta data from foreground masks (--masks, else Grad-CAM)",
                       config=ClpConfig, groups="optional", modalities=("image",),
                       resources=(TRAIN, MASKS))
def clp(inputs: ModelRepairInputs, config: ClpConfig) -> ModelRepairOutput:
    cfg = config
    run = ClpRun(inputs, cfg)
    tm = run.tm
    before = tm.state()
    with tm.training(run.names, freeze_bn=cfg.freeze_bn) as params, twice_differentiable(cfg):
        res = train(params, run.step, run.sess.evaluator(cfg), cfg, steps_per_epoch=run.steps_per_epoch,
                    budget=inputs.budget, seed=inputs.seed, device=run.dev, progress=inputs.progress, desc="clp",
                    buffers=tm.running_stats(cfg.freeze_bn), criterion=run.sess.criterion)
    settled = settle_by(cfg, run.sess, before)
    changed = tm.changed(before)
    return ModelRepairOutput(tensors=changed, steps=res.steps, diagnostics={
        "scope": cfg.scope, "trainable_tensors": len(run.names), "data": run.data_note, "masks": run.mask_note,
        "warnings": tm.scope_notes(cfg.scope, "clp"),
        "meta": cfg.meta, "meta_steps": run.meta_steps, "saliency_weight": cfg.saliency_weight,
        "characteristics": list(CHARACTERISTICS), "settle": settled, "session": run.sess.describe(),
        "loop": res.describe()})
