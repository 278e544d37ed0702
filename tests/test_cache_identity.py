"""The embedding cache serves a run only embeddings of the very network, preprocessing and data it
measures: anything that changes what the body computes changes the key (architecture settings, a
transformers config, a factory, the tokenizer's content, an image replaced with its time set back),
and the cache never lands where the next repair would ship it."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, factory_weights, make_bert_folder, make_images, make_texts, make_timm_folder, run_cli
from repair.adapters import LoadOptions, load_model
from repair.api import RuntimeOptions, prepare
from repair.data import load_data
from repair.embeddings import cache_key
from repair.errors import BadInput


def _key(model, data, load=None) -> str:
    return cache_key(load_model(model, load), load_data(data))


def _fresh(rt, model, data, load=None) -> bool:
    """Whether a run on (model, data) computes its embeddings (True) or takes them from the cache."""
    return not prepare(model, data, load, runtime=rt).emb.from_cache


def test_timm_model_args_change_the_key_and_the_figures_follow(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=3)
    rt = RuntimeOptions(cache_dir=str(tmp_path / "c"), progress=False)
    before = prepare(m, data, runtime=rt)
    assert not before.emb.from_cache and prepare(m, data, runtime=rt).emb.from_cache
    cfg = json.loads((m / "config.json").read_text())
    cfg.setdefault("model_args", {})["act_layer"] = "silu"          # same tensors, another network
    (m / "config.json").write_text(json.dumps(cfg))
    after = prepare(m, data, runtime=rt)
    assert not after.emb.from_cache
    assert not torch.allclose(after.emb.X, before.emb.X)
    truth = prepare(m, data, runtime=RuntimeOptions(use_cache=False, progress=False))
    assert torch.equal(after.emb.X, truth.emb.X)


def test_transformers_config_changes_the_key(tmp_path):
    b = make_bert_folder(tmp_path / "b")
    texts = make_texts(tmp_path / "t.csv", n=12)
    k0 = _key(b, texts)
    assert _key(b, texts) == k0                                     # deterministic
    for field, value in (("hidden_act", "relu"), ("layer_norm_eps", 10.0), ("num_attention_heads", 1)):
        c = tmp_path / f"b-{field}"
        shutil.copytree(b, c)
        cfg = json.loads((c / "config.json").read_text())
        cfg[field] = value
        (c / "config.json").write_text(json.dumps(cfg))
        assert _key(c, texts) != k0, field
    c = tmp_path / "b-labels"                                       # labels are not the network
    shutil.copytree(b, c)
    cfg = json.loads((c / "config.json").read_text())
    cfg["id2label"] = {"0": "neg", "1": "pos"}
    cfg["label2id"] = {"neg": 0, "pos": 1}
    (c / "config.json").write_text(json.dumps(cfg))
    assert _key(c, texts) == k0


def test_the_tokenizer_content_is_in_the_key(tmp_path):
    b = make_bert_folder(tmp_path / "b")
    texts = make_texts(tmp_path / "t.csv", n=12)
    rt = RuntimeOptions(cache_dir=str(tmp_path / "c"), progress=False)
    assert _fresh(rt, b, texts) and not _fresh(rt, b, texts)
    tok = json.loads((b / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["great"], vocab["awful"] = vocab["awful"], vocab["great"]   # same size, other ids
    (b / "tokenizer.json").write_text(json.dumps(tok))
    assert _fresh(rt, b, texts)
    cfg = json.loads((b / "tokenizer_config.json").read_text())
    cfg["truncation_side"] = "left"
    (b / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert _fresh(rt, b, texts, LoadOptions(max_length=4))
    assert not _fresh(rt, b, texts, LoadOptions(max_length=4))


def test_a_factory_and_its_arguments_are_in_the_key(tmp_path, monkeypatch):
    factory_weights(tmp_path, "facmod_cache", "from torch import nn\n"
                    "def net(act='relu'):\n"
                    "    a = nn.ReLU() if act == 'relu' else nn.Tanh()\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), a, nn.Linear(6, 3))\n"
                    "def other():\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.Sigmoid(), nn.Linear(6, 3))\n",
                    monkeypatch, build="net")
    data = make_images(tmp_path / "d", n_per_class=2, size=8)
    pre = dict(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    k = {name: _key(tmp_path / "w.safetensors", data, LoadOptions(factory=f"facmod_cache:{fn}", model_args=args, **pre))
         for name, fn, args in (("relu", "net", None), ("tanh", "net", {"act": "tanh"}), ("other", "other", None))}
    assert len(set(k.values())) == 3


def test_a_transformers_checkpoint_missing_body_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    b = make_bert_folder(tmp_path / "b")
    t = {k: v for k, v in load_file(str(b / "model.safetensors")).items() if "pooler" not in k}
    save_file(t, str(b / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BadInput) as e:
        load_model(b)
    assert "pooler" in str(e.value) and "random" in str(e.value)
    code, _, err = run_cli("eval", b, "--data", make_texts(tmp_path / "t.csv", n=8), "-q")
    assert code == 2 and "model.safetensors" in err and len(err.strip().splitlines()) == 1


def test_an_image_replaced_with_its_time_set_back_is_not_served_from_the_cache(tmp_path):
    data = make_images(tmp_path / "d", n_per_class=3)
    files = sorted(p for p in data.rglob("*.png"))
    a, b = files[0], files[-1]
    fp = load_data(data).fingerprint()
    st = a.stat()
    body = b.read_bytes()
    pad = max(0, st.st_size - len(body))
    a.write_bytes(body + b"\0" * pad)                 # PNG readers ignore trailing bytes
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_data(data).fingerprint() != fp


def test_texts_holding_nul_do_not_collide(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in ({"text": "good\u0000bad", "label": "x"},
                                                     {"text": "fun", "label": "y"})) + "\n")
    b.write_text("\n".join(json.dumps(r) for r in ({"text": "good", "label": "x"},
                                                     {"text": "bad\u0000fun", "label": "y"})) + "\n")
    assert load_data(a).fingerprint() != load_data(b).fingerprint()


def test_the_cache_never_goes_into_a_checkpoint_folder(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=2)
    for cmd in ("eval", "probe"):
        for model, cache in ((m, m / "cache"), (m / "model.safetensors", m / "cache"), (m / "model.safetensors", m)):
            code, _, err = run_cli(cmd, model, "--data", data, "--cache-dir", cache, "-q")
            assert code == 2 and "--cache-dir" in err, (cmd, model, cache, err)
    assert sorted(p.name for p in m.iterdir()) == ["config.json", "model.safetensors"]
    code, _, err = run_cli("fix", m / "model.safetensors", "--data", data, "--cache-dir", m / "c", "-q",
                           "--recipe", "dfr")
    assert code == 2 and "--cache-dir" in err
    assert sorted(p.name for p in m.iterdir()) == ["config.json", "model.safetensors"]


def test_a_found_table_that_leads_outside_the_data_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("root:x:0:0:root:/root:/bin/bash\nline 2\n")
    d = tmp_path / "d"
    d.mkdir()
    (d / "metadata.csv").symlink_to(outside / "secret.csv")
    code, _, err = run_cli("eval", make_timm_folder(tmp_path / "m"), "--data", d, "-q")
    assert code == 2 and "outside" in err and "root:x" not in err, err


def test_no_temporary_file_is_left_when_a_cache_write_is_interrupted(tmp_path, monkeypatch):
    import repair.io
    from repair import embeddings

    def boom(*a, **k):
        Path(a[1]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(repair.io, "save_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        embeddings._write_cache(tmp_path / "c" / "k.safetensors", torch.zeros(2, 2))
    assert list((tmp_path / "c").iterdir()) == []


def test_preprocessing_options_for_a_checkpoint_that_carries_its_own_are_refused(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=2)
    for model in (m, m / "model.safetensors"):
        code, _, err = run_cli("eval", model, "--data", data, "--image-size", "64", "-q")
        assert code == 2 and "--image-size" in err and "ignored" in err, err
    b = make_bert_folder(tmp_path / "b")
    code, _, err = run_cli("eval", b, "--data", make_texts(tmp_path / "t.csv", n=8), "--mean", "0.5", "-q")
    assert code == 2 and "text model" in err, err


def test_embeddings_of_another_device_kind_have_their_own_entry(tmp_path):
    """An entry made on CUDA never serves a CPU run (the kernels round differently: a --device cpu run
    must reproduce a CPU run's figures); the CPU's key is the one without a device."""
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=3)
    adapter, d = load_model(m), load_data(data)
    cpu = cache_key(adapter, d)
    assert cache_key(adapter, d, torch.device("cpu")) == cpu
    assert cache_key(adapter, d, torch.device("cuda")) != cpu
    assert cache_key(adapter, d, torch.device("cuda", 0)) == cache_key(adapter, d, torch.device("cuda"))


def _phobert_folder(path: Path) -> Path:
    """A tiny PhoBERT-style folder: its BPE merges are in ``bpe.codes``, a file no other family names."""
    from transformers import PhobertTokenizer, RobertaConfig, RobertaForSequenceClassification

    path.mkdir(parents=True)
    words = ["good", "bad", "great", "awful", "not", "movie", "plot", "fun", "boring", "the", "a", "was", "is"]
    chars = sorted({c for w in words for c in w})
    pieces = {w[:i] + "@@" for w in words for i in range(1, len(w))} | set(words) | set(chars)
    toks = sorted(pieces | {c + "@@" for c in chars})
    (path / "vocab.txt").write_text("".join(f"{t} 1\n" for t in toks))
    merges: list = []
    for w in words:
        cur = list(w)
        while len(cur) > 1:
            if (cur[0], cur[1]) not in merges:
                merges.append((cur[0], cur[1]))
            cur = [cur[0] + cur[1]] + cur[2:]
    (path / "bpe.codes").write_text("".join(f"{a} {b} 1\n" for a, b in merges))
    tok = PhobertTokenizer(vocab_file=str(path / "vocab.txt"), merges_file=str(path / "bpe.codes"))
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=70, num_labels=2, pad_token_id=tok.pad_token_id,
                        initializer_range=0.2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    RobertaForSequenceClassification(cfg).eval().save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    assert (path / "bpe.codes").is_file()
    return path


def test_every_file_the_tokenizer_reads_is_in_the_key(tmp_path):
    """A tokenizer file outside the usual names (PhoBERT's ``bpe.codes``, a sentencepiece model, LUKE's
    entity vocabulary) is in the key: other merges are other token ids, never the old entry's figures."""
    from repair.adapters.text import tokenizer_digest

    p = _phobert_folder(tmp_path / "pho")
    texts = tmp_path / "t.csv"
    texts.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in (
        ("the movie was great", "positive"), ("the plot was boring", "negative"), ("not fun", "negative"),
        ("a good movie", "positive"), ("awful", "negative"), ("great fun", "positive"))))
    rt = RuntimeOptions(cache_dir=str(tmp_path / "c"), progress=False)
    assert _fresh(rt, p, texts) and not _fresh(rt, p, texts)
    adapter = load_model(p)
    before = tokenizer_digest(adapter.tokenizer)
    codes = (p / "bpe.codes").read_text().splitlines(keepends=True)
    (p / "bpe.codes").write_text("".join(codes[: len(codes) // 2]))     # fewer merges: other pieces
    assert tokenizer_digest(load_model(p).tokenizer) != before          # the digest ONNX's tokenizer shares
    after = prepare(p, texts, runtime=rt)
    assert not after.emb.from_cache
    truth = prepare(p, texts, runtime=RuntimeOptions(use_cache=False, progress=False))
    assert torch.equal(after.emb.X, truth.emb.X)
    # a tokenizer file leading out of the folder is refused, as any entry of a model folder is
    from repair.adapters.text import tokenizer_files

    assert "bpe.codes" in [f.name for f in tokenizer_files(adapter.tokenizer)]
    outside = tmp_path / "elsewhere.codes"
    outside.write_text("".join(codes))
    (p / "bpe.codes").unlink()
    (p / "bpe.codes").symlink_to(outside)
    with pytest.raises(BadInput, match="outside"):
        tokenizer_files(adapter.tokenizer)


def test_a_factory_network_class_from_another_file_is_in_the_key(tmp_path, monkeypatch):
    """A factory importing its network from a sibling module: an edited forward() (same layers, same
    tensors, same repr) computes other embeddings, never the old entry's."""
    (tmp_path / "netdef_cache.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))\n"
        "        self.head = nn.Linear(6, 3)\n"
        "    def forward(self, x):\n"
        "        return self.head(torch.relu(self.body(x)))\n")
    (tmp_path / "facnet_cache.py").write_text("from netdef_cache import Net\ndef build():\n    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def fresh_import():
        for m in ("netdef_cache", "facnet_cache"):
            sys.modules.pop(m, None)

    fresh_import()
    import facnet_cache
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(facnet_cache.build().state_dict(), str(tmp_path / "w.safetensors"))
    data = make_images(tmp_path / "d", n_per_class=2, size=8)
    load = LoadOptions(factory="facnet_cache:build", class_names=CLASSES, image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    rt = RuntimeOptions(cache_dir=str(tmp_path / "c"), progress=False)
    w = tmp_path / "w.safetensors"
    before = prepare(w, data, load, runtime=rt)
    assert not before.emb.from_cache and prepare(w, data, load, runtime=rt).emb.from_cache
    src = (tmp_path / "netdef_cache.py").read_text().replace("torch.relu(", "torch.tanh(")
    (tmp_path / "netdef_cache.py").write_text(src)
    fresh_import()
    after = prepare(w, data, load, runtime=rt)
    assert not after.emb.from_cache
    assert not torch.allclose(after.emb.X, before.emb.X)
    fresh_import()
    truth = prepare(w, data, load, runtime=RuntimeOptions(use_cache=False, progress=False))
    assert torch.equal(after.emb.X, truth.emb.X)


def test_the_batch_size_is_in_the_key_and_eval_and_fix_share_the_default(tmp_path):
    """Another --batch-size rounds a batch's sums otherwise (its embeddings differ in their last bits):
    it has its own entry, so a run gives the same bytes whatever an earlier run left in the cache; every
    command's default is the same, so a fix after an eval reads the eval's entry."""
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=3)
    c = str(tmp_path / "c")
    small, default = (RuntimeOptions(cache_dir=c, progress=False, batch_size=4),
                      RuntimeOptions(cache_dir=c, progress=False))
    assert default.batch_size == 64                                        # the CLI's default too
    assert _fresh(small, m, data) and _fresh(default, m, data)
    assert not _fresh(small, m, data) and not _fresh(default, m, data)
    truth = prepare(m, data, runtime=RuntimeOptions(use_cache=False, progress=False))
    assert torch.equal(prepare(m, data, runtime=default).emb.X, truth.emb.X)
    adapter, d = load_model(m), load_data(data)
    assert cache_key(adapter, d, batch_size=4) != cache_key(adapter, d) == cache_key(adapter, d, batch_size=64)
    c2 = tmp_path / "c2"
    code, _, err = run_cli("eval", m, "--data", data, "--cache-dir", c2, "-q")
    assert code == 0, err
    entries = sorted(p.name for p in c2.iterdir())
    code, out, err = run_cli("fix", m, "--data", data, "--recipe", "dfr", "--out", tmp_path / "h",
                             "--cache-dir", c2, "--json", "-q")
    assert code == 0, err
    assert sorted(p.name for p in c2.iterdir()) == entries                # the eval's entry served the fix
    assert json.loads(out)["settings"]["batch_size"] == 64


def test_the_onnx_notice_names_every_tokenizer_file_to_copy(tmp_path):
    """Found by a fixer: the notice naming the tokenizer files to put beside a text model's ONNX export
    listed a fixed set, so a PhoBERT export was told to copy files that cannot read texts without
    ``bpe.codes``. It names the files the tokenizer reads (one home: ``tokenizer_files``)."""
    from repair.adapters import load_model
    from repair.outputs import _tokenizer_names

    p = _phobert_folder(tmp_path / "pho")
    names = _tokenizer_names(load_model(p))
    assert "bpe.codes" in names and "vocab.txt" in names, names
