"""Paths the CLI is given that it cannot use: a folder above an output or the cache that cannot be
entered, an empty path, a weights file that cannot be read; and help texts that say what happens.
Found by a CLI audit; each test fails on the code before its fix."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_images, make_timm_folder, one_line_naming, run_cli

# ------------------------------------------------------------------ running as a user who cannot enter a folder
#: runs CLI command lines in-process (CliRunner) in a child process, printing [[code, stdout, stderr], ...];
#: "skip" when the child can still read the mode-000 folder or file (root with its capabilities)
_CHILD = r"""
import json, os, sys
if os.access(sys.argv[1], os.R_OK):
    print(json.dumps("skip")); sys.exit(0)
from typer.testing import CliRunner
from repair_cli.main import app
out = []
for args in json.loads(sys.argv[2]):
    r = CliRunner().invoke(app, args)
    out.append([r.exit_code, r.stdout, r.stderr + ("" if r.exception is None or isinstance(r.exception, SystemExit)
                                                   else repr(r.exception))])
print(json.dumps(out))
"""


def _as_user_without_dac(cwd: Path, locked: Path, commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """``commands`` run by a process that file modes bind: root drops CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (``setpriv``); another user is bound already. Skips where it is not so."""
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is not installed: a mode-000 folder can be entered")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))   # this test's repair, repair_cli
    res = subprocess.run(prefix + [sys.executable, "-c", _CHILD, str(locked), json.dumps(commands)], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    if doc == "skip":
        pytest.skip("this process can still enter a mode-000 folder (os.access says so)")
    return [tuple(r) for r in doc]


@pytest.fixture
def locked(tmp_path):
    """``tmp_path/nrdir``: a folder that cannot be entered (mode 000), opened again afterwards."""
    d = tmp_path / "nrdir"
    d.mkdir()
    d.chmod(0)
    yield d
    d.chmod(0o755)


def test_an_output_under_a_folder_that_cannot_be_entered_is_exit_2_as_a_read_only_one(tmp_path, locked):
    """`-o nrdir/out` (nrdir at mode 000) was exit 3 "internal error: PermissionError" for fix, its
    --report, export (ONNX and safetensors), demo and zoo --out-dir; `ro/out` (mode 555) was already
    `error: ro/out: --out: cannot write in ro (Permission denied)`. Now the same refusal, nothing on stdout,
    nothing written; `--cache-dir nrdir/c` warns as a read-only cache does and the run goes on (exit 0)."""
    model = make_timm_folder(tmp_path / "model")
    make_images(tmp_path / "data")
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "a", "checkpoint": "model", "data": "data", "group_by": "place"}]}))
    outputs = {"nrdir/out": ["fix", "model", "-d", "data", "--group-by", "place", "-o", "nrdir/out"],
               "nrdir/r.html": ["fix", "model", "-d", "data", "--group-by", "place", "-o", "fixed",
                                "--report", "nrdir/r.html"],
               "nrdir/x.onnx": ["export", "model", "-d", "data", "-o", "nrdir/x.onnx"],
               "nrdir/x": ["export", "model", "-f", "safetensors", "-o", "nrdir/x"],
               "nrdir/d": ["demo", "--size", "tiny", "--out", "nrdir/d"],
               "nrdir/z": ["zoo", "zoo.yaml", "--mode", "eval", "--out-dir", "nrdir/z"],
               "nrdir/j.jsonl": ["zoo", "zoo.yaml", "--mode", "eval", "--journal", "nrdir/j.jsonl"]}
    cache = ["eval", "model", "-d", "data", "--group-by", "place", "-q", "--cache-dir", "nrdir/c"]
    results = _as_user_without_dac(tmp_path, locked, list(outputs.values()) + [cache])
    for (where, args), (code, out, err) in zip(outputs.items(), results):
        line = one_line_naming(code, err, where, "Permission denied")
        assert "internal error" not in line, (args, line)
        assert "cannot write in nrdir (Permission denied)" in line, (args, line)
        assert out == "", (args, out)
    code, out, err = results[-1]
    assert code == 0, err
    assert "warning: could not write embedding cache nrdir/c (Permission denied)" in err, err
    assert "n=18" in out
    assert not (tmp_path / "fixed").exists() and not (tmp_path / "zoo-zoo").exists()
    locked.chmod(0o755)
    assert list(locked.iterdir()) == []
    del model


def test_check_output_refuses_a_path_whose_folder_cannot_be_entered(tmp_path, monkeypatch):
    """The one home of the rule (repair.io.check_output, which fix, export, --report, the zoo's report and
    journal and the demo go through): a lookup of the output refused by the file system (EACCES) is
    BadInput naming it, as a folder that takes no new file is."""
    from repair.errors import BadInput
    from repair.io import check_output

    final = tmp_path / "nrdir" / "out"
    real_lstat, real_stat = os.lstat, os.stat

    def refused(real):
        def call(p, *a, **kw):
            if str(p).startswith(str(final.parent)):
                raise PermissionError(errno.EACCES, "Permission denied", str(p))
            return real(p, *a, **kw)
        return call

    monkeypatch.setattr(os, "lstat", refused(real_lstat))
    monkeypatch.setattr(os, "stat", refused(real_stat))
    with pytest.raises(BadInput, match=r"cannot write in .*nrdir \(Permission denied\)"):
        check_output(final)


# ------------------------------------------------------------------ an empty path
def _path_typed(cmd) -> list:
    """``cmd``'s click parameters whose Python type is a path (``Path`` or ``Optional[Path]``)."""
    import inspect
    import pathlib
    import typing

    def is_path(ann) -> bool:
        if typing.get_origin(ann) is typing.Annotated:
            ann = typing.get_args(ann)[0]
        args = typing.get_args(ann) if typing.get_origin(ann) is not None else (ann,)
        return any(isinstance(a, type) and issubclass(a, pathlib.PurePath) for a in args)

    sig = inspect.signature(cmd.callback, eval_str=True)
    return [p for p in cmd.params if p.name in sig.parameters and is_path(sig.parameters[p.name].annotation)]


def test_an_empty_path_is_refused_for_every_path_argument_and_option_of_every_command(tmp_path, monkeypatch):
    """Typer turns '' into Path('.'): `eval M -d D --cache-dir ''` wrote the cache into the current folder,
    `zoo Z --out-dir ''` its lock, journal and report beside the inputs, `-d ''`, `--exclude ''` and
    `--eval ''` read the current folder as the data. One rule for every path-typed argument and option of
    every command (fix with its model-repair inputs too): exit 2, one line naming it, nothing on stdout."""
    import typer

    from repair_cli.app import LAZY_COMMANDS
    from repair_cli.main import app

    monkeypatch.chdir(tmp_path)
    group = typer.main.get_command(app)
    seen, problems = set(), []
    for name in group.commands:
        cmd = LAZY_COMMANDS[name]() if name in LAZY_COMMANDS else group.commands[name]
        for p in _path_typed(cmd):
            seen.add((name, p.name))
            args = [name]
            for q in cmd.params:           # every required parameter given (a name nothing has), p given ''
                value = "" if q is p else "missing-x" if q.required else None
                if value is None:
                    continue
                args += [value] if q.param_type_name == "argument" else [max(q.opts, key=len), value]
            code, out, err = run_cli(*args)
            flag = max(p.opts, key=len) if p.param_type_name == "option" else p.name.upper()
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            if not (code == 2 and out == "" and len(lines) == 1 and lines[0].startswith(f"error: {flag}: ")
                    and "empty path" in lines[0]):
                problems.append(f"{args}: exit {code}: {err.strip()[:300]}")
    assert {("eval", "cache_dir"), ("eval", "data"), ("eval", "exclude"), ("eval", "model"), ("fix", "eval_data"),
            ("fix", "out"), ("fix", "report"), ("zoo", "out_dir"), ("zoo", "journal"), ("zoo", "manifest"),
            ("demo", "out"), ("export", "out"), ("verify", "reference")} <= seen, seen
    assert not problems, "\n".join(problems)
    assert sorted(os.listdir(tmp_path)) == []


def test_an_empty_cache_dir_or_zoo_out_dir_writes_nothing_in_the_current_folder(tmp_path, monkeypatch):
    """The audit's two cases with real inputs: nothing is written where the command runs."""
    make_timm_folder(tmp_path / "model")
    make_images(tmp_path / "data")
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "a", "checkpoint": "model", "data": "data", "group_by": "place"}]}))
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_cli("eval", "model", "-d", "data", "-q", "--cache-dir", "")
    assert one_line_naming(code, err, "--cache-dir", "empty path") and out == ""
    code, out, err = run_cli("zoo", "zoo.yaml", "--mode", "eval", "-q", "--out-dir", "")
    assert one_line_naming(code, err, "--out-dir", "empty path") and out == ""
    assert sorted(os.listdir(tmp_path)) == before


# ------------------------------------------------------------------ an unreadable weights file
def test_an_unreadable_weights_file_is_said_to_be_unreadable_not_missing(tmp_path):
    """model.safetensors at mode 000 was `not a readable safetensors file (No such file or directory: ...)`
    (safetensors' own text); a table or an image that cannot be read was already said so."""
    make_timm_folder(tmp_path / "model")
    make_images(tmp_path / "data")
    weights = tmp_path / "model" / "model.safetensors"
    weights.chmod(0)
    try:
        ((code, out, err),) = _as_user_without_dac(tmp_path, weights, [["eval", "model", "-d", "data", "-q"]])
    finally:
        weights.chmod(0o644)
    line = one_line_naming(code, err, weights, "cannot read the weights file (Permission denied)")
    assert "No such file" not in line and out == ""


def test_load_safetensors_says_a_file_it_may_not_open_cannot_be_read(tmp_path, timm_folder, monkeypatch):
    import builtins

    from repair.errors import BadInput
    from repair.io import load_state_dict_file

    weights = tmp_path / "w.safetensors"
    shutil.copy(timm_folder / "model.safetensors", weights)
    real_open = builtins.open

    def refused(file, *a, **kw):
        if str(file) == str(weights):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", refused)
    with pytest.raises(BadInput, match=r"cannot read the weights file \(Permission denied\)"):
        load_state_dict_file(weights)


# ------------------------------------------------------------------ help that says what happens
def _option_help(command: str, flag: str) -> str:
    import typer

    from repair_cli.main import app

    cmd = typer.main.get_command(app).commands[command]
    (p,) = [p for p in cmd.params if flag in getattr(p, "opts", ())]
    return " ".join(p.help.split())


def test_cache_dir_help_names_every_place_the_default_comes_from():
    """repair.embeddings.default_cache_dir honours $REPAIR_CACHE_DIR, then $XDG_CACHE_HOME; the help
    named only the first and ~/.cache."""
    code, out, _ = run_cli("eval", "--help")
    assert code == 0 and "XDG_CACHE_HOME" in out
    text = _option_help("eval", "--cache-dir")
    assert text.index("REPAIR_CACHE_DIR") < text.index("XDG_CACHE_HOME") < text.index("~/.cache"), text


def test_preprocessing_help_says_what_applies_without_the_options():
    """--image-size said "default: the checkpoint's, else 224", but an ONNX file or a factory with no
    preprocessing and none of --image-size/--mean/--std is refused; once one is given the others default
    to 224 and ImageNet's mean and std (repair.adapters.images.image_config_from_options)."""
    from repair.adapters.images import image_config_from_options

    cfg = image_config_from_options(32, None, None, None)
    size, mean, std = (_option_help("eval", f) for f in ("--image-size", "--mean", "--std"))
    for text in (size, mean, std):
        assert "refused" in text and "preprocess.json" in text and "ONNX" in text, text
        assert "the checkpoint's, else 224" not in text and "(default: the checkpoint's)" not in text, text
    assert "224" in size
    for text, key in ((mean, "mean"), (std, "std")):     # the example, and the default once another is given
        assert text.count(",".join(f"{v:g}" for v in cfg[key])) == 2, text


# ------------------------------------------------------------------ the zoo's float option
@pytest.mark.parametrize("value, why", [("nan", "not a number"), ("inf", "infinite"), ("-inf", "infinite")])
def test_gpus_per_model_not_a_finite_number_is_refused_saying_so(tmp_path, value, why):
    """`--gpus-per-model nan` was "Input should be greater than or equal to 0" (the option's min=0 of the
    parser); now the zoo's own rule (ZooOptions), which says the value is not a finite number."""
    code, out, err = run_cli("zoo", tmp_path / "z.yaml", "--mode", "eval", f"--gpus-per-model={value}")
    line = one_line_naming(code, err, "--gpus-per-model", "finite number", why)
    assert "greater than or equal" not in line and out == ""
