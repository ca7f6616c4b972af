"""Every pickle the launcher reads goes through launcher.safe_pickle: what nnU-Net writes loads,
nothing a pickle names that could run code is imported or called."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from conftest import PickledCall
from launcher import safe_pickle

# the shape of nnU-Net's properties file (preprocessing's properties, as export_prediction saves them)
PROPERTIES = {
    "sitk_stuff": {"spacing": (2.0, 1.5, 1.5), "origin": (0.0, -3.5, 7.25), "direction": (1.0, 0.0, 0.0) * 3},
    "spacing": [2.0, 1.5, 1.5],
    "shape_before_cropping": (31, 40, 37),
    "bbox_used_for_cropping": [[0, 31], [1, 40], [0, 37]],
    "shape_after_cropping_and_before_resampling": (31, 39, 37),
    "nibabel_stuff": {"original_affine": np.eye(4), "reoriented_affine": np.eye(4, dtype=np.float32)},
    "class_locations": {np.int64(1): np.zeros((5, 4), dtype=np.int64)},
    "max": np.float32(3.5),
}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_nnunet_properties_load_under_every_pickle_protocol(tmp_path, protocol):
    path = tmp_path / "case.pkl"
    path.write_bytes(pickle.dumps(PROPERTIES, protocol=protocol))
    loaded = safe_pickle.load_data(str(path))
    assert loaded.keys() == PROPERTIES.keys()
    assert np.array_equal(
        loaded["nibabel_stuff"]["reoriented_affine"], PROPERTIES["nibabel_stuff"]["reoriented_affine"]
    )
    assert loaded["max"] == np.float32(3.5) and loaded["sitk_stuff"] == PROPERTIES["sitk_stuff"]


def test_a_pickle_that_names_anything_but_numpy_constructors_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(PickledCall(os.system, f"touch {marker}")))
    for hostile in (
        PickledCall(os.system, f"touch {marker}"),
        {"spacing": [1.0], "x": PickledCall(np.load, str(payload), None, True)},
        PickledCall(eval, f"open({str(marker)!r}, 'w')"),
    ):
        path = tmp_path / "case.pkl"
        path.write_bytes(pickle.dumps(hostile))
        with pytest.raises(safe_pickle.NotAllowed):
            safe_pickle.load_data(str(path))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        safe_pickle.loads(b"not a pickle at all")
