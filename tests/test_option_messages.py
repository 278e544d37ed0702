"""Messages and homes of option and setting rules: a recipe's scope named with its recipe, a scope wider
than the model said, a --max-pixels no image can meet refused once, an ONNX output written beside a
preprocess.json that disagrees with it refused, and the yes/no rule at home in repair.rules."""
from __future__ import annotations

import json

import pytest

from conftest import make_images, make_timm_folder, one_line_naming, run_cli


# ---------------------------------------------------------------- check_bool lives in repair.rules
def test_check_bool_is_an_option_rule_and_still_importable_from_data():
    from repair import data, rules
    from repair.errors import BadInput

    assert "check_bool" in rules.__all__
    assert rules.check_bool(True, "--force") is True
    with pytest.raises(BadInput, match="--force must be true or false"):
        rules.check_bool("no", "--force")
    assert data.check_bool is rules.check_bool          # code that imports it from data keeps working


# ---------------------------------------------------------------- a recipe's scope on the model
def _scope_recipe(path, scope):
    path.write_text(json.dumps({"candidates": [{"method": "mixft", "params": {"scope": scope, "epochs": 1}}]}))
    return path


def test_a_scope_matching_no_parameter_names_its_recipe_file(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=6)
    r = _scope_recipe(tmp_path / "narrow.yaml", "names:zzz_nothing")
    code, _, err = run_cli("fix", m, "--data", data, "--recipe", r, "--budget", "2steps", "--out", tmp_path / "o",
                           "-q")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    for words in (str(r), "candidate 1 (mixft)", "setting 'scope'", "matches no parameter"):
        assert words in errors[0], errors[0]
    assert not (tmp_path / "o").exists()


def test_a_scope_matching_nothing_beside_a_head_candidate_is_refused_not_skipped_as_a_fold_problem(tmp_path):
    """Noticed by the fixer: with a head candidate in the recipe, auto-ft's escalation read a model repair's
    BadInput as "cannot be trained on a fold of N samples" and kept the head (exit 0): a scope matching no
    parameter is the recipe's error whatever the fold, exit 2 naming the recipe."""
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=8)
    r = tmp_path / "both.yaml"
    r.write_text(json.dumps({"selection": "auto", "candidates": [
        {"method": "dfr"}, {"method": "mixft", "params": {"scope": "names:zzz_nothing", "epochs": 1}}]}))
    code, _, err = run_cli("fix", m, "--data", data, "--recipe", r, "--budget", "2steps", "--out", tmp_path / "o",
                           "-q")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    for words in (str(r), "setting 'scope'", "matches no parameter"):
        assert words in errors[0], errors[0]
    assert not (tmp_path / "o").exists()


def test_a_mix_point_beyond_the_models_layers_names_its_recipe_before_any_work(tmp_path, bert_folder, text_data,
                                                                              monkeypatch):
    """Found by an audit: ``mix_point: 50`` on a 2-layer text model was refused only once mixft started
    training (after the repair set was embedded and every head candidate fitted), naming neither the recipe
    file nor the setting. Now checked with the scopes, before any embedding."""
    import repair.pipeline as pipeline

    def no_work(*a, **k):
        raise AssertionError("the repair set was embedded before the refusal")

    monkeypatch.setattr(pipeline, "prepare_data", no_work)
    r = tmp_path / "mp.yaml"
    for point in (50, 3.0):          # a whole number written as a float is read as one (review of the first version)
        r.write_text(json.dumps({"name": "mp", "candidates": [{"method": "dfr"},
                                                              {"method": "mixft", "params": {"mix_point": point}}]}))
        code, _, err = run_cli("fix", bert_folder, "--data", text_data, "--recipe", r, "--budget", "2steps",
                               "--out", tmp_path / "o", "-q", "--no-cache")
        line = one_line_naming(code, err, r, "candidate 2 (mixft)", "setting 'mix_point'", str(int(point)), "0..2")
        assert line.startswith("error:") and not (tmp_path / "o").exists()


def test_a_recipe_built_in_python_is_named_by_its_name_when_its_scope_matches_nothing():
    from repair.config import SettingRefused
    from repair.errors import BadInput
    from repair.methods import get_method
    from repair.recipes import Candidate, Recipe

    recipe = Recipe(name="mine", candidates=[Candidate("finetune", {"scope": "names:zzz"})])
    info = recipe.candidates[0].info
    assert info.origin == (None, "recipe 'mine', candidate 1 (finetune)")
    assert info == get_method("finetune")        # the same method, whatever recipe it came from

    def refuse(inputs, config):
        raise SettingRefused("setting 'scope': 'names:zzz' matches no parameter of the model")

    import dataclasses

    with pytest.raises(BadInput) as e:
        dataclasses.replace(info, fn=refuse)(object(), info.default_config())
    assert str(e.value).startswith("recipe 'mine', candidate 1 (finetune): setting 'scope'"), str(e.value)


def test_a_last_n_scope_deeper_than_the_model_is_said_on_stderr_and_in_the_report(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=6)
    r = _scope_recipe(tmp_path / "deep.yaml", "last:20")
    code, out, err = run_cli("fix", m, "--data", data, "--recipe", r, "--budget", "2steps", "--out", tmp_path / "o",
                             "-q", "--json")
    assert code == 0, err
    said = [line for line in err.splitlines() if "last:20" in line]
    assert len(said) == 1 and said[0].startswith("warning:") and "blocks before its head" in said[0], err
    assert "all of them are trained" in said[0]
    report = json.loads(out)
    assert [w for w in report["warnings"] if "last:20" in w and "blocks before its head" in w], report["warnings"]


def test_a_last_n_scope_within_the_model_says_nothing(timm_folder):
    from repair.adapters import load_model

    tm = load_model(timm_folder).trainable()
    k = len([b for b in tm.blocks() if b[0] != "head"])
    assert tm.scope_notes(f"last:{k}", "mixft") == [] and tm.scope_notes("all") == []
    note = tm.scope_notes(f"last:{k + 1}", "mixft")
    assert len(note) == 1 and note[0].startswith(f"mixft: scope last:{k + 1}: the model has {k} blocks"), note
    assert set(tm.select(f"last:{k + 1}")) == set(tm.select("all"))


# ---------------------------------------------------------------- --max-pixels below the model's own resize
def test_a_max_pixels_below_the_models_resize_is_one_line_naming_the_option(tmp_path):
    m = make_timm_folder(tmp_path / "m", size=32)            # crop_pct 1.0: resized to 32x32 = 1,024 pixels
    data = make_images(tmp_path / "d", n_per_class=6, size=20)     # 400-pixel images: under any limit here
    for cmd in (("fix", m, "--data", data, "--recipe", "dfr", "--out", tmp_path / "o"), ("eval", m, "--data", data)):
        code, _, err = run_cli(*cmd, "--max-pixels", "500", "-q", "--no-cache")
        line = one_line_naming(code, err, "--max-pixels", "500", "32x32", "1,024")
        assert str(data) not in line, line                  # not blamed on an image
        assert not (tmp_path / "o").exists()
    code, _, err = run_cli("eval", m, "--data", data, "--max-pixels", "1024", "-q", "--no-cache")
    assert code == 0, err                                   # a limit the resize meets reads every image


# ---------------------------------------------------------------- an ONNX output beside a preprocess.json
def test_an_onnx_fix_refuses_to_write_beside_a_preprocess_json_its_output_disagrees_with(tmp_path):
    from conftest import make_deployed_onnx

    folder = tmp_path / "m"
    folder.mkdir()
    src, _ = make_deployed_onnx(folder / "m.onnx")
    side = folder / "preprocess.json"
    side.write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}))
    data = make_images(tmp_path / "d", n_per_class=6)
    other = make_images(tmp_path / "e", n_per_class=3, seed=7)          # data the repairs never touched
    common = ("--data", data, "--recipe", "dfr", "--class-names", "cat,dog,fox", "-q", "--no-cache")
    # --mean wins over the preprocess.json for the source (it carries none); the output would record it
    code, _, err = run_cli("fix", src, *common, "--mean", "0.4,0.4,0.4")
    errors = [line for line in err.splitlines() if line.startswith("error:")]     # (the run's warnings before it)
    assert code == 2 and len(errors) == 1, err
    for words in (str(side), "m-repaired.onnx", "disagrees", "mean [0.5, 0.5, 0.5] in it", "--out"):
        assert words in errors[0], errors[0]
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "preprocess.json"]      # nothing written
    # written to another folder, it is read back as it records
    out = tmp_path / "o" / "m.onnx"
    out.parent.mkdir()
    code, _, err = run_cli("fix", src, *common, "--mean", "0.4,0.4,0.4", "--out", out)
    assert code == 0, err
    code, _, err = run_cli("eval", out, "--data", other, "-q", "--no-cache")
    assert code == 0, err
    # a preprocess.json that agrees with the options (or the run read it): written beside it as before
    code, _, err = run_cli("fix", src, *common)
    assert code == 0, err
    code, _, err = run_cli("eval", folder / "m-repaired.onnx", "--data", other, "-q", "--no-cache")
    assert code == 0, err


def test_an_onnx_fix_beside_a_disagreeing_preprocess_json_is_refused_before_any_embedding(tmp_path, monkeypatch):
    """The refusal above comes before the repair set is read through the model (pipeline.fix_model calls the
    adapter's check_written_beside with check_save), not once the outputs are written."""
    from conftest import make_deployed_onnx

    import repair.pipeline as pipeline

    folder = tmp_path / "m"
    folder.mkdir()
    src, _ = make_deployed_onnx(folder / "m.onnx")
    (folder / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3,
                                                        "std": [0.5] * 3}))
    data = make_images(tmp_path / "d", n_per_class=6)

    def no_work(*a, **k):
        raise AssertionError("the repair set was embedded before the refusal")

    monkeypatch.setattr(pipeline, "prepare_data", no_work)
    code, _, err = run_cli("fix", src, "--data", data, "--recipe", "dfr", "--class-names", "cat,dog,fox", "-q",
                           "--no-cache", "--mean", "0.4,0.4,0.4")
    assert code == 2 and "disagrees" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "preprocess.json"]


def test_an_onnx_export_beside_a_disagreeing_preprocess_json_is_refused(tmp_path, timm_folder):
    """Found by an audit: ``repair export`` (and ``fix --export onnx``) of a timm model wrote its ONNX file
    beside a ``preprocess.json`` that disagrees with the preprocessing the file records, exit 0, and
    ``repair eval`` of the file was then refused; ``fix --out`` of an ONNX model refused it before writing.
    One rule for every ONNX file written (onnx_adapter.check_onnx_written_beside), before any work."""
    data = make_images(tmp_path / "d", n_per_class=3)
    pj = tmp_path / "pj"
    pj.mkdir()
    (pj / "preprocess.json").write_text(json.dumps({"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3}))
    code, _, err = run_cli("export", timm_folder, "--data", data, "--out", pj / "t.onnx", "-q")
    assert code == 2 and "disagrees" in err and "preprocess.json" in err and err.count("\n") == 1, err
    # fix --export onnx of a bare weights file: its ONNX file goes beside --out, refused before any work
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((timm_folder / "model.safetensors").read_bytes())
    code, _, err = run_cli("fix", bare, "--arch", "test_resnet", "--image-size", "32", "--data", data, "--recipe",
                           "dfr", "--out", pj / "fixed.safetensors", "--export", "onnx", "-q", "--no-cache")
    assert code == 2 and "disagrees" in err and str(pj / "fixed.onnx") in err, err
    assert sorted(p.name for p in pj.iterdir()) == ["preprocess.json"]
    # fix --export onnx of a folder checkpoint holding such a preprocess.json: model.onnx would sit in the
    # output folder beside its copy (found by a review of the first version, which checked file outputs only)
    import shutil

    folder = tmp_path / "tf"
    shutil.copytree(timm_folder, folder)
    shutil.copy(pj / "preprocess.json", folder / "preprocess.json")
    code, _, err = run_cli("fix", folder, "--data", data, "--recipe", "dfr", "--out", tmp_path / "of",
                           "--export", "onnx", "-q", "--no-cache")
    assert code == 2 and "disagrees" in err and "preprocess.json" in err, err
    assert not (tmp_path / "of").exists()
    # beside an agreeing one (the file's own preprocessing), or in another folder: written as before
    code, _, err = run_cli("export", timm_folder, "--data", data, "--out", tmp_path / "t.onnx", "-q")
    assert code == 0, err
    code, _, err = run_cli("fix", timm_folder, "--data", data, "--recipe", "dfr", "--out", tmp_path / "ok",
                           "--export", "onnx", "-q", "--no-cache")
    assert code == 0 and (tmp_path / "ok" / "model.onnx").is_file(), err
