"""What the supervisor hears, applied: a worker's case messages and its death become the case
book's transitions (written to the journal in batches), the failure policy's verdicts (who is
charged, which device rests, whether a slot restarts) and the log's lines. No processes here:
supervisor.py starts, feeds, watches and reaps them."""

from __future__ import annotations

import time

from launcher import gpus
from launcher.config import RunConfig
from launcher.journal import Journal, JournalWriteError
from launcher.planning import Plan
from launcher.policy import (
    DEVICE_REST_BASE_S,
    DEVICE_REST_MAX_S,
    FAILURE_RULES,
    DeviceHealth,
    InFlight,
    SlotState,
    backoff,
    describe_verdict,
    judge_death,
)
from launcher.processes import WorkerHandle
from launcher.scheduler import FAILED, HELD, CaseBook, Slot
from launcher.spec import CaseTimes, Failure
from launcher.stages import IntermediateFiles, split_unit


class Bookkeeper:
    """Slots are keyed by their part id (`slots`: each one's restart budget). A worker's `part` is
    whose cases it runs (static schedule: another slot's, when it took over a part that gave up)."""

    def __init__(self, config: RunConfig, plan: Plan, journal: Journal, book: CaseBook, log, run_id: int):
        self.config, self.plan, self.journal, self.book, self.log = config, plan, journal, book, log
        self.run_id = run_id
        self.working_since: float | None = None
        self.slots = {s.part_id: SlotState() for s in plan.slots}
        self.health = DeviceHealth()
        self.host_rests = 0  # times the host ran out of memory (each rest is longer)
        self.unwritten: list = []  # the book's updates not yet in the journal (see write)
        self.stop_reason: str | None = None  # why the run stops early (disk full, journal unwritable)
        self.unloadable: str | None = None  # the loader's error once a worker found the model cannot load
        predicted = {c: s for c, s in journal.done_seconds().items() if not self.combination(c)}
        self.seconds_per_work = _slowest_rate(predicted, book.work)
        self.intermediates = IntermediateFiles(plan.stages, book.done) if plan.stages else None

    # --- the journal -----------------------------------------------------------------------
    def write(self, updates: list) -> None:
        """Queue the book's updates for the journal; flush() writes them in one transaction at
        most every FLUSH_EVERY_S, which keeps the supervisor's cost per case low at 100,000 cases.
        A supervisor killed in between loses at most those updates: a case done then has its
        output in OUT and is verified and kept by the next run."""
        self.unwritten.extend(updates)
        if self.intermediates is not None:
            for unit, row in updates:
                if row.get("state") == FAILED and split_unit(unit)[0] is None:
                    self.intermediates.case_failed(unit)

    def flush(self) -> None:
        """Make the book's transitions durable. A journal that cannot be written (a full disk)
        stops the run cleanly: what is not journaled is predicted again on the next run."""
        if not self.unwritten and not self.book.ended_attempts:
            return
        merged: dict[str, dict] = {}  # one UPDATE per case: later columns win
        for case_id, row in self.unwritten:
            merged.setdefault(case_id, {}).update(row)
        attempts = [{**row, "run": self.run_id} for row in self.book.ended_attempts]
        self.unwritten, self.book.ended_attempts = [], []
        try:
            self.journal.apply(list(merged.items()), attempts)
        except JournalWriteError as exc:
            self.stop_reason = self.stop_reason or str(exc)
            return
        if self.intermediates is not None:  # only once the final outputs are journaled
            self.intermediates.remove_finished()

    def event(self, kind: str, part: int | None, case_id: str | None, message: str) -> None:
        try:
            self.journal.event(kind, part, case_id, message)
        except JournalWriteError as exc:
            self.stop_reason = self.stop_reason or str(exc)

    # --- slots -----------------------------------------------------------------------------
    def ready_at(self, slot: Slot) -> float:
        """When this slot may start a worker again (restart back-off, device rest)."""
        return max(self.slots[slot.part_id].not_before, self.health.rest_until.get(slot.device_key, 0.0))

    def live_slots(self) -> int:
        return sum(1 for state in self.slots.values() if not state.gave_up)

    def combination(self, unit: str) -> bool:
        """A multi-stage case's ensemble/postprocessing: its seconds (mostly waiting in the export
        pool, reading .npz) are not a prediction's and must not set the watchdog's rate."""
        return self.plan.stages is not None and self.plan.stages.is_combination(unit)

    # --- what a worker says of its cases ---------------------------------------------------
    def on_case_message(self, handle: WorkerHandle, message: tuple) -> None:
        kind, now = message[0], time.monotonic()
        if kind == "stage":
            wall = time.time()
            # the run's first prediction (or export of a combination) started: the ETA's rate counts from
            # here, after the warm-up (models loaded, the helpers' first nnU-Net imports in the first
            # case's preprocessing), which says nothing of the cases to come
            if self.working_since is None and message[2] in ("predict", "export"):
                self.working_since = wall
                self.journal.run_working(self.run_id, wall)
            self.write(self.book.enter_stage(message[1], message[2], now, handle.slot.label, wall))
        elif kind == "step":
            self.write(self.book.progress(message[1], now, message[2], message[3]))
        elif kind == "done":
            self._on_case_done(handle, *message[1:])
        elif kind == "case_error":
            self._on_case_error(handle, *message[1:])
        elif kind == "note":
            self.event("note", handle.part, message[1], message[2])
            self.log(f"[part {handle.part}] {message[1]}: {message[2]}")

    def _on_case_done(self, handle: WorkerHandle, case_id: str, times: CaseTimes | None, verified: bool) -> None:
        flight = self.book.flights.get(case_id)
        self.write(self.book.finish(case_id, time.time(), times))
        seconds = times.seconds if times else None
        self.book.verify.discard(case_id)
        if self.intermediates is not None:
            self.intermediates.unit_done(case_id)
        if not verified:  # a kept output took no work: it says nothing about the device or the part
            self.health.case_finished(handle.slot.device_key)
            self.slots[handle.slot.part_id].case_finished()
            self.host_rests = 0
        if seconds and flight is not None and flight.stage != HELD and not self.combination(case_id):
            rate = seconds / max(self.book.work.get(case_id, 1.0), 1.0)
            self.seconds_per_work = max(self.seconds_per_work or 0.0, rate)
        if verified:
            how = "kept (existing output verified)"
        else:  # its own seconds (preprocess + predict + export); waiting behind another case apart
            waited = times.wait_seconds
            how = f"{seconds - waited:.1f} s" + (f", waited {waited:.1f} s for the device" if waited >= 0.05 else "")
        progress = f"[{len(self.book.done)}/{len(self.book.work)}]"
        self.log(f"[part {handle.part} {handle.slot.label}] done {case_id} ({how}) {progress}")

    def _on_case_error(self, handle: WorkerHandle, case_id: str, error: str, kind: str) -> None:
        log, rule = self.slots[handle.slot.part_id].log_path, FAILURE_RULES[Failure(kind)]
        if rule.stops_run:  # not the case's fault (a full disk): stop, and the next run predicts it
            self.write(self.book.release([case_id]))
            self.stop_reason = self.stop_reason or f"{error} (while writing {case_id})"
            return
        retries = self.config.case_retries
        self.write(self.book.charge(case_id, error, rule.final, retries, solo=rule.retry_alone, now=time.time()))
        self.event("case_error", handle.part, case_id, error)
        if self.book.place(case_id) == FAILED:
            verdict = "failed: a retry cannot change this" if rule.final else "failed for good"
        else:
            verdict = "will retry" + (" alone in a new worker" if rule.fresh_worker else "")
        self.log(f"[part {handle.part}] case {case_id}: {error} ({verdict}; log: {log})")

    # --- deaths ----------------------------------------------------------------------------
    def on_death(self, handle: WorkerHandle, in_flight: list[str], kind: Failure) -> None:
        """policy.judge_death says whom the death is charged to and whether the device rests;
        the slot's SlotState whether it restarts, and when."""
        now, slot, state = time.monotonic(), handle.slot, self.slots[handle.slot.part_id]
        reason = handle.hung or handle.death_reason()
        flights = [InFlight(c, self.book.flights[c].stage, self.book.flights[c].since) for c in in_flight]
        helper_stage = handle.fatal[2] if handle.fatal else None
        verdict = judge_death(kind, flights, handle.solo, slot.device_key, self.health, helper_stage)
        if verdict.final:
            reason = f"{reason}; its CUDA errors follow it (another device, or after a finished case)"
        if verdict.charged:
            error, retries = f"worker died while on it, alone: {reason}", self.config.case_retries
            self.write(self.book.charge(verdict.charged, error, verdict.final, retries, True, time.time()))
        if verdict.suspect:
            self.write(self.book.release([verdict.suspect], solo=verdict.alone))
        if verdict.deferred:
            self.write(self.book.release([verdict.deferred], defer=True))
        self.write(self.book.release(verdict.released, solo=handle.solo and not verdict.charged))
        if verdict.fails_rest:
            self._model_cannot_load(handle, reason)
            return
        rest = self.health.death(slot.device_key, verdict.charged, verdict.suspect_device, now)
        restarts = self.journal.part_restarted(slot.part_id)
        who = handle.slot_name()  # deaths, restarts and giving up are the slot's, also on another part's cases
        self.event("worker_died", slot.part_id, verdict.charged or verdict.suspect, f"on {slot.label}: {reason}")
        if verdict.rests_host:
            self._rest_host(now, reason)
        whose = describe_verdict(verdict, kind, self.book.place(verdict.charged) == FAILED)
        if rest:
            self._report_resting_device(slot, reason, rest)
        if not state.death(verdict, self.config.max_restarts, now):
            self._give_up(
                slot.part_id,
                f"{who} gave up: its worker died {state.deaths_since_finished} times without "
                f"finishing a case (--max-restarts {self.config.max_restarts}; last: {reason})",
            )
            return
        delay = state.not_before - now
        when = f" in {delay:.0f} s" if delay >= 1 else ""
        since = f"{state.deaths_since_finished}/{self.config.max_restarts} since the last finished case"
        counted = "" if verdict.charged else f" ({since})"
        self.log(f"[{who}] worker died ({reason}){whose}; restart {restarts}{when}{counted}")

    def _model_cannot_load(self, handle: WorkerHandle, error: str) -> None:
        """Every worker would fail to load the model as this one did: none starts again, and what is
        left fails with the loader's error (a worker that loaded it before finishes what it holds)."""
        self.event("worker_died", handle.slot.part_id, None, f"on {handle.slot.label}: {error}")
        self.journal.part_worker(handle.slot.part_id, None, "gave up")
        if self.unloadable is None:
            self.unloadable = error
            self.log(
                f"[{handle.slot_name()} {handle.slot.label}] {error} (on the CPU too: the model's fault, nothing "
                "charged, the device not suspected); no worker starts again"
            )
        for state in self.slots.values():
            state.gave_up = True
        self.fail_leftovers()

    def _rest_host(self, now: float, reason: str) -> None:
        """The host ran out of memory: every part waits before its next worker (the more often, the
        longer), so that memory frees up; no GPU is suspected."""
        self.host_rests += 1
        until = now + backoff(self.host_rests, DEVICE_REST_BASE_S, DEVICE_REST_MAX_S)
        for state in self.slots.values():
            state.not_before = max(state.not_before, until)
        self.log(f"nnunet-launch: the host ran out of memory ({reason}); every part waits {until - now:.0f} s")

    def _report_resting_device(self, slot: Slot, reason: str, rest: float) -> None:
        health = gpus.health_report(slot.gpu_uuid) if slot.gpu_uuid else ""
        faults = self.health.faults.get(slot.device_key, 0)
        self.log(
            f"[{slot.label}] suspected ({faults} unexplained death(s) in a row, last: {reason}){health}; "
            f"it rests {rest:.0f} s while the others take its cases"
        )
        self.event("device_rests", slot.part_id, None, f"{slot.device_key}: {reason}{health}; {rest:.0f} s")

    def _give_up(self, slot_part: int, why: str) -> None:
        self.slots[slot_part].gave_up = True
        self.journal.part_worker(slot_part, None, "gave up")
        self.log(f"[part {slot_part}] {why}")
        self.event("gave_up", slot_part, None, why)

    def fail_leftovers(self) -> None:
        """Every slot gave up (or the model cannot load): what is queued cannot be predicted in this run."""
        keys = self.book.queued_keys()
        if not keys:
            return
        left = self.book.queued(any_key=True)
        why = f"every worker that could run it gave up (--max-restarts {self.config.max_restarts})"
        why = f"not predicted: {self.unloadable or why}"
        self.write(self.book.fail_queued(keys, why, time.time()))
        self.log(f"nnunet-launch: {left} case(s) {why}")


def _slowest_rate(done_seconds: dict[str, float], work: dict[str, float]) -> float | None:
    """Seconds per unit of work of the slowest case already done (a resumed run's watchdog)."""
    rates = [s / max(work.get(c, 1.0), 1.0) for c, s in done_seconds.items() if s and c in work]
    return max(rates, default=None)
