"""`--on-finish CMD`: a command the user gives (mail, a chat webhook) run once when a run ends,
with what happened in its environment. Its failure is logged and never changes the run's exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from launcher.exits import EXIT_MEANING
from launcher.outputs import logs_dir

ON_FINISH_TIMEOUT_S = 120.0


def notify_finished(command: str, out: str, state: str, exit_code: int) -> None:
    """Run `command` with /bin/sh; paths reach it as environment variables, never spliced into
    the command line (a path with quotes or `$` stays one value). Nothing it does, prints or
    leaves running reaches the run's exit code: its output goes to a file (a background job that
    keeps it open cannot hold the launcher), only the shell itself is waited for."""
    env = {
        **os.environ,
        "NNUNET_LAUNCH_EXIT_CODE": str(exit_code),
        "NNUNET_LAUNCH_RESULT": EXIT_MEANING.get(exit_code, "error"),
        "NNUNET_LAUNCH_OUTPUT": os.path.abspath(out),
        "NNUNET_LAUNCH_SUMMARY": os.path.join(os.path.abspath(state), "summary.json"),
        "NNUNET_LAUNCH_REPORT": os.path.join(os.path.abspath(state), "report.html"),
        "NNUNET_LAUNCH_HOST": os.uname().nodename,
    }
    try:
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                command, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                code = process.wait(timeout=ON_FINISH_TIMEOUT_S)
                problem = f"exit code {code}" if code else None
            except subprocess.TimeoutExpired:
                _kill_session(process.pid)
                process.wait()
                problem = f"still running after {ON_FINISH_TIMEOUT_S:.0f} s: killed"
            output.seek(0)
            said = output.read()[-2000:].decode(errors="replace").strip().splitlines()
    except Exception as exc:  # noqa: BLE001 - a notification never ends the run badly
        problem, said = f"{type(exc).__name__}: {exc}", []
    if problem:
        _log(state, f"nnunet-launch: --on-finish command failed ({problem})" + (f": {said[-1]}" if said else ""))


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # its own session: the command and what it started
    except ProcessLookupError:
        pass


def _log(state: str, line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    try:
        with open(os.path.join(logs_dir(state), "supervisor.log"), "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    except OSError:
        pass
