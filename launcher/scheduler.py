"""Which case goes to which part, and which part to which GPU: pure logic, no I/O."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

# cases each worker holds queued beyond the one it works on (the supervisor's top-up, plus
# the preprocessing lookahead): the plan's estimate and the benchmark model it
DYNAMIC_PLAN_LOOKAHEAD = 3


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


class LargestFirstQueue:
    """The dynamic schedule: idle workers take the largest remaining case (ties by id)."""

    def __init__(self, work: dict[str, float]):
        self.work = dict(work)
        self._heap = [(-w, c) for c, w in self.work.items()]
        heapq.heapify(self._heap)
        self._queued = set(self.work)

    def take(self) -> str | None:
        if not self._heap:
            return None
        _, case_id = heapq.heappop(self._heap)
        self._queued.discard(case_id)
        return case_id

    def give_back(self, case_ids: Sequence[str]) -> None:
        for case_id in case_ids:
            if case_id not in self._queued:
                heapq.heappush(self._heap, (-self.work[case_id], case_id))
                self._queued.add(case_id)

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._queued


def simulate_static(work: dict[str, float], num_slots: int) -> float:
    """Makespan of nnU-Net's split: each part runs its strided share of the sorted ids."""
    return max(sum(work[c] for c in part) for part in static_parts(list(work), num_slots))


def simulate_dynamic(work: dict[str, float], num_slots: int, lookahead: int = 0) -> tuple[float, list[list[str]]]:
    """Makespan and assignment of largest-first list scheduling, where each worker also holds
    `lookahead` cases queued locally (they are handed out before the worker is free)."""
    queue = LargestFirstQueue(work)
    free_at = [(0.0, k) for k in range(num_slots)]
    assignment: list[list[str]] = [[] for _ in range(num_slots)]
    held: list[deque] = [deque() for _ in range(num_slots)]
    for k in range(num_slots):
        for _ in range(lookahead):
            if (case_id := queue.take()) is not None:
                held[k].append(case_id)
    heapq.heapify(free_at)
    makespan = 0.0
    while free_at:
        now, k = heapq.heappop(free_at)
        if (case_id := queue.take()) is not None:
            held[k].append(case_id)
        if not held[k]:
            makespan = max(makespan, now)
            continue
        case_id = held[k].popleft()
        assignment[k].append(case_id)
        heapq.heappush(free_at, (now + work[case_id], k))
    return makespan, assignment


def lower_bound(work: dict[str, float], num_slots: int) -> float:
    return max(sum(work.values()) / num_slots, max(work.values(), default=0.0))
