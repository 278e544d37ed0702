"""A transformers folder repair cannot use, refused in one line naming the file (found by the session's line
coverage: no test reached these refusals): a base model without a classification head, a sharded checkpoint,
a folder without weights, a weights file beside a pickle-only folder, a weights file whose tensors or shapes
are not the folder's model's. Nothing in the folder is changed by the attempt."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_bert_folder, run_cli
from repair.adapters import load_model
from repair.errors import BadInput
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_bert_folder(tmp_path_factory.mktemp("hf51") / "bert")


def _copy(bert, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(bert, dst)
    return dst


def _digests(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_base_model_without_a_classifier_is_refused(bert, tmp_path):
    m = _copy(bert, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match=r"not a sequence-classification model \(architectures: \['BertModel'\]\)") as e:
        load_model(m)
    assert "config.json" in str(e.value)


def test_a_sharded_checkpoint_is_refused_with_how_to_save_one_file(bert, tmp_path):
    m = _copy(bert, tmp_path)
    (m / "model.safetensors").rename(m / "model-00001-of-00001.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(BadInput, match=r"sharded checkpoints are not supported yet; save with a single model\.safetensors"):
        load_model(m)


def test_a_folder_without_weights_is_refused(bert, tmp_path):
    m = _copy(bert, tmp_path)
    (m / "model.safetensors").unlink()
    with pytest.raises(BadInput, match=r"no model\.safetensors in the transformers folder") as e:
        load_model(m)
    assert str(m) in str(e.value)


def test_a_weights_file_beside_a_pickle_only_folder_is_refused(bert, tmp_path):
    m = _copy(bert, tmp_path)
    sd = load_file(str(m / "model.safetensors"))
    torch.save(sd, str(m / "pytorch_model.bin"))
    (m / "model.safetensors").rename(m / "other.safetensors")
    with pytest.raises(BadInput, match=r"a weights file beside a pickle-only transformers folder; give the folder") as e:
        load_model(m / "other.safetensors")
    assert "other.safetensors" in str(e.value)


def test_a_weights_file_of_another_model_is_refused_naming_a_tensor(bert, tmp_path):
    m = _copy(bert, tmp_path)
    sd = load_file(str(m / "model.safetensors"))
    extra = dict(sd, **{"bert.extra.weight": torch.zeros(2)})
    save_file(extra, str(m / "names.safetensors"))
    with pytest.raises(BadInput, match=r"weights do not match the folder's model \(1 tensor name\(s\) differ, "
                                       r"e\.g\. bert\.extra\.weight\)") as e:
        load_model(m / "names.safetensors")
    assert "names.safetensors" in str(e.value)
    key = "classifier.weight"
    shaped = dict(sd, **{key: torch.zeros(3, sd[key].shape[1])})
    save_file(shaped, str(m / "shape.safetensors"))
    with pytest.raises(BadInput, match=r"shape\.safetensors: tensor classifier\.weight has shape \(3, 32\), the "
                                       r"folder's model expects \(2, 32\)"):
        load_model(m / "shape.safetensors")


def test_the_cli_refuses_in_one_line_with_exit_2_and_changes_nothing(bert, tmp_path):
    m = _copy(bert, tmp_path)
    (m / "model.safetensors").unlink()
    before = _digests(m)
    data = tmp_path / "d.csv"
    data.write_text("text,label\ngood movie,positive\nbad movie,negative\n" * 4)
    code, stdout, err = run_cli("fix", m, "--data", data, "--recipe", "dfr", "--out", tmp_path / "out", "-q")
    assert code == 2 and stdout == "" and "no model.safetensors in the transformers folder" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists() and _digests(m) == before
