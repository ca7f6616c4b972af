#!/usr/bin/env bash
# Set up ./.venv if needed, make a tiny real nnU-Net model and synthetic scans, and run the
# launcher on them: on every GPU if NVML finds any, else on the CPU with 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
DEMO="${DEMO_DIR:-demo-output}"
rm -rf "$DEMO"
mkdir -p "$DEMO"
echo "== making a tiny nnU-Net model and 12 synthetic cases in $DEMO/"
.venv/bin/python scripts/make_tiny_model.py --model "$DEMO/model" --inputs "$DEMO/input" --cases 12
if gpus=$(.venv/bin/nnunet-launch gpus 2>/dev/null) && [ -n "$gpus" ] && [ "$gpus" != "no GPU found" ]; then
  echo "== GPUs found by NVML:"
  echo "$gpus"
  device=(-device cuda)
else
  echo "== no GPU found by NVML: running on the CPU with 2 workers (-device cpu --workers 2)"
  device=(-device cpu --workers 2)
fi
echo "== nnunet-launch run -i $DEMO/input -o $DEMO/predictions -m $DEMO/model -f 0 --disable_tta ${device[*]}"
.venv/bin/nnunet-launch run -i "$DEMO/input" -o "$DEMO/predictions" -m "$DEMO/model" -f 0 --disable_tta "${device[@]}"
echo "== nnunet-launch status $DEMO/predictions"
.venv/bin/nnunet-launch status "$DEMO/predictions"
