"""Every shared command-line option, defined once.

Single options are ``Annotated`` aliases (``ModelArg``, ``DataPath``, ``AsJson``). Options that
together make one library options object form an ``OptionBundle``; a command asks for the object
by annotating a parameter with the bundle::

    @app.command("eval")
    @command
    def eval_cmd(model: ModelArg, data: DataPath, columns: Columns, load: Load, runtime: Runtime, ...):
        ...  # columns: DataOptions, load: LoadOptions, runtime: RuntimeOptions

``with_options`` (applied by ``@command``) puts the bundle's options into the command's
signature in that parameter's place (Typer reads ``inspect.signature``, which honours
``__signature__``) and calls the command with the built object there. ``bundle.only(...)`` /
``bundle.without(...)`` offer part of a bundle (the rest keep their defaults) and
``bundle.defaults(...)`` changes defaults, e.g. ``RUNTIME_OPTIONS.defaults(device="cpu")``.

Nothing here imports torch: the library's options classes are imported when a bundle is built,
inside the command call.
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Mapping, Optional, get_args, get_origin

import typer

from repair.config import MAX_SEED
from repair.errors import BadInput
from repair.io import parse_json

if TYPE_CHECKING:  # the real classes import torch
    from repair.adapters import LoadOptions
    from repair.runtime import RuntimeOptions
    from repair.data import DataOptions


class OptionBundle:
    """Options that build one object: ``options`` maps parameter name -> (``Annotated`` type with
    its ``typer.Option``, default); ``build(**values)`` gets every option's value, also the ones a
    command does not offer (their defaults)."""

    def __init__(self, name: str, options: Mapping[str, tuple[Any, Any]], build: Callable[..., Any],
                 offered: Optional[tuple[str, ...]] = None):
        self.name, self.options, self.build = name, dict(options), build
        self.offered = tuple(options) if offered is None else offered

    def _check(self, names) -> None:
        unknown = set(names) - set(self.options)
        if unknown:
            raise TypeError(f"{self.name} options have no {', '.join(sorted(unknown))}")

    def only(self, *names: str) -> "OptionBundle":
        self._check(names)
        return OptionBundle(self.name, self.options, self.build, tuple(n for n in self.offered if n in names))

    def without(self, *names: str) -> "OptionBundle":
        self._check(names)
        return OptionBundle(self.name, self.options, self.build, tuple(n for n in self.offered if n not in names))

    def defaults(self, **values: Any) -> "OptionBundle":
        self._check(values)
        opts = {n: (ann, values.get(n, default)) for n, (ann, default) in self.options.items()}
        return OptionBundle(self.name, opts, self.build, self.offered)

    def parameters(self) -> list[inspect.Parameter]:
        return [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=self.options[n][0],
                                  default=self.options[n][1]) for n in self.offered]

    def make(self, values: dict[str, Any]) -> Any:
        """Build the object from the offered options' values (popped from ``values``)."""
        return self.build(**{n: values.pop(n) if n in self.offered else default
                             for n, (_, default) in self.options.items()})


def _bundle_of(annotation: Any) -> Optional[OptionBundle]:
    if get_origin(annotation) is Annotated:
        found = [m for m in get_args(annotation)[1:] if isinstance(m, OptionBundle)]
        return found[0] if found else None
    return None


def with_options(fn: Callable) -> Callable:
    """Replace each parameter of ``fn`` annotated with an ``OptionBundle`` by the bundle's options
    (in place, so ``--help`` lists them there) and call ``fn`` with the built object instead."""
    sig = inspect.signature(fn, eval_str=True)
    bundles = {name: b for name, p in sig.parameters.items() if (b := _bundle_of(p.annotation))}
    if not bundles:
        return fn
    params: list[inspect.Parameter] = []
    for name, p in sig.parameters.items():
        # keyword-only: Typer calls commands with keywords, and this frees the defaults' order
        params += bundles[name].parameters() if name in bundles else [p.replace(kind=p.KEYWORD_ONLY)]
    names = [p.name for p in params]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        raise TypeError(f"{fn.__name__}: option bundles repeat parameter(s) {', '.join(sorted(clash))}")

    @functools.wraps(fn)
    def wrapper(**kwargs):
        for name, bundle in bundles.items():
            kwargs[name] = bundle.make(kwargs)
        return fn(**kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


# ------------------------------------------------------------------ help panels
PANEL_DATA = "Data columns"
PANEL_LOAD = "Model loading"
PANEL_REPAIR = "Repair"
PANEL_INPUTS = "Model-repair inputs"
PANEL_OUTPUT = "Output"
PANEL_GATE = "Gates"
PANEL_RUNTIME = "Runtime"

# ------------------------------------------------------------------ single options
ModelArg = Annotated[Path, typer.Argument(help="Checkpoint: timm hub folder, transformers folder, .safetensors (+--arch/--factory) or .onnx.")]
DataPath = Annotated[Path, typer.Option("--data", "-d", help="Repair data: image folder / metadata.csv, or text CSV/TSV/JSONL.", rich_help_panel=PANEL_DATA)]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON document on stdout instead of tables.", rich_help_panel=PANEL_OUTPUT)]


def seed_option(help: str, panel: Optional[str] = PANEL_REPAIR) -> Any:
    """The ``--seed`` option with a command's own help: a whole number from 0 to
    :data:`repair.config.MAX_SEED`, a larger one a usage error (exit 2) when the command line is parsed."""
    return Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, rich_help_panel=panel,
                                       help=f"{help} A whole number from 0 to {MAX_SEED}.")]


#: ``--seed`` of the commands that split and fit (``fix``)
Seed = seed_option("Seed of every split and fit.")
#: ``--seed`` of ``repair demo``
DemoSeed = seed_option("Seed of the drawn images, the ERM training and the repair.", None)

# ------------------------------------------------------------------ model loading -> LoadOptions
def _floats(s: Optional[str], name: str) -> Optional[list]:
    """Comma-separated numbers (the values are checked by LoadOptions)."""
    if s is None:
        return None
    try:
        return [float(v) for v in s.split(",")]
    except ValueError:
        raise BadInput(f"{name} must be comma-separated numbers, got {s!r}") from None


def _model_args_file(s: Optional[str]) -> tuple:
    """The file ``--model-args`` names (an input of the run), or ()."""
    return (str(Path(s)),) if s is not None and not s.lstrip().startswith("{") else ()


def _model_args(s: Optional[str]) -> Optional[dict]:
    """``--model-args``: a JSON object, or a .json file holding one (a timm ``config.json``: its
    ``model_args``)."""
    if s is None:
        return None
    text, where = s, None
    if not s.lstrip().startswith("{"):
        where = Path(s)
        if where.is_dir():
            raise BadInput("--model-args names a folder; give a .json file, or a JSON object like "
                           "'{\"channels\": [16, 32]}'", where)
        if not where.is_file():
            raise BadInput(f"--model-args must be a JSON object like '{{\"channels\": [16, 32]}}' or a .json file, "
                           f"got {s!r}")
        try:
            text = where.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"--model-args: cannot read the file ({e})", where) from None
    try:
        obj = parse_json(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"--model-args is not valid JSON ({e.msg}, column {e.colno})", where) from None
    if where is not None and isinstance(obj, dict) and ("model_args" in obj or "architecture" in obj):
        # a timm config.json: its model_args (timm before 1.0.30 leaves the key out when there are none)
        obj = obj.get("model_args", {})
        if not isinstance(obj, dict):
            raise BadInput("--model-args: the config's model_args must be a JSON object", where)
    if not isinstance(obj, dict):
        raise BadInput("--model-args must be a JSON object of keyword arguments", where)
    return obj


def _load_options(arch, factory, model_args, allow_pickle, max_length, image_size, mean, std, class_names) -> LoadOptions:
    from repair.adapters import LoadOptions

    names = [c.strip() for c in class_names.split(",")] if class_names is not None else None
    return LoadOptions(arch=arch, factory=factory, model_args=_model_args(model_args), allow_pickle=allow_pickle,
                       max_length=max_length, image_size=image_size, mean=_floats(mean, "--mean"),
                       std=_floats(std, "--std"), class_names=names, files=_model_args_file(model_args))


def _opt(*decls, help: str, panel: str, **kw):
    return typer.Option(*decls, help=help, rich_help_panel=panel, **kw)


#: --image-size, --mean, --std: where they apply, and what applies without them (repair.adapters: timm_adapter
#: _preprocess, onnx_adapter and factory through images.image_config_from_options)
_NO_PREPROCESSING = ("for a checkpoint that carries no preprocessing (bare timm weights, ONNX files, factories; a "
                     "folder that carries its own refuses it; over the one a bare file repair fix wrote records). "
                     "Default")
_NONE_GIVEN = (". An ONNX file or a factory with no preprocess.json and none of --image-size, --mean, --std is "
               "refused.")

LOAD_OPTIONS = OptionBundle("load", {
    "arch": (Annotated[Optional[str], _opt("--arch", help="timm architecture of a bare weights file (default: none).", panel=PANEL_LOAD)], None),
    "factory": (Annotated[Optional[str], _opt("--factory", help="package.module:function returning the nn.Module (default: none).", panel=PANEL_LOAD)], None),
    "model_args": (Annotated[Optional[str], _opt("--model-args", help="Keyword arguments of the architecture (--arch) or factory, as a JSON object ('{\"channels\": [16, 32, 64, 128]}') or a .json file (a timm config.json: its model_args). Default: none.", panel=PANEL_LOAD)], None),
    "allow_pickle": (Annotated[bool, _opt("--allow-pickle", help="Accept .pt/.pth/.bin (loaded with weights_only=True). Default: refused.", panel=PANEL_LOAD)], False),
    "max_length": (Annotated[Optional[int], _opt("--max-length", min=1, help="Text: tokenizer truncation length in tokens (default: the tokenizer's).", panel=PANEL_LOAD)], None),
    "image_size": (Annotated[Optional[int], _opt("--image-size", min=1, help=f"Input side in pixels {_NO_PREPROCESSING}: for bare timm weights, the one a repair fix output records, else the architecture's; for an ONNX file or a factory, its preprocess.json's, else 224 once --mean/--std are given{_NONE_GIVEN}", panel=PANEL_LOAD)], None),
    "mean": (Annotated[Optional[str], _opt("--mean", help=f"Normalisation mean per channel on the 0-1 pixel scale, e.g. 0.485,0.456,0.406, {_NO_PREPROCESSING}: for bare timm weights, the one a repair fix output records, else the architecture's; for an ONNX file or a factory, its preprocess.json's, else ImageNet's 0.485,0.456,0.406 once --image-size/--std are given{_NONE_GIVEN}", panel=PANEL_LOAD)], None),
    "std": (Annotated[Optional[str], _opt("--std", help=f"Normalisation std per channel on the 0-1 pixel scale, e.g. 0.229,0.224,0.225, {_NO_PREPROCESSING}: for bare timm weights, the one a repair fix output records, else the architecture's; for an ONNX file or a factory, its preprocess.json's, else ImageNet's 0.229,0.224,0.225 once --image-size/--mean are given{_NONE_GIVEN}", panel=PANEL_LOAD)], None),
    "class_names": (Annotated[Optional[str], _opt("--class-names", help="Comma-separated class names in the head's order, for checkpoints that carry none (bare weights, factories, ONNX; default: 0,1,...).", panel=PANEL_LOAD)], None),
}, _load_options)


# ------------------------------------------------------------------ data columns -> DataOptions
def _data_options(**columns) -> DataOptions:
    from repair.data import DataOptions

    return DataOptions(**columns)


def _data_bundle() -> OptionBundle:
    """Every DataOptions field as an option (flags and help from repair.data, defaults from the class)."""
    import dataclasses
    from typing import Optional as Opt

    from repair.data import OPTION_FLAGS, OPTION_HELP, DataOptions

    opts = {}
    for f in dataclasses.fields(DataOptions):
        default = f.default
        kind = bool if isinstance(default, bool) else int if isinstance(default, int) else Opt[str]
        opts[f.name] = (Annotated[kind, _opt(OPTION_FLAGS[f.name], help=OPTION_HELP[f.name], panel=PANEL_DATA)],
                        default)
    return OptionBundle("data", opts, _data_options)


DATA_OPTIONS = _data_bundle()


# ------------------------------------------------------------------ runtime -> RuntimeOptions
def _runtime_options(device, batch_size, cache_dir, no_cache, quiet) -> RuntimeOptions:
    from repair.runtime import RuntimeOptions

    return RuntimeOptions(device=device, batch_size=batch_size,
                          cache_dir=str(cache_dir) if cache_dir else None, use_cache=not no_cache,
                          progress=not quiet)


RUNTIME_OPTIONS = OptionBundle("runtime", {
    "device": (Annotated[str, _opt("--device", help="auto, cpu, cuda, cuda:N (auto: CUDA when present).", panel=PANEL_RUNTIME)], "auto"),
    "batch_size": (Annotated[int, _opt("--batch-size", min=1, help="Samples per forward pass.", panel=PANEL_RUNTIME)], 64),
    "cache_dir": (Annotated[Optional[Path], _opt("--cache-dir", help="Embedding cache folder (default: $REPAIR_CACHE_DIR, else $XDG_CACHE_HOME/repair/embeddings, else ~/.cache/repair/embeddings).", panel=PANEL_RUNTIME)], None),
    "no_cache": (Annotated[bool, _opt("--no-cache", help="Neither read nor write the embedding cache (default: use it).", panel=PANEL_RUNTIME)], False),
    "quiet": (Annotated[bool, _opt("--quiet", "-q", help="No progress on stderr (warnings and errors still show).", panel=PANEL_RUNTIME)], False),
}, _runtime_options)


# ------------------------------------------------------------------ what commands annotate with
Load = Annotated["LoadOptions", LOAD_OPTIONS]
Columns = Annotated["DataOptions", DATA_OPTIONS]                                # with --group-by
ItemColumns = Annotated["DataOptions", DATA_OPTIONS.without("group_by")]        # no groups
Runtime = Annotated["RuntimeOptions", RUNTIME_OPTIONS]
ExportRuntime = Annotated["RuntimeOptions", RUNTIME_OPTIONS.only("device", "quiet").defaults(device="cpu")]  # export, verify
