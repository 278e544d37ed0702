"""The benchmark's report says where, on which build and over how many seeds each figure was measured."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))


def test_an_unknown_model_row_is_refused_before_any_work(capsys):
    from bench.run import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--parts", "model", "--model-rows", "mixft", "no-such-row"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown --model-rows no-such-row" in err and "mixft" in err
    assert parse_args(["--parts", "model", "--model-rows", "mixft"]).model_rows == ["mixft"]


def _info(acc, digest=None):
    i = {"erm_test": {"accuracy": acc, "worst_group_accuracy": 0.155}}
    if digest:
        i["checkpoint_sha256"] = digest
    return i


def test_equal_erm_figures_do_not_make_a_fingerprinted_rebuild_the_same_build():
    # a rebuild with the same code and seed scored the report's ERM figures with other weights (and moved
    # head rows); only one of the two runs recorded its checkpoint's digest
    from bench.run import _other_build, _rebuilt_note

    note = _other_build("t", _info(0.5975), _info(0.5975, "ab" * 32), "python -m bench.run --parts head")
    assert note and note.startswith("t: ") and "may have measured another build" in note
    assert "abababababab" in note and "not recorded" in note and "59.8% accuracy" in note
    # both fingerprinted: the digests decide either way
    assert _other_build("t", _info(0.5975, "ab" * 32), _info(0.5975, "ab" * 32), "c") is None
    assert "measured another build" in _other_build("t", _info(0.5975, "cd" * 32), _info(0.5975, "ab" * 32), "c")
    # neither fingerprinted (runs from before digests): the ERM figures are all there is
    assert _other_build("t", _info(0.5975), _info(0.5975), "c") is None
    assert "measured another build" in _other_build("t", _info(0.5975), _info(0.6), "c")
    # a direct rerun on another build than the rows it keeps says the table now mixes both
    run_note = _rebuilt_note("t", _info(0.5975, "cd" * 32), _info(0.6, "ab" * 32), "python -m bench.run --parts head")
    assert run_note.startswith("t: `python -m bench.run --parts head` measured another build")
    assert "earlier runs'" in run_note and "report's" not in run_note
    assert _rebuilt_note("t", _info(0.5975, "ab" * 32), _info(0.5975, "ab" * 32), "c") is None


def test_merged_costs_take_the_build_notes_of_the_costs_they_replace():
    from bench.run import merge_docs

    def doc(command, digest, costs=True):
        t = {"info": _info(0.8, digest)}
        if costs:
            t["costs"] = {"ratio_fix_over_eval_warm": 1.1}
        return {"tasks": {"t": t}, "meta": {"command": command, "parts": {"cost": {"date": command, "seeds": None}}}}

    report = doc("python -m bench.run", "aa" * 32)
    report["notes"] = ["t: the merged run `python -m bench.run --parts cost --out-dir x` measured another build of "
                       "this task (checkpoint bbbbbbbbbbbb, the report's aaaaaaaaaaaa); its rows and figures are of "
                       "that build",
                       "t: the merged run `python -m bench.run --parts head,cost` measured another build (...)",
                       "u: the merged run `python -m bench.run --parts cost` measured another build (...)"]
    later = doc("python -m bench.run --parts cost --out-dir y", "aa" * 32)
    merged = merge_docs(json.loads(json.dumps(report)), later)
    # the costs of the first note's run are all replaced (the same build now): its note goes; the others stay
    assert merged["notes"] == report["notes"][1:]
    # the same run merged twice is one line of the part
    twice = merge_docs(json.loads(json.dumps(merged)), later)
    assert twice["meta"]["parts"]["cost"]["also"] == merged["meta"]["parts"]["cost"]["also"]
    assert len(twice["meta"]["parts"]["cost"]["also"]) == 1


def test_a_partial_run_that_measures_nothing_keeps_the_report_as_it_was(tmp_path):
    from bench.run import main

    out = tmp_path / "out"
    out.mkdir()
    info = {"checkpoint_sha256": "aa" * 32, "erm_test": {"accuracy": 0.5, "worst_group_accuracy": 0.25}}
    before = {"tasks": {"smoke": {"info": info, "variants": {"balanced": {"runs": [
                  {"seed": 0, "rows": {"x": {"kind": "model", "test": {"worst_group_accuracy": 0.5, "accuracy": 0.5}}}}]}}}},
              "notes": ["smoke: an earlier note about rows the report keeps"],
              "meta": {"parts": {"model": {"date": "earlier", "seeds": [0, 1, 2]}}}}
    (out / "results.json").write_text(json.dumps(before))
    threads = torch.get_num_threads()
    try:
        # a text-only row on the (image) smoke task: nothing applies, nothing is measured
        rc = main(["--smoke", "--parts", "model", "--model-rows", "mixft-all", "--work-dir", str(tmp_path / "work"),
                   "--out-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["notes"] == before["notes"]
    assert doc["meta"]["parts"] == before["meta"]["parts"]
    assert doc["tasks"]["smoke"]["info"] == info          # still the build its rows were measured on
    assert doc["tasks"]["smoke"]["variants"]["balanced"]["runs"] == before["tasks"]["smoke"]["variants"]["balanced"]["runs"]


def test_a_rebuild_is_noted_only_while_rows_of_the_other_build_are_left():
    from types import SimpleNamespace

    from bench.run import _measured_items, _task_measured

    def entry():
        return {"info": _info(0.5, "aa" * 32), "variants": {"balanced": {"runs": [
            {"seed": 0, "rows": {"h": {"kind": "head"}, "m": {"kind": "model"}}}]}}}

    task = SimpleNamespace(info=_info(0.5, "bb" * 32), group_by="g", to_json=lambda: {})
    doc = {"notes": ["t: the merged run `python -m bench.run --parts head` may have measured another build of this "
                     "task (x); its rows and figures may differ from the report's build's", "t: something else"]}
    e = entry()
    before = _measured_items(e)
    e["variants"]["balanced"]["runs"][0]["rows"]["h"] = {"kind": "head", "new": True}      # the model row is left
    _task_measured(doc, "t", e, task, before, "python -m bench.run --parts head")
    assert e["info"]["checkpoint_sha256"] == "bb" * 32
    assert any("another build of this task than the earlier runs" in n for n in doc["notes"])
    e2 = entry()
    before = _measured_items(e2)
    e2["variants"]["balanced"]["runs"][0]["rows"] = {"h": {"kind": "head"}, "m": {"kind": "model"}}   # all re-measured
    _task_measured(doc, "t", e2, task, before, "python -m bench.run --parts head,model")
    assert doc["notes"] == ["t: something else"]          # nothing of another build left: its notes retired


def test_merging_a_task_the_report_does_not_hold_notes_no_other_build():
    from bench.run import merge_docs

    other = {"tasks": {"t": {"info": _info(0.5, "ab" * 32)}}, "meta": {"command": "c", "parts": {}}}
    assert not merge_docs({"tasks": {}, "meta": {"parts": {}}}, other).get("notes")


def test_the_note_rule_reads_parts_as_argparse_does():
    from bench.run import _costs_only_note

    note = "t: the merged run `python -m bench.run {}` measured another build of this task (x); its rows ..."
    assert _costs_only_note("t", note.format("--parts cost --out-dir x"))
    assert _costs_only_note("t", note.format("--parts=cost"))
    assert not _costs_only_note("t", note.format("--parts cost --parts head"))
    assert not _costs_only_note("t", note.format("--parts head,cost"))
    assert not _costs_only_note("t", "t: `python -m bench.run --parts cost` measured another build of this task "
                                     "than the earlier runs whose rows and costs it keeps (x)")


def test_a_run_merged_twice_is_one_line_and_report_only_says_where_it_was_written(tmp_path):
    from bench.measure import machine_info
    from bench.run import main, merge_docs

    run = {"tasks": {}, "meta": {"command": "python -m bench.run --parts cost", "parts": {"cost": {"date": "d1"}}}}
    once = merge_docs({"tasks": {}, "meta": {"parts": {}}}, run)
    twice = merge_docs(json.loads(json.dumps(once)), run)
    assert twice["meta"]["parts"]["cost"] == once["meta"]["parts"]["cost"] and "also" not in once["meta"]["parts"]["cost"]
    (tmp_path / "results.json").write_text(json.dumps(
        {"tasks": {}, "meta": {"command": "x", "date": "d", "machine": {"cpu": "elsewhere", "versions": {}}, "parts": {}}}))
    assert main(["--report-only", "--out-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["machine"]["cpu"] == machine_info()["cpu"]


def test_the_tables_say_over_how_many_seeds_and_under_which_label_each_row_was_measured():
    from bench.report import _row_origin_notes, summarise

    runs = [{"seed": s, "rows": {"mixft[no-groups]": {"kind": "model", "test": {"worst_group_accuracy": 0.5, "accuracy": 0.6},
                                                      **({"measured_as": "the row mixft-avgl2"} if s < 2 else {})},
                                 "gone-row[no-groups]": {"kind": "model", "test": {"worst_group_accuracy": 0.4, "accuracy": 0.5}}}}
            for s in (0, 1, 2)]
    runs[2]["rows"].pop("gone-row[no-groups]")
    vs = {"balanced": {"runs": runs, "summary": summarise(runs)}}
    assert vs["balanced"]["summary"]["gone-row[no-groups]"]["n_seeds"] == 2
    notes = _row_origin_notes(vs)
    assert "- `mixft[no-groups]` (balanced seeds 0, 1) was measured as: the row mixft-avgl2" in notes
    assert any("No longer in `bench/rows.py`" in n and "`gone-row[no-groups]`" in n and "mixft[" not in n
               for n in notes)


def test_the_export_target_is_reported_from_its_own_benchmark(tmp_path):
    from bench.report import _export_md

    L: list = []
    _export_md(L, tmp_path / "absent.json")
    assert "Not measured" in "\n".join(L) and "outside `python -m bench.run`" in "\n".join(L)
    rec = {"command": "python -m bench.export_speed --repeats 2", "date": "2026-12-07 19:00:00 UTC",
           "code": {"git_commit": "0123456789abcdef"}, "machine": {"cpu": "cpu X", "cores": 2,
                                                                    "versions": {"torch": "2.x", "transformers": "5.y"}},
           "n_samples": 512, "repeats": 2, "eval_median_s": 10.0, "export_median_s": 25.0,
           "ratio_export_to_eval": 2.5, "target_ratio": 2.0, "exporter": "dynamo", "fallback_messages": []}
    f = tmp_path / "export_speed.json"
    f.write_text(json.dumps(rec))
    L = []
    _export_md(L, f)
    md = "\n".join(L)
    assert "2.50×" in md and "**missed**" in md and "`0123456789ab`" in md and "transformers 5.y" in md
    rec.update(ratio_export_to_eval=1.5, export_median_s=15.0)
    f.write_text(json.dumps(rec))
    L = []
    _export_md(L, f)
    assert "**met**" in "\n".join(L)
