"""Every file in examples/ runs against a tiny demo (`repair demo --size tiny`, built once here):
the zoo manifests through `repair zoo`, the GitHub Actions job's shell steps (parsed from the YAML,
run as GitHub runs them, paths set through the env vars the job documents), the generic CI script
and the Python API script."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# GitHub's `shell: bash`: bash --noprofile --norc -eo pipefail {0}
BASH = shutil.which("bash") or "bash"
GITHUB_BASH = [BASH, "--noprofile", "--norc", "-eo", "pipefail"]
STEP_IF = re.compile(r"steps\.([A-Za-z0-9_-]+)\.outputs\.([A-Za-z0-9_-]+) == '([^']*)'")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="the CI examples are bash scripts")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding ``demo/`` (what `repair demo --size tiny --out demo` writes), shared by the
    tests of this file; each test copies the example it runs into it (paths relative to it)."""
    base = tmp_path_factory.mktemp("examples")
    with pytest.MonkeyPatch.context() as mp:   # the embedding cache the other tests of the session use
        mp.setenv("REPAIR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "embcache"))
        code, _, err = run_cli("demo", "--size", "tiny", "--out", base / "demo")
    assert code == 0, err
    for p in ("model/model.safetensors", "model-repaired/model.safetensors", "data/val/metadata.csv",
              "data/test/metadata.csv"):
        assert (base / "demo" / p).is_file(), p
    return base


@pytest.fixture(scope="module")
def repair_bin(tmp_path_factory) -> Path:
    """A folder with a ``repair`` command that runs this checkout's CLI with this interpreter (the
    scripts call ``repair`` from PATH)."""
    d = tmp_path_factory.mktemp("bin")
    exe = d / "repair"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m repair_cli.main "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return d


def shell_env(repair_bin: Path, **extra: str) -> dict:
    env = dict(os.environ, PATH=f"{repair_bin}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def copy_example(name: str, root: Path) -> Path:
    dst = root / name
    shutil.copyfile(EXAMPLES / name, dst)
    return dst


def journal_names(path: Path) -> list[str]:
    return [json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ zoo manifests
def test_yaml_manifest_repairs_every_model_and_gates(root: Path):
    manifest = copy_example("zoo.yaml", root)
    names = [m["name"] for m in yaml.safe_load(manifest.read_text())["models"]]
    assert len(names) >= 3
    code, out, err = run_cli("zoo", manifest, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["mode"] == "fix" and [m["name"] for m in doc["models"]] == names
    for m in doc["models"]:
        assert m["status"] == "done" and m["gate"]["passed"], m
        assert m["gate"]["metric"] == "worst_group"           # eval_group_by: place
        r = m["result"]
        assert r["after"]["worst_group_accuracy"] >= r["before"]["worst_group_accuracy"] + 0.2, m["name"]
        assert (root / "demo" / m["name"] / "model.safetensors").is_file()
    recipes = {m["name"]: m["result"]["recipe"] for m in doc["models"]}
    assert len(set(recipes.values())) >= 3, recipes            # several recipes, a model repair among them
    assert {m["result"]["kind"] for m in doc["models"]} == {"head", "model"}
    assert (root / "demo" / "birds-dfr-groups" / "model.onnx").is_file()   # the row with export: onnx
    out_dir = root / "zoo-zoo"                                  # <manifest stem>-zoo beside it
    assert doc["report"] == str(out_dir / "zoo-report.html")
    assert (out_dir / "zoo-report.html").is_file() and (out_dir / "zoo-report.json").is_file()
    assert journal_names(out_dir / "journal.jsonl") == names

    # the same manifest as a gate only: the checkpoints as they are (the ERM model) fail it
    code, out, err = run_cli("zoo", manifest, "--mode", "eval", "--json")
    assert code == 1, err
    assert json.loads(out)["summary"]["failed"] == names
    assert "FAILED: gate failed for" in err

    # examples/README.md states the tiny demo's repaired figures (an audit measured 40% where it said
    # 50-70%): every repaired row is inside the stated band, which spans what other CPUs' kernels train
    # (dfr 30% with MKL held to AVX2, auto 80% with SSE; the band is 30-80, checked with 5 points to spare)
    lo, hi = map(int, re.search(r"repaired models reach about (\d+)-(\d+)%",
                                " ".join((EXAMPLES / "README.md").read_text().split())).groups())
    for m in doc["models"]:
        assert lo - 5 <= 100 * m["result"]["after"]["worst_group_accuracy"] <= hi + 5, (m["name"], lo, hi)


def test_csv_manifest_gates_the_zoo(root: Path):
    from repair.zoo import load_manifest

    manifest = copy_example("zoo-gate.csv", root)
    # read as a repair would read it: defaults from the comment lines, outputs under demo/
    entries = load_manifest(manifest, mode="fix").entries
    assert len(entries) >= 3 and len({e.recipe for e in entries}) == len(entries)
    demo = (root / "demo").resolve()
    from repair.rules import parse_threshold

    assert all(float(parse_threshold(e.gate)) == pytest.approx(0.2) and e.eval.resolve() == demo / "data" / "test" for e in entries)
    assert all(e.output == demo / e.name for e in entries)
    assert any(e.export == "onnx" for e in entries) and any(e.group_by == "place" for e in entries)

    code, out, err = run_cli("zoo", manifest, "--mode", "eval", "--json")
    assert code == 1, err                                     # the ERM model is below every row's gate
    doc = json.loads(out)
    assert doc["summary"]["failed"] == [e.name for e in entries] and not doc["summary"]["errors"]
    for m in doc["models"]:
        assert m["gate"]["value"] < m["gate"]["threshold"]
    out_dir = root / "zoo-gate-zoo"
    assert (out_dir / "zoo-report.html").is_file()
    assert journal_names(out_dir / "journal.jsonl") == [e.name for e in entries]
    assert not any((root / "demo" / e.name).exists() for e in entries)   # a gate writes no model


# ------------------------------------------------------------------ GitHub Actions job
def load_job() -> dict:
    doc = yaml.safe_load((EXAMPLES / "ci" / "github-actions.yml").read_text())
    (job,) = doc["jobs"].values()
    return job


def run_job(job: dict, env: dict, cwd: Path) -> list[tuple[str, int]]:
    """Run the job's ``run:`` steps as GitHub does (bash -eo pipefail, $GITHUB_OUTPUT, ``if:`` on
    step outputs); the job stops at the first failing step. Returns (step id, exit code) of the
    steps that ran. Steps that only ``uses:`` an action and the install step are not run; any
    other ``if:`` than ``steps.ID.outputs.KEY == 'VALUE'`` is an error (no step is skipped unread)."""
    outputs: dict[str, dict] = {}
    ran = []
    for n, step in enumerate(job["steps"]):
        if "uses" in step or step.get("id") == "install":
            continue
        sid = step.get("id", f"step{n}")
        cond = step.get("if")
        if cond is not None:
            m = STEP_IF.fullmatch(str(cond).strip())
            assert m, f"step {sid}: condition {cond!r} is not understood by this test"
            if outputs.get(m.group(1), {}).get(m.group(2)) != m.group(3):
                continue
        script = cwd / f".step-{sid}.sh"
        script.write_text(step["run"])
        out_file = cwd / f".step-{sid}.out"
        out_file.write_text("")
        rc = subprocess.run([*GITHUB_BASH, str(script)], cwd=cwd, env=dict(env, GITHUB_OUTPUT=str(out_file))).returncode
        outputs[sid] = dict(line.split("=", 1) for line in out_file.read_text().splitlines() if "=" in line)
        ran.append((sid, rc))
        if rc != 0:
            break
    return ran


def test_github_actions_job_is_self_contained():
    job = load_job()
    assert job["defaults"]["run"]["shell"] == "bash"
    for var in ("MODEL", "REPAIR_DATA", "HELDOUT_DATA", "GROUP_BY", "WGA_GATE", "REPAIRED"):
        assert var in job["env"], var
    runs = [s for s in job["steps"] if "run" in s]
    assert [s.get("id") for s in runs] == ["install", "gate", "repair", "regate"]
    for s in runs:
        assert "${{" not in s["run"], s["id"]   # paths come from the environment only
    assert "--fail-under-wga" in runs[1]["run"] and "--export onnx" in runs[2]["run"]
    assert "--fail-under-wga" in runs[3]["run"]          # the re-gate is a gate too (tested failing below)
    for s in (runs[1], runs[3]):                           # both gates require the groups EXPECT_GROUPS names
        assert "--expect-groups" in s["run"] and "EXPECT_GROUPS" in s["run"], s["id"]
    assert job["env"].get("EXPECT_GROUPS")
    # the re-gate never counts a held-out sample the repair was fitted on (as gate.sh)
    assert '--exclude "$REPAIR_DATA"' in runs[3]["run"] and '--exclude "$REPAIR_DATA"' in GATE_SH.read_text()


def job_env(job: dict, repair_bin: Path, root: Path, **paths: str) -> dict:
    env = {k: str(v) for k, v in job["env"].items()}
    env.update(REPAIR_CACHE_DIR=os.environ["REPAIR_CACHE_DIR"], REPAIR_DATA="demo/data/val",
               HELDOUT_DATA="demo/data/test", GROUP_BY="place", WGA_GATE="30%", **paths)
    return shell_env(repair_bin, **env)


@needs_bash
def test_github_actions_job_repairs_exports_and_regates(root: Path, repair_bin: Path, tmp_path: Path):
    job = load_job()
    work = tmp_path / "gha"
    work.mkdir()
    (work / "demo").symlink_to(root / "demo")
    repaired = work / "build" / "model-repaired"
    env = job_env(job, repair_bin, root, MODEL="demo/model", REPAIRED=str(repaired))
    assert run_job(job, env, work) == [("gate", 0), ("repair", 0), ("regate", 0)]
    assert (work / ".step-gate.out").read_text().strip() == "result=fail"
    assert (repaired / "model.safetensors").is_file() and (repaired / "model.onnx").is_file()
    assert Path(f"{repaired}-report.html").is_file()


@needs_bash
def test_github_actions_job_passes_a_good_model_without_repair(root: Path, repair_bin: Path, tmp_path: Path):
    job = load_job()
    repaired = tmp_path / "build" / "model-repaired"
    env = job_env(job, repair_bin, root, MODEL=str(root / "demo" / "model-repaired"), REPAIRED=str(repaired))
    assert run_job(job, env, root) == [("gate", 0)]
    assert (root / ".step-gate.out").read_text().strip() == "result=pass"
    assert not repaired.parent.exists()


@needs_bash
def test_github_actions_job_fails_closed_on_bad_input(root: Path, repair_bin: Path, tmp_path: Path):
    job = load_job()
    repaired = tmp_path / "build" / "model-repaired"
    env = job_env(job, repair_bin, root, MODEL=str(tmp_path / "no-such-model"), REPAIRED=str(repaired))
    assert run_job(job, env, tmp_path) == [("gate", 2)]          # exit 2 ends the job; no repair runs
    assert not repaired.parent.exists()
    env["GROUP_BY"], env["MODEL"] = "no_such_column", "demo/model"
    assert run_job(job, env, root) == [("gate", 2)]


# ------------------------------------------------------------------ generic CI script
GATE_SH = EXAMPLES / "ci" / "gate.sh"


def run_gate_sh(args: list, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(GATE_SH), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)


@needs_bash
def test_gate_sh_fails_closed(root: Path, repair_bin: Path, tmp_path: Path):
    env = shell_env(repair_bin)
    out = tmp_path / "repaired"
    res = run_gate_sh([tmp_path / "no-such-model", "demo/data/val", "demo/data/test", "place", out], env, root)
    assert res.returncode == 2, res.stderr                 # bad input propagates as 2, never "repaired"
    assert "model not found" in res.stderr and "repair fix" not in res.stderr
    assert not out.exists()
    res = run_gate_sh(["demo/model", "demo/data/val"], env, root)
    assert res.returncode == 2 and "usage:" in res.stderr
    res = subprocess.run([BASH, str(GATE_SH), "demo/model", "demo/data/val", "demo/data/test", "place", out],
                         cwd=root, env=dict(env, PATH="/nonexistent"), capture_output=True, text=True)
    assert res.returncode == 127 and not out.exists()       # no `repair` on PATH: not a gate result either


@needs_bash
def test_gate_sh_repairs_exports_and_regates(root: Path, repair_bin: Path, tmp_path: Path):
    out = tmp_path / "repaired"
    res = run_gate_sh(["demo/model", "demo/data/val", "demo/data/test", "place", out],
                      shell_env(repair_bin, WGA_GATE="30%"), root)
    assert res.returncode == 0, res.stderr
    assert "== re-gate" in res.stderr and "passes the gate" in res.stderr
    assert (out / "model.safetensors").is_file() and (out / "model.onnx").is_file()


# ------------------------------------------------------------------ Python API
def load_script():
    spec = importlib.util.spec_from_file_location("repair_api_example", EXAMPLES / "repair_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_python_api_example(root: Path, tmp_path: Path, capsys):
    out = tmp_path / "api-repaired"
    assert load_script().main([str(root / "demo"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified=True" in printed and "worst-group" in printed and "gate passed: " in printed
    assert (out / "model.safetensors").is_file() and (out / "model.onnx").is_file()   # written together


def test_python_api_example_bad_input(root: Path, tmp_path: Path, capsys):
    script = load_script()
    assert script.main([str(tmp_path / "no-demo"), "--out", str(tmp_path / "out")]) == 2
    assert "model not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        script.main([str(root / "demo"), "--out", str(tmp_path / "out"), "--gate", "70"])
    assert e.value.code == 2
    assert not (tmp_path / "out").exists()


def demo_with_test(root: Path, where: Path, rows) -> Path:
    """A demo folder at ``where``: the demo's model and repair set, and a test split of the ``rows``
    of the demo's test metadata (``rows(list of dict) -> list of dict``; images copied)."""
    import csv

    (where / "data").mkdir(parents=True)
    shutil.copytree(root / "demo" / "model", where / "model")
    shutil.copytree(root / "demo" / "data" / "val", where / "data" / "val")
    test = where / "data" / "test"
    shutil.copytree(root / "demo" / "data" / "test", test)
    with open(test / "metadata.csv", newline="") as f:
        table = list(csv.DictReader(f))
    table = rows(table, test)
    with open(test / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    return where


def printed_n(printed: str) -> int:
    return sum(int(m) for m in re.findall(r"^  \S+\s+n=(\d+)", printed, re.M))


def test_python_api_example_gate_fails_closed_on_a_group_without_samples(root: Path, tmp_path: Path, capsys):
    """Found by an audit: a test split without one group's samples passed the example's gate (a raw
    float comparison over the groups there were), where `repair eval --fail-under-wga` fails closed
    (exit 1). The example gates with repair.rules.judge, and prints the figures' warnings."""
    demo = demo_with_test(root, tmp_path / "demo",
                          lambda t, _: [r for r in t if (str(r["y"]), r["place"]) not in (("1", "land"), ("waterbird", "land"))])
    out = tmp_path / "repaired"
    assert load_script().main([str(demo), "--out", str(out), "--gate", "0.01"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: " in err and "no samples" in err and "waterbird|place=land" in err and "fails closed" in err
    assert (out / "model.onnx").is_file()          # the repair itself went through; only the gate failed


def test_python_api_example_leaves_out_repair_set_samples_of_the_test_split(root: Path, tmp_path: Path, capsys):
    """Found by an audit: test images that are also repair-set images were counted in the "after"
    figure, silently. They are left out of both figures (repair.evaluate(..., exclude=val)), with a
    warning on stderr."""
    import csv

    val = root / "demo" / "data" / "val"
    with open(val / "metadata.csv", newline="") as f:
        val_rows = list(csv.DictReader(f))[:40]
    n_test = len(list(csv.DictReader(open(root / "demo" / "data" / "test" / "metadata.csv", newline=""))))

    def add_val(table, test):
        (test / "fromval").mkdir()
        extra = []
        for i, r in enumerate(val_rows):
            shutil.copyfile(val / r["img_filename"], test / "fromval" / f"{i:05d}.png")
            extra.append({**{k: r.get(k, "") for k in table[0]}, "img_filename": f"fromval/{i:05d}.png"})
        return table + extra

    demo = demo_with_test(root, tmp_path / "demo", add_val)
    assert load_script().main([str(demo), "--out", str(tmp_path / "repaired")]) == 0
    captured = capsys.readouterr()
    assert printed_n(captured.out) == n_test                  # the 40 repair-set copies counted nowhere
    assert "warning: 40 of the" in captured.err and "left out of the figures" in captured.err


def test_python_api_example_writes_model_and_onnx_together(root: Path, tmp_path: Path, capsys, monkeypatch):
    """Found by an audit: the model folder was written by repair.fix and the ONNX file by a later
    export_model, so an existing OUT.onnx or a failed verification left OUT/ without its ONNX file
    (and the rerun refused OUT). The export is part of the fix now: all or nothing."""
    import repair.export
    from repair.errors import GateFailed

    out = tmp_path / "api-repaired"
    (tmp_path / "api-repaired.onnx").write_bytes(b"an older export")   # blocked the old script's export
    real = repair.export.export_onnx

    def mismatch(*a, **k):
        raise GateFailed("ONNX verification failed: max |diff| 0.5 > 1e-5 (simulated)")

    monkeypatch.setattr(repair.export, "export_onnx", mismatch)
    script = load_script()
    assert script.main([str(root / "demo"), "--out", str(out)]) == 1
    assert "ONNX verification failed" in capsys.readouterr().err
    assert not out.exists()                       # nothing half-written: the rerun is not blocked
    monkeypatch.setattr(repair.export, "export_onnx", real)
    assert script.main([str(root / "demo"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "model.onnx").is_file()
    assert (tmp_path / "api-repaired.onnx").read_bytes() == b"an older export"


def test_python_api_example_internal_error_is_exit_3_in_one_line(root: Path, tmp_path: Path, capsys, monkeypatch):
    """Found by an audit: a bug (not a RepairError) was exit 1 with a traceback, where the docstring
    (and the command line) promise 3 and one line."""
    import repair

    def boom(*a, **k):
        raise RuntimeError("simulated internal bug\nsecond line")

    monkeypatch.setattr(repair, "evaluate", boom)
    assert load_script().main([str(root / "demo"), "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert err == "internal error: RuntimeError: simulated internal bug\n"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ both CI templates: every exit code, a
# failing re-gate, a held-out set that lost a whole group value (found by an audit: the tests only ever saw
# a re-gate pass, and neither template could name the groups the held-out set must hold)
FAKE_REPAIR = """#!/bin/sh
n=$(cat "$FAKE_DIR/count" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$FAKE_DIR/count"
printf '%s\\n' "$*" >> "$FAKE_DIR/calls"
eval "rc=\\${FAKE_RC_$n:-0}"
exit "$rc"
"""


@pytest.fixture()
def fake_repair(tmp_path: Path):
    """A ``repair`` on PATH that records its arguments and exits with FAKE_RC_<n> on its n-th call."""
    d = tmp_path / "fakebin"
    d.mkdir()
    exe = d / "repair"
    exe.write_text(FAKE_REPAIR)
    exe.chmod(0o755)
    state = tmp_path / "fake"
    state.mkdir()

    def env(**codes: int) -> dict:
        for f in ("count", "calls"):
            (state / f).unlink(missing_ok=True)
        return dict(os.environ, PATH=f"{d}{os.pathsep}{os.environ.get('PATH', '')}", FAKE_DIR=str(state),
                    **{f"FAKE_RC_{n}": str(c) for n, c in codes.items()})

    def calls() -> list[str]:
        return (state / "calls").read_text().splitlines() if (state / "calls").exists() else []
    return env, calls


@needs_bash
@pytest.mark.parametrize("codes, want, ncalls", [
    ({"1": 0}, 0, 1), ({"1": 2}, 2, 1), ({"1": 3}, 3, 1), ({"1": 130}, 130, 1), ({"1": 143}, 143, 1),
    ({"1": 1, "2": 3}, 3, 2), ({"1": 1, "2": 1}, 1, 2), ({"1": 1, "2": 143}, 143, 2),     # the repair fails
    ({"1": 1, "2": 0, "3": 1}, 1, 3), ({"1": 1, "2": 0, "3": 3}, 3, 3), ({"1": 1, "2": 0, "3": 0}, 0, 3),
])
def test_both_ci_templates_pass_on_every_exit_code_and_fail_on_a_failed_regate(fake_repair, tmp_path, codes,
                                                                              want, ncalls):
    env, calls = fake_repair
    e = env(**{k: int(v) for k, v in codes.items()})
    res = subprocess.run([BASH, str(GATE_SH), "m", "val", "test", "place", "out"], cwd=tmp_path,
                         env=dict(e, EXPECT_GROUPS="a|x,b|x"), capture_output=True, text=True)
    assert res.returncode == want and len(calls()) == ncalls, (res.stderr, calls())
    assert all("--expect-groups a|x,b|x" in c for c in calls() if c.startswith("eval")), calls()
    if want in (130, 143):
        assert "interrupted or terminated" in res.stderr, res.stderr
    job = load_job()
    e = env(**{k: int(v) for k, v in codes.items()})
    e.update({k: str(v) for k, v in job["env"].items()})
    ran = run_job(job, e, tmp_path)
    assert len(calls()) == ncalls and ran[-1][1] == want and (want == 0) == all(rc == 0 for _, rc in ran), ran
    assert all("--expect-groups" in c for c in calls() if c.startswith("eval")), calls()


@needs_bash
def test_gate_sh_puts_the_repaired_model_beside_the_model_folder_however_it_is_written(fake_repair, tmp_path):
    env, calls = fake_repair
    (tmp_path / "models" / "birds").mkdir(parents=True)
    for model, cwd, out in (("models/birds//", tmp_path, "models/birds-repaired"),
                            (".", tmp_path / "models" / "birds", str(tmp_path / "models" / "birds-repaired")),
                            ("./", tmp_path / "models" / "birds", str(tmp_path / "models" / "birds-repaired"))):
        res = subprocess.run([BASH, str(GATE_SH), model, "val", "test", "place"], cwd=cwd,
                             env=env(**{"1": 1, "2": 0, "3": 0}), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        fix = [c for c in calls() if c.startswith("fix ")]
        assert len(fix) == 1 and f"--out {out} " in fix[0], (model, fix)
    # a CDPATH that holds another models/birds is not where `cd` goes (a review found the OUT of the other tree)
    (tmp_path / "other" / "models" / "birds").mkdir(parents=True)
    res = subprocess.run([BASH, str(GATE_SH), "models/birds/.", "val", "test", "place"], cwd=tmp_path,
                         env=dict(env(**{"1": 1, "2": 0, "3": 0}), CDPATH=str(tmp_path / "other")),
                         capture_output=True, text=True)
    fix = [c for c in calls() if c.startswith("fix ")]
    assert res.returncode == 0 and len(fix) == 1, res.stderr
    assert f"--out {tmp_path / 'models' / 'birds-repaired'} " in fix[0], fix


@needs_bash
def test_the_jobs_gate_fails_when_the_heldout_set_lost_a_group(root: Path, repair_bin: Path, tmp_path: Path):
    """No bird on land in the held-out set: the worst group over the groups left passes a 30% gate; with
    the job's EXPECT_GROUPS (the demo's four groups) the gate fails and the repair would run (the fake
    `repair` above shows both templates pass EXPECT_GROUPS to both gates)."""
    where = tmp_path / "d"
    demo_with_test(root, where, lambda rows, _: [r for r in rows if r["place"] != "land"])
    job = load_job()
    gate_only = {**job, "steps": [s for s in job["steps"] if s.get("id") == "gate"]}
    env = job_env(job, repair_bin, root, MODEL=str(root / "demo" / "model-repaired"), REPAIRED=str(tmp_path / "r"))
    env.update(HELDOUT_DATA=str(where / "data" / "test"))
    assert env["EXPECT_GROUPS"] == "landbird|land,landbird|water,waterbird|land,waterbird|water"
    assert run_job(gate_only, env, tmp_path) == [("gate", 0)]
    assert (tmp_path / ".step-gate.out").read_text().strip() == "result=fail"
    assert run_job(gate_only, dict(env, EXPECT_GROUPS=""), tmp_path) == [("gate", 0)]
    assert (tmp_path / ".step-gate.out").read_text().strip() == "result=pass"      # what it would have shipped
