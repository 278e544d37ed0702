"""Manifest shapes and fields `repair zoo` refuses that no test reached (found by the session's line
coverage): each is exit 2 before any work, one line naming the manifest (and the row and field where
there is one), nothing written."""
from __future__ import annotations

import pytest
import yaml
from conftest import make_zoo_parts, run_cli
from test_zoo_manifest_checks import copy_parts, refused_before_any_work

GOOD = {"name": "a", "checkpoint": "m0", "data": "val", "recipe": "dfr", "output": "outs/a"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_zoo_parts(tmp_path_factory.mktemp("zoo-refusals-s51"), with_test=True)


@pytest.mark.parametrize("doc,needles", [
    ([1, 2], ["row 1: must be a mapping of field: value"]),                  # a bare list is the models list
    ("just text", ["a manifest must be a mapping with a 'models' list"]),
    ({"models": [GOOD], "model": []}, ["unknown top-level key 'model' (known: defaults, models)"]),
    ({"defaults": ["x"], "models": [GOOD]}, ["defaults must be a mapping of field: value"]),
    ({"models": []}, ["a manifest needs a non-empty 'models' list"]),
    ({"defaults": {"colour": 1}, "models": [GOOD]}, ["defaults", "'colour'", "unknown field (known:"]),
    ({"defaults": {"output": "outs/x"}, "models": [GOOD]}, ["defaults", "output", "must be given per row"]),
    ({"models": [{k: v for k, v in GOOD.items() if k != "data"}]},
     ["row 1 (a), data: ", "missing (every model needs a checkpoint and its repair data)"]),
    ({"models": [{**GOOD, "gate": "20%", "gate_metric": "worst_group"}]},
     ["row 1 (a), gate_metric: ", "worst_group needs a group column (group_by or eval_group_by)"]),
    ({"models": [{**GOOD, "gate": "20%", "gate_metric": "best"}]}, ["row 1 (a), gate_metric: ", "got 'best'"]),
    ({"models": [{**GOOD, "output": "nowhere/a"}]}, ["row 1 (a), output: ", "does not exist"]),
])
def test_a_yaml_manifest_repair_cannot_run_is_refused_before_any_work(tmp_path, parts, doc, needles):
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, _, err = run_cli("zoo", path, "-q")
    refused_before_any_work(code, err, tmp_path, str(path), *needles)


@pytest.mark.parametrize("text,needles", [
    ("name,checkpoint,data,name\na,m0,val,b\n", ["column 'name' appears more than once in the header"]),
    ("name,checkpoint,data, name\na,m0,val,b\n", ["column 'name' appears more than once in the header (spaces"]),
    ("name,checkpoint,data,recipe,output\n", ["a manifest needs at least one model row"]),
])
def test_a_csv_manifest_repair_cannot_run_is_refused_before_any_work(tmp_path, parts, text, needles):
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text(text)
    code, _, err = run_cli("zoo", path, "-q")
    refused_before_any_work(code, err, tmp_path, str(path), *needles)


def test_a_manifest_of_another_kind_of_file_is_refused(tmp_path, parts):
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.json"
    path.write_text('{"models": []}')
    code, _, err = run_cli("zoo", path, "-q")
    refused_before_any_work(code, err, tmp_path, str(path), "a manifest must be a .yaml/.yml or .csv file")


def test_one_rule_for_a_repeated_column_in_a_data_table_and_a_manifest(tmp_path):
    """`check_unique_columns` is the one home: a data table reads names as written (``a`` and `` a`` are two
    columns there, two empty names are not), a manifest without the spaces around them."""
    from repair.data import check_unique_columns, read_csv_text
    from repair.errors import BadInput

    path = tmp_path / "t.csv"
    with pytest.raises(BadInput, match=r"t\.csv: column 'y' appears more than once in the header$"):
        read_csv_text("x,y,y\n1,2,3\n", path)
    with pytest.raises(BadInput, match=r"column '' appears more than once"):
        read_csv_text("x,,\n1,2,3\n", path)
    columns, _ = read_csv_text("y, y\n1,2\n", path)
    assert columns == ["y", " y"]
    with pytest.raises(BadInput, match=r"column 'y' appears more than once in the header \(spaces around"):
        check_unique_columns(columns, path, stripped=True)
    check_unique_columns(["a", " ", "  "], path, stripped=True)      # names of spaces only: no names there
