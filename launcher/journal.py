"""Run state in SQLite (OUT/.nnunet-launch/journal.sqlite) and the one-launcher-per-OUT lock.

The supervisor is the only writer; `status` opens the journal read-only (WAL lets it read
while the run writes). Each state change is committed at once: a crash loses nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

from launcher.errors import LauncherError

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
    id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER, started REAL, ended REAL, exit_code INTEGER);
CREATE INDEX IF NOT EXISTS cases_by_state ON cases(state);
CREATE INDEX IF NOT EXISTS cases_by_part_state ON cases(part, state);
"""
# columns the case book may set (scheduler.CaseBook's updates)
CASE_COLUMNS = {"state", "part", "stage", "attempts", "gpu", "started", "ended", "seconds", "error"}

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
HELD = "held"  # running, but still in a worker's local queue
RUN_FIELDS = ("pid", "started", "ended", "exit_code")


class JournalWriteError(Exception):
    """The journal could not be written (disk full, I/O error): the run must stop cleanly."""


class Journal:
    def __init__(self, connection: sqlite3.Connection, path: str = ""):
        self.db, self.path = connection, path

    @classmethod
    def open(cls, path: str) -> Journal:
        db = sqlite3.connect(path, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        if "work" not in {row[1] for row in db.execute("PRAGMA table_info(cases)")}:  # a journal from 0.1
            db.execute("ALTER TABLE cases ADD COLUMN work REAL")
        return cls(db, path)

    @classmethod
    def open_readonly(cls, path: str) -> Journal:
        if not os.path.isfile(path):
            raise LauncherError(
                f"no launcher journal at {path!r}: was `nnunet-launch run` started with this output folder?"
            )
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
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

    def start_run(
        self,
        identity: dict,
        parts: list[tuple[int, str, str | None]],
        case_parts: dict[str, int | None],
        work: dict[str, float] | None = None,
    ) -> tuple[int, int]:
        """Record the identity, this run's parts and cases. Cases a dead run left in flight go
        back to pending without charging that attempt; failed cases are tried again with a fresh
        attempt budget (the cause may be fixed). Returns (run id, failed cases tried again)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('identity', ?)", (json.dumps(identity),))
            db.execute("DELETE FROM parts")
            db.executemany("INSERT INTO parts (part_id, gpu, gpu_uuid) VALUES (?, ?, ?)", parts)
            known = {row[0] for row in db.execute("SELECT id FROM cases")}
            gone = known - set(case_parts)
            db.executemany("DELETE FROM cases WHERE id=?", [(c,) for c in gone])
            # a finished case keeps the part that ran it
            work = work or {}
            db.executemany(
                "INSERT INTO cases (id, part, work) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "work=excluded.work, part=CASE WHEN cases.state = 'done' THEN cases.part ELSE excluded.part END",
                [(c, p, work.get(c)) for c, p in case_parts.items()],
            )
            db.execute(
                "UPDATE cases SET state=?, stage=NULL, attempts=MAX(attempts - (stage IS NOT NULL AND stage != ?), 0) "
                "WHERE state=?",
                (PENDING, HELD, RUNNING),
            )
            retried = db.execute(
                "UPDATE cases SET state=?, stage=NULL, attempts=0, error=NULL WHERE state=?", (PENDING, FAILED)
            ).rowcount
            cursor = db.execute("INSERT INTO runs (pid, started) VALUES (?, ?)", (os.getpid(), time.time()))
            return cursor.lastrowid, retried

    def end_run(self, run_id: int, exit_code: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET ended=?, exit_code=? WHERE id=?", (time.time(), exit_code, run_id))
            db.execute("UPDATE parts SET worker_pid=NULL")

    def clear(self) -> None:
        with self._tx() as db:
            for table in ("meta", "cases", "parts", "events", "runs"):
                db.execute(f"DELETE FROM {table}")

    # --- cases -----------------------------------------------------------------------------
    def cases_in_state(self, state: str, part: int | None = None) -> list[str]:
        sql, args = "SELECT id FROM cases WHERE state=?", [state]
        if part is not None:
            sql, args = sql + " AND part=?", args + [part]
        return [row[0] for row in self.db.execute(sql + " ORDER BY id", args)]

    def states(self) -> tuple[dict[str, str], dict[str, int]]:
        """({case: state}, {case: attempts}) for the case book at the start of a run."""
        rows = self.db.execute("SELECT id, state, attempts FROM cases").fetchall()
        return {c: s for c, s, _ in rows}, {c: a for c, _, a in rows}

    def apply(self, updates: list[tuple[str, dict]]) -> None:
        """Write the case book's updates [(case id, {column: value})] in one transaction."""
        with self._tx() as db:
            for case_id, row in updates:
                columns = sorted(row)
                if not set(columns) <= CASE_COLUMNS:
                    raise ValueError(f"not a case column: {set(columns) - CASE_COLUMNS}")
                assignments = ", ".join(f"{c}=?" for c in columns)
                db.execute(f"UPDATE cases SET {assignments} WHERE id=?", [row[c] for c in columns] + [case_id])

    def reopen_cases(self, case_ids: list[str]) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE cases SET state=?, attempts=0, error=NULL WHERE id=?", [(PENDING, c) for c in case_ids]
            )

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

    def event(self, kind: str, part: int | None = None, case_id: str | None = None, message: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (ts, kind, part, case_id, message) VALUES (?, ?, ?, ?, ?)",
                (time.time(), kind, part, case_id, message),
            )

    # --- reading ---------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything `status` shows, from one read transaction."""
        db = self.db
        db.execute("BEGIN")
        try:
            run_started = db.execute("SELECT MAX(started) FROM runs").fetchone()[0] or 0.0
            counts, work = {}, {}
            # one grouped pass; cases waiting in a worker's local queue have not started: pending
            for state, count, total_work, work_this_run in db.execute(
                "SELECT CASE WHEN state=? AND stage=? THEN ? ELSE state END AS shown, COUNT(*), "
                "TOTAL(work), TOTAL(CASE WHEN ended >= ? THEN work END) FROM cases GROUP BY shown",
                (RUNNING, HELD, PENDING, run_started),
            ):
                counts[state], work[state] = count, (total_work, work_this_run)
            parts = []
            for part_id, gpu, uuid, restarts, pid, state in db.execute(
                "SELECT part_id, gpu, gpu_uuid, restarts, worker_pid, state FROM parts ORDER BY part_id"
            ):
                done, total, done_this_run, last_end = db.execute(
                    "SELECT SUM(state='done'), COUNT(*), SUM(state='done' AND ended >= ?), "
                    "MAX(CASE WHEN state='done' THEN ended END) FROM cases WHERE part=?",
                    (run_started, part_id),
                ).fetchone()
                current = [
                    r[0]
                    for r in db.execute(
                        "SELECT id FROM cases WHERE part=? AND state='running' AND stage='predict'", (part_id,)
                    )
                ]
                parts.append(
                    {
                        "part_id": part_id,
                        "gpu": gpu,
                        "gpu_uuid": uuid,
                        "done": done or 0,
                        "total": total,
                        "restarts": restarts,
                        "state": state,
                        "worker_pid": pid,
                        "current_case": current[0] if current else None,
                        **_rate_and_eta(done or 0, total, done_this_run or 0, run_started, last_end),
                    }
                )
            failed = [
                {"case": c, "error": e}
                for c, e in db.execute("SELECT id, error FROM cases WHERE state='failed' ORDER BY id")
            ]
            last_run = db.execute("SELECT pid, started, ended, exit_code FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        finally:
            db.execute("COMMIT")
        return {
            "total": sum(counts.values()),
            "done": counts.get(DONE, 0),
            "failed": counts.get(FAILED, 0),
            "running": counts.get(RUNNING, 0),
            "pending": counts.get(PENDING, 0),
            # estimated work (voxels x channels): the ETA comes from work left and work done per second
            "work_left": work.get(PENDING, (0.0, 0.0))[0] + work.get(RUNNING, (0.0, 0.0))[0],
            "work_done_this_run": work.get(DONE, (0.0, 0.0))[1],
            "run_started": run_started,
            "parts": parts,
            "failed_cases": failed,
            "last_run": dict(zip(RUN_FIELDS, last_run, strict=True)) if last_run else None,
        }

    def case_rows(self) -> list[dict]:
        cursor = self.db.execute(
            "SELECT id, part, state, attempts, gpu, started, ended, seconds, error FROM cases ORDER BY id"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]


def _rate_and_eta(done: int, total: int, done_this_run: int, run_started: float, last_end: float | None) -> dict:
    """Cases per minute of the latest run, from its start to its last finished case."""
    if not done_this_run or last_end is None or last_end <= run_started:
        return {"rate_per_min": None, "eta_s": None}
    rate = done_this_run / (last_end - run_started)
    return {"rate_per_min": round(rate * 60, 2), "eta_s": round((total - done) / rate, 1)}


class OutLock:
    """One launcher per OUT: an flock held for the run's life. The kernel drops it when the
    holder dies, so a stale lock file never blocks."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LauncherError(
                f"another nnunet-launch (pid {holder}) is running on this output folder; wait for it or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_holder(path: str) -> int | None:
    """The pid of the launcher running on this OUT now, or None (probes without blocking it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
