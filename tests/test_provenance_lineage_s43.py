"""A repaired model repaired again keeps the chain back to the first checkpoint (session 43's provenance
audit): the new record replaces the source's, and until now only its samples record carried over."""
from __future__ import annotations

import json

from conftest import make_images, make_timm_folder, run_cli
from repair.io import load_safetensors, sha256_file


def test_a_second_repair_records_the_first_in_its_lineage(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4)
    other = make_images(tmp_path / "d2", n_per_class=4, seed=5)
    code, _, err = run_cli("fix", m, "--data", data, "--recipe", "dfr", "--out", tmp_path / "one", "-q")
    assert code == 0, err
    code, _, err = run_cli("fix", tmp_path / "one", "--data", other, "--recipe", "afr", "--out", tmp_path / "two", "-q")
    assert code == 0, err
    _, first = load_safetensors(tmp_path / "one" / "model.safetensors")
    _, second = load_safetensors(tmp_path / "two" / "model.safetensors")
    assert "repair.lineage" not in first                       # repaired once: its record is the whole story
    chain = json.loads(second["repair.lineage"])
    assert len(chain) == 1
    assert chain[0]["source_sha256"] == sha256_file(m / "model.safetensors")      # back to the original
    assert chain[0]["method"] == "dfr" and chain[0]["recipe"] == "dfr"
    assert chain[0]["data_sha256"] == json.loads(first["repair.settings"])["data"]["content_sha256"]
    assert second["repair.method"] == "afr"
    assert second["repair.source_sha256"] == sha256_file(tmp_path / "one" / "model.safetensors")
    code, _, err = run_cli("fix", tmp_path / "two", "--data", make_images(tmp_path / "d3", n_per_class=4, seed=9),
                           "--recipe", "dfr", "--out", tmp_path / "three", "-q")
    assert code == 0, err
    _, third = load_safetensors(tmp_path / "three" / "model.safetensors")
    chain3 = json.loads(third["repair.lineage"])
    assert [e["method"] for e in chain3] == ["dfr", "afr"] and chain3[0] == chain[0]


def test_an_export_of_an_unrepaired_model_is_no_repair_in_the_lineage():
    from repair import provenance

    none = provenance.build(source_sha256="a" * 64, method="none", extra={"export": {"format": "onnx"}})
    assert provenance.lineage(none) is None
    fixed = provenance.build(source_sha256="b" * 64, method="dfr", settings={"recipe": "dfr"})
    chain = provenance.lineage(fixed)
    assert [e["method"] for e in chain] == ["dfr"]
    again = provenance.build(source_sha256="c" * 64, method="none", extra={"lineage": chain})
    assert provenance.lineage(again) == chain
