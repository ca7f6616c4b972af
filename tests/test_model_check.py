"""A model that cannot load is the model's fault, not the GPU's: `run` and `plan` load it once on
the CPU before any work and refuse it (exit 2, one line naming the file, nothing written into OUT);
a worker whose load fails anyway ends the run at once with the loader's error, no device blamed."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import fake_env, run_args, status_json
from launcher.fake_backend import MODEL_LOADS_ENV


def _truncate_checkpoint(model) -> str:
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    with checkpoint.open("r+b") as f:
        f.truncate(checkpoint.stat().st_size // 2)
    return str(checkpoint)


def _remove_fold(model) -> str:
    shutil.rmtree(model / "fold_0")
    return str(model / "fold_0" / "checkpoint_final.pth")


def _unknown_trainer(model) -> str:
    import torch

    path = model / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerNobodyWrote"
    torch.save(checkpoint, path)
    return "'nnUNetTrainerNobodyWrote'"


BREAKAGES = {
    "a truncated checkpoint": _truncate_checkpoint,
    "a missing fold": _remove_fold,
    "an unknown trainer": _unknown_trainer,
}


@pytest.fixture(params=list(BREAKAGES), scope="module")
def broken(request, tiny, tmp_path_factory) -> dict:
    """A copy of the tiny model broken one way, and the file or trainer the refusal must name."""
    model = tmp_path_factory.mktemp("broken") / "broken model"
    shutil.copytree(tiny["model"], model)
    named = BREAKAGES[request.param](model)
    return {"inputs": tiny["inputs"], "model": model, "named": named}


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_model_that_cannot_load_is_refused_before_any_work_naming_the_file(broken, command, tmp_path, launch):
    out = tmp_path / "out"
    args = run_args(broken, out)
    args[0] = command
    code, stdout, stderr = launch(args).wait(timeout=120)
    assert code == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("nnunet-launch: error: ") and broken["named"] in lines[0], stderr
    assert not out.exists(), "nothing written into OUT, no worker started"


def test_a_truncated_checkpoint_is_refused_with_the_loaders_own_words(tiny, tmp_path, launch):
    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    _truncate_checkpoint(model)
    out = tmp_path / "out"
    code, _, stderr = launch(run_args({"inputs": tiny["inputs"], "model": model}, out)).wait(timeout=120)
    assert code == 2 and "PytorchStreamReader failed reading zip archive" in stderr, stderr


def test_a_fake_model_that_cannot_load_is_refused_by_the_check_without_starting_a_worker(cases, tmp_path, launch):
    out = tmp_path / "out"
    env = {**fake_env(tmp_path), MODEL_LOADS_ENV: "0"}
    code, _, stderr = launch(run_args(cases, out, "--workers", "2"), env).wait(timeout=60)
    assert code == 2 and stderr.count("\n") == 1 and "cannot load the model" in stderr, stderr
    assert not out.exists()


@pytest.mark.accelerator  # the worker's load failure (worker.py: the same on every device)
def test_a_model_that_breaks_after_the_check_ends_the_run_at_once_without_blaming_a_device(cases, tmp_path, launch):
    out = tmp_path / "out"
    env = {**fake_env(tmp_path), MODEL_LOADS_ENV: "1"}  # the check's load passes, every worker's fails
    code, stdout, stderr = launch(run_args(cases, out, "--workers", "2", "--max-restarts", "5"), env).wait(timeout=120)
    assert code == 1, stdout + stderr  # finished, every case failed
    error = "cannot load the model: FileNotFoundError"
    assert error in stderr and "checkpoint_final.pth" in stderr, stderr
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    status = status_json(out)
    for report in (summary, status):
        assert {f["case"] for f in report["failed_cases"]} == set(cases["ids"])
        assert all(error in f["error"] and "gave up" not in f["error"] for f in report["failed_cases"])
    assert all(part["restarts"] == 0 for part in status["parts"]), "no worker was started again"
    log = (out / ".nnunet-launch" / "logs" / "supervisor.log").read_text()
    assert "suspected (" not in log and " rests " not in log, "no device was blamed or rested"
    assert "the model's fault" in log
