"""The rules about what a run reads, what it writes and how it judges: each defined here once,
and every caller (``fix``, ``export``, ``verify``, ``eval``, ``zoo``, the reports) uses these.

- **Output naming**: :func:`fix_output` and :func:`export_output` (the default name and the
  suffix an output must have, for ``repair fix`` and ``repair export``).
- **Never replace an input**: :class:`Protected` holds every file and folder a run reads (the
  model folder's files, the data table and the files it lists, ``--eval`` / ``--train`` data, the
  model-repair inputs, and across a zoo manifest every row's inputs); :meth:`Protected.check`
  refuses an output that is one of them, a folder holding one, or a path inside a folder read as
  a whole. :func:`check_outputs_distinct` keeps a run's outputs apart from each other.
- **Writability**: :func:`check_writable` (a real probe, stale temps of ours removed; what ``--force``
  may replace: an empty folder or one repair wrote, never another folder: :func:`repair.io.replace_refused`).
- **Option checks**: :func:`check_tolerance`, :func:`check_export_options`.
- **Gates**: :func:`parse_threshold` and :func:`judge`: exact counts (k of n) against the
  threshold as written, so 42 of 60 passes a 70% gate, with the digits that show why.

Nothing here imports torch.
"""
from __future__ import annotations

import errno
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

from .errors import BadInput

PathLike = Union[str, Path]

from .io import PICKLE_SUFFIXES  # noqa: E402  (which files are pickles: the loader's rule)

#: suffixes that say "one weights file" (a folder output must not end in one)
WEIGHT_SUFFIXES = {".onnx", ".safetensors", *PICKLE_SUFFIXES}
#: weights files of other frameworks and runtimes a checkpoint folder may hold beside the one repair
#: reads -- a Hub folder's ``tf_model.h5``, ``flax_model.msgpack``, ``rust_model.ot``, a ``.gguf``, a
#: ``.tflite``, Keras, Core ML, Paddle, TensorRT, NumPy (JAX) weights, a TF checkpoint's pieces
OTHER_WEIGHT_SUFFIXES = {".h5", ".hdf5", ".keras", ".msgpack", ".ot", ".gguf", ".ggml", ".tflite", ".lite",
                         ".mlmodel", ".mlpackage", ".pdparams", ".pdmodel", ".engine", ".npz"}


def source_weights_copy(path: Path) -> bool:
    """Whether ``path`` (an entry of a checkpoint folder) holds the source's weights in some format --
    a weights file (:data:`WEIGHT_SUFFIXES`, :data:`OTHER_WEIGHT_SUFFIXES`) or a sharded one's index, an
    ONNX file's external data, a TF checkpoint's pieces (``*.ckpt.index``, ``*.ckpt.data-*``), an OpenVINO model (the
    ``.xml`` beside its ``.bin``), a Core ML package: the repaired folder leaves them out, for each
    would ship the unrepaired model inside the repaired one (a TF or Rust loader reading its own file
    silently). The one home of that rule (:func:`repair.adapters.base.folder_copy_plan`)."""
    name = path.name.lower()
    suffix = path.suffix.lower()
    if suffix in WEIGHT_SUFFIXES or suffix in OTHER_WEIGHT_SUFFIXES:
        return True
    if name.endswith((".onnx.data", ".onnx_data")) or ".ckpt." in name:
        return True
    if name.endswith(".index.json") and Path(name[:-len(".index.json")]).suffix in WEIGHT_SUFFIXES:
        return True         # a sharded checkpoint's index (model.safetensors.index.json): its shards are left out
    return suffix == ".xml" and path.with_suffix(".bin").exists()
EXPORT_FORMATS = ("onnx", "safetensors")
EXPORTERS = ("auto", "dynamo", "torchscript")


# ------------------------------------------------------------------ output naming
def _is_onnx(p: Path) -> bool:
    return p.suffix.lower() == ".onnx"


def fix_output(model_path: PathLike, out: Optional[PathLike] = None) -> Path:
    """The output of ``repair fix``: ``out`` checked, or the default ``<model>-repaired`` in the
    model's own format (a folder for a folder, ``.safetensors`` / ``.onnx`` for a file)."""
    model_path = Path(model_path)
    folder = model_path.is_dir()
    want = None if folder else (".onnx" if _is_onnx(model_path) else ".safetensors")
    if out is None:
        if folder:
            return model_path.with_name(model_path.name + "-repaired")
        return model_path.with_name(model_path.stem + "-repaired" + want)
    out = Path(out)
    if want is not None and out.suffix.lower() != want:
        raise BadInput(f"the output of a {model_path.suffix or 'weights'} file is one {want} file; "
                       f"name it *{want}", out)
    if want is None and out.suffix.lower() in WEIGHT_SUFFIXES:
        raise BadInput(f"the output of a checkpoint folder is a folder; a name ending in {out.suffix} "
                       "would be taken for a weights file", out)
    return out


def fix_onnx_output(model_path: PathLike, out: Path) -> Optional[Path]:
    """Where ``fix --export onnx`` puts its separate ONNX file: beside a ``.safetensors`` output
    (``<stem>.onnx``); None when it goes inside the output folder (``model.onnx``) or the output
    is itself ONNX."""
    model_path = Path(model_path)
    if model_path.is_dir() or _is_onnx(model_path):
        return None
    return Path(out).with_suffix(".onnx")


def artifacts_output(model_path: PathLike, out: Path) -> Path:
    """Where a model repair's files (masks, generated images) go: inside a folder output, beside a
    file output."""
    out = Path(out)
    return out / "repair-artifacts" if Path(model_path).is_dir() else out.with_name(out.stem + "-artifacts")


def artifacts_beside(model_path: PathLike, out: Path) -> Optional[Path]:
    """:func:`artifacts_output` when it lies beside the output (a file output: a place of its own that
    every output check covers), None when it is inside a folder output (the output's own)."""
    art = artifacts_output(model_path, out)
    return None if Path(out) in art.parents else art


def fix_places(model_path: PathLike, out: PathLike, export: Optional[str] = None,
               model_repairs: Optional[bool] = True) -> dict[str, Path]:
    """Every place a fix writes to ``out`` (named by :func:`fix_output`), by what it is: ``output``; ``onnx``,
    the ONNX file ``export`` onnx writes beside a file output (:func:`fix_onnx_output`); ``artifacts``, the
    folder of a model repair's files beside a file output (:func:`artifacts_beside`) when the recipe has a
    model repair -- ``model_repairs``; None: not known before it runs (a plugin's methods), listed to be
    safe. A head-only recipe writes no such folder, so one there is none of its business. The one home of
    the rule: ``repair fix`` (:func:`repair.preflight.fix_outputs`) and a zoo row
    (:func:`repair.zoo.row_places`)."""
    places = {"output": Path(out)}
    onnx = fix_onnx_output(model_path, out) if export == "onnx" else None
    if onnx is not None:
        places["onnx"] = Path(onnx)
    art = artifacts_beside(model_path, out) if model_repairs is not False else None
    if art is not None:
        places["artifacts"] = art
    return places


def export_output(model_path: PathLike, fmt: str, out: Optional[PathLike] = None) -> Path:
    """The output of ``repair export``: ``out`` checked, or the default beside the model."""
    model_path = Path(model_path)
    fmt = check_format(fmt)
    folder = model_path.is_dir()
    if out is None:
        name = model_path.name.rstrip("/") if folder else model_path.stem
        parent = model_path.parent
        if fmt == "onnx":
            cand = parent / f"{name}.onnx"
            return parent / f"{name}.export.onnx" if cand.resolve() == model_path.resolve() else cand
        return parent / f"{name}-export" if folder else parent / f"{name}.export.safetensors"
    out = Path(out)
    if fmt == "onnx":
        check_file_suffix(out, ".onnx", "ONNX")
    elif not folder:
        check_file_suffix(out, ".safetensors", "safetensors")
    elif folder and out.suffix.lower() in WEIGHT_SUFFIXES:
        raise BadInput(f"the safetensors export of a checkpoint folder is a folder; a name ending in "
                       f"{out.suffix} would be taken for a weights file", out)
    return out


def check_file_suffix(out: Path, suffix: str, what: str) -> Path:
    """``out`` when its name ends in ``suffix`` (``.onnx``); else :class:`BadInput` naming it -- a hidden
    name that is the suffix alone (``.onnx``: no stem, so no suffix) said so. The one home of that rule
    (``repair export``'s output, :func:`repair.export.export_onnx`'s)."""
    out = Path(out)
    if out.suffix.lower() != suffix:
        hint = (f": {out.name!r} is a hidden name with nothing before {suffix} (write model{suffix})"
                if out.name.lower() == suffix else "")
        raise BadInput(f"the {what} output file name must end in {suffix}{hint}", out)
    return out


def report_outputs(report: PathLike) -> tuple[Path, Path]:
    """``--report FILE.html``: the page and the JSON written beside it."""
    report = Path(report)
    if report.suffix.lower() not in (".html", ".htm"):
        raise BadInput("--report must be an .html file", report)
    return report, report.with_suffix(".json")


# ------------------------------------------------------------------ never replace an input
def _norm(p: PathLike) -> Path:
    """Absolute, symlinks resolved (a link to an input is that input); a path through a loop of links
    is :class:`BadInput` naming it (Python raises RuntimeError, or OSError from 3.13, for it)."""
    try:
        return Path(p).expanduser().resolve()
    except (RuntimeError, OSError) as e:
        why = "a loop of symbolic links" if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP \
            else e.strerror or type(e).__name__
        raise BadInput(f"cannot be used as a path ({why})", p) from None


class Protected:
    """Every path a run reads, by what the user calls it. Files are protected themselves; a
    folder read as a whole (a model folder, an image class tree, a mask folder) is protected with
    everything inside it."""

    def __init__(self) -> None:
        self.files: dict[Path, str] = {}
        self.folders: dict[Path, str] = {}
        self.named: dict[Path, str] = {}      # paths given that are not read whole (a table's folder)
        #: the checkpoint folder of a weights file given inside one (its config.json beside it): the
        #: loader reads the folder's files, and the next repair of the folder copies what is in it
        self.checkpoint_folders: dict[Path, str] = {}
        self._holders: Optional[dict] = None  # every folder holding a protected path -> that path

    def add(self, path: Optional[PathLike], what: str) -> "Protected":
        """A path the user gave: a folder counts as read whole, a file as itself."""
        if path is None:
            return self
        p = _norm(path)
        (self.folders if p.is_dir() else self.files).setdefault(p, what)
        given = Path(path).expanduser()
        if given.is_file() and (given.parent / "config.json").is_file():
            self.checkpoint_folders.setdefault(_norm(given.parent), what)
        self._holders = None
        return self

    def add_file(self, path: PathLike, what: str) -> "Protected":
        self.files.setdefault(_norm(path), what)
        self._holders = None
        return self

    def add_files(self, paths: Iterable[PathLike], what: str, resolved: bool = False) -> "Protected":
        """``resolved``: the paths are absolute with symlinks followed already (a data set's
        :meth:`~repair.data.RepairData.files`), so they are not resolved again."""
        for p in paths:
            self.files.setdefault(Path(p) if resolved else _norm(p), what)
        self._holders = None
        return self

    def add_data(self, data, what: str) -> "Protected":
        """A :class:`repair.data.RepairData`: a class-folder tree is read whole; a table protects
        itself and every file it lists."""
        if data is None:
            return self
        resolved = hasattr(data, "files")
        files = data.files() if resolved else (
            [data.table] if data.table else []) + ([Path(i) for i in data.items] if data.modality == "image" else [])
        if data.table is None:
            self.add(data.source, what)
        else:
            self.named.setdefault(_norm(data.source), what)
        self.add_files(files, what, resolved=resolved)
        return self

    def update(self, other: "Protected") -> "Protected":
        for p, w in other.files.items():
            self.files.setdefault(p, w)
        for p, w in other.folders.items():
            self.folders.setdefault(p, w)
        for p, w in other.named.items():
            self.named.setdefault(p, w)
        for p, w in other.checkpoint_folders.items():
            self.checkpoint_folders.setdefault(p, w)
        self._holders = None
        return self

    def why(self, out: PathLike, flag: str = "--out") -> Optional[str]:
        """Why writing ``out`` would replace or change an input (None: it would not)."""
        o = _norm(out)
        for p, what in {**self.named, **self.files, **self.folders}.items():
            if o == p:
                return f"{flag} would overwrite the {what}"
        if self._holders is None:            # every ancestor of a protected path, once (thousands of images)
            first: dict = {}                 # folder -> the first protected path directly in it
            for p in {**self.files, **self.folders}:
                first.setdefault(p.parent, p)
            self._holders = {}
            for d, p in first.items():
                for a in (d, *d.parents):
                    self._holders.setdefault(a, p)
        if o in self._holders:
            p = self._holders[o]
            what = self.files.get(p, self.folders.get(p))
            return f"{flag} would replace a folder that holds the {what} ({p})"
        for p, what in self.folders.items():
            if p in o.parents:
                return f"{flag} is inside the {what} ({p}), which is read as a whole"
        return None

    def check(self, out: PathLike, flag: str = "--out") -> None:
        reason = self.why(out, flag)
        if reason:
            raise BadInput(f"{reason}; choose another {flag}", out)


def check_outputs_distinct(outputs: dict[str, Optional[PathLike]]) -> None:
    """The outputs of one run (flag -> path) are different paths, none inside another."""
    items = [(f, _norm(p), p) for f, p in outputs.items() if p is not None]
    for i, (fa, a, pa) in enumerate(items):
        for fb, b, pb in items[i + 1:]:
            if a == b or a in b.parents or b in a.parents:
                raise BadInput(f"{fa} and {fb} would write the same place ({a} / {b})", pb)


def model_output_kind(model_path: PathLike) -> str:
    """What the model output of ``repair fix`` / ``repair export --format safetensors`` of
    ``model_path`` is (:func:`fix_output`, :func:`export_output`): a folder for a folder checkpoint,
    else one file."""
    return "folder" if Path(model_path).is_dir() else "file"


def check_writable(out: PathLike, *, force: bool = False, log: Optional[Callable[[str], None]] = None,
                   flag: Optional[str] = None, kind: Optional[str] = None, owned: bool = False) -> Path:
    """The output can be written, and with ``force`` what is there is one ``force`` may replace, given
    the output's ``kind`` (``"file"``, ``"folder"``, None: not known) -- see
    :func:`repair.io.check_output` and :func:`repair.io.replace_refused`; errors name ``flag``."""
    from .io import check_output

    try:
        return check_output(Path(out), force=force, log=log, kind=kind, owned=owned)
    except BadInput as e:
        if flag is None:
            raise
        raise BadInput(f"{flag}: {e.problem}", e.path or out) from None


# ------------------------------------------------------------------ option checks
def check_bool(value, flag: str) -> bool:
    """A yes/no option or argument (``force``, ``allow_plugins``, ``allow_pickle``, ``use_cache``, ...): True
    or False only, else :class:`BadInput` naming ``flag`` -- a string ``"no"`` is truthy, so accepting any
    value would turn on what it says off (run a recipe's plugin code, replace an output). The one home of
    that rule: every options class and public verb checks its yes/no values here (no torch imported)."""
    if not isinstance(value, bool):
        raise BadInput(f"{flag} must be true or false, got {value!r}")
    return value


def check_format(fmt: str, flag: str = "--format", allowed: Sequence[str] = EXPORT_FORMATS) -> str:
    """An export format by name, in any case (``ONNX`` is ``onnx``): one of ``allowed``, else
    :class:`BadInput` naming ``flag``. The one home of that rule: ``repair export --format``, ``repair fix
    --export`` (``allowed``: onnx alone) and a zoo row's ``export``."""
    f = fmt.lower() if isinstance(fmt, str) else None
    if f not in allowed:
        raise BadInput(f"{flag} must be {' or '.join(allowed)}, got {fmt!r}")
    return f


#: the options of the ONNX export and its verification, and what each is (for the refusal of one given
#: where no ONNX file is written)
ONNX_ONLY = {"tolerance": "the bound of the ONNX verification", "max_verify": "the ONNX verification's sample count",
             "opset": "the opset of the ONNX file", "exporter": "the ONNX exporter"}


def onnx_only_given(*, tolerance=None, max_verify=None, opset=None, exporter="auto", max_verify_default=None) -> list[str]:
    """Which of the ONNX export's options (:data:`ONNX_ONLY`) were given (not at their defaults): an
    export or fix writing no ONNX file refuses each of them rather than ignore it (a ``--tolerance -1``
    beside a safetensors export is a mistake, not a setting). The one home of that rule."""
    given = {"tolerance": tolerance is not None, "max_verify": max_verify is not None and max_verify != max_verify_default,
             "opset": opset is not None, "exporter": exporter not in (None, "auto")}
    return [k for k in ONNX_ONLY if given[k]]


def check_tolerance(tol: Any) -> float:
    """``--tolerance``: a positive, finite number (a bool is no number: ``True`` is no bound of 1.0)."""
    if isinstance(tol, bool):
        raise BadInput(f"--tolerance must be a positive number, got {tol!r}")
    try:
        t = float(tol)
    except (TypeError, ValueError):
        raise BadInput(f"--tolerance must be a positive number, got {tol!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise BadInput(f"--tolerance must be a positive number, got {tol}")
    return t


def install_hint(extra: str) -> str:
    """How to install the optional extra ``extra`` (pyproject's ``[project.optional-dependencies]``): the
    one wording of every missing-extra message and help text, for an installed toolkit and for a checkout."""
    return f"pip install 'repair-toolkit[{extra}]' (in a checkout: pip install -e \".[{extra}]\")"


# ------------------------------------------------------------------ an option refused, naming the option
def cli_flag(name: str, flags: Optional[dict] = None) -> str:
    """The command-line flag of an option field: ``flags[name]`` where an options class names it otherwise
    (``eval_data`` -> ``--eval``; a Python-only option by its own name), else ``--name-with-dashes``."""
    return (flags or {}).get(name) or "--" + name.replace("_", "-")


class Worded(BadInput):
    """A refusal whose words name options, the names carried with it, never read back from the text: ``rule``
    writes each option ``{field}`` (its options-class field: ``label_col``, ``allow_pickle``) and puts every
    other variable part in by ``values`` (put in as it is, never read as a name or a template). A part in
    ``[...]`` that names an option is advice only a caller with that option can follow: a caller that has no
    such option (its ``name`` gives None) drops the part. The message (``problem``, ``str``) names options
    by their command-line flags (:func:`cli_flag` with ``flags``); :meth:`worded` names them as another caller
    calls them (a zoo manifest's fields): one rule, worded by each caller."""

    def __init__(self, rule: str, values: Optional[dict] = None, flags: Optional[dict] = None, path=None):
        self.rule, self.values, self.flags = rule, dict(values or {}), dict(flags or {})
        super().__init__(self.worded(self.flag), path)

    def flag(self, name: str) -> str:
        return cli_flag(name, self.flags)

    def worded(self, name: Callable[[str], Optional[str]]) -> str:
        """The message with each option named ``name(field)`` (its flag where ``name`` gives None); a ``[...]``
        part naming an option ``name`` gives None for is left out, with the space before it. One pass over
        the rule: a value put in is never read as a template."""
        def fill(text: str, optional: bool) -> Optional[str]:
            missing = []

            def one(m) -> str:
                k = m.group(1)
                if k in self.values:
                    return str(self.values[k])
                n = name(k)
                if n is None:
                    missing.append(k)
                    return self.flag(k)
                return n
            out = re.sub(r"\{(\w+)\}", one, text)
            return None if missing and optional else out

        def one(m) -> str:
            if m.group(2) is None:
                return fill(m.group(0), False)
            inner = fill(m.group(2), True)
            return "" if inner is None else m.group(1) + inner
        return re.sub(r"( ?)\[([^\[\]]*)\]|\{\w+\}", one, self.rule)

    def in_words(self, name: Callable[[str], Optional[str]]) -> str:
        """The whole line (``path: problem``) with the options named ``name(field)``."""
        problem = self.worded(name)
        return f"{self.path}: {problem}" if self.path else problem

    def __reduce__(self):                  # pickled whole (its arguments are not BadInput's)
        return _worded, (type(self), self.rule, self.values, self.flags, self.path)


def _worded(cls, rule, values, flags, path):
    return cls(rule, values, flags, path)


class OptionRefused(Worded):
    """A bad value of a named option (a :class:`Worded` refusal that blames one option). ``option``: the option
    refused, by its options-class field (``eval_group_by``, ``max_pixels``); ``subject``: the message is "<the
    option> <rule>": ``--eval-group-by names a group column of the --eval data``; the blame by :attr:`option`."""

    def __init__(self, option: str, rule: str, values: Optional[dict] = None, flags: Optional[dict] = None,
                 path=None, subject: bool = True):
        self.option, self.subject = option, subject
        super().__init__(rule, values, flags, path)

    def worded(self, name: Callable[[str], Optional[str]], *, with_subject: bool = True) -> str:
        """The message with each option named ``name(field)``; without the option's own name first where
        ``with_subject`` is False (a caller that names it already: ``row 1 (a), max_pixels: must be ...``)."""
        text = super().worded(name)
        return f"{name(self.option) or self.flag(self.option)} {text}" if self.subject and with_subject else text

    @classmethod
    def of(cls, option: str, e: BadInput) -> "OptionRefused":
        """``e``, a refusal of ``option`` by a check that names it by its flag itself (``check_seed``,
        ``check_tolerance``): its own words, ``option`` carried."""
        return e if isinstance(e, OptionRefused) else cls(option, "{message}", {"message": e.problem},
                                                          path=e.path, subject=False)

    def __reduce__(self):                  # pickled whole (its arguments are not BadInput's)
        return _option_refused, (type(self), self.option, self.rule, self.values, self.flags, self.path,
                                 self.subject)


def _option_refused(cls, option, rule, values, flags, path, subject):
    return cls(option, rule, values, flags, path, subject)


# ------------------------------------------------------------------ the library's arguments
def check_options(value, cls: type, name: str):
    """``value`` if it is a ``cls`` (``LoadOptions``, ``DataOptions``, ``RuntimeOptions``,
    ``FixOptions``) or None, else :class:`BadInput` naming the argument: the one check of an options
    argument of the public functions (a dict there would fail later as an AttributeError)."""
    if value is None or isinstance(value, cls):
        return value
    raise BadInput(f"{name} must be a {cls.__name__} (or None), got {type(value).__name__}")


def model_arg(value, what: str = "the model", *, loaded: bool = True, adopt: bool = True):
    """A model argument of the public functions: an :class:`repair.adapters.Adapter` already loaded
    (where ``loaded``) or a path; else :class:`BadInput` naming ``what``. A loaded model's tensors
    changed in place since it was loaded are registered first (:meth:`Adapter.adopt_changes_in_place`;
    ``adopt=False`` for one a function loaded itself)."""
    from .adapters.base import Adapter
    from .io import as_path

    if isinstance(value, Adapter):
        if loaded:
            if adopt:
                value.adopt_changes_in_place()
            return value
        raise BadInput(f"{what} must be a checkpoint path: a model already loaded cannot be repaired and written "
                       f"back in its own format (give the path it was loaded from, {value.source})")
    return as_path(value, what)


def whole_number(value: Any, what: str, lo: Optional[int] = None, hi: Optional[int] = None,
                 where: Optional[Path] = None) -> int:
    """``value`` as a Python int: a whole number -- a Python or numpy integer (``numbers.Integral``),
    never a bool (nor a float, a string or None) -- from ``lo`` to ``hi`` (either may be None: no bound);
    otherwise :class:`repair.errors.BadInput` "WHAT must be a whole number [from LO to HI | >= LO], got
    VALUE" (``where``: the file it was read from). The one rule of a whole-number parameter (folds,
    ``top_k``, ``--max-verify``, ``--opset``), as :func:`repair.config.check_seed` reads a seed."""
    if not is_whole_number(value, lo, hi):
        bounds = (f" from {lo} to {hi}" if lo is not None and hi is not None else f" >= {lo}" if lo is not None
                  else f" <= {hi}" if hi is not None else "")
        raise BadInput(f"{what} must be a whole number{bounds}, got {value!r}", where)
    return int(value)


def is_whole_number(value: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> bool:
    """Whether ``value`` passes :func:`whole_number` (for a caller that words its own message)."""
    import numbers

    return (not isinstance(value, bool) and isinstance(value, numbers.Integral)
            and (lo is None or value >= lo) and (hi is None or value <= hi))


def check_max_verify(n) -> int:
    """How many samples an ONNX file is verified on (``--max-verify``): a whole number >= 1."""
    return whole_number(n, "--max-verify", 1)


#: the oldest opset torch's current (dynamo) exporter writes; below it torch exports opset 18 and tries a
#: version conversion that often fails (the file then stays at 18): older opsets take the TorchScript exporter
DYNAMO_MIN_OPSET = 18


def check_export_options(opset: Optional[int] = None, exporter: str = "auto",
                         tolerance: Optional[float] = None) -> None:
    """The exporter options, checked before any work: a known exporter that is installed, an
    opset it can write, a positive tolerance."""
    import importlib.util

    if exporter not in EXPORTERS:
        raise BadInput(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    dynamo = importlib.util.find_spec("onnxscript") is not None
    if exporter == "dynamo" and not dynamo:
        raise BadInput("--exporter dynamo needs the onnxscript package (pip install onnxscript); "
                       "or use --exporter torchscript")
    if tolerance is not None:
        check_tolerance(tolerance)
    if opset is None:
        return
    opset = whole_number(opset, "--opset")
    import onnx

    try:
        from torch.onnx import _constants as c
        lo, hi_dynamo, hi_ts = c.ONNX_MIN_OPSET, c.ONNX_MAX_OPSET, c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except (ImportError, AttributeError):
        lo, hi_dynamo, hi_ts = 7, 20, 20
    hi = min(hi_dynamo if dynamo and exporter != "torchscript" else hi_ts, onnx.defs.onnx_opset_version())
    if not lo <= opset <= hi:
        raise BadInput(f"--opset must be from {lo} to {hi} (what the installed exporter writes), got {opset}")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise BadInput(f"--opset {opset}: --exporter dynamo writes opset {DYNAMO_MIN_OPSET} and above; for an older "
                       "opset use --exporter torchscript (or auto)")


# ------------------------------------------------------------------ gates
GATE_METRICS = ("auto", "worst_group", "worst_class", "accuracy")
METRIC_NAMES = {"worst_group": "worst-group accuracy", "worst_class": "worst-class accuracy",
                "accuracy": "accuracy"}
_THRESHOLD_HELP = "must be a fraction from 0 to 1 or a percentage like 80%"


@dataclass(frozen=True)
class Threshold:
    """A gate threshold as the user wrote it (``0.7``, ``70%``) and its exact value."""
    text: str
    value: Fraction

    def __float__(self) -> float:
        return float(self.value)

    def show(self) -> str:
        return _threshold_pct(self.value)


def _show_pct(frac: Fraction) -> str:
    """A fraction as a percentage with as many digits as it needs (70%, 68.33%, 99.995%)."""
    x = 100 * frac
    for digits in (0, 2, 4, 6):
        s = f"{float(x):.{digits}f}"
        if Fraction(s) == x:
            return s + "%"
    return f"{float(x):.2f}%"


def _pct_digits(x: Fraction, digits: int) -> str:
    """``x`` (a percentage, exact) rounded to ``digits`` decimals, exactly (no float on the way)."""
    q = round(x * 10 ** digits)
    sign, q = ("-" if q < 0 else ""), abs(q)
    whole, frac = divmod(q, 10 ** digits)
    return f"{sign}{whole}" + (f".{frac:0{digits}d}" if digits else "")


def _threshold_pct(value: Fraction) -> str:
    """A threshold as a percentage with every digit it has (70%, 71.34%, 12.3456789%), up to 12."""
    x = 100 * Fraction(value)
    for digits in range(13):
        s = _pct_digits(x, digits)
        if Fraction(s) == x:
            return s + "%"
    return _pct_digits(x, 12) + "%"


#: the most decimals a gate's line shows a figure or a threshold with (two exact fractions that differ
#: are told apart well before: a figure is k/n of at most millions of samples)
_MAX_DIGITS = 40


def show_against(figure: Fraction, threshold: Fraction) -> tuple[str, str]:
    """(figure, threshold) as percentages for a gate's line: the threshold with its digits, the figure with
    the digits that keep the two in their true order and tell them apart -- never "66.67% < 66.67%"
    (24/36 against 66.67%) nor "70.00% < 70%" (20999/30000 against 70%). A threshold with more than 12
    decimals is shown with as many as keep it on its true side of the figure (12/36 against
    0.3333333333333334 is "33.33% < 33.33333333333334%", never "< 33.333333333333%", which the figure is
    above). Exact decimal arithmetic throughout. The one home of that rule (the gate's
    message, the zoo's tables)."""
    figure, threshold = Fraction(figure), Fraction(threshold)
    t = _threshold_pct(threshold)
    if figure == threshold or float(figure) == float(threshold):
        return t, t                      # (a threshold that is the figure's own double: met, :func:`judge`)
    above = figure >= threshold
    digits = 12
    tv = Fraction(t[:-1]) / 100
    while ((figure >= tv) != above or figure == tv) and digits < _MAX_DIGITS:
        digits += 1                      # the threshold, rounded, crossed (or met) the figure: more digits
        t = _pct_digits(100 * threshold, digits) + "%"
        tv = Fraction(t[:-1]) / 100
    f = _show_pct(figure)
    digits = 2
    while digits <= _MAX_DIGITS:
        fv = Fraction(f[:-1]) / 100
        if (fv >= tv) == above and fv != tv:
            return f, t
        f = _pct_digits(100 * figure, digits) + "%"
        digits += 1
    return f, t


def parse_threshold(value: Any) -> Threshold:
    """A fraction from 0 to 1 (``0.8``), or a percentage written with its sign (``80%``). A bare
    number above 1 is refused rather than guessed. ``ValueError`` says what is wrong."""
    if isinstance(value, Threshold):
        return value
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{_THRESHOLD_HELP}, got {value!r}")
    s = str(value).strip()
    is_pct = s.endswith("%")
    body = s[:-1].strip() if is_pct else s
    try:
        if "_" in body:                    # Python's numbers take 1_0 as 10: a typo, not a threshold
            raise ValueError
        exp = re.search(r"[eE]([+-]?\d+)$", body)
        if len(body) > 64 or (exp and abs(int(exp.group(1))) > 64):
            # Fraction("1e-100000000") builds a 100-million-digit integer: refused, not computed
            raise ValueError
        x = Fraction(repr(float(body)) if isinstance(value, float) else body)
        if not math.isfinite(float(body)):
            raise ValueError
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"{_THRESHOLD_HELP}, got {value!r}") from None
    if is_pct:
        if not 0 <= x <= 100:
            raise ValueError(f"must be from 0% to 100%, got {s!r}")
        return Threshold(s, x / 100)
    if not 0 <= x <= 1:
        hint = f" (for {s} percent write {s}%)" if 1 < x <= 100 else ""
        raise ValueError(f"{_THRESHOLD_HELP}, got {s}{hint}")
    return Threshold(s, x)


def threshold_option(value: Optional[Any], flag: str) -> Optional[Threshold]:
    """A threshold given on the command line or in a manifest; BadInput naming ``flag``."""
    if value is None:
        return None
    try:
        return parse_threshold(value)
    except ValueError as e:
        raise BadInput(f"{flag} {e}") from None


def _counts(row: dict) -> Optional[tuple[int, int]]:
    """(correct, n) of a figures row (``n_correct`` when given, else from the accuracy, which is
    an exact k/n for any n below 2**24)."""
    n = row.get("n")
    if not n:
        return None
    k = row.get("n_correct")
    if k is None:
        acc = row.get("accuracy")
        if acc is None or not math.isfinite(acc):
            return None
        k = round(acc * n)
    return int(k), int(n)


def gate_metric(figures: dict, metric: str) -> str:
    """``auto``: worst-group accuracy where groups were measured, else worst-class accuracy."""
    if metric not in GATE_METRICS:
        raise BadInput(f"gate metric must be one of {', '.join(GATE_METRICS)}, got {metric!r}")
    if metric == "auto":
        return "worst_group" if figures.get("per_group") else "worst_class"
    return metric


def metric_counts(figures: dict, metric: str) -> tuple[Optional[tuple[int, int]], Optional[str]]:
    """((correct, n), the group or class it is) of ``metric`` in evaluation ``figures``: the
    overall accuracy, or the worst class / group compared as exact fractions."""
    if metric == "accuracy":
        return _counts(figures), None
    rows = figures.get("per_group" if metric == "worst_group" else "per_class") or []
    worst, name = None, None
    for r in rows:
        c = _counts(r)
        if c is None:
            continue
        if worst is None or Fraction(*c) < Fraction(*worst):
            worst, name = c, r.get("name")
    return worst, name


def unmeasured(figures: dict, metric: str, expected: Optional[Sequence[str]] = None) -> list[str]:
    """The groups (``worst_group``) or classes (``worst_class``) that ``figures`` cannot speak for:
    listed without samples (``n`` 0), or, for groups, class x value combinations the evaluation data
    never had (``absent_groups``). With ``expected`` (group names), only those of them, and any not
    listed at all. A worst-* figure over the others says nothing about these."""
    if metric not in ("worst_group", "worst_class"):
        return []
    rows = figures.get("per_group" if metric == "worst_group" else "per_class") or []
    empty = [r.get("name") for r in rows if not r.get("n")]
    if metric == "worst_group":
        empty += [g for g in figures.get("absent_groups") or [] if g not in empty]
    if expected is None:
        return empty
    listed = {r.get("name") for r in rows if r.get("n")}
    return [g for g in expected if g not in listed]


def parse_expected_groups(value: Any, flag: str = "--expect-groups") -> list[str]:
    """Groups a gate requires samples of: ``class|value`` (or ``class|COLUMN=value``), comma-separated
    or a list; BadInput naming ``flag`` for anything else."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    out = [str(g).strip() for g in items or [] if str(g).strip()]
    if not out or not all(g.partition("|")[0] and g.partition("|")[2] for g in out):
        raise BadInput(f"{flag}: give the groups as class|value separated by commas, got {value!r}"
                       + (" (a class or value with a comma in it cannot be written so: give the groups as a list "
                          "in a YAML manifest)" if isinstance(value, str) and "," in value else ""))
    return out


def expected_group_names(figures: dict, group_by: Optional[str], expected: Sequence[str],
                         flag: Optional[str] = None, *, path: Optional[PathLike] = None,
                         column: str = "--group-by") -> list[str]:
    """``expected`` (:func:`parse_expected_groups`) as the figures' group names
    (``class|COLUMN=value``). With ``flag`` (where the groups came from: ``--expect-groups``, a manifest's
    ``row 3 (a), expect_groups``; ``path`` its file), a class the model does not have (where the figures
    list the model's classes) and a group naming another column than ``group_by`` (the option
    ``column``) are BadInput naming it; without, the name stays as given (no group has it: the gate then
    fails naming it)."""
    per_class = figures.get("per_class")
    classes = [c.get("name") for c in per_class or []]
    from .data import checkpoint_class_names

    own = checkpoint_class_names(classes)     # the names a label matches (the figures' add an index to some)
    names = []
    for g in expected:
        if flag is not None:
            _check_expected_column(g, group_by, flag, path, column)
        cls, val = _split_expected(g, group_by, classes)
        from .data import cell_value, label_indices     # read as the data's labels and values are (1.0 is 1)

        if per_class is not None and cls not in classes:
            try:            # the class as a label names it: any case, either Unicode form, 1.0 or its index
                cls = classes[label_indices([cell_value(cls)], own)[0]]
            except BadInput as e:
                if flag is not None:
                    several = " names " in e.problem or " may name " in e.problem
                    raise BadInput(f"{flag}: " + (e.problem.replace("label ", "", 1) if several else  # several classes
                                   f"{cls!r} is not a class of the model ({', '.join(map(str, classes))})"),
                                   path) from None

        names.append(g if group_by is None else f"{cls}|{group_by}={cell_value(val)}")
    return names


def _split_expected(group: str, group_by: Optional[str], classes: Sequence = ()) -> tuple[str, str]:
    """``(class, value)`` of an expected group: ``class|COLUMN=value`` split where the column is named (a
    class or a value may hold ``|``, a value ``=``); ``class|value`` after the longest of ``classes`` it
    starts with (a class named ``land|bird``), else at its first ``|``."""
    if group_by is not None and f"|{group_by}=" in group:
        cls, _, val = group.partition(f"|{group_by}=")
        return cls, val
    known = [c for c in classes if isinstance(c, str) and group.startswith(c + "|")]
    if known:
        cls = max(known, key=len)
        return cls, group[len(cls) + 1:]
    cls, _, val = group.partition("|")
    return cls, val


def _check_expected_column(group: str, group_by: Optional[str], flag: str, path: Optional[PathLike],
                           column: str) -> None:
    if group_by is None or f"|{group_by}=" in group:
        return
    cls, _, val = group.partition("|")
    name, eq, _ = val.partition("=")
    if eq:
        raise BadInput(f"{flag}: {group!r} names the column {name!r}, but the groups are of {column} "
                       f"{group_by!r} (write CLASS|VALUE or CLASS|{group_by}=VALUE; a value with '=' in it, or a "
                       "class with '|' in its name, needs the second)", path)


@dataclass(frozen=True)
class GateNames:
    """How a caller names a gate's options in its messages (the rules are the same for every caller):
    ``expected``, where the expected groups came from (``--expect-groups``; a manifest's ``row 3 (a),
    expect_groups``) and ``path`` the file it is in; ``column``, the option holding the group column;
    ``no_column`` / ``gate`` / ``zero``, what to give when the groups have no column / no gate (and the
    gate that only checks that they have samples); ``hint``, the option a failed worst-group gate on a
    group without samples suggests (None: no hint); ``metric``, where a gate metric chosen apart from its
    threshold came from (a manifest's ``gate_metric``). :meth:`manifest`: a zoo row's fields."""
    expected: str = "--expect-groups"
    column: str = "--group-by"
    no_column: str = "--group-by (groups are class x the values of that column)"
    gate: str = "a gate (--fail-under-wga or --fail-under-acc)"
    zero: str = "--fail-under-acc 0%"
    hint: Optional[str] = "--expect-groups"
    path: Optional[str] = None
    metric: str = "the gate metric"

    @classmethod
    def manifest(cls, where: Optional[str] = None, column: str = "group_by",
                 path: Optional[PathLike] = None) -> "GateNames":
        """A manifest row's names: ``where`` the row (``row 3 (a)``; None: the field alone), ``column`` the
        field holding its group column (``group_by``, or ``eval_group_by`` for its ``eval`` data)."""
        return cls(expected=f"{where}, expect_groups" if where else "expect_groups", column=column,
                   no_column="a group column (group_by or eval_group_by)", gate="a gate", zero="gate: 0%",
                   hint=None, path=None if path is None else str(path),
                   metric=f"{where}, gate_metric" if where else "gate_metric")


CLI_GATE_NAMES = GateNames()


def check_gate_options(thresholds: dict, expected: Any, group_by: Optional[str],
                       names: GateNames = CLI_GATE_NAMES, *, metric: str = "auto") -> Optional[list[str]]:
    """The rules of a gate's options that need no model, checked before any work. ``metric``, a gate
    metric chosen apart from its threshold (a zoo row's ``gate_metric``): one other than ``auto`` needs a
    gate (``thresholds``: metric -> threshold or None), else the row would run ungated -- BadInput naming
    ``names.metric`` (``repair eval``'s thresholds each name their own metric: no such option). The
    expected groups, given (``--expect-groups``, a zoo row's ``expect_groups``), are ``class|value``
    groups, need a group column, a gate (the groups are what a gate requires: a 0% gate checks only that
    they have samples) and name no other column than ``group_by``. Returns them parsed (None: none
    given); BadInput naming ``names.expected`` otherwise."""
    ungated = all(t is None for t in thresholds.values())
    if metric != "auto" and ungated:
        raise BadInput(f"{names.metric}: {metric!r} needs {names.gate}: a gate metric without a threshold "
                       "gates nothing", names.path)
    if expected is None:
        return None
    expected = parse_expected_groups(expected, names.expected)
    if group_by is None:
        raise BadInput(f"{names.expected}: needs {names.no_column}", names.path)
    if ungated:
        raise BadInput(f"{names.expected}: needs {names.gate}: the groups a gate requires ({names.zero} checks "
                       "only that they have samples)", names.path)
    for g in expected:
        _check_expected_column(g, group_by, names.expected, names.path, names.column)
    return expected


class Gates(NamedTuple):
    """What :func:`judge_gates` found: the gates judged (:func:`judge`'s dicts), the problems (each failed
    gate's message: the command fails with exit 1 when there is one) and the expected groups (else every
    group) without samples where the figures list the groups the data lacks (``absent_groups``; else None)."""
    gates: list
    problems: list
    missing: Optional[list]


def judge_gates(figures: Optional[dict], thresholds: dict, expected: Any = None, group_by: Optional[str] = None,
                names: GateNames = CLI_GATE_NAMES) -> Gates:
    """The one home of a command's gates (``repair eval``'s ``--fail-under-*`` and ``--expect-groups``, a zoo
    row's ``gate``, ``gate_metric`` and ``expect_groups``): ``thresholds`` (metric -> threshold, None: no gate
    of it) judged on ``figures`` by :func:`judge`, ``expected`` (the groups that must have samples, of the
    column ``group_by``) first held to :func:`check_gate_options` and to the model's classes: an expected
    group of a class the model lacks, or of another column, is bad input naming ``names.expected``
    (BadInput, exit 2), never a gate that fails. Fails closed as :func:`judge` does."""
    expected = check_gate_options(thresholds, expected, group_by, names)
    figures = figures or {}
    wanted = None if expected is None else expected_group_names(figures, group_by, expected, names.expected,
                                                                path=names.path, column=names.column)
    gates = [g for g in (judge(figures, thr, metric, wanted) for metric, thr in thresholds.items()) if g is not None]
    for g in gates:
        if g["unmeasured"] and g["metric"] == "worst_group" and expected is None and names.hint:
            g["message"] += f" (name the groups to expect with {names.hint})"
    problems = [g["message"] for g in gates if not g["passed"]]
    missing = None if figures.get("absent_groups") is None else unmeasured(figures, "worst_group", wanted)
    return Gates(gates, problems, missing)


def judge(figures: Optional[dict], threshold: Any, metric: str = "auto",
          expected: Optional[Sequence[str]] = None) -> Optional[dict]:
    """The one gate comparison: ``metric`` of ``figures`` (an evaluation) against ``threshold``,
    as exact counts. None when no threshold is set. A model whose figures cannot be computed
    (no samples, non-finite) fails, and so does a worst-group / worst-class gate when a group or
    class has no samples (:func:`unmeasured`), and any gate when one of the ``expected`` groups (the
    groups that must have samples) has none; with ``expected``, a worst-group gate still fails on a class
    of the model with no samples."""
    if threshold is None:
        return None
    thr = parse_threshold(threshold)
    figures = figures or {}
    name = gate_metric(figures, metric)
    counts, where = metric_counts(figures, name)
    label = METRIC_NAMES[name] + (f" ({where})" if where else "")
    missing = unmeasured(figures, name, expected if name == "worst_group" else None)
    # the groups the user requires (--expect-groups, a zoo row's expect_groups) hold whatever the
    # metric: an accuracy or worst-class gate does not vouch for a group the data lacks either
    required = [] if expected is None or name == "worst_group" else [
        g for g in unmeasured(figures, "worst_group", expected) if g not in missing]
    # naming the groups that must be there never waives a class of the model that has no samples
    classes = [] if expected is None or name != "worst_group" else unmeasured(figures, "worst_class")
    if name == "worst_group":
        what = "group(s)" if not classes else "class(es)" if not missing else "group(s) / class(es)"
    else:
        what = "group(s)" if not missing else "class(es)" if not required else "class(es) / expected group(s)"
    missing = missing + classes + required
    if counts is None:
        passed, value = False, None
        message = f"{label} cannot be measured (no samples or non-finite outputs); the gate fails closed"
    elif missing:
        k, n = counts
        passed, value = False, k / n
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        message = (f"{label} {k}/{n} = {_show_pct(Fraction(k, n))}, but {what} {shown} "
                   f"{'has' if len(missing) == 1 else 'have'} no samples, so it cannot speak for "
                   f"{'it' if len(missing) == 1 else 'them'}; the gate fails closed")
    else:
        k, n = counts
        passed, value = Fraction(k, n) >= thr.value, k / n
        sign = ">=" if passed else "<"
        shown_figure, shown_threshold = show_against(Fraction(k, n), thr.value)
        message = f"{label} {k}/{n} = {shown_figure} {sign} {shown_threshold}"
        if not passed and float(Fraction(k, n)) == float(thr.value):
            # the threshold is this very figure as a float (a figure of --json, or of a previous run, fed
            # back as the gate): the double nearest 5/6, 0.8333333333333334, lies just above 5/6 itself.
            # Met -- no count of this data is between the two -- and said so
            passed = True
            message = (f"{label} {k}/{n} = {shown_figure} >= {shown_threshold}: the threshold is this figure "
                       f"written as a float ({float(Fraction(k, n))!r})")
    return {"metric": name, "threshold": float(thr.value), "threshold_text": thr.text, "value": value,
            "correct": None if counts is None else counts[0], "n": None if counts is None else counts[1],
            "where": where, "passed": bool(passed), "message": message, "unmeasured": missing}


__all__ = ["Protected", "Threshold", "install_hint", "artifacts_beside", "artifacts_output", "check_bool", "check_file_suffix", "check_export_options", "check_format", "onnx_only_given", "ONNX_ONLY",
           "check_outputs_distinct", "check_tolerance", "check_writable", "export_output", "model_output_kind", "fix_onnx_output",
           "fix_output", "gate_metric", "judge", "metric_counts", "parse_threshold", "report_outputs",
           "threshold_option", "unmeasured", "parse_expected_groups", "expected_group_names", "GateNames", "Gates",
           "check_gate_options", "judge_gates", "fix_places", "GATE_METRICS", "METRIC_NAMES", "WEIGHT_SUFFIXES", "PICKLE_SUFFIXES"]
