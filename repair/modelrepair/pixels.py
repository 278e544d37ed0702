"""Image tensors between the model's inputs and pixels, and the small morphology the mask sources
and generators share (box blur, dilation, erosion on (N,C,H,W) tensors)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _stats(data_config: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(data_config["mean"], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return mean, std


def to_pixels(x: torch.Tensor, data_config: dict) -> torch.Tensor:
    """Model inputs (normalised) -> pixels in [0, 1]."""
    mean, std = _stats(data_config, x)
    return (x * std + mean).clamp(0, 1)


def to_model(pix: torch.Tensor, data_config: dict) -> torch.Tensor:
    """Pixels in [0, 1] -> model inputs (normalised)."""
    mean, std = _stats(data_config, pix)
    return (pix - mean) / std


def _blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """Box blur with a k x k window (edges replicated)."""
    if k <= 1:
        return x
    p = k // 2
    return F.avg_pool2d(F.pad(x, (p, k - 1 - p, p, k - 1 - p), mode="replicate"), k, stride=1)


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(m, 2 * r + 1, stride=1, padding=r) if r > 0 else m


def _erode(m: torch.Tensor, r: int) -> torch.Tensor:
    return -_dilate(-m, r)


__all__ = ["to_pixels", "to_model"]
