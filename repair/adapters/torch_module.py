"""Image classifiers that are plain ``nn.Module``s: what the timm and the torch-factory
families share.

The head is a ``nn.Linear`` (timm: ``get_classifier()``; a factory module: its
last ``nn.Linear``). Embeddings are captured with a forward pre-hook on it, so
the same code serves every architecture, CNN or ViT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import BadInput
from .base import TorchModelAdapter, check_finite, check_kinds, unstored_count
from .images import GIVE_PREPROCESSING, ImageCollate


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


HINT = " (built with other arguments? pass them with --model-args)"

#: how far a module's output may be from its head's own math, relative to the largest logit, by the dtype
#: the module outputs: float32 another kernel's rounding (up to 4e-7 measured; 25x headroom); a half
#: precision output (the head run under autocast) its dtype's rounding (up to 4e-4 float16, 3.3e-3
#: bfloat16 measured; 10x headroom)
OUTPUT_ROUNDING = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def load_weights_strict(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path,
                        head_name: str) -> None:
    """Load every tensor with matching names and shapes, or fail naming the file.
    Then check the head really holds the file's values (never a random head). Non-finite
    values in any tensor are refused naming it."""
    check_finite(tensors, path)
    own = model.state_dict()
    if f"{head_name}.weight" not in own:      # weight_norm's weight_g / weight_v, a parametrisation's original0
        raise BadInput(f"the head {head_name}'s weight is not one tensor of the state dict (a weight-normalised "
                       "or otherwise parametrised head: "
                       f"{', '.join(k for k in own if k.startswith(head_name + '.'))[:120]}); only a plain linear "
                       "head can be measured and repaired", path)
    # a BatchNorm batch count the file does not store (converted and older checkpoints): torch's own
    # strict load fills it, as timm's does; it is not written back either (Adapter.set_tensors)
    missing = [k for k in own if k not in tensors and not unstored_count(model, k)]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise BadInput("weights do not match the architecture: " + "; ".join(parts) + HINT, path)
    for k, v in own.items():
        if k in tensors and tuple(v.shape) != tuple(tensors[k].shape):
            raise BadInput(f"tensor {k} has shape {tuple(tensors[k].shape)}, the architecture "
                           f"expects {tuple(v.shape)}" + HINT, path)
    check_kinds(own, tensors, path)
    model.load_state_dict({k: tensors[k] for k in own if k in tensors}, strict=True)
    w = model.get_submodule(head_name).weight
    if not torch.equal(w.detach().cpu().to(tensors[f"{head_name}.weight"].dtype), tensors[f"{head_name}.weight"]):
        raise BadInput(f"head {head_name} did not load from the file", path)


def linear_head(head: nn.Module, head_name: str, where: Optional[Path]) -> nn.Linear:
    """``head`` when it is an ``nn.Linear``; else :class:`BadInput` naming its kind (the one home of
    that rule: a loader checks it before it looks for the head's tensors by a Linear's names)."""
    if not isinstance(head, nn.Linear):
        raise BadInput(f"the classifier {head_name} is a {type(head).__name__}, not nn.Linear; "
                       "only linear heads can be repaired", where)
    return head


class TorchImageAdapter(TorchModelAdapter):
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
        self.head = linear_head(model.get_submodule(head_name), head_name, weights_path)
        self.class_names = list(class_names)
        self._source_metadata = dict(metadata)
        self._init_file_state(tensors)
        self.data_config = data_config
        self._collate = ImageCollate(data_config) if data_config is not None else None

    # identity
    def preprocess_id(self) -> dict:
        return {"image": self.data_config}

    # data
    def collate(self, items: Sequence[Any]) -> torch.Tensor:
        if self._collate is None:
            raise BadInput(f"this checkpoint carries no preprocessing: {GIVE_PREPROCESSING}", self.source)
        return self._collate(items, self.max_pixels)

    # compute
    @torch.no_grad()
    def embed_batch(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        out: dict = {}
        emb = self.capture_head_input(lambda: out.setdefault("y", self.model(batch.to(device))))
        self._check_output_is_head(out.get("y"), emb)
        return emb

    def _check_output_is_head(self, y: Any, emb: torch.Tensor) -> None:
        """The module's output must be its head's output: every figure and every repair works on
        ``embeddings @ W.T + b``, so a forward that changes the logits after the head (a prior or
        temperature adjustment, a mask) would be measured and repaired as another model. Checked on
        every batch the embeddings are computed from; :class:`BadInput` naming the weights file."""
        if not isinstance(y, torch.Tensor):
            raise BadInput(f"the model's forward returns a {type(y).__name__}, not a logits tensor; the classifier "
                           f"must end in its head {self.head_name}", self.weights_path)
        # the head's own math, as every figure computes it (``embeddings @ W.T + b``), not its module's call: a
        # subclass with its own forward (a cosine classifier) or a hook on it (a prior added) is another model
        head = torch.nn.functional.linear(emb.to(self.head.weight.dtype), self.head.weight, self.head.bias).float()
        rel = OUTPUT_ROUNDING.get(y.dtype, OUTPUT_ROUNDING[torch.float32])
        y = y.float()
        if not (bool(torch.isfinite(head).all()) and bool(torch.isfinite(y).all())):
            return                     # non-finite outputs: refused by name where the embeddings are checked
        if y.shape != head.shape:
            raise BadInput(f"the model's output has shape {tuple(y.shape)}, its head {self.head_name}'s "
                           f"{tuple(head.shape)}: the forward does more after the head", self.weights_path)
        diff = float((y - head).abs().max()) if y.numel() else 0.0
        # the same math in the same dtype gives the same numbers; the bound only absorbs another kernel's
        # rounding (a forward written ``x @ W.T + b``; a head run under autocast in half precision), never a
        # prior (3.43 on logits of ~6,800 passed the old 1e-3 on float32 outputs)
        if not diff <= rel * (1.0 + float(head.abs().max())):
            raise BadInput(f"the model's output is not its head {self.head_name}'s output (they differ by up to "
                           f"{diff:.3g}): its forward changes the logits after the head (or the head's own module "
                           "does more than x @ W.T + b: a subclass's forward, a hook), and repair would measure "
                           "and repair another model than the one you deploy; make a plain nn.Linear head the "
                           "forward's last step", self.weights_path)

    @torch.no_grad()
    def logits_batch(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.model(batch.to(device)).float()
