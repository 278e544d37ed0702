"""Recipes: which repair methods ``repair fix`` tries, with which settings.

``--recipe NAME`` is either a YAML file of the top-level ``recipes/`` folder (shipped as the
package ``repair_recipes``: ``auto``, ``auto-ft``, the ablations, a documented example per
model repair) or a registered method (a one-candidate recipe with the method's defaults,
made from the registry: ``dfr``, ``neurontune``, ...); ``--recipe PATH`` reads a user's own
file::

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

**Plugins run only when asked.** A recipe's ``plugins:`` are code: :func:`load_recipe` imports
them only with ``allow_plugins=True`` (``--allow-plugins``); otherwise it is a BadInput naming
the recipe and the plugin. :func:`validate_recipe` (manifest checks) never imports anything:
it checks the structure, that plugin files exist, and the settings of the methods already
registered (built-ins and installed entry points, which are the user's own installation);
a method only a plugin would register is then checked at run time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import importlib
import importlib.util
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from repair.errors import BadInput

RECIPE_KEYS = ("name", "description", "selection", "folds", "repeats", "ensemble", "plugins", "candidates")
CANDIDATE_KEYS = ("method", "params", "grid")


def _same_value(default: Any, given: Any) -> bool:
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    return type(norm(default)) is type(norm(given)) and norm(default) == norm(given) or (
        isinstance(default, float) and isinstance(given, (int, float)) and not isinstance(given, bool)
        and float(given) == default)


@dataclass
class Candidate:
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The method and the settings that differ from its defaults (a recipe that spells out every
        default, like the documented examples, is labelled as the method alone)."""
        shown = self.params
        if shown:
            try:
                defaults = dataclasses.asdict(self.info.default_config())
                shown = {k: v for k, v in shown.items() if k not in defaults or not _same_value(defaults[k], v)}
            except KeyError:                   # a plugin's method not registered (validation only)
                pass
        if not shown:
            return self.method
        return self.method + "(" + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) + ")"

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
    plugins: tuple = ()                 # the recipe's plugins: entries (imported only with allow_plugins)
    files: tuple = ()                   # every file it was read from: the YAML and its plugin files (inputs)

    @property
    def kinds(self) -> set[str]:
        return {c.info.kind for c in self.candidates}


def recipes_dir() -> Path:
    """The folder of the built-in recipes: ``recipes/`` beside the ``repair`` package in a source
    checkout (and an editable install), else the installed package ``repair_recipes``."""
    beside = Path(__file__).resolve().parent.parent / "recipes"
    if (beside / "__init__.py").is_file() and (beside / "auto.yaml").is_file():
        return beside
    import repair_recipes

    return Path(repair_recipes.__file__).resolve().parent


def _file_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def _one_line(text: str) -> str:
    """The first sentence of ``text`` (up to a full stop before a capital letter), on one line."""
    text = " ".join(str(text).split())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0]


def describe_file(path: Path) -> str:
    """One line about a recipe file: its ``description:`` (first sentence), else its first comment line."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        doc = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    if isinstance(doc, dict) and doc.get("description"):
        return _one_line(doc["description"])
    for line in text.splitlines():
        if line.strip().startswith("#"):
            return _one_line(line.strip().lstrip("#"))
    return ""


def available() -> dict[str, str]:
    """Every ``--recipe NAME``, sorted: the built-in recipe files and every registered method, each
    with one line of description (a file's ``description:`` or first comment; a method's summary)."""
    from repair.methods import list_methods

    out = {m.name: _one_line(m.summary) for m in list_methods()}
    out.update({name: describe_file(p) for name, p in _file_recipes().items()})
    return dict(sorted(out.items()))


def _plugin_target(spec: Any, base: Path, where: Path) -> Union[Path, str]:
    """What a ``plugins:`` entry names, checked without importing it: a Python file (relative to the
    recipe's folder; it must exist) or a module name."""
    if not isinstance(spec, str) or not spec:
        raise BadInput(f"plugins: entries must be file names or module names, got {spec!r}", where)
    if spec.endswith(".py"):
        path = (base / spec).resolve()
        if not path.is_file():
            raise BadInput(f"plugins: file {spec} not found (looked in {base})", where)
        return path
    if not all(part.isidentifier() for part in spec.split(".")):
        raise BadInput(f"plugins: {spec!r} is neither a .py file nor a module name", where)
    return spec


def _import_plugin(spec: str, target: Union[Path, str], where: Path) -> None:
    """Run a plugin (only after the caller allowed it)."""
    try:
        if isinstance(target, Path):
            mod_name = "repair_plugin_" + hashlib.sha256(os.fsencode(target)).hexdigest()[:12]
            if mod_name in sys.modules:
                return
            mspec = importlib.util.spec_from_file_location(mod_name, target)
            mod = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = mod
            try:
                mspec.loader.exec_module(mod)  # type: ignore[union-attr]
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        else:
            importlib.import_module(target)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"plugins: cannot load {spec} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                       where) from None


def _candidates(doc: dict, path: Path, lenient: bool = False) -> list[Candidate]:
    """The candidates, validated. ``lenient``: a method not registered is taken as it is (its settings
    unchecked): a plugin the caller did not run may register it."""
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
        name = str(c["method"])
        try:
            info = get_method(name)
        except KeyError as e:
            if not lenient:
                raise BadInput(f"candidate {n}: {e.args[0]}", path) from None
            info = None
        params, grid = c.get("params") or {}, c.get("grid") or {}
        for key, val in (("params", params), ("grid", grid)):
            if not isinstance(val, dict):
                raise BadInput(f"candidate {n} ({name}): '{key}' must be a mapping of setting: value", path)
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise BadInput(f"candidate {n} ({name}): grid {k!r} must be a non-empty list of values", path)
        combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else [{}]
        for combo in combos:
            merged = {**params, **combo}
            if info is not None:
                try:
                    info.make_config(merged)
                except ConfigError as e:
                    raise BadInput(f"candidate {n} ({name}): {e}", path) from None
            out.append(Candidate(name, merged))
    return out


def load_recipe(name_or_path: Union[str, Path], allow_plugins: bool = False, validate_only: bool = False) -> Recipe:
    """The recipe a ``--recipe`` value names, validated (see the module docstring). A recipe with
    ``plugins:`` is refused unless ``allow_plugins`` (then they are imported, and register their
    methods before the candidates are checked). ``validate_only``: import nothing, even with
    ``allow_plugins`` (see :func:`validate_recipe`)."""
    import yaml

    from repair.methods import get_method, list_methods
    from repair.selection import SELECTION_NAMES

    p = Path(name_or_path)
    is_path = p.suffix.lower() in (".yaml", ".yml") or p.exists() or "/" in str(name_or_path)
    if not is_path:
        builtin = _file_recipes()
        if str(name_or_path) in builtin:
            p = builtin[str(name_or_path)]
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
    targets = [_plugin_target(spec, p.parent, p) for spec in plugins]     # checked, nothing imported
    if plugins and not validate_only:
        if not allow_plugins:
            raise BadInput(f"recipe {p.name} loads plugin code {plugins[0]}; pass --allow-plugins to run it", p)
        list_methods()                  # built-ins first: a plugin cannot shadow them silently
        for spec, target in zip(plugins, targets):
            _import_plugin(spec, target, p)
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
    return Recipe(name=name, candidates=_candidates(doc, p, lenient=validate_only and bool(plugins)),
                  selection=selection, folds=folds, **vals, description=str(doc.get("description", "") or ""),
                  source=p.name, plugins=tuple(plugins),
                  files=(p.resolve(), *(t for t in targets if isinstance(t, Path))))


def validate_recipe(name_or_path: Union[str, Path]) -> Recipe:
    """Check a recipe without running anything (zoo manifests): the YAML structure, that its plugin
    files exist, and the candidates' settings for every method already registered (built-ins,
    installed entry points). Nothing is imported, whatever the caller allows: with ``plugins:``, a
    method no registered module provides is left to be checked when the recipe is run."""
    return load_recipe(name_or_path, validate_only=True)


__all__ = ["Candidate", "Recipe", "available", "describe_file", "load_recipe", "recipes_dir", "validate_recipe"]
