"""A --factory module whose head is an nn.Linear that does more than ``x @ W.T + b`` (session 44's factory
audit): a cosine classifier (a Linear subclass with its own forward) or a hook adding a prior was measured as
``embeddings @ W.T + b``, so the figures were not the module's, and the written model gave others; a prior
small beside huge logits passed the old bound (1e-3 of the largest logit); a weight-normalised head was an
internal error. Each is exit 2 naming the weights file; a plain head is measured as before."""
from __future__ import annotations

import importlib
import os

import pytest
from conftest import run_cli

from repair.io import save_safetensors

SRC = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

class CosineLinear(nn.Linear):
    def forward(self, x):
        return 10 * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1), self.bias)

def body():
    return [nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]

def plain():
    torch.manual_seed(0)
    return nn.Sequential(*body(), nn.Linear(4, 3))

def cosine():
    torch.manual_seed(0)
    return nn.Sequential(*body(), CosineLinear(4, 3))

def hooked():
    m = plain()
    m[-1].register_forward_hook(lambda mod, inp, out: out + torch.tensor([2.0, 0.0, 0.0]))
    return m

class Scaled(nn.Module):          # a prior 3e-4 of the largest logit (3.43 on ~6,800 in the audit)
    def __init__(self):
        super().__init__()
        self.net = plain()
    def forward(self, x):
        y = self.net(x)
        return y + 3e-4 * y.abs().max() * torch.tensor([1.0, 0.0, 0.0])

def scaled():
    return Scaled()

class Autocast(nn.Module):        # the head run in half precision: its output rounded, no prior
    def __init__(self, dtype):
        super().__init__()
        self.net, self.dtype = plain(), dtype
    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.net(x)

def half():
    return Autocast(torch.float16)

def bhalf():
    return Autocast(torch.bfloat16)

def weightnorm():
    m = plain()
    m[-1] = nn.utils.parametrizations.weight_norm(m[-1])
    return m
'''


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "heads_s44.py").write_text(SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    importlib.invalidate_caches()
    return importlib.import_module("heads_s44")


def _eval(factory, tmp_path, image_data, name):
    w = tmp_path / f"{name}.safetensors"
    save_safetensors(getattr(factory, name)().state_dict(), w, {})
    code, _, err = run_cli("eval", w, "--factory", f"heads_s44:{name}", "--image-size", "32", "--mean", "0.5,0.5,0.5",
                           "--std", "0.25,0.25,0.25", "--class-names", "cat,dog,fox", "--data", image_data,
                           "--cache-dir", tmp_path / "c", "-q")
    return code, err, w


@pytest.mark.parametrize("name,words", [("cosine", "not its head"), ("hooked", "not its head"),
                                        ("scaled", "not its head"), ("weightnorm", "weight-normalised")])
def test_a_head_that_is_not_plain_linear_math_is_exit_2_naming_the_file(factory, tmp_path, image_data, name, words):
    code, err, w = _eval(factory, tmp_path, image_data, name)
    assert code == 2 and words in err and str(w) in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name", ["plain", "half", "bhalf"])
def test_a_plain_head_is_measured_also_run_under_autocast(factory, tmp_path, image_data, name):
    """(the session's review) a head run under autocast outputs half-precision logits: the bound allows
    that dtype's rounding, as the ONNX path allows a float16 head's."""
    code, err, _ = _eval(factory, tmp_path, image_data, name)
    assert code == 0, err
