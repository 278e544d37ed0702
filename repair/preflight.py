"""What every command checks before it loads a model: every input it was given can be read (each
read once; the command goes on with what was read) and, for commands that write, every output
can be written and replaces no input. Each problem is a :class:`repair.errors.BadInput` (exit 2)
naming the file or option, raised before any work. Nothing here imports torch, so a command that
fails on its arguments returns at once.

The rules themselves (output names, the protected set, writability) live in :mod:`repair.rules`;
this module gathers a command's paths and applies them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .data import DataOptions, RepairData, load_data
from .errors import BadInput
from .rules import Protected, _norm


@dataclass
class Inputs:
    """What a command read before loading the model: the repair (or evaluation) data, the
    separate ``--eval`` data, the model-repair inputs (``resources``: name -> value as given, data
    resources read), and every path read (``protected``)."""
    model: Path
    data: RepairData
    eval_data: Optional[RepairData] = None
    eval_overlap: list = field(default_factory=list)   # per --eval sample: is it also in the repair data
    resources: dict = field(default_factory=dict)
    protected: Protected = field(default_factory=Protected)


def check_model_path(model_path, load_opts=None) -> Path:
    """The model path exists, and, with ``load_opts`` (the run's loading options), a folder is one a
    model family reads (its config only: nothing built) -- checked before any work, so a folder that
    is no model is told so, not refused for a cache or an output placed under it."""
    p = Path(model_path)
    if not p.exists() and not p.is_symlink():
        raise BadInput("model not found", p)
    if not p.exists():
        raise BadInput("model not found (a broken symbolic link)", p)
    if load_opts is not None and p.is_dir():
        from .adapters import family_for, not_a_model

        if family_for(p.absolute(), load_opts) is None:
            raise not_a_model(p)
    return p


def read_data(data, options: Optional[DataOptions] = None) -> RepairData:
    """``data``: a path, or the :class:`RepairData` already read (returned as it is)."""
    return data if isinstance(data, RepairData) else load_data(data, options)


def read_inputs(model_path, data, data_opts: Optional[DataOptions] = None, *, eval_data=None,
                eval_group_by: Optional[str] = None, resources: Optional[dict] = None,
                data_flag: str = "repair data (--data)", load_opts=None) -> Inputs:
    """The model path exists (a folder one a family reads, given ``load_opts``); the data, ``--eval``
    data and the model-repair inputs read (in the command line's order). Data already read (a
    :class:`RepairData`) is not read again."""
    data_opts = data_opts or DataOptions()
    model = check_model_path(model_path, load_opts)
    d = read_data(data, data_opts)
    inp = Inputs(model=model, data=d)
    inp.protected.add(model, "input model").add_data(d, data_flag)
    if eval_data is not None:
        gb = eval_group_by if eval_group_by is not None else data_opts.group_by
        inp.eval_data = read_data(eval_data, dataclasses.replace(data_opts, group_by=gb))
        inp.protected.add_data(inp.eval_data, "evaluation data (--eval)")
        inp.eval_overlap = eval_overlap(d, inp.eval_data, eval_data)
    for name, value in (resources or {}).items():
        if value is None:
            continue
        res = declared_resource(name)
        flag = res.flag
        v = res.check(value, flag)
        if res.kind == "data":
            v = read_data(value, dataclasses.replace(data_opts, group_by=None))
            inp.protected.add_data(v, f"{flag} data")
        elif res.kind in ("file", "folder"):
            inp.protected.add(value, f"{flag} input")
        inp.resources[name] = v
    for name, v in inp.resources.items():      # once every input is read: a check may need another (--train)
        res = declared_resource(name)
        if res.kind in ("file", "folder") and res.validate_data is not None:
            res.check_data(v, d, inp.resources)
    return inp


def eval_overlap(data: RepairData, eval_data: RepairData, where: Any = None, *,
                 exclude_flag: Optional[str] = None, eval_flag: str = "--eval", data_flag: str = "--data") -> list[bool]:
    """Per ``eval_data`` sample, whether an identical sample (same image bytes, same text) is in the
    repair ``data``. Figures must be measured on data the repair never touched: an evaluation set
    that is the repair data (the same path, or every sample a copy) is a BadInput naming it; the
    samples of a partial overlap are left out of the figures by the caller. ``exclude_flag``: the
    option that named ``data`` when it is not ``--data`` (``repair eval --exclude``); ``eval_flag`` /
    ``data_flag``: how the refusal names the two (a zoo manifest's ``eval`` / ``data`` fields)."""
    where_of = lambda d: Path(str(d.where)).resolve()          # noqa: E731  (a table, else the folder)
    same = where_of(data) == where_of(eval_data)
    seen = set(data.content_hashes())
    overlap = [h in seen for h in eval_data.content_hashes()]
    refuse_full_overlap(overlap, eval_data, where, exclude_flag=exclude_flag, same=same, eval_flag=eval_flag,
                        data_flag=data_flag)
    return overlap


def refuse_full_overlap(overlap: list[bool], eval_data: RepairData, where: Any = None, *,
                        exclude_flag: Optional[str] = None, same: bool = False, how: str = "",
                        eval_flag: str = "--eval", data_flag: str = "--data") -> None:
    """:class:`BadInput` when every sample of ``eval_data`` is also in the repair data (``overlap`` all
    true, or ``same`` data), see :func:`eval_overlap`; ``how`` says how they were found the same."""
    if not (same or (overlap and all(overlap))):
        return
    place = where if isinstance(where, (str, Path)) else eval_data.where
    if exclude_flag is not None:
        raise BadInput(f"every sample of the data is also in {exclude_flag}{how}" + (" (the same data)" if same else "")
                       + ": nothing would be left to measure", place)
    raise BadInput(f"the evaluation data ({eval_flag}) is the repair data itself" + ("" if same else
                   f" (every sample is also in {data_flag}{how})") + ": figures measured on it would not be on data "
                   f"the repair never touched; give data kept apart, or leave {eval_flag} out to measure on a "
                   "held-out part of the repair set", place)


def check_cache_dir(protected: Protected, runtime, outputs: Optional[Mapping[str, Path]] = None) -> None:
    """The embedding cache (``--cache-dir``, ``$REPAIR_CACHE_DIR`` or the default) is written to: it
    must not lie inside an input read as a whole (a model folder: the next repair would copy the cache
    into its output) nor replace one, nor be or lie inside one of the run's ``outputs`` (flag -> path:
    the output would exist before it is written, and hold the cache). BadInput naming it; nothing to
    check with the cache off."""
    if runtime is None or not getattr(runtime, "use_cache", True):
        return
    from .embeddings import default_cache_dir

    import os

    if runtime.cache_dir:
        folder, name, advice = Path(runtime.cache_dir), "--cache-dir", "choose another --cache-dir"
    elif os.environ.get("REPAIR_CACHE_DIR"):
        folder, name = default_cache_dir(), "the cache folder of $REPAIR_CACHE_DIR"
        advice = "set $REPAIR_CACHE_DIR elsewhere or give --cache-dir"
    else:
        folder, name, advice = default_cache_dir(), "the default cache folder", "give --cache-dir elsewhere"
    try:                                  # a folder through a loop of links: named as the user gave it
        _norm(folder)
    except BadInput as e:
        raise BadInput(f"{name} {e.problem}; {advice}", folder) from None
    # an entry written in it is what must not touch an input; the message names the folder the user gave
    reason = protected.why(folder / "entry.safetensors", name)
    if reason:
        raise BadInput(f"{reason}; {advice}", folder)
    where = folder.resolve()
    for ckpt, what in protected.checkpoint_folders.items():
        if where == ckpt or ckpt in where.parents:
            raise BadInput(f"{name} is inside the checkpoint folder of the {what} ({ckpt}): the next repair of "
                           f"that folder would copy the cache into its output; {advice}", folder)
    for flag, out in (outputs or {}).items():
        out = Path(out).resolve()
        if where == out or out in where.parents:
            raise BadInput(f"{name} is {'the' if where == out else 'inside the'} output of {flag} ({out}): "
                           f"the cache would be written into it; {advice}", folder)


# ------------------------------------------------------------------ model-repair inputs
def declared_resources() -> list:
    """Every model-repair input the registered model repairs declare (name, kind, help):
    :func:`repair.registry.model_resources`."""
    from .registry import model_resources

    return list(model_resources())


def declared_resource(name: str):
    found = {r.name: r for r in declared_resources()}
    if name not in found:
        raise BadInput(f"unknown model-repair input {name!r} (known: {', '.join(sorted(found))})")
    return found[name]


# ------------------------------------------------------------------ outputs of fix
def fix_outputs(model_path, out: Optional[Any], o, inputs: Inputs,
                log: Optional[Callable[[str], None]] = None, model_repairs: bool = False) -> dict[str, Path]:
    """``repair fix``'s outputs (option -> final path): named by the rules, apart from each other,
    replacing no input, writable. ``o``: the :class:`repair.pipeline.FixOptions`; ``model_repairs``:
    the recipe has a model repair, whose files go beside a file output, so that folder is checked before any
    work too (:func:`repair.rules.fix_places`, the rule a zoo row's places follow as well)."""
    from .rules import (check_outputs_distinct, check_writable, fix_output, fix_places, model_output_kind,
                        report_outputs)

    out = fix_output(model_path, out)
    # each output with what it is: with --force a folder is replaced only by a folder output, and only
    # when it is empty or one repair wrote; a file only by a file output (repair.io.replace_refused)
    places = fix_places(model_path, out, o.export, bool(model_repairs))     # the one rule of a fix's places
    paths: dict[str, Path] = {"--out": places["output"]}
    kinds: dict[str, str] = {"--out": model_output_kind(model_path)}
    if "onnx" in places:
        paths["--export onnx"], kinds["--export onnx"] = places["onnx"], "file"
    if "artifacts" in places:
        flag = "--out (its -artifacts folder)"
        paths[flag], kinds[flag] = places["artifacts"], "folder"
    if o.report is not None:
        paths["--report"], paths["--report (JSON)"] = report_outputs(o.report)
        kinds["--report"] = kinds["--report (JSON)"] = "file"
    check_outputs_distinct(paths)
    for flag, p in paths.items():
        inputs.protected.check(p, flag.split(" (")[0])
    for flag, p in paths.items():
        # every output that exists needs --force, the report and the JSON beside it too (that JSON
        # is a name the user did not type: replacing a file of theirs unasked is data loss)
        check_writable(p, force=o.force, log=log, flag=flag.split(" (")[0], kind=kinds[flag])
    return paths


__all__ = ["Inputs", "check_cache_dir", "check_model_path", "declared_resource", "declared_resources", "eval_overlap", "fix_outputs",
           "read_data",
           "read_inputs"]
