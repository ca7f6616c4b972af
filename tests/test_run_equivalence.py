"""A whole run on the CPU with real nnU-Net equals one plain nnUNetv2_predict run."""

from __future__ import annotations

import json

from conftest import NUM_CASES, assert_same_predictions, cli, copy_outputs_mtimes, run_args, status_json


def test_two_static_cpu_workers_give_outputs_identical_to_plain_nnunet_and_no_extra_files(tiny, reference, tmp_path):
    out = tmp_path / "-out dir 'q' ü"  # a leading dash, spaces, quotes, unicode
    result = cli(*run_args(tiny, out, "--workers", "2", "--schedule", "static"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, reference)
    assert sorted(p.name for p in (out / ".nnunet-launch" / "tmp").iterdir()) == []
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    assert summary["done"] == NUM_CASES and summary["failed"] == 0
    assert [p["done"] for p in summary["parts"]] == [NUM_CASES // 2, NUM_CASES // 2]

    status = status_json(out)
    assert status["done"] == status["total"] == NUM_CASES and status["launcher_running"] is False
    assert [(p["part_id"], p["done"], p["restarts"]) for p in status["parts"]] == [(0, 6, 0), (1, 6, 0)]

    # a rerun of the finished run says so in one line, starts no run and keeps its report
    before = copy_outputs_mtimes(out)
    report = (out / ".nnunet-launch" / "summary.json").read_text()
    again = cli(*run_args(tiny, out, "--workers", "2", "--schedule", "static"), timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"nnunet-launch: nothing to predict: all {NUM_CASES} case(s) are done in {out} "
        f"(the last run's report: {out / '.nnunet-launch' / 'summary.json'})"
    ]
    assert copy_outputs_mtimes(out) == before
    assert (out / ".nnunet-launch" / "summary.json").read_text() == report
    assert len(json.loads(report)["runs"]) == 1 and status_json(out)["last_run"]["exit_code"] == 0
