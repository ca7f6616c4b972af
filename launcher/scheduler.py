"""Which case goes to which part, and which part to which GPU: pure logic, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """One worker slot = one part. `gpu_uuid` is None on the CPU."""

    part_id: int
    gpu_index: int | None
    gpu_uuid: str | None

    @property
    def label(self) -> str:
        return "cpu" if self.gpu_uuid is None else f"gpu{self.gpu_index}"

    @property
    def device_key(self) -> str:
        """What fails together: a GPU (all its slots), or on the CPU one slot."""
        return self.gpu_uuid or f"cpu-slot-{self.part_id}"


def make_slots(gpus: Sequence[tuple[int, str]], workers_per_gpu: int, cpu_workers: int) -> list[Slot]:
    """GPUs as (index, uuid): K slots per GPU, GPU-major; no GPUs: `cpu_workers` CPU slots.

    GPU-major keeps nnU-Net's part k on GPU k // K, so parts spread over GPUs first only
    when K == 1; that is what a user reproducing `-part_id k` by hand expects."""
    if not gpus:
        return [Slot(k, None, None) for k in range(cpu_workers)]
    return [
        Slot(n * workers_per_gpu + j, index, uuid)
        for n, (index, uuid) in enumerate(gpus)
        for j in range(workers_per_gpu)
    ]


def static_parts(case_ids: Sequence[str], num_parts: int) -> list[list[str]]:
    """nnU-Net's split: sorted unique ids, part k = ids[k::num_parts]."""
    ids = sorted(set(case_ids))
    return [ids[k::num_parts] for k in range(num_parts)]
