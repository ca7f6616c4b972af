"""Each slot's first worker starts while the model is checked (processes.Prestarted): it pins its
device, starts its helper server and imports the backend, then waits for its cases. It writes
nothing of the run before they come, and one that gets none (a refusal, no work for its slot)
ends, leaving no process and no socket folder behind."""

from __future__ import annotations

import re
import time

import pytest

from conftest import assert_fake_outputs, fake_env, run_args, wait_gone
from launcher.fake_backend import MODEL_LOAD_S_ENV, MODEL_LOADS_ENV


def _run_to_the_end(launch, args: list[str], env: dict) -> tuple[int, str, str, object]:
    run = launch(args, env)
    deadline = time.monotonic() + 120
    while run.proc.poll() is None and time.monotonic() < deadline:
        run.sample_tree()  # every process the launcher started, the prestarted ones included
        time.sleep(0.02)
    code, stdout, stderr = run.wait(timeout=60)
    return code, stdout, stderr, run


def test_a_slots_first_worker_is_ready_before_the_model_check_ends_and_a_restarted_one_starts_anew(
    cases, tmp_path, launch, short_temp
):
    out = tmp_path / "out"
    faults = {cases["ids"][0]: "cuda_error:1"}  # its worker ends: the part's second worker is a new process
    env = {**fake_env(tmp_path, faults), MODEL_LOAD_S_ENV: "3", "TMPDIR": str(short_temp)}  # each load: 3 s
    code, stdout, stderr, run = _run_to_the_end(launch, run_args(cases, out, "--workers", "1"), env)
    assert code == 0, stdout + stderr
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    logs = out / ".nnunet-launch" / "logs"
    first = (logs / "run-1.part-0.attempt-1.log").read_text().splitlines()[0]
    waited = re.search(r" prestarted \(ready (\d+\.\d) s before its cases\) ", first)
    # it imported and started its helper server during the check's 3 s load, not after it
    assert waited and float(waited.group(1)) >= 1.0, first
    assert "prestarted" not in (logs / "run-1.part-0.attempt-2.log").read_text().splitlines()[0]
    assert wait_gone(run.alive_descendants(), run.seen, timeout=10) == []
    assert list(short_temp.iterdir()) == []


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
