"""Small dense L2 problems (DFR's fast protocol): binary logistic regressions along a
warm-started penalty path by damped Newton, primal or Gram-matrix form:
:func:`fit_binary_l2_path`."""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch

from .. import threads

Tensor = torch.Tensor


#: :func:`binary_heads`'s stopping rule at :func:`repair.solver.fit_logreg`'s default ``tol`` (1e-4):
#: the Newton decrement per unit of sample weight (see :func:`heads_tol`)
HEADS_TOL = 1e-7
#: the default ``tol`` of :func:`repair.solver.fit_logreg` that :data:`HEADS_TOL` stands for
FIT_LOGREG_TOL = 1e-4
#: most Newton steps :func:`binary_heads` takes (L-BFGS: ``ITERS_PER_NEWTON_STEP`` iterations per step)
HEADS_MAX_ITER = 100


def heads_tol(tol: float) -> float:
    """:func:`repair.solver.fit_logreg`'s ``tol`` as the stopping rule of its two-class smooth path
    (:func:`binary_heads`: Newton, or L-BFGS on large problems).

    ``fit_logreg``'s ``tol`` bounds the largest gradient entry of the *mean* objective; Newton stops
    on the decrement ``g^T H^-1 g / 2`` per unit weight (the predicted objective gap), which for a
    gradient of size ``g`` along a direction of curvature ``h`` is ``g^2 / (2 h)``: quadratic in the
    gradient. So the rule scales as ``tol^2``, calibrated so that the default ``tol`` (1e-4) is
    :data:`HEADS_TOL` (1e-7), the rule this path always used (heads at the default settings are
    unchanged): ``10 tol^2`` (tol 1e-3: 1e-5, tol 1e-5: 1e-9). :func:`binary_heads` asks no route for
    less than it reaches (:data:`TOL_FLOOR`), and L-BFGS caps its tolerance at
    :data:`repair.solver.lbfgs.MAX_TOL` (a looser quasi-Newton certificate measured worse)."""
    return HEADS_TOL * (float(tol) / FIT_LOGREG_TOL) ** 2


#: the tightest decrement per unit weight each route of :func:`binary_heads` is asked for, with the
#: data in float32 / float64: below it round-off stops the iterations short of the rule and they
#: only run to the cap (measured on pulled, weakly penalised, n < d and separable problems: Newton
#: reached 1e-14 / 1e-18 on all of them and failed 1e-16 / 1e-20 on one; L-BFGS reached 1e-7 / 1e-14
#: and failed 1e-9 / 1e-16). A caller's tighter ``tol`` gets these; the default (1e-7) is above all
TOL_FLOOR = {("newton", False): 1e-12, ("newton", True): 1e-16, ("lbfgs", False): 1e-7, ("lbfgs", True): 1e-12}


def _reachable(tol: float, solver: str, dtype: torch.dtype) -> float:
    """``tol`` no tighter than :data:`TOL_FLOOR` for ``solver`` on data of ``dtype``."""
    return max(float(tol), TOL_FLOOR[(solver, dtype == torch.float64)])


def newton_cost(n: int, d: int, mixed_rows: int = 0) -> tuple:
    """(multiply-adds per Newton iteration, form) of :func:`fit_binary_l2_path` for ``n``
    rows and ``d`` features: the primal form builds a (d+1)^2 Hessian (``n d^2``),
    the kernel form factors an ``n x n`` system (``n^3 / 3``). ``mixed_rows`` that are not
    formed (:class:`repair.solver.mixing.RowMix`) add nothing to the primal Hessian's product
    and their count to the kernel form's system."""
    primal = n * (d + 1) ** 2 + (d + 1) ** 3 / 3.0
    nk = n + mixed_rows
    kernel = nk ** 3 / 3.0 + 2.0 * nk * nk
    return (primal, "primal") if primal <= kernel else (kernel, "kernel")


def fit_binary_l2_path(Z: Tensor, t: Tensor, w: Tensor, l2: Sequence[float], *,
                       tol: float = 1e-4, max_iter: int = 50, form: str = "auto",
                       factor_dtype: torch.dtype = torch.float32,
                       num_threads: Union[str, int, None] = "auto", offset=None, mix=None):
    """Binary L2 logistic regressions for a path of penalties, ``K`` problems batched.

    Problem ``k`` at penalty ``l2[j]`` (sklearn's binary convention, ``l2 = 1/C``)::

        min_{v, c}  sum_i w_ki * (log(1 + exp(u_i)) - t_ki u_i) + l2[j] / 2 * ||v||^2,
        u = Z_k v + c                       (intercept ``c`` not penalised)

    ``Z`` (K, n, d) features (used as given: standardise beforehand), ``t`` (K, n)
    0/1 targets, ``w`` (K, n) non-negative weights (0 = padding row), ``l2`` the path
    ((L,), or (L, K): a penalty per problem at every path point), solved in the given
    order with warm starts (give it decreasing: strong penalty first, every solution then
    starts next to the previous one). ``offset`` (K, n): fixed logit offsets added to
    ``Z_k v + c`` (``offset = Z_k v0`` centres the penalty at ``v0``: ``v`` is then the
    deviation from it). ``mix`` (:class:`repair.solver.mixing.RowMix`, indices into each
    problem's ``n`` rows): every problem also has these mixed rows, never formed (their targets
    those of their first row, their weights ``mix.w``); ``t`` and ``w`` stay (K, n).

    Damped Newton with a lazily refreshed Hessian: the Hessian is factored at the
    start of every path point (the warm start) and again only when a step was damped
    or reduced the Newton decrement by less than 4x; other steps reuse the
    factorisation (chord steps: two thin matrix-vector products). The path starts
    from the intercept-only model.
    Armijo backtracking on the exact objective (logits and penalty are updated in
    closed form, no extra data pass). A path point is done when the Newton decrement
    ``g^T H^-1 g / 2`` (the predicted objective gap) is ``<= tol * sum_i w_ki`` for
    every problem; that last (small) step is still taken, without a line search. The
    curvature of saturated rows is floored at ``1e-12 * w`` (keeps float32
    factorisations free of slow denormals).

    Two equivalent parametrisations (``form``): ``"primal"`` factors the
    ``(d+1)x(d+1)`` Hessian, ``"kernel"`` writes ``v = Z^T alpha`` (the representer
    theorem: exact for an L2 penalty) and factors ``n x n`` systems built from the
    Gram matrix ``Z Z^T`` (computed once), with the intercept eliminated exactly
    (Woodbury + Schur complement). ``"auto"`` picks the cheaper (:func:`newton_cost`):
    kernel when ``n`` is small next to ``d``. Data products run in ``Z``'s dtype, the
    Hessian factorisations in ``factor_dtype`` (float32 by default: the step only needs
    to be a good Newton step, the float64 gradient and line search keep the iterates
    exact; a factorisation that fails in float32 is redone in float64), the iterates
    and the objective in float64.

    Returns ``(v (K, L, d), c (K, L), info)`` float64; ``info`` has ``form``,
    ``n_iter`` (L,) (Newton steps per path point), ``n_factor`` (L,) (Hessian
    factorisations), ``converged`` (L,) and ``seconds``.
    """
    Z = torch.as_tensor(Z)
    if Z.dim() != 3:
        raise ValueError("Z must be (K, n, d)")
    K, n, d = Z.shape
    cost, auto_form = newton_cost(n, d, 0 if mix is None else mix.m)
    form = auto_form if form == "auto" else form
    if form not in ("primal", "kernel"):
        raise ValueError(f"form must be auto/primal/kernel, got {form!r}")
    with threads.for_small_work(K * cost, Z.device, num_threads, small=2e8):
        return _binary_l2_path(Z, t, w, l2, tol, max_iter, form, factor_dtype, offset, mix)


def _cholesky(M: Tensor) -> Tensor:
    """Cholesky factor of a batch of SPD matrices, redone in float64 if it fails."""
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()) or not bool(torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()):
        L = torch.linalg.cholesky(M.double()).to(M.dtype) if M.dtype != torch.float64 else \
            torch.linalg.cholesky(M)
        if not bool(torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()):
            L = torch.linalg.cholesky(M.double())
    return L


def _binary_l2_path(Z, t, w, l2, tol, max_iter, form, cdt, offset=None, mix=None):
    t0 = time.perf_counter()
    K, n, d = Z.shape
    dev, xdt = Z.device, Z.dtype
    vdt = torch.float64                          # iterates, objective, gradient
    slack = 16.0 * torch.finfo(vdt).eps
    t = torch.as_tensor(t).to(dev, vdt).reshape(K, n)
    w = torch.as_tensor(w).to(dev, vdt).reshape(K, n)
    if mix is not None:
        # the mixed rows' targets (their first row's) and weights appended: from here on a problem
        # has n + m rows, of which only the first n are formed (up / down map between the two)
        mix = mix.to(dev)
        t, w = mix.labels(t, w)
        if offset is not None:
            offset = mix.up(torch.as_tensor(offset).to(dev, vdt).reshape(K, n))
        up, down = mix.up, mix.down
    else:
        up = down = lambda v: v
    n_all = t.shape[1]
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    Sw = w.sum(1)
    if bool((Sw <= 0).any()):
        raise ValueError("every problem needs a positive total weight")
    L2 = torch.as_tensor(l2, dtype=vdt).to(dev)
    if L2.dim() == 1:
        L2 = L2.view(-1, 1).expand(-1, K)                # (L, K): one penalty per path point and problem
    if L2.numel() == 0 or bool((L2 <= 0).any()) or L2.shape[1] != K:
        raise ValueError("the l2 path must be non-empty and positive, (L,) or (L, K)")
    lams = list(L2)
    gtol = 2.0 * float(tol) * Sw                     # on the decrement g^T H^-1 g
    kernel = form == "kernel"
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    false = torch.zeros((), dtype=torch.bool, device=dev)

    def loss(uu):                                    # sum_i w_i (softplus(u_i) - t_i u_i)
        return bce(uu, t, weight=w, reduction="none").sum(1)

    # start at the intercept-only model (the solution for an infinite penalty)
    m = ((w * t).sum(1) / Sw).clamp(1e-6, 1.0 - 1e-6)
    c = torch.log(m / (1.0 - m))
    u = c.unsqueeze(-1).expand(K, n_all).clone()     # logits
    if offset is not None:                           # fixed per-row logit offsets (a penalty centre)
        u = u + torch.as_tensor(offset).to(dev, vdt).reshape(K, n_all)
    if kernel:
        G = torch.bmm(Z, Z.transpose(1, 2))                    # (K,n,n) Gram, once
        if mix is not None:
            G = mix.gram(G)                                    # of the n + m rows
        Gc = G.to(cdt)
        theta = torch.zeros(K, n_all, device=dev, dtype=vdt)   # alpha (v = Z^T alpha)
        Gth = torch.zeros(K, n_all, device=dev, dtype=vdt)     # G alpha
        Gmv = lambda x: torch.bmm(x.to(xdt).unsqueeze(1), G).squeeze(1).to(vdt)   # G x (symmetric)
    else:
        F = torch.cat([Z, torch.ones(K, n, 1, device=dev, dtype=xdt)], 2)   # intercept column
        Ft = F.transpose(1, 2).contiguous()                             # (K,d+1,n)
        mask = torch.ones(d + 1, device=dev, dtype=vdt)
        mask[-1] = 0.0
        theta = torch.zeros(K, d + 1, device=dev, dtype=vdt)   # [v, c]
        theta[:, -1] = c
        # row-vector products: thin (K,1,m) x (K,m,p) batched GEMMs are the fast path
        fwd = lambda x: up(torch.bmm(x.to(xdt).unsqueeze(1), Ft).squeeze(1).to(vdt))     # F x
        adj = lambda x: torch.bmm(down(x).to(xdt).unsqueeze(1), F).squeeze(1).to(vdt)    # F^T x

    thetas, cs, n_iter, n_fac, conv_all = [], [], [], [], []
    for lam in lams:
        if kernel:
            lamk = lam.view(K, 1)
            pen = lambda th, Gt: (0.5 * lam) * (th * Gt).sum(1)
            f = loss(u) + pen(theta, Gth)
        else:
            lmask = lam.view(K, 1) * mask
            pen = lambda th, _: 0.5 * (th * th * lmask).sum(1)
            f = loss(u) + pen(theta, None)
        fac = None
        last_dec = None
        it = nf = 0
        converged = False
        while it < max_iter:
            it += 1
            p = torch.sigmoid(u)
            r = (p - t).mul_(w)
            if fac is None:
                # Hessian at the current point (every path point starts with one)
                nf += 1
                # curvature; floored far below any other term so that the float32
                # factorisation never meets denormal numbers (saturated rows), which
                # are ~100x slower on CPUs
                s0 = w * (p * (1.0 - p)).clamp_min_(1e-12)
                if kernel:
                    sq = s0.sqrt()
                    sqc = sq.to(cdt)
                    M = (Gc * sqc.unsqueeze(-1)).mul_(sqc.unsqueeze(1))      # S0^1/2 G S0^1/2
                    M.diagonal(dim1=1, dim2=2).add_(lamk.to(M.dtype))
                    L = _cholesky(M)
                    # P = lam I + S0 G,  P^-1 x = (x - S0^1/2 M^-1 S0^1/2 G x) / lam
                    Pinv = lambda x: (x - sq * torch.cholesky_solve((sq * Gmv(x)).to(L.dtype).unsqueeze(-1), L)
                                      .squeeze(-1).to(vdt)) / lamk
                    s0G = Gmv(s0)
                    Ps = Pinv(s0)
                    den = (s0.sum(1) - (s0G * Ps).sum(1)).clamp_min(1e-12 * Sw)
                    fac = True
                else:
                    if mix is None:
                        H = torch.bmm(Ft * s0.to(xdt).unsqueeze(1), F).to(cdt)
                    else:
                        H = mix.hessian(F, s0).to(cdt)
                    H.diagonal(dim1=1, dim2=2).add_(lmask.to(cdt))
                    H[:, -1, -1] += (1e-10 * Sw).to(cdt)                  # all-zero-curvature guard
                    fac = _cholesky(H)
            if kernel:
                a = r + lamk * theta                                 # gradient, alpha space
                Pa = Pinv(a)
                sr = r.sum(1)
                dc = ((s0G * Pa).sum(1) - sr) / den                  # intercept: Schur complement
                dth = -Pa - Ps * dc.unsqueeze(-1)
                dG = Gmv(dth)
                du = dG + dc.unsqueeze(-1)
                dec = -(a * dG).sum(1) - sr * dc                     # -g^T step
            else:
                g = adj(r).add_(lmask * theta)
                dth = torch.cholesky_solve(g.to(fac.dtype).unsqueeze(-1), fac).squeeze(-1).to(vdt).neg_()
                du = fwd(dth)
                dec = -(g * dth).sum(1)
            descent, done = torch.stack([(dec >= 0).all(), (dec <= gtol).all()]).tolist()
            if not descent:
                # not a descent direction (a poor float32 factorisation): refactor the
                # Hessian here in float64 (for the rest of the call) and retry the step
                if cdt != torch.float64:
                    cdt = torch.float64
                    if kernel:
                        Gc = G.to(cdt)
                    fac = None
                    it -= 1
                    continue
                dec = dec.clamp_min(0.0)
            if done:
                # converged: the (tiny) Newton step is taken without a line search
                theta, u = theta + dth, u + du
                if kernel:
                    Gth, c = Gth + dG, c + dc
                converged = True
                break
            # full step; Armijo backtracking (per problem) only if it fails
            thn, un = theta + dth, u + du
            Gn = Gth + dG if kernel else None
            fn = loss(un) + pen(thn, Gn)
            ok = fn <= f - 1e-4 * dec + slack * f.abs()
            stall = (dec > 0.25 * last_dec).any() if last_dec is not None else false
            all_ok, stalled = torch.stack([ok.all(), stall]).tolist()
            step = None
            if not all_ok:
                step = torch.where(ok, 1.0, 0.5).to(vdt)
                for _ls in range(40):
                    sv = step.unsqueeze(-1)
                    thn, un = theta + sv * dth, u + sv * du
                    Gn = Gth + sv * dG if kernel else None
                    fn = loss(un) + pen(thn, Gn)
                    bad = ~(fn <= f - 1e-4 * step * dec + slack * f.abs())
                    if not bool(bad.any()):
                        break
                    step = torch.where(bad, 0.5 * step, step)
            theta, u, f = thn, un, fn
            if kernel:
                Gth = Gn
                c = c + (dc if step is None else step * dc)
            # refresh the Hessian when a step was damped or the chord steps stall
            if step is not None or stalled:
                fac = None
            last_dec = dec
        n_iter.append(it)
        n_fac.append(nf)
        conv_all.append(converged)
        thetas.append(theta)
        cs.append(c if kernel else theta[:, -1])
    TH = torch.stack(thetas, 1)                                    # (K,L,n|d+1)
    if kernel:
        if mix is not None:                                         # alpha of the n + m rows -> n
            TH = torch.stack([down(TH[:, j]) for j in range(TH.shape[1])], 1)
        V = torch.bmm(TH.to(xdt), Z).to(vdt)                        # v = Z^T alpha
    else:
        V = TH[:, :, :-1]
    info = {"form": form, "n_iter": n_iter, "n_factor": n_fac, "converged": conv_all,
            "seconds": time.perf_counter() - t0}
    return V, torch.stack(cs, 1), info


def _same_rows(m) -> bool:
    """``m`` is None or (K, D) with every row equal (one map shared by all problems)."""
    return m is None or bool((m == m[:1]).all())


def _internal_logits(Z: Tensor, W: Tensor, b: Tensor, scale, shift) -> Tensor:
    """(K, N, C) float64 logits of internal heads W (K, C, D), b (K, C) on ``x~ = x*scale + shift``
    (one map, rows of ``scale``/``shift`` equal), without forming ``x~``."""
    K, C, D = W.shape
    M = W.reshape(K * C, D).double()
    a = None if scale is None else scale[0].double()
    sh = None if shift is None else shift[0].double()
    Me = M if a is None else M * a
    off = b.reshape(K * C).double() + (0.0 if sh is None else M @ sh)
    lg = torch.addmm(off.to(Z.dtype).unsqueeze(0), Z, Me.to(Z.dtype).T).double()     # (N, K*C)
    return lg.view(-1, K, C).transpose(0, 1)


def _pull_center(l2: Tensor, pull: Tensor, Wref) -> Optional[Tensor]:
    """(K, D) float64 centre ``v_k`` of each binary problem's penalty (see :func:`binary_heads`), or
    None without a reference head."""
    if Wref is None:
        return None
    return (pull / (l2 + pull)).view(-1, 1) * (Wref[:, 1] - Wref[:, 0]).double()


def _two_class_heads(V: Tensor, c: Tensor, center, Wref, bref, lg_of, y_k: Tensor, w: Tensor, l2: Tensor,
                     pull: Tensor, info: dict, solver: str) -> tuple:
    """:func:`binary_heads`'s result from binary solutions ``V`` (K, D) (deviations from ``center``),
    ``c`` (K,): the two-class heads ``[m - v/2, m + v/2]`` and their multinomial objective (sklearn
    scale, internal coordinates); ``lg_of(W, b)`` gives the (K, n, 2) logits on the problems' rows."""
    K, D = V.shape
    dev = V.device
    v = V if center is None else V + center
    m = torch.zeros(K, D, dtype=torch.float64, device=dev) if Wref is None else 0.5 * (Wref[:, 0] + Wref[:, 1]).double()
    mb = torch.zeros(K, dtype=torch.float64, device=dev) if bref is None else 0.5 * (bref[:, 0] + bref[:, 1]).double()
    W = torch.stack([m - v / 2, m + v / 2], 1)
    b = torch.stack([mb - c / 2, mb + c / 2], 1)
    lg = lg_of(W, b)
    ce = torch.logsumexp(lg, -1) - lg.gather(-1, y_k.unsqueeze(-1)).squeeze(-1)
    obj = (ce * w.double()).sum(1) + 0.5 * l2 * (W * W).sum((1, 2))
    if Wref is not None:
        obj = obj + 0.5 * pull * ((W - Wref.double()) ** 2).sum((1, 2))
    it = int(sum(info["n_iter"]))
    return W.float(), b.float(), {"n_iter": [it] * K, "converged": [bool(all(info["converged"]))] * K,
                                  "objective": obj.cpu().tolist(), "form": info["form"], "solver": solver}


def _shared_rows_lbfgs(Z, y, w, l2, pull, Wref, bref, scale, shift, tol, max_iter):
    """:func:`binary_heads` for problems that share all rows and the feature map, by L-BFGS on
    ``Z`` as given (one block, a column per problem; the pull as fixed logit offsets)."""
    from .lbfgs import ITERS_PER_NEWTON_STEP, fit_binary_l2_path_lbfgs

    K, N = w.shape
    dt = Z.dtype
    l2, pull = l2.double(), pull.double()
    center = _pull_center(l2, pull, Wref)
    offset = None
    if center is not None:                                   # x~ . center for every row: (N, K)
        offset = _internal_logits(Z, center.unsqueeze(1), torch.zeros(K, 1, dtype=torch.float64, device=Z.device),
                                  scale, shift)[:, :, 0].T.to(dt)
    tgt = (y == 1).to(dt).view(N, 1).expand(N, K)
    V, cl, info = fit_binary_l2_path_lbfgs(Z, [(0, N)], tgt, w.T.to(dt), ((l2 + pull) / 2.0).view(1, 1, K),
                                           scale=None if scale is None else scale[0],
                                           shift=None if shift is None else shift[0], offset=offset,
                                           tol=_reachable(tol, "lbfgs", dt),
                                           max_iter=ITERS_PER_NEWTON_STEP * max_iter)
    return _two_class_heads(V[0, :, 0].double(), cl[0, :, 0], center, Wref, bref,
                            lambda W, b: _internal_logits(Z, W, b, scale, shift), y.view(1, N).expand(K, N), w,
                            l2, pull, info, "lbfgs")


def binary_heads(Z: Tensor, y: Tensor, w: Tensor, l2: Tensor, pull: Tensor, Wref=None, bref=None,
                 scale=None, shift=None, tol: float = HEADS_TOL, max_iter: int = HEADS_MAX_ITER, row_mix=None):
    """Two-class multinomial heads with smooth penalties, solved as binary problems by Newton.

    The multinomial objective of :func:`repair.solver.fit_logreg` for two classes,
    ``sum_i w_ki CE_i + l2_k/2 ||W||^2 + pull_k/2 ||W - Wref_k||^2``, depends on the predictions
    only through ``v = w_1 - w_0``: its minimiser is ``W = [m - v/2, m + v/2]`` with ``m`` the mean
    row of ``Wref`` (0 without a reference), where ``v`` solves the binary logistic regression
    with penalty ``(l2_k + pull_k)/4 ||v - v_k||^2``, ``v_k = pull_k / (l2_k + pull_k) (Wref_1 -
    Wref_0)``. ``Z`` (N, D) are the (internal) features, ``scale``/``shift`` (K, D) optional
    per-problem feature maps, ``w`` (K, N) sample weights, ``row_mix``
    (:class:`repair.solver.mixing.RowMix`, indices into ``Z``'s rows) mixed rows each problem also
    has, never formed. ``tol``: the Newton decrement per unit weight at which a problem is done
    (:func:`heads_tol` maps ``fit_logreg``'s ``tol`` to it; no route is asked for less than
    :data:`TOL_FLOOR`); ``max_iter``: most Newton steps (L-BFGS gets ``ITERS_PER_NEWTON_STEP``
    iterations per step). Returns internal ``(W (K,2,D), b (K,2), info)``; the intercept is not
    pulled."""
    K, N = w.shape
    D = Z.shape[1]
    if row_mix is not None and (Wref is not None or bool((pull > 0).any())):
        raise ValueError("mixed rows with a pull to a reference head are not supported")
    # each problem's rows with positive weight only (subsamples: a fraction of N), padded
    pos = w > 0
    M = int(pos.sum(1).max())
    if row_mix is None and M == N and _same_rows(scale) and _same_rows(shift):
        # every problem on all rows with one feature map (AFR's gamma x pull grid): L-BFGS passes over
        # the rows once for all problems (one GEMM), with no copy; Newton needs a copy per problem
        from .lbfgs import path_solver

        if path_solver(N, D, K, 4.0 * Z.numel(), blocks=1, shared=True)[0] == "lbfgs":
            return _shared_rows_lbfgs(Z, y, w, l2, pull, Wref, bref, scale, shift, tol, max_iter)
    order = None
    if M < N:
        order = torch.argsort(pos.to(torch.int8), dim=1, descending=True, stable=True)[:, :M]   # (K, M)
        w = w.gather(1, order)
        y_k = y.view(1, N).expand(K, N).gather(1, order)
        Xk = Z.index_select(0, order.flatten()).view(K, M, D)
    else:
        y_k = y.view(1, N).expand(K, N)
        Xk = Z.unsqueeze(0).expand(K, N, D)
    mix = None
    if row_mix is not None:                                  # indices into each problem's own rows
        rows = order if order is not None else torch.arange(N, device=Z.device).expand(K, N)
        mix = row_mix.to(Z.device).remap(rows)
    owned = M < N                                            # Xk is our own copy: map it in place
    N = Xk.shape[1]
    if scale is not None:
        Xk = Xk.mul_(scale.unsqueeze(1)) if owned else Xk * scale.unsqueeze(1)
        owned = True
    if shift is not None:
        Xk = Xk.add_(shift.unsqueeze(1)) if owned else Xk + shift.unsqueeze(1)
    Xk = Xk.contiguous()
    l2, pull = l2.double(), pull.double()
    lam = (l2 + pull) / 2.0                                  # binary convention: sklearn multinomial / 2
    center = _pull_center(l2, pull, Wref)
    offset = None if center is None else torch.bmm(Xk, center.to(Xk.dtype).unsqueeze(-1)).squeeze(-1)
    tgt = (y_k == 1).to(Xk.dtype)
    from .lbfgs import fit_binary_l2_path_lbfgs, path_solver, ITERS_PER_NEWTON_STEP

    m = 0 if mix is None else mix.m
    # Newton or L-BFGS is decided as for the formed rows (the estimates are calibrated on formed
    # rows; both solvers then run cheaper with the structure): deciding on the rows alone moved
    # coloured MNIST's mix (1,280 features) from L-BFGS to Newton's Gram form, 0.44 -> 0.67 s, and
    # SST-2's small fold problems (384 features) from Newton to L-BFGS, 4x slower
    formed = 4.0 * (Z.numel() if mix is None else K * (N + m) * D)
    solver = "newton" if offset is not None else path_solver(N + m, D, K, formed)[0]
    if solver == "lbfgs":
        # every problem's rows are one block of the (K*N, D) copy already made (no pull: no offsets)
        Vl, cl, info = fit_binary_l2_path_lbfgs(Xk.view(K * N, D), [(k * N, (k + 1) * N) for k in range(K)],
                                                tgt.reshape(-1, 1), w.reshape(-1).to(Xk.dtype), lam.view(1, K),
                                                tol=_reachable(tol, "lbfgs", Xk.dtype),
                                                max_iter=ITERS_PER_NEWTON_STEP * max_iter,
                                                mix=None if mix is None else [mix.take(k, k + 1) for k in range(K)])
        V, c = Vl[:, 0].double(), cl[:, 0]
    else:
        V, c, info = fit_binary_l2_path(Xk, tgt, w, lam.view(1, K), tol=_reachable(tol, "newton", Xk.dtype),
                                        max_iter=max_iter, offset=offset, num_threads=None, mix=mix)

    def logits(W, b):                                        # (K, rows, 2) on every row, mixed ones too
        lg = torch.bmm(Xk.double(), W.transpose(1, 2)) + b.unsqueeze(1)
        return lg if mix is None else torch.stack([mix.up(lg[..., j]) for j in range(lg.shape[-1])], -1)

    if mix is not None:
        y_k, w = mix.labels(y_k, w)
    return _two_class_heads(V[:, 0], c[:, 0], center, Wref, bref, logits, y_k, w, l2, pull, info, solver)
