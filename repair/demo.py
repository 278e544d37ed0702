"""A self-contained, download-free shortcut demo ("procedural Waterbirds").

``build_demo`` draws a small Waterbirds-like image task, trains a small timm
model on it with plain ERM on the CPU and writes

    out_dir/model/              timm hub folder (config.json + model.safetensors)
    out_dir/data/{train,val,test}/
        landbird/00000.png ...  class-per-subfolder tree
        waterbird/00001.png ...
        metadata.csv            img_filename,y,place   (Waterbirds columns)
    out_dir/repair-demo.json    the marker that says the folder is a demo and lists the files it wrote
                                (what ``--force`` may replace)

The task: a "bird" (the core feature, which decides the class) drawn over a
background "place" (the spurious attribute). Landbirds are solid blobs
(ellipses / rounded shapes), waterbirds are hollow rings, each with random
position, size, rotation and colour; land backgrounds are blotchy greens and
browns, water backgrounds blue/teal with horizontal waves. The colour of the
background is far easier to pick up than the shape of a small object, so with
95% of the training images having the matching background an ERM model leans on
the place and fails on the minority groups (landbird on water, waterbird on
land), while its penultimate features still carry the shape: a re-fitted last
layer recovers most of the worst-group accuracy.

Every split has 75% landbirds (Waterbirds: ~77%). In train the place agrees with
the class in 95% of each class; validation (the repair set) and test have the
place balanced within each class, as in the Waterbirds protocol. So the rare
waterbird-on-land group is the one ERM gets wrong most.

``size="tiny"`` is a seconds-long version for tests (fewer images and epochs,
and thinner rings so the shape is learnt at all from so little data).

Nothing half-built: the images are drawn and the model trained in memory, then the folder is
written under a temporary name beside ``out_dir`` and renamed into place (:func:`repair.io.atomic_output`);
a failure or an interrupt leaves no folder behind. ``out_dir`` may exist only as an empty folder,
or, with ``force``, as a previous demo: a folder holding the demo's marker and nothing but the files
the marker lists, at their sizes (:func:`check_out`).
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import check_seed
from .errors import BadInput

CLASS_NAMES = ("landbird", "waterbird")
PLACE_NAMES = ("land", "water")

ARCH = "resnet18"
# narrow resnet18: a quarter of the default width keeps CPU training to seconds per epoch
MODEL_ARGS = {"channels": [16, 32, 64, 128]}
IMG_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

BIRD_RADIUS = (0.17, 0.26)     # outer radius of the bird, as a fraction of the image side
RING_THICK = (0.46, 0.64)      # waterbird ring thickness / radius: larger = smaller hole = harder
PIXEL_NOISE = 0.03
LANDBIRD_FRAC = 0.75          # class balance of every split (Waterbirds has ~77% landbirds)
#: the file every demo folder holds, written with it (:func:`build_demo`): what proves a folder is one
#: the demo wrote, so that ``--force`` replaces it (:func:`check_out`)
DEMO_MARKER = "repair-demo.json"
#: the kind the marker names (a JSON object ``{"kind": DEMO_KIND, ...}``)
DEMO_KIND = "repair demo folder"
#: what a demo folder holds: the demo's own entries (``repair demo`` adds ``model-repaired``)
DEMO_ENTRIES = ("model", "data", "model-repaired", DEMO_MARKER)
#: the largest marker read (it lists every file of the demo: ~0.3 MB for the default size)
MARKER_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class _Spec:
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    align: float = 0.95
    ring_thick: tuple[float, float] = RING_THICK


SPECS = {
    "default": _Spec(n_train=3000, n_val=1000, n_test=2000, epochs=7),
    "tiny": _Spec(n_train=1000, n_val=200, n_test=400, epochs=8, ring_thick=(0.2, 0.35)),
}


@dataclass
class DemoArtifacts:
    model_dir: Path
    train_dir: Path
    val_dir: Path
    test_dir: Path
    erm_train_seconds: float


# ----------------------------------------------------------------------------------------------
# procedural images


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random ``cells x cells`` grid, bilinearly upsampled."""
    g = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size, endpoint=False) + cells / (2.0 * size)
    i0 = np.clip(np.floor(t).astype(int), 0, cells - 1)
    f = t - i0
    rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]          # (size, cells+1)
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


_LAND_COLOURS = np.array([[0.30, 0.50, 0.22], [0.50, 0.40, 0.24], [0.45, 0.48, 0.20], [0.36, 0.42, 0.28]])
_WATER_COLOURS = np.array([[0.18, 0.34, 0.62], [0.16, 0.46, 0.56], [0.24, 0.38, 0.70], [0.14, 0.28, 0.50]])


def _background(rng: np.random.Generator, place: int, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    if place == 0:  # land: blotchy earth / grass
        base = _LAND_COLOURS[rng.integers(len(_LAND_COLOURS))] + rng.normal(0, 0.04, 3)
        blotch = _smooth_noise(rng, s, int(rng.integers(3, 6)))
        img = base[None, None, :] * (1.0 + 0.25 * blotch[:, :, None])
        img += 0.05 * rng.standard_normal((s, s, 1)) * np.array([0.8, 1.0, 0.6])
    else:  # water: horizontal waves
        base = _WATER_COLOURS[rng.integers(len(_WATER_COLOURS))] + rng.normal(0, 0.04, 3)
        freq = rng.uniform(0.25, 0.6)
        wave = np.sin(freq * yy + rng.uniform(0, 2 * np.pi) + 0.6 * np.sin(0.2 * xx + rng.uniform(0, 6.3)))
        img = base[None, None, :] * (1.0 + 0.18 * wave[:, :, None])
        img += 0.12 * _smooth_noise(rng, s, 3)[:, :, None] * base[None, None, :]
    return img


def _bird_mask(rng: np.random.Generator, y: int, s: int, ring_thick: tuple[float, float]) -> np.ndarray:
    r = rng.uniform(*BIRD_RADIUS) * s                       # outer radius in pixels
    margin = r + 1.0
    cx, cy = rng.uniform(margin, s - margin, size=2)
    th = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5
    u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
    v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
    aspect = rng.uniform(0.65, 1.0)
    d = np.sqrt((u / r) ** 2 + (v / (r * aspect)) ** 2)   # elliptical radius, 1 at the outline
    if y == 0:   # landbird: solid blob
        return d <= 1.0
    thick = rng.uniform(*ring_thick)                         # waterbird: hollow ring
    return (d <= 1.0) & (d >= 1.0 - thick)


def _bird_colour(rng: np.random.Generator) -> np.ndarray:
    import colorsys

    h = rng.uniform(0, 1)
    sat = rng.uniform(0.3, 0.9)
    val = rng.uniform(0.55, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, sat, val))


def render(rng: np.random.Generator, y: int, place: int, s: int = IMG_SIZE,
           ring_thick: tuple[float, float] = RING_THICK) -> np.ndarray:
    """One (s, s, 3) uint8 image of class ``y`` on background ``place``."""
    img = _background(rng, place, s)
    mask = _bird_mask(rng, y, s, ring_thick)
    col = _bird_colour(rng)
    shade = 1.0 + 0.08 * rng.standard_normal((s, s, 1))
    img = np.where(mask[:, :, None], col[None, None, :] * shade, img)
    img += rng.normal(0, PIXEL_NOISE, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _split_labels(rng: np.random.Generator, n: int, align: Optional[float]) -> tuple[np.ndarray, np.ndarray]:
    """Labels with a ``LANDBIRD_FRAC`` share of landbirds; ``align`` = P(place == class) within each
    class, or None for the place balanced within each class."""
    n_land = int(round(n * LANDBIRD_FRAC))
    y = np.repeat([0, 1], [n_land, n - n_land])
    place = np.empty(n, dtype=np.int64)
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        k = len(idx)
        n_same = int(round(k * align)) if align is not None else k - k // 2
        place[idx] = np.where(np.arange(k) < n_same, c, 1 - c)
    perm = rng.permutation(n)
    return y[perm].astype(np.int64), place[perm]


def _write_split(split_dir: Path, images: np.ndarray, y: np.ndarray, place: np.ndarray) -> None:
    from PIL import Image

    for name in CLASS_NAMES:
        (split_dir / name).mkdir(parents=True, exist_ok=True)
        for old in (split_dir / name).glob("*.png"):   # a previous build's images
            old.unlink()
    rows = []
    for i in range(len(y)):
        rel = f"{CLASS_NAMES[y[i]]}/{i:05d}.png"
        Image.fromarray(images[i]).save(split_dir / rel)
        rows.append((rel, int(y[i]), PLACE_NAMES[place[i]]))
    with (split_dir / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["img_filename", "y", "place"])
        w.writerows(rows)


def make_split(seed: int, n: int, align: Optional[float],
               ring_thick: tuple[float, float] = RING_THICK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y, place = _split_labels(rng, n, align)
    images = np.stack([render(rng, int(y[i]), int(place[i]), ring_thick=ring_thick) for i in range(n)])
    return images, y, place


# ----------------------------------------------------------------------------------------------
# ERM training


def to_tensor(images: np.ndarray):
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), exactly timm's eval transform for
    ``pretrained_cfg`` below (resize/crop are identities at crop_pct 1.0 and the native size)."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def create_model(model_args: Optional[dict] = None):
    import timm

    return timm.create_model(ARCH, pretrained=False, num_classes=len(CLASS_NAMES),
                             **(MODEL_ARGS if model_args is None else model_args))


def train_erm(images: np.ndarray, y: np.ndarray, spec: _Spec, seed: int,
              progress: Callable[[str], None], model_args: Optional[dict] = None):
    """Plain ERM (cross-entropy, AdamW, one-cycle schedule, horizontal flips), seeded."""
    from . import threads

    # One intra-op thread: the model is tiny, so extra threads buy little when the CPU is idle and
    # cost a lot (spinning OpenMP barriers) when other processes share the cores; a fixed thread
    # count also keeps the float reductions, hence the trained weights, the same on every machine.
    with threads.limited(1):
        return _train_erm(images, y, spec, seed, progress, model_args)


def _train_erm(images: np.ndarray, y: np.ndarray, spec: _Spec, seed: int,
               progress: Callable[[str], None], model_args: Optional[dict] = None):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = create_model(model_args)
    x_all = to_tensor(images)
    y_all = torch.from_numpy(y)
    n = len(y_all)
    steps_per_epoch = (n + spec.batch_size - 1) // spec.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch,
                                                pct_start=0.15)
    model.train()
    for epoch in range(spec.epochs):
        perm = torch.randperm(n, generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        total, correct, loss_sum = 0, 0, 0.0
        for k in range(steps_per_epoch):
            idx = perm[k * spec.batch_size:(k + 1) * spec.batch_size]
            xb = x_all[idx]
            fb = flip[idx]
            xb = torch.where(fb.view(-1, 1, 1, 1), xb.flip(3), xb)
            yb = y_all[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        progress(f"ERM epoch {epoch + 1}/{spec.epochs}: loss {loss_sum / total:.3f}, "
                 f"train acc {correct / total:.3f}")
    model.eval()
    return model


def save_model(model, model_dir: Path, model_args: Optional[dict] = None) -> None:
    from .adapters.timm_adapter import save_timm_folder

    data_config = {
        "input_size": [3, IMG_SIZE, IMG_SIZE],
        "interpolation": "bilinear",
        "mean": list(MEAN),
        "std": list(STD),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    cfg = save_timm_folder(model, model_dir, label_names=CLASS_NAMES, data_config=data_config,
                           model_args=dict(MODEL_ARGS if model_args is None else model_args))
    cfg_path = model_dir / "config.json"
    # the architecture's default pretrained_cfg names its ImageNet weights; these are not those
    for key in ("tag", "hf_hub_id", "origin_url", "paper_ids", "paper_name", "notes", "license"):
        cfg["pretrained_cfg"].pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


# ----------------------------------------------------------------------------------------------


def _is_marker(path: Path) -> bool:
    """Whether ``path`` is a demo's marker file (:data:`DEMO_MARKER`) as :func:`build_demo` writes it:
    a regular file (not a link) holding a JSON object of kind :data:`DEMO_KIND`."""
    return _marker_doc(path) is not None


def _marker_doc(path: Path) -> Optional[dict]:
    """The marker's JSON object when ``path`` is a demo's marker (:func:`_is_marker`), else None."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        if path.stat().st_size > MARKER_MAX_BYTES:
            return None
        from .io import parse_json

        doc = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == DEMO_KIND else None


def demo_files(folder: Path) -> dict:
    """What the marker lists (:func:`write_marker`) and ``--force`` compares with: every entry under
    ``folder`` but the marker and folders, as its path relative to ``folder`` (``/``-separated) ->
    its size in bytes, or -1 for a symbolic link or special file (never one the demo writes).
    Folders are not descended into through links (:func:`repair.io.folder_entries`)."""
    from .io import folder_entries

    return folder_entries(folder, skip=DEMO_MARKER)


def check_out(out_dir, *, force: bool = False, flag: str = "--out") -> Path:
    """Check, before any work, that the demo can be written to ``out_dir``: it does not exist, or
    is an empty folder, or (``force``) a previous demo folder: one that holds the demo's marker
    (:data:`DEMO_MARKER`, written with every demo) and nothing but a demo's entries
    (:data:`DEMO_ENTRIES`, and temporary folders of ours), every file in them one the marker lists at
    its size (:func:`demo_files`: a user's file put inside the demo's data folder is never deleted;
    a demo file removed is fine); its parent is a folder a file can be
    created in (:func:`repair.rules.check_writable`). Any other folder is never replaced, whatever
    ``force`` says: names that merely look like a demo's prove nothing (fail closed; a demo folder
    written before the marker existed is refused too). :class:`BadInput` naming ``flag`` and the path."""
    from .io import _temp_name_re, check_reachable
    from .rules import check_writable

    out = Path(out_dir)
    check_reachable(out)            # a folder above it that cannot be entered: said as every output says it
    if out.is_symlink():
        raise BadInput(f"{flag}: is a symbolic link; name the folder itself", out)
    if out.exists():
        if not out.is_dir():
            raise BadInput(f"{flag}: is a file, not a folder; name a new folder for the demo", out)
        try:
            entries = sorted(p.name for p in out.iterdir())
        except OSError as e:
            raise BadInput(f"{flag}: cannot read the folder ({e.strerror or e})", out) from None
        # what --force could not rebuild is said first (the advice to use it would fail), then --force
        ours = [_temp_name_re(n) for n in DEMO_ENTRIES]
        foreign = [n for n in entries if n not in DEMO_ENTRIES and not any(r.fullmatch(n) for r in ours)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise BadInput(f"{flag}: the folder holds more than a demo ({shown}); --force rebuilds only a "
                           f"demo folder (it holds {', '.join(DEMO_ENTRIES)}); choose another folder", out)
        if entries:
            doc = _marker_doc(out / DEMO_MARKER)
            if doc is None:
                raise BadInput(f"{flag}: the folder is not one repair demo wrote (it has no {DEMO_MARKER}, which "
                               "every demo folder holds), so --force does not replace it; if it is an older demo, "
                               "delete it yourself, or choose another folder", out)
            listed = doc.get("files")
            if not isinstance(listed, dict):
                raise BadInput(f"{flag}: the folder's {DEMO_MARKER} does not list the demo's files (an older "
                               "repair demo wrote it), so --force does not replace it; delete it yourself, or "
                               "choose another folder", out)
            temps = {n for n in entries if any(r.fullmatch(n) for r in ours) and n not in DEMO_ENTRIES}
            for rel, size in sorted(demo_files(out).items()):
                if rel.split("/", 1)[0] in temps:
                    continue
                if size < 0 or listed.get(rel) != size:
                    why = "is a link or special file" if size < 0 else (
                        "is not a file the demo wrote" if rel not in listed else "changed since the demo wrote it")
                    raise BadInput(f"{flag}: {rel} {why}; --force replaces a demo folder only while it holds "
                                   "nothing but what the demo wrote; move it out, or choose another folder", out)
        if entries and not force:
            raise BadInput("demo folder exists and is not empty (use --force to rebuild)", out)
    # verified above: new, an empty folder or a previous demo (its marker), which the general rule of what
    # --force replaces (an empty folder, or a model output repair wrote) would not know as repair's
    return check_writable(out, force=True, flag=flag, kind="folder", owned=True)


def write_marker(folder: Path, *, seed: int, size: str, model_args: dict) -> None:
    """The demo's marker file (:data:`DEMO_MARKER`) in ``folder``: what :func:`check_out` takes as the
    proof that a folder is a demo the demo wrote (so ``--force`` may replace it)."""
    from . import __version__

    doc = {"kind": DEMO_KIND, "note": "written by repair demo; repair demo --force replaces this folder "
                                      "only while it holds this file and nothing but the files listed here, "
                                      "at these sizes",
           "version": __version__, "seed": seed, "size": size, "model_args": model_args,
           "files": demo_files(folder)}
    (Path(folder) / DEMO_MARKER).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def relist_marker(folder: Path) -> None:
    """The marker of the demo in ``folder`` rewritten to list every file there now (``repair demo``
    calls it once the repaired model is written beside the demo's)."""
    doc = _marker_doc(Path(folder) / DEMO_MARKER)
    if doc is None:
        raise ValueError(f"{folder} holds no demo marker")
    write_marker(folder, seed=doc["seed"], size=doc["size"], model_args=doc["model_args"])


def build_demo(out_dir: Path, *, seed: int = 0, size: str = "default",
               progress: Optional[Callable[[str], None]] = None,
               model_args: Optional[dict] = None, force: bool = False) -> DemoArtifacts:
    """Draw the demo task, train the ERM model and write both under ``out_dir`` (renamed into place
    at the end: nothing is left on a failure). ``out_dir`` must not exist or be an empty folder;
    ``force``: a previous demo there is replaced (:func:`check_out`). ``model_args``: timm
    arguments of the architecture (default ``MODEL_ARGS``; e.g. another ``channels`` list for a
    narrower or wider model)."""
    from .io import atomic_output

    model_args = dict(MODEL_ARGS if model_args is None else model_args)
    if size not in SPECS:
        raise ValueError(f"unknown demo size {size!r}; known: {', '.join(SPECS)}")
    seed = check_seed(seed, "seed")
    out_dir = check_out(out_dir, force=force, flag="demo folder")
    import torch

    spec = SPECS[size]
    say = progress or (lambda msg: None)
    say(f"drawing {spec.n_train} train / {spec.n_val} val / {spec.n_test} test images "
        f"({IMG_SIZE}x{IMG_SIZE}, seed {seed})")
    splits = {
        "train": make_split(seed * 1000 + 1, spec.n_train, spec.align, spec.ring_thick),
        "val": make_split(seed * 1000 + 2, spec.n_val, None, spec.ring_thick),
        "test": make_split(seed * 1000 + 3, spec.n_test, None, spec.ring_thick),
    }

    say(f"training {ARCH} {model_args} with ERM for {spec.epochs} epochs on the CPU")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        model = train_erm(splits["train"][0], splits["train"][1], spec, seed, say, model_args)
    train_s = time.perf_counter() - t0
    say(f"ERM training took {train_s:.1f}s")
    # checked above (an existing out_dir is empty, or a demo replaced with force)
    with atomic_output(out_dir, force=True, is_dir=True, log=progress, owned=True) as staged:
        for name, (images, y, place) in splits.items():
            _write_split(staged / "data" / name, images, y, place)
        (staged / "model").mkdir()
        save_model(model, staged / "model", model_args)
        write_marker(staged, seed=seed, size=size, model_args=model_args)
    data_dir, model_dir = out_dir / "data", out_dir / "model"
    say(f"wrote {model_dir} and {data_dir}")
    return DemoArtifacts(model_dir=model_dir, train_dir=data_dir / "train", val_dir=data_dir / "val",
                         test_dir=data_dir / "test", erm_train_seconds=train_s)


def run_demo(out_dir, *, seed: int = 0, size: str = "default", recipe: str = "auto", force: bool = False,
             log: Optional[Callable[[str], None]] = None) -> dict:
    """``repair demo``: build the task and its ERM model (:func:`build_demo`), evaluate it on the test
    split, repair it with ``recipe`` from the validation split without group labels, measured on the
    test split. Every option and the output place are checked before any work (:func:`check_out`,
    the recipe loaded); the whole folder is written under a temporary name and renamed into place at
    the end, so a failure or an interrupt leaves nothing. Returns the JSON document of the command:
    the paths, ``erm_test`` (the ERM model's evaluation) and ``fix`` (the repair's report), every path
    as it is after the rename."""
    import dataclasses
    import os

    from .errors import BadInput
    from .io import atomic_output
    from .recipes import group_labels_needed, load_recipe
    from .rules import Protected

    say = log or (lambda msg: None)
    check_seed(seed)
    if size not in SPECS:
        raise BadInput(f"--size must be {' or '.join(SPECS)}, got {size!r}")
    out = check_out(out_dir, force=force)      # new, empty or (force) a previous demo; writable
    used = load_recipe(recipe)                 # an unknown recipe or a bad setting: now, not after training
    why = group_labels_needed(used)
    if why:
        raise BadInput(f"{why}, and the demo repairs without them (its groups are for the figures only)",
                       used.files[0] if used.files else None)
    Protected().add_files(used.files, "recipe (--recipe)").check(out)

    from .api import RuntimeOptions, evaluate_model
    from .data import DataOptions
    from .pipeline import FixOptions, fix_model

    fix_opts = FixOptions(recipe=recipe, seed=seed, force=True)
    with atomic_output(out, force=True, is_dir=True, log=log, owned=True) as staged:   # checked by check_out
        def staged_say(msg: str) -> None:      # progress names the places as they will be
            say(str(msg).replace(str(staged), str(out)))

        art = build_demo(staged, seed=seed, size=size, progress=staged_say)
        rt = RuntimeOptions(progress=False)
        test = evaluate_model(art.model_dir, art.test_dir, data_opts=DataOptions(group_by="place"), runtime=rt)
        staged_say("repairing with the validation split as repair set, WITHOUT its group labels ...")
        fixed = fix_model(art.model_dir, art.val_dir, Path(art.model_dir).with_name("model-repaired"), runtime=rt,
                          options=dataclasses.replace(fix_opts, eval_data=str(art.test_dir), eval_group_by="place"),
                          log=staged_say)
        relist_marker(staged)                  # the repaired model is the demo's too
        doc = {"model": str(art.model_dir), "repaired_model": fixed["output"], "train": str(art.train_dir),
               "val": str(art.val_dir), "test": str(art.test_dir), "erm_train_seconds": art.erm_train_seconds,
               "erm_test": test, "fix": fixed.report}

    def moved(v):                              # the paths the staged run saw, as they are now
        if isinstance(v, dict):
            return {k: moved(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(moved(x) for x in v)
        if isinstance(v, (str, Path)) and (str(v) == str(staged) or str(v).startswith(str(staged) + os.sep)):
            return type(v)(str(out) + str(v)[len(str(staged)):])
        return v

    return moved(doc)

