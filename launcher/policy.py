"""Failure policy as pure functions: whom to blame for a crash, when a device is sick, how long
silence means a hang. No processes, no files: the supervisor acts on the answers."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_HANG_FLOOR_S = 600.0
HANG_SLOWEST_CASE_FACTOR = 10.0
STARTUP_GRACE_S = 300.0  # imports and model loading send nothing; a hang there is caught later
SICK_DEVICE_DEATHS = 3


def hang_timeout(explicit: float | None, slowest_case_s: float | None) -> float:
    """The user's --hang-timeout, else the larger of 10 minutes and 10x the slowest case seen."""
    if explicit is not None:
        return explicit
    return max(DEFAULT_HANG_FLOOR_S, HANG_SLOWEST_CASE_FACTOR * (slowest_case_s or 0.0))


@dataclass(frozen=True)
class InFlight:
    case_id: str
    stage: str | None  # "preprocess", "predict", "export"
    started: float


def blame(in_flight: list[InFlight]) -> tuple[list[str], list[str]]:
    """(blamed, released) for a worker that died with these cases in flight.

    The worker's main process holds one case on the device; if it was predicting, that case is
    the suspect. Otherwise a helper process died: the oldest case in flight is the one it was on
    (preprocessing and exports finish in order). Cases merely queued behind are not charged."""
    if not in_flight:
        return [], []
    predicting = [c for c in in_flight if c.stage == "predict"]
    suspect = predicting[0] if predicting else min(in_flight, key=lambda c: c.started)
    return [suspect.case_id], [c.case_id for c in in_flight if c is not suspect]


@dataclass
class DeviceHealth:
    """A device on which workers die `limit` times in a row without finishing a case is sick."""

    limit: int = SICK_DEVICE_DEATHS
    deaths_in_a_row: dict[str, int] = field(default_factory=dict)
    sick: set[str] = field(default_factory=set)

    def case_finished(self, device: str) -> None:
        self.deaths_in_a_row[device] = 0

    def worker_died(self, device: str) -> bool:
        """Count a death; True when this death makes the device sick."""
        self.deaths_in_a_row[device] = self.deaths_in_a_row.get(device, 0) + 1
        if self.deaths_in_a_row[device] >= self.limit and device not in self.sick:
            self.sick.add(device)
            return True
        return False
