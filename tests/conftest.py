"""Tiny models and data built on the fly: nothing is downloaded."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one torch thread per worker when the suite runs on several (README: `-n 2`): the workers share the
# machine's cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLASSES = ["cat", "dog", "fox"]


def run_cli(*args) -> tuple[int, str, str]:
    """``repair ARGS`` in this process (typer's CliRunner): (exit code, stdout, stderr). An
    exception that escapes the command (not its exit) is raised here."""
    from typer.testing import CliRunner

    from repair_cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def one_line_naming(code: int, err: str, path, *words: str) -> str:
    """A refusal as the CLI must give it: exit 2, one line on stderr naming ``path`` and ``words``."""
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert str(path) in lines[0], lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("REPAIR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "embcache"))


def make_timm_folder(path: Path, arch: str = "test_resnet", classes=CLASSES, size: int = 32, seed: int = 0) -> Path:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=len(classes))
    save_for_hf(model, str(path), model_config={"label_names": list(classes)}, safe_serialization=True)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pretrained_cfg"].update({"input_size": [3, size, size], "crop_pct": 1.0, "crop_mode": "center"})
    cfg_path.write_text(json.dumps(cfg, indent=2))
    for extra in ("pytorch_model.bin",):
        if (path / extra).exists():
            (path / extra).unlink()
    return path


def make_deployed_onnx(path: Path, dynamic_batch: bool = True, seed: int = 3):
    """A third-party style ONNX classifier at ``path``: a tiny timm ``test_resnet`` (3 classes,
    32 x 32 inputs) exported with plain ``torch.onnx.export`` (TorchScript exporter), no metadata.
    Returns ``(path, the torch module)``."""
    import warnings

    import timm

    torch.manual_seed(seed)
    m = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    axes = {"input": {0: "n"}, "output": {0: "n"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(2, 3, 32, 32),), str(path), input_names=["input"],
                          output_names=["output"], dynamic_axes=axes, dynamo=False)
    return path, m


def make_images(root: Path, n_per_class: int = 6, classes=CLASSES, size: int = 36, seed: int = 0,
                with_metadata: bool = True) -> Path:
    """Class subfolders of PNGs and a metadata.csv with a 'place' attribute."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            arr[..., ci % 3] = 200  # class-coloured channel: learnable signal
            place = "water" if (i % 2) else "land"
            if place == "water":
                arr[:4] = [0, 0, 255]
            rel = f"{c}/{i:03d}.png"
            Image.fromarray(arr).save(root / rel)
            rows.append({"img_filename": rel, "y": c, "place": place})
    if with_metadata:
        with open(root / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
            w.writeheader()
            w.writerows(rows)
    return root


WORDS = ["good", "bad", "great", "awful", "not", "movie", "plot", "fun", "boring", "never", "the", "a", "was", "is"]


def factory_weights(folder: Path, module: str, source: str, monkeypatch, build: str = "build") -> Path:
    """A ``--factory`` module for a test: ``source`` written as ``folder/module.py``, importable from this
    process (``folder`` on ``sys.path``, a stale import of that name dropped), and the state dict of its
    ``build()``, built under seed 0, saved as ``folder/w.safetensors`` (returned)."""
    import importlib
    import sys

    from safetensors.torch import save_file

    (folder / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop(module, None)
    importlib.invalidate_caches()
    torch.manual_seed(0)
    save_file(getattr(importlib.import_module(module), build)().state_dict(), str(folder / "w.safetensors"))
    return folder / "w.safetensors"


def make_bert_folder(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5: ``vocab_file=`` is silently ignored by the fast tokenizer (every word becomes
    # [UNK]); the vocabulary must be given as a mapping
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, initializer_range=0.2,
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def bert_onnx(model, path: Path, example: tuple, dynamic_batch: bool = False) -> Path:
    """A transformers BERT classifier ``model`` exported to ``path`` as a plain ONNX graph of its logits
    (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``; opset 17, TorchScript exporter) with
    the sequence length of ``example`` fixed, and a dynamic batch axis if asked."""
    import warnings

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "n"} for n in [*names, "logits"]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model).eval(), tuple(example), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, dynamo=False, opset_version=17)
    return Path(path)


def write_rows(path: Path, rows: list[dict], fieldnames=None) -> Path:
    """``rows`` (dicts) as a CSV table at ``path`` (columns: ``fieldnames``, else the first row's keys)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def texts_with_upper_copies(src: Path, dst: Path) -> list[dict]:
    """``dst``: the CSV ``src``'s rows and then each again in upper case (texts a lowercasing tokenizer
    reads as the same tokens); returns ``src``'s rows."""
    import csv

    with open(src) as f:
        rows = list(csv.DictReader(f))
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + [{**r, "text": r["text"].upper()} for r in rows])
    return rows


def make_texts(path: Path, n: int = 40, seed: int = 0, fmt: str = "csv") -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        neg_word = bool(rng.random() < 0.5)
        # a few filler words in random order keep the sentences (and so the embeddings) varied
        filler = [str(w) for w in rng.choice(["the", "movie", "plot", "was", "is", "a", "fun"], size=int(rng.integers(2, 5)))]
        words = filler + (["not"] if neg_word else []) + [("great" if pos else "awful")]
        rows.append({"text": " ".join(words), "label": "positive" if pos else "negative",
                     "negation": "yes" if neg_word else "no"})
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label", "negation"])
            w.writeheader()
            w.writerows(rows)
    return path


def make_zoo_parts(root: Path, with_test: bool = False) -> Path:
    """What the zoo tests' manifests name: two tiny timm models (``m0``, ``m1``), a small image repair set
    (``val``) and, ``with_test``, a held-out set (``test``)."""
    make_timm_folder(root / "m0", seed=0)
    make_timm_folder(root / "m1", seed=1)
    make_images(root / "val", n_per_class=6, seed=1)
    if with_test:
        make_images(root / "test", n_per_class=6, seed=2)
    return root


@pytest.fixture(scope="session")
def timm_folder(tmp_path_factory) -> Path:
    return make_timm_folder(tmp_path_factory.mktemp("models") / "tiny-timm")


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory) -> Path:
    return make_bert_folder(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    return make_texts(tmp_path_factory.mktemp("data") / "texts.csv")
