"""Which case goes to which part, and which part to which GPU; the case book, the one owner of
every case's state. Pure logic, no I/O: the supervisor writes what the book returns."""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from launcher.journal import DONE, FAILED, HELD, PENDING, RUNNING, STAGE_SECONDS, JournalRow
from launcher.spec import STAGES, CaseTimes
from launcher.stages import split_unit

# cases each worker holds queued beyond the one it works on (the supervisor's top-up, plus
# the preprocessing lookahead): bench_schedule.py's model of it
DYNAMIC_PLAN_LOOKAHEAD = 3


@dataclass(frozen=True)
class Slot:
    """One worker slot = one part. `gpu_uuid` is None on the CPU."""

    part_id: int
    gpu_index: int | None
    gpu_uuid: str | None

    @property
    def label(self) -> str:
        return "cpu" if self.gpu_uuid is None else f"gpu{self.gpu_index}"

    @property
    def device_key(self) -> str:
        """What fails together: a GPU (all its slots), or on the CPU one slot."""
        return self.gpu_uuid or f"cpu-slot-{self.part_id}"


def make_slots(gpus: Sequence[tuple[int, str]], workers_per_gpu: int, cpu_workers: int) -> list[Slot]:
    """GPUs as (index, uuid): K slots per GPU, GPU-major; no GPUs: `cpu_workers` CPU slots.

    GPU-major keeps nnU-Net's part k on GPU k // K, so parts spread over GPUs first only
    when K == 1; that is what a user reproducing `-part_id k` by hand expects."""
    if not gpus:
        return [Slot(k, None, None) for k in range(cpu_workers)]
    return [
        Slot(n * workers_per_gpu + j, index, uuid)
        for n, (index, uuid) in enumerate(gpus)
        for j in range(workers_per_gpu)
    ]


def static_parts(case_ids: Sequence[str], num_parts: int) -> list[list[str]]:
    """nnU-Net's split: sorted unique ids, part k = ids[k::num_parts]."""
    ids = sorted(set(case_ids))
    return [ids[k::num_parts] for k in range(num_parts)]


class LargestFirstQueue:
    """The dynamic schedule: idle workers take the largest remaining case (ties by id). `rank`
    goes before size: a multi-stage run's later stages (lower rank) first, so that a case's
    stages follow each other and intermediate outputs stay few."""

    def __init__(self, work: dict[str, float], rank: Callable[[str], tuple] | None = None):
        self.work = dict(work)
        self.rank = rank or (lambda case_id: ())
        self._heap = [(self._key(c), c) for c in self.work]
        heapq.heapify(self._heap)
        self._queued = set(self.work)

    def _key(self, case_id: str) -> tuple:
        return (*self.rank(case_id), -self.work[case_id], case_id)

    def peek(self) -> str | None:
        return self._heap[0][1] if self._heap else None

    def take(self) -> str | None:
        if not self._heap:
            return None
        _, case_id = heapq.heappop(self._heap)
        self._queued.discard(case_id)
        return case_id

    def give_back(self, case_ids: Sequence[str]) -> None:
        for case_id in case_ids:
            if case_id not in self._queued:
                heapq.heappush(self._heap, (self._key(case_id), case_id))
                self._queued.add(case_id)

    def discard(self, case_id: str) -> bool:
        """Take `case_id` out of the queue (rare: its case failed); whether it was queued."""
        if case_id not in self._queued:
            return False
        self._queued.discard(case_id)
        self._heap = [entry for entry in self._heap if entry[1] != case_id]
        heapq.heapify(self._heap)
        return True

    def __len__(self) -> int:
        return len(self._heap)


def simulate_static(work: dict[str, float], num_slots: int) -> float:
    """Makespan of nnU-Net's split: each part runs its strided share of the sorted ids."""
    return max(sum(work[c] for c in part) for part in static_parts(list(work), num_slots))


def simulate_dynamic(work: dict[str, float], num_slots: int, lookahead: int = 0) -> tuple[float, list[list[str]]]:
    """Makespan and assignment of largest-first list scheduling, where each worker also holds
    `lookahead` cases queued locally (they are handed out before the worker is free)."""
    queue = LargestFirstQueue(work)
    free_at = [(0.0, k) for k in range(num_slots)]
    assignment: list[list[str]] = [[] for _ in range(num_slots)]
    held: list[deque] = [deque() for _ in range(num_slots)]
    for k in range(num_slots):
        for _ in range(lookahead):
            if (case_id := queue.take()) is not None:
                held[k].append(case_id)
    heapq.heapify(free_at)
    makespan = 0.0
    while free_at:
        now, k = heapq.heappop(free_at)
        if (case_id := queue.take()) is not None:
            held[k].append(case_id)
        if not held[k]:
            makespan = max(makespan, now)
            continue
        case_id = held[k].popleft()
        assignment[k].append(case_id)
        heapq.heappush(free_at, (now + work[case_id], k))
    return makespan, assignment


def lower_bound(work: dict[str, float], num_slots: int) -> float:
    return max(sum(work.values()) / num_slots, max(work.values(), default=0.0))


# --- the case book ---------------------------------------------------------------------------
# A case's state, in the journal's words (journal.py): queued ("pending"), in flight on one
# worker ("running"), done, or failed.
Update = tuple[str, dict]  # (case id, journal columns to set)


@dataclass
class Flight:
    worker: int  # the serial number of the worker that holds it
    stage: str  # HELD, then one of STAGES
    since: float  # when it entered that stage
    progress_at: float  # its last sign of progress (stage entry, sliding-window step)
    part: int | None = None  # whose cases the worker runs
    taken: float | None = None  # wall clock: handed to the worker
    started: float | None = None  # wall clock: its attempt's first stage (None: not started)
    gpu: str | None = None


@dataclass(frozen=True)
class OutFacts:
    """What OUT holds at the start of a run, read by runner.py (the book reads no files)."""

    present: frozenset[str] = frozenset()  # units whose every output is in OUT (verified, kept if whole)
    vanished: frozenset[str] = frozenset()  # journaled done, but an output is gone since
    broken: dict[str, str] = field(default_factory=dict)  # units whose input is cut or corrupt: why


def _resumed(case_id: str, row: JournalRow, facts: OutFacts, now: float | None) -> tuple[str, int, dict]:
    """One case's state and attempts at the start of a run, and the journal columns that change."""
    if row.state == DONE and case_id not in facts.vanished:
        return DONE, row.attempts, {}
    if case_id in facts.broken:  # a cut or corrupt input is never predicted
        return FAILED, row.attempts, {"state": FAILED, "stage": None, "error": facts.broken[case_id], "ended": now}
    if row.state == RUNNING:  # the attempt of a dead run did not fail: not counted
        tries = max(row.attempts - (row.stage not in (None, HELD)), 0)
        return PENDING, tries, {"state": PENDING, "stage": None, "attempts": tries}
    if row.state in (FAILED, DONE):  # failed: its cause may be fixed; done: its output vanished
        return PENDING, 0, {"state": PENDING, "stage": None, "attempts": 0, "error": None}
    return PENDING, row.attempts, {}


def foreign_outputs(rows: dict[str, JournalRow], present: Iterable[str]) -> list[str]:
    """Outputs in OUT that the launcher cannot have placed: their case was never started by a
    worker of this OUT (a run that stopped between the atomic move and journaling "done" leaves a
    started case), nor journaled done. They are another tool's, refused as on a first run."""
    return sorted(c for c in present if c not in rows or (rows[c].state != DONE and rows[c].started is None))


class CaseBook:
    """Every case is in exactly one place: a queue, in flight on one worker, done or failed.
    Each transition returns the journal updates that make it durable; nothing else changes case
    state, so the journal never disagrees with the book.

    Queues are keyed by part (static schedule: nnU-Net's split) or all under None (dynamic).
    Each key has a queue of cases that need a worker of their own ("solo": a case suspected of
    killing its worker is retried alone, so the next death is certainly its fault).

    In a multi-stage run the book's "cases" are units of work (see stages.py) and `needs` says
    which units each one waits for: a unit is queued once they are all done ("waiting" until
    then), and fails when one of them fails for good."""

    clock = staticmethod(time.time)  # wall-clock times of takes and attempts (the book does no I/O)

    def __init__(
        self,
        work: dict[str, float],
        states: dict[str, str],
        attempts: dict[str, int],
        static_part: dict[str, int] | None = None,
        needs: dict[str, tuple[str, ...]] | None = None,
    ):
        self.work = work
        self.static_part = static_part
        self.charged = {c: attempts.get(c, 0) for c in work}  # attempts that counted
        self.done = {c for c, s in states.items() if s == DONE}
        self.failed = {c: "" for c, s in states.items() if s == FAILED}
        self.flights: dict[str, Flight] = {}
        self.deferred: set[str] = set()  # queued behind every other case until taken again
        # work not done yet (queued and in flight): the fair share of a worker near the end
        self.remaining_work = sum(w for c, w in work.items() if c not in self.done and c not in self.failed)
        self.queues: dict[int | None, LargestFirstQueue] = {}
        self.solo: dict[int | None, LargestFirstQueue] = {}
        self.needs = {u: n for u, n in (needs or {}).items() if n}
        self.needed_by: dict[str, list[str]] = {}
        for unit, unit_needs in self.needs.items():
            for need in unit_needs:
                self.needed_by.setdefault(need, []).append(unit)
        self.depth = {u: self._depth(u) for u in self.needs}
        self.waiting: dict[str, set[str]] = {}
        self.startup_updates: list[Update] = []  # units whose needs failed before this run
        self.retried = 0  # failed cases of the last run tried again (see resume)
        self.ended_attempts: list[dict] = []  # attempts that ended, for the journal's `attempts`
        self.verify: set[str] = set()  # outputs in OUT to verify and keep (see resume)
        for case_id in work:
            if case_id in self.done or case_id in self.failed:
                continue
            unmet = {n for n in self.needs.get(case_id, ()) if n not in self.done}
            if unmet:  # one that failed before this run fails it below
                self.waiting[case_id] = unmet
            else:
                self._queue(case_id, solo=False)
        for case_id in [c for c in self.failed if c in self.needed_by]:
            self.startup_updates += self._fail_dependents(case_id, None)

    @classmethod
    def resume(
        cls,
        work: dict[str, float],
        rows: dict[str, JournalRow],
        facts: OutFacts,
        parts: dict[str, int | None],
        static_part: dict[str, int] | None = None,
        needs: dict[str, tuple[str, ...]] | None = None,
        now: float | None = None,
    ) -> CaseBook:
        """The book a run starts from: the journal's rows, moved as a new run moves them, and what
        OUT holds. `startup_updates` make the moves durable:
        - a case a dead run left in flight is queued again, that attempt not counted;
        - a failed case is tried again with a fresh attempt budget (its cause may be fixed):
          `retried` counts their cases;
        - a done case whose output vanished is predicted again;
        - a case whose input is cut or corrupt fails, never predicted;
        - every case not done takes the plan's part (a done case keeps the part that ran it).
        `verify`: cases not done whose output is in OUT; their worker keeps it when it is whole."""
        states, attempts, updates = {}, {}, []
        for case_id in work:
            row = rows.get(case_id, JournalRow(PENDING))
            states[case_id], attempts[case_id], change = _resumed(case_id, row, facts, now)
            if states[case_id] != DONE and row.part != parts.get(case_id):
                change["part"] = parts.get(case_id)
            if change:
                updates.append((case_id, change))
        book = cls(work, states, attempts, static_part, needs)
        book.startup_updates = updates + book.startup_updates
        book.retried = len(  # cases, not units: a case's failed units are one failed case
            {split_unit(c)[1] for c in work if c in rows and rows[c].state == FAILED and c not in facts.broken}
        )
        book.verify = {c for c in facts.present if c in work and states[c] == PENDING}
        return book

    def _depth(self, unit: str) -> int:
        return 1 + max((self._depth(n) for n in self.needs.get(unit, ())), default=-1)

    def _rank(self, unit: str) -> tuple:
        """Deferred cases last; later stages first, then the largest case, a case's units together."""
        stages = (-self.depth.get(unit, 0), -self.work[unit], split_unit(unit)[1]) if self.needs else ()
        return (unit in self.deferred, *stages)

    # --- where cases are -----------------------------------------------------------------
    def key(self, case_id: str) -> int | None:
        return None if self.static_part is None else self.static_part[case_id]

    def _queue(self, case_id: str, solo: bool) -> None:
        queues = self.solo if solo else self.queues
        queue = queues.get(self.key(case_id))
        if queue is None:
            queue = queues[self.key(case_id)] = LargestFirstQueue({}, self._rank)
        queue.work[case_id] = self.work[case_id]
        queue.give_back([case_id])

    def queued(self, key: int | None = None, solo: bool | None = None, any_key: bool = False) -> int:
        """Queued cases under `key` (or every key), normal, solo or both."""
        kinds = [self.queues, self.solo] if solo is None else [self.solo if solo else self.queues]
        return sum(len(q) for queues in kinds for k, q in queues.items() if any_key or k == key)

    def queued_keys(self) -> set[int | None]:
        return {k for queues in (self.queues, self.solo) for k, q in queues.items() if q}

    def peek(self, key: int | None, solo: bool) -> str | None:
        queue = (self.solo if solo else self.queues).get(key)
        return queue.peek() if queue else None

    def held_work(self, worker: int) -> float:
        return sum(self.work[c] for c, f in self.flights.items() if f.worker == worker)

    def place(self, case_id: str) -> str:
        if case_id in self.done:
            return DONE
        if case_id in self.failed:
            return FAILED
        if case_id in self.flights:
            return RUNNING
        return PENDING

    def on_worker(self, worker: int) -> list[str]:
        return [c for c, f in self.flights.items() if f.worker == worker]

    def unfinished(self) -> int:
        """Units not done or failed: queued, waiting for others, or in flight."""
        return len(self.work) - len(self.done) - len(self.failed)

    # --- transitions ---------------------------------------------------------------------
    def take(self, key: int | None, worker: int, part: int, solo: bool, now: float) -> tuple[str | None, list[Update]]:
        """The largest queued case under `key` for this worker (a solo one when `solo`)."""
        queue = (self.solo if solo else self.queues).get(key)
        case_id = queue.take() if queue else None
        if case_id is None:
            return None, []
        self.deferred.discard(case_id)
        wall = self.clock()
        self.flights[case_id] = Flight(worker, HELD, now, now, part, wall)
        return case_id, [(case_id, {"state": RUNNING, "part": part, "stage": HELD, "taken": wall})]

    def enter_stage(self, case_id: str, stage: str, now: float, gpu: str, wall: float) -> list[Update]:
        """The worker moved a case it holds into a stage; the first one starts an attempt."""
        flight = self.flights.get(case_id)
        if flight is None or stage not in STAGES:
            return []
        starting = flight.stage == HELD
        flight.stage, flight.since, flight.progress_at = stage, now, now
        if not starting:
            return [(case_id, {"stage": stage})]
        flight.started, flight.gpu = wall, gpu
        return [
            (
                case_id,
                {"stage": stage, "attempts": self.charged[case_id] + 1, "gpu": gpu, "started": wall, "error": None},
            )
        ]

    def progress(self, case_id: str, now: float, done: int, total: int) -> list[Update]:
        """Sliding-window steps of a case being predicted (the live view's %)."""
        if case_id not in self.flights:
            return []
        self.flights[case_id].progress_at = now
        return [(case_id, {"step_done": done, "step_total": total})]

    def finish(self, case_id: str, now: float, times: CaseTimes | None = None) -> list[Update]:
        """Its output is in place: `times` of the attempt, or None for an output kept (verified)."""
        flight = self.flights.pop(case_id, None)
        if flight is None:
            return []
        self.done.add(case_id)
        self.remaining_work -= self.work[case_id]
        attempts = self.charged[case_id] + 1
        row = {"state": DONE, "stage": None, "attempts": attempts, "ended": now, "seconds": None}
        row |= {"step_done": None, "step_total": None}
        if times is not None:
            queued = times.started - flight.taken if flight.taken is not None else None
            row |= {"started": times.started, "ended": times.ended, "seconds": times.seconds, "queued_s": queued}
            row |= times.stage_seconds()
            self._end_attempt(case_id, flight, "done", times.ended, None, row)
        for unit in self.needed_by.get(case_id, ()):
            unmet = self.waiting.get(unit)
            if unmet is not None:
                unmet.discard(case_id)
                if not unmet:
                    del self.waiting[unit]
                    self._queue(unit, solo=False)
        return [(case_id, row)]

    def _end_attempt(self, case_id: str, flight: Flight, outcome: str, ended: float, error, seconds: dict) -> None:
        """One row of the journal's `attempts` for an attempt a worker started (the run's picture)."""
        if flight.started is None:
            return
        row = {"case_id": case_id, "attempt": self.charged[case_id] + 1, "part": flight.part, "gpu": flight.gpu}
        row |= {"taken": flight.taken, "started": flight.started, "ended": ended, "last_stage": flight.stage}
        row |= {"outcome": outcome, "error": error, **{k: seconds.get(k) for k in STAGE_SECONDS}}
        self.ended_attempts.append(row)

    def charge(self, case_id: str, error: str, final: bool, retries: int, solo: bool, now: float) -> list[Update]:
        """An attempt that failed for certain because of this case. It fails for good when the
        failure cannot change (`final`) or its retries are spent; else it is queued again."""
        flight = self.flights.pop(case_id, None)
        if flight is None:
            return []
        self._end_attempt(case_id, flight, "failed", now, error, {})
        self.charged[case_id] += 1
        failing = final or self.charged[case_id] > retries
        if failing:
            self.failed[case_id] = error
            self.remaining_work -= self.work[case_id]
        else:
            self._queue(case_id, solo)
        state = FAILED if failing else PENDING
        row = {"state": state, "stage": None, "attempts": self.charged[case_id], "ended": now, "error": error}
        return [(case_id, row)] + (self._fail_dependents(case_id, now) if failing else [])

    def _fail_dependents(self, unit: str, now: float | None) -> list[Update]:
        """The units waiting for a unit that failed for good cannot run: they fail too."""
        updates = []
        for dependent in self.needed_by.get(unit, ()):
            if self.waiting.pop(dependent, None) is None:
                continue
            error = f"not run: {unit} failed"
            self.failed[dependent] = error
            self.remaining_work -= self.work[dependent]
            updates.append((dependent, {"state": FAILED, "stage": None, "ended": now, "error": error}))
            updates += self._fail_dependents(dependent, now)
            updates += self._drop_unneeded(dependent, unit, now)
        return updates

    def _drop_unneeded(self, failed: str, cause: str, now: float | None) -> list[Update]:
        """The other units a failed unit needed (an ensemble's other members, a cascade's
        lowres), not started yet and needed by nothing else that can still run: they are not
        predicted (a case's member can take as long as the case, and its files gigabytes)."""
        updates = []
        for need in self.needs.get(failed, ()):
            if need in self.done or need in self.failed or need in self.flights:
                continue
            if not all(d in self.failed for d in self.needed_by.get(need, ())):
                continue
            queued = [q for queues in (self.queues, self.solo) if (q := queues.get(self.key(need))) is not None]
            if self.waiting.pop(need, None) is None and not any(q.discard(need) for q in queued):
                continue
            error = f"not run: {cause} failed, and its case with it"
            self.failed[need] = error
            self.remaining_work -= self.work[need]
            updates.append((need, {"state": FAILED, "stage": None, "ended": now, "error": error}))
            updates += self._drop_unneeded(need, cause, now)
        return updates

    def release(self, case_ids: Iterable[str], solo: bool = False, defer: bool = False) -> list[Update]:
        """Back to the queue without charging the attempt (interrupted, queued behind a crash,
        or suspected: then `solo`, to be retried alone; or `defer`red behind every other case)."""
        updates = []
        for case_id in case_ids:
            flight = self.flights.pop(case_id, None)
            if flight is None:
                continue
            self._end_attempt(case_id, flight, "released", self.clock(), None, {})
            if defer:
                self.deferred.add(case_id)
            self._queue(case_id, solo)
            updates.append((case_id, {"state": PENDING, "stage": None, "attempts": self.charged[case_id]}))
        return updates

    def fail_queued(self, keys: Iterable[int | None], error: str, now: float) -> list[Update]:
        """Nobody is left to run these queues: their cases fail with `error`."""
        updates = []
        for key in list(keys):
            for queues in (self.queues, self.solo):
                queue = queues.get(key)
                while queue and (case_id := queue.take()) is not None:
                    self.failed[case_id] = error
                    self.remaining_work -= self.work[case_id]
                    updates.append((case_id, {"state": FAILED, "stage": None, "ended": now, "error": error}))
                    updates += self._fail_dependents(case_id, now)
        return updates


# --- feeding workers: which cases a worker gets, decided here, sent by the supervisor -----------
# cases a worker holds queued beyond the ones it works on, so it never waits for the supervisor
# to learn its next case
LOOKAHEAD = 2
NO_WORK = "no work"  # key_for_new_worker: this slot starts no worker now


@dataclass(frozen=True)
class Feed:
    """A live worker as feeding sees it."""

    serial: int
    key: int | None  # the book's queue it draws from
    part: int  # whose cases it runs
    solo: bool  # it holds a suspected case alone


@dataclass
class TopUp:
    cases: list[str]  # to send now
    solo: bool  # the worker holds (or now gets) a suspected case alone
    updates: list[Update]
    then: str | None = None  # with no case to send: NO_MORE or ASK_BACK


NO_MORE, ASK_BACK = "no_more", "ask_back"


def key_for_new_worker(book: CaseBook, own_part: int, running: set[int | None], unavailable: set[int]):
    """The queue a new worker on a slot draws from, or NO_WORK: its own part (static) or the
    shared queue (dynamic). In the static schedule a slot whose part is finished takes over a
    part nobody runs whose own slot is `unavailable` (gave up or rests)."""
    if book.static_part is None:
        return None if book.queued(None) else NO_WORK
    if book.queued(own_part):
        return own_part
    for key in sorted(k for k in book.queued_keys() if k not in running):
        if key in unavailable:
            return key
    return NO_WORK


def fits(book: CaseBook, held_work: float, key: int | None, workers: int) -> bool:
    """May a worker holding `held_work` take the next queued case? Always when it holds nothing;
    else only within a fair share of the work left among `workers` (dynamic schedule), so that
    near the end no worker sits on cases another, idle one could run."""
    next_case = book.peek(key, solo=False)
    if next_case is None:
        return False
    if held_work == 0 or book.static_part is not None:
        return True
    return held_work + book.work[next_case] <= book.remaining_work / max(1, workers)


def _take_within_share(book: CaseBook, feed: Feed, now: float, workers: int, held: int, held_work: float) -> TopUp:
    top = TopUp([], False, [])
    while held + len(top.cases) < LOOKAHEAD + 1 and fits(book, held_work, feed.key, workers):
        case_id, updates = book.take(feed.key, feed.serial, feed.part, solo=False, now=now)
        top.cases.append(case_id)
        top.updates += updates
        held_work += book.work[case_id]
    return top


def _take_solo(book: CaseBook, feed: Feed, now: float) -> TopUp | None:
    case_id, updates = book.take(feed.key, feed.serial, feed.part, solo=True, now=now)
    return TopUp([case_id], True, updates) if case_id is not None else None


def cases_for_new_worker(book: CaseBook, feed: Feed, now: float, workers: int) -> TopUp:
    """A suspected case alone, else up to LOOKAHEAD + 1 queued cases within its fair share."""
    return _take_solo(book, feed, now) or _take_within_share(book, feed, now, workers, 0, 0.0)


def top_up(book: CaseBook, feed: Feed, now: float, workers: int) -> TopUp:
    """Keep a live worker's local queue at LOOKAHEAD cases not started. A worker with nothing
    takes a suspected case alone first. With nothing to send: NO_MORE when nothing is queued for it
    and no case could come back to its queue, ASK_BACK when others hold cases they have not started."""
    mine = book.on_worker(feed.serial)
    if feed.solo and mine:
        return TopUp([], True, [])
    if not mine and (alone := _take_solo(book, feed, now)):
        return alone
    held = sum(1 for c in mine if book.flights[c].stage == HELD)
    # LOOKAHEAD cases not started, beside the one it works on
    top = _take_within_share(book, feed, now, workers, held + 1, book.held_work(feed.serial))
    if not top.cases and not mine:
        top.then = ASK_BACK if _could_come_back(book, feed) else NO_MORE
    return top


def _could_come_back(book: CaseBook, feed: Feed) -> bool:
    """Cases for this worker's queue may still come back (another worker holds some), or become
    ready (a multi-stage unit waits for another)."""
    if book.queued(feed.key) or book.waiting:
        return True
    return any(f.worker != feed.serial and book.key(c) == feed.key for c, f in book.flights.items())


def give_back_donor(book: CaseBook, idle: Feed, askable: set[int]) -> tuple[int, list[str]] | None:
    """An idle worker while others hold cases of its queue they have not started: the worker of
    `askable` to ask to return them (the one holding most), and those cases. A worker holding only
    cases it has not started is not asked: it starts them itself now."""
    held: dict[int, list[str]] = {}
    busy = set()
    for case_id, flight in book.flights.items():
        if flight.stage != HELD:
            busy.add(flight.worker)
        elif flight.worker != idle.serial and book.key(case_id) == idle.key:
            held.setdefault(flight.worker, []).append(case_id)
    donors = [w for w in held if w in busy and w in askable]
    if not donors:
        return None
    donor = max(donors, key=lambda w: len(held[w]))
    return donor, held[donor]


def simulate_feeding(work: dict[str, float], num_slots: int) -> list[list[str]]:
    """The dynamic schedule as the supervisor feeds it (cases_for_new_worker, then top_up with
    its fair share, on the case book), each case taking time in proportion to its work: the cases
    each slot would run. `plan` shows this; a real run differs as real times differ from sizes."""
    book = CaseBook(work, {}, {})
    feeds = [Feed(k, None, k, False) for k in range(num_slots)]
    held: list[deque] = [deque(cases_for_new_worker(book, f, 0.0, num_slots).cases) for f in feeds]
    assignment: list[list[str]] = [[] for _ in range(num_slots)]
    running: list[tuple[float, int, str]] = []

    def start_next(k: int, now: float) -> None:
        if held[k]:
            case_id = held[k].popleft()
            book.enter_stage(case_id, "predict", now, "sim", now)
            heapq.heappush(running, (now + work[case_id], k, case_id))

    for k in range(num_slots):
        start_next(k, 0.0)
    idle: set[int] = set()
    while running:
        now, k, case_id = heapq.heappop(running)
        book.finish(case_id, now)
        assignment[k].append(case_id)
        idle.add(k)
        for slot in list(idle):  # the one that finished and those with nothing (the fair share grew)
            held[slot].extend(top_up(book, feeds[slot], now, num_slots).cases)
            start_next(slot, now)
            if held[slot] or book.on_worker(slot):
                idle.discard(slot)
    return assignment
