"""Recipes are read as data, within bounds: a name of a built-in is always the built-in (a file of
that name in the current folder never replaces it), a recipe file is a regular file of bounded
size whose YAML (aliases included) is bounded, grids are capped, and keys are never ambiguous
(duplicates, mixed types, a setting in both ``params`` and ``grid``): exit 2 naming the file."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from conftest import run_cli, time_limit
from repair.errors import BadInput
from repair.recipes import MAX_CANDIDATES, load_recipe, validate_recipe

BOMB = ("description:\n  - &x0 [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]\n"
        + "".join(f"  - &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]\n" for i in range(1, 9))
        + "candidates:\n  - method: dfr\n")


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _refused(recipe, *needles, validate: bool = False) -> str:
    """The one-line BadInput message of loading ``recipe`` (validated as a manifest would, too)."""
    for load in ((load_recipe, validate_recipe) if validate else (load_recipe,)):
        with time_limit(60), pytest.raises(BadInput) as e:
            load(recipe)
        msg = str(e.value)
        assert "\n" not in msg
        for needle in needles:
            assert needle in msg, msg
    return msg


# ---------------------------------------------------------------- names: a built-in is never shadowed

def test_a_file_named_like_a_builtin_never_replaces_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "auto", "name: my-auto\ncandidates: [{method: nsf}]\n")
    _write(tmp_path, "nsf", "candidates: [{method: dfr}]\n")
    (tmp_path / "dfr").mkdir()                        # a folder left over from --out dfr
    builtin_auto = [c.method for c in load_recipe(str(Path(__file__).parents[1] / "recipes" / "auto.yaml")).candidates]
    for load in (load_recipe, validate_recipe):
        r = load("auto")
        assert r.source == "auto.yaml" and [c.method for c in r.candidates] == builtin_auto
        assert r.files and Path(r.files[0]).parent.name == "recipes"
        assert load("dfr").source == "registry" and [c.method for c in load("nsf").candidates] == ["nsf"]
    # a value that looks like a path is read as a file
    assert [c.method for c in load_recipe("./auto").candidates] == ["nsf"]
    assert [c.method for c in load_recipe(str(tmp_path / "auto")).candidates] == ["nsf"]
    _refused("./dfr", "dfr", "folder")
    _refused("auto.yaml", "auto.yaml", "not found")
    # a bare name of nothing built in that is a file here is still read (the user named it)
    _write(tmp_path, "mine", "candidates: [{method: afr}]\n")
    assert [c.method for c in load_recipe("mine").candidates] == ["afr"]
    msg = _refused("nothing-here", "unknown recipe 'nothing-here'")
    assert "./" in msg                                # the hint names a path, not a bare name


def test_fix_never_runs_a_recipe_or_plugin_from_the_current_folder(timm_folder, image_data, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    marker = tmp_path / "PWNED"
    _write(work, "p.py", f"open({str(marker)!r}, 'w').write('x')\n")
    for name in ("auto", "dfr"):
        _write(work, name, "plugins: [p.py]\ncandidates: [{method: nsf}]\n")
    code, stdout, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--allow-plugins",
                                "--out", tmp_path / "o1", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["recipe"] == "dfr" and rep["method"] == "dfr"
    assert not marker.exists()
    # the library default recipe="auto" names the built-in too
    from repair.pipeline import FixOptions, _load_recipe

    r = _load_recipe(FixOptions(allow_plugins=True))
    assert r.source == "auto.yaml" and not r.plugins and not marker.exists()


# ---------------------------------------------------------------- reading: bounded, regular files only

def test_a_recipe_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "f.yaml"
    os.mkfifo(fifo)
    _refused(fifo, "f.yaml", "not a regular file", validate=True)     # never waits for a writer
    if Path("/dev/zero").exists():
        _refused("/dev/zero", "/dev/zero", "not a regular file")       # never read until memory runs out
    _refused(tmp_path, str(tmp_path), "folder")
    big = _write(tmp_path, "big.yaml", "candidates: [{method: dfr}]\n" + "#" * (1 << 20) + "\n")
    _refused(big, "big.yaml", "larger than 1 MiB", validate=True)


def test_yaml_aliases_cannot_expand_without_bound(tmp_path):
    assert len(BOMB) < 600
    _refused(_write(tmp_path, "laughs.yaml", BOMB), "laughs.yaml", "values", validate=True)
    # the same bomb under a list setting (converted to tuples when the config is built)
    bomb = BOMB.replace("  - method: dfr\n", "  - method: dfr\n    params: {c_grid: *x8}\n")
    _refused(_write(tmp_path, "laughs2.yaml", bomb), "laughs2.yaml", "values")
    _refused(_write(tmp_path, "self.yaml", "description: &a [1, *a]\ncandidates: [{method: dfr}]\n"),
             "self.yaml", "alias inside its own anchor")
    deep = "description: " + "[" * 100_000 + "\ncandidates: [{method: dfr}]\n"
    _refused(_write(tmp_path, "deep.yaml", deep), "deep.yaml", "nested more than")      # not a RecursionError
    # aliases within bounds are still YAML as usual
    ok = _write(tmp_path, "shared.yaml", "candidates:\n  - {method: dfr, params: &p {min_subsample_per_group: 3}}\n"
                                         "  - {method: dfr, params: {<<: *p, protocol: fast}}\n")
    assert [c.params for c in load_recipe(ok).candidates] == [{"min_subsample_per_group": 3},
                                                              {"min_subsample_per_group": 3, "protocol": "fast"}]


def test_grids_and_candidates_are_capped_before_they_are_expanded(tmp_path):
    six = ", ".join(f"{k}: [{', '.join(str(i + 1) for i in range(10))}]"     # six real settings, ten values each
                    for k in ("n_refits", "n_tune_refits", "min_subsample_per_group", "tol", "max_iter", "group_cap"))
    grid6 = _write(tmp_path, "grid6.yaml", f"candidates:\n  - method: dfr\n    grid: {{{six}}}\n")
    _refused(grid6, "grid6.yaml", "grid makes 1,000,000 combinations", validate=True)   # counted, never made

    def grid(n):
        return "{n_refits: [" + ", ".join(str(i + 1) for i in range(n)) + "]}"

    two = _write(tmp_path, "two.yaml", f"candidates:\n  - {{method: dfr, grid: {grid(200)}}}\n"
                                       "  - {method: afr}\n"
                                       f"  - {{method: dfr, grid: {grid(100)}}}\n")
    _refused(two, "two.yaml", "candidate 3", "grid", f"more than {MAX_CANDIDATES}")
    many = _write(tmp_path, "many.yaml", "candidates:\n" + "  - method: dfr\n" * (MAX_CANDIDATES + 1))
    _refused(many, "many.yaml", f"{MAX_CANDIDATES + 1} candidates", f"at most {MAX_CANDIDATES}")
    full = _write(tmp_path, "full.yaml", f"candidates:\n  - {{method: dfr, grid: {grid(MAX_CANDIDATES)}}}\n")
    assert len(load_recipe(full).candidates) == MAX_CANDIDATES


# ---------------------------------------------------------------- keys: never ambiguous

def test_keys_of_mixed_types_are_bad_input_not_a_type_error(tmp_path):
    from repair.config import ConfigError, build_config
    from repair.methods import get_method

    _refused(_write(tmp_path, "top.yaml", "candidates: [{method: dfr}]\n1: a\nfoo: b\n"), "top.yaml",
             "unknown key 1", validate=True)
    _refused(_write(tmp_path, "cand.yaml", "candidates: [{method: dfr, 1: a, foo: b}]\n"), "cand.yaml",
             "unknown key 1", validate=True)
    _refused(_write(tmp_path, "params.yaml", "candidates: [{method: dfr, params: {1: a, foo: b}}]\n"),
             "params.yaml", "setting 1", validate=True)
    _refused(_write(tmp_path, "grid.yaml", "candidates: [{method: dfr, grid: {2: [a], foo: [b]}}]\n"),
             "grid.yaml", "setting 2")
    # a method only a plugin registers is not checked by its config when validating: the names still are
    _write(tmp_path, "plug.py", "raise SystemExit('never imported')\n")
    plug = _write(tmp_path, "plug.yaml",
                  "plugins: [plug.py]\ncandidates: [{method: only_plugin, params: {1: a, b: c}}]\n")
    with pytest.raises(BadInput, match="plug.yaml: .*setting 1"):
        validate_recipe(plug)
    with pytest.raises(ConfigError) as e:           # the config check itself, as Python callers reach it
        build_config(get_method("dfr").config_cls, {1: "a", "foo": "b"})
    assert e.value.key == 1


def test_duplicate_keys_and_a_setting_in_params_and_grid_are_refused(timm_folder, image_data, tmp_path):
    _refused(_write(tmp_path, "dup.yaml", "candidates: [{method: dfr}]\ncandidates: [{method: afr}]\n"),
             "dup.yaml", "duplicate key 'candidates'", "line 2", validate=True)
    _refused(_write(tmp_path, "dup2.yaml", "candidates:\n  - method: dfr\n    params: {n_refits: 2, n_refits: 3}\n"),
             "dup2.yaml", "duplicate key 'n_refits'")
    _refused(_write(tmp_path, "both.yaml",
                    "candidates: [{method: dfr, params: {c_grid: [1.0, 2.0]}, grid: {c_grid: [[0.5]]}}]\n"),
             "both.yaml", "'c_grid'", "params and grid", validate=True)
    code, stdout, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe",
                                tmp_path / "dup.yaml", "--out", tmp_path / "o", "-q")
    assert code == 2 and err.count("\n") == 1 and "dup.yaml" in err and "'candidates'" in err, err


# ------------------------------------------------------------------ found by an audit
@pytest.mark.parametrize("method,setting", [("dfr", "n_refits"), ("dfr", "n_tune_refits"), ("mix", "n_refits"),
                                            ("mix", "n_mix_per_example"), ("mixft", "lora_rank"),
                                            ("mixft", "n_clusters"), ("mixft", "members"), ("clp", "hidden_size"),
                                            ("clp", "num_layers"), ("recompose", "per_image"),
                                            ("neurontune", "max_iter"), ("afr", "max_iter")])
def test_an_absurd_count_is_refused_when_the_recipe_is_read(tmp_path, method, setting):
    """1e12 refits, a LoRA rank of 1e12, 1e12 soup members, ...: refused naming the setting (they
    passed, then ran out of memory as an internal error or ran for ever)."""
    path = _write(tmp_path, "r.yaml", f"candidates:\n  - method: {method}\n    params: {{{setting}: 1000000000000}}\n")
    _refused(path, "r.yaml", setting)


def test_a_repeated_candidate_is_refused_and_group_source_given_needs_labels_before_any_work(
        timm_folder, image_data, tmp_path):
    path = _write(tmp_path, "r.yaml", "ensemble: 2\ncandidates:\n  - method: dfr\n  - method: dfr\n"
                                      "    params: {n_refits: 20}\n  - method: afr\n")
    _refused(path, "r.yaml", "candidate 2 (dfr)", "same settings as candidate 1")
    # the same grid written with a whole number and a decimal is the same candidate
    grid = _write(tmp_path, "grid.yaml", "candidates:\n  - method: dfr\n    grid: {c_grid: [[1.0], [1]]}\n")
    _refused(grid, "grid.yaml", "candidate 1 (dfr)", "grid gives the same settings twice")
    given = _write(tmp_path, "g.yaml", "candidates:\n  - method: dfr\n    params: {group_source: given}\n"
                                       "  - method: afr\n")
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", given, "--out", tmp_path / "o", "-q")
    assert code == 2 and "group_source 'given' needs group labels" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_a_plugin_methods_own_error_names_it_and_an_error_line_stays_one_line(timm_folder, image_data, tmp_path):
    (tmp_path / "boom.py").write_text(
        "from dataclasses import dataclass\nfrom repair.methods import register_method\n\n\n@dataclass\n"
        "class C:\n    pass\n\n\n@register_method('boom', summary='fails', config=C, groups='never')\n"
        "def boom(inputs, config):\n    return 1 / 0\n")
    recipe = _write(tmp_path, "b.yaml", "plugins: [boom.py]\ncandidates:\n  - method: boom\n")
    from repair.methods import METHODS

    try:
        code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", recipe, "--allow-plugins",
                               "--out", tmp_path / "o", "-q")
    finally:                     # registered in this process: the bench's rows would meet it (test order)
        if "boom" in METHODS:
            METHODS.unregister("boom")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: method boom ({tmp_path / 'boom.py'}) failed: ZeroDivisionError"), err
    nl = _write(tmp_path, "n.yaml", 'plugins: ["a\\nb.py"]\ncandidates:\n  - method: dfr\n')
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", nl, "--out", tmp_path / "o", "-q")
    assert code == 2 and err.count("\n") == 1 and "a\\nb.py" in err, err


# ---------------------------------------------------------------- one home for the recipe-level rules
def test_a_recipe_built_in_python_is_held_to_the_rules_of_a_file():
    """``Recipe`` objects reach the library (``choose_heads`` takes a loaded recipe): built in Python
    they are checked as a recipe file is (an audit: folds=1000, repeats=-5, ensemble=0 and a candidate
    twice ran, averaging a head with itself)."""
    from repair.recipes import Candidate, Recipe

    ok = Recipe("two", [Candidate("dfr"), Candidate("mix")], folds=3, repeats=2, ensemble=2)
    assert ok.folds == 3
    for kwargs, needle in (({"folds": 1000}, "folds must be a whole number from 2 to 20"),
                           ({"folds": 2.5}, "folds must be"), ({"repeats": 0}, "repeats must be"),
                           ({"repeats": -5}, "repeats must be"), ({"ensemble": 0}, "ensemble must be"),
                           ({"selection": "best"}, "selection must be one of"),
                           ({"name": "a\nb"}, "printable"), ({"name": ""}, "name must be")):
        args = {"name": "r", "candidates": [Candidate("dfr")], **kwargs}
        with pytest.raises(BadInput, match=needle):
            Recipe(**args)
    with pytest.raises(BadInput, match="same method with the same settings as candidate 1"):
        Recipe("twice", [Candidate("dfr"), Candidate("dfr", {"c_grid": None})])     # the default, by value
    with pytest.raises(BadInput, match="non-empty list of candidates"):
        Recipe("none", [])
    with pytest.raises(BadInput, match="candidate 1 \\(dfr\\)"):
        Recipe("bad", [Candidate("dfr", {"n_refits": -1})])
    with pytest.raises(BadInput, match="Candidate"):
        Recipe("raw", ["dfr"])
    # ensemble averages head repairs: more than the recipe has is a setting that does nothing
    with pytest.raises(BadInput, match="ensemble 3 averages the best 3 head repairs, but the recipe has 2"):
        Recipe("e", [Candidate("dfr"), Candidate("mix"), Candidate("mixft")], ensemble=3)
    assert load_recipe("auto-ft").ensemble == 2


@pytest.mark.parametrize("text, needle", [
    ("candidates: [{method: dfr, params: 0}]\n", "'params' must be a mapping"),
    ("candidates: [{method: dfr, params: ''}]\n", "'params' must be a mapping"),
    ("candidates: [{method: dfr, grid: false}]\n", "'grid' must be a mapping"),
    ("candidates: [{method: dfr, grid: []}]\n", "'grid' must be a mapping"),
    ("plugins: 0\ncandidates: [{method: dfr}]\n", "plugins must be a list"),
    ("plugins: false\ncandidates: [{method: dfr}]\n", "plugins must be a list"),
    ("description: [1, 2]\ncandidates: [{method: dfr}]\n", "description must be text"),
    ("name: \"a\\nb\"\ncandidates: [{method: dfr}]\n", "printable"),
])
def test_a_wrong_type_is_refused_not_read_as_empty(tmp_path, text, needle):
    """Only null or a missing key means "none": ``params: 0`` ran dfr at its defaults (an audit)."""
    _refused(_write(tmp_path, "r.yaml", text), needle, "r.yaml", validate=True)
    ok = _write(tmp_path, "ok.yaml", "plugins:\ndescription:\ncandidates: [{method: dfr, params: , grid: }]\n")
    assert load_recipe(ok).candidates[0].params == {}


def test_plugins_run_only_after_the_recipe_is_checked_and_only_from_its_folder(tmp_path):
    """A recipe with a bad field is refused before its plugin runs; a plugin file outside the recipe's
    folder (``../x.py``, an absolute path, a link leading out) is refused, nothing imported."""
    marker = tmp_path / "ran"
    plug = f"open({str(marker)!r}, 'w').close()\n"
    _write(tmp_path, "p.py", plug)
    bad = _write(tmp_path, "bad.yaml", "folds: 99\nplugins: [p.py]\ncandidates: [{method: dfr}]\n")
    with pytest.raises(BadInput, match="folds must be"):
        load_recipe(bad, allow_plugins=True)
    assert not marker.exists()
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "link.py").symlink_to(tmp_path / "p.py")
    for spec in ("../p.py", str(tmp_path / "p.py"), "link.py"):
        r = _write(sub, "r.yaml", f"plugins: [{json.dumps(spec)}]\ncandidates: [{{method: dfr}}]\n")
        with pytest.raises(BadInput, match="outside the recipe's folder"):
            load_recipe(r, allow_plugins=True)
        assert not marker.exists()


def test_a_recipe_name_with_a_nul_or_too_long_is_bad_input(tmp_path):
    _refused("a\x00b.yaml", "NUL")
    _refused("./" + "x" * 5000 + ".yaml", "cannot read the recipe")


def test_a_setting_that_does_nothing_under_cross_fitting_is_refused():
    from repair.config import ConfigError
    from repair.methods import get_method

    info = get_method("mixft")
    assert info.make_config({"holdout_fraction": 0.4}).holdout_fraction == 0.4
    with pytest.raises(ConfigError, match="holdout_fraction"):
        info.make_config({"cross_fit": 2, "holdout_fraction": 0.4})


def test_group_labels_a_recipe_needs_are_asked_for_before_any_work(tmp_path, monkeypatch, bert_folder, text_data):
    """``selection: worst_group`` (the recipe's or a candidate's), ``group_source: given``, or only
    methods that need groups: without --group-by, exit 2 naming the recipe before the model is loaded
    (an audit: it came after every embedding was extracted), and the demo (label-free) refuses such a
    recipe before it builds anything."""
    from repair.recipes import Candidate, Recipe, group_labels_needed

    assert group_labels_needed(load_recipe("auto")) is None
    assert "selects by worst_group" in group_labels_needed(Recipe("w", [Candidate("dfr")], selection="worst_group"))
    assert "selection worst_group" in group_labels_needed(
        Recipe("a", [Candidate("afr", {"selection": "worst_group"})]))
    assert "group_source 'given'" in group_labels_needed(Recipe("g", [Candidate("dfr", {"group_source": "given"})]))
    r = _write(tmp_path, "w.yaml", "selection: worst_group\ncandidates: [{method: dfr}, {method: mix}]\n")
    import repair.pipeline as pipeline

    def never(*a, **k):
        raise AssertionError("the model was loaded before the recipe's needs were checked")

    monkeypatch.setattr(pipeline, "load_model", never)
    code, out, err = run_cli("fix", bert_folder, "--data", text_data, "--recipe", r, "--out", tmp_path / "o")
    assert code == 2 and "w.yaml" in err and "selects by worst_group" in err and "--group-by" in err, err
    assert len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli("demo", "--out", tmp_path / "d", "--recipe", r)
    assert code == 2 and "selects by worst_group" in err and "without them" in err, err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("method, key, value", [
    ("dfr", "max_iter", 10 ** 12), ("dfr", "min_subsample_per_group", 10 ** 12), ("nsf", "max_iter", 10 ** 12),
    ("neurontune", "report_top", 10 ** 12), ("mixft", "mix_point", 10 ** 9), ("mixft", "eval_every", 10 ** 12),
    ("recompose", "size", 10 ** 6), ("recompose", "diffusion_steps", 10 ** 9), ("recompose", "sheet", 10 ** 9),
    ("recompose", "max_images", 10 ** 12), ("recompose", "inversion_steps", 10 ** 12),
    ("clp", "saliency_batch", 10 ** 9), ("clp", "meta_every", 10 ** 12)])
def test_absurd_counts_are_refused(tmp_path, method, key, value):
    """Every count has an upper bound (an audit: these took up to 1e12 without a word)."""
    _refused(_write(tmp_path, "r.yaml", f"candidates: [{{method: {method}, params: {{{key}: {value}}}}}]\n"),
             key, "must be <=")


@pytest.mark.parametrize("bad", ["candidates: 5\n", "candidates: [{method: dfr, params: {c_grid: -1}}]\n",
                                 "candidates: [{method: dfr, params: {bogus: 1}}]\n"])
def test_no_plugin_runs_before_the_candidates_are_checked(tmp_path, bad):
    marker = tmp_path / "ran"
    _write(tmp_path, "p.py", f"open({str(marker)!r}, 'w').close()\n")
    r = _write(tmp_path, "r.yaml", "plugins: [p.py]\n" + bad)
    with pytest.raises(BadInput):
        load_recipe(r, allow_plugins=True)
    assert not marker.exists()


# ------------------------------------------------------- settings that do nothing, names, plugin modules
# (found by an audit: each was accepted, recorded in the provenance, and changed nothing)

@pytest.mark.parametrize("method, params, key", [
    # dfr: the subsample protocols' settings under the fast protocol, the fast protocol's under the others
    ("dfr", {"protocol": "fast", "n_refits": 500}, "n_refits"),
    ("dfr", {"protocol": "fast", "n_tune_refits": 7}, "n_tune_refits"),
    ("dfr", {"protocol": "fast", "holdout_fraction": 0.9}, "holdout_fraction"),
    ("dfr", {"protocol": "fast", "tune_score": "probability"}, "tune_score"),
    ("dfr", {"protocol": "paper", "solver": "lbfgs"}, "solver"),
    ("dfr", {"protocol": "bagged", "group_cap": 1.0}, "group_cap"),
    # mix runs the subsample protocols only; its coefficient is drawn when mix_beta > 0; no copies, no mixing
    ("mix", {"solver": "lbfgs"}, "solver"), ("mix", {"protocol": "paper", "group_cap": 1.0}, "group_cap"),
    ("mix", {"mix_beta": 0.5, "mix_weight": 0.1}, "mix_weight"),
    ("mix", {"n_mix_per_example": 0, "mix_weight": 0.1}, "mix_weight"),
    ("mix", {"n_mix_per_example": 0, "mix_beta": 1.0}, "mix_beta"),
    # the model repairs: the early-stopping rule without early stopping, mixft's mixing without mixing
    ("mixft", {"patience": 0, "early_stop": "anytime"}, "early_stop"),
    ("finetune", {"patience": 0, "early_stop": "after_gain"}, "early_stop"),
    ("recompose", {"patience": 0, "early_stop": "anytime"}, "early_stop"),
    ("clp", {"early_stop": "anytime"}, "early_stop"),                      # clp's patience is 0 by default
    ("mixft", {"mix_fraction": 0.0, "mix_weight": 0.9}, "mix_weight"),
    ("mixft", {"mix_fraction": 0.0, "mix_beta": 1.0}, "mix_beta"),
    ("mixft", {"mix_fraction": 0.0, "partner": "any_class"}, "partner"),
    ("mixft", {"mix_fraction": 0.0, "mix_point": 0}, "mix_point"),
])
def test_a_setting_another_setting_makes_do_nothing_is_refused(tmp_path, method, params, key):
    """README: a setting changed from its default where another setting makes it do nothing is exit 2
    naming the file and the key (these were recorded in the provenance, the model unchanged by them)."""
    from repair.config import ConfigError
    from repair.methods import get_method

    info = get_method(method)
    with pytest.raises(ConfigError) as e:
        info.make_config(params)
    assert e.value.key == key and "has no effect" in str(e.value), str(e.value)
    _refused(_write(tmp_path, "r.yaml", json.dumps({"candidates": [{"method": method, "params": params}]})),
             "r.yaml", repr(key), "has no effect", validate=True)
    # the same setting where it acts, and its default restated where it does not, are taken
    others = {k: v for k, v in params.items() if k != key}
    info.make_config({**others, key: dataclasses.asdict(info.default_config())[key]})
    if (method, key) not in (("mix", "solver"), ("mix", "group_cap")):       # never: mix has no fast protocol
        info.make_config({key: params[key]} if method != "clp" else {key: params[key], "patience": 2})


def test_settings_taken_under_protocol_auto_and_where_mixing_runs():
    """``protocol: auto`` may run either protocol: it takes every one of dfr's settings; mixft's mixing
    settings act as soon as a share of the batch is mixed, and early_stop as soon as patience > 0."""
    from repair.methods import get_method

    dfr = get_method("dfr").make_config({"n_refits": 5, "n_tune_refits": 2, "holdout_fraction": 0.4,
                                         "tune_score": "accuracy", "solver": "newton", "group_cap": 2.0})
    assert dfr.protocol == "auto" and dfr.n_refits == 5 and dfr.solver == "newton"
    assert get_method("dfr").make_config({"protocol": "paper", "n_refits": 5}).n_refits == 5
    assert get_method("dfr").make_config({"protocol": "fast", "solver": "lbfgs", "group_cap": 0.0}).solver == "lbfgs"
    assert get_method("mix").make_config({"mix_beta": 0.5, "n_mix_per_example": 2}).mix_beta == 0.5
    cfg = get_method("mixft").make_config({"mix_fraction": 0.25, "mix_weight": 0.9, "partner": "any_class",
                                           "patience": 1, "early_stop": "anytime"})
    assert (cfg.mix_weight, cfg.early_stop) == (0.9, "anytime")


def test_a_line_break_in_a_text_setting_is_refused_naming_the_key(timm_folder, image_data, tmp_path):
    """A text setting is shown inside the output's lines (a candidate's label): a line break printed
    a forged line of its own (``scope: "names:fc|\\ngate passed: ..."``) on stdout and stderr."""
    from dataclasses import dataclass

    from repair.config import ConfigError, build_config

    forged = "names:fc|\ngate passed: worst-group 99.0%"
    path = _write(tmp_path, "nl.yaml", json.dumps({"candidates": [{"method": "dfr"}, {"method": "mixft", "params": {
        "epochs": 1.0, "scope": forged}}]}))
    _refused(path, "nl.yaml", "'scope'", "line break", validate=True)
    code, stdout, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", path, "--out", tmp_path / "o",
                                "--budget", "5steps")
    assert code == 2 and "gate passed" not in stdout and err.count("\n") == 1 and "'scope'" in err, (stdout, err)
    assert not any(line.startswith("gate passed") for line in err.splitlines())

    @dataclass
    class Texts:
        names: tuple = ("a",)
        one: str = "x"

    with pytest.raises(ConfigError) as e:
        build_config(Texts, {"names": ["ok", "b\nc"]})
    assert e.value.key == "names"
    assert build_config(Texts, {"names": ["ok"], "one": "a\tb"}).one == "a\tb"     # tab: shown escaped, one line


def test_a_plugin_module_name_is_found_only_in_the_recipes_folder(tmp_path, monkeypatch):
    """README: plugins run only from the recipe's folder or below it. A module name was imported from
    wherever sys.path reached (the current folder under ``python -m``): now it names a file there."""
    marker = tmp_path / "RAN_FROM_ELSEWHERE"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write(elsewhere, "helper_mod_xyz.py", f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(elsewhere)
    monkeypatch.syspath_prepend(str(elsewhere))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    r = _write(recipes, "r.yaml", "plugins: [helper_mod_xyz]\ncandidates:\n  - method: dfr\n")
    for load in (lambda: load_recipe(r, allow_plugins=True), lambda: validate_recipe(r)):
        with pytest.raises(BadInput, match="module helper_mod_xyz not found in the recipe's folder"):
            load()
        assert not marker.exists()
    # a module beside the recipe (a file, or a package below it) is imported from there, and is one of its files
    ran = tmp_path / "ran"
    reg = ("from dataclasses import dataclass\nfrom repair.methods import register_method\n\n\n@dataclass\n"
           "class C:\n    pass\n\n\n@register_method({name!r}, summary='x', config=C, groups='never')\n"
           "def m(inputs, config):\n    return None\n")
    _write(recipes, "plug_mod_xyz.py", reg.format(name="plug_mod_method") + f"open({str(ran)!r}, 'w').close()\n")
    (recipes / "pkg_xyz" / "sub").mkdir(parents=True)
    _write(recipes / "pkg_xyz" / "sub", "__init__.py", "from .impl import *\n")
    _write(recipes / "pkg_xyz" / "sub", "impl.py", reg.format(name="pkg_mod_method"))
    r2 = _write(recipes, "r2.yaml", "plugins: [plug_mod_xyz, pkg_xyz.sub]\ncandidates:\n  - method: plug_mod_method\n"
                                    "  - method: pkg_mod_method\n")
    from repair.methods import METHODS

    try:
        rec = load_recipe(r2, allow_plugins=True)
        assert ran.exists() and [c.method for c in rec.candidates] == ["plug_mod_method", "pkg_mod_method"]
        assert (recipes / "plug_mod_xyz.py").resolve() in rec.files
        assert (recipes / "pkg_xyz" / "sub" / "__init__.py").resolve() in rec.files
    finally:                            # registered for this test only (the benchmark lists every method)
        for name in ("plug_mod_method", "pkg_mod_method"):
            METHODS.unregister(name)


def test_folds_and_repeats_that_compare_nothing_are_refused(tmp_path):
    """One candidate is fitted once (no folds are made: the choice has nothing to compare), and the
    repeats score two or more head repairs only (a model repair is compared with a head on the first
    repeat's folds): changed from their defaults there, they did nothing and were accepted."""
    from repair.recipes import Candidate, Recipe

    for text, needle in (("folds: 20\ncandidates:\n  - method: afr\n", "folds 20"),
                         ("folds: 3\ncandidates:\n  - method: mixft\n", "folds 3"),
                         ("repeats: 20\ncandidates:\n  - method: afr\n", "repeats 20"),
                         ("repeats: 2\ncandidates:\n  - method: dfr\n  - method: mixft\n", "repeats 2"),
                         ("repeats: 2\ncandidates:\n  - method: mixft\n  - method: clp\n", "repeats 2")):
        _refused(_write(tmp_path, "r.yaml", text), "r.yaml", needle, validate=True)
    with pytest.raises(BadInput, match="folds 5"):
        Recipe("one", [Candidate("dfr")], folds=5)
    # where they act (several candidates; two heads for repeats), and their defaults restated, are taken
    assert load_recipe(_write(tmp_path, "ok.yaml", "folds: 2\nrepeats: 1\ncandidates:\n  - method: afr\n")).folds == 2
    assert load_recipe(_write(tmp_path, "ok2.yaml", "folds: 3\ncandidates:\n  - method: dfr\n"
                                                    "  - method: mixft\n")).folds == 3
    assert Recipe("two", [Candidate("dfr"), Candidate("afr")], folds=4, repeats=3).repeats == 3


def test_a_recipe_file_named_like_a_builtin_must_be_that_recipe(tmp_path):
    """The outputs record a recipe by its name: a file of one's own called ``auto`` (or ``auto.yaml``
    without a ``name:``) was recorded as the built-in auto. It is taken only when it is that recipe."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    _refused(_write(tmp_path, "mine.yaml", "name: auto\ncandidates:\n  - method: nsf\n"), "mine.yaml",
             "recipe 'auto'", "name of its own", validate=True)
    (tmp_path / "sub").mkdir()
    _refused(_write(tmp_path / "sub", "auto.yaml", "candidates:\n  - method: dfr\n"), "auto.yaml",
             "recipe 'auto'", "no name: given")
    _refused(_write(tmp_path, "d.yaml", "name: dfr\ncandidates:\n  - {method: dfr, params: {protocol: paper}}\n"),
             "recipe 'dfr'")
    _refused(_write(tmp_path, "m.yaml", "name: mixft\ncandidates:\n  - {method: mixft, params: {epochs: 1.0}}\n"),
             "recipe 'mixft'")
    # a copy of a built-in, or the method at its defaults under its own name (the benchmark's rows), is that recipe
    shutil.copy(root / "recipes" / "mixft.yaml", tmp_path / "copy.yaml")
    assert load_recipe(tmp_path / "copy.yaml").name == "mixft"
    assert load_recipe(_write(tmp_path, "b.yaml", "name: mixft\ncandidates:\n  - method: mixft\n")).name == "mixft"
    assert load_recipe(_write(tmp_path, "f.yaml", "name: finetune\ncandidates:\n  - method: finetune\n")).name
    assert load_recipe(_write(tmp_path, "own.yaml", "name: my-auto\ncandidates:\n  - method: nsf\n")).name == "my-auto"


def test_two_merge_keys_in_one_mapping_are_a_duplicate_key(tmp_path):
    """``<<: {protocol: paper}`` then ``<<: {protocol: fast}`` in one mapping: one silently won."""
    _refused(_write(tmp_path, "dup.yaml", "name: x\ncandidates:\n  - method: dfr\n    params:\n"
                                          "      <<: {protocol: paper}\n      <<: {protocol: fast}\n"),
             "dup.yaml", "duplicate key '<<'", "line 6", validate=True)
    ok = _write(tmp_path, "ok.yaml", "candidates:\n  - method: dfr\n    params:\n"
                                     "      <<: [{protocol: paper}, {min_subsample_per_group: 2}]\n")
    assert load_recipe(ok).candidates[0].params == {"protocol": "paper", "min_subsample_per_group": 2}


def test_a_recipe_or_journal_that_is_not_utf8_is_named_with_its_line(tmp_path):
    """Tables said the line of a byte that is not UTF-8 (repair.data.not_utf8); a recipe file and a zoo
    journal said only the byte's offset: one message for all three."""
    from repair.zoo import Journal

    f = tmp_path / "r.yaml"
    f.write_bytes(b"name: x\ncandidates:\n  - method: dfr  # caf\xe9\n")
    with pytest.raises(BadInput, match=r"not UTF-8 text \(line 3, byte 42"):
        load_recipe(f)
    f.write_bytes(b"\xff\xfen\x00a\x00")
    with pytest.raises(BadInput, match="is UTF-16 text"):
        load_recipe(f)
    j = tmp_path / "journal.jsonl"
    j.write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    with pytest.raises(BadInput, match=r"not a journal: not UTF-8 text \(line 2,"):
        Journal(j).read()


def test_a_recipe_name_with_a_space_around_it_is_refused(tmp_path):
    """Found by an audit: `name: "mixft "` (a changed copy of mixft.yaml) passed the built-in name check
    and printed as the built-in `recipe mixft`. A name never starts or ends with a space."""
    src = (Path(__file__).parents[1] / "recipes" / "mixft.yaml").read_text()
    for name in ('"mixft "', '" mixft"', '"my recipe "'):
        f = _write(tmp_path, "r.yaml", src.replace("name: mixft", f"name: {name}", 1).replace("0.0001", "0.001", 1))
        _refused(str(f), "r.yaml", "must not start or end with a space", validate=True)
