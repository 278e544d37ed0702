"""Identities are taken when a thing is loaded, from what was read: a checkpoint file's sha256 and a
tokenizer's digest describe the bytes the loader parsed, never whatever the file holds by the time a
report, a provenance record or a cache key asks (a training script saving its next epoch over the file,
a tokenizer updated on disk while a session holds the model)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import (CLASSES, factory_weights, make_bert_folder, make_deployed_onnx, make_images, make_texts,
                      make_timm_folder)

import repair
from repair.adapters import LoadOptions, load_model
from repair.errors import BadInput
from repair.runtime import RuntimeOptions

NOCACHE = RuntimeOptions(use_cache=False, progress=False)
PRE = dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _swap_tokenizer_ids(folder: Path) -> None:
    """A new vocabulary on disk: 'great' and 'awful' swap ids (same size, other ids)."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    v = tok["model"]["vocab"]
    v["great"], v["awful"] = v["awful"], v["great"]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    lines = (folder / "vocab.txt").read_text().split("\n")
    i, j = lines.index("great"), lines.index("awful")
    lines[i], lines[j] = lines[j], lines[i]
    (folder / "vocab.txt").write_text("\n".join(lines))


def _per_class(r: dict) -> dict:
    return {c["name"]: c["n_correct"] for c in r["per_class"]}


# ---- A: the tokenizer's digest ------------------------------------------------------------
def test_a_tokenizer_changed_on_disk_after_loading_keeps_the_digest_it_was_read_with(tmp_path):
    from repair.adapters.text import tokenizer_digest

    b = make_bert_folder(tmp_path / "b")
    texts = make_texts(tmp_path / "t.csv", n=16)
    rt = RuntimeOptions(cache_dir=str(tmp_path / "c"), progress=False)
    m = repair.load_model(b)
    at_load = tokenizer_digest(load_model(b).tokenizer)
    _swap_tokenizer_ids(b)
    assert tokenizer_digest(m.tokenizer) == at_load             # the tokenizer in memory is the old one
    fresh_digest = tokenizer_digest(load_model(b).tokenizer)
    assert fresh_digest != at_load
    repair.evaluate(m, texts, runtime=rt)                        # the session's figures: the old tokenizer
    again = repair.evaluate(b, texts, runtime=rt)                # a fresh load reads the new files
    truth = repair.evaluate(b, texts, runtime=NOCACHE)
    assert not again["embedding"]["from_cache"]
    assert _per_class(again) == _per_class(truth) and again["accuracy"] == truth["accuracy"]


def test_tokenizer_files_changed_while_they_are_read_are_refused(tmp_path, monkeypatch):
    import transformers

    b = make_bert_folder(tmp_path / "b")
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def racing(cls, *a, **kw):
        tok = real(cls, *a, **kw)
        _swap_tokenizer_ids(b)                     # updated on disk while the loader read the folder
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(racing))
    with pytest.raises(BadInput, match="the tokenizer files changed while they were read") as e:
        load_model(b)
    assert str(b) in str(e.value)


def test_the_tokenizer_digest_still_ignores_the_recorded_truncation_length(tmp_path):
    from repair.adapters.text import tokenizer_digest

    b = make_bert_folder(tmp_path / "b")
    d0 = tokenizer_digest(load_model(b).tokenizer)
    cfg = json.loads((b / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 7
    (b / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_digest(load_model(b).tokenizer) == d0
    cfg["truncation_side"] = "left"
    (b / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_digest(load_model(b).tokenizer) != d0


# ---- B: the checkpoint file's sha256 ------------------------------------------------------
def test_a_checkpoint_saved_over_after_loading_keeps_the_sha256_of_what_was_loaded(tmp_path):
    from safetensors.torch import load_file, save_file

    t = make_timm_folder(tmp_path / "timm")
    img = make_images(tmp_path / "img", n_per_class=3, size=32)
    f = t / "model.safetensors"
    at_load = _sha(f)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    for q in t.iterdir():
        (pristine / q.name).write_bytes(q.read_bytes())
    m = repair.load_model(t)                                     # nothing asks for its identity yet
    sd = load_file(str(f))
    sd["fc.bias"] = torch.tensor([50.0, 0.0, 0.0])
    save_file(sd, str(f), metadata={"format": "pt"})           # a later epoch saved over the file
    assert _sha(f) != at_load
    r = repair.evaluate(m, img, runtime=NOCACHE)
    first = repair.evaluate(pristine, img, runtime=NOCACHE)    # the file as it was loaded
    assert r["model"]["sha256"] == at_load == first["model"]["sha256"]
    assert _per_class(r) == _per_class(first)
    assert m.source_sha256() == at_load and m.identity() == {"sha256": at_load}
    assert repair.evaluate(t, img, runtime=NOCACHE)["model"]["sha256"] == _sha(f)


def _factory(tmp_path, monkeypatch):
    w = factory_weights(tmp_path, "facmod_s41", "from torch import nn\n"
                        "def net():\n"
                        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 6), nn.ReLU(), nn.Linear(6, 3))\n",
                        monkeypatch, build="net")
    return w, LoadOptions(factory="facmod_s41:net", class_names=CLASSES, **PRE)


def _families(tmp_path, monkeypatch):
    """(the file the identity names, what load_model is given, its options) for each family with a file."""
    t = make_timm_folder(tmp_path / "timm")
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((t / "model.safetensors").read_bytes())
    b = make_bert_folder(tmp_path / "bert")
    onnx_path, _ = make_deployed_onnx(tmp_path / "dep.onnx")
    w, fac = _factory(tmp_path, monkeypatch)
    return {"timm": (t / "model.safetensors", t, None),
            "bare": (bare, bare, LoadOptions(arch="test_resnet", class_names=CLASSES, **PRE)),
            "transformers": (b / "model.safetensors", b, None),
            "onnx": (onnx_path, onnx_path, LoadOptions(class_names=CLASSES, **PRE)),
            "factory": (w, w, fac)}


def test_every_family_names_the_sha256_of_the_file_as_it_was_loaded(tmp_path, monkeypatch):
    for name, (f, given, opts) in _families(tmp_path, monkeypatch).items():
        at_load = _sha(f)
        m = load_model(given, opts)
        f.write_bytes(f.read_bytes() + b"\0")                      # the file is another one now
        assert m.source_sha256() == at_load, name
        assert m.identity()["sha256"] == at_load, name


def test_a_weights_file_changed_while_it_is_read_is_refused(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import load_file, save_file

    t = make_timm_folder(tmp_path / "timm")
    f = t / "model.safetensors"
    real = timm.create_model

    def racing(*a, **kw):                       # the file is replaced between its read and the model's build
        sd = load_file(str(f))
        sd["fc.bias"] = sd["fc.bias"] + 1
        save_file(sd, str(f), metadata={"format": "pt"})
        return real(*a, **kw)

    monkeypatch.setattr(timm, "create_model", racing)
    with pytest.raises(BadInput, match="changed while it was read") as e:
        load_model(t)
    assert "model.safetensors" in str(e.value)


def test_a_weights_file_rewritten_in_place_after_the_model_copied_it_is_refused(tmp_path, monkeypatch):
    """safetensors' tensors map the file: a rewrite in place (same size, same layout) shows through them,
    so the identity is checked against the model's own copy of what was read."""
    import numpy as np

    from repair.adapters import torch_module

    t = make_timm_folder(tmp_path / "timm")
    f = t / "model.safetensors"
    real = torch_module.TorchImageAdapter.__init__

    def late(self, **kw):                        # after the model copied the weights, before the identity
        with open(f, "r+b") as g:
            g.seek(-4, 2)
            last = np.frombuffer(g.read(4), dtype=np.uint8)
            g.seek(-4, 2)
            g.write((last ^ 0xFF).tobytes())
        real(self, **kw)

    monkeypatch.setattr(torch_module.TorchImageAdapter, "__init__", late)
    with pytest.raises(BadInput, match="changed while it was read"):
        load_model(t)


def test_a_checkpoint_saved_over_after_loading_is_refused_when_the_repaired_model_is_written(tmp_path):
    """`save` writes the unchanged tensors from the weights file, bit for bit: a file saved over after the
    model was loaded (`repair.load_model`; or during a long `repair fix`) gave the output the new file's
    body beside a head fitted on the old one's embeddings -- a model nobody measured. It is refused naming
    the file, and nothing is written."""
    from safetensors.torch import load_file, save_file

    t = make_timm_folder(tmp_path / "timm")
    f = t / "model.safetensors"
    m = repair.load_model(t)
    sd = load_file(str(f))
    body = next(n for n in sd if not n.startswith("fc.") and sd[n].is_floating_point() and bool(sd[n].abs().sum() > 0))
    sd[body] = sd[body] * 2                                      # a later epoch saved over the file
    save_file(sd, str(f), metadata={"format": "pt"})
    from repair.export import export_safetensors

    out = tmp_path / "out"
    with pytest.raises(BadInput, match="changed since the model was loaded") as e:
        export_safetensors(m, out, {})
    assert "model.safetensors" in str(e.value) and not out.exists()
    save_file(load_file(str(tmp_path / "timm" / "model.safetensors")), str(f), metadata={"format": "pt"})
    fresh = repair.load_model(t)                                 # loaded again: written as it is now
    export_safetensors(fresh, out, {})
    assert (out / "model.safetensors").is_file()


def test_a_family_of_yours_that_takes_no_sha256_as_it_reads_still_has_one_taken_at_load(tmp_path):
    """A family registered with `register_family` whose adapter does not call `_init_file_state` had
    `source_sha256()` raise an internal error once `repair fix` had run (a review of the load-time change).
    `load_model` takes the file's sha256 right after the family's load; an adapter built by hand gets it when
    first asked, as before."""
    from repair.adapters import register_family, unregister_family
    from repair.adapters.base import Adapter

    class Mine(Adapter):
        family, modality = "mine", "image"

        def __init__(self, p):
            self.source = self.weights_path = Path(p)
            self.class_names = ["a", "b"]

        def collate(self, items):
            pass

        def embed_batch(self, b, d):
            pass

        def preprocess_id(self):
            return {}

        def changed_tensors(self):
            return []

    w = tmp_path / "w.mine"
    w.write_bytes(b"weights as loaded")
    at_load = _sha(w)
    register_family("mine_s41", detect=lambda p, o: p.suffix == ".mine", load=lambda p, o: Mine(p), priority=96,
                    summary="a test family")
    try:
        m = load_model(w)
        w.write_bytes(b"weights saved over")
        assert m.source_sha256() == at_load and m.identity() == {"sha256": at_load}
    finally:
        unregister_family("mine_s41")
    by_hand = Mine(w)
    assert by_hand.source_sha256() == _sha(w)
