"""What a small or one-group repair set cannot support is said for every recipe (degenerate-input
audit, session 45): a single head method makes a choice too (dfr's strength by cross-validation), and
a --group-by column with one value is no groups at all."""
from __future__ import annotations

import csv
import json

from conftest import make_images, make_timm_folder, run_cli


def test_a_single_head_method_warns_that_its_own_choice_rests_on_few_samples(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=8)
    code, out, err = run_cli("fix", m, "--data", data, "--recipe", "dfr", "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    warned = json.loads(out)["warnings"]
    assert any(w.startswith("choosing dfr's settings:") and "fewer than 20" in w for w in warned), warned
    # one strength given: nothing to choose, nothing said of the choice (review)
    (tmp_path / "fixed.yaml").write_text("candidates:\n  - method: dfr\n    params: {protocol: fast, c_grid: [1.0]}\n")
    code, out, err = run_cli("fix", m, "--data", data, "--recipe", tmp_path / "fixed.yaml", "--out", tmp_path / "o2",
                             "--json", "-q")
    assert code == 0, err
    assert not any("choosing" in w for w in json.loads(out)["warnings"]), json.loads(out)["warnings"]


def test_a_group_column_of_one_value_is_said(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=8)
    rows = list(csv.DictReader(open(data / "metadata.csv")))
    for r in rows:
        r["place"] = "land"
    with open(data / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    code, out, err = run_cli("eval", m, "--data", data, "--group-by", "place", "--json", "-q")
    assert code == 0, err
    warned = json.loads(out)["warnings"]
    assert any("group column 'place' holds one value ('land')" in w for w in warned), warned
    # a column with two values says nothing of the kind
    data2 = make_images(tmp_path / "d2", n_per_class=8)
    code, out, err = run_cli("eval", m, "--data", data2, "--group-by", "place", "--json", "-q")
    assert code == 0, err
    assert not any("holds one value" in w for w in json.loads(out)["warnings"])
