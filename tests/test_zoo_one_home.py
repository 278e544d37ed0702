"""The zoo calls the one home of each rule it applies, never a copy of it: a staged commit's place is
checked and renamed as every output's commit does (:func:`repair.io.check_place`,
:func:`repair.io.put_in_place`), an exception ending a row is its error record in one way
(:func:`repair.zoo.error_record`), and a row's bad option is blamed on the manifest field the option's
own rule names (never read back from the message's text)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from repair.errors import BadInput


# ------------------------------------------------------------------ 1. the staged commit: the rule of every output
def _stage(output: Path, text: str = "new") -> None:
    """A finished row's staged file, as `fix` leaves it for the driver."""
    from repair.zoo import staging_dir

    staging_dir(output).mkdir()
    (staging_dir(output) / output.name).write_text(text)


def _users_folder(place: Path) -> None:
    place.mkdir()
    (place / "notes.txt").write_text("mine")


def test_what_appeared_at_a_place_is_refused_in_the_same_words_by_the_zoo_and_by_every_output(tmp_path):
    """A folder of the user's that appears at an output while the run works: `repair fix`'s commit
    (OutputSet) said only "appeared ... (use --force to overwrite)" -- advice --force then refuses --
    and the zoo's copy of that step said only that --force does not replace it. One rule now: both
    say it appeared and why --force would not replace it, naming the place."""
    from repair.io import atomic_output
    from repair.zoo import check_commit, commit_staged

    fix_out = tmp_path / "fix" / "model"
    fix_out.parent.mkdir()
    with pytest.raises(BadInput) as by_fix:
        with atomic_output(fix_out, kind="file") as staged:
            staged.write_text("new")
            _users_folder(fix_out)
    zoo_out = tmp_path / "zoo" / "model"
    zoo_out.parent.mkdir()
    _stage(zoo_out)
    _users_folder(zoo_out)
    for step in (check_commit, commit_staged):
        with pytest.raises(BadInput) as by_zoo:
            step(zoo_out, may_replace=False)
        assert by_zoo.value.problem == by_fix.value.problem, (by_zoo.value.problem, by_fix.value.problem)
        assert by_zoo.value.path == str(zoo_out)
    assert by_fix.value.path == str(fix_out)
    assert "appeared while this run worked" in by_fix.value.problem
    assert "--force does not replace it" in by_fix.value.problem
    assert "use --force to overwrite" not in by_fix.value.problem
    assert [p.name for p in zoo_out.iterdir()] == ["notes.txt"]        # the user's folder untouched


def test_a_zoo_commit_whose_rename_fails_puts_the_replaced_output_back(tmp_path, monkeypatch):
    """The zoo's copy of the commit step moved what was at a place aside (into the staging folder) and
    then renamed the staged file: a rename that failed (a permission changed meanwhile, ...) left the
    place empty, the old output hidden in the staging folder. `repair fix`'s commit puts the replaced
    one back; the zoo's commit is that step now."""
    import repair.io as io_mod
    from repair.zoo import commit_staged, staging_dir

    output = tmp_path / "model.safetensors"
    output.write_text("old")
    _stage(output)

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(io_mod, "rename_noreplace", refused)
    with pytest.raises(PermissionError):
        commit_staged(output, may_replace=True)
    assert output.read_text() == "old"
    assert (staging_dir(output) / output.name).read_text() == "new"     # still staged: a rerun completes it
    monkeypatch.undo()
    commit_staged(output, may_replace=True)
    assert output.read_text() == "new" and not staging_dir(output).exists()


# ------------------------------------------------------------------ 1. a row's error: one record
def test_an_internal_error_names_its_message_however_it_starts(tmp_path, monkeypatch):
    """A model's run that ended with an exception whose message starts with a line break was recorded
    as "internal error: ValueError: " (its reason lost); a lost Ray task's copy of that step stripped
    the message first. One record now, for both: the first line that says something."""
    import repair.zoo as zoo_mod
    from repair.errors import GateFailed

    entry = zoo_mod.ZooEntry(row=1, name="a", checkpoint=tmp_path / "m", data=tmp_path / "d")
    task = {"entry": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(entry).items()},
            "mode": "eval", "threads": 1}

    def fails(entry, task):
        raise ValueError("\nthe reason\nmore")

    monkeypatch.setattr(zoo_mod, "_eval", fails)
    res = zoo_mod.run_model(task)
    assert (res["status"], res["error"], res["exit_code"]) == ("error", "internal error: ValueError: the reason", 3)
    assert "worker" in res
    assert zoo_mod.error_record(ValueError("\nthe reason"), "Ray")["error"] == "Ray: ValueError: the reason"
    assert zoo_mod.error_record(GateFailed("below the gate")) == {"status": "error", "error": "below the gate",
                                                                  "exit_code": 1}


# ------------------------------------------------------------------ 2. an option's refusal names its option
@pytest.mark.parametrize("given, option, cli, zoo", [
    ({"eval_group_by": "place"}, "eval_group_by",
     "--eval-group-by names a group column of the --eval data; give --eval too",
     "names a group column of the eval data; give eval too"),
    ({"allow_finetune": True, "recipe": "dfr"}, "allow_finetune",
     "--allow-finetune applies to --recipe auto, not 'dfr'", "applies to recipe auto, not 'dfr'"),
    ({"tolerance": 1e-3}, "tolerance", "--tolerance is the bound of the ONNX verification; give --export onnx too",
     "is the bound of the ONNX verification; give export onnx too"),
    ({"export": "{eval_data}"}, "export", "--export must be onnx, got '{eval_data}'",   # a value is never a name
     "must be onnx, got '{eval_data}'"),
    ({"report_fraction": 2}, "report_fraction", "report_fraction must be between 0 and 1, got 2",
     "must be between 0 and 1, got 2"),
    ({"seed": -1}, "seed", "--seed must be a whole number from 0 to 4294967295, got -1", None),   # check_seed's words
])
def test_fix_options_refusal_carries_its_option_the_cli_and_the_zoo_word_it(given, option, cli, zoo):
    """FixOptions' refusal names the option it refuses (``.option``): the CLI says it in flags, as it
    always did; the zoo blames that option's manifest field and words the rule in fields -- it used to
    rewrite every ``--flag`` of the message's text into a field name."""
    from repair.pipeline import FixOptions
    from repair.rules import OptionRefused
    from repair.zoo import _option_refused

    with pytest.raises(OptionRefused) as e:
        FixOptions(**given)
    assert e.value.option == option and e.value.problem == cli and str(e.value) == cli
    field, problem = _option_refused(e.value)
    assert field == option and problem == (cli if zoo is None else zoo)


def test_an_option_refusal_survives_pickling():
    """A refusal crossing a process (a Ray worker) keeps its option and its words."""
    import pickle

    from repair.pipeline import FixOptions
    from repair.rules import OptionRefused

    with pytest.raises(OptionRefused) as e:
        FixOptions(eval_group_by="place")
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is OptionRefused and back.option == "eval_group_by" and str(back) == str(e.value)


def test_a_zoo_row_blames_the_field_the_rule_names_not_the_first_word_of_its_message():
    """The blame comes from the rule (``.option``), however its message starts: a rule whose message
    names other options first is still blamed on its own option, every option named by its field
    (``eval_data`` is the manifest's ``eval``); a data-option rule checked for ``eval_group_by`` blames
    ``eval_group_by``."""
    from repair.rules import OptionRefused
    from repair.zoo import _option_refused

    rule = OptionRefused("eval_group_by", "give {eval_data} too: {eval_group_by} is its column", subject=False)
    assert str(rule) == "give --eval-data too: --eval-group-by is its column"     # no flags given: --field-name
    assert _option_refused(rule) == ("eval_group_by", "give eval too: eval_group_by is its column")
    col = OptionRefused("group_by", "must be a non-empty column name, got {got}", {"got": "' '"},
                        {"group_by": "--group-by"})
    assert _option_refused(col, group_by="eval_group_by") == ("eval_group_by",
                                                              "must be a non-empty column name, got ' '")
    assert _option_refused(BadInput("no option named")) == (None, "no option named")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from conftest import make_zoo_parts

    return make_zoo_parts(tmp_path_factory.mktemp("zoo-one-home"), with_test=True)


def test_path_col_and_text_col_together_are_blamed_on_a_column_field_in_the_manifests_words(tmp_path, parts):
    """``path_col`` and ``text_col`` both given: DataOptions' message ("give --path-col (image data) or
    --text-col (text data), not both") starts with no flag, so the zoo's match of the message's first
    word blamed the row's ``data`` and showed CLI flags in a manifest's message."""
    import shutil

    import yaml

    from repair.zoo import load_manifest

    for name in ("m0", "val"):
        shutil.copytree(parts / name, tmp_path / name)
    path = tmp_path / "z.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "a", "checkpoint": "m0", "data": "val",
                                                "path_col": "img", "text_col": "text"}]}))
    with pytest.raises(BadInput) as e:
        load_manifest(path, "eval")
    assert "row 1 (a), text_col: give path_col (image data) or text_col (text data), not both" in e.value.problem
    assert "--" not in e.value.problem
