"""Tests of the shared batched logistic-regression solver (repair.solver)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from repair import selection as Sel
from repair import solver as S


def _binary(n=400, d=30, seed=0, noise=0.8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    w = torch.zeros(d)
    w[:5] = torch.tensor([2.0, -1.5, 1.0, 0.5, -0.5])
    y = (X @ w + noise * torch.randn(n, generator=g) > 0).long()
    return X, y


def _multi(n=450, d=25, C=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * (1 + torch.rand(d, generator=g)) + torch.randn(d, generator=g)
    Wt = torch.randn(C, d, generator=g) * (torch.rand(C, d, generator=g) < 0.3)
    y = (X @ Wt.T + 1.5 * torch.randn(n, C, generator=g)).argmax(1)
    return X, y


def _logits(X, W, b):
    return X.to(W.dtype) @ W.T + b


def _std(X):
    a, c = S.standardization(X.double())
    return (X.double() * a + c)


def _ce_sum(X, y, W, b, w=None):
    Z = X.double() @ W.double().T + b.double()
    ce = torch.logsumexp(Z, 1) - Z.gather(1, y.view(-1, 1)).squeeze(1)
    return float(ce.sum() if w is None else (ce * w.double()).sum())


def _sk(**kw):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(**kw)


@pytest.mark.parametrize("Cinv", [1.0, 0.1])
def test_binary_l1_matches_sklearn(Cinv):
    X, y = _binary()
    Xs = _std(X)
    W, b, info = S.fit_logreg(Xs, y, 2, l1=1.0 / Cinv, standardize=False, dtype=torch.float64, tol=1e-8)
    assert info["converged"] == [True]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = _sk(l1_ratio=1.0, C=Cinv, solver="saga", tol=1e-10, max_iter=20000).fit(Xs.numpy(), y.numpy())
    v = torch.tensor(m.coef_[0], dtype=torch.float64)
    c = float(m.intercept_[0])
    z = Xs @ v + c
    obj_sk = float(torch.nn.functional.softplus(-z * (2 * y - 1).double()).sum() + v.abs().sum() / Cinv)
    ours = info["objective"][0]
    # our objective (same formula: C=2 softmax + L1 == binary + L1) is at least as good
    assert ours <= obj_sk + 1e-4 * abs(obj_sk)
    assert abs(ours - obj_sk) <= 1e-3 * abs(obj_sk)
    # recompute the objective independently from the returned head
    mine = _ce_sum(Xs, y, W[0], b[0]) + float(W[0].double().abs().sum()) / Cinv
    assert mine == pytest.approx(ours, rel=1e-6)
    pred = Sel.head_predictions(Xs.float(), W[0], b[0])
    agree = (pred.numpy() == m.predict(Xs.numpy())).mean()
    assert agree >= 0.99


def test_multinomial_l1_and_l2_match_sklearn():
    X, y = _multi()
    Xs = _std(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # L1, multinomial (saga)
        W, b, info = S.fit_logreg(Xs, y, 3, l1=1 / 0.3, standardize=False, dtype=torch.float64, tol=1e-8)
        m = _sk(l1_ratio=1.0, C=0.3, solver="saga", tol=1e-10, max_iter=50000).fit(Xs.numpy(), y.numpy())
        Ws, bs = torch.tensor(m.coef_), torch.tensor(m.intercept_)
        obj_sk = _ce_sum(Xs, y, Ws, bs) + float(Ws.abs().sum()) / 0.3
        assert info["objective"][0] <= obj_sk * (1 + 1e-5)
        assert info["objective"][0] == pytest.approx(obj_sk, rel=1e-3)
        # L2 (lbfgs): sum CE + 1/(2C) ||W||^2
        W2, b2, info2 = S.fit_logreg(Xs, y, 3, l2=1 / 0.5, standardize=False, dtype=torch.float64, tol=1e-9)
        m2 = _sk(C=0.5, solver="lbfgs", tol=1e-12, max_iter=10000).fit(Xs.numpy(), y.numpy())
    W2s = torch.tensor(m2.coef_)
    assert torch.allclose(W2[0], W2s, atol=1e-4)
    obj2 = _ce_sum(Xs, y, W2s, torch.tensor(m2.intercept_)) + 0.5 / 0.5 * float((W2s ** 2).sum())
    assert info2["objective"][0] == pytest.approx(obj2, rel=1e-6)


@pytest.mark.parametrize("gather,working_set", [(False, False), (True, False), (True, True)])
def test_batched_equals_separate(gather, working_set):
    X, y = _multi(n=300, d=140)            # d > 128 so the working-set path is eligible
    g = torch.Generator().manual_seed(3)
    K = 4
    sw = (torch.rand(K, X.shape[0], generator=g) < 0.4).float()
    sw[1] *= 2.0
    l1 = torch.tensor([1.0, 3.0, 10.0, 30.0])
    Wk, bk, info = S.fit_logreg(X, y, 3, sample_weight=sw, l1=l1, tol=1e-6, gather=gather,
                                working_set=working_set, dtype=torch.float64)
    assert info["gathered"] == gather and info["working_set"] == working_set
    assert all(info["converged"])
    for k in range(K):
        W1, b1, info1 = S.fit_logreg(X, y, 3, sample_weight=sw[k], l1=float(l1[k]), tol=1e-6,
                                     working_set=False, dtype=torch.float64)
        # the batch standardises with all rows, the single fits too: same problem
        assert info["objective"][k] == pytest.approx(info1["objective"][0], rel=1e-5, abs=1e-6)
        Z1 = _logits(X, W1[0], b1[0])
        Zk = _logits(X, Wk[k], bk[k])
        assert torch.allclose(Z1, Zk, atol=2e-2 * float(Z1.abs().max()))


def test_weights_equal_duplicated_rows():
    X, y = _binary(n=200, d=10)
    w = torch.ones(200)
    w[:50] = 2.0
    Xd = torch.cat([X, X[:50]])
    yd = torch.cat([y, y[:50]])
    Wa, ba, _ = S.fit_logreg(X, y, 2, sample_weight=w, l2=1.0, standardize=False, tol=1e-7, dtype=torch.float64)
    Wb, bb, _ = S.fit_logreg(Xd, yd, 2, l2=1.0, standardize=False, tol=1e-7, dtype=torch.float64)
    assert torch.allclose(Wa, Wb, atol=1e-5) and torch.allclose(ba, bb, atol=1e-5)


def test_standardization_is_folded():
    X, y = _multi(n=300, d=20)
    X = X * 7 + 3
    W, b, _ = S.fit_logreg(X, y, 3, l1=2.0, l2=0.5, standardize=True, tol=1e-7, dtype=torch.float64)
    a, c = S.standardization(X.double())
    Ws, bs, _ = S.fit_logreg(X.double() * a + c, y, 3, l1=2.0, l2=0.5, standardize=False, tol=1e-7,
                             dtype=torch.float64)
    Wf, bf = S.fold_affine(Ws[0].double(), bs[0].double(), a, c)
    Xd = X.double()
    assert torch.allclose(Xd @ W[0].double().T + b[0], Xd @ Wf.T + bf, atol=1e-3)


def test_feature_map_is_folded_and_mask_zeroes():
    X, y = _multi(n=300, d=20)
    g = torch.Generator().manual_seed(0)
    K = 3
    scale = torch.rand(K, 20, generator=g) + 0.2
    scale[0, :5] = 0.0                       # a mask on problem 0
    shift = torch.randn(K, 20, generator=g)
    W, b, _ = S.fit_logreg(X, y, 3, l2=1.0, feature_scale=scale, feature_shift=shift,
                           standardize=False, tol=1e-6, dtype=torch.float64)
    assert torch.all(W[0, :, :5] == 0)
    for k in range(K):
        Xt = X * scale[k] + shift[k]
        Wt, bt, _ = S.fit_logreg(Xt, y, 3, l2=1.0, standardize=False, tol=1e-6, dtype=torch.float64)
        # the returned head acts on raw X and equals the head fitted on the mapped data
        assert torch.allclose(_logits(X, W[k], b[k]), _logits(Xt, Wt[0], bt[0]), atol=1e-3)


def test_ref_pull_and_warm_start():
    X, y = _multi(n=300, d=20)
    W0, b0, _ = S.fit_logreg(X, y, 3, l2=1.0, tol=1e-7)
    w = torch.rand(300, generator=torch.Generator().manual_seed(1))
    # a huge pull keeps the reference head
    Wp, bp, _ = S.fit_logreg(X, y, 3, sample_weight=w, ref_pull=1e6, ref_W=W0[0], ref_b=b0[0],
                             init_W=W0[0], init_b=b0[0], tol=1e-7)
    assert torch.allclose(Wp[0], W0[0], atol=1e-3) and torch.allclose(bp[0], b0[0], atol=1e-3)
    # warm start at the optimum: immediate convergence
    Ww, bw, info = S.fit_logreg(X, y, 3, l2=1.0, init_W=W0[0], init_b=b0[0], tol=1e-4)
    assert info["n_iter"][0] <= 5
    # batch over pulls: weaker pull -> farther from the reference
    Wk, bk, _ = S.fit_logreg(X, y, 3, sample_weight=w, l2=1e-3, ref_pull=[1.0, 10.0, 100.0],
                             ref_W=W0[0], ref_b=b0[0], init_W=W0[0], init_b=b0[0], tol=1e-6)
    dist = [(Wk[k] - W0[0]).norm().item() for k in range(3)]
    assert dist[0] > dist[1] > dist[2]


def test_deterministic_and_inputs_untouched():
    X, y = _multi(n=200, d=150)
    sw = (torch.rand(3, 200, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    Xc, yc, swc = X.clone(), y.clone(), sw.clone()
    r1 = S.fit_logreg(X, y, 3, sample_weight=sw, l1=[1.0, 2.0, 5.0])
    r2 = S.fit_logreg(X, y, 3, sample_weight=sw, l1=[1.0, 2.0, 5.0])
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert torch.equal(X, Xc) and torch.equal(y, yc) and torch.equal(sw, swc)
    assert r1[0].dtype == torch.float32 and r1[0].shape == (3, 3, 150) and r1[1].shape == (3, 3)


def test_bad_arguments():
    X, y = _binary(n=50, d=8)
    with pytest.raises(ValueError):
        S.fit_logreg(X, y, 2, l1=[1.0, 2.0], sample_weight=torch.ones(3, 50))
    with pytest.raises(ValueError):
        S.fit_logreg(X, y, 2, sample_weight=torch.zeros(50))
    with pytest.raises(ValueError):
        S.fit_logreg(X, y, 2, ref_pull=1.0)
    with pytest.raises(ValueError):
        S.fit_logreg(X, y + 5, 2)


def test_group_helpers():
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    g = torch.tensor([0, 1, 2, 2, 3, 0])
    pred = torch.tensor([0, 1, 1, 0, 1, 0])
    acc = Sel.group_accuracies(pred, y, g, num_groups=5)
    assert acc[:4].tolist() == [1.0, 0.0, 0.5, 1.0] and torch.isnan(acc[4])
    assert Sel.worst_group_accuracy(pred, y, g, num_groups=5) == 0.0
    logits = torch.nn.functional.one_hot(pred, 2).float()
    assert torch.equal(Sel.group_accuracies(logits, y, g), acc[:4])
    batch = torch.stack([pred, y])
    wk = Sel.worst_group_accuracy(batch, y, g)
    assert wk.tolist() == [0.0, 1.0]
    assert Sel.inferred_groups(pred, y).tolist() == [0, 1, 2, 3, 2, 0]


def test_sampling_helpers():
    gen = torch.Generator().manual_seed(0)
    groups = torch.tensor([0] * 50 + [1] * 10 + [2] * 30 + [3] * 3)
    w = S.balanced_subsample_weights(groups, 4, gen)
    for k in range(4):
        tot = torch.zeros(4).index_add_(0, groups, w[k])
        assert torch.allclose(tot, torch.full((4,), 3.0))
    w = S.balanced_subsample_weights(groups, 2, gen, min_per_group=10)
    tot = torch.zeros(4).index_add_(0, groups, w[0])
    assert torch.allclose(tot, torch.full((4,), 10.0))       # group 3 up-weighted
    a, b = Sel.stratified_split(groups, [0.5], gen)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(groups.numel()))
    for gid in range(4):
        assert int((groups[a] == gid).sum()) >= 1 and int((groups[b] == gid).sum()) >= 1
    cw = S.class_balanced_weights(torch.tensor([0, 0, 0, 1]), 2)
    assert torch.allclose(cw, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0]))


def test_fold_affine_shapes():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 5, generator=g)
    W, b = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    s, t = torch.randn(5, generator=g), torch.randn(5, generator=g)
    Wf, bf = S.fold_affine(W, b, s, t)
    assert torch.allclose((X * s + t) @ W.T + b, X @ Wf.T + bf, atol=1e-5)
    Wk = torch.randn(2, 3, 5, generator=g)
    bk = torch.randn(2, 3, generator=g)
    sk, tk = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    Wkf, bkf = S.fold_affine(Wk, bk, sk, tk)
    for k in range(2):
        assert torch.allclose((X * sk[k] + tk[k]) @ Wk[k].T + bk[k], X @ Wkf[k].T + bkf[k], atol=1e-5)


def test_expected_balanced_weights_is_the_subsample_average():
    groups = torch.tensor([0] * 50 + [1] * 10 + [2] * 30 + [3] * 3)
    for floor in (0, 10):
        w = S.expected_balanced_weights(groups, floor)
        sub = S.balanced_subsample_weights(groups, 1500, torch.Generator().manual_seed(0), min_per_group=floor)
        tot = torch.zeros(4).index_add_(0, groups, w)
        assert torch.allclose(tot, torch.full((4,), float(max(3, floor))))
        # the exact expectation of the random subsample indicators
        assert torch.allclose(sub.mean(0), w, atol=0.05)
    mask = groups != 3
    w = S.expected_balanced_weights(groups, 0, mask=mask)
    assert torch.all(w[~mask] == 0) and torch.allclose(torch.zeros(4).index_add_(0, groups, w)[:3], torch.full((3,), 10.0))


def _sk_l2(X, t, w, C):
    from sklearn.linear_model import LogisticRegression
    m = LogisticRegression(C=C, tol=1e-12, max_iter=100000).fit(X.double().numpy(), t.numpy(),
                                                                   sample_weight=w.double().numpy())
    return torch.tensor(m.coef_[0]), float(m.intercept_[0])


@pytest.mark.parametrize("form", ["primal", "kernel"])
def test_binary_l2_path_matches_sklearn(form):
    g = torch.Generator().manual_seed(0)
    for n, d in ((150, 20), (40, 70)):                     # n > d and n < d
        Z = torch.randn(2, n, d, generator=g, dtype=torch.float64)
        t = (Z[..., 0] + 0.7 * torch.randn(2, n, generator=g, dtype=torch.float64) > 0).double()
        w = torch.rand(2, n, generator=g, dtype=torch.float64) + 0.5
        w[1, -7:] = 0.0                                   # padding rows: ignored
        Cs = [0.01, 0.3, 10.0]
        V, c, info = S.fit_binary_l2_path(Z, t, w, [1 / C for C in Cs], tol=1e-12, form=form,
                                          factor_dtype=torch.float64)
        assert info["form"] == form and all(info["converged"])
        for k in range(2):
            for j, C in enumerate(Cs):
                coef, icpt = _sk_l2(Z[k], t[k], w[k], C)
                scale = 1.0 + float(coef.abs().max())
                assert float((V[k, j] - coef).abs().max()) <= 1e-5 * scale
                assert abs(float(c[k, j]) - icpt) <= 1e-5 * scale


def test_binary_l2_path_float32_forms_agree_and_path_equals_cold_fits():
    X, y = _binary(n=300, d=40)
    Z = _std(X).float().unsqueeze(0)
    t, w = y.double().unsqueeze(0), torch.ones(1, 300, dtype=torch.float64)
    lams = [30.0, 3.0, 0.3]
    Vp, cp, ip = S.fit_binary_l2_path(Z, t, w, lams, tol=1e-8, form="primal")
    Vk, ck, ik = S.fit_binary_l2_path(Z, t, w, lams, tol=1e-8, form="kernel")
    assert ip["form"] == "primal" and ik["form"] == "kernel"
    assert torch.allclose(Vp, Vk, atol=2e-3) and torch.allclose(cp, ck, atol=2e-3)
    for j, lam in enumerate(lams):                        # warm-started path == separate fits
        V1, c1, _ = S.fit_binary_l2_path(Z, t, w, [lam], tol=1e-8)
        assert torch.allclose(V1[0, 0], Vp[0, j], atol=2e-3) and abs(float(c1[0, 0] - cp[0, j])) < 2e-3
    # the auto form picks the cheaper parametrisation
    assert S.newton_cost(300, 40)[1] == "primal" and S.newton_cost(100, 1000)[1] == "kernel"
    with pytest.raises(ValueError):
        S.fit_binary_l2_path(Z, t, w, [])
    with pytest.raises(ValueError):
        S.fit_binary_l2_path(Z, t, -w, [1.0])


def test_binary_l2_path_separable_and_one_class():
    # separable data at a weak penalty, and a problem with one class only: finite, converged
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(2, 60, 5, generator=g)
    t = torch.stack([(Z[0, :, 0] > 0).double(), torch.zeros(60, dtype=torch.float64)])
    V, c, info = S.fit_binary_l2_path(Z, t, torch.ones(2, 60), [1.0, 1e-3], tol=1e-6)
    assert torch.isfinite(V).all() and torch.isfinite(c).all() and all(info["converged"])
    assert float(c[1, -1]) < -3 and float(V[1].abs().max()) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    X, y = _multi(n=300, d=150)
    sw = (torch.rand(3, 300, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    Wc, bc, ic = S.fit_logreg(X, y, 3, sample_weight=sw, l1=[1.0, 3.0, 10.0], tol=1e-6)
    Wg, bg, ig = S.fit_logreg(X, y, 3, sample_weight=sw, l1=[1.0, 3.0, 10.0], tol=1e-6, device="cuda")
    assert Wg.device.type == "cuda"
    assert np.allclose(ic["objective"], ig["objective"], rtol=1e-4)


# --------------------------------------------------------------------------- L-BFGS path (large problems)
def _binary_objective(X, t, w, v, c, lam, scale=None, shift=None):
    Xd = X.double()
    if scale is not None:
        Xd = Xd * scale.double() + shift.double()
    u = Xd @ v.double() + c
    return float((w.double() * (torch.nn.functional.softplus(u) - t.double() * u)).sum() + 0.5 * lam * (v.double() ** 2).sum())


def test_lbfgs_path_matches_sklearn():
    # float64 data and a tight tolerance: the stopping rule bounds the objective gap by about
    # tol * sum(w) (quasi-Newton decrement and last decrease both below it), so the objectives
    # agree to ~1e-9 relative; 1e-7 leaves room for sklearn's own tolerance
    X, y = _binary(n=500, d=25, seed=3)
    X = X.double() * 2 + 1
    w = torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    lams = [10.0, 1.0, 0.1]
    V, c, info = S.fit_binary_l2_path_lbfgs(X, [(0, 500)], y.double(), w, lams, tol=1e-12, max_iter=3000)
    assert info["converged"] == [True, True, True] and info["form"] == "lbfgs"
    for j, lam in enumerate(lams):
        m = _sk(C=1.0 / lam, tol=1e-12, max_iter=20000).fit(X.numpy(), y.numpy(), sample_weight=w.numpy())
        ours = _binary_objective(X, y, w, V[0, 0, j], float(c[0, 0, j]), lam)
        ref = _binary_objective(X, y, w, torch.tensor(m.coef_[0]), float(m.intercept_[0]), lam)
        assert ours <= ref * (1 + 1e-7)
        assert abs(ours - ref) <= 1e-7 * ref


def test_lbfgs_folds_standardisation_and_matches_newton():
    # float32 data: the folded standardisation (scale/shift) against Newton on the explicitly
    # standardised copy; both stop at an objective gap <= tol * sum(w) = 1e-6 * sum(w), so the
    # objectives differ by at most ~2e-6 * sum(w) (plus float32 round-off of the logits)
    X, y = _multi(n=600, d=30, C=3)
    X = X * 5 + 2
    a, sh = S.standardization(X)
    Z = X * a + sh
    w = S.expected_balanced_weights(y)
    t = torch.nn.functional.one_hot(y, 3).float()
    lams = [3.0, 0.3]
    V, c, info = S.fit_binary_l2_path_lbfgs(X, [(0, 300), (300, 600)], t, w, lams, scale=a, shift=sh, tol=1e-6)
    for bi, (lo, hi) in enumerate([(0, 300), (300, 600)]):
        Vn, cn, _ = S.fit_binary_l2_path(Z[lo:hi].unsqueeze(0).expand(3, -1, -1), t[lo:hi].T, w[lo:hi].expand(3, -1),
                                         lams, tol=1e-6, factor_dtype=torch.float64)
        for task in range(3):
            for j, lam in enumerate(lams):
                ours = _binary_objective(X[lo:hi], t[lo:hi, task], w[lo:hi], V[bi, task, j], float(c[bi, task, j]), lam,
                                         a, sh)
                ref = _binary_objective(Z[lo:hi], t[lo:hi, task], w[lo:hi], Vn[task, j], float(cn[task, j]), lam)
                assert abs(ours - ref) <= 5e-6 * float(w[lo:hi].sum()) + 1e-6 * ref


def test_lbfgs_problems_in_groups_give_the_same_solutions(monkeypatch):
    # many problems are solved a group of columns at a time (bounded state): every problem's
    # solution is the one the whole batch gives (problems are independent: own line search, own
    # history, own stopping); per-row weights (n, T) are split with their problems
    import repair.solver.lbfgs as LB

    X, y = _multi(n=400, d=16, C=5)
    t = torch.nn.functional.one_hot(y, 5).float()
    w = torch.rand(400, 5, generator=torch.Generator().manual_seed(3)) + 0.5
    a, sh = S.standardization(X)
    lams = [2.0, 0.2]
    # at the tightest tolerance the float32 solver certifies (MAX_TOL): a tighter one sits at the
    # round-off floor, where whether a problem stops "converged" or "stuck" depends on the CPU's
    # kernels (1e-8 did on an Intel Xeon, not on an AMD EPYC)
    tol = LB.MAX_TOL
    V1, c1, i1 = S.fit_binary_l2_path_lbfgs(X, [(0, 200), (200, 400)], t, w, lams, scale=a, shift=sh, tol=tol)
    monkeypatch.setattr(LB, "GROUP_STATE_BYTES", 2 * 8 * 17)          # two problems per group
    V2, c2, i2 = S.fit_binary_l2_path_lbfgs(X, [(0, 200), (200, 400)], t, w, lams, scale=a, shift=sh, tol=tol)
    assert all(i1["converged"]) and all(i2["converged"])
    for bi, (lo, hi) in enumerate([(0, 200), (200, 400)]):
        for task in range(5):
            for j, lam in enumerate(lams):
                f1 = _binary_objective(X[lo:hi], t[lo:hi, task], w[lo:hi, task], V1[bi, task, j], float(c1[bi, task, j]),
                                       lam, a, sh)
                f2 = _binary_objective(X[lo:hi], t[lo:hi, task], w[lo:hi, task], V2[bi, task, j], float(c2[bi, task, j]),
                                       lam, a, sh)
                assert abs(f1 - f2) <= 1e-6 * f1
    assert torch.allclose(V1, V2, atol=1e-2, rtol=0)


def test_lbfgs_carried_curvature_saves_passes_and_keeps_the_optimum(monkeypatch):
    # the data term's curvature pairs carried from one path point to the next are exact secant
    # pairs at the next penalty: the same optima (objectives within the stopping rule's gap)
    # whether the history is carried (short or long memory) or restarted at every point, and
    # with the long memory of large blocks in fewer iterations (here 40 against 50; on the
    # 50,000 x 2,048 scale problem 132 against 197)
    import repair.solver.lbfgs as LB

    X, y = _binary(n=1000, d=100, seed=5)
    X = X.double() * torch.linspace(0.2, 10.0, 100, dtype=torch.float64)     # ill-conditioned
    w = torch.ones(1000, dtype=torch.float64)
    a, sh = S.standardization(X)
    lams = [30.0, 10.0, 3.0, 1.0, 0.3, 0.1]
    runs = {}
    for name in ("carried", "restarted", "long"):
        with monkeypatch.context() as mp:
            if name == "restarted":
                solve = LB._Block.solve
                mp.setattr(LB._Block, "solve", lambda self, *args: solve(self, *args[:5], None))
            if name == "long":
                mp.setattr(LB, "LONG_MEMORY_VALUES", 1)
            runs[name] = S.fit_binary_l2_path_lbfgs(X, [(0, 1000)], y.double(), w, lams, scale=a, shift=sh, tol=1e-8)
    for name, (V, c, info) in runs.items():
        assert all(info["converged"]), name
        for j, lam in enumerate(lams):
            f = _binary_objective(X, y, w, V[0, 0, j], float(c[0, 0, j]), lam, a, sh)
            ref = _binary_objective(X, y, w, runs["restarted"][0][0, 0, j], float(runs["restarted"][1][0, 0, j]),
                                    lam, a, sh)
            assert abs(f - ref) <= 1e-5 * ref, (name, j)
    its = {name: sum(r[2]["n_iter"][1:]) for name, r in runs.items()}
    assert its["long"] <= 0.9 * its["restarted"], its


def test_lbfgs_dropped_feature_stays_zero_and_inputs_untouched():
    X, y = _binary(n=300, d=12)
    a = torch.ones(12)
    a[4] = 0.0
    sh = torch.zeros(12)
    Xc = X.clone()
    V, c, _ = S.fit_binary_l2_path_lbfgs(X, [(0, 300)], y, torch.ones(300), [1.0], scale=a, shift=sh)
    assert float(V[0, 0, 0, 4]) == 0.0 and float(V[0, 0, 0].abs().sum()) > 0
    assert torch.equal(X, Xc)
    with pytest.raises(ValueError):
        S.fit_binary_l2_path_lbfgs(X, [(0, 301)], y, torch.ones(300), [1.0])
    with pytest.raises(ValueError):
        S.fit_binary_l2_path_lbfgs(X, [(0, 300)], y, torch.ones(300), [0.0])


def test_path_solver_rule():
    # few features: the (d+1)^2 Hessian is cheap, Newton stays
    assert S.path_solver(500, 64, 2, 1000 * 64 * 4)[0] == "newton"
    assert S.path_solver(300, 128, 2, 600 * 128 * 4)[0] == "newton"
    assert S.path_solver(2000, 32, 2, 4000 * 32 * 4)[0] == "newton"
    # hundreds of features (the benchmark tasks: <= 1,000 rows, 384-1,280 features): Newton, whose
    # optimum L-BFGS reaches only at a tolerance where it is the slower one
    assert S.path_solver(500, 384, 2, 1000 * 384 * 4)[0] == "newton"
    # 50,000 x 2,048 halves: the Hessian's n d^2 costs more than L-BFGS's passes, even at its tight tolerance
    assert S.path_solver(12_400, 2048, 2, 50_000 * 2048 * 4)[0] == "lbfgs"
    # many one-vs-rest problems: Newton's per-problem copies exceed the memory budget
    assert S.path_solver(4000, 2048, 2000, 50_000 * 2048 * 4)[0] == "lbfgs"
    # mix's ten subsample problems, each on rows of its own (ten blocks: L-BFGS pays its per-iteration
    # overhead ten times): on SST-2's 384 features Newton measured 0.43 s against L-BFGS's 1.6 s ...
    assert S.path_solver(2000, 384, 10, 20_000 * 384 * 4)[0] == "newton"
    # ... on coloured MNIST's 1,280 features the Gram form's 1,600 x 1,600 factorisations cost more
    # (Newton 4.1 s, L-BFGS 0.32 s)
    assert S.path_solver(1600, 1280, 8, 12_800 * 1280 * 4)[0] == "lbfgs"
    # problems sharing their rows share L-BFGS's overhead: fewer blocks, L-BFGS sooner
    n, d, k = 500, 1280, 20
    assert S.path_solver(n, d, k, n * d * 4)[0] == "newton"
    assert S.path_solver(n, d, k, n * d * 4, blocks=2)[0] == "lbfgs"
    # AFR's grid (24 pulled problems on the same rows, one GEMM per L-BFGS pass): L-BFGS on the
    # image and text grids, where the plain estimate chose Newton (measured 2-4x slower there) ...
    assert S.path_solver(240, 1280, 24, 480 * 1280 * 4, blocks=1)[0] == "newton"
    assert S.path_solver(240, 1280, 24, 480 * 1280 * 4, blocks=1, shared=True)[0] == "lbfgs"
    assert S.path_solver(300, 384, 24, 600 * 384 * 4, blocks=1, shared=True)[0] == "lbfgs"
    # ... Newton on a handful of features and on one problem alone (a GEMV pass, the thin penalty)
    assert S.path_solver(2000, 8, 24, 2000 * 8 * 4, blocks=1, shared=True)[0] == "newton"
    assert S.path_solver(600, 128, 1, 600 * 128 * 4, blocks=1, shared=True)[0] == "newton"


def test_dfr_lbfgs_and_newton_agree():
    from repair.methods import RepairInputs, get_method
    from repair.methods.dfr import DFRConfig

    X, y = _multi(n=800, d=40, C=2, seed=4)
    g = y * 2 + (X[:, 0] > X[:, 0].median()).long()
    inp = RepairInputs(X=X, y=y, W=torch.zeros(2, 40), b=torch.zeros(2), groups=g, seed=0)
    dfr = get_method("dfr")
    outs = {s: dfr.fn(inp, DFRConfig(protocol="fast", solver=s, tol=1e-6)) for s in ("newton", "lbfgs")}
    assert outs["lbfgs"].diagnostics["solver"] == "lbfgs" and outs["newton"].diagnostics["solver"] == "newton"
    assert outs["lbfgs"].diagnostics["chosen"] == outs["newton"].diagnostics["chosen"]
    la, ln = (X @ outs[s].W.T + outs[s].b for s in ("lbfgs", "newton"))
    assert float((la.argmax(1) == ln.argmax(1)).float().mean()) >= 0.99
    assert torch.allclose(la, ln, atol=2e-2 * float(ln.abs().max()))


def test_dfr_fast_protocol_head_for_more_classes_is_sklearns_multinomial_fit():
    # more than two classes: the strength is chosen by the 2-fold one-vs-rest path as for two
    # classes, but the head is ONE multinomial fit on all rows at that strength: the group-balanced
    # (expected weights) L2 softmax regression scikit-learn's lbfgs fits on the standardised rows;
    # two classes keep the average of the fold heads
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from repair.methods import RepairInputs, get_method
    from repair.methods.dfr import DFRConfig

    dfr = get_method("dfr").fn
    X, y = _multi(n=600, d=12, C=4, seed=5)
    g = y * 2 + (X[:, 0] > X[:, 0].median()).long()
    inp = RepairInputs(X=X, y=y, W=torch.zeros(4, 12), b=torch.zeros(4), groups=g, seed=0)
    w = S.expected_balanced_weights(g).numpy().astype(np.float64)
    sc = StandardScaler().fit(X.numpy())
    for solver in ("newton", "lbfgs"):
        out = dfr(inp, DFRConfig(protocol="fast", c_grid=(3.0, 0.03), solver=solver, group_cap=None, tol=1e-4))
        C = out.diagnostics["chosen"]["C"]
        assert out.diagnostics["head_from"] == "one multinomial fit on all rows"
        assert out.diagnostics["head_converged"]
        ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=10_000).fit(
            sc.transform(X.numpy()), y.numpy(), sample_weight=w)
        Wr = torch.as_tensor(ref.coef_ / sc.scale_, dtype=torch.float32)
        br = torch.as_tensor(ref.intercept_ - (ref.coef_ / sc.scale_) @ sc.mean_, dtype=torch.float32)
        la, lr = X @ out.W.T + out.b, X @ Wr.T + br
        # softmax is shift-invariant per row: compare centred logits
        la, lr = la - la.mean(1, keepdim=True), lr - lr.mean(1, keepdim=True)
        assert float((la.argmax(1) == lr.argmax(1)).float().mean()) >= 0.99
        assert torch.allclose(la, lr, atol=1e-2 * float(lr.abs().max()))
        # that strength alone (no path to score, nothing fitted before the head): the same head
        one = dfr(inp, DFRConfig(protocol="fast", c_grid=(C,), solver=solver, group_cap=None))
        assert one.diagnostics["head_from"] == "one multinomial fit on all rows"
        assert one.diagnostics["solver"] == "lbfgs" and "only the multinomial head" in one.diagnostics["solver_rule"]
        lo = X @ one.W.T + one.b
        lo = lo - lo.mean(1, keepdim=True)
        assert torch.allclose(lo, lr, atol=1e-2 * float(lr.abs().max()))          # scikit-learn's fit again
    X2, y2 = _multi(n=600, d=12, C=2, seed=5)
    two = dfr(RepairInputs(X=X2, y=y2, W=torch.zeros(2, 12), b=torch.zeros(2), groups=y2 * 2 + (X2[:, 0] > 0).long(),
                           seed=0), DFRConfig(protocol="fast", c_grid=(3.0, 0.03)))
    assert two.diagnostics["head_from"] == "average of the two fold heads"


def test_fit_logreg_chunks_problems_within_the_memory_budget(monkeypatch):
    from repair.solver import fista

    X, y = _multi(n=400, d=20)
    sw = (torch.rand(4, 400, generator=torch.Generator().manual_seed(2)) < 0.2).float()
    W1, b1, info1 = S.fit_logreg(X, y, 3, sample_weight=sw, l2=[1.0, 2.0, 3.0, 4.0], tol=1e-6)
    assert "chunks" not in info1
    monkeypatch.setattr(fista, "_MIN_BUDGET", 1)
    monkeypatch.setattr(fista, "_MEMORY_BUDGET", int(90 * 20 * 4 * 1.5))       # ~1 problem's rows
    W2, b2, info2 = S.fit_logreg(X, y, 3, sample_weight=sw, l2=[1.0, 2.0, 3.0, 4.0], tol=1e-6)
    assert info2["chunks"] >= 2 and len(info2["n_iter"]) == 4
    assert torch.allclose(_logits(X, W1[0], b1[0]), _logits(X, W2[0], b2[0]), atol=1e-3)
    assert torch.allclose(_logits(X, W1[3], b1[3]), _logits(X, W2[3], b2[3]), atol=1e-3)


def test_feature_moments_match_two_pass():
    X = torch.rand(1000, 7, generator=torch.Generator().manual_seed(0)) * 3 + 10
    X[:, 2] = 4.0
    mu, sd = S.feature_moments(X, chunk_rows=128)
    assert torch.allclose(mu.double(), X.double().mean(0), rtol=1e-6)
    assert torch.allclose(sd.double(), X.double().std(0, unbiased=False), rtol=1e-4, atol=1e-6)
    a, c = S.standardization(X, chunk_rows=128)
    assert float(a[2]) == 1.0                               # constant feature: scale 1
    rows = torch.arange(0, 1000, 3)
    mu_r, _ = S.feature_moments(X, rows)
    assert torch.allclose(mu_r.double(), X[rows].double().mean(0), rtol=1e-6)


def test_feature_moments_and_a_heads_bytes_do_not_depend_on_the_thread_count():
    # the standardisation statistics do not depend on the torch threads: their float32 column sums
    # were BLAS products split among the threads (at 1 vs 2 threads the means differed by ~2e-6), and
    # mix's head (its rows' statistics) with them, on a set where every other head was the same
    from repair.methods import RepairInputs, get_method
    from repair.threads import limited

    g = torch.Generator().manual_seed(0)
    X = (torch.randn(4000, 512, generator=g).relu() * 3).contiguous()
    with limited(1):
        one = S.feature_moments(X)
    with limited(2):
        two = S.feature_moments(X)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    y = torch.randint(0, 2, (4000,), generator=g)
    a = torch.where(torch.rand(4000, generator=g) < 0.9, y, 1 - y)
    X[:, :20] += 0.6 * y.float().unsqueeze(1)
    X[:, 20:60] += 1.5 * a.float().unsqueeze(1)
    mix = get_method("mix")
    heads = []
    for n in (1, 2):
        with limited(n):
            heads.append(mix.fn(RepairInputs(X=X, y=y, W=torch.zeros(2, 512), b=torch.zeros(2), groups=y * 2 + a,
                                             seed=0), mix.default_config()))
    assert torch.equal(heads[0].W, heads[1].W) and torch.equal(heads[0].b, heads[1].b)


def test_softmax_lbfgs_matches_sklearn_and_fista():
    from repair.solver.lbfgs import fit_softmax_l2_lbfgs

    X, y = _multi(n=450, d=25, C=3)
    X = X.double()
    w = torch.rand(450, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    W, b, info = fit_softmax_l2_lbfgs(X, y, w, 3, 2.0, tol=1e-10)
    m = _sk(C=0.5, tol=1e-12, max_iter=20000).fit(X.numpy(), y.numpy(), sample_weight=w.numpy())
    ref = _ce_sum(X, y, torch.tensor(m.coef_), torch.tensor(m.intercept_), w) + float((torch.tensor(m.coef_) ** 2).sum())
    ours = _ce_sum(X, y, W, b, w) + float((W ** 2).sum())
    # stopped at a mean-gradient entry <= 1e-10 (or round-off): the objectives agree to ~1e-12
    assert abs(ours - ref) <= 1e-8 * ref
    # through fit_logreg (standardisation folded in, several problems on subsamples): the same
    # optimum as FISTA; both stop at a mean-gradient entry <= 1e-7, so logits agree closely
    sw = (torch.rand(3, 450, generator=torch.Generator().manual_seed(4)) < 0.6).double() * w
    Wl, bl, il = S.fit_logreg(X, y, 3, sample_weight=sw, l2=[1.0, 3.0, 10.0], algorithm="lbfgs", tol=1e-7,
                              dtype=torch.float64)
    Wf, bf, fi = S.fit_logreg(X, y, 3, sample_weight=sw, l2=[1.0, 3.0, 10.0], algorithm="fista", tol=1e-7,
                              dtype=torch.float64)
    assert il["algorithm"] == "lbfgs"
    for k in range(3):
        assert abs(il["objective"][k] - fi["objective"][k]) <= 1e-6 * fi["objective"][k]
        assert torch.allclose(_logits(X, Wl[k], bl[k]), _logits(X, Wf[k], bf[k]), atol=1e-3)
    with pytest.raises(ValueError):
        S.fit_logreg(X, y, 3, l1=1.0, algorithm="lbfgs")


def test_shared_rows_pulled_heads_lbfgs_match_newton(monkeypatch):
    # AFR's grid: every problem on all rows with its own weights and its own pull to a reference
    # head. The L-BFGS route (one block, a column per problem, the pull as logit offsets, a penalty
    # per problem) reaches the batched Newton optimum: objectives within the stopping rules' gap
    import repair.solver.lbfgs as LB

    X, y = _binary(n=300, d=60, seed=4)
    X = X * 3 + 1
    g = torch.Generator().manual_seed(1)
    K = 6
    w = torch.rand(K, 300, generator=g) + 0.2
    w = w / w.sum(1, keepdim=True)
    Wref = torch.randn(2, 60, generator=g) * 0.3
    bref = torch.tensor([0.2, -0.2])
    pulls = torch.tensor([0.001, 0.01, 0.1, 0.001, 0.01, 0.1])
    kw = dict(sample_weight=w, l2=1e-4, ref_pull=pulls, init_W=Wref, init_b=bref, ref_W=Wref, ref_b=bref,
              tol=1e-8, max_iter=500)
    monkeypatch.setattr(LB, "path_solver", lambda *a, **k: ("newton", "test"))
    Wn, bn, infn = S.fit_logreg(X, y, 2, **kw)
    monkeypatch.setattr(LB, "path_solver", lambda *a, **k: ("lbfgs", "test"))
    Wl, bl, infl = S.fit_logreg(X, y, 2, **kw)
    assert infn["algorithm"] == "newton" and infl["algorithm"] == "lbfgs"
    assert all(infl["converged"])
    fn, fl = torch.tensor(infn["objective"]), torch.tensor(infl["objective"])
    assert torch.all((fl - fn).abs() <= 1e-5 * fn.abs() + 1e-6), (fn, fl)
    # same predictions, and the pull is honoured (a strong pull keeps the head near the reference)
    assert torch.allclose(_logits(X, Wl[2], bl[2]), _logits(X, Wn[2], bn[2]), atol=1e-2)
    dist = [(Wl[k] - Wref).norm() for k in range(3)]
    assert dist[2] < dist[1] < dist[0]


def test_lbfgs_penalty_per_problem_and_offsets():
    # (L, B, T) penalties and (n, T) logit offsets: each problem is the one solved alone
    X, y = _binary(n=200, d=10, seed=5)
    X = X.double()                                                          # float64: tight tolerance
    off = torch.randn(200, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.5
    t = torch.stack([y, 1 - y], 1).double()
    w = torch.ones(200, dtype=torch.float64)
    lams = torch.tensor([[[3.0, 0.5]], [[1.0, 0.1]]])                       # (L=2, B=1, T=2)
    V, c, info = S.fit_binary_l2_path_lbfgs(X, [(0, 200)], t, w, lams, offset=off, tol=1e-9, max_iter=5000)
    assert all(info["converged"])
    for task in range(2):
        for j in range(2):
            V1, c1, _ = S.fit_binary_l2_path_lbfgs(X, [(0, 200)], t[:, task], w, [float(lams[j, 0, task])],
                                                   offset=off[:, task], tol=1e-9, max_iter=5000)
            assert torch.allclose(V[0, task, j], V1[0, 0, 0], atol=1e-3)
            assert abs(float(c[0, task, j]) - float(c1[0, 0, 0])) < 1e-3
    with pytest.raises(ValueError):
        S.fit_binary_l2_path_lbfgs(X, [(0, 200)], t, w, [1.0], offset=off[:, :1])


def test_moments_of_huge_float32_embeddings_do_not_overflow():
    """Found by an audit: finite float32 embeddings around 1e19 had their centred values squared in
    float32 (inf): the standard deviation was inf, every feature's scale 1 / inf = 0 and the head all
    zeros, silently (at 1e18 some features already). The moments are right at any finite scale (a pass
    whose float32 sums overflow is redone in float64), on one thread whatever the thread count, and a
    spread that is still not a finite number is refused, never a zero scale."""
    from repair.errors import BadInput
    from repair.solver.weights import standardization_from_moments
    from repair.threads import limited

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 5, generator=g) * torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0]) + 1
    mu, sd = S.feature_moments(X)
    y = (X[:, 0] + X[:, 1] + 0.5 * torch.randn(3000, generator=g) > 2).long()
    W1, b1, _ = S.fit_logreg(X, y, 2, l2=1.0)
    for s in (1e18, 1e19, 1e30, 1e37):
        Xs = X * s
        assert bool(torch.isfinite(Xs).all())
        with limited(1):
            one = S.feature_moments(Xs, chunk_rows=1000)
        with limited(2):
            two = S.feature_moments(Xs, chunk_rows=1000)
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
        assert torch.allclose(one[0].double() / s, mu.double(), rtol=1e-5), s
        assert torch.allclose(one[1].double() / s, sd.double(), rtol=1e-5), s
        a, c = S.standardization(Xs)
        assert bool(torch.isfinite(a).all() and (a > 0).all() and torch.isfinite(c).all()), s
        assert torch.allclose(Xs * a + c, (X - mu) / sd, atol=1e-4), s
        Ws, bs, _ = S.fit_logreg(Xs, y, 2, l2=1.0)        # the same head, in the embeddings' units
        assert torch.allclose(_logits(Xs, Ws[0], bs[0]), _logits(X, W1[0], b1[0]), atol=1e-3), s
    with pytest.raises(BadInput, match="too large to standardise"):
        standardization_from_moments(torch.zeros(3), torch.tensor([1.0, float("inf"), 1.0]))


def test_two_class_smooth_fits_honour_tol_and_max_iter(monkeypatch):
    """Found by an audit: fit_logreg's two-class L2 path (Newton, and L-BFGS on large problems) ran
    with its own stopping rule whatever the caller's tol and max_iter (max_iter=1 reported 7 steps;
    neurontune / nsf / afr's settings changed nothing). tol is now Newton's decrement for a gradient of
    that size (10 tol^2: the default 1e-4 is the 1e-7 it always used, so default heads are unchanged)
    and max_iter counts Newton steps (L-BFGS gets ten iterations per step)."""
    import repair.solver.lbfgs as LB
    from repair.methods import RepairInputs, get_method

    X, y = _binary(n=200, d=8, seed=1)
    W, b, info = S.fit_logreg(X, y, 2, l2=1.0)
    Wd, bd, infod = S.fit_logreg(X, y, 2, l2=1.0, tol=1e-4, max_iter=100)
    assert info["algorithm"] == "newton" and torch.equal(W, Wd) and torch.equal(b, bd)
    its = {}
    for tol in (1e-2, 1e-4, 1e-6):
        _, _, inf = S.fit_logreg(X, y, 2, l2=1.0, tol=tol)
        assert inf["algorithm"] == "newton" and all(inf["converged"])
        its[tol] = inf["n_iter"][0]
    assert its[1e-2] < its[1e-4] < its[1e-6], its
    _, _, one = S.fit_logreg(X, y, 2, l2=1.0, max_iter=1)
    assert one["n_iter"] == [1] and one["converged"] == [False]
    monkeypatch.setattr(LB, "path_solver", lambda *a, **k: ("lbfgs", "test"))
    Xl, yl = _binary()                                     # L-BFGS needs 13 iterations here
    _, _, lb = S.fit_logreg(Xl, yl, 2, l2=1e-2, max_iter=1)
    assert lb["algorithm"] == "lbfgs" and lb["n_iter"] == [LB.ITERS_PER_NEWTON_STEP] and lb["converged"] == [False]
    monkeypatch.undo()
    # the methods' own settings reach the solver
    g = torch.Generator().manual_seed(1)
    Xm = torch.randn(200, 8, generator=g)
    ym = torch.arange(200) % 2
    Xm[:, 0] += 1.5 * ym
    inp = RepairInputs(X=Xm, y=ym, W=torch.randn(2, 8, generator=g), b=torch.randn(2, generator=g))
    for name in ("neurontune", "nsf"):
        m = get_method(name)
        base, capped = m(inp), m(inp, {"max_iter": 1})
        assert base.diagnostics["solver_converged"] and not capped.diagnostics["solver_converged"], name
        assert not torch.equal(base.W, capped.W), name
    from repair.solver.newton import HEADS_TOL, heads_tol

    assert heads_tol(1e-4) == HEADS_TOL == 1e-7
