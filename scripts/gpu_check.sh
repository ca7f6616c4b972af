#!/usr/bin/env bash
# One short check for a GPU machine: NVML inventory, a -device cuda run on the tiny model with
# two workers per GPU compared voxel for voxel with plain nnUNetv2_predict on the same GPU.
# Needs a .venv whose torch has CUDA (NNUNET_LAUNCH_TORCH picks it when the venv is made).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh || exit 1
echo "== nvidia-smi"; nvidia-smi -L || true
echo "== torch"; .venv/bin/python -c "import torch; print(torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
echo "== nnunet-launch gpus"; .venv/bin/nnunet-launch gpus
echo "== tests/test_gpu.py"
.venv/bin/python -m pytest -q -rs -s tests/test_gpu.py 2>&1 | tail -40
