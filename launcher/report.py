"""End-of-run report: OUT/.nnunet-launch/summary.json and the lines printed for the user.
Reads the journal; changes no run state."""

from __future__ import annotations

import csv
import io
import os
import time

from launcher.journal import Journal
from launcher.outputs import state_dir, tmp_dir, write_json_atomically, write_text_atomically

EXIT_MEANING = {
    0: "every case predicted",
    1: "finished, but some cases failed",
    130: "interrupted; rerun the same command to resume",
}


def write_summary(out: str, journal: Journal, exit_code: int, started: float) -> dict:
    snapshot = journal.snapshot()
    summary = {
        "exit_code": exit_code,
        "result": EXIT_MEANING.get(exit_code, "error"),
        "wall_seconds": round(time.time() - started, 2),
        **{k: snapshot[k] for k in ("total", "done", "failed", "pending", "parts", "failed_cases")},
    }
    write_json_atomically(os.path.join(state_dir(out), "summary.json"), summary, tmp_dir(out))
    _write_cases_csv(out, journal.case_rows())
    return summary


def _write_cases_csv(out: str, rows: list[dict]) -> None:
    """One line per case: state, part, attempts, GPU, seconds, error."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["id"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(os.path.join(state_dir(out), "cases.csv"), text.getvalue(), tmp_dir(out))


def summary_lines(summary: dict, out: str, command_hint: str | None) -> list[str]:
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
    lines.append(f"  outputs: {out}   logs: {os.path.join(state_dir(out), 'logs')}")
    if summary["exit_code"] == 130 and command_hint:
        lines.append(f"  resume with: {command_hint}")
    return lines
