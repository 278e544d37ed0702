"""Benchmark suite: real shortcut checkpoints, reference implementations, one runner.

    python -m bench.tasks [sst2_negation mnist_color demo]   # build (cached) checkpoints
    python -m bench.run [--smoke] [--seeds 0 1 2] [--tasks ...]
"""
