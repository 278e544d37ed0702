"""Plain fine-tuning, the simplest model repair (and the ablation baseline of the heavier ones).

The network's last blocks (``scope``, default the head and the last block before it)
are trained with cross-entropy on group-balanced batches of the repair data -- groups
given, or inferred as class x correctly/incorrectly classified by the original model --
with train-time augmentation for images, early-stopped on the held-out part by the
selection criterion (:class:`repair.modelrepair.finetune.Session`, :func:`repair.modelrepair.finetune.train`).
BatchNorm statistics stay frozen by default.

Config fields: every :class:`repair.modelrepair.finetune.LoopConfig` setting, plus ``scope``
(``head`` | ``all`` | ``last:N`` | ``names:REGEX``), ``holdout_fraction`` (share of the
repair data held out for early stopping), ``sampling`` (``balanced`` | ``uniform``),
``augment`` (images: ``none`` | ``flip`` | ``crop`` | ``flip_crop``) and ``selection``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import setting
from ..modelrepair.finetune import LoopConfig, Session, train
from ..selection import SELECTION_NAMES
from ..modelrepair.trainable import AUGMENTATIONS, check_scope
from . import ModelRepairInputs, ModelRepairOutput, register_model_repair


@dataclass
class FinetuneConfig(LoopConfig):
    scope: str = setting("last:1", doc="head | all | last:N | names:REGEX")
    holdout_fraction: float = setting(0.25, gt=0, lt=1)
    sampling: str = setting("balanced", choices=("balanced", "uniform"))
    augment: str = setting("flip_crop", choices=AUGMENTATIONS)
    selection: str = setting("auto", choices=SELECTION_NAMES)

    def validate(self):
        check_scope(self.scope)
        if self.stop_head == "refit":
            raise ValueError("setting 'stop_head': refit scores each state with the head settling refits, and "
                             "finetune does not settle (it ships the network's own head): leave it out")


@register_model_repair("finetune", summary="plain fine-tuning of the last blocks on group-balanced batches "
                                          "(given or inferred groups), early-stopped on the held-out criterion",
                       config=FinetuneConfig, groups="optional")
def finetune(inputs: ModelRepairInputs, config: FinetuneConfig) -> ModelRepairOutput:
    cfg = config
    sess = Session(inputs, holdout_fraction=cfg.holdout_fraction, selection=cfg.selection)
    tm = sess.model
    names = tm.select(cfg.scope)
    before = tm.state()
    dev = sess.device
    tm.module.to(dev)

    def step(i: int, gen: torch.Generator) -> torch.Tensor:
        idx = sess.batches(cfg.batch_size, cfg.sampling == "balanced", gen)
        x = tm.batch(sess.encoded, idx, dev)
        if not isinstance(x, dict):
            x = tm.augment(x, cfg.augment, gen)
        return F.cross_entropy(tm.logits(x), sess.y[idx].to(dev))

    with tm.training(names, freeze_bn=cfg.freeze_bn) as params:
        res = train(params, step, sess.evaluate, cfg, steps_per_epoch=sess.steps_per_epoch(cfg.batch_size),
                    budget=inputs.budget, seed=inputs.seed, device=dev, progress=inputs.progress,
                    desc="finetune", buffers=tm.running_stats(cfg.freeze_bn), criterion=sess.criterion)
    changed = tm.changed(before)
    return ModelRepairOutput(tensors=changed, steps=res.steps,
                             diagnostics={"scope": cfg.scope, "trainable_tensors": len(names),
                                          "warnings": tm.scope_notes(cfg.scope, "finetune"),
                                          "session": sess.describe(), "loop": res.describe()})
