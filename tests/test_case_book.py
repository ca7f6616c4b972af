"""The case book, the one owner of case state: random event sequences keep every case in exactly
one place, and the journal written from the book's updates always agrees with it."""

from __future__ import annotations

import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.journal import HELD, RUNNING, Journal
from launcher.scheduler import DONE, FAILED, PENDING, CaseBook, OutFacts, foreign_outputs

CASES = [f"c{i}" for i in range(8)]
WORK = {c: float(i + 1) for i, c in enumerate(CASES)}
WORKERS = 3

event = st.one_of(
    st.tuples(st.just("take"), st.integers(0, WORKERS - 1), st.booleans()),
    st.tuples(st.just("stage"), st.sampled_from(CASES), st.sampled_from(["preprocess", "predict", "export"])),
    st.tuples(st.just("finish"), st.sampled_from(CASES)),
    st.tuples(st.just("charge"), st.sampled_from(CASES), st.booleans(), st.booleans()),
    st.tuples(st.just("release"), st.sampled_from(CASES), st.booleans()),
    st.tuples(st.just("worker_dies"), st.integers(0, WORKERS - 1)),
    st.tuples(
        st.just("give_up"),
    ),
)


def _journal(tmp_path_factory) -> Journal:
    journal = Journal.open(str(tmp_path_factory.mktemp("j") / "journal.sqlite"))
    journal.start_run({}, [(0, "cpu", None)], dict.fromkeys(CASES))
    return journal


def _journal_states(journal: Journal) -> dict[str, str]:
    return {c: row.state for c, row in journal.book_rows().items()}


def _apply_event(book: CaseBook, ev: tuple, static: bool) -> list:
    kind = ev[0]
    if kind == "take":
        key = (ev[1] % 2) if static else None
        return book.take(key, ev[1], ev[1], solo=ev[2], now=1.0)[1]
    if kind == "stage":
        return book.enter_stage(ev[1], ev[2], 1.0, "cpu", 1.0)
    if kind == "finish":
        return book.finish(ev[1], 2.0)
    if kind == "charge":
        return book.charge(ev[1], "boom", final=ev[2], retries=1, solo=ev[3], now=2.0)
    if kind == "release":
        return book.release([ev[1]], solo=ev[2])
    if kind == "worker_dies":
        return book.release(book.on_worker(ev[1]))
    return book.fail_queued(book.queued_keys(), "gave up", 3.0)


def _assert_one_place_each_and_the_journal_agrees(book: CaseBook, journal: Journal) -> None:
    places = {c: book.place(c) for c in CASES}
    queued = book.queued(any_key=True)
    assert queued == sum(1 for p in places.values() if p == PENDING), "each queued case is queued once"
    assert len(book.flights) + queued + len(book.done) + len(book.failed) == len(CASES)
    assert not (book.done & set(book.failed)) and not (set(book.flights) & book.done)
    assert _journal_states(journal) == places, "the journal is the book's durable log"
    for case_id, flight in book.flights.items():
        assert flight.worker in range(WORKERS) and case_id in book.on_worker(flight.worker)


@settings(max_examples=150, deadline=None)
@given(events=st.lists(event, max_size=60), static=st.booleans())
def test_random_events_keep_every_case_in_exactly_one_place_and_the_journal_agrees(tmp_path_factory, events, static):
    journal = _journal(tmp_path_factory)
    parts = {c: i % 2 for i, c in enumerate(CASES)} if static else None
    book = CaseBook(WORK, {}, {}, parts)
    for ev in events:
        journal.apply(_apply_event(book, ev, static))
        _assert_one_place_each_and_the_journal_agrees(book, journal)
    journal.close()


a_run = st.tuples(
    st.lists(event, max_size=40),  # what the run does
    st.integers(0, 60),  # how many of its updates reach the journal before it stops (a kill loses the rest)
    st.sets(st.sampled_from(CASES), max_size=3),  # outputs someone deletes before the next run
    st.sets(st.sampled_from(CASES), max_size=3),  # outputs that appear (another tool, a run's last move)
    st.sets(st.sampled_from(CASES), max_size=2),  # inputs cut or corrupt for the next run (then fixed)
)


@settings(max_examples=120, deadline=None)
@given(runs=st.lists(a_run, min_size=1, max_size=4), static=st.booleans())
def test_resumed_runs_that_stop_anywhere_keep_every_case_in_one_place_and_follow_the_resume_rules(
    tmp_path_factory, runs, static
):
    """Runs stop at random points (their unflushed updates lost), outputs vanish or appear, inputs
    break and get fixed: each resume puts every case in exactly one place, the journal agrees,
    and each case moves as the resume rules say."""
    journal = Journal.open(str(tmp_path_factory.mktemp("j") / "journal.sqlite"))
    parts = {c: i % 2 for i, c in enumerate(CASES)}
    outputs: set[str] = set()
    for events, flushed, vanish, appear, broken in runs:
        journal.start_run({}, [(0, "cpu", None), (1, "cpu", None)], WORK)
        rows = journal.book_rows()
        outputs = (outputs - vanish) | appear
        journaled_done = {c for c, row in rows.items() if row.state == DONE}
        facts = OutFacts(frozenset(outputs), frozenset(journaled_done - outputs), dict.fromkeys(broken, "cut"))
        book = CaseBook.resume(WORK, rows, facts, parts, parts if static else None, None, 5.0)
        journal.apply(book.startup_updates)
        _assert_one_place_each_and_the_journal_agrees(book, journal)

        after = journal.book_rows()
        errors = dict(journal.db.execute("SELECT id, error FROM cases"))
        for case_id in CASES:
            row, now = rows[case_id], after[case_id]
            if row.state == DONE and case_id in outputs:
                assert book.place(case_id) == DONE and now.attempts == row.attempts and now.part == row.part
                continue
            assert now.part == parts[case_id], "a case not done takes the plan's part"
            if case_id in broken:
                assert book.place(case_id) == FAILED and errors[case_id] == "cut"
            elif row.state == RUNNING:
                assert book.place(case_id) == PENDING
                started = row.stage is not None and row.stage != HELD
                assert now.attempts == max(row.attempts - started, 0), "a dead run's attempt is not counted"
            elif row.state in (FAILED, DONE):  # failed: its cause may be fixed; done: its output vanished
                assert book.place(case_id) == PENDING and now.attempts == 0 and errors[case_id] is None
            else:
                assert book.place(case_id) == PENDING and now.attempts == row.attempts
        assert book.retried == sum(1 for c, row in rows.items() if row.state == FAILED and c not in broken)
        assert book.verify == {c for c in outputs if book.place(c) == PENDING}
        assert all(foreign not in book.done for foreign in foreign_outputs(rows, outputs))

        updates = []
        for ev in events:
            updates += _apply_event(book, ev, static)
            if ev[0] == "finish" and book.place(ev[1]) == DONE:
                outputs.add(ev[1])  # placed before "done" is journaled
        journal.apply(updates[:flushed])
    journal.close()


def test_charged_attempts_fail_a_case_after_its_retries_and_a_final_error_at_once():
    book = CaseBook({"a": 1.0, "b": 2.0}, {}, {})
    for attempt in range(3):
        case_id, _ = book.take(None, 0, 0, solo=attempt > 0, now=0.0)
        assert case_id == "b", "the largest first, then from the queue of cases retried alone"
        book.enter_stage("b", "predict", 0.0, "cpu", 0.0)
        (row,) = book.charge("b", "boom", final=False, retries=2, solo=True, now=1.0)
        assert row[1]["attempts"] == attempt + 1
    assert book.place("b") == FAILED and row[1]["state"] == FAILED
    case_id, _ = book.take(None, 0, 0, solo=False, now=0.0)
    book.enter_stage(case_id, "preprocess", 0.0, "cpu", 0.0)
    (row,) = book.charge(case_id, "unreadable", final=True, retries=2, solo=False, now=1.0)
    assert book.place("a") == FAILED and row[1]["attempts"] == 1


def test_a_released_attempt_is_not_counted_and_a_resumed_book_keeps_done_and_failed():
    book = CaseBook({"a": 1.0}, {}, {"a": 1})
    book.take(None, 0, 0, solo=False, now=0.0)
    (stage_row,) = book.enter_stage("a", "predict", 0.0, "gpu0", 5.0)
    assert stage_row[1]["attempts"] == 2 and stage_row[1]["started"] == 5.0
    (row,) = book.release(["a"])
    assert row[1] == {"state": PENDING, "stage": None, "attempts": 1}
    resumed = CaseBook({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": DONE, "b": FAILED, "c": PENDING}, {})
    assert (resumed.place("a"), resumed.place("b"), resumed.place("c")) == (DONE, FAILED, PENDING)


def test_journal_write_on_a_full_disk_raises_a_clear_error_and_leaves_no_transaction_open(tmp_path):
    from launcher.journal import JournalWriteError

    journal = Journal.open(str(tmp_path / "journal.sqlite"))
    journal.start_run({}, [(0, "cpu", None)], {f"case_{i}": None for i in range(10)})
    pages = journal.db.execute("PRAGMA page_count").fetchone()[0]
    journal.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full"
    try:
        big = "x" * 100_000
        for _ in range(3):
            journal.event("note", None, None, big)
        raise AssertionError("the journal should be full")
    except JournalWriteError as exc:
        assert "database or disk is full" in str(exc) and "journal.sqlite" in str(exc)
    assert not journal.db.in_transaction
    try:
        journal.db.execute("SELECT COUNT(*) FROM cases").fetchone()
    except sqlite3.Error as exc:  # pragma: no cover - the journal must stay readable
        raise AssertionError(exc) from exc
    journal.close()


STAGED = {
    u: n for c in ("p", "q", "r") for u, n in ((f"a/{c}", ()), (f"b/{c}", (f"a/{c}",)), (c, (f"a/{c}", f"b/{c}")))
}
STAGED_WORK = dict.fromkeys(STAGED, 1.0)
staged_event = st.one_of(
    st.tuples(st.just("take"), st.integers(0, WORKERS - 1), st.booleans()),
    st.tuples(st.just("finish"), st.sampled_from(list(STAGED))),
    st.tuples(st.just("charge"), st.sampled_from(list(STAGED)), st.booleans()),
    st.tuples(st.just("release"), st.sampled_from(list(STAGED))),
    st.tuples(st.just("give_up")),
)


def test_when_an_ensemble_member_fails_for_good_the_other_members_not_started_are_not_predicted():
    ensemble = {"2d/c": (), "3d/c": (), "c": ("2d/c", "3d/c"), "2d/d": (), "3d/d": (), "d": ("2d/d", "3d/d")}
    book = CaseBook(dict.fromkeys(ensemble, 1.0), {}, {}, None, ensemble)
    first, _ = book.take(None, 0, 0, False, 1.0)
    member, case_id = first.split("/")
    other = ("3d/" if member == "2d" else "2d/") + case_id
    updates = dict(book.charge(first, "boom", final=True, retries=0, solo=False, now=2.0))
    assert book.place(case_id) == FAILED and book.place(other) == FAILED
    assert updates[other]["error"] == f"not run: {first} failed, and its case with it"
    taken = [book.take(None, w, w, False, 3.0)[0] for w in (1, 2, 3)]
    assert sorted(t for t in taken if t) == sorted(u for u in ensemble if "/" in u and not u.endswith(case_id))


@settings(max_examples=150, deadline=None)
@given(events=st.lists(staged_event, max_size=60))
def test_units_run_only_after_what_they_need_and_fail_when_it_fails(tmp_path_factory, events):
    """A multi-stage run's units (a cascade-like chain a -> b, then the case's final unit)."""
    journal = Journal.open(str(tmp_path_factory.mktemp("j") / "journal.sqlite"))
    journal.start_run({}, [(0, "cpu", None)], dict.fromkeys(STAGED))
    book = CaseBook(STAGED_WORK, {}, {}, None, STAGED)
    for ev in events:
        if ev[0] == "take":
            _, updates = book.take(None, ev[1], ev[1], solo=ev[2], now=1.0)
        elif ev[0] == "finish":
            updates = book.finish(ev[1], 2.0)
        elif ev[0] == "charge":
            updates = book.charge(ev[1], "boom", final=ev[2], retries=1, solo=False, now=2.0)
        elif ev[0] == "release":
            updates = book.release([ev[1]])
        else:
            updates = book.fail_queued(book.queued_keys(), "gave up", 3.0)
        journal.apply(updates)

        queued = book.queued(any_key=True)
        total = len(book.flights) + queued + len(book.waiting) + len(book.done) + len(book.failed)
        assert total == len(STAGED), "each unit in exactly one place"
        for unit in list(book.flights) + list(book.done):
            assert all(n in book.done for n in STAGED[unit]), f"{unit} ran before what it needs"
        for unit, unmet in book.waiting.items():
            assert unmet == {n for n in STAGED[unit] if n not in book.done}
            assert not (unmet & set(book.failed)), f"{unit} waits for a unit that failed"
        for unit in [u for u in STAGED if book.place(u) == PENDING]:
            dependents = [d for d, needs in STAGED.items() if unit in needs]
            assert not dependents or not all(d in book.failed for d in dependents), f"{unit} serves nothing"
        states = dict(journal.db.execute("SELECT id, state FROM cases"))
        assert states == {u: book.place(u) for u in STAGED}
    journal.close()
