"""A model that names its classes keeps them against a --class-names in another order, in every
family (label-mapping audit, session 45): an ONNX file took the option over its own metadata (a fix
then refit the head on swapped labels and reported a perfect repair), and a bare weights file repair
fix wrote ignored the classes it records."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest
from conftest import make_images, make_timm_folder, run_cli

OPTS = ["--image-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


def test_an_onnx_files_own_class_names_win_over_a_permuted_class_names(tmp_path):
    timm = make_timm_folder(tmp_path / "timm")
    data = make_images(tmp_path / "d", n_per_class=4)
    out = tmp_path / "m.onnx"
    code, _, err = run_cli("export", timm, "--data", data, "--out", out, "-q")
    assert code == 0, err
    names = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["class_names"])
    permuted = ",".join([names[1], names[0], *names[2:]])
    for cmd in (["eval", out, "--data", data], ["fix", out, "--data", data, "--out", tmp_path / "r.onnx"]):
        code, _, err = run_cli(*cmd, "--class-names", permuted, "-q")
        assert code == 2 and "names its own" in err and "metadata class_names" in err, err
        assert err.count("\n") == 1
    assert not (tmp_path / "r.onnx").exists()
    code, _, err = run_cli("eval", out, "--data", data, "--class-names", ",".join(names), "-q")   # the same: fine
    assert code == 0, err


def test_a_bare_file_repair_fix_wrote_reads_its_recorded_classes(tmp_path):
    folder = make_timm_folder(tmp_path / "timm")
    data = make_images(tmp_path / "d", n_per_class=6)
    test = make_images(tmp_path / "t", n_per_class=3, seed=1)
    bare = tmp_path / "m.safetensors"
    shutil.copy(folder / "model.safetensors", bare)
    args = ["--arch", "test_resnet", *OPTS]
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli("fix", bare, *args, "--class-names", "cat,dog,fox", "--data", data, "--out", out, "-q")
    assert code == 0, err
    code, _, err = run_cli("eval", out, *args, "--class-names", "dog,cat,fox", "--data", test, "-q")
    assert code == 2 and "names its own" in err and "repair.settings classes" in err, err
    code, stdout, err = run_cli("eval", out, *args, "--data", test, "--json", "-q")      # no names needed again
    assert code == 0, err
    assert [c["name"] for c in json.loads(stdout)["per_class"]] == ["cat", "dog", "fox"]


def test_names_a_file_cannot_give_may_be_given_and_placeholders_replaced(tmp_path):
    """Review: an ONNX file whose metadata names are not a JSON list of its classes loaded with
    --class-names before, and must still; a timm folder whose label_names are the indices takes the
    user's names, as the other families do."""
    from conftest import make_deployed_onnx

    from repair.adapters import LoadOptions, load_model

    opts = dict(image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    for bad in ('{"0": "cat", "1": "dog", "2": "fox"}', "cat,dog,fox", '["a", "b", "c", "d"]'):
        (tmp_path / f"o{len(bad)}").mkdir()
        src, _ = make_deployed_onnx(tmp_path / f"o{len(bad)}" / "m.onnx")
        m = onnx.load(str(src))
        m.metadata_props.add(key="class_names", value=bad)
        onnx.save(m, str(src))
        a = load_model(src, LoadOptions(class_names=["cat", "dog", "fox"], **opts))
        assert a.class_names == ["cat", "dog", "fox"]
    folder = make_timm_folder(tmp_path / "timm")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["label_names"] = ["0", "1", "2"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_model(folder, LoadOptions(class_names=["fox", "cat", "dog"])).class_names == ["fox", "cat", "dog"]


def test_recorded_names_are_checked_as_every_name_is(tmp_path, monkeypatch):
    """Review: a factory file's recorded classes were shown as they were (a line break printed a forged
    line of its own)."""
    from conftest import factory_weights
    from safetensors.torch import load_file, save_file

    from repair.adapters import LoadOptions, load_model
    from repair.errors import BadInput

    src = ("import torch\nfrom torch import nn\n"
           "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.ReLU(), nn.Linear(4, 3))\n")
    w = factory_weights(tmp_path, "fac45", src, monkeypatch)
    tensors = load_file(str(w))
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata={"repair.settings": json.dumps(
        {"classes": ["cat\ngate passed: worst-group 99%", "dog", "fox"]})})
    with pytest.raises(BadInput) as e:
        load_model(forged, LoadOptions(factory="fac45:build", image_size=8, mean=[0.5] * 3, std=[0.5] * 3))
    assert "\n" not in str(e.value) and "repair.settings classes" in str(e.value), str(e.value)
