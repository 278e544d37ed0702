"""repair probe's statistics are the ones the repair methods act on."""
from __future__ import annotations

import torch

from repair import solver as S
from repair.methods import RepairInputs, list_methods
from repair.probing import class_prototypes, dispersed, probe


def test_probe_dispersion_is_nsfs_outliers_on_standardised_embeddings():
    """Found by an audit: probe counted NSF's dispersion on raw embeddings while nsf finds its
    outliers on standardised ones (landbird 24.0% vs 25.3% on the demo). A feature 100x wider than
    the class signal dominates raw distances, so raw and standardised differ here; probe must report
    nsf's own count (n_outliers_per_class), both through probing.nsf_space / dispersion."""
    g = torch.Generator().manual_seed(0)
    n, C = 400, 2
    y = torch.arange(n) % C
    X = torch.randn(n, 6, generator=g)
    X[:, 0] += 1.2 * y                                   # the class signal, unit scale
    X[:, 1] = 100.0 * torch.randn(n, generator=g) + 5.0 * y   # wide, weakly related feature
    X = X.float()
    W, b, _ = S.fit_logreg(X, y, C, l2=1.0)
    W, b = W[0], b[0]

    raw = dispersed(X, y, class_prototypes(X, y, C))
    raw_counts = [int((raw & (y == c)).sum()) for c in range(C)]

    rep = probe(X, y, W, b, ["a", "b"])
    probed = [r["dispersed"] for r in rep["per_class"]]
    (nsf,) = [m for m in list_methods(kind="head") if m.name == "nsf"]
    out = nsf(RepairInputs(X=X, y=y, W=W, b=b, seed=0))
    assert probed == out.diagnostics["n_outliers_per_class"]
    assert probed != raw_counts                          # the example tells raw from standardised apart
    assert [r["dispersion"] for r in rep["per_class"]] == [k / (n // C) for k in probed]
