"""The one registry (repair/registry.py): methods and model families registered through installed entry
points (modules and objects), broken entry points reported without breaking the built-ins, and the
resources model repairs declare."""
from __future__ import annotations

import textwrap
import warnings
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from repair import registry
from repair.errors import BadInput
from repair.registry import Resource, model_resources


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """Pretend entry points are installed: ``installed(group, name, "module:attr", source)`` writes the
    module into a folder on sys.path; the registries are reloaded with them, and again without after."""
    from repair.adapters import FAMILIES
    from repair.methods import METHODS

    eps: dict = {}
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "entry_points", lambda group: list(eps.get(group, [])))

    def install(group, name, value, source=None):
        if source is not None:
            (tmp_path / (value.split(":")[0] + ".py")).write_text(textwrap.dedent(source))
        eps.setdefault(group, []).append(EntryPoint(name=name, value=value, group=group))
        reg = {registry.METHODS_ENTRY_POINTS: METHODS, registry.FAMILIES_ENTRY_POINTS: FAMILIES}[group]
        reg.broken.clear()
        reg.reload_entry_points()

    yield install
    eps.clear()
    for reg in (METHODS, FAMILIES):
        reg.reload_entry_points()


FAMILY_OBJECT = '''
from repair.adapters import FamilyInfo

def detect(path, options):
    return path.suffix == ".fake"

def load(path, options):
    raise RuntimeError("fake family loaded " + path.name)

FAMILY = FamilyInfo("fakefam", detect, load, priority=1000, summary="a family from an entry point object")
'''


def test_family_from_an_entry_point_object(installed, tmp_path):
    from repair.adapters import list_families, load_model, unregister_family

    installed("repair.families", "fakefam", "fake_family_ep:FAMILY", FAMILY_OBJECT)
    try:
        fams = list_families()
        assert fams[0].name == "fakefam" and {"timm", "onnx", "transformers"} <= {f.name for f in fams}
        f = tmp_path / "m.fake"
        f.write_bytes(b"x")
        with pytest.raises(RuntimeError, match="fake family loaded m.fake"):    # load_model asked it first
            load_model(f)
    finally:
        unregister_family("fakefam")


def test_family_from_an_entry_point_module(installed):
    from repair.adapters import list_families, unregister_family

    installed("repair.families", "modfam", "fake_family_mod", '''
        from repair.adapters import register_family
        register_family("modfam", detect=lambda p, o: False, load=lambda p, o: None, priority=-5)
        ''')
    try:
        assert list_families()[-1].name == "modfam"
    finally:
        unregister_family("modfam")


METHOD_OBJECT = '''
from dataclasses import dataclass

from repair.config import setting
from repair.methods import MethodInfo, RepairOutput


@dataclass
class KeepConfig:
    scale: float = setting(1.0, gt=0)


def keep(inputs, config):
    return RepairOutput(W=inputs.W * config.scale, b=inputs.b.clone())


METHOD = MethodInfo("keep_head", keep, "the same head, scaled", KeepConfig, kind="head", groups="never")
'''


def test_method_from_an_entry_point_object(installed):
    import torch

    from repair.methods import METHODS, RepairInputs, get_method, list_methods
    from repair.recipes import load_recipe

    installed("repair.plugins", "keep", "fake_method_ep:METHOD", METHOD_OBJECT)
    try:
        m = get_method("keep_head")
        assert m.kind == "head" and "keep_head" in [x.name for x in list_methods("head")]
        out = m(RepairInputs(X=torch.zeros(2, 3), y=torch.tensor([0, 1]), W=torch.ones(2, 3),
                             b=torch.zeros(2)), m.make_config({"scale": 2.0}))
        assert torch.equal(out.W, 2 * torch.ones(2, 3))
        # installed methods are the user's own installation: recipes use them without --allow-plugins
        assert [c.method for c in load_recipe("keep_head").candidates] == ["keep_head"]
    finally:
        METHODS.unregister("keep_head")


def test_broken_entry_points_warn_and_leave_the_builtins(installed):
    from repair.adapters import FAMILIES, list_families
    from repair.methods import METHODS, list_methods

    with pytest.warns(registry.PluginWarning, match=r"no_such_module_xyz.*ModuleNotFoundError"):
        installed("repair.plugins", "gone", "no_such_module_xyz")
    assert any("gone" in b for b in METHODS.broken)
    with pytest.warns(registry.PluginWarning, match=r"boom_family.*RuntimeError: boom"):
        installed("repair.families", "boom", "boom_family", "raise RuntimeError('boom')\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # loaded once: no warning on every lookup
        assert {"dfr", "finetune", "clp"} <= {m.name for m in list_methods()}
        assert {"timm", "onnx"} <= {f.name for f in list_families()}
    assert any("boom" in b for b in FAMILIES.broken)


def test_a_name_registered_twice_is_refused():
    from repair.adapters import register_family
    from repair.methods import get_method

    with pytest.raises(ValueError, match="is already registered"):
        register_family("timm", detect=lambda p, o: False, load=lambda p, o: None, priority=0)
    with pytest.raises(KeyError, match="unknown repair method 'nope'; known: .*dfr"):
        get_method("nope")


# ---------------------------------------------------------------------- resources
def test_builtin_model_repairs_declare_todays_inputs():
    res = {r.name: r for r in model_resources()}
    assert {k: res[k].kind for k in ("train", "masks", "segmenter", "generator", "generator_model", "prompts")} == {
        "train": "data", "masks": "folder", "segmenter": "folder", "generator": "choice",
        "generator_model": "folder", "prompts": "file"}
    assert res["generator"].choices == ("composite", "diffusers")
    assert all(r.help for r in res.values()) and res["generator_model"].flag == "--generator-model"
    from repair.methods import get_method

    assert [r.name for r in get_method("clp").resources] == ["train", "masks"]
    assert "prompts" in [r.name for r in get_method("recompose").resources]
    assert get_method("dfr").resources == ()


def test_resource_check(tmp_path):
    folder, file = tmp_path / "masks", tmp_path / "p.yaml"
    folder.mkdir()
    file.write_text("template: x\n")
    assert Resource("masks", "folder").check(str(folder)) == folder
    assert Resource("prompts", "file").check(file) == file
    assert Resource("train", "data").check(folder) == folder and Resource("train", "data").check(file) == file
    assert Resource("generator", "choice", choices=("a", "b")).check("b") == "b"
    cases = [(Resource("masks", "folder"), file, None, "--masks must be a folder", file),
             (Resource("prompts", "file"), folder, None, "--prompts must be a file", folder),
             (Resource("generator_model", "folder"), tmp_path / "none", None, "--generator-model: not found",
              tmp_path / "none"),
             (Resource("train", "data"), tmp_path / "none", "train", "train: not found", tmp_path / "none"),
             (Resource("generator", "choice", choices=("a", "b")), "c", None, "--generator must be one of a, b, got 'c'",
              None)]
    for r, value, flag, problem, path in cases:
        with pytest.raises(BadInput) as e:
            r.check(value, flag)
        assert e.value.problem == problem and e.value.path == (None if path is None else str(path))


def test_bad_declarations_are_refused():
    for bad in (dict(name="Masks", kind="folder"), dict(name="x", kind="url"), dict(name="x", kind="choice"),
                dict(name="x", kind="file", choices=("a",))):
        with pytest.raises(ValueError):
            Resource(**bad)


OUTSIDE_MODEL_REPAIR = '''
from dataclasses import dataclass

from repair.config import setting
from repair.methods import ModelRepairOutput, register_model_repair
from repair.registry import Resource


@dataclass
class DepthConfig:
    scale: float = setting(1.0, gt=0)


@register_model_repair("depth_repair", summary="uses depth maps", config=DepthConfig, groups="never",
                       modalities=("image",),
                       resources=(Resource("depth_maps", kind="folder", help="a folder of depth maps"),
                                  Resource("masks", kind="folder", help="foreground masks")))
def depth_repair(inputs, config):
    return ModelRepairOutput(tensors={}, diagnostics={"depth": str(inputs.resources.get("depth_maps"))})
'''


def test_an_outside_model_repair_declares_a_new_resource(tmp_path):
    from repair.methods import METHODS
    from repair.recipes import load_recipe

    (tmp_path / "depth.py").write_text(OUTSIDE_MODEL_REPAIR)
    recipe = tmp_path / "depth.yaml"
    recipe.write_text("plugins: [depth.py]\ncandidates:\n  - method: depth_repair\n")
    assert "depth_maps" not in [r.name for r in model_resources()]
    try:
        load_recipe(recipe, allow_plugins=True)
        res = {r.name: r for r in model_resources()}
        r = res["depth_maps"]
        assert (r.kind, r.help, r.flag) == ("folder", "a folder of depth maps", "--depth-maps")
        assert [n for n in res].count("masks") == 1                  # shared names are merged
        assert registry.resource("depth_maps") is r
        with pytest.raises(BadInput) as e:
            r.check(tmp_path / "depth.py")
        assert e.value.problem == "--depth-maps must be a folder" and e.value.path == str(tmp_path / "depth.py")
        assert r.check(tmp_path) == tmp_path
        # the same name with another kind is a registration error naming both
        src = OUTSIDE_MODEL_REPAIR.replace('"depth_repair"', '"depth_repair2"').replace(
            'Resource("masks", kind="folder"', 'Resource("masks", kind="file"')
        ns: dict = {}
        with pytest.raises(ValueError, match="resource 'masks' of depth_repair2 is a file but .* a folder"):
            exec(compile(src, "depth2.py", "exec"), ns)
        assert "depth_repair2" not in [m.name for m in METHODS.registered()]
    finally:
        METHODS.unregister("depth_repair")
    assert "depth_maps" not in [r.name for r in model_resources()]


def test_an_outside_model_repairs_input_is_a_fix_option_and_a_zoo_field(tmp_path, timm_folder):
    """One declaration: the new input appears as `fix --depth-maps`, is checked before any work, reaches
    the method, and is a zoo manifest field checked with the manifest."""
    import json

    import yaml

    from conftest import make_images, run_cli
    from repair.methods import METHODS

    images = make_images(tmp_path / "val", n_per_class=8, seed=2)
    maps = tmp_path / "maps"
    maps.mkdir()
    recipe = tmp_path / "depth.yaml"
    recipe.write_text("candidates:\n  - method: depth_repair\n")
    exec(compile(OUTSIDE_MODEL_REPAIR, "depth.py", "exec"), {})          # registered, as a plugin would be
    try:
        code, out, err = run_cli("fix", timm_folder, "--data", images, "--recipe", recipe, "--depth-maps", maps,
                                 "--out", tmp_path / "fixed", "--json", "-q")
        assert code == 0, err
        assert json.loads(out)["diagnostics"]["depth"] == str(maps)
        code, _, err = run_cli("fix", timm_folder, "--data", images, "--recipe", recipe,
                               "--depth-maps", recipe, "--out", tmp_path / "f2", "-q")
        assert code == 2 and "--depth-maps must be a folder" in err and not (tmp_path / "f2").exists()
        m = tmp_path / "zoo.yaml"
        m.write_text(yaml.safe_dump({"models": [
            {"name": "d", "checkpoint": str(timm_folder), "data": str(images), "recipe": str(recipe),
             "depth_maps": str(maps), "output": str(tmp_path / "zoo-out")}]}))
        code, out, err = run_cli("zoo", m, "--out-dir", tmp_path / "r", "--json", "-q")
        assert code == 0, err
        assert (tmp_path / "zoo-out").is_dir()
        m.write_text(yaml.safe_dump({"models": [
            {"name": "d", "checkpoint": str(timm_folder), "data": str(images), "recipe": str(recipe),
             "depth_maps": str(tmp_path / "missing"), "output": str(tmp_path / "zoo-out2")}]}))
        code, _, err = run_cli("zoo", m, "--out-dir", tmp_path / "r2", "-q")
        assert code == 2 and "row 1 (d), depth_maps" in err and "not found" in err, err
    finally:
        METHODS.unregister("depth_repair")


def test_an_entry_point_that_exits_is_a_warning_not_the_end_of_the_run(installed):
    """An installed plugin whose module calls sys.exit(0) while loading must not end ``repair fix``
    as a silent success (exit 0, nothing written): it is skipped with a warning, the built-ins stay."""
    from repair.methods import METHODS, list_methods

    with pytest.warns(registry.PluginWarning, match=r"exits_plugin.*SystemExit"):
        installed("repair.plugins", "exits", "exits_plugin", "import sys\nsys.exit(0)\n")
    assert any("exits" in b for b in METHODS.broken)
    assert {"dfr", "mixft"} <= {m.name for m in list_methods()}
