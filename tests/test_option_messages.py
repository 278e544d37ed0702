"""Messages and homes of option and setting rules: a recipe's scope named with its recipe, a scope wider
than the model said, a --max-pixels no image can meet refused once, an ONNX output written beside a
preprocess.json that disagrees with it refused, and the yes/no rule at home in repair.rules."""
from __future__ import annotations

import json

import pytest

from conftest import make_images, make_timm_folder, one_line_naming, run_cli


# ---------------------------------------------------------------- check_bool lives in repair.rules
def test_check_bool_is_an_option_rule_and_still_importable_from_data():
    from repair import data, rules
    from repair.errors import BadInput

    assert "check_bool" in rules.__all__
    assert rules.check_bool(True, "--force") is True
    with pytest.raises(BadInput, match="--force must be true or false"):
        rules.check_bool("no", "--force")
    assert data.check_bool is rules.check_bool          # code that imports it from data keeps working
