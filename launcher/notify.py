"""`--on-finish CMD`: a command the user gives (mail, a chat webhook) run once when a run ends,
with what happened in its environment. Its failure is logged and never changes the run's exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from launcher.outputs import logs_dir
from launcher.report import EXIT_MEANING

ON_FINISH_TIMEOUT_S = 120.0


def notify_finished(command: str, out: str, state: str, exit_code: int) -> None:
    """Run `command` with /bin/sh; paths reach it as environment variables, never spliced into
    the command line (a path with quotes or `$` stays one value)."""
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
        process = subprocess.Popen(
            command, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        output, _ = process.communicate(timeout=ON_FINISH_TIMEOUT_S)
        problem = f"exit code {process.returncode}" if process.returncode else None
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the command and what it started
        output, _ = process.communicate()
        problem = f"still running after {ON_FINISH_TIMEOUT_S:.0f} s: killed"
    except OSError as exc:
        output, problem = "", str(exc)
    if problem:
        last = (output or "").strip().splitlines()[-1:] or [""]
        _log(state, f"nnunet-launch: --on-finish command failed ({problem}){': ' + last[0] if last[0] else ''}")


def _log(state: str, line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    try:
        with open(os.path.join(logs_dir(state), "supervisor.log"), "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    except OSError:
        pass
