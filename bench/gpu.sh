#!/usr/bin/env bash
# The GPU check (issue: CUDA paths measured when a GPU machine is lent; CI never has one).
# Run from the repository root on a machine with CUDA and the project installed
# (pip install -e ".[gpu]" where a registry is reachable; the lent machine reaches none, so its
# environment must already hold the dependencies). Writes bench/_work/gpu/gpu.json and bench/GPU.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.device_count())"
python -m bench.gpu "$@"
