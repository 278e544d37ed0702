"""HTML reports a person reads, JSON beside them for machines.

One page, self-contained (inline CSS, inline SVG charts, a few lines of inline script to sort
the summary table; nothing is fetched): ``zoo-report.html`` from ``repair zoo`` and the same
per-model section from ``repair fix --report FILE.html``. Each model section shows

- the figures before and after the repair (or, for a gate-only run, as measured), with a
  per-group bar chart (per group with group labels, else per inferred group: class x
  correctly/incorrectly classified by the original model, else per class);
- the candidates the recipe compared and the one chosen;
- the probe's per-neuron delta histogram on the repair set (NeuronTune's statistic,
  :func:`repair.probing.neuron_deltas`: median activation on misclassified minus correct
  samples, per class and embedding dimension; > 0: the dimension fires more on errors).

The per-model entry (``model_entry``) is the one schema both commands share::

    {"name", "status": "done" | "error" | "pending", "mode": "fix" | "eval", "gate": {...} | None,
     "result": {... compact figures, see compact_fix / compact_eval} | None, "error": str | None}
"""
from __future__ import annotations

import datetime as _dt
import html
import math
from pathlib import Path
from typing import Any, Optional, Sequence


FIGURE_KEYS = ("n", "accuracy", "worst_class_accuracy", "worst_group_accuracy", "worst_group",
               "per_group", "per_class", "per_inferred_group", "absent_groups")


# ------------------------------------------------------------------ per-model data
def _figures(rep: Optional[dict]) -> Optional[dict]:
    return None if rep is None else {k: rep.get(k) for k in FIGURE_KEYS}


#: what a report keeps of a fix's ``model_change`` (the network's change, for a model repair)
MODEL_CHANGE_KEYS = ("steps", "stopped_by", "budget", "body_changed", "head_changed", "best_step")


def _plain_number(v) -> str:
    """A number as ``--budget`` reads it: no exponent, no trailing zeros (1000000, 28800000, 2.5)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if float(v).is_integer():
        return str(int(v))
    return f"{v:f}".rstrip("0").rstrip(".")


def budget_text(budget) -> str:
    """A training budget as ``--budget`` writes it (``200steps``, ``3epochs``, ``2s``, joined by commas;
    ``(default)`` when it was the default; ``none`` without a limit), from its record (``{"seconds": 2.0,
    "default": False}``); a budget shared among runs (``members``, ``cross_fit``) is each run's share."""
    if not isinstance(budget, dict):
        return str(budget)
    units = (("steps", "steps"), ("epochs", "epochs"), ("seconds", "s"))
    parts = ",".join(f"{_plain_number(budget[k])}{u}" for k, u in units if budget.get(k) is not None) or "none"
    runs = budget.get("members") or budget.get("cross_fit")
    if isinstance(runs, int) and not isinstance(runs, bool) and runs > 1:
        # a cross-fitted run's record holds both (its runs are the members of _members_result)
        parts += f" for each of {runs} {'cross-fit runs' if budget.get('cross_fit') else 'members'}"
    return parts + (" (default)" if budget.get("default") else "")


def training_sentence(model_change: Optional[dict]) -> Optional[str]:
    """What ended a model repair's training, its budget, and whether the network's body changed -- the
    line the table, the HTML report and the zoo report show; None for a head repair (nothing trained)."""
    mc = model_change or {}
    if not mc.get("stopped_by"):
        return None
    # the whole record lists the changed tensors; a report's compact one keeps whether the body and the
    # head changed (a record written before ``head_changed`` was kept: only the list can say)
    unchanged = mc.get("changed_tensors") == [] or (mc.get("body_changed") is False
                                                    and mc.get("head_changed") is False)
    return (f"training ended by {mc['stopped_by']}" + (f" (budget {budget_text(mc['budget'])})" if mc.get("budget") else "")
            + ("; nothing changed: the output is the source model" if unchanged else
               "; the body kept is the original one: only the head changed" if mc.get("body_changed") is False
               else ""))


def chosen_members(rep: dict) -> list:
    """The rows of the candidates table (their labels) that the written head is: the chosen candidate's
    row, or, where the choice has no row of its own (``auto``'s ``average of mix + afr``), its members'."""
    labels = [c.get("candidate") for c in rep.get("candidates") or []]
    if rep.get("candidate") in labels:
        return [rep["candidate"]]
    diag = rep.get("diagnostics") if isinstance(rep.get("diagnostics"), dict) else {}
    members = diag.get("ensemble") or rep.get("chosen_members") or []
    return [m for m in labels if m in {str(x) for x in members}]


def compact_fix(rep: dict, delta_histogram: Optional[dict] = None) -> dict:
    """What a report shows of a :func:`repair.pipeline.fix_model` result."""
    return {"mode": "fix", "model": rep["model"].get("source"), "family": rep["model"].get("family"),
            "output": rep.get("output"), "recipe": rep.get("recipe"),
            # what a rerun must give to reproduce the repair (the report stands alone, as the provenance does)
            "recipe_source": (rep.get("settings") or {}).get("recipe_source"),
            "seed": (rep.get("settings") or {}).get("seed"), "method": rep.get("method"),
            "kind": rep.get("kind"), "candidate": rep.get("candidate"),
            "selection_criterion": rep.get("selection_criterion"),
            "candidates": rep.get("candidates") or [], "chosen_members": chosen_members(rep),
            "neurons_suppressed": rep.get("neurons_suppressed"),
            "measured_on": rep.get("measured_on"), "before": _figures(rep["before"]),
            "after": _figures(rep["after"]), "export": rep.get("export"), "timing": rep.get("timing"),
            "warnings": list(rep.get("warnings") or []), "duplicates": rep.get("duplicates"),
            "model_change": {k: (rep.get("model_change") or {}).get(k) for k in MODEL_CHANGE_KEYS},
            "delta_histogram": delta_histogram}


def compact_eval(rep: dict) -> dict:
    """What a report shows of a :func:`repair.api.evaluate_model` result (a gate-only run)."""
    return {"mode": "eval", "model": rep["model"].get("source"), "family": rep["model"].get("family"),
            "measured_on": f"{rep['data']['source']} ({rep['n']} samples)", "before": _figures(rep),
            "after": None, "candidates": [], "delta_histogram": None, "warnings": list(rep.get("warnings") or []),
            "timing": {"embedding_seconds": rep["embedding"]["seconds"],
                       "embedding_from_cache": rep["embedding"]["from_cache"]}}


def check_gate(result: dict, threshold, metric: str = "auto", expected=None,
               group_by: Optional[str] = None, names=None) -> Optional[dict]:
    """The gate on the repaired figures (the measured ones for a gate-only run): :func:`repair.rules.judge_gates`,
    the one home of gates (:func:`repair.rules.judge` for the comparison); ``expected`` the groups that must
    have samples (``group_by`` their column), as ``repair eval --expect-groups``, named in a refusal as
    ``names`` says (:class:`repair.rules.GateNames`; default: a manifest's ``expect_groups``)."""
    from .rules import GateNames, judge_gates

    figures = result.get("after") or result.get("before") or {}
    gates = judge_gates(figures, {metric: threshold}, expected or None, group_by,
                        names or GateNames.manifest()).gates
    return gates[0] if gates else None


def model_entry(name: str, result: Optional[dict], *, gate: Optional[dict] = None, status: str = "done",
                error: Optional[str] = None, **extra: Any) -> dict:
    return {"name": name, "status": status, "gate": gate, "result": result, "error": error, **extra}


def histogram_of(deltas, class_names: Sequence[str], bins: int = 30, top: int = 5) -> dict:
    """Histogram counts of a (C, D) delta matrix (NaN rows: classes without errors or without
    correct samples are left out) and its largest entries."""
    import torch

    finite = torch.isfinite(deltas)
    vals = deltas[finite]
    out = {"classes": int(deltas.shape[0]), "dims": int(deltas.shape[1]), "n": int(vals.numel()),
           "positive": int((vals > 0).sum()), "edges": [], "counts": [], "top": []}
    if not vals.numel():
        return out
    # bins of one width w, closed on the right (the first on both sides), with 0 an edge: the bins above 0
    # hold exactly the ``positive`` values (a bin across 0 would hold some of them and be drawn with
    # neither side)
    lo, hi = float(vals.min()), float(vals.max())
    w = (hi - lo) / bins if hi > lo else (abs(hi) or 1.0) / bins
    if not (math.isfinite(w) and w > 0 and math.isfinite(lo / w) and math.isfinite(hi / w)):
        # a range a double cannot cut into bins of one width (subnormal or near-overflow float64 deltas):
        # the two sides of 0 alone
        neg, pos = int((vals <= 0).sum()), int((vals > 0).sum())
        out["edges"] = [lo, 0.0, hi] if neg and pos else [0.0, hi] if pos else [lo, 0.0]
        out["counts"] = [c for c in (neg, pos) if c]
        return _top(out, deltas, finite, class_names, top)
    m = math.floor(lo / w)                         # the first edge, m * w, is at or below every value
    if m == 0 and lo == 0:
        m = -1                                     # ... and zeros (dead neurons) in the bin (-w, 0], not above 0
    k = max(1, math.ceil(hi / w) - m)              # ... and the last, (m + k) * w, at or above every one
    idx = (torch.ceil(vals.double() / w).long() - 1 - m).clamp_(0, k - 1)
    idx = torch.where(vals > 0, idx.clamp(min=-m), idx.clamp(max=-m - 1)) if 0 < -m < k else idx
    out["edges"] = [(m + i) * w for i in range(k + 1)]
    out["counts"] = [int(c) for c in torch.bincount(idx, minlength=k).tolist()]
    return _top(out, deltas, finite, class_names, top)


def _top(out: dict, deltas, finite, class_names: Sequence[str], top: int) -> dict:
    import torch

    flat = torch.where(finite, deltas, torch.full_like(deltas, float("-inf"))).flatten()
    k = min(top, int(finite.sum()))
    v, idx = flat.topk(k)
    out["top"] = [{"class": class_names[i // deltas.shape[1]], "neuron": i % deltas.shape[1], "delta": float(d)}
                  for d, i in zip(v.tolist(), idx.tolist())]
    return out


# ------------------------------------------------------------------ formatting helpers
def _e(x: Any) -> str:
    """Text for the page: HTML-escaped, a user's controls and invisible characters shown
    (:func:`repair.io.visible`)."""
    from .io import visible

    return html.escape(visible("" if x is None else str(x)), quote=True)


def _pct(x: Optional[float], gate: Optional[dict] = None) -> str:
    """A figure for the page; ``gate``: the gate judged beside it (never shown as meeting a threshold it
    fails)."""
    from .display import gate_thresholds, percent

    return percent(x, missing="–", against=gate_thresholds([gate]))


def headline(figures: Optional[dict]) -> tuple[Optional[float], str]:
    """(worst-group accuracy, or worst-class where no groups were measured; its label)."""
    if not figures:
        return None, "WGA"
    if figures.get("worst_group_accuracy") is not None:
        return figures["worst_group_accuracy"], "WGA"
    return figures.get("worst_class_accuracy"), "worst class"


def _breakdown(figures: dict) -> tuple[str, list[dict]]:
    for key, label in (("per_group", "per group"), ("per_inferred_group", "per inferred group (class × "
                       "correct/incorrect by the original model)"), ("per_class", "per class")):
        if figures.get(key):
            return label, figures[key]
    return "per class", []


def bar_chart(before: dict, after: Optional[dict], gate: Optional[dict] = None) -> str:
    """Horizontal per-group bars, before (grey) and after (blue), as inline SVG."""
    title, rows = _breakdown(before)
    rows_after = {r["name"]: r for r in _breakdown(after)[1]} if after else {}
    series = [("before" if after else "measured", "#a0aec0", {r["name"]: r for r in rows})]
    if after:
        series.append(("after", "#2b6cb0", rows_after))
    label_w, bar_w, bar_h, gap = 230, 330, 11, 9
    row_h = bar_h * len(series) + gap
    height = 26 + row_h * len(rows) + 8
    width = label_w + bar_w + 70
    parts = [f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}"><title>accuracy {_e(title)}</title>']
    for x in (0, 0.5, 1.0):
        gx = label_w + bar_w * x
        parts.append(f'<line x1="{gx:.1f}" y1="18" x2="{gx:.1f}" y2="{height - 6}" stroke="#e2e8f0"/>'
                     f'<text x="{gx:.1f}" y="12" font-size="10" text-anchor="middle" fill="#718096">{int(100 * x)}%</text>')
    y = 26
    for r in rows:
        name = r["name"]
        parts.append(f'<text x="{label_w - 8}" y="{y + row_h / 2 - 2:.1f}" font-size="11" text-anchor="end" '
                     f'fill="#2d3748">{_e(name)} <tspan fill="#718096">(n={r["n"]})</tspan></text>')
        for k, (sname, colour, by) in enumerate(series):
            acc = (by.get(name) or {}).get("accuracy")
            by_ = y + k * bar_h
            w = 0 if acc is None else bar_w * acc
            parts.append(f'<rect x="{label_w}" y="{by_}" width="{w:.1f}" height="{bar_h - 1}" fill="{colour}">'
                         f'<title>{_e(name)} {sname}: {_pct(acc, gate)}</title></rect>'
                         f'<text x="{label_w + w + 4:.1f}" y="{by_ + bar_h - 2}" font-size="10" '
                         f'fill="#2d3748">{_pct(acc, gate)}</text>')
        y += row_h
    parts.append("</svg>")
    legend = " ".join(f'<span class="key" style="background:{c}"></span>{n}' for n, c, _ in series)
    return f'<figure><figcaption>accuracy {_e(title)} &nbsp; {legend}</figcaption>{"".join(parts)}</figure>'


def histogram_svg(h: dict) -> str:
    """The delta histogram as inline SVG (bars above zero in red)."""
    if not h or not h.get("counts"):
        return ('<p class="note">no neuron deltas: every class needs both misclassified and correctly '
                'classified repair samples</p>')
    counts, edges = h["counts"], h["edges"]
    width, height, pad_l, pad_b = 560, 170, 40, 30
    plot_w, plot_h = width - pad_l - 10, height - pad_b - 10
    peak = max(counts) or 1
    bw = plot_w / len(counts)
    parts = [f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>per-neuron delta histogram</title>']
    for i, c in enumerate(counts):
        bh = plot_h * c / peak
        colour = "#c53030" if edges[i] >= 0 else "#718096"       # a bin above 0 holds only values above 0
        parts.append(f'<rect x="{pad_l + i * bw + 0.5:.1f}" y="{10 + plot_h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                     f'height="{bh:.1f}" fill="{colour}"><title>{"[" if i == 0 else "("}{edges[i]:.3g}, {edges[i + 1]:.3g}]: {c}</title></rect>')
    base = 10 + plot_h
    parts.append(f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + plot_w}" y2="{base}" stroke="#4a5568"/>')
    lo, hi = edges[0], edges[-1]
    ticks = [lo, hi] + ([0.0] if lo < 0 < hi else [])
    for t in ticks:
        x = pad_l + plot_w * (t - lo) / (hi - lo)
        parts.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#4a5568"/>'
                     f'<text x="{x:.1f}" y="{base + 16}" font-size="10" text-anchor="middle" fill="#4a5568">{t:.3g}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="18" font-size="10" text-anchor="end" fill="#4a5568">{peak}</text>'
                 f'<text x="{pad_l + plot_w / 2:.1f}" y="{height - 2}" font-size="10" text-anchor="middle" '
                 f'fill="#4a5568">δ = median activation (misclassified) − median (correct)</text></svg>')
    top = ", ".join(f"{_e(t['class'])}/#{t['neuron']} ({t['delta']:.3g})" for t in h.get("top", []))
    cap = (f"per-neuron δ on the repair set (original model): {h['n']} values over {h['classes']} classes × "
           f"{h['dims']} dimensions, {h['positive']} above 0 (red: fire more on errors)")
    return (f'<figure><figcaption>{_e(cap)}</figcaption>{"".join(parts)}'
            + (f'<p class="note">largest: {top}</p>' if top else "") + "</figure>")


def _score(c: dict) -> str:
    """A candidate's selection score, or the most it could still reach where its folds stopped early."""
    return _pct(c.get("score")) if c.get("score_at_most") is None else "≤ " + _pct(c["score_at_most"])


def candidates_table(result: dict) -> str:
    rows = result.get("candidates") or []
    if not rows:
        return ""
    chosen = set(chosen_members(result))
    averaged = len(chosen) > 1
    body = []
    for c in rows:
        mark = ' class="chosen"' if c.get("candidate") in chosen else ""
        tick = (" ✓ (averaged)" if averaged else " ✓") if mark else ""
        body.append(f"<tr{mark}><td>{_e(c.get('candidate'))}{tick}</td><td>{_e(c.get('kind'))}</td>"
                    f"<td class='num'>{_score(c)}</td><td class='num'>{_pct(c.get('selection_accuracy'))}</td>"
                    f"<td>{_e(c.get('stopped') or c.get('scored_on') or c.get('skipped') or c.get('final') or '')}</td>"
                    f"<td class='num'>{_e(c.get('fit_seconds', ''))}</td></tr>")
    crit = result.get("selection_criterion")
    return ("<h4>candidates" + (f" <span class='note'>(selected by {_e(crit)})</span>" if crit else "") + "</h4>"
            "<table><thead><tr><th>candidate</th><th>kind</th><th>selection score</th><th>selection acc</th>"
            f"<th>scored on</th><th>fit s</th></tr></thead><tbody>{''.join(body)}</tbody></table>")


def gate_summary(gate: dict) -> str:
    """A gate in a few words for a table cell (the zoo's HTML summary, ``repair zoo``'s table and
    progress lines): its metric, the figure with the digits that tell it from the threshold
    (:func:`repair.rules._show_pct`, as the gate's message shows it) and the threshold as written,
    e.g. ``worst-group accuracy 71.33% < 71.34%``, never ``71.3% < 71.3%``."""
    from fractions import Fraction

    from .errors import BadInput
    from .rules import METRIC_NAMES, _show_pct, _threshold_pct, parse_threshold, show_against

    try:
        tv = parse_threshold(gate["threshold_text"]).value
    except (KeyError, TypeError, ValueError, BadInput):     # a document written before threshold_text
        tv = None if gate.get("threshold") is None else Fraction(gate["threshold"]).limit_denominator(10 ** 9)
    name = METRIC_NAMES.get(gate.get("metric"), str(gate.get("metric") or "gate"))
    thr = "–" if tv is None else _threshold_pct(tv)
    k, n = gate.get("correct"), gate.get("n")
    if k is not None and n:
        fv = Fraction(k, n)
    elif gate.get("value") is not None:                    # a document written before the counts
        fv = Fraction(gate["value"]).limit_denominator(10 ** 12)
    else:
        return f"{name} not measurable, gate {thr}"
    figure, thr = (_show_pct(fv), thr) if tv is None else show_against(fv, tv)
    missing = gate.get("unmeasured") or []
    if missing:
        return f"{name} {figure}, but {len(missing)} without samples; gate {thr}"
    return f"{name} {figure} {'>=' if gate['passed'] else '<'} {thr}"


def _gate_text(gate: Optional[dict]) -> str:
    if not gate:
        return "–"
    msg = gate.get("message") or (f"{gate['metric'].replace('_', '-')} accuracy {_pct(gate['value'])} "
                                  f"{'≥' if gate['passed'] else '<'} {_pct(gate['threshold'])}")
    return ("passed: " if gate["passed"] else "FAILED: ") + msg


def model_anchor(name: str) -> str:
    """A model's section id: readable, and different for different names ("a.b" and "a-b" too)."""
    import hashlib

    slug = "".join(ch if ch.isalnum() else "-" for ch in str(name))
    return f"m-{slug}-{hashlib.sha256(str(name).encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def model_section(m: dict) -> str:
    """One model's section: headline figures, gate, bar chart, candidates, delta histogram."""
    anchor = model_anchor(m["name"])
    out = [f'<section class="model" id="{anchor}"><h3>{_e(m["name"])}</h3>']
    if m["status"] != "done" or not m.get("result"):
        msg = m.get("error") or "not run yet (the run was interrupted; a rerun resumes it)"
        out.append(f'<p class="status {m["status"]}">{_e(m["status"])}: {_e(msg)}</p></section>')
        return "".join(out)
    r = m["result"]
    b, a = r["before"], r.get("after")
    facts = [f"{_e(r.get('family'))} model <code>{_e(r.get('model'))}</code>"]
    if r.get("mode") == "fix":
        facts.append(f"recipe <b>{_e(r.get('recipe'))}</b> chose <b>{_e(r.get('candidate'))}</b> ({_e(r.get('kind'))} repair)"
                     + (f", seed {_e(r['seed'])}" if r.get("seed") is not None else ""))
        if r.get("output"):
            facts.append(f"output <code>{_e(r['output'])}</code>")
    facts.append(f"measured on {_e(r.get('measured_on'))}")
    if m.get("redone"):
        facts.append(f"run again: {_e(m['redone'])}")
    out.append("<p>" + "; ".join(facts) + "</p>")
    if r.get("warnings"):              # what the repair set is too small or too odd to support
        out.append('<ul class="warnings">' + "".join(f"<li>warning: {_e(w)}</li>" for w in r["warnings"]) + "</ul>")
    wb, label = headline(b)
    rows = [("accuracy", b.get("accuracy"), a and a.get("accuracy")),
            ("worst-class accuracy", b.get("worst_class_accuracy"), a and a.get("worst_class_accuracy"))]
    if b.get("worst_group_accuracy") is not None:
        rows.append(("worst-group accuracy", b.get("worst_group_accuracy"), a and a.get("worst_group_accuracy")))
    head = "<tr><th></th><th>before</th><th>after</th></tr>" if a else "<tr><th></th><th>measured</th></tr>"
    gate = m.get("gate")
    body = "".join(f"<tr><td>{n}</td><td class='num'>{_pct(x, gate)}</td>" + (f"<td class='num'>{_pct(y, gate)}</td>" if a else "")
                   + "</tr>" for n, x, y in rows)
    gate_html = "" if not gate else (f'<p class="gate {"pass" if gate["passed"] else "fail"}">gate: '
                                     f'{_e(_gate_text(gate))}</p>')
    out.append(f'<div class="row"><div><table class="figs"><thead>{head}</thead><tbody>{body}</tbody></table>'
               f'{gate_html}</div><div>{bar_chart(b, a, gate)}</div></div>')
    if r.get("mode") == "fix":
        out.append(candidates_table(r))
        if r.get("neurons_suppressed") is not None:
            out.append(f"<p class='note'>neurons suppressed: {_e(r['neurons_suppressed'])}</p>")
        trained = training_sentence(r.get("model_change"))
        if trained:
            out.append(f"<p class='note'>{_e(trained)}</p>")
        out.append("<h4>probe</h4>" + histogram_svg(r.get("delta_histogram")))
    out.append("</section>")
    return "".join(out)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a202c;margin:24px auto;max-width:1100px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h3{margin:0 0 6px;font-size:17px}h4{margin:14px 0 4px;font-size:14px}
.note{color:#718096;font-size:12px}.warnings{color:#975a16;font-size:13px;margin:4px 0}code{font-size:12px;background:#f7fafc;padding:0 3px}
table{border-collapse:collapse;margin:4px 0}th,td{padding:4px 9px;border-bottom:1px solid #e2e8f0;text-align:left}
th{background:#f7fafc;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" ⇅";color:#a0aec0;font-size:11px}
tr.chosen td{background:#ebf8ff}.pass{color:#276749;font-weight:600}.fail,.error{color:#c53030;font-weight:600}
.pending{color:#975a16}section.model{border:1px solid #e2e8f0;border-radius:6px;padding:12px 16px;margin:16px 0}
.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}figure{margin:0}figcaption{font-size:12px;color:#4a5568}
.summary{margin:10px 0 6px;font-size:15px}.key{display:inline-block;width:10px;height:10px;margin:0 3px 0 8px}.up{color:#276749}.down{color:#c53030}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){t.querySelectorAll('th').forEach(function(th,i){
th.addEventListener('click',function(){var b=t.tBodies[0],rows=[].slice.call(b.rows),asc=th.dataset.dir!=='asc';
t.querySelectorAll('th').forEach(function(h){delete h.dataset.dir});th.dataset.dir=asc?'asc':'desc';
rows.sort(function(r,s){var x=r.cells[i].dataset.v,y=s.cells[i].dataset.v;if(x===undefined)x=r.cells[i].textContent;
if(y===undefined)y=s.cells[i].textContent;var nx=parseFloat(x),ny=parseFloat(y);
var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));return asc?c:-c});
rows.forEach(function(r){b.appendChild(r)})})})});
"""


def _num(x: Optional[float]) -> str:
    return "-1" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6f}"


def summary_table(models: list[dict], mode: str) -> str:
    """The sortable summary: model, method chosen, WGA before -> after, mean accuracy, gate."""
    from .display import points_delta

    head = (["model", "status", "method chosen", "WGA before → after", "Δ WGA", "mean accuracy", "gate"]
            if mode == "fix" else ["model", "status", "WGA", "mean accuracy", "gate"])
    rows = []
    for m in models:
        r = m.get("result") or {}
        b, a = r.get("before"), r.get("after")
        wb, label = headline(b)
        wa, _ = headline(a)
        gate = m.get("gate")
        gate_v = "" if not gate else ("1" if gate["passed"] else "0")
        gate_cell = (f'<td data-v="{gate_v}" class="{"pass" if gate and gate["passed"] else "fail" if gate else ""}">'
                     f'{"–" if not gate else ("pass" if gate["passed"] else "FAIL")}'
                     + (f' <span class="note">{_e(gate_summary(gate))}</span>' if gate else "") + "</td>")
        status_cls = m["status"] if m["status"] != "done" else ""
        anchor = model_anchor(m["name"])
        cells = [f'<td><a href="#{anchor}">{_e(m["name"])}</a></td>',
                 f'<td class="{status_cls}">{_e(m["status"])}</td>']
        note = "" if label == "WGA" else f' <span class="note">({label})</span>'
        if mode == "fix":
            d = None if wb is None or wa is None else wa - wb
            cls = "" if d is None else ("up" if d > 0 else "down" if d < 0 else "")
            cells += [f"<td>{_e(r.get('candidate') or '–')}</td>",
                      f'<td class="num" data-v="{_num(wa)}">{_pct(wb, gate)} → <b>{_pct(wa, gate)}</b>{note}</td>',
                      f'<td class="num {cls}" data-v="{_num(d)}">{points_delta(wb, wa, missing="–")}</td>',
                      f'<td class="num" data-v="{_num(a and a.get("accuracy"))}">{_pct(a and a.get("accuracy"), gate)}</td>']
        else:
            cells += [f'<td class="num" data-v="{_num(wb)}">{_pct(wb, gate)}{note}</td>',
                      f'<td class="num" data-v="{_num(b and b.get("accuracy"))}">{_pct(b and b.get("accuracy"), gate)}</td>']
        cells.append(gate_cell)
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="summary"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def zoo_summary_line(doc: dict) -> str:
    """How a zoo went, in words (the HTML report's and the command's summary): a model passed only
    if it had a gate and met it; one without a gate is counted as such, not as passed."""
    s = doc["summary"]
    parts = [f"{s['passed']} passed"] if s["passed"] or not s.get("no_gate") else []
    parts += ([f"{len(s['failed'])} failed the gate"] if s["failed"] else []) + \
        ([f"{len(s['no_gate'])} without a gate"] if s.get("no_gate") else []) + \
        ([f"{len(s['errors'])} could not be run"] if s["errors"] else []) + \
        ([f"{len(s['pending'])} not run"] if s["pending"] else [])
    return (f"{s['models']} model{'s' if s['models'] != 1 else ''}: " + ", ".join(parts)
            + (" — the run was interrupted" if doc.get("interrupted") else ""))


def page_title(doc: dict) -> str:
    """The title of a report document's page."""
    if doc["kind"] == "zoo":
        return f"repair zoo — {Path(doc['manifest']).name} ({doc['mode']})"
    return f"repair fix — {doc['models'][0]['name']}"


def render(doc: dict) -> str:
    """The whole page for a report document (``kind``: ``zoo`` or ``fix``)."""
    models = doc["models"]
    title = page_title(doc)
    if doc["kind"] == "zoo":
        line = zoo_summary_line(doc)
        sub = (f"executor: {_e(doc.get('executor'))}; wall time {doc.get('wall_seconds', 0):.1f}s; "
               f"generated {_e(doc.get('generated'))}")
        head = (f"<h1>{_e(title)}</h1><p class='note'>{sub}</p><p class='summary'>{_e(line)}</p>"
                + summary_table(models, doc["mode"])
                + "<p class='note'>WGA = worst-group accuracy (worst-class where the data has no group column); "
                  "click a column to sort.</p>")
    else:
        head = f"<h1>{_e(title)}</h1><p class='note'>generated {_e(doc.get('generated'))}</p>"
    body = "".join(model_section(m) for m in models)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body>{head}{body}<script>{SORT_JS}</script></body></html>\n")


def clock() -> str:
    """The time now, in UTC, to the second (a run's record: a zoo journal's ``finished``)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def now() -> str:
    """When a report is generated: ``SOURCE_DATE_EPOCH`` when set (as the model's metadata honours it:
    reproducible builds), else :func:`clock`."""
    from .provenance import source_date

    return source_date() or clock()


def report_json(doc: dict) -> str:
    from .io import json_text

    return json_text(doc, indent=1)


#: the most of a report file :func:`read_report` reads (a report is far smaller)
_REPORT_MAX_BYTES = 256 * 1024 * 1024


def read_report(html_path) -> tuple[Optional[dict], Optional[str]]:
    """The document of the report :func:`write_report` wrote at ``html_path``: ``(doc, None)`` when the
    JSON beside it is a report document and the page there (if any) is the one written with it (its
    title and its ``generated`` stamp); else ``(None, why not)``. Reads only; a caller decides from this
    whether an existing report is one it may replace."""
    from .io import parse_json
    from .rules import report_outputs

    html_path, json_path = report_outputs(html_path)
    if json_path.is_symlink() or not json_path.is_file():
        return None, f"there is no report JSON {json_path.name} with it"
    try:
        if json_path.stat().st_size > _REPORT_MAX_BYTES:
            return None, f"{json_path.name} is not a report (too large)"
        doc = parse_json(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{json_path.name} is not a report ({type(e).__name__})"
    if (not isinstance(doc, dict) or doc.get("kind") not in ("zoo", "fix") or not isinstance(doc.get("generated"), str)
            or not isinstance(doc.get("models"), list) or (doc["kind"] == "zoo" and not (
                isinstance(doc.get("manifest"), str) and isinstance(doc.get("mode"), str)))
            or (doc["kind"] == "fix" and not (doc["models"] and isinstance(doc["models"][0], dict)
                                              and "name" in doc["models"][0]))):
        return None, f"{json_path.name} is not a report document of repair"
    if html_path.exists() or html_path.is_symlink():
        if html_path.is_symlink() or not html_path.is_file():
            return None, f"{html_path.name} is not a file"
        try:
            if html_path.stat().st_size > _REPORT_MAX_BYTES:
                return None, f"{html_path.name} is not a report page (too large)"
            page = html_path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            return None, f"{html_path.name} cannot be read ({e.strerror or e})"
        if (f"<title>{_e(page_title(doc))}</title>" not in page
                or f"generated {_e(doc['generated'])}" not in page):
            return None, f"{html_path.name} is not the page written with {json_path.name}"
    return doc, None


def write_report(html_path, doc: dict, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``doc`` as the HTML page and as JSON beside it (same name, ``.json``), together
    (:func:`repair.io.outputs`). An existing page or JSON is replaced only with ``force`` (the
    caller has checked, before any work, that it may be: :func:`read_report`)."""
    from .io import outputs
    from .rules import report_outputs

    html_path, json_path = report_outputs(html_path)
    with outputs(force=force) as tx:
        tx.stage(json_path, kind="file").write_text(report_json(doc), encoding="utf-8")
        tx.stage(html_path, kind="file").write_text(render(doc), encoding="utf-8")
    return html_path, json_path


def fix_document(result: dict, name: str, delta_histogram: Optional[dict]) -> dict:
    """The report document of one ``repair fix`` result (``repair fix --report``)."""
    return {"kind": "fix", "generated": now(), "models": [model_entry(name, compact_fix(result, delta_histogram))]}
