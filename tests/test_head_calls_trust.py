"""Head repairs and ``choose_heads`` through the Python library, found by an audit: a head repair called
directly on labels that miss a class of the head returned a head that never predicts that class (one class
alone: a head predicting it everywhere), without a word; ``choose_heads`` kept its warnings only in a log
the default drops."""
from __future__ import annotations

import pytest
import torch

from repair.choosing import choose_heads
from repair.methods import BadArrays, FoldInputs, RepairInputs, get_method, list_methods

N, D, C = 60, 6, 3


def _arrays():
    X = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    W0 = torch.randn(C, D, generator=torch.Generator().manual_seed(1))
    return X, W0, torch.zeros(C)


@pytest.mark.parametrize("name", [m.name for m in list_methods() if m.kind == "head"])
def test_a_head_repair_refuses_labels_missing_a_class(name):
    X, W0, b0 = _arrays()
    info = get_method(name)
    g = torch.arange(N) % 2
    for y, words in ((torch.zeros(N, dtype=torch.long), "only one class"),
                     (torch.arange(N) % 2, "covers 2 of the model's 3 classes")):
        with pytest.raises(BadArrays, match=words) as e:
            info(RepairInputs(X=X, y=y, W=W0, b=b0, groups=g if info.uses_groups else None))
        assert str(e.value).startswith(name), str(e.value)
    # every class present: it runs; a fold of a selection may lack one (FoldInputs), as choose does
    out = info(RepairInputs(X=X, y=torch.arange(N) % C, W=W0, b=b0, groups=g if info.needs_groups else None))
    assert out.W.shape == (C, D)
    out = info(FoldInputs(X=X, y=torch.arange(N) % 2, W=W0, b=b0, groups=g if info.needs_groups else None))
    assert out.W.shape == (C, D)


def test_choose_heads_returns_its_warnings():
    torch.manual_seed(0)
    y = torch.arange(N) % 2
    X = torch.randn(N, 4, generator=torch.Generator().manual_seed(0))
    X[:, 0] += 6 * y
    W0 = torch.zeros(2, 4)
    W0[1, 0] = 1.0
    b0 = torch.tensor([0.0, -3.0])                 # the original head is already (nearly) perfect
    ch = choose_heads("auto", X, y, W0, b0)
    assert any("no candidate beats the original model" in w for w in ch.warnings), ch.warnings
    g = (torch.arange(N) // 2) % 2 + 2 * y
    ch = choose_heads("auto", X[:4], y[:4], W0, b0, g[:4])        # too few rows for the folds
    assert ch.selection is None and any("no candidate was compared" in w for w in ch.warnings), ch.warnings
