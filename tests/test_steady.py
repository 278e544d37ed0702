"""Steady model repairs (issue 19): after fine-tuning, :func:`repair.modelrepair.finetune.settle`
picks, on the held-out part only, between weight-space interpolations of the starting and the
fine-tuned weights (WiSE-FT) and heads refitted on each body, and leaves ordinary weights behind:
the output of ``repair fix`` reloads with plain transformers and computes the repaired logits."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import make_bert_folder, make_images, make_texts, run_cli


@pytest.fixture()
def session(tmp_path):
    """A tiny BERT, 48 labelled texts, and a model-repair session on them (seed 0)."""
    from repair.adapters import load_model
    from repair.methods import ModelRepairInputs
    from repair.modelrepair.finetune import Session

    model = make_bert_folder(tmp_path / "bert", seed=3)
    data = make_texts(tmp_path / "texts.csv", n=48, seed=1)
    rows = list(csv.DictReader(open(data)))
    tm = load_model(model).trainable()
    texts = [r["text"] for r in rows]
    y = torch.tensor([1 if r["label"] == "positive" else 0 for r in rows])
    ref = tm.predict(tm.encode(texts), torch.arange(len(texts)), "cpu")
    inputs = ModelRepairInputs(model=tm, items=texts, y=y, ref_logits=ref, seed=0, device="cpu", progress=False,
                               class_names=["negative", "positive"])
    return Session(inputs, holdout_fraction=0.5), tm


def _perturb(tm, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tm.module.named_parameters():
            if ".encoder." in name or name.startswith(tm.head_name):
                p.add_(scale * torch.randn(p.shape, generator=gen))


def test_interpolation_weight_is_chosen_on_the_held_out_part(session):
    from repair.modelrepair.finetune import settle
    from repair.selection import pick_best

    sess, tm = session
    start = tm.state()
    _perturb(tm, 0.3, seed=0)                         # the "fine-tuned" weights
    tuned = tm.state()
    alphas = (0.25, 0.5, 1.0)
    # what each interpolation scores on the held-out part, measured independently
    expected = {}
    for a in alphas:
        tm.module.load_state_dict({k: (start[k] + a * (tuned[k] - start[k])) if start[k].is_floating_point()
                                   else start[k] for k in start})
        expected[a] = sess.evaluate()
    tm.module.load_state_dict(tuned)
    diag = settle(sess, start, alphas=alphas, heads=("own",))

    cands = diag["candidates"]
    assert [c["alpha"] for c in cands] == sorted(alphas, reverse=True)
    for c in cands:
        assert c["head"] == "fine-tuned"
        assert (c["heldout_score"], c["heldout_accuracy"]) == pytest.approx(expected[c["alpha"]])
    order = sorted(alphas, reverse=True)
    best = order[pick_best(torch.tensor([expected[a][0] for a in order]), torch.tensor([expected[a][1] for a in order]))]
    assert diag["alpha"] == best
    # the model is left exactly at the chosen interpolation (ordinary weights, nothing else)
    now = tm.state()
    for k in start:
        want = start[k] + best * (tuned[k] - start[k]) if start[k].is_floating_point() else start[k]
        torch.testing.assert_close(now[k], want, atol=1e-6, rtol=0)
    assert sess.evaluate() == pytest.approx((diag["heldout_score"], diag["heldout_accuracy"]))


def test_a_refitted_head_replaces_a_broken_one(session):
    """A head that predicts one class everywhere (held-out worst class 0) loses to the head
    refitted on the same body; the refitted head, fitted again at its chosen strength on every
    repair row, is written into the model."""
    from repair.modelrepair.finetune import refit_head, settle
    from repair.selection import head_predictions
    from repair.solver import fit_logreg, group_balanced_weights

    sess, tm = session
    with torch.no_grad():
        tm.head.weight.zero_()
        tm.head.bias.copy_(torch.tensor([1.0, 0.0]))
    assert sess.evaluate()[0] == 0.0
    start = tm.state()
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    W, b, info = refit_head(sess, X, sess.groups)
    diag = settle(sess, start, heads=("own", "refit"))
    # nothing moved: one body, with its own head and the refitted one
    assert [(c["alpha"], c["head"]) for c in diag["candidates"]] == [(1.0, "fine-tuned"), (1.0, "refit")]
    assert diag["head"] == "refit" and diag["heldout_score"] > 0.0
    assert diag["refit"]["l2"] == info["l2"] and diag["head_rows"] == "all repair rows"
    # scored as fitted on the training part; written as refitted at that strength on every row
    worst, mean = sess.heldout_scores(head_predictions(X[sess.held_idx], W[None], b[None]))
    assert (diag["heldout_score"], diag["heldout_accuracy"]) == pytest.approx((float(worst[0]), float(mean[0])))
    Wa, ba, _ = fit_logreg(X, sess.y, 2, sample_weight=group_balanced_weights(sess.groups), l2=(info["l2"],))
    torch.testing.assert_close(tm.head.weight.detach(), Wa[0].to(tm.head.weight.dtype))
    torch.testing.assert_close(tm.head.bias.detach(), ba[0].to(tm.head.bias.dtype))
    assert not torch.allclose(Wa[0], W, atol=1e-3)


@pytest.mark.parametrize("mode,kinds", [("interpolate", {"fine-tuned"}), ("refit", {"refit"}),
                                         ("either", {"fine-tuned", "refit"})])
def test_settle_modes_compare_the_heads_they_name(session, mode, kinds):
    """``settle: refit`` (the default) scores every interpolated body with a refitted head only,
    ``interpolate`` with its own head only, ``either`` with both; ``off`` does not settle."""
    from repair.modelrepair.finetune import SettleSettings, settle_by

    sess, tm = session
    start = tm.state()
    _perturb(tm, 0.3, seed=1)
    diag = settle_by(SettleSettings(settle=mode, settle_alphas=(0.5, 1.0)), sess, start)
    assert {c["head"] for c in diag["candidates"]} == kinds
    assert sorted({c["alpha"] for c in diag["candidates"]}) == [0.5, 1.0]
    assert len(diag["candidates"]) == 2 * len(kinds) and diag["head"] in kinds
    assert settle_by(SettleSettings(settle="off"), sess, start) is None
    assert SettleSettings().settle == "refit"


def test_stop_head_refit_scores_the_body_with_a_refitted_head(session):
    """``stop_head: refit``: every held-out evaluation of the training loop is the score of the
    body with the head settling would refit on it (not the model's own head); ``own`` (the
    default) is the model as it is."""
    from repair.modelrepair.finetune import LoopConfig, refit_head
    from repair.selection import head_predictions

    sess, tm = session
    with torch.no_grad():                                  # a useless own head: one class everywhere
        tm.head.weight.zero_()
        tm.head.bias.copy_(torch.tensor([1.0, 0.0]))
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    W, b, info = refit_head(sess, X, sess.groups)
    worst, mean = sess.heldout_scores(head_predictions(X[sess.held_idx], W[None], b[None]))
    got = sess.evaluator(LoopConfig(stop_head="refit"))()
    assert got == pytest.approx((float(worst[0]), float(mean[0])))
    assert got == pytest.approx((info["heldout_score"], info["heldout_accuracy"]))
    own = sess.evaluator(LoopConfig())()
    assert own == sess.evaluate() and own[0] == 0.0 < got[0]


def test_a_moved_body_must_beat_the_original_by_the_required_gain(session, monkeypatch):
    """With alpha 0 tried, the original body (with its refitted head) is the simpler choice: a moved
    body is chosen only with a held-out edge of ``repair.selection.required_gain`` (the rule auto-ft
    applies between a head and a model repair). Without an edge requirement the best held-out score
    wins; with an unreachable one the model ends at the original body, every weight as it started
    except the refitted head."""
    import repair.selection as sel
    from repair.modelrepair.finetune import refit_head, settle
    from repair.selection import head_predictions

    sess, tm = session
    tuned = tm.state()
    # the "original" body: every input embedding zero, so every text embeds the same (no refitted
    # head can tell the classes apart); the model as it is stands for the fine-tuned one
    start = {k: torch.zeros_like(v) if ".embeddings." in k and v.is_floating_point() else v.clone()
             for k, v in tuned.items()}

    monkeypatch.setattr(sel, "required_gain", lambda *a: 0.0)
    free = settle(sess, start, alphas=(0.0, 1.0), heads=("own", "refit"))
    scores = [c["heldout_score"] for c in free["candidates"]]
    assert free["heldout_score"] == max(scores) and free["required_gain"] == 0.0
    assert free["alpha"] == 1.0 and free["heldout_score"] > free["candidates"][-1]["heldout_score"]
    assert free["body"] == "moved"

    tm.module.load_state_dict(tuned)
    monkeypatch.setattr(sel, "required_gain", lambda *a: 2.0)
    kept = settle(sess, start, alphas=(0.0, 1.0), heads=("own", "refit"))
    # the record says so: the original body, though tensors moved on the way (a session-50 mutation audit)
    assert (kept["alpha"], kept["head"], kept["body"]) == (0.0, "refit", "original")
    now = tm.state()
    head = {f"{tm.head_name}.weight", f"{tm.head_name}.bias"}
    assert all(torch.equal(now[k], start[k]) for k in start if k not in head)

    # the real rule: two standard errors of the original body's worst held-out stratum, at least 1 point
    monkeypatch.undo()
    tm.module.load_state_dict(tuned)
    real = settle(sess, start, alphas=(0.0, 1.0))
    base = real["candidates"][-1]
    assert (base["alpha"], base["head"]) == (0.0, "refit")
    tm.module.load_state_dict(start)
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    W, b, _ = refit_head(sess, X, sess.groups, unseen=True)
    ho = sess.held_idx
    want = sel.required_gain(head_predictions(X[ho], W, b), sess.y[ho], sess.score_strata[ho], sel.SHRINK_SAMPLES)
    assert real["required_gain"] == pytest.approx(want) and want >= sel.MIN_GAIN



def test_the_original_body_s_head_strength_is_chosen_by_repeated_folds(session):
    """The original body never trained on the repair rows, so the strength of the head refitted on
    it is chosen by repeated cross-validation over every row (``unseen=True``), not on the one
    held-out part: the choice is the same whichever rows are held out, the scores reported are the
    held-out part's, of the head fitted on the training part at that strength; settling uses it
    for alpha 0 only (a moved body trained on the training part is judged on the held-out part)."""
    from repair.modelrepair.finetune import REFIT_L2, refit_head, settle
    from repair.selection import head_predictions, stratified_split
    from repair.solver import fit_logreg, group_balanced_weights

    sess, tm = session
    start = tm.state()
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    chosen = set()
    for seed in range(4):
        sess.train_idx, sess.held_idx = stratified_split(sess.groups, [0.5], torch.Generator().manual_seed(seed))
        W, b, info = refit_head(sess, X, sess.groups, unseen=True)
        chosen.add(info["l2"])
        assert "cross-validation" in info["chosen_by"] and "repeats" in info["chosen_by"]
        tr, ho = sess.train_idx, sess.held_idx
        Wt, bt, _ = fit_logreg(X[tr], sess.y[tr], 2, sample_weight=group_balanced_weights(sess.groups[tr]),
                               l2=(info["l2"],))
        torch.testing.assert_close(W, Wt[0])
        worst, mean = sess.heldout_scores(head_predictions(X[ho], Wt, bt))
        assert (info["heldout_score"], info["heldout_accuracy"]) == pytest.approx((float(worst[0]), float(mean[0])))
        one = refit_head(sess, X, sess.groups)[2]
        assert one["chosen_by"] == "held-out part" and one["l2"] in REFIT_L2
    assert len(chosen) == 1

    _perturb(tm, 0.3, seed=0)
    diag = settle(sess, start, alphas=(0.0, 1.0))
    by = {c["alpha"]: c["refit"]["chosen_by"] for c in diag["candidates"]}
    assert "cross-validation" in by[0.0] and by[1.0] == "held-out part"




def test_an_unseen_body_too_small_to_fold_falls_back_to_the_held_out_part(session, monkeypatch):
    """When no fold can be drawn (``kfold_parts`` gives none), the original body's strength is chosen on
    the held-out part, as for a moved body, not silently the grid's first strength."""
    import repair.selection as sel
    from repair.modelrepair.finetune import refit_head

    sess, tm = session
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    want = refit_head(sess, X, sess.groups)
    monkeypatch.setattr(sel, "kfold_parts", lambda *a, **k: [])
    W, b, info = refit_head(sess, X, sess.groups, unseen=True)
    assert info == want[2] and info["chosen_by"] == "held-out part"
    torch.testing.assert_close(W, want[0])

def test_strength_original_gives_every_body_the_original_body_s_strength(session):
    """``settle_strength: original``: the strength the repeated folds choose for the original body is
    the strength of every moved body's refitted head (the original body embedded once more when alpha
    0 is not a candidate); ``heldout`` chooses each body's on the held-out part; another value is an
    error."""
    from repair.modelrepair.finetune import refit_head, settle

    sess, tm = session
    start = tm.state()
    X0 = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    want = refit_head(sess, X0, sess.groups, unseen=True)[2]["l2"]
    _perturb(tm, 0.3, seed=0)
    tuned = tm.state()
    for alphas in ((0.5, 1.0), (0.0, 0.5, 1.0)):
        tm.module.load_state_dict(tuned)
        diag = settle(sess, start, alphas=alphas, strength="original")
        moved = [c for c in diag["candidates"] if c["alpha"] > 0]
        assert len(moved) == 2 and all(c["refit"]["l2"] == want for c in moved)
        assert all(c["refit"]["chosen_by"] == "the original body's repeated folds" for c in moved)
        # scored as a head at that strength fitted on the training part of that body
        tm.module.load_state_dict({k: start[k] + 0.5 * (tuned[k] - start[k]) if start[k].is_floating_point()
                                   else start[k] for k in start})
        X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
        half = next(c for c in moved if c["alpha"] == 0.5)["refit"]
        given = refit_head(sess, X, sess.groups, l2=want)[2]
        assert (half["heldout_score"], half["heldout_accuracy"]) == pytest.approx(
            (given["heldout_score"], given["heldout_accuracy"]))
    tm.module.load_state_dict(tuned)
    held = settle(sess, start, alphas=(0.5, 1.0))
    assert all(c["refit"]["chosen_by"] == "held-out part" for c in held["candidates"])
    with pytest.raises(ValueError, match="strength"):
        settle(sess, start, alphas=(0.5, 1.0), strength="test")


def test_strength_heldout_1se_takes_the_strongest_within_one_standard_error(session):
    """``settle_strength: heldout_1se``: of the refit strengths, the strongest whose held-out score is
    within one standard error (of the best one's worst stratum) of the best; computed here from each
    strength's head on its own, and never weaker than the plain held-out choice."""
    from repair.modelrepair.finetune import REFIT_L2, refit_head, settle
    from repair.selection import head_predictions

    sess, tm = session
    start = tm.state()
    _perturb(tm, 0.3, seed=1)
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    best = refit_head(sess, X, sess.groups)
    one = refit_head(sess, X, sess.groups, one_se=True)
    ho = sess.held_idx
    scores, preds = [], []
    for l2 in REFIT_L2:
        W, b, info = refit_head(sess, X, sess.groups, l2=l2)
        scores.append(info["heldout_score"])
        preds.append(head_predictions(X[ho], W[None], b[None])[0])
    k = REFIT_L2.index(best[2]["l2"])
    assert scores[k] == max(scores)
    se = sess.score_standard_error(preds[k])
    assert 0 < se < 0.5
    want = max(j for j in range(len(REFIT_L2)) if scores[j] >= scores[k] - se - 1e-12)
    assert one[2]["l2"] == REFIT_L2[want] >= best[2]["l2"]
    assert one[2]["heldout_score"] == pytest.approx(scores[want])
    assert "one standard error" in one[2]["chosen_by"]
    diag = settle(sess, start, alphas=(0.5, 1.0), strength="heldout_1se")
    assert all("one standard error" in c["refit"]["chosen_by"] for c in diag["candidates"])


def test_the_one_standard_error_rule_on_given_scores(session, monkeypatch):
    """The rule itself, on held-out scores given per strength (weakest first): the best is the
    second strength; the third and fourth are within one standard error of it, the fifth is not;
    the strongest of those within (the fourth) is chosen, ties of the best itself aside."""
    from repair.modelrepair import finetune as F

    sess, tm = session
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    worst = torch.tensor([0.60, 0.70, 0.66, 0.651, 0.50], dtype=torch.float64)
    monkeypatch.setattr(type(sess), "heldout_scores", lambda self, pred, rows=None: (worst.clone(), torch.full((5,), 0.8)))
    monkeypatch.setattr(type(sess), "score_standard_error", lambda self, pred, rows=None: 0.05)
    assert F.refit_head(sess, X, sess.groups)[2]["l2"] == F.REFIT_L2[1]
    assert F.refit_head(sess, X, sess.groups, one_se=True)[2]["l2"] == F.REFIT_L2[3]
    monkeypatch.setattr(type(sess), "score_standard_error", lambda self, pred, rows=None: 0.01)
    assert F.refit_head(sess, X, sess.groups, one_se=True)[2]["l2"] == F.REFIT_L2[1]


def test_settled_mixft_folds_into_an_ordinary_checkpoint(tmp_path):
    """``repair fix --recipe`` mixft with ``settle: refit``: the chosen point is in the report,
    and plain transformers reloads the output and computes what ``repair eval`` measures."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from repair.adapters import load_model

    model = make_bert_folder(tmp_path / "bert", seed=3)
    data = make_texts(tmp_path / "val.csv", n=48, seed=1)
    test = make_texts(tmp_path / "test.csv", n=24, seed=2)
    recipe = tmp_path / "steady.yaml"
    recipe.write_text("name: steady\ncandidates:\n  - method: mixft\n    params: {epochs: 2, batch_size: 8, "
                      "lr: 0.001, scope: all, settle: refit, settle_alphas: [0.5, 1.0]}\n")
    out = tmp_path / "fixed"
    code, stdout, err = run_cli("fix", model, "--data", data, "--recipe", recipe, "--eval", test, "--out", out,
                                "--seed", "0", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    st = rep["diagnostics"]["settle"]
    # settle: refit compares the interpolated bodies with refitted heads only
    assert st["alpha"] in (0.5, 1.0) and st["head"] == "refit"
    assert {c["alpha"] for c in st["candidates"]} <= {0.5, 1.0}
    assert {c["head"] for c in st["candidates"]} == {"refit"}
    # the figures leave out test texts that are also in the repair data (short random texts repeat)
    seen = {r["text"] for r in csv.DictReader(open(data))}
    rows = [r for r in csv.DictReader(open(test)) if r["text"] not in seen]
    texts = [r["text"] for r in rows]
    assert rep["after"]["n"] == len(rows)
    plain = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        lg = plain(**tok(texts, padding=True, return_tensors="pt")).logits
    ours = load_model(out)
    torch.testing.assert_close(lg, ours.logits_batch(ours.collate(texts), torch.device("cpu")), atol=1e-5, rtol=1e-5)
    y = torch.tensor([1 if r["label"] == "positive" else 0 for r in rows])
    assert float((lg.argmax(1) == y).float().mean()) == pytest.approx(rep["after"]["accuracy"], abs=1e-6)


def test_escalation_is_skipped_only_when_no_model_repair_can_win():
    """auto-ft skips model repairs only when even a perfect one could not beat the head: its
    out-of-fold criterion plus the gain a model repair needs above 100%. An even but capped head (every
    class at 75%, nothing left behind, the case only a changed network can lift) is not skipped: the
    model repair trains, and stops after its first fold when that shows it cannot win."""
    from types import SimpleNamespace

    from repair.choosing import Chosen, Fitted, _escalate
    from repair.selection import Criterion, KFold, required_gain, scores_from_preds

    n = 200
    y = torch.arange(n) % 2
    head = Chosen("dfr", "dfr")
    model = SimpleNamespace(label="mixft", info=SimpleNamespace(kind="model"), config=lambda: None)

    def run(head_pred, model_pred):
        ctx = _FoldCtx(y, head_pred, model_pred)
        rows = []
        choice = _escalate(None, ctx, torch.arange(n), y.clone(), Criterion("worst_class"), y, y,
                           (head, Fitted("head"), None, [0]), [head], [model], rows, KFold(2), seed=0,
                           log=lambda m: None)
        return choice, rows, ctx

    even = y.clone()
    even[torch.arange(0, n, 8)] ^= 1                                  # 75% of each class right
    even[torch.arange(1, n, 8)] ^= 1
    choice, rows, ctx = run(even, 1 - y)
    assert choice.chosen is head and len(ctx.model_fits) == 1         # tried, stopped after one fold
    assert not any(r.get("skipped") for r in rows)
    # a head at 100% (or close enough that the gain it asks takes it past 100%): nothing is trained
    for near in (y.clone(), torch.where(torch.arange(n) == 0, 1 - y, y)):
        assert float(scores_from_preds(near[None], y, y)[0][0]) + required_gain(near, y, y) > 1.0
        choice, rows, ctx = run(near, y.clone())
        assert choice.chosen is head and ctx.model_fits == []
        skipped = [r for r in rows if r["kind"] == "model"]
        assert len(skipped) == 1 and "no model repair can win" in skipped[0]["skipped"]


def test_a_model_repair_must_beat_the_heads_noise():
    """The edge a model repair needs over the head is REQUIRED_Z (2) standard errors of the head's
    worst-stratum accuracy (Agresti-Coull, at least MIN_GAIN): a 15-sample worst group at 8 of 15
    needs 22.9 points, a 400-sample one at 80% needs 4 points, and a perfect head still 14 points
    (15 of 15 is not certain)."""
    from repair.selection import MIN_GAIN, REQUIRED_Z, required_gain

    def se(hits, n):
        p = (hits + 2) / (n + 4)
        return (p * (1 - p) / (n + 4)) ** 0.5

    y = torch.tensor([0] * 415 + [1] * 400)
    strata = torch.tensor([0] * 15 + [1] * 400 + [2] * 400)
    pred = y.clone()
    pred[:7] = 1                                                  # 8 of 15 right in the small group
    pred[415:495] = 0                                             # 320 of 400 right in class 1
    assert abs(required_gain(pred, y, strata) - REQUIRED_Z * se(8, 15)) < 1e-6
    pred[:7] = 0                                                  # the small group all right: class 1 worst
    assert abs(required_gain(pred, y, strata) - REQUIRED_Z * se(320, 400)) < 1e-6
    perfect = required_gain(y.clone(), y, strata)
    assert abs(perfect - REQUIRED_Z * se(15, 15)) < 1e-6 and perfect > 10 * MIN_GAIN


def test_a_soup_is_the_average_of_its_members_trained_from_the_same_start():
    """``members=k``: k runs of the loop from the same start with seeds seed .. seed+k-1, each at
    its own best held-out state, averaged into one set of weights; a time budget is shared."""
    from repair.modelrepair.finetune import Budget, LoopConfig, train

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=gen)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
    lin = torch.nn.Linear(5, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()                                         # every sample class 0 at the start
    start = [p.detach().clone() for p in lin.parameters()]

    def step(i, g):
        idx = torch.randint(0, 64, (8,), generator=g)
        return torch.nn.functional.cross_entropy(lin(X[idx]), y[idx])

    def evaluate():
        pred = lin(X).argmax(1)
        acc = float((pred == y).float().mean())
        return min(float((pred[y == c] == c).float().mean()) for c in (0, 1)), acc

    def run(members, seed):
        with torch.no_grad():
            for p, v in zip(lin.parameters(), start):
                p.copy_(v)
        cfg = LoopConfig(epochs=3, lr=0.05, patience=0, members=members, eval_every=1)
        r = train(list(lin.parameters()), step, evaluate, cfg, steps_per_epoch=8, seed=seed, progress=False,
                  budget=Budget(seconds=1000.0))
        return r, [p.detach().clone() for p in lin.parameters()]

    (r0, w0), (r1, w1) = run(1, 5), run(1, 6)
    assert not torch.allclose(w0[0], w1[0])                      # the seeds differ
    soup, ws = run(2, 5)
    for a, b, s in zip(w0, w1, ws):
        torch.testing.assert_close(s, (a + b) / 2)
    assert soup.steps == r0.steps + r1.steps
    assert soup.budget["members"] == 2 and soup.budget["seconds"] == 500.0
    assert soup.budget["member_scores"] == [r0.best_score, r1.best_score]
    assert (soup.best_score, soup.best_accuracy) == evaluate()
    assert {h["member"] for h in soup.history} == {0, 1}


def test_keep_last_ends_at_the_last_step_even_when_the_start_scored_best():
    """``keep="best"`` (default) restores the best held-out evaluation -- here the start, since
    training only makes the held-out score worse; ``keep="last"`` leaves the last step's weights
    and reports the last evaluation."""
    from repair.modelrepair.finetune import Budget, LoopConfig, train

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=gen)
    y = (X[:, 0] > 0).long()
    lin = torch.nn.Linear(3, 2)

    def step(i, g):                                   # trains toward the wrong labels
        return torch.nn.functional.cross_entropy(lin(X), 1 - y)

    def evaluate():
        acc = float((lin(X).argmax(1) == y).float().mean())
        return acc, acc

    out = {}
    for keep in ("best", "last"):
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[-1.0, 0, 0], [1.0, 0, 0]]))     # right at the start
            lin.bias.zero_()
        r = train(list(lin.parameters()), step, evaluate, LoopConfig(epochs=20, lr=0.1, patience=0, keep=keep),
                  steps_per_epoch=1, progress=False, budget=Budget(seconds=1000.0))
        out[keep] = (r, evaluate())
    rb, sb = out["best"]
    rl, sl = out["last"]
    assert rb.best_step == 0 and sb[0] == 1.0 and rb.best_score == 1.0
    assert rl.best_step == rl.steps == 20 and sl[0] < 0.5
    assert rl.best_score == pytest.approx(sl[0]) == pytest.approx(rl.history[-1]["score"])


def test_keep_tail_ends_at_the_average_of_the_states_evaluated_after_the_midpoint():
    """``keep="tail"``: the weights end at the uniform average of the states at the held-out
    evaluations after the schedule's midpoint (not the last state, not the best), and the reported
    score is that average's; a run stopped before the midpoint keeps its last state."""
    from repair.modelrepair.finetune import Budget, LoopConfig, train

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=gen)
    y = (X[:, 0] > 0).long()
    lin = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in lin.parameters()]

    def step(i, g):
        return torch.nn.functional.cross_entropy(lin(X), y)

    seen = []

    def evaluate():
        seen.append([p.detach().clone() for p in lin.parameters()])
        acc = float((lin(X).argmax(1) == y).float().mean())
        return acc, acc

    def run(**kw):
        seen.clear()
        with torch.no_grad():
            for p, v in zip(lin.parameters(), start):
                p.copy_(v)
        cfg = LoopConfig(epochs=6, lr=0.1, patience=0, keep="tail", warmup_fraction=0.0, **kw)
        return train(list(lin.parameters()), step, evaluate, cfg, steps_per_epoch=1, progress=False,
                     budget=Budget(seconds=1000.0))

    r = run()
    assert r.averaged == [4, 5, 6] and r.steps == 6
    states = seen[4:7]                                   # evaluations at steps 0..6, then the average's
    for k, p in enumerate(lin.parameters()):
        mean = sum(s[k] for s in states) / 3
        torch.testing.assert_close(p.detach(), mean)
        assert not torch.allclose(p.detach(), states[-1][k])          # not the last state
    assert len(seen) == 8 and (r.best_score, r.best_accuracy) == evaluate()
    assert r.describe()["averaged_steps"] == [4, 5, 6]
    assert run(members=2).budget["member_averaged_steps"] == [[4, 5, 6], [4, 5, 6]]     # a soup says so per member

    # early stopping (patience 2, a held-out score that never improves) ends the 6-step run at step 2,
    # before the midpoint: the last state
    seen.clear()
    with torch.no_grad():
        for p, v in zip(lin.parameters(), start):
            p.copy_(v)
    r = train(list(lin.parameters()), step, lambda: (evaluate(), (0.5, 0.5))[1],
              LoopConfig(epochs=6, lr=0.1, patience=2, keep="tail"), steps_per_epoch=1, progress=False,
              budget=Budget(seconds=1000.0))
    assert r.averaged is None and r.steps == 2 and r.stopped_by == "early stopping"
    for p, s in zip(lin.parameters(), seen[-1]):
        torch.testing.assert_close(p.detach(), s)


class _FoldCtx:
    """Just enough of :class:`repair.choosing.FitContext` for :func:`repair.choosing._escalate`: a head
    that predicts ``head_pred`` whatever rows it is fitted on (the embeddings are its one-hot rows, the
    head the identity), and model repairs that predict ``model_pred`` (each fit recorded)."""

    def __init__(self, y, head_pred, model_pred):
        self.y, self.model_pred = y, model_pred
        self.X = torch.nn.functional.one_hot(head_pred, 2).float()       # the head reads these back
        self.model_fits = []

    def fit(self, cand, idx, config=None):
        from repair.choosing import Fitted

        if cand.info.kind == "head":
            return Fitted("head", W=torch.eye(2), b=torch.zeros(2))
        self.model_fits.append(idx)
        return Fitted("model", tensors={}, steps=3, seconds=0.0, diagnostics={})

    def model_logits(self, fitted, idx):
        return torch.nn.functional.one_hot(self.model_pred[idx], 2).float()


def test_a_model_repair_stops_after_the_fold_that_shows_it_cannot_win():
    """auto-ft's model repair is trained fold by fold; once its criterion, counting every row still to
    predict as right, is below the head's score plus the gain it needs, the remaining folds are not
    trained and the head is the choice -- the one every fold would have given. A repair that can
    still win trains on every fold and, winning, once more on the whole fit part."""
    from types import SimpleNamespace

    from repair.choosing import Chosen, Fitted, _escalate
    from repair.selection import Criterion, KFold

    g = torch.Generator().manual_seed(0)
    n = 200
    y = torch.arange(n) % 2
    head_pred = y.clone()
    head_pred[torch.randperm(n, generator=g)[:30]] ^= 1                  # the head: 85% right
    head = Chosen("dfr", "dfr")
    model = SimpleNamespace(label="mixft", info=SimpleNamespace(kind="model"), config=lambda: None)
    crit = Criterion("worst_class")
    strata = y.clone()

    def run(model_pred):
        ctx = _FoldCtx(y, head_pred, model_pred)
        rows = []
        choice = _escalate(None, ctx, torch.arange(n), strata, crit, y, y, (head, Fitted("head"), None, [0]),
                           [head], [model], rows, KFold(2), seed=0, log=lambda m: None)
        return choice, rows, ctx

    hopeless = 1 - y                                                     # every row wrong
    choice, rows, ctx = run(hopeless)
    assert choice.chosen is head and len(ctx.model_fits) == 1
    row = next(r for r in rows if r["kind"] == "model")
    assert "cannot beat the head" in row["stopped"] and row["score_at_most"] < 0.6 and "score" not in row
    assert row["scored_on"].startswith("1 of the same 2 folds")
    perfect = y.clone()
    choice, rows, ctx = run(perfect)
    assert choice.chosen is model and len(ctx.model_fits) == 3           # two folds, then the whole fit part
    assert next(r for r in rows if r["kind"] == "model")["score"] == 1.0
    # a repair a little better than the head but short of the gain: every fold trained, then the head
    close = head_pred.clone()
    close[(close != y).nonzero().flatten()[:5]] ^= 1
    choice, rows, ctx = run(close)
    assert choice.chosen is head and len(ctx.model_fits) == 2


def test_a_stopped_model_repair_shows_the_most_it_could_reach():
    """The candidates tables (``repair fix`` on stdout, the HTML report) show a model repair stopped
    after a fold by the score it could at most still have reached, and why it stopped."""
    from cli.commands import fix_table
    from repair.report import candidates_table

    rows = [{"candidate": "average of dfr + mix", "kind": "head", "score": 0.7, "selection_accuracy": 0.8,
             "scored_on": "the same 2 folds (out-of-fold predictions)", "role": "head to beat"},
            {"candidate": "mixft", "kind": "model", "score_at_most": 0.55, "fit_seconds": 3.0, "steps": 5,
             "scored_on": "1 of the same 2 folds (out-of-fold predictions)",
             "stopped": "cannot beat the head: after 1 of 2 folds ..."}]
    figures = {"accuracy": 0.8, "worst_class_accuracy": 0.7}
    rep = {"model": {"source": "m"}, "output": "o", "recipe": "auto-ft", "candidate": "average of dfr + mix",
           "candidates": rows, "before": figures, "after": figures, "measured_on": "the held-out part",
           "timing": {"total_seconds": 1.0, "embedding_seconds": 0.5, "embedding_from_cache": True,
                      "fit_seconds": 0.5}}
    text = fix_table(rep)
    line = next(s for s in text.splitlines() if s.lstrip().startswith("mixft"))
    assert "<= 55.0%" in line and "70.0%" not in line
    html = candidates_table({"candidate": "average of dfr + mix", "candidates": rows})
    assert "≤ 55.0%" in html and "cannot beat the head" in html


def test_a_model_repair_that_cannot_train_on_a_fold_leaves_the_head(tmp_path, timm_folder):
    """auto-ft on a repair set whose folds are too small for the model repair (its own held-out part for
    early stopping): the model repair is skipped, saying why, and the result is the head auto returns
    (the run failed with exit 2 where auto succeeds). Without a head to fall back on the error stands."""
    from types import SimpleNamespace

    from repair.choosing import Chosen, Fitted, _escalate
    from repair.errors import BadInput
    from repair.selection import Criterion, KFold

    n = 40
    y = torch.arange(n) % 2
    head_pred = y.clone()
    head_pred[:16] ^= 1                                                 # a head at 60%: room to win

    class TooSmall(_FoldCtx):
        def fit(self, cand, idx, config=None):
            if cand.info.kind == "model":
                raise BadInput("the repair set is too small to hold out a part for early stopping")
            return super().fit(cand, idx, config)

    head = Chosen("dfr", "dfr")
    model = SimpleNamespace(label="mixft", info=SimpleNamespace(kind="model"), config=lambda: None)
    rows = []
    choice = _escalate(None, TooSmall(y, head_pred, y.clone()), torch.arange(n), y.clone(), Criterion("worst_class"),
                       y, y, (head, Fitted("head"), None, [0]), [head], [model], rows, KFold(2), seed=0,
                       log=lambda m: None)
    assert choice.chosen is head
    row = next(r for r in rows if r["kind"] == "model")
    assert "cannot be trained on a fold" in row["skipped"] and "too small" in row["skipped"]
    assert any("mixft skipped" in note for note in choice.notes)
    with pytest.raises(BadInput, match="too small"):
        _escalate(None, TooSmall(y, head_pred, y.clone()), torch.arange(n), y.clone(), Criterion("worst_class"), y,
                  y, None, [], [model], [], KFold(2), seed=0, log=lambda m: None)
    # end to end: the audit's case, 3 images per class
    small = make_images(tmp_path / "small", n_per_class=3, seed=5)
    code, out, err = run_cli("fix", timm_folder, "--data", small, "--recipe", "auto-ft", "--budget", "3steps",
                             "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["kind"] == "head"


def test_strength_average_averages_the_heads_of_every_strength(session):
    """``settle_strength: average``: no strength is chosen; each body's refitted head is the
    unit-spread average of the group-balanced heads of every strength of the grid (checked against
    the heads of each strength fitted on their own), the original body's too; the head the model ends
    with is that average fitted on every repair row."""
    from repair.modelrepair.finetune import REFIT_L2, refit_head, settle
    from repair.selection import head_logits, head_predictions

    sess, tm = session
    start = tm.state()
    _perturb(tm, 0.3, seed=2)
    tuned = tm.state()
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    tr, ho = sess.train_idx, sess.held_idx
    from repair.modelrepair.finetune import _balanced_heads
    Ws, bs = _balanced_heads(sess, X, sess.groups, tr, REFIT_L2)      # one batched fit of the grid
    heads = list(zip(Ws, bs))
    # each of them the head refit_head fits at that strength alone (to the solver's tolerance)
    for l2, (Wk, bk) in zip(REFIT_L2, heads):
        torch.testing.assert_close(refit_head(sess, X, sess.groups, l2=l2)[0], Wk, rtol=1e-2, atol=1e-2)
    # the average by hand: each head's class-centred logits on the training rows scaled to unit spread
    want_W, want_b = 0, 0
    for W, b in heads:
        lg = X[tr] @ W.T + b
        s = (lg - lg.mean(1, keepdim=True)).std()
        want_W, want_b = want_W + W / s / len(heads), want_b + b / s / len(heads)
    W, b, info = refit_head(sess, X, sess.groups, average=True)
    torch.testing.assert_close(W, want_W)
    torch.testing.assert_close(b, want_b)
    assert info["l2"] == list(REFIT_L2) and "averaged" in info["chosen_by"]
    worst, mean = sess.heldout_scores(head_predictions(X[ho], W[None], b[None]))
    assert info["heldout_score"] == pytest.approx(float(worst[0]))
    # not any single strength's head: the strengths' heads differ, and the average is none of them
    assert not torch.allclose(heads[0][0] / heads[0][0].norm(), heads[-1][0] / heads[-1][0].norm(), atol=1e-3)
    assert not any(torch.allclose(W / W.norm(), Wk / Wk.norm(), atol=1e-4) for Wk, _ in heads)
    diag = settle(sess, start, alphas=(0.0, 0.5, 1.0), strength="average")
    assert all(c["refit"]["l2"] == list(REFIT_L2) for c in diag["candidates"])
    assert {c["alpha"] for c in diag["candidates"]} == {0.0, 0.5, 1.0}
    # the model ends at the chosen body with the average refitted on every repair row
    a = diag["alpha"]
    tm.module.load_state_dict({k: start[k] + a * (tuned[k] - start[k]) if start[k].is_floating_point()
                               else start[k] for k in start})
    Xa = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    from repair.modelrepair.finetune import averaged_head
    Wall, ball = averaged_head(sess, Xa, sess.groups, torch.arange(sess.y.numel()))
    tm.module.load_state_dict(tuned)
    settle(sess, start, alphas=(0.0, 0.5, 1.0), strength="average")
    torch.testing.assert_close(tm.head.weight.detach().float(), Wall)
    torch.testing.assert_close(head_logits(Xa, Wall, ball), head_logits(Xa, tm.head.weight.detach().float(),
                                                                           tm.head.bias.detach().float()))


def test_strength_average_1se_averages_the_strengths_the_held_out_part_cannot_tell_from_the_best(session,
                                                                                               monkeypatch):
    """``settle_strength: average_1se``: the heads of the strengths whose held-out score is within one
    standard error of the best averaged (given scores: the second is best, the third and fourth within
    one standard error, the first and fifth not); with the original body too (alpha 0 a candidate); the
    model ends with that average fitted on every repair row."""
    from repair.modelrepair import finetune as F
    from repair.selection import average_heads

    sess, tm = session
    X = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    worst = torch.tensor([0.60, 0.70, 0.66, 0.651, 0.50], dtype=torch.float64)
    real = type(sess).heldout_scores
    monkeypatch.setattr(type(sess), "heldout_scores",
                        lambda self, pred, rows=None: (worst.clone(), torch.full((5,), 0.8)) if pred.shape[0] == 5
                        else real(self, pred))
    monkeypatch.setattr(type(sess), "score_standard_error", lambda self, pred, rows=None: 0.05)
    W, b, info = F.refit_head(sess, X, sess.groups, one_se=True, average=True)
    near = [F.REFIT_L2[j] for j in (1, 2, 3)]
    assert info["l2"] == near and "within one standard error" in info["chosen_by"]
    Ws, bs = F._balanced_heads(sess, X, sess.groups, sess.train_idx, F.REFIT_L2)
    want = average_heads(Ws[1:4], bs[1:4], X[sess.train_idx])
    torch.testing.assert_close(W, want[0])
    torch.testing.assert_close(b, want[1])
    # unseen (the original body) is chosen the same way, on the held-out part
    assert F.refit_head(sess, X, sess.groups, unseen=True, one_se=True, average=True)[2]["l2"] == near
    start = tm.state()
    _perturb(tm, 0.3, seed=2)
    diag = F.settle(sess, start, alphas=(0.0, 0.5, 1.0), strength="average_1se")
    assert all(c["refit"]["l2"] == near for c in diag["candidates"])
    Xa = tm.embed(sess.encoded, torch.arange(sess.y.numel()), "cpu")
    Wall, _ = F.averaged_head(sess, Xa, sess.groups, torch.arange(sess.y.numel()), near)
    torch.testing.assert_close(tm.head.weight.detach().float(), Wall)


def test_a_repair_set_too_small_to_hold_out_a_part_names_the_data(tmp_path, timm_folder):
    """Found by an audit: the error said what was too small but not which file."""
    from conftest import make_images, run_cli

    small = make_images(tmp_path / "small", seed=12, n_per_class=2)
    code, _, err = run_cli("fix", timm_folder, "--data", small, "--recipe", "mixft", "--budget", "1steps",
                           "--out", tmp_path / "o", "-q")
    lines = [l for l in err.splitlines() if not l.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and "too small to hold out a part" in lines[0], err
    assert lines[0].startswith(f"error: {small}"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("selection, applied", [("worst_inferred_group", "average"), ("worst_class", "heldout")])
def test_strength_auto_averages_under_the_worst_inferred_group_and_chooses_otherwise(session, selection, applied):
    """``settle_strength: auto`` (mixft's default): under the worst inferred group criterion (a skewed
    repair set, label-free) it is ``average``, under any other ``heldout`` -- the same candidates, scores
    and final head as that strength given by name, and the result says which was applied and why."""
    from repair.methods import get_method
    from repair.modelrepair.finetune import Session, settle, settle_strength_for

    _, tm = session
    sess = Session(session[0].inputs, holdout_fraction=0.5, selection=selection)
    assert sess.criterion.name == selection
    start = tm.state()
    _perturb(tm, 0.3, seed=2)
    tuned = tm.state()
    out = {}
    for strength in ("auto", applied):
        tm.module.load_state_dict(tuned)
        diag = settle(sess, start, alphas=(0.0, 0.5, 1.0), strength=strength)
        out[strength] = (diag, {k: v.clone() for k, v in tm.state().items()})
    (auto, w_auto), (named, w_named) = out["auto"], out[applied]
    assert auto.pop("strength") == {"applied": applied, "why": settle_strength_for("auto", selection)[1]}
    assert "strength" not in named and auto == named
    # average: every refitted head is the grid's average (its l2 the whole grid); heldout: one strength each
    assert all(isinstance(c["refit"]["l2"], list) == (applied == "average") for c in auto["candidates"])
    assert all(torch.equal(w_auto[k], w_named[k]) for k in w_auto)
    # the rule's one home, and who uses it by default: mixft; clp and recompose keep heldout
    assert settle_strength_for("auto", "worst_group")[0] == "heldout"
    assert settle_strength_for("average_1se", "worst_inferred_group") == ("average_1se", None)
    assert get_method("mixft").default_config().settle_strength == "auto"
    assert {get_method(m).default_config().settle_strength for m in ("clp", "recompose")} == {"heldout"}
