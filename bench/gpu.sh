#!/usr/bin/env bash
# The GPU check (issue: CUDA paths measured when a GPU machine is lent; CI never has one).
# Run from anywhere in the checkout on a machine with CUDA and the project's dependencies (the lent
# machine reaches no registry: its image must hold them; the project itself need not be installed,
# the CLI runs from the checkout). Writes bench/_work/gpu/gpu.json and bench/GPU.md, and both into $OUT
# when it is set (the device tool brings back only what is under $OUT).
#   bash bench/gpu.sh                 # the figures (about 5 minutes on the lent machine)
#   bash bench/gpu.sh --dry-run       # every part on the CPU at small sizes: the plumbing, no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python || command -v python3)}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
exec "$PY" -m bench.gpu "$@"
