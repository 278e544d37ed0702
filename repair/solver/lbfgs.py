"""Large dense L2 problems: binary logistic regressions along a warm-started penalty path by
batched L-BFGS on the data as given: :func:`fit_binary_l2_path_lbfgs`.

The damped-Newton path of :mod:`.newton` builds a ``(d+1)^2`` Hessian per problem (``n d^2``
multiply-adds) or an ``n x n`` Gram system, and needs every problem's rows as a copy
``(K, n, d)``. At 50,000 x 2,048 that Hessian is what costs, and the copies are what fill the
memory. Here an iteration costs two passes over the rows (``X d`` for the search direction,
``X^T r`` for the gradient), the line search is free (the logits are linear in the step, so
``u + a X d`` is evaluated for any step ``a`` without touching the data), the standardisation is
folded into the parameters (``x~ = x * scale + shift`` is never formed) and the problems of a
block of rows share one GEMM: no copy of the data is made.

:func:`path_solver` is the switch rule between the two (measured crossover, see its docstring).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

#: history pairs kept per problem (fewer when they would not fit :data:`HISTORY_BYTES`)
MEMORY = 10
#: history pairs kept per problem on blocks of at least :data:`LONG_MEMORY_VALUES` values: there a
#: pass over the rows costs far more than the two-loop recursion's extra pairs, and the longer
#: memory (with the curvature carried along the path) needs fewer passes. On the 50,000 x 2,048
#: scale problem (two blocks of 12,437 rows, nine path points): 173 iterations with 10 pairs, 132
#: with 20 (133 with 30), 2.4 -> 1.9 s; on the visible tasks' AFR grids (a few thousand rows of
#: 384-512 features, 24 problems) the extra pairs cost more than the passes they save
LONG_MEMORY = 20
LONG_MEMORY_VALUES = 2 ** 23
#: bytes the L-BFGS histories of one block may take (the live pairs and their record carried along the path)
HISTORY_BYTES = 128 * 1024 ** 2
#: L-BFGS iterations budgeted per Newton step of the caller's ``max_iter``
ITERS_PER_NEWTON_STEP = 10
#: bytes one float64 ``(problems, d + 1)`` parameter tensor may take: a block's problems are solved
#: in groups of at most this many columns, one group after the other. The solver holds some twenty
#: tensors of that shape (iterates, gradients, directions, the two-loop's temporaries) besides the
#: histories, so this bounds its state at ~20 x 4 MiB whatever the number of problems (1,000
#: one-vs-rest problems on 2,048 features were ~16 MiB each, ~1 GB together); the passes over the
#: rows cost the same in total (GEMMs ``n x d x P`` summed over the groups)
GROUP_STATE_BYTES = 4 * 1024 ** 2


def lbfgs_cost(n: int, d: int, problems: int = 1, iters: int = 30) -> float:
    """Rough multiply-adds of one path point of :func:`fit_binary_l2_path_lbfgs`: ``iters``
    iterations of two passes over ``n x d`` rows for ``problems`` outputs."""
    return 2.0 * iters * n * d * problems


#: how many times slower per multiply-add a thin pass runs than a Newton factorisation's GEMMs
#: (a large-matrix GEMV is memory bound; rows that fit in cache are not). Calibrated on the 2-core
#: benchmark machine, one thread: ``bench/scale.py``'s crossover table (synthetic problems) and
#: ``mix``'s fits on the visible tasks' embeddings (ten 2,000 x 384 subsample problems: Newton
#: 0.43 s, L-BFGS 1.6 s at 164 iterations, block by block; batching the blocks into one GEMM was
#: slower still: a batched GEMV over rows that do not fit the cache is memory bound)
THIN_PENALTY = 2.0
#: fixed cost of one L-BFGS iteration over one block of rows (some forty small tensor operations,
#: ~0.5 ms), in Newton-GEMM multiply-adds (~3e10 a second on one core): paid once per block per
#: iteration, so it is what keeps Newton ahead on small problems and on many separate blocks
ITERATION_OVERHEAD = 1.5e7
#: iterations per path point the estimate assumes: at the tolerance that reaches Newton's optimum
#: (:data:`MAX_TOL`) L-BFGS needs 25-50 iterations on well-conditioned problems and 140-170 on the
#: weakly penalised text problems of the visible tasks; the estimate takes the slow end
ITERS_ESTIMATE = 150
#: Hessian factorisations per problem and path point Newton needs (measured 3-10 on the visible
#: tasks and the crossover problems: every damped step refactors)
NEWTON_FACTORIZATIONS = 5
#: Hessian factorisations per problem Newton needs on a grid of problems that share their rows and
#: are pulled to a reference head (AFR's gamma x pull grid, :func:`path_solver` with ``shared``):
#: measured 9-18 (median 12) on the visible tasks' grids, where L-BFGS needed 34-162 iterations
SHARED_NEWTON_FACTORIZATIONS = 12
#: how many times slower per modelled multiply-add the Gram form's batched Cholesky factorisations
#: and solves run than the primal form's Hessian GEMMs (measured 2.5x: 20 x 800 x 512 at 13 GFLOP/s
#: against 32 for 10 x 2,000 x 384 primal)
KERNEL_PENALTY = 2.5
#: the loosest stopping tolerance the path solver accepts (see fit_binary_l2_path_lbfgs)
MAX_TOL = 1e-6


def path_solver(n: int, d: int, problems: int, data_bytes: float, *, blocks: Optional[int] = None,
                budget_bytes: Optional[float] = None, newton_cost_fn=None, shared: bool = False) -> tuple:
    """``("newton" | "lbfgs", why)`` for ``problems`` binary L2 problems on ``n`` rows and
    ``d`` features each, which L-BFGS would pass over as ``blocks`` separate row blocks (None: one
    per problem; problems sharing rows share a block: dfr's one-vs-rest problems on two folds are
    two blocks).

    Newton (:func:`repair.solver.fit_binary_l2_path`) needs a per-problem copy of its rows
    (``problems * n * d`` values) and :data:`NEWTON_FACTORIZATIONS` factorisations (plus, in the
    Gram form, the ``n x n`` Gram matrix) per problem; L-BFGS needs no copy and
    :data:`ITERS_ESTIMATE` iterations of two thin passes per problem (:func:`lbfgs_cost`, a thin
    pass being :data:`THIN_PENALTY` times slower per multiply-add) plus
    :data:`ITERATION_OVERHEAD` per block and iteration. L-BFGS is chosen when Newton's copy
    would exceed ``budget_bytes`` (default: half of ``data_bytes``, the embeddings the caller
    holds) or when its estimated time is the smaller one.

    ``shared``: the problems share all ``n`` rows and one feature map and are pulled to a reference
    head (AFR's grid, one block): L-BFGS passes over the rows once per iteration for all of them as
    the columns of one GEMM (no thin-pass penalty when there are several), and Newton needs
    :data:`SHARED_NEWTON_FACTORIZATIONS`. Measured on the visible tasks' AFR grids (24 problems,
    240-500 rows of 128-1,280 features, one thread, the whole method): L-BFGS was never the slower,
    0.24 against 1.02 s on coloured MNIST (400 x 1,280), 0.15 against 0.22 s on the demo (500 x 128),
    with the same heads; the estimate without ``shared`` chose Newton on six of those eight grids."""
    from .newton import newton_cost

    cost, form = (newton_cost_fn or newton_cost)(n, d)
    copy = 4.0 * problems * n * (d + 1)
    budget = 0.5 * data_bytes if budget_bytes is None else budget_bytes
    if copy > max(budget, 64 * 1024 ** 2):
        return "lbfgs", f"Newton's per-problem copy ({copy / 2**20:.0f} MiB) exceeds the memory budget"
    kernel = form == "kernel"
    setup = float(n) * n * d if kernel else 0.0
    factorizations = SHARED_NEWTON_FACTORIZATIONS if shared else NEWTON_FACTORIZATIONS
    t_newton = problems * (factorizations * cost * (KERNEL_PENALTY if kernel else 1.0) + setup)
    nb = problems if blocks is None else int(blocks)
    thin = 1.0 if shared and problems > 1 else THIN_PENALTY
    t_lbfgs = thin * lbfgs_cost(n, d, problems, ITERS_ESTIMATE) + ITERS_ESTIMATE * ITERATION_OVERHEAD * nb
    if t_lbfgs < t_newton:
        return "lbfgs", f"L-BFGS estimated {t_newton / t_lbfgs:.1f}x cheaper than Newton ({form})"
    return "newton", f"Newton ({form}) estimated {t_lbfgs / t_newton:.1f}x cheaper than L-BFGS"


def fit_binary_l2_path_lbfgs(X: Tensor, blocks: Sequence[tuple], t: Tensor, w: Tensor, l2: Sequence[float], *,
                             scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                             offset: Optional[Tensor] = None,
                             tol: float = 1e-3, max_iter: int = 500, memory: Optional[int] = None,
                             mix: Optional[Sequence] = None):
    """Binary L2 logistic regressions along a penalty path by batched L-BFGS.

    ``X`` (n, d): the rows, used as given (any float dtype; the passes run in it). ``blocks``:
    ``B`` row ranges ``(start, stop)`` of ``X``; block ``b`` holds ``T`` problems (tasks), all
    on its rows. ``t`` (n, T) 0/1 targets, ``w`` (n,) or (n, T) non-negative row weights,
    ``l2`` (L,) the penalty path (solved in the given order, each point warm-started from the
    previous one: give it decreasing), (L, B) a path per block or (L, B, T) per problem.
    ``offset`` (n, T): fixed logit offsets added to ``x~ . v + c`` (``offset = X~ v0`` centres
    the penalty at ``v0``: ``v`` is then the deviation from it; AFR's pull to the original head). ``mix``: one
    :class:`repair.solver.mixing.RowMix` per block (one problem, indices into the block's rows):
    mixed rows the block's problem also has, never formed (targets those of their first row);
    blocks with ``mix`` hold one problem each. ``scale``/``shift`` (d,): the features are
    ``x~ = x * scale + shift`` (a folded standardisation; ``scale = 0`` with ``shift = 0`` drops
    a feature: its weight stays exactly 0). Problem ``(b, task, j)``, sklearn's binary
    convention (``l2 = 1/C``)::

        min_{v, c}  sum_{i in block b} w_i * (log(1 + exp(u_i)) - t_i u_i) + l2[j] / 2 * ||v||^2,
        u_i = x~_i . v + c                  (intercept ``c`` not penalised)

    -- the objective of :func:`repair.solver.fit_binary_l2_path` on the block's rows.

    L-BFGS (``memory`` pairs per problem, default :data:`MEMORY`, :data:`LONG_MEMORY` on blocks of
    :data:`LONG_MEMORY_VALUES` values or more; in float64, like the iterates; fewer if the histories of a
    block would exceed :data:`HISTORY_BYTES`; the data term's pairs are carried from one path point
    to the next), the iterates and objective in float64. The line search is a
    safeguarded one-dimensional Newton step on the exact objective along the direction followed
    by Armijo backtracking, all on the logits ``u + a X d`` (no data pass). A problem is done
    when ``-g^T d`` (with ``d = -H g`` the L-BFGS step: the quasi-Newton decrement, twice the
    predicted objective gap) is ``<= 2 tol sum_i w_i`` -- the stopping rule of the Newton path
    -- and so was the objective decrease of the last step (the quasi-Newton estimate alone can be
    optimistic while the history is short); a problem whose line search cannot decrease the
    objective any more (float32 round-off) stops unconverged. Converged problems leave the
    batch, so the GEMMs shrink with them. Many problems are solved in groups of columns
    (:data:`GROUP_STATE_BYTES`), which bounds the solver's state; the results do not depend on it.

    Returns ``(v (B, T, L, d) float32, c (B, T, L) float64, info)``; ``info``: ``n_iter`` (L,)
    (the most iterations of any problem per path point), ``converged`` (L,) (all problems),
    ``form`` ``"lbfgs"``, ``seconds``. ``tol`` is capped at :data:`MAX_TOL`: the quasi-Newton
    decrement is a looser certificate than Newton's, and at the Newton path's usual 1e-3 the
    solutions were measurably worse (dfr on SST-2 lost 8 points of worst-group accuracy; at 1e-6
    it matched Newton exactly).
    """
    t0 = time.perf_counter()
    tol = min(float(tol), MAX_TOL)
    X = torch.as_tensor(X)
    if X.dim() != 2:
        raise ValueError("X must be (n, d)")
    n, d = X.shape
    dev, xdt = X.device, X.dtype
    t = torch.as_tensor(t).to(dev)
    if t.dim() == 1:
        t = t.view(-1, 1)
    if t.shape[0] != n:
        raise ValueError("t must have one row per row of X")
    T = t.shape[1]
    w = torch.as_tensor(w).to(dev)
    if w.dim() == 1:
        w = w.view(-1, 1)
    if w.shape[0] != n or w.shape[1] not in (1, T):
        raise ValueError("w must be (n,) or (n, T)")
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    B = len(blocks)
    L2 = torch.as_tensor(l2, dtype=torch.float64).cpu()
    if L2.dim() == 1:
        L2 = L2.view(-1, 1).expand(-1, B)               # (L, B): one penalty per path point and block
    if L2.dim() == 2:
        L2 = L2.unsqueeze(-1).expand(-1, -1, T)         # (L, B, T): one per problem
    if L2.numel() == 0 or bool((L2 <= 0).any()) or L2.dim() != 3 or tuple(L2.shape[1:]) != (B, T):
        raise ValueError("the l2 path must be non-empty and positive, (L,), (L, blocks) or (L, blocks, tasks)")
    if offset is not None:
        offset = torch.as_tensor(offset).to(dev, xdt)
        if offset.dim() == 1:
            offset = offset.view(-1, 1)
        if offset.shape != (n, T):
            raise ValueError("offset must be (n, T)")
    a = None if scale is None else torch.as_tensor(scale).to(dev, torch.float64).flatten()
    s = None if shift is None else torch.as_tensor(shift).to(dev, torch.float64).flatten()
    if mix is not None and (len(mix) != B or T != 1 or any(mx.K != 1 for mx in mix)):
        raise ValueError("mix: one single-problem RowMix per block, one problem per block")
    L = L2.shape[0]
    V = torch.zeros(B, T, L, d, dtype=torch.float32, device=dev)
    Cb = torch.zeros(B, T, L, dtype=torch.float64, device=dev)
    n_iter = [0] * L
    conv = [True] * L
    for bi, (lo, hi) in enumerate(blocks):
        lo, hi = int(lo), int(hi)
        if not 0 <= lo < hi <= n:
            raise ValueError(f"bad block {(lo, hi)} for {n} rows")
        Xb = X[lo:hi]
        tb = t[lo:hi].to(xdt)
        wb = w[lo:hi].to(xdt)
        if bool((wb.sum(0) <= 0).any()):
            raise ValueError("every problem needs a positive total weight")
        per = max(1, int(GROUP_STATE_BYTES // (8 * (d + 1))))          # problems per group
        for g0 in range(0, T, per):
            g1 = min(T, g0 + per)
            wg = wb if wb.shape[1] == 1 else wb[:, g0:g1]
            og = None if offset is None else offset[lo:hi, g0:g1]
            lams = [L2[j, bi, g0:g1] for j in range(L)]
            mem = memory if memory is not None else LONG_MEMORY if Xb.numel() >= LONG_MEMORY_VALUES else MEMORY
            mx = None if mix is None else mix[bi].to(dev)
            _Block(Xb, tb[:, g0:g1], wg, a, s, g1 - g0, mem, og, mx).path(lams, tol, max_iter,
                                                                            V[bi, g0:g1], Cb[bi, g0:g1], n_iter, conv)
    info = {"form": "lbfgs", "n_iter": n_iter, "converged": conv, "seconds": time.perf_counter() - t0}
    return V, Cb, info


def _inverse_curvature(s: Tensor, y: Tensor) -> Tensor:
    """``1 / (s . y)`` per problem for the pairs ``s, y`` (P, d+1), or 0 (the pair is skipped by the
    two-loop recursion) where the curvature ``s . y`` is not clearly positive."""
    sy = (s * y).sum(1)
    good = sy > 1e-10 * (s * s).sum(1).sqrt() * (y * y).sum(1).sqrt()
    return torch.where(good, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))


class _Block:
    """One block of rows and its ``T`` problems; parameters ``v`` (P, d), ``c`` (P,) float64."""

    def __init__(self, X, t, w, scale, shift, T, memory, offset=None, mix=None):
        self.mix = mix                       # the block's mixed rows (RowMix, never formed), or None
        if mix is not None:                  # their targets (their first row's) and weights appended
            tl, wl = mix.labels(t.T, w.T)    # one problem (T = 1): its (n, 1) columns as a row
            t, w = tl.T, wl.T
            offset = None if offset is None else self._up(offset)
        self.X, self.t, self.w, self.a, self.s = X, t, w, scale, shift
        self.offset = offset                 # (n, T) fixed logit offsets, or None
        self.T = T
        n, d = X.shape
        self.Sw = w.sum(0, dtype=torch.float64).expand(T).clone()          # (T,)
        # a pair is two float64 (T, d+1) tensors, held twice: in the live history and in the record
        # carried to the next path point (1,000 classes in groups of 256 on 2,048 features: 7 pairs)
        per_pair = 2 * 2 * 8 * T * (d + 1)
        self.m = max(2, min(int(memory), int(HISTORY_BYTES // max(per_pair, 1))))

    # --- the linear map and its adjoint (standardisation folded in) -----------------------
    def lin(self, v: Tensor, c: Tensor) -> Tensor:
        """logits ``X~ v^T + c`` (n, P) in X's dtype for parameters v (P, d), c (P,)."""
        ve = v if self.a is None else v * self.a
        ce = c if self.s is None else c + v @ self.s
        return self._up(torch.addmm(ce.to(self.X.dtype).unsqueeze(0), self.X, ve.to(self.X.dtype).T))

    def _up(self, u: Tensor) -> Tensor:
        """(n, P) values of the block's rows -> with its mixed rows' appended."""
        return u if self.mix is None else self.mix.up(u.T).T

    def lin_T(self, R: Tensor):
        """``(X~^T R)^T`` (P, d) and ``sum R`` (P,), float64, for residuals R (n, P)."""
        if self.mix is not None:             # the mixed rows' residuals given back to their rows
            R = self.mix.down(R.T.contiguous()).T
        g = (R.T @ self.X).double()
        rs = R.sum(0, dtype=torch.float64)
        if self.a is not None:
            g = g * self.a
        if self.s is not None:
            g = g + rs.unsqueeze(1) * self.s
        return g, rs

    def _cols(self, M: Tensor, act: Optional[Tensor]):
        return M if act is None or M.shape[1] == 1 else M[:, act]

    def loss(self, u: Tensor, act) -> Tensor:
        """sum_i w_i (softplus(u_i) - t_i u_i) per problem (float64)."""
        lv = torch.nn.functional.binary_cross_entropy_with_logits(u, self._cols(self.t, act), reduction="none")
        return (lv * self._cols(self.w, act)).sum(0, dtype=torch.float64)

    def residual(self, u: Tensor, act) -> Tensor:
        return torch.sigmoid(u).sub_(self._cols(self.t, act)).mul_(self._cols(self.w, act))

    # --- the path ---------------------------------------------------------------------------
    def path(self, lams, tol, max_iter, V_out, c_out, n_iter, conv):
        T, d = self.T, self.X.shape[1]
        dev = self.X.device
        v = torch.zeros(T, d, dtype=torch.float64, device=dev)
        # start at the intercept-only model (the solution for an infinite penalty)
        Sw = self.Sw
        m = ((self.w * self.t).sum(0, dtype=torch.float64) / Sw).clamp(1e-6, 1 - 1e-6)
        c = torch.log(m / (1 - m))
        carry = None                     # logits and data gradient at (v, c): no pass to restart
        hist = None                      # the data term's curvature pairs: valid at every penalty
        for j, lam in enumerate(lams):
            v, c, it, ok, carry, hist = self.solve(v, c, lam, tol, max_iter, carry, hist)
            V_out[:, j] = v.to(V_out.dtype)
            c_out[:, j] = c
            n_iter[j] = max(n_iter[j], it)
            conv[j] = conv[j] and ok

    def solve(self, v, c, lam, tol, max_iter, carry=None, hist=None):
        """Minimise every problem at penalty ``lam`` ((T,), one per problem) from ``(v, c)``; returns the solution,
        the iterations used, whether every problem converged, the carry ``(u, data
        gradient)`` at the solution (the next path point starts from it without a data pass) and
        the history ``(s, y_data)`` (m, T, d+1): each problem's last curvature pairs of the *data
        term* (its gradient differences without the penalty), oldest first, zero-padded at the
        front. The penalty is quadratic, so ``y_data + lam' s`` (intercept unpenalised) is an exact
        secant pair of the objective at any penalty ``lam'``: the next path point starts with the
        curvature learnt here instead of a steepest-descent step (on the 50,000 x 2,048 scale
        problem, both blocks: 194 -> 173 iterations over the nine path points with 10 pairs)."""
        T = self.T
        dev = v.device
        gtol = 2.0 * float(tol) * self.Sw                      # on -g^T d (twice the predicted gap)
        out_v, out_c = v.clone(), c.clone()
        done = torch.zeros(T, dtype=torch.bool)
        converged = torch.zeros(T, dtype=torch.bool)
        act = torch.arange(T, device=dev)
        lam = torch.as_tensor(lam, dtype=torch.float64).to(dev).expand(T).clone()   # the active problems' (Pa,)
        if carry is None:
            u = self.lin(v, c)
            if self.offset is not None:
                u = u + self.offset
            gv, gc = self.lin_T(self.residual(u, None))
        else:
            u, gv, gc = carry
        out_u, out_gv, out_gc = u.clone(), gv.clone(), gc.clone()
        f = self.loss(u, None) + 0.5 * lam * (v * v).sum(1)
        gv = gv + lam.unsqueeze(1) * v

        m = self.m
        out_S = torch.zeros(m, T, v.shape[1] + 1, dtype=torch.float64, device=dev)
        out_Yd = torch.zeros_like(out_S)

        def pen(z, lam_):                                      # the penalty's part of y for pairs s
            return torch.cat([lam_.unsqueeze(1) * z[:, :-1], torch.zeros_like(z[:, -1:])], 1)

        def record(idx, mask):
            out_v[idx], out_c[idx] = v[mask], c[mask]
            out_u[:, idx] = u[:, mask]
            out_gv[idx], out_gc[idx] = gv[mask] - lam[mask].unsqueeze(1) * v[mask], gc[mask]
            k = len(S)
            for i, (sk, yk) in enumerate(zip(S, Y)):           # right-aligned: the newest pair last
                out_S[m - k + i, idx] = sk[mask]
                out_Yd[m - k + i, idx] = yk[mask] - pen(sk[mask], lam[mask])
        S, Y, rho = [], [], []                                 # histories (float64), 1/(s.y)
        if hist is not None:                                   # the data curvature of earlier penalties
            for sk, ydk in zip(*hist):
                yk = ydk.add_(pen(sk, lam))                     # the record is ours: no copy
                S.append(sk)
                Y.append(yk)
                rho.append(_inverse_curvature(sk, yk))
        last_drop = torch.full_like(f, float("inf"))           # objective decrease of the last step
        it = 0
        while it < max_iter:
            it += 1
            # --- two-loop recursion: d = -H g (per problem) --------------------------------
            q = torch.cat([gv, gc.unsqueeze(1)], 1)          # (Pa, d+1) float64
            alphas = []
            for sk, yk, rk in zip(reversed(S), reversed(Y), reversed(rho)):
                al = rk * (sk * q).sum(1)
                q = q - al.unsqueeze(1) * yk
                alphas.append(al)
            if S:
                sy = (S[-1] * Y[-1]).sum(1)
                yy = (Y[-1] * Y[-1]).sum(1)
                gam = torch.where((sy > 0) & (yy > 0), sy / yy.clamp_min(1e-300), torch.ones_like(sy))
                q = q * gam.unsqueeze(1)
            for sk, yk, rk, al in zip(S, Y, rho, reversed(alphas)):
                be = rk * (yk * q).sum(1)
                q = q + (al - be).unsqueeze(1) * sk
            dv, dc = -q[:, :-1], -q[:, -1]
            dec = (gv * q[:, :-1]).sum(1) + gc * q[:, -1]      # -g^T d = g^T H g
            bad_dir = ~(dec > 0)
            if bool(bad_dir.any()):                            # lost positive definiteness: restart
                dv = torch.where(bad_dir.unsqueeze(1), -gv, dv)
                dc = torch.where(bad_dir, -gc, dc)
                dec = torch.where(bad_dir, (gv * gv).sum(1) + gc * gc, dec)
            # --- convergence: quasi-Newton decrement (after one curvature pair) ---------------
            fin = (dec <= gtol[act]) & (last_drop <= gtol[act]) & (len(S) > 0)
            if bool(fin.any()):
                idx = act[fin]
                record(idx, fin)
                done[idx.cpu()] = True
                converged[idx.cpu()] = True
                keep = ~fin
                if not bool(keep.any()):
                    break
                act, v, c, gv, gc, f, dv, dc, dec, last_drop, lam = (
                    z[keep] for z in (act, v, c, gv, gc, f, dv, dc, dec, last_drop, lam))
                u = u[:, keep]
                S, Y, rho = [z[keep] for z in S], [z[keep] for z in Y], [z[keep] for z in rho]
            # --- line search on u + a X d (no data pass) -----------------------------------
            du = self.lin(dv, dc)
            vv, vd, dd = (v * v).sum(1), (v * dv).sum(1), (dv * dv).sum(1)
            wa = self._cols(self.w, act)
            ta = self._cols(self.t, act)

            def phi(al):                                   # objective along the direction
                uu = torch.addcmul(u, du, al.to(u.dtype).unsqueeze(0))
                lv = torch.nn.functional.binary_cross_entropy_with_logits(uu, ta, reduction="none")
                return (lv * wa).sum(0, dtype=torch.float64) + 0.5 * lam * (vv + 2 * al * vd + al * al * dd), uu

            al = torch.ones_like(dec)
            if not S:                                      # first step: a 1-D Newton step from 0
                p = torch.sigmoid(u)
                curv = (p * (1 - p) * du * du * wa).sum(0, dtype=torch.float64) + lam * dd
                al = (dec / curv.clamp_min(1e-300)).clamp(max=1e6)
            else:                                          # refine the unit step by one 1-D Newton step
                uu = torch.addcmul(u, du, al.to(u.dtype).unsqueeze(0))
                p = torch.sigmoid(uu)
                d1 = ((p - ta) * wa * du).sum(0, dtype=torch.float64) + lam * (vd + al * dd)
                d2 = (p * (1 - p) * wa * du * du).sum(0, dtype=torch.float64) + lam * dd
                al = (al - d1 / d2.clamp_min(1e-300)).clamp(0.25, 4.0)
            fn, un = phi(al)
            for _ls in range(30):
                bad = ~(fn <= f - 1e-4 * al * dec + 1e-12 * f.abs())
                if not bool(bad.any()):
                    break
                al = torch.where(bad, 0.5 * al, al)
                fn2, un2 = phi(al)
                fn = torch.where(bad, fn2, fn)
                un = torch.where(bad.unsqueeze(0), un2, un)
            stuck = ~(fn < f)                                # no decrease possible (round-off)
            al = torch.where(stuck, torch.zeros_like(al), al)
            v = v + al.unsqueeze(1) * dv
            c = c + al * dc
            u = torch.where(stuck.unsqueeze(0), u, un)
            last_drop = torch.where(stuck, torch.zeros_like(f), f - fn)
            f = torch.where(stuck, f, fn)
            gv_new, gc_new = self.lin_T(self.residual(u, act))
            gv_new = gv_new + lam.unsqueeze(1) * v
            sv = torch.cat([al.unsqueeze(1) * dv, (al * dc).unsqueeze(1)], 1)
            yv = torch.cat([gv_new - gv, (gc_new - gc).unsqueeze(1)], 1)
            S.append(sv)
            Y.append(yv)
            rho.append(_inverse_curvature(sv, yv))
            if len(S) > self.m:
                S.pop(0), Y.pop(0), rho.pop(0)
            gv, gc = gv_new, gc_new
            if bool(stuck.any()):                          # stop those problems, unconverged
                idx = act[stuck]
                record(idx, stuck)
                done[idx.cpu()] = True
                keep = ~stuck
                if not bool(keep.any()):
                    break
                act, v, c, gv, gc, f, last_drop, lam = (z[keep] for z in (act, v, c, gv, gc, f, last_drop, lam))
                u = u[:, keep]
                S, Y, rho = [z[keep] for z in S], [z[keep] for z in Y], [z[keep] for z in rho]
        if not bool(done.all()):                           # iteration cap: the last iterates
            record(act, torch.ones(act.numel(), dtype=torch.bool, device=dev))
        return out_v, out_c, it, bool(converged.all()), (out_u, out_gv, out_gc), (out_S, out_Yd)


__all__ = ["fit_binary_l2_path_lbfgs", "path_solver", "lbfgs_cost", "SHARED_NEWTON_FACTORIZATIONS"]


def fit_softmax_l2_lbfgs(X: Tensor, y: Tensor, w: Tensor, num_classes: int, l2: float, *,
                         scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                         W0: Optional[Tensor] = None, b0: Optional[Tensor] = None,
                         tol: float = 1e-4, max_iter: int = 2000, memory: int = MEMORY):
    """One weighted multinomial logistic regression with an L2 penalty by L-BFGS:
    ``min sum_i w_i CE(softmax(W x~_i + b), y_i) + l2/2 ||W||^2`` (``b`` free), ``x~ = x * scale +
    shift`` folded in (never formed). ``X`` (n, d) in any float dtype (the passes run in it), the
    iterates in float64. Stops when the largest gradient entry of the *mean* objective (divided by
    ``sum w``) is ``<= tol`` -- the gradient-mapping rule of :func:`repair.solver.fit_logreg` for
    a smooth problem -- or when the line search cannot decrease the objective (round-off).
    Each iteration is two passes over the rows (``X D^T`` along the direction, ``R^T X`` for the
    gradient); the line search (one-dimensional Newton steps, Armijo) runs on the logits. At most
    ``memory`` history pairs, fewer when they would exceed :data:`HISTORY_BYTES`.
    Returns ``(W (C, d), b (C,), info)`` float64 in the internal coordinates (acting on x~)."""
    X = torch.as_tensor(X)
    n, d = X.shape
    C = int(num_classes)
    dev, xdt = X.device, X.dtype
    y = torch.as_tensor(y).to(dev).long()
    w = torch.as_tensor(w).to(dev, xdt).view(-1, 1)
    Sw = float(w.sum(dtype=torch.float64))
    if Sw <= 0:
        raise ValueError("the problem needs a positive total weight")
    a = None if scale is None else torch.as_tensor(scale).to(dev, torch.float64).flatten()
    s = None if shift is None else torch.as_tensor(shift).to(dev, torch.float64).flatten()
    lam = float(l2)
    yi = y.view(-1, 1)

    def lin(Wm, bm):
        We = Wm if a is None else Wm * a
        be = bm if s is None else bm + Wm @ s
        return torch.addmm(be.to(xdt).unsqueeze(0), X, We.to(xdt).T)            # (n, C)

    def loss(U):
        lse = torch.logsumexp(U, 1, keepdim=True)
        return float(((lse - U.gather(1, yi)) * w).sum(dtype=torch.float64))

    def grad(U, Wm):
        P = torch.softmax(U, 1)
        P.scatter_add_(1, yi, torch.full_like(yi, -1, dtype=P.dtype))
        P.mul_(w)
        g = (P.T @ X).double()
        rs = P.sum(0, dtype=torch.float64)
        if a is not None:
            g = g * a
        if s is not None:
            g = g + rs.unsqueeze(1) * s
        return torch.cat([g + lam * Wm, rs.unsqueeze(1)], 1)                    # (C, d+1)

    # history pairs within HISTORY_BYTES (1,000 classes x 2,048 features: 33 MiB a pair -> 3 pairs)
    memory = max(2, min(int(memory), int(HISTORY_BYTES // (2 * 8 * C * (d + 1)))))
    th = torch.zeros(C, d + 1, dtype=torch.float64, device=dev)
    if W0 is not None:
        th[:, :d] = torch.as_tensor(W0).to(dev, torch.float64)
    if b0 is not None:
        th[:, d] = torch.as_tensor(b0).to(dev, torch.float64)
    U = lin(th[:, :d], th[:, d])
    f = loss(U) + 0.5 * lam * float((th[:, :d] ** 2).sum())
    g = grad(U, th[:, :d])
    S_, Y_, R_ = [], [], []
    it, converged = 0, False
    while it < max_iter:
        if float(g.abs().max()) / Sw <= tol:
            converged = True
            break
        it += 1
        q = g.clone()
        al = []
        dot = lambda a, b: float(torch.vdot(a.reshape(-1), b.reshape(-1)))     # noqa: E731 (no temporaries)
        for sk, yk, rk in zip(reversed(S_), reversed(Y_), reversed(R_)):
            a_ = rk * dot(sk, q)
            q.sub_(yk, alpha=a_)
            al.append(a_)
        if S_:
            q *= dot(S_[-1], Y_[-1]) / max(dot(Y_[-1], Y_[-1]), 1e-300)
        for sk, yk, rk, a_ in zip(S_, Y_, R_, reversed(al)):
            q.add_(sk, alpha=a_ - rk * dot(yk, q))
        dth = -q
        dec = float((g * q).sum())
        if not dec > 0:                                    # not a descent direction: restart
            S_, Y_, R_ = [], [], []
            dth, dec = -g, float((g * g).sum())
        dU = lin(dth[:, :d], dth[:, d])
        vv, vd, dd = (float((th[:, :d] * th[:, :d]).sum()), float((th[:, :d] * dth[:, :d]).sum()),
                      float((dth[:, :d] ** 2).sum()))

        def phi(t_):
            return loss(U + t_ * dU) + 0.5 * lam * (vv + 2 * t_ * vd + t_ * t_ * dd)

        def d12(t_):                                       # first and second derivative along dth
            Ut = U + t_ * dU
            P = torch.softmax(Ut, 1)
            m1 = (P * dU).sum(1, keepdim=True)
            d1 = float(((m1 - dU.gather(1, yi)) * w).sum(dtype=torch.float64)) + lam * (vd + t_ * dd)
            d2 = float((((P * dU * dU).sum(1, keepdim=True) - m1 * m1) * w).sum(dtype=torch.float64)) + lam * dd
            return d1, d2

        t_ = 1.0 if S_ else 0.0
        d1, d2 = d12(t_)
        t_ = min(max(t_ - d1 / max(d2, 1e-300), 0.25 if S_ else 0.0), 4.0 if S_ else 1e6)
        fn = phi(t_)
        for _ls in range(30):
            if fn <= f - 1e-4 * t_ * dec + 1e-12 * abs(f):
                break
            t_ *= 0.5
            fn = phi(t_)
        if not fn < f:                                     # round-off: no decrease possible
            break
        sk = t_ * dth
        th = th + sk
        U = U + t_ * dU
        f = fn
        gn = grad(U, th[:, :d])
        yk = gn - g
        sy = float((sk * yk).sum())
        if sy > 1e-10 * float(sk.norm()) * float(yk.norm()):
            S_.append(sk)
            Y_.append(yk)
            R_.append(1.0 / sy)
            if len(S_) > memory:
                S_.pop(0), Y_.pop(0), R_.pop(0)
        g = gn
    return th[:, :d], th[:, d], {"n_iter": it, "converged": converged, "objective": f}


__all__ += ["fit_softmax_l2_lbfgs"]
