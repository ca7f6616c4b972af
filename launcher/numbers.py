"""The numbers an operator plans with, all from one journal snapshot (Journal.snapshot): cases
in a person's words, the ETA, and durations as h:mm:ss. The progress line, the live table,
`status`, `status --json`, summary.json and the summary lines all read them from here, so they
never disagree.

States of a case, as people say them: done, failed, working (a worker is preprocessing,
predicting or exporting it), queued (handed to a worker, not started) and waiting (no worker has
it yet). A multi-stage run counts cases (its final units) first and its steps (every unit of work,
see stages.py) second."""

from __future__ import annotations

PERSON_STATES = ("done", "failed", "working", "queued", "waiting")
# SQL turning the journal's (state, stage) into a person's state
PERSON_STATE_SQL = (
    "CASE WHEN state='running' AND stage='held' THEN 'queued' WHEN state='running' THEN 'working' "
    "WHEN state='pending' THEN 'waiting' ELSE state END"
)
# What share of a case's work each stage is, before any case has finished to measure it
DEFAULT_SHARES = {"preprocess": 0.2, "predict": 0.6, "export": 0.2}
ETA_MIN_ELAPSED_S = 5.0  # a rate measured over less says nothing
# Before this share of the run's work is behind it, the ETA is a range (ETA_RANGE x the estimate):
# the first cases carry the workers' warm-up and say little of the mix of sizes to come.
ETA_SURE_FRACTION = 0.10
ETA_RANGE = (0.7, 1.4)


def counts(by_state: dict[str, int]) -> dict[str, int]:
    """Every person state (0 where none) and the total."""
    found = {state: by_state.get(state, 0) for state in PERSON_STATES}
    return {**found, "total": sum(found.values())}


def hms(seconds: float | None) -> str:
    """h:mm:ss, or "—" when it cannot be known yet."""
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def count_line(snapshot: dict) -> str:
    """ "5/12 cases done (14/36 steps), 1 failed, 2 working, 4 queued in workers, 1 waiting"."""
    cases = snapshot["cases"]
    steps = snapshot.get("steps")
    of_steps = f" ({steps['done']}/{steps['total']} steps)" if steps else ""
    line = f"{cases['done']}/{cases['total']} cases done{of_steps}, {cases['failed']} failed, "
    if "interrupted" in cases:  # a run that died (status._as_dead_run): its cases in flight
        line += f"{cases['interrupted']} interrupted, "
    if "interrupted" not in cases or cases["working"] or cases["queued"]:
        line += f"{cases['working']} working, {cases['queued']} queued in workers, "
    return line + f"{cases['waiting']} waiting"


def stage_shares(seconds: dict[str, float]) -> dict[str, float]:
    """Each stage's share of a case's work, from the cases done in this run (the time a prepared
    case waits for the device is the pipeline's overlap, not its work); defaults before any."""
    total = sum(seconds.values())
    if total <= 0:
        return dict(DEFAULT_SHARES)
    return {stage: value / total for stage, value in seconds.items()}


def in_flight_share(stage: str, step_done: int | None, step_total: int | None, shares: dict[str, float]) -> float:
    """How much of a working case's work is behind it: the stages before its own, half of a
    stage without steps, the sliding-window steps done of its prediction."""
    if stage == "preprocess":
        return shares["preprocess"] / 2
    if stage == "predict":
        steps = step_done / step_total if step_total else 0.0
        return shares["preprocess"] + shares["predict"] * min(1.0, steps)
    return shares["preprocess"] + shares["predict"] + shares["export"] / 2


def eta_s(work_left: float, work_done: float, in_flight: float, since: float | None, now: float) -> float | None:
    """Seconds left: the work left (voxels x channels, less what is behind the cases in flight)
    over the run's rate of work since its first prediction started (`since`), the cases in flight
    counted by their progress. One rate over the whole run: workers that finish cases in step
    move it smoothly (a case's work counts while it is in flight, not all at once when it ends).
    None until there is a rate (`ETA_MIN_ELAPSED_S`)."""
    if since is None or now - since < ETA_MIN_ELAPSED_S:
        return None
    behind = work_done + in_flight
    if behind <= 0:
        return None
    return max(0.0, work_left - in_flight) * (now - since) / behind


def eta_range_s(eta: float | None, work_left: float, work_done: float, in_flight: float) -> list[int] | None:
    """[low, high] seconds while less than ETA_SURE_FRACTION of the run's work is behind it (an
    honest "about 20-40 min" instead of a number that moves 2x), else None."""
    behind = work_done + in_flight
    if eta is None or behind >= ETA_SURE_FRACTION * (work_done + work_left):
        return None
    return [round(eta * ETA_RANGE[0]), round(eta * ETA_RANGE[1])]


def eta_text(snapshot: dict) -> str:
    """ "0:12:30", or "about 0:10:00-0:20:00" early in a run."""
    low_high = snapshot.get("eta_range_s")
    if low_high:
        return f"about {hms(low_high[0])}-{hms(low_high[1])}"
    return hms(snapshot.get("eta_s"))


def rate_per_min(snapshot: dict) -> float | None:
    """Units of work finished per minute in this run since its first prediction started (to its
    end, once it ended)."""
    until = (snapshot.get("last_run") or {}).get("ended") or snapshot["at"]
    return per_minute(snapshot.get("done_this_run", 0), snapshot.get("working_since"), until)


def per_minute(done: int, since: float | None, now: float) -> float | None:
    """The one rate: `done` units over the minutes from `since` (the run's first prediction) to
    `now`, for the run and for each part alike (the parts' rates add up to the run's)."""
    if since is None or not done or now - since <= 0:
        return None
    return done * 60 / (now - since)


def progress_line(snapshot: dict, elapsed_s: float | None = None) -> str:
    """The one line: counts, ETA, elapsed, rate."""
    elapsed = snapshot.get("elapsed_s") if elapsed_s is None else elapsed_s
    rate = rate_per_min(snapshot)
    per = "steps" if snapshot.get("steps") else "cases"
    rate_text = f", {rate:.1f} {per}/min" if rate else ""
    cases = snapshot["cases"]
    left = cases["working"] + cases["queued"] + cases["waiting"]
    eta = f"ETA {eta_text(snapshot)}, " if left else ""  # a finished run has none
    return f"{count_line(snapshot)}; {eta}elapsed {hms(elapsed)}{rate_text}"


def busy_pct(predicting_s: float, wall_s: float) -> float | None:
    """A part's busy %: its attempts' seconds predicting over the wall time of every run on this
    OUT (a resumed night is several runs; the gaps between them are no one's time). The summary
    lines, summary.json and the report read this one figure."""
    return round(100.0 * predicting_s / wall_s, 1) if wall_s > 0 else None


def stage_text(stage: str | None, progress_pct: int | None) -> str:
    """ "predict 45%", "export", or "-"."""
    if stage is None:
        return "-"
    return f"{stage} {progress_pct}%" if progress_pct is not None else stage
