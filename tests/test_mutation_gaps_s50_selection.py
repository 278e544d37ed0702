"""Tests that kill mutants a session-50 audit found surviving: a gate met exactly (not by the float
fallback), an empty group id in a worst-group score, the held-out part kept out of its candidates' fit,
every repeat of repeated folds averaged, the label-free criterion's imbalance threshold, identical
samples kept on one side of auto's folds and of dfr's fast folds, the rows the head to beat and a
fold-by-fold model repair are fitted on, the "no candidate beats the original model" warning on a tie,
dfr's fast head taken at the chosen strength whatever the grid's order, and dfr's frozen protocol."""
from __future__ import annotations

import pytest
import torch

from repair import selection as Sel
from repair.selection import (IMBALANCE_THRESHOLD, Criterion, Holdout, KFold, kfold_parts, label_free_criterion,
                              scores_from_preds, select_and_refit, worst_group_accuracy)
from test_methods_contract import _inputs, problems  # noqa: F401  (the fixture)
from test_steady import _FoldCtx


# ------------------------------------------------------------------ gates
def test_a_gate_met_exactly_says_so_without_the_float_fallback():
    """42/60 is exactly 70%: met by the exact comparison, the plain line -- not the sentence kept for a
    threshold that is a figure written as a float."""
    from repair.rules import judge

    g = judge({"n": 60, "n_correct": 42, "accuracy": 42 / 60}, "70%", "accuracy")
    assert g["passed"] is True and g["message"] == "accuracy 42/60 = 70% >= 70%"


# ------------------------------------------------------------------ scores
def test_a_group_id_without_rows_does_not_score_zero():
    """Group id 1 has no rows: the worst group is among the groups that have some (one model, and a
    batch of two)."""
    pred, y, groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0]), torch.tensor([0, 0, 2, 2])
    assert worst_group_accuracy(pred, y, groups) == 0.5
    batch = worst_group_accuracy(torch.stack([pred, y]), y, groups)
    assert batch.tolist() == [0.5, 1.0]


def test_a_holdout_choice_fits_its_candidates_on_the_rows_it_does_not_score():
    x = torch.rand(300, generator=torch.Generator().manual_seed(0))
    y = (x > 0.6).long()
    cands = [0.2, 0.4, 0.6, 0.8]
    fitted = []

    def fit(idx, which):
        fitted.append(idx.clone())
        return [cands[i] for i in which]

    sel = select_and_refit(len(cands), fit, lambda f, idx: torch.stack([(x[idx] > t).long() for t in f]), y,
                           criterion=Criterion("worst_class"), score_strata=y, scheme=Holdout(0.5), seed=1)
    scoring_fit, held = fitted[0], sel.folds[0]
    assert scoring_fit.numel() == sel.n_fit == 300 - held.numel()
    assert not set(scoring_fit.tolist()) & set(held.tolist())
    assert fitted[-1].numel() == 300                      # the refit: every row


def test_repeated_folds_score_each_candidate_by_the_mean_over_the_repeats():
    """KFold(2, 3): a candidate's score is the mean of its three repeats' out-of-fold worst-class
    accuracies, each recomputed here from the same folds."""
    n = 60
    y = torch.arange(n) % 2
    scheme = KFold(2, 3)

    def predict(f, idx):
        # right on a different subset of rows for every training set (and candidate)
        out = []
        for i, train in f:
            g = torch.Generator().manual_seed(int(train.sum()) * 7 + i)
            wrong = torch.rand(idx.numel(), generator=g) < 0.4
            out.append(torch.where(wrong, 1 - y[idx], y[idx]))
        return torch.stack(out)

    sel = select_and_refit(2, lambda idx, which: [(i, idx) for i in which], predict, y,
                           criterion=Criterion("worst_class"), score_strata=y, scheme=scheme, seed=5, refit=False)
    assert sel.repeats_scored == [3, 3]
    reps = kfold_parts(scheme, y, 5)
    assert len(reps) == 3
    for i in range(2):
        per = []
        for parts in reps:
            pred = torch.empty(n, dtype=torch.long)
            for k, held in enumerate(parts):
                train = torch.sort(torch.cat([p for j, p in enumerate(parts) if j != k])).values
                pred[held] = predict([(i, train)], held)[0]
            per.append(float(scores_from_preds(pred[None], y, y)[0][0]))
        assert len(set(per)) > 1, per                     # the repeats differ: the first alone is not the mean
        assert float(sel.worst[i]) == pytest.approx(sum(per) / 3, abs=1e-12)


# ------------------------------------------------------------------ the label-free criterion
def _errors(per_class_right: int, per_class_wrong: int):
    y = torch.tensor([0] * (per_class_right + per_class_wrong) + [1] * (per_class_right + per_class_wrong))
    pred = y.clone()
    for c in (0, 1):
        rows = torch.nonzero(y == c).flatten()[:per_class_wrong]
        pred[rows] = 1 - c
    return y, torch.nn.functional.one_hot(pred, 2).float()


@pytest.mark.parametrize("right, wrong, want", [(12, 2, "worst_inferred_group"),     # imbalance 6
                                                (9, 2, "worst_inferred_group"),      # exactly the threshold
                                                (8, 2, "worst_class")])              # 4, just below
def test_the_label_free_criterion_switches_at_the_imbalance_threshold(right, wrong, want):
    assert IMBALANCE_THRESHOLD == 4.5
    y, logits = _errors(right, wrong)
    assert Sel.group_imbalance(Sel.inferred_groups(logits, y), y) == right / wrong
    assert label_free_criterion(y, logits).name == want


# ------------------------------------------------------------------ identical samples, one side
def _one_side_checker(seen, monkeypatch, base=None):
    """Every split of the repair rows (``base`` of them; None: every split) must be given the duplicate
    clusters and keep each cluster on one side (as test_methods_contract's
    test_identical_samples_stay_on_one_side_of_a_methods_own_splits checks); ``seen`` gets the size of
    each split checked."""
    real = Sel.stratified_split

    def checked(strata, fractions, seed, *a, clusters=None, **k):
        parts = real(strata, fractions, seed, *a, clusters=clusters, **k)
        if base is None or strata.numel() == base:
            assert clusters is not None, "a split of the repair rows without the duplicate clusters"
            side = torch.full((strata.numel(),), -1, dtype=torch.long)
            for j, part in enumerate(parts):
                side[part] = j
            for c in torch.unique(clusters):
                assert torch.unique(side[clusters == c]).numel() == 1, "identical samples on two sides"
            seen.append(strata.numel())
        return parts

    monkeypatch.setattr(Sel, "stratified_split", checked)


def _duplicated(p, base=400):
    dup = torch.arange(base) % 100                          # 100 samples, each present 4 times
    return p["X"][:base][dup], p["y"][:base][dup], p["groups"][:base][dup], dup


def test_auto_compares_its_heads_on_folds_that_keep_identical_samples_together(problems, monkeypatch):  # noqa: F811
    """choose_heads with ``clusters``: the folds its candidates are compared on (and every split a head
    makes of all the rows) keep the copies of one sample on one side."""
    from repair.choosing import choose_heads

    p = problems[2]
    X, y, g, dup = _duplicated(p)
    seen = []
    _one_side_checker(seen, monkeypatch, base=400)
    choice = choose_heads("auto", X, y, p["W"], p["b"], g, clusters=dup.clone())
    assert choice.selection is not None and seen


@pytest.mark.parametrize("cap", [0.0, 4.0])
@pytest.mark.parametrize("with_groups", [True, False])
def test_dfr_fast_protocol_folds_keep_identical_samples_together(problems, monkeypatch, cap, with_groups):  # noqa: F811
    """The fast protocol's own 2 folds (its strength's choice), on every row or on the rows its group
    cap keeps: copies of one sample on one side."""
    from repair.methods import RepairInputs, get_method

    m = get_method("dfr")
    p = problems[2]
    X, y, g, dup = _duplicated(p)
    seen = []
    _one_side_checker(seen, monkeypatch)
    out = m(RepairInputs(X=X, y=y, W=p["W"], b=p["b"], groups=g if with_groups else None, seed=0,
                         clusters=dup.clone()), m.make_config({"protocol": "fast", "group_cap": cap}))
    d = out.diagnostics
    assert d["protocol"] == "fast" and seen == [d["rows_fitted"]]
    if cap == 0.0:
        assert d["rows_fitted"] == 400


# ------------------------------------------------------------------ auto-ft: the rows each fold fit gets
class _RecordingCtx(_FoldCtx):
    """:class:`test_steady._FoldCtx` that records the rows of every head fit too."""

    def __init__(self, *a):
        super().__init__(*a)
        self.head_fits = []

    def fit(self, cand, idx, config=None):
        if cand.info.kind == "head":
            self.head_fits.append(idx)
        return super().fit(cand, idx, config)


def test_one_head_and_a_model_repair_are_each_fitted_on_a_folds_training_rows_only():
    """auto-ft with one head (no cross-validation of the heads): the folds are made here; the head to
    beat and a fold-by-fold model repair are fitted on each fold's training rows, never on the fold
    they are scored on; a winning model repair is then fitted once on the whole fit part."""
    from types import SimpleNamespace

    from repair.choosing import Chosen, Fitted, _escalate

    n = 200
    y = torch.arange(n) % 2
    head_pred = y.clone()
    head_pred[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:30]] ^= 1      # the head: 85%
    head = Chosen("dfr", "dfr")
    model = SimpleNamespace(label="mixft", info=SimpleNamespace(kind="model"), config=lambda: None)
    strata = y.clone()
    ctx = _RecordingCtx(y, head_pred, y.clone())                         # a perfect model repair: it wins
    choice = _escalate(None, ctx, torch.arange(n), strata, Criterion("worst_class"), y, y,
                       (head, Fitted("head"), None, [0]), [head], [model], [], KFold(2), seed=0,
                       log=lambda m: None)
    assert choice.chosen is model
    parts = kfold_parts(KFold(2), strata, 1)[0]                          # seed + 1, as _escalate draws them
    trains = [sorted(set(range(n)) - set(held.tolist())) for held in parts]
    assert [f.tolist() for f in ctx.head_fits] == trains
    assert [f.tolist() for f in ctx.model_fits] == trains + [list(range(n))]


# ------------------------------------------------------------------ the original model on a tie
def test_no_candidate_beating_the_original_model_is_warned_of_on_a_tie():
    """The original head is already perfect on separable data and so is every candidate: nothing
    beats it (a tie is not a win), and choose_heads says so."""
    from repair.choosing import choose_heads

    g = torch.Generator().manual_seed(0)
    n = 120
    y = torch.arange(n) % 2
    X = 0.1 * torch.randn(n, 4, generator=g)
    X[:, 0] += 4.0 * (2 * y - 1)
    W0, b0 = torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]]), torch.zeros(2)
    choice = choose_heads("auto", X, y, W0, b0)
    scored = [r for r in choice.rows if "score" in r]
    assert scored and all(r["score"] == 1.0 for r in scored)
    assert any(w.startswith("no candidate beats the original model on ") and "100.0% vs 100.0%" in w
               for w in choice.warnings), choice.warnings


# ------------------------------------------------------------------ dfr's fast protocol
def test_dfr_fast_head_is_the_chosen_strength_whatever_the_grids_order(problems):  # noqa: F811
    from repair.methods import get_method

    m = get_method("dfr")
    p = problems[2]
    outs = [m(_inputs(p, True), m.make_config({"protocol": "fast", "c_grid": list(grid)}))
            for grid in ((3.0, 0.3, 0.01), (0.01, 0.3, 3.0))]
    chosen = [o.diagnostics["chosen"]["C"] for o in outs]
    assert chosen[0] == chosen[1] != 0.3                 # not the middle (where the two orders agree)
    torch.testing.assert_close(outs[0].W, outs[1].W, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0].b, outs[1].b, atol=1e-5, rtol=1e-5)


def test_dfr_freezes_the_protocol_its_auto_rule_chose():
    from repair.methods import get_method

    m = get_method("dfr")
    frozen = m.freeze(m.default_config(), {"chosen": {"C": 0.1}, "protocol": "bagged"})
    assert frozen.protocol == "bagged" and frozen.c_grid == (0.1,)
    assert m.default_config().protocol == "auto"
