"""A first output that reads the head other than through the logits: the head's MatMul output before the
bias, or the head's weight itself. Repair measures and repairs the logits; a deployment reads the first
output, which would not follow the repaired head as the logits do (found by the session's mutation audit:
such a file was taken for one whose first output is an embedding, and after a repair its first output
predicted other classes than the logits repair had measured)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repair.adapters import load_model
from repair.errors import BadInput

from test_onnx_first_output_s44 import C, D, SIZE, _model


def _matmul_model(path: Path, first_nodes, first: str = "probs") -> Path:
    rng = np.random.default_rng(1)
    init = lambda n, a: numpy_helper.from_array(np.asarray(a, dtype=np.float32), n)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "body.w"], ["emb"]),
             helper.make_node("MatMul", ["emb", "head.w"], ["mm"]),
             helper.make_node("Add", ["mm", "head.b"], ["logits"]), *first_nodes]
    inits = [init("body.w", rng.normal(0, 0.3, (3 * SIZE * SIZE, D))), init("head.w", rng.normal(0, 1, (D, C))),
             init("head.b", np.zeros(C))]
    outputs = [helper.make_tensor_value_info(first, TensorProto.FLOAT, ["n", C]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", C])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
                          outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "preprocess.json").write_text(json.dumps(
        {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.25] * 3}))
    onnx.save(m, str(path))
    return path


def test_a_first_output_from_the_heads_matmul_before_its_bias_is_refused(tmp_path):
    p = _matmul_model(tmp_path / "m" / "m.onnx", [helper.make_node("Softmax", ["mm"], ["probs"], axis=-1)])
    with pytest.raises(BadInput, match=r"first output 'probs' reads the head's tensor 'mm' other than through "
                                        r"the 'logits' output") as e:
        load_model(p)
    assert "m.onnx" in str(e.value)


def test_a_first_output_reading_the_heads_weight_is_refused(tmp_path):
    # probabilities from a second Gemm over the embeddings with the head's weight and another bias
    nodes = [helper.make_node("Gemm", ["emb", "head.w", "prior"], ["z"], transB=1),
             helper.make_node("Softmax", ["z"], ["probs"], axis=-1)]
    p = _model(tmp_path / "m" / "m.onnx", "probs", nodes, [("prior", np.array([3.0, -1.0, 0.0]))])
    with pytest.raises(BadInput, match=r"reads the head's tensor 'head.w'"):
        load_model(p)


def test_probabilities_of_the_logits_of_a_matmul_head_are_still_accepted_and_follow_the_repair(tmp_path):
    import onnxruntime as ort
    import torch

    p = _matmul_model(tmp_path / "m" / "m.onnx", [helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)])
    a = load_model(p)
    W, b = a.head_params()
    a.set_head(W, b + torch.tensor([100.0, 0.0, 0.0]))
    out = tmp_path / "o" / "m.onnx"
    out.parent.mkdir()
    a.save(out, {})
    x = np.random.default_rng(0).normal(size=(8, 3, SIZE, SIZE)).astype(np.float32)
    probs, logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert (logits.argmax(1) == 0).all() and (probs.argmax(1) == logits.argmax(1)).all()
