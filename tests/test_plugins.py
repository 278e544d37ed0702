"""Declared contracts, seen from outside: a new head method and a new model repair, each one file
outside ``repair/methods/``, registered through the public registration and run by
``repair fix --recipe``; recipes validated when they are loaded."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_images
from repair_cli.main import app

runner = CliRunner()

HEAD_PLUGIN = '''
"""A head method written outside the package: a class-balanced L2 logistic head."""
from dataclasses import dataclass

from repair import solver as S
from repair.config import setting
from repair.methods import AFFINE, RepairOutput, register_method


@dataclass
class BalancedConfig:
    l2: float = setting(1.0, gt=0)


@register_method("balanced_lr", summary="class-balanced L2 logistic head", config=BalancedConfig,
                 groups="never", transform=AFFINE)
def balanced_lr(inputs, config):
    X, y, W0, b0 = inputs.cpu_tensors()
    w = S.class_balanced_weights(y, inputs.num_classes)
    W, b, _ = S.fit_logreg(X, y, inputs.num_classes, sample_weight=w, l2=config.l2)
    return RepairOutput(W=W[0], b=b[0], diagnostics={"l2": config.l2})
'''

MODEL_PLUGIN = '''
"""A model repair written outside the package: halve one body tensor, nudge the head bias."""
from dataclasses import dataclass

import torch

from repair.config import setting
from repair.methods import ModelRepairOutput, register_model_repair


@dataclass
class HalveConfig:
    factor: float = setting(0.5, gt=0)


@register_model_repair("halve_last_block", summary="scales the last body block's first tensor",
                       config=HalveConfig, groups="never")
def halve_last_block(inputs, config):
    tm = inputs.model
    blocks = tm.blocks()
    name = blocks[-2][1][0]                       # the first parameter of the last body block
    head_b = tm.head_name + ".bias"
    sd = tm.module.state_dict()
    new = {name: sd[name] * config.factor, head_b: sd[head_b] + 0.1}
    return ModelRepairOutput(tensors=new, steps=1, diagnostics={"tensor": name})
'''


def run_cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def repair_images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("plugdata") / "val", n_per_class=12, seed=3)


def _recipe(folder, name, plugin_src, method, extra=""):
    (folder / f"{name}.py").write_text(plugin_src)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        plugins: [{name}.py]
        candidates:
          - method: {method}
        """) + extra)
    return path


def test_head_method_from_one_outside_file(timm_folder, repair_images, tmp_path):
    recipe = _recipe(tmp_path, "balanced", HEAD_PLUGIN, "balanced_lr", "    params: {l2: 2.0}\n")
    out = tmp_path / "fixed"
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", recipe,
                                "--out", out, "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["method"] == "balanced_lr" and rep["kind"] == "head"
    assert rep["diagnostics"] == {"l2": 2.0} and rep["settings"]["config"] == {"l2": 2.0}
    from repair.io import load_safetensors

    _, meta = load_safetensors(out / "model.safetensors")
    assert meta["repair.method"] == "balanced_lr"
    # the plugin's settings are validated like a built-in's
    bad = _recipe(tmp_path, "balanced2", HEAD_PLUGIN.replace("balanced_lr", "balanced_lr2"), "balanced_lr2",
                  "    params: {l2: -1}\n")
    code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", bad, "-q")
    assert code == 2 and "balanced2.yaml" in err and "'l2'" in err and err.count("\n") == 1


def test_model_repair_from_one_outside_file(timm_folder, repair_images, tmp_path):
    import timm

    from repair.adapters import load_model
    from repair.io import load_safetensors

    recipe = _recipe(tmp_path, "halve", MODEL_PLUGIN, "halve_last_block")
    out = tmp_path / "fixed"
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", recipe,
                                "--out", out, "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["kind"] == "model" and rep["method"] == "halve_last_block"
    name = rep["diagnostics"]["tensor"]
    changed = rep["model_change"]["changed_tensors"]
    assert name in changed and "fc.bias" in changed and rep["model_change"]["steps"] == 1
    before, _ = load_safetensors(timm_folder / "model.safetensors")
    after, meta = load_safetensors(out / "model.safetensors")
    assert torch.allclose(after[name], before[name] * 0.5)
    assert sorted(k for k in before if not torch.equal(before[k], after[k])) == sorted(changed)
    assert json.loads(meta["repair.model_change"])["changed_tensors"] == changed
    # the output loads with plain timm and computes what our adapter computes
    cfg = json.loads((out / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"]).eval()
    timm.models.load_checkpoint(model, str(out / "model.safetensors"), strict=True)
    ours = load_model(out)
    x = ours.collate(sorted(repair_images.rglob("*.png"))[:4])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours.logits_batch(x, torch.device("cpu")), atol=1e-5, rtol=1e-5)
    # the report's "after" was measured with the changed network, not the old embeddings
    assert rep["after"]["n"] == rep["before"]["n"]


def test_model_repair_refused_for_onnx(timm_folder, repair_images, tmp_path):
    src = tmp_path / "m.onnx"
    code, _, err = run_cli("export", timm_folder, "--data", repair_images, "--format", "onnx", "--out", src, "-q")
    assert code == 0, err
    code, _, err = run_cli("fix", src, "--data", repair_images, "--recipe", "finetune", "-q")
    assert code == 2 and "cannot be fine-tuned" in err and err.count("\n") == 1


@pytest.mark.parametrize("body, needle", [
    ("candidates:\n  - method: dfr\n    params: {c_grid: [-1.0]}\n", "'c_grid'"),
    ("candidates:\n  - method: dfr\n    params: {tune_fractoin: 0.5}\n", "'tune_fractoin'"),
    ("candidates:\n  - method: afr\n    params: {l2: abc}\n", "'l2'"),
    ("candidates:\n  - method: neurontune\n    params: {holdout_fraction: 1.5}\n", "'holdout_fraction'"),
    ("candidates:\n  - method: nsf\n    grid: {identity_reg_grid: [[0.1], [-2]]}\n", "'identity_reg_grid'"),
    ("candidates:\n  - method: dfr\n    prams: {}\n", "'prams'"),
    ("candidatez:\n  - method: dfr\n", "'candidatez'"),
    ("selection: best\ncandidates:\n  - method: dfr\n", "selection"),
    ("folds: 1\ncandidates:\n  - method: dfr\n", "folds"),
    ("candidates:\n  - method: nope\n", "unknown repair method 'nope'"),
    ("candidates: [dfr\n", "not valid YAML"),
])
def test_malformed_recipe_is_exit_2_naming_file_and_key(timm_folder, repair_images, tmp_path, body, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    code, out, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", path, "-q")
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and needle in err
    assert not (timm_folder.parent / (timm_folder.name + "-repaired")).exists()


def test_recipe_that_is_a_folder(timm_folder, repair_images, tmp_path):
    code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", tmp_path, "-q")
    assert code == 2 and "folder" in err


def test_single_method_recipes_come_from_the_registry():
    from repair.methods import list_methods
    from repair.recipes import HERE, available, load_recipe

    assert sorted(p.stem for p in HERE.glob("*.yaml")) == ["auto", "auto-ft"]
    for m in list_methods():
        assert m.name in available()
        r = load_recipe(m.name)
        assert [c.method for c in r.candidates] == [m.name]
