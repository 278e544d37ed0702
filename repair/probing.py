"""Embedding probing without group labels (pure functions on tensors).

The statistics here are the single definitions the repair methods use too, so
``repair probe`` and ``neurontune`` / ``nsf`` cannot disagree:

- NeuronTune spuriousness (Zheng et al. 2025), :func:`neuron_deltas`: per class y and
  dimension i, ``delta_i^y = median(v_i | y, misclassified) - median(v_i | y, correct)``.
  Positive: high activation goes with errors. ``repair probe`` names a neuron only when a rank
  test (:func:`separation_pvalues`, Bonferroni over all tested) finds that difference significant:
  noise gives half of all neurons a positive delta.
- NSF dispersion (Li et al. 2025), :func:`nsf_space` / :func:`dispersion`: on the standardised
  embeddings (per-feature zero mean, unit std, as ``nsf`` fits), samples whose own class's prototype
  (class mean) is farther than another class's. ``nsf`` finds its outliers with these same two
  functions, so the dispersion ``repair probe`` reports is the one ``nsf`` acts on (on raw
  embeddings a wide feature dominates the distances and the two could differ).
- Pseudo-groups: class x (correctly / incorrectly classified).
"""
from __future__ import annotations

from typing import Sequence

import torch


def neuron_deltas(X: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, num_classes: int,
                  delta_scale: str = "raw") -> tuple[torch.Tensor, list[dict]]:
    """Per-class deltas (C, D) -- NaN rows for a class with no misclassified or no correct
    sample -- and per-class counts. ``delta_scale="std"`` divides by each dimension's std."""
    D = X.shape[1]
    deltas = torch.full((num_classes, D), float("nan"), dtype=X.dtype)
    if delta_scale == "std":
        sd = X.std(0, unbiased=False).clamp_min(1e-8)
    elif delta_scale == "raw":
        sd = None
    else:
        raise ValueError(f"delta_scale must be 'raw' or 'std', got {delta_scale!r}")
    counts = []
    for c in range(num_classes):
        m = y == c
        wrong = m & (pred != c)
        right = m & (pred == c)
        counts.append({"class": c, "n": int(m.sum()), "misclassified": int(wrong.sum()),
                       "correct": int(right.sum())})
        if int(wrong.sum()) == 0 or int(right.sum()) == 0:
            continue
        d = X[wrong].median(0).values - X[right].median(0).values
        deltas[c] = d if sd is None else d / sd
    return deltas, counts


#: family-wise error rate of :func:`separation_pvalues` (Bonferroni over every class x neuron tested)
SIGNIFICANCE = 0.05


def separation_pvalues(X: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, num_classes: int,
                       chunk: int = 256) -> torch.Tensor:
    """(C, D) one-sided p-values that dimension i of class y's misclassified samples sits HIGHER than
    its correctly classified ones (the direction NeuronTune's ``delta > 0`` calls spurious):
    Mann-Whitney's rank-sum test, normal approximation with the tie correction (post-ReLU features
    are often tied at 0), unadjusted. NaN where the class lacks misclassified or correct samples;
    1 where a dimension is constant within the class. A rank test because the delta is a median
    difference: both are about where the two sets of values sit, not their means.

    Without it, noise separates the two sets as often as not: half of all neurons have ``delta > 0``
    under any model, a shortcut-free one too, and with a few misclassified samples the largest
    deltas are noise. Float64 ranks, computed at most ``chunk`` dimensions (and 2M values) at a
    time, so the figures do not depend on the machine's float32 sums."""
    D = X.shape[1]
    out = torch.full((num_classes, D), float("nan"), dtype=torch.float64)
    for c in range(num_classes):
        m = y == c
        wrong = (pred[m] != c)
        n1, n = int(wrong.sum()), int(m.sum())
        if n1 == 0 or n1 == n:
            continue
        n0 = n - n1
        Xc = X[m]
        step = max(1, min(chunk, 2_000_000 // n))                   # blocks of at most 2M values
        for j in range(0, D, step):
            V = Xc[:, j:j + step].double().T.contiguous()           # (k, n)
            S = V.sort(1).values
            lo = torch.searchsorted(S, V, right=False)
            hi = torch.searchsorted(S, V, right=True)
            rank = (lo + hi + 1).double() / 2                        # average (1-based) rank of each value
            r1 = rank[:, wrong].sum(1)
            ties = ((hi - lo).double() ** 2 - 1).sum(1)              # sum over tie groups of t^3 - t
            var = n0 * n1 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
            z = (r1 - n1 * (n + 1) / 2.0) / var.clamp_min(1e-300).sqrt()
            p = 0.5 * torch.erfc(z / 2 ** 0.5)
            out[c, j:j + step] = torch.where(var > 1e-12 * n0 * n1 * n, p, torch.ones_like(p))
    return out


def class_prototypes(Z: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class means (C, D); NaN rows for classes absent from ``y``."""
    protos = torch.full((num_classes, Z.shape[1]), float("nan"), dtype=Z.dtype)
    for c in range(num_classes):
        m = y == c
        if bool(m.any()):
            protos[c] = Z[m].mean(0)
    return protos


def nearest_class(Z: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest centre (euclidean); NaN centres are never nearest."""
    d = torch.cdist(Z, torch.nan_to_num(centres, nan=0.0))
    d[:, torch.isnan(centres[:, 0])] = float("inf")
    return d.argmin(1)


def dispersed(Z: torch.Tensor, y: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rows whose own class's centre is farther than another class's -- strictly: a tie
    (classes whose centres coincide, constant embeddings) disperses nothing, where the nearest by
    index made the first class look compact and every other one wholly dispersed."""
    d = torch.cdist(Z, torch.nan_to_num(centres, nan=0.0))
    d[:, torch.isnan(centres[:, 0])] = float("inf")
    own = d.gather(1, y.long().view(-1, 1)).squeeze(1)
    d.scatter_(1, y.long().view(-1, 1), float("inf"))
    return d.min(1).values < own


def nsf_space(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Z, scale, shift)``: the standardised embeddings ``Z = X * scale + shift`` (statistics of
    ``X``; :func:`repair.solver.standardization`) in which NSF's dispersion is defined -- the one
    home of that space, for ``repair probe`` and the ``nsf`` method alike."""
    from .solver.weights import standardization

    a, sh = standardization(X)
    return X * a + sh, a, sh


def dispersion(Z: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prototypes, outlier)``: the class prototypes of ``Z`` and the (N,) bool of rows whose own
    class's prototype is farther than another class's (:func:`dispersed`) -- NSF's outliers, as
    ``nsf`` finds them and ``repair probe`` counts them."""
    protos = class_prototypes(Z, y, num_classes)
    return protos, dispersed(Z, y, protos)


def probe(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
          class_names: Sequence[str], top_k: int = 10, where=None) -> dict:
    from .metrics import check_finite_logits

    C = W.shape[0]
    logits = X @ W.T + b
    check_finite_logits(logits, where)     # no figure rests on NaN or infinite logits (as in eval)
    pred = logits.argmax(1)
    delta, _ = neuron_deltas(X, y, pred, C)
    pval = separation_pvalues(X, y, pred, C)
    tested = int(torch.isfinite(pval).sum())
    # Bonferroni over every (class, neuron) tested: a neuron is named only when the chance that any
    # of them would sit this far apart with no real difference is under SIGNIFICANCE
    p_adj = (pval * max(tested, 1)).clamp(max=1.0)
    sig = torch.isfinite(p_adj) & (p_adj < SIGNIFICANCE) & torch.isfinite(delta) & (delta > 0)
    _, out = dispersion(nsf_space(X.float())[0], y, C)     # NSF's space and outliers (one code path)
    per_class = []
    for c in range(C):
        m = y == c
        n = int(m.sum())
        n_wrong = int((m & (pred != c)).sum())
        n_out = int((m & out).sum())
        row = delta[c]
        finite = torch.isfinite(row)
        per_class.append({
            "class": class_names[c], "n": n,
            "misclassified": n_wrong, "correct": n - n_wrong,
            "accuracy": (n - n_wrong) / n if n else None,
            "dispersed": n_out, "dispersion": n_out / n if n else None,
            # NeuronTune's own rule (delta > 0), which noise meets for about half of all neurons
            "positive_delta_neurons": int((row[finite] > 0).sum()) if finite.any() else 0,
            # those whose misclassified samples sit significantly higher (rank test, Bonferroni)
            "spurious_neurons": int(sig[c].sum()),
            "max_delta": float(row[finite].max()) if finite.any() else None,
        })
    # only neurons that separate a class's misclassified samples from its correct ones significantly
    # and in NeuronTune's direction: a long --top lists no others under that name
    flat = torch.where(sig, torch.nan_to_num(delta, nan=0.0), torch.full_like(delta, float("-inf")))
    k = min(top_k, int(sig.sum()))
    top = []
    if k > 0:
        vals, idx = flat.flatten().topk(k)
        for v, i in zip(vals.tolist(), idx.tolist()):
            c, d = divmod(i, X.shape[1])
            top.append({"class": class_names[c], "neuron": d, "delta": v,
                        "p_value": float(p_adj[c, d]), "head_weight": float(W[c, d])})
    pseudo = [{"group": f"{r['class']}|correct", "n": r["correct"]} for r in per_class] + \
             [{"group": f"{r['class']}|misclassified", "n": r["misclassified"]} for r in per_class]
    return {
        "n": int(y.numel()), "embedding_dim": int(X.shape[1]),
        "n_correct": int((pred == y).sum()),
        "accuracy": int((pred == y).sum()) / int(y.numel()) if int(y.numel()) else None,   # exact k/n, as eval
        "per_class": per_class,
        "top_spurious_neurons": top,
        "significance": {"test": "one-sided Mann-Whitney rank-sum per class and neuron (misclassified "
                                 "above correct), Bonferroni-adjusted", "level": SIGNIFICANCE, "tests": tested},
        "pseudo_groups": pseudo,
        "neuron_spuriousness": [[None if not torch.isfinite(torch.tensor(v)) else float(v) for v in row]
                                for row in delta.tolist()],
    }
