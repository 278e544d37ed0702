"""Model-family adapters behind one loader: ``load_model(path, ...) -> Adapter``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import BadInput
from .base import Adapter
from .images import PREPROCESS_FILE, image_config_from_options


@dataclass
class LoadOptions:
    """How to read a checkpoint; recorded in provenance."""
    arch: Optional[str] = None            # timm architecture for a bare weights file
    factory: Optional[str] = None         # package.module:function returning an nn.Module
    allow_pickle: bool = False            # .pt/.pth/.bin, loaded with weights_only=True
    max_length: Optional[int] = None      # text: tokenizer truncation length
    image_size: Optional[int] = None      # preprocessing for checkpoints that carry none
    mean: Optional[list] = None
    std: Optional[list] = None
    class_names: Optional[list] = field(default=None)   # for checkpoints that carry none


def load_model(path, options: Optional[LoadOptions] = None) -> Adapter:
    o = options or LoadOptions()
    path = Path(path)
    if not path.exists():
        raise BadInput("model not found", path)
    side_json = (path if path.is_dir() else path.parent) / PREPROCESS_FILE
    if o.factory:
        from .torch_module import load_factory_model

        cfg = image_config_from_options(o.image_size, o.mean, o.std, side_json)
        return load_factory_model(path, o.factory, allow_pickle=o.allow_pickle, data_config=cfg,
                                  class_names=o.class_names)
    if path.suffix.lower() == ".onnx":
        from .onnx_adapter import load_onnx

        return load_onnx(path, options=o)
    if path.is_dir():
        from .hf_adapter import HFTextAdapter, is_hf_folder
        from .timm_adapter import is_timm_folder, load_timm

        if is_timm_folder(path):
            return load_timm(path, allow_pickle=o.allow_pickle)
        if is_hf_folder(path):
            return HFTextAdapter(path, max_length=o.max_length, allow_pickle=o.allow_pickle)
        raise BadInput("not a timm hub folder (config.json with 'architecture') nor a transformers "
                       "folder (config.json with 'architectures')", path)
    if o.arch:
        from .timm_adapter import load_timm

        return load_timm(path, arch=o.arch, allow_pickle=o.allow_pickle, class_names=o.class_names)
    raise BadInput("a bare weights file needs --arch NAME (timm) or --factory module:function", path)


__all__ = ["Adapter", "LoadOptions", "load_model"]
