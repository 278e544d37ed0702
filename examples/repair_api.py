"""Repair a classifier from Python with repair's public API: load, measure, repair, measure, export.

Run against the demo (from the repository root):

    repair demo --size tiny --out examples/demo
    python examples/repair_api.py examples/demo --out examples/demo/api-repaired

(writes the repaired model folder ``examples/demo/api-repaired`` and ``api-repaired.onnx`` beside it).

It loads the demo's ERM model (``repair.load_model``), measures it per group on the test split
(``repair.evaluate``), repairs its last layer from the validation split WITHOUT group labels
(``repair.fix``; the recipe picks the repair by cross-validation on the validation split alone),
measures the repaired model on the test split, and exports it to ONNX verified against the
PyTorch model with onnxruntime (``repair.export_model``). The test split is only measured on:
nothing is fitted or selected on it.

Exit codes (as the ``repair`` command's): 0 the repaired model meets ``--gate``, 1 it does not
(or the ONNX export does not match it), 2 bad input (a path not found, ``--out`` exists, ...),
3 internal error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import repair
from repair.errors import RepairError


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def run(demo: Path, out: Path, gate: float, recipe: str) -> int:
    model_dir, val, test = demo / "model", demo / "data" / "val", demo / "data" / "test"

    # 1. load: the family is detected (timm hub folder here); the adapter knows classes and head
    model = repair.load_model(model_dir)
    info = model.describe()
    print(f"loaded {info['family']} model {model_dir}: classes {info['class_names']}, "
          f"head {info['num_classes']} x {info['embedding_dim']}")

    # 2. measure per group (class x place) on the held-out test split
    before = repair.evaluate(model_dir, test, group_by="place")
    print(f"before: accuracy {pct(before['accuracy'])}, worst-group {pct(before['worst_group_accuracy'])}")

    # 3. repair from the validation split; no group_by: no group labels are used. The result's own
    #    before/after figures come from a seeded 25% of the validation split held out before fitting.
    result = repair.fix(model_dir, val, out=out, recipe=recipe, seed=0)
    print(f"repair: chose {result['candidate']} ({result['selection_criterion']}); wrote {result['output']}")

    # 4. measure the repaired model on the same test split
    after = repair.evaluate(result["output"], test, group_by="place")
    print(f"after:  accuracy {pct(after['accuracy'])}, worst-group {pct(after['worst_group_accuracy'])}")
    for g_before, g_after in zip(before["per_group"], after["per_group"]):
        print(f"  {g_before['name']:<24} n={g_before['n']:<4} {pct(g_before['accuracy']):>7} -> "
              f"{pct(g_after['accuracy']):>7}")

    # 5. export to ONNX beside the repaired model (<out>.onnx), verified with onnxruntime on samples
    #    of the repair set (a mismatch raises GateFailed, exit 1, and writes nothing)
    repaired = repair.load_model(result["output"])
    export = repair.export_model(repaired, out.with_name(out.name + ".onnx"), data=val, format="onnx")
    print(f"ONNX {export['path']}: verified={export['passed']}, max|diff| {export.get('max_abs_diff')}")

    if after["worst_group_accuracy"] < gate:
        print(f"FAILED: worst-group accuracy {pct(after['worst_group_accuracy'])} < {pct(gate)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", type=Path, help="a folder written by `repair demo` (model/, data/val/, data/test/)")
    ap.add_argument("--out", type=Path, required=True, help="the repaired model's folder (must not exist yet); the ONNX file goes beside it, OUT.onnx")
    ap.add_argument("--gate", type=float, default=0.3,
                    help="minimum worst-group accuracy of the repaired model on the test split, 0-1 (default 0.3)")
    ap.add_argument("--recipe", default="auto", help="repair recipe (default auto)")
    args = ap.parse_args(argv)
    if not 0.0 <= args.gate <= 1.0:
        ap.error(f"--gate must be between 0 and 1, got {args.gate}")   # exit 2
    try:
        return run(args.demo, args.out, args.gate, args.recipe)
    except RepairError as e:                 # BadInput 2, GateFailed 1, others 3: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
