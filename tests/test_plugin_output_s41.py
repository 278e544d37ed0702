"""A recipe plugin is the user's code, run the way a ``--factory`` is: what it prints (at import, or when
its registered method is called) goes to stderr as it prints it -- stdout holds the results only (``--json``:
one JSON document) --, and its ``sys.exit`` is exit 2 naming the plugin, never the command's own exit."""
from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from conftest import make_zoo_parts, run_cli

PLUGIN = '''
import sys
from dataclasses import dataclass

from repair import solver as S
from repair.config import setting
from repair.methods import AFFINE, RepairOutput, register_method

{at_import}


@dataclass
class Cfg:
    l2: float = setting(1.0, gt=0)


@register_method("{method}", summary="prints", config=Cfg, groups="never", transform=AFFINE)
def {method}(inputs, config):
    {in_call}
    X, y, W0, b0 = inputs.cpu_tensors()
    W, b, _ = S.fit_logreg(X, y, inputs.num_classes, sample_weight=S.class_balanced_weights(y, inputs.num_classes),
                           l2=config.l2)
    return RepairOutput(W=W[0], b=b[0], diagnostics={{}})
'''


@pytest.fixture
def plugin_recipe(tmp_path):
    """``make(method, at_import, in_call)``: a recipe whose one candidate is ``method``, registered by a
    plugin file that runs ``at_import`` when imported and ``in_call`` when its method is called; every
    method registered here is unregistered afterwards (the registry is process-wide)."""
    from repair.methods import METHODS

    made = []

    def make(method, at_import="pass", in_call="pass"):
        made.append(method)
        (tmp_path / f"{method}.py").write_text(PLUGIN.format(method=method, at_import=at_import, in_call=in_call))
        path = tmp_path / f"{method}.yaml"
        path.write_text(textwrap.dedent(f"""\
            name: {method}
            plugins: [{method}.py]
            candidates:
              - method: {method}
            """))
        return path

    yield make
    for m in made:
        if m in METHODS:
            METHODS.unregister(m)


def _fix(timm_folder, image_data, recipe, out, *extra):
    return run_cli("fix", timm_folder, "--data", image_data, "--recipe", recipe, "--allow-plugins",
                   "--out", out, *extra)


def _last_line(err: str) -> str:
    return [ln for ln in err.splitlines() if ln.strip()][-1]


def test_what_a_plugin_prints_stays_out_of_the_json_document(timm_folder, image_data, tmp_path, plugin_recipe):
    recipe = plugin_recipe("printy_s41", at_import="print('PLUGIN-IMPORT-STDOUT')",
                           in_call="print('PLUGIN-CALL-STDOUT'); print('PLUGIN-CALL-STDERR', file=sys.stderr)")
    code, out, err = _fix(timm_folder, image_data, recipe, tmp_path / "o", "--json")
    assert code == 0, err
    doc = json.loads(out)                              # one document, nothing before or after it
    assert doc["method"] == "printy_s41"
    assert "PLUGIN" not in out
    for line in ("PLUGIN-IMPORT-STDOUT", "PLUGIN-CALL-STDOUT", "PLUGIN-CALL-STDERR"):
        assert line in err, err
    # and what repair itself prints after the plugin ran still goes where it belongs
    import sys

    assert sys.stdout is not None and type(sys.stdout).__name__ != "_ToStderr"


def test_a_plugin_that_exits_at_import_is_exit_2_naming_it(timm_folder, image_data, tmp_path, plugin_recipe):
    recipe = plugin_recipe("exit_import_s41", at_import="print('no config here'); sys.exit(0)")
    code, out, err = _fix(timm_folder, image_data, recipe, tmp_path / "o", "--json")
    assert code == 2 and out == "", (code, out, err)
    line = _last_line(err)
    assert line.startswith("error: ") and "exit_import_s41.py" in line and "SystemExit 0" in line, err
    assert "no config here" in line, err            # what it printed last, to say why
    assert not (tmp_path / "o").exists()


def test_a_plugin_method_that_exits_is_exit_2_naming_it(timm_folder, image_data, tmp_path, plugin_recipe):
    recipe = plugin_recipe("exit_call_s41", in_call="print('about to exit'); sys.exit(0)")
    code, out, err = _fix(timm_folder, image_data, recipe, tmp_path / "o", "--json")
    assert code == 2 and out == "", (code, out, err)
    line = _last_line(err)
    assert line.startswith("error: ") and "method exit_call_s41" in line and "exit_call_s41.py" in line, err
    assert "SystemExit 0" in line and "about to exit" in line, err
    assert not (tmp_path / "o").exists()


def test_threaded_plugin_fits_leave_stdout_as_it_was(timm_folder, image_data, tmp_path, plugin_recipe, monkeypatch):
    """``auto``'s candidate fits run side by side in threads: two printing plugin methods (and a built-in)
    fitted together leave ``sys.stdout`` / ``sys.stderr`` as they found them, and the document alone on
    stdout."""
    import sys

    a = plugin_recipe("chat_a_s41", in_call="print('CHAT-A')")
    plugin_recipe("chat_b_s41", in_call="print('CHAT-B')")
    (tmp_path / "both.yaml").write_text(textwrap.dedent("""\
        name: both
        plugins: [chat_a_s41.py, chat_b_s41.py]
        candidates:
          - method: chat_a_s41
          - method: chat_b_s41
          - method: dfr
        """))
    from repair import threads

    seen = []
    real = threads.map_chains

    def spy(first, then, items, workers):
        seen.append(workers)
        return real(first, then, items, workers)

    monkeypatch.setattr(threads, "map_chains", spy)
    before = (sys.stdout, sys.stderr)
    with threads.limited(2):                   # side by side even where OMP_NUM_THREADS=1
        code, out, err = _fix(timm_folder, image_data, tmp_path / "both.yaml", tmp_path / "o", "--json")
    assert (sys.stdout, sys.stderr) == before
    assert seen and max(seen) > 1, seen        # the fits did run in threads
    assert code == 0, err
    json.loads(out)
    assert "CHAT" not in out and "CHAT-A" in err and "CHAT-B" in err, err
    assert a.exists()


def test_a_printing_plugin_in_a_local_zoo_leaves_stdout_to_the_results(tmp_path, plugin_recipe):
    parts = make_zoo_parts(tmp_path / "parts")
    recipe = plugin_recipe("zoo_chat_s41", at_import="print('ZOO-IMPORT')", in_call="print('ZOO-CALL')")
    (tmp_path / "out").mkdir()
    man = tmp_path / "zoo.yaml"
    man.write_text(yaml.safe_dump({"defaults": {"recipe": str(recipe), "output_dir": str(tmp_path / "out")},
                                   "models": [{"name": "a", "checkpoint": str(parts / "m0"),
                                               "data": str(parts / "val")}]}, sort_keys=False))
    code, out, err = run_cli("zoo", man, "--allow-plugins", "--json")
    assert code == 0, err
    json.loads(out)
    assert "ZOO-" not in out and "ZOO-IMPORT" in err and "ZOO-CALL" in err, err


def test_users_code_in_threads_ending_out_of_order_puts_the_streams_back(capsys):
    """Two blocks of the user's code side by side in threads (``auto``'s fits), the first to start ending
    first: the second still prints to stderr, and the streams are the ones from before once both ended
    (``contextlib.redirect_stdout`` per thread would leave stdout pointing at stderr). A ``sys.exit`` in
    one is that thread's BadInput, naming what it last printed there, not the other's."""
    import sys
    import threading

    from repair.errors import BadInput, users_code

    before = (sys.stdout, sys.stderr)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    errors = {}

    def a():
        with users_code("a"):
            print("A-PRINTS")
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        try:
            with users_code("b", "b.py"):
                b_in.set()
                a_out.wait(10)
                print("B-PRINTS")
                sys.exit(3)
        except BadInput as e:
            errors["b"] = str(e)

    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert (sys.stdout, sys.stderr) == before
    print("RESULT")
    out, err = capsys.readouterr()
    assert out == "RESULT\n" and "A-PRINTS" in err and "B-PRINTS" in err, (out, err)
    assert errors["b"] == "b.py: b exited (SystemExit 3); it printed: B-PRINTS"
