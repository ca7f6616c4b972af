"""Real nnU-Net on the CPU: the launcher against the manual method, its overhead, and recovery.

1. Skewed set (case_000 about 13x the median of the 15 others), 2 parts: the launcher (dynamic schedule,
   2 workers) vs the manual method (2 concurrent `nnUNetv2_predict -num_parts 2 -part_id k`),
   alternating runs in one invocation. Target: launcher faster.
2. Overhead: the launcher with 1 worker vs one `nnUNetv2_predict` on the same even set.
   Target: <= 1.05x.
3. Recovery: from SIGKILL of a worker to its replacement finishing a case, vs a cold start
   (launcher start to the first finished case).

The launcher gets the same -npp 1 -nps 1 per worker as the plain runs.

    python scripts/bench_cpu.py [--reps 2] [--big-edge 96] [--overhead-cases 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMON = ["-c", "3d_fullres", "-f", "0", "-device", "cpu", "--disable_tta"]


def make_dataset(base: Path, name: str, cases: int, big_edge: int | None) -> dict:
    """A model under nnUNet_results (so plain nnUNetv2_predict -d works) and its inputs."""
    results = base / name / "results"
    model = results / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    inputs = base / name / "inputs"
    args = [
        sys.executable,
        str(ROOT / "scripts" / "make_tiny_model.py"),
        "--model",
        str(model),
        "--inputs",
        str(inputs),
        "--cases",
        str(cases),
    ]
    if big_edge:
        args += ["--big-case-edge", str(big_edge)]
    subprocess.run(args, check=True)
    return {"results": results, "inputs": inputs}


def timed(commands: list[list[str]], env: dict) -> float:
    started = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for c in commands]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"benchmark command failed ({codes}): {commands}")
    return time.perf_counter() - started


def plain(data: dict, out: Path, extra: list[str] = ()) -> list[str]:
    return [
        str(BIN / "nnUNetv2_predict"),
        "-i",
        str(data["inputs"]),
        "-o",
        str(out),
        "-d",
        "999",
        *COMMON,
        "--disable_progress_bar",
        "-npp",
        "1",
        "-nps",
        "1",
        *extra,
    ]


def launcher(data: dict, out: Path, extra: list[str]) -> list[str]:
    return [str(BIN / "nnunet-launch"), "run", "-i", str(data["inputs"]), "-o", str(out), "-d", "999", *COMMON, *extra]


def env_for(data: dict) -> dict:
    return {**os.environ, "nnUNet_results": str(data["results"])}


def skewed_vs_manual(base: Path, reps: int, big_edge: int) -> dict:
    data = make_dataset(base, "skewed", 16, big_edge)
    env = env_for(data)
    manual, ours = [], []
    for rep in range(reps):
        out = base / f"manual-{rep}"
        manual.append(timed([plain(data, out, ["-num_parts", "2", "-part_id", str(k)]) for k in (0, 1)], env))
        ours.append(timed([launcher(data, base / f"launcher-{rep}", ["--workers", "2"])], env))
    return {"manual_s": manual, "launcher_s": ours, "ratio_launcher_over_manual": min(ours) / min(manual)}


def overhead(base: Path, reps: int, cases: int) -> dict:
    data = make_dataset(base, "even", cases, None)
    env = env_for(data)
    single, ours = [], []
    for rep in range(reps):
        single.append(timed([plain(data, base / f"single-{rep}")], env))
        ours.append(timed([launcher(data, base / f"one-worker-{rep}", ["--workers", "1"])], env))
    return {"plain_s": single, "launcher_1_worker_s": ours, "ratio": min(ours) / min(single)}


def recovery(base: Path) -> dict:
    """SIGKILL a worker right after its part's first finished case; time until the restarted
    worker of that part finishes a case, against the cold start (launch to first case)."""
    data = make_dataset(base, "recovery", 12, None)
    out = base / "recovery-out"
    started = time.perf_counter()
    proc = subprocess.Popen(
        launcher(data, out, ["--workers", "2"]), stdout=subprocess.PIPE, text=True, env=env_for(data)
    )
    cold = killed_at = restarted = replacement = victim_part = None
    for line in proc.stdout:
        now = time.perf_counter()
        done = re.search(r"\[part (\d+) cpu\] done", line)
        if done and cold is None:
            cold = now - started
            victim_part = int(done.group(1))
            status = json.loads(
                subprocess.run(
                    [str(BIN / "nnunet-launch"), "status", str(out), "--json"], capture_output=True, text=True
                ).stdout
            )
            os.kill(next(p["worker_pid"] for p in status["parts"] if p["part_id"] == victim_part), signal.SIGKILL)
            killed_at = time.perf_counter()
        elif killed_at and restarted is None and f"[part {victim_part}] worker died" in line:
            restarted = now - killed_at
        elif done and restarted is not None and replacement is None and int(done.group(1)) == victim_part:
            replacement = now - killed_at
    proc.wait()
    return {
        "cold_start_to_first_case_s": cold,
        "kill_to_restart_noticed_s": restarted,
        "kill_to_replacement_case_s": replacement,
        "exit_code": proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--big-edge",
        type=int,
        default=96,
        help="edge of the big case: 96^3 is ~13x the median small case, like a 1,000-slice CT "
        "among ~80-slice ones; about the work of all the others together",
    )
    parser.add_argument("--overhead-cases", type=int, default=40)
    parser.add_argument("--only", choices=["skewed", "overhead", "recovery"], help="run one section")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    try:
        sections = {
            "skewed": lambda: skewed_vs_manual(base, args.reps, args.big_edge),
            "overhead": lambda: overhead(base, args.reps, args.overhead_cases),
            "recovery": lambda: recovery(base),
        }
        results = {
            "machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.machine()}",
            "date": time.strftime("%Y-%m-%d"),
        }
        for name, section in sections.items():
            if args.only in (None, name):
                results[name] = section()
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
