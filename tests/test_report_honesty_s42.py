"""Honest figures in the reports (audit of session 42): two groups never share a name (a report's bars looked
a row's figure up by name, so one group showed the other's), and a threshold with many decimals is shown on
its true side of the figure."""
from __future__ import annotations

import csv
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from conftest import make_timm_folder, run_cli


def test_two_groups_with_one_name_are_exit_2(tmp_path):
    """Class "a|g=b" with g=c and class "a" with g="b|g=c" are both group 'a|g=b|g=c': the zoo report's
    bars showed 100% for the group at 0% (the JSON was right)."""
    classes = ["a|g=b", "a", "c"]
    make_timm_folder(tmp_path / "m", classes=classes, seed=0)
    d = tmp_path / "val"
    d.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for ci, c in enumerate(classes):
        for i in range(6):
            arr = rng.integers(0, 255, size=(36, 36, 3), dtype=np.uint8)
            g = "c" if ci == 0 else ("b|g=c" if ci == 1 and i % 2 else "z")
            Image.fromarray(arr).save(d / f"i{ci}_{i}.png")
            rows.append({"img_filename": f"i{ci}_{i}.png", "y": c, "g": g})
    with open(d / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "g"])
        w.writeheader()
        w.writerows(rows)
    code, out, err = run_cli("eval", tmp_path / "m", "--data", d, "--group-by", "g")
    assert code == 2, err
    line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert "metadata.csv" in line and "'a|g=b|g=c'" in line and "two groups" in line, line


@pytest.mark.parametrize("k, n, thr, op", [(12, 36, "0.3333333333333334", "<"), (2, 3, "0.6666666666666666", ">="),
                                           (1, 3, "0.33333333333333334", ">="), (1, 3, "0.33333333333333329", ">="),
                                           (1, 3, "0.3333333333333334", "<")])
def test_a_threshold_of_many_decimals_is_shown_on_its_true_side(k, n, thr, op):
    """Past 12 decimals the threshold was rounded: "33.33% < 33.333333333333%" for 12/36, which is above
    33.333333333333%."""
    from repair.rules import show_against

    figure, threshold = Fraction(k, n), Fraction(thr)
    f, t = show_against(figure, threshold)
    if float(figure) == float(threshold):
        # the threshold is the figure's own double, which the gate counts as met (session 46): shown as met
        assert f == t and op == ">=", (f, t)
        return
    shown = Fraction(t[:-1]) / 100
    assert (figure >= shown) == (figure >= threshold) and figure != shown, (f, t)      # the true figure's side
    assert (Fraction(f[:-1]) >= Fraction(t[:-1])) == (op == ">="), (f, t)               # and the shown one's


def test_an_absolute_tolerance_is_described_as_it_is_applied():
    """`--tolerance X` bounds |difference| by X alone (no rounding term), but the JSON's bound described
    the relative rule with rounding 1e-05 (README audit)."""
    import torch

    from repair.export import Bound

    b = Bound(atol=1e-12, rtol=0.0, source="--tolerance (absolute max |diff|)")
    d = b.describe()
    assert d["rule"] == "|onnx - reference| <= atol per logit" and d["rounding"] == 0.0 and d["rtol"] == 0.0
    ref = torch.tensor([[1e4, 3.0]])
    assert torch.all(b.allowed(ref, bias=torch.tensor([1e4, 0.0])) == 1e-12)          # what applies: atol alone
    rel = Bound(atol=1e-6, rtol=1e-4, source="default").describe()
    assert "rtol" in rel["rule"] and rel["rounding"] > 0
