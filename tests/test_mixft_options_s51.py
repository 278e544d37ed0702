"""mixft's settings that no test ran (found by the session's line coverage): groups inferred by k-means
clusters, partners of any class, a Beta-drawn mixing weight, unmixed rows in a batch (images and texts),
LoRA refused on the head alone. Each runs end to end through ``repair fix`` and the record says what ran."""
from __future__ import annotations

import json

from conftest import run_cli
from test_mixft import _recipe, shortcut_bert, shortcut_cnn  # noqa: F401  (fixtures)


def _fix(model, val, recipe, out):
    code, stdout, err = run_cli("fix", model, "--data", val, "--recipe", recipe, "--budget", "3steps",
                                "--out", out, "--json", "-q")
    assert code == 0, err
    return json.loads(stdout)


def test_clusters_any_class_partners_and_beta_mixing_on_images(shortcut_cnn, tmp_path):
    model, val, _ = shortcut_cnn
    recipe = _recipe(tmp_path / "opts.yaml", epochs=1, inferred="clusters", n_clusters=3, partner="any_class",
                     mix_beta=0.5, mix_fraction=0.5)
    rep = _fix(model, val, recipe, tmp_path / "out")
    d = rep["diagnostics"]
    assert rep["kind"] == "model" and d["groups"] == "inferred: clusters"
    mixing = d["mixing"]
    assert (mixing["partner"], mixing["mix_beta"], mixing["mix_fraction"]) == ("any_class", 0.5, 0.5)
    sizes = mixing["group_sizes_train"]             # 2 classes x 3 clusters, every training row in one
    assert len(sizes) == 6 and sum(sizes) == d["session"]["n_train"] and min(sizes) >= 1
    assert d["loop"]["steps"] == 3
    again = _fix(model, val, recipe, tmp_path / "again")     # seeded: the same clusters and draws
    assert again["diagnostics"]["mixing"]["group_sizes_train"] == sizes
    assert again["diagnostics"]["loop"]["history"] == d["loop"]["history"]


def test_unmixed_rows_in_a_text_batch(shortcut_bert, tmp_path):
    model, val, _ = shortcut_bert
    recipe = _recipe(tmp_path / "half.yaml", epochs=1, mix_fraction=0.5, scope="last:1")
    rep = _fix(model, val, recipe, tmp_path / "out")
    mixing = rep["diagnostics"]["mixing"]
    assert rep["kind"] == "model" and mixing["mix_fraction"] == 0.5 and mixing["space"] != "preprocessed pixels"
    assert rep["diagnostics"]["loop"]["steps"] == 3


def test_lora_on_the_head_alone_is_refused(shortcut_cnn, tmp_path):
    model, val, _ = shortcut_cnn
    recipe = _recipe(tmp_path / "lora.yaml", epochs=1, lora=True, scope="head")
    code, stdout, err = run_cli("fix", model, "--data", val, "--recipe", recipe, "--out", tmp_path / "x", "-q")
    assert code == 2 and stdout == ""
    assert "LoRA adapters need a scope beyond the head" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
