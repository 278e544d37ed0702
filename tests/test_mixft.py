"""``mixft`` (data-mixing fine-tuning) end to end on planted shortcuts: a tiny timm CNN and a
tiny BERT are trained with ERM on data whose spurious attribute (background colour; a
"not"/"never" token) predicts the label better than the core feature, then repaired through
``repair fix``; worst-group accuracy on separate test data must rise by a wide margin, the
output must reload with plain timm / transformers and compute the repaired logits, frozen
BatchNorm statistics must be untouched, and the same seed must give the same weights."""
from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch

from conftest import make_bert_folder, make_timm_folder, run_cli

MARGIN = 0.30          # worst-group accuracy must rise by at least 30 points



def _recipe(path, **params):
    body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in params.items())
    path.write_text(f"name: {path.stem}\ncandidates:\n  - method: mixft\n    params: {{{body}}}\n")
    return path


# ------------------------------------------------------------------ planted shortcuts
def _images(root, n_per_group, align, seed, size=32):
    """Two classes; core = stripe orientation at low contrast, spurious = a red or blue tint
    (``align``: share of each class with its own colour; None = group-balanced)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    stripes = ((np.arange(size) // 3) % 2) * 10.0
    for c, cname in enumerate(("a", "b")):
        (root / cname).mkdir(parents=True, exist_ok=True)
        for bg in ("red", "blue"):
            aligned = (bg == "red") == (c == 0)
            n = n_per_group if align is None else int(round(n_per_group * 2 * (align if aligned else 1 - align)))
            for i in range(n):
                img = rng.normal(128, 30, (size, size, 3))
                img[..., 0 if bg == "red" else 2] += 70
                img += (stripes[:, None] if c == 0 else stripes[None, :])[..., None]
                rel = f"{cname}/{bg}{i:03d}.png"
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / rel)
                rows.append({"img_filename": rel, "y": cname, "bg": bg})
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "bg"])
        w.writeheader()
        w.writerows(rows)
    return root


POS, NEG, FILL = ["good", "great", "fun"], ["bad", "awful", "boring"], ["the", "movie", "plot", "was", "is", "a"]


def _texts(path, n_per_group, align, seed, core_agree=1.0):
    """Sentiment word = core (agreeing with the label with probability ``core_agree``),
    "not"/"never" = the spurious token (with negative reviews, ``align`` of the time)."""
    rng = np.random.default_rng(seed)
    rows = []
    for lab in ("negative", "positive"):
        for neg in ("yes", "no"):
            aligned = (neg == "yes") == (lab == "negative")
            n = n_per_group if align is None else int(round(n_per_group * 2 * (align if aligned else 1 - align)))
            for _ in range(n):
                core = (POS if lab == "positive" else NEG) if rng.random() < core_agree else POS + NEG
                words = list(rng.choice(FILL, size=rng.integers(2, 5))) + [str(rng.choice(core))]
                if neg == "yes":
                    words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(["not", "never"])))
                rows.append({"text": " ".join(words), "label": lab, "negation": neg})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label", "negation"])
        w.writeheader()
        w.writerows(rows[i] for i in rng.permutation(len(rows)))
    return path


def _erm(adapter, items, y, steps, lr, seed=0):
    m = adapter.model.train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        batch = adapter.collate([items[i] for i in idx.tolist()])
        out = m(**batch).logits if isinstance(batch, dict) else m(batch)
        loss = torch.nn.functional.cross_entropy(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def shortcut_cnn(tmp_path_factory):
    from timm.models import save_for_hf

    from repair.adapters import load_model
    from repair.data import load_data

    root = tmp_path_factory.mktemp("mixft_img")
    train = _images(root / "train", 60, 0.95, 0)
    val, test = _images(root / "val", 24, None, 1), _images(root / "test", 25, None, 2)
    ad = load_model(make_timm_folder(root / "init", classes=["a", "b"]))
    d = load_data(train)
    m = _erm(ad, list(d.items), torch.tensor([0 if lab == "a" else 1 for lab in d.labels]), 40, 3e-3)
    model = root / "erm"
    save_for_hf(m, str(model), model_config={"label_names": ["a", "b"]}, safe_serialization=True)
    cfg = json.loads((model / "config.json").read_text())
    cfg["pretrained_cfg"].update({"input_size": [3, 32, 32], "crop_pct": 1.0, "crop_mode": "center"})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "pytorch_model.bin").unlink(missing_ok=True)
    return model, val, test


@pytest.fixture(scope="module")
def shortcut_bert(tmp_path_factory):
    from transformers import BertTokenizer

    from repair.adapters import load_model
    from repair.data import load_data

    root = tmp_path_factory.mktemp("mixft_txt")
    train = _texts(root / "train.csv", 100, 0.95, 0, core_agree=0.75)
    val, test = _texts(root / "val.csv", 24, None, 1), _texts(root / "test.csv", 50, None, 2)
    init = make_bert_folder(root / "init")
    BertTokenizer(str(init / "vocab.txt"), do_lower_case=True).save_pretrained(str(init))   # a word-level vocab
    ad = load_model(init)
    d = load_data(train)
    m = _erm(ad, list(d.items), torch.tensor([1 if lab == "positive" else 0 for lab in d.labels]), 150, 3e-3)
    model = root / "erm"
    m.save_pretrained(str(model), safe_serialization=True)
    ad.tokenizer.save_pretrained(str(model))
    return model, val, test


# ------------------------------------------------------------------ images
def test_mixft_repairs_a_cnn_shortcut_with_group_labels(shortcut_cnn, tmp_path):
    import timm

    from repair.adapters import load_model
    from repair.io import load_safetensors

    model, val, test = shortcut_cnn
    recipe = _recipe(tmp_path / "cnn.yaml", epochs=15, batch_size=16, lr=3e-3, scope="all")
    out = tmp_path / "fixed"
    code, stdout, err = run_cli("fix", model, "--data", val, "--group-by", "bg", "--recipe", recipe, "--eval", test,
                                "--out", out, "--seed", "1", "--export", "onnx", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["method"] == "mixft" and rep["kind"] == "model"
    assert rep["export"]["passed"] and (out / "model.onnx").exists()
    assert rep["before"]["worst_group_accuracy"] < 0.2
    assert rep["after"]["worst_group_accuracy"] >= rep["before"]["worst_group_accuracy"] + MARGIN
    diag = rep["diagnostics"]
    assert diag["groups"] == "given" and diag["mixing"]["space"] == "preprocessed pixels"
    assert diag["session"]["criterion"] == "worst_group"
    assert diag["loop"]["early_stop"] == {"applied": "after_gain", "why": None}     # mixft's own default
    # the backbone changed (not only the head), BatchNorm statistics are bit-identical
    before, _ = load_safetensors(model / "model.safetensors")
    after, meta = load_safetensors(out / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(rep["model_change"]["changed_tensors"])
    assert any(k.startswith("conv1") or k.startswith("layer1.") for k in changed)
    stats = [k for k in before if "running_" in k or "num_batches_tracked" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    settings = json.loads(meta["repair.settings"])
    assert settings["config"]["partner"] and settings["config"]["mix_weight"] == pytest.approx(0.3)
    # plain timm reloads it and computes what the repaired adapter computes
    cfg = json.loads((out / "config.json").read_text())
    plain = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"]).eval()
    timm.models.load_checkpoint(plain, str(out / "model.safetensors"), strict=True)
    ours = load_model(out)
    x = ours.collate(sorted(test.rglob("*.png"))[:6])
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours.logits_batch(x, torch.device("cpu")), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ text
def test_mixft_repairs_a_bert_shortcut_without_labels_deterministically(shortcut_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from repair.io import load_safetensors

    model, val, test = shortcut_bert
    recipe = _recipe(tmp_path / "bert.yaml", epochs=15, batch_size=16, lr=2e-3, scope="all")
    outs = []
    for k in range(2):
        out = tmp_path / f"fixed{k}"
        code, stdout, err = run_cli("fix", model, "--data", val, "--recipe", recipe, "--eval", test,
                                    "--eval-group-by", "negation", "--out", out, "--seed", "2", "--json", "-q")
        assert code == 0, err
        outs.append((out, json.loads(stdout)))
    (out, rep), (out2, _) = outs
    assert rep["before"]["worst_group_accuracy"] < 0.2
    assert rep["after"]["worst_group_accuracy"] >= rep["before"]["worst_group_accuracy"] + MARGIN
    diag = rep["diagnostics"]
    assert diag["groups"] == "inferred: errors" and diag["mixing"]["space"] == "token embeddings"
    assert diag["session"]["criterion"] == "worst_class"
    assert any(".encoder." in k or "embeddings" in k for k in rep["model_change"]["changed_tensors"])
    # the same seed gives the same weights
    a, _ = load_safetensors(out / "model.safetensors")
    b, _ = load_safetensors(out2 / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # plain transformers reloads it and reproduces the repaired logits
    plain = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    texts = [r["text"] for r in csv.DictReader(open(test))][:8]
    with torch.no_grad():
        lg = plain(**tok(texts, padding=True, return_tensors="pt")).logits
    from repair.adapters import load_model

    ours = load_model(out)
    torch.testing.assert_close(lg, ours.logits_batch(ours.collate(texts), torch.device("cpu")), atol=1e-5, rtol=1e-5)


def test_text_mixing_hooks(shortcut_bert):
    """lambda = 0 at a hidden layer is the plain forward; mix points are embeddings + layers."""
    from repair.adapters import load_model

    model, val, _ = shortcut_bert
    tm = load_model(model).trainable()
    assert len(tm.mix_points()) == 1 + tm.module.config.num_hidden_layers
    texts = [r["text"] for r in csv.DictReader(open(val))][:6]
    enc = tm.encode(texts)
    idx, partner = torch.arange(3), torch.arange(3, 6)
    tm.module.eval()
    with torch.no_grad():
        plain = tm.logits(tm.batch(enc, idx, "cpu"))
        same = tm.mixed_logits(enc, idx, partner, torch.zeros(3), "cpu", point=1)
        mixed = tm.mixed_logits(enc, idx, partner, torch.full((3,), 0.5), "cpu", point=0)
    # same padded length for the pair changes nothing under the sample's own mask
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed, plain)


# ------------------------------------------------------------------ LoRA
def test_lora_adapters_are_merged_away(shortcut_bert, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from repair.io import load_safetensors

    model, val, test = shortcut_bert
    # last:2 = the head, the pooler and encoder layer 1 (of 0, 1)
    recipe = _recipe(tmp_path / "lora.yaml", epochs=10, batch_size=16, lr=2e-2, scope="last:2", lora=True,
                     lora_rank=2, patience=0)
    out = tmp_path / "lora"
    code, stdout, err = run_cli("fix", model, "--data", val, "--recipe", recipe, "--out", out, "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["diagnostics"]["lora"]["wrapped_layers"] > 0
    changed = rep["model_change"]["changed_tensors"]
    tensors, _ = load_safetensors(out / "model.safetensors")
    assert not any("lora" in k for k in tensors)
    assert any(k.startswith("bert.encoder.layer.1.") and k.endswith(".weight") for k in changed)
    assert not any(k.startswith(("bert.embeddings", "bert.encoder.layer.0.")) for k in changed)
    AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True)


def test_lora_without_peft_is_exit_2(shortcut_bert, tmp_path, monkeypatch):
    model, val, _ = shortcut_bert
    monkeypatch.setitem(sys.modules, "peft", None)         # as if not installed
    recipe = _recipe(tmp_path / "lora.yaml", epochs=1, lora=True, scope="last:1")
    code, _, err = run_cli("fix", model, "--data", val, "--recipe", recipe, "--out", tmp_path / "x", "-q")
    assert code == 2 and 'pip install -e ".[peft]"' in err


# ------------------------------------------------------------------ pipeline
def test_model_repairs_are_skipped_when_the_fit_part_cannot_be_folded(shortcut_cnn, tmp_path, monkeypatch):
    """A head and a model repair compared on folds that cannot be drawn (too few samples): the head
    is the result and the model repair is reported skipped with the reason, never scored on nothing."""
    import repair.selection as sel

    model, val, _ = shortcut_cnn
    recipe = tmp_path / "head-and-ft.yaml"
    recipe.write_text("name: head-and-ft\ncandidates:\n  - method: dfr\n  - method: mixft\n    params: {epochs: 1}\n")
    monkeypatch.setattr(sel, "kfold_parts", lambda *a, **k: [])
    code, stdout, err = run_cli("fix", model, "--data", val, "--recipe", recipe, "--budget", "2steps",
                                "--out", tmp_path / "out", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["kind"] == "head" and rep["candidate"] == "dfr"
    skipped = [r for r in rep["candidates"] if r["kind"] == "model"]
    assert skipped and all("too few samples" in r["skipped"] for r in skipped)


def test_allow_finetune_escalates_auto_and_reports_both(shortcut_cnn, tmp_path):
    """auto-ft scores mixft on the heads' own folds (out-of-fold, same criterion) against the head
    auto returns; when the head wins, the result is exactly auto's head."""
    from safetensors.torch import load_file

    model, val, _ = shortcut_cnn
    code, stdout, err = run_cli("fix", model, "--data", val, "--allow-finetune", "--budget", "4steps",
                                "--out", tmp_path / "ft", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["recipe"] == "auto-ft"
    compared = [r for r in rep["candidates"] if r["kind"] == "model" and "the same" in (r.get("scored_on") or "")]
    skipped = [r for r in rep["candidates"] if r["kind"] == "model" and r.get("skipped")]
    assert len(compared) + len(skipped) == 1, rep["candidates"]
    assert [r["kind"] for r in rep["candidates"] if r.get("role") == "head to beat"] == ["head"]
    if compared:
        assert compared[0]["candidate"].startswith("mixft") and 2 <= compared[0]["steps"] <= 4 * 2  # <= 4 steps x 2 folds
    else:
        assert "no model repair can win" in skipped[0]["skipped"]
    code, stdout, err = run_cli("fix", model, "--data", val, "--out", tmp_path / "auto", "--json", "-q")
    assert code == 0, err
    auto = json.loads(stdout)
    if rep["kind"] == "head":
        assert rep["candidate"] == auto["candidate"]
        a, b = load_file(str(tmp_path / "ft" / "model.safetensors")), load_file(str(tmp_path / "auto" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run_cli("fix", model, "--data", val, "--recipe", "dfr", "--allow-finetune", "-q")
    assert code == 2 and "--allow-finetune" in err


def test_a_model_repair_is_trained_and_scored_on_the_heads_folds(shortcut_cnn, tmp_path):
    """A recipe of a head and a model repair whose head leaves room to win: the model repair trains on
    each fold (or stops after the first that shows it cannot win), is scored out of fold on the head's
    folds, and the result is the head unless the repair beat it by the gain it needed."""
    model, val, _ = shortcut_cnn
    recipe = tmp_path / "weak-ft.yaml"               # a head held back by a very strong penalty
    recipe.write_text("name: weak-ft\ncandidates:\n  - method: dfr\n    params: {c_grid: [0.00001]}\n"
                      "  - method: mixft\n    params: {epochs: 1}\n")
    code, stdout, err = run_cli("fix", model, "--data", val, "--recipe", recipe, "--budget", "3steps",
                                "--out", tmp_path / "out", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    head = next(r for r in rep["candidates"] if r.get("role") == "head to beat")
    assert head["score"] + head["required_gain"] < 1.0          # room to win: the repair is tried
    ft = [r for r in rep["candidates"] if r["kind"] == "model" and r.get("role") != "final fit"]
    assert len(ft) == 1 and not ft[0].get("skipped") and "the same 2 folds" in ft[0]["scored_on"]
    if "stopped" in ft[0]:
        assert ft[0]["scored_on"].startswith("1 of") and ft[0]["score_at_most"] < head["score"] + head["required_gain"]
        assert 1 <= ft[0]["steps"] <= 3 and rep["kind"] == "head"
    else:
        assert 2 <= ft[0]["steps"] <= 3 * 2
        won = ft[0]["score"] >= head["score"] + head["required_gain"] - 1e-9
        assert rep["kind"] == ("model" if won else "head")


def test_too_small_for_a_held_out_part_is_exit_2(shortcut_cnn, tmp_path):
    model, _, _ = shortcut_cnn
    tiny = _images(tmp_path / "tiny", 2, None, 5)
    code, _, err = run_cli("fix", model, "--data", tiny, "--group-by", "bg", "--recipe", "mixft", "-q")
    errors = [line for line in err.splitlines() if not line.startswith("warning:")]     # -q keeps warnings
    assert code == 2 and "too small" in err and "at least 2" in err and len(errors) == 1, err
