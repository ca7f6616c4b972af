"""How a worker's helpers start (pipeline.start_helper_server): forked from a server that imported
the backend once, so a helper does not import torch and nnU-Net itself, with the environment the
worker had set when it started the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import ROOT, cli, fake_env, run_args

PROBE = """
import json, multiprocessing, os, sys
sys.path.insert(0, sys.argv[1])
from launcher import pipeline
os.environ["NNUNET_LAUNCH_PROBE"] = "set before the server"  # as the worker pins its device, threads, memory
pipeline.start_helper_server(["launcher.fake_backend"])
os.environ["NNUNET_LAUNCH_PROBE"] = "set after"
from multiprocessing import forkserver
with multiprocessing.get_context(pipeline.HELPER_START).Pool(2) as pool:
    print(json.dumps({
        "imported": pool.apply(eval, ("'launcher.fake_backend' in __import__('sys').modules",)),
        "environment": pool.apply(os.getenv, ("NNUNET_LAUNCH_PROBE",)),
        "parent": pool.apply(os.getppid),
        "server": forkserver._forkserver._forkserver_pid,
        "this": os.getpid(),
        "imported_here": "launcher.fake_backend" in sys.modules,
    }))
"""


def test_helpers_are_forked_from_a_server_that_imported_the_backend_with_the_workers_environment():
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(ROOT)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, _ = probe.communicate(timeout=120)
    finally:  # the probe, its server and the helpers: one process group
        try:
            os.killpg(probe.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        probe.wait()
    seen = json.loads(out)
    assert seen["imported"] and not seen["imported_here"]  # the server imported it, not the helper nor the worker
    assert seen["parent"] == seen["server"] != seen["this"]
    assert seen["environment"] == "set before the server"


def test_a_workers_idle_torch_threads_sleep_unless_the_user_chose_their_wait_policy(monkeypatch):
    """The worker sets it before torch starts, and its helper server takes the worker's environment
    (above): spinning OpenMP threads took the cores the helpers share (benchmarks/RESULTS.md)."""
    from launcher import worker

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "")  # so that the test's end restores it, set or not
        monkeypatch.delenv(name)
    worker._pin_device(None, 2)
    assert (os.environ["OMP_WAIT_POLICY"], os.environ["OMP_NUM_THREADS"]) == ("PASSIVE", "2")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    worker._pin_device(None, 2)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_workers_that_end_or_fail_leave_no_socket_folder_in_the_temp_folder(cases, tmp_path, short_temp):
    """A worker's helper server listens on a socket in a pymp-* folder of TMPDIR; a worker exits by
    os._exit, which skips multiprocessing's own removal: each one left a folder behind."""
    first = cases["ids"][0]
    env = {**fake_env(tmp_path, {first: "cuda_error:1"}), "TMPDIR": str(short_temp)}  # one worker ends on it
    result = cli(*run_args(cases, tmp_path / "out", "--workers", "2"), env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "; restart 1" in (tmp_path / "out" / ".nnunet-launch" / "logs" / "supervisor.log").read_text()
    assert sorted(p.name for p in short_temp.iterdir()) == []


def test_workers_start_their_helpers_under_a_temp_folder_too_long_for_a_socket(cases, tmp_path):
    """A socket's path has at most 107 bytes: under such a TMPDIR every worker died with "OSError:
    AF_UNIX path too long". The helper server's socket goes to a short temp folder instead."""
    temp = tmp_path / ("a-cluster's-per-job-temp-folder-" * 3)
    temp.mkdir()
    result = cli(*run_args(cases, tmp_path / "out", "--workers", "2"), env={**fake_env(tmp_path), "TMPDIR": str(temp)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker died" not in result.stdout, result.stdout
    assert list(temp.iterdir()) == []
