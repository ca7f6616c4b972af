"""The failure semantics with real nnU-Net on the CPU, real processes and real signals: a case
that kills its worker every time, helpers that hang, SIGTERM to every process, a failed case
whose scan is replaced. (tests/test_failure_semantics.py covers the rest with the fast stand-in.)"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import sqlite3
import time

import psutil
import pytest

from conftest import assert_same_predictions, case_rows, cli, copy_outputs_mtimes, run_args, status_json, wait_gone
from launcher.worker import FAULTY_DEVICES_ENV


def _running_stage(out, case_id: str) -> tuple[int, str] | None:
    """(part, stage) of a case a worker has started, read from the journal, or None."""
    path = out / ".nnunet-launch" / "journal.sqlite"
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute(
            "SELECT part, stage FROM cases WHERE id=? AND state='running' "
            "AND stage IN ('preprocess', 'predict', 'export')",
            (case_id,),
        ).fetchone()
        return tuple(row) if row else None
    except sqlite3.Error:
        return None
    finally:
        db.close()


def _worker_pid(out, part: int) -> int | None:
    status = status_json(out) or {}
    return next((p["worker_pid"] for p in status.get("parts", []) if p["part_id"] == part), None)


def test_a_case_that_kills_its_worker_every_time_fails_alone_and_every_other_case_is_predicted(small, tmp_path, launch):
    out = tmp_path / "out"
    victim = "case_001"  # the largest of the small set: it is first, and long enough to catch
    run = launch(run_args(small, out, "--workers", "1"))
    kills = 0
    while run.proc.poll() is None:
        run.sample_tree()
        running = _running_stage(out, victim)
        pid = _worker_pid(out, running[0]) if running else None
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)  # whatever stage it is in, it kills its worker
                kills += 1
                run.wait_until(lambda p=pid: _worker_pid(out, 0) != p, 30, "the death noticed")
            except (ProcessLookupError, AssertionError):
                pass
        time.sleep(0.05)
    code, stdout, stderr = run.wait()
    assert code == 1, stdout + stderr
    assert kills >= 3
    status = status_json(out)
    assert [f["case"] for f in status["failed_cases"]] == [victim] and status["done"] == 5
    assert "alone" in status["failed_cases"][0]["error"]
    assert_same_predictions(out, small["reference"], without=(f"{victim}.nii.gz",))
    assert case_rows(out)[victim]["attempts"] == "3"
    assert "gave up" not in stdout
    assert run.alive_descendants() == []


def test_helpers_stopped_under_a_live_worker_are_caught_and_the_run_finishes(small, tmp_path, launch):
    out = tmp_path / "out"
    # generous: a loaded CI machine must not make a slow preprocessing look hung
    run = launch(run_args(small, out, "--workers", "1", "--hang-timeout", "30"))
    run.wait_until(lambda: (status_json(out) or {}).get("done", 0) >= 1, 240, "a case done")
    worker = psutil.Process(_worker_pid(out, 0))
    helpers = [p for p in worker.children(recursive=True)]
    assert len(helpers) >= 2, "nnU-Net's preprocessing and export processes"
    for helper in helpers:
        helper.send_signal(signal.SIGSTOP)
    code, stdout, stderr = run.wait(timeout=300)
    assert code == 0, stdout + stderr
    assert "hung: no progress for" in stdout and "limit 30 s" in stdout
    assert_same_predictions(out, small["reference"])
    assert {row["state"] for row in case_rows(out).values()} == {"done"}
    assert run.alive_descendants() == []


def test_sigterm_to_every_process_three_times_then_the_same_command_finishes_with_nothing_failed(
    small, tmp_path, launch
):
    out = tmp_path / "out"
    args = run_args(small, out, "--workers", "2")
    for round_ in range(3):
        run = launch(args)
        run.wait_until(lambda r=run: len(r.seen) >= 6, 240, "workers and their helpers up")
        run.wait_until(lambda: any(_running_stage(out, c) for c in small["ids"]), 240, "a case in flight")
        for pid in [run.proc.pid, *run.seen]:  # as SLURM and systemd do
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        code, stdout, stderr = run.wait(timeout=60)
        assert code == 130, f"round {round_}: {stdout}{stderr}"
        assert "worker died" not in stdout and "suspected" not in stdout
        assert wait_gone(list(run.seen), run.seen, timeout=10) == []
        assert status_json(out)["failed"] == 0
    result = cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, small["reference"])
    assert {row["attempts"] for row in case_rows(out).values()} == {"1"}, "interrupted attempts were not counted"


@pytest.mark.accelerator  # real nnU-Net through the worker's unreadable-scan / verify-output paths
def test_an_unreadable_scan_fails_at_once_and_the_same_command_predicts_it_once_replaced(small, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(small["inputs"], inputs)
    good = (inputs / "case_002_0000.nii.gz").read_bytes()
    (inputs / "case_002_0000.nii.gz").write_bytes(gzip.compress(b"not a NIfTI image" * 100))
    data = {**small, "inputs": inputs}
    out = tmp_path / "out"
    result = cli(*run_args(data, out, "--workers", "2"), timeout=300)
    assert result.returncode == 1, result.stderr
    assert "FAILED case_002: cannot read the scan: RuntimeError:" in result.stderr
    assert "ImageIO" in result.stderr or "SimpleITK" in result.stderr, "the reader's own words"
    assert case_rows(out)["case_002"]["attempts"] == "1", "a retry cannot change an unreadable scan"
    assert_same_predictions(out, small["reference"], without=("case_002.nii.gz",))
    log = next(line for line in result.stdout.splitlines() if "case case_002:" in line).split("log: ")[1].rstrip(")")
    log_text = open(log).read()
    assert "case case_002: cannot read the scan" in log_text and "Traceback" in log_text
    before = {n: m for n, m in copy_outputs_mtimes(out).items() if n.startswith("case_")}

    (inputs / "case_002_0000.nii.gz").write_bytes(good)
    again = cli(*run_args(data, out, "--workers", "2"), timeout=300)
    assert again.returncode == 0, again.stderr
    assert "1 failed case(s) of the last run tried again" in again.stdout
    assert_same_predictions(out, small["reference"])
    after = copy_outputs_mtimes(out)
    assert {n: after[n] for n in before} == before, "nothing else was rewritten"


def test_a_device_whose_workers_always_die_rests_and_the_run_completes_on_the_others(small, tmp_path):
    out = tmp_path / "out"
    result = cli(*run_args(small, out, "--workers", "2"), env={FAULTY_DEVICES_ENV: "cpu-slot-0"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[cpu] suspected (1 unexplained death(s) in a row, last: killed by SIGSEGV); it rests 5 s" in result.stdout
    assert_same_predictions(out, small["reference"])
    assert {p["part_id"]: p["done"] for p in status_json(out)["parts"]} == {0: 0, 1: 6}
