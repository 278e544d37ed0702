"""How figures are written for people (stdout tables, the HTML report): one home, no torch."""
from __future__ import annotations

from typing import Iterable, Optional


def _side(a: float, b: float) -> int:
    """-1, 0 or 1: ``a`` below, at or above ``b`` (equal within float rounding of a ratio: a few units in
    the last place -- a figure and a threshold differ by that much only when the threshold is the figure
    written as a float, which the gate counts as met --, so a threshold written with many digits,
    0.6666666666667 beside 2/3, is still a side)."""
    d = a - b
    return 0 if abs(d) <= 8 * 2.220446049250313e-16 * max(1.0, abs(a), abs(b)) else (1 if d > 0 else -1)


def _fixed(v: float, marks: tuple[float, ...], sign: str = "") -> str:
    """``v`` with one decimal -- more where one decimal would move it onto or across one of ``marks``
    (the values it is judged against: 0, 100, a gate's threshold), at most 15 decimals. ``sign``:
    ``"+"`` to sign it."""
    digits = 1
    while True:
        s = f"{v:{sign}.{digits}f}"
        if all(_side(float(s), m) == _side(v, m) for m in marks) or digits >= 15:
            return s
        digits += 1


def percent(x: Optional[float], missing: str = "-", against: Iterable[float] = ()) -> str:
    """``x`` (a fraction) as a percentage with one decimal -- more where one decimal would round it onto
    or across a figure it is judged against: ``100.0%`` for a figure with errors, ``0.0%`` for one with
    hits, and each threshold in ``against`` (fractions: the gates beside the figure). 2499/2500 is
    ``99.96%``, never ``100.0%``; 1999/2500 beside an 80% gate is ``79.96%``, never ``80.0%``.
    ``missing`` for None."""
    if x is None:
        return missing
    v = 100 * float(x)
    return _fixed(v, (0.0, 100.0) + tuple(100 * float(t) for t in against)) + "%"


def gate_thresholds(gates: Iterable[Optional[dict]]) -> tuple[float, ...]:
    """The thresholds (fractions) of gate results (:func:`repair.rules.judge`'s dicts; None skipped):
    what :func:`percent`'s ``against`` takes for the figures shown beside them."""
    return tuple(float(g["threshold"]) for g in gates if g and g.get("threshold") is not None)


def points_delta(before: Optional[float], after: Optional[float], missing: str = "-") -> str:
    """The change from ``before`` to ``after`` (fractions) in percentage points, signed, with one
    decimal -- more where one decimal would show a change as none (99.96% -> 100.0% is ``+0.04``,
    never ``+0.0``); no change at all is ``0.0``, unsigned. ``missing`` when either is None."""
    if before is None or after is None:
        return missing
    v = 100 * (float(after) - float(before))
    return _fixed(v, (0.0,), "+") if v else "0.0"
