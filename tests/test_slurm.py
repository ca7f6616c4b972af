"""SLURM: the job array and verify job, on a real SLURM cluster (Debian's Slurm 22.05 started by
the tests under a temporary folder), not a mock."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, available

from conftest import ROOT, assert_same_predictions, cli, copy_outputs_mtimes

GOLDEN = ROOT / "tests" / "golden"


def slurm_args(small: dict, out: Path, *extra: str) -> list[str]:
    return [
        "slurm",
        "-i",
        str(small["inputs"]),
        "-o",
        str(out),
        "-m",
        str(small["model"]),
        "-f",
        "0",
        "-device",
        "cpu",
        "--disable_tta",
        "--workers",
        "1",
        "--nodes",
        "2",
        *extra,
    ]


def test_generated_scripts_match_the_golden_files(small, tmp_path):
    out = tmp_path / "out 'q' 50%"
    result = cli(
        *slurm_args(
            small,
            out,
            "--partition",
            "gpu-long",
            "--time",
            "12:00:00",
            "--account",
            "lab",
            "--sbatch-arg=--mem=64G",
            "--sbatch-arg=--qos=high",
        )
    )
    assert result.returncode == 0, result.stderr
    folder = out / ".nnunet-launch" / "slurm"
    for name in ("array.sbatch", "verify.sbatch"):
        text = (folder / name).read_text()
        text = text.replace(sys.executable, "PYTHON").replace(str(tmp_path), "TMP")
        text = text.replace(shlex.quote(str(small["inputs"])), "INPUTS").replace(
            shlex.quote(str(small["model"])), "MODEL"
        )
        assert text == (GOLDEN / name).read_text(), f"{name} differs from tests/golden/{name}:\n{text}"


def test_slurm_checks_input_before_writing_or_submitting(small, tmp_path):
    out = tmp_path / "out"
    bad = cli(*slurm_args({**small, "inputs": tmp_path / "missing"}, out, "--submit"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    assert not out.exists()
    no_sbatch = cli(*slurm_args(small, out, "--submit"), env={"PATH": "/nonexistent"})
    assert no_sbatch.returncode == 2 and "sbatch not found" in no_sbatch.stderr
    assert no_sbatch.stderr.count("\n") == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def cluster():
    reason = available()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    # not under pytest's tmp folders: munged wants every folder above its socket searchable by all
    root = Path(tempfile.mkdtemp(prefix="nnunet-launch-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _submit(cluster: SlurmCluster, small: dict, out: Path) -> tuple[str, str]:
    result = cluster.run(sys.executable, "-m", "launcher", *slurm_args(small, out, "--submit"))
    match = re.search(r"submitted: array job (\d+) \(2 task\(s\)\), verify job (\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1), match.group(2)


def _node_done(out: Path, node: int) -> int:
    path = out / ".nnunet-launch" / f"node-{node}" / "journal.sqlite"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM cases WHERE state='done'").fetchone()[0]
    except sqlite3.OperationalError:  # the task is still creating its journal
        return 0
    finally:
        db.close()


def test_array_of_two_nodes_and_the_verify_job_succeed_with_identical_outputs(cluster, small, tmp_path):
    out = tmp_path / "out dir"
    array_id, verify_id = _submit(cluster, small, out)
    states = cluster.wait_done(array_id, 300)
    assert states == {f"{array_id}_0": ("COMPLETED", "0:0"), f"{array_id}_1": ("COMPLETED", "0:0")}, states
    assert cluster.wait_done(verify_id, 120)[verify_id] == ("COMPLETED", "0:0")
    assert_same_predictions(out, small["reference"])
    verify_log = (out / ".nnunet-launch" / "slurm" / "verify.log").read_text()
    assert "all 6 case(s) have complete outputs" in verify_log
    status = json.loads(cli("status", str(out), "--json").stdout)
    assert status["total"] == status["done"] == 6
    assert [(n["node"], n["done"]) for n in status["nodes"]] == [(0, 3), (1, 3)]
    assert sorted(p["part_id"] for p in status["parts"]) == [0, 1]
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    assert summary["done"] == 6 and summary["exit_code"] == 0


def test_cancelled_task_resumes_when_resubmitted_and_nothing_is_predicted_twice(cluster, small, tmp_path):
    out = tmp_path / "out"
    array_id, verify_id = _submit(cluster, small, out)
    deadline = time.monotonic() + 240
    while _node_done(out, 0) < 1:
        assert time.monotonic() < deadline, "node 0 finished no case"
        time.sleep(0.2)
    cluster.run("scancel", f"{array_id}_0")
    states = cluster.wait_done(array_id, 120)
    assert states[f"{array_id}_0"][0] == "CANCELLED" and states[f"{array_id}_1"] == ("COMPLETED", "0:0"), states
    done_before = {n: m for n, m in copy_outputs_mtimes(out).items() if n.endswith(".nii.gz")}
    assert 1 <= _node_done(out, 0) < 3 or len(done_before) == 6

    # the verify job ran after the array, names what is missing and the command that finishes it
    assert cluster.wait_done(verify_id, 120)[verify_id][0] == "FAILED"
    verify_log = (out / ".nnunet-launch" / "slurm" / "verify.log").read_text()
    array_script = out / ".nnunet-launch" / "slurm" / "array.sbatch"
    assert f"finish them with: sbatch --array=0 {array_script}" in verify_log

    again = cluster.run("sbatch", "--parsable", "--array=0", str(array_script)).stdout.strip()
    check = cluster.run(
        "sbatch",
        "--parsable",
        f"--dependency=afterany:{again}",
        str(out / ".nnunet-launch" / "slurm" / "verify.sbatch"),
    ).stdout.strip()
    assert cluster.wait_done(again, 300)[f"{again}_0"] == ("COMPLETED", "0:0")
    assert cluster.wait_done(check, 120)[check] == ("COMPLETED", "0:0")
    assert_same_predictions(out, small["reference"])
    after = copy_outputs_mtimes(out)
    assert {n: after[n] for n in done_before} == done_before, "finished cases were not predicted again"
    log = (out / ".nnunet-launch" / "slurm" / "task-0.log").read_text()
    assert "interrupted" in log and log.count("resume with:") == 1, "both attempts are in the log"
    done_lines = re.findall(r"\] done (case_\d+) ", log)
    assert len(done_lines) == len(set(done_lines)) == 3, "each of node 0's cases done exactly once"
    os.sync()
