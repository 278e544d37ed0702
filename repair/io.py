"""File I/O shared by adapters, export and the CLI: weights reading with clear
errors, and atomic outputs (write to a temporary sibling, then rename)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch

from .errors import BadInput

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise BadInput("file not found", path)
    if path.is_dir():
        raise BadInput("expected a .safetensors file, got a folder", path)
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


def load_state_dict_file(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors always; pickle files only with ``allow_pickle`` and then ``weights_only=True``."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise BadInput("pickle checkpoints can run arbitrary code when loaded; convert to "
                           ".safetensors or pass --allow-pickle (loaded with weights_only=True)", path)
        if not path.exists():
            raise BadInput("file not found", path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInput(f"not a loadable weights-only pickle ({str(e).splitlines()[0]})", path) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise BadInput("pickle does not hold a state dict of tensors", path)
        return dict(obj), {}
    return load_safetensors(path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


@contextlib.contextmanager
def atomic_output(final: Path, *, force: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success,
    remove it on any error. An existing ``final`` is replaced only with ``force``."""
    final = Path(final)
    if final.exists() and not force:
        raise BadInput("output already exists (use --force to overwrite)", final)
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.exists():
        raise BadInput("output folder does not exist", parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        old: Optional[Path] = None
        if final.exists():
            old = parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(target, final)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
