"""Solver scale benchmark: synthetic embeddings with a planted shortcut, 50,000 x 2,048, with 2,
10 and 1,000 classes.

Built here (seeded, nothing read from disk): ReLU-like features; each class has one core
direction (weak, noisy) and each attribute value one spurious direction (strong, clean); the
attribute agrees with the class for 90% of the repair rows (a skewed repair set).

* 2 and 10 classes: the attribute takes as many values as there are classes, the groups are
  class x attribute, the test rows are group-balanced and scored by worst-group accuracy; the
  "original" head is a logistic regression fitted on rows where the attribute agrees 97% of the
  time (it leans on the shortcut).
* 1,000 classes (an ImageNet-sized head, 50 repair rows per class): every class has its own
  spurious direction (attribute value = the class's own in 90% of the rows, another one
  otherwise); the groups given are class x (attribute typical for the class or not) -- class x
  attribute would leave a million mostly empty groups. Test: 20 rows per class with a random
  attribute and 10 with the class's own; "test WGA" is the worse of the two pooled accuracies
  (shortcut-conflicting rows, shortcut-aligned rows). The core directions are twice as strong
  and the noise half as strong as with few classes (50 rows per class). The original head is the class-mean
  (nearest-centroid) head of the shortcut-aligned training rows (``dfr`` with group labels
  does not use it).

Rows, each measured in its own subprocess (time and peak RSS increase of the fit alone, the
problem loaded before measuring), scored on the test rows:

* ``dfr[groups]``: our ``dfr`` (defaults) with the group labels;
* 2, 10 classes: ``ref:dfr-protocol``: the DFR paper's protocol (sklearn liblinear L1, 7 strengths
  tuned on half, 20 group-balanced refits averaged), :func:`bench.references.dfr_reference`;
  ``ref:spuco-DFR``: SpuCo's DFR on the same arrays (binary only under scikit-learn >= 1.8);
* 1,000 classes: ``ref:sklearn-lbfgs``: scikit-learn's lbfgs multinomial logistic regression at
  the penalty and strength ``dfr`` chose, on the rows ``dfr`` fitted (after its group cap) with the
  same group-balanced weights, at scikit-learn's default ``tol``; ``ref:sklearn-lbfgs-converged``:
  the same run to convergence (``tol`` 1e-8), the reference of the accuracy target (see
  :data:`REF_MANY`); each row's ``objective`` (:func:`objective`) shows which solved the problem
  better (the DFR protocol's 27 liblinear fits of 1,000 one-vs-rest problems are not feasible on
  2 cores);
* 2, 10 classes: ``auto[groups]``, ``auto[no-groups]``: recipe ``auto``'s whole selection and fit
  (:func:`repair.choosing.choose_heads`: every candidate, its fold refits, the average of the best two),
  with the group labels and label-free.

Targets: ``dfr`` >= 20x faster than the DFR protocol at equal worst-group accuracy (+-1 point)
for 2 and 10 classes; peak RSS increase <= 2x the embeddings for 2, 10 and 1,000 classes;
1,000 classes in <= 5 min and no less accurate than the reference (test WGA and accuracy);
``auto``'s whole selection no slower than the DFR protocol (2 and 10 classes).

``python -m bench.scale [--classes 2 10 1000] [--n N] [--d D] [--out FILE.json]`` runs it alone
and prints the table; ``python -m bench.scale --crossover`` times Newton against L-BFGS on small
and mid-sized problems (the calibration of :func:`repair.solver.path_solver`); ``python -m bench.run --parts scale`` runs it inside the benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .measure import log, measured

N, D = 50_000, 2_048
CLASSES = (2, 10, 1000)
ALIGN_REPAIR, ALIGN_TRAIN = 0.9, 0.97
TARGET_SPEEDUP, TARGET_MEMORY, TARGET_MANY_SECONDS = 20.0, 2.0, 300.0
#: more classes than this: the many-class problem (groups class x typical attribute)
MANY = 10
#: ``auto``'s whole selection (recipe ``auto``: four head repairs, 2-fold cross-validation repeated twice,
#: the best two averaged), with and without the group labels: 2 and 10 classes, against the DFR protocol's
#: time (the issue's "``auto``'s whole selection <= the DFR protocol's time", at the size where time matters)
AUTO_ROWS = ("auto[groups]", "auto[no-groups]")
#: the many-class references: scikit-learn's lbfgs multinomial at its default ``tol`` (1e-4; it stops
#: early) and run to convergence (``tol`` 1e-8, 3,000 iterations): the solution of the problem both
#: fits solve, the one the accuracy target compares with (an early stop's last rows are luck: measured,
#: at the default tol it stopped with an objective 1e-7 relatively above ``dfr``'s and 2 more test rows
#: right in the worst group; converged, both heads score the same)
REF_MANY = {"ref:sklearn-lbfgs": None, "ref:sklearn-lbfgs-converged": 1e-8}
#: the reference the many-class accuracy target compares with
REF_MANY_TARGET = "ref:sklearn-lbfgs-converged"
#: seconds a reference row may run before it is stopped (reported as such)
REF_TIMEOUT = 3600


def accuracy_met(ours: dict, ref: dict) -> bool:
    """The many-class target's "no less accurate than the reference", as the issue says it: test
    worst-group accuracy and accuracy each at least the reference's (no tolerance)."""
    return ours["wga"] >= ref["wga"] and ours["acc"] >= ref["acc"]


def many_class_reference(rows: dict):
    """(label, row) of the reference the many-class accuracy target compares with:
    :data:`REF_MANY_TARGET`, or (a results file from before it was run) ``ref:sklearn-lbfgs``."""
    for lab in (REF_MANY_TARGET, "ref:sklearn-lbfgs"):
        r = rows.get(lab) or {}
        if "wga" in r:
            return lab, r
    return REF_MANY_TARGET, {}


def make_problem(num_classes: int, n: int = N, d: int = D, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    C = num_classes
    core = torch.randn(C, d, generator=g) / d ** 0.5 * 3.0
    spur = torch.randn(C, d, generator=g) / d ** 0.5 * 6.0

    # many classes, 50 rows each: a clearer core signal (else no head learns 1,000 classes from them)
    noise = 0.5 if C <= MANY else 0.25
    if C > MANY:
        core = core * 2.0

    def sample(m: int, align: Optional[float]):
        y = torch.randint(0, C, (m,), generator=g)
        if align is None:     # balanced groups
            a = torch.randint(0, C, (m,), generator=g)
        else:
            other = (y + torch.randint(1, C, (m,), generator=g)) % C if C > 1 else y
            a = torch.where(torch.rand(m, generator=g) < align, y, other)
        X = torch.randn(m, d, generator=g) * noise + core[y] * (1 + 0.5 * torch.randn(m, 1, generator=g)) + spur[a]
        return torch.relu(X).float(), y, a

    from repair import solver as S

    if C <= MANY:
        Xtr, ytr, _ = sample(20_000 if n >= 20_000 else n, ALIGN_TRAIN)
        W, b, _ = S.fit_logreg(Xtr, ytr, C, l2=1.0, max_iter=200)
        W0, b0 = W[0], b[0]
        X, y, a = sample(n, ALIGN_REPAIR)
        Xt, yt, at = sample(max(4000, 400 * C * C), None)
        return {"X": X, "y": y, "g": y * C + a, "W0": W0, "b0": b0, "test": (Xt, yt, yt * C + at), "C": C}
    Xtr, ytr, _ = sample(min(n, 20 * C), 1.0)
    mu = torch.zeros(C, d).index_add_(0, ytr, Xtr) / torch.bincount(ytr, minlength=C).clamp_min(1).unsqueeze(1)
    W0, b0 = mu, -0.5 * (mu * mu).sum(1)
    X, y, a = sample(n, ALIGN_REPAIR)
    Xc, yc, ac = sample(20 * C, None)
    Xa, ya, _ = sample(10 * C, 1.0)
    Xt, yt = torch.cat([Xc, Xa]), torch.cat([yc, ya])
    gt = torch.cat([(ac == yc).long(), torch.ones(10 * C, dtype=torch.long)])    # 0 conflicting, 1 aligned
    return {"X": X, "y": y, "g": y * 2 + (a == y).long(), "W0": W0, "b0": b0, "test": (Xt, yt, gt), "C": C}


def _scores(p, W, b) -> dict:
    import torch

    from repair.selection import worst_group_accuracy

    Xt, yt, gt = p["test"]
    lg = Xt @ torch.as_tensor(W).float().T + torch.as_tensor(b).float()
    return {"wga": float(worst_group_accuracy(lg, yt, gt)), "acc": float((lg.argmax(1) == yt).float().mean())}


def _reference_rows(p, seed: int):
    """The rows ``dfr`` fits on the many-class problem (its group cap, same seed) and its
    group-balanced weights: what the references fit and :func:`objective` sums over."""
    import numpy as np
    import torch

    from repair import solver as S
    from repair.methods.dfr import DFRConfig, _capped_rows

    keep = _capped_rows(p["g"], DFRConfig(), torch.Generator().manual_seed(int(seed)))
    keep = np.arange(len(p["y"])) if keep is None else keep.numpy()
    w = S.expected_balanced_weights(p["g"][torch.as_tensor(keep)]).numpy().astype(np.float64)
    return keep, w


def objective(p, W, b, C_pen: float, seed: int, chunk: int = 4096) -> float:
    """The many-class problem's objective at the head ``W``, ``b`` (float64): scikit-learn's
    multinomial objective at strength ``C_pen`` on the standardised features, ``sum_i w_i CE_i +
    ||W_std||^2 / (2 C)`` over :func:`_reference_rows` (``W_std = W * std``, the intercept not
    penalised). The logits are the same in raw and standardised coordinates, so only the penalty
    needs the statistics (over all rows, population std, a constant feature's scale 1 as
    ``StandardScaler``). Lower is a better solution of the problem both fits solve."""
    import torch

    keep, w = _reference_rows(p, seed)
    X = p["X"]
    Wd = torch.as_tensor(W).double()
    bd = torch.as_tensor(b).double()
    sd = X.double().std(0, unbiased=False)
    sd = torch.where(sd == 0, torch.ones_like(sd), sd)
    idx = torch.as_tensor(keep)
    wt = torch.as_tensor(w)
    total = 0.0
    for s in range(0, idx.numel(), chunk):
        rows = idx[s:s + chunk]
        lg = X[rows].double() @ Wd.T + bd
        ce = torch.nn.functional.cross_entropy(lg, p["y"][rows], reduction="none")
        total += float((wt[s:s + chunk] * ce).sum())
    return total + float(((Wd * sd) ** 2).sum()) / (2.0 * float(C_pen))


# ------------------------------------------------------------------------------ one row (child)
def _row(name: str, p: dict, seed: int, C_ref: Optional[float]) -> dict:
    """Fit one row on the loaded problem; time and peak RSS of the fit alone."""
    import numpy as np

    from repair.methods import RepairInputs, get_method

    from . import references as R

    C = p["C"]
    if name == "dfr[groups]":
        dfr = get_method("dfr")
        res, secs, mem = measured(lambda: dfr(RepairInputs(X=p["X"], y=p["y"], W=p["W0"], b=p["b0"],
                                                             groups=p["g"], seed=seed)))
        d = res.diagnostics
        extra = {"chosen": d.get("chosen"), "protocol": d.get("protocol"), "solver": d.get("solver"),
                 "solver_rule": d.get("solver_rule"), "solver_iters": d.get("solver_iters"),
                 "solver_converged": d.get("solver_converged", d.get("final_solver_converged")),
                 "rows_fitted": d.get("rows_fitted"), "protocol_rule": d.get("protocol_rule")}
        if C > MANY and (extra["chosen"] or {}).get("C") is not None:   # the problem the references solve
            extra["objective"] = objective(p, res.W, res.b, extra["chosen"]["C"], seed)
        return {"seconds": secs, "peak_rss_mib": mem, **_scores(p, res.W, res.b), **extra}
    if name in AUTO_ROWS:
        from repair.choosing import choose_heads

        groups = p["g"] if name == "auto[groups]" else None
        ch, secs, mem = measured(lambda: choose_heads("auto", p["X"], p["y"], p["W0"], p["b0"], groups, seed=seed))
        return {"seconds": secs, "peak_rss_mib": mem, **_scores(p, ch.final.W, ch.final.b),
                "chosen": {"candidate": ch.chosen.label}, "criterion": (ch.selection or {}).get("criterion"),
                "candidates": [{k: c.get(k) for k in ("candidate", "score", "score_se", "fit_seconds")}
                               for c in ch.rows]}
    Xn, yn, gn = p["X"].numpy(), p["y"].numpy(), p["g"].numpy()
    if name == "ref:dfr-protocol":
        res, secs, mem = measured(lambda: R.dfr_reference(Xn, yn, gn, num_classes=C, seed=seed))
        return {"seconds": secs, "peak_rss_mib": mem, **_scores(p, res.W, res.b), "chosen": {"C": res.info.get("best_C")}}
    if name == "ref:spuco-DFR":
        res, secs, mem = measured(lambda: R.spuco_reference("DFR", Xn, yn, gn, num_classes=C, seed=seed))
        return {"seconds": secs, "peak_rss_mib": mem, **_scores(p, res.W, res.b)}
    if name in REF_MANY:
        keep, w = _reference_rows(p, seed)
        tol = REF_MANY[name]

        def fit():
            from sklearn.linear_model import LogisticRegression
            from sklearn.preprocessing import StandardScaler

            sc = StandardScaler().fit(Xn)            # statistics over all rows, as dfr
            Xs = sc.transform(Xn[keep])
            m = LogisticRegression(C=float(C_ref), solver="lbfgs", max_iter=3000 if tol else 300,
                                   **({"tol": tol} if tol else {})).fit(Xs, yn[keep], sample_weight=w)
            Wr = m.coef_ / sc.scale_
            br = m.intercept_ - Wr @ sc.mean_
            return Wr, br, int(np.max(m.n_iter_))

        (Wr, br, it), secs, mem = measured(fit)
        return {"seconds": secs, "peak_rss_mib": mem, **_scores(p, Wr, br), "chosen": {"C": C_ref}, "n_iter": it,
                "tol": tol or 1e-4, "objective": objective(p, Wr, br, C_ref, seed)}
    raise ValueError(f"unknown row {name!r}")


def _child(argv) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", required=True)
    ap.add_argument("--problem", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--C-ref", type=float, default=None)
    a = ap.parse_args(argv)
    import torch

    p = torch.load(a.problem, weights_only=False)
    r = _row(a.row, p, a.seed, a.C_ref)
    Path(a.out).write_text(json.dumps(r))


def _run_child(row: str, problem: Path, seed: int, C_ref: Optional[float] = None, timeout: float = REF_TIMEOUT) -> dict:
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "row.json"
        cmd = [sys.executable, "-m", "bench.scale", "--child", "--row", row, "--problem", str(problem),
               "--out", str(out), "--seed", str(seed)] + (["--C-ref", repr(C_ref)] if C_ref is not None else [])
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), root) if p])
        t0 = time.perf_counter()
        try:
            cp = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"skipped": f"stopped after {timeout:.0f} s"}
        if cp.returncode != 0 or not out.exists():
            tail = (cp.stderr or "").strip().splitlines()[-1:] or ["?"]
            return {"skipped": f"failed (exit {cp.returncode}): {tail[0][:200]}"}
        r = json.loads(out.read_text())
        r["wall_with_load_s"] = time.perf_counter() - t0
        return r


# ------------------------------------------------------------------------------ the benchmark
def run_scale(num_classes_list=None, n: int = N, d: int = D, seed: int = 0, spuco: bool = True,
              work_dir: Optional[str] = None, auto: bool = True) -> dict:
    """Every configuration in its own subprocess; the problems are built once and cached under
    ``work_dir`` (a temporary folder by default). ``num_classes_list`` None: 2, 10 and (from
    20,000 rows: 20 rows per class at least) 1,000 classes. ``auto``: also the :data:`AUTO_ROWS`
    (2 and 10 classes)."""
    import torch

    from . import references as R

    if num_classes_list is None:
        num_classes_list = CLASSES if n >= 20_000 else tuple(c for c in CLASSES if c <= MANY)
    out = {"n": n, "d": d, "align_repair": ALIGN_REPAIR, "seed": seed, "problems": {}}
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory()
        work_dir = tmp.name
    try:
        for C in num_classes_list:
            path = Path(work_dir) / f"scale-v2-c{C}-n{n}-d{d}-s{seed}.pt"
            if not path.exists():
                log(f"scale: building {n} x {d}, {C} classes")
                p = make_problem(C, n, d, seed)
                torch.save(p, path)
                del p
            emb_mib = n * d * 4 / 2 ** 20
            rows: dict = {}
            rows["dfr[groups]"] = ours = _run_child("dfr[groups]", path, seed)
            log(f"  {C} classes dfr[groups]: {ours}")
            if C <= MANY:
                rows["ref:dfr-protocol"] = ref = _run_child("ref:dfr-protocol", path, seed)
                why = R.spuco_available() if spuco else "not run (--no-spuco)"
                if why is None and C == 2:
                    rows["ref:spuco-DFR"] = _run_child("ref:spuco-DFR", path, seed)
                else:
                    rows["ref:spuco-DFR"] = {"skipped": why or "SpuCo's DFR is binary-only under scikit-learn >= 1.8"}
            else:
                c_ref = (ours.get("chosen") or {}).get("C")
                for lab in REF_MANY:
                    rows[lab] = (_run_child(lab, path, seed, C_ref=c_ref) if c_ref is not None
                                 else {"skipped": "dfr failed"})
                ref = rows[REF_MANY_TARGET]
                rows["ref:dfr-protocol"] = {"skipped": f"27 liblinear fits of {C:,} one-vs-rest problems: not "
                                                       "feasible on 2 cores"}
            log(f"  {C} classes reference: {ref}")
            prob = {"embeddings_mib": emb_mib, "rows": rows}
            if C <= MANY and auto:
                for lab in AUTO_ROWS:
                    rows[lab] = a = _run_child(lab, path, seed)
                    log(f"  {C} classes {lab}: {a}")
                    if "skipped" not in a and "skipped" not in ref:
                        prob.setdefault("auto_over_protocol", {})[lab] = a["seconds"] / ref["seconds"]
                        prob.setdefault("auto_not_slower_met", {})[lab] = a["seconds"] <= ref["seconds"]
            if "skipped" not in ours:
                prob["memory_ratio"] = (ours["peak_rss_mib"] or 0) / emb_mib
                prob["memory_met"] = prob["memory_ratio"] <= TARGET_MEMORY
            if "skipped" not in ours and "skipped" not in ref:
                prob["speedup"] = ref["seconds"] / ours["seconds"]
                prob["wga_minus_ref_points"] = 100 * (ours["wga"] - ref["wga"])
                prob["acc_minus_ref_points"] = 100 * (ours["acc"] - ref["acc"])
                if C <= MANY:
                    prob["speedup_met"] = prob["speedup"] >= TARGET_SPEEDUP and ours["wga"] >= ref["wga"] - 0.01
                else:
                    prob["seconds_met"] = ours["seconds"] <= TARGET_MANY_SECONDS
                    prob["accuracy_met"] = accuracy_met(ours, ref)
                    prob["speedup_met"] = prob["seconds_met"] and prob["accuracy_met"]
            elif "skipped" not in ours and C > MANY:
                prob["seconds_met"] = ours["seconds"] <= TARGET_MANY_SECONDS
            out["problems"][str(C)] = prob
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


CROSSOVER_SIZES = ((2, 300, 128), (2, 500, 64), (2, 2000, 32), (2, 500, 384), (2, 1000, 1280),
                   (20, 400, 384), (20, 800, 512), (2, 4000, 1024))


def crossover(sizes=CROSSOVER_SIZES, seed: int = 0) -> list:
    """Newton (:func:`repair.solver.fit_binary_l2_path`) against L-BFGS
    (:func:`repair.solver.fit_binary_l2_path_lbfgs`) on ``K`` binary L2 problems of ``n`` rows x
    ``d`` features (one strength, tol 1e-3 as dfr's fast protocol), one thread, side by side;
    with the rule's choice (:func:`repair.solver.path_solver`). Calibrates the rule."""
    import torch

    from repair import solver as S
    from repair import threads

    g = torch.Generator().manual_seed(seed)
    out = []
    with threads.limited(1):
        for K, n, d in sizes:
            core = torch.randn(d, generator=g) / d ** 0.5 * 3
            y = torch.rand(K * n, generator=g) < 0.5
            X = torch.relu(torch.randn(K * n, d, generator=g) * 0.5 + torch.where(y.view(-1, 1), core, -core)
                           + torch.randn(K * n, 1, generator=g)).float()
            a, c = S.standardization(X)
            Z = X * a + c
            w = torch.ones(K * n)
            t0 = time.perf_counter()
            _, _, info = S.fit_binary_l2_path(Z.view(K, n, d), y.view(K, n).double(), w.view(K, n).double(), [1.0],
                                              tol=1e-3, num_threads=None)
            tn = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, _, info2 = S.fit_binary_l2_path_lbfgs(X, [(k * n, (k + 1) * n) for k in range(K)], y.float(), w, [1.0],
                                                     scale=a, shift=c, tol=1e-3)
            tl = time.perf_counter() - t0
            rule = S.path_solver(n, d, K, X.numel() * 4)[0]
            faster = "newton" if tn < tl else "lbfgs"
            out.append({"K": K, "n": n, "d": d, "newton_s": tn, "newton_form": info["form"], "lbfgs_s": tl,
                        "lbfgs_iters": info2["n_iter"][0], "faster": faster, "rule": rule})
            log(f"crossover K={K} n={n} d={d}: newton ({info['form']}) {tn:.3f}s, lbfgs {tl:.3f}s -> rule {rule}")
    return out


def table(sc: dict) -> str:
    """The results as a markdown table (the report's: :func:`bench.report.scale_table`)."""
    from .report import scale_table

    return "\n".join(scale_table(sc))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    if argv and argv[0] == "--crossover":
        print("| K | n | d | Newton (s) | form | L-BFGS (s) | iterations | faster | rule |\n|---|---|---|---|---|---|---|---|---|")
        for r in crossover():
            print(f"| {r['K']} | {r['n']} | {r['d']} | {r['newton_s']:.3f} | {r['newton_form']} | {r['lbfgs_s']:.3f} | "
                  f"{r['lbfgs_iters']} | {r['faster']} | {r['rule']} |")
        return None
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=list(CLASSES))
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--d", type=int, default=D)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-spuco", action="store_true")
    ap.add_argument("--no-auto", action="store_true", help="leave out the auto rows")
    ap.add_argument("--work-dir", default=None, help="cache of the built problems")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    sc = run_scale(a.classes, a.n, a.d, a.seed, spuco=not a.no_spuco, work_dir=a.work_dir, auto=not a.no_auto)
    if a.out:
        Path(a.out).write_text(json.dumps(sc, indent=1))
    print(table(sc))


if __name__ == "__main__":
    main()


__all__ = ["run_scale", "make_problem", "table"]
