"""Mixed rows that are never formed (repair.solver.mixing.RowMix): the structure's algebra against
the formed rows, and every solver path fitting the same heads as on the formed training sets."""
import pytest
import torch

from repair.solver import fit_logreg
from repair.solver.mixing import RowMix


def _problem(K=3, N=60, D=5, m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    X[:, 0] += 3.0                                     # a feature far from 0: standardisation matters
    y = (X[:, 1] + 0.5 * torch.randn(N, generator=g, dtype=torch.float64) > 0).long()
    w = (torch.rand(K, N, generator=g) < 0.7).double() * (1.0 + torch.rand(K, N, generator=g, dtype=torch.float64))
    rows = [torch.nonzero(w[k] > 0).flatten() for k in range(K)]
    i = torch.stack([r[torch.randint(0, r.numel(), (m,), generator=g)] for r in rows])
    p = torch.stack([r[torch.randint(0, r.numel(), (m,), generator=g)] for r in rows])
    s = torch.rand(K, m, generator=g, dtype=torch.float64)
    wm = torch.rand(K, m, generator=g, dtype=torch.float64)
    wm[:, -3:] = 0.0                                   # padding rows: weight 0, not rows of the problem
    return X, y, w, RowMix(i, p, s, wm)


def _formed(X, mix, k):
    """Problem k's mixed rows, formed."""
    s = mix.s[k].unsqueeze(1)
    return (1 - s) * X[mix.i[k]] + s * X[mix.p[k]]


def test_up_down_hessian_and_gram_equal_the_formed_rows():
    X, y, w, mix = _problem()
    K, m = mix.K, mix.m
    N, D = X.shape
    order = torch.arange(N).expand(K, N)
    mx = mix.remap(order)
    F = X.expand(K, N, D).contiguous()
    full = torch.stack([torch.cat([X, _formed(X, mix, k)]) for k in range(K)])      # (K, N + m, D)
    v = torch.randn(K, D, dtype=torch.float64)
    u = torch.einsum("knd,kd->kn", F, v)
    assert torch.allclose(mx.up(u), torch.einsum("knd,kd->kn", full, v))
    r = torch.randn(K, N + m, dtype=torch.float64)
    # down is up's adjoint: X_full^T r == X^T down(r)
    assert torch.allclose(torch.einsum("knd,kn->kd", F, mx.down(r)), torch.einsum("knd,kn->kd", full, r))
    c = torch.rand(K, N + m, dtype=torch.float64)
    H = torch.einsum("kni,kn,knj->kij", full, c, full)
    assert torch.allclose(mx.hessian(F, c), H)
    G = torch.bmm(F, F.transpose(1, 2))
    assert torch.allclose(mx.gram(G), torch.bmm(full, full.transpose(1, 2)))


def test_moments_and_materialize_are_the_formed_training_sets():
    X, y, w, mix = _problem()
    Xs, ys, sw = mix.materialize(X, y, w)
    start = 0
    for k in range(mix.K):
        idx = torch.nonzero(w[k] > 0).flatten()
        used = torch.nonzero(mix.w[k] > 0).flatten()
        n = idx.numel() + used.numel()
        assert torch.equal(Xs[start:start + idx.numel()], X[idx])
        assert torch.allclose(Xs[start + idx.numel():start + n], _formed(X, mix, k)[used])
        assert torch.equal(ys[start + idx.numel():start + n], y[mix.i[k, used]])
        assert torch.equal(sw[k, start:start + n], torch.cat([w[k, idx], mix.w[k, used]]))
        assert float(sw[k].sum()) == pytest.approx(float(w[k].sum() + mix.w[k].sum()))
        start += n
    assert start == Xs.shape[0]
    mu, sd = mix.moments(X, w, chunk_rows=7)            # chunks smaller than a problem's rows
    assert torch.allclose(mu, Xs.mean(0)) and torch.allclose(sd, Xs.std(0, unbiased=False))


def _fit_both(X, y, w, mix, **kw):
    Xs, ys, sw = mix.materialize(X, y, w)
    Wa, ba, _ = fit_logreg(X.float(), y, 2, sample_weight=w.float(), row_mix=mix, **kw)
    Wb, bb, _ = fit_logreg(Xs.float(), ys, 2, sample_weight=sw.float(), **kw)
    return (Wa, ba), (Wb, bb)


@pytest.mark.parametrize("form", ["primal", "kernel", "lbfgs"])
def test_fit_logreg_with_row_mix_equals_the_formed_rows(form, monkeypatch):
    import repair.solver.lbfgs as LB
    import repair.solver.newton as NW

    if form == "lbfgs":
        monkeypatch.setattr(LB, "path_solver", lambda *a, **k: ("lbfgs", "test"))
    else:
        orig = NW.newton_cost
        monkeypatch.setattr(NW, "newton_cost", lambda n, d, m=0: (orig(n, d, m)[0], form))
        monkeypatch.setattr(LB, "path_solver", lambda *a, **k: ("newton", "test"))
    X, y, w, mix = _problem()
    (Wa, ba), (Wb, bb) = _fit_both(X, y, w, mix, l2=[0.5, 2.0, 8.0], tol=1e-9, max_iter=200)
    scale = float(Wb.abs().max())
    assert float((Wa - Wb).abs().max()) <= 2e-3 * scale
    assert float((ba - bb).abs().max()) <= 2e-3 * max(1.0, float(bb.abs().max()))


def test_row_mix_solvers_without_the_structure_get_the_formed_rows():
    # L1 (FISTA) and more than two classes form the mixed rows: the same heads as given formed
    X, y, w, mix = _problem()
    (Wa, ba), (Wb, bb) = _fit_both(X, y, w, mix, l1=[0.5, 2.0, 8.0], tol=1e-6, max_iter=5000)
    assert torch.allclose(Wa, Wb, atol=1e-4) and torch.allclose(ba, bb, atol=1e-4)
    y3 = (X[:, 1] > 0.5).long() + (X[:, 1] > -0.5).long()
    Xs, ys, sw = mix.materialize(X, y3, w)
    Wa, ba, _ = fit_logreg(X.float(), y3, 3, sample_weight=w.float(), row_mix=mix, l2=[1.0, 4.0, 9.0], tol=1e-6)
    Wb, bb, _ = fit_logreg(Xs.float(), ys, 3, sample_weight=sw.float(), l2=[1.0, 4.0, 9.0], tol=1e-6)
    assert torch.allclose(Wa, Wb, atol=1e-4) and torch.allclose(ba, bb, atol=1e-4)


def test_row_mix_problems_in_chunks_share_one_standardisation(monkeypatch):
    import repair.solver.fista as FI

    X, y, w, mix = _problem(K=4)
    whole = fit_logreg(X.float(), y, 2, sample_weight=w.float(), row_mix=mix, l2=[1.0, 2.0, 4.0, 8.0], tol=1e-9)
    monkeypatch.setattr(FI, "_problem_chunks", lambda X_, sw, K, C: [(0, 1), (1, 3), (3, 4)] if sw.shape[0] == 4 else None)
    chunked = fit_logreg(X.float(), y, 2, sample_weight=w.float(), row_mix=mix, l2=[1.0, 2.0, 4.0, 8.0], tol=1e-9)
    assert chunked[2]["chunks"] == 3
    assert torch.allclose(whole[0], chunked[0], atol=1e-4) and torch.allclose(whole[1], chunked[1], atol=1e-4)


def test_row_mix_bad_arguments():
    X, y, w, mix = _problem()
    with pytest.raises(ValueError):
        fit_logreg(X.float(), y, 2, row_mix=mix, l2=1.0)                        # no (K, N) weights
    with pytest.raises(ValueError):
        fit_logreg(X.float(), y, 2, sample_weight=w[:2].float(), row_mix=mix, l2=[1.0, 2.0])  # K differs
    with pytest.raises(ValueError):
        RowMix(mix.i, mix.p, mix.s, -mix.w)
    bad = RowMix(torch.zeros_like(mix.i), mix.p, mix.s, mix.w)
    w0 = w.clone()
    w0[:, 0] = 0.0                                                               # row 0 not in any problem
    with pytest.raises(ValueError, match="does not hold"):
        bad.remap(torch.stack([torch.nonzero(w0[k] > 0).flatten()[:30] for k in range(3)]))


@pytest.mark.parametrize("C", [2, 3])
@pytest.mark.parametrize("params", [{}, {"protocol": "paper", "n_refits": 3}, {"n_mix_per_example": 0},
                                    {"n_mix_per_example": 2}, {"mix_beta": 1.0}])
def test_mix_equals_mix_on_its_formed_training_sets(C, params):
    # the mix method, its mixed rows as index pairs, against the same protocol fed the formed rows
    from repair.methods import RepairInputs, get_method
    from repair.methods.dfr import run_balanced_protocol
    from repair.methods.mix import MixConfig, make_mix_builder

    g = torch.Generator().manual_seed(C)
    N, D = 400, 12
    y = torch.randint(0, C, (N,), generator=g)
    a = torch.randint(0, 2, (N,), generator=g)
    X = torch.randn(N, D, generator=g)
    X[:, 0] += y.float()
    X[:, 1] += 2 * a.float()
    inputs = RepairInputs(X=X, y=y, W=torch.randn(C, D, generator=g) * 0.1, b=torch.zeros(C), groups=y * 2 + a,
                          seed=0, device="cpu")
    cfg = MixConfig(**params)
    out = get_method("mix")(inputs, cfg)
    build = make_mix_builder(cfg)

    def formed(*args):
        Xb, yb, w, mix = build(*args)
        return (*mix.materialize(Xb, yb, w), None)      # the same training sets, formed: no RowMix

    ref = run_balanced_protocol(inputs, cfg, formed, "mix")
    assert out.diagnostics["chosen"] == ref.diagnostics["chosen"]
    assert out.diagnostics["final_rows_per_refit"] == ref.diagnostics["final_rows_per_refit"]
    assert float((out.W - ref.W).abs().max()) <= 1e-3 * float(ref.W.abs().max())
    assert float((out.b - ref.b).abs().max()) <= 1e-3 * max(1.0, float(ref.b.abs().max()))


def test_problems_whose_mixed_rows_are_formed_are_solved_a_chunk_at_a_time(monkeypatch):
    """With more than two classes the mixed rows are formed, one block per problem, disjoint: batched
    on every problem's rows at once (the shared layout) each problem read K times its rows -- 16,000 rows
    of 96 features took 10 s against 1.4 s for 8,000. Problems whose blocks exceed the budget are solved
    a chunk at a time, each chunk's blocks read per problem: the same heads."""
    import repair.solver.fista as F

    X, y, w, mix = _problem(K=4, N=80, m=50)
    y3 = (X[:, 2] > 0.4).long() + y                      # three classes
    kw = dict(sample_weight=w.float(), row_mix=mix, l2=[1.0, 2.0, 4.0, 8.0], tol=1e-7, max_iter=5000)
    W0, b0, info0 = F.fit_logreg(X.float(), y3, 3, **kw)
    assert "chunks" not in info0                         # small: all at once
    per = int(((w > 0).sum(1) + (mix.w > 0).sum(1)).max()) * X.shape[1] * 4
    monkeypatch.setattr(F, "_MIN_BUDGET", 2 * per)       # as if each block were large: two per chunk
    assert F._formed_rows_chunks(X, w, mix) == [(0, 2), (2, 4)]
    W1, b1, info1 = F.fit_logreg(X.float(), y3, 3, **kw)
    assert info1["chunks"] == 2
    assert torch.allclose(W0, W1, atol=1e-3, rtol=1e-3) and torch.allclose(b0, b1, atol=1e-3, rtol=1e-3)
    # two classes with smooth penalties never form them: no chunks of that kind
    assert not F._forms_mixed_rows(2, 0.0, "auto") and F._forms_mixed_rows(3, 0.0, "auto")
    # problems L-BFGS solves one at a time anyway (each from the previous one's solution) are not split:
    # they keep the path bench/RESULTS.md measured (10 classes, 50,000 x 2,048)
    assert F._formed_rows_chunks(X, w, mix, 3, 0.0, 1.0, None, "lbfgs") is None
    monkeypatch.setattr(F, "SOFTMAX_LBFGS_WORK", 1)
    assert F._formed_rows_chunks(X, w, mix, 3, 0.0, 1.0, None, "auto") is None
    assert F._formed_rows_chunks(X, w, mix, 3, 0.5, 1.0, None, "auto") == [(0, 2), (2, 4)]     # L1: FISTA
