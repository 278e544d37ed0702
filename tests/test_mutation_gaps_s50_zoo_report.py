"""Tests that kill mutants a session-50 audit found surviving: the report's figures, gate marks, summary
line and page check (:mod:`repair.report`), a training budget's step count and what ended a run
(:mod:`repair.modelrepair.finetune`; the body settling keeps is asserted in test_steady), and the zoo's
lock, its staged files and its report folder when a journal append or a commit is refused (:mod:`repair.zoo`)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_zoo_parts, run_cli


# ------------------------------------------------------------------ report.py
def _figs(wga: float, acc: float = 0.6, wca: float = 0.5, n: int = 5) -> dict:
    """Figures as a fix measures them: one group ``g`` of ``n`` samples at accuracy ``wga``."""
    return {"n": 2 * n, "accuracy": acc, "worst_class_accuracy": wca, "worst_group_accuracy": wga,
            "worst_group": "g", "per_group": [{"name": "g", "n": n, "accuracy": wga}],
            "per_class": None, "per_inferred_group": None, "absent_groups": []}


def _fix_result(before: dict, after: dict) -> dict:
    """A :func:`repair.pipeline.fix_model` result with what :func:`repair.report.compact_fix` reads."""
    return {"model": {"source": "/models/m", "family": "timm"}, "output": "/out/m", "recipe": "dfr",
            "settings": {"seed": 0, "recipe_source": "builtin"}, "method": "dfr", "kind": "head",
            "candidate": "dfr", "selection_criterion": "worst-group", "candidates": [],
            "measured_on": "val (10 samples, groups by place)", "before": before, "after": after}


def test_headline_takes_a_worst_group_accuracy_of_zero_not_the_worst_class():
    from repair.report import headline

    assert headline({"worst_group_accuracy": 0.0, "worst_class_accuracy": 0.4}) == (0.0, "WGA")
    assert headline({"worst_group_accuracy": None, "worst_class_accuracy": 0.4}) == (0.4, "worst class")


def test_a_model_section_shows_the_after_worst_group_accuracy_in_the_after_column():
    from repair.report import compact_fix, model_entry, model_section

    page = model_section(model_entry("m", compact_fix(_fix_result(_figs(0.25), _figs(0.75)))))
    assert "<tr><td>worst-group accuracy</td><td class='num'>25.0%</td><td class='num'>75.0%</td></tr>" in page


def test_compact_fix_keeps_where_it_was_measured_and_the_worst_group():
    from repair.report import compact_fix, model_entry, model_section

    rep = _fix_result(_figs(0.2), dict(_figs(0.8), worst_group="h"))
    got = compact_fix(rep)
    assert got["measured_on"] == "val (10 samples, groups by place)"
    assert "measured on val (10 samples, groups by place)" in model_section(model_entry("m", got))
    assert got["before"]["worst_group"] == "g" and got["after"]["worst_group"] == "h"


def test_the_bar_chart_shows_the_after_figures_as_after():
    from repair.report import bar_chart

    svg = bar_chart(_figs(0.2), _figs(0.8))
    assert "<title>g before: 20.0%</title>" in svg and "<title>g after: 80.0%</title>" in svg
    assert "g after: 20.0%" not in svg


def test_a_failed_gate_is_said_failed_and_marked_fail():
    from repair.report import _gate_text, check_gate, compact_fix, model_entry, model_section

    result = compact_fix(_fix_result(_figs(0.2), _figs(0.2)))
    gate = check_gate(result, "0.5")
    assert gate["passed"] is False
    assert _gate_text(gate) == "FAILED: " + gate["message"]
    page = model_section(model_entry("m", result, gate=gate))
    assert '<p class="gate fail">gate: FAILED: ' in page and 'class="gate pass"' not in page
    ok = check_gate(result, "0.1")
    assert ok["passed"] is True and _gate_text(ok) == "passed: " + ok["message"]
    assert '<p class="gate pass">gate: passed: ' in model_section(model_entry("m", result, gate=ok))


def test_read_report_refuses_a_page_whose_generated_stamp_is_not_the_json_s(tmp_path):
    from repair.report import compact_fix, model_entry, read_report, write_report

    doc = {"kind": "fix", "generated": "2026-01-02T03:04:05+00:00",
           "models": [model_entry("m", compact_fix(_fix_result(_figs(0.2), _figs(0.8))))]}
    page, _ = write_report(tmp_path / "fix.html", doc)
    assert read_report(page)[0] == doc
    text = page.read_text()
    assert "generated 2026-01-02T03:04:05+00:00" in text
    page.write_text(text.replace("2026-01-02T03:04:05+00:00", "1999-01-01T00:00:00+00:00"))
    assert read_report(page) == (None, "fix.html is not the page written with fix.json")


def test_a_zoo_of_models_without_a_gate_does_not_say_0_passed():
    from repair.report import zoo_summary_line

    s = {"models": 1, "passed": 0, "failed": [], "no_gate": ["a"], "errors": [], "pending": []}
    assert zoo_summary_line({"summary": s}) == "1 model: 1 without a gate"
    s = dict(s, models=2, no_gate=["a"], failed=["b"])
    assert zoo_summary_line({"summary": s}) == "2 models: 1 failed the gate, 1 without a gate"


def test_the_summary_table_s_delta_wga_is_after_minus_before():
    from repair.report import compact_fix, model_entry, summary_table

    table = summary_table([model_entry("m", compact_fix(_fix_result(_figs(0.2), _figs(0.6))))], "fix")
    assert '<td class="num up" data-v="0.400000">+40.0</td>' in table
    table = summary_table([model_entry("m", compact_fix(_fix_result(_figs(0.6), _figs(0.2))))], "fix")
    assert '<td class="num down" data-v="-0.400000">' in table


# ------------------------------------------------------------------ finetune.py
def test_an_epoch_budget_rounds_its_steps_up():
    from repair.modelrepair.finetune import Budget

    assert Budget(epochs=0.5).step_limit(3, 10) == (2, "budget:epochs")
    assert Budget(epochs=0.1).step_limit(3, 10) == (1, "budget:epochs")


def test_a_run_that_takes_its_whole_step_budget_as_time_runs_out_ended_by_steps():
    """Its last step is the one the time ran out on: the steps ended it (the time cut nothing short)."""
    from repair.modelrepair.finetune import Budget, LoopConfig, train

    p = torch.nn.Parameter(torch.ones(3))

    def step(i, gen):
        time.sleep(0.02)                             # past the 0.01 s budget at the first (and last) step
        return (p ** 2).sum()

    res = train([p], step, None, LoopConfig(epochs=2, patience=0, warmup_fraction=0.0), steps_per_epoch=3,
                budget=Budget(steps=1, seconds=0.01), progress=False)
    assert (res.stopped_by, res.steps) == ("budget:steps", 1)
    res = train([p], step, None, LoopConfig(epochs=2, patience=0, warmup_fraction=0.0), steps_per_epoch=3,
                budget=Budget(steps=3, seconds=0.01), progress=False)
    assert (res.stopped_by, res.steps) == ("budget:time", 1)


# ------------------------------------------------------------------ zoo.py
def test_a_second_zoo_lock_on_one_folder_is_refused(tmp_path):
    from repair import zoo
    from repair.errors import BadInput

    fd = zoo._hold_lock(tmp_path)
    try:
        with pytest.raises(BadInput, match="another repair zoo is running on this folder"):
            zoo._hold_lock(tmp_path)
    finally:
        os.close(fd)
    os.close(zoo._hold_lock(tmp_path))                  # free again once the first is let go


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two tiny timm models and one small image set, copied per test."""
    return make_zoo_parts(tmp_path_factory.mktemp("zoo-gaps"))


def _fix_zoo(tmp_path: Path, parts: Path, rows: list[dict]) -> Path:
    """A fix-mode manifest over copies of ``m0``, ``m1`` and ``val``; each row's output ``out/NAME``."""
    for name in ("m0", "m1", "val"):
        shutil.copytree(parts / name, tmp_path / name)
    (tmp_path / "out").mkdir()
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "group_by": "place", "data": "val",
                                                 "output_dir": "out"}, "models": rows}, sort_keys=False))
    return path


def _journal_names(path: Path) -> list[str]:
    return [json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()]


def test_a_journal_append_refused_after_work_began_keeps_the_report_folder_and_discards_the_staged(
        tmp_path, parts, monkeypatch):
    """Row b's journal append is refused (a full disk): the zoo stops with exit 2, row a stays journaled
    and committed, the report folder the zoo created (journal, report) stays -- work had begun -- and
    row b's staged files are discarded (the journal does not vouch for them)."""
    from repair import zoo
    from repair.errors import BadInput

    path = _fix_zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}, {"name": "b", "checkpoint": "m1"}])
    folder, out = tmp_path / "zoo-zoo", tmp_path / "out"
    append = zoo.Journal.append

    def append_once(self, record):
        if record["name"] == "b":
            raise BadInput("no space left on the device", self.path)
        append(self, record)

    monkeypatch.setattr(zoo.Journal, "append", append_once)
    code, _, err = run_cli("zoo", path, "-q")
    assert code == 2 and "no space left on the device" in err, err
    assert folder.is_dir() and _journal_names(folder / "journal.jsonl") == ["a"]
    assert (folder / "zoo-report.html").is_file() and (folder / "zoo-report.json").is_file()
    assert not zoo.staging_dir(out / "b").exists() and not zoo.staging_dir(out / "a").exists()
    assert sorted(p.name for p in out.iterdir()) == ["a"] and (out / "a" / "model.safetensors").is_file()


def test_what_appears_at_a_row_s_output_before_its_commit_is_that_row_s_error_never_journaled(
        tmp_path, parts, monkeypatch):
    """An empty folder of the user's appears at row a's output once a finished (before the driver
    commits it): not this zoo's output, so without --force it is not replaced -- row a is an error
    before its journal line (none is written, its staged files are discarded), the folder stays as it
    was, row b finishes; a rerun without --force refuses the place by name before any work."""
    from repair import zoo

    path = _fix_zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}, {"name": "b", "checkpoint": "m1"}])
    folder, out = tmp_path / "zoo-zoo", tmp_path / "out"
    run_model = zoo.run_model

    def then_a_folder_appears(task):
        res = run_model(task)
        if task["entry"]["name"] == "a":
            (out / "a").mkdir()
        return res

    monkeypatch.setattr(zoo, "run_model", then_a_folder_appears)
    code, out_text, err = run_cli("zoo", path, "--json", "-q")
    assert code == 2, err
    doc = json.loads(out_text)
    by = {m["name"]: m for m in doc["models"]}
    assert {n: m["status"] for n, m in by.items()} == {"a": "error", "b": "done"}, doc
    assert str(out / "a") in by["a"]["error"] and "appeared while this run worked" in by["a"]["error"]
    assert _journal_names(folder / "journal.jsonl") == ["b"]
    assert not zoo.staging_dir(out / "a").exists()
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"] and list((out / "a").iterdir()) == []
    monkeypatch.setattr(zoo, "run_model", run_model)
    code, _, err = run_cli("zoo", path, "-q")
    assert code == 2 and str(out / "a") in err and "already exists" in err, err
    assert _journal_names(folder / "journal.jsonl") == ["b"] and list((out / "a").iterdir()) == []
    assert not zoo.staging_dir(out / "a").exists()
