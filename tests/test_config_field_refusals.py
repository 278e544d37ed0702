"""A checkpoint folder's config.json that disagrees with itself or its weights is refused in one line
naming config.json and the field: timm's ``pretrained_cfg`` that is not an object (it was an internal
error, exit 3), a transformers config whose labels do not give the head's rows (it was transformers'
"look at the above report", a report never shown, after a torch warning)."""
from __future__ import annotations

import json

import pytest

from conftest import make_bert_folder, make_images, make_texts, make_timm_folder, one_line_naming, run_cli


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(pretrained_cfg=[1]), ("pretrained_cfg must be an object", "list")),
    (lambda c: c.update(pretrained_cfg="r160_in1k"), ("pretrained_cfg must be an object", "str")),
    (lambda c: c["pretrained_cfg"].update(classifier=5), ("pretrained_cfg.classifier", "got 5")),
    (lambda c: c["pretrained_cfg"].update(classifier=["fc", 3]), ("pretrained_cfg.classifier",)),
])
def test_a_timm_folder_with_a_malformed_pretrained_cfg_is_bad_input(tmp_path, edit, words):
    d = make_timm_folder(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    data = make_images(tmp_path / "imgs", n_per_class=2)
    for args in (("eval", d, "-d", data, "-q"), ("export", d, "-f", "safetensors", "-o", tmp_path / "st", "-q")):
        code, _, err = run_cli(*args)
        one_line_naming(code, err, d / "config.json", *words)
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize("labels, built", [(3, "(3,)"), (-1, "(0,)")])
def test_a_transformers_config_whose_labels_miss_the_heads_rows_is_named(tmp_path, labels, built):
    d = make_bert_folder(tmp_path / "bert")
    cfg = json.loads((d / "config.json").read_text())
    if labels > 0:
        cfg["id2label"] = {str(i): f"c{i}" for i in range(labels)}
        cfg["label2id"] = {f"c{i}": i for i in range(labels)}
    else:
        cfg["num_labels"] = labels
        cfg.pop("id2label", None)
        cfg.pop("label2id", None)
    (d / "config.json").write_text(json.dumps(cfg))
    texts = make_texts(tmp_path / "t.csv", n=12)
    code, _, err = run_cli("eval", d, "-d", texts, "-q")
    line = one_line_naming(code, err, d / "config.json", "classifier.", "(2,", built, "id2label / num_labels")
    assert "above report" not in line
