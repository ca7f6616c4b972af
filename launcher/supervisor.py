"""The supervisor: spawns one worker per part, watches them, restarts what crashes or hangs,
drops sick devices, handles signals, and is the only writer of the journal.
Never imports nnunetv2, never touches CUDA."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from launcher import gpus
from launcher.config import RunConfig, run_state_dir
from launcher.journal import DONE, FAILED, PENDING, Journal
from launcher.outputs import clear_tmp, logs_dir, tmp_dir
from launcher.planning import Plan, prev_stage_file
from launcher.policy import STARTUP_GRACE_S, DeviceHealth, InFlight, blame, hang_timeout
from launcher.scheduler import LargestFirstQueue, Slot
from launcher.worker import PredictSettings, WorkCase, WorkerSpec, worker_main

SHUTDOWN_GRACE_S = 5.0
# dynamic schedule: cases a worker holds beyond the ones it is working on, so that it never
# waits for the supervisor to learn its next case
DYNAMIC_LOOKAHEAD = 2
WAIT_S = 0.5
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
CGROUP_MEMORY_EVENTS = "/sys/fs/cgroup/memory.events"


@dataclass
class WorkerHandle:
    part: int
    slot: Slot  # where it runs: its own slot, or a healthy one that took over a sick device's part
    attempt: int
    process: object
    conn: object
    tmp: str
    oom_kills_at_start: int | None
    conn_open: bool = True
    no_more_sent: bool = False
    ready: bool = False
    finished: bool = False
    fatal: str | None = None
    hung: str | None = None
    last_progress: float = field(default_factory=time.monotonic)


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
        name = signal.Signals(-exitcode).name
        if oom_killed:
            return f"killed by the kernel's OOM killer ({name})"
        return f"killed by {name}"
    return f"exit code {exitcode}"


class Supervisor:
    def __init__(self, config: RunConfig, plan: Plan, journal: Journal, verify: set[str], reporter):
        self.config, self.plan, self.journal, self.verify = config, plan, journal, verify
        self.reporter = reporter
        self.log = reporter.log
        self.log_paths: dict[int, str] = {}  # part -> its current worker's log
        self.workers: dict[int, WorkerHandle] = {}  # by part
        self.attempts: dict[int, int] = {}
        self.health = DeviceHealth()
        self.orphans: deque[int] = deque()  # static: parts whose device was dropped, waiting for a slot
        self.given_up: set[int] = set()
        self.queue = (
            LargestFirstQueue({c: plan.work[c] for c in journal.cases_in_state(PENDING)})
            if config.schedule == "dynamic"
            else None
        )
        self.stop_signals = 0
        self.hang_timeout_s = hang_timeout(config.hang_timeout, journal.slowest_case_seconds())
        import torch.multiprocessing as torch_mp  # spawn context; importing torch does not touch CUDA

        # A killed worker leaves its pools' semaphores registered with the spawn resource tracker,
        # which cleans them up at exit and warns about it: expected here, not news for the user.
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
        )

    # --- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        previous = self._install_signal_handlers()
        how = "--hang-timeout" if self.config.hang_timeout else "10 min or 10x the slowest case, adapting"
        self.log(f"nnunet-launch: hang timeout {self.hang_timeout_s:.0f} s ({how})")
        try:
            for slot in self.plan.slots:
                self._spawn_if_work_left(slot.part_id, slot)
            while self._fill_free_slots() or self.workers:
                if self.stop_signals:
                    return self._shut_down()
                self._step()
                self._kill_hung_workers()
                self.reporter.refresh()
            self._fail_leftovers()
            return self._result()
        except BaseException:
            self._kill_all(signal.SIGKILL)  # a supervisor bug must not leave workers behind
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

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

    def _step(self) -> None:
        waitables = [w.conn for w in self.workers.values() if w.conn_open]
        waitables += [w.process.sentinel for w in self.workers.values()]
        ready = set(wait(waitables, timeout=WAIT_S))
        for handle in list(self.workers.values()):
            if handle.conn_open and handle.conn in ready:
                self._drain(handle)
            if handle.process.sentinel in ready:
                self._on_worker_exit(handle)

    def _kill_hung_workers(self) -> None:
        now = time.monotonic()
        for handle in self.workers.values():
            limit = self.hang_timeout_s if handle.ready else max(self.hang_timeout_s, STARTUP_GRACE_S)
            if handle.hung is None and now - handle.last_progress > limit:
                handle.hung = f"hung: no progress for {now - handle.last_progress:.0f} s (hang timeout {limit:.0f} s)"
                self.log(f"[part {handle.part}] {handle.hung}; killing its process group")
                _kill_group(handle.process.pid, signal.SIGKILL)

    # --- workers ---------------------------------------------------------------------------
    def _spawn_if_work_left(self, part: int, slot: Slot) -> None:
        if self.queue is None:
            cases, more_to_come = self.journal.cases_in_state(PENDING, part), False
        else:
            cases = [c for c in (self.queue.take() for _ in range(DYNAMIC_LOOKAHEAD + 1)) if c is not None]
            more_to_come = len(self.queue) > 0
        if not cases:
            self.journal.part_worker(part, None, "finished")
            self._take_orphan(slot)
            return
        self.journal.assign(cases, part)
        attempt = self.attempts[part] = self.attempts.get(part, 0) + 1
        state = os.path.join(tmp_dir(run_state_dir(self.config)), f"part-{part}-attempt-{attempt}")
        clear_tmp(state)
        spec = WorkerSpec(
            part_id=part,
            attempt=attempt,
            device_key=slot.device_key,
            gpu_uuid=slot.gpu_uuid,
            supervisor_pid=os.getpid(),
            out_dir=os.path.abspath(self.config.output_folder),
            tmp_dir=state,
            log_path=self._log_path(part, attempt),
            settings=self.settings,
            cases=tuple(self._work_case(c) for c in cases),
            more_to_come=more_to_come,
        )
        parent_conn, child_conn = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=worker_main, args=(spec, child_conn), daemon=False, name=f"nnunet-launch part {part}"
        )
        process.start()
        child_conn.close()
        handle = WorkerHandle(part, slot, attempt, process, parent_conn, state, oom_kill_count())
        handle.no_more_sent = not more_to_come
        self.workers[part] = handle
        self.journal.part_worker(part, process.pid, "running")
        self.journal.event("spawn", part, None, f"attempt {attempt} on {slot.label}, pid {process.pid}")

    def _log_path(self, part: int, attempt: int) -> str:
        path = os.path.join(logs_dir(run_state_dir(self.config)), f"part-{part}.attempt-{attempt}.log")
        self.log_paths[part] = path
        return path

    def _work_case(self, case_id: str) -> WorkCase:
        files = self.plan.cases[case_id].files
        return WorkCase(case_id, files, prev_stage_file(self.config, case_id), case_id in self.verify)

    def _top_up(self, handle: WorkerHandle) -> None:
        """Dynamic schedule: a worker took a case from its local queue; send it the next one."""
        if self.queue is None or handle.no_more_sent:
            return
        case_id = self.queue.take()
        try:
            if case_id is None:
                handle.conn.send(("no_more",))
                handle.no_more_sent = True
            else:
                self.journal.assign([case_id], handle.part)
                handle.conn.send(("cases", [self._work_case(case_id)]))
        except OSError:  # the worker just died; its exit gives the case back
            pass

    def _take_orphan(self, slot: Slot) -> None:
        """Static schedule: a free healthy slot takes over a part whose device was dropped."""
        if self.orphans and slot.device_key not in self.health.sick:
            part = self.orphans.popleft()
            self.log(f"[part {part}] continues on {slot.label} (slot of part {slot.part_id})")
            self._spawn_if_work_left(part, slot)

    def _fill_free_slots(self) -> bool:
        """Dynamic schedule: healthy slots without a worker take queued cases (given back by a
        crash or a failed attempt after their worker was told there was no more)."""
        if self.queue is None or not self.queue:
            return False
        busy = {w.slot for w in self.workers.values()}
        for slot in self.plan.slots:
            usable = slot.device_key not in self.health.sick and slot.part_id not in self.given_up
            if self.queue and usable and slot not in busy:
                self._spawn_if_work_left(slot.part_id, slot)
        return bool(self.workers)

    def _drain(self, handle: WorkerHandle) -> None:
        try:
            while handle.conn.poll():
                self._on_message(handle, handle.conn.recv())
        except (EOFError, OSError):
            handle.conn_open = False

    def _on_message(self, handle: WorkerHandle, message: tuple) -> None:
        kind, part = message[0], handle.part
        handle.last_progress = time.monotonic()
        if kind == "started":
            self.journal.case_started(message[1], handle.slot.label)
            self._top_up(handle)
        elif kind == "stage":
            self.journal.case_stage(message[1], message[2])
        elif kind == "done":
            _, case_id, seconds, verified = message
            self.journal.case_done(case_id, seconds)
            self.verify.discard(case_id)
            self.health.case_finished(handle.slot.device_key)
            if seconds is not None and self.config.hang_timeout is None:
                self._adapt_hang_timeout(seconds)
            how = "kept (existing output verified)" if verified else f"{seconds:.1f} s"
            self.log(f"[part {part} {handle.slot.label}] done {case_id} ({how}) {self._progress()}")
        elif kind == "case_error":
            self._case_attempt_failed(part, message[1], message[2])
        elif kind == "note":
            self.journal.event("note", part, message[1], message[2])
            self.log(f"[part {part}] {message[1]}: {message[2]}")
        elif kind == "ready":
            handle.ready = True
        elif kind == "finished":
            handle.finished = True
        elif kind == "fatal":
            handle.fatal = message[1]

    def _adapt_hang_timeout(self, case_seconds: float) -> None:
        adapted = hang_timeout(None, case_seconds)
        if adapted > self.hang_timeout_s:
            self.hang_timeout_s = adapted
            self.log(f"nnunet-launch: hang timeout now {adapted:.0f} s (10x a {case_seconds:.0f} s case)")

    def _case_attempt_failed(self, part: int, case_id: str, error: str) -> None:
        state = self.journal.case_failed_attempt(case_id, error, self.config.case_retries)
        self.journal.event("case_error", part, case_id, error)
        verdict = "failed for good" if state == FAILED else "will retry"
        self.log(f"[part {part}] case {case_id}: {error} ({verdict}; log: {self.log_paths.get(part)})")
        if state == PENDING and self.queue is not None:
            self.queue.give_back([case_id])

    def _on_worker_exit(self, handle: WorkerHandle) -> None:
        self._drain(handle)
        handle.process.join()
        part, slot = handle.part, handle.slot
        _kill_group(handle.process.pid, signal.SIGKILL)  # nnU-Net's helpers of a dead worker die with it
        clear_tmp(handle.tmp)
        del self.workers[part]
        if self.queue is not None:
            self.queue.give_back(self.journal.cases_in_state(PENDING, part))
        if handle.finished and handle.process.exitcode == 0:
            self._spawn_if_work_left(part, slot)  # retry cases whose attempt failed, if any
            return
        reason = handle.hung or _death_reason(handle)
        self._charge_crash(part, reason)
        restarts = self.journal.part_restarted(part)
        self.journal.event("worker_died", part, None, f"on {slot.label}: {reason}")
        if self.health.worker_died(slot.device_key):
            self._report_sick_device(slot, part, reason)
        if slot.device_key in self.health.sick:
            self._move_off_sick_device(part)
            return
        if restarts > self.config.max_restarts:
            self._give_up(part, f"part {part} gave up after {self.config.max_restarts} restarts (last: {reason})")
            self._take_orphan(slot)
            return
        self.log(f"[part {part}] worker died ({reason}); restart {restarts}/{self.config.max_restarts}")
        self._spawn_if_work_left(part, slot)

    def _charge_crash(self, part: int, reason: str) -> None:
        blamed, released = blame([InFlight(*row) for row in self.journal.in_flight(part)])
        self.journal.release_cases(released)
        for case_id in blamed:
            self._case_attempt_failed(part, case_id, f"worker died while on it: {reason}")

    def _report_sick_device(self, slot: Slot, part: int, reason: str) -> None:
        health = gpus.health_report(slot.gpu_uuid) if slot.gpu_uuid else ""
        self.log(
            f"[{slot.label}] dropped from the run: workers died {self.health.limit} times in a row "
            f"without finishing a case (last: {reason}){health}"
        )
        self.journal.event("device_dropped", part, None, f"{slot.device_key}: {reason}{health}")

    def _move_off_sick_device(self, part: int) -> None:
        """Static: the part waits for a free healthy slot. Dynamic: its cases go back to the queue.
        With no healthy device left, the run ends."""
        healthy = [s for s in self.plan.slots if s.device_key not in self.health.sick]
        if not healthy:
            for orphan in [part, *self.orphans]:
                self._give_up(orphan, "no usable device left: every one was dropped")
            self.orphans.clear()
            self._fail_leftovers("no usable device left: every one was dropped")
            return
        if self.queue is None:
            self.orphans.append(part)
        busy = {w.slot for w in self.workers.values()}
        for free in [s for s in healthy if s not in busy]:
            self._take_orphan(free)

    def _give_up(self, part: int, why: str) -> None:
        self.given_up.add(part)
        left = self.journal.cases_in_state(PENDING, part)
        if self.queue is not None:  # dynamic: its cases went back to the queue for the other workers
            left = [c for c in left if c not in self.queue]
        self.journal.fail_cases(left, why)
        self.journal.part_worker(part, None, "gave up")
        self.log(f"[part {part}] {why}; {len(left)} case(s) left unfinished")

    def _kill_all(self, signum: int) -> None:
        for handle in self.workers.values():
            _kill_group(handle.process.pid, signum)

    def _shut_down(self) -> int:
        self.log("interrupted: stopping workers...")
        self.journal.event("interrupted", None, None, f"signal count {self.stop_signals}")
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
        return EXIT_INTERRUPTED

    def _reap(self, handle: WorkerHandle) -> None:
        handle.process.join()
        self._drain(handle)
        _kill_group(handle.process.pid, signal.SIGKILL)
        clear_tmp(handle.tmp)
        self.workers.pop(handle.part, None)

    # --- reporting -------------------------------------------------------------------------
    def _progress(self) -> str:
        done = len(self.journal.cases_in_state(DONE))
        return f"[{done}/{len(self.plan.cases)}]"

    def _fail_leftovers(self, why: str = "not predicted: every worker that could run it gave up") -> None:
        left = self.journal.cases_in_state(PENDING)
        if self.queue is not None:
            while self.queue.take() is not None:
                pass
        if left:
            self.journal.fail_cases(left, why)
            self.log(f"nnunet-launch: {len(left)} case(s) {why}")

    def _result(self) -> int:
        unfinished = self.journal.cases_in_state(FAILED) or self.journal.cases_in_state(PENDING)
        return EXIT_FAILED if unfinished else EXIT_OK


def _death_reason(handle: WorkerHandle) -> str:
    now = oom_kill_count()
    oom = handle.oom_kills_at_start is not None and now is not None and now > handle.oom_kills_at_start
    if handle.fatal:
        return handle.fatal + ("; the kernel's OOM killer killed a process meanwhile" if oom else "")
    return describe_exit(handle.process.exitcode, oom)


def _kill_group(pgid: int | None, signum: int) -> None:
    """Kill a worker's process group; before its setsid() the group is not there yet, so the
    worker itself is killed."""
    if pgid is None:
        return
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        try:
            os.kill(pgid, signum)
        except ProcessLookupError:
            pass
    except PermissionError:
        print(f"nnunet-launch: cannot signal process group {pgid}", file=sys.stderr)
