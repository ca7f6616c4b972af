"""What the supervisor and a worker tell each other: the worker's spec, the cases it gets, and
the messages on its pipe. Imported by both sides (no import circle between worker and pipeline).

Worker -> supervisor messages (tuples, first item the kind):
  ("hello", pid)                        process started, pinned
  ("ready",)                            model loaded, pools up
  ("stage", case, stage)                a case entered preprocess / predict / export
  ("step", case, done, total)           sliding-window steps of the predicting case (progress)
  ("done", case, seconds, verified)     output moved into place (verified: an existing one kept);
                                        seconds from the start of its preprocessing
  ("case_error", case, error, kind)     one attempt failed; kind is one of ERROR_KINDS
  ("note", case, text)                  something worth a log line
  ("fatal", error, kind, stage)         the worker ends itself; kind is one of FATAL_KINDS; stage:
                                        the one a dead helper served ("helper"), else None
  ("given_back", [case...])             cases it had not started, returned on request
  ("finished",)                         the feed is exhausted, every case handed back
Supervisor -> worker: ("cases", [WorkCase...]), ("give_back", [case...]) and ("no_more",).
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("preprocess", "predict", "export")

# case_error kinds: "retry" (may pass next time), "permanent" (cannot change on a retry: the scan
# is unreadable), "disk_full" (not the case's fault: the run stops), "oom" (CUDA out of memory even
# after nnU-Net's own fallback: retry alone in a fresh worker, whose GPU memory is all free)
ERROR_KINDS = ("retry", "permanent", "disk_full", "oom")
# fatal kinds: "crash" (an ordinary failure of the worker), "helper" (an nnU-Net helper process
# died: blame its case), "device" (a CUDA error that leaves the context unusable), "restart" (the
# worker ends itself on purpose after an "oom" case error), "interrupted" (a stop signal reached it)
FATAL_KINDS = ("crash", "helper", "device", "restart", "interrupted")

# Exit code of a worker that was stopped by SIGTERM/SIGINT (an interruption, charged to nobody).
WORKER_EXIT_INTERRUPTED = 143  # 128 + SIGTERM, as a shell reports it


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


class UnreadableInput(Exception):
    """A case's scan cannot be read (truncated, corrupt, channels that differ): a retry cannot
    change that. Raised in a preprocessing helper; pickled back to the worker."""
