"""The run's picture (launcher/picture.py): report.html's SVG read back from journals built here."""

from __future__ import annotations

import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import cli
from launcher.journal import Journal
from launcher.outputs import journal_path, state_dir
from launcher.picture import Picture, read_picture, stage_segments, summarize, write_picture

WEIRD = "we<i>rd & \"q\" 's' ü→Ω"
T = 1_700_000_000.0  # the run's start


def attempt(case_id, part, outcome, started, ended, n=1, taken=None, stages=(None,) * 4, last_stage=None, error=None):
    preprocess, wait, predict, export = stages
    return {
        "run": 1,
        "case_id": case_id,
        "attempt": n,
        "part": part,
        "gpu": f"GPU {part}",
        "taken": None if taken is None else T + taken,
        "started": T + started,
        "ended": T + ended,
        "last_stage": last_stage,
        "outcome": outcome,
        "queued_s": None if taken is None else started - taken,
        "preprocess_s": preprocess,
        "wait_s": wait,
        "predict_s": predict,
        "export_s": export,
        "error": error,
    }


ATTEMPTS = [
    attempt("case_000", 0, "failed", 10, 30, stages=(5, 1, 14, None), last_stage="predict", error="boom <b>\x1b[31m"),
    attempt("case_000", 0, "done", 40, 70, n=2, taken=35, stages=(5, 1, 20, 4)),
    attempt("case_001", 0, "done", 75, 90, n=2, last_stage="export"),  # no stage seconds
    attempt(WEIRD, 1, "done", 5, 50, taken=2, stages=(10, 2, 30, 3)),
    attempt("case_001", 1, "released", 55, 60, last_stage="predict"),
    attempt("case_002", 1, "failed", 62, 70, stages=(4, 0, 8, None), error="out of memory"),
]


def make_journal(out: Path, samples: bool = True) -> Path:
    """Two lanes; a case failed then done, a released attempt, a case failed for good, a worker
    death and its restart, and (with `samples`) GPU samples every 10 s."""
    state = Path(state_dir(str(out)))
    state.mkdir(parents=True)
    journal = Journal.open(journal_path(str(state)))
    parts = [(0, "GPU 0", "GPU-aaaa"), (1, "GPU 1", "GPU-bbbb")]
    run = journal.start_run({"model": "m"}, parts, dict.fromkeys(["case_000", "case_001", "case_002", WEIRD], 1.0))
    assert run == 1
    updates = [(c, {"state": "done", "part": 0}) for c in ("case_000", "case_001")]
    updates += [(WEIRD, {"state": "done", "part": 1}), ("case_002", {"state": "failed", "part": 1, "error": "oom"})]
    journal.apply(updates, attempts=ATTEMPTS)
    journal.event("spawn", 0, None, "attempt 1 on GPU 0")
    journal.event("worker_died", 1, "case_001", "on GPU 1: killed by <SIGKILL>")
    journal.event("spawn", 1, None, "attempt 2 on GPU 1")
    journal.event("note", 1, None, "not drawn")
    journal.part_restarted(1)
    if samples:
        for k in range(11):
            journal.add_gpu_samples(
                T + 10 * k, {"GPU-aaaa": (50 + k, 4 << 30, 16 << 30), "GPU-bbbb": (90, 8 << 30, 16 << 30)}
            )
    journal.end_run(run, 1)
    # the journal stamps the clock's time: put the run and its events where the attempts are
    journal.db.execute("UPDATE runs SET started=?, ended=?", (T, T + 100))
    for event_id, ts in ((1, T + 1), (2, T + 60), (3, T + 61), (4, T + 62)):
        journal.db.execute("UPDATE events SET ts=? WHERE id=?", (ts, event_id))
    journal.close()
    return state


def svg_of(html_text: str) -> ET.Element:
    """The SVG part of report.html, parsed as XML (so it must be well-formed)."""
    match = re.search(r"<svg\b.*?</svg>", html_text, re.S)
    assert match, "no SVG in report.html"
    return ET.fromstring(match.group(0))


def drawn(tmp_path: Path, samples: bool = True) -> tuple[str, ET.Element, list[str]]:
    state = make_journal(tmp_path / "out", samples)
    journal = Journal.open_readonly(journal_path(str(state)))
    try:
        paths = write_picture(str(state), journal)
    finally:
        journal.close()
    text = (state / "report.html").read_text(encoding="utf-8")
    return text, svg_of(text), paths


def attempts_of(svg: ET.Element) -> list[dict]:
    return [r.attrib for r in svg.iter("rect") if r.get("class") == "attempt" and "data-case" in r.attrib]


def test_lanes_bars_and_markers(tmp_path):
    text, svg, paths = drawn(tmp_path)
    state = tmp_path / "out" / ".nnunet-launch"
    assert paths == [str(state / "report.html"), str(state / "report.png")]

    lanes = [g for g in svg.iter("g") if g.get("class") == "lane"]
    assert [g.get("data-part") for g in lanes] == ["0", "1"]

    bars = attempts_of(svg)
    assert sorted((b["data-case"], b["data-part"], b["data-outcome"]) for b in bars) == sorted(
        (a["case_id"], str(a["part"]), a["outcome"]) for a in ATTEMPTS
    )
    # every attempt's bar sits in its own part's lane
    for lane in lanes:
        for rect in lane.iter("rect"):
            if rect.get("class") == "attempt":
                assert rect.get("data-part") == lane.get("data-part")

    # failed and released bars are drawn differently from done ones: CSS rules by outcome, with
    # patterns that the SVG defines, and a legend naming them
    pattern_ids = {p.get("id") for p in svg.iter("pattern")}
    failed_rule = re.search(r'rect\.attempt\[data-outcome="failed"\]\{([^}]*)\}', text).group(1)
    released_rule = re.search(r'rect\.attempt\[data-outcome="released"\]\{([^}]*)\}', text).group(1)
    assert failed_rule != released_rule
    for rule in (failed_rule, released_rule):
        assert re.search(r"url\(#([\w-]+)\)", rule).group(1) in pattern_ids
    legend = "".join(next(g for g in svg.iter("g") if g.get("class") == "legend").itertext())
    assert "failed attempt" in legend and "released" in legend and "worker died" in legend

    # the stage split: seconds in order (case_000: its failed attempt, then its done one);
    # without any, one segment of the last stage (case_001: done in lane 0, released in lane 1)
    def stages_of(case_id: str) -> list[str]:
        return [r.get("data-stage") for r in svg.iter("rect") if r.get("data-case") == case_id and r.get("data-stage")]

    assert stages_of("case_000") == ["preprocess", "wait", "predict"] + ["preprocess", "wait", "predict", "export"]
    assert stages_of("case_001") == ["export", "predict"]
    queued = [r.get("data-case") for r in svg.iter("rect") if r.get("class") == "queued" and r.get("data-case")]
    assert sorted(queued) == sorted(["case_000", WEIRD])

    # the death and the restarts are markers in their lanes; a "note" is not drawn
    markers = [(p.get("data-kind"), p.get("data-part")) for p in svg.iter("path") if p.get("class") == "event"]
    assert ("worker_died", "1") in markers
    assert markers.count(("spawn", "0")) == 1 and markers.count(("spawn", "1")) == 1
    assert not any(kind == "note" for kind, _ in markers)
    lane_1_markers = [p.get("data-kind") for p in lanes[1].iter("path") if p.get("class") == "event"]
    assert "worker_died" in lane_1_markers

    # the time axis in h:mm:ss from the run's start
    labels = [t.text for t in svg.iter("text") if t.text and re.fullmatch(r"\d+:\d\d:\d\d", t.text)]
    assert labels[0] == "0:00:00" and "0:01:40" in labels

    # the GPU panel: one row per sampled GPU, named by the lanes that use it
    gpus = [g for g in svg.iter("g") if g.get("class") == "gpu"]
    assert [g.get("data-gpu") for g in gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert all(len(p.get("points").split()) == 11 for g in gpus for p in g.iter("polyline"))


def test_no_gpu_panel_without_samples(tmp_path):
    text, svg, _ = drawn(tmp_path, samples=False)
    assert not [g for g in svg.iter("g") if g.get("class") in ("gpu", "gpu-panel")]
    assert "polyline" not in text
    assert len(attempts_of(svg)) == len(ATTEMPTS)


def test_journal_text_is_escaped_and_nothing_is_fetched(tmp_path):
    text, svg, _ = drawn(tmp_path)
    # the weird case id reads back exactly (parsed), and never appears raw in the page
    assert WEIRD in {b["data-case"] for b in attempts_of(svg)}
    assert "we<i>rd" not in text and '"q"' not in text
    assert "we&lt;i&gt;rd &amp; &quot;q&quot; &#x27;s&#x27; ü→Ω" in text
    assert "boom <b>" not in text and "boom &lt;b&gt;" in text and "\x1b" not in text
    assert "<SIGKILL>" not in text
    # self-contained: no URL, no script, no stylesheet or image fetched
    for needle in ("http://", "https://", "<script", "<link", "@import", "src=", "<img", "<iframe"):
        assert needle not in text.lower(), needle
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))


def test_png_is_a_real_picture(tmp_path):
    _, _, paths = drawn(tmp_path)
    png = Path(paths[1]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert width >= 800 and height >= 200
    assert len(png) > 20_000  # bars, markers, text: not a blank canvas


def test_summary_numbers(tmp_path):
    state = make_journal(tmp_path / "out")
    journal = Journal.open_readonly(journal_path(str(state)))
    try:
        picture = read_picture(journal, str(state), live=False)
    finally:
        journal.close()
    summary = summarize(picture)
    assert (summary["done"], summary["failed"], summary["total"]) == (3, 1, 4)
    assert summary["wall_s"] == pytest.approx(100)
    # per stage, over the done attempts only (case_001's done attempt has no stage seconds)
    assert summary["stage_totals"] == pytest.approx(
        {"queued": 5 + 3, "preprocess": 15, "wait": 3, "predict": 50, "export": 7}
    )
    lanes = {lane["part"]: lane for lane in summary["lanes"]}
    assert (lanes[0]["done"], lanes[0]["failed"], lanes[0]["failed_attempts"], lanes[0]["restarts"]) == (2, 0, 1, 0)
    assert (lanes[1]["done"], lanes[1]["failed"], lanes[1]["released_attempts"], lanes[1]["restarts"]) == (1, 1, 1, 1)
    assert lanes[1]["deaths"] == 1
    # busy: seconds predicting, every attempt, over the wall time
    assert lanes[0]["busy_pct"] == pytest.approx(34.0) and lanes[1]["busy_pct"] == pytest.approx(38.0)


def test_stage_segments_follow_each_other_and_stop_at_the_end():
    done = attempt("c", 0, "done", 0, 10, stages=(2, 1, 5, 4))  # 12 s of stages in a 10 s attempt
    assert [(s, a - T, b - T) for s, a, b in stage_segments(done)] == [
        ("preprocess", 0, 2),
        ("wait", 2, 3),
        ("predict", 3, 8),
        ("export", 8, 10),
    ]
    bare = attempt("c", 0, "released", 0, 10)
    assert [(s, a - T, b - T) for s, a, b in stage_segments(bare)] == [("unknown", 0, 10)]


def test_a_second_run_widens_the_axis_and_fresh_leftovers_are_not_drawn(tmp_path):
    state = make_journal(tmp_path / "out")
    journal = Journal.open(journal_path(str(state)))
    journal.db.execute("INSERT INTO runs (pid, started, ended, exit_code) VALUES (1, ?, ?, 0)", (T + 200, T + 300))
    late = {**attempt("case_002", 0, "done", 210, 250, n=1, stages=(1, 1, 30, 8)), "run": 2}
    stale = {**attempt("gone", 0, "done", 220, 230), "run": 99}  # a run --fresh cleared
    journal.apply([], attempts=[late, stale])
    journal.close()
    journal = Journal.open_readonly(journal_path(str(state)))
    try:
        picture: Picture = read_picture(journal, str(state), live=False)
        write_picture(str(state), journal)
    finally:
        journal.close()
    assert (picture.t0, picture.t1) == (T, T + 300)
    svg = svg_of((state / "report.html").read_text(encoding="utf-8"))
    assert [r.get("data-run") for r in svg.iter("rect") if r.get("class") == "run"] == ["1", "2"]
    cases = [b["data-case"] for b in attempts_of(svg)]
    assert "gone" not in cases and len(cases) == len(ATTEMPTS) + 1


def test_report_command(tmp_path):
    missing = cli("report", str(tmp_path / "nothing here"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("nnunet-launch: error: no launcher journal") and missing.stderr.count("\n") == 1
    assert missing.stdout == ""

    state = make_journal(tmp_path / "out")
    made = cli("report", str(tmp_path / "out"))
    assert made.returncode == 0, made.stderr
    assert made.stdout.split() == [str(state / "report.html"), str(state / "report.png")]


def test_without_matplotlib_only_the_html_and_it_says_why(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    state = make_journal(tmp_path / "out")
    journal = Journal.open_readonly(journal_path(str(state)))
    try:
        paths = write_picture(str(state), journal)
    finally:
        journal.close()
    assert paths == [str(state / "report.html")] and not (state / "report.png").exists()
    text = (state / "report.html").read_text(encoding="utf-8")
    assert "no report.png: matplotlib cannot be imported" in text
    assert len(attempts_of(svg_of(text))) == len(ATTEMPTS)


def test_attempts_a_workers_pipeline_overlaps_get_rows_of_their_own_and_later_ones_reuse_them():
    from launcher.picture import stack_rows

    def attempt(case, taken, started, ended):
        return {"case_id": case, "taken": taken, "started": started, "ended": ended}

    lane = [attempt("a", 0, 1, 10), attempt("b", 0, 2, 12), attempt("c", 11, 11, 15), attempt("d", 12.5, 13, 14)]
    assert stack_rows(lane) == 2
    rows = {a["case_id"]: a["row"] for a in lane}
    assert rows["a"] != rows["b"], "a predicts while b is preprocessed: two rows, both visible"
    assert rows["c"] == rows["a"] and rows["d"] == rows["b"], "a row is reused once its bar ended"
    assert stack_rows([]) == 1


def test_the_report_names_model_folders_host_versions_totals_and_failed_cases_and_a_cpu_run_has_no_gpu_legend(
    tmp_path,
):
    """A title block a reader needs without the run's logs (from summary.json), the failed cases
    with their reasons, and a legend without GPU lines where no GPU was sampled."""
    import json

    state = make_journal(tmp_path / "out", samples=False)
    facts = {
        "model_folder": "/results/Dataset042_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres",
        "configuration": "3d_fullres",
        "folds": [0, 1],
        "checkpoint": "checkpoint_final.pth",
        "profile": "exact",
        "input_folder": "/data/in ü",
        "output_folder": str(tmp_path / "out"),
        "host": "gpu-node-7",
        "versions": {"nnunet-launch": "0.1.0", "nnunetv2": "2.8.1", "torch": "2.14.1"},
    }
    (state / "summary.json").write_text(json.dumps(facts))
    journal = Journal.open_readonly(journal_path(str(state)))
    try:
        write_picture(str(state), journal)
    finally:
        journal.close()
    text = (state / "report.html").read_text(encoding="utf-8")
    title = re.search(r"<h2>(.*?)</h2>", text).group(1)
    assert title == "nnunet-launch: Dataset042_Liver / nnUNetTrainer__nnUNetPlans__3d_fullres (3d_fullres, folds 0, 1)"
    header = re.search(r"<table class='title'>(.*?)</table>", text).group(1)
    for value in ("/data/in ü", str(tmp_path / "out"), "gpu-node-7", "nnunetv2 2.8.1", "3 done, 1 failed, 4 in all"):
        assert value in header, value
    assert "108.0 cases per hour" in header and "0.06 GPU hours" in header  # 3 cases in 100 s, 2 GPUs
    assert "<li><b>case_002</b>: oom</li>" in re.search(r"<ul class='failed'>(.*?)</ul>", text).group(1)
    legend = "".join(next(g for g in svg_of(text).iter("g") if g.get("class") == "legend").itertext())
    assert "GPU" not in legend
