"""The export's options have one home each: the format name (any case) for `repair export --format`,
`repair fix --export` and a fix's options alike; the ONNX export's own options (tolerance, sample count,
opset, exporter) refused wherever no ONNX file is written, never silently ignored."""
from __future__ import annotations

import pytest

from conftest import run_cli
from repair.errors import BadInput


@pytest.mark.parametrize("args, option", [(("--tolerance", "-1"), "--tolerance"), (("--opset", "13"), "--opset"),
                                          (("--max-verify", "10"), "--max-verify"),
                                          (("--exporter", "torchscript"), "--exporter")])
def test_a_safetensors_export_refuses_the_onnx_options_and_writes_nothing(timm_folder, tmp_path, args, option):
    out = tmp_path / "st"
    code, _, err = run_cli("export", timm_folder, "--format", "safetensors", "--out", out, "-q", *args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and option in lines[0] and "--format onnx" in lines[0], err
    assert not out.exists()


def test_the_format_name_is_read_alike_by_export_and_fix(timm_folder, tmp_path):
    from repair.pipeline import FixOptions
    from repair.rules import check_format

    code, _, err = run_cli("export", timm_folder, "--format", "SafeTensors", "--out", tmp_path / "st", "-q")
    assert code == 0, err
    assert FixOptions(export="ONNX").export == "onnx" == check_format("Onnx", "--export", ("onnx",))
    for bad in ("safetensors", "onnx2", 1):
        with pytest.raises(BadInput, match="must be onnx"):
            FixOptions(export=bad)


@pytest.mark.parametrize("option, value", [("tolerance", 1e-3), ("max_verify", 10)])
def test_a_fix_without_an_onnx_export_refuses_its_options(option, value):
    from repair.pipeline import FixOptions

    with pytest.raises(BadInput, match="give --export onnx too"):
        FixOptions(**{option: value})
    assert getattr(FixOptions(export="onnx", **{option: value}), option) == value


def test_a_zoo_rows_export_is_read_as_fix_reads_it(tmp_path):
    from conftest import make_zoo_parts
    from repair.zoo import load_manifest

    parts = make_zoo_parts(tmp_path / "parts")
    (tmp_path / "outs").mkdir()
    path = tmp_path / "zoo.yaml"
    path.write_text(f"defaults:\n  recipe: dfr\nmodels:\n  - name: a\n    checkpoint: {parts / 'm0'}\n    data: {parts / 'val'}\n"
                    f"    group_by: place\n    export: ONNX\n    output: {tmp_path / 'outs' / 'a'}\n")
    (entry,) = load_manifest(path).entries
    assert entry.export == "onnx"
    path.write_text(path.read_text().replace("export: ONNX", "export: safetensors"))
    with pytest.raises(BadInput, match="export: must be onnx, got 'safetensors'"):
        load_manifest(path)
