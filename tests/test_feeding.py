"""Which cases a worker gets: scheduler.py's pure feeding decisions (solo first, fair share,
give-back, takeover in the static schedule), tested on a case book without processes."""

from __future__ import annotations

from launcher.scheduler import (
    ASK_BACK,
    LOOKAHEAD,
    NO_MORE,
    NO_WORK,
    CaseBook,
    Feed,
    cases_for_new_worker,
    give_back_donor,
    key_for_new_worker,
    top_up,
)


def _book(work: dict[str, float], static: dict[str, int] | None = None) -> CaseBook:
    return CaseBook(work, {}, {}, static)


def test_a_suspected_case_goes_alone_to_a_new_worker_before_any_other():
    book = _book({"big": 9.0, "small": 1.0, "suspect": 2.0})
    book.take(None, 1, 0, solo=False, now=0.0)  # "big" to worker 1
    book.take(None, 1, 0, solo=False, now=0.0)  # "suspect" (the next largest)
    book.release(["suspect"], solo=True)
    taken = cases_for_new_worker(book, Feed(2, None, 0, False), 0.0, workers=2)
    assert taken.cases == ["suspect"] and taken.solo
    assert book.flights["suspect"].worker == 2 and book.place("small") == "pending"
    assert top_up(book, Feed(2, None, 0, True), 0.0, workers=2).cases == [], "alone until its case ends"


def test_a_new_worker_takes_the_largest_cases_within_a_fair_share_of_the_work_left():
    book = _book({"a": 10.0, "b": 5.0, "c": 3.0, "d": 2.0})
    first = cases_for_new_worker(book, Feed(1, None, 0, False), 0.0, workers=2)
    assert first.cases == ["a"], "10 of 20 left: its share; b would exceed it"
    second = cases_for_new_worker(book, Feed(2, None, 1, False), 0.0, workers=2)
    assert second.cases == ["b", "c", "d"] and len(second.cases) <= LOOKAHEAD + 1
    static = _book({"a": 10.0, "b": 5.0, "c": 3.0, "d": 2.0}, {"a": 0, "b": 0, "c": 0, "d": 0})
    assert cases_for_new_worker(static, Feed(1, 0, 0, False), 0.0, workers=2).cases == ["a", "b", "c"]


def test_top_up_keeps_lookahead_cases_not_started_beside_the_one_in_work():
    book = _book({f"c{i}": 1.0 for i in range(8)}, dict.fromkeys((f"c{i}" for i in range(8)), 0))
    feed = Feed(1, 0, 0, False)
    (first,) = cases_for_new_worker(book, feed, 0.0, workers=1).cases[:1]
    book.enter_stage(first, "predict", 0.0, "cpu", 0.0)
    held = [c for c in book.on_worker(1) if c != first]
    book.finish(first, 1.0)
    book.enter_stage(held[0], "predict", 1.0, "cpu", 1.0)
    top = top_up(book, feed, 1.0, workers=1)
    not_started = [c for c in book.on_worker(1) if book.flights[c].stage == "held"]
    assert len(top.cases) == 1 and len(not_started) == LOOKAHEAD


def test_an_idle_worker_says_no_more_only_when_no_case_can_come_back_to_its_queue():
    book = _book({"a": 2.0, "b": 1.0})
    book.take(None, 1, 0, solo=False, now=0.0)
    book.take(None, 1, 0, solo=False, now=0.0)
    book.enter_stage("a", "predict", 0.0, "cpu", 0.0)
    assert top_up(book, Feed(2, None, 1, False), 0.0, workers=2).then == ASK_BACK
    assert give_back_donor(book, Feed(2, None, 1, False), askable={1}) == (1, ["b"])
    assert give_back_donor(book, Feed(2, None, 1, False), askable=set()) is None, "already asked: not again"
    book.finish("a", 1.0)
    book.enter_stage("b", "predict", 1.0, "cpu", 1.0)
    assert top_up(book, Feed(2, None, 1, False), 1.0, workers=2).then == ASK_BACK, "b may still come back"
    book.finish("b", 2.0)
    assert top_up(book, Feed(2, None, 1, False), 2.0, workers=2).then == NO_MORE


def test_a_worker_holding_only_cases_it_has_not_started_is_not_asked_to_give_them_back():
    book = _book({"a": 2.0, "b": 1.0})
    book.take(None, 1, 0, solo=False, now=0.0)
    book.take(None, 1, 0, solo=False, now=0.0)
    assert give_back_donor(book, Feed(2, None, 1, False), askable={1}) is None


def test_in_the_static_schedule_a_finished_slot_takes_over_a_part_whose_slot_gave_up_or_rests():
    book = _book({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0, "b": 1, "c": 1})
    assert key_for_new_worker(book, 0, running=set(), unavailable=set()) == 0, "its own part first"
    book.take(0, 1, 0, solo=False, now=0.0)
    book.finish("a", 1.0)
    assert key_for_new_worker(book, 0, running=set(), unavailable=set()) == NO_WORK, "part 1's slot is fine"
    assert key_for_new_worker(book, 0, running=set(), unavailable={1}) == 1
    assert key_for_new_worker(book, 0, running={1}, unavailable={1}) == NO_WORK, "someone runs it already"
    dynamic = _book({"a": 1.0})
    assert key_for_new_worker(dynamic, 3, running={None}, unavailable=set()) is None
