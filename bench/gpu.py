"""The GPU check, prepared for a machine with CUDA (CI and the development machines have none).

``bash bench/gpu.sh`` (or ``python -m bench.gpu``) measures, side by side on that machine:

* extraction: ``repair eval`` of the demo model on its test split, ``--device cuda`` against
  ``--device cpu`` (no cache);
* the solver: ``dfr`` with group labels on a planted-shortcut problem of 50,000 x 2,048 with 2, 10 and
  1,000 classes (and ``mix``, whose mixed rows are never formed, with 2), on CUDA and on the CPU (fit
  time, test worst-group accuracy);
* one model repair: ``repair fix --recipe mixft`` on CUDA (bfloat16 autocast) and on the CPU, a fixed
  step budget;
* ONNX: ``repair export`` verified with onnxruntime (the report lists the providers it used: CUDA's
  when ``onnxruntime-gpu`` is installed).

Every part runs whatever another part did (a failing one is recorded with its error, and the rest
still run), each command under a time limit, so one run on a lent machine says everything it can.
Everything is written to ``bench/_work/gpu/gpu.json`` and ``bench/GPU.md`` (with the machine, the
package versions and the date), and both into ``$OUT`` when it is set (after every part: what the
device tool brings back even from a run cut short). Nothing is downloaded: the demo is built here (``repair demo``). The
project need not be installed: the CLI runs from the checkout. Without CUDA it says so and exits 0
without writing figures.

``--dry-run`` runs every part on the CPU in place of CUDA, at small sizes, into ``--out`` (not into
``bench/GPU.md``): the check of this script's plumbing that needs no GPU (``tests/test_bench_smoke.py``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "_work" / "gpu"
COMMAND_LIMIT_S = 240            # one command; the lent machine's calls are limited to 10 minutes


def cli_module() -> str:
    """The CLI's module: the installed ``repair_cli``, else the checkout's ``cli`` package (run from
    the repository root)."""
    return "repair_cli.main" if importlib.util.find_spec("repair_cli") is not None else "cli.main"


def run(args: list, log, quiet: bool = True) -> tuple[float, dict]:
    """``repair ARGS --json [-q]`` in a subprocess from the repository root: (wall seconds, the JSON
    document, or ``{"error": ..., "exit_code": ...}``)."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", cli_module(), *map(str, args), "--json", *(["-q"] if quiet else [])],
                           capture_output=True, text=True, cwd=ROOT, timeout=COMMAND_LIMIT_S)
    except subprocess.TimeoutExpired:
        log(f"repair {args[0]}: over {COMMAND_LIMIT_S} s, stopped")
        return time.perf_counter() - t0, {"error": f"over {COMMAND_LIMIT_S} s", "exit_code": None}
    secs = time.perf_counter() - t0
    if r.returncode not in (0, 1) or not r.stdout.strip():
        log(f"repair {args[0]}: exit {r.returncode}: " + (r.stderr.strip().splitlines() or [""])[-1])
        return secs, {"error": r.stderr.strip()[-800:], "exit_code": r.returncode}
    return secs, json.loads(r.stdout)


def planted(n: int, d: int, classes: int, seed: int = 0):
    """A planted shortcut: per class a weak core direction, per attribute value a strong one that
    agrees with the class on 90% of the rows; groups = class x (attribute agrees or not)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    core = torch.randn(classes, d, generator=g)
    spur = torch.randn(classes, d, generator=g) * 3

    def rows(m: int, agree: float):
        y = torch.randint(0, classes, (m,), generator=g)
        same = torch.rand(m, generator=g) < agree
        a = torch.where(same, y, torch.randint(0, classes, (m,), generator=g))
        X = (core[y] + spur[a] + torch.randn(m, d, generator=g) * 2).relu()
        return X, y, (y * 2 + (a != y).long())
    return rows(n, 0.9), rows(max(n // 5, 2000), 0.5)


def solver_rows(classes_list, n: int, d: int, columns, log) -> list[dict]:
    """``dfr`` (and ``mix`` with two classes) on :func:`planted` problems, once per ``(label, device)``
    of ``columns``: fit time and test figures, or the error."""
    import torch

    from repair.methods import RepairInputs, get_method

    out = []
    for C in classes_list:
        (X, y, g), (Xt, yt, gt) = planted(n, d, C)
        W0, b0 = torch.zeros(C, d), torch.zeros(C)
        # mix (two classes: its mixed rows never formed, repair.solver.mixing) next to dfr
        for method, (label, device) in [(m, c) for m in (("dfr", "mix") if C == 2 else ("dfr",)) for c in columns]:
            row = {"method": method, "classes": C, "device": label}
            try:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = get_method(method)(RepairInputs(X=X, y=y, W=W0, b=b0, groups=g, device=device))
                if device == "cuda":
                    torch.cuda.synchronize()
                secs = time.perf_counter() - t0
            except Exception as e:           # recorded; the other rows still run
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"{method} {C} classes on {label}: {row['error']}")
                out.append(row)
                continue
            pred = (Xt @ res.W.T + res.b).argmax(1)
            accs = [float((pred[gt == k] == yt[gt == k]).float().mean()) for k in torch.unique(gt).tolist()]
            row.update({"fit_seconds": round(secs, 2), "test_worst_group": round(min(accs), 4),
                        "test_accuracy": round(float((pred == yt).float().mean()), 4)})
            out.append(row)
            log(f"{method} {C} classes on {label}: {secs:.1f}s, test WGA {min(accs):.3f}")
    return out


def versions() -> dict:
    """The versions of the packages the parts use, and onnxruntime's providers."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "timm", "onnx", "onnxruntime", "onnxscript", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:
            out[name] = f"unavailable ({type(e).__name__})"
    try:
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        pass
    return out


def _cell(r: dict, *keys) -> str:
    if not r:
        return "–"
    if r.get("error"):
        return "failed (see gpu.json)"
    return " / ".join(str(r.get(k)) for k in keys)


def markdown(doc: dict, args) -> str:
    """GPU.md: the figures of ``doc``, a failed part as "failed"."""
    dev, ref = doc["devices"]
    lines = [f"# GPU check ({doc['date']})", "", f"`python -m bench.gpu` on {doc['gpu']} ({doc['machine']}); "
             f"versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".", "",
             f"| part | {dev} | {ref} |", "|---|---|---|"]
    ext = doc.get("extraction") or {}
    lines.append(f"| extraction (eval, no cache): wall s / embedding s | {_cell(ext.get(dev), 'wall_seconds', 'embedding_seconds')} | "
                 f"{_cell(ext.get(ref), 'wall_seconds', 'embedding_seconds')} |")
    solver = doc.get("solver")
    if isinstance(solver, list):
        for C in args.classes:
            for method in ("dfr", "mix"):
                r = {x["device"]: x for x in solver if x["classes"] == C and x["method"] == method}
                if r:
                    lines.append(f"| {method}[groups] {args.n}x{args.d}, {C} classes: fit s / test WGA | "
                                 f"{_cell(r.get(dev), 'fit_seconds', 'test_worst_group')} | "
                                 f"{_cell(r.get(ref), 'fit_seconds', 'test_worst_group')} |")
    else:
        lines.append(f"| solver | {_cell(solver)} | |")
    mr = doc.get("model_repair") or {}
    lines.append(f"| mixft ({args.steps}): wall s / test WGA | {_cell(mr.get(dev), 'wall_seconds', 'test_worst_group')} | "
                 f"{_cell(mr.get(ref), 'wall_seconds', 'test_worst_group')} |")
    onnx = doc.get("onnx") or {}
    lines += ["", f"ONNX export verified: {_cell(onnx, 'providers', 'passed', 'max_abs_diff', 'wall_seconds')} "
              f"(providers / passed / max abs diff / wall s)."]
    failed = [k for k in ("demo", "extraction", "solver", "model_repair", "onnx")
              if isinstance(doc.get(k), dict) and doc[k].get("error")]
    if failed:
        lines += ["", "Failed parts (errors in gpu.json): " + ", ".join(failed) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="solver rows (default 50,000; dry run 3,000)")
    ap.add_argument("--d", type=int, default=None, help="solver features (default 2,048; dry run 64)")
    ap.add_argument("--classes", type=int, nargs="+", default=None, help="default 2 10 1000; dry run 2 10")
    ap.add_argument("--steps", default=None, help="budget of the model repair (default 200steps; dry run 3steps)")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU in place of CUDA, small sizes")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu.json (default bench/_work/gpu)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.n = args.n or (3_000 if dry else 50_000)
    args.d = args.d or (64 if dry else 2_048)
    args.classes = args.classes or ([2, 10] if dry else [2, 10, 1000])
    args.steps = args.steps or ("3steps" if dry else "200steps")
    work = (args.out or WORK).resolve()

    def log(m):
        print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)

    import torch

    if not dry and not torch.cuda.is_available():
        log("no CUDA device here: nothing measured (run this on the lent GPU machine)")
        return 0
    # the two columns (label, device): CUDA against the CPU; a dry run puts the CPU in both
    columns = [("cpu", "cpu"), ("cpu-ref", "cpu")] if dry else [("cuda", "cuda"), ("cpu", "cpu")]
    dev, ref = columns[0][0], columns[1][0]
    work.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
           "gpu": "none (dry run)" if dry else torch.cuda.get_device_name(0), "versions": versions(),
           "cpu_threads": torch.get_num_threads(), "devices": [dev, ref], "dry_run": dry}

    def save(name: str, text: str) -> None:
        # into the check's folder, and into $OUT when set (the device tool brings back only what is there)
        for folder in (work, Path(os.environ["OUT"]) if os.environ.get("OUT") else None):
            if folder is not None:
                (folder / name).write_text(text)

    def part(name, fn):
        try:
            doc[name] = fn()
        except Exception as e:               # recorded; the other parts still run
            doc[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
            log(f"{name}: failed: {type(e).__name__}: {e}")
        save("gpu.json", json.dumps(doc, indent=1) + "\n")     # what is known so far

    demo = work / "demo"
    model, val, test = demo / "model", demo / "data" / "val", demo / "data" / "test"

    def build_demo():
        if (model / "config.json").exists():
            return {"reused": True}
        log("building the demo (repair demo --size tiny)")
        secs, rep = run(["demo", "--size", "tiny", "--out", demo, "--force"], log, quiet=False)
        if rep.get("error") is not None:
            raise RuntimeError(f"repair demo failed: {rep['error'][-300:]}")
        return {"wall_seconds": round(secs, 2)}

    def extraction():
        ext = {}
        for d, device in columns:
            secs, rep = run(["eval", model, "--data", test, "--group-by", "place", "--device", device, "--no-cache"],
                            log)
            ext[d] = rep if rep.get("error") is not None else {
                "wall_seconds": round(secs, 2), "embedding_seconds": (rep.get("embedding") or {}).get("seconds"),
                "worst_group_accuracy": rep.get("worst_group_accuracy")}
            log(f"extraction on {d}: {secs:.1f}s wall")
        return ext

    def model_repair():
        mr = {}
        for d, device in columns:
            secs, rep = run(["fix", model, "--data", val, "--eval", test, "--eval-group-by", "place", "--recipe",
                             "mixft", "--budget", args.steps, "--device", device, "--out",
                             work / f"mixft-{d}", "--force", "--no-cache"], log)
            after = rep.get("after") or {}
            mr[d] = rep if rep.get("error") is not None else {
                "wall_seconds": round(secs, 2), "fit_seconds": (rep.get("timing") or {}).get("fit_seconds"),
                "test_worst_group": after.get("worst_group_accuracy"), "test_accuracy": after.get("accuracy"),
                "stopped_by": (rep.get("model_change") or {}).get("stopped_by")}
            log(f"mixft on {d}: {secs:.1f}s wall")
        return mr

    def onnx():
        secs, rep = run(["export", model, "--data", val, "--device", columns[0][1], "--out", work / "demo.onnx",
                         "--force"], log)
        if rep.get("error") is not None:
            return rep
        return {"wall_seconds": round(secs, 2), "providers": rep.get("providers"), "passed": rep.get("passed"),
                "max_abs_diff": rep.get("max_abs_diff")}

    part("demo", build_demo)
    if not (isinstance(doc["demo"], dict) and doc["demo"].get("error")):
        part("extraction", extraction)
    part("solver", lambda: solver_rows(args.classes, args.n, args.d, columns, log))
    if not (isinstance(doc["demo"], dict) and doc["demo"].get("error")):
        part("model_repair", model_repair)
        part("onnx", onnx)
    text = markdown(doc, args)
    save("GPU.md", text)
    if not dry:
        (BENCH / "GPU.md").write_text(text)
    log(f"wrote {work / 'gpu.json'} and {work / 'GPU.md'}" + ("" if dry else f" and {BENCH / 'GPU.md'}"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
