"""The supervisor: the event loop and process handling only. It spawns one worker per slot,
waits on their pipes and deaths, feeds what happens to the case book (scheduler.CaseBook, which
also decides which cases a worker gets) and the failure policy (policy.py), writes what the book
returns into the journal (the only writer), and handles stop signals. Never imports nnunetv2,
never touches CUDA."""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import wait

from launcher.bookkeeping import Bookkeeper
from launcher.config import RunConfig, run_state_dir
from launcher.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NO_SPACE, EXIT_OK, STOP_SIGNALS, WORKER_EXIT_INTERRUPTED
from launcher.journal import Journal, JournalWriteError
from launcher.outputs import clear_tmp, logs_dir, tmp_dir
from launcher.planning import Plan, predict_settings, work_case
from launcher.policy import (
    WORKER_STARTUP_GRACE_S,
    death_kind,
    describe_watchdog,
    stall_timeout,
)
from launcher.processes import Prestarted, WorkerHandle, kill_group, spawn_context, start_worker
from launcher.scheduler import (
    ASK_BACK,
    HELD,
    NO_MORE,
    NO_WORK,
    CaseBook,
    Feed,
    Slot,
    cases_for_new_worker,
    give_back_donor,
    key_for_new_worker,
    top_up,
)
from launcher.spec import Failure, WorkerSpec

SHUTDOWN_GRACE_S = 5.0
REAP_TIMEOUT_S = 5.0  # a process stuck in the kernel cannot be reaped: report it and go on
# A worker killed by a stop signal may die a moment before the supervisor's own signal arrives
# (SLURM and systemd signal every process): wait this long before replacing it.
INTERRUPTED_RESPAWN_DELAY_S = 2.0
MAX_WAIT_S = 0.5
COALESCE_S = 0.002  # a case's messages come in a burst: take them in one turn of the loop
WATCHDOG_EVERY_S = 0.25  # hangs are measured in seconds; no need to look at every message
FLUSH_EVERY_S = 0.05  # journal writes: one transaction per 50 ms of updates at most


class Supervisor:
    """`workers` holds each slot's live worker, keyed by the slot's part id as the bookkeeper's
    `slots` are; a worker's `part` is whose cases it runs."""

    def __init__(
        self,
        config: RunConfig,
        plan: Plan,
        journal: Journal,
        book: CaseBook,
        reporter,
        run_id: int,
        prestarted: Prestarted | None = None,
    ):
        self.config, self.plan, self.journal, self.book = config, plan, journal, book
        self.run_id = run_id
        self.reporter = reporter
        self.log = reporter.log
        self.books = Bookkeeper(config, plan, journal, book, reporter.log, run_id)
        self.workers: dict[int, WorkerHandle] = {}
        self.attempts = {s.part_id: 0 for s in plan.slots}  # workers started per part (log names)
        self.serials = 0
        self.last_watchdog = self.last_flush = 0.0
        self.finished_seen = 0
        self.announced_ready = False
        self.stop_signals = 0
        self.unreaped: list[int] = []
        self.context = spawn_context()
        self.prestarted = prestarted  # each slot's first worker, started while the model was checked
        self.settings = predict_settings(config, plan)

    # --- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        previous = self._install_signal_handlers()
        self.log(describe_watchdog(self.config.hang_timeout))
        try:
            while True:
                if self.stop_signals:
                    return self._shut_down(EXIT_INTERRUPTED, "interrupted: stopping workers...")
                if self.books.stop_reason:
                    return self._shut_down(EXIT_NO_SPACE, f"stopping: {self.books.stop_reason}")
                if not self._turn():
                    break
            self.books.fail_leftovers()
            self.books.flush()
            if self.books.stop_reason:
                return self._shut_down(EXIT_NO_SPACE, f"stopping: {self.books.stop_reason}")
            return EXIT_FAILED if self.book.failed or self.book.unfinished() else EXIT_OK
        except JournalWriteError as exc:  # the journal failed beyond the event loop's reach
            self.books.stop_reason = str(exc)
            return self._shut_down(EXIT_NO_SPACE, f"stopping: {exc}")
        except BaseException:
            self._kill_all(signal.SIGKILL)  # a supervisor bug must not leave workers behind
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _turn(self) -> bool:
        """One turn of the event loop; False when no worker is left and none will start."""
        wake = self._start_workers(time.monotonic())
        if not self.workers and wake is None:
            return False
        if self._step(MAX_WAIT_S if wake is None else min(MAX_WAIT_S, max(0.0, wake - time.monotonic()))):
            self._feed_workers()
        now = time.monotonic()
        if now - self.last_watchdog >= WATCHDOG_EVERY_S:
            self.last_watchdog = now
            self._watchdog(now)
        finished = len(self.book.done) + len(self.book.failed)
        # a case ended: the journal first, so that the lines the reporter prints agree with the log's
        if now - self.last_flush >= FLUSH_EVERY_S or finished != self.finished_seen:
            self.last_flush, self.finished_seen = now, finished
            self.books.flush()
        self.reporter.refresh(finished)
        return True

    def _install_signal_handlers(self) -> dict:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
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

    # --- starting workers ------------------------------------------------------------------
    def _start_workers(self, now: float) -> float | None:
        """Give every free slot a worker where there is work for it. Returns when to look again
        for slots that wait (back-off) while work is queued, or None when none waits."""
        wake = None
        running = {w.key for w in self.workers.values()}
        for slot in [
            s for s in self.plan.slots if s.part_id not in self.workers and not self.books.slots[s.part_id].gave_up
        ]:
            key = key_for_new_worker(self.book, slot.part_id, running, self._unavailable(now))
            if key == NO_WORK:
                continue
            ready_at = self.books.ready_at(slot)
            if ready_at > now:
                wake = ready_at if wake is None else min(wake, ready_at)
                continue
            if self._spawn(slot, key, now):
                running.add(key)
        if self.prestarted is not None:  # a slot without work now gets a new worker if it gets work later
            self.prestarted.close()
            self.prestarted = None
        return wake

    def _unavailable(self, now: float) -> set[int]:
        """Slots that gave up or wait: in the static schedule, another slot may take their cases."""
        return {
            s.part_id for s in self.plan.slots if self.books.slots[s.part_id].gave_up or self.books.ready_at(s) > now
        }

    def _spawn(self, slot: Slot, key: int | None, now: float) -> bool:
        self.serials += 1
        part = slot.part_id if key is None else key
        taken = cases_for_new_worker(self.book, Feed(self.serials, key, part, False), now, self.books.live_slots())
        self.books.write(taken.updates)
        if not taken.cases:
            return False
        self.attempts[part] += 1  # per part: a slot that took over another part counts there
        tmp = os.path.join(tmp_dir(run_state_dir(self.config)), f"worker-{self.serials}")
        clear_tmp(tmp)
        # named with the run: a resumed run never appends to an earlier run's log
        log_name = f"run-{self.run_id}.part-{part}.attempt-{self.attempts[part]}.log"
        log_path = self.books.slots[slot.part_id].log_path = os.path.join(
            logs_dir(run_state_dir(self.config)), log_name
        )
        work = tuple(self._work_case(c) for c in taken.cases)
        spec = WorkerSpec(
            part, self.attempts[part], slot.device_key, slot.gpu_uuid, os.getpid(),
            os.path.abspath(self.config.output_folder), tmp, log_path, self.settings, work, slot.label,
        )  # fmt: skip
        prestarted = self.prestarted.take(slot) if self.prestarted is not None else None
        handle = start_worker(self.context, self.serials, slot, key, spec, now, prestarted)
        self.workers[slot.part_id] = handle
        handle.solo = taken.solo
        self.journal.part_worker(slot.part_id, handle.process.pid, "running")
        alone = f", alone with {taken.cases[0]}" if taken.solo else ""
        self.books.event(
            "spawn", part, None, f"attempt {spec.attempt} on {slot.label}, pid {handle.process.pid}{alone}"
        )
        if taken.solo:
            self.log(f"[part {part}] retrying {taken.cases[0]} alone in a new worker")
        return True

    def _work_case(self, unit: str):
        return work_case(self.config, self.plan, unit, unit in self.book.verify)

    # --- feeding live workers --------------------------------------------------------------
    def _feed_workers(self) -> None:
        """Send each live worker what scheduler.top_up decides: more cases, "no more", or ask
        another worker to give back cases it has not started."""
        now = time.monotonic()
        for handle in list(self.workers.values()):
            if handle.no_more_sent or not handle.conn_open or handle.hung:
                continue
            top = top_up(self.book, _feed(handle), now, self.books.live_slots())
            self.books.write(top.updates)
            if top.cases and top.solo:  # newly taken: a worker alone with a case holds nothing else
                self.log(f"[part {handle.part}] retrying {top.cases[0]} alone")
            handle.solo = top.solo
            if top.cases:
                handle.send(("cases", [self._work_case(c) for c in top.cases]))
            elif top.then == NO_MORE:
                handle.no_more_sent = handle.send(("no_more",))
            elif top.then == ASK_BACK and handle.ready:
                self._ask_for_cases_back(handle)

    def _ask_for_cases_back(self, idle: WorkerHandle) -> None:
        askable = {w.serial: w for w in self.workers.values() if not w.giving_back and w.conn_open and not w.solo}
        found = give_back_donor(self.book, _feed(idle), set(askable))
        if found:
            donor = askable[found[0]]
            donor.giving_back = True
            donor.send(("give_back", found[1]))  # it answers "given_back" with those not started yet

    # --- messages --------------------------------------------------------------------------
    def _drain(self, handle: WorkerHandle) -> None:
        try:
            while handle.conn.poll():
                self._on_message(handle, handle.conn.recv())
        except (EOFError, OSError):
            handle.conn_open = False

    def _on_message(self, handle: WorkerHandle, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            handle.ready = True
            if not self.announced_ready and all(w.ready for w in self.workers.values()):
                self.announced_ready = True  # off a terminal, the first sign of life after start-up
                took = time.monotonic() - min(w.started_at for w in self.workers.values())
                self.log(f"nnunet-launch: {len(self.workers)} worker(s) ready (model loaded) after {took:.0f} s")
        elif kind == "given_back":
            handle.giving_back = False
            mine = set(self.book.on_worker(handle.serial))
            self.books.write(self.book.release([c for c in message[1] if c in mine]))
        elif kind == "finished":
            handle.finished = True
        elif kind == "fatal":
            handle.fatal = message[1:5]
        else:
            self.books.on_case_message(handle, message)

    # --- deaths ----------------------------------------------------------------------------
    def _on_worker_exit(self, handle: WorkerHandle) -> None:
        self._drain(handle)
        handle.process.join(REAP_TIMEOUT_S)
        kill_group(handle.process.pid, signal.SIGKILL, reaped=True)  # nnU-Net's helpers die with it
        clear_tmp(handle.tmp)
        del self.workers[handle.slot.part_id]
        in_flight = self.book.on_worker(handle.serial)
        if handle.finished and handle.process.exitcode == 0:
            self.books.write(self.book.release(in_flight))  # none expected: it said it had finished
            self.journal.part_worker(handle.slot.part_id, None, "finished")
            return
        kind = self._death_kind(handle)
        if kind is Failure.INTERRUPTED:
            self.books.write(self.book.release(in_flight, solo=handle.solo))
            self.books.slots[handle.slot.part_id].not_before = time.monotonic() + INTERRUPTED_RESPAWN_DELAY_S
            self.log(f"[part {handle.part}] worker stopped by a stop signal; nothing charged")
            return
        if kind is Failure.RESTART:  # it ended itself to free GPU memory; its case was already charged
            self.books.write(self.book.release(in_flight))
            return
        self.books.on_death(handle, in_flight, kind)

    def _death_kind(self, handle: WorkerHandle) -> Failure:
        code = handle.process.exitcode
        if self.stop_signals or (code is not None and (code == WORKER_EXIT_INTERRUPTED or -code in STOP_SIGNALS)):
            return Failure.INTERRUPTED
        fatal = Failure(handle.fatal[1]) if handle.fatal else None
        helper_code = handle.fatal[3] if handle.fatal else None
        return death_kind(fatal, code, handle.oom_killed(), handle.hung is not None, helper_code)

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
            limit = max(
                stall_timeout(explicit, self.book.work.get(c, 0.0), self.books.seconds_per_work) for c, _ in active
            )
            if now - last > limit:
                stages = ", ".join(f"{c} in {f.stage}" for c, f in active)
                self._kill_hung(handle, f"hung: no progress for {now - last:.0f} s ({stages}; limit {limit:.0f} s)")

    def _kill_hung(self, handle: WorkerHandle, why: str) -> None:
        handle.hung, handle.hung_at = why, time.monotonic()
        self.log(f"[part {handle.part}] {why}; killing its process group")
        kill_group(handle.process.pid, signal.SIGKILL)

    # --- the end ---------------------------------------------------------------------------
    def _kill_all(self, signum: int) -> None:
        for handle in self.workers.values():
            kill_group(handle.process.pid, signum)

    def _shut_down(self, exit_code: int, message: str) -> int:
        """Stop every worker (TERM, a grace to finish what is nearly done, then KILL). Cases in
        flight go back to the queue uncharged; a process that cannot be reaped is named."""
        self.log(message)
        self.books.event("interrupted" if exit_code == EXIT_INTERRUPTED else "stopped", None, None, message)
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
        self.books.flush()
        if self.unreaped:
            pids = ", ".join(map(str, self.unreaped))
            self.log(f"nnunet-launch: could not reap worker pid(s) {pids} (stuck in the kernel?); exiting anyway")
        return exit_code

    def _reap(self, handle: WorkerHandle) -> None:
        handle.process.join(REAP_TIMEOUT_S)
        if handle.process.exitcode is None:
            self.unreaped.append(handle.process.pid)
        self._drain(handle)
        kill_group(handle.process.pid, signal.SIGKILL, reaped=handle.process.exitcode is not None)
        clear_tmp(handle.tmp)
        self.books.write(self.book.release(self.book.on_worker(handle.serial), solo=handle.solo))
        self.workers.pop(handle.slot.part_id, None)


def _feed(handle: WorkerHandle) -> Feed:
    return Feed(handle.serial, handle.key, handle.part, handle.solo)
