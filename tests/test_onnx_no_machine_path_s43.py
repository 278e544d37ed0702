"""An ONNX file we write holds no machine path (session 43's provenance audit): torch's current exporter
records a stack trace on every node naming the user's network code, this package and the Python
installation by their absolute paths, so the same model exported from two folders gave two files."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import repair
from conftest import factory_weights, make_images, make_timm_folder, run_cli


def _machine_paths(blob: bytes, *extra) -> list:
    roots = [str(Path(repair.__file__).resolve().parent.parent), sys.prefix, str(Path(sys.prefix).resolve()),
             "site-packages", *[str(e) for e in extra]]
    return [r for r in roots if r.encode() in blob]


def test_the_same_model_exported_from_two_folders_is_the_same_onnx_file(tmp_path, monkeypatch):
    one = tmp_path / "one"
    make_timm_folder(one / "m")
    make_images(one / "d", n_per_class=3)
    two = tmp_path / "two" / "deeper"
    shutil.copytree(one, two)
    for where in (one, two):
        monkeypatch.chdir(where)
        code, _, err = run_cli("fix", where / "m", "--data", where / "d", "--recipe", "dfr", "--export", "onnx",
                               "--out", where / "out", "-q", "--no-cache")
        assert code == 0, err
    a, b = (one / "out" / "model.onnx").read_bytes(), (two / "out" / "model.onnx").read_bytes()
    assert _machine_paths(a, tmp_path) == []
    assert a == b


def test_a_factory_networks_source_path_is_not_in_its_onnx_export(tmp_path, monkeypatch):
    proj = tmp_path / "home" / "alice" / "proj"
    proj.mkdir(parents=True)
    factory_weights(proj, "alicenet43", "from torch import nn\n"
                    "def build():\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.ReLU(), nn.Linear(6, 3))\n",
                    monkeypatch)
    data = make_images(tmp_path / "d", n_per_class=3, size=8)
    code, _, err = run_cli("export", proj / "w.safetensors", "--factory", "alicenet43:build", "--image-size", "8",
                           "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--class-names", "cat,dog,fox",
                           "--data", data, "--format", "onnx", "--out", tmp_path / "x.onnx", "-q")
    assert code == 0, err
    blob = (tmp_path / "x.onnx").read_bytes()
    assert _machine_paths(blob, proj, "alicenet43.py") == []


def test_an_export_does_not_name_the_folder_it_came_from(tmp_path):
    m = make_timm_folder(tmp_path / "alice-customer-acme")
    data = make_images(tmp_path / "d", n_per_class=3)
    shutil.copytree(m, tmp_path / "other")
    outs = {}
    for src in ("alice-customer-acme", "other"):
        for fmt, name in (("onnx", "x.onnx"), ("safetensors", "x")):
            out = tmp_path / f"{src}-{name}"
            code, _, err = run_cli("export", tmp_path / src, "--data", data, "--format", fmt, "--out", out, "-q")
            assert code == 0, err
            outs[(src, fmt)] = (out if fmt == "onnx" else out / "model.safetensors").read_bytes()
    for fmt in ("onnx", "safetensors"):
        assert b"alice-customer-acme" not in outs[("alice-customer-acme", fmt)]
        assert outs[("alice-customer-acme", fmt)] == outs[("other", fmt)], fmt
