"""Multi-stage inference (an ensemble, postprocessing, a cascade, --best) in one command equals
nnU-Net's own chain of commands run by hand, voxel for voxel, also through a killed worker and a
killed and resumed supervisor; the stages run without a barrier; bad input is refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest

from conftest import MEMBERS, STAGE_CASES, PickledCall, cli, copy_outputs_mtimes, fake_env, fake_final, status_json

NUM_CASES = STAGE_CASES
FAST = ("-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1")


@pytest.fixture(autouse=True)
def results_of_the_stage_models(stages, monkeypatch):
    """`-d 998` in every launcher run of this module finds the stage models."""
    monkeypatch.setenv("nnUNet_results", stages["env"]["nnUNet_results"])


def ensemble_args(stages: dict, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "-i",
        str(stages["inputs"]),
        "-o",
        str(out),
        "-d",
        "998",
        "-c",
        *MEMBERS,
        "-f",
        "0",
        "-pp_pkl_file",
        stages["postprocessing_pkl"],
        "-plans_json",
        stages["plans_json"],
        *FAST,
        "--workers",
        "2",
        *extra,
    ]


def assert_same_segmentations(out: Path, reference: Path, extra_files: tuple[str, ...]) -> None:
    import numpy as np
    import SimpleITK as sitk

    segmentations = sorted(p.name for p in reference.iterdir() if p.name.endswith(".nii.gz"))
    assert len(segmentations) == NUM_CASES
    assert sorted(p.name for p in out.iterdir() if p.name != ".nnunet-launch") == sorted(
        segmentations + list(extra_files)
    )
    for name in segmentations:
        a, b = sitk.ReadImage(str(reference / name)), sitk.ReadImage(str(out / name))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), name
        assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin(), name


def stage_files(out: Path) -> list[str]:
    folder = out / ".nnunet-launch" / "stages"
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- equivalence with the manual chain, real nnU-Net --------------------------------------------
def test_an_ensemble_with_postprocessing_equals_the_manual_chain_and_a_rerun_does_nothing(stages, manual, tmp_path):
    out = tmp_path / "-out 'ü' ens"
    result = cli(*ensemble_args(stages, out), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "2d + 3d_fullres -> ensemble -> postprocessing" in result.stdout
    assert_same_segmentations(out, manual / "postprocessed", ("dataset.json", "plans.json"))
    assert stage_files(out) == []  # each case's member predictions went once its final output was in place
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    assert summary["stages"]["final"] == {"done": NUM_CASES}
    assert summary["stages"]["2d"] == summary["stages"]["3d_fullres"] == {"done": NUM_CASES}
    assert summary["intermediate_peak_bytes"] > 0

    # postprocessing really changed something, so the comparison above proves it ran
    import numpy as np
    import SimpleITK as sitk

    changed = [
        name
        for name in os.listdir(manual / "postprocessed")
        if name.endswith(".nii.gz")
        and not np.array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(manual / "ensemble" / name))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(manual / "postprocessed" / name))),
        )
    ]
    assert changed

    before = copy_outputs_mtimes(out)
    again = cli(*ensemble_args(stages, out), timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"nothing to predict: all {NUM_CASES} case(s) are done" in again.stdout
    assert copy_outputs_mtimes(out) == before

    status = cli("status", str(out))
    assert status.returncode == 0, status.stderr
    assert f"stage final: {NUM_CASES}/{NUM_CASES} case(s) done" in status.stdout
    assert f"stage 2d: {NUM_CASES}/{NUM_CASES} case(s) done" in status.stdout

    # another member set or another postprocessing is another result: refused, naming the difference
    other = ensemble_args(stages, out)
    other[other.index("3d_fullres")] = "3d_lowres"
    refused = cli(*other)
    assert refused.returncode == 2 and "members" in refused.stderr, refused.stderr
    pkl = tmp_path / "other pp.pkl"
    with open(stages["postprocessing_pkl"], "rb") as f:
        functions, kwargs = pickle.load(f)
    with open(pkl, "wb") as f:
        pickle.dump((functions, [{"labels_or_regions": 2}]), f)
    other = ensemble_args(stages, out)
    other[other.index(stages["postprocessing_pkl"])] = str(pkl)
    refused = cli(*other)
    assert refused.returncode == 2 and "postprocessing" in refused.stderr, refused.stderr
    assert copy_outputs_mtimes(out) == before


def test_best_predicts_what_find_best_configuration_chose(stages, manual, tmp_path):
    out = tmp_path / "best"
    plan = cli("plan", "-i", str(stages["inputs"]), "-o", str(out), "-d", "998", "--best", *FAST, "--workers", "2")
    assert plan.returncode == 0, plan.stderr
    assert "stages per case: 2d + 3d_fullres -> ensemble -> postprocessing" in plan.stdout
    assert f"stage final: 0/{NUM_CASES} case(s) done" in plan.stdout
    result = cli(
        "run", "-i", str(stages["inputs"]), "-o", str(out), "-d", "998", "--best", *FAST, "--workers", "2", timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert_same_segmentations(out, manual / "postprocessed", ("dataset.json", "plans.json"))


def test_a_cascade_predicts_its_lowres_stage_itself_and_equals_the_manual_cascade(stages, manual, tmp_path):
    out = tmp_path / "cascade"
    args = ["-i", str(stages["inputs"]), "-o", str(out), "-d", "998", "-c", "3d_cascade_fullres", "-f", "0", *FAST]
    result = cli("run", *args, "--workers", "2", "--keep-stages", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "3d_lowres -> 3d_cascade_fullres" in result.stdout
    # the last manual step is nnUNetv2_predict: its three files, nothing else
    extra = ("dataset.json", "plans.json", "predict_from_raw_data_args.json")
    assert_same_segmentations(out, manual / "cascade", extra)
    kept = stage_files(out)  # --keep-stages: the lowres predictions stay, and equal the manual ones
    assert kept == [f"3d_lowres/case_{i:03d}.nii.gz" for i in range(NUM_CASES)]
    import numpy as np
    import SimpleITK as sitk

    for name in kept:
        a = sitk.ReadImage(str(out / ".nnunet-launch" / "stages" / name))
        b = sitk.ReadImage(str(manual / "lowres" / os.path.basename(name)))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), name


def test_a_killed_worker_and_a_killed_resumed_supervisor_still_end_equal_to_the_chain(stages, manual, launch, tmp_path):
    out = tmp_path / "killed"
    first = launch(ensemble_args(stages, out, "--case-retries", "5"))
    seen: dict = {}

    def two_done_and_a_worker_alive() -> bool:  # one snapshot: a worker may be between cases' starts
        status = status_json(out) or {}
        seen["pids"] = [p["worker_pid"] for p in status.get("parts", []) if p["worker_pid"]]
        return status.get("done", 0) >= 2 and bool(seen["pids"])

    first.wait_until(two_done_and_a_worker_alive, 300, "two units done, a worker at work")
    os.kill(seen["pids"][0], signal.SIGKILL)
    first.wait_until(lambda: (status_json(out) or {}).get("done", 0) >= 5, 300, "three more units done")
    first.kill_everything()  # the supervisor and all below it, at once: SIGKILL
    assert first.proc.returncode == -signal.SIGKILL
    resumed = cli(*ensemble_args(stages, out), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_segmentations(out, manual / "postprocessed", ("dataset.json", "plans.json"))
    assert stage_files(out) == []
    assert sorted(os.listdir(out / ".nnunet-launch" / "tmp")) == []


# --- scheduling, failures and disk, with the fast stand-in backend ------------------------------
def fake_stage_args(stages: dict, inputs: Path, out: Path, *extra: str) -> list[str]:
    args = ensemble_args(stages, out, *extra)
    args[args.index(str(stages["inputs"]))] = str(inputs)
    return args


@pytest.fixture
def many(stages, tmp_path) -> Path:
    """24 cases (hard links: the stand-in backend does not read them)."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(24):
        os.link(stages["inputs"] / f"case_{i % NUM_CASES:03d}_0000.nii.gz", folder / f"case_{i:03d}_0000.nii.gz")
    return folder


def test_cases_are_combined_while_other_cases_are_still_predicted_and_intermediates_stay_few(stages, many, tmp_path):
    import csv
    import gzip

    out = tmp_path / "fake"
    result = cli(*fake_stage_args(stages, many, out), env=fake_env(tmp_path, case_seconds=0.3), timeout=300)
    assert result.returncode == 0, result.stderr
    for i in range(24):
        with gzip.open(out / f"case_{i:03d}.nii.gz") as f:
            assert f.read() == fake_final(many, f"case_{i:03d}")
    with (out / ".nnunet-launch" / "cases.csv").open() as f:
        rows = list(csv.DictReader(f))
    finals = [r for r in rows if "/" not in r["id"]]
    members = [r for r in rows if "/" in r["id"]]
    assert len(finals) == 24 and len(members) == 48
    # no stage barrier: the first final output was in place before the last prediction started
    assert min(r["ended"] for r in finals) < max(r["started"] for r in members)
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    assert stage_files(out) == []
    # bounded by the cases in flight (2 workers, a few cases each), not by the 24 cases
    member_bytes = 2 * len(fake_final(many, "case_000")) * 3  # generous: .npz + .pkl + segmentation
    assert 0 < summary["intermediate_peak_bytes"] < 10 * member_bytes


def test_save_probabilities_gives_the_ensembles_npz_and_keep_stages_keeps_the_members(stages, many, tmp_path):
    out = tmp_path / "probabilities"
    args = fake_stage_args(stages, many, out, "--save_probabilities", "--keep-stages")
    result = cli(*args, env=fake_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    names = set(os.listdir(out))
    for i in range(24):
        assert {f"case_{i:03d}.npz", f"case_{i:03d}.pkl", f"case_{i:03d}.nii.gz"} <= names
    assert "predict_from_raw_data_args.json" not in names  # the last manual step is not a prediction
    kept = stage_files(out)  # what nnUNetv2_ensemble needs of each member: .npz, .pkl, segmentation
    assert len(kept) == 24 * 3 * len(MEMBERS)
    assert {k.split("/")[0] for k in kept} == set(MEMBERS)


def test_a_failed_member_prediction_fails_only_its_case(stages, many, tmp_path):
    out = tmp_path / "fails"
    env = fake_env(tmp_path, {"3d_fullres/case_003": "error"})
    result = cli(*fake_stage_args(stages, many, out, "--case-retries", "1"), env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "1 failed" in result.stderr
    status = status_json(out)
    failed = {f["case"]: f["error"] for f in status["failed_cases"]}
    # the other member is not predicted for a case that failed, unless it had started by then
    assert {"3d_fullres/case_003", "case_003"} <= set(failed) <= {"3d_fullres/case_003", "case_003", "2d/case_003"}
    assert failed["case_003"] == "not run: 3d_fullres/case_003 failed"
    if "2d/case_003" in failed:
        assert failed["2d/case_003"] == "not run: 3d_fullres/case_003 failed, and its case with it"
    # cases first, the steps (units of work) second, in every view of the numbers
    steps, not_done = 24 * (len(MEMBERS) + 1), len(failed)
    assert status["cases"] == {**status["cases"], "done": 23, "failed": 1, "total": 24}
    assert status["steps"]["done"] == steps - not_done and status["steps"]["total"] == steps
    assert f"23/24 cases done ({steps - not_done}/{steps} steps), 1 failed" in cli("status", str(out)).stdout
    assert "23/24 case(s) predicted, 1 failed" in result.stderr
    assert not (out / "case_003.nii.gz").exists()
    assert stage_files(out) == [], "a failed case's member outputs are removed"
    assert len([n for n in os.listdir(out) if n.endswith(".nii.gz")]) == 23
    # the next run tries the failed units again (the fault is spent) and finishes the case
    env = fake_env(tmp_path, {})
    again = cli(*fake_stage_args(stages, many, out), env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (out / "case_003.nii.gz").exists()


def test_plan_shows_the_stages_and_takes_a_trainer_and_plans_per_member(stages, tmp_path):
    out = tmp_path / "planned"
    args = ["-i", str(stages["inputs"]), "-o", str(out), "-d", "998", "-c", *MEMBERS, "-f", "0", "-device", "cpu"]
    per_member = ["-tr", "nnUNetTrainer", "nnUNetTrainer", "-p", "nnUNetPlans", "nnUNetPlans"]
    result = cli("plan", *args, *per_member, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["stages"]["stages"] == "2d + 3d_fullres -> ensemble"
    assert plan["stages"]["per_stage"] == {s: {"done": 0, "total": NUM_CASES} for s in (*MEMBERS, "final")}
    assert not out.exists()


def test_a_cascades_previous_stage_is_its_own_trainers_even_beside_another_lowres_member(stages, tmp_path):
    results = _copy_results(stages, tmp_path)
    dataset = results / "Dataset998_Stages"
    shutil.copytree(dataset / "nnUNetTrainer__nnUNetPlans__3d_lowres", dataset / "OtherTrainer__nnUNetPlans__3d_lowres")
    args = ["-i", str(stages["inputs"]), "-o", str(tmp_path / "o"), "-d", "998", "-f", "0", "-device", "cpu"]
    members = ["-c", "3d_cascade_fullres", "3d_lowres", "-tr", "nnUNetTrainer", "OtherTrainer"]
    result = cli("plan", *args, *members, "--json", env={"nnUNet_results": str(results)})
    assert result.returncode == 0, result.stderr
    # nnU-Net's chain feeds the cascade its own trainer's lowres; the other lowres is a member of its own
    assert json.loads(result.stdout)["stages"]["stages"] == (
        "nnUNetTrainer__nnUNetPlans__3d_lowres -> 3d_cascade_fullres + OtherTrainer__nnUNetPlans__3d_lowres -> ensemble"
    )


# --- bad input: exit 2, one line, before any work -----------------------------------------------
def _copy_results(stages: dict, tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(stages["base"] / "results", results)
    return results


def refused(stages: dict, tmp_path: Path, *args: str, results: Path | None = None) -> str:
    out = tmp_path / "refused-out"
    env = {"nnUNet_results": str(results or stages["base"] / "results")}
    result = cli("run", "-i", str(stages["inputs"]), "-o", str(out), "-d", "998", *args, "-device", "cpu", env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()
    return result.stderr


def test_bad_multi_stage_input_is_one_line_and_exit_2(stages, tmp_path):
    assert "fold 1" in refused(stages, tmp_path, "-c", *MEMBERS, "-f", "0", "1")
    message = refused(stages, tmp_path, "-c", "2d", "3d_nope", "-f", "0")
    assert "no model" in message and "nnUNetTrainer__nnUNetPlans__3d_fullres" in message
    assert "ensembles" not in message and "inference_information.json" not in message, "model folders only"
    assert "belong to -pp_pkl_file" in refused(stages, tmp_path, "-c", "2d", "-f", "0", "-plans_json", "x.json")
    assert "uses --schedule dynamic" in refused(stages, tmp_path, "-c", *MEMBERS, "-f", "0", "--schedule", "static")
    assert "-tr takes one value or one per configuration" in refused(
        stages, tmp_path, "-c", *MEMBERS, "-tr", "a", "b", "c", "-f", "0"
    )

    results = _copy_results(stages, tmp_path)
    dataset = results / "Dataset998_Stages"
    labels_json = dataset / "nnUNetTrainer__nnUNetPlans__2d" / "dataset.json"
    content = json.loads(labels_json.read_text())
    content["labels"] = {"background": 0, "organ": 1}
    labels_json.write_text(json.dumps(content))
    assert "differ in their labels" in refused(stages, tmp_path, "-c", *MEMBERS, "-f", "0", results=results)

    not_pp = tmp_path / "not pp.pkl"
    not_pp.write_bytes(pickle.dumps({"functions": []}))
    message = refused(stages, tmp_path, "-c", *MEMBERS, "-f", "0", "-pp_pkl_file", str(not_pp))
    assert "not nnU-Net's postprocessing form" in message

    assert "leave out -c, -tr, -p, -f" in refused(stages, tmp_path, "--best", "-tr", "nnUNetTrainer", results=results)
    (dataset / "inference_information.json").unlink()
    assert "run nnUNetv2_find_best_configuration first" in refused(stages, tmp_path, "--best", results=results)

    shutil.rmtree(dataset / "nnUNetTrainer__nnUNetPlans__3d_lowres")
    message = refused(stages, tmp_path, "-c", "3d_cascade_fullres", "-f", "0", results=results)
    assert "cascade stage and needs its previous stage '3d_lowres'" in message


def test_a_rerun_without_the_postprocessing_or_a_member_is_refused_naming_the_difference(stages, many, tmp_path):
    """Fields only the first run's identity has (its postprocessing, its ensemble) are differences
    too: one line, exit 2, never an internal error."""
    out = tmp_path / "out"
    env = fake_env(tmp_path)
    assert cli(*fake_stage_args(stages, many, out), env=env, timeout=300).returncode == 0
    without_pp = fake_stage_args(stages, many, out)
    at = without_pp.index("-pp_pkl_file")
    del without_pp[at : at + 4]  # -pp_pkl_file PKL -plans_json JSON
    one_member = [a for a in without_pp if a != "3d_fullres"]
    for args in (without_pp, one_member):
        for command in ("run", "plan"):
            result = cli(command, *args[1:], env=env)
            assert result.returncode == 2, result.stderr
            assert "holds a run with a different" in result.stderr and "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1


def test_a_postprocessing_pickle_that_would_run_code_is_refused_before_anything_runs(stages, tmp_path):
    """numpy.load of a second pickle (allow_pickle=True) used to pass the check and run that
    pickle's command, even in `plan`. Only nnU-Net's postprocessing functions and numpy scalar
    constructors may be named; the workers load the file with the same restrictions."""
    import numpy as np

    from launcher.stages import load_postprocessing

    marker = tmp_path / "ran"
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(PickledCall(os.system, f"touch {marker}")))
    hostile = {
        "numpy.load": PickledCall(np.load, str(payload), None, True),
        "os.system": PickledCall(os.system, f"touch {marker}"),
        "builtins.eval": PickledCall(eval, f"open({str(marker)!r}, 'w')"),
    }
    with open(stages["postprocessing_pkl"], "rb") as f:
        functions, kwargs = pickle.load(f)
    for name, call in hostile.items():
        for placement in (([*functions, call], kwargs), (functions, [{"labels_or_regions": call}])):
            pkl = tmp_path / f"{name}.pkl"
            pkl.write_bytes(pickle.dumps(placement))
            args = ensemble_args(stages, tmp_path / "out")
            args[args.index(stages["postprocessing_pkl"])] = str(pkl)
            for command in ("plan", "run"):
                result = cli(command, *args[1:])
                assert result.returncode == 2, (name, result.stderr)
                assert "may name only nnU-Net's postprocessing functions" in result.stderr, result.stderr
                assert len(result.stderr.strip().splitlines()) == 1
            with pytest.raises(Exception, match="postprocessing"):
                load_postprocessing(str(pkl))
            assert not marker.exists(), name
    # nnU-Net's own file (a function and a numpy scalar) still loads, its function imported
    loaded_functions, loaded_kwargs = load_postprocessing(stages["postprocessing_pkl"])
    assert loaded_functions == functions and loaded_kwargs == kwargs
