"""`nnunet-launch status OUT`: what the journal says, read-only, never blocking the run."""

from __future__ import annotations

import os

from launcher.journal import Journal, lock_holder
from launcher.outputs import journal_path, state_dir


def status_dict(out: str) -> dict:
    journal = Journal.open_readonly(journal_path(out))
    try:
        info = journal.snapshot()
    finally:
        journal.close()
    holder = lock_holder(os.path.join(state_dir(out), "lock"))
    info["launcher_running"] = holder is not None
    info["launcher_pid"] = holder
    return info


def render_status(info: dict) -> str:
    state = f"running (pid {info['launcher_pid']})" if info["launcher_running"] else "not running"
    lines = [
        f"launcher: {state}",
        f"cases: {info['done']}/{info['total']} done, {info['running']} running, "
        f"{info['pending']} pending, {info['failed']} failed",
    ]
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
