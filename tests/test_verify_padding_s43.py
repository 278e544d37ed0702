"""ONNX verification of a text model always runs a padded batch (session 43's export audit): texts of
one token length never pad one another, so a file that ignores its attention mask (or has one sequence
length built in) passed every batch; the check then verifies one more batch of two lengths."""
from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import make_bert_folder, run_cli

WORDS = ["the", "movie", "plot", "was", "is", "a", "fun"]


def _texts(path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        for i, n in enumerate(lengths):
            pos = i % 2 == 0
            w.writerow({"text": " ".join([str(x) for x in rng.choice(WORDS, size=n - 1)] + ["great" if pos else "awful"]),
                        "label": "positive" if pos else "negative"})
    return path


def _export(module, tok, path):
    ex = tok(["the movie was great", "a plot is awful"], return_tensors="pt", padding=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ex["input_ids"], ex["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
                                        "logits": {0: "b"}}, dynamo=False, opset_version=17)
    return path


class _Logits(torch.nn.Module):
    def __init__(self, m, ignore_mask):
        super().__init__()
        self.m, self.ignore_mask = m, ignore_mask

    def forward(self, input_ids, attention_mask):
        mask = attention_mask * 0 + 1 if self.ignore_mask else attention_mask
        return self.m(input_ids=input_ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("pad")
    b = make_bert_folder(root / "bert")
    m = AutoModelForSequenceClassification.from_pretrained(str(b)).eval()
    tok = AutoTokenizer.from_pretrained(str(b))
    return {"bert": b, "bad": _export(_Logits(m, True), tok, root / "ignore_mask.onnx"),
            "good": _export(_Logits(m, False), tok, root / "good.onnx"),
            "same": _texts(root / "same.csv", [4] * 40), "mixed": _texts(root / "mixed.csv", [2, 3, 4, 5, 6] * 8)}


def _verify(files, onnx, data):
    code, out, err = run_cli("verify", str(files[onnx]), "--reference", str(files["bert"]), "--data",
                             str(files[data]), "--json")
    return code, (json.loads(out) if out.strip() else {}), err


def test_a_file_ignoring_its_mask_fails_on_texts_of_one_length(files):
    code, rep, err = _verify(files, "bad", "same")
    assert code == 1, err
    assert rep["passed"] is False and rep["padded_batch"]["passed"] is False
    assert rep["padded_batch"]["made"] is True          # every text one length: a text made from one
    assert any("padd" in p for p in rep["problems"])


def test_a_sound_file_passes_the_padded_batch(files):
    code, rep, err = _verify(files, "good", "same")
    assert code == 0, err
    pb = rep["padded_batch"]
    assert pb["passed"] is True and pb["lengths"][0] != pb["lengths"][1]


def test_no_extra_batch_when_the_samples_pad_one_another(files):
    code, rep, err = _verify(files, "good", "mixed")
    assert code == 0, err
    assert rep["padded_batch"] is None
    code, rep, _ = _verify(files, "bad", "mixed")        # the batches themselves catch it
    assert code == 1 and rep["padded_batch"] is None


def test_texts_all_cut_at_the_maximum_length_still_get_a_padded_batch(files, tmp_path):
    """(the session's review) every text cut at --max-length: the text made from one is halved until it
    is read shorter."""
    long = _texts(tmp_path / "long.csv", [40] * 12)
    code, out, err = run_cli("verify", str(files["bad"]), "--reference", str(files["bert"]), "--data", str(long),
                             "--max-length", "8", "--json")
    rep = json.loads(out)
    assert code == 1, err
    assert rep["padded_batch"]["passed"] is False and rep["padded_batch"]["lengths"][0] == 8


class _BakedLength(torch.nn.Module):
    """The export example's sequence length built into the graph (a traced reshape): it reads every text of
    that length right, any other length not at all."""

    def __init__(self, m, length):
        super().__init__()
        self.m, self.length = m, length

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids.reshape(-1, self.length),
                      attention_mask=attention_mask.reshape(-1, self.length)).logits


def test_a_file_with_the_samples_length_built_in_fails_on_the_shorter_text_alone(files, tmp_path):
    """(session 44's transformers audit: the dynamo exporter fixed Funnel's sequence length) every sample
    read at one length pads nothing; the shorter text of the padded batch, run alone, is a length the file
    cannot read."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = AutoModelForSequenceClassification.from_pretrained(str(files["bert"])).eval()
    tok = AutoTokenizer.from_pretrained(str(files["bert"]))
    n = len(tok("the movie was great")["input_ids"])          # 4 words: the length of every "same" text
    baked = _export(_BakedLength(m, n), tok, tmp_path / "baked.onnx")
    code, out, err = run_cli("verify", str(baked), "--reference", str(files["bert"]), "--data", str(files["same"]),
                             "--json")
    rep = json.loads(out)
    assert code == 1, err
    pb = rep["padded_batch"]
    assert pb["passed"] is False and pb["lengths"][0] == n and pb["lengths"][1] < n
    assert any("alone" in p and "sequence length built in" in p for p in rep["problems"]), rep["problems"]


def test_fixed_axes_names_an_axis_an_export_fixed():
    from onnx import TensorProto, helper

    from repair.export import fixed_axes

    def proto(dims):
        g = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, dims)])
        return helper.make_model(g)

    assert fixed_axes(proto(["batch", "seq"]), ["input_ids"], 2) == []
    assert fixed_axes(proto(["batch", 8]), ["input_ids"], 2) == ["axis 1 of input 'input_ids' (at 8)"]
    assert fixed_axes(proto([1, 8]), ["input_ids"], 1) == ["axis 0 of input 'input_ids' (at 1)"]
