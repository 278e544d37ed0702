"""repair: post-hoc repair of classifiers that lean on spurious correlations.

The public verbs (imported lazily, so ``import repair`` stays cheap)::

    import repair
    model = repair.load_model("model/")                       # an Adapter (timm, transformers, torch, ONNX)
    report = repair.evaluate("model/", "test/", group_by="place", exclude="val/")   # repair-set samples left out
    probe = repair.probe("model/", "val/")
    result = repair.fix("model/", "val/", out="model-repaired/", recipe="auto")
    repair.export_model("model-repaired/", "model.onnx", data="val/")   # export + verify, all or nothing
    repair.verify_model("model.onnx", "model-repaired/", "val/")
    repair.list_methods()

Registration of new pieces: :func:`repair.methods.register_method` (head repairs),
:func:`repair.methods.register_model_repair` (model repairs),
:func:`repair.adapters.register_family` (model families).
"""
from __future__ import annotations

from ._version import __version__

_LAZY = {
    "load_model": ("repair.adapters", "load_model"),
    "list_methods": ("repair.methods", "list_methods"),
    "export_onnx": ("repair.export", "export_onnx"),
    "export_model": ("repair.outputs", "export_model"),
    "verify_model": ("repair.outputs", "verify_model"),
}


def evaluate(model, data, *, group_by=None, exclude=None, load_options=None, data_options=None,
             runtime=None) -> dict:
    """Accuracy, per-class and per-group accuracy of ``model`` on ``data`` (paths).

    ``exclude`` (a path, or data already read; as ``repair eval --exclude``): samples of ``data``
    that are also in it (the same image bytes or pixels, the same text or tokens) are left out of the
    figures -- give the repair set a model was repaired on, so that its figure on held-out data never
    counts a sample the repair fitted on. A group left without samples is absent (``absent_groups``;
    a worst-group gate fails closed on it); data that is all such samples is a BadInput."""
    from .api import evaluate_model

    return evaluate_model(model, data, load_options, _data_options("repair.evaluate", group_by, data_options), runtime,
                          exclude=exclude)


def probe(model, data, *, top_k: int = 10, load_options=None, data_options=None, runtime=None) -> dict:
    """Label-free probing of ``model``'s embeddings on ``data`` (paths)."""
    from .api import probe_model

    return probe_model(model, data, load_options, data_options, runtime, top_k=top_k)


def fix(model, data, out=None, *, recipe: str = "auto", seed: int = 0, group_by=None, eval_data=None,
        options=None, load_options=None, data_options=None, runtime=None, log=None):
    """Repair ``model`` from the repair set ``data`` and write it to ``out`` (see :mod:`repair.pipeline`).
    Returns a :class:`repair.pipeline.FixResult` (read it like the JSON document: ``result["after"]``;
    ``result.adapter`` is the repaired model in memory)."""
    from .pipeline import FixOptions, fix_model
    from .rules import check_options

    options = check_options(options, FixOptions, "options")
    opts = _data_options("repair.fix", group_by, data_options)
    given = {"recipe": recipe, "seed": seed, "eval_data": eval_data}     # a RepairData passes through as it is
    if options is None:
        o = FixOptions(**given)
    else:
        _no_clash("repair.fix", given, options, "options", FixOptions)
        o = options
    kw = {} if log is None else {"log": log}
    return fix_model(model, data, out, load_opts=load_options, data_opts=opts, runtime=runtime, options=o, **kw)


def _same(a, b) -> bool:
    """Whether an argument and an options field say the same: a path given as a str in one place and a
    Path in the other is one path; data already read (a RepairData) is the same only as itself."""
    import os

    def norm(v):
        return os.fspath(v) if isinstance(v, (str, os.PathLike)) else v

    a, b = norm(a), norm(b)
    scalars = (str, int, float, type(None))
    return a == b if isinstance(a, scalars) and isinstance(b, scalars) else a is b


def _no_clash(verb: str, given: dict, options, name: str, cls) -> None:
    """An argument beside an options object that has the same field (``recipe`` / ``seed`` / ``eval_data``
    and ``options``, ``group_by`` and ``data_options``) is never dropped silently, nor does it silently
    override the options: one not at its default must say what the options say, else :class:`BadInput`
    naming both values. The one home of that rule for every verb here."""
    import dataclasses

    from .errors import BadInput

    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    clash = [k for k, v in given.items() if not _same(v, defaults[k]) and not _same(v, getattr(options, k))]
    if clash:
        said = "; ".join(f"{k}={_shown(given[k])} but {name}.{k}={_shown(getattr(options, k))}" for k in clash)
        raise BadInput(f"{verb}: {', '.join(clash)} given both as an argument and in {name} ({cls.__name__}) with "
                       f"other values ({said}); give it in one place")


def _shown(v) -> str:
    from .data import RepairData

    return f"RepairData({v.source})" if isinstance(v, RepairData) else repr(v)


def _data_options(verb: str, group_by, data_options):
    """``data_options`` with the ``group_by`` argument in it (:func:`_no_clash`'s rule where both are given)."""
    import dataclasses

    from .data import DataOptions
    from .rules import check_options

    opts = check_options(data_options, DataOptions, "data_options")
    if opts is not None:
        _no_clash(verb, {"group_by": group_by}, opts, "data_options", DataOptions)
        return opts if group_by is None else dataclasses.replace(opts, group_by=group_by)
    return DataOptions(group_by=group_by)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'repair' has no attribute {name!r}")


__all__ = ["load_model", "evaluate", "probe", "fix", "export_model", "verify_model", "export_onnx", "list_methods",
           "__version__"]
