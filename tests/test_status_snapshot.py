"""Status and the lock on a shared filesystem (OUT on NFS/Lustre/GPFS, `status` on the login node):
the running launcher publishes a status snapshot that readers on other hosts use instead of the
journal, and the lock works where flock does not. Another host and a network filesystem are
simulated with the launcher's test seams (NNUNET_LAUNCH_TEST_HOST, NNUNET_LAUNCH_TEST_FS); the
runs are real launchers with the fast stand-in for nnU-Net (launcher/fake_backend.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_fake_outputs, cli, fake_env, run_args
from launcher import journal as journal_module
from launcher.errors import LauncherError
from launcher.journal import FILESYSTEM_ENV, HOST_ENV, LOCK_STALE_S, OutLock, filesystem_type, lock_holder


def _status(out, env: dict | None = None, *extra: str) -> subprocess.CompletedProcess:
    return cli("status", str(out), *extra, env=env)


def _wait(condition, timeout: float, what: str, process=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({process.proc.returncode}) before: {what}")
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.2)


def test_status_on_another_host_reads_the_snapshot_while_the_run_writes_its_journal(cases, tmp_path, launch):
    out = tmp_path / "out"
    writer = {**fake_env(tmp_path, case_seconds=1.0), HOST_ENV: "compute-7"}
    run = launch(run_args(cases, out, "--workers", "2"), env=writer)
    seen: list[dict] = []
    text = ""

    def read_once() -> bool:
        nonlocal text
        result = _status(out, None, "--json")
        if result.returncode != 0:  # the run has not opened OUT yet
            return False
        info = json.loads(result.stdout)
        # until the run publishes its first snapshot (once its journal is set up), its journal is read
        if not info["launcher_running"] or info["source"] != "snapshot":
            return False
        assert info["launcher_host"] == "compute-7", info
        assert info["launcher_pid"] == run.proc.pid
        assert sum(info[k] for k in ("done", "failed", "running", "pending")) == info["total"] == 24, info
        assert not seen or info["done"] >= seen[-1]["done"], "a snapshot never goes back"
        seen.append(info)
        if 0 < info["done"] < 24 and not text:
            text = _status(out).stdout
        return bool(text)

    _wait(read_once, 120, "a snapshot of the run half-way", run)
    assert "running (pid" in text and "on compute-7" in text and "from its status snapshot" in text, text
    code, _, err = run.wait(120)
    assert code == 0, err
    # no launcher any more: the journal itself, exact, is read
    after = json.loads(_status(out, None, "--json").stdout)
    assert after["source"] == "journal" and not after["launcher_running"]
    assert after["done"] == 24 and after["last_run"]["exit_code"] == 0
    final = json.loads((out / ".nnunet-launch" / "status.json").read_text())
    assert final["final"] is True and final["host"] == "compute-7" and final["status"]["done"] == 24


def test_on_a_network_filesystem_the_lock_is_a_heartbeat_file_and_a_dead_holder_is_taken_over(cases, tmp_path, launch):
    out = tmp_path / "out"
    env = {**fake_env(tmp_path, case_seconds=1.0), FILESYSTEM_ENV: "network"}
    state = out / ".nnunet-launch"
    first = launch(run_args(cases, out, "--workers", "2"), env=env)
    _wait(lambda: _done(out, env) >= 1, 120, "a case done", first)
    record = json.loads((state / "lock.excl").read_text())
    assert record["pid"] == first.proc.pid and isinstance(record["heartbeat"], float)
    assert not (state / "lock").exists(), "no flock on a network filesystem"
    info = json.loads(_status(out, env, "--json").stdout)
    assert info["source"] == "snapshot" and info["launcher_pid"] == first.proc.pid, "same host, network filesystem"

    second = cli(*run_args(cases, out, "--workers", "2"), env=env)
    assert second.returncode == 2 and f"pid {first.proc.pid} on host " in second.stderr, second.stderr

    first.sample_tree()
    os.kill(first.proc.pid, signal.SIGKILL)  # no release: the lock file stays behind
    first.proc.wait(30)
    assert (state / "lock.excl").exists()
    assert lock_holder(str(state / "lock")) is None, "its holder is gone (same host: by pid)"
    again = cli(*run_args(cases, out, "--workers", "2"), env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"taking over the stale lock of pid {first.proc.pid}" in again.stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    assert not (state / "lock.excl").exists(), "released"


def _done(out, env) -> int:
    result = _status(out, env, "--json")
    return json.loads(result.stdout)["done"] if result.returncode == 0 else 0


HOLD_LOCK = """
import sys, time
from launcher.journal import OutLock
OutLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _write_record(path, **record) -> None:
    path.write_text(json.dumps(record).ljust(512))


def test_exclusive_lock_refuses_a_beating_holder_on_another_host_and_takes_over_a_silent_one(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(FILESYSTEM_ENV, "network")
    path = tmp_path / "lock"
    excl = tmp_path / "lock.excl"
    elsewhere = {**os.environ, HOST_ENV: "node-b", FILESYSTEM_ENV: "network"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True, env=elsewhere
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(str(path)) == holder.pid, "another host's fresh heartbeat: running"
        with pytest.raises(LauncherError, match=f"pid {holder.pid} on host node-b"):
            OutLock(str(path)).acquire()  # refused once a heartbeat is seen (every 10 s)
    finally:
        holder.kill()
        holder.wait()

    # a fresh-looking lock of another host that never beats (its node died): waited for, then taken over
    _write_record(excl, pid=holder.pid, host="node-b", started=1.0, heartbeat=time.time() - LOCK_STALE_S + 1.5)
    lock = OutLock(str(path))
    lock.acquire()
    err = capsys.readouterr().err
    assert "waiting to see whether it is alive" in err
    assert f"taking over the stale lock of pid {holder.pid} on host node-b" in err
    assert json.loads(excl.read_text())["pid"] == os.getpid() and lock.mode == "exclusive"
    lock.release()
    assert not excl.exists()

    # stale for long: taken over at once
    _write_record(excl, pid=4242, host="node-c", started=1.0, heartbeat=time.time() - 10 * LOCK_STALE_S)
    lock = OutLock(str(path))
    lock.acquire()
    assert "waiting" not in capsys.readouterr().err
    lock.release()


def test_lock_falls_back_to_the_exclusive_file_where_flock_is_unsupported(tmp_path, monkeypatch):
    assert isinstance(filesystem_type(str(tmp_path)), int)
    monkeypatch.setenv(FILESYSTEM_ENV, "local")

    def no_flock(fd, operation):  # Lustre mounted without -o flock
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(journal_module.fcntl, "flock", no_flock)
    path = tmp_path / "lock"
    lock = OutLock(str(path))
    lock.acquire()
    try:
        assert lock.mode == "exclusive" and json.loads((tmp_path / "lock.excl").read_text())["pid"] == os.getpid()
        assert lock_holder(str(path)) == os.getpid()
        with pytest.raises(LauncherError, match=f"pid {os.getpid()}"):
            OutLock(str(path)).acquire()
    finally:
        lock.release()
    assert lock_holder(str(path)) is None
