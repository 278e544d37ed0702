"""Measurement helpers shared by the benchmark parts: wall time, peak RSS, the machine, the code."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional


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
    # what survived is long-lived (the imported modules, the loaded task): frozen, so the next trim's
    # collection scans only what was allocated since (a full collection of a process that has imported
    # torch, timm and transformers scans ~400k objects: 0.15-0.4 s, once per measured row)
    gc.freeze()
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


def release_frozen() -> None:
    """Hand the objects :func:`_trim` froze back to the collector (a run's end, for a caller that
    goes on: the test suite runs the benchmark in its own process)."""
    gc.unfreeze()


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
        out["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "repair", "cli"],
                                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:
        pass
    h = hashlib.sha256()
    for sub in ("repair", "cli"):
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


def _jsonable(obj: Any, limit: int = 4000) -> Any:
    try:
        s = json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    except Exception:
        return str(obj)[:limit]
    if len(s) > limit:
        return {"truncated": s[:limit]}
    return json.loads(s)
