"""The ``onnx`` family: deployed ONNX classifiers, repaired without any torch model.

The head is the graph's final classification layer (see ``onnx_graph``).
Embeddings are the head's input, read by running the graph with that tensor
added as an extra output (``onnx_runtime``). A repaired head is written back into
the same graph: only the head's initializers (and ``alpha``/``beta``, normalised
to 1) change; inputs, outputs and every other initializer stay as they are. No
other tensor can change and the model cannot be trained.

Preprocessing: a file carrying the ``preprocess`` metadata entry ``repair export``
writes is read with it (``--image-size/--mean/--std`` for it, or a ``preprocess.json``
next to it that says otherwise, are refused); any other image model needs those
options or a ``preprocess.json``. Text models need the tokenizer files in the model's
folder; a graph with a fixed sequence axis reads texts at the truncation length,
padded (masked) to its axis.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import BadInput, RepairError, no_warnings
from ..io import parse_json
from . import LoadOptions, checked_class_names, register_family
from .base import Adapter, files_beside, forward_failure, read_json
from .images import (DATA_CONFIG_KEYS, GIVE_PREPROCESSING, PREPROCESS_FILE, ImageCollate, described_image_config,
                     image_config_from_options)
# (the helpers below were defined here before the split; they stay importable from this module)
from .onnx_graph import (MAX_PROTO_BYTES, HeadSpec, apply_head, find_head, graph_inputs,  # noqa: F401
                         graph_structure_hash, head_from_graph, init_array, linear_bias, linear_weight,
                         metadata_dict, set_metadata, training_mode_node)
from .onnx_runtime import (make_session, onnxruntime, ort_errors, ort_providers, fed_unpadded, run_batch, run_session,  # noqa: F401
                           session_feeds)
from .text import (TOKENIZER_DIGEST_FILES, collate_texts, has_tokenizer_files, load_tokenizer,
                   max_positions_beside, resolve_max_length,
                   tokenizer_files, tokenizer_preprocess_id)



#: the metadata keys an ONNX file's class names are read from, the first present: ``class_names``
#: (what ``repair export`` writes), else ``label_names`` (the one home of the rule: the adapter reads
#: them so, and ``repair verify`` compares what a file would be read as)
CLASS_NAME_KEYS = ("class_names", "label_names")


def check_onnx_written_beside(adapter, out: Path, side: Optional[Path] = None) -> None:
    """An ONNX file written to ``out`` (a repaired ONNX model, or any image model's ONNX export) records the
    preprocessing the model was read with (metadata ``preprocess``), and a ``preprocess.json`` beside
    ``out`` is read with it -- by the one rule of :meth:`OnnxAdapter.use_preprocessing`: one that disagrees
    makes the written file unreadable (``repair eval`` of it is refused). :class:`BadInput` naming the
    output and that file, before anything is written. ``side``: the ``preprocess.json`` that will be beside
    it, when it is not there yet (a folder checkpoint's, copied into the output folder with the model)."""
    if adapter.modality != "image" or adapter.data_config is None:
        return
    copied = side is not None                # the checkpoint's own file, copied with the model wherever it goes
    side = Path(side) if side is not None else Path(out).parent / PREPROCESS_FILE
    if not side.exists():
        return
    beside = image_config_from_options(None, None, None, side)
    diff = preprocess_disagreement(beside, described_image_config(dict(adapter.data_config)))
    if diff:
        raise BadInput(f"the ONNX file would be written beside {side}, which disagrees with the image "
                       f"preprocessing the model was read with and the file records ({diff}): reading it back "
                       f"(repair eval) would be refused; remove or correct {side if copied else side.name}"
                       + ("" if copied else ", or write the output to another folder (--out)"), out)

class OnnxAdapter(Adapter):
    family = "onnx"
    #: ``repair.export.export_onnx`` saves the edited graph instead of re-exporting a torch model
    exports_onnx_natively = True
    can_train = False
    #: the external-data files the graph's initializers were read from
    external_files: list = []
    #: an image model's own preprocessing (metadata ``preprocess``), or None: see :meth:`use_preprocessing`
    own_preprocess: Optional[dict] = None
    #: where a model's own preprocessing is (``load_model`` names it refusing --image-size/--mean/--std)
    preprocess_home = "its metadata 'preprocess'"

    def __init__(self, path: Path, *, image_config: Optional[dict] = None, class_names=None,
                 max_length: Optional[int] = None):
        import onnx

        path = Path(path)
        self.source = path
        self.weights_path = path
        self.model = None
        self.head = None
        # the graph and its external data, read once: :meth:`source_sha256` is the digest of the bytes read
        proto, self._source_sha, self.external_files = read_onnx(path)
        if proto.ByteSize() > MAX_PROTO_BYTES:
            raise BadInput("ONNX models over 2 GB are not supported", path)
        _check_finite_initializers(proto, path)
        training = training_mode_node(proto)
        if training:
            raise BadInput(f"the graph's {training} runs in training mode, so its outputs change from run to "
                           "run; export the model in inference mode (model.eval())", path)
        self.proto = proto
        self.spec = find_head(proto, path)
        self._W0, self._b0 = head_from_graph(proto, self.spec)
        self._W, self._b = self._W0.clone(), self._b0.clone()
        self._source_metadata = metadata_dict(proto)
        self._inputs = graph_inputs(proto)
        self._body_hash = graph_structure_hash(proto, self.spec.initializer_names(), self.spec)
        self._sessions: dict = {}
        self._edited = None            # the graph with the current head written in (cached)
        C = int(self._W0.shape[0])
        # a text graph takes token ids (integers, however its inputs are named); an image graph floats
        ints = {i.name for i in proto.graph.input
                if i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
        self.modality = "text" if any(n == "input_ids" or n in ints for n, _ in self._inputs) else "image"
        if self.modality == "image":      # the preprocessing gives floats: normalised pixels
            floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
            for i in proto.graph.input:
                if i.name in dict(self._inputs) and i.type.tensor_type.elem_type not in floats:
                    dt = onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()
                    raise BadInput(f"the model's image input {i.name!r} takes {dt}; images are given as "
                                   "normalised float pixels (float32, float64 or float16 inputs)", path)
        self.class_names = self._class_names(class_names, C)
        self.max_length: Optional[int] = None
        self._fixed_seq: Optional[int] = None
        if self.modality == "image":
            self.data_config, self._collate = None, None
            #: the preprocessing the file carries (metadata ``preprocess``: what its figures were measured
            #: with); it is what the file is read with, nothing from outside the file replaces it
            self.own_preprocess = self._config_from_metadata() if "preprocess" in self._source_metadata else None
            self.use_preprocessing(self.own_preprocess if image_config is None else image_config)
        else:
            self._collate = None
            recorded = self._max_length_from_metadata() if max_length is None else None
            self._load_tokenizer(max_length if max_length is not None else recorded, recorded=recorded is not None)

    # ---- set-up helpers
    def _class_names(self, given, C: int) -> list[str]:
        """The file's own names (its metadata, else a config.json id2label beside it) -- then
        ``class_names_home`` says where, and a ``--class-names`` that differs is refused by load_model as
        for every family (it silently replaced them: a fix refit the head on swapped labels) -- else the
        names given, else the indices."""
        from .base import names_of_its_own

        names = None
        for key in CLASS_NAME_KEYS:
            if key in self._source_metadata:
                try:
                    val = parse_json(self._source_metadata[key])
                except json.JSONDecodeError:
                    val = None
                if not isinstance(val, list) or len(val) != C:
                    if given:           # names the file cannot give (not a list of C): the user's stand in
                        break
                    if not isinstance(val, list):
                        raise BadInput(f"metadata {key} is not a JSON list", self.source)
                names, where = [str(v) for v in val], f"metadata {key}"
                break
        else:
            names = names_beside(self.source, C)
            where = "config.json id2label"
        if names is not None and names_of_its_own(names, C):
            self.class_names_home = where
        elif given:                     # no names, or placeholders (LABEL_0.., 0..): the user's
            names, where = [str(n) for n in given], "--class-names"
        if names is None:
            return [str(i) for i in range(C)]
        if len(names) != C:
            raise BadInput(f"{where} has {len(names)} classes, the model's head has {C}", self.source)
        return checked_class_names(names, where, self.source, distinct=False)

    def _config_from_metadata(self) -> dict:
        try:
            cfg = json.loads(self._source_metadata["preprocess"])
            cfg = cfg.get("image", cfg) if isinstance(cfg, dict) else None
            return described_image_config(cfg)
        except Exception:
            raise BadInput("metadata 'preprocess' is not a valid image preprocessing description",
                           self.source) from None

    def use_preprocessing(self, cfg: Optional[dict], where=None) -> None:
        """Read images with ``cfg`` (a checked config, :func:`resolve_image_config`), given from outside
        the file (``--image-size/--mean/--std``, a ``preprocess.json`` beside it: ``where``). A file that
        carries its own preprocessing keeps it: another one is :class:`BadInput` naming the file and what
        differs (reading it otherwise would measure other figures than the ones it records)."""
        own = self.own_preprocess
        diff = preprocess_disagreement(cfg, own)
        if diff:
            raise BadInput(f"the model carries its own image preprocessing (metadata 'preprocess'), and "
                           f"{where or 'the preprocessing given'} disagrees with it ({diff}); the file is read "
                           f"as it records: remove or correct {where or 'it'}", self.source)
        if own is not None:
            cfg = own
        self.data_config = cfg
        self._collate = ImageCollate(cfg) if cfg is not None else None
        self._check_image_shape()

    def check_written_beside(self, out: Path) -> None:
        """The model written to ``out``: :func:`check_onnx_written_beside`."""
        check_onnx_written_beside(self, out)

    def _check_image_shape(self) -> None:
        if self.data_config is None or len(self._inputs) != 1:
            return
        shape = self._inputs[0][1]
        want = list(self.data_config["input_size"])
        if len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]) and list(shape[1:]) != want:
            raise BadInput(f"the preprocessing gives {'x'.join(map(str, want))} images but the model's "
                           f"input is {'x'.join(map(str, shape[1:]))}", self.source)

    def _max_length_from_metadata(self) -> Optional[int]:
        """The truncation length ``repair export`` recorded (metadata ``max_length``: what the exported
        model was measured with), or None."""
        raw = self._source_metadata.get("max_length")
        if raw is None:
            return None
        if not (raw.strip().isascii() and raw.strip().isdigit()) or len(raw.strip()) > 9 or int(raw) < 1:
            raise BadInput(f"metadata max_length is {raw!r}, not a whole number >= 1", self.source)
        return int(raw)

    def _load_tokenizer(self, max_length: Optional[int], recorded: bool = False) -> None:
        folder = self.source.parent
        if not has_tokenizer_files(folder):
            return
        self.tokenizer = load_tokenizer(folder, "cannot load the tokenizer next to the ONNX model")
        # a graph exported without a dynamic sequence axis takes exactly this many tokens: texts are cut at
        # the truncation length and padded to it (collate_texts), so the length used is the one recorded
        seq = [s[1] for n, s in self._inputs if n == "input_ids" and len(s) == 2]
        fixed = self._fixed_seq = seq[0] if seq and isinstance(seq[0], int) and seq[0] > 0 else None
        over = (f"is more than the {fixed} tokens the graph's input 'input_ids' takes (a fixed sequence axis)"
                if fixed is not None and max_length and int(max_length) > fixed else None)
        if recorded:     # the length the export was measured and verified with: as it is (a model with
            if over:     # relative positions, DeBERTa, has no position cap)
                raise BadInput(f"metadata max_length {int(max_length)} {over}: the file cannot have been measured "
                               "with it", self.source)
            self.max_length = int(max_length)
        else:
            if over:
                raise BadInput(f"--max-length {int(max_length)} {over}; give at most {fixed}", self.source)
            # the model's positions (its config beside the file) cap the length, as in the transformers
            # adapter: a longer text would overflow the position embeddings
            self.max_length = resolve_max_length(self.tokenizer, max_length, positions=max_positions_beside(folder),
                                                 where=folder / "config.json")
            if fixed is not None:      # the default length: at most what the graph takes
                self.max_length = min(self.max_length, fixed)

    # ---- identity
    def body_hash(self) -> str:
        return self._body_hash

    def preprocess_id(self) -> dict:
        if self.modality == "image":
            return {"image": self.data_config}
        pid = tokenizer_preprocess_id(self.tokenizer, self.max_length)
        if fed_unpadded(self._inputs):   # how its texts are fed (run_batch): embeddings of padded texts differ
            pid = {**pid, "fed": "unpadded"}
        return pid

    @property
    def input_names(self) -> list[str]:
        """The graph's inputs (not initializers), in graph order."""
        return [n for n, _ in self._inputs]

    def head_tensor_names(self) -> list[str]:
        return self.spec.initializer_names()

    @property
    def logits_name(self) -> str:
        return self.spec.output_name

    # ---- data
    def collate(self, items: Sequence[Any]):
        if self.modality == "image":
            if self._collate is None:
                raise BadInput(f"this ONNX model carries no preprocessing: {GIVE_PREPROCESSING}", self.source)
            return self._collate(items, self.max_pixels)
        if self.tokenizer is None:
            raise BadInput("a text ONNX model needs its tokenizer files (tokenizer.json or vocab.txt, "
                           "tokenizer_config.json) in the same folder", self.source)
        return collate_texts(self.tokenizer, items, self.max_length, fixed_length=self._fixed_seq)

    # ---- sessions
    def _session(self, which: str, device):
        from ..embeddings import forward_threads

        dev = torch.device(device) if device is not None else torch.device("cpu")
        # on the CPU, the threads the embedding cache key names (torch's count; onnxruntime's own default
        # is one per physical core whatever the run was given)
        threads = forward_threads() if dev.type == "cpu" else None
        key = (which, dev.type, dev.index, threads)
        if key not in self._sessions:
            if which == "embed":
                proto = self._with_embedding_output()
            else:
                proto = self._edited_proto()
            self._sessions[key] = make_session(proto, prefer_cuda=dev.type == "cuda", device=dev,
                                               where=self.source, threads=threads)
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
        try:
            return run_batch(sess, batch, outputs, self.source)
        except ort_errors() as e:      # the graph itself fails on this input: as a torch network's forward
            raise forward_failure(e, self.source, "onnxruntime") from None

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

    # ---- head and tensors
    def head_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._W.clone(), self._b.clone()

    def set_head(self, W: torch.Tensor, b: torch.Tensor) -> None:
        from .base import new_head

        W, b = new_head(W, b, tuple(self._W0.shape), self.source)
        W, b = W.float().cpu(), b.float().cpu()
        # as the file will hold them: a float16 head is rounded to float16 (figures measured on the
        # head as written, as a float16 torch checkpoint's are)
        W = torch.from_numpy(W.numpy().astype(self.spec.weight_dtype).astype(np.float32))
        bias_dtype = init_array(self.proto, self.spec.bias_name).dtype if self.spec.bias_name else self.spec.weight_dtype
        b = torch.from_numpy(b.numpy().astype(bias_dtype).astype(np.float32))
        self._W, self._b = W.clone(), b.clone()
        self._edited = None
        self._sessions = {k: v for k, v in self._sessions.items() if k[0] != "modified"}

    @property
    def head_changed(self) -> bool:
        return not (torch.equal(self._W, self._W0) and torch.equal(self._b, self._b0))

    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Only the head's initializers can change (values in the file's layout: the graph's
        ``alpha``/``beta`` and ``transB`` apply)."""
        heads = self.spec.initializer_names()
        other = sorted(set(tensors) - set(heads))
        if other:
            raise BadInput(f"an ONNX model's tensors cannot be changed, only its head ({', '.join(heads)}); "
                           f"got {other[0]!r}", self.source)
        arrays = {}
        for name, value in tensors.items():
            arr = torch.as_tensor(value).detach().cpu().double().numpy()
            want = init_array(self.proto, name).shape
            if arr.shape != want:
                raise RepairError(f"new {name} has shape {arr.shape}, expected {want}")
            arrays[name] = arr
        W = linear_weight(self.spec, arrays[self.spec.weight_name]) if self.spec.weight_name in arrays else self._W
        b = (linear_bias(self.spec, arrays[self.spec.bias_name], W.shape[0]) if self.spec.bias_name in arrays
             else self._b)
        self.set_head(W, b)

    def changed_tensors(self) -> list[str]:
        """The initializers of the written graph whose values differ from the file's (the
        head's, or a new one where a shared or missing head tensor had to be added)."""
        if not self.head_changed:
            return []
        from onnx import numpy_helper

        before = {t.name: t for t in self.proto.graph.initializer}
        heads = set(self.spec.initializer_names())
        out = []
        for t in self._edited_proto().graph.initializer:
            old = before.get(t.name)
            if old is None or (t.name in heads and (old.data_type != t.data_type or not np.array_equal(
                    numpy_helper.to_array(old), numpy_helper.to_array(t)))):
                out.append(t.name)
        return sorted(out)

    # ---- output
    def _edited_proto(self):
        """The graph with the current head written in (cached: do not modify it)."""
        import onnx

        if self._edited is None:
            p = onnx.ModelProto()
            p.CopyFrom(self.proto)
            if self.head_changed:
                apply_head(p, self.spec, self._W, self._b)
            self._edited = p
        return self._edited

    def export_proto(self, metadata: dict[str, str]):
        """A copy of the graph with the current head written in and ``metadata`` merged into
        ``metadata_props``. The model's other entries are kept; how this run read the model -- its class
        names, image preprocessing (the file's own, else ``preprocess.json`` or options) or truncation
        length -- is written over the file's own (:func:`repair.export.export_metadata`): the written
        model reads its input as the figures measured it."""
        import onnx

        from ..export import export_metadata

        p = onnx.ModelProto()
        p.CopyFrom(self._edited_proto())
        meta = export_metadata(self, metadata)
        if "label_names" in self._source_metadata:      # one list of names: the one written
            meta.setdefault("label_names", meta["class_names"])
        set_metadata(p, meta)
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

    @property
    def head_dtype(self) -> np.dtype:
        """The dtype the graph's head computes in (its weight initializer's)."""
        return np.dtype(self.spec.weight_dtype)

    def network_id(self) -> dict:
        """The graph is hashed with the weights (:meth:`body_hash`); the runtime that computes it is
        here, as torch's version is for a torch model."""
        return {**super().network_id(), "onnxruntime": onnxruntime().__version__}


def preprocess_disagreement(cfg: Optional[dict], own: Optional[dict]) -> Optional[str]:
    """How ``cfg`` (a ``preprocess.json``, the options: a checked config) differs from the preprocessing
    a model carries, ``own``: ``"mean [..] in it, [..] in the model; ..."``, or None where they agree
    (or either is None). The one rule of a model's own preprocessing against one from outside it:
    :meth:`OnnxAdapter.use_preprocessing` (reading a model) and :meth:`OnnxAdapter.check_written_beside`
    (writing one)."""
    if own is None or cfg is None or cfg == own:
        return None
    return "; ".join(f"{k} {cfg.get(k)!r} in it, {own.get(k)!r} in the model"
                     for k in DATA_CONFIG_KEYS if cfg.get(k) != own.get(k))


def _external_tensors(proto):
    """The tensors of ``proto`` that keep their data outside the graph, in the order onnx loads them
    (``onnx.external_data_helper``: initializers, subgraphs' included, then attribute tensors)."""
    from onnx import external_data_helper as edh

    every = getattr(edh, "_get_all_tensors", None)
    tensors = every(proto) if every is not None else proto.graph.initializer
    return [t for t in tensors if edh.uses_external_data(t)]


def _external_location(tensor) -> Optional[str]:
    return {e.key: e.value for e in tensor.external_data}.get("location")


def external_data_files(proto, base: Path) -> list[Path]:
    """The files an ONNX model's external-data tensors name (``location``), under ``base``, each once, in
    the order onnx lists them (the order :func:`read_onnx` hashes them in)."""
    out = []
    for t in _external_tensors(proto):
        loc = _external_location(t)
        if loc and Path(base, loc) not in out:
            out.append(Path(base, loc))
    return out


def read_onnx(path: Path, chunk: int = 1 << 22):
    """An ONNX model file and its external data, read: ``(proto with its external data loaded, sha256,
    the external files)``. The one home of an ONNX model's identity (``source_sha256``: a report's
    ``model.sha256``, the provenance ``source_sha256``, an export's record; the embedding cache key follows
    the graph and weights loaded): the sha256 of the graph file's bytes followed by each external file's
    bytes, in the order onnx lists them (:func:`external_data_files`) -- for a model without external data,
    the file's own sha256. The graph is parsed from the bytes hashed; each external file is read once more
    right after onnx loaded the tensors from it, hashed, and checked in that same read to hold every byte
    onnx loaded from it: a file saved over between the two reads is :class:`BadInput` naming it ("changed
    while it was read"), as for a weights file (:func:`repair.adapters.base.loaded_file_sha256`). Memory:
    one chunk, and the tensor being compared."""
    import hashlib

    import onnx

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"cannot read the model file ({e.strerror or e})", path) from None
    h = hashlib.sha256(data)
    try:
        # as onnx.load does, in two steps: the external data files are source files too
        proto = onnx.load_model_from_string(data)
        del data
        files = external_data_files(proto, path.parent)
        spans: dict[Path, list] = {f: [] for f in files}        # where onnx reads each tensor from
        for t in _external_tensors(proto):
            loc = _external_location(t)
            if loc:
                with no_warnings():          # (onnx's load says it once)
                    info = onnx.external_data_helper.ExternalDataInfo(t)
                spans[Path(path.parent, loc)].append((int(info.offset or 0), info.length is None, t))
        onnx.load_external_data_for_model(proto, str(path.parent))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"not a readable ONNX model ({msg})", path) from None
    for f in files:
        _hash_external_file(h, f, spans[f], chunk)
    return proto, h.hexdigest(), files


def _hash_external_file(h, path: Path, spans: list, chunk: int) -> None:
    """Add ``path``'s bytes to ``h``, in one read that checks each tensor of ``spans`` (offset, read to the
    end, the tensor onnx loaded) holds the bytes at its place in the file."""
    changed = BadInput("the model's external data file changed while it was read (saved over during the "
                       "load?); load the model again once it is written", path)
    from .base import read_checking

    spans_ = [(o, o + len(t.raw_data), np.frombuffer(t.raw_data, dtype=np.uint8)) for o, _, t in spans]
    try:
        f = open(path, "rb")
    except OSError:
        raise changed from None
    with f:
        pos = read_checking(f, h, spans_, chunk, changed)
    # a tensor read to the end of a file that grew since
    if any(to_end and o + len(t.raw_data) != pos for o, to_end, t in spans):
        raise changed


def _check_finite_initializers(proto, path: Path) -> None:
    """Every initializer readable as its dims and type say (data that do not fit them -- a broken
    write, dims of 2^31 x 2^31 over 288 values -- were an internal error wherever it was first read),
    and non-finite values in any floating one: :class:`BadInput` naming it (cf. ``base.check_finite``
    for torch models)."""
    import onnx
    from onnx import numpy_helper

    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}
    for init in proto.graph.initializer:
        try:
            values = numpy_helper.to_array(init)
        except (ValueError, TypeError, OverflowError, MemoryError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInput(f"initializer {init.name!r} cannot be read as its dims {list(init.dims)} and type say "
                           f"({why[:200]})", path) from None
        if init.data_type in floating:
            arr = np.asarray(values, dtype=np.float64)
            if not np.isfinite(arr).all():
                raise BadInput(f"initializer {init.name!r} holds {int((~np.isfinite(arr)).sum())} non-finite "
                               "value(s) (NaN or infinite); the model cannot be evaluated or repaired", path)


def names_beside(onnx_path: Path, C: int) -> Optional[list[str]]:
    """The class names an ONNX file without them in its metadata is read with: ``id2label`` of a
    ``config.json`` beside it, when that holds ``C`` classes (the one home of this rule: the loader and
    :func:`repair.export.metadata_mismatches` read it so); None otherwise."""
    cfg = Path(onnx_path).parent / "config.json"
    if not files_beside(cfg.parent, ("config.json",)):        # (a link leading out: BadInput)
        return None
    try:
        id2label = read_json(cfg).get("id2label") or {}
    except BadInput:          # not a readable JSON object: no names from it
        return None
    if isinstance(id2label, dict) and len(id2label) == C:
        return [str(id2label.get(str(i), id2label.get(i, i))) for i in range(C)]
    return None


def preprocess_beside(onnx_path: Path, size=None, mean=None, std=None) -> Optional[dict]:
    """The image preprocessing an ONNX file without it in its metadata is read with: the options
    (``--image-size``, ``--mean``, ``--std``) over a ``preprocess.json`` beside it, described as the loader
    reads it; None with neither. The one home of this rule: the loader and
    :func:`repair.export.metadata_mismatches` read it so. A ``preprocess.json`` that is not a regular file
    or leads out of the folder, or is not a preprocessing description, is :class:`BadInput`."""
    import os

    side = Path(onnx_path).parent / PREPROCESS_FILE
    if os.path.lexists(side) and not files_beside(side.parent, (PREPROCESS_FILE,)):
        raise BadInput("not a regular file (a preprocessing description is a JSON file)", side)
    return image_config_from_options(size, mean, std, side)


def load_onnx(path, options: Optional[LoadOptions] = None) -> OnnxAdapter:
    o = options or LoadOptions()
    path = Path(path)
    if not path.is_file():
        raise BadInput("expected an .onnx file, got a folder" if path.is_dir() else "ONNX model not found", path)
    # the files beside it that are read (preprocessing, config: id2label and positions, tokenizer), checked
    # first: a symlink among them leading out of the folder is refused, as in a model folder
    beside = files_beside(path.parent, (PREPROCESS_FILE, "config.json", *TOKENIZER_DIGEST_FILES))
    adapter = OnnxAdapter(path, class_names=o.class_names, max_length=o.max_length)
    if adapter.modality == "image":
        side = path.parent / PREPROCESS_FILE
        if adapter.own_preprocess is None:    # it carries none: the options, else a preprocess.json beside it
            adapter.use_preprocessing(preprocess_beside(path, o.image_size, o.mean, o.std))
            adapter.preprocess_from_options = True
        elif o.image_size is None and o.mean is None and o.std is None:
            # (options given for it are refused by load_model, as for any model that carries its own)
            adapter.use_preprocessing(preprocess_beside(path), where=side)
    # and the other files its tokenizer read (bpe.codes, a sentencepiece model...), checked the same way
    tok = getattr(adapter, "tokenizer", None)
    extra = [f for f in (tokenizer_files(tok) if tok is not None else []) if f not in beside]
    adapter.extra_files = beside + extra + adapter.external_files
    return adapter


def detect(path: Path, o: LoadOptions) -> bool:
    return path.suffix.lower() == ".onnx"


register_family("onnx", detect=detect, load=load_onnx, priority=90,
                summary="an ONNX file (head: the final Gemm, or MatMul + Add, with initializer weights)")
