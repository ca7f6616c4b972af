"""The supervisor: the event loop and process handling only. It spawns one worker per slot,
waits on their pipes and deaths, feeds what happens to the case book (scheduler.CaseBook) and the
failure policy (policy.py), writes what the book returns into the journal (the only writer), and
handles stop signals. Never imports nnunetv2, never touches CUDA."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from launcher import gpus
from launcher.config import RunConfig, run_state_dir
from launcher.journal import Journal, JournalWriteError
from launcher.outputs import clear_tmp, logs_dir, tmp_dir
from launcher.planning import Plan, prev_stage_file
from launcher.policy import (
    DEVICE_REST_BASE_S,
    DEVICE_REST_MAX_S,
    FAILURE_RULES,
    WORKER_STARTUP_GRACE_S,
    DeathVerdict,
    DeviceHealth,
    InFlight,
    backoff,
    death_kind,
    judge_death,
    restart_delay,
    stall_timeout,
)
from launcher.scheduler import FAILED, HELD, CaseBook, Slot
from launcher.spec import WORKER_EXIT_INTERRUPTED, Failure, PredictSettings, WorkCase, WorkerSpec, describe_signal
from launcher.stages import IntermediateFiles, split_unit
from launcher.worker import worker_main

SHUTDOWN_GRACE_S = 5.0
REAP_TIMEOUT_S = 5.0  # a process stuck in the kernel cannot be reaped: report it and go on
# A worker killed by a stop signal may die a moment before the supervisor's own signal arrives
# (SLURM and systemd signal every process): wait this long before replacing it.
INTERRUPTED_RESPAWN_DELAY_S = 2.0
# cases a worker holds queued beyond the ones it works on, so it never waits for the supervisor
# to learn its next case
LOOKAHEAD = 2
MAX_WAIT_S = 0.5
COALESCE_S = 0.002  # a case's messages come in a burst: take them in one turn of the loop
WATCHDOG_EVERY_S = 0.25  # hangs are measured in seconds; no need to look at every message
FLUSH_EVERY_S = 0.05  # journal writes: one transaction per 50 ms of updates at most
EXIT_OK, EXIT_FAILED, EXIT_NO_SPACE, EXIT_INTERRUPTED = 0, 1, 75, 130
CGROUP_MEMORY_EVENTS = "/sys/fs/cgroup/memory.events"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class WorkerHandle:
    serial: int  # unique per spawned worker: the case book knows flights by it
    slot: Slot
    key: int | None  # the case book's queue it draws from (static: a part; dynamic: None)
    part: int  # the part whose cases it runs (static: may be another slot's, which gave up)
    attempt: int
    process: object
    conn: object
    tmp: str
    oom_kills_at_start: int | None
    started_at: float
    solo: bool = False  # it holds one suspected case and gets nothing else until that case ends
    giving_back: bool = False  # asked to return the cases it has not started
    conn_open: bool = True
    no_more_sent: bool = False
    ready: bool = False
    finished: bool = False
    fatal: tuple | None = None  # (message, kind, the dead helper's stage, its exit code)
    hung: str | None = None
    hung_at: float = 0.0


@dataclass
class PartState:
    deaths_since_finished: int = 0  # deaths no case is certainly to blame for, since a case was done
    uncounted_since_finished: int = 0  # deaths that do not count toward --max-restarts (outside kills)
    not_before: float = 0.0  # restart back-off
    gave_up: bool = False
    attempts: int = 0
    log_path: str | None = None


@dataclass
class Outcome:
    stop_reason: str | None = None  # why the run stops early (disk full, journal unwritable)
    unreaped: list[int] = field(default_factory=list)


def oom_kill_count() -> int | None:
    """The cgroup's OOM-kill counter (cgroup v2), the evidence for "killed by the OOM killer"."""
    try:
        with open(CGROUP_MEMORY_EVENTS) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def describe_exit(exitcode: int | None, oom_killed: bool = False) -> str:
    if exitcode is not None and exitcode < 0:
        how = describe_signal(-exitcode)
        return f"killed by the kernel's OOM killer ({how.removeprefix('killed by ')})" if oom_killed else how
    return f"exit code {exitcode}"


class Supervisor:
    def __init__(
        self, config: RunConfig, plan: Plan, journal: Journal, book: CaseBook, verify: set[str], reporter, run_id: int
    ):
        self.config, self.plan, self.journal, self.book, self.verify = config, plan, journal, book, verify
        self.run_id = run_id
        self.reporter = reporter
        self.log = reporter.log
        self.workers: dict[int, WorkerHandle] = {}  # by slot (its part id)
        self.parts = {s.part_id: PartState() for s in plan.slots}
        self.health = DeviceHealth()
        self.host_rests = 0  # times the host ran out of memory (each rest is longer)
        self.serials = 0
        self.unwritten: list = []  # the book's updates not yet in the journal (see _write)
        self.last_watchdog = self.last_flush = 0.0
        self.announced_ready = False
        self.stop_signals = 0
        self.outcome = Outcome()
        predicted = {c: s for c, s in journal.done_seconds().items() if not self._combination(c)}
        self.seconds_per_work = _slowest_rate(predicted, book.work)
        import torch.multiprocessing as torch_mp  # spawn context; importing torch does not touch CUDA

        # A killed worker cannot unlink its pools' named semaphores. With the spawn start method
        # every process of the run registers them with one resource tracker, the supervisor's,
        # which unlinks what is left when the run ends (so nothing leaks in /dev/shm) and warns
        # about it. A worker's own tracker would die with the worker's process group and leak
        # them. So the supervisor's tracker is the right owner, and its warning is expected.
        if "ignore:resource_tracker:UserWarning" not in sys.warnoptions:
            sys.warnoptions.append("ignore:resource_tracker:UserWarning")

        self.context = torch_mp.get_context("spawn")
        self.settings = PredictSettings(
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
        )
        self.intermediates = IntermediateFiles(plan.stages, book.done) if plan.stages else None

    # --- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        previous = self._install_signal_handlers()
        self._log_watchdog()
        try:
            while True:
                if self.stop_signals:
                    return self._shut_down(EXIT_INTERRUPTED, "interrupted: stopping workers...")
                if self.outcome.stop_reason:
                    return self._shut_down(EXIT_NO_SPACE, f"stopping: {self.outcome.stop_reason}")
                wake = self._start_workers(time.monotonic())
                if not self.workers and wake is None:
                    break
                if self._step(MAX_WAIT_S if wake is None else min(MAX_WAIT_S, max(0.0, wake - time.monotonic()))):
                    self._feed_workers()
                now = time.monotonic()
                if now - self.last_watchdog >= WATCHDOG_EVERY_S:
                    self.last_watchdog = now
                    self._watchdog(now)
                if now - self.last_flush >= FLUSH_EVERY_S:
                    self.last_flush = now
                    self._flush()
                self.reporter.refresh(len(self.book.done) + len(self.book.failed))
            self._fail_leftovers()
            self._flush()
            if self.outcome.stop_reason:
                return self._shut_down(EXIT_NO_SPACE, f"stopping: {self.outcome.stop_reason}")
            return EXIT_FAILED if self.book.failed or self.book.unfinished() else EXIT_OK
        except JournalWriteError as exc:  # the journal failed beyond the event loop's reach
            self.outcome.stop_reason = str(exc)
            return self._shut_down(EXIT_NO_SPACE, f"stopping: {exc}")
        except BaseException:
            self._kill_all(signal.SIGKILL)  # a supervisor bug must not leave workers behind
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _log_watchdog(self) -> None:
        if self.config.hang_timeout is not None:
            how = f"{self.config.hang_timeout:.0f} s (--hang-timeout)"
        else:
            how = "10x the slowest finished case, scaled by the case's size, at least 5 min; 15 min before any"
        self.log(f"nnunet-launch: a case with no progress for {how} is hung")

    def _install_signal_handlers(self) -> dict:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed ssh session must not end the run
        return previous

    def _on_stop_signal(self, signum, frame) -> None:
        self.stop_signals += 1
        if self.stop_signals > 1:  # second Ctrl-C: no more grace
            self._kill_all(signal.SIGKILL)

    def _step(self, timeout: float) -> bool:
        """Wait for messages and deaths and handle them; True when anything happened."""
        waitables = [w.conn for w in self.workers.values() if w.conn_open]
        waitables += [w.process.sentinel for w in self.workers.values()]
        ready = set(wait(waitables, timeout=timeout)) if waitables else set()
        if not waitables:
            time.sleep(timeout)
        elif ready:  # let a burst of messages (a case's stages) arrive together: fewer turns per case
            time.sleep(COALESCE_S)
            ready |= set(wait(waitables, timeout=0))
        for handle in list(self.workers.values()):
            if handle.conn_open and handle.conn in ready:
                self._drain(handle)
            if handle.process.sentinel in ready:
                self._on_worker_exit(handle)
        return bool(ready)

    def _write(self, updates: list) -> None:
        """Queue the book's updates for the journal; _flush() writes them in one transaction at
        most every FLUSH_EVERY_S, which keeps the supervisor's cost per case low at 100,000 cases.
        A supervisor killed in between loses at most those updates: a case done then has its
        output in OUT and is verified and kept by the next run."""
        self.unwritten.extend(updates)

    def _flush(self) -> None:
        """Make the book's transitions durable. A journal that cannot be written (a full disk)
        stops the run cleanly: what is not journaled is predicted again on the next run."""
        if not self.unwritten:
            return
        merged: dict[str, dict] = {}  # one UPDATE per case: later columns win
        for case_id, row in self.unwritten:
            merged.setdefault(case_id, {}).update(row)
        self.unwritten = []
        try:
            self.journal.apply(list(merged.items()))
        except JournalWriteError as exc:
            if not self.outcome.stop_reason:
                self.outcome.stop_reason = str(exc)
            return
        if self.intermediates is not None:  # only once the final outputs are journaled
            self.intermediates.remove_finished()

    def _event(self, kind: str, part: int | None, case_id: str | None, message: str) -> None:
        try:
            self.journal.event(kind, part, case_id, message)
        except JournalWriteError as exc:
            self.outcome.stop_reason = self.outcome.stop_reason or str(exc)

    # --- starting workers ------------------------------------------------------------------
    def _start_workers(self, now: float) -> float | None:
        """Give every free slot a worker where there is work for it. Returns when to look again
        for slots that wait (back-off) while work is queued, or None when none waits."""
        wake = None
        for slot in [s for s in self.plan.slots if s.part_id not in self.workers and not self.parts[s.part_id].gave_up]:
            key = self._key_for(slot, now)
            if key is False:
                continue
            ready_at = self._ready_at(slot)
            if ready_at > now:
                wake = ready_at if wake is None else min(wake, ready_at)
                continue
            self._spawn(slot, key, now)
        return wake

    def _key_for(self, slot: Slot, now: float):
        """The queue a new worker on this slot draws from, or False when it has no work: its own
        part (static) or the shared queue (dynamic). In the static schedule a slot whose part is
        finished takes over a part whose own slot gave up or rests."""
        if self.book.static_part is None:
            return None if self.book.queued(None) else False
        if self.book.queued(slot.part_id):
            return slot.part_id
        running = {w.key for w in self.workers.values()}
        for key in sorted(k for k in self.book.queued_keys() if k not in running):
            if self.parts[key].gave_up or self._waiting(self._slot(key), now):
                return key
        return False

    def _slot(self, part: int) -> Slot:
        return next(s for s in self.plan.slots if s.part_id == part)

    def _ready_at(self, slot: Slot) -> float:
        """When this slot may start a worker again (restart back-off, device rest)."""
        return max(self.parts[slot.part_id].not_before, self.health.rest_until.get(slot.device_key, 0.0))

    def _waiting(self, slot: Slot, now: float) -> bool:
        return self._ready_at(slot) > now

    def _spawn(self, slot: Slot, key: int | None, now: float) -> None:
        self.serials += 1
        part = slot.part_id if key is None else key
        handle_cases, solo = self._cases_for_new_worker(key, part, now)
        if not handle_cases:
            return
        state = self.parts[slot.part_id]
        self.parts[part].attempts += 1  # per part: a slot that took over another part counts there
        attempt = self.parts[part].attempts
        tmp = os.path.join(tmp_dir(run_state_dir(self.config)), f"worker-{self.serials}")
        clear_tmp(tmp)
        # named with the run: a resumed run never appends to an earlier run's log
        log_name = f"run-{self.run_id}.part-{part}.attempt-{attempt}.log"
        state.log_path = os.path.join(logs_dir(run_state_dir(self.config)), log_name)
        spec = WorkerSpec(
            part_id=part,
            attempt=attempt,
            device_key=slot.device_key,
            gpu_uuid=slot.gpu_uuid,
            supervisor_pid=os.getpid(),
            out_dir=os.path.abspath(self.config.output_folder),
            tmp_dir=tmp,
            log_path=state.log_path,
            settings=self.settings,
            cases=tuple(self._work_case(c) for c in handle_cases),
        )
        parent_conn, child_conn = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=worker_main, args=(spec, child_conn), daemon=False, name=f"nnunet-launch part {part}"
        )
        process.start()
        child_conn.close()
        self.workers[slot.part_id] = WorkerHandle(
            self.serials, slot, key, part, attempt, process, parent_conn, tmp, oom_kill_count(), now, solo
        )
        self.journal.part_worker(slot.part_id, process.pid, "running")
        alone = f", alone with {handle_cases[0]}" if solo else ""
        self._event("spawn", part, None, f"attempt {attempt} on {slot.label}, pid {process.pid}{alone}")
        if solo:
            self.log(f"[part {part}] retrying {handle_cases[0]} alone in a new worker")

    def _cases_for_new_worker(self, key: int | None, part: int, now: float) -> tuple[list[str], bool]:
        """A suspected case alone, else up to LOOKAHEAD + 1 queued cases within its fair share."""
        case_id, updates = self.book.take(key, self.serials, part, solo=True, now=now)
        if case_id is not None:
            self._write(updates)
            return [case_id], True
        taken: list[str] = []
        held_work = 0.0
        while len(taken) < LOOKAHEAD + 1 and self._fits(held_work, key):
            case_id, updates = self.book.take(key, self.serials, part, solo=False, now=now)
            self._write(updates)
            taken.append(case_id)
            held_work += self.book.work[case_id]
        return taken, False

    def _fits(self, held_work: float, key: int | None) -> bool:
        """May a worker holding `held_work` take the next queued case? Always when it holds
        nothing; else only within a fair share of the work left (dynamic schedule), so that near
        the end no worker sits on cases another, idle one could run."""
        next_case = self.book.peek(key, solo=False)
        if next_case is None:
            return False
        if held_work == 0 or self.book.static_part is not None:
            return True
        workers = sum(1 for s in self.plan.slots if not self.parts[s.part_id].gave_up)
        return held_work + self.book.work[next_case] <= self.book.remaining_work / max(1, workers)

    def _combination(self, unit: str) -> bool:
        """A multi-stage case's ensemble/postprocessing: its seconds (mostly waiting in the export
        pool, reading .npz) are not a prediction's and must not set the watchdog's rate."""
        return self.plan.stages is not None and self.plan.stages.is_combination(unit)

    def _work_case(self, unit: str) -> WorkCase:
        if self.plan.stages is not None:
            files = self.plan.cases[split_unit(unit)[1]].files
            return self.plan.stages.work_case(unit, files, unit in self.verify)
        files = self.plan.cases[unit].files
        return WorkCase(unit, files, prev_stage_file(self.config, unit), unit in self.verify)

    # --- feeding live workers --------------------------------------------------------------
    def _feed_workers(self) -> None:
        """Keep each live worker's local queue topped up; tell it "no more" only when nothing is
        queued for it and no other worker holds a case that could come back to the queue."""
        now = time.monotonic()
        for handle in list(self.workers.values()):
            if handle.no_more_sent or not handle.conn_open or handle.hung:
                continue
            mine = self.book.on_worker(handle.serial)
            if handle.solo and mine:
                continue
            handle.solo = False
            cases = []
            if not mine:
                case_id, updates = self.book.take(handle.key, handle.serial, handle.part, solo=True, now=now)
                if case_id is not None:
                    self._write(updates)
                    cases, handle.solo = [case_id], True
                    self.log(f"[part {handle.part}] retrying {case_id} alone")
            held = sum(1 for c in mine if self.book.flights[c].stage == HELD)
            held_work = self.book.held_work(handle.serial)
            while not handle.solo and held + len(cases) < LOOKAHEAD and self._fits(held_work, handle.key):
                case_id, updates = self.book.take(handle.key, handle.serial, handle.part, solo=False, now=now)
                self._write(updates)
                cases.append(case_id)
                held_work += self.book.work[case_id]
            try:
                if cases:
                    handle.conn.send(("cases", [self._work_case(c) for c in cases]))
                elif not mine and not self._could_come_back(handle):
                    handle.conn.send(("no_more",))
                    handle.no_more_sent = True
                elif not mine and handle.ready:
                    self._ask_for_cases_back(handle)
            except OSError:  # it just died; its exit gives the cases back
                pass

    def _ask_for_cases_back(self, idle: WorkerHandle) -> None:
        """An idle worker while another holds cases it has not started: ask that one to return
        them (it answers "given_back" with those it had not started yet)."""
        held: dict[int, list[str]] = {}
        busy = set()  # a worker holding only cases it has not started will start them now itself
        for case_id, flight in self.book.flights.items():
            if flight.stage != HELD:
                busy.add(flight.worker)
            elif flight.worker != idle.serial and self.book.key(case_id) == idle.key:
                held.setdefault(flight.worker, []).append(case_id)
        held = {w: cases for w, cases in held.items() if w in busy}
        donors = [
            w for w in self.workers.values() if held.get(w.serial) and not w.giving_back and w.conn_open and not w.solo
        ]
        if donors:
            donor = max(donors, key=lambda w: len(held[w.serial]))
            donor.giving_back = True
            try:
                donor.conn.send(("give_back", held[donor.serial]))
            except OSError:
                pass

    def _could_come_back(self, handle: WorkerHandle) -> bool:
        """Cases for this worker's queue may still come back (another worker holds some), or
        become ready (a multi-stage unit waits for another)."""
        if self.book.queued(handle.key) or self.book.waiting:
            return True
        return any(f.worker != handle.serial and self.book.key(c) == handle.key for c, f in self.book.flights.items())

    # --- messages --------------------------------------------------------------------------
    def _drain(self, handle: WorkerHandle) -> None:
        try:
            while handle.conn.poll():
                self._on_message(handle, handle.conn.recv())
        except (EOFError, OSError):
            handle.conn_open = False

    def _on_message(self, handle: WorkerHandle, message: tuple) -> None:
        kind, now = message[0], time.monotonic()
        if kind == "stage":
            self._write(self.book.enter_stage(message[1], message[2], now, handle.slot.label, time.time()))
        elif kind == "step":
            self.book.progress(message[1], now)
        elif kind == "done":
            self._on_case_done(handle, *message[1:])
        elif kind == "case_error":
            self._on_case_error(handle, *message[1:])
        elif kind == "note":
            self._event("note", handle.part, message[1], message[2])
            self.log(f"[part {handle.part}] {message[1]}: {message[2]}")
        elif kind == "ready":
            handle.ready = True
            if not self.announced_ready and all(w.ready for w in self.workers.values()):
                self.announced_ready = True  # off a terminal, the first sign of life after start-up
                took = time.monotonic() - min(w.started_at for w in self.workers.values())
                self.log(f"nnunet-launch: {len(self.workers)} worker(s) ready (model loaded) after {took:.0f} s")
        elif kind == "given_back":
            handle.giving_back = False
            mine = set(self.book.on_worker(handle.serial))
            self._write(self.book.release([c for c in message[1] if c in mine]))
        elif kind == "finished":
            handle.finished = True
        elif kind == "fatal":
            handle.fatal = message[1:5]

    def _on_case_done(self, handle: WorkerHandle, case_id: str, seconds: float | None, verified: bool) -> None:
        flight = self.book.flights.get(case_id)
        self._write(self.book.finish(case_id, seconds, time.time()))
        self.verify.discard(case_id)
        if self.intermediates is not None:
            self.intermediates.unit_done(case_id)
        if not verified:  # a kept output took no work: it says nothing about the device or the part
            self.health.case_finished(handle.slot.device_key)
            state = self.parts[handle.slot.part_id]
            state.deaths_since_finished = state.uncounted_since_finished = 0
            self.host_rests = 0
        if seconds and flight is not None and flight.stage != HELD and not self._combination(case_id):
            rate = seconds / max(self.book.work.get(case_id, 1.0), 1.0)
            self.seconds_per_work = max(self.seconds_per_work or 0.0, rate)
        how = "kept (existing output verified)" if verified else f"{seconds:.1f} s"
        progress = f"[{len(self.book.done)}/{len(self.book.work)}]"
        self.log(f"[part {handle.part} {handle.slot.label}] done {case_id} ({how}) {progress}")

    def _on_case_error(self, handle: WorkerHandle, case_id: str, error: str, kind: str) -> None:
        log, rule = self.parts[handle.slot.part_id].log_path, FAILURE_RULES[Failure(kind)]
        if rule.stops_run:  # not the case's fault (a full disk): stop, and the next run predicts it
            self._write(self.book.release([case_id]))
            self.outcome.stop_reason = self.outcome.stop_reason or f"{error} (while writing {case_id})"
            return
        retries = self.config.case_retries
        self._write(self.book.charge(case_id, error, rule.final, retries, solo=rule.retry_alone, now=time.time()))
        self._event("case_error", handle.part, case_id, error)
        if self.book.place(case_id) == FAILED:
            verdict = "failed: a retry cannot change this" if rule.final else "failed for good"
        else:
            verdict = "will retry" + (" alone in a new worker" if rule.fresh_worker else "")
        self.log(f"[part {handle.part}] case {case_id}: {error} ({verdict}; log: {log})")

    # --- deaths ----------------------------------------------------------------------------
    def _on_worker_exit(self, handle: WorkerHandle) -> None:
        self._drain(handle)
        handle.process.join(REAP_TIMEOUT_S)
        _kill_group(handle.process.pid, signal.SIGKILL, reaped=True)  # nnU-Net's helpers die with it
        clear_tmp(handle.tmp)
        del self.workers[handle.slot.part_id]
        in_flight = self.book.on_worker(handle.serial)
        if handle.finished and handle.process.exitcode == 0:
            self._write(self.book.release(in_flight))  # none expected: it said it had finished
            self.journal.part_worker(handle.slot.part_id, None, "finished")
            return
        kind = self._death_kind(handle)
        if kind is Failure.INTERRUPTED:
            self._write(self.book.release(in_flight, solo=handle.solo))
            self.parts[handle.slot.part_id].not_before = time.monotonic() + INTERRUPTED_RESPAWN_DELAY_S
            self.log(f"[part {handle.part}] worker stopped by a stop signal; nothing charged")
            return
        if kind is Failure.RESTART:  # it ended itself to free GPU memory; its case was already charged
            self._write(self.book.release(in_flight))
            return
        self._on_worker_died(handle, in_flight, kind)

    def _death_kind(self, handle: WorkerHandle) -> Failure:
        code = handle.process.exitcode
        if self.stop_signals or (code is not None and (code == WORKER_EXIT_INTERRUPTED or -code in STOP_SIGNALS)):
            return Failure.INTERRUPTED
        fatal = Failure(handle.fatal[1]) if handle.fatal else None
        helper_code = handle.fatal[3] if handle.fatal else None
        return death_kind(fatal, code, _oom_killed(handle), handle.hung is not None, helper_code)

    def _on_worker_died(self, handle: WorkerHandle, in_flight: list[str], kind: Failure) -> None:
        """policy.judge_death says whom the death is charged to and whether the device rests."""
        now, slot, state = time.monotonic(), handle.slot, self.parts[handle.slot.part_id]
        reason = handle.hung or _death_reason(handle)
        flights = [InFlight(c, self.book.flights[c].stage, self.book.flights[c].since) for c in in_flight]
        helper_stage = handle.fatal[2] if handle.fatal else None
        verdict = judge_death(kind, flights, handle.solo, slot.device_key, self.health, helper_stage)
        if verdict.final:
            reason = f"{reason}; its CUDA errors follow it (another device, or after a finished case)"
        if verdict.charged:
            error = f"worker died while on it, alone: {reason}"
            retries = self.config.case_retries
            self._write(self.book.charge(verdict.charged, error, verdict.final, retries, True, time.time()))
        if verdict.suspect:
            self._write(self.book.release([verdict.suspect], solo=verdict.alone))
        if verdict.deferred:
            self._write(self.book.release([verdict.deferred], defer=True))
        self._write(self.book.release(verdict.released, solo=handle.solo and not verdict.charged))
        rest = self.health.death(slot.device_key, verdict.charged, verdict.suspect_device, now)
        restarts = self.journal.part_restarted(slot.part_id)
        who = _slot_name(handle)  # deaths, restarts and giving up are the slot's, also on another part's cases
        self._event("worker_died", slot.part_id, verdict.charged or verdict.suspect, f"on {slot.label}: {reason}")
        if verdict.counts_restart:  # a case's deaths are budgeted by --case-retries
            state.deaths_since_finished += 1
        elif verdict.charged is None:  # still slows the restarts down: a killer that keeps killing
            state.uncounted_since_finished += 1
        if verdict.rests_host:
            self._rest_host(now, reason)
        whose = self._whose_fault(verdict, kind)
        if rest:
            self._report_resting_device(slot, slot.part_id, reason, rest)
        if state.deaths_since_finished > self.config.max_restarts:
            self._give_up(
                slot.part_id,
                f"{who} gave up: its worker died {state.deaths_since_finished} times without "
                f"finishing a case (--max-restarts {self.config.max_restarts}; last: {reason})",
            )
            return
        deaths = state.deaths_since_finished + state.uncounted_since_finished
        state.not_before = max(state.not_before, now + restart_delay(deaths))
        delay = state.not_before - now
        when = f" in {delay:.0f} s" if delay >= 1 else ""
        counted = (
            ""
            if verdict.charged
            else f" ({state.deaths_since_finished}/{self.config.max_restarts} since the last finished case)"
        )
        self.log(f"[{who}] worker died ({reason}){whose}; restart {restarts}{when}{counted}")

    def _whose_fault(self, verdict: DeathVerdict, kind: Failure) -> str:
        if verdict.charged:
            left = "failed for good" if self.book.place(verdict.charged) == FAILED else "charged one attempt"
            return f"; {verdict.charged} was alone on it: {left}"
        if verdict.suspect:
            return f"; {verdict.suspect} is suspected and will be retried" + (" alone" if verdict.alone else "")
        if verdict.deferred:
            return f"; the device is suspected; {verdict.deferred} goes back to the queue behind the other cases"
        if not verdict.suspect_device:
            return f" ({kind.value}): nothing charged, the device not suspected"
        return "; no case was running: counted against the device"

    def _rest_host(self, now: float, reason: str) -> None:
        """The host ran out of memory: every part waits before its next worker (the more often, the
        longer), so that memory frees up; no GPU is suspected."""
        self.host_rests += 1
        until = now + backoff(self.host_rests, DEVICE_REST_BASE_S, DEVICE_REST_MAX_S)
        for part in self.parts.values():
            part.not_before = max(part.not_before, until)
        self.log(f"nnunet-launch: the host ran out of memory ({reason}); every part waits {until - now:.0f} s")

    def _report_resting_device(self, slot: Slot, part: int, reason: str, rest: float) -> None:
        health = gpus.health_report(slot.gpu_uuid) if slot.gpu_uuid else ""
        faults = self.health.faults.get(slot.device_key, 0)
        self.log(
            f"[{slot.label}] suspected ({faults} unexplained death(s) in a row, last: {reason}){health}; "
            f"it rests {rest:.0f} s while the others take its cases"
        )
        self._event("device_rests", part, None, f"{slot.device_key}: {reason}{health}; {rest:.0f} s")

    def _give_up(self, slot_part: int, why: str) -> None:
        self.parts[slot_part].gave_up = True
        self.journal.part_worker(slot_part, None, "gave up")
        self.log(f"[part {slot_part}] {why}")
        self._event("gave_up", slot_part, None, why)

    # --- the watchdog ----------------------------------------------------------------------
    def _watchdog(self, now: float) -> None:
        """A worker is hung when its cases in flight show no progress for their stall timeout
        (scaled by each case's work); before it is ready, when start-up takes too long."""
        explicit = self.config.hang_timeout
        for handle in list(self.workers.values()):
            if handle.hung is not None:
                if now - handle.hung_at > REAP_TIMEOUT_S:  # SIGKILL did not end it: stuck in the kernel
                    self.log(
                        f"[part {handle.part}] pid {handle.process.pid} did not exit after SIGKILL; going on without it"
                    )
                    self._on_worker_exit(handle)
                continue
            if not handle.ready:
                limit = max(explicit or 0.0, WORKER_STARTUP_GRACE_S)
                if now - handle.started_at > limit:
                    self._kill_hung(handle, f"hung: not ready after {now - handle.started_at:.0f} s")
                continue
            active = [(c, f) for c in self.book.on_worker(handle.serial) if (f := self.book.flights[c]).stage != HELD]
            if not active:
                continue
            last = max(f.progress_at for _, f in active)
            limit = max(stall_timeout(explicit, self.book.work.get(c, 0.0), self.seconds_per_work) for c, _ in active)
            if now - last > limit:
                stages = ", ".join(f"{c} in {f.stage}" for c, f in active)
                self._kill_hung(handle, f"hung: no progress for {now - last:.0f} s ({stages}; limit {limit:.0f} s)")

    def _kill_hung(self, handle: WorkerHandle, why: str) -> None:
        handle.hung, handle.hung_at = why, time.monotonic()
        self.log(f"[part {handle.part}] {why}; killing its process group")
        _kill_group(handle.process.pid, signal.SIGKILL)

    # --- the end ---------------------------------------------------------------------------
    def _kill_all(self, signum: int) -> None:
        for handle in self.workers.values():
            _kill_group(handle.process.pid, signum)

    def _shut_down(self, exit_code: int, message: str) -> int:
        """Stop every worker (TERM, a grace to finish what is nearly done, then KILL). Cases in
        flight go back to the queue uncharged; a process that cannot be reaped is named."""
        self.log(message)
        self._event("interrupted" if exit_code == EXIT_INTERRUPTED else "stopped", None, None, message)
        self._kill_all(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self.workers and time.monotonic() < deadline:
            ready = set(wait([w.process.sentinel for w in self.workers.values()], timeout=0.2))
            for handle in list(self.workers.values()):
                self._drain(handle)  # keep every case that finished in time
                if handle.process.sentinel in ready:
                    self._reap(handle)
        self._kill_all(signal.SIGKILL)
        for handle in list(self.workers.values()):
            self._reap(handle)
        self._flush()
        if self.outcome.unreaped:
            pids = ", ".join(map(str, self.outcome.unreaped))
            self.log(f"nnunet-launch: could not reap worker pid(s) {pids} (stuck in the kernel?); exiting anyway")
        return exit_code

    def _reap(self, handle: WorkerHandle) -> None:
        handle.process.join(REAP_TIMEOUT_S)
        if handle.process.exitcode is None:
            self.outcome.unreaped.append(handle.process.pid)
        self._drain(handle)
        _kill_group(handle.process.pid, signal.SIGKILL, reaped=handle.process.exitcode is not None)
        clear_tmp(handle.tmp)
        self._write(self.book.release(self.book.on_worker(handle.serial), solo=handle.solo))
        self.workers.pop(handle.slot.part_id, None)

    def _fail_leftovers(self) -> None:
        """Every slot gave up: what is still queued cannot be predicted in this run."""
        keys = self.book.queued_keys()
        if not keys:
            return
        left = self.book.queued(any_key=True)
        why = f"not predicted: every worker that could run it gave up (--max-restarts {self.config.max_restarts})"
        self._write(self.book.fail_queued(keys, why, time.time()))
        self.log(f"nnunet-launch: {left} case(s) {why}")


def _slowest_rate(done_seconds: dict[str, float], work: dict[str, float]) -> float | None:
    """Seconds per unit of work of the slowest case already done (a resumed run's watchdog)."""
    rates = [s / max(work.get(c, 1.0), 1.0) for c, s in done_seconds.items() if s and c in work]
    return max(rates, default=None)


def _slot_name(handle: WorkerHandle) -> str:
    """A slot that took over a part that gave up (static schedule) runs another part's cases."""
    own = handle.slot.part_id
    return f"part {own}" + (f", on part {handle.part}'s cases" if handle.part != own else "")


def _oom_killed(handle: WorkerHandle) -> bool:
    """Whether the kernel's OOM killer killed a process since the worker started (cgroup v2)."""
    now = oom_kill_count()
    return handle.oom_kills_at_start is not None and now is not None and now > handle.oom_kills_at_start


def _death_reason(handle: WorkerHandle) -> str:
    oom = _oom_killed(handle)
    if handle.fatal:
        return handle.fatal[0] + ("; the kernel's OOM killer killed a process meanwhile" if oom else "")
    return describe_exit(handle.process.exitcode, oom)


def _kill_group(pgid: int | None, signum: int, reaped: bool = False) -> None:
    """Kill a worker's process group; before its setsid() the group is not there yet, so the
    worker itself is killed (never once it was reaped: its pid may belong to another process)."""
    if pgid is None:
        return
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        if reaped:
            return
        try:
            os.kill(pgid, signum)
        except ProcessLookupError:
            pass
    except PermissionError:
        print(f"nnunet-launch: cannot signal process group {pgid}", file=sys.stderr)
