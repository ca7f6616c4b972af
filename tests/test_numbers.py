"""numbers.py, the one place that says what the operator's numbers mean: counts in a person's
words, the ETA's rate and its cases in flight, h:mm:ss."""

from __future__ import annotations

from launcher import numbers


def test_the_eta_is_the_work_left_over_the_runs_rate_with_the_cases_in_flight_by_their_progress():
    # nothing to go by yet: no case started, or started under ETA_MIN_ELAPSED_S ago
    assert numbers.eta_s(100.0, 0.0, 0.0, None, 10.0) is None
    assert numbers.eta_s(100.0, 0.0, 5.0, 8.0, 10.0) is None
    # 10 s since the first case started, 20 units of work behind (5 of them in flight): 80 left
    assert numbers.eta_s(100.0, 15.0, 5.0, 0.0, 10.0) == 95.0 * 10.0 / 20.0


def test_workers_that_finish_cases_in_step_do_not_make_the_eta_jump():
    """4 workers, 40 cases of 1 unit taking 10 s each, in step (the defect: right after the first
    case ended, the others counted as new progress and the ETA fell 4x). At t=9.9 s each case in
    flight is 95 % behind it; at t=10.1 s all four are done and the next four just started."""
    before = numbers.eta_s(40.0, 0.0, 4 * 0.95, 0.0, 9.9)
    after = numbers.eta_s(36.0, 4.0, 4 * 0.01, 0.0, 10.1)
    truth = 90.0
    assert abs(before - truth) / truth < 0.1 and abs(after - truth) / truth < 0.1


def test_the_eta_is_a_range_until_a_tenth_of_the_work_is_behind_the_run():
    assert numbers.eta_range_s(100.0, 95.0, 4.0, 1.0) == [70, 140]
    assert numbers.eta_range_s(100.0, 90.0, 9.0, 1.0) is None
    text = numbers.progress_line({**_counts_snapshot(), "eta_s": 100, "eta_range_s": [70, 140]}, 5.0)
    assert "ETA about 0:01:10-0:02:20" in text


def _counts_snapshot() -> dict:
    return {"cases": numbers.counts({"done": 1, "working": 2, "waiting": 7}), "at": 0.0}


def test_a_case_in_flight_counts_by_its_stage_and_its_sliding_window_steps():
    shares = numbers.stage_shares({"preprocess": 1.0, "predict": 6.0, "export": 3.0})
    assert numbers.in_flight_share("preprocess", None, None, shares) == 0.05
    assert numbers.in_flight_share("predict", 0, 10, shares) == 0.1
    assert abs(numbers.in_flight_share("predict", 5, 10, shares) - 0.4) < 1e-9
    assert abs(numbers.in_flight_share("export", None, None, shares) - 0.85) < 1e-9
    assert numbers.stage_shares({"preprocess": 0.0, "predict": 0.0, "export": 0.0}) == numbers.DEFAULT_SHARES


def test_counts_are_in_a_persons_words_cases_first_then_steps():
    cases = numbers.counts({"done": 2, "working": 0})
    steps = numbers.counts({"done": 5, "working": 1})
    snapshot = {"cases": cases, "steps": steps, "eta_s": None, "at": 0.0}
    assert numbers.count_line(snapshot).startswith("2/2 cases done (5/6 steps), 0 failed, 0 working")
    assert "ETA" not in numbers.progress_line(snapshot, 65.0), "nothing left of the cases: no ETA"
    assert numbers.hms(3725.4) == "1:02:05" and numbers.hms(None) == "—" and numbers.hms(-3) == "0:00:00"


def test_the_snapshot_leaves_kept_outputs_out_of_the_rate_and_gives_parts_no_eta_while_a_shared_queue_waits(tmp_path):
    from launcher.journal import Journal

    journal = Journal.open(str(tmp_path / "journal.sqlite"))
    run = journal.start_run({}, [(0, "cpu", None), (1, "cpu", None)], dict.fromkeys("abcdef", 10.0))
    t0 = journal.db.execute("SELECT started FROM runs").fetchone()[0]
    journal.run_working(run, t0)
    journal.part_worker(0, 1, "running")
    journal.part_worker(1, 2, "running")
    done = {"state": "done", "part": 0, "started": t0, "ended": t0 + 20, "seconds": 20.0}
    kept = {"state": "done", "part": 1, "ended": t0 + 1, "seconds": None}  # an output verified and kept
    working = {"state": "running", "stage": "predict", "part": 1, "started": t0 + 20}
    journal.apply([("a", done), ("b", kept), ("c", working)])
    snapshot = journal.snapshot(now=t0 + 30)
    assert snapshot["done_this_run"] == 1 and snapshot["work_done_this_run"] == 10.0, "the kept one took no work"
    assert snapshot["cases"]["waiting"] == 3 and snapshot["eta_s"] is not None
    assert all(p["eta_s"] is None for p in snapshot["parts"]), "which part gets the waiting cases is not known"
    journal.apply([(c, {"state": "running", "stage": "held", "part": 1}) for c in "def"])
    parts = {p["part_id"]: p for p in journal.snapshot(now=t0 + 30)["parts"]}
    assert parts[0]["eta_s"] is None and parts[1]["eta_s"] is not None, "a finished part has none, a busy one has"
    journal.close()


def test_a_multi_stage_case_whose_final_unit_failed_is_failed_not_also_working(tmp_path):
    """Its other member may still be predicted (it had started): the case counts once, as failed,
    and nothing is negative (the defect: "-1 waiting", and the ETA gone with it)."""
    from launcher.journal import Journal

    journal = Journal.open(str(tmp_path / "journal.sqlite"))
    units = ["2d/a", "3d/a", "a", "2d/b", "3d/b", "b"]
    journal.start_run({"members": ["2d", "3d"], "final_stage": "final"}, [(0, "cpu", None)], dict.fromkeys(units, 1.0))
    journal.apply(
        [
            ("3d/a", {"state": "failed", "part": 0}),
            ("a", {"state": "failed", "part": 0}),
            ("2d/a", {"state": "running", "stage": "predict", "part": 0}),
        ]
    )
    cases = journal.snapshot()["cases"]
    assert cases == {"done": 0, "failed": 1, "working": 0, "queued": 0, "waiting": 1, "total": 2}
    journal.close()
