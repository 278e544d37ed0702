"""`python -m bench.run --smoke`: the benchmark end to end on a tiny synthetic task."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_bench_smoke_writes_complete_finite_results(tmp_path):
    from bench.rows import AUTO, ERM, REF_DFR, REF_PSEUDO_DFR, model_rows_for, variant_label
    from bench.run import main
    from bench.tasks import VARIANTS
    from repair.methods import list_methods

    threads = torch.get_num_threads()
    try:
        rc = main(["--smoke", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    import gc
    assert gc.get_freeze_count() == 0       # the objects the measurements froze are handed back
    out = tmp_path / "out"
    assert (out / "RESULTS.md").read_text().startswith("# Benchmark results")
    if importlib.util.find_spec("matplotlib") is not None:  # an optional (bench extra) dependency
        assert (out / "wga.png").stat().st_size > 1000
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["smoke"] is True and doc["meta"]["complete"] is True
    assert set(doc["meta"]["parts"]) == {"head", "model", "scale"}
    for key in ("cpu", "cores", "versions"):
        assert key in doc["meta"]["machine"]
    task = doc["tasks"]["smoke"]
    assert set(task["variants"]) == set(VARIANTS)
    # the skewed repair set: every class keeps its majority group whole and ~20% of it as minority
    counts = task["variants"]["skewed"]["group_counts"]
    assert counts == {"cross|blue": 24, "cross|red": 5, "square|blue": 5, "square|red": 24}
    assert task["variants"]["skewed"]["embedding"]["n_val"] == 58

    # every registered head method, with / without group labels as it allows, plus ERM, auto, the
    # references, and the model rows
    expected = {ERM, REF_DFR, REF_PSEUDO_DFR, variant_label(AUTO, False), variant_label(AUTO, True)}
    for m in list_methods(kind="head"):
        if m.uses_groups:
            expected.add(variant_label(m.name, True))
        if not m.needs_groups:
            expected.add(variant_label(m.name, False))
    from bench import tasks as T
    smoke = T._load_task("smoke", Path(task["paths"]["model"]).parent, task["info"])
    # every model row on the first repair set; on the others, each method's own row and the built-in
    # recipes' (a smoke run's rows that vary options run once)
    first = VARIANTS[0]                                     # the run names no --variants: all, in order
    model_rows = {v: {variant_label(s.label, g) for s in model_rows_for(smoke) for g in s.groups
                      if v == first or s.label == s.method or s.recipe is not None} for v in VARIANTS}
    assert any(k.startswith("finetune") for k in model_rows[VARIANTS[-1]])
    assert {"mixft[no-groups]", "clp[no-groups]", "recompose[no-groups]", "auto-ft[no-groups]"} <= model_rows[VARIANTS[-1]]
    assert len(model_rows[first]) > len(model_rows[VARIANTS[-1]])
    for vname, v in task["variants"].items():
        assert len(v["runs"]) == 1 and v["runs"][0]["seed"] == 0
        rows = v["runs"][0]["rows"]
        want = expected | model_rows[vname]
        missing = want - set(rows)
        assert not missing, (vname, missing)
        assert not {k for k, r in rows.items() if r.get("kind") == "model"} - model_rows[vname], vname
        for label in want:
            row = rows[label]
            assert "error" not in row, (vname, label, row.get("error"), row.get("traceback"))
            t = row["test"]
            assert 0.0 <= t["worst_group_accuracy"] <= t["accuracy"] <= 1.0, label
            assert len(t["per_group"]) == 4 and all(_finite_number(x) for x in t["per_group"].values())
        for label in want:
            s = v["summary"][label]
            assert s["n_seeds"] == 1
            for key in ("wga", "acc"):
                assert _finite_number(s[key]["mean"]) and _finite_number(s[key]["std"]), (label, key)
    target = next(r for r in doc["targets"] if r["task"] == "smoke" and r["variant"] == "skewed")
    assert _finite_number(target["auto_free_minus_pseudo"]) and _finite_number(target["auto_free_minus_ref"])
    scale = doc["scale"]["problems"]
    assert set(scale) == {"2", "10"}
    for p in scale.values():
        assert _finite_number(p["speedup"]) and p["speedup"] > 0 and _finite_number(p["memory_ratio"])
        assert 0.0 <= p["rows"]["dfr[groups]"]["wga"] <= 1.0
        for lab in ("auto[groups]", "auto[no-groups]"):      # auto's whole selection against the protocol
            assert 0.0 <= p["rows"][lab]["wga"] <= 1.0 and p["rows"][lab]["chosen"]["candidate"]
            assert _finite_number(p["auto_over_protocol"][lab]) and p["auto_over_protocol"][lab] > 0
    md = (out / "RESULTS.md").read_text()
    assert "| auto[no-groups] |" in md and "of the protocol" in md
    # each part line names the machine and library versions its figures were measured with, and each table
    # how many seeds each row holds
    for part in doc["meta"]["parts"].values():
        assert part["machine"]["versions"]["torch"] == torch.__version__
    assert f"torch {torch.__version__}" in next(x for x in md.splitlines() if x.startswith("- `head`: "))
    assert "| seeds (balanced / skewed) |" in md and "| auto[no-groups] | no | 1 / 1 |" in md
    assert "## Solver at scale" in md and "## Targets" in md and "skewed WGA" in md


    # a partial rerun of another seed drops no run of the seeds before it, and keeps the part's earlier line
    before = {v: sorted(r["seed"] for r in x["runs"]) for v, x in task["variants"].items()}
    rows_before = {v: {r["seed"]: set(r["rows"]) for r in x["runs"]} for v, x in task["variants"].items()}
    try:
        rc = main(["--smoke", "--no-spuco", "--parts", "head", "--seeds", "9", "--variants", "balanced",
                   "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    for v, x in doc["tasks"]["smoke"]["variants"].items():
        assert sorted(r["seed"] for r in x["runs"]) == sorted(before[v] + ([9] if v == "balanced" else []))
        assert all(set(r["rows"]) >= rows_before[v][r["seed"]] for r in x["runs"] if r["seed"] != 9)
    head = doc["meta"]["parts"]["head"]
    assert head["seeds"] == [9] and [a["seeds"] for a in head["also"]] == [before["balanced"]]

def test_merge_notes_a_different_build_of_a_task():
    from bench.run import merge_docs

    def doc(acc, wga, command):
        return {"tasks": {"t": {"info": {"erm_test": {"accuracy": acc, "worst_group_accuracy": wga}},
                                "variants": {"balanced": {"runs": [{"seed": 0, "rows": {"x": {"wga": 0.5}}}]}}}},
                "meta": {"command": command, "parts": {}}}

    same = merge_docs(doc(0.8, 0.5875, "a"), doc(0.8, 0.5875, "b"))
    assert not same.get("notes")
    other = merge_docs(doc(0.8, 0.5875, "a"), doc(0.76875, 0.535, "python -m bench.run --parts cost"))
    assert len(other["notes"]) == 1
    note = other["notes"][0]
    assert note.startswith("t: ") and "76.9% accuracy, 53.5% worst group" in note and "80.0% accuracy" in note
    assert "--parts cost" in note
    # the report keeps describing its own build
    assert other["tasks"]["t"]["info"]["erm_test"]["accuracy"] == 0.8


def test_merge_compares_checkpoint_digests_when_both_runs_have_them(tmp_path):
    from bench.run import merge_docs
    from bench.tasks import checkpoint_digest

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"weights")
    d1 = checkpoint_digest(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"weights2")
    d2 = checkpoint_digest(tmp_path / "m")
    assert d1 != d2 and len(d1) == 64

    def doc(digest, acc):
        return {"tasks": {"t": {"info": {"checkpoint_sha256": digest,
                                         "erm_test": {"accuracy": acc, "worst_group_accuracy": 0.5}}}},
                "meta": {"command": "c", "parts": {}}}

    # the same ERM figures, different checkpoints: noted; the same checkpoint: nothing
    assert merge_docs(doc(d1, 0.8), doc(d2, 0.8))["notes"]
    assert not merge_docs(doc(d1, 0.8), doc(d1, 0.8)).get("notes")


def test_replace_tasks_drops_the_old_build_before_merging():
    # rows of a rebuilt task that the new runs do not re-measure must not stay beside theirs
    from bench.run import drop_tasks, merge_docs, parse_args

    def doc(acc, rows, command, costs=None):
        t = {"info": {"erm_test": {"accuracy": acc, "worst_group_accuracy": 0.5}},
             "variants": {"balanced": {"runs": [{"seed": 0, "rows": rows}]}}}
        if costs:
            t["costs"] = costs
        return {"tasks": {"t": t, "u": {"info": {}, "variants": {}}}, "meta": {"command": command, "parts": {}},
                "notes": ["t: an old note", "u: kept"]}

    old = doc(0.8, {"a": {"wga": 0.1}, "b": {"wga": 0.2}}, "old", costs={"fix": 1})
    new = doc(0.7, {"a": {"wga": 0.3}}, "new")
    new["tasks"].pop("u")
    new["notes"] = []
    mixed = merge_docs(json.loads(json.dumps(old)), new)
    assert set(mixed["tasks"]["t"]["variants"]["balanced"]["runs"][0]["rows"]) == {"a", "b"}
    clean = merge_docs(drop_tasks(json.loads(json.dumps(old)), ["t"]), new)
    t = clean["tasks"]["t"]
    assert set(t["variants"]["balanced"]["runs"][0]["rows"]) == {"a"}
    assert t["info"]["erm_test"]["accuracy"] == 0.7 and "costs" not in t
    assert clean["notes"] == ["u: kept"] and "u" in clean["tasks"]
    with pytest.raises(SystemExit):
        parse_args(["--replace-tasks", "t"])


def test_the_auto_ft_row_of_the_benchmark_runs_what_the_recipe_runs():
    # auto-ft's mixft is the built-in recipe mixft-crossfit's (bench row mixft-cf2-p0) since the twenty-fourth
    # session, with the same heads and scheme as the bench recipe of the row auto-ft-defaults
    # (bench/recipes/auto-ft-mixft-defaults.yaml: auto-ft from the twentieth session to the twenty-fourth, mixft
    # at its defaults): when the recipe moves, this fails, and the rows get new figures on purpose; the rows that
    # vary the former LP-FT setting (mixft-lpft-wig-last*) keep it whole
    from bench.rows import _LPFT_WIG_LAST, MODEL_ROWS
    from repair.recipes import load_recipe

    ours = load_recipe("auto-ft")
    bench = load_recipe(str(ROOT / "bench" / "recipes" / "auto-ft-mixft-defaults.yaml"))
    heads = [(c.method, c.params) for c in ours.candidates if c.method != "mixft"]
    assert heads == [(c.method, c.params) for c in bench.candidates if c.method != "mixft"]
    assert [c.params for c in bench.candidates if c.method == "mixft"] == [{"settle_strength": "heldout",
                                                                           "early_stop": "anytime"}]
    crossfit = dict(next(r for r in MODEL_ROWS if r.label == "mixft-cf2-p0").params)
    assert [dict(c.params) for c in ours.candidates if c.method == "mixft"] == [crossfit]
    assert crossfit["cross_fit"] == ours.folds                 # cross-fitted on auto-ft's own folds
    assert (ours.folds, ours.repeats, ours.ensemble) == (bench.folds, bench.repeats, bench.ensemble)
    rows = {r.label: r.params for r in MODEL_ROWS
            if r.label.startswith("mixft-lpft-wig-last") or r.label == "mixft-lpft-last"}
    # (with the settle strength they were measured with: bench/rows.py pins it where they left it at its default)
    assert rows["mixft-lpft-wig-last"] == {**_LPFT_WIG_LAST, "settle_strength": "heldout"} and len(rows) >= 5
    # (_LPFT_WIG_LAST runs its whole schedule, patience 0: early_stop cannot act on it and is not pinned)
    for label, params in rows.items():   # each variant only adds options to the LP-FT setting
        assert {k: v for k, v in params.items() if k in _LPFT_WIG_LAST} == _LPFT_WIG_LAST, label
        assert params["settle_strength"] != "auto", label


def test_the_gpu_check_runs_every_part_in_a_dry_run(tmp_path):
    """``bench/gpu.sh --dry-run``: the GPU check's every part (demo, extraction, solver, model repair,
    ONNX export) on the CPU at small sizes, from the checkout (the project need not be installed on the
    lent machine), its figures in gpu.json and GPU.md under the given folder, ``bench/GPU.md`` (the
    real run's) untouched, and copies of both in ``$OUT`` (what the device tool brings back)."""
    import os
    import subprocess

    gpu_md = ROOT / "bench" / "GPU.md"
    before = gpu_md.stat().st_mtime_ns if gpu_md.exists() else None
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(tmp_path / "gpu")],
                       capture_output=True, text=True, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable}, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    assert doc["dry_run"] and doc["devices"] == ["cpu", "cpu-ref"]
    for part in ("demo", "extraction", "solver", "model_repairs", "onnx", "tests"):
        assert not (isinstance(doc[part], dict) and doc[part].get("error")), (part, doc[part])
    for col in ("cpu", "cpu-ref"):
        assert doc["extraction"][col]["wall_seconds"] > 0 and 0 <= doc["extraction"][col]["worst_group_accuracy"] <= 1
    # the model repairs: each method on the repair set, seed 0, on both columns, none failed or skipped
    mr = doc["model_repairs"]["rows"]
    assert {(r["method"], r["device"], r["variant"], r["seed"]) for r in mr} == {
        (m, d, "balanced", 0) for m in ("mixft", "clp", "recompose") for d in ("cpu", "cpu-ref")}
    assert all(0 <= r["test_worst_group"] <= 1 and r["fix_total_seconds"] > 0 for r in mr), mr
    rows = doc["solver"]
    assert {(x["method"], x["classes"], x["device"]) for x in rows} == {
        (m, c, d) for m, c in (("dfr", 2), ("mix", 2), ("dfr", 10)) for d in ("cpu", "cpu-ref")}
    assert all(not x.get("error") and x["test_worst_group"] > 0.3 for x in rows)
    assert doc["onnx"]["passed"] is True and doc["onnx"]["max_abs_diff"] < 1e-3
    # the solver's profile (on the CPU here: no kernel time), its costliest operators listed
    pr = doc["profile"]
    assert pr["fit_seconds"] > 0 and pr["classes"] == 2 and pr["top"] and pr["kernel_seconds"] == 0, pr
    md = (tmp_path / "gpu" / "GPU.md").read_text()
    assert "Solver profile: `dfr` with group labels, 2 classes, 3000x64" in md
    assert "failed" not in md and "FAILED" not in md and "| balanced | recompose | " in md
    # the test files: a dry run runs the two CUDA-only tests, which skip on the CPU, from the checkout
    assert [(t["file"], t["k"], t["exit_code"]) for t in doc["tests"]] == [
        ("tests/test_methods_contract.py", "cuda", 0), ("tests/test_solver.py", "cuda", 0)]
    assert all("skipped" in t["summary"] and "deselected" in t["summary"] for t in doc["tests"]), doc["tests"]
    assert (gpu_md.stat().st_mtime_ns if gpu_md.exists() else None) == before
    assert (out / "gpu.json").read_text() == (tmp_path / "gpu" / "gpu.json").read_text()
    assert (out / "GPU.md").read_text() == md


def test_the_gpu_report_marks_a_failed_part_and_keeps_the_others():
    """One part failing on the lent machine (an exporter missing, a command over its limit) is recorded
    with its error and shown as failed; the other parts' figures stay in the report."""
    from types import SimpleNamespace

    from bench.gpu import markdown

    doc = {"date": "d", "gpu": "g", "machine": "m", "versions": {"torch": "x"}, "devices": ["cuda", "cpu"],
           "demo": {"wall_seconds": 1.0},
           "extraction": {"cuda": {"wall_seconds": 2.0, "embedding_seconds": 0.5},
                          "cpu": {"error": "boom", "exit_code": 3}},
           "solver": [{"method": "dfr", "classes": 2, "device": "cuda", "fit_seconds": 0.4, "test_worst_group": 0.9},
                      {"method": "dfr", "classes": 2, "device": "cpu", "error": "RuntimeError: x"}],
           "model_repairs": {"error": "RuntimeError: y"}, "onnx": {"error": "over 240 s", "exit_code": None}}
    md = markdown(doc, SimpleNamespace(classes=[2], n=10, d=4))
    assert "| extraction (eval, no cache): wall s / embedding s | 2.0 / 0.5 | failed (see gpu.json) |" in md
    assert "| dfr[groups] 10x4, 2 classes: fit s / test WGA | 0.4 / 0.9 | failed (see gpu.json) |" in md
    assert "Failed parts (errors in gpu.json): onnx, model_repairs." in md


def test_the_gpu_report_tables_the_model_repairs_per_seed_with_the_cpu_beside():
    """GPU.md's model-repair table: CUDA's figure per seed with mean ± std (sample std), the first seed's
    time and GPU memory, the CPU's first seed beside it; a run the deadline stopped reads "skipped", a failed
    one "failed", and neither enters the mean."""
    from bench.gpu import model_repairs_md

    rows = [{"variant": "skewed", "method": "clp", "seed": s, "device": "cuda", "test_worst_group": w,
             "fix_total_seconds": 3.0 + s, "cuda_peak_mib": 100.0} for s, w in ((0, 0.8), (1, 0.9))]
    rows += [{"variant": "skewed", "method": "clp", "seed": 2, "device": "cuda", "skipped": "the time limit"},
             {"variant": "skewed", "method": "clp", "seed": 0, "device": "cpu", "test_worst_group": 0.85,
              "fix_total_seconds": 9.5},
             {"variant": "skewed", "method": "mixft", "seed": 0, "device": "cuda", "error": "RuntimeError: x"}]
    md = "\n".join(model_repairs_md({"task": "demo", "checkpoint_sha256": "ab" * 32, "budget": None, "rows": rows},
                                    "cuda", "cpu"))
    assert "| skewed | clp | 80.0, 90.0, skipped | 85.0 ± 7.1 | 3.0 | 100.0 | 85.0 | 9.5 |" in md
    assert "| skewed | mixft | failed | – | – | – | – | – |" in md
    assert "`abababababab`" in md


def test_the_report_carries_the_gpu_check_or_says_there_is_none(tmp_path):
    """RESULTS.md's "GPU check" section is bench/GPU.md (its title a section, its headings one level down);
    with no GPU.md it says that no GPU check was recorded rather than leaving the CUDA figures out silently."""
    from bench.report import _gpu_md

    L: list = []
    _gpu_md(L, tmp_path / "GPU.md")
    assert L[0] == "## GPU check\n" and "No GPU check recorded" in L[1]
    (tmp_path / "GPU.md").write_text("# GPU check (d)\n\n| part | cuda | cpu |\n## sub\n")
    L = []
    _gpu_md(L, tmp_path / "GPU.md")
    assert L[0] == "## GPU check (d)\n" and "| part | cuda | cpu |" in L and "### sub" in L


def test_the_gpu_check_reports_a_failing_test_file_and_one_the_deadline_stopped(tmp_path):
    """The GPU check's test files: a failing file is recorded with its exit code, summary and output tail and
    marked FAILED in GPU.md; a file the deadline leaves no time for is skipped, not run."""
    import time

    from bench.gpu import markdown, test_rows

    bad = tmp_path / "test_fails.py"
    bad.write_text("def test_one():\n    assert 1 == 2\n")
    rows = test_rows([(str(bad), None)], time.monotonic() + 120, lambda m: None)
    assert rows[0]["exit_code"] == 1 and "1 failed" in rows[0]["summary"] and "assert 1 == 2" in rows[0]["tail"]
    assert test_rows([(str(bad), None)], time.monotonic() + 5, lambda m: None)[0]["skipped"]
    doc = {"date": "d", "gpu": "g", "machine": "m", "versions": {}, "devices": ["cuda", "cpu"], "tests": rows}
    from types import SimpleNamespace

    md = markdown(doc, SimpleNamespace(classes=[], n=1, d=1))
    assert f"`{bad}` " in md and "1 failed" in md and "**FAILED**" in md


def test_a_packed_text_task_carries_a_smaller_checkpoint_with_the_same_outputs(tmp_path):
    """``bench.carry``: a text task packed for the lent GPU machine keeps only the word-embedding rows its
    texts use, and unpacked gives the original's logits on every text of the task, exactly; the rows no
    text uses are zero, the others and every other tensor the original's."""
    from safetensors.torch import load_file

    from bench import carry
    from tests.conftest import make_bert_folder

    task = tmp_path / "task"
    make_bert_folder(task / "model")
    (task / "data").mkdir()
    (task / "data" / "val.csv").write_text("text,label\nthe movie was great,positive\nnot fun,negative\n")
    (task / "data" / "test.jsonl").write_text('{"text": "the plot is awful", "label": "negative"}\n')
    (task / "task.json").write_text(json.dumps({"model_dir": "model", "modality": "text"}))
    packed = carry.pack(task, tmp_path / "packed")
    assert packed["rows"] == 19 and 5 <= packed["rows_kept"] < 19, packed
    assert carry.verify(task, tmp_path / "packed") == {"texts": 3, "max_abs_diff": 0.0}
    carry.unpack(tmp_path / "packed", tmp_path / "back")
    a = load_file(str(task / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    key = next(k for k in a if k.endswith("word_embeddings.weight"))
    kept = load_file(str(tmp_path / "packed" / "model" / "model.safetensors"))[carry.ROWS_KEY]
    used = torch.zeros(a[key].shape[0], dtype=torch.bool)
    used[kept] = True
    assert int(used.sum()) == packed["rows_kept"] and bool((a[key][used] == b[key][used]).all())
    assert not b[key][~used].any()          # the rows no text uses come back as zeros
    assert all(bool((a[k] == b[k]).all()) for k in a if k != key)
    assert "carried" in json.loads((tmp_path / "back" / "task.json").read_text())


def test_a_model_repairs_record_keeps_how_training_stopped_when_every_tensor_changed():
    """A benchmark row's ``model_change`` of a repair that trained every layer (105 tensors of MiniLM) was cut
    to truncated text by the record's size limit, losing ``stopped_by``; the list is now cut to its count."""
    from bench.measure import _jsonable
    from bench.rows import _short_change

    mc = {"changed_tensors": [f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(105)],
          "steps": 48, "stopped_by": "early stopping", "settle": {"alpha": 1.0}}
    assert "stopped_by" not in _jsonable(mc)
    kept = _jsonable(_short_change(mc))
    assert kept["stopped_by"] == "early stopping" and kept["changed_tensors"]["count"] == 105
    assert _short_change({"changed_tensors": ["classifier.weight"], "stopped_by": "epochs"})["changed_tensors"] == [
        "classifier.weight"]


def test_auto_ft_against_auto_is_paired_on_the_seeds_both_ran():
    """`auto-ft − auto` compares the two on the same splits: the mean of each seed's difference over the
    seeds both ran, not the difference of means over different seed sets."""
    from bench.report import paired_pts

    def run(seed, **wga):
        return {"seed": seed, "rows": {lab: {"test": {"worst_group_accuracy": w}} for lab, w in wga.items()}}

    runs = [run(0, a=0.70, b=0.60), run(1, a=0.80, b=0.75), run(2, b=0.10), run(3, a=0.5)]
    diff, n = paired_pts(runs, "a", "b")
    assert n == 2 and abs(diff - 7.5) < 1e-9          # seeds 0 and 1 only: (10 + 5) / 2
    assert paired_pts(runs, "a", "missing") == (None, 0)


def test_the_report_says_which_runs_returned_the_original_body():
    """The issue-19 table's "original body (runs)": from `model_change.body_changed` when recorded, else
    from the changed tensors (at most the head's two: the original body; a count kept for a long list:
    trained); a record that does not say is not counted."""
    from bench.report import body_unchanged, body_unchanged_count

    assert body_unchanged({"model_change": {"body_changed": False, "changed_tensors": ["a", "b", "c"]}}) is True
    assert body_unchanged({"model_change": {"body_changed": True}}) is False
    assert body_unchanged({"model_change": {"changed_tensors": ["fc.weight", "fc.bias"]}}) is True
    assert body_unchanged({"model_change": {"changed_tensors": {"count": 40, "first": []}}}) is False
    assert body_unchanged({"model_change": {"truncated": "..."}}) is None and body_unchanged(None) is None
    runs = [{"rows": {"r": {"model_change": {"body_changed": False}}}}, {"rows": {"r": {"model_change": {}}}},
            {"rows": {"r": {"model_change": {"changed_tensors": {"count": 13}}}}}, {"rows": {}}]
    assert body_unchanged_count(runs, "r") == "1/2" and body_unchanged_count([], "r") == "–"


def test_marks_rest_on_what_the_target_says():
    """"≤ 10 min per run" on the slowest seed, "no less accurate" with no tolerance, a std over fewer seeds
    than the target names not measured (neither met nor missed)."""
    from bench.report import scale_table, summarise, targets
    from bench.rows import AUTO, variant_label
    from bench.scale import accuracy_met

    def run(seed, secs, wga):
        rows = {variant_label("mixft", False): {"kind": "model", "test": {"worst_group_accuracy": wga, "accuracy": 0.9},
                                                "fix_total_seconds": secs},
                variant_label(AUTO, False): {"kind": "auto", "test": {"worst_group_accuracy": 0.6, "accuracy": 0.9}}}
        return {"seed": seed, "rows": rows}

    runs = [run(0, 621.0, 0.7), run(1, 579.0, 0.72), run(2, 583.0, 0.71)]
    doc = {"tasks": {"t": {"info": {"modality": "text"},
                           "variants": {"balanced": {"runs": runs, "summary": summarise(runs)}}}}}
    (r,) = targets(doc)
    assert r["mixft_seconds"] == 621.0 and r["t10_mixft_time"] is False
    assert r["t9_std"] is None                      # 3 seeds: the ≥ 5-seed target is not measured
    assert accuracy_met({"wga": 0.804, "acc": 0.867}, {"wga": 0.807, "acc": 0.869}) is False
    assert accuracy_met({"wga": 0.81, "acc": 0.87}, {"wga": 0.807, "acc": 0.869}) is True
    sc = {"problems": {"1000": {"embeddings_mib": 391.0, "seconds_met": True, "accuracy_met": True,
                                "rows": {"dfr[groups]": {"seconds": 25.0, "peak_rss_mib": 626.0, "wga": 0.804, "acc": 0.867},
                                         "ref:sklearn-lbfgs": {"seconds": 14.0, "peak_rss_mib": 600.0, "wga": 0.807,
                                                               "acc": 0.869}}}}}
    assert any("accuracy **missed**" in line for line in scale_table(sc))      # the recorded mark is not trusted



def test_development_analyses_score_on_the_repair_set_never_on_test():
    """`bench.rows.development_data`: the analysis scripts' default split is the repair set cut in two
    halves by group; nothing of the test split is in it."""
    from bench.rows import TaskData, development_data

    g = torch.tensor([0] * 10 + [1] * 6 + [2] * 4)
    X = torch.arange(20, dtype=torch.float32)[:, None].repeat(1, 3)
    td = TaskData(task=None, variant="balanced", data=Path("."), X_val=X, y_val=g % 2, g_val=g,
                  X_test=torch.full((5, 3), -1.0), y_test=torch.zeros(5, dtype=torch.long),
                  g_test=torch.zeros(5, dtype=torch.long), test_group_names=["t"], class_names=["a", "b"],
                  W0=torch.zeros(2, 3), b0=torch.zeros(2), embed_seconds={}, val_group_names=["x", "y", "z"])
    d = development_data(td, seed=3)
    fit, held = d.X_val[:, 0].long().tolist(), d.X_test[:, 0].long().tolist()
    assert sorted(fit + held) == list(range(20)) and not set(fit) & set(held)
    assert set(d.g_val.tolist()) == set(d.g_test.tolist()) == {0, 1, 2}
    assert d.test_group_names == ["x", "y", "z"] and (d.X_test >= 0).all()


def test_a_rerun_keeps_the_lines_of_the_runs_whose_rows_stay():
    """A part's earlier lines stay while rows they measured stay; a rerun of every task and row on all
    their seeds replaces them (a review: each rerun appended a line for rows it had replaced)."""
    from types import SimpleNamespace

    from bench.run import earlier_lines

    args = SimpleNamespace(tasks=None, variants=None, model_rows=None, model_groups="both")
    earlier = {"seeds": [0, 1], "date": "d1", "also": [{"seeds": [3], "date": "d0"}]}
    assert earlier_lines(earlier, {"seeds": [0, 1]}, args, "head") == [{"seeds": [3], "date": "d0"}]
    assert earlier_lines(earlier, {"seeds": [0, 1, 3]}, args, "head") == []
    some = SimpleNamespace(**{**vars(args), "tasks": ["demo"]})
    assert [e["date"] for e in earlier_lines(earlier, {"seeds": [0, 1, 3]}, some, "head")] == ["d0", "d1"]
    assert earlier_lines(None, {"seeds": [0]}, args, "head") == []


def test_a_merged_scale_run_is_the_scale_parts_only_run_in_the_header():
    # the scale section is replaced whole by a merged scale run: the header names that run alone (the
    # earlier one has no row left), where a merged cost or head run is listed beside the earlier ones
    from bench.run import merge_docs

    def doc(when, command, parts):
        return {"tasks": {}, "scale": {"problems": {"2": {"rows": {"dfr[groups]": {"seconds": when}}}}},
                "meta": {"command": command, "parts": {p: {"date": when} for p in parts}}}

    old = doc(1, "old", ("scale", "cost"))
    new = doc(2, "new", ("scale", "cost"))
    merged = merge_docs(old, new)
    assert merged["scale"]["problems"]["2"]["rows"]["dfr[groups]"]["seconds"] == 2
    assert merged["meta"]["parts"]["scale"] == {"date": 2, "merged_from": "new"}
    assert merged["meta"]["parts"]["cost"]["date"] == 1 and merged["meta"]["parts"]["cost"]["also"][0]["date"] == 2
