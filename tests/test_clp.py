"""CLP (causal logit perturbation) on a tiny planted-shortcut image task built here: a horizontal or
vertical bar (the class) on a green or blue background (the shortcut: 95% aligned with the class
in the ERM training data, balanced in the repair and test sets), a narrow timm ResNet trained by
ERM in seconds, and the bars' true masks."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from repair import threads
from repair_cli.main import app

runner = CliRunner()
SIZE = 16
CLASSES = ("horizontal", "vertical")
ABLATION = """name: clp-ablation
candidates:
  - method: clp
    params: {meta: false, saliency_weight: 0}
"""


def _draw(rng, y: int, place: int):
    img = np.array([[0.25, 0.55, 0.20], [0.20, 0.30, 0.70]])[place] + rng.normal(0, 0.03, 3)
    img = img[None, None, :] + rng.normal(0, 0.04, (SIZE, SIZE, 3))
    r, c = rng.integers(1, SIZE - 7, 2)
    h, w = (2, 6) if y == 0 else (6, 2)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[r:r + h, c:c + w] = True
    img[mask] = rng.uniform(0.55, 1.0, 3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def _split(root: Path, n: int, align, seed: int, masks: Path = None):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    place = np.where(rng.random(n) < align, y, 1 - y) if align is not None else (np.arange(n) // 2) % 2
    rows, xs = [], []
    for i in range(n):
        img, m = _draw(rng, int(y[i]), int(place[i]))
        rel = f"{CLASSES[y[i]]}/{i:04d}.png"
        (root / CLASSES[y[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
        if masks is not None:
            (masks / CLASSES[y[i]]).mkdir(parents=True, exist_ok=True)
            Image.fromarray((m * 255).astype(np.uint8)).save(masks / rel)
        rows.append({"img_filename": rel, "y": CLASSES[y[i]], "place": ["green", "blue"][place[i]]})
        xs.append(img)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(rows)
    return np.stack(xs), y, place


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """ERM model folder, repair (val) and test folders, the repair set's masks."""
    import timm
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("clp")
    xtr, ytr, _ = _split(root / "train", 400, 0.95, seed=1)
    _split(root / "val", 96, None, seed=2, masks=root / "masks")
    _split(root / "test", 200, None, seed=3)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2, channels=[8, 16, 32, 64])
    x = (torch.from_numpy(xtr).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    y = torch.from_numpy(ytr).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    with threads.limited(1):
        for _ in range(4):
            for idx in torch.randperm(len(y), generator=g).split(32):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    mdir = root / "model"
    save_for_hf(model, str(mdir), model_config={"label_names": list(CLASSES)}, safe_serialization=True,
                model_args={"channels": [8, 16, 32, 64]})
    cfg = json.loads((mdir / "config.json").read_text())
    cfg["pretrained_cfg"].update({"input_size": [3, SIZE, SIZE], "crop_pct": 1.0, "crop_mode": "center",
                                  "mean": [0.5] * 3, "std": [0.25] * 3})
    cfg.get("model_args", {}).pop("num_classes", None)
    (mdir / "config.json").write_text(json.dumps(cfg))
    return {"model": mdir, "val": root / "val", "test": root / "test", "masks": root / "masks", "root": root}


@pytest.fixture(autouse=True)
def _one_thread():
    with threads.limited(1):     # tiny models: one thread is faster, and far faster on a loaded machine
        yield


def _inputs(task, budget=None, seed=0, masks=True):
    from repair.adapters import load_model
    from repair.data import DataOptions, encode, load_data
    from repair.modelrepair.finetune import Budget
    from repair.methods import ModelRepairInputs

    ad = load_model(task["model"])
    tm = ad.trainable()
    d = load_data(task["val"], DataOptions())
    e = encode(d, ad.class_names)
    x = tm.encode(d.items)
    ref = tm.predict(x, torch.arange(len(d.items)), torch.device("cpu"))
    res = {"data_root": Path(d.source)}
    if masks:
        res["masks"] = task["masks"]
    return ModelRepairInputs(model=tm, items=list(d.items), y=e.y, ref_logits=ref, budget=Budget.parse(budget),
                             seed=seed, progress=False, class_names=list(ad.class_names), resources=res)


def _test_wga(tm, task) -> float:
    from repair.data import DataOptions, encode, load_data

    d = load_data(task["test"], DataOptions(group_by="place"))
    e = encode(d, tm.adapter.class_names, "place")
    pred = tm.predict(tm.encode(d.items), torch.arange(len(d.items)), torch.device("cpu")).argmax(1)
    ok = (pred == e.y).float()
    return min(float(ok[e.groups == k].mean()) for k in torch.unique(e.groups))


def _config(**kw):
    from repair.methods import get_method

    return get_method("clp").make_config({"batch_size": 16, "meta_batch_size": 16, "hidden_size": 16, **kw})


def test_perturbation_network_learns_and_persists(task):
    from repair.methods.clp import ClpRun

    inputs = _inputs(task)
    run = ClpRun(inputs, _config())
    g = run.g
    gen = torch.Generator().manual_seed(0)
    snaps = [[p.detach().clone() for p in g.parameters()]]
    with inputs.model.training(run.names) as params:
        for i in range(3):
            out = run.step(i, gen)
            out["loss"].backward()
            for p in params:
                p.grad = None
            snaps.append([p.detach().clone() for p in run.g.parameters()])
    assert run.g is g and run.meta_steps == 3                    # one network for the whole run
    assert run.g_opt.state[next(iter(g.parameters()))]["step"] == 3
    for a, b in zip(snaps, snaps[1:]):
        assert any(not torch.equal(u, v) for u, v in zip(a, b))  # every meta step moves g
    assert "meta" in out and out["delta"] > 0


def test_virtual_step_leaves_the_real_weights_untouched(task):
    from repair.methods.clp import ClpRun, characteristics

    inputs = _inputs(task)
    tm = inputs.model
    run = ClpRun(inputs, _config())
    before = tm.state()
    gen = torch.Generator().manual_seed(1)
    with tm.training(run.names):
        x, y, _ = run._batch(run.train_pool, 16, False, gen)
        feat, z = tm.features_and_logits(x)
        c = characteristics(feat, z, y, tm.head.weight, run.prior, *run.stats.means())
        virtual = run.virtual_step(z, c, y)
        meta = run.meta_loss(virtual, gen)
        grads = torch.autograd.grad(meta, list(run.g.parameters()))
    after = tm.state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(virtual[n], p) for n, p in run.params().items())   # the virtual step moved
    assert all(torch.isfinite(gr).all() for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)


def test_saliency_term_is_zero_when_the_mask_covers_the_image():
    from repair.methods.clp import saliency_share

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 3))
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    z = net(x)
    assert float(saliency_share(z, y, x, torch.ones(5, 1, 8, 8)).detach()) == 0.0
    half = torch.zeros(5, 1, 8, 8)
    half[..., :4] = 1
    s = saliency_share(z, y, x, half)
    assert 0 < float(s.detach()) < 1
    s.backward()                                               # differentiable in the model's weights
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_clp_raises_held_out_worst_group_accuracy(task):
    from repair.methods import get_method

    inputs = _inputs(task, budget="40steps")
    tm = inputs.model
    erm = _test_wga(tm, task)
    out = get_method("clp")(inputs, _config(saliency_weight=1.0, eval_every=10))
    repaired = _test_wga(tm, task)
    assert repaired >= erm + 0.3, (erm, repaired)
    d = out.diagnostics
    assert d["meta_steps"] == out.steps == 40 and d["masks"]["source"].startswith("given")
    assert "both the training and the meta data" in d["data"]
    assert {"meta", "delta", "sal"} <= set(d["loop"]["history"][-1])
    # settled (the default): every interpolated body with its refitted head scored on the held-out
    # part (alpha 0, the original body, too); a moved body counts only with an edge of
    # required_gain over the original body; the chosen one is the best of those, and the model is
    # left at it (the figure above is the settled model's)
    st = d["settle"]
    assert st["head"] == "refit" and [c["alpha"] for c in st["candidates"]] == [1.0, 0.5, 0.0]
    assert [(c["alpha"], c["head"]) for c in st["candidates"]][-1] == (0.0, "refit")
    base, need = st["candidates"][-1]["heldout_score"], st["required_gain"]
    assert need >= 0.01
    eligible = [c["heldout_score"] for c in st["candidates"][:-1] if c["heldout_score"] >= base + need - 1e-12]
    assert st["heldout_score"] == max(eligible + [base])


def test_deterministic_under_a_seed(task):
    from repair.modelrepair.finetune import Budget, train
    from repair.methods.clp import ClpRun

    runs = []
    for _ in range(2):
        inputs = _inputs(task, seed=5)
        tm = inputs.model
        before = tm.state()
        cfg = _config()
        run = ClpRun(inputs, cfg)
        with tm.training(run.names) as params:
            train(params, run.step, None, cfg, steps_per_epoch=run.steps_per_epoch, budget=Budget(steps=4), seed=5,
                  progress=False)
        runs.append((tm.changed(before), [p.detach().clone() for p in run.g.parameters()]))
    (t1, g1), (t2, g2) = runs
    assert t1 and t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_ablation_is_plain_fine_tuning(tmp_path):
    from repair.recipes import load_recipe

    path = tmp_path / "clp-ablation.yaml"
    path.write_text(ABLATION)
    cand = load_recipe(str(path)).candidates[0]
    cfg = cand.config()
    assert cand.method == "clp" and cfg.meta is False and cfg.saliency_weight == 0


def _fix(task, masks, out, *extra):
    res = runner.invoke(app, [str(a) for a in ("fix", task["model"], "--data", task["val"], "--recipe", "clp",
                                               "--masks", masks, "--eval", task["test"], "--budget", "2steps",
                                               "--out", out, "-q", *extra)])
    return res.exit_code, res.stderr


def test_bad_masks_are_exit_2_naming_the_file_before_any_work(task, tmp_path):
    """A mask of the wrong size or a missing one: exit 2 naming it when the command starts (checked
    against the repair set as it is read), not once the embeddings are computed and clp reads them."""
    import shutil

    from PIL import Image

    cache = tmp_path / "cache"
    wrong = tmp_path / "wrong"
    shutil.copytree(task["masks"], wrong)
    victim = sorted((wrong / "vertical").glob("*.png"))[3]
    Image.new("L", (SIZE + 4, SIZE)).save(victim)
    code, err = _fix(task, wrong, tmp_path / "o1", "--cache-dir", cache)
    assert code == 2 and victim.name in err and "20x16" in err and err.count("\n") == 1, err

    missing = tmp_path / "missing"
    shutil.copytree(task["masks"], missing)
    gone = sorted((missing / "horizontal").glob("*.png"))[5]
    gone.unlink()
    code, err = _fix(task, missing, tmp_path / "o2", "--cache-dir", cache)
    assert code == 2 and "no mask" in err and gone.name in err and err.count("\n") == 1, err
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))          # no embeddings computed
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_text_models_are_refused(bert_folder, text_data, tmp_path):
    res = runner.invoke(app, ["fix", str(bert_folder), "--data", str(text_data), "--recipe", "clp", "-q",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "clp needs an image model" in res.stderr


def test_the_model_is_on_the_session_device_before_grad_cam_masks(task, monkeypatch):
    """On CUDA, clp's Grad-CAM masks (no --masks) ran the model while it was still on the CPU ("Input type
    (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) should be the same", seen on the lent
    GPU): the model must be moved to the session's device before any mask is computed. The CPU cannot
    show a device mismatch, so the spy records whether the move came first."""
    import repair.modelrepair.masks as M
    from repair.methods.clp import ClpRun

    inputs = _inputs(task, masks=False)
    module = inputs.model.module
    moved, seen = [], []
    real_to, real_masks = module.to, M.object_masks

    def to(*a, **k):
        moved.append(a[0] if a else k.get("device"))
        return real_to(*a, **k)

    def spy(*a, **k):
        seen.append(list(moved))
        return real_masks(*a, **k)

    monkeypatch.setattr(module, "to", to)
    monkeypatch.setattr(M, "object_masks", spy)
    run = ClpRun(inputs, _config(masks="attribution"))
    assert seen and all(s and torch.device(s[-1]) == run.dev for s in seen), (seen, run.dev)
