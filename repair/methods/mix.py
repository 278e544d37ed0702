"""Last-layer data mixing (after Xue et al., 2023), fitted exactly like DFR.

For every DFR problem (tuning fits and final refits) the training set is built as:

1. a group-balanced subsample ``B`` of the data (groups given, or inferred = class x
   correct/incorrect under the original head; the same rule and
   ``min_subsample_per_group`` floor as :mod:`repair.methods.dfr`);
2. for each example ``x`` of ``B`` and each of ``n_mix_per_example`` copies, a random
   partner ``x_bal`` of the SAME class drawn from ``B`` (uniformly, another example
   when the class has more than one), mixed as ``s * x_bal + (1 - s) * x`` with the
   label kept. ``s = mix_weight`` (default 0.5), or ``s ~ Beta(mix_beta, mix_beta)``
   per mixed example when ``mix_beta > 0``.

Because ``B`` is balanced, a partner comes from any group of the class equally
often, so mixing interpolates between the groups of a class: features that differ
between groups of a class (spurious) are averaged out, features shared by the class
(core) are kept, and the small groups gain many new samples. The originals and the
mixed examples share the subsample's weights, scaled by ``1/(1+n_mix_per_example)``
so the total weight -- and so the meaning of ``C`` -- equals DFR's. The mixed examples are never
formed: each problem's are handed to the solver as pairs of row indices and coefficients
(:class:`repair.solver.mixing.RowMix`); a mixed row's logit is the same mix of two logits, so
the two-class solvers fit them at the cost of the rows alone (``python -m bench.mix_scale``, group
labels, one thread: 50,000 x 2,048 embeddings 24.0 s and 3.9 GB above the embeddings with the
rows formed, 6.5 s and 0.5 GB without; the same head). The fit is
:func:`repair.methods.dfr.run_balanced_protocol` (C tuned on a held-out half by
worst-group accuracy on *unmixed* data, ``n_refits`` averaged refits, one batched
solver call each) with this builder instead of DFR's plain subsampling.

Config fields (:class:`MixConfig`): all of :class:`repair.methods.dfr.DFRConfig`
(``protocol`` is ``"bagged"`` (default, L2) or ``"paper"`` (L1): the mixed training sets are
built per balanced subsample, so the fast protocol's single weighted fit does not apply;
``c_grid``/``tol``/``max_iter`` left at None take the paper protocol's defaults; the fast protocol's
``solver`` and ``group_cap`` do nothing here and are refused when changed) plus

- ``mix_weight`` (0.5): the mixing coefficient ``s`` when ``mix_beta == 0`` (refused when changed
  with ``mix_beta > 0`` or ``n_mix_per_example: 0``).
- ``mix_beta`` (0.0): if > 0, draw ``s ~ Beta(mix_beta, mix_beta)`` per mixed example (refused when
  changed with ``n_mix_per_example: 0``).
- ``n_mix_per_example`` (1): mixed copies per balanced example.
- ``n_refits`` (10, DFR's is 20): averaged refits with the chosen strength.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import solver as S
from ..solver.mixing import RowMix
from ..config import above, setting
from . import AFFINE, RepairInputs, RepairOutput, register_method
from .dfr import DFRConfig, run_balanced_protocol

__all__ = ["MixConfig", "mix", "make_mix_builder"]


@dataclass
class MixConfig(DFRConfig):
    # mix builds per-subsample training sets: the subsample protocols only (bagged: L2, batched
    # Newton for two classes -- 5-30x faster than the paper's L1 at equal worst-group accuracy)
    protocol: str = setting("bagged", choices=("bagged", "paper"))
    # 10 averaged refits, not DFR's 20: every mixed training set is already an average over random
    # partners; measured on the three visible tasks (balanced and skewed repair sets, with and
    # without group labels, seeds 0-2) 10 refits moved test worst-group accuracy by -1.0 ... +1.3
    # points (mean -0.1) and halved mix's time, the costliest of auto's candidates
    n_refits: int = setting(10, ge=1, le=1000)
    # (dfr's fast-protocol settings, solver and group_cap, are refused when changed: mix never runs it)
    # mix_weight is the coefficient only while mix_beta is 0 (else s ~ Beta); neither mixes anything
    # without mixed copies (n_mix_per_example 0)
    mix_weight: float = setting(0.5, ge=0, le=1, only_if={"mix_beta": (0.0,), "n_mix_per_example": above(0)})
    mix_beta: float = setting(0.0, ge=0, only_if={"n_mix_per_example": above(0)})
    n_mix_per_example: int = setting(1, ge=0, le=100)


def make_mix_builder(cfg: MixConfig):
    """A DFR ``problem_builder`` returning each problem's mixed rows as a
    :class:`repair.solver.mixing.RowMix` (indices into the data, never formed: the solver works
    from the rows themselves)."""
    if cfg.n_mix_per_example < 0:
        raise ValueError("n_mix_per_example must be >= 0")
    if not (0.0 <= cfg.mix_weight <= 1.0):
        raise ValueError("mix_weight must be in [0, 1]")

    def build(X, y, groups, n_problems, generator, min_per_group):
        w_sub = S.balanced_subsample_weights(groups, n_problems, generator, min_per_group=min_per_group)
        n_mix = int(cfg.n_mix_per_example)
        scale = 1.0 / (1 + n_mix)
        firsts, partners, coefs, weights = [], [], [], []
        for k in range(n_problems):
            idx = torch.nonzero(w_sub[k] > 0).flatten()
            wk = w_sub[k, idx] * scale
            yk = y[idx]
            fk, pk, sk, wm = [], [], [], []
            for _ in range(n_mix):
                partner = torch.empty_like(idx)
                for c in torch.unique(yk).tolist():
                    pos = torch.nonzero(yk == c).flatten()
                    n = pos.numel()
                    if n == 1:
                        partner[pos] = idx[pos]
                        continue
                    # a uniformly random OTHER member of the class: offset in 1..n-1
                    off = torch.randint(1, n, (n,), generator=generator)
                    partner[pos] = idx[pos[(torch.arange(n) + off) % n]]
                if cfg.mix_beta <= 0:
                    s = torch.full((idx.numel(),), float(cfg.mix_weight), dtype=torch.float32)
                else:
                    s = _beta_sample(idx.numel(), float(cfg.mix_beta), generator)
                fk.append(idx)
                pk.append(partner)
                sk.append(s)
                wm.append(wk)
            w_sub[k, idx] = wk
            firsts.append(torch.cat(fk) if fk else idx[:0])
            partners.append(torch.cat(pk) if pk else idx[:0])
            coefs.append(torch.cat(sk) if sk else wk[:0])
            weights.append(torch.cat(wm) if wm else wk[:0])
        # every problem is a balanced subsample of the same size (n_g rows of each group), so each has
        # the same number of mixed rows
        mix = RowMix(torch.stack(firsts), torch.stack(partners), torch.stack(coefs), torch.stack(weights))
        return X, y, w_sub, mix

    return build


def _beta_sample(n: int, a: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` samples of a symmetric Beta(a, a) by Johnk's rejection method, driven by
    ``generator`` so that runs are reproducible (torch.distributions is not)."""
    out = torch.full((n,), 0.5, dtype=torch.float32)
    todo = torch.arange(n)
    for _ in range(200):
        if todo.numel() == 0:
            break
        u1 = torch.rand(todo.numel(), generator=generator, dtype=torch.float32) ** (1.0 / a)
        u2 = torch.rand(todo.numel(), generator=generator, dtype=torch.float32) ** (1.0 / a)
        s = u1 + u2
        ok = (s <= 1.0) & (s > 0)
        out[todo[ok]] = u1[ok] / s[ok]
        todo = todo[~ok]
    return out


def _freeze(cfg: MixConfig, diag: dict) -> MixConfig:
    """Refit with the strength the inner selection chose."""
    return dataclasses.replace(cfg, c_grid=(diag["chosen"]["C"],))

@register_method("mix", summary="Last-layer data mixing: same-class mixing within group-balanced "
                                "subsamples, then fitted exactly as DFR",
                 config=MixConfig, groups="optional", freeze=_freeze, transform=AFFINE)
def mix(inputs: RepairInputs, config: MixConfig) -> RepairOutput:
    if config.protocol not in ("bagged", "paper"):     # a config built without validation
        raise ValueError(f"mix supports protocol='bagged' or 'paper' only, got {config.protocol!r}")
    out = run_balanced_protocol(inputs, config, make_mix_builder(config), "mix")
    out.diagnostics.update({"mix_weight": float(config.mix_weight), "mix_beta": float(config.mix_beta),
                            "n_mix_per_example": int(config.n_mix_per_example)})
    return out
