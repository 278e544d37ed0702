"""Solver scale benchmark: synthetic embeddings with a planted shortcut, 50,000 x 2,048.

Built here (seeded, nothing read from disk): ReLU-like features; each class has one core
direction (weak, noisy) and each attribute value one spurious direction (strong, clean); the
attribute agrees with the class for 90% of the repair rows (a skewed repair set), and the
test rows are group-balanced. The "original" head is a logistic regression fitted on rows
where the attribute agrees 97% of the time, so it leans on the shortcut.

Rows (each timed with peak RSS increase, and scored on the test rows):

* ``dfr[groups]``: our ``dfr`` (default fast protocol) with the group labels;
* ``ref:dfr-protocol``: the DFR paper's protocol (sklearn liblinear L1, 7 strengths tuned on
  half, 20 group-balanced refits averaged), :func:`bench.references.dfr_reference`;
* ``ref:spuco-DFR``: SpuCo's DFR on the same arrays (binary only under scikit-learn >= 1.8).

Targets: ``dfr`` >= 20x faster than the DFR protocol at equal (or better) worst-group accuracy,
and its peak memory <= 2x the embeddings' size.
"""
from __future__ import annotations

from typing import Optional

from .measure import log, measured

N, D = 50_000, 2_048
ALIGN_REPAIR, ALIGN_TRAIN = 0.9, 0.97
TARGET_SPEEDUP, TARGET_MEMORY = 20.0, 2.0


def make_problem(num_classes: int, n: int = N, d: int = D, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    C = num_classes
    core = torch.randn(C, d, generator=g) / d ** 0.5 * 3.0
    spur = torch.randn(C, d, generator=g) / d ** 0.5 * 6.0

    def sample(m: int, align: Optional[float]):
        y = torch.randint(0, C, (m,), generator=g)
        if align is None:     # balanced groups
            a = torch.randint(0, C, (m,), generator=g)
        else:
            other = (y + torch.randint(1, C, (m,), generator=g)) % C if C > 1 else y
            a = torch.where(torch.rand(m, generator=g) < align, y, other)
        X = torch.randn(m, d, generator=g) * 0.5 + core[y] * (1 + 0.5 * torch.randn(m, 1, generator=g)) + spur[a]
        return torch.relu(X).float(), y, y * C + a

    from repair import solver as S

    Xtr, ytr, _ = sample(20_000 if n >= 20_000 else n, ALIGN_TRAIN)
    W, b, _ = S.fit_logreg(Xtr[:, :], ytr, C, l2=1.0, max_iter=200)
    X, y, grp = sample(n, ALIGN_REPAIR)
    Xt, yt, gt = sample(max(4000, 400 * C * C), None)
    return {"X": X, "y": y, "g": grp, "W0": W[0], "b0": b[0], "test": (Xt, yt, gt), "C": C}


def _wga(p, W, b) -> float:
    import torch

    from repair.selection import worst_group_accuracy

    Xt, yt, gt = p["test"]
    return float(worst_group_accuracy(Xt @ torch.as_tensor(W).float().T + torch.as_tensor(b).float(), yt, gt))


def run_scale(num_classes_list=(2, 10), n: int = N, d: int = D, seed: int = 0, spuco: bool = True) -> dict:
    from repair.methods import RepairInputs, get_method

    from . import references as R

    out = {"n": n, "d": d, "align_repair": ALIGN_REPAIR, "seed": seed, "problems": {}}
    for C in num_classes_list:
        log(f"scale: building {n} x {d}, {C} classes")
        p = make_problem(C, n, d, seed)
        emb_mib = p["X"].numel() * 4 / 2**20
        rows: dict = {}
        dfr = get_method("dfr")
        res, secs, mem = measured(lambda: dfr(RepairInputs(X=p["X"], y=p["y"], W=p["W0"], b=p["b0"],
                                                             groups=p["g"], seed=seed)))
        rows["dfr[groups]"] = {"seconds": secs, "peak_rss_mib": mem, "wga": _wga(p, res.W, res.b),
                               "chosen": res.diagnostics.get("chosen")}
        log(f"  dfr[groups]: {secs:.1f}s, {mem:.0f} MiB, WGA {rows['dfr[groups]']['wga']:.3f}")
        Xn, yn, gn = p["X"].numpy(), p["y"].numpy(), p["g"].numpy()
        res, secs, mem = measured(lambda: R.dfr_reference(Xn, yn, gn, num_classes=C, seed=seed))
        rows["ref:dfr-protocol"] = {"seconds": secs, "peak_rss_mib": mem, "wga": _wga(p, res.W, res.b),
                                    "chosen": {"C": res.info.get("best_C")}}
        log(f"  ref:dfr-protocol: {secs:.1f}s, {mem:.0f} MiB, WGA {rows['ref:dfr-protocol']['wga']:.3f}")
        why = R.spuco_available() if spuco else "skipped"
        if why is None and C == 2:
            res, secs, mem = measured(lambda: R.spuco_reference("DFR", Xn, yn, gn, num_classes=C, seed=seed))
            rows["ref:spuco-DFR"] = {"seconds": secs, "peak_rss_mib": mem, "wga": _wga(p, res.W, res.b)}
            log(f"  ref:spuco-DFR: {secs:.1f}s, {mem:.0f} MiB")
        else:
            rows["ref:spuco-DFR"] = {"skipped": why or "SpuCo's DFR is binary-only under scikit-learn >= 1.8"}
        ours, ref = rows["dfr[groups]"], rows["ref:dfr-protocol"]
        speed = ref["seconds"] / ours["seconds"]
        out["problems"][str(C)] = {
            "embeddings_mib": emb_mib, "rows": rows, "speedup": speed,
            "wga_minus_ref_points": 100 * (ours["wga"] - ref["wga"]),
            "memory_ratio": (ours["peak_rss_mib"] or 0) / emb_mib,
            "speedup_met": speed >= TARGET_SPEEDUP and ours["wga"] >= ref["wga"] - 0.005,
            "memory_met": (ours["peak_rss_mib"] or 0) <= TARGET_MEMORY * emb_mib}
    return out


__all__ = ["run_scale", "make_problem"]
