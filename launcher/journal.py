"""Run state in SQLite (OUT/.nnunet-launch/journal.sqlite) and the one-launcher-per-OUT lock.

The supervisor is the only writer; `status` opens the journal read-only (WAL lets it read
while the run writes). Each state change is committed at once: a crash loses nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

from launcher import numbers
from launcher.errors import LauncherError
from launcher.exits import ResumableStop

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY, part INTEGER, state TEXT NOT NULL DEFAULT 'pending',
    stage TEXT, attempts INTEGER NOT NULL DEFAULT 0, gpu TEXT, started REAL, ended REAL,
    seconds REAL, error TEXT, work REAL);
CREATE TABLE IF NOT EXISTS parts (
    part_id INTEGER PRIMARY KEY, gpu TEXT, gpu_uuid TEXT, restarts INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER, state TEXT NOT NULL DEFAULT 'waiting');
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, part INTEGER,
    case_id TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER, started REAL, ended REAL, exit_code INTEGER,
    working_since REAL);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run INTEGER, case_id TEXT NOT NULL, attempt INTEGER,
    part INTEGER, gpu TEXT, taken REAL, started REAL, ended REAL, last_stage TEXT,
    outcome TEXT NOT NULL, queued_s REAL, preprocess_s REAL, wait_s REAL, predict_s REAL,
    export_s REAL, error TEXT);
CREATE TABLE IF NOT EXISTS gpu_samples (
    ts REAL NOT NULL, gpu_uuid TEXT NOT NULL, util INTEGER, mem_used INTEGER, mem_total INTEGER);
CREATE INDEX IF NOT EXISTS cases_by_part_state ON cases(part, state);
"""
# Columns added since 0.1 (an older journal gains them in Journal.open). Per case, of the attempt
# that finished it: when a worker got it (`taken`), its seconds queued in the worker (from `taken`
# to `started`), then preprocessing, waiting for the device, predicting and exporting (these four
# add up to `seconds` = ended - started); while it predicts, its sliding-window steps.
ADDED_CASE_COLUMNS = {
    "work": "REAL",
    "taken": "REAL",
    "queued_s": "REAL",
    "preprocess_s": "REAL",
    "wait_s": "REAL",
    "predict_s": "REAL",
    "export_s": "REAL",
    "step_done": "INTEGER",
    "step_total": "INTEGER",
}
STAGE_SECONDS = ("queued_s", "preprocess_s", "wait_s", "predict_s", "export_s")
# One row per attempt a worker started, whatever its end: what the run's picture draws.
# outcome: "done", "failed" (charged: retried or failed for good), "released" (interrupted, or
# back to the queue behind another case's crash).
ATTEMPT_COLUMNS = ("run", "case_id", "attempt", "part", "gpu", "taken", "started", "ended", "last_stage", "outcome")
ATTEMPT_COLUMNS += (*STAGE_SECONDS, "error")
# Created after the `work` column exists (a journal from 0.1 gains it in Journal.open): covers the
# snapshot's work and this-run queries, and prefixes every query by state.
INDEXES = """
DROP INDEX IF EXISTS cases_by_state;
DROP INDEX IF EXISTS cases_by_state_ended;
CREATE INDEX IF NOT EXISTS cases_by_state_ended_seconds ON cases(state, ended, part, work, seconds);
"""
# columns the case book may set (scheduler.CaseBook's updates)
CASE_COLUMNS = {"state", "part", "stage", "attempts", "gpu", "started", "ended", "seconds", "error"}
CASE_COLUMNS |= set(ADDED_CASE_COLUMNS) - {"work"}

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
HELD = "held"  # in flight, but still waiting in the worker's local queue (not started)


@dataclass(frozen=True)
class JournalRow:
    """A case as the journal last stored it."""

    state: str
    attempts: int = 0
    stage: str | None = None
    part: int | None = None
    started: float | None = None  # set at an attempt's first stage, never cleared


RUN_FIELDS = ("pid", "started", "ended", "exit_code")
PARTS_SQL = "SELECT part_id, gpu, gpu_uuid, restarts, worker_pid, state FROM parts ORDER BY part_id"
RECENT_CASES = 200  # the ETA's stage shares come from this run's latest finished cases


class JournalWriteError(ResumableStop):
    """The journal could not be written (disk full, I/O error): the run must stop cleanly."""


class Journal:
    def __init__(self, connection: sqlite3.Connection, path: str = ""):
        self.db, self.path = connection, path

    @classmethod
    def open(cls, path: str) -> Journal:
        """Open (creating or upgrading) the journal for writing; a disk that cannot take it (full,
        failing) raises JournalWriteError."""
        db = None
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(cases)")}
            for column, kind in ADDED_CASE_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE cases ADD COLUMN {column} {kind}")
            if "working_since" not in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:
                db.execute("ALTER TABLE runs ADD COLUMN working_since REAL")
            db.executescript(INDEXES)
        except sqlite3.OperationalError as exc:
            if db is not None:
                db.close()
            raise JournalWriteError(f"cannot write the journal {path!r}: {exc}") from exc
        return cls(db, path)

    @classmethod
    def open_readonly(cls, path: str) -> Journal:
        if not os.path.isfile(path):
            raise LauncherError(
                f"no launcher journal at {path!r}: was `nnunet-launch run` started with this output folder?"
            )
        # Without a -wal file no writer has the journal open (a clean close removes it): read the
        # file as it is (immutable), which creates no -wal/-shm files beside it. With one, a run
        # is writing (or was killed): read through the WAL, as SQLite must.
        quiet = not os.path.exists(path + "-wal")
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro" + ("&immutable=1" if quiet else "")
        return cls(sqlite3.connect(uri, uri=True, timeout=30), path)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction. A write that fails (a full disk, an I/O error) raises
        JournalWriteError; SQLite may have rolled the transaction back itself already."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise JournalWriteError(f"cannot write the journal {self.path!r}: {exc}") from exc

    # --- the run ---------------------------------------------------------------------------
    def identity(self) -> dict | None:
        row = self.db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
        return json.loads(row[0]) if row else None

    def start_run(self, identity: dict, parts: list[tuple[int, str, str | None]], work: dict[str, float | None]) -> int:
        """Store the identity, this run's parts and its cases (a case no longer planned is
        dropped; a new one is added as the case book's resume will find it). Where each case
        goes is the case book's decision (CaseBook.resume), written with `apply`. Returns the run id."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('identity', ?)", (json.dumps(identity),))
            db.execute("DELETE FROM parts")
            db.executemany("INSERT INTO parts (part_id, gpu, gpu_uuid) VALUES (?, ?, ?)", parts)
            known = {row[0] for row in db.execute("SELECT id FROM cases")}
            db.executemany("DELETE FROM cases WHERE id=?", [(c,) for c in known - set(work)])
            db.executemany(
                "INSERT INTO cases (id, work) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET work=excluded.work",
                list(work.items()),
            )
            cursor = db.execute("INSERT INTO runs (pid, started) VALUES (?, ?)", (os.getpid(), time.time()))
            return cursor.lastrowid

    def close_dead_run(self, seen: float | None) -> dict | None:
        """The latest run did not close its books (its launcher was SIGKILLed, the OOM killer took
        it, the machine went down): end it at `seen`, when it was last seen alive (or its last
        journaled step), its exit code unknown (NULL). Called under the OUT lock, so it is not
        running. Returns {"pid", "started", "seen", "in_flight"} of that run, or None."""
        row = self.db.execute("SELECT id, pid, started, ended FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        if row is None or row[3] is not None:
            return None
        activity = self.db.execute(
            "SELECT MAX(t) FROM (SELECT MAX(ts) AS t FROM events UNION ALL SELECT MAX(ended) FROM cases "
            "UNION ALL SELECT MAX(started) FROM cases)"
        ).fetchone()[0]
        seen = max(t for t in (seen, activity, row[2]) if t is not None)
        in_flight = self.db.execute(  # worked on, not only queued in a worker (numbers.PERSON_STATE_SQL)
            "SELECT COUNT(*) FROM cases WHERE state=? AND IFNULL(stage, '') != ?", (RUNNING, HELD)
        ).fetchone()[0]
        with self._tx() as db:
            db.execute("UPDATE runs SET ended=? WHERE id=?", (seen, row[0]))
        return {"pid": row[1], "started": row[2], "seen": seen, "in_flight": in_flight}

    def last_run_ended(self) -> bool:
        """Whether the latest run closed its books (a killed one did not write its report)."""
        row = self.db.execute("SELECT ended FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        return row is None or row[0] is not None

    def run_working(self, run_id: int, since: float) -> None:
        """When the run's first prediction started (the ETA's rate counts from there: loading models
        and importing nnU-Net is not work)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET working_since=? WHERE id=? AND working_since IS NULL", (since, run_id))

    def end_run(self, run_id: int, exit_code: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET ended=?, exit_code=? WHERE id=?", (time.time(), exit_code, run_id))
            db.execute("UPDATE parts SET worker_pid=NULL")

    def clear(self) -> None:
        with self._tx() as db:
            for table in ("meta", "cases", "parts", "events", "runs", "attempts", "gpu_samples"):
                db.execute(f"DELETE FROM {table}")

    def busy(self, since: float) -> tuple[dict, dict]:
        """Since `since` (this run's start): seconds each part's attempts spent predicting, and
        each GPU's mean NVML utilisation % over its samples."""
        predicting = dict(
            self.db.execute("SELECT part, TOTAL(predict_s) FROM attempts WHERE started >= ? GROUP BY part", (since,))
        )
        utilisation = dict(
            self.db.execute("SELECT gpu_uuid, AVG(util) FROM gpu_samples WHERE ts >= ? GROUP BY gpu_uuid", (since,))
        )
        return predicting, utilisation

    def run_history(self) -> list[dict]:
        """Every run on this OUT: its start, end, exit code and what its attempts came to."""
        outcomes: dict = {}
        for run, outcome, count in self.db.execute("SELECT run, outcome, COUNT(*) FROM attempts GROUP BY 1, 2"):
            outcomes.setdefault(run, {})[outcome] = count
        history = []
        for run_id, started, ended, exit_code in self.db.execute(
            "SELECT id, started, ended, exit_code FROM runs ORDER BY id"
        ):
            counts = outcomes.get(run_id, {})
            wall = round(ended - started, 2) if ended is not None and started is not None else None
            # ended without an exit code: it died (close_dead_run), `ended` is when it was last seen
            died = ended is not None and exit_code is None
            history.append(
                {"run": run_id, "started": started, "ended": ended, "wall_seconds": wall, "exit_code": exit_code}
                | {"died": died}
                | {k: counts.get(k, 0) for k in ("done", "failed", "released")}
            )
        return history

    # --- cases -----------------------------------------------------------------------------
    def cases_in_state(self, state: str, part: int | None = None) -> list[str]:
        sql, args = "SELECT id FROM cases WHERE state=?", [state]
        if part is not None:
            sql, args = sql + " AND part=?", args + [part]
        return [row[0] for row in self.db.execute(sql + " ORDER BY id", args)]

    def book_rows(self) -> dict[str, JournalRow]:
        """Every case as stored, for the case book's resume (and `plan`'s read-only one)."""
        rows = self.db.execute("SELECT id, state, attempts, stage, part, started FROM cases")
        return {row[0]: JournalRow(*row[1:]) for row in rows}

    def apply(self, updates: list[tuple[str, dict]], attempts: list[dict] = ()) -> None:
        """Write the case book's updates [(case id, {column: value})] and the attempts that ended
        (rows of ATTEMPT_COLUMNS) in one transaction."""
        with self._tx() as db:
            db.executemany(
                f"INSERT INTO attempts ({', '.join(ATTEMPT_COLUMNS)}) VALUES ({', '.join('?' * len(ATTEMPT_COLUMNS))})",
                [[a.get(c) for c in ATTEMPT_COLUMNS] for a in attempts],
            )
            for case_id, row in updates:
                columns = sorted(row)
                if not set(columns) <= CASE_COLUMNS:
                    raise ValueError(f"not a case column: {set(columns) - CASE_COLUMNS}")
                assignments = ", ".join(f"{c}=?" for c in columns)
                db.execute(f"UPDATE cases SET {assignments} WHERE id=?", [row[c] for c in columns] + [case_id])

    def done_seconds(self) -> dict[str, float]:
        return dict(self.db.execute("SELECT id, seconds FROM cases WHERE state=? AND seconds IS NOT NULL", (DONE,)))

    # --- parts and events ------------------------------------------------------------------
    def part_worker(self, part: int, pid: int | None, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE parts SET worker_pid=?, state=? WHERE part_id=?", (pid, state, part))

    def part_restarted(self, part: int) -> int:
        with self._tx() as db:
            db.execute("UPDATE parts SET restarts=restarts+1 WHERE part_id=?", (part,))
            return db.execute("SELECT restarts FROM parts WHERE part_id=?", (part,)).fetchone()[0]

    def add_gpu_samples(self, ts: float, samples: dict[str, tuple[int, int, int]]) -> None:
        """NVML's utilisation % and memory used/total per GPU UUID at `ts` (the run's picture)."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO gpu_samples VALUES (?, ?, ?, ?, ?)", [(ts, u, *values) for u, values in samples.items()]
            )

    def event(self, kind: str, part: int | None = None, case_id: str | None = None, message: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (ts, kind, part, case_id, message) VALUES (?, ?, ?, ?, ?)",
                (time.time(), kind, part, case_id, message),
            )

    # --- reading ---------------------------------------------------------------------------
    def snapshot(self, now: float | None = None) -> dict:
        """Every number `status` and the reports show, from one read transaction (numbers.py says
        what they mean). Each query is answered from an index alone (counts per part and state;
        work per state and end time) or touches only the cases in flight and the latest done
        ones, so a 100,000-case journal takes tens of milliseconds, not seconds."""
        now = time.time() if now is None else now
        db = self.db
        db.execute("BEGIN")
        try:
            run = db.execute("SELECT id, pid, started, ended, exit_code, working_since FROM runs ORDER BY id DESC")
            run = run.fetchone() or (None, None, 0.0, None, None, None)
            run_started, working_since = run[2] or 0.0, run[5]
            per_part = self._person_counts_per_part()
            left_per_part = dict(
                db.execute(
                    "SELECT part, TOTAL(work) FROM cases WHERE state IN (?, ?) GROUP BY part", (PENDING, RUNNING)
                )
            )
            this_run = {  # part: (cases done, their work)
                part: (count, work)
                for part, count, work in db.execute(
                    # a kept output (verified, seconds NULL) took no work: it is not this run's rate
                    "SELECT part, COUNT(*), TOTAL(work) FROM cases "
                    "WHERE state=? AND ended >= ? AND seconds IS NOT NULL GROUP BY part",
                    (DONE, run_started),
                )
            }
            shares = numbers.stage_shares(self._recent_stage_seconds(run_started))
            working = self._working(shares)
            until = run[3] or now  # rates to the run's end, once it ended
            parts = [self._part(r, per_part, this_run, working, working_since, until) for r in db.execute(PARTS_SQL)]
            failed = [
                {"case": c, "error": e}
                for c, e in db.execute("SELECT id, error FROM cases WHERE state='failed' ORDER BY id")
            ]
            stages = self._stage_counts()
        finally:
            db.execute("COMMIT")
        units = numbers.counts({s: sum(p.get(s, 0) for p in per_part.values()) for s in numbers.PERSON_STATES})
        work_left = sum(left_per_part.values())
        work_done = sum(work for _, work in this_run.values())
        in_flight = sum(w["behind"] for w in working)
        eta = numbers.eta_s(work_left, work_done, in_flight, working_since, now)
        shared = per_part.get(None, {}).get("waiting", 0)  # a queue no part owns yet (dynamic schedule)
        busy = sum(1 for p in parts if p["state"] == "running") or 1
        for part in parts:  # a part's share of the overall rate; a finished part has no ETA, and while
            # cases wait in the shared queue nobody knows which part gets them: only the run's ETA
            left = left_per_part.get(part["part_id"], 0.0)
            left -= sum(w["behind"] for w in working if w["part"] == part["part_id"])
            known = eta is not None and part["left"] and not shared
            part["eta_s"] = round(eta * busy * left / max(work_left, 1e-9)) if known else None
        # the run ends with its slowest part: where every busy part's ETA is known, the run's is theirs
        part_etas = [p["eta_s"] for p in parts if p["left"]]
        if eta is not None and part_etas and None not in part_etas:
            eta = max(eta, *part_etas)
        eta_range = numbers.eta_range_s(eta, work_left, work_done, in_flight)
        final = stages.pop("case_states", None)
        return {
            "at": now,
            # the cases in a person's words; a multi-stage run's steps (units of work) apart
            "cases": numbers.counts(final) if final is not None else units,
            **({"steps": units} if final is not None else {}),
            # the journal's words, in units of work: running = working, pending = queued + waiting
            "total": units["total"],
            "done": units["done"],
            "failed": units["failed"],
            "running": units["working"],
            "pending": units["queued"] + units["waiting"],
            "eta_s": None if eta is None else round(eta),
            "eta_range_s": eta_range,
            "elapsed_s": round(now - run_started) if run_started and run[3] is None else None,
            # estimated work (voxels x channels): the ETA comes from work left and work done per second
            "work_left": work_left,
            "work_done_this_run": work_done,
            "done_this_run": sum(count for count, _ in this_run.values()),
            "run_started": run_started,
            "working_since": working_since,
            "parts": parts,
            # cases no worker took yet (dynamic schedule), or never will (a broken input, every
            # slot gave up): in no part's line, so that part lines and totals add up
            "unassigned": numbers.counts(per_part.get(None, {})),
            "failed_cases": failed,
            "last_run": dict(zip(RUN_FIELDS, run[1:5], strict=True)) if run[0] is not None else None,
            **stages,
        }

    def _person_counts_per_part(self) -> dict:
        """{part: {person state: count}} (numbers.PERSON_STATES), from the (part, state) index and
        the cases in flight."""
        per_part: dict = {}
        for part, state, count in self.db.execute("SELECT part, state, COUNT(*) FROM cases GROUP BY part, state"):
            per_part.setdefault(part, {})[{RUNNING: "working", PENDING: "waiting"}.get(state, state)] = count
        for part, held in self.db.execute(
            "SELECT part, COUNT(*) FROM cases WHERE state=? AND stage=? GROUP BY part", (RUNNING, HELD)
        ):
            per_part[part]["working"] -= held
            per_part[part]["queued"] = held
        return per_part

    def _recent_stage_seconds(self, run_started: float) -> dict[str, float]:
        """Seconds per stage of this run's latest finished cases (at most RECENT_CASES)."""
        rows = self.db.execute(
            "SELECT TOTAL(preprocess_s), TOTAL(predict_s), TOTAL(export_s) FROM (SELECT preprocess_s, predict_s, "
            "export_s FROM cases WHERE state=? AND ended >= ? ORDER BY ended DESC LIMIT ?)",
            (DONE, run_started, RECENT_CASES),
        ).fetchone()
        return dict(zip(("preprocess", "predict", "export"), rows, strict=True))

    def _working(self, shares: dict[str, float]) -> list[dict]:
        """The cases a worker is preprocessing, predicting or exporting, with how much of each one's
        work is behind it (numbers.in_flight_share)."""
        found = []
        for case_id, part, stage, done, total, work in self.db.execute(
            "SELECT id, part, stage, step_done, step_total, work FROM cases WHERE state=? AND stage!=? "
            "ORDER BY started, id",
            (RUNNING, HELD),
        ):
            share = numbers.in_flight_share(stage, done, total, shares)
            progress = round(100 * done / total) if stage == "predict" and total else None
            found.append(
                {
                    "case": case_id,
                    "part": part,
                    "stage": stage,
                    "progress_pct": progress,
                    "behind": (work or 0.0) * share,
                }
            )
        return found

    @staticmethod
    def _part(row: tuple, per_part: dict, this_run: dict, working: list[dict], since: float | None, now: float) -> dict:
        part_id, gpu, uuid, restarts, pid, state = row
        mine = numbers.counts(per_part.get(part_id, {}))
        done_this_run, _ = this_run.get(part_id, (0, 0.0))
        cases = [{k: w[k] for k in ("case", "stage", "progress_pct")} for w in working if w["part"] == part_id]
        # the one a person asks about: the case being predicted, else the oldest one in work
        current = next((c for c in cases if c["stage"] == "predict"), cases[0] if cases else None)
        return {
            "part_id": part_id,
            "gpu": gpu,
            "gpu_uuid": uuid,
            **{k: mine[k] for k in ("done", "failed", "total", "working", "queued")},
            "left": mine["working"] + mine["queued"] + mine["waiting"],
            "restarts": restarts,
            "state": state,
            "worker_pid": pid,
            "current_case": current["case"] if current else None,
            "current_stage": current["stage"] if current else None,
            "current_progress_pct": current["progress_pct"] if current else None,
            "working": cases,
            "rate_per_min": None if (rate := numbers.per_minute(done_this_run, since, now)) is None else round(rate, 2),
        }

    def _stage_counts(self) -> dict:
        """A multi-stage run's units per stage and state (see stages.py: a member's unit id is
        "<member>/<case>", the final unit's the case id), and which stage is the cases' final one."""
        identity = self.identity() or {}
        if not identity.get("members"):  # a single-stage run (None, or absent in older journals)
            return {}
        final = identity["final_stage"]
        member = "CASE WHEN instr(id, '/') > 0 THEN substr(id, 1, instr(id, '/') - 1) ELSE '' END AS member"
        counts: dict[str, dict[str, int]] = {}
        for stage, state, count in self.db.execute(
            f"SELECT {member}, {numbers.PERSON_STATE_SQL}, COUNT(*) FROM cases GROUP BY 1, 2"
        ):
            counts.setdefault(stage or final, {})[state] = count
        ordered = {stage: counts[stage] for stage in sorted(counts, key=lambda s: s == final)}  # final last
        return {"stages": ordered, "final_stage": final, "case_states": self._case_states(counts.get(final, {}))}

    def _case_states(self, final: dict[str, int]) -> dict[str, int]:
        """A multi-stage case's state from all its units: done or failed as its final unit
        (`final`: the final stage's counts); else working while any unit is, queued while any
        waits in a worker, else waiting. Only the units in flight are read (few, from the index)."""
        working, queued = set(), set()
        for unit, stage in self.db.execute("SELECT id, stage FROM cases WHERE state=?", (RUNNING,)):
            (queued if stage == HELD else working).add(unit.rsplit("/", 1)[-1])
        queued -= working
        # a case whose final unit failed (or is done) is that, whatever member still runs
        flying = sorted(working | queued)
        ended = {
            row[0]
            for row in self.db.execute(
                f"SELECT id FROM cases WHERE state IN (?, ?) AND id IN ({', '.join('?' * len(flying))})",
                (DONE, FAILED, *flying),
            )
        }
        working, queued = working - ended, queued - ended
        states = {"done": final.get("done", 0), "failed": final.get("failed", 0)}
        states |= {"working": len(working), "queued": len(queued)}
        states["waiting"] = sum(final.values()) - sum(states.values())
        return states

    def case_rows(self) -> list[dict]:
        cursor = self.db.execute(
            f"SELECT id, part, state, attempts, gpu, started, ended, seconds, {', '.join(STAGE_SECONDS)}, error "
            "FROM cases ORDER BY id"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]


# --- one launcher per OUT --------------------------------------------------------------------
# Two protocols, chosen by the filesystem that holds the state folder:
#
# - flock (the file `lock`), on a local filesystem: the kernel drops the lock when its holder
#   dies, so a stale lock file never blocks.
# - an exclusive lock file (`lock.excl`, created with O_CREAT|O_EXCL, which NFS v3+, Lustre,
#   GPFS and the other cluster filesystems make atomic at the server) on a network filesystem,
#   or where flock fails (ENOLCK, EOPNOTSUPP, ENOSYS: Lustre mounted without `-o flock`). flock
#   cannot be trusted there: mounted with `local_lock`/`nolock` (or Lustre's `localflock`) it
#   silently locks per host, and two array tasks on two hosts would both write one journal. The
#   file holds {"pid", "host", "started", "heartbeat"}; a thread of the holder rewrites the
#   heartbeat every LOCK_HEARTBEAT_S. It is removed on release. A holder that died without
#   releasing it (SIGKILL, a lost node) leaves it behind: it is stale when its holder is on this
#   host and gone, or on another host and silent for LOCK_STALE_S, and is then taken over (under
#   a short-lived takeover file, so two contenders cannot both take it). A holder on this host
#   is refused at once while its process exists; one on another host only once its heartbeat is
#   seen to advance: until then it is waited for, so a task that SLURM requeues seconds after its
#   node died takes over its dead predecessor's lock instead of failing.
#
# Both protocols record the holder's host and pid, which `status` uses to decide whether it
# may open the journal (see status.py).

LOCK_HEARTBEAT_S = 10.0
LOCK_STALE_S = 120.0
TAKEOVER_STALE_S = 30.0  # a takeover takes milliseconds; a takeover file this old was abandoned
LOCK_RECORD_BYTES = 512  # rewritten in place at a fixed size: a reader never sees a short file
FLOCK_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}
HOST_ENV = "NNUNET_LAUNCH_TEST_HOST"  # tests only: pretend to be another host
FILESYSTEM_ENV = "NNUNET_LAUNCH_TEST_FS"  # tests only: "network" or "local" instead of statfs

# statfs f_type of filesystems shared between hosts (linux/magic.h and the vendors' headers);
# FUSE is counted in: sshfs, GlusterFS, JuiceFS, gcsfuse and most FUSE mounts on clusters are.
NETWORK_FILESYSTEMS = {
    0x6969: "nfs",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x517B: "smb",
    0x19830326: "beegfs",
    0x00C36400: "ceph",
    0x65735546: "fuse",
    0x5346414F: "afs",
    0x01021997: "9p",
    0x7461636F: "ocfs2",
    0x01161970: "gfs2",
    0xAAD7AAEA: "panfs",
    0x73757245: "coda",
}


def this_host() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def filesystem_type(path: str) -> int | None:
    """statfs(2)'s f_type for the nearest existing folder of `path`, or None where it cannot be
    read. Python has no os.statfs; f_type is the first field of struct statfs on Linux."""
    import ctypes

    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buffer = ctypes.create_string_buffer(512)  # larger than struct statfs on every Linux
        if libc.statfs(os.fsencode(path or "."), buffer) != 0:
            return None
        return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF
    except (OSError, AttributeError):
        return None


def on_network_filesystem(path: str) -> bool:
    forced = os.environ.get(FILESYSTEM_ENV)
    if forced in ("network", "local"):
        return forced == "network"
    return filesystem_type(path) in NETWORK_FILESYSTEMS


def _exclusive_path(path: str) -> str:
    return path + ".excl"


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _read_record(path: str) -> dict | None:
    """The holder a lock file names: {"pid", "host", ...}; {} when unreadable (being written, or
    an old launcher's bare pid); None when there is no file."""
    try:
        with open(path, "rb") as f:
            text = f.read(LOCK_RECORD_BYTES * 2).decode(errors="replace").strip()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    if text.isdigit():
        return {"pid": int(text), "mtime": mtime}
    try:
        record = json.loads(text)
    except ValueError:
        return {"mtime": mtime}
    return {**record, "mtime": mtime} if isinstance(record, dict) else {"mtime": mtime}


def _holder_state(record: dict, now: float) -> str:
    """'alive', 'silent' (missed its beats, not stale yet) or 'stale'."""
    if record.get("host") == this_host() and isinstance(record.get("pid"), int):
        started, recorded = _process_started(record["pid"]), record.get("started")
        # the same pid with another start time is a reused pid: the holder is gone
        if started is None or (isinstance(recorded, (int, float)) and abs(started - recorded) > 0.5):
            return "stale"
        return "alive"
    beat = record.get("heartbeat")
    age = now - (beat if isinstance(beat, (int, float)) else record.get("mtime", now))
    if age >= LOCK_STALE_S:
        return "stale"
    return "silent" if age > 2 * LOCK_HEARTBEAT_S else "alive"


def _describe(record: dict) -> str:
    pid, host = record.get("pid", "unknown"), record.get("host")
    return f"pid {pid}" + (f" on host {host}" if host else "")


class OutLock:
    """One launcher per OUT (see the protocols above). acquire() raises LauncherError naming the
    holder when another launcher runs on this folder."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None
        self.mode: str | None = None  # "flock" or "exclusive" once held
        self._stop: threading.Event | None = None
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        if not on_network_filesystem(os.path.dirname(self.path)):
            try:
                self._acquire_flock()
                return
            except _FlockUnsupported:
                pass
        self._acquire_exclusive()

    def _record(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": this_host(), "started": _process_started(pid), "heartbeat": time.time()}

    def _write_record(self, fd: int) -> None:
        os.pwrite(fd, json.dumps(self._record()).encode().ljust(LOCK_RECORD_BYTES), 0)

    # --- flock -----------------------------------------------------------------------------
    def _acquire_flock(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _held_error(_read_record(self.path) or {}) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in FLOCK_UNSUPPORTED:
                raise _FlockUnsupported from exc
            raise
        # a launcher that had to use the other protocol on this folder (its flock failed)
        other = _read_record(_exclusive_path(self.path))
        if other is not None and _holder_state(other, time.time()) != "stale":
            os.close(fd)
            raise _held_error(other)
        os.ftruncate(fd, 0)
        self._write_record(fd)
        self.fd, self.mode = fd, "flock"

    # --- the exclusive lock file -----------------------------------------------------------
    def _acquire_exclusive(self) -> None:
        path = _exclusive_path(self.path)
        first_seen = None
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                record = _read_record(path)
                if record is None:
                    continue  # released meanwhile
                if _holder_state(record, time.time()) == "stale":
                    self._take_over(path, record)
                    continue
                if record.get("host") == this_host():
                    raise _held_error(record) from None  # its process exists
                # Another host: alive only if its heartbeat is seen to advance. A fresh-looking
                # lock may be a dead node's (SLURM requeues a task within seconds), so wait for
                # a beat rather than refuse, and take it over once it is stale.
                seen = tuple(record.get(k) for k in ("pid", "host", "started", "heartbeat"))
                if first_seen is None:
                    first_seen = seen
                    print(
                        f"nnunet-launch: {path} is held by {_describe(record)}; waiting to see whether it is "
                        f"alive (a heartbeat every {LOCK_HEARTBEAT_S:.0f} s) or gone (taken over after "
                        f"{LOCK_STALE_S:.0f} s without one)",
                        file=sys.stderr,
                        flush=True,
                    )
                elif seen != first_seen:
                    raise _held_error(record) from None
                time.sleep(1.0)
                continue
            try:
                self._write_record(fd)
                self._check_no_flock_holder()
            except BaseException:
                os.close(fd)
                _unlink(path)
                raise
            self.fd, self.mode = fd, "exclusive"
            self._start_heartbeat(fd)
            return

    def _check_no_flock_holder(self) -> None:
        """A launcher using flock on this folder (where flock works for it) holds it too."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            raise _held_error(_read_record(self.path) or {}) from None
        except OSError:
            pass  # no flock here: nobody can hold one
        finally:
            os.close(fd)

    def _take_over(self, path: str, stale: dict) -> None:
        takeover = path + ".takeover"
        try:
            fd = os.open(takeover, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.stat(takeover).st_mtime > TAKEOVER_STALE_S:
                    _unlink(takeover)
            except FileNotFoundError:
                pass
            time.sleep(0.2)  # another contender is taking it over: look again
            return
        try:
            current = _read_record(path)
            same = current is not None and all(current.get(k) == stale.get(k) for k in ("pid", "host", "started"))
            if same and _holder_state(current, time.time()) == "stale":
                print(f"nnunet-launch: taking over the stale lock of {_describe(stale)}", file=sys.stderr, flush=True)
                _unlink(path)
        finally:
            os.close(fd)
            _unlink(takeover)

    def _start_heartbeat(self, fd: int) -> None:
        self._stop = threading.Event()

        def beat(stop: threading.Event = self._stop) -> None:
            while not stop.wait(LOCK_HEARTBEAT_S):
                try:
                    self._write_record(fd)
                except OSError:
                    pass  # a network hiccup: the next beat tries again

        self._beat = threading.Thread(target=beat, name="nnunet-launch-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._beat.join(timeout=5)
            self._stop = self._beat = None
        if self.fd is None:
            return
        if self.mode == "exclusive":
            # remove the file only while it is still ours (not taken over after a long stall)
            try:
                mine = os.fstat(self.fd).st_ino == os.stat(_exclusive_path(self.path)).st_ino
            except OSError:
                mine = False
            if mine:
                _unlink(_exclusive_path(self.path))
        os.close(self.fd)
        self.fd = self.mode = None


class _FlockUnsupported(Exception):
    pass


def _held_error(record: dict) -> LauncherError:
    return LauncherError(
        f"another nnunet-launch ({_describe(record)}) is running on this output folder; wait for it or stop it first"
    )


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def lock_info(path: str) -> dict | None:
    """The launcher running on this OUT now, {"pid", "host", "mode", ...}, or None. Probes
    without blocking it."""
    record = _read_record(_exclusive_path(path))
    if record is not None and _holder_state(record, time.time()) != "stale":
        return {**record, "mode": "exclusive"}
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return {**(_read_record(path) or {}), "mode": "flock"}
        except OSError:
            return None  # flock unsupported: only the exclusive file can be held here
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def refuse_if_held(path: str) -> None:
    """OutLock.acquire's refusal without taking the lock: a second launcher on a busy OUT is told
    at once, before it waits for anything (e.g. its model check)."""
    info = lock_info(path)
    if info is not None:
        raise _held_error(info)


def lock_holder(path: str) -> int | None:
    """The pid of the launcher running on this OUT now (-1 when it cannot be read), or None."""
    info = lock_info(path)
    if info is None:
        return None
    pid = info.get("pid")
    return pid if isinstance(pid, int) else -1
