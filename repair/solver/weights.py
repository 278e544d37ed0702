"""Weights and feature maps shared by the solvers and the repair methods: per-feature
standardisation, folding an affine feature map into a head, class/group-balanced
sample weights and DFR's group-balanced subsamples (and their expectation)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import threads

Tensor = torch.Tensor


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


def constant_features(sd: Tensor, mu: Tensor, eps: float = 1e-6, rel: float = 1e-3) -> Tensor:
    """Features that are (numerically) constant: spread below ``rel`` of their magnitude, or below
    ``eps`` -- in units of the embeddings' own scale when that is below 1 (the median over features
    of the larger of spread and magnitude): embeddings that are all about 1e-6 are not all constant. Standardising
    constant features would multiply float32 rounding noise into huge head weights that cancel
    against the bias (an exported model then disagrees with itself at 1e-4).

    (An absolute ``eps`` called every feature of a model whose embeddings are ~1e-6 constant: the
    fit ran on the raw features, its L2 penalty zeroed the weights and every head repair returned a
    one-class model, silently.)"""
    size = torch.maximum(sd, mu.abs())
    size = size[torch.isfinite(size) & (size > 0)]
    # the typical feature's size (the median of the non-zero ones: one large feature beside ~1e-6 ones,
    # a bias-like constant 1.0, must not make the others constant)
    ref = size.median() if size.numel() else sd.new_tensor(1.0)
    floor = eps * torch.clamp(ref, max=1.0)
    return sd <= torch.maximum(floor.expand_as(sd), rel * mu.abs())


#: bytes of one row chunk of the moment passes: small enough to stay in cache between the chunk's
#: products (50,000 x 2,048 float32: 4,096-row chunks took 0.23 s, 512-row chunks 0.07 s)
CHUNK_BYTES = 4 * 1024 ** 2


def standardization(X: Tensor, rows: Optional[Tensor] = None, eps: float = 1e-6, chunk_rows: Optional[int] = None):
    """Per-feature ``(scale, shift)`` such that ``X * scale + shift`` is standardised
    (zero mean, unit std over ``rows``); constant features (:func:`constant_features`) get
    scale 1. Two passes over row chunks (float64 sums): no copy of ``X`` is made."""
    return standardization_from_moments(*feature_moments(X, rows, chunk_rows), eps)


def standardization_from_moments(mu: Tensor, sd: Tensor, eps: float = 1e-6):
    """:func:`standardization`'s ``(scale, shift)`` from per-feature mean and standard deviation.

    A spread that is not a finite number is :class:`repair.errors.BadInput` (embeddings so large that
    their standard deviation is beyond the dtype's range, or holding NaN / inf): its scale ``1 / sd``
    would be 0 and silently zero the feature (float32 embeddings at 1e19 once did so to every feature:
    an all-zero head)."""
    bad = ~torch.isfinite(sd) | ~torch.isfinite(mu)
    if bool(bad.any()):
        from ..errors import BadInput

        j = int(torch.nonzero(bad).flatten()[0])
        where = (f"{int(bad.sum())} feature(s), e.g. feature {j}: mean {float(mu[j]):.3g}, "
                 f"standard deviation {float(sd[j]):.3g}")
        if bool(torch.isnan(mu[bad]).any() | torch.isnan(sd[bad]).any()):
            raise BadInput(f"the embeddings hold NaN or infinite values ({where})")
        dt = str(sd.dtype).removeprefix("torch.")
        raise BadInput(f"the embeddings are too large to standardise: their spread is beyond {dt}'s range "
                       f"({where}); rescale the embeddings")
    sd = torch.where(constant_features(sd, mu, eps), torch.ones_like(sd), sd)
    return 1.0 / sd, -mu / sd


def feature_moments(X: Tensor, rows: Optional[Tensor] = None, chunk_rows: Optional[int] = None):
    """Per-feature mean and (population) standard deviation of ``X`` (over ``rows``), in X's
    dtype, by two passes over row chunks with float64 sums (as stable as a two-pass
    variance on the whole matrix, without its ``N x D`` temporary)."""
    n = X.shape[0] if rows is None else int(rows.numel())
    if n == 0:
        raise ValueError("no rows to standardise")
    if chunk_rows is None:
        chunk_rows = max(256, CHUNK_BYTES // max(1, X.shape[1] * X.element_size()))

    def chunks():
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            yield X[lo:hi] if rows is None else X.index_select(0, rows[lo:hi].to(X.device))

    return chunk_moments(chunks, n, X.shape[1], X.dtype, X.device, min(n, chunk_rows))


def chunk_moments(chunks, n: int, d: int, dtype: torch.dtype, device, max_rows: int):
    """Per-feature mean and (population) standard deviation, in ``dtype``, of the ``n`` rows that
    ``chunks()`` yields in (at most ``max_rows``-row) pieces, by two passes with float64 sums: the
    rule every standardisation's statistics follow (:func:`feature_moments`, and mixed rows that
    are never formed, :meth:`repair.solver.mixing.RowMix.moments`).

    Within a chunk the sums run in ``dtype`` (fast); a pass whose ``dtype`` sums overflow (a chunk's
    column sum or sum of centred squares beyond float32's range: embeddings around 1e17 and more,
    where ``x * x`` alone passes 3.4e38 at 1.8e19) is redone with the chunks in float64, so the moments
    of any finite embeddings are right (the sums of non-negative squares only ever overflow to inf,
    never to a wrong finite value, so ordinary scales keep the ``dtype`` pass and its bytes). A
    standard deviation still beyond ``dtype``'s range comes back inf (and
    :func:`standardization_from_moments` refuses it)."""
    # column sums as thin products with a ones vector (far faster than a reduction over rows on
    # CPU), in dtype within a chunk, float64 across chunks. On one CPU thread: BLAS splits such a
    # product's rows among its threads, and the float32 partial sums then depend on their number
    # (1 vs 2 threads: means 2e-6 apart, and mix's head bytes with them on 4,000 x 512 rows, where every
    # other head was the same); the float64 redo runs on that thread too. 50,000 x 2,048: 0.03 s against 0.015.
    rows = max(1, int(max_rows))
    ones = torch.ones(1, rows, dtype=dtype, device=device)
    ones64 = None
    with threads.limited(1 if torch.device(device).type == "cpu" else None):
        tot = torch.zeros(d, dtype=torch.float64, device=device)
        for ch in chunks():
            tot += (ones[:, :ch.shape[0]] @ ch).squeeze(0).double()
        if not bool(torch.isfinite(tot).all()):             # a chunk's sum overflowed dtype
            ones64 = torch.ones(1, rows, dtype=torch.float64, device=device)
            tot.zero_()
            for ch in chunks():
                tot += (ones64[:, :ch.shape[0]] @ ch.double()).squeeze(0)
        mu = tot / n
        mu_x = mu.to(dtype)
        ss = torch.zeros_like(tot)
        for ch in chunks():
            dv = ch - mu_x
            ss += (ones[:, :ch.shape[0]] @ dv.mul_(dv)).squeeze(0).double()
        if not bool(torch.isfinite(ss).all()):              # centred values or their squares overflowed dtype
            ones64 = torch.ones(1, rows, dtype=torch.float64, device=device) if ones64 is None else ones64
            ss.zero_()
            for ch in chunks():
                dv = ch.double() - mu
                ss += (ones64[:, :ch.shape[0]] @ dv.mul_(dv)).squeeze(0)
    return mu_x, (ss / n).sqrt_().to(dtype)


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
    counts = torch.zeros(G, dtype=torch.float32, device=groups.device).index_add_(
        0, groups[used], torch.ones(int(used.sum()), dtype=torch.float32, device=groups.device))
    present = int((counts > 0).sum())
    w = torch.zeros(groups.shape[0], dtype=torch.float32, device=groups.device)
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
    out = torch.zeros(n_problems, N, dtype=torch.float32)
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



def expected_balanced_weights(groups: Tensor, min_per_group: int = 0,
                              mask: Optional[Tensor] = None) -> Tensor:
    """(N,) expectation of :func:`balanced_subsample_weights`: every non-empty group
    gets the total weight ``n_g = max(smallest group size, min_per_group)``, spread
    evenly over its members (``n_g / count``). One weighted fit on all rows replaces
    the average over random group-balanced subsamples, and ``C`` keeps the meaning it
    has for a subsample. ``mask`` restricts to a subset (others get weight 0)."""
    groups = groups.long().cpu()
    used = torch.ones_like(groups, dtype=torch.bool) if mask is None else mask.bool().cpu()
    w = torch.zeros(groups.shape[0], dtype=torch.float32)
    if not bool(used.any()):
        return w
    counts = torch.bincount(groups[used], minlength=int(groups.max()) + 1).double()
    n_g = max(float(counts[counts > 0].min()), float(min_per_group))
    w[used] = (n_g / counts[groups[used]]).float()
    return w

