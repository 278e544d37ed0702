"""ONNX graph surgery for the ``onnx`` family: find the classification layer (the head),
read it as an ``nn.Linear``-style ``(W, b)``, write a new one back in the graph's own
layout, hash everything but the head, and read / merge ``metadata_props``.

The head is the ``Gemm`` (any ``transB``, ``alpha``, ``beta``; bias optional) or
``MatMul`` (weight laid out ``(D, C)``) + optional ``Add`` whose output is the logits
graph output (possibly through ``Identity`` nodes); its weight and bias must be
initializers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import BadInput

MAX_PROTO_BYTES = 2**31 - 1


def metadata_dict(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Merge ``metadata`` into ``metadata_props`` (new values win; a new provenance replaces the
    old one's keys: :func:`repair.provenance.merged`), in sorted key order (the same metadata gives
    the same bytes)."""
    from .. import provenance

    merged = provenance.merged(metadata_dict(proto), metadata)
    del proto.metadata_props[:]
    for k, v in sorted(merged.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def _attr(node, name: str, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_attr(node, name: str, value) -> None:
    import onnx

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


@dataclass
class HeadSpec:
    """Where the classification layer sits in the graph."""
    kind: str                      # "gemm" | "matmul"
    node: int                      # index of the Gemm / MatMul node
    add_node: Optional[int]        # index of the Add node (matmul kind), if any
    input_name: str                # the embedding tensor
    weight_name: str
    bias_name: Optional[str]
    trans_b: int
    alpha: float
    beta: float
    output_name: str               # the logits graph output
    weight_dtype: np.dtype

    def initializer_names(self) -> list[str]:
        return [n for n in (self.weight_name, self.bias_name) if n]


#: what may lie between the logits and a first output that is not them: (state, operator) -> the next
#: state. "scores" (one per class, on the class axis) keep the top class through these; an ArgMax on the
#: class axis makes a "label" (a class index), which may be cast, squeezed or looked up in a table of names
FIRST_OUTPUT_STEPS = {("scores", "Identity"): "scores", ("scores", "Sigmoid"): "scores",
                      ("scores", "Softmax"): "scores", ("scores", "LogSoftmax"): "scores",
                      ("scores", "Cast"): "scores", ("scores", "Mul"): "scores", ("scores", "Div"): "scores",
                      ("scores", "ArgMax"): "label", ("label", "Identity"): "label", ("label", "Cast"): "label",
                      ("label", "Squeeze"): "label", ("label", "Unsqueeze"): "label", ("label", "Gather"): "label"}


def _subgraph_reads(node) -> set:
    """The tensors the subgraphs of ``node`` (If branches, Loop and Scan bodies) read by name, the outer
    graph's among them."""
    import onnx

    subs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    subs += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    return {i for g in subs for n in _graph_nodes(g) for i in n.input if i}


def _constants(graph) -> dict:
    """Initializers and Constant nodes' tensors (TensorProto, read as arrays only where a step needs one:
    a large model's weights are not copied), by tensor name."""
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _step_keeps_top_class(node, state: str, chain_input: str, consts: dict) -> bool:
    """Whether ``node`` (reading the chain's tensor ``chain_input``; its other inputs constants) keeps
    the top class of ``state`` ("scores" or "label") -- see :data:`FIRST_OUTPUT_STEPS`."""
    from onnx import TensorProto, numpy_helper

    op, ins = node.op_type, [x for x in node.input if x]
    others = [x for x in ins if x != chain_input]
    if op in ("Softmax", "LogSoftmax"):       # opset < 13: default axis 1; from 13: -1 -- the class axis of (N, C)
        return _attr(node, "axis", -1) in (-1, 1)
    if op == "ArgMax":                        # its default axis is 0, the batch: only the class axis named
        return _attr(node, "axis", 0) in (-1, 1) and not _attr(node, "select_last_index", 0)
    if op == "Cast" and state == "scores":    # to a floating type only (an integer cast ties the scores)
        return _attr(node, "to", 0) in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                                         TensorProto.BFLOAT16)
    if op in ("Mul", "Div"):                  # a temperature: a positive scalar constant (x / T, x * s)
        if len(others) != 1 or others[0] not in consts or (op == "Div" and ins[0] != chain_input):
            return False
        v = np.asarray(numpy_helper.to_array(consts[others[0]]))
        return v.size == 1 and np.issubdtype(v.dtype, np.number) and float(v.reshape(-1)[0]) > 0
    if op == "Gather":                        # a table of class names looked up by the label
        return len(ins) == 2 and ins[1] == chain_input and ins[0] in consts and len(consts[ins[0]].dims) == 1
    return all(x in consts for x in others)   # Identity, Sigmoid, Cast of a label, Squeeze/Unsqueeze (axes)


def _check_first_output(graph, first: str, logits: str, producer: dict, where: Optional[Path],
                        head_parts: frozenset = frozenset()) -> None:
    """The file's first output (what a deployment reads first) when repair measures and repairs the
    output named ``logits`` instead: it must not depend on those logits, or be computed from them only
    by steps that keep their top class (:data:`FIRST_OUTPUT_STEPS`: probabilities, a temperature, a
    label, its name); else its predictions need not be the measured ones (a class prior added) and the
    file is refused naming the step. The logits are also every tensor they copy through Identity nodes
    (the head writes ``z``, ``logits = Identity(z)``): a first output computed from ``z`` is computed
    from the logits. ``head_parts``: the head's other tensors (its weight and bias initializers, a MatMul's
    output before the bias is added): a first output reading one of them other than through the logits
    would not follow the repaired head as the logits do, and the file is refused naming it."""
    nodes = graph.node
    same = {logits}                  # the logits and the tensors they are an Identity of
    i = producer.get(logits)
    while i is not None and nodes[i].op_type == "Identity" and nodes[i].input and nodes[i].input[0] not in same:
        same.add(nodes[i].input[0])
        i = producer.get(nodes[i].input[0])

    def reached(t: str, targets, passing=frozenset()) -> Optional[str]:
        """The first of ``targets`` that ``t`` is computed from, through any node (a subgraph's reads
        included) but not through the tensors ``passing``; None when none is."""
        stack, seen = [t], set()
        while stack:
            x = stack.pop()
            if x in targets:
                return x
            if x in passing:
                continue
            i = producer.get(x)
            if i is None or i in seen:
                continue
            seen.add(i)
            stack.extend([y for y in nodes[i].input if y] + sorted(_subgraph_reads(nodes[i])))
        return None

    part = reached(first, head_parts - same, passing=same)     # a head tensor read apart from the logits
    if part is not None:
        raise BadInput(f"the first output {first!r} reads the head's tensor {part!r} other than through the "
                       f"{logits!r} output: a repaired head would change the logits repair measures and not "
                       f"the first output a deployment reads alike (export the logits as the first output, or "
                       f"leave out the output named {logits!r})", where)

    def depends(t: str) -> bool:     # on the logits
        return reached(t, same) is not None

    if not depends(first):           # an embedding output: not a prediction
        return
    consts = _constants(graph)
    steps, t = [], first             # the chain, from the first output back to the logits
    while t not in same:
        i = producer.get(t)
        node = None if i is None else nodes[i]
        chain = [] if node is None or _subgraph_reads(node) else [x for x in node.input if x and depends(x)]
        if node is None or len(chain) != 1:
            what = "an input" if node is None else f"a {node.op_type} node"
            raise BadInput(_first_output_problem(first, logits, what), where)
        steps.append((node, chain[0]))
        t = chain[0]
    state = "scores"
    for node, chain_input in reversed(steps):
        nxt = FIRST_OUTPUT_STEPS.get((state, node.op_type))
        if nxt is None or not _step_keeps_top_class(node, state, chain_input, consts):
            raise BadInput(_first_output_problem(first, logits, f"a {node.op_type} node"), where)
        state = nxt


def _first_output_problem(first: str, logits: str, what: str) -> str:
    return (f"the first output {first!r} is computed from the {logits!r} output through {what} that repair cannot "
            f"tell keeps the top class: a deployment reading the first output could get other predictions than "
            f"the {logits!r} output repair would measure and repair (export the logits as the first output, or "
            f"leave out the output named {logits!r})")


def find_head(proto, where: Optional[Path] = None) -> HeadSpec:
    graph = proto.graph
    outputs = [o.name for o in graph.output]
    if not outputs:
        raise BadInput("the ONNX graph has no outputs", where)
    out = "logits" if "logits" in outputs else outputs[0]
    producer = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            producer[o] = i
    inits = {t.name for t in graph.initializer}

    def expect(cond: bool, problem: str) -> None:
        if not cond:
            raise BadInput(f"cannot use the final layer as the head: {problem}", where)

    name = out
    idx = producer.get(name)
    while idx is not None and graph.node[idx].op_type == "Identity":
        name = graph.node[idx].input[0]
        idx = producer.get(name)
    expect(idx is not None, f"the output {out!r} is not produced by a node")
    node = graph.node[idx]
    if node.op_type == "Gemm":
        expect(_attr(node, "transA", 0) == 0, "the Gemm has transA=1")
        expect(node.input[1] in inits, f"the Gemm weight {node.input[1]!r} is not an initializer")
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        expect(bias is None or bias in inits, f"the Gemm bias {bias!r} is not an initializer")
        spec = HeadSpec("gemm", idx, None, node.input[0], node.input[1], bias, int(_attr(node, "transB", 0)),
                        float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0)), out, np.float32)
    elif node.op_type in ("Add", "MatMul"):
        add_idx, bias = None, None
        if node.op_type == "Add":
            add_idx = idx
            a, b = node.input[0], node.input[1]
            if b in inits and a not in inits:
                mm_out, bias = a, b
            elif a in inits and b not in inits:
                mm_out, bias = b, a
            else:
                expect(False, "the final Add does not add an initializer (the bias)")
            idx = producer.get(mm_out)
            expect(idx is not None and graph.node[idx].op_type == "MatMul",
                   "the final Add does not follow a MatMul")
            node = graph.node[idx]
        expect(node.input[1] in inits, f"the MatMul weight {node.input[1]!r} is not an initializer "
                                       "(expected input @ W with W of shape (features, classes))")
        spec = HeadSpec("matmul", idx, add_idx, node.input[0], node.input[1], bias, 0, 1.0, 1.0, out,
                        np.float32)
    else:
        raise BadInput(f"cannot find the classification layer: the output {out!r} comes from a "
                       f"{node.op_type} node; expected Gemm, or MatMul (+ Add) with initializer weights",
                       where)
    w = init_array(proto, spec.weight_name)
    expect(w.ndim == 2, f"the head weight has shape {tuple(w.shape)}, expected a matrix")
    expect(np.issubdtype(w.dtype, np.floating), f"the head weight is {w.dtype}, expected floating point")
    spec.weight_dtype = w.dtype
    if out != outputs[0]:
        parts = set(spec.initializer_names())
        parts.update(o for k in (spec.node, spec.add_node) if k is not None for o in graph.node[k].output if o)
        _check_first_output(graph, outputs[0], out, producer, where, frozenset(parts))
    return spec


def _init_index(proto, name: str) -> int:
    for i, t in enumerate(proto.graph.initializer):
        if t.name == name:
            return i
    raise KeyError(name)


def init_array(proto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(proto.graph.initializer[_init_index(proto, name)])


def linear_weight(spec: HeadSpec, B: np.ndarray) -> torch.Tensor:
    """The head weight initializer ``B`` (graph layout) as the nn.Linear ``W`` (C, D)."""
    B = np.asarray(B, dtype=np.float64)
    W = spec.alpha * (B if spec.trans_b else B.T) if spec.kind == "gemm" else B.T
    return torch.from_numpy(np.ascontiguousarray(W)).float()


def linear_bias(spec: HeadSpec, bias: Optional[np.ndarray], C: int) -> torch.Tensor:
    """The head bias initializer (``(C,)``, ``(1, C)`` or a scalar; None: no bias) as ``b`` (C,)."""
    if bias is None:
        return torch.zeros(C)
    bias = np.asarray(bias, dtype=np.float64)
    if bias.size not in (1, C):
        raise BadInput(f"the head bias has shape {tuple(bias.shape)}, expected ({C},)")
    b = np.broadcast_to(bias.reshape(-1), (C,)) * (spec.beta if spec.kind == "gemm" else 1.0)
    return torch.from_numpy(np.ascontiguousarray(b)).float()


def head_from_graph(proto, spec: HeadSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, D), b (C,)) in the nn.Linear convention."""
    W = linear_weight(spec, init_array(proto, spec.weight_name))
    bias = init_array(proto, spec.bias_name) if spec.bias_name else None
    return W, linear_bias(spec, bias, W.shape[0])


def _graph_nodes(graph):
    """Every node of ``graph`` and of the subgraphs its nodes hold (``If`` branches, ``Loop`` and
    ``Scan`` bodies), which read the outer graph's tensors by name."""
    import onnx

    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graph_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graph_nodes(g)


def _uses(proto, name: str) -> int:
    """How many times the graph reads tensor ``name``: node inputs at any depth (a subgraph's too) and
    the graph's outputs."""
    return (sum(1 for n in _graph_nodes(proto.graph) for i in n.input if i == name)
            + sum(1 for o in proto.graph.output if o.name == name))


def training_mode_node(proto) -> Optional[str]:
    """A node that runs in training mode -- a ``Dropout`` whose ``training_mode`` input is a true
    constant or initializer, a ``BatchNormalization`` with ``training_mode=1`` --, named with its op,
    or None. Such a graph gives other outputs on every run: no figure of it repeats."""
    from onnx import numpy_helper

    consts = {t.name: t for t in proto.graph.initializer}
    for n in _graph_nodes(proto.graph):
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    for n in _graph_nodes(proto.graph):
        label = f"{n.op_type} node {n.name or n.output[0]!r}"
        if n.op_type == "Dropout" and len(n.input) > 2 and n.input[2] in consts:
            if bool(np.asarray(numpy_helper.to_array(consts[n.input[2]])).reshape(-1)[:1].any()):
                return label
        if n.op_type == "BatchNormalization" and _attr(n, "training_mode", 0):
            return label
    return None


def _unique_name(proto, base: str) -> str:
    taken = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output}
    taken |= {i.name for i in proto.graph.input}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _add_initializer(proto, tensor) -> None:
    """Append initializer ``tensor`` to ``proto``'s graph; below IR version 4 every initializer must also
    be a graph input (onnx.checker refuses the file otherwise), so one is added for it there."""
    import onnx

    proto.graph.initializer.append(tensor)
    if proto.ir_version < 4:
        proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))


def _put_initializer(proto, node, slot: int, old_name: Optional[str], arr: np.ndarray, base: str) -> None:
    """Write ``arr`` as the initializer feeding ``node.input[slot]``: in place when only this
    node uses it, else under a new name (other nodes keep the old tensor)."""
    from onnx import numpy_helper

    if old_name and _uses(proto, old_name) == 1:
        proto.graph.initializer[_init_index(proto, old_name)].CopyFrom(numpy_helper.from_array(arr, old_name))
        return
    name = _unique_name(proto, base)
    _add_initializer(proto, numpy_helper.from_array(arr, name))
    while len(node.input) <= slot:
        node.input.append("")
    node.input[slot] = name


def apply_head(proto, spec: HeadSpec, W: torch.Tensor, b: torch.Tensor) -> None:
    """Write a new (W, b) into ``proto`` in place, keeping the graph's weight layout."""
    import onnx

    dt = spec.weight_dtype
    Wn = W.detach().cpu().double().numpy()
    bn = b.detach().cpu().double().numpy()
    graph = proto.graph
    node = graph.node[spec.node]
    base = spec.weight_name.rsplit(".", 1)[0] if "." in spec.weight_name else spec.weight_name
    if spec.kind == "gemm":
        _set_attr(node, "alpha", 1.0)
        _set_attr(node, "beta", 1.0)
        _put_initializer(proto, node, 1, spec.weight_name,
                         np.ascontiguousarray((Wn if spec.trans_b else Wn.T).astype(dt)), f"{base}.weight")
        if spec.bias_name:
            old = init_array(proto, spec.bias_name)
            shape = old.shape if old.size == bn.size else bn.shape
            _put_initializer(proto, node, 2, spec.bias_name, bn.reshape(shape).astype(old.dtype), f"{base}.bias")
        elif np.any(bn != 0):
            _put_initializer(proto, node, 2, None, bn.astype(dt), f"{base}.bias")
        return
    _put_initializer(proto, node, 1, spec.weight_name, np.ascontiguousarray(Wn.T.astype(dt)), f"{base}.weight")
    if spec.add_node is not None:
        add = graph.node[spec.add_node]
        slot = list(add.input).index(spec.bias_name)
        old = init_array(proto, spec.bias_name)
        shape = old.shape if old.size == bn.size else bn.shape
        _put_initializer(proto, add, slot, spec.bias_name, bn.reshape(shape).astype(old.dtype), f"{base}.bias")
    elif np.any(bn != 0):
        # MatMul without bias: add one (MatMul -> new tensor -> Add -> the old output name)
        old_out = node.output[0]
        mid = _unique_name(proto, f"{old_out}_matmul")
        node.output[0] = mid
        bname = _unique_name(proto, f"{base}.bias")
        from onnx import numpy_helper

        _add_initializer(proto, numpy_helper.from_array(bn.astype(dt), bname))
        graph.node.insert(spec.node + 1, onnx.helper.make_node("Add", [mid, bname], [old_out],
                                                               name=_unique_name(proto, "repair_head_bias")))


def graph_structure_hash(proto, skip_inits: Sequence[str], head: Optional[HeadSpec]) -> str:
    """sha256 of everything that shapes the embeddings: every initializer (dense and sparse) but the
    head's -- a head tensor that anything else reads too, a subgraph's node included, counts, as the
    body reads it --, the graph structure (nodes with their subgraphs, inputs, outputs), the model's
    local functions and the opsets; the head node counts by op type and input only."""
    import onnx
    from onnx import numpy_helper

    h = hashlib.sha256()
    skip = {n for n in skip_inits if _uses(proto, n) == 1}
    for t in sorted(proto.graph.initializer, key=lambda t: t.name):
        if t.name in skip:
            continue
        h.update(t.name.encode())
        h.update(str(t.data_type).encode())
        h.update(str(tuple(t.dims)).encode())
        if t.HasField("raw_data") and t.raw_data:
            h.update(t.raw_data)
        else:
            h.update(numpy_helper.to_array(t).tobytes())
    g = onnx.GraphProto()
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    if head is not None:
        node = g.node[head.node]
        del node.attribute[:]
        del node.input[1:]
        if head.add_node is not None:   # MatMul + Add: hashed as the MatMul alone, writing the Add's output
            # (a bias-less MatMul head gets an Add when repaired: the same body, the same key)
            node.output[0] = g.node[head.add_node].output[0]
            del g.node[head.add_node]
    h.update(g.SerializeToString(deterministic=True))
    for sp in sorted(proto.graph.sparse_initializer, key=lambda t: t.values.name):
        h.update(b"sparse\0" + sp.SerializeToString(deterministic=True))
    for f in sorted(proto.functions, key=lambda f: (f.domain, f.name)):
        h.update(b"function\0" + f.SerializeToString(deterministic=True))
    for op in sorted((o.domain, o.version) for o in proto.opset_import):
        h.update(f"{op[0]}:{op[1]}".encode())
    return h.hexdigest()


def _dim(d) -> Union[int, str, None]:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param"):
        return d.dim_param
    return None


def graph_inputs(proto) -> list[tuple[str, list]]:
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for i in proto.graph.input:
        if i.name in inits:
            continue
        shape = [_dim(d) for d in i.type.tensor_type.shape.dim] if i.type.tensor_type.HasField("shape") else []
        out.append((i.name, shape))
    return out
