"""`python -m bench.run --smoke`: the benchmark end to end on a tiny synthetic task."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_bench_smoke_writes_complete_finite_results(tmp_path):
    from bench.run import AUTO, ERM, REF_DFR, main, variant_label
    from repair.methods import list_methods

    threads = torch.get_num_threads()
    try:
        rc = main(["--smoke", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = tmp_path / "out"
    assert (out / "RESULTS.md").read_text().startswith("# Benchmark results")
    if importlib.util.find_spec("matplotlib") is not None:  # an optional (bench extra) dependency
        assert (out / "wga.png").stat().st_size > 1000
    doc = json.loads((out / "results.json").read_text())

    meta = doc["meta"]
    assert meta["smoke"] is True and meta["complete"] is True and meta["seeds"] == [0]
    for key in ("cpu", "cores", "versions"):
        assert key in meta["machine"]
    task = doc["tasks"]["smoke"]
    assert task["embedding"]["n_val"] == 96 and task["embedding"]["n_test"] == 128
    assert len(task["runs"]) == 1 and task["runs"][0]["seed"] == 0

    # every registered head method, with / without group labels as it allows, plus ERM, auto and DFR
    expected = {ERM, REF_DFR, variant_label(AUTO, False), variant_label(AUTO, True)}
    for m in list_methods(kind="head"):
        if m.needs_groups or m.uses_groups:
            expected.add(variant_label(m.name, True))
        if not m.needs_groups:
            expected.add(variant_label(m.name, False))
    rows = task["runs"][0]["methods"]
    missing = expected - set(rows)
    assert not missing, missing
    for label in expected:
        row = rows[label]
        assert "error" not in row, (label, row.get("error"), row.get("traceback"))
        t = row["test"]
        assert 0.0 <= t["worst_group_accuracy"] <= t["accuracy"] <= 1.0, label
        assert len(t["per_group"]) == 4 and all(_finite_number(v) for v in t["per_group"].values())
        assert _finite_number(row["fit_seconds"]) and row["fit_seconds"] >= 0

    summary = task["summary"]
    for label in expected:
        s = summary[label]
        assert s["n_seeds"] == 1
        for key in ("wga", "acc", "fit_seconds"):
            assert _finite_number(s[key]["mean"]) and _finite_number(s[key]["std"]), (label, key)

    cost = task["cost_summary"]
    assert _finite_number(cost["floor_seconds"]) and cost["floor_seconds"] > 0
    assert "errors" not in cost
    assert _finite_number(cost["dfr_reference_seconds"])
    assert all(_finite_number(v) and v > 0 for v in cost["speedup_vs_dfr_reference"].values())
    target = next(r for r in doc["targets"] if r["task"] == "smoke")
    assert _finite_number(target["auto_minus_ref_dfr_points"])
