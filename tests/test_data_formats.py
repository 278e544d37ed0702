"""How data files are read: only the image formats the data's names promise, texts and group values
read one way, and nothing in hidden files taken as data."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from repair.data import DataOptions, load_data, read_image
from repair.errors import BadInput


def test_an_image_of_another_format_never_reaches_its_decoder(tmp_path, monkeypatch):
    """PIL's EPS plugin runs Ghostscript on the file: an .png holding PostScript must be refused before
    any program starts (a stand-in ``gs`` on PATH records whether it ran)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gs.log"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho ran >> {log}\nexit 1\n")
    gs.chmod(gs.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    eps = tmp_path / "a.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(BadInput, match="not an image of a format read here") as e:
        read_image(eps)
    assert e.value.path == eps or str(eps) in str(e.value)
    assert not log.exists(), "a decoder outside the image formats ran a program on the file"
    empty = tmp_path / "b.png"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match="empty file, not an image"):
        read_image(empty)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_row_without_its_text_is_refused_naming_its_row_and_line(tmp_path):
    """A misspelt key (``txt``) or an empty cell is no sample: scored as an empty text it would count in
    every figure. Rows are named as the file holds them (a blank line moves the line, not the row)."""
    t = _write(tmp_path / "t.jsonl", '{"text": "good", "label": "positive"}\n\n'
                                     '{"txt": "bad", "label": "negative"}\n')
    with pytest.raises(BadInput) as e:
        load_data(t)
    assert e.value.problem == "row 2 (line 3) has an empty text ('text'); 1 row(s) without one"
    c = _write(tmp_path / "t.csv", 'text,label\ngood,positive\n"two\nlines",negative\n"   ",negative\n')
    with pytest.raises(BadInput) as e:
        load_data(c)
    assert e.value.problem == "row 3 (line 5) has an empty text ('text'); 1 row(s) without one"
    g = _write(tmp_path / "g.jsonl", '{"text": "a", "label": "positive", "neg": 1}\n\n'
                                     '{"text": "b", "label": "negative"}\n')
    with pytest.raises(BadInput) as e:
        load_data(g, DataOptions(group_by="neg"))
    assert e.value.problem.startswith("row 2 (line 3) has an empty 'neg' value")


def test_a_jsonl_text_holding_a_unicode_line_separator_is_one_record(tmp_path):
    t = tmp_path / "t.jsonl"
    t.write_text('{"text": "one\u2028two\u2029three\u0085four", "label": "positive"}\r\n'
                 '{"text": "five", "label": "negative"}\r\n', encoding="utf-8")
    d = load_data(t)
    assert d.items == ["one\u2028two\u2029three\u0085four", "five"] and d.labels == ["positive", "negative"]


def test_numbers_written_two_ways_are_one_group_and_nan_is_missing(tmp_path):
    """``1`` and ``1.0`` (pandas writes a number column with a gap as floats) are one label and one
    group, in one table and across a JSON and a CSV table; NaN is a missing value, as null is."""
    j = _write(tmp_path / "a.jsonl", "\n".join([
        '{"text": "a", "label": 1.0, "neg": 0}', '{"text": "b", "label": 0, "neg": 0.0}',
        '{"text": "c", "label": "1", "neg": 1.00}', '{"text": "d", "label": 0.0, "neg": " 1 "}',
        '{"text": "e", "label": 1, "neg": 2.5, "other": NaN}']) + "\n")
    d = load_data(j)
    assert d.labels == ["1", "0", "1", "0", "1"]
    assert d.attributes["neg"] == ["0", "0", "1", "1", "2.5"] and d.attributes["other"][4] == ""
    c = load_data(_write(tmp_path / "b.csv", "text,label,neg\na,1.0,0.0\nb,0,-0.00\nc,1,1\n"))
    assert c.labels == ["1", "0", "1"] and c.attributes["neg"] == ["0", "0", "1"]
    n = _write(tmp_path / "n.jsonl", '{"text": "a", "label": NaN}\n')
    with pytest.raises(BadInput, match="row 1 has an empty label"):
        load_data(n)
    inf = _write(tmp_path / "i.jsonl", '{"text": "a", "label": 1, "neg": -Infinity}\n')
    assert load_data(inf).attributes["neg"] == ["-inf"]                # as a CSV's -inf reads


def test_a_class_named_like_a_number_is_the_label_written_as_that_number(tmp_path):
    """Class names "1.0", "2.0", "3.0" and labels 1.0, 2.0: read by name (1.0 reads as 1, and so does the
    class name), never as the indices 1 and 2."""
    from repair.data import match_labels

    d = load_data(_write(tmp_path / "t.csv", "text,label\na,1.0\nb,2.0\nc,1.0\n"))
    assert match_labels(d.labels, ["1.0", "2.0", "3.0"], tmp_path).tolist() == [0, 1, 0]
    from repair.rules import expected_group_names

    figures = {"per_class": [{"name": "pos"}, {"name": "neg"}]}
    assert expected_group_names(figures, "site", ["pos|1.0", "neg|site=2.00"], "--expect-groups") == \
        ["pos|site=1", "neg|site=2"]


def test_jsonl_with_carriage_return_line_ends_and_a_folder_description_are_read_as_meant(tmp_path):
    t = tmp_path / "t.jsonl"
    t.write_bytes(b'{"text": "a", "label": "x"}\r{"text": "b", "label": "y"}\r')
    assert load_data(t).items == ["a", "b"]
    root = tmp_path / "d"
    for i, cls in enumerate(["cat", "dog"]):
        _png(root / cls / "a.png", 40 * i)
    _write(root / "metadata.json", '{"name": "my birds", "license": "cc-by"}')     # a description, no table
    assert load_data(root).labels == ["cat", "dog"]


def _png(path: Path, value: int) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_hidden_files_in_a_class_folder_are_no_samples(tmp_path):
    root = tmp_path / "d"
    for i, cls in enumerate(["cat", "dog"]):
        _png(root / cls / "a.png", 40 * i)
    _png(root / "cat" / ".ipynb_checkpoints" / "b.png", 200)      # a notebook's copy: no cat
    (root / "dog" / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    _png(root / ".trash" / "c.png", 100)
    d = load_data(root)
    assert sorted(map(str, d.items)) == [str(root / "cat" / "a.png"), str(root / "dog" / "a.png")]
    t = tmp_path / "t"
    t.mkdir()
    _write(t / "texts.csv", "text,label\ngood,positive\n")
    (t / "._texts.csv").write_bytes(b"\x00\x05\x16\x07")
    assert load_data(t).table == t / "texts.csv"


def test_a_table_with_both_image_paths_and_texts_names_the_choice(tmp_path):
    t = _write(tmp_path / "reviews.csv", "text,label,file\ngood,positive,r1.txt\n")
    with pytest.raises(BadInput, match="column of image paths \\('file'\\) and one of texts \\('text'\\)"):
        load_data(t)

    assert load_data(t, DataOptions(text_col="text")).items == ["good"]


def test_one_sample_listed_with_two_labels_is_said(tmp_path, timm_folder):
    """Identical samples with different labels: one copy is mislabelled, counts in the figures and is
    fitted on. ``eval`` and ``fix`` say so, naming the rows."""
    from conftest import make_images, run_cli

    d = make_images(tmp_path / "data", n_per_class=4)
    lines = (d / "metadata.csv").read_text().splitlines()
    first = lines[1].split(",")
    other = next(ln.split(",") for ln in lines[2:] if ln.split(",")[1] != first[1])
    lines.append(",".join([first[0], other[1], *first[2:]]))       # row 1's image under another label
    (d / "metadata.csv").write_text("\n".join(lines) + "\n")
    n = len(lines) - 1
    code, out, err = run_cli("eval", timm_folder, "--data", d, "--no-cache")
    assert code == 0, err
    assert f"1 set(s) of identical samples carry labels of different classes (e.g. row 1 {first[1]!r} and " \
           f"row {n} {other[1]!r})" in err, err
    code, out, err = run_cli("fix", timm_folder, "--data", d, "--recipe", "dfr", "--out", tmp_path / "o",
                             "--no-cache")
    assert code == 0, err
    assert "the repair set: 1 set(s) of identical samples carry labels of different classes" in err, err
    lines[-1] = ",".join([first[0], first[1].upper(), *first[2:]])     # the same class in other case: no conflict
    (d / "metadata.csv").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli("eval", timm_folder, "--data", d, "--no-cache")
    assert code == 0 and "different classes" not in err and "duplicate" in err, err


def test_a_data_folders_metadata_table_is_found_whatever_its_case_or_format(tmp_path):
    root = tmp_path / "d"
    for i, cls in enumerate(["cat", "dog"]):
        _png(root / cls / "a.png", 40 * i)
    rows = [{"img_filename": "cat/a.png", "y": "cat", "place": "land"},
            {"img_filename": "dog/a.png", "y": "dog", "place": "water"}]
    import json

    (root / "metadata.json").write_text(json.dumps(rows))
    assert load_data(root, DataOptions(group_by="place")).attributes["place"] == ["land", "water"]
    (root / "metadata.json").rename(root / "Metadata.JSON")
    assert load_data(root, DataOptions(group_by="place")).table == root / "Metadata.JSON"
    _write(root / "metadata.csv", "img_filename,y,place\ncat/a.png,cat,land\n")
    with pytest.raises(BadInput, match="holds 2 metadata tables"):
        load_data(root)


def test_a_json_lines_metadata_json_beside_class_folders_is_the_table(tmp_path):
    """A ``metadata.json`` in JSON Lines form is a table (the README: a .json data file may be JSON Lines or
    a JSON array), also beside class folders: it was taken for a description and the class folders were
    read instead, its rows and columns dropped silently. Only a file that is one JSON object, on one line
    or over several, is a description."""
    import json

    root = tmp_path / "d"
    for i, cls in enumerate(["cat", "dog"]):
        _png(root / cls / "a.png", 40 * i)
        _png(root / cls / "b.png", 40 * i + 10)
    rows = [{"img_filename": "cat/a.png", "y": "cat", "place": "land"},
            {"img_filename": "dog/b.png", "y": "dog", "place": "water"}]
    _write(root / "metadata.json", "".join(json.dumps(r) + "\n" for r in rows))
    d = load_data(root, DataOptions(group_by="place"))
    assert d.table == root / "metadata.json" and d.attributes["place"] == ["land", "water"]
    assert d.items == [root / "cat" / "a.png", root / "dog" / "b.png"]
    _write(root / "metadata.json", json.dumps({"name": "my birds", "features": {"y": "label"}}, indent=2))
    assert load_data(root).table is None and len(load_data(root).items) == 4     # a description
    _write(root / "metadata.json", '{"name": "my birds", "license": ')           # damaged: said, not skipped
    with pytest.raises(BadInput, match="line 1 is not valid JSON") as e:
        load_data(root)
    assert str(e.value.path).endswith("metadata.json")


def test_a_class_of_the_model_a_label_is_not_is_refused_naming_its_row(tmp_path):
    """An unknown label (a typo among 1001 rows), labels that mix names and indices, and a label naming two
    classes of a checkpoint are refused naming the row (and its line where they differ), as every other
    error of a row is; a class folder's label is its folder's own name."""
    from repair.data import encode

    c = _write(tmp_path / "t.csv", "text,label\ngood,positive\n\nbad,postive\nawful,negative\n")
    with pytest.raises(BadInput) as e:
        encode(load_data(c), ["negative", "positive"])
    assert e.value.problem.startswith("row 2 (line 4): label 'postive' is not a class of the model"), e.value
    j = _write(tmp_path / "t.jsonl", '{"text": "a", "label": "positive"}\n{"text": "b", "label": "pos"}\n'
                                     '{"text": "c", "label": "pos"}\n')
    with pytest.raises(BadInput) as e:
        encode(load_data(j), ["negative", "positive"])
    assert e.value.problem.startswith("row 2 and 1 more row(s): label 'pos' is not a class"), e.value
    m = _write(tmp_path / "m.csv", "text,label\na,0\nb,0\nc,1\n")
    with pytest.raises(BadInput) as e:
        encode(load_data(m), ["1", "2", "3"])
    assert "labels mix class names and indices: '0' (row 1 and 1 more row(s)) is read as a class index, " \
           "but '1' (row 3) is both the class named '1'" in e.value.problem, e.value
    with pytest.raises(BadInput) as e:
        encode(load_data(_write(tmp_path / "x.csv", "text,label\na,y\nb,x\n")), ["x", "y", "x"])
    assert e.value.problem.startswith("row 2: label 'x' names 2 classes of the model (0, 2)"), e.value
    root = tmp_path / "d"
    for i, cls in enumerate(["cat", "dog"]):
        _png(root / cls / "a.png", 40 * i)
    with pytest.raises(BadInput) as e:
        encode(load_data(root), ["cat", "fox"])
    assert e.value.problem.startswith("label 'dog' is not a class of the model"), e.value


def test_a_csv_with_carriage_return_line_ends_is_read_as_its_jsonl_is(tmp_path):
    """Classic Mac line ends (Excel's "CSV (Macintosh)"): every CR ends a line, as in JSON Lines (it was
    refused: "new-line character seen in unquoted field"); rows are named by their lines as in an LF or
    CRLF file, a quoted field keeps its line break, and in an LF/CRLF file a bare CR inside an unquoted
    field stays malformed (never a silent extra row)."""
    c = tmp_path / "t.csv"
    c.write_bytes(b'text,label,neg\rthe movie was great,positive,no\r"two\rlines",negative,yes\r')
    d = load_data(c)
    assert d.items == ["the movie was great", "two\rlines"] and d.labels == ["positive", "negative"]
    assert d.attributes["neg"] == ["no", "yes"]
    t = tmp_path / "t.tsv"
    t.write_bytes(b"text\tlabel\rgood\tpositive\rbad\tnegative\r")
    assert load_data(t).labels == ["positive", "negative"]
    for nl in (b"\n", b"\r\n", b"\r"):
        c.write_bytes(nl.join([b"text,label", b"a,x", b'"two', b'lines",y', b"", b"   ,x", b""]))
        with pytest.raises(BadInput) as e:
            load_data(c)
        assert e.value.problem == "row 3 (line 6) has an empty text ('text'); 1 row(s) without one", (nl, e.value)
    c.write_bytes(b"text,label\r\ngood,positive\r\nthe\rplot,negative\r\n")
    with pytest.raises(BadInput, match=r"malformed CSV near row 2"):
        load_data(c)


def test_jpeg_files_named_jfif_or_jpe_are_images_and_other_files_are_said(tmp_path):
    """Found by an audit: Chrome saves JPEGs as ``.jfif`` (``.jpe`` is a JPEG name too): a class folder's
    such files were skipped in silence, as was any file of another name. Now they are images; a file whose
    name is not an image's is still no sample (a README, Thumbs.db), but the load says so by a warning
    naming one; hidden files are ignored without a word."""
    import warnings

    from PIL import Image

    root = tmp_path / "d"
    for i, cls in enumerate(["cat", "dog"]):
        _png(root / cls / "a.png", 40 * i)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "cat" / "chrome.jfif", "JPEG")
    Image.new("RGB", (8, 8), (7, 7, 7)).save(root / "dog" / "old.JPE", "JPEG")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # only hidden files beside the images: nothing said
        d = load_data(root)
    assert d.notes == []
    assert sorted(p.name for p in d.items) == ["a.png", "a.png", "chrome.jfif", "old.JPE"]
    assert read_image(root / "cat" / "chrome.jfif").size == (8, 8)
    (root / "dog" / "notes.txt").write_text("where these came from")
    d = load_data(root)
    assert len(d) == 4 and len(d.notes) == 1
    said = d.notes[0]
    assert str(root) in said and "dog/notes.txt" in said and ".txt" in said and "1 file(s)" in said


def test_a_table_that_is_not_utf8_is_named_with_its_line_or_as_utf16(tmp_path):
    """Found by an audit: a Latin-1 table's error gave a byte offset alone; a UTF-16 one (Excel's "Unicode
    text") said nothing of UTF-16. Now the line is named (and the byte, counted in the file), and a UTF-16
    file is said to be one, with what to do."""
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("text,label\ngood,positive\nbad,negative\ncaf\u00e9,positive\n".encode("latin-1"))
    with pytest.raises(BadInput) as e:
        load_data(latin)
    assert e.value.path.endswith("latin1.csv") and "line 4" in e.value.problem and "byte 41" in e.value.problem
    bom = tmp_path / "bom.csv"                          # a UTF-8 byte-order mark: offsets still in the file
    bom.write_bytes(b"\xef\xbb\xbf" + "text,label\ncaf\u00e9,positive\n".encode("latin-1"))
    with pytest.raises(BadInput) as e:
        load_data(bom)
    assert "line 2" in e.value.problem and "byte 17" in e.value.problem
    wide = tmp_path / "wide.tsv"
    wide.write_bytes("text\tlabel\ngood\tpositive\n".encode("utf-16"))
    with pytest.raises(BadInput) as e:
        load_data(wide)
    assert e.value.path.endswith("wide.tsv") and "UTF-16" in e.value.problem and "save it as UTF-8" in e.value.problem


def test_a_group_value_is_read_as_a_whole_number_only_when_written_as_one():
    """Found by an audit: ``01.0`` read as ``1`` and ``+1.0`` as ``1`` while ``01`` and ``+1`` stayed as
    written, so one column holding ``01.0``, ``01`` and ``1`` made two groups out of three spellings
    inconsistently. A zero fraction is dropped only from an integer written as ``str(int)`` writes it."""
    from repair.data import cell_value

    assert [cell_value(v) for v in ("1.0", "1.00", "-2.0", "0.0", "-0.0", " 3.0 ", "10.0")] == \
        ["1", "1", "-2", "0", "0", "3", "10"]
    assert [cell_value(v) for v in ("01.0", "01", "+1.0", "+1", "1.5", "1e0", "abc")] == \
        ["01.0", "01", "+1.0", "+1", "1.5", "1e0", "abc"]
