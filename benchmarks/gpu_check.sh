#!/usr/bin/env bash
# Run on a CUDA machine with PyTorch already installed (no network needed, no install):
#   bash benchmarks/gpu_check.sh
# Prints training and inference img/s at 128 and 224 px (bf16, channels_last, compile off/on)
# and whether the ImageNet weights are cached there. A few minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_check.py --sizes 128 224 --batch-size 256 --steps 30 "$@"
