"""A gate recorded without a usable threshold (a document written before ``threshold_text`` and with no
``threshold``) is summarised, not an internal error: the summary named a function it never imported
(found by a session-50 review)."""
from __future__ import annotations

from repair.report import gate_summary


def test_a_gate_without_a_threshold_is_summarised_with_its_figure():
    s = gate_summary({"metric": "worst_group", "threshold": None, "correct": 1, "n": 5, "passed": False})
    assert s == "worst-group accuracy 20% < –", s
    s = gate_summary({"metric": "worst_group", "threshold": None, "value": 0.25, "passed": True})
    assert s == "worst-group accuracy 25% >= –", s
