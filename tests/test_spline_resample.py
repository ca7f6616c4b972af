"""spline_resample.py against nnU-Net's own image resampling, called as its preprocessor calls it: the
configuration's resampling_fn_data (a partial of the plans' function and kwargs) on float32 data normalised
as nnU-Net normalises it, with the new shape from compute_new_shape."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization, ZScoreNormalization
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, determine_do_sep_z_and_axis
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
from nnunetv2.preprocessing.resampling.utils import recursive_find_resampling_fn_by_name
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from launcher import spline_resample
from launcher.spline_resample import axis_matrix, reproduces, resample_image

# what nnU-Net's default planner writes into the plans for images (is_seg=False, order=3, order_z=0,
# force_separate_z=None), and for the probabilities of the exported segmentations (order=1)
_, DATA_KWARGS, _, SEG_KWARGS = ExperimentPlanner.determine_resampling(None)
_, PROBABILITIES_KWARGS = ExperimentPlanner.determine_segmentation_softmax_export_fn(None)
TOLERANCE = 1e-3  # on normalised intensities (float32 products against nnU-Net's float64 ones)


def _coordinates(shape):
    """Voxel centres in [-1, 1] per axis (0 for an axis of one voxel, as a 2D configuration's)."""
    return np.meshgrid(*[(np.arange(n) + 0.5) / n * 2 - 1 for n in shape], indexing="ij")


def _inside(coordinates, centre, radii):
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coordinates, centre, radii, strict=True)) < 1


def mr_like(rng, shape):
    """Smooth positive intensities (tissue blobs under a bias field, a little noise), z-scored as nnU-Net's
    ZScoreNormalization does without a mask."""
    coordinates = _coordinates(shape)
    image = np.full(shape, 300.0)
    for _ in range(6):
        centre, width = rng.uniform(-0.6, 0.6, 3), rng.uniform(0.15, 0.5)
        distance2 = sum((c - m) ** 2 for c, m in zip(coordinates, centre, strict=True))
        image += rng.uniform(100, 800) * np.exp(-distance2 / (2 * width**2))
    image *= 1 + 0.3 * coordinates[1]
    image += rng.normal(0, 5, shape)
    return ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(image.astype(np.float32))


def ct_like(rng, shape):
    """Hounsfield units from -1024 to 3000 with sharp steps (air, fat, soft tissue, an organ, bone in some slices,
    a metal spot), normalised as nnU-Net's CTNormalization does with the body as the foreground."""
    coordinates = _coordinates(shape)
    image = np.full(shape, -1024.0)
    body = _inside(coordinates, (0, 0, 0), (2, 0.9, 0.8))
    image[body] = -100.0
    image[_inside(coordinates, (0, 0, 0), (2, 0.8, 0.7))] = 40.0
    image[_inside(coordinates, rng.uniform(-0.2, 0.2, 3), (0.6, 0.35, 0.3))] = 150.0
    image[_inside(coordinates, (0.3, 0.45, 0.0), (0.5, 0.2, 0.15))] = 1200.0
    image[_inside(coordinates, (-0.2, -0.4, 0.3), (0.15, 0.1, 0.1))] = 3000.0
    image[body] += rng.normal(0, 15, int(body.sum()))
    image = np.clip(image, -1024, 3000)
    foreground = image[body]
    properties = {
        "mean": foreground.mean(),
        "std": foreground.std(),
        "percentile_00_5": np.percentile(foreground, 0.5),
        "percentile_99_5": np.percentile(foreground, 99.5),
    }
    return CTNormalization(use_mask_for_norm=False, intensityproperties=properties).run(image.astype(np.float32))


PHANTOMS = {"mr": mr_like, "ct": ct_like}


@dataclass(frozen=True)
class Case:
    shape: tuple  # (X, Y, Z); a 2D configuration's is (1, X, Y)
    spacing: tuple
    target_spacing: tuple
    channels: tuple  # one phantom name per channel
    separate_z: tuple  # what determine_do_sep_z_and_axis says for it: (do_separate_z, axis)


CASES = {
    "isotropic_upsampling_mr": Case((20, 24, 28), (1.5,) * 3, (1.0,) * 3, ("mr",), (False, None)),
    "isotropic_downsampling_ct": Case((48, 52, 40), (0.8,) * 3, (1.5,) * 3, ("ct",), (False, None)),
    "separate_z_on_axis_0_ct": Case((12, 48, 40), (3.0, 0.8, 0.8), (1.5,) * 3, ("ct",), (True, 0)),
    "separate_z_on_axis_2_mr": Case((40, 44, 10), (0.8, 0.8, 3.0), (1.5,) * 3, ("mr",), (True, 2)),
    "separate_z_from_the_target_spacing_on_axis_1_ct": Case(
        (24, 20, 24), (1.0,) * 3, (0.8, 4.0, 0.8), ("ct",), (True, 1)
    ),
    "separate_z_kept_in_plane_resampled_ct": Case((8, 40, 40), (4.0, 0.8, 0.8), (4.0, 1.2, 1.2), ("ct",), (True, 0)),
    "odd_sizes_up_and_down_ct": Case((17, 23, 31), (1.1, 0.9, 1.3), (1.0,) * 3, ("ct",), (False, None)),
    "two_channels_ct_and_mr": Case((20, 22, 24), (1.2,) * 3, (1.0,) * 3, ("ct", "mr"), (False, None)),
    "two_channels_ct_and_mr_separate_z": Case((10, 36, 40), (3.5, 0.9, 0.9), (1.2,) * 3, ("ct", "mr"), (True, 0)),
    "2d_configuration_anisotropic_ct": Case((1, 50, 60), (5.0, 0.7, 0.7), (5.0, 1.0, 1.0), ("ct",), (True, 0)),
    "2d_configuration_isotropic_mr": Case((1, 50, 60), (1.0, 0.7, 0.7), (1.0, 1.1, 1.1), ("mr",), (False, None)),
}


def volume(case: Case, seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([PHANTOMS[name](rng, case.shape) for name in case.channels]).astype(dtype)


def image_kwargs(kwargs: dict) -> dict:
    """A configuration's kwargs as resample_image takes them."""
    return {k: v for k, v in kwargs.items() if k != "is_seg"}


def nnunet_and_ours(case: Case, kwargs: dict, data: np.ndarray):
    """nnU-Net's result as DefaultPreprocessor.run_case_npy gets it, and resample_image's for the same kwargs."""
    new_shape = compute_new_shape(data.shape[1:], case.spacing, case.target_spacing)
    configuration = ConfigurationManager(
        {"architecture": {}, "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": kwargs}
    )
    expected = configuration.resampling_fn_data(data, new_shape, case.spacing, case.target_spacing)
    ours = resample_image(torch.from_numpy(data), new_shape, case.spacing, case.target_spacing, **image_kwargs(kwargs))
    assert ours.dtype == torch.from_numpy(expected).dtype and tuple(ours.shape) == expected.shape
    return expected, ours.numpy()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_nnunets_default_image_resampling(case):
    separate_z, axis = determine_do_sep_z_and_axis(None, case.spacing, case.target_spacing)
    assert (separate_z, axis) == case.separate_z  # the case covers the path its name says
    expected, ours = nnunet_and_ours(case, DATA_KWARGS, volume(case))
    assert np.abs(ours - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    "case_name, kwargs",
    [
        ("separate_z_on_axis_0_ct", PROBABILITIES_KWARGS),
        ("isotropic_downsampling_ct", PROBABILITIES_KWARGS),
        ("odd_sizes_up_and_down_ct", {**DATA_KWARGS, "order": 0}),
        ("separate_z_on_axis_2_mr", {**DATA_KWARGS, "order": 0}),
        ("separate_z_on_axis_0_ct", {**DATA_KWARGS, "order_z": 1}),
        ("separate_z_from_the_target_spacing_on_axis_1_ct", {**DATA_KWARGS, "order_z": 3}),
        ("separate_z_on_axis_0_ct", {**DATA_KWARGS, "force_separate_z": False}),
        ("odd_sizes_up_and_down_ct", {**DATA_KWARGS, "force_separate_z": True}),
        ("separate_z_on_axis_2_mr", {"is_seg": False}),  # nnU-Net's own defaults: force_separate_z=False
    ],
)
def test_matches_nnunet_with_other_orders_and_separate_z_choices(case_name, kwargs):
    assert reproduces(recursive_find_resampling_fn_by_name("resample_data_or_seg_to_shape"), kwargs)
    case = CASES[case_name]
    expected, ours = nnunet_and_ours(case, kwargs, volume(case))
    assert np.abs(ours - expected).max() <= TOLERANCE


@pytest.mark.parametrize("case_name", ["odd_sizes_up_and_down_ct", "two_channels_ct_and_mr_separate_z"])
def test_axis_matrices_are_exact_float64_data_matches_to_rounding(case_name):
    case = CASES[case_name]
    expected, ours = nnunet_and_ours(case, DATA_KWARGS, volume(case, dtype=np.float64))
    assert np.abs(ours - expected).max() <= 1e-10


def test_the_clip_is_to_each_input_slices_range_when_z_is_separate(monkeypatch):
    """Sharp CT edges overshoot: without resize's clip the result is off nnU-Net's by ~1 (normalised units); with
    one clip to the whole channel's range instead of one per 2D input slice, by ~0.1."""
    case = CASES["separate_z_from_the_target_spacing_on_axis_1_ct"]
    data = volume(case)
    expected, ours = nnunet_and_ours(case, DATA_KWARGS, data)
    assert np.abs(ours - expected).max() <= TOLERANCE

    clip = spline_resample._clip_to_input_range
    monkeypatch.setattr(spline_resample, "_clip_to_input_range", lambda out, data, dims: clip(out, data, (1, 2, 3)))
    assert np.abs(nnunet_and_ours(case, DATA_KWARGS, data)[1] - expected).max() > 10 * TOLERANCE
    monkeypatch.setattr(spline_resample, "_clip_to_input_range", lambda out, data, dims: out)
    assert np.abs(nnunet_and_ours(case, DATA_KWARGS, data)[1] - expected).max() > 100 * TOLERANCE


def test_an_unchanged_shape_returns_the_input_unclipped_as_nnunet_does():
    data = torch.from_numpy(volume(CASES["isotropic_downsampling_ct"]))
    assert resample_image(data, data.shape[1:], (0.8,) * 3, (0.8,) * 3, **image_kwargs(DATA_KWARGS)) is data


def test_the_default_plans_image_and_probability_resampling_are_reproduced():
    data_fn, data_kwargs, _, _ = ExperimentPlanner.determine_resampling(None)
    probabilities_fn, probabilities_kwargs = ExperimentPlanner.determine_segmentation_softmax_export_fn(None)
    assert reproduces(data_fn, data_kwargs)
    assert reproduces(probabilities_fn, probabilities_kwargs)


def test_other_resampling_functions_segmentations_and_unknown_kwargs_are_refused():
    assert not reproduces(resample_torch_fornnunet, {"is_seg": False, "force_separate_z": None})
    assert not reproduces(resample_torch_fornnunet, {})
    assert not reproduces(recursive_find_resampling_fn_by_name("resample_data_or_seg_to_shape"), SEG_KWARGS)
    assert not reproduces(recursive_find_resampling_fn_by_name("resample_data_or_seg_to_shape"), {"order": 2})
    assert not reproduces(recursive_find_resampling_fn_by_name("resample_data_or_seg_to_shape"), {"dtype_out": None})


def test_the_axis_matrix_cache_returns_the_same_matrix_for_the_same_key():
    first = axis_matrix(37, 61, "resize", 3)
    assert axis_matrix(37, 61, "resize", 3) is first
    assert axis_matrix(37, 61, "map_coordinates", 3) is not first
    assert first.shape == (61, 37) and first.dtype == torch.float64


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu worker's helper", "accelerator worker's helper"])
def test_an_input_with_a_nan_is_resampled_by_nnunets_own_function_which_keeps_the_nan_local(on_device):
    """A matrix product spreads one NaN over every line through it (skimage's spline keeps it near its voxel), so
    a fast profile's preprocessing helper leaves such an input to nnU-Net's function, on the CPU."""
    from launcher import fast_profile

    case = CASES["separate_z_on_axis_2_mr"]
    data = volume(case)
    data[0, 3, 4, 2] = np.nan
    new_shape = compute_new_shape(data.shape[1:], case.spacing, case.target_spacing)
    configuration = ConfigurationManager(
        {
            "architecture": {},
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": DATA_KWARGS,
        }
    )
    expected = configuration.resampling_fn_data(data, new_shape, case.spacing, case.target_spacing)
    assert 0 < np.isnan(expected).mean() <= 0.1  # the spline's prefilter spreads it over its slices (2 of 20)
    helper = fast_profile.preprocessing_manager(configuration, on_device)
    result = helper.resampling_fn_data(data, new_shape, case.spacing, case.target_spacing)
    assert isinstance(result, np.ndarray) and np.array_equal(result, expected, equal_nan=True)
    spread = resample_image(
        torch.from_numpy(data), new_shape, case.spacing, case.target_spacing, **image_kwargs(DATA_KWARGS)
    )
    assert torch.isnan(spread).all()  # what the matrix products would have given
