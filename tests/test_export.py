"""Export (ONNX / safetensors) with verification, and the ONNX-model adapter."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from conftest import CLASSES, make_deployed_onnx, run_cli
from repair import provenance
from repair.adapters import LoadOptions, load_model
from repair.data import load_data
from repair.errors import BadInput, GateFailed
from repair.export import (DEFAULT_BOUND, EXPORT_BATCH, export_onnx, export_safetensors, run_verification,
                           verify_batches, verify_onnx)

CPU = torch.device("cpu")
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]



def meta_for(adapter) -> dict[str, str]:
    return provenance.build(source_sha256=adapter.source_sha256(), method="test", settings={"k": 1},
                            figures={"after": {"accuracy": 0.5}}, measured_on="test split")


def repair_head(adapter, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in repair: a different head than the file's, set in memory only."""
    g = torch.Generator().manual_seed(seed)
    W, b = adapter.head_params()
    W2 = W * 1.3 + 0.05 * torch.randn(W.shape, generator=g)
    b2 = b + 0.2 * torch.randn(b.shape, generator=g)
    adapter.set_head(W2, b2)
    return W2, b2


def assert_within_bound(got, ref) -> None:
    """ONNX logits vs the reference's within the default verification bound (per sample:
    atol + rtol x its largest |logit|), which holds on any CPU (tests/test_onnx_bounds.py)."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    allowed = DEFAULT_BOUND.atol + DEFAULT_BOUND.rtol * np.abs(ref).max(axis=1, keepdims=True)
    assert (np.abs(got - ref) <= allowed).all(), float((np.abs(got - ref) / allowed).max())


def ort_logits(path: Path, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()})[0]


def no_leftovers(folder: Path, keep: set[str]) -> None:
    left = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert left == [], left


def make_vit_folder(path: Path) -> Path:
    """A narrow one-block ViT at 32x32 (patch 8), saved as a timm hub folder."""
    import timm
    from timm.models import save_for_hf

    args = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(CLASSES), **args)
    cfg = {"input_size": [3, 32, 32], "mean": MEAN, "std": STD, "crop_pct": 1.0, "crop_mode": "center",
           "interpolation": "bilinear"}
    save_for_hf(model, str(path), model_config={"label_names": CLASSES, "pretrained_cfg": cfg},
                model_args=args, safe_serialization=True)
    cfg_path = path / "config.json"
    c = json.loads(cfg_path.read_text())
    c.get("model_args", {}).pop("num_classes", None)
    cfg_path.write_text(json.dumps(c))
    return path


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def items(image_data):
    return load_data(image_data).items


@pytest.fixture(scope="module")
def cnn_export(timm_folder, items, tmp_path_factory):
    a = load_model(timm_folder)
    W, b = repair_head(a)
    out = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    rep = export_onnx(a, out, metadata=meta_for(a), verify_items=items)
    return a, out, rep, (W, b)


@pytest.fixture(scope="module")
def bert_export(bert_folder, text_data, tmp_path_factory):
    a = load_model(bert_folder)
    repair_head(a)
    texts = load_data(text_data).items
    out = tmp_path_factory.mktemp("bert") / "bert.onnx"
    rep = export_onnx(a, out, metadata=meta_for(a), verify_items=texts)
    return a, out, rep, texts


@pytest.fixture(scope="module")
def deployed_onnx(tmp_path_factory) -> Path:
    """A third-party style ONNX classifier: plain torch.onnx.export (TorchScript exporter),
    no metadata, no preprocessing next to it."""
    return make_deployed_onnx(tmp_path_factory.mktemp("deployed") / "deployed.onnx")[0]


# ------------------------------------------------------------------ ONNX export of torch models
def test_cnn_export_verified_with_provenance(cnn_export, items):
    a, out, rep, _ = cnn_export
    assert out.is_file() and rep["passed"] and rep["path"] == str(out)
    assert rep["output_names"] == ["logits"] and rep["input_names"] == ["pixel_values"]
    assert rep["shapes"]["logits"][1] == 3 and not isinstance(rep["shapes"]["logits"][0], int)
    b = rep["bound"]
    assert (b["atol"], b["rtol"], b["source"]) == (DEFAULT_BOUND.atol, DEFAULT_BOUND.rtol, "default")
    assert 0 <= b["ratio"] <= 1 and b["worst"]["abs_diff"] <= b["worst"]["allowed"]
    assert rep["max_abs_diff"] <= rep["tolerance"]
    assert rep["argmax_disagreements"] == rep["near_ties"] and rep["n_verified"] == len(items)  # a near tie may flip on another CPU
    assert rep["export_batch_size"] == EXPORT_BATCH and EXPORT_BATCH != rep["verify_batch_size"]
    assert "CPUExecutionProvider" in rep["providers"]
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    for k, v in meta_for(a).items():
        assert props[k] == v
    assert props["format"] == "pt"
    assert ("repair.created" in props) == (provenance.source_date() is not None)   # no clock time: reproducible
    assert json.loads(props["class_names"]) == CLASSES


def test_cnn_export_dynamic_batch_and_repaired_head(cnn_export, items):
    a, out, _, (W, b) = cnn_export
    for n in (1, 5):  # neither is the export's example batch
        x = a.collate(items[:n])
        got = ort_logits(out, {"pixel_values": x})
        assert got.shape == (n, 3)
        ref = a.logits_batch(x, CPU)
        assert_within_bound(got, ref.numpy())
        emb = a.embed_batch(x, CPU)
        assert_within_bound(got, (emb @ W.T + b).numpy())  # the in-memory repair


def test_vit_export(tmp_path, items):
    a = load_model(make_vit_folder(tmp_path / "vit"))
    repair_head(a)
    out = tmp_path / "vit.onnx"
    rep = export_onnx(a, out, metadata=meta_for(a), verify_items=items[:7])
    assert rep["passed"] and rep["bound"]["ratio"] <= 1 and rep["argmax_disagreements"] == rep["near_ties"]
    assert rep["n_verified"] == 7 and rep["batch_sizes"] == [7]
    for n in (1, 3):
        x = a.collate(items[:n])
        assert_within_bound(ort_logits(out, {"pixel_values": x}), a.logits_batch(x, CPU).numpy())


def test_bert_export_dynamic_batch_and_sequence(bert_export):
    a, out, rep, texts = bert_export
    assert rep["passed"] and rep["bound"]["ratio"] <= 1 and rep["bound"]["rtol"] == DEFAULT_BOUND.rtol
    assert rep["exporter"] == "dynamo"   # torch's current exporter (onnxscript is a dependency)
    assert rep["argmax_disagreements"] == rep["near_ties"] and rep["n_verified"] == len(texts)
    assert rep["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == rep["input_names"]
    for inp in sess.get_inputs():   # dynamic batch and sequence axes (symbolic, not the example's sizes)
        assert len(inp.shape) == 2 and not any(isinstance(d, int) for d in inp.shape), inp.shape
    for batch_texts in (["good"], ["the movie was not great", "awful", "fun fun fun fun fun fun fun", "a", "bad"]):
        enc = a.collate(batch_texts)
        got = sess.run(["logits"], {k: v.numpy() for k, v in enc.items()})[0]
        assert_within_bound(got, a.logits_batch(enc, CPU).numpy())
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["repair.method"] == "test" and json.loads(props["class_names"]) == ["negative", "positive"]


def test_tampered_export_fails_and_leaves_no_file(timm_folder, items, tmp_path):
    a = load_model(timm_folder)

    def tamper(proto):
        for t in proto.graph.initializer:
            if t.name.endswith("fc.weight"):
                arr = numpy_helper.to_array(t).copy()
                arr[0, 0] += 50.0
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
                return
        raise AssertionError("no head weight found to tamper with")

    out = tmp_path / "t.onnx"
    with pytest.raises(GateFailed, match="max \\|diff\\|") as ei:
        export_onnx(a, out, metadata=meta_for(a), verify_items=items, exporter="torchscript", _tamper=tamper)
    rep = ei.value.report
    assert rep["passed"] is False and rep["max_abs_diff"] > 1 and rep["path"] is None
    assert not out.exists()
    no_leftovers(tmp_path, set())


def test_cli_export_tampered_exit_1(timm_folder, image_data, tmp_path, monkeypatch):
    import repair.export as ex

    def tamper(proto):
        # the stem conv (timm zero-inits each block's last BN, so deeper convs of a fresh
        # model may not reach the logits at all)
        t = next(t for t in proto.graph.initializer if len(t.dims) == 4)
        arr = numpy_helper.to_array(t) + 1.0
        t.CopyFrom(numpy_helper.from_array(arr, t.name))

    monkeypatch.setattr(ex, "export_onnx", functools.partial(ex.export_onnx, _tamper=tamper))
    out = tmp_path / "m.onnx"
    code, stdout, stderr = run_cli("export", timm_folder, "--data", image_data, "--out", out, "--json", "-q",
                                   "--exporter", "torchscript")  # the faster exporter: the check is the point
    assert code == 1, stderr
    doc = json.loads(stdout)
    assert doc["passed"] is False and doc["onnx"] is None and doc["path"] is None     # no staging name
    assert "FAILED" in stderr and not out.exists()
    no_leftovers(tmp_path, set())
    # repair fix --export onnx: the same failure is one JSON document too, and nothing is written
    fixed = tmp_path / "fixed"
    code, stdout, stderr = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--export", "onnx",
                                   "--out", fixed, "--json", "-q")
    assert code == 1, stderr
    doc = json.loads(stdout)
    assert doc["passed"] is False and doc["output"] is None and doc["export"]["passed"] is False
    assert doc["export"]["onnx"] is None and "verification failed" in doc["error"]
    no_leftovers(tmp_path, set())


def test_cli_export_and_verify(cnn_export, timm_folder, image_data, tmp_path):
    a, onnx_file, _, _ = cnn_export
    out = tmp_path / "plain.onnx"
    code, stdout, stderr = run_cli("export", timm_folder, "--data", image_data, "--out", out, "--json",
                                   "--max-verify", 5, "--exporter", "torchscript")
    assert code == 0, stderr
    rep = json.loads(stdout)
    assert rep["passed"] and rep["n_verified"] == 5 and out.is_file() and rep["exporter"] == "torchscript"
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["repair.method"] == "none" and json.loads(props["repair.export"])["format"] == "onnx"
    # existing output without --force: bad input
    code, _, stderr = run_cli("export", timm_folder, "--data", image_data, "--out", out)
    assert code == 2 and "--force" in stderr
    # verify: the plain export matches the folder; the repaired export does not
    code, stdout, _ = run_cli("verify", out, "--reference", timm_folder, "--data", image_data)
    assert code == 0 and "PASSED" in stdout
    code, stdout, stderr = run_cli("verify", onnx_file, "--reference", timm_folder, "--data", image_data, "--json")
    assert code == 1 and json.loads(stdout)["passed"] is False and "FAILED" in stderr
    # a reference that is the checked file itself (or a link to it) would pass whatever the file holds
    (tmp_path / "same.onnx").symlink_to(onnx_file)
    for ref in (onnx_file, tmp_path / "same.onnx"):
        code, stdout, stderr = run_cli("verify", onnx_file, "--reference", ref, "--data", image_data)
        assert code == 2 and "the ONNX file being checked" in stderr and len(stderr.strip().splitlines()) == 1
        assert stdout == ""
    # ... but matches the repaired model once it is written as safetensors
    st = tmp_path / "repaired"
    export_safetensors(a, st, meta_for(a))
    code, stdout, stderr = run_cli("verify", onnx_file, "--reference", st, "--data", image_data, "--json")
    assert code == 0, stderr
    v = json.loads(stdout)
    assert v["argmax_disagreements"] == v["near_ties"]          # a near tie may flip on another CPU


def test_verify_fails_a_file_that_says_it_is_read_as_another_classifier(timm_folder, image_data, tmp_path):
    """Found by an audit: `repair verify` fed the ONNX file the reference's own inputs and compared
    logits by position, so a file whose metadata swap the class names or change the normalisation
    -- which repair (and a deployment reading the metadata) reads as another classifier -- PASSED.
    Its class names, preprocessing and truncation length must match the reference's."""
    out = tmp_path / "plain.onnx"
    code, _, err = run_cli("export", timm_folder, "--data", image_data, "--out", out, "--max-verify", 5,
                           "--exporter", "torchscript", "-q")
    assert code == 0, err
    for key, change in (("class_names", lambda v: json.dumps(list(reversed(json.loads(v))))),
                        ("preprocess", lambda v: json.dumps({**json.loads(v), "mean": [0, 0, 0], "std": [1, 1, 1]}))):
        m = onnx.load(str(out))
        for p in m.metadata_props:
            if p.key == key:
                p.value = change(p.value)
        bad = tmp_path / f"{key}.onnx"
        onnx.save(m, str(bad))
        code, stdout, err = run_cli("verify", bad, "--reference", timm_folder, "--data", image_data, "--json",
                                    "--max-verify", 5)
        rep = json.loads(stdout)
        assert code == 1 and rep["passed"] is False and any(f"the file's {key}" in p for p in rep["problems"]), err
    # the names under label_names, which the loader reads when a file has no class_names (found by a later
    # audit: verify compared class_names only, and passed a file repair reads with two classes swapped)
    m = onnx.load(str(out))
    names = next(json.loads(p.value) for p in m.metadata_props if p.key == "class_names")
    props = [(p.key, p.value) for p in m.metadata_props if p.key != "class_names"]
    for swapped in ([names[1], names[0], *names[2:]], names, [f" {n} " for n in names]):
        del m.metadata_props[:]
        for k, v in props + [("label_names", json.dumps(swapped))]:
            e = m.metadata_props.add()
            e.key, e.value = k, v
        bad = tmp_path / "label_names.onnx"
        onnx.save(m, str(bad))
        code, stdout, err = run_cli("verify", bad, "--reference", timm_folder, "--data", image_data, "--json",
                                    "--max-verify", 5)
        rep = json.loads(stdout)
        if [n.strip() for n in swapped] == names:   # the right names (as read: stripped), under the other key
            assert code == 0 and rep["passed"], err
        else:
            assert code == 1 and any("the file's label_names" in p for p in rep["problems"]), err
    code, _, err = run_cli("verify", out, "--reference", timm_folder, "--data", image_data, "--max-verify", 5)
    assert code == 0, err


def test_verify_fails_a_file_whose_first_output_is_not_the_verified_logits(timm_folder, image_data, tmp_path):
    """Found by an audit: a file given a Softmax output listed before its logits passed `repair verify`
    (the logits were found by name and compared), though a deployment taking the first output reads
    probabilities. The first output of a torch model's file must be the logits verified."""
    from onnx import helper

    out = tmp_path / "plain.onnx"
    code, _, err = run_cli("export", timm_folder, "--data", image_data, "--out", out, "--max-verify", 5,
                           "--exporter", "torchscript", "-q")
    assert code == 0, err
    m = onnx.load(str(out))
    logits = m.graph.output[0]
    m.graph.node.append(helper.make_node("Softmax", [logits.name], ["probs"], axis=1))
    probs = helper.make_tensor_value_info("probs", logits.type.tensor_type.elem_type, None)
    kept = list(m.graph.output)
    del m.graph.output[:]
    m.graph.output.extend([probs, *kept])
    bad = tmp_path / "probs-first.onnx"
    onnx.save(m, str(bad))
    code, stdout, err = run_cli("verify", bad, "--reference", timm_folder, "--data", image_data, "--json",
                                "--max-verify", 5)
    rep = json.loads(stdout)
    assert code == 1 and any("the first output is 'probs'" in p for p in rep["problems"]), (err, rep.get("problems"))
    del m.graph.output[:]
    m.graph.output.extend([*kept, probs])                  # logits first, probabilities after: passes
    onnx.save(m, str(tmp_path / "probs-last.onnx"))
    code, _, err = run_cli("verify", tmp_path / "probs-last.onnx", "--reference", timm_folder, "--data", image_data,
                           "--max-verify", 5)
    assert code == 0, err


# ------------------------------------------------------------------ safetensors export
def test_safetensors_export_timm_loads_unchanged(cnn_export, tmp_path):
    import timm
    from safetensors import safe_open
    from timm.models import load_checkpoint

    a, _, _, (W, b) = cnn_export
    out = tmp_path / "fixed"
    rep = export_safetensors(a, out, meta_for(a))
    assert rep["path"] == str(out) and (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["repair.method"] == "test" and "repair.source_sha256" in meta
    m = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    load_checkpoint(m, str(out / "model.safetensors"))
    torch.testing.assert_close(m.get_classifier().weight.detach(), W)
    torch.testing.assert_close(load_model(out).head_params()[1], b)
    with pytest.raises(BadInput, match="--force"):
        export_safetensors(a, out, meta_for(a))
    export_safetensors(a, out, meta_for(a), force=True)
    no_leftovers(tmp_path, {"fixed"})


def test_safetensors_export_bare_file(timm_folder, tmp_path):
    bare = tmp_path / "w.safetensors"
    shutil.copy(timm_folder / "model.safetensors", bare)
    a = load_model(bare, LoadOptions(arch="test_resnet"))
    W, _ = repair_head(a)
    out = tmp_path / "w.fixed.safetensors"
    export_safetensors(a, out, meta_for(a))
    assert out.is_file()
    torch.testing.assert_close(load_model(out, LoadOptions(arch="test_resnet")).head_params()[0], W)


def test_safetensors_export_transformers(bert_export, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    a, _, _, texts = bert_export
    out = tmp_path / "bert-fixed"
    export_safetensors(a, out, meta_for(a))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and any(k.startswith("repair.") for k in meta)
    m = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    enc = a.collate(texts[:4])
    with torch.no_grad():
        torch.testing.assert_close(m(**enc).logits, a.logits_batch(enc, CPU), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the ONNX-model adapter
def test_onnx_model_repair_path(deployed_onnx, image_data, items, tmp_path):
    a = load_model(deployed_onnx, LoadOptions(image_size=32, mean=MEAN, std=STD, class_names=CLASSES))
    assert a.family == "onnx" and a.modality == "image" and a.class_names == CLASSES
    x = a.collate(items[:6])
    emb = a.embed_batch(x, CPU)
    W, b = a.head_params()
    assert emb.shape == (6, W.shape[1]) and W.shape == (3, W.shape[1]) and b.shape == (3,)
    sess = ort.InferenceSession(str(deployed_onnx), providers=["CPUExecutionProvider"])
    orig = sess.run(None, {"input": x.numpy()})[0]
    assert_within_bound((emb @ W.T + b).numpy(), orig)
    np.testing.assert_allclose(a.logits_batch(x, CPU).numpy(), orig, atol=1e-6)

    W2, b2 = repair_head(a, seed=7)
    out = tmp_path / "repaired.onnx"
    a.save(out, {"repair.method": "test"})
    new = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in new.get_inputs()] == ["input"] and [o.name for o in new.get_outputs()] == ["output"]
    got = new.run(None, {"input": x.numpy()})[0]
    assert_within_bound(got, (emb @ W2.T + b2).numpy())
    np.testing.assert_allclose(a.logits_batch(x, CPU).numpy(), got, atol=1e-6)
    # only the head's initializers changed; provenance and class names went in
    head = set(a.spec.initializer_names())
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(deployed_onnx)).graph.initializer}
    saved = onnx.load(str(out))
    after = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    assert before.keys() == after.keys()
    for k in before:
        if k not in head:
            assert np.array_equal(before[k], after[k]), k
    props = {p.key: p.value for p in saved.metadata_props}
    assert props["repair.method"] == "test" and json.loads(props["class_names"]) == CLASSES
    # the repaired file loads again: same body, the new head, its preprocessing from metadata
    again = load_model(out)
    assert again.body_hash() == a.body_hash() and again.class_names == CLASSES
    torch.testing.assert_close(again.head_params()[0], W2)
    # export of an ONNX model: the edited graph, verified incl. embeddings @ W.T + b
    rep = export_onnx(a, tmp_path / "exported.onnx", metadata={"repair.method": "test"}, verify_items=items)
    assert rep["passed"] and rep["exporter"] == "graph-edit" and rep["head_check_ratio"] <= 1
    rep = verify_onnx(tmp_path / "exported.onnx", a, items[:4])
    assert rep["passed"] and rep["head_check_ratio"] <= 1


def test_onnx_missing_preprocessing(deployed_onnx, items, tmp_path):
    a = load_model(deployed_onnx)  # loads: `repair verify` etc. can still use it
    assert a.class_names == ["0", "1", "2"]
    with pytest.raises(BadInput, match="preprocess.json"):
        a.collate(items[:2])
    folder = tmp_path / "with-json"
    folder.mkdir()
    shutil.copy(deployed_onnx, folder / "m.onnx")
    (folder / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32], "mean": MEAN, "std": STD}))
    assert load_model(folder / "m.onnx").collate(items[:2]).shape == (2, 3, 32, 32)
    with pytest.raises(BadInput, match="32x32"):
        load_model(folder / "m.onnx", LoadOptions(image_size=48))


def test_onnx_tampered_graph_edit_fails(deployed_onnx, items, tmp_path):
    a = load_model(deployed_onnx, LoadOptions(image_size=32, mean=MEAN, std=STD))
    repair_head(a)
    name = a.spec.weight_name

    def tamper(proto):
        for t in proto.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 5.0, name))

    out = tmp_path / "bad.onnx"
    with pytest.raises(GateFailed):
        export_onnx(a, out, metadata={}, verify_items=items[:5], _tamper=tamper)
    no_leftovers(tmp_path, set())

    def break_graph(proto):  # a file onnxruntime cannot even load is a failed export too
        del proto.graph.initializer[0]

    with pytest.raises(GateFailed, match="onnxruntime cannot load"):
        export_onnx(a, out, metadata={}, verify_items=items[:5], _tamper=break_graph)
    no_leftovers(tmp_path, set())


def test_exported_onnx_roundtrips_class_names_and_preprocessing(cnn_export, items):
    _, out, _, (W, b) = cnn_export
    a = load_model(out)  # no flags: class names and preprocessing come from the metadata
    assert a.class_names == CLASSES and a.data_config["input_size"] == [3, 32, 32]
    torch.testing.assert_close(a.head_params()[0], W)
    torch.testing.assert_close(a.head_params()[1], b)


def test_text_onnx_adapter(bert_export, bert_folder, tmp_path):
    a_torch, out, _, texts = bert_export
    folder = tmp_path / "bert-onnx"
    folder.mkdir()
    shutil.copy(out, folder / "model.onnx")
    with pytest.raises(BadInput, match="tokenizer"):
        load_model(folder / "model.onnx").collate(texts[:2])
    for f in bert_folder.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    a = load_model(folder / "model.onnx")
    assert a.modality == "text" and a.class_names == ["negative", "positive"]
    enc = a.collate(texts[:5])
    W, b = a.head_params()
    assert_within_bound((a.embed_batch(enc, CPU) @ W.T + b).numpy(), a_torch.logits_batch(enc, CPU).numpy())


def test_text_onnx_truncates_at_the_models_positions_like_the_torch_model(bert_export, bert_folder, tmp_path):
    """A tokenizer without a length limit (the tests' BERT has none; its model has 64 positions): the
    ONNX file in an exported folder (config.json beside it) truncates texts where the transformers
    adapter does, so a text longer than the positions gives the same logits instead of an
    onnxruntime error (exit 3)."""
    a_torch, out, _, _ = bert_export
    folder = tmp_path / "exported"
    shutil.copytree(bert_folder, folder)
    shutil.copy(out, folder / "model.onnx")
    long_texts = [" ".join(["the movie was great"] * 30), "awful", " ".join(["not fun"] * 50)]
    a = load_model(folder / "model.onnx")
    assert a_torch.max_length == 64 == a.max_length
    enc = a.collate(long_texts)
    assert enc["input_ids"].shape[1] == 64
    assert_within_bound(a.logits_batch(enc, CPU).numpy(), a_torch.logits_batch(a_torch.collate(long_texts), CPU).numpy())


def _toy_graph(kind: str, rng) -> onnx.ModelProto:
    """pixel (N,3,2,2) -> Flatten -> MatMul(12x6) -> Relu -> head with 4 classes."""
    D, C = 6, 4
    inits = [numpy_helper.from_array(rng.standard_normal((12, D)).astype(np.float32), "body.w")]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "body.w"], ["h0"]),
             helper.make_node("Relu", ["h0"], ["feat"])]
    Wcd = rng.standard_normal((C, D)).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    if kind == "gemm_transB0":
        inits += [numpy_helper.from_array(Wcd.T.copy(), "head.w"), numpy_helper.from_array(bias[None], "head.b")]
        nodes.append(helper.make_node("Gemm", ["feat", "head.w", "head.b"], ["z"], alpha=2.0, beta=0.5, transB=0))
    elif kind == "gemm_nobias":
        inits.append(numpy_helper.from_array(Wcd, "head.w"))
        nodes.append(helper.make_node("Gemm", ["feat", "head.w"], ["z"], transB=1))
    elif kind == "matmul_add":
        inits += [numpy_helper.from_array(Wcd.T.copy(), "head.w"), numpy_helper.from_array(bias, "head.b")]
        nodes += [helper.make_node("MatMul", ["feat", "head.w"], ["mm"]), helper.make_node("Add", ["head.b", "mm"], ["z"])]
    else:  # matmul without bias
        inits.append(numpy_helper.from_array(Wcd.T.copy(), "head.w"))
        nodes.append(helper.make_node("MatMul", ["feat", "head.w"], ["z"]))
    nodes.append(helper.make_node("Identity", ["z"], ["scores"]))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 2, 2])],
                              [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["n", C])], inits)
    # IR version 8 (opset 17's): onnx.helper's default is the installed onnx's newest, which an older
    # onnxruntime refuses (onnx 1.23 writes IR 14, onnxruntime 1.30 reads up to 13)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kind", ["gemm_transB0", "gemm_nobias", "matmul_add", "matmul"])
def test_onnx_head_layouts(kind, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / f"{kind}.onnx"
    onnx.save(_toy_graph(kind, rng), str(path))
    a = load_model(path, LoadOptions(image_size=2, mean=MEAN, std=STD))
    x = torch.from_numpy(rng.standard_normal((5, 3, 2, 2)).astype(np.float32))
    W, b = a.head_params()
    orig = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    emb = a.embed_batch(x, CPU)
    assert_within_bound((emb @ W.T + b).numpy(), orig)
    W2, b2 = W[[1, 0, 3, 2]] * 0.5, torch.arange(4.0)
    a.set_head(W2, b2)
    a.save(tmp_path / "out.onnx", {"repair.method": "x"})
    got = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert_within_bound(got, (emb @ W2.T + b2).numpy())
    # (the written file carries its preprocessing: --image-size for it is refused, it is read as it records)
    assert load_model(tmp_path / "out.onnx").body_hash() == a.body_hash() or kind == "matmul"


# ------------------------------------------------------------------ the bound and the batches
def test_tolerance_override_is_an_absolute_max_diff(cnn_export, timm_folder, items):
    """``--tolerance X`` keeps its documented meaning: max |diff| <= X (atol X, rtol 0)."""
    a, out, rep, _ = cnn_export
    assert rep["bound"]["source"] == "default"
    rep = verify_onnx(out, a, items, tolerance=1e-3)
    assert rep["passed"] and rep["bound"]["atol"] == 1e-3 and rep["bound"]["rtol"] == 0
    assert rep["tolerance"] == 1e-3 and rep["bound"]["source"].startswith("--tolerance")
    # far below float rounding: the same healthy file fails, and the report says by how much
    rep = verify_onnx(out, a, items, tolerance=1e-12, check=False)
    assert not rep["passed"] and rep["bound"]["ratio"] > 1 and "exceeds the bound" in rep["problems"][0]
    assert rep["bound"]["worst"]["abs_diff"] > rep["bound"]["worst"]["allowed"] == pytest.approx(1e-12, rel=1e-5)
    with pytest.raises(BadInput, match="--tolerance"):
        verify_onnx(out, a, items, tolerance=-1.0)


def test_text_verified_on_real_lengths_sorted_batches(bert_export, tmp_path):
    a, out, rep, texts = bert_export
    batches = verify_batches(a, texts)
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    lengths = [int(a.collate([texts[i]])["attention_mask"].sum()) for i in range(len(texts))]
    order = [i for b in batches for i in b]
    assert [lengths[i] for i in order] == sorted(lengths)              # sorted by token count
    widths = [a.collate([texts[i] for i in b])["input_ids"].shape[1] for b in batches]
    assert widths == [max(lengths[i] for i in b) for b in batches]     # each padded to its own longest
    if len(set(lengths)) > 1:
        assert len(batches) == 1 or widths[0] < widths[-1]
    # reference logits given in the items' order (as `fix` passes them) are matched per sample
    ref = torch.cat([a.logits_batch(a.collate(texts[s:s + 7]), CPU) for s in range(0, len(texts), 7)])
    rep2 = run_verification(out, a, texts, reference_logits=ref)
    assert rep2["passed"] and rep2["bound"]["ratio"] <= 1 and rep2["n_verified"] == len(texts)
    rep3 = run_verification(out, a, texts, reference_logits=ref.flip(0))   # logits of other samples
    assert not rep3["passed"] and rep3["bound"]["ratio"] > 1


def test_dynamo_failure_falls_back_saying_why_in_one_line(timm_folder, items, tmp_path, monkeypatch):
    real = torch.onnx.export

    def failing_dynamo(*args, **kw):
        if kw.get("dynamo"):
            raise RuntimeError("simulated dynamo failure\nwith a second line")
        return real(*args, **kw)

    monkeypatch.setattr(torch.onnx, "export", failing_dynamo)
    said: list[str] = []
    rep = export_onnx(load_model(timm_folder), tmp_path / "f.onnx", metadata={}, verify_items=items[:5],
                      progress=said.append)
    assert rep["passed"] and rep["exporter"] == "torchscript"
    assert rep["exporter_fallback"] == "dynamo: RuntimeError: simulated dynamo failure"
    lines = [m for m in said if "exporter failed" in m]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "simulated dynamo failure" in lines[0] and "deprecated TorchScript" in lines[0]


def test_a_repaired_model_records_this_run_not_the_sources(timm_folder, image_data, deployed_onnx, tmp_path):
    """Repairing a file that already carries a provenance (an export, an earlier repair) writes this
    run's record only: the source's ``repair.*`` keys (``repair.export`` naming another file and
    hash) do not survive into it; other metadata of the source does."""
    from safetensors import safe_open

    st = tmp_path / "exported"
    code, _, err = run_cli("export", timm_folder, "--format", "safetensors", "--out", st, "-q")
    assert code == 0, err
    with safe_open(str(st / "model.safetensors"), framework="pt") as f:
        assert "repair.export" in f.metadata()
    fixed = tmp_path / "fixed"
    code, _, err = run_cli("fix", st, "--data", image_data, "--group-by", "place", "--recipe", "dfr", "--out", fixed,
                           "-q")
    assert code == 0, err
    with safe_open(str(fixed / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["repair.method"] == "dfr" and "repair.export" not in meta and meta["format"] == "pt"
    # an ONNX model whose metadata holds an earlier run's key and one of its own: the first goes
    src = tmp_path / "deployed.onnx"
    proto = onnx.load(str(deployed_onnx))
    for k, v in (("repair.export", '{"source":"elsewhere.onnx"}'), ("author", "me")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(src))
    out = tmp_path / "r.onnx"
    opts = ["--image-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--class-names", "cat,dog,fox"]
    code, _, err = run_cli("fix", src, *opts, "--data", image_data, "--recipe", "neurontune", "--out", out, "-q")
    assert code == 0, err
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["repair.method"] == "neurontune" and "repair.export" not in props and props["author"] == "me"


def test_a_fixed_batch_onnx_model_runs_on_any_number_of_samples(tmp_path):
    """A deployed graph with a fixed batch of 2 runs on an odd number of samples (the last part padded
    with a copy, its output dropped) and gives the torch model's logits for every one of them."""
    from repair.adapters.onnx_runtime import make_session, run_session

    path, m = make_deployed_onnx(tmp_path / "fixed.onnx", dynamic_batch=False)
    sess = make_session(path)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    (got,) = run_session(sess, {"input": x.numpy()})
    with torch.no_grad():
        ref = m(x).numpy()
    assert got.shape == (5, 3)
    assert_within_bound(got, ref)


# ------------------------------------------------------------------ found by an audit
def test_an_opset_below_the_current_exporters_is_written_as_asked_or_refused(timm_folder, items, tmp_path):
    """Torch's current exporter writes opset 18 and above; asked for less it wrote 18 and printed a
    traceback. Now `auto` uses the TorchScript exporter for it (the file has the opset asked for),
    and `--exporter dynamo` with it is refused before any work."""
    a = load_model(timm_folder)
    rep = export_onnx(a, tmp_path / "m.onnx", metadata=meta_for(a), verify_items=items[:8], opset=13)
    assert rep["passed"] and rep["opset"] == 13 and rep["exporter"] == "torchscript"
    assert [o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import if o.domain in ("", "ai.onnx")] == [13]
    code, _, err = run_cli("export", timm_folder, "--data", items[0].parent.parent, "--out", tmp_path / "d.onnx",
                           "--opset", "13", "--exporter", "dynamo")
    assert code == 2 and "--exporter dynamo writes opset 18" in err and not (tmp_path / "d.onnx").exists(), err


def test_an_onnx_model_with_a_second_output_is_verified_on_the_output_it_is_read_by(deployed_onnx, image_data,
                                                                                  tmp_path):
    """`fix --export onnx` on an ONNX model whose first output is the logits and a second one the
    probabilities: verified on the output the adapter reads (it failed after all the work, exit 1)."""
    proto = onnx.load(str(deployed_onnx))
    proto.graph.node.append(helper.make_node("Softmax", ["output"], ["probs"], axis=1))
    proto.graph.output.append(helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["n", 3]))
    onnx.save(proto, str(tmp_path / "two.onnx"))
    table = (image_data / "metadata.csv").read_text()
    for i, c in enumerate(CLASSES):
        table = table.replace(f",{c},", f",{i},")
    data = shutil.copytree(image_data, tmp_path / "data")
    (data / "by-index.csv").write_text(table)
    code, out, err = run_cli("fix", tmp_path / "two.onnx", "--data", data / "by-index.csv", "--image-size", "32",
                             "--recipe", "dfr", "--out", tmp_path / "fixed.onnx", "--export", "onnx", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["export"]["passed"]
    code, _, err = run_cli("export", tmp_path / "two.onnx", "--data", data / "by-index.csv", "--image-size", "32",
                           "--out", tmp_path / "again.onnx", "--opset", "13")
    assert code == 0 and "notice: --opset 13 does not apply to an ONNX model" in err, err


def test_a_text_onnx_with_a_fixed_sequence_length_verifies_and_with_other_input_names_is_text(
        bert_folder, text_data, tmp_path):
    from conftest import bert_onnx
    from repair.adapters import load_model as load

    a = load(bert_folder)
    texts = load_data(text_data).items
    enc = a.collate(texts[:2])
    fixed = {k: torch.nn.functional.pad(v, (0, 16 - v.shape[1])) for k, v in enc.items()}
    folder = tmp_path / "static"
    folder.mkdir()
    for f in bert_folder.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    bert_onnx(a.model, folder / "model.onnx", tuple(fixed[n] for n in ("input_ids", "attention_mask", "token_type_ids")))
    code, _, err = run_cli("verify", folder / "model.onnx", "--reference", bert_folder, "--data", text_data)
    assert code == 0, err                       # texts of any length fit the 16 fixed positions
    proto = onnx.load(str(folder / "model.onnx"))
    for i, n in zip(proto.graph.input, ["ids", "mask", "types"]):
        for node in proto.graph.node:
            node.input[:] = [n if x == i.name else x for x in node.input]
        i.name = n
    onnx.save(proto, str(folder / "renamed.onnx"))
    code, _, err = run_cli("eval", folder / "renamed.onnx", "--data", text_data, "--class-names", "negative,positive")
    assert code == 2 and "needs input 'ids'" in err and "image" not in err, err


def test_exporting_a_text_model_to_a_folder_without_its_tokenizer_says_what_to_put_beside_it(
        bert_folder, text_data, tmp_path):
    """A text model's ONNX takes token ids: exported alone, repair eval (and a deployment) could not read
    texts with it, and nothing said so. A notice names the tokenizer files to put beside it; with them
    the export reads texts (none when they are there already)."""
    from conftest import run_cli

    out = tmp_path / "alone" / "m.onnx"
    out.parent.mkdir()
    code, _, err = run_cli("export", bert_folder, "--data", text_data, "--out", out, "-q")
    assert code == 0, err
    notice = [ln for ln in err.splitlines() if ln.startswith("notice:") and "tokenizer files beside it" in ln]
    assert len(notice) == 1 and "tokenizer.json" in notice[0], err
    code, _, err = run_cli("eval", out, "--data", text_data, "-q")
    assert code == 2 and "tokenizer" in err
    for name in notice[0].split("beside it (")[1].split(")")[0].split(", "):
        shutil.copy(bert_folder / name, out.parent / name)
    code, _, err = run_cli("eval", out, "--data", text_data, "-q")
    assert code == 0, err
    again = tmp_path / "alone" / "m2.onnx"
    code, _, err = run_cli("export", bert_folder, "--data", text_data, "--out", again, "-q")
    assert code == 0 and "notice:" not in err, err
