"""`repair zoo` checks the whole manifest before any model is touched (exit 2 naming the row and field,
or the line): settings that `repair fix` refuses, or that would be dropped silently, are never left to
a row's turn after other rows were repaired and written, nor read as something else."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import make_zoo_parts, run_cli


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two tiny timm models, a small image repair set and a held-out set (``m0``, ``m1``, ``val``, ``test``)."""
    return make_zoo_parts(tmp_path_factory.mktemp("zoo-checks"), with_test=True)


def copy_parts(tmp_path: Path, parts: Path) -> Path:
    for name in ("m0", "m1", "val", "test"):
        shutil.copytree(parts / name, tmp_path / name)
    (tmp_path / "outs").mkdir()
    return tmp_path


def refused_before_any_work(code: int, err: str, tmp_path: Path, *needles: str) -> None:
    """Exit 2, one line naming ``needles``; nothing ran: no report folder, no output written."""
    assert code == 2, err[:2000]
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err[:2000]
    assert not list(tmp_path.glob("*-zoo")) and not any((tmp_path / "outs").iterdir()), err


# ------------------------------------------------------------------ 1. eval_group_by needs eval, in every mode
@pytest.mark.parametrize("mode", ["eval", "fix"])
def test_eval_group_by_without_eval_is_exit_2_before_any_work_in_every_mode(tmp_path, parts, mode):
    """`eval_group_by` names a group column of the `eval` data. Without `eval`, `--mode eval` dropped it
    and gated worst-class (a pass where the worst group fails), and `--mode fix` refused the row only
    when its turn came, after the rows before it were repaired and written. `repair fix` refuses
    --eval-group-by without --eval; the manifest check refuses it the same way, in both modes."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.yaml"
    good = {"name": "a", "checkpoint": "m0", "data": "val", "group_by": "place", "recipe": "dfr", "output": "outs/a"}
    bad = {"name": "b", "checkpoint": "m1", "data": "val", "eval_group_by": "place", "gate": "20%",
           "output": "outs/b"}
    path.write_text(yaml.safe_dump({"models": [good, bad]}, sort_keys=False))
    code, _, err = run_cli("zoo", path, "--mode", mode, "-q")
    refused_before_any_work(code, err, tmp_path, str(path), "row 2 (b), eval_group_by: ", "give eval too")
    # with expect_groups the refusal is the same (not "needs a group column" while one is given)
    path.write_text(yaml.safe_dump({"models": [good, {**bad, "expect_groups": ["cat|land"]}]}, sort_keys=False))
    code, _, err = run_cli("zoo", path, "--mode", mode, "-q")
    refused_before_any_work(code, err, tmp_path, "row 2 (b), eval_group_by: ", "give eval too")
    # with its eval data it is what it names
    from repair.zoo import load_manifest

    path.write_text(yaml.safe_dump({"models": [good, {**bad, "eval": "test"}]}, sort_keys=False))
    e = load_manifest(path, mode).entries[1]
    assert e.eval_group_by == "place" and e.data_options(eval_data=True).group_by == "place"


# ------------------------------------------------------------------ 2. CSV defaults lines
@pytest.mark.parametrize("line", ["# Gate: 90%", "# gate 90%", "# GATE = 90%", "#Recipe dfr", "# Gate_Metric: accuracy",
                                  "# Gate 90 %", "# gate 90% (CI)", "# recipe mixft for all rows", "# Seed 0 everywhere",
                                  # found by a review: a number after other words was prose (no gate, exit 0)
                                  "# gate >= 90% for all rows", "# Gate - 90%", "# gate is 90%", "# gate ≥ 90%",
                                  "# Gate (all rows) 90%",
                                  # found by a review: the first word had to end at a space, ':' or '=': no gate
                                  "# gate>=90%", "# gate, 90% for all rows", "# gate(CI) 90%", "# seed;0",
                                  # and a number field glued to '/' or '.' with a number after it (no gate)
                                  "# gate/CI 90%", "# gate.90", "# Budget/run 2 steps"])
def test_a_csv_hash_line_starting_with_a_field_name_is_a_default_or_exit_2_naming_the_line(tmp_path, parts, line):
    """`# Gate: 90%` or `# gate 90%` was read as a comment: the zoo ran with no gate and exit 0. A `#`
    line whose first word is a field name (in any case) is a default, written exactly, or exit 2."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text(f"# Note: the birds zoo\n{line}\nname,checkpoint,data,group_by\na,m0,val,place\n")
    code, _, err = run_cli("zoo", path, "--mode", "eval", "-q")
    refused_before_any_work(code, err, tmp_path, f"{path}: line 2: ", repr(line), "is not a default")


def test_csv_defaults_lines_written_exactly_apply_and_other_hash_lines_stay_comments(tmp_path, parts):
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text("# Note: gate and recipe below\n#\n\n# gate: 90%\n# gate_metric = accuracy\n"
                    "# Notes on the gate: none\n# -- recipe: a ruler line\nname,checkpoint,data,group_by\n"
                    "a,m0,val,place\n")
    from repair.zoo import load_manifest

    (e,) = load_manifest(path, "eval").entries
    assert (e.gate, e.gate_metric, e.recipe) == ("90%", "accuracy", "auto")


# ------------------------------------------------------------------ 3. a recipe that needs group labels
PLUGIN = """from pathlib import Path
Path({marker!r}).write_text("imported")
"""


@pytest.mark.parametrize("case", ["selection", "candidate-group-source", "plugin"])
def test_a_recipe_needing_group_labels_without_group_by_is_exit_2_before_any_work(tmp_path, parts, case):
    """A row whose recipe needs group labels and that has no `group_by` was refused only when its turn
    came, after the rows before it were repaired and written. The manifest check applies the rule
    `repair fix` applies (repair.recipes.group_labels_needed) to every row without group_by, naming
    its recipe, and still never imports a recipe's plugins."""
    copy_parts(tmp_path, parts)
    marker = tmp_path / "plugin-imported"
    recipe = {"selection": "name: wg\nselection: worst_group\ncandidates:\n  - method: dfr\n",
              "candidate-group-source": "name: gs\ncandidates:\n  - method: dfr\n    params: {group_source: given}\n"
                                        "  - method: afr\n",
              "plugin": "name: wgp\nselection: worst_group\nplugins: [p.py]\ncandidates:\n  - method: dfr\n"}[case]
    (tmp_path / "r.yaml").write_text(recipe)
    (tmp_path / "p.py").write_text(PLUGIN.format(marker=str(marker)))
    good = {"name": "a", "checkpoint": "m0", "data": "val", "group_by": "place", "recipe": "dfr", "output": "outs/a"}
    bad = {"name": "b", "checkpoint": "m1", "data": "val", "recipe": "r.yaml", "output": "outs/b"}
    path = tmp_path / "z.yaml"
    path.write_text(yaml.safe_dump({"models": [good, bad]}, sort_keys=False))
    code, _, err = run_cli("zoo", path, "--allow-plugins", "-q")
    refused_before_any_work(code, err, tmp_path, str(path), "row 2 (b), recipe: ", "needs group labels",
                            "give group_by")
    assert not marker.exists()
    from repair.zoo import load_manifest

    load_manifest(path, "eval")                             # eval runs no recipe: not refused
    path.write_text(yaml.safe_dump({"models": [good, {**bad, "group_by": "place"}]}, sort_keys=False))
    load_manifest(path, "fix", allow_plugins=True)          # with group labels it runs
    assert not marker.exists()


def test_a_csv_comment_in_prose_that_starts_with_a_field_name_stays_a_comment(tmp_path, parts):
    """Found by a review: every '#' line whose first word was a field name ('# Data for each row lives
    next to this file', '# Seed 0 everywhere') was refused; only a setting written otherwise is."""
    from repair.zoo import load_manifest

    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text("# Data for each row lives next to this file\n# Output goes beside it, as usual\n# Name\n"
                    "# Data v2, cleaned by hand\n# Train 3 models on the birds data\n# Data 2024-05-01 snapshot\n"
                    "# Output auto generated by make\n# Name 1st column is the row name\n"
                    # found by a review: a field name inside a longer word was read as the field (exit 2)
                    "# eval/test split is the held-out part of the demo\n# data.csv was cleaned by hand\n"
                    "# checkpoint.onnx files are exported elsewhere\n# seed/ holds the runs\n# gate.md explains it\n"
                    "# gate: 90%\nname,checkpoint,data,group_by\na,m0,val,place\n")
    (e,) = load_manifest(path, "eval").entries
    assert e.gate == "90%"


@pytest.mark.parametrize("option", [["--cpus-per-model", "100000"], ["--cpus-per-model", "99999999999"],
                                    ["--max-retries", "5000"], ["--gpus-per-model", "nan"],
                                    ["--gpus-per-model", "1e9"]])
def test_a_thread_or_worker_count_no_machine_has_is_exit_2_before_any_work(tmp_path, parts, option):
    """Found by an audit: `--cpus-per-model 100000` crashed the zoo (segfault in torch.set_num_threads)
    and 99999999999 was an internal error in each row; `--gpus-per-model nan` was taken. Exit 2 naming
    the option, before any model runs."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "a", "checkpoint": "m0", "data": "val"}]}))
    code, _, err = run_cli("zoo", path, "--mode", "eval", "-q", *option)
    refused_before_any_work(code, err, tmp_path, option[0])


@pytest.mark.parametrize("field, value, needle", [
    ("max_pixels", 0, "max_pixels: must be a positive whole number, got 0"),
    ("max_pixels", -5, "max_pixels: must be a positive whole number, got -5"),
    ("max_pixels", float("inf"), "max_pixels: must be a whole number, got inf"),
    ("max_pixels", "many", "max_pixels: must be a whole number, got 'many'"),
    ("label_col", " ", "label_col: must be a non-empty column name"),
    ("group_by", " ", "group_by: must be a non-empty column name"),
])
def test_a_bad_data_option_in_a_row_is_reported_under_its_own_field(tmp_path, parts, field, value, needle):
    """Found by a review: `max_pixels: 0` was `row 1 (a), data: --max-pixels must be a positive whole
    number, got 0` (blamed on the data, named by the CLI flag) while `.inf` was under `max_pixels:`.
    One check (DataOptions), reported under the row's field as gate, seed and budget are."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "a", "checkpoint": "m0", "data": "val", field: value}]}))
    code, _, err = run_cli("zoo", path, "--mode", "eval", "-q")
    refused_before_any_work(code, err, tmp_path, f"row 1 (a), {needle}")
    assert ", data:" not in err and "--" not in err.split("row 1")[1], err


@pytest.mark.parametrize("name, value, flag", [("workers", 5000, "--workers"), ("gpus_per_model", float("nan"), "--gpus-per-model"),
                                               ("gpus_per_model", 1e9, "--gpus-per-model"),
                                               ("cpus_per_model", 100000, "--cpus-per-model")])
def test_a_count_no_machine_has_is_refused_with_ray_too(name, value, flag):
    """The ceiling holds where the option is used (with --ray; Ray itself is not needed for the check)."""
    from repair.errors import BadInput
    from repair.zoo import ZooOptions

    with pytest.raises(BadInput, match=flag):
        ZooOptions(mode="eval", ray="auto", **{name: value})
