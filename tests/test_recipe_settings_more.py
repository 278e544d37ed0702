"""A recipe's settings are refused before any work when they leave nothing to run (neurontune with no
threshold and no "no mask" candidate), and a number YAML reads as text gets the same hint inside a
list as alone, shown as the list the user wrote: exit 2, one line naming the file, candidate and setting."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_images, make_timm_folder, one_line_naming, run_cli
from repair.config import ConfigError
from repair.errors import BadInput
from repair.methods import get_method
from repair.recipes import load_recipe

HINT = "(YAML reads 1e-3 as text: write it with a decimal point"


def _recipe(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- neurontune: no candidate left

def test_neurontune_with_no_threshold_and_no_unmasked_candidate_is_refused_before_any_work(tmp_path):
    model, data = make_timm_folder(tmp_path / "model"), make_images(tmp_path / "data")
    r = _recipe(tmp_path, "r.yaml", "name: b2\ncandidates: [{method: neurontune, params: "
                                    "{threshold_quantiles: [], include_no_mask: false}}]\n")
    out = tmp_path / "out"
    code, _, err = run_cli("fix", model, "-d", data, "--recipe", r, "-o", out, "--json")
    one_line_naming(code, err, r, f"{r}: candidate 1 (neurontune): setting 'threshold_quantiles':",
                    "include_no_mask", "no candidate")
    assert not out.exists()
    with pytest.raises(BadInput) as e:
        load_recipe(str(r))
    assert str(e.value).startswith(f"{r}: candidate 1 (neurontune): setting 'threshold_quantiles':"), str(e.value)


def test_neurontune_config_from_python_refuses_the_same_and_keeps_what_leaves_a_candidate():
    info = get_method("neurontune")
    with pytest.raises(ConfigError) as e:
        info.make_config({"threshold_quantiles": [], "include_no_mask": False})
    assert e.value.key == "threshold_quantiles" and "include_no_mask" in str(e.value)
    # masking nothing is the one candidate; or the thresholds are, without it
    assert info.make_config({"threshold_quantiles": []}).include_no_mask is True
    assert info.make_config({"threshold_quantiles": [0.9], "include_no_mask": False}).threshold_quantiles == (0.9,)
    assert info.make_config({"include_no_mask": False}).threshold_quantiles


# ---------------------------------------------------------------- a number read as text inside a list

@pytest.mark.parametrize("method, key, written, shown", [
    ("dfr", "c_grid", "[1e-3, 1.0]", "['1e-3', 1.0]"),           # a grid with no default (bounds say numbers)
    ("afr", "gamma_grid", "[1.0, 1e-3]", "[1.0, '1e-3']"),       # a grid whose default holds numbers
])
def test_a_number_read_as_text_in_a_list_gets_the_hint_and_is_shown_as_written(tmp_path, method, key, written, shown):
    r = _recipe(tmp_path, "c.yaml", f"candidates: [{{method: {method}, params: {{{key}: {written}}}}}]\n")
    with pytest.raises(BadInput) as e:
        load_recipe(str(r))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{r}: candidate 1 ({method}): setting '{key}': must be a list of numbers, got {shown} "), msg
    assert HINT in msg, msg
    # one hint text: a single number gets the very same words
    with pytest.raises(ConfigError) as one:
        get_method("dfr").make_config({"tol": "1e-3"})
    assert HINT in str(one.value)
    # text that is no number gets no hint
    with pytest.raises(ConfigError) as word:
        get_method(method).make_config({key: ["big", 1.0]})
    assert "YAML reads" not in str(word.value) and "['big', 1.0]" in str(word.value)
