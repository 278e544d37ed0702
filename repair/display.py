"""How figures are written for people (stdout tables, the HTML report): one home, no torch."""
from __future__ import annotations

from typing import Optional


def percent(x: Optional[float], missing: str = "-") -> str:
    """``x`` (a fraction) as a percentage with one decimal -- more where one decimal would round a
    figure with errors up to ``100.0%`` or one with hits down to ``0.0%`` (2499/2500 is ``99.96%``, never
    ``100.0%`` beside a gate line saying it is below 100%). ``missing`` for None."""
    if x is None:
        return missing
    v = 100 * float(x)
    digits = 1
    while True:          # as many digits as it takes to keep 0 < v < 100 off 0 and 100 (at most 15)
        s = f"{v:.{digits}f}"
        if not (0 < v < 100 and float(s) in (0.0, 100.0)) or digits >= 15:
            return s + "%"
        digits += 1
