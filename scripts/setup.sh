#!/usr/bin/env bash
# Create the virtual environment (default .venv, or $VENV) and install the project into it.
# Idempotent and quick the second time: the install is skipped while a stamp in the venv
# matches this install line and pyproject.toml (pip itself took ~24 s just to re-check).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
# torch/torchvision pinned to the tested releases; everything else from pyproject.toml.
PACKAGES=(torch==2.14.1 torchvision==0.29.1 -e ".[dev]")
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.cifar10-resnet50-install"
want="$(printf '%s\n' "${PACKAGES[*]}" | cat - pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
    && "$VENV/bin/python" -c "import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('cifar10_resnet50', 'torch', 'torchvision')))"; then
    exit 0
fi
# (The grep only hides this machine's noisy local-index warnings; pip's exit status counts.)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}" \
    2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -c "import cifar10_resnet50, torch, torchvision" \
    || { echo "setup failed: see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
