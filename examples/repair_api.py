"""Repair a classifier from Python with repair's public API: load, measure, repair, measure, export.

Run against the demo (from the repository root):

    repair demo --size tiny --out examples/demo
    python examples/repair_api.py examples/demo --out examples/demo/api-repaired

(writes the repaired model folder ``examples/demo/api-repaired``, its ONNX file ``model.onnx`` in it).

It loads the demo's ERM model (``repair.load_model``), measures it per group on the test split
(``repair.evaluate``), repairs its last layer from the validation split WITHOUT group labels
(``repair.fix``; the recipe picks the repair by cross-validation on the validation split alone)
and exports it to ONNX verified against the PyTorch model with onnxruntime in the same call
(``FixOptions(export="onnx")``, as ``repair fix --export onnx``: the model and its ONNX file are
written together or not at all), then measures the repaired model on the test split. The test split
is only measured on: nothing is fitted or selected on it, and its samples that are also in the
repair set are left out of both figures (``exclude=``, as ``repair eval --exclude``).

The gate is the ``repair`` command's (``repair.rules.judge``, as ``repair eval --fail-under-wga``):
exact counts, and it fails closed when a group has no samples in the test split.

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
from repair.pipeline import FixOptions
from repair.rules import judge, parse_threshold


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def warn(figures: dict) -> None:
    for w in figures.get("warnings") or []:       # small groups, samples left out, ...: never silent
        print(f"warning: {w}", file=sys.stderr)


def run(demo: Path, out: Path, gate: str, recipe: str, force: bool = False) -> int:
    model_dir, val, test = demo / "model", demo / "data" / "val", demo / "data" / "test"

    # 1. load: the family is detected (timm hub folder here); the adapter knows classes and head
    model = repair.load_model(model_dir)
    info = model.describe()
    print(f"loaded {info['family']} model {model_dir}: classes {info['class_names']}, "
          f"head {info['num_classes']} x {info['embedding_dim']}")

    # 2. measure per group (class x place) on the held-out test split, leaving out its samples that
    #    are also in the repair set (val): the "after" figure must not count what the repair fitted on
    before = repair.evaluate(model_dir, test, group_by="place", exclude=val)
    warn(before)
    print(f"before: accuracy {pct(before['accuracy'])}, worst-group {pct(before['worst_group_accuracy'])}")

    # 3. repair from the validation split; no group_by: no group labels are used. The result's own
    #    before/after figures come from a seeded 25% of the validation split held out before fitting.
    #    export="onnx": OUT/model.onnx, verified with onnxruntime on samples of the repair set, is
    #    written with the model, all or nothing (a mismatch raises GateFailed, exit 1, and writes
    #    nothing: a rerun starts clean)
    options = FixOptions(recipe=recipe, seed=0, export="onnx", force=force)
    result = repair.fix(model_dir, val, out=out, options=options)
    warn(result)
    print(f"repair: chose {result['candidate']} ({result['selection_criterion']}); wrote {result['output']}")
    export = result["export"]
    print(f"ONNX {export['path']}: verified={export['passed']}, max|diff| {export.get('max_abs_diff')}")

    # 4. measure the repaired model on the same test split (the same samples left out)
    after = repair.evaluate(result["output"], test, group_by="place", exclude=val)
    warn(after)
    print(f"after:  accuracy {pct(after['accuracy'])}, worst-group {pct(after['worst_group_accuracy'])}")
    was = {g["name"]: g for g in before["per_group"]}
    for g in after["per_group"]:
        b = was.get(g["name"], {})
        print(f"  {g['name']:<24} n={g['n']:<4} {pct(b.get('accuracy')):>7} -> {pct(g['accuracy']):>7}")

    # 5. the gate: the command line's one comparison (exact counts; a group without samples fails it)
    verdict = judge(after, gate, "worst_group")
    if not verdict["passed"]:
        print(f"FAILED: {verdict['message']}", file=sys.stderr)
        return 1
    print(f"gate passed: {verdict['message']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", type=Path, help="a folder written by `repair demo` (model/, data/val/, data/test/)")
    ap.add_argument("--out", type=Path, required=True,
                    help="the repaired model's folder (must not exist yet); its ONNX file goes in it, OUT/model.onnx")
    ap.add_argument("--gate", default="0.3",
                    help="minimum worst-group accuracy of the repaired model on the test split: a fraction 0-1 "
                         "(0.3) or a percentage (30%%), as repair eval --fail-under-wga (default 0.3)")
    ap.add_argument("--recipe", default="auto", help="repair recipe (default auto)")
    ap.add_argument("--force", action="store_true", help="replace OUT when an earlier repair wrote it")
    args = ap.parse_args(argv)
    try:
        parse_threshold(args.gate)
    except ValueError as e:
        ap.error(f"--gate {e}")              # exit 2
    try:
        return run(args.demo, args.out, args.gate, args.recipe, args.force)
    except RepairError as e:                 # BadInput 2, GateFailed 1, others 3: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:                   # a bug, not a gate result: 3, one line (as the command)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"internal error: {type(e).__name__}: {first}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
