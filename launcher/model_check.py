"""Is the run's model loadable? Answered once before any work, by loading every model the run uses
as a worker does, but on the CPU: a model that cannot load (a checkpoint cut short, a missing fold,
a trainer class that cannot be imported) fails the same way on every device, so `run` and `plan`
refuse it with the loader's own error, naming the file, before anything is written into OUT.

The supervisor must not import nnunetv2 nor touch CUDA (finding a trainer class imports every
trainer module, whatever they do), so another process loads it. In `run`, the first slot's
prestarted worker (processes.Prestarted), which imports nnU-Net anyway, sends its answer before it
gets any case. Otherwise (`plan`; a `run` whose first worker died before it answered) a child
process with CUDA hidden does: `python -m launcher.model_check MODELS_JSON` ({"error": line or
null} on stdout), which `plan` starts while the input is planned. A worker whose own load failed
asks `load_error` in its process: a load that fails on the CPU too is the model's fault
(Failure.MODEL), never its device's.

Besides nnunet.py, the one module that imports nnunetv2, and only in a worker or in that child:
nnU-Net's own loader as NnunetBackend calls it, without the worker's device set-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass

from launcher.config import RunConfig
from launcher.errors import LauncherError
from launcher.fake_backend import BACKEND_ENV
from launcher.spec import PredictSettings, describe_signal

# nnU-Net's search for the checkpoint's trainer class: 2.8's own function, or before it the
# generic search the loader called directly (its parameter: class_name)
TRAINER_LOOKUPS = ("recursive_find_trainer_class_by_name", "recursive_find_python_class")


@dataclass(frozen=True)
class Models:
    """What a worker loads: each model folder's folds' checkpoints (one folder per member of a
    multi-stage run)."""

    folders: tuple[str, ...]
    folds: tuple[str, ...]
    checkpoint: str

    @classmethod
    def of_config(cls, config: RunConfig) -> Models:
        folders = [m.folder for m in config.stages.members] if config.stages else [config.model.folder]
        return cls(tuple(folders), tuple(config.model.folds), config.checkpoint)

    def checkpoints(self) -> list[str]:
        """Every checkpoint a worker loads: each folder's folds."""
        return [os.path.join(f, f"fold_{fold}", self.checkpoint) for f in self.folders for fold in self.folds]

    @classmethod
    def of_settings(cls, settings: PredictSettings) -> Models:
        folders = [folder for _, folder in settings.members] or [settings.model_folder]
        return cls(tuple(folders), tuple(settings.folds), settings.checkpoint)


def _fake() -> bool:
    return os.environ.get(BACKEND_ENV) == "fake"


def load_error(models: Models) -> str | None:
    """None when every model loads on the CPU; else one line: the loader's error, naming the file."""
    for folder in models.folders:
        try:
            if _fake():  # tests: the stand-in's loader (no torch)
                from launcher.fake_backend import load_model

                load_model(folder)
            else:
                _load_with_nnunet(folder, models.folds, models.checkpoint)
        except Exception as exc:
            return describe_load_error(exc, folder)
    return None


def _load_with_nnunet(folder: str, folds: tuple[str, ...], checkpoint: str) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        device=torch.device("cpu"), perform_everything_on_device=False, verbose=False, allow_tqdm=False
    )
    predictor.initialize_from_trained_model_folder(folder, [f if f == "all" else int(f) for f in folds], checkpoint)


def describe_load_error(exc: BaseException, folder: str) -> str:
    said = " ".join(line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip())
    culprit = _culprit(exc, folder)
    return f"cannot load the model: {said}" if culprit in said else f"cannot load the model: {culprit}: {said}"


def _culprit(exc: BaseException, folder: str) -> str:
    """What the loader was reading when it failed, from its frames (its messages often do not say):
    the checkpoint torch.load opened, or the trainer class the checkpoint names; else the folder."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        name, local = frame.f_code.co_name, frame.f_locals
        if name in TRAINER_LOOKUPS:
            trainer = local.get("trainer_name", local.get("class_name"))
            return f"the trainer class {trainer!r} named in the checkpoint of {folder}"
        if name == "load" and frame.f_globals.get("__name__") == "torch.serialization":
            if isinstance(local.get("f"), (str, os.PathLike)):
                return os.fspath(local["f"])
    return folder


class ModelCheck:
    """The check running in its child while the caller goes on; `wait()` raises LauncherError
    when the model cannot load. Leaving the `with` block ends a child still running."""

    def __init__(self, models: Models):
        self.models = models
        self.child = None
        if not _fake():  # the stand-in loads in no time, in this process, at wait()
            command = [sys.executable, "-m", "launcher.model_check", json.dumps(asdict(models)), str(os.getpid())]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
            pipes = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.child = subprocess.Popen(command, env=env, text=True, **pipes)

    def __enter__(self) -> ModelCheck:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.communicate()

    def wait(self) -> None:
        error = load_error(self.models) if self.child is None else self._child_result()
        if error:
            raise LauncherError(error)

    def _child_result(self) -> str | None:
        out, err = self.child.communicate()
        try:
            return json.loads(out)["error"]
        except (ValueError, KeyError, TypeError):
            code = self.child.returncode
            how = describe_signal(-code) if code < 0 else f"exit code {code}"
            last = next((line for line in reversed(err.splitlines()) if line.strip()), "")
            return f"cannot check the model: the loading process ended ({how}){': ' + last if last else ''}"


def main() -> None:
    from launcher.worker import die_with_parent

    # a launcher SIGKILLed while its model loads here (torch's import alone takes seconds under load)
    # must not leave this process loading on
    die_with_parent(int(sys.argv[2]))
    models = json.loads(sys.argv[1])
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints; stdout carries only the answer
        error = load_error(Models(tuple(models["folders"]), tuple(models["folds"]), models["checkpoint"]))
    print(json.dumps({"error": error}), flush=True)


if __name__ == "__main__":
    main()
