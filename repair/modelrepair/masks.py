"""Where the object is: the mask sources model repairs share (CLP's factual/counterfactual images and
saliency penalty, counterfactual recomposition). One (N,1,H,W) mask in [0, 1] per image, from

- ``given``: the user's ``--masks`` folder (:func:`load_masks`, below);
- ``segmenter``: a local ``transformers`` CLIPSeg folder (``--segmenter``), prompted with each
  image's class phrase (language-guided segmentation, offline; :func:`clipseg_masks`);
- ``attribution``: the classifier's own Grad-CAM for the image's class, thresholded
  (:mod:`repair.modelrepair.attribution`; no weights needed). On a model that leans on the
  background this map often *is* the background: see ``contrast``;
- ``contrast``: a weight-free boundary prior: pixels whose (smoothed) colour is far from the colours
  on the image's border, cleaned by a morphological opening (:func:`contrast_masks`). Works for
  objects on a textured background that reaches the border (most shortcut benchmarks);
- ``auto``: ``given`` when ``--masks`` is there, else ``segmenter`` when ``--segmenter`` is there,
  else ``contrast``.

:func:`object_masks` picks the source by name.

**Given masks** (``--masks DIR``): a mask is a greyscale image (white = object) with the same file
name as its image, in the same relative place under ``DIR`` as the image under the repair data's
folder; a mask with the image's stem and a ``.png`` suffix is accepted too (JPEG images, PNG masks).
It must have the image's size: it then goes through exactly the geometric part of the model's own
preprocessing (resize, crop) so it lines up with the model's input.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import BadInput, no_warnings
from ..registry import Resource
from .attribution import attribution_maps, threshold_masks
from .pixels import _blur, _dilate, _erode, to_pixels

MASK_SOURCES = ("auto", "given", "segmenter", "attribution", "contrast")

#: the user inputs of the mask sources, declared by the model repairs that use them
MASKS = Resource("masks", kind="folder",
                 validate_data=lambda path, data, others: check_masks_for_data(path, data, others.get("train")),
                 help="Model repairs on images: a folder of foreground masks (white = object), one per image, at the "
                      "image's path under the data folder (or under the folder --data and --train share), or by "
                      "its file name; .png or the image's own extension.")


def check_segmenter_folder(folder: Path) -> None:
    """A local CLIPSeg folder that loads without running a pickle: only the folder's own files (no
    symlink out of it, no FIFO) and ``.safetensors`` weights. Checked when ``repair fix`` starts and
    again on loading (:func:`clipseg_masks`)."""
    from ..adapters.base import check_model_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput("--segmenter must be a local CLIPSeg folder (nothing is downloaded)", folder)
    check_model_folder(folder)
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        # a pickle (pytorch_model.bin) runs code when loaded: never unless the user asked
        raise BadInput("--segmenter: the folder has no .safetensors weights (pickle weights such as "
                       "pytorch_model.bin are not loaded: save the model with safe_serialization)", folder)


SEGMENTER = Resource("segmenter", kind="folder", validate=check_segmenter_folder,
                     help="Model repairs on images: a local transformers CLIPSeg folder for language-guided masks.")


def mask_file(mask_dir: Path, item: Path, data_root) -> Path:
    """Where the mask of image ``item`` must be: its path relative to ``data_root`` (a folder, or
    several tried in order: ``--data`` and ``--train`` together use their common folder first, then
    the item's own), then its file name alone, each as it is or as ``.png``; the first candidate
    that exists, else the first candidate."""
    item = Path(item)
    roots = [data_root] if isinstance(data_root, (str, Path)) else list(data_root)
    rels = []
    for root in roots:
        try:
            rel = item.resolve().relative_to(Path(root).resolve())
        except ValueError:
            continue
        if rel not in rels:
            rels.append(rel)
    rels.append(Path(item.name))
    cands = [c for rel in rels for c in (mask_dir / rel, (mask_dir / rel).with_suffix(".png"))]
    for c in cands:
        if c.is_file():
            return c
    return cands[0]


def mask_roots(own, other=None) -> tuple:
    """The folders the mask of an image of one set is looked up under (:func:`mask_file`), in order:
    ``own`` is the set's folder (a table: its folder), ``other`` the other set's when ``--data`` and
    ``--train`` are both given: then the folder both share first, then the set's own. The one rule of
    where a mask is, used by the check when the command starts (:func:`check_masks_for_data`) and by
    the model repairs that read the masks (clp, recompose)."""
    def folder(p) -> Path:
        p = Path(p)
        return p if p.is_dir() or not p.suffix else p.parent

    own = folder(own)
    if other is None:
        return (own,)
    common = Path(os.path.commonpath([own.resolve(), folder(other).resolve()]))
    return (common, own)


def mask_sets(data_items: Sequence, data_root, train_items: Optional[Sequence] = None, train_root=None) -> list:
    """The ``(items, roots)`` pairs of :func:`mask_files` for the repair set (``data_items`` under
    ``data_root``) and, with ``--train``, its set (``train_items`` under ``train_root``): train first,
    each set's roots by :func:`mask_roots`."""
    if train_items is None:
        return [(list(data_items), mask_roots(data_root))]
    return [(list(train_items), mask_roots(train_root, data_root)),
            (list(data_items), mask_roots(data_root, train_root))]


def mask_files(mask_dir: Path, sets: Sequence) -> list:
    """:func:`mask_file` of every image of ``sets`` (``(items, data_root)`` pairs: the repair set's
    images, ``--train``'s), one list per set; :class:`BadInput` naming the masks folder when two
    different images would take one mask (a flat folder and one file name in two folders, or
    ``--data`` and ``--train`` with the same path under each): neither silently gets the other's."""
    owner, out = {}, []
    for items, data_root in sets:
        files = []
        for item in items:
            mf = mask_file(Path(mask_dir), Path(item), data_root)
            if mf.resolve() == Path(item).resolve():      # --masks is the data folder (or holds the images)
                raise BadInput(f"the mask of image {Path(item).name} is the image itself: --masks must be a "
                               "folder of masks, not the data folder", mask_dir)
            first = owner.setdefault(mf, Path(item).resolve())
            if first != Path(item).resolve():
                raise BadInput(f"images {first} and {Path(item).resolve()} would both take the mask {mf.name}; "
                               "lay the masks folder out like the data folder", mask_dir)
            files.append(mf)
        out.append(files)
    return out


def _geometry(data_config: dict):
    """The resize/crop steps of the model's eval preprocessing (no tensor conversion or
    normalisation), as one callable on PIL images."""
    from timm.data import create_transform
    from torchvision import transforms as T

    full = create_transform(**data_config, is_training=False)
    steps = []
    for t in getattr(full, "transforms", [full]):
        name = type(t).__name__
        if name in ("ToTensor", "MaybeToTensor", "Normalize", "MaybePILToTensor"):
            break
        steps.append(t)
    return T.Compose(steps)


def load_masks(mask_dir, items: Sequence, data_root, data_config: dict,
               max_pixels: Optional[int] = None) -> torch.Tensor:
    """(N, 1, H, W) float masks in [0, 1] aligned with the model's input for ``items`` (image
    paths; ``data_root``: their folder, or the roots of :func:`mask_roots`). Masks (and their images,
    for their size) are opened as the repair data's images are (:func:`repair.data.open_regular`,
    :func:`repair.data._open_pil`: a regular file only, at most ``max_pixels`` pixels -- the data's
    ``--max-pixels``, by default :data:`repair.data.DEFAULT_MAX_PIXELS` -- also as the preprocessing
    resizes them, a supported mode) and read as greyscale as the images are converted
    (:func:`repair.data.to_grey`: a 16-bit or float mask by its depth). Missing masks, unreadable
    files, masks over the limit and size mismatches are :class:`BadInput` naming the file."""
    import numpy as np

    geom = _geometry(data_config)
    out = []
    for grey in _read_masks(mask_dir, [(items, data_root)], max_pixels, convert=True, data_config=data_config):
        arr = np.asarray(geom(grey), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr.copy()).unsqueeze(0))
    return torch.stack(out) if out else torch.zeros(0, 1, 1, 1)


def check_masks_for_data(mask_dir: Path, data, train=None) -> None:
    """``--masks`` against the repair set ``data`` (and ``train``, the ``--train`` data, when given: its
    images need masks too, and the masks of both are looked up under the folder they share first,
    :func:`mask_sets`, as the training reads them) when the command starts (the resource's
    ``validate_data``): every image has its mask, inside the folder, a regular file of the image's
    size (headers only: nothing is decoded), no two images take one mask -- what :func:`load_masks`
    refuses, before the embeddings and the training rather than when the masks are first used. Text
    data: nothing to check (the model repairs that read masks refuse text models themselves)."""
    if getattr(data, "modality", None) != "image":
        return
    if train is not None and getattr(train, "modality", None) != "image":
        train = None
    sets = mask_sets(data.items, Path(data.source), None if train is None else train.items,
                     None if train is None else Path(train.source))
    for _ in _read_masks(mask_dir, sets, getattr(data, "max_pixels", None), convert=False):
        pass


def _read_masks(mask_dir, sets: Sequence, max_pixels: Optional[int], convert: bool,
                data_config: Optional[dict] = None):
    """The one home of the mask checks (see :func:`load_masks`): yields each image's mask (``sets``:
    ``(items, roots)`` pairs as :func:`mask_files` takes them, set after set) as a greyscale PIL image
    (``convert``) or None once its file and size are checked."""
    from ..data import DEFAULT_MAX_PIXELS, _inside, _open_pil, _real, check_resized, open_regular, to_grey

    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise BadInput("--masks must be a folder of mask images", mask_dir)
    root_real = _real(mask_dir)
    found = mask_files(mask_dir, sets)
    for (items, _), files in zip(sets, found):
        for item, mf in zip(items, files):
            if not mf.is_file():
                raise BadInput(f"no mask for image {Path(item).name} (expected {mf})", mask_dir)
            if not _inside(root_real, _real(mf)):     # as a table's images: a link out of the folder is refused
                raise BadInput(f"mask {mf} is a symlink leading outside the --masks folder (to {_real(mf) or mf}); "
                               "copy the mask in", mask_dir)
            with open_regular(item) as f:             # its size only (the header): the data read it already
                with _open_pil(f, Path(item), max_pixels) as im:
                    size = im.size
            with open_regular(mf, "mask") as f:
                with _open_pil(f, mf, max_pixels) as m:
                    if m.size != size:
                        raise BadInput(f"mask is {m.size[0]}x{m.size[1]} but its image {Path(item).name} is "
                                       f"{size[0]}x{size[1]}", mf)
                    check_resized(m.size, data_config, max_pixels, mf)
                    if not convert:
                        grey = None
                    else:
                        try:
                            with no_warnings():
                                m.load()
                                grey = to_grey(m, mf)      # the images' one conversion (a deep mode by its depth)
                        except BadInput:
                            raise
                        except Exception as e:   # a truncated or corrupt body (PIL raises many types), as read_image
                            raise BadInput(f"unreadable mask ({type(e).__name__}: "
                                           f"{str(e).splitlines()[0] if str(e) else ''})", mf) from None
            yield grey


def contrast_masks(pix: torch.Tensor, border: int = 2, margin: float = 1.5, smooth: int = 3) -> torch.Tensor:
    """Boundary-prior object masks (see the module docstring): (N,1,H,W) in {0, 1}."""
    n, c, h, w = pix.shape
    s = _blur(pix, smooth)
    ring = torch.ones(1, 1, h, w, dtype=torch.bool, device=pix.device)
    b = max(1, min(border, h // 4, w // 4))
    ring[..., b:h - b, b:w - b] = False
    edge = s.permute(0, 2, 3, 1)[ring[0, 0].expand(n, h, w)].view(n, -1, c)     # (N, P, C) border colours
    med = edge.median(1).values.view(n, c, 1, 1)
    dist = (s - med).pow(2).sum(1, keepdim=True).sqrt()                         # (N,1,H,W)
    edge_d = dist.flatten(1)[:, ring.flatten()]
    thr = torch.quantile(edge_d, 0.95, dim=1).view(n, 1, 1, 1) * margin + 1e-3
    m = (dist > thr).float()
    r = 1 if min(h, w) >= 16 else 0
    return _dilate(_erode(m, r), r)                                             # opening: drop specks


def clipseg_masks(folder: Path, pix: torch.Tensor, phrases: Sequence[str], device, threshold: float = 0.4,
                  batch: int = 16) -> torch.Tensor:
    """Language-guided masks from a local CLIPSeg folder: sigmoid(logits) >= ``threshold`` (the
    top 30% of an image's pixels when nothing passes), resized to the images' size."""
    folder = Path(folder)
    check_segmenter_folder(folder)
    try:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        proc = CLIPSegProcessor.from_pretrained(str(folder), local_files_only=True)
        model = CLIPSegForImageSegmentation.from_pretrained(str(folder), local_files_only=True,
                                                            use_safetensors=True).eval().to(device)
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"cannot load a CLIPSeg model from this folder ({type(e).__name__})", folder) from None
    from PIL import Image

    out = []
    h, w = pix.shape[-2:]
    for i in range(0, pix.shape[0], batch):
        chunk = pix[i:i + batch]
        ims = [Image.fromarray((p.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")) for p in chunk]
        enc = proc(text=list(phrases[i:i + batch]), images=ims, return_tensors="pt", padding=True)
        with torch.no_grad():
            lg = model(**{k: v.to(device) for k, v in enc.items()}).logits
        lg = lg.view(len(ims), 1, *lg.shape[-2:]).float().cpu()
        prob = F.interpolate(torch.sigmoid(lg), size=(h, w), mode="bilinear", align_corners=False)
        m = (prob >= threshold).float()
        empty = m.flatten(1).sum(1) == 0
        if bool(empty.any()):
            q = torch.quantile(prob[empty].flatten(1), 0.7, dim=1).view(-1, 1, 1, 1)
            m[empty] = (prob[empty] > q).float()
        out.append(m)
    return torch.cat(out) if out else torch.zeros(0, 1, h, w)


def object_masks(source: str, tm, items: Sequence, x: torch.Tensor, y: torch.Tensor, resources: dict,
                 prompts, class_names: Sequence[str], device, quantile: float = 0.7, *,
                 min_side: Optional[int] = None, who: str = "") -> tuple[torch.Tensor, str]:
    """(masks (N,1,H,W) aligned with ``x``, the source used) for images ``items`` (their model
    inputs ``x``, classes ``y``); ``source`` one of :data:`MASK_SOURCES`. ``resources``: the model
    repair's inputs (``masks``, ``segmenter``, ``data_root``: the folder ``items`` are relative to);
    ``prompts`` (an object with ``object(class_name) -> phrase``) is used by the segmenter only;
    ``quantile`` and ``min_side`` shape the attribution masks (:func:`threshold_masks`,
    :func:`~repair.modelrepair.attribution.gradcam`); ``who`` prefixes errors (the method's name)."""
    pre = f"{who}: " if who else ""
    if source == "auto":
        # without masks or a segmenter: the weight-free boundary prior. The classifier's own Grad-CAM
        # (the paper's default) points at the shortcut on exactly the models this repairs -- measured on
        # the demo task, seed 0: test WGA 68.4 with Grad-CAM masks, 80.0 with contrast masks
        source = "given" if resources.get("masks") else ("segmenter" if resources.get("segmenter") else "contrast")
    if source == "given":
        if not resources.get("masks"):
            raise BadInput(f"{pre}setting masks: given needs --masks DIR")
        m = load_masks(resources["masks"], items, resources.get("data_root") or Path("."), tm.adapter.data_config,
                       getattr(tm.adapter, "max_pixels", None))       # the data's --max-pixels
        if m.shape[-2:] != x.shape[-2:]:
            m = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return m.clamp(0, 1), source
    if source == "segmenter":
        if not resources.get("segmenter"):
            raise BadInput(f"{pre}setting masks: segmenter needs --segmenter PATH (a local CLIPSeg folder)")
        phrases = [prompts.object(class_names[int(c)]) for c in y]
        return clipseg_masks(resources["segmenter"], to_pixels(x, tm.adapter.data_config), phrases, device), source
    if source == "contrast":
        return contrast_masks(to_pixels(x, tm.adapter.data_config)), source
    return threshold_masks(attribution_maps(tm, x, y, device, min_side=min_side), quantile), "attribution"


__all__ = ["MASKS", "SEGMENTER", "MASK_SOURCES", "mask_file", "mask_files", "mask_roots", "mask_sets", "load_masks", "contrast_masks", "clipseg_masks", "object_masks"]
