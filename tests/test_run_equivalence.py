"""A whole run on the CPU with real nnU-Net equals one plain nnUNetv2_predict run."""

from __future__ import annotations

import json
import pickle

import numpy as np

from conftest import (
    NUM_CASES,
    PLAIN_NNUNET_EXPORT_THREADS,
    assert_same_predictions,
    cli,
    copy_outputs_mtimes,
    plain_nnunet,
    run_args,
    status_json,
)


def test_two_static_cpu_workers_give_outputs_identical_to_plain_nnunet_and_no_extra_files(tiny, reference, tmp_path):
    out = tmp_path / "-out dir 'q' ü"  # a leading dash, spaces, quotes, unicode
    result = cli(*run_args(tiny, out, "--workers", "2", "--schedule", "static"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, reference)
    assert sorted(p.name for p in (out / ".nnunet-launch" / "tmp").iterdir()) == []
    # the call's record says what plain's says (a whole run: nnU-Net's 1 part), but for the paths and helpers
    args = [json.loads((o / "predict_from_raw_data_args.json").read_text()) for o in (out, reference)]
    paths_and_helpers = {"list_of_lists_or_source_folder", "output_folder_or_list_of_truncated_output_files"}
    paths_and_helpers |= {"num_processes_preprocessing", "num_processes_segmentation_export"}
    assert [{k: v for k, v in a.items() if k not in paths_and_helpers} for a in args] == [
        {k: v for k, v in args[1].items() if k not in paths_and_helpers}
    ] * 2
    assert args[0]["num_parts"] == 1 and args[0]["output_folder_or_list_of_truncated_output_files"] == str(out)
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


def test_saved_probabilities_are_bit_identical_to_plain_nnunet_exporting_with_its_own_thread_count(
    small, tmp_path, monkeypatch
):
    """Plain nnU-Net exports with nnU-Net's default_num_processes torch threads (nnUNet_def_n_proc),
    and the thread count changes the probabilities' last bits: the exact export uses the same count,
    not the worker's one thread (before, 4-15 values per case differed by 6e-8)."""
    monkeypatch.setenv("nnUNet_def_n_proc", "3")
    reference, out = tmp_path / "plain", tmp_path / "launched"
    plain_nnunet(small["inputs"], reference, small["model"], "--save_probabilities", script=PLAIN_NNUNET_EXPORT_THREADS)
    result = cli(*run_args(small, out, "--workers", "2", "--save_probabilities"), timeout=300)
    assert result.returncode == 0, result.stderr
    log = (out / ".nnunet-launch" / "logs" / "run-1.part-0.attempt-1.log").read_text()
    assert "threads=1 " in log  # the network on one thread, as plain's above
    assert_same_predictions(out, reference)
    for case_id in small["ids"]:
        ours, theirs = np.load(out / f"{case_id}.npz"), np.load(reference / f"{case_id}.npz")
        assert ours.files == theirs.files == ["probabilities"]
        a, b = ours["probabilities"], theirs["probabilities"]
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), case_id
        with open(out / f"{case_id}.pkl", "rb") as mine, open(reference / f"{case_id}.pkl", "rb") as plain:
            assert repr(pickle.load(mine)) == repr(pickle.load(plain)), case_id
