"""`repair export` and `repair verify`: write a model as ONNX or safetensors and
prove an ONNX file computes what the reference model computes."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from repair.errors import BadInput, GateFailed

from .app import app, command, emit_json, log
from .format import pct, table
from .options import AsJson, DataPath, ExportRuntime, ItemColumns, Load, ModelArg

Format = Annotated[str, typer.Option("--format", "-f", help="onnx | safetensors.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output path (default: beside the model).")]
Tolerance = Annotated[Optional[float], typer.Option(
    "--tolerance", help="Max |logit difference| ONNX vs PyTorch (default 1e-3 image, 1e-4 text).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
MaxVerify = Annotated[int, typer.Option(
    "--max-verify", min=1, help="Samples of the data to verify on (argmax agreement and max difference over all of them).")]
Opset = Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the exporter's).")]
Exporter = Annotated[str, typer.Option("--exporter", help="auto (dynamo, then TorchScript) | dynamo | torchscript.")]


def default_out(model: Path, fmt: str) -> Path:
    name = model.name.rstrip("/") if model.is_dir() else model.stem
    parent = model.parent
    if fmt == "onnx":
        out = parent / f"{name}.onnx"
        return parent / f"{name}.export.onnx" if out.resolve() == model.resolve() else out
    if model.is_dir():
        return parent / f"{name}-export"
    return parent / f"{name}.export.safetensors"


def _provenance(adapter, fmt: str) -> dict[str, str]:
    from repair import provenance

    export_info = {"format": fmt, "source": adapter.source.name, "source_sha256": adapter.source_sha256()}
    src = dict(getattr(adapter, "source_metadata", {}) or {})
    if any(k.startswith(provenance.PREFIX) for k in src):
        # an already repaired model: keep its provenance, note the export
        meta = {k: v for k, v in src.items() if k.startswith(provenance.PREFIX)}
        meta["format"] = "pt"
        meta[f"{provenance.PREFIX}export"] = provenance.canonical_json(export_info)
        return meta
    return provenance.build(source_sha256=adapter.source_sha256(), method="none",
                            extra={"export": export_info})


def _verify_rows(rep: dict) -> list[list]:
    mad = rep.get("max_abs_diff")
    return [[rep.get("logits_output") or "-",
             "[" + ", ".join(str(d) for d in (rep.get("shapes") or {}).get(rep.get("logits_output") or "", [])) + "]",
             "-" if mad is None else f"{mad:.3g}", f"{rep['tolerance']:g}",
             "-" if rep.get("argmax_agreement") is None else pct(rep["argmax_agreement"]),
             rep.get("n_verified", 0)]]


def print_verify_report(rep: dict, title: str) -> None:
    print(title)
    print(table(["output", "shape", "max |diff|", "tolerance", "argmax agree", "n"], _verify_rows(rep)))
    extra = f"batch sizes {rep.get('batch_sizes')}"
    if rep.get("export_batch_size"):
        extra += f" (export example batch {rep['export_batch_size']})"
    if rep.get("near_ties"):
        extra += f", {rep['near_ties']} near-tie argmax flip(s)"
    if rep.get("head_check_max_abs_diff") is not None:
        extra += f", embeddings @ W.T + b vs file: {rep['head_check_max_abs_diff']:.3g}"
    print(f"{extra}; providers {', '.join(rep.get('providers') or [])}")
    print("PASSED" if rep.get("passed") else "FAILED: " + "; ".join(rep.get("problems") or []))


def _verify_items(d, adapter, max_verify: int):
    """Samples of the data ``d`` (read before the model was loaded) to verify on."""
    from repair.api import check_modality
    from repair.export import pick_verify_items

    check_modality(adapter, d)
    return pick_verify_items(d.items, max_verify)


# ------------------------------------------------------------------ export
@app.command("export")
@command
def export_cmd(model: ModelArg, data: DataPath = None, fmt: Format = "onnx", out: Out = None,
               tolerance: Tolerance = None, force: Force = False, max_verify: MaxVerify = 512,
               opset: Opset = None, exporter: Exporter = "auto", *,
               columns: ItemColumns, load: Load, runtime: ExportRuntime, as_json: AsJson = False):
    """Export a model as ONNX (verified with onnxruntime on samples of --data) or safetensors."""
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.io import check_output
    from repair.preflight import FILE_SUFFIXES, check_not_an_input

    fmt = fmt.lower()
    if fmt not in ("onnx", "safetensors"):
        raise BadInput(f"--format must be onnx or safetensors, got {fmt!r}")
    say = log if runtime.progress else (lambda m: None)
    # ---- everything checked before the model is loaded
    if not model.exists():
        raise BadInput("model not found", model)
    out = out or default_out(model, fmt)
    if fmt == "onnx":
        if data is None:
            raise BadInput("--data is needed for an ONNX export: the export is verified on samples of it")
        loaded = load_data(data, columns)
        from repair.export import check_export_options

        check_export_options(opset, exporter, tolerance)
        if out.suffix.lower() != ".onnx":
            raise BadInput("the ONNX output file name must end in .onnx", out)
    elif not model.is_dir() and out.suffix.lower() != ".safetensors":
        raise BadInput("the safetensors output file name must end in .safetensors", out)
    elif model.is_dir() and out.suffix.lower() in FILE_SUFFIXES:
        raise BadInput(f"the safetensors export of a checkpoint folder is a folder; a name ending in "
                       f"{out.suffix} would be taken for a weights file", out)
    check_not_an_input(out, {"input model": model, "data (--data)": data})
    check_output(out, force=force, log=say)
    from repair.export import export_onnx, export_safetensors

    adapter = load_model(model, load)
    meta = _provenance(adapter, fmt)
    if fmt == "safetensors":
        rep = export_safetensors(adapter, out, meta, force=force)
        if as_json:
            emit_json(rep)
        else:
            print(f"wrote {rep['path']} ({rep['n_tensors']} tensors; metadata {', '.join(rep['metadata_keys'])})")
        return
    items = _verify_items(loaded, adapter, max_verify)
    try:
        rep = export_onnx(adapter, out, metadata=meta, verify_items=items, tolerance=tolerance, opset=opset,
                          force=force, device=runtime.device, exporter=exporter, progress=say)
    except GateFailed as e:
        rep = getattr(e, "report", None)
        if rep is not None:
            if as_json:
                emit_json(rep)
            else:
                print_verify_report(rep, f"ONNX export of {model} FAILED verification; nothing written")
        raise
    if as_json:
        emit_json(rep)
    else:
        print_verify_report(rep, f"wrote {rep['path']} ({rep['exporter']} exporter, opset {rep['opset']}, "
                                 f"inputs {', '.join(rep['input_names'])})")


# ------------------------------------------------------------------ verify
@app.command("verify")
@command
def verify_cmd(model: Annotated[Path, typer.Argument(help="The ONNX file to check.")],
               reference: Annotated[Path, typer.Option("--reference", "-r", help="The model it should match (any supported checkpoint).")],
               data: DataPath, tolerance: Tolerance = None, max_verify: MaxVerify = 512, *,
               columns: ItemColumns, load: Load, runtime: ExportRuntime, as_json: AsJson = False):
    """Check an ONNX file against a reference model on samples of --data (exit 1 if it differs)."""
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.export import check_tolerance, verify_onnx

    if model.suffix.lower() != ".onnx":
        raise BadInput("expected an .onnx file", model)
    if not model.is_file():
        raise BadInput("ONNX model not found" if not model.exists() else "expected an .onnx file, got a folder", model)
    if not reference.exists():
        raise BadInput("reference model not found", reference)
    loaded = load_data(data, columns)
    if tolerance is not None:
        check_tolerance(tolerance)
    say = log if runtime.progress else (lambda m: None)
    ref = load_model(reference, load)
    items = _verify_items(loaded, ref, max_verify)
    rep = verify_onnx(model, ref, items, tolerance=tolerance, device=runtime.device, check=False, progress=say)
    if as_json:
        emit_json(rep)
    else:
        print_verify_report(rep, f"{model} vs {reference} on {rep['n_verified']} samples of {data}")
    if not rep["passed"]:
        raise GateFailed("ONNX verification failed: " + "; ".join(rep["problems"]))
