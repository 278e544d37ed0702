"""One home of a gate (`repair.rules.judge_gates`) and of a fix's output places (`repair.rules.fix_places`).

Found by an audit: `repair eval` assembled its gates in the CLI while a zoo row went through
`report.check_gate`, and the two disagreed on the groups a gate requires -- an expected group of a
class the model lacks, or naming another column, was a usage error (exit 2) for `repair eval` but a
gate that failed (exit 1) for a zoo row; `--expect-groups` with no gate was its own check for `repair
eval` and refused by the zoo (README: the groups a gate requires, which need a gate). And `repair fix`
checked an existing ``<out>-artifacts`` folder only for a recipe with a model repair, while the zoo
always did: a head-only zoo row beside a user's ``r-artifacts/`` was refused, even with --force, where
`repair fix` succeeded and left it alone. Every test here fails on the code before.
"""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import run_cli
from repair.errors import BadInput

FIGURES = {"n": 6, "accuracy": 0.5,
           "per_class": [{"name": "cat", "n": 3, "n_correct": 2}, {"name": "dog", "n": 3, "n_correct": 1}],
           "per_group": [{"name": "cat|place=land", "n": 3, "n_correct": 2},
                         {"name": "dog|place=land", "n": 3, "n_correct": 1}],
           "absent_groups": ["cat|place=water", "dog|place=water"]}


def _manifest(path, rows, **defaults):
    path.write_text(yaml.safe_dump({"defaults": defaults, "models": rows} if defaults else {"models": rows}))
    return path


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ the library: one function
def test_judge_gates_is_the_one_rule_whoever_names_the_options():
    from repair.rules import GateNames, judge_gates

    zoo = GateNames.manifest("row 2 (a)", "group_by", "zoo.yaml")
    for names in (GateNames(), zoo):
        gates, problems, missing = judge_gates(FIGURES, {"worst_group": "0%", "accuracy": None}, "cat|land",
                                               "place", names)
        assert [g["passed"] for g in gates] == [True] and problems == [] and missing == []
        gates, problems, missing = judge_gates(FIGURES, {"accuracy": "0%"}, ["cat|water"], "place", names)
        assert not gates[0]["passed"] and gates[0]["unmeasured"] == ["cat|place=water"] == missing
        assert problems == [gates[0]["message"]]
        # a class the model lacks, another column, no gate: bad input naming where the groups came from
        for expected, thresholds, words in ((["bird|water"], {"accuracy": "0%"}, "'bird' is not a class"),
                                            (["cat|site=water"], {"accuracy": "0%"}, "names the column 'site'"),
                                            (["cat|water"], {"accuracy": None}, "needs a gate")):
            with pytest.raises(BadInput) as e:
                judge_gates(FIGURES, thresholds, expected, "place", names)
            assert words in str(e.value) and str(e.value).count("\n") == 0, e.value
            assert (str(e.value).startswith("zoo.yaml: row 2 (a), expect_groups: ") if names is zoo
                    else str(e.value).startswith("--expect-groups: ")), e.value
    # without expected groups: the CLI's hint, the zoo's message as it was
    cli_gate = judge_gates(FIGURES, {"worst_group": "0%"}, None, "place").gates[0]
    zoo_gate = judge_gates(FIGURES, {"worst_group": "0%"}, None, "place", zoo).gates[0]
    assert not cli_gate["passed"] and not zoo_gate["passed"]
    assert cli_gate["message"] == zoo_gate["message"] + " (name the groups to expect with --expect-groups)"


# ------------------------------------------------------------------ a class the model lacks
def test_an_expected_group_of_a_class_the_model_lacks_is_bad_input_for_eval_and_a_zoo_row(
        tmp_path, timm_folder, image_data):
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, "--group-by", "place",
                           "--fail-under-wga", "0%", "--expect-groups", "bird|water", "-q")
    assert code == 2 and "--expect-groups: 'bird' is not a class" in _one_error_line(err), err
    (tmp_path / "out").mkdir()
    manifest = _manifest(tmp_path / "zoo.yaml", [
        {"name": "typo", "expect_groups": "bird|water"}, {"name": "ok", "expect_groups": "cat|water"}],
        checkpoint=str(timm_folder), data=str(image_data), group_by="place", gate="0%", recipe="dfr",
        output_dir=str(tmp_path / "out"))
    for mode in ("eval", "fix"):
        extra = ("--out-dir", tmp_path / "rep-fix") if mode == "fix" else ()
        code, out, err = run_cli("zoo", manifest, "--mode", mode, "--json", "-q", *extra)
        assert code == 2, (mode, err)                  # the row's own error (bad input), not a failed gate
        models = {m["name"]: m for m in json.loads(out)["models"]}
        typo = models["typo"]
        assert typo["status"] == "error" and typo["exit_code"] == 2 and typo["gate"] is None, typo
        assert typo["error"] == (f"{manifest}: row 1 (typo), expect_groups: 'bird' is not a class of the model "
                                 "(cat, dog, fox)"), typo
        assert models["ok"]["status"] == "done" and models["ok"]["gate"]["passed"], models["ok"]
    # in fix mode the row's staged output is discarded: nothing of it is left beside the other's
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok"]


def test_a_journaled_rows_expected_groups_are_checked_against_its_recorded_classes_before_any_work(
        tmp_path, timm_folder, image_data):
    manifest = _manifest(tmp_path / "zoo.yaml", [{"name": "a", "checkpoint": str(timm_folder),
                                                  "data": str(image_data), "group_by": "place", "gate": "0%"}])
    code, _, err = run_cli("zoo", manifest, "--mode", "eval", "-q")
    assert code == 0, err
    # the gate is not part of the work: the row is resumed from the journal, and its new expected groups
    # name a class its model (as recorded) lacks
    manifest = _manifest(tmp_path / "zoo.yaml", [{"name": "a", "checkpoint": str(timm_folder),
                                                  "data": str(image_data), "group_by": "place", "gate": "0%",
                                                  "expect_groups": "bird|land"}])
    report = tmp_path / "zoo-zoo" / "zoo-report.json"
    before = report.read_bytes()
    code, _, err = run_cli("zoo", manifest, "--mode", "eval", "-q")
    line = _one_error_line(err)
    assert code == 2 and "row 1 (a), expect_groups: 'bird' is not a class" in line and str(manifest) in line, err
    assert report.read_bytes() == before                 # refused before any work: the report as it was


# ------------------------------------------------------------------ another column
def test_an_expected_group_naming_another_column_is_refused_when_the_manifest_is_read(
        tmp_path, timm_folder, image_data):
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, "--group-by", "place",
                           "--fail-under-wga", "0%", "--expect-groups", "cat|site=water", "-q")
    assert code == 2 and "names the column 'site'" in _one_error_line(err), err
    manifest = _manifest(tmp_path / "zoo.yaml", [{"name": "col", "checkpoint": str(timm_folder),
                                                  "data": str(image_data), "group_by": "place", "gate": "0%",
                                                  "expect_groups": "cat|site=water"}])
    code, _, err = run_cli("zoo", manifest, "--mode", "eval", "-q")
    line = _one_error_line(err)
    assert code == 2 and line == (f"error: {manifest}: row 1 (col), expect_groups: 'cat|site=water' names the "
                                  "column 'site', but the groups are of group_by 'place' (write CLASS|VALUE or "
                                  "CLASS|place=VALUE; a value with '=' in it, or a class with '|' in its name, "
                                  "needs the second)"), err
    assert not (tmp_path / "zoo-zoo").exists()           # nothing was run, no report written


# ------------------------------------------------------------------ expected groups with no gate
def test_expected_groups_with_no_gate_are_refused_alike(tmp_path, timm_folder, image_data):
    """README: the groups a gate requires (a zoo row's expect_groups needs a gate): `repair eval
    --expect-groups` alone was its own check (exit 0 or 1), refused now as the zoo refuses it."""
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, "--group-by", "place",
                           "--expect-groups", "cat|water", "-q")
    line = _one_error_line(err)
    assert code == 2 and line.startswith("error: --expect-groups: needs a gate") and "--fail-under-acc 0%" in line, err
    manifest = _manifest(tmp_path / "zoo.yaml", [{"name": "a", "checkpoint": str(timm_folder), "group_by": "place",
                                                  "data": str(image_data), "expect_groups": "cat|water"}])
    code, _, err = run_cli("zoo", manifest, "--mode", "eval", "-q")
    assert code == 2 and "row 1 (a), expect_groups: needs a gate" in _one_error_line(err), err


# ------------------------------------------------------------------ the artifacts folder beside a file output
def test_fix_places_list_the_artifacts_folder_only_for_a_recipe_with_a_model_repair(tmp_path):
    from repair.rules import fix_places
    from repair.zoo import PLACE_ARTIFACTS, row_places

    ck, out = tmp_path / "m.safetensors", tmp_path / "o" / "r.safetensors"
    art = tmp_path / "o" / "r-artifacts"
    assert fix_places(ck, out, None, False) == {"output": out}
    assert fix_places(ck, out, "onnx", True) == {"output": out, "onnx": out.with_suffix(".onnx"), "artifacts": art}
    assert fix_places(ck, out, None, None)["artifacts"] == art          # not known before it runs: listed
    assert (PLACE_ARTIFACTS, art) not in row_places(ck, out, None, False)
    assert (PLACE_ARTIFACTS, art) in row_places(ck, out, None, None)


def test_a_head_only_zoo_row_leaves_a_users_artifacts_folder_alone_as_fix_does(tmp_path, timm_folder, image_data):
    ck = tmp_path / "model"
    shutil.copytree(timm_folder, ck)
    weights = ck / "model.safetensors"                   # a file checkpoint: its output is a file
    for sub in ("zoo", "fix"):
        (tmp_path / sub / "r-artifacts").mkdir(parents=True)
        (tmp_path / sub / "r-artifacts" / "notes.txt").write_text("mine")
    manifest = _manifest(tmp_path / "zoo.yaml", [{"name": "r", "checkpoint": str(weights), "data": str(image_data),
                                                  "group_by": "place", "recipe": "dfr",
                                                  "output": str(tmp_path / "zoo" / "r.safetensors")}])
    code, _, err = run_cli("zoo", manifest, "--force", "-q")
    assert code == 0, err
    code, _, err = run_cli("fix", weights, "--data", image_data, "--group-by", "place", "--recipe", "dfr",
                           "--out", tmp_path / "fix" / "r.safetensors", "-q")
    assert code == 0, err
    for sub in ("zoo", "fix"):
        assert (tmp_path / sub / "r.safetensors").is_file()
        assert [p.name for p in (tmp_path / sub / "r-artifacts").iterdir()] == ["notes.txt"]
    # a recipe with a model repair writes that folder: refused by both before any work, --force or not
    manifest = _manifest(tmp_path / "zoo.yaml", [{"name": "r", "checkpoint": str(weights), "data": str(image_data),
                                                  "group_by": "place", "recipe": "mixft", "budget": "1steps",
                                                  "output": str(tmp_path / "zoo" / "r2.safetensors")}])
    (tmp_path / "zoo" / "r2-artifacts").mkdir()
    (tmp_path / "zoo" / "r2-artifacts" / "notes.txt").write_text("mine")
    code, _, err = run_cli("zoo", manifest, "--force", "-q", "--out-dir", tmp_path / "rep2")
    assert code == 2 and "r2-artifacts" in _one_error_line(err), err
    code, _, err = run_cli("fix", weights, "--data", image_data, "--group-by", "place", "--recipe", "mixft",
                           "--budget", "1steps", "--out", tmp_path / "fix" / "r.safetensors", "--force", "-q")
    assert code == 2 and "r-artifacts" in _one_error_line(err), err
    assert [p.name for p in (tmp_path / "fix" / "r-artifacts").iterdir()] == ["notes.txt"]
