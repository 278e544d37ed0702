"""Image preprocessing shared by the image adapters (timm, torch factory, ONNX).

The data config is timm's (``input_size``, ``interpolation``, ``mean``, ``std``,
``crop_pct``, ``crop_mode``); the transform is timm's eval transform for it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data import DEFAULT_MAX_PIXELS, check_limit_fits, open_regular, read_image
from ..errors import BadInput
from ..io import parse_json

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
PREPROCESS_FILE = "preprocess.json"
#: what a model with no image preprocessing of its own asks for (ONNX files, factories, bare weights):
#: --image-size alone is enough, --mean/--std then default to ImageNet's
GIVE_PREPROCESSING = (f"give --image-size (--mean and --std default to ImageNet's), or put a {PREPROCESS_FILE} "
                      "(input_size, mean, std) next to it")


#: the largest input side (height or width) a model's preprocessing may ask for, and the largest
#: side it may resize an image to before cropping (``side / crop_pct``): a checkpoint asking for
#: 40000 x 40000 inputs is refused naming its config, never a MemoryError
MAX_INPUT_SIDE = 4096
MAX_RESIZE_SIDE = 2 * MAX_INPUT_SIDE
#: the resampling filters timm's eval transform knows (``timm.data.transforms.str_to_interp_mode``)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
#: timm's eval crop modes (anything else would silently be "center")
CROP_MODES = ("center", "squash", "border")


def resolve_image_config(pretrained_cfg: Optional[dict], where=None) -> dict:
    """timm's data config for ``pretrained_cfg``, checked: ``input_size`` (3, H, W) with H and W
    from 1 to :data:`MAX_INPUT_SIDE` (images are read as RGB), ``crop_pct`` > 0 with
    ``side / crop_pct`` at most :data:`MAX_RESIZE_SIDE`, ``mean`` / ``std`` one or three finite
    numbers with ``std`` > 0, ``interpolation`` one of :data:`INTERPOLATIONS`, ``crop_mode`` one of
    :data:`CROP_MODES`, and timm's eval transform built from it. :class:`BadInput` naming ``where``
    (the config file) otherwise: the one check of an image preprocessing, wherever it comes from."""
    import math

    from timm.data import create_transform, resolve_data_config

    if pretrained_cfg is not None and not isinstance(pretrained_cfg, dict):
        raise BadInput(f"the preprocessing (pretrained_cfg) must be a JSON object, got {type(pretrained_cfg).__name__}",
                       where)
    raw = dict(pretrained_cfg or {})
    if not raw:
        raise BadInput("no image preprocessing (pretrained_cfg with input_size, mean, std) is given", where)
    for key in DATA_CONFIG_KEYS:
        v = raw.get(key)
        if v is not None and not v:      # 0, "", [], {}, false: anything timm's ``or`` would throw away
            # timm reads each setting as ``cfg.get(key) or DEFAULT``: a 0, "" or [] would silently become its
            # default (crop_pct 0 -> 0.875, mean [] -> ImageNet's), a preprocessing the file never asked for
            raise BadInput(f"{key} is {v!r}: an empty or zero value is not a preprocessing (leave {key} out "
                           "for its default)", where)
    size = raw.get("input_size")
    if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 3 or
                             not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        raise BadInput(f"input_size must be three whole numbers [channels, height, width], got {size!r}", where)
    for key in ("mean", "std"):         # numbers, never text timm's float() would read ("0.5")
        v = raw.get(key)
        vals = list(v) if isinstance(v, (list, tuple)) else [v]
        if v is not None and not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            raise BadInput(f"{key} must be one or three numbers, got {v!r}", where)
    try:
        cfg = resolve_data_config(pretrained_cfg=raw)
        out = {k: cfg[k] for k in DATA_CONFIG_KEYS if k in cfg}
        out["input_size"] = [int(v) for v in out["input_size"]]
        out["mean"] = [float(v) for v in out["mean"]]
        out["std"] = [float(v) for v in out["std"]]
    except Exception as e:    # timm asserts, indexes and converts the user's values (any error type)
        raise BadInput(f"not a usable image preprocessing ({_why(e)})", where) from None
    c, h, w = out["input_size"]
    if not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE) or c < 1:
        raise BadInput(f"input_size {c}x{h}x{w} is out of range: height and width must be 1 to "
                       f"{MAX_INPUT_SIDE} pixels", where)
    if c != 3:
        raise BadInput(f"input_size {c}x{h}x{w} has {c} channel(s); images are read as RGB (3 channels)", where)
    for key in ("mean", "std"):
        vals = out[key]
        if len(vals) not in (1, 3) or not all(math.isfinite(v) for v in vals) or \
                (key == "std" and not min(vals) > 0):
            what = "numbers above 0" if key == "std" else "finite numbers"
            raise BadInput(f"{key} must be one or three (R,G,B) {what}, got {vals}", where)
    interp = out.get("interpolation")
    if interp is not None and interp not in INTERPOLATIONS:
        raise BadInput(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interp!r}", where)
    mode = out.get("crop_mode")
    if mode is not None and mode not in CROP_MODES:
        raise BadInput(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {mode!r}", where)
    crop = out.get("crop_pct")
    if crop is not None:
        if not isinstance(crop, (int, float)) or isinstance(crop, bool) or not crop > 0:
            raise BadInput(f"crop_pct must be a number above 0, got {crop!r}", where)
        if max(h, w) / float(crop) > MAX_RESIZE_SIDE:
            raise BadInput(f"crop_pct {crop} would resize images to {int(max(h, w) / float(crop))} pixels "
                           f"(at most {MAX_RESIZE_SIDE})", where)
    try:                      # what ImageCollate builds: any other value timm cannot use fails here
        create_transform(**out, is_training=False)
    except Exception as e:
        raise BadInput(f"not a usable image preprocessing ({_why(e)})", where) from None
    return out


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def image_options(size: Optional[int], mean: Optional[Sequence[float]],
                  std: Optional[Sequence[float]]) -> dict:
    """The preprocessing keys ``--image-size/--mean/--std`` set (those given), as a data config writes them."""
    out: dict = {}
    if size is not None:
        out["input_size"] = [3, int(size), int(size)]
    if mean is not None:
        out["mean"] = list(mean)
    if std is not None:
        out["std"] = list(std)
    return out


def image_config_from_options(size: Optional[int], mean: Optional[Sequence[float]],
                              std: Optional[Sequence[float]], json_path: Optional[Path]) -> Optional[dict]:
    """Preprocessing given by the user for checkpoints that do not carry it
    (ONNX files, bare modules): flags win over a ``preprocess.json``."""
    cfg: dict = {}
    if json_path is not None and Path(json_path).exists():
        try:
            with open_regular(json_path, "preprocessing file") as f:
                cfg = parse_json(f.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"not valid JSON ({e})", json_path) from None
        if not isinstance(cfg, dict):
            raise BadInput("expected a JSON object with input_size/mean/std", json_path)
        unknown = set(cfg) - set(DATA_CONFIG_KEYS)
        if unknown:
            raise BadInput(f"unknown preprocessing key(s) {sorted(unknown)}; known: {list(DATA_CONFIG_KEYS)}", json_path)
    cfg.update(image_options(size, mean, std))
    if not cfg:
        return None
    return described_image_config(cfg, json_path if json_path is not None and Path(json_path).exists() and
                                  size is None else "--image-size" if size is not None else None)


def described_image_config(cfg: dict, where=None) -> dict:
    """:func:`resolve_image_config` of a preprocessing DESCRIBED for a checkpoint that carries none of
    timm's (a ``preprocess.json``, the options, an ONNX file's ``preprocess`` metadata): no
    ``crop_pct`` there means no crop (1.0), not timm's default 0.875 -- the one home of that rule, so one
    description reads the same from any of them."""
    if isinstance(cfg, dict) and cfg.get("crop_pct", 1.0) is None:
        cfg = {k: v for k, v in cfg.items() if k != "crop_pct"}      # null is left out, as timm reads it
    return resolve_image_config({"crop_pct": 1.0, **cfg} if isinstance(cfg, dict) else cfg, where)


class ImageCollate:
    def __init__(self, data_config: dict):
        from timm.data import create_transform

        self.data_config = data_config
        self.transform = create_transform(**data_config, is_training=False)

    def __call__(self, items: Sequence[Path], max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """The eval transform of each image, decoded by :func:`repair.data.read_image` (every PIL
        mode converted by its meaning or refused by name, at most ``max_pixels`` pixels, as read and
        as this preprocessing resizes it, regular files only). A limit no image of this preprocessing
        can meet is refused once, naming ``--max-pixels`` (:func:`repair.data.check_limit_fits`)."""
        check_limit_fits(self.data_config, max_pixels)
        # float32 whatever default dtype the caller set (timm's Normalize follows it): the model input
        return torch.stack([self.transform(read_image(p, max_pixels, self.data_config)) for p in items]).float()
