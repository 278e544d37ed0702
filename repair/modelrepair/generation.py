"""Counterfactual images for model repairs: generators that put each image's object with the
attributes of other classes (the ``recompose`` recipe, :mod:`repair.methods.recompose`).

Everything works on image tensors at the model's input resolution: the repair data as the model's
own eval preprocessing made it (:meth:`repair.modelrepair.trainable.TrainableModel.encode`), turned
back into pixels in [0, 1] with the model's mean and std (:func:`repair.modelrepair.pixels.to_pixels`),
and generated images go back through :func:`~repair.modelrepair.pixels.to_model`, so nothing is
decoded twice and the masks line up with what the model sees. Where the object is comes from
:mod:`repair.modelrepair.masks` (the mask sources).

**Generators** (:func:`make_generator`), one interface (:class:`Generator`): ``generate`` takes the
source images and their object masks, the background images and *their* object masks, and one
prompt per image, and returns the new images in [0, 1] and the object's mask in them.

- ``composite`` (no weights): the background image's own object is removed (its masked region,
  dilated, filled from the surrounding background by normalised convolution, with high-frequency
  texture copied from elsewhere in the same image), and the source object is pasted with a feathered
  edge; harmonisation shifts the object's colour by a share of the difference between the two
  backgrounds' mean colours.
- ``diffusers``: the composite is the starting image of a local inpainting pipeline
  (``--generator-model``), which repaints everything but the (slightly shrunk) object under a prompt
  naming the class's object and the background's attribute; the object is pasted back exactly.
  Optional textual inversion learns one token per class from the masked source objects first.
  CUDA when available (float16); on the CPU it warns about the cost. ``diffusers`` is the optional
  extra ``repair-toolkit[diffusion]``.

**Prompts** (:func:`load_prompts`): ``template`` (``{object}``, ``{background}``), ``objects`` (class
name -> phrase; also the segmentation prompt), ``backgrounds`` (attribute value, or class name when
no groups are known -> phrase), ``negative``. ``--prompts FILE.yaml`` overrides any of them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import BadInput
from ..io import PICKLE_SUFFIXES
from ..registry import Resource
from .pixels import _blur, _dilate, _erode
from .trainable import install_hint, missing_package

GENERATORS = ("composite", "diffusers")

#: the user inputs of image generation, declared by the model repairs that generate
GENERATOR = Resource("generator", kind="choice", choices=GENERATORS,
                     help="Image generation for recipes that generate.")


def check_generator_folder(folder: Path) -> None:
    """A local diffusers pipeline folder that loads without running a pickle: ``model_index.json``
    present, and no component folder whose weights are pickles only (``.bin``, ``.pt``, ...; a
    pickle can run code when loaded, and the pipeline loads with ``use_safetensors=True``, so such a
    component would fail mid-run), and no entry that leaves the folder (a model folder's rule,
    :func:`repair.adapters.base.check_model_folder`). Checked when ``repair fix`` starts and again on
    loading."""
    from ..adapters.base import check_model_folder

    folder = Path(folder)
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise BadInput("--generator-model must be a local diffusers pipeline folder (with model_index.json)",
                       folder)
    check_model_folder(folder)            # only the folder's own files: no symlink out of it, no FIFO
    for comp in sorted(folder.iterdir()):
        if not comp.is_dir():
            continue
        files = [f for f in comp.iterdir() if f.is_file()]
        if any(f.suffix.lower() == ".safetensors" for f in files):
            continue
        pickles = sorted(f for f in files if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise BadInput("--generator-model: this component's weights are pickles only (a pickle can run "
                           "code when loaded); save the pipeline with safetensors (save_pretrained's default)",
                           pickles[0])


GENERATOR_MODEL = Resource("generator_model", kind="folder", validate=check_generator_folder,
                           help="A local diffusers inpainting pipeline folder (--generator diffusers).")
def check_prompts_file(path: Path) -> None:
    """The prompts file read as :func:`load_prompts` reads it, without the model's class names (those
    are checked when the method runs): when ``repair fix`` starts, not after the training it feeds."""
    load_prompts(path, None, ())


PROMPTS = Resource("prompts", kind="file", validate=check_prompts_file,
                   help="A YAML file of generation prompts (overrides the built-in ones).")
INSTALL_DIFFUSION = install_hint("diffusion")


# ---------------------------------------------------------------------------- prompts
@dataclass
class Prompts:
    template: str = "a photo of a {object}, {background} background"
    objects: dict = field(default_factory=dict)        # class name -> phrase
    backgrounds: dict = field(default_factory=dict)    # attribute value / class name -> phrase
    negative: str = ""

    def object(self, cls: str) -> str:
        return self.objects.get(cls, cls.replace("_", " "))

    def background(self, key: str) -> str:
        return self.backgrounds.get(key, key.replace("_", " "))

    def text(self, cls: str, background_key: str) -> str:
        return self.template.format(object=self.object(cls), background=self.background(background_key))


PROMPT_KEYS = ("template", "objects", "backgrounds", "negative")
TEMPLATE_FIELDS = ("object", "background")
#: the largest prompts file read, and the most YAML values it may hold with its aliases expanded (a
#: phrase per class and per background: tens of thousands for the largest label sets)
MAX_PROMPTS_BYTES = 1 << 20
MAX_PROMPTS_VALUES = 100_000


def check_template(template: str, path: Path) -> None:
    """:class:`BadInput` naming ``path`` unless ``template`` is text with ``{object}`` and
    ``{background}`` fields only (``{{`` and ``}}`` for literal braces): no other field, no
    positional ``{}``, no attribute or index, no conversion or format spec (``{object:d}`` fails on a
    phrase; a width would pad every prompt), no unbalanced brace -- so :meth:`Prompts.text` cannot
    fail once training has started."""
    import string

    allowed = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise BadInput(f"template is not a valid format string ({e}); use {allowed}, and {{{{ }}}} for literal "
                       "braces", path) from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            raise BadInput(f"template may use {allowed}, not {{{name}}}", path)
        if spec or conversion:
            raw = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise BadInput(f"template field {raw} takes no format spec or conversion; write {{{name}}}", path)
    try:                                                 # the trial format Prompts.text will do
        template.format(**{f: f for f in TEMPLATE_FIELDS})
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise BadInput(f"template is not a valid format string ({type(e).__name__}: {e})", path) from None


def load_prompts(path: Optional[Path], class_names: Optional[Sequence[str]], background_keys: Sequence[str]) -> Prompts:
    """The built-in prompts, overridden by ``path`` (YAML, :data:`PROMPT_KEYS`), read as recipes are
    (:func:`repair.recipes.read_text_file`, :func:`repair.recipes.parse_yaml`: a regular UTF-8
    file, bounded in size, values and depth, no duplicate keys). An unknown key, a class or
    background that does not exist, or a template that is not plain text with its two fields
    (:func:`check_template`) is BadInput (``class_names`` None: the names are not checked)."""
    p = Prompts()
    if path is None:
        return p
    from ..recipes import parse_yaml, read_text_file

    path = Path(path)
    text = read_text_file(path, "prompts file", MAX_PROMPTS_BYTES, "a phrase per class and background")
    doc = parse_yaml(text, path, MAX_PROMPTS_VALUES, "prompts file", "a phrase per class and background")
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise BadInput(f"expected a mapping with keys {', '.join(PROMPT_KEYS)}", path)
    unknown = [k for k in doc if k not in PROMPT_KEYS]         # in file order: keys of any type
    if unknown:
        raise BadInput(f"unknown key {unknown[0]!r}; known: {', '.join(PROMPT_KEYS)}", path)
    for key in ("template", "negative"):
        if key in doc:
            if not isinstance(doc[key], str):
                raise BadInput(f"{key!r} must be a string", path)
            setattr(p, key, doc[key])
    check_template(p.template, path)
    for key, known in (("objects", None if class_names is None else list(class_names)),
                       ("backgrounds", None if class_names is None else list(background_keys) + list(class_names))):
        val = doc.get(key) or {}
        if not isinstance(val, dict) or not all(isinstance(v, str) for v in val.values()):
            raise BadInput(f"{key!r} must map names to phrases", path)
        names: dict = {}
        for k in val:
            if isinstance(k, (bool, float)) or not isinstance(k, (str, int)):
                raise BadInput(f"{key}: {k!r} is not a name (write names as text)", path)
            if str(k) in names:
                raise BadInput(f"{key}: {str(k)!r} is given twice", path)
            names[str(k)] = val[k]
        bad = [] if known is None else [k for k in names if k not in known]
        if bad:
            raise BadInput(f"{key}: {bad[0]!r} is not one of {', '.join(known)}", path)
        setattr(p, key, names)
    return p


# ---------------------------------------------------------------------------- composite
def fill_holes(pix: torch.Tensor, hole: torch.Tensor, texture: bool = True) -> torch.Tensor:
    """``pix`` (N,3,H,W) with the region ``hole`` (N,1,H,W, 1 = remove) filled from its
    surroundings: normalised convolution grown outwards until the hole is closed, plus the
    image's own high-frequency texture copied from a shifted, known part of it."""
    hole = (hole > 0.5).float()
    known = 1.0 - hole
    out = pix * known
    have = known.clone()
    h, w = pix.shape[-2:]
    for _ in range(max(h, w)):
        if bool((have > 0).all()):
            break
        num, den = _blur(out * have, 3), _blur(have, 3)
        grow = (den > 0) & (have == 0)
        out = torch.where(grow, num / den.clamp_min(1e-6), out)
        have = torch.where(grow, torch.ones_like(have), have)
    out = torch.where(have > 0, out, pix.mean((2, 3), keepdim=True).expand_as(pix))
    smooth = _blur(out, 5)
    out = torch.where(hole > 0, smooth, pix)             # the fill itself is smooth
    if texture:
        detail = pix - _blur(pix, 5)
        for dy, dx in ((h // 2, w // 2), (h // 2, 0), (0, w // 2), (h // 3, w // 3)):
            sh_d = torch.roll(detail, (dy, dx), (2, 3))
            sh_k = torch.roll(known, (dy, dx), (2, 3))
            use = (hole > 0) & (sh_k > 0)
            out = torch.where(use, out + sh_d, out)
            hole = hole * (1 - use.float())
    return out.clamp(0, 1)


def paste(obj_pix: torch.Tensor, obj_mask: torch.Tensor, src_bg_mean: torch.Tensor, bg_pix: torch.Tensor,
          harmonize: float, feather: int = 3) -> torch.Tensor:
    """The object (``obj_pix`` inside ``obj_mask``) on ``bg_pix``: colour shifted by ``harmonize``
    x (new background mean - its old background mean), edge feathered by a ``feather`` box blur."""
    m = obj_mask.clamp(0, 1)
    # feathered inwards only: the eroded interior is the object exactly, nothing outside the mask
    alpha = m if feather <= 1 else torch.maximum(_blur(m, feather) * (m > 0), _erode(m, 1))
    shift = harmonize * (bg_pix.mean((2, 3), keepdim=True) - src_bg_mean)
    return (alpha * (obj_pix + shift) + (1 - alpha) * bg_pix).clamp(0, 1)


def _outside_mean(pix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = (1 - mask.clamp(0, 1))
    return (pix * w).sum((2, 3), keepdim=True) / w.sum((2, 3), keepdim=True).clamp_min(1e-6)


class Generator:
    """One interface for every generator: ``generate(src, src_mask, bg, bg_mask, prompts, seed)``
    -> ``(images (n,3,H,W) in [0, 1], object masks (n,1,H,W))``; ``describe()`` for the report."""
    name = "generator"

    def generate(self, src: torch.Tensor, src_mask: torch.Tensor, bg: torch.Tensor, bg_mask: torch.Tensor,
                 prompts: Sequence[str], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"generator": self.name}


class CompositeGenerator(Generator):
    name = "composite"

    def __init__(self, harmonize: float = 0.25, dilate: int = 1):
        self.harmonize, self.dilate = float(harmonize), int(dilate)

    def background(self, bg: torch.Tensor, bg_mask: torch.Tensor) -> torch.Tensor:
        return fill_holes(bg, _dilate((bg_mask > 0.5).float(), self.dilate))

    def generate(self, src, src_mask, bg, bg_mask, prompts, seed=0):
        filled = self.background(bg, bg_mask)
        return paste(src, src_mask, _outside_mean(src, src_mask), filled, self.harmonize), src_mask.clamp(0, 1)

    def describe(self) -> dict:
        return {"generator": self.name, "harmonize": self.harmonize, "dilate": self.dilate}


class DiffusersGenerator(Generator):
    """See the module docstring. ``folder``: a local diffusers inpainting pipeline."""
    name = "diffusers"

    def __init__(self, folder: Optional[Path], device, *, steps: int = 25, strength: float = 0.8,
                 guidance: float = 7.5, size: int = 0, negative: str = "", harmonize: float = 0.25,
                 batch: int = 4, log=None):
        try:
            import diffusers
        except ImportError:
            raise BadInput(missing_package("diffusers", "--generator diffusers", "diffusion")) from None
        if folder is None:
            raise BadInput("--generator diffusers needs --generator-model PATH (a local inpainting pipeline folder; "
                           "nothing is downloaded)")
        folder = Path(folder)
        check_generator_folder(folder)
        import json

        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            # an inpainting pipeline loads as itself (one class imported); others are converted
            if "Inpaint" in str(json.loads((folder / "model_index.json").read_text()).get("_class_name", "")):
                from diffusers import DiffusionPipeline as Loader
            else:
                from diffusers import AutoPipelineForInpainting as Loader
            new_kw = _version(diffusers.__version__) >= (0, 36)
            kw = {} if dtype == torch.float32 else {("dtype" if new_kw else "torch_dtype"): dtype}
            import transformers

            bars = (diffusers.utils.logging, transformers.utils.logging)
            for b in bars:                                           # the loading bars: stderr stays quiet
                b.disable_progress_bar()
            try:
                pipe = Loader.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, **kw)
            finally:
                for b in bars:
                    b.enable_progress_bar()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadInput(f"cannot load an inpainting pipeline from this folder ({type(e).__name__})", folder) from None
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.folder, self.steps, self.strength, self.guidance = folder, int(steps), float(strength), float(guidance)
        self.negative, self.batch = negative, int(batch)
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if hasattr(pipe, "vae") else 8
        self.size = int(size) or int(getattr(pipe.unet.config, "sample_size", 64)) * vae_scale
        self.size = max(vae_scale, self.size // vae_scale * vae_scale)
        self.composite = CompositeGenerator(harmonize)
        self.tokens: dict = {}
        if self.device.type != "cuda" and log is not None:
            log("warning: the diffusers generator runs on the CPU: a real Stable Diffusion inpainting model takes "
                "tens of seconds to minutes per image there")

    # ------------------------------------------------------------ textual inversion
    def invert(self, objects: dict, steps: int, lr: float = 5e-3, seed: int = 0) -> dict:
        """Learn one new token per class (``objects``: class phrase -> (n,3,H,W) masked object
        pixels) by the denoising loss, only the new embedding rows training. Returns phrase ->
        token; prompts then name the token instead of the phrase."""
        pipe = self.pipe
        tok, enc, unet, vae, sched = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler
        names = {}
        for phrase in objects:
            t = "<" + re.sub(r"\W+", "-", phrase).strip("-") + ">"
            if t not in tok.get_vocab():
                tok.add_tokens([t])
            names[phrase] = t
        enc.resize_token_embeddings(len(tok))
        emb = enc.get_input_embeddings()
        ids = {p: tok.convert_tokens_to_ids(t) for p, t in names.items()}
        init = tok("object", add_special_tokens=False).input_ids or [0]
        with torch.no_grad():
            for i in ids.values():
                emb.weight[i] = emb.weight[init[0]].clone()
        for module in (unet, vae, enc):
            module.requires_grad_(False)
        orig = emb.weight.detach().clone()
        new_rows = torch.tensor(sorted(ids.values()), device=emb.weight.device)
        emb.weight.requires_grad_(True)
        opt = torch.optim.AdamW([emb.weight], lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(int(seed))
        n_train = int(sched.config.get("num_train_timesteps", 1000))
        dtype = emb.weight.dtype
        latent_ch = int(vae.config.latent_channels)
        scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        phrases = list(objects)
        with torch.enable_grad():
            for s in range(int(steps)):
                ph = phrases[s % len(phrases)]
                imgs = objects[ph]
                pick = torch.randint(0, imgs.shape[0], (min(4, imgs.shape[0]),), generator=gen)
                x = F.interpolate(imgs[pick], size=(self.size, self.size), mode="bilinear", align_corners=False)
                x = (x * 2 - 1).to(self.device, dtype)
                with torch.no_grad():
                    lat = vae.encode(x).latent_dist.sample() * scale
                    noise = torch.randn(lat.shape, generator=gen).to(lat)
                    t = torch.randint(0, n_train, (lat.shape[0],), generator=gen).to(self.device)
                    noisy = sched.add_noise(lat, noise, t) if hasattr(sched, "add_noise") else lat + noise
                    if unet.config.in_channels == 2 * latent_ch + 1:   # inpainting UNet: all masked
                        blank = vae.encode(torch.zeros_like(x)).latent_dist.mode() * scale
                        noisy = torch.cat([noisy, torch.ones_like(noisy[:, :1]), blank], 1)
                text = tok([f"a photo of a {names[ph]}"] * lat.shape[0], padding="max_length",
                           max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
                hidden = enc(text.to(self.device))[0]
                pred = unet(noisy, t, encoder_hidden_states=hidden).sample
                loss = F.mse_loss(pred.float(), noise.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():             # only the new rows move
                    keep = torch.ones(emb.weight.shape[0], dtype=torch.bool, device=emb.weight.device)
                    keep[new_rows] = False
                    emb.weight[keep] = orig[keep]
        emb.weight.requires_grad_(False)
        self.tokens = names
        return names

    def generate(self, src, src_mask, bg, bg_mask, prompts, seed=0):
        init, obj = self.composite.generate(src, src_mask, bg, bg_mask, prompts, seed)
        h, w = init.shape[-2:]
        keep = _erode((obj > 0.5).float(), 1)
        repaint = 1.0 - keep
        dtype = self.pipe.unet.dtype
        outs = []
        for i in range(0, init.shape[0], self.batch):
            sl = slice(i, i + self.batch)
            im = F.interpolate(init[sl], size=(self.size, self.size), mode="bilinear", align_corners=False)
            mk = F.interpolate(repaint[sl], size=(self.size, self.size), mode="nearest")
            texts = [self._tokenised(p) for p in prompts[sl]]
            g = torch.Generator(self.device).manual_seed(int(seed) + i)
            res = self.pipe(prompt=texts, negative_prompt=[self.negative] * len(texts) if self.negative else None,
                            image=im.to(self.device, dtype), mask_image=mk.to(self.device, dtype),
                            height=self.size, width=self.size, strength=self.strength,
                            num_inference_steps=self.steps, guidance_scale=self.guidance, generator=g,
                            output_type="pt").images
            res = torch.as_tensor(res).float().cpu()
            if res.dim() == 4 and res.shape[-1] == 3 and res.shape[1] != 3:
                res = res.permute(0, 3, 1, 2)
            outs.append(F.interpolate(res, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1))
        out = torch.cat(outs)
        return keep * init + (1 - keep) * out, obj           # the object itself stays exactly as pasted

    def _tokenised(self, prompt: str) -> str:
        for phrase, t in self.tokens.items():
            prompt = prompt.replace(phrase, t)
        return prompt

    def describe(self) -> dict:
        return {"generator": self.name, "model": Path(self.folder).name, "steps": self.steps, "strength": self.strength,
                "guidance": self.guidance, "size": self.size, "device": str(self.device),
                "textual_inversion": sorted(self.tokens.values())}


def _version(text: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def make_generator(name: str, resources: dict, device, *, harmonize: float = 0.25, steps: int = 25,
                   strength: float = 0.8, guidance: float = 7.5, size: int = 0, negative: str = "",
                   log=None) -> Generator:
    """The generator ``name`` (one of :data:`GENERATORS`; BadInput otherwise)."""
    if name == "composite":
        return CompositeGenerator(harmonize)
    if name == "diffusers":
        return DiffusersGenerator(resources.get("generator_model"), device, steps=steps, strength=strength,
                                  guidance=guidance, size=size, negative=negative, harmonize=harmonize, log=log)
    raise BadInput(f"--generator must be one of {', '.join(GENERATORS)}, got {name!r}")


# ---------------------------------------------------------------------------- files
def save_png(path: Path, pix: torch.Tensor) -> None:
    """One (C,H,W) image in [0, 1] (C = 1 or 3) as PNG."""
    from PIL import Image

    arr = (pix.detach().clamp(0, 1).cpu() * 255).round().to(torch.uint8)
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def contact_sheet(path: Path, rows: Sequence[tuple], cell: int = 64, columns: int = 2) -> None:
    """A PNG grid: each entry ``(source, background, generated, kept)`` (pixel tensors, bool)
    shown as three cells side by side, the generated one framed green (kept) or red (pruned)."""
    from PIL import Image, ImageDraw

    if not rows:
        return
    nrow = math.ceil(len(rows) / columns)
    pad = 4
    tile_w = 3 * cell + 2 * pad
    sheet = Image.new("RGB", (columns * (tile_w + 3 * pad), nrow * (cell + 2 * pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def im(t):
        arr = (t.detach().clamp(0, 1).cpu() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(arr).resize((cell, cell), Image.NEAREST)

    for k, (s, b, g, kept) in enumerate(rows):
        x0 = (k % columns) * (tile_w + 3 * pad) + pad
        y0 = (k // columns) * (cell + 2 * pad) + pad
        for j, t in enumerate((s, b, g)):
            sheet.paste(im(t), (x0 + j * (cell + pad), y0))
        gx = x0 + 2 * (cell + pad)
        draw.rectangle([gx - 2, y0 - 2, gx + cell + 1, y0 + cell + 1], outline=(0, 160, 0) if kept else (200, 0, 0),
                       width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


__all__ = ["GENERATORS", "GENERATOR", "GENERATOR_MODEL", "PROMPTS", "Prompts", "load_prompts", "fill_holes", "paste", "Generator", "CompositeGenerator",
           "DiffusersGenerator", "make_generator", "save_png", "contact_sheet"]
