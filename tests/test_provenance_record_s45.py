"""A written model says what produced it (determinism audit, session 45): every library whose numerics
shape the weights (the embedding cache key's list, one list), the interpreter and the CPU kernels,
the command line's sources in the source digest, and for an ONNX file the exporter and opset."""
from __future__ import annotations

import json

import onnx
from conftest import CLASSES, make_deployed_onnx, make_images, make_timm_folder, run_cli

from repair import provenance
from repair.embeddings import CODE_LIBRARIES, code_key


def test_the_code_record_holds_every_library_of_the_cache_key_and_the_machine():
    code = provenance.code_identity()
    libs = code_key()["libraries"]
    assert CODE_LIBRARIES is provenance.CODE_LIBRARIES
    for name, version in libs.items():
        if version is not None:                 # installed: recorded with the version the key holds
            assert code.get(name) == version, (name, code.get(name), version)
    assert code["python"].count(".") == 2 and code["machine"] and code["torch"]


def test_the_code_record_is_the_same_whatever_was_imported_first():
    """torchvision's module says 0.29.1+cu130 where its metadata says 0.29.1: the record read the module
    once it was imported, so two runs of one install recorded different versions (review)."""
    import subprocess
    import sys

    prog = ("import json, sys\n{pre}from repair.provenance import code_identity\n"
            "c = code_identity(); c.pop('sources_sha256'); print(json.dumps(c, sort_keys=True))")
    runs = [subprocess.run([sys.executable, "-c", prog.format(pre=pre)], capture_output=True, text=True,
                           check=True).stdout for pre in ("", "import torchvision, timm, numpy, PIL\n")]
    assert runs[0] == runs[1], runs


def test_the_source_digest_covers_the_command_line(tmp_path, monkeypatch):
    cli = tmp_path / "cli"
    cli.mkdir()
    (cli / "options.py").write_text("DEFAULT = 1\n")
    monkeypatch.setattr(provenance, "_cli_dir", lambda: cli)
    monkeypatch.setattr(provenance, "_CODE", {})
    a = provenance.code_identity()["sources_sha256"]
    (cli / "options.py").write_text("DEFAULT = 2\n")          # an option's default changed
    monkeypatch.setattr(provenance, "_CODE", {})
    assert provenance.code_identity()["sources_sha256"] != a


def test_the_real_cli_is_found():
    d = provenance._cli_dir()
    assert d is not None and (d / "main.py").is_file()


def test_an_onnx_file_records_its_exporter_and_opset(tmp_path):
    timm = make_timm_folder(tmp_path / "timm")
    data = make_images(tmp_path / "imgs", n_per_class=2)
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli("export", timm, "--data", data, "--out", out, "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    rec = json.loads(meta["repair.exporter"])
    assert rec["exporter"] == rep["exporter"] and rec["opset"] == rep["opset"]
    assert rec["onnx"] == onnx.__version__ and rec["torch"]
    assert "repair.settings" in meta or "repair.method" in meta           # the provenance is still there
    # an ONNX model exported again: its own graph, "graph-edit"
    src, _ = make_deployed_onnx(tmp_path / "src.onnx")
    out2 = tmp_path / "again.onnx"
    code, stdout, err = run_cli("export", src, "--image-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                                "--class-names", ",".join(CLASSES), "--data", data, "--out", out2, "--json", "-q")
    assert code == 0, err
    meta2 = {p.key: p.value for p in onnx.load(str(out2)).metadata_props}
    assert json.loads(meta2["repair.exporter"])["exporter"] == "graph-edit" == json.loads(stdout)["exporter"]
