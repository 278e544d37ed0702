"""Where an image model looks: Grad-CAM, written here (no captum dependency).

Grad-CAM (Selvaraju et al. 2017) on the last spatial feature map of the network: the
map's channels weighted by the mean gradient of the target logit, rectified, upsampled
to the input size and scaled to [0, 1] per image. It needs one forward and one backward
pass per batch, works for every CNN and (through the patch-token grid) for ViTs, and
gives the smooth object-level maps that thresholding into a foreground mask needs;
plain input gradients are pixel-noisy at the resolutions of small repair sets.

:func:`attribution_mass` is the share of a map inside a mask (the recomposition pruning
criterion and a diagnostic of the saliency penalty).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _spatial(t: torch.Tensor) -> Optional[torch.Tensor]:
    """(N,C,h,w) view of a module output: 4-D maps as they are; (N,T,C) token sequences
    whose last g*g tokens form a square grid (ViT) reshaped; else None."""
    if t.dim() == 4 and t.shape[-1] > 1 and t.shape[-2] > 1:
        return t
    if t.dim() == 3:
        T = t.shape[1]
        for prefix in (0, 1, 2):
            g = int(math.isqrt(T - prefix)) if T > prefix else 0
            if g > 1 and g * g == T - prefix:
                return t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], g, g)
    return None


def gradcam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
            forward=None, *, min_side: Optional[int] = None) -> torch.Tensor:
    """(N, 1, H, W) Grad-CAM maps in [0, 1] of ``target`` classes for inputs ``x`` (N,3,H,W).
    ``forward(x) -> logits`` defaults to ``model(x)``. The model's parameters get no gradient.
    ``min_side``: use the last map whose smaller side is at least this many cells (a finer,
    less class-specific map than the last one; small inputs leave the last map 2x2 or 1x1),
    else the last map with a gradient."""
    feats: list = []

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor) and _spatial(out) is not None and out.requires_grad:
            feats.append(out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    x = x.detach().requires_grad_(True)          # gradients flow to the maps through the input
    try:
        with torch.enable_grad():
            logits = forward(x) if forward is not None else model(x)
            if not feats:
                raise ValueError("Grad-CAM needs a spatial feature map (no 4-D or token-grid output found)")
            score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
            grads = torch.autograd.grad(score, feats, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    # the last map the target depends on spatially (a ViT's final tokens feed only the class
    # token, so its last map with a gradient on the patch tokens is inside the last block)
    live = [i for i, g in enumerate(grads) if g is not None and bool(_spatial(g).abs().sum() > 0)]
    fine = [i for i in live if min_side is not None and min(_spatial(feats[i]).shape[-2:]) >= min_side]
    k = max(fine or live, default=len(feats) - 1)
    A = _spatial(feats[k].detach())
    grad = _spatial(grads[k]) if grads[k] is not None else torch.zeros_like(A)
    w = grad.mean((2, 3), keepdim=True)
    cam = F.relu((w * A).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    top = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (cam / top).float()


def attribution_mass(cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) share of each map's total inside ``mask`` (both (N,1,H,W), mask in [0,1])."""
    total = cam.flatten(1).sum(1).clamp_min(1e-12)
    return (cam * mask).flatten(1).sum(1) / total


def threshold_masks(cam: torch.Tensor, quantile: float = 0.7) -> torch.Tensor:
    """Binary foreground masks from attribution maps: the pixels above each map's
    ``quantile`` (the top 30% by default)."""
    q = torch.quantile(cam.flatten(1), quantile, dim=1).view(-1, 1, 1, 1)
    return (cam > q).float()


def attribution_maps(tm, x: torch.Tensor, target: torch.Tensor, device, batch: int = 64, *,
                     min_side: Optional[int] = None) -> torch.Tensor:
    """(N,1,H,W) Grad-CAM maps of classes ``target`` of the trainable model ``tm``
    (:class:`repair.modelrepair.trainable.TrainableModel`) in eval mode (modes restored), on the CPU.
    ``min_side``: see :func:`gradcam`."""
    modes = [(m, m.training) for m in tm.module.modules()]
    tm.module.eval()
    try:
        out = [gradcam(tm.module, x[i:i + batch].to(device), target[i:i + batch].to(device),
                       forward=tm.logits, min_side=min_side).cpu() for i in range(0, x.shape[0], batch)]
    finally:
        for m, t in modes:
            m.training = t
    return torch.cat(out) if out else torch.zeros(0, 1, *x.shape[-2:])


__all__ = ["gradcam", "attribution_maps", "attribution_mass", "threshold_masks"]
