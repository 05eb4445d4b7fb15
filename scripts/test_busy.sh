#!/usr/bin/env bash
# The test suite (or the tests named in the arguments) while busy loops compete for the cores,
# as on CI's shared machine: a test whose verdict depends on this machine's speed fails here.
#   bash scripts/test_busy.sh                        # the whole suite, 2 busy loops
#   BUSY_LOOPS=4 bash scripts/test_busy.sh -k budget # pytest's arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
loops=()
trap 'kill "${loops[@]}" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq "${BUSY_LOOPS:-2}"); do
    (while :; do :; done) &
    loops+=($!)
done
echo "test_busy: ${#loops[@]} busy loops running (pids ${loops[*]})" >&2
bash scripts/test.sh "$@"
