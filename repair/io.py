"""File I/O shared by adapters, export and the CLI: weights reading with clear
errors, deterministic safetensors writing, and atomic outputs (write to a temporary
sibling, then rename).

Temporary folders beside an output are ours by name: ``.<name>.<random>.tmp``
(:func:`atomic_output`) and ``.<name>.work-<random>`` (:func:`scratch_dir`, the scratch
space of model repairs). Each holds a lock file (``.repair-lock``: the owner's pid and
host, ``flock``-ed while the owner runs). The next run writing the same output removes
the ones whose owner is gone (:func:`clean_stale_temps`) and says so on stderr; a folder
whose lock is held (a run in progress, in any process) is left alone, and nothing not
named like ours is ever touched.

What ``force`` may replace is one rule, :func:`replace_refused`, applied by :func:`check_output` (before
any work) and by :meth:`OutputSet.stage` (when writing): a symbolic link (the link, never its target), a
regular file (unless the output is a folder), an empty folder, or a folder repair wrote that holds
nothing else: every folder output gets a record of the files written in it (:data:`OUTPUT_RECORD`,
written as it is put in place), and a folder is replaced only while each file in it is one the record
lists at its size. Any other folder is the user's and is never replaced: :class:`BadInput`, nothing
written or deleted.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional


from .errors import BadInput, no_warnings

if TYPE_CHECKING:                   # annotations only: torch is imported where it runs
    import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}
LOCK_NAME = ".repair-lock"
#: a temp folder of ours without a lock file is stale after this long (it got its lock file an
#: instant after it was made, or it was the write probe of :func:`check_output`)
UNLOCKED_STALE_SECONDS = 3600
#: a place written to that is full (a disk, a quota, a file size limit)
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: errors of the place written to, not of ours: reported as bad input (exit 2) naming the output
USER_ERRNOS = {*FULL_ERRNOS, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR}


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise BadInput("file not found", path)
    if path.is_dir():
        raise BadInput("expected a .safetensors file, got a folder", path)
    if not path.is_file():
        raise BadInput("expected a .safetensors file, got a device or other special file", path)
    check_readable_weights(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for truncation/corruption
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"not a readable safetensors file ({msg})", path) from None
    if not tensors:
        raise BadInput("safetensors file holds no tensors", path)
    return tensors, metadata


def check_readable_weights(path: Path) -> None:
    """:class:`BadInput` naming ``path`` when the weights file cannot be opened for reading (no read
    permission): said as such, not as the loader's own text (safetensors reports it as "No such file or
    directory")."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise BadInput(f"cannot read the weights file ({e.strerror or e})", path) from None


def pickled_state_dict(obj):
    """What a weights pickle holds as its state dict: ``obj``, or its ``state_dict`` entry (a training
    checkpoint's ``{"state_dict": ..., "epoch": ...}``): the one home of that rule (loading, and the
    check that the file still holds what was loaded)."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    return obj


def _torch_load_reason(e: BaseException) -> str:
    """What torch.load(weights_only=True) found wrong, in one line: its unpickler's own reason (torch's text
    around it advises weights_only=False, the load that runs the file's code, and colours its words with
    terminal escapes), else the first sentence of its first line."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    line = text.splitlines()[0].strip() if text else ""
    line = re.split(r"(?<=[a-z0-9_\]\)])\. ", line, maxsplit=1)[0].rstrip(".")
    return line or type(e).__name__


def load_state_dict_file(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors always; pickle files only with ``allow_pickle`` and then ``weights_only=True``."""
    import torch
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            from .rules import Worded     # a zoo has no allow_pickle: its words leave that advice out

            raise Worded("pickle checkpoints can run arbitrary code when loaded; convert to .safetensors[ or pass "
                         "{allow_pickle} (loaded with weights_only=True)]", path=path)
        if not path.exists():
            raise BadInput("file not found", path)
        if not path.is_file():
            raise BadInput("expected a weights file, got a folder or special file", path)
        check_readable_weights(path)
        try:
            with no_warnings():     # torch warns on some refused pickles: the error says it all
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInput(f"not a loadable weights-only pickle ({_torch_load_reason(e)}); repair loads pickles "
                           "only with weights_only=True: convert it to .safetensors where it was made", path) from None
        obj = pickled_state_dict(obj)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise BadInput("pickle does not hold a state dict of tensors", path)
        return dict(obj), {}
    return load_safetensors(path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the metadata in sorted key order (safetensors writes
    it in hash order, which differs from process to process), so equal inputs give equal bytes.
    A failed write is an ``OSError`` with its errno (safetensors wraps it in its own error)."""
    from safetensors.torch import save_file

    # tensors that share memory (a pickle checkpoint's tied weights: safetensors refuses them) are
    # written each as its own copy, under every name the checkpoint gave them
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else 0
        out[k] = v.clone() if ptr and ptr in seen else v
        seen.add(ptr)
    try:
        save_file(out, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:
        m = re.search(r"os error (\d+)", str(e))
        if m:
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None
        raise
    if metadata:
        _sort_header(Path(path))
    os.chmod(path, 0o666 & ~current_umask())     # as any file the user writes (safetensors makes it 0600)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the largest safetensors header read (safetensors' own limit)
MAX_HEADER_BYTES = 100_000_000


def _read_header(f, size: Optional[int] = None) -> tuple[int, dict]:
    """The length and the JSON header of the safetensors file open as ``f`` (at its start), reading
    nothing past the header. ``ValueError`` when it is not one (``size``: the file's size, to check
    the header fits in it)."""
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or (size is not None and n > size - 8):
        raise ValueError("not a safetensors header length")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    return n, header


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header in place: ``__metadata__`` first with sorted keys, the
    tensors in data order. The header keeps its length (safetensors pads it with spaces)."""
    with open(path, "r+b") as f:
        n, header = _read_header(f)
        meta = header.pop("__metadata__", None)
        out = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
        out.update(sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])))
        new = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) > n:        # cannot happen for a header safetensors wrote; leave it as written
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


# ------------------------------------------------------------------ outputs
def _temp_name_re(name: str) -> re.Pattern:
    return re.compile(r"\." + re.escape(name) + r"\.(?:[a-z0-9_]{8}\.tmp|work-[a-z0-9_]{8})")


def _lock(folder: Path) -> Optional[int]:
    """Create the lock file of a temp folder we just made and hold its lock; the fd (closed, so
    released, when the process ends in any way)."""
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    held = False
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except OSError:          # a file system without locks: the pid decides (same host only)
            pass
    os.write(fd, f"{os.getpid()} {socket.gethostname()} {'flock' if held else 'nolock'}\n".encode())
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _stale(folder: Path) -> bool:
    """Whether a temp folder of ours was left by a run that is gone."""
    try:
        st = folder.lstat()
    except OSError:
        return False
    if not folder.is_dir() or folder.is_symlink() or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
        return False
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return time.time() - st.st_mtime > UNLOCKED_STALE_SECONDS
    except OSError:
        return False
    try:
        owner = os.read(fd, 256).decode("utf-8", "replace").split()
        if len(owner) >= 3 and owner[2] == "flock" and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False                       # held: its run is in progress
            return True
        # no lock was held: a dead pid on this host is stale; another host's, only when very old
        if len(owner) >= 2 and owner[0].isdigit() and owner[1] == socket.gethostname():
            return not _pid_alive(int(owner[0]))
        return time.time() - st.st_mtime > 7 * 24 * 3600
    finally:
        os.close(fd)


def clean_stale_temps(final: Path, log: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Remove the temp folders of ours (see the module docstring) beside ``final`` that an
    interrupted run left; say so through ``log`` (default: stderr). Returns what was removed."""
    final = Path(final)
    parent = final.parent if str(final.parent) else Path(".")
    pattern = _temp_name_re(final.name)
    try:
        entries = [p for p in parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    removed = []
    for p in sorted(entries):
        if _stale(p):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
                (log or _stderr)(f"notice: removed {p}: a temporary folder left by an interrupted run")
    return removed


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _reason(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "no space left on the device"
    if e.errno == errno.ENOENT:     # a folder that exists but takes no new entries (/proc, /sys)
        return "the folder does not accept new files"
    return e.strerror or str(e)


def user_side(e: BaseException) -> Optional[int]:
    """The errno of a write failure caused by the place written to (full, read-only, not
    allowed), else None. ``shutil.Error`` (copytree) carries its causes as text."""
    if isinstance(e, shutil.Error):
        text = str(e.args[0] if e.args else e)
        for code in USER_ERRNOS:
            if f"[Errno {code}]" in text:
                return code
        return None
    if isinstance(e, OSError) and e.errno in USER_ERRNOS:
        return e.errno
    return None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def parse_json(text, unique_keys: bool = False):
    """``json.loads`` for a file the user gave: a document nested too deeply to parse, or holding an
    integer of more digits than Python converts (``sys.get_int_max_str_digits()``, 4300 by default),
    is a ``json.JSONDecodeError`` too (a ``RecursionError`` or a bare ``ValueError`` would be an
    internal error), so every caller's "not valid JSON" covers them. ``unique_keys``: an object
    that names a key twice is one too (``json`` keeps the last value silently; a data record whose
    ``label`` is given twice has no one label)."""
    doc = text if isinstance(text, str) else ""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys) if unique_keys else json.loads(text)
    except _DuplicateKey as e:
        raise json.JSONDecodeError(f"the key {e.args[0]!r} is given twice in one object", doc, 0) from None
    except (json.JSONDecodeError, UnicodeDecodeError):     # bytes given: the caller's decode error
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", doc, 0) from None
    except ValueError:              # int()'s digit limit: the only other ValueError json raises
        limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300
        # where: the first run of more digits than the limit (the number int() refused)
        m = re.search(r"\d{%d,}" % (limit + 1), doc) if limit else None
        raise json.JSONDecodeError(f"an integer has more than {limit} digits", doc,
                                   m.start() if m else 0) from None


#: characters shown as escapes wherever a user's name (a class, a group value, a file, a model) reaches a
#: terminal or a page: C0/C1 controls but tab and newline (ESC sequences drive terminals) and the
#: invisible format characters (bidi overrides and isolates, zero-width marks), which can make text
#: read otherwise than it is ("Trojan Source")
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def check_one_line(name: str, what: str, where=None) -> str:
    """``name`` (a class name, a group value: a name the output shows inside its lines), or
    :class:`BadInput` naming ``what`` and ``where`` when it holds a line break. A newline is the one
    control character :func:`visible` leaves as it is (it separates the lines of every message), so a
    name holding one would print lines of its own -- a group value ``"x\\ngate passed: ..."`` a
    forged gate line in a CI log. The one home of that rule (the class names' check, the group
    column's, a zoo row's name)."""
    if "\n" in name:
        raise BadInput(f"{what} {name!r} holds a line break; every name is shown on one line of the "
                       "output", where)
    return name


def one_line(text) -> str:
    """``text`` on one line whatever a name in it holds: a line break written ``\\n`` (``\\r``). The one
    rule of every line the command line prints about a run: its failure lines, the paths on stdout, its log
    lines on stderr (a path holding a line break would print a line of its own: ``gate passed: ...``)."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def visible(text: str) -> str:
    """``text`` with every control and invisible format character written as ``\\uXXXX`` (the one rule
    for what of a user's names is shown as it is: the CLI's messages and the HTML report)."""
    return _HIDDEN.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def json_text(doc: Any, indent: int = 2) -> str:
    """``doc`` as strict JSON (RFC 8259: no NaN or Infinity, which jq and JSON.parse refuse): a
    non-finite float is written as null; anything else JSON does not know as its ``str``. The one
    writer of every JSON document the tool prints or saves."""
    import json
    import math

    def clean(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(doc), indent=indent, default=str, allow_nan=False) + "\n"


# ------------------------------------------------------------------ what --force may replace
#: the record every folder output holds (written by :meth:`OutputSet.commit` as the folder is put in
#: place): each file repair wrote in it, by its path in the folder, with its size
OUTPUT_RECORD = ".repair-output.json"
#: the largest output record read (a line per file written)
MAX_RECORD_BYTES = 64 << 20
#: what an output is: a file, a folder, or not known to the caller (None)
OUTPUT_KINDS = ("file", "folder")
_NOT_OURS = (f"is a folder that repair did not write (it has no {OUTPUT_RECORD}, the record of the files repair "
             "writes in its folders), so --force does not replace it; choose another output or delete it yourself")


def _open_entry(dir_fd: int, name: str):
    """The regular file ``name`` in the folder open as ``dir_fd``, opened for reading with its size
    (a symlink is never followed, a FIFO never blocks); None when it is anything else or missing."""
    import stat as stat_

    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat_.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb"), st.st_size
    except OSError:
        os.close(fd)
        return None


def folder_entries(folder: Path, skip: str = OUTPUT_RECORD) -> dict[str, int]:
    """Every entry below ``folder`` but folders (and ``skip``, the record at its top that lists them):
    its path relative to the folder (``/``-separated) -> its size, or -1 for anything not a regular file
    (a link, a FIFO, ...). Links are never followed. The listing of every record of what was written (this
    module's, the demo's marker)."""
    out: dict[str, int] = {}

    def walk(d: Path, rel: str) -> None:
        with os.scandir(d) as it:
            for e in it:
                r = f"{rel}{e.name}"
                if e.is_dir(follow_symlinks=False):
                    walk(Path(e.path), r + "/")
                elif r != skip:
                    out[r] = e.stat(follow_symlinks=False).st_size if e.is_file(follow_symlinks=False) else -1

    walk(Path(folder), "")
    return dict(sorted(out.items()))


def write_output_record(folder: Path) -> None:
    """Write :data:`OUTPUT_RECORD` in ``folder`` (a staged output, complete): what is in it now."""
    doc = {"written_by": "repair", "files": folder_entries(folder)}
    (Path(folder) / OUTPUT_RECORD).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def repair_wrote(folder: Path) -> Optional[str]:
    """None when ``folder`` (a folder itself, not a link to one) is an output repair wrote and holds
    nothing else: its :data:`OUTPUT_RECORD` lists every file in it at its size (a file of the output
    deleted since is fine); else why not. Never follows a symlink."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        dfd = os.open(folder, flags)
    except OSError as e:
        return f"is a folder that cannot be read ({e.strerror or e}), so --force does not replace it"
    try:
        opened = _open_entry(dfd, OUTPUT_RECORD)
        if opened is None:
            return _NOT_OURS
        f, size = opened
        with f:
            try:
                doc = json.loads(f.read(MAX_RECORD_BYTES + 1)) if size <= MAX_RECORD_BYTES else None
            except (ValueError, OSError, RecursionError):
                doc = None
    finally:
        os.close(dfd)
    listed = doc.get("files") if isinstance(doc, dict) and doc.get("written_by") == "repair" else None
    if not isinstance(listed, dict):
        return _NOT_OURS
    try:
        now = folder_entries(folder)
    except OSError as e:
        return f"is a folder that cannot be read ({e.strerror or e}), so --force does not replace it"
    for rel, n in now.items():
        if listed.get(rel) != n or n < 0:
            why = ("is not a file repair wrote there" if rel not in listed else
                   "is a link or special file" if n < 0 else "changed since repair wrote it")
            return (f"is a folder repair wrote, but {rel} {why}, so --force does not replace it (it replaces "
                    "an output only while it holds nothing but what repair wrote); move it out, or choose "
                    "another output")
    return None


def replace_refused(final: Path, kind: Optional[str] = None) -> Optional[str]:
    """Why ``--force`` may not replace what is at ``final`` (None: it may, or nothing is there): the
    one rule of every output. ``kind``: what the output is (``"file"``, ``"folder"``; None: not known).

    - a symbolic link: the link is replaced, never its target;
    - a regular file: replaced, unless the output is a folder;
    - a folder: replaced only when it is empty, or, for an output that is not a file, when repair
      wrote it and it holds nothing else (:func:`repair_wrote`); anything else in it is the user's;
    - a device, FIFO or socket: never."""
    import stat as stat_

    if kind is not None and kind not in OUTPUT_KINDS:
        raise ValueError(f"an output is a file or a folder, not {kind!r}")
    try:
        st = os.lstat(final)
    except OSError:
        return None                  # nothing there (or nothing that can be reached: the write probe says)
    if stat_.S_ISLNK(st.st_mode):
        return None
    if stat_.S_ISREG(st.st_mode):
        return (None if kind != "folder" else
                "is a file, and the output is a folder, so --force does not replace it; choose another "
                "output or delete it yourself")
    if not stat_.S_ISDIR(st.st_mode):
        return ("is a device, FIFO or socket, not a file or folder, so --force does not replace it; choose "
                "another output")
    try:
        with os.scandir(final) as it:
            empty = next(it, None) is None
    except OSError as e:
        return f"is a folder that cannot be read ({e.strerror or e}), so --force does not replace it"
    if empty:
        return None
    if kind == "file":
        return ("is a folder, and the output is a file, so --force does not replace it (only an empty "
                "folder); choose another output or delete it yourself")
    return repair_wrote(final)


#: an output whose folder is missing: nothing creates the folders above an output
NO_PARENT = "output folder does not exist (the folder an output goes in must exist: create it first)"

#: an output that was not there when the run began, and is now: another run's (or the user's)
_APPEARED = ("output appeared while this run worked (another run writing the same path?); nothing of this "
             "run was written (use --force to overwrite)")


def _appeared(why: Optional[str]) -> str:
    """What appeared at an output while the run worked: how to replace it, or why even ``--force`` would
    not (:func:`replace_refused`)."""
    return _APPEARED if not why else (f"output appeared while this run worked (another run writing the same "
                                      f"path?) and {why}; nothing of this run was written")


def _exists_message(why: Optional[str]) -> str:
    """An existing output without ``--force``: how to replace it, or why even ``--force`` would not."""
    return f"output already exists and {why}" if why else "output already exists (use --force to overwrite)"


def check_replace(final: Path, *, kind: Optional[str] = None) -> None:
    """:class:`BadInput` naming ``final`` when ``--force`` may not replace what is there
    (:func:`replace_refused`)."""
    why = replace_refused(Path(final), kind)
    if why:
        raise BadInput(why, final)


def check_reachable(final: Path) -> None:
    """:class:`BadInput` naming ``final`` when whether anything is there cannot even be looked up: a
    folder above it that cannot be entered (no search permission), the same refusal as a folder that
    takes no new file (``cannot write in FOLDER (Permission denied)``). Every output's first check
    (:func:`check_output`, :meth:`OutputSet.stage`): ``Path.exists()`` raises there, which was an
    internal error."""
    final = Path(final)
    try:
        os.lstat(final)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            parent = final.parent if str(final.parent) else Path(".")
            raise BadInput(f"cannot write in {parent} ({_reason(e)})", final) from None


def check_output(final: Path, *, force: bool = False, log: Optional[Callable[[str], None]] = None,
                 kind: Optional[str] = None, owned: bool = False) -> Path:
    """Check, before any work, that ``final`` can be written: it does not exist (unless ``force``,
    and then what is there is one ``force`` may replace: :func:`replace_refused`, given the output's
    ``kind`` where the caller knows it), its folder exists and is a folder, and a file can be created
    there (a real probe: permissions, read-only mounts, /proc). Removes stale temps of ours beside it.
    ``owned``: the caller has itself verified that what is at ``final`` is an output of its own (the
    demo's marker check), so the rule is not applied again."""
    final = Path(final)
    if final.name in ("", ".."):                 # '.', '..', 'dir/..': no name to stage it under
        raise BadInput("an output must be named: a file or folder name, not '.' or '..'", final)
    parent = final.parent if str(final.parent) else Path(".")
    check_reachable(final)
    if (final.exists() or final.is_symlink()) and not force:
        # an interrupted run's temporaries beside it go first (a refused rerun left them until a --force)
        if parent.is_dir():
            clean_stale_temps(final, log)
        raise BadInput(_exists_message(None if owned else replace_refused(final, kind)), final)
    if not owned:
        check_replace(final, kind=kind)
    if not parent.is_dir():
        for anc in (parent, *parent.parents):
            if anc.exists() or anc.is_symlink():
                if not anc.is_dir():
                    raise BadInput(f"cannot write below {anc}: it is a file, not a folder", final)
                break
        raise BadInput(NO_PARENT, parent)
    clean_stale_temps(final, log)
    try:
        # named as the longest temporary a run makes beside the output (its scratch folder, scratch_dir):
        # a name the file system takes for the output but not for that is refused here, before any work
        probe = tempfile.mkdtemp(prefix=f".{final.name}.work-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise BadInput(f"cannot write in {parent} ({_reason(e)})", final) from None
    return final


def _make_temp(parent: Path, prefix: str, suffix: str, final: Path) -> tuple[Path, int]:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    except OSError as e:
        raise BadInput(f"cannot write in {parent} ({_reason(e)})", final) from None
    try:
        fd = _lock(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadInput(f"cannot write in {parent} ({_reason(e)})", final) from None
    return tmp, fd


@contextlib.contextmanager
def scratch_dir(final: Path, log: Optional[Callable[[str], None]] = None) -> Iterator[Path]:
    """A locked scratch folder ``.<name>.work-<random>`` beside ``final`` (so files made in it
    can be moved into place with the output), removed whatever happens."""
    final = Path(final)
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(NO_PARENT, parent)
    clean_stale_temps(final, log)
    tmp, fd = _make_temp(parent, f".{final.name}.work-", "", final)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


_RENAME_NOREPLACE: Any = None        # libc's renameat2, looked up once (False: not there)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only when ``dst`` does not exist: atomically where the kernel can
    (Linux ``renameat2(RENAME_NOREPLACE)``), else checked just before the rename. ``FileExistsError``
    when ``dst`` exists -- another run put its output there meanwhile, and a plain rename would
    replace it unasked (a file, an empty folder) or merge into it."""
    global _RENAME_NOREPLACE
    if _RENAME_NOREPLACE is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _RENAME_NOREPLACE = fn
        except (OSError, AttributeError):
            _RENAME_NOREPLACE = False
    if _RENAME_NOREPLACE:
        import ctypes

        at_fdcwd, noreplace = -100, 1
        if _RENAME_NOREPLACE(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(dst)) if code != errno.EEXIST else \
                FileExistsError(code, os.strerror(code), str(dst))
    if os.path.lexists(dst):          # no atomic way on this system: checked, then renamed
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def check_place(final: Path, *, may_replace: bool, kind: Optional[str] = None, owned: bool = False) -> bool:
    """Whether something is at ``final`` that putting an output there replaces (False: nothing is); BadInput
    naming ``final`` when it may not be replaced: unless ``may_replace`` (``--force``, or the caller's own
    output written again) anything there appeared while the run worked, and unless the caller ``owned`` it
    (see :func:`check_output`) only what :func:`replace_refused` allows for an output of ``kind`` is replaced
    -- asked again at the commit, as a user may have put something there meanwhile. The one rule of a
    commit's place: :meth:`OutputSet.commit` and a zoo's staged commit (:func:`repair.zoo.check_commit`)."""
    final = Path(final)
    if not os.path.lexists(final):
        return False
    why = None if owned else replace_refused(final, kind)
    if not may_replace:
        raise BadInput(_appeared(why), final)
    if why:
        raise BadInput(why, final)
    return True


def put_in_place(staged: Path, final: Path, aside: Path, *, may_replace: bool, kind: Optional[str] = None,
                 owned: bool = False) -> Optional[Path]:
    """Rename ``staged`` to ``final``: the one step of every commit (:meth:`OutputSet.commit`, a zoo's
    :func:`repair.zoo.commit_staged`). What is at ``final`` is replaced only as :func:`check_place` allows:
    it is moved to ``aside`` first (a link is moved, never its target) and ``aside`` returned, for a caller
    that undoes its commit (None: nothing was there). The rename never replaces what appeared meanwhile
    (:func:`rename_noreplace`; BadInput naming ``final``, what appeared stays); any other failure of it puts
    the replaced one back."""
    final = Path(final)
    replaced = None
    if check_place(final, may_replace=may_replace, kind=kind, owned=owned):
        os.replace(final, aside)
        replaced = Path(aside)
    try:
        rename_noreplace(staged, final)
    except FileExistsError:               # what appeared stays (with --force, the old one goes)
        raise BadInput(_APPEARED, final) from None
    except BaseException:
        if replaced is not None:
            os.replace(replaced, final)
        raise
    return replaced


#: every output an :class:`OutputSet` committed in this process into a place of the user's, in order: a
#: command interrupted after its commit says what it wrote (:func:`committed_since`). Not recorded: an
#: output committed inside another set's staging folder (the demo's parts: that set commits them, or
#: nothing), nor anything under :func:`not_recorded` (a zoo: its journal says what is done)
_COMMITTED: list = []
_STAGING: set = set()                     # the staging folders of the sets not yet closed
_UNRECORDED = [0]


def commit_mark() -> int:
    """A mark for :func:`committed_since`: take it when a command starts."""
    return len(_COMMITTED)


def committed_since(mark: int) -> list:
    """The outputs committed (renamed into place, complete) since ``mark`` that are still there."""
    return [p for p in _COMMITTED[mark:] if os.path.lexists(p)]


@contextlib.contextmanager
def not_recorded() -> Iterator[None]:
    """Commits in the block are not recorded for :func:`committed_since` (work whose own record says
    what is done and what a rerun does: a zoo's journal)."""
    _UNRECORDED[0] += 1
    try:
        yield
    finally:
        _UNRECORDED[0] -= 1


def _record_commits(finals) -> None:
    if _UNRECORDED[0]:
        return
    for final in finals:
        a = os.path.abspath(final)
        if not any(a.startswith(os.path.join(os.path.abspath(t), "")) for t in list(_STAGING)):
            _COMMITTED.append(final)


def _commit_locks(finals, log: Optional[Callable[[str], None]] = None) -> list:
    """Exclusive locks (``flock``) on every output name of a commit, taken in one order (no two commits
    wait on each other), held while its outputs are renamed into place: two runs writing the same
    outputs (``--force``, two CI jobs) commit one after the other, so one run's whole set ends in place,
    never the model of one beside the report of the other. The lock files live in the system's temporary
    folder (``repair-commit-locks-<uid>``, one per output path by its hash: nothing is written beside the
    outputs; the folder must be this user's own, private, and no link: a planted one is not used); where
    they cannot be made or locked, the commit goes on without (as before). A commit that must wait says
    so (``log``, default stderr). The lock is per user and temporary folder: two users, two ``$TMPDIR``
    or two hosts on a shared disk are not serialized. Returns ``(descriptor, path)`` of each, for
    :func:`_release_commit_locks`; interrupted while waiting, it releases those it took."""
    import hashlib
    import stat as stat_

    # an output by its folder's real path and its own name (an output that is a link is replaced, not
    # followed)
    names = sorted({os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(f))), os.path.basename(f))
                    for f in finals})
    fds: list = []
    try:
        import fcntl

        folder = os.path.join(tempfile.gettempdir(), f"repair-commit-locks-{os.getuid()}")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
        if not stat_.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return fds                  # not our own private folder (planted, shared): no locks
        for name in names:
            path = os.path.join(folder, hashlib.sha256(os.fsencode(name)).hexdigest()[:32] + ".lock")
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    (log or _stderr_line)(f"notice: waiting for another run that is writing {name}")
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                    except BaseException:
                        os.close(fd)
                        raise
                try:
                    same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:                # (else the holder before us removed it: lock the one there now)
                    fds.append((fd, path))
                    break
                os.close(fd)
    except (OSError, ImportError, AttributeError):       # (no fcntl / getuid: not a POSIX system)
        pass
    except BaseException:               # interrupted while waiting: the locks taken are released
        _release_commit_locks(fds)
        raise
    return fds


def _stderr_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _release_commit_locks(held: list) -> None:
    """Remove each lock file while still holding it, then release it (a run waiting on it then finds
    another file at its name and locks that one: :func:`_commit_locks`): nothing piles up."""
    for fd, path in reversed(held):
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.close(fd)


class OutputSet:
    """Several outputs written all or nothing: each is staged in a locked temporary folder beside
    its final name (``.<name>.<random>.tmp``); :meth:`commit` renames them all into place, and if
    one rename fails the ones already done are undone (a replaced output comes back). Use it
    through :func:`outputs`; :func:`atomic_output` is the one-output case."""

    def __init__(self, *, force: bool = False, log: Optional[Callable[[str], None]] = None):
        self.force, self.log = force, log
        self._staged: list[tuple[Path, Path, int, Path]] = []      # (final, tmp folder, lock fd, target)
        self._owned: set[Path] = set()          # staged by a caller with a record of its own (the demo)
        self._kinds: dict[Path, Optional[str]] = {}     # the others: what each output is
        self._may_replace: dict[Path, bool] = {}        # --force given for it

    def stage(self, final: Path, *, is_dir: bool = False, force: Optional[bool] = None,
              kind: Optional[str] = None, owned: bool = False) -> Path:
        """A not-yet-existing path (an empty folder with ``is_dir``) to write ``final``'s content to.
        ``force``: replace an existing ``final`` (default: the set's ``force``) -- only one that
        :func:`replace_refused` allows for an output of ``kind`` (``"folder"`` with ``is_dir``), unless
        the caller ``owned`` it (see :func:`check_output`)."""
        final = Path(final)
        if any(f == final for f, *_ in self._staged):
            raise ValueError(f"{final} staged twice")
        kind = "folder" if is_dir else kind
        force = self.force if force is None else force
        check_reachable(final)
        if (final.exists() or final.is_symlink()) and not force:
            raise BadInput(_exists_message(None if owned else replace_refused(final, kind)), final)
        if not owned:
            check_replace(final, kind=kind)
        parent = final.parent if str(final.parent) else Path(".")
        if not parent.exists():
            raise BadInput(NO_PARENT, parent)
        clean_stale_temps(final, self.log)
        tmp, fd = _make_temp(parent, f".{final.name}.", ".tmp", final)
        target = tmp / final.name
        self._staged.append((final, tmp, fd, target))
        _STAGING.add(tmp)
        self._may_replace[final] = bool(force)
        if owned:
            self._owned.add(final)
        else:
            self._kinds[final] = kind
        if is_dir:
            target.mkdir()
        return target

    def commit(self) -> None:
        for final, _tmp, _fd, target in self._staged:       # every folder output says what repair wrote in it
            if final not in self._owned and target.is_dir() and not target.is_symlink():
                write_output_record(target)
        done: list[tuple[Path, Path, Optional[Path]]] = []        # (final, target, replaced copy)
        locks: list = []
        try:
            locks = _commit_locks([final for final, _tmp, _fd, _target in self._staged], self.log)
            for final, tmp, _fd, target in self._staged:
                replaced = put_in_place(target, final, tmp / f".replaced-{final.name}",
                                        may_replace=self._may_replace.get(final, False),
                                        kind=self._kinds.get(final), owned=final in self._owned)
                done.append((final, target, replaced))
            _record_commits(final for final, _t, _r in done)
        except BaseException:
            for final, target, replaced in reversed(done):    # undo: nothing half-committed
                with contextlib.suppress(OSError):
                    os.replace(final, target)
                    if replaced is not None:
                        os.replace(replaced, final)
            raise
        finally:
            _release_commit_locks(locks)

    def close(self) -> None:
        """Every staging folder removed, whatever arrives meanwhile: a Ctrl-C or SIGTERM during the removal
        of one (``KeyboardInterrupt``, :class:`repair.errors.Terminated`) does not leave the others behind;
        it is raised once all are gone."""
        pending: Optional[BaseException] = None
        for _final, tmp, fd, _target in self._staged:
            for _ in range(3):          # a second signal may cut the removal again: try again
                try:
                    shutil.rmtree(tmp, ignore_errors=True)
                    break
                except BaseException as e:       # noqa: B036 -- cleaned up first, raised after
                    pending = pending or e
            _STAGING.discard(tmp)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._staged = []
        if pending is not None:
            raise pending


@contextlib.contextmanager
def outputs(*, force: bool = False, log: Optional[Callable[[str], None]] = None) -> Iterator[OutputSet]:
    """An :class:`OutputSet`, committed when the block ends without error and removed whatever
    happens. A write that fails because of the place (full disk, read-only, not allowed) is
    :class:`BadInput` naming the output, with nothing left behind."""
    tx = OutputSet(force=force, log=log)
    try:
        yield tx
        tx.commit()
    except (OSError, shutil.Error) as e:
        code = user_side(e)
        if code is None:
            raise
        where = getattr(e, "filename", None) or (tx._staged[0][0] if tx._staged else None)
        raise BadInput(f"cannot write the output ({_reason(OSError(code, os.strerror(code)))}); "
                       "nothing was written", _final_of(tx, where)) from None
    except BadInput as e:
        # an output written inside one of these (an ONNX file in a staged folder, with its own
        # atomic_output) names its temporary path: the user's name for it is the final one
        final = _final_of(tx, e.path) if e.path is not None else None
        if final is None or Path(e.path) == final:
            raise
        inner = Path(e.path)
        for _f, tmp, _fd, target in tx._staged:
            if tmp in inner.parents and target in inner.parents:
                final = final / inner.relative_to(target)     # the file's place in the final output
                break
        raise BadInput(e.problem, final) from None
    finally:
        tx.close()


def _final_of(tx: OutputSet, where) -> Optional[Path]:
    """The final output a failing path belongs to (a temp path names its output)."""
    if where is None:
        return None
    w = Path(str(where))
    for final, tmp, _fd, _target in tx._staged:
        if w == final or tmp in w.parents or w == tmp:
            return final
    return w


@contextlib.contextmanager
def atomic_output(final: Path, *, force: bool = False, is_dir: bool = False,
                  log: Optional[Callable[[str], None]] = None, kind: Optional[str] = None,
                  owned: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (inside a locked ``.<name>.<random>.tmp``
    folder; with ``is_dir`` an empty folder); rename it into place on success, remove it on any
    error. An existing ``final`` is replaced only with ``force``, and only one that
    :func:`replace_refused` allows (``kind``, ``owned``: see :meth:`OutputSet.stage`). One output of
    :func:`outputs`."""
    with outputs(force=force, log=log) as tx:
        yield tx.stage(final, is_dir=is_dir, kind=kind, owned=owned)


def as_path(value, what: str) -> Path:
    """``value`` as a Path, or BadInput naming ``what`` when it is not a path (str or os.PathLike):
    the one check of a path argument given from Python (None, a number, an array, a DataFrame)."""
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)):
        raise BadInput(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")
    return Path(value)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (the one file digest: checkpoints, a factory's
    source, a zoo's inputs and outputs)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
