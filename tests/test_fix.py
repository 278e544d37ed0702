"""`repair fix`: outputs in the checkpoint's own format, honest splits, bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import make_images, make_texts, run_cli
from repair.selection import stratified_split




@pytest.fixture(scope="module")
def repair_images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("fixdata") / "val", n_per_class=16, seed=1)


@pytest.fixture(scope="module")
def repair_texts(tmp_path_factory):
    return make_texts(tmp_path_factory.mktemp("fixtext") / "val.csv", n=80, seed=2)


def test_stratified_split_is_disjoint_and_seeded():
    strata = torch.tensor([0] * 40 + [1] * 20 + [2] * 3)
    a = stratified_split(strata, [0.25, 0.25], seed=3)
    b = stratified_split(strata, [0.25, 0.25], seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    allidx = torch.cat(a)
    assert allidx.numel() == 63 and torch.unique(allidx).numel() == 63
    for s in (0, 1, 2):  # every stratum keeps samples in the fit part
        assert (strata[a[0]] == s).any()
    assert (strata[a[1]] == 0).sum() == 10


def test_fix_timm_folder_reloads_with_plain_timm(timm_folder, repair_images, tmp_path):
    import timm

    out = tmp_path / "fixed"
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--group-by", "place",
                                "--recipe", "dfr", "--out", out, "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["method"] == "dfr" and rep["settings"]["group_labels"] == "given"
    assert "held-out" in rep["measured_on"]
    assert (out / "config.json").read_text() == (timm_folder / "config.json").read_text()
    cfg = json.loads((out / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"])
    timm.models.load_checkpoint(model, str(out / "model.safetensors"), strict=True)
    model.eval()
    from repair.adapters import load_model

    repaired = load_model(out)
    items = sorted(repair_images.rglob("*.png"))[:6]
    x = repaired.collate(items)
    with torch.no_grad():
        torch.testing.assert_close(model(x), repaired.logits_batch(x, torch.device("cpu")), atol=1e-5, rtol=1e-5)
    # only the head changed
    from repair.io import load_safetensors

    before, _ = load_safetensors(timm_folder / "model.safetensors")
    after, meta = load_safetensors(out / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert set(changed) <= {"fc.weight", "fc.bias", "head.fc.weight", "head.fc.bias"} and changed
    assert meta["format"] == "pt" and meta["repair.method"] == "dfr"
    # the input was not modified and an existing output is not overwritten
    code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", "dfr", "--out", out, "-q")
    assert code == 2 and "already exists" in err


def test_fix_bare_safetensors_and_transformers(timm_folder, repair_images, bert_folder, repair_texts, tmp_path):
    from transformers import AutoModelForSequenceClassification

    bare = tmp_path / "w.safetensors"
    shutil.copy(timm_folder / "model.safetensors", bare)
    code, stdout, err = run_cli("fix", bare, "--arch", "test_resnet", "--class-names", "cat,dog,fox", "--data", repair_images, "--recipe", "afr", "--json", "-q")
    assert code == 0, err
    out = json.loads(stdout)["output"]
    assert out.endswith("w-repaired.safetensors")

    outdir = tmp_path / "bert-fixed"
    code, stdout, err = run_cli("fix", bert_folder, "--data", repair_texts, "--recipe", "dfr", "--out", outdir, "--json", "-q")
    assert code == 0, err
    hf = AutoModelForSequenceClassification.from_pretrained(str(outdir), local_files_only=True).eval()
    from repair.adapters import load_model

    ours = load_model(outdir)
    texts = ["the movie was great", "the movie was not awful"]
    batch = ours.collate(texts)
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, ours.logits_batch(batch, torch.device("cpu")), atol=1e-5, rtol=1e-5)
    assert (outdir / "vocab.txt").exists() and (outdir / "tokenizer_config.json").exists()


def test_fix_auto_label_free_with_eval(timm_folder, repair_images, tmp_path):
    test = make_images(tmp_path / "test", n_per_class=8, seed=5)
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--eval", test, "--eval-group-by", "place",
                                "--out", tmp_path / "auto", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["settings"]["group_labels"] == "none"
    assert "worst-class" in rep["selection_criterion"] and "out-of-fold" in rep["selection_criterion"]
    assert rep["measured_on"].startswith("separate evaluation data")
    assert rep["after"]["worst_group_accuracy"] is not None
    ran = [c for c in rep["candidates"] if "score" in c]
    assert len(ran) >= 3


def test_fix_bad_inputs(timm_folder, tmp_path):
    one = make_images(tmp_path / "one", classes=["cat"], n_per_class=4)
    code, _, err = run_cli("fix", timm_folder, "--data", one, "-q")
    assert code == 2 and "only one class" in err and err.count("\n") == 1
    two = make_images(tmp_path / "two", classes=["cat", "dog"], n_per_class=4)
    code, _, err = run_cli("fix", timm_folder, "--data", two, "-q")
    assert code == 2 and "covers 2 of the model's 3 classes" in err
    gap = make_images(tmp_path / "gap", n_per_class=4)
    lines = (gap / "metadata.csv").read_text().splitlines()
    fixed = [lines[0]] + [l.replace(",water", ",land") if l.split(",")[1] == "fox" else l for l in lines[1:]]
    (gap / "metadata.csv").write_text("\n".join(fixed) + "\n")
    code, _, err = run_cli("fix", timm_folder, "--data", gap, "--group-by", "place", "-q")
    assert code == 2 and "group fox|place=water has no samples" in err
    wrong = make_images(tmp_path / "wrong", classes=["cat", "dog", "wolf"], n_per_class=2)
    code, _, err = run_cli("fix", timm_folder, "--data", wrong, "-q")
    assert code == 2 and "'wolf' is not a class" in err
    code, _, err = run_cli("fix", timm_folder, "--data", two, "--recipe", "nope", "-q")
    assert code == 2 and "unknown recipe" in err
    assert not any(p.name.endswith("-repaired") for p in timm_folder.parent.iterdir())


def _check_export(rep, path_suffix):
    e = rep["export"]
    assert e["passed"] is True
    assert e["max_abs_diff"] is not None and e["max_abs_diff"] <= e["tolerance"]
    assert e["argmax_disagreements"] == e["near_ties"] and e["n_verified"] > 0     # a near tie may flip on another CPU
    assert e["path"].endswith(path_suffix)
    return e


def test_fix_export_onnx_timm_transformers_and_onnx(timm_folder, repair_images, bert_folder, repair_texts, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "timm-fixed"
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", "dfr", "--out", out,
                                "--export", "onnx", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    _check_export(rep, "model.onnx")
    m = onnx.load(str(out / "model.onnx"))
    props = {p.key: p.value for p in m.metadata_props}
    assert props["repair.method"] == "dfr" and props["repair.source_sha256"] == rep["model"]["sha256"]
    assert [i.name for i in m.graph.input] == ["pixel_values"] and [o.name for o in m.graph.output] == ["logits"]

    out = tmp_path / "bert-fixed"
    code, stdout, err = run_cli("fix", bert_folder, "--data", repair_texts, "--recipe", "afr", "--out", out,
                                "--export", "onnx", "--json", "-q")
    assert code == 0, err
    e = _check_export(json.loads(stdout), "model.onnx")
    assert e["bound"]["source"] == "default" and e["bound"]["ratio"] <= 1

    # a deployed ONNX model: repaired in its graph, same inputs/outputs
    src = tmp_path / "deployed.onnx"
    code, _, err = run_cli("export", timm_folder, "--data", repair_images, "--format", "onnx", "--out", src, "-q")
    assert code == 0, err
    fixed = tmp_path / "deployed-fixed.onnx"
    code, stdout, err = run_cli("fix", src, "--data", repair_images, "--recipe", "dfr", "--out", fixed,
                                "--export", "onnx", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    _check_export(rep, "deployed-fixed.onnx")
    a, b = onnx.load(str(src)), onnx.load(str(fixed))
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert len(a.graph.node) == len(b.graph.node)
    sess = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].name == "logits"


def test_fix_warns_when_the_figures_lack_a_class(timm_folder, repair_images, tmp_path):
    test = make_images(tmp_path / "test2", classes=["cat", "dog"], n_per_class=6, seed=7)
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--eval", test, "--recipe", "dfr",
                                "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert any("no samples of class(es) fox" in w for w in rep["warnings"]), rep["warnings"]
    assert "no samples of class(es) fox" in err and err.count("no samples of class(es)") == 1


def test_fix_refuses_a_tolerance_without_an_export(timm_folder, repair_images, tmp_path):
    code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--tolerance", "1e-3",
                           "--out", tmp_path / "o", "-q")
    assert code == 2 and "--export onnx" in err and not (tmp_path / "o").exists()


def test_fix_warns_when_the_chosen_heads_solver_stops_at_its_cap(timm_folder, repair_images, tmp_path):
    # three classes: dfr's fast protocol ends in one multinomial fit, which takes the recipe's max_iter
    # as the L-BFGS path does (ten iterations per step; it used its own cap whatever the user set) and
    # a tighter tol; a tolerance float32 cannot reach does not converge, and the run says so
    recipe = tmp_path / "capped.yaml"
    recipe.write_text("name: capped\ncandidates:\n  - method: dfr\n    params: {protocol: fast, max_iter: 1, tol: 1.0e-30}\n")
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", recipe,
                                "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["diagnostics"]["head_iters"] <= 10 and rep["diagnostics"]["head_converged"] is False
    said = [w for w in rep["warnings"] if "iteration cap" in w]
    assert len(said) == 1 and said[0].startswith("dfr") and "head_converged" in said[0], rep["warnings"]
    assert f"warning: {said[0]}" in err
    # at the defaults the same fit converges and nothing is said
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", "dfr",
                                "--out", tmp_path / "o2", "--json", "-q")
    assert code == 0, err
    assert not [w for w in json.loads(stdout)["warnings"] if "iteration cap" in w]


def test_fix_export_verifies_at_most_max_verify_samples_picked_as_export_picks_them(timm_folder, repair_images,
                                                                                    tmp_path):
    """README: the verification runs on real samples of --data, up to --max-verify (default 512); fix's
    ran on every sample of the repair set, and had no --max-verify."""
    from repair.data import load_data
    from repair.outputs import DEFAULT_MAX_VERIFY

    n = len(load_data(repair_images).items)
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", "dfr", "--out", tmp_path / "a",
                                "--export", "onnx", "--max-verify", "5", "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["export"]["n_verified"] == 5 < n
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", "dfr", "--out", tmp_path / "b",
                                "--export", "onnx", "--json", "-q")
    assert code == 0 and json.loads(stdout)["export"]["n_verified"] == min(n, DEFAULT_MAX_VERIFY), err
    code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--max-verify", "5", "--out", tmp_path / "c")
    assert code == 2 and "--export onnx" in err and not (tmp_path / "c").exists()


def test_fix_export_of_a_text_weights_file_says_the_onnx_needs_its_tokenizer(bert_folder, repair_texts, tmp_path):
    """fix of a transformers weights file writes a bare .safetensors and its ONNX beside it, where no
    tokenizer is: the same notice as repair export (the README said the ONNX always sits beside it)."""
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli("fix", bert_folder / "model.safetensors", "--data", repair_texts, "--recipe", "dfr",
                           "--out", out / "fixed.safetensors", "--export", "onnx", "--max-verify", "8", "-q")
    assert code == 0, err
    assert (out / "fixed.onnx").exists() and "tokenizer files beside it" in err
    code, _, err = run_cli("fix", bert_folder, "--data", repair_texts, "--recipe", "dfr", "--out", tmp_path / "f",
                           "--export", "onnx", "--max-verify", "8", "-q")
    assert code == 0 and "tokenizer files beside it" not in err, err


def test_eval_warns_when_the_figures_lack_a_class_or_rest_on_a_few_samples_of_one(timm_folder, tmp_path):
    """Found by two audits: `repair fix` warned that its figures had no samples of a class, `repair eval`
    said nothing (worst-class 90% with a class of n=0; 0% resting on one sample): one rule
    (selection.figure_warnings) for both commands now."""
    two = make_images(tmp_path / "two", classes=["cat", "dog"], n_per_class=12, seed=7)
    code, out, err = run_cli("eval", timm_folder, "--data", two, "--json", "-q")
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert any("no samples of class(es) fox" in w for w in warnings), warnings
    assert "no samples of class(es) fox" in err
    few = make_images(tmp_path / "few", n_per_class=12, seed=8, with_metadata=False)
    for f in sorted((few / "fox").iterdir())[1:]:
        f.unlink()
    code, out, err = run_cli("eval", timm_folder, "--data", few, "--json", "-q")
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert any("class fox has only 1 samples" in w for w in warnings), warnings
    assert not any("class cat" in w for w in warnings), warnings


def test_a_class_of_a_few_distinct_samples_is_warned_of_however_many_copies(tmp_path, timm_folder):
    """Found by a review: the class warning of `repair eval` (no groups: worst-class accuracy is the
    headline) counted every copy of a sample, so twelve copies of one picture read as twelve samples and
    no warning was given; groups already counted copies once. Classes now do too."""
    from repair.selection import figure_warnings

    data = make_images(tmp_path / "d", n_per_class=12, with_metadata=False)
    cats = sorted((data / "cat").iterdir())
    for f in cats[1:]:
        shutil.copy(cats[0], f)
    code, out, err = run_cli("eval", timm_folder, "--data", data, "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    cat = next(c for c in doc["per_class"] if c["name"] == "cat")
    assert cat["n"] == 12 and cat["n_distinct"] == 1
    assert "class cat has only 1 distinct samples (12 rows)" in err, err
    assert not any("class dog" in w for w in doc["warnings"])
    rows = {"per_class": [{"name": "a", "n": 12, "n_distinct": 12}, {"name": "b", "n": 12, "n_distinct": 3}],
            "per_group": None}
    assert [w.split(":")[1].split(" has")[0] for w in figure_warnings(rows, what="x")] == [" class b"]
