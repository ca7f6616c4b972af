"""The ETA against the truth: a real run (real nnU-Net on the CPU, the bundled tiny model) over a
skewed set, largest case first, with `status --json` read every half second. At the first reading
with 10 %, a quarter, half and three quarters of the run's work behind it (numbers.py: done, and
the cases in flight by their progress), the ETA it showed (a range before 10 %) is set against the
time really left until the last case was done. Also: how long the launcher took from its last
output in place to its exit.

    python scripts/bench_eta.py [--cases 24] [--workers 2] [--big-case-edge 96] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.join(os.path.dirname(sys.executable), "nnunet-launch")
MILESTONES = (0.10, 0.25, 0.5, 0.75)  # shares of the run's work behind it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--big-case-edge", type=int, default=96, help="case 0 a cube of this edge: the skew")
    parser.add_argument("--tta", action="store_true", help="with test-time augmentation (slower)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-eta-")
    model, inputs, out = (os.path.join(work, name) for name in ("model", "in", "out"))
    subprocess.run(
        [sys.executable, os.path.join(HERE, "make_tiny_model.py"), "--model", model, "--inputs", inputs,
         "--cases", str(args.cases), "--big-case-edge", str(args.big_case_edge)],
        check=True, capture_output=True,
    )  # fmt: skip
    command = [BIN, "run", "-i", inputs, "-o", out, "-m", model, "-f", "0", "-device", "cpu"]
    command += ["--workers", str(args.workers)] + ([] if args.tta else ["--disable_tta"])
    started = time.time()
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exit_times: list[float] = []  # the exit's own time, not when the polling loop notices it
    threading.Thread(target=lambda: (run.wait(), exit_times.append(time.time())), daemon=True).start()
    readings = []
    while not exit_times:
        time.sleep(0.5)
        status = subprocess.run([BIN, "status", out, "--json"], capture_output=True, text=True)
        if status.returncode in (0, 1) and status.stdout:
            info = json.loads(status.stdout)
            left, done = info.get("work_left") or 0.0, info.get("work_done_this_run") or 0.0
            share = 1.0 - left / (left + done) if left + done else 0.0
            at = (time.time(), info["cases"]["done"], info["cases"]["total"], info.get("eta_s"), share)
            readings.append((*at, info.get("eta_range_s")))
    exited = exit_times[0]
    assert run.returncode == 0, f"the run failed ({run.returncode})"
    last_done = max(os.stat(os.path.join(out, n)).st_mtime for n in os.listdir(out) if n.endswith(".nii.gz"))
    rows = []
    for milestone in MILESTONES:
        at = next(r for r in readings if r[4] >= milestone)
        real = last_done - at[0]
        error = None if at[3] is None else (at[3] - real) / real
        rows.append(
            {"work": milestone, "done": f"{at[1]}/{at[2]}", "eta_s": at[3], "eta_range_s": at[5],
             "real_s": round(real, 1), "error": error}
        )  # fmt: skip
    first_eta = next((r for r in readings if r[3] is not None), None)
    result = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}), {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "cases": args.cases,
        "workers": args.workers,
        "big_case_edge": args.big_case_edge,
        "tta": args.tta,
        "run_seconds": round(exited - started, 1),
        "first_eta_after_s": round(first_eta[0] - started, 1) if first_eta else None,
        "milestones": rows,
        "last_output_to_exit_s": round(exited - last_done, 2),
    }
    print(f"# bench_eta on {result['machine']}, {result['date']}: {args.cases} cases, {args.workers} CPU workers")
    print("| work behind | cases done | ETA shown | really left | error |")
    print("|---|---|---|---|---|")
    for row in rows:
        error = "—" if row["error"] is None else f"{row['error']:+.0%}"
        shown = f"{row['eta_s']} s" + (" (range {}–{} s)".format(*row["eta_range_s"]) if row["eta_range_s"] else "")
        print(f"| {row['work']:.0%} | {row['done']} | {shown} | {row['real_s']} s | {error} |")
    print(f"run {result['run_seconds']} s; first ETA {result['first_eta_after_s']} s after the start; "
          f"last output to exit {result['last_output_to_exit_s']} s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
