#!/usr/bin/env bash
# One command to test: set up (first time), lint, then run the test suite.
# Real-data tests run when $CIFAR10_DATA_DIR points at a CIFAR-10 copy (../shared/cifar10 here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
if [ -z "${CIFAR10_DATA_DIR:-}" ] && [ -d ../shared/cifar10/cifar-10-batches-py ]; then
    export CIFAR10_DATA_DIR="$(cd ../shared/cifar10 && pwd)"
fi
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/ruff" format --check src tests benchmarks
exec "$VENV/bin/python" -m pytest "$@"
