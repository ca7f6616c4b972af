"""Failure policy as pure functions of facts: whom to blame for a worker's death, when a device
rests and for how long, how long a case may go without progress. No processes, no files: the
supervisor acts on the answers."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from launcher.spec import Failure

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


# --- what each failure means: one table --------------------------------------------------------
CASE, BLAME, EVIDENCE, NOBODY = "its case", "blame()", "evidence", "nobody"
ALWAYS, UNEXPLAINED, NEVER = "always", "when no case explains it", "never"


@dataclass(frozen=True)
class Rule:
    charge: str  # CASE: the attempt's case; BLAME: blame() among the worker's cases (certain only
    # alone, else the suspect is retried alone); EVIDENCE: the case only once device errors
    # follow it (DeviceHealth.device_error); NOBODY: every case back to the queue
    suspect_device: str  # ALWAYS, UNEXPLAINED (no case blamed or suspected), NEVER
    fresh_worker: bool  # the worker's process ends (a new one starts for its part)
    retry_alone: bool  # the case's next attempt gets a worker to itself
    final: bool = False  # a retry cannot change it: the case fails now
    stops_run: bool = False  # nobody's fault here: the run stops, the next run resumes
    counts_restart: bool = True  # counts toward --max-restarts (a part gives up after too many)
    rests_host: bool = False  # every part on this host waits before its next worker
    fails_rest: bool = False  # no worker on any device can run a case: none starts again, what is left fails


FAILURE_RULES: dict[Failure, Rule] = {
    Failure.RETRY: Rule(CASE, NEVER, fresh_worker=False, retry_alone=False, counts_restart=False),
    Failure.PERMANENT: Rule(CASE, NEVER, fresh_worker=False, retry_alone=False, final=True, counts_restart=False),
    Failure.DISK_FULL: Rule(NOBODY, NEVER, fresh_worker=False, retry_alone=False, stops_run=True, counts_restart=False),
    # CUDA out of memory after nnU-Net's own fallback: a fresh worker has all its GPU memory
    Failure.OOM: Rule(CASE, NEVER, fresh_worker=True, retry_alone=True, counts_restart=False),
    Failure.CRASH: Rule(BLAME, UNEXPLAINED, fresh_worker=True, retry_alone=True),
    Failure.HELPER: Rule(BLAME, UNEXPLAINED, fresh_worker=True, retry_alone=True),
    Failure.HUNG: Rule(BLAME, UNEXPLAINED, fresh_worker=True, retry_alone=True),
    # a CUDA error names the device; the case is charged only when its errors follow it
    Failure.DEVICE: Rule(EVIDENCE, ALWAYS, fresh_worker=True, retry_alone=False),
    # the host ran out of memory: the case in flight may be why (retried alone), a GPU is not
    Failure.HOST_OOM: Rule(BLAME, NEVER, fresh_worker=True, retry_alone=True, rests_host=True),
    # an outside hand (an admin, a user-space OOM daemon, a test) names no device and uses up no
    # restarts; a case that keeps being in flight at such kills is retried alone, charged only alone
    Failure.KILLED: Rule(BLAME, NEVER, fresh_worker=True, retry_alone=True, counts_restart=False),
    Failure.RESTART: Rule(NOBODY, NEVER, fresh_worker=True, retry_alone=False, counts_restart=False),
    Failure.INTERRUPTED: Rule(NOBODY, NEVER, fresh_worker=True, retry_alone=False, counts_restart=False),
    # the model's fault: every worker would fail the same way, so the run ends now with its error
    Failure.MODEL: Rule(NOBODY, NEVER, fresh_worker=True, retry_alone=False, counts_restart=False, fails_rest=True),
}


def death_kind(fatal: Failure | None, exitcode: int | None, oom_killed: bool, hung: bool, helper_code=None) -> Failure:
    """What a worker's death was: the watchdog's kill, what the worker said before it ended (a
    helper's SIGKILL read like the worker's own), else what its exit says."""
    if hung:
        return Failure.HUNG
    if fatal is Failure.HELPER and helper_code is not None:
        exitcode, fatal = helper_code, None if helper_code == -signal.SIGKILL else fatal
    if fatal is not None:
        return fatal
    if exitcode == -signal.SIGKILL:
        return Failure.HOST_OOM if oom_killed else Failure.KILLED
    return Failure.CRASH


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


@dataclass(frozen=True)
class DeathVerdict:
    """What a worker's death means, by FAILURE_RULES: the supervisor carries it out."""

    charged: str | None  # charged an attempt (`final`: it fails now)
    final: bool
    suspect: str | None  # retried, alone when `alone`
    alone: bool
    deferred: str | None  # back to the queue behind every other case (a device error's case)
    released: tuple[str, ...]  # back to the queue, innocent
    suspect_device: bool
    counts_restart: bool
    rests_host: bool
    fails_rest: bool


def judge_death(
    kind: Failure, in_flight: list[InFlight], solo: bool, device: str, health: DeviceHealth, helper_stage=None
) -> DeathVerdict:
    """A death of `kind` on `device`, with these cases on the worker (`solo`: it held only one)."""
    rule = FAILURE_RULES[kind]
    verdict = Blame(None, None, tuple(c.case_id for c in in_flight))
    if rule.charge != NOBODY:
        verdict = blame(in_flight, solo, helper_stage if kind is Failure.HELPER else None)
    final, deferred = False, None
    if rule.charge == EVIDENCE and (case := verdict.charged or verdict.suspect):
        if health.device_error(case, device):  # its errors follow it: the case's, not the device's
            verdict, final = Blame(case, None, verdict.released), True
        else:  # the device is suspected, and its slot takes other cases first
            verdict, deferred = Blame(None, None, verdict.released), case
    unexplained = verdict.charged is None and verdict.suspect is None and deferred is None
    return DeathVerdict(
        charged=verdict.charged,
        final=final,
        suspect=verdict.suspect,
        alone=rule.retry_alone,
        deferred=deferred,
        released=verdict.released,
        suspect_device=(rule.suspect_device == ALWAYS and not final)
        or (rule.suspect_device == UNEXPLAINED and unexplained),
        counts_restart=verdict.charged is None and rule.counts_restart,
        rests_host=rule.rests_host,
        fails_rest=rule.fails_rest,
    )


@dataclass
class DeviceHealth:
    """A device is suspected for deaths no case explains (start-up, CUDA errors; never a model that
    cannot load anywhere: Failure.MODEL), or for deaths of isolated cases that differ, with no
    finished case in between. Suspicion is a rest that doubles each time, never a verdict: the
    device gets a new worker afterwards."""

    faults: dict[str, int] = field(default_factory=dict)
    isolated_deaths: dict[str, set[str]] = field(default_factory=dict)
    rest_until: dict[str, float] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)  # cases finished per device
    device_errors: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # case -> (device, finished)

    def case_finished(self, device: str) -> None:
        self.faults.pop(device, None)
        self.isolated_deaths.pop(device, None)
        self.finished[device] = self.finished.get(device, 0) + 1

    def device_error(self, case_id: str, device: str) -> bool:
        """A CUDA error while `case_id` was predicted on `device`. True when the case, not the
        device, is why: its errors happened on two devices, or twice on one device that finished
        another case in between."""
        seen = self.device_errors.setdefault(case_id, [])
        now_finished = self.finished.get(device, 0)
        proven = any(d != device or n < now_finished for d, n in seen)
        seen.append((device, now_finished))
        return proven

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


@dataclass
class SlotState:
    """A worker slot's restart budget and back-off (kept per slot: a slot that took over another
    part's cases answers for its own deaths)."""

    deaths_since_finished: int = 0  # deaths no case is certainly to blame for, since a case was done
    uncounted_since_finished: int = 0  # deaths that do not count toward --max-restarts (outside kills)
    not_before: float = 0.0  # restart back-off
    gave_up: bool = False
    log_path: str | None = None  # its current worker's log

    def case_finished(self) -> None:
        self.deaths_since_finished = self.uncounted_since_finished = 0

    def death(self, verdict: DeathVerdict, max_restarts: int, now: float) -> bool:
        """Count a death and set the back-off before the next worker; False: the slot gives up."""
        if verdict.counts_restart:  # a case's deaths are budgeted by --case-retries
            self.deaths_since_finished += 1
        elif verdict.charged is None:  # still slows the restarts down: a killer that keeps killing
            self.uncounted_since_finished += 1
        if self.deaths_since_finished > max_restarts:
            return False
        deaths = self.deaths_since_finished + self.uncounted_since_finished
        self.not_before = max(self.not_before, now + restart_delay(deaths))
        return True


def describe_verdict(verdict: DeathVerdict, kind: Failure, failed_for_good: bool) -> str:
    """Whose fault a death was, for the supervisor's log line."""
    if verdict.charged:
        left = "failed for good" if failed_for_good else "charged one attempt"
        return f"; {verdict.charged} was alone on it: {left}"
    if verdict.suspect:
        return f"; {verdict.suspect} is suspected and will be retried" + (" alone" if verdict.alone else "")
    if verdict.deferred:
        return f"; the device is suspected; {verdict.deferred} goes back to the queue behind the other cases"
    if not verdict.suspect_device:
        return f" ({kind.value}): nothing charged, the device not suspected"
    return "; no case was running: counted against the device"


def describe_watchdog(hang_timeout: float | None) -> str:
    if hang_timeout is not None:
        how = f"{hang_timeout:.0f} s (--hang-timeout)"
    else:
        how = "10x the slowest finished case, scaled by the case's size, at least 5 min; 15 min before any"
    return f"nnunet-launch: a case with no progress for {how} is hung"
