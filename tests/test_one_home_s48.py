"""Session 48: one rule, one home -- the same input read the same way by every entry point.

- a class named in ``--expect-groups`` (a zoo row's ``expect_groups``) is read as the data's labels are:
  any case, either Unicode form, ``1.0`` and the class index;
- a class folder's name is read as a table's label is (a folder ``1.0/`` is the class ``1``);
- a whole-number option takes a numpy integer wherever one does (and never a float or a bool), and a
  recipe file reads ``3.0`` as 3 in its ``folds`` as in a candidate's integer settings;
- ``--tolerance`` refuses a bool (``True`` is no bound of 1.0 logit).
"""
from __future__ import annotations

import numpy as np
import pytest

from repair.errors import BadInput


def _figures(*classes):
    return {"per_class": [{"name": c, "n": 4, "accuracy": 1.0} for c in classes],
            "per_group": [], "absent_groups": []}


@pytest.mark.parametrize("given,want", [
    ("CAT|land", "cat|place=land"),            # any case, as a label CAT is the class cat
    ("0|land", "cat|place=land"),              # the class index, as a label 0 is
    ("cat|place=land", "cat|place=land"),
    ("Fox|water", "fox|place=water"),
])
def test_expected_groups_name_a_class_as_the_datas_labels_do(given, want):
    from repair.rules import expected_group_names

    names = expected_group_names(_figures("cat", "dog", "fox"), "place", [given], "--expect-groups")
    assert names == [want]


def test_expected_groups_read_a_whole_number_class_as_labels_do():
    from repair.rules import expected_group_names

    assert expected_group_names(_figures("0", "1", "2"), "place", ["1.0|land"], "--expect-groups") == ["1|place=land"]
    # a class named "1" is the class "1", never the index 1 (the class "2"), as a label "1" is
    assert expected_group_names(_figures("1", "2", "3"), "place", ["1|land"], "--expect-groups") == ["1|place=land"]


def test_expected_groups_still_refuse_a_class_the_model_lacks():
    from repair.rules import expected_group_names

    with pytest.raises(BadInput, match="'owl' is not a class of the model"):
        expected_group_names(_figures("cat", "dog", "fox"), "place", ["owl|land"], "--expect-groups")
    with pytest.raises(BadInput, match="'7' is not a class of the model"):
        expected_group_names(_figures("cat", "dog", "fox"), "place", ["7|land"], "--expect-groups")
    # without a flag (a report's own reading) the name stays as given: the gate then fails naming it
    assert expected_group_names(_figures("cat"), "place", ["owl|land"]) == ["owl|place=land"]


def test_class_folder_names_are_read_as_table_labels(tmp_path):
    from PIL import Image

    from repair.data import label_indices, load_data

    root = tmp_path / "d"
    for c in ("0.0", "1.0", "2.0"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / c / f"{i}.png")
    data = load_data(root)
    assert sorted(set(data.labels)) == ["0", "1", "2"]
    assert sorted(set(label_indices(data.labels, ["0", "1", "2"]))) == [0, 1, 2]


@pytest.mark.parametrize("build", [
    lambda v: __import__("repair.data", fromlist=["DataOptions"]).DataOptions(max_pixels=v),
    lambda v: __import__("repair.runtime", fromlist=["RuntimeOptions"]).RuntimeOptions(batch_size=v),
    lambda v: __import__("repair.adapters", fromlist=["LoadOptions"]).LoadOptions(max_length=v),
    lambda v: __import__("repair.adapters", fromlist=["LoadOptions"]).LoadOptions(image_size=v),
], ids=["max_pixels", "batch_size", "max_length", "image_size"])
def test_whole_number_options_take_a_numpy_integer_and_refuse_floats_and_bools(build):
    import dataclasses

    o = build(np.int64(64))
    vals = [v for v in dataclasses.asdict(o).values() if isinstance(v, (int, np.integer)) and not isinstance(v, bool)]
    assert 64 in vals and all(type(v) is int for v in vals if v == 64)      # held as a Python int
    for bad in (64.0, True, "64", 0):
        with pytest.raises(BadInput):
            build(bad)


def test_a_recipe_in_python_takes_numpy_integers_as_python_ints():
    from repair.recipes import Candidate, Recipe

    r = Recipe(name="mine", candidates=[Candidate("dfr"), Candidate("afr")], folds=np.int64(4),
               repeats=np.int64(2), ensemble=np.int64(1))
    assert (type(r.folds), type(r.repeats), type(r.ensemble)) == (int, int, int)
    with pytest.raises(BadInput, match="repeats must be a whole number"):
        Recipe(name="mine", candidates=[Candidate("dfr"), Candidate("afr")], repeats=2.0)


def test_a_recipe_file_reads_a_whole_number_written_3_0_alike_for_its_fields_and_its_settings(tmp_path):
    """``folds: 3.0`` was refused where a candidate's ``n_refits: 3.0`` was read as 3 (one file, two rules)."""
    from repair.recipes import load_recipe

    r = tmp_path / "r.yaml"
    r.write_text("name: f\nfolds: 3.0\nrepeats: 2.0\ncandidates:\n  - method: dfr\n"
                 "    params: {protocol: paper, n_refits: 3.0}\n  - method: afr\n")
    rec = load_recipe(str(r))
    assert (rec.folds, rec.repeats) == (3, 2) and (type(rec.folds), type(rec.repeats)) == (int, int)
    for bad in ("folds: 3.5", "repeats: 2.5", "folds: true"):
        r.write_text(f"name: f\n{bad}\ncandidates:\n  - method: dfr\n  - method: afr\n")
        with pytest.raises(BadInput, match="must be a whole number"):
            load_recipe(str(r))


def test_tolerance_refuses_a_bool():
    from repair.rules import check_tolerance

    with pytest.raises(BadInput, match="--tolerance must be a positive number"):
        check_tolerance(True)
    assert check_tolerance(1e-3) == 1e-3
