"""Tests that kill mutants a session-50 audit found surviving: the ONNX verification's running worst logit
(non-finite logits, a later batch's worse logit, the reported max |diff|), its near-tie rule, the head check of
an ONNX source model, ``--tolerance 0``, ``verify --max-verify``, the undo of a forced replacement when a later
output of the set fails, what a recorded output folder may hold (a link; a record that is a link), a live
staging folder beside an output, an output reached through a link to the input's folder, an export over a file
of the input's checkpoint folder, and the CLI's exit 2 for a permission / read-only / full-stdout failure."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_deployed_onnx, make_images, one_line_naming, run_cli
from repair.adapters import LoadOptions, load_model
from repair.data import load_data
from repair.errors import BadInput, GateFailed
from repair.export import DEFAULT_BOUND, _Worst, export_onnx, run_verification, verify_onnx

CPU = torch.device("cpu")
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, bytes]:
    """Every entry under ``root``: a file's bytes, a link's target, a folder's mark."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = (b"->" + os.readlink(p).encode()) if p.is_symlink() else (b"<dir>" if p.is_dir() else p.read_bytes())
    return out


# ------------------------------------------------------------------ fixtures
from test_export import items  # noqa: E402,F401  (the fixture: the tiny image set's items)


@pytest.fixture(scope="module")
def plain_export(timm_folder, items, tmp_path_factory):
    """The tiny timm model as loaded, exported (TorchScript exporter: the faster) and verified on 4 images."""
    a = load_model(timm_folder)
    out = tmp_path_factory.mktemp("plain") / "plain.onnx"
    export_onnx(a, out, metadata={}, verify_items=items[:4], exporter="torchscript")
    return a, out


@pytest.fixture(scope="module")
def two_batches(plain_export, tmp_path_factory):
    """42 images (verified as a batch of 32 and one of 10) and the reference's logits on them."""
    a, _ = plain_export
    many = load_data(make_images(tmp_path_factory.mktemp("many") / "imgs", n_per_class=14, seed=5)).items
    with torch.no_grad():
        logits = a.logits_batch(a.collate(many), CPU).float()
    return many, logits


# ------------------------------------------------------------------ the running worst logit (_Worst)
def test_non_finite_logits_fail_even_in_the_top_class(timm_folder, items, tmp_path):
    """Mutant 1 (``ok`` without ``finite``): an +inf logit in the class the reference predicts anyway leaves
    the ratio and the argmax as they were; only ``finite`` fails it."""
    ref = torch.tensor([[3.0, 1.0]])
    w = _Worst()
    w.add(ref, torch.tensor([[float("inf"), 1.0]]), DEFAULT_BOUND.allowed(ref), [0])
    assert w.finite is False and w.ok is False

    # end to end: a file whose head bias of the class every verified image is predicted as is +inf
    a = load_model(timm_folder)
    with torch.no_grad():
        pred = a.logits_batch(a.collate(items), CPU).argmax(1)
    k = int(pred.mode().values)
    chosen = [it for it, p in zip(items, pred.tolist()) if p == k]
    assert chosen

    def inf_bias(proto):
        from onnx import numpy_helper

        from repair.adapters.onnx_graph import find_head

        name = find_head(proto).bias_name
        t = next(t for t in proto.graph.initializer if t.name == name)
        arr = numpy_helper.to_array(t).copy()
        arr.reshape(-1)[k] = np.inf
        t.CopyFrom(numpy_helper.from_array(arr, t.name))

    out = tmp_path / "inf.onnx"
    with pytest.raises(GateFailed, match="non-finite") as ei:
        export_onnx(a, out, metadata={}, verify_items=chosen, exporter="torchscript", _tamper=inf_bias)
    assert ei.value.report["passed"] is False and ei.value.report["argmax_disagreements"] == 0
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_worse_logit_in_a_later_batch_decides(plain_export, two_batches):
    """Mutant 2 (only the first batch sets the worst logit): a reference logit off by 1.0 in the second
    verification batch (sample 39; not its top class, so the argmax agrees) fails the file, and the report
    names that logit."""
    a, out = plain_export
    many, logits = two_batches
    ref = logits.clone()
    c = int(ref[39].argmin())
    ref[39, c] -= 1.0
    rep = run_verification(out, a, many, reference_logits=ref)
    assert rep["batch_sizes"] == [10, 32] and rep["argmax_disagreements"] == 0
    assert rep["passed"] is False and "exceeds the bound" in rep["problems"][0], rep["problems"]
    assert rep["bound"]["worst"]["sample"] == 39 and rep["bound"]["worst"]["class"] == c
    assert rep["bound"]["ratio"] > 1


def test_the_reported_max_diff_is_over_every_batch(plain_export, two_batches):
    """Mutant 3 (max |diff| of the last batch only): a difference of half the bound on sample 0 (first batch)
    is the reported max |diff| while the file passes."""
    a, out = plain_export
    many, logits = two_batches
    bias = a.head_params()[1].float()
    ref = logits.clone()
    c = int(ref[0].argmin())
    bump = 0.5 * float(DEFAULT_BOUND.allowed(ref[:1], bias)[0, c])
    ref[0, c] += bump
    rep = run_verification(out, a, many, reference_logits=ref)
    assert rep["passed"] is True, rep["problems"]
    assert rep["max_abs_diff"] >= 0.9 * bump and rep["bound"]["worst"]["sample"] == 0


def test_swapped_classes_behind_large_logits_are_not_near_ties(timm_folder, items, tmp_path):
    """Mutants 4 and 5 (the near-tie rule on the bound's ``allowed``; no hard disagreement at all): logits near
    2e4 from the weights (zero bias) allow a |diff| of ~20 per logit, but a swap of the top two classes 5 apart
    is no near-tie (its bound comes from the top logit's height, not its magnitude): the file fails."""
    a = load_model(timm_folder)
    with torch.no_grad():
        emb = a.embed_batch(a.collate(items), CPU).float()
    W0, b0 = a.head_params()
    u = torch.full((W0.shape[1],), 2e4 / float(emb.sum(1).mean()))
    steps = torch.tensor([0.0, 2.5e-4, 5e-4])[: W0.shape[0]]
    a.set_head(u[None, :] * (1 + steps[:, None]), torch.zeros_like(b0))
    out = tmp_path / "big.onnx"
    export_onnx(a, out, metadata={}, verify_items=items, exporter="torchscript")
    with torch.no_grad():
        logits = a.logits_batch(a.collate(items), CPU).float()
    top2 = logits.topk(2, dim=1)
    gaps = top2.values[:, 0] - top2.values[:, 1]
    j = int((gaps - 5).abs().argmin())
    assert 2 < float(gaps[j]) < 10 and float(logits[j].max()) > 1e4, (gaps, logits[j])
    ref = logits.clone()
    t, s = top2.indices[j].tolist()
    ref[j, t], ref[j, s] = logits[j, s], logits[j, t]
    rep = run_verification(out, a, items, reference_logits=ref)
    assert rep["bound"]["ratio"] < 1                  # within the bound: the argmax rule alone decides
    assert rep["argmax_disagreements"] == 1 and rep["near_ties"] == 0
    assert rep["passed"] is False
    assert rep["problems"] == [f"argmax differs on 1 of {len(items)} samples (not near-ties)"], rep["problems"]


def test_an_onnx_models_head_check_fails_when_its_head_is_not_the_files(items, tmp_path, monkeypatch):
    """Mutant 6 (the head check never fails): the file and the graph's logits agree, but embeddings @ W.T + b
    with the head the reference says it has (W + 0.05) do not: the file fails."""
    src, _ = make_deployed_onnx(tmp_path / "deployed.onnx")
    a = load_model(src, LoadOptions(image_size=32, mean=MEAN, std=STD))
    g = torch.Generator().manual_seed(1)
    W, b = a.head_params()
    a.set_head(W * 1.3 + 0.05 * torch.randn(W.shape, generator=g), b)
    out = tmp_path / "repaired.onnx"
    rep = export_onnx(a, out, metadata={}, verify_items=items[:5])
    assert rep["passed"] and rep["head_check_ratio"] <= 1
    W2, b2 = a.head_params()
    monkeypatch.setattr(a, "head_params", lambda: (W2 + 0.05, b2.clone()))
    rep = verify_onnx(out, a, items[:5], check=False)
    assert rep["passed"] is False and rep["bound"]["ratio"] <= 1 and rep["head_check_ratio"] > 1
    assert len(rep["problems"]) == 1 and "embeddings @ W.T + b differ" in rep["problems"][0], rep["problems"]


# ------------------------------------------------------------------ options
def test_a_tolerance_of_zero_is_refused(timm_folder, image_data, tmp_path):
    """Mutant 7 (``t < 0``): 0 is no bound a float computation meets; it is refused like -1."""
    from repair.rules import check_tolerance

    for t in (0, 0.0, "0", -0.0):
        with pytest.raises(BadInput, match="--tolerance must be a positive number"):
            check_tolerance(t)
    out = tmp_path / "x.onnx"
    code, stdout, err = run_cli("export", timm_folder, "--data", image_data, "--out", out, "--tolerance", 0, "-q")
    assert code == 2 and stdout == "", err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--tolerance must be a positive number" in lines[0], err
    assert not out.exists()


def test_verify_checks_max_verify_samples(plain_export, timm_folder, image_data, items):
    """Mutant 8 (verify_model verifies every sample): ``--max-verify 5`` of 18 images verifies 5."""
    _, out = plain_export
    assert len(items) > 5
    code, stdout, err = run_cli("verify", out, "--reference", timm_folder, "--data", image_data, "--max-verify", 5,
                                "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["passed"] is True and rep["n_verified"] == 5


# ------------------------------------------------------------------ outputs (repair.io)
def test_a_failed_commit_puts_back_what_force_replaced_before(tmp_path):
    """Mutant 9 (the undo does not put a replaced output back): A replaced (--force), then B refused at the
    commit (a folder of the user's appeared there): A is the user's old file again."""
    from repair.io import outputs

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old")
    with pytest.raises(BadInput) as ei:
        with outputs(force=True) as tx:
            tx.stage(a, kind="file").write_text("new a")
            tx.stage(b, kind="file").write_text("new b")
            b.mkdir()
            (b / "mine.txt").write_text("mine")
    assert Path(ei.value.path) == b
    assert a.read_text() == "old"
    assert (b / "mine.txt").read_text() == "mine" and sorted(p.name for p in b.iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]      # no staging folder left


def test_a_recorded_link_in_an_output_folder_is_not_replaced(tmp_path):
    """Mutant 10 (a link listed in the record passes as written): a link in a folder output is never taken
    for repair's file, even though the record lists it (at -1)."""
    from repair.io import OUTPUT_RECORD, atomic_output, replace_refused

    target = tmp_path / "elsewhere.txt"
    target.write_text("x")
    d = tmp_path / "out"
    with atomic_output(d, is_dir=True) as t:
        (t / "a.txt").write_text("a")
        (t / "link").symlink_to(target)
    assert json.loads((d / OUTPUT_RECORD).read_text())["files"]["link"] == -1
    why = replace_refused(d, "folder")
    assert why is not None and "link is a link or special file" in why, why
    before = _tree(d)
    with pytest.raises(BadInput, match="link or special file"):
        with atomic_output(d, is_dir=True, force=True) as t:
            (t / "b.txt").write_text("b")
    assert _tree(d) == before and target.read_text() == "x"


def test_a_record_that_is_a_link_to_another_outputs_record_is_not_read(tmp_path, timm_folder, image_data):
    """Mutant 11 (the record opened through a link): a user's folder whose files have the names and sizes of
    another output's, with a link to that output's record, is the user's: --force refuses it."""
    from repair.io import OUTPUT_RECORD, atomic_output, replace_refused

    x = tmp_path / "x"
    with atomic_output(x, is_dir=True) as t:
        (t / "model.safetensors").write_bytes(b"0123456789")
        (t / "config.json").write_text("{}")
    y = tmp_path / "y"
    y.mkdir()
    (y / "model.safetensors").write_bytes(b"my thesis!")            # the same size, the user's bytes
    (y / "config.json").write_text("[]")
    (y / OUTPUT_RECORD).symlink_to(x / OUTPUT_RECORD)
    assert replace_refused(y, "folder") is not None
    before = _tree(y)
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", y, "--force", "-q")
    one_line_naming(code, err, y, "--force")
    assert _tree(y) == before


def test_a_live_staging_folder_is_not_cleaned_as_stale(tmp_path):
    """Mutant 12 (every temp folder beside an output is stale): the staging folder of a run in progress (its
    lock held) is left alone."""
    from repair.io import clean_stale_temps, outputs

    final = tmp_path / "out.txt"
    said = []
    with outputs() as tx:
        t = tx.stage(final)
        t.write_text("x")
        assert clean_stale_temps(final, said.append) == [] and said == []
        assert t.exists()
    assert final.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="makes a folder of another user (root)")
def test_another_users_temp_folder_is_not_cleaned(tmp_path):
    """Mutant 13, its owner part (a temp folder of another user taken for ours): an unlocked, old temp
    folder beside an output that another user owns is not removed."""
    from repair.io import clean_stale_temps

    final = tmp_path / "out.txt"
    theirs = tmp_path / ".out.txt.abcd1234.tmp"
    theirs.mkdir()
    (theirs / "data").write_text("theirs")
    try:
        os.chown(theirs, os.geteuid() + 4321, -1)
    except OSError as e:                   # a user namespace that maps no other uid
        pytest.skip(f"cannot give a folder to another user here ({e.strerror})")
    os.utime(theirs, (1e9, 1e9))
    said = []
    assert clean_stale_temps(final, said.append) == [] and said == []
    assert (theirs / "data").read_text() == "theirs"
    # (the same folder of this user is stale: removed)
    os.chown(theirs, os.geteuid(), -1)
    os.utime(theirs, (1e9, 1e9))
    assert clean_stale_temps(final, said.append) == [theirs] and not theirs.exists()


# ------------------------------------------------------------------ never replace an input
def test_an_output_through_a_link_to_the_models_folder_is_the_input(timm_folder, image_data, tmp_path):
    """Mutant 14 (paths not resolved): ``--out alias/model.safetensors`` with alias a link to the model's
    folder is the input model."""
    model = tmp_path / "m"
    shutil.copytree(timm_folder, model)
    (tmp_path / "alias").symlink_to(model)
    weights = model / "model.safetensors"
    before = _sha(weights)
    out = tmp_path / "alias" / "model.safetensors"
    code, _, err = run_cli("fix", weights, "--data", image_data, "--recipe", "dfr", "--out", out, "--force", "-q")
    one_line_naming(code, err, out, "would overwrite the input model")
    assert _sha(weights) == before


def test_an_export_over_a_file_of_the_checkpoint_folder_is_refused(timm_folder, image_data, tmp_path):
    """Mutant 15 (the input's files not checked once loaded): the model given as its weights file, the export
    written over another file of its folder (which the loader's folder is read whole for) is refused."""
    model = tmp_path / "m"
    shutil.copytree(timm_folder, model)
    extra = model / "extra.onnx"
    extra.write_bytes(b"not yours to replace")
    code, _, err = run_cli("export", model / "model.safetensors", "--data", image_data, "--out", extra, "--force",
                           "-q", "--exporter", "torchscript")
    one_line_naming(code, err, extra, "input model")
    assert extra.read_bytes() == b"not yours to replace"


# ------------------------------------------------------------------ the CLI's exit codes
@pytest.mark.parametrize("code_, why", [(errno.EACCES, "Permission denied"), (errno.EPERM, "Operation not permitted"),
                                        (errno.EROFS, "Read-only file system")])
def test_a_permission_or_read_only_failure_is_exit_2_naming_the_path(monkeypatch, tmp_path, code_, why):
    """Mutants 16 and 17 (EACCES / EPERM, EROFS an internal error): a file system's refusal met anywhere is the
    user's: exit 2, one line naming the path."""
    import repair.outputs

    def refuse(*a, **k):
        raise OSError(code_, why, str(tmp_path / "x"))

    monkeypatch.setattr(repair.outputs, "verify_model", refuse)
    code, stdout, err = run_cli("verify", tmp_path / "m.onnx", "--reference", tmp_path, "--data", tmp_path)
    assert code == 2 and stdout == "", (code, err)
    assert err.strip() == f"error: {tmp_path / 'x'}: {why}", err


def test_a_commands_results_on_a_full_stdout_are_exit_2(tmp_path):
    """Mutant 18 (a command that returned keeps exit 0 when its stdout was full): ``repair methods --json`` with
    stdout on a full disk exits 2 naming stdout."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    code = "import sys; from repair_cli.main import main; sys.argv[0] = 'repair'; main()"
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-c", code, "methods", "--json"], cwd=tmp_path, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=full, stderr=subprocess.PIPE,
                             text=True)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stderr.strip() == "error: stdout: No space left on device; the results could not be written there", \
        res.stderr
