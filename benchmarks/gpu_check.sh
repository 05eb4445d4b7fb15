#!/usr/bin/env bash
# On the GPU machine (PyTorch installed, no network):  bash benchmarks/gpu_check.sh [COMPACT_DIR]
# Unpacks ../shared/cifar10-compact (or COMPACT_DIR, carried along with the checkout) into real
# CIFAR-10 pixels when no copy is present, then runs benchmarks/gpu_bench.py: the model step
# eager/compiled, the real `train` defaults for 2 epochs, the tutorial+AMP pipeline at batch
# 128/256/512, and multi-GPU scaling when there are several GPUs. About 5 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
data="${CIFAR10_DATA_DIR:-}"
if [ -z "$data" ] || [ ! -d "$data/cifar-10-batches-py" ]; then
    compact="${1:-../shared/cifar10-compact}"
    data="$(mktemp -d)"
    python3 "$compact/unpack.py" "$data"
fi
python3 benchmarks/gpu_bench.py --data-dir "$data" "${@:2}"
