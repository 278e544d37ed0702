"""A repaired bare weights file says what built its network and which class each head row is (session
43's provenance audit): two repairs of one factory model with other ``--class-names`` orders, or other
``--model-args``, wrote different weights under the same provenance."""
from __future__ import annotations

import json

from conftest import factory_weights, make_images, run_cli


def _factory(tmp_path, monkeypatch):
    return factory_weights(tmp_path, "provnet43", "from torch import nn\n"
                           "def build(act='relu'):\n"
                           "    a = nn.ReLU() if act == 'relu' else nn.Tanh()\n"
                           "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), a, nn.Linear(6, 3))\n",
                           monkeypatch)


def _settings(path):
    from repair.io import load_safetensors

    return json.loads(load_safetensors(path)[1]["repair.settings"])


def test_a_bare_outputs_provenance_names_its_factory_arguments_and_class_order(tmp_path, monkeypatch):
    w = _factory(tmp_path, monkeypatch)
    data = make_images(tmp_path / "d", n_per_class=4, size=8, classes=["cat", "dog", "fox"])
    common = ("--factory", "provnet43:build", "--image-size", "8", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
              "--data", str(data), "--recipe", "dfr", "-q")
    runs = {}
    for name, extra in (("a", ("--class-names", "cat,dog,fox")), ("b", ("--class-names", "fox,cat,dog")),
                        ("c", ("--class-names", "cat,dog,fox", "--model-args", '{"act": "tanh"}'))):
        code, _, err = run_cli("fix", str(w), *common, *extra, "--out", str(tmp_path / f"{name}.safetensors"))
        assert code == 0, err
        runs[name] = _settings(tmp_path / f"{name}.safetensors")
    assert runs["a"]["classes"] == ["cat", "dog", "fox"] and runs["b"]["classes"] == ["fox", "cat", "dog"]
    net_a, net_c = runs["a"]["network"], runs["c"]["network"]
    assert net_a["factory"] == "provnet43:build" and len(net_a["code"]) == 64
    assert net_a["model_args"] == {} and net_c["model_args"] == {"act": "tanh"}
    assert str(tmp_path) not in json.dumps(runs)          # the factory's code by digest, never by path


def test_a_timm_models_provenance_names_its_architecture(tmp_path):
    from conftest import make_timm_folder

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=3)
    code, out, err = run_cli("fix", str(m), "--data", str(data), "--recipe", "dfr", "--out", str(tmp_path / "o"),
                             "--json", "-q")
    assert code == 0, err
    s = json.loads(out)["settings"]
    assert s["network"]["architecture"] == "test_resnet" and s["classes"]
    assert _settings(tmp_path / "o" / "model.safetensors") == s
