"""Shared, batched last-layer solver: multinomial logistic regression in torch.

One call fits ``K`` independent problems at once (several regularisation strengths,
several subsamples / seeds, several feature masks ...) on the same embeddings, on
CPU or CUDA. Every repair method refits its head through :func:`fit_logreg`.

Objective (per problem ``k``; the *sklearn* convention)
-------------------------------------------------------
::

    F_k(W, b) =   sum_i w_ki * CE(softmax(W x~_ki + b), y_i)
                + l1_k * ||W||_1
                + l2_k / 2 * ||W||_F^2
                + ref_pull_k / 2 * (||W - W_ref||_F^2 + ||b - b_ref||^2)

* The cross-entropy is a **sum** (not a mean) of weighted per-sample losses, so
  ``l1 = 1/C`` is exactly sklearn's ``LogisticRegression(penalty="l1", C=C)``
  (``C * sum_i CE_i + ||w||_1``) and ``l2 = 1/C`` is sklearn's
  ``penalty="l2"`` (``C * sum_i CE_i + 1/2 ||w||^2``). The DFR grid
  ``C in [1, .7, .3, .1, .07, .03, .01]`` therefore means the same thing here
  when the sample weights are 0/1 subsample indicators.
* The model is multinomial (softmax), binary is just ``C = 2``. For two classes and
  an **L1** penalty this is exactly sklearn's binary objective (the optimal split
  of the logit difference ``v`` over the two rows costs ``||v||_1``). For two
  classes and an **L2** penalty it equals the binary problem with ``C_binary = 2 C``.
* The intercept ``b`` is never penalised by ``l1``/``l2`` (like sklearn's saga/lbfgs
  solvers; liblinear penalises it slightly, which makes almost no difference).
* ``x~`` are the *internal* features: the raw ``X`` standardised with per-feature
  mean / std (``standardize=True``, statistics computed once over all rows of
  ``X``, whatever their weights), then optionally mapped per problem by
  ``x~ = z * feature_scale_k + feature_shift_k`` (a feature mask is
  ``feature_scale = 0/1``). Penalties and the pull act on these internal
  coordinates. ``init_*`` and ``ref_*`` are given in *raw* coordinates (same space
  as the returned head) and mapped in. All transforms are folded back on return:
  ``X @ W[k].T + b[k]`` on the *raw* ``X`` is model ``k``.

Algorithm
---------
FISTA (accelerated proximal gradient) with soft-thresholding for L1, a per-problem
backtracking line search that also lets the step grow (the local curvature of the
logistic loss near the optimum is far below the global Lipschitz bound), and
gradient-based adaptive restart (O'Donoghue & Candes). The first step is ``1/L``
with ``L`` from a few power iterations on the weighted Gram matrix. The logits are
linear in the parameters, so those at the extrapolated point are combined from the
last two iterates: an iteration costs 2 data passes (forward at the new iterate,
backward at the extrapolated point) plus a forward pass per backtracking step of
the problems that need one. Internally the loss is divided by ``S_k = sum_i w_ki``
(same minimiser; keeps float32 numbers O(1)). A problem stops when the
gradient-mapping norm ``max |x+ - y| / step`` (i.e. the proximal gradient of the
*mean* loss in internal units; the KKT violation for L1) is ``<= tol`` (scaled by
``max(1, (l2+ref_pull)/S_k)`` so strongly penalised problems are not asked for more
than float32 gives). Converged problems are frozen and compacted out of the batch,
so easy problems do not pay for hard ones.

Data layouts (chosen automatically; ``gather``/``working_set`` force them):

* shared: one ``(N, D)`` matrix, all ``K*C`` outputs in one GEMM per pass (best when
  problems use most rows: the data is read once for all problems);
* gathered: when each problem uses a small fraction of the rows (0 weights, e.g.
  DFR's group-balanced subsamples), each problem's rows are gathered into a
  feature-major ``(K, D, M)`` tensor and batched GEMMs are used;
* working sets (L1 problems, gathered rows): FISTA runs on per-problem working sets
  of features grown from the KKT violations of the full gradient until none is
  left (celer-style inexact inner solves, problems bucketed by working-set size);
  features outside the working set stay exactly 0.

On CPU, small problems run single-threaded (``num_threads="auto"``): thread
synchronisation costs more than it saves there, dramatically so on a busy machine.

Public API
----------
``fit_logreg(X, y, num_classes, *, sample_weight=None, l1=0., l2=0., ref_pull=0.,
init_W=None, init_b=None, ref_W=None, ref_b=None, feature_scale=None,
feature_shift=None, standardize=True, max_iter=2000, tol=1e-4, device="cpu",
dtype=torch.float32, gather="auto", working_set="auto", num_threads="auto")
-> (W (K,C,D), b (K,C), info)``

    ``sample_weight``: None, (N,) or (K,N), non-negative (0/1 = subsampling).
    ``l1``, ``l2``, ``ref_pull``: float or sequence/tensor of length ``K``.
    ``init_W``/``ref_W``: ``(C,D)`` or ``(K,C,D)``; ``init_b``/``ref_b``: ``(C,)`` or
    ``(K,C)`` (raw coordinates; warm start / pull target). ``feature_scale`` /
    ``feature_shift``: ``(D,)`` or ``(K,D)``. ``K`` is the common leading size of all
    per-problem arguments (1 if none). Returns tensors of ``dtype`` (float32 default)
    on ``device``; ``info`` has ``n_iter`` (K,), ``converged`` (K,), ``objective`` (K,)
    (the value of ``F_k``, sklearn scale, internal coordinates), ``seconds``,
    ``gathered``, ``working_set``, ``n_outer``, ``K``.

``fit_binary_l2_path(Z (K,n,d), t (K,n), w (K,n), l2 (L,), *, tol=1e-4, max_iter=50,
form="auto", factor_dtype=torch.float32, num_threads="auto") -> (v (K,L,d), c (K,L), info)``

    Small dense *L2* problems (DFR's fast protocol): ``K`` binary logistic regressions
    (sklearn's binary ``C = 1/l2`` convention, intercept free) solved along a
    warm-started penalty path by damped Newton with a lazily refreshed Hessian, in the
    primal ``(d+1)``-dimensional form or, when ``n`` is small next to ``d``, in the
    ``n``-dimensional Gram-matrix (kernel) form; see its docstring. No standardisation
    or folding: the caller passes the features it wants.

Helpers (used by the methods): :func:`logits`, :func:`predict`,
:func:`group_accuracies`, :func:`worst_group_accuracy`, :func:`fold_affine`,
:func:`standardization`, :func:`inferred_groups`, :func:`class_balanced_weights`,
:func:`group_balanced_weights`, :func:`balanced_subsample_weights`,
:func:`expected_balanced_weights`, :func:`stratified_split`,
:func:`resolve_selection_groups`, :func:`selection_scores`,
:func:`selection_scores_from_preds`, :func:`pick_best`, :func:`newton_cost`,
:func:`cpu_threads`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional, Sequence, Union

import torch

Tensor = torch.Tensor
Number = Union[float, int]

__all__ = [
    "fit_logreg", "logits", "predict", "group_accuracies", "worst_group_accuracy",
    "fold_affine", "standardization", "inferred_groups", "class_balanced_weights",
    "group_balanced_weights", "balanced_subsample_weights", "stratified_split",
    "selection_scores", "selection_scores_from_preds", "resolve_selection_groups", "pick_best",
    "expected_balanced_weights", "fit_binary_l2_path", "newton_cost", "cpu_threads",
]


# ----------------------------------------------------------------------------------------
# small pure helpers
# ----------------------------------------------------------------------------------------

def logits(X: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``X @ W.T + b``; ``W`` (C,D) -> (N,C), or batched ``W`` (K,C,D) -> (K,N,C).
    ``X`` is cast to ``W``'s dtype and device."""
    X = X.to(W.device, W.dtype)
    b = b.to(W.device, W.dtype)
    if W.dim() == 2:
        return X @ W.T + b
    return torch.matmul(X.unsqueeze(0), W.transpose(1, 2)) + b.unsqueeze(1)


def predict(X: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """Predicted classes, (N,) for one head or (K,N) for a stack of heads."""
    return logits(X, W, b).argmax(-1)


def _as_preds(logits_or_preds: Tensor) -> Tensor:
    if logits_or_preds.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool):
        return logits_or_preds.long()
    return logits_or_preds.argmax(-1)


def group_accuracies(logits_or_preds: Tensor, y: Tensor, groups: Tensor,
                     num_groups: Optional[int] = None) -> Tensor:
    """Per-group accuracy.

    ``logits_or_preds``: (N,C) float logits or (N,) int predictions, or a batch
    (K,N,C) / (K,N). Returns (G,) or (K,G) float tensor; groups without samples
    are NaN.
    """
    pred = _as_preds(logits_or_preds)
    groups = groups.to(pred.device).long()
    y = y.to(pred.device)
    G = int(num_groups) if num_groups is not None else (int(groups.max()) + 1 if groups.numel() else 0)
    squeeze = pred.dim() == 1
    if squeeze:
        pred = pred.unsqueeze(0)
    correct = (pred == y.unsqueeze(0)).float()                       # (K,N)
    counts = torch.zeros(G, device=pred.device).index_add_(0, groups, torch.ones_like(groups, dtype=torch.float))
    hits = torch.zeros(pred.shape[0], G, device=pred.device).index_add_(1, groups, correct)
    acc = hits / counts.unsqueeze(0)
    acc[:, counts == 0] = float("nan")
    return acc[0] if squeeze else acc


def worst_group_accuracy(logits_or_preds: Tensor, y: Tensor, groups: Tensor,
                         num_groups: Optional[int] = None):
    """Minimum accuracy over the non-empty groups: a float for one model, a (K,)
    tensor for a batch."""
    acc = group_accuracies(logits_or_preds, y, groups, num_groups)
    worst = torch.nan_to_num(acc, nan=float("inf")).min(-1).values
    return float(worst) if worst.dim() == 0 else worst


def inferred_groups(logits_or_preds: Tensor, y: Tensor) -> Tensor:
    """Pseudo-groups when no group labels exist: ``2*y + (pred != y)`` i.e.
    class x (correctly / incorrectly classified) under a reference head (the same
    convention as :func:`repair.metrics.inferred_groups`)."""
    pred = _as_preds(logits_or_preds)
    return y.long() * 2 + (pred != y).long()


def fold_affine(W: Tensor, b: Tensor, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None):
    """Fold a per-feature affine map into a head.

    A head ``(W, b)`` applied to ``x * scale + shift`` equals the returned head
    ``(W * scale, b + W @ shift)`` applied to ``x``. Works for (C,D) or batched
    (K,C,D) heads with ``scale``/``shift`` of shape (D,) or (K,D).
    """
    Wn = W if scale is None else W * (scale.unsqueeze(-2) if scale.dim() == W.dim() - 1 else scale)
    if shift is None:
        return Wn, b
    bn = b + (W * shift.unsqueeze(-2)).sum(-1)
    return Wn, bn


def standardization(X: Tensor, rows: Optional[Tensor] = None, eps: float = 1e-6):
    """Per-feature ``(scale, shift)`` such that ``X * scale + shift`` is standardised
    (zero mean, unit std over ``rows``); constant features get scale 1."""
    Xr = X if rows is None else X[rows]
    mu = Xr.mean(0)
    # two-pass variance (as stable as torch.std's Welford, ~10x faster on CPU)
    dev_ = Xr - mu
    sd = dev_.mul_(dev_).mean(0).sqrt_()
    sd = torch.where(sd > eps, sd, torch.ones_like(sd))
    return 1.0 / sd, -mu / sd


def class_balanced_weights(y: Tensor, num_classes: int, mask: Optional[Tensor] = None) -> Tensor:
    """Weights ``n / (n_present_classes * n_y)`` (each present class gets the same
    total weight, total = number of used samples). ``mask`` (N,) bool restricts to
    a subset (others get weight 0)."""
    return group_balanced_weights(y, mask=mask)


def group_balanced_weights(groups: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Weights giving every non-empty group the same total weight; sums to the
    number of used samples."""
    groups = groups.long()
    used = torch.ones_like(groups, dtype=torch.bool) if mask is None else mask.bool()
    G = int(groups.max()) + 1 if groups.numel() else 0
    counts = torch.zeros(G, device=groups.device).index_add_(0, groups[used],
                                                               torch.ones(int(used.sum()), device=groups.device))
    present = int((counts > 0).sum())
    w = torch.zeros(groups.shape[0], device=groups.device)
    if present == 0:
        return w
    n = float(used.sum())
    w[used] = n / (present * counts[groups[used]])
    return w


def balanced_subsample_weights(groups: Tensor, n_problems: int, generator: torch.Generator,
                               min_per_group: int = 0, mask: Optional[Tensor] = None) -> Tensor:
    """``(n_problems, N)`` weights of group-balanced subsamples (DFR protocol).

    Each non-empty group contributes ``n_g = max(smallest group size, min_per_group)``
    samples: groups with at least ``n_g`` members are subsampled without replacement
    (0/1 weights); smaller groups keep all members, up-weighted to a total of
    ``n_g``. With ``min_per_group=0`` this is exactly DFR's subsampling. The
    ``generator`` lives on the CPU; ``mask`` restricts the candidate rows.
    """
    groups = groups.long().cpu()
    N = groups.shape[0]
    used = torch.ones(N, dtype=torch.bool) if mask is None else mask.bool().cpu()
    ids = [torch.nonzero(used & (groups == g)).flatten() for g in torch.unique(groups[used]).tolist()]
    ids = [i for i in ids if i.numel() > 0]
    out = torch.zeros(n_problems, N)
    if not ids:
        return out
    n_g = max(min(i.numel() for i in ids), int(min_per_group))
    for k in range(n_problems):
        for idx in ids:
            if idx.numel() >= n_g:
                pick = idx[torch.randperm(idx.numel(), generator=generator)[:n_g]]
                out[k, pick] = 1.0
            else:
                out[k, idx] = n_g / idx.numel()
    return out


def stratified_split(strata: Tensor, fraction: float, generator: torch.Generator,
                     min_per_stratum: int = 1):
    """Split indices ``0..N-1`` into ``(part_a, part_b)`` with about ``fraction`` of
    every stratum in ``part_a`` (at least ``min_per_stratum`` in each part when the
    stratum has >= 2 samples). Returns sorted int64 CPU index tensors."""
    strata = strata.long().cpu()
    a, b = [], []
    for s in torch.unique(strata).tolist():
        idx = torch.nonzero(strata == s).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n = idx.numel()
        if n < 2:
            a.append(idx)
            continue
        na = int(round(fraction * n))
        na = min(max(na, min_per_stratum), n - min_per_stratum)
        a.append(idx[:na])
        b.append(idx[na:])
    cat = lambda parts: torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long)
    return cat(a), cat(b)


def resolve_selection_groups(criterion: str, y: Tensor, ref_logits: Tensor,
                             groups: Optional[Tensor]):
    """Evaluation strata for a selection criterion.

    ``criterion``: ``"auto"`` (given groups if available, else inferred groups),
    ``"worst_group"`` (given groups, required), ``"worst_inferred_group"``
    (class x correct/incorrect under ``ref_logits``), ``"worst_class"``.
    Returns ``(strata, name_actually_used)``.
    """
    if criterion == "auto":
        criterion = "worst_group" if groups is not None else "worst_inferred_group"
    if criterion == "worst_group":
        if groups is None:
            raise ValueError("selection criterion 'worst_group' needs group labels")
        return groups.long(), criterion
    if criterion == "worst_inferred_group":
        return inferred_groups(ref_logits, y), criterion
    if criterion == "worst_class":
        return y.long(), criterion
    raise ValueError(f"unknown selection criterion {criterion!r}")


def selection_scores(X: Tensor, y: Tensor, W: Tensor, b: Tensor, strata: Tensor):
    """Score a stack of heads (K,C,D),(K,C) on held-out data: returns
    ``(worst_stratum_acc (K,), mean_acc (K,))`` as CPU float64 tensors. The
    selection rule used by the methods is: max worst-stratum accuracy, ties broken
    by mean accuracy, then by the first candidate."""
    X = X.to(W.device, W.dtype)
    return selection_scores_from_preds(predict(X, W, b), y, strata)


def selection_scores_from_preds(pred: Tensor, y: Tensor, strata: Tensor):
    """:func:`selection_scores` for (K,N) predictions already made (e.g. cross-validated
    ones): ``(worst_stratum_acc (K,), mean_acc (K,))`` CPU float64."""
    y = y.to(pred.device)
    worst = worst_group_accuracy(pred, y, strata.to(pred.device))
    mean = (pred == y.unsqueeze(0)).double().mean(1)
    return worst.double().cpu(), mean.cpu()


def pick_best(worst: Tensor, mean: Tensor, tie: float = 1e-9) -> int:
    """Index of the best candidate (max worst, then max mean, then first)."""
    best = float(worst.max())
    cand = [i for i in range(worst.numel()) if float(worst[i]) >= best - tie]
    return max(cand, key=lambda i: (float(mean[i]), -i))


# ----------------------------------------------------------------------------------------
# the solver
# ----------------------------------------------------------------------------------------

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
        v = torch.randn(K, 1, D, generator=g).to(self.X.device, pd)
        vb = torch.randn(K, 1, generator=g).to(self.X.device, pd)
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
               num_threads: Union[str, int, None] = "auto"):
    """Fit K weighted, penalised multinomial logistic regressions at once.

    See the module docstring for the objective and conventions. Returns
    ``(W (K,C,D), b (K,C), info)`` on ``device`` (``dtype``), acting on raw ``X``.

    ``num_threads``: CPU threads for torch during the fit (restored afterwards);
    ``"auto"`` uses 1 thread when a data pass is small (< 5e7 multiply-adds), where
    thread synchronisation costs more than it saves (dramatically so on a busy
    machine), and leaves torch's setting alone otherwise; ``None`` never changes it.
    """
    n_thr = None
    if num_threads is not None and torch.device(device).type == "cpu":
        X_ = torch.as_tensor(X)
        if num_threads == "auto":
            K_ = 1
            for v in (l1, l2, ref_pull):
                if v is not None and torch.as_tensor(v).numel() > 1:
                    K_ = max(K_, torch.as_tensor(v).numel())
            sw_ = None if sample_weight is None else torch.as_tensor(sample_weight)
            if sw_ is not None and sw_.dim() == 2:
                # rows actually used, whichever layout is picked
                rows = min(int((sw_ > 0).sum()), sw_.shape[0] * X_.shape[0])
                macs = rows * X_.shape[1] * int(num_classes)
            else:
                macs = X_.shape[0] * X_.shape[1] * K_ * int(num_classes)
            n_thr = 1 if macs < 5e7 else None
        else:
            n_thr = int(num_threads)
    if n_thr is not None and n_thr != torch.get_num_threads():
        old_thr = torch.get_num_threads()
        torch.set_num_threads(n_thr)
        try:
            return _fit_logreg(X, y, num_classes, sample_weight=sample_weight, l1=l1, l2=l2,
                               ref_pull=ref_pull, init_W=init_W, init_b=init_b, ref_W=ref_W, ref_b=ref_b,
                               feature_scale=feature_scale, feature_shift=feature_shift,
                               standardize=standardize, max_iter=max_iter, tol=tol, device=device,
                               dtype=dtype, gather=gather, working_set=working_set)
        finally:
            torch.set_num_threads(old_thr)
    return _fit_logreg(X, y, num_classes, sample_weight=sample_weight, l1=l1, l2=l2,
                       ref_pull=ref_pull, init_W=init_W, init_b=init_b, ref_W=ref_W, ref_b=ref_b,
                       feature_scale=feature_scale, feature_shift=feature_shift,
                       standardize=standardize, max_iter=max_iter, tol=tol, device=device,
                       dtype=dtype, gather=gather, working_set=working_set)


def _fit_logreg(X, y, num_classes, *, sample_weight, l1, l2, ref_pull, init_W, init_b, ref_W, ref_b,
                feature_scale, feature_shift, standardize, max_iter, tol, device, dtype, gather,
                working_set):
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

    # --- standardisation (computed once) -----------------------------------------------
    Xd = X.to(dev, dtype)
    if standardize:
        std_scale, std_shift = standardization(Xd)
        Z = Xd * std_scale + std_shift
    else:
        std_scale = std_shift = None
        Z = Xd

    # --- per-problem transforms / penalties (mean-normalised) ---------------------------
    s = _stack(feature_scale, K, 1, "feature_scale", dev, dtype)
    t = _stack(feature_shift, K, 1, "feature_shift", dev, dtype)
    l1n = _per_problem(l1, K, "l1", dev, dtype) / S
    l2n = _per_problem(l2, K, "l2", dev, dtype) / S
    pulln = _per_problem(ref_pull, K, "ref_pull", dev, dtype) / S
    if bool((l1n < 0).any() or (l2n < 0).any() or (pulln < 0).any()):
        raise ValueError("penalties must be non-negative")

    def to_internal(Wr, br):
        """raw-space head -> internal coordinates (inverse of the folding)."""
        if std_scale is not None:          # head on raw x -> head on z = x*a + c
            Wz = Wr / std_scale
            bz = br - (Wz * std_shift).sum(-1)
        else:
            Wz, bz = Wr, br
        if s is not None or t is not None:  # head on z -> head on x~ = z*s + t
            if s is not None:
                nz = s.abs() > 1e-12
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

    # --- solve ---------------------------------------------------------------------------
    wn = wfull / wfull.sum(1, keepdim=True)           # normalised weights (K|1, N)
    M = int((wn > 0).sum(1).max())
    fits_memory = K * M * D * 4 <= _MEMORY_BUDGET
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
    if std_scale is not None:
        We, be = fold_affine(We, be, std_scale.expand(K, D), std_shift.expand(K, D))
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


_MEMORY_BUDGET = 2 * 1024 ** 3      # bytes for gathered per-problem copies of the data
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


# ----------------------------------------------------------------------------------------
# small dense L2 problems: damped Newton along a regularisation path
# ----------------------------------------------------------------------------------------

def expected_balanced_weights(groups: Tensor, min_per_group: int = 0,
                              mask: Optional[Tensor] = None) -> Tensor:
    """(N,) expectation of :func:`balanced_subsample_weights`: every non-empty group
    gets the total weight ``n_g = max(smallest group size, min_per_group)``, spread
    evenly over its members (``n_g / count``). One weighted fit on all rows replaces
    the average over random group-balanced subsamples, and ``C`` keeps the meaning it
    has for a subsample. ``mask`` restricts to a subset (others get weight 0)."""
    groups = groups.long().cpu()
    used = torch.ones_like(groups, dtype=torch.bool) if mask is None else mask.bool().cpu()
    w = torch.zeros(groups.shape[0])
    if not bool(used.any()):
        return w
    counts = torch.bincount(groups[used], minlength=int(groups.max()) + 1).double()
    n_g = max(float(counts[counts > 0].min()), float(min_per_group))
    w[used] = (n_g / counts[groups[used]]).float()
    return w


@contextmanager
def cpu_threads(n: Optional[int]):
    """Run the block with ``n`` torch CPU threads (restored afterwards); None: unchanged."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def newton_cost(n: int, d: int) -> tuple:
    """(multiply-adds per Newton iteration, form) of :func:`fit_binary_l2_path` for ``n``
    rows and ``d`` features: the primal form builds a (d+1)^2 Hessian (``n d^2``),
    the kernel form factors an ``n x n`` system (``n^3 / 3``)."""
    primal = n * (d + 1) ** 2 + (d + 1) ** 3 / 3.0
    kernel = n ** 3 / 3.0 + 2.0 * n * n
    return (primal, "primal") if primal <= kernel else (kernel, "kernel")


def fit_binary_l2_path(Z: Tensor, t: Tensor, w: Tensor, l2: Sequence[float], *,
                       tol: float = 1e-4, max_iter: int = 50, form: str = "auto",
                       factor_dtype: torch.dtype = torch.float32,
                       num_threads: Union[str, int, None] = "auto"):
    """Binary L2 logistic regressions for a path of penalties, ``K`` problems batched.

    Problem ``k`` at penalty ``l2[j]`` (sklearn's binary convention, ``l2 = 1/C``)::

        min_{v, c}  sum_i w_ki * (log(1 + exp(u_i)) - t_ki u_i) + l2[j] / 2 * ||v||^2,
        u = Z_k v + c                       (intercept ``c`` not penalised)

    ``Z`` (K, n, d) features (used as given: standardise beforehand), ``t`` (K, n)
    0/1 targets, ``w`` (K, n) non-negative weights (0 = padding row), ``l2`` the path,
    solved in the given order with warm starts (give it decreasing: strong penalty
    first, every solution then starts next to the previous one).

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
    cost, auto_form = newton_cost(n, d)
    form = auto_form if form == "auto" else form
    if form not in ("primal", "kernel"):
        raise ValueError(f"form must be auto/primal/kernel, got {form!r}")
    n_thr = None
    if num_threads is not None and Z.device.type == "cpu":
        n_thr = (1 if K * cost < 2e8 else None) if num_threads == "auto" else int(num_threads)
    with cpu_threads(n_thr):
        return _binary_l2_path(Z, t, w, l2, tol, max_iter, form, factor_dtype)


def _cholesky(M: Tensor) -> Tensor:
    """Cholesky factor of a batch of SPD matrices, redone in float64 if it fails."""
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()) or not bool(torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()):
        L = torch.linalg.cholesky(M.double()).to(M.dtype) if M.dtype != torch.float64 else \
            torch.linalg.cholesky(M)
        if not bool(torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()):
            L = torch.linalg.cholesky(M.double())
    return L


def _binary_l2_path(Z, t, w, l2, tol, max_iter, form, cdt):
    t0 = time.perf_counter()
    K, n, d = Z.shape
    dev, xdt = Z.device, Z.dtype
    vdt = torch.float64                          # iterates, objective, gradient
    slack = 16.0 * torch.finfo(vdt).eps
    t = torch.as_tensor(t).to(dev, vdt).reshape(K, n)
    w = torch.as_tensor(w).to(dev, vdt).reshape(K, n)
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    Sw = w.sum(1)
    if bool((Sw <= 0).any()):
        raise ValueError("every problem needs a positive total weight")
    lams = [float(v) for v in l2]
    if not lams or min(lams) <= 0:
        raise ValueError("the l2 path must be non-empty and positive")
    gtol = 2.0 * float(tol) * Sw                     # on the decrement g^T H^-1 g
    kernel = form == "kernel"
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    false = torch.zeros((), dtype=torch.bool, device=dev)

    def loss(uu):                                    # sum_i w_i (softplus(u_i) - t_i u_i)
        return bce(uu, t, weight=w, reduction="none").sum(1)

    # start at the intercept-only model (the solution for an infinite penalty)
    m = ((w * t).sum(1) / Sw).clamp(1e-6, 1.0 - 1e-6)
    c = torch.log(m / (1.0 - m))
    u = c.unsqueeze(-1).expand(K, n).clone()         # logits
    if kernel:
        G = torch.bmm(Z, Z.transpose(1, 2))                    # (K,n,n) Gram, once
        Gc = G.to(cdt)
        theta = torch.zeros(K, n, device=dev, dtype=vdt)       # alpha (v = Z^T alpha)
        Gth = torch.zeros(K, n, device=dev, dtype=vdt)         # G alpha
        Gmv = lambda x: torch.bmm(x.to(xdt).unsqueeze(1), G).squeeze(1).to(vdt)   # G x (symmetric)
    else:
        F = torch.cat([Z, torch.ones(K, n, 1, device=dev, dtype=xdt)], 2)   # intercept column
        Ft = F.transpose(1, 2).contiguous()                             # (K,d+1,n)
        mask = torch.ones(d + 1, device=dev, dtype=vdt)
        mask[-1] = 0.0
        theta = torch.zeros(K, d + 1, device=dev, dtype=vdt)   # [v, c]
        theta[:, -1] = c
        # row-vector products: thin (K,1,m) x (K,m,p) batched GEMMs are the fast path
        fwd = lambda x: torch.bmm(x.to(xdt).unsqueeze(1), Ft).squeeze(1).to(vdt)     # F x
        adj = lambda x: torch.bmm(x.to(xdt).unsqueeze(1), F).squeeze(1).to(vdt)      # F^T x

    thetas, cs, n_iter, n_fac, conv_all = [], [], [], [], []
    for lam in lams:
        if kernel:
            pen = lambda th, Gt: (0.5 * lam) * (th * Gt).sum(1)
            f = loss(u) + pen(theta, Gth)
        else:
            lmask = lam * mask
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
                    M.diagonal(dim1=1, dim2=2).add_(lam)
                    L = _cholesky(M)
                    # P = lam I + S0 G,  P^-1 x = (x - S0^1/2 M^-1 S0^1/2 G x) / lam
                    Pinv = lambda x: (x - sq * torch.cholesky_solve((sq * Gmv(x)).to(L.dtype).unsqueeze(-1), L)
                                      .squeeze(-1).to(vdt)) / lam
                    s0G = Gmv(s0)
                    Ps = Pinv(s0)
                    den = (s0.sum(1) - (s0G * Ps).sum(1)).clamp_min(1e-12 * Sw)
                    fac = True
                else:
                    H = torch.bmm(Ft * s0.to(xdt).unsqueeze(1), F).to(cdt)
                    H.diagonal(dim1=1, dim2=2).add_(lmask.to(cdt))
                    H[:, -1, -1] += (1e-10 * Sw).to(cdt)                  # all-zero-curvature guard
                    fac = _cholesky(H)
            if kernel:
                a = r + lam * theta                                  # gradient, alpha space
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
        V = torch.bmm(TH.to(xdt), Z).to(vdt)                        # v = Z^T alpha
    else:
        V = TH[:, :, :-1]
    info = {"form": form, "n_iter": n_iter, "n_factor": n_fac, "converged": conv_all,
            "seconds": time.perf_counter() - t0}
    return V, torch.stack(cs, 1), info
