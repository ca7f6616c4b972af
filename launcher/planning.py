"""From a validated RunConfig to a Plan: the cases, the worker slots, each part's cases, and
each worker's share of the machine. Reads the input folder and NVML; starts nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from launcher import gpus as gpu_inventory
from launcher.cases import Case, discover, voxels
from launcher.config import RunConfig
from launcher.errors import LauncherError
from launcher.scheduler import DYNAMIC_PLAN_LOOKAHEAD, Slot, make_slots, simulate_dynamic, static_parts

NNUNET_DEFAULT_PROCESSES = 3  # nnUNetv2_predict's -npp / -nps default


@dataclass(frozen=True)
class Plan:
    cases: dict[str, Case]
    slots: list[Slot]
    parts: list[list[str]]  # part k's case ids (dynamic: the expected assignment)
    threads: int  # torch threads per worker
    npp: int
    nps: int
    schedule: str = "static"
    work: dict[str, float] = field(default_factory=dict)  # estimated work per case (voxels x channels)

    @property
    def num_parts(self) -> int:
        return len(self.slots)

    def part_of(self) -> dict[str, int | None]:
        """Static: each case's part. Dynamic: none yet; a case joins the part that takes it."""
        if self.schedule == "dynamic":
            return dict.fromkeys(self.cases)
        return {case_id: k for k, ids in enumerate(self.parts) for case_id in ids}

    def to_json(self) -> dict:
        return {
            "num_parts": self.num_parts,
            "threads_per_worker": self.threads,
            "npp": self.npp,
            "nps": self.nps,
            "schedule": self.schedule,
            "parts": [
                {
                    "part_id": s.part_id,
                    "gpu": s.label,
                    "gpu_uuid": s.gpu_uuid,
                    "cases": self.parts[s.part_id],
                    "estimated_work": sum(self.work.get(c, 0) for c in self.parts[s.part_id]),
                }
                for s in self.slots
            ],
        }


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def make_plan(config: RunConfig) -> Plan:
    model = config.model
    cases = discover(config.input_folder, model.file_ending, model.num_channels)
    if config.device == "cuda":
        chosen = gpu_inventory.usable_gpus(config.gpus)
        slots = make_slots([(g.index, g.uuid) for g in chosen], config.workers_per_gpu, 0)
    else:
        slots = make_slots([], 1, config.workers)
    if model.previous_stage:
        _check_prev_stage_files(config, cases)
    share = max(1, available_cores() // len(slots))
    work = estimate_work(cases) if config.schedule == "dynamic" else {}
    parts = (
        simulate_dynamic(work, len(slots), DYNAMIC_PLAN_LOOKAHEAD)[1]
        if config.schedule == "dynamic"
        else static_parts([c.id for c in cases], len(slots))
    )
    return Plan(
        cases={c.id: c for c in cases},
        slots=slots,
        parts=parts,
        schedule=config.schedule,
        work=work,
        # on a GPU nnU-Net itself runs torch with one thread; on the CPU each worker gets its share
        threads=1 if config.device == "cuda" else share,
        npp=config.npp or min(share, NNUNET_DEFAULT_PROCESSES),
        nps=config.nps or min(share, NNUNET_DEFAULT_PROCESSES),
    )


def estimate_work(cases: list[Case]) -> dict[str, float]:
    """Voxels x channels from each case's header (cheap: no pixel data); the file size where the
    header cannot be read."""
    return {c.id: float((voxels(c) or c.size_bytes) * len(c.files)) for c in cases}


def memory_warning(plan: Plan, num_channels: int, num_labels: int, available: int) -> str | None:
    """A warning when the host memory looks too small for every worker holding the largest case.

    Per worker: the cases being preprocessed (npp + 1) and predicted hold float32 channels; each
    export in flight (nps + 1) holds float32 logits plus their resampled copy. The largest case
    is found among the biggest files by header, not by reading every one."""
    candidates = sorted(plan.cases.values(), key=lambda c: c.size_bytes, reverse=True)[:5]
    sizes = [v for v in (voxels(c) for c in candidates) if v]
    if not sizes:
        return None
    per_voxel = 4 * (num_channels * (plan.npp + 2) + 2 * num_labels * (plan.nps + 1))
    need = len(plan.slots) * max(sizes) * per_voxel
    if need <= available:
        return None
    return (
        f"warning: {len(plan.slots)} worker(s) may need about {need / 2**30:.1f} GiB of host memory for the "
        f"largest case ({max(sizes):,} voxels) but {available / 2**30:.1f} GiB is free; consider fewer "
        "workers or lower -npp/-nps"
    )


def _check_prev_stage_files(config: RunConfig, cases: list[Case]) -> None:
    ending = config.model.file_ending
    missing = [c.id for c in cases if not os.path.isfile(os.path.join(config.prev_stage_predictions, c.id + ending))]
    if missing:
        raise LauncherError(f"-prev_stage_predictions lacks {len(missing)} case(s), e.g. {missing[0] + ending!r}")


def prev_stage_file(config: RunConfig, case_id: str) -> str | None:
    if not config.prev_stage_predictions:
        return None
    return os.path.join(config.prev_stage_predictions, case_id + config.model.file_ending)
