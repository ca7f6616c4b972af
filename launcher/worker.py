"""The worker process: pin the GPU, leave the terminal's process group, run the pipeline over
its cases and report each step to the supervisor through its own pipe. It decides no policy.

This module must not import torch at the top: CUDA_VISIBLE_DEVICES has to be set first.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import shutil
import signal
import sys
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING

from launcher import host_memory
from launcher.exits import WORKER_EXIT_INTERRUPTED
from launcher.spec import Failure, WorkCase, WorkerEnds, WorkerSpec

if TYPE_CHECKING:
    from launcher.model_check import Models

PR_SET_PDEATHSIG = 1
# Tests only: device keys (GPU UUIDs, or cpu-slot-K) whose workers crash at start, like a sick GPU.
FAULTY_DEVICES_ENV = "NNUNET_LAUNCH_TEST_FAULTY_DEVICES"
REAPER_POLL_S = 0.2


class CaseFeed:
    """The worker's local queue of cases. The supervisor tops it up ahead of need, so the
    worker never waits on it to learn its next case."""

    def __init__(self, conn, cases: tuple[WorkCase, ...]):
        self.conn, self.cases, self.closed = conn, deque(cases), False

    def poll(self) -> None:
        while not self.closed and self.conn.poll():
            message = self.conn.recv()
            if message[0] == "cases":
                self.cases.extend(message[1])
            elif message[0] == "no_more":
                self.closed = True
            elif message[0] == "give_back":  # another worker is idle: return what is not started
                wanted = set(message[1])
                returned = [c.id for c in self.cases if c.id in wanted]
                self.cases = deque(c for c in self.cases if c.id not in wanted)
                self.conn.send(("given_back", returned))

    def take(self) -> WorkCase | None:
        """The next case to preprocess (combinations are take_combinations()'s)."""
        self.poll()
        for i, case in enumerate(self.cases):
            if not case.only_combines:
                del self.cases[i]
                return case
        return None

    def take_combinations(self) -> list[WorkCase]:
        """The multi-stage combinations it holds: they need no preprocessing helper, so they
        start at once instead of waiting behind the next case's preprocessing."""
        self.poll()
        found = [c for c in self.cases if c.only_combines]
        if found:
            self.cases = deque(c for c in self.cases if not c.only_combines)
        return found

    def has_cases(self) -> bool:
        return bool(self.cases)

    def exhausted(self) -> bool:
        self.poll()
        return self.closed and not self.cases


def worker_main(spec: WorkerSpec, conn) -> None:
    """A worker started for its cases (a slot's later workers: processes.start_worker)."""
    _start(spec.supervisor_pid, spec.log_path, spec.gpu_uuid, spec.settings.threads)
    _work(spec, conn, "")


def prestarted_main(supervisor_pid: int, gpu_uuid: str | None, threads: int, models: Models | None, conn) -> None:
    """A slot's first worker, started before the run is decided (processes.Prestarted): it pins
    its device, starts its helper server and imports torch and nnU-Net (seconds each), and with
    `models` (the first slot's) checks that they load and sends ("checked", error line or None);
    then it waits for its cases. It writes nothing of the run before they come, and ends when its
    pipe closes without them."""
    _start(supervisor_pid, os.devnull, gpu_uuid, threads)  # what it prints goes to the log later
    from launcher.pipeline import start_helper_server

    try:
        start_helper_server([_backend_module()])
        importlib.import_module(_backend_module())
    except Exception:
        pass  # the worker's own start does both again once it has its log, and says why there
    if models is not None:  # on the CPU, as model_check's own process does: CUDA is not touched
        from launcher.model_check import load_error

        with contextlib.suppress(OSError):  # the supervisor went away: the recv below ends this process
            conn.send(("checked", load_error(models)))
    ready_at = time.time()
    try:
        _, spec, sent_at = conn.recv()
    except (EOFError, OSError):  # the run did not start (a refusal, a stop) or had no work for it
        _remove_helper_server_socket()
        os._exit(0)  # pragma: no cover - see tests/GPU_ONLY.md: coverage saves inside it
    _redirect_output(spec.log_path)
    lead = sent_at - ready_at
    _work(spec, conn, f"ready {lead:.1f} s before its cases" if lead >= 0 else f"its cases waited {-lead:.1f} s")


def _start(supervisor_pid: int, log_path: str, gpu_uuid: str | None, threads: int) -> None:
    """A worker's first steps, before torch: everything its helpers inherit is set here."""
    os.setsid()  # own process group: the supervisor can kill the worker with all its helpers
    die_with_parent(supervisor_pid)
    _exit_on_stop_signals()
    _redirect_output(log_path)
    _start_group_reaper()
    _pin_device(gpu_uuid, threads)
    host_memory.reuse_freed_memory()  # before the helpers start: they inherit its environment
    # the helpers print into this worker's log and end by SIGTERM: unbuffered, nothing is lost
    os.environ["PYTHONUNBUFFERED"] = "1"


def _work(spec: WorkerSpec, conn, prestarted: str) -> None:
    """Run the spec's cases; `prestarted`: how a prestarted worker's start met its cases."""
    _name_process(f"nnunet-launch part {spec.part_id} {spec.device_label}".rstrip())
    started = f" prestarted ({prestarted})" if prestarted else ""
    print(
        f"nnunet-launch worker part {spec.part_id} attempt {spec.attempt} pid {os.getpid()}{started} "
        f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} threads={spec.settings.threads} "
        f"npp={spec.settings.npp} nps={spec.settings.nps} cases={len(spec.cases)}",
        flush=True,
    )
    conn.send(("hello", os.getpid()))
    if spec.device_key in os.environ.get(FAULTY_DEVICES_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGSEGV)  # pragma: no cover - dies before coverage can save (tests/GPU_ONLY.md)
    try:
        from launcher.pipeline import CasePipeline, start_helper_server

        os.makedirs(spec.tmp_dir, exist_ok=True)
        start_helper_server([_backend_module()])  # a prestarted worker's is running already
        pipeline = CasePipeline(_backends(spec), spec.settings, spec.out_dir, spec.tmp_dir, spec.log_path)
        conn.send(("ready",))
        pipeline.run(CaseFeed(conn, spec.cases), conn.send)
        conn.send(("finished",))  # every output is in place; nothing is left to lose
    except BaseException as exc:
        _end(exc, conn)
    # Ending fast (the run's exit waits for it): the helpers have no work left, and torch's
    # interpreter teardown takes seconds that buy nothing.
    pipeline.terminate()
    _remove_helper_server_socket()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # pragma: no cover - see tests/GPU_ONLY.md: coverage saves inside it


def _end(exc: BaseException, conn) -> None:
    """The worker ends on an error: say why (unless a stop signal ended it) and exit."""
    ends = exc if isinstance(exc, WorkerEnds) else WorkerEnds(f"{type(exc).__name__}: {exc}", Failure.CRASH)
    if ends.kind is Failure.INTERRUPTED:
        os._exit(WORKER_EXIT_INTERRUPTED)  # pragma: no cover - see tests/GPU_ONLY.md: coverage saves inside it
    traceback.print_exception(exc)
    sys.stdout.flush()
    try:
        conn.send(("fatal", str(ends), ends.kind.value, ends.stage, ends.code))
    finally:
        _remove_helper_server_socket()
        os._exit(1)  # pragma: no cover - see tests/GPU_ONLY.md: coverage saves inside it


def _backend_module() -> str:
    from launcher.fake_backend import BACKEND_ENV

    return "launcher.fake_backend" if os.environ.get(BACKEND_ENV) == "fake" else "launcher.nnunet"


def _backends(spec: WorkerSpec) -> dict:
    """nnU-Net, or in tests (and only when a test asks for it) the fault-injecting stand-in: one
    backend per model the worker serves (every member of a multi-stage run, loaded once). A load
    that fails on the CPU too is the model's fault, not this device's (Failure.MODEL)."""
    try:
        return importlib.import_module(_backend_module()).load_backends(spec.settings)
    except Exception as exc:
        from launcher.model_check import Models, load_error

        error = load_error(Models.of_settings(spec.settings))
        if error is None:
            raise
        raise WorkerEnds(error, Failure.MODEL) from exc


def _remove_helper_server_socket() -> None:
    """multiprocessing keeps the helper server's socket in a pymp-* folder of the system's temp
    folder and removes it when the interpreter exits, which os._exit skips: every worker left
    one behind. (A SIGKILLed worker still does.)"""
    from multiprocessing import util

    shutil.rmtree(util.get_temp_dir(), ignore_errors=True)


def _exit_on_stop_signals() -> None:
    """SLURM (scancel, time limit, preemption) and systemd signal every process of the job at
    once. A worker that gets SIGTERM ends with a code that tells the supervisor it was
    interrupted, not crashed, so nothing is charged."""

    def stop(signum, frame):
        _remove_helper_server_socket()
        os._exit(WORKER_EXIT_INTERRUPTED)  # pragma: no cover - see tests/GPU_ONLY.md: coverage saves inside it

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (a SIGKILLed launcher leaves no orphan); call it
    first thing, before importing torch: a parent that died before this took effect is seen here."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # pragma: no cover - the parent died before prctl took effect
        os._exit(1)


def _start_group_reaper() -> None:
    """Fork a tiny process that kills the whole group once the worker is gone.

    PDEATHSIG ends the worker when the supervisor dies, but nnU-Net's pool processes would
    outlive it (reparented, still holding memory). The reaper, a child of the worker in the
    same group, sees its parent change and SIGKILLs the group, itself included."""
    worker_pid = os.getpid()
    if os.fork() == 0:
        _reap_group_once_orphaned(worker_pid)


def _reap_group_once_orphaned(worker_pid: int) -> None:  # pragma: no cover - it SIGKILLs itself (GPU_ONLY.md)
    try:
        # a stop signal to every process must not end the reaper before the group is gone
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while os.getppid() == worker_pid:
            time.sleep(REAPER_POLL_S)
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(0)


def _name_process(title: str) -> None:
    """What `ps`, `top` and nvidia-smi show for this worker instead of `python -c from
    multiprocessing.spawn ...` (setproctitle; without it, the title stays)."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


class _Timestamped:
    """This process's prints in the part's log, each line stamped with the time (the helpers'
    lines, written to the same file by processes of their own, are not)."""

    def __init__(self, stream):
        self._stream, self._at_line_start = stream, True

    def write(self, text: str) -> int:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
        pieces = []
        for line in text.splitlines(keepends=True):
            pieces.append((stamp if self._at_line_start else "") + line)
            self._at_line_start = line.endswith("\n")
        self._stream.write("".join(pieces))
        return len(text)

    def __getattr__(self, name):  # flush, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)


def _redirect_output(log_path: str) -> None:
    """nnU-Net prints a lot; it goes to this part's log (fds, so helper processes follow)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = _Timestamped(os.fdopen(1, "w", buffering=1, closefd=False))
    sys.stderr = _Timestamped(os.fdopen(2, "w", buffering=1, closefd=False))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _pin_device(gpu_uuid: str | None, threads: int) -> None:
    count = str(threads)
    # nnUNet_def_n_proc stays the user's: the exact export runs with nnU-Net's default_num_processes
    # torch threads, as plain nnU-Net's does, for the same bits (its thread count changes them)
    os.environ.update(OMP_NUM_THREADS=count, MKL_NUM_THREADS=count)
    # The network's idle OpenMP threads sleep instead of spinning (a user's own setting is kept):
    # a CPU worker shares its cores with its helpers, and spinning threads took their cores. The
    # fast profile's 25 fine CTs on 2 cores: 42.5 s and 80 CPU-s spinning, 32.8 s and 60 CPU-s
    # so. The arithmetic, and so the voxels, do not change (benchmarks/RESULTS.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if gpu_uuid is not None:  # pragma: no cover - only NVML's GPUs have UUIDs (tests/GPU_ONLY.md)
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_uuid
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker must not touch any GPU
