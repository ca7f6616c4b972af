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
from collections.abc import Iterator
from contextlib import contextmanager

from launcher.errors import LauncherError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY, part INTEGER, state TEXT NOT NULL DEFAULT 'pending',
    stage TEXT, attempts INTEGER NOT NULL DEFAULT 0, gpu TEXT, started REAL, ended REAL,
    seconds REAL, error TEXT);
CREATE TABLE IF NOT EXISTS parts (
    part_id INTEGER PRIMARY KEY, gpu TEXT, gpu_uuid TEXT, restarts INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER, state TEXT NOT NULL DEFAULT 'waiting');
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, part INTEGER,
    case_id TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER, started REAL, ended REAL, exit_code INTEGER);
"""

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
RUN_FIELDS = ("pid", "started", "ended", "exit_code")


class Journal:
    def __init__(self, connection: sqlite3.Connection):
        self.db = connection

    @classmethod
    def open(cls, path: str) -> Journal:
        db = sqlite3.connect(path, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        return cls(db)

    @classmethod
    def open_readonly(cls, path: str) -> Journal:
        if not os.path.isfile(path):
            raise LauncherError(
                f"no launcher journal at {path!r}: was `nnunet-launch run` started with this output folder?"
            )
        uri = "file:" + path.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
        return cls(sqlite3.connect(uri, uri=True, timeout=30))

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # --- the run ---------------------------------------------------------------------------
    def identity(self) -> dict | None:
        row = self.db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
        return json.loads(row[0]) if row else None

    def start_run(self, identity: dict, parts: list[tuple[int, str, str | None]], case_parts: dict[str, int]) -> int:
        """Record the identity, this run's parts and cases; cases a dead run left running go back
        to pending (their outputs were never moved into place). Returns the run id."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('identity', ?)", (json.dumps(identity),))
            db.execute("DELETE FROM parts")
            db.executemany("INSERT INTO parts (part_id, gpu, gpu_uuid) VALUES (?, ?, ?)", parts)
            known = {row[0] for row in db.execute("SELECT id FROM cases")}
            gone = known - set(case_parts)
            db.executemany("DELETE FROM cases WHERE id=?", [(c,) for c in gone])
            # a finished case keeps the part that ran it
            db.executemany(
                "INSERT INTO cases (id, part) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET part=excluded.part "
                "WHERE cases.state != 'done'",
                case_parts.items(),
            )
            db.execute("UPDATE cases SET state=?, stage=NULL WHERE state=?", (PENDING, RUNNING))
            cursor = db.execute("INSERT INTO runs (pid, started) VALUES (?, ?)", (os.getpid(), time.time()))
            return cursor.lastrowid

    def end_run(self, run_id: int, exit_code: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET ended=?, exit_code=? WHERE id=?", (time.time(), exit_code, run_id))
            db.execute("UPDATE cases SET state=?, stage=NULL WHERE state=?", (PENDING, RUNNING))
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

    def case_started(self, case_id: str, gpu: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE cases SET state=?, stage='preprocess', attempts=attempts+1, gpu=?, "
                "started=?, ended=NULL, error=NULL WHERE id=?",
                (RUNNING, gpu, time.time(), case_id),
            )

    def case_stage(self, case_id: str, stage: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE cases SET stage=? WHERE id=? AND state=?", (stage, case_id, RUNNING))

    def case_done(self, case_id: str, seconds: float | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE cases SET state=?, stage=NULL, ended=?, seconds=?, error=NULL WHERE id=?",
                (DONE, time.time(), seconds, case_id),
            )

    def case_failed_attempt(self, case_id: str, error: str, case_retries: int) -> str:
        """One failed attempt: back to pending while retries are left, else failed."""
        with self._tx() as db:
            db.execute(
                "UPDATE cases SET state=CASE WHEN attempts > ? THEN ? ELSE ? END, stage=NULL, "
                "ended=?, error=? WHERE id=?",
                (case_retries, FAILED, PENDING, time.time(), error, case_id),
            )
            return db.execute("SELECT state FROM cases WHERE id=?", (case_id,)).fetchone()[0]

    def assign(self, case_ids: list[str], part: int) -> None:
        with self._tx() as db:
            db.executemany("UPDATE cases SET part=? WHERE id=?", [(part, c) for c in case_ids])

    def reopen_cases(self, case_ids: list[str]) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE cases SET state=?, attempts=0, error=NULL WHERE id=?", [(PENDING, c) for c in case_ids]
            )

    def fail_cases(self, case_ids: list[str], error: str) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE cases SET state=?, stage=NULL, ended=?, error=? WHERE id=?",
                [(FAILED, time.time(), error, c) for c in case_ids],
            )

    def in_flight(self, part: int) -> list[tuple[str, str | None, float]]:
        """(case, stage, started) of the part's running cases."""
        return self.db.execute(
            "SELECT id, stage, started FROM cases WHERE state=? AND part=? ORDER BY started", (RUNNING, part)
        ).fetchall()

    def release_cases(self, case_ids: list[str]) -> None:
        """Back to pending without charging the attempt: they were only queued behind a crash."""
        with self._tx() as db:
            db.executemany(
                "UPDATE cases SET state=?, stage=NULL, attempts=MAX(attempts-1, 0) WHERE id=? AND state=?",
                [(PENDING, c, RUNNING) for c in case_ids],
            )

    def slowest_case_seconds(self) -> float | None:
        return self.db.execute("SELECT MAX(seconds) FROM cases WHERE state=?", (DONE,)).fetchone()[0]

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
            counts = dict(db.execute("SELECT state, COUNT(*) FROM cases GROUP BY state").fetchall())
            run_started = db.execute("SELECT MAX(started) FROM runs").fetchone()[0] or 0.0
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
