"""The GPU check, prepared for a machine with CUDA (CI and the development machines have none).

``bash bench/gpu.sh`` (or ``python -m bench.gpu``) measures, side by side on that machine:

* extraction: ``repair eval`` of the demo model on its test split, ``--device cuda`` against
  ``--device cpu`` (no cache);
* the solver: ``dfr`` with group labels on the scale benchmark's planted-shortcut problems
  (``bench.scale.make_problem``) of 50,000 x 2,048 with 2, 10 and 1,000 classes (and ``mix``, whose mixed
  rows are never formed, with 2), on CUDA and on the CPU (fit time, test worst-group accuracy);
* the model repairs (``mixft``, ``clp``, ``recompose``, label-free, the methods' defaults) on the
  benchmark's ``demo`` task, both repair sets, exactly as ``bench.run --parts model`` runs them
  (:func:`bench.rows.run_model_rows`) but on CUDA (bfloat16 autocast): seed 0 on CUDA and on the CPU side
  by side, then seeds 1 and 2 on CUDA, as long as the time limit (``--deadline``) leaves room. The task
  is the one under ``bench/_work/tasks/demo`` when it is there (carry it to the lent machine: 27 MB, so
  the figures are on the checkpoint of ``bench/RESULTS.md``), else it is built (seed 0, about 30 s);
* ``--task NAME``: the model repairs on another benchmark task, such as a text task (``sst2_capped``: the
  rows :data:`TEXT_ROWS`, or ``--model-rows``); its checkpoint is over what the device tool carries, so pack
  it here (``python -m bench.carry pack bench/_work/tasks/NAME .gpucarry/NAME``: the same outputs on the
  task's texts in 55 MiB), carry ``.gpucarry`` and unpack it there first; ``--cuda-only`` leaves out the
  CPU column (the CPU figures are ``bench/RESULTS.md``'s);
* the solver's profile (``profile``): one 2-class ``dfr`` fit under ``torch.profiler`` -- kernel time,
  kernel launches, the points where the host waits for the device -- to say where its time goes;
* ONNX: ``repair export`` verified with onnxruntime (the report lists the providers it used: CUDA's
  when ``onnxruntime-gpu`` is installed);
* tests: the test files that exercise CUDA there (:data:`CUDA_TESTS`: the two CUDA-only tests and the
  model repairs' files, where ``--device auto`` is CUDA), each its summary line, in the time left before
  ``--deadline`` (a dry run: the two CUDA-only tests, which skip on the CPU).

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
MODEL_METHODS = ("mixft", "clp", "recompose")
PARTS = ("demo", "extraction", "solver", "profile", "onnx", "model_repairs", "tests")
#: the model rows (``bench.rows.MODEL_ROWS`` labels) the check runs on a text task: the method's defaults, the
#: capped task's setting (``auto-ft``'s mixft) and ``auto-ft`` itself
TEXT_ROWS = ("mixft-lpft-wig-last", "mixft", "auto-ft")
#: the test files that exercise CUDA where it is present (`--device auto` is CUDA there; two tests run only on CUDA)
CUDA_TESTS = (("tests/test_methods_contract.py", "cuda"), ("tests/test_solver.py", "cuda"), ("tests/test_clp.py", None),
              ("tests/test_mixft.py", None), ("tests/test_recompose.py", None), ("tests/test_steady.py", None),
              ("tests/test_model_repair.py", None))


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


def _warm_cuda() -> None:
    """CUDA's context and cuBLAS's handle are made by the first call (about a second): made here, so no
    timed fit pays for them."""
    import torch

    a = torch.randn(256, 256, device="cuda")
    float((a @ a).sum())
    torch.cuda.synchronize()


def _timed_fit(method: str, p: dict, device: str):
    """``method`` with group labels on a :func:`bench.scale.make_problem` problem on ``device``: (wall
    seconds, the result), the device's queue drained before and after."""
    import torch

    from repair.methods import RepairInputs, get_method

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = get_method(method)(RepairInputs(X=p["X"], y=p["y"], W=p["W0"], b=p["b0"], groups=p["g"], device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, res


def solver_rows(classes_list, n: int, d: int, columns, log) -> list[dict]:
    """``dfr`` with group labels (and ``mix`` with two classes) on the scale benchmark's planted-shortcut
    problems (:func:`bench.scale.make_problem`: the problems of ``bench/SCALE.md``, so the figures compare
    with it), once per ``(label, device)`` of ``columns``: fit time and test figures, or the error."""
    import torch

    from .scale import _scores, make_problem

    if any(device == "cuda" for _, device in columns):
        _warm_cuda()
    out = []
    for C in classes_list:
        p = make_problem(C, n=n, d=d)
        for method, (label, device) in [(m, c) for m in (("dfr", "mix") if C == 2 else ("dfr",)) for c in columns]:
            row = {"method": method, "classes": C, "device": label}
            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                secs, res = _timed_fit(method, p, device)
            except Exception as e:           # recorded; the other rows still run
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"{method} {C} classes on {label}: {row['error']}")
                out.append(row)
                continue
            sc = _scores(p, res.W.cpu(), res.b.cpu())
            row.update({"fit_seconds": round(secs, 2), "test_worst_group": round(sc["wga"], 4),
                        "test_accuracy": round(sc["acc"], 4), "solver": res.diagnostics.get("solver")})
            if device == "cuda":
                row["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            out.append(row)
            log(f"{method} {C} classes on {label}: {secs:.1f}s, test WGA {sc['wga']:.3f}")
    return out


def profile_row(C: int, n: int, d: int, device: str, log, repeats: int = 3) -> dict:
    """``dfr`` with group labels on the scale benchmark's ``C``-class problem on ``device``: the least fit
    time of ``repeats`` (CUDA warmed up first), then one fit under ``torch.profiler``: the GPU's summed
    kernel time, the kernel launches, the points where the host waited for the GPU (device-to-host copies
    and synchronizes) and the costliest operators by self time; and the same fit's time on the CPU, to
    say where the GPU's time goes when it is slower than the CPU."""
    from torch.profiler import ProfilerActivity, profile

    from .scale import make_problem

    p = make_problem(C, n=n, d=d)

    def once(dev):
        return _timed_fit("dfr", p, dev)

    if device == "cuda":
        _warm_cuda()
    times, res = [], None
    for _ in range(repeats):
        secs, res = once(device)
        times.append(secs)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        once(device)
    ev = prof.key_averages()

    def dev_us(e):
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
               and "CUDA" in str(e.device_type)]
    launch = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in ev if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                  "cudaEventSynchronize")
                or (e.key == "cudaMemcpyAsync"))
    top = sorted(ev, key=lambda e: -(dev_us(e) + e.self_cpu_time_total))[:14]
    row = {"classes": C, "n": n, "d": d, "device": device, "repeats": repeats,
           "fit_seconds": round(min(times), 3), "fit_seconds_each": [round(t, 3) for t in times],
           "solver": res.diagnostics.get("solver"),
           "kernel_seconds": round(sum(dev_us(e) for e in kernels) / 1e6, 3), "kernels": launch,
           "host_syncs": syncs, "item_calls": sum(e.count for e in ev if e.key == "aten::_local_scalar_dense"),
           "top": [{"name": e.key, "calls": e.count, "cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
                    "cuda_ms": round(dev_us(e) / 1e3, 1)} for e in top]}
    if device == "cuda":
        row["cpu_fit_seconds"] = round(min(once("cpu")[0] for _ in range(2)), 3)
    log(f"profile: dfr {C} classes on {device}: {row['fit_seconds']}s, kernels {row['kernel_seconds']}s "
        f"({launch} launches), {syncs} host waits; cpu {row.get('cpu_fit_seconds')}s")
    return row


def model_repair_rows(task, columns, *, seeds, variants, budget, work: Path, deadline: float, log,
                      rows=None) -> dict:
    """The label-free model repairs on ``task``'s repair sets through :func:`bench.rows.run_model_rows`:
    ``rows`` (``bench.rows.MODEL_ROWS`` labels; default :data:`MODEL_METHODS` on an image task,
    :data:`TEXT_ROWS` on a text task), the first seed on every column (device) side by side, then the
    other seeds on the first column (CUDA), none launched after ``deadline`` (``time.monotonic``). Each
    column extracts into its own cache, so CUDA's runs read CUDA's embeddings. ``budget`` replaces the
    rows' own (the dry run's few steps)."""
    import dataclasses

    import torch

    from . import rows as R

    if rows is None:
        rows = TEXT_ROWS if task.info.get("modality") == "text" else MODEL_METHODS
    specs = R.model_rows_for(task, only=list(rows))
    specs.sort(key=lambda sp: list(rows).index(sp.label))
    if not specs:
        raise ValueError(f"none of the model rows {list(rows)} applies to the task {task.name}")
    if budget:
        specs = [dataclasses.replace(sp, budget=budget) for sp in specs]
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    tds = {v: R.load_task_data(task, v, work / "cache-cpu") for v in variants}
    plan = [(v, seeds[0], col) for v in variants for col in columns]
    plan += [(v, s, columns[0]) for s in seeds[1:] for v in variants]
    out = []
    for variant, seed, (label, device) in plan:
        for sp in specs:
            row = {"variant": variant, "method": sp.label, "seed": seed, "device": label}
            if time.monotonic() > deadline:
                out.append({**row, "skipped": "the time limit (--deadline)"})
                continue
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            r = next(iter(R.run_model_rows(tds[variant], seed, [sp], work / f"cache-{label}", scratch,
                                           groups=False, device=device).values()))
            if r.get("error"):
                row["error"] = r["error"]
            else:
                row.update({"test_worst_group": r["test"]["worst_group_accuracy"], "test_accuracy": r["test"]["accuracy"],
                            "fit_seconds": r.get("fit_seconds"), "fix_total_seconds": round(r["fix_total_seconds"], 2),
                            "peak_rss_mib": r.get("peak_rss_mib"),
                            "stopped_by": (r.get("model_change") or {}).get("stopped_by")})
                if device == "cuda":
                    row["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            log(f"{sp.method} on {variant} seed {seed}, {label}: "
                + (row.get("error") or f"WGA {row['test_worst_group']:.3f}, {row['fix_total_seconds']:.1f}s"))
            out.append(row)
    return {"task": task.name, "checkpoint_sha256": task.info.get("checkpoint_sha256"), "budget": budget,
            "carried": task.info.get("carried"), "rows": out}


def model_repairs_md(mr, dev: str, ref: str) -> list:
    """GPU.md's model-repair table: per repair set and method, worst-group accuracy on ``dev`` per seed
    (mean ± std), its first seed's ``fix`` time, and ``ref``'s first seed beside it."""
    if not isinstance(mr, dict) or mr.get("error") or not mr.get("rows"):
        return ["", f"Model repairs: {_cell(mr or {})}."]
    rows = mr["rows"]
    has_ref = any(r["device"] == ref for r in rows)          # a --cuda-only run has no CPU column
    lines = ["", f"Model repairs on the benchmark's `{mr['task']}` task (checkpoint sha256 "
             f"`{str(mr.get('checkpoint_sha256'))[:12]}`), label-free, each row as `bench.rows.MODEL_ROWS` defines "
             "it" + (f" at budget {mr['budget']}" if mr.get("budget") else "") + ": test worst-group %, `repair fix` "
             f"wall seconds (in-process, as `bench.run --parts model`), peak memory."
             + (f" The task's checkpoint: {mr['carried']}." if mr.get("carried") else ""), "",
             f"| repair set | method | {dev}: WGA per seed | {dev}: mean ± std | {dev}: fix s (first seed) | "
             f"{dev}: peak GPU MiB |" + (f" {ref}: WGA (first seed) | {ref}: fix s |" if has_ref else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if has_ref else "")]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["variant"] == variant and r["method"] == method]
            d = [r for r in mine if r["device"] == dev]
            c = [r for r in mine if r["device"] == ref]
            ok = [r for r in d if "test_worst_group" in r]
            w = [100 * r["test_worst_group"] for r in ok]
            per = ", ".join(f"{100 * r['test_worst_group']:.1f}" if "test_worst_group" in r
                            else ("skipped" if r.get("skipped") else "failed") for r in d) or "–"
            if len(w) > 1:
                m = sum(w) / len(w)
                sd = (sum((x - m) ** 2 for x in w) / (len(w) - 1)) ** 0.5
                ms = f"{m:.1f} ± {sd:.1f}"
            else:
                ms = f"{w[0]:.1f}" if w else "–"
            first = ok[0] if ok else {}
            cf = c[0] if c else {}
            cw = (f"{100 * cf['test_worst_group']:.1f}" if "test_worst_group" in cf
                  else "skipped" if cf.get("skipped") else "failed" if cf else "–")
            lines.append(f"| {variant} | {method} | {per} | {ms} | {first.get('fix_total_seconds', '–')} | "
                         f"{first.get('cuda_peak_mib', '–')} |"
                         + (f" {cw} | {cf.get('fix_total_seconds', '–')} |" if has_ref else ""))
    return lines


def test_rows(specs, deadline: float, log) -> list[dict]:
    """``pytest`` on each ``(file, -k expression or None)`` of ``specs`` in a subprocess from the checkout,
    none started after ``deadline`` (``time.monotonic``) or run past it: its summary line ("9 passed, 1
    skipped"), exit code and seconds, the output's tail when it failed. The project need not be installed:
    the CLI package (``cli/``) and the built-in recipes (``recipes/``) are put on the path under their
    installed names, as the tests import them."""
    import re
    import tempfile

    shim = Path(tempfile.mkdtemp(prefix="repair-gpu-"))
    for name, folder in (("repair_cli", "cli"), ("repair_recipes", "recipes")):
        if importlib.util.find_spec(name) is None:
            (shim / name).symlink_to(ROOT / folder, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(shim),
                                                                   os.environ.get("PYTHONPATH")) if p)}
    out = []
    for path, expr in specs:
        row = {"file": path, "k": expr}
        left = deadline - time.monotonic()
        if left < 15:
            out.append({**row, "skipped": "the time limit (--deadline)"})
            continue
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, *(["-k", expr] if expr else [])]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            text, code = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            partial = e.stdout or ""                # bytes on some Pythons even with text=True
            text = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
            code = None
        lines = [x for x in text.strip().splitlines() if re.search(r"\b(passed|failed|error|skipped|deselected)\b", x)]
        row.update({"exit_code": code, "seconds": round(time.perf_counter() - t0, 1),
                    "summary": lines[-1].strip("= ") if lines else "no summary (stopped at the time limit)"})
        if code not in (0, 5):                 # 5: every test deselected
            row["tail"] = text[-1500:]
        log(f"{path}{' -k ' + expr if expr else ''}: {row['summary']}")
        out.append(row)
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


def profile_md(pr) -> list:
    """GPU.md's lines for the ``profile`` part."""
    if not isinstance(pr, dict) or pr.get("error"):
        return ["", f"Solver profile: {_cell(pr or {})}."]
    lines = ["", f"Solver profile: `dfr` with group labels, {pr['classes']} classes, {pr['n']}x{pr['d']} "
             f"(`bench.scale.make_problem`), on {pr['device']}: {pr['fit_seconds']} s a fit (the least of "
             f"{pr['repeats']}, CUDA warmed up, the solver `{pr.get('solver')}`), of which the GPU's kernels ran "
             f"{pr['kernel_seconds']} s ({pr['kernels']} kernel launches); {pr['host_syncs']} points where the "
             f"host waited for the GPU (a device-to-host copy or a synchronize); on that machine's CPU the same fit "
             f"took {pr.get('cpu_fit_seconds', '–')} s. The costliest operators (self time, from "
             "`torch.profiler`):", "", "| operator | calls | self CPU ms | self CUDA ms |", "|---|---|---|---|"]
    for op in pr.get("top", []):
        lines.append(f"| `{op['name']}` | {op['calls']} | {op['cpu_ms']} | {op['cuda_ms']} |")
    return lines


def markdown(doc: dict, args) -> str:
    """GPU.md's section of one run: the figures of ``doc`` (only the parts it ran), a failed part as
    "failed"."""
    dev, ref = doc["devices"]
    lines = [f"# GPU check ({doc['date']})", "", f"`{doc.get('command', 'python -m bench.gpu')}` on {doc['gpu']} "
             f"({doc['machine']}); versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".", ""]
    ext = doc.get("extraction")
    solver = doc.get("solver")
    if ext is not None or solver is not None:
        lines += [f"The `{ref}` column ran on that machine's CPU ({doc.get('cpu_threads')} torch threads); extraction "
                  "is `repair eval` of the tiny demo (`repair demo --size tiny`) on its test split; the solver rows "
                  "are the scale benchmark's problems (`bench.scale.make_problem`).", "",
                  f"| part | {dev} | {ref} |", "|---|---|---|"]
    if ext is not None:
        lines.append(f"| extraction (eval, no cache): wall s / embedding s | "
                     f"{_cell(ext.get(dev), 'wall_seconds', 'embedding_seconds')} | "
                     f"{_cell(ext.get(ref), 'wall_seconds', 'embedding_seconds')} |")
    if isinstance(solver, list):
        for C in args.classes:
            for method in ("dfr", "mix"):
                r = {x["device"]: x for x in solver if x["classes"] == C and x["method"] == method}
                if r:
                    lines.append(f"| {method}[groups] {args.n}x{args.d}, {C} classes: fit s / test WGA | "
                                 f"{_cell(r.get(dev), 'fit_seconds', 'test_worst_group')} | "
                                 f"{_cell(r.get(ref), 'fit_seconds', 'test_worst_group')} |")
        peaks = [f"{x['classes']} classes {x['cuda_peak_mib']:.0f} MiB" + (" (mix)" if x["method"] == "mix" else "")
                 for x in solver if x.get("cuda_peak_mib") is not None]
        if peaks:
            emb = args.n * args.d * 4 / 2**20
            lines += ["", f"Peak GPU memory of the solver fits (`torch.cuda.max_memory_allocated`; the embeddings "
                          f"are {emb:.0f} MiB): " + ", ".join(peaks) + "."]
    elif solver is not None:
        lines.append(f"| solver | {_cell(solver)} | |")
    if doc.get("profile") is not None:
        lines += profile_md(doc["profile"])
    if doc.get("onnx") is not None:
        onnx = doc["onnx"]
        lines += ["", f"ONNX export verified: {_cell(onnx, 'providers', 'passed', 'max_abs_diff', 'wall_seconds')} "
                  f"(providers / passed / max abs diff / wall s)."]
        providers = (doc.get("versions") or {}).get("onnxruntime_providers") or []
        if dev == "cuda" and "CUDAExecutionProvider" not in providers:
            lines.append("onnxruntime's CUDA provider is not installed on this machine (`pip install "
                         "repair-toolkit[gpu]` brings onnxruntime-gpu), so the verification ran on the CPU provider.")
    if doc.get("model_repairs") is not None:
        lines += model_repairs_md(doc["model_repairs"], dev, ref)
    tests = doc.get("tests")
    if isinstance(tests, list) and tests:
        lines += ["", f"Test files run on this machine (`--device auto` is {dev} here): " + "; ".join(
            f"`{t['file']}{' -k ' + t['k'] if t.get('k') else ''}` "
            + (t.get("skipped") and f"skipped ({t['skipped']})" or f"{t['summary']}"
               + ("" if t.get("exit_code") in (0, 5) else " **FAILED**")) for t in tests) + "."]
    elif isinstance(tests, dict) and tests.get("error"):
        lines += ["", "Test files: failed (see gpu.json)."]
    failed = [k for k in PARTS if isinstance(doc.get(k), dict) and doc[k].get("error")]
    if failed:
        lines += ["", "Failed parts (errors in gpu.json): " + ", ".join(failed) + "."]
    for note in doc.get("notes") or []:
        lines += ["", f"Note: {note}."]
    return "\n".join(lines) + "\n"


def _doc_args(doc: dict, args):
    """``args`` with the sizes a gpu.json ran at (the defaults before "args" was kept)."""
    import copy

    a = copy.copy(args)
    given = doc.get("args") or {}
    solver = doc.get("solver") if isinstance(doc.get("solver"), list) else []
    a.n, a.d = given.get("n", 50_000), given.get("d", 2_048)
    a.classes = given.get("classes") or list(dict.fromkeys(x["classes"] for x in solver))
    return a


def markdown_all(docs: list, args) -> str:
    """GPU.md from several runs' gpu.json, newest first, each its own section."""
    docs = sorted(docs, key=lambda d: d.get("date", ""), reverse=True)
    parts = [markdown(d, _doc_args(d, args)) for d in docs]
    parts = [p.replace("# GPU check", "# GPU check" if i == 0 else "## Earlier GPU check", 1)
             for i, p in enumerate(parts)]
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="solver rows (default 50,000; dry run 3,000)")
    ap.add_argument("--d", type=int, default=None, help="solver features (default 2,048; dry run 64)")
    ap.add_argument("--classes", type=int, nargs="+", default=None, help="default 2 10 1000; dry run 2 10")
    ap.add_argument("--model-seeds", type=int, nargs="+", default=None,
                    help="seeds of the model repairs on CUDA (default 0 1 2; dry run 0); the CPU runs seed 0")
    ap.add_argument("--variants", nargs="+", default=None, choices=("balanced", "skewed"),
                    help="repair sets of the model repairs (default both; dry run balanced)")
    ap.add_argument("--deadline", type=float, default=480.0,
                    help="seconds from the start after which no further model-repair run or test file is "
                         "launched, and a test file still running is stopped (default 480: the lent machine's "
                         "calls stop at 600)")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU in place of CUDA, small sizes")
    ap.add_argument("--parts", nargs="+", default=None, choices=PARTS,
                    help="only these parts (default: all; extraction, onnx and model_repairs need the demo)")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="GPU_JSON",
                    help="measure nothing: rewrite bench/GPU.md from the gpu.json files runs brought back "
                         "(each run its section, newest first)")
    ap.add_argument("--task", default="demo",
                    help="the benchmark task of the model repairs (default demo; a text task such as "
                         "sst2_capped is built here unless bench/_work/tasks/NAME is there: carry it packed, "
                         "python -m bench.carry)")
    ap.add_argument("--model-rows", nargs="+", default=None,
                    help="bench.rows.MODEL_ROWS labels of the model repairs (default mixft clp recompose on an "
                         "image task, " + " ".join(TEXT_ROWS) + " on a text task)")
    ap.add_argument("--cuda-only", action="store_true",
                    help="the model repairs on CUDA alone (no CPU column: the CPU figures are bench/RESULTS.md's)")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu.json (default bench/_work/gpu)")
    args = ap.parse_args(argv)
    if args.model_rows:
        from . import rows as R
        try:
            R.check_model_rows(args.model_rows)
        except ValueError as e:
            ap.error(str(e))
    if args.from_json is not None:
        docs = [json.loads(f.read_text()) for f in args.from_json]
        (args.out or BENCH).joinpath("GPU.md").write_text(markdown_all(docs, args))
        return 0
    dry = args.dry_run
    args.n = args.n or (3_000 if dry else 50_000)
    args.d = args.d or (64 if dry else 2_048)
    args.classes = args.classes or ([2, 10] if dry else [2, 10, 1000])
    args.model_seeds = args.model_seeds or ([0] if dry else [0, 1, 2])
    args.variants = args.variants or (["balanced"] if dry else ["balanced", "skewed"])
    t_start = time.monotonic()
    work = (args.out or WORK).resolve()

    def log(m):
        print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)

    import torch

    from .measure import code_version

    if not dry and not torch.cuda.is_available():
        log("no CUDA device here: nothing measured (run this on the lent GPU machine)")
        return 0
    # the two columns (label, device): CUDA against the CPU; a dry run puts the CPU in both
    columns = [("cpu", "cpu"), ("cpu-ref", "cpu")] if dry else [("cuda", "cuda"), ("cpu", "cpu")]
    dev, ref = columns[0][0], columns[1][0]
    work.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
           "gpu": "none (dry run)" if dry else torch.cuda.get_device_name(0), "versions": versions(),
           "cpu_threads": torch.get_num_threads(), "devices": [dev, ref], "dry_run": dry,
           "args": {"n": args.n, "d": args.d, "classes": args.classes, "model_seeds": args.model_seeds,
                    "variants": args.variants, "deadline": args.deadline, "task": args.task,
                    "model_rows": args.model_rows, "cuda_only": args.cuda_only},
           "command": "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
           "code": code_version()}

    def save(name: str, text: str) -> None:
        # into the check's folder, and into $OUT when set (the device tool brings back only what is there)
        for folder in (work, Path(os.environ["OUT"]) if os.environ.get("OUT") else None):
            if folder is not None:
                (folder / name).write_text(text)

    def part(name, fn):
        t0 = time.monotonic()
        try:
            doc[name] = fn()
        except Exception as e:               # recorded; the other parts still run
            doc[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
            log(f"{name}: failed: {type(e).__name__}: {e}")
        doc.setdefault("part_seconds", {})[name] = round(time.monotonic() - t0, 1)
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

    def model_repairs():
        from . import tasks as T

        if dry:          # the tiny demo built above, as a benchmark task (its splits are the demo's)
            task = T.Task(name="demo", root=demo, model_dir=model, val=val, test=test, group_by="place",
                          info={"val": "data/val", "modality": "image"})
        else:            # the benchmark's task (reused when carried, else built: seed 0)
            task = T.build_task(args.task, work_dir=BENCH / "_work", log=log)
        return model_repair_rows(task, columns[:1] if args.cuda_only else columns, seeds=args.model_seeds,
                                 variants=args.variants, budget="3steps" if dry else None, work=work,
                                 deadline=t_start + args.deadline, log=log, rows=args.model_rows)

    def onnx():
        secs, rep = run(["export", model, "--data", val, "--device", columns[0][1], "--out", work / "demo.onnx",
                         "--force"], log)
        if rep.get("error") is not None:
            return rep
        return {"wall_seconds": round(secs, 2), "providers": rep.get("providers"), "passed": rep.get("passed"),
                "max_abs_diff": rep.get("max_abs_diff")}

    todo = set(args.parts or PARTS)
    if todo & {"extraction", "onnx"}:
        todo.add("demo")
    demo_ok = lambda: "demo" in doc and not (isinstance(doc["demo"], dict) and doc["demo"].get("error"))  # noqa: E731
    if "demo" in todo:
        part("demo", build_demo)
    if "extraction" in todo and demo_ok():
        part("extraction", extraction)
    if "solver" in todo:
        part("solver", lambda: solver_rows(args.classes, args.n, args.d, columns, log))
    if "profile" in todo:
        part("profile", lambda: profile_row(2, args.n, args.d, columns[0][1], log))
    if "onnx" in todo and demo_ok():
        part("onnx", onnx)
    if "model_repairs" in todo:
        part("model_repairs", model_repairs)       # it stops launching runs at the deadline
    if "tests" in todo:                            # last: what time is left (a dry run: the CUDA-only tests)
        part("tests", lambda: test_rows(CUDA_TESTS[:2] if dry else CUDA_TESTS, t_start + args.deadline, log))
    text = markdown(doc, args)
    save("GPU.md", text)
    if not dry:
        (BENCH / "GPU.md").write_text(text)
    log(f"wrote {work / 'gpu.json'} and {work / 'GPU.md'}" + ("" if dry else f" and {BENCH / 'GPU.md'}"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
