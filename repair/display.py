"""How figures are written for people (stdout tables, the HTML report): one home, no torch."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Iterable, Optional


def _cmp(a: float, b: float) -> int:
    """-1, 0 or 1: the double ``a`` below, at or above the double ``b`` -- exactly. A gate passes exactly
    when its figure's double is at or above its threshold's (:func:`repair.rules.judge`: the exact
    comparison, and a threshold that is the figure's own double is met; rounding is monotonic), so a
    figure compared here as a double sits on the side the gate says."""
    return (a > b) - (a < b)


def _decimal(q: Fraction, digits: int, sign: str = "") -> str:
    """The exact rational ``q`` rounded (half to even) to ``digits`` decimals, as text, with ``q``'s sign
    (``sign`` ``"+"``: a ``+`` on what is not below 0)."""
    n = round(q * 10 ** digits)
    body = f"{abs(n) // 10 ** digits}.{abs(n) % 10 ** digits:0{digits}d}"
    return ("-" if q < 0 else "+" if sign == "+" else "") + body


def _shown(value: float, scale: int, ok: Callable[[str], bool], sign: str = "") -> str:
    """``value`` x ``scale`` with one decimal -- more until ``ok`` accepts the text: first as Python writes
    the product (one decimal of it as ever: 1/80 is 1.2%), then rounded from the exact value (a figure a
    few units in the last place from a threshold, where the product's own rounding would hide the side);
    in exponent notation when no 20 decimals will do (a figure of 1e-300)."""
    if not math.isfinite(value * scale):          # a figure no fraction is (1e307): as Python writes it
        return f"{value * scale:{sign}.1f}"
    q = Fraction(value) * scale
    for digits in range(1, 21):
        for s in (f"{value * scale:{sign}.{digits}f}", _decimal(q, digits, sign)):
            if ok(s):
                return s
    return f"{value * scale:{sign}.17g}"


def percent(x: Optional[float], missing: str = "-", against: Iterable[float] = ()) -> str:
    """``x`` (a fraction) as a percentage with one decimal -- more where one decimal would round it onto
    or across a figure it is judged against: ``100.0%`` for a figure with errors, ``0.0%`` for one with
    hits, and each threshold in ``against`` (fractions: the gates beside the figure). 2499/2500 is
    ``99.96%``, never ``100.0%``; 1999/2500 beside an 80% gate is ``79.96%``, never ``80.0%``; beside a
    gate it meets, never below it. Exact: the figure and what is shown, read back, are compared with each
    threshold as doubles, as the gate compares them. ``missing`` for None."""
    if x is None:
        return missing
    v = float(x)
    if not math.isfinite(v):
        return f"{100 * v:.1f}%"
    marks = (0.0, 1.0) + tuple(float(t) for t in against)
    want = [_cmp(v, m) for m in marks]
    return _shown(v, 100, lambda s: [_cmp(float(Fraction(s) / 100), m) for m in marks] == want) + "%"


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
    b, a = float(before), float(after)
    if not (math.isfinite(a) and math.isfinite(b)):
        return f"{100 * (a - b):+.1f}"
    q = (Fraction(a) - Fraction(b)) * 100
    if not q:
        return "0.0"
    want = (q > 0) - (q < 0)
    return _shown(a - b, 100,
                  lambda s: (Fraction(s) > 0) - (Fraction(s) < 0) == want and s[0] in "+-", "+")
