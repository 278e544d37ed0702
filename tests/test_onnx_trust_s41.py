"""ONNX trust (audit E, s41): an ONNX model's identity covers its external data; `fix --export onnx` of an
ONNX model names the file written (never its staging path) with the same fields `repair export` gives;
the reason the TorchScript exporter was used is in the report and in the human output."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import CLASSES, make_deployed_onnx, make_images, make_timm_folder, run_cli
from repair.adapters import LoadOptions, load_model
from repair.data import load_data
from repair.errors import BadInput
from repair.export import export_onnx
from repair.outputs import export_provenance

OPTS = LoadOptions(class_names=CLASSES, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
CLI_OPTS = ["--image-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--class-names", ",".join(CLASSES)]


def _external(tmp_path: Path, name: str = "ext") -> Path:
    """A deployed ONNX classifier whose initializers are kept in ``w.bin`` beside ``model.onnx``."""
    first, _ = make_deployed_onnx(tmp_path / f"{name}-first.onnx", seed=0)
    d = tmp_path / name
    d.mkdir()
    onnx.save_model(onnx.load(str(first)), str(d / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    return d / "model.onnx"


def _scale_weights(w: Path) -> None:
    a = np.fromfile(w, dtype=np.float32)
    a[: len(a) // 2] *= -3
    a.tofile(w)


# ---- 1: the external data are part of the ONNX model's identity ------------------------------------------
def test_an_onnx_models_sha256_covers_its_external_data(tmp_path):
    path = _external(tmp_path)
    w = path.parent / "w.bin"
    a = load_model(path, OPTS)
    want = hashlib.sha256(path.read_bytes() + w.read_bytes()).hexdigest()
    assert a.source_sha256() == want                                  # the graph's bytes, then w.bin's
    assert a.identity() == {"sha256": want}
    _scale_weights(w)
    b = load_model(path, OPTS)
    assert b.source_sha256() != a.source_sha256()                     # other weights, another identity
    assert b.source_sha256() == hashlib.sha256(path.read_bytes() + w.read_bytes()).hexdigest()
    # the provenance an export of it records
    items = load_data(make_images(tmp_path / "imgs", n_per_class=2)).items
    out = tmp_path / "b.onnx"
    export_onnx(b, out, metadata=export_provenance(b, "onnx"), verify_items=items)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["repair.source_sha256"] == b.source_sha256()
    # a model without external data: its identity is its file's sha256, as before
    plain, _ = make_deployed_onnx(tmp_path / "plain.onnx")
    assert load_model(plain, OPTS).source_sha256() == hashlib.sha256(plain.read_bytes()).hexdigest()


def test_external_data_saved_over_while_the_model_loads_is_refused_naming_it(tmp_path, monkeypatch):
    import onnx.external_data_helper as edh

    path = _external(tmp_path)
    w = path.parent / "w.bin"
    real = onnx.load_external_data_for_model

    def then_saved_over(proto, base):
        real(proto, base)
        _scale_weights(w)               # a training script writing its next epoch right after onnx read it

    monkeypatch.setattr(onnx, "load_external_data_for_model", then_saved_over)
    monkeypatch.setattr(edh, "load_external_data_for_model", then_saved_over)
    with pytest.raises(BadInput) as e:
        load_model(path, OPTS)
    assert e.value.path == str(w) and "changed while it was read" in e.value.problem


# ---- 2: fix --export onnx of an ONNX model names the file written ----------------------------------------
def test_fix_export_of_an_onnx_model_names_the_file_written_with_exports_fields(tmp_path):
    src, _ = make_deployed_onnx(tmp_path / "src.onnx")
    data = make_images(tmp_path / "imgs")
    (tmp_path / "r1").mkdir()
    out, report = tmp_path / "r1" / "r.onnx", tmp_path / "r1" / "rep.html"
    code, stdout, err = run_cli("fix", src, *CLI_OPTS, "--data", data, "--group-by", "place", "--recipe", "dfr",
                                "--export", "onnx", "--out", out, "--report", report, "--json", "-q")
    assert code == 0, err
    e = json.loads(stdout)["export"]
    assert e["onnx"] == e["path"] == str(out) and out.is_file()
    code, stdout2, err = run_cli("export", out, "--data", data, "--out", tmp_path / "again.onnx", "--json", "-q")
    assert code == 0, err
    x = json.loads(stdout2)
    assert set(x) <= set(e), set(x) - set(e)                           # every field `repair export` gives
    for k in ("format", "exporter", "exporter_fallback", "opset", "input_names", "export_batch_size"):
        assert e[k] == x[k], (k, e[k], x[k])
    assert e["format"] == "onnx" and e["exporter"] == "graph-edit"
    assert e["metadata_keys"] == sorted(p.key for p in onnx.load(str(out)).metadata_props)
    rep = json.loads((tmp_path / "r1" / "rep.json").read_text())["models"][0]["result"]["export"]
    assert rep["onnx"] == rep["path"] == str(out)


# ---- 3: why the TorchScript exporter was used -------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("s41e")
    return make_timm_folder(root / "timm"), make_images(root / "imgs", n_per_class=2)


def test_an_opset_below_dynamos_is_the_reported_reason_for_torchscript(timm_and_images, tmp_path):
    timm, data = timm_and_images
    code, stdout, err = run_cli("export", timm, "--data", data, "--out", tmp_path / "o17.onnx", "--opset", "17",
                                "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["exporter"] == "torchscript"
    assert rep["exporter_fallback"] and "--opset 17" in rep["exporter_fallback"], rep["exporter_fallback"]
    code, stdout, err = run_cli("export", timm, "--data", data, "--out", tmp_path / "h17.onnx", "--opset", "17",
                                "-q")
    assert code == 0, err
    assert rep["exporter_fallback"] in stdout, stdout


def test_a_dynamo_failure_is_said_in_the_human_output_under_quiet(timm_and_images, tmp_path, monkeypatch):
    timm, data = timm_and_images
    real = torch.onnx.export

    def failing(*a, **kw):
        if kw.get("dynamo"):
            raise RuntimeError("simulated dynamo failure")
        return real(*a, **kw)

    monkeypatch.setattr(torch.onnx, "export", failing)
    code, stdout, err = run_cli("export", timm, "--data", data, "--out", tmp_path / "fb.onnx", "-q")
    assert code == 0, err
    assert "simulated dynamo failure" in stdout, stdout
    # repair fix --export onnx: its export block holds the same field (its human table is cli/commands.py's
    # fix_table, which can say it with cli.export_cmds.fallback_line)
    from repair_cli.export_cmds import fallback_line

    code, stdout, err = run_cli("fix", timm, "--data", data, "--recipe", "dfr", "--out", tmp_path / "fixed",
                                "--export", "onnx", "--json", "-q")
    assert code == 0, err
    e = json.loads(stdout)["export"]
    assert e["exporter"] == "torchscript" and "simulated dynamo failure" in fallback_line(e)
    code, stdout, err = run_cli("fix", timm, "--data", data, "--recipe", "dfr", "--out", tmp_path / "fixed2",
                                "--export", "onnx", "-q")
    assert code == 0, err
    assert "TorchScript exporter used:" in stdout and "simulated dynamo failure" in stdout, stdout
