"""Hugging Face ``transformers`` sequence classifiers saved as a folder
(config.json, model.safetensors, tokenizer files)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import BadInput
from ..io import load_safetensors, save_safetensors
from .base import Adapter, HeadCapture, copy_folder_except, hash_tensors, read_json
from .torch_module import module_name

DEFAULT_MAX_LENGTH = 512


def is_hf_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.exists()):
        return False
    try:
        data = read_json(cfg)
    except BadInput:
        return False
    return "architectures" in data or "model_type" in data


def find_head(model: nn.Module, num_labels: int) -> nn.Linear:
    """The final Linear producing the logits: BERT/MiniLM/DistilBERT ``classifier``,
    RoBERTa ``classifier.out_proj``; else the last Linear with num_labels outputs."""
    cls = getattr(model, "classifier", None)
    if isinstance(cls, nn.Linear):
        return cls
    if cls is not None and isinstance(getattr(cls, "out_proj", None), nn.Linear):
        return cls.out_proj
    found = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.out_features == num_labels:
            found = mod
    if found is None:
        raise BadInput("cannot find the classification head (a Linear with num_labels outputs)")
    return found


class HFTextAdapter(Adapter):
    family = "transformers"
    modality = "text"

    def __init__(self, path: Path, *, max_length: Optional[int] = None, allow_pickle: bool = False):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = Path(path)
        cfg_path = path / "config.json"
        cfg = read_json(cfg_path)
        archs = cfg.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise BadInput(f"not a sequence-classification model (architectures: {archs})", cfg_path)
        weights = path / "model.safetensors"
        if not weights.exists():
            if (path / "model.safetensors.index.json").exists():
                raise BadInput("sharded checkpoints are not supported yet; save with a single "
                               "model.safetensors", path)
            if (path / "pytorch_model.bin").exists():
                raise BadInput("only a pickle weights file here; re-save with safe_serialization=True "
                               "(model.safetensors)", path / "pytorch_model.bin")
            raise BadInput("no model.safetensors in the transformers folder", path)
        tensors, metadata = load_safetensors(weights)  # clear error on truncation/corruption
        self._file_metadata = metadata
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=torch.float32, local_files_only=True, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except BadInput:
            raise
        except Exception as e:
            raise BadInput(f"transformers cannot load this folder ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})", path) from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.model = model.eval()
        self.tokenizer = tokenizer
        num_labels = int(model.config.num_labels)
        self.head = find_head(model, num_labels)
        self.head_name = module_name(model, self.head)
        missing = [k for k in info.get("missing_keys", []) if k.startswith(self.head_name + ".")]
        mismatched = [k for k in info.get("mismatched_keys", [])
                      if str(k[0] if isinstance(k, (tuple, list)) else k).startswith(self.head_name + ".")]
        if missing or mismatched:
            raise BadInput(f"the classification head {self.head_name} was not in the weights "
                           "(transformers would use a random head)", weights)
        self.head_key = f"{self.head_name}.weight"
        if self.head_key not in tensors:
            raise BadInput(f"head tensor {self.head_key} not found by that name in the file", weights)
        self.source = path
        self.weights_path = weights
        id2label = model.config.id2label or {}
        self.class_names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(num_labels)]
        limit = getattr(tokenizer, "model_max_length", None) or DEFAULT_MAX_LENGTH
        if limit > 100_000:
            limit = getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH)
        self.max_length = int(max_length) if max_length else int(min(limit, 512))
        self._body_hash = hash_tensors(tensors, skip=(self.head_key, f"{self.head_name}.bias"))

    def body_hash(self) -> str:
        return self._body_hash

    def preprocess_id(self) -> dict:
        return {"tokenizer": type(self.tokenizer).__name__, "vocab_size": int(self.tokenizer.vocab_size),
                "max_length": self.max_length, "lowercase": bool(getattr(self.tokenizer, "do_lower_case", False))}

    @property
    def source_metadata(self) -> dict[str, str]:
        return dict(self._file_metadata)

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(items), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    @torch.no_grad()
    def embed_batch(self, batch: dict, device: torch.device) -> torch.Tensor:
        cap = HeadCapture(self.head)
        try:
            self.model(**{k: v.to(device) for k, v in batch.items()})
        finally:
            cap.remove()
        emb = cap.value
        if emb is None or emb.dim() != 2:
            raise BadInput("the head's input is not a (batch, features) matrix", self.source)
        return emb.float()

    @torch.no_grad()
    def logits_batch(self, batch: dict, device: torch.device) -> torch.Tensor:
        return self.model(**{k: v.to(device) for k, v in batch.items()}).logits.float()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors, _ = load_safetensors(self.weights_path)
        tensors[self.head_key] = self.head.weight.detach().cpu().to(tensors[self.head_key].dtype).contiguous()
        if self.head.bias is not None:
            key_b = f"{self.head_name}.bias"
            tensors[key_b] = self.head.bias.detach().cpu().to(tensors.get(key_b, self.head.bias).dtype).contiguous()
        return tensors

    def save(self, out: Path, metadata: dict[str, str]) -> Path:
        copy_folder_except(self.source, out, self.weights_path)
        target = out / "model.safetensors"
        # transformers 4.x refuses safetensors metadata without format: pt
        save_safetensors(self.state_tensors(), target, {**self._file_metadata, "format": "pt", **metadata})
        return target
