"""The terminal is best effort: a run outlives it. When the ssh connection drops or the tmux
window is killed, writes to the terminal fail (EIO on a hung-up tty, EPIPE on a closed pipe);
the run goes on, and nothing it prints may decide how it ends: its report, its journal and its
exit code are written whether anyone reads the screen or not."""

from __future__ import annotations

import errno
import os
import sys

# a hung-up terminal (EIO), a closed pipe (EPIPE), a terminal device that is gone (ENXIO, ENODEV)
GONE_ERRNOS = frozenset({errno.EIO, errno.EPIPE, errno.ENXIO, errno.ENODEV})


class BestEffortStream:
    """A text stream whose writes never fail because its reader went away: on the first such
    failure the file descriptor is pointed at /dev/null, so that what is still buffered (and
    everything after, including the interpreter's last flush at exit) goes nowhere quietly."""

    def __init__(self, stream):
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._on_error(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._on_error(exc)

    def isatty(self) -> bool:
        return not self.gone and self._stream.isatty()

    def __getattr__(self, name):  # fileno, encoding, errors, buffer, ...: the stream's own
        return getattr(self._stream, name)

    def _on_error(self, exc: OSError) -> None:
        if exc.errno not in GONE_ERRNOS:
            raise exc  # a full disk under a redirected stdout is a fault to report, not a lost reader
        self.gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        try:
            self._stream.flush()  # what was buffered goes to /dev/null now
        except OSError:
            pass


def make_output_best_effort() -> None:
    """sys.stdout and sys.stderr of this process become best effort (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, BestEffortStream):
            setattr(sys, name, BestEffortStream(stream))
