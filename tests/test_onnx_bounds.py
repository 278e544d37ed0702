"""The ONNX verification bound is a property of the export, not of one CPU.

For each of the tests' models (tiny timm CNN, tiny BERT, an ONNX source model repaired in its
graph) and each exporter, this provokes the largest difference it can between the runtimes:
onnxruntime with graph optimisations on and off, 1 and 2 intra-op threads, the PyTorch
reference with 1 and 2 threads, batch sizes 1 / 3 / 16 and, for text, several sequence lengths
(each batch padded to its own longest text, padded to 24 and 48 tokens, truncated to 5). The
default bound (``repair.export.DEFAULT_BOUND``) must be at least 10x the largest difference
provoked, logit by logit (the ratio |diff| / allowed stays <= 0.1), and a tampered file (the
head's weight scaled by 1.01, or its bias nudged by 1% of the logit scale) must still fail it.

Run with ``-s`` to see the table of provoked differences.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import make_deployed_onnx
from repair.adapters import LoadOptions, load_model
from repair.adapters.onnx_graph import find_head
from repair.adapters.onnx_runtime import make_session, session_feeds
from repair.adapters.text import collate_texts
from repair.data import load_data
from repair.errors import GateFailed
from repair.export import DEFAULT_BOUND, export_onnx, run_verification

CPU = torch.device("cpu")
MARGIN = 10.0                       # the default bound must be >= 10x the largest provoked difference
BATCH_SIZES = (1, 3, 16)
# text: (batch size, padding): None pads each batch to its longest text; 24 / 48 pad every text to
# that many tokens; 5 truncates to 5 tokens
TEXT_SHAPES = ((1, None), (3, None), (16, None), (3, 24), (3, 48), (16, 48), (16, 5))
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _repair_head(adapter, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    W, b = adapter.head_params()
    adapter.set_head(W * 1.3 + 0.05 * torch.randn(W.shape, generator=g), b + 0.2 * torch.randn(b.shape, generator=g))


def _batches(adapter, items, bs: int, pad):
    for s in range(0, len(items), bs):
        chunk = list(items[s:s + bs])
        if pad is None:
            yield adapter.collate(chunk)
        else:
            yield collate_texts(adapter.tokenizer, chunk, adapter.max_length, fixed_length=pad)


def _reference(adapter, batch, threads: int, head_check: bool) -> list[np.ndarray]:
    """The reference logits under ``threads`` torch threads (and, for an ONNX source model,
    embeddings @ W.T + b, the other reference its verification uses)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out = [adapter.logits_batch(batch, CPU).float().numpy()]
            if head_check:
                W, b = adapter.head_params()
                out.append((adapter.embed_batch(batch, CPU).float() @ W.T + b).numpy())
    finally:
        torch.set_num_threads(old)
    return out


def provoke(adapter, path: Path, items, *, head_check: bool = False) -> dict:
    """Largest |diff| and largest |diff| / allowed (default bound) over every runtime
    configuration, batch size and sequence length; one row per configuration."""
    sessions = {(opt, thr): make_session(path, prefer_cuda=False, threads=thr, optimize=opt)
                for opt, thr in itertools.product((True, False), (1, 2))}
    shapes = TEXT_SHAPES if adapter.modality == "text" else [(bs, None) for bs in BATCH_SIZES]
    rows, worst_abs, worst_ratio = [], 0.0, 0.0
    bias = adapter.head_params()[1]          # the bound as verification applies it (Bound.allowed)
    for bs, pad in shapes:
        acc: dict = {}
        for batch in _batches(adapter, items, bs, pad):
            refs = {t: _reference(adapter, batch, t, head_check) for t in (1, 2)}
            for (opt, thr), sess in sessions.items():
                (got,) = sess.run(["logits"] if "logits" in [o.name for o in sess.get_outputs()] else None,
                                  session_feeds(sess, batch))
                for t, rs in refs.items():
                    for ref in rs:
                        d = np.abs(got.astype(np.float64) - ref)
                        allowed = DEFAULT_BOUND.allowed(torch.from_numpy(ref), bias).double().numpy()   # the one rule
                        a, r = acc.get((opt, thr, t), (0.0, 0.0))
                        acc[(opt, thr, t)] = (max(a, float(d.max())), max(r, float((d / allowed).max())))
        for (opt, thr, t), (a, r) in acc.items():
            rows.append({"batch": bs, "pad": pad, "ort_optimized": opt, "ort_threads": thr, "torch_threads": t,
                         "max_abs_diff": a, "ratio": r})
            worst_abs, worst_ratio = max(worst_abs, a), max(worst_ratio, r)
    return {"max_abs_diff": worst_abs, "ratio": worst_ratio, "rows": rows}


def _tampered(path: Path, tmp: Path, how: str, scale: float) -> Path:
    """A copy of ``path`` with its head changed: weight x 1.01, or bias + 1% of the logit scale."""
    proto = onnx.load(str(path))
    spec = find_head(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    if how == "weight":
        t = inits[spec.weight_name]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
    else:
        assert spec.bias_name is not None, "the head has no bias to nudge"
        t = inits[spec.bias_name]
        arr = numpy_helper.to_array(t).copy()
        arr.reshape(-1)[0] += np.float32(0.01 * scale)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    out = tmp / f"{path.stem}.{how}.onnx"
    onnx.save(proto, str(out))
    return out


def _report(name: str, res: dict) -> None:
    print(f"\n{name}: largest provoked |diff| {res['max_abs_diff']:.3g}, largest |diff|/allowed {res['ratio']:.3g} "
          f"(default bound atol {DEFAULT_BOUND.atol:g}, rtol {DEFAULT_BOUND.rtol:g})")
    for r in sorted(res["rows"], key=lambda r: -r["ratio"])[:3]:
        print("   worst:", r)


def check_bounds(name: str, adapter, path: Path, items, tmp: Path, *, head_check: bool = False) -> None:
    res = provoke(adapter, path, items, head_check=head_check)
    _report(name, res)
    assert res["ratio"] > 0, "no difference at all: the provocation did not run the two runtimes"
    assert res["ratio"] * MARGIN <= 1.0, (name, res["max_abs_diff"], res["ratio"])
    # healthy: passes; tampered head (weight x 1.01, bias + 1% of the logit scale): fails
    rep = run_verification(path, adapter, items)
    assert rep["passed"] and rep["bound"]["ratio"] <= 1 / MARGIN, rep["bound"]
    with torch.no_grad():
        scale = float(np.median(np.abs(adapter.logits_batch(adapter.collate(list(items)), CPU).numpy()).max(1)))
    for how in ("weight", "bias"):
        bad = run_verification(_tampered(path, tmp, how, scale), adapter, items, own_file=True)
        assert not bad["passed"] and bad["bound"]["ratio"] > 1, (name, how, bad["bound"])
        print(f"   tampered ({how}): |diff|/allowed {bad['bound']['ratio']:.3g}")
        assert "exceeds the bound" in bad["problems"][0]


# ------------------------------------------------------------------ the models
@pytest.fixture(scope="module")
def images(image_data):
    return load_data(image_data).items[:16]       # a batch of 16 and smaller ones


@pytest.fixture(scope="module")
def texts(text_data):
    return load_data(text_data).items[:24]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("family, model_fixture, items_fixture",
                         [("timm", "timm_folder", "images"), ("BERT", "bert_folder", "texts")])
def test_bound_margin_and_tamper(request, tmp_path, exporter, family, model_fixture, items_fixture):
    a = load_model(request.getfixturevalue(model_fixture))
    items = request.getfixturevalue(items_fixture)
    _repair_head(a)
    out = tmp_path / f"{family}.onnx"
    rep = export_onnx(a, out, metadata={}, verify_items=items, exporter=exporter)
    assert rep["exporter"] == exporter
    check_bounds(f"tiny {family} ({exporter})", a, out, items, tmp_path)


def test_onnx_source_bound_margin_and_tamper(images, tmp_path):
    src, _ = make_deployed_onnx(tmp_path / "deployed.onnx")
    a = load_model(src, LoadOptions(image_size=32, mean=MEAN, std=STD))
    _repair_head(a)
    out = tmp_path / "repaired.onnx"
    rep = export_onnx(a, out, metadata={}, verify_items=images)
    assert rep["exporter"] == "graph-edit" and rep["head_check_ratio"] <= 1 / MARGIN
    check_bounds("ONNX source (graph edit)", a, out, images, tmp_path, head_check=True)


def test_tampered_export_fails_through_export_onnx(timm_folder, images, tmp_path):
    """The same tamper inside ``export_onnx`` (its ``_tamper`` hook): exit-1 error, no file."""
    a = load_model(timm_folder)
    with torch.no_grad():
        scale = float(np.median(np.abs(a.logits_batch(a.collate(images), CPU).numpy()).max(1)))

    def nudge_bias(proto):
        spec = find_head(proto)
        t = next(t for t in proto.graph.initializer if t.name == spec.bias_name)
        arr = numpy_helper.to_array(t).copy()
        arr.reshape(-1)[-1] -= np.float32(0.01 * scale)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))

    out = tmp_path / "t.onnx"
    with pytest.raises(GateFailed, match="exceeds the bound") as ei:
        export_onnx(a, out, metadata={}, verify_items=images, exporter="torchscript", _tamper=nudge_bias)
    rep = ei.value.report
    assert rep["bound"]["ratio"] > 1 and rep["bound"]["worst"]["abs_diff"] > rep["bound"]["worst"]["allowed"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_switched_off_class_does_not_widen_the_bound_of_the_others(timm_folder, images, tmp_path):
    """A class switched off by a huge negative bias (-1e4) is one large |logit| in every sample: the
    bound of the other logits still follows the sample's top logit, so an export whose live logits
    are shifted by 1% of their scale fails (with the largest |logit| as the scale, every logit of
    the sample would be allowed a difference of 10), while the healthy export passes."""
    a = load_model(timm_folder)
    W, b = a.head_params()
    b = b.clone()
    b[-1] = -1e4
    a.set_head(W, b)
    out = tmp_path / "masked.onnx"
    rep = export_onnx(a, out, metadata={}, verify_items=images)
    assert rep["passed"] and rep["bound"]["ratio"] <= 1 / MARGIN
    with torch.no_grad():
        lg = a.logits_batch(a.collate(list(images)), CPU)
    assert bool((lg.argmax(1) != lg.shape[1] - 1).all()) and float(lg.abs().max()) > 9e3
    live = float(lg[:, :-1].abs().amax(1).median())
    bad = run_verification(_tampered(out, tmp_path, "bias", live), a, images, own_file=True)
    assert not bad["passed"] and bad["bound"]["ratio"] > 1 and "exceeds the bound" in bad["problems"][0]
    assert bad["bound"]["worst"]["allowed"] < 1.0


def test_a_bias_common_to_every_class_does_not_widen_the_bound(timm_folder, images, tmp_path):
    """Found by an audit: the bound's relative part followed each logit's magnitude, so a bias of 1e4 on
    every class (which changes no prediction) allowed every logit a difference of about 10, and a file
    whose softmax was 40x sharper than the reference's passed ``repair verify``. The network's error
    follows what the head computes from the embedding, not the bias added last: the reference with the
    offset still verifies its own export, and the sharper file fails."""
    ref = load_model(timm_folder)
    W, b = ref.head_params()
    ref.set_head(W, b + 1e4)
    good = tmp_path / "good.onnx"
    rep = export_onnx(ref, good, metadata={}, verify_items=images)
    assert rep["passed"] and rep["bound"]["ratio"] <= 1 / MARGIN, rep["bound"]
    sharp = load_model(timm_folder)
    sharp.set_head(W * 40, b * 40 + 1e4)
    bad_file = tmp_path / "sharp.onnx"
    export_onnx(sharp, bad_file, metadata={}, verify_items=images)
    with torch.no_grad():
        lg = ref.logits_batch(ref.collate(list(images)), CPU)
        lg2 = sharp.logits_batch(sharp.collate(list(images)), CPU)
    assert bool((lg.argmax(1) == lg2.argmax(1)).all())          # the same predictions, another model
    bad = run_verification(bad_file, ref, images, own_file=True)
    assert not bad["passed"] and bad["bound"]["ratio"] > 1 and "exceeds the bound" in bad["problems"][0], bad
