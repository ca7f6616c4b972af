"""How a run ends, defined once: the exit codes (what they mean is what `status`, the report and
`--on-finish` say), the signals that stop a run, and which errors mean "the disk is full"."""

from __future__ import annotations

import errno
import signal

from launcher.errors import LauncherError

EXIT_OK = 0
EXIT_FAILED = 1  # finished, but some cases failed
EXIT_USAGE = 2  # refused before any work started; nothing in OUT changed
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug of ours; never 1
EXIT_NO_SPACE = 75  # EX_TEMPFAIL: the disk is full (or the journal unwritable); rerun once there is space
EXIT_INTERRUPTED = 130  # a stop signal; rerun the same command to resume
WORKER_EXIT_INTERRUPTED = 143  # a worker stopped by a signal (128 + SIGTERM, as a shell reports it)

EXIT_MEANING = {
    EXIT_OK: "every case predicted",
    EXIT_FAILED: "finished, but some cases failed",
    EXIT_INTERNAL_ERROR: "internal error (a bug); the traceback is in logs/supervisor.log",
    EXIT_NO_SPACE: "stopped: the disk is full or the journal cannot be written; rerun to resume",
    EXIT_INTERRUPTED: "interrupted; rerun the same command to resume",
}

# SLURM (scancel, time limit, preemption), systemd and Ctrl-C stop a run; SIGHUP (a closed
# terminal) does not
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """An error a full disk (or quota) causes. The journal's own (SQLite's "database or disk is
    full") arrive as JournalWriteError, a ResumableStop."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


class ResumableStop(Exception):
    """The run cannot go on, and the next one resumes: what it must write cannot be written (the
    journal on a full or failing disk). Exit EXIT_NO_SPACE."""


def exit_code_of(exc: BaseException) -> int:
    """The exit code of a `run` that this exception ended (also what --on-finish is told)."""
    if isinstance(exc, LauncherError):
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ResumableStop) or is_disk_full(exc):
        return EXIT_NO_SPACE
    return EXIT_INTERNAL_ERROR
