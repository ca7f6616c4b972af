"""A pasted nnUNetv2_predict line just works, `plan` is a faithful dry run, and the small
things a new user trips over: --version, choices, warnings."""

from __future__ import annotations

import json

from conftest import cli, fake_env, model_args, run_args
from launcher.scheduler import static_parts

FAKE_GPUS = [
    {"index": 0, "uuid": "GPU-aaaa-1111", "name": "H100", "memory_total": 80 << 30, "memory_used": 0},
    {"index": 1, "uuid": "GPU-bbbb-2222", "name": "H100", "memory_total": 80 << 30, "memory_used": 0},
]


def _ids(tiny) -> list[str]:
    return sorted(p.name[: -len("_0000.nii.gz")] for p in tiny["inputs"].glob("*_0000.nii.gz"))


def test_num_parts_and_part_id_predict_exactly_that_part_of_nnunets_split(tiny, tmp_path):
    out = tmp_path / "out"
    pasted = ["-num_parts", "3", "-part_id", "1", "--disable_progress_bar"]
    plan = json.loads(cli("plan", *run_args(tiny, out, "--workers", "2", *pasted)[1:], "--json").stdout)
    planned = sorted(c for part in plan["parts"] for c in part["cases"])
    assert planned == static_parts(_ids(tiny), 3)[1]
    result = cli(*run_args(tiny, out, "--workers", "2", *pasted), env=fake_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "-num_parts 3 -part_id 1: only this part of nnU-Net's split (4 case(s))" in result.stdout
    predicted = sorted(p.name[: -len(".nii.gz")] for p in out.glob("case_*.nii.gz"))
    assert predicted == static_parts(_ids(tiny), 3)[1]
    status = json.loads(cli("status", str(out), "--json").stdout)
    assert status["done"] == 4, "each part keeps its own journal; status merges them"


def test_gpus_with_spaces_and_launcher_flags_with_underscores_are_accepted(tiny, tmp_path):
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps(FAKE_GPUS))
    env = {"NNUNET_LAUNCH_FAKE_GPUS": str(fake)}
    args = model_args(tiny, tmp_path / "out")
    for spelling in (["--gpus", "0", "1"], ["--gpus", "0,", "1"], ["--gpus", "0,1"]):
        result = cli("plan", *args, *spelling, "--workers_per_gpu", "2", "--max_restarts=5", "--json", env=env)
        assert result.returncode == 0, (spelling, result.stderr)
        assert [p["gpu"] for p in json.loads(result.stdout)["parts"]] == ["gpu0", "gpu0", "gpu1", "gpu1"]


def test_plan_tells_what_run_would_do_on_an_existing_output_folder(tiny, tmp_path):
    out = tmp_path / "out"
    cases = _ids(tiny)
    faults = {cases[0]: "unreadable"}
    first = cli(*run_args(tiny, out, "--workers", "2"), env=fake_env(tmp_path, faults))
    assert first.returncode == 1
    plan = json.loads(cli("plan", *run_args(tiny, out, "--workers", "2")[1:], "--json").stdout)
    assert (plan["done"], plan["to_do"], plan["failed_tried_again"]) == (11, 1, 1)
    assert plan["model_folder"] == str(tiny["model"]) and plan["assignment"] == "estimate"
    fresh = json.loads(cli("plan", *run_args(tiny, out, "--workers", "2", "--fresh")[1:], "--json").stdout)
    assert fresh["fresh_would_delete"] == 11 and fresh["done"] == 0
    assert fresh["fresh_would_delete_files"] == [f"{c}.nii.gz" for c in sorted(cases[1:])]
    text = cli("plan", *run_args(tiny, out, "--workers", "2", "--fresh")[1:]).stdout
    assert f"--fresh would delete 11 output file(s): {cases[1]}.nii.gz, " in text
    text = cli("plan", *run_args(tiny, out, "--workers", "2")[1:]).stdout
    assert "11 already done in the output folder, 1 to predict" in text and "(an estimate)" in text
    assert "  part 0 on cpu: 1 case(s), 100% of the work" in text, "only the cases still to predict"
    assert "1 part(s) get nothing" in text
    assert sorted(p.name for p in out.glob("case_*")) == sorted(f"{c}.nii.gz" for c in cases[1:]), "plan wrote nothing"


def test_version_choices_and_warnings_a_new_user_needs(tiny, tmp_path):
    version = cli("--version")
    assert version.returncode == 0 and "nnunet-launch, version" in version.stdout
    help_text = cli("run", "--help").stdout
    assert "[dynamic|static]" in help_text and "[cuda|cpu]" in help_text
    assert "probabilities" in help_text and "previous stage" in help_text
    args = model_args(tiny, tmp_path / "out")
    result = cli("plan", *args, "-device", "cpu", "--gpus", "1", "--workers", "64")
    assert result.returncode == 0, result.stderr
    assert "--gpus 1 is ignored with -device cpu" in result.stderr
    assert (
        "--workers 64 on" in result.stderr and "64 workers for 12 case(s): 52 will have nothing to do" in result.stderr
    )


def test_a_part_run_beside_a_plain_run_has_its_own_state_and_they_take_turns(tiny, tmp_path):
    """-part_id runs keep their state in part-k (SLURM nodes use node-k): `status` keeps showing
    the plain run's cases and lists the part run apart; a part run waits for a running plain run."""
    from launcher.journal import OutLock
    from launcher.outputs import lock_path, state_dir

    out = tmp_path / "out"
    env = fake_env(tmp_path)
    assert cli(*run_args(tiny, out, "--workers", "2"), env=env).returncode == 0
    part = run_args(tiny, out, "--workers", "2", "-num_parts", "2", "-part_id", "0", "--continue_prediction")
    assert cli(*part, env=env).returncode == 0
    assert (out / ".nnunet-launch" / "part-0" / "journal.sqlite").is_file()
    status = json.loads(cli("status", str(out), "--json").stdout)
    assert (status["done"], status["total"]) == (12, 12), "the plain run's cases, not the part's 6"
    assert [(o["run"], o["done"]) for o in status["other_runs"]] == [("-part_id 0", 6)]
    assert "also on this output folder, -part_id 0: 6/6 done" in cli("status", str(out)).stdout

    plain_lock = OutLock(lock_path(state_dir(str(out))))
    plain_lock.acquire()
    try:
        refused = cli(*part, env=env)
    finally:
        plain_lock.release()
    assert refused.returncode == 2 and "a plain run of this output folder is running" in refused.stderr


def test_part_runs_and_a_plain_run_into_one_out_keep_each_others_outputs_and_status_names_every_part(tiny, tmp_path):
    """nnU-Net's -num_parts/-part_id runs into one OUT, then a plain run there (or the other way
    round), as the README invites: the outputs another share placed are the launcher's, verified
    and kept, not refused as another tool's."""
    out, env = tmp_path / "out", fake_env(tmp_path)
    for part_id in ("0", "1"):
        part = run_args(tiny, out, "--workers", "1", "-num_parts", "2", "-part_id", part_id)
        result = cli(*part, env=env)
        assert result.returncode == 0, result.stderr
    shown = cli("status", str(out)).stdout
    assert "  -part_id 0, part 0 (cpu): 6/6 done" in shown and "  -part_id 1, part 0 (cpu): 6/6 done" in shown, shown
    plain = cli(*run_args(tiny, out, "--workers", "2"), env=env)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.count("kept (existing output verified)") == 12

    other = tmp_path / "other"
    assert cli(*run_args(tiny, other, "--workers", "2"), env=env).returncode == 0
    part = cli(*run_args(tiny, other, "--workers", "2", "-num_parts", "2", "-part_id", "1"), env=env)
    assert part.returncode == 0, part.stderr
    assert part.stdout.count("kept (existing output verified)") == 6
