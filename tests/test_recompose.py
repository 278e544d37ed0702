"""The ``recompose`` model repair: object masks, generation (composite and a tiny diffusers
pipeline built here from configs), pruning, retraining and the files it leaves, on tiny images."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_texts, make_timm_folder
from repair.errors import BadInput
from repair_cli.main import app

runner = CliRunner()
CLASSES = ("cat", "dog")
PLACES = {"land": (120, 130, 40), "water": (30, 60, 200)}


def run_cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def make_scene(root: Path, masks: Path, n_per_group: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Objects (cat: square, dog: disc, bright random colour) on a noisy land/water background;
    ground-truth masks under ``masks`` with the same relative names."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    k = 0
    for ci, c in enumerate(CLASSES):
        for place, colour in PLACES.items():
            for _ in range(n_per_group):
                img = np.clip(np.array(colour) + rng.normal(0, 12, (size, size, 3)), 0, 255)
                cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(5, 8)
                m = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r) if ci == 0 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                img[m] = rng.integers(200, 256, 3)
                rel = f"{c}/{k:03d}.png"
                for base, arr in ((root, img.astype(np.uint8)), (masks, (m * 255).astype(np.uint8))):
                    (base / c).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(base / rel)
                rows.append({"img_filename": rel, "y": c, "place": place})
                k += 1
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    base = tmp_path_factory.mktemp("recompose")
    data = make_scene(base / "val", base / "masks")
    model = make_timm_folder(base / "model", classes=list(CLASSES), size=32)
    return {"data": data, "masks": base / "masks", "model": model, "base": base}


def _recipe(path: Path, **params) -> Path:
    body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in params.items())
    path.write_text(f"name: {path.stem}\ncandidates:\n  - method: recompose\n    params: {{{body}}}\n")
    return path


FAST = {"epochs": 2, "batch_size": 8, "patience": 0}


def _loaded(scene):
    from repair.adapters import load_model

    ad = load_model(scene["model"])
    tm = ad.trainable()
    items = sorted(scene["data"].rglob("*.png"))
    y = torch.tensor([CLASSES.index(p.parent.name) for p in items])
    return ad, tm, items, tm.encode(items), y


def _truth(scene, items):
    from repair.adapters import load_model
    from repair.modelrepair.masks import load_masks

    return load_masks(scene["masks"], items, scene["data"], load_model(scene["model"]).data_config)


def _iou(a, b):
    a, b = a > 0.5, b > 0.5
    return ((a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp_min(1)).float()


# ------------------------------------------------------------------ where the object is
def test_masks_given_contrast_attribution(scene):
    from repair.modelrepair.generation import Prompts
    from repair.modelrepair.masks import object_masks

    ad, tm, items, x, y = _loaded(scene)
    truth = _truth(scene, items)
    res = {"masks": scene["masks"], "data_root": scene["data"]}
    m, src = object_masks("auto", tm, items, x, y, res, Prompts(), CLASSES, "cpu")
    assert src == "given" and m.shape == (len(items), 1, 32, 32) and torch.equal(m, truth)
    m, src = object_masks("contrast", tm, items, x, y, {}, Prompts(), CLASSES, "cpu")
    assert src == "contrast" and float(_iou(m, truth).mean()) > 0.6
    m, src = object_masks("auto", tm, items, x, y, {}, Prompts(), CLASSES, "cpu")
    assert src == "contrast"                      # without masks or a segmenter: the boundary prior
    m, src = object_masks("attribution", tm, items, x, y, {}, Prompts(), CLASSES, "cpu", quantile=0.7)
    assert src == "attribution" and m.shape == truth.shape and set(m.unique().tolist()) <= {0.0, 1.0}
    assert 0.1 < float(m.mean()) < 0.5
    with pytest.raises(BadInput, match="--masks"):
        object_masks("given", tm, items, x, y, {}, Prompts(), CLASSES, "cpu")
    with pytest.raises(BadInput, match="CLIPSeg"):
        object_masks("auto", tm, items, x, y, {"segmenter": scene["base"] / "nowhere"}, Prompts(), CLASSES, "cpu")


def tiny_clip_tokenizer(path: Path):
    """A character-level CLIP tokenizer (every byte a token, no merges), saved under ``path``."""
    from transformers import CLIPTokenizer

    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in bs] + [chr(256 + k) for k in range(256 - len(bs))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tok.save_pretrained(str(path))
    return tok


def tiny_clipseg(folder: Path):
    """A tiny CLIPSeg model with its processor saved under ``folder`` (safetensors); returns the model."""
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor)

    tok = tiny_clip_tokenizer(folder)
    torch.manual_seed(0)
    cfg = CLIPSegConfig(text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16, extract_layers=[0], reduce_dim=8, decoder_num_attention_heads=2,
                        decoder_intermediate_size=16)
    model = CLIPSegForImageSegmentation(cfg)
    model.save_pretrained(str(folder))
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok) \
        .save_pretrained(str(folder))
    return model


def test_language_guided_masks_from_a_local_clipseg(scene, tmp_path):
    from repair.modelrepair.generation import Prompts
    from repair.modelrepair.masks import object_masks

    folder = tmp_path / "clipseg"
    tiny_clipseg(folder)
    ad, tm, items, x, y = _loaded(scene)
    m, src = object_masks("auto", tm, items[:5], x[:5], y[:5], {"segmenter": folder},
                          Prompts(objects={"cat": "a square"}), CLASSES, "cpu")
    assert src == "segmenter" and m.shape == (5, 1, 32, 32)
    assert set(m.unique().tolist()) <= {0.0, 1.0} and bool((m.flatten(1).sum(1) > 0).all())


# ------------------------------------------------------------------ generation
def test_composite_puts_the_object_on_a_cleaned_background(scene):
    from repair.modelrepair.generation import CompositeGenerator, fill_holes
    from repair.modelrepair.pixels import to_pixels

    ad, tm, items, x, y = _loaded(scene)
    truth = _truth(scene, items)
    pix = to_pixels(x, ad.data_config)
    src, bg = [0, 1, 2], [len(items) - 1, len(items) - 2, len(items) - 3]      # cats onto dogs' images
    out, om = CompositeGenerator(harmonize=0.0).generate(pix[src], truth[src], pix[bg], truth[bg], [""] * 3)
    assert out.shape == (3, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(om, truth[src])
    from repair.modelrepair.pixels import _erode

    inner = _erode(truth[src], 1).bool().expand(-1, 3, -1, -1)
    torch.testing.assert_close(out[inner], pix[src][inner])               # the object, exactly
    # the background's own object is gone: its region now looks like its surroundings
    hole = (truth[bg] > 0.5) & (truth[src] < 0.5)
    for k in range(3):
        h = hole[k, 0]
        surround = pix[bg[k]][:, truth[bg[k], 0] < 0.5].mean(1)
        assert (out[k][:, h].mean(1) - surround).abs().max() < 0.12
    flat = torch.full((1, 3, 16, 16), 0.3)
    holey = torch.zeros(1, 1, 16, 16)
    holey[..., 4:12, 4:12] = 1
    torch.testing.assert_close(fill_holes(flat.clone(), holey), flat, atol=1e-5, rtol=0)


def test_prompts_file(tmp_path):
    from repair.modelrepair.generation import load_prompts

    p = tmp_path / "p.yaml"
    p.write_text("template: '{object} near {background}'\nobjects: {cat: a tabby}\nbackgrounds: {water: a lake}\n")
    pr = load_prompts(p, CLASSES, ["land", "water"])
    assert pr.text("cat", "water") == "a tabby near a lake" and pr.text("dog", "land") == "dog near land"
    for body, msg in (("colour: red\n", "unknown key"), ("objects: {cow: a cow}\n", "cow"),
                      ("template: '{object} {style}'\n", "style"), ("- a\n", "mapping")):
        p.write_text(body)
        with pytest.raises(BadInput, match=msg):
            load_prompts(p, CLASSES, ["land", "water"])


# ------------------------------------------------------------------ the recipe end to end
def _fix(scene, out, recipe, *extra):
    code, stdout, err = run_cli("fix", scene["model"], "--data", scene["data"], "--recipe", recipe, "--out", out,
                                "--json", "-q", *extra)
    assert code == 0, err
    return json.loads(stdout)


def test_recompose_keeps_everything_at_zero_and_writes_its_files(scene, tmp_path):
    # patience above the two epochs' evaluations: never stops early, but the early-stopping rule is resolved
    recipe = _recipe(tmp_path / "r0.yaml", **{**FAST, "patience": 5}, min_probability=0, min_attribution=0, sheet=4)
    out = tmp_path / "fixed"
    rep = _fix(scene, out, recipe, "--group-by", "place", "--masks", scene["masks"])
    # early_stop auto, by the session's criterion: with group labels, anytime
    assert rep["diagnostics"]["session"]["criterion"] == "worst_group"
    assert rep["diagnostics"]["loop"]["early_stop"] == {"applied": "anytime", "why": "auto: the criterion is worst_group"}
    assert rep["method"] == "recompose" and rep["kind"] == "model"
    gen = rep["diagnostics"]["generation"]
    n_train = rep["diagnostics"]["session"]["n_train"]
    assert gen["mask_source"] == "given" and gen["generator"] == "composite"
    assert gen["generated"] == n_train and gen["kept"] == n_train
    # backgrounds of the other class and the other attribute value: cats on water only from land cats
    pcb = gen["per_class_background"]
    assert set(pcb) == {"cat|land", "cat|water", "dog|land", "dog|water"}
    assert all(v["kept"] == v["generated"] for v in pcb.values())
    loop = rep["diagnostics"]["loop"]
    assert rep["model_change"]["steps"] == loop["steps"] > 0 and loop["history"][-1]["step"] == loop["steps"]
    assert rep["diagnostics"]["generated_in_training"] == n_train and rep["diagnostics"]["generated_per_batch"] == 4
    st = rep["diagnostics"]["settle"]                           # settled on the real held-out images
    assert st["head"] == "refit" and {c["alpha"] for c in st["candidates"]} <= {0.5, 1.0}
    assert {c["head"] for c in st["candidates"]} == {"refit"}
    assert not any(w.startswith("recompose:") for w in rep["warnings"])     # every image kept: nothing to say
    art = Path(rep["artifacts"])
    assert art.parent == out and art.is_dir()
    man = json.loads((art / "manifest.json").read_text())
    files = sorted(str(p.relative_to(art)) for p in (art / "images").iterdir())
    assert files == sorted(r["file"] for r in man["images"]) and len(files) == gen["generated"]
    assert sorted(str(p.relative_to(art)) for p in (art / "masks").iterdir()) == sorted(r["mask"] for r in man["images"])
    assert (art / "contact_sheet.png").is_file()
    data = scene["data"].resolve()
    for r in man["images"]:
        assert r["kept"] and 0 <= r["probability"] <= 1 and 0 <= r["attribution_mass"] <= 1
        # named relative to the folders given (no machine path in an output)
        assert not Path(r["source"]).is_absolute() and not Path(r["source_mask"]).is_absolute()
        src, bg = data / r["source"], data / r["background"]
        assert src.is_file() and bg.is_file() and src.parent.name == r["class"] != bg.parent.name
        assert (scene["masks"] / r["source_mask"]).is_file() and r["background_attribute"] in ("land", "water")
    from PIL import Image

    with Image.open(art / man["images"][0]["file"]) as im:
        assert im.size == (32, 32)


def test_pruning_at_one_keeps_nothing_and_still_retrains(scene, tmp_path):
    recipe = _recipe(tmp_path / "r1.yaml", **FAST, min_probability=1, min_attribution=1, masks="contrast")
    rep = _fix(scene, tmp_path / "fixed1", recipe)                 # no group labels either
    gen = rep["diagnostics"]["generation"]
    assert gen["generated"] > 0 and gen["kept"] == 0 and gen["mask_source"] == "contrast"
    assert set(gen["per_class_background"]) == {"cat|dog", "dog|cat"}          # background = the other class
    man = json.loads((Path(rep["artifacts"]) / "manifest.json").read_text())
    assert not any(r["kept"] for r in man["images"])
    assert rep["model_change"]["steps"] > 0
    assert rep["diagnostics"]["generated_in_training"] == 0 and rep["diagnostics"]["generated_per_batch"] == 0
    # said, not only recorded (an audit found it only in a progress line): the run was plain fine-tuning
    assert any("none of the" in w and "real images only" in w for w in rep["warnings"]), rep["warnings"]


def test_recompose_refuses_text_models_and_bad_generators(scene, bert_folder, tmp_path):
    texts = make_texts(tmp_path / "t.csv")
    code, _, err = run_cli("fix", bert_folder, "--data", texts, "--recipe", "recompose", "-q")
    assert code == 2 and "recompose needs an image model" in err and err.count("\n") == 1
    for extra in (["--generator", "diffusers"], ["--generator", "diffusers", "--generator-model", tmp_path / "none"],
                  ["--generator", "dalle"]):
        code, _, err = run_cli("fix", scene["model"], "--data", scene["data"], "--recipe", "recompose",
                               "--out", tmp_path / "x", "--force", "-q", *extra)
        errors = [line for line in err.splitlines() if not line.startswith("warning:")]     # -q keeps warnings
        assert code == 2 and len(errors) == 1, err
        assert "diffusers" in err or "composite" in err or "--generator-model" in err


def test_a_generator_folder_with_pickle_only_weights_is_refused_before_any_work(scene, tmp_path):
    """--generator-model is loaded safetensors-only: a component whose weights are pickles only (which
    would run code when loaded) is exit 2 naming that file when the command starts -- whether or not
    diffusers is installed -- and a folder without model_index.json likewise."""
    from repair.modelrepair.generation import check_generator_folder

    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "text_encoder").mkdir()
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionInpaintPipeline"}')
    (pipe / "text_encoder" / "model.safetensors").write_bytes(b"x")
    (pipe / "text_encoder" / "pytorch_model.bin").write_bytes(b"x")        # beside safetensors: not loaded
    bad = pipe / "unet" / "diffusion_pytorch_model.bin"
    bad.write_bytes(b"not a pickle")
    out = tmp_path / "out"
    code, _, err = run_cli("fix", scene["model"], "--data", scene["data"], "--recipe", "recompose", "--group-by",
                           "place", "--generator", "diffusers", "--generator-model", pipe, "--out", out, "-q")
    errors = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert code == 2 and len(errors) == 1 and str(bad) in err and "pickles only" in err, err
    assert not out.exists() and bad.read_bytes() == b"not a pickle"
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    check_generator_folder(pipe)                                         # safetensors beside it: accepted
    (pipe / "model_index.json").unlink()
    with pytest.raises(BadInput, match="model_index.json"):
        check_generator_folder(pipe)


def test_without_diffusers_the_message_says_how_to_install(monkeypatch):
    from repair.modelrepair.generation import make_generator

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(BadInput, match=r"pip install 'repair-toolkit\[diffusion\]'"):
        make_generator("diffusers", {}, "cpu")


def tiny_inpainting_pipeline(folder: Path) -> Path:
    """A randomly initialised Stable Diffusion inpainting pipeline small enough for the CPU."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_clip_tokenizer(folder / "_tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).save_pretrained(str(folder))
    return folder


def test_diffusers_generator_through_the_whole_recipe(scene, tmp_path):
    from repair.rules import install_hint

    pytest.importorskip("diffusers", reason=f"diffusers is not installed ({install_hint('diffusion')})")
    pipe = tiny_inpainting_pipeline(tmp_path / "inpaint")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("objects: {cat: a square cat}\nbackgrounds: {water: a blue lake}\n")
    recipe = _recipe(tmp_path / "rd.yaml", epochs=1, batch_size=8, patience=0, diffusion_steps=2, size=32,
                     inversion_steps=2, max_images=4, min_probability=0.0, min_attribution=0.0, sheet=4)
    rep = _fix(scene, tmp_path / "fixed-d", recipe, "--group-by", "place", "--masks", scene["masks"],
               "--generator", "diffusers", "--generator-model", pipe, "--prompts", prompts)
    gen = rep["diagnostics"]["generation"]
    assert gen["generator"] == "diffusers" and gen["size"] == 32 and gen["device"] == "cpu"
    assert gen["textual_inversion"] == ["<a-square-cat>", "<dog>"]
    assert gen["kept"] == gen["generated"] == 4
    art = Path(rep["artifacts"])
    man = json.loads((art / "manifest.json").read_text())
    assert sorted(p.name for p in (art / "images").iterdir()) == sorted(Path(r["file"]).name for r in man["images"])
    for r in man["images"]:
        bg = "a blue lake" if r["background_attribute"] == "water" else "land"
        obj = "a square cat" if r["class"] == "cat" else "dog"
        assert r["prompt"] == f"a photo of a {obj}, {bg} background"
    from PIL import Image

    with Image.open(art / man["images"][0]["file"]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"


BAD_PROMPTS = [
    ("latin1", b'template: "caf\xe9 {object}"\n', "not UTF-8"),
    ("intkey", b"1: a\nfoo: b\n", "unknown key 1"),
    ("deep", b"objects: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested more than"),
    ("fmtspec", b'template: "a {object:d} on {background}"\n', "{object:d}"),
    ("unbalanced", b'template: "a photo of a {object on {background}"\n', "not a valid format string"),
    ("attribute", b'template: "a {object.upper} on {background}"\n', "{object.upper}"),
    ("boolkey", b"objects: {no: a cat}\n", "not a name"),
]


@pytest.mark.parametrize("name, body, problem", BAD_PROMPTS, ids=[c[0] for c in BAD_PROMPTS])
def test_a_bad_prompts_file_is_exit_2_naming_it_before_any_work(scene, tmp_path, name, body, problem):
    """A prompts file that is not UTF-8, has a key that is not text, nests too deep, or whose template
    is not plain text with {object} and {background} was exit 3 (some only mid-training): now one
    line naming the file, exit 2, when the command starts (no training, no output)."""
    prompts = tmp_path / f"{name}.yaml"
    prompts.write_bytes(body)
    out = tmp_path / "out"
    code, _, err = run_cli("fix", scene["model"], "--data", scene["data"], "--group-by", "place", "--recipe",
                           "recompose", "--budget", "2steps", "--prompts", prompts, "--out", out, "-q")
    assert code == 2 and err.count("\n") == 1 and "warning" not in err, err     # before the stopping warnings
    assert str(prompts) in err and problem in err and not out.exists()


def test_prompts_template_checks(tmp_path):
    from repair.modelrepair.generation import Prompts, load_prompts

    p = tmp_path / "p.yaml"
    p.write_text("template: '{{literal}} {object} by {background}'\nobjects: {1: one}\n")
    pr = load_prompts(p, ["1", "cat"], ["land"])
    assert pr.text("1", "land") == "{literal} one by land" and pr.objects == {"1": "one"}
    for body, msg in (("template: '{}'\n", r"not \{\}"), ("template: '{object!r}'\n", "no format spec"),
                      ("template: 'a } b'\n", "Single '}'"), ("template: '{object:>999999999}'\n", "no format spec"),
                      ("objects: {1: a, '1': b}\n", "given twice"), ("objects: {~: a}\n", "not a name")):
        p.write_text(body)
        with pytest.raises(BadInput, match=msg):
            load_prompts(p, None, ())
    assert Prompts().text("cat", "water") == "a photo of a cat, water background"
