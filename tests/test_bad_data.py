"""Malformed data, recipes and demo options are exit 2 with one line naming the file or option,
never exit 3, and leave nothing behind (one test per defect fixed)."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, time_limit
from repair_cli.options import Seed


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Usage:" not in err and "╭" not in err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def refused(*args, words=()) -> str:
    """``repair ARGS`` (``-q`` but for demo, which has none): exit 2 with one error line holding every
    one of ``words``."""
    with time_limit(120):
        code, out, err = run_cli(*args, *(() if args[0] == "demo" else ("-q",)))
    assert code == 2, (code, out, err)
    line = one_error_line(err)
    for w in words:
        assert str(w) in line, (w, line)
    return line


def image_copy(src: Path, dst: Path, metadata: bool = True) -> Path:
    shutil.copytree(src, dst)
    if not metadata:
        (dst / "metadata.csv").unlink()
    return dst


def set_label(d: Path, row: int, label: str) -> None:
    rows = list(csv.DictReader(open(d / "metadata.csv", newline="", encoding="utf-8")))
    rows[row]["y"] = label
    with open(d / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(rows)


# 1 -------------------------------------------------------------------------------------------------
def test_a_field_over_128_kib_is_read_and_a_malformed_csv_names_the_file_and_row(tmp_path, bert_folder):
    big = tmp_path / "big.csv"
    long_text = " ".join(["great movie"] * 20_000)                     # ~234 KiB in one field
    big.write_text("text,label\n" + f"{long_text},positive\nawful plot,negative\n", encoding="utf-8")
    with time_limit(120):
        code, out, err = run_cli("eval", bert_folder, "--data", big, "--json", "-q")
    assert code == 0, (code, err)
    assert "internal error" not in err

    cr = tmp_path / "cr.csv"                                         # a bare CR inside an unquoted field
    cr.write_bytes(b"text,label\r\ngood,positive\r\nthe\rplot,negative\r\n")
    refused("eval", bert_folder, "--data", cr, words=(str(cr), "malformed CSV", "row 2"))


# 2 -------------------------------------------------------------------------------------------------
# found by an audit: "01" named class 1, while cell_value keeps "01" apart from "1" (a code, not a number)
@pytest.mark.parametrize("label", ["²", "١", "01", "00"])      # str.isdigit() holds; int() fails / reads it as 1
def test_a_label_of_unicode_digits_is_not_a_class_index(tmp_path, image_data, timm_folder, label):
    d = image_copy(image_data, tmp_path / "d")
    set_label(d, 0, label)
    refused("eval", timm_folder, "--data", d, words=("metadata.csv", f"label {label!r} is not a class"))


# 3 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [False, True])
def test_an_image_name_that_is_not_utf8_is_read(tmp_path, image_data, timm_folder, cache):
    d = image_copy(image_data, tmp_path / "d", metadata=False)      # class folders, no table
    odd = os.path.join(os.fsencode(d / "cat"), b"\xff.png")
    try:
        shutil.copyfile(os.fsencode(d / "cat" / "000.png"), odd)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    args = ["eval", timm_folder, "--data", d, "--json", "-q"] + ([] if cache else ["--no-cache"])
    with time_limit(120):
        code, out, err = run_cli(*args)
    assert code == 0, (code, err)
    assert json.loads(out)["n"] == 19                     # the 18 images and the one with the odd name


def test_a_jsonl_text_with_an_unpaired_surrogate_is_refused_naming_the_line(tmp_path, bert_folder):
    t = tmp_path / "t.jsonl"                    # valid JSON, but "\ud800" decodes to no UTF-8 text
    t.write_text('{"text": "good", "label": "positive"}\n{"text": "bad \\ud800", "label": "negative"}\n',
                 encoding="utf-8")
    refused("eval", bert_folder, "--data", t, words=(str(t), "line 2", "'text'", "surrogate"))


# 4 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", ["params: {c_grid: [.inf]}", "params: {c_grid: [1.0e+308]}",
                                    "grid: {c_grid: [[1.0], [.inf]]}", "params: {tol: 1.0e+300}"])
def test_an_infinite_or_absurd_setting_is_refused_before_the_model_loads(tmp_path, image_data, timm_folder,
                                                                         params):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"candidates:\n  - method: dfr\n    {params}\n", encoding="utf-8")
    key = params.split("{")[1].split(":")[0]
    with time_limit(120):
        code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", recipe,
                                 "--out", tmp_path / "out")                  # progress on: nothing loaded
    assert code == 2, (code, err)
    line = one_error_line(err)
    assert str(recipe) in line and f"setting {key!r}" in line, line
    assert not (tmp_path / "out").exists()


# 5 -------------------------------------------------------------------------------------------------
def _nothing_beside(folder: Path, name: str) -> None:
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("case", ["out_is_a_file", "out_not_writable", "unknown_recipe", "negative_seed",
                                  "force_over_a_folder_that_is_not_a_demo"])
def test_demo_options_and_output_are_checked_before_any_work(tmp_path, case):
    out = tmp_path / "demo"
    args, words = ["demo", "--size", "tiny", "--out", out], ()
    if case == "out_is_a_file":
        out.write_text("mine")
        words = (str(out), "--out", "not a folder")
    elif case == "out_not_writable":
        if not Path("/proc").is_dir():
            pytest.skip("no /proc")
        out = Path("/proc/demo")
        args[-1], words = out, ("/proc", "--out", "cannot write")
    elif case == "unknown_recipe":
        args += ["--recipe", "dfrr"]
        words = ("unknown recipe 'dfrr'",)
    elif case == "negative_seed":
        args += ["--seed", "-1"]
        words = ("--seed",)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        args += ["--force"]
        words = (str(out), "--out", "notes.txt")
    with time_limit(60):                                  # no image is drawn, no model trained (a demo trains for minutes)
        refused(*args, words=words)
    if case == "out_is_a_file":
        assert out.read_text() == "mine"
    elif case == "force_over_a_folder_that_is_not_a_demo":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    elif case != "out_not_writable":
        _nothing_beside(tmp_path, "demo")


def test_a_demo_that_fails_after_the_build_leaves_nothing_and_blocks_no_rerun(tmp_path, monkeypatch):
    import repair.demo
    import repair.pipeline

    # a fresh (untrained) model instead of seconds of ERM training; the repair step interrupted
    monkeypatch.setattr(repair.demo, "train_erm",
                        lambda images, y, spec, seed, progress, model_args=None: repair.demo.create_model(model_args).eval())

    def interrupted(*a, **k):
        assert (Path(str(a[0])).parent / "data" / "val" / "metadata.csv").is_file()   # the demo was built
        raise KeyboardInterrupt

    monkeypatch.setattr(repair.pipeline, "fix_model", interrupted)
    with time_limit(60):
        code, out, err = run_cli("demo", "--size", "tiny", "--out", tmp_path / "demo")
    assert code == 130, (code, err)
    _nothing_beside(tmp_path, "demo")                    # nothing half-built to block the next run


# 6 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [str(2 ** 64), str(2 ** 32)])
def test_a_seed_too_large_for_the_generators_is_refused_at_once(tmp_path, seed):
    with time_limit(60):
        line = refused("demo", "--size", "tiny", "--out", tmp_path / "demo", "--seed", seed, words=("--seed",))   # at parse time
    assert "4294967295" in line
    _nothing_beside(tmp_path, "demo")
    # the shared option refuses it when the command line is parsed
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.command()
    def main(seed: Seed = 0):
        print(f"seed={seed}")

    assert CliRunner().invoke(app, ["--seed", "4294967295"]).exit_code == 0
    assert CliRunner().invoke(app, ["--seed", seed]).exit_code == 2


# 7 -------------------------------------------------------------------------------------------------
def test_messages_say_what_is_wrong(tmp_path, image_data, timm_folder):
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.csv", "b.csv"):
        (two / name).write_text("text,label\ngood,positive\n", encoding="utf-8")
    line = refused("eval", timm_folder, "--data", two, words=("a.csv", "b.csv", "--data"))
    assert "empty" not in line

    d = image_copy(image_data, tmp_path / "folder-row")
    (d / "metadata.csv").write_text("img_filename,y,place\ncat/000.png,cat,land\ncat,cat,land\n", encoding="utf-8")
    line = refused("eval", timm_folder, "--data", d, words=("metadata.csv", "row 2", "'cat'", "is a folder"))
    assert "FIFO" not in line

    q = tmp_path / "quote.csv"
    q.write_text('text,label\ngood,positive\n"bad,negative\nfine,positive\n', encoding="utf-8")
    line = refused("eval", timm_folder, "--data", q, words=(str(q), "unterminated quote", "row 2"))
    assert "empty label" not in line


def test_fix_and_zoo_refuse_a_seed_the_generators_cannot_take(tmp_path, timm_folder, image_data):
    """`repair fix --seed 2**64` is a usage error when the command line is parsed (it was exit 3 after
    the work), and a manifest's seed above the bound is exit 2 naming the row."""
    import yaml

    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--seed", str(2 ** 64),
                           "--out", tmp_path / "o", "-q")
    assert code == 2 and "--seed" in err and not (tmp_path / "o").exists(), err
    (tmp_path / "z.yaml").write_text(yaml.safe_dump({"models": [{"name": "m", "checkpoint": str(timm_folder),
                                                                 "data": str(image_data), "seed": 2 ** 40}]}))
    code, _, err = run_cli("zoo", tmp_path / "z.yaml", "--mode", "eval", "-q")
    assert code == 2 and "seed" in err and "4294967295" in err, err


def test_a_malformed_prompts_file_is_refused_before_any_work(tmp_path, timm_folder, image_data, monkeypatch):
    """``--prompts`` (recompose) that is not valid YAML, or holds an unknown key, is exit 2 naming it when
    the command starts (it was found only after the repair set was embedded and a fold trained)."""
    import repair.pipeline as pipeline

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before --prompts was checked")

    monkeypatch.setattr(pipeline, "load_model", no_work)
    for text, words in (("a: [", "not valid YAML"), ("colour: red\n", "unknown key 'colour'")):
        bad = tmp_path / "prompts.yaml"
        bad.write_text(text)
        refused("fix", timm_folder, "--data", image_data, "--recipe", "recompose", "--prompts", bad,
                "--out", tmp_path / "o", words=(str(bad), words))


def test_a_group_column_of_unique_values_says_what_group_by_is_for(tmp_path, timm_folder, image_data):
    """--group-by naming a column with a value per sample: exit 2 saying how many class x value groups
    are empty and that --group-by names an attribute many samples share (it named one empty group)."""
    d = image_copy(image_data, tmp_path / "d")
    rows = list(csv.DictReader(open(d / "metadata.csv", newline="", encoding="utf-8")))
    with open(d / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place", "uniq"])
        w.writeheader()
        w.writerows({**r, "uniq": f"u{i}"} for i, r in enumerate(rows))
    refused("fix", timm_folder, "--data", d, "--group-by", "uniq", "--recipe", "dfr", "--out", tmp_path / "o",
            words=("class x uniq groups have none", f"has {len(rows)} values for {len(rows)} samples"))


def test_labels_that_could_be_names_or_indices_are_read_one_way(tmp_path):
    """Found by an audit: with classes named "1", "2", "3" and a table of indices 0, 1, 2, each label
    was looked up alone -- "0" as index 0 (class "1"), "1" as the name "1" (index 0 again), "2" as the
    name "2" -- so two classes merged and one vanished, exit 0. One reading per table now: a table that
    needs index reading and holds a label that is both a name and another class's index is exit 2."""
    from conftest import make_images, make_timm_folder

    names = ["1", "2", "3"]
    m = make_timm_folder(tmp_path / "m", classes=names)
    d = make_images(tmp_path / "d", n_per_class=4, classes=names)
    with open(d / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    as_names = [r["y"] for r in rows]
    for r in rows:
        r["y"] = str(names.index(r["y"]) if r["y"] in names else int(r["y"]) - 1)
    with open(d / "idx.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    refused("eval", m, "--data", d / "idx.csv", words=("idx.csv", "labels mix class names and indices"))
    code, out, err = run_cli("eval", m, "--data", d, "--json", "-q", "--no-cache")      # names: read as names
    assert code == 0, err
    assert [c["n"] for c in json.loads(out)["per_class"]] == [as_names.count(n) for n in names]
