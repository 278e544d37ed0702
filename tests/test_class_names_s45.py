"""A model that names its classes keeps them against a --class-names in another order, in every
family (label-mapping audit, session 45): an ONNX file took the option over its own metadata (a fix
then refit the head on swapped labels and reported a perfect repair), and a bare weights file repair
fix wrote ignored the classes it records."""
from __future__ import annotations

import json
import shutil

import onnx
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
