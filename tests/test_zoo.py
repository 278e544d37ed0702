"""`repair zoo`: manifest validation before any work, local runs, gates, resume after SIGINT, and
the Ray executor on a local 2-CPU Ray (a worker killed with SIGKILL mid-model)."""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_images, make_timm_folder, run_cli, time_limit


PAUSE_PLUGIN = '''
"""A head method that, while BLOCK exists, writes its process id to PID and waits (so a test can
kill or interrupt it mid-model), then fits a class-balanced logistic head."""
import os
import time
from dataclasses import dataclass
from pathlib import Path

from repair import solver as S
from repair.config import setting
from repair.methods import AFFINE, RepairOutput, register_method

BLOCK, PID = Path({block!r}), Path({pid!r})


@dataclass
class PauseConfig:
    l2: float = setting(1.0, gt=0)


@register_method({method!r}, summary="waits while a file exists, then a balanced logistic head",
                 config=PauseConfig, groups="never", transform=AFFINE)
def pause(inputs, config):
    if BLOCK.exists():
        PID.with_suffix(".tmp").write_text(str(os.getpid()))
        os.replace(PID.with_suffix(".tmp"), PID)            # never seen half-written
        deadline = time.time() + 60
        while BLOCK.exists() and time.time() < deadline:
            time.sleep(0.05)
    X, y, W0, b0 = inputs.cpu_tensors()
    W, b, _ = S.fit_logreg(X, y, inputs.num_classes, sample_weight=S.class_balanced_weights(y, inputs.num_classes),
                           l2=config.l2)
    return RepairOutput(W=W[0], b=b[0], diagnostics={{}})
'''



@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three tiny timm models, one repair set, and a copy of it where every image is listed twice
    with two different labels (accuracy can never reach 90% there: a gate that must fail)."""
    root = tmp_path_factory.mktemp("zoo")
    for i in range(3):
        make_timm_folder(root / f"m{i}", seed=i)
    data = make_images(root / "val", n_per_class=12, seed=1)
    rows = list(csv.DictReader(open(data / "metadata.csv")))
    classes = sorted({r["y"] for r in rows})
    with open(data / "conflict.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        for r in rows:
            w.writerow(r)
            w.writerow({**r, "y": classes[(classes.index(r["y"]) + 1) % len(classes)]})
    return root


def manifest(folder: Path, rows: list[dict], name: str = "zoo.yaml", **defaults) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "group_by": "place", **defaults},
                                    "models": rows}, sort_keys=False))
    return path


def journal_names(path: Path) -> list[str]:
    return [json.loads(line)["name"] for line in path.read_text().splitlines()]


def pause_recipe(folder: Path, method: str) -> tuple[Path, Path, Path]:
    """A recipe whose one method pauses mid-model while ``block`` exists, its pid in ``pid``."""
    block, pid = folder / "block", folder / "pid"
    (folder / "pause.py").write_text(PAUSE_PLUGIN.format(block=str(block), pid=str(pid), method=method))
    (folder / "pause.yaml").write_text(f"name: pause\nplugins: [pause.py]\ncandidates:\n  - method: {method}\n")
    return folder / "pause.yaml", block, pid


# ------------------------------------------------------------------ validation: exit 2 before any work
BAD_ROWS = {
    "bad path": ({"checkpoint": "nope"}, "checkpoint", "not found"),
    "unknown recipe": ({"recipe": "dfrr"}, "recipe", "unknown recipe 'dfrr'"),
    "duplicate output": ({"output": "out/first"}, "output", "duplicate output"),
    "bad threshold": ({"gate": 150}, "gate", "0 to 1"),
    "unknown field": ({"grup_by": "place"}, "'grup_by'", "unknown field"),
    "missing group column": ({"group_by": "colour"}, "data", "no group column 'colour'"),
    "duplicate name": ({"name": "first"}, "name", "duplicate name"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_manifest_is_exit_2_naming_row_and_field_before_any_work(zoo, tmp_path, case):
    change, field, needle = BAD_ROWS[case]
    (tmp_path / "out").mkdir()
    good = {"name": "first", "checkpoint": str(zoo / "m0"), "data": str(zoo / "val"), "output": "out/first"}
    bad = {"name": "second", "checkpoint": str(zoo / "m1"), "data": str(zoo / "val"), **change}
    path = manifest(tmp_path, [good, bad])
    code, out, err = run_cli("zoo", path, "--out-dir", tmp_path / "report")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert str(path) in err and "row 2" in err and f", {field}: " in err and needle in err, err
    # nothing ran: no report folder, no journal, no output of the good row
    assert not (tmp_path / "report").exists() and not any((tmp_path / "out").iterdir())


def test_csv_manifest_with_defaults_and_an_existing_output(zoo, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").mkdir()                        # not written by this zoo
    path = tmp_path / "zoo.csv"
    path.write_text(f"# recipe: dfr\n# output_dir: out\nname,checkpoint,data,gate\n"
                    f"a,{zoo / 'm0'},{zoo / 'val'},70%\n")
    from repair.zoo import load_manifest

    (entry,) = load_manifest(path).entries
    assert entry.recipe == "dfr" and entry.gate == "70%" and entry.output == (tmp_path / "out" / "a")
    code, _, err = run_cli("zoo", path, "--allow-plugins")
    assert code == 2 and "row 1 (a), output: " in err and "already exists" in err and err.count("\n") == 1
    assert not (tmp_path / "zoo-zoo").exists()


def test_ray_option_without_ray_says_how_to_install(zoo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)            # import ray -> ImportError
    path = manifest(tmp_path, [{"checkpoint": str(zoo / "m0"), "data": str(zoo / "val")}], output_dir=str(tmp_path))
    code, _, err = run_cli("zoo", path, "--ray", "auto")
    assert code == 2 and err.count("\n") == 1 and "pip install" in err and "[zoo]" in err, err


# ------------------------------------------------------------------ local runs: gates, report, resume
def test_local_fix_gates_report_and_resume(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rows = [{"name": "pass", "checkpoint": str(zoo / "m0"), "data": str(zoo / "val"), "gate": 0},
            {"name": "fail", "checkpoint": str(zoo / "m1"), "data": str(zoo / "val" / "conflict.csv"),
             "gate": 0.9, "gate_metric": "accuracy"},
            {"name": "nogate", "checkpoint": str(zoo / "m2"), "data": str(zoo / "val"), "recipe": "neurontune"}]
    path = manifest(tmp_path, rows, output_dir="out")
    code, stdout, err = run_cli("zoo", path)
    assert code == 1, err
    assert err.strip().splitlines()[-1].startswith("FAILED: gate failed for 1 model(s): fail (")
    assert "pass" in stdout and "FAIL (accuracy " in stdout and "% < 90%)" in stdout
    report = tmp_path / "zoo-zoo"
    assert journal_names(report / "journal.jsonl") == ["pass", "fail", "nogate"]
    doc = json.loads((report / "zoo-report.json").read_text())
    assert doc["summary"]["failed"] == ["fail"] and doc["summary"]["passed"] == 1    # a model without a gate
    assert doc["summary"]["no_gate"] == ["nogate"]                                   # did not pass one
    assert "3 models: 1 passed, 1 failed the gate, 1 without a gate; report" in stdout
    for name in ("pass", "fail", "nogate"):                  # the repaired models are written (gate or not)
        assert (out / name / "model.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no staging or temporary leftovers
    html = (report / "zoo-report.html").read_text()
    assert html.count('<section class="model"') == 3 and 'class="sortable"' in html and "<svg" in html
    assert "<script src" not in html and "<link" not in html and "url(" not in html
    # resume: nothing is redone, nothing rewritten; the gate is applied again
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, err = run_cli("zoo", path)
    assert code == 1 and "3 finished before" in err and "0 to run" in err
    assert journal_names(report / "journal.jsonl") == ["pass", "fail", "nogate"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    # thresholds are not settings: a new gate is applied to the journaled figures, nothing reruns
    path.write_text(path.read_text().replace("gate: 0.9", "gate: 0"))
    code, stdout, err = run_cli("zoo", path, "--json")
    assert code == 0 and "0 to run" in err and json.loads(stdout)["summary"]["passed"] == 2
    # a changed setting reruns that model; its output exists (ours) so it is replaced
    path.write_text(path.read_text().replace("recipe: neurontune", "recipe: dfr"))
    code, stdout, err = run_cli("zoo", path, "--json", "--force")
    assert code == 0 and "1 to run" in err
    assert journal_names(report / "journal.jsonl") == ["pass", "fail", "nogate", "nogate"]


def test_eval_mode_gates_and_writes_only_the_report(zoo, tmp_path):
    rows = [{"name": "ok", "checkpoint": str(zoo / "m0"), "data": str(zoo / "val"), "gate": 0},
            {"name": "low", "checkpoint": str(zoo / "m1"), "data": str(zoo / "val" / "conflict.csv"),
             "gate": 0.9, "gate_metric": "accuracy"}]
    path = manifest(tmp_path / "m", rows)
    before = sorted(p.name for p in zoo.iterdir())
    code, stdout, err = run_cli("zoo", path, "--mode", "eval", "--out-dir", tmp_path / "r", "--json")
    assert code == 1 and "gate failed for 1 model(s): low" in err
    assert sorted(p.name for p in zoo.iterdir()) == before and sorted(os.listdir(tmp_path / "m")) == ["zoo.yaml"]
    # (and the driver's lock file, .zoo-lock)
    assert sorted(os.listdir(tmp_path / "r")) == [".zoo-lock", "journal.jsonl", "zoo-report.html", "zoo-report.json"]
    doc = json.loads(stdout)
    assert [m["result"]["after"] for m in doc["models"]] == [None, None]
    # each model's warnings (small groups, copies) are said on stderr too, named, as fix and eval say them
    said = [(m["name"], w) for m in doc["models"] for w in m["result"].get("warnings") or []]
    assert said and all(f"warning: {n}: {w}" in err for n, w in said), err
    rows[1]["gate"] = 0
    path = manifest(tmp_path / "m", rows)
    assert run_cli("zoo", path, "--mode", "eval", "--out-dir", tmp_path / "r")[0] == 0


def test_sigint_half_way_then_rerun_finishes_only_the_rest(zoo, tmp_path):
    recipe, block, pid = pause_recipe(tmp_path, "zoo_pause_sigint")
    (tmp_path / "out").mkdir()
    rows = [{"name": "a", "checkpoint": str(zoo / "m0"), "data": str(zoo / "val")},
            {"name": "b", "checkpoint": str(zoo / "m1"), "data": str(zoo / "val"), "recipe": str(recipe)},
            {"name": "c", "checkpoint": str(zoo / "m2"), "data": str(zoo / "val")}]
    path = manifest(tmp_path, rows, output_dir="out")
    block.touch()

    def interrupt_when_paused():
        # a real SIGINT to this process (the driver: the local executor runs the models in it), sent
        # only while model b waits in the plugin's loop, which cannot end before BLOCK is removed
        deadline = time.time() + 280        # the command's own limit is 300 s (a loaded machine is slow)
        while not pid.exists() and time.time() < deadline:
            time.sleep(0.05)
        if pid.exists():
            os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_when_paused, daemon=True)
    # Ctrl-C as a terminal delivers it: Python's own handler (a library loaded by an earlier test of
    # the suite may have left another one installed in this process)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watcher.start()
        with time_limit(300):
            code, _, err = run_cli("zoo", path, "--allow-plugins")
        watcher.join(timeout=5)
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 130 and pid.exists(), (err, before)
    assert "interrupted" in err
    report = tmp_path / "zoo-zoo"
    assert journal_names(report / "journal.jsonl") == ["a"]
    doc = json.loads((report / "zoo-report.json").read_text())
    assert doc["interrupted"] and doc["summary"]["pending"] == ["b", "c"]
    assert not (tmp_path / "out" / "b").exists() and not (tmp_path / "out" / "c").exists()
    a_mtime = (tmp_path / "out" / "a" / "model.safetensors").stat().st_mtime_ns
    block.unlink()
    code, _, err = run_cli("zoo", path, "--allow-plugins")
    assert code == 0, err
    assert "1 finished before" in err and "2 to run" in err
    assert journal_names(report / "journal.jsonl") == ["a", "b", "c"]
    assert (tmp_path / "out" / "a" / "model.safetensors").stat().st_mtime_ns == a_mtime
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_torn_journal_line_is_cut_off(tmp_path):
    from repair.zoo import Journal

    j = Journal(tmp_path / "j.jsonl")
    result = {"before": {"accuracy": 1.0}}
    j.append({"name": "a", "mode": "fix", "key": "k", "result": result})
    with open(j.path, "a") as f:
        f.write('{"name":"b","mo')                           # the driver died mid-write
    assert list(j.read()) == [("a", "fix")]
    j.append({"name": "b", "mode": "fix", "key": "k", "result": result})
    assert list(j.read()) == [("a", "fix"), ("b", "fix")]


# ------------------------------------------------------------------ Ray (a local 2-CPU Ray)
def _comparable(doc):
    return {m["name"]: (m["result"]["candidate"], m["result"]["before"], m["result"]["after"],
                        m["result"]["output_digest"]) for m in doc["models"]}


def test_ray_results_equal_local_and_survive_a_killed_worker(zoo, tmp_path):
    """`--ray auto --workers 2` (a local 2-CPU Ray started by the command): the same per-model
    results as the local executor, and a worker killed with SIGKILL in the middle of a model is
    retried: the run completes, every model is journaled once, outputs verify."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e \".[zoo]\")")
    from repair.adapters import load_model
    from repair.io import load_safetensors
    from repair.zoo import output_digest

    recipe, block, pid = pause_recipe(tmp_path, "zoo_pause_sigkill")
    rows = [{"name": "a", "checkpoint": str(zoo / "m0"), "data": str(zoo / "val")},
            {"name": "b", "checkpoint": str(zoo / "m1"), "data": str(zoo / "val"), "recipe": str(recipe)},
            {"name": "c", "checkpoint": str(zoo / "m2"), "data": str(zoo / "val"), "recipe": "neurontune"}]
    local = manifest(tmp_path / "local", rows, output_dir=str(tmp_path / "local"))
    code, stdout, err = run_cli("zoo", local, "--json", "--allow-plugins")
    assert code == 0, err
    local_doc = json.loads(stdout)

    on_ray = manifest(tmp_path / "ray", rows, output_dir=str(tmp_path / "ray"))
    block.touch()
    killed = []

    def kill_when_paused():                                 # SIGKILL the worker in the middle of model b
        deadline = time.time() + 560        # Ray starts slowly on a loaded machine; the command's limit is 600 s
        while not pid.exists() and time.time() < deadline:
            time.sleep(0.05)
        if pid.exists():
            killed.append(int(pid.read_text()))
            os.kill(killed[0], signal.SIGKILL)
            block.unlink()

    watcher = threading.Thread(target=kill_when_paused, daemon=True)
    watcher.start()
    with time_limit(600):
        code, stdout, err = run_cli("zoo", on_ray, "--allow-plugins", "--ray", "auto", "--workers", "2", "--max-retries", "2", "--json",
                                    "--cache-dir", tmp_path / "ray-cache")   # cold: b extracts, then is killed
    watcher.join(timeout=5)
    assert code == 0, err
    assert killed, "the paused model was never seen"
    ray_doc = json.loads(stdout)
    assert "Ray" in ray_doc["executor"]
    assert _comparable(ray_doc) == _comparable(local_doc)     # identical per-model results
    journal = tmp_path / "ray" / "zoo-zoo" / "journal.jsonl"
    assert sorted(journal_names(journal)) == ["a", "b", "c"]  # every model exactly once
    records = {json.loads(line)["name"]: json.loads(line) for line in journal.read_text().splitlines()}
    assert records["b"]["worker"].split(":")[-1] != str(killed[0])       # b finished on another worker
    assert records["b"]["result"]["timing"]["embedding_from_cache"]      # ... without extracting again
    for name, rec in records.items():                                    # outputs verify
        out = Path(rec["output"])
        assert output_digest(out) == rec["result"]["output_digest"]
        _, meta = load_safetensors(out / "model.safetensors")
        assert meta["repair.method"] == rec["result"]["method"] and load_model(out).family == "timm"
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]


def test_sigterm_is_143_with_nothing_partial_and_a_rerun_finishes(zoo, tmp_path):
    """SIGTERM (what CI timeouts send) unwinds like Ctrl-C: exit 143, the finished model journaled, the
    interrupted one leaves no staging or temp folder, a rerun finishes the rest."""
    from repair_cli.app import install_signal_handlers

    recipe, block, pid = pause_recipe(tmp_path, "zoo_pause_sigterm")
    (tmp_path / "out").mkdir()
    rows = [{"name": "a", "checkpoint": str(zoo / "m0"), "data": str(zoo / "val")},
            {"name": "b", "checkpoint": str(zoo / "m1"), "data": str(zoo / "val"), "recipe": str(recipe)}]
    path = manifest(tmp_path, rows, output_dir="out")
    block.touch()

    def term_when_paused():
        deadline = time.time() + 280
        while not pid.exists() and time.time() < deadline:
            time.sleep(0.05)
        if pid.exists():
            os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=term_when_paused, daemon=True)
    before = signal.getsignal(signal.SIGTERM)
    try:
        install_signal_handlers()
        watcher.start()
        with time_limit(300):
            code, _, err = run_cli("zoo", path, "--allow-plugins")
        watcher.join(timeout=5)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143 and "SIGTERM" in err, err
    report = tmp_path / "zoo-zoo"
    assert journal_names(report / "journal.jsonl") == ["a"]
    assert json.loads((report / "zoo-report.json").read_text())["interrupted"]
    assert not (tmp_path / "out" / "b").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    block.unlink()
    code, _, err = run_cli("zoo", path, "--allow-plugins")
    assert code == 0 and "1 finished before" in err, err


# ------------------------------------------------------------------ a plugin method that exits
EXIT_PLUGIN = '''
import sys
from dataclasses import dataclass

from repair.config import setting
from repair.methods import AFFINE, register_method


@dataclass
class ExitConfig:
    l2: float = setting(1.0, gt=0)


@register_method({method!r}, summary="calls sys.exit", config=ExitConfig, groups="never", transform=AFFINE)
def exiter(inputs, config):
    sys.exit(5)
'''


def exit_recipe(folder: Path, method: str) -> Path:
    (folder / "exiter.py").write_text(EXIT_PLUGIN.format(method=method))
    (folder / "exiter.yaml").write_text(f"name: exiter\nplugins: [exiter.py]\ncandidates:\n  - method: {method}\n")
    return folder / "exiter.yaml"


def test_a_plugin_method_that_exits_is_exit_2_naming_it_in_fix(zoo, tmp_path):
    recipe = exit_recipe(tmp_path, "zoo_exiter_fix")
    code, _, err = run_cli("fix", zoo / "m0", "--data", zoo / "val", "--recipe", recipe, "--allow-plugins",
                           "--out", tmp_path / "fixed", "-q")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "method zoo_exiter_fix" in last and "exiter.py" in last, err
    assert "exited (SystemExit 5)" in last and not (tmp_path / "fixed").exists()


def test_a_plugin_method_that_exits_is_that_models_exit_2_in_a_zoo(zoo, tmp_path):
    """The other models run, the report says why; no staging folder stays (local executor; on Ray
    the same BadInput is the task's result, so its worker is not killed and retried)."""
    recipe = exit_recipe(tmp_path, "zoo_exiter_zoo")
    (tmp_path / "out").mkdir()
    rows = [{"name": "exits", "checkpoint": str(zoo / "m0"), "data": str(zoo / "val"), "recipe": str(recipe)},
            {"name": "good", "checkpoint": str(zoo / "m1"), "data": str(zoo / "val")}]
    path = manifest(tmp_path, rows, output_dir="out")
    code, _, err = run_cli("zoo", path, "--allow-plugins")
    assert code == 2 and "exits (exit 2)" in err.strip().splitlines()[-1], err
    doc = json.loads((tmp_path / "zoo-zoo" / "zoo-report.json").read_text())
    by_name = {m["name"]: m for m in doc["models"]}
    assert by_name["exits"]["exit_code"] == 2 and "method zoo_exiter_zoo" in by_name["exits"]["error"]
    assert by_name["good"]["status"] == "done" and journal_names(tmp_path / "zoo-zoo" / "journal.jsonl") == ["good"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good"]


# ------------------------------------------------------------------ the gate in the tables
def test_zoo_tables_show_the_gates_metric_and_the_digits_that_decide_it():
    """A row gated at 71.34% with 71.33% measured: the HTML summary, the command's table and the
    progress line say so with the gate message's digits (rules._show_pct), never 71.3% >= 71.3%."""
    from repair.report import model_entry, summary_table
    from repair.rules import judge
    from repair.zoo import ZooOptions, _document, _progress_line
    from repair_cli.zoo_cmd import zoo_table

    figs = {"n": 10000, "accuracy": 0.7133, "worst_group_accuracy": 0.7133, "worst_class_accuracy": 0.7133,
            "worst_group": "x|g=1", "per_group": [{"name": "x|g=1", "n": 10000, "accuracy": 0.7133}],
            "per_class": []}
    result = {"mode": "eval", "before": figs, "after": None, "candidate": None}
    gate = judge(figs, "71.34%", "worst_group")
    assert not gate["passed"]
    doc = _document(Path("z.yaml"), ZooOptions(mode="eval"), "local", [model_entry("m", result, gate=gate)], False, 1.0)
    doc["report"] = "z-zoo/zoo-report.html"
    said = "worst-group accuracy 71.33% < 71.34%"
    assert f"FAIL ({said})" in zoo_table(doc)
    assert f'FAIL <span class="note">{said.replace("<", "&lt;")}</span>' in summary_table(doc["models"], "eval")
    assert f"gate FAIL ({said})" in _progress_line(result, gate)
    passed = judge(figs, "0.7", "accuracy")
    assert "pass (accuracy 71.33% >= 70%)" in zoo_table({**doc, "models": [model_entry("m", result, gate=passed)]})


def test_a_recipe_named_relatively_is_read_beside_the_manifest(zoo, tmp_path, monkeypatch):
    """The manifest's relative paths are relative to its folder, recipes too, by the one rule of what a
    recipe value names as a file (``recipes.names_file``): a bare name of no built-in that exists beside
    the manifest, and a name starting with a dot (an audit: both were read from the current folder)."""
    from repair.errors import BadInput
    from repair.zoo import load_manifest

    m = tmp_path / "M"
    m.mkdir()
    (m / "myrec").write_text("candidates: [{method: dfr}]\n")
    (m / ".r").write_text("candidates: [{method: mix}]\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "myrec").write_text("bogus: 1\n")                  # a file of that name here is not the one
    (cwd / ".r").write_text("bogus: 1\n")
    monkeypatch.chdir(cwd)
    rows = "".join(f"{n},{zoo / 'm0'},{zoo / 'val'},{r}\n" for n, r in (("a", "myrec"), ("b", ".r"), ("c", "dfr")))
    path = m / "zoo.csv"
    path.write_text("name,checkpoint,data,recipe\n" + rows)
    a, b, c = load_manifest(path, "eval").entries
    assert Path(a.recipe) == m / "myrec" and Path(b.recipe) == m / ".r"
    assert c.recipe == "dfr"                                   # a built-in stays the built-in
    # a bare name found only in the current folder is not read from there (the review's case)
    (cwd / "onlyhere").write_text("candidates: [{method: mix}]\n")
    path.write_text(f"name,checkpoint,data,recipe\na,{zoo / 'm0'},{zoo / 'val'},onlyhere\n")
    with pytest.raises(BadInput, match="unknown recipe .onlyhere.: neither built in"):
        load_manifest(path, "eval")


def test_zoo_options_yes_no_fields_are_true_or_false_only():
    """A string "no" is truthy: ZooOptions(force="no") must not replace outputs, nor allow_plugins="no"
    run a recipe's plugin code. Every bool field goes through data.check_bool (BadInput naming it)."""
    import dataclasses

    from repair.errors import BadInput
    from repair.zoo import ZooOptions

    bools = [f.name for f in dataclasses.fields(ZooOptions) if f.type in (bool, "bool")]
    assert set(bools) >= {"force", "allow_plugins"}
    for name in bools:
        for bad in ("no", "yes", 1, 0, None):
            with pytest.raises(BadInput, match=f"--{name.replace('_', '-')} must be true or false"):
                ZooOptions(**{name: bad})
        assert getattr(ZooOptions(**{name: True}), name) is True
