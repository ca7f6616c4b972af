"""Scale: 1,000 / 10,000 / 100,000 cases through the real CLI, supervisor, workers, journal,
status and report, with the fast stand-in at the nnU-Net boundary (launcher/fake_backend.py,
selected by NNUNET_LAUNCH_TEST_BACKEND=fake as in the tests) and hard-linked two-channel inputs.

Prints, per size: `plan --json` seconds; `run` start to the first case handed to a worker;
supervisor CPU per finished case and peak RSS (from summary.json); `status --json` seconds;
summary.json + cases.csv seconds; and, for the largest size, a resume with half the cases done:
seconds from start to the first new case handed out.

    python scripts/bench_scale.py [--sizes 1000 10000 100000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = [sys.executable, "-m", "launcher"]


def make_model_and_sources(work: Path) -> tuple[Path, list[Path]]:
    model, sources = work / "model", work / "sources"
    if not model.exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "make_tiny_model.py"),
                "--model",
                str(model),
                "--inputs",
                str(sources),
                "--cases",
                "4",
                "--channels",
                "2",
            ],
            check=True,
        )
    return model, sorted(sources.glob("*.nii.gz"))


def make_inputs(folder: Path, sources: list[Path], cases: int) -> None:
    """Hard links: 100,000 two-channel cases cost inodes, not disk."""
    if folder.exists():
        return
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    by_case = {}
    for path in sources:
        by_case.setdefault(path.name[: -len("_0000.nii.gz")], []).append(path)
    groups = list(by_case.values())
    for i in range(cases):
        for channel, source in enumerate(sorted(groups[i % len(groups)])):
            os.link(source, partial / f"case_{i:06d}_{channel:04d}.nii.gz")
    partial.rename(folder)


def env() -> dict:
    return {**os.environ, "NNUNET_LAUNCH_TEST_BACKEND": "fake", "NNUNET_LAUNCH_TEST_CASE_S": "0"}


def run_args(inputs: Path, out: Path, model: Path) -> list[str]:
    return ["-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0", "-device", "cpu", "--workers", "2"]


def first_spawn_after(out: Path, since: float) -> float | None:
    path = out / ".nnunet-launch" / "journal.sqlite"
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            row = db.execute("SELECT MIN(ts) FROM events WHERE kind='spawn' AND ts >= ?", (since,)).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env())
    return time.perf_counter() - started, result


def run_until_first_handout(command: list[str], out: Path, then_stop: bool) -> tuple[float, float | None, int]:
    """(seconds to the first case handed to a worker, wall seconds, exit code)."""
    started_wall = time.time()
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    first = None
    while proc.poll() is None and first is None:
        spawn = first_spawn_after(out, started_wall)
        if spawn is not None:
            first = spawn - started_wall
            break
        time.sleep(0.05)
    if then_stop and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    proc.wait()
    if proc.returncode not in (0, 130):
        raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    return first, time.perf_counter() - started, proc.returncode


def report_seconds(out: Path) -> float:
    """summary.json + cases.csv, as the end of a run writes them, on the finished journal."""
    sys.path.insert(0, str(ROOT))
    from launcher.journal import Journal
    from launcher.report import write_summary

    state = str(out / ".nnunet-launch")
    journal = Journal.open(os.path.join(state, "journal.sqlite"))
    try:
        started = time.perf_counter()
        write_summary(state, journal, 0, time.time())
        return time.perf_counter() - started
    finally:
        journal.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nnunet-launch-bench-scale"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, sources = make_model_and_sources(work)
    print(
        f"# {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| cases | plan --json s | start → first case s | run wall s | supervisor CPU ms/case | peak RSS MB "
        "| status --json s | summary+csv s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        inputs, out = work / f"in-{size}", work / f"out-{size}"
        make_inputs(inputs, sources, size)
        shutil.rmtree(out, ignore_errors=True)
        plan_s, plan = timed([*LAUNCHER, "plan", *run_args(inputs, out, model), "--json"])
        assert plan.returncode == 0, plan.stderr
        first, wall, _ = run_until_first_handout([*LAUNCHER, "run", *run_args(inputs, out, model)], out, False)
        summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
        assert summary["done"] == size, summary
        status_s, status = timed([*LAUNCHER, "status", str(out), "--json"])
        assert status.returncode == 0, status.stderr
        cpu_ms = 1000 * summary["supervisor_cpu_seconds"] / size
        print(
            f"| {size:,} | {plan_s:.1f} | {first:.1f} | {wall:.0f} | {cpu_ms:.2f} | "
            f"{summary['supervisor_peak_rss_mb']:.0f} | {status_s:.2f} | {report_seconds(out):.2f} |",
            flush=True,
        )
    largest = max(args.sizes)
    inputs, out = work / f"in-{largest}", work / f"out-{largest}"
    db = sqlite3.connect(out / ".nnunet-launch" / "journal.sqlite")
    undone = [row[0] for row in db.execute("SELECT id FROM cases WHERE rowid % 2 = 0")]
    db.executemany("UPDATE cases SET state='pending', stage=NULL WHERE id=?", [(c,) for c in undone])
    db.commit()
    db.close()
    for case_id in undone:
        os.remove(out / f"{case_id}.nii.gz")
    first, _, _ = run_until_first_handout([*LAUNCHER, "run", *run_args(inputs, out, model)], out, True)
    done = largest - len(undone)
    print(f"\nresume of {largest:,} cases with {done:,} done: first new case handed out after {first:.1f} s")


if __name__ == "__main__":
    main()
