"""CPU thread policy, in one place.

Small torch work (a head fit on a few thousand rows, a batched Newton step on a
1,000 x 384 matrix) runs faster on ONE thread than on several: the OpenMP barriers
cost more than the arithmetic saves, dramatically so on a loaded machine, where a
descheduled worker thread stalls every parallel region (measured 5-30x on the
benchmark's 2-core machine). Large work keeps torch's setting.

Library code never leaves the process-wide thread count changed: every change is
made through :func:`limited`, which restores it on exit (also on error).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch

#: multiply-adds per pass below which CPU work runs on one thread
SMALL_WORK = 5e7


@contextmanager
def limited(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads and restore the previous count
    afterwards; ``None`` (or the current count) changes nothing."""
    if n is None or int(n) == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def for_work(macs: float, device: Union[str, torch.device] = "cpu",
             setting: Union[str, int, None] = "auto", small: float = SMALL_WORK) -> Optional[int]:
    """The thread count a block of ``macs`` multiply-adds per pass should run with:
    ``setting="auto"``: 1 on the CPU when ``macs < small``, else None (torch's own);
    an int: that many; None: never change anything. Never changes CUDA work."""
    if setting is None or torch.device(device).type != "cpu":
        return None
    if setting == "auto":
        return 1 if macs < small else None
    return int(setting)


def for_small_work(macs: float, device: Union[str, torch.device] = "cpu",
                   setting: Union[str, int, None] = "auto", small: float = SMALL_WORK):
    """``limited(for_work(...))``: the usual way to run a block under the policy."""
    return limited(for_work(macs, device, setting, small))


#: a task's working set in multiples of its data (``macs`` float32 values), for :func:`workers_for`'s
#: memory check: measured (``bench/SCALE.md``), ``auto``'s four head candidates on 50,000 x 2,048 embeddings
#: (391 MiB) raised peak RSS by 0.9-1.3 GiB one at a time and 1.7-2.2 GiB two side by side
TASK_MEMORY_FACTOR = 3.0


def memory_bytes() -> Optional[int]:
    """The memory this process may use: the machine's physical memory, or a smaller cgroup limit (a
    container's); None when it cannot be told."""
    import os

    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        total = None
    for limit in _cgroup_limit_files():
        try:
            with open(limit) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            total = int(value) if total is None else min(total, int(value))
    return total


def _cgroup_limit_files(table: Optional[str] = None) -> list:
    """The memory-limit files of this process's cgroup and every cgroup above it (v2: ``memory.max``;
    v1: ``memory.limit_in_bytes``): a job's or a slice's limit, not only the root's. ``table``: the text of
    ``/proc/self/cgroup`` (read when None)."""
    import os

    if table is None:
        try:
            with open("/proc/self/cgroup") as f:
                table = f.read()
        except OSError:
            table = ""
    entries = [ln.split(":", 2) for ln in table.splitlines() if ln.count(":") >= 2]
    out = []
    for _, controllers, rel in entries:
        if controllers == "":
            base, name = "/sys/fs/cgroup", "memory.max"                    # v2
        elif "memory" in controllers.split(","):
            base, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"  # v1
        else:
            continue
        parts = [p for p in rel.split("/") if p]
        for k in range(len(parts), -1, -1):
            out.append(os.path.join(base, *parts[:k], name))
    return out or ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]


def workers_for(n_tasks: int, macs: float, device: Union[str, torch.device] = "cpu") -> int:
    """How many independent CPU tasks of ``macs`` multiply-adds per pass to run at once, each on one
    thread. Small work runs on one thread (:func:`for_work`), so with several threads to spare as many
    tasks as threads run side by side (``auto``'s candidates on a repair set: ~1.7x on 2 cores). Large
    work runs side by side only where that keeps every thread busy (no more threads than tasks) and
    every task's working set (:data:`TASK_MEMORY_FACTOR` x its data) fits in half the memory
    (:func:`memory_bytes`): its passes over the data are thin matrix products, which one thread each
    runs faster than all threads on one (measured on 2 cores, ``auto`` at 50,000 x 2,048: 40 s side
    by side against 53-60 s one at a time, ``bench/RESULTS.md``); otherwise one task at a time with
    every thread."""
    if torch.device(device).type != "cpu" or n_tasks < 2:
        return 1
    n = torch.get_num_threads()
    if macs < SMALL_WORK:
        return max(1, min(int(n_tasks), n))
    if n < 2 or n > int(n_tasks):
        return 1
    mem = memory_bytes()
    if mem is None or n * TASK_MEMORY_FACTOR * 4.0 * float(macs) > 0.5 * mem:
        return 1
    return n


def map_tasks(fn, items, workers: int) -> list:
    """``[fn(x) for x in items]``, ``workers`` at a time in threads (torch releases the GIL in its
    kernels), each task on one torch thread; the results in order, the first error raised. The
    tasks must be independent (own generators, no shared mutable state). :func:`map_chains`
    without follow-up tasks."""
    return map_chains(fn, [], items, workers)[0]


def map_chains(first, then: list, items, workers: int) -> tuple[list, list]:
    """For every item ``x``: ``a = first(x)``, then ``[t(x, a) for t in then]``, ``workers`` at a
    time in threads, each task on one torch thread. An item's ``then`` tasks start as soon as its
    ``first`` is done, side by side with the other items' tasks (no barrier between the stages: one
    slow ``first`` does not hold the others' ``then`` back). Returns ``(firsts, thens)`` in order,
    ``thens[i][j] = then[j](items[i], firsts[i])``; the first error is raised. Tasks must be
    independent, as in :func:`map_tasks`."""
    items = list(items)
    firsts: list = [None] * len(items)
    thens: list = [[None] * len(then) for _ in items]
    if workers <= 1 or len(items) * (1 + len(then)) < 2:
        for i, x in enumerate(items):
            firsts[i] = first(x)
            thens[i] = [t(x, firsts[i]) for t in then]
        return firsts, thens
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with limited(1):
        pool = ThreadPoolExecutor(max_workers=int(workers))
        try:
            pending = {pool.submit(first, x): (i, None) for i, x in enumerate(items)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i, j = pending.pop(fut)
                    if j is None:
                        firsts[i] = fut.result()
                        for k, t in enumerate(then):
                            pending[pool.submit(t, items[i], firsts[i])] = (i, k)
                    else:
                        thens[i][j] = fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return firsts, thens


__all__ = ["limited", "for_work", "for_small_work", "workers_for", "map_tasks", "map_chains", "SMALL_WORK",
           "memory_bytes"]
