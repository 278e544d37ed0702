"""Plain-text tables for stdout."""
from __future__ import annotations

from typing import Any, Optional, Sequence


def pct(x: Optional[float], against: Sequence[float] = ()) -> str:
    from repair.display import percent

    return percent(x, against=against)



def _is_number(s: str) -> bool:
    try:
        float(s.rstrip("%s"))
        return True
    except ValueError:
        return s == "-"


def width(text: str) -> int:
    """The columns ``text`` takes on a terminal: a wide character (CJK, most emoji) two, a mark that sits on
    another (Thai's and Devanagari's vowel signs, a combining accent) or an invisible format character
    none, any other one."""
    import unicodedata

    return sum(0 if unicodedata.category(c) in ("Mn", "Me", "Cf") else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned as a terminal shows them: each cell as it is printed (a user's names shown as they
    are, :func:`repair.io.visible`) and padded by its :func:`width`."""
    from repair.io import visible

    cells = [[visible(str(h)) for h in headers]] + [["-" if c is None else visible(str(c)) for c in r] for r in rows]
    widths = [max(width(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def pad(c: str, w: int, right: bool) -> str:
        fill = " " * (w - width(c))
        return fill + c if right else c + fill
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(pad(c, w, numeric[i]) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def eval_table(rep: dict, title: str = "") -> str:
    from repair.display import gate_thresholds

    marks = gate_thresholds(rep.get("gates") or [])     # no figure shown as meeting a gate it fails

    def shown(x):
        return pct(x, marks)

    out = []
    if title:
        out.append(title)
    out.append(f"n={rep['n']}  accuracy={shown(rep['accuracy'])}  worst-class={shown(rep['worst_class_accuracy'])}"
               + (f"  worst-group={shown(rep['worst_group_accuracy'])} ({rep['worst_group']})"
                  if rep.get("per_group") is not None else "  worst-group=- (no --group-by)"))
    if rep.get("per_group") is not None:
        out.append(table(["group", "n", "accuracy"], [[r["name"], r["n"], shown(r["accuracy"])] for r in rep["per_group"]]
                         + [[g, 0, "-"] for g in rep.get("absent_groups") or []]))
        if rep.get("absent_groups"):
            out.append(f"no samples (in no figure): {', '.join(rep['absent_groups'])}")
    out.append(table(["class", "n", "accuracy"], [[r["name"], r["n"], shown(r["accuracy"])] for r in rep["per_class"]]))
    return "\n".join(out)
