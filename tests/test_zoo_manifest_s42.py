"""CSV manifests (session 42): a row "commented out" with '#' after the header, and a gate default behind a
rule of markers ("# -- gate: 80%"), are exit 2 naming the line, before any model is touched."""
from __future__ import annotations

import pytest

from conftest import make_zoo_parts, run_cli
from test_zoo_manifest_checks import copy_parts, refused_before_any_work


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_zoo_parts(tmp_path_factory.mktemp("zoo-s42"), with_test=True)


@pytest.mark.parametrize("row", ["#b,m1,test,place", "# b,m1,test,place", "  #b,m1,test,place"])
def test_a_row_commented_out_after_the_header_is_exit_2(tmp_path, parts, row):
    """It ran as a model named '#b' (exit 0): the user's 'commented out' model was repaired or gated."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text(f"# gate: 0%\nname,checkpoint,data,group_by\na,m0,val,place\n{row}\n")
    for mode in ("eval", "fix"):
        code, _, err = run_cli("zoo", path, "--mode", mode, "-q")
        refused_before_any_work(code, err, tmp_path, f"{path}: line 4: ", "starts with '#'")


@pytest.mark.parametrize("line", ["# -- gate: 80%", "# --- gate = 80%", "# => gate: 80%", "# ** gate: 80%",
                                  # (the review: still comments after the first version of this fix)
                                  "# 1. gate: 80%", "# • gate: 80%", "# -gate: 80%", "# --gate 80%", "# --gate=80%",
                                  "# — gate: 80%", "# | gate | 80% |", "# (gate: 80%)", "# a) gate: 80%",
                                  # (the second review)
                                  "# ii) gate: 80%", "# iv. gate: 80%", "# [1] gate: 80%", "# 1 - gate: 80%",
                                  "# 1: gate: 80%", "# #1 gate: 80%", "# 1.1 gate: 80%"])
def test_a_gate_default_behind_a_rule_of_markers_is_exit_2(tmp_path, parts, line):
    """Read as a comment: the zoo ran ungated."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text(f"{line}\nname,checkpoint,data,group_by\na,m0,val,place\n")
    code, _, err = run_cli("zoo", path, "--mode", "eval", "-q")
    refused_before_any_work(code, err, tmp_path, f"{path}: line 1: ", repr(line))


def test_a_name_with_a_hash_inside_and_rulers_stay_as_they_were(tmp_path, parts):
    from repair.zoo import load_manifest

    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    # (the second review: legends and bracketed words, comments before this session, refused by its first
    # version of the number-setting rule)
    path.write_text("# -- recipe: a ruler line\n# ----------\n# => see the README\n# 1) name: a unique label\n"
                    "# (see data/README) Data lives here\n# ./data is the folder\n# 1. name: required\n"
                    "# 2. checkpoint: required\n# (name: required)\n# [data]\n# (gate)\n# *name*\n"
                    "# ... data folder\n# ~/data images\n# <checkpoint>\n# *Note*: gate defaults to none\n"
                    "# | name | checkpoint |\n# gate: 90%\n"
                    "name,checkpoint,data,group_by\na#1,m0,val,place\n\"#2\",m1,val,place\n")
    a, b = load_manifest(path, "eval").entries
    assert (a.name, a.gate, b.name) == ("a#1", "90%", "#2")        # a quoted "#2" is a name, as in YAML


def test_a_comment_after_the_header_says_so(tmp_path, parts):
    """It was refused as a short row ("fewer fields than the header"), which misleads."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text("name,checkpoint,data,group_by\na,m0,val,place\n# staging models below\n")
    code, _, err = run_cli("zoo", path, "--mode", "eval", "-q")
    refused_before_any_work(code, err, tmp_path, f"{path}: line 3: ", "starts with '#' after the header")
