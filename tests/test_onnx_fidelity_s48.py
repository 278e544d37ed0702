"""Session 48 (ONNX in/out audit):

- ``--tolerance`` (an absolute bound) with a sample whose top class differs was an internal error: the
  near-tie bound had the shape (N, 1), indexed by class;
- a first output computed from the head's own output tensor, which reaches ``logits`` through an
  Identity, passed for "not computed from the logits" (a class prior added to it was measured as
  ``logits``);
- a repaired IR-version-3 file (every initializer also a graph input) got a new initializer without its
  graph input: onnx.checker refused the output;
- the verify table showed the batch's largest bound beside the largest |diff| (a failure read as a pass).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from repair.adapters import load_model
from repair.errors import BadInput

SIZE, D, C = 8, 16, 3


def test_an_absolute_tolerance_bounds_every_logits_near_tie():
    from repair.export import Bound

    ref = torch.tensor([[3.0, 1.0, 0.5], [0.2, 2.0, 1.9]])
    for b in (Bound(atol=1e-3, rtol=0.0, source="--tolerance"), Bound(atol=1e-5, rtol=1e-3, source="default")):
        tie = b.tie_allowed(ref)
        assert tie.shape == ref.shape
        assert float(tie[1, 2]) >= b.atol            # a class index past 0 is a bound, not an IndexError


def _graph_file(path: Path, nodes, outputs, inits, *, ir: int = 8, opset: int = 17, inits_as_inputs=False) -> Path:
    rng = np.random.default_rng(0)
    f32 = lambda n, a: numpy_helper.from_array(np.asarray(a, dtype=np.float32), n)
    body = [f32("body.w", rng.normal(0, 0.3, (D, 3 * SIZE * SIZE))), f32("body.b", rng.normal(0, 0.1, D))]
    tensors = body + [f32(n, a) for n, a in inits]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])]
    if inits_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors]
    g = helper.make_graph([helper.make_node("Flatten", ["input"], ["flat"], axis=1),
                           helper.make_node("Gemm", ["flat", "body.w", "body.b"], ["pre"], transB=1),
                           helper.make_node("Relu", ["pre"], ["emb"]), *nodes], "g", inputs, outputs,
                          initializer=tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    e = m.metadata_props.add()
    e.key, e.value = "class_names", json.dumps(["cat", "dog", "fox"])
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "preprocess.json").write_text(json.dumps({"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3,
                                                             "std": [0.25] * 3}))
    onnx.save(m, str(path))
    return path


def test_a_first_output_computed_from_the_heads_tensor_behind_an_identity_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["emb", "head.w", "head.b"], ["z"], transB=1),
             helper.make_node("Identity", ["z"], ["logits"]),
             helper.make_node("Add", ["z", "prior"], ["adj"]), helper.make_node("Softmax", ["adj"], ["probs"], axis=-1)]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", C]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", C])]
    inits = [("head.w", rng.normal(0, 1, (C, D))), ("head.b", np.zeros(C)), ("prior", [[3.0, -1.0, 0.0]])]
    path = _graph_file(tmp_path / "m" / "m.onnx", nodes, outputs, inits)
    with pytest.raises(BadInput, match="a Add node") as e:
        load_model(path)
    assert "'probs'" in str(e.value) and "'logits'" in str(e.value)
    # the same graph whose first output only takes the softmax of the head's tensor is accepted
    nodes[2:] = [helper.make_node("Softmax", ["z"], ["probs"], axis=-1)]
    ok = _graph_file(tmp_path / "ok" / "m.onnx", nodes, outputs, inits[:2])
    assert load_model(ok).class_names == ["cat", "dog", "fox"]


def test_a_repaired_ir3_file_lists_its_new_initializers_as_graph_inputs(tmp_path):
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["emb", "head.w"], ["logits"])]         # no bias: repair adds one
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", C])]
    path = _graph_file(tmp_path / "m" / "m.onnx", nodes, outputs, [("head.w", rng.normal(0, 1, (D, C)))],
                       ir=3, opset=8, inits_as_inputs=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    a = load_model(path)
    W, b = a.head_params()
    a.set_head(W * 0.5, b + torch.tensor([0.5, -0.25, 0.0]))
    out = tmp_path / "o.onnx"
    a.save(out, {})
    written = onnx.load(str(out))
    assert written.ir_version == 3
    onnx.checker.check_model(written, full_check=True)


def test_the_verify_table_shows_the_worst_logits_own_bound():
    from repair_cli.export_cmds import _verify_rows

    rep = {"logits_output": "logits", "shapes": {"logits": ["n", 3]}, "max_abs_diff": 0.01, "tolerance": 0.0314,
           "bound": {"worst": {"abs_diff": 0.01, "allowed": 3e-05}}, "argmax_agreement": 1.0, "n_verified": 60}
    row = _verify_rows(rep)[0]
    assert "0.01 / 3e-05" in row and "0.0314" not in " ".join(map(str, row))
