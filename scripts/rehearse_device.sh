#!/usr/bin/env bash
# A dress rehearsal of the device check (benchmarks/gpu_check.sh) on this CPU, with what the GPU
# machine will have and nothing more:
#   * its software: torch 2.11.0, torchvision 0.26.0, onnxruntime 1.30.0 (the device README's
#     KINDS.md, read 2026-11), in a venv of their own; no FastAPI/uvicorn (its image has none:
#     tests/test_gpu_check.py blocks them the same way in every test run);
#   * its files: a clean checkout of HEAD (`git archive`) plus the carried gpu-data/, and no
#     $CIFAR10_DATA_DIR.
# Run it before a GPU loan, or after changing the training path:
#   bash scripts/rehearse_device.sh                      # --smoke --compile-on-cpu (~6 min)
#   bash scripts/rehearse_device.sh --smoke              # without the compiled rows (~1 min)
# The first run builds the venv (~3 GB of wheels from the package registry; $DEVICE_VENV moves it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || set -- --smoke --compile-on-cpu
VENV="${DEVICE_VENV:-$HOME/.cache/cifar10-resnet50/device-venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "building $VENV with the GPU machine's versions (torch 2.11.0, torchvision 0.26.0)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 onnxruntime==1.30.0 \
        numpy pillow tqdm matplotlib tensorboard onnx prometheus-client
fi
# The preparation the device check's docstring gives, done here if it was not.
if [ ! -d gpu-data/cifar10-compact ]; then
    mkdir -p gpu-data && cp -r ../shared/cifar10-compact gpu-data/
fi
mkdir -p .git/info && { grep -qx 'gpu-data/' .git/info/exclude 2>/dev/null || echo 'gpu-data/' >> .git/info/exclude; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git archive HEAD | tar -x -C "$work"
cp -r gpu-data "$work/"
site="$work/.device-site"  # what the image lacks, made unimportable in every process
mkdir "$site"
printf 'import sys\nfor name in ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart"):\n    sys.modules[name] = None\n' > "$site/sitecustomize.py"
cd "$work"
env -u CIFAR10_DATA_DIR PYTHONPATH="$site" OUT="$work/out" PYTHON="$VENV/bin/python" \
    PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh "$@"
failed="$(grep -c '"failed"' "$work/out/gpu_check.jsonl" || true)"
echo "rehearsal: $(wc -l < "$work/out/gpu_check.jsonl") rows, $failed failed"
[ "$failed" = 0 ]
