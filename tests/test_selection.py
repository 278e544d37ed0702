"""The one selection module: criterion, splitter, select-then-refit; the thread policy."""
from __future__ import annotations

import pytest
import torch

from repair import threads
from repair.selection import (Criterion, Given, Holdout, KFold, LABEL_FREE_DEFAULT, inferred_groups,
                              pick_best, probability_scores, scores_from_preds, select_and_refit,
                              stratified_split)


def test_auto_is_defined_once():
    assert Criterion.resolve("auto", has_groups=True).name == "worst_group"
    assert Criterion.resolve("auto", has_groups=False).name == LABEL_FREE_DEFAULT
    assert Criterion.resolve("worst_inferred_group", has_groups=True).name == "worst_inferred_group"
    from repair.errors import BadInput

    with pytest.raises(BadInput):                        # the user's choice: exit 2
        Criterion.resolve("worst_group", has_groups=False)
    with pytest.raises(ValueError):
        Criterion.resolve("best_guess", has_groups=True)


def test_criterion_strata():
    y = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    groups = torch.tensor([0, 1, 2, 3])
    assert torch.equal(Criterion("worst_class").strata(y, logits), y)
    assert torch.equal(Criterion("worst_group").strata(y, logits, groups), groups)
    assert Criterion("worst_inferred_group").strata(y, logits).tolist() == [0, 1, 2, 3]
    assert torch.equal(inferred_groups(logits, y), Criterion("worst_inferred_group").strata(y, logits))


@pytest.mark.parametrize("fractions", [[0.5], [0.25], [1 / 3, 1 / 3]])
def test_splitter_is_disjoint_seeded_and_stratified(fractions):
    strata = torch.tensor([0] * 40 + [1] * 20 + [2] * 5 + [3] * 1)
    a = stratified_split(strata, fractions, 3)
    b = stratified_split(strata, fractions, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(a) == len(fractions) + 1
    every = torch.cat(a)
    assert sorted(every.tolist()) == list(range(strata.numel()))
    for s in range(4):                                   # every stratum keeps a sample to fit on
        assert int((strata[a[0]] == s).sum()) >= 1
    for j, f in enumerate(fractions, 1):                 # proportional shares of the big stratum
        assert abs(int((strata[a[j]] == 0).sum()) - f * 40) <= 1
        assert int((strata[a[j]] == 2).sum()) >= 1       # a small stratum still reaches every part
    c = stratified_split(strata, fractions, 4)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(ValueError):
        stratified_split(strata, [0.7, 0.6], 0)


def test_pick_best_ties_and_scores():
    worst = torch.tensor([0.5, 0.7, 0.7, 0.2])
    mean = torch.tensor([0.9, 0.8, 0.85, 0.99])
    assert pick_best(worst, mean) == 2
    assert pick_best(torch.tensor([0.7, 0.7]), torch.tensor([0.8, 0.8])) == 0
    pred = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    w, m = scores_from_preds(pred, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3]))
    assert w.tolist() == [1.0, 0.0] and m.tolist() == [1.0, 0.5]


def _toy():
    """Candidates are constant 'thresholds' on a 1-d feature; the right one is candidate 2."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, generator=g)
    y = (x > 0.6).long()
    cands = [0.2, 0.4, 0.6, 0.8]
    return x, y, cands


@pytest.mark.parametrize("scheme", [Holdout(0.5), KFold(2), KFold(3)])
def test_select_and_refit_picks_the_held_out_best(scheme):
    x, y, cands = _toy()
    calls = []

    def fit(idx, which):
        calls.append((idx.numel(), list(which)))
        return [cands[i] for i in which]

    def predict(f, idx):
        return torch.stack([(x[idx] > t).long() for t in f])

    sel = select_and_refit(len(cands), fit, predict, y, criterion=Criterion("worst_class"),
                           score_strata=y, scheme=scheme, seed=1)
    assert sel.best == 2 and sel.final == [0.6]
    assert calls[-1] == (300, [2])                       # the refit: all rows, the chosen candidate
    held = sum(c[0] for c in calls[:-1])
    if isinstance(scheme, KFold):
        assert len(calls) == scheme.folds + 1 and held == 300 * (scheme.folds - 1)
        assert sel.n_heldout == 300                       # every row scored out-of-fold
    else:
        assert len(calls) == 2 and sel.n_heldout + sel.n_fit == 300
    table = sel.candidates(cands)
    assert [r["candidate"] for r in table] == cands and table[2]["heldout_worst"] == 1.0
    assert sel.describe()["criterion"] == "worst_class"


def test_select_given_split_and_no_refit_and_single_candidate():
    x, y, cands = _toy()
    fit_idx, held = torch.arange(0, 200), torch.arange(200, 300)
    sel = select_and_refit(len(cands), lambda idx, w: [cands[i] for i in w],
                           lambda f, idx: torch.stack([(x[idx] > t).long() for t in f]), y,
                           criterion=Criterion("worst_class"), score_strata=y, scheme=Given(fit_idx, held),
                           refit=False)
    assert sel.best == 2 and sel.final is None and sel.n_fit == 200 and sel.n_heldout == 100
    one = select_and_refit(1, lambda idx, w: ["only", idx.numel()], lambda f, idx: None, y,
                           criterion=Criterion("worst_class"), score_strata=y)
    assert one.best == 0 and one.worst is None and one.final == ["only", 300]


def test_threads_are_restored_even_on_error():
    before = torch.get_num_threads()
    with threads.limited(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with threads.limited(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    assert threads.for_work(1e3) == 1 and threads.for_work(1e12) is None
    assert threads.for_work(1e3, "cuda") is None and threads.for_work(1e3, setting=None) is None



@pytest.mark.parametrize("workers", [1, 2, 3])
def test_map_chains_runs_each_items_then_tasks_after_its_first(workers):
    """``threads.map_chains``: every ``then`` task of an item sees that item's ``first`` result, a
    slow ``first`` does not hold back another item's ``then`` tasks (no barrier between stages), the
    results come back in order, and the first error is raised."""
    import threading
    import time

    before = torch.get_num_threads()
    started, lock = [], threading.Lock()
    release = threading.Event()

    def first(x):
        if x == 0 and workers > 1:
            assert release.wait(10), "item 1's then tasks never ran while item 0's first was running"
        with lock:
            started.append(("first", x))
        return x * 10

    def then_k(k):
        def t(x, a):
            assert a == x * 10
            with lock:
                started.append(("then", x, k))
                if x == 1 and k == 1:
                    release.set()
            return (x, k, a)
        return t

    firsts, thens = threads.map_chains(first, [then_k(0), then_k(1)], [0, 1], workers)
    assert firsts == [0, 10]
    assert thens == [[(0, 0, 0), (0, 1, 0)], [(1, 0, 10), (1, 1, 10)]]
    if workers > 1:                               # item 1 finished its chain before item 0's first
        assert started.index(("then", 1, 1)) < started.index(("first", 0))
    release.set()

    def boom(x, a):
        raise ValueError("bad fit")

    with pytest.raises(ValueError, match="bad fit"):
        threads.map_chains(lambda x: time.sleep(0.01) or x, [boom], [0, 1, 2], workers)
    assert torch.get_num_threads() == before

def test_library_calls_leave_the_thread_count_alone():
    from repair import solver as S
    from repair.methods import RepairInputs, get_method

    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 8, generator=g)
    y = (X[:, 0] > 0).long()
    S.fit_logreg(X, y, 2, l2=1.0)
    for name in ("dfr", "afr", "neurontune", "nsf"):
        get_method(name)(RepairInputs(X=X, y=y, W=torch.zeros(2, 8), b=torch.zeros(2)))
    assert torch.get_num_threads() == before


def test_held_out_scores_shrink_small_groups_toward_their_class():
    """A held-out group of four samples scores 0/25/50/75/100% on its own and would decide early
    stopping alone; shrunk toward its class's accuracy by SHRINK_SAMPLES pseudo-samples it counts
    for n / (n + 8) of its own score. Classes as strata are unchanged; large groups barely move."""
    from repair.selection import SHRINK_SAMPLES, scores_from_preds, shrunk_scores

    y = torch.tensor([0] * 100 + [1] * 100)
    groups = torch.tensor([0] * 96 + [1] * 4 + [2] * 100)          # a 4-sample group inside class 0
    pred = y.clone()
    pred[96:99] = 1                                                  # 1 of 4 right in the small group
    pred[100:120] = 0                                                # class 1 at 80%
    raw, mean = scores_from_preds(pred[None], y, groups)
    assert float(raw[0]) == 0.25
    w, m = shrunk_scores(pred, y, groups)
    a0 = 97 / 100                                                    # class 0 accuracy
    expect = min((1 + SHRINK_SAMPLES * a0) / (4 + SHRINK_SAMPLES), 0.8, (96 + SHRINK_SAMPLES * a0) / (96 + SHRINK_SAMPLES))
    assert abs(float(w[0]) - expect) < 1e-12 and float(m[0]) == float(mean[0])
    assert 0.25 < float(w[0]) < a0                                   # between its own score and its class's
    wc, _ = shrunk_scores(pred, y, y)                                # strata = classes: worst class
    assert abs(float(wc[0]) - 0.8) < 1e-12 and abs(float(scores_from_preds(pred[None], y, y)[0][0]) - 0.8) < 1e-6
    batch = torch.stack([pred, y])                                   # (K, N) like the raw scores
    wb, mb = shrunk_scores(batch, y, groups)
    assert wb.shape == (2,) and float(wb[1]) == 1.0 and float(wb[0]) == float(w[0])


def test_split_without_clusters_is_the_split_with_singleton_clusters():
    # two code paths (index slices without clusters, units with them): the same split, the same
    # random numbers, whatever the strata, fractions and floors
    from repair.selection import stratified_split

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 60, (1,), generator=g))
        strata = torch.randint(0, int(torch.randint(1, 6, (1,), generator=g)), (n,), generator=g)
        fr = ([0.5], [0.3, 0.2], [0.25])[trial % 3]
        mpp = int(torch.randint(0, 3, (1,), generator=g))
        a = stratified_split(strata, fr, trial, min_per_part=mpp)
        b = stratified_split(strata, fr, trial, min_per_part=mpp, clusters=torch.arange(n))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), trial
    assert [p.numel() for p in stratified_split(torch.zeros(0, dtype=torch.long), 0.5, 0)] == [0, 0]


def test_required_gain_is_two_standard_errors_of_the_compared_worst_stratum():
    """The edge a change needs over a simpler choice: REQUIRED_Z standard errors of the choice's
    worst stratum, taken at the Agresti-Coull estimate (a stratum it gets all right or all wrong
    is not certain), on the score the caller compares (raw accuracy, or the shrunk score with its
    smaller spread), never below MIN_GAIN."""
    from repair.selection import MIN_GAIN, REQUIRED_Z, SHRINK_SAMPLES, required_gain

    y = torch.tensor([0] * 100 + [1] * 100)
    groups = torch.tensor([0] * 96 + [1] * 4 + [2] * 100)          # a 4-sample group inside class 0
    pred = y.clone()
    pred[96:99] = 1                                                  # 1 of 4 right in the small group
    pred[100:120] = 0                                                # class 1 at 80%

    def se(hits, n, prior=0.0):
        p = (hits + 2) / (n + 4)
        return (p * (1 - p) / (n + 4)) ** 0.5 * n / (n + prior)

    # raw accuracy: the 4-sample group (25%) is the worst
    assert required_gain(pred, y, groups) == pytest.approx(REQUIRED_Z * se(1, 4))
    # shrunk scores: still that group (see the test above), its spread scaled by 4 / (4 + 8)
    assert required_gain(pred, y, groups, SHRINK_SAMPLES) == pytest.approx(REQUIRED_Z * se(1, 4, SHRINK_SAMPLES))
    assert required_gain(pred, y, groups, SHRINK_SAMPLES) < required_gain(pred, y, groups)
    # classes as strata: class 1 at 80 of 100
    assert required_gain(pred, y, y) == pytest.approx(REQUIRED_Z * se(80, 100))
    # every sample right: the worst stratum is 4 of 4, not a certain 100% (the old rule gave MIN_GAIN)
    perfect = required_gain(y.clone(), y, groups)
    assert perfect == pytest.approx(REQUIRED_Z * se(4, 4)) and perfect > 0.2
    # a large stratum well estimated: the floor
    big = torch.arange(200000) % 2
    assert required_gain(big, big, big) == MIN_GAIN


def test_probability_scores_are_the_worst_groups_mean_true_class_probability():
    y = torch.tensor([0, 0, 1, 1, 1])
    strata = torch.tensor([0, 0, 1, 1, 3])                 # stratum 2 absent: not the worst
    logits = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0))
    worst, mean = probability_scores(logits, y, strata)
    p = logits.double().softmax(-1)[:, torch.arange(5), y]   # (3, 5) probability of the true class
    want = torch.stack([p[:, :2].mean(1), p[:, 2:4].mean(1), p[:, 4]], 1).min(1).values
    assert torch.allclose(worst, want, atol=1e-6)
    assert torch.equal(mean, (logits.argmax(-1) == y).double().mean(1))     # the accuracy, as reported
    w1, m1 = probability_scores(logits[0], y, strata)      # one candidate's (N, C) logits
    assert torch.allclose(w1, worst[:1]) and torch.equal(m1, mean[:1])


@pytest.mark.parametrize("scheme", [Holdout(0.5), KFold(2)])
def test_probability_score_sees_what_whole_rows_hide(scheme):
    """Two candidates get every held-out row right, so by accuracy they tie and the first wins;
    the second puts more probability on the true class of the worst group's rows, and the
    probability score picks it. A bad ``score`` is refused."""
    y = torch.arange(40) % 2
    strata = torch.arange(40) % 4
    margin = [1.0, 3.0]                                      # candidate k's logit margin on the true class

    def predict(f, idx):
        lg = torch.zeros(len(f), idx.numel(), 2)
        for k, c in enumerate(f):
            lg[k, torch.arange(idx.numel()), y[idx]] = margin[c]
        return lg

    kw = dict(criterion=Criterion("worst_group"), score_strata=strata, scheme=scheme, seed=0, refit=False)
    fit = lambda idx, which: list(which)                    # noqa: E731
    by_acc = select_and_refit(2, fit, predict, y, **kw)
    by_prob = select_and_refit(2, fit, predict, y, score="probability", **kw)
    assert by_acc.best == 0 and by_acc.worst.tolist() == [1.0, 1.0]
    assert by_prob.best == 1 and float(by_prob.worst[1]) > float(by_prob.worst[0])
    assert by_prob.mean.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="score"):
        select_and_refit(2, fit, predict, y, score="loss", **kw)
