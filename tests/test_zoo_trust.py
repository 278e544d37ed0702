"""`repair zoo` trusts nothing it did not check: a journal line is reused only while the row's
inputs (checkpoint, data, eval data, recipe) and every file of its output are as they were; a
row's output never lands on the zoo's own files; a journal that is not one is refused untouched;
malformed manifests are exit 2, never an internal error."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import make_deployed_onnx, make_zoo_parts, run_cli, time_limit


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two tiny timm models and one small image set, copied per test (the tests change them)."""
    return make_zoo_parts(tmp_path_factory.mktemp("zoo-trust"), with_test=True)


def zoo(tmp_path: Path, parts: Path, rows: list[dict], **defaults) -> Path:
    """A manifest in ``tmp_path`` over copies of the models and the data (``m0``, ``m1``, ``val``, ``test``)."""
    for name in ("m0", "m1", "val", "test"):
        if not (tmp_path / name).exists():
            shutil.copytree(parts / name, tmp_path / name)
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "group_by": "place", "data": "val", **defaults},
                                    "models": rows}, sort_keys=False))
    return path


def run_json(*args) -> tuple[int, dict, str]:
    code, out, err = run_cli("zoo", *args, "--json", "-q")
    return code, (json.loads(out) if out.strip() else {}), err


def redone(doc: dict) -> dict:
    return {m["name"]: m.get("redone") for m in doc["models"] if m.get("redone")}


# ------------------------------------------------------------------ 1. resume is bound to the inputs' content
def _swap_checkpoint(t: Path) -> str:
    shutil.rmtree(t / "m0")
    shutil.copytree(t / "m1", t / "m0")                  # another model under the same name
    return "checkpoint"


def _relabel_groups(t: Path, data: str = "val") -> str:
    table = t / data / "metadata.csv"                    # same images, other group labels
    table.write_text(table.read_text().replace(",land", ",tmp").replace(",water", ",land").replace(",tmp", ",water"))
    return "data"


def _replace_an_image(t: Path) -> str:
    img = next((t / "val" / "cat").glob("*.png"))
    other = next((t / "val" / "dog").glob("*.png"))
    st = img.stat()
    shutil.copyfile(other, img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))    # the modification time set back, as cp -p does
    return "data"


@pytest.mark.parametrize("change", [_swap_checkpoint, _relabel_groups, _replace_an_image],
                         ids=["checkpoint", "group-labels", "image"])
def test_eval_mode_never_resumes_figures_of_changed_inputs(tmp_path, parts, change):
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}], gate=0)
    code, first, err = run_json(path, "--mode", "eval")
    assert code == 0, err
    code, again, err = run_json(path, "--mode", "eval")             # unchanged: resumed as it was
    assert code == 0 and again["models"][0]["resumed"] and not redone(again), err
    what = change(tmp_path)
    code, doc, err = run_json(path, "--mode", "eval")
    assert code == 0, err
    assert redone(doc) == {"a": f"its {what} changed since it was journaled"}, doc
    assert not doc["models"][0]["resumed"]
    if what == "checkpoint":                                        # figures of the model there now
        assert doc["models"][0]["result"]["before"] != first["models"][0]["result"]["before"]
    assert f"run again: its {what} changed" in (tmp_path / "zoo-zoo" / "zoo-report.html").read_text()


def test_fix_mode_reruns_a_row_whose_recipe_file_changed(tmp_path, parts):
    (tmp_path / "r.yaml").write_text("name: mine\ncandidates:\n  - method: afr\n")
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0", "recipe": "r.yaml"}], output_dir="out")
    (tmp_path / "out").mkdir()
    code, doc, err = run_json(path)
    assert code == 0 and doc["models"][0]["result"]["candidate"].startswith("afr"), err
    (tmp_path / "r.yaml").write_text("name: mine\ncandidates:\n  - method: neurontune\n")
    code, doc, err = run_json(path)
    assert code == 0, err
    assert redone(doc) == {"a": "its recipe changed since it was journaled"}
    assert doc["models"][0]["result"]["candidate"].startswith("neurontune")
    code, doc, err = run_json(path)                                 # and now it is resumed again
    assert code == 0 and doc["models"][0]["resumed"] and not redone(doc), err


def test_fix_mode_reruns_a_row_whose_eval_data_changed(tmp_path, parts):
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}], output_dir="out", eval="test")
    (tmp_path / "out").mkdir()
    assert run_json(path)[0] == 0
    _relabel_groups(tmp_path, "test")
    code, doc, err = run_json(path)
    assert code == 0 and redone(doc) == {"a": "its eval changed since it was journaled"}, (err, doc)


# ------------------------------------------------------------------ 2. every file of the output is checked
def test_fix_writes_a_lost_output_again_and_keeps_an_edited_one_unless_forced(tmp_path, parts):
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}], output_dir="out")
    (tmp_path / "out").mkdir()
    assert run_json(path)[0] == 0
    config = tmp_path / "out" / "a" / "config.json"
    written = config.read_text()
    config.unlink()                                                 # lost: written again as it was
    code, doc, err = run_json(path)
    assert code == 0 and redone(doc) == {"a": "its output file a/config.json is missing"}, (err, doc)
    assert config.read_text() == written
    shutil.rmtree(tmp_path / "out" / "a")
    code, doc, err = run_json(path)
    assert code == 0 and redone(doc) == {"a": "its output is missing"}, (err, doc)
    assert config.read_text() == written

    edited = written.replace('"num_classes": 3', '"num_classes": 4')
    notes = tmp_path / "out" / "a" / "notes.txt"
    edits = ((lambda: config.write_text(edited), "its output file a/config.json differs from what was written"),
             (lambda: notes.write_text("mine"), "its output holds a/notes.txt, which was not written with it"))
    for edit, why in edits:
        config.write_text(written)
        edit()
        before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "a").iterdir()}
        code, doc, err = run_cli("zoo", path, "--json", "-q")
        _refused(code, err, "row 1 (a), output", str(tmp_path / "out" / "a"), why, "--force")
        assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "a").iterdir()} == before   # kept as it is
        if notes.exists():                  # a file added: the user's; --force never replaces it
            code, doc, err = run_cli("zoo", path, "--json", "--force", "-q")
            _refused(code, err, "row 1 (a), output", "notes.txt is not a file repair wrote")
            assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "a").iterdir()} == before
            notes.unlink()
            code, doc, err = run_json(path, "--force")
            assert code == 0 and config.read_text() == written, (err, doc)
            continue
        code, doc, err = run_json(path, "--force")
        assert code == 0 and redone(doc) == {"a": why}, (err, doc)
        assert config.read_text() == written and not notes.exists()


def test_a_corrupted_onnx_output_is_refused_then_run_again_with_force_not_an_internal_error(tmp_path, parts):
    (tmp_path / "net").mkdir()
    make_deployed_onnx(tmp_path / "net" / "net.onnx")
    (tmp_path / "net" / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32]}))
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "net/net.onnx", "output": "out/a.onnx",
                                  "data": "val/by-index.csv"}])
    table = (tmp_path / "val" / "metadata.csv").read_text()            # an ONNX model's classes are 0, 1, 2
    (tmp_path / "val" / "by-index.csv").write_text(table.replace(",cat,", ",0,").replace(",dog,", ",1,")
                                                   .replace(",fox,", ",2,"))
    (tmp_path / "out").mkdir()
    assert run_json(path)[0] == 0
    out = tmp_path / "out" / "a.onnx"
    out.write_bytes(out.read_bytes()[:100])                         # truncated: no ONNX any more
    code, _, err = run_cli("zoo", path, "--json", "-q")
    _refused(code, err, "a.onnx differs from what was written", "--force")
    assert len(out.read_bytes()) == 100
    code, doc, err = run_json(path, "--force")
    assert code == 0 and redone(doc) == {"a": "its output file a.onnx differs from what was written"}, err
    assert len(out.read_bytes()) > 100


# ------------------------------------------------------------------ 3, 5. outputs apart from the zoo's files and inputs
def _refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err[:2000]
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err[:2000]


@pytest.mark.parametrize("case", ["output-is-the-journal", "out-dir-is-the-output", "out-dir-inside-the-output",
                                  "output-in-the-report-folder", "journal-inside-the-output"])
def test_a_row_output_never_lands_on_the_report_folder_or_the_journal(tmp_path, parts, case):
    (tmp_path / "outs").mkdir()
    name, extra = "a", []
    if case == "output-is-the-journal":                 # the audit's z-zoo/journal.jsonl row
        (tmp_path / "zoo-zoo").mkdir()
        name, output_dir = "journal.jsonl", "zoo-zoo"
    elif case == "output-in-the-report-folder":
        output_dir, extra = "outs", ["--out-dir", tmp_path / "outs"]
    else:
        output_dir = "outs"
        extra = {"out-dir-is-the-output": ["--out-dir", tmp_path / "outs" / "a"],
                 "out-dir-inside-the-output": ["--out-dir", tmp_path / "outs" / "a" / "r"],
                 "journal-inside-the-output": ["--journal", tmp_path / "outs" / "a" / "j.jsonl"]}[case]
        (tmp_path / "outs" / "a").mkdir()
        (tmp_path / "outs" / "a" / "keep.txt").write_text("mine")
    path = zoo(tmp_path, parts, [{"name": name, "checkpoint": "m0"}], output_dir=output_dir)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, _, err = run_cli("zoo", path, *extra, "--force")
    _refused(code, err, f"row 1 ({name}), output: ", "would write the same place")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before     # nothing ran


def test_a_staging_folder_is_never_an_input_or_another_rows_output(tmp_path, parts):
    (tmp_path / "outs").mkdir()
    zoo(tmp_path, parts, [])
    shutil.copytree(tmp_path / "m0", tmp_path / "outs" / ".a.zoo-staging")
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "outs/.a.zoo-staging", "output": "outs/a"}])
    _refused(*run_cli("zoo", path, "--force")[::2], "row 1 (a), output: ", "staging folder .a.zoo-staging",
             "checkpoint of row 1")
    assert (tmp_path / "outs" / ".a.zoo-staging" / "model.safetensors").is_file()   # the input is still there
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0", "output": "outs/x"},
                                 {"name": "b", "checkpoint": "m1", "output": "outs/.x.zoo-staging"}])
    _refused(*run_cli("zoo", path)[::2], "row 2 (b), output: ", "staging folder .x.zoo-staging",
             "would write the same place")
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0", "output": "outs/.x.zoo-staging"},
                                 {"name": "b", "checkpoint": "m1", "output": "outs/x"}])
    _refused(*run_cli("zoo", path)[::2], "row 1 (a), output: ", "a name starting with '.'")   # never an output


# ------------------------------------------------------------------ 4, 7. a journal that is not one
def _not_a_journal(case: str, j: Path) -> None:
    if case == "notes":
        j.write_text("line one of my notes\nimportant last line without newline")
    elif case == "folder":
        j.mkdir()
        (j / "x").write_text("x")
    elif case == "fifo":
        os.mkfifo(j)
    elif case == "not-utf8":
        j.write_bytes(b'{"name":"a","mode":"eval","key":"k","result":{"before":{}}}\n\xff\xfe\n')
    elif case == "no-result":
        j.write_text(json.dumps({"name": "a", "mode": "eval", "key": "k"}) + "\n")
    elif case == "null-result":
        j.write_text(json.dumps({"name": "a", "mode": "eval", "key": "k", "result": None}) + "\n")
    elif case == "torn-notes":
        j.write_text(json.dumps({"name": "a", "mode": "eval", "key": "k", "result": {"before": {}}}) + "\nmy notes")
    elif case == "one-json-line":        # json.dump writes no newline: the whole file was taken for a torn record
        j.write_text(json.dumps({"name": "exp-42", "lr": 0.1}))
    elif case == "huge-int":
        j.write_text('{"name": ' + "9" * 5000 + "}\n")


@pytest.mark.parametrize("case", ["notes", "folder", "fifo", "not-utf8", "no-result", "null-result", "torn-notes",
                                  "one-json-line", "huge-int"])
def test_a_journal_that_is_not_one_is_exit_2_and_left_as_it_was(tmp_path, parts, case):
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}], gate=0)
    j = tmp_path / "j.jsonl"
    _not_a_journal(case, j)
    was = j.read_bytes() if j.is_file() else None
    with time_limit(60):                                # a FIFO is never opened (it would block)
        code, _, err = run_cli("zoo", path, "--mode", "eval", "--journal", j, "--out-dir", tmp_path / "r")
    _refused(code, err, str(j))
    assert not (tmp_path / "r").exists()                # the new report folder is not left behind
    if was is not None:
        assert j.read_bytes() == was


def test_a_journal_entry_of_the_default_journal_that_is_a_folder_is_exit_2(tmp_path, parts):
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}])
    (tmp_path / "zoo-zoo" / "journal.jsonl").mkdir(parents=True)
    _refused(*run_cli("zoo", path, "--mode", "eval")[::2], "journal.jsonl", "folder")


# ------------------------------------------------------------------ 6. malformed manifests: exit 2, not 3
@pytest.mark.parametrize("case", ["int-key", "defaults-int-key", "huge-int", "nul-in-path", "nul-in-output",
                                  "list-output", "duplicate-key", "csv-huge-field", "csv-duplicate-column"])
def test_malformed_manifest_values_are_exit_2(tmp_path, parts, case):
    zoo(tmp_path, parts, [])
    (tmp_path / "outs").mkdir()
    path = tmp_path / "z.yaml"
    row = f"{{name: a, checkpoint: {tmp_path / 'm0'}, data: {tmp_path / 'val'}"
    text = {"int-key": f"models:\n  - {row}, 1: x, foo: y}}\n",
            "defaults-int-key": f"defaults: {{2: x, foo: y}}\nmodels:\n  - {row}}}\n",
            "huge-int": f"models:\n  - {row}, seed: 1{'0' * 5000}}}\n",
            "nul-in-path": 'models:\n  - {name: a, checkpoint: "m\\0b", data: val}\n',
            "nul-in-output": f'models:\n  - {row}, output: "outs/a\\0b"}}\n',
            "list-output": f"models:\n  - {row}, output: [x]}}\n",
            "duplicate-key": f"models:\n  - {row}, seed: 1, seed: 2}}\n"}.get(case)
    if case == "csv-huge-field":
        path = tmp_path / "z.csv"
        text = f"name,checkpoint,data\na,{tmp_path / 'm0'},{'v' * 140_000}\n"
    elif case == "csv-duplicate-column":
        path = tmp_path / "z.csv"
        text = f"name,checkpoint,checkpoint,data\na,{tmp_path / 'm0'},{tmp_path / 'm1'},{tmp_path / 'val'}\n"
    path.write_text(text)
    code, _, err = run_cli("zoo", path, "--out-dir", tmp_path / "r")
    _refused(code, err, str(path))
    assert not (tmp_path / "r").exists() and not any((tmp_path / "outs").iterdir())


# ------------------------------------------------------------------ 9. Ray options
@pytest.mark.parametrize("option", [["--workers", "2"], ["--gpus-per-model", "1"]])
def test_ray_options_without_ray_are_exit_2(tmp_path, parts, option):
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}])
    _refused(*run_cli("zoo", path, "--mode", "eval", *option)[::2], f"{option[0]} needs --ray")
    assert not (tmp_path / "zoo-zoo").exists()


def test_an_address_where_no_ray_answers_is_exit_2_quickly(tmp_path, parts, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e \".[zoo]\")")
    import socket

    with socket.socket() as s:                          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}])
    with time_limit(120):
        code, _, err = run_cli("zoo", path, "--mode", "eval", "--ray", f"127.0.0.1:{port}")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and f"127.0.0.1:{port}" in last and "nothing answers" in last, err
    assert not (tmp_path / "zoo-zoo").exists()


# ------------------------------------------------------------------ 8. bad model folders: before any work
def test_a_symlink_leaving_a_model_folder_is_exit_2_before_any_model_runs(tmp_path, parts):
    (tmp_path / "outs").mkdir()
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}, {"name": "b", "checkpoint": "m1"}],
               output_dir="outs")
    (tmp_path / "secret.txt").write_text("secret")
    (tmp_path / "m1" / "notes.txt").symlink_to(tmp_path / "secret.txt")
    code, _, err = run_cli("zoo", path)
    _refused(code, err, "row 2 (b), checkpoint: ", "notes.txt", "leads outside it")
    assert not any((tmp_path / "outs").iterdir())       # row a did not run first


def test_two_manifests_of_one_stem_never_share_a_report_folder(tmp_path, parts):
    """``zoo.yaml`` and ``zoo.csv`` side by side both default to ``zoo-zoo``: the second is refused
    (naming the first) before it touches the first's journal or report."""
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}], gate=0)
    code, _, err = run_json(path, "--mode", "eval")
    assert code == 0, err
    folder = tmp_path / "zoo-zoo"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".zoo-lock"}
    other = tmp_path / "zoo.csv"
    other.write_text("# recipe: dfr\n# group_by: place\nname,checkpoint,data\nb,m1,val\n")
    code, _, err = run_cli("zoo", other, "--mode", "eval", "-q")
    _refused(code, err, "journal.jsonl", "another manifest, zoo.yaml", "give zoo.csv its own --out-dir")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".zoo-lock"} == before
    code, doc, err = run_json(other, "--mode", "eval", "--out-dir", tmp_path / "csv-zoo")
    assert code == 0 and [m["name"] for m in doc["models"]] == ["b"], err


# ------------------------------------------------------------------ found by an audit
def test_every_place_a_rows_commit_writes_is_checked_before_any_work(tmp_path, parts):
    """The ONNX file `export: onnx` writes beside a file output was checked against nothing: it
    replaced another row's checkpoint, another row's output, the journal or the report folder."""
    shutil.copytree(parts / "m0", tmp_path / "m0")
    (tmp_path / "outs").mkdir()
    (tmp_path / "outs2").mkdir()
    make_deployed_onnx(tmp_path / "outs" / "a.onnx")
    before = (tmp_path / "outs" / "a.onnx").read_bytes()
    row_a = {"name": "a", "checkpoint": "m0/model.safetensors", "export": "onnx", "output_dir": "outs"}
    cases = [([row_a, {"name": "b", "checkpoint": "outs/a.onnx", "output": "b.onnx"}], (),
              "row 1 (a), output: its ONNX export would overwrite the checkpoint of row 2"),
             ([row_a, {"name": "b", "checkpoint": "m0", "output": "outs/a.onnx", "data": "val"}], (),
              "row 2 (b), output: "),
             ([{**row_a, "output_dir": "outs2"}], ("--journal", tmp_path / "outs2" / "a.onnx"),
              "its ONNX export and --journal"),
             ([{**row_a, "output_dir": "outs2"}], ("--out-dir", tmp_path / "outs2" / "a.onnx"),
              "its ONNX export and --out-dir"),
             ([{"name": "a", "checkpoint": "m0", "output": "outs/.hidden"}], (), "a name starting with '.'")]
    for rows, extra, words in cases:
        path = zoo(tmp_path, parts, rows)
        code, _, err = run_cli("zoo", path, *extra, "-q")
        _refused(code, err, words)
        assert (tmp_path / "outs" / "a.onnx").read_bytes() == before
        assert sorted(p.name for p in (tmp_path / "outs").iterdir()) == ["a.onnx"]
        assert not list((tmp_path / "outs2").iterdir())
        assert not (tmp_path / "zoo-zoo").exists()
    code, _, err = run_cli("zoo", zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}]), "--out-dir",
                           tmp_path / "r", "--journal", tmp_path / "r" / "zoo-report.json", "-q")
    _refused(code, err, "--journal and the report's JSON")


def test_a_journal_line_edited_into_other_types_is_not_a_record(tmp_path, parts):
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}], gate=0)
    assert run_json(path, "--mode", "eval")[0] == 0
    journal = tmp_path / "zoo-zoo" / "journal.jsonl"
    rec = json.loads(journal.read_text())
    for edit in ({"accuracy": "x"}, {"per_group": 5}):
        journal.write_text(json.dumps({**rec, "result": {**rec["result"], "before": {**rec["result"]["before"],
                                                                                      **edit}}}) + "\n")
        code, _, err = run_cli("zoo", path, "--mode", "eval", "-q")
        _refused(code, err, "journal.jsonl", "line 1 is not a journal record")


def test_a_csv_comment_that_reads_like_a_setting_is_a_comment_and_a_long_name_names_its_row(tmp_path, parts):
    zoo(tmp_path, parts, [])
    (tmp_path / "z.csv").write_text("# Note: this zoo is for birds\n# recipe: dfr\nname,checkpoint,data,group_by\n"
                                    "a,m0,val,place\n")
    code, doc, err = run_json(tmp_path / "z.csv", "--mode", "eval")
    assert code == 0 and doc["models"][0]["name"] == "a", err
    (tmp_path / "outs").mkdir()
    (tmp_path / "long.csv").write_text("# output_dir: outs\nname,checkpoint,data\n" + "n" * 300 + ",m0,val\n")
    code, _, err = run_cli("zoo", tmp_path / "long.csv", "-q")
    _refused(code, err, "row 1 (" + "n" * 300 + "), output")


def test_a_folder_where_a_model_repair_puts_its_files_is_never_replaced_unasked(tmp_path, parts):
    """A model repair of a file checkpoint writes its files to <output stem>-artifacts beside the
    output. A zoo staged them and moved them into place without checking that folder: a folder of the
    user's of that name was replaced and deleted without --force, and another row's output there was
    not a clash. Now it is one of the places every row's checks cover -- for a recipe with a model repair
    (a head-only recipe writes no such folder: tests/test_gate_home.py)."""
    shutil.copytree(parts / "m0", tmp_path / "m0")
    (tmp_path / "outs").mkdir()
    mine = tmp_path / "outs" / "a-artifacts"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    row_a = {"name": "a", "checkpoint": "m0/model.safetensors", "output_dir": "outs", "recipe": "mixft"}
    path = zoo(tmp_path, parts, [row_a])
    code, _, err = run_cli("zoo", path, "-q")
    _refused(code, err, f"{mine} already exists")
    assert (mine / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in (tmp_path / "outs").iterdir()) == ["a-artifacts"]
    shutil.rmtree(mine)
    # another row's output where row a's model repair would put its files
    path = zoo(tmp_path, parts, [row_a, {"name": "b", "checkpoint": "m0", "output": "outs/a-artifacts"}])
    code, _, err = run_cli("zoo", path, "-q")
    _refused(code, err, "row 2 (b), output: ")
    assert not list((tmp_path / "outs").iterdir())


def test_a_second_zoo_writing_the_same_rows_outputs_is_exit_2_before_any_work(tmp_path, parts):
    """Two drivers on one manifest with their own --out-dir share the rows' outputs and their staging
    folders (fixed names, so that a rerun completes a rename): the second removed and committed the
    first one's staged files (a model folder without its weights, reported done with exit 0). The folder
    the outputs go in is locked like the report folder: the second driver is exit 2 naming it."""
    from repair.zoo import _hold_outputs_lock

    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0"}], output_dir="out")
    (tmp_path / "out").mkdir()
    held = _hold_outputs_lock(tmp_path / "out")             # as a first driver holds it, in this process
    try:
        code, doc, err = run_json(path, "--out-dir", tmp_path / "other")
        _refused(code, err, str(tmp_path / "out"), "another repair zoo is writing models' outputs")
        assert not (tmp_path / "out" / "a").exists() and not (tmp_path / "other").exists()
        assert not list((tmp_path / "out").iterdir())                     # no lock file left in it
    finally:
        os.close(held)
    code, doc, err = run_json(path, "--out-dir", tmp_path / "other")        # released: it runs
    assert code == 0 and (tmp_path / "out" / "a" / "model.safetensors").exists(), err


# ------------------------------------------------------------------ found by an audit: refusals while working, links
REPORT = "zoo-report.html"


def journal_names(path: Path) -> list[str]:
    return [json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("report_folder", ["new", "there"])
def test_an_output_refused_while_the_zoo_works_is_that_rows_error_and_the_others_finish(tmp_path, parts, monkeypatch,
                                                                                         report_folder):
    """A folder of the user's that appears at a later row's output while the zoo works refused that
    row's commit with a BadInput that reached the handler meant for "refused before any work": on a
    first run the report folder (journal and report) was deleted, the committed outputs orphaned (a
    rerun refused them as not this zoo's), a staging folder left and the rows after it never run; with
    the report folder there, the run stopped and reported the rest as pending. Now that row is its own
    error (exit 2 after the others ran, the report says why), its staged files are discarded, the
    others finish, and a rerun resumes them."""
    import repair.zoo as zoo_mod

    rows = [{"name": "a", "checkpoint": "m0"}, {"name": "b", "checkpoint": "m1"},
            {"name": "c", "checkpoint": "m0", "seed": 1}, {"name": "d", "checkpoint": "m1", "seed": 1}]
    path = zoo(tmp_path, parts, rows, eval="test", eval_group_by="place", output_dir="out", gate="10%")
    out, folder = tmp_path / "out", tmp_path / "zoo-zoo"
    out.mkdir()
    if report_folder == "there":
        folder.mkdir()
    commit = zoo_mod.commit_staged

    def commit_then_a_folder_of_the_users_appears(output, *args, **kwargs):
        commit(output, *args, **kwargs)
        if Path(output).name == "a":                   # once row a is in place, before row c finishes
            (out / "c").mkdir()
            (out / "c" / "notes.txt").write_text("mine")

    monkeypatch.setattr(zoo_mod, "commit_staged", commit_then_a_folder_of_the_users_appears)
    code, _, err = run_json(path)
    assert code == 2, err
    assert "1 model(s) could not be run: c (exit 2)" in err, err
    doc = json.loads((folder / "zoo-report.json").read_text())
    assert (folder / REPORT).is_file() and journal_names(folder / "journal.jsonl") == ["a", "b", "d"]
    by = {m["name"]: m for m in doc["models"]}
    assert {n: m["status"] for n, m in by.items()} == {"a": "done", "b": "done", "c": "error", "d": "done"}, doc
    assert by["c"]["exit_code"] == 2 and str(out / "c") in by["c"]["error"], by["c"]
    assert doc["interrupted"] is False and doc["summary"]["errors"] == ["c"] and not doc["summary"]["pending"]
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c", "d"]      # no staging folder left
    assert [p.name for p in (out / "c").iterdir()] == ["notes.txt"] and (out / "c" / "notes.txt").read_text() == "mine"
    for n in "abd":
        assert (out / n / "model.safetensors").is_file()
    monkeypatch.setattr(zoo_mod, "commit_staged", commit)
    # a rerun: the user's folder is still refused (by name, before any work), the zoo's own outputs are not
    code, _, err = run_cli("zoo", path, "-q")
    _refused(code, err, "row 3 (c), output: ", str(out / "c"), "already exists")
    assert "row 1" not in err and "(and " not in err
    assert journal_names(folder / "journal.jsonl") == ["a", "b", "d"] and (folder / REPORT).is_file()
    shutil.rmtree(out / "c")                           # moved out of the way: the rerun resumes a, b, d and runs c
    code, doc, err = run_json(path)
    assert code == 0, err
    assert {m["name"]: (m["status"], m.get("resumed")) for m in doc["models"]} == {
        "a": ("done", True), "b": ("done", True), "c": ("done", False), "d": ("done", True)}, doc
    assert (out / "c" / "model.safetensors").is_file() and sorted(p.name for p in out.iterdir()) == ["a", "b", "c", "d"]


def test_a_row_output_that_is_a_symlink_is_an_existing_output_never_written_through(tmp_path, parts):
    """A row's output that is a symlink was resolved before any check and the model written into the
    link's target (exit 0). It is an existing output, as for `repair fix --out`: exit 2 naming the path
    the manifest gave unless --force, which replaces the link and never writes into its target."""
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "m0", "output": "out/x"}])
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "out" / "x"
    link.symlink_to("../elsewhere/x")                  # a link to nothing yet
    code, _, err = run_cli("zoo", path, "-q")
    _refused(code, err, f"row 1 (a), output: {link} already exists", "--force")
    assert link.is_symlink() and not list((tmp_path / "elsewhere").iterdir())
    assert not (tmp_path / "zoo-zoo").exists()
    (tmp_path / "elsewhere" / "x").mkdir()             # a link to a folder of the user's: the same
    (tmp_path / "elsewhere" / "x" / "notes.txt").write_text("mine")
    code, _, err = run_cli("zoo", path, "-q")
    _refused(code, err, f"row 1 (a), output: {link} already exists", "--force")
    code, doc, err = run_json(path, "--force")         # --force replaces the link, never its target
    assert code == 0, err
    assert not link.is_symlink() and (link / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "elsewhere" / "x").iterdir()] == ["notes.txt"]
    assert doc["models"][0]["result"]["output"] == str(link)            # the path the manifest gave
    assert json.loads((tmp_path / "zoo-zoo" / "journal.jsonl").read_text())["output"] == str(link)


def test_a_manifest_given_through_a_symlink_reads_and_reports_beside_the_link(tmp_path, parts):
    """A manifest given through a symlink had its default report folder, and its rows' relative paths,
    taken from the link target's folder; README says "beside the manifest": the folder of the path
    given, for both."""
    from repair.zoo import load_manifest

    user, shared = tmp_path / "user", tmp_path / "shared"
    user.mkdir()
    shared.mkdir()
    path = zoo(user, parts, [{"name": "a", "checkpoint": str(user / "m0")}], gate=0, data=str(user / "val"))
    os.replace(path, shared / "zoo.yaml")
    path.symlink_to(shared / "zoo.yaml")
    code, doc, err = run_json(path, "--mode", "eval")
    assert code == 0, err
    assert Path(doc["report"]) == user / "zoo-zoo" / REPORT and (user / "zoo-zoo" / REPORT).is_file()
    assert not (shared / "zoo-zoo").exists()
    # relative paths: from the link's folder too (a checkpoint of that name beside the target is not read)
    path.unlink()
    zoo(user, parts, [{"name": "a", "checkpoint": "m0"}], gate=0)
    os.replace(path, shared / "zoo.yaml")
    path.symlink_to(shared / "zoo.yaml")
    shutil.copytree(user / "m1", shared / "m0")
    entry = load_manifest(path, "eval").entries[0]
    assert entry.checkpoint == user / "m0" and entry.data == user / "val"
    code, doc, err = run_json(path, "--mode", "eval")
    assert code == 0 and doc["models"][0]["resumed"], err          # the same model as above: resumed


def _external_onnx(folder: Path, seed: int, location: str) -> Path:
    import onnx
    from conftest import make_deployed_onnx

    folder.mkdir(parents=True, exist_ok=True)
    first, _ = make_deployed_onnx(folder / f"first{seed}.onnx", seed=seed)
    proto = onnx.load(str(first))
    proto.metadata_props.add(key="class_names", value=json.dumps(["cat", "dog", "fox"]))
    out = folder / "m.onnx"
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    first.unlink()
    (folder / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3,
                                                        "std": [0.25] * 3}))
    return out


@pytest.mark.parametrize("location", ["weights.bin", "sub/w.data"])
def test_a_checkpoint_files_external_weights_changed_since_it_was_journaled_run_again(tmp_path, parts, location):
    """Found by an audit: a checkpoint given as a file was fingerprinted with its siblings of a few
    suffixes only (.json, .txt, .model), so an ONNX file whose weights sit beside it (weights.bin, or in a
    subfolder) was resumed with the old weights' figures after the weights changed: a gate passed on a
    model that no longer scores so. Every file beside it counts, and those its graph names elsewhere."""
    import onnx  # noqa: F401  (the helper needs it)

    other = _external_onnx(tmp_path / "build7", 7, location)
    model = _external_onnx(tmp_path / "model", 3, location)
    assert other.read_bytes() == model.read_bytes()              # only the weights differ
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "model/m.onnx"}], gate=0)
    code, first, err = run_json(path, "--mode", "eval")
    assert code == 0, err
    code, again, err = run_json(path, "--mode", "eval")
    assert code == 0 and again["models"][0]["resumed"], err
    shutil.copyfile(tmp_path / "build7" / location, tmp_path / "model" / location)
    code, doc, err = run_json(path, "--mode", "eval")
    assert code == 0 and redone(doc) == {"a": "its checkpoint changed since it was journaled"}, (err, doc)
    assert doc["models"][0]["result"]["before"] != first["models"][0]["result"]["before"]


def test_a_rows_output_beside_its_checkpoint_file_does_not_make_it_run_again(tmp_path, parts):
    """Every file beside a checkpoint file counts for the resume but the places the zoo writes: a row
    whose output sits beside its ONNX checkpoint is resumed, not run again because of its own output."""
    _external_onnx(tmp_path / "model", 3, "weights.bin")
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "model/m.onnx", "output": "model/m-fixed.onnx"}])
    code, doc, err = run_json(path)
    assert code == 0 and (tmp_path / "model" / "m-fixed.onnx").is_file(), err
    code, doc, err = run_json(path)
    assert code == 0 and doc["models"][0]["resumed"] and not redone(doc), (err, doc)


def test_the_progress_line_never_rounds_a_figure_with_errors_to_100_percent():
    """Found by an audit: the zoo's progress line had its own one-decimal formatter (2499/2500 showed as
    'accuracy 100.0%' beside 'gate FAIL (accuracy 99.96% < 100%)'); it uses repair.display.percent."""
    from repair.zoo import _progress_line

    line = _progress_line({"before": {"accuracy": 2499 / 2500, "worst_class_accuracy": 0.0,
                                      "per_class": [{"name": "cat", "n": 2499, "accuracy": 1.0},
                                                    {"name": "dog", "n": 1, "accuracy": 0.0}]}}, None)
    assert "accuracy 99.96%" in line and "100.0%" not in line, line


def test_a_file_checkpoints_resume_ignores_files_beside_it_no_loader_reads(tmp_path, parts):
    """Found by a review: fingerprinting every file beside a checkpoint file made a row run again after
    any change in its folder -- a row added to the manifest beside it, a comment, another model dropped
    there. Only the files a loader may read with it count (and its external weights)."""
    _external_onnx(tmp_path / "model", 3, "weights.bin")
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "model/m.onnx"}], gate=0)
    manifest = tmp_path / "model" / "zoo.yaml"
    manifest.write_text(path.read_text().replace("model/m.onnx", "m.onnx").replace("data: val", "data: ../val"))
    assert run_json(manifest, "--mode", "eval")[0] == 0
    manifest.write_text("# reviewed\n" + manifest.read_text())
    shutil.copyfile(tmp_path / "model" / "m.onnx", tmp_path / "model" / "other.onnx")
    code, doc, err = run_json(manifest, "--mode", "eval")
    assert code == 0 and doc["models"][0]["resumed"] and not redone(doc), (err, doc)
    (tmp_path / "model" / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.4] * 3,
                                                                      "std": [0.25] * 3}))
    code, doc, err = run_json(manifest, "--mode", "eval")            # what the loader reads: run again
    assert code == 0 and redone(doc) == {"a": "its checkpoint changed since it was journaled"}, (err, doc)


def test_a_large_onnx_checkpoint_is_not_parsed_on_resume_and_every_file_beside_it_counts(tmp_path, parts,
                                                                                          monkeypatch):
    """The resume check parsed every ONNX checkpoint to find its external data, reading a large file whole
    on every zoo run. Above a size it is not parsed: every file beside it counts (a change there runs the
    row again, never the other way round)."""
    import repair.zoo as zoo_mod

    _external_onnx(tmp_path / "model", 3, "weights.bin")
    _external_onnx(tmp_path / "build7", 7, "weights.bin")
    monkeypatch.setattr(zoo_mod, "_PARSE_ONNX_BYTES", 0)
    monkeypatch.setattr("onnx.load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("parsed")), raising=True)
    assert zoo_mod._external_data(tmp_path / "model" / "m.onnx") == sorted(
        f for f in (tmp_path / "model").iterdir() if f.is_file())
    monkeypatch.undo()
    monkeypatch.setattr(zoo_mod, "_PARSE_ONNX_BYTES", 0)
    path = zoo(tmp_path, parts, [{"name": "a", "checkpoint": "model/m.onnx"}], gate=0)
    assert run_json(path, "--mode", "eval")[0] == 0
    shutil.copyfile(tmp_path / "build7" / "weights.bin", tmp_path / "model" / "weights.bin")
    code, doc, err = run_json(path, "--mode", "eval")
    assert code == 0 and redone(doc) == {"a": "its checkpoint changed since it was journaled"}, (err, doc)
