"""The adapter protocol: one per model family.

An adapter owns the model object and knows the family's specifics: how to load
the checkpoint, the preprocessing, the class names in the model's order, where
the final ``nn.Linear`` (the head) is, how to capture its input (the
embedding), and how to write a repaired head back in the checkpoint's own
format. Everything downstream works on tensors only.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import BadInput, RepairError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def hash_tensors(tensors: dict[str, torch.Tensor], skip: Sequence[str] = ()) -> str:
    """sha256 over names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    skip = set(skip)
    for name in sorted(tensors):
        if name in skip:
            continue
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class HeadCapture:
    """Forward pre-hook on the head that records its input (the embedding)."""

    def __init__(self, head: nn.Module):
        self.value: Optional[torch.Tensor] = None
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0].detach()

    def remove(self) -> None:
        self._handle.remove()


class Adapter(ABC):
    """Common protocol. Subclasses set the attributes in ``__init__``."""

    family: str                  # "timm" | "transformers" | "torch" | "onnx"
    modality: str                # "image" | "text"
    source: Path                 # the checkpoint path the user gave
    weights_path: Path           # the file holding the weights
    class_names: list[str]
    model: Optional[nn.Module]
    head: Optional[nn.Linear]

    # ---- identity -------------------------------------------------------
    def source_sha256(self) -> str:
        if not hasattr(self, "_source_sha"):
            self._source_sha = sha256_file(self.weights_path)
        return self._source_sha

    @abstractmethod
    def body_hash(self) -> str:
        """Hash of everything but the head: embeddings depend only on this."""

    @abstractmethod
    def preprocess_id(self) -> dict:
        """JSON-able description of the preprocessing (part of the cache key)."""

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

    # ---- head ------------------------------------------------------------
    def head_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.head is not None
        W = self.head.weight.detach().float().cpu().clone()
        b = (self.head.bias.detach().float().cpu().clone() if self.head.bias is not None
             else torch.zeros(W.shape[0]))
        return W, b

    def set_head(self, W: torch.Tensor, b: torch.Tensor) -> None:
        assert self.head is not None
        if tuple(W.shape) != tuple(self.head.weight.shape):
            raise RepairError(f"new head has shape {tuple(W.shape)}, expected {tuple(self.head.weight.shape)}")
        with torch.no_grad():
            self.head.weight.copy_(W.to(self.head.weight))
            if self.head.bias is None:
                if torch.any(b != 0):
                    self.head.bias = nn.Parameter(b.to(self.head.weight))
            else:
                self.head.bias.copy_(b.to(self.head.bias))
        self._head_changed = True

    @property
    def head_changed(self) -> bool:
        return getattr(self, "_head_changed", False)

    # ---- output ----------------------------------------------------------
    @abstractmethod
    def save(self, out: Path, metadata: dict[str, str]) -> Path:
        """Write the model in the checkpoint's own format to ``out`` (a path
        that does not exist yet; the caller renames it into place). Only the
        head tensors change. Returns the main weights file written."""

    def describe(self) -> dict:
        W, _ = self.head_params()
        return {"family": self.family, "modality": self.modality, "source": self.source.name,
                "num_classes": len(self.class_names), "embedding_dim": int(W.shape[1]),
                "class_names": list(self.class_names)}


def copy_folder_except(src: Path, dst: Path, skip: Path) -> None:
    """Create ``dst`` with every entry of ``src`` but ``skip`` (the weights file
    that is rewritten) and hidden files."""
    import shutil

    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.resolve() == skip.resolve() or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise BadInput("file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"not valid JSON ({e})", path) from None
    if not isinstance(data, dict):
        raise BadInput("expected a JSON object", path)
    return data
