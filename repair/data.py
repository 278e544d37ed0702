"""Repair sets: image folders / metadata.csv, and text CSV/TSV/JSONL (or a .json array of objects).

``load_data`` reads the raw items, labels and attribute columns; ``encode``
matches labels to the model's class order and builds groups (class x attribute).

What is read is bounded: a table's image paths stay inside the data folder (symlinks
followed) unless ``DataOptions.allow_outside_paths``; only regular files are opened (a FIFO
is refused, never read); an image is decoded by :func:`read_image` alone (every PIL mode
converted by its meaning or refused by name, at most ``DataOptions.max_pixels`` pixels).
``RepairData.files()`` lists every file read; ``RepairData.duplicate_ids()`` groups identical
samples for the splitters of :mod:`repair.selection`.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import stat
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence


from .errors import BadInput, SharedSetting, no_warnings
from .io import check_one_line, parse_json

if TYPE_CHECKING:                   # annotations only: torch and PIL are imported where they run
    import PIL.Image
    import torch

# (check_bool lived here before it moved to the option rules; importable from here for code that imports it)
from .rules import check_bool, is_whole_number  # noqa: E402,F401

#: the names of image files (a class folder's other files are no samples: each load says so in the data's
#: ``notes``); ``.jfif`` (what Chrome saves a JPEG as) and ``.jpe`` are JPEG names too
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: the formats PIL may decode an image file as (by its content, whatever its name): those of
#: :data:`IMAGE_SUFFIXES` (PIL's JPEG opener also reads a camera's multi-picture JPEG). No other
#: decoder runs: PIL's EPS plugin, for one, starts Ghostscript on the file
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json"}
PATH_COLUMNS = ("img_filename", "filename", "image", "image_path", "img_path", "path", "file")
LABEL_COLUMNS = ("y", "label", "labels", "class", "target")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "sentence1")
METADATA_NAMES = ("metadata.csv", "metadata.tsv", "metadata.jsonl", "metadata.json")
#: the default pixel limit of one image (width x height): a larger one is refused (a decompression
#: bomb is a small file that decodes to billions of pixels)
DEFAULT_MAX_PIXELS = 100_000_000

#: the CLI flag of each DataOptions field (errors name the flag the user typed)
OPTION_FLAGS = {"label_col": "--label-col", "path_col": "--path-col", "text_col": "--text-col",
                "group_by": "--group-by", "max_pixels": "--max-pixels",
                "allow_outside_paths": "--allow-outside-paths"}
#: what each DataOptions field means: the command-line help and the zoo manifest field are made from
#: the dataclass, these flags and these lines (one list of data options)
OPTION_HELP = {
    "group_by": "Attribute column; groups = class x attribute value (default: no groups; nothing uses group labels).",
    "label_col": "Column with class labels (default: y/label/class).",
    "path_col": "Column with image paths (default: img_filename/filename/path).",
    "text_col": "Column with texts (default: text/sentence/content).",
    "max_pixels": "Largest image accepted, in pixels (width x height); a larger one is refused by name.",
    "allow_outside_paths": "Let a table list images outside the data folder (they are then protected inputs "
                           "too). Default: refused.",
}


def _advised(rule: str, path, **values):
    """A refusal of the data whose advice names data options (``{max_pixels}``, ``{allow_outside_paths}``):
    worded with this command's flags, and by a zoo with its manifest's fields (:class:`repair.rules.Worded`);
    every other variable part put in by ``values``."""
    from .rules import Worded

    return Worded(rule, values, OPTION_FLAGS, path)


@dataclass
class DataOptions:
    """Which columns mean what, and the limits of what is read; recorded in provenance.
    Validated on construction (:class:`BadInput` naming the CLI flag)."""
    label_col: Optional[str] = None
    path_col: Optional[str] = None
    text_col: Optional[str] = None
    group_by: Optional[str] = None
    #: most pixels (width x height) of one image; a larger image is refused naming it
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: a table may list images outside the data folder (``../x.png``, absolute paths, symlinks
    #: leaving it); off by default: such a row is refused naming the table, the row and the path
    allow_outside_paths: bool = False

    def __post_init__(self):
        from .rules import OptionRefused      # naming the option refused (a zoo blames its field)

        def refuse(option: str, rule: str, subject: bool = True, **values) -> OptionRefused:
            return OptionRefused(option, rule, values, OPTION_FLAGS, subject=subject)

        for name in ("label_col", "path_col", "text_col", "group_by"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise refuse(name, "must be a non-empty column name, got {got}", got=repr(v))
        if self.path_col is not None and self.text_col is not None:
            raise refuse("text_col", "give {path_col} (image data) or {text_col} (text data), not both",
                         subject=False)
        mp = self.max_pixels
        if not is_whole_number(mp, 1):
            raise refuse("max_pixels", "must be a positive whole number, got {got}", got=repr(mp))
        self.max_pixels = int(mp)           # a numpy integer from a notebook: a Python int
        try:
            check_bool(self.allow_outside_paths, "--allow-outside-paths")
        except BadInput as e:
            raise OptionRefused.of("allow_outside_paths", e) from None


@dataclass
class RepairData:
    source: Path
    modality: str                      # "image" | "text"
    items: list                        # image Paths or texts
    labels: list[str]                  # raw label values
    attributes: dict[str, list[str]] = field(default_factory=dict)
    table: Optional[Path] = None       # the metadata/text file read, if any
    #: the pixel limit the images were checked against (``DataOptions.max_pixels``)
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: what the reader found worth saying about the data as a whole (a table of several splits): the
    #: commands put it among their warnings (stderr, ``--json``, a repair's output record, a zoo row)
    notes: list = field(default_factory=list, compare=False)
    #: content hash of every item (filled by :meth:`duplicate_ids`, each image read once)
    _hashes: Optional[list] = field(default=None, repr=False, compare=False)
    #: every image item resolved (symlinks followed), as the loader checked it: resolved once
    _real: Optional[list] = field(default=None, repr=False, compare=False)
    #: how messages name each sample read from a table: its row and its place in the file
    #: (``row 3 (line 5)``: blank lines and texts over several lines make them differ), :meth:`row_at`
    _rows: Optional[list] = field(default=None, repr=False, compare=False)

    def row_at(self, i: int) -> str:
        """How a message names sample ``i`` (0-based): its table row and line, else ``row i+1``."""
        return self._rows[i] if self._rows is not None and i < len(self._rows) else f"row {i + 1}"

    def __len__(self) -> int:
        return len(self.items)

    @property
    def where(self) -> Path:
        """What was read, as messages and reports name it: the table (metadata.csv, a text CSV/JSONL)
        when the data came from one, else the folder. The one home of that rule."""
        return self.table if self.table is not None else self.source

    def files(self) -> list[Path]:
        """Every file this data reads, resolved (symlinks followed): the table, if any, and every
        image. The inputs an output must never replace."""
        out = [Path(self.table).resolve()] if self.table is not None else []
        if self.modality == "image":
            out.extend(self._real_items())
        seen: set = set()
        return [p for p in out if not (p in seen or seen.add(p))]

    def _real_items(self) -> list[Path]:
        """The image items resolved (symlinks followed): the loader's, else resolved now, once."""
        if self._real is None or len(self._real) != len(self.items):
            self._real = [Path(p).resolve() for p in self.items]
        return self._real

    def content_hashes(self) -> list[str]:
        """sha256 of each item's content (an image's bytes, a text's UTF-8), computed once."""
        if self._hashes is None or len(self._hashes) != len(self.items):
            if self.modality == "image":
                self._hashes = [hashlib.sha256(read_image_bytes(p)).hexdigest() for p in self.items]
            else:
                self._hashes = [hashlib.sha256(str(t).encode("utf-8")).hexdigest() for t in self.items]
        return self._hashes

    def duplicate_ids(self, inputs: Optional["torch.Tensor"] = None) -> "torch.Tensor":
        """(N,) int64: identical samples (the same bytes) share an id, ids numbered
        by first appearance (0, 1, ...). Pass it as ``clusters=`` to the splitters of
        :mod:`repair.selection` so copies of one sample never fall on both sides of a split.
        ``inputs`` (:attr:`repair.embeddings.Embeddings.inputs`, one digest row per sample of the
        model's input): samples the model is fed identically share an id too (the same picture saved
        in another format has other bytes; a text in upper case reads as the same tokens to a
        lowercasing tokenizer)."""
        import torch  # noqa: lazy
        if inputs is not None:
            if tuple(inputs.shape[:1]) != (len(self.items),):
                raise ValueError(f"duplicate_ids: {len(self.items)} samples, {tuple(inputs.shape)} input digests")
            first_: dict = {}
            return torch.tensor([first_.setdefault(bytes(r), len(first_)) for r in inputs.numpy()], dtype=torch.long)
        if self.modality == "image" and self._hashes is None:
            # only files of a size another file has can be copies: the others are never read (a warm
            # `repair eval` of a large image set reads no image at all)
            sizes = [Path(p).stat().st_size for p in self.items]
            count: dict[int, int] = {}
            for z in sizes:
                count[z] = count.get(z, 0) + 1
            keys = [(z, hashlib.sha256(read_image_bytes(p)).hexdigest()) if count[z] > 1 else (z, i)
                    for i, (p, z) in enumerate(zip(self.items, sizes))]
        else:
            keys = self.content_hashes()
        first: dict = {}
        ids = [first.setdefault(k, len(first)) for k in keys]
        return torch.tensor(ids, dtype=torch.long)

    def fingerprint(self) -> str:
        """Identifies the items (not labels): part of the embedding cache key. An image by its
        path, size, inode, modification and change time (a file replaced by another of the same
        size with its modification time set back, as ``cp -p`` or ``rsync -t`` do, still gets a
        new change time and inode); a text by its length and its bytes."""
        h = hashlib.sha256(self.modality.encode())
        reals = self._real_items() if self.modality == "image" else None
        for i, it in enumerate(self.items):
            if self.modality == "image":
                st = Path(it).stat()
                # the path as the file system holds it: a name that is not valid UTF-8 (bytes kept
                # as surrogates by Python) hashes as its own bytes
                h.update(os.fsencode(reals[i]) + f"\0{file_stamp(st)}\n".encode())
            else:
                b = it.encode("utf-8")
                h.update(f"{len(b)}:".encode())     # length first: a text holding NUL stays one text
                h.update(b)
        return h.hexdigest()

    def subset(self, idx: Sequence[int]) -> "RepairData":
        return dataclasses.replace(
            self, items=[self.items[i] for i in idx], labels=[self.labels[i] for i in idx],
            attributes={k: [v[i] for i in idx] for k, v in self.attributes.items()},
            _hashes=None if self._hashes is None else [self._hashes[i] for i in idx],
            _real=None if self._real is None or len(self._real) != len(self.items) else [self._real[i] for i in idx],
            _rows=None if self._rows is None or len(self._rows) != len(self.items) else [self._rows[i] for i in idx])


def duplicate_stats(ids) -> dict:
    """Counts for the report from :meth:`RepairData.duplicate_ids`: ``n_samples``;
    ``n_unique`` distinct samples; ``n_duplicates`` samples that repeat an earlier one
    (``n_samples - n_unique``); ``n_clusters`` sets of identical samples with two or more
    members; ``largest_cluster`` the size of the biggest (1 without duplicates)."""
    import torch  # noqa: lazy
    ids = torch.as_tensor(ids).long().reshape(-1)
    if ids.numel() == 0:
        return {"n_samples": 0, "n_unique": 0, "n_duplicates": 0, "n_clusters": 0, "largest_cluster": 0}
    _, counts = torch.unique(ids, return_counts=True)
    return {"n_samples": int(ids.numel()), "n_unique": int(counts.numel()),
            "n_duplicates": int(ids.numel() - counts.numel()), "n_clusters": int((counts > 1).sum()),
            "largest_cluster": int(counts.max())}


def label_conflicts(data: RepairData, ids, y) -> Optional[str]:
    """What to say of identical samples (``ids``: :meth:`RepairData.duplicate_ids`) whose labels name
    different classes (``y``: the encoded classes; ``cat`` and ``Cat`` are one) -- one copy's label is
    wrong, and it counts in the figures and in what is fitted --, naming the first such pair by its
    rows (or, without a table, its files); None when every set of copies agrees."""
    first: dict = {}
    pairs, said, ys = [], set(), torch_list(y)
    for i, k in enumerate(torch_list(ids)):
        j = first.setdefault(k, i)
        if j != i and ys[j] != ys[i] and k not in said:
            pairs.append((j, i, k))
            said.add(k)
    if not pairs:
        return None
    j, i, _ = pairs[0]

    def name(x: int) -> str:
        if data.table is None and data.modality == "image":
            return repr(str(Path(data.items[x]).relative_to(data.source))
                        if Path(data.items[x]).is_relative_to(data.source) else str(data.items[x]))
        return data.row_at(x)
    return (f"{len(pairs)} set(s) of identical samples carry labels of different classes (e.g. {name(j)} "
            f"{data.labels[j]!r} and {name(i)} {data.labels[i]!r}): one copy of each is mislabelled")


def torch_list(ids) -> list:
    """``ids`` (a tensor or a sequence) as a list of Python ints."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


@dataclass
class Encoded:
    y: torch.Tensor                    # (N,) class indices in the model's order
    class_names: list[str]
    groups: Optional[torch.Tensor]     # (N,) group ids, None without --group-by
    group_names: list[str]             # name of each group id: "class|col=value"
    #: groups (class of the model x value seen in the data) without a single sample: they are in
    #: no figure, so a worst-group figure cannot speak for them
    absent_groups: list[str] = field(default_factory=list)
    #: (class index, attribute value) of each group id: what a group is, never parsed back out of its
    #: name (a class name or a value may hold "|" or "=")
    group_keys: list[tuple[int, str]] = field(default_factory=list)
    group_by: Optional[str] = None     # the column the groups' values are of


# ------------------------------------------------------------------ images
#: PIL modes read as they are (``1``, ``L``, ``P`` without transparency, ``CMYK``, ``YCbCr``, ``RGBX``
#: convert to RGB exactly), with an alpha channel (composited over white, as a viewer shows them),
#: and of high bit depth (scaled to 0..255, see :func:`_scale_to_8bit`). Any other mode is refused.
PLAIN_MODES = frozenset({"RGB", "L", "1", "P", "CMYK", "YCbCr", "RGBX"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
IMAGE_MODES = PLAIN_MODES | ALPHA_MODES | DEEP_MODES
_PIL_LIMIT_LOCK = threading.Lock()


def open_regular(path, what: str = "image"):
    """Open ``path`` for reading in binary mode, only if it is a regular file (symlinks followed).
    Never blocks: a FIFO is opened non-blocking and refused, as is a device or socket."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadInput(f"{what} file not found", path) from None
    except IsADirectoryError:
        raise BadInput(f"{what} path is a folder, not a file", path) from None
    except OSError as e:
        raise BadInput(f"cannot read the {what} ({e.strerror or e})", path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInput(f"{what} is not a regular file (a FIFO, device or socket); only regular files "
                           "are read", path)
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_image_bytes(path) -> bytes:
    """The bytes of one image file (a regular file only)."""
    with open_regular(path) as f:
        return f.read()


def _open_pil(f, path: Path, max_pixels: int):
    """``PIL.Image.open`` of the formats of :data:`IMAGE_FORMATS` only, with our pixel limit instead of
    PIL's (PIL's own error names no file). The one place an image file is opened."""
    from PIL import Image, UnidentifiedImageError

    try:
        with no_warnings():
            # PIL's own warnings (a decompression bomb under our limit, a TIFF's "Corrupt EXIF data"):
            # a file that cannot be read is refused by name below; one that can needs no noise
            if Image.MAX_IMAGE_PIXELS is not None and max_pixels >= Image.MAX_IMAGE_PIXELS:
                with _PIL_LIMIT_LOCK:     # PIL refuses above 2x its limit: lift it for this open only
                    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
                    try:
                        im = Image.open(f, formats=IMAGE_FORMATS)
                    finally:
                        Image.MAX_IMAGE_PIXELS = old
            else:
                im = Image.open(f, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:      # PIL's own limit, below ours
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f" ({int(m.group(1)):,} pixels)" if m else ""
        raise _advised("image is larger{size} than the limit of {limit} pixels (a decompression bomb?); "
                       "raise {max_pixels} to read it", path, size=size, limit=f"{max_pixels:,}") from None
    except UnidentifiedImageError:
        raise BadInput(_not_an_image(f), path) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInput(f"unreadable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                       path) from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise _advised("image is {w}x{h} = {n} pixels, more than the limit of {limit} (a decompression bomb?); "
                       "raise {max_pixels} to read it", path, w=w, h=h, n=f"{w * h:,}", limit=f"{max_pixels:,}")
    if im.mode not in IMAGE_MODES:
        mode = im.mode
        im.close()
        raise BadInput(f"image mode {mode!r} is not supported (supported: {', '.join(sorted(IMAGE_MODES))}); "
                       "convert the image to RGB", path)
    return im


def _not_an_image(f) -> str:
    """Why PIL could not identify the file ``f``: it is empty, or not of :data:`IMAGE_FORMATS`."""
    try:
        empty = os.fstat(f.fileno()).st_size == 0
    except (AttributeError, OSError, ValueError):
        empty = False
    if empty:
        return "empty file, not an image"
    return f"not an image of a format read here ({', '.join(IMAGE_FORMATS)}), or a damaged one"


def check_image(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse, naming the image, what :func:`read_image` would refuse that the header tells: not a
    regular file, not an image, more than ``max_pixels`` pixels, an unsupported mode. Reads only
    the header."""
    image_size(path, max_pixels)


def image_size(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image from its header, refused as :func:`check_image` refuses."""
    with open_regular(path) as f:
        im = _open_pil(f, Path(path), max_pixels)
        try:
            return im.size
        finally:
            im.close()


def _scale_to_8bit(a, mode: str, path: Path):
    """A high-bit-depth single-channel image as uint8, scaled by its mode alone (never by what its
    pixels hold: two files of one source map one value alike), never clipped:

    - ``I;16*`` and ``I`` (a 16-bit PNG, which older Pillow opens as ``I``, or a 32-bit integer TIFF,
      mostly 16-bit data in a wider container) as 16-bit values, v * 255 / 65535; an ``I`` image with
      a value outside 0..65535 has no depth its file declares that shows it unclipped: refused naming it;
    - ``F`` (32-bit floats) as 0..1 values (the float image convention), v * 255; a value outside
      0..1 (a float image of 0..255 values, of any other range) is refused naming it, as are non-finite
      values.
    """
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise BadInput("image holds non-finite (NaN or infinite) pixel values", path)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F":
        if lo < -FLOAT_SLACK or hi > 1 + FLOAT_SLACK:
            raise BadInput(f"float image (mode 'F') holds values from {lo:g} to {hi:g}; float images are read as "
                           "0..1 values (never stretched by their own range): save it as 8 or 16 bits, or "
                           "as floats in 0..1", path)
        out = a * 255.0
    else:
        if lo < 0 or hi > 65535:
            raise BadInput(f"integer image (mode {mode!r}) holds values from {lo:g} to {hi:g}; deep integer "
                           "images are read as 16-bit values (0..65535, never stretched by their own range): "
                           "save it as 8 or 16 bits", path)
        out = a * (255.0 / 65535.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


#: how far a float image's values may stray outside 0..1 by rounding (read as 0 and 1)
FLOAT_SLACK = 1e-6


def deep_to_grey(im, path) -> "PIL.Image.Image":
    """A high-bit-depth single-channel image (a mode of :data:`DEEP_MODES`) as 8-bit greyscale (``L``),
    by :func:`_scale_to_8bit`: the one conversion of a deep image, of the repair data and of a mask."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(_scale_to_8bit(np.asarray(im), im.mode, Path(path)), "L")


def to_grey(im, path) -> "PIL.Image.Image":
    """A mask (or any single-channel reading of an image) as 8-bit greyscale: a deep mode by
    :func:`deep_to_grey` (a 16-bit or float mask keeps its meaning: 0..1 floats are not near-black,
    a soft 16-bit mask is not white), any other supported mode by PIL's ``convert("L")``."""
    if im.mode in DEEP_MODES:
        return deep_to_grey(im, path)
    if im.mode not in IMAGE_MODES:
        raise BadInput(f"image mode {im.mode!r} is not supported (supported: {', '.join(sorted(IMAGE_MODES))}); "
                       "convert the image to RGB", path)
    return im.convert("L")


def to_rgb(im, path) -> "PIL.Image.Image":
    """One PIL image as 8-bit RGB, every supported mode converted by its meaning (see
    :data:`IMAGE_MODES`); :class:`BadInput` naming ``path`` for any other mode."""
    from PIL import Image

    mode = im.mode
    key = im.info.get("transparency")
    if key is not None and (mode in DEEP_MODES or mode == "1") and isinstance(key, (int, float)):
        # a PNG's transparent grey value (tRNS) of a 1-bit or 16-bit image: those pixels over white, as
        # L's, P's and RGB's are (PIL's own conversion drops the key of these modes)
        import numpy as np

        base = (deep_to_grey(im, path) if mode in DEEP_MODES else im).convert("RGB")
        raw = np.asarray(im)
        clear = raw == (bool(key) if raw.dtype == bool else key)
        mask = Image.fromarray(np.where(clear, 0, 255).astype(np.uint8), "L")
        return Image.composite(base, Image.new("RGB", im.size, (255, 255, 255)), mask)
    if mode in DEEP_MODES:
        return deep_to_grey(im, path).convert("RGB")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in im.info) or \
            (mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in PLAIN_MODES:
        return im.convert("RGB")
    raise BadInput(f"image mode {mode!r} is not supported (supported: {', '.join(sorted(IMAGE_MODES))}); "
                   "convert the image to RGB", path)


#: timm's crop share when a preprocessing gives none (``timm.data.DEFAULT_CROP_PCT``)
DEFAULT_CROP_PCT = 0.875


def resized_size(size: tuple, data_config: dict) -> tuple[int, int]:
    """(width, height) the model's eval preprocessing (timm's, for ``data_config``: see
    :func:`repair.adapters.images.resolve_image_config`) resizes an image of ``size`` (width, height)
    to before it crops: ``center`` keeps the aspect ratio and covers the resize size (a square input:
    the short side to ``side / crop_pct``, the long side by the same factor), ``border`` keeps it and
    fits inside, ``squash`` is the resize size itself."""
    _, th, tw = data_config["input_size"]
    crop = float(data_config.get("crop_pct") or DEFAULT_CROP_PCT)
    sh, sw = math.floor(th / crop), math.floor(tw / crop)
    mode = data_config.get("crop_mode") or "center"
    if mode == "squash":
        return sw, sh
    w, h = max(1, int(size[0])), max(1, int(size[1]))
    r = (min if mode == "border" else max)(sh / h, sw / w)
    return max(1, round(w * r)), max(1, round(h * r))


def check_resized(size: tuple, data_config: Optional[dict], max_pixels: int, path) -> None:
    """The pixel limit (``--max-pixels``) of an image as the model's preprocessing makes it, before it
    is decoded: a tiny, very thin image (10000 x 1) is resized to millions of pixels per side's worth
    (2,560,000 x 256 on a 224 model: gigabytes); :class:`BadInput` naming ``path``, as a decompression
    bomb is. ``data_config`` None: no resize to check."""
    if data_config is None:
        return
    rw, rh = resized_size(size, data_config)
    if rw * rh > max_pixels:
        raise _advised("image is {w}x{h}, which the model's preprocessing resizes to {rw}x{rh} = {n} pixels, "
                       "more than the limit of {limit} (a very thin image?); raise {max_pixels} to read it", path,
                       w=size[0], h=size[1], rw=rw, rh=rh, n=f"{rw * rh:,}", limit=f"{max_pixels:,}")


def check_limit_fits(data_config: Optional[dict], max_pixels: int) -> None:
    """The pixel limit (``--max-pixels``) leaves room for the model's own resize: the preprocessing
    resizes an image shaped as its input to ``side / crop_pct`` per side before it crops (a 224 model
    with crop_pct 0.875: 256x256), and :func:`check_resized` holds that size to the limit too, so a limit
    below it would refuse every image, one by one. :class:`repair.rules.OptionRefused` (a BadInput) naming
    the option, its value and the model's input size, before any image is read. ``data_config`` None: no resize to check."""
    if data_config is None:
        return
    _, h, w = data_config["input_size"]
    rw, rh = resized_size((w, h), data_config)
    if rw * rh > max_pixels:
        from .rules import OptionRefused

        raise OptionRefused("max_pixels", f"{max_pixels:,} is below the {rw}x{rh} = {rw * rh:,} pixels the model's "
                            f"preprocessing resizes an image of its input size ({w}x{h}) to before its crop: every "
                            f"image would be refused; give at least {rw * rh}")


def read_image(path, max_pixels: int = DEFAULT_MAX_PIXELS,
               data_config: Optional[dict] = None) -> "PIL.Image.Image":
    """Decode one image file as 8-bit RGB (:func:`to_rgb`): a regular file only, at most
    ``max_pixels`` pixels -- also as the model's preprocessing ``data_config`` resizes it, when given
    (:func:`check_resized`) --, :class:`BadInput` naming the image otherwise. The one place an image of
    the repair data is opened."""
    path = Path(path)
    with open_regular(path) as f:
        im = _open_pil(f, path, max_pixels)
        try:
            check_resized(im.size, data_config, max_pixels, path)       # from the header, before decoding
            with no_warnings():                       # PIL's palette-transparency advice: handled here
                im.load()
                return to_rgb(im, path)
        except BadInput:
            raise
        except Exception as e:   # a truncated or corrupt image body (PIL raises many types)
            raise BadInput(f"unreadable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                           path) from None
        finally:
            im.close()


# ------------------------------------------------------------------ reading
def _read_table(path: Path) -> tuple[list[str], list[dict], list[str]]:
    """(columns, rows, where each row is in the file: ``line L`` or ``item N``) of a data table."""
    try:
        with open_regular(path, "data table") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(not_utf8(raw, e), path) from None
    except OSError as e:
        raise BadInput(f"cannot read the file ({e.strerror or e})", path) from None
    head = raw[:64]
    if len(head) >= 8 and (head[1::2].count(0) == len(head[1::2]) or head[0::2].count(0) == len(head[0::2])):
        # UTF-16 without a byte-order mark: ASCII with a NUL beside each character, valid UTF-8 (a NUL
        # in every other byte of the file's start, where its header is, is no table of text)
        raise BadInput("is UTF-16 text without a byte-order mark, not UTF-8 (a NUL beside each character); "
                       "save it as UTF-8", path)
    if path.suffix.lower() in (".jsonl", ".json"):
        records = _json_records(text, path)
        rows = [_json_record(rec, where, path) for where, rec in records]
        # the columns: every key of any record, in the order first seen (a record may leave out a
        # column, as a CSV row may leave a cell empty: it reads as empty, and the row's empty value
        # is refused where the column is needed)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        return columns, [{c: row.get(c, "") for c in columns} for row in rows], [w for w, _ in records]
    lines: list = []
    columns, rows = read_csv_text(text, path, lines=lines)
    return columns, rows, [f"line {n}" for n in lines]


def not_utf8(raw: bytes, e: UnicodeDecodeError) -> str:
    """What to say of a file whose bytes ``raw`` are not UTF-8 text (``e``: the error decoding them,
    with or without a UTF-8 byte-order mark): a UTF-16 file (its byte-order mark) is named so; else
    the line (the newlines before the bad byte, plus one) and the byte's offset in the file."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "is UTF-16 text, not UTF-8 (it opens with a UTF-16 byte-order mark); save it as UTF-8"
    at = e.start + (len(raw) - len(e.object))       # utf-8-sig reports offsets after its BOM
    line = raw.count(b"\n", 0, at) + 1
    return f"not UTF-8 text (line {line}, byte {at}: {e.reason}); save it as UTF-8"


def check_unique_columns(columns: Sequence[str], path: Path, stripped: bool = False) -> None:
    """The one rule of a table's header: no column name twice (``stripped``: for a reader that takes
    names without the spaces around them -- ``repair zoo``'s manifests -- names equal but for those
    spaces are the same name; a name of spaces only is no name there)."""
    names = [c.strip() for c in columns] if stripped else list(columns)
    twice = sorted({c for c in names if (c or not stripped) and names.count(c) > 1})
    if twice:
        raise BadInput(f"column {twice[0]!r} appears more than once in the header"
                       + (" (spaces around a column name do not count)" if stripped else ""), path)


def read_csv_text(text: str, path: Path, first_line: int = 1,
                  lines: Optional[list] = None, short_rows: bool = True) -> tuple[list[str], list[dict]]:
    """(columns, rows) of the text of a CSV (a TSV by ``path``'s suffix): the one home of how a table
    the user gave is read (data tables, ``repair zoo``'s CSV manifests). A malformed table is a
    :class:`BadInput` naming ``path`` and where; ``first_line``: the file's line number of the text's
    first line (a caller that took leading lines off); ``lines``, given: filled with the file's line
    number of each row's start. A row with more fields than the header is refused; one with fewer
    reads the missing cells as empty when ``short_rows`` (a data table: an empty cell that matters,
    a label or a group, is refused where it is read), else it is refused too (a table where an empty
    cell means "the default", a zoo manifest: a row cut off before its gate must not run ungated)."""
    with _csv_field_limit():
        return _read_csv_text(text, path, first_line, lines, short_rows)


def _read_csv_text(text: str, path: Path, first_line: int, lines: Optional[list], short_rows: bool):
    try:
        # strict first: it alone notices a quote that is never closed (the lenient reader takes the
        # rest of the file as one field); what only the strict reader minds (`"a"b`) is read leniently,
        # on one line only: a record the lenient reader reads over several lines must read strictly there
        # (a quote opened on one line and closed by another row's would make two records one, silently)
        return _read_csv(text, path, strict=True, first_line=first_line, lines=lines, short_rows=short_rows)
    except _CsvError as e:
        if e.unterminated:
            raise BadInput(_unterminated(e), path) from None
    if lines is not None:
        lines.clear()                   # what the strict reading filled before it failed
    try:
        return _read_csv(text, path, strict=False, first_line=first_line, lines=lines, short_rows=short_rows)
    except _CsvError as e:
        if e.unterminated:
            raise BadInput(_unterminated(e), path) from None
        raise BadInput(f"malformed CSV near {e.where}: {e.args[0]}", path) from None


def _unterminated(e: "_CsvError") -> str:
    return f"malformed CSV: unterminated quote; the quoted field that starts near {e.where} is never closed"


#: what a .json data file may hold (said when it holds something else)
JSON_TABLE_SHAPES = "a .json data file must be JSON Lines (one object per line) or a JSON array of objects"


def _json_records(text: str, path: Path) -> list[tuple[str, object]]:
    """(where, value) of each record of a JSON table's text: each non-blank line of JSON Lines
    (``line N``); for a ``.json`` file whose text starts with ``[``, each item of the JSON array it
    holds (``item N``, the whole file parsed by :func:`repair.io.parse_json`). Text that is not
    valid JSON is refused naming the line (for a .json, with the shapes it may have)."""
    is_json = path.suffix.lower() == ".json"
    shapes = f"; {JSON_TABLE_SHAPES}" if is_json else ""
    if is_json and text.lstrip().startswith("["):
        try:
            doc = parse_json(text, unique_keys=True)
        except json.JSONDecodeError as e:
            raise BadInput(f"not valid JSON ({e.msg}, line {e.lineno} column {e.colno}){shapes}", path) from None
        return [(f"item {n}", rec) for n, rec in enumerate(doc, 1)]
    out = []
    # only a line end ends a record (CRLF, LF or CR: JSON holds no raw one inside a string): str.splitlines
    # would also split inside a text holding U+2028, U+2029 or U+0085, which JSON writers leave unescaped
    for n, line in enumerate(re.split(r"\r\n|\n|\r", text), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", parse_json(line, unique_keys=True)))
        except json.JSONDecodeError as e:
            if is_json:         # one JSON document over several lines (a model's config.json)?
                try:
                    whole = parse_json(text, unique_keys=True)
                except json.JSONDecodeError:
                    pass
                else:
                    kind = {dict: "object", list: "array"}.get(type(whole), "value")
                    raise BadInput(f"holds one JSON {kind} written over several lines, not a table; "
                                   f"{JSON_TABLE_SHAPES}", path) from None
            raise BadInput(f"line {n} is not valid JSON ({e.msg}){shapes}", path) from None
    return out


def _json_record(rec, where: str, path: Path) -> dict[str, str]:
    """One record of a JSON table as a row of texts (null as empty): a JSON object of single values
    (a text, a label, a group value), else :class:`BadInput` naming ``where`` (``line N``/``item N``)."""
    if not isinstance(rec, dict):
        shapes = f"; {JSON_TABLE_SHAPES}" if path.suffix.lower() == ".json" else ""
        raise BadInput(f"{where} is not a JSON object{shapes}", path)
    nested = [k for k, v in rec.items() if isinstance(v, (list, dict))]
    if nested:            # a cell is one value, as in a CSV: a list's text would be a guess
        kind = "array" if isinstance(rec[nested[0]], list) else "object"
        raise BadInput(f"{where}: field {nested[0]!r} is a JSON {kind}, not a single value (a text, a "
                       "label, a group value)", path)
    row = {k: _json_cell(v) for k, v in rec.items()}
    for k, v in row.items():       # JSON's \ud800 escapes decode to what no UTF-8 text holds
        try:
            k.encode("utf-8"), v.encode("utf-8")
        except UnicodeEncodeError:
            raise BadInput(f"{where}: field {k!r} holds an unpaired surrogate escape (\\ud800-\\udfff), "
                           "which is not text", path) from None
    return row


def _json_cell(v) -> str:
    """One JSON value as the text a CSV cell would hold: null and NaN (what pandas and ``json.dumps``
    write for a missing value) as empty; an infinity as ``inf`` (as a CSV writes it); a boolean as JSON
    spells it (``true``/``false``: the string ``"true"`` and the JSON ``true`` are one value, as ``1`` and
    ``"1"`` are; a label matches a class name in any case)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


#: a whole number as pandas writes it with a zero fraction: its integer part as ``str(int)`` writes one (no
#: sign but ``-``, no leading zero), so that ``1.0`` reads as ``1`` while ``01.0`` and ``+1.0`` stay as
#: written, as ``01`` and ``+1`` do (a code such as ``01`` is not the number 1)
_WHOLE_NUMBER = re.compile(r"(-?)(0|[1-9]\d*)\.0+")


def cell_value(v) -> str:
    """A label or group value as the data's tables give it, read one way: trimmed, and a whole number
    written with a zero fraction (``1.0``, what pandas writes for a number column that has a gap) as the
    integer (``1``), so that ``1`` and ``1.0`` in two tables -- or in one -- are one class or group; a
    value an integer would not be written as (``01.0``, ``+1.0``) stays as written, as ``01`` and ``+1``
    do; in Unicode's composed form (NFC: macOS writes ``café`` decomposed, most tools composed -- two values
    that look the same are one group, as two such labels are one class). The one home of that rule."""
    import unicodedata

    v = unicodedata.normalize("NFC", str(v)).strip()
    m = _WHOLE_NUMBER.fullmatch(v)
    return str(int(m.group(1) + m.group(2))) if m else v


#: the most characters one CSV field may hold: the csv module's default (128 KiB) refuses a long
#: review or article; the whole table is in memory already, so no field can be larger than it
CSV_FIELD_LIMIT = 2 ** 31 - 1


def _raise_csv_limit() -> int:
    old = csv.field_size_limit()
    if old < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    return old


#: the csv module's (process-wide) field limit raised to :data:`CSV_FIELD_LIMIT` while tables are read,
#: never lowered, and put back after: the user's own csv readers keep their guard (safe in threads)
_csv_field_limit = SharedSetting(_raise_csv_limit, csv.field_size_limit)


class _CsvError(Exception):
    """A ``csv.Error`` and where: ``row`` the data row (1 = the first after the header; 0 = the header)
    and ``line`` the line its record starts on; ``unterminated``: a quoted field runs to the end of the
    table."""

    def __init__(self, problem: str, row: int, line: int, unterminated: bool):
        super().__init__(problem)
        self.row, self.line, self.unterminated = row, line, unterminated

    @property
    def where(self) -> str:
        return f"row {self.row} (line {self.line})" if self.row else f"the header (line {self.line})"


#: a cell a short row does not have (read as empty, or the row refused: :func:`read_csv_text`)
_NO_CELL = object()


def _read_csv(text: str, path: Path, strict: bool, first_line: int = 1,
              lines: Optional[list] = None, short_rows: bool = True) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a CSV/TSV's text (``lines``, given: the line each row starts on); a
    ``csv.Error`` as :class:`_CsvError`."""
    skip = first_line - 1            # the file's lines before the text's first
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    # the file's line ends are those of its header: a CR-only file (classic Mac, Excel's "CSV (Macintosh)")
    # is read with newline="" (as the csv docs ask: every CR, LF and CRLF ends a line, one inside quotes
    # is the field's); an LF or CRLF file splits at LF only (CRLF is one line end), so a bare CR inside
    # an unquoted field stays malformed, never a silent extra row
    first_end = re.search(r"\r\n|\n|\r", text)
    cr_only = first_end is not None and first_end.group() == "\r"
    newline = "" if cr_only else "\n"
    ends = ("\r", "\n") if cr_only else ("\n",)        # the line ends the reader splits at
    # SST-2 style TSVs hold raw quotes inside sentences: do not treat them as quoting
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    physical = list(io.StringIO(text, newline=newline))     # the lines as the reader gets them
    if not strict and physical and not physical[-1].endswith(ends):
        # a last line without its line end: given one, a quote it leaves open reads as a field over
        # several lines, which the strict check below refuses (never closed) as it refuses one that is not
        physical[-1] += "\r" if cr_only else "\n"
    reader = csv.DictReader(iter(physical), delimiter=delim,
                            restval=_NO_CELL,   # a short row's missing cells
                            quoting=quoting, strict=strict)

    def start_after(n: int) -> int:  # the line a record read after line n starts on (blank lines are no record)
        while n < len(physical) and not physical[n].strip("\r\n"):
            n += 1
        return n + 1

    rows: list = []
    last_line, header = 0, False     # the line the previous record ended on; the header was read
    try:
        columns = list(reader.fieldnames or [])
        check_unique_columns(columns, path)
        last_line, header = reader.line_num, True
        for row in reader:
            start = start_after(last_line)       # the record ends on line_num
            # over several lines, or one ending in a quoted field's line end (a quote never closed on the
            # file's last line): the record must read strictly there
            if not strict and (start < reader.line_num or any(isinstance(v, str) and v.endswith(ends)
                                                              for v in row.values())):
                _strictly(physical[start - 1:reader.line_num], delim, quoting, newline,
                          len(rows) + 1, start, skip)
            elif not strict and quoting != csv.QUOTE_NONE and None not in row:
                row = _as_written(physical[start - 1], row, columns, delim, newline, start + skip, path)
            if None in row:
                raise BadInput(f"line {start + skip} has more fields than the header", path)
            missing = [k for k, v in row.items() if v is _NO_CELL]
            if missing:
                if not short_rows:
                    raise BadInput(f"line {start + skip} has fewer fields than the header "
                                   f"({len(columns) - len(missing)} of {len(columns)}; no {missing[0]!r} cell): "
                                   "write every field, an empty one as nothing between its commas", path)
                row = {k: ("" if v is _NO_CELL else v) for k, v in row.items()}
            rows.append(row)
            if lines is not None:
                lines.append(start + skip)
            last_line = reader.line_num
    except csv.Error as e:
        problem = str(e).split(" - do you need")[0]      # Python's advice to its own callers
        raise _CsvError(problem, len(rows) + 1 if header else 0,
                        (start_after(last_line) if header else 1) + skip,
                        unterminated=strict and "unexpected end of data" in problem) from None
    return columns, rows


def _as_written(line: str, row: dict, columns: list, delim: str, newline: str, at: int, path: Path) -> dict:
    """A one-line record the lenient reader read: as it read it where the strict reader reads the line too;
    else (a field that opens with a quote closed before the field ends: ``"great" movie``, which the
    lenient reader reads ``great movie``) each field as written -- a raw quote is text --, a well-formed
    quoted field unquoted. A line whose fields cannot be told apart so (a quoted delimiter beside such a
    field) is :class:`BadInput` naming it: never a silent guess."""
    try:
        for _ in csv.reader(io.StringIO(line, newline=newline), delimiter=delim, strict=True):
            pass
        return row
    except csv.Error:
        pass
    fields = next(csv.reader(io.StringIO(line, newline=newline), delimiter=delim, quoting=csv.QUOTE_NONE), [])
    read = [k for k, v in row.items() if v is not _NO_CELL]        # the cells the lenient reader found
    if len(fields) != len(read):
        raise BadInput(f"line {at}: a field opens with a quote that closes before the field ends, and its "
                       f"fields cannot be told apart; quote the whole field and double its quotes "
                       f'("""great"" movie" for "great" movie)', path)

    def field(v: str) -> str:
        inner = v[1:-1]
        if len(v) >= 2 and v[0] == v[-1] == '"' and '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')           # a well-formed quoted field: its text
        return v                                       # written raw: as it is
    return {**row, **dict(zip(read, (field(v) for v in fields)))}       # a short row's missing cells stay so


def _strictly(record: list[str], delim: str, quoting: int, newline: str, row: int, start: int, skip: int) -> None:
    """A record the lenient reader read over several lines, or up to the file's end inside a quoted field
    (``record``: its lines; ``row``, ``start``: its row and first line in the text), reads strictly there,
    else :class:`_CsvError` naming its row and line, and the line where its quoted field goes wrong (its
    quote closed by text that is not the field's end, such as another row's opening quote), or
    ``unterminated`` (never closed)."""
    reader = csv.reader(io.StringIO("".join(record), newline=newline), delimiter=delim, quoting=quoting,
                        strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as e:
        problem = str(e).split(" - do you need")[0]
        if "unexpected end of data" in problem:
            raise _CsvError(problem, row, start + skip, unterminated=True) from None
        first, last, bad = start + skip, start + skip + len(record) - 1, start + skip + reader.line_num - 1
        span = (f"runs over lines {first}-{last} through a quoted field" if last > first
                else "leaves a quoted field open at the end of the file")
        raise _CsvError(f"the record {span}, and line {bad} has a quote out of place ({problem}); a quote "
                        'inside a quoted field is written twice ("")', row, first, unterminated=False) from None


def _pick(columns: Sequence[str], wanted: Optional[str], defaults: Sequence[str], what: str,
          path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise BadInput(f"no {what} column {wanted!r} (columns: {', '.join(columns)})", path)
        return wanted
    for c in defaults:
        if c in columns:
            return c
    raise _advised("cannot tell which column holds the {what} (columns: {columns}); name it with "
                   f"{{{what}_col}}", path, what=what, columns=", ".join(columns))


def _from_table(table: Path, root: Path, o: DataOptions) -> RepairData:
    columns, rows, lines = _read_table(table)
    if not rows:
        raise BadInput("no rows", table)
    header = 0 if table.suffix.lower() in (".jsonl", ".json") else 1

    def at(i: int) -> str:          # RepairData.row_at's words: the line when it is not the row's own
        same = lines[i] == f"line {i + 1 + header}"
        return f"row {i + 1}" + ("" if same else f" ({lines[i]})")
    label_col = _pick(columns, o.label_col, LABEL_COLUMNS, "label", table)
    paths = [c for c in PATH_COLUMNS if c in columns]
    texts = [c for c in TEXT_COLUMNS if c in columns]
    if o.path_col is not None or o.text_col is not None:
        is_image = o.path_col is not None
    elif paths and texts and table.stem.lower() != "metadata":
        raise _advised("cannot tell whether the table holds images or texts: it has a column of image paths "
                       "({image_col}) and one of texts ({texts}); name the one to read with {path_col} (images) or "
                       "{text_col} (texts)", table, image_col=repr(paths[0]), texts=repr(texts[0]))
    elif paths:
        is_image = True
    elif any(c in columns for c in TEXT_COLUMNS):
        is_image = False
    elif table.stem.lower() == "metadata" or _has_images(root):
        is_image = True     # an image folder's table: _pick asks for --path-col
    else:
        raise _advised("cannot tell which column holds the image paths or the texts (columns: {columns}); name "
                       "it with {path_col} (images) or {text_col} (texts)", table, columns=", ".join(columns))
    if is_image:
        path_col = _pick(columns, o.path_col, PATH_COLUMNS, "path", table)
        _apart(label_col, path_col, "image paths", "path_col", table)
        root_real, folders = _real(root), {}
        checked = [_table_image(table, root, root_real, at(n), row.get(path_col, ""), o, folders)
                   for n, row in enumerate(rows)]
        items, reals = [c[0] for c in checked], [c[1] for c in checked]
        used = {label_col, path_col}
        modality = "image"
    else:
        text_col = _pick(columns, o.text_col, TEXT_COLUMNS, "text", table)
        _apart(label_col, text_col, "texts", "text_col", table)
        items = [row.get(text_col, "") for row in rows]
        empty = [n for n, t in enumerate(items) if not str(t).strip()]
        if empty:                # a misspelt key in JSON Lines reads as an empty text: never a sample
            raise BadInput(f"{at(empty[0])} has an empty text ({text_col!r}); {len(empty)} row(s) without "
                           "one", table)
        used = {label_col, text_col}
        modality = "text"
    labels = [cell_value(row.get(label_col, "")) for row in rows]
    for n, lab in enumerate(labels):
        if lab == "":
            raise BadInput(f"{at(n)} has an empty label", table)
    attrs = {c: [cell_value(row.get(c, "")) for row in rows] for c in columns if c not in used}
    return RepairData(source=root, modality=modality, items=items, labels=labels, attributes=attrs,
                      notes=several_splits(table, attrs, o.group_by) + one_group(table, attrs, o.group_by),
                      table=table, max_pixels=o.max_pixels, _real=reals if modality == "image" else None,
                      _rows=[at(i) for i in range(len(rows))])


def _apart(label_col: str, col: str, what: str, option: str, table: Path) -> None:
    """The labels and the items (``what``, the column ``option`` names) must be two columns of the table."""
    if col == label_col:
        raise _advised(f"the {{what}} and the labels are the same column ({{col}}); name them apart with "
                       f"{{{option}}} and {{label_col}}", table, what=what, col=repr(label_col))


def _real(p: Path, folders: Optional[dict] = None) -> Optional[Path]:
    """``p`` with symlinks followed, or None (a symlink loop). ``folders``: a cache of resolved
    folders shared by the calls of one load -- a file that is not itself a symlink resolves to its
    resolved folder plus its name (one ``lstat`` instead of one per path component: thousands of
    images in a few folders)."""
    if folders is not None and p.name not in ("", ".", ".."):
        parent = p.parent
        if parent not in folders:
            folders[parent] = _real(parent)
        base = folders[parent]
        try:
            link = stat.S_ISLNK(os.lstat(p).st_mode)
        except FileNotFoundError:
            link = False
        except OSError:
            link = True
        if base is not None and not link:
            return base / p.name
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return None


def _inside(root_real: Optional[Path], real: Optional[Path]) -> bool:
    """Whether a resolved path lies inside the resolved folder ``root_real`` (:func:`_real` of both:
    the one home of the rule; a folder's paths are resolved once each)."""
    if root_real is None or real is None:
        return False
    r, p = str(root_real), str(real)           # resolved, absolute: a prefix test on the strings
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _table_image(table: Path, root: Path, root_real: Optional[Path], row: str, rel: str,
                 o: DataOptions, folders: Optional[dict] = None) -> tuple[Path, Path]:
    """The image a table row (``row``: how messages name it) lists and its resolved path: relative to the
    data folder, inside it (symlinks followed) unless ``allow_outside_paths``, and an existing regular file."""
    if not rel.strip():
        raise BadInput(f"{row} has an empty image path", table)
    if "\x00" in rel:
        raise BadInput(f"{row}: image path {rel!r} holds a NUL byte, which no file name can", table)
    p = Path(rel) if Path(rel).is_absolute() else root / rel
    try:
        found = p.exists() or p.is_symlink()
        real = _real(p, folders)
    except OSError as e:                # a name too long for the file system, ...
        raise BadInput(f"{row}: image path {rel!r} cannot be looked up ({e.strerror or e})", table) from None
    if not o.allow_outside_paths and not _inside(root_real, real):
        raise _advised("{row}: image path {rel} leads outside the data folder {root} (to {real}); move it "
                       "inside[ or give {allow_outside_paths}]", table, row=row, rel=repr(rel), root=root,
                       real=real or p)
    if not found:
        raise BadInput(f"{row}: image {rel!r} listed in {table.name} not found", p)
    if p.is_dir():
        raise BadInput(f"{row}: image path {rel!r} is a folder, not an image file", table)
    return p, (real if real is not None else p.absolute())


def _has_images(root: Path) -> bool:
    try:
        return any(p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()
                   if not p.name.startswith("."))
    except OSError:
        return False


#: column names that say which split of a dataset a row belongs to (Waterbirds', MultiNLI's and
#: CivilComments' ``split``, CelebA's ``partition``): a table holding several is every split at once
SPLIT_COLUMNS = ("split", "partition")


def several_splits(table: Path, attrs: dict, group_by: Optional[str] = None) -> list[str]:
    """A note when a column named as a split (:data:`SPLIT_COLUMNS`, any case; not the ``--group-by``
    column, which the user reads as groups on purpose) holds several values: the official metadata of
    Waterbirds, MultiNLI or CivilComments lists the training, validation and test rows together, and
    repair reads every row of the table it is given -- a repair set holding the model's training rows, or
    figures measured on them, would say nothing true. [] otherwise."""
    for col, values in attrs.items():
        if col.strip().lower() in SPLIT_COLUMNS and col != group_by:
            seen = sorted(set(values))
            if len(seen) > 1:
                shown = ", ".join(repr(v) for v in seen[:5]) + (", ..." if len(seen) > 5 else "")
                return [f"{table}: its column {col!r} holds {len(seen)} values ({shown}): every row is read, "
                        "whichever split it is in; give a table of one split's rows (a repair set or figures "
                        "holding the model's training or test rows say nothing true)"]
    return []


def one_group(table: Path, attrs: dict, group_by: Optional[str]) -> list[str]:
    """A note when the group column (``--group-by``, ``--eval-group-by``, a zoo row's ``group_by``) holds one value: the groups are then the classes (class x
    that value), so worst-group accuracy is worst-class accuracy and a group-balanced repair balances
    classes only -- a misspelt or wrong column, or a subset of one group, looks like groups given. []
    otherwise."""
    values = attrs.get(group_by) if group_by is not None else None
    if values and len(set(values)) == 1:
        return [f"{table}: its group column {group_by!r} holds one value ({values[0]!r}) in all {len(values)} "
                "rows: the groups are the classes, so worst-group accuracy is worst-class accuracy"]
    return []


def _from_class_folders(root: Path, o: DataOptions) -> RepairData:
    items, labels, reals, skipped = [], [], [], []
    root_real, folders = _real(root), {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not o.allow_outside_paths and not _inside(root_real, _real(sub)):
            raise _advised("class folder is a symlink leading outside the data folder {root} (to {real})"
                           "[; give {allow_outside_paths} to read it]", sub, root=root, real=_real(sub) or sub)
        for f in _class_folder_files(sub, root, root_real, o):
            # hidden files and folders (.ipynb_checkpoints/, macOS's ._x.png) are not samples, as
            # hidden class folders are not classes
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir():
                real = _real(f, folders)
                if not o.allow_outside_paths and not _inside(root_real, real):
                    raise _advised("image is a symlink leading outside the data folder {root} (to {real})"
                                   "[; give {allow_outside_paths} to read it]", f, root=root, real=real or f)
                items.append(f)     # a FIFO or device named like an image is refused by check_image
                labels.append(cell_value(sub.name))     # read as a table's label is (a folder 1.0/ is class 1)
                reals.append(real if real is not None else f.absolute())
            elif not f.is_dir():
                skipped.append(f)
    if not items:
        raise BadInput("no images found (expected class subfolders or a metadata.csv)", root)
    # images beside the class folders are in none: no label, no sample (the folder's own files, its
    # metadata.* description, config.json or a README, are no images; hidden files are not samples)
    loose = sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.is_dir())
    said = []
    if skipped:
        kinds = sorted({f.suffix.lower() or "no extension" for f in skipped})
        said.append(f"{len(skipped)} file(s) in the class folders are not read as images, their names not "
                    f"being those of images ({', '.join(kinds[:5])}{' ...' if len(kinds) > 5 else ''}; e.g. "
                    f"{skipped[0].relative_to(root)}); images are read by the extensions "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    if loose:
        said.append(f"{len(loose)} image(s) beside the class folders are not read (not in a class folder: no "
                    f"label; e.g. {loose[0].name}); move each into its class's folder")
    # said as the data's other notes are: in --json's warnings, the repair record, a zoo row's (a Python
    # warning reached stderr only)
    notes = [f"{root}: {'; and '.join(said)}"] if said else []
    return RepairData(source=root, modality="image", items=items, labels=labels, max_pixels=o.max_pixels,
                      _real=reals, notes=notes)


def _class_folder_files(sub: Path, root: Path, root_real: Optional[Path], o: DataOptions) -> list[Path]:
    """Every file under the class folder ``sub`` but hidden ones, sorted (as ``sorted(sub.rglob("*"))``
    lists them), its symlinked folders entered as its symlinked class folders are: one leading outside the
    data folder is refused naming it (unless ``allow_outside_paths``), as is one leading back to a folder
    the walk is in (a loop, which would list its images without end). A folder that cannot be listed is
    refused (a ``PermissionError`` the caller names), never skipped."""
    def fail(e: OSError):
        raise e

    out: list[Path] = []
    chain: dict[str, tuple] = {}         # each folder walked: the resolved folders on the way to it
    top = _real(sub)
    chain[os.fspath(sub)] = (top,) if top is not None else ()
    for here, dirs, files in os.walk(sub, onerror=fail, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        above = chain.pop(here)
        for d in dirs:
            link = Path(os.path.join(here, d))
            real = _real(link)
            if os.path.islink(link):
                if real is None or any(r == real or r.is_relative_to(real) for r in above):
                    raise BadInput(f"folder is a symlink leading back to a folder it is in (to {real or link}; "
                                   "a loop); remove the link", link)
                if not o.allow_outside_paths and not _inside(root_real, real):
                    raise _advised("folder is a symlink leading outside the data folder {root} (to {real})"
                                   "[; give {allow_outside_paths} to read it]", link, root=root, real=real)
            chain[os.path.join(here, d)] = above + ((real,) if real is not None else ())
        out.extend(Path(os.path.join(here, f)) for f in files if not f.startswith("."))
    return sorted(out)


def load_data(path, options: Optional[DataOptions] = None) -> RepairData:
    from .io import as_path

    o = options or DataOptions()
    path = as_path(path, "the data")
    if not path.exists():
        raise BadInput("data not found", path)
    if not path.is_file() and not path.is_dir():
        raise BadInput("expected a folder, or a .csv/.tsv/.jsonl/.json file; got a device or other special file", path)
    try:
        return _load_data(path, o)
    except PermissionError as e:
        raise BadInput(f"cannot read ({e.strerror})", e.filename or path) from None


def _load_data(path: Path, o: DataOptions) -> RepairData:
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise BadInput("expected a folder, or a .csv/.tsv/.jsonl/.json file", path)
        data = _from_table(path, path.parent, o)
    else:
        # the folder's table, by name in any case (Metadata.csv); two of them: which one is meant?
        # a link leading out of the folder is refused before anything of it is read (_found_table)
        tables = sorted(p for p in path.iterdir() if p.name.lower() in METADATA_NAMES and not p.is_dir()
                        and _is_table_file(_found_table(p, path, o)))
        if not tables:                 # no data table: a checkpoint folder given where the data goes?
            from .adapters import family_for

            # its config.json tells; a link leading outside the folder is refused before it is read, as
            # the folder's metadata.* is (nothing outside the paths given is read)
            cfg = path / "config.json"
            if cfg.is_symlink() or cfg.exists():
                _found_table(cfg, path, o, "config.json", "it is not read: remove the link[ or give "
                                                          "{allow_outside_paths}]")
            if family_for(path.absolute()) is not None:
                raise BadInput("is a model folder (a checkpoint's config.json), not data: the model is the "
                               "command's first argument, the repair data --data", path)
        if len(tables) > 1:
            raise BadInput(f"the data folder holds {len(tables)} metadata tables ({', '.join(t.name for t in tables)}); "
                           f"name the one to read, e.g. --data {tables[0]}", path)
        if tables:
            data = _from_table(_found_table(tables[0], path, o), path, o)
        else:
            # a .json that is one JSON object is the set's description (metadata.json, info.json), no table
            others = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES
                            and not p.name.startswith(".") and _is_table_file(_found_table(p, path, o)))
            subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
            if len(others) == 1 and not subdirs:
                data = _from_table(_found_table(others[0], path, o), path, o)
            elif others and not subdirs:
                names = ", ".join(o.name for o in others)
                raise BadInput(f"the data folder holds {len(others)} tables ({names}) and no metadata.csv; "
                               f"name the one to read, e.g. --data {others[0]}", path)
            elif not subdirs:
                raise BadInput("empty data folder (no class subfolders, metadata.csv or data file)", path)
            else:
                data = _from_class_folders(path, o)
    if o.group_by is not None:
        check_group_column(data, o.group_by)
    if data.modality == "image":
        for p in data.items:           # a stat each (never opened here: a FIFO would block)
            check_regular(p)
    return data


def file_stamp(st: os.stat_result) -> str:
    """A file as its metadata identifies it, nothing read: size, modification time, inode and change
    time (replaced, edited or copied over, even with its modification time set back as ``cp -p`` or
    ``rsync -t`` do, it gets a new change time or inode). The one rule of the embedding cache's and a
    zoo journal's fingerprints."""
    return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"


def _is_table_file(p: Path) -> bool:
    """A data folder's ``metadata.*`` holds a table: any ``.csv``/``.tsv``/``.jsonl``; a ``.json`` unless the
    whole file is one JSON object -- a dataset's description (``{"name": ..., "license": ...}``, a Hugging
    Face ``dataset_info``), which is no table. JSON Lines (one object a line), a JSON array, and text that is
    no JSON at all are tables (reading one says what is wrong with it, naming it). Call it only on a file
    :func:`_found_table` let through: it reads the file."""
    if p.suffix.lower() != ".json":
        return True
    try:
        with open_regular(p, "data table") as f:
            raw = f.read(4096)
            if not raw.decode("utf-8-sig", errors="replace").lstrip().startswith("{"):
                return True              # an array, or no JSON object: no description
            text = (raw + f.read()).decode("utf-8-sig")
    except (BadInput, OSError, UnicodeDecodeError):
        return True                      # unreadable: reading it says why, naming it
    try:
        return not isinstance(parse_json(text), dict)
    except json.JSONDecodeError:         # JSON Lines (several objects), or damaged: read as a table
        return True


def _found_table(table: Path, folder: Path, o: DataOptions, what: str = "table",
                 instead: str = "name it with {data}[ or give {allow_outside_paths}]") -> Path:
    """A file the data folder holds (found, not named by the user: its table, its config.json): a symlink
    leading outside the folder is refused like an image would be, before anything of it is read (a
    table named directly with ``--data FILE`` is read). The one home of that rule for a folder's files."""
    if not o.allow_outside_paths and not _inside(_real(folder), _real(table)):
        raise _advised("the data folder's {what} is a symlink leading outside the folder {folder} (to {real}); "
                       + instead, table, what=what, folder=folder, real=_real(table) or table)
    return table


def check_regular(path, what: str = "image") -> None:
    """:class:`BadInput` naming ``path`` unless it is a regular file (symlinks followed). Only a
    stat: cheap enough for every image of the data when it is read; the pixel limit and the mode
    are checked where the image is decoded (:func:`read_image`), or by :func:`check_image`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadInput(f"{what} file not found", path) from None
    except OSError as e:
        raise BadInput(f"cannot read the {what} ({e.strerror or e})", path) from None
    if stat.S_ISDIR(mode):
        raise BadInput(f"{what} path is a folder, not a file", path)
    if not stat.S_ISREG(mode):
        raise BadInput(f"{what} is not a regular file (a FIFO, device or socket); only regular files "
                       "are read", path)


def check_group_column(data: RepairData, group_by: str) -> None:
    """The group column exists and has a value in every row (:class:`BadInput` naming the
    table and the first row without one)."""
    where = data.where
    if group_by not in data.attributes:
        cols = ", ".join(data.attributes) or "none"
        raise BadInput(f"no group column {group_by!r} (attribute columns: {cols})", where)
    empty = [i for i, v in enumerate(data.attributes[group_by]) if not v]
    if empty:
        raise BadInput(f"{data.row_at(empty[0])} has an empty {group_by!r} value (--group-by {group_by}); "
                       f"{len(empty)} row(s) without a group", where)
    for i, v in enumerate(data.attributes[group_by]):       # a group's name is shown inside lines
        if "\n" in v:
            check_one_line(v, f"{data.row_at(i)}: the {group_by!r} value", where)


# ----------------------------------------------------------------- encoding
def _class_index(label: str, n_classes: int) -> Optional[int]:
    """The class index a label written as a number names (ASCII digits only: ``str.isdigit`` also
    holds for ``²`` or ``٣``, which ``int`` refuses or reads as another digit), or None. Written as
    ``str(int)`` writes it, as :func:`cell_value` reads numbers: ``01`` is a code, not the index 1."""
    if not (label.isascii() and label.isdigit()) or len(label) > 18 or str(int(label)) != label:
        return None
    i = int(label)
    return i if i < n_classes else None


def match_labels(labels: Sequence[str], class_names: Sequence[str], where: Path,
                 row_at: Optional[Callable[[int], str]] = None) -> torch.Tensor:
    """Each label's class index in ``class_names`` (by name, any case and either Unicode form, or by index),
    :class:`BadInput` naming ``where`` otherwise. ``row_at``: how a message names label ``i``'s row
    (:meth:`RepairData.row_at`, ``row 3 (line 5)``), put before the problem; None: no row is named."""
    import torch  # noqa: lazy: a command that fails on its arguments returns before torch loads

    return torch.tensor(label_indices(labels, class_names, where, row_at), dtype=torch.long)


def label_indices(labels: Sequence[str], class_names: Sequence[str], where: Optional[Path] = None,
                  row_at: Optional[Callable[[int], str]] = None) -> list[int]:
    """:func:`match_labels` as a list (torch not needed): the one rule of which class a label names, for
    the data's labels and for a class a gate's ``--expect-groups`` names alike."""
    def rows(lab: str) -> str:      # the first row holding the label, and how many more do
        hits = [i for i, x in enumerate(labels) if x == lab]
        return row_at(hits[0]) + (f" and {len(hits) - 1} more row(s)" if len(hits) > 1 else "")

    def at(lab: str) -> str:        # the rows as a message's start
        return f"{rows(lab)}: " if row_at is not None else ""

    def of(lab: str) -> str:        # the rows after a label the message quotes
        return f" ({rows(lab)})" if row_at is not None else ""

    names = [str(c) for c in class_names]
    exact: dict[str, list[int]] = {}
    folded: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        exact.setdefault(n, []).append(i)
        folded.setdefault(_folded(n), []).append(i)
    readings: dict[str, list[int]] = {}
    for i, n in enumerate(names):        # a class named "1.0" is the label 1, as the data's 1.0 reads 1
        v = cell_value(n)
        readings.setdefault(v, []).append(i)
        if v != n and v not in exact:
            exact[v] = [i]
    # classes whose names read as one label ("1" and "1.0"): the data's labels are read so before they are
    # matched, so such a label may have been written as either name; it names both classes
    clashing: dict[str, list[int]] = {}
    for v, idx in readings.items():
        if len(idx) > 1 and len({names[i] for i in idx}) > 1:
            for key in (v, *(names[i] for i in idx)):
                clashing[key] = idx
    # one reading for the whole table: a label that is no class name but an index means the table gives
    # indices, and then a label that is both a class name and the index of another class is ambiguous
    # (classes named "1", "2", "3" and labels 0, 1, 2: "1" would be class "1" by name, index 1 is "2")
    by_index = [lab for lab in dict.fromkeys(labels) if not (exact.get(lab) or folded.get(_folded(lab)))
                and _class_index(lab, len(names)) is not None]
    if by_index:
        for lab in dict.fromkeys(labels):
            hit = exact.get(lab) or folded.get(_folded(lab))
            j = _class_index(lab, len(names))
            if hit and j is not None and j != hit[0]:
                raise BadInput(f"labels mix class names and indices: {by_index[0]!r}{of(by_index[0])} is read as "
                               f"a class index, but {lab!r}{of(lab)} is both the class named {names[hit[0]]!r} "
                               f"(index {hit[0]}) and index {j} ({names[j]!r}); give every label as a class name",
                               where)
    out = []
    for lab in labels:
        if lab in clashing:
            idx = clashing[lab]
            alike = len({_folded(names[i]) for i in idx}) < len(idx)      # names that look the same: escaped
            raise BadInput(f"{at(lab)}label {lab!r} may name any of {len(idx)} classes of the model "
                           f"({' and '.join((ascii if alike else repr)(names[i]) for i in idx)}, which the data's "
                           f"labels read alike, as "
                           f"{cell_value(names[idx[0]])!r}); rename one of those classes in the model's config",
                           where)
        hit = exact.get(lab) or folded.get(_folded(lab))
        if hit and len(hit) > 1:           # a checkpoint's names may repeat (ImageNet's two "crane")
            raise BadInput(f"{at(lab)}label {lab!r} names {len(hit)} classes of the model "
                           f"({', '.join(map(str, hit))}); give the class index instead", where)
        if hit:
            out.append(hit[0])
        elif _class_index(lab, len(names)) is not None:
            out.append(_class_index(lab, len(names)))
        else:
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise BadInput(f"{at(lab)}label {lab!r} is not a class of the model (classes: {shown})", where)
    return out


def _folded(name: str) -> str:
    """A class name as a label may write it: any case, and either Unicode form of an accented letter (macOS
    writes a folder ``café`` decomposed, NFD; most tools composed, NFC: two names that look the same)."""
    import unicodedata

    return unicodedata.normalize("NFC", name).lower()


def check_classes_present(y, class_names: Sequence[str], where=None) -> None:
    """Every class of the head has samples in the repair set ``y`` (class ids): a head refit without
    a class's samples pushes it away (its recall 0, silently), and one class alone is no head at
    all -- :class:`BadInput` naming the missing. The one rule (``repair fix``'s check of the repair
    set, :func:`repair.choosing.choose_heads`)."""
    import torch  # noqa: lazy

    present = torch.unique(torch.as_tensor(y)).tolist()
    if len(present) < 2:
        raise BadInput(f"the repair set has only one class ({class_names[present[0]] if present else 'none'}); "
                       "a head cannot be refit from it", where)
    if len(present) < len(class_names):
        missing = [class_names[c] for c in range(len(class_names)) if c not in present]
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise BadInput(f"the repair set covers {len(present)} of the model's {len(class_names)} classes "
                       f"(no samples of {shown}); the head cannot be refit for absent classes", where)


def figure_class_names(class_names: Sequence[str]) -> list[str]:
    """The names the figures give the classes: a checkpoint's own, but where two classes read as one name (a
    checkpoint's names may repeat, ImageNet's two "crane"; or differ only in spaces, Unicode form or ``1.0``),
    each of those with its index (``crane#134``): no two rows of a table, two groups or a gate's group
    share a name."""
    names = [str(c) for c in class_names]
    readings = [cell_value(n) for n in names]
    count = Counter(readings)
    out = [f"{n}#{i}" if count[r] > 1 else n for i, (n, r) in enumerate(zip(names, readings))]
    if len(set(out)) < len(out):     # an indexed name that is another class's own ("crane#1"): every one indexed
        out = [f"{n}#{i}" for i, n in enumerate(names)]
    return out


def checkpoint_class_names(figure_names: Sequence) -> list[str]:
    """The checkpoint's own class names back from :func:`figure_class_names`' (their ``#index`` taken off
    where it was added: a name that then reads as another's): what a label is matched against."""
    import re

    stripped = []
    for i, n in enumerate(str(x) for x in figure_names):
        m = re.fullmatch(r"(.*)#(\d+)", n, flags=re.S)
        stripped.append(m.group(1) if m and int(m.group(2)) == i else None)
    if (stripped and all(s is not None for s in stripped)         # every one indexed (see figure_class_names)
            and len({cell_value(s) for s in stripped}) < len(stripped)):
        return stripped
    count: dict[str, int] = {}
    for s in stripped:
        if s is not None:
            count[cell_value(s)] = count.get(cell_value(s), 0) + 1
    return [s if s is not None and count[cell_value(s)] > 1 else str(n)
            for s, n in zip(stripped, figure_names)]


def encode(data: RepairData, class_names: Sequence[str], group_by: Optional[str] = None) -> Encoded:
    import torch  # noqa: lazy: a command that fails on its arguments returns before torch loads
    where = data.where
    # a table's rows are named (row 3 (line 5)); a class folder's label is the folder's own name
    y = match_labels(data.labels, class_names, where, data.row_at if data.table is not None else None)
    class_names = figure_class_names(class_names)
    if group_by is None:
        return Encoded(y=y, class_names=list(class_names), groups=None, group_names=[])
    check_group_column(data, group_by)
    attr = data.attributes[group_by]
    keys = sorted({(int(c), a) for c, a in zip(y.tolist(), attr)}, key=lambda t: (t[0], t[1]))
    index = {k: i for i, k in enumerate(keys)}
    groups = torch.tensor([index[(int(c), a)] for c, a in zip(y.tolist(), attr)], dtype=torch.long)
    names = [f"{class_names[c]}|{group_by}={a}" for c, a in keys]
    absent = [f"{class_names[c]}|{group_by}={a}" for c in range(len(class_names)) for a in sorted(set(attr))
              if (c, a) not in index]
    seen: dict = {}
    for name, key in zip(names + absent, keys + [None] * len(absent)):
        if name in seen:
            # a class name holding "|COLUMN=" (class "a|g=b", value "c" beside class "a", value "b|g=c"): one
            # name for two groups would give one group's figures (a report's bars, a gate's group) to the other
            raise BadInput(f"two groups are both named {name!r} (a class name or a {group_by!r} value holds "
                           f"'|{group_by}='): rename the class or the values so every group has its own name",
                           where)
        seen[name] = key
    return Encoded(y=y, class_names=list(class_names), groups=groups, group_names=names, absent_groups=absent,
                   group_keys=list(keys), group_by=group_by)
