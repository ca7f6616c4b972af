"""The unattended night: a run outlives its terminal, and how it ends (exit code, report,
--on-finish) is decided by what it recorded, never by a write to a screen nobody reads."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import subprocess
import termios
import threading
import time

import psutil
import pytest

from conftest import cli, fake_env, launcher_cmd, run_args, status_json, wait_gone


def _with_controlling_terminal() -> None:
    """In the child: a session of its own whose controlling terminal is the pty on fd 0, as a
    shell in an ssh session or a tmux window starts the launcher."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _on_finish_writes_exit_code(path) -> str:
    return f'printf %s "$NNUNET_LAUNCH_EXIT_CODE" > {shlex.quote(str(path))}'


def test_a_terminal_closed_mid_run_leaves_the_report_the_exit_code_and_the_on_finish_of_a_finished_run(cases, tmp_path):
    out, told = tmp_path / "out", tmp_path / "told"
    args = run_args(cases, out, "--workers", "2", "--on-finish", _on_finish_writes_exit_code(told))
    master, terminal = os.openpty()
    process = subprocess.Popen(
        launcher_cmd(*args),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        preexec_fn=_with_controlling_terminal,
        env={**os.environ, **fake_env(tmp_path, case_seconds=0.4)},
    )
    os.close(terminal)
    try:
        screen = bytearray()

        def read_screen():  # as a terminal does: the launcher's writes never block on a full pty
            try:
                while chunk := os.read(master, 65536):
                    screen.extend(chunk)
            except OSError:
                pass  # the terminal is closed

        reader = threading.Thread(target=read_screen, daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while (status_json(out) or {}).get("done", 0) < 3:
            assert process.poll() is None and time.monotonic() < deadline, bytes(screen).decode(errors="replace")
            time.sleep(0.2)
        os.close(master)  # the ssh connection drops: SIGHUP, and every later write to the terminal fails
        code = process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0
    state = out / ".nnunet-launch"
    summary = json.loads((state / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["done"] == len(cases["ids"])
    assert (state / "cases.csv").is_file() and (state / "report.html").is_file()
    closing = "\n".join((state / "logs" / "supervisor.log").read_text().splitlines()[-10:])
    assert f"the run's picture: {state / 'report.html'}" in closing, "the run's closing lines are in its log"
    assert told.read_text() == "0"
    assert cli("status", str(out)).returncode == 0


def test_a_full_disk_before_the_supervisor_starts_exits_75_and_on_finish_is_told_75(cases, tmp_path):
    """The journal cannot be created (its file is /dev/full: every write fails with ENOSPC, as on
    a full disk): one line, exit 75 (rerun once there is space), not an internal error."""
    out, told = tmp_path / "out", tmp_path / "told"
    (out / ".nnunet-launch").mkdir(parents=True)
    (out / ".nnunet-launch" / "journal.sqlite").symlink_to("/dev/full")
    args = run_args(cases, out, "--workers", "2", "--on-finish", _on_finish_writes_exit_code(told))
    result = cli(*args, env=fake_env(tmp_path))
    assert result.returncode == 75, result.stderr
    assert "stopped: cannot write the journal" in result.stderr and "disk is full" in result.stderr
    assert "internal error" not in result.stderr
    assert told.read_text() == "75"


def test_a_sigkilled_launcher_is_shown_as_killed_its_cases_interrupted_and_the_rerun_says_so_first(
    cases, tmp_path, launch
):
    out = tmp_path / "out"
    env = fake_env(tmp_path, case_seconds=1.0)
    run = launch(run_args(cases, out, "--workers", "2"), env)
    run.wait_until(lambda: (status_json(out) or {}).get("done", 0) >= 2 and status_json(out)["running"], 120, "work")
    run.sample_tree()
    # each worker named in ps/top (not `python -c from multiprocessing.spawn ...`), its log lines stamped
    titles = {" ".join(psutil.Process(p["worker_pid"]).cmdline()).strip() for p in status_json(out)["parts"]}
    assert titles == {"nnunet-launch part 0 cpu", "nnunet-launch part 1 cpu"}, titles
    log = next((out / ".nnunet-launch" / "logs").glob("run-1.part-0.attempt-1.log")).read_text()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d nnunet-launch worker part 0 attempt 1 ", log), log[:200]
    run.proc.kill()
    run.proc.wait()
    assert wait_gone(list(run.seen), run.seen, 15) == [], "the workers end with their launcher"

    shown = cli("status", str(out))
    assert shown.returncode == 1
    first, counts = shown.stdout.splitlines()[:2]
    assert first.startswith("launcher: not running; the last run (pid ") and "was killed or died" in first
    assert "last seen alive 20" in first
    assert " interrupted, " in counts and " working" not in counts and " queued" not in counts, counts
    assert "interrupted on case_" in shown.stdout and ", on case_" not in shown.stdout
    info = status_json(out)
    assert info["running"] == 0 and info["interrupted"] >= 1 and info["eta_s"] is None
    assert info["last_run"]["died"] and info["last_run"]["seen"] >= info["last_run"]["started"]

    rerun = cli(*run_args(cases, out, "--workers", "2"), env=fake_env(tmp_path))
    assert rerun.returncode == 0, rerun.stderr
    assert " nnunet-launch: the last run (pid " in rerun.stdout.splitlines()[0], rerun.stdout
    assert f"its {info['interrupted']} case(s) in flight are predicted again" in rerun.stdout.splitlines()[0]
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    killed, last = summary["runs"]
    assert killed["died"] and killed["exit_code"] is None and killed["ended"] is not None
    assert not last["died"] and last["exit_code"] == 0


@pytest.mark.parametrize("command, loader", [("run", "multiprocessing.spawn"), ("plan", "launcher.model_check")])
def test_a_launcher_sigkilled_while_its_model_check_loads_leaves_no_process_loading_on(
    command, loader, tiny, tmp_path, launch
):
    """The model is loaded by `run`'s first prestarted worker, by `plan`'s child: torch's and
    nnU-Net's imports take seconds (more under load). When the launcher is SIGKILLed meanwhile,
    that process ends with it (and the worker's helper server too) instead of loading on."""
    args = run_args(tiny, tmp_path / "out", "--workers", "1")
    args[0] = command
    run = launch(args)
    deadline, loading = time.monotonic() + 60, None
    while loading is None and time.monotonic() < deadline:
        for process in psutil.Process(run.proc.pid).children():
            try:
                if loader in " ".join(process.cmdline()):
                    loading = process
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.02)
    assert loading is not None, f"the process loading the model ({loader}) was seen"
    while command == "run" and time.monotonic() < deadline:  # the worker's helper server is up
        run.sample_tree()
        if any("forkserver" in " ".join(_cmdline(pid)) for pid in run.alive_descendants()):
            break
        time.sleep(0.02)
    run.sample_tree()
    run.proc.kill()
    run.proc.wait()
    assert wait_gone(list(run.seen), run.seen, timeout=10) == [], "every process ended with its launcher"


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return []


def test_skip_bad_inputs_predicts_the_rest_and_names_every_skipped_one_in_the_summary_and_the_report(cases, tmp_path):
    inputs, out = cases["inputs"], tmp_path / "out"
    (inputs / "scan.nii.gz").write_bytes(b"")
    (inputs / "case_003_0000.nii.gz").rename(inputs / "case_003_0001.nii.gz")
    refused = cli(*run_args(cases, out, "--workers", "2"), env=fake_env(tmp_path))
    assert refused.returncode == 2 and "2 input problem(s)" in refused.stderr and not out.exists()
    result = cli(*run_args(cases, out, "--workers", "2", "--skip-bad-inputs"), env=fake_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "--skip-bad-inputs: not predicted: 'scan.nii.gz' does not follow nnU-Net's naming" in result.stdout
    assert "--skip-bad-inputs: not predicted: case 'case_003' is missing channel 0000" in result.stdout
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    assert summary["done"] == len(cases["ids"]) - 1 and len(summary["skipped_inputs"]) == 2
    assert "inputs skipped (2, --skip-bad-inputs)" in (out / ".nnunet-launch" / "report.html").read_text()
