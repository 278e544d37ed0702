"""What ``--force`` may replace (one rule, :func:`repair.io.replace_refused`, behind every output): a
symlink (the link itself), a regular file where a file goes, an empty folder, or a folder repair wrote
that holds nothing else (its ``.repair-output.json`` lists every file in it at its size). A
user's folder -- ``repair fix model --out ~/projects --force`` -- is never replaced: exit 2, one line
naming it, nothing written or deleted."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import one_line_naming, make_timm_folder, run_cli
from repair.errors import BadInput


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): (b"<dir>" if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def _fix(model, data, out, *extra):
    return run_cli("fix", model, "--data", data, "--recipe", "dfr", "--out", out, "-q", *extra)


@pytest.fixture(scope="module")
def previous_fix(tmp_path_factory, timm_folder, image_data) -> Path:
    """A `repair fix` output folder, written once (each test copies it)."""
    out = tmp_path_factory.mktemp("prev") / "fixed"
    code, _, err = _fix(timm_folder, image_data, out)
    assert code == 0, err
    return out


# ------------------------------------------------------------------ (a) a previous repair output
def test_force_replaces_a_previous_fix_output(tmp_path, timm_folder, image_data, previous_fix):
    out = tmp_path / "fixed"
    shutil.copytree(previous_fix, out, symlinks=True)
    (out / "config.json").unlink()                    # a file of the output deleted since: still ours
    code, _, err = _fix(timm_folder, image_data, out, "--force")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize("change", ["added", "edited", "nested"])
def test_force_refuses_a_previous_output_holding_what_repair_did_not_write(tmp_path, timm_folder, image_data,
                                                                           previous_fix, change):
    """A file put in (or changed in) a previous output is the user's: the folder is refused whole."""
    out = tmp_path / "fixed"
    shutil.copytree(previous_fix, out, symlinks=True)
    if change == "added":
        (out / "notes.md").write_text("mine\n")
    elif change == "edited":
        (out / "config.json").write_text((out / "config.json").read_text() + " ")
    else:
        (out / "results").mkdir()
        (out / "results" / "a.csv").write_text("1\n")
    before = _tree(out)
    code, _, err = _fix(timm_folder, image_data, out, "--force")
    one_line_naming(code, err, out, "--out", "repair wrote", "--force")
    assert _tree(out) == before


def test_force_refuses_a_users_folder_holding_a_repaired_weights_file(tmp_path, timm_folder, image_data,
                                                                     previous_fix):
    """The review's case: repaired weights (a model.safetensors carrying repair's provenance, e.g. a bare
    .safetensors output written there) in the user's own folder do not make the folder repair's."""
    proj = tmp_path / "proj"
    (proj / "results").mkdir(parents=True)
    (proj / "thesis.tex").write_text("x\n")
    (proj / "results" / "a.csv").write_text("1\n")
    shutil.copy(previous_fix / "model.safetensors", proj / "model.safetensors")
    before = _tree(proj)
    code, _, err = _fix(timm_folder, image_data, proj, "--force")
    one_line_naming(code, err, proj, "--out", "did not write", "--force")
    assert _tree(proj) == before


def test_force_replaces_an_empty_folder(tmp_path, timm_folder, image_data):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = _fix(timm_folder, image_data, out, "--force")
    assert code == 0, err
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------ (b) a folder of the user's
def test_force_refuses_a_users_folder(tmp_path, timm_folder, image_data):
    """The reported loss: ``--out ~/projects --force`` deleted the whole folder."""
    projects = tmp_path / "projects"
    (projects / "thesis").mkdir(parents=True)
    (projects / "thesis" / "chapter1.tex").write_text("my work\n")
    (projects / "notes.md").write_text("mine\n")
    before = _tree(projects)
    code, _, err = _fix(timm_folder, image_data, projects, "--force")
    one_line_naming(code, err, projects, "--out", "repair did not write", "--force")
    assert _tree(projects) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projects"]      # nothing staged left beside it


def test_force_refuses_a_checkpoint_folder_repair_did_not_write(tmp_path, timm_folder, image_data):
    """A model folder the user trained (a model.safetensors without repair's provenance) is theirs."""
    mine = make_timm_folder(tmp_path / "mine", seed=5)
    before = _tree(mine)
    code, _, err = _fix(timm_folder, image_data, mine, "--force")
    one_line_naming(code, err, mine, "repair did not write")
    assert _tree(mine) == before


def test_force_never_follows_a_symlinked_weights_file(tmp_path, timm_folder, image_data, previous_fix):
    """A folder whose model.safetensors is a link to a repair output's is not known by the link."""
    out = tmp_path / "linked"
    out.mkdir()
    (out / "model.safetensors").symlink_to(previous_fix / "model.safetensors")
    (out / "data.csv").write_text("mine\n")
    before = _tree(out)
    code, _, err = _fix(timm_folder, image_data, out, "--force")
    one_line_naming(code, err, out, "repair did not write")
    assert _tree(out) == before


def test_export_force_refuses_a_users_folder(tmp_path, timm_folder):
    """``repair export --format safetensors`` of a folder writes a folder: the same rule."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine\n")
    code, _, err = run_cli("export", timm_folder, "--format", "safetensors", "--out", mine, "--force", "-q")
    one_line_naming(code, err, mine, "repair did not write")
    assert (mine / "keep.txt").read_text() == "mine\n" and sorted(p.name for p in mine.iterdir()) == ["keep.txt"]


def test_export_force_replaces_its_previous_export(tmp_path, timm_folder):
    out = tmp_path / "exported"
    for _ in range(2):
        code, _, err = run_cli("export", timm_folder, "--format", "safetensors", "--out", out, "--force", "-q")
        assert code == 0, err
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------ (d) a file where a folder goes, and back
def test_force_refuses_a_file_where_a_folder_output_goes(tmp_path, timm_folder, image_data):
    f = tmp_path / "fixed"
    f.write_text("a file of mine\n")
    code, _, err = _fix(timm_folder, image_data, f, "--force")
    one_line_naming(code, err, f, "is a file", "folder")
    assert f.read_text() == "a file of mine\n"


def test_force_refuses_a_folder_where_a_file_output_goes(tmp_path, timm_folder, image_data, previous_fix):
    """``--out x.safetensors`` of a weights file, where x.safetensors is a folder (even one repair wrote)."""
    weights = timm_folder / "model.safetensors"
    bare = tmp_path / "bare.safetensors"
    shutil.copyfile(weights, bare)
    out = tmp_path / "x.safetensors"
    shutil.copytree(previous_fix, out)
    before = _tree(out)
    code, _, err = run_cli("export", bare, "--arch", "test_resnet", "--format", "safetensors", "--out", out,
                            "--force", "-q")
    one_line_naming(code, err, out, "is a folder", "file")
    assert _tree(out) == before


def test_force_refuses_a_folder_where_the_report_goes(tmp_path, timm_folder, image_data):
    """The JSON beside ``--report`` is a name the user did not type: a folder there is theirs."""
    report = tmp_path / "r.html"
    (tmp_path / "r.json").mkdir()
    (tmp_path / "r.json" / "keep.txt").write_text("mine\n")
    out = tmp_path / "fixed"
    code, _, err = _fix(timm_folder, image_data, out, "--force", "--report", report)
    one_line_naming(code, err, tmp_path / "r.json", "is a folder")
    assert (tmp_path / "r.json" / "keep.txt").read_text() == "mine\n"
    assert not out.exists() and not report.exists()


def test_force_replaces_a_file_and_a_symlink(tmp_path, timm_folder, image_data):
    """A file the user named is replaced as before; a symlink is replaced itself, never its target."""
    bare = tmp_path / "bare.safetensors"
    shutil.copyfile(timm_folder / "model.safetensors", bare)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    code, _, err = run_cli("export", bare, "--arch", "test_resnet", "--format", "safetensors", "--out", out,
                            "--force", "-q")
    assert code == 0, err
    assert out.stat().st_size > 3
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, _, err = run_cli("export", timm_folder, "--format", "safetensors", "--out", link, "--force", "-q")
    assert code == 0, err
    assert not link.is_symlink() and (link / "model.safetensors").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


# ------------------------------------------------------------------ (e) the library
def test_atomic_output_refuses_a_users_folder(tmp_path):
    from repair.io import atomic_output

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine\n")
    with pytest.raises(BadInput, match="repair did not write") as e:
        with atomic_output(mine, force=True, is_dir=True) as staged:
            (staged / "x").write_text("new")
    assert e.value.path == str(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]


def test_library_rule_kinds(tmp_path, previous_fix):
    from repair.io import atomic_output, check_output, replace_refused

    ours = tmp_path / "ours"
    shutil.copytree(previous_fix, ours)
    assert replace_refused(ours) is None and replace_refused(ours, "folder") is None
    assert "is a folder" in replace_refused(ours, "file")
    f = tmp_path / "f"
    f.write_text("x")
    assert replace_refused(f) is None and "is a file" in replace_refused(f, "folder")
    with pytest.raises(BadInput, match="is a file"):
        check_output(f, force=True, kind="folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert replace_refused(empty, "file") is None
    # a folder whose model.safetensors is not safetensors at all, or has no provenance
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "repair did not write" in replace_refused(fake)
    with pytest.raises(BadInput, match="repair did not write"):
        check_output(fake, force=True)
    assert (fake / "model.safetensors").read_bytes() == b"\xff" * 64
    # the caller that verified ownership itself (the demo's marker check) says so
    with atomic_output(fake, force=True, is_dir=True, owned=True) as staged:
        (staged / "new").write_text("n")
    assert sorted(p.name for p in fake.iterdir()) == ["new"]
    # every folder written through the outputs carries the record of its files; the owned one does not
    assert not (fake / ".repair-output.json").exists()
    art = tmp_path / "x-artifacts"
    with atomic_output(art, is_dir=True) as staged:
        (staged / "images").mkdir()
        (staged / "images" / "a.png").write_bytes(b"png")
        (staged / "manifest.json").write_text("{}")
    assert replace_refused(art, "folder") is None
    (art / "images" / "b.png").write_bytes(b"mine")
    assert "images/b.png is not a file repair wrote" in replace_refused(art, "folder")
    (art / "images" / "b.png").unlink()
    (art / ".repair-output.json").write_text('{"written_by": "me"}')         # a record not repair's
    assert "repair did not write" in replace_refused(art, "folder")


# ------------------------------------------------------------------ the zoo: its own outputs, never a user's folder
def _zoo(tmp_path: Path, parts: Path) -> Path:
    import yaml

    for name in ("m0", "val"):
        shutil.copytree(parts / name, tmp_path / name)
    (tmp_path / "out").mkdir()
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "group_by": "place", "data": "val",
                                                 "output_dir": "out"},
                                    "models": [{"name": "a", "checkpoint": "m0"}]}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def zoo_parts(tmp_path_factory):
    from conftest import make_zoo_parts

    return make_zoo_parts(tmp_path_factory.mktemp("zoo-force"))


def test_zoo_force_refuses_a_users_folder_at_a_rows_output(tmp_path, zoo_parts):
    path = _zoo(tmp_path, zoo_parts)
    mine = tmp_path / "out" / "a"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine\n")
    code, _, err = run_cli("zoo", path, "--force", "-q")
    one_line_naming(code, err, path, str(mine), "repair did not write")
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]


def test_zoo_rerun_and_force_over_its_own_outputs(tmp_path, zoo_parts):
    """A zoo's own output: a rerun writes a lost weights file again (the journal vouches for the rest);
    a file the user put in it makes it the user's (refused with or without --force, kept); without it,
    --force replaces the output."""
    path = _zoo(tmp_path, zoo_parts)
    code, _, err = run_cli("zoo", path, "-q")
    assert code == 0, err
    weights = tmp_path / "out" / "a" / "model.safetensors"
    weights.unlink()
    code, _, err = run_cli("zoo", path, "-q")
    assert code == 0, err
    assert weights.is_file()
    notes = tmp_path / "out" / "a" / "notes.txt"
    notes.write_text("added\n")
    for force, says in (((), "holds a/notes.txt"), (("--force",), "notes.txt is not a file repair wrote")):
        code, _, err = run_cli("zoo", path, *force, "-q")         # a file of the user's in it: never replaced
        assert code == 2 and says in err, err
        assert notes.is_file() and weights.is_file()
    notes.unlink()
    code, _, err = run_cli("zoo", path, "--force", "-q")
    assert code == 0, err
    assert weights.is_file()


def test_an_output_that_appears_while_a_run_works_is_never_replaced_without_force(tmp_path):
    """Two runs writing one --out at once: each checked the path before its work, when it was free;
    the one that commits second found the other's output there and replaced it (exit 0 both, the first
    result lost). Now it is exit 2 naming the path, nothing of it written, the other's output intact;
    with --force it replaces what repair wrote, as ever."""
    from repair.io import atomic_output, rename_noreplace

    for is_dir in (True, False):
        final = tmp_path / ("folder" if is_dir else "file.json")
        with pytest.raises(BadInput, match="appeared while this run worked") as e:
            with atomic_output(final, is_dir=is_dir) as staged:
                (staged / "x").write_text("mine") if is_dir else staged.write_text("mine")
                if is_dir:                            # the other run commits first: its own output
                    final.mkdir()
                    (final / "theirs").write_text("theirs")
                else:
                    final.write_text("theirs")
        assert e.value.path == str(final)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []    # no temp left
        assert (final / "theirs").read_text() == "theirs" if is_dir else final.read_text() == "theirs"
    # an empty folder appearing: a plain rename would have taken its place silently
    empty = tmp_path / "empty"
    with pytest.raises(BadInput, match="appeared"):
        with atomic_output(empty, is_dir=True) as staged:
            (staged / "x").write_text("mine")
            empty.mkdir()
    assert list(empty.iterdir()) == []
    # --force: the file that appeared is replaced (a file where a file output goes)
    f = tmp_path / "forced.json"
    with atomic_output(f, force=True) as staged:
        staged.write_text("mine")
        f.write_text("theirs")
    assert f.read_text() == "mine"
    # the rename itself never replaces
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    assert b.read_text() == "b" and a.read_text() == "a"
    rename_noreplace(a, tmp_path / "c")
    assert (tmp_path / "c").read_text() == "a" and not a.exists()
