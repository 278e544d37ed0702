"""What `repair fix` writes is the checkpoint it read with only the repaired tensors changed, however the
checkpoint names or shares its tensors (found by an audit of the written files)."""
from __future__ import annotations

import importlib
import json
import os
import shutil

import torch

from conftest import run_cli

ALIASED_SRC = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 3)
        self.classifier = self.fc      # an old name kept for old code: the same module, the same tensors

    def forward(self, x):
        return self.fc(self.body(x))


def build():
    torch.manual_seed(0)
    return Net()
'''


def _factory_checkpoint(tmp_path, monkeypatch, module: str, src: str):
    """``src`` as module ``module`` beside the test (importable here and by the CLI) and its ``build()``'s
    state dict as ``net.safetensors`` (each tensor its own copy: safetensors refuses shared memory).
    Returns (the weights file, the model built)."""
    from safetensors.torch import save_file

    (tmp_path / f"{module}.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    model = importlib.import_module(module).build()
    w = tmp_path / "net.safetensors"
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(w))
    return w, model


def test_a_head_the_checkpoint_stores_under_two_names_is_written_under_both(tmp_path, image_data, monkeypatch):
    """The head reachable as `fc` and `classifier` (one module): the file got the new `fc.*` and the old
    `classifier.*`, so a plain `load_state_dict` (the later key wins) gave the ORIGINAL head, and
    `repair.load_model` refused the output. Every name of a changed tensor now gets its new value."""
    from safetensors.torch import load_file

    from repair import load_model
    from repair.adapters import LoadOptions

    w, model = _factory_checkpoint(tmp_path, monkeypatch, "aliased_net", ALIASED_SRC)
    out = tmp_path / "fixed.safetensors"
    opts = ["--factory", "aliased_net:build", "--image-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
            "--class-names", "cat,dog,fox"]
    code, _, err = run_cli("fix", w, *opts, "--data", image_data, "--recipe", "dfr", "--out", out, "-q")
    assert code == 0, err
    before, after = load_file(str(w)), load_file(str(out))
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    for n in ("weight", "bias"):
        assert torch.equal(after[f"classifier.{n}"], after[f"fc.{n}"]), n
    plain = importlib.import_module("aliased_net").build()
    plain.load_state_dict(after)
    assert torch.equal(plain.fc.weight.detach(), after["fc.weight"])
    a = load_model(out, LoadOptions(factory="aliased_net:build", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                                    class_names=["cat", "dog", "fox"]))
    assert torch.equal(a.head_params()[0], after["fc.weight"].float())
    # the provenance names every tensor the file holds changed: the head under both its names
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        changed = json.loads(f.metadata()["repair.model_change"])["changed_tensors"]
    assert set(changed) == {"fc.weight", "fc.bias", "classifier.weight", "classifier.bias"}


def test_a_model_repair_of_a_checkpoint_storing_its_head_under_two_names_writes_both(tmp_path, image_data,
                                                                                    monkeypatch):
    """A model repair (fine-tuning every tensor) of the aliased head's checkpoint: the body and the head
    under both names get the trained values, a plain `load_state_dict` gives repair's logits, and the
    provenance names both names of the head as changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from repair import load_model
    from repair.adapters import LoadOptions

    (tmp_path / "aliased_net3.py").write_text(ALIASED_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = importlib.import_module("aliased_net3").build()
    w = tmp_path / "net.safetensors"
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(w))
    recipe = tmp_path / "ft.yaml"
    recipe.write_text("name: tiny-finetune\ncandidates:\n  - method: finetune\n"
                      "    params: {epochs: 3, batch_size: 8, lr: 0.05, patience: 0}\n")
    out = tmp_path / "fixed.safetensors"
    opts = ["--factory", "aliased_net3:build", "--image-size", "32", "--mean", "0.5,0.5,0.5", "--std",
            "0.5,0.5,0.5", "--class-names", "cat,dog,fox"]
    code, _, err = run_cli("fix", w, *opts, "--data", image_data, "--recipe", recipe, "--seed", "3", "--out", out,
                           "-q")
    assert code == 0, err
    before, after = load_file(str(w)), load_file(str(out))
    with safe_open(str(out), "pt") as f:
        changed = set(json.loads(f.metadata()["repair.model_change"])["changed_tensors"])
    assert {"fc.weight", "classifier.weight"} <= changed
    for n in ("weight", "bias"):
        assert torch.equal(after[f"classifier.{n}"], after[f"fc.{n}"]), n
        assert (f"fc.{n}" in changed) == (f"classifier.{n}" in changed) == (not torch.equal(after[f"fc.{n}"],
                                                                                               before[f"fc.{n}"]))
    plain = importlib.import_module("aliased_net3").build().eval()
    plain.load_state_dict(after)
    a = load_model(out, LoadOptions(factory="aliased_net3:build", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                                    class_names=["cat", "dog", "fox"]))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), a.logits_batch(x, torch.device("cpu")))


def test_a_tensor_held_under_two_names_is_one_tensor_changed_under_both(tmp_path, monkeypatch):
    """The alias group rule, at the API: setting the head changes `classifier.*` too -- counted changed
    under both names, as the head (the body hash, the embedding cache key, stays the file's), and written
    under both -- and a body tensor changed in place under one name is written under both as well."""
    from safetensors.torch import save_file

    from repair import load_model
    from repair.adapters import LoadOptions

    (tmp_path / "aliased_net2.py").write_text(ALIASED_SRC.replace("self.fc = nn.Linear(8, 3)",
                                                                  "self.fc = nn.Linear(8, 3)\n        self.body2 = self.body"))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = importlib.import_module("aliased_net2").build()
    w = tmp_path / "net.safetensors"
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(w))
    a = load_model(w, LoadOptions(factory="aliased_net2:build", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                                  class_names=["cat", "dog", "fox"]))
    body = a.body_hash()
    assert set(a.head_tensor_names()) == {"fc.weight", "fc.bias", "classifier.weight", "classifier.bias"}
    W, b = a.head_params()
    a.set_head(W + 1, b)
    assert a.changed_tensors() == ["classifier.weight", "fc.weight"]
    assert a.body_hash() == body and a.head_changed
    out = a.state_tensors()
    assert torch.equal(out["classifier.weight"], W + 1) and torch.equal(out["fc.weight"], W + 1)
    with torch.no_grad():
        a.model.body[0].weight.add_(1)                 # a body tensor, changed in place under one name
    assert {"body.0.weight", "body2.0.weight"} <= set(a.adopt_changes_in_place() + a.changed_tensors())
    assert a.body_hash() != body
    out = a.state_tensors()
    assert torch.equal(out["body2.0.weight"], out["body.0.weight"])


def test_a_pickle_checkpoint_whose_tensors_share_memory_is_written(tmp_path, bert_folder, text_data):
    """An old BERT pickle ties `cls.predictions.decoder.weight` to the word embeddings (one storage):
    safetensors refused to write it, and the run ended in exit 3 with an empty message. Each name is
    written as its own copy, and the output reloads."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = tmp_path / "bertpk"
    shutil.copytree(bert_folder, src)
    t = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    emb = "bert.embeddings.word_embeddings.weight"
    t["cls.predictions.decoder.weight"] = t[emb]              # tied: one tensor under two names
    torch.save(t, src / "pytorch_model.bin")
    out = tmp_path / "out"
    code, _, err = run_cli("fix", src, "--data", text_data, "--recipe", "dfr", "--allow-pickle", "--out", out, "-q")
    assert code == 0, err
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("cls.predictions.decoder.weight"), f.get_tensor(emb))
        assert torch.equal(f.get_tensor(emb), t[emb])


def test_an_internal_error_line_names_the_first_line_of_a_message_that_starts_with_a_newline():
    from cli.app import _internal_error_line

    line = _internal_error_line(RuntimeError("\n  Some tensors share memory\nmore"))
    assert "Some tensors share memory" in line and "\n" not in line


def test_model_args_given_to_a_timm_folder_are_in_the_output_folders_config(tmp_path, timm_folder, image_data):
    """`--model-args '{"act_layer": "gelu"}'` built, measured and repaired a GELU network, but the output
    folder's config.json was the source's: a plain timm load built the ReLU one (logits 47.7 apart in the
    audit's repro). The config now carries the arguments the network was built with."""
    import json

    import timm

    from repair import load_model

    out = tmp_path / "out"
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--model-args",
                           '{"act_layer": "gelu"}', "--out", out, "-q")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["model_args"]["act_layer"] == "gelu"
    plain = timm.create_model("local-dir:" + str(out.resolve()), pretrained=True).eval()
    a = load_model(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), a.model.eval()(x), atol=1e-5)
    # without --model-args the source's config.json is copied as it is, byte for byte
    out2 = tmp_path / "out2"
    assert run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", out2, "-q")[0] == 0
    assert (out2 / "config.json").read_bytes() == (timm_folder / "config.json").read_bytes()


def test_a_model_folders_hidden_files_are_carried_over_but_not_its_hidden_folders(tmp_path, bert_folder, text_data):
    """A Hugging Face folder's `.gitattributes` (its LFS rules) was silently not copied into the
    repaired folder. Hidden files are copied; hidden folders (a `.git` holding the unrepaired weights)
    and repair's own records are not."""
    src = tmp_path / "src"
    shutil.copytree(bert_folder, src)
    (src / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (src / ".git").mkdir()
    (src / ".git" / "weights-object").write_bytes(b"old weights")
    (src / ".repair-lock").write_text("")
    out = tmp_path / "out"
    code, _, err = run_cli("fix", src, "--data", text_data, "--recipe", "dfr", "--out", out, "-q")
    assert code == 0, err
    assert (out / ".gitattributes").read_bytes() == (src / ".gitattributes").read_bytes()
    assert not (out / ".git").exists() and not (out / ".repair-lock").exists()


def test_model_args_given_for_a_bare_weights_file_are_in_its_provenance(tmp_path, timm_folder, image_data):
    """A bare safetensors output has no config.json to carry `--model-args`: they were written nowhere, so
    nothing said which network the file's tensors were repaired for. The provenance records them, and a
    plain timm build with them reloads the output to repair's logits."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    from repair import load_model
    from repair.adapters import LoadOptions

    out = tmp_path / "fixed.safetensors"
    code, _, err = run_cli("fix", timm_folder / "model.safetensors", "--data", image_data, "--recipe", "dfr",
                           "--model-args", '{"act_layer": "gelu"}', "--out", out, "-q")
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        args = json.loads(f.metadata()["repair.model_args"])
    assert args["act_layer"] == "gelu"
    arch = json.loads((timm_folder / "config.json").read_text())["architecture"]
    plain = timm.create_model(arch, num_classes=3, **args).eval()
    plain.load_state_dict(load_file(str(out)))
    a = load_model(out, LoadOptions(arch=arch, model_args={"act_layer": "gelu"}))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), a.model.eval()(x), atol=1e-5)
    # without --model-args nothing is recorded
    out2 = tmp_path / "plain.safetensors"
    assert run_cli("fix", timm_folder / "model.safetensors", "--data", image_data, "--recipe", "dfr",
                   "--out", out2, "-q")[0] == 0
    with safe_open(str(out2), "pt") as f:
        assert "repair.model_args" not in f.metadata()


def test_a_head_tied_to_another_module_is_refused_before_any_work(tmp_path, image_data, monkeypatch):
    """Noticed by the fixer of the aliasing rule: a head whose weight is also another module's (tied to an
    input embedding) would change that module when repaired, and with it the features the head was fitted
    on (the embedding cache key ignores head tensors). Refused naming the tied tensor; a module reachable
    twice is not such a tie."""
    src = ALIASED_SRC.replace("self.classifier = self.fc      # an old name kept for old code: the same module, the same tensors",
                              "self.classifier = nn.Linear(8, 3)\n        self.classifier.weight = self.fc.weight")
    w, model = _factory_checkpoint(tmp_path, monkeypatch, "tied_net", src)
    out = tmp_path / "fixed.safetensors"
    code, _, err = run_cli("fix", w, "--factory", "tied_net:build", "--image-size", "32", "--mean", "0.5,0.5,0.5",
                           "--std", "0.5,0.5,0.5", "--class-names", "cat,dog,fox", "--data", image_data, "--recipe",
                           "dfr", "--out", out, "-q")
    assert code == 2 and "tied weights" in err and err.count("\n") == 1, err
    assert not out.exists()
