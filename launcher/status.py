"""`nnunet-launch status OUT`: what the journal says, read-only, never blocking the run."""

from __future__ import annotations

import os
import time

from launcher.journal import Journal, lock_holder
from launcher.outputs import journal_path, lock_path, node_state_dirs, state_dir
from launcher.report import EXIT_MEANING

COUNTS = ("total", "done", "failed", "running", "pending")


def _state_status(state: str) -> tuple[dict, list[dict]]:
    """One run's (snapshot with launcher liveness, case rows), read-only."""
    journal = Journal.open_readonly(journal_path(state))
    try:
        info, rows = journal.snapshot(), journal.case_rows()
    finally:
        journal.close()
    holder = lock_holder(lock_path(state))
    info["launcher_running"] = holder is not None
    info["launcher_pid"] = holder
    return info, rows


def status_and_cases(out: str) -> tuple[dict, list[dict]]:
    """The run on OUT, or every node's run of a SLURM array merged (per node, per part, totals)."""
    nodes = node_state_dirs(out)
    if not nodes:
        return _state_status(state_dir(out))
    merged: dict = dict.fromkeys(COUNTS, 0)
    merged.update(parts=[], failed_cases=[], nodes=[], last_run=None)
    all_rows = []
    for path in nodes:
        node = int(os.path.basename(path)[len("node-") :])
        info, rows = _state_status(path)
        for key in COUNTS:
            merged[key] += info[key]
        merged["parts"] += [{**p, "node": node} for p in info["parts"]]
        merged["failed_cases"] += [{**f, "node": node} for f in info["failed_cases"]]
        merged["nodes"].append(
            {
                "node": node,
                **{k: info[k] for k in COUNTS},
                "launcher_running": info["launcher_running"],
                "launcher_pid": info["launcher_pid"],
            }
        )
        all_rows += [{**r, "node": node} for r in rows]
    merged["launcher_running"] = any(n["launcher_running"] for n in merged["nodes"])
    merged["launcher_pid"] = next((n["launcher_pid"] for n in merged["nodes"] if n["launcher_pid"]), None)
    return merged, sorted(all_rows, key=lambda r: r["id"])


def status_dict(out: str) -> dict:
    return status_and_cases(out)[0]


def render_status(info: dict) -> str:
    state = f"running (pid {info['launcher_pid']})" if info["launcher_running"] else "not running"
    last = info.get("last_run") or {}
    if not info["launcher_running"] and last.get("ended"):
        wall = last["ended"] - last["started"]
        meaning = EXIT_MEANING.get(last["exit_code"], "error")
        state += (
            f"; last run ended {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['ended']))} "
            f"after {wall:.0f} s, exit {last['exit_code']} ({meaning})"
        )
    lines = [
        f"launcher: {state}",
        f"cases: {info['done']}/{info['total']} done, {info['running']} running, "
        f"{info['pending']} pending, {info['failed']} failed",
    ]
    for n in info.get("nodes", []):
        running = f"running (pid {n['launcher_pid']})" if n["launcher_running"] else "not running"
        lines.append(f"  node {n['node']}: {n['done']}/{n['total']} done, {n['failed']} failed, launcher {running}")
    for p in info["parts"]:
        eta = f", ETA {p['eta_s']:.0f} s" if p["eta_s"] is not None and info["launcher_running"] else ""
        rate = f", {p['rate_per_min']}/min" if p["rate_per_min"] else ""
        current = f", on {p['current_case']}" if p["current_case"] else ""
        lines.append(
            f"  part {p['part_id']} ({p['gpu']}): {p['done']}/{p['total']} done, "
            f"{p['restarts']} restart(s){current}{rate}{eta}"
        )
    for f in info["failed_cases"]:
        lines.append(f"  FAILED {f['case']}: {f['error']}")
    return "\n".join(lines)
