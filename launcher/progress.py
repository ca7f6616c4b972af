"""What the operator sees while a run goes on. Reads the journal; changes no run state.

Every line also goes to OUT/.nnunet-launch/logs/supervisor.log. On a terminal: a rich live
view, one row per worker slot and an overall bar. Elsewhere (nohup, cron, SLURM logs): plain
timestamped lines, one per finished or failed case, and a summary line every minute.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from launcher.journal import Journal, JournalWriteError
from launcher.numbers import hms, progress_line, stage_text
from launcher.status import SnapshotPublisher

PLAIN_SUMMARY_EVERY_S = 60.0
GPU_SAMPLE_EVERY_S = 5.0
LIVE_REFRESH_S = 0.5


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# The live table's columns, most important first; on a narrow terminal the last ones go first.
COLUMNS = (
    "part", "state", "done", "case", "stage", "GPU", "ETA", "failed", "queued", "restarts", "cases/min", "GPU util",
    "GPU mem",
)  # fmt: skip
RIGHT_ALIGNED = ("done", "failed", "queued", "restarts", "cases/min", "ETA")


def render(
    snapshot: dict,
    gpu_names: dict[str, str],
    utilisation: dict[str, tuple[int, int, int]],
    elapsed_s: float,
    width: int = 160,
) -> Group:
    """The live view: a row per worker slot and an overall bar (pure: for tests too). Columns
    that do not fit `width` are left out, least important first; CPU runs have no GPU columns.
    Every cell is plain text (a case id like `[x]` is not rich markup)."""
    on_gpus = any(part["gpu_uuid"] for part in snapshot["parts"])
    rows = []
    for part in snapshot["parts"]:
        uuid = part["gpu_uuid"]
        util = utilisation.get(uuid) if uuid else None
        rows.append(
            {
                "part": str(part["part_id"]),
                "GPU": gpu_names.get(uuid, part["gpu"]) if uuid else part["gpu"],
                "state": part["state"],
                "done": f"{part['done']}/{part['total']}",
                "failed": str(part.get("failed", 0)),
                "queued": str(part.get("queued", 0)),
                "case": part["current_case"] or "-",
                "stage": stage_text(part.get("current_stage"), part.get("current_progress_pct")),
                "ETA": hms(part["eta_s"]) if part.get("eta_s") is not None else "-",
                "cases/min": f"{part['rate_per_min']:.1f}" if part["rate_per_min"] else "-",
                "restarts": str(part["restarts"]),
                "GPU util": f"{util[0]}%" if util else "-",
                "GPU mem": f"{util[1] / 2**30:.1f}/{util[2] / 2**30:.0f} GiB" if util else "-",
            }
        )
    left = snapshot.get("unassigned") or {}
    if left.get("total"):  # cases no worker took yet: the rows add up to the total
        rows.append(
            dict.fromkeys(COLUMNS, "-")
            | {"state": "not taken", "done": f"0/{left['total']}", "failed": str(left["failed"])}
        )
    columns = [c for c in COLUMNS if on_gpus or c not in ("GPU", "GPU util", "GPU mem")]
    while len(columns) > 4 and _table_width(columns, rows) > width:
        columns.pop()
    table = Table(expand=False, pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in RIGHT_ALIGNED else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(row[c]) for c in columns))
    cases = snapshot["cases"]
    line = Text(progress_line(snapshot, elapsed_s))
    finished = cases["done"] + cases["failed"]
    bar = ProgressBar(total=max(cases["total"], 1), completed=finished, width=min(60, max(10, width - 2)))
    return Group(table, line, bar)  # the bar last: it ends without a line break


def _table_width(columns: list[str], rows: list[dict]) -> int:
    """Characters a table with these columns needs: cells plus rich's borders and padding."""
    widths = [max([len(c), *(len(r[c]) for r in rows)]) for c in columns]
    return sum(widths) + 3 * len(columns) + 1


class GpuMonitor:
    """Utilisation and memory per GPU UUID from NVML, or nothing where NVML is absent."""

    def __init__(self, uuids: list[str]):
        self.handles = {}
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = {u: pynvml.nvmlDeviceGetHandleByUUID(u) for u in uuids if u.startswith("GPU-")}
        except Exception:
            self.handles = {}

    def sample(self) -> dict[str, tuple[int, int, int]]:
        found = {}
        for uuid, handle in self.handles.items():
            try:
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                found[uuid] = (self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu, memory.used, memory.total)
            except Exception:
                pass
        return found


class Reporter:
    def __init__(self, log_path: str, journal: Journal, gpu_names: dict[str, str], live: bool):
        self.file = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run
        self.journal, self.gpu_names = journal, gpu_names
        self.started = time.monotonic()
        first = journal.snapshot()
        self.total = first["total"]
        self.tenth = (first["done"] + first["failed"]) * 10 // max(1, self.total)  # last tenth reported
        # status.json beside the journal, for `status` on hosts that must not open the journal
        self.publisher = SnapshotPublisher(os.path.dirname(journal.path)) if journal.path else None
        if self.publisher is not None:
            self.publisher.publish(journal, first)
        self.last_summary = self.last_refresh = time.monotonic()
        self.live = None
        # GPU utilisation and memory: sampled into the journal (the run's picture) and shown live
        self.monitor = GpuMonitor(list(gpu_names)) if gpu_names else None
        self.samples: dict[str, tuple[int, int, int]] = {}
        self.last_sample = float("-inf")
        if live:
            self.live = Live(self._render(), console=Console(), refresh_per_second=2, transient=False)
            self.live.start()

    def log(self, text: str) -> None:
        """A line for the operator and supervisor.log. Best-effort: a full disk must not crash
        the supervisor over a log line."""
        line = f"{_stamp()} {text}"
        self.append_to_file([line])
        try:
            if self.live is not None:
                self.live.console.print(text, markup=False, highlight=False)
            else:
                print(line, flush=True)
        except OSError:
            pass

    def append_to_file(self, lines: list[str]) -> None:
        try:
            if self.file.closed:
                self.file = open(self.file.name, "a", buffering=1)  # noqa: SIM115 - the end summary
            self.file.write("".join(line + "\n" for line in lines))
            self.file.flush()
        except OSError:
            pass

    def refresh(self, finished: int | None = None) -> None:
        """`finished`: cases done or failed so far (the supervisor's count); off a terminal a
        progress line comes every minute and at each tenth of the cases."""
        now = time.monotonic()
        if self.publisher is not None:
            self.publisher.maybe_publish(self.journal)
        if self.monitor is not None and now - self.last_sample >= GPU_SAMPLE_EVERY_S:
            self.last_sample, self.samples = now, self.monitor.sample()
            try:
                self.journal.add_gpu_samples(time.time(), self.samples)
            except JournalWriteError:
                pass  # the supervisor's next write says so and stops the run
        tenth = None if finished is None or not self.total else finished * 10 // self.total
        if self.live is not None and now - self.last_refresh >= LIVE_REFRESH_S:
            self.last_refresh = now
            self.live.update(self._render())
        elif self.live is None and (now - self.last_summary >= PLAIN_SUMMARY_EVERY_S or (tenth or 0) > self.tenth):
            self.last_summary, self.tenth = now, max(self.tenth, tenth or 0)
            self.log(f"progress: {progress_line(self.journal.snapshot(), now - self.started)}")

    def _render(self) -> Group:
        return render(
            self.journal.snapshot(),
            self.gpu_names,
            self.samples,
            time.monotonic() - self.started,
            (self.live.console if self.live is not None else Console()).width,
        )

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()
        if self.publisher is not None:
            self.publisher.publish(self.journal, final=True)
        try:
            self.file.close()
        except OSError:
            pass


def wants_live_view() -> bool:
    return sys.stdout.isatty()
