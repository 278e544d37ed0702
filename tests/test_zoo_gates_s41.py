"""A zoo row's gate is never dropped or left to the row's turn (audit A, session 41): a CSV `#` line that is
a gate default written otherwise, a `gate_metric` with no `gate`, and (in `--mode fix`) an `eval` that is
the row's own repair data are exit 2 before any model is touched, naming the line or the row and field."""
from __future__ import annotations

import shutil

import pytest
import yaml

from conftest import make_zoo_parts, run_cli
from test_zoo_manifest_checks import copy_parts, refused_before_any_work


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_zoo_parts(tmp_path_factory.mktemp("zoo-gates-s41"), with_test=True)


# ------------------------------------------------------------------ 1. CSV '#' lines that are a gate written otherwise
@pytest.mark.parametrize("line", ["# gate2: 80%", "# gate80%", "## gate: 80%", "# - gate: 80%", "# 'gate': 80%",
                                  '# "gate": "80%"', "# * gate = 80%", "#  ## gate 80%", "# Gate2 80%",
                                  "# `gate`: 80%"])
def test_a_csv_gate_line_written_otherwise_is_exit_2_naming_the_line(tmp_path, parts, line):
    """Each was read as a comment: the zoo ran ungated, exit 0 ("1 without a gate")."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text(f"# Note: the birds zoo\n{line}\nname,checkpoint,data,group_by\na,m0,val,place\n")
    code, _, err = run_cli("zoo", path, "--mode", "eval", "-q")
    refused_before_any_work(code, err, tmp_path, f"{path}: line 2: ", repr(line))


def test_csv_prose_and_rulers_with_decorations_stay_comments(tmp_path, parts):
    from repair.zoo import load_manifest

    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    # (a review found numbered file names and column legends refused by the first version of this fix)
    path.write_text("## Notes\n# - data lives beside this file\n# v2 of the zoo\n# Data2024 snapshot, cleaned\n"
                    "# -- recipe: a ruler line\n# * Name 1st column is the row name\n###\n# gate: 90%\n"
                    "# data2.csv is a copy of data.csv\n# data2/ holds the second split\n# eval2024/test is held out\n"
                    "# checkpoint1.safetensors and checkpoint2.safetensors\n# seed2024 experiments\n"
                    "# - name: a unique label per row\n# * data: folder of images\n"
                    "name,checkpoint,data,group_by\na,m0,val,place\n")
    (e,) = load_manifest(path, "eval").entries
    assert (e.gate, e.recipe) == ("90%", "auto")


# ------------------------------------------------------------------ 2. gate_metric needs a gate
@pytest.mark.parametrize("metric", ["worst_group", "accuracy", "worst_class"])
def test_gate_metric_without_a_gate_is_exit_2_before_any_work(tmp_path, parts, metric):
    """`gate_metric` without `gate` ran the row ungated (exit 0), as `expect_groups` without a gate is refused."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.yaml"
    good = {"name": "a", "checkpoint": "m0", "data": "val", "group_by": "place", "gate": "0%"}
    bad = {"name": "b", "checkpoint": "m1", "data": "test", "group_by": "place", "gate_metric": metric}
    for mode in ("eval", "fix"):
        path.write_text(yaml.safe_dump({"models": [good, bad]}, sort_keys=False))
        code, _, err = run_cli("zoo", path, "--mode", mode, "-q")
        refused_before_any_work(code, err, tmp_path, str(path), "row 2 (b), gate_metric: ", "needs a gate")
    # with its gate (from the row or the defaults) it is what it names; `auto` alone is no gate and fine
    from repair.zoo import load_manifest

    path.write_text(yaml.safe_dump({"defaults": {"gate": "10%"}, "models": [good, bad]}, sort_keys=False))
    assert load_manifest(path, "eval").entries[1].gate_metric == metric
    path.write_text(yaml.safe_dump({"models": [good, {**bad, "gate_metric": "auto"}]}, sort_keys=False))
    assert load_manifest(path, "eval").entries[1].gate is None


def test_check_gate_options_refuses_a_metric_without_a_threshold():
    from repair.errors import BadInput
    from repair.rules import GateNames, check_gate_options

    with pytest.raises(BadInput, match="gate_metric: .*needs a gate"):
        check_gate_options({"accuracy": None}, None, None, GateNames.manifest(), metric="accuracy")
    assert check_gate_options({"auto": None}, None, None, GateNames.manifest(), metric="auto") is None
    assert check_gate_options({"accuracy": "0%"}, None, None, GateNames.manifest(), metric="accuracy") is None
    # repair eval's own thresholds name their metric: no threshold given is no gate, not a refusal
    assert check_gate_options({"worst_group": None, "accuracy": None}, None, "place") is None


# ------------------------------------------------------------------ 3. fix mode: eval that is the repair data
@pytest.mark.parametrize("copy", [False, True])
def test_fix_row_whose_eval_is_its_repair_data_is_exit_2_before_any_work(tmp_path, parts, copy):
    """It was refused only at its turn, after the rows before it were repaired and written."""
    copy_parts(tmp_path, parts)
    if copy:
        shutil.copytree(tmp_path / "val", tmp_path / "val2")
    path = tmp_path / "z.yaml"
    good = {"name": "a", "checkpoint": "m0", "data": "val", "group_by": "place", "recipe": "dfr", "output": "outs/a"}
    bad = {"name": "b", "checkpoint": "m1", "data": "val", "eval": "val2" if copy else "val", "group_by": "place",
           "recipe": "dfr", "output": "outs/b"}
    path.write_text(yaml.safe_dump({"models": [good, bad]}, sort_keys=False))
    code, _, err = run_cli("zoo", path, "--mode", "fix", "-q")
    refused_before_any_work(code, err, tmp_path, str(path), "row 2 (b), eval: ", "is the repair data itself")
    from repair.zoo import load_manifest

    load_manifest(path, "eval")                             # eval repairs nothing: not refused
    path.write_text(yaml.safe_dump({"models": [good, {**bad, "eval": "test"}]}, sort_keys=False))
    load_manifest(path, "fix")                              # data kept apart: fine


def test_a_default_gate_metric_leaves_a_row_ungated_on_purpose_alone(tmp_path, parts):
    """A `gate_metric` among the defaults is how the gated rows are judged: a row whose gate cell is empty on
    purpose (a baseline) is not refused for it (a review found the first version of the rule refusing it,
    naming a field the row does not have); with no gate anywhere the default metric gates nothing: exit 2."""
    from repair.zoo import load_manifest

    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text("# gate_metric: worst_group\nname,checkpoint,data,group_by,gate\nbaseline,m0,val,place,\n"
                    "candidate,m1,val,place,70%\n")
    a, b = load_manifest(path, "eval").entries
    assert (a.gate, b.gate, a.gate_metric, b.gate_metric) == (None, "70%", "worst_group", "worst_group")
    path.write_text("# gate_metric: worst_group\nname,checkpoint,data,group_by,gate\nbaseline,m0,val,place,\n"
                    "candidate,m1,val,place,\n")
    code, _, err = run_cli("zoo", path, "--mode", "eval", "-q")
    refused_before_any_work(code, err, tmp_path, "gate_metric: ", "needs a gate")
    path.write_text("name,checkpoint,data,group_by,gate,gate_metric\nbaseline,m0,val,place,,worst_group\n"
                    "candidate,m1,val,place,70%,\n")                # the row's own metric: refused
    code, _, err = run_cli("zoo", path, "--mode", "eval", "-q")
    refused_before_any_work(code, err, tmp_path, "row 1 (baseline), gate_metric: ", "needs a gate")
