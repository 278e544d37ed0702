"""Inputs of the other kind than the model reads, and misnamed files, found by this session's audit of
data ingest: each is refused in one line naming what the user gave (exit 2), never taken as nothing."""
from __future__ import annotations

import json

from conftest import one_line_naming, run_cli


def test_eval_refuses_exclude_data_of_the_other_modality(tmp_path, timm_folder, image_data, bert_folder, text_data):
    """``--exclude`` texts beside an image model (or images beside a text model) matched no sample: the
    figures were measured on every row with exit 0, as if the repair set had been left out."""
    code, out, err = run_cli("eval", timm_folder, "--data", image_data, "--exclude", text_data, "-q")
    one_line_naming(code, err, text_data, "image", "text")
    assert out == ""
    code, out, err = run_cli("eval", bert_folder, "--data", text_data, "--exclude", image_data, "-q")
    one_line_naming(code, err, image_data, "text", "image")
    # the same kind is still measured, leaving the shared samples out
    code, out, err = run_cli("eval", timm_folder, "--data", image_data, "--exclude", image_data, "--json", "-q")
    assert code == 2 and "every sample" in err, err


def test_a_cache_dir_inside_the_model_is_refused_naming_the_folder_given(tmp_path, timm_folder, image_data):
    """The refusal named ``<cache-dir>/entry.safetensors``, a file the user never wrote."""
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, "--cache-dir", timm_folder / "cache")
    line = one_line_naming(code, err, timm_folder / "cache", "--cache-dir")
    assert "entry.safetensors" not in line, line


def test_a_folders_json_description_is_not_read_as_its_data_table(tmp_path, timm_folder):
    """A folder without class subfolders whose only .json is the set's description (one JSON object)
    was read as a one-row table: "cannot tell which column holds the label (columns: name, license)"."""
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    for name in ("metadata.json", "info.json"):
        (flat / name).write_text(json.dumps({"name": "my set", "license": "cc"}))
        code, _, err = run_cli("eval", timm_folder, "--data", flat)
        line = one_line_naming(code, err, flat)
        assert "column" not in line and name not in line, line
        (flat / name).unlink()
    # a .json table beside it is still read as the folder's data
    (flat / "rows.json").write_text(json.dumps([{"path": "a.png", "label": "cat"}]))
    code, _, err = run_cli("eval", timm_folder, "--data", flat, "-q")
    assert code == 0, err


def test_fix_of_a_text_model_refuses_image_eval_data_before_any_training(tmp_path, bert_folder, text_data,
                                                                         image_data):
    """Found by an audit: ``repair fix`` of a text model with an image ``--eval`` trained its model repair
    for the whole budget before refusing it (an image model given texts was refused at once)."""
    code, _, err = run_cli("fix", bert_folder, "--data", text_data, "--recipe", "mixft", "--budget", "200steps",
                           "--eval", image_data, "--out", tmp_path / "o")
    assert code == 2 and "training" not in err, err
    assert str(image_data) in err.strip().splitlines()[-1] and "text" in err, err
    assert not (tmp_path / "o").exists()
