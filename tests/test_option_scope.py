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

