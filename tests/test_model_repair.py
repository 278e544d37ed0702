"""The model-repair seam end to end: the shared fine-tuning loop, the trainable model, and the
built-in ``finetune`` repair run by ``repair fix`` on a tiny timm model."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_images
from repair.errors import BadInput
from repair.modelrepair.finetune import Budget, LoopConfig, train
from repair_cli.main import app

runner = CliRunner()


def run_cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


# ------------------------------------------------------------------ the loop
def test_budget_parsing():
    assert Budget.parse("300steps") == Budget(steps=300)
    assert Budget.parse("3epochs,10min") == Budget(epochs=3.0, seconds=600.0)
    assert Budget.parse("90s").seconds == 90 and Budget.parse(None) is None
    assert Budget(epochs=2).total_steps(10, 5) == 20 and Budget().total_steps(10, 5) == 50
    assert Budget(steps=7, epochs=2).total_steps(10, 5) == 7
    for bad in ("ten", "5parsecs", "-3steps", "0min", "0.5steps", "1.5steps"):
        with pytest.raises(BadInput):
            Budget.parse(bad)


def test_loop_stops_early_and_restores_the_best_state():
    p = torch.nn.Parameter(torch.zeros(1))
    scores = iter([0.1, 0.5, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    values = []

    def step(i, gen):
        return (p - 10.0).pow(2).sum()          # pulls p up every step

    def evaluate():
        values.append(float(p.detach()))
        return next(scores), 0.5

    cfg = LoopConfig(lr=0.5, eval_every=1, patience=3, warmup_fraction=0.0, schedule="constant", clip_norm=0)
    res = train([p], step, evaluate, cfg, steps_per_epoch=1, budget=Budget(steps=10), progress=False)
    assert res.stopped_by == "early stopping" and res.steps == 5 and res.best_step == 2
    assert res.best_score == 0.9 and float(p.detach()) == values[2] != values[-1]
    assert [h["step"] for h in res.history] == [0, 1, 2, 3, 4, 5]


def test_loop_is_deterministic_and_leaves_global_rng_alone():
    def run():
        torch.manual_seed(123)
        lin = torch.nn.Linear(4, 2)
        drop = torch.nn.Dropout(0.5)
        X, y = torch.randn(64, 4), torch.randint(0, 2, (64,))

        def step(i, gen):
            idx = torch.randint(0, 64, (8,), generator=gen)
            return torch.nn.functional.cross_entropy(lin(drop(X[idx])), y[idx])

        train(list(lin.parameters()), step, None, LoopConfig(epochs=2), steps_per_epoch=5, seed=7,
              progress=False)
        return lin.weight.detach().clone(), torch.rand(1)

    (w1, r1), (w2, r2) = run(), run()
    assert torch.equal(w1, w2)
    torch.manual_seed(123)
    torch.nn.Linear(4, 2), torch.randn(64, 4), torch.randint(0, 2, (64,))
    assert torch.equal(r1, torch.rand(1))      # the caller's RNG stream continues as if untouched


def _quadratic():
    p = torch.nn.Parameter(torch.zeros(1))
    return p, (lambda i, gen: (p - 3.0).pow(2).sum())


def test_after_gain_never_stops_early_back_at_the_start():
    """``early_stop: after_gain`` (mixft's default): a held-out score that collapses below the start's
    for longer than the patience does not end the run while the start is still the best evaluation --
    ``anytime`` stops there and keeps the start; once an evaluation has beaten the start, patience
    counts as usual. A run whose evaluations never beat the start runs its schedule and keeps the start."""
    from repair.modelrepair.finetune import LoopConfig, train

    def run(scores, early_stop, steps=8):
        p, step = _quadratic()
        it = iter(scores)
        cfg = LoopConfig(epochs=steps, patience=2, warmup_fraction=0.0, eval_every=1, early_stop=early_stop)
        return train([p], step, lambda: (next(it), 0.5), cfg, steps_per_epoch=1, budget=Budget(),
                     progress=False), float(p.detach())

    collapse = [0.5, 0.1, 0.0, 0.2, 0.7, 0.6, 0.6, 0.6, 0.6]           # the start, then steps 1..8
    res, _ = run(collapse, "anytime")
    assert (res.stopped_by, res.steps, res.best_step) == ("early stopping", 2, 0)
    res, p = run(collapse, "after_gain")
    assert (res.stopped_by, res.steps, res.best_step) == ("early stopping", 6, 4) and p != 0.0
    never = [0.5] + [0.1] * 8
    res, p = run(never, "after_gain")
    assert (res.stopped_by, res.steps, res.best_step, p) == ("epochs", 8, 0, 0.0)    # the start kept


def test_early_stop_auto_waits_for_a_gain_only_under_the_worst_inferred_group():
    """``early_stop: auto`` (the loop's default; clp's, recompose's and finetune's): ``after_gain`` under the
    worst inferred group criterion (a skewed label-free repair set), ``anytime`` under any other criterion or
    none; the rule applied and why are in the loop's diagnostics. The same scripted collapse as above ends
    at step 2 under worst_class and runs on to step 6 under worst_inferred_group."""
    from repair.methods import get_method
    from repair.modelrepair.finetune import (AFTER_GAIN_UNDER, AVERAGE_STRENGTHS_UNDER, LoopConfig, early_stop_for,
                                             settle_strength_for, train)
    from repair.selection import Criterion

    assert LoopConfig().early_stop == "auto" and AFTER_GAIN_UNDER == ("worst_inferred_group",)
    for name, cfg_rule in (("clp", "auto"), ("recompose", "auto"), ("finetune", "auto"), ("mixft", "after_gain")):
        assert get_method(name).default_config().early_stop == cfg_rule, name
    assert early_stop_for("auto", "worst_inferred_group")[0] == "after_gain"
    assert early_stop_for("auto", "worst_class")[0] == "anytime"
    assert early_stop_for("auto", None) == ("anytime", "auto: no criterion given")
    assert early_stop_for("anytime", "worst_inferred_group") == ("anytime", None)
    assert early_stop_for("after_gain", "worst_class") == ("after_gain", None)
    # one rule for both auto settings: the same criteria, the same resolution
    assert AVERAGE_STRENGTHS_UNDER is AFTER_GAIN_UNDER
    for name in ("worst_inferred_group", "worst_class", "worst_group", None):
        few = early_stop_for("auto", name)[0] == "after_gain"
        assert (settle_strength_for("auto", name)[0] == "average") == few, name
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    crit = Criterion.resolve("worst_inferred_group", has_groups=False, y=y, ref_logits=ref)
    assert early_stop_for("auto", crit)[0] == "after_gain"              # a Criterion, not only its name

    def run(criterion):
        p, step = _quadratic()
        it = iter([0.5, 0.1, 0.0, 0.2, 0.7, 0.6, 0.6, 0.6, 0.6])
        cfg = LoopConfig(epochs=8, patience=2, warmup_fraction=0.0, eval_every=1)
        return train([p], step, lambda: (next(it), 0.5), cfg, steps_per_epoch=1, budget=Budget(),
                     progress=False, criterion=criterion)

    res = run("worst_class")
    assert (res.steps, res.best_step) == (2, 0)
    assert res.describe()["early_stop"] == {"applied": "anytime", "why": "auto: the criterion is worst_class"}
    res = run("worst_inferred_group")
    assert (res.steps, res.best_step) == (6, 4) and res.describe()["early_stop"]["applied"] == "after_gain"
    res = run(None)
    assert (res.steps, res.early_stop["applied"]) == (2, "anytime")


def test_loop_says_what_ended_training(monkeypatch):
    import time

    from repair.modelrepair import finetune as ft

    cfg = LoopConfig(epochs=2, patience=0, warmup_fraction=0.0)
    p, step = _quadratic()
    res = train([p], step, None, cfg, steps_per_epoch=3, budget=Budget(), progress=False)
    assert (res.stopped_by, res.steps) == ("epochs", 6)                 # the method's own epochs
    res = train([p], step, None, cfg, steps_per_epoch=3, budget=Budget(steps=4, epochs=5), progress=False)
    assert (res.stopped_by, res.steps) == ("budget:steps", 4)
    res = train([p], step, None, cfg, steps_per_epoch=3, budget=Budget(steps=40, epochs=1), progress=False)
    assert (res.stopped_by, res.steps) == ("budget:epochs", 3)
    assert res.describe()["stopped_by"] == "budget:epochs" and res.describe()["budget"]["default"] is False
    # patience running out at the very last step: the budget ended training, not early stopping
    worse = iter([0.9, 0.5, 0.4, 0.3, 0.2])                          # the start, then steps 1..4
    res = train([p], step, lambda: (next(worse), 0.5), LoopConfig(epochs=2, patience=4, warmup_fraction=0.0,
                                                                  eval_every=1),
                steps_per_epoch=2, budget=Budget(steps=4), progress=False)
    assert (res.stopped_by, res.steps) == ("budget:steps", 4)

    def slow(i, gen):                      # every step outlasts the whole time budget
        time.sleep(0.02)
        return step(i, gen)

    res = train([p], slow, None, cfg, steps_per_epoch=1000, budget=Budget(seconds=0.01), progress=False)
    assert res.stopped_by == "budget:time" and res.steps == 1
    # no budget given: the default time budget bounds the run, and says so
    assert Budget.default() == Budget(seconds=ft.DEFAULT_BUDGET_SECONDS) and ft.DEFAULT_BUDGET_SECONDS == 600
    monkeypatch.setattr(ft, "DEFAULT_BUDGET_SECONDS", 0.01)
    res = train([p], slow, None, cfg, steps_per_epoch=1000, budget=None, progress=False)
    assert res.stopped_by == "budget:time" and res.steps == 1
    assert res.budget == {"seconds": 0.01, "default": True}
    assert set(ft.STOPPED_BY) >= {"budget:time", "budget:steps", "budget:epochs", "early stopping", "epochs"}


def test_heldout_split_keeps_duplicates_together():
    """``ModelRepairInputs.duplicates`` (ids of identical samples) keeps each set of copies on one side
    of a model repair's held-out split (its early-stopping data)."""
    from repair.methods import ModelRepairInputs
    from repair.modelrepair.finetune import Session

    class Encoder:
        def encode(self, items):
            return list(items)

    g = torch.Generator().manual_seed(0)
    dup = torch.arange(80) % 20                                  # 20 samples, each 4 times
    y = dup % 2
    ref = torch.randn(20, 2, generator=g)[dup]
    inp = ModelRepairInputs(model=Encoder(), items=list(range(80)), y=y, ref_logits=ref, duplicates=dup, seed=3)
    s = Session(inp, holdout_fraction=0.25)
    side = torch.zeros(80, dtype=torch.long)
    side[s.held_idx] = 1
    assert 0 < s.held_idx.numel() < 80
    for c in range(20):
        assert torch.unique(side[dup == c]).numel() == 1


# ------------------------------------------------------------------ the seam, end to end
@pytest.fixture(scope="module")
def repair_images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("mrdata") / "val", n_per_class=16, seed=4)


def _recipe(tmp_path, **params):
    p = tmp_path / "tiny-finetune.yaml"
    body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in params.items())
    p.write_text(f"name: tiny-finetune\ncandidates:\n  - method: finetune\n    params: {{{body}}}\n")
    return p


def test_finetune_through_fix_writes_a_loadable_model(timm_folder, repair_images, tmp_path):
    import timm

    from repair.adapters import load_model
    from repair.io import load_safetensors

    recipe = _recipe(tmp_path, epochs=2, batch_size=8, scope="last:1", lr=1e-3, patience=0)
    out = tmp_path / "ft"
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--group-by", "place",
                                "--recipe", recipe, "--out", out, "--seed", "3", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["kind"] == "model" and rep["method"] == "finetune"
    mc = rep["model_change"]
    assert mc["steps"] > 0 and mc["changed_tensors"]
    loop = rep["diagnostics"]["loop"]
    assert loop["steps"] == mc["steps"] and loop["history"]
    assert "early_stop" not in loop                    # patience 0: no early-stopping rule to apply
    # only the head and the last block changed; BatchNorm statistics are bit-identical
    before, _ = load_safetensors(timm_folder / "model.safetensors")
    after, meta = load_safetensors(out / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(mc["changed_tensors"]) and any(k.startswith("fc.") for k in changed)
    assert not any(k.startswith(("conv1", "layer1.")) for k in changed)
    for k in before:
        if "running_" in k or "num_batches_tracked" in k:
            assert torch.equal(before[k], after[k]), k
    prov = json.loads(meta["repair.model_change"])
    assert prov["steps"] == mc["steps"] and json.loads(meta["repair.settings"])["seed"] == 3
    # reloads with plain timm and computes what the repaired adapter computes
    cfg = json.loads((out / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"]).eval()
    timm.models.load_checkpoint(model, str(out / "model.safetensors"), strict=True)
    ours = load_model(out)
    x = ours.collate(sorted(repair_images.rglob("*.png"))[:5])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours.logits_batch(x, torch.device("cpu")), atol=1e-5, rtol=1e-5)
    # the same seed gives the same weights
    out2 = tmp_path / "ft2"
    code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--group-by", "place",
                           "--recipe", recipe, "--out", out2, "--seed", "3", "-q")
    assert code == 0, err
    again, _ = load_safetensors(out2 / "model.safetensors")
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_budget_bounds_the_steps(timm_folder, repair_images, tmp_path):
    recipe = _recipe(tmp_path, epochs=50, batch_size=8, patience=0)
    code, stdout, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", recipe, "--budget",
                                "3steps", "--out", tmp_path / "b", "--json", "-q")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["model_change"]["steps"] == 3 and rep["model_change"]["budget"] == {"steps": 3, "default": False}
    assert rep["model_change"]["stopped_by"] == "budget:steps"
    assert rep["diagnostics"]["loop"]["stopped_by"] == "budget:steps"
    assert rep["diagnostics"]["loop"]["budget"] == {"steps": 3, "default": False}
    code, _, err = run_cli("fix", timm_folder, "--data", repair_images, "--recipe", recipe, "--budget",
                           "lots", "-q")
    assert code == 2 and "--budget" in err


def test_too_small_to_hold_out_is_exit_2(timm_folder, tmp_path):
    tiny = make_images(tmp_path / "tiny", n_per_class=2, seed=1)
    code, _, err = run_cli("fix", timm_folder, "--data", tiny, "--group-by", "place", "--recipe", "finetune", "-q")
    errors = [line for line in err.splitlines() if not line.startswith("warning:")]     # -q keeps warnings
    assert code == 2 and "too small" in err and len(errors) == 1, err            # no held-out part to spare


def test_trainable_scopes_and_frozen_bn(timm_folder):
    from repair.adapters import load_model

    tm = load_model(timm_folder).trainable()
    blocks = tm.blocks()
    assert blocks[-1][0] == "head" and all(n.startswith("fc.") for n in blocks[-1][1])
    assert set(tm.select("head")) == {"fc.weight", "fc.bias"}
    last1 = tm.select("last:1")
    assert set(tm.select("head")) < set(last1) < set(tm.select("all"))
    with pytest.raises(ValueError):
        tm.select("everything")
    bn = [m for m in tm.module.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    stats = bn.running_mean.clone()
    with tm.training(last1, freeze_bn=True) as params:
        assert len(params) == len(last1) and not bn.training
        tm.module(torch.randn(4, 3, 32, 32))
    assert torch.equal(bn.running_mean, stats)
    assert all(p.requires_grad for p in tm.module.parameters())     # restored


# ------------------------------------------------------------------ found by an audit
def test_a_model_repairs_files_never_replace_an_input_and_an_overflowing_budget_is_bad_input(timm_folder, tmp_path):
    """recompose writes its files to <out stem>-artifacts beside a file output: when that was the
    repair data, --force replaced it. And a budget of 1e400 steps was an internal error."""
    import shutil

    from conftest import make_images, run_cli

    out = tmp_path / "d.safetensors"
    data = make_images(tmp_path / "d-artifacts", n_per_class=6)
    before = sorted(p.name for p in data.rglob("*"))
    code, _, err = run_cli("fix", timm_folder / "model.safetensors", "--data", data, "--recipe", "recompose",
                           "--budget", "2steps", "--out", out, "--force", "-q")
    assert code == 2 and "would overwrite the repair data" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in data.rglob("*")) == before and not out.exists()
    code, _, err = run_cli("fix", timm_folder, "--data", data, "--recipe", "mixft", "--budget", "1" + "0" * 400 + "steps",
                           "--out", tmp_path / "o", "-q")
    assert code == 2 and "--budget" in err and "more than any run takes" in err, err
    code, out_json, err = run_cli("fix", timm_folder, "--data", data, "--recipe", "dfr", "--budget", "10steps",
                                  "--out", tmp_path / "h", "--json", "-q")
    assert code == 0 and "the training budget 10steps (--budget, a zoo row's budget) bounds the training of model repairs" in err, err
    shutil.rmtree(tmp_path / "h")


def test_an_existing_artifacts_folder_is_refused_before_any_training(timm_folder, tmp_path):
    """The folder a model repair puts its files in beside a file output was checked only when the
    outputs were written: an existing one (without --force) was refused after the whole training.
    Now it is checked with the other outputs, before any work; a head recipe never writes it."""
    import time

    from conftest import make_images, run_cli

    data = make_images(tmp_path / "d", n_per_class=6)
    out = tmp_path / "o.safetensors"
    (tmp_path / "o-artifacts").mkdir()
    (tmp_path / "o-artifacts" / "notes.txt").write_text("mine")
    code, _, err = run_cli("fix", timm_folder / "model.safetensors", "--data", data, "--recipe", "recompose",
                           "--budget", "50steps", "--out", out, "-q")
    assert code == 2 and "o-artifacts" in err and "--force" in err and err.count("\n") == 1, err
    assert "warning" not in err and not out.exists()        # refused before training: no stopping warnings
    assert (tmp_path / "o-artifacts" / "notes.txt").read_text() == "mine"
    code, _, err = run_cli("fix", timm_folder / "model.safetensors", "--data", data, "--recipe", "dfr",
                           "--out", out, "-q")
    assert code == 0 and out.is_file(), err
    assert [p.name for p in (tmp_path / "o-artifacts").iterdir()] == ["notes.txt"]


def test_a_mask_that_is_a_symlink_out_of_the_masks_folder_is_refused(tmp_path):
    """As a table's images: a --masks entry leading outside the folder is bad input, not read (its
    target was then unprotected, and --force on it deleted the masks the links pointed to)."""
    import numpy as np
    import pytest
    from PIL import Image

    from conftest import make_images
    from repair.errors import BadInput
    from repair.modelrepair.masks import load_masks

    data = make_images(tmp_path / "d", n_per_class=1)
    items = sorted(data.rglob("*.png"))
    cfg = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
           "crop_pct": 1.0, "crop_mode": "center"}
    (tmp_path / "outside").mkdir()
    for it in items:
        (tmp_path / "m" / it.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((36, 36), 255, np.uint8)).save(tmp_path / "m" / it.parent.name / it.name)
    assert load_masks(tmp_path / "m", items, data, cfg).shape == (len(items), 1, 32, 32)
    first = tmp_path / "m" / items[0].parent.name / items[0].name
    first.rename(tmp_path / "outside" / "x.png")
    first.symlink_to(tmp_path / "outside" / "x.png")
    with pytest.raises(BadInput, match="symlink leading outside the --masks folder"):
        load_masks(tmp_path / "m", items, data, cfg)


def test_a_mask_is_found_under_the_common_folder_then_the_items_own_then_by_name(tmp_path):
    """``--data`` and ``--train`` together: a masks folder laid out like the folder both share is read
    first (two images with the same path under their own folders keep their own masks); one laid out
    like an item's own folder is read next; a flat folder by file name last."""
    from repair.modelrepair.masks import mask_file

    data, train, masks = tmp_path / "d" / "val", tmp_path / "d" / "train", tmp_path / "m"
    for f in (data / "a" / "x.jpg", train / "a" / "x.jpg", data / "a" / "y.jpg", data / "b" / "z.jpg"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    for f in (masks / "val" / "a" / "x.png", masks / "train" / "a" / "x.png", masks / "a" / "y.png", masks / "z.png"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    common = tmp_path / "d"
    assert mask_file(masks, data / "a" / "x.jpg", (common, data)) == masks / "val" / "a" / "x.png"
    assert mask_file(masks, train / "a" / "x.jpg", (common, train)) == masks / "train" / "a" / "x.png"
    assert mask_file(masks, data / "a" / "y.jpg", (common, data)) == masks / "a" / "y.png"
    assert mask_file(masks, data / "b" / "z.jpg", (common, data)) == masks / "z.png"
    assert mask_file(masks, data / "a" / "y.jpg", data) == masks / "a" / "y.png"       # one folder, as before
    missing = data / "b" / "w.jpg"
    assert mask_file(masks, missing, (common, data)) == masks / "val" / "b" / "w.jpg"   # named as the first


def test_two_images_that_would_share_one_mask_by_file_name_are_exit_2(tmp_path):
    """A flat masks folder and two images of one name in different folders: neither silently takes
    the other's mask; the error names the masks folder."""
    import numpy as np
    from PIL import Image

    from repair.errors import BadInput
    from repair.modelrepair.masks import load_masks

    data, masks = tmp_path / "data", tmp_path / "masks"
    for sub in ("a", "b"):
        (data / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / sub / "x.png")
    masks.mkdir()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(masks / "x.png")
    cfg = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 1.0, "crop_mode": "center"}
    one = load_masks(masks, [data / "a" / "x.png", data / "a" / "x.png"], data, cfg)     # the same image twice
    assert one.shape == (2, 1, 8, 8) and float(one.min()) == 1.0
    with pytest.raises(BadInput) as e:
        load_masks(masks, [data / "a" / "x.png", data / "b" / "x.png"], data, cfg)
    assert "would both take the mask x.png" in str(e.value) and str(masks) in str(e.value)


def test_an_image_of_train_never_takes_the_mask_of_an_image_of_data(tmp_path):
    """``--data`` and ``--train`` with the same path under each and a masks folder laid out like one of
    them: exit 2 naming the masks folder, not the train image silently masked by the data image's mask;
    laid out like the folder both share, each image has its own."""
    from repair.errors import BadInput
    from repair.modelrepair.masks import mask_files

    data, train, masks = tmp_path / "d" / "val", tmp_path / "d" / "train", tmp_path / "m"
    for f in (data / "a" / "x.jpg", train / "a" / "x.jpg"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    (masks / "a").mkdir(parents=True)
    (masks / "a" / "x.png").write_bytes(b"")
    common = tmp_path / "d"
    sets = [([train / "a" / "x.jpg"], (common, train)), ([data / "a" / "x.jpg"], (common, data))]
    with pytest.raises(BadInput) as e:
        mask_files(masks, sets)
    assert "would both take the mask x.png" in str(e.value) and str(masks) in str(e.value)
    for sub in ("val", "train"):
        (masks / sub / "a").mkdir(parents=True)
        (masks / sub / "a" / "x.png").write_bytes(b"")
    assert mask_files(masks, sets) == [[masks / "train" / "a" / "x.png"], [masks / "val" / "a" / "x.png"]]


def test_a_mask_over_the_pixel_limit_is_exit_2_naming_it(timm_folder, tmp_path):
    """A --masks PNG over PIL's own pixel limit made ``repair fix`` exit 3 (DecompressionBombError) once
    training had started: masks are opened as the data's images are (regular file, --max-pixels)."""
    import numpy as np
    from PIL import Image

    from conftest import make_images, run_cli

    data = make_images(tmp_path / "d", n_per_class=6)
    masks = tmp_path / "masks"
    for it in sorted(data.rglob("*.png")):
        (masks / it.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((36, 36), 255, np.uint8)).save(masks / it.parent.name / it.name)
    bomb = masks / "cat" / "000.png"
    Image.new("1", (14000, 14000), 0).save(bomb)            # 196 Mpixels: over PIL's 2x limit and ours
    out = tmp_path / "out"
    code, _, err = run_cli("fix", timm_folder, "--data", data, "--recipe", "clp", "--budget", "1steps",
                           "--masks", masks, "--out", out, "-q")
    errors = [line for line in err.splitlines() if not line.startswith("warning:")]     # -q keeps warnings
    assert code == 2 and len(errors) == 1, err
    assert str(bomb) in errors[0] and "--max-pixels" in errors[0] and not out.exists()


def test_load_masks_applies_the_datas_pixel_limit(tmp_path):
    """The limit is the data's ``--max-pixels``: a mask (or its image) over it is refused by name."""
    import numpy as np
    from PIL import Image

    from conftest import make_images
    from repair.modelrepair.masks import load_masks

    data = make_images(tmp_path / "d", n_per_class=1)
    items = sorted(data.rglob("*.png"))
    cfg = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
           "crop_pct": 1.0, "crop_mode": "center"}
    for it in items:
        (tmp_path / "m" / it.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((36, 36), 255, np.uint8)).save(tmp_path / "m" / it.parent.name / it.name)
    assert load_masks(tmp_path / "m", items, data, cfg, max_pixels=36 * 36).shape == (len(items), 1, 32, 32)
    with pytest.raises(BadInput, match="more than the limit of 1,000") as e:
        load_masks(tmp_path / "m", items, data, cfg, max_pixels=1000)
    assert str(items[0]) in str(e.value)                     # the image first: the data's own rule
    bad = tmp_path / "m" / items[0].parent.name / items[0].name
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(BadInput, match="or a damaged one") as e:
        load_masks(tmp_path / "m", items, data, cfg)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("keep, evaluated, how", [("best", True, "loss"), ("last", True, "loss"), ("tail", True, "loss"),
                                                 ("best", False, "loss"), ("best", True, "weights"),
                                                 ("tail", True, "weights")])
def test_a_diverging_loop_stops_and_goes_back_to_a_finite_state(keep, evaluated, how):
    """A learning rate too high: the loss, or the weights, no longer finite. It ran on to a Cholesky
    failure in the head refit or a NaN network (exit 3); now the loop stops ("diverged") and the
    weights go back to the best evaluated state (keep best) or the start -- never a NaN state kept,
    scored or averaged."""
    p = torch.nn.Parameter(torch.ones(3))
    scores = iter([0.2, 0.6, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0])
    seen = []

    def step(i, gen):
        if i >= 3 and how == "weights":
            with torch.no_grad():
                p.fill_(float("nan"))
        loss = (p - 5.0).pow(2).sum()
        return loss * float("inf") if (i >= 3 and how == "loss") else loss

    def evaluate():
        seen.append(p.detach().clone())
        return next(scores), 0.5

    cfg = LoopConfig(lr=0.1, eval_every=1, patience=0, warmup_fraction=0.0, schedule="constant", clip_norm=0,
                     keep=keep)
    res = train([p], step, evaluate if evaluated else None, cfg, steps_per_epoch=1, budget=Budget(steps=8),
                progress=False)
    assert res.stopped_by == "diverged" and res.steps < 8
    assert bool(torch.isfinite(p).all()) and all(bool(torch.isfinite(v).all()) for v in seen)
    if evaluated:                               # the best evaluated state, whatever keep says
        assert res.best_step == 1 and torch.equal(p.detach(), seen[1])
    else:
        assert torch.equal(p.detach(), torch.ones(3)) and res.best_step == 0


def test_a_diverged_member_is_said_for_the_soup_and_a_non_finite_start_is_refused():
    """A soup's (or cross-fitting's) result said what stopped its last member only: a member that
    diverged went unsaid (no warning). And weights not finite before any step leave nothing to go back
    to: a clear error, not a TypeError."""
    from repair.modelrepair.finetune import _members_result

    def run(stop):
        return type("R", (), {"steps": 3, "best_step": 1, "best_score": 0.5, "stopped_by": stop, "history": [],
                              "averaged": None, "early_stop": None})()

    res = _members_result([run("diverged"), run("epochs")], None, 1.0, {})
    assert res.stopped_by == "diverged" and res.budget["member_stopped_by"] == ["diverged", "epochs"]
    p = torch.nn.Parameter(torch.tensor([float("nan"), 1.0]))
    cfg = LoopConfig(lr=0.1, eval_every=1, patience=0, warmup_fraction=0.0, schedule="constant", clip_norm=0)
    with pytest.raises(BadInput, match="not finite before any training step"):
        train([p], lambda i, g: (p - 1).pow(2).sum(), lambda: (0.5, 0.5), cfg, steps_per_epoch=1,
              budget=Budget(steps=3), progress=False)


def test_finetune_refuses_stop_head_refit(timm_folder, repair_images, tmp_path):
    """finetune accepted `stop_head: refit`, wrote it into the provenance and scored every evaluation
    with its own head all the same; honoured, it would choose a state by a refitted head it never
    ships (finetune does not settle). Refused, naming the setting."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ncandidates:\n  - method: finetune\n    params: {stop_head: refit}\n")
    res = CliRunner().invoke(app, ["fix", str(timm_folder), "--data", str(repair_images), "--recipe", str(recipe),
                                   "--budget", "3steps", "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 2 and "stop_head" in res.output and "does not settle" in res.output, res.output
    assert not (tmp_path / "o").exists()
