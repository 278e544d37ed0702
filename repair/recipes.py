"""Recipes: which repair methods ``repair fix`` tries, with which settings.

``--recipe NAME`` is either a YAML file of the top-level ``recipes/`` folder (shipped as the
package ``repair_recipes``: ``auto``, ``auto-ft``, the ablations, a documented example per
model repair) or a registered method (a one-candidate recipe with the method's defaults,
made from the registry: ``dfr``, ``neurontune``, ...); ``--recipe PATH`` reads a user's own
file. A name of a built-in recipe or a registered method is always the built-in, whatever the
current folder holds: a value is read as a file when it looks like a path (it ends in ``.yaml`` or
``.yml``, holds a path separator, or starts with ``.`` or ``~``: ``./auto`` is a file named ``auto``),
or, a bare name that names nothing built in, when such a file exists::

    name: my-recipe
    description: one line
    selection: auto          # auto | worst_group | worst_class | worst_inferred_group
    folds: 2                 # K of the cross-validation that compares candidates
    repeats: 2               # the cross-validation repeated on new folds, scores averaged
    ensemble: 2              # average the heads of the best N head candidates (1: keep the best)
    plugins: [my_method.py]  # Python files or module names (in this file's folder) that register methods
    candidates:
      - method: dfr
        params: {n_refits: 20}
        grid: {c_grid: [[1.0, 0.3], [0.1]]}   # optional: one candidate per combination

Everything is validated when the recipe is loaded, before any model is read: an
unknown key, an unknown method or setting, or a value out of range is a
:class:`repair.errors.BadInput` (exit 2) naming the file and the key. So is anything a recipe
cannot sensibly be: not a regular file (a FIFO, a device, a folder), larger than
:data:`MAX_RECIPE_BYTES`, more than :data:`MAX_YAML_VALUES` values once its YAML aliases are
expanded (or nested deeper than :data:`MAX_YAML_DEPTH`, or an alias inside its own anchor), a key
given twice in one mapping, a setting given in both ``params`` and ``grid`` of a candidate, or
more than :data:`MAX_CANDIDATES` candidates once the grids are expanded.

**Plugins run only when asked.** A recipe's ``plugins:`` are code: :func:`load_recipe` imports
them only with ``allow_plugins=True`` (``--allow-plugins``); otherwise it is a BadInput naming
the recipe and the plugin. :func:`validate_recipe` (manifest checks) never imports anything:
it checks the structure, that plugin files exist, and the settings of the methods already
registered (built-ins and installed entry points, which are the user's own installation);
a method only a plugin would register is then checked at run time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import importlib
import importlib.machinery
import importlib.util
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from repair.errors import BadInput, users_code

#: a recipe's settings when its file leaves them out
RECIPE_DEFAULTS = {"selection": "auto", "folds": 2, "repeats": 1, "ensemble": 1}
RECIPE_KEYS = ("name", "description", "selection", "folds", "repeats", "ensemble", "plugins", "candidates")
CANDIDATE_KEYS = ("method", "params", "grid")

#: the largest recipe file read (a recipe is a few dozen lines): checked on the file's size and
#: bounded on the read itself (a file that grows, or reports no size, is never read past it)
MAX_RECIPE_BYTES = 1 << 20
#: the most YAML values (scalars, lists, mappings) a recipe may hold with its aliases expanded: a
#: few hundred bytes of nested aliases expand to billions, which ``str()`` or a setting's list
#: conversion would then build in memory
MAX_YAML_VALUES = 10_000
#: the deepest nesting of lists and mappings in a recipe (its settings hold lists of lists at most)
MAX_YAML_DEPTH = 32
#: the most candidates a recipe may have once its grids are expanded (one candidate's grid as well
#: as the whole recipe). Every candidate is built and checked when the recipe is loaded, then
#: fitted once per fold and repeat (up to 20 x 20 fits) and a model repair trains the network each
#: time; the built-in recipes have at most 5 candidates, and 256 still fits a search of four
#: settings of four values, while a grid of six settings of ten values (a million candidates) would
#: take hours and gigabytes before anything is repaired
MAX_CANDIDATES = 256


def _same_value(default: Any, given: Any) -> bool:
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    return type(norm(default)) is type(norm(given)) and norm(default) == norm(given) or (
        isinstance(default, float) and isinstance(given, (int, float)) and not isinstance(given, bool)
        and float(given) == default)


@dataclass
class Candidate:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    #: where it was written, ``(recipe file or None, what)`` (``what``: "candidate 2 (mixft)"), so a setting
    #: the model refuses when it runs is named with its recipe (:meth:`repair.methods.MethodInfo.from_recipe`);
    #: set by :func:`load_recipe`, or by :class:`Recipe` for one built in Python
    origin: tuple = field(default=(), compare=False, repr=False)

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

        info = get_method(self.method)
        return info.from_recipe(self.origin) if self.origin else info

    def config(self):
        return self.info.make_config(self.params)


@dataclass
class Recipe:
    name: str
    candidates: list[Candidate]
    selection: str = RECIPE_DEFAULTS["selection"]
    folds: int = RECIPE_DEFAULTS["folds"]
    repeats: int = RECIPE_DEFAULTS["repeats"]
    ensemble: int = RECIPE_DEFAULTS["ensemble"]
    description: str = ""
    source: str = ""
    plugins: tuple = ()                 # the recipe's plugins: entries (imported only with allow_plugins)
    files: tuple = ()                   # every file it was read from: the YAML and its plugin files (inputs)
    digests: tuple = ()                 # the sha256 of each of ``files`` as it was read (what the provenance records)

    def __post_init__(self):
        # a recipe built in Python is held to the rules of a recipe file (one home: check_fields)
        check_fields(self.name, self.selection, self.folds, self.repeats, self.ensemble)
        self.folds, self.repeats, self.ensemble = int(self.folds), int(self.repeats), int(self.ensemble)
        if not isinstance(self.candidates, list) or not self.candidates:
            raise BadInput("a recipe needs a non-empty list of candidates")
        if len(self.candidates) > MAX_CANDIDATES:
            raise BadInput(f"{len(self.candidates)} candidates; a recipe has at most {MAX_CANDIDATES}")
        seen: list[tuple] = []
        for n, c in enumerate(self.candidates, 1):
            if not isinstance(c, Candidate) or not isinstance(c.method, str) or not isinstance(c.params, dict):
                raise BadInput(f"candidate {n} must be a Candidate(method name, params mapping), got {c!r}")
            ident = candidate_identity(c.method, c.params, f"candidate {n} ({c.method})")
            twin = next((m for nm, other, m in seen if nm == c.method and other == ident), None)
            if twin is not None:
                raise BadInput(f"candidate {n} ({c.method}): the same method with the same settings as candidate "
                               f"{twin}; give each candidate once")
            seen.append((c.method, ident, n))
        # a candidate built in Python: named by the recipe's name where a setting is refused when it runs
        self.candidates = [c if c.origin else dataclasses.replace(c, origin=(None, f"recipe {self.name!r}, candidate "
                                                                                  f"{n} ({c.method})"))
                           for n, c in enumerate(self.candidates, 1)]
        # settings that compare candidates do nothing without candidates to compare (the choice,
        # repair.choosing.choose: one candidate is fitted once on the fit part, no folds made; the repeats
        # only score two or more heads, a model repair is compared on the first repeat's folds alone)
        if self.folds != RECIPE_DEFAULTS["folds"] and len(self.candidates) == 1:
            raise BadInput(f"folds {self.folds} compares candidates, but the recipe has one candidate (it is fitted "
                           "once, no folds are made); leave folds out")
        from repair.methods import get_method

        try:
            heads = sum(get_method(c.method).kind == "head" for c in self.candidates)
        except KeyError:                        # a plugin's method not registered yet: counted when run
            heads = None
        if heads is not None and self.repeats != RECIPE_DEFAULTS["repeats"] and heads < 2:
            raise BadInput(f"repeats {self.repeats} repeats the cross-validation that compares head repairs, but the "
                           f"recipe has {heads} head candidate{'s' if heads != 1 else ''} (model repairs are compared "
                           "on the first repeat's folds); leave repeats out")
        if heads is not None and self.ensemble > 1 and heads < self.ensemble:
            raise BadInput(f"ensemble {self.ensemble} averages the best {self.ensemble} head repairs, but the "
                           f"recipe has {heads} head candidate{'s' if heads != 1 else ''}")

    @property
    def kinds(self) -> set[str]:
        return {c.info.kind for c in self.candidates}


def candidate_identity(method: str, params: dict, what: str, where: Optional[Path] = None):
    """What two candidates are compared by: the method's config built from ``params`` (settings by
    value: c_grid [1] and [1.0] are one grid), or the settings as written when the method is not
    registered (a plugin not run). A setting the method refuses is :class:`BadInput` naming ``what``."""
    from repair.config import ConfigError
    from repair.methods import get_method

    try:
        info = get_method(method)
    except KeyError:
        return json.dumps(params, sort_keys=True, default=str)
    try:
        return info.make_config(params)
    except ConfigError as e:
        raise BadInput(f"{what}: {e}", where) from None


def group_labels_needed(recipe: "Recipe") -> Optional[str]:
    """Why ``recipe`` cannot run without group labels, or None: the one check, made before any work
    (``repair fix`` without ``--group-by``, the demo, which repairs label-free). It needs them when
    it selects by a criterion measured on groups, when a candidate's own ``selection`` is one or its
    ``group_source`` is ``given``, or when every candidate is a method that needs groups (one that
    does beside others is skipped without them, as the choice does)."""
    from repair.selection import needs_group_labels

    if needs_group_labels(recipe.selection):
        return f"recipe {recipe.name!r} selects by {recipe.selection}, which needs group labels"
    runnable = 0
    for c in recipe.candidates:
        sel = c.params.get("selection")
        if isinstance(sel, str) and needs_group_labels(sel):
            return f"recipe {recipe.name!r}, candidate {c.label}: selection {sel} needs group labels"
        if c.params.get("group_source") == "given":
            return f"recipe {recipe.name!r}, candidate {c.label}: group_source 'given' needs group labels"
        try:
            runnable += not c.info.needs_groups
        except KeyError:                        # a plugin's method not registered: taken as runnable
            runnable += 1
    if not runnable:
        return f"recipe {recipe.name!r}: every candidate needs group labels"
    return None


#: a recipe's ``repeats`` and ``ensemble``: (lowest, highest)
REPEATS_RANGE, ENSEMBLE_RANGE = (1, 20), (1, 10)


def check_fields(name: Any, selection: Any, folds: Any, repeats: Any, ensemble: Any,
                 where: Optional[Path] = None) -> None:
    """The recipe-level settings (a recipe file's and a :class:`Recipe` built in Python alike): a
    printable name, a known selection, the folds (:func:`check_folds`), repeats and ensemble size in
    range; :class:`BadInput` naming ``where``."""
    from repair.selection import SELECTION_NAMES

    from .rules import whole_number

    if not isinstance(name, str) or not name or not name.isprintable():
        raise BadInput(f"name must be a non-empty string of printable characters, got {name!r}", where)
    if name != name.strip():          # "mixft " printed as the built-in mixft, and passed its name check
        raise BadInput(f"name must not start or end with a space, got {name!r}", where)
    if not isinstance(selection, str) or selection not in SELECTION_NAMES:
        raise BadInput(f"selection must be one of {', '.join(SELECTION_NAMES)}, got {selection!r}", where)
    check_folds(folds, "folds", where)
    for key, v, (lo, hi) in (("repeats", repeats, REPEATS_RANGE), ("ensemble", ensemble, ENSEMBLE_RANGE)):
        whole_number(v, key, lo, hi, where)


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


def looks_like_path(value: Union[str, Path]) -> bool:
    """Whether a ``--recipe`` value is read as a file whatever it names: it ends in ``.yaml`` or
    ``.yml``, holds a path separator, or starts with ``.`` or ``~``. Any other value that names a
    built-in recipe or a registered method is the built-in (a file of that name in the current
    folder never replaces it: ``./auto`` reads one)."""
    text = str(value)
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (text.lower().endswith((".yaml", ".yml")) or any(sep in text for sep in seps)
            or text.startswith((".", "~")))


def names_file(value: Union[str, Path]) -> bool:
    """Whether a recipe value in a zoo manifest names a file (resolved beside the manifest): it looks
    like a path (:func:`looks_like_path`), or it names no built-in recipe and no registered method. (On
    the command line a bare name of neither is read from the current folder if it exists there, else it
    is an unknown recipe: :func:`load_recipe`.)"""
    text = str(value)
    if looks_like_path(text):
        return True
    if not text or text in _file_recipes():
        return False
    from repair.methods import get_method

    try:
        get_method(text)
        return False
    except KeyError:
        return True


class _Refused(Exception):
    """Raised by :class:`_RecipeLoader`: ``problem`` at the YAML ``mark``."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem, self.mark = problem, mark


def _loader(max_values: int = MAX_YAML_VALUES, what: str = "recipe", typical: str = "a few dozen"):
    """The YAML loader of recipes (and zoo manifests): PyYAML's safe loader (no tags that construct
    Python objects) that refuses a key given twice in one mapping and bounds the document
    (:data:`MAX_YAML_DEPTH` levels, ``max_values`` values with the aliases expanded, no alias inside
    its own anchor)."""
    import yaml

    class _RecipeLoader(yaml.SafeLoader):
        _depth = 0
        _nodes = 0

        def compose_node(self, parent, index):
            self._depth += 1        # the composer recurses once per level: refused before Python's limit
            self._nodes += 1        # and stopped as soon as the document itself holds too many values
            try:
                if self._depth > MAX_YAML_DEPTH:
                    raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
                if self._nodes > max_values:
                    raise _Refused(f"more than {max_values:,} values (a {what} holds {typical})",
                                   self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                _check_expanded(node, max_values, what, typical)
            return node

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                merged = False
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":    # "<<: *base": overriding it is YAML's own
                        if merged:      # a second "<<" in one mapping: which one wins is the loader's guess
                            raise _Refused("duplicate key '<<' (a key may appear once in a mapping; merge "
                                           "several mappings with one '<<: [*a, *b]')", key_node.start_mark)
                        merged = True
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        again = key in seen
                    except TypeError:       # an unhashable key: the safe loader's own error follows
                        continue
                    if again:
                        raise _Refused(f"duplicate key {key!r} (a key may appear once in a mapping)",
                                       key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return _RecipeLoader


def _check_expanded(root, max_values: int = MAX_YAML_VALUES, what: str = "recipe",
                    typical: str = "a few dozen") -> None:
    """:class:`_Refused` unless the YAML node graph ``root``, its aliases expanded, holds at most
    ``max_values`` values nested at most :data:`MAX_YAML_DEPTH` deep and no alias inside
    its own anchor. Counted on the graph (each shared node once), never expanded."""
    import yaml

    sizes: dict[int, tuple[int, int]] = {}      # id(node) -> (values, levels) of a node counted
    active: set[int] = set()

    def walk(node, level: int) -> int:
        key = id(node)
        if key in active:
            raise _Refused("an alias inside its own anchor (a recursive structure)", node.start_mark)
        if key not in sizes:
            if level > MAX_YAML_DEPTH:
                raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)", node.start_mark)
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = []
            active.add(key)
            total, levels = 1, 1
            for child in children:
                total += walk(child, level + 1)
                levels = max(levels, 1 + sizes[id(child)][1])
                if total > max_values:
                    raise _Refused(f"more than {max_values:,} values with its aliases expanded (a {what} "
                                   f"holds {typical})", node.start_mark)
            active.discard(key)
            sizes[key] = (total, levels)
        if level - 1 + sizes[key][1] > MAX_YAML_DEPTH:
            raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)", node.start_mark)
        return sizes[key][0]

    walk(root, 1)


def read_text_file(path: Path, what: str = "recipe", max_bytes: int = MAX_RECIPE_BYTES,
                   typical: str = "a few dozen lines", encoding: str = "utf-8") -> str:
    """The text of a small file the user gives (a recipe, a zoo manifest): a regular file only (a
    FIFO, device or socket is refused without blocking), at most ``max_bytes`` (checked on its size
    and bounded on the read), decoded; :class:`BadInput` naming ``path`` otherwise."""
    from repair.data import open_regular

    if path.is_dir():
        raise BadInput(f"a {what} must be a file, got a folder", path)
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            data = b"" if size > max_bytes else f.read(max_bytes + 1)
        except OSError as e:
            raise BadInput(f"cannot read the {what} ({e.strerror or e})", path) from None
    if size > max_bytes or len(data) > max_bytes:
        raise BadInput(f"the {what} is larger than {max_bytes // (1 << 20)} MiB (a {what} is {typical})", path)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        from .data import not_utf8

        raise BadInput(not_utf8(data, e), path) from None


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise BadInput("a recipe must be a YAML file, got a folder", path)
    return read_text_file(path)


def parse_yaml(text: str, path: Path, max_values: int = MAX_YAML_VALUES, what: str = "recipe",
               typical: str = "a few dozen") -> Any:
    """The YAML document ``text`` of the file ``path`` (see :func:`_loader`: safe, no duplicate keys,
    bounded); :class:`BadInput` naming ``path`` otherwise."""
    import yaml

    try:
        return yaml.load(text, Loader=_loader(max_values, what, typical))  # noqa: S506 - a SafeLoader subclass
    except _Refused as e:
        where = f" (line {e.mark.line + 1})" if e.mark is not None else ""
        raise BadInput(f"{e.problem}{where}", path) from None
    except yaml.YAMLError as e:
        raise BadInput(f"not valid YAML ({str(e).splitlines()[0]})", path) from None
    except (ValueError, RecursionError) as e:         # ValueError: an integer of more than 4,300 digits
        raise BadInput(f"not valid YAML ({(str(e) or type(e).__name__).splitlines()[0]})", path) from None


_parse = parse_yaml


def read_recipe_file(path: Union[str, Path]) -> Any:
    """The YAML document of the recipe file ``path``, read within the limits of the module
    docstring (regular file, size, aliases, duplicate keys); :class:`BadInput` naming it otherwise."""
    path = Path(path)
    try:
        text = _read_text(path)
    except OSError as e:                     # a name too long, and other failures of the name itself
        raise BadInput(f"cannot read the recipe ({e.strerror or e})", path) from None
    return _parse(text, path)


def describe_file(path: Path) -> str:
    """One line about a recipe file: its ``description:`` (first sentence), else its first comment line."""
    try:
        text = _read_text(Path(path))
        doc = _parse(text, Path(path))
    except (OSError, BadInput):
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


def _plugin_target(spec: Any, base: Path, where: Path) -> Path:
    """The file a ``plugins:`` entry names, checked without importing it: a Python file (relative to
    the recipe's folder) or a module name, found only in the recipe's folder or below it (``pkg.mod``
    is ``pkg/mod.py`` or ``pkg/mod/__init__.py`` there; never the current folder or ``sys.path``: an
    installed package registers its methods through the ``repair.plugins`` entry point). It must
    exist, and lie (links followed) in that folder."""
    if not isinstance(spec, str) or not spec:
        raise BadInput(f"plugins: entries must be file names or module names, got {spec!r}", where)
    root = base.resolve()
    if spec.endswith(".py"):
        tries = [spec]
    elif all(part.isidentifier() for part in spec.split(".")):
        rel = Path(*spec.split("."))
        tries = [str(rel.with_name(rel.name + ".py")), str(rel / "__init__.py")]
    else:
        raise BadInput(f"plugins: {spec!r} is neither a .py file nor a module name", where)
    for rel in tries:
        path = (base / rel).resolve()
        if Path(rel).is_absolute() or not path.is_relative_to(root):
            # nothing outside the paths the user gave is read: a plugin lies in its recipe's folder
            raise BadInput(f"plugins: {spec} is outside the recipe's folder ({base}); a plugin file lies beside "
                           "its recipe or below it", where)
        if path.is_file():
            return path
    if len(tries) == 1:
        raise BadInput(f"plugins: file {spec} not found (looked in {base})", where)
    raise BadInput(f"plugins: module {spec} not found in the recipe's folder (looked for {' or '.join(tries)} in "
                   f"{base}); a plugin module lies beside its recipe or below it (an installed package registers "
                   "its methods through the repair.plugins entry point)", where)


#: the folds of a cross-validation that compares candidates (a recipe's ``folds``, ``FixOptions.selection_folds``)
MIN_FOLDS, MAX_FOLDS = 2, 20


def check_folds(value: Any, what: str = "folds", where: Optional[Path] = None) -> int:
    """``value`` as a whole number of folds from :data:`MIN_FOLDS` to :data:`MAX_FOLDS`, or
    BadInput naming ``what`` (and ``where``, the recipe file). The one check of a fold count."""
    from .rules import whole_number

    return whole_number(value, what, MIN_FOLDS, MAX_FOLDS, where)


def plugin_files(target: Path, root: Optional[Path] = None, where: Optional[Path] = None) -> list[Path]:
    """The files a plugin's code is imported from: its file, or for a package (``__init__.py``) every
    module file under its folder (``.py``, and a compiled or sourceless module: any of
    ``importlib.machinery.all_suffixes()``; its relative imports load them), hidden folders and
    ``__pycache__`` aside (Python's own bytecode of those sources), links within ``root`` (the recipe's
    folder, resolved; default the package's own folder) followed. A link leading out of ``root`` to a
    module file or to a folder -- ``__pycache__`` included: Python runs the bytecode it finds there -- is
    :class:`BadInput` naming it (``where``: the recipe): nothing outside the recipe's folder runs, and
    every file that can run is in :func:`plugin_digest` and the recipe's :attr:`Recipe.files`. Other
    files (data, assets) are neither looked into nor refused. In a stable order (relative path)."""
    import importlib.machinery

    target = Path(target)
    if target.name != "__init__.py":
        return [target]
    pkg = target.parent
    root = Path(os.path.realpath(root if root is not None else pkg))
    suffixes = tuple(importlib.machinery.all_suffixes())
    out, seen = [], set()

    def leads_out(entry: Path) -> bool:
        return entry.is_symlink() and not Path(os.path.realpath(entry)).is_relative_to(root)

    for dirpath, dirnames, filenames in os.walk(pkg, followlinks=True):
        dirnames.sort()
        real = os.path.realpath(dirpath)
        if real in seen:                      # a link back up the tree, or two links to one folder: once
            dirnames[:] = []
            continue
        seen.add(real)
        for name in dirnames:           # any folder, a hidden one or __pycache__ too (Python reads bytecode there)
            if leads_out(Path(dirpath) / name):
                raise BadInput(f"plugins: {(Path(dirpath) / name).relative_to(pkg.parent)} is a link to a folder out "
                               f"of the recipe's folder ({root}): a plugin's code lies in its recipe's folder or "
                               "below it", where)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in sorted(filenames):
            entry = Path(dirpath) / name
            if not name.endswith(suffixes):
                continue
            if leads_out(entry):
                raise BadInput(f"plugins: {entry.relative_to(pkg.parent)} leads out of the recipe's folder "
                               f"({root}): a plugin's code lies in its recipe's folder or below it", where)
            if entry.is_file():
                out.append(entry)
    return sorted(out, key=lambda f: f.relative_to(pkg).as_posix())


def plugin_digest(target: Path, root: Optional[Path] = None, where: Optional[Path] = None,
                  files: Optional[list] = None) -> str:
    """The sha256 of a plugin's code: its file, or for a package (``__init__.py``) every module file
    :func:`plugin_files` finds under its folder (``files``: that list, when the caller has it), by
    relative path and content in sorted order."""
    from .io import sha256_file

    target = Path(target)
    if target.name != "__init__.py":
        return sha256_file(target)
    h = hashlib.sha256()
    for f in (files if files is not None else plugin_files(target, root, where)):
        h.update(f.relative_to(target.parent).as_posix().encode() + b"\0" + bytes.fromhex(sha256_file(f)) + b"\n")
    return h.hexdigest()


class _SourceOnly(importlib.machinery.SourceFileLoader):
    """A plugin's file run from its source as it is now: never from a ``__pycache__`` bytecode file, which
    Python trusts by the source's size and whole-second modification time (an edit within the second ran
    the old code, recorded under the new file's digest), and never writing one into the recipe's folder,
    an input."""

    def get_code(self, fullname):
        return compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)


class _PackageSource:
    """While a package plugin is imported: its submodules (``from .impl import ...``) found as Python finds
    them and run from their source by :class:`_SourceOnly`, as the package's ``__init__.py`` is."""

    def __init__(self, package: str):
        self.prefix = package + "."

    def find_spec(self, name, path=None, target=None):
        if not name.startswith(self.prefix) or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            spec.loader = _SourceOnly(name, spec.origin)
        return spec


def _drop_modules(mod_name: str) -> None:
    """A plugin's module and its submodules (a package's) out of ``sys.modules``."""
    for name in [n for n in sys.modules if n == mod_name or n.startswith(mod_name + ".")]:
        sys.modules.pop(name, None)


def _forget_plugin(mod_name: str) -> None:
    """A plugin imported earlier in this process, forgotten: its modules (a package's too) and the methods
    it registered (by the module of their function), so that importing it again registers them anew."""
    from repair.methods import METHODS

    _drop_modules(mod_name)
    for entry in METHODS.registered():
        module = getattr(getattr(entry, "fn", None), "__module__", "") or ""
        if module == mod_name or module.startswith(mod_name + "."):
            METHODS.unregister(entry.name)


def _import_plugin(spec: str, target: Path, where: Path, digest: str) -> str:
    """Run a plugin (only after the caller allowed it): the file :func:`_plugin_target` found, imported
    from its path (a package's ``__init__.py`` as that package, its relative imports within its folder).
    ``digest``: its :func:`plugin_digest` as read now. Returns the digest of the code that runs: this one,
    imported now or by an earlier call in this process; a plugin edited since this process imported it is
    forgotten (its modules, the methods it registered) and imported again (its old code ran, and a zoo
    journaled the output as made by the edited file)."""
    try:
        mod_name = "repair_plugin_" + hashlib.sha256(os.fsencode(target)).hexdigest()[:12]
        if mod_name in sys.modules:             # imported already in this process: that code runs ...
            ran = getattr(sys.modules[mod_name], "__repair_sha256__", None) or digest
            if ran == digest:
                return ran
            _forget_plugin(mod_name)            # ... unless edited since: imported again, as it is now
        package = [str(target.parent)] if target.name == "__init__.py" else None
        mspec = importlib.util.spec_from_file_location(mod_name, target, submodule_search_locations=package,
                                                       loader=_SourceOnly(mod_name, str(target)))
        mod = importlib.util.module_from_spec(mspec)
        mod.__repair_sha256__ = digest          # what its methods are recorded by (not a path)
        sys.modules[mod_name] = mod
        finder = _PackageSource(mod_name) if package else None
        if finder is not None:                  # its submodules from their source too
            sys.meta_path.insert(0, finder)
        try:
            # the user's code: what it prints goes to stderr; its sys.exit is a BadInput naming it
            with users_code(f"plugins: {spec}, imported,", where):
                mspec.loader.exec_module(mod)  # type: ignore[union-attr]
        except BaseException:
            _drop_modules(mod_name)
            raise
        finally:
            if finder is not None:
                with contextlib.suppress(ValueError):
                    sys.meta_path.remove(finder)
        return digest
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"plugins: cannot load {spec} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                       where) from None


def _candidates(doc: dict, path: Path, lenient: bool = False) -> list[Candidate]:
    """The candidates, validated. ``lenient``: a method not registered is taken as it is (its settings
    unchecked): a plugin the caller did not run may register it."""
    from repair.methods import get_method

    raw = doc.get("candidates")
    if not isinstance(raw, list) or not raw:
        raise BadInput("a recipe needs a non-empty 'candidates' list", path)
    if len(raw) > MAX_CANDIDATES:
        raise BadInput(f"candidates: {len(raw)} candidates; a recipe has at most {MAX_CANDIDATES}", path)
    out: list[Candidate] = []
    seen: list[tuple] = []                   # (method, its settings, candidate number), compared by value
    builtin = next((k for k, f in _file_recipes().items() if f.resolve() == path.resolve()), None)

    def origin(n: int, name: str) -> tuple:  # where a setting refused at run time was written
        if builtin is not None:              # the built-in recipe by its name, not a path in the install
            return None, f"recipe {builtin!r} (built in), candidate {n} ({name})"
        return path, f"candidate {n} ({name})"
    for n, c in enumerate(raw, 1):
        if not isinstance(c, dict) or "method" not in c:
            raise BadInput(f"candidate {n} needs a 'method'", path)
        extra = sorted(set(c) - set(CANDIDATE_KEYS), key=str)
        if extra:
            raise BadInput(f"candidate {n}: unknown key {extra[0]!r} (known: {', '.join(CANDIDATE_KEYS)})", path)
        name = str(c["method"])
        try:
            info = get_method(name)
        except KeyError as e:
            if not lenient:
                raise BadInput(f"candidate {n}: {e.args[0]}", path) from None
            info = None
        params = {} if c.get("params") is None else c["params"]      # only null or no key is "none"
        grid = {} if c.get("grid") is None else c["grid"]
        for key, val in (("params", params), ("grid", grid)):
            if not isinstance(val, dict):
                raise BadInput(f"candidate {n} ({name}): '{key}' must be a mapping of setting: value", path)
            odd = sorted((k for k in val if not isinstance(k, str)), key=str)
            if odd:
                raise BadInput(f"candidate {n} ({name}): {key}: unknown setting {odd[0]!r} (setting names are "
                               "strings)", path)
        both = sorted(set(params) & set(grid))
        if both:
            raise BadInput(f"candidate {n} ({name}): setting {both[0]!r} is in both params and grid; give it in "
                           "one of them", path)
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise BadInput(f"candidate {n} ({name}): grid {k!r} must be a non-empty list of values", path)
        combos_n = math.prod(len(v) for v in grid.values())      # counted before any combination is made
        if combos_n > MAX_CANDIDATES:
            raise BadInput(f"candidate {n} ({name}): grid makes {combos_n:,} combinations "
                           f"({' x '.join(str(len(v)) for v in grid.values())}); a recipe has at most "
                           f"{MAX_CANDIDATES} candidates", path)
        if len(out) + combos_n + (len(raw) - n) > MAX_CANDIDATES:
            raise BadInput(f"candidate {n} ({name}): grid brings the recipe to more than {MAX_CANDIDATES} candidates "
                           f"({len(out)} before it, {combos_n:,} from its grid, {len(raw) - n} after it); a "
                           f"recipe has at most {MAX_CANDIDATES}", path)
        combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else [{}]
        for combo in combos:
            merged = {**params, **combo}
            # the same method with the same settings twice: an ensemble would average a head with itself.
            # Settings compare by value (c_grid [1] and [1.0] are one grid), not by how they are written.
            ident = candidate_identity(name, merged, f"candidate {n} ({name})", path)
            twin = next((m for nm, other, m in seen if nm == name and other == ident), None)
            if twin == n:
                raise BadInput(f"candidate {n} ({name}): its grid gives the same settings twice ({combo}); give "
                               "each value once", path)
            if twin is not None:
                raise BadInput(f"candidate {n} ({name}): the same method with the same settings as candidate "
                               f"{twin}; give each candidate once", path)
            seen.append((name, ident, n))
            out.append(Candidate(name, merged, origin=origin(n, name)))
    return out


def load_recipe(name_or_path: Union[str, Path], allow_plugins: bool = False, validate_only: bool = False) -> Recipe:
    """The recipe a ``--recipe`` value names, validated (see the module docstring). A recipe with
    ``plugins:`` is refused unless ``allow_plugins`` (then they are imported, and register their
    methods before the candidates are checked). ``validate_only``: import nothing, even with
    ``allow_plugins`` (see :func:`validate_recipe`). A ``Path`` is taken by its text like a string
    (:func:`looks_like_path`): ``Path("auto")`` is the built-in, ``Path("auto").absolute()`` the file."""
    from repair.methods import get_method, list_methods

    value = str(name_or_path)
    if "\x00" in value:
        raise BadInput("a recipe name or path cannot hold a NUL character", value.replace("\x00", "\\0"))
    if looks_like_path(value):
        p = Path(value)
        if value.startswith("~"):
            try:
                p = p.expanduser()
            except RuntimeError:            # "~nobody/...": no such user, read as written
                pass
    else:
        builtin = _file_recipes()
        if value in builtin:                # a built-in always: a file of that name here never replaces it
            p = builtin[value]
        else:
            try:
                info = get_method(value)
            except KeyError:
                if not value or not os.path.lexists(value):
                    raise BadInput(f"unknown recipe {value!r} (built in: {', '.join(available())}; or give "
                                   "the path of a YAML file, such as ./my-recipe.yaml)") from None
                p = Path(value)             # a bare name of nothing built in, but a file here
            else:
                return Recipe(name=info.name, candidates=[Candidate(info.name, {})],
                              description=f"the {info.name} method with its default settings", source="registry")
    doc = read_recipe_file(p)
    if not isinstance(doc, dict):
        raise BadInput("a recipe must be a YAML mapping with a 'candidates' list", p)
    unknown = sorted(set(doc) - set(RECIPE_KEYS), key=str)
    if unknown:
        raise BadInput(f"unknown key {unknown[0]!r} (known: {', '.join(RECIPE_KEYS)})", p)
    plugins = [] if doc.get("plugins") is None else doc["plugins"]     # only null or no key is "none"
    if not isinstance(plugins, list):
        raise BadInput("plugins must be a list of Python files or module names", p)
    targets = [_plugin_target(spec, p.parent, p) for spec in plugins]     # checked, nothing imported
    from .io import sha256_file

    # as read now, not when the run ends (a plugin's: the code that runs, once imported, below)
    code_files = [plugin_files(t, p.parent.resolve(), p) for t in targets]      # one walk of each package
    digests = (sha256_file(p), *(plugin_digest(t, files=fs) for t, fs in zip(targets, code_files)))
    from .config import written_whole       # 3.0 is 3, as a candidate's integer setting reads it

    selection = doc.get("selection", RECIPE_DEFAULTS["selection"])
    folds = written_whole(doc.get("folds", RECIPE_DEFAULTS["folds"]))
    vals = {k: written_whole(doc.get(k, RECIPE_DEFAULTS[k])) for k in ("repeats", "ensemble")}
    name = doc.get("name", p.stem)
    description = "" if doc.get("description") is None else doc["description"]
    if not isinstance(description, str):
        raise BadInput(f"description must be text, got {type(description).__name__}", p)
    check_fields(name, selection, folds, vals["repeats"], vals["ensemble"], p)    # before any plugin runs
    if plugins and not validate_only:
        _candidates(doc, p, lenient=True)  # the candidates too: their shape, the built-in methods' settings
        if not allow_plugins:
            raise BadInput(f"recipe {p.name} loads plugin code {plugins[0]}; pass --allow-plugins to run it", p)
        list_methods()                  # built-ins first: a plugin cannot shadow them silently
        digests = (digests[0], *(_import_plugin(spec, target, p, d)
                                 for spec, target, d in zip(plugins, targets, digests[1:])))
    candidates = _candidates(doc, p, lenient=validate_only and bool(plugins))
    try:
        recipe = Recipe(name=name, candidates=candidates, selection=selection, folds=folds, **vals,
                        description=description, source=p.name, plugins=tuple(plugins),
                        files=(p.resolve(), *[f.resolve() for fs in code_files for f in fs]),
                        digests=digests)
    except BadInput as e:
        raise BadInput(e.problem, e.path or p) from None
    _check_builtin_name(recipe, p, "name" in doc and doc["name"] is not None)
    return recipe


def _builtin(name: str) -> Optional[Recipe]:
    """The built-in recipe ``--recipe name`` is (a file of ``recipes/``, or a method of this package as a
    one-candidate recipe), or None."""
    from repair.methods import get_method

    if name in _file_recipes():
        return load_recipe(name)
    try:
        info = get_method(name)
    except KeyError:
        return None
    if not getattr(info.fn, "__module__", "").startswith("repair."):      # a plugin's or an installed one
        return None
    return load_recipe(name)


def _check_builtin_name(recipe: Recipe, path: Path, named: bool) -> None:
    """A recipe file read from elsewhere may carry a built-in recipe's name only when it is that recipe
    (the same selection, folds, repeats, ensemble and candidates, settings compared by value, no plugins:
    a copy of ``mixft.yaml``): the outputs record a recipe by its name, and ``auto`` must mean the
    built-in ``auto``. BadInput naming ``path`` otherwise."""
    builtin = _file_recipes().get(recipe.name)
    if builtin is not None and path.resolve() == builtin.resolve():
        return
    ref = _builtin(recipe.name)
    if ref is None:
        return

    def shape(r: Recipe):
        return ((r.selection, r.folds, r.repeats, r.ensemble, r.plugins),
                [(c.method, candidate_identity(c.method, c.params, c.method)) for c in r.candidates])

    if shape(recipe) != shape(ref):
        whose = "the name" if named else "its file's name (no name: given)"
        raise BadInput(f"recipe {recipe.name!r}: {whose} is a built-in recipe's, and this file is another recipe; "
                       "the outputs record a recipe by its name: give it a name of its own (name: ...)", path)


def validate_recipe(name_or_path: Union[str, Path]) -> Recipe:
    """Check a recipe without running anything (zoo manifests): the YAML structure, that its plugin
    files exist, and the candidates' settings for every method already registered (built-ins,
    installed entry points). Nothing is imported, whatever the caller allows: with ``plugins:``, a
    method no registered module provides is left to be checked when the recipe is run."""
    return load_recipe(name_or_path, validate_only=True)


__all__ = ["Candidate", "MAX_CANDIDATES", "MAX_RECIPE_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_VALUES", "Recipe",
           "available", "describe_file", "group_labels_needed", "load_recipe", "looks_like_path", "names_file", "read_recipe_file", "recipes_dir", "validate_recipe"]
