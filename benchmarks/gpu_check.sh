#!/usr/bin/env bash
# The device check in one call (issue 19): see benchmarks/gpu_bench.py for the preparation
# (copy ../shared/cifar10-compact into gpu-data/, carry it) and the rows. On the GPU machine:
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh [--quick] [--data DIR]
# Each row is printed as it is measured and appended to $OUT/gpu_check.jsonl. $PYTHON: the
# interpreter with torch (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /dev/shm 2>/dev/null | tail -1 || true
exec "${PYTHON:-python3}" benchmarks/gpu_bench.py "$@"
