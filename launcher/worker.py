"""The worker process: pin the GPU, leave the terminal's process group, run the pipeline over
its cases and report each step to the supervisor through its own pipe. It decides no policy.

This module must not import torch at the top: CUDA_VISIBLE_DEVICES has to be set first.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
# Tests only: device keys (GPU UUIDs, or cpu-slot-K) whose workers crash at start, like a sick GPU.
FAULTY_DEVICES_ENV = "NNUNET_LAUNCH_TEST_FAULTY_DEVICES"
REAPER_POLL_S = 0.2


@dataclass(frozen=True)
class WorkCase:
    id: str
    files: tuple[str, ...]
    prev_stage_file: str | None = None
    verify_existing: bool = False  # an output is in OUT but not journaled: keep it if it decodes


@dataclass(frozen=True)
class PredictSettings:
    model_folder: str
    folds: tuple[str, ...]
    checkpoint: str
    step_size: float
    disable_tta: bool
    verbose: bool
    save_probabilities: bool
    device: str  # "cuda" or "cpu"
    threads: int
    npp: int
    nps: int


@dataclass(frozen=True)
class WorkerSpec:
    part_id: int
    attempt: int
    device_key: str
    gpu_uuid: str | None
    supervisor_pid: int
    out_dir: str
    tmp_dir: str
    log_path: str
    settings: PredictSettings
    cases: tuple[WorkCase, ...]
    more_to_come: bool  # dynamic schedule: the supervisor keeps sending cases until "no_more"


class CaseFeed:
    """The worker's local queue of cases. The supervisor tops it up ahead of need, so the
    worker never waits on it to learn its next case."""

    def __init__(self, conn, cases: tuple[WorkCase, ...], more_to_come: bool):
        self.conn, self.cases, self.closed = conn, deque(cases), not more_to_come

    def poll(self) -> None:
        while not self.closed and self.conn.poll():
            message = self.conn.recv()
            if message[0] == "cases":
                self.cases.extend(message[1])
            elif message[0] == "no_more":
                self.closed = True

    def take(self) -> WorkCase | None:
        self.poll()
        return self.cases.popleft() if self.cases else None

    def has_cases(self) -> bool:
        return bool(self.cases)

    def exhausted(self) -> bool:
        self.poll()
        return self.closed and not self.cases


def worker_main(spec: WorkerSpec, conn) -> None:
    os.setsid()  # own process group: the supervisor can kill the worker with all its helpers
    _die_with_supervisor(spec.supervisor_pid)
    _redirect_output(spec.log_path)
    _start_group_reaper()
    _pin_device(spec)
    conn.send(("hello", os.getpid()))
    if spec.device_key in os.environ.get(FAULTY_DEVICES_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        from launcher.nnunet import CasePipeline

        os.makedirs(spec.tmp_dir, exist_ok=True)
        pipeline = CasePipeline(spec.settings, spec.out_dir, spec.tmp_dir)
        conn.send(("ready",))
        pipeline.run(CaseFeed(conn, spec.cases, spec.more_to_come), conn.send)
        pipeline.close()
        conn.send(("finished",))
    except BaseException as exc:
        traceback.print_exc()
        sys.stdout.flush()
        try:
            conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        finally:
            os._exit(1)


def _die_with_supervisor(supervisor_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # the supervisor died before prctl took effect
        os._exit(1)


def _start_group_reaper() -> None:
    """Fork a tiny process that kills the whole group once the worker is gone.

    PDEATHSIG ends the worker when the supervisor dies, but nnU-Net's pool processes would
    outlive it (reparented, still holding memory). The reaper, a child of the worker in the
    same group, sees its parent change and SIGKILLs the group, itself included."""
    worker_pid = os.getpid()
    if os.fork() != 0:
        return
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while os.getppid() == worker_pid:
            time.sleep(REAPER_POLL_S)
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(0)


def _redirect_output(log_path: str) -> None:
    """nnU-Net prints a lot; it goes to this part's log (fds, so helper processes follow)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _pin_device(spec: WorkerSpec) -> None:
    threads = str(spec.settings.threads)
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, nnUNet_def_n_proc=threads)
    if spec.gpu_uuid is not None:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.gpu_uuid
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker must not touch any GPU
    print(
        f"nnunet-launch worker part {spec.part_id} attempt {spec.attempt} pid {os.getpid()} "
        f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} threads={threads} "
        f"npp={spec.settings.npp} nps={spec.settings.nps} cases={len(spec.cases)}",
        flush=True,
    )
