"""`repair zoo --ray` with the real Ray (skipped where it is not installed): SIGTERM acts while a model
runs (an unbounded ``ray.wait`` held it until the model finished), a per-model request the local Ray
can never meet is exit 2 before any row (it waited for ever), and ``SOURCE_DATE_EPOCH`` as the driver
read it reaches the rows (a cluster's workers have their own environment)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_zoo_parts, run_cli

CLI = 'import sys; sys.argv[0] = "repair"; from repair_cli.main import main; main()'

PAUSE_PLUGIN = '''
import os, time
from dataclasses import dataclass
from pathlib import Path

from repair import solver as S
from repair.config import setting
from repair.methods import AFFINE, RepairOutput, register_method

BLOCK, PID = Path({block!r}), Path({pid!r})


@dataclass
class Cfg:
    l2: float = setting(1.0, gt=0)


@register_method("s41_ray_pause", summary="waits while BLOCK exists", config=Cfg, groups="never", transform=AFFINE)
def pause(inputs, config):
    PID.with_suffix(".tmp").write_text(str(os.getpid()))
    os.replace(PID.with_suffix(".tmp"), PID)
    deadline = time.time() + 300
    while BLOCK.exists() and time.time() < deadline:
        time.sleep(0.05)
    X, y, W0, b0 = inputs.cpu_tensors()
    W, b, _ = S.fit_logreg(X, y, inputs.num_classes, l2=config.l2)
    return RepairOutput(W=W[0], b=b[0], diagnostics={{}})
'''


def needs_ray():
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e \".[zoo]\")")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_zoo_parts(tmp_path_factory.mktemp("zoo_ray_s41"))


def write_manifest(folder: Path, rows: list[dict], **defaults) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if "output_dir" in defaults:
        Path(defaults["output_dir"]).mkdir(exist_ok=True)
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "group_by": "place", **defaults},
                                    "models": rows}, sort_keys=False))
    return path


def start(folder: Path, *args, extra_env=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-c", CLI, "zoo", "zoo.yaml", *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def end(p: subprocess.Popen, seconds: float):
    """The process's (exit code, stderr), or None after ``seconds``."""
    try:
        _, err = p.communicate(timeout=seconds)
        return p.returncode, err
    except subprocess.TimeoutExpired:
        return None


def stop_group(p: subprocess.Popen) -> None:
    """A driver that did not end: its process group (the local Ray it started, where still in it) killed."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.communicate()


def test_sigterm_to_a_ray_driver_acts_while_a_model_runs(parts, tmp_path):
    """SIGTERM while a row runs on Ray: exit 143 within seconds, the report says interrupted (the wait
    for a task's result held the signal until the model finished, then threw its row away)."""
    needs_ray()
    block, pid = tmp_path / "block", tmp_path / "pid"
    (tmp_path / "pause.py").write_text(PAUSE_PLUGIN.format(block=str(block), pid=str(pid)))
    (tmp_path / "pause.yaml").write_text("name: pause\nplugins: [pause.py]\ncandidates:\n  - method: s41_ray_pause\n")
    write_manifest(tmp_path, [{"name": "a", "checkpoint": str(parts / "m0"), "recipe": str(tmp_path / "pause.yaml")}],
                   data=str(parts / "val"), output_dir=str(tmp_path / "out"))
    block.touch()
    p = start(tmp_path, "--allow-plugins", "--ray", "auto", "--workers", "1")
    try:
        deadline = time.time() + 240                          # Ray starts slowly on a loaded machine
        while not pid.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert pid.exists(), p.communicate()[1] if p.poll() is not None else "the paused row was never seen"
        time.sleep(1)
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
        # the row is blocked until the test unblocks it: an exit at all shows SIGTERM was not held (a
        # generous bound: Ray's shutdown is slow on a loaded machine)
        got = end(p, 90)
        took = time.time() - t0
    finally:
        block.unlink(missing_ok=True)
    if got is None:                                         # held: the row, unblocked, lets it end
        got = end(p, 120)
        if got is None:
            stop_group(p)
        pytest.fail(f"SIGTERM was held while the model ran (still running {time.time() - t0:.0f}s after it)")
    code, err = got
    assert code == 143 and "SIGTERM" in err, err
    assert took < 90, took
    report = json.loads((tmp_path / "zoo-zoo" / "zoo-report.json").read_text())
    assert report["interrupted"]
    assert not (tmp_path / "out" / "a").exists()


def test_gpus_per_model_on_a_local_ray_without_a_gpu_is_exit_2_before_any_row(parts, tmp_path):
    """``--ray auto --gpus-per-model 1`` where there is no GPU: a task that can never be scheduled (the
    driver waited for ever) -- one line naming the option, exit 2, nothing written."""
    needs_ray()
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    write_manifest(tmp_path, [{"name": "a", "checkpoint": str(parts / "m0")}], data=str(parts / "val"))
    p = start(tmp_path, "--mode", "eval", "--ray", "auto", "--workers", "1", "--gpus-per-model", "1")
    got = end(p, 90)
    if got is None:
        stop_group(p)
        pytest.fail("the driver waited for a GPU the local Ray does not have")
    code, err = got
    # our progress line and Ray's own log lines (Ray 2.60 warns that it enabled token authentication once a
    # token exists in ~/.ray, as an earlier Ray run leaves one) aside
    ray_log = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING)\s+\S+\.py:\d+ -- ")
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("starting a local Ray")
             and not ray_log.match(ln)]
    assert code == 2, err
    assert len(lines) == 1 and "--gpus-per-model 1" in lines[0] and "no GPU" in lines[0], err
    assert not (tmp_path / "zoo-zoo").exists()


def test_the_source_date_the_driver_read_reaches_a_row_whose_environment_lacks_it(parts, tmp_path, monkeypatch):
    """A row run where ``SOURCE_DATE_EPOCH`` is unset (a cluster's worker) still writes the driver's
    date into the model's metadata: the driver reads it once and the task carries it. (No Ray needed:
    each row runs here in an environment without the variable, as a separately started worker's.)"""
    import repair.zoo as zoo_mod
    from repair.io import load_safetensors
    from repair.provenance import source_date

    real = zoo_mod.run_model

    def on_a_worker_without_it(task):
        saved = os.environ.pop("SOURCE_DATE_EPOCH", None)
        try:
            return real(task)
        finally:
            if saved is not None:
                os.environ["SOURCE_DATE_EPOCH"] = saved

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setattr(zoo_mod, "run_model", on_a_worker_without_it)
    path = write_manifest(tmp_path, [{"name": "a", "checkpoint": str(parts / "m0")}], data=str(parts / "val"),
                          output_dir=str(tmp_path / "out"))
    code, _, err = run_cli("zoo", path)
    assert code == 0, err
    _, meta = load_safetensors(tmp_path / "out" / "a" / "model.safetensors")
    assert meta.get("repair.created") == "2023-11-14T22:13:20+00:00", meta
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert source_date() is None                    # the carried date does not outlive its row
