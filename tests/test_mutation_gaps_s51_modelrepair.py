"""Tests that kill mutants a session-51 audit of the model-repair building blocks found surviving
(``repair/modelrepair/``: ``pixels.py``, ``generation.py``, ``trainable.py``, ``attribution.py``,
``masks.py``): the model's mean and std and the [0, 1] clamp of :func:`to_pixels`; the fill leaving known
pixels alone and the composite's harmonisation; image and text mixing (interpolation direction, the
augmentation of mixed images, the partner's and the sample's padding and the attention-mask union at
the token embeddings); eval mode and its restoration in ``predict``, ``training`` and Grad-CAM; the
augmentation's flips and crops; ``names:`` scopes; BatchNorm running statistics; the mask sources'
geometry, ``--max-pixels``, the auto order, the segmenter's prompts, batches and fallback, the contrast
prior's opening and its robust border colour; prompts and PNG rounding."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import make_timm_folder
from repair import threads

CPU = torch.device("cpu")
MEAN = [0.4, 0.5, 0.6]            # mean != std, and per channel: a swap or a transposition shows
STD = [0.2, 0.25, 0.3]


@pytest.fixture(autouse=True)
def _one_thread():
    with threads.limited(1):      # tiny models: one thread, deterministic and fast on a loaded machine
        yield


# ------------------------------------------------------------------ helpers
def _png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _noisy(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.2 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def timm_mr(tmp_path_factory):
    """A tiny timm ResNet (BatchNorm) on 16 x 16 inputs with per-channel mean != std, and noisy images."""
    base = tmp_path_factory.mktemp("mr_timm")
    folder = make_timm_folder(base / "model", size=16, seed=1)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pretrained_cfg"].update({"mean": MEAN, "std": STD})
    (folder / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(3)
    items = [_png(base / "data" / f"{i:02d}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
             for i in range(8)]
    return {"model": folder, "items": items, "base": base}


def _tm(timm_mr):
    from repair.adapters import load_model

    return load_model(timm_mr["model"]).trainable()


def _bn_buffers(module):
    return [b.clone() for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


# ------------------------------------------------------------------ pixels (P1, P2)
def test_to_pixels_undoes_the_models_own_mean_and_std(timm_mr):
    """P1: the mean read from ``data_config["std"]`` went unnoticed (every fixture had mean = std)."""
    from PIL import Image

    from repair.modelrepair.pixels import to_model, to_pixels

    tm = _tm(timm_mr)
    assert list(tm.adapter.data_config["mean"]) == MEAN and list(tm.adapter.data_config["std"]) == STD
    x = tm.encode(timm_mr["items"][:3])
    want = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255)
                        .permute(2, 0, 1) for p in timm_mr["items"][:3]])
    torch.testing.assert_close(to_pixels(x, tm.adapter.data_config), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(to_model(want, tm.adapter.data_config), x, atol=1e-4, rtol=0)


def test_to_pixels_clamps_to_the_unit_range():
    """P2: ``.clamp(0, 1)`` dropped."""
    from repair.modelrepair.pixels import to_pixels

    cfg = {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert float(to_pixels(torch.full((1, 3, 2, 2), 10.0), cfg).max()) == 1.0
    assert float(to_pixels(torch.full((1, 3, 2, 2), -10.0), cfg).min()) == 0.0


# ------------------------------------------------------------------ generation (G1, G3)
def test_fill_holes_leaves_every_known_pixel_as_it_was():
    """G1: ``torch.where(hole > 0, smooth, pix)`` -> ``smooth`` blurred the whole image."""
    from repair.modelrepair.generation import fill_holes

    pix = _noisy(2, 16)
    hole = torch.zeros(2, 1, 16, 16)
    hole[..., 5:11, 4:10] = 1
    out = fill_holes(pix, hole)
    known = (hole < 0.5).expand_as(pix)
    assert torch.equal(out[known], pix[known])
    assert not torch.equal(out[~known], pix[~known])          # the hole itself was filled


def test_composite_harmonisation_shifts_the_object_by_the_backgrounds_difference():
    """G3: the shift's sign, the source background mean taken from the target, and the outside mean's
    weights inverted all survived (the only test ran harmonize=0). Constant images: object colour c on
    a source background a, pasted on a target background b with harmonize=1: the object becomes
    c + (b - a), the background stays b."""
    from repair.modelrepair.generation import CompositeGenerator
    from repair.modelrepair.pixels import _erode

    c = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    a = torch.tensor([0.3, 0.2, 0.35]).view(1, 3, 1, 1)
    b = torch.tensor([0.6, 0.5, 0.25]).view(1, 3, 1, 1)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 5:11] = 1
    src = a.expand(1, 3, 16, 16) * (1 - mask) + c * mask
    bg = b.expand(1, 3, 16, 16).clone()
    out, om = CompositeGenerator(harmonize=1.0).generate(src, mask, bg, torch.zeros(1, 1, 16, 16), ["x"])
    assert torch.equal(om, mask)
    inner = _erode(mask, 1).bool().expand(-1, 3, -1, -1)
    want = (c + (b - a)).expand(1, 3, 16, 16)
    torch.testing.assert_close(out[inner], want[inner], atol=1e-5, rtol=0)
    outside = (mask < 0.5).expand(-1, 3, -1, -1)
    torch.testing.assert_close(out[outside], bg[outside], atol=1e-6, rtol=0)
    # half the shift at harmonize 0.5
    out, _ = CompositeGenerator(harmonize=0.5).generate(src, mask, bg, torch.zeros(1, 1, 16, 16), ["x"])
    torch.testing.assert_close(out[inner], (c + 0.5 * (b - a)).expand(1, 3, 16, 16)[inner], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ image mixing (T3, T4)
def test_image_mixing_weights_the_partner_by_lambda(timm_mr):
    """T3: ``x + w*(s - x)`` -> ``s + w*(x - s)``: lam = 0 is the sample itself, lam = 1 the partner."""
    tm = _tm(timm_mr)
    enc = tm.encode(timm_mr["items"])
    idx, partner = torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7])
    tm.module.eval()
    with torch.no_grad():
        plain = tm.logits(tm.batch(enc, idx, CPU))
        other = tm.logits(tm.batch(enc, partner, CPU))
        zero = tm.mixed_logits(enc, idx, partner, torch.zeros(3), CPU)
        one = tm.mixed_logits(enc, idx, partner, torch.ones(3), CPU)
        part = tm.mixed_logits(enc, idx, partner, torch.tensor([0.0, 1.0, 0.0]), CPU)
    assert not torch.allclose(plain, other, atol=1e-3)
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, other, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(part[[0, 2]], plain[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part[1], other[1], atol=1e-4, rtol=1e-4)


def test_mixed_images_are_augmented_with_the_generator(timm_mr):
    """T4: the augmentation of mixed images skipped: lam = 0 with ``flip`` and a seeded generator is the
    model on ``augment(x, "flip", Generator(seed))`` (the sample takes the generator's first draws)."""
    tm = _tm(timm_mr)
    enc = tm.encode(timm_mr["items"])
    idx, partner = torch.arange(8), torch.arange(8).flip(0)
    tm.module.eval()
    seed = 5
    aug = tm.augment(enc[idx], "flip", torch.Generator().manual_seed(seed))
    flipped = [i for i in range(8) if not torch.equal(aug[i], enc[i])]
    assert 0 < len(flipped) < 8                                  # the seed flips some, not all
    with torch.no_grad():
        want = tm.logits(aug)
        got = tm.mixed_logits(enc, idx, partner, torch.zeros(8), CPU, augment="flip",
                              generator=torch.Generator().manual_seed(seed))
        plain = tm.logits(enc[idx])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[flipped], plain[flipped], atol=1e-4)


# ------------------------------------------------------------------ text mixing (T5)
SHORT, LONG = "good movie", "the plot was boring and the movie was not fun at all never"
SHORT2, LONG2 = "bad plot", "a great movie the plot is fun never boring"


def _bert_tm(bert_folder):
    from repair.adapters import load_model

    tm = load_model(bert_folder).trainable()
    tm.module.eval()
    return tm


def test_text_mixing_at_the_embeddings_with_lambda_one_is_the_partner(bert_folder):
    """T5 (a): at point 0 the attention mask is the union of both: a short sample mixed with a long
    partner at lam = 1 is the partner itself (the sample's mask alone would hide the partner's tail)."""
    tm = _bert_tm(bert_folder)
    enc = tm.encode([SHORT, LONG])
    with torch.no_grad():
        other = tm.logits(tm.batch(enc, torch.tensor([1]), CPU))
        mixed = tm.mixed_logits(enc, torch.tensor([0]), torch.tensor([1]), torch.ones(1), CPU, point=0)
        plain = tm.logits(tm.batch(enc, torch.tensor([0]), CPU))
    assert not torch.allclose(other, plain, atol=1e-3)
    torch.testing.assert_close(mixed, other, atol=1e-5, rtol=1e-4)


def test_text_mixing_at_the_embeddings_zeroes_both_paddings(bert_folder):
    """T5 (b): the input of encoder layer 0 is ``(1 - lam) * sample + lam * partner`` with each one's
    padding zeroed: where the partner is padding it holds ``(1 - lam)`` x the sample's embeddings, where
    the sample is padding ``lam`` x the partner's."""
    tm = _bert_tm(bert_folder)
    texts = [SHORT, LONG2, LONG, SHORT2]          # row 0: short sample, long partner; row 1: the reverse
    enc = tm.encode(texts)
    idx, partner = torch.tensor([0, 1]), torch.tensor([2, 3])
    lam = torch.tensor([0.3, 0.6])
    emb, layer0 = tm.mix_points()[0], tm.mix_points()[1]
    both = tm.adapter.collate(texts)
    xb = {k: v[:2] for k, v in both.items()}
    sb = {k: v[2:] for k, v in both.items()}
    mx, ms = xb["attention_mask"].float()[..., None], sb["attention_mask"].float()[..., None]
    assert bool((mx[0] == 0).any()) and bool((ms[1] == 0).any())       # each side has padding

    box = {}
    h1 = emb.register_forward_hook(lambda m, a, out: box.__setitem__("emb", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        tm.logits(xb)
        hx = box["emb"].clone()
        tm.logits(sb)
        hs = box["emb"].clone()
    h1.remove()

    def pre(m, args, kwargs):
        box["in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    h2 = layer0.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            tm.mixed_logits(enc, idx, partner, lam, CPU, point=0)
    finally:
        h2.remove()
    w = lam.view(-1, 1, 1)
    want = (1 - w) * hx * mx + w * hs * ms
    torch.testing.assert_close(box["in"], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ modes (T2, A4, A2)
def test_predict_runs_in_eval_mode_and_restores_every_mode(timm_mr):
    """T2: ``with self._eval_mode()`` -> ``if True``: a model left in train mode predicted with batch
    statistics and moved its BatchNorm running statistics."""
    tm = _tm(timm_mr)
    enc = tm.encode(timm_mr["items"])
    idx = torch.arange(8)
    tm.module.eval()
    with torch.no_grad():
        want = tm.logits(enc)
    tm.module.train()
    bn = _bn_buffers(tm.module)
    got = tm.predict(enc, idx, CPU, batch_size=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(bn, _bn_buffers(tm.module)))
    assert all(m.training for m in tm.module.modules())
    emb = tm.embed(enc, idx, CPU, batch_size=3)
    assert emb.shape == (8, tm.head.in_features)
    assert all(torch.equal(a, b) for a, b in zip(bn, _bn_buffers(tm.module)))
    assert all(m.training for m in tm.module.modules())


def test_training_block_restores_eval_mode(timm_mr):
    """T2: ``training()`` not restoring the modes: after the block the model is in eval mode again, with
    its ``requires_grad`` flags back."""
    tm = _tm(timm_mr)
    tm.module.eval()
    req = {n: p.requires_grad for n, p in tm.module.named_parameters()}
    head = tm.select("head")
    with tm.training(head) as params:
        assert tm.module.training and len(params) == len(head)
        assert not any(m.training for m in tm.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        assert {n for n, p in tm.module.named_parameters() if p.requires_grad} == set(head)
    assert not any(m.training for m in tm.module.modules())
    assert {n: p.requires_grad for n, p in tm.module.named_parameters()} == req
    with tm.training(head, freeze_bn=False):
        assert all(m.training for m in tm.module.modules())
    assert not any(m.training for m in tm.module.modules())


def test_grad_cam_runs_in_eval_mode_and_restores_train_mode(timm_mr):
    """A4: ``tm.module.eval()`` removed (BatchNorm updated its running statistics from the Grad-CAM
    batch), or the modes not restored afterwards."""
    from repair.modelrepair.attribution import attribution_maps

    tm = _tm(timm_mr)
    x = tm.encode(timm_mr["items"][:4])
    y = torch.tensor([0, 1, 2, 0])
    tm.module.eval()
    want = attribution_maps(tm, x, y, CPU)
    tm.module.train()
    bn = _bn_buffers(tm.module)
    got = attribution_maps(tm, x, y, CPU, batch=3)
    assert all(m.training for m in tm.module.modules())
    assert all(torch.equal(a, b) for a, b in zip(bn, _bn_buffers(tm.module)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_grad_cam_works_on_a_frozen_model_and_leaves_no_gradients(timm_mr):
    """A2: ``x.detach().requires_grad_(True)`` -> ``x.detach()``: with every parameter frozen no feature
    map needs a gradient unless the input does."""
    from repair.modelrepair.attribution import attribution_maps

    tm = _tm(timm_mr)
    x = tm.encode(timm_mr["items"][:3])
    y = torch.tensor([0, 1, 2])
    want = attribution_maps(tm, x, y, CPU)
    tm.module.requires_grad_(False)
    cam = attribution_maps(tm, x, y, CPU)
    assert cam.shape == (3, 1, 16, 16) and float(cam.max()) == 1.0
    torch.testing.assert_close(cam, want, atol=1e-6, rtol=0)
    assert all(p.grad is None for p in tm.module.parameters())
    assert not x.requires_grad


# ------------------------------------------------------------------ augmentation (T1)
def test_flip_augmentation_flips_horizontally_about_half_the_images():
    """T1: flip probability 0, a vertical flip, or no flip: each output is x or x.flip(3), some of each."""
    from repair.modelrepair.trainable import TrainableModel

    x = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).view(64, 3, 8, 8)
    out = TrainableModel.augment(x, "flip", torch.Generator().manual_seed(0))
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    hflip = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]     # per image: (3,H,W), width is dim 2
    assert all(s or f for s, f in zip(same, hflip))
    assert 10 < sum(hflip) < 54
    again = TrainableModel.augment(x, "flip", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_crop_augmentation_translates_within_the_replicated_border():
    """T1: ``crop`` returning x unchanged, or the column offset taken from the row offset: each output is
    a window of the replicate-padded image, not all the same, some with different row and column shifts."""
    import torch.nn.functional as F

    from repair.modelrepair.trainable import TrainableModel

    n, h, w = 64, 16, 24
    x = torch.arange(n * 3 * h * w, dtype=torch.float32).view(n, 3, h, w)
    out = TrainableModel.augment(x, "crop", torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    ph, pw = h // 8, w // 8
    padded = F.pad(x, (pw, pw, ph, ph), mode="replicate")
    shifts = []
    for i in range(n):
        found = [(dy, dx) for dy in range(2 * ph + 1) for dx in range(2 * pw + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])]
        assert len(found) == 1, i
        shifts.append(found[0])
    assert len(set(shifts)) > 5
    assert sum(dy != dx for dy, dx in shifts) > n // 4
    assert any(dx > 2 * ph for _, dx in shifts)                         # the column range is the wider one
    assert torch.equal(out, TrainableModel.augment(x, "crop", torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------ scopes and buffers (T6, T7)
def test_names_scope_searches_anywhere_in_the_name(timm_mr):
    """T6: ``rx.search`` -> ``rx.match``: ``names:bias$`` matched nothing (every name starts with a module)."""
    tm = _tm(timm_mr)
    got = tm.select("names:bias$")
    want = [n for n, _ in tm.module.named_parameters() if n.endswith("bias")]
    assert got == want and "fc.bias" in got


def test_running_stats_are_every_batchnorm_buffer_unless_frozen(timm_mr):
    """T7: ``running_stats`` always ``[]``."""
    tm = _tm(timm_mr)
    bns = [m for m in tm.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and tm.running_stats(True) == []
    got = tm.running_stats(False)
    assert len(got) == 3 * len(bns)
    want = [b for m in bns for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
    assert all(a is b for a, b in zip(got, want))


# ------------------------------------------------------------------ mask sources (M2, M1, M8, M7, M6, M5)
CONFIG16 = {"input_size": [3, 16, 16], "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear",
            "mean": [0.5] * 3, "std": [0.5] * 3}


def _given_set(base: Path, side: int, n: int = 2):
    """``n`` grey images of ``side`` x ``side`` under base/data/a and their masks under base/masks/a."""
    rng = np.random.default_rng(side)
    items = []
    for i in range(n):
        img = np.full((side, side, 3), 60, np.uint8)
        img[2:side // 2, 3:side // 2 + 2] = 230
        items.append(_png(base / "data" / "a" / f"{i}.png", img))
        m = np.zeros((side, side), np.uint8)
        m[rng.integers(0, side // 2):side - 2, 4:side - 3] = 255
        _png(base / "masks" / "a" / f"{i}.png", m)
    return items


def test_masks_are_read_under_the_datas_own_pixel_limit(tmp_path, monkeypatch):
    """M2: the data's ``--max-pixels`` ignored (``getattr(data, "max_pixels")`` and
    ``getattr(tm.adapter, "max_pixels")`` -> None): masks were held to the default limit instead."""
    import repair.data
    from repair.errors import BadInput
    from repair.modelrepair.generation import Prompts
    from repair.modelrepair.masks import check_masks_for_data, object_masks

    items = _given_set(tmp_path, 36)
    monkeypatch.setattr(repair.data, "DEFAULT_MAX_PIXELS", 1000)          # below 36 x 36 = 1296
    data = SimpleNamespace(modality="image", items=items, source=tmp_path / "data", max_pixels=10 ** 6)
    check_masks_for_data(tmp_path / "masks", data)
    with pytest.raises(BadInput, match="limit"):                         # the default limit does bite
        check_masks_for_data(tmp_path / "masks", SimpleNamespace(modality="image", items=items,
                                                                 source=tmp_path / "data"))
    tm = SimpleNamespace(adapter=SimpleNamespace(data_config=CONFIG16, max_pixels=10 ** 6))
    x = torch.zeros(2, 3, 16, 16)
    res = {"masks": tmp_path / "masks", "data_root": tmp_path / "data"}
    m, src = object_masks("given", tm, items, x, torch.tensor([0, 0]), res, Prompts(), ["a"], CPU)
    assert src == "given" and m.shape == (2, 1, 16, 16) and float(m.max()) == 1.0


def test_given_masks_take_the_models_crop(tmp_path):
    """M1: the crop dropped from the masks' geometry: with crop_pct 0.5 a mask must be cropped as its
    image is. The image (grey, an off-centre object) is its own mask: the mask read equals the model's
    input turned back into pixels."""
    from repair.adapters import load_model
    from repair.modelrepair.masks import load_masks
    from repair.modelrepair.pixels import to_pixels

    folder = make_timm_folder(tmp_path / "model", size=16)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pretrained_cfg"].update({"crop_pct": 0.5})
    (folder / "config.json").write_text(json.dumps(cfg))
    ad = load_model(folder)
    rng = np.random.default_rng(0)
    items = []
    for i in range(2):
        g = rng.integers(20, 80, (40, 40), dtype=np.uint8)
        g[6:22, 8:26] = 220                                               # off-centre, half inside the crop
        arr = np.repeat(g[..., None], 3, 2)
        items.append(_png(tmp_path / "data" / f"{i}.png", arr))
        _png(tmp_path / "masks" / f"{i}.png", g)
    m = load_masks(tmp_path / "masks", items, tmp_path / "data", ad.data_config)
    want = to_pixels(ad.trainable().encode(items), ad.data_config).mean(1, keepdim=True)
    assert m.shape == want.shape == (2, 1, 16, 16)
    torch.testing.assert_close(m, want, atol=1e-5, rtol=0)


def test_auto_prefers_given_masks_to_a_segmenter(tmp_path):
    """M8: the auto order swapped (segmenter before given)."""
    from repair.modelrepair.generation import Prompts
    from repair.modelrepair.masks import object_masks

    items = _given_set(tmp_path, 16)
    tm = SimpleNamespace(adapter=SimpleNamespace(data_config=CONFIG16, max_pixels=10 ** 6))
    res = {"masks": tmp_path / "masks", "data_root": tmp_path / "data", "segmenter": tmp_path / "nowhere"}
    m, src = object_masks("auto", tm, items, torch.zeros(2, 3, 16, 16), torch.tensor([0, 0]), res, Prompts(),
                          ["a"], CPU)
    assert src == "given" and m.shape == (2, 1, 16, 16)


def test_the_segmenter_is_prompted_with_the_class_phrases(monkeypatch):
    """M7: ``prompts.object(cls)`` -> ``cls``: the segmenter got the raw class names."""
    import repair.modelrepair.masks as masks
    from repair.modelrepair.generation import Prompts

    seen = {}

    def fake(folder, pix, phrases, device, *a, **k):
        seen["phrases"] = list(phrases)
        return torch.ones(pix.shape[0], 1, *pix.shape[-2:])

    monkeypatch.setattr(masks, "clipseg_masks", fake)
    tm = SimpleNamespace(adapter=SimpleNamespace(data_config=CONFIG16))
    m, src = masks.object_masks("segmenter", tm, [], torch.zeros(3, 3, 16, 16), torch.tensor([0, 1, 0]),
                                {"segmenter": Path("seg")}, Prompts(objects={"cat": "a square"}),
                                ["cat", "golden_retriever"], CPU)
    assert src == "segmenter" and seen["phrases"] == ["a square", "golden retriever", "a square"]


@pytest.fixture(scope="module")
def quiet_clipseg(tmp_path_factory):
    """The tiny CLIPSeg with its last bias at -40: no pixel passes the threshold (the fallback)."""
    from test_recompose import tiny_clipseg

    folder = tmp_path_factory.mktemp("clipseg")
    model = tiny_clipseg(folder)
    with torch.no_grad():
        model.decoder.transposed_convolution.bias.fill_(-40.0)
    model.save_pretrained(str(folder))
    return folder


PHRASES = ["a square", "a disc", "xyz qq", "the big red cat"]


def test_segmenter_batches_take_their_own_phrases(quiet_clipseg):
    """M6: ``phrases[i:i + batch]`` -> ``phrases[:batch]``: every batch after the first was prompted
    with the first batch's phrases."""
    from repair.modelrepair.masks import clipseg_masks

    pix = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole = clipseg_masks(quiet_clipseg, pix, PHRASES, CPU, batch=16)
    assert torch.equal(clipseg_masks(quiet_clipseg, pix, PHRASES, CPU, batch=2), whole)
    other = clipseg_masks(quiet_clipseg, pix, PHRASES[:2] * 2, CPU, batch=16)
    assert not torch.equal(other[2:], whole[2:])                          # the phrase does matter


def test_segmenter_falls_back_to_the_top_30_percent(quiet_clipseg):
    """M5: ``if bool(empty.any())`` -> ``if False``: a mask nothing passed stayed empty."""
    from repair.modelrepair.masks import clipseg_masks

    pix = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    m = clipseg_masks(quiet_clipseg, pix, PHRASES, CPU)
    share = m.flatten(1).mean(1)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert bool(((share > 0.28) & (share < 0.32)).all()), share


# ------------------------------------------------------------------ prompts and files (G5, G6)
def test_class_names_become_phrases_with_spaces():
    """G5: ``cls.replace("_", " ")`` -> ``cls``."""
    from repair.modelrepair.generation import Prompts

    p = Prompts()
    assert p.object("golden_retriever") == "golden retriever"
    assert p.text("golden_retriever", "sandy_beach") == "a photo of a golden retriever, sandy beach background"
    assert Prompts(objects={"golden_retriever": "a dog"}).object("golden_retriever") == "a dog"


def test_save_png_rounds_to_the_nearest_level(tmp_path):
    """G6: ``.round()`` dropped: a value a hair below k/255 was written as k - 1."""
    from PIL import Image

    from repair.modelrepair.generation import save_png

    levels = torch.tensor([255, 200, 1, 0, 128], dtype=torch.float32)
    pix = (levels / 255 * (1 - 1e-6)).view(1, 1, 5).expand(3, 1, 5).clone()
    pix[:, 0, 0] = 0.999
    save_png(tmp_path / "rgb.png", pix)
    save_png(tmp_path / "grey.png", pix[:1])
    for name in ("rgb.png", "grey.png"):
        with Image.open(tmp_path / name) as im:
            arr = np.asarray(im)
        want = np.array([255, 200, 1, 0, 128], np.uint8)
        assert np.array_equal(arr, want[None] if arr.ndim == 2 else np.repeat(want[None, :, None], 3, 2)), (name, arr)


# ------------------------------------------------------------------ the fill (P3, G2)
def test_the_fill_grows_from_both_sides_of_the_hole():
    """P3: ``if k <= 1`` -> ``if k <= 3`` (the 3 x 3 blur of the normalised convolution a no-op): the hole
    was filled with the image's mean. On a horizontal gradient the fill follows the gradient."""
    from repair.modelrepair.generation import fill_holes

    grad = torch.linspace(0, 1, 24).view(1, 1, 1, 24).expand(1, 3, 16, 24).clone()
    hole = torch.zeros(1, 1, 16, 24)
    hole[..., 4:12, 6:18] = 1
    for texture in (False, True):
        out = fill_holes(grad, hole, texture=texture)[0, :, 4:12, 6:18]
        left, right = out[..., :6].mean(), out[..., 6:].mean()
        assert float(right - left) > 0.2, (texture, left, right)     # the mean fill: 0.04
        assert float((out - grad[0, :, 4:12, 6:18]).abs().max()) < 0.1
    out = fill_holes(grad, hole, texture=False)[0, :, 4:12, 6:18]
    assert bool((out[..., 1:] >= out[..., :-1] - 1e-6).all())            # monotone along each row


def test_the_fill_copies_the_backgrounds_texture_from_known_pixels_only():
    """G2: ``texture=True`` -> ``False`` (a flat fill on a noisy background), and ``use = (hole > 0) &
    (sh_k > 0)`` -> ``hole > 0`` (detail copied from inside the hole: a removed bright object's edges)."""
    from repair.modelrepair.generation import fill_holes

    g = torch.Generator().manual_seed(0)
    pix = (0.4 + 0.08 * torch.randn(2, 3, 16, 16, generator=g)).clamp(0, 1)
    hole = torch.zeros(2, 1, 16, 16)
    hole[..., 2:14, 2:14] = 1
    h = hole.bool().expand_as(pix)
    out = fill_holes(pix, hole)
    for i in range(2):
        for c in range(3):
            fill, bg = out[i, c][h[i, c]], pix[i, c][~h[i, c]]
            assert float(fill.std()) > 0.5 * float(bg.std()), (i, c)
    obj = pix.clone()
    obj[h] = 0.95                                                         # a bright, sharp-edged object
    out = fill_holes(obj, hole)
    assert float(out[h].max()) <= float(obj[~h].max()) + 1e-6
    assert float(out[h].mean()) < 0.5


def test_the_composite_removes_the_anti_aliased_ring_around_the_background_object():
    """G4: the background mask's dilation dropped: the 1-pixel ring just outside the mask (anti-aliasing,
    a mask drawn a little tight) stayed in the generated image."""
    from repair.modelrepair.generation import CompositeGenerator

    bg = torch.full((1, 3, 16, 16), 0.3)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5:11, 5:11] = 1
    bg[..., 4:12, 4:12] = 0.6                                             # the ring
    bg[..., 5:11, 5:11] = 0.9                                             # the object
    src = torch.full((1, 3, 16, 16), 0.5)
    empty = torch.zeros(1, 1, 16, 16)
    out, _ = CompositeGenerator(harmonize=0.0).generate(src, empty, bg, mask, ["x"])
    assert float(out.max()) <= 0.3 + 1e-5


# ------------------------------------------------------------------ Grad-CAM (A1, A3)
def test_token_grids_after_two_prefix_tokens():
    """A1: prefixes ``(0, 1, 2)`` -> ``(0, 1)``: a ViT with a class and a distillation token (DeiT)."""
    from repair.modelrepair.attribution import _spatial

    t = torch.randn(2, 18, 8)
    s = _spatial(t)
    assert s.shape == (2, 8, 4, 4)
    assert torch.equal(s, t[:, 2:].transpose(1, 2).reshape(2, 8, 4, 4))
    assert _spatial(torch.randn(2, 17, 8)).shape == (2, 8, 4, 4)
    assert _spatial(torch.randn(2, 19, 8)) is None


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.r1 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()
        self.c2, self.r2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.ReLU()
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(6, 3)

    def forward(self, x):
        a1 = self.r1(self.c1(x))
        a2 = self.r2(self.c2(a1))
        return self.fc(self.pool(a2).flatten(1))


def _hand_cam(net, x, y, layer):
    """Grad-CAM by its definition on ``layer``'s output."""
    import torch.nn.functional as F

    box = {}
    h = layer.register_forward_hook(lambda m, i, o: box.__setitem__("A", o))
    xx = x.clone().requires_grad_(True)
    out = net(xx)
    h.remove()
    A = box["A"]
    g, = torch.autograd.grad(out.gather(1, y.view(-1, 1)).sum(), A)
    cam = F.relu((g.mean((2, 3), keepdim=True) * A).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)


def test_grad_cam_matches_its_definition_on_the_chosen_map():
    """A3: ``max(fine or live)`` -> ``min``, ``>= min_side`` -> ``>``, ``grad.mean`` -> ``grad.abs().mean``:
    Grad-CAM by hand on the last map (8 x 8), on the last map at least 8 cells a side (the same), and on
    the last at least 16 a side (the first block's)."""
    from repair.modelrepair.attribution import gradcam

    net = _Net().eval()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    last, first = _hand_cam(net, x, y, net.r2), _hand_cam(net, x, y, net.r1)
    assert float(last.flatten(1).amax(1).sum()) >= 3 and not torch.allclose(last, first, atol=1e-3)
    torch.testing.assert_close(gradcam(net, x, y), last, atol=1e-5, rtol=0)
    torch.testing.assert_close(gradcam(net, x, y, min_side=8), last, atol=1e-5, rtol=0)
    torch.testing.assert_close(gradcam(net, x, y, min_side=16), first, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in net.parameters())


# ------------------------------------------------------------------ the contrast prior (M4, M3)
def _speckled(seed: int, n: int = 4, s: int = 32):
    """Objects (11 x 11, bright) on a noisy background with faint one-pixel specks away from them (after the
    3 x 3 blur: fragments near the threshold, which the opening removes)."""
    g = torch.Generator().manual_seed(seed)
    pix = torch.tensor([0.47, 0.51, 0.16]).view(1, 3, 1, 1) + 0.047 * torch.randn(n, 3, s, s, generator=g)
    truth = torch.zeros(n, 1, s, s)
    for i in range(n):
        cy, cx = torch.randint(10, 22, (2,), generator=g).tolist()
        truth[i, 0, cy - 5:cy + 6, cx - 5:cx + 6] = 1
    pix = torch.where(truth > 0, torch.full_like(pix, 0.9), pix)
    for i in range(n):
        for _ in range(12):
            y, x = torch.randint(3, s - 3, (2,), generator=g).tolist()
            if truth[i, 0, max(0, y - 3):y + 4, max(0, x - 3):x + 4].sum() == 0:
                pix[i, :, y, x] = 0.55
    return pix.clamp(0, 1), truth


def test_contrast_masks_are_opened():
    """M4: the opening's radius 0, or a closing in its place: specks survived. The mask is its own
    opening, covers each object and nothing two pixels beyond it."""
    from repair.modelrepair.masks import contrast_masks
    from repair.modelrepair.pixels import _dilate, _erode

    for seed in range(3):
        pix, truth = _speckled(seed)
        m = contrast_masks(pix)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(m, _dilate(_erode(m, 1), 1)), seed
        assert bool((m[_erode(truth, 1) > 0] == 1).all())
        assert float(m[_dilate(truth, 2) == 0].sum()) == 0, seed


def test_contrast_border_colour_is_robust_to_a_stray_corner():
    """M3: the border colour's median -> mean: a few bright pixels at a corner of the border (a stray
    object) pulled the background colour towards them and a faint object (0.33 on 0.30) was lost."""
    from repair.modelrepair.masks import contrast_masks

    pix = torch.full((1, 3, 32, 32), 0.30)
    pix[..., 0:2, 0:3] = 1.0                                              # the stray corner, in the border
    pix[..., 11:21, 11:21] = 0.33                                         # the faint object
    m = contrast_masks(pix)
    truth = torch.zeros(1, 1, 32, 32)
    truth[..., 11:21, 11:21] = 1
    assert bool((m[truth > 0] == 1).all())                                # the object ...
    near = torch.zeros(1, 1, 32, 32)
    near[..., 10:22, 10:22] = 1                                           # (the 3 x 3 blur's reach)
    assert float(m[..., 4:28, 4:28][near[..., 4:28, 4:28] == 0].sum()) == 0      # ... and nothing else inside


# ------------------------------------------------------------------ attribution masks (M9)
def test_attribution_masks_take_the_quantile_and_min_side(timm_mr):
    """M9: ``threshold_masks(..., quantile)`` -> 0.7, and ``min_side=min_side`` -> None."""
    from repair.modelrepair.attribution import attribution_maps, threshold_masks
    from repair.modelrepair.generation import Prompts
    from repair.modelrepair.masks import object_masks

    tm = _tm(timm_mr)
    x = torch.nn.functional.interpolate(tm.encode(timm_mr["items"]), size=32, mode="bilinear")
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    coarse, fine = attribution_maps(tm, x, y, CPU), attribution_maps(tm, x, y, CPU, min_side=4)
    live = [i for i in range(8) if float(coarse[i].max()) == 1.0 and float(fine[i].max()) == 1.0]
    assert len(live) >= 2
    x, y = x[live], y[live]
    m, src = object_masks("attribution", tm, [], x, y, {}, Prompts(), ["a", "b", "c"], CPU, quantile=0.9)
    assert src == "attribution" and 0.05 < float(m.mean()) < 0.11
    torch.testing.assert_close(m, threshold_masks(attribution_maps(tm, x, y, CPU), 0.9), atol=0, rtol=0)
    m4, _ = object_masks("attribution", tm, [], x, y, {}, Prompts(), ["a", "b", "c"], CPU, quantile=0.9, min_side=4)
    want = threshold_masks(attribution_maps(tm, x, y, CPU, min_side=4), 0.9)
    torch.testing.assert_close(m4, want, atol=0, rtol=0)
    assert not torch.equal(m4, m)
