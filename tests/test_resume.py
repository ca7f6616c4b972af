"""Resuming on an OUT that already holds predictions, refusing a different run, the lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_same_predictions, cli, copy_outputs_mtimes, run_args
from launcher.errors import LauncherError
from launcher.journal import OutLock, lock_holder


@pytest.mark.accelerator  # real nnU-Net through the worker's unreadable-scan / verify-output paths
def test_continue_prediction_keeps_complete_outputs_and_predicts_truncated_and_missing_ones(tiny, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    truncated = out / "case_001.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (out / "case_002.nii.gz").unlink()
    kept = {n: m for n, m in copy_outputs_mtimes(out).items() if n.startswith("case_") and n != truncated.name}

    refused = cli(*run_args(tiny, out, "--workers", "2"))
    assert refused.returncode == 2 and "--continue_prediction" in refused.stderr
    assert not (out / ".nnunet-launch").exists()

    result = cli(*run_args(tiny, out, "--workers", "2", "--continue_prediction"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("kept (existing output verified)") == len(kept)
    assert_same_predictions(out, reference)
    after = copy_outputs_mtimes(out)
    assert {n: after[n] for n in kept} == kept

    # the same OUT with an output-changing flag is refused, naming it; nothing changes
    before = copy_outputs_mtimes(out)
    other = cli(*run_args(tiny, out, "--workers", "2", "-step_size", "0.7"))
    assert other.returncode == 2 and "different step_size (0.5, now 0.7)" in other.stderr
    assert copy_outputs_mtimes(out) == before

    # --fresh discards the previous run's outputs and says so, then predicts everything again
    fresh = cli(*run_args(tiny, out, "--workers", "2", "--fresh"), timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert "--fresh: discarded the previous run's state and 12 output file(s)" in fresh.stdout
    # ... after naming them, with the full list kept in the logs
    named = next(line for line in fresh.stdout.splitlines() if "--fresh: deleting 12 output file(s): " in line)
    assert "case_000.nii.gz, case_001.nii.gz" in named
    listed = named.split("all of them listed in ")[1].split(")")[0]
    assert Path(listed).read_text().split() == sorted(f"case_{i:03d}.nii.gz" for i in range(12))
    assert all(after[n] < m for n, m in copy_outputs_mtimes(out).items() if n.startswith("case_"))
    assert_same_predictions(out, reference)


HOLD_LOCK = """
import sys, time
from launcher.journal import OutLock
OutLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_lock_is_refused_while_held_and_free_once_its_holder_died(tmp_path):
    path = str(tmp_path / "lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(path) == holder.pid
        started = time.monotonic()
        try:
            OutLock(path).acquire()
            raise AssertionError("a held lock was granted")
        except LauncherError as exc:
            assert f"pid {holder.pid}" in str(exc)
        assert time.monotonic() - started < 1
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(path), "the stale lock file is still there"
    assert lock_holder(path) is None
    lock = OutLock(path)
    lock.acquire()
    lock.release()


def test_the_run_identity_is_one_schema_every_field_present_and_one_diff():
    from launcher.config import RunIdentity

    single = RunIdentity("/m", "3d_fullres", ("0",), "checkpoint_final.pth", "/in", 0.5, False, False)
    stored = single.to_json()
    assert set(stored) == set(RunIdentity.__dataclass_fields__), "every field, None when unused"
    assert RunIdentity.from_json(stored) == single
    older = {k: v for k, v in stored.items() if k not in ("profile", "members", "final_stage")}
    assert RunIdentity.from_json(older) == single, "a journal from before a field existed: its default"
    ensemble = RunIdentity.from_json({**stored, "members": ["2d=/a", "3d_fullres=/b"], "ensemble": ["2d"]})
    assert single.diff(ensemble) == ["members", "ensemble"] and ensemble.diff(single) == ["members", "ensemble"]
    assert single.diff(RunIdentity.from_json({**stored, "profile": "fast", "folds": ["1"]})) == ["folds", "profile"]


def test_folds_in_another_order_are_refused_saying_why_order_matters():
    from launcher.config import RunIdentity
    from launcher.runner import identity_refusal

    first = RunIdentity("/m", "3d_fullres", ("0", "1"), "checkpoint_final.pth", "/in", 0.5, False, False)
    swapped = RunIdentity.from_json({**first.to_json(), "folds": ["1", "0"]})
    refusal = identity_refusal("OUT", first, swapped)
    assert (
        "different folds (('0', '1'), now ('1', '0'))" in refusal
        and "sums the folds' predictions in the order" in refusal
    )
    assert identity_refusal("OUT", first, first) is None
    other = identity_refusal("OUT", first, RunIdentity.from_json({**first.to_json(), "folds": ["2"]}))
    assert "in the order" not in other, "another set of folds needs no word on order"


def test_another_tools_output_for_a_new_case_is_refused_after_a_finished_run_as_on_a_first_run(tiny, tmp_path):
    """Once a journal exists, an output in OUT for a case the launcher never started is another
    tool's: refused (exit 2, nothing changed) unless --continue_prediction keeps it if it decodes."""
    import gzip

    from conftest import fake_env, linked_cases

    data = linked_cases(tiny, tmp_path / "inputs", 6)
    out = tmp_path / "out"
    env = fake_env(tmp_path)
    assert cli(*run_args(data, out, "--workers", "2"), env=env).returncode == 0
    os.link(data["inputs"] / "case_000_0000.nii.gz", data["inputs"] / "case_new_0000.nii.gz")
    (out / "case_new.nii.gz").write_bytes(gzip.compress(b"written by another tool"))
    before = copy_outputs_mtimes(out)
    refused = cli(*run_args(data, out, "--workers", "2"), env=env)
    assert refused.returncode == 2 and "1 prediction(s) not made by nnunet-launch (e.g. 'case_new')" in refused.stderr
    assert copy_outputs_mtimes(out) == before
    kept = cli(*run_args(data, out, "--workers", "2", "--continue_prediction"), env=env)
    assert kept.returncode == 0, kept.stderr
    assert "done case_new (kept (existing output verified))" in kept.stdout
