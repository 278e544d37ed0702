"""Repair-method registry: head repairs and model repairs under one declared contract.

**Head repairs** are pure functions on embedding tensors; they never see the model::

    @register_method("name", summary="one line", config=NameConfig, groups="optional",
                     transform=AFFINE)
    def name(inputs: RepairInputs, config: NameConfig) -> RepairOutput: ...

``inputs`` carries the embeddings of the repair data the method may fit on (the
caller keeps its own held-out part for selection and reporting), the class labels,
optional group labels and the current head; the method returns a new head ``(W, b)``
of the same shape plus diagnostics. Inputs are never modified in place; a fixed
``inputs.seed`` gives the same head. Every transform the method applies to the
embeddings is one of :mod:`repair.methods.transforms` (declared as ``transform=``)
and is folded into the returned head, so ``X @ W.T + b`` on the *raw* embeddings is
the repaired model.

**Model repairs** change any tensors of the network::

    @register_model_repair("name", summary="one line", config=NameConfig, groups="optional",
                           resources=(Resource("masks", kind="folder", help="..."),))
    def name(inputs: ModelRepairInputs, config: NameConfig) -> ModelRepairOutput: ...

``inputs.model`` is the adapter's trainable module (:class:`repair.modelrepair.trainable.TrainableModel`:
preprocessing with train-time transforms, parameter scopes, frozen BatchNorm), with the
repair data the method may train on, the groups (given, or ``None``), the original
model's logits on that data, a budget and a seed; the method returns the new values
of the tensors it changed. Both kinds run under the same splitting, selection,
report, provenance and export (:mod:`repair.pipeline`).

The registration declares what the pipeline needs to know: ``groups`` -- ``"never"``
(never looks at group labels), ``"optional"`` (uses them when given) or
``"required"``; the config dataclass (validated by :func:`repair.config.build_config`
when a recipe is loaded); for head repairs the transform; for model repairs the
modalities it supports and the user inputs it takes (:class:`repair.registry.Resource`: name,
kind file / folder / choice / data, help; ``repair fix --NAME``, ``inputs.resources[NAME]``).
A new method is one new file calling the registration (the registry is
:mod:`repair.registry`: built-ins below are imported lazily; user files through a recipe's
``plugins:`` list, run only with ``allow_plugins``, or the ``repair.plugins`` entry-point group).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import SettingRefused, build_config, describe
from ..errors import BadInput, RepairError, users_code
from ..registry import METHODS_ENTRY_POINTS, Registry, Resource, merge_resources
from .transforms import AFFINE, MASK, TRANSFORMS, Transform

GROUP_USE = ("never", "optional", "required")


@dataclass
class RepairInputs:
    X: torch.Tensor                 # (N, D) float32 embeddings (input of the final Linear)
    y: torch.Tensor                 # (N,) int64 class indices in the model's order
    W: torch.Tensor                 # (C, D) current head weight
    b: torch.Tensor                 # (C,) current head bias
    groups: Optional[torch.Tensor] = None   # (N,) int64 group ids, or None when unknown
    seed: int = 0
    device: str = "cpu"
    #: (N,) ids of identical samples (same bytes / text), or None: a method's own held-out splits keep
    #: each id on one side (``selection.Holdout/KFold/stratified_split(clusters=)``)
    clusters: Optional[torch.Tensor] = None

    @property
    def num_classes(self) -> int:
        return int(self.W.shape[0])

    def logits(self) -> torch.Tensor:
        return self.X @ self.W.T + self.b

    def cpu_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detached CPU ``(X float32, y int64, W float32, b float32)``."""
        return (self.X.detach().float().cpu(), self.y.detach().long().cpu(),
                self.W.detach().float().cpu(), self.b.detach().float().cpu())

    def prepared(self) -> "Prepared":
        """What most methods start from: a generator seeded with ``seed``, the CPU tensors
        and the original head's logits."""
        X, y, W, b = self.cpu_tensors()
        return Prepared(torch.Generator().manual_seed(int(self.seed)), X, y, W, b, X @ W.T + b)


@dataclass
class FoldInputs(RepairInputs):
    """A head repair's inputs inside a selection (:meth:`repair.choosing.FitContext.fit`): the training
    rows of a fold, of a repair set that covers every class of the head (checked there). A small class
    may be absent from a fold -- its out-of-fold score says what that costs -- so these inputs are not
    held to :meth:`MethodInfo.__call__`'s rule that every class has samples."""


@dataclass
class Prepared:
    gen: torch.Generator
    X: torch.Tensor
    y: torch.Tensor
    W0: torch.Tensor
    b0: torch.Tensor
    logits0: torch.Tensor

    def __iter__(self):
        return iter((self.gen, self.X, self.y, self.W0, self.b0, self.logits0))


@dataclass
class RepairOutput:
    W: torch.Tensor                 # (C, D) new head weight (float32, cpu)
    b: torch.Tensor                 # (C,) new head bias
    diagnostics: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


@dataclass
class TrainSet:
    """Extra labelled data a model repair may train on (``repair fix --train``)."""
    items: list                     # image paths / texts
    y: torch.Tensor                 # (N,) class indices in the model's order
    groups: Optional[torch.Tensor] = None   # (N,) group ids when the data has the --group-by column
    source: str = ""


@dataclass
class ModelRepairInputs:
    model: Any                      # repair.modelrepair.trainable.TrainableModel
    items: list                     # the repair samples the method may train on (image paths / texts)
    y: torch.Tensor                 # (N,) class indices
    ref_logits: torch.Tensor        # (N, C) the original model's logits on ``items``
    groups: Optional[torch.Tensor] = None   # (N,) given group ids, or None
    budget: Any = None              # repair.modelrepair.finetune.Budget (steps / seconds / epochs); None: the default
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    class_names: list = field(default_factory=list)
    resources: dict = field(default_factory=dict)
    # the user inputs the model repairs declare (repair.registry.model_resources()), by name, as
    # Resource.check returned them (Path / str; kind "data": a TrainSet), e.g. "train", "masks",
    # "segmenter", "generator", "generator_model", "prompts"; and from the pipeline: "data_root"
    # (Path: the repair data's folder, for finding masks), "data_file" (Path: its table, else its
    # folder: what an error about the repair set names), "group_names" (the names of the group
    # ids, "class|column=value", when --group-by was given) and "group_values" (each group id's
    # value of that column: a class name or a value may hold "|" or "=", so never parse the names)
    duplicates: Optional[torch.Tensor] = None   # (N,) ids of identical samples (same id = same sample):
                                                # held-out splits keep each id on one side
    workdir: Optional[Path] = None  # an empty folder for files the repair makes (kept beside the output
                                    # when the repair is chosen: return it as ``artifacts``)
    folds: Optional[list] = None    # [(train_idx, held_idx), ...] over ``items``: the folds a caller scores the
                                    # repair on (recipe auto-ft); a repair that cross-fits takes them as its folds
                                    # (mixft's cross_fit, when their number matches) and returns ``oof_pred``
    # cross-fitting with the caller's folds: ``stop_check(rows, points)`` after each member but the last,
    # ``points`` (P, len(rows)) the out-of-fold predictions of the members so far on their folds' rows at
    # every point the finished run could end at; a reason it returns ends the run (CannotWin is raised)
    stop_check: Optional[Callable[[torch.Tensor, torch.Tensor], Optional[str]]] = None

    @property
    def num_classes(self) -> int:
        return int(self.ref_logits.shape[1])


class CannotWin(Exception):
    """A model repair ended early because its caller's ``stop_check`` showed that it cannot be chosen
    (:data:`ModelRepairInputs.stop_check`). ``steps``: optimiser steps taken; ``members``: members
    trained; ``seconds``: set by the caller that timed the run."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
        self.steps, self.members, self.seconds = 0, 0, 0.0
        self.loop: Optional[dict] = None    # the loop record of the members trained (schedule, what stopped each)


@dataclass
class ModelRepairOutput:
    tensors: dict[str, torch.Tensor]        # new values of the tensors that changed (state-dict names)
    diagnostics: dict[str, Any] = field(default_factory=dict)   # JSON-serialisable
    steps: int = 0                          # optimiser steps taken
    artifacts: Optional[Path] = None        # a folder of files to keep beside the output (inside ``workdir``)
    # a cross-fitted repair: (N,) each row's out-of-fold class prediction (the member that did not train
    # on the row, at the point settling chose), so a caller can score the repair as it scores heads
    oof_pred: Optional[torch.Tensor] = None


@dataclass
class MethodInfo:
    name: str
    fn: Callable[[Any, Any], Any]
    summary: str
    config_cls: type
    kind: str = "head"              # "head" | "model"
    groups: str = "optional"        # "never" | "optional" | "required"
    transform: Optional[Transform] = None      # head repairs: how T(X) folds into the head
    modalities: tuple = ("image", "text")      # model repairs: the data they can train on
    freeze: Optional[Callable[[Any, dict], Any]] = None
    resources: tuple = ()                      # model repairs: the user inputs they take (Resource)
    #: where the settings it is called with were written, ``(file or None, what)``: a recipe candidate's
    #: (``Candidate.info``), so a setting the model refuses at run time names them (:meth:`from_recipe`)
    origin: tuple = field(default=(), compare=False, repr=False)
    # head repairs with an inner choice (a penalty, a threshold): ``freeze(config, diagnostics)``
    # returns the config that refits with the settings the inner selection chose, so a
    # cross-validation of methods can refit each one cheaply instead of re-running its selection

    @property
    def needs_groups(self) -> bool:
        return self.groups == "required"

    @property
    def uses_groups(self) -> bool:
        return self.groups != "never"

    def default_config(self):
        return build_config(self.config_cls, {})

    def make_config(self, params: Optional[dict] = None):
        """A validated config (``repair.config.ConfigError``, a ValueError naming the setting,
        on an unknown setting or a bad value)."""
        return build_config(self.config_cls, params)

    def settings(self) -> list[dict]:
        return describe(self.config_cls)

    def from_recipe(self, origin: tuple) -> "MethodInfo":
        """This method, called with the settings of a recipe candidate ``origin`` = ``(file or None,
        what)`` (``what``: the candidate, as the recipe's own errors name it): a setting the model refuses
        when it runs (:class:`repair.config.SettingRefused`) is a BadInput naming the file and candidate."""
        return dataclasses.replace(self, origin=tuple(origin))

    def named(self, e: SettingRefused) -> SettingRefused:
        """``e``, a setting the model refuses, named with the recipe file (or recipe) and the candidate the
        setting was written in (:attr:`origin`) -- still a :class:`SettingRefused`, which no fallback reads
        as a fold's or a sample's problem."""
        if not self.origin or e.path is not None:
            return e
        where, what = self.origin
        return SettingRefused(f"{what}: {e.problem}", where)

    def __call__(self, inputs, config=None):
        if self.needs_groups and getattr(inputs, "groups", None) is None:
            raise BadInput(f"{self.name} needs group labels (give --group-by)")
        if self.kind == "head":
            inputs = check_inputs(inputs, self.name)      # ids as int64, huge ids renumbered (a copy)
            if not isinstance(inputs, FoldInputs):
                # a head refit without a class's samples pushes that class away (its recall 0, silently);
                # one class alone is no head: the rule repair fix and choose_heads apply (one home)
                from ..data import check_classes_present

                try:
                    check_classes_present(inputs.y, [f"class {c}" for c in range(inputs.num_classes)])
                except BadInput as e:
                    raise BadArrays(f"{self.name}: {e.problem}") from None
        if isinstance(config, dict):          # settings by name, as a recipe gives them: validated
            config = self.make_config(config)
        elif config is not None and not isinstance(config, self.config_cls):
            raise TypeError(f"{self.name}: config must be a {self.config_cls.__name__} (or a dict of its "
                            f"settings), got {type(config).__name__}")
        elif config is not None:              # given whole: the same checks of each value
            from ..config import check_config

            config = check_config(config)
        try:
            config = config if config is not None else self.default_config()
            if self.builtin:
                out = self.fn(inputs, config)
            else:
                # a plugin's method is the user's code: what it prints goes to stderr (never into the
                # --json document), its sys.exit is a BadInput naming it (neither the command's exit
                # code nor a Ray worker's end). Only around a plugin's call: built-in methods never print
                with users_code(self.where()):
                    out = self.fn(inputs, config)
        except SettingRefused as e:
            raise self.named(e) from None
        except Exception as e:
            if self.builtin or isinstance(e, RepairError):
                raise
            # a plugin's own failure is the user's code: named with its file, not reported as our bug
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BadInput(f"{self.where()} failed: {type(e).__name__}: {first}") from e
        (check_output if self.kind == "head" else check_model_output)(out, inputs, self)
        return out

    @property
    def builtin(self) -> bool:
        return (getattr(self.fn, "__module__", None) or "").startswith(__name__ + ".")   # None: exec'd code

    def where(self) -> str:
        """``method NAME`` and, for a plugin's, the file that defines it."""
        import inspect

        if self.builtin:
            return f"method {self.name}"
        try:
            src = inspect.getsourcefile(self.fn)
        except TypeError:
            src = None
        return f"method {self.name} ({src or getattr(self.fn, '__module__', '?')})"


def check_output(out, inputs: "RepairInputs", info: MethodInfo) -> None:
    """A head repair's result is a :class:`RepairOutput` whose ``W`` / ``b`` have the shapes of the
    head it replaces and hold finite floats. A plugin's that is not is :class:`repair.errors.BadInput`
    naming the method and its file (the user's code); a built-in's is our bug (``RuntimeError``)."""
    def shape(t):
        return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    why = None
    if not isinstance(out, RepairOutput):
        why = f"returned {type(out).__name__}, not a RepairOutput"
    elif not (isinstance(out.W, torch.Tensor) and isinstance(out.b, torch.Tensor)
              and out.W.shape == inputs.W.shape and out.b.shape == inputs.b.shape):
        why = (f"returned a head of shape {shape(out.W)} / {shape(out.b)}, expected "
               f"{tuple(inputs.W.shape)} / {tuple(inputs.b.shape)}")
    elif not (out.W.is_floating_point() and out.b.is_floating_point()):
        why = f"returned a head of {out.W.dtype} / {out.b.dtype}, not floats"
    elif not (bool(torch.isfinite(out.W).all()) and bool(torch.isfinite(out.b).all())):
        why = "returned a head holding NaN or infinite values"
    _fail(info, why)


def check_model_output(out, inputs: "ModelRepairInputs", info: MethodInfo) -> None:
    """A model repair's result is a :class:`ModelRepairOutput` whose ``tensors`` name tensors of the
    model, each with its shape, floating-point ones finite; else as :func:`check_output`."""
    why = None
    if not isinstance(out, ModelRepairOutput):
        why = f"returned {type(out).__name__}, not a ModelRepairOutput"
    elif not isinstance(out.tensors, dict):
        why = f"returned tensors as {type(out.tensors).__name__}, not a dict of name -> tensor"
    else:
        state = inputs.model.module.state_dict()
        for name, t in out.tensors.items():
            if name not in state:
                why = f"returned a tensor {name!r} the model does not have"
            elif not isinstance(t, torch.Tensor) or t.shape != state[name].shape:
                why = (f"returned {name} of shape {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                       f", expected {tuple(state[name].shape)}")
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                why = f"returned {name} holding NaN or infinite values"
            if why:
                break
    _fail(info, why)


def _fail(info: MethodInfo, why) -> None:
    if why is None:
        return
    if info.builtin:
        raise RuntimeError(f"{info.where()} {why}")
    raise BadInput(f"{info.where()} {why}")


class BadArrays(BadInput, ValueError):
    """Arrays a head repair is not defined on (:func:`check_inputs`): a :class:`repair.errors.BadInput`
    (a bad input, exit 2 from the CLI) and a ``ValueError`` (what :func:`repair.choosing.choose_heads`
    documents for arrays of the wrong shape or kind)."""


def check_inputs(inputs: "RepairInputs", method: str = "a head repair", names: Optional[dict] = None) -> "RepairInputs":
    """:class:`repair.errors.BadInput` naming ``method`` and the problem unless ``inputs`` are what a
    head repair is defined on: torch tensors, ``X`` (N, D) floats, ``W`` (C, D), ``b`` (C,), all
    finite in float32 (what the methods compute in: a float64 value beyond its range is refused
    as such), ``y`` (N,) whole class indices in [0, C) (integer -- signed or unsigned -- or bool
    tensors), ``groups`` / ``clusters`` (N,) whole ids from 0 up (any size; unsigned too) or None, a
    valid seed and device. (The pipeline builds them so; a caller of the library may not.) The one
    home of these rules: :func:`repair.choosing.choose_heads` checks its arrays here too. Raises
    :class:`BadArrays` (a BadInput and a ValueError). ``names``: what the caller calls ``X`` / ``W`` /
    ``b`` / ``y`` in the messages (choose_heads: ``W0``, ``b0``).

    Returns the inputs a head repair runs on: ``inputs`` itself when ``y`` / ``groups`` / ``clusters``
    are int64 tensors with ids below the number of rows N (as the pipeline gives them), else a copy
    (``inputs`` is never modified) in which they are int64 and ``groups`` / ``clusters`` holding an id
    >= N are renumbered 0, 1, ... in the order of their ids (``torch.unique``): the same partition of
    the rows, so the same head as with those compact ids -- only per-group figures in a method's
    diagnostics (``group_counts``) are indexed by the new numbers. Ids are only ever read as a
    partition; what the user sees of groups (names, per-group figures of a report) comes from the
    pipeline, whose ids are already below N."""
    from ..config import check_seed
    from ..embeddings import check_device

    def fail(why: str):
        raise BadArrays(f"{method}: {why}")

    nm = {"X": "X", "y": "y", "W": "W", "b": "b", **(names or {})}

    for name in ("X", "y", "W", "b"):
        if not isinstance(getattr(inputs, name, None), torch.Tensor):
            fail(f"{nm[name]} must be a torch tensor, got {type(getattr(inputs, name, None)).__name__}")
    for name in ("X", "y", "W", "b", "groups", "clusters"):
        t = getattr(inputs, name, None)
        if isinstance(t, torch.Tensor) and (t.is_meta or t.layout != torch.strided):
            fail(f"{nm.get(name, name)} must be a dense tensor holding its values, got a "
                 f"{'meta' if t.is_meta else str(t.layout).removeprefix('torch.')} tensor")
    X, y, W, b = inputs.X, inputs.y, inputs.W, inputs.b
    if X.dim() != 2 or not X.is_floating_point():
        fail(f"{nm['X']} must be an (N, D) float tensor, got {tuple(X.shape)} {X.dtype}")
    n, d = X.shape
    if n == 0:
        fail(f"{nm['X']} has no rows: a head repair needs samples")
    if W.dim() != 2 or W.shape[1] != d or not W.is_floating_point():
        fail(f"{nm['W']} must be a (C, {d}) float tensor for {nm['X']} of {d} columns, got "
             f"{tuple(W.shape)} {W.dtype}")
    c = W.shape[0]
    if tuple(b.shape) != (c,):
        fail(f"{nm['b']} must have shape ({c},) for {nm['W']} of {c} rows, got {tuple(b.shape)}")
    ids = {}
    for name, t in (("y", y), ("groups", inputs.groups), ("clusters", inputs.clusters)):
        if t is None and name != "y":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,) or t.is_floating_point() or t.is_complex():
            fail(f"{nm.get(name, name)} must be an ({n},) integer tensor (one per row of {nm['X']}), got "
                 f"{f'{tuple(t.shape)} {t.dtype}' if isinstance(t, torch.Tensor) else type(t).__name__}")
        ids[name] = t if t.dtype == torch.int64 else _as_int64(t, nm.get(name, name), c, fail)
        if name != "y" and int(ids[name].min()) < 0:
            fail(f"{name} must be ids from 0 up, got {int(ids[name].min())}")
    yl = ids["y"]
    if int(yl.min()) < 0 or int(yl.max()) >= c:
        fail(f"{nm['y']} holds class indices outside 0..{c - 1} ({int(yl.min())}..{int(yl.max())}): labels must "
             "be the head's classes")
    for name in ("groups", "clusters"):
        t = ids.get(name)
        if t is not None and int(t.max()) >= n:       # dense sizes follow the ids: renumbered, the same partition
            ids[name] = torch.unique(t, sorted=True, return_inverse=True)[1].reshape(t.shape)
    for name, t in (("X", X), ("W", W), ("b", b)):
        # checked as the methods compute on it (cpu_tensors: float32), so a finite float64 value beyond
        # float32's range is named here, not met as inf inside a solver; a finite sum is the cheap common case
        t32 = t.float()
        if t32.numel() and not bool(torch.isfinite(t32.sum())) and not bool(torch.isfinite(t32).all()):
            if t32 is not t and bool(torch.isfinite(t).all()):
                fail(f"{nm[name]} holds values beyond float32's range (|x| > {torch.finfo(torch.float32).max:.2g}), "
                     "which head repairs compute in: rescale them")
            fail(f"{nm[name]} holds NaN or infinite values")
        del t32
    try:
        check_seed(inputs.seed)
        check_device(getattr(inputs, "device", "cpu"))
    except BadInput as e:
        fail(e.problem)
    if all(ids[k] is getattr(inputs, k) for k in ids):
        return inputs
    return dataclasses.replace(inputs, **ids)


def _as_int64(t: torch.Tensor, name: str, c: int, fail) -> torch.Tensor:
    """Integer or bool ids ``t`` as an int64 copy (unsigned tensors have few operations in torch). A
    uint64 id of 2**63 or more does not fit: a class index is then out of range; group / cluster ids
    are then renumbered 0, 1, ... in their (unsigned) order, as :func:`check_inputs` renumbers ids >= N."""
    if t.dtype != torch.uint64:
        return t.long()
    s = t.view(torch.int64)                  # the same bits: ids >= 2**63 read negative
    if not bool((s < 0).any()):
        return s.clone()
    if name in ("groups", "clusters"):
        flipped = s ^ torch.iinfo(torch.int64).min     # the top bit flipped: unsigned order as signed order
        return torch.unique(flipped, sorted=True, return_inverse=True)[1].reshape(t.shape)
    fail(f"{name} holds class indices outside 0..{c - 1} (values of 2**63 and more): labels must be the "
         "head's classes")


#: what a method's name may be: it is written in recipes (``method: NAME``), given to ``--recipe NAME``
#: and shown in tables and reports
METHOD_NAME = re.compile(r"\w[\w.+-]{0,99}")


def _check_name(name, builtin: bool = False) -> None:
    """A method's name is a short word (:data:`METHOD_NAME`) that ``--recipe`` reads as a method: not a
    path (``x.yaml``), nor, for a method not built in, a built-in recipe's name (``auto``: that recipe
    would always be taken; a built-in model repair's recipe of its own name, ``mixft``, is its own)."""
    from ..recipes import _file_recipes, looks_like_path

    if not isinstance(name, str) or not METHOD_NAME.fullmatch(name):
        raise ValueError(f"a repair method's name must be 1-100 letters, digits, '_', '.', '+' or '-' (not first), "
                         f"got {name!r}")
    if looks_like_path(name):
        raise ValueError(f"repair method {name!r}: --recipe {name} would read a file, never the method")
    if name in _file_recipes() and not builtin:
        raise ValueError(f"repair method {name!r}: a built-in recipe has that name (--recipe {name} is the "
                         "recipe); register the method under another name")


def _check(reg: Registry, info: MethodInfo) -> None:
    _check_name(info.name, builtin=str(getattr(info.fn, "__module__", "")).startswith(__name__ + "."))
    if info.groups not in GROUP_USE:
        raise ValueError(f"groups must be one of {GROUP_USE}, got {info.groups!r}")
    if not dataclasses.is_dataclass(info.config_cls):
        raise TypeError(f"the config of {info.name!r} must be a dataclass")
    if info.resources and info.kind != "model":
        raise ValueError(f"{info.name!r}: only model repairs take resources")
    # a resource name means one thing across all model repairs
    merge_resources([(m.name, m.resources) for m in reg.registered() if m.kind == "model" and m.name != info.name]
                    + [(info.name, info.resources)])


def _same(old: MethodInfo, new: MethodInfo) -> bool:
    return old.fn is new.fn or (old.fn.__module__, old.fn.__qualname__) == (new.fn.__module__, new.fn.__qualname__)


#: the repair methods: built-ins (one module each, imported on first lookup), then the
#: ``repair.plugins`` entry points
METHODS: Registry[MethodInfo] = Registry(
    "repair method", __name__, ("neurontune", "nsf", "dfr", "afr", "mix", "finetune", "recompose", "mixft", "clp"),
    METHODS_ENTRY_POINTS, entry_type=MethodInfo, same=_same, validate=_check)


def register_method(name: str, *, summary: str, config: type, groups: str = "optional",
                    transform: Optional[Transform] = None, freeze: Optional[Callable[[Any, dict], Any]] = None):
    """Register a head repair (see the module docstring). ``transform``: the embedding
    transform its head is folded from (``transforms.MASK`` / ``transforms.AFFINE``), or
    None when it fits the head on the raw embeddings. ``freeze``: see :class:`MethodInfo`."""
    if transform is not None and not isinstance(transform, Transform):
        transform = TRANSFORMS[str(transform)]

    def deco(fn):
        METHODS.register(MethodInfo(name, fn, summary, config, "head", groups, transform, freeze=freeze))
        return fn
    return deco


def register_model_repair(name: str, *, summary: str, config: type, groups: str = "optional",
                          modalities: tuple = ("image", "text"), resources: tuple = ()):
    """Register a model repair (see the module docstring). ``resources``: the user inputs it takes
    (:class:`repair.registry.Resource`); a name another model repair declares with another kind is
    a ValueError."""
    def deco(fn):
        METHODS.register(MethodInfo(name, fn, summary, config, "model", groups, None, tuple(modalities),
                                    resources=tuple(resources)))
        return fn
    return deco


def list_methods(kind: Optional[str] = None) -> list[MethodInfo]:
    """The registered methods, all or of one ``kind`` (``head`` or ``model``)."""
    if kind not in (None, "head", "model"):
        raise BadInput(f"kind must be head or model, got {kind!r}")
    return [m for m in METHODS.values() if kind is None or m.kind == kind]


def get_method(name: str) -> MethodInfo:
    return METHODS.get(name)


#: the diagnostics keys in which a head repair says whether its solver's fits converged (``False``:
#: a fit stopped at its iteration cap, and the head is its last iterate)
CONVERGED_KEYS = ("solver_converged", "final_solver_converged", "head_converged")


def head_notes(label: str, diagnostics: Optional[dict]) -> list[str]:
    """What a chosen head repair's diagnostics ask the user to know: its own ``warnings``, and a
    fit that stopped at the iteration cap before converging (:data:`CONVERGED_KEYS`), for the head
    and, in an average, for each member (``diagnostics["members"]``). One home of the rule for
    every head repair; the pipeline says them as warnings of the run."""
    d = diagnostics or {}
    notes = [str(w) for w in d.get("warnings") or []]
    off = [k for k in CONVERGED_KEYS if d.get(k) is False]
    if off:
        notes.append(f"{label}: its solver stopped at the iteration cap before converging ({', '.join(off)} "
                     "false in the diagnostics); the head is the last iterate -- raise max_iter (or tol) in "
                     "the recipe's params")
    for name, member in (d.get("members") or {}).items():
        notes += head_notes(str(name), member if isinstance(member, dict) else None)
    return notes


__all__ = ["RepairInputs", "FoldInputs", "RepairOutput", "ModelRepairInputs", "ModelRepairOutput", "CannotWin", "TrainSet", "MethodInfo",
           "register_method", "register_model_repair", "list_methods", "get_method", "MASK", "AFFINE",
           "Transform", "Resource", "METHODS", "BadArrays", "check_inputs", "check_output", "check_model_output",
           "CONVERGED_KEYS", "head_notes"]
