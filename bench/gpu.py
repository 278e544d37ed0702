"""The GPU check, prepared for a machine with CUDA (CI and the development machines have none).

``bash bench/gpu.sh`` (or ``python -m bench.gpu``) measures, side by side on that machine:

* extraction: ``repair eval`` of the demo model on its test split, ``--device cuda`` against
  ``--device cpu`` (no cache);
* the solver: ``dfr`` with group labels on a planted-shortcut problem of 50,000 x 2,048 with 2, 10 and
  1,000 classes (and ``mix``, whose mixed rows are never formed, with 2), on CUDA and on the CPU (fit
  time, test worst-group accuracy);
* one model repair: ``repair fix --recipe mixft`` on CUDA (bfloat16 autocast) and on the CPU, a fixed
  step budget;
* ONNX: ``repair export`` verified with onnxruntime's CUDA execution provider when
  ``onnxruntime-gpu`` is installed (the report lists the providers used).

Everything is written to ``bench/_work/gpu/gpu.json`` and ``bench/GPU.md`` (with the machine, the
versions and the date). Nothing is downloaded: the demo is built here (``repair demo``). Without
CUDA it says so and exits 0 without writing figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work" / "gpu"


def run(args: list, log) -> tuple[float, dict]:
    """``repair ARGS --json`` in a subprocess: (wall seconds, the JSON document)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "repair_cli.main", *map(str, args), "--json", "-q"],
                       capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        log(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
        return secs, {"error": r.stderr.strip()[-500:], "exit_code": r.returncode}
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


def solver_rows(classes_list, n: int, d: int, log) -> list[dict]:
    import torch

    from repair.methods import RepairInputs, get_method

    out = []
    for C in classes_list:
        (X, y, g), (Xt, yt, gt) = planted(n, d, C)
        W0, b0 = torch.zeros(C, d), torch.zeros(C)
        # mix (two classes: its mixed rows never formed, repair.solver.mixing) next to dfr
        for method, device in [(m, dv) for m in (("dfr", "mix") if C == 2 else ("dfr",)) for dv in ("cuda", "cpu")]:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = get_method(method)(RepairInputs(X=X, y=y, W=W0, b=b0, groups=g, device=device))
            if device == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            pred = (Xt @ res.W.T + res.b).argmax(1)
            accs = [float((pred[gt == k] == yt[gt == k]).float().mean()) for k in torch.unique(gt).tolist()]
            out.append({"method": method, "classes": C, "device": device, "fit_seconds": round(secs, 2),
                        "test_worst_group": round(min(accs), 4), "test_accuracy": round(float((pred == yt).float().mean()), 4)})
            log(f"{method} {C} classes on {device}: {secs:.1f}s, test WGA {min(accs):.3f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=2_048)
    ap.add_argument("--classes", type=int, nargs="+", default=[2, 10, 1000])
    ap.add_argument("--steps", default="200steps", help="budget of the model repair")
    args = ap.parse_args(argv)

    def log(m):
        print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)

    import torch

    if not torch.cuda.is_available():
        log("no CUDA device here: nothing measured (run this on the lent GPU machine)")
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    demo = WORK / "demo"
    if not (demo / "model").exists():
        log("building the demo (repair demo --size tiny)")
        subprocess.run([sys.executable, "-m", "repair_cli.main", "demo", "--size", "tiny", "--out", str(demo),
                        "--force", "--json"], check=True, capture_output=True)
    model, val, test = demo / "model", demo / "data" / "val", demo / "data" / "test"
    ext = {}
    for device in ("cuda", "cpu"):
        secs, rep = run(["eval", model, "--data", test, "--group-by", "place", "--device", device, "--no-cache"], log)
        ext[device] = {"wall_seconds": round(secs, 2), "embedding_seconds": (rep.get("embedding") or {}).get("seconds"),
                       "worst_group_accuracy": rep.get("worst_group_accuracy")}
        log(f"extraction on {device}: {secs:.1f}s wall")
    doc["extraction"] = ext
    doc["solver"] = solver_rows(args.classes, args.n, args.d, log)
    mr = {}
    for device in ("cuda", "cpu"):
        out = WORK / f"mixft-{device}"
        secs, rep = run(["fix", model, "--data", val, "--eval", test, "--eval-group-by", "place", "--recipe", "mixft",
                         "--budget", args.steps, "--device", device, "--out", out, "--force", "--no-cache"], log)
        after = rep.get("after") or {}
        mr[device] = {"wall_seconds": round(secs, 2), "fit_seconds": (rep.get("timing") or {}).get("fit_seconds"),
                      "test_worst_group": after.get("worst_group_accuracy"), "test_accuracy": after.get("accuracy"),
                      "stopped_by": (rep.get("model_change") or {}).get("stopped_by")}
        log(f"mixft on {device}: {secs:.1f}s wall")
    doc["model_repair"] = mr
    secs, rep = run(["export", model, "--data", val, "--device", "cuda", "--out", WORK / "demo.onnx", "--force"], log)
    doc["onnx"] = {"wall_seconds": round(secs, 2), "providers": rep.get("providers"), "passed": rep.get("passed"),
                   "max_abs_diff": rep.get("max_abs_diff")}
    (WORK / "gpu.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# GPU check ({doc['date']})", "", f"`python -m bench.gpu` on {doc['gpu']} ({doc['machine']}), "
             f"torch {doc['torch']}.", "", "| part | cuda | cpu |", "|---|---|---|"]
    lines.append(f"| extraction (eval, no cache), wall s | {ext['cuda']['wall_seconds']} | {ext['cpu']['wall_seconds']} |")
    for C in args.classes:
        for method in ("dfr", "mix"):
            r = {x["device"]: x for x in doc["solver"] if x["classes"] == C and x["method"] == method}
            if r:
                lines.append(f"| {method}[groups] {args.n}x{args.d}, {C} classes: fit s / test WGA | "
                             f"{r['cuda']['fit_seconds']} / {r['cuda']['test_worst_group']} | "
                             f"{r['cpu']['fit_seconds']} / {r['cpu']['test_worst_group']} |")
    lines.append(f"| mixft ({args.steps}), wall s / test WGA | {mr['cuda']['wall_seconds']} / {mr['cuda']['test_worst_group']} | "
                 f"{mr['cpu']['wall_seconds']} / {mr['cpu']['test_worst_group']} |")
    lines += ["", f"ONNX export verified with providers {doc['onnx']['providers']}: passed={doc['onnx']['passed']}, "
              f"max |diff| {doc['onnx']['max_abs_diff']} ({doc['onnx']['wall_seconds']} s)."]
    (BENCH / "GPU.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {WORK / 'gpu.json'} and {BENCH / 'GPU.md'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
