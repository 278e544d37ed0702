"""Library inputs as a Python caller gives them: a float64 default dtype, sparse or unsigned group
ids, negative-stride numpy views, numpy integers for whole-number parameters."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import repair
from repair.choosing import choose_heads
from repair.errors import BadInput
from repair.methods import BadArrays, RepairInputs, check_inputs, get_method, list_methods

TOL = dict(rtol=1e-5, atol=1e-6)       # float32 results of one path; any CPU


@contextlib.contextmanager
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def arrays(n: int = 60, d: int = 8, c: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    g = (np.arange(n) // c) % 2
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[:, 0] += 2.0 * y - 1.0
    X[:, 1] += 2.0 * g - 1.0
    W = rng.normal(size=(c, d)).astype(np.float32)
    b = np.zeros(c, dtype=np.float32)
    return X, y, W, b, g


def head_inputs(groups=True, **kw):
    X, y, W, b, g = arrays()
    return RepairInputs(X=torch.from_numpy(X), y=torch.from_numpy(y), W=torch.from_numpy(W), b=torch.from_numpy(b),
                        groups=torch.from_numpy(g) if groups else None, seed=1, **kw)


def same_head(a, b):
    torch.testing.assert_close(a.W, b.W, **TOL)
    torch.testing.assert_close(a.b, b.b, **TOL)


# ----------------------------------------------------------------------------- 1. float64 default dtype
def test_choose_heads_under_a_float64_default_dtype_gives_the_float32_result():
    X, y, W, b, g = arrays()
    ref = choose_heads("auto", X, y, W, b, g, seed=1)
    with float64_default():
        got = choose_heads("auto", X, y, W, b, g, seed=1)
    assert got.final.W.dtype == torch.float32
    same_head(got.final, ref.final)


@pytest.mark.parametrize("name", [m.name for m in list_methods("head")])
def test_each_head_repair_under_a_float64_default_dtype_gives_the_float32_result(name):
    info = get_method(name)
    ref = info(head_inputs())
    with float64_default():
        got = info(head_inputs())
    assert got.W.dtype == ref.W.dtype
    same_head(got, ref)


def test_probe_under_a_float64_default_dtype(timm_folder, image_data):
    ref = repair.probe(timm_folder, image_data, top_k=3)
    with float64_default():
        got = repair.probe(timm_folder, image_data, top_k=3)
    for key in ("accuracy", "per_class", "top_spurious_neurons", "pseudo_groups"):
        assert got[key] == ref[key], key
    np.testing.assert_allclose(np.array(got["neuron_spuriousness"], dtype=float),
                               np.array(ref["neuron_spuriousness"], dtype=float), rtol=1e-4, atol=1e-5)


def test_fix_under_a_float64_default_dtype(timm_folder, image_data, tmp_path):
    ref = repair.fix(timm_folder, image_data, out=tmp_path / "ref", recipe="dfr", seed=1)
    with float64_default():
        got = repair.fix(timm_folder, image_data, out=tmp_path / "fixed", recipe="dfr", seed=1)
    assert (tmp_path / "fixed").exists()
    W, b = got.adapter.head_params()
    W0, b0 = ref.adapter.head_params()
    torch.testing.assert_close(W.float(), W0.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.float(), b0.float(), rtol=1e-4, atol=1e-5)


def test_export_under_a_float64_default_dtype_verifies_and_leaves_the_default_as_it_was(timm_folder, image_data,
                                                                                        tmp_path):
    """The network was built in float64 under the caller's default and the image inputs followed it, so the
    exported graph mixed double and float (onnxruntime refused it): models are built, and images read, in
    float32 whatever the default; the caller's default is left as it was."""
    with float64_default():
        repair.export_model(timm_folder, tmp_path / "m.onnx", data=image_data)
        assert torch.get_default_dtype() == torch.float64
        m = repair.load_model(timm_folder)
        assert torch.get_default_dtype() == torch.float64
    assert {p.dtype for p in m.model.parameters()} == {torch.float32}
    assert (tmp_path / "m.onnx").is_file()


MAKES_A_TENSOR = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc(h + torch.zeros(h.shape[0], 8))      # a tensor made without a dtype


def build():
    torch.manual_seed(0)
    return Net()
"""


def test_a_model_that_makes_tensors_in_forward_runs_under_a_float64_default(image_data, tmp_path, monkeypatch):
    """Found by the late review: the network was built in float32, but a tensor its forward made without a
    dtype followed the caller's float64 default and the forward failed (with a cold cache; a warm one hid
    it). Forward passes and training run under a float32 default too."""
    import importlib
    import os

    from safetensors.torch import save_file

    from repair.adapters import LoadOptions
    from repair.api import RuntimeOptions

    (tmp_path / "makes_a_tensor.py").write_text(MAKES_A_TENSOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    w = tmp_path / "f.safetensors"
    save_file(dict(importlib.import_module("makes_a_tensor").build().state_dict()), str(w))
    lo = LoadOptions(factory="makes_a_tensor:build", image_size=32, class_names=["cat", "dog", "fox"])
    rt = RuntimeOptions(use_cache=False)
    ref = repair.evaluate(w, image_data, load_options=lo, runtime=rt)
    with float64_default():
        got = repair.evaluate(w, image_data, load_options=lo, runtime=rt)
        fixed = repair.fix(w, image_data, out=tmp_path / "o.safetensors", recipe="dfr", load_options=lo, runtime=rt)
        assert torch.get_default_dtype() == torch.float64
    assert got["accuracy"] == ref["accuracy"] and fixed.report["kind"] == "head"


# ----------------------------------------------------------------------------- 2. sparse group ids
@pytest.mark.parametrize("big", [10 ** 7, 10 ** 10])
def test_huge_group_ids_are_the_same_partition_as_compact_ones(big):
    from conftest import time_limit

    X, y, W, b, g = arrays()
    ref = choose_heads("auto", X, y, W, b, g, seed=1)
    sparse = np.where(g == 0, 0, big)
    before = sparse.copy()
    with time_limit(60):
        got = choose_heads("auto", X, y, W, b, sparse, seed=1)
    same_head(got.final, ref.final)
    assert np.array_equal(sparse, before)                  # the caller's array is not modified


@pytest.mark.parametrize("name", ["dfr", "afr", "mix"])
def test_a_head_repair_called_directly_takes_huge_group_and_cluster_ids(name):
    info = get_method(name)
    ref = info(head_inputs(clusters=torch.arange(60)))
    inp = head_inputs(clusters=torch.arange(60) * 10 ** 9)
    inp.groups = inp.groups * 10 ** 9
    before = inp.groups.clone()
    got = info(inp)
    same_head(got, ref)
    assert torch.equal(inp.groups, before)


def test_check_inputs_leaves_compact_ids_as_they_are():
    inp = head_inputs(clusters=torch.arange(60))
    out = check_inputs(inp)
    assert out.groups is inp.groups and out.clusters is inp.clusters


# ----------------------------------------------------------------------------- 3. unsigned integers
@pytest.mark.parametrize("dt", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_unsigned_numpy_labels_and_groups(dt):
    X, y, W, b, g = arrays()
    ref = choose_heads("dfr", X, y, W, b, g, seed=1)
    got = choose_heads("dfr", X, y.astype(dt), W, b, g.astype(dt), seed=1)
    same_head(got.final, ref.final)


@pytest.mark.parametrize("dt", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_torch_labels_and_groups_in_a_direct_call(dt):
    ref = get_method("dfr")(head_inputs())
    inp = head_inputs()
    inp.y, inp.groups = inp.y.to(dt), inp.groups.to(dt)
    same_head(get_method("dfr")(inp), ref)


def test_unsigned_ids_beyond_int64():
    inp = head_inputs()
    ref = get_method("dfr")(head_inputs())
    inp.groups = torch.from_numpy(np.where(np.arange(60) // 2 % 2 == 0, 2 ** 63, 2 ** 64 - 1).astype(np.uint64))
    same_head(get_method("dfr")(inp), ref)        # the same partition, in the same (unsigned) order
    inp = head_inputs()
    inp.y = torch.from_numpy(np.where(np.arange(60) % 2 == 0, 0, 2 ** 64 - 1).astype(np.uint64))
    with pytest.raises(BadArrays, match=r"^dfr: y holds class indices outside 0\.\.1 \(values of 2\*\*63 and more\)"):
        get_method("dfr")(inp)


# ----------------------------------------------------------------------------- 4. negative strides
def test_negative_stride_views_are_read():
    X, y, W, b, g = arrays()
    ref = choose_heads("dfr", np.ascontiguousarray(X[::-1]), np.ascontiguousarray(y[::-1]), W, b,
                       np.ascontiguousarray(g[::-1]), seed=1)
    got = choose_heads("dfr", X[::-1], y[::-1], W[::1], b[::-1][::-1], g[::-1], seed=1)
    same_head(got.final, ref.final)
    ref = choose_heads("dfr", np.ascontiguousarray(X[::-1]), np.ascontiguousarray(y[::-1]), W, b)
    got = choose_heads("dfr", X[::-1], y[::-1], W, b)
    same_head(got.final, ref.final)


# ----------------------------------------------------------------------------- 5. numpy integers
def test_whole_number_parameters_take_numpy_integers():
    from repair.recipes import check_folds
    from repair.rules import check_export_options, check_max_verify, whole_number

    assert check_folds(np.int64(3)) == 3 and type(check_folds(np.int64(3))) is int
    assert check_max_verify(np.int64(5)) == 5 and type(check_max_verify(np.int32(5))) is int
    check_export_options(opset=np.int64(17))
    assert whole_number(np.uint8(4), "n", 1) == 4
    for bad in (True, np.bool_(True), 2.0, "3", None):
        with pytest.raises(BadInput, match="folds must be a whole number"):
            check_folds(bad)
        with pytest.raises(BadInput, match="--max-verify must be a whole number"):
            check_max_verify(bad)
    with pytest.raises(BadInput, match="--opset must be a whole number"):
        check_export_options(opset=True)
    X, y, W, b, g = arrays()
    ref = choose_heads("dfr", X, y, W, b, g, seed=1, folds=3)
    same_head(choose_heads("dfr", X, y, W, b, g, seed=1, folds=np.int64(3)).final, ref.final)


def test_probe_top_k_takes_a_numpy_integer(timm_folder, image_data):
    ref = repair.probe(timm_folder, image_data, top_k=3)
    got = repair.probe(timm_folder, image_data, top_k=np.int64(3))
    assert got["per_class"] == ref["per_class"]
    with pytest.raises(BadInput, match="top_k"):
        repair.probe(timm_folder, image_data, top_k=True)


def test_export_takes_numpy_integers(timm_folder, image_data, tmp_path):
    report = repair.export_model(timm_folder, tmp_path / "m.onnx", data=image_data, max_verify=np.int64(5),
                                 opset=np.int64(17))
    assert report["passed"] and report["n_verified"] == 5 and report["opset"] == 17
