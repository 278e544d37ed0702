"""One registry mechanism for everything ``repair`` looks up by name: repair methods
(:mod:`repair.methods`) and model families (:mod:`repair.adapters`).

A :class:`Registry` holds named entries. Its built-in modules are imported lazily, on the
first lookup (each registers its entries when imported); then the installed entry points
of its group are loaded, once:

- ``repair.plugins``: modules (or objects) that register repair methods;
- ``repair.families``: modules (or objects) that register model families.

An entry point may name a module (importing it registers what it defines), an entry the
registry holds (a :class:`repair.methods.MethodInfo` / :class:`repair.adapters.FamilyInfo`,
registered as it is), or a callable taking no arguments (called; it registers). Entry points
are the user's own installation and always load; a broken one is reported as a
:class:`PluginWarning` naming it and the error, and never breaks the built-ins.

Model repairs also declare the user inputs they take (:class:`Resource`, e.g. ``--masks``);
:func:`model_resources` is their union over every registered model repair, from which the
``fix`` options, pre-flight checks and zoo manifest fields are derived.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Optional, TypeVar

from .errors import BadInput, UnknownName

T = TypeVar("T")

METHODS_ENTRY_POINTS = "repair.plugins"
FAMILIES_ENTRY_POINTS = "repair.families"


class PluginWarning(UserWarning):
    """An installed entry point could not be loaded (the built-ins still work)."""


def entry_points(group: str) -> list:
    """The installed entry points of ``group`` (a function of its own so tests can replace it)."""
    from importlib.metadata import entry_points as _eps

    return list(_eps(group=group))


class Registry(Generic[T]):
    """Named entries of one kind. ``what`` names the kind in messages ("repair method");
    ``package`` + ``builtins``: the modules that register the built-in entries; ``group``:
    the entry-point group; ``same(old, new)``: whether re-registering a name is the same
    entry (a module imported twice) rather than a clash; ``validate(registry, new)``: raises
    on an entry that may not be registered (runs before it is stored)."""

    def __init__(self, what: str, package: str, builtins: Iterable[str], group: str, *, entry_type: type,
                 same: Callable[[T, T], bool], validate: Optional[Callable[["Registry", T], None]] = None):
        self.what = what
        self.package = package
        self.builtins = tuple(builtins)
        self.group = group
        self.entry_type = entry_type
        self._same = same
        self._validate = validate
        self._entries: dict[str, T] = {}
        self._builtins_loaded = False
        self._plugins_loaded = False
        self._loaded = False                  # built-ins and entry points loaded, by whichever thread
        self._lock = threading.RLock()        # held while the built-ins load: another thread's lookup waits
        self._plugins_lock = threading.RLock()  # held while the entry points load
        self.broken: list[str] = []           # the entry points that failed, as reported

    # ------------------------------------------------------------------ registration
    def register(self, entry: T) -> T:
        name = getattr(entry, "name")
        # the built-ins first, whatever registers when: a user's entry named like a built-in is refused
        # here, not accepted now and found to clash at the first lookup (which left the registry half
        # loaded for the rest of the process, the user's entry in the built-in's place)
        if self._lock.acquire(blocking=False):     # never waits: the thread loading the built-ins may be
            try:                                   # waiting for this module's import (importlib's lock)
                self._load_builtins()
            finally:
                self._lock.release()
        if self._validate is not None:
            self._validate(self, entry)
        old = self._entries.get(name)
        if old is not None and not self._same(old, entry):
            where = getattr(getattr(old, "fn", None), "__module__", None)
            raise ValueError(f"{self.what} {name!r} is already registered" + (f" (by {where})" if where else "")
                             + "; register yours under another name")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    # ------------------------------------------------------------------ loading
    def _load_builtins(self) -> None:
        """Import the built-in modules, once (each registers its entries as it is imported; the flag is
        set first, so their own registrations do not import them again)."""
        with self._lock:
            if not self._builtins_loaded:
                self._builtins_loaded = True
                for mod in self.builtins:
                    importlib.import_module(f"{self.package}.{mod}")

    def load(self, name: Optional[str] = None) -> None:
        """Import the built-in modules, then the entry points (each once). Threads that look up at once
        wait for the one loading the built-ins: none finds a built-in missing (a valid model named bad
        input, a built-in method unknown). A lookup of a ``name`` found once the built-ins are in does not
        wait for the entry points: a plugin that looks up a built-in when imported (its import lock held
        while the loading thread waits for it) never deadlocks; any other lookup waits for them."""
        if self._loaded:
            return
        self._load_builtins()
        if name is not None and name in self._entries:
            return
        with self._plugins_lock:
            if not self._plugins_loaded:     # (a plugin's own lookup while it is imported: the loading goes on)
                self._plugins_loaded = True
                self._load_entry_points()
                self._loaded = True

    def reload_entry_points(self) -> None:
        """Load the entry points again (after installing a plugin in a running process; tests)."""
        with self._plugins_lock:
            self._plugins_loaded = self._loaded = False
            self.load()

    def _load_entry_points(self) -> None:
        try:
            eps = entry_points(self.group)
        except Exception as e:                # a broken distribution's metadata
            self._report(f"the {self.group!r} entry points cannot be listed", e)
            return
        for ep in eps:
            where = f"entry point {getattr(ep, 'name', '?')} = {getattr(ep, 'value', '?')} ({self.group})"
            try:
                obj = ep.load()
                if isinstance(obj, self.entry_type):
                    self.register(obj)
                elif callable(obj) and not isinstance(obj, type):
                    obj()
            except (Exception, SystemExit) as e:      # one that exits must not end the run as a success
                self._report(where, e)

    def _report(self, where: str, e: BaseException) -> None:
        msg = f"{where} failed to load and was skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.broken.append(msg)
        warnings.warn(msg, PluginWarning, stacklevel=3)

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> T:
        self.load(name)
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._entries))}") from None

    def values(self) -> list[T]:
        """Every entry, by name."""
        self.load()
        return [self._entries[k] for k in sorted(self._entries)]

    def registered(self) -> list[T]:
        """The entries registered so far, without loading anything (for checks during registration)."""
        return list(self._entries.values())

    def __contains__(self, name: str) -> bool:
        self.load(name)
        return name in self._entries


# ---------------------------------------------------------------------- resources
RESOURCE_KINDS = ("file", "folder", "choice", "data")


@dataclass(frozen=True)
class Resource:
    """A user input a model repair declares when it registers (``repair fix --NAME VALUE``;
    ``ModelRepairInputs.resources[NAME]``).

    ``kind``: ``file`` (a path to an existing file), ``folder`` (an existing folder),
    ``choice`` (one of ``choices``), ``data`` (labelled data in the ``--data`` formats, read with
    the same data options; the method receives a :class:`repair.methods.TrainSet`). ``validate``
    (optional, a file or folder): ``validate(path)`` checks its contents when the command starts,
    before any work (BadInput naming the path), rather than when the method first reads it;
    ``validate_data(path, data)`` (optional) checks it against the repair set once that is read (a
    mask for every image), still before any work; one taking a third argument also gets the other
    inputs read (name -> value: the ``--train`` data, whose images need masks too)."""
    name: str
    kind: str
    help: str = ""
    choices: tuple = ()
    validate: Optional[Callable[[Path], None]] = field(default=None, compare=False)
    validate_data: Optional[Callable[[Path, Any], None]] = field(default=None, compare=False)

    def check_data(self, value, data, resources: dict) -> None:
        """:attr:`validate_data` of ``value`` against the repair set ``data`` (and the other inputs read,
        ``resources``, for a check that takes them)."""
        import inspect

        try:
            takes_all = len(inspect.signature(self.validate_data).parameters) >= 3
        except (TypeError, ValueError):
            takes_all = False
        if takes_all:
            self.validate_data(value, data, {k: v for k, v in resources.items() if k != self.name})
        else:
            self.validate_data(value, data)

    def __post_init__(self):
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"resource name {self.name!r} must be a lower-case identifier (it becomes "
                             f"--{self.name.replace('_', '-')})")
        if self.kind not in RESOURCE_KINDS:
            raise ValueError(f"resource {self.name!r}: kind must be one of {', '.join(RESOURCE_KINDS)}, "
                             f"got {self.kind!r}")
        object.__setattr__(self, "choices", tuple(str(c) for c in self.choices))
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError(f"resource {self.name!r}: choices go with kind 'choice' (and it needs them)")

    @property
    def flag(self) -> str:
        """The command-line option: ``--generator-model`` for ``generator_model``."""
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, flag: Optional[str] = None):
        """``value`` checked against the declaration: a :class:`~pathlib.Path` for file / folder /
        data, the choice as a string; :class:`repair.errors.BadInput` naming ``flag`` (default
        :attr:`flag`; a zoo row passes its field) and the path otherwise. A ``data`` value is
        checked to exist here; its contents are read (and checked) by the data loader."""
        flag = flag or self.flag
        if self.kind == "choice":
            v = str(value)
            if v not in self.choices:
                raise BadInput(f"{flag} must be one of {', '.join(self.choices)}, got {v!r}")
            return v
        if value is None or (isinstance(value, str) and not value.strip()):
            raise BadInput(f"{flag} needs a path")
        p = Path(value)
        if not p.exists():
            raise BadInput(f"{flag}: not found", p)
        if self.kind == "folder" and not p.is_dir():
            raise BadInput(f"{flag} must be a folder", p)
        if self.kind == "file" and not p.is_file():
            raise BadInput(f"{flag} must be a file", p)
        if self.kind == "data" and not (p.is_file() or p.is_dir()):
            raise BadInput(f"{flag} must be a data folder or file", p)
        if self.validate is not None:
            self.validate(p)
        return p


def merge_resources(groups: Iterable[tuple[str, Iterable[Resource]]]) -> list[Resource]:
    """The union of ``(owner, resources)`` declarations, deduplicated by name (first declaration
    kept, in order). The same name with another kind or other choices is a ValueError naming both
    owners."""
    seen: dict[str, tuple[str, Resource]] = {}
    for owner, resources in groups:
        for r in resources:
            if not isinstance(r, Resource):
                raise TypeError(f"{owner}: resources must be repair.registry.Resource, got {type(r).__name__}")
            if r.name in seen:
                first, old = seen[r.name]
                if (old.kind, old.choices) != (r.kind, r.choices):
                    raise ValueError(f"resource {r.name!r} of {owner} is a {r.kind}"
                                     f"{' ' + str(list(r.choices)) if r.choices else ''} but {first} declares it a "
                                     f"{old.kind}{' ' + str(list(old.choices)) if old.choices else ''}")
                continue
            seen[r.name] = (owner, r)
    return [r for _, r in seen.values()]


def model_resources() -> list[Resource]:
    """Every user input the registered model repairs declare, deduplicated by name (see
    :class:`Resource`). Conflicts are refused when a model repair registers."""
    from .methods import list_methods

    return merge_resources((m.name, m.resources) for m in list_methods("model"))


def resource(name: str) -> Resource:
    """The declaration of resource ``name`` (KeyError naming the known ones)."""
    for r in model_resources():
        if r.name == name:
            return r
    raise KeyError(f"unknown model-repair input {name!r}; known: {', '.join(r.name for r in model_resources())}")


__all__ = ["Registry", "Resource", "RESOURCE_KINDS", "PluginWarning", "METHODS_ENTRY_POINTS",
           "FAMILIES_ENTRY_POINTS", "entry_points", "merge_resources", "model_resources", "resource"]
