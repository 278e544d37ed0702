"""Batched embedding extraction with an on-disk cache.

The cache key is the hash of the model's body as it is now (``Adapter.body_hash``:
every weight but the head, so a repaired head does not change embeddings, while
a changed body tensor does), how the network was built beside its weights
(``Adapter.network_id``: architecture arguments, config, module tree), the data's
fingerprint and the preprocessing (a tokenizer by its content), so a second run
over the same data skips the forward pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ._version import __version__
from .adapters.base import Adapter
from .adapters.text import NoTokens
from .data import DEFAULT_MAX_PIXELS, RepairData
from .errors import BadInput
from .io import parse_json

CACHE_FORMAT = 7      # 2: every entry carries the sha256 of its tensor, verified on read; 3: the key
                      # holds the network's build (Adapter.network_id) and the tokenizer's content;
                      # 4: an image set's entry also holds each image's input digest (Embeddings.inputs);
                      # 5: the key holds the batch size (a batch's rounding depends on it: an entry made
                      # with another --batch-size differs in its last bits); 6: on the CPU, the key
                      # holds the thread count the forward pass runs on (a convolution's sums are split
                      # among the threads: 1 and 2 threads give embeddings a few last bits apart);
                      # 7: the key holds the code that computes embeddings (:func:`code_key`)
DEFAULT_BATCH_SIZE = 64

#: installed libraries whose code reads a sample or runs a network beside torch (whose version
#: :meth:`Adapter.network_id` holds): their versions are in every cache key (the list's home is provenance)
from .provenance import CODE_LIBRARIES  # noqa: E402
_CODE_KEY: dict = {}


def code_key() -> dict:
    """The code that computes embeddings beside the model, for every cache key: this package's sources
    (``code.sources_sha256`` of the provenance, :func:`repair.provenance.code_identity`: an upgrade or a
    local change of repair's reading or preprocessing is never served the old code's numbers) and the
    installed versions of :data:`CODE_LIBRARIES` (read from their metadata: nothing is imported for it).
    Computed once per process."""
    if not _CODE_KEY:
        from .provenance import code_identity, library_versions

        _CODE_KEY.update({"repair": __version__, "sources": code_identity()["sources_sha256"],
                          "libraries": library_versions()})
    return dict(_CODE_KEY)


def default_cache_dir() -> Path:
    env = os.environ.get("REPAIR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "repair" / "embeddings"


def check_device(device: str) -> str:
    """``device`` if this machine has it, else :class:`BadInput` (checked before any work)."""
    if device == "auto":
        return device
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise BadInput(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"--device {device}: no CUDA device is available here (use cpu or auto)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise BadInput(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise BadInput(f"--device {device}: MPS is not available here (use cpu or auto)")
    elif d.type != "cpu":
        raise BadInput(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Embeddings:
    X: torch.Tensor            # (N, D) float32, CPU
    key: str
    from_cache: bool
    seconds: float             # time spent extracting (or loading from cache)
    device: str
    #: (N, 16) uint8, each sample's model input hashed: equal rows are one sample to the model, whatever
    #: their bytes (a picture saved in two formats; a text in upper case to a lowercasing tokenizer). An
    #: image's preprocessed tensor (cached with the embeddings); a text's token ids
    #: (:func:`text_input_digests`, tokenized again each run: cheap); None where the adapter cannot say
    inputs: Optional[torch.Tensor] = None


def input_digests(batch) -> torch.Tensor:
    """(B, 16) uint8: the first 16 bytes of the sha256 of each row of an image batch (a tensor)."""
    import numpy as np

    a = batch.detach().cpu().contiguous().numpy() if torch.is_tensor(batch) else np.ascontiguousarray(batch)
    return torch.tensor([list(hashlib.sha256(a[i].tobytes()).digest()[:16]) for i in range(a.shape[0])],
                        dtype=torch.uint8).reshape(a.shape[0], 16)


def text_input_digests(adapter: Adapter, data: RepairData) -> Optional[torch.Tensor]:
    """(N, 16) uint8: the first 16 bytes of each text's :meth:`input_keys` (its token ids as the model
    reads them, hashed); None for other data or an adapter that cannot tell."""
    keys_of = getattr(adapter, "input_keys", None)
    keys = keys_of(data.items) if keys_of is not None and data.modality == "text" and len(data) else None
    if keys is None:
        return None
    return torch.tensor([list(bytes.fromhex(k)[:16]) for k in keys], dtype=torch.uint8).reshape(len(keys), 16)


def forward_threads() -> int:
    """The CPU threads a forward pass runs on: torch's intra-op count (onnxruntime's embedding sessions
    are given the same, :meth:`repair.adapters.onnx_adapter.OnnxAdapter._session`); the one home of the
    count the embedding cache key holds."""
    return int(torch.get_num_threads())


def cache_key(adapter: Adapter, data: RepairData, device: Optional[torch.device] = None,
              batch_size: int = DEFAULT_BATCH_SIZE) -> str:
    """The cache entry of ``adapter``'s embeddings of ``data``. An image set read under another pixel
    limit than the default (``--max-pixels``) has its own entries: a hit decodes no image, so an entry
    made under one limit must not serve a run whose limit would refuse one of its images. Embeddings
    computed on another kind of device than the CPU (``device``: CUDA's kernels round differently) have
    their own entries too, so a ``--device cpu`` run reproduces a CPU run's figures (the CPU's keys are
    the same as before devices were in the key). The ``batch_size`` the embeddings are computed with
    is in every key: a batch's sums round according to its size (and a text batch's padding), so an
    entry made with another ``--batch-size`` differs in its last bits, and a run must give the same
    bytes whatever an earlier run left in the cache. On the CPU so is the thread count the forward pass
    runs on (:func:`forward_threads`), for the same reason: a run on one thread (``repair zoo``'s
    ``--cpus-per-model 1``, ``OMP_NUM_THREADS=1``) is never served a two-thread run's embeddings, and the
    threads its provenance records are those its embeddings were computed on."""
    desc = {"format": CACHE_FORMAT, "body": adapter.body_hash(), "data": data.fingerprint(),
            "preprocess": adapter.preprocess_id(), "family": adapter.family,
            "network": adapter.network_id(), "batch_size": int(batch_size), "code": code_key()}
    if data.modality == "image" and int(data.max_pixels) != DEFAULT_MAX_PIXELS:
        desc["max_pixels"] = int(data.max_pixels)
    if device is not None and torch.device(device).type != "cpu":
        desc["device"] = torch.device(device).type
    else:
        desc["threads"] = forward_threads()
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, disable=not enabled,
                leave=False, dynamic_ncols=True)


@torch.no_grad()
def extract(adapter: Adapter, data: RepairData, *, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto",
            cache_dir: Optional[Path] = None, use_cache: bool = True, progress: bool = True) -> Embeddings:
    t0 = time.perf_counter()
    dev = resolve_device(device)
    key = cache_key(adapter, data, dev, batch_size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache_dir / f"{key}.safetensors"
    if data.modality == "image":     # the pixel limit the data was read with (a model repair's own reads too)
        adapter.max_pixels = data.max_pixels
    image = data.modality == "image"
    # lexists: False also where the folder cannot be entered (the write then warns, as a read-only one does)
    if use_cache and os.path.lexists(cache_file):
        # an image entry holds its input digests; a text entry those its model can tell (cached too: hashing
        # a text set's tokens is a second tokenization, 8.3 s of a 13.7 s warm run of 8,000 long texts)
        X, inputs, why = _read_cache(cache_file, key, len(data), with_inputs=True if image else None)
        if X is not None:
            return Embeddings(X, key, True, time.perf_counter() - t0, "cache", inputs)
        # always shown (also with -q): a damaged cache is worth knowing about
        print(f"notice: embedding cache entry {cache_file} was corrupt ({why}); recomputed", file=sys.stderr)
    adapter.to(dev)
    n = len(data)
    order = list(range(n))
    if data.modality == "text":  # length buckets: far less padding
        order.sort(key=lambda i: len(data.items[i]))
    X: Optional[torch.Tensor] = None
    inputs = torch.zeros((n, 16), dtype=torch.uint8) if image else None
    bar = _progress(n, progress, "embedding")
    try:
        with adapter.inference():
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                try:
                    batch = adapter.collate([data.items[i] for i in idx])
                except NoTokens as e:       # named by its row, as an empty text is
                    raise BadInput(f"{data.row_at(idx[e.position])}: {e.problem}", data.where) from None
                emb = adapter.embed_batch(batch, dev).cpu()
                if X is None:
                    X = torch.empty((n, emb.shape[1]), dtype=torch.float32)
                X[torch.tensor(idx)] = emb
                if inputs is not None:
                    inputs[torch.tensor(idx)] = input_digests(batch)
                bar.update(len(idx))
    finally:
        bar.close()
    assert X is not None
    check_finite_embeddings(X, adapter, data)
    if not image:
        inputs = text_input_digests(adapter, data)
    if use_cache:
        _write_cache(cache_file, X, inputs)
    return Embeddings(X, key, False, time.perf_counter() - t0, str(dev), inputs)


INPUTS_FORMAT = 1                 # an image set's model-input digests (``inputs-<key>.json``)


def _image_input_keys(adapter: Adapter, data: RepairData, batch_size: int = 64) -> list[str]:
    """Every image's model input, hashed as :attr:`Embeddings.inputs` hashes it (hex)."""
    adapter.max_pixels = data.max_pixels          # the limit the data was read with, as extract sets it
    out = []
    for start in range(0, len(data), batch_size):
        batch = adapter.collate(list(data.items[start:start + batch_size]))
        out += digest_keys(input_digests(batch))
    return out


def image_input_keys_read_as(data: RepairData, data_config: dict, batch_size: int = 64) -> list[str]:
    """Every image of ``data`` as a model whose image preprocessing is ``data_config`` is fed it, hashed as
    :attr:`Embeddings.inputs` hashes it: the keys another run read them with (a repair at another
    ``--image-size``, whose provenance records its preprocessing). Decodes every image (not cached)."""
    from .adapters.images import ImageCollate
    from .data import resized_size

    collate = ImageCollate(dict(data_config))
    # this run's --max-pixels, raised to the repair's own resize if it is below it (a limit this run's
    # preprocessing meets need not meet the repair's; the source images are still held to it)
    _, h, w = collate.data_config["input_size"]
    rw, rh = resized_size((w, h), collate.data_config)
    limit = max(int(data.max_pixels), rw * rh)
    out = []
    for start in range(0, len(data), batch_size):
        out += digest_keys(input_digests(collate(list(data.items[start:start + batch_size]), limit)))
    return out


def digest_keys(inputs: torch.Tensor) -> list[str]:
    """:attr:`Embeddings.inputs` as the hex keys :func:`image_input_keys` gives (one per row)."""
    return [bytes(row.tolist()).hex() for row in inputs]


def image_input_keys(adapter: Adapter, data: RepairData, cache_dir: Optional[Path] = None,
                     use_cache: bool = True, batch_size: Optional[int] = None,
                     device: Optional[str] = None) -> list[str]:
    """Every image of ``data`` as ``adapter``'s model is fed it (its preprocessed input), hashed as
    :attr:`Embeddings.inputs` hashes it, in order: the one rule of "the same image" within a repair
    set (its splits) and between data sets (``fix --eval``, ``eval --exclude``, ``--train``,
    :func:`repair.api.read_as_same`). The same picture in another format, with other metadata or
    saved at another size the model's resize reads identically has other bytes and the same key.
    Kept in the cache beside the embeddings (``inputs-<key>.json``, keyed by the data's fingerprint
    and the model's preprocessing: a changed file is another entry), so a warm run decodes no image.
    An entry that does not read back as ``len(data)`` digests whose own sha256 it carries is
    recomputed, with a notice when it was there but damaged (a flipped digit would name other
    images, and ``--eval`` would leave out other samples); one that cannot be written is a
    warning-free miss (the keys are returned all the same). ``batch_size`` and ``device``: those a run
    embeds with; with them, a sound embedding cache entry of ``data`` (:func:`extract`'s, which holds
    the same digests) serves too, and nothing is decoded or written."""
    if not use_cache:
        return _image_input_keys(adapter, data)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if batch_size is not None:
        entry = cache_dir / f"{cache_key(adapter, data, resolve_device(device or 'auto'), batch_size)}.safetensors"
        if os.path.isfile(entry) and not os.path.islink(entry):     # False where it cannot be looked up
            _, inputs, _ = _read_cache(entry, entry.stem, len(data), with_inputs=True)
            if inputs is not None:
                return digest_keys(inputs)
    key = hashlib.sha256(json.dumps({"format": INPUTS_FORMAT, "data": data.fingerprint(),
                                     "preprocess": adapter.preprocess_id(), "family": adapter.family,
                                     "max_pixels": int(data.max_pixels), "code": code_key()},
                                    sort_keys=True, default=str).encode()).hexdigest()[:40]
    path = cache_dir / f"inputs-{key}.json"

    def seal(digests: list) -> str:
        return hashlib.sha256("\n".join(digests).encode()).hexdigest()

    damaged = False
    try:
        if os.path.isfile(path) and not os.path.islink(path):
            damaged = True
            doc = parse_json(path.read_text(encoding="utf-8"))     # too deep to parse: damaged too
            got = doc.get("digests") if isinstance(doc, dict) and doc.get("key") == key else None
            if (isinstance(got, list) and len(got) == len(data)
                    and all(isinstance(x, str) and len(x) == 32 and set(x) <= set("0123456789abcdef") for x in got)
                    and doc.get("sha256") == seal(got)):
                return got
    except (OSError, ValueError):
        pass
    if damaged:           # always shown (also with -q), as a damaged embedding entry is
        print(f"notice: input-digest cache entry {path} was corrupt; recomputed", file=sys.stderr)
    got = _image_input_keys(adapter, data)
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        sweep_cache_temps(cache_dir)
        fd, tmp = tempfile.mkstemp(prefix=".inp-", suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "digests": got, "sha256": seal(got)}, f)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return got


def check_finite_embeddings(X: torch.Tensor, adapter: Adapter, data: RepairData) -> None:
    """:class:`BadInput` naming the model and the data when any embedding is NaN or infinite (a
    model that overflows on this data): nothing downstream can be fitted or measured on it."""
    bad = ~torch.isfinite(X).all(1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        item = data.items[i] if data.modality == "image" else f"text {i + 1}"
        raise BadInput(f"the model {adapter.source} gives non-finite (NaN or infinite) embeddings for "
                       f"{int(bad.sum())} of {len(data)} samples (first: {item})", data.where)


def cache_digest(X: torch.Tensor) -> str:
    """What a cache entry is verified by: sha256 of the tensor's dtype, shape and bytes."""
    from .adapters.base import tensor_digest

    return tensor_digest(X).hex()


def _read_cache(path: Path, key: str, n: int, with_inputs: Optional[bool] = False
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], str]:
    """``(X, inputs, "")`` for a sound entry (``inputs``: the input digests, with ``with_inputs``, else
    None; ``with_inputs=None``: those the entry holds, if any -- a text model that cannot tell its inputs
    writes none); ``(None, None, why)`` for anything else: not a regular file, unreadable, not
    safetensors, other tensors or shapes, no digest, or a digest mismatch."""
    import stat as stat_

    from safetensors import safe_open

    wants = ([["embeddings", "inputs"]] if with_inputs else [["embeddings"]] if with_inputs is False
             else [["embeddings"], ["embeddings", "inputs"]])
    try:
        if not stat_.S_ISREG(path.stat().st_mode):
            return None, None, "not a regular file"
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = sorted(f.keys())
            if keys not in wants:
                return None, None, f"holds {keys} instead of {wants[-1]}"
            X = f.get_tensor("embeddings")
            inputs = f.get_tensor("inputs") if "inputs" in keys else None
    except Exception as e:       # safetensors raises its own error types; OSError for the rest
        return None, None, f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if X.dtype != torch.float32 or X.dim() != 2 or X.shape[0] != n:
        return None, None, (f"holds a {str(X.dtype).replace('torch.', '')} tensor of shape {tuple(X.shape)}, "
                            f"expected {n} rows")
    if inputs is not None and (inputs.dtype != torch.uint8 or tuple(inputs.shape) != (n, 16)):
        return None, None, f"holds input digests of shape {tuple(inputs.shape)}, expected ({n}, 16)"
    if meta.get("key") != key:
        return None, None, "written for another key"
    if "sha256" not in meta:
        return None, None, "no digest"
    if meta["sha256"] != cache_digest(X) or (inputs is not None and meta.get("inputs_sha256") != cache_digest(inputs)):
        return None, None, "digest mismatch"
    return X, inputs, ""


#: the temporary files a cache write makes beside its entry (renamed into place when whole)
CACHE_TEMP_PREFIXES = (".emb-", ".pix-", ".inp-")


def sweep_cache_temps(cache_dir: Path, older_than: float = 3600.0) -> None:
    """Remove this user's cache temporaries (:data:`CACHE_TEMP_PREFIXES`) in ``cache_dir`` older than
    ``older_than`` seconds: a run killed outright (SIGKILL, a power cut) while writing an entry leaves
    one, which nothing else would ever remove; a write in progress (seconds old) is left alone."""
    try:
        entries = list(Path(cache_dir).iterdir())
    except OSError:
        return
    now = time.time()
    for p in entries:
        if not (p.name.startswith(CACHE_TEMP_PREFIXES) and p.name.endswith(".tmp")):
            continue
        try:
            st = p.lstat()
            if (stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than
                    and (not hasattr(os, "geteuid") or st.st_uid == os.geteuid())):
                p.unlink()
        except OSError:
            pass


def _write_cache(path: Path, X: torch.Tensor, inputs: Optional[torch.Tensor] = None) -> None:
    """Atomic: a temporary sibling renamed into place, with the digests and key in its metadata."""
    from .io import save_safetensors

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_cache_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=".emb-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tensors, meta = {"embeddings": X}, {"repair_version": __version__, "sha256": cache_digest(X), "key": path.stem}
        if inputs is not None:
            tensors["inputs"] = inputs
            meta["inputs_sha256"] = cache_digest(inputs)
        save_safetensors(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:  # a read-only or full cache must not fail the command
        print(f"warning: could not write embedding cache {path.parent} ({e.strerror})", file=sys.stderr)
    finally:              # also on Ctrl-C or SIGTERM: no temporary file is left in the cache
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass

