"""Hugging Face ``transformers`` sequence classifiers saved as a folder
(config.json, model.safetensors, tokenizer files), or a ``.safetensors`` file inside such a
folder (the folder's model and tokenizer with that file's weights)."""
from __future__ import annotations

import warnings
from pathlib import Path
from types import MappingProxyType
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import BadInput, caught_warnings, no_warnings
from ..io import load_state_dict_file
from . import LoadOptions, checked_class_names, names_by_index, register_family
from .base import TorchModelAdapter, check_finite, check_kinds, check_model_folder, names_of_its_own, read_json
from .text import (collate_texts, first_line, load_tokenizer, quiet_transformers, record_max_length,
                   refuse_remote_code, resolve_max_length, tokenizer_preprocess_id)
from .torch_module import module_name


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


def position_limit(model: nn.Module) -> Optional[int]:
    """How many tokens ``model`` can embed: the rows of its absolute position-embedding table (less
    RoBERTa's offset: its positions start after the padding index), else the config's
    ``max_position_embeddings``; None for a model with relative positions only (DeBERTa-v2)."""
    emb = getattr(getattr(model, "base_model", None), "embeddings", None)
    table = getattr(emb, "position_embeddings", "absent") if emb is not None else "absent"
    if isinstance(table, nn.Embedding):
        n = table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)
        return n if n > 0 else None
    if table is None:
        return None
    v = getattr(model.config, "max_position_embeddings", None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def check_vocabulary(tokenizer, model: nn.Module, folder: Path) -> None:
    """:class:`BadInput` naming ``folder`` when the tokenizer can give ids the model's input
    embeddings have no row for (an IndexError on the first text that uses one)."""
    try:
        rows = int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        rows = getattr(model.config, "vocab_size", None)
    n = len(tokenizer)
    if isinstance(rows, int) and n > rows:
        raise BadInput(f"the tokenizer has {n} tokens but the model embeds only {rows} (vocab_size): token ids "
                       f"from {rows} on have no embedding; give the tokenizer the model was trained with", folder)


def _shape_disagreement(path: Path, tensors: dict) -> Optional[str]:
    """Why a folder's weights do not fit the network its config.json builds, in words: the first tensor
    whose shape differs (the head of a config with more or fewer labels than the weights have rows),
    or None when none differs or the network cannot be built (built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        with quiet_transformers(), no_warnings():
            config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            with torch.device("meta"):
                own = AutoModelForSequenceClassification.from_config(config).state_dict()
    except Exception:
        return None
    for k, v in tensors.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            labels = getattr(config, "num_labels", None)
            return (f"the weights' {k} has shape {tuple(v.shape)}, but this config builds it "
                    f"{tuple(own[k].shape)}" + (f" (num_labels {labels}: id2label / num_labels must give "
                                                "the head's number of classes)" if labels is not None
                                                and tuple(own[k].shape)[:1] == (labels,) else ""))
    return None


def _warn_again(w) -> None:
    """A caught warning said as it would have been: by the module that raised it (a user's filter naming
    the module applies), and never an error here (a ``-W error`` would end a load that succeeded)."""
    import sys

    module = next((name for name, m in list(sys.modules.items())
                   if getattr(m, "__file__", None) == w.filename), None)
    try:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, module=module)
    except Warning:
        pass


class HFTextAdapter(TorchModelAdapter):
    family = "transformers"
    modality = "text"
    # transformers 4.x refuses safetensors metadata without format: pt
    save_metadata_defaults = MappingProxyType({"format": "pt"})

    def __init__(self, path: Path, *, max_length: Optional[int] = None, weights: Optional[Path] = None,
                 allow_pickle: bool = False, class_names: Optional[Sequence[str]] = None):
        from transformers import AutoModelForSequenceClassification

        path = Path(path)
        check_model_folder(path)         # a FIFO or device in it: refused before anything is read
        self.model_folder = path
        cfg_path = path / "config.json"
        cfg = read_json(cfg_path)
        refuse_remote_code(path)           # before transformers reads it: never a prompt, never the code
        archs = cfg.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise BadInput(f"not a sequence-classification model (architectures: {archs})", cfg_path)
        ptype = cfg.get("problem_type")
        if ptype not in (None, "single_label_classification"):
            # a multi-label model decides by a sigmoid per label, a regression one has no classes: the
            # figures (argmax of the logits) and a softmax-fitted head would misstate how it decides
            raise BadInput(f"problem_type is {ptype!r}: repair measures and repairs single-label classifiers "
                           "(the class is the argmax of the logits)", cfg_path)
        own = path / "model.safetensors"
        given = weights is not None
        other = given and Path(weights).resolve() != own.resolve()
        weights = Path(weights) if given else own
        pickled = path / "pytorch_model.bin"
        if not own.exists():
            if (path / "model.safetensors.index.json").exists() or (path / "pytorch_model.bin.index.json").exists():
                raise BadInput("sharded checkpoints are not supported yet; save with a single "
                               "model.safetensors (save_pretrained(..., max_shard_size=\"100GB\"))", path)
            if not pickled.exists():
                raise BadInput("no model.safetensors in the transformers folder", path)
            if given:
                raise BadInput("a weights file beside a pickle-only transformers folder; give the folder", weights)
            # an older Hub model: its weights pickled only; read weights-only with --allow-pickle (as
            # transformers reads it), the repaired folder holds model.safetensors
            weights = pickled
        tensors, metadata = load_state_dict_file(weights, allow_pickle=allow_pickle)   # clear error on corruption
        check_finite(tensors, weights)
        if other:
            from safetensors import safe_open

            try:
                with safe_open(str(own), framework="pt") as f:
                    folder_keys = set(f.keys())
            except Exception:
                raise BadInput("not a readable safetensors file", own) from None
            if set(tensors) != folder_keys:
                odd = sorted(set(tensors) ^ folder_keys)
                raise BadInput(f"weights do not match the folder's model ({len(odd)} tensor name(s) differ, "
                               f"e.g. {odd[0]})", weights)
        self._source_metadata = metadata
        problem = "transformers cannot load this folder"
        with quiet_transformers(), caught_warnings() as caught:
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    str(path), dtype=torch.float32, local_files_only=True, output_loading_info=True,
                    trust_remote_code=False)
            except Exception as e:
                # the refusal is the one line: what transformers warned on the way (a zero-size layer of
                # num_labels 0) is not shown, and a shape its config gives a tensor is named
                shape = _shape_disagreement(path, tensors)
                if shape is not None:
                    raise BadInput(shape, cfg_path) from None
                raise BadInput(f"{problem} ({type(e).__name__}: {first_line(e)})", path) from None
        for w in caught:                    # a load that succeeded: its warnings as they would have been
            _warn_again(w)
        if other:
            own_sd = model.state_dict()
            bad = [k for k, v in tensors.items() if tuple(own_sd[k].shape) != tuple(v.shape)]
            if bad:
                raise BadInput(f"tensor {bad[0]} has shape {tuple(tensors[bad[0]].shape)}, the folder's model "
                               f"expects {tuple(own_sd[bad[0]].shape)}", weights)
            model.load_state_dict(tensors, strict=False)
        check_kinds(model.state_dict(), tensors, weights)
        self.tokenizer = load_tokenizer(path, problem)
        check_vocabulary(self.tokenizer, model, path)
        self.model = model.eval()
        num_labels = int(model.config.num_labels)
        self.head = find_head(model, num_labels)
        self.head_name = module_name(model, self.head)
        missing = [k for k in info.get("missing_keys", []) if k.startswith(self.head_name + ".")]
        mismatched = [k for k in info.get("mismatched_keys", [])
                      if str(k[0] if isinstance(k, (tuple, list)) else k).startswith(self.head_name + ".")]
        if missing or mismatched:
            raise BadInput(f"the classification head {self.head_name} was not in the weights "
                           "(transformers would use a random head)", weights)
        body_missing = sorted(info.get("missing_keys", []))      # the head's were refused above
        if body_missing:       # transformers would initialise them at random: every run another network
            raise BadInput(f"{len(body_missing)} weight(s) of the network are not in the file (e.g. "
                           f"{body_missing[0]}); transformers would fill them with random values", weights)
        self.head_key = f"{self.head_name}.weight"
        if self.head_key not in tensors:
            raise BadInput(f"head tensor {self.head_key} not found by that name in the file", weights)
        self.source = weights if given else path
        self.weights_path = weights
        id2label = model.config.id2label or {}
        named = names_by_index(id2label, num_labels, "id2label", cfg_path) if id2label else list(range(num_labels))
        self.class_names = checked_class_names(named, "id2label", cfg_path, distinct=False)
        if not id2label or not names_of_its_own(self.class_names, num_labels):   # LABEL_0.., 0..: no names of its own
            if class_names is not None and len(class_names) == num_labels:   # (load_model checks the count)
                self.class_names = [str(n) for n in class_names]
                # the written folder names them, as the run read them
                self.config_updates = {"id2label": dict(enumerate(self.class_names)),
                                       "label2id": {n: i for i, n in enumerate(self.class_names)}}
        else:
            self.class_names_home = "config.json id2label"
        self.max_length = resolve_max_length(self.tokenizer, max_length, positions=position_limit(model),
                                             where=cfg_path)
        self.max_length_given = max_length is not None     # --max-length: the written tokenizer keeps it
        self._init_file_state(tensors)
        import transformers

        self.build = {"config": network_config(model.config), "transformers": transformers.__version__}

    def preprocess_id(self) -> dict:
        return tokenizer_preprocess_id(self.tokenizer, self.max_length)

    def save(self, out: Path, metadata: dict[str, str]) -> Path:
        """The folder as :meth:`TorchModelAdapter.save` writes it; its tokenizer truncates at the length
        the run measured with (:func:`record_max_length`) whenever its own limit says otherwise: a
        ``--max-length`` given, or the default (at most 512 tokens, the model's positions) where the
        tokenizer has no limit or a longer one -- else plain transformers reads longer texts than the
        figures were measured on (or fails on them past the positions)."""
        target = super().save(out, metadata)
        own = getattr(self.tokenizer, "model_max_length", None)
        if Path(out).is_dir() and (self.max_length_given or own != self.max_length):   # a folder written
            record_max_length(Path(out), self.max_length)
        return target

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        return collate_texts(self.tokenizer, items, self.max_length)

    @torch.no_grad()
    def embed_batch(self, batch: dict, device: torch.device) -> torch.Tensor:
        return self.capture_head_input(lambda: self.model(**{k: v.to(device) for k, v in batch.items()}))

    @torch.no_grad()
    def logits_batch(self, batch: dict, device: torch.device) -> torch.Tensor:
        return self.model(**{k: v.to(device) for k, v in batch.items()}).logits.float()


#: config fields that do not change what the body computes (labels, names, the dtype the file was saved in:
#: the model is always loaded in float32)
CONFIG_NOT_NETWORK = frozenset({"id2label", "label2id", "num_labels", "_name_or_path", "transformers_version",
                                "dtype", "torch_dtype", "architectures", "finetuning_task", "problem_type"})


def network_config(config) -> dict:
    """A transformers config as it decides the network (part of the embedding cache key)."""
    return {k: v for k, v in config.to_dict().items() if k not in CONFIG_NOT_NETWORK}


def _in_folder(path: Path) -> bool:
    """A .safetensors file inside a transformers folder."""
    return path.is_file() and path.suffix.lower() == ".safetensors" and is_hf_folder(path.parent)


def detect(path: Path, o: LoadOptions) -> bool:
    return is_hf_folder(path) or _in_folder(path)


def load(path: Path, o: LoadOptions) -> HFTextAdapter:
    if path.is_file():
        return HFTextAdapter(path.parent, max_length=o.max_length, weights=path, class_names=o.class_names)
    return HFTextAdapter(path, max_length=o.max_length, allow_pickle=o.allow_pickle, class_names=o.class_names)


register_family("transformers", detect=detect, load=load, priority=70,
                summary="transformers *ForSequenceClassification folder (config.json, model.safetensors, tokenizer)")
