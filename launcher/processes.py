"""Worker processes as the supervisor holds them: start one, signal its process group, and say
why it ended. No decisions: who is to blame is policy.py's, what runs where scheduler.py's."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

from launcher.errors import LauncherError
from launcher.model_check import ModelCheck, Models
from launcher.scheduler import Slot
from launcher.spec import WorkerSpec, describe_signal
from launcher.worker import prestarted_main, worker_main

CGROUP_MEMORY_EVENTS = "/sys/fs/cgroup/memory.events"
PRESTARTED_EXIT_S = 5.0


@dataclass
class WorkerHandle:
    serial: int  # unique per spawned worker: the case book knows flights by it
    slot: Slot
    key: int | None  # the case book's queue it draws from (static: a part; dynamic: None)
    part: int  # the part whose cases it runs (static: may be another slot's, which gave up)
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

    def send(self, message: tuple) -> bool:
        """False when the worker just died (its exit gives its cases back)."""
        try:
            self.conn.send(message)
            return True
        except OSError:
            return False

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process since the worker started (cgroup v2)."""
        now = oom_kill_count()
        return self.oom_kills_at_start is not None and now is not None and now > self.oom_kills_at_start

    def death_reason(self) -> str:
        oom = self.oom_killed()
        if self.fatal:
            return self.fatal[0] + ("; the kernel's OOM killer killed a process meanwhile" if oom else "")
        return describe_exit(self.process.exitcode, oom)

    def slot_name(self) -> str:
        """A slot that took over a part that gave up (static schedule) runs another part's cases."""
        own = self.slot.part_id
        return f"part {own}" + (f", on part {self.part}'s cases" if self.part != own else "")


def spawn_context():
    """torch.multiprocessing's spawn context, which every worker is started with. It is the
    standard library's own object: torch.multiprocessing re-exports multiprocessing and registers
    reductions that share tensors sent through it, which the workers' pipes never carry (specs and
    events; tests/test_prestart.py checks the identity). Taken from the standard library, the
    supervisor starts its first workers without importing torch first: 1.6-2.5 s of CPU that each
    of them waited for, while the supervisor used one core of two on our VM."""
    # A killed worker cannot unlink its pools' named semaphores. With the spawn start method
    # every process of the run registers them with one resource tracker, the supervisor's,
    # which unlinks what is left when the run ends (so nothing leaks in /dev/shm) and warns
    # about it. A worker's own tracker would die with the worker's process group and leak
    # them. So the supervisor's tracker is the right owner, and its warning is expected.
    if "ignore:resource_tracker:UserWarning" not in sys.warnoptions:
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    return multiprocessing.get_context("spawn")


class Prestarted:
    """Each slot's first worker, started once the run is planned: it pins its device, starts its
    helper server and imports torch and nnU-Net (seconds each), then waits for its spec
    (worker.prestarted_main). The first one also checks the run's model, where nnU-Net is imported
    already: a separate process loading it too took 5-8 s of CPU at every start on our 2-core VM.
    Nothing of the run is written before; a process not taken when the workers start is ended."""

    def __init__(self):
        self.waiting: dict[int, tuple] = {}  # slot part id -> (process, the supervisor's end of its pipe)

    def start(self, context, slots: list[Slot], threads: int, models: Models) -> None:
        for index, slot in enumerate(slots):
            args = (os.getpid(), slot.gpu_uuid, threads, models if index == 0 else None)
            self.waiting[slot.part_id] = _spawn(context, prestarted_main, args, slot.part_id)

    def check_model(self, models: Models) -> None:
        """Raise LauncherError when the run's models cannot load: the first worker's answer; when it
        ended before it answered (or none was started), a check in a child process (ModelCheck)."""
        message = self._first_message()
        if message is None or message[0] != "checked":
            with ModelCheck(models) as check:
                check.wait()
        elif message[1]:
            raise LauncherError(message[1])

    def _first_message(self) -> tuple | None:
        """The first waiting worker's first message; None when there is none or it died first (its
        slot gets a new worker: take)."""
        if not self.waiting:
            return None
        process, conn = next(iter(self.waiting.values()))
        try:
            return conn.recv() if conn in wait([conn, process.sentinel]) else None
        except (EOFError, OSError):
            return None

    def take(self, slot: Slot) -> tuple | None:
        """The slot's waiting process and its pipe; None when there is none or it died."""
        taken = self.waiting.pop(slot.part_id, None)
        if taken is not None and not taken[0].is_alive():
            _end_prestarted([taken])
            return None
        return taken

    def close(self) -> None:
        """End every process not taken (and its helper server)."""
        _end_prestarted(list(self.waiting.values()))
        self.waiting.clear()


def _end_prestarted(prestarted: list[tuple]) -> None:
    """SIGTERM to each one's group: a worker's stop handler removes its helper server's socket
    folder and exits; SIGKILL for any still there after PRESTARTED_EXIT_S (one wait for all)."""
    for process, conn in prestarted:
        conn.close()
        kill_group(process.pid, signal.SIGTERM, reaped=process.exitcode is not None)  # is_alive() reaps
    deadline = time.monotonic() + PRESTARTED_EXIT_S
    for process, _ in prestarted:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            kill_group(process.pid, signal.SIGKILL)
            process.join()


def _spawn(context, target, args: tuple, part_id: int) -> tuple:
    """A worker process running target(*args, its end of a new pipe), and the supervisor's end."""
    parent_conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(
        target=target, args=(*args, child_conn), daemon=False, name=f"nnunet-launch part {part_id}"
    )
    process.start()
    child_conn.close()
    return process, parent_conn


def start_worker(
    context, serial: int, slot: Slot, key: int | None, spec: WorkerSpec, now: float, prestarted: tuple | None = None
) -> WorkerHandle:
    """A worker for `spec`: the slot's prestarted process (Prestarted.take) when it is given,
    else a new one."""
    if prestarted is not None:
        process, parent_conn = prestarted
        try:
            parent_conn.send(("spec", spec, time.time()))
        except OSError:  # it died a moment ago: its exit is seen as a worker's that died at start
            pass
    else:
        process, parent_conn = _spawn(context, worker_main, (spec,), spec.part_id)
    return WorkerHandle(serial, slot, key, spec.part_id, process, parent_conn, spec.tmp_dir, oom_kill_count(), now)


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


def kill_group(pgid: int | None, signum: int, reaped: bool = False) -> None:
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
