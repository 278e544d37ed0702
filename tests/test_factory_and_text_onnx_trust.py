"""The user's factory code, and text ONNX graphs that take no attention mask (found by an audit):

- a factory (or its module, at import) that calls ``sys.exit`` is exit 2 naming it -- it was this
  command's exit status, 0 beside a failing gate;
- what a factory prints goes to stderr: ``--json`` stays one document;
- a helper module the factory's network calls is part of the embedding cache key: edited, the cached
  embeddings of the old network are not served;
- a text ONNX graph without an ``attention_mask`` input reads each text unpadded: its figures do not
  change with ``--batch-size`` (they did: 64.3% / 53.6% / 50.0% accuracy at 64 / 7 / 1);
- ``repair fix`` of a text ONNX model into a folder without its tokenizer says which files to copy.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_bert_folder, make_texts, run_cli

NET = '''
import torch.nn as nn
from {helpers} import act

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(act(self.pool(self.conv(x)).flatten(1)))

def net():
    {body}
    return Net()
'''
PRE = ["--image-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--class-names", "cat,dog,fox"]


def _factory(tmp_path: Path, monkeypatch, name: str, body: str = "pass", act: str = "torch.relu(x)") -> Path:
    """A factory module ``name`` in its own folder (the current folder from here on), its helper module
    ``<name>_helpers`` defining ``act``, and the weights of the network it builds."""
    import importlib

    from repair.io import save_safetensors

    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}_helpers.py").write_text(f"import torch\ndef act(x):\n    return {act}\n")
    (folder / f"{name}.py").write_text(NET.format(helpers=f"{name}_helpers", body=body))
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    torch.manual_seed(0)
    model = importlib.import_module(name).Net()
    save_safetensors(model.state_dict(), folder / "w.safetensors", {})
    for m in (name, f"{name}_helpers"):          # imported by repair as a user's run would, afresh
        import sys

        sys.modules.pop(m, None)
    return folder / "w.safetensors"


def _last_line(err: str) -> str:
    return [ln for ln in err.splitlines() if ln.strip()][-1]


def test_a_factory_that_exits_is_bad_input_never_the_commands_exit(tmp_path, monkeypatch, image_data):
    w = _factory(tmp_path, monkeypatch, "exits_fac", body="import sys; print('bye'); sys.exit(0)")
    code, out, err = run_cli("eval", w, "--factory", "exits_fac:net", *PRE, "-d", image_data, "--group-by", "place",
                             "--fail-under-wga", "90%")
    assert code == 2 and out == "", (code, out, err)
    line = _last_line(err)                        # after what the factory printed, as it printed it
    assert line.startswith("error: ") and "exits_fac:net" in line and "SystemExit 0" in line and "bye" in line, err


def test_a_factory_module_that_parses_arguments_when_imported_is_named(tmp_path, monkeypatch, image_data):
    w = _factory(tmp_path, monkeypatch, "argv_fac")
    src = (tmp_path / "argv_fac" / "argv_fac.py").read_text()
    (tmp_path / "argv_fac" / "argv_fac.py").write_text(
        "import argparse\nargparse.ArgumentParser().parse_args()\n" + src)
    args = ("eval", w, "--factory", "argv_fac:net", *PRE, "-d", image_data)
    # the command line the module's parser reads is the command's own (in this process it would be the test
    # runner's, which a parallel runner's worker does not carry)
    import sys
    monkeypatch.setattr(sys, "argv", ["repair", *map(str, args)])
    code, out, err = run_cli(*args)
    assert code == 2 and out == "", (code, out, err)
    line = _last_line(err)
    assert "factory module 'argv_fac'" in line and "SystemExit 2" in line and "unrecognized arguments" in line, err


def test_what_a_factory_prints_stays_out_of_the_json_and_is_shown_as_it_happens(tmp_path, monkeypatch, image_data):
    w = _factory(tmp_path, monkeypatch, "chatty_fac", body="print('building the network')")
    code, out, err = run_cli("eval", w, "--factory", "chatty_fac:net", *PRE, "-d", image_data, "--json")
    assert code == 0, err
    assert json.loads(out)["n"] > 0 and "building the network" in err
    # printed before it failed: shown, then the one line naming it
    w = _factory(tmp_path, monkeypatch, "failing_fac", body="print('MODEL_ROOT is not set'); raise RuntimeError('bad')")
    code, out, err = run_cli("eval", w, "--factory", "failing_fac:net", *PRE, "-d", image_data, "--json")
    assert code == 2 and out == "" and "MODEL_ROOT is not set" in err and "failing_fac:net" in _last_line(err), err


def test_a_log_handler_the_factory_module_makes_at_import_keeps_writing(tmp_path, monkeypatch, image_data):
    w = _factory(tmp_path, monkeypatch, "logging_fac", body="log.warning('building the network')")
    src = (tmp_path / "logging_fac" / "logging_fac.py").read_text()
    (tmp_path / "logging_fac" / "logging_fac.py").write_text(
        "import logging\nlog = logging.getLogger('logging_fac')\nlog.addHandler(logging.StreamHandler())\n"
        "log.propagate = False\n" + src)
    code, out, err = run_cli("eval", w, "--factory", "logging_fac:net", *PRE, "-d", image_data, "--json")
    assert code == 0 and json.loads(out)["n"] > 0, err
    assert "building the network" in err, err


def test_an_edited_helper_of_the_factorys_network_is_not_served_from_the_cache(tmp_path, monkeypatch, image_data):
    import sys

    w = _factory(tmp_path, monkeypatch, "helped_fac")

    def run():
        code, out, err = run_cli("eval", w, "--factory", "helped_fac:net", *PRE, "-d", image_data, "--json")
        assert code == 0, err
        for m in ("helped_fac", "helped_fac_helpers"):    # a new process imports them afresh
            sys.modules.pop(m, None)
        return json.loads(out)

    first, again = run(), run()
    assert not first["embedding"]["from_cache"] and again["embedding"]["from_cache"]
    (tmp_path / "helped_fac" / "helped_fac_helpers.py").write_text(
        "import torch\ndef act(x):\n    return -3 * x + torch.sin(5 * x)\n")
    edited = run()
    assert not edited["embedding"]["from_cache"]
    # the helper keyed whatever this process imported before the factory's module (another factory
    # sharing it, the user's own import): found from the module's names, not from what its import added
    from repair.adapters import LoadOptions, load_model

    import helped_fac_helpers  # noqa: F401

    a = load_model(w, LoadOptions(factory="helped_fac:net", image_size=32, mean=[0.5] * 3, std=[0.25] * 3))
    (tmp_path / "helped_fac" / "helped_fac_helpers.py").write_text("import torch\ndef act(x):\n    return x\n")
    assert a.build["classes_code"] != load_model(w, LoadOptions(factory="helped_fac:net", image_size=32,
                                                                mean=[0.5] * 3, std=[0.25] * 3)).build["classes_code"]


def _ids_only_onnx(folder: Path) -> Path:
    """A tiny BERT classifier exported to ONNX with one input, ``input_ids`` (dynamic batch and sequence
    axes, no attention mask), its tokenizer beside it."""
    from transformers import AutoModelForSequenceClassification

    make_bert_folder(folder, seed=3)
    bert = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()

    class Ids(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids).logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Ids(bert), (torch.tensor([[2, 5, 6, 3]] * 2),), str(folder / "model.onnx"),
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "n", 1: "s"}, "logits": {0: "n"}}, dynamo=False,
                          opset_version=17)
    (folder / "model.safetensors").unlink()
    return folder / "model.onnx"


def test_a_text_onnx_without_an_attention_mask_reads_each_text_unpadded(tmp_path):
    from repair.adapters import load_model
    from repair.data import DataOptions, load_data

    onnx = _ids_only_onnx(tmp_path / "ids")
    texts = make_texts(tmp_path / "t.csv", n=40)
    a = load_model(onnx)
    items = load_data(texts, DataOptions()).items
    lengths = {len(a.tokenizer(t)["input_ids"]) for t in items}
    assert len(lengths) > 1                                   # a batch of them is padded
    together = a.logits_batch(a.collate(items), "cpu")
    alone = torch.cat([a.logits_batch(a.collate([t]), "cpu") for t in items])
    assert torch.allclose(together, alone, atol=1e-5, rtol=1e-5), (together - alone).abs().max()
    figures = []
    for bs in ("1", "7", "64"):
        code, out, err = run_cli("eval", onnx, "-d", texts, "--batch-size", bs, "--json")
        assert code == 0, err
        doc = json.loads(out)
        figures.append((doc["accuracy"], [c["accuracy"] for c in doc["per_class"]]))
    assert figures[0] == figures[1] == figures[2], figures
    # how its texts are fed is in the embedding cache's key: an entry made when they were padded is
    # never served
    assert a.preprocess_id().get("fed") == "unpadded"


def test_fix_of_a_text_onnx_into_a_folder_without_its_tokenizer_says_what_to_copy(tmp_path):
    onnx = _ids_only_onnx(tmp_path / "ids")
    texts = make_texts(tmp_path / "t.csv", n=40)
    (tmp_path / "out").mkdir()
    code, _, err = run_cli("fix", onnx, "-d", texts, "--recipe", "dfr", "--out", tmp_path / "out" / "model.onnx")
    assert code == 0, err
    assert "notice:" in err and "tokenizer" in err and str(tmp_path / "out" / "model.onnx") in err, err
