"""Cross-fitted model repairs (``mixft``'s ``cross_fit``): members trained on all folds but one,
averaged into one model, and settling judged on out-of-fold predictions of every repair row."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import make_bert_folder, make_texts, run_cli
from test_steady import _perturb, session  # noqa: F401  (the fixture)


def _trainable(tm):
    return [p for n, p in tm.module.named_parameters() if ".encoder." in n or n.startswith(tm.head_name)]


def test_members_train_on_their_folds_from_one_start_and_end_at_their_average(session):  # noqa: F811
    from repair.modelrepair.finetune import LoopResult, cross_fit

    sess, tm = session
    params = _trainable(tm)
    for p in params:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in params]
    split = (sess.train_idx.clone(), sess.held_idx.clone())
    seen, trained = [], []

    def run_member(j, budget):
        seen.append((sess.train_idx.clone(), sess.held_idx.clone(), budget.seconds))
        for p, s in zip(params, start):                      # every member starts where the first did
            assert torch.equal(p, s)
        gen = torch.Generator().manual_seed(10 + j)
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        trained.append([p.detach().clone() for p in params])
        return LoopResult(steps=3, best_step=2, best_score=0.5 + j / 10, best_accuracy=0.7, seconds=0.0,
                          stopped_by="epochs")

    res, members = cross_fit(sess, 3, params, run_member)
    # the folds: disjoint held parts covering every row once, each member training on the rest
    n = sess.y.numel()
    held = torch.cat([ho for _, ho, _ in seen])
    assert sorted(held.tolist()) == list(range(n))
    for tr, ho, secs in seen:
        assert sorted(torch.cat([tr, ho]).tolist()) == list(range(n))
        assert secs == pytest.approx(600.0 / 3)                # the default time budget shared
        # stratified: every group's share of a fold is within one row of a third
        for g in torch.unique(sess.groups).tolist():
            assert abs(int((sess.groups[ho] == g).sum()) - int((sess.groups == g).sum()) / 3) <= 1
    # the session's own split is back
    assert torch.equal(sess.train_idx, split[0]) and torch.equal(sess.held_idx, split[1])
    # the weights end at the members' average; each member's weights and fold are returned
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), torch.stack([t[i] for t in trained]).mean(0))
    names = {id(p): n for n, p in tm.module.named_parameters()}
    for (state, tr, ho), t, s in zip(members, trained, seen):
        assert torch.equal(tr, s[0]) and torch.equal(ho, s[1])
        for p, v in zip(params, t):
            assert torch.equal(state[names[id(p)]], v)
    assert res.steps == 9 and res.budget["member_scores"] == [0.5, 0.6, 0.7] and res.budget["cross_fit"] == 3


def test_settle_judges_every_point_on_out_of_fold_predictions(session):  # noqa: F811
    """Each candidate's score is that of the members' bodies at its alpha, each with its own head or
    a head refitted on its training rows (strength chosen on the pooled out-of-fold predictions),
    predicting the fold it did not train on; the model ends at the average at the chosen alpha with
    the head refitted on every repair row."""
    from repair.modelrepair.finetune import REFIT_L2, _balanced_heads, settle
    from repair.selection import head_predictions, pick_best, shrunk_scores, SHRINK_SAMPLES

    sess, tm = session
    start = tm.state()
    parts = sess.fold_parts(2)
    members = []
    for j, (tr, ho) in enumerate(parts):
        tm.module.load_state_dict(start)
        _perturb(tm, 0.3, seed=20 + j)
        members.append((tm.state(), tr, ho))
    soup = {k: torch.stack([m[0][k].double() for m in members]).mean(0).to(start[k].dtype)
            if start[k].is_floating_point() else start[k] for k in start}
    every = torch.arange(sess.y.numel())
    rows = torch.cat([ho for _, ho in parts])

    def at(state, a):
        return {k: start[k] + a * (state[k] - start[k]) if start[k].is_floating_point() else start[k] for k in start}

    def scores(pred):
        w, m = shrunk_scores(pred[None], sess.y[rows], sess.score_strata[rows], SHRINK_SAMPLES)
        return float(w[0]), float(m[0])

    want = {}
    for a in (0.5, 1.0):
        own, grid = [], []
        for state, tr, ho in members:
            tm.module.load_state_dict(at(state, a))
            X = tm.embed(sess.encoded, every, "cpu")
            own.append(head_predictions(X[ho], tm.head.weight.detach().float(), tm.head.bias.detach().float()))
            W, b = _balanced_heads(sess, X, sess.groups, tr, REFIT_L2)
            grid.append(head_predictions(X[ho], W, b))
        want[(a, "fine-tuned")] = scores(torch.cat(own))
        pooled = torch.cat(grid, dim=1)
        per = [scores(p) for p in pooled]
        k = pick_best(torch.tensor([s[0] for s in per]), torch.tensor([s[1] for s in per]))
        want[(a, "refit")] = per[k] + (REFIT_L2[k],)
    tm.module.load_state_dict(soup)
    diag = settle(sess, start, alphas=(0.5, 1.0), heads=("own", "refit"), members=members)
    assert diag["scored_on"].startswith("out-of-fold predictions of 2")
    assert len(diag["candidates"]) == 4
    for c in diag["candidates"]:
        w = want[(c["alpha"], c["head"])]
        assert (c["heldout_score"], c["heldout_accuracy"]) == pytest.approx(w[:2])
        if c["head"] == "refit":
            assert c["refit"]["l2"] == w[2]
    # the model ends at the soup moved to the chosen alpha, with the chosen head
    a = diag["alpha"]
    got = tm.state()
    for k in start:
        if start[k].is_floating_point() and not k.startswith(tm.head_name):
            torch.testing.assert_close(got[k], at(soup, a)[k], atol=1e-6, rtol=0)
    if diag["head"] == "refit":
        tm.module.load_state_dict(at(soup, a))
        X = tm.embed(sess.encoded, every, "cpu")
        W, b = _balanced_heads(sess, X, sess.groups, every, [diag["refit"]["l2"]])
        torch.testing.assert_close(got[tm.head_name + ".weight"], W[0].to(got[tm.head_name + ".weight"]))


def test_settle_on_one_member_is_settle_on_the_held_out_part(session):  # noqa: F811
    """One member trained on the session's own split is exactly the ordinary settle."""
    from repair.modelrepair.finetune import settle

    sess, tm = session
    start = tm.state()
    _perturb(tm, 0.3, seed=5)
    tuned = tm.state()
    plain = settle(sess, start, alphas=(0.0, 0.5, 1.0), heads=("own", "refit"))
    after = tm.state()
    tm.module.load_state_dict(tuned)
    one = settle(sess, start, alphas=(0.0, 0.5, 1.0), heads=("own", "refit"),
                 members=[(tuned, sess.train_idx, sess.held_idx)])
    strip = [{k: v for k, v in c.items() if k != "refit"} for c in plain["candidates"]]
    assert strip == [{k: v for k, v in c.items() if k != "refit"} for c in one["candidates"]]
    assert (one["alpha"], one["head"]) == (plain["alpha"], plain["head"])
    for k, v in tm.state().items():
        torch.testing.assert_close(v, after[k])


def test_cross_fitted_mixft_folds_into_an_ordinary_checkpoint(tmp_path):
    """``repair fix`` with mixft ``cross_fit: 2``: the report says how it was fitted, and plain
    transformers reloads the output and computes what ``repair eval`` measures."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = make_bert_folder(tmp_path / "bert", seed=3)
    data = make_texts(tmp_path / "val.csv", n=48, seed=1)
    test = make_texts(tmp_path / "test.csv", n=24, seed=2)
    recipe = tmp_path / "cf.yaml"
    recipe.write_text("name: cf\ncandidates:\n  - method: mixft\n    params: {epochs: 2, batch_size: 8, lr: 0.001, "
                      "cross_fit: 2, head_init: refit}\n")
    out = tmp_path / "fixed"
    code, stdout, err = run_cli("fix", model, "--data", data, "--recipe", recipe, "--eval", test, "--out", out,
                                "--seed", "0", "--json", "-q")
    assert code == 0, err
    d = json.loads(stdout)["diagnostics"]
    assert d["session"]["cross_fit"] == 2 and len(d["session"]["fold_sizes"]) == 2
    assert d["loop"]["budget"]["members"] == 2 and len(d["head_refit"]) == 2
    assert d["settle"]["scored_on"].startswith("out-of-fold")
    seen = {r["text"] for r in csv.DictReader(open(data))}
    texts = [r["text"] for r in csv.DictReader(open(test)) if r["text"] not in seen]
    rep = json.loads(stdout)
    plain = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        lg = plain(**tok(texts, padding=True, return_tensors="pt")).logits
    y = torch.tensor([1 if r["label"] == "positive" else 0 for r in csv.DictReader(open(test))
                      if r["text"] not in seen])
    assert float((lg.argmax(1) == y).float().mean()) == pytest.approx(rep["after"]["accuracy"], abs=1e-6)


@pytest.mark.parametrize("extra", ["lora: true", "members: 2"])
def test_cross_fit_with_lora_or_a_soup_is_refused_before_any_work(tmp_path, extra):
    model = make_bert_folder(tmp_path / "bert", seed=3)
    data = make_texts(tmp_path / "val.csv", n=48, seed=1)
    recipe = tmp_path / "cf.yaml"
    recipe.write_text(f"name: cf\ncandidates:\n  - method: mixft\n    params: {{cross_fit: 2, {extra}}}\n")
    code, _, err = run_cli("fix", model, "--data", data, "--recipe", recipe, "--out", tmp_path / "o", "-q")
    assert code == 2 and "cross_fit" in err and not (tmp_path / "o").exists()


def test_the_built_in_cross_fitted_recipe_is_what_the_benchmark_measured():
    """``--recipe mixft-crossfit`` is the benchmark's row ``mixft-cf2-p0`` (the figures its comment quotes)."""
    from bench.rows import MODEL_ROWS
    from repair.recipes import load_recipe

    (cand,) = load_recipe("mixft-crossfit").candidates
    row = next(r for r in MODEL_ROWS if r.label == "mixft-cf2-p0")
    assert cand.method == row.method == "mixft"
    assert dict(cand.params) == dict(row.params) == {"cross_fit": 2, "patience": 0, "settle_strength": "heldout"}


class _CrossCtx:
    """Just enough of :class:`repair.choosing.FitContext` for :func:`repair.choosing._escalate` with a
    cross-fitting model repair: the head predicts ``head_pred`` (its embeddings are one-hot rows of it),
    the model repair's one run returns ``model_pred`` as its out-of-fold predictions (each fit recorded
    with the folds it was given); ``fail`` makes the model's fit a BadInput."""

    def __init__(self, y, head_pred, model_pred, fail=None):
        self.y, self.model_pred, self.fail = y, model_pred, fail
        self.X = torch.nn.functional.one_hot(head_pred, 2).float()
        self.model_fits = []

    def fit(self, cand, idx, config=None, folds=None, stop_check=None):
        from repair.choosing import Fitted
        from repair.errors import BadInput
        from repair.methods import CannotWin

        if cand.info.kind == "head":
            return Fitted("head", W=torch.eye(2), b=torch.zeros(2))
        self.model_fits.append((idx, folds))
        self.checked = []
        if self.fail:
            raise BadInput(self.fail)
        if stop_check is not None:        # after the first member: its fold at every point (here: two)
            held = folds[0][1]
            points = torch.stack([self.model_pred[held], self.model_pred[held]])
            why = stop_check(held, points)
            self.checked.append(why)
            if why:
                e = CannotWin(why)
                e.steps, e.members, e.seconds = 3, 1, 0.7
                raise e
        return Fitted("model", tensors={"w": torch.ones(1)}, steps=7, seconds=1.5,
                      diagnostics={"loop": {"budget": {"member_stopped_by": ["epochs", "epochs"]}}},
                      oof_pred=self.model_pred.clone())

    def model_logits(self, fitted, idx):
        raise AssertionError("a cross-fitted repair is scored on its own out-of-fold predictions")


def test_auto_ft_cross_fits_its_model_repair_on_the_heads_folds_and_keeps_the_members_average():
    """A model repair that cross-fits over as many folds as the recipe's (mixft ``cross_fit: 2`` in
    auto-ft) is run once with the heads' folds as its folds; its out-of-fold predictions are scored by
    the same criterion against the head, and when it wins that run is the model -- no third training.
    When it does not win by the gain it needs, the head stays; a fold too small for it leaves the head."""
    from types import SimpleNamespace

    from repair.choosing import Chosen, Fitted, _escalate
    from repair.selection import Criterion, KFold, required_gain, scores_from_preds

    g = torch.Generator().manual_seed(0)
    n = 200
    y = torch.arange(n) % 2
    head_pred = y.clone()
    head_pred[torch.randperm(n, generator=g)[:40]] ^= 1                  # the head: 80% right
    head = Chosen("dfr", "dfr")
    model = SimpleNamespace(label="mixft", info=SimpleNamespace(kind="model"),
                            config=lambda: SimpleNamespace(cross_fit=2, settle="refit"))
    crit = Criterion("worst_class")

    def run(model_pred, fail=None):
        ctx = _CrossCtx(y, head_pred, model_pred, fail)
        rows = []
        choice = _escalate(None, ctx, torch.arange(n), y.clone(), crit, y, y, (head, Fitted("head"), None, [0]),
                           [head], [model], rows, KFold(2), seed=0, log=lambda m: None)
        return choice, rows, ctx

    better = y.clone()
    better[torch.randperm(n, generator=g)[:4]] ^= 1                      # 98% right
    choice, rows, ctx = run(better)
    assert choice.chosen is model and len(ctx.model_fits) == 1         # one run, no final fit
    idx, folds = ctx.model_fits[0]
    assert torch.equal(idx, torch.arange(n)) and len(folds) == 2
    held = torch.cat([ho for _, ho in folds])
    assert sorted(held.tolist()) == list(range(n))                       # every row held out once
    for tr, ho in folds:
        assert sorted(torch.cat([tr, ho]).tolist()) == list(range(n))
    assert choice.final.oof_pred is not None and choice.final.tensors == {"w": torch.ones(1)}
    scored = next(r for r in rows if r["kind"] == "model" and "score" in r)
    assert scored["score"] == pytest.approx(float(scores_from_preds(better[None], y, y)[0][0]))
    assert "cross-fitted" in scored["scored_on"] and scored["stopped_by"] == ["epochs", "epochs"]
    final = next(r for r in rows if r.get("role") == "final fit")
    assert final["steps"] == 0 and "no further training" in final["final"]
    # the folds are the heads' own: the head to beat was scored on exactly these held-out parts
    beat = next(r for r in rows if r.get("role") == "head to beat")
    assert beat["score"] == pytest.approx(float(scores_from_preds(head_pred[None], y, y)[0][0]))
    # a little better than the head, short of the gain it needs: the head stays, one run all the same
    close = head_pred.clone()
    close[(close != y).nonzero().flatten()[:3]] ^= 1
    assert (float(scores_from_preds(close[None], y, y)[0][0]) <
            float(scores_from_preds(head_pred[None], y, y)[0][0]) + required_gain(head_pred, y, y))
    choice, rows, ctx = run(close)
    assert choice.chosen is head and len(ctx.model_fits) == 1
    # after the first member the caller bounds the run: a close one goes on (the bound counts the
    # second fold's rows right), a hopeless one stops there -- the head stays, as the whole run would
    # have left it, and the row says at most what it could have scored
    assert ctx.checked == [None]
    choice, rows, ctx = run(1 - y)
    assert choice.chosen is head and len(ctx.model_fits) == 1 and ctx.checked[0]
    row = next(r for r in rows if r["kind"] == "model")
    assert "cannot beat the head: after 1 of 2 cross-fitted members" in row["stopped"] and "score" not in row
    assert row["score_at_most"] < beat["score"] + beat["required_gain"] and row["steps"] == 3
    assert row["scored_on"].startswith("1 of the same 2 folds") and row["fit_seconds"] == 0.7
    # a fold too small for the model repair: skipped, saying why; the head stays
    choice, rows, ctx = run(better, fail="the repair set is too small for 2-fold cross-fitting")
    assert choice.chosen is head
    assert "cannot be cross-fitted" in next(r for r in rows if r["kind"] == "model")["skipped"]


def test_mixft_cross_fits_on_the_folds_it_is_given_and_returns_its_out_of_fold_predictions(session):  # noqa: F811
    """``ModelRepairInputs.folds``: cross-fitting takes the caller's folds instead of drawing its own;
    folds that do not hold out every row exactly once are refused; settling returns the chosen point's
    out-of-fold prediction of every row."""
    from repair.modelrepair.finetune import settle

    sess, tm = session
    n = sess.y.numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    given = [(perm[n // 2:], perm[:n // 2]), (perm[:n // 2], perm[n // 2:])]
    sess.inputs.folds = given
    try:
        parts = sess.fold_parts(2)
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(parts, given))
        with pytest.raises(ValueError, match="folds given"):
            sess.fold_parts(3)
        sess.inputs.folds = [(perm[n // 2:], perm[:n // 2]), (perm[:n // 2], perm[n // 2 + 1:])]
        with pytest.raises(ValueError, match="exactly once"):
            sess.fold_parts(2)
    finally:
        sess.inputs.folds = None
    start = tm.state()
    members = []
    for j, (tr, ho) in enumerate(given):
        tm.module.load_state_dict(start)
        _perturb(tm, 0.3, seed=30 + j)
        members.append((tm.state(), tr, ho))
    diag = settle(sess, start, alphas=(0.5, 1.0), heads=("refit",), members=members)
    oof = diag.pop("oof_pred")
    assert oof.shape == (n,) and bool((oof >= 0).all())
    chosen = next(c for c in diag["candidates"] if c["alpha"] == diag["alpha"] and c["head"] == diag["head"])
    from repair.selection import SHRINK_SAMPLES, shrunk_scores

    w, m = shrunk_scores(oof[None], sess.y, sess.score_strata, SHRINK_SAMPLES)
    assert (float(w[0]), float(m[0])) == pytest.approx((chosen["heldout_score"], chosen["heldout_accuracy"]))
    json.dumps(diag)                                                     # the rest is reportable


def test_a_fold_that_leaves_a_group_out_of_a_members_training_is_refused(session):  # noqa: F811
    """Identical samples stay on one side of a fold; when all of a group's rows are one such cluster,
    the member whose fold holds them would never train on the group: a BadInput naming the problem
    (and the data file), not a member trained without it."""
    from repair.errors import BadInput

    sess, _ = session
    present, counts = torch.unique(sess.groups, return_counts=True)
    g = int(present[counts.argmin()])                                 # the smallest group
    dup = torch.arange(sess.y.numel())
    dup[sess.groups == g] = -1                                        # its rows: one cluster
    sess.inputs.duplicates = dup
    sess.inputs.resources = {"data_file": "val.csv"}
    try:
        with pytest.raises(BadInput, match="too small for 2-fold cross-fitting") as e:
            sess.fold_parts(2)
        assert e.value.path == "val.csv"
    finally:
        sess.inputs.duplicates, sess.inputs.resources = None, {}
    assert len(sess.fold_parts(2)) == 2                               # without the cluster it folds


def test_a_cross_fitted_run_is_bounded_after_its_first_member(tmp_path):
    """``ModelRepairInputs.stop_check``: after the first member, mixft hands its caller the member's
    fold and the predictions there of every point settling could still choose. The finished run's
    out-of-fold predictions on that fold are one of those points (so the caller's bound holds), a check
    that lets the run go on changes nothing, and one that gives a reason ends the run (CannotWin) with
    the steps taken and the members trained."""
    from repair.adapters import load_model
    from repair.methods import CannotWin, ModelRepairInputs, get_method

    model = make_bert_folder(tmp_path / "bert", seed=3)
    rows = list(csv.DictReader(open(make_texts(tmp_path / "texts.csv", n=48, seed=1))))
    tm = load_model(model).trainable()
    texts = [r["text"] for r in rows]
    y = torch.tensor([1 if r["label"] == "positive" else 0 for r in rows])
    ref = tm.predict(tm.encode(texts), torch.arange(len(texts)), "cpu")
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(4))
    folds = [(perm[24:], perm[:24]), (perm[:24], perm[24:])]
    info = get_method("mixft")
    cfg = info.make_config({"epochs": 2, "batch_size": 8, "lr": 1e-3, "cross_fit": 2, "patience": 0})
    start = tm.state()

    def run(check):
        tm.module.load_state_dict(start)
        return info(ModelRepairInputs(model=tm, items=texts, y=y, ref_logits=ref, seed=0, device="cpu",
                                      progress=False, class_names=["negative", "positive"], folds=folds,
                                      stop_check=check), cfg)

    seen = []
    bounded = run(lambda r, p: seen.append((r.clone(), p.clone())))
    plain = run(None)
    assert len(seen) == 1
    held, points = seen[0]
    assert torch.equal(held.sort().values, folds[0][1].sort().values)
    assert points.dim() == 2 and points.shape[0] > 2 and points.shape[1] == held.numel()
    assert any(torch.equal(p, bounded.oof_pred[held]) for p in points)
    assert torch.equal(bounded.oof_pred, plain.oof_pred) and bounded.steps == plain.steps
    assert set(bounded.tensors) == set(plain.tensors)
    for k, v in plain.tensors.items():
        assert torch.equal(bounded.tensors[k], v), k
    with pytest.raises(CannotWin) as e:
        run(lambda r, p: "cannot beat the head")
    assert e.value.reason == "cannot beat the head" and e.value.members == 1
    assert 0 < e.value.steps < plain.steps
