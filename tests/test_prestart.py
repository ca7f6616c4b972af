"""Each slot's first worker starts once the run is planned (processes.Prestarted): it pins its
device, starts its helper server and imports the backend, the first one checks the model, then
they wait for their cases. They write nothing of the run before they come, and one that gets none
(a refusal, no work for its slot) ends, leaving no process and no socket folder behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import assert_fake_outputs, fake_env, run_args, wait_gone
from launcher.fake_backend import FAULT_DIR_ENV, MODEL_LOAD_S_ENV, MODEL_LOADS_ENV


def _run_to_the_end(launch, args: list[str], env: dict) -> tuple[int, str, str, object]:
    run = launch(args, env)
    deadline = time.monotonic() + 120
    while run.proc.poll() is None and time.monotonic() < deadline:
        run.sample_tree()  # every process the launcher started, the prestarted ones included
        time.sleep(0.02)
    code, stdout, stderr = run.wait(timeout=60)
    return code, stdout, stderr, run


def _loads(env: dict) -> list[int]:
    """The pid of each load of the stand-in's model, in order (fake_backend.MODEL_LOADS_ENV)."""
    return [int(pid) for pid in (Path(env[FAULT_DIR_ENV]) / "model.loads").read_text().split()]


def _pid(log_line: str) -> int:
    return int(re.search(r" pid (\d+) ", log_line).group(1))


def test_a_slots_first_worker_checks_the_model_before_its_cases_and_a_restarted_one_starts_anew(
    cases, tmp_path, launch, short_temp
):
    out = tmp_path / "out"
    faults = {cases["ids"][0]: "cuda_error:1"}  # its worker ends: the part's second worker is a new process
    env = {**fake_env(tmp_path, faults), MODEL_LOAD_S_ENV: "1", MODEL_LOADS_ENV: "100", "TMPDIR": str(short_temp)}
    code, stdout, stderr, run = _run_to_the_end(launch, run_args(cases, out, "--workers", "1"), env)
    assert code == 0, stdout + stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    logs = out / ".nnunet-launch" / "logs"
    first = (logs / "run-1.part-0.attempt-1.log").read_text().splitlines()[0]
    second = (logs / "run-1.part-0.attempt-2.log").read_text().splitlines()[0]
    assert re.search(r" prestarted \(ready \d+\.\d s before its cases\) ", first), first
    assert "prestarted" not in second
    # the check was the first worker's own first load (no process of its own), then each worker's
    assert _loads(env) == [_pid(first), _pid(first), _pid(second)]
    assert wait_gone(run.alive_descendants(), run.seen, timeout=10) == []
    assert list(short_temp.iterdir()) == []


def test_a_run_whose_checking_worker_dies_before_it_answers_checks_the_model_without_it_and_predicts(
    cases, tmp_path, launch, short_temp
):
    out = tmp_path / "out"
    env = {**fake_env(tmp_path), MODEL_LOAD_S_ENV: "2", MODEL_LOADS_ENV: "100", "TMPDIR": str(short_temp)}
    run = launch(run_args(cases, out, "--workers", "1"), env)
    checker, deadline = None, time.monotonic() + 60
    while checker is None and time.monotonic() < deadline:  # the prestarted worker, loading for 2 s
        for child in psutil.Process(run.proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "multiprocessing.spawn" in " ".join(child.cmdline()):
                    checker = child.pid
        time.sleep(0.02)
    assert checker is not None
    while os.getpgid(checker) != checker and time.monotonic() < deadline:
        time.sleep(0.02)  # its first step, setsid: then its group holds its helper server too
    run.sample_tree()
    os.killpg(checker, signal.SIGKILL)  # the worker with its helper server
    code, stdout, stderr = run.wait(timeout=120)
    assert code == 0, stdout + stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    worker = (out / ".nnunet-launch" / "logs" / "run-1.part-0.attempt-1.log").read_text().splitlines()[0]
    assert "prestarted" not in worker
    # the stand-in's fallback check loads in the launcher's own process (a real model: in a child)
    assert _loads(env) == [run.proc.pid, _pid(worker)]
    assert wait_gone(run.alive_descendants(), run.seen, timeout=10) == []
    # (the SIGKILLed worker's socket folder stays: nothing ran in it to remove it)


@pytest.mark.parametrize("why", ["the model cannot load", "more workers than cases"])
def test_prestarted_workers_that_get_no_cases_end_and_leave_no_process_nor_socket_folder(
    why, cases, tmp_path, launch, short_temp
):
    out = tmp_path / "out"
    env = {**fake_env(tmp_path), MODEL_LOAD_S_ENV: "1", "TMPDIR": str(short_temp)}
    inputs = tmp_path / "two"
    inputs.mkdir()
    for case_id in cases["ids"][:2]:
        (inputs / f"{case_id}_0000.nii.gz").hardlink_to(cases["inputs"] / f"{case_id}_0000.nii.gz")
    two = {"inputs": inputs, "model": cases["model"], "ids": cases["ids"][:2]}
    if why == "the model cannot load":
        env[MODEL_LOADS_ENV] = "0"
    code, stdout, stderr, run = _run_to_the_end(launch, run_args(two, out, "--workers", "3"), env)
    assert len(run.seen) >= 3, "every slot's worker was started"
    if why == "the model cannot load":
        assert code == 2 and "cannot load the model" in stderr, stdout + stderr
        assert not out.exists(), "nothing written into OUT"
    else:
        assert code == 0, stdout + stderr
        assert_fake_outputs(out, inputs, two["ids"])
        assert len(list((out / ".nnunet-launch" / "logs").glob("run-*.part-*.log"))) == 2
    assert wait_gone(run.alive_descendants(), run.seen, timeout=10) == []
    assert list(short_temp.iterdir()) == []


def test_workers_start_from_torch_multiprocessings_spawn_context_which_is_the_standard_librarys():
    """The supervisor takes it from the standard library, so that it never imports torch
    (processes.spawn_context): the same object, as long as torch re-exports multiprocessing."""
    import torch.multiprocessing

    from launcher.processes import spawn_context

    assert spawn_context() is torch.multiprocessing.get_context("spawn")


def test_a_runs_supervisor_never_imports_torch_nor_nnunet(cases, tmp_path):
    """Its workers' start waited for torch's import (seconds), and its exit for torch's teardown."""
    out, seen = tmp_path / "out", tmp_path / "imported.json"
    script = (
        "import json, runpy, sys\ncode = 0\n"
        "try:\n    runpy.run_module('launcher', run_name='__main__')\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        f"open({str(seen)!r}, 'w').write(json.dumps([code, sorted({{m.split('.')[0] for m in sys.modules}})]))\n"
    )
    args = run_args(cases, out, "--workers", "1")
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **fake_env(tmp_path)})  # fmt: skip
    code, modules = json.loads(seen.read_text())
    assert code == 0, result.stdout + result.stderr
    assert "matplotlib" in modules, "the run's picture was drawn"
    assert "torch" not in modules and "nnunetv2" not in modules
