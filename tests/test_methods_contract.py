"""Contract tests run for EVERY registered repair method (parametrised over list_methods()).

A method passes when it:
- returns a head of shape (C, D) / (C,), float32 on the CPU, finite;
- leaves its input tensors untouched and is deterministic for a fixed seed;
- has a dataclass config with defaults whose fields are JSON-serialisable, and
  JSON-serialisable diagnostics;
- declares the embedding transform it folds into its head (``transform=`` at
  registration, one of ``repair.methods.transforms``), and that transform's fold is
  exact: the head applied to the transformed embeddings equals the folded head on the
  raw ones (every transform a method applies to embeddings must be folded this way);
- RAISES worst-group accuracy by >= 10 points on a synthetic embedding problem with a
  planted spurious feature (with and without group labels where the method allows);
- refuses to run without groups when it declares needs_groups.

Synthetic problem: ReLU-like embeddings, D=32. Dims 0..C-1 are "core" (one per class,
+1 for the true class, noisy), dims C..2C-1 are "spurious" (one per attribute value,
+2, nearly noise-free). The original head is a logistic regression fitted on a
training set where attribute == class for 95% of the samples, so it leans on the
spurious dims; the repair set is a separate sample with 75% attribute == class; the
test set is group-balanced (groups = class x attribute).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from repair import selection as Sel
from repair import solver as S
from repair.methods import RepairInputs, list_methods
from repair.methods.transforms import TRANSFORMS

METHODS = list_methods(kind="head")
IDS = [m.name for m in METHODS]


def _sample(n, C, p_major, g, D=32, core_noise=0.6, spur_noise=0.3):
    y = torch.randint(0, C, (n,), generator=g)
    other = (y + torch.randint(1, C, (n,), generator=g)) % C
    a = torch.where(torch.rand(n, generator=g) < p_major, y, other)
    X = 0.5 * torch.rand(n, D, generator=g)
    X[torch.arange(n), y] += 1.0
    X[:, :C] += core_noise * torch.randn(n, C, generator=g)
    X[torch.arange(n), C + a] += 2.0
    X[:, C:2 * C] += spur_noise * torch.randn(n, C, generator=g)
    return torch.relu(X), y, y * C + a


def _balanced(n_per_group, C, g):
    X, y, gr = _sample(n_per_group * C * C * 6, C, 1.0 / C, g)
    idx = torch.cat([torch.nonzero(gr == k).flatten()[:n_per_group] for k in range(C * C)])
    return X[idx], y[idx], gr[idx]


def _problem(C, seed=0):
    g = torch.Generator().manual_seed(seed)
    Xtr, ytr, _ = _sample(3000, C, 0.95, g)
    W, b, _ = S.fit_logreg(Xtr, ytr, C, l2=1.0)
    Xr, yr, gr = _sample(2000, C, 0.75, g)
    Xt, yt, gt = _balanced(300, C, g)
    return {"X": Xr, "y": yr, "groups": gr, "W": W[0], "b": b[0], "test": (Xt, yt, gt), "C": C}


@pytest.fixture(scope="module")
def problems():
    return {C: _problem(C) for C in (2, 3)}


def _inputs(p, with_groups, seed=0):
    return RepairInputs(X=p["X"], y=p["y"], W=p["W"], b=p["b"],
                        groups=p["groups"] if with_groups else None, seed=seed)


def _wga(p, W, b):
    Xt, yt, gt = p["test"]
    return Sel.worst_group_accuracy(Xt @ W.T + b, yt, gt)


def _group_settings(m):
    if m.needs_groups:
        return [True]
    return [True, False] if m.uses_groups else [False]


def test_registry_has_builtins():
    assert {"dfr", "afr", "mix", "neurontune", "nsf"} <= set(IDS)


@pytest.mark.parametrize("m", list_methods(), ids=[m.name for m in list_methods()])
def test_config_is_plain_dataclass(m):
    assert dataclasses.is_dataclass(m.config_cls)
    assert m.kind in ("head", "model") and m.groups in ("never", "optional", "required")
    cfg = m.default_config()
    json.dumps(dataclasses.asdict(cfg))           # recorded in provenance
    assert m.make_config({}) == cfg
    with pytest.raises(ValueError):
        m.make_config({"no_such_setting": 1})
    # a value of the wrong type is refused with the setting's name
    first = dataclasses.fields(m.config_cls)[0].name
    with pytest.raises(ValueError, match=first):
        m.make_config({first: {"not": "a value"}})


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_declared_transform_folds_exactly(m):
    g = torch.Generator().manual_seed(0)
    D, C = 17, 3
    X = torch.randn(40, D, generator=g) * 2 + 0.5
    W, b = torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    transforms = [m.transform] if m.transform is not None else list(TRANSFORMS.values())
    for tr in transforms:
        t = tr.example(D, g)
        Wf, bf = tr.fold(W, b, t)
        assert Wf.shape == W.shape and bf.shape == b.shape
        torch.testing.assert_close(tr.apply(X, t) @ W.T + b, X @ Wf.T + bf, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_contract_shape_purity_determinism(m, problems):
    p = problems[3]
    inp = _inputs(p, with_groups=m.uses_groups or m.needs_groups, seed=7)
    before = {k: getattr(inp, k).clone() for k in ("X", "y", "W", "b")}
    g_before = None if inp.groups is None else inp.groups.clone()
    out1 = m(inp)
    for k, v in before.items():
        assert torch.equal(getattr(inp, k), v), f"{m.name} modified inputs.{k}"
    if g_before is not None:
        assert torch.equal(inp.groups, g_before)
    C, D = p["W"].shape
    assert out1.W.shape == (C, D) and out1.b.shape == (C,)
    assert out1.W.dtype == torch.float32 and out1.b.dtype == torch.float32
    assert out1.W.device.type == "cpu" and out1.b.device.type == "cpu"
    assert torch.isfinite(out1.W).all() and torch.isfinite(out1.b).all()
    json.dumps(out1.diagnostics, allow_nan=False)
    out2 = m(inp)
    assert torch.equal(out1.W, out2.W) and torch.equal(out1.b, out2.b), f"{m.name} is not deterministic"
    assert json.dumps(out1.diagnostics, sort_keys=True) == json.dumps(out2.diagnostics, sort_keys=True)


@pytest.mark.parametrize("C", [2, 3])
@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_raises_worst_group_accuracy(m, C, problems):
    p = problems[C]
    base = _wga(p, p["W"], p["b"])
    assert base < 0.6, "synthetic problem is too easy: the original head must rely on the spurious dims"
    for with_groups in _group_settings(m):
        out = m(_inputs(p, with_groups))
        acc = _wga(p, out.W, out.b)
        assert acc >= base + 0.10, (f"{m.name} (C={C}, groups={with_groups}): worst-group accuracy "
                                    f"{base:.3f} -> {acc:.3f}")


def test_a_method_that_needs_groups_is_refused_without_them(problems):
    """A method registered with ``groups="required"`` (none of the built-ins today; a plugin's may be)
    is never run without group labels: the call is a BadInput naming it, before its code runs."""
    from repair.errors import BadInput
    from repair.methods import METHODS as REGISTRY, RepairOutput, register_method

    calls = []

    @dataclasses.dataclass
    class Nothing:
        """No settings."""

    @register_method("needs_groups_probe", summary="test only", config=Nothing, groups="required")
    def probe(inputs, config):
        calls.append(inputs.groups)
        return RepairOutput(W=inputs.W.clone(), b=inputs.b.clone())

    try:
        needing = [m for m in list_methods() if m.needs_groups]
        assert "needs_groups_probe" in [m.name for m in needing]
        for m in needing:
            with pytest.raises(BadInput, match=m.name):
                m(_inputs(problems[2], with_groups=False))
        assert calls == []
        REGISTRY.get("needs_groups_probe")(_inputs(problems[2], with_groups=True))
        assert len(calls) == 1 and calls[0] is not None
    finally:
        REGISTRY.unregister("needs_groups_probe")


def test_neurontune_masks_spurious_dims_with_zero_weight(problems):
    from repair.methods import get_method
    p = problems[2]
    info = get_method("neurontune")
    # the mask mechanism, with the criterion that sees the planted errors on balanced classes
    out = info(_inputs(p, False), info.make_config({"selection": "worst_inferred_group"}))
    dims = [d["dim"] for d in out.diagnostics["suppressed_top"]]
    assert out.diagnostics["neurons_suppressed"] >= 1
    assert set(dims) & {2, 3}, "the planted spurious dims should be suppressed"
    assert torch.all(out.W[:, dims] == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_cuda_runs_and_returns_cpu(m, problems):
    p = problems[2]
    inp = _inputs(p, m.uses_groups or m.needs_groups)
    inp.device = "cuda"
    out = m(inp)
    assert out.W.device.type == "cpu" and out.W.dtype == torch.float32
    assert _wga(p, out.W, out.b) >= _wga(p, p["W"], p["b"]) + 0.10


# --- dfr: both protocols ------------------------------------------------------------------

@pytest.mark.parametrize("C", [2, 3])
def test_dfr_paper_protocol_still_available(C, problems):
    from repair.methods import get_method
    m = get_method("dfr")
    p = problems[C]
    base = _wga(p, p["W"], p["b"])
    for with_groups in (True, False):
        out = m(_inputs(p, with_groups), m.make_config({"protocol": "paper", "n_refits": 4}))
        assert out.diagnostics["protocol"] == "paper"
        assert out.diagnostics["chosen"]["C"] in (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
        assert _wga(p, out.W, out.b) >= base + 0.10


def test_dfr_fast_protocol_details(problems):
    from repair.methods import get_method
    from repair.methods.dfr import FAST_C_GRID
    m = get_method("dfr")
    p = problems[2]
    X = p["X"].clone()
    X[:, 5] = 3.0                                   # a constant feature: dropped, weight 0
    inp = RepairInputs(X=X, y=p["y"], W=p["W"], b=p["b"], groups=p["groups"], seed=3)
    out = m(inp, m.make_config({"protocol": "fast"}))
    d = out.diagnostics
    assert d["protocol"] == "fast" and d["chosen"]["C"] in FAST_C_GRID
    assert d["active_features"] == X.shape[1] - 1 and torch.all(out.W[:, 5] == 0)
    assert [r["candidate"]["C"] for r in d["candidates"]] == list(FAST_C_GRID) and d["solver_converged"]
    assert sum(d["fold_sizes"]) == X.shape[0]
    # binary head = [-v/2, v/2]: softmax is the fitted sigmoid
    assert torch.allclose(out.W[0], -out.W[1]) and torch.allclose(out.b[0], -out.b[1])
    # one C: no selection, one fit on all rows
    one = m(inp, m.make_config({"protocol": "fast", "c_grid": [1.0]}))
    assert one.diagnostics["chosen"]["C"] == 1.0 and one.diagnostics["fold_sizes"] == [X.shape[0]]
    # group_cap thins the large groups (seeded): fewer rows, still a repair
    capped = m(_inputs(p, True), m.make_config({"protocol": "fast", "group_cap": 1.2}))
    cd = capped.diagnostics
    assert cd["rows_fitted"] < cd["rows_given"] == p["X"].shape[0] and sum(cd["fold_sizes"]) == cd["rows_fitted"]
    assert _wga(p, capped.W, capped.b) >= _wga(p, p["W"], p["b"]) + 0.10
    assert d["rows_fitted"] == d["rows_given"]        # default cap 4: no group that large here
    with pytest.raises(ValueError, match="protocol"):
        m.make_config({"protocol": "nope"})
    with pytest.raises(ValueError, match="c_grid"):
        m.make_config({"c_grid": [1.0, -1.0]})


def test_mix_runs_the_subsample_protocols_only(problems):
    from repair.methods import get_method
    m = get_method("mix")
    assert m.default_config().protocol == "bagged"
    with pytest.raises(ValueError, match="protocol"):
        m.make_config({"protocol": "fast"})


def test_dfr_auto_protocol_bags_on_unequal_groups(problems):
    """Groups about equal within each class: the fast weighted fit; very unequal (a skewed
    repair set): averaged group-balanced subsamples, which hold up there. Both repair."""
    from repair.methods import get_method
    from repair.selection import IMBALANCE_THRESHOLD, group_imbalance
    m = get_method("dfr")
    p = problems[2]
    g, y = p["groups"], p["y"]
    assert group_imbalance(g, y) < IMBALANCE_THRESHOLD            # 75% agree: ratio 3 within a class
    out = m(_inputs(p, True))
    assert out.diagnostics["protocol"] == "fast" and "auto" in out.diagnostics["protocol_rule"]
    # cut every minority group to a tenth: ratio ~30
    keep = torch.ones_like(y, dtype=torch.bool)
    for k in torch.unique(g).tolist():
        idx = torch.nonzero(g == k).flatten()
        if k % 3 != 0:                       # group id = y*C + a: minority when a != y (C = 2: ids 1, 2)
            keep[idx[idx.numel() // 10:]] = False
    assert group_imbalance(g[keep], y[keep]) >= IMBALANCE_THRESHOLD
    inp = RepairInputs(X=p["X"][keep], y=y[keep], W=p["W"], b=p["b"], groups=g[keep], seed=0)
    out = m(inp)
    assert out.diagnostics["protocol"] == "bagged"
    assert _wga(p, out.W, out.b) >= _wga(p, p["W"], p["b"]) + 0.10


@pytest.mark.parametrize("name", ["dfr", "mix"])
def test_subsample_protocols_score_strengths_as_configured(name, problems, monkeypatch):
    """The bagged protocol (dfr's on a skewed set, mix's always) chooses its strength by the held-out
    worst group's mean probability of the true class; the paper's protocol by worst-group accuracy,
    as the paper does; ``tune_score`` overrides either. What the diagnostics name is what the
    selection was asked for."""
    from repair.methods import dfr as dfr_mod
    from repair.methods import get_method
    m = get_method(name)
    p = problems[2]
    asked = []
    real = dfr_mod.select_and_refit

    def spy(*a, score="accuracy", **k):
        asked.append(score)
        return real(*a, score=score, **k)

    monkeypatch.setattr(dfr_mod, "select_and_refit", spy)
    cases = [({"protocol": "bagged"}, "probability"), ({"protocol": "paper"}, "accuracy"),
             ({"protocol": "bagged", "tune_score": "accuracy"}, "accuracy"),
             ({"protocol": "paper", "tune_score": "probability"}, "probability")]
    for params, want in cases:
        asked.clear()
        out = m(_inputs(p, True), m.make_config(params))
        assert asked == [want] and out.diagnostics["tune_score"] == want, params
    with pytest.raises(ValueError, match="tune_score"):
        m.make_config({"tune_score": "loss"})


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_identical_samples_stay_on_one_side_of_a_methods_own_splits(m, problems, monkeypatch):
    """Every split a head method makes itself (its held-out part, its folds) keeps the samples that
    ``inputs.clusters`` marks identical together: no choice is scored on a copy of a fitted sample."""
    import importlib

    p = problems[2]
    base = 400
    X, y, g = p["X"][:base], p["y"][:base], p["groups"][:base]
    dup = torch.arange(base) % 100                         # 100 samples, each present 4 times
    X, y, g = X[dup], y[dup], g[dup]
    seen = []
    real = Sel.stratified_split

    def checked(strata, fractions, seed, *a, clusters=None, **k):
        parts = real(strata, fractions, seed, *a, clusters=clusters, **k)
        if strata.numel() == base:                         # a split of these rows (not a subsample)
            assert clusters is not None, "a split of the repair rows without the duplicate clusters"
            side = torch.full((base,), -1, dtype=torch.long)
            for j, part in enumerate(parts):
                side[part] = j
            for c in torch.unique(clusters):
                assert torch.unique(side[clusters == c]).numel() == 1, "identical samples on two sides"
            seen.append(len(parts))
        return parts

    monkeypatch.setattr(Sel, "stratified_split", checked)
    mod = importlib.import_module(m.fn.__module__)
    if hasattr(mod, "stratified_split"):
        monkeypatch.setattr(mod, "stratified_split", checked)
    for with_groups in _group_settings(m):
        inputs = RepairInputs(X=X, y=y, W=p["W"], b=p["b"], groups=g if with_groups else None, seed=0,
                              clusters=dup.clone())
        m(inputs)
    assert seen, f"{m.name} made no split of its rows (then this test checks nothing for it)"


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_inputs_no_method_is_defined_on_are_refused_before_it_runs(m, problems):
    """Found by an audit of the library: no rows, negative group ids and a device the machine lacks
    crashed deep inside some methods (or ran); a config given as a dict of settings was an
    AttributeError. Every head method: a one-line BadInput naming it; a dict is read as settings."""
    from repair.errors import BadInput

    p = problems[2]
    base = dict(X=p["X"], y=p["y"], W=p["W"], b=p["b"], groups=p["groups"])
    for change, match in (({"X": p["X"][:0], "y": p["y"][:0], "groups": p["groups"][:0]}, "no rows"),
                          ({"groups": p["groups"] - 1}, "groups must be ids from 0 up"),
                          ({"y": p["y"].float()}, "torch.float32"),
                          ({"device": "bogus"}, "--device")):
        with pytest.raises(BadInput, match=match) as e:
            m(RepairInputs(**{**base, **change}))
        assert str(e.value).startswith(m.name) and "\n" not in str(e.value)
    default = m(RepairInputs(**base))
    as_dict = m(RepairInputs(**base), dataclasses.asdict(m.default_config()))
    assert torch.equal(default.W, as_dict.W) and torch.equal(default.b, as_dict.b)
    with pytest.raises(TypeError, match="config must be"):
        m(RepairInputs(**base), object())


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_embeddings_at_any_float32_scale_and_beyond_it(m, problems):
    """Found by an audit of the library: finite float32 embeddings around 1e19 gave every method an
    all-zero head, silently (the standardisation's squares overflowed float32; from 1e18 some
    features), and finite float64 ones beyond float32's range (1e39) crashed inside the methods
    (_LinAlgError, "returned a head holding NaN"). Scaled embeddings (with the head scaled back) give
    the same predictions; values beyond float32's range, what the methods compute in, are a BadInput
    saying so (checked once, after the cast), for X and for the head."""
    from repair.errors import BadInput

    p = problems[2]
    X, y, gr = p["X"][:600], p["y"][:600], p["groups"][:600]
    base = m(RepairInputs(X=X, y=y, W=p["W"], b=p["b"], groups=gr))
    pred = (X @ base.W.T + base.b).argmax(1)
    for s in (1e18, 1e19):
        Xs = X * s
        out = m(RepairInputs(X=Xs, y=y, W=p["W"] / s, b=p["b"], groups=gr))
        assert bool(out.W.abs().max() > 0), s
        agree = float(((Xs.double() @ out.W.double().T + out.b.double()).argmax(1) == pred).float().mean())
        assert agree >= 0.99, (s, agree)
    for change, name in (({"X": X.double() * 1e39, "W": p["W"].double() / 1e39}, "X"),
                         ({"W": p["W"].double() * 1e39}, "W")):
        kw = {"X": X, "y": y, "W": p["W"], "b": p["b"], "groups": gr, **change}
        with pytest.raises(BadInput, match=f"{m.name}: {name} holds values beyond float32's range"):
            m(RepairInputs(**kw))


def test_an_unknown_method_name_is_a_bad_input_and_a_key_error():
    from repair.errors import BadInput
    from repair.methods import get_method

    for name in ("nope", None):
        with pytest.raises(BadInput, match="unknown repair method") as e:
            get_method(name)
        assert isinstance(e.value, KeyError) and not str(e.value).startswith("'")
