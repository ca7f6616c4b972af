"""nnU-Net's default image resampling as one matrix product per axis, on any torch device.

nnU-Net resamples images (plans: ``resample_data_or_seg_to_shape`` with ``is_seg=False, order=3, order_z=0,
force_separate_z=None``) with skimage's ``resize`` per channel, in float64 on one CPU core: seconds per CT.
Every step of it is linear and acts on each axis on its own:

- ``resize(x, shape, order, mode='edge', anti_aliasing=False)`` is ``scipy.ndimage.zoom(x, ..., order,
  mode='nearest', grid_mode=True)`` followed by a clip to the input's range. zoom's spline prefilter pads each
  axis with its edge value and filters axis by axis; its interpolation weights are products of per-axis weights.
- with a separate z axis, nnU-Net resizes each 2D slice in-plane, then calls ``map_coordinates(order=order_z,
  mode='nearest')`` with coordinates that are the identity on the in-plane axes and move only along z.

So each axis is a dense (n_out, n_in) matrix, computed exactly by running that same skimage/scipy call on the
n_in unit vectors, and the resampling is a product with each axis's matrix. The clip is the one non-linear step:
it is done where ``resize`` does it, to the range of the channel's volume, or of each 2D input slice when z is
resampled separately (``map_coordinates`` does not clip).
"""

import inspect
from functools import lru_cache

import numpy as np
import torch
from nnunetv2.preprocessing.resampling.default_resampling import (
    determine_do_sep_z_and_axis,
    resample_data_or_seg_to_shape,
)
from scipy.ndimage import map_coordinates
from skimage.transform import resize

# spline orders compared with nnU-Net's own function in the tests (for order and order_z)
ORDERS = (0, 1, 3)

# the keyword arguments of nnU-Net's function, with its defaults
_NNUNET_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(resample_data_or_seg_to_shape).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


def reproduces(resampling_fn, kwargs: dict) -> bool:
    """Whether ``resampling_fn(data, new_shape, current_spacing, new_spacing, **kwargs)`` (a configuration's
    ``resampling_fn_data`` and ``resampling_fn_data_kwargs``) is one that ``resample_image`` reproduces: call it
    with the same kwargs less ``is_seg``. Otherwise keep nnU-Net's function."""
    if resampling_fn is not resample_data_or_seg_to_shape or not set(kwargs) <= set(_NNUNET_DEFAULTS):
        return False
    kwargs = {**_NNUNET_DEFAULTS, **kwargs}
    return not kwargs["is_seg"] and kwargs["order"] in ORDERS and kwargs["order_z"] in ORDERS


@lru_cache(maxsize=64)  # bounded: cropped cases come in many shapes, and a 512 x 512 matrix is 2 MB
def axis_matrix(n_in: int, n_out: int, kind: str, order: int) -> torch.Tensor:
    """The (n_out, n_in) float64 CPU matrix of one axis: column i is nnU-Net's call applied to unit vector i.

    kind "resize": skimage's resize as nnU-Net calls it, less the clip (resample_image clips). For n_in == n_out it
    is exactly the identity (zoom returns its input when every zoom factor is 1).
    kind "map_coordinates": nnU-Net's separate-z step, with the coordinates its coord_map has along that axis.
    """
    basis = np.eye(n_in)
    if kind == "resize":
        columns = [resize(e, (n_out,), order, mode="edge", anti_aliasing=False, clip=False) for e in basis]
    elif kind == "map_coordinates":
        coordinates = (float(n_in) / n_out) * (np.arange(n_out) + 0.5) - 0.5
        columns = [map_coordinates(e, coordinates[None], order=order, mode="nearest") for e in basis]
    else:
        raise ValueError(f"unknown kind of axis matrix: {kind!r}")
    matrix = np.stack(columns, axis=1)
    # The spline weights decay geometrically away from the diagonal, down to 1e-146. Products with the tiny ones are
    # float32 denormals, which make a CPU matrix product up to ~30x slower; weights under 1e-20 (four orders of
    # magnitude under float64's rounding, 2e-16) change nothing that nnU-Net's own float64 result could show.
    matrix[np.abs(matrix) < 1e-20] = 0.0
    return torch.from_numpy(matrix)


def _apply(x: torch.Tensor, matrices: dict[int, torch.Tensor]) -> torch.Tensor:
    """Multiply each axis of x by its matrix (axis -> (n_out, n_in)). The shrinking axes go first, so that the
    intermediates, and the work of the products after them, stay small."""
    for axis, matrix in sorted(matrices.items(), key=lambda item: item[1].shape[0] / item[1].shape[1]):
        matrix = matrix.to(device=x.device, dtype=x.dtype)
        x = torch.movedim(torch.movedim(x, axis, -1) @ matrix.T, -1, axis)
    return x


def _clip_to_input_range(out: torch.Tensor, data: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """resize's clip: out to the [min, max] of data taken over dims (the axes one resize call saw)."""
    return torch.clamp(out, data.amin(dim=dims, keepdim=True), data.amax(dim=dims, keepdim=True))


def resample_image(
    data: torch.Tensor,
    new_shape,
    current_spacing,
    new_spacing,
    *,
    order: int = _NNUNET_DEFAULTS["order"],
    order_z: int = _NNUNET_DEFAULTS["order_z"],
    force_separate_z=_NNUNET_DEFAULTS["force_separate_z"],
    separate_z_anisotropy_threshold: float = _NNUNET_DEFAULTS["separate_z_anisotropy_threshold"],
) -> torch.Tensor:
    """nnU-Net's ``resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg=False,
    ...)`` for a float (C, X, Y, Z) tensor, computed in data's dtype on data's device; same keyword defaults
    (note: force_separate_z=False there, while nnU-Net's plans pass None). A 2D configuration's data is
    (C, 1, X, Y), as nnU-Net's preprocessor passes it."""
    assert data.ndim == 4, "data must be (c, x, y, z), as for nnU-Net's function"
    shape = tuple(data.shape[1:])
    new_shape = tuple(int(n) for n in new_shape)
    if shape == new_shape:
        return data  # nnU-Net returns its input then, unclipped
    do_separate_z, axis = determine_do_sep_z_and_axis(
        force_separate_z, current_spacing, new_spacing, separate_z_anisotropy_threshold
    )

    # one resize call per channel volume, or per 2D slice across the separate axis; an axis that keeps its size
    # needs no product (its resize matrix is the identity)
    resized_axes = [a for a in range(3) if not do_separate_z or a != axis]
    matrices = {
        a + 1: axis_matrix(shape[a], new_shape[a], "resize", order) for a in resized_axes if shape[a] != new_shape[a]
    }
    out = _clip_to_input_range(_apply(data, matrices), data, tuple(a + 1 for a in resized_axes))
    if do_separate_z and shape[axis] != new_shape[axis]:
        out = _apply(out, {axis + 1: axis_matrix(shape[axis], new_shape[axis], "map_coordinates", order_z)})
    return out.contiguous()
