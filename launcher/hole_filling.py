"""nnU-Net's hole filling for its crop, the same mask in a fraction of the time.

nnU-Net crops every case to its non-zero region (`crop_to_nonzero`), and fills the region's holes
first with `scipy.ndimage.binary_fill_holes`: an iterative dilation of the background from the
array's border over the whole array. On a CT, whose air is -1000 HU, the region is nearly the whole
scan and its holes are scattered voxels of exactly 0 HU: the dilation took 2.3-2.6 s for a whole CT
(300 x 512 x 512) on our 2-core VM, as much as the fast profile's input resampling.

`fill_holes` returns exactly what `binary_fill_holes(mask)` does (its default structure: voxels are
neighbours along the axes), by the definition of a hole: a background component that does not
touch the array's border.
- Every hole lies inside the bounding box of the mask (from a voxel outside it, a straight line
  toward the border meets no mask), and a background voxel on the box's face touches background
  beyond it, which reaches the border; so only the box is looked at.
- When the box holds little background (below SPARSE_SHARE), the background voxels' components are
  found as a graph of their flat indices (scipy.sparse.csgraph): 0.13 s for that whole CT.
- Otherwise (an MR's air inside the box, say) scipy's own filling runs on the box.

The fast profile's preprocessing helpers give it to nnU-Net's crop (fast_profile.use_fast_hole_filling);
nnU-Net's own code does the rest of the crop, so the cropped case is the same array.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# measured on a whole CT's mask with random background: the graph 13x faster at 0.3 %, 2.1x at 4 %, even at 8 %
SPARSE_SHARE = 0.05


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_fill_holes(mask)`: the mask with every background component that does
    not touch the array's border (connected along the axes) set."""
    mask = np.asarray(mask, dtype=bool)
    filled = np.zeros(mask.shape, dtype=bool)
    box = _bounding_box(mask)
    if box is None:
        return filled
    inside = mask[box]
    background = np.flatnonzero(~inside)
    if background.size > SPARSE_SHARE * inside.size:
        filled[box] = ndimage.binary_fill_holes(inside)
        return filled
    box_filled = np.ones(inside.shape, dtype=bool)
    box_filled.reshape(-1)[background[_reaches_border(background, inside.shape)]] = False
    filled[box] = box_filled
    return filled


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _reaches_border(background: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """For each background voxel (ascending flat indices into an array of `shape`), whether its
    component (neighbours along the axes) touches the array's border."""
    count = background.size
    if count == 0:
        return np.zeros(0, dtype=bool)
    position = np.unravel_index(background, shape)
    sources, targets = [], []
    stride = 1
    for axis in reversed(range(len(shape))):  # C order: the last axis has stride 1
        has_next = np.flatnonzero(position[axis] < shape[axis] - 1)
        neighbour = background[has_next] + stride
        found = np.minimum(np.searchsorted(background, neighbour), count - 1)
        linked = background[found] == neighbour
        sources.append(has_next[linked])
        targets.append(found[linked])
        stride *= shape[axis]
    sources, targets = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(sources.size, dtype=np.int8), (sources, targets)), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    on_border = np.zeros(count, dtype=bool)
    for axis, size in enumerate(shape):
        on_border |= (position[axis] == 0) | (position[axis] == size - 1)
    touching = np.zeros(component.max() + 1, dtype=bool)
    touching[component[on_border]] = True
    return touching[component]
