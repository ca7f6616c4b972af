"""A worker's long-lived case pipeline, independent of what does the predicting (the backend):
one preprocessing pool and one export pool for the worker's whole life, the next cases
preprocessed while the current one is predicted, exports overlapping the next prediction, a
bounded number of cases in flight. Exports go to the worker's temp folder and are moved into OUT
only when complete.

The backend is nnU-Net (launcher.nnunet) in every user's run; tests may select a fast,
fault-injecting stand-in (launcher.fake_backend) with NNUNET_LAUNCH_TEST_BACKEND.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable

from launcher import host_memory
from launcher.exits import STOP_SIGNALS, is_disk_full
from launcher.outputs import case_outputs, move_into_place, output_complete
from launcher.spec import CaseTimes, Failure, PredictSettings, UnreadableInput, WorkCase, WorkerEnds, describe_signal

POLL_S = 0.05
HELPER_EXIT_S = 5.0  # a helper's time to end on SIGTERM (under tests coverage saves its data) before SIGKILL
STEP_REPORT_EVERY_S = 1.0
HELPER_START = "forkserver"  # see start_helper_server
SOCKET_PATH_MAX = 107  # bytes of an AF_UNIX socket's path on Linux
SHORT_TEMP_FOLDERS = ("/tmp", "/var/tmp", "/dev/shm")


def start_helper_server(modules: list[str]) -> None:
    """Start the process the worker's helpers are forked from, which imports `modules` (the
    backend: torch and nnU-Net) once, while the worker loads its model. Each helper used to be a
    fresh interpreter that imported them itself: 3-6 s of CPU per helper, 4 helpers per worker,
    at every worker start (on our 2-core VM the first case waited 12 s for its helper after the
    model was loaded). Forked helpers also share the server's memory for those modules.

    The server keeps this process's environment as it is now: everything a helper must see (the
    pinned device, the thread counts, host_memory's settings) is set before this is called."""
    context = multiprocessing.get_context(HELPER_START)
    context.set_forkserver_preload(modules)
    from multiprocessing import forkserver

    previous = tempfile.tempdir
    tempfile.tempdir = _folder_for_the_socket()
    try:
        forkserver.ensure_running()  # its socket's folder is made once, and kept for this process
    finally:
        tempfile.tempdir = previous


def _folder_for_the_socket() -> str | None:
    """The server listens on a socket in a pymp-XXXXXXXX folder under TMPDIR; a socket's path has
    at most 107 bytes, and a long TMPDIR (some clusters' per-job folders) failed every worker with
    "OSError: AF_UNIX path too long". Then the first short, writable one of the usual temp folders
    (None: TMPDIR's is short enough)."""

    def fits(folder: str) -> bool:
        return len(os.fsencode(os.path.join(folder, "pymp-xxxxxxxx", "listener-xxxxxxxx"))) <= SOCKET_PATH_MAX

    if fits(tempfile.gettempdir()):
        return None
    return next((f for f in SHORT_TEMP_FOLDERS if fits(f) and os.access(f, os.W_OK | os.X_OK)), None)


def _helper_start(log_path: str, initializer, initargs: tuple) -> None:
    """A helper's first step: what it prints goes to its worker's log (fds: what nnU-Net's own
    processes print too), not where the helper server's output went (a prestarted worker started
    its server before it knew its log); then the backend's set-up."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if initializer is not None:
        initializer(*initargs)


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _timed(preprocess, model: str | None, files: tuple[str, ...], prev_stage_file: str | None):
    """Run in a preprocessing helper: the result, and when it was ready (the case's time from
    then to its prediction is waiting for the device)."""
    result = _released(preprocess, model, files, prev_stage_file)
    return time.time(), result


def _released(job, *args):
    """Run in a helper: the job, then what it freed goes back to the kernel (see host_memory)."""
    try:
        return job(*args)
    finally:
        host_memory.release_freed_memory()


class _Preprocessing:
    """A case's preprocessing jobs: one per model that predicts it (several in a fused ensemble)."""

    def __init__(self, jobs: list[tuple[str | None, object]]):
        self.jobs = jobs
        self.started = time.time()  # handed to the helpers: the case's attempt starts

    def ready(self) -> bool:
        return all(job.ready() for _, job in self.jobs)

    def get(self) -> tuple[float, list[tuple]]:
        """When the last was ready, and (member, data, properties) per model; raises a job's error."""
        results = [(member, job.get()) for member, job in self.jobs]
        prepared = max(ready for _, (ready, _) in results)
        return prepared, [(member, data, properties) for member, (_, (data, properties)) in results]


class CasePipeline:
    def __init__(self, backends: dict, settings: PredictSettings, out_dir: str, tmp_dir: str, log_path: str):
        """`backends`: one per model the worker serves (None: the only one)."""
        self.backends, self.settings, self.out_dir, self.tmp_dir = backends, settings, out_dir, tmp_dir
        self.backend = next(iter(backends.values()))  # file ending, reading outputs, combining
        context = multiprocessing.get_context(HELPER_START)
        initializer = self.backend.preprocess_initializer(backends)
        self.prep_pool = context.Pool(settings.npp, _helper_start, (log_path, *initializer))
        self.export_pool = context.Pool(settings.nps, _helper_start, (log_path, None, ()))
        # Pool silently replaces a dead process and the task it held never returns: watch the originals.
        self.pool_processes = {p: "preprocess" for p in self.prep_pool._pool}
        self.pool_processes.update({p: "export" for p in self.export_pool._pool})
        self.exporting: list[tuple[WorkCase, object, dict]] = []  # (case, export job, its clock so far)

    def terminate(self) -> None:
        """End the helpers (their work is done, or lost with the worker anyway): SIGTERM, then
        SIGKILL for any still there after HELPER_EXIT_S. Not Pool.terminate(), which waits for
        each helper without end (seen: a helper that never exited held a worker whose cases were
        all done), and the worker exits right after, without the pools' threads."""
        helpers = {*self.pool_processes, *self.prep_pool._pool, *self.export_pool._pool}  # replacements too
        for helper in helpers:
            helper.terminate()
        deadline = time.monotonic() + HELPER_EXIT_S
        for helper in helpers:
            helper.join(max(0.0, deadline - time.monotonic()))
            if helper.exitcode is None:
                helper.kill()

    def run(self, feed, emit: Callable[[tuple], None]) -> None:
        """Predict every case the feed gives (see worker.CaseFeed) until it is exhausted."""
        self.emit, self.feed = emit, feed
        preparing: deque = deque()
        while True:
            self._start_preprocessing(preparing)
            if not preparing:
                if feed.exhausted():
                    break
                self._wait(lambda: feed.has_cases() or feed.exhausted())
                continue
            # the first case whose preprocessing is done, not the first started: a large case's
            # preprocessing does not keep the device idle while smaller ones are ready
            self._wait(lambda: any(pending.ready() for _, pending in preparing))
            case, pending = next((c, p) for c, p in preparing if p.ready())
            preparing.remove((case, pending))
            # its helper is free: the next case is preprocessed while this one is predicted, and no
            # more cases are started than there are helpers (a case "in preprocessing" is in one)
            self._start_preprocessing(preparing)
            try:
                ready, prepared = pending.get()
            except UnreadableInput as exc:
                self._case_error(case, str(exc), Failure.PERMANENT, exc)
                continue
            except Exception as exc:
                self._case_error(case, f"preprocessing failed: {describe(exc)}", Failure.RETRY, exc)
                continue
            self._predict_and_export(case, {"started": pending.started, "prepared": ready}, prepared)
        self._wait(lambda: not self.exporting)

    # --- where a unit's files go (see spec.WorkCase) -------------------------------------------
    def _outputs(self, case: WorkCase) -> list[str]:
        return case_outputs(case.name or case.id, self.backend.file_ending, self._saves_probabilities(case))

    def _saves_probabilities(self, case: WorkCase) -> bool:
        return self.settings.save_probabilities if case.save_probabilities is None else case.save_probabilities

    def _scratch(self, case: WorkCase) -> str:
        """Its export folder: one per member, as two members of a case share the file names."""
        path = os.path.join(self.tmp_dir, case.member) if case.member else self.tmp_dir
        os.makedirs(path, exist_ok=True)
        return path

    def _start_preprocessing(self, preparing: deque) -> None:
        for case in self.feed.take_combinations():
            self._start_combining(case)
        while len(preparing) < self.settings.npp and (case := self.feed.take()) is not None:
            if self._kept(case):
                continue
            self.emit(("stage", case.id, "preprocess"))
            members = case.fused or ((case.member, case.prev_stage_file),)
            jobs = [
                (
                    member,
                    self.prep_pool.apply_async(_timed, (self.backends[member].preprocess, member, case.files, prev)),
                )
                for member, prev in members
            ]
            preparing.append((case, _Preprocessing(jobs)))

    def _start_combining(self, case: WorkCase) -> None:
        """A multi-stage case's last step runs in an export helper, on the CPU, while the next
        case is predicted."""
        if self._kept(case):
            return
        self._wait(lambda: len(self.exporting) <= self.settings.nps)  # bounded: memory!
        self.emit(("stage", case.id, "export"))
        output_base = os.path.join(self._scratch(case), case.name or case.id)
        args = (case.combine, output_base, self.backend.file_ending, self._saves_probabilities(case))
        now = time.time()
        clock = {"started": now, "prepared": None, "predicting": None, "exporting": now}
        self.exporting.append((case, self.export_pool.apply_async(_released, (self.backend.combine, *args)), clock))

    def _kept(self, case: WorkCase) -> bool:
        """An output in place but not journaled (a run stopped right after it): kept if it decodes."""
        if case.verify_existing and self._existing_output_decodes(case):
            self.emit(("done", case.id, None, True))
            return True
        return False

    def _case_error(self, case: WorkCase, error: str, kind: Failure, exc: BaseException) -> None:
        """Report one failed attempt; the case's traceback goes to this worker's log."""
        if is_disk_full(exc):
            kind = Failure.DISK_FULL
        print(f"\ncase {case.id}: {error}", flush=True)
        traceback.print_exception(exc)
        self.emit(("case_error", case.id, error, kind))

    def _predict_and_export(self, case: WorkCase, clock: dict, prepared: list[tuple]) -> None:
        """`prepared`: (member, data, properties) for each model that predicts the case (several:
        a fused ensemble of the fast profile, averaged before its export). `clock`: its CaseTimes
        so far."""
        self._wait(lambda: len(self.exporting) <= self.settings.nps)  # bounded: memory!
        self.emit(("stage", case.id, "predict"))
        clock["predicting"] = time.time()
        print(f"\nPredicting {case.id}", flush=True)
        last_report = [0.0]

        def on_step(done: int, total: int) -> None:
            self.feed.poll()  # answer a give-back request even during a long prediction
            self._collect_exports()  # an export done meanwhile is placed now, not after this prediction
            now = time.monotonic()
            if now - last_report[0] >= STEP_REPORT_EVERY_S or done == total:
                last_report[0] = now
                self.emit(("step", case.id, done, total))

        backend = self.backends[prepared[0][0]]
        output_base = os.path.join(self._scratch(case), case.name or case.id)
        save = self._saves_probabilities(case)
        try:
            predictions = []
            for member, data, properties in prepared:
                predictions.append(
                    (self.backends[member], self.backends[member].predict(case.id, data, on_step), properties)
                )
            self.emit(("stage", case.id, "export"))
            clock["exporting"] = time.time()
            if case.fused:
                export = backend.fused_export_job(predictions, case.combine, output_base, save)
            else:
                export = backend.export_job(predictions[0][1], predictions[0][2], output_base, save)
        except Exception as exc:
            kind = backend.prediction_error_kind(exc)
            if kind is Failure.DEVICE:  # the CUDA context is unusable: nothing more can run in this process
                traceback.print_exception(exc)
                raise WorkerEnds(f"CUDA error while predicting {case.id}: {describe(exc)}", Failure.DEVICE) from exc
            self._case_error(case, f"prediction failed: {describe(exc)}", kind, exc)
            if kind is Failure.OOM:
                raise WorkerEnds(
                    "CUDA out of memory: the worker restarts to free its GPU memory", Failure.RESTART
                ) from exc
            return
        used = list(dict.fromkeys(b for b, _, _ in predictions))
        del predictions  # a GPU's memory is free for the next case once its export has what it needs
        self._report_choices(case, used)
        function, args = export
        self.exporting.append((case, self.export_pool.apply_async(_released, (function, *args)), clock))

    def _report_choices(self, case: WorkCase, backends: list) -> None:
        """How the fast profile did this case goes to the worker's log; what it could not do as
        planned (out of device memory) to the supervisor's too."""
        choices = [c for b in backends for c in b.choices]
        if choices:
            print(f"case {case.id}: {'; '.join(choices)}", flush=True)
        for text in (t for b in backends for t in b.fallbacks):
            print(f"case {case.id}: {text}", flush=True)
            self.emit(("note", case.id, text))

    def _wait(self, condition: Callable[[], bool]) -> None:
        """Wait for `condition` while finishing exports and watching the pools. It sends nothing
        by itself: the supervisor's watchdog listens for progress, not for a live loop."""
        while True:
            self.feed.poll()
            self._collect_exports()
            if condition():
                return
            dead = [p for p in self.pool_processes if not p.is_alive()]
            if dead:
                code = dead[0].exitcode
                if code is not None and -code in STOP_SIGNALS:  # SLURM/systemd signal every process
                    raise WorkerEnds(
                        f"a helper process was stopped ({signal.Signals(-code).name})", Failure.INTERRUPTED
                    )
                how = describe_signal(-code) if code is not None and code < 0 else f"exit code {code}"
                stage = self.pool_processes[dead[0]]
                # the supervisor tells an outside SIGKILL from the OOM killer's (the cgroup counts it)
                raise WorkerEnds(f"an nnU-Net {stage} helper died ({how})", Failure.HELPER, stage, code)
            time.sleep(POLL_S)

    def _collect_exports(self) -> None:
        still = []
        for case, job, clock in self.exporting:
            if not job.ready():
                still.append((case, job, clock))
                continue
            try:
                job.get()
                move_into_place(self._scratch(case), case.out_dir or self.out_dir, self._outputs(case))
            except Exception as exc:
                self._case_error(case, f"export failed: {describe(exc)}", Failure.RETRY, exc)
                continue
            print(f"done with {case.id}: moved into place", flush=True)
            self.emit(("done", case.id, CaseTimes(**clock, ended=time.time()), False))
        self.exporting = still

    def _existing_output_decodes(self, case: WorkCase) -> bool:
        """Every output of the case is whole (outputs.output_complete) and its reader reads it."""
        for name in self._outputs(case):
            path = os.path.join(case.out_dir or self.out_dir, name)
            try:
                if not output_complete(path):
                    return False
                self.backend.read_output(path)
            except Exception as exc:  # a planted .pkl too: safe_pickle refuses what could run code
                print(f"case {case.id}: {name} is not kept ({describe(exc)}): predicted again", flush=True)
                return False
        return True
