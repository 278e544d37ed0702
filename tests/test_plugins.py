"""Declared contracts, seen from outside: a new head method and a new model repair, each one file
outside ``repair/methods/``, registered through the public registration and run by
``repair fix --recipe``; recipes validated when they are loaded; a recipe's plugins run only when
the caller allows them; the built-in recipes of the top-level ``recipes/`` folder."""
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
                                "--out", out, "--json", "-q", "--allow-plugins")
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
    code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", bad, "-q", "--allow-plugins")
    assert code == 2 and "balanced2.yaml" in err and "'l2'" in err and err.count("\n") == 1


def test_model_repair_from_one_outside_file(timm_folder, repair_images, tmp_path):
    import timm

    from repair.adapters import load_model
    from repair.io import load_safetensors

    recipe = _recipe(tmp_path, "halve", MODEL_PLUGIN, "halve_last_block")
    out = tmp_path / "fixed"
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", recipe,
                                "--out", out, "--json", "-q", "--allow-plugins")
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
    from repair.recipes import available, load_recipe, recipes_dir

    files = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    for m in list_methods():
        assert m.name in available()
        r = load_recipe(m.name)
        assert [c.method for c in r.candidates] == [m.name]
        assert (r.source == "registry") == (m.name not in files)


# ---------------------------------------------------------------------- the plugins gate
MARKER_PLUGIN = """
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("plugin code ran")
from dataclasses import dataclass
from repair.methods import RepairOutput, register_method

@dataclass
class MarkConfig:
    unused: int = 0

@register_method("marker_{tag}", summary="a plugin that leaves a marker", config=MarkConfig, groups="never")
def marker(inputs, config):
    return RepairOutput(W=inputs.W.clone(), b=inputs.b.clone())
"""


def _marker_recipe(folder, tag, extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mark.py").write_text(MARKER_PLUGIN.replace("{tag}", tag))
    path = folder / "mark.yaml"
    path.write_text(f"plugins: [mark.py]\ncandidates:\n  - method: marker_{tag}\n{extra}")
    return path, folder / "MARKER"


def test_a_plugin_never_runs_without_the_flag(tmp_path):
    from repair.errors import BadInput
    from repair.methods import METHODS
    from repair.recipes import load_recipe, validate_recipe

    recipe, marker = _marker_recipe(tmp_path / "lib", "gate")
    with pytest.raises(BadInput) as e:
        load_recipe(recipe)
    assert e.value.path == str(recipe) and e.value.problem == (
        "recipe mark.yaml loads plugin code mark.py; pass --allow-plugins to run it")
    assert not marker.exists()
    # validation imports nothing, even when plugins are allowed; the plugin's method is left for run time
    for r in (validate_recipe(recipe), load_recipe(recipe, allow_plugins=True, validate_only=True)):
        assert [c.method for c in r.candidates] == ["marker_gate"] and r.plugins == ("mark.py",)
    assert not marker.exists() and "marker_gate" not in [m.name for m in METHODS.registered()]
    try:
        r = load_recipe(recipe, allow_plugins=True)
        assert marker.read_text() == "plugin code ran" and r.candidates[0].info.name == "marker_gate"
    finally:
        METHODS.unregister("marker_gate")


def test_fix_refuses_a_plugin_recipe_without_the_flag(timm_folder, repair_images, tmp_path):
    recipe, marker = _marker_recipe(tmp_path / "lib", "cli")
    code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", recipe, "-q")
    assert code == 2 and err.count("\n") == 1
    assert str(recipe) in err and "loads plugin code mark.py; pass --allow-plugins" in err
    assert not marker.exists() and not (timm_folder.parent / (timm_folder.name + "-repaired")).exists()


@pytest.mark.parametrize("extra, needle", [
    ("  - method: dfr\n    params: {c_grid: [-1.0]}\n", "'c_grid'"),        # built-in settings still checked
    ("  - methd: dfr\n", "needs a 'method'"),
    ("folds: 1\n", "folds"),
])
def test_validation_still_checks_structure_and_builtin_settings(tmp_path, extra, needle):
    from repair.errors import BadInput
    from repair.recipes import validate_recipe

    recipe, marker = _marker_recipe(tmp_path / "lib", "val", extra)
    with pytest.raises(BadInput) as e:
        validate_recipe(recipe)
    assert needle in e.value.problem and e.value.path == str(recipe) and not marker.exists()


def test_validation_without_plugins_knows_every_method(tmp_path):
    from repair.errors import BadInput
    from repair.recipes import validate_recipe

    (tmp_path / "r.yaml").write_text("candidates:\n  - method: nope\n")
    with pytest.raises(BadInput, match="unknown repair method 'nope'"):
        validate_recipe(tmp_path / "r.yaml")
    (tmp_path / "p.yaml").write_text("plugins: [missing.py]\ncandidates:\n  - method: nope\n")
    with pytest.raises(BadInput, match="plugins: file missing.py not found"):
        validate_recipe(tmp_path / "p.yaml")


# ---------------------------------------------------------------------- built-in recipes
def test_builtin_recipes_live_in_the_top_level_folder_with_one_line_each():
    from repair.recipes import available, load_recipe, recipes_dir

    folder = recipes_dir()
    assert (folder / "__init__.py").is_file()
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert {"auto", "auto-ft", "clp-ablation", "recompose-noprune", "clp", "mixft", "recompose"} <= set(names)
    av = available()
    for n in names:
        r = load_recipe(n)                                  # --recipe NAME finds every file
        assert r.source == f"{n}.yaml" and r.plugins == ()
        assert av[n] and "\n" not in av[n] and len(av[n]) < 400, n
    assert av["auto-ft"] == "auto's head repairs plus data-mixing fine-tuning of the network (mixft, every layer)."
    assert [c.label for c in load_recipe("clp-ablation").candidates] == ["clp(meta=False)"]


@pytest.mark.parametrize("method", ["clp", "mixft", "recompose"])
def test_documented_examples_spell_out_every_setting_at_its_default(method):
    """The example runs what ``--recipe METHOD`` ran before it existed, and documents every setting."""
    import yaml

    from repair.methods import get_method
    from repair.recipes import load_recipe, recipes_dir

    text = (recipes_dir() / f"{method}.yaml").read_text()
    params = yaml.safe_load(text)["candidates"][0]["params"]
    info = get_method(method)
    assert sorted(params) == sorted(s["name"] for s in info.settings())
    assert info.make_config(params) == info.default_config()
    for line in text.splitlines():
        if line.startswith("      ") and ":" in line:
            assert "# " in line.split(":", 1)[1], f"setting without a comment: {line}"
    assert [c.label for c in load_recipe(method).candidates] == [method]


BAD_HEAD_PLUGIN = '''
from dataclasses import dataclass

import torch

from repair.config import setting
from repair.methods import AFFINE, RepairOutput, register_method


@dataclass
class BadHeadConfig:
    mode: str = setting("shape", choices=("shape", "nan", "type"))


@register_method("bad_head", summary="returns what no head is", config=BadHeadConfig, groups="never",
                 transform=AFFINE)
def bad_head(inputs, config):
    W, b = inputs.W.clone(), inputs.b.clone()
    if config.mode == "shape":
        return RepairOutput(W=torch.cat([W, W[:1]]), b=torch.cat([b, b[:1]]))
    if config.mode == "nan":
        W[0, 0] = float("nan")
        return RepairOutput(W=W, b=b)
    return (W, b)
'''

BAD_MODEL_PLUGIN = '''
from dataclasses import dataclass

import torch

from repair.config import setting
from repair.methods import ModelRepairOutput, register_model_repair


@dataclass
class BadModelConfig:
    mode: str = setting("shape", choices=("shape", "name", "nan"))


@register_model_repair("bad_model", summary="returns tensors the model cannot take", config=BadModelConfig,
                       groups="never")
def bad_model(inputs, config):
    tm = inputs.model
    bias = tm.head_name + ".bias"
    b = tm.module.state_dict()[bias]
    new = {"shape": {bias: torch.zeros(b.shape[0] + 1)}, "name": {"no_such.weight": torch.zeros(3)},
           "nan": {bias: torch.full_like(b, float("nan"))}}[config.mode]
    return ModelRepairOutput(tensors=new, steps=1)
'''


@pytest.mark.parametrize("plugin,method,mode,why", [
    (BAD_HEAD_PLUGIN, "bad_head", "shape", "returned a head of shape (4, "),
    (BAD_HEAD_PLUGIN, "bad_head", "nan", "returned a head holding NaN or infinite values"),
    (BAD_HEAD_PLUGIN, "bad_head", "type", "returned tuple, not a RepairOutput"),
    (BAD_MODEL_PLUGIN, "bad_model", "shape", "returned fc.bias of shape (4,), expected (3,)"),
    (BAD_MODEL_PLUGIN, "bad_model", "name", "returned a tensor 'no_such.weight' the model does not have"),
    (BAD_MODEL_PLUGIN, "bad_model", "nan", "returned fc.bias holding NaN or infinite values"),
])
def test_a_plugin_whose_result_no_model_can_take_is_bad_input_naming_its_file(
        timm_folder, repair_images, tmp_path, plugin, method, mode, why):
    """The plugin is the user's code: its broken result is exit 2 naming the method and the file, not an
    internal error (exit 3) nor a complaint about the model or the data; nothing is written."""
    from repair.methods import METHODS

    recipe = _recipe(tmp_path, "mine", plugin, method, f"    params: {{mode: {mode}}}\n")
    try:
        code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", recipe, "--out",
                               tmp_path / "out", "-q", "--allow-plugins")
    finally:
        METHODS.unregister(method)                  # the next case loads it again from its own file
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: method {method} ({tmp_path / 'mine.py'}) {why}"), err
    assert not (tmp_path / "out").exists()


def test_a_builtin_methods_broken_result_is_our_bug_not_bad_input():
    from repair.errors import BadInput
    from repair.methods import RepairInputs, RepairOutput, check_output, get_method

    inputs = RepairInputs(X=torch.randn(8, 4), y=torch.arange(8) % 2, W=torch.zeros(2, 4), b=torch.zeros(2))
    check_output(RepairOutput(W=torch.ones(2, 4), b=torch.ones(2)), inputs, get_method("dfr"))    # fine
    with pytest.raises(RuntimeError, match=r"^method dfr returned a head of shape \(3, 4\)") as e:
        check_output(RepairOutput(W=torch.zeros(3, 4), b=torch.zeros(3)), inputs, get_method("dfr"))
    assert not isinstance(e.value, BadInput)
