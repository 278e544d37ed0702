"""Image preprocessing shared by the image adapters (timm, torch factory, ONNX).

The data config is timm's (``input_size``, ``interpolation``, ``mean``, ``std``,
``crop_pct``, ``crop_mode``); the transform is timm's eval transform for it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data import DEFAULT_MAX_PIXELS, read_image
from ..errors import BadInput

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
PREPROCESS_FILE = "preprocess.json"


def resolve_image_config(pretrained_cfg: Optional[dict]) -> dict:
    from timm.data import resolve_data_config

    cfg = resolve_data_config(pretrained_cfg=dict(pretrained_cfg or {}))
    out = {k: cfg[k] for k in DATA_CONFIG_KEYS if k in cfg}
    out["input_size"] = [int(v) for v in out["input_size"]]
    out["mean"] = [float(v) for v in out["mean"]]
    out["std"] = [float(v) for v in out["std"]]
    return out


def image_config_from_options(size: Optional[int], mean: Optional[Sequence[float]],
                              std: Optional[Sequence[float]], json_path: Optional[Path]) -> Optional[dict]:
    """Preprocessing given by the user for checkpoints that do not carry it
    (ONNX files, bare modules): flags win over a ``preprocess.json``."""
    cfg: dict = {}
    if json_path is not None and Path(json_path).exists():
        try:
            cfg = json.loads(Path(json_path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"not valid JSON ({e})", json_path) from None
        if not isinstance(cfg, dict):
            raise BadInput("expected a JSON object with input_size/mean/std", json_path)
        unknown = set(cfg) - set(DATA_CONFIG_KEYS)
        if unknown:
            raise BadInput(f"unknown preprocessing key(s) {sorted(unknown)}; known: {list(DATA_CONFIG_KEYS)}", json_path)
    if size is not None:
        cfg["input_size"] = [3, int(size), int(size)]
    if mean is not None:
        cfg["mean"] = list(mean)
    if std is not None:
        cfg["std"] = list(std)
    if not cfg:
        return None
    cfg.setdefault("crop_pct", 1.0)
    return resolve_image_config(cfg)


class ImageCollate:
    def __init__(self, data_config: dict):
        from timm.data import create_transform

        self.data_config = data_config
        self.transform = create_transform(**data_config, is_training=False)

    def __call__(self, items: Sequence[Path], max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """The eval transform of each image, decoded by :func:`repair.data.read_image` (every PIL
        mode converted by its meaning or refused by name, at most ``max_pixels`` pixels, regular
        files only)."""
        return torch.stack([self.transform(read_image(p, max_pixels)) for p in items])
