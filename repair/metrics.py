"""Accuracy, per-class and per-group accuracy with counts, worst-group and worst-class."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence



def _breakdown(correct: torch.Tensor, ids: torch.Tensor, names: Sequence[str]) -> list[dict]:
    import torch
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
    import torch
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


def parse_threshold(value: Any) -> float:
    """A gate threshold as a fraction: a number from 0 to 1 (``0.8``), or a percentage written
    with its sign (``80%``). A bare number above 1 is refused rather than guessed (``1`` is 100%,
    ``80`` is not 80%). ``ValueError`` says what is wrong."""
    if isinstance(value, bool):
        raise ValueError(f"must be a fraction from 0 to 1 or a percentage like 80%, got {value!r}")
    s = str(value).strip()
    is_pct = s.endswith("%")
    try:
        x = float(s[:-1].strip() if is_pct else s)
    except ValueError:
        raise ValueError(f"must be a fraction from 0 to 1 or a percentage like 80%, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"must be a fraction from 0 to 1 or a percentage like 80%, got {value!r}")
    if is_pct:
        if not 0 <= x <= 100:
            raise ValueError(f"must be from 0% to 100%, got {s!r}")
        return x / 100
    if not 0 <= x <= 1:
        hint = f" (for {s} percent write {s}%)" if 1 < x <= 100 else ""
        raise ValueError(f"must be a fraction from 0 to 1 or a percentage like 80%, got {s}{hint}")
    return x
