"""Typed, validated settings for repair methods (their config dataclasses).

A method's config is a plain dataclass; a field that needs more than its type says
is declared with :func:`setting` (bounds, choices, non-empty), e.g.::

    @dataclass
    class DFRConfig:
        c_grid: tuple = setting((1.0, 0.3), gt=0, nonempty=True, doc="inverse penalties")
        protocol: str = setting("fast", choices=("fast", "paper"))

:func:`build_config` turns user values (from a recipe YAML or Python) into a config:
unknown keys, wrong types (a string for a number, a bool for an int) and values out
of range raise :class:`ConfigError` naming the key, *before* anything runs. Lists
become tuples, ints are accepted for floats. Every number (a tuple's elements too) must be
finite, and at most :data:`LARGEST` in size unless the setting declares its own upper bound
(``le``/``lt``): an absurd strength (``c_grid: [1.0e+308]``) is refused like an infinite one. A
setting that declares bounds holds numbers only. A config class may add cross-field checks
in ``validate(self)`` (raise ``ValueError``).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Optional, Sequence

from .errors import BadInput


#: the largest seed (``--seed``, a demo's seed): every generator a seed reaches takes it (torch's take
#: up to 2**64 - 1, but a seed plus an offset must stay below that; numpy's legacy ones stop at 2**32 - 1)
MAX_SEED = 2 ** 32 - 1

#: the largest size (absolute value) of a number of a setting that declares no upper bound of its
#: own: far beyond any sensible strength, step count or size, and well inside float32 (a strength
#: near 1e38 overflows the solvers' float32 arithmetic)
LARGEST = 1e12


def check_seed(seed: Any, flag: str = "--seed") -> int:
    """``seed`` as a whole number from 0 to :data:`MAX_SEED`; :class:`repair.errors.BadInput` naming
    ``flag`` otherwise. The one check of a seed (``repair fix``, ``repair demo``, a zoo row, Python)."""
    from .rules import whole_number

    return whole_number(seed, flag, 0, MAX_SEED)     # a numpy integer too, as a Python int


class SettingRefused(BadInput):
    """A setting valid as written that the model it runs on refuses (a model repair's ``scope:
    "names:REGEX"`` matching none of the model's parameters): a :class:`repair.errors.BadInput` (exit 2)
    raised where the model is at hand, with no file; :meth:`repair.methods.MethodInfo.__call__` names the
    recipe file (or the recipe) and the candidate the setting came from (``Candidate.origin``)."""


class ConfigError(ValueError):
    """A setting is unknown or has an unusable value. ``key``: the setting's name."""

    def __init__(self, key: Optional[str], problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"setting {key!r}: {problem}" if key else problem)


class When:
    """An ``only_if`` condition other than a list of values: the setting applies where ``test(value)``
    holds; ``words`` say so in a refusal (``"> 0"``). ``value in when`` tests it, as a list's values are."""

    def __init__(self, test, words: str):
        self.test, self.words = test, words

    def __contains__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:                    # None or a value of another type: it does not hold
            return False

    def __repr__(self) -> str:
        return f"When({self.words!r})"


def above(bound: float) -> When:
    """The ``only_if`` condition "the other setting is greater than ``bound``" (``patience > 0``)."""
    return When(lambda v: v > bound, f"> {bound:g}")


def setting(default: Any, *, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None, choices: Optional[Sequence] = None,
            nonempty: Any = False, doc: str = "", only_if: Optional[dict] = None):
    """A dataclass field with validation metadata (bounds apply to every element of a tuple).
    ``nonempty``: True (a list that must hold something), or ``{other setting: the values under which
    it must}`` (as ``only_if`` writes them): a grid that another setting may make up for when empty
    (neurontune's ``threshold_quantiles``, whose candidates ``include_no_mask: true`` adds to).
    ``only_if``: ``{other setting: the values under which this one has an effect}`` (a list of values,
    or a :class:`When` condition such as ``above(0)``); a config that sets this one to other than its
    default while another makes it do nothing is refused (:func:`build_config`), rather than recorded
    in the provenance as if it had been used. The one home of that rule."""
    def conditions(d: dict) -> dict:
        return {k: v if isinstance(v, When) else tuple(v) for k, v in d.items()}

    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None,
            "nonempty": conditions(nonempty) if isinstance(nonempty, dict) else bool(nonempty), "doc": doc,
            "only_if": conditions(only_if) if only_if else None}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"check": meta})
    return dataclasses.field(default=default, metadata={"check": meta})


def _kind(tp) -> tuple[str, bool]:
    """(base kind, optional) of an annotation: kind in bool/int/float/str/tuple/any."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(tp)
    if tp is bool:
        return "bool", optional
    if tp is int:
        return "int", optional
    if tp is float:
        return "float", optional
    if tp is str:
        return "str", optional
    if tp is tuple or origin is tuple or tp is list or origin is list:
        return "tuple", optional
    return "any", optional


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    """A number that is finite (and, a whole number, representable as a float)."""
    if isinstance(v, int):
        return abs(v) <= 1.7976931348623157e308
    return math.isfinite(v)


def written_whole(value: Any) -> Any:
    """A whole number as a recipe file (YAML or JSON) may write it, ``3`` or ``3.0``: the int; any other
    value as it is, for its own rule to judge. The one home of that reading (a candidate's integer settings,
    the recipe's ``folds``, ``repeats`` and ``ensemble``)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _coerce(key: str, kind: str, optional: bool, value: Any, default: Any) -> Any:
    if type(value).__module__ == "numpy" and callable(getattr(value, "tolist", None)):
        value = value.tolist()       # a numpy scalar or array from a notebook: its Python value(s)
    if value is None:
        if optional or default is None:
            return None
        raise ConfigError(key, "must not be empty (null)")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if kind == "int":
        from .rules import is_whole_number

        value = written_whole(value)
        if not is_whole_number(value):
            raise ConfigError(key, f"must be a whole number, got {value!r}")
        return int(value)
    if kind == "float":
        if not _number(value):
            raise ConfigError(key, f"must be a number, got {value!r}{_text_number_hint(value)}")
        if not _finite(value):
            raise ConfigError(key, f"must be finite, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            hint = (" (YAML reads off, no, on and yes written without quotes as false or true: quote the word, "
                    "e.g. 'off')" if isinstance(value, bool) else "")
            raise ConfigError(key, f"must be a string, got {value!r}{hint}")
        return _one_line(key, value)
    if kind == "tuple":
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {value!r}")
        proto = next(iter(default), None) if isinstance(default, (list, tuple)) else None
        out = []
        for v in value:
            if proto is not None and _number(proto):
                if not _number(v):
                    raise ConfigError(key, f"must be a list of numbers, got {_lists(value)!r}{_text_number_hint(v)}")
                if not _finite(v):
                    raise ConfigError(key, f"must be finite, got {v!r}")
                v = float(v) if isinstance(proto, float) else v
            out.append(_tuples(_one_line(key, v) if isinstance(v, str) else v))
        return tuple(out)
    return value


def _text_number_hint(value: Any) -> str:
    """The hint for a number YAML read as text (``1e-3``: YAML 1.1 wants a decimal point), or ""."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        # PyYAML (YAML 1.1) reads a float only with a decimal point and, with an exponent, its sign: 1.0e+3
        return (f" (YAML reads {value} as text: write it with a decimal point and a signed exponent, e.g. "
                f"1.0e+3 or 1.0e-9, or in full, e.g. 1000.0)")
    return ""


def _one_line(key: str, text: str) -> str:
    """``text``, or :class:`ConfigError` naming ``key`` when it holds a line break: a setting's text is
    shown inside the output's lines (a candidate's label, the progress lines), where a line break would
    print a line of its own (``scope: "names:fc|\\ngate passed: ..."``, a forged gate line). The rule is
    :func:`repair.io.check_one_line`'s (other control characters are escaped where text is shown)."""
    from .errors import BadInput
    from .io import check_one_line

    try:
        return check_one_line(text, "the text")
    except BadInput as e:
        raise ConfigError(key, e.problem) from None


def _tuples(v: Any) -> Any:
    """``v`` with every list in it (at any depth) a tuple."""
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _lists(v: Any) -> Any:
    """``v`` with every tuple in it (at any depth) a list: a value shown as the recipe wrote it."""
    return [_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


def _numbers(v: Any):
    """Every number in ``v`` (a value, or tuples of them at any depth)."""
    if isinstance(v, (list, tuple)):
        for x in v:
            yield from _numbers(x)
    elif _number(v):
        yield v


def _check(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    if meta.get("nonempty") is True and isinstance(value, tuple) and not value:
        raise ConfigError(key, "must not be empty")
    capped = meta.get("le") is None and meta.get("lt") is None
    for v in _numbers(value):          # every number, whatever the setting's type or default
        if not _finite(v):
            raise ConfigError(key, f"must be finite, got {v!r}")
        if capped and abs(v) > LARGEST:
            raise ConfigError(key, f"must be at most {LARGEST:g} in size, got {v!r}")
    elems = value if isinstance(value, tuple) else (value,)
    choices = meta.get("choices")
    bounded = any(meta.get(op) is not None for op in ("ge", "gt", "le", "lt"))
    for v in elems:
        if choices is not None and v not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, got {v!r}")
        if not _number(v):
            if bounded:                # a setting with a declared range holds numbers
                what = "a list of numbers" if isinstance(value, tuple) else "a number"
                raise ConfigError(key, f"must be {what}, got {_lists(value)!r}{_text_number_hint(v)}")
            continue
        for op, bound, ok in (("ge", meta.get("ge"), lambda a, b: a >= b), ("gt", meta.get("gt"), lambda a, b: a > b),
                              ("le", meta.get("le"), lambda a, b: a <= b), ("lt", meta.get("lt"), lambda a, b: a < b)):
            if bound is not None and not ok(v, bound):
                sym = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
                raise ConfigError(key, f"must be {sym} {bound:g}, got {v!r}")


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (its factory's product), None without one."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _field_values(cls: type, params: dict, fields: dict) -> tuple[dict, dict]:
    """``(values, defaults)`` of every field of ``cls``: each of ``params`` coerced to its field's kind
    and checked against its declared range (the others their defaults) -- the per-setting rules, one
    home for a config built from settings by name and a config given whole."""
    hints = typing.get_type_hints(cls)
    values, defaults = {}, {}
    for name, f in fields.items():
        default = defaults[name] = _default(f)
        kind, optional = _kind(hints.get(name, Any))
        if kind == "any" and default is not None:
            kind = {bool: "bool", int: "int", float: "float", str: "str", tuple: "tuple"}.get(type(default), "any")
        value = _coerce(name, kind, optional, params[name], default) if name in params else default
        _check(name, value, dict(f.metadata.get("check") or {}))
        values[name] = value
    return values, defaults


def _nonempty_grids(fields: dict, values: dict) -> None:
    for name, f in fields.items():     # a grid left empty where the other settings add no candidate either
        need = (f.metadata.get("check") or {}).get("nonempty")
        if isinstance(need, dict) and values[name] == () and all(values.get(o) in a for o, a in need.items()):
            which = ", ".join(f"{o}: {values.get(o)!r}" for o in need)
            raise ConfigError(name, f"must not be empty with {which}: that leaves no candidate; give at least "
                                    f"one or change {' or '.join(need)}")


def _validated(cfg):
    """``cfg`` after its own ``validate()`` (a ValueError is a :class:`ConfigError`)."""
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(None, str(e)) from None
    return cfg


def check_config(cfg):
    """A config given whole (the method's own dataclass, built in Python) checked by the rules a config
    built from settings by name gets (:func:`build_config`): each value's kind, range, choices and
    finiteness, a grid left with no candidate, the config's own ``validate()`` -- a ConfigError naming
    the setting, never a method failing deep inside on ``gamma_grid=(-5.0,)`` or ``n_refits=0``. As
    there, a setting at its default is not checked (a plugin's default is its author's), and the config
    is returned as it was given (not rebuilt: a list stays a list, ``__post_init__`` does not run
    again). Not the rule that refuses a setting another makes ineffective: a config given whole holds
    every setting, the ineffective ones at whatever value."""
    cls = type(cfg)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    given = {}
    for k, f in fields.items():           # a setting at its default is not checked (build_config's rule too)
        default = _default(f)
        value = getattr(cfg, k)
        try:
            same = bool(_tuples(value) == _tuples(default))
        except Exception:                 # a value that cannot say (an array): checked
            same = False
        if not same:
            given[k] = value
    values, _ = _field_values(cls, given, fields)
    _nonempty_grids(fields, values)
    return _validated(cfg)


def build_config(cls: type, params: Optional[dict] = None):
    """A validated ``cls`` from user ``params`` (see the module docstring)."""
    params = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields), key=str)      # keys of any type: an int next to strings too
    if unknown:
        raise ConfigError(unknown[0], f"unknown setting; known: {', '.join(sorted(fields))}")
    values, defaults = _field_values(cls, params, fields)
    _nonempty_grids(fields, values)
    for name in params:                # a setting changed where another makes it do nothing: refused
        if values[name] == _tuples(defaults[name]):     # its default restated (a recipe listing every setting)
            continue
        for other, allowed in ((fields[name].metadata.get("check") or {}).get("only_if") or {}).items():
            if values.get(other) in allowed:
                continue
            if isinstance(allowed, When):
                when = f"{other} {allowed.words}"
            else:
                when = f"{other}: {' or '.join(map(repr, allowed))}"
                choices = (fields[other].metadata.get("check") or {}).get("choices") if other in fields else None
                if choices is not None and not any(a in choices for a in allowed):
                    # a setting inherited from a config whose other values this one never takes (mix's
                    # protocols and dfr's fast-only settings)
                    raise ConfigError(name, f"has no effect here: it applies only with {when}, which this method "
                                            f"never runs ({other}: {' or '.join(map(repr, choices))}); leave it out")
            raise ConfigError(name, f"has no effect with {other}: {values.get(other)!r} (it applies with "
                                    f"{when}); leave it out or change {other}")
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(None, str(e)) from None
    return _validated(cfg)


def describe(cls: type) -> list[dict]:
    """Each field: name, default, doc (for ``repair methods --json`` and docs)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append({"name": f.name, "default": default, "doc": (f.metadata.get("check") or {}).get("doc", "")})
    return out


__all__ = ["ConfigError", "MAX_SEED", "SettingRefused", "When", "above", "check_seed", "setting", "build_config", "describe"]
