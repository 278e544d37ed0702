"""Accuracy, per-class and per-group accuracy with counts, worst-group and worst-class."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _breakdown(correct: torch.Tensor, ids: torch.Tensor, names: Sequence[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        mask = ids == i
        n = int(mask.sum())
        rows.append({"name": name, "n": n,
                     "accuracy": (float(correct[mask].float().mean()) if n else None)})
    return rows


def evaluate(logits: torch.Tensor, y: torch.Tensor, class_names: Sequence[str],
             groups: Optional[torch.Tensor] = None, group_names: Sequence[str] = ()) -> dict:
    """Every figure from one prediction pass. Classes/groups with no samples are
    listed with n=0 and accuracy None and do not count towards worst-*."""
    pred = logits.argmax(1) if logits.dim() == 2 else logits
    correct = pred == y
    per_class = _breakdown(correct, y, class_names)
    present = [r["accuracy"] for r in per_class if r["n"]]
    out = {
        "n": int(y.numel()),
        "accuracy": float(correct.float().mean()) if y.numel() else None,
        "worst_class_accuracy": min(present) if present else None,
        "per_class": per_class,
        "per_group": None,
        "worst_group_accuracy": None,
        "worst_group": None,
    }
    if groups is not None:
        per_group = _breakdown(correct, groups, group_names)
        present_g = [r for r in per_group if r["n"]]
        worst = min(present_g, key=lambda r: r["accuracy"]) if present_g else None
        out["per_group"] = per_group
        out["worst_group_accuracy"] = worst["accuracy"] if worst else None
        out["worst_group"] = worst["name"] if worst else None
    return out
