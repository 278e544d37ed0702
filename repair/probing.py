"""Embedding probing without group labels (pure functions on tensors).

The statistics here are the single definitions the repair methods use too, so
``repair probe`` and ``neurontune`` / ``nsf`` cannot disagree:

- NeuronTune spuriousness (Zheng et al. 2025), :func:`neuron_deltas`: per class y and
  dimension i, ``delta_i^y = median(v_i | y, misclassified) - median(v_i | y, correct)``.
  Positive: high activation goes with errors. ``repair probe`` names a neuron only when a rank
  test (:func:`separation_test`, family-wise by permutation) finds that difference significant:
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


#: family-wise error rate of :func:`separation_test`: the chance, with no neuron related to the errors,
#: that ``repair probe`` names any
SIGNIFICANCE = 0.05
#: random relabellings of :func:`separation_test` (adjusted p-values in steps of 1/200). Its cost and its
#: error rate on shortcut-free models: ``python -m bench.probe_null`` (40,000 x 1,024, one thread: probe
#: 6.7 s beside 0.8 s for the median deltas alone; noise neurons named in 1-8 of 100 models)
PERMUTATIONS = 199


def _average_ranks(V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ranks, ties)`` of each row of ``V`` (k, n): 1-based ranks, tied values sharing their average
    (multiples of 1/2, exact in float64), and per row the sum over tie groups of ``t^3 - t``. One sort;
    a run of equal values is found by where the sorted values change."""
    k, n = V.shape
    S, idx = V.sort(1)
    pos = torch.arange(n).expand(k, n)
    starts = torch.ones(k, n, dtype=torch.bool)
    starts[:, 1:] = S[:, 1:] != S[:, :-1]
    ends = torch.ones(k, n, dtype=torch.bool)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values          # run's first place
    last = torch.where(ends, pos, torch.full_like(pos, n - 1)).flip(1).cummin(1).values.flip(1)
    t = (last - first + 1).double()
    ranks = torch.empty(k, n, dtype=torch.float64)
    ranks.scatter_(1, idx, (first + last + 2).double() / 2)
    return ranks, (t * t - 1).sum(1)


def separation_test(X: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, num_classes: int,
                    permutations: int = PERMUTATIONS, seed: int = 0, chunk: int = 256,
                    block: int = 128) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(z, p, tested)``: whether dimension i of class y's misclassified samples sits HIGHER than its
    correctly classified ones (the direction NeuronTune's ``delta > 0`` calls spurious).

    ``z`` (C, D): Mann-Whitney's rank-sum statistic, standardised with the tie correction (post-ReLU
    features are often tied at 0); NaN where the class lacks misclassified or correct samples, and
    for a dimension constant within the class. A rank test because the delta is a median difference:
    both are about where the two sets of values sit, not their means.

    ``p`` (C, D): family-wise adjusted p-values by the permutation max-T method (Westfall & Young):
    each of ``permutations`` relabellings picks, in every class, as many rows as it has misclassified
    at random; ``p`` is the share of relabellings whose largest ``z`` over all classes and dimensions
    reaches the dimension's own. Exact for any sample size, tie pattern and dependence between neurons
    -- the normal approximation with Bonferroni named noise neurons in 9-20 of 20 shortcut-free models
    with sparse features and a few errors (one misclassified sample gave p 1e-5 where the exact p is
    0.05). ``tested``: how many (class, dimension) pairs were tested.

    The same on every machine: ranks are multiples of 1/2 held in float64, so every rank sum (a
    matrix product with a 0/1 relabelling matrix) is exact whatever order a BLAS adds in, and the
    relabellings come from a seeded generator (``torch.randperm``)."""
    C, D = num_classes, X.shape[1]
    z = torch.full((C, D), float("nan"), dtype=torch.float64)
    null = torch.full((permutations,), float("-inf"), dtype=torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    tested = 0
    for c in range(C):
        m = y == c
        wrong = (pred[m] != c)
        n1, n = int(wrong.sum()), int(m.sum())
        if n1 == 0 or n1 == n:
            continue
        n0 = n - n1
        # the relabellings of this class: each row the indices of its n1 "misclassified" rows
        picks = torch.stack([torch.randperm(n, generator=gen)[:n1] for _ in range(permutations)])
        observed = torch.nonzero(wrong).flatten()
        Xc = X[m]
        step = max(1, min(chunk, 2_000_000 // n))                   # blocks of at most 2M values
        for j in range(0, D, step):
            # ranked in the embeddings' own precision: the order of float32 values is that of their
            # float64 copies, so no float64 copy is sorted
            V = Xc[:, j:j + step]
            rank, ties = _average_ranks((V if V.dtype in (torch.float32, torch.float64) else V.float()).T.contiguous())
            rank = rank.T.contiguous()                               # (n, k) average 1-based ranks
            var = n0 * n1 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
            ok = var > 0
            sd = torch.where(ok, var, torch.ones_like(var)).sqrt()
            mean = n1 * (n + 1) / 2.0

            def stat(rows: torch.Tensor) -> torch.Tensor:
                """z of each relabelling in ``rows`` (R, n1): its rank sums by one exact product."""
                P = torch.zeros(rows.shape[0], n, dtype=torch.float64)
                P.scatter_(1, rows, 1.0)
                zz = (P @ rank - mean) / sd
                return torch.where(ok, zz, torch.full_like(zz, float("-inf")))

            zo = stat(observed.view(1, -1))[0]
            z[c, j:j + step] = torch.where(ok, zo, torch.full_like(zo, float("nan")))
            tested += int(ok.sum())
            for b in range(0, permutations, block):
                null[b:b + block] = torch.maximum(null[b:b + block], stat(picks[b:b + block]).max(1).values)
    # p = (1 + #{relabellings whose max reaches z}) / (B + 1): a relabelling like the observed one counts
    srt = null.sort().values
    reach = permutations - torch.searchsorted(srt, torch.nan_to_num(z, nan=float("inf")), right=False)
    p = (1.0 + reach.double()) / (permutations + 1)
    p = torch.where(torch.isnan(z), torch.full_like(p, float("nan")), p)
    return z, p, tested


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
    # a neuron is named only when the chance that any would sit this far apart among a class's
    # misclassified samples with no real difference is under SIGNIFICANCE (max-T permutation test)
    zs, p_adj, tested = separation_test(X, y, pred, C)
    sig = torch.isfinite(p_adj) & (p_adj < SIGNIFICANCE) & (zs > 0) & torch.isfinite(delta) & (delta > 0)
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
            # those whose misclassified samples sit significantly higher (rank test, max-T permutations)
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
        "significance": {"test": f"one-sided rank-sum per class and neuron (misclassified above correct), "
                                 f"family-wise by {PERMUTATIONS} random relabellings (max-T)",
                         "level": SIGNIFICANCE, "tests": tested, "permutations": PERMUTATIONS},
        "pseudo_groups": pseudo,
        "neuron_spuriousness": [[None if not torch.isfinite(torch.tensor(v)) else float(v) for v in row]
                                for row in delta.tolist()],
    }
