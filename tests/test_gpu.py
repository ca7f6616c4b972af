"""The real GPU path: NVML inventory, UUID pinning, -device cuda. Skipped where NVML finds no
GPU (CI, this project's CPU machines); run by scripts/gpu_check.sh on a lent GPU machine."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import NUM_CASES, assert_same_predictions, cli, plain_nnunet, run_args
from launcher import gpus


def _real_gpus():
    try:
        return gpus.inventory()
    except gpus.NvmlUnavailable:
        return []


pytestmark = pytest.mark.skipif(not _real_gpus(), reason="no GPU found by NVML")


def test_nvml_inventory_lists_every_gpu_with_uuid_and_memory():
    result = cli("gpus", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed and all(g["uuid"].startswith(("GPU-", "MIG-")) and g["memory_total"] > 0 for g in listed)
    print(json.dumps(listed, indent=2))


def test_cuda_run_with_two_workers_per_gpu_matches_plain_nnunet_on_the_gpu(tiny, tmp_path):
    reference = tmp_path / "reference"
    plain_nnunet(tiny["inputs"], reference, tiny["model"], device="cuda")  # one torch thread, as on GPUs
    out = tmp_path / "out"
    args = run_args(tiny, out, "--workers-per-gpu", "2")
    args[args.index("-device") + 1] = "cuda"
    result = cli(*args, timeout=600)
    print(result.stdout, result.stderr, file=sys.stderr)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, reference)
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    assert summary["done"] == NUM_CASES
    assert all(p["gpu_uuid"].startswith(("GPU-", "MIG-")) for p in summary["parts"])
