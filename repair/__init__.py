"""repair: post-hoc repair of classifiers that lean on spurious correlations.

The public verbs (imported lazily, so ``import repair`` stays cheap)::

    import repair
    model = repair.load_model("model/")                       # an Adapter (timm, transformers, torch, ONNX)
    report = repair.evaluate("model/", "test/", group_by="place")
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


def evaluate(model, data, *, group_by=None, load_options=None, data_options=None, runtime=None) -> dict:
    """Accuracy, per-class and per-group accuracy of ``model`` on ``data`` (paths)."""
    import dataclasses

    from .api import evaluate_model
    from .data import DataOptions

    from .rules import check_options

    opts = check_options(data_options, DataOptions, "data_options") or DataOptions()
    if group_by is not None:
        opts = dataclasses.replace(opts, group_by=group_by)
    return evaluate_model(model, data, load_options, opts, runtime)


def probe(model, data, *, top_k: int = 10, load_options=None, data_options=None, runtime=None) -> dict:
    """Label-free probing of ``model``'s embeddings on ``data`` (paths)."""
    from .api import probe_model

    return probe_model(model, data, load_options, data_options, runtime, top_k=top_k)


def fix(model, data, out=None, *, recipe: str = "auto", seed: int = 0, group_by=None, eval_data=None,
        options=None, load_options=None, data_options=None, runtime=None, log=None):
    """Repair ``model`` from the repair set ``data`` and write it to ``out`` (see :mod:`repair.pipeline`).
    Returns a :class:`repair.pipeline.FixResult` (read it like the JSON document: ``result["after"]``;
    ``result.adapter`` is the repaired model in memory)."""
    import dataclasses

    from .data import DataOptions
    from .pipeline import FixOptions, fix_model

    from .rules import check_options

    options = check_options(options, FixOptions, "options")
    given = {"recipe": recipe, "seed": seed, "eval_data": None if eval_data is None else str(eval_data)}
    if options is None:
        o = FixOptions(**given)
    else:                       # an argument that says otherwise than ``options`` is never dropped silently
        from .errors import BadInput

        defaults = {"recipe": "auto", "seed": 0, "eval_data": None}
        def same(k, v):          # a path given as a str in one place and a Path in the other is one path
            have = getattr(options, k)
            return v == (str(have) if k == "eval_data" and have is not None else have)

        clash = [k for k, v in given.items() if v != defaults[k] and not same(k, v)]
        if clash:
            raise BadInput(f"repair.fix: {', '.join(clash)} given both as an argument and in options "
                           f"(FixOptions) with other values; give it in one place")
        o = options
    from .rules import check_options as checked

    opts = checked(data_options, DataOptions, "data_options") or DataOptions()
    if group_by is not None:
        opts = dataclasses.replace(opts, group_by=group_by)
    kw = {} if log is None else {"log": log}
    return fix_model(model, data, out, load_opts=load_options, data_opts=opts, runtime=runtime, options=o, **kw)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'repair' has no attribute {name!r}")


__all__ = ["load_model", "evaluate", "probe", "fix", "export_model", "verify_model", "export_onnx", "list_methods",
           "__version__"]
