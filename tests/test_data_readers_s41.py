"""Found by an audit (session 41): how data tables and folders are read. A CSV that only the lenient reader
reads (a raw quote inside a one-line field, ``"a"b``) must still never merge or drop records through a quote
opened on one line and closed on another (or never); a JSON boolean and the same word as a string are one
value; images at the top of a class-folder tree are said to be skipped; the data folder's ``config.json``
leading outside it is never read."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

from conftest import make_images, one_line_naming, run_cli
from repair.data import DataOptions, encode, load_data, read_csv_text
from repair.errors import BadInput


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------- 1. the lenient CSV reader
def test_a_quote_closed_on_a_later_line_never_merges_two_records(tmp_path):
    """Row 1 opens a quote its line never closes; row 2's opening quote closed it, so the lenient reader
    (run because of a harmless ``"a"b`` elsewhere) made rows 1 and 2 one record: row 1 vanished, exit 0."""
    c = _write(tmp_path / "m.csv", 'text,label,g\n"great" fun movie,positive,a\n"the movie was great,positive,a\n'
                                   '"bad plot" was awful,negative,b\nthe fun movie,positive,a\n')
    with pytest.raises(BadInput) as e:
        load_data(c, DataOptions(group_by="g"))
    assert str(e.value.path) == str(c) and "row 2 (line 3)" in e.value.problem and "quote" in e.value.problem, e.value
    assert "\n" not in str(e.value)


def test_a_quote_in_an_unused_column_never_gives_a_row_another_rows_group(tmp_path):
    """A caption's opening quote (never closed on its line) swallowed the next image's row: one image kept
    the other's group, the other image was not read at all."""
    root = make_images(tmp_path / "d", n_per_class=2, with_metadata=False)
    _write(root / "metadata.csv", 'img_filename,y,caption,place\ncat/000.png,cat,"a cat on grass,land\n'
                                  'dog/000.png,dog,a "wet" dog,water\nfox/000.png,fox,a fox,land\n'
                                  'cat/001.png,cat,a cat,land\n')
    with pytest.raises(BadInput) as e:
        load_data(root, DataOptions(group_by="place"))
    assert str(e.value.path) == str(root / "metadata.csv") and "row 1 (line 2)" in e.value.problem, e.value


def test_a_quote_never_closed_is_an_unterminated_quote_also_after_a_lenient_line(tmp_path):
    """After a ``"a"b`` line, a quote never closed ran to the end of the file as one text, eating the rows
    after it (with or without the file's last line end); it is the strict reader's "unterminated quote"."""
    for end in ("\n", ""):
        c = _write(tmp_path / "e.csv", 'label,g,text\npositive,a,"great" fun movie\nnegative,b,the plot was awful\n'
                                       'positive,a,"the movie was great\nnegative,b,awful boring plot\n'
                                       'positive,a,the fun plot' + end)
        with pytest.raises(BadInput) as e:
            load_data(c)
        assert "unterminated quote" in e.value.problem and "row 3 (line 4)" in e.value.problem, (end, e.value)
        c = _write(tmp_path / "e.csv", 'label,g,text\npositive,a,"great" fun movie\nnegative,b,"never closed' + end)
        with pytest.raises(BadInput) as e:
            load_data(c)
        assert "unterminated quote" in e.value.problem and "row 2 (line 3)" in e.value.problem, (end, e.value)


def test_the_cli_refuses_a_merging_quote_in_one_line(tmp_path, timm_folder):
    root = make_images(tmp_path / "d", n_per_class=2, with_metadata=False)
    table = _write(root / "metadata.csv", 'img_filename,y,caption,place\ncat/000.png,cat,"a "big" cat,land\n'
                                          'dog/000.png,dog,"a dog,water\nfox/000.png,fox,"a" fox,land\n'
                                          'cat/001.png,cat,a cat,land\n')
    code, _, err = run_cli("eval", timm_folder, "--data", root, "--group-by", "place", "-q")
    one_line_naming(code, err, table, "row 2 (line 3)")


def test_well_formed_quoted_line_breaks_still_read_beside_a_lenient_line(tmp_path):
    """What the lenient reader is for stays: raw quotes inside one-line fields (SST-2 style), next to
    well-formed quoted fields holding line breaks, in LF, CRLF and CR-only files, rows named by their lines."""
    for nl in ("\n", "\r\n", "\r"):
        text = nl.join(['text,label', '"a" b,positive', '"two', 'lines",negative', '', 'a "wet" dog,positive', ''])
        lines: list = []
        cols, rows = read_csv_text(text, Path("t.csv"), lines=lines)
        assert [r["text"] for r in rows] == ['"a" b', f"two{nl}lines", 'a "wet" dog'], nl   # as written (s47)
        assert [r["label"] for r in rows] == ["positive", "negative", "positive"] and lines == [2, 3, 6], nl


def test_an_error_after_blank_lines_names_the_line_its_record_starts_on(tmp_path):
    """The audit's off-by-one: a record after blank lines was named by the line after the previous record."""
    with pytest.raises(BadInput) as e:
        read_csv_text('text,label\ngood,positive\n\n\n"bad,negative\nfine,positive\n', Path("q.csv"))
    assert "row 2 (line 5)" in e.value.problem, e.value
    with pytest.raises(BadInput) as e:
        read_csv_text('text,label\r\ngood,positive\r\n\r\nthe\rplot,negative\r\n', Path("q.csv"))
    assert "row 2 (line 4)" in e.value.problem, e.value
    # the rows after a line only the lenient reader reads were named by the strict reading's lines too
    c = _write(tmp_path / "t.csv", 'text,label\ngood,positive\n"a"b,negative\n   ,positive\n')
    with pytest.raises(BadInput) as e:
        load_data(c)
    assert e.value.problem == "row 3 has an empty text ('text'); 1 row(s) without one", e.value


# ----------------------------------------------------------------- 2. JSON booleans
def test_a_json_boolean_and_the_same_word_as_a_string_are_one_value(tmp_path):
    """``true`` read as ``True`` while ``"true"`` stayed ``true``: one value made two groups (and an empty
    made-up one). JSON's own spelling is the value's text; labels of booleans still match classes by name."""
    j = _write(tmp_path / "b.jsonl", '{"text":"the fun movie","label":"positive","toxic":true}\n'
                                     '{"text":"awful plot","label":"negative","toxic":"true"}\n'
                                     '{"text":"great fun","label":"positive","toxic":"true"}\n'
                                     '{"text":"boring plot","label":"negative","toxic":false}\n')
    d = load_data(j, DataOptions(group_by="toxic"))
    assert d.attributes["toxic"] == ["true", "true", "true", "false"]
    e = encode(d, ["negative", "positive"], "toxic")
    assert sorted(e.group_names) == ["negative|toxic=false", "negative|toxic=true", "positive|toxic=true"]
    assert e.absent_groups == ["positive|toxic=false"]
    lab = _write(tmp_path / "l.jsonl", '{"text":"a","label":true}\n{"text":"b","label":"false"}\n'
                                       '{"text":"c","label":false}\n')
    d = load_data(lab)
    assert d.labels == ["true", "false", "false"]
    for names in (["false", "true"], ["False", "True"]):
        assert encode(d, names).y.tolist() == [1, 0, 0], names


# ----------------------------------------------------------------- 3. images at a class tree's top
def test_images_at_the_top_of_a_class_folder_tree_are_said_to_be_skipped(tmp_path):
    root = make_images(tmp_path / "d", n_per_class=2, with_metadata=False)
    (root / ".hidden.png").write_bytes((root / "cat" / "000.png").read_bytes())
    (root / "README.txt").write_text("where these came from")
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # hidden files and notes beside the classes: nothing said
        d = load_data(root)
    assert len(d) == 6 and d.notes == []
    shutil.copy(root / "cat" / "000.png", root / "stray.png")
    shutil.copy(root / "dog" / "000.png", root / "stray2.JPG")
    d = load_data(root)
    assert len(d) == 6 and len(d.notes) == 1
    said = d.notes[0]
    assert str(root) in said and "2 image(s)" in said and "not in a class folder" in said and "no label" in said
    assert "stray.png" in said and "README" not in said, said
    (root / "dog" / "notes.txt").write_text("x")     # both kinds: one note saying both
    d = load_data(root)
    assert len(d.notes) == 1 and "dog/notes.txt" in d.notes[0] and "stray.png" in d.notes[0]


# ----------------------------------------------------------------- 4. config.json leading outside
def test_the_data_folders_config_json_leading_outside_is_never_read(tmp_path, monkeypatch):
    """Nothing outside the paths given is read, symlinks included: the data folder's config.json (read to
    tell a model folder given as data) leading outside is refused naming the link, as its metadata.* is."""
    import repair.adapters

    root = make_images(tmp_path / "d", n_per_class=2, with_metadata=False)
    outside = _write(tmp_path / "outside.json", '{"architecture": "resnet18", "num_classes": 3}')
    link = root / "config.json"
    os.symlink(outside, link)
    read: list = []
    real_family_for = repair.adapters.family_for
    monkeypatch.setattr(repair.adapters, "family_for", lambda p, *a: read.append(p) or real_family_for(p, *a))
    with pytest.raises(BadInput) as e:
        load_data(root)
    assert str(e.value.path) == str(link) and "outside" in e.value.problem and "--allow-outside-paths" in e.value.problem
    assert not read, "the link leading outside the data folder was read"
    with pytest.raises(BadInput, match="is a model folder"):       # allowed: read, as a table would be
        load_data(root, DataOptions(allow_outside_paths=True))
    link.unlink()
    shutil.copy(outside, root / "real.json")
    os.symlink("real.json", link)                                  # a link inside the folder: read
    with pytest.raises(BadInput, match="is a model folder"):
        load_data(root)
