"""How steady the strength of a head refitted on the *original* body is, chosen one way or another
(the analysis behind ``refit_head(..., unseen=True)``, ``bench/analysis.md``, tenth session).

For each task and repair set (label-free: groups = class x correct/incorrect under the original model,
the criterion settling uses) it prints the test worst-group accuracy of the group-balanced head at every
strength of :data:`repair.modelrepair.finetune.REFIT_L2` fitted on every repair row, then, per seed, the
test figure of the strength each scheme chooses: one held-out quarter (the session's split, as settling
chose before) and K-fold cross-validation over every row repeated R times.

    python -m bench.refit_strength [--tasks demo mnist_color] [--seeds 0 1 2 3 4] [--work-dir bench/_work]

It scores on the held-out half of the repair set (``--split dev``, the default: fitted on the other half;
``bench.rows.development_data``); ``--split test`` reads the report's test split, to describe a figure of the
report, never to choose a setting (the tenth session's analysis read it).
"""
from __future__ import annotations

import argparse

SCHEMES = ((2, 4), (2, 8), (5, 1), (5, 2), (3, 3))


def main(argv=None) -> None:
    import torch

    from repair.modelrepair.finetune import REFIT_L2
    from repair.selection import (SHRINK_SAMPLES, Criterion, KFold, head_predictions, inferred_groups, pick_best,
                                  select_and_refit, shrunk_scores, stratified_split)
    from repair.solver import fit_logreg, group_balanced_weights

    from . import rows as R
    from . import tasks as T

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["demo", "mnist_color"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--work-dir", default="bench/_work")
    ap.add_argument("--split", choices=R.ANALYSIS_SPLITS, default="dev",
                    help="dev: the held-out half of the repair set; test: the report's test split (never to choose)")
    a = ap.parse_args(argv)
    for name, variant, td in R.analysis_sets(a.tasks, T.VARIANTS, a.work_dir, a.split):
        X, y = td.X_val.float(), td.y_val.long()
        ref = X @ td.W0.T.float() + td.b0.float()
        g = inferred_groups(ref, y)
        crit = Criterion.resolve("auto", has_groups=False, y=y, ref_logits=ref)
        strata = crit.strata(y, ref, None)

        def fit(rows, l2s):
            W, b, _ = fit_logreg(X[rows], y[rows], ref.shape[1], sample_weight=group_balanced_weights(g[rows]),
                                 l2=tuple(l2s))
            return W, b

        W, b = fit(torch.arange(len(y)), REFIT_L2)
        test = [100 * R.score(td, W[k], b[k])["worst_group_accuracy"] for k in range(len(REFIT_L2))]
        print(f"{name} {variant} ({crit.name}): {a.split} WGA per L2 "
              + ", ".join(f"{l2:g}: {t:.1f}" for l2, t in zip(REFIT_L2, test)))
        for seed in a.seeds:
            tr, ho = stratified_split(g, [0.25], torch.Generator().manual_seed(seed))
            Wt, bt = fit(tr, REFIT_L2)
            w, m = shrunk_scores(head_predictions(X[ho], Wt, bt), y[ho], strata[ho], SHRINK_SAMPLES)
            line = [f"one quarter {test[pick_best(w, m)]:.1f}"]
            for folds, repeats in SCHEMES:
                sel = select_and_refit(len(REFIT_L2), lambda rows, which: fit(rows, [REFIT_L2[i] for i in which]),
                                       lambda f, rows: head_predictions(X[rows], f[0], f[1]), y, criterion=crit,
                                       score_strata=strata, split_strata=g, scheme=KFold(folds, repeats),
                                       seed=seed + 1, refit=False)
                line.append(f"{folds}x{repeats} {test[sel.best]:.1f}")
            print(f"  seed {seed}: " + "  ".join(line))


if __name__ == "__main__":
    main()
