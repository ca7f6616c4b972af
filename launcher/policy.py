"""Failure policy as pure functions of facts: whom to blame for a worker's death, when a device
rests and for how long, how long a case may go without progress. No processes, no files: the
supervisor acts on the answers."""

from __future__ import annotations

from dataclasses import dataclass, field

# Watchdog. Before any case has finished there is nothing to scale by: a generous start-up value.
STARTUP_STALL_S = 900.0
STALL_FLOOR_S = 300.0  # never less, however small and fast the cases
STALL_FACTOR = 10.0  # x the slowest finished case's seconds per unit of work, x this case's work
WORKER_STARTUP_GRACE_S = 300.0  # imports and model loading send nothing

# Back-off (the CrashLoopBackOff pattern): a suspected device rests, a restarting part waits.
DEVICE_REST_BASE_S = 5.0
DEVICE_REST_MAX_S = 300.0
RESTART_DELAY_BASE_S = 1.0
RESTART_DELAY_MAX_S = 30.0


def backoff(n: int, base: float, cap: float) -> float:
    """base, 2 base, 4 base, ... for the n-th time (n >= 1), at most cap."""
    return min(cap, base * 2 ** max(0, n - 1))


def restart_delay(deaths_since_finished: int) -> float:
    """The first restart is immediate; restarts in a row without a finished case wait longer, so
    a burst of kills passes instead of using up the part's restarts."""
    if deaths_since_finished <= 1:
        return 0.0
    return backoff(deaths_since_finished - 1, RESTART_DELAY_BASE_S, RESTART_DELAY_MAX_S)


def stall_timeout(explicit: float | None, work: float, seconds_per_work: float | None) -> float:
    """How long a case in flight may show no progress: --hang-timeout if given, else scaled by
    its estimated work relative to the slowest finished case (a start-up value before any)."""
    if explicit is not None:
        return explicit
    if not seconds_per_work:
        return STARTUP_STALL_S
    return max(STALL_FLOOR_S, STALL_FACTOR * seconds_per_work * work)


@dataclass(frozen=True)
class InFlight:
    case_id: str
    stage: str  # "held" (not started), "preprocess", "predict", "export"
    since: float


@dataclass(frozen=True)
class Blame:
    charged: str | None  # certainly this case: charge an attempt
    suspect: str | None  # probably this case: retry it alone, charge nothing
    released: tuple[str, ...]  # innocent: back to the queue


def blame(in_flight: list[InFlight], solo: bool, helper_stage: str | None = None) -> Blame:
    """Whom a worker's death is charged to.

    The case being predicted is the suspect (the main process runs it); when a helper process
    died (`helper_stage`: the stage its pool serves), the oldest case in that stage; when nothing
    was predicting, the oldest case in a helper stage (preprocessing and exports finish in order).
    A suspect is certain only on a worker that held nothing else (`solo`). Cases not started yet
    are never blamed; with no started case the death is the device's or the start-up's."""
    started = [c for c in in_flight if c.stage != "held"]
    if not started:
        return Blame(None, None, tuple(c.case_id for c in in_flight))
    predicting = [c for c in started if c.stage == "predict"]
    in_helpers = [c for c in started if c.stage != "predict"]
    in_dead_helper = [c for c in started if c.stage == helper_stage]
    if in_dead_helper:
        suspect = min(in_dead_helper, key=lambda c: c.since)
    elif predicting:
        suspect = predicting[0]
    else:
        suspect = min(in_helpers or started, key=lambda c: c.since)
    released = tuple(c.case_id for c in in_flight if c is not suspect)
    if solo and len(in_flight) == 1:
        return Blame(suspect.case_id, None, released)
    return Blame(None, suspect.case_id, released)


@dataclass
class DeviceHealth:
    """A device is suspected for deaths no case explains (start-up, model load, CUDA errors), or
    for deaths of isolated cases that differ, with no finished case in between. Suspicion is a
    rest that doubles each time, never a verdict: the device gets a new worker afterwards."""

    faults: dict[str, int] = field(default_factory=dict)
    isolated_deaths: dict[str, set[str]] = field(default_factory=dict)
    rest_until: dict[str, float] = field(default_factory=dict)

    def case_finished(self, device: str) -> None:
        self.faults.pop(device, None)
        self.isolated_deaths.pop(device, None)

    def death(self, device: str, charged_case: str | None, device_fault: bool, now: float) -> float:
        """Record a death on `device`; returns how long the device now rests (0: not suspected)."""
        if charged_case is not None:
            victims = self.isolated_deaths.setdefault(device, set())
            victims.add(charged_case)
            device_fault = device_fault or len(victims) >= 2
        if not device_fault:
            return 0.0
        self.faults[device] = self.faults.get(device, 0) + 1
        rest = backoff(self.faults[device], DEVICE_REST_BASE_S, DEVICE_REST_MAX_S)
        self.rest_until[device] = now + rest
        return rest
