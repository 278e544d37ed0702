"""Model-family adapters behind one loader: ``load_model(path, ...) -> Adapter``.

A model family is one module that registers itself:

    register_family("name", detect=detect, load=load, priority=50, summary="one line")

``detect(path, options) -> bool`` says whether the family reads this checkpoint
(cheaply: look at the suffix, a config file, the options); ``load(path, options)
-> Adapter`` reads it (a family that builds its architecture from keyword arguments,
``--model-args``, registers with ``model_args=True``; the others refuse them). ``load_model`` asks the families in descending priority
and uses the first that says yes. The registry is :data:`FAMILIES` (a
:class:`repair.registry.Registry`): the built-in families (``factory``, ``onnx_adapter``,
``timm_adapter``, ``hf_adapter``) are imported on first use, then the modules of the
``repair.families`` entry-point group (an installed plugin: a module calling
``register_family``, a :class:`FamilyInfo`, or a function that registers); a broken entry
point is a warning, not an error.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import BadInput
from ..io import check_one_line
from ..registry import FAMILIES_ENTRY_POINTS, Registry

if TYPE_CHECKING:                   # annotations only: .base is imported where it runs
    from .base import Adapter


@dataclass
class LoadOptions:
    """How to read a checkpoint; recorded in provenance."""
    arch: Optional[str] = None            # timm architecture for a bare weights file
    factory: Optional[str] = None         # package.module:function returning an nn.Module
    model_args: Optional[dict] = None     # keyword arguments of the architecture / factory
    allow_pickle: bool = False            # .pt/.pth/.bin, loaded with weights_only=True
    max_length: Optional[int] = None      # text: tokenizer truncation length
    image_size: Optional[int] = None      # preprocessing for checkpoints that carry none (over a bare file's record)
    mean: Optional[list] = None
    std: Optional[list] = None
    class_names: Optional[list] = field(default=None)   # for checkpoints that carry none
    files: tuple = ()                     # files these options were read from (a --model-args .json): inputs

    def __post_init__(self):
        """Every value checked here, so Python callers and the command line get the same error."""
        import math

        from ..rules import check_bool, whole_number

        check_bool(self.allow_pickle, "--allow-pickle")
        if self.arch and self.factory:
            raise BadInput("give --arch (a timm architecture) or --factory (a module), not both")
        for name, flag in (("max_length", "--max-length"), ("image_size", "--image-size")):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, whole_number(v, flag, 1))
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is None:
                continue
            vals = [v] if isinstance(v, (int, float)) else list(v)
            ok = (len(vals) in (1, 3) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               and math.isfinite(x) for x in vals)
                  and (name == "mean" or min(vals) > 0))
            if not ok:
                what = "positive numbers" if name == "std" else "finite numbers"
                raise BadInput(f"--{name} must be one or three (R,G,B) {what}, got {v!r}")
            setattr(self, name, [float(x) for x in vals] * (3 if len(vals) == 1 else 1))
        if self.class_names is not None:
            self.class_names = checked_class_names(self.class_names, "--class-names")
        if self.model_args is not None and not isinstance(self.model_args, dict):
            raise BadInput("--model-args must be a JSON object of keyword arguments")


def names_by_index(mapping: dict, n: int, what: str, where=None, *, gaps: bool = False) -> list:
    """A checkpoint's ``{index: name}`` class names (transformers' ``id2label``, timm's ``label_names``
    written as a dict) as the list of the head's ``n`` classes, or :class:`BadInput` naming ``what``
    and ``where`` when a key is no index of the head or, unless ``gaps`` (timm: "a dict id: name if
    there are id gaps"), an index has no name. A missing name is ``""`` (shown as the class index by
    :func:`checked_class_names`). The one reading of such a mapping."""
    shown = ", ".join(map(str, list(mapping)[:6])) + (", ..." if len(mapping) > 6 else "")
    refused = BadInput(f"{what}'s keys ({shown}) are not the head's {n} class indices (0 to {n - 1})", where)
    out: list = [""] * n
    named: set = set()
    for k, v in mapping.items():
        i = int(str(k)) if str(k).isascii() and str(k).isdigit() and len(str(k)) < 19 else None
        if i is None or i >= n:
            raise refused
        out[i] = v
        named.add(i)
    if not gaps and len(named) != n:
        raise refused
    return out


def checked_class_names(names, what: str, where=None, *, distinct: bool = True) -> list[str]:
    """``names`` as stripped strings, or :class:`BadInput` naming ``what`` (``--class-names``, a
    checkpoint's ``label_names`` / ``id2label``) and ``where`` (its file) when it is not a list of
    names. The one check for class names, wherever they come from. ``distinct`` (names the user
    types): every name non-empty and different. Names a checkpoint carries may repeat (ImageNet has
    two "crane" and two "maillot" classes) and may be empty (shown as the class index): a label that
    names two classes is refused when the data uses it (:func:`repair.data.match_labels`)."""
    if isinstance(names, (str, bytes, dict)) or not hasattr(names, "__iter__"):
        raise BadInput(f"{what} must be a list of class names, got {str(names)[:80]!r}", where)
    out = [str(c).strip() for c in names]
    for i, n in enumerate(out):
        check_one_line(n, f"{what}: class {i}'s name", where)
    if not distinct:
        return [n if n else str(i) for i, n in enumerate(out)]
    twice = sorted(n for n, k in Counter(out).items() if k > 1)
    if not out or not all(out) or twice:
        why = f" ({', '.join(map(repr, twice[:5]))} more than once)" if twice else ""
        shown = repr(out[:8])[:-1] + (", ...]" if len(out) > 8 else "]")
        raise BadInput(f"{what} must be distinct, non-empty names, got {shown}{why}", where)
    return out


Detect = Callable[[Path, LoadOptions], bool]
Load = Callable[[Path, LoadOptions], "Adapter"]


@dataclass(frozen=True)
class FamilyInfo:
    name: str
    detect: Detect
    load: Load
    priority: int                         # higher is asked first
    summary: str = ""
    model_args: bool = False              # builds its architecture with LoadOptions.model_args


def _same(old: FamilyInfo, new: FamilyInfo) -> bool:
    return old.detect is new.detect and old.load is new.load


#: the model families: built-ins (imported on first lookup), then the ``repair.families`` entry points
FAMILIES: Registry[FamilyInfo] = Registry("model family", __name__,
                                          ("factory", "onnx_adapter", "timm_adapter", "hf_adapter"),
                                          FAMILIES_ENTRY_POINTS, entry_type=FamilyInfo, same=_same)


def register_family(name: str, *, detect: Detect, load: Load, priority: int, summary: str = "",
                    model_args: bool = False) -> FamilyInfo:
    """Register a model family (see the module docstring). Registering the same name twice
    with other functions is an error; re-importing a family module is not."""
    return FAMILIES.register(FamilyInfo(name, detect, load, int(priority), summary, bool(model_args)))


def unregister_family(name: str) -> None:
    """Remove a family (for tests and plug-ins that replace a built-in)."""
    FAMILIES.unregister(name)


def list_families() -> list[FamilyInfo]:
    """The registered families in the order ``load_model`` asks them."""
    return sorted(FAMILIES.values(), key=lambda f: (-f.priority, f.name))


def load_model(path, options: Optional[LoadOptions] = None) -> Adapter:
    """The adapter of the first family (by priority) that reads ``path``. A weights file inside
    a timm or transformers folder (``config.json`` beside it) is read as that folder reads its
    own weights, and written back as one file."""
    from ..io import as_path
    from ..rules import check_options

    o = check_options(options, LoadOptions, "options") or LoadOptions()
    path = as_path(path, "the model")
    if not path.exists():
        raise BadInput("model not found", path)
    if not path.is_file() and not path.is_dir():
        raise BadInput("expected a checkpoint file or folder, got a device or other special file", path)
    path = path.absolute()        # a loaded model keeps working after the caller changes folder
    fam = family_for(path, o)
    if fam is None:
        raise not_a_model(path)
    if o.model_args is not None and not fam.model_args:
        raise BadInput(f"--model-args applies to timm architectures and --factory modules, not to "
                       f"{'an' if fam.name[0] in 'aeiou' else 'a'} {fam.name} model", path)
    import torch

    # building a network draws its initial weights (then replaced by the file's) from torch's
    # global generator: the caller's random stream is left where it was; and it is built in float32 (the
    # file's values then copied in), whatever default dtype the caller set (a notebook's
    # torch.set_default_dtype(torch.float64) built a float64 network no ONNX export could run)
    from .base import float32_default

    with torch.random.fork_rng(devices=[]), float32_default():
        adapter = fam.load(path, o)
    adapter.take_source_sha256()     # a family of yours that took none as it read the file: now, at load
    if len(adapter.class_names) < 2:
        # one output: a regression head (transformers' num_labels=1) or one sigmoid logit; read as one
        # softmax class it is 100% accurate on anything labelled with it, and a gate would pass it
        raise BadInput(f"the head has {len(adapter.class_names)} output: a regression or single-logit model; "
                       "repair measures and repairs classifiers with one output per class (two or more)",
                       adapter.weights_path or path)
    given = [f for f, v in (("--image-size", o.image_size), ("--mean", o.mean), ("--std", o.std))
             if v is not None]
    if given and not adapter.preprocess_from_options:
        home = getattr(adapter, "preprocess_home", "its config")      # where the model's own preprocessing is
        raise BadInput(f"{'/'.join(given)} set the preprocessing of a checkpoint that carries none; this "
                       f"{fam.name} model " + ("is a text model" if adapter.modality == "text" else
                                                f"carries its own ({home})")
                       + ", so they would be ignored: leave them out", path)
    check_option_scope(adapter, o, fam.name, path)
    if o.files:                       # read for this model: no output may replace them
        adapter.extra_files = (*adapter.extra_files, *map(Path, o.files))
    return adapter


def check_option_scope(adapter, o: LoadOptions, family: str, path=None) -> None:
    """The one rule for the reading options a model would ignore: each is refused with one line naming
    it and why. ``--max-length`` on an image model (no tokenizer); ``--class-names`` whose count is not
    the head's, or on a checkpoint that names its classes itself (``class_names_home``: where) with
    other names -- its own names given again are harmless."""
    if o.max_length is not None and adapter.modality != "text":
        raise BadInput(f"--max-length sets where a text model's tokenizer truncates; this {family} model is "
                       f"{'an' if adapter.modality[0] in 'aeiou' else 'a'} {adapter.modality} model, "
                       "so it would be ignored: leave it out", path)
    if o.class_names is None:
        return
    own = [str(n) for n in adapter.class_names]
    given = [str(n) for n in o.class_names]
    if len(given) != len(own):
        raise BadInput(f"--class-names has {len(given)} classes, the model's head has {len(own)}", path)
    if given != own:
        home = getattr(adapter, "class_names_home", None) or "its config"
        shown = ",".join(own[:6]) + (",..." if len(own) > 6 else "")
        raise BadInput(f"--class-names names the classes of a checkpoint that names none; this {family} model "
                       f"names its own ({shown}, in {home}), so they would be ignored: leave them out", path)


def family_for(path: Path, options: Optional[LoadOptions] = None) -> Optional["FamilyInfo"]:
    """The first family (by priority) that reads ``path`` with ``options`` -- its ``detect`` only (a
    config read, nothing built) -- or None."""
    o = options or LoadOptions()
    return next((fam for fam in list_families() if fam.detect(Path(path), o)), None)


def not_a_model(path: Path) -> BadInput:
    """What a path no family reads is told (:func:`load_model`, and before any work
    :func:`repair.preflight.check_model_path`)."""
    if Path(path).is_dir():
        return BadInput("not a timm hub folder (config.json with 'architecture') nor a transformers "
                        "folder (config.json with 'architectures')", path)
    return BadInput("a bare weights file needs --arch NAME (timm) or --factory module:function", path)


__all__ = ["Adapter", "FAMILIES", "FamilyInfo", "LoadOptions", "check_option_scope", "checked_class_names", "family_for", "list_families",
           "load_model", "names_by_index", "not_a_model",
           "register_family", "unregister_family"]


def __getattr__(name):                # Adapter (and torch) load on first use: option parsing needs neither
    if name == "Adapter":
        from .base import Adapter

        return Adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
