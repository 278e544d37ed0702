"""Trust fixes of session 47: what the tool prints about a run is one line per message, and holds what
it measured. Every test here fails on the code before."""
from __future__ import annotations

import shutil

from conftest import make_images, make_timm_folder, run_cli


def test_a_log_line_on_stderr_is_one_line_whatever_a_path_holds(tmp_path):
    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "val", n_per_class=3)
    forged = tmp_path / "m\ngate passed: forged"
    shutil.copytree(model, forged)
    code, out, err = run_cli("fix", forged, "--data", data, "--recipe", "dfr", "--out", tmp_path / "o", "--no-cache")
    assert code == 0, err
    lines = (out + err).splitlines()
    assert not [ln for ln in lines if ln.startswith("gate passed")], err       # no line of the path's own
    assert any("m\\ngate passed: forged" in ln for ln in err.splitlines()), err  # the path shown, escaped


def test_a_factory_that_calls_os_exit_is_bad_input_never_the_commands_exit(tmp_path):
    """``os._exit(0)`` in a factory module ended the command with status 0 past a gate never measured.
    Run in a child process: on the code before, the exit would end the test run itself."""
    import os
    import subprocess
    import sys

    import torch

    from repair.io import save_safetensors

    data = make_images(tmp_path / "val", n_per_class=3)
    (tmp_path / "hard_fac.py").write_text(
        "import os, torch.nn as nn\n"
        "def net():\n"
        "    pid = os.fork()\n"                   # a child the code forks exits as it asks
        "    if pid == 0:\n"
        "        os._exit(7)\n"
        "    assert os.waitpid(pid, 0)[1] >> 8 == 7\n"
        "    print('bye', flush=True)\n"
        "    os._exit(0)\n")
    save_safetensors({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, tmp_path / "w.safetensors", {})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    res = subprocess.run([sys.executable, "-m", "repair_cli.main", "eval", str(tmp_path / "w.safetensors"),
                          "--factory", "hard_fac:net", "--image-size", "32", "--mean", "0.5,0.5,0.5", "--std",
                          "0.25,0.25,0.25", "-d", str(data), "--fail-under-acc", "99%", "--no-cache"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 2 and res.stdout == "", (res.returncode, res.stdout, res.stderr)
    last = res.stderr.strip().splitlines()[-1]
    assert "hard_fac:net" in last and "os._exit 0" in last and "bye" in last, res.stderr


def test_os_exit_is_put_back_when_the_users_code_ends_however_it_ends():
    """Run in a child: were the guard to forward to the real exit, the test run itself would end."""
    import subprocess
    import sys

    code = """
import os
from repair.errors import BadInput, users_code
real = os._exit
with users_code("a factory"):
    assert os._exit is not real
assert os._exit is real
try:
    with users_code("a factory"):
        os._exit(3)
except BadInput as e:
    assert "os._exit 3" in str(e), e
    print("refused")
assert os._exit is real
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "refused", (res.returncode, res.stdout, res.stderr)


def _repair(args, tmp_path, env=None, **streams):
    """``repair ARGS`` as the console script runs it, in a child process: (exit code, stdout, stderr)."""
    import os
    import subprocess
    import sys

    code = "import sys; from repair_cli.main import main; sys.argv[0] = 'repair'; main()"
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=tmp_path, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **streams)
    return res.returncode, res.stdout, res.stderr


def test_a_gate_fails_however_its_streams_are_broken(tmp_path):
    """A reader of stderr gone (``2>&1 | head -n 1``) ended a failing gate with exit 0; a name stdout's
    encoding cannot hold, or stdout closed, was an internal error (exit 3) -- after a fix committed its
    output; with stderr closed, the log went into stdout, into --json's one document."""
    import json
    import os
    import subprocess

    classes = ["café", "日本", "fox"]
    model = make_timm_folder(tmp_path / "m", classes=classes)
    data = make_images(tmp_path / "val", n_per_class=3, classes=classes)
    gate = ["eval", model, "--data", data, "--group-by", "place", "--fail-under-wga", "99.9%", "--no-cache"]
    r, w = os.pipe()
    os.close(r)                                            # stderr's reader gone before anything is written
    try:
        code, out, _ = _repair(gate, tmp_path, env={"PYTHONIOENCODING": "ascii"}, stdout=subprocess.PIPE,
                               stderr=w, text=True)
    finally:
        os.close(w)
    assert code == 1, code                                 # the gate's failure, whatever became of stderr
    assert "caf\\xe9" in out and "\\u65e5\\u672c" in out, out     # names written escaped
    code, _, err = _repair(gate, tmp_path, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert code == 1 and "internal error" not in err, err  # stdout closed: the gate's own exit
    code, out, _ = _repair(gate[:-3] + ["--json", "--no-cache"], tmp_path, stdout=subprocess.PIPE,
                           stderr=None, text=True, preexec_fn=lambda: os.close(2))
    assert code == 0 and json.loads(out)["n"] == 9, out    # stderr closed: stdout holds the document only


def test_threads_that_look_up_at_once_in_a_fresh_process_never_see_a_registry_half_loaded():
    """A service's first requests at once: the lazy registries were loaded without a lock, and the other
    threads were told a built-in method was unknown (or a valid model folder was no model). And a first
    call changed os.environ (ORT_DISABLE_TELEMETRY) and the csv module's field limit for good."""
    import subprocess
    import sys

    code = """
import threading
from repair.adapters import FAMILIES
from repair.methods import METHODS
gate, errors = threading.Barrier(8), []
def go(k):
    gate.wait()
    try:
        (METHODS if k % 2 else FAMILIES).get("dfr" if k % 2 else "timm")
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=go, args=(k,)) for k in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
print(len(errors), errors[:1])
# and the first library call leaves the process's settings as they were: os.environ (README's promise),
# the csv module's field limit (the user's own readers keep their 128 KiB guard)
import csv, os
from pathlib import Path
from repair.adapters.onnx_runtime import onnxruntime
from repair.data import read_csv_text
env, limit = dict(os.environ), csv.field_size_limit()
onnxruntime()
assert read_csv_text("text,y\\n" + "x" * 200000 + ",1\\n", Path("t.csv"))[1][0]["y"] == "1"
print(dict(os.environ) == env, csv.field_size_limit() == limit)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("0 "), (res.stdout, res.stderr)
    assert res.stdout.splitlines()[-1] == "True True", res.stdout


def _at_once(fn, threads: int = 4, times: int = 40) -> None:
    import threading

    gate = threading.Barrier(threads)

    def run():
        gate.wait()
        for _ in range(times):
            fn()
    ts = [threading.Thread(target=run) for _ in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]


def _overlapped(block) -> None:
    """Two threads in ``block()`` at once, the first in leaving first (what put back another's state)."""
    import threading

    inside, first_out = threading.Barrier(2), threading.Event()

    def first():
        with block():
            inside.wait()
        first_out.set()

    def second():
        with block():
            inside.wait()
            first_out.wait()
    ts = [threading.Thread(target=first), threading.Thread(target=second)]
    [t.start() for t in ts]
    [t.join() for t in ts]


def test_calls_at_once_leave_the_processs_warnings_streams_and_transformers_logging_as_they_were(tmp_path):
    """A service's threads reading images, exporting, loading text models at once: warnings.catch_warnings,
    contextlib.redirect_stdout and a save/restore of transformers' verbosity each put back another
    thread's state -- an "ignore every warning" filter, sys.stdout pointing at stderr, transformers at
    error level, left in the user's process for good. And the one home of ignoring warnings keeps a
    filter of the user's that looks like its own (``python -W ignore``)."""
    import sys
    import warnings

    from transformers.utils import logging as hf_logging

    from repair.adapters.text import quiet_transformers
    from repair.data import read_image
    from repair.errors import caught_warnings, no_warnings
    from repair.export import _quiet_stdout

    data = make_images(tmp_path / "val", n_per_class=1)
    image = next((data / "cat").iterdir())
    filters, stdout, verbosity = list(warnings.filters), sys.stdout, hf_logging.get_verbosity()
    _at_once(lambda: read_image(image))
    for block in (no_warnings, _quiet_stdout, quiet_transformers):
        _overlapped(block)
        assert warnings.filters == filters and sys.stdout is stdout, block
        assert hf_logging.get_verbosity() == verbosity, block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # the user's own, first
        mine = list(warnings.filters)
        with no_warnings():
            warnings.warn("hidden")
        assert warnings.filters == mine
        with no_warnings():                                   # a record inside an ignore: it records
            with caught_warnings() as caught:
                warnings.warn("said later")
        assert [str(w.message) for w in caught] == ["said later"] and warnings.filters == mine


def test_a_plugin_edited_after_this_process_imported_it_runs_as_it_is_now(tmp_path):
    """A notebook's second fix after editing its plugin ran the old code -- and a zoo journaled that output
    as made by the edited file. The plugin is now forgotten (its module, its methods) and imported again."""
    import numpy as np
    from safetensors.numpy import load_file

    import repair
    from repair.methods import METHODS
    from repair.pipeline import FixOptions
    from repair.runtime import RuntimeOptions

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "val", n_per_class=3)
    plugin = tmp_path / "p" / "edited_s47.py"
    plugin.parent.mkdir()
    plugin.write_text("from dataclasses import dataclass\n"
                      "from repair.methods import RepairOutput, register_method\n"
                      "@dataclass\n"
                      "class Config:\n"
                      "    unused: int = 0\n"
                      "@register_method('edited_s47', summary='the head as it is', config=Config, groups='never')\n"
                      "def same(inputs, config):\n"
                      "    return RepairOutput(W=inputs.W.clone(), b=inputs.b.clone())\n")
    recipe = tmp_path / "p" / "r.yaml"
    recipe.write_text("plugins: [edited_s47.py]\ncandidates:\n  - method: edited_s47\n")
    rt = RuntimeOptions(use_cache=False, progress=False)

    def head(out):
        repair.fix(model, data, out=tmp_path / out, options=FixOptions(recipe=str(recipe), allow_plugins=True),
                   runtime=rt, log=lambda m: None)
        weights = load_file(tmp_path / out / "model.safetensors")
        return weights[max(k for k in weights if k.endswith("weight") and weights[k].ndim == 2)]
    try:
        first = head("o1")
        assert np.array_equal(head("o2"), first)               # unchanged: imported once, runs again
        plugin.write_text(plugin.read_text().replace("inputs.W.clone()", "inputs.W.clone() * 0"))
        assert np.abs(first).sum() > 0 and np.abs(head("o3")).sum() == 0     # the edited code ran
    finally:
        METHODS.unregister("edited_s47")                       # the registry as the other tests find it


def test_files_a_class_folder_holds_that_are_no_images_are_said_in_the_json_too(tmp_path):
    """The note that a class folder's files are not read reached stderr only (a Python warning): not
    --json's warnings, nor the repair's record, nor a zoo row's."""
    import json

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=3, with_metadata=False)
    (data / "cat" / "notes.txt").write_text("where these came from")
    code, out, err = run_cli("eval", model, "--data", data, "--json", "-q", "--no-cache")
    assert code == 0, err
    assert [w for w in json.loads(out)["warnings"] if "notes.txt" in w], out
    assert len([ln for ln in err.splitlines() if "notes.txt" in ln]) == 1, err


def test_a_pngs_transparent_grey_is_white_in_every_mode(tmp_path):
    """A PNG's tRNS key was composited over white for L, P and RGB images but dropped for 1-bit and 16-bit
    ones: the same picture read white or black by its bit depth."""
    import numpy as np
    from PIL import Image

    from repair.data import read_image

    a = np.zeros((4, 4), np.uint8)
    a[:2] = 255                                    # top white, bottom black: the transparent key
    Image.fromarray(a, "L").save(tmp_path / "l.png", transparency=0)
    Image.fromarray(a).convert("1").save(tmp_path / "one.png", transparency=0)
    Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "deep.png", transparency=0)
    Image.fromarray(a).convert("1").save(tmp_path / "one_white.png", transparency=1)
    for name in ("l.png", "one.png", "deep.png"):
        assert Image.open(tmp_path / name).info.get("transparency") == 0, name
        assert np.asarray(read_image(tmp_path / name)).min() == 255, name     # all white
    assert np.asarray(read_image(tmp_path / "one_white.png"))[:, 0, 0].tolist() == [255, 255, 0, 0]


def test_a_one_line_field_that_opens_with_a_quote_is_read_as_written(tmp_path):
    """README: "a raw quote inside a one-line field is read as text" -- but a field that opened with one
    lost its quotes silently (``"great" movie fun`` read ``great movie fun``; ``""not"" boring`` read
    ``not"" boring``), where TSV and JSONL kept them."""
    import pytest

    from repair.data import read_csv_text
    from repair.errors import BadInput

    text = 'text,label\n"great" movie fun,positive\n""not"" boring,"neg"\nplain,"a ""b"""\n'
    _, rows = read_csv_text(text, tmp_path / "t.csv")
    assert [(r["text"], r["label"]) for r in rows] == [('"great" movie fun', "positive"),
                                                        ('""not"" boring', "neg"), ("plain", 'a "b"')]
    with pytest.raises(BadInput, match='line 2: .*"""great"" movie"'):     # fields not to be told apart
        read_csv_text('text,label\n"a, b" c,positive\n', tmp_path / "t.csv")


def test_a_table_of_wide_or_escaped_names_stays_aligned():
    """Tables padded by len(): a CJK or emoji name took two columns per character and shifted its row, and
    a name's escaped control character (``\\u202e``, six columns once shown) shifted it the other way."""
    from repair_cli.format import table, width

    text = table(["group", "n", "accuracy"], [["café|place=陆地🌍", 6, "50.0%"], ["dog|x", 12, "100.0%"],
                                              ["e\u0301|\u202ex", 1, "0.0%"]])
    lines = text.splitlines()
    assert "\\u202e" in lines[-1] and "\u202e" not in text
    assert len({width(ln) for ln in lines}) == 1, text
    assert width("陆地🌍") == 6 and width("e\u0301") == 1 and width("กิน") == 2     # Thai's vowel sign: none


def test_a_utf16_table_without_a_byte_order_mark_is_named_so(tmp_path):
    """Read as UTF-8 (ASCII with NULs is valid UTF-8), it was refused as "cannot tell which column holds the
    label (columns: t\\u0000e\\u0000x\\u0000t\\u0000, ...)"."""
    from repair.data import load_data
    from repair.errors import BadInput

    import pytest

    for codec in ("utf-16-le", "utf-16-be"):
        table = tmp_path / f"{codec}.csv"
        table.write_bytes("text,label\nfine,positive\nbad,negative\n".encode(codec))
        with pytest.raises(BadInput, match="UTF-16 text without a byte-order mark"):
            load_data(table)


def test_a_plugin_that_looks_up_a_built_in_when_imported_never_deadlocks_the_first_lookup(tmp_path):
    """Thread B imports an installed plugin (its import lock held) whose module looks up a built-in, while
    thread A's first full lookup loads the entry points, that plugin among them: A waited for B's import,
    B for the registry lock A held -- both hung (a review of the registry's lock)."""
    import subprocess
    import sys

    (tmp_path / "ep_plugin_s47.py").write_text("import time\ntime.sleep(0.3)\nfrom repair.methods import METHODS\n"
                                               "BASE = METHODS.get('dfr')\n")
    code = """
import importlib, sys, threading, time
sys.path.insert(0, %r)
import repair.registry as reg

class EP:
    name, value, group = "s47", "ep_plugin_s47", "repair.plugins"
    def load(self):
        return importlib.import_module("ep_plugin_s47")
real = reg.entry_points
reg.entry_points = lambda group: [EP()] if group == "repair.plugins" else real(group)
from repair.methods import METHODS
tb = threading.Thread(target=lambda: importlib.import_module("ep_plugin_s47"), daemon=True)
ta = threading.Thread(target=lambda: METHODS.values(), daemon=True)
tb.start(); time.sleep(0.1); ta.start()
ta.join(60); tb.join(5)
print("hung" if ta.is_alive() or tb.is_alive() else "done")
""" % str(tmp_path)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "done", (res.stdout, res.stderr)


def test_results_stdout_cannot_take_are_exit_2_naming_stdout(tmp_path):
    """``repair ... --json > result.json`` on a full disk: exit 3 (internal error) before, then exit 0 with an
    empty file in a first fix of this session (a review)."""
    import os
    import subprocess

    import pytest

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        code, _, err = _repair(["--version"], tmp_path, stdout=full, stderr=subprocess.PIPE, text=True)
    assert code == 2 and err.strip() == "error: stdout: No space left on device; the results could not be written there", (code, err)


def test_a_class_folder_named_in_the_other_unicode_form_is_the_models_class(tmp_path):
    """A class folder ``café`` as macOS writes it (decomposed, NFD) against a model whose label is composed
    (NFC): "label 'café' is not a class of the model (classes: café, dog, fox)", two names that look alike."""
    import unicodedata

    from repair.data import encode, load_data

    classes = ["café", "dog", "fox"]
    data = make_images(tmp_path / "d", n_per_class=2, classes=[unicodedata.normalize("NFD", c) for c in classes],
                       with_metadata=False)
    enc = encode(load_data(data), [unicodedata.normalize("NFC", c) for c in classes])
    assert sorted(enc.y.tolist()) == [0, 0, 1, 1, 2, 2]


# ------------------------------------------------------------------ a full disk, a second Ctrl-C
def test_a_cache_folder_refused_is_named_where_the_user_set_it(tmp_path, monkeypatch):
    """The cache folder from $REPAIR_CACHE_DIR inside the model folder was blamed on --cache-dir, which the
    user never gave; following "choose another --cache-dir" is now the second way, the variable the first."""
    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "val", n_per_class=2)
    monkeypatch.setenv("REPAIR_CACHE_DIR", str(model / "cache"))
    code, _, err = run_cli("eval", model, "--data", data, "-q")
    assert code == 2 and "the cache folder of $REPAIR_CACHE_DIR is inside the input model" in err, err
    assert "set $REPAIR_CACHE_DIR elsewhere or give --cache-dir" in err, err
    code, _, err = run_cli("eval", model, "--data", data, "-q", "--cache-dir", model / "c2")
    assert code == 2 and "--cache-dir is inside the input model" in err and "REPAIR_CACHE_DIR" not in err, err
    code, _, err = run_cli("eval", model, "--data", data, "-q", "--cache-dir", tmp_path / "c3")   # followed
    assert code == 0, err
    assert not (model / "cache").exists() and not (model / "c2").exists()


def test_a_journal_record_the_disk_cannot_take_is_cut_back_off_and_named(tmp_path, monkeypatch):
    """A zoo's journal on a full disk: a short write raised a bare OSError (exit 3, internal error), left a
    torn record, and the row's staged model in the user's output folder."""
    import os

    import pytest

    from repair import zoo
    from repair.errors import BadInput

    journal = zoo.Journal(tmp_path / "journal.jsonl")
    journal.append({"name": "a"})
    size = journal.path.stat().st_size
    real = os.write
    monkeypatch.setattr(zoo.os, "write", lambda fd, data: real(fd, data[:7]))     # the disk takes 7 bytes
    with pytest.raises(BadInput, match="cannot write the journal .*this row was not committed") as e:
        journal.append({"name": "b", "result": "x" * 100})
    assert e.value.path == str(journal.path) and journal.path.stat().st_size == size   # cut back off


def test_a_full_disk_inside_a_staged_output_names_the_users_output_not_a_temporary(tmp_path):
    """An ONNX file written into a staged folder (fix --export onnx, a demo) named its temporary path on a
    full disk: ``.fixed.rkdksgmy.tmp/fixed/model.onnx``, a place that is gone when the user looks."""
    import errno

    import pytest

    from repair.errors import BadInput
    from repair.io import atomic_output, outputs

    with pytest.raises(BadInput) as e:
        with outputs() as tx:
            folder = tx.stage(tmp_path / "fixed", is_dir=True)
            with atomic_output(folder / "model.onnx"):
                raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.path == str(tmp_path / "fixed" / "model.onnx"), str(e.value)
    assert "no space left" in e.value.problem and list(tmp_path.iterdir()) == []


def test_a_signal_while_staging_folders_are_removed_leaves_none_behind(tmp_path, monkeypatch):
    """A Ctrl-C landing while the first of an output set's staging folders was removed left the others
    (``.r.html.X.tmp``) in the user's folder, under a line saying nothing partial was left behind."""
    import shutil

    import pytest

    from repair import io as rio

    real, calls = shutil.rmtree, []

    def rmtree(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(path, *a, **k)
    monkeypatch.setattr(rio.shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        with rio.outputs() as tx:
            for name in ("fixed", "r.html", "r.json"):
                tx.stage(tmp_path / name, is_dir=name == "fixed")
            raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_a_full_disk_met_anywhere_is_the_users_file_system_not_an_internal_error(tmp_path, monkeypatch):
    import errno

    import repair.preflight

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "somewhere"))
    monkeypatch.setattr(repair.preflight, "read_inputs", full)
    code, out, err = run_cli("eval", tmp_path, "--data", tmp_path, "-q")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'somewhere'}: No space left on device", err


def test_a_plugin_runs_from_its_source_and_writes_no_bytecode_into_the_recipes_folder(tmp_path, monkeypatch):
    """Run through Python's bytecode cache, an edit within the same second and of the same size ran the old
    code (recorded under the new file's digest), and the import wrote ``__pycache__`` into the recipe's
    folder, an input (a review)."""
    import sys

    from repair.methods import METHODS
    from repair.recipes import load_recipe

    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    folder = tmp_path / "p"
    folder.mkdir()
    plugin = folder / "bytecode_s47.py"
    text = ("from dataclasses import dataclass\nfrom repair.methods import RepairOutput, register_method\n"
            "SCALE = 1\n@dataclass\nclass Config:\n    unused: int = 0\n"
            "@register_method('bytecode_s47', summary='x', config=Config, groups='never')\n"
            "def same(inputs, config):\n    return RepairOutput(W=inputs.W * SCALE, b=inputs.b)\n")
    plugin.write_text(text)
    (folder / "r.yaml").write_text("plugins: [bytecode_s47.py]\ncandidates:\n  - method: bytecode_s47\n")
    try:
        load_recipe(str(folder / "r.yaml"), allow_plugins=True)
        assert sorted(p.name for p in folder.iterdir()) == ["bytecode_s47.py", "r.yaml"]
        stamp = plugin.stat()
        plugin.write_text(text.replace("SCALE = 1", "SCALE = 0"))           # the same size ...
        import os

        os.utime(plugin, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))          # ... and time
        load_recipe(str(folder / "r.yaml"), allow_plugins=True)
        assert sys.modules[METHODS.get("bytecode_s47").fn.__module__].SCALE == 0
        pkg = folder / "pkg_bytecode_s47"                                     # a package's submodules too
        pkg.mkdir()
        (pkg / "__init__.py").write_text("from .impl import same\n")
        (pkg / "impl.py").write_text(text.replace("bytecode_s47", "pkg_bytecode_s47"))
        (folder / "q.yaml").write_text("plugins: [pkg_bytecode_s47]\ncandidates:\n  - method: pkg_bytecode_s47\n")
        load_recipe(str(folder / "q.yaml"), allow_plugins=True)
        assert not list(folder.rglob("__pycache__")), list(folder.rglob("*"))
    finally:
        METHODS.unregister("bytecode_s47")
        METHODS.unregister("pkg_bytecode_s47")



def test_review_a_short_csv_row_with_a_quoted_comma_is_never_split_into_the_wrong_columns(tmp_path):
    import pytest

    from repair.data import read_csv_text
    from repair.errors import BadInput

    with pytest.raises(BadInput, match="cannot be told apart"):
        read_csv_text('text,place,label\n"Hello, world" she said,positive\n', tmp_path / "t.csv")
    _, rows = read_csv_text('text,place,label\n"great" movie,pos\n', tmp_path / "t.csv")
    assert rows == [{"text": '"great" movie', "place": "pos", "label": ""}]      # short: its last cell empty


def test_review_stdout_that_is_no_place_for_results_changes_no_exit_code(tmp_path):
    """A read-only descriptor as stdout (``1</dev/null``) was an internal error (exit 3) in a first fix."""
    import os
    import subprocess

    with open(os.devnull) as read_only:
        code, _, err = _repair(["--version"], tmp_path, stdout=read_only, stderr=subprocess.PIPE, text=True)
    assert code == 0 and err == "", (code, err)


def test_review_the_notes_of_data_read_to_leave_out_are_said(tmp_path):
    import json

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=3, with_metadata=False)
    other = make_images(tmp_path / "e", n_per_class=1, with_metadata=False, seed=5)
    (other / "cat" / "readme.txt").write_text("x")
    code, out, err = run_cli("eval", model, "--data", data, "--exclude", other, "--json", "-q", "--no-cache")
    assert code == 0 and [w for w in json.loads(out)["warnings"] if "readme.txt" in w], out


def test_review_a_caught_warning_said_again_keeps_the_users_module_filter_and_is_never_an_error():
    import types
    import warnings

    from repair.adapters.hf_adapter import _warn_again

    mod = types.ModuleType("noisy_s47")
    mod.__file__ = "/somewhere/noisy_s47.py"
    import sys

    sys.modules["noisy_s47"] = mod
    try:
        w = warnings.WarningMessage(FutureWarning("old key"), FutureWarning, mod.__file__, 3)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=FutureWarning, module="noisy_s47")
            _warn_again(w)
        assert said == []
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _warn_again(w)                                    # a -W error: never an internal error
    finally:
        del sys.modules["noisy_s47"]


def test_review_a_full_stdout_of_one_run_is_not_the_next_ones():
    """A run whose stdout filled and that ended otherwise (Ctrl-C, another error) left its mark, and the next
    command in the same process exited 2 for it (a review)."""
    import errno

    from repair_cli.app import STATE

    STATE["stdout_lost"] = OSError(errno.ENOSPC, "No space left on device")
    code, out, err = run_cli("methods")
    assert code == 0 and "stdout" not in err, (code, err)


def test_review_the_notes_of_training_data_are_said(tmp_path):
    """A model repair's --train folder holding files that are no images: its note was dropped (a review)."""
    import json

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=3)
    train = make_images(tmp_path / "t", n_per_class=2, with_metadata=False, seed=9)
    (train / "cat" / "notes.txt").write_text("x")
    code, out, err = run_cli("fix", model, "--data", data, "--train", train, "--recipe", "clp", "--budget", "2steps",
                             "--out", tmp_path / "o", "--json", "-q", "--no-cache")
    assert code == 0, err
    assert [w for w in json.loads(out)["warnings"] if w.startswith("--train: ") and "notes.txt" in w], out
