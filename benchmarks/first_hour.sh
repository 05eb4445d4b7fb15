#!/usr/bin/env bash
# The README's "first hour" walkthrough, timed step by step (CPU, from scratch: no ImageNet
# weights offline). Usage: bash benchmarks/first_hour.sh [WORK_DIR]   (default: a temp folder)
# Needs CIFAR10_DATA_DIR (or ../shared/cifar10) and the venv from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
BIN="$REPO/${VENV:-.venv}/bin"
export CIFAR10_DATA_DIR="${CIFAR10_DATA_DIR:-$(cd ../shared/cifar10 && pwd)}"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK" && cd "$WORK"
step() {  # step NAME COMMAND...: run it, print its wall time
    local name="$1"; shift
    local t0; t0=$(date +%s.%N)
    "$@" > "$WORK/$name.log" 2>&1 || { echo "$name FAILED (see $WORK/$name.log)"; exit 1; }
    printf "%-10s %6.1f s   %s\n" "$name" "$(python3 -c "print($(date +%s.%N) - $t0)")" "$*"
}
step setup bash "$REPO/scripts/setup.sh"
step train "$BIN/cifar10-resnet50" train --weights none --image-size 32 --epochs 1 \
    --optimizer adamw --lr 2e-3 --out runs/first --no-progress
step show "$BIN/cifar10-resnet50" data show --out runs/first/batch.png
step lr-find "$BIN/cifar10-resnet50" lr-find --weights none --image-size 32 --optimizer adamw \
    --out runs/first
"$BIN/python" - <<'EOF'
from pathlib import Path
from PIL import Image
from cifar10_resnet50 import data
arrays = data.load(data.resolve_data_dir(None))
Path("photos").mkdir(exist_ok=True)
for i in range(20):  # test images, upscaled as a phone photo would be
    im = Image.fromarray(arrays.test_x[i].permute(1, 2, 0).numpy()).resize((640, 640))
    im.save(f"photos/{i:02d}_{arrays.classes[arrays.test_y[i]]}.jpg", quality=90)
EOF
step evaluate "$BIN/cifar10-resnet50" evaluate runs/first --tta
step predict "$BIN/cifar10-resnet50" predict runs/first/best.pt photos/
step export "$BIN/cifar10-resnet50" export runs/first/best.pt --format onnx --int8
grep -E "accuracy|passed" "$WORK/train.log" "$WORK/evaluate.log" "$WORK/export.log" | head -8
echo "outputs in $WORK/runs/first"
