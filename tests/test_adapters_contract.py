"""The adapter contract, checked for every registered model family.

load -> embed -> set a new head (and, where the family can train, change one non-head
tensor through ``set_tensors``) -> save -> reload the file with the family's OWN library
-> the same logits; untouched tensors bit-identical; BatchNorm running stats unchanged.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import CLASSES, make_deployed_onnx, run_cli
from repair.adapters import FamilyInfo, LoadOptions, list_families, load_model, register_family, unregister_family
from repair.data import load_data
from repair.errors import BadInput
from repair.io import load_safetensors, save_safetensors

CPU = torch.device("cpu")
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
FACTORY_MODULE = "contract_factory"
FACTORY_SRC = '''
import torch.nn as nn
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
'''


# ------------------------------------------------------------------ how each family is built and reloaded
def build_timm_folder(request, tmp: Path):
    return request.getfixturevalue("timm_folder"), LoadOptions()


def build_timm_bare(request, tmp: Path):
    bare = tmp / "bare.safetensors"
    shutil.copy(request.getfixturevalue("timm_folder") / "model.safetensors", bare)
    return bare, LoadOptions(arch="test_resnet", class_names=CLASSES)


def build_transformers(request, tmp: Path):
    return request.getfixturevalue("bert_folder"), LoadOptions()


def build_factory(request, tmp: Path):
    (tmp / f"{FACTORY_MODULE}.py").write_text(FACTORY_SRC)
    request.getfixturevalue("monkeypatch").syspath_prepend(str(tmp))
    torch.manual_seed(0)
    model = importlib.import_module(FACTORY_MODULE).build()
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 2 + 1)  # non-trivial BatchNorm running stats
    w = tmp / "factory.safetensors"
    save_safetensors(model.state_dict(), w, {})
    return w, LoadOptions(factory=f"{FACTORY_MODULE}:build", image_size=32, mean=MEAN, std=STD)


def build_onnx(request, tmp: Path):
    out, _ = make_deployed_onnx(tmp / "deployed.onnx")
    (tmp / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32], "mean": MEAN, "std": STD}))
    return out, LoadOptions(class_names=CLASSES)


def _torch_runner(model) -> Callable:
    model.eval()

    def run(batch):
        with torch.no_grad():
            return model(batch).float()
    return run


def reload_timm_folder(out: Path) -> Callable:
    import timm

    cfg = json.loads((out / "config.json").read_text())
    args = {**(cfg.get("model_args") or {}), "num_classes": cfg["num_classes"]}
    model = timm.create_model(cfg["architecture"], pretrained=False, **args)
    timm.models.load_checkpoint(model, str(out / "model.safetensors"), strict=True)
    return _torch_runner(model)


def reload_timm_bare(out: Path) -> Callable:
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(CLASSES))
    timm.models.load_checkpoint(model, str(out), strict=True)
    return _torch_runner(model)


def reload_transformers(out: Path) -> Callable:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()

    def run(batch):
        with torch.no_grad():
            return model(**batch).logits.float()
    return run


def reload_factory(out: Path) -> Callable:
    from safetensors.torch import load_file

    model = importlib.import_module(FACTORY_MODULE).build()
    model.load_state_dict(load_file(str(out)), strict=True)
    return _torch_runner(model)


def reload_onnx(out: Path) -> Callable:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda batch: torch.from_numpy(sess.run(None, {name: batch.numpy()})[0]).float()


def safetensors_file(out: Path) -> dict:
    return load_safetensors(out / "model.safetensors" if out.is_dir() else out)[0]


def onnx_initializers(out: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}


@dataclass
class Case:
    id: str
    family: str
    modality: str
    build: Callable
    reload: Callable
    out_name: str                  # the saved output's name ("" suffix: a folder)
    read: Callable = safetensors_file
    atol: float = 1e-5
    has_batchnorm: bool = True


CASES = [
    Case("timm-folder", "timm", "image", build_timm_folder, reload_timm_folder, "out"),
    Case("timm-bare", "timm", "image", build_timm_bare, reload_timm_bare, "out.safetensors"),
    Case("transformers", "transformers", "text", build_transformers, reload_transformers, "out",
         has_batchnorm=False),
    Case("torch-factory", "torch", "image", build_factory, reload_factory, "out.safetensors"),
    Case("onnx", "onnx", "image", build_onnx, reload_onnx, "out.onnx", read=onnx_initializers, atol=1e-4,
         has_batchnorm=False),  # the exporter folds BatchNorm into the convolutions
]


# ------------------------------------------------------------------ helpers
def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def assert_only_changed(before: dict, after: dict, changed: set) -> None:
    """The saved file holds the same tensors; exactly ``changed`` differ, the rest bit for bit."""
    assert after.keys() == before.keys()
    differ = {k for k in before if not same(before[k], after[k])}
    assert differ == changed
    for k in changed:
        assert after[k].dtype == before[k].dtype, k   # the file's dtype is kept


def assert_close(got, want, atol: float) -> None:
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)


def first_body_tensor(adapter) -> str:
    """The first floating-point matrix / kernel of the state dict that is not the head."""
    heads = set(adapter.head_tensor_names())
    for name, t in adapter.model.state_dict().items():
        if name not in heads and t.is_floating_point() and t.dim() >= 2:
            return name
    raise AssertionError("no body tensor")


def sample_items(request, modality: str, n: int = 5) -> list:
    data = request.getfixturevalue("image_data" if modality == "image" else "text_data")
    return load_data(data).items[:n]


# ------------------------------------------------------------------ the contract
def test_every_registered_family_has_a_contract_case():
    assert {c.family for c in CASES} == {f.name for f in list_families()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_adapter_contract(case: Case, request, tmp_path):
    path, opts = case.build(request, tmp_path)
    a = load_model(path, opts)
    assert a.family == case.family and a.modality == case.modality
    # the protocol's attributes all exist, with their documented types
    assert isinstance(a.source_metadata, dict) and all(isinstance(v, str) for v in a.source_metadata.values())
    assert isinstance(a.input_names, list) and a.input_names and all(isinstance(n, str) for n in a.input_names)
    assert isinstance(a.exports_onnx_natively, bool) and isinstance(a.can_train, bool)
    assert (a.data_config is not None) == (case.modality == "image")
    assert (a.tokenizer is not None) == (case.modality == "text")
    if not a.exports_onnx_natively:
        with pytest.raises(NotImplementedError):
            a.export_proto({})
    before = case.read(path)

    # embeddings are the head's input
    batch = a.collate(sample_items(request, case.modality))
    emb = a.embed_batch(batch, CPU)
    W, b = a.head_params()
    assert_close(emb @ W.T + b, a.logits_batch(batch, CPU), case.atol)
    hash0 = a.body_hash()
    assert a.changed_tensors() == [] and not a.head_changed

    # a new head: the body hash stays, only the head's tensors change
    g = torch.Generator().manual_seed(0)
    W2 = W * 1.5 + 0.1 * torch.randn(W.shape, generator=g)
    b2 = b + 0.3 * torch.randn(b.shape, generator=g)
    a.set_head(W2, b2)
    heads = set(a.changed_tensors())
    assert a.head_changed and heads and heads <= set(a.head_tensor_names())
    assert a.body_hash() == hash0
    out = tmp_path / f"head-{case.out_name}"
    assert Path(a.save(out, {"repair.method": "contract"})).exists()
    got = case.reload(out)(batch)
    assert_close(got, a.logits_batch(batch, CPU), case.atol)
    assert_close(got, emb @ W2.T + b2, case.atol)
    assert_only_changed(before, case.read(out), heads)

    if not a.can_train:
        with pytest.raises(BadInput, match="cannot be fine-tuned"):
            a.trainable()
        body = next(k for k in before if k not in heads)
        with pytest.raises(BadInput, match="only its head"):
            a.set_tensors({body: torch.from_numpy(before[body].copy())})
        # the head's own tensors (the file's layout) can be set: back to the file's values
        a.set_tensors({h: torch.from_numpy(before[h].copy()) for h in heads})
        assert a.changed_tensors() == [] and not a.head_changed
        assert_close(a.logits_batch(batch, CPU), emb @ W.T + b, case.atol)
        return

    # any tensor can change: the body hash follows the weights, save writes every change
    from repair.modelrepair.trainable import TrainableModel

    assert a.can_train and isinstance(a.trainable(), TrainableModel)
    name = first_body_tensor(a)
    old = a.model.state_dict()[name].clone()
    bn = {k: v.clone() for k, v in a.model.state_dict().items() if "running_" in k}
    assert bool(bn) == case.has_batchnorm
    a.set_tensors({name: old * 1.25 + 0.01})
    assert a.changed_tensors() == sorted(heads | {name})
    hash1 = a.body_hash()
    assert hash1 != hash0 and a.body_hash() == hash1
    emb1 = a.embed_batch(batch, CPU)
    assert not torch.allclose(emb1, emb)
    out = tmp_path / f"body-{case.out_name}"
    a.save(out, {"repair.method": "contract"})
    got = case.reload(out)(batch)
    assert_close(got, a.logits_batch(batch, CPU), case.atol)
    assert_close(got, emb1 @ W2.T + b2, case.atol)
    saved = case.read(out)
    assert_only_changed(before, saved, heads | {name})
    for k, v in bn.items():  # BatchNorm running stats: untouched in the model and the file
        assert torch.equal(a.model.state_dict()[k], v) and same(saved[k], before[k]), k
    # the same file reloaded by repair: same body hash as the adapter that wrote it
    assert load_model(out, opts).body_hash() == hash1
    # setting the file's value back: nothing left to write, the file's body hash again
    a.set_tensors({name: old})
    assert a.changed_tensors() == sorted(heads) and a.body_hash() == hash0


def test_set_tensors_checks_before_changing_anything(timm_folder):
    a = load_model(timm_folder)
    name = first_body_tensor(a)
    old = a.model.state_dict()[name].clone()
    with pytest.raises(BadInput, match="no tensor 'nope'"):
        a.set_tensors({name: old + 1, "nope": torch.zeros(1)})
    with pytest.raises(Exception, match="shape"):
        a.set_tensors({name: torch.zeros(1)})
    assert torch.equal(a.model.state_dict()[name], old) and a.changed_tensors() == []


def test_a_bias_free_head_is_never_written_with_a_bias(tmp_path, monkeypatch, image_data):
    """A repaired head has a bias; an architecture whose head has none could not load it back (plain
    load_state_dict: unexpected key). ``repair fix`` refuses such a model before any work (exit 2
    naming it), and writing one whose head was given a bias in memory is refused (nothing written):
    never a file that does not load, or loads without the bias and computes other logits."""
    src = FACTORY_SRC.replace("nn.Linear(8, 3))", "nn.Linear(8, 3, bias=False))").replace(
        "def build", "def build_nobias")
    (tmp_path / "contract_nobias.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = importlib.import_module("contract_nobias").build_nobias()
    w = tmp_path / "nobias.safetensors"
    save_safetensors(model.state_dict(), w, {})
    a = load_model(w, LoadOptions(factory="contract_nobias:build_nobias", image_size=32, mean=MEAN, std=STD))
    W, b = a.head_params()
    assert torch.equal(b, torch.zeros(3))
    with pytest.raises(BadInput, match="has no bias"):
        a.check_save()
    a.set_head(W, torch.arange(3.0))                 # in memory (an ONNX export of it is exact)
    with pytest.raises(BadInput, match="does not have"):
        a.save(tmp_path / "out.safetensors", {})
    assert not (tmp_path / "out.safetensors").exists()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code, _, err = run_cli("fix", w, "--factory", "contract_nobias:build_nobias", "--image-size", "32", "--mean",
                           "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--class-names", "cat,dog,fox", "--data",
                           image_data, "--recipe", "dfr", "--out", tmp_path / "fixed.safetensors", "-q")
    assert code == 2 and "has no bias" in err and err.count("\n") == 1, err
    assert not (tmp_path / "fixed.safetensors").exists()


# ------------------------------------------------------------------ the registry
def test_families_in_priority_order():
    fams = list_families()
    assert [f.name for f in fams] == ["torch", "onnx", "timm", "transformers"]
    assert all(isinstance(f, FamilyInfo) and f.summary for f in fams)
    assert [f.priority for f in fams] == sorted((f.priority for f in fams), reverse=True)


def test_a_new_family_is_one_registration(timm_folder, tmp_path):
    marker = tmp_path / "model.fake"
    marker.write_text(str(timm_folder))
    calls = []

    def detect(path, o):
        return path.suffix == ".fake"

    def load(path, o):
        calls.append(path)
        return load_model(Path(path.read_text()), o)

    register_family("fake", detect=detect, load=load, priority=95, summary="a test family")
    try:
        assert load_model(marker).family == "timm" and calls == [marker]
        register_family("fake", detect=detect, load=load, priority=95)  # the same again: fine
        with pytest.raises(ValueError, match="is already registered"):
            register_family("fake", detect=lambda p, o: False, load=load, priority=1)
    finally:
        unregister_family("fake")
    with pytest.raises(BadInput, match="--arch"):
        load_model(marker)


def test_a_module_whose_forward_changes_the_logits_after_its_head_is_refused(tmp_path, monkeypatch, image_data):
    """Found by an audit: a --factory module whose forward subtracts a prior after its last nn.Linear
    never predicted the last class itself, yet `repair eval` measured `embeddings @ W.T + b` and a
    gate passed at 100%. The module's output must be its head's output: exit 2 naming the file."""
    src = FACTORY_SRC + '''
import torch
class Adjusted(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = build()
    def forward(self, x):
        return self.net(x) - torch.tensor([0.0, 0.0, 50.0])
def build_adjusted():
    return Adjusted()
'''
    (tmp_path / "contract_adjusted.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = importlib.import_module("contract_adjusted").build_adjusted()
    w = tmp_path / "adjusted.safetensors"
    save_safetensors(model.state_dict(), w, {})
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["--factory", "contract_adjusted:build_adjusted", "--image-size", "32", "--mean", "0.5,0.5,0.5", "--std",
            "0.25,0.25,0.25", "--class-names", "cat,dog,fox", "--data", image_data, "--cache-dir", tmp_path / "c"]
    code, _, err = run_cli("eval", w, *args, "--fail-under-acc", "0%", "-q")
    assert code == 2 and "not its head" in err and str(w) in err and err.count("\n") == 1, err
    # the same network without the adjustment is measured as before
    plain = tmp_path / "plain.safetensors"
    save_safetensors(model.net.state_dict(), plain, {})
    (tmp_path / "contract_plain.py").write_text(FACTORY_SRC)
    args[1] = "contract_plain:build"
    code, _, err = run_cli("eval", plain, *args, "-q")
    assert code == 0, err
