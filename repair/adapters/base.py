"""The adapter protocol: one per model family.

An adapter owns the model object and knows the family's specifics: how to load
the checkpoint, the preprocessing, the class names in the model's order, where
the final ``nn.Linear`` (the head) is, how to capture its input (the
embedding), and how to write changed tensors (a repaired head, or any other)
back in the checkpoint's own format. Everything downstream works on tensors only.

Families register themselves with ``repair.adapters.register_family``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .. import provenance
from ..data import DEFAULT_MAX_PIXELS, open_regular
from ..errors import BadInput, RepairError, no_warnings
from ..io import OUTPUT_RECORD, load_state_dict_file, parse_json, pickled_state_dict, save_safetensors, sha256_file  # noqa: F401  (sha256_file: re-exported)
from .text import tokenizer_input_names

#: texts tokenized at once for their input keys (:meth:`Adapter.input_keys`): the tokenizer's encodings
#: of one call are held together (with the tokens truncation drops: 437 MiB for 4,000 long texts)
KEY_CHUNK = 256

#: why a model whose head scores every token cannot be read (its measure, its repair and its ONNX)
POOLS_AFTER_HEAD = ("a classifier whose head scores every token and which pools after it (GPT-2, Llama and "
                    "other decoder sequence classifiers: the last token's score) is not supported")


def tensor_digest(t: torch.Tensor) -> bytes:
    """sha256 of one tensor's dtype, shape and bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256()
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def combine_digests(digests: dict[str, bytes]) -> str:
    """sha256 over (name, digest) in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode())
        h.update(digests[name])
    return h.hexdigest()


#: safetensors' dtype names -> torch dtypes (those this torch has)
_SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)}


def _as_bytes(t: torch.Tensor):
    """A tensor's bytes as a flat uint8 numpy array (no copy for a contiguous CPU tensor)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def changed_while_read(path) -> BadInput:
    """The refusal of a weights file that changed while it was read (one wording)."""
    return BadInput("the weights file changed while it was read (saved over during the load?); load it again "
                    "once it is written", path)


def loaded_file_sha256(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                       chunk: int = 1 << 22) -> str:
    """sha256 of the weights file ``path``, taken when the model is loaded from it, and checked in the
    same single read to hold exactly ``tensors`` (every name, dtype, shape and byte) and ``metadata``:
    the tensors the loader read from it. The one home of a weights file's identity (``source_sha256``,
    the provenance ``source_sha256``, an export's record). A file saved over between the loader's read
    and this one is :class:`BadInput` naming it ("changed while it was read"). Memory: one chunk (and
    for a pickle, which cannot be read in parts, the file once more)."""
    import io as _io
    import struct

    import numpy as np

    path = Path(path)
    changed = changed_while_read(path)
    h = hashlib.sha256()
    if path.suffix.lower() != ".safetensors":              # a pickle: hashed and parsed from the same bytes
        with open(path, "rb") as f:
            data = f.read()
        h.update(data)
        try:
            with no_warnings():
                obj = torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:
            raise changed from None
        del data
        obj = pickled_state_dict(obj)
        if not isinstance(obj, dict) or set(obj) != set(tensors) or metadata:
            raise changed
        for n, t in tensors.items():
            o = obj[n]
            if not isinstance(o, torch.Tensor) or o.dtype != t.dtype or tuple(o.shape) != tuple(t.shape) \
                    or (t.numel() and not np.array_equal(_as_bytes(o), _as_bytes(t))):
                raise changed
        return h.hexdigest()
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) != 8:
            raise changed
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:                                  # safetensors' own header limit
            raise changed
        raw = f.read(n)
        h.update(raw)
        try:
            header = json.loads(raw)
        except ValueError:
            raise changed from None
        if not isinstance(header, dict):
            raise changed
        meta = header.pop("__metadata__", None) or {}
        if dict(meta) != dict(metadata) or set(header) != set(tensors):
            raise changed
        spans = []
        for name, info in header.items():
            t = tensors[name]
            try:
                start, end = (int(x) for x in info["data_offsets"])
                same = (_SAFETENSORS_DTYPES.get(info["dtype"]) == t.dtype
                        and tuple(int(x) for x in info["shape"]) == tuple(t.shape))
            except (KeyError, TypeError, ValueError):
                raise changed from None
            if not same or end - start != t.numel() * t.element_size():
                raise changed
            if end > start:
                spans.append((start, end, _as_bytes(t)))
        read_checking(f, h, spans, chunk, changed)
    return h.hexdigest()


def read_checking(f, h, spans: list, chunk: int, changed: Exception) -> int:
    """Read the rest of the open file ``f`` in chunks of ``chunk`` bytes into the hash ``h``, checking in
    the same read that each span ``(start, end, bytes)`` (offsets from where ``f`` stands; ``bytes`` a uint8
    array of what was loaded from there) holds those bytes; raise ``changed`` where one does not, or lies
    past the end of the file. Returns the bytes read. The one home of "hash a weights file once, checking
    it still holds what was loaded" (a safetensors file's tensors, an ONNX model's external data)."""
    import numpy as np

    todo = sorted(spans, key=lambda s: s[0])
    active: list = []              # the spans the read has reached and not passed
    k, pos = 0, 0
    while True:
        block = f.read(chunk)
        if not block:
            break
        h.update(block)
        buf = np.frombuffer(block, dtype=np.uint8)
        stop = pos + len(block)
        while k < len(todo) and todo[k][0] < stop:
            active.append(todo[k])
            k += 1
        for start, end, mine in active:
            a, b = max(start, pos), min(end, stop)
            if a < b and not np.array_equal(buf[a - pos:b - pos], mine[a - start:b - start]):
                raise changed
        active = [sp for sp in active if sp[1] > stop]
        pos = stop
    if active or any(sp[1] > sp[0] for sp in todo[k:]):     # the file is shorter than what was loaded now
        raise changed
    return pos


class HeadCapture:
    """Forward pre-hook on the head that records its input (the embedding)."""

    def __init__(self, head: nn.Module):
        self.value: Optional[torch.Tensor] = None
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0].detach()

    def remove(self) -> None:
        self._handle.remove()


def generic_labels(n: int) -> list[str]:
    """The names transformers gives the classes of a config without ``id2label`` (``LABEL_0``, ...)."""
    return [f"LABEL_{i}" for i in range(n)]


def names_of_its_own(names, n: int) -> bool:
    """Whether class names a checkpoint carries name its classes (then a ``--class-names`` in another
    order is refused), rather than only number them: transformers' ``LABEL_0``.. or the indices
    ``0``..``n-1`` are placeholders the user's names may replace. One rule for every family."""
    names = [str(x) for x in names]
    return names not in (generic_labels(n), [str(i) for i in range(n)])


def new_head(W, b, shape: tuple, where) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` for :meth:`Adapter.set_head` of a head of ``shape`` (C, D), checked -- a head from the
    caller (a choose_heads result in a notebook): float tensors of the head's shapes holding finite
    values, or a BadInput naming the problem and ``where`` (the model); never truncated to integers,
    never NaN written into the model. Detached, ``b`` flat. The one home of the rule, for every family."""
    import numpy as np

    W, b = (torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) and t.dtype.kind == "f" else t
            for t in (W, b))                 # a numpy float array is taken as its tensor
    for name, t in (("W", W), ("b", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise BadInput(f"set_head: {name} must be a float tensor, got {got}", where)
    if tuple(W.shape) != tuple(shape) or tuple(b.reshape(-1).shape) != tuple(shape)[:1]:
        raise BadInput(f"set_head: the new head has shape {tuple(W.shape)} / {tuple(b.shape)}, the model's is "
                       f"{tuple(shape)} / ({shape[0]},)", where)
    if not bool(torch.isfinite(W).all()) or not bool(torch.isfinite(b).all()):
        raise BadInput("set_head: the new head holds NaN or infinite values", where)
    return W.detach(), b.detach().reshape(-1)


class Adapter(ABC):
    """The protocol every model family implements. Subclasses set the instance
    attributes in ``__init__``; the class attributes below are the documented
    defaults, so ``fix`` / ``export`` read them without ``getattr``.

    The tensor side (``set_tensors``, ``changed_tensors``, ``body_hash``,
    ``state_tensors``, ``save``) is implemented here for adapters whose model is a
    torch ``nn.Module`` loaded from one state-dict file (they call
    ``_init_file_state`` with the file's tensors); an adapter without a torch
    model (ONNX) overrides it.
    """

    def __repr__(self) -> str:
        names = list(getattr(self, "class_names", None) or [])
        return (f"<{type(self).__name__} {getattr(self, 'family', '?')} {str(getattr(self, 'source', ''))!r}, "
                f"{len(names)} classes>")

    family: str                  # the registered family name: "timm" | "transformers" | "torch" | "onnx"
    modality: str                # "image" | "text"
    source: Path                 # the checkpoint path the user gave
    weights_path: Path           # the file holding the weights
    class_names: list[str]
    model: Optional[nn.Module] = None
    head: Optional[nn.Linear] = None
    #: the head module's name in ``model.state_dict()`` (its tensors are ``<head_name>.weight/.bias``)
    head_name: Optional[str] = None

    #: image preprocessing (timm data config: input_size, mean, std, ...); None for text models
    #: and for image checkpoints that carry none
    data_config: Optional[dict] = None
    #: a text model's tokenizer (transformers); None otherwise
    tokenizer: Any = None
    #: most pixels of one image ``collate`` decodes (``repair.embeddings.extract`` sets the
    #: data's ``DataOptions.max_pixels``); a larger image is refused naming it
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: True when the model *is* an ONNX graph: ``repair.export`` writes ``export_proto()``
    #: instead of running a torch exporter
    exports_onnx_natively: bool = False
    #: True when the model's tensors can be trained (model-level repairs, see ``trainable``)
    can_train: bool = False
    #: entries ``save`` writes into the file's metadata under the source's and the caller's
    save_metadata_defaults: Mapping[str, str] = MappingProxyType({})

    _source_metadata: Mapping[str, str] = MappingProxyType({})
    _file_names: frozenset = frozenset()
    _file_values: Mapping[str, torch.Tensor] = MappingProxyType({})

    #: the checkpoint folder whose files the loader read (config, tokenizer) when there is one
    model_folder: Optional[Path] = None
    #: True when the loader took the preprocessing from ``--image-size/--mean/--std`` (a checkpoint that
    #: carries none); those options given for any other model are refused (``load_model``)
    preprocess_from_options: bool = False
    #: how the family built the network beside its weights (the architecture and its arguments, a
    #: factory, a config), JSON-able: part of the embedding cache key (:meth:`network_id`)
    build: Mapping[str, Any] = MappingProxyType({})

    # ---- identity -------------------------------------------------------
    def source_files(self) -> list[Path]:
        """Every file of the checkpoint the run reads, resolved: the weights file, the file the
        user named, and every regular file of the model folder (config, tokenizer, the files
        ``save`` copies), plus :meth:`_extra_source_files`. An output must never replace one."""
        files = [Path(self.weights_path), Path(self.source)]
        folder = self.model_folder or (self.source if Path(self.source).is_dir() else None)
        out = [p.resolve() for p in files if Path(p).is_file()]
        if folder is not None:
            out += check_model_folder(folder)
        out += [Path(p).resolve() for p in self._extra_source_files()]
        seen: set = set()
        return [p for p in out if not (p in seen or seen.add(p))]

    #: files beside the checkpoint the loader read (a ``preprocess.json``, a tokenizer), set by the family
    extra_files: Sequence[Path] = ()

    def _extra_source_files(self) -> list[Path]:
        """Files beside the checkpoint a family reads (default: :attr:`extra_files`)."""
        return [Path(p) for p in self.extra_files if Path(p).is_file()]

    def source_sha256(self) -> str:
        """sha256 of the checkpoint file as it was loaded: taken when the family read it
        (:meth:`_init_file_state`, or the family's own load: an ONNX model's graph and its external data,
        :func:`repair.adapters.onnx_adapter.read_onnx`), never from what the files hold by the time a
        report, a provenance record or an export asks (a file saved over since)."""
        return self.take_source_sha256()

    def take_source_sha256(self) -> str:
        """The stored sha256 of the checkpoint as it was loaded; for an adapter whose family took none as it
        read the file (a family registered with :func:`repair.adapters.register_family` that does not call
        :meth:`_init_file_state`), the file's sha256 now, stored: :func:`repair.adapters.load_model` calls
        this right after the family's load, so such a family's identity is still taken at load."""
        sha = getattr(self, "_source_sha", None)
        if sha is None:
            sha = self._source_sha = sha256_file(self.weights_path)
        return sha

    @property
    def source_metadata(self) -> dict[str, str]:
        """The checkpoint's own metadata (safetensors header, ONNX ``metadata_props``); {} if none."""
        return dict(self._source_metadata)

    def identity(self) -> dict:
        """What a report says the figures were measured on: the checkpoint file's ``sha256``, or, once
        tensors were changed in memory (a repair not written back, a caller's ``set_head``), no sha256 of
        any file but the one they were changed from and their names."""
        changed = self.changed_tensors()
        if not changed:
            return {"sha256": self.source_sha256()}
        return {"sha256": None, "changed_from_sha256": self.source_sha256(), "changed_tensors": changed}

    def adopt_provenance(self, metadata: Mapping[str, str]) -> None:
        """The provenance of the model as it now is (what ``repair fix`` wrote of it): an export of this
        adapter in memory records the repair, not the checkpoint it was loaded from -- as long as its
        tensors stay as they are now (:meth:`changed_since_provenance`)."""
        self._source_metadata = MappingProxyType(provenance.merged(self.source_metadata, dict(metadata)))
        self._provenance_digest = self._tensors_digest()

    def _tensors_digest(self) -> str:
        """A digest of the head and of every tensor that differs from the file, as they are now."""
        h = hashlib.sha256()
        W, b = self.head_params()
        for t in (W, b):
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
        names = self.changed_tensors()
        own = self.model.state_dict() if self.model is not None else {}
        for n in names:
            h.update(n.encode() + b"\0")
            if n in own:
                h.update(own[n].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def changed_since_provenance(self) -> bool:
        """Whether the tensors differ from what :attr:`source_metadata`'s provenance describes: since
        :meth:`adopt_provenance`, or, for the file's own record, since the file was read."""
        if getattr(self, "_provenance_digest", None) is not None:
            return self._tensors_digest() != self._provenance_digest
        return bool(self.changed_tensors())

    def body_hash(self) -> str:
        """Hash of everything but the head, as the weights are *now*: embeddings depend only
        on this (the embedding cache is keyed by it). Equals the file's body hash until
        ``set_tensors`` changes a non-head tensor; then it equals the body hash of the file
        ``save`` writes (so the embeddings cached now serve the saved model too)."""
        heads = set(self.head_tensor_names())
        body = [n for n in self.changed_tensors() if n not in heads]
        if not body:
            return self._file_body_hash
        own = self._require_model().state_dict()
        digests = dict(self._file_digests)
        for n in body:
            now = own[n].detach().cpu()
            as_file = now.to(self._file_values[n].dtype)
            # what save() writes; when that loses precision the model differs from any file: hash it as is
            digests[n] = tensor_digest(as_file if torch.equal(as_file.to(now.dtype), now) else now)
        return combine_digests(digests)

    def network_id(self) -> dict:
        """Everything beside the weights that decides what the body computes (part of the
        embedding cache key, with :meth:`body_hash` and :meth:`preprocess_id`): the family's
        :attr:`build` and, for a torch model, a digest of its module tree (every layer's type and
        settings: an activation, a norm's epsilon) with the torch version. Two checkpoints with the
        same tensors but another architecture setting never share cached embeddings."""
        out: dict = {"build": json.loads(json.dumps(dict(self.build), sort_keys=True, default=str))}
        if self.model is not None:
            out["modules"] = hashlib.sha256(repr(self.model).encode()).hexdigest()
            out["torch"] = torch.__version__
        return out

    def network_record(self) -> Optional[dict]:
        """What built the network beside its weights, for a repaired model's provenance
        (``settings.network``): a bare weights file carries nothing else that says it. A timm
        architecture and its ``model_args``; a ``--factory`` by its name, its ``--model-args`` as given
        (as ``--train`` is recorded) and the digests of its code.
        None where the output carries it itself (a transformers folder's ``config.json``) or the file is
        the network (ONNX)."""
        b = json.loads(json.dumps(dict(self.build), sort_keys=True, default=str))
        if "factory" in b:
            return {k: b[k] for k in ("factory", "model_args", "code", "classes_code", "packages") if k in b}
        if "architecture" in b:
            return {"architecture": b["architecture"], "model_args": b.get("model_args") or {}}
        return None

    @abstractmethod
    def preprocess_id(self) -> dict:
        """JSON-able description of the preprocessing (part of the cache key)."""

    @property
    def input_names(self) -> list[str]:
        """The model's input names in an ONNX graph: what an export of this model names
        its inputs (``pixel_values``; a tokenizer's ``input_ids, attention_mask, ...``), or
        an ONNX model's own graph inputs."""
        if self.modality == "image":
            return ["pixel_values"]
        return tokenizer_input_names(self.tokenizer)

    # ---- data ------------------------------------------------------------
    @abstractmethod
    def collate(self, items: Sequence[Any]) -> Any:
        """Turn raw items (image paths or texts) into one model-ready batch."""

    # ---- compute ---------------------------------------------------------
    @abstractmethod
    def embed_batch(self, batch: Any, device: torch.device) -> torch.Tensor:
        """(B, D) float32 embeddings = the input of the final Linear, eval mode."""

    def logits_batch(self, batch: Any, device: torch.device) -> torch.Tensor:
        """Full forward pass of the (possibly repaired) model, for verification."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "Adapter":
        if self.model is not None:
            self.model.to(device)
        return self

    # ---- tensors ---------------------------------------------------------
    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise BadInput(f"a {self.family} model has no torch module whose tensors could change",
                           self.source)
        return self.model

    def _init_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Record what the weights file holds (called by subclasses once ``head_name`` is set)."""
        skip = set(self.head_tensor_names())
        self._tensor_digests = {n: tensor_digest(t) for n, t in tensors.items()}   # every tensor, as read
        self._file_digests = {n: d for n, d in self._tensor_digests.items() if n not in skip}
        self._file_body_hash = combine_digests(self._file_digests)
        self._file_dtypes = {n: t.dtype for n, t in tensors.items()}
        # the file's identity, from the bytes that hold what was read: hashed now, and checked to hold
        # exactly these tensors (and the metadata read with them) -- a file saved over since it was read
        # is refused, never named for weights it does not hold
        self._source_sha = loaded_file_sha256(self.weights_path, tensors, dict(self._source_metadata))
        # safetensors' tensors map the file (a file rewritten in place shows through them): the model's
        # own copy, what was loaded, must hold them too (a tensor the model ties to another: its group's)
        model = getattr(self, "model", None)
        if model is not None:
            import numpy as np

            own, tied = model.state_dict(), self.tensor_aliases()
            for n, t in tensors.items():
                m = own.get(n)
                if m is None or n in tied or m.device.type == "meta" or tuple(m.shape) != tuple(t.shape):
                    continue
                m = m.detach().cpu()
                if not (np.array_equal(_as_bytes(m), _as_bytes(t)) if m.dtype == t.dtype else _same_values(m, t)):
                    raise changed_while_read(self.weights_path)
        self._file_names = frozenset(tensors)
        self._file_values: dict[str, torch.Tensor] = {}   # the file's value of every tensor set so far
        model = getattr(self, "model", None)                # the dtype each tensor was loaded in
        self._loaded_dtypes = ({n: t.dtype for n, t in model.state_dict().items()} if model is not None else {})

    def head_tensor_names(self) -> list[str]:
        """The head's tensor names (weight, bias) in the model's state dict / the file, then every other
        name the model holds the same tensors under (:meth:`tensor_aliases`: a head reachable twice,
        ``self.classifier = self.fc``, is the head under either name)."""
        if self.head_name is None:
            return []
        names = [f"{self.head_name}.weight", f"{self.head_name}.bias"]
        aliases = self.tensor_aliases()
        return names + [a for n in names for a in aliases.get(n, ()) if a not in names]

    def tensor_aliases(self) -> dict[str, tuple[str, ...]]:
        """Each state-dict name the model holds one tensor under with another name (one module reachable
        under two names, tied weights): name -> the other names of its group. A group is the names whose
        tensors in ``state_dict(keep_vars=True)`` are one memory (same storage, offset, shape, strides and
        dtype). The one home of that rule: ``set_tensors`` and ``adopt_changes_in_place`` register a
        change under every name of its group, so ``changed_tensors``, ``body_hash`` and ``save`` (every
        name gets the new value; a plain ``load_state_dict`` keeps the later key) count and write it
        under all of them."""
        if self.model is None:
            return {}
        groups: dict[tuple, list[str]] = {}
        for n, t in self.model.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
                key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                       tuple(t.stride()), t.dtype)
                groups.setdefault(key, []).append(n)
        return {n: tuple(m for m in g if m != n) for g in groups.values() if len(g) > 1 for n in g}

    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy new values into the model's parameters / buffers by state-dict name. Shapes
        must match; the model's dtype is kept, and each value is rounded to the file's dtype first
        (what ``save`` writes is what is measured and exported). All names are checked before
        anything changes. ``save`` writes every tensor whose value now differs from the file."""
        own = self._require_model().state_dict(keep_vars=True)
        heads = set(self.head_tensor_names())
        # a BatchNorm batch count the file does not store stays unwritten (a plain load fills it)
        tensors = {n: v for n, v in tensors.items()
                   if n in self._file_names or n in heads or not unstored_count(self._require_model(), n)}
        for name, value in tensors.items():
            if name not in own:
                raise BadInput(f"the model has no tensor {name!r}", self.source)
            if name not in self._file_names and name not in heads:
                raise BadInput(f"tensor {name!r} is not stored under that name in the weights file, "
                               "so a new value could not be written back", self.weights_path)
            if tuple(value.shape) != tuple(own[name].shape):
                raise RepairError(f"new {name} has shape {tuple(value.shape)}, expected {tuple(own[name].shape)}")
        self._remember_file_values([n for n in tensors if n not in self._file_values], own)
        with torch.no_grad():
            for name, value in tensors.items():
                # through the file's dtype: the model in memory (measured, exported) is the one ``save``
                # writes, also for a float16 / bfloat16 checkpoint
                v = torch.as_tensor(value).detach().to(self._file_values[name].dtype)
                own[name].copy_(v.to(device=own[name].device, dtype=own[name].dtype))

    def _remember_file_values(self, names: Sequence[str], own: dict[str, torch.Tensor]) -> None:
        # a tensor the model holds under other names too changes under all of them (tensor_aliases)
        aliases = self.tensor_aliases()
        names = list(dict.fromkeys([*names, *(a for n in names for a in aliases.get(n, ())
                                             if a in self._file_names and a not in self._file_values)]))
        in_file = [n for n in names if n in self._file_names]
        self._file_values.update(read_tensors(self.weights_path, in_file))
        for n in names:
            if n not in self._file_values:  # a head bias the file does not have: it was zero
                self._file_values[n] = torch.zeros(own[n].shape, dtype=own[n].dtype)

    def adopt_changes_in_place(self) -> list[str]:
        """Tensors changed in place since the model was loaded, outside :meth:`set_tensors` (a caller's
        own training loop or ``no_grad`` edit, BatchNorm statistics a train-mode forward moved): each is
        registered as :meth:`set_tensors` registers a change, so :meth:`body_hash` (the embedding cache
        key), :meth:`identity` (what the figures name) and ``save`` / export account for it -- never the
        file's cached embeddings or the file's sha256 for weights that are not the file's. Compares every
        tensor the file holds that is not registered yet with the digest taken when the file was read
        (only a changed one is read back); the public functions call it on a model they are given loaded
        (:func:`repair.rules.model_arg`). Returns the names found changed."""
        if self.model is None or not getattr(self, "_file_names", None):
            return []
        own = self.model.state_dict()
        cast = sorted(n for n, d in getattr(self, "_loaded_dtypes", {}).items() if n in own and own[n].dtype != d)
        if cast:            # a model cast after loading computes in another precision than the one measured
            n = cast[0]     # and written (values the cast kept would even pass for the file's): refused
            raise BadInput(f"the model's tensors were cast after it was loaded ({n} is {str(own[n].dtype)[6:]}, "
                           f"loaded as {str(self._loaded_dtypes[n])[6:]}): figures, the cache and exports describe "
                           "the model as loaded; cast it back, or save it in that precision and load that file",
                           self.source)
        # every tensor not registered yet is compared with the file's, by the digests taken when it was
        # read (torch's in-place version counters would miss writes through .data, numpy and fused
        # optimizer steps; reading the file back would fail once it is gone): only one that differs is
        # read back, for the value save() and body_hash() compare with
        moved = []
        for n in sorted(x for x in self._file_names if x in own and x not in self._file_values):
            now = own[n].detach().cpu()
            as_file = now.to(self._file_dtypes[n])
            if tensor_digest(as_file) != self._tensor_digests[n] or not torch.equal(as_file.to(now.dtype), now):
                moved.append(n)
        if not moved:
            return []
        try:
            stored = read_tensors(self.weights_path, moved)
        except OSError as e:
            raise BadInput(f"the model's tensors changed since it was loaded and its weights file cannot be read "
                           f"to tell which ({e.strerror or e}): load it again", self.weights_path) from None
        rewritten = sorted(n for n in moved if n in stored and tensor_digest(stored[n]) != self._tensor_digests[n])
        if rewritten:       # saved over since it was read: the file no longer says what was loaded
            raise BadInput(f"the weights file changed since the model was loaded (tensor {rewritten[0]!r} differs "
                           "from the value read then) and the model was changed in place: load it again",
                           self.weights_path)
        # compared where both are exact (a model cast to bfloat16 in memory is not the float32 file's, though
        # the file's values rounded to bfloat16 are its values): a changed dtype that changed a value counts
        changed = [n for n in moved if n in stored and not _same_values(own[n].detach().cpu(), stored[n])]
        self._file_values.update({n: stored[n] for n in changed})
        with torch.no_grad():       # as set_tensors: through the file's dtype, so the model measured and
            for n in (m for m in moved if m in stored):     # exported is the one save writes (a float32
                # edit of a bfloat16 file; one that rounds back to the file's value too)
                if own[n].dtype != stored[n].dtype and own[n].is_floating_point() and stored[n].is_floating_point():
                    own[n].copy_(own[n].to(stored[n].dtype).to(own[n].dtype))
        return changed

    @contextlib.contextmanager
    def inference(self):
        """The model in inference mode (every module ``eval()``) while embeddings or logits are computed,
        exported or verified; then as the caller left it (each module's mode restored). The one home of
        that rule: a model left in train mode would move BatchNorm statistics and drop activations."""
        modes = [(m, m.training) for m in self.model.modules()] if self.model is not None else []
        try:
            if self.model is not None:
                self.model.eval()
            with float32_default():          # a tensor the forward makes without a dtype is float32 too
                yield self
        finally:
            for m, training in modes:
                m.training = training

    def changed_tensors(self) -> list[str]:
        """Sorted state-dict names whose current values differ from the file's."""
        if self.model is None or not self._file_values:
            return []
        own = self.model.state_dict()
        return sorted(n for n, orig in self._file_values.items() if not _same_values(own[n].detach().cpu(), orig))

    def trainable(self):
        """The model set up for fine-tuning (model-level repairs)."""
        raise BadInput(f"{self.family} models cannot be fine-tuned: model-level repairs need a timm, "
                       "transformers or torch checkpoint", self.source)

    # ---- head ------------------------------------------------------------
    def head_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.head is not None
        W = self.head.weight.detach().float().cpu().clone()
        b = (self.head.bias.detach().float().cpu().clone() if self.head.bias is not None
             else torch.zeros(W.shape[0]))
        return W, b

    def set_head(self, W: torch.Tensor, b: torch.Tensor) -> None:
        """``set_tensors`` on the head's weight and bias (a bias is added to a bias-free head
        when ``b`` is not zero)."""
        if self.head is None or self.head_name is None:
            raise RepairError(f"this {self.family} model has no linear head to set")
        shape = tuple(self.head.weight.shape)
        W, b = new_head(W, b, shape, self.source)
        if self.head.bias is None and torch.any(b != 0):
            w = self.head.weight
            self.head.bias = nn.Parameter(torch.zeros(shape[0], dtype=w.dtype, device=w.device))
        new = {f"{self.head_name}.weight": W}
        if self.head.bias is not None:
            new[f"{self.head_name}.bias"] = b
        self.set_tensors(new)

    @property
    def head_changed(self) -> bool:
        return bool(set(self.changed_tensors()) & set(self.head_tensor_names()))

    # ---- output ----------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The weights file's tensors with every changed tensor replaced by its current value,
        in the file's dtype; the others are the file's, bit for bit."""
        tensors, _ = load_state_dict_file(self.weights_path, allow_pickle=True)
        # the unchanged tensors are written from the file: it must still hold what was loaded (a training
        # script that saved its next epoch over it since would give the output tensors never measured)
        known = getattr(self, "_tensor_digests", None)
        if known is not None and (set(tensors) != set(known)
                                  or any(tensor_digest(t) != known[n] for n, t in tensors.items())):
            raise BadInput("the weights file changed since the model was loaded (saved over?): its tensors are "
                           "not the ones measured; load it again", self.weights_path)
        changed = self.changed_tensors()
        extra = [n for n in changed if n not in tensors]
        if extra:
            raise BadInput(f"the repaired model has {', '.join(extra)}, a tensor this checkpoint's architecture does "
                           "not have (a bias-free head given a bias): it could not be loaded back", self.source)
        if changed:
            own = self._require_model().state_dict()
            heads = self.head_tensor_names()
            for n in changed:
                like = tensors.get(n, tensors.get(heads[0]) if heads else None)
                dtype = like.dtype if like is not None else own[n].dtype
                tensors[n] = own[n].detach().cpu().to(dtype).contiguous()
        return tensors

    def save(self, out: Path, metadata: dict[str, str]) -> Path:
        """Write the model in the checkpoint's own format to ``out`` (a path that does not
        exist yet; the caller renames it into place): a folder checkpoint as a copy of the
        folder with ``model.safetensors`` rewritten, a bare file as one safetensors file.
        Only changed tensors differ from the source. Returns the weights file written."""
        out = Path(out)
        if self.source.is_dir():
            copy_folder_except(self.source, out, self.weights_path)
            self._update_config(out / "config.json")
            target = out / "model.safetensors"
        else:
            target = out
        save_safetensors(self.state_tensors(), target,
                         provenance.merged(self.source_metadata, {**self.save_metadata_defaults, **metadata}))
        return target

    #: entries the output folder's config.json takes over the source's (the family's loader sets them:
    #: timm's ``model_args`` given with ``--model-args``), so a plain load builds the network measured
    config_updates: Mapping[str, Any] = MappingProxyType({})

    def _update_config(self, path: Path) -> None:
        if not self.config_updates or not path.is_file():
            return
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg.update(self.config_updates)
        path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    def check_save(self) -> Optional[str]:
        """Refuse now (:class:`BadInput` naming the entry) what ``save`` would refuse to copy from a
        folder checkpoint: a symlink leaving the folder, a FIFO, device or socket. Writes nothing;
        call it before any work when the run will write the model. A head without a bias is refused
        too: every repair fits one, and the architecture could not load it back. Returns the notice
        naming the source's weights files in other formats that the output leaves out
        (:func:`left_out_notice`), or None."""
        notice = None
        if Path(self.source).is_dir():
            left: list = []
            folder_copy_plan(self.source, self.weights_path, left)
            notice = left_out_notice(Path(self.source), left)
        if self.head is not None and self.head.bias is None:
            raise BadInput(f"the classifier head {self.head_name} has no bias, and a repaired head has one: the "
                           "repaired weights could not be loaded into this architecture (give a model whose head "
                           "has a bias, or its ONNX export if its head reads one feature vector per sample: "
                           f"{POOLS_AFTER_HEAD})", self.source)
        tied = self.head_tied_elsewhere()
        if tied:
            raise BadInput(f"the classifier head's tensor is also {tied} (tied weights): a repaired head would change "
                           "that module too, and with it the features the head was fitted on", self.source)
        return notice

    def head_tied_elsewhere(self) -> Optional[str]:
        """A name the head's tensors also have in another module than the head (weights tied to an input
        embedding), or None. A module reachable under two names (``self.classifier = self.fc``) is the head
        under both (:meth:`tensor_aliases`)."""
        if self.model is None or self.head is None or self.head_name is None:
            return None
        aliases = self.tensor_aliases()
        for n in (f"{self.head_name}.weight", f"{self.head_name}.bias"):
            for other in aliases.get(n, ()):
                owner = other.rsplit(".", 1)[0] if "." in other else ""
                try:
                    module = self.model.get_submodule(owner)
                except AttributeError:
                    return other
                if module is not self.head:
                    return other
        return None

    def export_proto(self, metadata: dict[str, str]):
        """The model as an ONNX ModelProto with ``metadata`` merged in. Only a model that is
        an ONNX graph (``exports_onnx_natively``) has one; the others go through
        ``repair.export.export_onnx``."""
        raise NotImplementedError(f"a {self.family} model is not an ONNX graph; export it with "
                                  "repair.export.export_onnx")

    def describe(self) -> dict:
        W, _ = self.head_params()
        return {"family": self.family, "modality": self.modality, "source": self.source.name,
                "num_classes": len(self.class_names), "embedding_dim": int(W.shape[1]),
                "class_names": list(self.class_names)}

    def input_keys(self, items: Sequence[Any], max_length: Optional[int] = None) -> Optional[list]:
        """Each item as the model reads it, hashed, where that is known without running the model: a
        text's token ids (after the tokenizer's normalisation and truncation: two texts that differ only
        in what the tokenizer drops are one sample to the model). None where it is not (images: decoding
        them is what it would cost). :func:`repair.api.read_as_same` widens the byte-level overlap of
        evaluation and repair data with it. Every family (an ONNX text model too: the tokenizer beside it).
        ``max_length``: truncated at that length instead of the model's (how another run read them)."""
        tok = getattr(self, "tokenizer", None)
        length = max_length if max_length is not None else getattr(self, "max_length", None)
        if tok is None or getattr(self, "modality", None) != "text" or not items or length is None:
            return None
        from .text import tokenize_texts

        items, keys = list(items), []
        for start in range(0, len(items), KEY_CHUNK):       # a chunk at a time: one call over the whole set
            ids = tokenize_texts(tok, items[start:start + KEY_CHUNK], int(length))["input_ids"]   # held it all
            keys += [hashlib.sha256(json.dumps([int(t) for t in x]).encode()).hexdigest() for x in ids]
        return keys


@contextlib.contextmanager
def float32_default():
    """torch's default dtype float32 while a network is built, run or trained, whatever the caller set
    (a notebook's ``torch.set_default_dtype(torch.float64)``): the models and inputs are float32, and a
    tensor a layer makes without a dtype would otherwise promote its activations. The caller's default
    is restored after. The one home of that rule (:func:`repair.adapters.load_model`,
    :meth:`Adapter.inference`, :func:`repair.pipeline.fix_model`)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether tensors ``a`` and ``b`` (of any dtypes) hold the same values: floating ones compared in float64,
    which holds every float16, bfloat16 and float32 value exactly, so neither is rounded to the other's dtype."""
    if a.shape != b.shape:
        return False
    if a.is_floating_point() or b.is_floating_point():
        return torch.equal(a.to(torch.float64), b.to(torch.float64))
    return torch.equal(a, b.to(a.dtype))


class TorchModelAdapter(Adapter):
    """An adapter whose model is a torch ``nn.Module`` (timm, transformers, factories):
    its tensors can be changed and trained."""

    can_train = True

    def trainable(self):
        """The network prepared for model repairs (:class:`repair.modelrepair.trainable.TrainableModel`)."""
        from ..modelrepair.trainable import TrainableModel

        return TrainableModel(self)

    def capture_head_input(self, forward: Callable[[], Any]) -> torch.Tensor:
        """Run ``forward()`` and return the head's input as a (batch, features) float32 matrix."""
        cap = HeadCapture(self.head)
        try:
            forward()
        except BadInput:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as e:
            # (AssertionError: timm's fixed-size networks assert their input size, "Input height (64)
            # doesn't match model (224)": the data's preprocessing and the network do not fit)
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise forward_failure(e, self.source) from None
        finally:
            cap.remove()
        emb = cap.value
        if emb is None or emb.dim() != 2:
            raise BadInput(f"the head's input is not a (batch, features) matrix "
                           f"(got {None if emb is None else tuple(emb.shape)})"
                           + (f": {POOLS_AFTER_HEAD}" if emb is not None and emb.dim() == 3 else ""), self.source)
        return emb.float()


def forward_failure(e: BaseException, source, runtime: str = "") -> BadInput:
    """What a network that itself fails on the data is told (a head fed the wrong shape, a layer that
    cannot take these images or tokens; a torch module's forward pass, an ONNX graph run by ``runtime``):
    the checkpoint and the data do not fit, not our bug -- :class:`BadInput` naming ``source`` and the
    failure's first line."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    what = f"{runtime} {type(e).__name__}" if runtime else type(e).__name__
    return BadInput(f"the model's forward pass fails on this data ({what}: {msg[:400]})", source)


def read_tensors(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Some tensors of a state-dict file (safetensors: only those are read)."""
    if not names:
        return {}
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in names}
    tensors, _ = load_state_dict_file(path, allow_pickle=True)
    return {n: tensors[n] for n in names}


def unstored_count(model: torch.nn.Module, name: str) -> bool:
    """Whether state-dict entry ``name`` is a BatchNorm's ``num_batches_tracked``: the one tensor a file may
    leave out (torch's strict load fills it with its default, as timm's loader does)."""
    owner, _, leaf = name.rpartition(".")
    if leaf != "num_batches_tracked":
        return False
    try:
        m = model.get_submodule(owner)
    except AttributeError:
        return False
    return isinstance(m, torch.nn.modules.batchnorm._NormBase)


def check_kinds(own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], where) -> None:
    """:class:`BadInput` naming the first tensor the file stores as integers or booleans where the
    model's is floating-point (a head stored as int64 or bool): loaded, its values would be cast, and
    the repaired values written back in the file's type would be truncated or turned to True/False;
    as 8-bit floats; or as a wider float holding values the model's type cannot (float64 rounded to
    float32: the network measured would not be the file's)."""
    for name, t in tensors.items():
        mine = own.get(name)
        if isinstance(t, torch.Tensor) and isinstance(mine, torch.Tensor) and mine.is_floating_point() \
                and not t.is_floating_point():
            raise BadInput(f"tensor {name!r} is stored as {str(t.dtype).replace('torch.', '')}, the model's is "
                           f"floating-point ({str(mine.dtype).replace('torch.', '')}): its values would not survive "
                           "loading and repair", where)
        if isinstance(t, torch.Tensor) and isinstance(mine, torch.Tensor) and t.is_floating_point() \
                and t.element_size() == 1 and mine.element_size() > 1:
            # float8: the model computes in its own type, and a repaired tensor written back in 8 bits keeps
            # 2 or 3 bits of mantissa -- the written model would not be the one measured
            raise BadInput(f"tensor {name!r} is stored as {str(t.dtype).replace('torch.', '')}: 8-bit floats are "
                           "not read (a repaired value written back in 8 bits would not be the one measured); "
                           "save the checkpoint as float16, bfloat16 or float32", where)
        if isinstance(t, torch.Tensor) and isinstance(mine, torch.Tensor) and t.is_floating_point() \
                and mine.is_floating_point() and t.element_size() > mine.element_size() \
                and not torch.equal(t.to(mine.dtype).to(t.dtype), t):
            # a float64 file read by a float32 model: loaded, its values are rounded, and the model measured
            # (and the one written back) is not the file's
            raise BadInput(f"tensor {name!r} is stored as {str(t.dtype).replace('torch.', '')} with values the "
                           f"model's {str(mine.dtype).replace('torch.', '')} cannot hold: the model measured and "
                           f"repaired would not be the file's; save the checkpoint as "
                           f"{str(mine.dtype).replace('torch.', '')}", where)


def check_finite(tensors: Mapping[str, torch.Tensor], where) -> None:
    """:class:`BadInput` naming the first tensor holding NaN or infinite values (any floating
    parameter or buffer) and ``where`` (the weights file): such a model's figures are meaningless
    (a NaN in a BatchNorm buffer makes every prediction the same class)."""
    for name, t in tensors.items():
        if not (isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())):
            continue
        if t.is_floating_point() and t.element_size() == 1:
            t = t.float()               # float8: torch has no isfinite for it (widening keeps NaN and inf)
        if not bool(torch.isfinite(t).all()):
            k = int((~torch.isfinite(t)).sum())
            raise BadInput(f"tensor {name!r} holds {k} non-finite value(s) (NaN or infinite); the model "
                           "cannot be evaluated or repaired", where)


def config_unreadable(folder: Path) -> bool:
    """A folder with a ``config.json`` that is not a JSON object, or not a readable file (a folder, a
    FIFO, no permission): the loader that claims it says so."""
    cfg = Path(folder) / "config.json"
    if not (cfg.exists() or cfg.is_symlink()):
        return False
    try:
        read_json(cfg)
    except BadInput:
        return True
    return False


def _special(p: Path) -> bool:
    """Neither a regular file nor a folder (symlinks followed): a FIFO, device, socket."""
    try:
        mode = p.stat().st_mode
    except OSError:            # a dangling symlink or a loop: nothing to read
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_folder_entry(entry: Path, root: Path) -> None:
    """The one rule for every entry of a model folder, applied when the folder is loaded
    (:func:`check_model_folder`: ``eval``, ``fix``, ``export``, ``zoo``) and when it is copied
    (:func:`folder_copy_plan`): a symlink whose target lies outside ``root`` (the folder, resolved)
    -- the weights, the config or any other file -- and a FIFO, device or socket (or a symlink to
    one) are :class:`BadInput` naming the entry. Only what the folder holds is read or copied."""
    entry = Path(entry)
    if _special(entry):
        raise BadInput("a FIFO, device or socket in the model folder (only regular files are read or "
                       "copied); remove it", entry)
    if entry.is_symlink():
        target = Path(os.path.realpath(entry))      # never raises; a dangling link: where it would lead
        if not target.is_relative_to(root):
            # a Hugging Face cache snapshot (models--org--name/snapshots/<rev>/) is links into its blobs/
            hub = target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")
            how = (f"a Hugging Face cache snapshot links its files into {target.parent}: copy it with "
                   f"`cp -rL {root} DIR` (the files, not the links) and give DIR" if hub else
                   "replace it by the file (`cp -rL` copies a folder with the files its links lead to) or "
                   "remove it")
            raise BadInput(f"a symlink in the model folder leads outside it (to {target}); only the folder's "
                           f"own files are read or copied: {how}", entry)


def files_beside(folder: Path, names: Sequence[str]) -> list[Path]:
    """The files ``names`` of ``folder`` that exist -- what is read beside a model file (an ONNX file's
    or a ``--factory`` model's preprocessing, config and tokenizer) --, each checked by
    :func:`check_folder_entry` against ``folder`` before anything reads it: a symlink leading out of
    the folder, a FIFO or device, is :class:`BadInput` naming it, as in a model folder."""
    folder = Path(folder)
    root = folder.resolve()
    out = []
    for name in names:
        entry = folder / name
        if entry.exists() or entry.is_symlink():
            check_folder_entry(entry, root)
            if entry.is_file():
                out.append(entry)
    return out


def check_model_folder(folder: Path) -> list[Path]:
    """Every regular file of a model folder (recursively, hidden entries skipped as ``save``
    skips them), resolved, each entry checked by :func:`check_folder_entry` (a symlink leaving the
    folder: reading it would read another file than the folder's; a FIFO or device: reading it could
    block or never end)."""
    folder = Path(folder)
    root = folder.resolve()
    out = []
    for entry in _walk(folder):
        check_folder_entry(entry, root)
        if entry.is_file():
            out.append(entry.resolve())
    return out


def _own_hidden(name: str) -> bool:
    """A hidden name a model folder may hold that is not the model's: repair's own records and locks
    (``.repair-*``) and temporaries (``*.tmp``, ``.NAME.work-*``)."""
    return name.startswith(".repair") or name.endswith(".tmp") or ".work-" in name


def _walk(folder: Path):
    """The entries under ``folder`` a copy of it holds, not descending into symlinked folders: hidden
    files too (a Hugging Face folder's ``.gitattributes``: its LFS rules), but not hidden folders (a
    ``.git`` or ``.cache`` holds the unrepaired weights) nor :func:`_own_hidden` names."""
    for item in sorted(folder.iterdir()):
        if item.name.startswith(".") and (_own_hidden(item.name) or item.is_dir()):
            continue
        yield item
        if item.is_dir() and not item.is_symlink():
            yield from _walk(item)


def folder_copy_plan(src: Path, skip: Optional[Path] = None, left_out: Optional[list] = None) -> list[Path]:
    """The entries of ``src`` that :func:`copy_folder_except` copies, checked. Left out: hidden folders
    and repair's own hidden files (:func:`_walk`), ``skip``, every other weights file (the source's weights in another format, an ONNX export of
    them, which would ship the unrepaired model inside the repaired one) and the folder's own repair
    artifacts (:func:`repair.rules.artifacts_output`: the record of the run that made ``src``, not
    part of the model; a new run writes its own), and any folder in it that is an output repair wrote (it
    holds its :data:`repair.io.OUTPUT_RECORD`: a bare weights file's artifacts folder beside it). Every entry, copied or not, passes
    :func:`check_folder_entry`; a copied symlink that is broken or leads to a folder is
    :class:`BadInput` naming it too. ``left_out``: gets the weights files left out
    (:func:`repair.rules.source_weights_copy`), for the run's notice; a folder left empty by them is
    left out too. Writes nothing."""
    from ..rules import artifacts_output, source_weights_copy

    src = Path(src)
    root = src.resolve()
    skip_r = Path(skip).resolve() if skip is not None else None
    old_artifacts = artifacts_output(src, src)
    plan, dropped, outputs = [], [], []
    for item in _walk(src):
        check_folder_entry(item, root)
        if skip_r is not None and item.resolve() == skip_r:
            continue
        if item == old_artifacts or old_artifacts in item.parents or any(d in item.parents for d in outputs):
            continue      # the previous run's record: the new output holds only this run's
        if item.is_dir() and not item.is_symlink() and (item / OUTPUT_RECORD).is_file():
            # another output repair wrote into the folder (a bare weights file's artifacts folder, beside it):
            # not part of the model, and its files would be recorded as this run's
            outputs.append(item)
            continue
        if any(d in item.parents for d in dropped):
            continue      # inside a weights package left out
        if source_weights_copy(item):
            dropped.append(item)     # the source's weights in another format (or an export of them)
            continue
        if item.is_symlink():
            try:
                target = item.resolve(strict=True)
            except (OSError, RuntimeError):
                raise BadInput("a broken symlink in the model folder; remove it", item) from None
            if target.is_dir():
                raise BadInput("a symlink to a folder in the model folder; replace it by the folder", item)
        plan.append(item)
    if dropped:                   # a folder that held only what was left out (an onnx/ export) goes too
        held = {p for item in plan if not item.is_dir() for p in item.parents}
        plan = [item for item in plan
                if not (item.is_dir() and item not in held and any(item in d.parents for d in dropped))]
    if left_out is not None:
        left_out.extend(dropped)
    return plan


def left_out_notice(src: Path, left_out: list) -> Optional[str]:
    """The run's notice naming the weights files of the source folder its output leaves out, or None."""
    if not left_out:
        return None
    names = [Path(p).relative_to(src).as_posix() for p in left_out]
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    return (f"notice: left out of the output folder: {shown} -- weights files (or pickles) of the source, "
            "in formats repair does not rewrite: they hold the source's weights, not necessarily this output's "
            "(the output's are in model.safetensors; repair export writes ONNX)")


def copy_folder_except(src: Path, dst: Path, skip: Path) -> None:
    """Create ``dst`` with every entry of ``src`` but ``skip`` (the weights file that is
    rewritten), hidden folders and repair's own hidden files, as regular files and folders only. A symlink whose target lies
    outside ``src`` (a secret, ``/dev/zero``) or a FIFO, device or socket is :class:`BadInput`
    naming it, before anything is written: an output holds only what the source folder holds as
    regular files."""
    import shutil

    src, dst = Path(src), Path(dst)
    plan = folder_copy_plan(src, skip)
    dst.mkdir(parents=True)
    for item in plan:
        rel = item.relative_to(src)
        if item.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item, dst / rel)
            shutil.copystat(item, dst / rel)
            # the copy is the output's, writable by its owner: a read-only source file (git-annex and DVC
            # store files as 0444) would else refuse the config.json or tokenizer_config.json update
            mode = os.stat(dst / rel).st_mode
            if not mode & stat.S_IWUSR:
                os.chmod(dst / rel, stat.S_IMODE(mode) | stat.S_IWUSR)


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` (a model's config.json), or :class:`BadInput` naming it: missing,
    a folder, unreadable (permissions), a FIFO or device (never opened blocking), not JSON."""
    if Path(path).is_dir():
        raise BadInput("is a folder, not a JSON file", path)
    try:
        with open_regular(path, "JSON") as f:
            data = parse_json(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"not valid JSON ({e})", path) from None
    except OSError as e:              # a read error after opening
        raise BadInput(f"cannot read the file ({e.strerror or e})", path) from None
    if not isinstance(data, dict):
        raise BadInput("expected a JSON object", path)
    return data
