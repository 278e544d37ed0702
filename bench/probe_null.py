"""How often ``repair probe`` names a neuron its model's errors do not depend on, and what its test costs.

``python -m bench.probe_null [--trials 100]`` (one torch thread) prints one JSON document:

- ``null``: for four shortcut-free models (a head reading one class feature; 256 post-ReLU noise
  neurons it gives no weight, of a sparsity ``shift`` -- ReLU(N(0,1) - shift) -- and a class signal
  ``signal``), the share of ``trials`` seeds (0..trials-1) in which probe names any noise neuron: the
  family-wise error rate its max-T permutation test holds at 5% (a Binomial(trials, 0.05) share).
- ``cost``: seconds of :func:`repair.probing.probe` and of the NeuronTune median deltas alone, on
  random post-ReLU embeddings of N x D (seed 0), side by side in this run.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from repair.probing import neuron_deltas, probe


def _null_model(seed: int, shift: float, signal: float, n: int = 600, d: int = 257):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.relu(torch.randn(n, d, generator=g) - shift)
    X[:, 0] = signal * (2 * y - 1) + torch.randn(n, generator=g)
    W = torch.zeros(2, d)
    W[1, 0], W[0, 0] = 1.0, -1.0
    return X, y, W


def null_rates(trials: int) -> list[dict]:
    out = []
    for shift, signal in ((1.5, 2.0), (1.0, 2.0), (0.0, 1.0), (1.5, 3.0)):
        named = 0
        for seed in range(trials):
            X, y, W = _null_model(seed, shift, signal)
            rep = probe(X, y, W, torch.zeros(2), ["a", "b"], top_k=100)
            named += bool({t["neuron"] for t in rep["top_spurious_neurons"]} - {0})
        out.append({"shift": shift, "signal": signal, "trials": trials, "seeds": f"0..{trials - 1}",
                    "named_a_noise_neuron": named, "rate": named / trials})
    return out


def cost(n: int, d: int) -> dict:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    X = torch.relu(torch.randn(n, d, generator=g))
    X[:, 0] = (2 * y - 1) + torch.randn(n, generator=g)
    W = torch.zeros(2, d)
    W[1, 0], W[0, 0] = 1.0, -1.0
    t = time.perf_counter()
    neuron_deltas(X, y, (X @ W.T).argmax(1), 2)
    deltas = time.perf_counter() - t
    t = time.perf_counter()
    probe(X, y, W, torch.zeros(2), ["a", "b"])
    whole = time.perf_counter() - t
    return {"n": n, "d": d, "probe_seconds": round(whole, 2), "deltas_seconds": round(deltas, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps({"threads": 1, "null": null_rates(a.trials),
                      "cost": [cost(5000, 512), cost(40000, 1024)]}, indent=1))


if __name__ == "__main__":
    main()
