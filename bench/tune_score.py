"""How the bagged DFR protocol's held-out score picks its strength: worst-group accuracy against the worst
group's mean probability of the true class (``tune_score``; the analysis behind its default,
``bench/analysis.md``, fourteenth session).

For each task, repair set and group setting it runs ``dfr`` (where the repair set makes it bag: skewed
sets) and ``mix`` (always bagged) on every repair row, once per score and seed, through the registered
method as ``repair`` runs it, and prints the test worst-group accuracy per seed, mean +- std, and the
mean of the paired differences (probability - accuracy, same seed: same split and subsamples).

    python -m bench.tune_score [--tasks sst2_capped ...] [--variants balanced skewed] [--seeds 0 1 ... 9]
                               [--work-dir bench/_work]

It scores on the held-out half of the repair set (``--split dev``, the default: fitted on the other half;
``bench.rows.development_data``); ``--split test`` reads the report's test split, to describe a figure of the
report, never to choose a setting.
"""
from __future__ import annotations

import argparse
import statistics

SCORES = ("accuracy", "probability")


def main(argv=None) -> None:
    from repair.methods import RepairInputs, get_method

    from . import rows as R
    from . import tasks as T

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2_capped", "sst2_negation", "mnist_color", "demo"])
    ap.add_argument("--variants", nargs="+", default=list(T.VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--work-dir", default="bench/_work")
    ap.add_argument("--split", choices=R.ANALYSIS_SPLITS, default="dev")
    a = ap.parse_args(argv)
    for name, variant, td in R.analysis_sets(a.tasks, a.variants, a.work_dir, a.split):
        for with_groups in (False, True):
            for method in ("dfr", "mix"):
                info = get_method(method)
                got: dict = {s: [] for s in SCORES}
                protocol = None
                for seed in a.seeds:
                    inputs = RepairInputs(X=td.X_val, y=td.y_val, W=td.W0, b=td.b0,
                                          groups=td.g_val if with_groups else None, seed=seed, device="cpu")
                    for score in SCORES:
                        out = info(inputs, info.make_config({"tune_score": score}))
                        protocol = out.diagnostics.get("protocol")
                        got[score].append(100 * R.score(td, out.W, out.b)["worst_group_accuracy"])
                label = f"{name} {variant} {method}[{'groups' if with_groups else 'no-groups'}]"
                if protocol != "bagged":
                    print(f"{label}: protocol {protocol}, strength not chosen by the held-out score", flush=True)
                    continue
                diff = [p - q for p, q in zip(got["probability"], got["accuracy"])]
                cells = "  ".join(f"{s} {statistics.mean(v):.1f} +- {statistics.stdev(v):.1f} "
                                  f"(min {min(v):.1f})" for s, v in got.items())
                print(f"{label} ({a.split}): {cells}  paired diff {statistics.mean(diff):+.1f}  per seed "
                      f"acc {[round(v, 1) for v in got['accuracy']]} prob {[round(v, 1) for v in got['probability']]}",
                      flush=True)


if __name__ == "__main__":
    main()
