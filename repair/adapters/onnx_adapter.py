"""Deployed ONNX classifiers, repaired without any torch model.

The head is the graph's final classification layer: the ``Gemm`` (any
``transB``, ``alpha``, ``beta``; bias optional) or ``MatMul`` (weight laid out
``(D, C)``) + optional ``Add`` whose output is the logits graph output
(possibly through ``Identity`` nodes). Its weight and bias must be
initializers. Embeddings are the head's input, read by running the graph with
that tensor added as an extra output. A repaired head is written back into the
same graph: only the head's initializers (and ``alpha``/``beta``, normalised
to 1) change; inputs, outputs and every other initializer stay as they are.

Preprocessing: images need ``--image-size/--mean/--std`` or a
``preprocess.json`` next to the model (or the ``preprocess`` metadata entry
``repair export`` writes); text models need the tokenizer files in the model's
folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import BadInput, RepairError
from .base import Adapter
from .images import PREPROCESS_FILE, ImageCollate, image_config_from_options, resolve_image_config

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")
MAX_PROTO_BYTES = 2**31 - 1
DEFAULT_MAX_LENGTH = 512

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


# ------------------------------------------------------------------ onnxruntime helpers
def ort_providers(prefer_cuda: bool = True, device: Optional[Union[str, torch.device]] = None) -> list:
    """CPUExecutionProvider, with CUDAExecutionProvider first when onnxruntime has it.
    TF32 is switched off so that GPU results stay comparable to float32 references."""
    import onnxruntime as ort

    providers: list = []
    if prefer_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        opts: dict = {"use_tf32": "0"}
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and dev.index is not None:
            opts["device_id"] = str(dev.index)
        providers.append(("CUDAExecutionProvider", opts))
    providers.append("CPUExecutionProvider")
    return providers


def make_session(model: Union[str, Path, bytes, "onnx.ModelProto"], *, prefer_cuda: bool = True,  # noqa: F821
                 device=None, where: Optional[Path] = None):
    """An onnxruntime session from a path, serialized bytes or a ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    providers = ort_providers(prefer_cuda, device)
    try:
        try:
            return ort.InferenceSession(model, sess_options=so, providers=providers)
        except Exception:
            if len(providers) == 1:
                raise
            # a CUDA provider that cannot start (driver, options): CPU still gives an answer
            return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"onnxruntime cannot load this model ({msg})", where) from None


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def session_feeds(session, batch: Any, where: Optional[Path] = None) -> dict[str, np.ndarray]:
    """Map a collated batch (one tensor for images, a dict of tensors for text) onto the
    session's inputs by name, cast to the input dtypes. A text model's missing
    ``token_type_ids`` is fed zeros."""
    inputs = session.get_inputs()
    feeds: dict[str, np.ndarray] = {}
    if isinstance(batch, dict):
        for inp in inputs:
            if inp.name in batch:
                arr = _to_numpy(batch[inp.name])
            elif inp.name == "token_type_ids" and "input_ids" in batch:
                arr = np.zeros_like(_to_numpy(batch["input_ids"]))
            else:
                raise BadInput(f"the ONNX model needs input {inp.name!r}, which the preprocessing does "
                               f"not produce (it gives {', '.join(batch)})", where)
            feeds[inp.name] = arr
    else:
        if len(inputs) != 1:
            raise BadInput(f"the ONNX model takes {len(inputs)} inputs "
                           f"({', '.join(i.name for i in inputs)}); an image model must take one", where)
        feeds[inputs[0].name] = _to_numpy(batch)
    for inp in inputs:
        dt = _ORT_TYPES.get(inp.type)
        if dt is not None and feeds[inp.name].dtype != dt:
            feeds[inp.name] = feeds[inp.name].astype(dt)
    return feeds


def run_session(session, feeds: dict[str, np.ndarray], output_names: Optional[Sequence[str]] = None) -> list:
    """Run, splitting the batch when the graph has a fixed batch size smaller than it."""
    n = next(iter(feeds.values())).shape[0]
    fixed = None
    for inp in session.get_inputs():
        if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0:
            fixed = inp.shape[0]
    names = list(output_names) if output_names is not None else None
    if fixed is None or fixed == n:
        return session.run(names, feeds)
    if n % fixed:
        raise BadInput(f"the ONNX model has a fixed batch size of {fixed}; a batch of {n} cannot be split")
    parts = [session.run(names, {k: v[i:i + fixed] for k, v in feeds.items()}) for i in range(0, n, fixed)]
    return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(parts[0]))]


# ------------------------------------------------------------------ graph helpers
def metadata_dict(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Merge ``metadata`` into ``metadata_props`` (new values win)."""
    merged = metadata_dict(proto)
    merged.update({str(k): str(v) for k, v in metadata.items()})
    del proto.metadata_props[:]
    for k, v in merged.items():
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
    w = _init_array(proto, spec.weight_name)
    expect(w.ndim == 2, f"the head weight has shape {tuple(w.shape)}, expected a matrix")
    expect(np.issubdtype(w.dtype, np.floating), f"the head weight is {w.dtype}, expected floating point")
    spec.weight_dtype = w.dtype
    return spec


def _init_index(proto, name: str) -> int:
    for i, t in enumerate(proto.graph.initializer):
        if t.name == name:
            return i
    raise KeyError(name)


def _init_array(proto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(proto.graph.initializer[_init_index(proto, name)])


def head_from_graph(proto, spec: HeadSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, D), b (C,)) in the nn.Linear convention."""
    B = _init_array(proto, spec.weight_name).astype(np.float64)
    if spec.kind == "gemm":
        W = spec.alpha * (B if spec.trans_b else B.T)
    else:
        W = B.T
    C = W.shape[0]
    if spec.bias_name:
        bias = _init_array(proto, spec.bias_name).astype(np.float64)
        if bias.size not in (1, C):
            raise BadInput(f"the head bias has shape {tuple(bias.shape)}, expected ({C},)")
        b = np.broadcast_to(bias.reshape(-1), (C,)) * (spec.beta if spec.kind == "gemm" else 1.0)
    else:
        b = np.zeros(C)
    return (torch.from_numpy(np.ascontiguousarray(W)).float(),
            torch.from_numpy(np.ascontiguousarray(b)).float())


def _uses(proto, name: str) -> int:
    return sum(1 for n in proto.graph.node for i in n.input if i == name)


def _unique_name(proto, base: str) -> str:
    taken = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output}
    taken |= {i.name for i in proto.graph.input}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _put_initializer(proto, node, slot: int, old_name: Optional[str], arr: np.ndarray, base: str) -> None:
    """Write ``arr`` as the initializer feeding ``node.input[slot]``: in place when only this
    node uses it, else under a new name (other nodes keep the old tensor)."""
    from onnx import numpy_helper

    if old_name and _uses(proto, old_name) == 1:
        proto.graph.initializer[_init_index(proto, old_name)].CopyFrom(numpy_helper.from_array(arr, old_name))
        return
    name = _unique_name(proto, base)
    proto.graph.initializer.append(numpy_helper.from_array(arr, name))
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
            old = _init_array(proto, spec.bias_name)
            shape = old.shape if old.size == bn.size else bn.shape
            _put_initializer(proto, node, 2, spec.bias_name, bn.reshape(shape).astype(old.dtype), f"{base}.bias")
        elif np.any(bn != 0):
            _put_initializer(proto, node, 2, None, bn.astype(dt), f"{base}.bias")
        return
    _put_initializer(proto, node, 1, spec.weight_name, np.ascontiguousarray(Wn.T.astype(dt)), f"{base}.weight")
    if spec.add_node is not None:
        add = graph.node[spec.add_node]
        slot = list(add.input).index(spec.bias_name)
        old = _init_array(proto, spec.bias_name)
        shape = old.shape if old.size == bn.size else bn.shape
        _put_initializer(proto, add, slot, spec.bias_name, bn.reshape(shape).astype(old.dtype), f"{base}.bias")
    elif np.any(bn != 0):
        # MatMul without bias: add one (MatMul -> new tensor -> Add -> the old output name)
        old_out = node.output[0]
        mid = _unique_name(proto, f"{old_out}_matmul")
        node.output[0] = mid
        bname = _unique_name(proto, f"{base}.bias")
        from onnx import numpy_helper

        graph.initializer.append(numpy_helper.from_array(bn.astype(dt), bname))
        graph.node.insert(spec.node + 1, onnx.helper.make_node("Add", [mid, bname], [old_out],
                                                               name=_unique_name(proto, "repair_head_bias")))


def graph_structure_hash(proto, skip_inits: Sequence[str], head: Optional[HeadSpec]) -> str:
    """sha256 of every initializer but the head's and of the graph structure (nodes,
    inputs, outputs, opsets); the head node counts by op type and input only."""
    import onnx
    from onnx import numpy_helper

    h = hashlib.sha256()
    skip = set(skip_inits)
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
        if head.add_node is not None:
            add = g.node[head.add_node]
            keep = [i for i in add.input if i != head.bias_name]
            del add.input[:]
            add.input.extend(keep)
    h.update(g.SerializeToString(deterministic=True))
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


# ------------------------------------------------------------------ the adapter
class OnnxAdapter(Adapter):
    family = "onnx"
    #: ``repair.export.export_onnx`` saves the edited graph instead of re-exporting a torch model
    exports_onnx_natively = True

    def __init__(self, path: Path, *, image_config: Optional[dict] = None, class_names=None,
                 max_length: Optional[int] = None):
        import onnx

        path = Path(path)
        self.source = path
        self.weights_path = path
        self.model = None
        self.head = None
        try:
            proto = onnx.load(str(path))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BadInput(f"not a readable ONNX model ({msg})", path) from None
        if proto.ByteSize() > MAX_PROTO_BYTES:
            raise BadInput("ONNX models over 2 GB are not supported", path)
        self.proto = proto
        self.spec = find_head(proto, path)
        self._W0, self._b0 = head_from_graph(proto, self.spec)
        self._W, self._b = self._W0.clone(), self._b0.clone()
        self._meta = metadata_dict(proto)
        self._inputs = graph_inputs(proto)
        self._body_hash = graph_structure_hash(proto, self.spec.initializer_names(), self.spec)
        self._sessions: dict = {}
        self._modified = None
        C = int(self._W0.shape[0])
        self.modality = "text" if any(n == "input_ids" for n, _ in self._inputs) else "image"
        self.class_names = self._class_names(class_names, C)
        self.data_config: Optional[dict] = None
        self.tokenizer = None
        self.max_length = None
        if self.modality == "image":
            self.data_config = image_config
            if self.data_config is None and "preprocess" in self._meta:
                self.data_config = self._config_from_metadata()
            self._collate = ImageCollate(self.data_config) if self.data_config is not None else None
            self._check_image_shape()
        else:
            self._collate = None
            self._load_tokenizer(max_length)

    # ---- set-up helpers
    def _class_names(self, given, C: int) -> list[str]:
        names = None
        if given:
            names = [str(n) for n in given]
            where = "--class-names"
        else:
            for key in ("class_names", "label_names"):
                if key in self._meta:
                    try:
                        val = json.loads(self._meta[key])
                    except json.JSONDecodeError:
                        raise BadInput(f"metadata {key} is not a JSON list", self.source) from None
                    if not isinstance(val, list):
                        raise BadInput(f"metadata {key} is not a JSON list", self.source)
                    names, where = [str(v) for v in val], f"metadata {key}"
                    break
        if names is None:
            cfg = self.source.parent / "config.json"
            if cfg.exists():
                try:
                    id2label = json.loads(cfg.read_text(encoding="utf-8")).get("id2label") or {}
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    id2label = {}
                if isinstance(id2label, dict) and len(id2label) == C:
                    names = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(C)]
                    where = "config.json id2label"
        if names is None:
            return [str(i) for i in range(C)]
        if len(names) != C:
            raise BadInput(f"{where} has {len(names)} classes, the model's head has {C}", self.source)
        return names

    def _config_from_metadata(self) -> dict:
        try:
            cfg = json.loads(self._meta["preprocess"])
            cfg = cfg.get("image", cfg) if isinstance(cfg, dict) else None
            return resolve_image_config(cfg)
        except Exception:
            raise BadInput("metadata 'preprocess' is not a valid image preprocessing description",
                           self.source) from None

    def _check_image_shape(self) -> None:
        if self.data_config is None or len(self._inputs) != 1:
            return
        shape = self._inputs[0][1]
        want = list(self.data_config["input_size"])
        if len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]) and list(shape[1:]) != want:
            raise BadInput(f"the preprocessing gives {'x'.join(map(str, want))} images but the model's "
                           f"input is {'x'.join(map(str, shape[1:]))}", self.source)

    def _load_tokenizer(self, max_length: Optional[int]) -> None:
        folder = self.source.parent
        if not any((folder / f).exists() for f in TOKENIZER_FILES):
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BadInput(f"cannot load the tokenizer next to the ONNX model ({msg})", folder) from None
        finally:
            hf_logging.set_verbosity(verbosity)
        limit = getattr(self.tokenizer, "model_max_length", None) or DEFAULT_MAX_LENGTH
        if limit > 100_000:
            limit = DEFAULT_MAX_LENGTH
        self.max_length = int(max_length) if max_length else int(min(limit, DEFAULT_MAX_LENGTH))
        seq = [s[1] for n, s in self._inputs if n == "input_ids" and len(s) == 2]
        self._fixed_seq = seq[0] if seq and isinstance(seq[0], int) else None

    # ---- identity
    def body_hash(self) -> str:
        return self._body_hash

    def preprocess_id(self) -> dict:
        if self.modality == "image":
            return {"image": self.data_config}
        if self.tokenizer is None:
            return {"tokenizer": None}
        return {"tokenizer": type(self.tokenizer).__name__, "vocab_size": int(self.tokenizer.vocab_size),
                "max_length": self.max_length,
                "lowercase": bool(getattr(self.tokenizer, "do_lower_case", False))}

    @property
    def source_metadata(self) -> dict[str, str]:
        return dict(self._meta)

    @property
    def input_names(self) -> list[str]:
        return [n for n, _ in self._inputs]

    @property
    def logits_name(self) -> str:
        return self.spec.output_name

    # ---- data
    def collate(self, items: Sequence[Any]):
        if self.modality == "image":
            if self._collate is None:
                raise BadInput("this ONNX model carries no preprocessing: give --image-size, --mean and "
                               f"--std, or put a {PREPROCESS_FILE} (input_size, mean, std) next to it",
                               self.source)
            return self._collate(items)
        if self.tokenizer is None:
            raise BadInput("a text ONNX model needs its tokenizer files (tokenizer.json or vocab.txt, "
                           "tokenizer_config.json) in the same folder", self.source)
        if self._fixed_seq:
            enc = self.tokenizer(list(items), padding="max_length", truncation=True,
                                 max_length=self._fixed_seq, return_tensors="pt")
        else:
            enc = self.tokenizer(list(items), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return dict(enc)

    # ---- sessions
    def _session(self, which: str, device):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        key = (which, dev.type, dev.index)
        if key not in self._sessions:
            if which == "embed":
                proto = self._with_embedding_output()
            else:
                proto = self.export_proto({})
            self._sessions[key] = make_session(proto, prefer_cuda=dev.type == "cuda", device=dev,
                                               where=self.source)
        return self._sessions[key]

    def _with_embedding_output(self):
        import onnx

        p = onnx.ModelProto()
        p.CopyFrom(self.proto)
        if self.spec.input_name not in {o.name for o in p.graph.output}:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.spec.weight_dtype))
            p.graph.output.append(onnx.helper.make_tensor_value_info(self.spec.input_name, elem, None))
        return p

    def _run(self, which: str, batch, device, outputs: Sequence[str]) -> list:
        sess = self._session(which, device)
        return run_session(sess, session_feeds(sess, batch, self.source), outputs)

    # ---- compute
    def embed_batch(self, batch, device) -> torch.Tensor:
        (emb,) = self._run("embed", batch, device, [self.spec.input_name])
        if emb.ndim != 2:
            raise BadInput(f"the head's input is not a (batch, features) matrix (got {emb.shape})",
                           self.source)
        return torch.from_numpy(np.ascontiguousarray(emb)).float()

    def logits_batch(self, batch, device) -> torch.Tensor:
        which = "modified" if self.head_changed else "embed"
        (out,) = self._run(which, batch, device, [self.spec.output_name])
        return torch.from_numpy(np.ascontiguousarray(out)).float()

    # ---- head
    def head_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._W.clone(), self._b.clone()

    def set_head(self, W: torch.Tensor, b: torch.Tensor) -> None:
        W = torch.as_tensor(W).detach().float().cpu()
        b = torch.as_tensor(b).detach().float().cpu().reshape(-1)
        if tuple(W.shape) != tuple(self._W0.shape) or b.shape[0] != W.shape[0]:
            raise RepairError(f"new head has shape {tuple(W.shape)} / {tuple(b.shape)}, expected "
                              f"{tuple(self._W0.shape)} / ({self._W0.shape[0]},)")
        self._W, self._b = W.clone(), b.clone()
        self._head_changed = True
        self._modified = None
        self._sessions = {k: v for k, v in self._sessions.items() if k[0] != "modified"}

    # ---- output
    def export_proto(self, metadata: dict[str, str]):
        """A copy of the graph with the current head written in and ``metadata`` merged
        into ``metadata_props`` (the model's own entries are kept)."""
        import onnx

        if self._modified is None:
            p = onnx.ModelProto()
            p.CopyFrom(self.proto)
            if self.head_changed:
                apply_head(p, self.spec, self._W, self._b)
            self._modified = p
        p = onnx.ModelProto()
        p.CopyFrom(self._modified)
        extra = {}
        if "class_names" not in self._meta and "label_names" not in self._meta:
            extra["class_names"] = json.dumps(self.class_names)
        if self.modality == "image" and self.data_config is not None and "preprocess" not in self._meta:
            extra["preprocess"] = json.dumps(self.data_config)
        set_metadata(p, {**extra, **metadata})
        return p

    def save(self, out: Path, metadata: dict[str, str]) -> Path:
        import onnx

        out = Path(out)
        onnx.save(self.export_proto(metadata), str(out))
        return out

    def describe(self) -> dict:
        d = super().describe()
        d["head_node"] = self.proto.graph.node[self.spec.node].op_type
        return d


def load_onnx(path, options=None) -> OnnxAdapter:
    from . import LoadOptions

    o = options or LoadOptions()
    path = Path(path)
    if not path.is_file():
        raise BadInput("ONNX model not found", path)
    cfg = image_config_from_options(o.image_size, o.mean, o.std, path.parent / PREPROCESS_FILE)
    return OnnxAdapter(path, image_config=cfg, class_names=o.class_names, max_length=o.max_length)
