#!/usr/bin/env bash
# Create ./.venv (NNUNET_LAUNCH_VENV=DIR for another one) when missing, or when what it is built
# from changed (pyproject.toml, this script, the torch/torchvision specs), and install everything.
#
# torch and torchvision are installed as one matching pair, in the same pip call as nnunetv2
# (otherwise timm, which requires torchvision, lets pip pick a torchvision that does not load
# with the torch we pinned). nnU-Net's trainer lookup imports every module of
# nnunetv2.training.nnUNetTrainer until it finds the class the checkpoint names; the primus
# trainers import timm, timm imports torchvision, so with a torchvision that cannot load only
# `nnUNetTrainer` itself resolves (nnUNetTrainerNoMirroring, nnUNetTrainer_onlyMirror01, ... fail).
# PyPI's Linux torchvision wheels are CUDA builds (their _C.so needs libc10_cuda.so): next to a
# CPU-only torch, `import torchvision` fails with "operator torchvision::nms does not exist". So
# the default is PyPI's CUDA pair, torch 2.14.1 + torchvision 0.29.1: it runs on the CPU as well
# (about 6.4 GB installed, of which 3.2 GB nvidia-* and 0.9 GB triton; 1m40s from this machine's
# indexes).
#
# nnunetv2: the newest release the launcher supports (pyproject.toml asks for a range, so that an
# install into a user's environment keeps their nnU-Net); NNUNET_LAUNCH_NNUNET for another, e.g.
# `nnunetv2==2.5.2`, the oldest supported.
#
# NNUNET_LAUNCH_TORCH: the torch a machine wants instead (e.g. `torch` on a GPU machine online).
# Its torchvision: NNUNET_LAUNCH_TORCHVISION when set; else for an exact `torch==2.Y[.Z]` the
# matching release line `torchvision==0.<Y+15>.*` (torch 2.13 -> 0.28, 2.14 -> 0.29); else plain
# `torchvision`, which pip resolves together with that torch (torchvision wheels require their torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${NNUNET_LAUNCH_VENV:-.venv}"
if [ -n "${NNUNET_LAUNCH_TORCH:-}" ]; then
  TORCH_SPEC="$NNUNET_LAUNCH_TORCH"
  if [[ "$TORCH_SPEC" =~ ^torch[[:space:]]*==[[:space:]]*2\.([0-9]+)(\.[0-9]+)?(\+[A-Za-z0-9.]+)?$ ]]; then
    DERIVED="torchvision==0.$((BASH_REMATCH[1] + 15)).*"
  else
    DERIVED="torchvision"
  fi
  TORCHVISION_SPEC="${NNUNET_LAUNCH_TORCHVISION:-$DERIVED}"
else
  TORCH_SPEC="torch==2.14.1"
  TORCHVISION_SPEC="${NNUNET_LAUNCH_TORCHVISION:-torchvision==0.29.1}"
fi
NNUNET_SPEC="${NNUNET_LAUNCH_NNUNET:-nnunetv2==2.8.1}"
built_from() { cat pyproject.toml scripts/setup_venv.sh; echo "$TORCH_SPEC $TORCHVISION_SPEC $NNUNET_SPEC"; }
stamp="$VENV/.installed-$(built_from | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "setting up $VENV ($NNUNET_SPEC, $TORCH_SPEC, $TORCHVISION_SPEC, test tools)..." >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$NNUNET_SPEC" "$TORCH_SPEC" "$TORCHVISION_SPEC" \
  -e ".[test]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
"$VENV/bin/python" -c "import launcher, nnunetv2, torch, pynvml, click, psutil, pytest" \
  || { echo "setup of $VENV failed (see pip output above)" >&2; exit 1; }
# nnU-Net's trainer lookup reaches every trainer only when torchvision loads with this torch
"$VENV/bin/python" -W ignore -c "
import torch, torchvision
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find
find('nnUNetTrainerNoMirroring')
" >/dev/null || {
  echo "setup of $VENV failed: torchvision does not load with $TORCH_SPEC, so nnU-Net resolves no trainer" >&2
  echo "  but nnUNetTrainer; install a torchvision built for this torch (NNUNET_LAUNCH_TORCHVISION; a" >&2
  echo "  CPU-only torch needs the CPU torchvision of the same index, PyPI's are CUDA builds)" >&2
  exit 1
}
rm -f "$VENV"/.installed-*
touch "$stamp"
