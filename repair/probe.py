"""Embedding probing without group labels (pure functions on tensors).

- NeuronTune spuriousness (Zheng et al. 2025): per class y and dimension i,
  delta_i^y = median(v_i | y, misclassified) - median(v_i | y, correct).
  Positive: high activation goes with errors.
- NSF dispersion (Li et al. 2025): samples whose nearest class prototype
  (class mean) is another class.
- Pseudo-groups: class x (correctly / incorrectly classified).
"""
from __future__ import annotations

from typing import Sequence

import torch


def neuron_spuriousness(X: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) delta scores; NaN for a class with no misclassified or no correct samples."""
    D = X.shape[1]
    out = torch.full((num_classes, D), float("nan"))
    for c in range(num_classes):
        in_c = y == c
        wrong = in_c & (pred != c)
        right = in_c & (pred == c)
        if wrong.any() and right.any():
            out[c] = X[wrong].median(0).values - X[right].median(0).values
    return out


def nearest_prototype(X: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (C, D) (NaN rows for absent classes) and each sample's nearest prototype."""
    protos = torch.full((num_classes, X.shape[1]), float("nan"))
    for c in range(num_classes):
        if (y == c).any():
            protos[c] = X[y == c].mean(0)
    d = torch.cdist(X, torch.nan_to_num(protos, nan=float("inf")))
    d = torch.nan_to_num(d, nan=float("inf"))
    return protos, d.argmin(1)


def probe(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
          class_names: Sequence[str], top_k: int = 10) -> dict:
    C = W.shape[0]
    logits = X @ W.T + b
    pred = logits.argmax(1)
    delta = neuron_spuriousness(X, y, pred, C)
    _, nearest = nearest_prototype(X, y, C)
    per_class = []
    for c in range(C):
        m = y == c
        n = int(m.sum())
        n_wrong = int((m & (pred != c)).sum())
        n_out = int((m & (nearest != c)).sum())
        row = delta[c]
        finite = torch.isfinite(row)
        per_class.append({
            "class": class_names[c], "n": n,
            "misclassified": n_wrong, "correct": n - n_wrong,
            "accuracy": (n - n_wrong) / n if n else None,
            "dispersed": n_out, "dispersion": n_out / n if n else None,
            "spurious_neurons": int((row[finite] > 0).sum()) if finite.any() else 0,
            "max_delta": float(row[finite].max()) if finite.any() else None,
        })
    flat = torch.nan_to_num(delta, nan=float("-inf"))
    k = min(top_k, int(torch.isfinite(flat).sum()))
    top = []
    if k > 0:
        vals, idx = flat.flatten().topk(k)
        for v, i in zip(vals.tolist(), idx.tolist()):
            c, d = divmod(i, X.shape[1])
            top.append({"class": class_names[c], "neuron": d, "delta": v,
                        "head_weight": float(W[c, d])})
    pseudo = [{"group": f"{r['class']}|correct", "n": r["correct"]} for r in per_class] + \
             [{"group": f"{r['class']}|misclassified", "n": r["misclassified"]} for r in per_class]
    return {
        "n": int(y.numel()), "embedding_dim": int(X.shape[1]),
        "accuracy": float((pred == y).float().mean()),
        "per_class": per_class,
        "top_spurious_neurons": top,
        "pseudo_groups": pseudo,
        "neuron_spuriousness": [[None if not torch.isfinite(torch.tensor(v)) else float(v) for v in row]
                                for row in delta.tolist()],
    }
