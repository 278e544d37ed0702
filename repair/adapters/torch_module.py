"""Image classifiers that are plain ``nn.Module``s: timm models and user factories.

The head is a ``nn.Linear`` (timm: ``get_classifier()``; a factory module: its
last ``nn.Linear``). Embeddings are captured with a forward pre-hook on it, so
the same code serves every architecture, CNN or ViT.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import BadInput
from ..io import load_state_dict_file, save_safetensors
from .base import Adapter, HeadCapture, copy_folder_except, hash_tensors
from .images import ImageCollate


def module_name(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ValueError("module not found in model")


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    if found is None:
        raise BadInput("the model has no nn.Linear layer to use as the head")
    return found


def load_weights_strict(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path,
                        head_name: str) -> None:
    """Load every tensor with matching names and shapes, or fail naming the file.
    Then check the head really holds the file's values (never a random head)."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise BadInput("weights do not match the architecture: " + "; ".join(parts), path)
    for k, v in own.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise BadInput(f"tensor {k} has shape {tuple(tensors[k].shape)}, the architecture "
                           f"expects {tuple(v.shape)}", path)
    model.load_state_dict({k: tensors[k] for k in own}, strict=True)
    w = model.get_submodule(head_name).weight
    if not torch.equal(w.detach().cpu().to(tensors[f"{head_name}.weight"].dtype), tensors[f"{head_name}.weight"]):
        raise BadInput(f"head {head_name} did not load from the file", path)


class TorchImageAdapter(Adapter):
    """An image classifier module whose weights live in one state-dict file."""

    modality = "image"

    def __init__(self, *, family: str, source: Path, weights_path: Path, model: nn.Module,
                 head_name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                 class_names: Sequence[str], data_config: Optional[dict]):
        self.family = family
        self.source = Path(source)
        self.weights_path = Path(weights_path)
        self.model = model.eval()
        self.head_name = head_name
        head = model.get_submodule(head_name)
        if not isinstance(head, nn.Linear):
            raise BadInput(f"the classifier {head_name} is a {type(head).__name__}, not nn.Linear; "
                           "only linear heads can be repaired", weights_path)
        self.head = head
        self.class_names = list(class_names)
        self._file_tensors_meta = metadata
        self._body_hash = hash_tensors(tensors, skip=(f"{head_name}.weight", f"{head_name}.bias"))
        self.data_config = data_config
        self._collate = ImageCollate(data_config) if data_config is not None else None

    # identity
    def body_hash(self) -> str:
        return self._body_hash

    def preprocess_id(self) -> dict:
        return {"image": self.data_config}

    @property
    def source_metadata(self) -> dict[str, str]:
        return dict(self._file_tensors_meta)

    # data
    def collate(self, items: Sequence[Any]) -> torch.Tensor:
        if self._collate is None:
            raise BadInput("this checkpoint carries no preprocessing: give --image-size/--mean/--std "
                           "or a preprocess.json next to it", self.source)
        return self._collate(items)

    # compute
    @torch.no_grad()
    def embed_batch(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        cap = HeadCapture(self.head)
        try:
            self.model(batch.to(device))
        finally:
            cap.remove()
        emb = cap.value
        if emb is None or emb.dim() != 2:
            raise BadInput(f"the head's input is not a (batch, features) matrix "
                           f"(got {None if emb is None else tuple(emb.shape)})", self.source)
        return emb.float()

    @torch.no_grad()
    def logits_batch(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.model(batch.to(device)).float()

    # output
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The original file's tensors with the (possibly repaired) head put in."""
        tensors, _ = load_state_dict_file(self.weights_path, allow_pickle=True)
        W = self.head.weight.detach().cpu()
        key_w = f"{self.head_name}.weight"
        tensors[key_w] = W.to(tensors[key_w].dtype).contiguous()
        if self.head.bias is not None:
            key_b = f"{self.head_name}.bias"
            dtype = tensors[key_b].dtype if key_b in tensors else W.dtype
            tensors[key_b] = self.head.bias.detach().cpu().to(dtype).contiguous()
        return tensors

    def save(self, out: Path, metadata: dict[str, str]) -> Path:
        meta = {**self._file_tensors_meta, **metadata}
        if self.source.is_dir():
            copy_folder_except(self.source, out, self.weights_path)
            target = out / "model.safetensors"
        else:
            target = out
        save_safetensors(self.state_tensors(), target, meta)
        return target


# ---------------------------------------------------------------- factories
def import_factory(spec: str):
    if ":" not in spec:
        raise BadInput(f"--factory must look like package.module:function, got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let users point at a module in the current folder
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise BadInput(f"cannot import factory module {mod_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise BadInput(f"factory {spec!r}: {fn_name!r} is not a function in {mod_name}")
    return fn


def load_factory_model(weights: Path, factory: str, *, allow_pickle: bool,
                       data_config: Optional[dict], class_names: Optional[Sequence[str]] = None) -> TorchImageAdapter:
    fn = import_factory(factory)
    model = fn()
    if not isinstance(model, nn.Module):
        raise BadInput(f"factory {factory!r} returned {type(model).__name__}, not a torch nn.Module")
    tensors, metadata = load_state_dict_file(weights, allow_pickle=allow_pickle)
    head_name, head = last_linear(model)
    load_weights_strict(model, tensors, weights, head_name)
    names = list(class_names) if class_names else [str(i) for i in range(head.out_features)]
    return TorchImageAdapter(family="torch", source=weights, weights_path=weights, model=model,
                             head_name=head_name, tensors=tensors, metadata=metadata,
                             class_names=names, data_config=data_config)
