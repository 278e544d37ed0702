"""Provenance written into every file ``repair`` produces.

The same string-to-string map goes into safetensors metadata and ONNX
``metadata_props``: ``format: pt`` (transformers 4.x refuses safetensors
metadata without it) and namespaced ``repair.*`` keys. Never a machine path, and no
wall-clock time: the same inputs and seed give byte-identical files. ``repair.created`` is
written only when the caller passes it or ``SOURCE_DATE_EPOCH`` is set (reproducible builds'
convention: that time, in UTC).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import sys
from typing import Any, Optional

from ._version import __version__
from .errors import BadInput
from .io import parse_json

PREFIX = "repair."


def merged(source: dict, new: dict) -> dict[str, str]:
    """A file's metadata: the source checkpoint's entries with ``new`` written over them; when
    ``new`` is a provenance (``repair.*`` keys), the source's own ``repair.*`` keys go (they describe
    the run that made the source, not this one: this record names the source by its hash)."""
    fresh = any(str(k).startswith(PREFIX) for k in new)
    out = {str(k): str(v) for k, v in source.items() if not (fresh and str(k).startswith(PREFIX))}
    out.update({str(k): str(v) for k, v in new.items()})
    return out


#: the keys an image preprocessing a repaired file records must hold (``settings.preprocess.image``)
IMAGE_PREPROCESS_REQUIRED = ("input_size", "mean", "std")


def recorded_settings(metadata, where=None) -> dict:
    """The ``repair.settings`` object a file written by ``repair fix`` records, checked: {} where there is
    none. The one reader of that record (the classes, the preprocessing and the repair set it was measured
    with are read back from it): a record that is there but is not what ``repair fix`` writes -- not a JSON
    object, its ``data``, ``preprocess`` or ``preprocess.image`` not objects, an image preprocessing without
    its size or normalisation, a truncation length or classes of another type -- is
    :class:`repair.errors.BadInput` naming ``where``, never read in part (a guess would measure the model
    with other preprocessing, or on samples the repair fitted)."""
    raw = (metadata or {}).get(f"{PREFIX}settings")
    if raw is None:
        return {}

    def bad(what: str):
        return BadInput(f"its repair.settings (recorded by repair fix) {what}; it was changed since it was written: "
                        "restore it, or remove the repair.* metadata to read the weights as a plain file", where)

    try:
        settings = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise bad("is not JSON") from None
    if not isinstance(settings, dict):
        raise bad("is not a JSON object")
    for key in ("data", "preprocess"):
        if key in settings and not isinstance(settings[key], dict):
            raise bad(f"{key} is not an object: {json.dumps(settings[key])[:60]}")
    pre = settings.get("preprocess") or {}
    image = pre.get("image")
    if image is not None:
        if not isinstance(image, dict):
            raise bad(f"preprocess.image is not an object: {json.dumps(image)[:60]}")
        missing = [k for k in IMAGE_PREPROCESS_REQUIRED if k not in image]
        if missing:
            raise bad(f"preprocess.image has no {', '.join(missing)}")
    at = pre.get("max_length")
    if at is not None and (not isinstance(at, int) or isinstance(at, bool) or at < 1):
        raise bad(f"preprocess.max_length is not a whole number >= 1: {json.dumps(at)[:60]}")
    names = settings.get("classes")
    if names is not None and not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise bad(f"classes is not a list of names: {json.dumps(names)[:60]}")
    return settings


def recorded_classes(metadata, where=None, count: Optional[int] = None) -> Optional[list]:
    """The class names a file written by ``repair fix`` records (``repair.settings`` ``classes``), or
    None: the names of a bare weights file, which has no config to hold them -- read back as the file's
    own, so a later run neither needs ``--class-names`` again nor takes them in another order. ``count``:
    the head's classes; a record naming another number is :class:`repair.errors.BadInput` naming ``where``."""
    names = recorded_settings(metadata, where).get("classes")
    if names and count is not None and len(names) != count:
        raise BadInput(f"its repair.settings (recorded by repair fix) names {len(names)} classes, the head has "
                       f"{count}; it was changed since it was written: restore it, or remove the repair.* metadata "
                       "to read the weights as a plain file", where)
    return list(names) if names else None


#: the keys of an image preprocessing a repaired file records (``settings.preprocess.image``: timm's data config)
IMAGE_PREPROCESS_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def recorded_image_preprocess(metadata, where=None) -> Optional[dict]:
    """The image preprocessing a file written by ``repair fix`` records (``repair.settings``
    ``preprocess.image``), or None: how a bare weights file, which has no config to hold it, was read
    when it was measured -- read back so, as :func:`recorded_classes` are, unless options say otherwise.
    Checked by :func:`recorded_settings` (its values where they are used,
    :func:`repair.adapters.images.resolve_image_config`)."""
    image = (recorded_settings(metadata, where).get("preprocess") or {}).get("image")
    if image is None:
        return None
    return {k: image[k] for k in IMAGE_PREPROCESS_KEYS if k in image} or None


def recorded_model_args(metadata, where=None) -> Optional[dict]:
    """The ``model_args`` a file written by ``repair fix`` records (``repair.model_args``: the network it
    measured and repaired, the one record of it a bare weights file has), or None. Read back as the
    recorded preprocessing is (options over it); a record that is not a JSON object is
    :class:`repair.errors.BadInput` naming ``where``."""
    raw = (metadata or {}).get(f"{PREFIX}model_args")
    if raw is None:
        return None
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise BadInput(f"its repair.model_args (recorded by repair fix) is not a JSON object: {str(raw)[:60]}; it "
                       "was changed since it was written: restore it, or give --model-args", where)
    return args


def input_digest(path) -> str:
    """sha256 of a model repair's file or folder input (``--masks``, ``--prompts``, ``--segmenter``,
    ``--generator-model``) by content: a file's bytes; a folder's regular files by their paths inside it
    and their bytes, in sorted order (a file whose link leads out of the folder is not read: its
    place is recorded by name only). So a rerun with other masks or another generator is told apart."""
    import hashlib
    from pathlib import Path

    from .io import sha256_file

    import os

    p = Path(path)
    try:
        if p.is_file():
            return sha256_file(p)
        root = p.resolve()
        files = []

        def fail(e):
            raise e

        # links to folders inside it are followed (as a mask is looked up through them); one that leads
        # out, or back to a folder above it (a loop), is not entered
        for d, dirs, names in os.walk(p, followlinks=True, onerror=fail):
            here = Path(d)
            real = here.resolve()
            above = here.parent.resolve() if here != p else None
            if not real.is_relative_to(root) or (above is not None and above.is_relative_to(real)) \
                    or len(here.relative_to(p).parts) > 64:
                dirs[:] = []
                continue
            files += [here / n for n in names]
        h = hashlib.sha256()
        for f in sorted(files, key=lambda f: f.relative_to(p).as_posix()):
            real = f.resolve()
            if not real.is_file():          # a FIFO, a socket, a dangling link: never opened
                continue
            inside = real.is_relative_to(root)
            h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(real) if inside else 'outside'}\0".encode())
        return h.hexdigest()
    except OSError as e:
        raise BadInput(f"cannot be read to record it: {e.strerror or type(e).__name__}",
                       getattr(e, "filename", None) or p) from None


#: where a bare file's recorded names are, as messages name it
RECORDED_CLASSES_HOME = "its repair.settings classes (recorded by repair fix)"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def build(*, source_sha256: str, method: str, settings: Optional[dict] = None,
          figures: Optional[dict] = None, measured_on: Optional[str] = None,
          extra: Optional[dict] = None, created: Optional[str] = None) -> dict[str, str]:
    """``figures``: before/after metrics; ``measured_on``: a plain description of
    the data they come from (e.g. "held-out 30% of the repair set (n=312)"),
    never a path."""
    meta = {
        "format": "pt",
        f"{PREFIX}tool": "repair",
        f"{PREFIX}version": __version__,
        f"{PREFIX}method": method,
        f"{PREFIX}settings": canonical_json(settings or {}),
        f"{PREFIX}source_sha256": source_sha256,
    }
    created = created or source_date()
    if created:
        meta[f"{PREFIX}created"] = created
    if figures is not None:
        meta[f"{PREFIX}figures"] = canonical_json(figures)
    if measured_on is not None:
        meta[f"{PREFIX}measured_on"] = measured_on
    for k, v in (extra or {}).items():
        meta[f"{PREFIX}{k}"] = v if isinstance(v, str) else canonical_json(v)
    return meta


_CODE: dict = {}


def recipe_identity(recipe) -> dict:
    """What a run's recipe was beside its name (``settings.recipe_source``), never by path: ``built-in``
    (a file of the package's ``recipes/`` or one of its methods: ``code.sources_sha256`` covers it),
    ``file`` with the ``sha256`` of the recipe file's bytes and each ``plugins:`` entry as written with
    its code's sha256 as read when the recipe was loaded (:attr:`Recipe.digests`), ``plugin`` for a
    method a plugin registered (its code's sha256), ``method`` for a method
    registered by another module (named), or ``python`` for a recipe built in Python, with its
    settings and candidates."""
    from pathlib import Path

    from .recipes import recipes_dir

    files = [Path(f) for f in (getattr(recipe, "files", None) or ())]
    if files:
        main = files[0]
        if main.resolve().parent == recipes_dir().resolve():
            return {"kind": "built-in"}
        digests = recipe.digests           # as read when the recipe was loaded (load_recipe sets both)
        out: dict = {"kind": "file", "sha256": digests[0]}
        if recipe.plugins:
            out["plugins"] = [{"entry": str(spec), "sha256": d} for spec, d in zip(recipe.plugins, digests[1:])]
        return out
    if getattr(recipe, "source", "") == "registry":
        from .methods import get_method

        try:
            module = str(getattr(get_method(recipe.name).fn, "__module__", "") or "")
        except KeyError:
            module = ""
        if module.startswith("repair."):
            return {"kind": "built-in"}
        plugin = sys.modules.get(module.split(".")[0])         # a package plugin's method: its package
        if module.startswith("repair_plugin_") and getattr(plugin, "__repair_sha256__", None):
            return {"kind": "plugin", "sha256": plugin.__repair_sha256__}   # its file by content, not by path
        return {"kind": "method", "module": module}
    return {"kind": "python", "selection": recipe.selection, "folds": recipe.folds, "repeats": recipe.repeats,
            "ensemble": recipe.ensemble,
            "candidates": [{"method": c.method, "params": json.loads(canonical_json(c.params))}
                           for c in recipe.candidates]}


def code_identity() -> dict:
    """What code made a file, beyond ``repair.version`` (which does not change with every commit):
    ``sources_sha256``, the sha256 of the package's sources and built-in recipes (names and bytes),
    and the versions of the libraries whose numerics shape the weights. Computed once per process."""
    if not _CODE:
        import hashlib
        from pathlib import Path

        import torch

        from .recipes import recipes_dir

        h = hashlib.sha256()
        for name, root in (("repair", Path(__file__).resolve().parent), ("recipes", recipes_dir()),
                           ("cli", _cli_dir())):
            if root is None:
                continue
            for f in sorted(root.rglob("*")):
                if f.is_file() and f.suffix in (".py", ".yaml"):
                    h.update(f"{name}/{f.relative_to(root).as_posix()}\0".encode())
                    h.update(f.read_bytes())
        _CODE["sources_sha256"] = h.hexdigest()
        _CODE["torch"] = torch.__version__
        _CODE.update({k: v for k, v in library_versions().items() if v is not None})
        # what else makes the last bits differ between two machines (README: numerics): the
        # interpreter, the architecture and the SIMD kernels torch picked on this CPU
        import platform

        _CODE["python"] = platform.python_version()
        _CODE["machine"] = platform.machine()
        try:
            _CODE["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
        except Exception:                # an old torch without it: nothing to record
            pass
    return dict(_CODE)


#: installed libraries whose code reads a sample (decodes, resizes, tokenizes) or runs a network beside
#: torch: their versions are in every embedding cache key and in every written model's provenance
#: (``code``), the one list of both. ``sentencepiece`` and ``tiktoken`` tokenize the texts of models
#: whose tokenizer is theirs (a slow SentencePiece tokenizer, a tiktoken vocabulary); ``protobuf`` reads
#: a SentencePiece model when transformers converts it to a fast tokenizer -- each can change the token
#: ids of one text, so an upgrade of any of them is never served the old tokens' embeddings
CODE_LIBRARIES = ("numpy", "pillow", "torchvision", "timm", "tokenizers", "sentencepiece", "tiktoken",
                  "protobuf", "transformers", "onnxruntime", "onnxruntime-gpu")


def _cli_dir():
    """The command line's sources (``repair_cli``: what turns options into settings), or None when it is
    not installed beside the library."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("repair_cli")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


_VERSIONS: dict = {}


def library_versions() -> dict:
    """``{name: version or None}`` of every library of :data:`CODE_LIBRARIES`, as its installed
    distribution's metadata says (None: not installed) -- the one reading of them, for the embedding
    cache key and the provenance's ``code`` alike. Never from what this process happened to import
    (``torchvision.__version__`` is ``0.29.1+cu130`` where its metadata says ``0.29.1``: a record read
    from the module differed with which commands ran first), and nothing is imported for it (importing
    transformers only to read its version cost a quarter of a second of every ``repair fix`` of an image
    model). Read once per process."""
    if not _VERSIONS:
        from importlib import metadata

        for name in CODE_LIBRARIES:
            try:
                _VERSIONS[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                _VERSIONS[name] = None
    return dict(_VERSIONS)


def sample_keys(data, inputs=None, adapter=None, read=None) -> list:
    """Each row's sample as the model reads it, a string per row: its model-input digest (``inputs``,
    the embeddings' :attr:`~repair.embeddings.Embeddings.inputs`: an image's preprocessed input, a text's
    token ids -- case or spacing its tokenizer drops aside -- hashed), or without them a text's
    ``adapter`` :meth:`~repair.adapters.base.Adapter.input_keys` cut to the same 16 bytes (the same key:
    nothing is tokenized twice when the embeddings have them), else the sample's bytes
    (:meth:`~repair.data.RepairData.content_hashes`); ``read``: a text's input keys when the caller has
    them. The one rule of "the same sample" that
    :func:`data_identity`'s ``samples_sha256`` and :func:`samples_record` apply."""
    if inputs is not None and data.modality in ("image", "text"):
        return [bytes(r).hex() for r in inputs.numpy()]
    if read is None and adapter is not None and data.modality == "text":
        read = adapter.input_keys(data.items)
    return [str(k)[:32] for k in read] if read is not None else list(data.content_hashes())


def data_identity(data, group_by: Optional[str] = None, inputs=None, adapter=None, keys=None) -> dict:
    """What data a run used, with no path: its size, the ``--group-by`` column, and ``content_sha256``
    over every row's sample, label and group value in order -- a text by its bytes, an image by its
    model input (``inputs``, the embeddings' input digests: no image is read again) or, without them,
    its file's bytes. ``samples_sha256``: over the distinct samples alone as the model reads them
    (:func:`sample_keys`, or ``keys`` when the caller has them), in no order (the same samples however
    ordered, labelled, grouped or repeated). The same data gives the same digests on any machine."""
    import hashlib

    h = hashlib.sha256()
    rows = ([bytes(r).hex() for r in inputs.numpy()] if inputs is not None and data.modality == "image"
            else data.content_hashes())
    groups = data.attributes.get(group_by) if group_by else None
    for i, k in enumerate(rows):
        h.update(f"{k}\0{data.labels[i]}\0{groups[i] if groups is not None else ''}\n".encode())
    read = sample_keys(data, inputs, adapter) if keys is None else keys
    samples = hashlib.sha256("".join(f"{k}\n" for k in sorted(set(read))).encode())
    return {"n": len(data), "group_by": group_by, "content_sha256": h.hexdigest(),
            "samples_sha256": samples.hexdigest()}


#: the repair set's per-sample record (``repair.samples``): this scheme, then the base64 of the sorted
#: first 8 bytes of the sha256 of each distinct key -- a sample as the model reads it, and a text's bytes
#: too (11 characters a key: 20,000 texts 430 KB, 20,000 images 214 KB; a key of other data matches one
#: of 2 x 10^6 by chance with probability about 1e-13)
SAMPLES_SCHEME = "sha256/8:"
#: more distinct samples than this and no per-sample record is written (at most about 21 MB of metadata): the
#: whole-set digest (``samples_sha256``) alone then recognises the repair set
SAMPLES_RECORD_MAX = 1_000_000


def _prefixes(keys) -> "Any":
    import hashlib

    import numpy as np

    raw = b"".join(hashlib.sha256(str(k).encode()).digest()[:8] for k in keys)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def _byte_keys(data) -> list:
    """A text's bytes (sha256), which no ``--max-length`` changes; none for images: their model input is
    their key (reading every image file again would cost a warm run what the embedding cache spares it)."""
    return list(data.content_hashes()) if data.modality == "text" else []


def samples_record(data, keys, *, also=(), earlier=None) -> Optional[str]:
    """The record of the samples a repair read, for :func:`recorded_rows`: each sample of its repair set
    ``data`` by :func:`sample_keys` (``keys``: as the model read it) and a text by its bytes too (whatever
    another run's ``--max-length`` makes of it). ``also``: (data, keys) pairs of other samples the repair
    trained on (``--train``), recorded the same way; ``earlier``: the source model's own record (a repaired
    model repaired again: the samples its lineage fitted stay recorded, or figures on them would pass). None
    above :data:`SAMPLES_RECORD_MAX` distinct samples in all (the whole-set digest alone then applies)."""
    import numpy as np

    pairs = [(data, keys), *also]
    prior = _held(earlier)
    if sum(len(set(k)) for _, k in pairs) + (0 if prior is None else prior.size // 2) > SAMPLES_RECORD_MAX:
        return None
    held = [_prefixes([*k, *_byte_keys(d)]) for d, k in pairs]
    if prior is not None:
        held.append(prior)
    return _encode(np.unique(np.concatenate(held)))


def recorded_rows(data, keys, record) -> Optional[list]:
    """Per row of ``data`` (``keys``: its :func:`sample_keys`): whether :func:`samples_record`
    ``record`` holds its sample, as the model reads it or (a text) byte for byte. None when ``record``
    is not such a record (absent, another scheme, damaged): nothing is known."""
    read = in_samples_record(keys, record)
    if read is None:
        return None
    raw = _byte_keys(data)
    return [a or b for a, b in zip(read, in_samples_record(raw, record))] if raw else read


def _record(keys) -> str:
    import numpy as np

    return _encode(np.unique(_prefixes(sorted(set(keys)))))


def _encode(prefixes) -> str:
    import base64

    return SAMPLES_SCHEME + base64.b64encode(prefixes.astype(">u8").tobytes()).decode("ascii")


def _held(record) -> "Any":
    """The sorted key prefixes record ``record`` (:func:`_record`) holds, or None when it is not such a
    record (absent, another scheme, damaged)."""
    import base64
    import binascii

    import numpy as np

    if not isinstance(record, str) or not record.startswith(SAMPLES_SCHEME):
        return None
    try:
        raw = base64.b64decode(record[len(SAMPLES_SCHEME):], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) % 8:
        return None
    held = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    if held.size > 1 and not bool(np.all(held[1:] > held[:-1])):
        return None
    return held


def in_samples_record(keys, record) -> Optional[list]:
    """Per key: whether record ``record`` (:func:`_record`) holds it.
    None when ``record`` is not such a record (absent, another scheme, damaged): nothing is known."""
    import numpy as np

    held = _held(record)
    if held is None:
        return None
    q = _prefixes(keys)
    if not held.size or not q.size:
        return [False] * len(q)
    pos = np.minimum(np.searchsorted(held, q), held.size - 1)
    return (held[pos] == q).tolist()


#: the date :func:`source_date` gives inside :func:`dated` (a 1-tuple; None: read the environment)
_carried: Optional[tuple[Optional[str]]] = None


@contextlib.contextmanager
def dated(created: Optional[str]):
    """Within the block, :func:`source_date` is ``created`` -- its value where the work was asked for (a
    zoo's driver), whatever this process's environment holds: a Ray worker's environment is its
    cluster's, not the driver's (None: the driver had no ``SOURCE_DATE_EPOCH``)."""
    global _carried
    saved, _carried = _carried, (created,)
    try:
        yield
    finally:
        _carried = saved


def source_date() -> Optional[str]:
    """``SOURCE_DATE_EPOCH`` (reproducible builds: the time every record and report names) as an ISO time
    in UTC, or None when it is unset or empty. A value that is not a whole number of seconds since
    1970-01-01 that a date can hold (``abc``, ``1.5``, ``²``, past the year 9999) is a
    :class:`BadInput` naming the variable, as the convention asks (a malformed value fails the build):
    the command line checks it before any work, never once the repair ran. Inside :func:`dated`, the
    value it carries."""
    if _carried is not None:
        return _carried[0]
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return None
    why = "not a whole number of seconds since 1970-01-01 (UTC)"
    if re.fullmatch(r"[0-9]+", raw):
        try:
            return _dt.datetime.fromtimestamp(int(raw), _dt.timezone.utc).isoformat()
        except (OverflowError, ValueError, OSError):
            why = "past the last date a record can hold (9999-12-31)"
    shown = raw if len(raw) <= 24 else raw[:21] + "..."
    raise BadInput(f"SOURCE_DATE_EPOCH={shown!r}: {why}; unset it or give one")


def lineage(source: Optional[dict], where=None) -> Optional[list]:
    """The repairs that made ``source`` (a checkpoint's metadata), oldest first, when it is itself a
    repaired model: its own ``repair.lineage`` followed by one entry for its record -- the checkpoint that
    record repaired (``source_sha256``), the method and recipe, repair's version, the repair data's
    content digest and the sha256 of the whole record (its ``repair.*`` entries). A repair of it writes a
    record of its own in place of the source's (:func:`merged`); the lineage keeps the chain back to the
    first checkpoint (a record of an export of an unrepaired model, method ``none``, adds no entry). None
    for a source without a record of a repair."""
    import hashlib

    raw = {k: v for k, v in (source or {}).items() if str(k).startswith(PREFIX)}
    rec = read(raw)
    if not isinstance(rec.get("method"), str) or not isinstance(rec.get("source_sha256"), str):
        return None
    earlier = [e for e in rec.get("lineage") if isinstance(e, dict)] if isinstance(rec.get("lineage"), list) else []
    if rec["method"] == "none":           # an export of an unrepaired model: no repair to add
        return earlier or None
    settings = recorded_settings(raw, where)          # the one checked reader of that record
    data = settings.get("data") or {}
    entry = {"source_sha256": rec["source_sha256"], "method": rec["method"], "recipe": settings.get("recipe"),
             "version": rec.get("version"), "data_sha256": data.get("content_sha256"),
             "record_sha256": hashlib.sha256(canonical_json(sorted(raw.items())).encode()).hexdigest()}
    return earlier + [entry]


def read(meta: dict[str, str]) -> dict[str, Any]:
    """The ``repair.*`` keys of a metadata map, JSON values decoded."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if not k.startswith(PREFIX):
            continue
        try:
            out[k[len(PREFIX):]] = parse_json(v) if v[:1] in "{[" else v
        except json.JSONDecodeError:
            out[k[len(PREFIX):]] = v
    return out
