"""Many machines through SLURM: a job array whose task k runs `nnunet-launch run` on node share
k of K, and a verify job after it. SLURM is the scheduler; each task is the single-machine
launcher with everything it does (restarts, journal, resume), on its node's share.

Global num_parts = K x G (G = worker slots per node); node k owns parts k*G .. k*G+G-1 of
nnU-Net's strided split, so any part is still reproducible with plain nnUNetv2_predict.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from launcher.errors import LauncherError
from launcher.outputs import slurm_dir

ARRAY_SCRIPT = "array.sbatch"
VERIFY_SCRIPT = "verify.sbatch"


def _header(job_name: str, log_name: str, out: str, options: dict) -> list[str]:
    folder = slurm_dir(out)
    if '"' in folder:
        raise LauncherError(f"the output folder {out!r} contains a double quote, which #SBATCH lines cannot hold")
    # quoted for spaces; % doubled because SLURM reads %-patterns (like %a) in this path
    log = '"' + os.path.join(folder.replace("%", "%%"), log_name) + '"'
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --output={log}"]
    for key in ("partition", "time", "account"):
        if options.get(key):
            lines.append(f"#SBATCH --{key}={options[key]}")
    lines += [f"#SBATCH {arg}" for arg in options.get("sbatch_args", ())]
    return lines


def array_script(
    run_args: list[str], out: str, nodes: int, parts_per_node: int, gpus_per_node: int | None, options: dict
) -> str:
    """Task k runs the launcher on share k; requeue-safe because each share resumes from its own
    journal in OUT/.nnunet-launch/node-k/."""
    lines = _header("nnunet-launch", "task-%a.log", out, options)
    # append: a requeued or resubmitted task adds to its log instead of erasing the earlier attempt's
    lines += [f"#SBATCH --array=0-{nodes - 1}", "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --ntasks=1"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gres=gpu:{gpus_per_node}")
    command = [
        sys.executable,
        "-m",
        "launcher",
        "run",
        *run_args,
        "--nodes",
        str(nodes),
        "--parts-per-node",
        str(parts_per_node),
    ]
    lines += [
        "",
        "# SLURM's --gres sets CUDA_VISIBLE_DEVICES; the launcher uses only those GPUs.",
        f'exec {shlex.join(command)} --node "$SLURM_ARRAY_TASK_ID"',
        "",
    ]
    return "\n".join(lines)


def verify_script(run_args: list[str], out: str, nodes: int, parts_per_node: int, options: dict) -> str:
    lines = _header("nnunet-launch-verify", "verify.log", out, options)
    lines += ["#SBATCH --ntasks=1"]
    command = [
        sys.executable,
        "-m",
        "launcher",
        "verify",
        *run_args,
        "--nodes",
        str(nodes),
        "--parts-per-node",
        str(parts_per_node),
    ]
    lines += ["", f"exec {shlex.join(command)}", ""]
    return "\n".join(lines)


def write_scripts(out: str, array_text: str, verify_text: str) -> tuple[str, str]:
    os.makedirs(slurm_dir(out), exist_ok=True)
    paths = []
    for name, text in ((ARRAY_SCRIPT, array_text), (VERIFY_SCRIPT, verify_text)):
        path = os.path.join(slurm_dir(out), name)
        with open(path, "w") as f:
            f.write(text)
        paths.append(path)
    return paths[0], paths[1]


def require_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LauncherError("sbatch not found: run this on a SLURM login node (or leave out --submit)")
    return sbatch


def submit(array_path: str, verify_path: str) -> tuple[str, str]:
    """Submit the array, then the verify job after it (afterany: it runs even when tasks fail,
    to say what is missing). Returns the two job ids."""
    sbatch = require_sbatch()
    array_id = _sbatch([sbatch, "--parsable", array_path])
    verify_id = _sbatch([sbatch, "--parsable", f"--dependency=afterany:{array_id}", verify_path])
    return array_id, verify_id


def _sbatch(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LauncherError(f"sbatch failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]
