"""From a validated RunConfig to a Plan: the cases, the worker slots, each part's cases, and
each worker's share of the machine. Reads the input folder and NVML; starts nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

from launcher import gpus as gpu_inventory
from launcher.cases import Case, discover_with_skipped
from launcher.config import RunConfig
from launcher.errors import LauncherError
from launcher.headers import gzip_size_mismatch, gzip_stream_intact, read_header
from launcher.model_check import Models
from launcher.scheduler import Slot, make_slots, simulate_feeding, static_parts
from launcher.spec import PredictSettings, WorkCase
from launcher.stages import COMBINE_WORK_FRACTION, StagePlan, split_unit

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
    device_bytes_per_worker: int = 0  # estimated GPU memory of one worker (0: on the CPU)
    warnings: list[str] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # cases whose input fails the gzip check: why
    stages: StagePlan | None = None  # a multi-stage run: several units of work per case
    bad_inputs: list[str] = field(default_factory=list)  # what --skip-bad-inputs left out, one line each

    @cached_property
    def unit_deps(self) -> dict[str, tuple[str, ...]]:
        """Each unit of work and the units it needs (single-stage: a unit is a case); computed
        once (run, plan and the journal all need it, 100,000 cases make it count)."""
        if self.stages is None:
            return dict.fromkeys(self.cases, ())
        return {u: needs for c in self.cases for u, needs in self.stages.units(c).items()}

    def unit_work(self) -> dict[str, float]:
        """A member's prediction costs what its case costs; a combination a small fraction; a fused
        final unit (--profile fast) predicts every member of the ensemble."""
        if self.stages is None:
            return self.work
        final = len(self.stages.ensemble) if self.stages.fused else COMBINE_WORK_FRACTION
        return {
            u: self.work[c] * (final if u == c and self.stages.combines else 1.0)
            for u in self.unit_deps
            for c in [split_unit(u)[1]]
        }

    @property
    def num_parts(self) -> int:
        return len(self.slots)

    def part_of(self) -> dict[str, int | None]:
        """Static: each case's part. Dynamic: none yet; a case joins the part that takes it."""
        if self.schedule == "dynamic":
            return dict.fromkeys(self.unit_deps)
        return {case_id: k for k, ids in self.parts.items() for case_id in ids}

    def to_do(self, done: set[str]) -> dict[int, list[str]]:
        """Each part's cases among those not done: nnU-Net's split (static), or what the
        launcher's feeding would give each worker (dynamic, an estimate from the cases' sizes)."""
        if self.schedule == "static":
            return {k: [c for c in ids if c not in done] for k, ids in self.parts.items()}
        return expected_parts({c: w for c, w in self.work.items() if c not in done}, self.slots)

    def to_json(self, split: dict[int, list[str]]) -> dict:
        """The plan with `split` (to_do's) as each part's cases and their estimated work."""
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
                    "cases": split[s.part_id],
                    "estimated_work": sum(self.work.get(c, 0.0) for c in split[s.part_id]),
                }
                for s in self.slots
            ],
        }


def expected_parts(work: dict[str, float], slots: list[Slot]) -> dict[int, list[str]]:
    expected = simulate_feeding(work, len(slots))
    return {slot.part_id: ids for slot, ids in zip(slots, expected, strict=True)}


def available_cores() -> int:
    """The cores this process may use: its affinity (which reflects cgroup cpusets), bounded in a
    SLURM job by the CPUs SLURM granted. Clusters without SLURM's affinity or cgroup task plugins
    leave the affinity at the whole node, so the environment is the bound there: the task's
    --cpus-per-task, else the CPUs allocated on this node."""
    cores = len(os.sched_getaffinity(0))
    if os.environ.get("SLURM_JOB_ID"):
        for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
            granted = os.environ.get(key, "").strip()
            if granted.isdigit() and int(granted) > 0:
                return min(cores, int(granted))
    return cores


def make_plan(config: RunConfig) -> Plan:
    model = config.model
    cases, skipped, bad = discover_with_skipped(
        config.input_folder, model.file_ending, model.num_channels, config.skip_bad_inputs, model.reader_writer
    )
    warnings = [_skipped_warning(skipped, model.file_ending)] if skipped else []
    warnings += [f"--skip-bad-inputs: not predicted: {problem}" for problem in bad]
    if config.num_parts > 1:  # nnU-Net's own split; this run predicts one part of it
        mine = set(static_parts([c.id for c in cases], config.num_parts)[config.part_id])
        cases = [c for c in cases if c.id in mine]
    if config.device == "cpu" and config.gpus != "all":
        warnings.append(f"--gpus {config.gpus} is ignored with -device cpu (use --workers N)")
    if model.previous_stage and config.prev_stage_predictions:
        _check_prev_stage_files(config, cases)
    work, voxels, broken = survey(cases)
    largest = max(voxels.values(), default=0)
    need = 0
    if config.device == "cuda":
        fast = config.profile == "fast"
        need = gpu_inventory.estimated_bytes_per_worker(
            model.patch_size, model.num_labels, largest, fast, len(config.folds)
        )
        chosen, gpu_warnings = gpu_inventory.check_gpus(
            gpu_inventory.usable_gpus(config.gpus), config.workers_per_gpu, need, config.skip_busy, fast
        )
        warnings += gpu_warnings
        slots = make_slots([(g.index, g.uuid) for g in chosen], config.workers_per_gpu, 0)
    else:
        slots = make_slots([], 1, config.workers)
    share = max(1, available_cores() // len(slots))
    if config.device == "cpu" and len(slots) > available_cores():
        warnings.append(f"--workers {len(slots)} on {available_cores()} core(s): workers will share cores")
    if len(slots) > len(cases):
        warnings.append(
            f"{len(slots)} workers for {len(cases)} case(s): {len(slots) - len(cases)} will have nothing to do"
        )
    if config.node is not None:
        cases, slots, static = _node_share(config, cases, slots)
        owned = {c.id for c in cases}
        work = {c: w for c, w in work.items() if c in owned}
        broken = {c: why for c, why in broken.items() if c in owned}
    else:
        static = dict(enumerate(static_parts([c.id for c in cases], len(slots))))
    parts = static if config.schedule == "static" else {}  # dynamic: Plan.to_do estimates it, for `plan`
    if warning := oversubscription_warning(config.npp, config.nps, len(slots), available_cores()):
        warnings.append(warning)
    return Plan(
        cases={c.id: c for c in cases},
        slots=slots,
        parts=parts,
        schedule=config.schedule,
        work=work,
        largest_voxels=largest,
        device_bytes_per_worker=need if config.device == "cuda" else 0,
        warnings=warnings,
        broken=broken,
        bad_inputs=bad,
        stages=config.stages,
        # on a GPU nnU-Net itself runs torch with one thread; on the CPU each worker gets its share
        threads=1 if config.device == "cuda" else share,
        npp=helper_processes(config.npp, share),
        nps=helper_processes(config.nps, share),
    )


def _skipped_warning(skipped: list[str], file_ending: str) -> str:
    shown = ", ".join(repr(n) for n in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    return f"{len(skipped)} file(s) in the input folder do not end in {file_ending!r} and are skipped: {shown}"


def survey(cases: list[Case]) -> tuple[dict[str, float], dict[str, int], dict[str, str]]:
    """From the headers, without decompressing an image: each case's estimated work (voxels x
    channels; the file sizes where the header cannot be read), its voxels, and the cases whose
    gzip trailer disagrees with the header (a cut file) and whose stream then fails to decode."""
    work, voxels, broken = {}, {}, {}
    for case in cases:
        header = read_header(case.files[0])
        if header is not None:
            voxels[case.id] = header.voxels
            work[case.id] = float(header.voxels * len(case.files))
        else:
            work[case.id] = float(sum(os.path.getsize(f) for f in case.files))
        for index, path in enumerate(case.files):
            if not gzip_size_mismatch(path, header):
                continue
            if index > 0 and not gzip_size_mismatch(path, read_header(path)):
                continue  # this channel has another data type than the first
            why = gzip_stream_intact(path)  # rare: only for a file whose sizes disagree
            if why:
                broken[case.id] = f"input {os.path.basename(path)} is truncated or corrupt (gzip check: {why})"
                break
    return work, voxels, broken


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


def memory_warning(plan: Plan, num_channels: int, num_labels: int, available: int, model_bytes: int = 0) -> str | None:
    """A warning when the host memory looks too small for every worker holding the largest case.

    Per worker: the cases being preprocessed (npp + 1) and predicted hold float32 channels; each
    export in flight (nps + 1) holds float32 logits plus their resampled copy. The largest case
    is the plan's (see largest_voxels). Each worker also keeps every fold of every model it serves
    in host memory: about `model_bytes`, their checkpoints' size (measured: 0.92 GB of RSS for a
    5-fold 3d_fullres whose checkpoints are 1.19 GB, benchmarks/RESULTS.md)."""
    if not plan.largest_voxels:
        return None
    one = worker_host_bytes(plan.largest_voxels, num_channels, num_labels, plan.npp, plan.nps, model_bytes)
    need = len(plan.slots) * one
    if need <= available:
        return None
    models = f" and {model_bytes / 2**30:.1f} GiB of model weights each" if model_bytes >= 2**28 else ""
    return (
        f"{len(plan.slots)} worker(s) may need about {need / 2**30:.1f} GiB of host memory for the "
        f"largest case ({plan.largest_voxels:,} voxels){models} but {available / 2**30:.1f} GiB is free; "
        "consider fewer workers or lower -npp/-nps"
    )


def worker_host_bytes(voxels: int, num_channels: int, num_labels: int, npp: int, nps: int, model_bytes: int) -> int:
    """Host memory one worker needs for a case of `voxels` (see memory_warning)."""
    return voxels * 4 * (num_channels * (npp + 2) + 2 * num_labels * (nps + 1)) + model_bytes


def oversubscription_warning(npp: int | None, nps: int | None, workers: int, cores: int) -> str | None:
    """-npp/-nps given so that the helper processes of every worker together outnumber the cores
    by more than 2x: they compete for the cores (and each takes memory), so more is slower."""
    given = [f"-{flag} {n}" for flag, n in (("npp", npp), ("nps", nps)) if n]
    helpers = workers * ((npp or 0) + (nps or 0))
    if not given or helpers <= 2 * cores:
        return None
    return (
        f"{' '.join(given)} with {workers} worker(s): {helpers} helper processes on {cores} core(s) compete for "
        "them; fewer is faster (without -npp/-nps each worker gets its share of the cores)"
    )


def helper_processes(given: int | None, share: int) -> int:
    """-npp/-nps: as given, else the worker's share of the cores up to nnU-Net's default."""
    return given or min(share, NNUNET_DEFAULT_PROCESSES)


def checkpoint_bytes(config: RunConfig) -> int:
    """The size of every checkpoint a worker loads (every fold of every member)."""
    return sum(os.path.getsize(p) for p in Models.of_config(config).checkpoints() if os.path.isfile(p))


def _check_prev_stage_files(config: RunConfig, cases: list[Case]) -> None:
    ending = config.model.file_ending
    missing = [c.id for c in cases if not os.path.isfile(os.path.join(config.prev_stage_predictions, c.id + ending))]
    if missing:
        raise LauncherError(f"-prev_stage_predictions lacks {len(missing)} case(s), e.g. {missing[0] + ending!r}")


def prev_stage_file(config: RunConfig, case_id: str) -> str | None:
    if not config.prev_stage_predictions:
        return None
    return os.path.join(config.prev_stage_predictions, case_id + config.model.file_ending)


def predict_settings(config: RunConfig, plan: Plan) -> PredictSettings:
    """What every worker of the run predicts with."""
    return PredictSettings(
        model_folder=config.model.folder,
        folds=config.model.folds,
        checkpoint=config.checkpoint,
        step_size=config.step_size,
        disable_tta=config.disable_tta,
        verbose=config.verbose,
        save_probabilities=config.save_probabilities,
        device=config.device,
        threads=plan.threads,
        npp=plan.npp,
        nps=plan.nps,
        members=tuple((m.name, m.folder) for m in plan.stages.members) if plan.stages else (),
        profile=config.profile,
        deterministic=config.deterministic,
    )


def work_case(config: RunConfig, plan: Plan, unit: str, verify: bool) -> WorkCase:
    """A unit of work as a worker gets it (`verify`: keep its existing output when whole)."""
    if plan.stages is not None:
        return plan.stages.work_case(unit, plan.cases[split_unit(unit)[1]].files, verify)
    return WorkCase(unit, plan.cases[unit].files, prev_stage_file(config, unit), verify)
