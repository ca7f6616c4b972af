"""hole_filling.fill_holes against scipy's binary_fill_holes (what nnU-Net's crop calls), on both of its
paths, and nnU-Net's crop in a fast profile's preprocessing helper against nnU-Net's crop as it is."""

from __future__ import annotations

import numpy as np
import pytest
from nnunetv2.preprocessing.cropping import cropping
from scipy import ndimage

from launcher import hole_filling, nnunet


def _ball(shape, centre, radius):
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) < radius**2


def _masks():
    rng = np.random.default_rng(7)
    shape = (24, 30, 36)
    nested = _ball(shape, (12, 15, 18), 11) & ~_ball(shape, (12, 15, 18), 8)  # a shell: its inside is a hole
    nested |= _ball(shape, (12, 15, 18), 5)  # an island inside the hole...
    nested &= ~_ball(shape, (12, 15, 18), 2)  # ...with a hole of its own
    tunnel = nested.copy()
    tunnel[12, 15, 18:] = False  # the innermost hole reaches the border through a tunnel: no hole any more
    body = _ball(shape, (12, 15, 18), 12) & (rng.random(shape) > 0.05)  # an MR's body in air, speckled
    body &= ~_ball(shape, (8, 10, 12), 3)  # and a cavity
    clustered = ~ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=1)  # background in small blobs
    on_the_faces = np.ones(shape, dtype=bool)
    on_the_faces[0, 5:9, 5:9] = on_the_faces[5:9, -1, 5:9] = on_the_faces[10, 10, 10] = False
    return {
        "ct: all but scattered voxels": rng.random(shape) > 0.003,
        "nested holes": nested,
        "a tunnel to the border": tunnel,
        "mr: a body in air": body,
        "background in blobs": clustered,
        "half and half": rng.random(shape) > 0.5,
        "background on the array's faces": on_the_faces,
        "empty": np.zeros(shape, dtype=bool),
        "full": np.ones(shape, dtype=bool),
        "one voxel": _ball(shape, (3, 4, 5), 1),
        "a 2d configuration's (1, x, y)": (rng.random((1, 40, 50)) > 0.02) & _ball((1, 40, 50), (0, 20, 25), 18),
        "two dimensions": rng.random((40, 50)) > 0.04,
    }


MASKS = _masks()


@pytest.mark.parametrize("path", ["as configured", "graph only", "scipy on the box only"])
@pytest.mark.parametrize("name", list(MASKS))
def test_fill_holes_gives_scipys_binary_fill_holes(name, path, monkeypatch):
    if path != "as configured":
        monkeypatch.setattr(hole_filling, "SPARSE_SHARE", 1.0 if path == "graph only" else -1.0)
    mask = MASKS[name]
    expected = ndimage.binary_fill_holes(mask)
    result = hole_filling.fill_holes(mask)
    assert result.dtype == bool and result.shape == mask.shape
    assert np.array_equal(result, expected)


def test_a_ct_like_mask_is_filled_through_the_graph_not_scipys_dilation(monkeypatch):
    def dilation(*args, **kwargs):
        raise AssertionError("scipy's binary_fill_holes ran")

    mask = MASKS["ct: all but scattered voxels"]
    expected = ndimage.binary_fill_holes(mask)
    assert expected.sum() > mask.sum()
    monkeypatch.setattr(hole_filling.ndimage, "binary_fill_holes", dilation)
    assert np.array_equal(hole_filling.fill_holes(mask), expected)


def _ct_case(rng):
    """Two channels of int-valued HU: air -1000 around a body with voxels of exactly 0 inside it."""
    shape = (30, 40, 44)
    body = _ball(shape, (15, 20, 22), 14)
    data = np.where(body, np.round(rng.normal(30, 20, shape)), -1000.0).astype(np.float32)
    data[:, :3] = 0  # slices of 0 (a scanner's padding) on one side: outside the crop
    return np.stack([data, np.where(body, data, 0)]), (rng.random(shape) > 0.7).astype(np.int8)[None] * 2


@pytest.mark.parametrize("profile_input_on_device", [False, True], ids=["cpu worker", "accelerator worker"])
def test_a_fast_profile_helper_crops_each_case_as_nnunet_does(profile_input_on_device, monkeypatch):
    monkeypatch.setattr(cropping, "binary_fill_holes", cropping.binary_fill_holes)  # restored after the test
    data, previous_stage = _ct_case(np.random.default_rng(3))
    expected = [cropping.crop_to_nonzero(data.copy(), seg) for seg in (None, previous_stage.copy())]

    nnunet._init_preprocessing({}, False, 1, input_on_device=None)  # the exact profile: nnU-Net's code as it is
    assert cropping.binary_fill_holes is ndimage.binary_fill_holes
    nnunet._init_preprocessing({}, False, 1, input_on_device=profile_input_on_device)
    assert cropping.binary_fill_holes is hole_filling.fill_holes
    for seg, (data_expected, seg_expected, bbox_expected) in zip((None, previous_stage), expected, strict=True):
        cropped, cropped_seg, bbox = cropping.crop_to_nonzero(data.copy(), None if seg is None else seg.copy())
        assert bbox == bbox_expected and bbox[1][0] == 3
        assert np.array_equal(cropped, data_expected) and np.array_equal(cropped_seg, seg_expected)
        assert cropped_seg.dtype == seg_expected.dtype
