"""The scale benchmark's many-class reference (bench.scale): the accuracy target compares with the
reference run to convergence, and each row's objective is the function scikit-learn minimises."""
import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")


def test_accuracy_target_compares_with_the_converged_reference():
    from bench.report import scale_table

    ours = {"seconds": 25.0, "peak_rss_mib": 626.0, "wga": 0.80698, "acc": 0.8687, "chosen": {"C": 0.003}}
    early = {"seconds": 10.0, "peak_rss_mib": 600.0, "wga": 0.80708, "acc": 0.8687, "tol": 1e-4, "n_iter": 15}
    conv = {"seconds": 18.0, "peak_rss_mib": 600.0, "wga": 0.80698, "acc": 0.8687, "tol": 1e-8, "n_iter": 18}
    sc = {"problems": {"1000": {"embeddings_mib": 391.0, "seconds_met": True,
                                "rows": {"dfr[groups]": ours, "ref:sklearn-lbfgs": early,
                                         "ref:sklearn-lbfgs-converged": conv}}}}
    line = next(l for l in scale_table(sc) if "dfr[groups]" in l)
    assert "accuracy **met**" in line and "vs ref:sklearn-lbfgs-converged" in line
    # the converged reference scoring higher: missed
    sc["problems"]["1000"]["rows"]["ref:sklearn-lbfgs-converged"] = dict(conv, wga=0.80708)
    line = next(l for l in scale_table(sc) if "dfr[groups]" in l)
    assert "accuracy **missed**" in line
    # a results file from before the converged reference: the early-stopped one
    del sc["problems"]["1000"]["rows"]["ref:sklearn-lbfgs-converged"]
    line = next(l for l in scale_table(sc) if "dfr[groups]" in l)
    assert "accuracy **missed**" in line and "vs ref:sklearn-lbfgs)" in line


def test_objective_is_what_sklearn_minimises():
    """scikit-learn's converged solution is a minimum of bench.scale.objective: shrinking or growing
    the head, or moving its intercept, raises it (a wrong penalty scale or missing weights would make
    one of those directions lower)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from bench.scale import _reference_rows, make_problem, objective

    p = make_problem(12, n=1200, d=16, seed=3)
    keep, w = _reference_rows(p, 0)
    Xn, yn = p["X"].numpy(), p["y"].numpy()
    C = 0.05
    sc = StandardScaler().fit(Xn)
    m = LogisticRegression(C=C, solver="lbfgs", tol=1e-12, max_iter=20000).fit(sc.transform(Xn[keep]), yn[keep],
                                                                                sample_weight=w)
    W = m.coef_ / sc.scale_
    b = m.intercept_ - W @ sc.mean_
    f0 = objective(p, W, b, C, 0)
    assert np.isfinite(f0) and f0 > 0
    for Wp, bp in ((W * 0.99, b), (W * 1.01, b), (W, b + 0.01 * np.arange(len(b)) / len(b)),
                   (W + 0.01 * np.random.default_rng(0).standard_normal(W.shape) * np.abs(W).mean(), b)):
        assert objective(p, Wp, bp, C, 0) > f0
    # the penalty counts: another strength's objective differs by the penalty's change
    f1 = objective(p, W, b, 2 * C, 0)
    Wstd = torch.as_tensor(W) * torch.as_tensor(Xn).double().std(0, unbiased=False)
    assert f0 - f1 == pytest.approx(float((Wstd ** 2).sum()) / (4 * C), rel=1e-9)
