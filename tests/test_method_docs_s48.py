"""Session 48 (methods as documented audit):

- a recipe's range brackets say the setting's whole range (``batch_size [>= 1]`` was refused past 4096);
- a setting another setting makes do nothing is refused, not recorded as if used: recompose's
  ``mask_quantile`` without attribution masks, clp's with given masks, clp's ``infill`` without the
  counterfactual term; mixft's ``mix_point`` on an image model (it mixes in pixel space).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SETTING_LINE = re.compile(r"(\s+)(\w+):\s*[^#]*#.*?\[((?:>|>=|<|<=)[^\]]*)\]\s*$")


def _bracket(check: dict) -> str:
    def num(x):
        return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)

    ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    return ", ".join(f"{op} {num(check[k])}" for k, op in ops if check.get(k) is not None)


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_a_recipes_range_brackets_are_the_settings_ranges(recipe):
    from repair.methods import get_method

    method, seen = None, 0
    for line in (RECIPES / recipe).read_text().splitlines():
        m = re.match(r"\s*-\s*method:\s*(\S+)", line)
        if m:
            method = m.group(1)
        k = SETTING_LINE.match(line)
        if not (k and method):
            continue
        fields = {f.name: f for f in dataclasses.fields(get_method(method).config_cls)}
        check = fields[k.group(2)].metadata.get("check") or {}
        assert k.group(3) == _bracket(check), (recipe, k.group(2))
        seen += 1
    if recipe in ("clp.yaml", "mixft.yaml", "recompose.yaml"):      # the documented ones list every setting
        doc = yaml.safe_load((RECIPES / recipe).read_text())
        assert seen >= 10 and doc["candidates"], recipe


@pytest.mark.parametrize("method,params,key", [
    ("recompose", {"mask_quantile": 0.3}, "mask_quantile"),                       # masks: auto, never attribution
    ("recompose", {"masks": "contrast", "mask_quantile": 0.3}, "mask_quantile"),
    ("clp", {"masks": "given", "mask_quantile": 0.3}, "mask_quantile"),
    ("clp", {"counterfactual_weight": 0.0, "infill": "shuffle"}, "infill"),
])
def test_a_setting_another_makes_do_nothing_is_refused(method, params, key):
    from repair.config import ConfigError, build_config
    from repair.methods import get_method

    with pytest.raises(ConfigError) as e:
        build_config(get_method(method).config_cls, params)
    assert key in str(e.value) and "no effect" in str(e.value)


def test_the_settings_still_apply_where_they_have_an_effect():
    from repair.config import build_config
    from repair.methods import get_method

    build_config(get_method("recompose").config_cls, {"masks": "attribution", "mask_quantile": 0.3})
    build_config(get_method("clp").config_cls, {"masks": "attribution", "mask_quantile": 0.3})
    build_config(get_method("clp").config_cls, {"mask_quantile": 0.3})
    build_config(get_method("clp").config_cls, {"infill": "shuffle"})


def test_a_mix_point_on_an_image_model_is_refused_naming_its_recipe_before_any_work(tmp_path, timm_folder, image_data,
                                                                                 monkeypatch):
    """An image model mixes in pixel space: ``mix_point: 2`` did nothing, and was recorded in the candidate's
    label and the provenance as if used."""
    import json

    import repair.pipeline as pipeline
    from conftest import one_line_naming, run_cli

    def no_work(*a, **k):
        raise AssertionError("the repair set was embedded before the refusal")

    monkeypatch.setattr(pipeline, "prepare_data", no_work)
    r = tmp_path / "mp.yaml"
    r.write_text(json.dumps({"name": "mp", "candidates": [{"method": "dfr"},
                                                          {"method": "mixft", "params": {"mix_point": 2}}]}))
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", r, "--budget", "2steps",
                           "--out", tmp_path / "o", "-q", "--no-cache")
    line = one_line_naming(code, err, r, "candidate 2 (mixft)", "setting 'mix_point'", "text models only")
    assert line.startswith("error:") and not (tmp_path / "o").exists()
