#!/usr/bin/env bash
# Create ./.venv when missing (or when pyproject.toml changed) and install everything.
# torch is pinned to the CPU build in the same pip call as nnunetv2: otherwise timm pulls a
# multi-GB CUDA torch. On a GPU machine set NNUNET_LAUNCH_TORCH to the torch you want there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${NNUNET_LAUNCH_TORCH:-torch==2.13.0}"
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "setting up .venv (nnunetv2, $TORCH_SPEC, test tools)..." >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" -e ".[test]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
.venv/bin/python -c "import launcher, nnunetv2, torch, pynvml, click, psutil, pytest" \
  || { echo "setup of .venv failed (see pip output above)" >&2; exit 1; }
rm -f .venv/.installed-*
touch "$stamp"
