"""`mix` at scale: its mixed rows formed (the training sets stacked, as before the solver took
them as index pairs) against never formed (:class:`repair.solver.mixing.RowMix`), side by side in
one run, each fit in its own process (time, peak RSS increase over the loaded embeddings, the
heads' agreement and test worst-group accuracy).

    python -m bench.mix_scale [--n 20000 --d 2048 --seed 0] [--out bench/mix_scale.json]

Synthetic planted-shortcut embeddings (bench/scale.py's generator, two classes, group labels
given); the default protocol of `mix` (10 averaged refits at the strength chosen on a held-out
half, 7 strengths).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("row_mix", "formed")


def _child(variant: str, problem: Path, out: Path) -> None:
    import torch

    from bench.measure import measured
    from repair.methods import RepairInputs
    from repair.methods.dfr import run_balanced_protocol
    from repair.methods.mix import MixConfig, make_mix_builder
    from repair.selection import worst_group_accuracy

    torch.set_num_threads(1)
    p = torch.load(problem)
    cfg = MixConfig()
    build = make_mix_builder(cfg)
    if variant == "formed":
        def builder(*a):
            X, y, w, mix = build(*a)
            return (*mix.materialize(X, y, w), None)
    else:
        builder = build
    inputs = RepairInputs(X=p["X"], y=p["y"], W=p["W0"], b=p["b0"], groups=p["g"], seed=0, device="cpu")
    o, secs, mib = measured(lambda: run_balanced_protocol(inputs, cfg, builder, "mix"))
    lg = p["Xt"] @ o.W.T + o.b
    torch.save({"W": o.W, "b": o.b}, out.with_suffix(".pt"))
    out.write_text(json.dumps({
        "variant": variant, "seconds": secs, "peak_rss_increase_mib": mib,
        "test_wga": float(worst_group_accuracy(lg, p["yt"], p["gt"])),
        "chosen_C": o.diagnostics["chosen"]["C"]}))


def run(n: int, d: int, seed: int) -> dict:
    import torch

    from bench.scale import make_problem

    with tempfile.TemporaryDirectory() as tmp:
        prob = make_problem(2, n, d, seed)
        Xt, yt, gt = prob["test"]
        path = Path(tmp) / "problem.pt"
        torch.save({"X": prob["X"], "y": prob["y"], "g": prob["g"], "Xt": Xt, "yt": yt, "gt": gt,
                    "W0": prob["W0"], "b0": prob["b0"]}, path)
        rows = {}
        for v in VARIANTS:
            out = Path(tmp) / f"{v}.json"
            subprocess.run([sys.executable, "-m", "bench.mix_scale", "--child", v, "--problem", str(path),
                            "--child-out", str(out)], check=True)
            rows[v] = json.loads(out.read_text())
            rows[v]["head"] = torch.load(out.with_suffix(".pt"))
        a, b = rows["row_mix"].pop("head"), rows["formed"].pop("head")
        rel = float((a["W"] - b["W"]).abs().max() / b["W"].abs().max().clamp_min(1e-12))
    emb = n * d * 4 / 2 ** 20
    return {"n": n, "d": d, "seed": seed, "embeddings_mib": emb, "rows": rows,
            "head_max_rel_difference": rel,
            "speedup": rows["formed"]["seconds"] / rows["row_mix"]["seconds"],
            "memory_over_embeddings": {v: rows[v]["peak_rss_increase_mib"] / emb for v in VARIANTS}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--problem", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child, Path(a.problem), Path(a.child_out))
        return
    res = run(a.n, a.d, a.seed)
    res["command"] = "python -m bench.mix_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
