"""Batched multinomial logistic regression by FISTA (L1/L2, sample weights, a pull to a
reference head, per-problem feature maps): :func:`fit_logreg`. See :mod:`repair.solver`
for the objective and conventions."""
from __future__ import annotations

import math
import operator
import time
from typing import Optional, Sequence, Union

import torch

from .. import threads
from .weights import fold_affine, standardization

Tensor = torch.Tensor
Number = Union[float, int]


class _Batch:
    """Per-problem tensors for the currently active problems.

    Shared layout: ``X`` (N,D), ``y`` (N,), ``w`` (N,Ka) or (N,1); logits (N,Ka,C).
    Gathered layout: ``X`` (Ka,D,M) (feature-major: per-problem rows gathered and
    transposed, so both matmuls are plain batched GEMMs and working-set columns
    are contiguous rows), ``y`` (Ka,M), ``w`` (Ka,M); logits (Ka,M,C).
    The problem axis of the logits is ``pax`` (1 shared, 0 gathered).
    """

    def __init__(self, X, y, gathered, w, l1, l2, pull, Wref, bref, s, t):
        self.X, self.y, self.gathered = X, y, gathered
        self.w, self.l1, self.l2, self.pull = w, l1, l2, pull
        self.Wref, self.bref, self.s, self.t = Wref, bref, s, t
        self.pax = 0 if gathered else 1
        if gathered:
            self.yidx = y.unsqueeze(-1)
        else:
            self.yidx = None

    def subset(self, idx: Tensor) -> "_Batch":
        pick = lambda a: None if a is None else a[idx]
        if self.gathered:
            X, y, w = self.X[idx], self.y[idx], self.w[idx]
        else:
            X, y, w = self.X, self.y, (self.w[:, idx] if self.w.shape[1] > 1 else self.w)
        return _Batch(X, y, self.gathered, w, self.l1[idx], self.l2[idx], self.pull[idx],
                      pick(self.Wref), pick(self.bref), pick(self.s), pick(self.t))

    @property
    def K(self):
        return self.l1.shape[0]

    # --- helpers on the problem axis of logits ---------------------------------------
    def zb(self, v: Tensor) -> Tensor:
        """Per-problem scalar (Ka,) shaped to broadcast against logits."""
        return v.view(-1, 1, 1) if self.gathered else v.view(1, -1, 1)

    def zsel(self, Z: Tensor, idx: Tensor) -> Tensor:
        return Z.index_select(self.pax, idx)

    def zput(self, Z: Tensor, idx: Tensor, V: Tensor) -> None:
        Z.index_copy_(self.pax, idx, V)

    # --- linear map internal params -> logits and its adjoint ------------------------
    def _eff(self, W, b, idx=None):
        s = self.s if idx is None or self.s is None else self.s[idx]
        t = self.t if idx is None or self.t is None else self.t[idx]
        We = W if s is None else W * s.unsqueeze(1)
        be = b if t is None else b + (W * t.unsqueeze(1)).sum(-1)
        return We, be

    def lin(self, W, b, idx: Optional[Tensor] = None):
        """Logits of params (Ka',C,D) for all active problems or the subset ``idx``."""
        We, be = self._eff(W, b, idx)
        K, C, D = We.shape
        pd, xd = We.dtype, self.X.dtype          # the data may be stored in lower precision
        We_ = We.to(xd)
        if self.gathered:                                   # (K,C,D) x (K,D,M) -> (K,M,C)
            if idx is None:
                return torch.bmm(We_, self.X).to(pd).transpose(1, 2) + be.unsqueeze(1)
            # a subset: per-problem products on views (no copy of the data)
            return torch.stack([(We_[j] @ self.X[k]).to(pd).T + be[j] for j, k in enumerate(idx.tolist())])
        Z = (self.X @ We_.reshape(K * C, D).T).to(pd) + be.reshape(1, -1)    # (N, K*C)
        return Z.view(-1, K, C)

    def lin_T(self, R):
        """Adjoint of ``lin``: R shaped like its output -> (gW, gb) internal."""
        if self.gathered:
            gWe = torch.bmm(self.X, R.to(self.X.dtype)).to(R.dtype).transpose(1, 2)   # -> (K,C,D)
            gbe = R.sum(1)
        else:
            N, K, C = R.shape
            gWe = (R.reshape(N, K * C).T.to(self.X.dtype) @ self.X).to(R.dtype).view(K, C, -1)
            gbe = R.sum(0)
        gW = gWe if self.s is None else gWe * self.s.unsqueeze(1)
        if self.t is not None:
            gW = gW + gbe.unsqueeze(-1) * self.t.unsqueeze(1)
        return gW, gbe

    def _w(self, idx=None):
        if idx is None:
            return self.w
        if self.gathered:
            return self.w[idx]
        return self.w[:, idx] if self.w.shape[1] > 1 else self.w

    def loss(self, Z, W, b, need_grad: bool, idx: Optional[Tensor] = None):
        """Smooth part of the mean-normalised objective from logits ``Z`` (and the
        params for the quadratic terms); with ``need_grad`` also its gradient."""
        lse = torch.logsumexp(Z, dim=-1)
        if self.gathered:
            yidx = self.yidx if idx is None else self.yidx[idx]
        else:
            yidx = self.y.view(-1, 1, 1).expand(-1, Z.shape[1], 1)
        zy = Z.gather(-1, yidx).squeeze(-1)
        w = self._w(idx)
        f = ((lse - zy) * w).sum(1 if self.gathered else 0)
        l2 = self.l2 if idx is None else self.l2[idx]
        f = f + 0.5 * l2 * (W * W).sum((1, 2))
        if self.Wref is not None:
            pull = self.pull if idx is None else self.pull[idx]
            Wref = self.Wref if idx is None else self.Wref[idx]
            bref = self.bref if idx is None else self.bref[idx]
            dW, db = W - Wref, b - bref
            f = f + 0.5 * pull * ((dW * dW).sum((1, 2)) + (db * db).sum(1))
        if not need_grad:
            return f, None, None
        P = torch.exp(Z - lse.unsqueeze(-1))
        P.scatter_add_(-1, yidx, torch.full_like(zy.unsqueeze(-1), -1.0))
        P.mul_(w.unsqueeze(-1))
        gW, gb = self.lin_T(P)
        gW = gW + self.l2.view(-1, 1, 1) * W
        if self.Wref is not None:
            gW = gW + self.pull.view(-1, 1, 1) * dW
            gb = gb + self.pull.view(-1, 1) * db
        return f, gW, gb

    def l1_term(self, W):
        return self.l1 * W.abs().sum((1, 2))

    def lipschitz(self, n_power: int = 5, generator_seed: int = 0) -> Tensor:
        """Power-iteration estimate of the smooth part's Lipschitz constant (the
        line search corrects an under-estimate)."""
        K = self.K
        D = self.X.shape[1]
        g = torch.Generator(device="cpu").manual_seed(generator_seed)
        pd = self.l1.dtype
        v = torch.randn(K, 1, D, generator=g, dtype=torch.float32).to(self.X.device, pd)
        vb = torch.randn(K, 1, generator=g, dtype=torch.float32).to(self.X.device, pd)
        lam = torch.ones(K, device=self.X.device, dtype=pd)
        w = self.w
        for _ in range(n_power):
            nrm = torch.sqrt((v * v).sum((1, 2)) + (vb * vb).sum(1)).clamp_min(1e-30)
            v, vb = v / nrm.view(-1, 1, 1), vb / nrm.view(-1, 1)
            Z = self.lin(v, vb)                                  # (K,M,1) or (N,K,1)
            v, vb = self.lin_T(Z * w.unsqueeze(-1))
            lam = torch.sqrt((v * v).sum((1, 2)) + (vb * vb).sum(1))
        # softmax CE Hessian <= 1/2 (I - 11^T/C) (x) xx^T  ->  0.5 * lambda_max
        return 0.5 * lam * 1.1 + self.l2 + self.pull


def _per_problem(v, K: int, name: str, device, dtype) -> Tensor:
    t = torch.as_tensor(v, dtype=dtype, device=device).flatten()
    if t.numel() == 1:
        return t.expand(K).clone()
    if t.numel() != K:
        raise ValueError(f"{name}: expected a scalar or {K} values, got {t.numel()}")
    return t


def _stack(v: Optional[Tensor], K: int, dims: int, name: str, device, dtype) -> Optional[Tensor]:
    if v is None:
        return None
    v = torch.as_tensor(v).to(device=device, dtype=dtype)
    if v.dim() == dims:
        return v.unsqueeze(0).expand(K, *v.shape).clone()
    if v.dim() == dims + 1 and v.shape[0] in (1, K):
        return v.expand(K, *v.shape[1:]).clone()
    raise ValueError(f"{name}: bad shape {tuple(v.shape)} for K={K}")


def _infer_K(*cands) -> int:
    Ks = {int(k) for k in cands if k is not None and int(k) != 1}
    if len(Ks) > 1:
        raise ValueError(f"inconsistent numbers of problems: {sorted(Ks)}")
    return Ks.pop() if Ks else 1


def _lead(v, dims: int):
    if v is None:
        return None
    v = torch.as_tensor(v)
    if dims == 0:
        return v.numel() if v.dim() > 0 else None
    return v.shape[0] if v.dim() == dims + 1 else None


def _check_args(X, y, C: int, sample_weight, penalties: dict, heads: dict, biases: dict, max_iter, tol, device,
                num_threads) -> None:
    """:func:`fit_logreg`'s arguments as a caller of the library may give them wrong: a ValueError naming
    the argument (a NaN penalty or weight gave a NaN head with only ``converged`` False; labels 0.5 and
    1.5 were truncated to 0 and 1; a transposed ``init_W``, an unknown device or ``num_threads=0`` failed
    inside torch)."""
    X = torch.as_tensor(X)
    if X.dim() != 2:
        raise ValueError(f"X must be (N, D), got shape {tuple(X.shape)}")
    D = X.shape[1]
    if C < 1:
        raise ValueError(f"num_classes must be at least 1, got {C}")
    yt = torch.as_tensor(y)
    if yt.is_floating_point() and yt.numel() and not bool((yt == yt.round()).all()):
        raise ValueError("y must hold whole class indices (got fractional values)")
    for name, v in penalties.items():
        if v is None:
            continue
        # checked where and as it is (no float64 copy: not every device has float64); a Python number
        # in float64, so a large but finite penalty is not read as infinite
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative, got {v!r}")
    if sample_weight is not None:
        w = torch.as_tensor(sample_weight)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("sample_weight must be finite and non-negative")
    for name, v in heads.items():
        if v is not None and tuple(torch.as_tensor(v).shape[-2:]) != (C, D):
            raise ValueError(f"{name} must be ({C}, {D}) (or (K, {C}, {D})): num_classes x the columns of X, got "
                             f"{tuple(torch.as_tensor(v).shape)}")
    for name, v in biases.items():
        if v is not None and tuple(torch.as_tensor(v).shape[-1:]) != (C,):
            raise ValueError(f"{name} must be ({C},) (or (K, {C})), got {tuple(torch.as_tensor(v).shape)}")
    def number(v):
        """``v`` as a float (a Python or numpy number, a one-value tensor), or None."""
        if isinstance(v, bool):
            return None
        try:
            return float(v)
        except (TypeError, ValueError, RuntimeError):
            return None

    mi = number(max_iter)
    if mi is None or not math.isfinite(mi) or mi != int(mi) or mi < 1:
        raise ValueError(f"max_iter must be a whole number >= 1, got {max_iter!r}")
    tl = number(tol)
    if tl is None or not math.isfinite(tl) or tl <= 0:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({str(e).splitlines()[0]})") from None
    if not (isinstance(num_threads, str) and num_threads == "auto") and num_threads is not None:
        try:
            ok = not isinstance(num_threads, bool) and operator.index(num_threads) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"num_threads must be 'auto', None or a whole number >= 1, got {num_threads!r}")


def fit_logreg(X: Tensor, y: Tensor, num_classes: int, *,
               sample_weight: Optional[Tensor] = None,
               l1: Union[Number, Sequence[Number], Tensor] = 0.0,
               l2: Union[Number, Sequence[Number], Tensor] = 0.0,
               ref_pull: Union[Number, Sequence[Number], Tensor] = 0.0,
               init_W: Optional[Tensor] = None, init_b: Optional[Tensor] = None,
               ref_W: Optional[Tensor] = None, ref_b: Optional[Tensor] = None,
               feature_scale: Optional[Tensor] = None, feature_shift: Optional[Tensor] = None,
               standardize: bool = True, max_iter: int = 2000, tol: float = 1e-4,
               device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
               gather: Union[str, bool] = "auto", working_set: Union[str, bool] = "auto",
               num_threads: Union[str, int, None] = "auto", algorithm: str = "auto", row_mix=None):
    """Fit K weighted, penalised multinomial logistic regressions at once.

    See the module docstring for the objective and conventions. Returns
    ``(W (K,C,D), b (K,C), info)`` on ``device`` (``dtype``), acting on raw ``X``.

    ``algorithm``: ``"auto"`` solves two-class problems with only smooth penalties (L2 and/or
    the pull, every problem > 0) by the batched damped-Newton solver of :mod:`.newton` (the
    same objective; ``init_*`` is then not needed: Newton converges from the intercept-only
    model in a few steps; on large problems its blocks go to L-BFGS, see
    :func:`repair.solver.path_solver`); more classes with an L2 penalty only (every problem > 0)
    on large problems (a pass over one problem's rows >= :data:`SOFTMAX_LBFGS_WORK`
    multiply-adds) one problem at a time by L-BFGS (:func:`repair.solver.lbfgs.fit_softmax_l2_lbfgs`,
    same objective and stopping rule: the gradient of the mean objective; only that problem's
    rows are copied); everything else by FISTA. ``"fista"`` / ``"newton"`` / ``"lbfgs"`` force one.
    With Newton the intercept is not pulled to ``ref_b`` (only ``W``), as sklearn never
    penalises it. On that two-class path ``tol`` and ``max_iter`` keep their meaning in Newton's
    terms: ``tol`` becomes the Newton decrement per unit weight (the predicted objective gap) that a
    gradient of that size stands for, ``10 tol^2`` (:func:`repair.solver.newton.heads_tol`; the
    default 1e-4 is 1e-7, the rule this path always used; no tighter than round-off lets each route
    reach, :data:`repair.solver.newton.TOL_FLOOR`), and ``max_iter`` counts Newton steps, at most 100
    (L-BFGS blocks get ten iterations per step); ``info["n_iter"]`` counts those steps (L-BFGS
    iterations).

    ``num_threads``: CPU threads for torch during the fit (restored afterwards);
    ``"auto"`` uses 1 thread when a data pass is small (< 5e7 multiply-adds), where
    thread synchronisation costs more than it saves (dramatically so on a busy
    machine), and leaves torch's setting alone otherwise; ``None`` never changes it.

    ``row_mix`` (:class:`repair.solver.mixing.RowMix`, indices into ``X``'s rows; needs
    ``sample_weight`` (K, N)): each problem also has these mixed rows (convex combinations of two
    of its rows, the label of the first). The standardisation's statistics are those of the rows
    the problems use, mixed ones included (of the formed training sets). Two classes with smooth
    penalties never form them (:mod:`.mixing`); other problems get them formed.

    Arguments are checked first (:func:`_check_args`): a ValueError naming the argument, never a
    NaN head or an error from deep inside torch.
    """
    _check_args(X, y, int(num_classes), sample_weight, {"l1": l1, "l2": l2, "ref_pull": ref_pull},
                {"init_W": init_W, "ref_W": ref_W}, {"init_b": init_b, "ref_b": ref_b}, max_iter, tol, device,
                num_threads)
    if row_mix is not None:
        sw_ = None if sample_weight is None else torch.as_tensor(sample_weight)
        if sw_ is None or sw_.dim() != 2 or (row_mix.K not in (1, sw_.shape[0])):
            raise ValueError("row_mix needs sample_weight (K, N) for the same K problems")
        if standardize:
            if feature_scale is not None or feature_shift is not None:
                raise ValueError("row_mix with standardize and feature_scale / feature_shift is not supported")
            # the statistics of every problem's rows and mixed rows, computed once (chunks share them)
            from .weights import standardization_from_moments

            Xt = torch.as_tensor(X)
            feature_scale, feature_shift = standardization_from_moments(
                *row_mix.moments(Xt.to(dtype), sw_.to(dtype)))
            standardize = False
    X_ = torch.as_tensor(X)
    K_ = 1
    for v in (l1, l2, ref_pull):
        if v is not None and torch.as_tensor(v).numel() > 1:
            K_ = max(K_, torch.as_tensor(v).numel())
    sw_ = None if sample_weight is None else torch.as_tensor(sample_weight)
    if sw_ is not None and sw_.dim() == 2:
        # rows actually used, whichever layout is picked
        macs = min(int((sw_ > 0).sum()), sw_.shape[0] * X_.shape[0]) * X_.shape[1] * int(num_classes)
    else:
        macs = X_.shape[0] * X_.shape[1] * K_ * int(num_classes)
    chunks = _problem_chunks(X_, sw_, K_, int(num_classes))
    if chunks is None and row_mix is not None and _forms_mixed_rows(int(num_classes), l1, algorithm):
        chunks = _formed_rows_chunks(X_, sw_, row_mix, int(num_classes), l1, l2, ref_W, algorithm)
    if chunks is not None:
        # the per-problem copies of the rows would exceed the memory budget: independent
        # problems, solved a chunk at a time (same results, bounded memory)
        return _fit_in_chunks(chunks, X, y, num_classes, sample_weight=sample_weight, l1=l1, l2=l2,
                              ref_pull=ref_pull, init_W=init_W, init_b=init_b, ref_W=ref_W, ref_b=ref_b,
                              feature_scale=feature_scale, feature_shift=feature_shift, standardize=standardize,
                              max_iter=max_iter, tol=tol, device=device, dtype=dtype, gather=gather,
                              working_set=working_set, num_threads=num_threads, algorithm=algorithm,
                              row_mix=row_mix)
    if row_mix is not None:
        macs *= 2                               # rows and their mixed copies
    with threads.for_small_work(macs, device, num_threads):
        return _fit_logreg(X, y, num_classes, sample_weight=sample_weight, l1=l1, l2=l2,
                           ref_pull=ref_pull, init_W=init_W, init_b=init_b, ref_W=ref_W, ref_b=ref_b,
                           feature_scale=feature_scale, feature_shift=feature_shift,
                           standardize=standardize, max_iter=max_iter, tol=tol, device=device,
                           dtype=dtype, gather=gather, working_set=working_set, algorithm=algorithm,
                           row_mix=row_mix)


def _fit_logreg(X, y, num_classes, *, sample_weight, l1, l2, ref_pull, init_W, init_b, ref_W, ref_b,
                feature_scale, feature_shift, standardize, max_iter, tol, device, dtype, gather,
                working_set, algorithm="auto", row_mix=None):
    t0 = time.perf_counter()
    dev = torch.device(device)
    C = int(num_classes)
    X = torch.as_tensor(X)
    N, D = X.shape
    y = torch.as_tensor(y).to(dev).long()
    if y.shape != (N,):
        raise ValueError(f"y must have shape ({N},), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
        raise ValueError("labels out of range")

    sw = None if sample_weight is None else torch.as_tensor(sample_weight)
    K = _infer_K(sw.shape[0] if sw is not None and sw.dim() == 2 else None,
                 _lead(l1, 0), _lead(l2, 0), _lead(ref_pull, 0),
                 _lead(init_W, 2), _lead(init_b, 1), _lead(ref_W, 2), _lead(ref_b, 1),
                 _lead(feature_scale, 1), _lead(feature_shift, 1))

    # --- weights (K, N) ------------------------------------------------------------------
    if sw is None:
        wfull = torch.ones(1, N, device=dev, dtype=dtype)
    else:
        sw = sw.to(dev, dtype)
        wfull = sw.unsqueeze(0) if sw.dim() == 1 else sw
        if wfull.shape[-1] != N:
            raise ValueError("sample_weight has the wrong number of samples")
        if bool((wfull < 0).any()):
            raise ValueError("sample weights must be non-negative")
    S = wfull.sum(1)
    if bool((S <= 0).any()):
        raise ValueError("every problem needs a positive total sample weight")
    S = S.expand(K).clone() if S.numel() == 1 else S

    # --- standardisation (computed once, in row chunks) -----------------------------------
    # folded into the per-problem feature maps: x~ = (x * a + c) * s + t = x * (a s) + (c s + t),
    # so the standardised matrix is never formed (no N x D copy beyond the embeddings)
    Z = X.to(dev, dtype)
    s = _stack(feature_scale, K, 1, "feature_scale", dev, dtype)
    t = _stack(feature_shift, K, 1, "feature_shift", dev, dtype)
    if standardize:
        std_scale, std_shift = standardization(Z)
        a_, c_ = std_scale.expand(K, D), std_shift.expand(K, D)
        t = (c_ if s is None else c_ * s) + (0.0 if t is None else t)
        s = a_.clone() if s is None else a_ * s

    # --- per-problem penalties (mean-normalised) -------------------------------------------
    l1n = _per_problem(l1, K, "l1", dev, dtype) / S
    l2n = _per_problem(l2, K, "l2", dev, dtype) / S
    pulln = _per_problem(ref_pull, K, "ref_pull", dev, dtype) / S
    if bool((l1n < 0).any() or (l2n < 0).any() or (pulln < 0).any()):
        raise ValueError("penalties must be non-negative")

    def to_internal(Wr, br):
        """raw-space head -> internal coordinates (inverse of the folding)."""
        Wz, bz = Wr, br
        if s is not None or t is not None:  # head on z -> head on x~ = z*s + t
            if s is not None:
                # a masked feature (scale exactly 0) has no internal weight; any other scale is inverted,
                # however small (the standardisation of embeddings around 1e18 scales by 1e-18: a cut at
                # 1e-12 dropped the reference head's weights there, and AFR's pull went to 0)
                nz = s != 0
                Wi = torch.where(nz.unsqueeze(1), Wz / torch.where(nz, s, torch.ones_like(s)).unsqueeze(1),
                                 torch.zeros_like(Wz))
            else:
                Wi = Wz
            bi = bz if t is None else bz - (Wi * t.unsqueeze(1)).sum(-1)
            return Wi, bi
        return Wz, bz

    def default_b(v):
        return torch.zeros(K, C, device=dev, dtype=dtype) if v is None else _stack(v, K, 1, "b", dev, dtype)

    if init_W is not None:
        W0, b0 = to_internal(_stack(init_W, K, 2, "init_W", dev, dtype), default_b(init_b))
    else:
        W0 = torch.zeros(K, C, D, device=dev, dtype=dtype)
        b0 = default_b(None)
        if init_b is not None:
            b0 = _stack(init_b, K, 1, "init_b", dev, dtype).clone()
    if ref_W is not None:
        Wref, bref = to_internal(_stack(ref_W, K, 2, "ref_W", dev, dtype), default_b(ref_b))
    else:
        Wref = bref = None
        if bool((pulln > 0).any()):
            raise ValueError("ref_pull > 0 needs ref_W")

    # --- two classes, smooth penalties: the batched Newton solver --------------------------
    if algorithm not in ("auto", "fista", "newton", "lbfgs"):
        raise ValueError(f"algorithm must be auto, fista, newton or lbfgs, got {algorithm!r}")
    if algorithm == "lbfgs" and (bool((l1n > 0).any()) or Wref is not None or not bool((l2n > 0).all())):
        raise ValueError("algorithm='lbfgs' needs an L2 penalty > 0 for every problem, no L1 and no ref_pull")
    newton_ok = C == 2 and bool((l1n == 0).all()) and bool(((l2n + pulln) > 0).all())
    if algorithm == "newton" and not newton_ok:
        raise ValueError("algorithm='newton' needs two classes, no L1 and a positive L2 or pull for every problem")
    newton_now = newton_ok and algorithm not in ("fista", "lbfgs") and \
        K * int((wfull > 0).sum(1).max()) * D * 4 <= _copy_budget(Z)
    if row_mix is not None and not (newton_now and Wref is None):
        # a solver without the mixed rows' structure: form them (the training sets they stand for)
        Xs, ys, sws = row_mix.materialize(Z, y, wfull.expand(K, N))
        return _fit_logreg(Xs, ys, C, sample_weight=sws, l1=l1, l2=l2, ref_pull=ref_pull, init_W=init_W,
                           init_b=init_b, ref_W=ref_W, ref_b=ref_b, feature_scale=feature_scale,
                           feature_shift=feature_shift, standardize=standardize, max_iter=max_iter, tol=tol,
                           device=device, dtype=dtype, gather=gather, working_set=working_set, algorithm=algorithm)
    if newton_now:
        from .newton import HEADS_MAX_ITER, binary_heads, heads_tol

        # the caller's stopping rule, in Newton's terms: tol as the decrement it stands for, max_iter
        # as Newton steps (at most HEADS_MAX_ITER; the defaults give the rule this path always used)
        W_out, b_out, info = binary_heads(Z, y, wfull.expand(K, N), l2n * S, pulln * S, Wref, bref, s, t,
                                          tol=heads_tol(tol), max_iter=min(HEADS_MAX_ITER, int(max_iter)),
                                          row_mix=row_mix)
        We, be = fold_affine(W_out, b_out, s, t)
        info.update({"seconds": time.perf_counter() - t0, "gathered": False, "working_set": False, "n_outer": 0,
                     "K": K, "algorithm": info.pop("solver", "newton")})
        return We.to(dtype), be.to(dtype), info

    # --- more classes, L2 only, large: one problem at a time by L-BFGS ------------------------
    if _softmax_lbfgs_ok(algorithm, C, l1n, l2n, Wref, wfull, D):
        from .lbfgs import fit_softmax_l2_lbfgs

        tol_k = tol * torch.clamp(l2n, min=1.0)
        Wl, bl, its, convs, objs = [], [], [], [], []
        for k in range(K):
            wk = wfull[k if wfull.shape[0] > 1 else 0]
            rows = torch.nonzero(wk > 0).flatten()
            Xk = Z if rows.numel() == N else Z.index_select(0, rows)     # this problem's rows only
            # no initial head given: start from the previous problem's solution (the problems are
            # independent and strictly convex, so only the iteration count changes)
            start = (W0[k], b0[k]) if init_W is not None or k == 0 else (Wl[-1], bl[-1])
            Wk_, bk_, inf = fit_softmax_l2_lbfgs(
                Xk, y[rows], wk[rows], C, float(l2n[k] * S[k]), scale=None if s is None else s[k],
                shift=None if t is None else t[k], W0=start[0], b0=start[1], tol=float(tol_k[k]),
                max_iter=max_iter)
            del Xk
            Wl.append(Wk_.to(dtype))
            bl.append(bk_.to(dtype))
            its.append(inf["n_iter"])
            convs.append(inf["converged"])
            objs.append(inf["objective"])
        We, be = fold_affine(torch.stack(Wl), torch.stack(bl), s, t)
        info = {"n_iter": its, "converged": convs, "objective": objs, "seconds": time.perf_counter() - t0,
                "gathered": True, "working_set": False, "n_outer": 0, "K": K, "algorithm": "lbfgs"}
        return We.to(dtype), be.to(dtype), info

    # --- solve ---------------------------------------------------------------------------
    wn = wfull / wfull.sum(1, keepdim=True)           # normalised weights (K|1, N)
    M = int((wn > 0).sum(1).max())
    fits_memory = K * M * D * 4 <= _copy_budget(Z)
    if gather == "auto":
        # thin matmuls are memory bound: reading K*M gathered rows vs the N shared rows
        # once for all K*C outputs (rough CPU cost model)
        do_gather = wn.shape[0] > 1 and K * M * (12 + C) < N * (12 + K * C) and fits_memory
    else:
        do_gather = bool(gather) and wn.shape[0] > 1
    if working_set == "auto":
        # per-problem (rows x working-set) copies pay off when gathering the rows does
        use_ws = bool((l1n > 0).all()) and Wref is None and D > 2 * _WS_MIN and \
            K * M * (12 + C) < N * (12 + K * C) and fits_memory
    else:
        use_ws = bool(working_set)
        if use_ws and (Wref is not None or not bool((l1n > 0).all())):
            raise ValueError("working_set=True needs l1 > 0 for every problem and no ref_pull")
    shared = _Batch(Z, y, False, wn.T.contiguous(), l1n, l2n, pulln, Wref, bref, s, t)
    # the gradient of a strongly penalised problem is dominated by the penalty terms:
    # measure optimality relative to that curvature (float32 cannot do better)
    tol_k = tol * torch.clamp(l2n + pulln, min=1.0)
    if use_ws:
        W_out, b_out, n_iter, conv, n_outer = _solve_working_set(
            Z, y, wn.expand(K, N), shared, W0, b0, tol, max_iter)
    else:
        n_outer = 0
        if do_gather:
            order = _row_order(wn, M)
            batch = _Batch(Z[order].transpose(1, 2).contiguous(), y[order], True,
                           torch.gather(wn, 1, order), l1n, l2n, pulln, Wref, bref, s, t)
        else:
            batch = shared
        W_out, b_out, n_iter, conv, _ = _fista(batch, W0, b0, tol_k, max_iter)

    # objective (sklearn scale) at the solution, internal coordinates
    f_sm = shared.loss(shared.lin(W_out, b_out), W_out, b_out, False)[0]
    obj = (f_sm + shared.l1_term(W_out)) * S
    # --- fold transforms back into raw coordinates --------------------------------------
    We, be = fold_affine(W_out, b_out, s, t)
    info = {
        "n_iter": n_iter.tolist(),
        "converged": conv.tolist(),
        "objective": obj.double().cpu().tolist(),
        "seconds": time.perf_counter() - t0,
        "gathered": bool(do_gather),
        "working_set": bool(use_ws),
        "n_outer": int(n_outer),
        "K": K,
    }
    return We.to(dtype), be.to(dtype), info


#: multiply-adds per pass over one problem's rows from which smooth (L2-only) problems with more
#: than two classes are solved one at a time by L-BFGS instead of batched FISTA (below it the
#: batched FISTA's shared passes win; above it L-BFGS's 3-5x fewer iterations do, and only one
#: problem's rows are ever copied)
SOFTMAX_LBFGS_WORK = 2e7


def _softmax_lbfgs_ok(algorithm, C, l1n, l2n, Wref, wfull, D) -> bool:
    if algorithm == "lbfgs":
        return True
    if algorithm != "auto" or C <= 2 or Wref is not None or bool((l1n > 0).any()) or not bool((l2n > 0).all()):
        return False
    M = int((wfull > 0).sum(1).max())
    return M * D * C >= SOFTMAX_LBFGS_WORK


_MEMORY_BUDGET = 2 * 1024 ** 3      # bytes for gathered per-problem copies of the data (at most)
_MIN_BUDGET = 64 * 1024 ** 2        # ... and at least, whatever the data's size


def _copy_budget(X: Tensor) -> float:
    """Bytes the per-problem copies of the rows may take: half the data's own size, between
    :data:`_MIN_BUDGET` and :data:`_MEMORY_BUDGET` (peak memory stays within ~1.5x the data)."""
    return float(min(_MEMORY_BUDGET, max(_MIN_BUDGET, 0.5 * X.numel() * 4)))


def _problem_chunks(X: Tensor, sw: Optional[Tensor], K: int, C: int) -> Optional[list]:
    """Ranges of problems to solve one after the other, or None (all at once). Only problems on
    small subsamples (``(K, N)`` weights, each using a fraction of the rows) are split: their
    per-problem copies (gathered rows, Newton's per-problem matrices) must fit the budget."""
    if sw is None or sw.dim() != 2 or sw.shape[0] < 2 or X.dim() != 2:
        return None
    K = sw.shape[0]
    N, D = X.shape
    M = int((sw > 0).sum(1).max())
    if not K * M * (12 + C) < N * (12 + K * C):         # not worth gathering: the shared layout
        return None
    per = M * D * 4
    k = max(1, int(_copy_budget(X) // max(per, 1)))
    if k >= K:
        return None
    return [(lo, min(K, lo + k)) for lo in range(0, K, k)]


def _forms_mixed_rows(C: int, l1, algorithm: str) -> bool:
    """Whether :func:`_fit_logreg` forms the mixed rows of a ``row_mix`` (every solver but the two-class
    Newton one): more than two classes, an L1 penalty, or a solver other than Newton asked for."""
    return C > 2 or algorithm in ("fista", "lbfgs") or bool((torch.as_tensor(l1) != 0).any())


def _formed_rows_chunks(X: Tensor, sw: Optional[Tensor], row_mix, C: int = 3, l1=0.0, l2=1.0, ref_W=None,
                        algorithm: str = "auto") -> Optional[list]:
    """Ranges of problems to solve one after the other when their mixed rows are formed
    (:meth:`repair.solver.mixing.RowMix.materialize`), or None (all at once). The formed rows are
    every problem's own block, disjoint from the others': batched, each problem must read its block
    alone (the gathered layout), never every problem's rows (the shared layout: K times the work, the
    cliff from 8,000 to 16,000 rows of 96 features, 1.4 s to 10 s). A chunk's blocks stay within
    :data:`_MIN_BUDGET`, under which the gathered layout is taken; a problem larger than that is
    solved alone (its rows are then all its own). Same results, bounded memory: one chunk's blocks
    are formed at a time, not every problem's. None where the formed problems go to L-BFGS one at a
    time anyway (:func:`_softmax_lbfgs_ok`: it starts each from the previous one's solution)."""
    if sw is None or sw.dim() != 2 or sw.shape[0] < 2 or X.dim() != 2:
        return None
    K, D = sw.shape[0], X.shape[1]
    mixed = (row_mix.w > 0).sum(1)
    rows = int(((sw > 0).sum(1) + (mixed if mixed.numel() == K else mixed.expand(K))).max())
    smooth = ref_W is None and bool((torch.as_tensor(l1) == 0).all()) and bool((torch.as_tensor(l2) > 0).all())
    if algorithm == "lbfgs" or (algorithm == "auto" and C > 2 and smooth and rows * D * C >= SOFTMAX_LBFGS_WORK):
        return None
    per = rows * D * 4
    k = max(1, int(_MIN_BUDGET // max(per, 1)))
    if k >= K:
        return None
    return [(lo, min(K, lo + k)) for lo in range(0, K, k)]


def _fit_in_chunks(chunks, X, y, num_classes, **kw):
    """:func:`fit_logreg` on ranges of problems, results concatenated (``info`` merged)."""
    K = torch.as_tensor(kw["sample_weight"]).shape[0]

    def part(v, lo, hi, dims):
        if v is None:
            return None
        tv = torch.as_tensor(v)
        lead = _lead(tv, dims)
        return tv[lo:hi] if lead == K else v

    dims = {"sample_weight": 1, "l1": 0, "l2": 0, "ref_pull": 0, "init_W": 2, "init_b": 1, "ref_W": 2,
            "ref_b": 1, "feature_scale": 1, "feature_shift": 1}
    Ws, bs, infos = [], [], []
    t0 = time.perf_counter()
    for lo, hi in chunks:
        sub = {k: (part(v, lo, hi, dims[k]) if k in dims else v) for k, v in kw.items()}
        if sub.get("row_mix") is not None:
            sub["row_mix"] = sub["row_mix"].take(lo, hi)
        W, b, info = fit_logreg(X, y, num_classes, **sub)
        Ws.append(W)
        bs.append(b)
        infos.append(info)
    info = dict(infos[0])
    for key in ("n_iter", "converged", "objective"):
        info[key] = [v for i in infos for v in i[key]]
    info.update({"seconds": time.perf_counter() - t0, "K": K, "chunks": len(chunks)})
    return torch.cat(Ws), torch.cat(bs), info
_WS_MIN = 64                        # smallest working set (features)


def _row_order(wn: Tensor, M: int) -> Tensor:
    """(K,M) indices of each problem's rows with positive weight (padded with
    zero-weight rows)."""
    return torch.argsort((wn > 0).to(torch.int8), dim=1, descending=True, stable=True)[:, :M]


def _fista(batch: _Batch, W0: Tensor, b0: Tensor, tol, max_iter: int,
           mu0: Optional[Tensor] = None):
    """FISTA + backtracking (with step growth) + adaptive restart on ``batch``.

    The logits are linear in the parameters, so those at the extrapolated point are
    combined from the last two iterates: 2 data passes per iteration (plus a forward
    pass per backtracking step of the problems that need one). A converged problem is
    frozen (its result recorded, its step set to ~0) and the batch is compacted once
    a third of the active problems are frozen, so data copies stay O(log K).
    Returns ``(W, b, n_iter (K,) cpu, converged (K,) cpu, step (K,))``.
    """
    dev, dtype = W0.device, W0.dtype
    K = W0.shape[0]
    eps_rel = 1e-6 if dtype == torch.float32 else 1e-13
    W_out, b_out = W0.clone(), b0.clone()
    mu_out = torch.ones(K, device=dev, dtype=dtype)
    n_iter = torch.zeros(K, dtype=torch.long)
    conv = torch.zeros(K, dtype=torch.bool)
    if max_iter <= 0 or K == 0:
        return W_out, b_out, n_iter, conv, mu_out
    act = torch.arange(K, device=dev)
    tol = torch.as_tensor(tol, device=dev, dtype=dtype).expand(K).clone()
    mu = (1.0 / batch.lipschitz()) if mu0 is None else mu0.clone()
    x_W, x_b = W0.clone(), b0.clone()
    p_W, p_b = x_W, x_b
    Zx = batch.lin(x_W, x_b)
    Zp = Zx
    tk = torch.ones(K, device=dev, dtype=dtype)
    frozen = torch.zeros(K, dtype=torch.bool, device=dev)
    backtracked = torch.zeros(K, dtype=torch.bool, device=dev)
    grow, shrink, tiny = 1.25, 0.5, 1e-30

    def prox(VW, Vb, step, l1v):
        thr = (step * l1v).view(-1, 1, 1)
        return torch.sign(VW) * torch.clamp(VW.abs() - thr, min=0.0), Vb

    it = 0
    while it < max_iter:
        it += 1
        tnew = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * tk * tk))
        beta = (tk - 1.0) / tnew
        yW = x_W + beta.view(-1, 1, 1) * (x_W - p_W)
        yb = x_b + beta.view(-1, 1) * (x_b - p_b)
        Zy = Zx + batch.zb(beta) * (Zx - Zp)
        fy, gW, gb = batch.loss(Zy, yW, yb, True)
        # grow the step, except right after a backtrack (fewer wasted forward passes)
        mu = torch.where(backtracked, mu, mu * grow)
        nW, nb = prox(yW - mu.view(-1, 1, 1) * gW, yb - mu.view(-1, 1) * gb, mu, batch.l1)
        Zn = batch.lin(nW, nb)
        fn = batch.loss(Zn, nW, nb, False)[0]
        backtracked = torch.zeros_like(frozen)
        for _ls in range(60):
            dW, db = nW - yW, nb - yb
            quad = fy + (gW * dW).sum((1, 2)) + (gb * db).sum(1) \
                + ((dW * dW).sum((1, 2)) + (db * db).sum(1)) / (2.0 * mu)
            bad = ((fn > quad + eps_rel * fy.abs().clamp_min(1.0)) | ~torch.isfinite(fn)) & ~frozen
            if not bool(bad.any()):
                break
            backtracked |= bad
            bi = torch.nonzero(bad).flatten()
            mu[bi] = mu[bi] * shrink
            sW, sb = prox(yW[bi] - mu[bi].view(-1, 1, 1) * gW[bi], yb[bi] - mu[bi].view(-1, 1) * gb[bi],
                          mu[bi], batch.l1[bi])
            nW[bi], nb[bi] = sW, sb
            Zs = batch.lin(sW, sb, bi)
            batch.zput(Zn, bi, Zs)
            fn[bi] = batch.loss(Zs, sW, sb, False, bi)[0]
        # gradient mapping (optimality measure) and adaptive restart
        dW, db = nW - yW, nb - yb
        gmap = torch.maximum(dW.abs().amax((1, 2)), db.abs().amax(1)) / mu
        restart = ((yW - nW) * (nW - x_W)).sum((1, 2)) + ((yb - nb) * (nb - x_b)).sum(1) > 0
        tk = torch.where(restart | frozen, torch.ones_like(tnew), tnew)
        if bool(restart.any()):      # a restart discards the momentum history
            p_W = torch.where(restart.view(-1, 1, 1), nW, x_W)
            p_b = torch.where(restart.view(-1, 1), nb, x_b)
            Zp = torch.where(batch.zb(restart), Zn, Zx)
        else:
            p_W, p_b, Zp = x_W, x_b, Zx
        x_W, x_b, Zx = nW, nb, Zn
        last = it == max_iter
        newly = (gmap <= tol) & ~frozen
        if bool(newly.any()) or last:
            fin = torch.nonzero(~frozen).flatten() if last else torch.nonzero(newly).flatten()
            ids = act[fin]
            W_out[ids], b_out[ids], mu_out[ids] = x_W[fin], x_b[fin], mu[fin]
            n_iter[ids.cpu()] = it
            conv[ids.cpu()] = newly[fin].cpu()
            if last:
                break
            frozen |= newly
            mu = torch.where(frozen, torch.full_like(mu, tiny), mu)
            tk = torch.where(frozen, torch.ones_like(tk), tk)
            nf = int(frozen.sum())
            if nf == act.numel():
                break
            if 3 * nf >= act.numel():
                keep = torch.nonzero(~frozen).flatten()
                act = act[keep]
                batch_keep = batch.subset(keep)
                Zx, Zp = batch.zsel(Zx, keep), batch.zsel(Zp, keep)
                batch = batch_keep
                x_W, x_b, p_W, p_b = x_W[keep], x_b[keep], p_W[keep], p_b[keep]
                tk, mu, tol = tk[keep], mu[keep], tol[keep]
                frozen, backtracked = frozen[keep], backtracked[keep]
    return W_out, b_out, n_iter, conv, mu_out


def _solve_working_set(Z: Tensor, y: Tensor, wn: Tensor, shared: _Batch, W0: Tensor, b0: Tensor,
                       tol: float, max_iter: int, max_outer: int = 40):
    """L1 problems: FISTA on per-problem working sets of features, grown from the
    KKT violations of the full gradient (``max_c |g_cj| > l1``) until none is left
    above ``tol`` (inner problems are solved inexactly while the violation is large,
    as in celer). Each problem's rows are gathered once; problems are bucketed by
    working-set size (powers of two) so a sparse problem does not pay for a dense
    one. Features outside a working set stay exactly 0."""
    dev, dtype = W0.device, W0.dtype
    K, C, D = W0.shape
    M = int((wn > 0).sum(1).max())
    order = _row_order(wn, M)
    wr = torch.gather(wn, 1, order)
    yr = y[order]
    ZrT = Z[order].transpose(1, 2).contiguous()                  # (K,D,M): rows per problem
    l1 = shared.l1
    W, b = W0.clone(), b0.clone()
    n_iter = torch.zeros(K, dtype=torch.long)
    conv = torch.zeros(K, dtype=torch.bool)
    mu = torch.zeros(K, device=dev, dtype=dtype)                 # 0 = unknown step
    P_prev = torch.zeros(K, dtype=torch.long, device=dev)
    _, gW, _ = shared.loss(shared.lin(W, b), W, b, True)        # full gradient at start
    act = torch.arange(K, device=dev)
    outer = 0
    while act.numel() > 0 and outer < max_outer:
        outer += 1
        nz = (W[act] != 0).any(1)                                  # (Ka,D)
        gmax = gW[act].abs().amax(1)                               # (Ka,D)
        l1a = l1[act]
        viol = torch.where(nz, torch.zeros_like(gmax), gmax - l1a.view(-1, 1)).amax(1)
        if outer > 1:
            done = (viol <= tol) & conv[act.cpu()].to(dev)
            keep = torch.nonzero(~done).flatten()
            act, nz, gmax, l1a, viol = act[keep], nz[keep], gmax[keep], l1a[keep], viol[keep]
            if act.numel() == 0:
                break
            inner_tol = torch.clamp(0.3 * viol, min=tol)
        else:
            inner_tol = torch.clamp(0.1 * l1a, min=tol)
        score = torch.where(nz, torch.full_like(gmax, float("inf")), gmax / l1a.view(-1, 1))
        nnz = nz.sum(1)
        want = torch.maximum(2 * nnz, nnz + (score > 1).sum(1).clamp(max=2 * _WS_MIN))
        want = torch.maximum(torch.maximum(want, P_prev[act]), torch.full_like(want, _WS_MIN))
        size = torch.clamp(2 ** torch.ceil(torch.log2(want.double())).long(), max=D)
        P_prev[act] = size
        used = 0
        for P in sorted(set(size.tolist())):
            sel = torch.nonzero(size == P).flatten()
            idx = act[sel]
            A = torch.topk(score[sel], P, dim=1).indices            # (Kb,P)
            Xr = ZrT[idx.unsqueeze(1), A]                            # (Kb,P,M)
            sub = shared.subset(idx)
            s_r = None if sub.s is None else torch.gather(sub.s, 1, A)
            t_r = None if sub.t is None else torch.gather(sub.t, 1, A)
            inner = _Batch(Xr, yr[idx], True, wr[idx], sub.l1, sub.l2, sub.pull, None, None, s_r, t_r)
            idx3 = A.unsqueeze(1).expand(-1, C, -1)
            WA = torch.gather(W[idx], 2, idx3)
            budget = max_iter - int(n_iter[idx.cpu()].max())
            mu0 = mu[idx]
            mu0 = None if bool((mu0 <= 0).any()) else mu0
            itol = inner_tol[sel]
            WA, bA, it, cv, mub = _fista(inner, WA, b[idx], itol, budget, mu0=mu0)
            cv = cv & (itol <= tol).cpu()          # inexact solves force another round
            n_iter[idx.cpu()] += it
            conv[idx.cpu()] = cv
            mu[idx] = mub
            Wn = torch.zeros(idx.numel(), C, D, device=dev, dtype=dtype).scatter_(2, idx3, WA)
            W[idx], b[idx] = Wn, bA
            used = max(used, int(n_iter[idx.cpu()].max()))
            # full gradient of these problems for the KKT check
            Zr = inner.lin(WA, bA)
            lse = torch.logsumexp(Zr, -1, keepdim=True)
            R = torch.exp(Zr - lse)
            R.scatter_add_(-1, inner.yidx, torch.full_like(inner.yidx, -1, dtype=R.dtype))
            R.mul_(inner.w.unsqueeze(-1))
            gWe = torch.stack([(ZrT[k] @ R[j].to(ZrT.dtype)).to(dtype).T for j, k in enumerate(idx.tolist())])
            g = gWe if sub.s is None else gWe * sub.s.unsqueeze(1)
            if sub.t is not None:
                g = g + R.sum(1).unsqueeze(-1) * sub.t.unsqueeze(1)
            gW[idx] = g + sub.l2.view(-1, 1, 1) * Wn
        if used >= max_iter:
            break
    return W, b, n_iter, conv, outer


