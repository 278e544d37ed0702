"""A head repair does not depend on the embeddings' units (degenerate-input audit, session 45).

Before: a feature whose spread was below an absolute 1e-6 counted as constant and was left
unstandardised, so a model whose embeddings are all about 1e-6 (a working model: its head weights are
large) had every feature "constant"; the fit ran on the raw features, its L2 penalty zeroed the
weights and every head repair returned a one-class model -- worst-group 0%, exit 0, no warning."""
from __future__ import annotations

import pytest
import torch
from test_methods_contract import _problem, _wga

from repair.methods import RepairInputs, list_methods
from repair.solver.weights import constant_features

HEADS = [m for m in list_methods(kind="head")]


@pytest.fixture(scope="module")
def problem():
    return _problem(3)


@pytest.mark.parametrize("m", HEADS, ids=[m.name for m in HEADS])
def test_head_repairs_are_the_same_at_any_embedding_scale(problem, m):
    p = problem
    got = {}
    for s in (1.0, 1e-6):
        out = m(RepairInputs(X=p["X"] * s, y=p["y"], W=p["W"] / s, b=p["b"],
                             groups=p["groups"] if m.uses_groups else None, seed=0))
        # the head measured on the test embeddings at the same scale (W * s on X / s: the same logits)
        got[s] = float(_wga(p, out.W * s, out.b))
    assert got[1.0] > float(_wga(p, p["W"], p["b"])) + 0.1          # the repair works at scale 1...
    assert got[1e-6] == pytest.approx(got[1.0], abs=0.02), got      # ...and at 1e-6 (before: 0.0)


def test_constant_features_are_still_found_at_every_scale():
    for s in (1e-8, 1e-6, 1.0, 1e3):
        sd = torch.tensor([1.0, 0.0, 1e-10, 0.5]) * s
        mu = torch.tensor([0.0, 3.0, 0.0, 2e3]) * s
        # exactly constant, spread 1e-10 of the others', spread far below its own magnitude
        assert constant_features(sd, mu).tolist() == [False, True, True, True], s


def test_one_large_feature_beside_small_ones_does_not_make_them_constant(problem):
    """The review's case: a bias-like constant 1.0 column beside ~1e-6 features (the largest feature
    set the scale, and every other one counted as constant again: dfr returned a one-class head)."""
    from repair.methods import get_method

    p = problem
    s = 1e-6
    X = torch.cat([p["X"] * s, torch.ones(len(p["X"]), 1)], 1)
    W = torch.cat([p["W"] / s, torch.zeros(p["W"].shape[0], 1)], 1)
    out = get_method("dfr")(RepairInputs(X=X, y=p["y"], W=W, b=p["b"], groups=p["groups"], seed=0))
    Xt, yt, gt = p["test"]
    from repair import selection as Sel

    wga = float(Sel.worst_group_accuracy(torch.cat([Xt * s, torch.ones(len(Xt), 1)], 1) @ out.W.T + out.b, yt, gt))
    assert wga > float(_wga(p, p["W"], p["b"])) + 0.1, wga
    assert constant_features(torch.tensor([3e-7, 5e-7, 8e-7, 0.0]), torch.tensor([1e-6, 2e-6, 0.0, 1.0])).tolist() \
        == [False, False, False, True]
