"""``--factory`` refusals no test ran (found by the session's line coverage): a spec without a function
part, a name that is not a function, a factory returning something other than a module, a network without
a linear head, and a factory module changed after this process imported it whose new code cannot be run.
Each is one line naming what is wrong, exit 2 from the CLI, and nothing written."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import CLASSES, make_images, run_cli
from repair.adapters import LoadOptions, load_model
from repair.errors import BadInput

PRE = dict(class_names=CLASSES, image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
SRC = ("import torch\nfrom torch import nn\n"
       "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.ReLU(), nn.Linear(6, 3))\n"
       "def no_head():\n    return nn.Sequential(nn.Flatten(), nn.ReLU())\n"
       "def not_a_module():\n    return {'w': 1}\n"
       "NOT_CALLABLE = 3\n")


@pytest.fixture
def fac(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    (tmp_path / "fac_s51.py").write_text(SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ns: dict = {}
    exec(compile(SRC, "fac", "exec"), ns)
    torch.manual_seed(0)
    save_file(ns["build"]().state_dict(), str(tmp_path / "w.safetensors"))
    yield tmp_path / "w.safetensors"
    import sys
    sys.modules.pop("fac_s51", None)


@pytest.mark.parametrize("spec,msg", [
    ("fac_s51.build", r"--factory must look like package\.module:function, got 'fac_s51\.build'"),
    ("fac_s51:missing", r"factory 'fac_s51:missing': 'missing' is not a function in fac_s51"),
    ("fac_s51:NOT_CALLABLE", r"'NOT_CALLABLE' is not a function in fac_s51"),
    ("fac_s51:not_a_module", r"factory 'fac_s51:not_a_module' returned dict, not a torch nn\.Module"),
    ("fac_s51:no_head", r"factory 'fac_s51:no_head': "),
])
def test_a_factory_that_cannot_give_a_model_is_refused_by_name(fac, spec, msg):
    with pytest.raises(BadInput, match=msg) as e:
        load_model(fac, LoadOptions(factory=spec, **PRE))
    if spec.endswith("no_head"):
        assert "w.safetensors" in str(e.value)        # the weights it was to be loaded into


@pytest.mark.parametrize("spec,msg", [("fac_s51.build", "must look like package.module:function"),
                                      ("fac_s51:not_a_module", "not a torch nn.Module")])
def test_the_cli_says_it_in_one_line_with_exit_2_and_writes_nothing(fac, tmp_path, spec, msg):
    data = make_images(tmp_path / "d", n_per_class=2, size=8)
    out = tmp_path / "fixed.safetensors"
    code, stdout, err = run_cli("fix", fac, "--factory", spec, "--image-size", "8", "--mean", "0.5,0.5,0.5",
                                "--std", "0.5,0.5,0.5", "--class-names", ",".join(CLASSES), "--data", data,
                                "--recipe", "dfr", "--out", out, "-q")
    assert code == 2 and stdout == "" and msg in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_factory_module_changed_again_while_it_is_loaded_is_refused(fac, monkeypatch):
    """The file changes between the load's first and second import: the code that would run is not the code
    whose digest names the embeddings; the load stops and says to restart."""
    from repair.adapters import factory as F

    a = load_model(fac, LoadOptions(factory="fac_s51:build", **PRE))
    assert a is not None
    calls = {"n": 0}

    def always_changed(reached):
        calls["n"] += 1
        return {"fac_s51": str(fac.parent / "fac_s51.py")}

    monkeypatch.setattr(F, "_changed_files", always_changed)
    monkeypatch.setattr(F, "_drop_changed", lambda *a, **k: False)
    with pytest.raises(BadInput, match=r"fac_s51\.py changed since it was imported in this process: restart "
                                       r"Python to load the new code"):
        load_model(fac, LoadOptions(factory="fac_s51:build", **PRE))
    assert calls["n"] == 1
