"""End-of-run report: OUT/.nnunet-launch/summary.json and the lines printed for the user.
Reads the journal; changes no run state."""

from __future__ import annotations

import csv
import datetime
import io
import os
import resource
import time

from launcher.exits import EXIT_INTERRUPTED, EXIT_MEANING
from launcher.journal import STAGE_SECONDS, Journal
from launcher.numbers import busy_pct, hms
from launcher.outputs import logs_dir, tmp_dir, write_json_atomically, write_text_atomically

SECONDS_COLUMNS = ("seconds", *STAGE_SECONDS)


def write_summary(state: str, journal: Journal, exit_code: int, started: float, context: dict | None = None) -> dict:
    snapshot = journal.snapshot()
    ended = time.time()
    facts = {
        "started": iso_time(started),
        "ended": iso_time(ended),
        **(context or {}),
        **supervisor_resources(),
    }
    runs = [{**r, "started": iso_time(r["started"]), "ended": iso_time(r["ended"])} for r in journal.run_history()]
    facts["runs"] = runs  # every run on this OUT (a resumed night is several), and their totals:
    facts["over_all_runs"] = {
        "runs": len(runs),
        "wall_seconds": round(sum(r["wall_seconds"] or 0.0 for r in runs), 2),
        **{k: sum(r[k] for r in runs) for k in ("done", "failed", "released")},
    }
    predicting, _ = journal.busy(0.0)
    _, utilisation = journal.busy(started)  # NVML's samples: this run's
    for part in snapshot["parts"]:  # how busy each worker kept its device, over every run (numbers.busy_pct)
        part["busy_pct"] = busy_pct(predicting.get(part["part_id"], 0.0), facts["over_all_runs"]["wall_seconds"])
        if part["gpu_uuid"] in utilisation:
            part["gpu_util_mean_pct"] = round(utilisation[part["gpu_uuid"]], 1)
    return write_report_files(state, snapshot, journal.case_rows(), exit_code, round(ended - started, 2), facts)


def iso_time(epoch: float | None) -> str | None:
    """ISO 8601 with the local zone, to the millisecond."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="milliseconds")


def supervisor_resources() -> dict:
    """What the supervisor process itself cost (not its workers): CPU seconds and peak memory."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "supervisor_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "supervisor_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def write_report_files(
    state: str,
    snapshot: dict,
    case_rows: list[dict],
    exit_code: int,
    wall_seconds: float | None,
    facts: dict | None = None,
) -> dict:
    """summary.json (totals, parts, failures, the run's facts) and cases.csv (one line per case:
    part, GPU, attempts, start and end as ISO 8601, seconds = end - start, the seconds it was queued
    in its worker before that, and its stages' seconds, which add up to `seconds`; state, error)
    in a run's state folder."""
    summary = {
        "exit_code": exit_code,
        "result": EXIT_MEANING.get(exit_code, "error"),
        "wall_seconds": wall_seconds,
        **(facts or {}),
        **{k: snapshot[k] for k in ("cases", "total", "done", "failed", "pending", "parts", "unassigned")},
        "failed_cases": snapshot["failed_cases"],
        **{k: snapshot[k] for k in ("steps", "stages", "final_stage") if k in snapshot},
    }
    write_json_atomically(os.path.join(state, "summary.json"), summary, tmp_dir(state))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(case_rows[0]) if case_rows else ["id"])
    writer.writeheader()
    writer.writerows(
        {
            **{k: round(v, 3) if k in SECONDS_COLUMNS and v is not None else v for k, v in row.items()},
            "started": iso_time(row.get("started")),
            "ended": iso_time(row.get("ended")),
        }
        for row in case_rows
    )
    write_text_atomically(os.path.join(state, "cases.csv"), text.getvalue(), tmp_dir(state))
    return summary


def summary_lines(
    summary: dict, out: str, state: str, command_hint: str | None, picture: str | None = None
) -> list[str]:
    cases = summary["cases"]
    units = ""
    if "stages" in summary:  # a multi-stage run: cases are its final units
        per_stage = ", ".join(f"{s} {c.get('done', 0)}/{sum(c.values())}" for s, c in summary["stages"].items())
        units = f"; steps done per stage: {per_stage}"
        if summary.get("intermediate_peak_bytes") is not None:
            units += f"; intermediate files peaked at {_size(summary['intermediate_peak_bytes'])}"
    not_done = cases["total"] - cases["done"] - cases["failed"]
    lines = [
        f"nnunet-launch: {cases['done']}/{cases['total']} case(s) predicted, "
        f"{cases['failed']} failed, {not_done} not done, in {hms(summary['wall_seconds'])} "
        f"({summary['result']}){units}"
    ]
    for part in summary["parts"]:
        failed = f", {part['failed']} failed" if part.get("failed") else ""
        runs = (summary.get("over_all_runs") or {}).get("runs", 1)
        over = f" over {runs} runs" if runs > 1 else ""
        busy = f", predicting {part['busy_pct']:.0f}% of the time{over}" if part.get("busy_pct") is not None else ""
        util = (
            f", GPU {part['gpu_util_mean_pct']:.0f}% busy (NVML)" if part.get("gpu_util_mean_pct") is not None else ""
        )
        lines.append(
            f"  part {part['part_id']} on {part['gpu']}: {part['done']}/{part['total']} done{failed}, "
            f"{part['restarts']} restart(s){busy}{util}"
        )
    if line := unassigned_line(summary):
        lines.append(f"  {line}")
    for failed in summary["failed_cases"]:
        lines.append(f"  FAILED {failed['case']}: {failed['error']}")
    lines.append(f"  outputs: {out}   logs: {logs_dir(state)}")
    if picture:
        lines.append(f"  the run's picture: {picture}")
    if summary["exit_code"] == EXIT_INTERRUPTED and command_hint:
        lines.append(f"  resume with: {command_hint}")
    return lines


def unassigned_line(snapshot: dict) -> str | None:
    """The cases in no part's line (never taken by a worker), so that the lines add up."""
    left = snapshot.get("unassigned") or {}
    if not left.get("total"):
        return None
    return f"not taken by any part: {left['waiting']} waiting, {left['failed']} failed"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
