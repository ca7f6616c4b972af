"""What the supervisor and a worker tell each other: the worker's spec, the cases it gets, and
the messages on its pipe. Imported by both sides (no import circle between worker and pipeline).

Worker -> supervisor messages (tuples, first item the kind):
  ("hello", pid)                        process started, pinned
  ("ready",)                            model loaded, pools up
  ("stage", case, stage)                a case entered preprocess / predict / export
  ("step", case, done, total)           sliding-window steps of the predicting case (progress)
  ("done", case, times, verified)       output moved into place (verified: an existing one kept,
                                        times None); times: CaseTimes of the attempt
  ("case_error", case, error, kind)     one attempt failed; kind: a Failure (RETRY .. OOM)
  ("note", case, text)                  something worth a log line
  ("fatal", error, kind, stage, code)   the worker ends itself; kind: a Failure (CRASH .. KILLED);
                                        stage and code: the stage a dead helper served and its exit
                                        code (HELPER), else None
  ("given_back", [case...])             cases it had not started, returned on request
  ("finished",)                         the feed is exhausted, every case handed back
Supervisor -> worker: ("cases", [WorkCase...]), ("give_back", [case...]) and ("no_more",); to a
prestarted worker first ("spec", WorkerSpec, time sent) (processes.Prestarted).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import Enum

STAGES = ("preprocess", "predict", "export")
# --profile fast: bytes of float32 resampled logits per chunk of channels, bounding the export's
# memory whatever the number of labels (nnU-Net's export holds every channel in float64 at once)
EXPORT_CHUNK_BYTES = 64 * 2**20
# beside the chunk, per voxel of the case: the running argmax's maximum (float32), channel (int16)
# and comparison mask (bool), and the segmentation's copy in its output type (uint8)
EXPORT_ARGMAX_BYTES_PER_VOXEL = 8


@dataclass(frozen=True)
class CaseTimes:
    """A finished attempt's clock, read in the worker (wall-clock seconds since the epoch): it
    started when its preprocessing was handed to a helper, and its stages add up to its seconds.
    `prepared`, `predicting` are None for a unit that only combines (its export is its work)."""

    started: float
    prepared: float | None  # preprocessing done (in the helper)
    predicting: float | None  # the device took it
    exporting: float  # its export began
    ended: float  # its outputs in place

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def wait_seconds(self) -> float:
        """Seconds its prepared input waited for the device (another case was being predicted)."""
        return 0.0 if self.prepared is None or self.predicting is None else self.predicting - self.prepared

    def stage_seconds(self) -> dict[str, float | None]:
        """Preprocessing, waiting for the device, predicting, exporting: they add up to `seconds`."""
        if self.prepared is None or self.predicting is None:
            return {"preprocess_s": None, "wait_s": None, "predict_s": None, "export_s": self.seconds}
        return {
            "preprocess_s": self.prepared - self.started,
            "wait_s": self.predicting - self.prepared,
            "predict_s": self.exporting - self.predicting,
            "export_s": self.ended - self.exporting,
        }


class Failure(str, Enum):
    """Every way an attempt or a worker fails: what a worker reports (`case_error` kinds, the
    attempt failed and the worker goes on; `fatal` kinds, the worker ends itself) and what the
    supervisor reads from a death without a message. What each means for the case, the device and
    the worker is one table, policy.FAILURE_RULES. A str, so it crosses the pipe as its value."""

    # case_error: one attempt of a case failed
    RETRY = "retry"  # may pass next time
    PERMANENT = "permanent"  # cannot change on a retry: the scan is unreadable
    DISK_FULL = "disk_full"  # not the case's fault: the run stops, the next one resumes
    OOM = "oom"  # CUDA out of memory even after nnU-Net's own fallback (then the worker RESTARTs)
    # fatal, or a death read by the supervisor: the worker ended
    CRASH = "crash"  # an exception, or a crash signal (SIGSEGV, SIGABRT, ...)
    HELPER = "helper"  # an nnU-Net helper process died (not by an outside SIGKILL)
    DEVICE = "device"  # a CUDA error that leaves the context unusable
    RESTART = "restart"  # it ended itself on purpose after an OOM case error
    INTERRUPTED = "interrupted"  # a stop signal reached it
    KILLED = "killed"  # SIGKILL from outside (no OOM kill counted): evidence against nothing
    HOST_OOM = "host_oom"  # the kernel's OOM killer: the host's memory, not a GPU
    HUNG = "hung"  # killed by the watchdog: no progress for its stall timeout
    MODEL = "model"  # the model cannot load, on the CPU either: the same on every device


def describe_signal(signum: int) -> str:
    try:
        return f"killed by {signal.Signals(signum).name}"
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {signum}"


# Exit code of a worker that was stopped by SIGTERM/SIGINT (an interruption, charged to nobody).


@dataclass(frozen=True)
class Combine:
    """A multi-stage case's last step, as nnUNetv2_ensemble and nnUNetv2_apply_postprocessing
    run it: average the members' probabilities (`ensemble`: `inputs` are their .npz, in the
    members' order), or take the one member's segmentation (`inputs[0]`); then postprocess."""

    inputs: tuple[str, ...]
    ensemble: bool
    plans_json: str  # the ensemble's label handling and writer: the first member's
    dataset_json: str
    pp_pkl: str | None = None
    pp_plans_json: str | None = None  # nnUNetv2_apply_postprocessing's -plans_json


@dataclass(frozen=True)
class WorkCase:
    """One unit of work. A single-stage run's unit is a case: `id` is the case id and the output
    goes to OUT. In a multi-stage run (see stages.py) `id` is the unit's, `name` the case id the
    files are named after, `member` the model that predicts it (None: a combination),
    `out_dir` where its outputs go."""

    id: str
    files: tuple[str, ...]
    prev_stage_file: str | None = None
    verify_existing: bool = False  # an output is in OUT but not journaled: keep it if it decodes
    name: str | None = None
    member: str | None = None
    out_dir: str | None = None
    save_probabilities: bool | None = None  # None: the run's setting
    combine: Combine | None = None
    # --profile fast: the ensemble's members, each with its previous stage's file (or None),
    # predicted by this unit and averaged in the worker (`combine` then only postprocesses)
    fused: tuple[tuple[str, str | None], ...] = ()

    @property
    def only_combines(self) -> bool:
        """Reads its members' files: needs no preprocessing helper and no network."""
        return self.combine is not None and not self.fused


@dataclass(frozen=True)
class PredictSettings:
    model_folder: str
    folds: tuple[str, ...]
    checkpoint: str
    step_size: float
    disable_tta: bool
    verbose: bool
    save_probabilities: bool
    device: str  # "cuda" or "cpu"
    threads: int
    npp: int
    nps: int
    members: tuple[tuple[str, str], ...] = ()  # multi-stage: (member name, model folder) each
    profile: str = "exact"  # "fast": see fast_profile.py
    deterministic: bool = False  # see device.Device.configure_predictor


@dataclass(frozen=True)
class WorkerSpec:
    part_id: int
    attempt: int
    device_key: str
    gpu_uuid: str | None
    supervisor_pid: int
    out_dir: str
    tmp_dir: str
    log_path: str
    settings: PredictSettings
    cases: tuple[WorkCase, ...]  # the first ones; the supervisor sends more until "no_more"
    device_label: str = ""  # "GPU 3", "cpu": the worker's process title names it


class UnreadableInput(Exception):
    """A case's scan cannot be read (truncated, corrupt, channels that differ): a retry cannot
    change that. Raised in a preprocessing helper; pickled back to the worker."""


class WorkerEnds(Exception):
    """The worker must end now; `kind`: a spec.Failure a worker reports as fatal."""

    def __init__(self, message: str, kind: Failure, stage: str | None = None, code: int | None = None):
        super().__init__(message)
        self.kind, self.stage, self.code = kind, stage, code  # a dead helper's stage and exit code
