"""The official metadata of Waterbirds, MultiNLI or CivilComments lists every split's rows in one table
with a ``split`` column; repair reads every row of the table it is given, so such a table given whole is
said -- a warning naming the table and the column, on stderr and in the JSON of eval and fix -- and a
table of one split's rows, or a split column read as the groups, is not."""
from __future__ import annotations

import csv
import json

import pytest
from conftest import make_bert_folder, run_cli

from repair.data import load_data


def _table(path, col, values):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", col])
        for i in range(48):
            w.writerow([f"the movie was {'great' if i % 2 else 'awful'} {'fun ' * (i % 7)} {'plot ' * (i % 5)}",
                        ["negative", "positive"][i % 2], values[i % len(values)]])
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_bert_folder(tmp_path_factory.mktemp("b") / "bert")


@pytest.mark.parametrize("col", ["split", "Partition"])
def test_a_table_of_several_splits_is_said_on_stderr_and_in_the_json(tmp_path, bert, col):
    t = _table(tmp_path / "all.csv", col, ["0", "1", "2"])
    (note,) = load_data(t).notes
    assert "all.csv" in note and f"its column '{col}' holds 3 values" in note
    code, out, err = run_cli("eval", bert, "--data", t, "-q", "--json")
    assert code == 0, err
    assert sum("whichever split" in w for w in json.loads(out)["warnings"]) == 1
    said = [ln for ln in err.splitlines() if "whichever split" in ln]
    assert len(said) == 1 and said[0].startswith("warning: ") and "all.csv" in said[0], err
    code, out, err = run_cli("fix", bert, "--data", t, "--recipe", "dfr", "--out", tmp_path / "fixed", "-q", "--json")
    assert code == 0, err
    assert sum("whichever split" in w for w in json.loads(out)["warnings"]) == 1
    assert sum("whichever split" in ln for ln in err.splitlines()) == 1


def test_a_table_of_one_split_or_a_split_read_as_groups_is_not(tmp_path):
    assert load_data(_table(tmp_path / "val.csv", "split", ["1"])).notes == []
    assert load_data(_table(tmp_path / "other.csv", "place", ["land", "water"])).notes == []
    from repair.data import DataOptions

    assert load_data(_table(tmp_path / "g.csv", "split", ["a", "b"]), DataOptions(group_by="split")).notes == []
