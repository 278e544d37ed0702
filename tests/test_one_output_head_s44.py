"""A head with one output (transformers' num_labels=1 regression head, one sigmoid logit) is not a
classifier repair can read: argmax over one column is always that class, so such a model measured 100%
on data labelled with it and passed any gate (session 44's transformers audit). Refused by name, exit 2."""
from __future__ import annotations

import csv
import json

import torch
from conftest import make_bert_folder, run_cli


def test_a_regression_head_is_exit_2_naming_it_and_no_gate_passes(tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder = make_bert_folder(tmp_path / "bert")
    cfg = json.loads((folder / "config.json").read_text())
    m = AutoModelForSequenceClassification.from_pretrained(str(folder))
    with torch.no_grad():
        m.classifier = torch.nn.Linear(m.classifier.in_features, 1)
    m.config.num_labels = 1
    m.config.id2label, m.config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}
    m.save_pretrained(str(folder), safe_serialization=True)
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "LABEL_0"} != cfg["id2label"]
    data = tmp_path / "d.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(12):
            w.writerow([f"the movie was {'great' if i % 2 else 'awful'}", "LABEL_0"])
    code, out, err = run_cli("eval", str(folder), "--data", str(data), "--fail-under-acc", "0.5")
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and "model.safetensors" in err and "1 output" in err and "regression" in err
    assert "gate passed" not in out + err
