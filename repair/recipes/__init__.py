"""Recipes: which repair methods ``repair fix`` tries, with which settings.

``--recipe NAME`` is either a registered method (a one-candidate recipe with the
method's defaults, made from the registry: ``dfr``, ``neurontune``, ...) or a YAML
file shipped here (``auto``); ``--recipe PATH`` reads a user's own file::

    name: my-recipe
    description: one line
    selection: auto          # auto | worst_group | worst_class | worst_inferred_group
    folds: 2                 # K of the cross-validation that compares candidates
    repeats: 2               # the cross-validation repeated on new folds, scores averaged
    ensemble: 2              # average the heads of the best N head candidates (1: keep the best)
    plugins: [my_method.py]  # Python files (relative to this file) or modules that register methods
    candidates:
      - method: dfr
        params: {n_refits: 20}
        grid: {c_grid: [[1.0, 0.3], [0.1]]}   # optional: one candidate per combination

Everything is validated when the recipe is loaded, before any model is read: an
unknown key, an unknown method or setting, or a value out of range is a
:class:`repair.errors.BadInput` (exit 2) naming the file and the key.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from repair.errors import BadInput

HERE = Path(__file__).resolve().parent
RECIPE_KEYS = ("name", "description", "selection", "folds", "repeats", "ensemble", "plugins", "candidates")
CANDIDATE_KEYS = ("method", "params", "grid")


@dataclass
class Candidate:
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.method
        return self.method + "(" + ", ".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"

    @property
    def info(self):
        from repair.methods import get_method

        return get_method(self.method)

    def config(self):
        return self.info.make_config(self.params)


@dataclass
class Recipe:
    name: str
    candidates: list[Candidate]
    selection: str = "auto"
    folds: int = 2
    repeats: int = 1
    ensemble: int = 1
    description: str = ""
    source: str = ""

    @property
    def kinds(self) -> set[str]:
        return {c.info.kind for c in self.candidates}


def _file_recipes() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def available() -> list[str]:
    """Built-in recipe names: the YAML files here and every registered method."""
    from repair.methods import list_methods

    return sorted(set(_file_recipes()) | {m.name for m in list_methods()})


def _load_plugin(spec: Any, base: Path, where: Path) -> None:
    if not isinstance(spec, str) or not spec:
        raise BadInput(f"plugins: entries must be file names or module names, got {spec!r}", where)
    try:
        if spec.endswith(".py"):
            path = (base / spec).resolve()
            if not path.is_file():
                raise BadInput(f"plugins: file {spec} not found (looked in {base})", where)
            mod_name = "repair_plugin_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            if mod_name in sys.modules:
                return
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = mod
            try:
                mspec.loader.exec_module(mod)  # type: ignore[union-attr]
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        else:
            importlib.import_module(spec)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"plugins: cannot load {spec} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                       where) from None


def _candidates(doc: dict, path: Path) -> list[Candidate]:
    from repair.config import ConfigError
    from repair.methods import get_method

    raw = doc.get("candidates")
    if not isinstance(raw, list) or not raw:
        raise BadInput("a recipe needs a non-empty 'candidates' list", path)
    out: list[Candidate] = []
    for n, c in enumerate(raw, 1):
        if not isinstance(c, dict) or "method" not in c:
            raise BadInput(f"candidate {n} needs a 'method'", path)
        extra = sorted(set(c) - set(CANDIDATE_KEYS))
        if extra:
            raise BadInput(f"candidate {n}: unknown key {extra[0]!r} (known: {', '.join(CANDIDATE_KEYS)})", path)
        try:
            info = get_method(str(c["method"]))
        except KeyError as e:
            raise BadInput(f"candidate {n}: {e.args[0]}", path) from None
        params, grid = c.get("params") or {}, c.get("grid") or {}
        for key, val in (("params", params), ("grid", grid)):
            if not isinstance(val, dict):
                raise BadInput(f"candidate {n} ({info.name}): '{key}' must be a mapping of setting: value", path)
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise BadInput(f"candidate {n} ({info.name}): grid {k!r} must be a non-empty list of values", path)
        combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else [{}]
        for combo in combos:
            merged = {**params, **combo}
            try:
                info.make_config(merged)
            except ConfigError as e:
                raise BadInput(f"candidate {n} ({info.name}): {e}", path) from None
            out.append(Candidate(info.name, merged))
    return out


def load_recipe(name_or_path: Union[str, Path]) -> Recipe:
    """The recipe a ``--recipe`` value names, validated (see the module docstring)."""
    import yaml

    from repair.methods import get_method, list_methods
    from repair.selection import SELECTION_NAMES

    p = Path(name_or_path)
    is_path = p.suffix.lower() in (".yaml", ".yml") or p.exists() or "/" in str(name_or_path)
    if not is_path:
        if (HERE / f"{name_or_path}.yaml").exists():
            p = HERE / f"{name_or_path}.yaml"
        else:
            try:
                info = get_method(str(name_or_path))
            except KeyError:
                raise BadInput(f"unknown recipe {name_or_path!r} (built in: {', '.join(available())}; "
                               "or give a .yaml path)") from None
            return Recipe(name=info.name, candidates=[Candidate(info.name, {})],
                          description=f"the {info.name} method with its default settings", source="registry")
    if p.is_dir():
        raise BadInput("a recipe must be a YAML file, got a folder", p)
    if not p.exists():
        raise BadInput("recipe file not found", p)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInput(f"not valid YAML ({str(e).splitlines()[0]})", p) from None
    except OSError as e:
        raise BadInput(f"cannot read the recipe ({e.strerror})", p) from None
    if not isinstance(doc, dict):
        raise BadInput("a recipe must be a YAML mapping with a 'candidates' list", p)
    unknown = sorted(set(doc) - set(RECIPE_KEYS))
    if unknown:
        raise BadInput(f"unknown key {unknown[0]!r} (known: {', '.join(RECIPE_KEYS)})", p)
    plugins = doc.get("plugins") or []
    if not isinstance(plugins, list):
        raise BadInput("plugins must be a list of Python files or module names", p)
    list_methods()                      # built-ins first: a plugin cannot shadow them silently
    for spec in plugins:
        _load_plugin(spec, p.parent, p)
    selection = doc.get("selection", "auto")
    if selection not in SELECTION_NAMES:
        raise BadInput(f"selection must be one of {', '.join(SELECTION_NAMES)}, got {selection!r}", p)
    folds = doc.get("folds", 2)
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= 20:
        raise BadInput(f"folds must be a whole number from 2 to 20, got {folds!r}", p)
    vals = {}
    for key, lo, hi, default in (("repeats", 1, 20, 1), ("ensemble", 1, 10, 1)):
        v = doc.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise BadInput(f"{key} must be a whole number from {lo} to {hi}, got {v!r}", p)
        vals[key] = v
    name = doc.get("name", p.stem)
    if not isinstance(name, str) or not name:
        raise BadInput("name must be a non-empty string", p)
    return Recipe(name=name, candidates=_candidates(doc, p), selection=selection, folds=folds, **vals,
                  description=str(doc.get("description", "") or ""), source=p.name)


__all__ = ["Candidate", "Recipe", "available", "load_recipe"]
