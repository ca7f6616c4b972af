"""The supervisor: spawns one worker per part, watches them, restarts what crashes, handles
signals, and is the only writer of the journal. Never imports nnunetv2, never touches CUDA."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from launcher.config import RunConfig
from launcher.journal import DONE, FAILED, PENDING, Journal
from launcher.outputs import clear_tmp, logs_dir, tmp_dir
from launcher.planning import Plan, prev_stage_file
from launcher.scheduler import Slot
from launcher.worker import PredictSettings, WorkCase, WorkerSpec, worker_main

SHUTDOWN_GRACE_S = 5.0
WAIT_S = 0.5
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass
class WorkerHandle:
    slot: Slot
    attempt: int
    process: object
    conn: object
    tmp: str
    conn_open: bool = True
    finished: bool = False
    fatal: str | None = None
    pid: int | None = None
    cases: set[str] = field(default_factory=set)


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (killed; the kernel's OOM killer sends SIGKILL too)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


class Supervisor:
    def __init__(self, config: RunConfig, plan: Plan, journal: Journal, verify: set[str], log=print):
        self.config, self.plan, self.journal, self.verify = config, plan, journal, verify
        self.log = log
        self.workers: dict[int, WorkerHandle] = {}
        self.attempts: dict[int, int] = {}
        self.stop_signals = 0
        import torch.multiprocessing as torch_mp  # spawn context; importing torch does not touch CUDA

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
        try:
            for slot in self.plan.slots:
                self._spawn_if_work_left(slot)
            while self.workers:
                if self.stop_signals:
                    return self._shut_down()
                self._step()
            return self._result()
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

    # --- workers ---------------------------------------------------------------------------
    def _spawn_if_work_left(self, slot: Slot) -> None:
        pending = self.journal.cases_in_state(PENDING, slot.part_id)
        if not pending:
            self.journal.part_worker(slot.part_id, None, "finished")
            return
        attempt = self.attempts[slot.part_id] = self.attempts.get(slot.part_id, 0) + 1
        state = os.path.join(tmp_dir(self.config.output_folder), f"part-{slot.part_id}-attempt-{attempt}")
        clear_tmp(state)
        spec = WorkerSpec(
            part_id=slot.part_id,
            attempt=attempt,
            gpu_uuid=slot.gpu_uuid,
            supervisor_pid=os.getpid(),
            out_dir=os.path.abspath(self.config.output_folder),
            tmp_dir=state,
            log_path=os.path.join(logs_dir(self.config.output_folder), f"part-{slot.part_id}.log"),
            settings=self.settings,
            cases=tuple(
                WorkCase(c, self.plan.cases[c].files, prev_stage_file(self.config, c), c in self.verify)
                for c in pending
            ),
        )
        parent_conn, child_conn = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=worker_main, args=(spec, child_conn), daemon=False, name=f"nnunet-launch part {slot.part_id}"
        )
        process.start()
        child_conn.close()
        self.workers[slot.part_id] = WorkerHandle(
            slot, attempt, process, parent_conn, state, pid=process.pid, cases=set(pending)
        )
        self.journal.part_worker(slot.part_id, process.pid, "running")
        self.journal.event("spawn", slot.part_id, None, f"attempt {attempt}, pid {process.pid}, {len(pending)} case(s)")

    def _drain(self, handle: WorkerHandle) -> None:
        try:
            while handle.conn.poll():
                self._on_message(handle, handle.conn.recv())
        except (EOFError, OSError):
            handle.conn_open = False

    def _on_message(self, handle: WorkerHandle, message: tuple) -> None:
        kind, part = message[0], handle.slot.part_id
        if kind == "started":
            self.journal.case_started(message[1], handle.slot.label)
        elif kind == "stage":
            self.journal.case_stage(message[1], message[2])
        elif kind == "done":
            _, case_id, seconds, verified = message
            self.journal.case_done(case_id, seconds)
            self.verify.discard(case_id)
            how = "kept (existing output verified)" if verified else f"{seconds:.1f} s"
            self.log(f"[part {part} {handle.slot.label}] done {case_id} ({how}) {self._progress()}")
        elif kind == "case_error":
            _, case_id, error = message
            self._case_attempt_failed(part, case_id, error)
        elif kind == "finished":
            handle.finished = True
        elif kind == "fatal":
            handle.fatal = message[1]

    def _case_attempt_failed(self, part: int, case_id: str, error: str) -> None:
        state = self.journal.case_failed_attempt(case_id, error, self.config.case_retries)
        self.journal.event("case_error", part, case_id, error)
        verdict = "failed for good" if state == FAILED else "will retry"
        self.log(f"[part {part}] case {case_id}: {error} ({verdict})")

    def _on_worker_exit(self, handle: WorkerHandle) -> None:
        self._drain(handle)
        handle.process.join()
        part = handle.slot.part_id
        _kill_group(handle.pid, signal.SIGKILL)  # nnU-Net's helpers of a dead worker die with it
        clear_tmp(handle.tmp)
        del self.workers[part]
        if handle.finished and handle.process.exitcode == 0:
            self._spawn_if_work_left(handle.slot)  # cases whose attempt failed but may retry
            return
        reason = handle.fatal or describe_exit(handle.process.exitcode)
        for case_id in self.journal.running_cases(part):
            self._case_attempt_failed(part, case_id, f"worker died while on it: {reason}")
        restarts = self.journal.part_restarted(part)
        self.journal.event("worker_died", part, None, reason)
        if restarts > self.config.max_restarts:
            left = self.journal.cases_in_state(PENDING, part)
            self.journal.fail_cases(
                left, f"part {part} gave up after {self.config.max_restarts} restarts (last: {reason})"
            )
            self.journal.part_worker(part, None, "gave up")
            self.log(f"[part {part}] worker died ({reason}); restarts exhausted, {len(left)} case(s) left unfinished")
            return
        self.log(f"[part {part}] worker died ({reason}); restart {restarts}/{self.config.max_restarts}")
        self._spawn_if_work_left(handle.slot)

    def _kill_all(self, signum: int) -> None:
        for handle in self.workers.values():
            _kill_group(handle.pid, signum)

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
        _kill_group(handle.pid, signal.SIGKILL)
        clear_tmp(handle.tmp)
        self.workers.pop(handle.slot.part_id, None)

    # --- reporting -------------------------------------------------------------------------
    def _progress(self) -> str:
        done = len(self.journal.cases_in_state(DONE))
        return f"[{done}/{len(self.plan.cases)}]"

    def _result(self) -> int:
        return EXIT_FAILED if self.journal.cases_in_state(FAILED) or self.journal.cases_in_state(PENDING) else EXIT_OK


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
