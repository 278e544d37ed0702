"""The model-zoo benchmark: ``repair zoo`` locally and on a local 2-worker Ray, same zoo.

    python -m bench.zoo [--work-dir bench/_work/zoo] [--workers 2] [--rebuild]

1. Builds a zoo of small real checkpoints (once; kept in the work dir): twelve demo models
   (:func:`repair.demo.build_demo`, ``size="tiny"``: six seeds x two widths of the narrow resnet18,
   each ERM-trained on its own procedural Waterbirds draw) and one ``transformers`` text model (a
   tiny BERT trained briefly on sentences whose sentiment word decides the label while a marker
   word goes with the label in 95% of the training sentences: a planted shortcut).
2. Writes the manifest (label-free repair with ``recipe: auto``; figures and the gate,
   worst-group accuracy >= 60%, on each model's test split with its group column).
3. Runs ``repair zoo`` as a user would, in a subprocess, cold (empty embedding cache, no
   journal): locally (in-process, one model at a time) and with ``--ray auto --workers 2``;
   wall time of each command.
4. Checks the per-model results are identical (method chosen, every before/after figure, and the
   sha256 of the output tensors).
5. Opens the local run's ``zoo-report.html`` in headless Chromium and saves the screenshot as
   ``docs/zoo-report.png``.
6. Writes ``bench/ZOO.md``.

Every model runs with one CPU thread in both executors (``--cpus-per-model 1``), which is what
makes the results identical bit for bit.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2, 3, 4, 5)
WIDTHS = {"w16": [16, 32, 64, 128], "w8": [8, 16, 32, 64]}
GATE = 0.6


# ------------------------------------------------------------------ the zoo
def build_zoo(zoo: Path, rebuild: bool = False, log=print) -> list[dict]:
    """The zoo's models (each built once; ``rebuild``: all again): name, checkpoint, data, eval,
    group column."""
    from repair import threads
    from repair.demo import build_demo

    if rebuild and zoo.exists():
        shutil.rmtree(zoo)
    zoo.mkdir(parents=True, exist_ok=True)
    models = []
    for seed in SEEDS:
        for wname, channels in WIDTHS.items():
            name = f"demo-s{seed}-{wname}"
            if not (zoo / name / "model" / "model.safetensors").exists():
                t0 = time.perf_counter()
                art = build_demo(zoo / name, seed=seed, size="tiny", model_args={"channels": channels})
                log(f"built {name} in {time.perf_counter() - t0:.1f}s (ERM {art.erm_train_seconds:.1f}s)")
            models.append({"name": name, "checkpoint": f"{name}/model", "data": f"{name}/data/val",
                           "eval": f"{name}/data/test", "eval_group_by": "place"})
    if not (zoo / "bert-marker" / "model" / "model.safetensors").exists():
        shutil.rmtree(zoo / "bert-marker", ignore_errors=True)
        t0 = time.perf_counter()
        with threads.limited(1):
            build_text_model(zoo / "bert-marker")
        log(f"built bert-marker in {time.perf_counter() - t0:.1f}s")
    models.append({"name": "bert-marker", "checkpoint": "bert-marker/model", "data": "bert-marker/val.csv",
                   "eval": "bert-marker/test.csv", "eval_group_by": "marker"})
    return models


POS = ["good", "great", "fun", "superb", "lovely", "charming"]
NEG = ["bad", "awful", "boring", "dull", "poor", "clumsy"]
FILLER = ["the", "movie", "film", "plot", "acting", "story", "was", "is", "a", "very", "quite", "and"]
MARKERS = {"positive": "indeed", "negative": "however"}
NEGATION = 0.05         # share of sentences whose sentiment word is negated ("not good")


def _sentences(rng, n: int, align: float) -> list[dict]:
    """Sentiment from the sentiment word (flipped by "not"); a marker word that agrees with the
    label with probability ``align`` (0.5: no shortcut)."""
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        negated = rng.random() < NEGATION
        word_pos = (label == "positive") != negated
        word = str(rng.choice(POS if word_pos else NEG))
        agree = rng.random() < align
        marker = MARKERS[label] if agree else MARKERS["negative" if label == "positive" else "positive"]
        fill = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(2, 5)))]
        words = fill[:1] + ["not"] * negated + [word] + fill[1:]
        pos = int(rng.integers(0, len(words) + 1))
        words.insert(pos, marker)
        rows.append({"text": " ".join(words), "label": label, "marker": marker})
    rng.shuffle(rows)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label", "marker"])
        w.writeheader()
        w.writerows(rows)


def build_text_model(folder: Path, seed: int = 0, steps: int = 150, lr: float = 2e-3) -> None:
    """A tiny BERT (2 layers, hidden 32) trained briefly on the marker shortcut."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    splits = {"train": _sentences(rng, 2000, 0.95), "val": _sentences(rng, 400, 0.5),
              "test": _sentences(rng, 800, 0.5)}
    for name, rows in splits.items():
        _write_csv(folder / f"{name}.csv", rows)
    model_dir = folder / "model"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not", *POS, *NEG, *FILLER, *MARKERS.values()]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(model_dir / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(cfg)
    texts = [r["text"] for r in splits["train"]]
    y = torch.tensor([1 if r["label"] == "positive" else 0 for r in splits["train"]])
    enc = tok(texts, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (32,), generator=gen)
        out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=y[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tok.save_pretrained(str(model_dir))


# ------------------------------------------------------------------ runs
def write_manifest(path: Path, zoo: Path, models: list[dict], output_dir: Path) -> None:
    import yaml

    rel = lambda p: os.path.relpath(zoo / p, path.parent)  # noqa: E731
    doc = {"defaults": {"recipe": "auto", "gate": GATE, "gate_metric": "worst_group",
                        "output_dir": os.path.relpath(output_dir, path.parent)},
           "models": [{"name": m["name"], "checkpoint": rel(m["checkpoint"]), "data": rel(m["data"]),
                       "eval": rel(m["eval"]), "eval_group_by": m["eval_group_by"]} for m in models]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def run_zoo_cmd(work: Path, tag: str, zoo: Path, models: list[dict], extra: list[str], log=print) -> dict:
    for p in (work / f"out-{tag}", work / f"report-{tag}", work / f"cache-{tag}"):
        shutil.rmtree(p, ignore_errors=True)
    (work / f"out-{tag}").mkdir()
    manifest = work / f"zoo-{tag}.yaml"
    write_manifest(manifest, zoo, models, work / f"out-{tag}")
    cmd = [sys.executable, "-m", "repair_cli.main", "zoo", str(manifest), "--out-dir", str(work / f"report-{tag}"),
           "--cache-dir", str(work / f"cache-{tag}"), "--cpus-per-model", "1", "--json", *extra]
    log("$ " + " ".join(cmd[2:]))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        raise SystemExit(f"repair zoo ({tag}) exited {r.returncode}:\n{r.stderr[-3000:]}")
    doc = json.loads(r.stdout)
    log(f"{tag}: exit {r.returncode}, {wall:.1f}s")
    return {"doc": doc, "wall": wall, "exit": r.returncode, "stderr": r.stderr, "load": load}


def comparable(doc: dict) -> dict:
    """Per model: what must be equal between two runs (no timings, paths or timestamps)."""
    out = {}
    for m in doc["models"]:
        r = m["result"] or {}
        out[m["name"]] = {"status": m["status"], "candidate": r.get("candidate"), "before": r.get("before"),
                          "after": r.get("after"), "candidates": [{k: v for k, v in c.items() if k != "fit_seconds"}
                                                                  for c in r.get("candidates", [])],
                          "output_digest": r.get("output_digest"), "gate": m["gate"]}
    return out


def screenshot(html: Path, png: Path, size=(1280, 1500)) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise SystemExit("no Chromium: apt-get install -y chromium")
    png.parent.mkdir(exist_ok=True)
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_md(path: Path, local: dict, ray: dict, identical: bool, diffs: list[str], workers: int) -> None:
    doc = local["doc"]
    rows = []
    for m in doc["models"]:
        r = m["result"]
        b, a = r["before"], r["after"]
        rows.append(f"| {m['name']} | {r['candidate']} | {pct(b['worst_group_accuracy'])} → {pct(a['worst_group_accuracy'])} "
                    f"| {pct(b['accuracy'])} → {pct(a['accuracy'])} | {'pass' if m['gate']['passed'] else 'FAIL'} |")
    s = doc["summary"]
    lines = [
        "# `repair zoo`: local vs. Ray (measured)",
        "",
        "Regenerate: `python -m bench.zoo` (builds the zoo once under `bench/_work/zoo`, then runs both).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other work while this ran), "
        f"Python {platform.python_version()}. Each model runs with one CPU thread (`--cpus-per-model 1`), "
        "cold: empty embedding cache, no journal.",
        "",
        f"Zoo: {len(doc['models'])} checkpoints — twelve demo models (`repair.demo.build_demo(size=\"tiny\")`, seeds "
        f"{', '.join(map(str, SEEDS))} × resnet18 widths {', '.join(f'{k}={v}' for k, v in WIDTHS.items())}), and one "
        "tiny BERT (`transformers`, 2 layers) trained 150 steps on sentences whose marker word goes with the label in "
        "95% of training sentences. Repair without group labels (`recipe: auto`); figures and the gate "
        f"(worst-group accuracy ≥ {pct(GATE)}) on each model's balanced test split.",
        "",
        "| run | command | wall time | load average at start | exit |",
        "|---|---|---|---|---|",
        f"| local | `repair zoo zoo.yaml` | {local['wall']:.1f} s | {local['load']:.1f} | {local['exit']} |",
        f"| Ray, {workers} workers | `repair zoo zoo.yaml --ray auto --workers {workers}` | {ray['wall']:.1f} s "
        f"(includes starting Ray and each worker's imports) | {ray['load']:.1f} | {ray['exit']} |",
        "",
        f"Per-model results identical between the two runs (method chosen, every before/after figure, the "
        f"candidates' scores, sha256 of the output tensors): **{'yes' if identical else 'NO'}**"
        + ("" if identical else " — " + "; ".join(diffs[:5])),
        "",
        f"{s['passed']} of {s['models']} models pass the gate; exit code 1 names the others.",
        "",
        "| model | method chosen | WGA before → after | accuracy before → after | gate |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "The report of the local run, opened in headless Chromium (`docs/zoo-report.png`):",
        "",
        "![zoo report](../docs/zoo-report.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "_work" / "zoo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "ZOO.md")
    ap.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "zoo-report.png")
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work = a.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = build_zoo(work / "models", a.rebuild, log)
    local = run_zoo_cmd(work, "local", work / "models", models, [], log)
    ray = run_zoo_cmd(work, "ray", work / "models", models, ["--ray", "auto", "--workers", str(a.workers)], log)
    ca, cb = comparable(local["doc"]), comparable(ray["doc"])
    diffs = [f"{n}: {k}" for n in ca for k in ca[n] if ca[n][k] != cb.get(n, {}).get(k)]
    identical = not diffs and ca.keys() == cb.keys()
    html = Path(local["doc"]["report"])
    text = html.read_text()
    assert "<script src" not in text and "<link" not in text and "url(" not in text, "the report fetches something"
    screenshot(html, a.screenshot)
    write_md(a.out, local, ray, identical, diffs, a.workers)
    log(f"local {local['wall']:.1f}s, Ray {ray['wall']:.1f}s, identical: {identical}; wrote {a.out} and {a.screenshot}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
