"""Trust in model folders: what a run reads from a model folder and what it copies out of one.

- A symlink leaving the model folder -- the weights or the config, not only a side file -- is exit 2
  naming it whenever the folder is loaded (``eval`` included), and nothing is written: its target
  (another model, a secret) is never read into a run nor copied into an output.
- A folder output of a model repair holds only this run's ``repair-artifacts``: the source's own
  (the record of the run that made it) is not copied into the new output, and the new run's are
  never nested inside it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from conftest import make_images, make_timm_folder, run_cli
from repair.errors import BadInput


# ------------------------------------------------------------------ helpers
def snapshot(*roots: Path) -> dict:
    """sha256 of every entry under ``roots`` (symlinks as their target text)."""
    out = {}
    for root in roots:
        root = Path(root)
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir" if p.is_dir() else "other"
    return out


def refused(args, named: Path, *words, inputs=(), out_dir: Path) -> str:
    """``repair ARGS`` is exit 2 with one error line naming ``named`` and holding ``words``; the
    inputs are unchanged and ``out_dir`` holds nothing new."""
    before, before_out = snapshot(*inputs), snapshot(out_dir)
    rc, _, err = run_cli(*map(str, args), "-q")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert str(named) in lines[0], err
    for w in words:
        assert w in lines[0], err
    assert snapshot(*inputs) == before
    assert snapshot(out_dir) == before_out, "something was written"
    return lines[0]


@pytest.fixture(scope="module")
def secret_model(tmp_path_factory) -> Path:
    """Another model, outside every folder the runs are given: never read, never copied."""
    return make_timm_folder(tmp_path_factory.mktemp("elsewhere") / "secret_model", seed=7)


def folder_with_link(m: Path, *, copied: Path, linked: Path) -> Path:
    """A model folder ``m`` holding a copy of ``copied`` and a symlink to ``linked`` (same names)."""
    m.mkdir()
    shutil.copy(copied, m / copied.name)
    (m / linked.name).symlink_to(linked)
    return m / linked.name


# ================================================================== A. symlinks leaving the folder
def test_a_weights_file_symlinked_out_of_the_folder_is_exit_2_for_fix_export_and_eval(
        tmp_path, timm_folder, secret_model, image_data):
    m = tmp_path / "m"
    link = folder_with_link(m, copied=timm_folder / "config.json", linked=secret_model / "model.safetensors")
    inputs = [m, secret_model, image_data]
    refused(["fix", m, "--data", image_data, "--recipe", "dfr"], link, "symlink", "outside",
            inputs=inputs, out_dir=tmp_path)
    refused(["fix", m, "--data", image_data, "--recipe", "dfr", "--out", tmp_path / "fixed"], link, "outside",
            inputs=inputs, out_dir=tmp_path)
    refused(["export", m, "--format", "safetensors"], link, "outside", inputs=inputs, out_dir=tmp_path)
    refused(["export", m, "--data", image_data], link, "outside", inputs=inputs, out_dir=tmp_path)
    refused(["eval", m, "--data", image_data, "--no-cache"], link, "outside", inputs=inputs, out_dir=tmp_path)
    assert not (tmp_path / "m-repaired").exists() and not (tmp_path / "fixed").exists()


def test_a_config_symlinked_out_of_the_folder_is_exit_2_for_eval_fix_and_export(
        tmp_path, secret_model, image_data):
    m = tmp_path / "m2"
    link = folder_with_link(m, copied=secret_model / "model.safetensors", linked=secret_model / "config.json")
    inputs = [m, secret_model, image_data]
    refused(["eval", m, "--data", image_data, "--no-cache"], link, "symlink", "outside",
            inputs=inputs, out_dir=tmp_path)
    refused(["fix", m, "--data", image_data, "--recipe", "dfr"], link, "outside", inputs=inputs, out_dir=tmp_path)
    refused(["export", m, "--format", "safetensors"], link, "outside", inputs=inputs, out_dir=tmp_path)


def test_a_hugging_face_cache_snapshot_is_refused_saying_how_to_copy_it(tmp_path, timm_folder, image_data):
    """A Hub cache snapshot (models--org--name/snapshots/<rev>/) holds links into the cache's blobs/,
    outside the folder given: refused by the folder rule, with the way out a user needs (copy the
    files with ``cp -rL``), not "replace the link" (which would edit their cache); the copy runs."""
    cache = tmp_path / "hub" / "models--org--tiny"
    snap = cache / "snapshots" / "abc123"
    (cache / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(timm_folder.iterdir()):
        blob = cache / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    line = refused(["eval", snap, "--data", image_data, "--no-cache"], snap, "Hugging Face cache snapshot",
                   f"cp -rL {snap.resolve()} DIR", inputs=[cache, image_data], out_dir=tmp_path)
    assert "replace it by the file" not in line
    copy = tmp_path / "copy"
    shutil.copytree(snap, copy, symlinks=False)                # what cp -rL does
    rc, _, err = run_cli("eval", copy, "--data", image_data, "--no-cache", "-q")
    assert rc == 0, err


def test_one_check_for_every_caller_of_a_model_folder(tmp_path, timm_folder, secret_model):
    """Loading the folder and planning its copy (``zoo`` plans before any model runs) refuse the
    same link, naming it; a symlink that stays inside the folder is still read."""
    from repair.adapters import load_model
    from repair.adapters.base import check_model_folder, folder_copy_plan

    m = tmp_path / "m"
    m.mkdir()
    shutil.copy(timm_folder / "config.json", m / "config.json")
    (m / "model.safetensors").symlink_to(secret_model / "model.safetensors")
    for check in (lambda: load_model(m), lambda: check_model_folder(m),
                  lambda: folder_copy_plan(m, m / "model.safetensors")):
        with pytest.raises(BadInput) as e:
            check()
        assert e.value.path.endswith("model.safetensors") and "outside" in e.value.problem
    # a dangling link leading outside is refused as leaving too
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").symlink_to(tmp_path / "gone" / "model.safetensors")
    with pytest.raises(BadInput, match="outside"):
        check_model_folder(m)
    # inside the folder: allowed as before
    (m / "model.safetensors").unlink()
    (m / "store").mkdir()
    shutil.copy(timm_folder / "model.safetensors", m / "store" / "weights.safetensors")
    (m / "model.safetensors").symlink_to(m / "store" / "weights.safetensors")
    a = load_model(m)
    assert a.class_names and (m / "store" / "weights.safetensors").resolve() in a.source_files()


# ================================================================== B. the source's repair artifacts
RECOMPOSE = ["--group-by", "place", "--recipe", "recompose", "--budget", "2steps", "-q"]


def test_a_repaired_folder_repaired_again_holds_only_this_runs_artifacts(tmp_path, timm_folder, image_data):
    from repair.rules import artifacts_output

    out1, out2, out3 = tmp_path / "out1", tmp_path / "out2", tmp_path / "out3"
    rc, _, err = run_cli("fix", str(timm_folder), "--data", str(image_data), *RECOMPOSE, "--out", str(out1))
    assert rc == 0, err
    arts1 = artifacts_output(timm_folder, out1)
    first = {p.name for p in arts1.iterdir()}
    assert arts1.is_dir() and "manifest.json" in first
    before = snapshot(out1)

    # repaired again on other data (on its own repair set the figures would be measured on fitted samples:
    # refused, tests/test_rules.py::test_a_repaired_model_repaired_again_never_measures_on_its_earlier_repair_set)
    other = make_images(tmp_path / "other", n_per_class=6, seed=11)
    rc, _, err = run_cli("fix", str(out1), "--data", str(other), *RECOMPOSE, "--out", str(out2))
    assert rc == 0, err
    arts2 = artifacts_output(out1, out2)
    assert {p.name for p in arts2.iterdir()} == first          # this run's files, nothing nested
    assert not any(p.is_dir() and (p / "manifest.json").exists() for p in arts2.rglob("*")), \
        "another run's artifacts nested inside this run's"
    assert (arts2 / "manifest.json").read_bytes() != (arts1 / "manifest.json").read_bytes()
    assert snapshot(out1) == before

    # a head repair of the repaired folder writes no artifacts: none are carried over either
    rc, _, err = run_cli("fix", str(out1), "--data", str(other), "--recipe", "dfr", "-q", "--out", str(out3))
    assert rc == 0, err
    assert not artifacts_output(out1, out3).exists()
    assert {p.name for p in out3.iterdir()} == {"config.json", "model.safetensors", ".repair-output.json"}
    assert snapshot(out1) == before


def test_artifacts_are_written_to_their_place_even_when_save_left_something_there(tmp_path, timm_folder):
    """``ModelOutputs.write`` moves this run's artifacts to exactly ``artifacts_to``: whatever a model's
    ``save`` put there is replaced, never merged with nor holding the new ones."""
    from repair.adapters import load_model
    from repair.outputs import ModelOutputs
    from repair.rules import artifacts_output

    a = load_model(timm_folder)
    save = a.save

    def save_with_stale_artifacts(out, metadata):
        written = save(out, metadata)
        stale = artifacts_output(timm_folder, out)
        stale.mkdir()
        (stale / "old.txt").write_text("previous run\n")
        return written

    a.save = save_with_stale_artifacts
    new = tmp_path / "new-artifacts"
    new.mkdir()
    (new / "manifest.json").write_text("{}\n")
    final = tmp_path / "out"
    w = ModelOutputs(a, {}, model=final, artifacts=new, artifacts_to=artifacts_output(timm_folder, final)).write()
    arts = artifacts_output(timm_folder, final)
    assert w["artifacts"] == str(arts)
    assert sorted(p.name for p in arts.iterdir()) == ["manifest.json"]


def test_files_read_beside_an_onnx_model_are_held_to_the_folder_rule(tmp_path, image_data, bert_folder):
    """Found by an audit: the files read beside an ONNX file (its preprocess.json; a text model's
    config.json and tokenizer files) were read through symlinks leading out of its folder, where a model
    folder's are refused: another file decided the preprocessing, the tokenization, the class names.
    Now the same rule (`repair.adapters.base.files_beside` -> `check_folder_entry`): exit 2 naming the
    link, nothing written; the same files as regular files load."""
    from conftest import make_deployed_onnx

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "preprocess.json").write_text('{"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], '
                                            '"std": [0.5, 0.5, 0.5]}')
    o = tmp_path / "o"
    o.mkdir()
    onnx_file, _ = make_deployed_onnx(o / "model.onnx")
    (o / "preprocess.json").symlink_to(secret / "preprocess.json")
    refused(["eval", onnx_file, "--data", image_data, "--class-names", "cat,dog,fox", "--no-cache"],
            o / "preprocess.json", "outside", inputs=[o, secret, image_data], out_dir=tmp_path)
    (o / "preprocess.json").unlink()
    shutil.copy(secret / "preprocess.json", o / "preprocess.json")
    rc, _, err = run_cli("eval", onnx_file, "--data", image_data, "--class-names", "cat,dog,fox", "--no-cache", "-q")
    assert rc == 0, err
    # a text model's tokenizer beside its ONNX file
    from conftest import make_texts

    texts = make_texts(tmp_path / "t.csv", n=12)
    t = tmp_path / "t"
    t.mkdir()
    rc, _, err = run_cli("export", bert_folder, "--data", texts, "--format", "onnx", "--out", t / "model.onnx", "-q")
    assert rc == 0, err
    tok = tmp_path / "tok"
    shutil.copytree(bert_folder, tok)
    for f in bert_folder.iterdir():
        if f.name != "model.safetensors":
            (t / f.name).symlink_to(tok / f.name)
    linked = sorted(p for p in t.iterdir() if p.is_symlink())
    line = refused(["eval", t / "model.onnx", "--data", texts, "--no-cache"], t, "outside",
                   inputs=[t, tok, texts], out_dir=tmp_path)
    assert any(str(p) in line for p in linked), line
