"""The embedding transforms a head repair may apply, each with its exact fold into the head.

A head repair that fits its new head on transformed embeddings ``T(X)`` must declare
which transform it uses (``register_method(..., transform=MASK)``) and return the
head folded back onto the raw embeddings, so the repaired model needs no ``repair``
code at run time. The method contract test checks every declared transform:
``apply(X, t) @ W.T + b == X @ fold(W, b, t)[0].T + fold(W, b, t)[1]``.

- :data:`MASK`: ``X * m`` (neuron suppression) -> ``(W diag(m), b)``;
- :data:`AFFINE`: ``X * scale + shift`` (standardisation, NSF's per-dimension map)
  -> ``(W diag(scale), b + W shift)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..solver.weights import fold_affine, standardization

Tensor = torch.Tensor


@dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[[Tensor, dict], Tensor]
    fold: Callable[[Tensor, Tensor, dict], tuple]
    example: Callable[[int, torch.Generator], dict]   # a random instance (for the contract test)


def _mask_example(D: int, g: torch.Generator) -> dict:
    return {"mask": (torch.rand(D, generator=g, dtype=torch.float32) > 0.3).float()}


def _affine_example(D: int, g: torch.Generator) -> dict:
    scale, shift = standardization(torch.randn(50, D, generator=g, dtype=torch.float32) * 3 + 1)
    return {"scale": scale * (torch.rand(D, generator=g, dtype=torch.float32) * 2),
            "shift": shift + torch.randn(D, generator=g, dtype=torch.float32)}


MASK = Transform("mask", apply=lambda X, t: X * t["mask"],
                 fold=lambda W, b, t: fold_affine(W, b, t["mask"], None), example=_mask_example)
AFFINE = Transform("affine", apply=lambda X, t: X * t["scale"] + t["shift"],
                   fold=lambda W, b, t: fold_affine(W, b, t["scale"], t["shift"]), example=_affine_example)

TRANSFORMS = {t.name: t for t in (MASK, AFFINE)}

__all__ = ["Transform", "MASK", "AFFINE", "TRANSFORMS"]
