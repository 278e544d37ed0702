"""`repair zoo MANIFEST`: a thin shim over ``repair.zoo.run_zoo``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from repair.errors import GateFailed, ZooModelsFailed
from repair.rules import install_hint

from .app import app, command, emit_json, logger, one_line, say
from .format import pct, table
from .options import AsJson, Runtime

_RAY_INSTALL = install_hint("zoo").replace("[", "\\[")      # rich reads [zoo] as markup


def zoo_table(doc: dict) -> str:
    from repair.display import gate_thresholds
    from repair.report import gate_summary, headline, zoo_summary_line

    rows = []
    for m in doc["models"]:
        r = m.get("result") or {}
        b, a = r.get("before"), r.get("after")
        wb, label = headline(b)
        wa, _ = headline(a)
        g = m.get("gate")
        gate = "-" if not g else f"{'pass' if g['passed'] else 'FAIL'} ({gate_summary(g)})"
        marks = gate_thresholds([g])
        wga = (f"{pct(wb, marks)} -> {pct(wa, marks)}" if a else pct(wb, marks)) + (
            "" if label == "WGA" or not b else f" ({label})")
        rows.append([m["name"], m["status"] if m["status"] != "done" else
                     ("redone" if m.get("redone") else "resumed" if m.get("resumed") else "done"),
                     r.get("candidate") or "-", wga if b else "-", pct((a or b or {}).get("accuracy"), marks), gate])
    head = ["model", "status", "method", "WGA before -> after" if doc["mode"] == "fix" else "WGA", "accuracy", "gate"]
    return "\n".join([table(head, rows), "",
                      f"{zoo_summary_line(doc)}; report {one_line(doc['report'])} (JSON beside it); "
                      f"wall time {doc['wall_seconds']:.1f}s"])


@app.command("zoo")
@command
def zoo_cmd(manifest: Annotated[Path, typer.Argument(help="YAML or CSV: one row per model (checkpoint, data, eval, group_by, recipe, gate, output, ...; defaults at the top).")],
            mode: Annotated[str, typer.Option("--mode", help="fix: repair every model; eval: gate only (nothing written but the report).", rich_help_panel="Zoo")] = "fix",
            out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Report and journal folder (default: <manifest>-zoo beside the manifest).", rich_help_panel="Output")] = None,
            journal: Annotated[Optional[Path], typer.Option("--journal", help="The resume journal (default: <out-dir>/journal.jsonl).", rich_help_panel="Output")] = None,
            ray: Annotated[Optional[str], typer.Option("--ray", help="auto: start a local Ray; ADDRESS: join that cluster (default: run locally, one model at a time). Needs Ray: " + _RAY_INSTALL + ".", rich_help_panel="Ray")] = None,
            workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="--ray auto: how many models at once (default: CPU count). Needs --ray.", rich_help_panel="Ray")] = None,
            cpus_per_model: Annotated[int, typer.Option("--cpus-per-model", min=1, help="CPU threads per model (Ray: num_cpus per task).", rich_help_panel="Zoo")] = 1,
            gpus_per_model: Annotated[float, typer.Option("--gpus-per-model", help="Ray: GPUs per task, a finite number from 0 (fractions allowed). Needs --ray.", rich_help_panel="Ray")] = 0,
            max_retries: Annotated[int, typer.Option("--max-retries", min=0, help="Ray: retries of a model whose worker died.", rich_help_panel="Ray")] = 3,
            force: Annotated[bool, typer.Option("--force", help="Replace outputs that exist and this zoo's journal did not write (never an input; a folder only when empty or written by repair and holding nothing else). Default: refuse.")] = False,
            allow_plugins: Annotated[bool, typer.Option("--allow-plugins", help="Let the recipes' plugins: (Python files) run. Default: refused, since a manifest or a shared recipe is data you may not have written.")] = False,
            *, runtime: Runtime, as_json: AsJson = False):
    """Repair or gate many models from a manifest, locally or on Ray; resumable; one HTML report."""
    from repair.zoo import ZooOptions, run_zoo

    doc = run_zoo(manifest, ZooOptions(mode=mode, out_dir=out_dir, journal=journal, force=force, ray=ray,
                                       workers=workers, cpus_per_model=cpus_per_model,
                                       gpus_per_model=gpus_per_model, max_retries=max_retries,
                                       allow_plugins=allow_plugins),
                  runtime=runtime, log=logger(runtime))
    if as_json:
        emit_json(doc)
    else:
        say(zoo_table(doc))
    s = doc["summary"]
    if s["failed"] or s["errors"]:
        by_name = {m["name"]: m for m in doc["models"]}
        parts = [f"{n} ({by_name[n]['gate']['message']})" for n in s["failed"]]
        msg = (f"gate failed for {len(s['failed'])} model(s): " + ", ".join(parts)) if parts else ""
        if not s["errors"]:
            raise GateFailed(msg)
        # a model that could not be run is not a gate result: the worst of its exit codes (2: its
        # input, 3: our bug), after the others ran and the report was written
        codes = [int(by_name[n].get("exit_code") or 3) for n in s["errors"]]
        msg = (f"{len(s['errors'])} model(s) could not be run: "
               + ", ".join(f"{n} (exit {c})" for n, c in zip(s["errors"], codes)) + (f"; {msg}" if msg else "")
               + f"; the report {doc['report']} says why")
        raise ZooModelsFailed(msg, max(codes))
