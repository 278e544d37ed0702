"""Counterfactual recomposition (after "Leveraging Text-to-Image Generation for Handling Spurious
Correlation", Yazdan Parast, Azam & Akhtar 2025; no code was released): put each class's object
with the attributes of the other classes, prune what does not show the object, retrain.

1. **Where the object is**: a mask per training image (:func:`repair.modelrepair.masks.object_masks`:
   ``--masks``, a local CLIPSeg ``--segmenter``, the classifier's Grad-CAM, or the weight-free
   boundary prior ``contrast`` -- the default without masks or a segmenter: a shortcut model's own
   Grad-CAM points at the shortcut (demo, seed 0: test WGA 68.4 with Grad-CAM masks, 80.0 with
   contrast masks)).
2. **Generate** (:mod:`repair.modelrepair.generation`, ``--generator composite|diffusers``): every image of the
   training part is the source of ``per_image`` new images, its object on a background taken from
   another class's image -- one whose attribute value differs from the source's when group labels
   are given (``"class|col=value"``), so the new images are the class x attribute combinations the
   data lacks. Sources and backgrounds come only from the training part of the real repair data.
3. **Prune** by the paper's two criteria, on the *original* classifier: keep a generated image only
   when its probability of the intended class is >= ``min_probability`` (tau) and the share of its
   Grad-CAM inside the object's mask is >= ``min_attribution`` (rho). A threshold of 0 keeps
   everything; a threshold of 1 keeps nothing. Kept counts are reported per class and background.
4. **Retrain** with the shared loop (:func:`repair.modelrepair.finetune.train`): each batch is group-balanced real
   training images plus a ``synthetic_fraction`` of kept generated images (balanced over intended
   class x background), early-stopped and selected on the held-out part of the *real* repair data
   (:class:`repair.modelrepair.finetune.Session`), never on generated images; then settled
   (``settle``: interpolation with the original weights and a refitted head, the best on the same
   held-out part, :func:`repair.modelrepair.finetune.settle_by`).
5. The generated images, their object masks, ``manifest.json`` (source, mask, background source,
   prompt, scores, kept or not, for every generated file) and ``contact_sheet.png`` are written to the
   workdir and returned as the repair's artifacts (kept beside the output).

Config: every :class:`repair.methods.finetune.FinetuneConfig` setting, plus the generation and
pruning settings below.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import setting
from ..modelrepair.finetune import (SETTLE_ALPHAS_WITH_ORIGINAL, Session, SettleSettings, draw_batch,
                                    settle_alphas_setting, settle_by, train)
from ..modelrepair.generation import (GENERATOR, GENERATOR_MODEL, GENERATORS, PROMPTS, contact_sheet, load_prompts,
                                      make_generator, save_png)
from ..modelrepair.masks import MASK_SOURCES, MASKS, SEGMENTER, object_masks
from ..modelrepair.pixels import to_model, to_pixels
from . import ModelRepairInputs, ModelRepairOutput, register_model_repair
from .finetune import FinetuneConfig


@dataclass
class RecomposeConfig(FinetuneConfig, SettleSettings):
    epochs: float = setting(6.0, gt=0, doc="epochs over the training part and the kept images (a steps or epochs --budget overrides)")
    lr: float = setting(1e-3, gt=0)
    generator: str = setting("composite", choices=GENERATORS, doc="--generator overrides it")
    masks: str = setting("auto", choices=MASK_SOURCES,
                         doc="where the object is: auto (--masks, else --segmenter, else contrast) | given | "
                             "segmenter | attribution (Grad-CAM) | contrast (weight-free boundary prior)")
    mask_quantile: float = setting(0.7, gt=0, lt=1, doc="attribution masks: the top (1 - q) of each map",
                                   only_if={"masks": ("attribution",)})
    per_image: int = setting(1, ge=1, le=1000, doc="generated images per training image")
    max_images: int = setting(0, ge=0, le=10_000_000, doc="at most this many generated images (a seeded random subset); 0 = no cap")
    mask_area: tuple = setting((0.005, 0.6), ge=0, le=1,
                               doc="images whose object mask covers a share of the image outside [low, high] "
                                   "(object not found, or everything) are used neither as sources nor as backgrounds")
    min_probability: float = setting(0.2, ge=0, le=1, doc="tau: keep when p(intended class) >= tau (1 keeps none)")
    min_attribution: float = setting(0.05, ge=0, le=1,
                                     doc="rho: keep when the Grad-CAM share inside the object mask >= rho (1 keeps none)")
    synthetic_fraction: float = setting(0.5, ge=0, lt=1, doc="share of each batch drawn from kept generated images")
    harmonize: float = setting(0.25, ge=0, le=1, doc="share of the background colour change applied to the object")
    # diffusers generator
    diffusion_steps: int = setting(25, ge=1, le=10_000)
    strength: float = setting(0.8, gt=0, le=1, doc="diffusers: how far the background is repainted")
    guidance: float = setting(7.5, ge=0)
    size: int = setting(0, ge=0, le=8192, doc="diffusers: generation size in pixels; 0 = the pipeline's own")
    inversion_steps: int = setting(0, ge=0, le=1_000_000, doc="diffusers: textual inversion steps per run; 0 = off")
    sheet: int = setting(48, ge=0, le=10_000, doc="generated images shown on the contact sheet")
    settle_alphas: tuple = settle_alphas_setting(SETTLE_ALPHAS_WITH_ORIGINAL)

    def validate(self):
        super().validate()
        if len(self.mask_area) != 2 or self.mask_area[0] >= self.mask_area[1]:
            raise ValueError(f"setting 'mask_area': must be [low, high] with low < high, got {list(self.mask_area)}")


def _background_key(group_values, g: int, class_names, y: int) -> str:
    """The attribute value of group ``g`` (``group_values``: each group id's), else the class name."""
    if group_values is not None:
        return str(group_values[g])
    return str(class_names[y])


def _plan(y: torch.Tensor, keys: list, usable: torch.Tensor, per_image: int, gen: torch.Generator,
          attr_known: bool):
    """(source positions, background positions): each usable position ``per_image`` times a
    source, its background a usable image of another class (and another attribute value when known)."""
    ok = torch.nonzero(usable).flatten().tolist() or list(range(y.numel()))
    yl = y.tolist()
    cache: dict = {}

    def candidates(i: int) -> list:
        key = (yl[i], keys[i])
        if key not in cache:
            c = [j for j in ok if yl[j] != yl[i] and (not attr_known or keys[j] != keys[i])]
            cache[key] = c or [j for j in ok if yl[j] != yl[i]]
        return cache[key] or [j for j in ok if j != i] or [i]

    src, bg = [], []
    for _ in range(per_image):
        for i in ok:
            cands = candidates(i)
            src.append(i)
            bg.append(cands[int(torch.randint(0, len(cands), (1,), generator=gen))])
    return torch.tensor(src, dtype=torch.long), torch.tensor(bg, dtype=torch.long)


def _passes(v: torch.Tensor, thr: float) -> torch.Tensor:
    return v >= thr if thr < 1 else torch.zeros_like(v, dtype=torch.bool)


@register_model_repair("recompose", summary="counterfactual recomposition: each class's object pasted (or inpainted) "
                                            "with other classes' backgrounds, pruned by the original model's "
                                            "probability and attribution, then fine-tuning on real + kept images",
                       config=RecomposeConfig, groups="optional", modalities=("image",),
                       resources=(MASKS, SEGMENTER, GENERATOR, GENERATOR_MODEL, PROMPTS))
def recompose(inputs: ModelRepairInputs, config: RecomposeConfig) -> ModelRepairOutput:
    cfg = config
    res = inputs.resources
    log = (lambda m: print(m, file=sys.stderr)) if inputs.progress else (lambda m: None)
    names = list(inputs.class_names) or [str(c) for c in range(inputs.num_classes)]
    group_values = res.get("group_values") if inputs.groups is not None else None
    if inputs.groups is not None and group_values is None and res.get("group_names") is not None:
        raise ValueError("resources give group_names without group_values (each group id's attribute value)")
    bg_keys = sorted({str(v) for v in group_values}) if group_values else []
    prompts = load_prompts(res.get("prompts"), names, bg_keys)          # checked before any work
    name = res.get("generator") or cfg.generator
    generator = make_generator(name, res, inputs.device, harmonize=cfg.harmonize, steps=cfg.diffusion_steps,
                               strength=cfg.strength, guidance=cfg.guidance, size=cfg.size,
                               negative=prompts.negative, log=lambda m: print(m, file=sys.stderr))
    sess = Session(inputs, holdout_fraction=cfg.holdout_fraction, selection=cfg.selection)
    tm = sess.model
    dev = sess.device
    tm.module.to(dev)
    dc = tm.adapter.data_config

    # ---- 1. where the object is (training part only)
    tr = sess.train_idx
    y_tr = sess.y[tr]
    keys = [_background_key(group_values, int(sess.groups[i]), names, int(sess.y[i])) for i in tr.tolist()]
    x_tr = sess.encoded[tr]
    t0 = time.perf_counter()
    masks, mask_source = object_masks(cfg.masks, tm, [inputs.items[i] for i in tr.tolist()], x_tr, y_tr, res,
                                      prompts, names, dev, quantile=cfg.mask_quantile, who="recompose")
    mask_seconds = time.perf_counter() - t0
    pix = to_pixels(x_tr, dc)

    # ---- 2. generate
    gen = torch.Generator().manual_seed(int(inputs.seed))
    area = masks.flatten(1).mean(1)
    usable = (area >= cfg.mask_area[0]) & (area <= cfg.mask_area[1])
    src, bg = _plan(y_tr, keys, usable, cfg.per_image, gen, group_values is not None)
    if cfg.max_images and src.numel() > cfg.max_images:
        pick = torch.randperm(src.numel(), generator=gen)[:cfg.max_images].sort().values
        src, bg = src[pick], bg[pick]
    texts = [prompts.text(names[int(y_tr[s])], keys[b]) for s, b in zip(src.tolist(), bg.tolist())]
    t0 = time.perf_counter()
    if cfg.inversion_steps and hasattr(generator, "invert"):
        objs = {prompts.object(names[c]): pix[y_tr == c] * masks[y_tr == c] for c in torch.unique(y_tr).tolist()}
        generator.invert(objs, cfg.inversion_steps, seed=inputs.seed)
    made, obj_masks = [], []
    for i in range(0, src.numel(), 64):
        s, b = src[i:i + 64], bg[i:i + 64]
        im, om = generator.generate(pix[s], masks[s], pix[b], masks[b], texts[i:i + 64], seed=inputs.seed + i)
        made.append(im)
        obj_masks.append(om)
    gen_pix = torch.cat(made) if made else torch.zeros(0, *pix.shape[1:], dtype=pix.dtype)
    gen_mask = torch.cat(obj_masks) if obj_masks else torch.zeros(0, 1, *pix.shape[-2:], dtype=torch.float32)
    gen_seconds = time.perf_counter() - t0
    target = y_tr[src]

    # ---- 3. prune on the original model
    t0 = time.perf_counter()
    from ..modelrepair.attribution import attribution_mass, attribution_maps

    gen_x = to_model(gen_pix, dc)
    logits = tm.predict(gen_x, torch.arange(gen_x.shape[0]), dev)
    prob = torch.softmax(logits, 1).gather(1, target.view(-1, 1)).flatten() if gen_x.shape[0] else torch.zeros(0, dtype=torch.float32)
    cams = attribution_maps(tm, gen_x, target, dev)
    mass = attribution_mass(cams, gen_mask) if gen_x.shape[0] else torch.zeros(0, dtype=torch.float32)
    del cams
    kept = _passes(prob, cfg.min_probability) & _passes(mass, cfg.min_attribution)
    score_seconds = time.perf_counter() - t0
    labels = [f"{names[int(target[k])]}|{keys[int(bg[k])]}" for k in range(target.numel())]
    counts = {lab: {"generated": n, "kept": 0} for lab, n in sorted(Counter(labels).items())}
    for lab, k in zip(labels, kept.tolist()):
        counts[lab]["kept"] += int(k)
    log(f"recompose: {target.numel()} images generated ({name}, masks from {mask_source}) in {gen_seconds:.1f}s, "
        f"{int(kept.sum())} kept (p >= {cfg.min_probability:g}, attribution >= {cfg.min_attribution:g})")

    # ---- 5. files
    artifacts = _write(inputs.workdir, inputs, tr, src, bg, gen_pix, gen_mask, pix, masks, target, keys, texts,
                       prob, mass, kept, names, mask_source, generator.describe(), cfg) if inputs.workdir else None

    # ---- 4. retrain on real + kept
    keep_idx = torch.nonzero(kept).flatten()
    n_real = sess.encoded.shape[0]
    pool = torch.cat([sess.encoded, gen_x[keep_idx]]) if keep_idx.numel() else sess.encoded
    y_pool = torch.cat([sess.y, target[keep_idx]])
    syn_keys = torch.tensor([sorted(counts).index(labels[k]) for k in keep_idx.tolist()], dtype=torch.long)
    n_syn = int(round(cfg.batch_size * cfg.synthetic_fraction)) if keep_idx.numel() else 0
    trainable = tm.select(cfg.scope)
    before = tm.state()

    def step(i: int, g: torch.Generator) -> torch.Tensor:
        idx = sess.batches(cfg.batch_size - n_syn, cfg.sampling == "balanced", g)
        if n_syn:
            syn = draw_batch(torch.arange(syn_keys.numel()), syn_keys if cfg.sampling == "balanced" else None, n_syn, g)
            idx = torch.cat([idx, n_real + syn])
        x = tm.augment(tm.batch(pool, idx, dev), cfg.augment, g)
        return F.cross_entropy(tm.logits(x), y_pool[idx].to(dev))

    spe = max(1, -(-(tr.numel() + keep_idx.numel()) // cfg.batch_size))
    with tm.training(trainable, freeze_bn=cfg.freeze_bn) as params:
        loop = train(params, step, sess.evaluator(cfg), cfg, steps_per_epoch=spe, budget=inputs.budget, seed=inputs.seed,
                     device=dev, progress=inputs.progress, desc="recompose",
                     buffers=tm.running_stats(cfg.freeze_bn), criterion=sess.criterion)
    settled = settle_by(cfg, sess, before)
    n_gen = int(target.numel())
    said = tm.scope_notes(cfg.scope, "recompose")    # what the user should hear: the run did less or other
    if not bool(usable.any()):
        said.append(f"recompose: no training image's mask covers {cfg.mask_area[0]:g}-{cfg.mask_area[1]:g} of it "
                    "(mask_area): every image was used as a source and as a background regardless")
    if not keep_idx.numel():
        said.append(f"recompose: none of the {n_gen} generated images passed the filters (p >= "
                    f"{cfg.min_probability:g}, attribution >= {cfg.min_attribution:g}): the network was "
                    "fine-tuned on the real images only")
    return ModelRepairOutput(
        tensors=tm.changed(before), steps=loop.steps, artifacts=artifacts,
        diagnostics={"scope": cfg.scope, "trainable_tensors": len(trainable), "settle": settled, "warnings": said,
                     "session": sess.describe(),
                     "generated_in_training": int(keep_idx.numel()), "generated_per_batch": n_syn,
                     "loop": loop.describe(), "generation": {
                         **generator.describe(), "mask_source": mask_source, "generated": n_gen,
                         "unusable_masks": int((~usable).sum()),
                         "kept": int(kept.sum()), "min_probability": cfg.min_probability,
                         "min_attribution": cfg.min_attribution, "per_class_background": counts,
                         "mask_seconds": round(mask_seconds, 3), "generation_seconds": round(gen_seconds, 3),
                         "scoring_seconds": round(score_seconds, 3),
                         "images_per_second": round(n_gen / gen_seconds, 2) if gen_seconds > 0 else None,
                         "mean_probability": round(float(prob.mean()), 4) if n_gen else None,
                         "mean_attribution": round(float(mass.mean()), 4) if n_gen else None}})


def _within(path, root: Path) -> str:
    """``path`` as the manifest names it: relative to the folder it was given in (the data, the masks), so
    that the same inputs in another folder give the same manifest (no machine path in an output); its
    file name when it lies elsewhere."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path(root).resolve()).as_posix()
    except (ValueError, OSError):
        return p.name


def _write(work: Path, inputs, tr, src, bg, gen_pix, gen_mask, pix, masks, target, keys, texts, prob, mass, kept,
           names, mask_source, gen_info, cfg) -> Path:
    """Generated images, their object masks, manifest.json and contact_sheet.png under ``work``."""
    from ..modelrepair.masks import mask_file

    work = Path(work)
    res = inputs.resources
    items = [inputs.items[i] for i in tr.tolist()]
    rows, sheet = [], []
    for k in range(gen_pix.shape[0]):
        s, b = int(src[k]), int(bg[k])
        f, m = f"images/{k:05d}.png", f"masks/{k:05d}.png"
        save_png(work / f, gen_pix[k])
        save_png(work / m, gen_mask[k])
        root = Path(res.get("data_root") or ".")
        given = (_within(mask_file(Path(res["masks"]), Path(items[s]), root), Path(res["masks"]))
                 if mask_source == "given" else None)
        rows.append({"file": f, "mask": m, "class": names[int(target[k])], "source": _within(items[s], root),
                     "source_mask": given or mask_source, "background": _within(items[b], root),
                     "background_attribute": keys[b], "prompt": texts[k],
                     "probability": round(float(prob[k]), 5), "attribution_mass": round(float(mass[k]), 5),
                     "kept": bool(kept[k])})
        if len(sheet) < cfg.sheet:
            sheet.append((pix[s], pix[b], gen_pix[k], bool(kept[k])))
    contact_sheet(work / "contact_sheet.png", sheet)
    (work / "manifest.json").write_text(json.dumps(
        {"generator": gen_info, "mask_source": mask_source, "min_probability": cfg.min_probability,
         "min_attribution": cfg.min_attribution, "generated": len(rows), "kept": int(kept.sum()),
         "images": rows}, indent=1))
    return work
