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
# Say what is coming: the first install is the big one (torch's CUDA build is ~2.5 GB to
# download and ~5.6 GB installed; ~1.5 minutes from a local index, minutes on a network).
echo "setup: installing torch, torchvision and the project into $VENV (first time only;" \
    "a ~2.5 GB download: a few minutes on a typical connection)" >&2
# pip's progress, one line per package and download (not --quiet: a silent minute looks like a
# hang); its exit status still counts (pipefail; the grep group always succeeds).
# (The grep on stderr only hides this machine's noisy local-index warnings.)
"$VENV/bin/python" -m pip install --disable-pip-version-check "${PACKAGES[@]}" \
    2> >(grep -v "is ignored: it is neither" >&2) \
    | { grep --line-buffered -E "^ *(Collecting|Downloading|Successfully installed)" >&2 || true; }
"$VENV/bin/python" -c "import cifar10_resnet50, torch, torchvision" \
    || { echo "setup failed: see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
