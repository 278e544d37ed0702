"""Tests that kill mutants a session-51 audit of the ONNX input code found surviving
(``repair/adapters/onnx_graph.py``, ``onnx_adapter.py``, ``onnx_runtime.py``): the head behind several
Identity nodes, the Gemm / MatMul head's refusals (transA, weights or bias not initializers, an Add after a
Gemm, a weight that is no matrix or not floating point), a Gemm without ``transB``, a scalar bias, the head
written back (its Add in graph order, its bias in the file's shape), the cache key's opsets, a training-mode
Dropout fed by a Constant, an IR-3 file's initializer inputs, first outputs that can move the top class,
non-finite half-precision initializers, embeddings that are no matrix, a second ``set_head``,
``set_tensors``' refusals, ``changed_tensors`` of a new bias, external data that grew while read, a file's
``label_names`` rewritten, and onnxruntime's providers, options and feeds."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from repair.adapters import LoadOptions, load_model
from repair.adapters.onnx_runtime import fed_unpadded, make_session, ort_providers, run_batch, session_feeds
from repair.errors import BadInput, RepairError

from test_export import MEAN, STD, _toy_graph
from test_onnx_fidelity_s48 import _graph_file
from test_onnx_first_output_s44 import _model
from test_onnx_input import _batch, _body, _head, _init, _key, _save

CPU = torch.device("cpu")
ATOL = 1e-4                       # float32, graphs of a few dozen weights: holds on any CPU
TOY_D, TOY_C = 6, 4               # _toy_graph's head: 6 features, 4 classes


# ------------------------------------------------------------------ helpers
def _write(m: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return path


def _load_toy(path: Path):
    return load_model(path, LoadOptions(image_size=2, mean=MEAN, std=STD))


def _x(seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((5, 3, 2, 2)).astype(np.float32)


def _ort(path: Path, x: np.ndarray, name: str = "x") -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {name: x})[0]


def _replace_init(m: onnx.ModelProto, name: str, arr: np.ndarray) -> None:
    t = next(t for t in m.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(arr, name))


def _to_constant(m: onnx.ModelProto, name: str) -> None:
    """Initializer ``name`` given by a Constant node instead (first in the graph)."""
    i = next(i for i, t in enumerate(m.graph.initializer) if t.name == name)
    t = onnx.TensorProto()
    t.CopyFrom(m.graph.initializer[i])
    del m.graph.initializer[i]
    m.graph.node.insert(0, helper.make_node("Constant", [], [name], value=t))


def _node(m: onnx.ModelProto, op: str):
    return next(n for n in m.graph.node if n.op_type == op)


# ------------------------------------------------------------------ 1: logits behind two Identity nodes
def test_logits_behind_two_identity_nodes_are_read_from_the_head(tmp_path):
    m = _toy_graph("matmul", np.random.default_rng(0))
    m.graph.node[-1].output[0] = "s1"                           # z -> Identity -> s1 -> Identity -> scores
    m.graph.node.append(helper.make_node("Identity", ["s1"], ["scores"]))
    path = _write(m, tmp_path / "m" / "m.onnx")
    a = _load_toy(path)
    assert a.spec.kind == "matmul" and a.spec.output_name == "scores" and a.spec.weight_name == "head.w"
    W, b = a.head_params()
    graph_w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "head.w"))
    assert torch.equal(W, torch.from_numpy(graph_w.T.copy())) and torch.equal(b, torch.zeros(TOY_C))
    x = _x()
    emb = a.embed_batch(torch.from_numpy(x), CPU)
    np.testing.assert_allclose((emb @ W.T + b).numpy(), _ort(path, x), atol=ATOL)


# ------------------------------------------------------------------ 2-5, 7-9: heads refused by name
def _transA(m):       # Gemm(Transpose(feat), W, transA=1): the same product, a layout repair does not read
    g = _node(m, "Gemm")
    i = list(m.graph.node).index(g)
    m.graph.node.insert(i, helper.make_node("Transpose", ["feat"], ["featT"], perm=[1, 0]))
    g.input[0] = "featT"
    g.attribute.append(helper.make_attribute("transA", 1))


def _add_after_gemm(m):   # Add(Gemm(feat, W, transB=1), bias): the Add does not follow a MatMul
    g = _node(m, "Gemm")
    g.output[0] = "g"
    i = list(m.graph.node).index(g)
    m.graph.node.insert(i + 1, helper.make_node("Add", ["g", "head.b"], ["z"]))
    m.graph.initializer.append(numpy_helper.from_array(np.arange(TOY_C, dtype=np.float32), "head.b"))


def _weight_3d(m):
    w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "head.w"))
    _replace_init(m, "head.w", w[None].copy())                  # (1, D, C): a batched MatMul


def _weight_int32(m):
    _replace_init(m, "head.w", np.arange(TOY_C * TOY_D, dtype=np.int32).reshape(TOY_C, TOY_D))


@pytest.mark.parametrize("kind,edit,msg", [
    ("gemm_nobias", _transA, "cannot use the final layer as the head: the Gemm has transA=1"),
    ("gemm_nobias", lambda m: _to_constant(m, "head.w"), "the Gemm weight 'head.w' is not an initializer"),
    ("gemm_transB0", lambda m: _to_constant(m, "head.b"), "the Gemm bias 'head.b' is not an initializer"),
    ("matmul_add", lambda m: _to_constant(m, "head.w"), r"the MatMul weight 'head.w' is not an initializer \(expected"),
    ("gemm_nobias", _add_after_gemm, "the final Add does not follow a MatMul"),
    ("matmul", _weight_3d, r"the head weight has shape \(1, 6, 4\), expected a matrix"),
    ("gemm_nobias", _weight_int32, "the head weight is int32, expected floating point"),
], ids=["transA", "gemm_weight_constant", "gemm_bias_constant", "matmul_weight_constant", "add_after_gemm",
        "weight_3d", "weight_int32"])
def test_a_head_repair_cannot_read_is_refused_by_name(tmp_path, kind, edit, msg):
    m = _toy_graph(kind, np.random.default_rng(0))
    edit(m)
    path = _write(m, tmp_path / "m" / "m.onnx")
    with pytest.raises(BadInput, match=msg) as e:
        _load_toy(path)
    assert e.value.path == str(path)


# ------------------------------------------------------------------ 6: a Gemm without transB (default 0)
def test_a_gemm_without_transb_reads_its_weight_as_features_by_classes(tmp_path):
    m = _toy_graph("gemm_transB0", np.random.default_rng(0))    # alpha 2, beta 0.5, weight (D, C), bias (1, C)
    g = _node(m, "Gemm")
    keep = [a for a in g.attribute if a.name != "transB"]
    del g.attribute[:]
    g.attribute.extend(keep)
    path = _write(m, tmp_path / "m" / "m.onnx")
    a = _load_toy(path)
    B = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "head.w"))
    bias = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "head.b"))
    W, b = a.head_params()
    assert W.shape == (TOY_C, TOY_D)
    torch.testing.assert_close(W, torch.from_numpy(2.0 * B.T), rtol=0, atol=1e-6)
    torch.testing.assert_close(b, torch.from_numpy(0.5 * bias.reshape(-1)), rtol=0, atol=1e-6)
    x = _x()
    emb = a.embed_batch(torch.from_numpy(x), CPU)
    np.testing.assert_allclose((emb @ W.T + b).numpy(), _ort(path, x), atol=ATOL)
    W2, b2 = W[[1, 0, 3, 2]] * 0.5, torch.arange(float(TOY_C))
    a.set_head(W2, b2)
    out = a.save(tmp_path / "out.onnx", {})
    written = onnx.load(str(out))
    assert list(next(t for t in written.graph.initializer if t.name == "head.w").dims) == [TOY_D, TOY_C]
    np.testing.assert_allclose(_ort(out, x), (emb @ W2.T + b2).numpy(), atol=ATOL)


# ------------------------------------------------------------------ 10: a scalar bias
@pytest.mark.parametrize("shape", [(), (1,)], ids=["scalar", "one"])
def test_a_scalar_bias_is_every_class_bias(tmp_path, shape):
    m = _toy_graph("matmul_add", np.random.default_rng(0))
    _replace_init(m, "head.b", np.full(shape, 0.75, dtype=np.float32))
    path = _write(m, tmp_path / "m" / "m.onnx")
    a = _load_toy(path)
    W, b = a.head_params()
    assert torch.equal(b, torch.full((TOY_C,), 0.75))
    x = _x()
    emb = a.embed_batch(torch.from_numpy(x), CPU)
    np.testing.assert_allclose((emb @ W.T + b).numpy(), _ort(path, x), atol=ATOL)
    b2 = torch.tensor([0.5, -1.0, 2.0, 0.0])
    a.set_head(W, b2)
    out = a.save(tmp_path / "out.onnx", {})
    np.testing.assert_allclose(_ort(out, x), (emb @ W.T + b2).numpy(), atol=ATOL)


# ------------------------------------------------------------------ 11: a bias added to a bias-less MatMul
def test_a_bias_added_to_a_matmul_head_is_written_in_graph_order(tmp_path):
    path = _write(_toy_graph("matmul", np.random.default_rng(0)), tmp_path / "m" / "m.onnx")
    a = _load_toy(path)
    W, b = a.head_params()
    b2 = torch.tensor([1.0, -0.5, 0.25, 0.0])
    a.set_head(W, b2)
    out = a.save(tmp_path / "out.onnx", {})
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)          # topologically sorted: the Add before the Identity
    assert [n.op_type for n in written.graph.node][-3:] == ["MatMul", "Add", "Identity"]
    x = _x()
    emb = a.embed_batch(torch.from_numpy(x), CPU)
    np.testing.assert_allclose(_ort(out, x), (emb @ W.T + b2).numpy(), atol=ATOL)


# ------------------------------------------------------------------ 12: the bias written in the file's shape
@pytest.mark.parametrize("kind", ["gemm_transB0", "matmul_add"])
def test_a_repaired_bias_keeps_the_files_shape(tmp_path, kind):
    m = _toy_graph(kind, np.random.default_rng(0))
    if kind == "matmul_add":                                    # a (1, C) bias, as gemm_transB0's
        _replace_init(m, "head.b", np.arange(TOY_C, dtype=np.float32)[None])
    path = _write(m, tmp_path / "m" / "m.onnx")
    a = _load_toy(path)
    W, b = a.head_params()
    a.set_head(W, b + torch.tensor([1.0, 2.0, 3.0, 4.0]))
    out = a.save(tmp_path / "out.onnx", {})
    written = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert list(written["head.b"].dims) == [1, TOY_C]
    x = _x()
    emb = a.embed_batch(torch.from_numpy(x), CPU)
    np.testing.assert_allclose(_ort(out, x), (emb @ W.T + b + torch.tensor([1.0, 2.0, 3.0, 4.0])).numpy(),
                               atol=ATOL)


# ------------------------------------------------------------------ 13: the opsets are in the cache key
def test_two_files_differing_only_in_opset_never_share_a_cache_key(tmp_path):
    nodes, inits = _body()
    hn, hi = _head()
    p12 = _save(tmp_path / "a" / "m.onnx", nodes + hn, inits + hi, opsets=[helper.make_opsetid("", 12)])
    p13 = _save(tmp_path / "b" / "m.onnx", nodes + hn, inits + hi, opsets=[helper.make_opsetid("", 13)])
    assert load_model(p12).body_hash() != load_model(p13).body_hash()
    assert _key(p12) != _key(p13)


# ------------------------------------------------------------------ 14: Dropout in training mode by a Constant
def test_a_dropout_whose_training_mode_is_a_constant_node_is_refused(tmp_path):
    nodes, inits = _body()
    hn, hi = _head()
    nodes[2:2] = [helper.make_node("Constant", [], ["train"], value=_init("tv", True, np.bool_)),
                  helper.make_node("Constant", [], ["ratio"], value=_init("rv", 0.5)),
                  helper.make_node("Dropout", ["pre", "ratio", "train"], ["pre_d"], name="drop")]
    nodes[5] = helper.make_node("Relu", ["pre_d"], ["emb"])
    path = _save(tmp_path / "m" / "m.onnx", nodes + hn, inits + hi)
    with pytest.raises(BadInput, match=r"the graph's Dropout node 'drop' runs in training mode") as e:
        load_model(path)
    assert e.value.path == str(path)


# ------------------------------------------------------------------ 15: an IR-3 file's initializer inputs
def test_an_ir3_files_initializers_listed_as_inputs_are_not_its_inputs(tmp_path):
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["emb", "head.w", "head.b"], ["logits"], transB=1)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])]
    path = _graph_file(tmp_path / "m" / "m.onnx", nodes, outputs,
                       [("head.w", rng.normal(0, 1, (3, 16))), ("head.b", rng.normal(0, 1, 3))],
                       ir=3, opset=8, inits_as_inputs=True)
    assert len(onnx.load(str(path)).graph.input) == 5
    a = load_model(path)
    assert a.input_names == ["input"] and a.modality == "image"
    x = _batch()
    emb = a.embed_batch(torch.from_numpy(x), CPU)
    W, b = a.head_params()
    np.testing.assert_allclose((emb @ W.T + b).numpy(), _ort(path, x, "input"), atol=ATOL)


# ------------------------------------------------------------------ 16: first outputs that can move the top class
@pytest.mark.parametrize("first,nodes,inits,op", [
    # the last of tied logits, not argmax's first
    ("label", [helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0, select_last_index=1)], [],
     "ArgMax"),
    # an integer cast ties the scores
    ("probs", [helper.make_node("Cast", ["logits"], ["probs"], to=TensorProto.INT64)], [], "Cast"),
    # a zero temperature ties every class
    ("probs", [helper.make_node("Mul", ["logits", "T"], ["probs"])], [("T", np.array([0.0]))], "Mul"),
    # T / logits turns the order over
    ("probs", [helper.make_node("Div", ["T", "logits"], ["probs"])], [("T", np.array([2.0]))], "Div"),
    # a per-class scale moves the top class
    ("probs", [helper.make_node("Mul", ["logits", "S"], ["probs"])], [("S", np.array([[3.0, 0.1, 1.0]]))], "Mul"),
], ids=["argmax_last_index", "cast_int64", "mul_zero", "div_by_logits", "mul_per_class"])
def test_a_first_output_step_that_can_move_the_top_class_is_refused(tmp_path, first, nodes, inits, op):
    path = _model(tmp_path / "m" / "m.onnx", first, nodes, inits)
    with pytest.raises(BadInput, match=f"the first output '{first}' is computed from the 'logits' output through "
                                       f"a {op} node that repair cannot tell keeps the top class"):
        load_model(path)


# ------------------------------------------------------------------ 17: half-precision initializers checked
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["float16", "bfloat16"])
def test_a_non_finite_half_precision_initializer_is_refused(tmp_path, dtype):
    nodes, inits = _body()
    hn, hi = _head()
    spare = helper.make_tensor("calib", dtype, [3], [1.0, float("nan"), 2.0])
    path = _save(tmp_path / "m" / "m.onnx", nodes + hn, inits + hi + [spare])
    with pytest.raises(BadInput, match=r"initializer 'calib' holds 1 non-finite value\(s\)") as e:
        load_model(path)
    assert e.value.path == str(path)


# ------------------------------------------------------------------ 18: embeddings that are no matrix
def test_a_head_on_a_3d_tensor_is_refused_when_embedding(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([0, 4, 4]), "sv")),
             helper.make_node("Reshape", ["emb", "shape"], ["e3"]),            # (n, 4, 4)
             helper.make_node("MatMul", ["e3", "head.w"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4, 3])]
    path = _graph_file(tmp_path / "m" / "m.onnx", nodes, outputs, [("head.w", rng.normal(0, 1, (4, 3)))])
    a = load_model(path)
    with pytest.raises(BadInput, match=r"the head's input is not a \(batch, features\) matrix \(got \(6, 4, 4\)\)"):
        a.embed_batch(torch.from_numpy(_batch()), CPU)


# ------------------------------------------------------------------ 19/20: a second set_head
def test_a_second_set_head_gives_its_own_logits_and_file(tmp_path):
    path = _write(_toy_graph("gemm_transB0", np.random.default_rng(0)), tmp_path / "m" / "m.onnx")
    a = _load_toy(path)
    x = _x()
    xt = torch.from_numpy(x)
    emb = a.embed_batch(xt, CPU)
    W, b = a.head_params()
    W1, b1 = W * 0.5, torch.tensor([1.0, 0.0, -1.0, 2.0])
    a.set_head(W1, b1)
    np.testing.assert_allclose(a.logits_batch(xt, CPU).numpy(), (emb @ W1.T + b1).numpy(), atol=ATOL)
    W2, b2 = W[[3, 2, 1, 0]], torch.tensor([-2.0, 0.5, 0.0, 1.0])
    a.set_head(W2, b2)
    want = (emb @ W2.T + b2).numpy()
    np.testing.assert_allclose(a.logits_batch(xt, CPU).numpy(), want, atol=ATOL)
    out = a.save(tmp_path / "out.onnx", {})
    np.testing.assert_allclose(_ort(out, x), want, atol=ATOL)


# ------------------------------------------------------------------ 21/22: set_tensors' refusals
def test_set_tensors_refuses_a_body_tensor(tmp_path):
    m = _toy_graph("gemm_transB0", np.random.default_rng(0))
    a = _load_toy(_write(m, tmp_path / "m" / "m.onnx"))
    same = torch.from_numpy(numpy_helper.to_array(m.graph.initializer[0]).copy())          # body.w, as it is
    with pytest.raises(BadInput, match=r"an ONNX model's tensors cannot be changed, only its head "
                                       r"\(head.w, head.b\); got 'body.w'"):
        a.set_tensors({"body.w": same})
    assert not a.head_changed


@pytest.mark.parametrize("name,shape,msg", [
    ("head.b", (TOY_C,), r"new head.b has shape \(4,\), expected \(1, 4\)"),
    ("head.w", (TOY_C, TOY_D), r"new head.w has shape \(4, 6\), expected \(6, 4\)"),
])
def test_set_tensors_refuses_a_tensor_of_another_shape(tmp_path, name, shape, msg):
    a = _load_toy(_write(_toy_graph("gemm_transB0", np.random.default_rng(0)), tmp_path / "m" / "m.onnx"))
    with pytest.raises(RepairError, match=msg):
        a.set_tensors({name: torch.ones(shape)})
    assert not a.head_changed
    a.set_tensors({"head.b": torch.ones((1, TOY_C))})              # the file's shape: taken (beta 0.5 applies)
    assert torch.equal(a.head_params()[1], torch.full((TOY_C,), 0.5))


# ------------------------------------------------------------------ 23: changed_tensors names a new bias
def test_changed_tensors_names_a_bias_added_to_a_bias_less_gemm(tmp_path):
    a = _load_toy(_write(_toy_graph("gemm_nobias", np.random.default_rng(0)), tmp_path / "m" / "m.onnx"))
    assert a.spec.bias_name is None
    W, b = a.head_params()
    a.set_head(W, b + torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert a.changed_tensors() == ["head.bias"]
    a.set_head(W * 2, b + torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert a.changed_tensors() == ["head.bias", "head.w"]


# ------------------------------------------------------------------ 24: external data that grew while read
def test_external_data_read_to_its_end_that_grew_while_the_model_loads_is_refused(tmp_path, monkeypatch):
    nodes, inits = _body()
    hn, hi = _head()
    src = _save(tmp_path / "src" / "m.onnx", nodes + hn, inits + hi)
    d = tmp_path / "ext"
    d.mkdir()
    (d / "preprocess.json").write_text((src.parent / "preprocess.json").read_text())
    onnx.save_model(onnx.load(str(src)), str(d / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    path, w = d / "m.onnx", d / "w.bin"
    proto = onnx.load(str(path), load_external_data=False)
    ext = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    last = max(ext, key=lambda t: int({e.key: e.value for e in t.external_data}.get("offset", 0)))
    keep = [e for e in last.external_data if e.key != "length"]      # read from its offset to the file's end
    del last.external_data[:]
    for e in keep:
        last.external_data.add().CopyFrom(e)
    onnx.save(proto, str(path))
    a = load_model(path)                                             # as it is: read
    assert a.external_files == [w]
    real = onnx.load_external_data_for_model

    def then_grown(p, base):
        real(p, base)
        with open(w, "ab") as f:          # a writer appending right after onnx read the file
            f.write(b"\0" * 16)

    monkeypatch.setattr(onnx, "load_external_data_for_model", then_grown)
    with pytest.raises(BadInput, match="the model's external data file changed while it was read") as e:
        load_model(path)
    assert e.value.path == str(w)


# ------------------------------------------------------------------ 25: a file's label_names rewritten
def test_a_files_label_names_are_written_as_the_class_names_read(tmp_path):
    nodes, inits = _body()
    hn, hi = _head()
    path = _save(tmp_path / "m" / "m.onnx", nodes + hn, inits + hi,
                 metadata={"label_names": json.dumps(["0", "1", "2"])})
    m = onnx.load(str(path))
    keep = [p for p in m.metadata_props if p.key != "class_names"]
    del m.metadata_props[:]
    for p in keep:
        m.metadata_props.add().CopyFrom(p)
    onnx.save(m, str(path))
    a = load_model(path, LoadOptions(class_names=("dog", "cat", "fox")))
    assert a.class_names == ["dog", "cat", "fox"]
    meta = {p.key: p.value for p in a.export_proto({}).metadata_props}
    assert json.loads(meta["label_names"]) == json.loads(meta["class_names"]) == ["dog", "cat", "fox"]


# ------------------------------------------------------------------ 26-31: onnxruntime providers, options, feeds
def test_cuda_provider_options_keep_tf32_off_and_name_the_device(monkeypatch):
    from repair.adapters.onnx_runtime import onnxruntime

    monkeypatch.setattr(onnxruntime(), "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_providers(device="cuda:1") == [("CUDAExecutionProvider", {"use_tf32": "0", "device_id": "1"}),
                                              "CPUExecutionProvider"]
    assert ort_providers() == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert ort_providers(prefer_cuda=False) == ["CPUExecutionProvider"]


def test_a_session_made_without_optimisation_has_them_off():
    m = _toy_graph("matmul", np.random.default_rng(0))
    off = make_session(m, prefer_cuda=False, optimize=False)
    on = make_session(m, prefer_cuda=False)
    assert off.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert on.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def _stub_session(*inputs):
    ins = [SimpleNamespace(name=n, type=t, shape=s) for n, t, s in inputs]
    return SimpleNamespace(get_inputs=lambda: ins)


def test_a_missing_token_type_ids_is_fed_zeros():
    sess = _stub_session(("input_ids", "tensor(int64)", ["n", "s"]), ("attention_mask", "tensor(int64)", ["n", "s"]),
                         ("token_type_ids", "tensor(int64)", ["n", "s"]))
    ids = torch.tensor([[101, 7, 102], [101, 102, 0]])
    feeds = session_feeds(sess, {"input_ids": ids, "attention_mask": (ids != 0).long()})
    assert feeds["token_type_ids"].dtype == np.int64
    assert np.array_equal(feeds["token_type_ids"], np.zeros((2, 3), dtype=np.int64))
    assert np.array_equal(feeds["input_ids"], ids.numpy())


def _io_graph(in_type, in_shape):
    g = helper.make_graph([helper.make_node("Cast", ["inp"], ["out"], to=TensorProto.FLOAT)], "g",
                          [helper.make_tensor_value_info("inp", in_type, in_shape)],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, in_shape)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("case", ["int32_ids", "float16_pixels"])
def test_a_batch_is_cast_to_the_graphs_input_type(case):
    if case == "int32_ids":       # a text graph taking int32 token ids, given the tokenizer's int64
        m = _io_graph(TensorProto.INT32, ["n", "s"])
        m.graph.input[0].name = m.graph.node[0].input[0] = "input_ids"
        batch = {"input_ids": torch.tensor([[101, 7, 102], [101, 9, 102]])}
        want = batch["input_ids"].numpy().astype(np.float32)
    else:                         # an image graph taking float16 pixels, given float32
        m = _io_graph(TensorProto.FLOAT16, ["n", 3])
        batch = torch.tensor([[0.1, 0.2, 0.3], [1.0, -2.5, 3.14159]])
        want = batch.numpy().astype(np.float16).astype(np.float32)
    (out,) = run_batch(make_session(m, prefer_cuda=False), batch, ["out"])
    assert np.array_equal(out, want)


@pytest.mark.parametrize("inputs,unpadded", [
    ([("input_ids", ["n", "s"]), ("attention_mask", ["n", "s"])], False),
    ([("input_ids", ["n", "s"])], True),
    ([("input_ids", ["n", 16])], False),
    ([("pixel_values", ["n", 3, 8, 8])], False),
])
def test_fed_unpadded_only_without_a_mask_and_with_a_dynamic_sequence(inputs, unpadded):
    assert fed_unpadded(inputs) is unpadded


def test_an_image_batch_for_a_two_input_graph_is_refused_by_name():
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["out"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 3])])
    sess = make_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                        prefer_cuda=False)
    with pytest.raises(BadInput, match=r"the ONNX model takes 2 inputs \(a, b\); an image model must take one"):
        session_feeds(sess, np.ones((2, 3), dtype=np.float32))
