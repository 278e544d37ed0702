"""A text task's checkpoint made small enough to travel to a lent GPU machine, with the same outputs.

The device tool sends at most 64 MiB a call (the working tree and the carried paths together), and the
MiniLM checkpoint of a text task (``sst2_capped``, ``sst2_negation``) is 87 MiB in float32, half of it the
word-embedding table (30,522 x 384). A repair of the task reads only the rows of the tokens its texts
hold: the embedding of any other token never enters a forward pass, and its gradient is zero (AdamW's
decay moves it, but nothing reads it). So:

* ``pack TASK_DIR DEST`` writes ``DEST``: the task's ``task.json``, its data files, the model folder with
  every tensor but the word embeddings as they are, and of the word embeddings only the rows of the
  tokens the task's texts use (the tokenizer of the model folder over every text of every data file,
  plus the special tokens), with their row numbers;
* ``unpack DEST TASK_DIR`` writes the task back, the unused rows zero: every float the model computes on
  the task's texts is the one the original computes (``verify`` checks this on the CPU: the logits of
  every text, original against unpacked, exactly equal);
* ``verify TASK_DIR DEST``: ``unpack`` into a temporary folder and that comparison.

The checkpoint file itself differs (its digest is not the task's ``checkpoint_sha256``); ``unpack``
records this in the unpacked ``task.json`` (``carried``), and the GPU check reports it.

    python -m bench.carry pack bench/_work/tasks/sst2_capped .gpucarry/sst2_capped
    python -m bench.carry verify bench/_work/tasks/sst2_capped .gpucarry/sst2_capped
    python -m bench.carry unpack .gpucarry/sst2_capped bench/_work/tasks/sst2_capped     # on the lent machine
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path

WORD_EMBEDDINGS = "word_embeddings.weight"      # the suffix of the table's key in a BERT-family checkpoint
ROWS_KEY = "__carried_rows__"                   # the kept rows' numbers (int64), in the packed file


def _texts(data: Path, column: str = "text") -> list:
    out = []
    for f in sorted(data.iterdir()):
        if f.suffix == ".csv":
            with open(f, newline="", encoding="utf-8") as fh:
                out += [r[column] for r in csv.DictReader(fh)]
        elif f.suffix == ".jsonl":
            out += [json.loads(line)[column] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def used_rows(model_dir: Path, texts: list) -> list:
    """The token ids the model's tokenizer gives ``texts``, and its special tokens', sorted."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = set(tok.all_special_ids)
    for i in range(0, len(texts), 512):
        for row in tok(texts[i:i + 512], add_special_tokens=True)["input_ids"]:
            ids.update(row)
    return sorted(ids)


def pack(task_dir: Path, dest: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    info = json.loads((task_dir / "task.json").read_text(encoding="utf-8"))
    model = task_dir / info.get("model_dir", "model")
    weights = load_file(str(model / "model.safetensors"))
    keys = [k for k in weights if k.endswith(WORD_EMBEDDINGS)]
    if len(keys) != 1:
        raise SystemExit(f"{model / 'model.safetensors'}: expected one '*{WORD_EMBEDDINGS}' tensor, found {keys}")
    rows = used_rows(model, _texts(task_dir / "data"))
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(task_dir, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    key = keys[0]
    idx = torch.tensor(rows, dtype=torch.int64)
    packed = {k: v for k, v in weights.items() if k != key}
    packed[key] = weights[key].index_select(0, idx).contiguous()
    packed[ROWS_KEY] = idx
    save_file(packed, str(dest / info.get("model_dir", "model") / "model.safetensors"),
              metadata={"carried_from": key, "vocab_rows": str(weights[key].shape[0])})
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    return {"rows_kept": len(rows), "rows": int(weights[key].shape[0]), "bytes": size}


def unpack(src: Path, task_dir: Path) -> dict:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    info = json.loads((src / "task.json").read_text(encoding="utf-8"))
    model_rel = info.get("model_dir", "model")
    with safe_open(str(src / model_rel / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    key, n = meta["carried_from"], int(meta["vocab_rows"])
    idx = weights.pop(ROWS_KEY)
    kept = weights[key]
    full = torch.zeros(n, kept.shape[1], dtype=kept.dtype)
    full[idx] = kept
    weights[key] = full
    if task_dir.exists():
        shutil.rmtree(task_dir)
    shutil.copytree(src, task_dir, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file(weights, str(task_dir / model_rel / "model.safetensors"), metadata={"format": "pt"})
    info["carried"] = (f"the checkpoint carried by bench.carry: the {n - len(idx)} of {n} word-embedding rows that "
                       "no text of the task uses are zero (the outputs on the task's texts are the original's)")
    (task_dir / "task.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return {"rows_kept": len(idx), "rows": n}


def verify(task_dir: Path, src: Path) -> dict:
    """The logits of every text of the task, from the original and from the unpacked checkpoint (CPU,
    float32): equal to the last bit, or SystemExit."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    info = json.loads((task_dir / "task.json").read_text(encoding="utf-8"))
    texts = _texts(task_dir / "data")
    with tempfile.TemporaryDirectory() as tmp:
        unpack(src, Path(tmp) / "task")
        outs = []
        for root in (task_dir, Path(tmp) / "task"):
            folder = str(root / info.get("model_dir", "model"))
            tok = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            logits = []
            with torch.no_grad():
                for i in range(0, len(texts), 64):
                    enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
                    logits.append(model(**enc).logits)
            outs.append(torch.cat(logits))
    diff = float((outs[0] - outs[1]).abs().max())
    if diff != 0.0:
        raise SystemExit(f"the unpacked checkpoint's logits differ from the original's (max abs diff {diff})")
    return {"texts": len(texts), "max_abs_diff": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("verb", choices=("pack", "unpack", "verify"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    fn = {"pack": pack, "unpack": unpack, "verify": verify}[a.verb]
    print(json.dumps(fn(a.src, a.dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
