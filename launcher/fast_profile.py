"""The fast profile (`--profile fast`, opt-in): the same network and weights as plain nnU-Net,
with the export moved off nnU-Net's CPU float64 path. It changes voxels (the agreement with plain
nnU-Net is measured by scripts/bench_export.py and published in the README); the default profile
("exact") never comes here.

- Export: the logits are resampled with nnU-Net's own torch resampling
  (`resample_torch_fornnunet`, the separate-z logic included) where they are, a few channels at a
  time, rounded to the logits' half precision as nnU-Net's default export rounds them, reduced to
  the segmentation as they go (a running argmax, or the regions in their order), so only the
  integer segmentation crosses to the host; an export helper un-crops and writes it
  exactly as nnU-Net's export does. On an accelerator (launcher.device) this runs on the device in
  the worker; a device short of memory for a case, or results nnU-Net left in host memory, send
  that case's logits to an export helper, which runs the same code on the CPU (logged). On a CPU
  worker the helpers run it, so the worker keeps predicting.
- Prediction on an accelerator: the folds' results summed on the device when it has room (nnU-Net moves each
  fold's to the host), and the mirrored passes of test-time augmentation batched into one forward
  until the device runs out of memory for that (then one pass at a time, as nnU-Net does).
- Ensembles: the members' probabilities averaged where their logits are, chunk by chunk, with no
  member files in between (nnUNetv2_ensemble averages the members' .npz).
- Preprocessing: the crop's hole filling gives the same mask, faster (launcher.hole_filling);
  the crop's mask, which nnU-Net resamples and inference then drops, is not resampled; the
  input's resampling, nnU-Net's cubic spline (skimage's resize, order 3, the separate-z rule
  included), as one matrix product per axis (launcher.spline_resample: the same spline, within
  1e-5 of nnU-Net's float64 result). On an accelerator the helper reads, crops and
  normalizes, and the worker resamples on its device before the network (on the CPU when the device
  lacks the memory); on a CPU worker the helper resamples with torch. Plans with another resampling
  function keep nnU-Net's own (logged once).

Imports nnunetv2 and torch: only workers and their helpers load it (through launcher.nnunet).
"""

from __future__ import annotations

import itertools
import json
import math
from typing import NamedTuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from batchgenerators.utilities.file_and_folder_operations import save_pickle
from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from scipy import ndimage

from launcher import hole_filling, spline_resample
from launcher.device import Device, out_of_memory
from launcher.spec import EXPORT_ARGMAX_BYTES_PER_VOXEL, EXPORT_CHUNK_BYTES
from launcher.stages import load_postprocessing

CHUNK_BYTES = EXPORT_CHUNK_BYTES  # a module global: tests make chunks small


# --- preprocessing: the input's resampling ---------------------------------------------------------
class Unresampled(NamedTuple):
    """A case preprocessed but for its resampling, which the worker does on its device."""

    data: np.ndarray
    new_shape: tuple
    current_spacing: list
    new_spacing: list
    kwargs: dict

    def resample(self, device: torch.device | None = None) -> torch.Tensor:
        data = torch.from_numpy(self.data).to(device or "cpu")
        new_shape, current, target = self.new_shape, self.current_spacing, self.new_spacing
        return spline_resample.resample_image(data, new_shape, current, target, **self.kwargs)

    def memory_bytes(self) -> int:
        """A bound for the device: the input, the output, and an axis product's input and result at
        the largest any intermediate can be, each axis at its larger size (float32). With a
        separate z the in-plane result can exceed both the input and the output."""
        sizes = [math.prod(self.data.shape[1:]), math.prod(self.new_shape)]
        largest = math.prod(max(old, new) for old, new in zip(self.data.shape[1:], self.new_shape, strict=True))
        return 4 * self.data.shape[0] * (2 * largest + 2 * sum(sizes))


class _Resampling:
    """A configuration manager with the resampling functions given (everything else its own):
    what nnU-Net's run_case_npy is given in a preprocessing helper."""

    def __init__(self, configuration_manager, **functions):
        self._manager = configuration_manager
        self.__dict__.update(functions)

    def __getattr__(self, name):
        return getattr(self._manager, name)


def input_resampling(configuration_manager) -> dict | None:
    """The keyword arguments spline_resample needs for this configuration's input resampling, or
    None when its plans use a function spline_resample does not reproduce."""
    function = configuration_manager.resampling_fn_data  # a partial of nnU-Net's function and the plans' kwargs
    if not spline_resample.reproduces(function.func, function.keywords):
        return None
    return {k: v for k, v in function.keywords.items() if k != "is_seg"}


def preprocessing_manager(configuration_manager, on_device: bool):
    """The configuration manager a fast profile's preprocessing helper gives nnU-Net: its input
    resampling left to the worker's device (on_device) or done here with torch; nnU-Net's own
    where spline_resample does not reproduce it."""
    kwargs = input_resampling(configuration_manager)
    if kwargs is None:
        return configuration_manager
    nnunets = configuration_manager.resampling_fn_data

    def resampling(data, new_shape, current_spacing, new_spacing):
        new_shape = tuple(int(n) for n in new_shape)
        if tuple(data.shape[1:]) == new_shape:
            return data  # nothing to resample (nnU-Net returns the data as they are): nothing for the device
        if not np.isfinite(data).all():  # a matrix product spreads a NaN over whole lines; skimage keeps it local
            return nnunets(data, new_shape, current_spacing, new_spacing)
        item = Unresampled(data, new_shape, list(current_spacing), list(new_spacing), kwargs)
        return item if on_device else item.resample().numpy()

    return _Resampling(configuration_manager, resampling_fn_data=resampling)


def without_mask_resampling(configuration_manager):
    """The configuration manager for a case without a previous stage. nnU-Net's run_case_npy then
    makes a segmentation of the crop's mask (-1 outside the non-zero region), normalizes with it,
    resamples it with the data (resize_segmentation: an order-1 spline per value) and returns it,
    and inference drops it (preprocess_fromfiles_save_to_queue keeps the seg only from a previous
    stage). On a whole CT that resampling took 2.3 s of the helper's 4.9 s. Here it is zeros of
    the new shape: the same data and properties."""

    def unused(seg, new_shape, current_spacing, new_spacing):
        return np.zeros((seg.shape[0], *(int(n) for n in new_shape)), dtype=np.int8)

    return _Resampling(configuration_manager, resampling_fn_seg=unused)


def use_fast_hole_filling() -> None:
    """In this process nnU-Net's crop (crop_to_nonzero) fills its mask's holes with
    launcher.hole_filling: the same mask, so the same cropped case; the crop 7x faster on CTs. Called
    in a fast profile's preprocessing helpers only: the exact profile runs nnU-Net's code as it is."""
    from nnunetv2.preprocessing.cropping import cropping

    if cropping.binary_fill_holes is ndimage.binary_fill_holes:  # a fork that fills otherwise keeps its own
        cropping.binary_fill_holes = hole_filling.fill_holes


def resample_input(item: Unresampled, device: Device, notes: list[str], choices: list[str]) -> torch.Tensor:
    """The case's input resampled on the worker's device, or on its CPU when the device has not the
    memory; a host tensor for nnU-Net's prediction (which moves it where it predicts)."""
    try:
        device.reserve(item.memory_bytes(), "the input's resampling")
        resampled = device.to_host(item.resample(device.torch))
        choices.append(f"input resampled on {device.describe()}")
        return resampled
    except RuntimeError as exc:
        if not out_of_memory(exc):
            raise
        notes.append(f"input resampled on the CPU: {str(exc).splitlines()[0]}")
    device.empty_cache()
    return item.resample()


# --- the export: resample, segment, un-crop, write ------------------------------------------------
def resampling_settings(configuration_manager) -> dict:
    """The configuration's probability resampling in resample_torch_fornnunet's terms: nnU-Net's
    default (skimage, spline `order`, `order_z` along the anisotropic axis) maps to linear
    interpolation (order 0: nearest) and nearest along z (order_z 0), as the torch planners do."""
    configuration = configuration_manager.configuration
    kwargs = dict(configuration.get("resampling_fn_probabilities_kwargs") or {})
    settings = {"force_separate_z": kwargs.get("force_separate_z")}
    if "separate_z_anisotropy_threshold" in kwargs:
        settings["separate_z_anisotropy_threshold"] = kwargs["separate_z_anisotropy_threshold"]
    if configuration.get("resampling_fn_probabilities") == "resample_torch_fornnunet":
        settings.update({k: kwargs[k] for k in ("mode", "aniso_axis_mode") if k in kwargs})
    else:
        settings["mode"] = "nearest-exact" if kwargs.get("order", 1) == 0 else "linear"
        settings["aniso_axis_mode"] = "nearest-exact" if kwargs.get("order_z", 0) == 0 else "linear"
    return settings


def _rounded_to_the_logits_dtype(configuration_manager) -> bool:
    """Whether nnU-Net's export rounds the resampled logits to their own dtype before its argmax.
    Its default (resample_data_or_seg_to_shape) resamples in float64 and returns the logits' dtype,
    half as its predictor gives them: two channels that round to the same value are a tie, which
    the earlier channel wins. resample_torch_fornnunet returns float32. On a quarter CT of
    scripts/bench_preprocess.py, argmaxing the unrounded values differed from nnU-Net's on 0.029 %
    of the voxels, rounded on 0.0004 %."""
    return configuration_manager.configuration.get("resampling_fn_probabilities") != "resample_torch_fornnunet"


def _spacings(properties: dict, configuration_manager, plans_manager) -> tuple[list, list]:
    """Where the logits are and where the case was, as nnU-Net's export computes them."""
    target = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current = configuration_manager.spacing
    if len(current) != len(properties["shape_after_cropping_and_before_resampling"]):
        current = [target[0], *current]  # a 2d configuration: slices keep their spacing
    return list(current), target


def export_memory_bytes(num_channels: int, in_shape, out_shape, save_probabilities: bool) -> int:
    """What segment() allocates besides the logits it is given (a bound, for the device's free memory)."""
    out_voxels = math.prod(out_shape)
    if save_probabilities:  # every channel's probabilities at once, then their softmax
        return int(_chunk_bytes(num_channels, in_shape, out_shape) + 4 * out_voxels * num_channels)
    chunk = _channels_per_chunk(num_channels, in_shape, out_shape)
    return int(_chunk_bytes(chunk, in_shape, out_shape) + EXPORT_ARGMAX_BYTES_PER_VOXEL * out_voxels)


def _chunk_bytes(channels: int, in_shape, out_shape) -> int:
    """A chunk of channels resampled in float32, and the one channel being resampled: its input in
    float32, with separate z the in-plane step (its own slices, the output's plane: larger than the
    output when the resampling reduces slices), its result and that result in half precision."""
    out_voxels = math.prod(out_shape)
    shrink = max(1.0, max(i / o for i, o in zip(in_shape, out_shape, strict=True)))
    return int(4 * out_voxels * channels + 4 * math.prod(in_shape) + out_voxels * (4 * shrink + 4 + 2))


def _channels_per_chunk(num_channels: int, in_shape, out_shape) -> int:
    spare = CHUNK_BYTES - _chunk_bytes(0, in_shape, out_shape)
    return max(1, min(num_channels, spare // (4 * math.prod(out_shape))))


@torch.inference_mode()
def segment(
    logits: torch.Tensor | np.ndarray,
    properties: dict,
    configuration_manager,
    plans_manager,
    label_manager,
    save_probabilities: bool,
    threads: int,
    device: Device | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The case's segmentation (cropped, in the network's axis order) and, if asked, its
    probabilities (float32), from logits where they are: on `device` (a worker's), or in host
    memory (None: an export helper)."""
    logits = _tensor(logits)
    resample = _resampler(properties, configuration_manager, plans_manager, threads, logits, device)
    if save_probabilities:
        return _segment_probabilities(label_manager.apply_inference_nonlin(resample(logits)), label_manager)
    chunk = _channels_per_chunk(logits.shape[0], logits.shape[1:], _out_shape(properties))
    resampled = ((start, resample(logits[start : start + chunk])) for start in range(0, logits.shape[0], chunk))
    if label_manager.has_regions:  # sigmoid(x) > 0.5 is x > 0
        masks = ((start, part > 0) for start, part in resampled)
        return _to_host(_regions(masks, label_manager.regions_class_order), label_manager), None
    return _to_host(_argmax(resampled), label_manager), None


@torch.inference_mode()
def segment_ensemble(
    members: list[tuple], label_manager, save_probabilities: bool, threads: int, device: Device | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """nnUNetv2_ensemble's result without its files: each member's (logits, properties,
    configuration_manager, plans_manager) resampled to the case's shape, turned into probabilities
    (softmax, or sigmoid for regions), averaged, then segmented. A few channels at a time: a
    softmax needs every channel, so a first pass keeps each member's running maximum and sum of
    exponentials per voxel, and a second averages the probabilities chunk by chunk into a running
    argmax. The members' logits stay where they are (all on `device`, or all in host memory)."""
    resamplers = [
        (logits, _resampler(props, configuration, plans, threads, logits, device))
        for logits, props, configuration, plans in ((_tensor(m[0]), *m[1:]) for m in members)
    ]
    count, num_channels = len(members), resamplers[0][0].shape[0]
    if save_probabilities:
        total = sum(label_manager.apply_inference_nonlin(resample(logits)) for logits, resample in resamplers)
        return _segment_probabilities(total / count, label_manager)
    out_shape = _out_shape(members[0][1])
    chunk = min(_channels_per_chunk(num_channels, logits.shape[1:], out_shape) for logits, _ in resamplers)
    starts = range(0, num_channels, chunk)
    if label_manager.has_regions:  # a sigmoid per channel: one pass
        means = (
            (start, sum(torch.sigmoid(resample(logits[start : start + chunk])) for logits, resample in resamplers))
            for start in starts
        )
        masks = ((start, total / count > 0.5) for start, total in means)
        return _to_host(_regions(masks, label_manager.regions_class_order), label_manager), None
    softmax = []  # per member: (maximum, sum of exp(x - maximum)) over the channels, per voxel
    for logits, resample in resamplers:
        top = total = None
        for start in starts:
            part = resample(logits[start : start + chunk])
            new_top = part.max(0).values if top is None else torch.maximum(top, part.max(0).values)
            scaled = torch.exp(part - new_top).sum(0)
            total = scaled if total is None else total * torch.exp(top - new_top) + scaled
            top = new_top
        softmax.append((top, total))
    means = (
        (
            start,
            sum(
                torch.exp(resample(logits[start : start + chunk]) - top) / total
                for (logits, resample), (top, total) in zip(resamplers, softmax, strict=True)
            )
            / count,
        )
        for start in starts
    )
    return _to_host(_argmax(means), label_manager), None


def _segment_probabilities(probabilities: torch.Tensor, label_manager) -> tuple[np.ndarray, np.ndarray]:
    if label_manager.has_regions:
        segmentation = _regions([(0, probabilities > 0.5)], label_manager.regions_class_order)
    else:
        segmentation = probabilities.argmax(0)
    return _to_host(segmentation, label_manager), probabilities.cpu().numpy()


def _argmax(chunks) -> torch.Tensor:
    """One argmax over every channel, from (first channel, values) chunks of them in order, a
    channel at a time in place: a later channel wins a voxel only when strictly greater, so a tie
    keeps the earlier channel, as one argmax over all would (over the softmax, as nnU-Net's: a
    voxel with a NaN or +inf is channel 0). (A chunk's max(0) and torch.where over
    int64 indices cost several times the resampling on the CPU: 10x this on a whole CT.)"""
    best = segmentation = better = None
    for start, part in chunks:
        for index, channel in enumerate(part, start):
            if best is None:
                best = channel.clone()
                segmentation = torch.full(best.shape, index, dtype=torch.int16, device=best.device)
                better = torch.empty(best.shape, dtype=torch.bool, device=best.device)
                continue
            torch.gt(channel, best, out=better)
            torch.maximum(best, channel, out=best)
            segmentation.masked_fill_(better, index)
    # nnU-Net's argmax is of the softmax, all NaN where a value is NaN or +inf: channel 0 there
    segmentation.masked_fill_(torch.ne(best, best, out=better), 0)
    segmentation.masked_fill_(torch.eq(best, math.inf, out=better), 0)
    return segmentation


def _regions(chunks, order) -> torch.Tensor:
    """nnU-Net's region labels from (first channel, masks) chunks in order: each region's label
    where its mask holds, later regions over earlier ones."""
    segmentation = None
    for start, masks in chunks:
        if segmentation is None:
            segmentation = torch.zeros(masks.shape[1:], dtype=torch.int16, device=masks.device)
        for i, mask in enumerate(masks):
            segmentation[mask] = order[start + i]
    return segmentation


def _tensor(logits) -> torch.Tensor:
    return torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits


def _out_shape(properties: dict) -> list[int]:
    return [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]


def _resampler(properties: dict, configuration_manager, plans_manager, threads: int, logits, device):
    """Channels of this case's logits back to its shape and spacing, in float32, where the logits are."""
    out_shape = _out_shape(properties)
    current, target = _spacings(properties, configuration_manager, plans_manager)
    settings = resampling_settings(configuration_manager)
    rounded = _rounded_to_the_logits_dtype(configuration_manager)

    def resample(channels: torch.Tensor) -> torch.Tensor:
        if device is not None:
            device.reserve(_chunk_bytes(len(channels), logits.shape[1:], out_shape), "the export's chunk of channels")
        result = torch.empty((len(channels), *out_shape), dtype=torch.float32, device=logits.device)
        # One channel a call: torch interpolates a batch of channels (with separate z, the chunk's
        # slices) by other code paths than one channel, a float32 step apart now and then, which the
        # rounding can turn into another label. So a channel's values do not depend on its chunk:
        # with or without probabilities saved, in a chunk of any size, the same segmentation.
        for channel, into in zip(channels, result, strict=True):
            resampled = resample_torch_fornnunet(
                channel[None], out_shape, current, target, is_seg=False, num_threads=threads, device=logits.device,
                **settings,
            )[0]  # fmt: skip
            into.copy_(resampled.to(channels.dtype) if rounded else resampled)
        return result

    return resample


def _label_dtype(label_manager):
    return np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16


def _to_host(segmentation: torch.Tensor, label_manager) -> np.ndarray:
    small = torch.uint8 if _label_dtype(label_manager) == np.uint8 else torch.int32
    return segmentation.to(small).cpu().numpy().astype(_label_dtype(label_manager), copy=False)


def write_segmentation(
    segmentation: np.ndarray,
    probabilities: np.ndarray | None,
    properties: dict,
    plans_manager,
    dataset_json: dict,
    output_base: str,
    postprocessing: tuple[str, str] | None = None,
) -> None:
    """Un-crop, restore the axis order and write, as nnU-Net's export_prediction_from_logits does
    (same writer, same files: the segmentation, and with probabilities the .npz and .pkl).
    `postprocessing`: (postprocessing.pkl, its plans.json), applied as nnUNetv2_apply_postprocessing
    applies it to the written segmentation, and written with that plans' writer."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    full = np.zeros(properties["shape_before_cropping"], dtype=_label_dtype(label_manager))
    full = insert_crop_into_image(full, segmentation, properties["bbox_used_for_cropping"])
    full = full.transpose(plans_manager.transpose_backward)
    if probabilities is not None:
        probabilities = label_manager.revert_cropping_on_probabilities(
            probabilities, properties["bbox_used_for_cropping"], properties["shape_before_cropping"]
        )
        probabilities = probabilities.transpose([0] + [i + 1 for i in plans_manager.transpose_backward])
        np.savez_compressed(output_base + ".npz", probabilities=probabilities)
        save_pickle(properties, output_base + ".pkl")
    writer = plans_manager.image_reader_writer_class()
    if postprocessing is not None:
        full, writer = _postprocess(full, *postprocessing)
    writer.write_seg(full, output_base + dataset_json["file_ending"], properties)


def _postprocess(segmentation: np.ndarray, pp_pkl: str, plans_json: str):
    with open(plans_json) as f:
        writer = PlansManager(json.load(f)).image_reader_writer_class()
    pp_fns, pp_fn_kwargs = load_postprocessing(pp_pkl)
    return apply_postprocessing(segmentation, pp_fns, pp_fn_kwargs), writer


def export_from_logits(
    logits: np.ndarray,
    properties: dict,
    configuration_manager,
    plans_manager,
    dataset_json: dict,
    output_base: str,
    save_probabilities: bool,
    threads: int,
) -> None:
    """The whole fast export on the CPU, in an export helper: export_prediction_from_logits's
    arguments and files, nnU-Net's torch resampling instead of its float64 skimage one."""
    torch.set_num_threads(threads)
    label_manager = plans_manager.get_label_manager(dataset_json)
    segmentation, probabilities = segment(
        logits, properties, configuration_manager, plans_manager, label_manager, save_probabilities, threads
    )
    del logits
    write_segmentation(segmentation, probabilities, properties, plans_manager, dataset_json, output_base)


def export_ensemble(
    members: list[tuple],
    dataset_json: dict,
    output_base: str,
    save_probabilities: bool,
    threads: int,
    postprocessing: tuple[str, str] | None,
) -> None:
    """A fused ensemble's whole export on the CPU, in an export helper (see segment_ensemble);
    the first member's properties and plans, as nnUNetv2_ensemble takes them."""
    torch.set_num_threads(threads)
    _, properties, _, plans_manager = members[0]
    label_manager = plans_manager.get_label_manager(dataset_json)
    segmentation, probabilities = segment_ensemble(members, label_manager, save_probabilities, threads)
    del members
    write_segmentation(
        segmentation, probabilities, properties, plans_manager, dataset_json, output_base, postprocessing
    )


def ensemble_memory_bytes(members: list[tuple], save_probabilities: bool) -> int:
    """What segment_ensemble() allocates besides the members' logits (a bound)."""
    logits, properties = members[0][0], members[0][1]
    out_shape = _out_shape(properties)
    single = export_memory_bytes(logits.shape[0], logits.shape[1:], out_shape, save_probabilities)
    return int(single * (2 if save_probabilities else 1) + 8 * math.prod(out_shape) * len(members))


# --- prediction on an accelerator: folds summed on the device, mirrored passes batched -----------
@torch.inference_mode()
def predict_logits(predictor, data: torch.Tensor, notes: list[str], device: Device) -> torch.Tensor:
    """nnU-Net's predict_logits_from_preprocessed_data, with the sum of the folds kept on the
    device while it leaves room for the next fold's results (nnU-Net moves every fold's to the
    host, to be safe from running out of memory). nnU-Net's own fallback (results on the host when
    the device runs out during a fold) still applies; a sum and a fold in different places meet
    on the host."""
    prediction = None
    for fold, params in enumerate(predictor.list_of_parameters):
        network = getattr(predictor.network, "_orig_mod", predictor.network)
        network.load_state_dict(params)
        logits = predictor.predict_sliding_window_return_logits(data)
        if prediction is None:
            prediction = logits
        elif device.holds(prediction) == device.holds(logits):
            prediction += logits
        else:
            prediction = device.to_host(prediction)
            prediction += device.to_host(logits)
        del logits
        last = fold == len(predictor.list_of_parameters) - 1
        free = device.free_bytes()
        if not last and device.holds(prediction) and free < 2 * prediction.nbytes + device.slack_bytes:
            notes.append(f"folds summed on the host from fold {fold}: {free / 2**20:.0f} MiB free on the device")
            prediction = device.to_host(prediction)
    if len(predictor.list_of_parameters) > 1:
        prediction /= len(predictor.list_of_parameters)
    return prediction


class BatchedMirroring:
    """nnU-Net's _internal_maybe_mirror_and_predict with the mirrored copies of a tile in one
    batch: one forward instead of 8 (3D) or 4 (2D), the same average. When the batch does not fit
    on the device, this worker goes back to one pass at a time for good (logged once)."""

    def __init__(self, predictor, one_at_a_time, notes: list[str], device: Device):
        self.predictor, self.one_at_a_time, self.notes, self.device = predictor, one_at_a_time, notes, device
        self.batched = True

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.predictor
        axes = p.allowed_mirroring_axes if p.use_mirroring else None
        if not axes or not self.batched:
            return self.one_at_a_time(x)
        assert max(axes) <= x.ndim - 3, "mirror_axes does not match the dimension of the input!"
        axes = [a + 2 for a in axes]
        combinations = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        try:
            out = p.network(torch.cat([x, *(torch.flip(x, c) for c in combinations)]))
        except RuntimeError as exc:
            if not out_of_memory(exc):
                raise
            out = None
        if out is None:  # out of the except block: the failed batch's activations are freed first
            self.device.empty_cache()
            self.batched = False
            self.notes.append(
                f"mirrored passes one at a time from now on: a batch of {len(combinations) + 1} tiles "
                "does not fit on the device"
            )
            return self.one_at_a_time(x)
        prediction = out[:1].clone()
        for i, c in enumerate(combinations):
            prediction += torch.flip(out[i + 1 : i + 2], c)
        return prediction / (len(combinations) + 1)
