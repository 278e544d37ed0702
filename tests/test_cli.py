"""The command line itself: usage errors, shared options, import cost."""
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from repair_cli.main import app

USAGE_ERRORS = {
    "batch size out of range": (["eval", "m", "--data", "d", "--batch-size", "0"], "--batch-size"),
    "unknown option": (["eval", "m", "--data", "d", "--no-such-option"], "--no-such-option"),
    "missing --data": (["probe", "m"], "--data"),
}


def _assert_one_line_usage_error(code, out, err, needle):
    assert code == 2, (code, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Usage:" not in err and "Traceback" not in err


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error_one_line_through_app(case):
    args, needle = USAGE_ERRORS[case]
    res = CliRunner().invoke(app, args)
    _assert_one_line_usage_error(res.exit_code, res.stdout, res.stderr, needle)


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error_one_line_as_program(case):
    args, needle = USAGE_ERRORS[case]
    r = subprocess.run([sys.executable, "-m", "repair_cli.main", *args], capture_output=True, text=True)
    _assert_one_line_usage_error(r.returncode, r.stdout, r.stderr, needle)


def test_import_does_not_load_torch():
    code = "import sys, repair_cli.main; print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_every_model_command_takes_the_same_load_options():
    load = {"--arch", "--factory", "--allow-pickle", "--max-length", "--image-size", "--mean", "--std", "--class-names"}
    group = typer.main.get_command(app)
    for name in ("eval", "probe", "fix", "export", "verify"):
        opts = {o for p in group.commands[name].params for o in getattr(p, "opts", [])}
        assert load <= opts, f"{name} lacks {sorted(load - opts)}"
    defaults = {name: next(p.default for p in group.commands[name].params if p.name == "device")
                for name in ("eval", "probe", "fix", "export", "verify")}
    assert defaults == {"eval": "auto", "probe": "auto", "fix": "auto", "export": "cpu", "verify": "cpu"}


def test_version_and_help_panels():
    from conftest import run_cli
    from repair._version import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"repair {__version__}"
    code, out, _ = run_cli("fix", "--help")
    assert code == 0
    for panel in ("Data columns", "Model loading", "Repair", "Model-repair inputs", "Output", "Runtime"):
        assert panel in out, panel
    for flag in ("--masks", "--generator", "--train", "--max-pixels", "--allow-plugins"):   # derived options
        assert flag in out, flag
    code, out, _ = run_cli("eval", "--help")
    assert code == 0 and "Gates" in out and "--fail-under-wga" in out


def test_ctrl_c_inside_an_import_is_an_interruption_not_an_internal_error():
    """A Ctrl-C that lands in a lazy import (``import onnxruntime`` re-raises it as ImportError) exits
    130 like any interruption, not 3 ("internal error")."""
    import typer

    from repair_cli.app import _interrupted, command

    def lazy_import():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")

    for fn, code in ((lazy_import, 130), (lambda: int("x"), 3)):
        with pytest.raises(typer.Exit) as ei:
            command(fn)()
        assert ei.value.exit_code == code
    assert not _interrupted(ValueError("x"))


def test_a_sigterm_while_a_command_is_built_exits_143(monkeypatch, capsys):
    """`repair fix` is built when it runs (its options come from the registry, importing torch): a
    SIGTERM or Ctrl-C in that window exits 143 / 130 with one line, not 1 ("gate failed") and a
    traceback."""
    import typer

    from repair.errors import Terminated
    from repair_cli import app as cli_app
    from repair_cli.main import app

    group = typer.main.get_command(app)
    for exc, code in ((Terminated, 143), (KeyboardInterrupt, 130)):
        def build(exc=exc):
            raise exc()

        monkeypatch.setitem(cli_app.LAZY_COMMANDS, "slowcmd", build)
        with pytest.raises(SystemExit) as ei:
            group.main(["slowcmd"], prog_name="repair")
        err = capsys.readouterr().err
        assert ei.value.code == code and "Traceback" not in err and err.count("\n") <= 1, err


def test_a_sigterm_after_the_command_is_over_leaves_its_exit_code_alone():
    """Found by an audit: a SIGTERM that reached `repair` after its outputs were committed and its result
    printed (during the interpreter's shutdown) raised inside torch's exit hooks ("Exception ignored in
    atexit callback ... Terminated") or made a finished run exit 143. Now the command's own exit code
    stands, with no noise: here a gate that fails (1) and a run that passes (0), each sent SIGTERM from an
    exit hook."""
    code = ("import atexit, os, signal, sys, time\n"
            "import torch  # noqa: F401  (its exit hooks, as in every real run)\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.3)))\n"
            "sys.argv = ['repair', *sys.argv[1:]]\n"
            "from repair_cli.main import main\nmain()\n")
    for args, want in ((["methods"], 0), (["methods", "--no-such-flag"], 2)):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == want and "Exception ignored" not in r.stderr and "Terminated" not in r.stderr, \
            (args, r.returncode, r.stderr[-800:])


def test_running_out_of_memory_is_exit_2_saying_what_to_change(timm_folder, image_data, monkeypatch):
    """An out-of-memory error (torch's, on CUDA or the CPU) is the machine's limit, not an internal
    error to report: one line naming it and what to change, exit 2."""
    import torch
    from conftest import run_cli

    import repair.pipeline as P

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(P, "choose", oom)
    code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "-q")
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: out of memory"), err
    assert "--batch-size" in lines[0] and "internal error" not in err


def test_an_option_given_twice_is_refused(tmp_path, timm_folder, image_data):
    """Found by an audit: click keeps an option's last value, so `--fail-under-wga 90% ...
    --fail-under-wga 0%` (a CI template with a local line appended) passed a gate the first value
    fails. An option given twice is now a usage error (exit 2, one line), on every command; flags
    that only switch something on, and options that take several values, may repeat."""
    from conftest import run_cli

    code, out, err = run_cli("eval", timm_folder, "--data", image_data, "--group-by", "place",
                             "--fail-under-wga", "90%", "--fail-under-wga", "0%")
    assert code == 2 and "--fail-under-wga" in err and "more than once" in err and err.count("\n") == 1, err
    assert out == ""
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", tmp_path / "a",
                           "--out", tmp_path / "b")
    assert code == 2 and "--out" in err and not (tmp_path / "a").exists() and not (tmp_path / "b").exists(), err
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, "-q", "-q", "--no-cache", "--no-cache")
    assert code == 0, err
    code, out, err = run_cli("eval", "--data", "a", "--data", "b", "--help")     # the help answers first
    assert code == 0 and "Usage" in out, err


def test_a_figure_with_errors_is_never_shown_as_100_percent():
    """Found by an audit: the tables rounded to one decimal, so 2499/2500 showed as 100.0% beside a gate
    line saying 99.96% < 100%, and 1/2500 as 0.0%. One formatter (repair.display.percent) for the
    stdout tables and the HTML report, with more digits where one would round to 0 or 100."""
    from repair.display import percent
    from repair.report import _pct

    from repair_cli.format import pct

    assert pct(2499 / 2500) == "99.96%" and pct(1 / 2500) == "0.04%" and pct(1.0) == "100.0%" and pct(0.0) == "0.0%"
    assert pct(0.5) == "50.0%" and pct(None) == "-" and _pct(None) == "–"
    assert pct(2999999 / 3000000) == "99.99997%" and pct(1 / 3000000) == "0.00003%"     # found by a review
    assert all(pct(x) == _pct(x) == percent(x) for x in (2499 / 2500, 0.123456, 1 / 3, 0.99999))


def test_a_library_warning_is_one_warning_line_of_the_command(tmp_path):
    """A warning the library raises with ``warnings.warn`` (a class folder's file that is not an image) was
    printed by Python as two lines naming a source file of repair (``.../data.py:886: SkippedFilesWarning:
    ...`` and the code line): the CLI shows it as its other warnings, one ``warning:`` line."""
    from conftest import make_images, make_timm_folder, run_cli

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4, with_metadata=False)
    (data / "cat" / "notes.txt").write_text("where these came from")
    code, _, err = run_cli("eval", model, "--data", data, "-q")
    assert code == 0, err
    said = [line for line in err.splitlines() if "notes.txt" in line]
    assert len(said) == 1 and said[0].startswith("warning: ") and "SkippedFilesWarning" not in err, err
    assert "data.py" not in err, err


def test_an_exit_3_the_library_raises_itself_reads_internal_error(monkeypatch, tmp_path):
    """README: exit 3 prints ``internal error: ...``; a RepairError the library raised knowingly (an
    export every exporter failed) printed ``error: ...`` with exit 3, as if the input were bad."""
    import repair.export as ex
    from conftest import make_timm_folder, run_cli
    from repair.errors import RepairError

    def fail(*a, **k):
        raise RepairError("ONNX export failed: torchscript: boom")

    monkeypatch.setattr(ex, "torch_to_onnx", fail)
    from conftest import make_images

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=2)
    code, _, err = run_cli("export", model, "--data", data, "--out", tmp_path / "m.onnx", "-q")
    assert code == 3 and err.startswith("internal error: ONNX export failed") and err.count("\n") == 1, err


def test_the_no_gain_warning_writes_its_figures_with_the_one_formatter(monkeypatch):
    """Found by a review: `no candidate beats the original model (X% vs Y%)` wrote 99.96% as 100.0% (its
    own `:.1f`), beside tables that say 99.96%: every accuracy shown goes through repair.display.percent."""
    import inspect
    from types import SimpleNamespace

    import torch

    from repair import choosing
    from repair.display import percent
    from repair.modelrepair import finetune

    # the warning itself: the best candidate 0.9996 and the original model 1.0 on the criterion
    monkeypatch.setattr(choosing, "head_predictions", lambda X, W, b: None)
    monkeypatch.setattr(choosing, "scores_from_preds", lambda pred, y, strata: (torch.tensor([1.0]), None))
    logged: list = []
    ctx = SimpleNamespace(X=torch.zeros(2, 1), W0=None, b0=None, warnings=[], log=logged.append)
    sel = SimpleNamespace(worst=torch.tensor([0.9996]), best=0)
    choosing._erm_check(ctx, sel, torch.arange(2), None, None, SimpleNamespace(name="worst_group"))
    (warning,) = ctx.warnings
    assert f"({percent(0.9996)} vs {percent(1.0)})" in warning and "99.96%" in warning, warning
    assert "(100.0% vs" not in warning and logged == [f"warning: {warning}"]
    # and no other accuracy in these modules is formatted by hand
    for mod in (choosing, finetune):
        assert ":.1f}%" not in inspect.getsource(mod), mod.__name__
