"""Accuracy, per-class and per-group accuracy with counts, worst-group and worst-class."""
from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .errors import BadInput

if TYPE_CHECKING:                   # annotations only: torch is imported where it runs
    import torch


def _breakdown(correct: torch.Tensor, ids: torch.Tensor, names: Sequence[str]) -> list[dict]:
    import torch
    n = torch.bincount(ids.long().cpu(), minlength=len(names)).tolist()
    k = torch.bincount(ids.long().cpu(), weights=correct.double().cpu(), minlength=len(names)).tolist()
    return [{"name": name, "n": int(n[i]), "n_correct": int(round(k[i])),
             "accuracy": (int(round(k[i])) / int(n[i]) if n[i] else None)} for i, name in enumerate(names)]


def _worst(rows: list[dict]) -> Optional[dict]:
    """The row of lowest accuracy among those with samples, compared exactly (k/n as fractions;
    ties: the first)."""
    present = [r for r in rows if r["n"]]
    return min(present, key=lambda r: Fraction(r["n_correct"], r["n"])) if present else None


def check_finite_logits(logits: torch.Tensor, where: Any = None) -> None:
    """:class:`BadInput` when the logits hold NaN or infinite values: no figure (and no gate) may
    rest on them. ``where``: the model or file the message names."""
    import torch
    if logits.is_floating_point() and not bool(torch.isfinite(logits).all()):
        bad = ~torch.isfinite(logits.reshape(logits.shape[0], -1) if logits.dim() else logits.reshape(1, 1))
        rows = int(bad.any(-1).sum())
        raise BadInput(f"the model's logits are non-finite (NaN or infinite) for {rows} of "
                       f"{max(int(logits.shape[0]) if logits.dim() else 1, 1)} samples; no figure can be "
                       "measured on them", where)


def evaluate(logits: torch.Tensor, y: torch.Tensor, class_names: Sequence[str],
             groups: Optional[torch.Tensor] = None, group_names: Sequence[str] = (), *,
             where: Any = None) -> dict:
    """Every figure from one prediction pass. Classes/groups with no samples are
    listed with n=0 and accuracy None and do not count towards worst-*.

    Every accuracy comes with its exact counts (``n_correct`` of ``n``; worst class / group:
    ``worst_class_n_correct`` of ``worst_class_n``, ``worst_group_n_correct`` of
    ``worst_group_n``) so a gate compares k of n exactly; the accuracies are k/n in double
    precision. Non-finite logits are :class:`BadInput` (naming ``where``)."""
    import torch
    if logits.dim() == 2:
        check_finite_logits(logits, where)
    pred = logits.argmax(1) if logits.dim() == 2 else logits
    correct = (pred == y).cpu()
    per_class = _breakdown(correct, y, class_names)
    worst_c = _worst(per_class)
    n, k = int(y.numel()), int(correct.sum())
    out = {
        "n": n,
        "n_correct": k,
        "accuracy": k / n if n else None,
        "worst_class_accuracy": worst_c["accuracy"] if worst_c else None,
        "worst_class": worst_c["name"] if worst_c else None,
        "worst_class_n_correct": worst_c["n_correct"] if worst_c else None,
        "worst_class_n": worst_c["n"] if worst_c else None,
        "per_class": per_class,
        "per_group": None,
        "worst_group_accuracy": None,
        "worst_group": None,
        "worst_group_n_correct": None,
        "worst_group_n": None,
    }
    if groups is not None:
        per_group = _breakdown(correct, groups, group_names)
        worst = _worst(per_group)
        out["per_group"] = per_group
        out["worst_group_accuracy"] = worst["accuracy"] if worst else None
        out["worst_group"] = worst["name"] if worst else None
        out["worst_group_n_correct"] = worst["n_correct"] if worst else None
        out["worst_group_n"] = worst["n"] if worst else None
    return out
