"""End-of-run report: OUT/.nnunet-launch/summary.json and the lines printed for the user.
Reads the journal; changes no run state."""

from __future__ import annotations

import csv
import io
import os
import time

from launcher.journal import Journal
from launcher.outputs import logs_dir, tmp_dir, write_json_atomically, write_text_atomically

EXIT_MEANING = {
    0: "every case predicted",
    1: "finished, but some cases failed",
    130: "interrupted; rerun the same command to resume",
}


def write_summary(state: str, journal: Journal, exit_code: int, started: float) -> dict:
    snapshot = journal.snapshot()
    return write_report_files(state, snapshot, journal.case_rows(), exit_code, round(time.time() - started, 2))


def write_report_files(
    state: str, snapshot: dict, case_rows: list[dict], exit_code: int, wall_seconds: float | None
) -> dict:
    """summary.json (totals, parts, failures) and cases.csv (one line per case: part, GPU,
    attempts, seconds, state, error) in a run's state folder."""
    summary = {
        "exit_code": exit_code,
        "result": EXIT_MEANING.get(exit_code, "error"),
        "wall_seconds": wall_seconds,
        **{k: snapshot[k] for k in ("total", "done", "failed", "pending", "parts", "failed_cases")},
    }
    write_json_atomically(os.path.join(state, "summary.json"), summary, tmp_dir(state))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(case_rows[0]) if case_rows else ["id"])
    writer.writeheader()
    writer.writerows(case_rows)
    write_text_atomically(os.path.join(state, "cases.csv"), text.getvalue(), tmp_dir(state))
    return summary


def summary_lines(summary: dict, out: str, state: str, command_hint: str | None) -> list[str]:
    lines = [
        f"nnunet-launch: {summary['done']}/{summary['total']} case(s) predicted, "
        f"{summary['failed']} failed, {summary['pending']} not done, in {summary['wall_seconds']:.1f} s "
        f"({summary['result']})"
    ]
    for part in summary["parts"]:
        lines.append(
            f"  part {part['part_id']} on {part['gpu']}: {part['done']}/{part['total']} done, "
            f"{part['restarts']} restart(s)"
        )
    for failed in summary["failed_cases"]:
        lines.append(f"  FAILED {failed['case']}: {failed['error']}")
    lines.append(f"  outputs: {out}   logs: {logs_dir(state)}")
    if summary["exit_code"] == 130 and command_hint:
        lines.append(f"  resume with: {command_hint}")
    return lines
