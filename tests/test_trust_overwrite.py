"""An existing output is never replaced without --force, and --force replaces only the outputs
themselves: ``repair demo --force`` replaces only a folder the demo can prove it wrote (its marker
file and nothing but a demo's entries), and ``repair zoo`` replaces a report in --out-dir only when
it is this zoo's own (a rerun or a resume) or with --force."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import one_line_naming, make_images, make_timm_folder, run_cli


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (but a zoo driver's lock file, which holds its pid)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".zoo-lock"}


# ------------------------------------------------------------------ repair demo --force
def test_demo_force_refuses_a_user_folder_whose_names_look_like_a_demo(tmp_path):
    """``repair demo --out proj --force`` deleted proj/data/thesis.txt: the folder's top-level names
    (data) were all names a demo has, which was taken for proof that it was a demo."""
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "thesis.txt").write_text("my thesis\n")
    (proj / "model").mkdir()
    (proj / "model" / "notes.md").write_text("mine\n")
    before = _tree(proj)
    code, out, err = run_cli("demo", "--out", proj, "--force", "--size", "tiny", "--recipe", "dfr")
    one_line_naming(code, err, proj, "repair-demo.json", "--force")
    assert _tree(proj) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]        # nothing left beside it


def test_demo_force_refuses_a_folder_without_the_marker_and_says_what_to_do(tmp_path):
    """Fail closed: a demo folder written before the marker existed (or anything shaped like one) is
    not replaced; the message says to delete it or choose another --out."""
    proj = tmp_path / "proj"
    for d in ("model", "data", "model-repaired"):
        (proj / d).mkdir(parents=True)
        (proj / d / "x.txt").write_text(d)
    before = _tree(proj)
    code, _, err = run_cli("demo", "--out", proj, "--force", "--size", "tiny")
    line = one_line_naming(code, err, proj, "delete it")
    assert "another folder" in line or "another --out" in line
    assert _tree(proj) == before


def test_demo_force_refuses_a_marker_that_is_not_the_demos_or_a_folder_with_more(tmp_path):
    from repair.demo import DEMO_MARKER, check_out
    from repair.errors import BadInput

    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / DEMO_MARKER).write_text("not the demo's marker\n")                   # not a marker the demo writes
    with pytest.raises(BadInput) as e:
        check_out(proj, force=True)
    assert e.value.path == str(proj)
    (proj / DEMO_MARKER).write_text(json.dumps({"kind": "repair demo folder", "files": {}}))  # a marker ...
    (proj / "thesis.txt").write_text("mine")                                      # ... and more than a demo
    with pytest.raises(BadInput):
        check_out(proj, force=True)
    (proj / "thesis.txt").unlink()
    assert check_out(proj, force=True) == proj                                    # a demo folder: replaced
    (proj / DEMO_MARKER).write_text(json.dumps({"kind": "repair demo folder"}))  # an older marker: no list
    with pytest.raises(BadInput, match="does not list"):
        check_out(proj, force=True)


def test_demo_writes_its_marker_and_force_rebuilds_its_own_folder(tmp_path, monkeypatch):
    """The demo's own folder holds the marker, so ``--force`` rebuilds it (a small, fast demo)."""
    import repair.demo as demo

    monkeypatch.setitem(demo.SPECS, "tiny", demo._Spec(n_train=64, n_val=48, n_test=48, epochs=1,
                                                        ring_thick=(0.2, 0.35)))
    proj = tmp_path / "proj"
    code, _, err = run_cli("demo", "--out", proj, "--size", "tiny", "--recipe", "dfr")
    assert code == 0, err
    assert sorted(p.name for p in proj.iterdir()) == ["data", "model", "model-repaired", demo.DEMO_MARKER]
    assert json.loads((proj / demo.DEMO_MARKER).read_text())["kind"] == demo.DEMO_KIND
    code, _, err = run_cli("demo", "--out", proj, "--size", "tiny", "--recipe", "dfr")
    one_line_naming(code, err, proj, "--force")                                  # not without --force
    listed = json.loads((proj / demo.DEMO_MARKER).read_text())["files"]
    assert listed == demo.demo_files(proj) and any(k.startswith("model-repaired/") for k in listed)
    # a file of the user's inside a demo's folder, or a demo file changed, is not replaced (it was: only
    # the top-level names were checked)
    mine = proj / "data" / "val" / "my-notes.txt"
    mine.write_text("mine\n")
    code, _, err = run_cli("demo", "--out", proj, "--size", "tiny", "--recipe", "dfr", "--force")
    one_line_naming(code, err, proj, "data/val/my-notes.txt", "not a file the demo wrote")
    mine.unlink()
    cfg = proj / "model" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    code, _, err = run_cli("demo", "--out", proj, "--size", "tiny", "--recipe", "dfr", "--force")
    one_line_naming(code, err, proj, "model/config.json", "changed since")
    cfg.write_text(cfg.read_text()[:-1])
    shutil.rmtree(proj / "model-repaired")                  # removing what the demo wrote is fine
    code, _, err = run_cli("demo", "--out", proj, "--size", "tiny", "--recipe", "dfr", "--force")
    assert code == 0, err
    assert (proj / demo.DEMO_MARKER).is_file() and (proj / "model-repaired").is_dir()


# ------------------------------------------------------------------ repair zoo: the report files
@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("overwrite-zoo")
    make_timm_folder(root / "timm")
    make_images(root / "img")
    return root


def _zoo(tmp_path: Path, parts: Path, name: str = "zoo.yaml") -> Path:
    for d in ("timm", "img"):
        if not (tmp_path / d).exists():
            shutil.copytree(parts / d, tmp_path / d)
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"models": [{"name": "a", "checkpoint": "timm", "data": "img",
                                                "recipe": "dfr", "output": "out-a"}]}, sort_keys=False))
    return path


@pytest.mark.parametrize("which", ["both", "zoo-report.json", "zoo-report.html"])
def test_zoo_refuses_to_replace_report_files_it_did_not_write(tmp_path, parts, which):
    """``repair zoo --out-dir mydocs`` replaced the user's zoo-report.html / zoo-report.json without
    --force (the check was made with force=True, and the JSON was never checked)."""
    path = _zoo(tmp_path, parts)
    docs = tmp_path / "mydocs"
    docs.mkdir()
    if which in ("both", "zoo-report.json"):
        (docs / "zoo-report.json").write_text("precious\n")
    if which in ("both", "zoo-report.html"):
        (docs / "zoo-report.html").write_text("<p>mine</p>\n")
    before = _tree(docs)
    code, out, err = run_cli("zoo", path, "--out-dir", docs, "-q")
    named = docs / ("zoo-report.html" if which == "both" else which)
    one_line_naming(code, err, named, "--force")
    assert _tree(docs) == before
    assert sorted(p.name for p in docs.iterdir() if p.name != ".zoo-lock") == sorted(before)   # the driver's lock
    assert not (tmp_path / "out-a").exists()                                     # refused before any model ran


def test_zoo_refuses_another_zoos_report_and_an_edited_page_but_reruns_into_its_own(tmp_path, parts):
    path = _zoo(tmp_path, parts)
    r = tmp_path / "r"
    code, _, err = run_cli("zoo", path, "--out-dir", r, "-q")
    assert code == 0, err
    code, _, err = run_cli("zoo", path, "--out-dir", r, "-q")                    # its own: a rerun
    assert code == 0, err
    other = _zoo(tmp_path, parts, "other.yaml")                                   # another manifest's report
    before = _tree(r)
    code, _, err = run_cli("zoo", other, "--out-dir", r, "--journal", tmp_path / "other.jsonl", "-q")
    one_line_naming(code, err, r / "zoo-report.html", "--force")
    assert _tree(r) == before
    (r / "zoo-report.html").write_text("<p>my notes</p>\n")                       # the page is the user's now
    code, _, err = run_cli("zoo", path, "--out-dir", r, "-q")
    one_line_naming(code, err, r / "zoo-report.html", "not the page written with")
    assert (r / "zoo-report.html").read_text() == "<p>my notes</p>\n"
    code, _, err = run_cli("zoo", path, "--out-dir", r, "-q", "--force")          # --force replaces it
    assert code == 0, err
    assert "repair zoo" in (r / "zoo-report.html").read_text()


def test_zoo_force_replaces_the_report_files(tmp_path, parts):
    path = _zoo(tmp_path, parts)
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "zoo-report.json").write_text("precious\n")
    (docs / "notes.txt").write_text("kept\n")
    code, _, err = run_cli("zoo", path, "--out-dir", docs, "-q", "--force")
    assert code == 0, err
    assert json.loads((docs / "zoo-report.json").read_text())["kind"] == "zoo"
    assert (docs / "notes.txt").read_text() == "kept\n"                           # only the outputs themselves


def test_write_report_does_not_replace_without_force(tmp_path):
    from repair.errors import BadInput
    from repair.report import write_report

    page = tmp_path / "r.html"
    page.write_text("mine")
    doc = {"kind": "fix", "generated": "now", "models": [{"name": "m", "status": "done", "result": None}]}
    with pytest.raises(BadInput):
        write_report(page, doc)
    assert page.read_text() == "mine" and not (tmp_path / "r.json").exists()


def test_a_report_or_marker_nested_too_deeply_is_not_ours_not_an_internal_error(tmp_path):
    """A user's file in the report's or the marker's place is read to decide whether it is ours: one
    nested too deeply for Python's parser is not ours (it was a RecursionError)."""
    from repair.demo import _is_marker
    from repair.report import read_report

    (tmp_path / "zoo-report.json").write_text("[" * 100_000 + "]" * 100_000)
    doc, why = read_report(tmp_path / "zoo-report.html")
    assert doc is None and "not a report" in why
    (tmp_path / "repair-demo.json").write_text("[" * 30_000 + "]" * 30_000)
    assert _is_marker(tmp_path / "repair-demo.json") is False
