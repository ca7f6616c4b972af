"""The real GPU path: NVML inventory, UUID pinning, -device cuda. Skipped where NVML finds no
GPU (CI, this project's CPU machines). On a GPU box with the online set-up
(`NNUNET_LAUNCH_TORCH=torch bash scripts/test.sh`) these run with the rest of the suite;
offline, scripts/gpu_check.sh runs the same checks and more (a worker killed mid-run, the
benchmark) without pytest.

The launcher runs as `python -m launcher` (an install with pip --target has no console
scripts), and never with a test-only stand-in: the fake NVML and fake backend variables are
removed from its environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NUM_CASES, assert_same_predictions, plain_nnunet, run_args
from launcher import gpus

STAND_IN_PREFIXES = ("NNUNET_LAUNCH_FAKE_", "NNUNET_LAUNCH_TEST_")


def _real_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(STAND_IN_PREFIXES)}


def _real_gpus() -> list:
    fake = os.environ.pop(gpus.FAKE_INVENTORY_ENV, None)
    try:
        return gpus.inventory()
    except gpus.NvmlUnavailable:
        return []
    finally:
        if fake is not None:
            os.environ[gpus.FAKE_INVENTORY_ENV] = fake


pytestmark = pytest.mark.skipif(not _real_gpus(), reason="no GPU found by NVML")


def launcher(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], capture_output=True, text=True, timeout=timeout, env=_real_env()
    )


@pytest.fixture(scope="module")
def cuda_reference(tiny, tmp_path_factory) -> Path:
    """Plain nnUNetv2_predict on the GPU (one torch thread, as nnU-Net and the workers use there)."""
    out = tmp_path_factory.mktemp("cuda-reference")
    plain_nnunet(tiny["inputs"], out, tiny["model"], device="cuda")
    return out


def test_nvml_inventory_lists_every_gpu_with_uuid_and_memory():
    result = launcher("gpus", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed and all(g["uuid"].startswith(("GPU-", "MIG-")) and g["memory_total"] > 0 for g in listed)
    print(json.dumps(listed, indent=2))


@pytest.mark.parametrize("workers_per_gpu", [1, 2])
def test_cuda_run_matches_plain_nnunet_on_the_gpu(tiny, cuda_reference, tmp_path, workers_per_gpu):
    out = tmp_path / "out"
    args = run_args(tiny, out, "--workers-per-gpu", str(workers_per_gpu))
    args[args.index("-device") + 1] = "cuda"
    result = launcher(*args)
    print(result.stdout, result.stderr, file=sys.stderr)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, cuda_reference)
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    assert summary["done"] == NUM_CASES
    assert summary["parts"] and len(summary["parts"]) % workers_per_gpu == 0
    assert all(p["gpu_uuid"].startswith(("GPU-", "MIG-")) for p in summary["parts"])
