"""Options a model would ignore are refused, one rule for all of them (``repair.adapters.check_option_scope``
in ``load_model``), and an optional package a run needs is asked for before any work, in one wording."""
from __future__ import annotations

import json
import shutil

from conftest import make_deployed_onnx, one_line_naming, run_cli


# ---------------------------------------------------------------- 1. --class-names / --max-length in scope
def test_class_names_on_a_text_model_that_names_its_classes_are_refused(bert_folder, text_data):
    code, _, err = run_cli("eval", bert_folder, "--data", text_data, "--class-names", "x,y,z", "-q", "--no-cache")
    one_line_naming(code, err, bert_folder, "--class-names has 3 classes, the model's head has 2")
    code, _, err = run_cli("eval", bert_folder, "--data", text_data, "--class-names", "good,bad", "-q", "--no-cache")
    one_line_naming(code, err, bert_folder, "--class-names", "negative,positive", "config.json id2label",
                    "leave them out")
    # its own names given again are harmless
    code, _, err = run_cli("eval", bert_folder, "--data", text_data, "--class-names", "negative,positive", "-q",
                           "--no-cache")
    assert code == 0, err


def test_class_names_name_a_transformers_model_with_generic_labels(bert_folder, text_data, tmp_path):
    """transformers' LABEL_0, LABEL_1 are no names of the model's own: --class-names names its classes
    (they were ignored, and the data's labels matched none)."""
    folder = tmp_path / "generic"
    shutil.copytree(bert_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    cfg["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    (folder / "config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli("eval", folder, "--data", text_data, "--class-names", "negative,positive", "--json",
                             "-q", "--no-cache")
    assert code == 0, err
    code, _, err = run_cli("eval", folder, "--data", text_data, "--class-names", "a,b,c", "-q", "--no-cache")
    one_line_naming(code, err, folder, "--class-names has 3 classes, the model's head has 2")


def test_class_names_on_a_timm_folder_that_names_its_classes_are_refused(timm_folder, image_data):
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, "--class-names", "a,b", "-q", "--no-cache")
    one_line_naming(code, err, timm_folder, "--class-names has 2 classes, the model's head has 3")
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, "--class-names", "a,b,c", "-q", "--no-cache")
    one_line_naming(code, err, timm_folder, "--class-names", "cat,dog,fox", "label_names", "leave them out")
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, "--class-names", "cat,dog,fox", "-q",
                           "--no-cache")
    assert code == 0, err


def test_class_names_of_a_bare_weights_file_must_count_the_head(timm_folder, image_data):
    weights = timm_folder / "model.safetensors"
    code, _, err = run_cli("eval", weights, "--arch", "test_resnet", "--data", image_data, "--class-names", "a,b",
                           "-q", "--no-cache")
    one_line_naming(code, err, weights, "--class-names has 2 classes, the model's head has 3")


def test_max_length_on_an_image_model_is_refused(timm_folder, image_data, tmp_path):
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, "--max-length", "5", "-q", "--no-cache")
    one_line_naming(code, err, timm_folder, "--max-length", "image model", "leave it out")
    onnx, _ = make_deployed_onnx(tmp_path / "m.onnx")
    code, _, err = run_cli("eval", onnx, "--data", image_data, "--image-size", "32", "--mean", "0.5,0.5,0.5",
                           "--std", "0.25,0.25,0.25", "--max-length", "5", "-q", "--no-cache")
    one_line_naming(code, err, onnx, "--max-length", "image model", "leave it out")


# ---------------------------------------------------------------- 2. optional packages: one wording, before any work
def _no_work(monkeypatch):
    """The model is never loaded: a refusal that comes after it fails the test."""
    import repair.pipeline as pipeline

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the missing package was reported")

    monkeypatch.setattr(pipeline, "load_model", loaded)


HINT = "pip install 'repair-toolkit[{0}]' (in a checkout: pip install -e \".[{0}]\")"


def test_lora_without_peft_is_refused_before_any_work(timm_folder, image_data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)          # as if not installed
    _no_work(monkeypatch)
    recipe = tmp_path / "lora.yaml"
    recipe.write_text("name: lora\ncandidates:\n  - method: mixft\n    params: {lora: true, scope: \"last:1\"}\n")
    out = tmp_path / "out"
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", recipe, "--out", out, "-q")
    line = one_line_naming(code, err, recipe, "lora: true", "peft", HINT.format("peft"))
    assert line.startswith("error: ") and not out.exists(), line


def test_diffusers_generator_without_diffusers_is_refused_before_any_work(timm_folder, image_data, tmp_path,
                                                                         monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    _no_work(monkeypatch)
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionInpaintPipeline"}')
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    out = tmp_path / "out"
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "recompose", "--generator",
                           "diffusers", "--generator-model", pipe, "--out", out, "-q")
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert "--generator diffusers needs the optional diffusers package: " + HINT.format("diffusion") in errors[0]
    assert not out.exists()
    recipe = tmp_path / "gen.yaml"                    # the recipe's own setting, likewise
    recipe.write_text("name: gen\ncandidates:\n  - method: recompose\n    params: {generator: diffusers}\n")
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", recipe, "--generator-model", pipe,
                           "--out", out, "-q")
    one_line_naming(code, err, recipe, "generator: diffusers", HINT.format("diffusion"))
    assert not out.exists()


def test_the_install_hints_have_one_wording():
    from repair.modelrepair.generation import INSTALL_DIFFUSION
    from repair.modelrepair.trainable import install_hint

    assert INSTALL_DIFFUSION == install_hint("diffusion") == HINT.format("diffusion")


# ---------------------------------------------------------------- 3. a choice's choices said once
def test_fix_help_says_the_generator_choices_once():
    from repair_cli.commands import fix_command

    fix = fix_command()
    fix = getattr(fix, "commands", {}).get("fix", fix)
    text = next(p.help for p in fix.params if "--generator" in p.opts)
    assert text.count("composite") == 1 and "(composite | diffusers; default: none)." in text, text
    code, out, err = run_cli("methods", "--json")
    assert code == 0, err
    gen = next(r for r in json.loads(out)["inputs"] if r["name"] == "generator")
    assert gen["choices"] == ["composite", "diffusers"] and "composite" not in gen["help"], gen


def test_class_names_given_to_a_timm_folder_that_names_none_are_written_into_the_output(tmp_path):
    """Found by the late review: --class-names now name a timm folder without label_names, but the repaired
    folder's config.json did not keep them, so `repair eval` of the output could not read the data's
    labels. They are written as label_names, and the output reads them with no option."""
    import json as _json

    from conftest import make_images, make_timm_folder, run_cli

    m = make_timm_folder(tmp_path / "m")
    cfg = _json.loads((m / "config.json").read_text())
    cfg.pop("label_names", None)
    (m / "config.json").write_text(_json.dumps(cfg))
    data = make_images(tmp_path / "d", n_per_class=6)
    code, _, err = run_cli("fix", m, "--data", data, "--class-names", "cat,dog,fox", "--recipe", "dfr",
                           "--out", tmp_path / "o", "-q")
    assert code == 0, err
    assert _json.loads((tmp_path / "o" / "config.json").read_text())["label_names"] == ["cat", "dog", "fox"]
    other = make_images(tmp_path / "e", n_per_class=3, seed=9)
    code, _, err = run_cli("eval", tmp_path / "o", "--data", other, "-q")
    assert code == 0, err
