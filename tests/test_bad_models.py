"""Malformed or hostile model checkpoints: each is exit 2 with one error line naming the file (never
exit 3, never a file read outside the model folder, never a silently wrong evaluation)."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_images, run_cli, time_limit
from repair.errors import BadInput


def refused(*args, words=()) -> str:
    """``repair ARGS -q``: exit 2 and a single ``error:`` line holding every one of ``words``."""
    with time_limit(120):
        rc, out, err = run_cli(*args, "-q")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def copy_with(src: Path, dst: Path, config=None, remove=()) -> Path:
    """A copy of a model folder with config.json changed by ``config(cfg)`` and ``remove`` deleted."""
    shutil.copytree(src, dst)
    for name in remove:
        (dst / name).unlink()
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "images", n_per_class=2)


# ---------------------------------------------------------------- 1. model_args that read files / the network
@pytest.mark.parametrize("key, value, flag", [
    ("checkpoint_path", "OUTSIDE", False),
    ("checkpoint_path", "OUTSIDE", True),
    ("pretrained", True, False),
    ("pretrained_cfg_overlay", {"file": "OUTSIDE"}, False),
])
def test_timm_model_args_that_load_weights_are_refused(tmp_path, timm_folder, images, key, value, flag):
    """``model_args.checkpoint_path`` made timm ``torch.load`` any file (no --allow-pickle needed);
    ``pretrained: true`` tried a download. Refused naming config.json (or --model-args) and the key."""
    import timm

    outside = tmp_path / "elsewhere" / "weights.pth"
    outside.parent.mkdir()
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), outside)
    value = json.loads(json.dumps(value).replace("OUTSIDE", str(outside)))
    if flag:
        line = refused("eval", timm_folder, "--data", images, "--model-args", json.dumps({key: value}),
                       words=("--model-args", key, "refused"))
    else:
        m = copy_with(timm_folder, tmp_path / "m", lambda c: c.setdefault("model_args", {}).update({key: value}))
        line = refused("eval", m, "--data", images, words=(m / "config.json", key, "refused"))
    assert "do not fit" not in line


# ---------------------------------------------------------------- 2. a text model without its tokenizer
@pytest.mark.parametrize("remove, words", [
    (("tokenizer.json", "tokenizer_config.json", "vocab.txt"), ("no tokenizer files",)),
    (("tokenizer.json", "vocab.txt"), ("no vocabulary",)),          # a config, no vocabulary
])
def test_transformers_folder_without_tokenizer_is_refused(tmp_path, bert_folder, text_data, remove, words):
    """transformers used to build a 5-token tokenizer from config.json (every word [UNK]) and the
    model was evaluated and repaired on garbage."""
    m = copy_with(bert_folder, tmp_path / "m", remove=remove)
    line = refused("eval", m, "--data", text_data, words=words)
    assert line.startswith(f"error: {m}: ")


# ---------------------------------------------------------------- 3. a malformed config.json
def _dir_config(m: Path) -> None:
    (m / "config.json").unlink()
    (m / "config.json").mkdir()


def _fifo_config(m: Path) -> None:
    (m / "config.json").unlink()
    os.mkfifo(m / "config.json")


def _pcfg(**kv):
    return lambda m: _edit(m, lambda c: c["pretrained_cfg"].update(kv))


def _edit(m: Path, change) -> None:
    cfg = json.loads((m / "config.json").read_text())
    change(cfg)
    (m / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("spoil, words", [
    (_dir_config, ("folder",)),                                     # was IsADirectoryError, exit 3
    (_fifo_config, ("FIFO",)),                                      # was a read that never ended
    (lambda m: _edit(m, lambda c: c.pop("pretrained_cfg")), ("no image preprocessing",)),   # AssertionError
    (_pcfg(interpolation="nonsense"), ("interpolation", "nonsense")),                     # KeyError
    (_pcfg(std=[0, 0, 0]), ("std", "above 0")),                                          # ValueError
    (_pcfg(mean=[float("nan"), 0.5, 0.5]), ("mean", "finite")),
    # (without model_args' in_chans, which timm puts in input_size's place: the network takes 3 channels)
    (lambda m: _edit(m, lambda c: (c["pretrained_cfg"].update(input_size=[1, 32, 32]), c["model_args"].pop("in_chans"))),
     ("input_size", "RGB")),
])
def test_malformed_timm_config_is_exit_2_naming_it(tmp_path, timm_folder, images, spoil, words):
    m = tmp_path / "m"
    shutil.copytree(timm_folder, m)
    spoil(m)
    refused("eval", m, "--data", images, "--no-cache", words=(m / "config.json", *words))


def test_unreadable_config_json_is_bad_input(tmp_path, timm_folder, monkeypatch):
    """A config.json without read permission (PermissionError, exit 3): BadInput naming it. Opening
    it is refused by the file system, or (the tests may run as root) by a stand-in for it."""
    import builtins

    from repair.adapters import base

    m = tmp_path / "m"
    shutil.copytree(timm_folder, m)
    cfg = m / "config.json"
    cfg.chmod(0)
    real = {"open": builtins.open, "os_open": os.open}

    def denied(path):
        if isinstance(path, (str, Path)) and Path(path) == cfg:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(builtins, "open", lambda path, *a, **kw: denied(path) or real["open"](path, *a, **kw))
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: denied(path) or real["os_open"](path, *a, **kw))
    try:
        with pytest.raises(BadInput) as e:
            base.read_json(cfg)
    finally:
        cfg.chmod(0o644)
    assert e.value.path == str(cfg) and "Permission denied" in e.value.problem


# ---------------------------------------------------------------- 4. texts longer than the model's positions
def test_text_length_is_capped_at_the_models_positions(tmp_path, bert_folder):
    """The tiny BERT has 64 positions: --max-length 1000, or a tokenizer_config.json saying 512, made a
    300-token text crash the forward pass (exit 3)."""
    data = tmp_path / "long.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(4):
            w.writerow([" ".join(["good movie"] * 150), "positive" if i % 2 else "negative"])
    refused("eval", bert_folder, "--data", data, "--max-length", "1000", "--no-cache",
            words=(bert_folder / "config.json", "--max-length 1000", "64"))
    m = tmp_path / "m"
    shutil.copytree(bert_folder, m)
    tc = json.loads((m / "tokenizer_config.json").read_text())
    tc["model_max_length"] = 512
    (m / "tokenizer_config.json").write_text(json.dumps(tc))
    for args in ([m], [bert_folder, "--max-length", "64"]):
        with time_limit(120):
            rc, out, err = run_cli("eval", *args, "--data", data, "--no-cache", "--json", "-q")
        assert rc == 0, (rc, err)
        assert json.loads(out)["n"] == 4


# ---------------------------------------------------------------- 5. a tokenizer larger than the embeddings
def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, bert_folder, text_data):
    from transformers import BertForSequenceClassification

    m = tmp_path / "m"
    shutil.copytree(bert_folder, m)
    model = BertForSequenceClassification.from_pretrained(str(m))
    model.resize_token_embeddings(12)              # the tokenizer has 19 tokens: ids 12..18 have no row
    model.save_pretrained(str(m), safe_serialization=True)
    line = refused("eval", m, "--data", text_data, "--no-cache", words=("19 tokens", "12"))
    assert line.startswith(f"error: {m}: ")


# ---------------------------------------------------------------- 6. duplicate class names in a checkpoint
def test_a_label_naming_two_classes_of_a_checkpoint_is_refused(tmp_path, timm_folder, bert_folder, text_data):
    """A checkpoint's class names may repeat (ImageNet has two "crane" classes, and the real MobileNet
    in ../shared loads): a label of the data that names two classes is refused naming them (it was
    matched to the last one silently); the class index still says which; --class-names must be distinct."""
    two = make_images(tmp_path / "two", n_per_class=2, classes=["cat", "dog"])
    t = copy_with(timm_folder, tmp_path / "t", lambda c: c.update(label_names=["cat", "dog", "cat"]))
    refused("eval", t, "--data", two, words=(str(two), "'cat' names 2 classes of the model (0, 2)"))
    idx = make_images(tmp_path / "idx", n_per_class=2, classes=["0", "1"])
    code, out, err = run_cli("eval", t, "--data", idx, "--json", "-q")
    assert code == 0, err
    assert [c["n"] for c in json.loads(out)["per_class"]] == [2, 2, 0]
    b = copy_with(bert_folder, tmp_path / "b", lambda c: c.update(id2label={"0": "x", "1": "x"},
                                                                    label2id={"x": 1}))
    with open(tmp_path / "x.csv", "w") as f:
        f.write("text,label\nthe movie was great,x\nawful plot,x\n")
    refused("eval", b, "--data", tmp_path / "x.csv", words=("'x' names 2 classes",))
    # id2label keys that are not the head's indices: the config is named, not the data
    k = copy_with(bert_folder, tmp_path / "k", lambda c: c.update(id2label={"0": "negative", "5": "positive"},
                                                                    label2id={"negative": 0, "positive": 5}))
    refused("eval", k, "--data", text_data, words=(str(k / "config.json"), "id2label's keys (0, 5)",
                                                   "class indices (0 to 1)"))
    code, _, err = run_cli("eval", timm_folder, "--data", two, "--class-names", "cat,dog,cat", "-q")
    assert code == 2 and "--class-names must be distinct" in err, err


def test_timm_label_names_written_as_an_index_dict_are_read_by_index(tmp_path, timm_folder):
    """timm's ``save_for_hf`` writes ``label_names`` as ``{id: name}`` where the ids have gaps: read by
    index (a missing name shown as its index), where it was refused as "not a list"; a key that is no
    index of the head is exit 2 naming it."""
    data = make_images(tmp_path / "d", n_per_class=2, classes=["fox", "cat"])
    t = copy_with(timm_folder, tmp_path / "t", lambda c: c.update(label_names={"2": "fox", "0": "cat"}))
    code, out, err = run_cli("eval", t, "--data", data, "--json", "-q")
    assert code == 0, err
    assert [(c["name"], c["n"]) for c in json.loads(out)["per_class"]] == [("cat", 2), ("1", 0), ("fox", 2)]
    bad = copy_with(timm_folder, tmp_path / "b", lambda c: c.update(label_names={"0": "cat", "7": "fox"}))
    refused("eval", bad, "--data", data, words=("label_names's keys (0, 7)", "0 to 2"))


def test_a_class_count_the_weights_disagree_with_is_refused_before_the_network_is_built(tmp_path, timm_folder,
                                                                                        monkeypatch):
    """config.json saying 10^7 classes over a 3-class head: the network was built first (a 10^7-row
    head, 4.5 GB) and refused after; now refused from the weights' head shape, nothing built."""
    import timm

    from repair.adapters import load_model
    from repair.errors import BadInput

    t = copy_with(timm_folder, tmp_path / "t", lambda c: c.update(num_classes=10_000_000))

    def boom(*a, **k):
        raise AssertionError("the network was built")

    monkeypatch.setattr(timm, "create_model", boom)
    with pytest.raises(BadInput) as e:
        load_model(t)
    assert "has 3 classes" in str(e.value) and "num_classes=10000000" in str(e.value)
