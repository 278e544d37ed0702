"""``repair verify`` reads a file without class names or preprocessing in its metadata as the loader
does, from the files beside it (session 43's export audit): a ``config.json`` whose ``id2label`` orders
the classes otherwise, or a ``preprocess.json`` with another normalisation, passed, while ``repair eval``
of the same file read another classifier."""
from __future__ import annotations

import json

import onnx
import pytest
from conftest import make_images, make_timm_folder, run_cli


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("beside")
    m = make_timm_folder(root / "m")
    d = make_images(root / "d", n_per_class=3)
    code, _, err = run_cli("export", m, "--data", d, "--format", "onnx", "--out", root / "t.onnx", "-q")
    assert code == 0, err
    return {"root": root, "m": m, "d": d, "t": root / "t.onnx"}


def _without(made, name, drop, beside: dict):
    folder = made["root"] / name
    folder.mkdir()
    proto = onnx.load(str(made["t"]))
    props = {p.key: p.value for p in proto.metadata_props}
    del proto.metadata_props[:]
    for k, v in props.items():
        if k not in drop:
            proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(folder / "model.onnx"))
    for fname, doc in beside.items():
        (folder / fname).write_text(json.dumps(doc))
    return folder / "model.onnx", props


def _verify(made, f):
    code, out, err = run_cli("verify", f, "--reference", made["m"], "--data", made["d"], "--json")
    return code, json.loads(out) if out.strip() else {}, err


def test_class_names_beside_the_file_in_another_order_fail(made):
    f, _ = _without(made, "id2label", ("class_names", "label_names"),
                    {"config.json": {"id2label": {"0": "dog", "1": "cat", "2": "bird"}}})
    code, rep, err = _verify(made, f)
    assert code == 1, err
    assert any("config.json id2label" in p for p in rep["problems"])


def test_class_names_beside_the_file_in_its_order_pass(made):
    f, props = _without(made, "id2label_ok", ("class_names", "label_names"), {})
    names = json.loads(props["class_names"])
    (f.parent / "config.json").write_text(json.dumps({"id2label": {str(i): n for i, n in enumerate(names)}}))
    code, rep, err = _verify(made, f)
    assert code == 0, err


def test_preprocessing_beside_the_file_that_differs_fails_and_the_same_passes(made):
    _, props = _without(made, "probe", (), {})
    pp = json.loads(props["preprocess"])
    f, _ = _without(made, "pp_other", ("preprocess",), {"preprocess.json": {**pp, "mean": [0.0] * 3, "std": [1.0] * 3}})
    code, rep, err = _verify(made, f)
    assert code == 1, err
    assert any("preprocess.json" in p for p in rep["problems"])
    f, _ = _without(made, "pp_same", ("preprocess",), {"preprocess.json": pp})
    code, rep, err = _verify(made, f)
    assert code == 0, err


def test_a_side_file_the_loader_refuses_fails_the_verification(made):
    """(the session's review) a preprocess.json linked from outside the folder: the loader refuses the file,
    so its verification does not pass it."""
    import os

    _, props = _without(made, "probe2", (), {})
    outside = made["root"] / "outside_pp.json"
    outside.write_text(props["preprocess"])
    f, _ = _without(made, "pp_link", ("preprocess",), {})
    os.symlink(outside, f.parent / "preprocess.json")
    code, rep, err = _verify(made, f)
    assert code == 1, err
    assert any("would not load" in p for p in rep["problems"])


def test_a_preprocess_json_that_is_a_folder_fails_the_verification_as_the_loader_refuses_it(made):
    from repair.adapters import load_model
    from repair.errors import BadInput

    f, _ = _without(made, "pp_dir", ("preprocess",), {})
    (f.parent / "preprocess.json").mkdir()
    with pytest.raises(BadInput):
        load_model(f)
    code, rep, err = _verify(made, f)
    assert code == 1, err
    assert any("would not load" in p for p in rep["problems"])
