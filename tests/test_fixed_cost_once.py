"""Issue 20: `repair fix`'s fixed cost -- nothing loaded or computed twice. Each test counts the work
(images decoded for the model, ONNX files parsed, duplicate ids computed) rather than timing it."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import make_images, run_cli, write_rows


@pytest.fixture
def decodes(monkeypatch):
    """Counts every image decoded for the model's input (its eval preprocessing), per file."""
    import repair.adapters.images as images

    seen: Counter = Counter()
    real = images.read_image

    def counting(p, *a, **k):
        seen[str(Path(p).resolve())] += 1
        return real(p, *a, **k)

    monkeypatch.setattr(images, "read_image", counting)
    return seen


def _mixed_eval(tmp_path: Path, repair: Path, n_copies: int = 3) -> Path:
    """Fresh images plus ``n_copies`` of the repair images saved again in another format (other bytes,
    the same pixels: the model reads them as repair samples)."""
    from PIL import Image

    ev = make_images(tmp_path / "ev", n_per_class=3, seed=7)
    with open(ev / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    with open(repair / "metadata.csv") as f:
        rrows = list(csv.DictReader(f))
    for r in rrows[:n_copies]:
        rel = str(Path(r["img_filename"]).with_suffix(".bmp"))
        with Image.open(repair / r["img_filename"]) as im:
            im.save(ev / rel, format="BMP")
        rows.append({**r, "img_filename": rel})
    write_rows(ev / "metadata.csv", rows, ["img_filename", "y", "place"])
    return ev


def test_a_cold_fix_eval_decodes_each_image_once(tmp_path, timm_folder, decodes):
    """A cold `fix --eval` of an image model preprocessed every image twice: once for the input keys
    (the check that an --eval the model reads as repair samples is left out or refused) and once to
    embed it. Now the keys are the embeddings' input digests: each image is decoded once, and the
    copies are still found and left out."""
    repair = make_images(tmp_path / "r", n_per_class=4, seed=0)
    ev = _mixed_eval(tmp_path, repair)
    code, out, err = run_cli("fix", timm_folder, "--data", repair, "--eval", ev, "--recipe", "dfr",
                             "--out", tmp_path / "o", "--json", "-q", "--cache-dir", tmp_path / "c")
    rep = json.loads(out)
    assert code == 0, err
    assert "3 also in the repair set left out" in rep["measured_on"] and rep["after"]["n"] == 9
    files = {str(p.resolve()) for d in (repair, ev) for p in d.rglob("*") if p.suffix in (".png", ".bmp")}
    assert set(decodes) == files
    assert max(decodes.values()) == 1, {k: v for k, v in decodes.items() if v > 1}
    # the --eval set's cache entry is the whole set's: a later plain eval of it decodes nothing
    decodes.clear()
    code, out, err = run_cli("eval", tmp_path / "o", "--data", ev, "--json", "-q", "--cache-dir", tmp_path / "c")
    assert code == 0 and json.loads(out)["embedding"]["from_cache"], err
    assert not decodes


def test_a_cold_fix_eval_all_copies_is_refused_decoding_each_image_once(tmp_path, timm_folder, decodes):
    """An --eval that is all repair images as the model reads them is refused (exit 2, one line), with
    each image decoded at most once and nothing written."""
    from PIL import Image

    repair = make_images(tmp_path / "r", n_per_class=3, seed=0)
    copies = tmp_path / "copies"
    with open(repair / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    out_rows = []
    for r in rows:
        rel = str(Path(r["img_filename"]).with_suffix(".bmp"))
        (copies / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(repair / r["img_filename"]) as im:
            im.save(copies / rel, format="BMP")
        out_rows.append({**r, "img_filename": rel})
    write_rows(copies / "metadata.csv", out_rows, ["img_filename", "y", "place"])
    code, _, err = run_cli("fix", timm_folder, "--data", repair, "--recipe", "dfr", "--eval", copies,
                           "--out", tmp_path / "o", "-q", "--cache-dir", tmp_path / "c")
    assert code == 2 and "as the model reads them" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    assert decodes and max(decodes.values()) == 1, decodes


@pytest.mark.parametrize("cache", [True, False])
def test_a_cold_eval_exclude_decodes_each_image_once_and_shares_the_plain_evals_entry(
        tmp_path, timm_folder, decodes, cache):
    """A cold `eval --exclude` of image data decoded every image of --data twice (its input keys, then
    the embedding of the rows kept), and cached the embeddings of the kept rows only: a later plain
    `eval` of the same data embedded it again. Now the whole set is embedded once and the excluded rows
    masked: the same figures, each image decoded once, and the entry is the plain eval's."""
    repair = make_images(tmp_path / "r", n_per_class=4, seed=0)
    ev = _mixed_eval(tmp_path, repair)
    flags = ["--cache-dir", tmp_path / "c"] if cache else ["--no-cache"]
    code, out, err = run_cli("eval", timm_folder, "--data", ev, "--exclude", repair, "--json", "-q", *flags)
    doc = json.loads(out)
    assert code == 0 and doc["excluded"]["n"] == 3 and doc["n"] == 9, err
    ev_files = {str(p.resolve()) for p in ev.rglob("*") if p.suffix in (".png", ".bmp")}
    assert ev_files <= set(decodes)
    assert max(decodes.values()) == 1, {k: v for k, v in decodes.items() if v > 1}
    if not cache:
        return
    decodes.clear()
    code, out, err = run_cli("eval", timm_folder, "--data", ev, "--json", "-q", *flags)
    plain = json.loads(out)
    assert code == 0 and plain["embedding"]["from_cache"] and plain["n"] == 12, err
    assert not decodes
    assert plain["embedding"]["cache_key"] == doc["embedding"]["cache_key"]


def test_the_gates_eval_exclude_after_fix_decodes_no_repair_image(tmp_path, timm_folder, decodes):
    """The re-gate after a repair (`repair eval FIXED --data HELD_OUT --exclude REPAIR_SET`): the repair
    set's input keys are read from the embedding entry `fix` left (a head repair keeps the body, so the
    entry is the fixed model's too) -- no repair image is decoded again, and the cache holds no second
    copy of its digests (no inputs-*.json)."""
    repair = make_images(tmp_path / "r", n_per_class=4, seed=0)
    ev = _mixed_eval(tmp_path, repair)
    cache = tmp_path / "c"
    code, out, err = run_cli("fix", timm_folder, "--data", repair, "--recipe", "dfr", "--out", tmp_path / "o",
                             "-q", "--cache-dir", cache)
    assert code == 0, err
    decodes.clear()
    code, out, err = run_cli("eval", tmp_path / "o", "--data", ev, "--exclude", repair, "--json", "-q",
                             "--cache-dir", cache)
    doc = json.loads(out)
    assert code == 0 and doc["excluded"]["n"] == 3 and doc["n"] == 9, err
    repair_files = {str(p.resolve()) for p in repair.rglob("*.png")}
    assert not repair_files & set(decodes), sorted(repair_files & set(decodes))
    assert max(decodes.values()) == 1
    assert not list(cache.glob("inputs-*.json"))


def test_verify_reads_the_onnx_file_once(tmp_path, timm_folder, monkeypatch):
    """`repair verify` parsed the ONNX file a second time (onnx.load, for its metadata) after the
    onnxruntime session had read it. The metadata now come from that session: the file is read once,
    and a file whose metadata name other classes still fails."""
    import onnx

    import repair.adapters.onnx_runtime as ort_mod

    data = make_images(tmp_path / "d", n_per_class=2, seed=0)
    out = tmp_path / "m.onnx"
    code, _, err = run_cli("export", timm_folder, "--data", data, "--out", out, "--exporter", "torchscript", "-q")
    assert code == 0, err
    m = onnx.load(str(out))
    for p in m.metadata_props:
        if p.key == "class_names":
            p.value = json.dumps(list(reversed(json.loads(p.value))))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    reads: Counter = Counter()
    real_load, real_session = onnx.load, ort_mod.make_session

    def load(f, *a, **k):
        reads[("onnx.load", Path(str(f)).name)] += 1
        return real_load(f, *a, **k)

    def session(model, *a, **k):
        reads[("session", Path(str(model)).name if isinstance(model, (str, Path)) else "bytes")] += 1
        return real_session(model, *a, **k)

    monkeypatch.setattr(onnx, "load", load)
    monkeypatch.setattr(onnx, "load_model", load)
    monkeypatch.setattr(ort_mod, "make_session", session)
    code, stdout, err = run_cli("verify", out, "--reference", timm_folder, "--data", data, "--json")
    assert code == 0 and json.loads(stdout)["passed"], err
    assert dict(reads) == {("session", "m.onnx"): 1}, reads
    reads.clear()
    code, stdout, err = run_cli("verify", bad, "--reference", timm_folder, "--data", data, "--json")
    rep = json.loads(stdout)
    assert code == 1 and any("the file's class_names" in p for p in rep["problems"]), err
    assert dict(reads) == {("session", "bad.onnx"): 1}, reads


def _with_copies(root: Path, times: int = 3) -> Path:
    """``root``'s metadata with every image listed ``times`` times (copies of one sample)."""
    with open(root / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows([r for r in rows for _ in range(times)])
    return root


@pytest.mark.parametrize("with_eval", [False, True])
def test_fix_computes_each_sets_duplicate_ids_once(tmp_path, timm_folder, monkeypatch, with_eval):
    """`fix` computed the duplicate ids of the rows its figures are measured on once per figure (before
    and after), though it held them already (the held-out part's: the split's clusters). Now each set's
    ids are computed once, and the figures still count each group's distinct samples."""
    from repair.data import RepairData

    repair = _with_copies(make_images(tmp_path / "r", n_per_class=8, seed=0))
    ev = _with_copies(make_images(tmp_path / "e", n_per_class=4, seed=3)) if with_eval else None
    calls: list = []
    real = RepairData.duplicate_ids

    def counting(self, *a, **k):
        calls.append(len(self))
        return real(self, *a, **k)

    monkeypatch.setattr(RepairData, "duplicate_ids", counting)
    code, out, err = run_cli("fix", timm_folder, "--data", repair, "--group-by", "place", "--recipe", "dfr",
                             "--out", tmp_path / "o", "--json", "-q", *(["--eval", ev] if with_eval else []))
    assert code == 0, err
    rep = json.loads(out)
    for fig in ("before", "after"):
        rows = rep[fig]["per_group"]
        assert rows and all(g["n_distinct"] * 3 == g["n"] for g in rows), rows
    assert calls == ([72, 36] if with_eval else [72]), calls


def test_train_images_are_keyed_once_for_the_overlap_checks_and_the_record(tmp_path, timm_folder, decodes):
    """--train's images were decoded for its overlap with the repair data, again for its overlap with
    --eval, and (with no cache) once more for the provenance's record of what a model repair trained on:
    its keys are taken once (the training's own pass decodes them once more)."""
    data = make_images(tmp_path / "d", n_per_class=8, seed=1)
    train = make_images(tmp_path / "t", n_per_class=6, seed=5)
    ev = make_images(tmp_path / "e", n_per_class=2, seed=7)
    code, out, err = run_cli("fix", timm_folder, "--data", data, "--train", train, "--eval", ev, "--recipe", "clp",
                             "--budget", "2steps", "--out", tmp_path / "o", "--json", "-q", "--no-cache")
    assert code == 0, err
    assert json.loads(out)["kind"] == "model"
    per_train_image = {n for p, n in decodes.items() if p.startswith(str(train.resolve()))}
    assert per_train_image == {2}, per_train_image        # keys once, training once
    code, _, err = run_cli("eval", tmp_path / "o", "--data", train, "-q", "--no-cache")
    assert code == 2 and "repair set" in err, err         # and the record still holds them
