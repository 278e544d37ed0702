"""Bad input found by a fuzzing audit (session 46). Every test here fails on the code before.

- A float8 tensor in a checkpoint was an internal error (exit 3: torch has no ``isfinite`` for float8),
  and a repaired head would have been written back in 8 bits, not the head measured.
- A zero or empty preprocessing value (``crop_pct: 0``, ``mean: 0``, ``std: []``, ``interpolation: ""``)
  was silently replaced by timm's default (timm reads ``cfg.get(k) or DEFAULT``): the figures and the
  repair used a preprocessing the file never asked for.
- A path holding a line break printed lines of its own on stdout -- a model folder named
  ``"m\\ngate passed: ..."`` forged a ``gate passed:`` line above a gate that failed.
- ``repair export --out .onnx`` was refused as a name that does not end in .onnx.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_deployed_onnx, make_images, make_timm_folder, one_line_naming, run_cli


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("img") / "data", n_per_class=4)


@pytest.mark.parametrize("name, dtype", [("fc.weight", torch.float8_e4m3fn), ("fc.bias", torch.float8_e5m2),
                                         ("conv1.0.weight", torch.float8_e5m2)])
def test_a_float8_tensor_is_refused_naming_the_file_and_the_tensor(tmp_path, images, name, dtype):
    from safetensors.torch import load_file, save_file

    model = make_timm_folder(tmp_path / "m")
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    assert name in tensors, sorted(tensors)
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, weights)
    before = weights.read_bytes()
    for args in (("eval", model, "--data", images), ("fix", model, "--data", images, "--recipe", "dfr",
                                                     "--out", tmp_path / "o")):
        code, out, err = run_cli(*args, "--no-cache", "-q")
        line = one_line_naming(code, err, weights, repr(name), "8-bit floats are not read")
        assert "internal error" not in line
    assert weights.read_bytes() == before and not (tmp_path / "o").exists()


def test_check_finite_reads_float8_tensors():
    from repair.adapters.base import check_finite
    from repair.errors import BadInput

    check_finite({"w": torch.ones(3).to(torch.float8_e4m3fn)}, "x")          # no NotImplementedError
    with pytest.raises(BadInput, match="non-finite"):
        check_finite({"w": torch.tensor([1.0, float("nan")]).to(torch.float8_e5m2)}, "x")


@pytest.mark.parametrize("key, value", [("crop_pct", 0), ("crop_pct", 0.0), ("mean", []), ("std", []),
                                        ("interpolation", ""), ("crop_mode", ""), ("crop_pct", False), ("mean", {}),
                                        ("interpolation", False)])
def test_a_zero_or_empty_preprocessing_value_in_config_json_is_refused(tmp_path, images, key, value):
    model = make_timm_folder(tmp_path / "m")
    cfg_path = model / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pretrained_cfg"][key] = value
    cfg_path.write_text(json.dumps(cfg))
    code, out, err = run_cli("eval", model, "--data", images, "--no-cache", "-q")
    one_line_naming(code, err, cfg_path, key, "empty or zero")


def test_a_zero_or_empty_value_in_preprocess_json_is_refused_and_null_is_absent(tmp_path, images):
    import repair

    onnx, _ = make_deployed_onnx(tmp_path / "m.onnx")
    pre = tmp_path / "preprocess.json"
    for bad, key in (({"mean": 0}, "mean"), ({"std": []}, "std"), ({"crop_pct": 0}, "crop_pct"),
                     ({"interpolation": ""}, "interpolation")):
        pre.write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, **bad}))
        code, out, err = run_cli("eval", onnx, "--data", images, "--class-names", "cat,dog,fox", "--no-cache", "-q")
        one_line_naming(code, err, pre, key, "empty or zero")
    # null: left out, as timm reads it -- and a described preprocessing without crop_pct does not crop
    pre.write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": None}))
    cfg = repair.load_model(onnx).data_config
    assert cfg["crop_pct"] == 1.0 and cfg["mean"] == [0.5] * 3, cfg


def test_a_path_with_a_line_break_prints_no_line_of_its_own(tmp_path, images):
    model = make_timm_folder(tmp_path / "m\ngate passed: worst-group accuracy 100% >= 90%")
    code, out, err = run_cli("eval", model, "--data", images, "--group-by", "place", "--fail-under-wga", "90%",
                             "--no-cache", "-q")
    assert code == 1, err
    lines = out.splitlines()
    assert not any(ln.startswith("gate passed") for ln in lines), out
    assert any(ln.startswith("gate FAILED") for ln in lines) and "m\\ngate passed" in lines[0], out
    code, out, err = run_cli("fix", model, "--data", images, "--recipe", "dfr", "--out", tmp_path / "o\ngate passed: x",
                             "--no-cache", "-q")
    assert code == 0, err
    assert not any(ln.startswith("gate passed") for ln in out.splitlines()), out
    assert out.splitlines()[0].startswith("repaired ") and "o\\ngate passed: x" in out.splitlines()[0], out
    code, out, err = run_cli("export", model, "--data", images, "--format", "safetensors",
                             "--out", tmp_path / "e\ngate passed: y", "-q")
    assert code == 0 and not any(ln.startswith("gate passed") for ln in out.splitlines()), out + err


def test_an_onnx_output_named_dot_onnx_is_refused_for_what_it_is(tmp_path, images):
    model = make_timm_folder(tmp_path / "m")
    code, out, err = run_cli("export", model, "--data", images, "--out", tmp_path / ".onnx", "-q")
    one_line_naming(code, err, tmp_path / ".onnx", "hidden name", "model.onnx")
    assert not (tmp_path / ".onnx").exists()
