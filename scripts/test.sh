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
# One test process per core (at most 4: each holds ~2-3 GB), each torch on one thread: on CI's
# 2 cores the suite took 952 s this way against 1,255 s in one process (issue 22; two
# processes of 2 threads each crawled: torch's thread pools spin against each other).
# TEST_WORKERS=0 runs it in this process (e.g. for pdb).
workers="${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
if [ "$workers" -gt 1 ]; then
    export OMP_NUM_THREADS=1
    exec "$VENV/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
fi
exec "$VENV/bin/python" -m pytest "$@"
