"""The benchmark: every repair (head and model), ``auto`` and the references on real shortcut
checkpoints, on a balanced and a skewed repair set; the cost of ``repair fix``; the solver at scale.

    python -m bench.run                       # everything: writes bench/results.json, RESULTS.md, wga.png
    python -m bench.run --parts head,cost     # re-measure some parts, keep the others from results.json
    python -m bench.run --smoke               # seconds: a tiny synthetic task (the test suite runs it)

Parts: ``head`` (ERM, every head repair with/without group labels, ``auto``, the references;
:mod:`bench.rows`), ``model`` (the model repairs of :data:`bench.rows.MODEL_ROWS`), ``cost``
(``repair fix`` vs ``repair eval`` as subprocesses, warm cache; the forward-pass floor), ``scale``
(:mod:`bench.scale`). Tasks and checkpoints: :mod:`bench.tasks` (built once under ``--work-dir``,
reused); repair-set variants: :func:`bench.tasks.variant_data`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from . import report as Rep  # noqa: E402
from . import rows as R  # noqa: E402
from . import tasks as T  # noqa: E402
from .measure import code_version, fit_threads, load_average, log, machine_info, release_frozen  # noqa: E402
from .rows import AUTO, ERM, REF_DFR, variant_label  # noqa: E402,F401  (re-exported for the tests)

MODEL_GROUPS = {"both": None, "no-groups": False, "groups": True}
DEFAULT_TASKS = ("sst2_negation", "sst2_capped", "mnist_color", "demo")
PARTS = ("head", "model", "cost", "scale")


# ============================================================================ smoke task
def smoke_rows(specs: list, variant: str, args) -> list:
    """The model rows a run measures on ``variant``: every row, except in a smoke run (the test suite's),
    where the rows that vary a method's options run on the first repair set only and each method's own
    row (and a built-in recipe's) on every set: each row still runs once, in seconds less."""
    if not args.smoke or variant == args.variants[0]:
        return specs
    return [s for s in specs if s.label == s.method or s.recipe is not None]


def build_smoke_task(work_dir: Path) -> T.Task:
    """Tiny synthetic image task (no training, no real checkpoint): a randomly initialised timm
    ``test_resnet``; class = bright square vs bright cross, attribute = background tint."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    root = work_dir / "tasks" / "smoke"
    meta = root / "task.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        return T._load_task("smoke", root, info)
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    size = 32

    def draw(cls: int, bg: int) -> np.ndarray:
        img = np.empty((size, size, 3))
        img[:] = (0.7, 0.3, 0.3) if bg == 0 else (0.3, 0.3, 0.7)
        img += rng.normal(0, 0.08, img.shape)
        cx, cy = rng.integers(10, 22, 2)
        if cls == 0:
            img[cy - 5:cy + 5, cx - 5:cx + 5] = 0.95
        else:
            img[cy - 6:cy + 6, cx - 1:cx + 2] = 0.95
            img[cy - 1:cy + 2, cx - 6:cx + 6] = 0.95
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)

    classes, bgs = ("square", "cross"), ("red", "blue")
    # a training table (labels and attributes only: the skewed variant reads which attribute value
    # goes with each class in training)
    (root / "data" / "train").mkdir(parents=True)
    (root / "data" / "train" / "metadata.csv").write_text(
        "img_filename,y,background\n" + "".join(f"t{i}.png,{classes[c]},{bgs[c if i % 10 else 1 - c]}\n"
                                                 for c in (0, 1) for i in range(40)))
    for split, per_group in (("val", 24), ("test", 32)):
        d = root / "data" / split
        d.mkdir(parents=True)
        rows = []
        for c in (0, 1):
            for a in (0, 1):
                for i in range(per_group):
                    rel = f"{c}{a}_{i:03d}.png"
                    Image.fromarray(draw(c, a)).save(d / rel)
                    rows.append(f"{rel},{classes[c]},{bgs[a]}")
        (d / "metadata.csv").write_text("img_filename,y,background\n" + "\n".join(rows) + "\n")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    dc = {"input_size": [3, size, size], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3,
          "crop_pct": 1.0, "crop_mode": "center"}
    T.save_timm_checkpoint(model, root / "model", classes, dc, {})
    info = {"name": "smoke", "model_dir": "model", "val": "data/val", "test": "data/test",
            "group_by": "background", "modality": "image", "backbone": "random timm test_resnet (smoke)",
            "classes": list(classes), "sizes": {"train": 0, "val": 96, "test": 128},
            "val_protocol": "group-balanced", "test_protocol": "group-balanced", "erm_train_seconds": 0.0}
    task = T._load_task("smoke", root, info)
    meta.write_text(json.dumps(info, indent=2))
    return task




# ============================================================================ cost of `repair fix`
def _cli(args: list, timeout: int = 3600) -> tuple[float, dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "repair_cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return wall, json.loads(proc.stdout)


def run_costs(task: T.Task, repeats: int, cache_dir: Path, scratch: Path) -> dict:
    """Subprocess wall times of `repair eval` and `repair fix --recipe auto` (label-free) with a warm
    cache, `repair fix` without cache, and the in-process forward-pass floor."""
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import extract

    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    res: dict = {"repeats": repeats, "errors": []}
    try:
        adapter = load_model(task.model_dir)
        data = load_data(task.val)
        res["n"] = len(data)
        res["floor_all"] = [extract(adapter, data, device="cpu", use_cache=False, progress=False).seconds
                            for _ in range(repeats)]
    except Exception as e:
        res["errors"].append(f"floor: {type(e).__name__}: {e}")
    common = ["--data", str(task.val), "--json", "--quiet", "--device", "cpu"]
    ev, fx, nc = [], [], []
    for r in range(repeats):
        out = scratch / f"cost-{task.name}-{r}"
        try:
            _cli(["eval", str(task.model_dir), *common, "--cache-dir", str(cache_dir)])       # warms the cache
            ev.append(_cli(["eval", str(task.model_dir), *common, "--cache-dir", str(cache_dir)])[0])
            fx.append(_cli(["fix", str(task.model_dir), *common, "--cache-dir", str(cache_dir), "--out", str(out),
                            "--force", "--seed", str(r)])[0])
            nc.append(_cli(["fix", str(task.model_dir), *common, "--no-cache", "--out", str(out), "--force",
                            "--seed", str(r)])[0])
        except Exception as e:
            res["errors"].append(f"{type(e).__name__}: {e}")
        finally:
            shutil.rmtree(out, ignore_errors=True)
    res.update({"eval_warm_all": ev, "fix_warm_all": fx, "fix_nocache_all": nc,
                "floor_seconds": med(res.get("floor_all")), "eval_warm_seconds": med(ev),
                "fix_warm_seconds": med(fx), "fix_nocache_seconds": med(nc)})
    if ev and fx:
        res["ratio_fix_over_eval_warm"] = res["fix_warm_seconds"] / res["eval_warm_seconds"]
    if nc and res.get("floor_seconds"):
        res["ratio_fix_nocache_over_floor"] = res["fix_nocache_seconds"] / res["floor_seconds"]
    if not res["errors"]:
        del res["errors"]
    return res


# ============================================================================ orchestration
def _load_doc(out_dir: Path) -> dict:
    f = out_dir / "results.json"
    if f.exists():
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            pass
    return {}


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work, out_dir = Path(args.work_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir, scratch = work / "cache", work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    doc = _load_doc(out_dir) if args.parts != list(PARTS) else {}
    doc.setdefault("tasks", {})
    command = "python -m bench.run " + " ".join(args.argv)
    machine = machine_info()
    # ``meta.machine``: where the report was last written; each part's line carries its own (``machine``)
    doc["meta"] = {**doc.get("meta", {}), "command": command,
                   "smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   "machine": machine, "skew_ratio": T.SKEW_RATIO}
    doc["meta"].setdefault("parts", {})
    # a partial rerun keeps the notes about the rows it keeps (a full run starts a new report)
    doc["notes"] = list(doc.get("notes") or [])
    variants, registry_error = R.method_variants()
    if registry_error:
        _add_note(doc, f"repair.methods registry could not load ({registry_error})")
    spuco_on = not (args.no_spuco or args.smoke)
    for part in args.parts:
        t_part = time.perf_counter()
        info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_version(), "machine": machine,
                "load_start": load_average()}
        measured = 0
        if part == "scale":
            from .scale import run_scale

            doc["scale"] = run_scale(n=args.scale_n, d=args.scale_d, spuco=spuco_on)
            measured += 1
        for name in (args.tasks if part != "scale" else []):
            try:
                task = build_smoke_task(work) if name == "smoke" else T.build_task(name, work_dir=work, log=log)
            except T.SkipTask as e:
                log(f"skip {name}: {e}")
                if not (doc["tasks"].get(name) or {}).get("info"):    # the rows of an earlier run stay
                    doc["tasks"][name] = {"skipped": str(e)}
                continue
            entry = doc["tasks"].setdefault(name, {})
            earlier = _measured_items(entry)      # what earlier runs measured: the rows this run leaves stay
            if part == "cost":
                log(f"{name}: cost of `repair fix` x{args.timing_repeats}")
                entry["costs"] = run_costs(task, args.timing_repeats, cache_dir, scratch)
                measured += 1
                _task_measured(doc, name, entry, task, earlier, command)
                continue
            specs = R.model_rows_for(task, args.model_rows) if part == "model" else None
            if part == "model" and not specs:
                if not entry:
                    doc["tasks"].pop(name)
                continue
            entry.pop("skipped", None)
            entry.setdefault("info", {k: v for k, v in task.info.items() if k not in ("negation_words",)})
            for vname in args.variants:
                td = R.load_task_data(task, vname, cache_dir)
                v = entry.setdefault("variants", {}).setdefault(vname, {"runs": []})
                v.update({"data": str(td.data), "group_counts": td.group_counts,
                          "embedding": {"dim": int(td.X_val.shape[1]), "n_val": int(td.X_val.shape[0]),
                                        "n_test": int(td.X_test.shape[0]), **td.embed_seconds}})
                seeds = args.seeds if part == "head" else args.model_seeds
                for seed in seeds:
                    log(f"{name} / {vname} / seed {seed}: {part}")
                    run = next((r for r in v["runs"] if r["seed"] == seed), None)
                    if run is None:
                        run = {"seed": seed, "rows": {}}
                        v["runs"].append(run)
                    # re-measured rows replace old ones; a run of some model rows (--model-rows) keeps the others
                    if part == "model":
                        # (a full model part drops all old model rows; a partial one replaces only what it measures)
                        keep = ((lambda k, r: r.get("kind") != "model") if not args.model_rows and
                                args.model_groups == "both" else (lambda k, r: True))
                    else:
                        keep = lambda k, r: r.get("kind") == "model"
                    run["rows"] = {k: r for k, r in run["rows"].items() if keep(k, r)}
                    with fit_threads(args.fit_threads):
                        if part == "head":
                            new = R.head_rows(td, seed, variants, cache_dir, scratch, spuco_on)
                        else:
                            new = R.run_model_rows(td, seed, smoke_rows(specs, vname, args), cache_dir, scratch,
                                                   groups=MODEL_GROUPS[args.model_groups])
                    run["rows"].update(new)
                    measured += len(new)
                    for label, r in new.items():
                        if "test" in r and part == "head":
                            log(f"    {label:<32} WGA {100 * r['test']['worst_group_accuracy']:5.1f}  acc "
                                f"{100 * r['test']['accuracy']:5.1f}  fit {r.get('fit_seconds') or 0:.3f}s")
                # runs of other seeds stay, with every row they hold (a partial rerun drops nothing)
                v["runs"].sort(key=lambda r: r["seed"])
                v["summary"] = Rep.summarise(v["runs"])
            _task_measured(doc, name, entry, task, earlier, command)
            _write_outputs(doc, out_dir, args, final=False)      # partial results survive a crash
        if not measured:        # nothing of this part ran (every task skipped, no row applied): no line for it
            log(f"part {part}: nothing measured; the report keeps its earlier lines")
            continue
        info.update({"wall_minutes": (time.perf_counter() - t_part) / 60, "load_end": load_average(),
                     "seeds": args.seeds if part == "head" else args.model_seeds if part == "model" else None})
        kept = earlier_lines(doc["meta"]["parts"].get(part), info, args, part)
        if kept:
            info["also"] = kept
        doc["meta"]["parts"][part] = info
    doc["meta"]["wall_minutes"] = (time.perf_counter() - t_start) / 60
    _write_outputs(doc, out_dir, args, final=True)
    return doc


def _measured_items(entry: dict) -> dict:
    """A task entry's measured rows and costs, each by where it sits: ``(variant, seed, label)`` or
    ``"costs"`` -> the object (the objects are held, so a row replaced is told by identity)."""
    out: dict = {("costs",): entry["costs"]} if entry.get("costs") else {}
    for vn, v in (entry.get("variants") or {}).items():
        for run in v.get("runs") or []:
            for label, row in (run.get("rows") or {}).items():
                out[(vn, run.get("seed"), label)] = row
    return out


def _task_measured(doc: dict, name: str, entry: dict, task, earlier: dict, command: str) -> None:
    """After this run measured task ``name``: the entry describes this run's build, and the report says
    whether rows or costs of another build are left beside this run's (a note), or -- none left -- retires
    the notes about other builds of the task."""
    now = _measured_items(entry)
    left = [k for k, obj in earlier.items() if now.get(k) is obj]      # untouched by this run
    kept_info = entry.get("info")
    entry.pop("skipped", None)
    entry.update({"info": {k: v for k, v in task.info.items() if k not in ("negation_words",)},
                  "group_by": task.group_by, "paths": task.to_json()})
    if entry.get("costs") is not earlier.get(("costs",)) and doc.get("notes"):
        doc["notes"] = [n for n in doc["notes"] if not _costs_only_note(name, n)]    # costs replaced
    if not left:
        if doc.get("notes"):        # nothing of an earlier build is left: the notes about one are void
            doc["notes"] = [n for n in doc["notes"] if not (n.startswith(_task_note(name, ""))
                                                             and "another build of this task" in n)]
        return
    _add_note(doc, _rebuilt_note(name, kept_info, task.info, command))


def earlier_lines(earlier: Optional[dict], info: dict, args, part: str) -> list:
    """The lines of a part's earlier runs that a rerun (``info``, ``args``) keeps: the rows of earlier runs
    stay in the report, so do their lines -- unless this run re-measured all they measured (every task,
    repair set and row, on all of their seeds)."""
    if not earlier:
        return []
    also = earlier.get("also") or []
    also = also if isinstance(also, list) else [also]
    whole = args.tasks is None and args.variants is None and not (
        part == "model" and (args.model_rows or args.model_groups != "both"))
    mine = set(info.get("seeds") or [])
    return [e for e in also + [{k: x for k, x in earlier.items() if k != "also"}]
            if not (whole and (e.get("seeds") is None or set(e.get("seeds") or []) <= mine))]


def _write_outputs(doc: dict, out_dir: Path, args, final: bool) -> None:
    doc["meta"]["complete"] = final
    doc["targets"] = Rep.targets(doc)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    analysis_file = Path(__file__).resolve().parent / "analysis.md"
    analysis = analysis_file.read_text(encoding="utf-8") if (final and not args.smoke and analysis_file.exists()) else None
    Rep.write_markdown(doc, out_dir / "RESULTS.md", analysis)
    try:
        Rep.plot_wga(doc, out_dir / "wga.png")
    except Exception as e:  # a plotting problem must not lose the numbers
        log(f"plot failed: {type(e).__name__}: {e}")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds-sized run on a tiny synthetic task (CI)")
    ap.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the head part (default 0-4)")
    ap.add_argument("--model-seeds", type=int, nargs="+", default=None, help="seeds of the model part (default 0-2)")
    ap.add_argument("--model-rows", nargs="+", default=None, help="only these model rows (labels)")
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--variants", nargs="+", default=None, choices=T.VARIANTS)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--timing-repeats", type=int, default=None, help="repeats of the cost timings (default 3)")
    ap.add_argument("--no-spuco", action="store_true", help="skip the SpuCo references")
    ap.add_argument("--scale-n", type=int, default=None)
    ap.add_argument("--scale-d", type=int, default=None)
    ap.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md and wga.png from results.json")
    ap.add_argument("--model-groups", choices=sorted(MODEL_GROUPS), default="both",
                    help="model part: only the runs without (no-groups) or with (groups) group labels")
    ap.add_argument("--replace-tasks", nargs="+", default=None, metavar="TASK",
                    help="with --report-only: drop these tasks' rows, costs and notes before --merge "
                         "(the merged runs measured a rebuilt task: no table mixes two builds)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="with --report-only: add the rows of other runs' results.json (parts run in parallel)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for embedding extraction")
    ap.add_argument("--fit-threads", type=int, default=1, help="torch/BLAS threads for head fits")
    args = ap.parse_args(argv)
    args.argv = argv
    parts = args.parts.split(",") if args.parts else list(PARTS)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; known: {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    if args.model_rows:
        try:
            R.check_model_rows(args.model_rows)
        except ValueError as e:
            ap.error(str(e))
    if args.replace_tasks and not (args.report_only and args.merge):
        ap.error("--replace-tasks needs --report-only and --merge (the runs that replace those tasks)")
    if args.smoke:
        args.seeds = args.seeds or [0]
        args.model_seeds = args.model_seeds or [0]
        args.tasks = args.tasks or ["smoke"]
        args.work_dir = args.work_dir or str(T.WORK / "smoke")
        args.out_dir = args.out_dir or args.work_dir
        args.timing_repeats = 1 if args.timing_repeats is None else args.timing_repeats
        args.scale_n, args.scale_d = args.scale_n or 2000, args.scale_d or 64
        if not args.parts or args.parts == list(PARTS):
            args.parts = [p for p in PARTS if p != "cost"]
    else:
        args.seeds = args.seeds or [0, 1, 2, 3, 4]
        args.model_seeds = args.model_seeds or [0, 1, 2]
        args.tasks = args.tasks or list(DEFAULT_TASKS)
        args.work_dir = args.work_dir or str(T.WORK)
        args.out_dir = args.out_dir or str(T.BENCH_DIR)
        args.timing_repeats = 3 if args.timing_repeats is None else args.timing_repeats
        args.scale_n, args.scale_d = args.scale_n or 50_000, args.scale_d or 2048
    args.variants = args.variants or list(T.VARIANTS)
    return args


def _task_note(name: str, text: str) -> str:
    """A note of the report about task ``name``: the one form :func:`drop_tasks` recognises."""
    return f"{name}: {text}"


def _add_note(doc: dict, note: Optional[str]) -> None:
    if note and note not in doc.setdefault("notes", []):
        doc["notes"].append(note)


def _build_difference(mine: Optional[dict], theirs: Optional[dict]) -> Optional[tuple[bool, str]]:
    """How two runs' builds of a task differ: None when they are the same build, else (``sure``, what
    differs). The checkpoints' digests decide when both runs recorded one. When only one did, equal ERM test
    figures do not make the builds the same (a rebuild on the same code and seed can score the same ERM figures
    with other weights, and head rows then move): the difference is unconfirmed (``sure`` False). When neither
    did (runs from before digests were recorded), the ERM test figures are all there is to compare."""
    if not mine or not theirs:           # no build to compare with (a task the report did not hold yet)
        return None
    a, b = (mine or {}).get("erm_test") or {}, (theirs or {}).get("erm_test") or {}
    keys = ("accuracy", "worst_group_accuracy")
    da, db = (mine or {}).get("checkpoint_sha256"), (theirs or {}).get("checkpoint_sha256")
    fig = lambda e: f"{100 * float(e['accuracy']):.1f}% accuracy, {100 * float(e['worst_group_accuracy']):.1f}% worst group"  # noqa: E731
    same_figures = bool(a and b) and all(abs(float(a.get(k, 0)) - float(b.get(k, 0))) < 1e-9 for k in keys)
    if da and db:                                    # both builds fingerprinted: exact
        if da == db:
            return None
        if a and b and not same_figures:
            return True, f"its ERM checkpoint scores {fig(b)} on test, the one the report describes {fig(a)}"
        return True, f"checkpoint {db[:12]}, the report's {da[:12]}"
    if a and b and not same_figures:
        return True, f"its ERM checkpoint scores {fig(b)} on test, the one the report describes {fig(a)}"
    if da or db:                                     # one side fingerprinted: the figures cannot tell
        return False, (f"checkpoint {(db or 'not recorded')[:12]}, the report's {(da or 'not recorded')[:12]}"
                       + (f"; both score {fig(a)} on test" if same_figures else ""))
    return None


def _other_build(name: str, mine: Optional[dict], theirs: Optional[dict], command: Optional[str]) -> Optional[str]:
    """A note when a merged run measured a different build of task ``name`` (:func:`_build_difference`; the
    task is rebuilt per machine, and training kernels differ between CPUs), else None."""
    diff = _build_difference(mine, theirs)
    if diff is None:
        return None
    sure, what = diff
    if sure:
        return _task_note(name, f"the merged run `{command}` measured another build of this task ({what}); its "
                                f"rows and figures are of that build")
    return _task_note(name, f"the merged run `{command}` may have measured another build of this task ({what}); "
                            f"its rows and figures may differ from the report's build's")


def _rebuilt_note(name: str, kept: Optional[dict], now: dict, command: str) -> Optional[str]:
    """A note when this run measures another build of task ``name`` than the rows and costs it keeps from
    earlier runs (the task's table then holds rows of both builds), else None."""
    diff = _build_difference(kept, now)
    if diff is None:
        return None
    sure, what = diff
    what = what.replace("the one the report describes", "the earlier runs'").replace("the report's", "the earlier runs'")
    return _task_note(name, f"`{command}` {'measured' if sure else 'may have measured'} another build of this task "
                            f"than the earlier runs whose rows and costs it keeps ({what}): the task's tables hold "
                            f"rows of both (rerun its parts whole, or `--report-only --replace-tasks` with "
                            f"`--merge`, to keep one build)")


def _costs_only_note(name: str, note: str) -> bool:
    """Whether ``note`` is about task ``name``'s build in a merged run that measured its costs only (a later
    merge of costs replaces all of them, and the note is then about nothing the report shows)."""
    import re
    import shlex

    if not note.startswith(_task_note(name, "the merged run `")):
        return False
    m = re.search(r"`(python -m bench\.run [^`]*)`", note)
    if not m:
        return False
    try:
        words = shlex.split(m.group(1))
    except ValueError:
        return False
    parts = None
    for i, w in enumerate(words):                      # as argparse reads it: the last one given
        if w == "--parts" and i + 1 < len(words):
            parts = words[i + 1]
        elif w.startswith("--parts="):
            parts = w.split("=", 1)[1]
    return parts is not None and set(parts.split(",")) == {"cost"}


def drop_tasks(doc: dict, names) -> dict:
    """``doc`` without the tasks ``names`` (their rows, costs, build info and the notes about them):
    before merging runs of a rebuilt task, so that no table mixes rows of two builds."""
    for name in names:
        doc.get("tasks", {}).pop(name, None)
        if doc.get("notes"):
            doc["notes"] = [n for n in doc["notes"] if not n.startswith(_task_note(name, ""))]
    return doc


def merge_docs(doc: dict, other: dict) -> dict:
    """Rows, costs and scale of ``other`` (a results.json of parts run in parallel, in another
    --out-dir) added to ``doc``; ``other``'s rows replace ``doc``'s of the same label and seed.
    A task ``doc`` does not hold yet is taken whole, with ``other``'s build info."""
    for name, t in other.get("tasks", {}).items():
        entry = doc.setdefault("tasks", {}).setdefault(name, {})
        if "costs" in t and doc.get("notes"):     # the costs it replaces take their notes with them
            doc["notes"] = [n for n in doc["notes"] if not _costs_only_note(name, n)]
        _add_note(doc, _other_build(name, entry.get("info"), t.get("info"), other.get("meta", {}).get("command")))
        for k, v in t.items():
            if k != "variants" and (k not in entry or k == "costs"):
                entry[k] = v
        for vname, v in (t.get("variants") or {}).items():
            mine = entry.setdefault("variants", {}).setdefault(vname, {k: x for k, x in v.items() if k != "runs"})
            mine.setdefault("runs", [])
            for run in v.get("runs", []):
                into = next((r for r in mine["runs"] if r["seed"] == run["seed"]), None)
                if into is None:
                    mine["runs"].append(run)
                else:
                    into["rows"].update(run["rows"])
            mine["runs"].sort(key=lambda r: r["seed"])
    if "scale" in other:
        doc["scale"] = other["scale"]
    parts = doc.setdefault("meta", {}).setdefault("parts", {})
    for part, info in (other.get("meta", {}).get("parts") or {}).items():
        if part not in parts or (part == "scale" and "scale" in other):
            # new, or a scale run: it replaces the whole scale section (no row of the earlier run is left)
            parts[part] = {**info, "merged_from": other.get("meta", {}).get("command")}
        else:                                    # every merged run of the part is listed
            also = parts[part].get("also") or []
            also = also if isinstance(also, list) else [also]
            line = {**info, "command": other.get("meta", {}).get("command")}
            bare = lambda x: {k: v for k, v in x.items() if k not in ("also", "merged_from", "command")}  # noqa: E731
            listed = [(bare(x), x.get("command") or x.get("merged_from")) for x in also + [parts[part]]]
            if (bare(line), line["command"]) not in listed:      # the same run merged twice is listed once
                parts[part] = {**parts[part], "also": also + [line]}
    return doc


def report_only(args) -> dict:
    out_dir = Path(args.out_dir)
    doc = drop_tasks(_load_doc(out_dir), args.replace_tasks or [])
    for extra in args.merge or []:
        doc = merge_docs(doc, json.loads(Path(extra).read_text(encoding="utf-8")))
    for t in doc.get("tasks", {}).values():
        for v in (t.get("variants") or {}).values():
            v["summary"] = Rep.summarise(v.get("runs", []))
    doc["targets"] = Rep.targets(doc)
    # the header names the command that wrote this report; the figures' runs are each part's lines
    doc["meta"] = {**doc.get("meta", {}), "command": "python -m bench.run " + " ".join(args.argv),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "report_only": True,
                   "machine": machine_info()}      # where the report was written (each part line: where it ran)
    _write_outputs(doc, out_dir, args, final=True)
    return doc


def _finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        doc = report_only(args) if args.report_only else run(args)
    finally:
        release_frozen()
    bad = [n for n, t in doc["tasks"].items() for v in (t.get("variants") or {}).values()
           if not _finite(v.get("summary", {}))]
    if bad:
        log(f"non-finite numbers in {bad}")
        return 1
    log(f"wrote {Path(args.out_dir) / 'results.json'}, RESULTS.md, wga.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
