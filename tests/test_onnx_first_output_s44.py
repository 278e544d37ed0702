"""An ONNX file whose first output is not the output named ``logits``: repair measures and repairs
``logits``, so the first output (what a deployment reads first) must predict what the logits predict
-- computed from them by top-class-keeping operators only (probabilities, a label) or not from them at
all (an embedding) -- else the file is refused by name, not measured on the wrong output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repair.adapters import load_model
from repair.errors import BadInput

SIZE, D, C = 8, 16, 3


def _model(path: Path, first: str, extra_nodes, extra_inits=()) -> Path:
    rng = np.random.default_rng(0)
    init = lambda n, a: numpy_helper.from_array(np.asarray(a, dtype=np.float32), n)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "body.w", "body.b"], ["pre"], transB=1),
             helper.make_node("Relu", ["pre"], ["emb"]),
             helper.make_node("Gemm", ["emb", "head.w", "head.b"], ["logits"], transB=1), *extra_nodes]
    inits = [init("body.w", rng.normal(0, 0.3, (D, 3 * SIZE * SIZE))), init("body.b", rng.normal(0, 0.1, D)),
             init("head.w", rng.normal(0, 1, (C, D))), init("head.b", np.zeros(C)),
             *[numpy_helper.from_array(np.asarray(a, dtype=np.float32 if np.asarray(a).dtype.kind == "f" else None), n)
               for n, a in extra_inits]]
    out_type = TensorProto.INT64 if first == "label" else TensorProto.FLOAT
    first_shape = ["n"] if first == "label" else ["n", D if first == "emb" else C]
    outputs = [helper.make_tensor_value_info(first, out_type, first_shape),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", C])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
                          outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    e = m.metadata_props.add()
    e.key, e.value = "class_names", json.dumps(["cat", "dog", "fox"])
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "preprocess.json").write_text(json.dumps(
        {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.25] * 3}))
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("name,nodes", [
    ("probs", [helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]),
    ("probs", [helper.make_node("Identity", ["logits"], ["l2"]), helper.make_node("LogSoftmax", ["l2"], ["probs"], axis=1)]),
    ("label", [helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)]),
    ("emb", []),                                         # the embedding output: not a prediction
    # (the session's review) a temperature, a cast, a label squeezed, cast and looked up in a table of names
    ("probs", [helper.make_node("Div", ["logits", "T"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=-1),
               helper.make_node("Cast", ["p"], ["probs"], to=TensorProto.FLOAT)]),
    ("label", [helper.make_node("ArgMax", ["logits"], ["k"], axis=-1, keepdims=1),
               helper.make_node("Squeeze", ["k", "one"], ["k2"]), helper.make_node("Cast", ["k2"], ["k3"], to=TensorProto.INT32),
               helper.make_node("Cast", ["k3"], ["k4"], to=TensorProto.INT64),
               helper.make_node("Gather", ["names", "k4"], ["label"])]),
])
def test_a_first_output_that_keeps_the_logits_top_class_is_accepted(tmp_path, name, nodes):
    inits = [("T", np.array([2.0])), ("one", np.array([1])), ("names", np.array([10, 20, 30]))]
    a = load_model(_model(tmp_path / "m" / "m.onnx", name, nodes, inits))
    assert a.class_names == ["cat", "dog", "fox"]


@pytest.mark.parametrize("nodes,inits,op", [
    # calibrated probabilities: a class prior added before the softmax moves the top class
    ([helper.make_node("Add", ["logits", "prior"], ["adj"]), helper.make_node("Softmax", ["adj"], ["probs"], axis=-1)],
     [("prior", np.array([[3.0, -1.0, 0.0]]))], "Add"),
    # a softmax over the batch axis is not the class's probability
    ([helper.make_node("Softmax", ["logits"], ["probs"], axis=0)], [], "Softmax"),
    # ArgMax's default axis is 0, the batch's; a negative temperature turns the order over
    ([helper.make_node("ArgMax", ["logits"], ["k"], keepdims=0), helper.make_node("Cast", ["k"], ["probs"], to=TensorProto.FLOAT)],
     [], "ArgMax"),
    ([helper.make_node("Mul", ["logits", "T"], ["probs"])], [("T", np.array([-1.0]))], "Mul"),
    # a branch that adds a prior, reading the logits from inside an If
    ([helper.make_node("If", ["cond"], ["probs"],
                       then_branch=helper.make_graph([helper.make_node("Add", ["logits", "prior"], ["a"])], "t", [],
                                                     [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)]),
                       else_branch=helper.make_graph([helper.make_node("Identity", ["logits"], ["b"])], "e", [],
                                                     [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)]))],
     [("cond", np.array(True)), ("prior", np.array([[3.0, -1.0, 0.0]]))], "If"),
])
def test_a_first_output_that_can_move_the_top_class_is_refused_by_name(tmp_path, nodes, inits, op):
    path = _model(tmp_path / "m" / "m.onnx", "probs", nodes, inits)
    before = path.read_bytes()
    with pytest.raises(BadInput) as e:
        load_model(path)
    msg = str(e.value)
    assert "m.onnx" in msg and "'probs'" in msg and f"a {op} node" in msg and "'logits'" in msg
    assert path.read_bytes() == before
