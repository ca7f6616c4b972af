"""Hangs, poison cases and sick devices, with real processes and real nnU-Net on the CPU."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from conftest import assert_same_predictions, cli, run_args, status_json
from launcher.worker import FAULTY_DEVICES_ENV


def _ready_worker_pids(out) -> list[int]:
    status = status_json(out)
    return [p["worker_pid"] for p in (status or {}).get("parts", []) if p["worker_pid"] and p["done"] >= 1]


def test_stopped_worker_is_killed_after_the_hang_timeout_and_its_part_finishes(small, tmp_path, launch):
    out = tmp_path / "out"
    run = launch(run_args(small, out, "--workers", "2", "--hang-timeout", "8"))
    run.wait_until(lambda: len(_ready_worker_pids(out)) >= 1, 240, "a worker finished a case")
    victim = _ready_worker_pids(out)[0]
    os.kill(victim, signal.SIGSTOP)
    code, stdout, stderr = run.wait(timeout=300)
    assert code == 0, stderr
    assert "hung: no progress for" in stdout and "hang timeout 8 s" in stdout
    assert_same_predictions(out, small["reference"])
    assert sum(p["restarts"] for p in status_json(out)["parts"]) == 1
    assert run.alive_descendants() == []


def test_corrupt_case_fails_alone_with_its_reason_and_every_other_output_matches(small, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(small["inputs"], inputs)
    (inputs / "case_002_0000.nii.gz").write_bytes(b"\x1f\x8b not really a gzip stream")
    out = tmp_path / "out"
    result = cli(*run_args({**small, "inputs": inputs}, out, "--workers", "2"), timeout=300)
    assert result.returncode == 1, result.stderr
    assert "FAILED case_002: preprocessing failed:" in result.stderr
    assert_same_predictions(out, small["reference"], without=("case_002.nii.gz",))
    status = status_json(out)
    assert status["done"] == 5 and status["failed"] == 1
    assert [f["case"] for f in status["failed_cases"]] == ["case_002"]
    rows = (out / ".nnunet-launch" / "cases.csv").read_text().splitlines()
    assert any(r.startswith("case_002,") and ",failed,3," in r for r in rows), "three attempts: 1 + 2 retries"


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_device_whose_workers_always_die_is_dropped_and_the_run_completes_on_the_others(small, tmp_path, schedule):
    out = tmp_path / "out"
    args = run_args(small, out, "--workers", "2", "--schedule", schedule)
    result = cli(*args, env={FAULTY_DEVICES_ENV: "cpu-slot-0"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[cpu] dropped from the run: workers died 3 times in a row" in result.stdout
    assert_same_predictions(out, small["reference"])
    parts = {p["part_id"]: p for p in status_json(out)["parts"]}
    assert parts[0]["restarts"] == 3
    if schedule == "static":  # the part keeps its cases and moves to the healthy slot
        assert "[part 0] continues on cpu (slot of part 1)" in result.stdout
        assert parts[0]["done"] == 3
    else:  # its cases went back to the queue; the healthy worker took them
        assert parts[1]["done"] == 6


def test_run_ends_clearly_when_every_device_is_dropped(small, tmp_path):
    out = tmp_path / "out"
    result = cli(*run_args(small, out, "--workers", "1"), env={FAULTY_DEVICES_ENV: "cpu-slot-0"}, timeout=120)
    assert result.returncode == 1
    assert "no usable device left" in result.stderr
    assert not [p for p in out.iterdir() if p.name.startswith("case_")]
