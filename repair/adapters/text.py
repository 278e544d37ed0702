"""Tokenizer handling shared by the text adapters (transformers folders, text ONNX models).

Everything is offline: every ``from_pretrained`` is ``local_files_only`` (and ``trust_remote_code=False``).
The library leaves ``os.environ`` as the caller has it; the command line's process
also sets ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` before anything imports transformers
(``repair_cli.main``).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..errors import BadInput, SharedSetting

DEFAULT_MAX_LENGTH = 512
#: transformers' "no limit" sentinel for ``model_max_length`` is a huge int (1e30)
NO_LIMIT_SENTINEL = 100_000
#: the usual names of a text model's inputs, in the order ONNX graphs list them
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model", "spm.model", "tokenizer.model")


def _quiet_hf() -> tuple:
    from transformers.utils import logging as hf_logging

    saved = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return saved


def _loud_hf(saved: tuple) -> None:
    from transformers.utils import logging as hf_logging

    verbosity, bars = saved
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


#: transformers' logging at error level and its progress bars off, restored after; safe in threads (two
#: overlapping save/restores left the user's process at error level for good)
quiet_transformers = SharedSetting(_quiet_hf, _loud_hf)


def first_line(e: BaseException) -> str:
    """The first line of an error's message that says something (a message may start with a blank
    line: transformers' missing-backend errors), else its type's name."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def has_tokenizer_files(folder: Path) -> bool:
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


#: the files of a transformers folder whose ``auto_map`` would name Python code in the folder to run
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def refuse_remote_code(folder: Path) -> None:
    """:class:`BadInput` naming the file when a transformers folder's ``config.json`` or
    ``tokenizer_config.json`` has an ``auto_map`` (classes to import from Python files in the folder):
    repair never runs a model's own code. Checked before transformers reads the folder, whose own
    check asks on stdin ("Do you wish to run the custom code? [y/N]") and runs the code on "y"; every
    ``from_pretrained`` also passes ``trust_remote_code=False``."""
    from .base import read_json       # (base imports this module)

    for name in REMOTE_CODE_FILES:
        path = Path(folder) / name
        if not path.exists():
            continue
        cfg = read_json(path)
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            names = cfg["auto_map"] if isinstance(cfg["auto_map"], dict) else {}
            raise BadInput(f"auto_map names custom code ({', '.join(map(str, names)) or 'classes'} from the folder's "
                           "Python files); repair never runs a model's own code: give a model whose architecture "
                           "transformers ships", path)


def load_tokenizer(folder: Path, problem: str):
    """``AutoTokenizer`` from ``folder``, offline and quiet. A failure is a ``BadInput``
    reading ``problem (first line of the error)`` naming the folder. A folder without tokenizer
    files (:data:`TOKENIZER_FILES`), or whose tokenizer knows nothing but its special tokens, is
    ``BadInput`` too: transformers would build an empty vocabulary from the model's config and turn
    every word into [UNK], so every text would look the same to the model."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(folder):
        raise BadInput(f"no tokenizer files in the model folder (one of {', '.join(TOKENIZER_FILES)}); a text "
                       "model needs the tokenizer it was trained with", folder)
    refuse_remote_code(folder)
    from .base import files_beside

    _check_tokenizer_folder(folder)

    # the tokenizer's identity (:func:`tokenizer_digest`) is taken now, from the files as they are read:
    # hashed before and after transformers reads them, a change in between refused
    before = {f.name: _file_sha256(f) for f in files_beside(folder, TOKENIZER_DIGEST_FILES)}
    stats = _folder_stats(folder)
    with quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise BadInput(f"{problem} ({first_line(e)})", folder) from None
    special = set(getattr(tok, "all_special_ids", None) or ())
    if len(tok) <= len(special):
        raise BadInput(f"the tokenizer has no vocabulary, only its {len(tok)} special token(s) (a vocabulary "
                       "file is missing?): every word would be unknown", folder)
    digest, read = _digest_of(tok)
    now = _folder_stats(folder)
    changed = sorted({n for n in set(before) | (set(read) & set(TOKENIZER_DIGEST_FILES)) if before.get(n) != read.get(n)}
                     | {n for n in set(read) - set(TOKENIZER_DIGEST_FILES) if stats.get(n) is None
                        or stats.get(n) != now.get(n)})
    if changed:
        raise BadInput(f"the tokenizer files changed while they were read ({', '.join(changed)}); load the model "
                       "again once they are written", folder)
    _remember_digest(tok, digest)
    return tok


def _file_sha256(path: Path) -> str:
    from ..io import sha256_file

    return sha256_file(path)


def _folder_stats(folder: Path) -> dict:
    """name -> (device, inode, size, modification and change times) of each regular file of ``folder``:
    what tells a file rewritten between two looks (for tokenizer files hashed only after the read)."""
    out: dict = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for e in entries:
        try:
            st = e.stat()
        except OSError:
            continue
        if not e.is_dir():
            out[e.name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def resolve_max_length(tokenizer, given: Optional[int], positions: Optional[int] = None, where=None) -> int:
    """The truncation length: ``given`` (``--max-length``) when set, else the tokenizer's
    ``model_max_length`` (``positions`` when that is transformers' "no limit" sentinel), at most 512.
    ``positions``: how many tokens the model can embed (its ``max_position_embeddings``) when known;
    the length never exceeds it (a longer text would not fit the position embeddings), and a
    ``given`` above it is :class:`BadInput` naming the limit and ``where`` (the model's config), as
    any other out-of-range option is."""
    if not (isinstance(positions, int) and not isinstance(positions, bool) and positions > 0):
        positions = None
    if given:
        if positions is not None and int(given) > positions:
            raise BadInput(f"--max-length {int(given)} is more than the {positions} tokens the model's position "
                           f"embeddings hold (max_position_embeddings); give at most {positions}", where)
        return int(given)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is None:                    # written as null: transformers' "no limit"
        limit = NO_LIMIT_SENTINEL + 1
    if (not isinstance(limit, (int, float)) or isinstance(limit, bool) or not limit >= 1
            or (limit <= NO_LIMIT_SENTINEL and limit != int(limit))):
        # the folder's own truncation (a repaired folder records the one its figures were measured with):
        # a value that is no length is not replaced by a guess
        raise BadInput(f"model_max_length {limit!r} is not a whole number of tokens >= 1 (the truncation the "
                       "tokenizer reads texts with); correct it, or give --max-length",
                       Path(where).with_name("tokenizer_config.json") if where is not None else None)
    if limit > NO_LIMIT_SENTINEL:
        limit = positions or DEFAULT_MAX_LENGTH
    return int(min(limit, DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH))


def record_max_length(folder: Path, max_length: int) -> None:
    """Set ``model_max_length`` in the ``tokenizer_config.json`` of ``folder`` (a model being written,
    not yet in place) to ``max_length``: the truncation a run was given (``--max-length``) and measured
    its figures with, so the written model's tokenizer truncates as they were measured (plain
    ``transformers`` and a later ``repair eval`` alike). The file is made when the folder has none."""
    from .base import read_json       # (base imports this module)

    path = Path(folder) / "tokenizer_config.json"
    cfg = read_json(path) if path.exists() else {}
    if cfg.get("model_max_length") == int(max_length):
        return
    cfg["model_max_length"] = int(max_length)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def max_positions_beside(folder: Path) -> Optional[int]:
    """``max_position_embeddings`` of the transformers ``config.json`` in ``folder`` (an exported
    model's folder: the ONNX file beside the config), or None: the truncation fallback for a
    tokenizer without a length limit."""
    from .base import read_json       # (base imports this module)

    try:
        cfg = read_json(Path(folder) / "config.json")
    except BadInput:                  # none, or not readable: no limit known
        return None
    v = cfg.get("max_position_embeddings")
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        return None
    if cfg.get("model_type") in PADDING_OFFSET_POSITIONS:
        # positions count from the padding index + 1 (RoBERTa: 514 rows hold 512 tokens), as
        # :func:`repair.adapters.hf_adapter.position_limit` reads off the table itself
        pad = cfg.get("pad_token_id", 1)
        v -= (pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 1) + 1
    return v if v > 0 else None


#: transformers model types whose position ids start after the padding index (their
#: ``max_position_embeddings`` counts those unused rows)
PADDING_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                                      "data2vec-text", "xmod", "ibert", "roberta-prelayernorm", "mpnet", "luke",
                                      "markuplm", "esm"})


def tokenizer_preprocess_id(tokenizer, max_length: Optional[int]) -> dict:
    """JSON-able description of a tokenizer's preprocessing (part of the embedding cache key):
    its class, the truncation length and a digest of its content (:func:`tokenizer_digest`)."""
    if tokenizer is None:
        return {"tokenizer": None}
    return {"tokenizer": type(tokenizer).__name__, "vocab_size": int(tokenizer.vocab_size),
            "max_length": max_length, "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
            "content": tokenizer_digest(tokenizer)}


#: files at the top of a text model's folder that no tokenizer reads (the ONNX model itself, documentation):
#: :func:`_check_tokenizer_folder` leaves them to the loader's own rules
NOT_TOKENIZER_SUFFIXES = (".onnx", ".md")


def _check_tokenizer_folder(folder: Path) -> None:
    """Every file at the top of a tokenizer's folder -- but :data:`NOT_TOKENIZER_SUFFIXES`, hidden names
    and folders -- checked as a model folder's entries are (:func:`repair.adapters.base.check_folder_entry`:
    a symlink leading out of the folder, a FIFO or device, is :class:`BadInput` naming it) before the
    tokenizer reads any. Which files a tokenizer reads is transformers' to decide and changes with its
    releases (a class's ``vocab_files_names``: PhoBERT's ``bpe.codes``; ``fast_tokenizer_files``; names
    found by listing the folder), known only after the read, so every file it could read is checked first
    (the check after it, :func:`tokenizer_files`, names what it did read, for the digest)."""
    import os

    from .base import check_folder_entry

    root = Path(os.path.realpath(folder))
    for entry in sorted(Path(folder).iterdir()):
        if entry.name.startswith(".") or entry.is_dir() or entry.name.lower().endswith(NOT_TOKENIZER_SUFFIXES):
            continue
        check_folder_entry(entry, root)


#: the files a tokenizer is read from (transformers' names): their content identifies it
TOKENIZER_DIGEST_FILES = (*TOKENIZER_FILES, "merges.txt", "special_tokens_map.json", "added_tokens.json",
                          "chat_template.jinja", "chat_template.json", "tekken.json", "tiktoken.model")


def tokenizer_files(tokenizer) -> list[Path]:
    """The files of its folder a tokenizer was read from: :data:`TOKENIZER_DIGEST_FILES` and every file
    its class reads (``vocab_files_names``: PhoBERT's ``bpe.codes``, LUKE's ``entity_vocab.json``, a
    ``sentencepiece.model``...; a name its settings give, when it lies in the folder), those that exist,
    each checked as a model folder's entries are (:func:`check_folder_entry`: a symlink leading out of
    the folder, a FIFO or device, is :class:`BadInput`): only the folder's own files are read. [] for a
    tokenizer not read from a folder."""
    import os

    from .base import files_beside

    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not str(folder) or not folder.is_dir():
        return []
    root = os.path.realpath(folder)
    extra: set = set()
    given = getattr(tokenizer, "init_kwargs", None) or {}
    for key, default in (getattr(type(tokenizer), "vocab_files_names", None) or {}).items():
        for name in (default, given.get(key)):
            if not isinstance(name, str) or not name:
                continue
            p = Path(name)
            if len(p.parts) == 1:
                extra.add(name)
            elif os.path.realpath(p.parent) == root:          # a path in the folder, by its name there
                extra.add(p.name)
    # a versioned fast tokenizer file its settings name (``fast_tokenizer_files``: transformers reads the
    # one for its version in place of tokenizer.json)
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        versions = cfg.get("fast_tokenizer_files") if isinstance(cfg, dict) else None
    except (OSError, ValueError):
        versions = None
    for name in versions if isinstance(versions, list) else []:
        if isinstance(name, str) and name and len(Path(name).parts) == 1:
            extra.add(name)
    names = [*TOKENIZER_DIGEST_FILES, *sorted(extra - set(TOKENIZER_DIGEST_FILES))]
    return files_beside(folder, names)


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: the content of the files it was read from
    (:func:`tokenizer_files`: vocabulary, merges or BPE codes, sentencepiece model, normaliser, added
    and special tokens, its settings) -- or, for one built in memory, its fast pipeline or vocabulary
    and its init settings (not the per-call truncation and padding a batch sets on the backend) -- and
    its truncation and padding side. Taken when the tokenizer is loaded (:func:`load_tokenizer`, from
    the files as they were read: files changed on disk later never change it); a tokenizer not loaded
    there (built in memory) is digested once, the first time."""
    cached = getattr(tokenizer, "_repair_digest", None)
    if cached is not None:
        return cached
    digest, _ = _digest_of(tokenizer)
    _remember_digest(tokenizer, digest)
    return digest


def _remember_digest(tokenizer, digest: str) -> None:
    try:
        tokenizer._repair_digest = digest
    except Exception:                  # a tokenizer that takes no attributes: computed each time
        pass


def _digest_of(tokenizer) -> tuple[str, dict]:
    """:func:`tokenizer_digest`'s value computed now, and name -> sha256 of each file it read (each
    file read once: its digest and, for ``tokenizer_config.json``, its settings come from those bytes)."""
    import hashlib
    import json

    h = hashlib.sha256()
    files = tokenizer_files(tokenizer)
    read: dict = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if files:
        for f in files:
            data = f.read_bytes()
            read[f.name] = hashlib.sha256(data).hexdigest()
            if f.name == "tokenizer_config.json":
                # its truncation length is the key's own max_length (the one used): a repaired folder
                # whose config records the length its figures were read at is the same tokenizer
                try:
                    cfg = json.loads(data.decode("utf-8"))
                except ValueError:
                    cfg = None
                if isinstance(cfg, dict):
                    cfg.pop("model_max_length", None)
                    if cfg:
                        h.update(f"{f.name}\0{json.dumps(cfg, sort_keys=True, default=str)}\n".encode())
                    continue
            h.update(f"{f.name}\0{read[f.name]}\n".encode())
    elif backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        h.update(json.dumps(pipeline, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    kwargs = {k: v for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if not (k.endswith("_file") or k.endswith("_files") or k == "name_or_path")}
    kwargs["truncation_side"] = getattr(tokenizer, "truncation_side", None)
    kwargs["padding_side"] = getattr(tokenizer, "padding_side", None)
    kwargs["input_names"] = list(getattr(tokenizer, "model_input_names", None) or ())
    h.update(json.dumps(kwargs if not files else {k: kwargs[k] for k in ("truncation_side", "padding_side",
                                                                       "input_names")},
                        sort_keys=True, default=str).encode())
    return h.hexdigest(), read


#: characters per token of the truncation length beyond which a text is cut before it is tokenized
#: (at least :data:`MIN_CHARS_KEPT`): a tokenizer reads the whole text before truncating, and one
#: 200 MB field took it 4 GB and then aborted the process; the cut keeps what decides the tokens read
CHARS_PER_TOKEN = 64
MIN_CHARS_KEPT = 4096
#: most characters of one text read to find its tokens: a cut that holds too few tokens grows fourfold up to
#: here (a field of one huge word or of blanks gave few tokens at any cut, and the whole 30 MB was read:
#: 103 s and 3.2 GB); beyond it the text is read as cut here
MAX_CHARS_READ = 1 << 20


@contextlib.contextmanager
def _stderr_held():
    """File descriptor 2 held in a temporary file for the block, written out after it: a Rust panic
    prints its message (one per worker thread, each a few lines) to the descriptor itself, past
    Python's ``sys.stderr``. Yields a list: put True in it to drop what was held."""
    import sys
    import tempfile
    import threading

    drop: list = []
    if threading.current_thread() is not threading.main_thread():
        yield drop          # the descriptor is the process's: only the main thread swaps it (no race)
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):          # no descriptor 2 to hold (a closed stderr)
        yield drop
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield drop
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            if not drop:
                held.seek(0)
                data = held.read()
                if data:
                    os.write(2, data)


def _run(tokenizer, texts, **kw):
    """``tokenizer(texts, **kw)``; a tokenizer that fails on the data (a Rust panic of the tokenizers
    library, a ``BaseException`` that ``except Exception`` never sees: a pre-tokenizer's regex that
    backtracks past its limit) is :class:`BadInput` naming its folder, and the panic's own lines on
    the descriptor are dropped (one line on stderr)."""
    try:
        with _stderr_held() as drop:
            try:
                return tokenizer(texts, **kw)
            except BaseException as e:
                if type(e).__name__ == "PanicException":
                    drop.append(True)
                raise
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        why = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        raise BadInput(f"the tokenizer fails on this data (the tokenizers library panicked: {why})",
                       getattr(tokenizer, "name_or_path", None) or None) from None


def bounded_texts(tokenizer, texts: Sequence[Any], length: int) -> list[str]:
    """``texts`` as the tokenizer reads the ``length`` tokens it keeps, a long one cut before it is
    tokenized: to ``CHARS_PER_TOKEN x length`` characters (at least ``MIN_CHARS_KEPT``), or four times
    as many, and so on, until the cut holds more than twice ``length`` tokens (tokens are read in
    order: the ones away from the cut's split word are the whole text's), else the whole text -- or
    its first :data:`MAX_CHARS_READ` characters (the bound, if larger), where the growing stops. The cut
    keeps the text's head, or its tail for a tokenizer that truncates on the left
    (``truncation_side``). A text within the bound is as given. Memory and time then scale with
    ``length``, not the text."""
    bound = max(MIN_CHARS_KEPT, CHARS_PER_TOKEN * int(length))
    most = max(bound, MAX_CHARS_READ)
    need = 2 * int(length) + 8
    tail = getattr(tokenizer, "truncation_side", "right") == "left"
    out = []
    for t in texts:
        t = str(t)
        cut = bound
        while cut < len(t) and cut < most:
            part = t[-cut:] if tail else t[:cut]
            n = len(_run(tokenizer, part, add_special_tokens=False, truncation=True, max_length=need)["input_ids"])
            if n >= need:
                break
            cut = min(cut * 4, most)
        out.append(t if cut >= len(t) else (t[-cut:] if tail else t[:cut]))
    return out


def tokenize_texts(tokenizer, texts: Sequence[Any], length: int, **kw):
    """The one call of a text model's tokenizer on data: truncated at ``length`` (``kw``: padding,
    tensors), long texts cut first (:func:`bounded_texts`), a tokenizer's failure :class:`BadInput`."""
    return _run(tokenizer, bounded_texts(tokenizer, texts, length), truncation=True, max_length=int(length), **kw)


class NoTokens(BadInput):
    """A text the tokenizer reads as no tokens at all (:func:`collate_texts`); ``position``: its place in
    the batch, for a caller that knows its row to name it."""

    def __init__(self, problem: str, position: int):
        super().__init__(problem)
        self.position = position


def collate_texts(tokenizer, items: Sequence[Any], max_length: int,
                  fixed_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Tokenize a batch, truncated at ``max_length``: padded to the longest text, or to exactly
    ``fixed_length`` tokens for a graph with a fixed sequence axis (truncated at the shorter of the two;
    the padding is masked: a text is read as at ``max_length``, never at the graph's longer length).
    Padded to the longest on the right with an ``attention_mask`` always, whatever the tokenizer's
    ``padding_side`` and ``model_input_names``: each text is then read as it is alone (no position shifted by left padding, no
    padding read as tokens), so no figure changes with the batch size; a model or graph that takes no mask
    is fed without it (an ONNX graph: each text unpadded). A text read as no tokens at all is
    :class:`NoTokens` (a batch of such texts failed, one among others was read as padding)."""
    if getattr(tokenizer, "pad_token", None) is None:
        # transformers: "Asking to pad but the tokenizer does not have a padding token" (any batch, one text too)
        raise BadInput("the tokenizer has no pad token (pad_token is not set), so texts cannot be read in batches: "
                       "set pad_token in tokenizer_config.json (a GPT-2-style model: its end-of-text token, and "
                       "pad_token_id in config.json)", getattr(tokenizer, "name_or_path", None) or None)
    if fixed_length:    # every text padded to the graph's length whatever the batch: on the tokenizer's side,
        # as a deployment feeding the graph pads it
        enc = tokenize_texts(tokenizer, list(items), min(int(max_length), int(fixed_length)))
        enc = tokenizer.pad(enc, padding="max_length", max_length=int(fixed_length), return_tensors="pt",
                            return_attention_mask=True)
    else:
        enc = tokenize_texts(tokenizer, list(items), max_length, padding=True, return_tensors="pt",
                             return_attention_mask=True, padding_side="right")
    enc = dict(enc)
    empty = torch.nonzero(enc["attention_mask"].sum(1) == 0).flatten().tolist() if "attention_mask" in enc else []
    if empty:
        text = str(list(items)[empty[0]])
        shown = ascii(text if len(text) <= 40 else text[:37] + "...")
        raise NoTokens(f"a text the tokenizer reads as no tokens at all ({shown}: every character of it is one the "
                       "tokenizer drops); remove it from the data", empty[0])
    return enc


def text_input_order(names: Sequence[str]) -> list[str]:
    """``input_ids, attention_mask, token_type_ids`` first (those present), then the rest sorted."""
    known = [n for n in TEXT_INPUTS if n in names]
    return known + sorted(n for n in names if n not in known)


def tokenizer_input_names(tokenizer) -> list[str]:
    """The inputs a tokenizer's batches carry (``model_input_names``), in ONNX input order."""
    names = list(getattr(tokenizer, "model_input_names", None) or ("input_ids", "attention_mask"))
    return text_input_order(names)


__all__ = ["DEFAULT_MAX_LENGTH", "TEXT_INPUTS", "TOKENIZER_FILES", "bounded_texts", "collate_texts", "first_line",
           "has_tokenizer_files", "load_tokenizer", "max_positions_beside", "quiet_transformers",
           "resolve_max_length",
           "text_input_order", "tokenize_texts", "tokenizer_digest", "tokenizer_files", "tokenizer_input_names",
           "tokenizer_preprocess_id"]
