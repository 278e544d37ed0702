"""Session 51's coverage audit of the trust branches: refusals, guards and cleanups that no test ran
(in this process or through a subprocess), each driven as a user meets it: ``repair ...`` in this process
(exit 2, one ``error:`` line naming the file, nothing written, inputs unchanged) or the library call."""
from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch

from conftest import make_deployed_onnx, make_images, one_line_naming, run_cli


def _tree(root):
    """Every file under ``root`` (or ``root`` itself) with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ weights files (repair/io.py)
def test_a_safetensors_file_with_no_tensors_is_one_line(tmp_path, image_data):
    """io.py: ``safetensors file holds no tensors`` (a valid, empty safetensors file)."""
    w = tmp_path / "empty.safetensors"
    w.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    code, out, err = run_cli("eval", w, "--arch", "test_resnet", "--data", image_data)
    one_line_naming(code, err, w, "holds no tensors")
    assert out == "" and w.read_bytes() == b"\x02\x00\x00\x00\x00\x00\x00\x00{}"


@pytest.mark.parametrize("what, says", [("garbage", "not a loadable weights-only pickle"),
                                        ("a list", "does not hold a state dict of tensors")])
def test_a_pickle_that_is_no_state_dict_is_one_line_with_allow_pickle(tmp_path, image_data, what, says):
    """io.py load_state_dict_file: a .pt that ``torch.load(weights_only=True)`` refuses, and one that
    loads but holds no state dict of tensors: exit 2 naming the file, never a traceback."""
    w = tmp_path / "w.pt"
    if what == "garbage":
        w.write_bytes(b"garbage" * 10)
    else:
        torch.save([torch.zeros(1)], w)
    before = w.read_bytes()
    code, out, err = run_cli("eval", w, "--arch", "test_resnet", "--data", image_data, "--allow-pickle")
    one_line_naming(code, err, w, says)
    assert "Traceback" not in err and out == "" and w.read_bytes() == before


def test_a_training_checkpoint_pickle_is_read_by_its_state_dict_entry(tmp_path, timm_folder, image_data):
    """io.py pickled_state_dict: ``{"state_dict": ..., "epoch": ...}`` (a training checkpoint) reads as
    its state dict: the same predictions as the safetensors weights."""
    from safetensors.torch import load_file

    sd = load_file(str(timm_folder / "model.safetensors"))
    w = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "epoch": 3}, w)
    code, out, err = run_cli("eval", w, "--arch", "test_resnet", "--class-names", "cat,dog,fox", "--allow-pickle",
                             "--data", image_data, "--json", "-q")
    assert code == 0, err
    code2, out2, err2 = run_cli("eval", timm_folder, "--data", image_data, "--json", "-q")
    assert code2 == 0, err2
    assert json.loads(out)["accuracy"] == json.loads(out2)["accuracy"]


def test_a_model_folder_whose_weights_file_is_a_folder_is_one_line(tmp_path, timm_folder, image_data):
    """io.py load_safetensors: ``model.safetensors`` that is a folder, named as such."""
    m = tmp_path / "m"
    shutil.copytree(timm_folder, m)
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").mkdir()
    code, _, err = run_cli("eval", m, "--data", image_data)
    one_line_naming(code, err, m / "model.safetensors", "got a folder")


# ------------------------------------------------------------------ stale temporaries (repair/io.py _stale)
def test_temp_folders_are_stale_by_their_lock_files_owner(tmp_path):
    """io.py _stale / _pid_alive: a folder of ours whose lock file says ``flock`` and whose lock nobody
    holds (its run was killed: the lock went with it) is removed; one whose lock file says ``nolock``
    (a file system without locks) is removed when its pid on this host is gone, kept while that process
    lives, and kept when another host wrote it (recently): that run may be in progress there."""
    from repair.io import LOCK_NAME, clean_stale_temps

    host = socket.gethostname()
    dead = 2 ** 22 + 12345                     # above any pid_max default: no such process
    assert not os.path.exists(f"/proc/{dead}") or pytest.skip("that pid exists here")
    owners = {"aaaaaaaa": f"{dead} {host} flock\n", "bbbbbbbb": f"{dead} {host} nolock\n",
              "cccccccc": f"{os.getpid()} {host} nolock\n", "dddddddd": f"{dead} not-{host} nolock\n"}
    for name, owner in owners.items():
        p = tmp_path / f".out.txt.{name}.tmp"
        p.mkdir()
        (p / LOCK_NAME).write_text(owner)
        (p / "part").write_text("half written")
    (tmp_path / "out.txt.aaaaaaaa.tmp").mkdir()          # not named like ours (no leading dot): never touched
    said = []
    removed = clean_stale_temps(tmp_path / "out.txt", said.append)
    assert sorted(p.name for p in removed) == [".out.txt.aaaaaaaa.tmp", ".out.txt.bbbbbbbb.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.txt.cccccccc.tmp", ".out.txt.dddddddd.tmp",
                                                          "out.txt.aaaaaaaa.tmp"]
    assert len(said) == 2 and all(s.startswith("notice: removed ") and "interrupted run" in s for s in said)


def test_an_output_appearing_between_the_check_and_the_rename_is_never_replaced(tmp_path, monkeypatch):
    """io.py put_in_place: the rename that never replaces (renameat2 RENAME_NOREPLACE) meets a file that
    appeared after the last check: exit 2's BadInput naming it, what appeared intact, no temporary left."""
    from repair import io
    from repair.errors import BadInput

    final = tmp_path / "out.json"
    real = io.check_place

    def checked_then_appears(path, **kw):
        r = real(path, **kw)
        if os.path.abspath(path) == os.path.abspath(final):
            final.write_text("theirs")
        return r

    monkeypatch.setattr(io, "check_place", checked_then_appears)
    with pytest.raises(BadInput, match="appeared while this run worked") as e:
        with io.atomic_output(final) as staged:
            staged.write_text("mine")
    assert e.value.path == str(final) and final.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# ------------------------------------------------------------------ devices (repair/embeddings.py)
def test_mps_on_a_machine_without_it_is_one_line(timm_folder, image_data):
    """embeddings.py check_device: ``--device mps`` without MPS: exit 2 before any work, one line."""
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    code, out, err = run_cli("eval", timm_folder, "--data", image_data, "--device", "mps")
    assert code == 2 and out == "", err
    assert err.strip() == "error: --device mps: MPS is not available here (use cpu or auto)", err


def test_the_library_export_and_verify_refuse_a_device_repair_does_not_run_on(tmp_path, timm_folder, image_data):
    """embeddings.py check_device, through ``repair.export_model`` / ``repair.verify_model`` (the CLI and
    ``Runtime`` refuse the name before): a device torch parses but repair does not run on (``meta``) is
    BadInput before any work, nothing written."""
    import repair
    from repair.errors import BadInput

    says = "--device must be auto, cpu, cuda or cuda:N, got 'meta'"
    with pytest.raises(BadInput, match=says):
        repair.export_model(timm_folder, tmp_path / "o.onnx", data=image_data, device="meta")
    (tmp_path / "m.onnx").write_bytes(b"not read")
    with pytest.raises(BadInput, match=says):
        repair.verify_model(tmp_path / "m.onnx", timm_folder, image_data, device="meta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ------------------------------------------------------------------ export (repair/outputs.py, repair/export.py)
def test_an_onnx_model_exported_to_safetensors_is_one_line(tmp_path):
    """outputs.py export_model: ``--format safetensors`` of an ONNX model (it has no torch weights):
    exit 2 naming the model, nothing written."""
    onnx_path, _ = make_deployed_onnx(tmp_path / "m.onnx")
    before = onnx_path.read_bytes()
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli("export", onnx_path, "--format", "safetensors", "--out", out)
    one_line_naming(code, err, onnx_path, "can only be exported to ONNX")
    assert not out.exists() and onnx_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_safetensors_refuses_an_onnx_model_and_a_bare_file_named_otherwise(tmp_path, timm_folder):
    """export.py export_safetensors (public in ``repair.export``; ``repair export`` refuses both before it,
    in outputs.py / rules.py): an ONNX model (no torch weights to write) and a bare weights file to a name
    not ending in .safetensors are BadInput naming the file, nothing written. The CLI says the same."""
    from repair.adapters import LoadOptions, load_model
    from repair.errors import BadInput
    from repair.export import export_safetensors

    w = shutil.copy(timm_folder / "model.safetensors", tmp_path / "w.safetensors")
    onnx_path, _ = make_deployed_onnx(tmp_path / "m.onnx")
    out = tmp_path / "x.bin"
    with pytest.raises(BadInput, match="must end in .safetensors") as e:
        export_safetensors(load_model(w, LoadOptions(arch="test_resnet")), out, {})
    assert e.value.path == str(out)
    with pytest.raises(BadInput, match="can only be exported to ONNX") as e:
        export_safetensors(load_model(onnx_path), tmp_path / "o.safetensors", {})
    assert e.value.path == str(onnx_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "w.safetensors"]
    code, _, err = run_cli("export", w, "--arch", "test_resnet", "--format", "safetensors", "--out", out)
    one_line_naming(code, err, out, "must end in .safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "w.safetensors"]


def test_the_library_export_of_a_missing_model_names_it(tmp_path, image_data):
    """outputs.py export_model: ``repair.export_model(path)`` of a path that is not there."""
    import repair
    from repair.errors import BadInput

    with pytest.raises(BadInput, match="model not found") as e:
        repair.export_model(tmp_path / "nope", tmp_path / "o.onnx", data=image_data)
    assert e.value.path == str(tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []


def test_export_and_verify_say_what_the_data_left_unread(tmp_path, timm_folder):
    """outputs.py export_model / verify_model: a file in a class folder that is not read as an image is a
    ``warning:`` line of ``repair export`` and ``repair verify`` (as of ``repair eval``), under -q too."""
    data = make_images(tmp_path / "d", n_per_class=2, with_metadata=False)
    (data / "cat" / "notes.txt").write_text("not an image")
    onnx_path = tmp_path / "m.onnx"
    for args in (("export", timm_folder, "--data", data, "--out", onnx_path, "-q"),
                 ("verify", onnx_path, "--reference", timm_folder, "--data", data, "-q")):
        code, _, err = run_cli(*args)
        assert code == 0, err
        warned = [ln for ln in err.splitlines() if ln.startswith("warning: ") and "not read as images" in ln]
        assert len(warned) == 1 and str(data) in warned[0] and "cat/notes.txt" in warned[0], err


# ------------------------------------------------------------------ the repair set (repair/api.py)
def test_a_model_repaired_before_the_samples_digest_still_refuses_its_repair_set(tmp_path, timm_folder, image_data):
    """api.py repair_set_rows, the oldest provenance (neither ``repair.samples`` nor ``samples_sha256``:
    the data's row-for-row ``content_sha256`` only): ``repair eval`` on the very repair set is exit 2, one
    line naming it; other data is measured."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    rep = tmp_path / "rep"
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--group-by", "place",
                           "--out", rep, "-q")
    assert code == 0, err
    f = rep / "model.safetensors"
    with safe_open(str(f), "pt") as sf:
        meta, tensors = dict(sf.metadata()), {k: sf.get_tensor(k) for k in sf.keys()}
    settings = json.loads(meta["repair.settings"])
    assert settings["data"]["content_sha256"] and settings["data"]["n"] == 18
    del settings["data"]["samples_sha256"]
    meta["repair.settings"] = json.dumps(settings)
    del meta["repair.samples"]
    save_file(tensors, str(f), metadata=meta)
    before = _tree(image_data)
    for extra in ((), ("--group-by", "place")):
        code, out, err = run_cli("eval", rep, "--data", image_data, *extra, "-q")
        one_line_naming(code, err, image_data, "is the repair set this model was repaired on")
        assert out == ""
    assert _tree(image_data) == before
    other = make_images(tmp_path / "other", n_per_class=2, seed=7)
    code, _, err = run_cli("eval", rep, "--data", other, "-q")
    assert code == 0, err


# ------------------------------------------------------------------ the command line (cli/app.py)
def test_a_ctrl_c_while_a_command_is_being_built_is_one_line_exit_130(monkeypatch, tmp_path, timm_folder, image_data):
    """app.py OneLineUsageErrors._main: a real Ctrl-C while a lazy command is imported (torch's import takes
    seconds), before its own wrapper runs: typer's main answers 130 (its ``except KeyboardInterrupt`` arm
    is not reached this way), and the app says one line, exit 130, nothing written."""
    import repair_cli.main  # noqa: F401  (registers the lazy commands: the patch below then stays)
    from repair_cli import app as A

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setitem(A.LAZY_COMMANDS, "fix", interrupted)
    out = tmp_path / "o"
    code, stdout, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", out)
    assert code == 130 and stdout == "", err
    assert err.strip() == "interrupted; nothing partial was left behind", err
    assert not out.exists() and list(tmp_path.iterdir()) == []
