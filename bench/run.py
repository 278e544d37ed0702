"""The benchmark: every repair method, ``auto`` and the references, on the same embeddings.

    python -m bench.run [--smoke] [--seeds 0 1 2] [--tasks sst2_negation mnist_color demo]
                        [--out-dir bench] [--work-dir bench/_work] [--timing-repeats N] [--no-spuco]
                        [--no-fix-cli] [--threads 2] [--fit-threads 1]

Per task (checkpoint and splits from :mod:`bench.tasks`, one checkpoint per task, built with seed 0)
the validation (repair) and test embeddings are extracted once through ``repair.api`` (cached under
the work dir). Per seed, on those embeddings:

* ``erm``: the checkpoint's own head;
* every registered ``repair`` method (``repair.methods.list_methods``) with group labels and without
  them, as its ``MethodInfo`` allows (``needs_groups``: with only; ``uses_groups=False``: without
  only), fitted on the whole validation split with ``seed``;
* ``auto``: the real ``repair fix`` pipeline (``repair.pipeline.fix_model``, recipe ``auto``) on the
  validation split, label-free and with ``--group-by``, its before/after measured on the test split
  (``--eval``);
* the references (:mod:`bench.references`): the DFR paper's validation protocol (sklearn), SpuCo's
  ``DFR`` and ``DISPEL``.

Every figure is test worst-group / mean accuracy; the test split is never used for fitting or
selection. Each fit is timed (wall clock, ``time.perf_counter``) and its peak memory is the largest
increase of the process's resident set size over its value at the start of the fit, sampled every
2 ms from ``/proc/self/statm`` (after ``gc.collect()`` + ``malloc_trim(0)``, so freed heap is given
back first).

Cost: the forward-pass floor is ``repair.embeddings.extract`` over the validation split with the
cache off (model already loaded, in-process); ``repair fix`` is timed as a subprocess (the command
a user runs: ``repair fix MODEL --data VAL --recipe auto``, label-free) with ``--no-cache`` and with
a warm cache.

Writes ``results.json``, ``RESULTS.md`` and ``wga.png`` into ``--out-dir`` (default ``bench/``;
``--smoke`` defaults to ``bench/_work/smoke``).

``--smoke`` (CI): a tiny synthetic image task (random timm ``test_resnet``, 96 validation / 128 test
images, no training, no real checkpoint), one seed, no SpuCo, no ``repair fix`` subprocess (the
forward-pass floor is still measured).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from . import tasks as T  # noqa: E402

DEFAULT_TASKS = ("sst2_negation", "mnist_color", "demo")
ERM = "erm"
AUTO = "auto"
REF_DFR = "ref:dfr-protocol"
REF_SPUCO_DFR = "ref:spuco-DFR"
REF_SPUCO_DISPEL = "ref:spuco-DISPEL"
TARGET_AUTO_GAP = 1.0          # points: label-free auto within this of group-label DFR
TARGET_GAIN = 20.0             # points over ERM where ERM WGA < 60%
TARGET_FIX_RATIO = 1.3         # repair fix total / forward-pass floor
TARGET_SPEEDUP = 20.0          # DFR reference protocol time / our head fitting time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ measurement
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Largest RSS increase (bytes) over the value at entry, sampled by a thread every 2 ms."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_delta: Optional[int] = None

    def __enter__(self):
        _trim()
        self.start = _rss_bytes()
        self._peak = self.start
        self._stop = threading.Event()
        if self.start is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            v = _rss_bytes()
            if v is not None and v > self._peak:
                self._peak = v
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.start is None:
            return False
        self._stop.set()
        self._thread.join()
        v = _rss_bytes()
        if v is not None and v > self._peak:
            self._peak = v
        self.peak_delta = self._peak - self.start
        return False


def measured(fn: Callable[[], Any]) -> tuple[Any, float, Optional[float]]:
    """(result, wall seconds, peak RSS increase in MiB)."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - t0
    return out, secs, (None if mem.peak_delta is None else mem.peak_delta / 2**20)


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("timm", "transformers", "sklearn", "numpy", "spuco"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "installed")
        except Exception:
            versions[mod] = None
    try:
        from importlib.metadata import version

        versions["spuco"] = version("spuco")
        versions["repair"] = version("repair-toolkit")
    except Exception:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": mem_gb, "platform": platform.platform(), "versions": versions,
            "cuda": bool(torch.cuda.is_available())}


@contextmanager
def fit_threads(n: int):
    """Head fits run with ``n`` torch and BLAS threads (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    try:
        if threadpool_limits is not None:
            with threadpool_limits(limits=n):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(before)


def code_version() -> dict:
    """The checkout's commit (read-only git) and a hash of the repair library's sources, so a
    results file can be matched to the code that produced it."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    out: dict = {}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        out["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "repair", "cli", "recipes"],
                                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:
        pass
    h = hashlib.sha256()
    for sub in ("repair", "recipes"):
        for f in sorted((root / sub).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".yaml"):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    out["repair_sources_sha256"] = h.hexdigest()[:16]
    return out


def load_average() -> Optional[list]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ============================================================================ embeddings
@dataclass
class TaskData:
    task: T.Task
    X_val: Any
    y_val: Any
    g_val: Any
    X_test: Any
    y_test: Any
    g_test: Any
    test_group_names: list
    class_names: list
    W0: Any
    b0: Any
    embed_seconds: dict


def load_task_data(task: T.Task, cache_dir: Path) -> TaskData:
    from repair.api import RuntimeOptions, prepare, prepare_data
    from repair.data import DataOptions

    rt = RuntimeOptions(device="cpu", cache_dir=str(cache_dir), use_cache=True, progress=False)
    opts = DataOptions(group_by=task.group_by)
    p = prepare(task.model_dir, task.val, data_opts=opts, runtime=rt)
    _, enc_t, emb_t = prepare_data(p.adapter, task.test, opts, rt)
    W0, b0 = p.adapter.head_params()
    return TaskData(task, p.emb.X, p.enc.y, p.enc.groups, emb_t.X, enc_t.y, enc_t.groups,
                    list(enc_t.group_names), list(p.enc.class_names), W0, b0,
                    {"val": round(p.emb.seconds, 3), "val_from_cache": p.emb.from_cache,
                     "test": round(emb_t.seconds, 3), "test_from_cache": emb_t.from_cache})


def score(td: TaskData, W, b) -> dict:
    import torch

    from repair.metrics import evaluate

    W = torch.as_tensor(W, dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32)
    rep = evaluate(td.X_test @ W.T + b, td.y_test, td.class_names, td.g_test, td.test_group_names)
    return {"accuracy": rep["accuracy"], "worst_group_accuracy": rep["worst_group_accuracy"],
            "worst_group": rep["worst_group"],
            "per_group": {g["name"]: g["accuracy"] for g in rep["per_group"]}}


def _jsonable(obj: Any, limit: int = 4000) -> Any:
    try:
        s = json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    except Exception:
        return str(obj)[:limit]
    if len(s) > limit:
        return {"truncated": s[:limit]}
    return json.loads(s)


# ============================================================================ runs
# non-default settings also benchmarked, when the method's config has them (each is a separate row)
EXTRA_CONFIGS = {"dfr": [{"protocol": "paper"}]}


def method_variants() -> tuple[list, Optional[str]]:
    """[(MethodInfo, params or None, with_groups)], or ([], why) when the registry cannot load."""
    try:
        from repair.methods import list_methods

        infos = list_methods(kind="head")      # model repairs have their own rows (run_model_repairs)
    except Exception as e:
        return [], f"{type(e).__name__}: {e}"
    out = []
    for m in infos:
        configs: list = [None]
        for params in EXTRA_CONFIGS.get(m.name, []):
            try:
                m.make_config(params)
            except (ValueError, TypeError):
                continue
            if any(getattr(m.default_config(), k, None) != v for k, v in params.items()):
                configs.append(params)
        for params in configs:
            if m.needs_groups:
                out.append((m, params, True))
            elif m.uses_groups:
                out += [(m, params, False), (m, params, True)]
            else:
                out.append((m, params, False))
    return out, None


def variant_label(name: str, with_groups: bool, params: Optional[dict] = None) -> str:
    if params:
        name += "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    return f"{name}[{'groups' if with_groups else 'no-groups'}]"


def run_methods(td: TaskData, seed: int, variants: list) -> dict:
    from repair.methods import RepairInputs

    rows = {}
    for info, params, with_groups in variants:
        label = variant_label(info.name, with_groups, params)
        inputs = RepairInputs(X=td.X_val, y=td.y_val, W=td.W0, b=td.b0,
                              groups=td.g_val if with_groups else None, seed=seed, device="cpu")
        cfg = info.make_config(params) if params else None
        try:
            out, secs, mem = measured(lambda: info(inputs, cfg))
            rows[label] = {"kind": "ours", "method": info.name, "params": params, "group_labels": with_groups,
                           "test": score(td, out.W, out.b), "fit_seconds": secs, "peak_rss_mib": mem,
                           "diagnostics": _jsonable(out.diagnostics)}
        except Exception as e:
            log(f"  {label} failed: {type(e).__name__}: {e}")
            rows[label] = {"kind": "ours", "method": info.name, "params": params, "group_labels": with_groups,
                           "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    return rows


def run_auto(td: TaskData, seed: int, with_groups: bool, cache_dir: Path, scratch: Path) -> dict:
    """The real `repair fix --recipe auto` pipeline, in-process (embeddings from the cache),
    before/after on the test split through --eval."""
    label = variant_label(AUTO, with_groups)
    try:
        from repair.api import RuntimeOptions
        from repair.data import DataOptions
        from repair.pipeline import FixOptions, fix_model
    except Exception as e:
        return {label: {"kind": "auto", "group_labels": with_groups, "error": f"repair.pipeline unavailable: {e}"}}
    task = td.task
    out = scratch / f"auto-{task.name}-{seed}-{int(with_groups)}"
    try:
        rep, secs, mem = measured(lambda: fix_model(
            task.model_dir, task.val, out,
            data_opts=DataOptions(group_by=task.group_by if with_groups else None),
            runtime=RuntimeOptions(device="cpu", cache_dir=str(cache_dir), use_cache=True, progress=False),
            options=FixOptions(recipe="auto", seed=seed, eval_data=str(task.test),
                               eval_group_by=task.group_by, force=True),
            log=lambda m: None))
    except Exception as e:
        log(f"  {label} failed: {type(e).__name__}: {e}")
        return {label: {"kind": "auto", "group_labels": with_groups, "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-2000:]}}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        for suffix in (".onnx", ".safetensors"):
            Path(str(out) + suffix).unlink(missing_ok=True)
    after = rep["after"]
    return {label: {
        "kind": "auto", "method": rep.get("method"), "chosen": rep.get("candidate"), "group_labels": with_groups,
        "test": {"accuracy": after["accuracy"], "worst_group_accuracy": after["worst_group_accuracy"],
                 "worst_group": after.get("worst_group"),
                 "per_group": {g["name"]: g["accuracy"] for g in (after.get("per_group") or [])}},
        "erm_test_by_fix": {"accuracy": rep["before"]["accuracy"],
                            "worst_group_accuracy": rep["before"]["worst_group_accuracy"]},
        "fit_seconds": rep["timing"]["fit_seconds"], "fix_total_seconds": secs, "peak_rss_mib": mem,
        "selection_criterion": rep.get("selection_criterion"),
        "candidates": _jsonable(rep.get("candidates")), "splits": rep.get("settings", {}).get("splits")}}


def run_references(td: TaskData, seed: int, spuco: bool) -> dict:
    from . import references as R

    X, y, g = td.X_val.numpy(), td.y_val.numpy(), td.g_val.numpy()
    C = len(td.class_names)
    rows = {}
    todo = [(REF_DFR, lambda: R.dfr_reference(X, y, g, num_classes=C, seed=seed))]
    why_not = R.spuco_available() if spuco else "skipped (--no-spuco / --smoke)"
    if why_not is None:
        todo += [(REF_SPUCO_DFR, lambda: R.spuco_reference("DFR", X, y, g, num_classes=C, seed=seed)),
                 (REF_SPUCO_DISPEL, lambda: R.spuco_reference("DISPEL", X, y, g, num_classes=C, seed=seed))]
    else:
        for label in (REF_SPUCO_DFR, REF_SPUCO_DISPEL):
            rows[label] = {"kind": "reference", "group_labels": True, "skipped": why_not}
    for label, fn in todo:
        try:
            res, secs, mem = measured(fn)
            rows[label] = {"kind": "reference", "group_labels": True, "test": score(td, res.W, res.b),
                           "fit_seconds": secs, "peak_rss_mib": mem, "info": _jsonable(res.info)}
        except Exception as e:
            log(f"  {label} failed: {type(e).__name__}: {e}")
            rows[label] = {"kind": "reference", "group_labels": True, "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()[-2000:]}
    return rows


# ============================================================================ cost of `repair fix`
def forward_floor(task: T.Task, repeats: int) -> list[float]:
    """Seconds of repair.embeddings.extract over the validation split, cache off, model loaded."""
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import extract

    adapter = load_model(task.model_dir)
    data = load_data(task.val)
    out = []
    for _ in range(repeats):
        emb = extract(adapter, data, batch_size=64, device="cpu", use_cache=False, progress=False)
        out.append(emb.seconds)
    return out


def fix_cli(task: T.Task, seed: int, out: Path, cache_dir: Optional[Path]) -> dict:
    cmd = [sys.executable, "-m", "repair_cli.main", "fix", str(task.model_dir), "--data", str(task.val),
           "--out", str(out), "--recipe", "auto", "--seed", str(seed), "--device", "cpu",
           "--json", "--quiet", "--force"]
    cmd += ["--cache-dir", str(cache_dir)] if cache_dir is not None else ["--no-cache"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}", "wall_seconds": wall}
    rep = json.loads(proc.stdout)
    t = rep.get("timing", {})
    return {"wall_seconds": wall, "total_seconds": t.get("total_seconds"),
            "embedding_seconds": t.get("embedding_seconds"), "embedding_from_cache": t.get("embedding_from_cache"),
            "fit_seconds": t.get("fit_seconds"), "method": rep.get("method"),
            "candidates": [{k: c.get(k) for k in ("candidate", "fit_seconds", "score")} for c in rep.get("candidates") or []]}


def run_costs(task: T.Task, seeds: list[int], repeats: int, cache_dir: Path, scratch: Path,
              with_cli: bool = True) -> dict:
    res: dict = {"repeats": repeats}
    try:
        res["floor_seconds"] = forward_floor(task, repeats)
    except Exception as e:
        res["floor_error"] = f"{type(e).__name__}: {e}"
    nocache, cached = [], []
    for r in range(repeats if with_cli else 0):
        seed = seeds[r % len(seeds)]
        nocache.append(fix_cli(task, seed, scratch / f"fixcli-{task.name}-{r}", None))
        cached.append(fix_cli(task, seed, scratch / f"fixcli-{task.name}-{r}", cache_dir))
    res["fix_cli_nocache"] = nocache
    res["fix_cli_cache"] = cached
    return res


# ============================================================================ smoke task
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


# ============================================================================ summary
def _mean_std(vals: list) -> tuple[Optional[float], Optional[float]]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: list[dict]) -> dict:
    labels: list = []
    for r in runs:
        for k in r["methods"]:
            if k not in labels:
                labels.append(k)
    out = {}
    for label in labels:
        rows = [r["methods"].get(label, {}) for r in runs]
        ok = [x for x in rows if "test" in x]
        first = next((x for x in rows if x), {})
        s: dict = {"kind": first.get("kind"), "group_labels": first.get("group_labels"), "n_seeds": len(ok)}
        if not ok:
            s["error"] = first.get("error") or first.get("skipped")
            out[label] = s
            continue
        for key, get in (("wga", lambda x: x["test"]["worst_group_accuracy"]),
                         ("acc", lambda x: x["test"]["accuracy"]),
                         ("fit_seconds", lambda x: x.get("fit_seconds")),
                         ("peak_rss_mib", lambda x: x.get("peak_rss_mib"))):
            m, sd = _mean_std([get(x) for x in ok])
            s[key] = {"mean": m, "std": sd}
        if first.get("kind") == "auto":
            s["chosen"] = [x.get("chosen") for x in ok]
        if len(ok) < len(rows):
            s["failed_seeds"] = len(rows) - len(ok)
        out[label] = s
    return out


def cost_summary(costs: dict, summary: dict) -> dict:
    floor = costs.get("floor_seconds") or []
    nc = [x["wall_seconds"] for x in costs.get("fix_cli_nocache", []) if "error" not in x]
    nc_in = [x["total_seconds"] for x in costs.get("fix_cli_nocache", []) if "error" not in x]
    wc = [x["wall_seconds"] for x in costs.get("fix_cli_cache", []) if "error" not in x]
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    out = {"floor_seconds": med(floor), "fix_cli_nocache_wall": med(nc), "fix_cli_nocache_inprocess": med(nc_in),
           "fix_cli_cache_wall": med(wc)}
    f = out["floor_seconds"]
    out["ratio_fix_nocache_wall_over_floor"] = (out["fix_cli_nocache_wall"] / f) if (f and nc) else None
    out["ratio_fix_nocache_inprocess_over_floor"] = (out["fix_cli_nocache_inprocess"] / f) if (f and nc_in) else None
    out["ratio_fix_cache_wall_over_floor"] = (out["fix_cli_cache_wall"] / f) if (f and wc) else None
    ref = summary.get(REF_DFR, {}).get("fit_seconds", {}).get("mean")
    speed = {}
    if ref:
        for label, s in summary.items():
            t = (s.get("fit_seconds") or {}).get("mean")
            if t and s.get("kind") in ("ours", "auto"):
                speed[label] = ref / t
    out["dfr_reference_seconds"] = ref
    out["speedup_vs_dfr_reference"] = speed
    errs = [x["error"] for x in costs.get("fix_cli_nocache", []) + costs.get("fix_cli_cache", []) if "error" in x]
    if errs:
        out["errors"] = errs[:3]
    return out


# ============================================================================ report
def _pct(v, sd=None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _secs(v, sd=None) -> str:
    if v is None:
        return "–"
    fmt = (lambda x: f"{x:.3f}") if v < 10 else (lambda x: f"{x:.1f}")
    return fmt(v) + (f" ± {fmt(sd)}" if sd is not None else "")


def targets(doc: dict) -> list[dict]:
    rows = []
    for name, t in doc["tasks"].items():
        s = t.get("summary", {})
        if not s:
            continue
        erm = (s.get(ERM, {}).get("wga") or {}).get("mean")
        auto = (s.get(variant_label(AUTO, False), {}).get("wga") or {}).get("mean")
        ref = (s.get(REF_DFR, {}).get("wga") or {}).get("mean")
        ours_dfr = (s.get(variant_label("dfr", True), {}).get("wga") or {}).get("mean")
        r = {"task": name, "erm_wga": erm, "auto_wga": auto, "ref_dfr_wga": ref, "dfr_groups_wga": ours_dfr}
        if auto is not None and ref is not None:
            r["auto_minus_ref_dfr_points"] = 100 * (auto - ref)
            r["auto_within_1pt_of_ref_dfr"] = r["auto_minus_ref_dfr_points"] >= -TARGET_AUTO_GAP
        if auto is not None and ours_dfr is not None:
            r["auto_minus_dfr_groups_points"] = 100 * (auto - ours_dfr)
        if auto is not None and erm is not None:
            r["auto_gain_over_erm_points"] = 100 * (auto - erm)
            r["gain_target_applies"] = erm < 0.60
            if erm < 0.60:
                r["auto_gain_ge_20pt"] = r["auto_gain_over_erm_points"] >= TARGET_GAIN
        free = [(lab, x["wga"]["mean"]) for lab, x in s.items()
                if x.get("kind") == "ours" and not x.get("group_labels") and x.get("wga")]
        if free:
            lab, w = max(free, key=lambda kv: kv[1])
            r["best_label_free_method"] = lab
            r["best_label_free_wga"] = w
            if ref is not None:
                r["best_label_free_minus_ref_dfr_points"] = 100 * (w - ref)
        c = t.get("cost_summary", {})
        if c.get("ratio_fix_nocache_wall_over_floor") is not None:
            r["fix_over_floor_wall"] = c["ratio_fix_nocache_wall_over_floor"]
            r["fix_over_floor_inprocess"] = c.get("ratio_fix_nocache_inprocess_over_floor")
            r["fix_le_1_3x_floor"] = c["ratio_fix_nocache_wall_over_floor"] <= TARGET_FIX_RATIO
        sp = c.get("speedup_vs_dfr_reference", {})
        for lab in (variant_label("dfr", True), variant_label(AUTO, False)):
            if lab in sp:
                key = "dfr_groups" if lab.startswith("dfr") else "auto"
                r[f"speedup_{key}"] = sp[lab]
                w = (s.get(lab, {}).get("wga") or {}).get("mean")
                r[f"wga_{key}_minus_ref_points"] = None if (w is None or ref is None) else 100 * (w - ref)
                r[f"speedup_{key}_ge_20x_at_eq_wga"] = sp[lab] >= TARGET_SPEEDUP and (w is not None and ref is not None and w >= ref)
        rows.append(r)
    return rows


def _mem(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _ok(v) -> str:
    return "–" if v is None else ("**met**" if v else "**missed**")


def write_markdown(doc: dict, path: Path, analysis: Optional[str]) -> None:
    m = doc["meta"]
    L = []
    L.append("# Benchmark results: last-layer repair on real shortcut models\n")
    L.append(f"Generated by `{m['command']}` on {m['date']} ({m['wall_minutes']:.1f} min)."
             + (" **SMOKE RUN: tiny synthetic data, numbers are meaningless.**" if m["smoke"] else "") + "\n")
    mi = m["machine"]
    v = mi["versions"]
    th = m.get("threads", {})
    L.append(f"Machine: {mi['cpu']}, {mi['cores']} cores (threads: extraction {th.get('extraction')}, head fits "
             f"{th.get('head_fits')}), "
             f"{mi['memory_gb']} GB RAM, CUDA {'yes' if mi['cuda'] else 'no'} (everything runs on the CPU). "
             f"Python {v.get('python')}, torch {v.get('torch')}, timm {v.get('timm')}, transformers "
             f"{v.get('transformers')}, scikit-learn {v.get('sklearn')}, spuco {v.get('spuco')}. "
             f"Load average at start / end: {m.get('load_start')} / {m.get('load_end')} — the machine was shared "
             "with other jobs, so absolute times are noisy; ratios are taken within the same run.\n")
    if m.get("code"):
        c = m["code"]
        L.append(f"Code: commit `{str(c.get('git_commit'))[:12]}`{' + uncommitted changes' if c.get('git_dirty') else ''}, "
                 f"repair sources sha256 `{c.get('repair_sources_sha256')}`.\n")
    L.append(f"Seeds: {m['seeds']} (seeds vary the repair methods' and references' randomness; one ERM "
             "checkpoint per task, built with seed 0; validation/test splits fixed). Figures are mean ± std "
             "over seeds, in percent, on the **test** split, which no fit or selection ever sees.\n")
    L.append("## Tasks\n")
    L.append("| task | backbone | train / val / test | attribute | ERM test acc | ERM test WGA | ERM worst group | ERM training |")
    L.append("|---|---|---|---|---|---|---|---|")
    for name, t in doc["tasks"].items():
        i = t.get("info", {})
        if "skipped" in t:
            L.append(f"| {name} | skipped: {t['skipped']} | | | | | | |")
            continue
        sz = i.get("sizes", {})
        e = dict(i.get("erm_test") or {})
        if not e and (t.get("summary", {}).get(ERM) or {}).get("wga"):
            s_erm = t["summary"][ERM]
            e = {"accuracy": s_erm["acc"]["mean"], "worst_group_accuracy": s_erm["wga"]["mean"]}
        L.append(f"| {name} | {i.get('backbone', '')} | {sz.get('train', '–')} / {sz.get('val', '–')} / "
                 f"{sz.get('test', '–')} | {i.get('attribute', t.get('group_by', ''))} | {_pct(e.get('accuracy'))} | "
                 f"{_pct(e.get('worst_group_accuracy'))} | {str(e.get('worst_group', '–')).replace('|', ' / ')} | "
                 f"{i.get('erm_train_seconds', '–')} s |")
    L.append("")
    for name, t in doc["tasks"].items():
        i = t.get("info", {})
        if i.get("val_protocol"):
            L.append(f"- **{name}**: validation (repair set) {i['val_protocol']}; test {i.get('test_protocol')}. "
                     f"Group counts: {json.dumps(i.get('group_counts', {}))}")
    L.append("")
    L.append("## Worst-group and mean accuracy per method (test split)\n")
    L.append("`[groups]`: the method was given the validation split's group labels; `[no-groups]`: it was "
             "not. `auto` is the `repair fix --recipe auto` pipeline (its own fit/selection split of the "
             "validation data). Fit time is the head fitting alone on precomputed embeddings (for `auto`: "
             "every candidate plus the final refit, as `fix` reports it); peak memory is the RSS increase "
             "during the fit.\n")
    for name, t in doc["tasks"].items():
        s = t.get("summary")
        if not s:
            continue
        L.append(f"### {name}\n")
        if t.get("methods_error"):
            L.append(f"Registry unavailable: `{t['methods_error']}`\n")
        erm = (s.get(ERM, {}).get("wga") or {}).get("mean")
        L.append("| method | group labels | test WGA | Δ WGA vs ERM | test acc | fit time (s) | peak RSS (MiB) | note |")
        L.append("|---|---|---|---|---|---|---|---|")
        for label, r in s.items():
            if "wga" not in r:
                L.append(f"| {label} | {'yes' if r.get('group_labels') else 'no'} | – | – | – | – | – | "
                         f"{str(r.get('error', ''))[:120]} |")
                continue
            w, a = r["wga"], r["acc"]
            f, mem = r.get("fit_seconds") or {}, r.get("peak_rss_mib") or {}
            delta = "–" if (erm is None or label == ERM) else f"{100 * (w['mean'] - erm):+.1f}"
            note = ""
            if r.get("chosen"):
                note = "chose " + ", ".join(sorted(set(str(c) for c in r["chosen"])))
            if r.get("failed_seeds"):
                note += f" ({r['failed_seeds']} seed(s) failed)"
            L.append(f"| {label} | {'yes' if r.get('group_labels') else 'no'} | {_pct(w['mean'], w['std'])} | {delta} | "
                     f"{_pct(a['mean'], a['std'])} | {_secs(f.get('mean'), f.get('std'))} | "
                     f"{_mem(mem.get('mean'))} | {note} |")
        L.append("")
    L.append("## Cost of `repair fix`\n")
    L.append("Floor = `repair.embeddings.extract` over the validation split with the cache off (model already "
             "loaded; the unavoidable forward passes). `repair fix` = the command as a subprocess "
             "(`repair fix MODEL --data VAL --recipe auto`, label-free, output written), wall clock including "
             "interpreter start, imports, model loading, extraction, all candidates and saving; "
             "`in-process` = the `timing.total_seconds` that `fix` itself reports (no interpreter start / "
             "imports). Medians over the repeats.\n")
    L.append("| task | n val | floor (s) | fix, no cache: wall (s) | wall / floor | in-process (s) | in-process / floor | fix, warm cache: wall (s) | DFR reference protocol (s) | our dfr[groups] fit (s) | speed-up | auto fit (s) | speed-up |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, t in doc["tasks"].items():
        c = t.get("cost_summary")
        if not c:
            continue
        s = t.get("summary", {})
        dfr_t = (s.get(variant_label("dfr", True), {}).get("fit_seconds") or {}).get("mean")
        auto_t = (s.get(variant_label(AUTO, False), {}).get("fit_seconds") or {}).get("mean")
        sp = c.get("speedup_vs_dfr_reference", {})
        r = lambda x: "–" if x is None else f"{x:.2f}×"  # noqa: E731
        L.append(f"| {name} | {t.get('info', {}).get('sizes', {}).get('val', '–')} | {_secs(c.get('floor_seconds'))} | "
                 f"{_secs(c.get('fix_cli_nocache_wall'))} | {r(c.get('ratio_fix_nocache_wall_over_floor'))} | "
                 f"{_secs(c.get('fix_cli_nocache_inprocess'))} | {r(c.get('ratio_fix_nocache_inprocess_over_floor'))} | "
                 f"{_secs(c.get('fix_cli_cache_wall'))} | {_secs(c.get('dfr_reference_seconds'))} | {_secs(dfr_t)} | "
                 f"{r(sp.get(variant_label('dfr', True)))} | {_secs(auto_t)} | {r(sp.get(variant_label(AUTO, False)))} |")
    L.append("")
    for name, t in doc["tasks"].items():
        errs = (t.get("cost_summary") or {}).get("errors")
        if errs:
            L.append(f"- **{name}**: `repair fix` failed: `{errs[0][:300]}`")
        ferr = (t.get("costs") or {}).get("floor_error")
        if ferr:
            L.append(f"- **{name}**: floor measurement failed: `{ferr[:300]}`")
    L.append("")
    L.append("## Targets\n")
    L.append(f"1. label-free `auto` within {TARGET_AUTO_GAP:.0f} point of group-label DFR (reference protocol) on every task, "
             f"and ≥ {TARGET_GAIN:.0f} points over ERM where ERM WGA < 60%;")
    L.append(f"2. `repair fix` total ≤ {TARGET_FIX_RATIO}× the forward-pass floor on CPU;")
    L.append(f"3. head fitting ≥ {TARGET_SPEEDUP:.0f}× faster than the DFR reference protocol at equal or better WGA.\n")
    L.append("| task | ERM WGA | auto[no-groups] WGA | ref DFR WGA | auto − ref DFR (pt) | within 1 pt | gain over ERM (pt) | ≥ 20 pt (if ERM < 60%) | fix/floor (wall) | ≤ 1.3× | dfr[groups] speed-up | WGA vs ref (pt) | ≥ 20× at ≥ WGA | auto speed-up | WGA vs ref (pt) | ≥ 20× at ≥ WGA |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    f1 = lambda x: "–" if x is None else f"{x:+.2f}"  # noqa: E731
    fx = lambda x: "–" if x is None else f"{x:.1f}×"  # noqa: E731
    for r in doc.get("targets", []):
        gain_ok = r.get("auto_gain_ge_20pt") if r.get("gain_target_applies") else None
        L.append(f"| {r['task']} | {_pct(r.get('erm_wga'))} | {_pct(r.get('auto_wga'))} | {_pct(r.get('ref_dfr_wga'))} | "
                 f"{f1(r.get('auto_minus_ref_dfr_points'))} | {_ok(r.get('auto_within_1pt_of_ref_dfr'))} | "
                 f"{f1(r.get('auto_gain_over_erm_points'))} | {_ok(gain_ok) if r.get('gain_target_applies') else 'n/a'} | "
                 f"{fx(r.get('fix_over_floor_wall'))} | {_ok(r.get('fix_le_1_3x_floor'))} | "
                 f"{fx(r.get('speedup_dfr_groups'))} | {f1(r.get('wga_dfr_groups_minus_ref_points'))} | "
                 f"{_ok(r.get('speedup_dfr_groups_ge_20x_at_eq_wga'))} | {fx(r.get('speedup_auto'))} | "
                 f"{f1(r.get('wga_auto_minus_ref_points'))} | {_ok(r.get('speedup_auto_ge_20x_at_eq_wga'))} |")
    L.append("")
    L.append("Best single label-free method (fixed choice, for comparison with `auto`'s own selection):\n")
    L.append("| task | method | test WGA | − ref DFR (pt) | auto[no-groups] − ref DFR (pt) |")
    L.append("|---|---|---|---|---|")
    for r in doc.get("targets", []):
        if r.get("best_label_free_method"):
            L.append(f"| {r['task']} | {r['best_label_free_method']} | {_pct(r['best_label_free_wga'])} | "
                     f"{f1(r.get('best_label_free_minus_ref_dfr_points'))} | {f1(r.get('auto_minus_ref_dfr_points'))} |")
    L.append("")
    L.append("## How it is measured\n")
    L.append("- Embeddings: `repair.api.prepare` (the adapters' head-input capture) once per task for the "
             "validation and test splits; every method and reference sees the same float32 arrays.")
    L.append("- Ours: each registered method called directly (`get_method(name)(RepairInputs(X_val, y_val, W, b, "
             "groups, seed))`) on the whole validation split. `auto`: `repair.pipeline.fix_model(recipe='auto', "
             "eval_data=test)` — the real pipeline, which compares the candidates by 2-fold out-of-fold "
             "predictions on the validation data (worst-group accuracy with groups, worst-class without) "
             "and refits the chosen one on all of it.")
    L.append("- References: see `bench/references.py` — the DFR paper's validation protocol (tune C on half, 20 "
             "group-balanced refits on the whole validation set, averaged; sklearn liblinear L1), and SpuCo's "
             "`DFR`/`DISPEL` run unchanged on the embeddings (identity backbone; two compatibility shims "
             "described there).")
    L.append("- Time: `time.perf_counter` around each fit. Memory: peak increase of the process RSS over its value "
             "at the start of the fit, sampled every 2 ms from `/proc/self/statm` after `gc.collect()` + "
             "`malloc_trim(0)` (covers torch, numpy and Python allocations; memory the allocator reuses "
             "without asking the OS is not seen, so small fits can read 0).")
    if doc.get("notes"):
        L.append("")
        for n in doc["notes"]:
            L.append(f"- {n}")
    if analysis:
        L.append("\n## Analysis\n")
        L.append(analysis.strip() + "\n")
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


def plot_wga(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, t in doc["tasks"].items() if t.get("summary")]
    if not names:
        return
    colours = {"erm": "#888888", "ours": "#1f77b4", "auto": "#2ca02c", "reference": "#d62728"}
    n_rows = max(len([k for k, r in doc["tasks"][n]["summary"].items() if "wga" in r]) for n in names)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 0.32 * n_rows + 1.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = doc["tasks"][name]["summary"]
        labels = [k for k, r in s.items() if "wga" in r]
        means = [100 * s[k]["wga"]["mean"] for k in labels]
        stds = [100 * (s[k]["wga"]["std"] or 0) for k in labels]
        cols = [colours.get(s[k].get("kind"), "#444444") if not (s[k].get("kind") == "ours" and s[k].get("group_labels"))
                else "#ff7f0e" for k in labels]
        ypos = list(range(len(labels)))[::-1]
        ax.barh(ypos, means, xerr=stds, color=cols, capsize=2)
        ax.set_yticks(ypos)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("test worst-group accuracy (%)")
        ax.set_title(name)
        if ERM in s:
            ax.axvline(100 * s[ERM]["wga"]["mean"], color="#888888", ls="--", lw=1)
        if "wga" in s.get(REF_DFR, {}):
            ax.axvline(100 * s[REF_DFR]["wga"]["mean"], color="#d62728", ls=":", lw=1)
        ax.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="#888888", label="ERM"), Patch(color="#1f77b4", label="ours, no group labels"),
                        Patch(color="#ff7f0e", label="ours, group labels"), Patch(color="#2ca02c", label="auto (repair fix)"),
                        Patch(color="#d62728", label="reference (group labels)")],
               loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ main
def _finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(args.work_dir)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    doc: dict = {"meta": {"command": "python -m bench.run " + " ".join(args.argv), "smoke": args.smoke,
                          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seeds": args.seeds,
                          "machine": machine_info(), "load_start": load_average(), "code": code_version(),
                          "checkpoints": "one per task (seed 0); seeds vary method/reference randomness",
                          "memory_method": "peak RSS increase during the fit, sampled every 2 ms from /proc/self/statm",
                          "time_method": "time.perf_counter wall clock",
                          "threads": {"extraction": args.threads, "head_fits": args.fit_threads}},
                 "tasks": {}, "notes": []}
    variants, registry_error = method_variants()
    if registry_error:
        doc["notes"].append(f"repair.methods registry could not load ({registry_error}); only ERM, auto and "
                            "the references were run.")
    spuco_on = not (args.no_spuco or args.smoke)
    for name in args.tasks:
        log(f"task {name}")
        try:
            task = build_smoke_task(work) if name == "smoke" else T.build_task(name, work_dir=work, log=log)
        except T.SkipTask as e:
            log(f"skip {name}: {e}")
            doc["tasks"][name] = {"skipped": str(e)}
            continue
        td = load_task_data(task, cache_dir)
        entry: dict = {"info": {k: v for k, v in task.info.items() if k not in ("negation_words",)},
                       "group_by": task.group_by, "paths": task.to_json(),
                       "embedding": {"dim": int(td.X_val.shape[1]), "n_val": int(td.X_val.shape[0]),
                                     "n_test": int(td.X_test.shape[0]), **td.embed_seconds},
                       "runs": []}
        if registry_error:
            entry["methods_error"] = registry_error
        for seed in args.seeds:
            log(f"  seed {seed}")
            rows = {ERM: {"kind": "erm", "group_labels": False, "test": score(td, td.W0, td.b0),
                          "fit_seconds": 0.0, "peak_rss_mib": 0.0}}
            with fit_threads(args.fit_threads):
                rows.update(run_methods(td, seed, variants))
                rows.update(run_auto(td, seed, False, cache_dir, scratch))
                rows.update(run_auto(td, seed, True, cache_dir, scratch))
                rows.update(run_references(td, seed, spuco_on))
            entry["runs"].append({"seed": seed, "methods": rows})
            for label, r in rows.items():
                if "test" in r:
                    log(f"    {label:<28} WGA {100 * r['test']['worst_group_accuracy']:5.1f}  acc "
                        f"{100 * r['test']['accuracy']:5.1f}  fit {r.get('fit_seconds') or 0:.3f}s")
        entry["summary"] = summarise(entry["runs"])
        if args.timing_repeats > 0:
            log(f"  cost: forward-pass floor and `repair fix` x{args.timing_repeats}")
            entry["costs"] = run_costs(task, args.seeds, args.timing_repeats, cache_dir, scratch,
                                       with_cli=args.fix_cli)
        else:
            entry["costs"] = {}
        entry["cost_summary"] = cost_summary(entry["costs"], entry["summary"])
        doc["tasks"][name] = entry
        _write_outputs(doc, out_dir, args, t_start, final=False)   # partial results survive a crash
    doc["targets"] = targets(doc)
    _write_outputs(doc, out_dir, args, t_start, final=True)
    return doc


def _write_outputs(doc: dict, out_dir: Path, args, t_start: float, final: bool) -> None:
    doc["meta"]["wall_minutes"] = (time.perf_counter() - t_start) / 60
    doc["meta"]["load_end"] = load_average()
    doc["meta"]["complete"] = final
    if final:
        doc["targets"] = targets(doc)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    analysis_file = Path(__file__).resolve().parent / "analysis.md"
    analysis = analysis_file.read_text(encoding="utf-8") if (final and not args.smoke and analysis_file.exists()) else None
    write_markdown(doc, out_dir / "RESULTS.md", analysis)
    try:
        plot_wga(doc, out_dir / "wga.png")
    except Exception as e:  # a plotting problem must not lose the numbers
        log(f"plot failed: {type(e).__name__}: {e}")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds-sized run on a tiny synthetic task (CI)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--timing-repeats", type=int, default=None,
                    help="repeats of the floor / `repair fix` timings per task (default 3; smoke 1)")
    ap.add_argument("--no-spuco", action="store_true", help="skip the SpuCo references")
    ap.add_argument("--fix-cli", dest="fix_cli", action="store_true", default=None,
                    help="time the `repair fix` command as a subprocess (default: on; off with --smoke)")
    ap.add_argument("--no-fix-cli", dest="fix_cli", action="store_false")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite RESULTS.md and wga.png from OUT_DIR/results.json")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for embedding extraction")
    ap.add_argument("--fit-threads", type=int, default=1,
                    help="torch/BLAS threads for head fits (default 1: sklearn's liblinear is single-threaded, "
                         "and on a loaded 2-core machine 2-thread regions on tiny problems stall)")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.smoke:
        args.seeds = args.seeds or [0]
        args.tasks = args.tasks or ["smoke"]
        args.work_dir = args.work_dir or str(T.WORK / "smoke")
        args.out_dir = args.out_dir or args.work_dir
        args.timing_repeats = 1 if args.timing_repeats is None else args.timing_repeats
        args.fix_cli = False if args.fix_cli is None else args.fix_cli
    else:
        args.seeds = args.seeds or [0, 1, 2]
        args.tasks = args.tasks or list(DEFAULT_TASKS)
        args.work_dir = args.work_dir or str(T.WORK)
        args.out_dir = args.out_dir or str(T.BENCH_DIR)
        args.timing_repeats = 3 if args.timing_repeats is None else args.timing_repeats
        args.fix_cli = True if args.fix_cli is None else args.fix_cli
    return args


def report_only(args) -> dict:
    """Rewrite RESULTS.md / wga.png from an existing results.json (e.g. after editing analysis.md)."""
    out_dir = Path(args.out_dir)
    doc = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    doc["targets"] = targets(doc)
    analysis_file = Path(__file__).resolve().parent / "analysis.md"
    analysis = analysis_file.read_text(encoding="utf-8") if (not doc["meta"]["smoke"] and analysis_file.exists()) else None
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    write_markdown(doc, out_dir / "RESULTS.md", analysis)
    plot_wga(doc, out_dir / "wga.png")
    return doc


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = report_only(args) if args.report_only else run(args)
    bad = [n for n, t in doc["tasks"].items() if "summary" in t and not _finite(t["summary"])]
    if bad:
        log(f"non-finite numbers in {bad}")
        return 1
    log(f"wrote {Path(args.out_dir) / 'results.json'}, RESULTS.md, wga.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
