"""What the operator sees: the live view, plain lines off a terminal, the report files, the
GPU table and warnings, config files."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
from datetime import datetime

import pytest
from rich.console import Console

from conftest import assert_same_predictions, cli, fake_env, launcher_cmd, model_args, run_args, status_json
from launcher.journal import Journal
from launcher.progress import render


def _journal_in_progress(tmp_path, gpus: bool) -> Journal:
    journal = Journal.open(str(tmp_path / "journal.sqlite"))
    parts = [(0, "gpu0", "GPU-aaaa"), (1, "gpu1", "GPU-bbbb")] if gpus else [(0, "cpu", None), (1, "cpu", None)]
    journal.start_run({}, parts, dict.fromkeys(["a", "[b]", "c", "d", "e"]))
    journal.apply([(case, {"part": part}) for case, part in {"a": 0, "[b]": 0, "c": 1, "d": 1}.items()])
    journal.part_worker(0, 111, "running")
    journal.part_worker(1, 222, "running")
    for case in ("a", "c", "[b]"):
        journal.apply([(case, {"state": "running", "stage": "preprocess", "gpu": "gpu", "started": 1.0})])
    journal.apply([("a", {"state": "done", "seconds": 2.0, "ended": 3.0}), ("c", {"state": "done", "seconds": 3.0})])
    journal.apply([("[b]", {"stage": "predict"}), ("d", {"state": "failed", "error": "x"})])
    return journal


def _shown(journal: Journal, width: int) -> str:
    console = Console(record=True, width=width)
    view = render(journal.snapshot(), {"GPU-aaaa": "H100 #0"}, {"GPU-aaaa": (87, 3 << 30, 80 << 30)}, 10, width)
    console.print(view)
    return console.export_text()


def test_live_view_renders_counts_of_a_run_in_progress(tmp_path):
    journal = _journal_in_progress(tmp_path, gpus=True)
    text = _shown(journal, 160)
    assert re.search(r"0\s+│\s+running\s+│\s+1/2\s+│\s+\[b\]\s+│\s+predict\s+│\s+H100 #0\s+│\s+-\s+│\s+0\s+│", text), (
        text
    )
    assert "87%" in text and "3.0/80 GiB" in text
    assert re.search(r"1\s+│\s+running\s+│\s+1/2\s+│\s+-\s+│\s+-\s+│\s+gpu1\s+│\s+-\s+│\s+1\s+│", text), text
    assert "2/5 cases done, 1 failed, 1 working, 0 queued in workers, 1 waiting; ETA —" in text
    assert re.search(r"-\s+│\s+not taken\s+│\s+0/1\s+│", text), "the case no worker took has a row: rows add up"
    journal.close()


def test_live_view_fits_80_columns_by_dropping_the_least_important_columns_and_cpu_runs_show_no_gpu(tmp_path):
    journal = _journal_in_progress(tmp_path, gpus=True)
    narrow = _shown(journal, 80)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert "…" not in narrow and " case " in narrow and "stage" in narrow and "state" in narrow
    assert "GPU mem" not in narrow, "the least important column went first"
    assert "ETA" in narrow and "elapsed" in narrow
    journal.close()
    cpu = _journal_in_progress(tmp_path / "cpu", gpus=False) if (tmp_path / "cpu").mkdir() is None else None
    wide = _shown(cpu, 160)
    assert "GPU" not in wide and "[b]" in wide
    cpu.close()


def test_plain_output_has_a_timestamped_line_per_case_and_reports_agree(small, tmp_path):
    out = tmp_path / "out"
    result = cli(*run_args(small, out, "--workers", "2"), timeout=300)
    assert result.returncode == 0, result.stderr
    stamped = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[part \d cpu\] done (case_\d+) ")
    done = [m.group(1) for m in map(stamped.match, result.stdout.splitlines()) if m]
    assert sorted(done) == small["ids"]
    assert "6/6 case(s) predicted, 0 failed" in result.stdout
    assert_same_predictions(out, small["reference"])
    state = out / ".nnunet-launch"
    summary = json.loads((state / "summary.json").read_text())
    rows = list(csv.DictReader((state / "cases.csv").open()))
    assert summary["done"] == 6 and sorted(r["id"] for r in rows) == small["ids"]
    assert {r["state"] for r in rows} == {"done"} and all(float(r["seconds"]) > 0 for r in rows)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", r["started"]) for r in rows)
    for r in rows:  # times that add up: end - start, and the stages within it
        wall = (datetime.fromisoformat(r["ended"]) - datetime.fromisoformat(r["started"])).total_seconds()
        stages = [float(r[k]) for k in ("preprocess_s", "wait_s", "predict_s", "export_s")]
        assert abs(float(r["seconds"]) - wall) <= 0.002 and abs(sum(stages) - wall) <= 0.004, r
        assert min(stages) >= 0 and float(r["predict_s"]) > 0 and float(r["queued_s"]) >= 0, r
    with sqlite3.connect(state / "journal.sqlite") as db:
        attempts = db.execute("SELECT case_id, outcome, part, started, ended FROM attempts").fetchall()
    assert sorted(a[0] for a in attempts) == small["ids"] and {a[1] for a in attempts} == {"done"}
    assert summary["command"][:2] == ["nnunet-launch", "run"] and summary["model_folder"] == str(small["model"])
    assert summary["folds"] == ["0"] and set(summary["versions"]) == {"nnunet-launch", "nnunetv2", "torch"}
    assert summary["started"] < summary["ended"] and summary["supervisor_cpu_seconds"] > 0
    assert sum(p["done"] for p in summary["parts"]) == 6
    assert all(0 < p["busy_pct"] <= 100 for p in summary["parts"]), "each worker's share of the run spent predicting"
    assert (state / "logs" / "supervisor.log").read_text().count("] done case_") == 6
    assert sorted(p.name for p in (state / "logs").iterdir()) == [
        "run-1.part-0.attempt-1.log",
        "run-1.part-1.attempt-1.log",
        "supervisor.log",
    ]
    assert "Predicting case_" in (state / "logs" / "run-1.part-0.attempt-1.log").read_text(), "nnU-Net's prints"
    assert "Predicting" not in result.stdout


FAKE = [
    {"index": 0, "uuid": "GPU-idle", "name": "H100", "memory_total": 80 << 30, "memory_used": 1 << 30},
    {
        "index": 1,
        "uuid": "GPU-busy",
        "name": "H100",
        "memory_total": 80 << 30,
        "memory_used": 70 << 30,
        "processes": [{"pid": 4242, "used_memory": 69 << 30}],
    },
]


def test_busy_gpus_are_warned_about_or_left_out_and_shown_in_the_table(tiny, tmp_path):
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps(FAKE))
    env = {"NNUNET_LAUNCH_FAKE_GPUS": str(fake)}
    args = ["plan", *model_args(tiny, tmp_path / "o"), "--json"]
    warned = cli(*args, env=env)
    plan = json.loads(warned.stdout)
    assert [p["gpu"] for p in plan["parts"]] == ["gpu0", "gpu1"]
    assert any("GPU 1 is busy (processes 4242)" in w for w in plan["warnings"])
    assert not any("GiB free" in w for w in plan["warnings"]), "10 GiB is enough for one worker here"
    skipped = json.loads(cli(*args, "--skip-busy", env=env).stdout)
    assert [p["gpu"] for p in skipped["parts"]] == ["gpu0"]
    crowded = json.loads(cli(*args, "--workers-per-gpu", "8", env=env).stdout)
    assert any("GPU 1 has 10.0 GiB free; 8 worker(s) may need" in w for w in crowded["warnings"])
    table = cli("gpus", env=env)
    assert "GPU-busy" in table.stdout and "4242 (69.0 GiB)" in table.stdout


@pytest.mark.parametrize(
    "text, words",
    [
        ("workers = 'two'\n", "workers must be an integer, got 'two'"),
        ("step_size = '0.5'\n", "step_size must be a number"),
        ("disable_tta = 1\n", "disable_tta must be true or false"),
        ("folds = 0\n", "folds must be a list like [0, 1]"),
        ("max-restarts = true\n", "max_restarts must be an integer"),
        ("turbo = true\n", "unknown key 'turbo'; valid keys: best, case_retries, checkpoint"),
    ],
)
def test_config_file_errors_name_the_key(tiny, tmp_path, text, words):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = cli("plan", *model_args(tiny, tmp_path / "o"), "-device", "cpu", "--config", str(config))
    assert result.returncode == 2 and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["default.toml", "overnight.toml"])
def test_shipped_config_files_load(tiny, tmp_path, name):
    from conftest import ROOT

    result = cli(
        "plan", *model_args(tiny, tmp_path / "o"), "-device", "cpu", "--config", str(ROOT / "configs" / name), "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schedule"] == "dynamic"


@pytest.mark.parametrize("columns", [80, 160])
def test_on_a_terminal_the_live_view_fits_and_log_lines_keep_their_part_labels(tiny, tmp_path, columns):
    """The real CLI under a pseudo-terminal of that width (the fast stand-in backend)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    from conftest import fake_env, launcher_cmd

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, **fake_env(tmp_path, case_seconds=0.2), "TERM": "xterm", "COLUMNS": str(columns)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        launcher_cmd(*run_args(tiny, tmp_path / "out", "--workers", "2")),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        start_new_session=True,
    )
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the run ended
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        os.close(leader)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert re.search(r"\[part \d cpu\] done case_\d{3}", screen), "labels are not eaten as markup"
    assert " case " in screen and " stage " in screen and "…" not in screen
    assert "GPU util" not in screen, "no GPU columns on the CPU"
    table = [line for line in screen.replace("\r", "\n").splitlines() if "│" in line or "┃" in line]
    assert table and max(len(line) for line in table) <= columns, "the table fits the terminal"
    assert "12/12 case(s) predicted, 0 failed" in screen


def test_status_watch_shows_each_workers_case_stage_and_window_progress_until_the_run_ends(cases, tmp_path, launch):
    """The inside of a case, live: `status --json` names each worker's case, its stage and the
    sliding-window %, the counts say who is working, queued in a worker or waiting, with an ETA;
    `status --watch` refreshes (h:mm:ss) and ends with the run."""
    out = tmp_path / "out"
    slow = {c: "slow:3" for c in cases["ids"][:4]}  # the fake backend reports steps while it predicts
    run = launch(run_args(cases, out, "--workers", "2"), env=fake_env(tmp_path, slow, case_seconds=0.2))
    seen: dict = {}

    def predicting() -> bool:
        info = status_json(out)
        if not info or not info["launcher_running"]:
            return False
        parts = [p for p in info["parts"] if p["current_stage"] == "predict" and p["current_progress_pct"]]
        if parts and info["eta_s"] is not None:
            seen.update(info)
            return True
        return False

    run.wait_until(predicting, 120, "a worker predicting with steps and an ETA")
    cases_now = seen["cases"]
    assert sum(cases_now[k] for k in ("done", "failed", "working", "queued", "waiting")) == cases_now["total"] == 24
    assert cases_now["working"] >= 1 and seen["running"] == cases_now["working"]
    part = next(p for p in seen["parts"] if p["current_stage"] == "predict")
    assert part["current_case"] in cases["ids"] and 0 < part["current_progress_pct"] <= 100
    watch = subprocess.run(
        launcher_cmd("status", "--watch", "--every", "0.5", str(out)), capture_output=True, text=True, timeout=180
    )
    frames = watch.stdout.split("nnunet-launch status ")
    assert watch.returncode == 0 and len(frames) >= 3, watch.stdout[-2000:]
    assert re.search(r"on case_\d+ \((preprocess|predict \d+%|export)\)", watch.stdout), watch.stdout[-2000:]
    assert re.search(r"ETA \d+:\d\d:\d\d, elapsed \d+:\d\d:\d\d", watch.stdout), watch.stdout[-2000:]
    assert "24/24 cases done" in frames[-1] and "launcher: not running" in frames[-1], frames[-1]
    code, _, err = run.wait(120)
    assert code == 0, err


def test_on_finish_runs_once_with_the_exit_code_and_summary_in_its_environment_and_its_failure_changes_nothing(
    cases, tmp_path
):
    out = tmp_path / "o u't $HOME `x`"
    record = tmp_path / "notified.txt"
    fields = '"$NNUNET_LAUNCH_EXIT_CODE" "$NNUNET_LAUNCH_SUMMARY" "$NNUNET_LAUNCH_RESULT"'
    command = f'printf "%s|%s|%s\\n" {fields} >> {record}; exit 5'
    env = fake_env(tmp_path, {cases["ids"][0]: "unreadable"})
    result = cli(*run_args(cases, out, "--workers", "2", "--on-finish", command), env=env, timeout=300)
    assert result.returncode == 1, "a case failed: 1, whatever the command did"
    summary = out / ".nnunet-launch" / "summary.json"
    assert record.read_text().splitlines() == [f"1|{summary}|finished, but some cases failed"]
    assert "--on-finish command failed (exit code 5)" in result.stderr
    assert "--on-finish command failed" in (out / ".nnunet-launch" / "logs" / "supervisor.log").read_text()
    assert json.loads(summary.read_text())["exit_code"] == 1


def test_an_on_finish_command_that_prints_bytes_and_leaves_a_job_running_changes_nothing(cases, tmp_path):
    """Binary output, and a background job that keeps running: the run exits at once with its own
    code (the job is ended here by its pid)."""
    out = tmp_path / "out"
    pid_file = tmp_path / "job.pid"
    command = f"printf '\\377\\376'; sleep 300 & echo $! > {pid_file}"
    try:
        result = cli(*run_args(cases, out, "--workers", "2", "--on-finish", command), env=fake_env(tmp_path))
        assert result.returncode == 0, result.stderr
        assert "--on-finish" not in result.stderr, "the shell ended with 0: nothing to say"
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_rerun_of_a_finished_run_that_was_killed_before_its_report_writes_the_report(cases, tmp_path):
    out = tmp_path / "out"
    assert cli(*run_args(cases, out, "--workers", "2"), env=fake_env(tmp_path)).returncode == 0
    summary = out / ".nnunet-launch" / "summary.json"
    summary.unlink()  # as if the run was killed between its last output and its report
    again = cli(*run_args(cases, out, "--workers", "2"), env=fake_env(tmp_path))
    assert again.returncode == 0, again.stderr
    assert "nothing to predict" not in again.stdout and "24 already done" in again.stdout
    assert [r["done"] for r in json.loads(summary.read_text())["runs"]] == [24, 0], "a run that predicted nothing"
    third = cli(*run_args(cases, out, "--workers", "2"), env=fake_env(tmp_path))
    assert third.stdout.startswith("nnunet-launch: nothing to predict: all 24 case(s) are done")
