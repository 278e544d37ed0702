"""Export a (repaired) model and prove the export computes the same thing.

``export_onnx`` writes an ONNX file with a dynamic batch axis (and sequence
axis for text), provenance in ``metadata_props``, and verifies it with
onnxruntime against the in-memory PyTorch model on real samples of the
user's data *before* the file is moved into place; a failed check raises
``GateFailed`` (exit 1) and leaves no file behind.

Verification rule (shared by ``export_onnx`` and ``verify_onnx``, one home:
``run_verification``):

* the file's outputs include the logits output (``logits`` when present,
  else the only output; an export must have exactly ``["logits"]``), and its
  shape per batch equals the reference's ``(batch, classes)``;
* every logit of every verified sample is within the bound (``Bound``)::

      |onnx[i, k] - ref[i, k]| <= atol + rtol * max(|ref[i, k] - b_k|, |ref[i, top_i] - b_top_i|)
                                  + ROUNDING * max(|ref[i, k]|, |ref[i, top_i]|)

  with ``b`` the reference head's bias (an error of the network follows what the head computes from the
  embedding; the bias, added last, only brings float32's rounding of its magnitude: a bias of 1e4 on
  every class must not allow every logit a difference of 10), and, for a reference without a head to
  name, ``atol + rtol * max(|ref[i, k]|, |ref[i, top_i]|)``,

  with ``top_i`` the reference's top class: like ``numpy.allclose``, except
  that the relative part is at least the sample's top logit: float rounding in
  a network's output is of the order of the activations that feed it, so a
  logit near zero next to a large top logit carries the same absolute error as
  it does. Not the sample's largest |logit|: a class switched off by a huge
  negative bias (-1e4) would then allow every other logit of the sample a
  difference of 10, and a head shifted by 6 would pass. Default (any modality): ``atol = 1e-5, rtol = 1e-3`` (``DEFAULT_BOUND``).
  ``tests/test_onnx_bounds.py`` provokes the largest difference it can between
  runtimes (onnxruntime graph optimisations on/off, 1 vs 2 threads, batch
  sizes 1/3/16, padded sequence lengths, the TorchScript and the dynamo
  exporter) and asserts the default is at least 10x that, and that a head
  weight scaled by 1.01 or a bias nudged by 1% of the logit scale fails it.
  A user's ``--tolerance X`` keeps its documented meaning, an absolute bound
  on the max |diff| (``atol = X, rtol = 0``);
* argmax agrees on every verified sample, except near-ties: samples where the
  reference's top class and the ONNX top class are within the sum of their two
  logits' tie bounds in the reference logits (``Bound.tie_allowed``: the
  relative part taken from the top logit's height over the sample's median
  logit, plus float32 rounding of the logits' magnitude, so that a common offset
  of every logit -- which changes no prediction but inflates the bound -- widens
  no tie). A flip outside that fails the file even when every logit is within
  the bound;
* batches have a size different from the export's example batch (2), so a
  graph that silently baked in the example's batch size fails; text is
  verified on real lengths: the samples sorted by token count, each batch
  padded to its own longest text (which also makes verification cost about
  one forward pass of each runtime);
* for an ONNX source model additionally: ``embedding @ W.T + b`` computed from
  the original graph's embeddings and the new head equals the written file's
  logits within the same bound.

The report says which bound applied: ``bound`` holds ``atol``, ``rtol``, its
``source`` (default or ``--tolerance``), the worst logit (``worst``: sample,
class, |diff|, allowed) and ``ratio`` (its |diff| / allowed; the check passes
at <= 1). ``tolerance`` is the largest |diff| the bound allowed on any
verified logit (so ``max_abs_diff <= tolerance`` whenever it passed).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .adapters.base import Adapter
from .errors import BadInput, GateFailed, RepairError
from .io import atomic_output
from .rules import DYNAMO_MIN_OPSET, EXPORTERS, check_export_options, check_tolerance  # noqa: F401  (the one home of these checks)

EXPORT_BATCH = 2          # example batch size the exporter traces with
VERIFY_BATCH = 32         # verification batch size (never EXPORT_BATCH)


#: float32 rounding of a logit's magnitude (about 84 x its machine epsilon) in a near-tie's bound
ROUNDING = 1e-5

@dataclass(frozen=True)
class Bound:
    """How far an ONNX logit may be from the reference's: ``atol + rtol * s`` with ``s`` the larger
    of the logit's |reference| and the sample's top reference logit's (see the module docstring for
    why and how chosen). ``rounding``: the relative rounding of a logit's whole magnitude (bias included)
    the computation may add -- float32's (:data:`ROUNDING`), or a float16 head's."""
    atol: float
    rtol: float
    source: str
    rounding: float = ROUNDING

    def allowed(self, ref: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The largest |diff| each logit of ``ref`` (N, C) may have, (N, C). ``bias`` (C,): the head's
        bias, when the reference has one: a network's error in a logit follows what the head computes from
        the embedding (``ref - bias``), not the bias added at the end, which only adds float32's rounding of
        its magnitude (``rounding``). Without it a bias of 1e4 on every class (which changes no
        prediction) allowed every logit a difference of 10, and a file with a 40x sharper softmax passed."""
        if not ref.numel():
            return ref.new_full(ref.shape, self.atol)
        if bias is None or not self.rtol:
            top = ref.gather(1, ref.argmax(1, keepdim=True)).abs()
            return self.atol + self.rtol * torch.maximum(ref.abs(), top)
        at = ref.argmax(1, keepdim=True)
        lin = ref - bias.reshape(1, -1).to(ref.dtype)
        scale = torch.maximum(lin.abs(), lin.gather(1, at).abs())
        magnitude = torch.maximum(ref.abs(), ref.gather(1, at).abs())
        return self.atol + self.rtol * scale + self.rounding * magnitude

    def tie_allowed(self, ref: torch.Tensor) -> torch.Tensor:
        """The |diff| of each logit of ``ref`` (N, C) that may flip a near-tie: the bound's relative part
        taken from the top logit's height over the sample's median logit, not from its magnitude, plus
        float32's rounding of that magnitude (:data:`ROUNDING`). A common offset of every logit (which
        changes no prediction) then widens no tie: a file whose classes are swapped does not pass as
        near-ties behind logits of 20,000."""
        if not ref.numel():
            return ref.new_full(ref.shape, self.atol)
        top = ref.gather(1, ref.argmax(1, keepdim=True))
        height = (top - ref.median(1, keepdim=True).values).abs()
        rounding = self.rounding * torch.maximum(ref.abs(), top.abs()) if self.rtol else 0.0
        # (N, C) as allowed() is: an absolute bound (rtol 0) leaves the height's (N, 1) shape alone
        return torch.broadcast_to(self.atol + self.rtol * height + rounding, ref.shape)

    def describe(self) -> dict:
        if not self.rtol:           # an absolute bound (--tolerance): no relative or rounding term applies
            return {"rule": "|onnx - reference| <= atol per logit", "atol": self.atol, "rtol": 0.0, "rounding": 0.0,
                    "source": self.source}
        return {"rule": "|onnx - reference| <= atol + rtol * max(|reference_k - bias_k|, |reference_top - bias_top|) "
                        "+ rounding * max(|reference_k|, |reference_top|) per logit (bias: the reference head's; "
                        "without one, atol + rtol * max(|reference_k|, |reference_top|))",
                "atol": self.atol, "rtol": self.rtol, "rounding": self.rounding, "source": self.source}


#: the relative part of the head check's bound for a graph whose head computes in float16 (its
#: epsilon is ~1e-3: the file's own rounding of a logit is of the order of the default bound)
HALF_RTOL = 1e-2


def head_check_bound(bound: Bound, reference) -> Bound:
    """The bound of the head check (``embeddings @ W.T + b``, computed in float32, against the file's
    logits): ``bound``, or for a float16 head (:attr:`OnnxAdapter.head_dtype`) its relative part widened
    to :data:`HALF_RTOL`, which float16's own rounding needs (a user's absolute ``--tolerance`` stays)."""
    import numpy as np

    dtype = getattr(reference, "head_dtype", None)
    if dtype is None or np.dtype(dtype) != np.float16 or not bound.rtol:
        return bound
    return Bound(atol=bound.atol, rtol=max(bound.rtol, HALF_RTOL), source=f"{bound.source}, float16 head",
                 rounding=max(bound.rounding, HALF_RTOL))     # float16 rounds the whole logit, bias included


#: the default bound, any modality. ``tests/test_onnx_bounds.py`` measures the margin: the largest
#: difference it provokes is ~1e-6 of the logit scale (|diff|/allowed <= 0.002 on the tests'
#: models; a real ImageNet MobileNetV2 gave 1.1e-5 at logits ~7, 1.6e-6 of the scale), so the
#: bound leaves hundreds of times that for CPUs, GPUs and kernels not measured here, while a 1%
#: change of the head (weight x 1.01, bias + 1% of the scale) is ~10x above it. ``atol`` covers
#: samples whose logits are all near zero.
DEFAULT_BOUND = Bound(atol=1e-5, rtol=1e-3, source="default")


def resolve_bound(tolerance: Optional[float] = None) -> Bound:
    """``--tolerance X`` (an absolute bound on max |diff|: ``atol = X, rtol = 0``) or the default."""
    if tolerance is None:
        return DEFAULT_BOUND
    return Bound(atol=check_tolerance(tolerance), rtol=0.0, source="--tolerance (absolute max |diff|)")


def _log(progress: Optional[Callable[[str], None]], msg: str) -> None:
    if progress is not None:
        progress(msg)


#: torch's exporters hold process-wide state (``GLOBALS.in_onnx_export``): two exports at once in one
#: process (a service's threads) failed; they take turns
_EXPORT_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stdout():
    """Exporters print and warn; keep stdout for results (``--json``): Python's prints go to stderr, and
    what torch's C++ side writes on the stdout descriptor is dropped (:func:`_stdout_descriptor_dropped`)."""
    from .errors import no_warnings, to_stderr

    with no_warnings(), to_stderr(), _stdout_descriptor_dropped():
        yield


def _c_flush() -> None:
    """``fflush(NULL)``: what the C library holds for any stream, written to its descriptor now."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass


@contextlib.contextmanager
def _stdout_descriptor_dropped():
    """File descriptor 1 pointed at the null device for the block: the TorchScript exporter dumps the
    whole graph there on a failure ("Torch IR graph at exception", from C++, past ``sys.stdout``, whatever
    its log setting), into the results on stdout. Only the main thread swaps the process's descriptor."""
    import os
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        if sys.__stdout__ is not None:
            sys.__stdout__.flush()
        _c_flush()
        saved = os.dup(1)
    except (OSError, ValueError):          # no descriptor 1 (a closed stdout)
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
        finally:
            os.close(null)
        yield
    finally:
        _c_flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _no_tf32():
    """fp32 references on GPU: cuDNN convolutions default to TF32 (1e-3 level errors)."""
    cudnn = torch.backends.cudnn.allow_tf32
    mm = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = mm


# ------------------------------------------------------------------ torch -> ONNX
class _TextLogits(nn.Module):
    """Positional inputs in a fixed order -> ``model(**named).logits``."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)))
        return out.logits if hasattr(out, "logits") else out[0]


class _ImageLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits if hasattr(out, "logits") else out[0]


def _example_batch(adapter: Adapter, items: Sequence[Any]) -> Any:
    ex = list(items[:EXPORT_BATCH])
    while len(ex) < EXPORT_BATCH:
        ex.append(ex[0])
    batch = adapter.collate(ex)
    if isinstance(batch, dict):     # the graph takes the tokenizer's inputs (collate adds a mask it may not give)
        batch = {k: v for k, v in batch.items() if k in adapter.input_names}
    if isinstance(batch, dict) and "input_ids" in batch and batch["input_ids"].shape[1] == EXPORT_BATCH:
        # keep the example's sequence length different from its batch size, so no exporter can
        # confuse the two axes
        pad_id = (adapter.tokenizer.pad_token_id if adapter.tokenizer is not None else None) or 0
        batch = {k: torch.cat([v, torch.full((v.shape[0], 1), pad_id if k == "input_ids" else 0,
                                             dtype=v.dtype)], dim=1) for k, v in batch.items()}
    return batch


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def torch_to_onnx(adapter: Adapter, example: Any, *, opset: Optional[int] = None,
                  exporter: str = "auto", progress=None, failures: Optional[list] = None):
    """Export ``adapter.model`` to an in-memory ModelProto with inputs named
    ``adapter.input_names`` and one output ``logits``. Returns (proto, exporter used, input
    names). ``auto``: the torch.export-based exporter (dynamo), falling back to the
    TorchScript one if it fails or cannot write the opset asked for (one progress line says why;
    ``failures`` collects the reasons, the first is the report's ``exporter_fallback``); the
    verification decides either way."""
    import onnx

    if exporter not in EXPORTERS:
        raise BadInput(f"unknown exporter {exporter!r} (one of {', '.join(EXPORTERS)})")
    model = adapter.model
    if model is None:
        raise BadInput(f"a {adapter.family} model has no torch module to export")
    names = list(adapter.input_names)
    if isinstance(example, dict):
        if sorted(names) != sorted(example):
            raise RepairError(f"the preprocessing gives inputs {sorted(example)} but the {adapter.family} "
                              f"adapter declares {names}")
        wrapper: nn.Module = _TextLogits(model, names)
        args = tuple(example[n].cpu() for n in names)
    else:
        if len(names) != 1:
            raise RepairError(f"an image model takes one input, the adapter declares {names}")
        wrapper = _ImageLogits(model)
        args = (example.cpu(),)
    text = isinstance(example, dict)
    modes = [(m, m.training) for m in model.modules()]     # the caller's module is left as it was given
    wrapper.eval()
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    if opset is not None and opset < DYNAMO_MIN_OPSET and exporter == "auto":
        order = ["torchscript"]
        why = f"--opset {opset} is below {DYNAMO_MIN_OPSET}, the oldest torch's current exporter writes"
        if failures is not None:            # the report's exporter_fallback: why TorchScript was used
            failures.append(f"dynamo: {why}")
        _log(progress, f"{why}: using its TorchScript exporter")
    errors = []
    dev = _model_device(model)
    model.to("cpu").eval()
    try:
        for kind in order:
            try:
                with _EXPORT_LOCK, _quiet_stdout(), torch.no_grad():
                    if kind == "dynamo":
                        batch = torch.export.Dim("batch", min=1)
                        if text:
                            seq = torch.export.Dim("seq", min=1)
                            dyn = (tuple({0: batch, 1: seq} for _ in names),)
                        else:
                            dyn = ({0: batch},)
                        prog = torch.onnx.export(wrapper, args, None, input_names=names,
                                                 output_names=["logits"], opset_version=opset,
                                                 dynamo=True, dynamic_shapes=dyn, verbose=False,
                                                 external_data=False)
                        proto = prog.model_proto
                    else:
                        axes = {n: ({0: "batch", 1: "sequence"} if text else {0: "batch"}) for n in names}
                        axes["logits"] = {0: "batch"}
                        buf = io.BytesIO()
                        torch.onnx.export(wrapper, args, buf, input_names=names, output_names=["logits"],
                                          opset_version=opset or 17, dynamo=False, dynamic_axes=axes,
                                          do_constant_folding=True)
                        proto = onnx.load_from_string(buf.getvalue())
                if opset is not None and _opset(proto) != opset:
                    raise RuntimeError(f"it wrote opset {_opset(proto)}, not the {opset} asked for")
                fixed = fixed_axes(proto, names, 2 if text else 1)
                if fixed:       # a traced length or batch the graph now assumes (the dynamo exporter on Funnel)
                    raise RuntimeError(f"it fixed the {fixed[0]} asked to be dynamic")
                drop_export_traces(proto)
                return proto, kind, names
            except Exception as e:  # try the next exporter; report all if none works
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                msg = msg.split("[Caused by")[0].strip()     # (the TorchScript exporter's IR of the value)
                errors.append(f"{kind}: {type(e).__name__}: {msg[:300]}")
                if failures is not None:
                    failures.append(errors[-1])
                if len(order) > 1 and kind != order[-1]:
                    _log(progress, f"the {kind} exporter failed ({type(e).__name__}: {msg[:200]}); falling back "
                                   f"to torch's deprecated TorchScript exporter")
    finally:
        model.to(dev)
        for m, training in modes:
            m.training = training
    if opset is not None:     # the user's option: a model the exporter cannot write at that opset
        raise BadInput(f"--opset {opset}: the model cannot be exported at this opset ({'; '.join(errors)}); "
                       "give a newer opset, or leave --opset out")
    if exporter != "auto":    # the user's choice of exporter, which cannot write this model
        other = next(e for e in EXPORTERS if e not in ("auto", exporter))
        raise BadInput(f"--exporter {exporter}: the model cannot be exported with it ({'; '.join(errors)}); give "
                       f"--exporter {other}, or leave --exporter out")
    raise RepairError("ONNX export failed: " + "; ".join(errors))


def fixed_axes(proto, names, n_axes: int) -> list[str]:
    """The axes among the first ``n_axes`` of graph inputs ``names`` (batch; and tokens, for a text
    model) that ``proto`` fixed to a number instead of leaving them named (dynamic), as
    ``"axis K of input NAME (at N)"``: an export must not bake in the example's batch or length."""
    dims = {i.name: list(i.type.tensor_type.shape.dim) for i in proto.graph.input}
    out = []
    for name in names:
        for k, d in enumerate(dims.get(name, [])[:n_axes]):
            if d.HasField("dim_value"):
                out.append(f"axis {k} of input {name!r} (at {d.dim_value})")
    return out


def drop_export_traces(proto) -> None:
    """Remove what torch's exporters record about the export itself from ``proto``, in place: every
    node's ``metadata_props`` (the dynamo exporter's ``pkg.torch.onnx.stack_trace`` names the files of
    the user's network code, this package and the Python installation by their absolute paths;
    ``fx_node``, ``class_hierarchy``, ``name_scopes``, rewriter rule names) and ``doc_string``, in the
    graph, its subgraphs and its functions, and the graph's and value infos' ``pkg.torch.*`` entries. A
    file we write holds no machine path, and the same model exported from another folder is the same
    file. The model's own ``metadata_props`` (the provenance) are not touched."""
    import onnx

    def graph(g) -> None:
        nodes(g.node)
        for v in list(g.value_info) + list(g.input) + list(g.output):
            v.doc_string = ""
            keep = [(p.key, p.value) for p in v.metadata_props if not p.key.startswith("pkg.")]
            del v.metadata_props[:]
            for k, val in keep:
                v.metadata_props.add(key=k, value=val)
        keep = [(p.key, p.value) for p in g.metadata_props if not p.key.startswith("pkg.")]
        del g.metadata_props[:]
        for k, val in keep:
            g.metadata_props.add(key=k, value=val)
        g.doc_string = ""

    def nodes(ns) -> None:
        for n in ns:
            del n.metadata_props[:]
            n.doc_string = ""
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)

    graph(proto.graph)
    for f in proto.functions:
        nodes(f.node)
        del f.metadata_props[:]
        f.doc_string = ""


def _opset(proto) -> Optional[int]:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


# ------------------------------------------------------------------ verification
def _verify_batch_size(n: int) -> int:
    vb = min(VERIFY_BATCH, n)
    if vb == EXPORT_BATCH:
        vb = 1
    return max(vb, 1)


def _token_lengths(adapter: Adapter, items: Sequence[Any]) -> Optional[list[int]]:
    """Each text's token count (one tokenizer call, no padding, no tensors); None when the
    adapter has no tokenizer."""
    from .adapters.text import DEFAULT_MAX_LENGTH, tokenize_texts

    tok = getattr(adapter, "tokenizer", None)
    if tok is None:
        return None
    length = int(getattr(adapter, "max_length", None) or DEFAULT_MAX_LENGTH)
    try:          # as the model reads them (a long text cut first; a tokenizer's panic is BadInput)
        return [len(ids) for ids in tokenize_texts(tok, [str(t) for t in items], length)["input_ids"]]
    except BadInput:
        raise
    except Exception:
        return None


def verify_batches(adapter: Adapter, items: Sequence[Any]) -> list[list[int]]:
    """The verification's batches (indices into ``items``): texts sorted by token count, so each
    batch, padded to its own longest text, is verified at (about) its real lengths and the
    padding costs next to nothing; images in the data's order. No batch has the export's
    example size unless it is the last, smaller one."""
    return _verify_plan(adapter, items)[0]


def _verify_plan(adapter: Adapter, items: Sequence[Any]) -> tuple[list[list[int]], Optional[list[int]]]:
    """:func:`verify_batches` and each text's token count (None: images, or no tokenizer)."""
    n = len(items)
    order = list(range(n))
    lengths = None
    if adapter.modality == "text":
        lengths = _token_lengths(adapter, items)
        key = (lambda i: lengths[i]) if lengths is not None else (lambda i: len(str(items[i])))
        order.sort(key=key)
    vb = _verify_batch_size(n)
    return [order[s:s + vb] for s in range(0, n, vb)], lengths


def padding_pair(adapter: Adapter, items: Sequence[Any], batches: list[list[int]],
                 lengths: Optional[list[int]]) -> Optional[dict]:
    """Two texts of different token counts for one more verification batch, when none of ``batches``
    padded a text (every batch's texts of one length: all texts as long, or cut at the maximum length):
    a file that ignores its attention mask, or that has one sequence length baked in, would otherwise
    pass. The longest text and the shortest; when every text has one length, the longest beside a text
    made from it (its first half, halved again until it is read shorter, or it twice), which reference
    and file then read alike. None when a
    batch already padded, or no text of another length can be made (a one-token text at the limit)."""
    if lengths is None or not items:
        return None
    if any(len({lengths[i] for i in b}) > 1 for b in batches):
        return None
    hi = max(range(len(items)), key=lambda i: lengths[i])
    lo = min(range(len(items)), key=lambda i: lengths[i])
    if lengths[lo] != lengths[hi]:
        return {"items": [items[hi], items[lo]], "samples": [hi, lo], "lengths": [lengths[hi], lengths[lo]],
                "made": False, "alone": False}      # (each length was some batch's: nothing to run alone)
    text = str(items[hi])

    def made_texts():
        # halves of the text until one is read shorter (a text cut at the maximum length stays cut until
        # its half is below it: a long text takes a few halvings), then the text twice (a short text)
        cut = text
        while len(cut) > 1:
            cut = cut[: len(cut) // 2]
            yield cut
        yield f"{text} {text}"

    for made in made_texts():
        got = _token_lengths(adapter, [made]) if made.strip() else None
        if got and got[0] != lengths[hi]:
            pair = sorted([(lengths[hi], items[hi]), (got[0], made)], key=lambda x: -x[0])
            # the made text shorter: a length no batch had, run alone too (:func:`_padded_batch_check`)
            return {"items": [t for _, t in pair], "samples": [hi], "lengths": [n for n, _ in pair], "made": True,
                    "alone": got[0] < lengths[hi]}
    return None


def _failed_load_report(onnx_path: Path, bound: Bound, device, problem: str, t0: float) -> dict:
    return {"onnx": str(onnx_path), "output_names": [], "input_names": [], "logits_output": None,
            "shapes": {}, "observed_shape": None, "max_abs_diff": None, "max_abs_diff_per_output": {},
            "tolerance": bound.atol, "bound": {**bound.describe(), "worst": None, "ratio": None},
            "argmax_agreement": None, "argmax_disagreements": 0, "near_ties": 0,
            "disagreement_examples": [], "n_verified": 0, "verify_batch_size": None, "batch_sizes": [],
            "providers": [], "reference_device": str(device), "passed": False,
            "problems": [problem], "seconds": round(time.perf_counter() - t0, 3)}


class _Worst:
    """Running worst logit under a bound: max |diff|, the largest allowed, the worst ratio."""

    def __init__(self):
        self.max_diff = 0.0
        self.max_allowed = 0.0
        self.ratio = 0.0
        self.where: Optional[dict] = None
        self.finite = True

    def add(self, ref: torch.Tensor, got: torch.Tensor, allowed: torch.Tensor, idx: Sequence[int]) -> None:
        if not got.numel():
            return
        d = (got - ref).abs()
        if not bool(torch.isfinite(d).all()):
            self.finite = False
            self.max_diff = float("nan")
            return
        self.max_diff = max(self.max_diff, float(d.max()))
        self.max_allowed = max(self.max_allowed, float(allowed.max()))
        r = d / allowed
        k = int(r.argmax())
        i, c = divmod(k, r.shape[1])
        if float(r[i, c]) >= self.ratio or self.where is None:
            self.ratio = float(r[i, c])
            self.where = {"sample": int(idx[i]), "class": int(c), "reference": float(ref[i, c]),
                          "onnx": float(got[i, c]), "abs_diff": float(d[i, c]),
                          "allowed": float(allowed[i, c])}

    @property
    def ok(self) -> bool:
        return self.finite and self.ratio <= 1.0


def run_verification(onnx_path: Path, reference: Adapter, items: Sequence[Any], *,
                     tolerance: Optional[float] = None, device: str = "cpu",
                     expected_outputs: Optional[Sequence[str]] = None,
                     head_check: bool = False, own_file: bool = False, progress=None,
                     reference_logits: Optional[torch.Tensor] = None,
                     bound: Optional[Bound] = None, logits_output: Optional[str] = None,
                     metadata: Optional[dict] = None) -> dict:
    """The check itself: onnxruntime on ``onnx_path`` vs ``reference.logits_batch`` (or
    ``reference_logits``, row i for ``items[i]``), batched as ``verify_batches`` says, one
    session with as many intra-op threads as torch uses. ``tolerance``: a user's absolute
    max |diff| (``None``: ``DEFAULT_BOUND``); ``bound`` overrides both. The logits are the output
    ``logits_output`` (an ONNX reference's: the one its adapter reads) when the file has it, else
    ``logits``, else the only output. ``metadata``: a dict given is filled with the file's metadata
    (``metadata_props``) as the session read them -- the file is not parsed a second time for them."""
    from .adapters.onnx_runtime import make_session
    from .embeddings import resolve_device

    t0 = time.perf_counter()
    items = list(items)
    n = len(items)
    if n == 0:
        raise BadInput("no samples to verify on")
    bnd = bound if bound is not None else resolve_bound(tolerance)
    onnx_path = Path(onnx_path)
    try:
        sess = make_session(onnx_path, prefer_cuda=True, device=None, where=onnx_path,
                            threads=torch.get_num_threads(), spin=False)
    except BadInput as e:
        if not own_file:
            raise
        # a file we just wrote that onnxruntime cannot load is a failed export, not bad input
        return _failed_load_report(onnx_path, bnd, device, e.problem, t0)
    if metadata is not None:
        metadata.update(sess.get_modelmeta().custom_metadata_map)
    out_names = [o.name for o in sess.get_outputs()]
    problems: list[str] = []
    if expected_outputs is not None and out_names != list(expected_outputs):
        problems.append(f"outputs are {out_names}, expected {list(expected_outputs)}")
    named = [n for n in (logits_output, "logits") if n is not None and n in out_names]
    logits_name = named[0] if named else (out_names[0] if len(out_names) == 1 else None)
    if logits_name is None:
        problems.append(f"no {logits_output or 'logits'!r} output among {out_names}")
    elif logits_output is None and out_names[0] != logits_name:
        # a torch model's export has one output, its logits: a file whose first output is another (a
        # softmax put first) hands a deployment that takes the first output something never verified
        problems.append(f"the first output is {out_names[0]!r}, not the {logits_name!r} verified: a deployment "
                        "taking the first output would read something else")
    dev = resolve_device(device)
    reference.to(dev)
    batches, lengths = _verify_plan(reference, items)
    worst, head = _Worst(), (_Worst() if head_check else None)
    agree = 0
    disagreements: list[dict] = []
    batch_sizes: list[int] = []
    observed_shape = None
    if head_check:
        W, b = reference.head_params()
        head_bnd = head_check_bound(bnd, reference)
    bias = _reference_bias(reference)
    if logits_name is not None:
        with _no_tf32():
            for idx in batches:
                batch = reference.collate([items[i] for i in idx])
                with torch.no_grad():
                    ref = (reference_logits[idx].float().cpu() if reference_logits is not None
                           else reference.logits_batch(batch, dev).float().cpu())
                got_t, failed = _file_logits(sess, batch, logits_name, onnx_path)
                if failed:
                    problems.append(f"onnxruntime failed on a batch of {len(idx)} ({failed})")
                    break
                batch_sizes.append(len(idx))
                observed_shape = list(got_t.shape)
                if got_t.shape != ref.shape:
                    problems.append(f"output {logits_name} has shape {list(got_t.shape)} for a batch of "
                                    f"{len(idx)}, the model gives {list(ref.shape)}")
                    break
                allowed, tie = bnd.allowed(ref, bias), bnd.tie_allowed(ref)
                worst.add(ref, got_t, allowed, idx)
                if got_t.numel():
                    a, g = ref.argmax(1), got_t.argmax(1)
                    for j in range(len(idx)):
                        if int(a[j]) == int(g[j]):
                            agree += 1
                        else:
                            gap = float(ref[j, a[j]] - ref[j, g[j]])
                            disagreements.append({"sample": idx[j], "reference": int(a[j]), "onnx": int(g[j]),
                                                  "reference_gap": gap,
                                                  "near_tie": gap <= float(tie[j, a[j]] + tie[j, g[j]])})
                if head is not None:
                    with torch.no_grad():
                        emb = reference.embed_batch(batch, dev).float().cpu()
                    lin = emb @ W.T + b
                    head.add(lin, got_t, head_bnd.allowed(lin, b), idx)
                if not worst.finite:
                    break
    n_done = sum(batch_sizes)
    padded = None
    if n_done and not problems and worst.finite:
        pair = padding_pair(reference, items, batches, lengths)
        if pair is not None:
            padded = _padded_batch_check(sess, onnx_path, reference, pair, logits_name, bnd, bias, dev)
            if padded.get("problem"):
                problems.append(padded["problem"])
    if n_done and not problems:
        if not worst.ok:
            w = worst.where or {}
            problems.append(f"max |diff| {worst.max_diff:.3g} exceeds the bound: worst logit |diff| "
                            f"{w.get('abs_diff', float('nan')):.3g} > allowed {w.get('allowed', float('nan')):.3g} "
                            f"(atol {bnd.atol:g} + rtol {bnd.rtol:g} x logit scale; ratio {worst.ratio:.3g})"
                            if worst.finite else f"max |diff| {worst.max_diff} (non-finite logits)")
        hard = [d for d in disagreements if not d["near_tie"]]
        if hard:
            problems.append(f"argmax differs on {len(hard)} of {n_done} samples (not near-ties)")
        if head is not None and not head.ok:
            problems.append(f"embeddings @ W.T + b differ from the file's logits by {head.max_diff:.3g} "
                            f"(ratio {head.ratio:.3g} to the bound)")
    elif not n_done and not problems:
        problems.append("nothing was verified")
    report = {
        "onnx": str(onnx_path),
        "output_names": out_names,
        "input_names": [i.name for i in sess.get_inputs()],
        "logits_output": logits_name,
        "shapes": {o.name: [d if isinstance(d, int) else (d or None) for d in (o.shape or [])]
                   for o in sess.get_outputs()},
        "observed_shape": observed_shape,
        "max_abs_diff": worst.max_diff if n_done else None,
        "max_abs_diff_per_output": {logits_name: worst.max_diff} if n_done and logits_name else {},
        "tolerance": worst.max_allowed if (n_done and bnd.rtol and worst.max_allowed) else bnd.atol,
        "bound": {**bnd.describe(), "worst": worst.where if n_done else None,
                  "ratio": (worst.ratio if worst.finite else None) if n_done else None},
        "argmax_agreement": (agree / n_done) if n_done else None,
        "argmax_disagreements": len(disagreements),
        "near_ties": sum(1 for d in disagreements if d["near_tie"]),
        "disagreement_examples": disagreements[:5],
        "n_verified": n_done,
        "verify_batch_size": _verify_batch_size(n),
        "batch_sizes": sorted(set(batch_sizes)),
        "providers": list(sess.get_providers()),
        "reference_device": str(dev),
        "passed": not problems,
        "problems": problems,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    report["padded_batch"] = None if padded is None else {k: v for k, v in padded.items() if k != "problem"}
    if head is not None:
        report["head_check_max_abs_diff"] = head.max_diff if n_done else None
        report["head_check_ratio"] = (head.ratio if head.finite else None) if n_done else None
    return report


def _file_logits(sess, batch, logits_name: str, onnx_path: Path) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The file's ``logits_name`` output on ``batch`` (float32), or None and onnxruntime's reason when it
    fails on it (bad input stays :class:`BadInput`)."""
    from .adapters.onnx_runtime import run_batch

    try:
        (got,) = run_batch(sess, batch, [logits_name], onnx_path)
    except BadInput:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, msg[:300]
    return torch.from_numpy(got).float(), None


def _padded_batch_check(sess, onnx_path: Path, reference: Adapter, pair: dict, logits_name: str, bnd: Bound,
                        bias, dev) -> dict:
    """One batch of two texts of different lengths (:func:`padding_pair`), the shorter padded, then the
    shorter alone when no batch had its length (``pair["alone"]``: a text made shorter): the file's
    logits against the reference's on them, under the verification's bound. Returns what the report
    shows (``lengths``, ``samples`` (indices of the real texts), ``made`` (a text made from a sample),
    ``max_abs_diff``, ``passed``) and ``problem`` when it fails."""
    batch = reference.collate(list(pair["items"]))
    out = {"lengths": pair["lengths"], "samples": pair["samples"], "made": pair["made"]}
    with _no_tf32(), torch.no_grad():
        ref = reference.logits_batch(batch, dev).float().cpu()
    got_t, failed = _file_logits(sess, batch, logits_name, onnx_path)
    if failed:
        return {**out, "max_abs_diff": None, "passed": False,
                "problem": f"onnxruntime failed on a padded batch (texts of {pair['lengths'][0]} and "
                           f"{pair['lengths'][1]} tokens: {failed})"}
    if got_t.shape != ref.shape:
        return {**out, "max_abs_diff": None, "passed": False,
                "problem": f"output {logits_name} has shape {list(got_t.shape)} on a padded batch of 2, the "
                           f"model gives {list(ref.shape)}"}
    w = _Worst()
    w.add(ref, got_t, bnd.allowed(ref, bias), list(range(2)))
    out.update({"max_abs_diff": w.max_diff, "passed": w.ok})
    if not w.ok:
        out["problem"] = (f"on a batch padding a text of {pair['lengths'][1]} tokens to {pair['lengths'][0]}, max "
                          f"|diff| {w.max_diff:.3g} exceeds the bound (ratio {w.ratio:.3g}): the file does not read "
                          "padded texts as the model does (its attention mask, or a sequence length built in); "
                          "no batch of the samples padded a text")
        return out
    if not pair.get("alone"):
        return out
    # the made text alone, unpadded: a length no batch had (every sample is as long), which a file with the
    # samples' sequence length built in (a traced reshape) cannot read
    one = reference.collate([pair["items"][1]])
    with _no_tf32(), torch.no_grad():
        ref1 = reference.logits_batch(one, dev).float().cpu()
    got1, failed = _file_logits(sess, one, logits_name, onnx_path)
    if failed or got1.shape != ref1.shape:
        why = failed or f"its output {logits_name} has shape {list(got1.shape)}, the model gives {list(ref1.shape)}"
        out.update({"passed": False, "problem": f"onnxruntime failed on a text of {pair['lengths'][1]} tokens alone "
                                                f"({why}): a sequence length built in; every batch of the samples "
                                                f"was {pair['lengths'][0]} tokens long"})
        return out
    w.add(ref1, got1, bnd.allowed(ref1, bias), [0])       # (the pair passed: a failure now is this text's)
    out.update({"max_abs_diff": w.max_diff, "passed": w.ok})
    if not w.ok:
        out["problem"] = (f"on a text of {pair['lengths'][1]} tokens alone, max |diff| {w.max_diff:.3g} exceeds the "
                          f"bound (ratio {w.ratio:.3g}): a sequence length built in; every batch of the samples was "
                          f"{pair['lengths'][0]} tokens long")
    return out


def _reference_bias(reference: Adapter) -> Optional[torch.Tensor]:
    """The bias of the head whose output is ``reference``'s logits (:meth:`Adapter.head_params`), for
    :meth:`Bound.allowed`; None when the reference has no head it can name."""
    try:
        return reference.head_params()[1].float().cpu().reshape(-1)
    except Exception:              # a reference without a head to name: the bound without a bias
        return None


def _fail(report: dict, what: str) -> GateFailed:
    err = GateFailed(f"{what}: " + "; ".join(report["problems"]))
    err.report = report  # type: ignore[attr-defined]
    return err


def verify_onnx(onnx_path, reference_adapter: Adapter, items: Sequence[Any], *,
                tolerance: Optional[float] = None, device: str = "cpu", check: bool = True,
                progress=None, metadata: Optional[dict] = None) -> dict:
    """Standalone verification of an ONNX file against a reference model (any family,
    ONNX included) on ``items``. ``check``: raise ``GateFailed`` when it does not pass
    (the report is on the exception as ``.report``). ``metadata``: a dict given is filled with the
    file's metadata as the verification read them."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BadInput("expected an .onnx file, got a folder" if onnx_path.is_dir() else "ONNX model not found", onnx_path)
    _log(progress, f"verifying {onnx_path.name} on {len(items)} samples")
    # an ONNX reference also checks embeddings @ W.T + b (original graph, new head) vs the file
    native = reference_adapter.exports_onnx_natively
    meta: dict = {} if metadata is None else metadata    # the file's metadata, as the session read it (read once)
    report = run_verification(onnx_path, reference_adapter, items, tolerance=tolerance, device=device,
                              head_check=native, progress=progress,
                              logits_output=reference_adapter.logits_name if native else None, metadata=meta)
    report["reference"] = {"family": reference_adapter.family, "source": reference_adapter.source.name}
    differs = metadata_mismatches(onnx_path, reference_adapter, meta)
    if differs:
        report["problems"] = [*report.get("problems", []), *differs]
        report["passed"] = False
    if check and not report["passed"]:
        raise _fail(report, "ONNX verification failed")
    return report


def metadata_mismatches(onnx_path: Path, reference: Adapter, got: Optional[dict] = None) -> list[str]:
    """How the ONNX file at ``onnx_path`` says it is read -- the class names (in order), the image
    preprocessing, a text model's truncation length, as :func:`export_metadata` writes them and
    ``load_model(x.onnx)`` reads them -- where it differs from ``reference``: matching logits on the
    reference's own inputs do not make a file that repair (or a deployment reading its metadata)
    would read as another classifier pass. A key the file does not carry is not compared (a file
    exported by other tools; whoever reads it supplies them). ``got``: the file's metadata where the
    caller read them already (:func:`run_verification`'s session); else the file is parsed for them."""
    if got is None:
        import onnx

        from .adapters.onnx_graph import metadata_dict

        try:
            got = metadata_dict(onnx.load(str(onnx_path), load_external_data=False))
        except Exception:                # run_verification already said why the file does not load
            return []
    from .adapters import checked_class_names
    from .adapters.onnx_adapter import CLASS_NAME_KEYS

    want = export_metadata(reference, {})
    out = _beside_mismatches(Path(onnx_path), reference, got, want)
    for key in ("class_names", "preprocess", "max_length"):
        # the class names as the file would be read: its first key of CLASS_NAME_KEYS (label_names when
        # it has no class_names)
        have = next((k for k in CLASS_NAME_KEYS if k in got), None) if key == "class_names" else key
        if have not in got or key not in want:
            continue
        try:
            theirs = json.loads(got[have])
            if key == "class_names":        # read as the loader reads them: stripped text, "" its index
                theirs = checked_class_names(theirs, have, distinct=False)
            same = theirs == json.loads(want[key])
        except (ValueError, BadInput):
            same = False
        if not same:
            out.append(f"the file's {have} ({got[have][:120]}) differ from the reference's {key} ({want[key][:120]}): "
                       "it would be read as another classifier")
    return out


def pick_verify_indices(n: int, max_items: Optional[int], seed: int = 0) -> list[int]:
    """The indices of at most ``max_items`` of ``n`` samples, a seeded random subset in the data's
    order (so every class has a fair chance to be represented); all of them when there are fewer.
    The one rule of which samples an ONNX file is verified on (``export``, ``verify``, ``fix --export``)."""
    if max_items is None or max_items <= 0 or n <= max_items:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_items].tolist())


def pick_verify_items(items: Sequence[Any], max_items: Optional[int], seed: int = 0) -> list:
    """The samples :func:`pick_verify_indices` picks."""
    items = list(items)
    return [items[i] for i in pick_verify_indices(len(items), max_items, seed)]


# ------------------------------------------------------------------ export
def _beside_mismatches(onnx_path: Path, reference: Adapter, got: dict, want: dict) -> list[str]:
    """What a file without class names or image preprocessing in its metadata is read with from the files
    beside it, as ``load_model(x.onnx)`` reads them (a ``config.json``'s ``id2label``, a
    ``preprocess.json``), where it differs from ``reference``: a file that passes is read as the
    classifier it was verified as; a side file the loader would refuse (a link leading out, not a
    description) fails it too: the file would not load."""
    from .adapters import checked_class_names
    from .adapters.images import PREPROCESS_FILE
    from .adapters.onnx_adapter import CLASS_NAME_KEYS, names_beside, preprocess_beside

    out = []
    ref_names = [str(c) for c in reference.class_names]
    if not any(k in got for k in CLASS_NAME_KEYS):
        try:
            theirs = names_beside(onnx_path, len(ref_names))
            theirs = None if theirs is None else checked_class_names(theirs, "config.json id2label", distinct=False)
        except BadInput as e:
            out.append(f"the class names beside the file cannot be read as the loader reads them ({e.problem}): "
                       "it would not load")
            theirs = None
        if theirs is not None and theirs != ref_names:
            out.append(f"the class names beside the file (config.json id2label: {json.dumps(theirs)[:120]}) differ "
                       f"from the reference's ({json.dumps(ref_names)[:120]}): it would be read as another classifier")
    if "preprocess" not in got and "preprocess" in want:
        try:
            theirs = preprocess_beside(onnx_path)
        except BadInput as e:
            out.append(f"the preprocessing beside the file cannot be read as the loader reads it ({e.problem}): "
                       "it would not load")
            theirs = None
        norm = lambda c: json.loads(json.dumps(c, sort_keys=True, default=str))
        if theirs is not None and norm(theirs) != norm(reference.data_config):
            out.append(f"the preprocessing beside the file ({PREPROCESS_FILE}: {json.dumps(norm(theirs))[:120]}) "
                       f"differs from the reference's ({want['preprocess'][:120]}): it would be read as another "
                       "classifier")
    return out


def export_metadata(adapter: Adapter, metadata: dict[str, str]) -> dict[str, str]:
    """Provenance plus what a later ``load_model(x.onnx)`` needs: class names and the
    image preprocessing, or a text model's truncation length (the caller's keys win)."""
    extra = {"class_names": json.dumps(list(adapter.class_names))}
    if adapter.modality == "image" and adapter.data_config is not None:
        extra["preprocess"] = json.dumps(adapter.data_config)
    if adapter.modality == "text" and getattr(adapter, "max_length", None):
        extra["max_length"] = str(int(adapter.max_length))
    return {**extra, **{str(k): str(v) for k, v in metadata.items()}}


def _with_exporter(metadata: dict, exporter: str, opset: Optional[int]) -> dict:
    """``metadata`` with, beside a provenance (``repair.*`` keys), how the file was written:
    ``repair.exporter`` -- the exporter (``dynamo``, the deprecated ``torchscript`` fallback, or
    ``graph-edit`` for an ONNX model's own graph), the opset and the torch and onnx versions -- so that
    a file says what produced it, not only what it was produced from."""
    from . import provenance

    out = dict(metadata)
    if any(str(k).startswith(provenance.PREFIX) for k in out):
        import onnx

        out[f"{provenance.PREFIX}exporter"] = provenance.canonical_json(
            {"exporter": exporter, "opset": opset, "torch": torch.__version__, "onnx": onnx.__version__})
    return out


def export_onnx(adapter: Adapter, out_path, *, metadata: dict[str, str], verify_items: Sequence[Any],
                tolerance: Optional[float] = None, opset: Optional[int] = None, force: bool = False,
                device: str = "cpu", exporter: str = "auto", progress: Optional[Callable[[str], None]] = None,
                reference_logits: Optional[torch.Tensor] = None,
                _tamper: Optional[Callable[[Any], None]] = None) -> dict:
    """Export ``adapter``'s (possibly repaired) model to ``out_path`` (.onnx) and verify it.

    Torch models (timm, factories, transformers) are exported with ``torch.onnx.export``;
    an ONNX source model (``adapter.exports_onnx_natively``) has its edited graph written.
    The file only appears at ``out_path`` once verification passed; otherwise
    ``GateFailed`` (with ``.report``). ``reference_logits`` (len(verify_items), C): the
    model's logits on ``verify_items`` when the caller already has them (a repaired head on
    cached embeddings), which saves the PyTorch forward pass of the verification.
    ``_tamper``: test hook called with the ModelProto just before it is written and verified."""
    import onnx

    from .adapters.onnx_graph import MAX_PROTO_BYTES, set_metadata

    from .rules import check_bool
    from .io import as_path
    from .rules import Protected, check_file_suffix, model_arg, whole_number

    loaded = model_arg(adapter, "the model", adopt=False)      # the export reads the tensors as they are
    if not isinstance(loaded, Adapter):
        raise BadInput("export_onnx exports a model already loaded (repair.load_model(path)); to export a "
                       "checkpoint path use repair.export_model", loaded)
    out_path = as_path(out_path, "the output (--out)")
    check_file_suffix(out_path, ".onnx", "ONNX")
    check_bool(force, "--force")
    opset = None if opset is None else whole_number(opset, "--opset")     # a numpy integer as a Python int
    protected = Protected().add(adapter.source, "input model")    # never the model it exports (as export_model)
    protected.add_files(adapter.source_files(), "input model").check(out_path)
    items = list(verify_items)
    if not items:
        raise BadInput("no samples to verify the export on")
    bound = resolve_bound(tolerance)
    t0 = time.perf_counter()
    native = adapter.exports_onnx_natively
    failures: list[str] = []
    with atomic_output(out_path, force=force) as tmp:
        if native:
            _log(progress, "writing the repaired ONNX graph")
            proto = adapter.export_proto(_with_exporter(metadata, "graph-edit", None))
            used, input_names, export_batch = "graph-edit", list(adapter.input_names), None
            if opset is not None and opset != _opset(proto):
                _log(progress, f"notice: --opset {opset} does not apply to an ONNX model: its graph is edited in "
                               f"place and keeps opset {_opset(proto)}")
        else:
            _log(progress, f"exporting {adapter.family} model to ONNX")
            example = _example_batch(adapter, items)
            proto, used, input_names = torch_to_onnx(adapter, example, opset=opset, exporter=exporter,
                                                     progress=progress, failures=failures)
            export_batch = EXPORT_BATCH
            set_metadata(proto, export_metadata(adapter, _with_exporter(metadata, used, _opset(proto))))
        if _tamper is not None:
            _tamper(proto)
        if proto.ByteSize() > MAX_PROTO_BYTES:
            raise RepairError("the ONNX model would exceed 2 GB; external-data export is not supported yet")
        # what the report says about the file comes from the proto written (no second read of it)
        opset_used, metadata_keys = _opset(proto), sorted(p.key for p in proto.metadata_props)
        onnx.save(proto, str(tmp))
        del proto
        export_s = time.perf_counter() - t0
        _log(progress, f"verifying with onnxruntime on {len(items)} samples")
        report = run_verification(tmp, adapter, items, bound=bound, device=device,
                                  expected_outputs=None if native else ["logits"],
                                  logits_output=adapter.logits_name if native else None,
                                  head_check=native, own_file=True, progress=progress,
                                  reference_logits=reference_logits)
        export_report(report, out_path, exporter=used, exporter_fallback=failures[0] if failures else None,
                      opset=opset_used, input_names=input_names, export_batch_size=export_batch,
                      metadata_keys=metadata_keys, export_seconds=export_s, t0=t0)
        if not report["passed"]:
            name_export_file(report, None)          # no file: nor the staging name it had
            raise _fail(report, "ONNX export verification failed (no file written)")
    return report


#: the fields of an ONNX export's report that name the file written
EXPORT_PATH_FIELDS = ("path", "onnx")


def name_export_file(report: dict, path) -> dict:
    """Every field of an ONNX export's report that names the file (:data:`EXPORT_PATH_FIELDS`) names
    ``path``: the final path the caller reads, never the staging name it was written and verified under;
    None where no file was written."""
    for k in EXPORT_PATH_FIELDS:
        report[k] = None if path is None else str(path)
    return report


def export_report(report: dict, path, *, exporter: str, opset: Optional[int], input_names: Sequence[str],
                  metadata_keys: Sequence[str], export_seconds: float, t0: float,
                  exporter_fallback: Optional[str] = None, export_batch_size: Optional[int] = None) -> dict:
    """The one shape of an ONNX export's report -- ``repair export``, and ``repair fix --export onnx`` of any
    model, an ONNX model's own repaired file included: the verification's ``report`` (``run_verification``)
    with what was written (``format``, the ``exporter`` -- ``graph-edit`` for an ONNX model --, why the
    TorchScript exporter was used, ``exporter_fallback``, the ``opset``, the ``input_names``, the example
    batch of a torch export, the file's ``metadata_keys``, the times since ``t0``), and the file's final
    ``path`` in every field naming it (:func:`name_export_file`)."""
    report.update({
        "format": "onnx",
        "exporter": exporter,
        "exporter_fallback": exporter_fallback,
        "opset": opset,
        "input_names": list(input_names),
        "export_batch_size": export_batch_size,
        "metadata_keys": sorted(metadata_keys),
        "export_seconds": round(export_seconds, 3),
        "verify_seconds": report["seconds"],
        "seconds": round(time.perf_counter() - t0, 3),
    })
    return name_export_file(report, path)


def export_safetensors(adapter: Adapter, out_path, metadata: dict[str, str], force: bool = False) -> dict:
    """The model in its own format with the (repaired) head: a timm / transformers folder
    for folder checkpoints, one .safetensors file for bare files. Written atomically."""
    from safetensors import safe_open

    if adapter.exports_onnx_natively:
        raise BadInput("an ONNX model can only be exported to ONNX (--format onnx)", adapter.source)
    out_path = Path(out_path)
    folder = adapter.source.is_dir()
    if not folder and out_path.suffix.lower() != ".safetensors":
        raise BadInput("the safetensors output file name must end in .safetensors", out_path)
    t0 = time.perf_counter()
    with atomic_output(out_path, force=force) as tmp:
        written = Path(adapter.save(tmp, dict(metadata)))
        rel = written.relative_to(tmp) if folder else None
        with safe_open(str(written), framework="pt") as f:
            meta = dict(f.metadata() or {})
            n_tensors = len(list(f.keys()))
        missing = [k for k in metadata if meta.get(k) != str(metadata[k])]
        if missing:
            raise RepairError(f"metadata did not round-trip through the written file ({missing[0]})")
    weights = out_path / rel if rel is not None else out_path
    return {"format": "safetensors", "path": str(out_path), "weights_file": str(weights),
            "n_tensors": n_tensors, "metadata_keys": sorted(meta), "passed": True,
            "seconds": round(time.perf_counter() - t0, 3)}


__all__ = ["Bound", "DEFAULT_BOUND", "EXPORT_PATH_FIELDS", "check_export_options", "check_tolerance", "export_metadata",
           "export_onnx", "export_report", "name_export_file",
           "export_safetensors", "pick_verify_indices", "pick_verify_items", "resolve_bound", "run_verification", "torch_to_onnx",
           "verify_batches", "verify_onnx"]
