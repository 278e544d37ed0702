"""`auto` on deployment-like repair sets: the adaptive label-free criterion, repeated folds,
averaged heads, honest warnings, and no second forward pass."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_images, run_cli
from repair.errors import BadInput
from repair.selection import (IMBALANCE_THRESHOLD, Criterion, KFold, group_imbalance, label_free_criterion,
                              select_and_refit)




def _logits_with_error_rate(y: torch.Tensor, rate: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wrong = torch.rand(y.numel(), generator=g) < rate
    pred = torch.where(wrong, 1 - y, y)
    return torch.nn.functional.one_hot(pred, 2).float()


def test_label_free_criterion_follows_the_error_pattern():
    y = torch.tensor([0, 1] * 200)
    # errors on a third of each class: inferred groups about equal -> worst class
    balanced = label_free_criterion(y, _logits_with_error_rate(y, 0.3))
    assert balanced.name == "worst_class" and "imbalance" in balanced.reason
    # errors rare (5%): the minority hides inside the classes -> worst inferred group
    skewed = label_free_criterion(y, _logits_with_error_rate(y, 0.05))
    assert skewed.name == "worst_inferred_group"
    assert Criterion.resolve("auto", has_groups=False, y=y, ref_logits=_logits_with_error_rate(y, 0.05)) == skewed
    assert Criterion.resolve("auto", has_groups=True, y=y, ref_logits=None).name == "worst_group"
    assert group_imbalance(torch.tensor([0, 0, 0, 1, 2, 3]), torch.tensor([0, 0, 0, 0, 1, 1])) == (3 + 1) / 2
    assert IMBALANCE_THRESHOLD > 1


def test_repeated_folds_average_and_report_the_spread():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, generator=g)
    y = (x + 0.15 * torch.randn(200, generator=g) > 0.5).long()
    cands = [0.3, 0.5, 0.7]
    sel = select_and_refit(3, lambda idx, w: [cands[i] for i in w],
                           lambda f, idx: torch.stack([(x[idx] > t).long() for t in f]), y,
                           criterion=Criterion("worst_class"), score_strata=y, scheme=KFold(2, 3), seed=0)
    assert sel.best == 1 and sel.worst_se is not None and sel.worst_se.shape == (3,)
    assert bool((sel.worst_se >= 0).all()) and "3 repeats" in KFold(2, 3).describe()
    assert [r["heldout_worst_se"] >= 0 for r in sel.candidates(cands)] == [True] * 3


def test_a_candidate_out_of_contention_is_not_refitted_on_the_further_repeats():
    """``contend=k``: every candidate is scored on the first repeat; one that falls short of the k-th
    best there by more than the gain rule (two standard errors, at least a point) is not fitted on the
    further repeats, and ranks last; the candidates kept get exactly the scores of the full run."""
    g = torch.Generator().manual_seed(0)
    n = 4000                                     # large strata: a standard error of about a point
    x = torch.rand(n, generator=g)
    y = (x + 0.1 * torch.randn(n, generator=g) > 0.5).long()
    cands = [0.5, 0.45, 0.1, 0.9]                # two good thresholds, two hopeless ones

    def noisy(t, idx):                           # a fold's predictions: the threshold, blurred per fold
        blur = torch.randn(idx.numel(), generator=torch.Generator().manual_seed(int(idx.sum())))
        return (x[idx] + 0.02 * blur > t).long()

    fitted = []

    def fit(idx, which):
        fitted.append(list(which))
        return [(cands[i], idx) for i in which]

    def fit_folds(sets, which):
        return [fit(t, which) for t in sets]

    predict = lambda fs, idx: torch.stack([noisy(t, idx) for t, _ in fs])  # noqa: E731
    kw = dict(criterion=Criterion("worst_class"), score_strata=y, scheme=KFold(2, 3), seed=0, refit=False)
    full = select_and_refit(4, fit, predict, y, fit_folds=fit_folds, **kw)
    fitted.clear()
    raced = select_and_refit(4, fit, predict, y, fit_folds=fit_folds, contend=2, **kw)
    assert set(raced.dropped) == {2, 3} and all("first repeat" in why for why in raced.dropped.values())
    assert fitted[:2] == [[0, 1, 2, 3]] * 2 and fitted[2:] == [[0, 1]] * 4     # 2 folds x (1 + 2 repeats)
    assert raced.repeats_scored == [3, 3, 1, 1] and full.repeats_scored == [3, 3, 3, 3]
    for i in (0, 1):                             # the kept candidates: the full run's scores
        assert float(raced.worst[i]) == float(full.worst[i]) and float(raced.worst_se[i]) == float(full.worst_se[i])
    assert raced.ranked()[:2] == full.ranked()[:2] and set(raced.ranked()[2:]) == {2, 3}
    assert raced.best == full.best
    # the k-th best itself and everything within the gain rule of it stays: with k = 4 nothing is dropped
    every = select_and_refit(4, fit, predict, y, fit_folds=fit_folds, contend=4, **kw)
    assert not every.dropped and every.repeats_scored == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="accuracy"):     # the gain rule is in accuracy points
        select_and_refit(4, fit, predict, y, fit_folds=fit_folds, contend=2, score="probability", **kw)


@pytest.fixture(scope="module")
def skewed_images(tmp_path_factory):
    """A repair set where one class has only 6 samples of its minority attribute."""
    root = make_images(tmp_path_factory.mktemp("skew") / "val", n_per_class=24, seed=7)
    lines = (root / "metadata.csv").read_text().splitlines()
    keep, seen = [lines[0]], {}
    for line in lines[1:]:
        path, label, place = line.split(",")
        key = (label, place)
        seen[key] = seen.get(key, 0) + 1
        if label == "cat" and place == "water" and seen[key] > 6:
            continue
        keep.append(line)
    (root / "metadata.csv").write_text("\n".join(keep) + "\n")
    return root


def test_auto_averages_the_best_two_heads_and_says_so(timm_folder, skewed_images, tmp_path):
    out = tmp_path / "auto"
    code, stdout, err = run_cli("fix", timm_folder, "--data", skewed_images, "--group-by", "place",
                                "--out", out, "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["method"] == "ensemble" and rep["candidate"].startswith("average of ")
    members = rep["diagnostics"]["ensemble"]
    assert len(members) == 2 and all(m in rep["candidate"] for m in members)
    assert set(rep["settings"]["config"]["ensemble"]) == set(members)
    scored = [c for c in rep["candidates"] if "score" in c]
    assert len(scored) == 4 and all(c["score_se"] is not None for c in scored)
    top2 = sorted(scored, key=lambda c: (-c["score"], -c["selection_accuracy"]))[:2]
    assert {c["candidate"] for c in top2} == set(members)
    assert "2 repeats" in rep["selection_criterion"]
    # the small group is named in a warning, in the JSON and the table
    assert any("cat|place=water" in w and "only" in w for w in rep["warnings"])
    code, table, err = run_cli("fix", timm_folder, "--data", skewed_images, "--group-by", "place",
                               "--out", tmp_path / "auto2", "-q")
    assert code == 0 and "warning: " in table and "cat|place=water" in table


def test_label_free_report_names_the_criterion_and_why(timm_folder, skewed_images, tmp_path):
    code, stdout, err = run_cli("fix", timm_folder, "--data", skewed_images, "--out", tmp_path / "free",
                                "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert "no group labels" in rep["selection_criterion"] and "imbalance" in rep["selection_criterion"]


def test_export_verification_reuses_the_cached_logits(timm_folder, skewed_images, tmp_path, monkeypatch):
    """A head repair's ONNX export is verified against the repaired head on the cached embeddings:
    the repair set goes through the PyTorch model once (the extraction), never a second time."""
    from repair.adapters import load_model

    cls = type(load_model(timm_folder))
    calls = {"logits": 0}
    real = cls.logits_batch

    def counting(self, batch, device):
        calls["logits"] += 1
        return real(self, batch, device)

    monkeypatch.setattr(cls, "logits_batch", counting)
    code, stdout, err = run_cli("fix", timm_folder, "--data", skewed_images, "--recipe", "dfr", "--out",
                                tmp_path / "x", "--export", "onnx", "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["export"]["passed"] is True and calls["logits"] == 0
    # (the same export of a model repair does run the network: the counter sees it)
    calls["logits"] = 0
    code, _, err = run_cli("fix", timm_folder, "--data", skewed_images, "--recipe", "finetune", "--budget",
                           "2steps", "--out", tmp_path / "y", "--export", "onnx", "-q")
    assert code == 0, err
    assert calls["logits"] > 0


def test_fix_reads_the_repair_data_once(timm_folder, skewed_images, tmp_path, monkeypatch):
    """The pre-flight check reads the repair data; the pipeline goes on with what it read."""
    import repair.api
    import repair.preflight
    from repair.api import RuntimeOptions
    from repair.data import DataOptions, load_data
    from repair.pipeline import FixOptions, fix_model

    reads = []

    def counting(path, options=None):
        reads.append(str(path))
        return load_data(path, options)

    monkeypatch.setattr(repair.api, "load_data", counting)
    monkeypatch.setattr(repair.preflight, "load_data", counting)
    rep = fix_model(timm_folder, skewed_images, tmp_path / "out", data_opts=DataOptions(),
                    runtime=RuntimeOptions(progress=False), options=FixOptions(recipe="dfr"), log=lambda m: None)
    assert rep["method"] == "dfr" and reads == [str(skewed_images)]


def test_candidates_side_by_side_choose_exactly_what_one_at_a_time_does(timm_folder, skewed_images, tmp_path,
                                                                         monkeypatch):
    # with threads to spare, auto's head fits run side by side (threads.map_chains: each head's fit on
    # the whole fit part, then its fold fits as soon as it is done, one torch thread each): the fits
    # are independent, so every score, the choice and the written head are the ones the serial run gives
    import safetensors.torch

    from repair import threads

    import repair.embeddings

    calls = []
    real = threads.map_chains
    monkeypatch.setattr(threads, "map_chains",
                        lambda first, then, items, workers: calls.append(workers) or real(first, then, items, workers))
    # the same embeddings for both runs (the serial run's cache entry: the key's thread count held at one),
    # so only the fits differ in how they run (embeddings computed on 2 threads differ in their last bits)
    monkeypatch.setattr(repair.embeddings, "forward_threads", lambda: 1)
    reps, heads = [], []
    for n in (1, 2):
        out = tmp_path / f"t{n}"
        with threads.limited(n):
            code, stdout, err = run_cli("fix", timm_folder, "--data", skewed_images, "--out", out, "--json", "-q")
        assert code == 0, err
        reps.append(json.loads(stdout))
        sd = safetensors.torch.load_file(str(next(out.glob("*.safetensors"))))
        heads.append({k: v for k, v in sd.items() if "head" in k or "fc" in k or "classifier" in k})
    assert 1 in calls and 2 in calls, calls                  # serial once, side by side once
    strip = lambda r: [{k: v for k, v in c.items() if k != "fit_seconds"} for c in r["candidates"]]  # noqa: E731
    assert strip(reps[0]) == strip(reps[1]) and reps[0]["candidate"] == reps[1]["candidate"]
    assert heads[0] and heads[0].keys() == heads[1].keys()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    assert {"fit_seconds", "fit_seconds_summed"} <= set(reps[1]["timing"])   # wall clock, and every fit's own


@pytest.mark.parametrize("group_by", ["place", None])
def test_choose_heads_on_embeddings_is_what_fix_chooses(timm_folder, skewed_images, tmp_path, group_by):
    """``repair.choosing.choose_heads`` (arrays in, a head out) makes the choice ``repair fix`` makes on
    the same embeddings with every row in the fit part (``--eval`` given): the same criterion, the
    same candidate scores, the same head, with and without group labels."""
    from repair.api import RuntimeOptions
    from repair.choosing import choose_heads
    from repair.data import DataOptions
    from repair.pipeline import FixOptions, fix_model

    evals = make_images(tmp_path / "eval", n_per_class=8, seed=11)
    res = fix_model(timm_folder, skewed_images, tmp_path / "out", data_opts=DataOptions(group_by=group_by),
                    runtime=RuntimeOptions(progress=False),
                    options=FixOptions(recipe="auto", eval_data=str(evals), eval_group_by="place"),
                    log=lambda m: None)
    W0, b0 = res.original_head
    groups = res.encoded.groups
    assert (groups is not None) == (group_by is not None)
    choice = choose_heads("auto", res.embeddings.X, res.encoded.y, W0, b0, groups, seed=0)
    assert choice.chosen.label == res["candidate"]
    strip = lambda rows: [{k: v for k, v in c.items() if k != "fit_seconds"} for c in rows]  # noqa: E731
    assert strip(choice.rows) == strip(res["candidates"])
    assert choice.selection["criterion"] == res["settings"]["selection"]
    assert choice.selection["criterion"] == ("worst_group" if group_by else "worst_class")
    W, b = res.adapter.head_params()
    assert torch.allclose(choice.final.W, W, atol=1e-6) and torch.allclose(choice.final.b, b, atol=1e-6)
    assert not torch.equal(W, W0)                     # a repair was made, not the original head
    with pytest.raises(ValueError, match="model repairs"):
        choose_heads("auto-ft", res.embeddings.X, res.encoded.y, W0, b0, groups)
    X, y = res.embeddings.X, res.encoded.y
    for bad, match in (((X, y[:-1], W0, b0), "y must be"), ((X, y, W0[:, :-1], b0), "W0 must be a"),
                       ((X, y + W0.shape[0], W0, b0), "labels must be the head's classes"),
                       ((X, y, W0, b0, torch.zeros(3, dtype=torch.long)), "groups must be"),
                       ((X[:0], y[:0], W0, b0), "no rows"),
                       ((X, y.float() + 0.7, W0, b0), "y must be an .* integer tensor"),
                       ((X, y, W0, b0, torch.zeros_like(y) - 1), "groups must be ids from 0 up")):
        with pytest.raises(ValueError, match=match):
            choose_heads("auto", *bad)
    with pytest.raises(ValueError, match="clusters must be"):
        choose_heads("auto", X, y, W0, b0, clusters=torch.zeros(5, dtype=torch.long))
    for kw, match in (({"folds": 1}, "folds must be a whole number from 2 to 20"), ({"folds": 2.7}, "folds"),
                      ({"folds": 1000}, "folds"), ({"device": "bogus"}, "--device"), ({"seed": -1}, "seed")):
        with pytest.raises(BadInput, match=match):
            choose_heads("auto", X, y, W0, b0, **kw)


def test_auto_leaves_a_hopeless_head_out_of_the_second_repeat_and_says_so(monkeypatch):
    """On a repair set large enough to tell (3,000 rows, a planted shortcut), ``auto`` does not refit a
    head far behind the best two on the second repeat; the choice and the head are those of the full
    run, and the candidates table marks the head scored on the first repeat alone."""
    import repair.choosing as ch
    from bench.scale import make_problem
    from cli.commands import fix_table

    p = make_problem(2, 3000, 32, 0)
    args = ("auto", p["X"], p["y"], p["W0"], p["b0"], p["g"])
    raced = ch.choose_heads(*args)
    out = {r["candidate"]: r for r in raced.rows}
    dropped = [c for c, r in out.items() if r.get("out_of_contention")]
    assert dropped and all(out[c]["score_se"] is None and "first repeat only" in out[c]["scored_on"] for c in dropped)
    assert all(out[c]["score_se"] is not None for c in out if c not in dropped)
    real = ch.select_and_refit
    monkeypatch.setattr(ch, "select_and_refit", lambda *a, contend=None, **k: real(*a, **k))
    full = ch.choose_heads(*args)
    assert full.chosen.label == raced.chosen.label and not any(r.get("out_of_contention") for r in full.rows)
    assert torch.equal(full.final.W, raced.final.W) and torch.equal(full.final.b, raced.final.b)
    figures = {"accuracy": 0.9, "worst_class_accuracy": 0.9}
    text = fix_table({"model": {"source": "m"}, "output": "o", "recipe": "auto", "candidate": raced.chosen.label,
                      "candidates": raced.rows, "before": figures, "after": figures, "measured_on": "x",
                      "timing": {"total_seconds": 1.0, "embedding_seconds": 0.5, "embedding_from_cache": True,
                                 "fit_seconds": 0.5}})
    assert any(line.lstrip().startswith(dropped[0]) and "*" in line for line in text.splitlines())
    assert "out of contention after the first repeat" in text


def test_head_notes_name_the_member_whose_fit_stopped_at_its_cap():
    from repair.methods import head_notes

    avg = {"ensemble": ["dfr", "mix"],
           "members": {"dfr": {"solver_converged": False, "head_converged": False},
                       "mix": {"solver_converged": True, "warnings": ["mix: a group had one row"]}}}
    notes = head_notes("average of dfr + mix", avg)
    assert notes[0] == "mix: a group had one row" or notes[1] == "mix: a group had one row"
    capped = [n for n in notes if "iteration cap" in n]
    assert len(capped) == 1 and capped[0].startswith("dfr:") and "solver_converged, head_converged" in capped[0]
    assert head_notes("dfr", {"solver_converged": True}) == [] and head_notes("dfr", None) == []


def test_choose_heads_refuses_a_repair_set_missing_a_class_as_fix_does():
    """The library's arrays-in call is what ``repair fix`` does after extraction: a class without samples
    was fitted away silently (the returned head never predicted it: recall 0), where fix refuses."""
    from repair.choosing import choose_heads

    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 8, generator=g)
    y = torch.arange(90) % 2                    # classes 0 and 1 of a 3-class head: class 2 absent
    W0, b0 = torch.randn(3, 8, generator=g), torch.zeros(3)
    with pytest.raises(BadInput, match="covers 2 of the model's 3 classes"):
        choose_heads("dfr", X, y, W0, b0)
    with pytest.raises(BadInput, match="only one class"):
        choose_heads("dfr", X, torch.zeros(90, dtype=torch.long), W0, b0)
    assert choose_heads("dfr", X, torch.arange(90) % 3, W0, b0).final.W.shape == (3, 8)


def test_fix_resolves_the_selection_criterion_on_the_fit_part_alone(tmp_path, monkeypatch):
    """`selection: auto` picks worst-class or worst-inferred-group by the original model's errors: a
    choice, so made on the fit part only -- it was resolved on every row, the held-out report part
    included (near the threshold the report part decided it, and a model repair's own Session, on the
    fit rows, chose the other)."""
    import repair.pipeline as P
    from conftest import make_images, make_timm_folder

    seen = []
    real = P.selection_basis

    def spy(selection, y, ref_logits, groups):
        seen.append(int(y.numel()))
        return real(selection, y, ref_logits, groups)

    monkeypatch.setattr(P, "selection_basis", spy)
    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=12)
    res = P.fix_model(model, data, tmp_path / "o", options=P.FixOptions(recipe="dfr"), log=lambda m: None)
    fit = res.report["splits"]["fit"] if "splits" in res.report else res.report["settings"]["splits"]["fit"]
    assert seen[-1] == fit < 36, (seen, fit)


def test_choose_heads_checks_its_arrays_as_the_methods_do():
    """Found by an audit: choose_heads kept its own copy of the input rules, with other results than
    the methods' (repair.methods.check_inputs): label names were a TypeError from torch, y=None a
    KeyError, bool labels refused where the methods take them, and finite float64 values beyond
    float32's range a false "holds NaN or infinite values". One home now: both entry points agree,
    and a refusal is a BadInput (and a ValueError, as choose_heads documents) naming the problem."""
    import numpy as np

    from repair.choosing import choose_heads
    from repair.methods import RepairInputs, get_method

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4))
    y = np.arange(40) % 2
    X[:, 0] += 2 * y
    W, b = rng.normal(size=(2, 4)), np.zeros(2)
    for labels, match in ((np.array(["a", "b"])[y], "choose_heads: y must be an array or tensor of class indices"),
                          (None, "choose_heads: y must be a torch tensor"),
                          (list(np.array(["a", "b"])[y]), "choose_heads: y must be")):
        with pytest.raises(BadInput, match=match) as e:
            choose_heads("dfr", X, labels, W, b)
        assert isinstance(e.value, ValueError)
    dfr = get_method("dfr")
    tensors = dict(X=torch.tensor(X).float(), W=torch.tensor(W).float(), b=torch.zeros(2))
    as_bool = choose_heads("dfr", X, y.astype(bool), W, b)
    as_int = choose_heads("dfr", X, y, W, b)
    assert torch.equal(as_bool.final.W, as_int.final.W) and torch.equal(as_bool.final.b, as_int.final.b)
    direct = dfr(RepairInputs(y=torch.tensor(y).bool(), **tensors))
    assert torch.equal(direct.W, dfr(RepairInputs(y=torch.tensor(y), **tensors)).W)
    huge = torch.tensor(X) * 1e39                                  # finite float64, beyond float32
    with pytest.raises(BadInput, match="choose_heads: X holds values beyond float32's range") as e:
        choose_heads("dfr", huge, y, W / 1e39, b)
    assert isinstance(e.value, ValueError)
    with pytest.raises(BadInput, match="dfr: X holds values beyond float32's range"):
        dfr(RepairInputs(X=huge, y=torch.tensor(y), W=torch.tensor(W) / 1e39, b=torch.zeros(2)))
    with pytest.raises(BadInput, match="choose_heads: X holds NaN or infinite values"):
        choose_heads("dfr", np.where(np.arange(160).reshape(40, 4) == 3, np.nan, X), y, W, b)
