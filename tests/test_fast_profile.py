"""--profile fast: nnU-Net's torch resampling for the export, chunked; batched mirroring and folds
summed on the device. Opt-in, so it is held to its measured agreement with plain nnU-Net, not to
identity; the default profile's identity is what the equivalence tests guard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import MEMBERS, ROOT, STAGE_CASES, cli, fake_env, fake_final, run_args

sys.path.insert(0, str(ROOT / "scripts"))
import make_tiny_model as tiny  # noqa: E402

from launcher import fast_profile  # noqa: E402
from launcher.device import Device  # noqa: E402

# xdist: fast_out and the two-fold predictor are built once, on one xdist worker
pytestmark = pytest.mark.xdist_group("fast_profile")

CPU = Device(torch.device("cpu"))

MIN_EQUAL_VOXELS = 0.998  # the README's published floor for the fast profile
MIN_DICE = 0.99
MAX_VOLUME_CHANGE = 0.02
DICE_MIN_VOXELS = 1000
RESAMPLED = ("case_002", "case_005")  # 1.5 mm cases: the export resamples them (make_tiny_model)


def _seg(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    return {
        int(label): 2 * np.sum((a == label) & (b == label)) / (np.sum(a == label) + np.sum(b == label))
        for label in np.unique(a)
        if label != 0 and np.sum(a == label) >= DICE_MIN_VOXELS
    }


@pytest.fixture(scope="module")
def fast_out(small, tmp_path_factory) -> Path:
    """The fast profile over the small set (6 cases, 2 of them resampled), on 2 CPU workers."""
    out = tmp_path_factory.mktemp("fast") / "out"
    result = cli(*run_args(small, out, "--workers", "2", "--profile", "fast"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--profile fast" in result.stdout
    return out


def test_fast_profile_agrees_with_plain_nnunet_within_the_published_bounds(small, fast_out):
    assert sorted(p.name for p in fast_out.iterdir() if p.name != ".nnunet-launch") == sorted(
        p.name for p in small["reference"].iterdir()
    )
    for case_id in small["ids"]:
        plain, fast = _seg(small["reference"] / f"{case_id}.nii.gz"), _seg(fast_out / f"{case_id}.nii.gz")
        if case_id not in RESAMPLED:  # nothing to resample: the same argmax of the same logits
            assert np.array_equal(plain, fast), case_id
            continue
        assert np.mean(plain == fast) >= MIN_EQUAL_VOXELS, case_id
        dice = _dice_per_label(plain, fast)
        assert dice and min(dice.values()) >= MIN_DICE, (case_id, dice)
        for label in dice:  # the volume per label, which a study would report
            assert abs(np.sum(fast == label) / np.sum(plain == label) - 1) <= MAX_VOLUME_CHANGE, (case_id, label)
        a, b = (
            sitk.ReadImage(str(small["reference"] / f"{case_id}.nii.gz")),
            sitk.ReadImage(str(fast_out / f"{case_id}.nii.gz")),
        )
        assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
    summary = json.loads((fast_out / ".nnunet-launch" / "summary.json").read_text())
    assert summary["profile"] == "fast" and summary["done"] == len(small["ids"])
    worker_logs = "".join(p.read_text() for p in (fast_out / ".nnunet-launch" / "logs").glob("*part*.log"))
    assert "export in a helper on the CPU" in worker_logs  # CPU workers keep predicting meanwhile


@pytest.mark.accelerator
def test_the_workers_own_export_and_its_out_of_memory_fallback_give_the_fast_outputs(small, fast_out, tmp_path):
    """What an accelerator's worker does (the export in the worker, on its device), here on a
    simulated accelerator, with probabilities; then a device too small for the larger cases'
    exports: they export in a helper with the same code, are logged, and nothing fails."""
    from launcher.device import SIMULATED_ACCELERATOR_ENV

    in_worker = tmp_path / "in-worker"
    args = run_args(small, in_worker, "--profile", "fast", "--save_probabilities")
    result = cli(*args, env={SIMULATED_ACCELERATOR_ENV: str(2**30)}, timeout=300)
    assert result.returncode == 0, result.stderr
    fallback = tmp_path / "fallback"
    # 5.5 MiB: every case's prediction fits on the device, the exports of the two largest (about 6
    # and 4 MiB: the running argmax's 8 bytes a voxel, the chunk of channels and the one being
    # resampled, beside 1.3 MiB of weights and the case's half-precision logits) do not
    budget = str(int(5.5 * 2**20))
    # two workers, as fast_out's: the network's sums, and so a nearly tied voxel, follow the threads a worker has
    fast = run_args(small, fallback, "--profile", "fast", "--workers", "2")
    result = cli(*fast, env={SIMULATED_ACCELERATOR_ENV: budget})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("exported on the CPU in a helper: it needs about") == 2
    for case_id in small["ids"]:
        expected = _seg(fast_out / f"{case_id}.nii.gz")
        assert np.array_equal(_seg(fallback / f"{case_id}.nii.gz"), expected), case_id
        segmentation = _seg(in_worker / f"{case_id}.nii.gz")  # the argmax of probabilities, not of logits
        assert np.mean(segmentation == expected) >= 0.999, case_id
        with np.load(in_worker / f"{case_id}.npz") as npz:  # as nnU-Net saves them
            probabilities = npz["probabilities"]
        assert probabilities.dtype == np.float32 and probabilities.shape == (3, *segmentation.shape)
        assert np.allclose(probabilities.sum(0), 1, atol=1e-4)
        assert np.array_equal(probabilities.argmax(0), segmentation)
        assert (in_worker / f"{case_id}.pkl").is_file()
    worker_logs = "".join(p.read_text() for p in (in_worker / ".nnunet-launch" / "logs").glob("*part*.log"))
    assert "export on a simulated accelerator (1024 MiB) in" in worker_logs


def _best(stages: dict, inputs: Path, out: Path, *extra: str) -> list[str]:
    """`run --best`: the 2d + 3d_fullres ensemble and its postprocessing, the fast profile."""
    args = ["run", "-i", str(inputs), "-o", str(out), "-d", "998", "--best", "--profile", "fast"]
    return [*args, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", "--workers", "2", *extra]


def _stage_files(out: Path) -> list[Path]:
    return [p for p in (out / ".nnunet-launch" / "stages").rglob("*") if p.is_file()]


@pytest.mark.accelerator
def test_fast_profile_averages_an_ensemble_in_the_worker_without_member_files(stages, manual, tmp_path, monkeypatch):
    """Each case's final unit predicts both members and averages them (on the GPU in a GPU
    worker; in the worker here through the test hook, and in an export helper as a CPU worker
    does), then postprocesses: no member unit, no .npz in between, and the result agrees with
    nnU-Net's own chain (predict --save_probabilities per member, ensemble, apply_postprocessing)."""
    from launcher.device import SIMULATED_ACCELERATOR_ENV

    monkeypatch.setenv("nnUNet_results", stages["env"]["nnUNet_results"])
    helper, in_worker = tmp_path / "helper", tmp_path / "in-worker"
    result = cli(*_best(stages, stages["inputs"], helper, "--keep-stages"), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "ensemble (averaged in the worker: --profile fast)" in result.stdout
    args = _best(stages, stages["inputs"], in_worker, "--save_probabilities")
    result = cli(*args, env={SIMULATED_ACCELERATOR_ENV: str(2**30)}, timeout=600)
    assert result.returncode == 0, result.stderr
    for out in (helper, in_worker):
        assert _stage_files(out) == []  # kept stages would show member files: there were none
        summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
        assert list(summary["stages"]) == ["final"] and summary["done"] == STAGE_CASES
    for i in range(STAGE_CASES):
        name = f"case_{i:03d}.nii.gz"
        chain, fast = _seg(manual / "postprocessed" / name), _seg(helper / name)
        assert np.mean(chain == fast) >= MIN_EQUAL_VOXELS, name
        dice = _dice_per_label(chain, fast)
        assert dice and min(dice.values()) >= MIN_DICE, (name, dice)
        assert np.array_equal(_seg(in_worker / name), fast), name
        with np.load(in_worker / name.replace(".nii.gz", ".npz")) as npz:  # the ensemble's average
            probabilities = npz["probabilities"]
        assert probabilities.shape == (3, *fast.shape) and np.allclose(probabilities.sum(0), 1, atol=1e-4)
    logs = "".join(p.read_text() for p in (helper / ".nnunet-launch" / "logs").glob("*part*.log"))
    assert "ensemble averaged in a helper on the CPU" in logs


def test_a_fused_ensemble_is_one_unit_per_case_with_the_combinations_result(stages, tmp_path, monkeypatch):
    """The stand-in backend: the fused unit's output is what the combination of the members'
    files would hold, and the journal has one unit per case (the members' work counted in it)."""
    import gzip

    monkeypatch.setenv("nnUNet_results", stages["env"]["nnUNet_results"])
    out = tmp_path / "out"
    plan = cli(*["plan", *_best(stages, stages["inputs"], out)[1:], "--json"])
    assert plan.returncode == 0, plan.stderr
    units = [c for part in json.loads(plan.stdout)["parts"] for c in part["cases"]]
    assert sorted(units) == [f"case_{i:03d}" for i in range(STAGE_CASES)]
    result = cli(*_best(stages, stages["inputs"], out), env=fake_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    for i in range(STAGE_CASES):
        with gzip.open(out / f"case_{i:03d}.nii.gz") as f:
            assert f.read() == fake_final(stages["inputs"], f"case_{i:03d}")
    assert len(MEMBERS) == 2 and _stage_files(out) == []


def test_a_helper_does_not_resample_the_crops_mask_nnunet_drops_and_gives_nnunets_properties(tiny, monkeypatch):
    """nnU-Net's run_case_npy resamples the crop's mask with the data, and inference drops it for
    a case without a previous stage: the fast profile's helpers skip that resampling (2.3 s of a
    whole CT's 4.9 s), the exact profile's run nnU-Net's code as it is. The same properties, and
    with nnU-Net's own data resampling the same data."""
    from nnunetv2.preprocessing.cropping import cropping
    from nnunetv2.preprocessing.resampling import default_resampling
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from launcher import nnunet, nnunet_versions

    model = tiny["model"]
    plans, dataset_json = (json.loads((model / name).read_text()) for name in ("plans.json", "dataset.json"))
    configuration = PlansManager(plans).get_configuration("3d_fullres")  # make_tiny_model's
    models = {None: (plans, configuration, dataset_json)}
    files = (str(tiny["inputs"] / f"{RESAMPLED[0]}_0000.nii.gz"),)
    monkeypatch.setattr(cropping, "binary_fill_holes", cropping.binary_fill_holes)  # a fast helper's crop patches it
    masks = []
    resize_segmentation = default_resampling.resize_segmentation
    monkeypatch.setattr(
        default_resampling, "resize_segmentation", lambda *a, **k: masks.append(1) or resize_segmentation(*a, **k)
    )

    nnunet._init_preprocessing(models, False, 1, input_on_device=None)
    exact_data, exact_properties = nnunet._preprocess(None, files, None)
    assert masks, "nnU-Net's preprocessing resamples the crop's mask"
    nnunet._init_preprocessing(models, False, 1, input_on_device=False)
    masks.clear()
    fast_data, fast_properties = nnunet._preprocess(None, files, None)
    assert not masks
    assert fast_data.shape == exact_data.shape and exact_data.shape[1:] != _seg(Path(files[0])).shape  # resampled
    assert np.abs(fast_data - exact_data).max() < 1e-4  # the spline's matrices (tests/test_spline_resample.py)
    assert repr(fast_properties) == repr(exact_properties)

    # nnU-Net's data resampling with the mask's skipped: nnU-Net's data, bit for bit
    preprocessor = configuration.preprocessor_class(verbose=False)
    data, _, properties = nnunet._read(nnunet._PREP[None], files, None)
    skipped = fast_profile.without_mask_resampling(configuration)
    for manager in (configuration, skipped):
        arguments = (data, None, dict(properties), PlansManager(plans), manager, dataset_json)
        assert np.array_equal(nnunet_versions.run_case_npy(preprocessor, *arguments)[0], exact_data)


def test_a_run_of_one_profile_is_not_resumed_with_the_other(cases, tmp_path):
    out = tmp_path / "out"
    env = fake_env(tmp_path)
    assert cli(*run_args(cases, out), env=env).returncode == 0
    result = cli(*run_args(cases, out, "--profile", "fast"), env=env)
    assert result.returncode == 2
    assert "different profile ('exact', now 'fast')" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- the pieces, in this process ---------------------------------------------------------------
def _managers(spacing=(1.0, 1.0, 1.0), labels=None, regions_order=None):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = tiny.plans_dict(1)
    plans["configurations"][tiny.CONFIGURATION]["spacing"] = list(spacing)
    dataset = tiny.dataset_dict(1)
    if labels is not None:
        dataset["labels"] = labels
    if regions_order is not None:
        dataset["regions_class_order"] = regions_order
    manager = PlansManager(plans)
    return manager.get_configuration(tiny.CONFIGURATION), manager, manager.get_label_manager(dataset)


def _rounded(resampled: torch.Tensor) -> torch.Tensor:
    """Resampled logits as nnU-Net's default export has them before its argmax: in the half
    precision of its predictor's logits."""
    return resampled.half().float()


@pytest.mark.accelerator  # the export code an accelerator runs
@pytest.mark.parametrize("target_spacing", [(3.0, 0.8, 0.8), (1.5, 1.0, 1.0)], ids=["separate z", "isotropic"])
def test_the_export_rounds_the_resampled_logits_to_half_as_nnunets_default_export_does(target_spacing):
    """nnU-Net's default export resamples the half logits in float64 and returns half: channels that
    round to the same value tie and the earlier one wins. Logits a few half steps apart make such
    ties common; the fast export agrees with nnU-Net's own export there but for the rare voxel whose
    float32 and float64 values round to different halves, where the unrounded argmax does not."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    configuration, plans, labels = _managers((2.0, 2.0, 2.0), {"background": 0, **{f"l{i}": i for i in range(1, 6)}})
    generator = torch.Generator().manual_seed(3)
    logits = (8 + 0.05 * torch.rand(6, 16, 18, 20, generator=generator)).half()  # half's step at 8 is 1/128
    out_shape = [round(s * 2.0 / t) for s, t in zip(logits.shape[1:], target_spacing, strict=True)]
    properties = {
        "spacing": list(target_spacing),
        "shape_after_cropping_and_before_resampling": out_shape,
        "shape_before_cropping": out_shape,
        "bbox_used_for_cropping": [[0, s] for s in out_shape],
    }
    nnunet = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans, configuration, labels, properties, num_threads_torch=1
    )
    fast, _ = fast_profile.segment(logits, properties, configuration, plans, labels, False, 1)
    unrounded = resample_torch_fornnunet(
        logits, out_shape, [2.0] * 3, list(target_spacing), is_seg=False, num_threads=1,
        **fast_profile.resampling_settings(configuration),
    ).argmax(0)  # fmt: skip
    assert np.mean(unrounded.numpy() == nnunet) < 0.95  # ties are common here
    assert np.mean(fast == nnunet) >= 0.999


@pytest.mark.accelerator  # the export and prediction code an accelerator runs
@pytest.mark.parametrize(
    "target_spacing",
    [(3.0, 0.8, 0.8), (1.5, 1.0, 1.0), (2.0, 2.0, 2.0)],
    ids=["separate z", "isotropic resampling", "no resampling"],
)
def test_chunked_export_equals_one_argmax_over_nnunets_torch_resampling(monkeypatch, target_spacing):
    """Each channel resampled by itself (torch's interpolation of a batch of channels may differ by
    a float32 step, which the rounding could turn into another label), rounded as nnU-Net's export
    rounds, one argmax: whatever the chunks, and with probabilities saved."""
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    configuration, plans, labels = _managers((2.0, 2.0, 2.0), {"background": 0, **{f"l{i}": i for i in range(1, 12)}})
    # a few half steps apart (half's step at 8 is 1/128): ties after the rounding are common
    logits = (8 + 0.05 * torch.rand(12, 10, 12, 14, generator=torch.Generator().manual_seed(0))).half()
    logits[5] = logits[3]  # exact ties across chunks: the first channel wins, as in one argmax
    out_shape = [round(s * 2.0 / t) for s, t in zip(logits.shape[1:], target_spacing, strict=True)]
    properties = {"spacing": list(target_spacing), "shape_after_cropping_and_before_resampling": out_shape}
    settings = fast_profile.resampling_settings(configuration)
    each = [
        resample_torch_fornnunet(channel[None], out_shape, [2.0] * 3, list(target_spacing), is_seg=False,
                                 num_threads=1, **settings)
        for channel in logits
    ]  # fmt: skip
    expected = _rounded(torch.cat(each)).argmax(0).numpy()
    resample = fast_profile._resampler(properties, configuration, plans, 1, logits, None)
    assert torch.equal(resample(logits), torch.cat([resample(channel[None]) for channel in logits]))
    for chunk in (1, 5, 12):
        monkeypatch.setattr(fast_profile, "CHUNK_BYTES", fast_profile._chunk_bytes(chunk, logits.shape[1:], out_shape))
        assert fast_profile._channels_per_chunk(12, logits.shape[1:], out_shape) == chunk
        segmentation, _ = fast_profile.segment(logits, properties, configuration, plans, labels, False, 1)
        assert segmentation.dtype == np.uint8 and list(segmentation.shape) == out_shape
        assert np.array_equal(segmentation, expected), chunk
    with_probabilities, _ = fast_profile.segment(logits, properties, configuration, plans, labels, True, 1)
    assert np.array_equal(with_probabilities, expected)


@pytest.mark.accelerator  # the export code an accelerator runs
@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_the_running_argmax_over_chunks_of_channels_equals_nnunets_argmax_of_the_softmax(chunk):
    """Ties go to the first channel; a voxel with a NaN or +inf value has an all-NaN softmax: 0."""
    values = torch.randint(0, 3, (7, 5, 6, 4), generator=torch.Generator().manual_seed(2)).float()  # ties galore
    values[3, 0, 0, :2], values[6, 1, 1, :2], values[2, 2, 2, :2] = math.nan, math.nan, math.inf
    values[4, 3, 3, :2] = -math.inf
    chunks = ((start, values[start : start + chunk]) for start in range(0, 7, chunk))
    expected = torch.softmax(values, 0).argmax(0)
    assert all((expected[i, i, :2] == 0).all() for i in range(3))
    assert torch.equal(expected[3:, 3:], values[:, 3:, 3:].argmax(0))  # -inf is a probability of 0
    assert torch.equal(fast_profile._argmax(chunks).long(), expected)


@pytest.mark.accelerator  # the export and prediction code an accelerator runs
def test_chunked_export_of_regions_equals_nnunets_region_handling(monkeypatch):
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    labels = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    configuration, plans, label_manager = _managers(labels=labels, regions_order=[1, 2, 3])
    logits = torch.randn(3, 9, 10, 11, generator=torch.Generator().manual_seed(1)).half()
    out_shape = [14, 10, 11]
    properties = {"spacing": [9 / 14, 1.0, 1.0], "shape_after_cropping_and_before_resampling": out_shape}
    monkeypatch.setattr(fast_profile, "CHUNK_BYTES", fast_profile._chunk_bytes(1, logits.shape[1:], out_shape))
    assert fast_profile._channels_per_chunk(3, logits.shape[1:], out_shape) == 1
    segmentation, _ = fast_profile.segment(logits, properties, configuration, plans, label_manager, False, 1)
    whole = resample_torch_fornnunet(logits, out_shape, [1.0] * 3, properties["spacing"], is_seg=False, num_threads=1)
    expected = label_manager.convert_logits_to_segmentation(_rounded(whole))
    assert np.array_equal(segmentation, np.asarray(expected))


@pytest.mark.accelerator  # the export and prediction code an accelerator runs
def test_resampling_settings_follow_the_configuration():
    configuration, _, _ = _managers()
    assert fast_profile.resampling_settings(configuration) == {
        "force_separate_z": None,
        "mode": "linear",
        "aniso_axis_mode": "nearest-exact",
    }
    configuration.configuration["resampling_fn_probabilities"] = "resample_torch_fornnunet"
    configuration.configuration["resampling_fn_probabilities_kwargs"] = {"is_seg": False, "force_separate_z": False}
    assert fast_profile.resampling_settings(configuration) == {"force_separate_z": False}


def _two_members(chunk_channels: int, monkeypatch, labels=None, regions_order=None, num_channels=12):
    """Two members of an ensemble at different spacings (as 2d and 3d_fullres may be), one case."""
    members = []
    for seed, spacing in ((5, (2.0, 2.0, 2.0)), (6, (1.5, 2.0, 2.0))):
        configuration, plans, label_manager = _managers(spacing, labels, regions_order)
        shape = [round(s * 2.0 / sp) for s, sp in zip((10, 12, 14), spacing, strict=True)]
        logits = torch.randn(num_channels, *shape, generator=torch.Generator().manual_seed(seed)).half()
        properties = {"spacing": [2.2, 1.4, 1.4], "shape_after_cropping_and_before_resampling": [9, 17, 20]}
        members.append((logits, properties, configuration, plans))
    chunk_bytes = max(fast_profile._chunk_bytes(chunk_channels, m[0].shape[1:], [9, 17, 20]) for m in members)
    monkeypatch.setattr(fast_profile, "CHUNK_BYTES", chunk_bytes)
    assert min(fast_profile._channels_per_chunk(num_channels, m[0].shape[1:], [9, 17, 20]) for m in members) == (
        chunk_channels
    )
    return members, label_manager


def _averaged(members, label_manager):
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    total = 0
    for logits, properties, configuration, plans in members:
        current, target = fast_profile._spacings(properties, configuration, plans)
        settings = fast_profile.resampling_settings(configuration)
        out_shape = properties["shape_after_cropping_and_before_resampling"]
        resampled = resample_torch_fornnunet(
            logits, out_shape, current, target, is_seg=False, num_threads=1, **settings
        )
        total = total + label_manager.apply_inference_nonlin(_rounded(resampled))
    return total / len(members)


@pytest.mark.accelerator  # the export and prediction code an accelerator runs
def test_chunked_ensemble_average_equals_nnunets_average_of_probabilities(monkeypatch):
    members, label_manager = _two_members(3, monkeypatch, {"background": 0, **{f"l{i}": i for i in range(1, 12)}})
    expected = _averaged(members, label_manager)
    segmentation, _ = fast_profile.segment_ensemble(members, label_manager, False, 1)
    assert np.array_equal(segmentation, label_manager.convert_probabilities_to_segmentation(expected).numpy())
    full, probabilities = fast_profile.segment_ensemble(members, label_manager, True, 1)
    assert np.allclose(probabilities, expected.numpy(), atol=1e-6) and np.array_equal(full, segmentation)


@pytest.mark.accelerator  # the export and prediction code an accelerator runs
def test_chunked_ensemble_of_regions_equals_nnunets_average(monkeypatch):
    labels = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    members, label_manager = _two_members(1, monkeypatch, labels, [1, 2, 3], num_channels=3)
    expected = label_manager.convert_probabilities_to_segmentation(_averaged(members, label_manager))
    segmentation, _ = fast_profile.segment_ensemble(members, label_manager, False, 1)
    assert np.array_equal(segmentation, np.asarray(expected))


@pytest.fixture(scope="module")
def two_fold_predictor(tmp_path_factory):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = tmp_path_factory.mktemp("two-folds") / "model"
    torch.set_num_threads(1)
    tiny.make_model(str(folder), folds=(0, 1))
    predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0, 1), "checkpoint_final.pth")
    return predictor


@pytest.mark.accelerator  # the export and prediction code an accelerator runs
def test_batched_mirroring_equals_nnunets_passes_one_at_a_time(two_fold_predictor):
    p = two_fold_predictor
    p.network.load_state_dict(p.list_of_parameters[0])
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    notes: list[str] = []
    batched = fast_profile.BatchedMirroring(p, p._internal_maybe_mirror_and_predict, notes, CPU)
    assert torch.allclose(batched(x), p._internal_maybe_mirror_and_predict(x), atol=1e-4)
    assert batched.batched and notes == []


@pytest.mark.accelerator  # the export and prediction code an accelerator runs
def test_batched_mirroring_out_of_memory_goes_back_to_one_pass_at_a_time(two_fold_predictor, monkeypatch):
    p = two_fold_predictor
    p.network.load_state_dict(p.list_of_parameters[0])
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    expected = p._internal_maybe_mirror_and_predict(x)
    network = p.network

    def small_device(batch):
        if batch.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return network(batch)

    notes: list[str] = []
    batched = fast_profile.BatchedMirroring(p, p._internal_maybe_mirror_and_predict, notes, CPU)
    monkeypatch.setattr(p, "network", small_device)
    assert torch.equal(batched(x), expected)
    assert not batched.batched and "one at a time" in notes[0]
    assert torch.equal(batched(x), expected) and len(notes) == 1  # said once


@pytest.mark.accelerator  # the export and prediction code an accelerator runs
def test_fold_sum_equals_nnunets_on_the_cpu(two_fold_predictor, monkeypatch):
    p = two_fold_predictor
    monkeypatch.setattr(p, "use_mirroring", False)  # the folds are the point here, not the mirrors
    data = torch.randn(1, 40, 36, 44, generator=torch.Generator().manual_seed(4))
    notes: list[str] = []
    assert torch.equal(fast_profile.predict_logits(p, data, notes, CPU), p.predict_logits_from_preprocessed_data(data))
    assert notes == []
