"""Crashes, kills and interruptions: the run finishes (or resumes) with identical outputs and
no process of it survives. Real launcher processes, real nnU-Net on the CPU, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import time

from conftest import NUM_CASES, assert_same_predictions, cli, copy_outputs_mtimes, run_args, status_json, wait_gone


def _worker_pids(out) -> list[int]:
    status = status_json(out)
    return [p["worker_pid"] for p in (status or {}).get("parts", []) if p["worker_pid"]]


def _done(out) -> int:
    status = status_json(out)
    return status["done"] if status else 0


def test_killed_worker_is_restarted_and_outputs_match_with_no_case_predicted_twice(tiny, reference, tmp_path, launch):
    out = tmp_path / "out"
    run = launch(run_args(tiny, out, "--workers", "2"))
    run.wait_until(lambda: _done(out) >= 2 and len(_worker_pids(out)) == 2, 240, "two cases done")
    run.proc.send_signal(signal.SIGHUP)  # a closed ssh session: ignored
    seen_done = []
    victim = _worker_pids(out)[0]
    os.kill(victim, signal.SIGKILL)
    run.wait_until(lambda: victim not in _worker_pids(out) and len(_worker_pids(out)) >= 1, 30, "restart")
    while run.proc.poll() is None:
        run.sample_tree()
        status = status_json(out)
        if status:
            seen_done.append(status["done"])
        time.sleep(0.3)
    code, stdout, stderr = run.wait()
    assert code == 0, stderr
    assert "worker died (killed by SIGKILL" in stdout and "interrupted" not in stdout
    done_lines = re.findall(r"\] done (case_\d+) ", stdout)
    assert sorted(done_lines) == sorted(set(done_lines)) and len(done_lines) == NUM_CASES, "each case done once"
    assert_same_predictions(out, reference)
    final = status_json(out)
    assert final["done"] == NUM_CASES and sum(p["restarts"] for p in final["parts"]) == 1
    assert seen_done == sorted(seen_done), "status progress only grows"
    assert run.alive_descendants() == [], "no process of the run is left, nnU-Net's helpers included"


def test_supervisor_sigkill_takes_every_worker_down_and_rerun_resumes(tiny, reference, tmp_path, launch):
    out = tmp_path / "out"
    run = launch(run_args(tiny, out, "--workers", "2"))
    run.wait_until(lambda: _done(out) >= 3, 240, "three cases done")
    finished_before = {n: m for n, m in copy_outputs_mtimes(out).items() if n.endswith(".nii.gz")}
    run.sample_tree()
    assert len(run.seen) >= 4, "workers and their nnU-Net helpers were seen"
    run.proc.kill()
    run.proc.wait()
    assert wait_gone(list(run.seen), run.seen, timeout=5) == [], "everything under the killed supervisor exits in 5 s"

    result = cli(*run_args(tiny, out, "--workers", "2"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, reference)
    after = copy_outputs_mtimes(out)
    assert {n: after[n] for n in finished_before} == finished_before, "finished cases were not predicted again"


def test_sigint_stops_with_130_leaves_nothing_running_and_rerun_completes(tiny, reference, tmp_path, launch):
    out = tmp_path / "out"
    run = launch(run_args(tiny, out, "--workers", "2"))
    run.wait_until(lambda: _done(out) >= 1, 240, "a case done")
    run.sample_tree()
    started = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    code, _, stderr = run.wait(timeout=30)
    assert code == 130
    assert time.monotonic() - started < 15
    assert "resume with: nnunet-launch run" in stderr
    assert wait_gone(list(run.seen), run.seen, timeout=5) == []
    status = status_json(out)
    assert status["running"] == 0 and status["launcher_running"] is False
    assert not any(p.name.endswith(".nii.gz") for p in (out / ".nnunet-launch" / "tmp").rglob("*"))

    result = cli(*run_args(tiny, out, "--workers", "2"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, reference)
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    assert [r["exit_code"] for r in summary["runs"]] == [130, 0], "the report keeps every run"
    totals = summary["over_all_runs"]
    assert totals["runs"] == 2 and 0 < totals["done"] == sum(r["done"] for r in summary["runs"]) <= NUM_CASES
    assert (out / ".nnunet-launch" / "report.html").is_file() and (out / ".nnunet-launch" / "report.png").is_file()


def test_second_launcher_on_a_held_output_folder_is_refused_within_a_second(tiny, tmp_path, launch):
    out = tmp_path / "out"
    run = launch(run_args(tiny, out, "--workers", "1"))
    run.wait_until(lambda: bool(_worker_pids(out)), 120, "first launcher running")
    started = time.monotonic()
    second = cli(*run_args(tiny, out, "--workers", "1"), timeout=30)
    assert second.returncode == 2
    assert time.monotonic() - started < 5  # process start included; the lock itself never waits
    assert f"pid {run.proc.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert status_json(out)["launcher_running"] is True
