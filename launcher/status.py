"""`nnunet-launch status OUT`: what the run says, read-only, never blocking the run; and the
status snapshot a running launcher publishes for readers that must not open its journal.

Why a snapshot. The journal is SQLite in WAL mode: readers and the writer share an index in
`journal.sqlite-shm`, which only works between processes of one host (shared memory), and SQLite's
locks rely on POSIX locks that network filesystems implement partly or not at all (NFS mounted
with `nolock`, Lustre without `-o flock`). On a cluster OUT is on NFS, Lustre or GPFS, the
launcher runs on a compute node and `status` runs on the login node: opening the journal there
can read a stale or torn view, fail with "disk I/O error", or (WAL recovery) even write to it.

So the running launcher publishes OUT/.nnunet-launch[/node-k]/status.json every few seconds and
when it ends: the same dictionary `status --json` shows, from one read transaction of its own
journal connection (journal.snapshot()), written to a temp file in the state folder and renamed
over the previous one. A rename is atomic on every POSIX and cluster filesystem (and NFS's
close-to-open consistency gives a reader that opens the file after the rename the whole new
file), so a reader sees one complete snapshot, at most a few seconds (plus the client's attribute
cache) old. Publishing is best-effort: an error writing it never touches the run.

Which one `status` reads, per state folder:
- a launcher holds the lock (journal.lock_info: host and pid; flock, or a heartbeat file on
  network filesystems) on another host, or on a network filesystem: the snapshot, with its age;
- otherwise (no launcher running, or one on this host on a local disk): the journal itself,
  which is exact; after a run no writer exists, so reading the journal is safe anywhere. Where
  it cannot be opened at all (no locks on that filesystem), the snapshot is the fallback.
The JSON says which: "source" is "journal" or "snapshot" ("snapshot_age_s" with it).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time

from launcher import slurm
from launcher.errors import LauncherError
from launcher.exits import EXIT_MEANING
from launcher.journal import Journal, lock_info, on_network_filesystem, this_host
from launcher.numbers import count_line, hms, progress_line, stage_text
from launcher.outputs import journal_path, lock_path, numbered_state_dirs, state_dir, tmp_dir, write_text_atomically
from launcher.report import unassigned_line

COUNTS = ("total", "done", "failed", "running", "pending")
SNAPSHOT_FILE = "status.json"
SNAPSHOT_EVERY_S = 5.0
SNAPSHOT_FORMAT = 2  # 2: numbers.py's counts, ETA and the cases in work


def snapshot_path(state: str) -> str:
    return os.path.join(state, SNAPSHOT_FILE)


class SnapshotPublisher:
    """Publishes a run's status snapshot (the writer's side; see the module docstring)."""

    def __init__(self, state: str, every_s: float = SNAPSHOT_EVERY_S):
        self.state, self.every_s = state, every_s
        self.last = float("-inf")
        self.cost_s = 0.0  # what the last publication took

    def maybe_publish(self, journal: Journal, info: dict | None = None) -> None:
        # at most ~2% of the supervisor's time, however large the journal (or slow the filesystem)
        if time.monotonic() - self.last >= max(self.every_s, 50 * self.cost_s):
            self.publish(journal, info)

    def publish(self, journal: Journal, info: dict | None = None, final: bool = False) -> None:
        """Best-effort: a full disk or a network hiccup skips this snapshot, never the run."""
        self.last = time.monotonic()
        try:
            record = {
                "format": SNAPSHOT_FORMAT,
                "host": this_host(),
                "pid": os.getpid(),
                "updated": time.time(),
                "final": final,  # written after the run's end was journaled: the launcher is done
                "status": info if info is not None else journal.snapshot(),
            }
            write_text_atomically(snapshot_path(self.state), json.dumps(record), tmp_dir(self.state))
        except (OSError, sqlite3.Error, TypeError, ValueError):
            pass
        self.cost_s = time.monotonic() - self.last


def read_snapshot(state: str) -> dict | None:
    try:
        with open(snapshot_path(state)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != SNAPSHOT_FORMAT:
        return None
    return record


def last_seen_alive(state: str) -> float | None:
    """When the launcher of this state folder last published its snapshot, unless it published
    its last one (a run that ended): for a run that died, when it was last seen alive."""
    snapshot = read_snapshot(state)
    return None if snapshot is None or snapshot.get("final") else snapshot.get("updated")


def dead_run_line(dead: dict) -> str:
    """What a rerun says first of the run before it that died (Journal.close_dead_run)."""
    in_flight = f"; its {dead['in_flight']} case(s) in flight are predicted again" if dead["in_flight"] else ""
    return (
        f"the last run (pid {dead['pid']}, started {_clock(dead['started'])}) was killed or died before it "
        f"ended: last seen alive {_clock(dead['seen'])}{in_flight}"
    )


def _clock(epoch: float | None) -> str:
    return "?" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _as_dead_run(info: dict, seen: float | None) -> None:
    """A run whose launcher is gone without closing its books: nothing works on its cases any
    more. Its cases in flight are interrupted (the next run predicts them again), its queued ones
    wait, it has no ETA, and its last run says when it was last seen alive."""
    info["last_run"] = {**info["last_run"], "died": True, "seen": seen or info["last_run"].get("ended")}
    for block in ("cases", "steps"):
        if block in info:
            counts = dict(info[block])
            counts["interrupted"], counts["working"] = counts["working"], 0
            counts["waiting"], counts["queued"] = counts["waiting"] + counts["queued"], 0
            info[block] = counts
    info["interrupted"], info["running"] = info["running"], 0
    info["eta_s"] = info["elapsed_s"] = info["eta_range_s"] = None
    for part in info["parts"]:
        if part.get("current_case"):
            stage = stage_text(part.get("current_stage"), part.get("current_progress_pct"))
            part["interrupted_case"] = f"{part['current_case']} ({stage})"
        part.update(current_case=None, current_stage=None, current_progress_pct=None, eta_s=None, worker_pid=None)
        part["queued"] = 0


def _journal_status(state: str, with_rows: bool) -> tuple[dict, list[dict]]:
    journal = Journal.open_readonly(journal_path(state))
    try:
        return journal.snapshot(), journal.case_rows() if with_rows else []
    finally:
        journal.close()


def _state_status(state: str, with_rows: bool = True) -> tuple[dict, list[dict]]:
    """One run's (status with launcher liveness and where it came from, case rows)."""
    holder = lock_info(lock_path(state))
    snapshot = read_snapshot(state)
    elsewhere = holder is not None and holder.get("host") not in (None, this_host())
    use_snapshot = snapshot is not None and holder is not None and (elsewhere or on_network_filesystem(state))
    rows: list[dict] = []
    if not use_snapshot:
        try:
            info, rows = _journal_status(state, with_rows)
        except sqlite3.Error as exc:  # e.g. a filesystem without the locks SQLite needs
            if snapshot is None:
                raise LauncherError(f"cannot read the journal in {state!r}: {exc}") from None
            use_snapshot = True
    if use_snapshot:
        info = dict(snapshot["status"])
        info["source"] = "snapshot"
        info["snapshot_age_s"] = round(max(0.0, time.time() - snapshot["updated"]), 1)
        running = holder is not None and not snapshot.get("final")
    else:
        info["source"] = "journal"
        running = holder is not None
    last = info.get("last_run")
    if not running and last and (last["ended"] is None or last["exit_code"] is None):
        _as_dead_run(info, last_seen_alive(state))
    info["launcher_running"] = running
    info["launcher_pid"] = holder.get("pid") if running else None
    info["launcher_host"] = holder.get("host") if running else None
    return info, rows


def run_states(out: str) -> list[tuple[str, int | None, str]]:
    """Every run's state on OUT as (name, SLURM node or None, folder): the plain run's (when it has
    a journal), each SLURM node's, each `-part_id k` run's."""
    plain = [("run", None, state_dir(out))] if os.path.isfile(journal_path(state_dir(out))) else []
    nodes = [(f"node {k}", k, path) for k, path in numbered_state_dirs(out, "node-")]
    parts = [(f"-part_id {k}", None, path) for k, path in numbered_state_dirs(out, "part-")]
    return plain + nodes + parts


def status_and_cases(out: str, with_rows: bool = True) -> tuple[dict, list[dict]]:
    """What OUT holds, read from its runs' journals, with each case's row when `with_rows` (the
    report needs them). A SLURM array's nodes, or -part_id runs alone, are shares of one split:
    merged (per run, per part, totals). A plain run with -part_id runs beside it predicted the same
    cases: the plain run is shown, the others listed under "other_runs" (adding them up would count
    cases twice)."""
    states = run_states(out)
    nodes = [s for s in states if s[1] is not None]
    plain = [s for s in states if s[0] == "run"]
    shown = nodes or (plain if plain and _has_cases(plain[0][2]) else [s for s in states if s not in plain])
    if not shown:
        submitted = slurm.read_submitted(out)
        if submitted is not None:  # `slurm --submit` ran, and no task has started the launcher yet
            return _submitted_status(submitted), []
        written = os.path.join(slurm.slurm_dir(out), slurm.ARRAY_SCRIPT)
        if os.path.isfile(written):  # `slurm` wrote the scripts; nobody submitted them (yet)
            return _submitted_status({"array_job": None, "written": written, "submit": slurm.resubmit_command(out)}), []
        return _state_status(state_dir(out), with_rows)
    if len(shown) == 1 and shown[0][1] is None:
        info, rows = _state_status(shown[0][2], with_rows)
    else:
        info, rows = _merged(shown, with_rows)
    others = [_counts(state[0], state[2]) for state in states if state not in shown]
    others = [o for o in others if o["total"]]  # not a journal --fresh emptied
    if others:
        info["other_runs"] = others
    return info, rows


def _submitted_status(submitted: dict) -> dict:
    """Status of an OUT whose SLURM array was submitted but has no launcher state yet: the jobs,
    and what squeue says of them (a job no longer queued ended before any task started)."""
    queue = None if submitted["array_job"] is None else slurm.queue_states(str(submitted["array_job"]))
    info: dict = dict.fromkeys(COUNTS, 0)
    info.update(parts=[], failed_cases=[], last_run=None, source="slurm")
    info.update(launcher_running=False, launcher_pid=None, launcher_host=None)
    info["slurm"] = {**submitted, "queue": queue}
    return info


def _submission(slurm_info: dict) -> str:
    job, queue = slurm_info["array_job"], slurm_info["queue"]
    if job is None:
        return f"SLURM scripts written ({slurm_info['written']}), not submitted; submit with: {slurm_info['submit']}"
    if queue is None:
        return f"submitted as job {job}; squeue not available"
    if not queue:
        return (
            f"submitted as job {job}, no longer in squeue, and no task started the launcher: "
            "see task-K.log in OUT/.nnunet-launch/slurm"
        )
    states = ", ".join(f"{count} {state.lower()}" for state, count in sorted(queue.items()))
    return f"submitted as job {job} ({states}); no task has started the launcher yet"


def _has_cases(state: str) -> bool:
    return bool(_state_status(state, False)[0]["total"])


def _counts(name: str, state: str) -> dict:
    info = _state_status(state, False)[0]
    return {"run": name, **{k: info[k] for k in COUNTS}, "launcher_running": info["launcher_running"]}


def _merged(states: list[tuple[str, int | None, str]], with_rows: bool) -> tuple[dict, list[dict]]:
    merged: dict = dict.fromkeys(COUNTS, 0)
    merged.update(parts=[], failed_cases=[], nodes=[], last_run=None)
    all_rows = []
    for name, node, path in states:
        info, rows = _state_status(path, with_rows)
        where = {"node": node, "run": name}
        for key in COUNTS:
            merged[key] += info[key]
        for block in ("cases", "steps", "unassigned"):
            if block in info:
                merged[block] = {k: merged.get(block, {}).get(k, 0) + v for k, v in info[block].items()}
        if info.get("eta_s") is not None:  # the nodes run at once: the last one to finish
            merged["eta_s"] = max(merged.get("eta_s") or 0, info["eta_s"])
        if info.get("eta_range_s"):
            low, high = merged.get("eta_range_s") or (0, 0)
            merged["eta_range_s"] = [max(low, info["eta_range_s"][0]), max(high, info["eta_range_s"][1])]
        # the array's clock: from its first node's first case, its cases done together
        merged["at"] = max(merged.get("at") or 0.0, info.get("at") or 0.0)
        merged["elapsed_s"] = max(merged.get("elapsed_s") or 0, info.get("elapsed_s") or 0) or None
        merged["done_this_run"] = merged.get("done_this_run", 0) + info.get("done_this_run", 0)
        merged["interrupted"] = merged.get("interrupted", 0) + info.get("interrupted", 0)
        if info.get("working_since") is not None:
            merged["working_since"] = min(merged.get("working_since") or info["working_since"], info["working_since"])
        merged["parts"] += [{**p, **where} for p in info["parts"]]
        merged["failed_cases"] += [{**f, **where} for f in info["failed_cases"]]
        merged["nodes"].append(
            {
                **where,
                **{k: info[k] for k in COUNTS},
                **{k: info.get(k) for k in ("launcher_running", "launcher_pid", "launcher_host", "source")},
                **({"snapshot_age_s": info["snapshot_age_s"]} if "snapshot_age_s" in info else {}),
            }
        )
        all_rows += [{**r, **where} for r in rows]
        for stage, counts in info.get("stages", {}).items():
            for key, count in counts.items():
                merged.setdefault("stages", {}).setdefault(stage, {})
                merged["stages"][stage][key] = merged["stages"][stage].get(key, 0) + count
    running = [n for n in merged["nodes"] if n["launcher_running"]]
    merged["launcher_running"] = bool(running)
    merged["launcher_pid"] = running[0]["launcher_pid"] if running else None
    merged["launcher_host"] = running[0]["launcher_host"] if running else None
    merged["source"] = "snapshot" if any(n["source"] == "snapshot" for n in merged["nodes"]) else "journal"
    return merged, sorted(all_rows, key=lambda r: r["id"])


def status_dict(out: str) -> dict:
    return status_and_cases(out, with_rows=False)[0]


def exit_code(info: dict) -> int:
    """`status`'s own exit code, for scripts: 0 while a run goes on or when every case is
    predicted; 1 when cases failed or the last run ended before finishing them (or a submitted
    array left the queue without starting)."""
    if info["launcher_running"]:
        return 0
    if "slurm" in info:  # 1: the array left the queue without starting, or was never submitted
        return 1 if info["slurm"]["queue"] == {} or info["slurm"]["array_job"] is None else 0
    return 1 if info["failed"] or info["pending"] or info["running"] or info.get("interrupted") else 0


def _launcher_state(info: dict) -> str:
    if not info["launcher_running"]:
        return "not running"
    host = f" on {info['launcher_host']}" if info.get("launcher_host") else ""
    text = f"running (pid {info['launcher_pid']}{host})"
    if info.get("source") == "snapshot" and "snapshot_age_s" in info:
        text += f"; from its status snapshot, {info['snapshot_age_s']:.0f} s old"
    return text


def render_status(info: dict) -> str:
    if "slurm" in info:
        return f"launcher: not started; {_submission(info['slurm'])}"
    state = _launcher_state(info)
    last = info.get("last_run") or {}
    if not info["launcher_running"] and last.get("died"):
        state += "; " + dead_run_line({**last, "in_flight": 0})
    elif not info["launcher_running"] and last.get("ended"):
        wall = last["ended"] - last["started"]
        meaning = EXIT_MEANING.get(last["exit_code"], "error")
        state += (
            f"; last run ended {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['ended']))} "
            f"after {hms(wall)}, exit {last['exit_code']} ({meaning})"
        )
    running = info["launcher_running"]
    lines = [f"launcher: {state}", progress_line(info) if running else count_line(info)]
    for stage, counts in info.get("stages", {}).items():
        failed = f", {counts['failed']} failed" if counts.get("failed") else ""
        lines.append(f"  stage {stage}: {counts.get('done', 0)}/{sum(counts.values())} case(s) done{failed}")
    for n in info.get("nodes", []):
        counts = f"{n['done']}/{n['total']} done, {n['failed']} failed"
        lines.append(f"  {n['run']}: {counts}, launcher {_launcher_state(n)}")
    for p in info["parts"]:
        eta = f", ETA {hms(p['eta_s'])}" if p.get("eta_s") is not None and running else ""
        rate = f", {p['rate_per_min']}/min" if p["rate_per_min"] else ""
        stage = stage_text(p.get("current_stage"), p.get("current_progress_pct"))
        current = f", on {p['current_case']} ({stage})" if p["current_case"] else ""
        if p.get("interrupted_case"):
            current = f", interrupted on {p['interrupted_case']}"
        failed = f", {p['failed']} failed" if p.get("failed") else ""
        queued = f", {p['queued']} queued" if p.get("queued") else ""
        share = f"{p['run']}, " if p.get("run") not in (None, "run") else ""  # several shares: each has a part 0
        lines.append(
            f"  {share}part {p['part_id']} ({p['gpu']}): {p['done']}/{p['total']} done{failed}{queued}, "
            f"{p['restarts']} restart(s){current}{rate}{eta}"
        )
    if line := unassigned_line(info):
        lines.append(f"  {line}")
    for f in info["failed_cases"]:
        lines.append(f"  FAILED {f['case']}: {f['error']}")
    for other in info.get("other_runs", []):  # shown apart: they predicted some of the same cases
        lines.append(f"  also on this output folder, {other['run']}: {other['done']}/{other['total']} done")
    return "\n".join(lines)


def _submitted_and_queued(info: dict) -> bool:
    """A SLURM array submitted and still in the queue, no task started yet: worth watching."""
    return bool((info.get("slurm") or {}).get("queue"))


def watch(out: str, every_s: float, as_json: bool = False) -> int:
    """`status --watch`: the status again every `every_s` seconds, in place on a terminal (one
    frame after another elsewhere), until the launcher is no longer running or Ctrl-C. Returns
    the exit code of the last frame."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    def frame() -> tuple[dict, str]:
        info = status_dict(out)
        shown = json.dumps(info) if as_json else render_status(info)
        return info, f"{time.strftime('%H:%M:%S')}  nnunet-launch status {out}\n{shown}"

    info, text = frame()
    terminal = sys.stdout.isatty() and not as_json
    live = Live(Text(text), console=Console(), auto_refresh=False) if terminal else None
    try:
        if live is not None:
            live.start()
        else:
            print(text, flush=True)
        while info["launcher_running"] or _submitted_and_queued(info):
            time.sleep(every_s)
            info, text = frame()
            if live is not None:
                live.update(Text(text), refresh=True)
            else:
                print(text, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return exit_code(info)
