"""What ``repair fix`` checks before it loads the model: every input it was given can be read
and every output can be written. Each problem is a :class:`repair.errors.BadInput` (exit 2)
naming the file or option, raised before any work."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

from .data import DataOptions, RepairData, load_data
from .errors import BadInput
from .io import PICKLE_SUFFIXES, check_output

#: the model-repair inputs that are paths: option -> what it must be
RESOURCE_PATHS = {"masks": "folder", "segmenter": "folder", "generator_model": "folder", "prompts": "file"}
#: names a folder output must not end in: they say "one weights file"
FILE_SUFFIXES = {".onnx", ".safetensors", *PICKLE_SUFFIXES}


def output_suffix(model_path: Path) -> Optional[str]:
    """The suffix an output of ``model_path`` must have (None: a folder, any name)."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return None
    return ".onnx" if model_path.suffix.lower() == ".onnx" else ".safetensors"


def check_not_an_input(out_path: Path, inputs: dict) -> None:
    """The output is none of the inputs and no folder holding one (``inputs``: what the user
    calls it, e.g. ``--data`` -> path): writing it, with ``--force`` too, must never replace an
    input."""
    out = Path(out_path).resolve()
    for what, p in inputs.items():
        if p is None:
            continue
        p = Path(p).resolve()
        if out == p:
            raise BadInput(f"output would overwrite the {what}; choose another --out", out_path)
        if out in p.parents:
            raise BadInput(f"output would replace a folder that holds the {what} ({p}); choose another --out",
                           out_path)


def check_fix_inputs(model_path, data_path, out_path: Path, o, data_opts: DataOptions,
                     log: Optional[Callable[[str], None]] = None) -> RepairData:
    """``o``: the :class:`repair.pipeline.FixOptions`. The order is the command line's: model,
    data, the other inputs, then the outputs (which are probed by creating a file there).
    Returns the repair data as read (the pipeline goes on with it instead of reading it again)."""
    from .export import check_tolerance

    model_path, out_path = Path(model_path), Path(out_path)
    if not model_path.exists():
        raise BadInput("model not found", model_path)
    data = load_data(data_path, data_opts)
    if o.eval_data is not None:
        gb = o.eval_group_by if o.eval_group_by is not None else data_opts.group_by
        load_data(o.eval_data, dataclasses.replace(data_opts, group_by=gb))
    if o.train_data is not None:
        load_data(o.train_data, dataclasses.replace(data_opts, group_by=None))
    for key, kind in RESOURCE_PATHS.items():
        value = getattr(o, key)
        if value is None:
            continue
        p = Path(value)
        flag = "--" + key.replace("_", "-")
        if not p.exists():
            raise BadInput(f"{flag}: not found", p)
        if (kind == "folder") != p.is_dir() or (kind == "file" and not p.is_file()):
            raise BadInput(f"{flag} must be a {kind}", p)
    if o.tolerance is not None:
        check_tolerance(o.tolerance)
    inputs = {"input model": model_path, "repair data (--data)": data_path, "evaluation data (--eval)": o.eval_data,
              "training data (--train)": o.train_data,
              **{f"--{k.replace('_', '-')} input": getattr(o, k) for k in RESOURCE_PATHS}}
    check_not_an_input(out_path, inputs)
    want = output_suffix(model_path)
    if want is not None and out_path.suffix.lower() != want:
        raise BadInput(f"the output of a {model_path.suffix or 'weights'} file is one {want} file; "
                       f"name it *{want}", out_path)
    if want is None and out_path.suffix.lower() in FILE_SUFFIXES:
        raise BadInput(f"the output of a checkpoint folder is a folder; a name ending in {out_path.suffix} "
                       "would be taken for a weights file", out_path)
    check_output(out_path, force=o.force, log=log)
    if o.export == "onnx" and want == ".safetensors":        # the ONNX file goes beside the output
        check_not_an_input(out_path.with_suffix(".onnx"), inputs)
        check_output(out_path.with_suffix(".onnx"), force=o.force, log=log)
    return data
