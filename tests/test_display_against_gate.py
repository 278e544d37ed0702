"""A figure below a gate is never shown as a value that meets it: 1999/2500 beside an 80% gate is 79.96%,
in `repair eval`'s table, `repair zoo`'s table and the HTML report, as the gate's own line says."""
from __future__ import annotations

import torch

from repair.display import percent, points_delta


def _figures(k: int, n: int) -> dict:
    """What `repair eval` measures for two groups of ``n`` rows: group a|place=x right on ``k`` of them,
    b|place=y on all."""
    from repair.metrics import evaluate

    y = torch.zeros(2 * n, dtype=torch.long)
    y[n:] = 1
    g = torch.tensor([0] * n + [1] * n)
    pred = y.clone()
    pred[: n - k] = 1
    rep = evaluate(pred, y, ["a", "b"], g, ["a|place=x", "b|place=y"])
    rep["absent_groups"] = []
    return rep


def test_percent_keeps_a_figure_on_its_side_of_each_threshold():
    assert percent(1999 / 2500, against=[0.8]) == "79.96%"
    assert percent(1999 / 2500) == "80.0%"                         # no gate beside it: one decimal
    assert percent(0.8, against=[0.8]) == "80.0%"                  # met exactly: shown as met
    assert percent(4 / 5, against=[4 / 5 + 0.0]) == "80.0%"
    assert percent(2001 / 2500, against=[0.8]) == "80.04%"         # above: never shown as only equal
    assert percent(2 / 3, against=[0.8]) == "66.7%"                # far from it: one decimal
    assert percent(0.6666, against=[2 / 3]) == "66.66%"            # 66.7% would be above 2/3
    assert percent(0.9999996, against=[0.99]) == "99.99996%"       # 0 and 100 are always marks
    assert percent(None, against=[0.8]) == "-"
    assert points_delta(0.9996, 1.0) == "+0.04" and points_delta(0.5, 0.5) == "0.0"


def test_eval_and_zoo_tables_show_the_failing_figure_as_the_gate_line_does():
    from cli.format import eval_table
    from repair.rules import judge
    from repair_cli.zoo_cmd import zoo_table

    rep = _figures(1999, 2500)
    gate = judge(rep, "80%", "worst_group")
    assert not gate["passed"] and "79.96% < 80%" in gate["message"]
    rep["gates"] = [gate]
    table = eval_table(rep, "t")
    assert "worst-group=79.96% (a|place=x)" in table, table
    assert "80.0%" not in table, table
    # without a gate the same figures keep one decimal
    assert "worst-group=80.0%" in eval_table({**rep, "gates": []})

    doc = {"mode": "eval", "report": "r.html", "wall_seconds": 1.0, "interrupted": False,
           "summary": {"models": 1, "passed": 0, "failed": ["m"], "errors": [], "pending": []},
           "models": [{"name": "m", "status": "done", "gate": gate, "result": {"before": rep}}]}
    row = [line for line in zoo_table(doc).splitlines() if line.startswith("m ")][0]
    assert "79.96%" in row and "80.0%" not in row, row


def test_the_html_report_shows_the_failing_figure_as_the_gate_line_does():
    from repair.report import model_entry, render
    from repair.rules import judge

    rep = _figures(1999, 2500)
    gate = judge(rep, "80%", "worst_group")
    result = {"mode": "eval", "model": "m", "family": "timm", "before": rep, "candidates": [],
              "delta_histogram": None, "measured_on": "test"}
    doc = {"kind": "zoo", "manifest": "z.yaml", "mode": "eval", "executor": "local", "generated": "now",
           "wall_seconds": 1.0, "interrupted": False,
           "summary": {"models": 1, "passed": 0, "failed": ["m"], "errors": [], "pending": []},
           "models": [model_entry("m", result, gate=gate)]}
    html = render(doc)
    assert "79.96%" in html and "80.0%" not in html


def test_the_zoos_progress_line_shows_the_failing_figure_as_the_gate_line_does():
    from repair.rules import judge
    from repair.zoo import _progress_line

    rep = _figures(1999, 2500)
    gate = judge(rep, "80%", "worst_group")
    line = _progress_line({"before": rep}, gate)
    assert "79.96%" in line and "80.0%" not in line, line
