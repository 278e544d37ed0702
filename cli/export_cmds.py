"""`repair export` and `repair verify`: write a model as ONNX or safetensors and
prove an ONNX file computes what the reference model computes."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from repair.errors import GateFailed
from repair.outputs import DEFAULT_MAX_VERIFY

from .app import app, command, emit_json, logger, one_line, say
from .format import pct, table
from .options import PANEL_OUTPUT, AsJson, DataPath, ExportRuntime, ItemColumns, Load, ModelArg

PANEL_VERIFY = "Verification"
Format = Annotated[str, typer.Option("--format", "-f", rich_help_panel=PANEL_OUTPUT, help="onnx | safetensors.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", rich_help_panel=PANEL_OUTPUT, help="Output path (default: beside the model: <name>.onnx, or <name>-export / <name>.export.safetensors).")]
Tolerance = Annotated[Optional[float], typer.Option(
    "--tolerance", rich_help_panel=PANEL_VERIFY, help="An absolute max |logit difference| ONNX vs PyTorch, in logit units (default: 1e-5 + 1e-3 x the larger of the logit and the sample's top logit, each less the head's bias, + 1e-5 x their magnitude; the JSON says which bound applied).")]
Force = Annotated[bool, typer.Option("--force", rich_help_panel=PANEL_OUTPUT, help="Overwrite an existing output (never an input; a folder only when empty or written by repair and holding nothing else). Default: refuse.")]
MaxVerify = Annotated[int, typer.Option(
    "--max-verify", min=1, rich_help_panel=PANEL_VERIFY, help="Samples of the data to verify on (argmax agreement and max difference over all of them).")]
Opset = Annotated[Optional[int], typer.Option("--opset", rich_help_panel=PANEL_OUTPUT, help="ONNX opset (default: the exporter's).")]
Exporter = Annotated[str, typer.Option("--exporter", rich_help_panel=PANEL_OUTPUT, help="auto (the current torch exporter, then TorchScript, saying why) | dynamo | torchscript.")]


def _verify_rows(rep: dict) -> list[list]:
    mad = rep.get("max_abs_diff")
    # the logit nearest its bound (or past it the most): its |diff| beside what it was allowed -- the largest
    # bound of the batch beside the largest |diff| read as a pass where the file failed (audit)
    w = (rep.get("bound") or {}).get("worst") or {}
    worst = (f"{w['abs_diff']:.3g} / {w['allowed']:.3g}" if "abs_diff" in w and "allowed" in w
             else f"- / {rep['tolerance']:g}")
    return [[rep.get("logits_output") or "-",
             "[" + ", ".join(str(d) for d in (rep.get("shapes") or {}).get(rep.get("logits_output") or "", [])) + "]",
             "-" if mad is None else f"{mad:.3g}", worst,
             "-" if rep.get("argmax_agreement") is None else pct(rep["argmax_agreement"]),
             rep.get("n_verified", 0)]]


def fallback_line(rep: dict) -> Optional[str]:
    """Why an export used the TorchScript exporter (the report's ``exporter_fallback``), as the human output
    says it; None when it was not a fallback. Part of the result, on stdout (``--quiet`` too)."""
    why = rep.get("exporter_fallback")
    return f"TorchScript exporter used: {why}" if why else None


def print_verify_report(rep: dict, title: str) -> None:
    say(title)
    if fallback_line(rep):
        say(fallback_line(rep))
    say(table(["output", "shape", "max |diff|", "worst logit: |diff| / allowed", "argmax agree", "n"], _verify_rows(rep)))
    extra = f"batch sizes {rep.get('batch_sizes')}"
    if rep.get("export_batch_size"):
        extra += f" (export example batch {rep['export_batch_size']})"
    if rep.get("near_ties"):
        extra += f", {rep['near_ties']} near-tie argmax flip(s)"
    if rep.get("head_check_max_abs_diff") is not None:
        extra += f", embeddings @ W.T + b vs file: {rep['head_check_max_abs_diff']:.3g}"
    say(f"{extra}; providers {', '.join(rep.get('providers') or [])}")
    say("PASSED" if rep.get("passed") else "FAILED: " + "; ".join(rep.get("problems") or []))


# ------------------------------------------------------------------ export
@app.command("export")
@command
def export_cmd(model: ModelArg, data: DataPath = None, fmt: Format = "onnx", out: Out = None,
               tolerance: Tolerance = None, force: Force = False, max_verify: MaxVerify = DEFAULT_MAX_VERIFY,
               opset: Opset = None, exporter: Exporter = "auto", *,
               columns: ItemColumns, load: Load, runtime: ExportRuntime, as_json: AsJson = False):
    """Export a model as ONNX (verified with onnxruntime on samples of --data) or safetensors."""
    from repair.outputs import export_model

    try:
        rep = export_model(model, out, data=data, format=fmt, load_options=load, data_options=columns,
                           tolerance=tolerance, opset=opset, exporter=exporter, max_verify=max_verify, force=force,
                           device=runtime.device, log=logger(runtime))
    except GateFailed as e:
        rep = getattr(e, "report", None)
        if rep is not None:
            if as_json:
                emit_json(rep)
            else:
                print_verify_report(rep, f"ONNX export of {one_line(model)} FAILED verification; nothing written")
        raise
    if as_json:
        emit_json(rep)
    elif rep.get("format") == "safetensors":
        say(f"wrote {one_line(rep['path'])} ({rep['n_tensors']} tensors; metadata {', '.join(rep['metadata_keys'])})")
    else:
        print_verify_report(rep, f"wrote {one_line(rep['path'])} ({rep['exporter']} exporter, opset {rep['opset']}, "
                                 f"inputs {', '.join(rep['input_names'])})")


# ------------------------------------------------------------------ verify
@app.command("verify")
@command
def verify_cmd(model: Annotated[Path, typer.Argument(help="The ONNX file to check.")],
               reference: Annotated[Path, typer.Option("--reference", "-r", help="The model it should match (any supported checkpoint).")],
               data: DataPath, tolerance: Tolerance = None, max_verify: MaxVerify = DEFAULT_MAX_VERIFY, *,
               columns: ItemColumns, load: Load, runtime: ExportRuntime, as_json: AsJson = False):
    """Check an ONNX file against a reference model on samples of --data (exit 1 if it differs)."""
    from repair.outputs import verify_model

    rep = verify_model(model, reference, data, load_options=load, data_options=columns, tolerance=tolerance,
                       max_verify=max_verify, device=runtime.device, log=logger(runtime))
    if as_json:
        emit_json(rep)
    else:
        print_verify_report(rep, f"{one_line(model)} vs {one_line(reference)} on {rep['n_verified']} samples of "
                                 f"{one_line(data)}")
    if not rep["passed"]:
        raise GateFailed("ONNX verification failed: " + "; ".join(rep["problems"]))
