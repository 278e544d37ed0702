"""`repair zoo MANIFEST`: repair (``fix``) or gate (``eval``) many models from one manifest,
locally or on Ray, resumable, with one HTML report.

The manifest (YAML, or CSV with one header row) holds one row per model; keys are the
``FIELDS`` below. Relative paths are relative to the manifest's folder: the folder of the path given
(a manifest given through a symlink: the link's folder, not its target's), where the report folder
goes too. YAML::

    defaults:                   # any field; a row's own value wins
      recipe: auto
      gate: 0.7                 # a fraction 0-1, or a percentage with its sign ("70%"); a worst-group
                                # or worst-class gate fails when a group or class has no samples ...
      expect_groups: [landbird|water, waterbird|land]   # ... or, given, one of these groups has none
      group_by: place
      output_dir: repaired/     # outputs: <output_dir>/<name> unless a row names its `output`
    models:
      - {name: demo-s0, checkpoint: zoo/demo-s0/model, data: zoo/demo-s0/data/val,
         eval: zoo/demo-s0/data/test}
      - ...

CSV: the columns are field names; ``# key: value`` (or ``# key = value``) lines before the header (a
field name in lower case, as the columns are: a misspelt one is an error, not a comment) are the
defaults; a ``#`` line whose first word is a field name in any other form (``# Gate: 90%``,
``# gate 90%``) is an error naming the line, never a comment that drops a gate; other ``#`` lines
(``# Note: ...``) are comments.

Everything is validated before any model is touched (paths exist, data columns exist, recipes
load through :func:`repair.recipes.load_recipe`, thresholds are numbers in range, names and
outputs are unique, an output does not exist yet unless ``--force`` or the journal says this zoo
wrote it); the first problem is a :class:`repair.errors.BadInput` naming the row and the field
(exit 2).

Work: each model is one call of :func:`run_model` (:func:`repair.pipeline.fix_model` or
:func:`repair.api.evaluate_model`), with the same CPU thread count whichever executor runs it, so
per-model results are the same locally and on Ray. Executors: :class:`LocalExecutor` (in this
process, one model at a time) and :class:`RayExecutor` (one Ray task per model, ``max_retries``
for a lost worker, ``num_cpus``/``num_gpus`` per task, results taken as they finish). The
embedding cache is shared by every attempt, so a retried task does not extract again what a
killed attempt already extracted.

Journal (``journal.jsonl`` in the report folder): one JSON line per finished model, appended with
a single ``O_APPEND`` write and fsynced; a torn last line (the driver killed mid-write) is cut off
when the journal is read, once every complete line has been read as a journal record (a file that
is not a journal is refused untouched). A rerun skips every model whose line is there with the
same settings (the gate is not a setting: thresholds are applied to the journaled figures, so
changing them needs no rerun), the same inputs (:func:`input_fingerprints`: the checkpoint's
files, the data and eval data with their tables, the recipe's files, the model-repair inputs) and,
in fix mode, every file of its output as written (:func:`output_files`); it starts the others
over, and the report says why. A journaled output that is missing, or missing files, is written
again; one that was edited since (a file changed or added) is the user's now and is refused like
any existing output, unless ``--force`` -- which, like every output's, replaces no folder but an empty one
or one repair wrote (:func:`repair.io.replace_refused`): a folder of the user's at a row's output is
refused before any work.

Outputs are never half-written nor written twice: a model's files are written by ``fix`` into a
staging folder beside the output (``.<output>.zoo-staging``, emptied when an attempt starts); the
driver appends the journal line and only then renames the staged files into place, one atomic
rename each. A rerun completes a rename that an interrupted driver had not finished. What appeared at
a row's place while the zoo worked is refused when that row finishes (:func:`check_commit`, before its
journal line): that row's own error (exit 2, its staged files discarded), the others go on, the journal
and report stay (only a refusal before any work leaves nothing behind). A driver locks
every folder its rows' outputs go in (another driver writing there is exit 2). No output
nor its staging folder is, holds or lies inside an input, another row's output or staging folder,
the report folder or the journal (checked before any work).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import BadInput, RepairError, Terminated, flush_all
from .io import check_one_line, sha256_file
from .rules import install_hint

def _data_fields() -> tuple:
    import dataclasses

    from .data import DataOptions

    return tuple(f.name for f in dataclasses.fields(DataOptions))


#: the data options (repair.data.DataOptions: group_by, label_col, ...) are fields as they are
DATA_FIELDS = _data_fields()
BASE_FIELDS = ("name", "checkpoint", "data", "eval", *DATA_FIELDS, "eval_group_by", "recipe", "gate", "gate_metric",
               "expect_groups",
               "output", "output_dir", "seed", "budget", "export")
LOCK_NAME = ".zoo-lock"


def fields() -> tuple:
    """The manifest's fields: the base ones and every model-repair input a registered model repair
    declares (``masks``, ``train``, ... and a plugin's own)."""
    from .preflight import declared_resources

    return BASE_FIELDS + tuple(r.name for r in declared_resources() if r.name not in BASE_FIELDS)
MODES = ("fix", "eval")
STAGING_SUFFIX = ".zoo-staging"
RAY_HINT = install_hint("zoo")


@dataclass(frozen=True)
class ZooEntry:
    """One validated manifest row."""
    row: int
    name: str
    checkpoint: Path
    data: Path
    eval: Optional[Path] = None
    group_by: Optional[str] = None
    eval_group_by: Optional[str] = None
    columns: tuple = ()                   # the other DataOptions fields given: ((name, value), ...)
    recipe: str = "auto"
    gate: Optional[str] = None            # as written ("0.7", "70%"): compared by repair.rules.judge
    gate_metric: str = "auto"
    expect_groups: tuple = ()             # the groups a worst-group gate requires (repair eval --expect-groups)
    output: Optional[Path] = None
    seed: int = 0
    budget: Optional[str] = None
    export: Optional[str] = None
    resources: tuple = ()                 # model-repair inputs: ((name, value), ...)
    model_repairs: Optional[bool] = None  # the recipe has a model repair (None: not known before it runs)

    def places(self) -> list[tuple[str, Path]]:
        """(what, path) of every place this row's commit writes: the output, the ONNX file an
        ``export: onnx`` puts beside a file output, the artifacts folder a model repair puts beside one,
        and the staging folder (:func:`row_places`)."""
        return row_places(self.checkpoint, self.output, self.export, self.model_repairs) \
            if self.output is not None else []

    def key(self, mode: str) -> str:
        """Hash of everything that changes the work (not the gate: applied to the figures)."""
        d = {k: str(v) for k, v in dataclasses.asdict(self).items()
             if k not in ("row", "gate", "gate_metric", "expect_groups", "resources", "columns", "model_repairs")
             and v is not None}
        for name in ("resources", "columns"):
            if getattr(self, name):
                d[name] = [[k, str(v)] for k, v in getattr(self, name)]
        return hashlib.sha256(json.dumps([mode, d], sort_keys=True).encode()).hexdigest()[:20]

    def judge_gate(self, result: dict, manifest: Optional[Path] = None) -> Optional[dict]:
        """This row's gate on ``result`` (:func:`repair.report.check_gate`, :func:`repair.rules.judge_gates`):
        an expected group of a class the model lacks is BadInput naming ``manifest``, this row and its
        ``expect_groups`` (the worker checks it as the row's work ends: the row's error, not a gate failure)."""
        from .report import check_gate

        return check_gate(result, self.gate, self.gate_metric, self.expect_groups or None,
                          self.data_options(eval_data=self.eval is not None).group_by,
                          self.gate_names(manifest))

    def gate_names(self, manifest: Optional[Path] = None):
        """How this row's gate names its options (:class:`repair.rules.GateNames`): its row, the field of the
        group column its gate is judged by (``eval_group_by`` for ``eval`` data given one) and the manifest."""
        from .rules import GateNames

        column = "eval_group_by" if self.eval is not None and self.eval_group_by is not None else "group_by"
        return GateNames.manifest(f"row {self.row} ({self.name})", column, manifest)

    def data_options(self, eval_data: bool = False):
        from .data import DataOptions

        gb = (self.eval_group_by if self.eval_group_by is not None else self.group_by) if eval_data else self.group_by
        return DataOptions(group_by=gb, **dict(self.columns))


@dataclass
class Manifest:
    path: Path
    entries: list[ZooEntry]
    datasets: dict = dataclasses.field(default_factory=dict)   # (path, options) -> RepairData read once
    protected: Any = None             # repair.rules.Protected: every row's inputs and the manifest
    recipe_files: dict = dataclasses.field(default_factory=dict)   # recipe -> the files it is read from

    def data_of(self, entry: "ZooEntry", key: str):
        """The RepairData of ``entry``'s ``data`` / ``eval`` as read during validation (or None)."""
        opts = entry.data_options(eval_data=key == "eval")
        return self.datasets.get((str(getattr(entry, key)), dataclasses.astuple(opts)))


# ------------------------------------------------------------------ reading the manifest
#: the largest manifest read (tens of thousands of rows) and the most YAML values it may hold with its
#: aliases expanded (read by the recipes' bounded loader: no duplicate keys, no alias bomb)
MAX_MANIFEST_BYTES = 64 << 20
MAX_MANIFEST_VALUES = 2_000_000
def _read_rows(path: Path, field_names: tuple = ()) -> tuple[dict, list[dict]]:
    """(defaults, rows) of a YAML or CSV manifest; values as read. ``field_names``: the manifest's
    fields (a CSV ``#`` line whose first word is one of them, in any case, must be a default)."""
    if not path.exists():
        raise BadInput("manifest not found", path)
    if path.is_dir():
        raise BadInput("a manifest must be a .yaml/.yml or .csv file, got a folder", path)
    from .recipes import parse_yaml, read_text_file

    text = read_text_file(path, "manifest", MAX_MANIFEST_BYTES, "a line or a few per model", "utf-8-sig")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        doc = parse_yaml(text, path, MAX_MANIFEST_VALUES, "manifest", "a few values per model")
        if isinstance(doc, list):
            doc = {"models": doc}
        if not isinstance(doc, dict):
            raise BadInput("a manifest must be a mapping with a 'models' list (and optional 'defaults')", path)
        extra = sorted(set(doc) - {"defaults", "models"})
        if extra:
            raise BadInput(f"unknown top-level key {extra[0]!r} (known: defaults, models)", path)
        defaults, rows = doc.get("defaults") or {}, doc.get("models")
        if not isinstance(defaults, dict):
            raise BadInput("defaults must be a mapping of field: value", path)
        if not isinstance(rows, list) or not rows:
            raise BadInput("a manifest needs a non-empty 'models' list", path)
        for n, r in enumerate(rows, 1):
            if not isinstance(r, dict):
                raise BadInput(f"row {n}: must be a mapping of field: value", path)
        for where, r in (("defaults", defaults), *((f"row {n}", r) for n, r in enumerate(rows, 1))):
            key = next((k for k in r if not isinstance(k, str)), None)
            if key is not None:
                raise BadInput(f"{where}: field names are text, got {key!r}", path)
        return defaults, rows
    if suffix == ".csv":
        from .data import check_unique_columns, read_csv_text

        lines = text.splitlines()
        defaults: dict = {}
        by_lower = {k.lower(): k for k in field_names}
        skipped = 0
        while lines and (lines[0].startswith("#") or not lines[0].strip()):
            line = lines.pop(0)
            skipped += 1
            shown = line.strip() if len(line.strip()) <= 80 else line.strip()[:77] + "..."
            exact = re.fullmatch(r"#\s*([a-z_][a-z0-9_]*)\s*([:=])\s*(.*?)\s*", line)
            if exact is not None:           # "# key: value" (lower case): a default
                key, _, value = exact.groups()
                if field_names and key not in field_names:
                    raise BadInput(f"line {skipped}: {shown!r} sets {key!r}, which is not a field (known: "
                                   f"{', '.join(field_names)}); a comment must not start with a lower-case "
                                   "word and ':' or '='", path)
                defaults[key] = value
                continue
            # a number field's value behind any decoration ("# --gate 80%", "# 1. gate: 80%", "# (gate: 80%)",
            # "# [1] gate 80%", "# | gate | 80% |"): a setting, never a comment that drops a gate (other fields'
            # lines keep the rule below: a legend such as "# 1. name: required" is a comment)
            # any other line: its first word, past more '#'s, a list marker ("- ", "* ") and a quote ("## gate",
            # "# - gate", "# 'gate'"), ends at any character that is not a word's ("# gate>=90%", "# gate, 90%
            # for all rows", "# gate(CI) 90%") or at the digits that end it ("# gate80%": the field gate)
            if _a_number_setting(line):
                raise BadInput(f"line {skipped}: {shown!r} sets a number field (gate, seed, budget, max_pixels) "
                               "but is not a default: write '# FIELD: VALUE' (the field name in lower case, then "
                               "':' or '='), or word the comment without a number after the field", path)
            m = re.match(r"#[#\s]*([-*+]\s+)?([\"'`]?)([^\W\d]\w*?)(?=\d*(?:\W|$))", line)
            if m is None:                                       # blank, "#" then no word, a ruler: a comment
                continue
            marker, quote, word = m.groups()
            rest = line[m.end():]
            if quote and rest.startswith(quote):
                rest = rest[1:]
            field = by_lower.get(word.lower())
            glued = re.match(r"\d+", rest)
            if glued is not None:
                # digits glued to a number field's name: its value ("# gate80%", "# gate80"), or a number after
                # them ("# Gate2 80%"); otherwise another word ("# data2.csv is a copy", "# eval2024/test",
                # "# seed2024 experiments")
                after = rest[glued.end():].strip()
                if not (field in _NUMBER_FIELDS and (after == "" or after.startswith("%")
                                                     or _A_NUMBER.search(after))):
                    continue
            sep, value = re.fullmatch(r"\s*([:=]?)\s*(.*?)\s*", rest).groups()
            if rest[:1] in ("/", ".") and not (field in _NUMBER_FIELDS and _A_NUMBER.search(value)):
                # a path or a file name ("# eval/test split ...", "# data.csv was cleaned by hand") is prose,
                # unless a number follows a number field ("# gate/CI 90%", "# gate.90": any doubt is a setting)
                continue
            # a list item ("# - gate: 80%") is a setting when what follows is that field's value; a column
            # legend ("# - name: a unique label per row", "# * data: folder of images") stays a comment
            if field is not None and ((sep and not marker) or _looks_like_a_value(field, value)):
                # "# Gate: 90%", "# gate 90% (CI)", "# recipe mixft for all rows": a setting written
                # otherwise, never a comment that drops it (prose such as "# Data for each row lives
                # here" is a comment)
                raise BadInput(f"line {skipped}: {shown!r} names the field {field!r} but is not "
                               f"a default: write '# {field}: VALUE' (the field name in lower case, "
                               "then ':' or '='), or word the comment so it does not start with a field name", path)
            # other "#" lines ("# Note: ...") are comments
        for at, line in enumerate(lines[1:], skipped + 2):
            if line.lstrip().startswith("#"):
                # a row "commented out" after the header is a row (it would run, as a model named "#b"), and
                # a comment there a short row: '#' lines are comments only before the header (a quoted
                # cell, "#1", is a name)
                shown = line.strip() if len(line.strip()) <= 40 else line.strip()[:37] + "..."
                raise BadInput(f"line {at}: {shown!r} starts with '#' after the header: '#' lines are comments "
                               "only before it; to leave a model out, delete its row", path)
        columns, table = read_csv_text("\n".join(lines), path, first_line=skipped + 1, short_rows=False)
        check_unique_columns(columns, path, stripped=True)
        rows = [{k.strip(): v.strip() for k, v in r.items() if isinstance(k, str) and isinstance(v, str) and v.strip()}
                for r in table]
        if not rows:
            raise BadInput("a manifest needs at least one model row", path)
        return defaults, rows
    raise BadInput("a manifest must be a .yaml/.yml or .csv file", path)


#: fields whose value is a number or a threshold, and those whose value is a path (a CSV '#' line's rule)
_NUMBER_FIELDS = ("gate", "seed", "budget", "max_pixels")
_NUMBER_FIELD = r"(?:gate|seed|budget|max_pixels)"
_NUMBER_VALUE = r"[<>=]*\s*[-+]?(?:\d|\.\d)"
#: a number field then ':' or '=' then a number, anywhere on a '#' line ("# ii) gate: 80%", "# e.g. gate = 0.8")
_SET_ANYWHERE = re.compile(rf"(?<!\w){_NUMBER_FIELD}\s*[:=]\s*{_NUMBER_VALUE}", re.IGNORECASE)
#: a number field first (past '#'s, list markers, rules, brackets, numbering) and a number after it, past
#: anything but letters ("# --gate 80%", "# [1] gate 80%", "# | gate | 80% |", "# Gate >= 90%")
_SET_FIRST = re.compile(rf"#(?:[\W_]|\d+(?:\.\d+)*[.):\]]?(?=\W)|[ivxlcIVXLC]+[.)]|[A-Za-z][.)](?=\s))*"
                        rf"{_NUMBER_FIELD}(?!\w)[^\w]*?{_NUMBER_VALUE}", re.IGNORECASE)


def _a_number_setting(line: str) -> bool:
    """Whether a CSV manifest's ``#`` line before the header sets a number field (a gate, above all)
    however it is decorated: ``FIELD: NUMBER`` anywhere on it, or the field first past any decoration
    with a number after it. Any doubt is a setting: a gate must never be read as a comment."""
    return bool(_SET_ANYWHERE.search(line) or _SET_FIRST.match(line))
#: a number or threshold in a '#' line's words ("90", ".9", ">= 90%", "(CI) 90%"), not a digit inside a word ("v2")
_A_NUMBER = re.compile(r"(?<![^\W\d_])[-+]?(\d|\.\d)")
_PATH_SUFFIXES = (".csv", ".jsonl", ".json", ".yaml", ".yml", ".onnx", ".safetensors", ".bin", ".pt", ".pth")


def _looks_like_a_value(field: str, rest: str) -> bool:
    """Whether the words after ``field`` on a CSV manifest's ``#`` line start with a value of that field
    rather than prose: a single word; for a number field (gate, seed, budget) a number or threshold
    anywhere on the line (``90``, ``0.9``, ``>= 90%``: any doubt is a setting); for the recipe a built-in recipe or method name; for any field a path
    (``a/b``, ``./m``, ``m.onnx``). ``# Data v2, cleaned by hand`` or ``# Train 3 models`` stay comments."""
    words = rest.split()
    if not words:
        return False
    if len(words) == 1:
        return True
    first = words[0].strip("()[],;'\"")
    if re.search(r"[/\\]", first) or first.startswith("~") or first.lower().endswith(_PATH_SUFFIXES):
        return True
    if field in _NUMBER_FIELDS and _A_NUMBER.search(rest):
        return True             # a number anywhere after it: "# gate >= 90% for all rows", "# Gate (CI) 90%"
    if field == "recipe":
        from .recipes import available

        return first in set(available())
    return False


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


class _Problems:
    def __init__(self, path: Path):
        self.path, self.items = path, []

    def add(self, where: str, field: str, problem: str) -> None:
        self.items.append(f"{where}, {field}: {problem}")

    def raise_first(self) -> None:
        if self.items:
            more = len(self.items) - 1
            raise BadInput(self.items[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""),
                           self.path)


def _validate_recipe(recipe: str, mode: str, allow_plugins: bool):
    """A recipe checked without running anything: its ``plugins:`` are never imported here; in fix mode
    a recipe with plugins needs ``--allow-plugins`` (refused now, not half-way through the zoo).
    Returns the :class:`repair.recipes.Recipe` as validated (``.files``: the files it was read from,
    inputs no output may replace)."""
    from .recipes import validate_recipe

    r = validate_recipe(recipe)
    if r.plugins and mode == "fix" and not allow_plugins:
        raise BadInput(f"recipe {r.source or recipe} loads plugin code {r.plugins[0]}; pass --allow-plugins to "
                       "run it")
    return r


def _has_model_repairs(recipe) -> Optional[bool]:
    """Whether a validated recipe has a model repair (whose files go beside a file output): None where that
    is not known before it runs -- a recipe that loads plugins (never imported here: its methods may be
    none registered yet, or registered again by the plugin)."""
    if recipe.plugins:
        return None
    try:
        return "model" in recipe.kinds
    except KeyError:                      # a method not registered (validation only)
        return None


#: the manifest's field of each option field of FixOptions / DataOptions named otherwise (the others: as named)
_OPTION_FIELDS = {"eval_data": "eval"}


def _option_refused(refused: BadInput, **fields) -> tuple[Optional[str], str]:
    """The manifest field an option's refusal blames and its problem in the manifest's words: the option the
    rule names (:attr:`repair.rules.OptionRefused.option`, never read back from the message) as its field
    (``fields``: this check's own, as ``group_by`` checked for ``eval_group_by``), the message naming
    every option by its field. (None, the message as it is): a refusal naming no option."""
    from .rules import OptionRefused

    if not isinstance(refused, OptionRefused):
        return None, refused.problem

    def field(name: str) -> str:
        return fields.get(name) or _OPTION_FIELDS.get(name, name)

    return field(refused.option), refused.worded(field, with_subject=False)


def in_manifest_words(e: BaseException) -> str:
    """A refusal as a manifest's row says it: the options its advice names (:class:`repair.rules.Worded`:
    ``--label-col``, ``--allow-outside-paths``) by their manifest fields (``label_col``); advice only a
    command-line option can follow (``--allow-pickle``: no manifest field) left out. The one wording of a
    refusal raised while a row's inputs are read or run."""
    import dataclasses

    from .data import DataOptions
    from .rules import Worded

    if isinstance(e, Worded):
        known, switches = set(fields()), {f.name for f in dataclasses.fields(DataOptions) if f.type in (bool, "bool")}

        def field(name: str) -> Optional[str]:
            name = _OPTION_FIELDS.get(name, name)
            return None if name not in known else f"{name}: true" if name in switches else name
        return e.in_words(field)
    return str(e)


def _fix_options_refused(**values) -> Optional[tuple[str, str]]:
    """Why :class:`repair.pipeline.FixOptions` (the one home of ``repair fix``'s option rules) refuses
    ``values``: the manifest field it blames and the problem, every option named by its field
    (:func:`_option_refused`); None: it takes them."""
    from .pipeline import FixOptions

    try:
        FixOptions(**values)
    except BadInput as e:
        field, problem = _option_refused(e)
        return field or "eval_group_by", problem
    return None


def load_manifest(path, mode: str = "fix", *, allow_plugins: bool = False) -> Manifest:
    """Read and validate a manifest (see the module docstring); nothing is loaded or run (a
    recipe's plugins are not imported). Each row's data is read here, once
    (``Manifest.datasets``), and handed to the work."""
    from .data import load_data
    from .modelrepair.finetune import Budget
    from .preflight import declared_resource, eval_overlap
    from .rules import GATE_METRICS, GateNames, Protected, check_format, check_gate_options, check_writable, fix_output, parse_threshold
    from .recipes import group_labels_needed, looks_like_path, names_file

    path = Path(path)
    if mode not in MODES:
        raise BadInput(f"--mode must be fix or eval, got {mode!r}")
    FIELDS = fields()
    defaults, rows = _read_rows(path, FIELDS)
    base = path.absolute().parent        # the folder of the path given (a link's own, not its target's)
    problems = _Problems(path)
    for k in sorted(set(defaults) - set(FIELDS)):
        problems.add("defaults", repr(k), f"unknown field (known: {', '.join(FIELDS)})")
    for k in ("name", "output"):
        if k in defaults:
            problems.add("defaults", k, "must be given per row")
    recipes: dict[str, Optional[str]] = {}
    recipe_files: dict[str, tuple] = {}
    recipe_needs: dict[str, Optional[str]] = {}    # recipe -> why it needs group labels (None: it does not)
    recipe_models: dict[str, Optional[bool]] = {}  # recipe -> it has a model repair (None: not known before it runs)
    datasets: dict[tuple, Any] = {}
    entries: list[ZooEntry] = []
    names: dict[str, int] = {}
    outputs = _Places()                   # every row's written places (output, ONNX export)
    staged_at, anywhere = _Places(), _Places()   # every row's staging folder; every place of every row
    protected = Protected()            # every row's inputs: no row's output may replace one
    protected.add_file(path, "manifest")
    resource_names = set(FIELDS) - set(BASE_FIELDS)

    def as_path(v) -> Path:
        p = Path(os.path.expanduser(str(v)))
        return p if p.is_absolute() else base / p

    any_gate = any(g not in (None, "") for g in [defaults.get("gate"), *(raw.get("gate") for raw in rows)])
    for n, raw in enumerate(rows, 1):
        r = {**defaults, **{k: v for k, v in raw.items() if v is not None and v != ""}}
        f: dict[str, Any] = {}
        f["name"] = str(r["name"]) if "name" in r else (
            Path(os.path.relpath(as_path(r["checkpoint"]), base)).as_posix() if "checkpoint" in r else f"row-{n}")
        where = f"row {n} ({f['name']})"
        before = len(problems.items)
        for k in sorted(r):
            v = r[k]
            if isinstance(v, (list, dict)) and k != "expect_groups":
                problems.add(where, k, f"must be a single value, got a {'list' if isinstance(v, list) else 'mapping'}")
            elif isinstance(v, str) and "\0" in v:
                problems.add(where, k, "contains a NUL character")
            elif k in ("checkpoint", "data", "eval", "output", "output_dir") or (
                    k in resource_names and declared_resource(k).kind in ("file", "folder", "data")):
                try:
                    os.stat(as_path(v))
                except (FileNotFoundError, NotADirectoryError):
                    pass                                    # reported below, by name
                except OSError as e:                        # a name too long, a loop of symlinks, ...
                    problems.add(where, k, f"{str(v)[:80]}{'...' if len(str(v)) > 80 else ''}: cannot be used "
                                           f"as a path ({e.strerror or e})")
        if len(problems.items) != before:
            continue
        for k in sorted(set(raw) - set(FIELDS)):
            problems.add(where, repr(k), f"unknown field (known: {', '.join(FIELDS)})")
        for k in ("checkpoint", "data"):
            if k not in r:
                problems.add(where, k, "missing (every model needs a checkpoint and its repair data)")
        for k in ("checkpoint", "data", "eval"):
            if k in r:
                p = as_path(r[k])
                if not p.exists():
                    problems.add(where, k, f"{p}: not found")
                f[k] = p
        for k in ("group_by", "eval_group_by", "budget", "export"):
            if k in r:
                f[k] = str(r[k])
        if "eval_group_by" in f:            # in every mode: else eval quietly gates the data's own groups
            why = _fix_options_refused(eval_data=str(f["eval"]) if "eval" in f else None,
                                       eval_group_by=f["eval_group_by"])
            if why:
                problems.add(where, *why)
        cols, typed = [], True
        for k in DATA_FIELDS:
            if k in r and k != "group_by":
                try:
                    cols.append((k, _as_field_type(k, r[k])))
                except ValueError as e:
                    problems.add(where, k, str(e))
                    typed = False
        if typed:                         # each data option given is of its type: their rules next
            from .data import DataOptions

            # the data options' own checks (their one home), each reported under the field the rule names
            # as gate, seed and budget are (max_pixels 0 was blamed on `data`, named --max-pixels); the
            # group column checked as each of the row's group fields
            for gb_field in ("group_by", "eval_group_by"):
                given = {**dict(cols), "group_by": f.get(gb_field)}
                try:
                    DataOptions(**given)
                except BadInput as e:
                    field, problem = _option_refused(e, group_by=gb_field)
                    problems.add(where, field or "data", problem)
                    break
        f["columns"] = tuple(cols)
        res = []
        for k in sorted(resource_names & set(r)):
            decl = declared_resource(k)
            value = str(as_path(r[k])) if decl.kind in ("file", "folder", "data") else str(r[k])
            try:
                decl.check(value, k) if decl.kind != "data" else (None if as_path(r[k]).exists() else
                                                                   _missing(k, as_path(r[k])))
            except BadInput as e:
                problems.add(where, k, in_manifest_words(e))
            res.append((k, value))
            if decl.kind in ("file", "folder", "data"):
                protected.add(value, f"{k} of row {n}")
        f["resources"] = tuple(res)
        try:                              # a row's name is shown inside the tables' and the log's lines
            check_one_line(f["name"], "the name")
        except BadInput as e:
            problems.add(where, "name", e.problem)
        if f["name"] in names:
            problems.add(where, "name", f"duplicate name {f['name']!r} (also row {names[f['name']]})")
        names.setdefault(f["name"], n)
        recipe = str(r.get("recipe", "auto"))
        if names_file(recipe):
            bare, recipe = recipe, str(as_path(recipe))
            if not looks_like_path(bare) and not os.path.lexists(recipe):     # never read from the current folder
                recipes.setdefault(recipe, f"unknown recipe {bare!r}: neither built in (repair methods lists them) nor a "
                                           f"file beside the manifest ({recipe})")
        if recipe not in recipes:
            try:
                checked = _validate_recipe(recipe, mode, allow_plugins)
                recipe_files[recipe] = checked.files
                recipe_needs[recipe] = group_labels_needed(checked)     # the check `repair fix` makes
                recipe_models[recipe] = _has_model_repairs(checked)
                recipes[recipe] = None
            except BadInput as e:
                recipes[recipe] = in_manifest_words(e)
        if recipes[recipe]:
            problems.add(where, "recipe", recipes[recipe])
        else:
            protected.add_files(recipe_files[recipe], f"recipe of row {n}")
            if mode == "fix" and f.get("group_by") is None and recipe_needs[recipe]:
                # now, not when this row's turn comes after others were repaired and written
                problems.add(where, "recipe", f"{recipe_needs[recipe]} (give group_by)")
        f["recipe"] = recipe
        f["model_repairs"] = recipe_models.get(recipe)
        if "gate" in r:
            try:
                f["gate"] = parse_threshold(r["gate"]).text
            except ValueError as e:
                problems.add(where, "gate", str(e))
        metric = str(r.get("gate_metric", "auto"))
        if metric not in GATE_METRICS:
            problems.add(where, "gate_metric", f"must be one of {', '.join(GATE_METRICS)}, got {metric!r}")
        elif metric == "worst_group" and not (f.get("group_by") or (f.get("eval_group_by") and "eval" in f)):
            problems.add(where, "gate_metric", "worst_group needs a group column (group_by or eval_group_by)")
        f["gate_metric"] = metric
        if metric in GATE_METRICS:
            # the rules of a gate's options that need no model (repair eval --expect-groups' too: one home):
            # a gate_metric other than auto needs a gate (else the row runs ungated); expected groups need a
            # group column, a gate, no other column named; the model's classes are checked as it runs
            column = "eval_group_by" if "eval" in f and f.get("eval_group_by") else "group_by"
            # a gate_metric from the defaults is how the gated rows are judged: a row left ungated on purpose
            # (an empty gate cell) is not refused for it, unless no row and no default has a gate at all
            own = raw.get("gate_metric") not in (None, "") or not any_gate
            try:
                expected = check_gate_options({metric: r.get("gate")}, r.get("expect_groups"), f.get(column),
                                              GateNames.manifest(column=column), metric=metric if own else "auto")
                if expected is not None:
                    f["expect_groups"] = tuple(expected)
            except BadInput as e:
                field = "gate_metric" if e.problem.startswith("gate_metric: ") else "expect_groups"
                problems.add(where, field, e.problem.removeprefix(f"{field}: "))
        if "seed" in r:
            from .config import check_seed

            try:
                seed = r["seed"] if isinstance(r["seed"], (int, bool)) else int(str(r["seed"]))
                f["seed"] = check_seed(seed, "seed")
            except ValueError:
                problems.add(where, "seed", f"must be a whole number, got {r['seed']!r}")
            except BadInput as e:
                problems.add(where, "seed", e.problem.removeprefix("seed "))
        if "budget" in f:
            try:
                Budget.parse(f["budget"])
            except (BadInput, ValueError) as e:
                problems.add(where, "budget", getattr(e, "problem", str(e)))
        if f.get("export") is not None:          # read as repair fix --export reads it (ONNX is onnx)
            try:
                f["export"] = check_format(f["export"], "export", ("onnx",))
            except BadInput:
                problems.add(where, "export", f"must be onnx, got {f['export']!r}")
        for k in ("checkpoint", "data", "eval"):
            if k in f and f[k].exists():
                protected.add(f[k], f"{k} of row {n}")
        if mode == "fix" and "checkpoint" in f and f["checkpoint"].is_dir():
            # what the output would copy from the model folder, checked now as `repair fix` does (a
            # symlink leaving it, a FIFO): not when this model's turn comes, after others ran
            from .adapters.base import folder_copy_plan

            try:
                folder_copy_plan(f["checkpoint"], f["checkpoint"] / "model.safetensors")
            except BadInput as e:
                problems.add(where, "checkpoint", in_manifest_words(e))
        if mode == "fix" and "checkpoint" in f:
            ck = f["checkpoint"]
            try:
                if "output" in r:
                    out = fix_output(ck, as_path(r["output"]))
                elif "output_dir" in r:
                    odir = as_path(r["output_dir"])
                    out = fix_output(ck, odir / (_slug(f["name"]) + ("" if ck.is_dir() else (
                        ".onnx" if ck.suffix.lower() == ".onnx" else ".safetensors"))))
                else:
                    out = fix_output(ck)
                # its folder resolved (rows compare their places), itself as given: an output that is a
                # symlink is that link (refused as existing unless --force, which replaces the link, as
                # `repair fix --out`'s rule), never followed to write into its target
                out = out.parent.resolve() / out.name
            except BadInput as e:
                problems.add(where, "output", e.problem)
                out = None
            except OSError as e:         # a name too long for the file system (a long row name), ...
                problems.add(where, "output", f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
                out = None
            if out is not None:
                # every place the commit writes (the output, an ONNX export beside it, the staging folder
                # both are written in): no other row's
                mine = row_places(ck, out, f.get("export"), f["model_repairs"])
                written = [(w, q) for w, q in mine if not w.startswith("staging")]
                clash = next(((hit, w, q) for w, q in written for hit in [outputs.overlapping(q)] if hit), None)
                # a staging folder is no other row's place, and no other row's staging folder is one of mine
                staged = next(((hit[0], hit[1], w) for w, q in mine
                               for hit in [(anywhere if w.startswith("staging") else staged_at).overlapping(q)]
                               if hit), None)
                hidden = next((q for _, q in written if q.name.startswith(".")), None)
                if clash is not None:
                    (m, _, same), w, q = clash
                    rel = "duplicate output" if same else "output inside (or holding) the output"
                    problems.add(where, "output", f"{rel} {q} (also row {m})" if w == "output" else
                                 f"its {w} {q} is the output (or inside the output) of row {m}")
                elif staged is not None:
                    problems.add(where, "output", f"its {staged[2]} and the {staged[1]} of row {staged[0]} would "
                                                  "write the same place")
                elif hidden is not None:
                    problems.add(where, "output", f"{hidden.name!r}: a name starting with '.' is taken for a temporary "
                                                  "file in a zoo's staging; choose another")
                elif not out.parent.is_dir():
                    problems.add(where, "output", f"folder {out.parent} does not exist")
                else:
                    try:
                        # the folder can be written (a probe); whether what is there may be replaced is
                        # decided with the journal, which knows this zoo's own outputs (_run_locked)
                        check_writable(out, force=True, owned=True)
                    except BadInput as e:
                        problems.add(where, "output", e.problem)
                    except OSError as e:
                        problems.add(where, "output", f"{out.name}: {e.strerror or e}")
                for w, q in mine:
                    (staged_at if w.startswith("staging") else outputs).add(q, n, w)
                    anywhere.add(q, n, w)
                f["output"] = out
        # the data: read once here (cheap: tables and file names, no model) and kept for the work
        if len(problems.items) == before:
            read: dict[str, Any] = {}
            for key, is_eval in (("data", False), ("eval", True)):
                if key not in f:
                    continue
                probe = ZooEntry(row=n, **{k: v for k, v in f.items() if k != "row"})
                try:
                    opts = probe.data_options(eval_data=is_eval)
                except BadInput as e:
                    problems.add(where, key, e.problem)
                    continue
                dk = (str(f[key]), dataclasses.astuple(opts))
                if dk not in datasets:
                    try:
                        datasets[dk] = load_data(f[key], opts)
                    except BadInput as e:
                        datasets[dk] = in_manifest_words(e)
                if isinstance(datasets[dk], str):
                    problems.add(where, key, datasets[dk])
                else:
                    protected.add_data(datasets[dk], f"{key} of row {n}")
                    data = read.get("data")
                    if is_eval and mode == "fix" and data is not None and not isinstance(data, str):
                        # an eval that is the repair data (the same, or every sample a copy): refused now, as
                        # `repair fix` refuses it (its one home), not at this row's turn after others ran
                        try:
                            eval_overlap(data, datasets[dk], f[key], eval_flag="eval", data_flag="data")
                        except BadInput as e:
                            problems.add(where, key, f"{f[key]}: {e.problem}")
                read[key] = datasets[dk]
        if len(problems.items) == before:
            entries.append(ZooEntry(row=n, **f))
    # no row's output may replace any row's input (its own or another's)
    for e in entries:
        why = next((w for w in (protected.why(q, what if what == "output" else f"its {what}")
                                for what, q in e.places()) if w), None)
        if why:
            problems.add(f"row {e.row} ({e.name})", "output", why)
    problems.raise_first()
    return Manifest(path=path, entries=entries,
                    datasets={k: v for k, v in datasets.items() if not isinstance(v, str)}, protected=protected,
                    recipe_files={k: v for k, v in recipe_files.items() if not recipes.get(k)})


def _as_field_type(name: str, value: Any):
    """A manifest value for DataOptions field ``name`` as the field's type (YAML and CSV alike)."""
    import dataclasses

    from .data import DataOptions

    default = {f.name: f.default for f in dataclasses.fields(DataOptions)}[name]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in ("true", "yes", "1"):
            return True
        if str(value).strip().lower() in ("false", "no", "0"):
            return False
        raise ValueError(f"must be true or false, got {value!r}")
    if isinstance(default, int):
        try:
            return int(str(value))
        except ValueError:
            raise ValueError(f"must be a whole number, got {value!r}") from None
    return str(value)


def _missing(flag: str, p: Path):
    raise BadInput(f"{flag}: not found", p)


# ------------------------------------------------------------------ journal
_RECORD_START = b'{"name":'             # how every line Journal.append writes begins


class _Places:
    """Paths of the rows (path -> (row, what)), asked whether a path is one of them, inside one or holds
    one in O(depth) (a manifest of tens of thousands of rows: no row compared with every other)."""

    def __init__(self):
        self.at: dict[Path, tuple[int, str]] = {}
        self.above: dict[Path, tuple[int, str]] = {}     # every folder holding a place -> one such place's

    def add(self, path: Path, row: int, what: str) -> None:
        self.at.setdefault(path, (row, what))
        for parent in path.parents:
            self.above.setdefault(parent, (row, what))

    def overlapping(self, path: Path) -> Optional[tuple[int, str, bool]]:
        """(row, what, the very same path) of a place equal to ``path``, holding it or inside it."""
        if path in self.at:
            return (*self.at[path], True)
        hit = next((self.at[p] for p in path.parents if p in self.at), None) or self.above.get(path)
        return None if hit is None else (*hit, False)


_TORN = object()


def _json_or_none(text: str, default=None):
    """The JSON document ``text`` (:func:`repair.io.parse_json`), or ``default`` when it is not one."""
    from .io import parse_json

    try:
        return parse_json(text)
    except (ValueError, RecursionError):              # JSONDecodeError is a ValueError, as is a huge integer's
        return default


def _is_record(rec) -> bool:
    """A journal line as :func:`_run_locked` writes it: a model's name and mode, its settings' key,
    the result figures (:func:`_are_figures`: before, and after in fix mode), and what its inputs and
    output were. A line edited into other types is not one (the report would fail on it)."""
    return (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("name", "mode", "key"))
            and isinstance(rec.get("result"), dict) and _are_figures(rec["result"].get("before"))
            and (rec["result"].get("after") is None or _are_figures(rec["result"]["after"]))
            and isinstance(rec.get("inputs", {}), dict) and isinstance(rec.get("output_files") or {}, dict)
            and isinstance(rec.get("output") or "", str))


def _are_figures(fig) -> bool:
    """Figures as :func:`repair.metrics.evaluate` gives them, as far as a report reads them: numbers
    (or null) where numbers go, lists of ``{name, n, accuracy}`` for the breakdowns."""
    def number(x):
        return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))

    def rows(x):
        return x is None or (isinstance(x, list) and all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and number(r.get("n")) and number(r.get("accuracy"))
            for r in x))

    return (isinstance(fig, dict)
            and all(number(fig.get(k)) for k in ("n", "accuracy", "worst_class_accuracy", "worst_group_accuracy"))
            and all(rows(fig.get(k)) for k in ("per_group", "per_class", "per_inferred_group"))
            and (fig.get("worst_group") is None or isinstance(fig["worst_group"], str))
            and (fig.get("absent_groups") is None or (isinstance(fig["absent_groups"], list)
                                                      and all(isinstance(g, str) for g in fig["absent_groups"]))))


class Journal:
    """JSONL, one line per finished model; appended atomically, read tolerantly."""

    def __init__(self, path: Path):
        self.path = Path(path)

    #: a journal at a symbolic link: appended to, its target (outside the paths given) would be written
    LINK = ("the journal is a symbolic link, and a journal is appended to, never through a link (its target "
            "would be written); name the file itself")

    def check(self) -> None:
        """A journal that exists is a regular file (a symbolic link, dangling or not, a folder or a FIFO
        is refused, never opened)."""
        import stat

        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise BadInput(f"cannot read the journal ({e.strerror or e})", self.path) from None
        if stat.S_ISLNK(st.st_mode):
            raise BadInput(self.LINK, self.path)
        if stat.S_ISDIR(st.st_mode):
            raise BadInput("the journal is a folder, not a file", self.path)
        if not stat.S_ISREG(st.st_mode):
            raise BadInput("the journal is not a regular file (a FIFO, a device, ...)", self.path)

    def read(self) -> dict[tuple[str, str], dict]:
        """``(name, mode) -> record`` (the last line wins). Every complete line must be a journal
        record (else BadInput, the file untouched); only then is a torn last line (the driver
        killed mid-write) cut off."""
        self.check()
        if not self.path.exists():
            return {}
        try:
            with os.fdopen(self._open(os.O_RDONLY), "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise BadInput(f"cannot read the journal ({e.strerror or e})", self.path) from None
        keep = raw.rfind(b"\n") + 1
        body, tail = raw[:keep], raw[keep:]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            from .data import not_utf8

            raise BadInput(f"not a journal: {not_utf8(body, e)}", self.path) from None
        out = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            rec = _json_or_none(line)
            if not _is_record(rec):
                raise BadInput(f"line {n} is not a journal record (not written by repair zoo?)", self.path)
            out[(rec["name"], rec["mode"])] = rec
        if tail:
            # a record torn mid-write starts as every record does and is no complete JSON document (a
            # whole record cut just before its newline is one of ours too); anything else is not ours --
            # a one-line JSON file without a newline that is not a record is refused, untouched
            whole = _json_or_none(tail.decode("utf-8", "replace"), _TORN)
            ours = (_is_record(whole) if whole is not _TORN
                    else tail.startswith(_RECORD_START) or _RECORD_START.startswith(tail))
            if not ours:
                raise BadInput(f"line {text.count(chr(10)) + 1} is not a journal record (not written by repair "
                               "zoo?)", self.path)
            fd = self._open(os.O_WRONLY)
            try:
                os.ftruncate(fd, keep)
            finally:
                os.close(fd)
        return out

    def _open(self, flags: int) -> int:
        """The journal opened with ``flags``, never through a symbolic link (one put at its path after
        :meth:`check`: :attr:`LINK`, its target untouched)."""
        try:
            return os.open(self.path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EMLINK) or self.path.is_symlink():
                raise BadInput(self.LINK, self.path) from None
            raise

    def append(self, record: dict) -> None:
        """One record, whole or not at all: a write the place cannot take (a full disk, a quota, a short
        write) is cut back off and is :class:`BadInput` naming the journal (the row is then not done: its
        staged files are discarded, and a rerun runs it)."""
        data = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode("utf-8")
        fd = self._open(os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
                os.fsync(fd)
            except OSError as e:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass               # a rerun cuts a torn record off (:meth:`read`)
                raise BadInput(f"cannot write the journal ({e.strerror or e}); this row was not committed",
                               self.path) from None
        finally:
            os.close(fd)


# ------------------------------------------------------------------ what a journal line was made from
def _stat_line(path: Path, rel: str) -> bytes:
    """A file by its path, size, inode, modification and change time (as
    :meth:`repair.data.RepairData.fingerprint` identifies an image): replaced, edited or copied
    over, even with its modification time set back, it gets a new line. Nothing is read."""
    try:
        st = path.stat()
    except OSError as e:
        return f"{rel}\0unreadable {e.errno}\n".encode()
    from .data import file_stamp

    return f"{rel}\0{file_stamp(st)}\n".encode()


#: the names of files beside a checkpoint file that a loader may read with it (its config, preprocessing,
#: tokenizer: ``vocab.txt``, ``tokenizer.json``, ``spiece.model``, PhoBERT's ``bpe.codes``, a ``.spm``, a
#: chat template), by suffix; the loaders' fixed names are added to them (:func:`_read_beside`)
_BESIDE_SUFFIXES = (".json", ".txt", ".model", ".codes", ".spm", ".jinja")


def _read_beside(f: Path) -> bool:
    from .adapters.images import PREPROCESS_FILE
    from .adapters.text import TOKENIZER_DIGEST_FILES

    return f.suffix.lower() in _BESIDE_SUFFIXES or f.name in (PREPROCESS_FILE, "config.json", *TOKENIZER_DIGEST_FILES)


def path_fingerprint(path: Path, skip=frozenset()) -> str:
    """A file, or every file in a folder tree (the model folder, a mask folder), by
    :func:`_stat_line`; a checkpoint file with the files beside it a loader may read with it (config,
    preprocessing, tokenizer: :func:`_read_beside`) and the external weights its ONNX graph names (beside
    it or in a subfolder), but ``skip``, the places the zoo itself writes. Other files beside it -- the
    manifest, other models -- are not read with it and change nothing."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if not f.is_dir():
                h.update(_stat_line(f, f.relative_to(path).as_posix()))
    else:
        h.update(_stat_line(path, path.name))
        beside = sorted(f for f in path.parent.iterdir() if f != path and _read_beside(f) and f.is_file()) \
            if path.parent.is_dir() else []
        for f in dict.fromkeys(beside + _external_data(path)):
            if f.absolute() not in skip and f != path:
                h.update(_stat_line(f, os.path.relpath(f, path.parent)))
    return h.hexdigest()


#: an ONNX checkpoint larger than this is not parsed to find its external data on every zoo run (a
#: file that keeps its weights outside is a small graph): every file beside it counts instead
_PARSE_ONNX_BYTES = 64 << 20


def _external_data(path: Path) -> list[Path]:
    """The files an ONNX checkpoint's initializers name as their external data (its graph read, not
    its weights); [] for any other file or one that does not parse (its own stat line covers it). A
    large ONNX file is not parsed (every resume would read it whole): every regular file beside it is
    returned instead -- a change there runs the row again, never the other way round."""
    if path.suffix.lower() != ".onnx":
        return []
    try:
        if path.stat().st_size > _PARSE_ONNX_BYTES:
            return sorted(f for f in path.parent.iterdir() if f.is_file())
        import onnx

        from .adapters.onnx_adapter import external_data_files

        return external_data_files(onnx.load(str(path), load_external_data=False), path.parent)
    except Exception:           # not an ONNX file the loader reads: running the row says so
        return []


def data_fingerprint(data) -> str:
    """A :class:`repair.data.RepairData`: its items (:meth:`~repair.data.RepairData.fingerprint`)
    and the content of its table (labels and group columns change figures, not items)."""
    h = hashlib.sha256(data.fingerprint().encode())
    if data.table is not None:
        try:
            h.update(sha256_file(Path(data.table)).encode())
        except OSError as e:
            h.update(f"unreadable {e.errno}".encode())
    return h.hexdigest()


def input_fingerprints(manifest: "Manifest", entry: ZooEntry, mode: str, memo: Optional[dict] = None) -> dict[str, str]:
    """What ``entry``'s work in ``mode`` reads, one fingerprint each: the checkpoint, the data the
    figures and (fix) the repair come from, the recipe's files and the model-repair inputs. A
    journal line is reused only while every one is unchanged (:func:`inputs_changed`). ``memo``
    (one dict for all rows) computes what rows share once."""
    from .preflight import declared_resource

    memo = {} if memo is None else memo

    def once(key, compute):
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    written = once("written", lambda: frozenset(p.absolute() for e in manifest.entries for _, p in e.places()))
    fp = {"checkpoint": once(("path", str(entry.checkpoint)), lambda: path_fingerprint(entry.checkpoint, written))}
    # the code that did the work: repair's sources and the libraries that read the samples (the embedding
    # cache's key, :func:`repair.embeddings.code_key`); a row journaled by another version is redone
    fp["code"] = once("code", _code_fingerprint)
    keys = ("data", "eval") if mode == "fix" else ("eval",) if entry.eval is not None else ("data",)
    for key in keys:
        if getattr(entry, key) is None:
            continue
        data = manifest.data_of(entry, key)
        fp[key] = (once(("data", id(data)), lambda: data_fingerprint(data)) if data is not None else
                   once(("path", str(getattr(entry, key))), lambda: path_fingerprint(getattr(entry, key))))
    if mode == "fix":
        def recipe() -> str:
            h = hashlib.sha256()
            for f in sorted(str(f) for f in manifest.recipe_files.get(entry.recipe, ())):
                try:
                    h.update(f"{f}\0{sha256_file(Path(f))}\n".encode())
                except OSError as e:
                    h.update(f"{f}\0unreadable {e.errno}\n".encode())
            return h.hexdigest()

        fp["recipe"] = once(("recipe", entry.recipe), recipe)
        for name, value in entry.resources:
            if declared_resource(name).kind in ("file", "folder", "data"):
                fp[name] = once(("path", value), lambda: path_fingerprint(Path(value)))
    return fp


def _code_fingerprint() -> str:
    import torch

    from .embeddings import code_key

    return hashlib.sha256(json.dumps({**code_key(), "torch": torch.__version__}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:20]


def inputs_changed(journaled: Optional[dict], now: dict[str, str]) -> Optional[str]:
    """Why a journal line's inputs are not the inputs of now (None: the same)."""
    if not isinstance(journaled, dict):
        return "its inputs were not recorded"
    changed = [k for k in sorted(set(now) | set(journaled)) if now.get(k) != journaled.get(k)]
    if changed:
        return f"its {', '.join(changed)} changed since it was journaled"
    return None


# ------------------------------------------------------------------ outputs
#: the places of a row's commit (:func:`row_places`) that are outputs, by what each is: its output (what the
#: checkpoint makes, :func:`repair.rules.model_output_kind`: None here), the ONNX file beside a file output,
#: the artifacts folder beside one; the staging folder is the zoo's own
PLACE_OUTPUT, PLACE_ONNX, PLACE_ARTIFACTS = "output", "ONNX export", "repair artifacts folder"
PLACE_KINDS = {PLACE_OUTPUT: None, PLACE_ONNX: "file", PLACE_ARTIFACTS: "folder"}


def row_places(checkpoint: Path, output: Path, export: Optional[str],
               model_repairs: Optional[bool] = None) -> list[tuple[str, Path]]:
    """(what, path) of every place a row's commit writes: ``repair fix``'s places
    (:func:`repair.rules.fix_places`, the one rule: its output, the ONNX file ``export: onnx`` writes beside
    a file output, the folder of a model repair's files beside a file output when the recipe has a model
    repair -- ``model_repairs``; None: not known before it runs, listed), and the staging folder they are
    all written in first. The one list every output check of a zoo uses."""
    from .rules import fix_places

    what = {"output": PLACE_OUTPUT, "onnx": PLACE_ONNX, "artifacts": PLACE_ARTIFACTS}
    out = [(what[k], p) for k, p in fix_places(checkpoint, output, export, model_repairs).items()]
    return out + [(f"staging folder {staging_dir(output).name}", staging_dir(output))]


def staging_dir(output: Path) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}{STAGING_SUFFIX}"


def discard_staged(output: Path) -> None:
    """Remove ``output``'s staging folder and whatever an attempt left in it (a no-op when there is
    none): an attempt starting over, a failed one, and the driver for every row not journaled once
    its executor has closed (a Ray task cancelled by force never runs its own cleanup)."""
    shutil.rmtree(staging_dir(output), ignore_errors=True)


def _staged_children(staging: Path) -> list[Path]:
    """What a staging folder holds to be put into place (not an attempt's leftovers, named ``.``)."""
    return [c for c in sorted(staging.iterdir()) if not c.name.startswith(".")]


def _staged_kind(child: Path) -> str:
    """What a staged file is as an output (the rule :func:`repair.io.replace_refused` applies to it)."""
    return "folder" if child.is_dir() else "file"


def check_commit(output: Path, *, may_replace: bool = True) -> None:
    """BadInput naming the place when a finished model's staged files may not go into place: what is
    at a place now is one ``--force`` never replaces, or, unless ``may_replace`` (``--force``, or this
    zoo's own output written again), anything at all -- it appeared while the zoo worked (the rule of
    every output's commit: :func:`repair.io.check_place`). The driver asks before it journals a model
    (the model is then that row's error, its staged files discarded); :func:`commit_staged` asks again
    at the rename."""
    from .io import check_place

    staging = staging_dir(output)
    if not staging.is_dir():
        return
    for child in _staged_children(staging):     # again at the rename: what a user put there meanwhile stays
        check_place(staging.parent / child.name, may_replace=may_replace, kind=_staged_kind(child))


def commit_staged(output: Path, *, may_replace: bool = True) -> None:
    """Move a finished model's staged files into place, one :func:`repair.io.put_in_place` each (the
    step of every output's commit: never onto what appeared at a place meanwhile); what is there is
    replaced only as :func:`check_commit` allows. A no-op once done. BadInput naming a place refused; the
    staged files not yet moved stay staged (the journal vouches for them: a rerun completes the commit)."""
    from .io import put_in_place

    staging = staging_dir(output)
    if not staging.exists():
        return
    check_commit(output, may_replace=may_replace)
    for child in _staged_children(staging):
        put_in_place(child, staging.parent / child.name, staging / f".replaced-{child.name}",
                     may_replace=may_replace, kind=_staged_kind(child))
    shutil.rmtree(staging, ignore_errors=True)


def output_files(parent: Path, names) -> dict[str, str]:
    """``relative path -> sha256`` of every file of the outputs ``names`` in ``parent`` (a model
    folder's every file, an ONNX export beside a weights file, ...): what a journal line says was
    written. A missing name or a file that is not a regular one has no digest but its state."""
    parent = Path(parent)
    out: dict[str, str] = {}
    for name in sorted(names):
        p = parent / name
        if not (p.exists() or p.is_symlink()):
            out[name] = "missing"
            continue
        items = sorted(q for q in p.rglob("*") if q.is_symlink() or not q.is_dir()) if (
            p.is_dir() and not p.is_symlink()) else [p]
        for q in items:
            rel = q.relative_to(parent).as_posix()
            out[rel] = sha256_file(q) if q.is_file() and not q.is_symlink() else "not a regular file"
    return out


def output_digest(path: Path) -> Optional[str]:
    """sha256 over the tensors of a model output (safetensors files; ONNX initializers): equal for
    equal weights, whatever the provenance's timestamps."""
    from .adapters.base import combine_digests, tensor_digest
    from .io import load_safetensors

    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    digests: dict[str, bytes] = {}
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        if f.suffix.lower() == ".onnx":
            import onnx
            from onnx import numpy_helper

            import torch

            for init in onnx.load(str(f)).graph.initializer:
                digests[f"{rel}:{init.name}"] = tensor_digest(torch.from_numpy(numpy_helper.to_array(init).copy()))
        elif f.suffix.lower() == ".safetensors":
            tensors, _ = load_safetensors(f)
            digests.update({f"{rel}:{k}": tensor_digest(v) for k, v in tensors.items()})
    return combine_digests(digests) if digests else None


# ------------------------------------------------------------------ one model (runs in a worker)
def _runtime(task: dict):
    from .api import RuntimeOptions

    return RuntimeOptions(**task["runtime"], progress=False)


def run_model(task: dict) -> dict:
    """One model's work: ``fix`` into its staging folder, or ``eval``. Returns
    ``{"status": "done", "result": ...}`` or ``{"status": "error", "error": ...}``; never raises
    for a model's own problem (a Ray task's exception would lose its exit code)."""
    import contextlib

    from . import provenance, threads

    t0 = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    entry = ZooEntry(**{k: (Path(v) if k in ("checkpoint", "data", "eval", "output") and v is not None else
                            tuple(tuple(x) for x in v) if k == "resources" else v)
                        for k, v in task["entry"].items()})
    try:
        # SOURCE_DATE_EPOCH as the driver read it (a Ray worker's environment is its cluster's)
        dated = provenance.dated(task["source_date"]) if "source_date" in task else contextlib.nullcontext()
        with threads.limited(task["threads"]), dated:
            result = _fix(entry, task) if task["mode"] == "fix" else _eval(entry, task)
        return {"status": "done", "result": result, "worker": worker,
                "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as e:
        if not isinstance(e, RepairError):
            _raise_interrupt(e)             # Ctrl-C that a library wrapped: an interrupt, not a model error
        return error_record(e, worker=worker)


#: most characters of what a model's run wrote to stderr on a Ray worker that come back to the driver
#: (the end kept: the last lines say the most)
WORKER_OUTPUT_MAX = 20_000


def run_model_on_worker(task: dict) -> dict:
    """:func:`run_model` as a Ray task runs it: what the model's run writes to stderr there (a
    ``notice:`` line, a plugin's prints, which :func:`repair.errors.users_code` sends to stderr, a
    warning shown, a subprocess's or a C extension's lines) is kept and returned in the record's
    ``"output"`` (its last :data:`WORKER_OUTPUT_MAX` characters) for the driver to print (a worker's
    own stderr is not shown there: ``log_to_driver=False``). File descriptor 2 points at a temporary
    file for the task, and ``sys.stderr`` is a real stream on it (code that asks for its ``fileno()``
    works as locally); a worker runs one task at a time, so both are the task's while it runs."""
    import io
    import tempfile

    flush_all(sys.stderr, sys.__stderr__)
    with tempfile.TemporaryFile() as tmp:
        saved_fd, saved_stream = os.dup(2), sys.stderr
        os.dup2(tmp.fileno(), 2)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="replace",
                                      line_buffering=True, write_through=True)
        try:
            res = run_model(task)
        finally:
            flush_all(sys.stderr)                   # (and a C extension's buffered lines) into the file
            sys.stderr = saved_stream
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        size = tmp.seek(0, 2)
        tmp.seek(max(0, size - 4 * WORKER_OUTPUT_MAX))
        text = tmp.read().decode("utf-8", "replace")[-WORKER_OUTPUT_MAX:]
    if text.strip():
        res["output"] = text
    return res


def worker_output_lines(name: str, res: dict) -> list:
    """The lines a row's run printed on a worker (:func:`run_model_on_worker`), each prefixed with the
    row's name, taken out of ``res`` (none for a local run: its lines were printed as they came)."""
    text = res.pop("output", None) or ""
    return [f"{name}: {line}" for line in text.splitlines() if line.strip()]


def error_record(e: BaseException, what: str = "internal error", **rest) -> dict:
    """A row's error record (``{"status": "error", "error": ..., "exit_code": ...}``, beside ``rest``) from
    the exception that ended it: the one turn of an exception into a row's error -- a model's own run
    (:func:`run_model`), a Ray task lost (:class:`RayExecutor`), a commit refused (the driver). A
    :class:`repair.errors.RepairError` is its message and exit code; anything else is our bug or the
    executor's, exit 3: ``what``, its type and the first line of its message."""
    if isinstance(e, RepairError):
        return {**rest, "status": "error", "error": in_manifest_words(e), "exit_code": e.exit_code}
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return {**rest, "status": "error", "error": f"{what}: {type(e).__name__}: {first}", "exit_code": 3}


def _raise_interrupt(e: BaseException) -> None:
    """Raise the interrupt (KeyboardInterrupt, or :class:`Terminated` for SIGTERM) that ``e`` wraps, if
    any (a library that caught it; Ray's compiled ``wait`` turns one raised by a signal handler into
    a SystemError), so it unwinds as an interrupt, not as a model's error or our bug."""
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        if isinstance(x, (KeyboardInterrupt, Terminated)):
            raise type(x)() from e
        seen.add(id(x))
        x = x.__cause__ or x.__context__


def _eval(entry: ZooEntry, task: dict) -> dict:
    from .api import evaluate_model
    from .report import compact_eval

    key = "eval" if entry.eval is not None else "data"
    data = task.get(key) or getattr(entry, key)         # as read when the manifest was checked
    rep = evaluate_model(entry.checkpoint, data, data_opts=entry.data_options(eval_data=entry.eval is not None),
                         runtime=_runtime(task))
    result = compact_eval(rep)
    entry.judge_gate(result, task.get("manifest"))     # its expected groups against the model's classes
    return result


def _fix(entry: ZooEntry, task: dict) -> dict:
    from .pipeline import FixOptions, fix_model
    from .preflight import read_inputs
    from .report import compact_fix

    out = Path(entry.output)
    staging = staging_dir(out)
    discard_staged(out)                                 # a killed attempt's leftovers: start over
    staging.mkdir()
    runtime = _runtime(task)
    try:
        o = FixOptions(recipe=entry.recipe, seed=entry.seed, eval_data=None if entry.eval is None else str(entry.eval),
                       eval_group_by=entry.eval_group_by, export=entry.export, budget=entry.budget,
                       resources=dict(entry.resources), allow_plugins=bool(task.get("allow_plugins")))
        inputs = read_inputs(entry.checkpoint, task.get("data") or entry.data, entry.data_options(),
                             eval_data=task.get("eval") or o.eval_data, eval_group_by=entry.eval_group_by,
                             resources=o.resources)
        rep = fix_model(entry.checkpoint, inputs.data, staging / out.name, data_opts=entry.data_options(),
                        runtime=runtime, log=lambda m: None, options=o, inputs=inputs)
        result = compact_fix(_unstage(rep.report, staging, out.parent), rep.delta_histogram())
        entry.judge_gate(result, task.get("manifest"))  # its expected groups against the model's classes
        result["output_digest"] = output_digest(staging / out.name)
        # every file the commit will put into place (the driver journals it beside the result)
        result["output_files"] = output_files(staging, [c.name for c in staging.iterdir()
                                                        if not c.name.startswith(".")])
    except BaseException:
        discard_staged(out)                             # nothing of a failed attempt stays behind
        raise
    return result


def _unstage(rep: dict, staging: Path, final_parent: Path) -> dict:
    """The fix result with paths inside the staging folder pointing where the files will be."""
    s = str(staging)

    def fix(v):
        if isinstance(v, str) and v.startswith(s):
            return str(final_parent) + v[len(s):]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return {k: fix(v) for k, v in rep.items()}


# ------------------------------------------------------------------ executors
class LocalExecutor:
    """In this process, one model at a time."""

    def __init__(self):
        self.description = "local (in-process, one model at a time)"

    def map(self, tasks: list[dict]) -> Iterator[tuple[int, dict]]:
        for i, t in enumerate(tasks):
            yield i, run_model(t)

    def close(self) -> None:
        pass


def import_ray():
    try:
        import ray
    except ImportError:
        raise BadInput(f"--ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


#: how long joining a cluster waits for its address to answer before giving up (Ray's own wait is minutes)
RAY_CONNECT_TIMEOUT_S = 10.0
#: how long joining a cluster (``ray.init``) may take once its address answers: a port that answers
#: but is no Ray (a web server, the dashboard's port) would otherwise keep ``ray.init`` waiting for ever
RAY_JOIN_TIMEOUT_S = 60.0
#: how long the driver waits for the tasks it cancelled (by force) to end before it goes on
RAY_CANCEL_WAIT_S = 10.0
#: seconds between the driver's checks for a finished task (and for a signal to act on)
RAY_WAIT_POLL_S = 0.5
_RAY_ADDRESS = re.compile(r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?"
                          r"(?P<host>\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._-]+)?\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})/?")


def ray_address(address: str) -> Optional[tuple[str, int]]:
    """The one check of ``--ray``: ``auto`` (None: start a local Ray) or a cluster address
    ``[SCHEME://]HOST:PORT`` (``ray://head:10001``, ``10.0.0.5:6379``, ``[::1]:6379``), returned as
    (host, port). Anything else is BadInput (a space, an empty host, a port out of range, ``local``)."""
    if address == "auto":
        return None
    m = _RAY_ADDRESS.fullmatch(address) if isinstance(address, str) else None
    port = int(m.group("port")) if m else 0
    if not m or not 1 <= port <= 65535:
        raise BadInput(f"--ray must be auto or a cluster address [ray://]HOST:PORT (a port from 1 to 65535), "
                       f"got {address!r}")
    return m.group("host").strip("[]"), port


def _reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A cluster address (:func:`ray_address`) answers a TCP connection within ``timeout`` seconds;
    else BadInput."""
    host, port = ray_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = "no answer" if isinstance(e, (socket.timeout, TimeoutError)) else (e.strerror or str(e))
        raise BadInput(f"cannot join the Ray cluster at {address}: nothing answers at {host}:{port} within "
                       f"{timeout:g}s ({reason}); is the head node running (ray start --head)?") from None


class _KeepSignals:
    """``ray.init`` installs its own SIGTERM handler (``sys.exit``, which ended the driver with 134
    and no report): the handlers of SIGTERM and SIGINT as they were before (the command line's
    ``Terminated``, Python's ``KeyboardInterrupt``) are put back when the block ends, however."""

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()
        self.saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
        return self

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            if handler is not None:            # None: set from outside Python, cannot be put back
                signal.signal(s, handler)
        return False


def _join_within(ray, address: str, timeout: float, **kwargs) -> None:
    """``ray.init(address=address, **kwargs)`` given ``timeout`` seconds (run in a thread: Ray has no
    overall deadline of its own); BadInput when it takes longer or refuses the address."""
    box: dict = {}
    lock = threading.Lock()

    def join():
        try:
            ray.init(address=address, **kwargs)
        except BaseException as e:                          # noqa: B036 - handed to the driver's thread
            box["error"] = e
            return
        with lock:                 # a join the driver gave up on is undone: no cluster it refused stays joined
            box["joined"] = True
            abandoned = box.get("abandoned", False)
        if abandoned:
            try:
                ray.shutdown()
            except Exception:      # noqa: BLE001 - the process is leaving that cluster either way
                pass

    import logging

    def not_the_thread_notice(record) -> bool:      # Ray's word that a joining thread sets no handler: ours stay
        return "SIGTERM handler is not set" not in record.getMessage()

    worker_log = logging.getLogger("ray._private.worker")
    worker_log.addFilter(not_the_thread_notice)
    t = threading.Thread(target=join, name="ray-join", daemon=True)
    try:
        t.start()
        t.join(timeout)
    finally:
        worker_log.removeFilter(not_the_thread_notice)
    with lock:
        late = t.is_alive() and not box.get("joined")
        if late:
            box["abandoned"] = True
    if late:
        raise BadInput(f"cannot join the Ray cluster at {address}: something answers there, but no Ray "
                       f"cluster joined within {timeout:g}s; is it the head's address (ray start --head "
                       "prints it; ray:// takes the client port, 10001 by default)?")
    e = box.get("error")
    if e is None:
        return
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "ray[client]" in str(e):
        raise BadInput(f"--ray {address}: a ray:// address needs Ray's client (ray[client]), which is not "
                       f"installed: {RAY_HINT}") from None
    if isinstance(e, (ConnectionError, ValueError, RuntimeError, TimeoutError)):
        raise BadInput(f"cannot join the Ray cluster at {address} ({first})") from None
    raise e


class RayExecutor:
    """One Ray task per model (``max_retries`` when its worker dies; ``num_cpus``/``num_gpus`` per
    task), results as they finish. ``address="auto"`` starts a local Ray with ``workers`` x
    ``cpus_per_model`` CPUs; anything else joins that cluster (every node must see the manifest's
    paths at the same place and have ``repair`` installed) within :data:`RAY_JOIN_TIMEOUT_S`. A
    process already connected to Ray uses that connection. The SIGTERM and SIGINT handlers stay
    the caller's (:class:`_KeepSignals`)."""

    def __init__(self, address: str, *, workers: Optional[int] = None, cpus_per_model: int = 1,
                 gpus_per_model: float = 0, max_retries: int = 3, log: Callable[[str], None] = print):
        import contextlib
        import logging

        ray = import_ray()
        self.ray, self.owned, self.owned_local = ray, False, False
        # Ray's driver prints worker deaths and the like to sys.stdout from a thread of its own:
        # stdout carries our results only, so it is sent to stderr while Ray is in use
        self._quiet = contextlib.redirect_stdout(sys.stderr)
        self._quiet.__enter__()
        self.cpus, self.gpus, self.max_retries = cpus_per_model, gpus_per_model, max_retries
        try:
            with _KeepSignals():
                if ray.is_initialized():
                    where = "the Ray instance this process is connected to"
                elif ray_address(address) is None:
                    n = workers or os.cpu_count() or 1
                    log(f"starting a local Ray with {n} worker slot(s) of {cpus_per_model} CPU(s)")
                    ray.init(address="local", num_cpus=n * cpus_per_model, include_dashboard=False,
                             logging_level=logging.WARNING, log_to_driver=False)
                    self.owned = self.owned_local = True
                    where = f"a local Ray ({n} x {cpus_per_model} CPU)"
                else:
                    log(f"joining the Ray cluster at {address}")
                    _reachable(address)
                    _join_within(ray, address, RAY_JOIN_TIMEOUT_S, logging_level=logging.WARNING,
                                 log_to_driver=False)
                    self.owned, where = True, f"the Ray cluster at {address}"
            self._check_resources(address, log)
        except BaseException:
            try:
                if self.owned:
                    ray.shutdown()
            finally:
                self._quiet.__exit__(None, None, None)
            raise
        self.description = (f"Ray: {where}; per model {cpus_per_model} CPU" + (f", {gpus_per_model} GPU" if gpus_per_model else "")
                            + f", max_retries={max_retries}")

    def _check_resources(self, address: str, log: Callable[[str], None]) -> None:
        """A task asking for more CPUs or GPUs than the cluster has can never run (the driver waited for
        ever): on a local Ray this command started, BadInput naming the option; on a cluster joined, a
        warning (an autoscaler may add the nodes)."""
        try:
            have = self.ray.cluster_resources()
        except Exception:          # noqa: BLE001 - what it has cannot be told: the tasks say it by running
            return
        what = ("the local Ray cluster" if self.owned_local else f"the Ray cluster at {address}" if self.owned
                else "the Ray cluster this process is connected to")
        for flag, want, key in (("--cpus-per-model", self.cpus, "CPU"), ("--gpus-per-model", self.gpus, "GPU")):
            n = float(have.get(key, 0) or 0)
            if want and n < want:
                why = (f"{flag} {want:g}: {what} has no {key}" if n == 0 else
                       f"{flag} {want:g}: {what} has only {n:g} {key}s")
                if self.owned_local:
                    raise BadInput(f"{why}; no model could ever run there (lower {flag})")
                log(f"warning: {why} now; the models wait until it has (or lower {flag})")

    def map(self, tasks: list[dict]) -> Iterator[tuple[int, dict]]:
        ray = self.ray
        remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries)(run_model_on_worker)
        index = {remote.remote(t): i for i, t in enumerate(tasks)}
        pending = list(index)
        try:
            while pending:
                try:
                    # with a timeout: a signal's Python handler (SIGTERM's Terminated) runs only when the
                    # wait returns, so an unbounded wait held SIGTERM until a model finished
                    done, pending = ray.wait(pending, num_returns=1, timeout=RAY_WAIT_POLL_S)
                except Exception as e:
                    _raise_interrupt(e)
                    raise
                for ref in done:
                    try:
                        res = ray.get(ref)
                    except Exception as e:                    # the worker died more than max_retries times
                        _raise_interrupt(e)
                        res = error_record(e, "Ray")
                    yield index[ref], res
        finally:
            # a Ray this driver started is shut down by close(), its workers with it (cancelling by
            # force there raced a finishing task's reply and aborted the driver inside Ray); on a
            # cluster the tasks still running are cancelled and waited for (a while), so their
            # workers are gone before the driver clears their staging folders
            if pending and not self.owned_local:
                for ref in pending:
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:
                        pass
                try:
                    ray.wait(pending, num_returns=len(pending), timeout=RAY_CANCEL_WAIT_S)
                except Exception:
                    pass

    def close(self) -> None:
        try:
            if self.owned:
                self.ray.shutdown()
        finally:
            self._quiet.__exit__(None, None, None)


# ------------------------------------------------------------------ the driver
#: the most threads per model, workers, GPUs per model or retries a zoo option may ask for
MAX_COUNT = 1024


@dataclass
class ZooOptions:
    mode: str = "fix"
    out_dir: Optional[Path] = None          # report + journal; default <manifest stem>-zoo beside it
    journal: Optional[Path] = None          # default <out_dir>/journal.jsonl
    force: bool = False                     # replace outputs that exist and this zoo did not write
    ray: Optional[str] = None               # None: local; "auto": a local Ray; else a cluster address
    workers: Optional[int] = None           # --ray auto: worker slots (default: the CPU count)
    cpus_per_model: int = 1                 # torch threads per model (and Ray num_cpus per task)
    gpus_per_model: float = 0               # Ray num_gpus per task
    max_retries: int = 3                    # Ray: retries of a task whose worker died
    allow_plugins: bool = False             # recipes' plugins: may run (they are code)

    def __post_init__(self):
        from .rules import check_bool

        if self.mode not in MODES:
            raise BadInput(f"--mode must be fix or eval, got {self.mode!r}")
        for name, flag in (("force", "--force"), ("allow_plugins", "--allow-plugins")):   # every bool field
            check_bool(getattr(self, name), flag)
        # a thread, worker or retry count beyond these is a typo, not a machine (torch.set_num_threads of
        # 10^5 crashed the process; 10^11 overflowed)
        for name, flag, lo, hi in (("cpus_per_model", "--cpus-per-model", 1, MAX_COUNT),
                                   ("max_retries", "--max-retries", 0, MAX_COUNT),
                                   ("workers", "--workers", 1, MAX_COUNT)):
            v = getattr(self, name)
            if v is None and name == "workers":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise BadInput(f"{flag} must be a whole number from {lo} to {hi}, got {v!r}")
        g = self.gpus_per_model
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= MAX_COUNT:
            import math

            why = ("" if isinstance(g, bool) or not isinstance(g, (int, float)) or math.isfinite(g) else
                   " (not a number)" if math.isnan(g) else " (infinite)")
            raise BadInput(f"--gpus-per-model must be a finite number from 0 to {MAX_COUNT} (fractions allowed), "
                           f"got {g!r}{why}")
        if self.ray is not None:
            ray_address(self.ray)               # auto or [ray://]HOST:PORT, before anything else
        if self.ray is None:                    # the local executor runs one model at a time, on the CPU
            for flag, given in (("--workers", self.workers is not None), ("--gpus-per-model", self.gpus_per_model)):
                if given:
                    raise BadInput(f"{flag} needs --ray (auto or a cluster address); without it models run here, "
                                   "one at a time")


REPORT_NAME = "zoo-report.html"


def run_zoo(manifest_path, options: Optional[ZooOptions] = None, runtime=None,
            log: Optional[Callable[[str], None]] = None) -> dict:
    """Validate the manifest, run every unfinished model, journal each as it finishes, write the
    report; returns the report document (``summary.failed`` / ``summary.errors`` name the models
    that did not pass). Its commits are not recorded for an interrupted command's last line
    (:func:`repair.io.not_recorded`): the zoo says itself what finished, and a rerun resumes."""
    from .io import not_recorded

    with not_recorded():
        return _run_zoo(manifest_path, options, runtime, log)


def _run_zoo(manifest_path, options, runtime, log) -> dict:
    from .io import check_output, check_reachable
    from .runtime import RuntimeOptions

    o = options or ZooOptions()
    runtime = runtime or RuntimeOptions()
    if log is None:                # progress as runtime says (--quiet: warnings and notices only)
        from .runtime import stderr_log

        log = stderr_log(runtime.progress)
    t0 = time.perf_counter()
    if o.ray is not None:
        import_ray()                                        # before anything else: exit 2 with the hint
    manifest = load_manifest(manifest_path, o.mode, allow_plugins=o.allow_plugins)
    mpath = Path(manifest_path)
    out_dir = Path(o.out_dir) if o.out_dir is not None else mpath.absolute().parent / f"{mpath.stem}-zoo"
    check_reachable(out_dir)                        # a folder above it that cannot be entered
    if o.journal is not None:
        check_reachable(Path(o.journal))
    if not out_dir.parent.is_dir():
        raise BadInput("folder does not exist", out_dir.parent)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput("the report folder is a file, not a folder", out_dir)
    check_output(out_dir / "zoo-report.html" if out_dir.is_dir() else out_dir, force=True)   # can be written
    journal = Journal(o.journal if o.journal is not None else out_dir / "journal.jsonl")
    if not journal.path.parent.is_dir() and journal.path.parent != out_dir:
        raise BadInput("folder does not exist", journal.path.parent)
    if journal.path.parent != out_dir:
        check_output(journal.path, force=True)
    from .rules import check_outputs_distinct

    check_outputs_distinct({"--journal": journal.path, "the report": out_dir / REPORT_NAME,          # never one of the
                            "the report's JSON": out_dir / "zoo-report.json", "the lock": out_dir / LOCK_NAME})  # others
    # the report, the journal, the lock and the cache go into no input (a model folder would ship them)
    for p, flag in ((out_dir / REPORT_NAME, "--out-dir"), (out_dir / "zoo-report.json", "--out-dir"),
                    (out_dir / LOCK_NAME, "--out-dir"), (journal.path, "--journal")):
        manifest.protected.check(p, flag)
    _check_outputs_apart(manifest, mpath, out_dir, journal.path)
    journal.check()
    from .embeddings import default_cache_dir
    from .preflight import check_cache_dir

    # the cache folder as the driver sees it: a relative one is taken from here, not from the folder
    # each Ray worker happens to run in
    runtime = dataclasses.replace(runtime, cache_dir=str(
        (Path(runtime.cache_dir) if runtime.cache_dir else default_cache_dir()).absolute()))
    check_cache_dir(manifest.protected, runtime, {f"row {e.row} ({e.name}) output": e.output
                                                  for e in manifest.entries} if o.mode == "fix" else None)
    created = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)
    working: list = []                                      # _run_locked appends once it begins work
    lock_made = not os.path.lexists(out_dir / LOCK_NAME)
    locks = [_hold_lock(out_dir)]                           # one driver per report folder
    try:
        if o.mode == "fix":          # ... and per folder the rows' outputs go in (another manifest's too)
            for parent in sorted({e.output.parent.resolve() for e in manifest.entries if e.output is not None}):
                if parent.is_dir():
                    locks.append(_hold_outputs_lock(parent))
        return _run_locked(manifest, mpath, out_dir, journal, o, runtime, t0, log, working)
    except BadInput:
        if created and not working:                         # refused before any work: leave nothing
            shutil.rmtree(out_dir, ignore_errors=True)      # (once work began, the journal and report stay)
        elif lock_made and not working:                     # ... not even the lock in a folder of yours
            with contextlib.suppress(OSError):
                os.unlink(out_dir / LOCK_NAME)
        raise
    finally:
        for lock in locks:
            os.close(lock)


def _report_not_ours(out_dir: Path, journal: Path, mpath: Path) -> Optional[str]:
    """Why the report files in ``out_dir`` are not this zoo's own (None: they are, or there are none).
    They are its own when the JSON is a zoo report of this manifest that names this zoo's journal as
    the one it was written with (the path as it was written, taken relative to the report it names,
    so a folder moved whole is still its own), and the page there is the one written with that JSON
    (:func:`repair.report.read_report`). Anything else is the user's: fail closed."""
    from .report import read_report
    from .rules import report_outputs

    html, js = report_outputs(out_dir / REPORT_NAME)
    if not any(p.exists() or p.is_symlink() for p in (html, js)):
        return None
    doc, why = read_report(html)
    if doc is None:
        return why
    if doc.get("kind") != "zoo":
        return f"{js.name} is the report of a repair {doc.get('kind')}, not of a zoo"
    if Path(doc["manifest"]).name != mpath.name:
        return f"{js.name} is the report of {Path(doc['manifest']).name}, not of {mpath.name}"
    named, report = doc.get("journal"), doc.get("report")
    if not isinstance(named, str) or not isinstance(report, str) or Path(report).name != REPORT_NAME:
        return f"{js.name} names no journal it was written with"
    j, r = Path(named), Path(report)
    was = out_dir / os.path.relpath(j, r.parent) if j.is_absolute() == r.is_absolute() else j
    try:
        same = was.resolve() == journal.resolve()
    except (OSError, RuntimeError):
        same = False
    if not same:
        return f"{js.name} was written with the journal {named}, not with this zoo's {journal}"
    return None


def _check_report_files(out_dir: Path, journal: Path, mpath: Path, force: bool) -> None:
    """Before any work: the report files in ``out_dir`` (:data:`REPORT_NAME` and the JSON beside it)
    can be written, and one that exists is replaced only when it is this zoo's own
    (:func:`_report_not_ours`: a rerun or a resume) or with ``force``
    (:func:`repair.rules.check_writable`). BadInput names the file."""
    from .rules import check_writable, report_outputs

    why = None if force else _report_not_ours(out_dir, journal, mpath)
    for p in report_outputs(out_dir / REPORT_NAME):
        try:
            check_writable(p, force=why is None, flag="--out-dir", kind="file")
        except BadInput as e:
            if why is None or not (p.exists() or p.is_symlink()):
                raise
            raise BadInput(f"{e.problem}; it is not this zoo's report ({why})", e.path) from None


def _check_outputs_apart(manifest: Manifest, mpath: Path, out_dir: Path, journal: Path) -> None:
    """No row's output nor its staging folder is, holds or lies inside the report folder (the
    report, the journal, the lock) or the journal: a commit would move them into a model."""
    from .rules import check_outputs_distinct

    problems = _Problems(mpath)
    for e in manifest.entries:
        for what, p in e.places():
            for flag, z in (("--out-dir", out_dir), ("--journal", journal)):
                try:
                    check_outputs_distinct({f"its {what}": p, flag: z})
                except BadInput as err:
                    problems.add(f"row {e.row} ({e.name})", "output", err.problem)
    problems.raise_first()


def _hold_outputs_lock(folder: Path) -> int:
    """Hold a lock on ``folder`` itself (the folder's own descriptor: no file is left in it), a folder
    the rows' outputs are written in, with their staging folders -- whose names are fixed so that a
    rerun completes an interrupted rename: a second driver writing there (the same manifest with
    another --out-dir, or another manifest's rows) would remove and commit the first one's staged
    files. It gets BadInput naming the folder. Released when the driver ends in any way."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BadInput("another repair zoo is writing models' outputs in this folder; wait for it, or give "
                       "this manifest's rows other outputs", folder) from None
    return fd


def _hold_lock(out_dir: Path) -> int:
    """Hold ``<out_dir>/.zoo-lock`` for this driver; a second driver on the same folder gets
    BadInput naming the holder. Released when the driver ends in any way (the OS drops the lock).
    The lock is written: a link there is never followed (its target would be truncated), a FIFO never
    waited on, and anything but a regular file is refused by name."""
    import fcntl
    import stat

    path = out_dir / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        why = "a symbolic link" if path.is_symlink() else e.strerror or type(e).__name__
        raise BadInput(f"cannot be used as the zoo's lock file ({why}); remove it", path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInput("cannot be used as the zoo's lock file (not a regular file); remove it", path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise BadInput(f"another repair zoo is running on this folder (held by {holder}); wait for it or "
                       "use another --out-dir", out_dir) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def _run_locked(manifest, mpath, out_dir, journal, o, runtime, t0, log, working: list) -> dict:
    from .provenance import source_date
    from .report import clock, now, write_report

    records = journal.read()
    others = sorted({r["manifest"] for r in records.values()
                     if isinstance(r.get("manifest"), str) and r["manifest"] != mpath.name})
    if others:       # zoo.yaml and zoo.csv side by side share the default <stem>-zoo folder
        raise BadInput(f"the journal holds the models of another manifest, {others[0]}; give {mpath.name} "
                       "its own --out-dir", journal.path)
    # an existing report is replaced only when it is this zoo's own, or with --force (under the lock, so
    # no other driver writes one between this check and the write at the end)
    _check_report_files(out_dir, journal.path, mpath, o.force)
    done = {}
    redo: dict[str, str] = {}
    edited: dict[str, str] = {}                 # journaled outputs changed since: the user's now
    vouched: set[str] = set()                   # outputs the journal says are this zoo's, as written (or less)
    memo: dict = {}
    inputs = {e.name: input_fingerprints(manifest, e, o.mode, memo) for e in manifest.entries}
    for e in manifest.entries:
        rec = records.get((e.name, o.mode))
        if rec is not None and rec.get("key") == e.key(o.mode):
            why = inputs_changed(rec.get("inputs"), inputs[e.name])
            if why is None and o.mode == "fix":
                if not rec.get("output"):
                    why = "its output was not recorded"
                else:
                    commit_staged(Path(rec["output"]))      # a rename an interrupted driver had not finished
                    changed = _output_changed(Path(rec["output"]), rec.get("output_files"))
                    why, was_edited = changed or (None, False)
                    if not was_edited:
                        vouched.add(e.name)
                    if was_edited and not o.force:
                        edited[e.name] = why            # the user's now: kept unless --force
                        continue
            if why:
                redo[e.name] = why
                log(f"{e.name}: journaled, but {why}: running it again")
                continue
            done[e.name] = rec
    # a journaled row's expected groups against its model's classes (known from its record), before any work
    problems = _Problems(mpath)
    for e in manifest.entries:
        if e.name in done:
            try:
                e.judge_gate(done[e.name].get("result") or {}, mpath)
            except BadInput as err:
                problems.items.append(err.problem)
    problems.raise_first()
    if o.mode == "fix":
        problems = _Problems(mpath)
        for e in manifest.entries:
            if e.name in edited:
                problems.add(f"row {e.row} ({e.name})", "output",
                             f"{e.output} was written by this zoo, but {edited[e.name]} since: it is kept "
                             "(use --force to replace it; --force never replaces a file added to it: move "
                             "that out first)")
            elif e.name not in done and e.name not in redo and not o.force:
                there = next((q for what, q in e.places() if not what.startswith("staging")
                              and (q.exists() or q.is_symlink())), None)
                if there is not None:
                    why = ("the journal holds this model with other settings"
                           if (e.name, o.mode) in records else "this zoo's journal did not write it")
                    # --force is named only where it would replace what is there: the rule --force itself
                    # applies below (every place, each of its kind; never a folder of the user's)
                    refused = _replace_refused(e)
                    problems.add(f"row {e.row} ({e.name})", "output",
                                 f"{there} already exists and {why} "
                                 + ("(use --force to replace it)" if refused is None else f"; and {refused}"))
            elif e.name not in done and e.name not in vouched:
                # --force, or a rerun of a model the journal does not vouch for as written: only what the
                # rule of every output lets --force replace (never a folder of the user's)
                why = _replace_refused(e)
                if why:
                    problems.add(f"row {e.row} ({e.name})", "output", why)
        problems.raise_first()
    # ---- validated: from here on, work
    todo = [e for e in manifest.entries if e.name not in done]
    rt = {"device": runtime.device, "batch_size": runtime.batch_size, "cache_dir": runtime.cache_dir,
          "use_cache": runtime.use_cache}
    created = source_date()         # read here, once: a Ray worker's environment is its cluster's, not ours
    tasks = [{"entry": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(e).items()},
              "mode": o.mode, "runtime": rt, "threads": o.cpus_per_model, "allow_plugins": o.allow_plugins,
              "data": manifest.data_of(e, "data"), "eval": manifest.data_of(e, "eval") if e.eval else None,
              "manifest": str(mpath), "source_date": created}     # (--force is the driver's: it commits)
             for e in todo]
    errors: dict[str, dict] = {}
    executor = (LocalExecutor() if o.ray is None else
                RayExecutor(o.ray, workers=o.workers, cpus_per_model=o.cpus_per_model,
                            gpus_per_model=o.gpus_per_model, max_retries=o.max_retries, log=log))
    log(f"zoo {mpath.name}: {len(manifest.entries)} models ({o.mode}); {len(done)} finished before "
        f"(journal {journal.path}), {len(todo)} to run on {executor.description}")
    interrupted = False
    resumed = set(done)
    working.append(True)                    # from here on the journal and the report are kept, whatever
    journaled: set[str] = set()             # rows whose staged files the journal vouches for

    def row_error(e: ZooEntry, record: dict) -> None:
        """Row ``e`` ended with an error (:func:`error_record`): recorded for the report, and said."""
        errors[e.name] = record
        log(f"[{len(done) + len(errors)}/{len(manifest.entries)}] {e.name}: error: {record['error']}")

    try:
        for i, res in executor.map(tasks):
            e = todo[i]
            for line in worker_output_lines(e.name, res):   # what it printed on a Ray worker, as a local
                print(line, file=sys.stderr, flush=True)    # run prints it (whatever -q: notices, a plugin's)
            if res["status"] != "done":
                row_error(e, res)
                continue
            if o.mode == "fix":
                # what is at its places now may be replaced (something may have appeared there while the
                # zoo worked): else this row's own error, its staged files discarded, the others go on
                refused = _refused_commit(e, o.force or e.name in redo)
                if refused is not None:
                    discard_staged(e.output)
                    row_error(e, error_record(refused, **res))
                    continue
            files = res["result"].pop("output_files", None)
            rec = {"name": e.name, "mode": o.mode, "key": e.key(o.mode), "manifest": mpath.name,
                   "status": "done", "finished": clock(),
                   "seconds": res["seconds"], "worker": res["worker"],
                   "output": str(e.output) if o.mode == "fix" else None, "inputs": inputs[e.name],
                   "output_files": files, "result": res["result"]}
            journaled.add(e.name)                           # (kept staged should the append be cut)
            try:
                journal.append(rec)                         # the commit point ...
            except BadInput:                                # ... not reached: nothing of it was journaled
                journaled.discard(e.name)
                raise
            if o.mode == "fix":                             # ... then the files go into place
                refused = _refused_commit(e, o.force or e.name in redo, commit=True)
                if refused is not None:     # refused since the check above: this row's error, its files kept
                    row_error(e, error_record(refused, **res))   # staged (the journal vouches for them: a
                    continue                                # rerun completes the rename once the place is free)
            done[e.name] = rec
            log(f"[{len(done) + len(errors)}/{len(manifest.entries)}] {e.name}: "
                f"{_progress_line(res['result'], e.judge_gate(res['result']))} "
                f"({res['seconds']:.1f}s on {res['worker']})")
            for w in res["result"].get("warnings") or []:     # as `repair fix` / `eval` say them
                log(f"warning: {e.name}: {w}")
    except (KeyboardInterrupt, Terminated):
        interrupted = True
        raise
    finally:
        try:
            executor.close()
        finally:
            if o.mode == "fix":         # what an attempt staged and the journal does not vouch for
                for e in todo:
                    if e.name not in journaled:
                        discard_staged(e.output)
            models = [_model_entry(e, done.get(e.name), errors.get(e.name), e.name in resumed, redo.get(e.name))
                      for e in manifest.entries]
            doc = _document(mpath, o, executor.description, models, interrupted, time.perf_counter() - t0)
            doc["report"], doc["journal"] = str(out_dir / REPORT_NAME), str(journal.path)
            write_report(out_dir / REPORT_NAME, doc, force=True)     # new, this zoo's or --force: checked above
            if interrupted:
                log(f"interrupted: {len(done)} of {len(manifest.entries)} models finished; the report "
                    f"{out_dir / REPORT_NAME} shows them, a rerun finishes the rest")
    return doc


def _refused_commit(e: ZooEntry, may_replace: bool, commit: bool = False) -> Optional[BadInput]:
    """The refusal (None: none) of putting row ``e``'s staged files into place (:func:`check_commit`),
    or, with ``commit``, of doing it (:func:`commit_staged`)."""
    try:
        (commit_staged if commit else check_commit)(e.output, may_replace=may_replace)
    except BadInput as refused:
        return refused
    return None


def _replace_refused(e: ZooEntry) -> Optional[str]:
    """Why a row's commit may not replace what is at one of its places (its output, the ONNX export or
    the artifacts folder beside a file output): :func:`repair.io.replace_refused` for each, the output
    being what the checkpoint makes (:func:`repair.rules.model_output_kind`). None: it may."""
    from .io import replace_refused
    from .rules import model_output_kind

    kinds = {**PLACE_KINDS, PLACE_OUTPUT: model_output_kind(e.checkpoint)}
    for what, q in e.places():
        if what in kinds:
            why = replace_refused(q, kinds[what])
            if why:
                return f"{q} {why}"
    return None


def _output_changed(output: Path, files: Optional[dict]) -> Optional[tuple[str, bool]]:
    """Why a journaled model's output cannot be trusted any more, and whether it was *edited*
    (None: every file it was written with is there, byte for byte, and nothing was added). An
    edited output holds what this zoo did not write (a file changed or added, or files it cannot
    check): replacing it would lose that, so only ``--force`` does. An output that is only missing,
    or missing files, is written again as it was."""
    if not output.exists():
        return "its output is missing", False
    if not isinstance(files, dict) or not files:
        return "its output's files were not recorded", True
    try:
        now = output_files(output.parent, {k.split("/")[0] for k in files})
    except OSError as e:
        return f"its output cannot be read ({e.strerror or e})", True
    added = sorted(set(now) - set(files))
    if added:
        return f"its output holds {added[0]}, which was not written with it", True
    changed = [r for r in sorted(files) if now.get(r) not in (None, "missing", files[r])]
    if changed:
        return f"its output file {changed[0]} differs from what was written", True
    gone = [r for r in sorted(files) if files[r] != "missing" and now.get(r) in (None, "missing")]
    if gone:
        return f"its output file {gone[0]} is missing", False
    if now != files:
        return "its output differs from what was written", True
    return None


def _model_entry(e: ZooEntry, rec: Optional[dict], error: Optional[dict], resumed: bool,
                 redone: Optional[str] = None) -> dict:
    from .report import model_entry

    if rec is not None:
        extra = {"redone": redone} if redone else {}
        return model_entry(e.name, rec["result"], gate=e.judge_gate(rec["result"]),
                           seconds=rec.get("seconds"), worker=rec.get("worker"), resumed=resumed, **extra)
    if error is not None:
        return model_entry(e.name, None, status="error", error=error["error"], exit_code=error.get("exit_code", 3))
    return model_entry(e.name, None, status="pending")


def _document(mpath: Path, o: ZooOptions, executor: str, models: list[dict], interrupted: bool,
              seconds: float) -> dict:
    from .report import now

    done = [m for m in models if m["status"] == "done"]
    failed = [m["name"] for m in done if m["gate"] and not m["gate"]["passed"]]
    return {"kind": "zoo", "manifest": str(mpath), "mode": o.mode, "executor": executor, "generated": now(),
            "interrupted": interrupted, "wall_seconds": round(seconds, 3),
            "summary": {"models": len(models),
                        "finished": len(done),
                        "passed": sum(bool(m["gate"]) and m["gate"]["passed"] for m in done),
                        "no_gate": [m["name"] for m in done if not m["gate"]],      # finished, nothing to pass
                        "failed": failed,
                        "errors": [m["name"] for m in models if m["status"] == "error"],
                        "pending": [m["name"] for m in models if m["status"] == "pending"]},
            "models": models}


def _progress_line(result: dict, gate: Optional[dict]) -> str:
    from .display import gate_thresholds, percent
    from .report import gate_summary, headline

    def pct(x):                         # never shown as meeting the gate it fails
        return percent(x, against=gate_thresholds([gate]))

    b, a = result["before"], result.get("after")
    wb, label = headline(b)
    if a is not None:
        wa, _ = headline(a)
        s = f"{result.get('candidate')}: {label} {pct(wb)} -> {pct(wa)}, accuracy {pct(a['accuracy'])}"
    else:
        s = f"{label} {pct(wb)}, accuracy {pct(b['accuracy'])}"
    if gate:
        s += f", gate {'pass' if gate['passed'] else 'FAIL'} ({gate_summary(gate)})"
    return s
