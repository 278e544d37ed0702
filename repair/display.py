"""How figures are written for people (stdout tables, the HTML report): one home, no torch."""
from __future__ import annotations

from typing import Optional


def _fixed(v: float, avoid: tuple[float, ...], sign: str = "") -> str:
    """``v`` with one decimal -- more where one decimal would round it onto one of ``avoid`` (the
    figures it is not: at most 15 decimals). ``sign``: ``"+"`` to sign it."""
    digits = 1
    while True:
        s = f"{v:{sign}.{digits}f}"
        if float(s) not in avoid or digits >= 15:
            return s
        digits += 1


def percent(x: Optional[float], missing: str = "-") -> str:
    """``x`` (a fraction) as a percentage with one decimal -- more where one decimal would round a
    figure with errors up to ``100.0%`` or one with hits down to ``0.0%`` (2499/2500 is ``99.96%``, never
    ``100.0%`` beside a gate line saying it is below 100%). ``missing`` for None."""
    if x is None:
        return missing
    v = 100 * float(x)
    return _fixed(v, (0.0, 100.0) if 0 < v < 100 else ()) + "%"


def points_delta(before: Optional[float], after: Optional[float], missing: str = "-") -> str:
    """The change from ``before`` to ``after`` (fractions) in percentage points, signed, with one
    decimal -- more where one decimal would show a change as none (99.96% -> 100.0% is ``+0.04``,
    never ``+0.0``); no change at all is ``0.0``, unsigned. ``missing`` when either is None."""
    if before is None or after is None:
        return missing
    v = 100 * (float(after) - float(before))
    return _fixed(v, (0.0,), "+") if v else "0.0"
