#!/usr/bin/env bash
# The GPU check, one call on a GPU machine, offline: equivalence with plain nnU-Net on the GPU
# (tiny model, 1 and 2 workers per GPU), a worker SIGKILLed mid-run, and the throughput
# benchmark. Results: $OUT/gpu_check.json (gpu-check-results/ when OUT is unset), logs beside it.
#
#   offline: bash scripts/gpu_wheels.sh here (fills .whl/), carry .whl/ with the working tree,
#            then there: bash scripts/gpu_check.sh
#   online:  a .venv with a CUDA torch (NNUNET_LAUNCH_TORCH=torch bash scripts/setup_venv.sh),
#            then: PYTHON=.venv/bin/python bash scripts/gpu_check.sh --wheels none
#
# Options (scripts/gpu_check.py --help): --budget-s S (440), --steps a,b,..., --device cuda|cpu,
# --wheels DIR, --results DIR. Exit 0: every step passed; 1: a step failed or was skipped;
# 2: no GPU (NVML finds none), found in seconds.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null; then
  echo "gpu_check.sh: no $PY" >&2
  exit 2
fi
budget=440
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --budget-s) budget="${args[i + 1]:-440}" ;;
    --budget-s=*) budget="${args[i]#*=}" ;;
  esac
done
[[ "$budget" =~ ^[0-9]+(\.[0-9]*)?$ ]] || budget=440
# a safety net over the script's own step timeouts (it stops well before): SIGTERM, which the
# script turns into writing its JSON and stopping what it started
exec timeout -k 10 "$((${budget%.*} + 25))" "$PY" scripts/gpu_check.py "$@"
