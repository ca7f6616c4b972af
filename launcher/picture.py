"""The run's picture: OUT/.nnunet-launch/report.html (and report.png) drawn from the journal.

One lane per worker slot (the journal's parts); each case attempt a bar from `started` to
`ended`, split by its stage seconds, after a thin segment for its time queued in the worker
(`taken` -> `started`); failed and released attempts marked; worker deaths, spawns and the like
as markers; GPU utilisation and memory below when the run sampled them; the summary table beside.

The HTML is self-contained (inline CSS and SVG, no script, nothing fetched), so it opens from a
cluster's shared disk or an e-mail attachment. Everything the journal holds is user data (case
ids, errors, paths) and is escaped. In the SVG, the rect of class "attempt" is the attempt's bar
and carries its data (data-case, data-part, data-outcome); the stage rects under it are its fill.

Reads only: the journal given (the run's own at its end, or a read-only one for `report`).
"""

from __future__ import annotations

import html
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass

from launcher.errors import LauncherError
from launcher.journal import Journal, lock_info
from launcher.numbers import busy_pct, hms
from launcher.outputs import journal_path, lock_path, tmp_dir, write_text_atomically
from launcher.status import run_states

HTML_FILE, PNG_FILE = "report.html", "report.png"
STAGES = ("preprocess", "wait", "predict", "export")
STAGE_COLOURS = {"preprocess": "#4e79a7", "wait": "#bab0ac", "predict": "#59a14f", "export": "#f28e2b"}
UNKNOWN_STAGE_COLOUR = "#9c755f"  # an attempt without stage seconds whose last stage is none of the above
QUEUED_COLOUR = "#d9d9d9"
FAILED_COLOUR, RELEASED_COLOUR = "#d62728", "#7f7f7f"
# event kinds drawn, with the marker's colour; those without a part are a line across every lane
EVENT_COLOURS = {
    "worker_died": "#d62728",
    "spawn": "#2ca02c",
    "gave_up": "#000000",
    "device_rests": "#ff7f0e",
    "case_error": "#e377c2",
    "interrupted": "#1f77b4",
    "stopped": "#1f77b4",
}
EVENT_NAMES = {
    "worker_died": "worker died",
    "spawn": "worker started",
    "gave_up": "slot gave up",
    "device_rests": "device rests",
    "case_error": "case error",
    "interrupted": "interrupted",
    "stopped": "stopped",
}

# SVG geometry (pixels)
LEFT, PLOT_W, RIGHT = 190, 900, 20
TOP, LANE_H, BAR_Y, BAR_H = 26, 26, 6, 16
ROW_H = 20  # a further row of bars in a lane (cases a worker's pipeline overlaps)


def lane_height(lane: dict) -> int:
    return LANE_H + (lane.get("rows", 1) - 1) * ROW_H


GPU_H, GPU_GAP = 56, 14
WIDTH = LEFT + PLOT_W + RIGHT


@dataclass
class Picture:
    """What the journal says, as the picture needs it (all times epoch seconds)."""

    source: str  # the state folder, shown in the title
    runs: list[dict]  # id, started, ended, exit_code, end (ended, or now / last seen when unended)
    t0: float
    t1: float
    lanes: list[dict]  # part, gpu, gpu_uuid, restarts
    attempts: list[dict]  # rows of the attempts table
    events: list[dict]  # ts, kind, part, case_id, message
    samples: dict[str, list[tuple]]  # gpu uuid -> [(ts, util, mem_used, mem_total)]
    case_counts: dict[str, int]  # state -> cases
    part_cases: dict[int, dict[str, int]]  # part -> state -> cases
    failed_cases: list[tuple[str, str]]  # (case, why), every case that failed for good
    facts: dict  # what summary.json records of the run (model, folders, host, versions), {} without one


# --- reading -----------------------------------------------------------------------------------
def read_picture(journal: Journal, source: str, live: bool, facts: dict | None = None) -> Picture:
    """One read transaction over the journal. Only what the runs present did: `--fresh` clears
    the runs but leaves older attempts and GPU samples in their tables."""
    db = journal.db
    db.execute("BEGIN")
    try:
        runs = _rows(db, "SELECT id, started, ended, exit_code FROM runs WHERE started IS NOT NULL ORDER BY id")
        attempts = _rows(
            db,
            "SELECT * FROM attempts WHERE run IN (SELECT id FROM runs) AND started IS NOT NULL "
            "AND ended IS NOT NULL ORDER BY started, id",
        )
        first = runs[0]["started"] if runs else float("inf")  # no run: nothing to draw
        events = _rows(
            db,
            f"SELECT ts, kind, part, case_id, message FROM events WHERE ts >= ? AND kind IN "
            f"({', '.join('?' * len(EVENT_COLOURS))}) ORDER BY ts, id",
            (first, *EVENT_COLOURS),
        )
        samples: dict[str, list[tuple]] = {}
        for ts, uuid, *values in db.execute(
            "SELECT ts, gpu_uuid, util, mem_used, mem_total FROM gpu_samples WHERE ts >= ? ORDER BY ts", (first,)
        ):
            samples.setdefault(uuid, []).append((ts, *values))
        parts = _rows(db, "SELECT part_id AS part, gpu, gpu_uuid, restarts FROM parts ORDER BY part_id")
        case_counts: dict[str, int] = {}
        part_cases: dict[int, dict[str, int]] = {}
        for part, state, count in db.execute("SELECT part, state, COUNT(*) FROM cases GROUP BY part, state"):
            case_counts[state] = case_counts.get(state, 0) + count
            if part is not None:
                part_cases.setdefault(part, {})[state] = count
        failed_cases = list(db.execute("SELECT id, IFNULL(error, '') FROM cases WHERE state='failed' ORDER BY id"))
    finally:
        db.execute("COMMIT")

    # a run without an end is still going (`live`: its launcher holds the lock) or was killed:
    # then it ended, as far as anyone knows, at the last thing it wrote
    t0 = runs[0]["started"] if runs else time.time()
    last_seen = max(
        [a["ended"] for a in attempts] + [e["ts"] for e in events] + [s[-1][0] for s in samples.values()] + [t0]
    )
    for i, run in enumerate(runs):
        latest = i == len(runs) - 1
        run["end"] = run["ended"] or (time.time() if latest and live else max(run["started"], last_seen))
    t1 = max([r["end"] for r in runs] + [last_seen])

    # lanes: this run's parts, and any part an older run's attempts or events name
    lanes = {p["part"]: p for p in parts}
    for part in {a["part"] for a in attempts} | {e["part"] for e in events}:
        if part is not None and part not in lanes:
            lanes[part] = {"part": part, "gpu": None, "gpu_uuid": None, "restarts": None}
    ordered = [lanes[k] for k in sorted(lanes)]
    for lane in ordered:
        lane["rows"] = stack_rows([a for a in attempts if a["part"] == lane["part"]])
    return Picture(
        source, runs, t0, t1, ordered, attempts, events, samples, case_counts, part_cases, failed_cases, facts or {}
    )


def stack_rows(attempts: list[dict]) -> int:
    """Give each of a lane's attempts a row (`a["row"]`): the first row free when it was handed to
    the worker. A worker's pipeline overlaps cases (one predicted while the next is preprocessed
    and the last exported), so one row would hide all but the top bar. Returns the rows used."""
    row_ends: list[float] = []
    for a in sorted(attempts, key=lambda a: (_begin(a), a["ended"])):
        free = next((i for i, end in enumerate(row_ends) if end <= _begin(a)), len(row_ends))
        row_ends[free : free + 1] = [a["ended"]]
        a["row"] = free
    return max(len(row_ends), 1)


def _begin(a: dict) -> float:
    return min(a["taken"], a["started"]) if a["taken"] is not None else a["started"]


def _rows(db: sqlite3.Connection, sql: str, args: tuple = ()) -> list[dict]:
    cursor = db.execute(sql, args)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


# --- the summary -------------------------------------------------------------------------------
def summarize(picture: Picture) -> dict:
    """Counts, wall time (the runs' durations added up: gaps between runs are no one's time), per
    lane done/failed/restarts and busy % (its predicting seconds over the wall time), and per
    stage the seconds the done attempts spent in it."""
    wall = sum(r["end"] - r["started"] for r in picture.runs)
    stage_totals = {
        stage: sum(a[f"{stage}_s"] or 0.0 for a in picture.attempts if a["outcome"] == "done")
        for stage in ("queued", *STAGES)
    }
    lanes = []
    for lane in picture.lanes:
        mine = [a for a in picture.attempts if a["part"] == lane["part"]]
        cases = picture.part_cases.get(lane["part"], {})
        predict = sum(a["predict_s"] or 0.0 for a in mine)
        lanes.append(
            {
                **lane,
                "done": cases.get("done", 0),
                "failed": cases.get("failed", 0),
                "failed_attempts": sum(a["outcome"] == "failed" for a in mine),
                "released_attempts": sum(a["outcome"] == "released" for a in mine),
                "deaths": sum(e["kind"] == "worker_died" and e["part"] == lane["part"] for e in picture.events),
                "busy_pct": busy_pct(predict, wall),
            }
        )
    counts = picture.case_counts
    devices = {lane["gpu_uuid"] or f"cpu-{lane['part']}" for lane in picture.lanes} or {"cpu"}
    gpus = all(lane["gpu_uuid"] for lane in picture.lanes) and bool(picture.lanes)
    return {
        "done": counts.get("done", 0),
        "failed": counts.get("failed", 0),
        "total": sum(counts.values()),
        "wall_s": wall,
        "cases_per_hour": counts.get("done", 0) * 3600 / wall if wall > 0 else None,
        # what the run cost: each GPU (or CPU worker) held for the wall time
        "device_hours": len(devices) * wall / 3600,
        "device_kind": "GPU" if gpus else "CPU worker",
        "stage_totals": stage_totals,
        "lanes": lanes,
    }


def title_lines(picture: Picture, summary: dict) -> tuple[str, list[tuple[str, str]]]:
    """The report's title and its facts as (name, value) rows: what was predicted with what, where,
    when and by which versions, and the totals. The HTML's header and the PNG's title read this."""
    f = picture.facts
    model = f.get("model_folder") or "?"
    folds = ", ".join(str(x) for x in f.get("folds") or []) or "?"
    # nnU-Net's results tree: <dataset>/<trainer>__<plans>__<configuration>
    trainer_folder = model.rstrip(os.sep)
    name = f"{os.path.basename(os.path.dirname(trainer_folder))} / {os.path.basename(trainer_folder)}"
    title = f"nnunet-launch: {name} ({f.get('configuration', '?')}, folds {folds})"
    versions = f.get("versions") or {}
    runs = picture.runs
    when = f"{clock(runs[0]['started'])} to {clock(runs[-1]['end'])}" if runs else "no run"
    rate = summary["cases_per_hour"]
    rows = [
        ("model folder", model),
        ("configuration", f"{f.get('configuration', '?')}, folds {folds}, checkpoint {f.get('checkpoint', '?')}"),
        ("profile", str(f.get("profile", "?"))),
        ("input folder", f.get("input_folder") or "?"),
        ("output folder", f.get("output_folder") or "?"),
        ("host", f.get("host") or "?"),
        ("when", f"{when} ({len(runs)} run(s))"),
        (
            "versions",
            ", ".join(f"{name} {versions.get(name) or '?'}" for name in ("nnunet-launch", "nnunetv2", "torch")),
        ),
        (
            "cases",
            f"{summary['done']} done, {summary['failed']} failed, {summary['total']} in all",
        ),
        (
            "throughput",
            f"{hms(summary['wall_s'])} wall, {'-' if rate is None else f'{rate:.1f}'} cases per hour, "
            f"{summary['device_hours']:.2f} {summary['device_kind']} hours",
        ),
    ]
    if f.get("skipped_inputs"):
        shown = "; ".join(f["skipped_inputs"][:5]) + (" ..." if len(f["skipped_inputs"]) > 5 else "")
        rows.append((f"inputs skipped ({len(f['skipped_inputs'])}, --skip-bad-inputs)", shown))
    busy = [f"part {lane['part']} {lane['busy_pct']:.0f}%" for lane in summary["lanes"] if lane["busy_pct"] is not None]
    if busy:
        rows.append((f"busy ({summary['device_kind']} predicting)", ", ".join(busy)))
    return title, rows


# --- text helpers ------------------------------------------------------------------------------
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def esc(value: object) -> str:
    """Journal text for HTML and SVG: escaped, and characters XML forbids (a traceback's terminal
    colour codes) replaced, so the SVG stays parseable."""
    return html.escape(_NOT_XML.sub("\ufffd", str(value)), quote=True)


def clock(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch is not None else "-"


def tick_step(span: float, most: int = 10) -> float:
    """A round step (seconds) giving at most `most` ticks over `span`."""
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200):
        if span / step <= most:
            return step
    return 86400 * max(1, int(span / 86400 / most) + 1)


def lane_label(lane: dict) -> str:
    return f"part {lane['part']}" + (f" · {lane['gpu']}" if lane["gpu"] else "")


def attempt_title(a: dict) -> str:
    stages = ", ".join(f"{s} {a[f'{s}_s']:.1f} s" for s in ("queued", *STAGES) if a[f"{s}_s"] is not None)
    lines = [
        f"{a['case_id']}: {a['outcome']} (attempt {a['attempt']}, run {a['run']}, part {a['part']})",
        f"{clock(a['started'])} to {clock(a['ended'])}, {a['ended'] - a['started']:.1f} s",
        stages or f"last stage: {a['last_stage'] or 'unknown'}",
    ]
    if a["error"]:
        lines.append(str(a["error"])[:500])
    return "\n".join(lines)


# --- the SVG -----------------------------------------------------------------------------------
def render_svg(picture: Picture) -> str:
    span = max(picture.t1 - picture.t0, 1.0)

    def x(t: float) -> float:
        return LEFT + (min(max(t, picture.t0), picture.t1) - picture.t0) / span * PLOT_W

    gpus = [u for u in _gpu_order(picture) if picture.samples.get(u)]
    tops = [TOP]
    for lane in picture.lanes:
        tops.append(tops[-1] + lane_height(lane))
    lanes_bottom = tops[-1] if picture.lanes else TOP + LANE_H
    gpu_top = lanes_bottom + 40
    plot_bottom = gpu_top + len(gpus) * (GPU_H + GPU_GAP) if gpus else lanes_bottom
    legend_top = plot_bottom + 34
    height = legend_top + 46
    out = [
        f'<svg class="picture" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        'font-family="sans-serif" font-size="11">',
        "<defs>"
        f'<pattern id="hatch-failed" patternUnits="userSpaceOnUse" width="5" height="5" '
        f'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="5" stroke="{FAILED_COLOUR}" '
        'stroke-width="2"/></pattern>'
        '<pattern id="hatch-released" patternUnits="userSpaceOnUse" width="5" height="5" '
        'patternTransform="rotate(-45)"><line x1="0" y1="0" x2="0" y2="5" stroke="#ffffff" '
        'stroke-width="2.5"/></pattern></defs>',
    ]
    # the runs, as bands behind the lanes
    for run in picture.runs:
        x0, x1 = x(run["started"]), x(run["end"])
        out.append(
            f'<rect class="run" data-run="{run["id"]}" x="{x0:.1f}" y="{TOP - 14}" width="{max(x1 - x0, 0.5):.1f}" '
            f'height="{plot_bottom - TOP + 14}"><title>run {run["id"]}: {clock(run["started"])} to '
            f"{clock(run['ended']) if run['ended'] else 'no end recorded'}"
            f"{'' if run['exit_code'] is None else ', exit ' + str(run['exit_code'])}</title></rect>"
            f'<text x="{x0 + 2:.1f}" y="{TOP - 4}" class="runlabel">run {run["id"]}</text>'
        )
    out += _axis(picture, x, lanes_bottom)
    labels = stage_labels(picture)
    for i, lane in enumerate(picture.lanes):
        out += _lane(picture, lane, tops[i], x, labels)
    for event in picture.events:  # without a part: it concerns every lane
        if event["part"] is None:
            ex = x(event["ts"])
            out.append(
                f'<line class="event" data-kind="{esc(event["kind"])}" x1="{ex:.1f}" y1="{TOP}" x2="{ex:.1f}" '
                f'y2="{lanes_bottom}" stroke="{EVENT_COLOURS[event["kind"]]}" stroke-dasharray="4 3" '
                f'stroke-width="1.5"><title>{esc(_event_title(event))}</title></line>'
            )
    if gpus:
        out += _gpu_panel(picture, gpus, gpu_top, x)
        out += _axis(picture, x, plot_bottom - GPU_GAP)
    out += _legend(picture, legend_top, bool(gpus))
    out.append("</svg>")
    return "\n".join(out)


def _axis(picture: Picture, x, y: float) -> list[str]:
    """Ticks in h:mm:ss from the first run's start, with grid lines up to the lanes' top."""
    step = tick_step(picture.t1 - picture.t0)
    out = [f'<line class="axis" x1="{LEFT}" y1="{y}" x2="{LEFT + PLOT_W}" y2="{y}"/>']
    k = 0
    while picture.t0 + k * step <= picture.t1 + 1e-6:
        tx = x(picture.t0 + k * step)
        out.append(
            f'<line class="tick" x1="{tx:.1f}" y1="{y}" x2="{tx:.1f}" y2="{y + 4}"/>'
            f'<text x="{tx:.1f}" y="{y + 15}" text-anchor="middle">{hms(k * step)}</text>'
        )
        k += 1
    return out


def _lane(picture: Picture, lane: dict, y: float, x, labels: dict) -> list[str]:
    part = esc(lane["part"])
    out = [
        f'<g class="lane" data-part="{part}">',
        f'<rect class="lanebg" x="{LEFT}" y="{y}" width="{PLOT_W}" height="{lane_height(lane)}"/>',
        f'<text x="{LEFT - 6}" y="{y + BAR_Y + BAR_H - 4}" text-anchor="end">{esc(lane_label(lane))}</text>',
    ]
    for i, a in enumerate(picture.attempts):
        if a["part"] != lane["part"]:
            continue
        case = esc(a["case_id"])
        bar_y = y + BAR_Y + a["row"] * ROW_H
        if a["taken"] is not None and a["taken"] < a["started"]:
            qx = x(a["taken"])
            out.append(
                f'<rect class="queued" data-case="{case}" x="{qx:.1f}" y="{bar_y + BAR_H / 2 - 2}" '
                f'width="{max(x(a["started"]) - qx, 0.5):.1f}" height="4"/>'
            )
        for stage, start, end in stage_segments(a):
            sx = x(start)
            out.append(
                f'<rect class="stage s-{esc(stage)}" data-case="{case}" data-stage="{esc(stage)}" x="{sx:.1f}" '
                f'y="{bar_y}" width="{max(x(end) - sx, 0.5):.1f}" height="{BAR_H}"/>'
            )
        ax = x(a["started"])
        out.append(
            f'<rect class="attempt" data-case="{case}" data-part="{part}" data-outcome="{esc(a["outcome"])}" '
            f'data-attempt="{esc(a["attempt"])}" x="{ax:.1f}" y="{bar_y}" '
            f'width="{max(x(a["ended"]) - ax, 0.5):.1f}" height="{BAR_H}"><title>{esc(attempt_title(a))}</title></rect>'
        )
        for stage, start, end in labels.get(i, ()):
            out.append(
                f'<text class="stagelabel" x="{(x(start) + x(end)) / 2:.1f}" y="{bar_y + BAR_H - 3}" '
                f'text-anchor="middle">{esc(stage)}</text>'
            )
    for event in picture.events:
        if event["part"] == lane["part"]:  # a death at the lane's foot: never under the next start's triangle
            below = event["kind"] == "worker_died"
            out.append(_marker(event, x(event["ts"]), y + (lane_height(lane) - 6 if below else BAR_Y)))
    out.append("</g>")
    return out


def stage_labels(picture: Picture, min_share: float = 0.06) -> dict[int, list[tuple[str, float, float]]]:
    """Where to write each stage's name on the chart itself, so that it reads without the legend:
    each stage's longest segment, where it is wide enough, as {attempt index: [(stage, start, end)]}."""
    span = max(picture.t1 - picture.t0, 1e-9)
    best: dict[str, tuple[int, float, float]] = {}
    for i, a in enumerate(picture.attempts):
        for stage, start, end in stage_segments(a) if a["outcome"] == "done" else ():
            longest = best.get(stage)
            if (end - start) / span >= min_share and (longest is None or end - start > longest[2] - longest[1]):
                best[stage] = (i, start, end)
    labels: dict[int, list[tuple[str, float, float]]] = {}
    for stage, (i, start, end) in best.items():
        labels.setdefault(i, []).append((stage, start, end))
    return labels


def stage_segments(a: dict) -> list[tuple[str, float, float]]:
    """(stage, start, end) for an attempt's bar: its stage seconds one after the other from
    `started` (cut at `ended`); without any, one segment of its last stage."""
    seconds = [(s, a[f"{s}_s"]) for s in STAGES if a[f"{s}_s"]]
    if not seconds:
        return [(a["last_stage"] or "unknown", a["started"], a["ended"])]
    out, t = [], a["started"]
    for stage, s in seconds:
        end = min(t + s, a["ended"])
        if end > t:
            out.append((stage, t, end))
        t = end
    return out


def _marker(event: dict, mx: float, my: float) -> str:
    kind, colour = event["kind"], EVENT_COLOURS[event["kind"]]
    shapes = {
        "worker_died": f'd="M{mx - 4:.1f},{my - 4:.1f} l8,8 m0,-8 l-8,8" fill="none" stroke="{colour}" '
        'stroke-width="2"',
        "spawn": f'd="M{mx:.1f},{my - 5:.1f} l4,6 h-8 z" fill="{colour}"',
        "gave_up": f'd="M{mx - 4:.1f},{my - 4:.1f} h8 v8 h-8 z" fill="{colour}"',
        "device_rests": f'd="M{mx:.1f},{my - 5:.1f} l4,5 l-4,5 l-4,-5 z" fill="{colour}"',
    }
    shape = shapes.get(kind, f'd="M{mx - 3:.1f},{my:.1f} a3,3 0 1,0 6,0 a3,3 0 1,0 -6,0" fill="{colour}"')
    part = esc(event["part"])
    return (
        f'<path class="event" data-kind="{esc(kind)}" data-part="{part}" {shape}>'
        f"<title>{esc(_event_title(event))}</title></path>"
    )


def _event_title(event: dict) -> str:
    where = f" part {event['part']}" if event["part"] is not None else ""
    case = f" {event['case_id']}" if event["case_id"] else ""
    return f"{clock(event['ts'])} {EVENT_NAMES[event['kind']]}{where}{case}: {event['message'] or ''}"


def _gpu_order(picture: Picture) -> list[str]:
    """The sampled GPUs, in the order of the lanes that use them, then any other."""
    order = [lane["gpu_uuid"] for lane in picture.lanes if lane["gpu_uuid"]]
    return list(dict.fromkeys(order + sorted(picture.samples)))


def gpu_label(picture: Picture, uuid: str) -> str:
    lanes = [lane for lane in picture.lanes if lane["gpu_uuid"] == uuid]
    name = next((lane["gpu"] for lane in lanes if lane["gpu"]), uuid[:16])
    return f"{name} (part {', '.join(str(lane['part']) for lane in lanes)})" if lanes else name


def _gpu_panel(picture: Picture, gpus: list[str], top: float, x) -> list[str]:
    out = [
        f'<g class="gpu-panel"><text x="{LEFT}" y="{top - 8}" class="paneltitle">'
        "GPU utilisation and memory used (0-100 %)</text>"
    ]
    for i, uuid in enumerate(gpus):
        y = top + i * (GPU_H + GPU_GAP)
        util, mem = [], []
        for ts, u, used, total in picture.samples[uuid]:
            if u is not None:
                util.append(f"{x(ts):.1f},{y + GPU_H * (1 - min(u, 100) / 100):.1f}")
            if used is not None and total:
                mem.append(f"{x(ts):.1f},{y + GPU_H * (1 - min(used / total, 1.0)):.1f}")
        out += [
            f'<g class="gpu" data-gpu="{esc(uuid)}">',
            f'<rect class="lanebg" x="{LEFT}" y="{y}" width="{PLOT_W}" height="{GPU_H}"/>',
            f'<text x="{LEFT - 6}" y="{y + GPU_H / 2 + 4}" text-anchor="end">{esc(gpu_label(picture, uuid))}</text>',
            f'<polyline class="util" points="{" ".join(util)}"/>',
            f'<polyline class="mem" points="{" ".join(mem)}"/>',
            "</g>",
        ]
    out.append("</g>")
    return out


def _legend(picture: Picture, top: float, gpus: bool) -> list[str]:
    """What the chart shows, and only that (no marker that never occurs, no GPU line on the CPU)."""
    outcomes = {a["outcome"] for a in picture.attempts}
    kinds = {e["kind"] for e in picture.events if e["part"] is not None}
    items = [(f'<rect class="stage s-{s}" x="0" y="0" width="14" height="10"/>', s) for s in STAGES]
    items.append(('<rect class="queued" x="0" y="3" width="14" height="4"/>', "queued in the worker"))
    if "failed" in outcomes:
        shape = '<rect class="attempt" data-outcome="failed" x="0" y="0" width="14" height="10"/>'
        items.append((shape, "failed attempt"))
    if "released" in outcomes:
        shape = (
            '<rect class="stage s-predict" x="0" y="0" width="14" height="10"/>'
            '<rect class="attempt" data-outcome="released" x="0" y="0" width="14" height="10"/>'
        )
        items.append((shape, "released (requeued)"))
    items += [
        (_marker({"kind": k, "part": None, "ts": 0, "case_id": None, "message": None}, 7, 5), EVENT_NAMES[k])
        for k in ("worker_died", "spawn", "gave_up", "device_rests", "case_error")
        if k in kinds
    ]
    if any(e["part"] is None for e in picture.events):
        shape = '<line x1="7" y1="-2" x2="7" y2="12" stroke="#1f77b4" stroke-dasharray="4 3" stroke-width="1.5"/>'
        items.append((shape, "interrupted / stopped"))
    if gpus:  # a CPU run has no GPU panel
        items += [
            ('<line class="util" x1="0" y1="5" x2="14" y2="5"/>', "GPU utilisation"),
            ('<line class="mem" x1="0" y1="5" x2="14" y2="5"/>', "GPU memory used"),
        ]
    out, per_row, col_w = ['<g class="legend">'], 8, (WIDTH - 20) / 8
    for i, (shape, text) in enumerate(items):
        lx, ly = 10 + (i % per_row) * col_w, top + (i // per_row) * 20
        # legend shapes are not attempts: the tests and readers find attempts by class in lanes
        out.append(f'<g transform="translate({lx:.0f},{ly})">{shape}<text x="18" y="9">{esc(text)}</text></g>')
    out.append("</g>")
    return out


# --- the HTML ----------------------------------------------------------------------------------
_STAGE_CSS = "".join(f"svg .stage.s-{stage}{{fill:{colour}}}" for stage, colour in STAGE_COLOURS.items())
CSS = (
    "body{font-family:sans-serif;margin:16px;color:#222}"
    ".layout{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}"
    "table{border-collapse:collapse;margin-bottom:14px;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f2f2f2}"
    "td.l,th.l{text-align:left}.note{color:#a33}"
    "svg .run{fill:#f6f8fb;stroke:#c9d3e0;stroke-dasharray:2 2}svg .runlabel{fill:#567}"
    "svg .lanebg{fill:none;stroke:#eee}svg .axis,svg .tick{stroke:#888}"
    f"svg .queued{{fill:{QUEUED_COLOUR}}}svg .stage{{fill:{UNKNOWN_STAGE_COLOUR}}}{_STAGE_CSS}"
    "svg rect.attempt{fill:none;stroke:#333;stroke-width:.4;pointer-events:all}"
    f'svg rect.attempt[data-outcome="failed"]{{fill:url(#hatch-failed);stroke:{FAILED_COLOUR};stroke-width:1.5}}'
    f'svg rect.attempt[data-outcome="released"]{{fill:url(#hatch-released);stroke:{RELEASED_COLOUR};'
    "stroke-width:1.2;stroke-dasharray:3 2}"
    "svg .util{fill:none;stroke:#1f77b4;stroke-width:1.2}svg .mem{fill:none;stroke:#9467bd;stroke-width:1.2}"
    "svg .paneltitle{fill:#444}svg .stagelabel{fill:#fff;font-size:10px;pointer-events:none}"
)


def summary_tables(picture: Picture, summary: dict) -> str:
    rows = [
        f"<tr><th class='l'>cases</th><td>{summary['done']} done, {summary['failed']} failed, "
        f"{summary['total']} in all</td></tr>",
        f"<tr><th class='l'>wall time</th><td>{hms(summary['wall_s'])} over {len(picture.runs)} run(s)</td></tr>",
    ]
    for run in picture.runs:
        code = "" if run["exit_code"] is None else f", exit {run['exit_code']}"
        ended = clock(run["ended"]) if run["ended"] else "no end recorded"
        rows.append(f"<tr><th class='l'>run {run['id']}</th><td>{clock(run['started'])} to {ended}{code}</td></tr>")
    lanes = [
        "<tr><th class='l'>part</th><th class='l'>GPU</th><th>done</th><th>failed</th><th>failed attempts</th>"
        "<th>released</th><th>deaths</th><th>restarts</th><th>busy %</th></tr>"
    ]
    for lane in summary["lanes"]:
        busy = "-" if lane["busy_pct"] is None else f"{lane['busy_pct']:.1f}"
        restarts = "-" if lane["restarts"] is None else lane["restarts"]
        lanes.append(
            f"<tr><td class='l'>{esc(lane['part'])}</td><td class='l'>{esc(lane['gpu'] or '-')}</td>"
            f"<td>{lane['done']}</td><td>{lane['failed']}</td><td>{lane['failed_attempts']}</td>"
            f"<td>{lane['released_attempts']}</td><td>{lane['deaths']}</td><td>{esc(restarts)}</td><td>{busy}</td></tr>"
        )
    stages = ["<tr><th class='l'>stage</th><th>seconds over done cases</th><th>h:mm:ss</th></tr>"]
    for stage, seconds in summary["stage_totals"].items():
        stages.append(f"<tr><td class='l'>{stage}</td><td>{seconds:.1f}</td><td>{hms(seconds)}</td></tr>")
    return (
        f"<table class='totals'>{''.join(rows)}</table>"
        f"<table class='parts'>{''.join(lanes)}</table>"
        "<p>busy %: the part's seconds predicting over the wall time; restarts: the latest run's</p>"
        f"<table class='stages'>{''.join(stages)}</table>"
    )


def render_html(picture: Picture, png_note: str | None) -> str:
    summary = summarize(picture)
    note = f"<p class='note'>{esc(png_note)}</p>" if png_note else ""
    failed = [a for a in picture.attempts if a["outcome"] == "failed" and a["error"]]
    errors = "".join(f"<li><b>{esc(a['case_id'])}</b>: {esc(str(a['error'])[:500])}</li>" for a in failed[:50])
    title, facts = title_lines(picture, summary)
    header = "".join(f"<tr><th class='l'>{esc(k)}</th><td class='l'>{esc(v)}</td></tr>" for k, v in facts)
    failed_cases = "".join(f"<li><b>{esc(c)}</b>: {esc(why[:500])}</li>" for c, why in picture.failed_cases[:200])
    more = len(picture.failed_cases) - 200
    failed_cases += f"<li>... and {more} more (cases.csv)</li>" if more > 0 else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
        f"<h2>{esc(title)}</h2><table class='title'>{header}</table>"
        + (
            f"<h4>failed cases ({len(picture.failed_cases)})</h4><ul class='failed'>{failed_cases}</ul>"
            if failed_cases
            else ""
        )
        + f"<p>Each bar is one attempt at a case, coloured by stage; time from the first run's start "
        f"(h:mm:ss); hover a bar for its case. State: {esc(picture.source)}, drawn {clock(time.time())}.</p>"
        f"{note}\n<div class='layout'><div class='chart'>\n{render_svg(picture)}\n</div>"
        f"<div class='side'>{summary_tables(picture, summary)}"
        + (f"<h4>failed attempts</h4><ul>{errors}</ul>" if errors else "")
        + "</div></div>\n</body></html>\n"
    )


# --- the PNG -----------------------------------------------------------------------------------
def matplotlib_missing() -> str | None:
    """Why no PNG can be drawn (matplotlib does not import), or None."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except Exception as exc:  # any import failure (broken install, missing C library) only costs the PNG
        return f"no {PNG_FILE}: matplotlib cannot be imported ({type(exc).__name__}: {exc})"
    return None


def render_png(picture: Picture, path: str) -> None:
    """The same lanes, events and GPU panel with matplotlib's Agg canvas (no pyplot: no global
    backend switched in the calling process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter

    gpus = [u for u in _gpu_order(picture) if picture.samples.get(u)]
    n = max(sum(lane["rows"] for lane in picture.lanes), 1)  # bar rows over all lanes
    fig = Figure(figsize=(14, 2.7 + 0.3 * n + 1.3 * len(gpus)), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if gpus else 1, 1, height_ratios=[n, 1.2 * len(gpus)] if gpus else [1])
    ax = fig.add_subplot(grid[0])
    rel = lambda t: t - picture.t0  # noqa: E731
    index, first_row = {}, 0  # each lane's first bar row, top down
    for lane in picture.lanes:
        index[lane["part"]], first_row = first_row, first_row + lane["rows"]
    # one collection per (lane, kind of segment): a night's thousands of bars draw in seconds
    bars: dict[tuple, list[tuple[float, float]]] = {}
    for a in picture.attempts:
        y = index[a["part"]] + a["row"]
        if a["taken"] is not None and a["taken"] < a["started"]:
            bars.setdefault((y, "queued"), []).append((rel(a["taken"]), a["started"] - a["taken"]))
        for stage, start, end in stage_segments(a):
            bars.setdefault((y, stage), []).append((rel(start), end - start))
        if a["outcome"] in ("failed", "released"):
            bars.setdefault((y, a["outcome"]), []).append((rel(a["started"]), a["ended"] - a["started"]))
    for (y, kind), spans in sorted(bars.items(), key=lambda item: item[0][1] in ("failed", "released")):
        if kind == "queued":
            ax.broken_barh(spans, (y - 0.05, 0.1), facecolors=QUEUED_COLOUR)
        elif kind == "failed":
            ax.broken_barh(spans, (y - 0.3, 0.6), facecolors="none", edgecolors=FAILED_COLOUR, hatch="////", lw=1.5)
        elif kind == "released":
            ax.broken_barh(spans, (y - 0.3, 0.6), facecolors="none", edgecolors=RELEASED_COLOUR, hatch="..", ls="--")
        else:
            ax.broken_barh(spans, (y - 0.3, 0.6), facecolors=STAGE_COLOURS.get(kind, UNKNOWN_STAGE_COLOUR))
    for i, named in stage_labels(picture).items():  # the chart reads without the legend
        a = picture.attempts[i]
        for stage, start, end in named:
            y = index[a["part"]] + a["row"]
            ax.text(rel((start + end) / 2), y, stage, ha="center", va="center", fontsize=7, color="white", zorder=6)
    markers = {"worker_died": "x", "spawn": "^", "gave_up": "s", "device_rests": "D", "case_error": "o"}
    for e in picture.events:
        if e["part"] is None:
            ax.axvline(rel(e["ts"]), color=EVENT_COLOURS[e["kind"]], linestyle="--", linewidth=1)
        else:  # a death at the lane's foot, larger and on top: never hidden under the next start's triangle
            lane_rows = next(lane["rows"] for lane in picture.lanes if lane["part"] == e["part"])
            died = e["kind"] == "worker_died"
            y = index[e["part"]] + (lane_rows - 1 + 0.38 if died else -0.38)
            ax.plot(
                rel(e["ts"]),
                y,
                markers[e["kind"]],
                color=EVENT_COLOURS[e["kind"]],
                ms=8 if died else 6,
                zorder=5 if died else 4,
            )
    for run in picture.runs:
        ax.axvspan(rel(run["started"]), rel(run["end"]), color="#f6f8fb", zorder=0)
    ax.set_yticks([index[lane["part"]] + (lane["rows"] - 1) / 2 for lane in picture.lanes])
    ax.set_yticklabels([lane_label(lane) for lane in picture.lanes])
    for lane in picture.lanes[1:]:  # a line between lanes
        ax.axhline(index[lane["part"]] - 0.5, color="#c8ccd2", linewidth=0.8)
    ax.set_ylim(n - 0.5, -0.7)
    # the legend names what the chart shows, and only that
    outcomes, kinds = {a["outcome"] for a in picture.attempts}, {e["kind"] for e in picture.events}
    handles = [Patch(color=c, label=s) for s, c in STAGE_COLOURS.items()]
    handles.append(Patch(color=QUEUED_COLOUR, label="queued"))
    if "failed" in outcomes:
        handles.append(Patch(facecolor="none", edgecolor=FAILED_COLOUR, hatch="////", label="failed"))
    if "released" in outcomes:
        handles.append(Patch(facecolor="none", edgecolor=RELEASED_COLOUR, hatch="..", linestyle="--", label="released"))
    handles += [
        Line2D([], [], marker=m, color=EVENT_COLOURS[k], linestyle="none", label=EVENT_NAMES[k])
        for k, m in markers.items()
        if k in kinds
    ]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=8, fontsize=7, frameon=False)
    axes = [ax]
    if gpus:
        gax = fig.add_subplot(grid[1], sharex=ax)
        for i, uuid in enumerate(gpus):
            rows = picture.samples[uuid]
            base = (len(gpus) - 1 - i) * 110
            gax.plot([rel(r[0]) for r in rows], [base + (r[1] or 0) for r in rows], color="#1f77b4", lw=1)
            mem = [(rel(r[0]), base + 100 * r[2] / r[3]) for r in rows if r[2] is not None and r[3]]
            gax.plot([m[0] for m in mem], [m[1] for m in mem], color="#9467bd", lw=1)
            gax.text(0, base + 100, f" {gpu_label(picture, uuid)}", fontsize=7, va="top")
        # one 0-100 % band per GPU, the first on top
        gax.set_ylim(-5, 110 * len(gpus) - 5)
        gax.set_yticks([b * 110 + v for b in range(len(gpus)) for v in (0, 100)], ["0", "100"] * len(gpus), fontsize=7)
        gax.legend(
            handles=[
                Line2D([], [], color="#1f77b4", label="utilisation"),
                Line2D([], [], color="#9467bd", label="memory used"),
            ],
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncol=2,
            fontsize=7,
            frameon=False,
        )
        gax.set_ylabel("GPU util / mem %")
        axes.append(gax)
    step = tick_step(picture.t1 - picture.t0)
    ticks = [k * step for k in range(int((picture.t1 - picture.t0) / step) + 1)]
    for a_ in axes:
        a_.set_xlim(0, max(picture.t1 - picture.t0, 1.0))
        a_.xaxis.set_major_locator(FixedLocator(ticks))
        a_.xaxis.set_major_formatter(FuncFormatter(lambda v, _: hms(v)))
    axes[-1].set_xlabel("time from the first run's start (h:mm:ss); each bar one attempt at a case, coloured by stage")
    title, facts = title_lines(picture, summarize(picture))
    shown = dict(facts)
    fig.suptitle(
        f"{title}\n"
        + "\n".join(
            f"{k}: {shown[k]}" for k in ("input folder", "output folder", "when", "cases", "throughput") if k in shown
        )
        + f"\n{shown.get('host', '?')}; {shown.get('versions', '')}"
        + (f"\nfailed: {', '.join(c for c, _ in picture.failed_cases[:12])}" if picture.failed_cases else "")
        + (" ..." if len(picture.failed_cases) > 12 else ""),
        fontsize=8,
        x=0.01,
        ha="left",
    )
    fig.tight_layout()
    fig.savefig(path, format="png")


# --- writing -----------------------------------------------------------------------------------
def write_picture(state: str, journal: Journal) -> list[str]:
    """report.html (and report.png where matplotlib imports) in the run's state folder, from
    `journal`; returns the paths written. Both are written under tmp/ and renamed into place."""
    picture = read_picture(journal, state, lock_info(lock_path(state)) is not None, _summary_facts(state))
    scratch = tmp_dir(state)
    os.makedirs(scratch, exist_ok=True)
    missing = matplotlib_missing()
    written = []
    if missing is None:
        png, partial = os.path.join(state, PNG_FILE), os.path.join(scratch, f"{PNG_FILE}.{os.getpid()}.partial")
        render_png(picture, partial)
        os.replace(partial, png)
        written.append(png)
    html_path = os.path.join(state, HTML_FILE)
    write_text_atomically(html_path, render_html(picture, missing), scratch)
    return [html_path, *written]


def _summary_facts(state: str) -> dict:
    """What the run's summary.json records (the report's title block), {} without one."""
    try:
        with open(os.path.join(state, "summary.json")) as f:
            facts = json.load(f)
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def report(out: str) -> list[str]:
    """`nnunet-launch report OUT`: the picture of every run state on OUT, from read-only journals."""
    # every run state on OUT (status's listing) that has a journal
    states = [path for *_, path in run_states(out) if os.path.isfile(journal_path(path))]
    if not states:
        raise LauncherError(f"no launcher journal in {out!r}: was `nnunet-launch run` started with this output folder?")
    written = []
    for state in states:
        journal = Journal.open_readonly(journal_path(state))
        try:
            written += write_picture(state, journal)
        except sqlite3.Error as exc:  # e.g. a network filesystem without the locks SQLite needs
            raise LauncherError(f"cannot read the journal in {state!r}: {exc}") from None
        finally:
            journal.close()
    return written
