#!/usr/bin/env bash
# Create the virtual environment (default .venv, or $VENV) and install the project into it.
# Idempotent: a second run only re-checks the install. Used by train.sh, test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# torch/torchvision pinned to the tested releases; everything else from pyproject.toml.
# (The grep only hides this machine's noisy local-index warnings; pip's exit status counts.)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    torch==2.14.1 torchvision==0.29.1 -e ".[dev]" \
    2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -c "import cifar10_resnet50, torch, torchvision" \
    || { echo "setup failed: see the pip output above" >&2; exit 1; }
