"""The official metadata of Waterbirds, MultiNLI or CivilComments lists every split's rows in one table
with a ``split`` column; repair reads every row of the table it is given, so such a table given whole
is said (a warning naming the table and the column), and a table of one split's rows is not."""
from __future__ import annotations

import csv
import warnings

import pytest
from conftest import make_bert_folder, run_cli

from repair.data import SeveralSplitsWarning, load_data


def _table(path, col, values):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", col])
        for i in range(24):
            w.writerow([f"the movie was {'great' if i % 2 else 'awful'} {'fun ' * (i % 5)}", ["negative", "positive"][i % 2],
                        values[i % len(values)]])
    return path


@pytest.mark.parametrize("col", ["split", "Partition"])
def test_a_table_of_several_splits_is_said(tmp_path, col):
    t = _table(tmp_path / "all.csv", col, ["0", "1", "2"])
    with pytest.warns(SeveralSplitsWarning, match=f"all.csv: its column '{col}' holds 3 values"):
        load_data(t)
    bert = make_bert_folder(tmp_path / "bert")
    code, _, err = run_cli("eval", bert, "--data", t, "-q")
    assert code == 0
    said = [ln for ln in err.splitlines() if "whichever split" in ln]
    assert len(said) == 1 and said[0].startswith("warning: ") and "all.csv" in said[0], err


def test_a_table_of_one_split_or_without_one_is_not(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeveralSplitsWarning)
        load_data(_table(tmp_path / "val.csv", "split", ["1"]))
        load_data(_table(tmp_path / "other.csv", "place", ["land", "water"]))
