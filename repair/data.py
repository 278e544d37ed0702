"""Repair sets: image folders / metadata.csv, and text CSV/TSV/JSONL.

``load_data`` reads the raw items, labels and attribute columns; ``encode``
matches labels to the model's class order and builds groups (class x attribute).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence


from .errors import BadInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json"}
PATH_COLUMNS = ("img_filename", "filename", "image", "image_path", "img_path", "path", "file")
LABEL_COLUMNS = ("y", "label", "labels", "class", "target")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "sentence1")
METADATA_NAMES = ("metadata.csv", "metadata.tsv", "metadata.jsonl")


@dataclass
class DataOptions:
    """Which columns mean what; recorded in provenance."""
    label_col: Optional[str] = None
    path_col: Optional[str] = None
    text_col: Optional[str] = None
    group_by: Optional[str] = None


@dataclass
class RepairData:
    source: Path
    modality: str                      # "image" | "text"
    items: list                        # image Paths or texts
    labels: list[str]                  # raw label values
    attributes: dict[str, list[str]] = field(default_factory=dict)
    table: Optional[Path] = None       # the metadata/text file read, if any

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """Identifies the items (not labels): part of the embedding cache key."""
        h = hashlib.sha256(self.modality.encode())
        for it in self.items:
            if self.modality == "image":
                st = Path(it).stat()
                h.update(f"{Path(it).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            else:
                h.update(it.encode("utf-8"))
                h.update(b"\0")
        return h.hexdigest()

    def subset(self, idx: Sequence[int]) -> "RepairData":
        return RepairData(self.source, self.modality, [self.items[i] for i in idx],
                          [self.labels[i] for i in idx],
                          {k: [v[i] for i in idx] for k, v in self.attributes.items()}, self.table)


@dataclass
class Encoded:
    y: torch.Tensor                    # (N,) class indices in the model's order
    class_names: list[str]
    groups: Optional[torch.Tensor]     # (N,) group ids, None without --group-by
    group_names: list[str]             # name of each group id: "class|col=value"
    #: groups (class of the model x value seen in the data) without a single sample: they are in
    #: no figure, so a worst-group figure cannot speak for them
    absent_groups: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ reading
def _read_table(path: Path) -> tuple[list[str], list[dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"not UTF-8 text (byte {e.start}: {e.reason})", path) from None
    except FileNotFoundError:
        raise BadInput("file not found", path) from None
    except OSError as e:
        raise BadInput(f"cannot read the file ({e.strerror or e})", path) from None
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"line {n} is not valid JSON ({e.msg})", path) from None
            if not isinstance(row, dict):
                raise BadInput(f"line {n} is not a JSON object", path)
            rows.append({k: ("" if v is None else str(v)) for k, v in row.items()})
        columns = list(rows[0].keys()) if rows else []
        return columns, rows
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    # SST-2 style TSVs hold raw quotes inside sentences: do not treat them as quoting
    reader = csv.DictReader(io.StringIO(text), delimiter=delim,
                            quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL)
    columns = list(reader.fieldnames or [])
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise BadInput(f"column {twice[0]!r} appears more than once in the header", path)
    rows = []
    for n, row in enumerate(reader, 2):
        if None in row:
            raise BadInput(f"line {n} has more fields than the header", path)
        rows.append(row)
    return columns, rows


def _pick(columns: Sequence[str], wanted: Optional[str], defaults: Sequence[str], what: str,
          path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise BadInput(f"no {what} column {wanted!r} (columns: {', '.join(columns)})", path)
        return wanted
    for c in defaults:
        if c in columns:
            return c
    raise BadInput(f"cannot tell which column holds the {what} (columns: {', '.join(columns)}); "
                   f"name it with --{what.replace(' ', '-')}-col", path)


def _from_table(table: Path, root: Path, o: DataOptions) -> RepairData:
    columns, rows = _read_table(table)
    if not rows:
        raise BadInput("no rows", table)
    label_col = _pick(columns, o.label_col, LABEL_COLUMNS, "label", table)
    if o.path_col is not None or o.text_col is not None:
        is_image = o.path_col is not None
    elif any(c in columns for c in PATH_COLUMNS):
        is_image = True
    elif any(c in columns for c in TEXT_COLUMNS):
        is_image = False
    elif table.stem.lower() == "metadata" or _has_images(root):
        is_image = True     # an image folder's table: _pick asks for --path-col
    else:
        raise BadInput(f"cannot tell which column holds the image paths or the texts (columns: "
                       f"{', '.join(columns)}); name it with --path-col (images) or --text-col (texts)", table)
    if is_image:
        path_col = _pick(columns, o.path_col, PATH_COLUMNS, "path", table)
        items = []
        for row in rows:
            rel = row[path_col]
            p = (root / rel) if not Path(rel).is_absolute() else Path(rel)
            if not p.exists():
                raise BadInput(f"image listed in {table.name} not found", p)
            items.append(p)
        used = {label_col, path_col}
        modality = "image"
    else:
        text_col = _pick(columns, o.text_col, TEXT_COLUMNS, "text", table)
        items = [row[text_col] for row in rows]
        used = {label_col, text_col}
        modality = "text"
    labels = [str(row[label_col]).strip() for row in rows]
    for n, lab in enumerate(labels):
        if lab == "":
            raise BadInput(f"row {n + 1} has an empty label", table)
    attrs = {c: [str(row.get(c, "")).strip() for row in rows] for c in columns if c not in used}
    return RepairData(source=root, modality=modality, items=items, labels=labels, attributes=attrs,
                      table=table)


def _has_images(root: Path) -> bool:
    try:
        return any(p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()
                   if not p.name.startswith("."))
    except OSError:
        return False


def _from_class_folders(root: Path) -> RepairData:
    items, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(sub.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(f)
                labels.append(sub.name)
    if not items:
        raise BadInput("no images found (expected class subfolders or a metadata.csv)", root)
    return RepairData(source=root, modality="image", items=items, labels=labels)


def load_data(path, options: Optional[DataOptions] = None) -> RepairData:
    o = options or DataOptions()
    path = Path(path)
    if not path.exists():
        raise BadInput("data not found", path)
    if not path.is_file() and not path.is_dir():
        raise BadInput("expected a folder, or a .csv/.tsv/.jsonl file; got a device or other special file", path)
    try:
        return _load_data(path, o)
    except PermissionError as e:
        raise BadInput(f"cannot read ({e.strerror})", e.filename or path) from None


def _load_data(path: Path, o: DataOptions) -> RepairData:
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise BadInput("expected a folder, or a .csv/.tsv/.jsonl file", path)
        data = _from_table(path, path.parent, o)
    else:
        tables = [path / n for n in METADATA_NAMES if (path / n).exists()]
        if tables:
            data = _from_table(tables[0], path, o)
        else:
            others = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
            subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
            if len(others) == 1 and not subdirs:
                data = _from_table(others[0], path, o)
            elif not subdirs:
                raise BadInput("empty data folder (no class subfolders, metadata.csv or data file)", path)
            else:
                data = _from_class_folders(path)
    if o.group_by is not None and o.group_by not in data.attributes:
        cols = ", ".join(data.attributes) or "none"
        raise BadInput(f"no group column {o.group_by!r} (attribute columns: {cols})", data.table or path)
    return data


# ----------------------------------------------------------------- encoding
def match_labels(labels: Sequence[str], class_names: Sequence[str], where: Path) -> torch.Tensor:
    import torch  # noqa: lazy: a command that fails on its arguments returns before torch loads
    names = [str(c) for c in class_names]
    exact = {n: i for i, n in enumerate(names)}
    folded = {n.lower(): i for i, n in enumerate(names)}
    out = []
    for lab in labels:
        if lab in exact:
            out.append(exact[lab])
        elif lab.lower() in folded:
            out.append(folded[lab.lower()])
        elif lab.lstrip("-").isdigit() and 0 <= int(lab) < len(names):
            out.append(int(lab))
        else:
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise BadInput(f"label {lab!r} is not a class of the model (classes: {shown})", where)
    return torch.tensor(out, dtype=torch.long)


def encode(data: RepairData, class_names: Sequence[str], group_by: Optional[str] = None) -> Encoded:
    import torch  # noqa: lazy: a command that fails on its arguments returns before torch loads
    where = data.table or data.source
    y = match_labels(data.labels, class_names, where)
    if group_by is None:
        return Encoded(y=y, class_names=list(class_names), groups=None, group_names=[])
    if group_by not in data.attributes:
        raise BadInput(f"no group column {group_by!r}", where)
    attr = data.attributes[group_by]
    keys = sorted({(int(c), a) for c, a in zip(y.tolist(), attr)}, key=lambda t: (t[0], t[1]))
    index = {k: i for i, k in enumerate(keys)}
    groups = torch.tensor([index[(int(c), a)] for c, a in zip(y.tolist(), attr)], dtype=torch.long)
    names = [f"{class_names[c]}|{group_by}={a}" for c, a in keys]
    absent = [f"{class_names[c]}|{group_by}={a}" for c in range(len(class_names)) for a in sorted(set(attr))
              if (c, a) not in index]
    return Encoded(y=y, class_names=list(class_names), groups=groups, group_names=names, absent_groups=absent)
