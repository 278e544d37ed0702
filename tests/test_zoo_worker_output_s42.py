"""What a model's run prints on a Ray worker (a notice, a plugin's lines) comes back with its result and
is printed by the driver, each line after the row's name (log_to_driver=False dropped it all); stdout
keeps the results only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import make_zoo_parts, run_cli
from test_plugin_output_s41 import plugin_recipe  # noqa: F401  (the fixture)


def test_run_model_on_worker_returns_what_the_run_printed_to_stderr(monkeypatch):
    import repair.zoo as zoo_mod

    def chatty(task):
        print("notice: embedding cache entry x was corrupt; recomputed", file=sys.stderr)
        print("PLUGIN-LINE", file=sys.stderr)
        return {"status": "done", "result": {}, "worker": "w", "seconds": 0.0}

    monkeypatch.setattr(zoo_mod, "run_model", chatty)
    before = sys.stderr
    res = zoo_mod.run_model_on_worker({})
    assert sys.stderr is before
    assert zoo_mod.worker_output_lines("a", res) == [
        "a: notice: embedding cache entry x was corrupt; recomputed", "a: PLUGIN-LINE"]
    assert "output" not in res                                     # taken out: never journaled
    assert zoo_mod.worker_output_lines("a", {"status": "done"}) == []

    monkeypatch.setattr(zoo_mod, "run_model", lambda task: (print("x" * 30 + "\n" + "y" * zoo_mod.WORKER_OUTPUT_MAX,
                                                                  file=sys.stderr), {"status": "error"})[1])
    res = zoo_mod.run_model_on_worker({})
    assert len(res["output"]) == zoo_mod.WORKER_OUTPUT_MAX and "x" not in res["output"]   # the end kept


def _manifest(tmp_path, recipe):
    parts = make_zoo_parts(tmp_path / "parts")
    (tmp_path / "out").mkdir()
    man = tmp_path / "zoo.yaml"
    man.write_text(yaml.safe_dump({"defaults": {"recipe": str(recipe), "output_dir": str(tmp_path / "out")},
                                   "models": [{"name": "a", "checkpoint": str(parts / "m0"),
                                               "data": str(parts / "val")}]}, sort_keys=False))
    return man


def test_the_driver_prints_a_workers_lines_after_the_rows_name(tmp_path, plugin_recipe, monkeypatch):  # noqa: F811
    """The Ray path without Ray: each row run as a Ray task runs it (its stderr kept and returned)."""
    import repair.zoo as zoo_mod

    def as_on_a_worker(self, tasks):
        for i, t in enumerate(tasks):
            yield i, zoo_mod.run_model_on_worker(t)

    monkeypatch.setattr(zoo_mod.LocalExecutor, "map", as_on_a_worker)
    recipe = plugin_recipe("worker_chat_s42", in_call="print('WORKER-CALL')")
    code, out, err = run_cli("zoo", _manifest(tmp_path, recipe), "--allow-plugins", "--json", "-q")
    assert code == 0, err
    json.loads(out)
    assert "WORKER-" not in out
    assert "a: WORKER-CALL" in err.splitlines(), err


def test_a_plugins_prints_on_a_real_ray_worker_reach_the_drivers_stderr(tmp_path, plugin_recipe):  # noqa: F811
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e \".[zoo]\")")
    recipe = plugin_recipe("ray_chat_s42", in_call="print('RAY-CALL')")
    man = _manifest(tmp_path, recipe)
    cli = 'import sys; sys.argv[0] = "repair"; from repair_cli.main import main; main()'
    p = subprocess.run([sys.executable, "-c", cli, "zoo", str(man), "--allow-plugins", "--json", "--ray", "auto",
                        "--workers", "1"], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)
    assert "a: RAY-CALL" in p.stderr.splitlines(), p.stderr


def _buffered_env() -> dict:
    """The environment without PYTHONUNBUFFERED (the test harness may set it; it makes C stdio unbuffered
    too, and a C ``printf`` into a pipe must wait in its buffer here, as it does for a user)."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "OMP_NUM_THREADS": "1"}


def test_c_output_written_before_users_code_stays_on_stdout(tmp_path):
    """What C code had buffered for stdout before the user's code ran went to stderr (flushed while fd 1
    pointed there)."""
    script = tmp_path / "s.py"
    script.write_text("import ctypes, sys\nfrom repair.errors import users_code\n"
                      "ctypes.CDLL(None).printf(b'RESULT-BEFORE\\n')\n"
                      "with users_code('a plugin'):\n    print('PLUGIN-LINE')\n"
                      "    print('DUNDER-LINE', file=sys.__stdout__)\n"
                      "sys.stdout.write('RESULT-AFTER\\n')\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env=_buffered_env())
    assert p.returncode == 0, p.stderr
    assert "RESULT-BEFORE" in p.stdout and "RESULT-AFTER" in p.stdout, (p.stdout, p.stderr)
    assert "PLUGIN-LINE" in p.stderr and "PLUGIN-LINE" not in p.stdout
    assert "DUNDER-LINE" in p.stderr and "DUNDER-LINE" not in p.stdout     # sys.__stdout__ too (the review)


def test_a_workers_capture_is_a_real_stream_and_takes_what_bypasses_python(monkeypatch, capfd):
    """The first capture was a StringIO: code asking for ``sys.stderr.fileno()`` (a subprocess given
    ``stderr=sys.stderr``) failed on Ray and ran locally; what bypassed Python (``os.write(2)``, a
    subprocess) was lost."""
    import repair.zoo as zoo_mod

    def run(task):
        print("PY-LINE", file=sys.stderr)
        os.write(2, b"FD2-LINE\n")
        subprocess.run([sys.executable, "-c", "import sys; print('CHILD-LINE', file=sys.stderr)"],
                       stderr=sys.stderr, check=True)
        return {"status": "done", "result": {}, "worker": "w", "seconds": 0.0}

    monkeypatch.setattr(zoo_mod, "run_model", run)
    res = zoo_mod.run_model_on_worker({})
    assert zoo_mod.worker_output_lines("a", res) == ["a: PY-LINE", "a: FD2-LINE", "a: CHILD-LINE"]
    os.write(2, b"AFTER\n")
    assert "AFTER" in capfd.readouterr().err                   # descriptor 2 is back


FD_PLUGIN_CALL = ("import os, subprocess, ctypes; os.write(1, b'FD1-WRITE\\n'); "
                  "subprocess.run([sys.executable, '-c', 'print(\"CHILD-PROC\")']); "
                  "ctypes.CDLL(None).printf(b'C-PRINTF\\n')")


def test_what_a_plugin_writes_past_pythons_streams_stays_out_of_the_json(timm_folder, image_data, tmp_path,
                                                                        plugin_recipe):  # noqa: F811
    """``os.write(1, ...)``, a subprocess it starts and a C ``printf`` (buffered in the C library for a
    pipe) wrote into stdout: ``repair fix --json`` printed them around its JSON document."""
    recipe = plugin_recipe("fd_chat_s42", in_call=FD_PLUGIN_CALL)
    cli = 'import sys; sys.argv[0] = "repair"; from repair_cli.main import main; main()'
    p = subprocess.run([sys.executable, "-c", cli, "fix", str(timm_folder), "--data", str(image_data), "--recipe",
                        str(recipe), "--allow-plugins", "--out", str(tmp_path / "o"), "--json"],
                       capture_output=True, text=True, timeout=300, env=_buffered_env())
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)                      # one document, nothing before or after it
    assert doc["method"] == "fd_chat_s42"
    for line in ("FD1-WRITE", "CHILD-PROC", "C-PRINTF"):
        assert line in p.stderr, p.stderr


def test_users_code_puts_file_descriptor_1_back(capfd):
    import os

    from repair.errors import users_code

    with users_code("a plugin"):
        os.write(1, b"INSIDE\n")
    os.write(1, b"AFTER\n")
    out, err = capfd.readouterr()
    assert "INSIDE" in err and "INSIDE" not in out and "AFTER" in out
