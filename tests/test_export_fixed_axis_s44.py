"""An exporter that fixes an axis asked to be dynamic (the dynamo exporter baked a Funnel model's sequence
length into the graph's inputs: session 44's transformers audit) has failed: ``auto`` falls back saying
why, and ``--exporter dynamo`` given by the user is exit 2 naming the option, as ``--opset`` is."""
from __future__ import annotations

import pytest
from conftest import run_cli

import repair.export as E
from repair.adapters import load_model
from repair.data import load_data


@pytest.fixture(scope="module")
def items(image_data):
    return load_data(image_data).items


@pytest.fixture
def dynamo_fixes_the_batch(monkeypatch):
    real = E.fixed_axes

    def fixed(proto, names, n_axes):
        # the dynamo exporter's graph is the one with opset >= 18; say it fixed the batch axis
        return ["axis 0 of input 'input' (at 2)"] if E._opset(proto) >= 18 else real(proto, names, n_axes)

    monkeypatch.setattr(E, "fixed_axes", fixed)


def test_auto_falls_back_when_the_dynamo_exporter_fixed_an_axis(timm_folder, items, tmp_path, dynamo_fixes_the_batch):
    said: list[str] = []
    rep = E.export_onnx(load_model(timm_folder), tmp_path / "f.onnx", metadata={}, verify_items=items[:5],
                        progress=said.append)
    assert rep["passed"] and rep["exporter"] == "torchscript"
    assert rep["exporter_fallback"] == "dynamo: RuntimeError: it fixed the axis 0 of input 'input' (at 2) asked to be dynamic"
    assert any("exporter failed" in m and "asked to be dynamic" in m for m in said)


def test_an_exporter_the_user_named_that_cannot_write_the_model_is_exit_2(timm_folder, image_data, tmp_path,
                                                                        dynamo_fixes_the_batch):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli("export", timm_folder, "--format", "onnx", "--data", image_data, "--out", out,
                                "--exporter", "dynamo", "-q")
    assert code == 2, (code, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--exporter dynamo" in lines[0] and "asked to be dynamic" in lines[0], err
    assert "--exporter torchscript" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".m.onnx*"))
