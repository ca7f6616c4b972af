"""Failure semantics through the real supervisor, workers, pools, journal and signals, with the
fault-injecting stand-in for nnU-Net (launcher/fake_backend.py): crash isolation, the progress
watchdog, interruptions that charge nothing, reruns that retry failed cases, a full disk.
Seconds per test; tests/test_failure_policy.py proves the same with real nnU-Net."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest

from conftest import (
    assert_fake_outputs,
    case_rows,
    cli,
    copy_outputs_mtimes,
    fake_env,
    run_args,
    status_json,
    wait_gone,
)
from launcher.fake_backend import MODEL_LOAD_S_ENV
from launcher.headers import read_header
from launcher.worker import FAULTY_DEVICES_ENV


def _run(cases, out, env, *extra, timeout=120):
    return cli(*run_args(cases, out, *extra), env=env, timeout=timeout)


def _events(out, kind=None) -> list[tuple]:
    db = sqlite3.connect(f"file:{out / '.nnunet-launch' / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT kind, part, case_id, message FROM events ORDER BY id").fetchall()
    finally:
        db.close()


def test_a_case_that_kills_its_worker_every_time_fails_alone_on_one_worker_and_the_rest_is_predicted(cases, tmp_path):
    out = tmp_path / "out"
    result = _run(cases, out, fake_env(tmp_path, {"case_005": "crash"}), "--workers", "1")
    assert result.returncode == 1, result.stderr
    others = [c for c in cases["ids"] if c != "case_005"]
    assert_fake_outputs(out, cases["inputs"], others)
    status = status_json(out)
    assert status["done"] == 23 and [f["case"] for f in status["failed_cases"]] == ["case_005"]
    assert "alone" in status["failed_cases"][0]["error"] and "SIGSEGV" in status["failed_cases"][0]["error"]
    assert "case_005 is suspected and will be retried alone" in result.stdout
    assert case_rows(out)["case_005"]["attempts"] == "3", "1 + --case-retries 2, all of them alone"
    assert "gave up" not in result.stdout and "suspected (" not in result.stdout, "the device was not blamed"
    assert "FAILED case_005" in result.stderr


def test_a_burst_of_external_kills_delays_the_run_but_fails_nothing(cases, tmp_path, launch):
    out = tmp_path / "out"
    run = launch(run_args(cases, out, "--workers", "2"), env=fake_env(tmp_path, case_seconds=1.0))
    rng = random.Random(7)
    kills = 0
    run.wait_until(lambda: (status_json(out) or {}).get("done", 0) >= 1, 60, "a case done")
    while kills < 8 and run.proc.poll() is None:
        run.sample_tree()
        victims = [p for p in run.seen if p != run.proc.pid and _alive(p)]
        if victims:
            os.kill(rng.choice(sorted(victims)), signal.SIGKILL)  # a worker or one of its helpers
            kills += 1
        time.sleep(rng.uniform(0.5, 1.5))
    code, stdout, stderr = run.wait(timeout=180)
    assert kills >= 6
    assert code == 0, stdout + stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    assert "gave up" not in stdout
    assert all(row["state"] == "done" for row in case_rows(out).values())


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_helper_that_hangs_is_caught_by_the_progress_watchdog_and_its_case_retried_alone(cases, tmp_path):
    out = tmp_path / "out"
    env = fake_env(tmp_path, {"case_003": "helper_hang:1", "case_007": "helper_hang"})
    result = _run(cases, out, env, "--workers", "2", "--hang-timeout", "2")
    assert result.returncode == 1, result.stderr
    assert "hung: no progress for 2 s (case_003 in preprocess" in result.stdout
    assert_fake_outputs(out, cases["inputs"], [c for c in cases["ids"] if c != "case_007"])
    rows = case_rows(out)
    assert rows["case_003"]["state"] == "done" and rows["case_003"]["attempts"] == "1", "suspected, not charged"
    assert rows["case_007"]["state"] == "failed" and "hung" in rows["case_007"]["error"]


def test_a_long_prediction_that_reports_progress_is_not_a_hang_but_a_silent_one_is(cases, tmp_path):
    out = tmp_path / "out"
    env = fake_env(tmp_path, {"case_001": "slow:6", "case_002": "hang:1"})
    result = _run(cases, out, env, "--workers", "2", "--hang-timeout", "2.5")
    assert result.returncode == 0, result.stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    assert "case_001 in" not in result.stdout, "6 s of sliding-window steps, each under 2.5 s apart"
    assert re.search(r"hung: no progress for \d+ s \([^)]*case_002 in predict", result.stdout), result.stdout


def _signal_every_process(run) -> None:
    """What SLURM and systemd do: SIGTERM to every process of the job at once."""
    run.sample_tree()
    for pid in [run.proc.pid, *run.seen]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.mark.accelerator  # the worker's fault paths (pipeline.py, worker.py: the same on every device)
def test_sigterm_to_every_process_three_times_charges_nothing_spawns_nothing_and_a_rerun_finishes(
    cases, tmp_path, launch
):
    out = tmp_path / "out"
    env = fake_env(tmp_path, case_seconds=0.5)
    args = run_args(cases, out, "--workers", "2")
    for round_ in range(3):
        run = launch(args, env=env)
        done_before = (status_json(out) or {}).get("done", 0)
        run.wait_until(lambda b=done_before: (status_json(out) or {}).get("done", 0) > b + 1, 60, "cases done")
        run.wait_until(lambda r=run: len(r.seen) >= 4, 30, "workers and helpers up")
        _signal_every_process(run)
        code, stdout, stderr = run.wait(timeout=60)
        assert code == 130, stdout + stderr
        assert "worker died" not in stdout and "suspected" not in stdout, f"round {round_}: an interruption"
        assert wait_gone(list(run.seen), run.seen, timeout=10) == []
        events = [e[0] for e in _events(out)]
        last = len(events) - 1 - events[::-1].index("interrupted")
        assert "spawn" not in events[last:], "nothing spawned after the stop signal"
        status = status_json(out)
        assert status["failed"] == 0 and status["running"] == 0
    result = _run(cases, out, env, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    assert {row["attempts"] for row in case_rows(out).values()} == {"1"}, "no interrupted attempt counted"


def test_a_sigterm_to_the_supervisor_alone_is_an_interruption_too(cases, tmp_path, launch):
    out = tmp_path / "out"
    run = launch(run_args(cases, out, "--workers", "2", "--fresh"), env=fake_env(tmp_path, case_seconds=0.5))
    run.wait_until(lambda: (status_json(out) or {}).get("done", 0) >= 2, 60, "cases done")
    run.proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = run.wait(timeout=60)
    assert code == 130
    assert "worker died" not in stdout
    hint = next(line for line in stderr.splitlines() if "resume with:" in line)
    assert "--fresh" not in hint, "pasting the hint must not discard the finished outputs"
    assert "--workers 2" in hint


@pytest.mark.accelerator  # the worker's fault paths (pipeline.py, worker.py: the same on every device)
def test_a_failed_case_is_retried_by_the_same_command_once_its_scan_is_fixed(cases, tmp_path):
    out = tmp_path / "out"
    env = fake_env(tmp_path, {"case_004": "unreadable"})
    first = _run(cases, out, env, "--workers", "2")
    assert first.returncode == 1
    assert (
        "FAILED case_004: cannot read the scan: RuntimeError: Exception thrown in SimpleITK ReadImage" in first.stderr
    )
    assert case_rows(out)["case_004"]["attempts"] == "1", "a reader error cannot change: no retry"
    log = next(line for line in first.stdout.splitlines() if "case case_004:" in line).split("log: ")[1].rstrip(")")
    log_text = open(log).read()
    assert "case case_004: cannot read the scan" in log_text and "Traceback" in log_text
    before = copy_outputs_mtimes(out)

    second = _run(cases, out, fake_env(tmp_path), "--workers", "2")
    assert second.returncode == 0, second.stderr
    assert "1 failed case(s) of the last run tried again" in second.stdout
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    after = copy_outputs_mtimes(out)
    assert {n: after[n] for n in before if n.startswith("case_")} == {
        n: m for n, m in before.items() if n.startswith("case_")
    }


@pytest.mark.accelerator  # the worker's fault paths (pipeline.py, worker.py: the same on every device)
def test_a_full_disk_stops_the_run_with_a_clear_line_and_the_next_run_resumes(cases, tmp_path):
    out = tmp_path / "out"
    first = _run(cases, out, fake_env(tmp_path, {"case_006": "disk_full:1"}), "--workers", "2")
    assert first.returncode == 75, first.stdout + first.stderr
    assert "No space left on device" in first.stdout
    status = status_json(out)
    assert status["failed"] == 0 and "case_006" not in {f["case"] for f in status["failed_cases"]}
    second = _run(cases, out, fake_env(tmp_path, {"case_006": "disk_full:1"}), "--workers", "2")
    assert second.returncode == 0, second.stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])


@pytest.mark.accelerator  # the worker's fault paths (pipeline.py, worker.py: the same on every device)
def test_a_killed_helper_ends_its_worker_and_a_failed_preprocessing_or_prediction_is_retried_all_predicted(
    cases, tmp_path
):
    out = tmp_path / "out"
    env = fake_env(tmp_path, {"case_003": "helper_crash:1", "case_005": "error:1", "case_007": "prep_error:1"})
    result = _run(cases, out, env, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    assert "an nnU-Net preprocess helper died (killed by SIGKILL)" in result.stdout
    assert "case case_005: prediction failed:" in result.stdout
    assert case_rows(out)["case_005"]["attempts"] == "2"
    assert "case case_007: preprocessing failed: ValueError: fake preprocessing error" in result.stdout
    assert case_rows(out)["case_007"]["attempts"] == "2"


@pytest.mark.accelerator  # the worker's fault paths (pipeline.py, worker.py: the same on every device)
def test_out_of_memory_retries_the_case_alone_in_a_fresh_worker_and_a_cuda_error_ends_the_worker(cases, tmp_path):
    out = tmp_path / "out"
    env = fake_env(tmp_path, {"case_002": "oom:1", "case_009": "cuda_error:1"})
    result = _run(cases, out, env, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    assert "case case_002: prediction failed: FakeOutOfMemory" in result.stdout
    assert "will retry alone in a new worker" in result.stdout
    assert "CUDA error while predicting case_009" in result.stdout
    assert "[cpu] suspected (1 unexplained death(s) in a row" in result.stdout, "a CUDA error counts against the device"
    rows = case_rows(out)
    assert rows["case_002"]["attempts"] == "2" and rows["case_009"]["attempts"] == "1"


@pytest.mark.accelerator  # the worker's fault paths (pipeline.py, worker.py: the same on every device)
@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_a_device_whose_workers_always_die_rests_while_the_others_take_its_cases(cases, tmp_path, schedule):
    out = tmp_path / "out"
    env = {**fake_env(tmp_path), FAULTY_DEVICES_ENV: "cpu-slot-0"}
    result = _run(cases, out, env, "--workers", "2", "--schedule", schedule)
    assert result.returncode == 0, result.stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    assert "[cpu] suspected (1 unexplained death(s) in a row" in result.stdout
    assert "no case was running: counted against the device" in result.stdout
    parts = {p["part_id"]: p for p in status_json(out)["parts"]}
    assert parts[1]["done"] + parts[0]["done"] == 24 and parts[1]["done"] >= 12


def test_the_run_ends_unfinished_only_when_the_last_part_exceeds_max_restarts(cases, tmp_path):
    out = tmp_path / "out"
    env = {**fake_env(tmp_path), FAULTY_DEVICES_ENV: "cpu-slot-0"}
    result = _run(cases, out, env, "--workers", "1", "--max-restarts", "1")
    assert result.returncode == 1
    assert "part 0 gave up: its worker died 2 times without finishing a case (--max-restarts 1" in result.stdout
    assert "24 case(s) not predicted: every worker that could run it gave up" in result.stdout
    assert not [p for p in out.iterdir() if p.name.startswith("case_")]
    for numbers in (status_json(out), json.loads((out / ".nnunet-launch" / "summary.json").read_text())):
        lines = [*numbers["parts"], numbers["unassigned"]]
        assert sum(p["total"] for p in lines) == numbers["total"] == 24, "part lines and totals add up"
        assert sum(p["failed"] for p in lines) == numbers["failed"] == 24
    assert "not taken by any part: 0 waiting, 21 failed" in result.stderr, "3 cases were on part 0 when it gave up"


def test_status_exit_code_says_whether_the_run_finished_every_case(cases, tmp_path):
    out = tmp_path / "out"
    assert _run(cases, out, fake_env(tmp_path, {"case_001": "unreadable"}), "--workers", "2").returncode == 1
    failed = cli("status", str(out))
    assert failed.returncode == 1 and "FAILED case_001" in failed.stdout
    assert re.search(r"part \d \(cpu\): \d+/\d+ done, 1 failed", failed.stdout), "part lines count failed cases"
    assert _run(cases, out, fake_env(tmp_path), "--workers", "2").returncode == 0
    assert cli("status", str(out)).returncode == 0


def test_status_reads_an_output_folder_whose_path_needs_percent_encoding(cases, tmp_path):
    out = tmp_path / "a%20b #c?d"
    result = _run(cases, out, fake_env(tmp_path), "--workers", "1")
    assert result.returncode == 0, result.stderr
    status = cli("status", str(out), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["done"] == 24


def test_an_internal_error_exits_70_with_the_traceback_in_supervisor_log(cases, tmp_path):
    out = tmp_path / "out"
    script = (
        "import sys\n"
        "from launcher import supervisor\n"
        "def broken(self): raise KeyError('a bug')\n"
        "supervisor.Supervisor.run = broken\n"
        "from launcher.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *run_args(cases, out, "--workers", "1")],
        capture_output=True,
        text=True,
        env={**os.environ, **fake_env(tmp_path)},
        timeout=120,
    )
    assert result.returncode == 70, result.stderr
    assert "internal error: KeyError" in result.stderr
    log = (out / ".nnunet-launch" / "logs" / "supervisor.log").read_text()
    assert "Traceback" in log and "KeyError: 'a bug'" in log
    assert json.loads((out / ".nnunet-launch" / "summary.json").read_text())["exit_code"] == 70


def test_fresh_is_refused_as_a_config_file_setting(cases, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("fresh = true\n")
    result = cli(*run_args(cases, tmp_path / "out", "--config", str(config)))
    assert result.returncode == 2
    assert "'fresh' cannot be a setting" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_truncated_input_is_never_predicted_and_fails_naming_the_file(cases, tmp_path):
    inputs = tmp_path / "cut"
    shutil.copytree(cases["inputs"], inputs)
    scan = inputs / "case_010_0000.nii.gz"
    data = scan.read_bytes()
    scan.unlink()  # a hard link: write a new file, not through to the shared one
    scan.write_bytes(data[:20_000])  # what a failed copy leaves
    out = tmp_path / "out"
    result = _run({**cases, "inputs": inputs}, out, fake_env(tmp_path), "--workers", "2")
    assert result.returncode == 1
    assert "FAILED case_010: input case_010_0000.nii.gz is truncated or corrupt (gzip check:" in result.stderr
    assert_fake_outputs(out, inputs, [c for c in cases["ids"] if c != "case_010"])
    assert "spawn" not in [e[0] for e in _events(out) if e[2] == "case_010"]
    assert case_rows(out)["case_010"]["attempts"] == "0", "never handed to a worker"


def test_files_with_another_ending_are_named_in_a_warning(cases, tmp_path):
    inputs = tmp_path / "mixed"
    shutil.copytree(cases["inputs"], inputs)
    (inputs / "case_100_0000.nii").write_bytes(b"x")
    (inputs / "notes.txt").write_text("x")
    result = _run({**cases, "inputs": inputs}, tmp_path / "out", fake_env(tmp_path), "--workers", "1")
    assert result.returncode == 0, result.stderr
    warning = "warning: 2 file(s) in the input folder do not end in '.nii.gz' and are skipped:"
    assert f"{warning} 'case_100_0000.nii', 'notes.txt'" in result.stdout


def test_a_small_set_keeps_every_worker_busy_while_cases_wait_unstarted(tiny, tmp_path):
    """Equal cases, one slow: the other worker must not sit idle while the slow one holds cases it
    has not started (they are handed out within a fair share, and given back on request)."""
    inputs = tmp_path / "equal"
    inputs.mkdir()
    ids = [f"case_{i:03d}" for i in range(6)]
    source = next(tiny["inputs"].glob("case_000_0000.nii.gz"))
    for case_id in ids:
        os.link(source, inputs / f"{case_id}_0000.nii.gz")
    data = {"inputs": inputs, "model": tiny["model"]}
    out = tmp_path / "out"
    env = fake_env(tmp_path, {"case_000": "slow:8"}, case_seconds=0.3)
    result = _run(data, out, env, "--workers", "2")
    assert result.returncode == 0, result.stderr
    by_part = {}
    for line in result.stdout.splitlines():
        if match := re.search(r"\[part (\d) cpu\] done (case_\d+)", line):
            by_part.setdefault(int(match.group(1)), []).append(match.group(2))
    slow_part = next(p for p, done in by_part.items() if "case_000" in done)
    assert len(by_part[slow_part]) <= 2, f"the slow worker kept at most the case it had started: {by_part}"
    assert len(by_part[1 - slow_part]) >= 4


def test_a_deleted_probabilities_file_makes_its_case_unfinished_on_resume(cases, tmp_path):
    """With --save_probabilities a case's outputs are its .npz and .pkl too: one deleted after
    the run is predicted again by the same command (else verify would ask for it forever)."""
    out = tmp_path / "out"
    env = fake_env(tmp_path)
    args = run_args(cases, out, "--workers", "2", "--save_probabilities")
    assert cli(*args, env=env, timeout=300).returncode == 0
    (out / "case_003.npz").unlink()
    (out / "case_007.pkl").unlink()
    before = copy_outputs_mtimes(out)
    plan = json.loads(cli("plan", *args[1:], "--json", env=env).stdout)
    assert (plan["done"], plan["to_do"]) == (len(cases["ids"]) - 2, 2)
    again = cli(*args, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (out / "case_003.npz").is_file() and (out / "case_007.pkl").is_file()
    after = copy_outputs_mtimes(out)
    assert {n for n in before if after[n] != before[n]} == {
        f"case_{i:03d}{e}" for i in (3, 7) for e in (".nii.gz", ".npz", ".pkl")
    } - {"case_003.npz", "case_007.pkl"}


def test_a_case_that_always_raises_cuda_errors_fails_alone_and_every_other_case_is_predicted(cases, tmp_path):
    """A CUDA error first suspects the device (it rests, the case goes behind the others); once
    the device finished another case and the error comes back with the same case, the case is
    why: it fails, and the healthy cases were all predicted (before: 0 of 24, the part gave up)."""
    out = tmp_path / "out"
    result = _run(cases, out, fake_env(tmp_path, {"case_005": "cuda_error"}), "--workers", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert_fake_outputs(out, cases["inputs"], [c for c in cases["ids"] if c != "case_005"])
    assert "case_005 goes back to the queue behind the other cases" in result.stdout
    assert "its CUDA errors follow it" in result.stdout and "gave up" not in result.stdout
    status = status_json(out)
    assert [f["case"] for f in status["failed_cases"]] == ["case_005"]
    assert status["done"] + status["failed"] == status["total"] == 24
    assert sum(p["done"] + p.get("failed", 0) for p in status["parts"]) == 24, "the part line adds up"


def test_an_outside_sigkill_of_a_starting_worker_charges_nothing_and_suspects_no_device(cases, tmp_path, launch):
    """SIGKILL without an OOM kill counted names no device: with no case started, nothing is
    charged, no device rests, and such kills never use up --max-restarts (before: the device
    rested 5, 10, 20 ... s after each, and the part gave up)."""
    out = tmp_path / "out"
    env = {**fake_env(tmp_path, case_seconds=0.2), MODEL_LOAD_S_ENV: "1"}  # a worker starts for 1 s
    run = launch(run_args(cases, out, "--workers", "1", "--max-restarts", "1"), env=env)
    killed: set[int] = set()
    deadline = time.monotonic() + 120
    while len(killed) < 3 and time.monotonic() < deadline and run.proc.poll() is None:
        # a worker with its cases (a prestarted one waited for them), none of them started yet
        for pid in _worker_pids_in_logs(out) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.02)
    code, stdout, stderr = run.wait(timeout=180)
    assert len(killed) == 3, stdout
    assert code == 0, stdout + stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    assert stdout.count("(killed): nothing charged, the device not suspected") == 3, stdout
    assert "suspected (" not in stdout and "gave up" not in stdout
    assert all(row["attempts"] == "1" for row in case_rows(out).values())


def _worker_pids_in_logs(out) -> set[int]:
    """The workers that have a log: its first line names the worker's pid."""
    pids = set()
    for log in (out / ".nnunet-launch" / "logs").glob("run-*.part-*.log"):
        pids.update(
            int(pid) for pid in re.findall(r"^\S+ \S+ nnunet-launch worker .* pid (\d+) ", log.read_text(), re.M)
        )
    return pids


def test_a_slot_that_took_over_a_part_logs_its_own_deaths_under_its_own_part(cases, tmp_path):
    """Static schedule: part 0's device always fails, and while it rests slot 1 takes over its
    cases; a death there is slot 1's (its restarts, its --max-restarts), and says so."""
    out = tmp_path / "out"
    env = {**fake_env(tmp_path, {"case_010": "crash:1"}), FAULTY_DEVICES_ENV: "cpu-slot-0"}
    result = _run(cases, out, env, "--workers", "2", "--schedule", "static", "--max-restarts", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    assert "[part 1, on part 0's cases] worker died (killed by SIGSEGV)" in result.stdout, result.stdout


def test_the_worker_predicts_a_small_case_whose_preprocessing_is_done_while_the_large_one_still_preprocesses(
    tiny, tmp_path
):
    """Largest first: the large case's preprocessing starts first and takes longest. The device
    must not wait for it while a smaller case is ready (predicted in the order they are ready)."""
    sources = sorted(tiny["inputs"].glob("*_0000.nii.gz"), key=lambda p: read_header(str(p)).voxels)
    inputs = tmp_path / "sizes"
    inputs.mkdir()
    for case_id, source in (("case_000", sources[-1]), ("case_001", sources[0]), ("case_002", sources[1])):
        os.link(source, inputs / f"{case_id}_0000.nii.gz")
    out = tmp_path / "out"
    env = fake_env(tmp_path, {"case_000": "slow_prep:4"})
    result = _run({"inputs": inputs, "model": tiny["model"]}, out, env, "--workers", "1", "-npp", "2")
    assert result.returncode == 0, result.stderr
    rows = case_rows(out)
    assert rows["case_000"]["started"] <= rows["case_001"]["started"], "the largest case is handed out first"
    done = re.findall(r"\] done (case_\d+)", result.stdout)
    assert done.index("case_001") < done.index("case_000"), result.stdout
    assert float(rows["case_001"]["wait_s"]) < 2, "predicted once ready, not after the large case"
