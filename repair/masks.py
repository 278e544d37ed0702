"""Foreground masks for image repair sets (``--masks DIR``), shared by the model repairs that
need to know where the object is (CLP's saliency penalty, counterfactual recomposition).

A mask is a greyscale image (white = object) with the same file name as its image, in the
same relative place under ``DIR`` as the image under the repair data's folder; a mask with
the image's stem and a ``.png`` suffix is accepted too (JPEG images, PNG masks). It must
have the image's size: it then goes through exactly the geometric part of the model's own
preprocessing (resize, crop) so it lines up with the model's input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .errors import BadInput


def mask_file(mask_dir: Path, item: Path, data_root: Path) -> Path:
    """Where the mask of image ``item`` must be (the first candidate that exists, else the
    first candidate)."""
    item = Path(item)
    try:
        rel = item.resolve().relative_to(Path(data_root).resolve())
    except ValueError:
        rel = Path(item.name)
    cands = [mask_dir / rel, (mask_dir / rel).with_suffix(".png"), mask_dir / item.name,
             (mask_dir / item.name).with_suffix(".png")]
    for c in cands:
        if c.is_file():
            return c
    return cands[0]


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


def load_masks(mask_dir, items: Sequence, data_root, data_config: dict) -> torch.Tensor:
    """(N, 1, H, W) float masks in [0, 1] aligned with the model's input for ``items`` (image
    paths). Missing masks, unreadable files and size mismatches are :class:`BadInput` naming
    the file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise BadInput("--masks must be a folder of mask images", mask_dir)
    geom = _geometry(data_config)
    out = []
    for item in items:
        mf = mask_file(mask_dir, Path(item), Path(data_root))
        if not mf.is_file():
            raise BadInput(f"no mask for image {Path(item).name} (expected {mf})", mask_dir)
        try:
            with Image.open(item) as im:
                size = im.size
            with Image.open(mf) as m:
                if m.size != size:
                    raise BadInput(f"mask is {m.size[0]}x{m.size[1]} but its image {Path(item).name} is "
                                   f"{size[0]}x{size[1]}", mf)
                arr = np.asarray(geom(m.convert("L")), dtype=np.float32) / 255.0
        except BadInput:
            raise
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise BadInput(f"unreadable mask ({type(e).__name__})", mf) from None
        out.append(torch.from_numpy(arr.copy()).unsqueeze(0))
    return torch.stack(out) if out else torch.zeros(0, 1, 1, 1)


__all__ = ["mask_file", "load_masks"]
