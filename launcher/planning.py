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
    parts: dict[int, list[str]]  # part id -> its case ids (dynamic: the expected assignment)
    threads: int  # torch threads per worker
    npp: int
    nps: int
    schedule: str = "static"
    work: dict[str, float] = field(default_factory=dict)  # estimated work per case (voxels x channels)
    largest_voxels: int = 0  # of the largest case, from its header (0: unreadable)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_parts(self) -> int:
        return len(self.slots)

    def part_of(self) -> dict[str, int | None]:
        """Static: each case's part. Dynamic: none yet; a case joins the part that takes it."""
        if self.schedule == "dynamic":
            return dict.fromkeys(self.cases)
        return {case_id: k for k, ids in self.parts.items() for case_id in ids}

    def to_json(self) -> dict:
        return {
            "num_parts": self.num_parts,
            "threads_per_worker": self.threads,
            "npp": self.npp,
            "nps": self.nps,
            "schedule": self.schedule,
            "warnings": self.warnings,
            "parts": [
                {
                    "part_id": s.part_id,
                    "gpu": s.label,
                    "gpu_uuid": s.gpu_uuid,
                    "cases": self.parts[s.part_id],
                    **({"estimated_work": sum(self.work[c] for c in self.parts[s.part_id])} if self.work else {}),
                }
                for s in self.slots
            ],
        }


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def make_plan(config: RunConfig) -> Plan:
    model = config.model
    cases = discover(config.input_folder, model.file_ending, model.num_channels)
    warnings = []
    if config.device == "cuda":
        need = gpu_inventory.estimated_bytes_per_worker(model.patch_size, model.num_labels, largest_voxels(cases))
        chosen, warnings = gpu_inventory.check_gpus(
            gpu_inventory.usable_gpus(config.gpus), config.workers_per_gpu, need, config.skip_busy
        )
        slots = make_slots([(g.index, g.uuid) for g in chosen], config.workers_per_gpu, 0)
    else:
        slots = make_slots([], 1, config.workers)
    if model.previous_stage:
        _check_prev_stage_files(config, cases)
    share = max(1, available_cores() // len(slots))
    if config.node is not None:
        cases, slots, static = _node_share(config, cases, slots)
    else:
        static = dict(enumerate(static_parts([c.id for c in cases], len(slots))))
    work = estimate_work(cases) if config.schedule == "dynamic" else {}
    if config.schedule == "dynamic":
        expected = simulate_dynamic(work, len(slots), DYNAMIC_PLAN_LOOKAHEAD)[1]
        parts = {slot.part_id: ids for slot, ids in zip(slots, expected, strict=True)}
    else:
        parts = static
    return Plan(
        cases={c.id: c for c in cases},
        slots=slots,
        parts=parts,
        schedule=config.schedule,
        work=work,
        largest_voxels=largest_voxels(cases),
        warnings=warnings,
        # on a GPU nnU-Net itself runs torch with one thread; on the CPU each worker gets its share
        threads=1 if config.device == "cuda" else share,
        npp=config.npp or min(share, NNUNET_DEFAULT_PROCESSES),
        nps=config.nps or min(share, NNUNET_DEFAULT_PROCESSES),
    )


def _node_share(config: RunConfig, cases: list[Case], slots: list[Slot]):
    """Node k of K with G slots owns parts k*G .. k*G+G-1 of nnU-Net's split into K*G parts."""
    per_node = len(slots)
    if config.parts_per_node is not None and per_node != config.parts_per_node:
        raise LauncherError(
            f"this node has {per_node} worker slot(s), but the SLURM array was made for "
            f"{config.parts_per_node} per node (check the GPUs SLURM granted, or --workers)"
        )
    first = config.node * per_node
    everything = static_parts([c.id for c in cases], config.nodes * per_node)
    mine = {first + j: everything[first + j] for j in range(per_node)}
    owned = {c for ids in mine.values() for c in ids}
    node_slots = [Slot(first + s.part_id, s.gpu_index, s.gpu_uuid) for s in slots]
    return [c for c in cases if c.id in owned], node_slots, mine


def estimate_work(cases: list[Case]) -> dict[str, float]:
    """Voxels x channels from each case's header (cheap: no pixel data); the file size where the
    header cannot be read."""
    return {c.id: float((voxels(c) or c.size_bytes) * len(c.files)) for c in cases}


def memory_warning(plan: Plan, num_channels: int, num_labels: int, available: int) -> str | None:
    """A warning when the host memory looks too small for every worker holding the largest case.

    Per worker: the cases being preprocessed (npp + 1) and predicted hold float32 channels; each
    export in flight (nps + 1) holds float32 logits plus their resampled copy. The largest case
    is the plan's (see largest_voxels)."""
    if not plan.largest_voxels:
        return None
    per_voxel = 4 * (num_channels * (plan.npp + 2) + 2 * num_labels * (plan.nps + 1))
    need = len(plan.slots) * plan.largest_voxels * per_voxel
    if need <= available:
        return None
    return (
        f"{len(plan.slots)} worker(s) may need about {need / 2**30:.1f} GiB of host memory for the "
        f"largest case ({plan.largest_voxels:,} voxels) but {available / 2**30:.1f} GiB is free; consider fewer "
        "workers or lower -npp/-nps"
    )


def largest_voxels(cases: list[Case], candidates: int = 5) -> int:
    """Voxels of the largest case, read from the headers of the biggest files only (reading
    every header is not needed for this); 0 when none can be read."""
    biggest = sorted(cases, key=lambda c: c.size_bytes, reverse=True)[:candidates]
    return max((voxels(c) or 0 for c in biggest), default=0)


def _check_prev_stage_files(config: RunConfig, cases: list[Case]) -> None:
    ending = config.model.file_ending
    missing = [c.id for c in cases if not os.path.isfile(os.path.join(config.prev_stage_predictions, c.id + ending))]
    if missing:
        raise LauncherError(f"-prev_stage_predictions lacks {len(missing)} case(s), e.g. {missing[0] + ending!r}")


def prev_stage_file(config: RunConfig, case_id: str) -> str | None:
    if not config.prev_stage_predictions:
        return None
    return os.path.join(config.prev_stage_predictions, case_id + config.model.file_ending)
