"""The embedding cache serves a run only what its own code would compute (session 43's cache audit):
another version of repair's sources or of a library that reads samples has its own entries, a file a
``--factory`` reads through ``--model-args`` is keyed by its content, and a damaged input-digest entry
is recomputed with a notice, never an internal error."""
from __future__ import annotations

import json
import sys

import torch
from conftest import CLASSES, make_images, make_timm_folder, run_cli
from repair import embeddings
from repair.adapters import LoadOptions
from repair.api import RuntimeOptions, prepare


def test_other_code_is_never_served_this_codes_embeddings(tmp_path, monkeypatch):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=2)
    rt = RuntimeOptions(cache_dir=str(tmp_path / "c"), progress=False)
    assert not prepare(m, data, runtime=rt).emb.from_cache
    assert prepare(m, data, runtime=rt).emb.from_cache
    mine = embeddings.code_key()
    assert mine["sources"] and "pillow" in mine["libraries"] and "tokenizers" in mine["libraries"]
    # an upgrade (or a local change) of repair's sources: the old entry does not serve it
    monkeypatch.setattr(embeddings, "_CODE_KEY", {**mine, "sources": "0" * 64})
    assert not prepare(m, data, runtime=rt).emb.from_cache
    # another version of a library that decodes the images
    monkeypatch.setattr(embeddings, "_CODE_KEY", {**mine, "libraries": {**mine["libraries"], "pillow": "0.0"}})
    assert not prepare(m, data, runtime=rt).emb.from_cache
    monkeypatch.setattr(embeddings, "_CODE_KEY", mine)
    assert prepare(m, data, runtime=rt).emb.from_cache


def test_a_file_the_factory_reads_through_model_args_is_in_the_key(tmp_path, monkeypatch):
    (tmp_path / "facmod_cfg43.py").write_text(
        "import json\n"
        "import torch\n"
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, scale):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))\n"
        "        self.head = nn.Linear(6, 3)\n"
        "        self.scale = scale          # a plain attribute: in no tensor and not in repr()\n"
        "    def forward(self, x):\n"
        "        return self.head(torch.relu(self.body(x)) * self.scale)\n"
        "def build(cfg):\n"
        "    with open(cfg) as f:\n"
        "        return Net(json.load(f)['scale'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("facmod_cfg43", None)
    import facmod_cfg43
    from safetensors.torch import save_file

    cfg = tmp_path / "arch.json"
    cfg.write_text(json.dumps({"scale": 1.0}))
    torch.manual_seed(0)
    save_file(facmod_cfg43.build(cfg).state_dict(), str(tmp_path / "w.safetensors"))
    data = make_images(tmp_path / "d", n_per_class=2, size=8)
    load = LoadOptions(factory="facmod_cfg43:build", model_args={"cfg": str(cfg)}, class_names=CLASSES,
                       image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    rt = RuntimeOptions(cache_dir=str(tmp_path / "c"), progress=False)
    first = prepare(tmp_path / "w.safetensors", data, load, runtime=rt)
    assert not first.emb.from_cache
    assert prepare(tmp_path / "w.safetensors", data, load, runtime=rt).emb.from_cache
    cfg.write_text(json.dumps({"scale": 5.0}))                   # same tensors, same code: another network
    after = prepare(tmp_path / "w.safetensors", data, load, runtime=rt)
    assert not after.emb.from_cache
    truth = prepare(tmp_path / "w.safetensors", data, load, runtime=RuntimeOptions(use_cache=False, progress=False))
    assert torch.equal(after.emb.X, truth.emb.X) and not torch.equal(after.emb.X, first.emb.X)


def test_a_damaged_input_digest_entry_too_deep_to_parse_is_recomputed(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=2)
    other = make_images(tmp_path / "d2", n_per_class=2, seed=1)
    cache = tmp_path / "c"
    args = ("eval", str(m), "--data", str(data), "--exclude", str(other), "--cache-dir", str(cache), "--json")
    code, out, _ = run_cli(*args)
    assert code == 0
    entries = list(cache.glob("inputs-*.json"))
    assert entries
    for f in entries:
        f.write_text("[" * 200000 + "]" * 200000)
    code2, out2, err2 = run_cli(*args)
    assert code2 == 0, err2
    assert "was corrupt; recomputed" in err2 and "internal error" not in err2
    strip = lambda d: {k: v for k, v in d.items() if k not in ("seconds", "timing", "cache", "embedding")}
    assert strip(json.loads(out2)) == strip(json.loads(out))
