"""onnxruntime sessions for ONNX models: providers (CUDA first when present, TF32 off),
sessions from a path / bytes / ModelProto, feeding collated batches by input name, and
running graphs with a fixed batch size on larger batches."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import BadInput

if TYPE_CHECKING:                   # annotations only: onnx is imported where it runs
    import onnx

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def onnxruntime():
    """The ``onnxruntime`` module, imported here only (one home): its telemetry is off unless the
    user's environment says otherwise (``ORT_DISABLE_TELEMETRY``, set for the first import and taken out
    again, and onnxruntime's own switch; else onnxruntime writes a device id and a database under
    ``~/.cache/Microsoft/DeveloperTools``). ``os.environ`` is left as it was."""
    import os
    import sys

    if "onnxruntime" not in sys.modules and "ORT_DISABLE_TELEMETRY" not in os.environ:
        os.environ["ORT_DISABLE_TELEMETRY"] = "1"        # read when onnxruntime is imported
        try:
            import onnxruntime as ort
        finally:
            os.environ.pop("ORT_DISABLE_TELEMETRY", None)  # the user's environment as it was
        if hasattr(ort, "disable_telemetry_events"):
            ort.disable_telemetry_events()                 # and for the sessions made later
    import onnxruntime as ort

    return ort


def ort_providers(prefer_cuda: bool = True, device: Optional[Union[str, torch.device]] = None) -> list:
    """CPUExecutionProvider, with CUDAExecutionProvider first when onnxruntime has it.
    TF32 is switched off so that GPU results stay comparable to float32 references."""
    ort = onnxruntime()

    providers: list = []
    if prefer_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        opts: dict = {"use_tf32": "0"}
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and dev.index is not None:
            opts["device_id"] = str(dev.index)
        providers.append(("CUDAExecutionProvider", opts))
    providers.append("CPUExecutionProvider")
    return providers


def make_session(model: Union[str, Path, bytes, "onnx.ModelProto"], *, prefer_cuda: bool = True,
                 device=None, where: Optional[Path] = None, threads: Optional[int] = None,
                 optimize: bool = True, spin: bool = True):
    """An onnxruntime session from a path, serialized bytes or a ModelProto. ``threads``:
    intra-op threads (default: onnxruntime's, one per physical core; verification passes
    torch's count so both runtimes get the same CPUs); ``optimize=False`` switches
    onnxruntime's graph optimisations off; ``spin=False``: idle worker threads sleep instead of
    spinning (batch throughput on a busy or small machine: measured faster there)."""
    ort = onnxruntime()

    so = ort.SessionOptions()
    # fatal only: onnxruntime's own ERROR lines (a node failing on the data) would go to stderr beside
    # the one line the failure is reported as (its message is in the exception)
    so.log_severity_level = 4
    if threads is not None and threads > 0:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    providers = ort_providers(prefer_cuda, device)
    try:
        try:
            return ort.InferenceSession(model, sess_options=so, providers=providers)
        except Exception:
            if len(providers) == 1:
                raise
            # a CUDA provider that cannot start (driver, options): CPU still gives an answer
            return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"onnxruntime cannot load this model ({msg})", where) from None


def ort_errors() -> tuple:
    """The exception types onnxruntime raises for a session that fails (``onnxruntime.capi`` pybind state:
    ``Fail``, ``InvalidArgument``, ``RuntimeException``...), as opposed to an error of the code feeding it."""
    import inspect

    onnxruntime()
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(c for c in vars(state).values() if inspect.isclass(c) and issubclass(c, Exception))


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def session_feeds(session, batch: Any, where: Optional[Path] = None) -> dict[str, np.ndarray]:
    """Map a collated batch (one tensor for images, a dict of tensors for text) onto the
    session's inputs by name, cast to the input dtypes. A text model's missing
    ``token_type_ids`` is fed zeros."""
    inputs = session.get_inputs()
    feeds: dict[str, np.ndarray] = {}
    if isinstance(batch, dict):
        for inp in inputs:
            if inp.name in batch:
                arr = _to_numpy(batch[inp.name])
            elif inp.name == "token_type_ids" and "input_ids" in batch:
                arr = np.zeros_like(_to_numpy(batch["input_ids"]))
            else:
                raise BadInput(f"the ONNX model needs input {inp.name!r}, which the preprocessing does "
                               f"not produce (it gives {', '.join(batch)})", where)
            feeds[inp.name] = _to_fixed_length(arr, inp, where)
    else:
        if len(inputs) != 1:
            raise BadInput(f"the ONNX model takes {len(inputs)} inputs "
                           f"({', '.join(i.name for i in inputs)}); an image model must take one", where)
        feeds[inputs[0].name] = _to_numpy(batch)
    for inp in inputs:
        dt = _ORT_TYPES.get(inp.type)
        if dt is not None and feeds[inp.name].dtype != dt:
            feeds[inp.name] = feeds[inp.name].astype(dt)
    return feeds


def _to_fixed_length(arr: np.ndarray, inp, where: Optional[Path]) -> np.ndarray:
    """A text batch padded on the right to a graph's fixed sequence length (zeros: the attention mask
    then hides the added positions, whatever their token ids), so a batch padded to its own longest
    text runs on a graph exported without a dynamic sequence axis. Longer than that length is
    :class:`BadInput`: the graph cannot see those tokens."""
    shape = getattr(inp, "shape", None) or []
    if arr.ndim != 2 or len(shape) != 2 or not isinstance(shape[1], int) or shape[1] <= 0 or arr.shape[1] == shape[1]:
        return arr
    fixed = shape[1]
    if arr.shape[1] > fixed:
        raise BadInput(f"the ONNX model's input {inp.name!r} takes exactly {fixed} tokens, but these texts need "
                       f"{arr.shape[1]}: give texts that fit, or export with a dynamic sequence axis", where)
    return np.pad(arr, ((0, 0), (0, fixed - arr.shape[1])))


def fed_unpadded(inputs) -> bool:
    """Whether a graph with these inputs (``(name, shape)`` pairs) has its texts fed unpadded
    (:func:`run_batch`): it takes ``input_ids`` with a dynamic sequence axis and no ``attention_mask``.
    The one home of that rule (the feeding, and the embedding cache key that says so)."""
    shapes = {n: list(s or []) for n, s in inputs}
    ids = shapes.get("input_ids")
    return (ids is not None and "attention_mask" not in shapes and len(ids) == 2
            and not (isinstance(ids[1], int) and ids[1] > 0))


def run_batch(session, batch: Any, output_names: Optional[Sequence[str]] = None, where: Optional[Path] = None) -> list:
    """A collated batch through ``session`` (:func:`session_feeds`, :func:`run_session`). A text batch for
    a graph that takes no ``attention_mask`` and has a dynamic sequence axis is run text by text length:
    each text unpadded, the texts of one length together -- such a graph reads the padding as tokens, so a
    padded text would give other outputs, and the figures would change with the batch size (a deployment
    feeding one text reads it unpadded). The one home of that rule (embeddings, logits, verification)."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None or not fed_unpadded([(i.name, i.shape) for i in session.get_inputs()]):
        return run_session(session, session_feeds(session, batch, where), output_names)
    m = _to_numpy(mask).astype(bool)
    lengths = m.sum(1)
    if bool((lengths == m.shape[1]).all()):                      # nothing padded in this batch
        return run_session(session, session_feeds(session, batch, where), output_names)
    results = None
    for n_tokens in np.unique(lengths):
        rows = np.flatnonzero(lengths == n_tokens)
        part = {}
        for k, v in batch.items():
            a = _to_numpy(v)
            # the tokens of each text (right or left padding alike: the positions its mask keeps)
            part[k] = (a[rows][m[rows]].reshape(len(rows), int(n_tokens)) if a.shape == m.shape else a[rows])
        outs = run_session(session, session_feeds(session, part, where), output_names)
        if results is None:
            results = [np.empty((len(lengths),) + tuple(o.shape[1:]), dtype=o.dtype) for o in outs]
        for r, o in zip(results, outs):
            r[rows] = o
    return results


def run_session(session, feeds: dict[str, np.ndarray], output_names: Optional[Sequence[str]] = None) -> list:
    """Run, splitting the batch into the graph's fixed batch size when it has one (a last part that
    is short is padded with copies of its last row, whose outputs are dropped: rows do not interact
    at inference)."""
    n = next(iter(feeds.values())).shape[0]
    fixed = None
    for inp in session.get_inputs():
        if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0:
            fixed = inp.shape[0]
    names = list(output_names) if output_names is not None else None
    if fixed is None or fixed == n:
        return session.run(names, feeds)
    parts = []
    for i in range(0, n, fixed):
        m = min(fixed, n - i)
        chunk = {k: v[i:i + m] for k, v in feeds.items()}
        if m < fixed:
            chunk = {k: np.concatenate([c, np.repeat(c[-1:], fixed - m, axis=0)], axis=0) for k, c in chunk.items()}
        parts.append([o[:m] for o in session.run(names, chunk)])
    return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(parts[0]))]
