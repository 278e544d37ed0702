"""Advice in a refusal works when followed literally (an audit of the messages, session 46). Each test
triggers the message, checks its advice, then follows it. Every test here fails on the code before.

- A number YAML reads as text: "write it with a decimal point, e.g. 1.0e-9" -- but PyYAML reads 1.0e3 as
  text too (a float's exponent needs its sign).
- A zoo row's output folder of the user's: "use --force to replace it" -- which --force refuses.
- A demo folder holding other files: "use --force to rebuild" -- which --force refuses.
- --max-pixels too small: "give at least 1,024" -- which the option cannot parse.
- A folder checkpoint's own stale preprocess.json: "or write the output to another folder (--out)" -- the
  file is copied into every output folder, so no --out helps.
"""
from __future__ import annotations

import json
import re

import yaml

from conftest import make_images, make_timm_folder, run_cli


def test_the_yaml_number_advice_is_a_form_yaml_reads_as_a_number(tmp_path):
    from repair.errors import BadInput
    from repair.recipes import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ncandidates:\n  - method: dfr\n    params: {c_grid: [0.1, 1e3]}\n")
    try:
        load_recipe(recipe)
        raise AssertionError("1e3 read as text was accepted")
    except BadInput as e:
        msg = str(e)
    assert "1.0e+3" in msg, msg
    for advised in ("1.0e+3", "1000.0"):
        assert yaml.safe_load(f"x: {advised}")["x"] == 1000.0
        recipe.write_text(f"name: r\ncandidates:\n  - method: dfr\n    params: {{c_grid: [0.1, {advised}]}}\n")
        assert load_recipe(recipe).name == "r"                          # read, 1000.0 a number


def _zoo_of_one_row(tmp_path):
    """A manifest of one `dfr` row ``a`` (a timm folder) whose output goes to ``out/a``."""
    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "val", n_per_class=4)
    (tmp_path / "out").mkdir(exist_ok=True)
    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "output_dir": "out"},
                                        "models": [{"name": "a", "checkpoint": str(model), "data": str(data)}]}))
    return manifest


def test_a_zoo_row_over_a_folder_of_the_users_is_not_told_to_use_force(tmp_path):
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / "notes.txt").write_text("mine")
    manifest = _zoo_of_one_row(tmp_path)
    code, out, err = run_cli("zoo", manifest, "-q")
    assert code == 2 and "already exists" in err and "use --force" not in err, err
    assert "--force does not replace it" in err, err
    code, out, err = run_cli("zoo", manifest, "--force", "-q")          # and indeed it does not
    assert code == 2 and (tmp_path / "out" / "a" / "notes.txt").read_text() == "mine", err


def test_a_demo_folder_holding_other_files_is_not_told_to_use_force(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "f.txt").write_text("mine")
    for extra in ((), ("--force",)):
        code, _, err = run_cli("demo", "--size", "tiny", "--out", out, *extra)
        assert code == 2 and "use --force" not in err and "holds more than a demo" in err, err
    assert (out / "f.txt").read_text() == "mine"


def test_the_max_pixels_advice_is_a_value_the_option_takes(tmp_path):
    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "val", n_per_class=2, size=32)            # the model's input size
    code, _, err = run_cli("eval", model, "--data", data, "--max-pixels", "10", "-q", "--no-cache")
    m = re.search(r"give at least (\S+)$", err.strip())
    assert code == 2 and m, err
    code, _, err = run_cli("eval", model, "--data", data, "--max-pixels", m.group(1), "-q", "--no-cache")
    assert code == 0, err


def test_a_folder_checkpoints_own_preprocess_json_is_named_and_no_out_is_advised(tmp_path):
    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "val", n_per_class=3)
    side = model / "preprocess.json"
    side.write_text(json.dumps({"input_size": [3, 64, 64]}))
    code, _, err = run_cli("fix", model, "--data", data, "--recipe", "dfr", "--export", "onnx",
                           "--out", tmp_path / "elsewhere", "-q", "--no-cache")
    assert code == 2 and str(side) in err and "--out" not in err.split("disagrees", 1)[1], err
    side.unlink()                                                        # the advice, followed
    code, _, err = run_cli("fix", model, "--data", data, "--recipe", "dfr", "--export", "onnx",
                           "--out", tmp_path / "elsewhere", "-q", "--no-cache")
    assert code == 0, err


def test_a_zoo_row_over_a_file_where_its_output_is_a_folder_is_not_told_to_use_force(tmp_path):
    """Review: the advice asked replace_refused without the output's kind: a file where a folder
    checkpoint's output goes was told "use --force", which --force then refused."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("mine")
    manifest = _zoo_of_one_row(tmp_path)
    code, out, err = run_cli("zoo", manifest, "-q")
    assert code == 2 and "already exists" in err and "use --force" not in err, err
    assert "is a file, and the output is a folder" in err, err
    code, out, err = run_cli("zoo", manifest, "--force", "-q")
    assert code == 2 and (tmp_path / "out" / "a").read_text() == "mine", err
