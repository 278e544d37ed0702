"""`repair verify` fails closed on files it cannot compare (found by the session's line coverage: no test
reached these verdicts): logits of another number of classes, no output named ``logits`` among several,
a graph onnxruntime cannot load. Exit 1 with the problem in the report for the first two (the file was
checked and is not the model), exit 2 naming the file for the third (it is not a usable ONNX model)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import run_cli
from onnx import TensorProto, helper, numpy_helper


def _graph(path, classes=3, out="logits", inner=None, extra_out=None):
    rng = np.random.default_rng(0)
    d = 3 * 32 * 32 if inner is None else inner
    nodes = [helper.make_node("Flatten", ["pixel_values"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], [out])]
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", classes])]
    if extra_out:
        nodes.append(helper.make_node("Identity", ["f"], [extra_out]))
        outs.append(helper.make_tensor_value_info(extra_out, TensorProto.FLOAT, ["batch", d]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                          outs, initializer=[numpy_helper.from_array(rng.normal(size=(d, classes)).astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("kw,problem", [
    (dict(classes=4), "output logits has shape [18, 4] for a batch of 18, the model gives [18, 3]"),
    (dict(out="probs", extra_out="feat"), "no 'logits' output among ['probs', 'feat']"),
])
def test_a_file_verification_cannot_compare_fails(timm_folder, image_data, tmp_path, kw, problem):
    f = _graph(tmp_path / "other.onnx", **kw)
    before = f.read_bytes()
    code, stdout, stderr = run_cli("verify", f, "--reference", timm_folder, "--data", image_data, "--json")
    assert code == 1, stderr
    rep = json.loads(stdout)
    assert rep["passed"] is False and rep["problems"] == [problem]
    assert "FAILED" in stderr and f.read_bytes() == before


def test_a_graph_onnxruntime_cannot_load_is_exit_2_naming_it(timm_folder, image_data, tmp_path):
    f = _graph(tmp_path / "broken.onnx", inner=10)
    code, stdout, stderr = run_cli("verify", f, "--reference", timm_folder, "--data", image_data, "-q")
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"error: {f}: onnxruntime cannot load this model (") and "MatMul" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
