"""What repair reads back from disk is read whole or refused: recorded settings, model_args, a factory
output's preprocessing, a tokenizer's length, a zoo journal of other code; outputs that cannot be written
or that would follow a link are refused before work."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import make_bert_folder, make_images
from repair.errors import BadInput

IMAGE = {"input_size": [3, 40, 40], "interpolation": "bilinear", "mean": [0.4] * 3, "std": [0.3] * 3,
         "crop_pct": 1.0, "crop_mode": "center"}


@pytest.mark.parametrize("raw, why", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "is not a JSON object"),
    (json.dumps({"preprocess": [1]}), "preprocess is not an object"),
    (json.dumps({"data": [1]}), "data is not an object"),
    (json.dumps({"preprocess": {"image": "64"}}), "preprocess.image is not an object"),
    (json.dumps({"preprocess": {"image": {"mean": [0.5] * 3}}}), "preprocess.image has no input_size, std"),
    (json.dumps({"preprocess": {"image": {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}}}), "has no input_size"),
    (json.dumps({"preprocess": {"max_length": "8"}}), "preprocess.max_length is not a whole number"),
    (json.dumps({"classes": [1, 2, 3]}), "classes is not a list of names"),
])
def test_a_settings_record_changed_by_hand_is_refused_naming_the_file_not_read_in_part(raw, why):
    from repair import provenance

    with pytest.raises(BadInput, match=why) as e:
        provenance.recorded_settings({"repair.settings": raw}, Path("m.safetensors"))
    assert str(e.value.path) == "m.safetensors"
    assert provenance.recorded_settings({}, "m") == {}
    ok = {"preprocess": {"image": IMAGE, "max_length": None}, "data": {}, "classes": ["a", "b"]}
    assert provenance.recorded_settings({"repair.settings": json.dumps(ok)}) == ok
    with pytest.raises(BadInput, match="names 2 classes, the head has 3"):
        provenance.recorded_classes({"repair.settings": json.dumps(ok)}, "m", 3)


def _bare(tmp_path: Path, metadata: dict, **kw) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = timm.create_model("test_resnet", pretrained=False, num_classes=3, **kw)
    bare = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(bare), metadata=metadata)
    return bare


def test_a_bare_file_is_built_with_the_model_args_it_records(tmp_path):
    import repair
    from repair.adapters import LoadOptions

    bare = _bare(tmp_path, {"repair.model_args": json.dumps({"global_pool": "max"}),
                            "repair.settings": json.dumps({"preprocess": {"image": IMAGE}, "classes": ["a", "b", "c"]})},
                 global_pool="max")
    a = repair.load_model(bare, LoadOptions(arch="test_resnet"))
    assert a.build["model_args"] == {"global_pool": "max"}
    x = torch.rand(2, 3, 40, 40)
    import timm
    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=3, global_pool="max").eval()
    from safetensors.torch import load_file
    ref.load_state_dict(load_file(str(bare)))
    with torch.no_grad():
        assert torch.allclose(a.model.eval()(x), ref(x))
    # the next output records it again; options given win key by key
    assert json.loads(a.save_metadata_defaults["repair.model_args"]) == {"global_pool": "max"}
    b = repair.load_model(bare, LoadOptions(arch="test_resnet", model_args={"global_pool": "avg"}))
    assert b.build["model_args"] == {"global_pool": "avg"}
    bad = _bare(tmp_path, {"repair.model_args": "{nope"})
    with pytest.raises(BadInput, match="repair.model_args .* is not a JSON object") as e:
        repair.load_model(bad, LoadOptions(arch="test_resnet"))
    assert str(e.value.path) == str(bad)


FACTORY = """
import torch.nn as nn
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
"""


def test_a_factory_output_is_read_with_the_preprocessing_it_records(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import repair
    from conftest import factory_weights
    from repair.adapters import LoadOptions

    w = factory_weights(tmp_path, "fac_s49", FACTORY, monkeypatch)
    (tmp_path / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3,
                                                          "std": [0.5] * 3}))
    out = tmp_path / "w-repaired.safetensors"
    save_file(load_file(str(w)), str(out), metadata={"repair.settings": json.dumps(
        {"preprocess": {"image": {**IMAGE, "input_size": [3, 48, 48]}}})})
    a = repair.load_model(out, LoadOptions(factory="fac_s49:build"))
    assert tuple(a.data_config["input_size"]) == (3, 48, 48)     # the record, over the file beside it
    b = repair.load_model(out, LoadOptions(factory="fac_s49:build", image_size=56))
    assert tuple(b.data_config["input_size"]) == (3, 56, 56)     # the options over both
    assert list(b.data_config["mean"]) == pytest.approx([0.4] * 3)
    c = repair.load_model(w, LoadOptions(factory="fac_s49:build"))
    assert tuple(c.data_config["input_size"]) == (3, 32, 32)     # no record: the file beside it


@pytest.mark.parametrize("value", ['"abc"', "0", "-1", "true", "8.5", "[8]"])
def test_a_tokenizer_length_that_is_no_length_is_refused_naming_its_file(tmp_path, value):
    import re

    import repair

    folder = make_bert_folder(tmp_path / "bert")
    cfg = folder / "tokenizer_config.json"
    text = cfg.read_text()
    text = (re.sub(r'"model_max_length": *[^,}\n]*', f'"model_max_length": {value}', text)
            if "model_max_length" in text else text.replace("{", f'{{"model_max_length": {value},', 1))
    cfg.write_text(text)
    with pytest.raises(BadInput, match="model_max_length .* is not a whole number of tokens") as e:
        repair.load_model(folder)
    assert str(e.value.path) == str(cfg)


def test_a_tokenizer_without_a_limit_reads_at_the_default_length(tmp_path):
    import repair
    from repair.adapters.text import DEFAULT_MAX_LENGTH

    folder = make_bert_folder(tmp_path / "bert")
    cfg = folder / "tokenizer_config.json"
    doc = json.loads(cfg.read_text())
    doc["model_max_length"] = None
    cfg.write_text(json.dumps(doc))
    a = repair.load_model(folder)
    assert 1 <= a.max_length <= DEFAULT_MAX_LENGTH


def test_a_zoo_line_journaled_by_other_code_is_redone():
    from repair import zoo

    fp = zoo._code_fingerprint()
    assert isinstance(fp, str) and len(fp) == 20
    now = {"checkpoint": "c", "code": fp}
    assert zoo.inputs_changed({"checkpoint": "c", "code": fp}, now) is None
    assert zoo.inputs_changed({"checkpoint": "c", "code": "other"}, now) == "its code changed since it was journaled"
    assert "code" in zoo.inputs_changed({"checkpoint": "c"}, now)


def test_the_zoo_lock_never_follows_a_link_nor_waits_on_a_fifo(tmp_path):
    from repair import zoo

    target = tmp_path / "notes.txt"
    target.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / zoo.LOCK_NAME).symlink_to(target)
    with pytest.raises(BadInput, match="lock file \\(a symbolic link\\)"):
        zoo._hold_lock(out)
    assert target.read_text() == "precious"
    (out / zoo.LOCK_NAME).unlink()
    os.mkfifo(out / zoo.LOCK_NAME)
    with pytest.raises(BadInput, match="lock file"):
        zoo._hold_lock(out)
    (out / zoo.LOCK_NAME).unlink()
    (out / zoo.LOCK_NAME).mkdir()
    with pytest.raises(BadInput, match="lock file"):
        zoo._hold_lock(out)
    (out / zoo.LOCK_NAME).rmdir()
    fd = zoo._hold_lock(out)
    os.close(fd)
    assert (out / zoo.LOCK_NAME).read_text().startswith("pid ")


def test_a_path_through_a_loop_of_links_is_bad_input(tmp_path):
    from repair.rules import check_outputs_distinct

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(BadInput, match="loop of symbolic links") as e:
        check_outputs_distinct({"--out": tmp_path / "loop" / "x", "--report": tmp_path / "r.html"})
    assert "loop" in str(e.value.path)


def test_an_output_name_its_scratch_folder_cannot_have_is_refused_before_work(tmp_path):
    from repair.io import check_output

    name = "a" * 241                       # fits the file system; ".NAME.work-XXXXXXXX" does not
    with pytest.raises(BadInput, match="File name too long"):
        check_output(tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    check_output(tmp_path / ("a" * 240))


def test_a_folder_copy_leaves_out_another_output_repair_wrote_into_it(tmp_path):
    from repair.adapters.base import folder_copy_plan
    from repair.io import OUTPUT_RECORD

    src = tmp_path / "model"
    (src / "m-repaired-artifacts" / "images").mkdir(parents=True)
    (src / "m-repaired-artifacts" / OUTPUT_RECORD).write_text("{}")
    (src / "m-repaired-artifacts" / "images" / "0.png").write_bytes(b"x")
    (src / "notes").mkdir()
    (src / "notes" / "a.txt").write_text("kept")
    (src / "config.json").write_text("{}")
    plan = {p.relative_to(src).as_posix() for p in folder_copy_plan(src)}
    assert plan == {"config.json", "notes", "notes/a.txt"}


def test_groups_are_told_by_their_keys_not_by_parsing_their_names(tmp_path):
    from repair.data import encode, load_data
    from repair.pipeline import check_repair_set

    rows = "text,label,g\n" + "".join(f"t{i} {c} {a},{c},{a}\n" for i in range(3) for c in ("x|y", "z") for a in "ab")
    (tmp_path / "d.csv").write_text(rows)
    data = load_data(tmp_path / "d.csv")
    enc = encode(data, ["x|y", "z"], "g")
    assert enc.group_keys == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    check_repair_set(enc, 2, tmp_path / "d.csv")          # complete: no group is missing
    (tmp_path / "e.csv").write_text(rows.replace("x|y,b", "z,b"))
    with pytest.raises(BadInput, match=r"group x\|y\|g=b has no samples"):
        check_repair_set(encode(load_data(tmp_path / "e.csv"), ["x|y", "z"], "g"), 2, tmp_path / "e.csv")


def test_classes_that_read_alike_are_named_apart_and_never_matched_silently(tmp_path):
    import unicodedata

    from repair.data import encode, figure_class_names, label_indices, load_data

    assert figure_class_names(["crane", "crane", "z"]) == ["crane#0", "crane#1", "z"]
    assert figure_class_names(["sp", " sp ", "1", "1.0"]) == ["sp#0", " sp #1", "1#2", "1.0#3"]
    with pytest.raises(BadInput, match="may name any of 2 classes of the model \\('1' and '1.0'"):
        label_indices(["1.0"], ["1", "1.0", "z"])
    # a repeated name, labels by index: every group its own name
    rows = "text,label,g\n" + "".join(f"t{i}{c}{a},{c},{a}\n" for i in range(2) for c in (0, 1, 2) for a in "ab")
    (tmp_path / "d.csv").write_text(rows)
    enc = encode(load_data(tmp_path / "d.csv"), ["a", "a", "z"], "g")
    assert len(set(enc.group_names)) == 6 and "a#1|g=b" in enc.group_names
    # a value in either Unicode form is one group, as a label in either form is one class
    nfc, nfd = (unicodedata.normalize(f, "café") for f in ("NFC", "NFD"))
    (tmp_path / "u.csv").write_text("text,label,g\n" + "".join(f"t{i},{c},{v}\n" for i, (c, v) in
                                                               enumerate([(0, nfc), (0, nfd), (1, nfc), (1, nfd)])))
    enc = encode(load_data(tmp_path / "u.csv"), ["a", "b"], "g")
    assert enc.group_names == [f"a|g={nfc}", f"b|g={nfc}"]


def test_expected_groups_say_why_a_class_is_not_one():
    from repair.rules import expected_group_names, parse_expected_groups

    fig = {"per_class": [{"name": "Cat"}, {"name": "cat"}, {"name": "dog"}]}
    with pytest.raises(BadInput, match="--expect-groups: 'CAT' names 2 classes of the model"):
        expected_group_names(fig, "place", ["CAT|land"], "--expect-groups")
    with pytest.raises(BadInput, match="'bird' is not a class of the model"):
        expected_group_names(fig, "place", ["bird|land"], "--expect-groups")
    with pytest.raises(BadInput, match="a class or value with a comma in it .* YAML manifest"):
        parse_expected_groups("a|p,q")


def test_a_samples_record_without_its_settings_fails_closed():
    from types import SimpleNamespace

    from repair.api import recorded_repair_rows

    adapter = SimpleNamespace(source_metadata={"repair.samples": json.dumps({"scheme": "x", "keys": []})},
                              source=Path("m.safetensors"))
    with pytest.raises(BadInput, match="records the samples of its repair set but not the settings") as e:
        recorded_repair_rows(adapter, data=None)
    assert str(e.value.path) == "m.safetensors"
    assert recorded_repair_rows(SimpleNamespace(source_metadata={}, source=None), data=None) is None


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """A timm folder repaired by `repair fix` (dfr), with the image set it was repaired on."""
    import repair
    from conftest import make_timm_folder

    root = tmp_path_factory.mktemp("rep49")
    make_timm_folder(root / "m")
    make_images(root / "val", n_per_class=6)
    repair.fix(root / "m", root / "val", root / "out", recipe="dfr", group_by="place")
    return root


def _with_settings(src: Path, dst: Path, change) -> Path:
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    save_file(tensors, str(dst / "model.safetensors"), metadata=meta)
    return dst


def test_eval_on_the_repair_set_is_refused_whatever_the_settings_record_holds(repaired, tmp_path):
    import repair

    with pytest.raises(BadInput, match="repair set this model was repaired on"):
        repair.evaluate(repaired / "out", repaired / "val", group_by="place")
    gone = _with_settings(repaired / "out", tmp_path / "gone", lambda m: m.pop("repair.settings"))
    with pytest.raises(BadInput, match="records the samples of its repair set but not the settings"):
        repair.evaluate(gone, repaired / "val", group_by="place")

    def no_data(m):
        s = json.loads(m["repair.settings"])
        s.pop("data")
        m["repair.settings"] = json.dumps(s)

    nodata = _with_settings(repaired / "out", tmp_path / "nodata", no_data)
    with pytest.raises(BadInput, match="repair set this model was repaired on"):
        repair.evaluate(nodata, repaired / "val", group_by="place")


def test_a_repair_of_a_repaired_model_reads_its_record_by_the_one_checked_reader(repaired, tmp_path):
    import repair

    def bad(m):
        m["repair.settings"] = "{bad"
        m.pop("repair.samples", None)

    src = _with_settings(repaired / "out", tmp_path / "bad", bad)
    other = make_images(tmp_path / "other", n_per_class=6, seed=5)
    with pytest.raises(BadInput, match="repair.settings .* is not JSON") as e:
        repair.fix(src, other, tmp_path / "o2", recipe="dfr", group_by="place")
    assert not (tmp_path / "o2").exists()


def test_every_zoo_row_is_fingerprinted_with_the_code_and_a_refused_run_leaves_no_lock(repaired, tmp_path):
    import yaml

    from conftest import run_cli
    from repair import zoo

    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "group_by": "place"},
                                    "models": [{"name": "a", "checkpoint": str(repaired / "m"),
                                                "data": str(repaired / "val")}]}, sort_keys=False))
    manifest = zoo.load_manifest(path, "eval")
    fp = zoo.input_fingerprints(manifest, manifest.entries[0], "eval")
    assert fp["code"] == zoo._code_fingerprint()
    out = tmp_path / "r"
    out.mkdir()
    (out / "zoo-report.html").write_text("<html>mine</html>")       # not this zoo's: refused before work
    code, _, err = run_cli("zoo", path, "--mode", "eval", "--out-dir", out)
    assert code == 2, err
    assert sorted(p.name for p in out.iterdir()) == ["zoo-report.html"]


def test_a_gate_names_classes_that_read_alike_as_a_label_would():
    from repair.data import checkpoint_class_names, figure_class_names
    from repair.rules import expected_group_names

    for raw in (["crane", "crane", "fox"], ["1", "1.0", "z"], ["x#0", "y#1"], ["crane", "crane", "crane#1"]):
        assert checkpoint_class_names(figure_class_names(raw)) == raw
    assert len(set(figure_class_names(["crane", "crane", "crane#1"]))) == 3
    fig = {"per_class": [{"name": n} for n in figure_class_names(["crane", "crane", "fox"])]}
    with pytest.raises(BadInput, match="'crane' names 2 classes of the model \\(0, 1\\); give the class index"):
        expected_group_names(fig, "place", ["crane|land"], "--expect-groups")
    assert expected_group_names(fig, "place", ["crane#1|land", "1|water", "fox|land"], "--expect-groups") == [
        "crane#1|place=land", "crane#1|place=water", "fox|place=land"]
