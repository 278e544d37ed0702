"""Mixed rows that are never formed: each of ``K`` problems adds ``m`` rows that are convex
combinations of two rows of the data, ``(1 - s) x_i + s x_p`` with the label of ``x_i``
(``mix``'s same-class mixing, :mod:`repair.methods.mix`).

A logistic model's logit is linear in its row, so a mixed row's logit is the same combination of
two logits, and everything a solver needs from the mixed rows follows from the rows themselves:

- logits: ``u_mixed = (1 - s) u_i + s u_p`` (:meth:`RowMix.up`);
- the gradient's data term: ``X^T r`` over base and mixed rows is ``X^T (r_base + (1 - s) r_mixed
  scattered to i + s r_mixed scattered to p)`` (:meth:`RowMix.down`);
- the Hessian ``sum_j c_j f_j f_j^T`` over the mixed rows folds into the base rows' Hessian plus a
  symmetric cross term, one ``n x d x d`` product in all (:meth:`RowMix.hessian`) where the formed
  rows cost two;
- the Gram matrix of the lifted rows from the base rows' Gram matrix (:meth:`RowMix.gram`);
- the standardisation's moments, in row chunks (:meth:`RowMix.moments`).

So a mixed problem costs what its base rows cost, and takes no memory for the mixed rows: on
50,000 x 2,048 embeddings mix's ten averaged refits formed ten copies of twice the subsample.
:meth:`RowMix.materialize` forms them for the solvers without this structure (L1, more than two
classes), the exact training sets the formed rows always were.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass
class RowMix:
    """Problem ``k``'s mixed row ``j``: ``(1 - s[k, j]) * X[i[k, j]] + s[k, j] * X[p[k, j]]``, label
    ``y[i[k, j]]``, sample weight ``w[k, j]``. ``i``, ``p`` (K, m) int64 index rows of the data the
    problems are defined on (or, after :meth:`remap`, of each problem's own gathered rows); ``s``,
    ``w`` (K, m). ``K = 1`` broadcasts over the problems of a call."""
    i: Tensor
    p: Tensor
    s: Tensor
    w: Tensor

    def __post_init__(self):
        shapes = {tuple(v.shape) for v in (self.i, self.p, self.s, self.w)}
        if len(shapes) != 1 or self.i.dim() != 2:
            raise ValueError("RowMix: i, p, s and w must all be (K, m)")
        if bool((self.w < 0).any()):
            raise ValueError("RowMix: weights must be non-negative")

    @property
    def K(self) -> int:
        return int(self.i.shape[0])

    @property
    def m(self) -> int:
        return int(self.i.shape[1])

    def take(self, lo: int, hi: int) -> "RowMix":
        """Problems ``lo:hi``."""
        if self.K == 1:
            return self
        return RowMix(self.i[lo:hi], self.p[lo:hi], self.s[lo:hi], self.w[lo:hi])

    def to(self, device) -> "RowMix":
        return RowMix(self.i.to(device), self.p.to(device), self.s.to(device), self.w.to(device))

    def remap(self, order: Tensor) -> "RowMix":
        """Indices into each problem's gathered rows ``X[order[k]]`` (``order`` (K, M)); every mixed
        row's two rows must be among them."""
        K, M = order.shape
        n = int(max(int(order.max()) if order.numel() else 0,
                    int(self.i.max()) if self.i.numel() else 0, int(self.p.max()) if self.p.numel() else 0)) + 1
        pos = torch.full((K, n), -1, dtype=torch.long, device=order.device)
        pos.scatter_(1, order, torch.arange(M, device=order.device).expand(K, M).contiguous())
        i = pos.gather(1, self.i.to(order.device).expand(K, -1))
        p = pos.gather(1, self.p.to(order.device).expand(K, -1))
        if bool((i < 0).any()) or bool((p < 0).any()):
            raise ValueError("RowMix.remap: a mixed row uses a row its problem does not hold")
        return RowMix(i, p, self.s.to(order.device).expand(K, -1), self.w.to(order.device).expand(K, -1))

    # ---- the lifted rows' linear algebra (rows of each problem along dim 1) ------------------
    def _exp(self, v: Tensor, K: int) -> Tensor:
        return v if v.shape[0] == K else v.expand(K, -1)

    def labels(self, t: Tensor, w: Tensor) -> tuple:
        """(K, M) targets and weights of the base rows -> (K, M + m): a mixed row takes its first
        row's target and its own weight."""
        K = t.shape[0]
        return (torch.cat([t, t.gather(1, self._exp(self.i, K))], 1),
                torch.cat([w, self._exp(self.w, K).to(w.dtype)], 1))

    def up(self, u: Tensor) -> Tensor:
        """(K, M) values of the base rows -> (K, M + m), the mixed rows' appended (logits, a
        linear map of the rows)."""
        K = u.shape[0]
        i, p, s = self._exp(self.i, K), self._exp(self.p, K), self._exp(self.s, K).to(u.dtype)
        return torch.cat([u, (1.0 - s) * u.gather(1, i) + s * u.gather(1, p)], 1)

    def down(self, r: Tensor) -> Tensor:
        """The adjoint of :meth:`up`: (K, M + m) -> (K, M), each mixed row's value given back to
        its two rows (``X_lifted^T r = X^T down(r)``)."""
        K, n = r.shape
        M = n - self.m
        i, p, s = self._exp(self.i, K), self._exp(self.p, K), self._exp(self.s, K).to(r.dtype)
        rm = r[:, M:]
        out = r[:, :M].clone()
        out.scatter_add_(1, i, (1.0 - s) * rm)
        out.scatter_add_(1, p, s * rm)
        return out

    def hessian(self, F: Tensor, c: Tensor) -> Tensor:
        """``F_lifted^T diag(c) F_lifted`` (K, q, q) for base rows ``F`` (K, M, q) and curvatures
        ``c`` (K, M + m), by one (K, q, M) x (K, M, q) product: with ``c'`` the base rows'
        curvatures plus the mixed rows' ``(1 - s)^2 c`` and ``s^2 c`` given to their rows, and
        ``Y`` the rows ``p`` scaled by ``s (1 - s) c`` added to the rows ``i``, the Hessian is
        ``A + A^T`` for ``A = F^T (c'/2 F + Y)``."""
        K, M, q = F.shape
        i, p, s = self._exp(self.i, K), self._exp(self.p, K), self._exp(self.s, K).to(c.dtype)
        cm = c[:, M:]
        cb = c[:, :M].clone()
        cb.scatter_add_(1, i, (1.0 - s) ** 2 * cm)
        cb.scatter_add_(1, p, s ** 2 * cm)
        G = F * (0.5 * cb).to(F.dtype).unsqueeze(-1)
        if self.m:
            cross = (s * (1.0 - s) * cm).to(F.dtype).unsqueeze(-1)
            # problem by problem: the partner rows' copy is one problem's m x q at a time
            for k in range(K):
                G[k].index_add_(0, i[k], F[k].index_select(0, p[k]) * cross[k])
        A = torch.bmm(F.transpose(1, 2), G)
        return A + A.transpose(1, 2)

    def gram(self, G: Tensor) -> Tensor:
        """The lifted rows' Gram matrix (K, M + m, M + m) from the base rows' ``G`` (K, M, M)."""
        K, M, _ = G.shape
        i, p, s = self._exp(self.i, K), self._exp(self.p, K), self._exp(self.s, K).to(G.dtype)

        def lift_rows(A):                                 # (K, M, c) -> (K, M + m, c)
            c_ = A.shape[2]
            gi = A.gather(1, i.unsqueeze(-1).expand(K, self.m, c_))
            gp = A.gather(1, p.unsqueeze(-1).expand(K, self.m, c_))
            return torch.cat([A, (1.0 - s).unsqueeze(-1) * gi + s.unsqueeze(-1) * gp], 1)

        R = lift_rows(G)                                  # (K, M + m, M)
        return lift_rows(R.transpose(1, 2).contiguous()).transpose(1, 2).contiguous()

    # ---- the rows themselves ------------------------------------------------------------------
    def _used(self, k: int) -> Tensor:
        """Problem ``k``'s mixed rows of positive weight (zero-weight ones are padding)."""
        return torch.nonzero(self.w[0 if self.K == 1 else k] > 0).flatten()

    def _problem_rows(self, X: Tensor, k: int, sel: Tensor) -> Tensor:
        kk = 0 if self.K == 1 else k
        s = self.s[kk, sel].to(X.dtype).unsqueeze(1)
        return (1.0 - s) * X.index_select(0, self.i[kk, sel]) + s * X.index_select(0, self.p[kk, sel])

    def materialize(self, X: Tensor, y: Tensor, sample_weight: Tensor) -> tuple:
        """``(X_formed, y_formed, sample_weight_formed (K, N_formed))``: each problem's rows of
        positive weight followed by its mixed rows, every problem's block stacked -- the training
        sets this structure stands for, for solvers that need the rows formed."""
        K = sample_weight.shape[0]
        mx = self.to(X.device)
        blocks, labels, sizes, wts = [], [], [], []
        for k in range(K):
            idx = torch.nonzero(sample_weight[k] > 0).flatten()
            kk = 0 if self.K == 1 else k
            sel = mx._used(k)
            blocks += [X.index_select(0, idx), mx._problem_rows(X, k, sel)]
            labels += [y[idx], y[mx.i[kk, sel]]]
            wts.append(torch.cat([sample_weight[k, idx], mx.w[kk, sel].to(sample_weight.dtype)]))
            sizes.append(idx.numel() + sel.numel())
        Xs, ys = torch.cat(blocks), torch.cat(labels)
        sw = torch.zeros(K, Xs.shape[0], dtype=sample_weight.dtype, device=sample_weight.device)
        start = 0
        for k, n in enumerate(sizes):
            sw[k, start:start + n] = wts[k]
            start += n
        return Xs, ys, sw

    def moments(self, X: Tensor, sample_weight: Tensor, chunk_rows: Optional[int] = None) -> tuple:
        """Per-feature mean and (population) standard deviation, in X's dtype, over the rows
        :meth:`materialize` would stack (each problem's rows of positive weight and its mixed rows,
        every problem's), in row chunks with float64 sums: the statistics a standardisation of the
        formed rows computes, without forming them."""
        from .weights import CHUNK_BYTES, chunk_moments

        K = sample_weight.shape[0]
        D = X.shape[1]
        mx = self.to(X.device)
        if chunk_rows is None:
            chunk_rows = max(256, CHUNK_BYTES // max(1, D * X.element_size()))
        rows = [torch.nonzero(sample_weight[k] > 0).flatten() for k in range(K)]
        used = [mx._used(k) for k in range(K)]
        n = sum(int(r.numel()) for r in rows) + sum(int(u.numel()) for u in used)
        if n == 0:
            raise ValueError("no rows to standardise")

        def chunks():
            for k in range(K):
                for lo in range(0, rows[k].numel(), chunk_rows):
                    yield X.index_select(0, rows[k][lo:lo + chunk_rows])
                for lo in range(0, used[k].numel(), chunk_rows):
                    yield mx._problem_rows(X, k, used[k][lo:lo + chunk_rows])

        return chunk_moments(chunks, n, D, X.dtype, X.device, chunk_rows)


__all__ = ["RowMix"]
