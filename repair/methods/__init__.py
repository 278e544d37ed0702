"""Repair-method registry.

A repair method is a pure function on tensors: it never sees the model object.

    @register_method("name", summary="one line", config=NameConfig, needs_groups=False)
    def name(inputs: RepairInputs, config: NameConfig) -> RepairOutput: ...

``inputs`` carries the embeddings of the repair data that the method may fit on
(the caller keeps its own held-out part for selection and reporting), the class
labels, optional group labels and the current head. The method returns a new
head ``(W, b)`` of the same shape plus diagnostics. The input tensors must not
be modified in place. A method must be deterministic for a fixed ``inputs.seed``.

Every transform a method applies to the embeddings (a neuron mask, an affine
map, a standardisation) is folded into the returned head, so
``logits = X @ W.T + b`` on the *raw* embeddings is the repaired model.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class RepairInputs:
    X: torch.Tensor                 # (N, D) float32 embeddings (input of the final Linear)
    y: torch.Tensor                 # (N,) int64 class indices in the model's order
    W: torch.Tensor                 # (C, D) current head weight
    b: torch.Tensor                 # (C,) current head bias
    groups: Optional[torch.Tensor] = None   # (N,) int64 group ids, or None when unknown
    seed: int = 0
    device: str = "cpu"

    @property
    def num_classes(self) -> int:
        return int(self.W.shape[0])

    def logits(self) -> torch.Tensor:
        return self.X @ self.W.T + self.b

    def cpu_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detached CPU ``(X float32, y int64, W float32, b float32)``."""
        return (self.X.detach().float().cpu(), self.y.detach().long().cpu(),
                self.W.detach().float().cpu(), self.b.detach().float().cpu())


@dataclass
class RepairOutput:
    W: torch.Tensor                 # (C, D) new head weight (float32, cpu)
    b: torch.Tensor                 # (C,) new head bias
    diagnostics: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


@dataclass
class MethodInfo:
    name: str
    fn: Callable[[RepairInputs, Any], RepairOutput]
    summary: str
    config_cls: type
    needs_groups: bool = False      # True: cannot run without group labels
    uses_groups: bool = True        # False: never looks at group labels even when given

    def default_config(self):
        return self.config_cls()

    def make_config(self, params: Optional[dict] = None):
        params = dict(params or {})
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"method {self.name!r} has no setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        return self.config_cls(**params)

    def __call__(self, inputs: RepairInputs, config=None) -> RepairOutput:
        return self.fn(inputs, config if config is not None else self.default_config())


_REGISTRY: dict[str, MethodInfo] = {}

# modules that register the built-in methods (imported lazily on first lookup)
_BUILTIN_MODULES = ("neurontune", "nsf", "dfr", "afr", "mix")


def register_method(name: str, *, summary: str, config: type, needs_groups: bool = False,
                    uses_groups: bool = True):
    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"repair method {name!r} registered twice")
        _REGISTRY[name] = MethodInfo(name, fn, summary, config, needs_groups, uses_groups)
        return fn
    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def list_methods() -> list[MethodInfo]:
    _load_builtins()
    return [ _REGISTRY[k] for k in sorted(_REGISTRY) ]


def get_method(name: str) -> MethodInfo:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown repair method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
