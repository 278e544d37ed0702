"""JSON inputs the user gives: an integer longer than Python converts is "not valid JSON" (exit 2
naming the file) wherever JSON is read; a JSON Lines table's columns are those of every record;
a .json data file may be JSON Lines or a JSON array of objects, and anything else is refused by
name (one test per defect fixed)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, time_limit
from repair.data import DataOptions, load_data
from repair.errors import BadInput
from repair.io import parse_json

#: more digits than Python's int() converts by default (4300)
HUGE = "9" * 5000
SHAPES = "JSON Lines (one object per line) or a JSON array of objects"


def refused(*args, words=()) -> str:
    """``repair ARGS -q``: exit 2, one ``error:`` line on stderr (no traceback, no internal error)
    holding every one of ``words``."""
    with time_limit(120):
        code, out, err = run_cli(*args, "-q")
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "internal error" not in err and "Traceback" not in err, err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------- integers of more than 4300 digits
def test_parse_json_refuses_a_huge_integer_as_invalid_json():
    with pytest.raises(json.JSONDecodeError, match="more than 4300 digits") as e:
        parse_json('{"a": 1,\n "b": %s}' % HUGE)
    assert (e.value.lineno, e.value.colno) == (2, 7)      # where the number starts
    assert parse_json('{"a": %s}' % ("9" * 4300)) == {"a": int("9" * 4300)}   # the limit itself is read


def test_huge_integer_in_a_jsonl_table_is_bad_input(tmp_path, bert_folder):
    table = tmp_path / "big.jsonl"
    table.write_text('{"text": "x", "label": "positive", "score": %s}\n' % HUGE)
    refused("eval", bert_folder, "--data", table, words=("big.jsonl", "line 1 is not valid JSON", "4300 digits"))


def test_huge_integer_in_a_model_config_is_bad_input(tmp_path, timm_folder, image_data):
    model = tmp_path / "timm2"
    shutil.copytree(timm_folder, model)
    cfg = model / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_classes": 3,', '"num_classes": 3, "junk": %s,' % HUGE, 1))
    refused("eval", model, "--data", image_data, words=("config.json", "not valid JSON", "4300 digits"))


def test_huge_integer_in_model_args_is_bad_input(timm_folder, image_data):
    refused("eval", timm_folder, "--data", image_data, "--model-args", '{"drop_rate": %s}' % HUGE,
            words=("--model-args is not valid JSON", "4300 digits"))


# ------------------------------------------------------------- JSON Lines: columns of every record
def test_jsonl_columns_are_the_keys_of_every_record(tmp_path):
    table = tmp_path / "r2.jsonl"
    table.write_text('{"text": "good", "label": "positive"}\n'
                     '{"text": "bad", "label": "negative", "negation": "no"}\n'
                     '{"label": "positive", "negation": "yes", "text": "not bad"}\n')
    data = load_data(table)
    assert data.items == ["good", "bad", "not bad"]
    assert data.attributes == {"negation": ["", "no", "yes"]}      # a missing key reads as an empty cell


def test_jsonl_group_column_missing_from_the_first_record(tmp_path, bert_folder):
    table = tmp_path / "r2.jsonl"
    table.write_text('{"text": "good", "label": "positive"}\n'
                     '{"text": "bad", "label": "negative", "negation": "no"}\n'
                     '{"text": "not bad", "label": "positive", "negation": "yes"}\n')
    # the column is found; the record without it gets the empty-value error a CSV's empty cell gets
    refused("eval", bert_folder, "--data", table, "--group-by", "negation",
            words=("r2.jsonl", "row 1 has an empty 'negation' value"))


def test_jsonl_record_without_the_label_is_refused_like_an_empty_csv_cell(tmp_path):
    jsonl, csv_ = tmp_path / "t.jsonl", tmp_path / "t.csv"
    jsonl.write_text('{"text": "a", "label": "positive"}\n{"text": "b"}\n')
    csv_.write_text("text,label\na,positive\nb,\n")
    for table in (jsonl, csv_):
        with pytest.raises(BadInput, match="row 2 has an empty label"):
            load_data(table)


# ---------------------------------------------------------------------------- .json data files
def test_json_array_of_objects_is_a_table(tmp_path):
    table = tmp_path / "data.json"
    json.dump([{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative", "src": 2}],
              table.open("w"), indent=2)
    data = load_data(table)
    assert (data.modality, data.items, data.labels) == ("text", ["good", "bad"], ["positive", "negative"])
    assert data.attributes == {"src": ["", "2"]}
    one_line = tmp_path / "one.json"           # a .json holding JSON Lines is still read as such
    one_line.write_text('{"text": "good", "label": "positive"}\n{"text": "bad", "label": "negative"}\n')
    assert load_data(one_line).labels == ["positive", "negative"]


def test_json_array_evaluates_from_the_cli(tmp_path, bert_folder):
    table = tmp_path / "data.json"
    json.dump([{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}],
              table.open("w"), indent=2)
    with time_limit(120):
        code, out, err = run_cli("eval", bert_folder, "--data", table, "-q")
    assert code == 0, (code, out, err)


def test_model_folder_given_as_data_is_refused_by_what_it_is(timm_folder, image_data):
    # model and data swapped: the first argument is no model (told before any data is read), and a
    # model folder read as data is a model folder -- not a table of one JSON object (its config.json)
    refused("eval", image_data, "--data", timm_folder, words=(str(image_data), "not a timm hub folder"))
    with pytest.raises(BadInput) as e:
        load_data(timm_folder)
    assert "is a model folder" in str(e.value) and "first argument" in str(e.value)


def test_a_data_folder_holding_its_onnx_model_and_config_is_read_as_data(tmp_path):
    """The model beside its data (a model.onnx, its config.json of class names) in one folder with a
    metadata.csv: data, as ever -- only a folder a model family reads, with no table of its own, is
    refused as a model given for data."""
    import json

    from conftest import make_images

    d = make_images(tmp_path / "proj", n_per_class=3)
    (d / "model.onnx").write_bytes(b"an ONNX model")
    (d / "config.json").write_text(json.dumps({"id2label": {"0": "cat", "1": "dog", "2": "fox"}}))
    assert len(load_data(d).items) == 9


@pytest.mark.parametrize("text, words", [
    ('[{"text": "a", "label": "x"}, 3]', ("item 2 is not a JSON object", SHAPES)),
    ('[{"text": "a", "label": "x"},', ("not valid JSON", "line 1 column", SHAPES)),
    ('{"text": "a", "label": "x"}\n{"text": oops}\n', ("line 2 is not valid JSON", SHAPES)),
    ('"just a text"\n', ("line 1 is not a JSON object", SHAPES)),
    ('[{"text": "a", "label": %s}]' % HUGE, ("not valid JSON", "4300 digits")),
    ('[{"text": ["a"], "label": "x"}]', ("item 1: field 'text' is a JSON array",)),
])
def test_json_data_file_of_another_shape_is_refused_by_name(tmp_path, text, words):
    table = tmp_path / "bad.json"
    table.write_text(text)
    with pytest.raises(BadInput) as e:
        load_data(table)
    msg = str(e.value)
    assert "bad.json" in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
