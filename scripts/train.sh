#!/usr/bin/env bash
# One command to train: set up (first time), then fine-tune and evaluate.
# Any flags are passed to `cifar10-resnet50 train` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/cifar10-resnet50" train "$@"
