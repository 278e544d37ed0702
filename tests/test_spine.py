"""The spine: adapters, data, embeddings cache, eval/probe, and bad input (the command line's
bad-input matrix is tests/test_bad_inputs.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, SHARED, make_images, make_texts, run_cli
from repair.adapters import LoadOptions, load_model
from repair.api import RuntimeOptions, evaluate_model, prepare
from repair.data import DataOptions, encode, load_data
from repair.errors import BadInput


def full_logits(adapter, items):
    batch = adapter.collate(items)
    return adapter.logits_batch(batch, torch.device("cpu"))


# ------------------------------------------------------------------ adapters
def test_timm_folder_embeddings_are_head_input(timm_folder, image_data):
    a = load_model(timm_folder)
    assert a.family == "timm" and a.class_names == CLASSES
    items = load_data(image_data).items[:5]
    emb = a.embed_batch(a.collate(items), torch.device("cpu"))
    W, b = a.head_params()
    assert emb.shape == (5, W.shape[1])
    torch.testing.assert_close(emb @ W.T + b, full_logits(a, items), atol=1e-5, rtol=1e-5)


def test_bare_safetensors_needs_arch(timm_folder, image_data, tmp_path):
    bare = tmp_path / "weights.safetensors"
    shutil.copy(timm_folder / "model.safetensors", bare)
    with pytest.raises(BadInput, match="--arch"):
        load_model(bare)
    a = load_model(bare, LoadOptions(arch="test_resnet"))
    assert len(a.class_names) == 3  # num_classes read off the head tensor
    ref = load_model(timm_folder)
    W1, _ = a.head_params()
    W2, _ = ref.head_params()
    assert torch.equal(W1, W2)


def test_unknown_arch_and_user_path_never_a_model_name(timm_folder, tmp_path):
    bare = tmp_path / "w.safetensors"
    shutil.copy(timm_folder / "model.safetensors", bare)
    for arch in ("no_such_net", "hf-hub:someone/model", str(tmp_path)):
        with pytest.raises(BadInput, match="unknown timm architecture"):
            load_model(bare, LoadOptions(arch=arch))


def test_head_shape_disagrees_with_config(timm_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(timm_folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_classes"] = 7
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="num_classes=7"):
        load_model(bad)


def test_wrong_architecture_for_weights(timm_folder, tmp_path):
    bare = tmp_path / "w.safetensors"
    shutil.copy(timm_folder / "model.safetensors", bare)
    with pytest.raises(BadInput, match="does not match|no head tensor|shape"):
        load_model(bare, LoadOptions(arch="test_vit"))


def test_truncated_and_corrupt_safetensors(timm_folder, tmp_path):
    data = (timm_folder / "model.safetensors").read_bytes()
    for name, blob in (("trunc", data[: len(data) // 2]), ("corrupt", b"\x00garbage" * 10)):
        d = tmp_path / name
        shutil.copytree(timm_folder, d)
        (d / "model.safetensors").write_bytes(blob)
        with pytest.raises(BadInput, match="safetensors"):
            load_model(d)


def test_pickle_refused_unless_allowed(timm_folder, tmp_path):
    from repair.io import load_safetensors

    tensors, _ = load_safetensors(timm_folder / "model.safetensors")
    pt = tmp_path / "w.pt"
    torch.save(tensors, pt)
    with pytest.raises(BadInput, match="allow-pickle"):
        load_model(pt, LoadOptions(arch="test_resnet"))
    a = load_model(pt, LoadOptions(arch="test_resnet", allow_pickle=True))
    assert len(a.class_names) == 3


def test_a_pickle_only_transformers_folder_loads_with_allow_pickle_and_is_written_as_safetensors(
        bert_folder, text_data, tmp_path):
    """An older Hub model holds only pytorch_model.bin: refused without --allow-pickle (as any pickle),
    read weights-only with it (the flag was ignored for transformers folders: "re-save"), and the
    repaired folder holds model.safetensors, never the source's pickle; it reloads with plain
    transformers to the figures fix printed."""
    from repair.io import load_safetensors
    from transformers import AutoModelForSequenceClassification

    d = tmp_path / "pickled"
    shutil.copytree(bert_folder, d)
    tensors, _ = load_safetensors(d / "model.safetensors")
    torch.save(tensors, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(BadInput, match="allow-pickle"):
        load_model(d)
    a = load_model(d, LoadOptions(allow_pickle=True))
    assert a.class_names == ["negative", "positive"] and a.weights_path.name == "pytorch_model.bin"
    texts = load_data(text_data).items[:4]
    b = load_model(bert_folder)
    torch.testing.assert_close(full_logits(a, texts), full_logits(b, texts))
    out = tmp_path / "o"
    code, stdout, err = run_cli("fix", d, "--data", text_data, "--recipe", "dfr", "--allow-pickle", "--out", out,
                                "--json", "-q")
    assert code == 0, err
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    m = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    c = load_model(out)
    with torch.no_grad():
        enc = c.collate(texts)
        torch.testing.assert_close(m(**enc).logits, full_logits(c, texts), atol=1e-5, rtol=1e-5)
    other = make_texts(tmp_path / "other.csv", n=30, seed=11)     # not the repair set (that is refused)
    code, stdout2, err = run_cli("eval", out, "--data", other, "--json", "-q")
    again = json.loads(stdout2)
    assert code == 0 and again["n"] == 30, err


def test_transformers_folder(bert_folder, text_data):
    a = load_model(bert_folder)
    assert a.family == "transformers" and a.class_names == ["negative", "positive"]
    texts = load_data(text_data).items[:4]
    emb = a.embed_batch(a.collate(texts), torch.device("cpu"))
    W, b = a.head_params()
    torch.testing.assert_close(emb @ W.T + b, full_logits(a, texts), atol=1e-5, rtol=1e-5)


def test_transformers_missing_head_is_refused(bert_folder, tmp_path):
    from repair.io import load_safetensors, save_safetensors

    d = tmp_path / "nohead"
    shutil.copytree(bert_folder, d)
    tensors, meta = load_safetensors(d / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    save_safetensors(tensors, d / "model.safetensors", {"format": "pt"})
    with pytest.raises(BadInput, match="random head"):
        load_model(d)


FACTORY_SRC = '''
import torch.nn as nn
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
'''


def test_factory_module(tmp_path, image_data, monkeypatch):
    from repair.io import save_safetensors

    (tmp_path / "tinyfactory.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("tinyfactory")
    model = mod.build()
    w = tmp_path / "f.safetensors"
    save_safetensors(model.state_dict(), w, {})
    a = load_model(w, LoadOptions(factory="tinyfactory:build", image_size=32, mean=[0.5] * 3, std=[0.5] * 3))
    assert a.head_name == "6" and a.embed_batch(a.collate(load_data(image_data).items[:2]), torch.device("cpu")).shape == (2, 8)


# ---------------------------------------------------------------------- data
def test_data_formats(image_data, tmp_path):
    meta = load_data(image_data)                       # metadata.csv
    assert meta.modality == "image" and "place" in meta.attributes and len(meta) == 18
    folders = make_images(tmp_path / "plain", with_metadata=False)
    plain = load_data(folders)                          # class subfolders
    assert plain.labels.count("cat") == 6 and not plain.attributes
    csvf = make_texts(tmp_path / "t.csv")
    jsonl = make_texts(tmp_path / "t.jsonl", fmt="jsonl")
    assert load_data(csvf).items == load_data(jsonl).items
    enc = encode(meta, CLASSES, "place")
    assert len(enc.group_names) == 6 and enc.groups.max().item() == 5


def test_waterbirds_columns_by_flags(tmp_path):
    root = make_images(tmp_path / "wb", with_metadata=False)
    rows = ["file,species,bg"] + [f"{p.relative_to(root)},{i % 3},{i % 2}" for i, p in enumerate(sorted(root.rglob('*.png')))]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    d = load_data(root, DataOptions(path_col="file", label_col="species", group_by="bg"))
    enc = encode(d, CLASSES, "bg")  # integer labels map to the model's class order
    assert enc.y.tolist()[:3] == [0, 1, 2]


def test_sst2_style_tsv(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text('label\tcontent\n1\tit \'s a "charming" movie\n0\tdoes n\'t work\n', encoding="utf-8")
    d = load_data(f)
    assert d.modality == "text" and d.items[0] == 'it \'s a "charming" movie'


# ------------------------------------------------------------------- eval/CLI
def test_eval_json_and_gate(timm_folder, image_data):
    code, out, err = run_cli("eval", timm_folder, "--data", image_data, "--group-by", "place", "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["n"] == 18 and len(rep["per_group"]) == 6
    worst = min(g["accuracy"] for g in rep["per_group"])
    assert rep["worst_group_accuracy"] == pytest.approx(worst)
    assert sum(g["n"] for g in rep["per_group"]) == 18
    code, out, err = run_cli("eval", timm_folder, "--data", image_data, "--group-by", "place", "-q",
                             "--fail-under-wga", "100%")
    assert worst < 1.0 and code == 1 and "worst-group" in err
    code, out, err = run_cli("eval", timm_folder, "--data", image_data, "--group-by", "place", "-q",
                             "--fail-under-wga", "1.01")      # neither a fraction nor a percentage
    assert code == 2 and "--fail-under-wga" in err and len(err.strip().splitlines()) == 1
    code, _, _ = run_cli("eval", timm_folder, "--data", image_data, "-q", "--fail-under-acc", "0")
    assert code == 0


@pytest.mark.parametrize("json_out", [False, True])
def test_a_gate_fails_closed_when_the_reader_closes_stdout_early(timm_folder, image_data, json_out):
    """``repair eval ... | grep -q`` / ``| head``: the reader is gone before the table is written.
    The gate is still checked and a failure still exits 1 (a pipefail CI step must not pass)."""
    import subprocess
    import sys

    def run(gate):
        args = [sys.executable, "-m", "repair_cli.main", "eval", str(timm_folder), "--data", str(image_data),
                "--group-by", "place", "-q", "--fail-under-wga", gate] + (["--json"] if json_out else [])
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()                    # before the command has written anything: its writes get EPIPE
        err = p.stderr.read().decode()
        return p.wait(timeout=300), err

    code, err = run("100%")
    assert code == 1 and "FAILED: worst-group" in err and "Traceback" not in err
    code, err = run("0%")
    assert code == 0 and "FAILED" not in err and "Traceback" not in err


def test_eval_text_model(bert_folder, text_data):
    code, out, err = run_cli("eval", bert_folder, "--data", text_data, "--group-by", "negation", "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["n"] == 40 and len(rep["per_group"]) == 4


def test_second_eval_uses_cache(timm_folder, image_data, tmp_path):
    rt = RuntimeOptions(cache_dir=str(tmp_path / "c"), progress=False)
    first = evaluate_model(timm_folder, image_data, runtime=rt)
    second = evaluate_model(timm_folder, image_data, runtime=rt)
    assert not first["embedding"]["from_cache"] and second["embedding"]["from_cache"]
    assert first["accuracy"] == second["accuracy"]
    # a changed image changes the fingerprint: no stale cache
    p = prepare(timm_folder, image_data, runtime=rt)
    assert p.emb.from_cache


def test_probe_cli(timm_folder, image_data, bert_folder, text_data):
    code, out, err = run_cli("probe", timm_folder, "--data", image_data, "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    assert len(rep["neuron_spuriousness"]) == 3 and len(rep["per_class"]) == 3
    assert sum(g["n"] for g in rep["pseudo_groups"]) == 18
    code, out, err = run_cli("probe", bert_folder, "--data", text_data, "-q")
    assert code == 0 and "significantly higher in a class's misclassified samples" in out


def test_probe_scores_find_planted_neuron():
    from repair.probing import neuron_deltas

    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 6, generator=g)
    y = torch.arange(400) % 2
    pred = y.clone()
    wrong = torch.arange(400) % 5 == 0
    pred[wrong] = 1 - y[wrong]
    X[wrong, 3] += 3.0  # neuron 3 fires on the errors
    d, _ = neuron_deltas(X, y, pred, 2)
    assert d.argmax(1).tolist() == [3, 3] and d[:, 3].min() > 2.0


def test_console_script_debug_traceback(tmp_path, image_data):
    # this installation's script (beside the interpreter), not whichever `repair` is first on PATH
    beside = Path(sys.executable).parent / "repair"
    exe = str(beside) if beside.exists() else shutil.which("repair")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    r = subprocess.run([exe, "eval", str(tmp_path / "nope"), "--data", str(image_data)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stdout == ""
    r = subprocess.run([exe, "--debug", "eval", str(tmp_path / "nope"), "--data", str(image_data)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr


# ------------------------------------------------------- the real checkpoint
@pytest.mark.skipif(not (SHARED / "models" / "mobilenetv2_100.tflite_in1k").exists(), reason="../shared not present")
def test_real_mobilenet_model_args_and_predictions(tmp_path):
    import timm
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder = SHARED / "models" / "mobilenetv2_100.tflite_in1k"
    a = load_model(folder)
    paths = []
    for i, im in enumerate(load_sample_images().images):
        p = tmp_path / f"{i}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    logits = full_logits(a, paths)
    top5 = [[a.class_names[j] for j in row.topk(5).indices] for row in logits]
    # china.jpg is a Chinese temple; flower.jpg a close-up of a flower
    assert any(k in " ".join(top5[0]) for k in ("palace", "monastery", "temple", "pagoda", "bell cote"))
    assert any(k in " ".join(top5[1]) for k in ("daisy", "bee", "honeycomb", "pot", "vase", "hip"))
    # without model_args (pad_type="same") the weights load but the features are wrong
    from repair.io import load_safetensors

    naive = timm.create_model("mobilenetv2_100", num_classes=1000).eval()
    naive.load_state_dict(load_safetensors(folder / "model.safetensors")[0])
    x = a.collate(paths)
    with torch.no_grad():
        f_ok = a.embed_batch(x, torch.device("cpu"))
        f_naive = naive.forward_head(naive.forward_features(x), pre_logits=True)
    rel = (f_ok - f_naive).norm() / f_ok.norm()
    assert rel > 0.05, f"pad_type made no difference ({rel:.4f})"


def test_loading_a_model_leaves_the_callers_random_stream_alone(timm_folder, bert_folder):
    """Found by an audit: building the network before its weights are read drew from torch's global
    generator, so ``repair.load_model`` (and every call that loads one) moved the caller's stream."""
    import torch

    from repair.adapters import load_model

    for folder in (timm_folder, bert_folder):
        before = torch.random.get_rng_state()
        load_model(folder)
        assert torch.equal(before, torch.random.get_rng_state()), folder


def test_probe_dispersion_counts_a_tie_as_no_dispersion():
    """Coinciding class prototypes (constant embeddings): the nearest by index made the first class
    look compact (0%) and every other one wholly dispersed (100%); a tie disperses nothing."""
    from repair.probing import probe

    X = torch.ones(12, 4)
    y = torch.arange(12) % 3
    rep = probe(X, y, torch.randn(3, 4), torch.zeros(3), ["a", "b", "c"])
    assert [c["dispersion"] for c in rep["per_class"]] == [0.0, 0.0, 0.0]
    X2 = torch.cat([torch.zeros(4, 2), torch.ones(4, 2) * 5])
    X2[3] = 5.0                                  # a row of class 0 sitting on class 1's prototype
    y2 = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rep = probe(X2, y2, torch.randn(2, 2), torch.zeros(2), ["a", "b"])
    assert [c["dispersed"] for c in rep["per_class"]] == [1, 0]
