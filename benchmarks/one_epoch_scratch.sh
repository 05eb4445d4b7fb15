#!/usr/bin/env bash
# Requirement 27: one epoch from scratch (--weights none) on the full local copy at 32 px:
# wall time and test accuracy. AdamW, because SGD at lr 0.1 is unstable in the first steps of
# a from-scratch ResNet-50 (see BENCHMARKS.md). Usage: bash benchmarks/one_epoch_scratch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
out="$(mktemp -d)/run"
SECONDS=0
"$VENV/bin/cifar10-resnet50" train --data-dir "${CIFAR10_DATA_DIR:-../shared/cifar10}" \
    --weights none --image-size 32 --epochs 1 --optimizer adamw --lr 2e-3 \
    --no-progress --out "$out" "$@"

echo "wall time (set-up, 1 epoch, validation, test evaluation): ${SECONDS} s"
cat "$out/metrics.jsonl"
