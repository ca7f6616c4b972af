"""TESTS ONLY: a fast, fault-injecting stand-in for the nnU-Net backend (see pipeline.py).

Selected by NNUNET_LAUNCH_TEST_BACKEND=fake in the environment of a test's launcher; never used
otherwise. It runs through the real supervisor, workers, pools, journal and signals, so a test
of crashes, hangs and interruptions takes seconds instead of minutes. Its "prediction" of a case
is a gzip file holding a digest of the case's input files, so a test can tell that every output
is complete and belongs to its case.

NNUNET_LAUNCH_TEST_FAULTS is a JSON object {case id: fault}; a fault "name" fires every time,
"name:N" only the first N times (counted in files under NNUNET_LAUNCH_TEST_FAULT_DIR), and
"slow:S" makes the prediction take S seconds, reporting progress, "slow_prep:S" the preprocessing. Faults:
  crash         the worker's main process dies (SIGSEGV) while predicting the case
  hang          the prediction blocks, reporting no progress
  helper_hang   the preprocessing helper blocks on the case
  helper_crash  the preprocessing helper is killed (SIGKILL) on the case
  unreadable    reading the scan fails
  prep_error    preprocessing raises an ordinary error (retried)
  error         the prediction raises an ordinary error
  oom           the prediction runs out of (CUDA) memory
  cuda_error    the prediction raises a CUDA error that breaks the context
  disk_full     the export fails with ENOSPC
NNUNET_LAUNCH_TEST_CASE_S: seconds each prediction takes (default 0.05).
NNUNET_LAUNCH_TEST_MODEL_LOADS: the model loads this many times (counted under the fault dir), then
its checkpoint is gone: a model that broke after the launcher's check (see model_check.py).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import signal
import time

from launcher.spec import Combine, Failure, PredictSettings, UnreadableInput

BACKEND_ENV = "NNUNET_LAUNCH_TEST_BACKEND"
FAULTS_ENV = "NNUNET_LAUNCH_TEST_FAULTS"
FAULT_DIR_ENV = "NNUNET_LAUNCH_TEST_FAULT_DIR"
CASE_SECONDS_ENV = "NNUNET_LAUNCH_TEST_CASE_S"
MODEL_LOADS_ENV = "NNUNET_LAUNCH_TEST_MODEL_LOADS"
MODEL_LOAD_S_ENV = "NNUNET_LAUNCH_TEST_MODEL_LOAD_S"  # seconds each load of the model takes
STEPS = 5


class FakeOutOfMemory(RuntimeError):
    pass


def _fault(case_id: str, here: tuple[str, ...]) -> tuple[str, float]:
    """(fault name, its number) for this case if it is one of the faults that fire `here`, now;
    else ("", 0)."""
    spec = json.loads(os.environ.get(FAULTS_ENV) or "{}").get(case_id, "")
    name, _, number = spec.partition(":")
    if name not in here:
        return "", 0.0
    if name in ("slow", "slow_prep"):
        return name, float(number)
    if number:
        counter = os.path.join(os.environ[FAULT_DIR_ENV], f"{case_id}.{name}")
        with open(counter, "a+") as f:
            f.seek(0)
            fired = len(f.read().splitlines())
            if fired >= int(number):
                return "", 0.0
            f.write(f"{os.getpid()}\n")
    return name, 0.0


def expected_output(files: tuple[str, ...] | list[str]) -> bytes:
    """What the fake prediction of a case with these input files holds."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest().encode()


def _preprocess(model: str | None, files: tuple[str, ...], prev_stage_file: str | None):
    case_id = os.path.basename(files[0]).split("_0000")[0]
    fault, seconds = _fault(case_id, ("helper_hang", "helper_crash", "unreadable", "prep_error", "slow_prep"))
    time.sleep(seconds)
    if fault == "helper_hang":
        time.sleep(10**6)
    if fault == "helper_crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "unreadable":
        raise UnreadableInput("cannot read the scan: RuntimeError: Exception thrown in SimpleITK ReadImage (fake)")
    if fault == "prep_error":
        raise ValueError("fake preprocessing error")
    prediction = expected_output(files)
    if prev_stage_file is not None:  # a cascade stage sees its previous stage's prediction
        with gzip.open(prev_stage_file, "rb") as f:
            prediction += b"<" + f.read()
    return prediction + (f"@{model}".encode() if model else b""), {"case_id": case_id}


def _export(content: bytes, properties: dict, output_base: str, file_ending: str, save_probabilities: bool) -> None:
    if _fault(properties["case_id"], ("disk_full",))[0]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output_base + file_ending)
    if save_probabilities:
        with open(output_base + ".npz", "wb") as f:
            f.write(content)
        with open(output_base + ".pkl", "wb") as f:
            f.write(b"properties")
    with gzip.open(output_base + file_ending, "wb") as f:
        f.write(content)


def combined_output(member_outputs: list[bytes], postprocessed: bool) -> bytes:
    """What the fake combination of a case's member predictions holds."""
    return b"combined[" + b"|".join(member_outputs) + b"]" + (b"+pp" if postprocessed else b"")


def _combine(combine: Combine, output_base: str, file_ending: str, save_probabilities: bool) -> None:
    contents = []
    for path in combine.inputs:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            contents.append(f.read())
    content = combined_output(contents, combine.pp_pkl is not None)
    _export(content, {"case_id": os.path.basename(output_base)}, output_base, file_ending, save_probabilities)


def _no_init() -> None:
    pass


def load_model(model_folder: str) -> dict:
    """The stand-in's model: its dataset.json, unless the test's model broke (MODEL_LOADS_ENV)."""
    time.sleep(float(os.environ.get(MODEL_LOAD_S_ENV, "0")))
    allowed = os.environ.get(MODEL_LOADS_ENV)
    if allowed is not None:
        with open(os.path.join(os.environ[FAULT_DIR_ENV], "model.loads"), "a+") as f:
            f.seek(0)
            loads = len(f.read().splitlines())
            f.write(f"{os.getpid()}\n")
        if loads >= int(allowed):
            checkpoint = os.path.join(model_folder, "fold_0", "checkpoint_final.pth")
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), checkpoint)
    with open(os.path.join(model_folder, "dataset.json")) as f:
        return json.load(f)


def load_backends(settings: PredictSettings) -> dict:
    if not settings.members:
        return {None: FakeBackend(settings, settings.model_folder)}
    return {name: FakeBackend(settings, folder) for name, folder in settings.members}


class FakeBackend:
    preprocess = staticmethod(_preprocess)
    combine = staticmethod(_combine)
    choices: list[str] = []  # the fast profile's per-case log lines: none here
    fallbacks: list[str] = []

    def __init__(self, settings: PredictSettings, model_folder: str):
        self.file_ending = load_model(model_folder)["file_ending"]
        self.case_seconds = float(os.environ.get(CASE_SECONDS_ENV, "0.05"))

    @staticmethod
    def preprocess_initializer(backends: dict) -> tuple:
        return _no_init, ()

    def predict(self, case_id: str, data: bytes, on_step) -> bytes:
        fault, seconds = _fault(case_id, ("crash", "hang", "error", "oom", "cuda_error", "slow"))
        if fault == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if fault == "hang":
            time.sleep(10**6)
        if fault == "error":
            raise RuntimeError("fake: the network raised an error")
        if fault == "oom":
            raise FakeOutOfMemory("CUDA out of memory. Tried to allocate 20.00 GiB (fake)")
        if fault == "cuda_error":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (fake)")
        seconds = seconds or self.case_seconds
        for step in range(1, STEPS + 1):
            time.sleep(seconds / STEPS)
            on_step(step, STEPS)
        return data

    @staticmethod
    def prediction_error_kind(exc: BaseException) -> Failure:
        if isinstance(exc, FakeOutOfMemory):
            return Failure.OOM
        return Failure.DEVICE if "CUDA error" in str(exc) else Failure.RETRY

    def export_job(self, content: bytes, properties: dict, output_base: str, save_probabilities: bool) -> tuple:
        return _export, (content, properties, output_base, self.file_ending, save_probabilities)

    def fused_export_job(self, predictions: list[tuple], combine: Combine, output_base: str, save: bool) -> tuple:
        """The fast profile's ensemble in the worker: what the combination of the members' files gives."""
        content = combined_output([content for _, content, _ in predictions], combine.pp_pkl is not None)
        return _export, (content, {"case_id": os.path.basename(output_base)}, output_base, self.file_ending, save)

    def read_output(self, path: str) -> None:
        with gzip.open(path, "rb") as f:
            f.read()
