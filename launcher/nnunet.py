"""The only module that imports nnunetv2: the backend of a worker's pipeline (see pipeline.py).
One predictor with the model loaded once per worker; preprocessing and export run as nnU-Net
does them, in the pipeline's pools."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from functools import partial

import numpy as np
import torch
from nnunetv2.ensembling.ensemble import merge_files
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.postprocessing.remove_connected_components import load_postprocess_save
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from launcher import fast_profile, nnunet_versions, safe_pickle
from launcher.device import Device, configure_process, for_worker, out_of_memory
from launcher.headers import gzip_stream_intact
from launcher.spec import Combine, Failure, PredictSettings, UnreadableInput
from launcher.stages import load_postprocessing

# CUDA errors after which the process's CUDA context is unusable (anything but out of memory).
CUDA_CONTEXT_ERRORS = (
    "illegal memory access",
    "illegal address",
    "unspecified launch failure",
    "device-side assert",
    "uncorrectable ecc",
    "cuda error",
    "cudnn_status_execution_failed",
    "cublas_status_execution_failed",
)


# --- preprocessing, in the pool's processes -------------------------------------------------
_PREP: dict = {}  # per model (None in a single-stage run, else the member's name)


def _init_preprocessing(models: dict, verbose: bool, threads: int, input_on_device: bool | None) -> None:
    """`input_on_device`: None for the exact profile (nnU-Net's preprocessing as it is); for the fast
    one whether the worker resamples the inputs on its device (else this helper, with torch)."""
    torch.set_num_threads(threads)
    if input_on_device is not None:
        fast_profile.use_fast_hole_filling()
    for key, (plans, configuration_manager, dataset_json) in models.items():
        plans_manager = PlansManager(plans)
        first_stage_manager = configuration_manager
        if input_on_device is not None:
            configuration_manager = fast_profile.preprocessing_manager(configuration_manager, input_on_device)
            first_stage_manager = fast_profile.without_mask_resampling(configuration_manager)
        _PREP[key] = dict(
            plans_manager=plans_manager,
            configuration_manager=configuration_manager,
            first_stage_manager=first_stage_manager,  # for a case without a previous stage
            dataset_json=dataset_json,
            preprocessor=configuration_manager.preprocessor_class(verbose=verbose),
            label_manager=plans_manager.get_label_manager(dataset_json),
        )


def _read(prep: dict, files: tuple[str, ...], prev_stage_file: str | None):
    """Read the scan (and previous stage) as nnU-Net's preprocessor does; a failure to read
    cannot change on a retry. The reader's own words make the message (nnU-Net prints some of
    them, e.g. channels that differ in shape, then raises an empty RuntimeError)."""
    for path in files:  # SimpleITK reads a cut .nii.gz without an error, and returns wrong voxels
        if path.endswith(".gz") and (why := gzip_stream_intact(path)):
            raise UnreadableInput(f"input {os.path.basename(path)} is truncated or corrupt (gzip check: {why})")
    reader = prep["plans_manager"].image_reader_writer_class()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            data, properties = reader.read_images(list(files))
            seg = reader.read_seg(prev_stage_file)[0] if prev_stage_file is not None else None
    except Exception as exc:
        said = printed.getvalue()
        print(said, end="", flush=True)
        words = str(exc).strip().splitlines() or [line for line in said.splitlines() if line.strip()][:1]
        raise UnreadableInput(
            f"cannot read the scan: {type(exc).__name__}: {words[-1] if words else 'the reader failed'}"
        ) from None
    print(printed.getvalue(), end="", flush=True)
    return data, seg, properties


def _preprocess(model: str | None, files: tuple[str, ...], prev_stage_file: str | None):
    """What nnU-Net's preprocess_fromfiles_save_to_queue does for one case (run_case, split so
    that reading is told apart from preprocessing)."""
    prep = _PREP[model]
    data, seg, properties = _read(prep, files, prev_stage_file)
    manager = prep["configuration_manager" if prev_stage_file is not None else "first_stage_manager"]
    data, seg, properties = nnunet_versions.run_case_npy(
        prep["preprocessor"], data, seg, properties, prep["plans_manager"], manager, prep["dataset_json"]
    )
    if prev_stage_file is not None:
        if isinstance(data, fast_profile.Unresampled):  # stacked with the previous stage's at the model's shape
            data = data.resample().numpy()
        seg_onehot = convert_labelmap_to_one_hot(seg[0], prep["label_manager"].foreground_labels, data.dtype)
        data = np.vstack((data, seg_onehot))
    return data, properties


def _combine(combine: Combine, output_base: str, file_ending: str, save_probabilities: bool) -> None:
    """A case's nnUNetv2_ensemble (merge_files) and nnUNetv2_apply_postprocessing
    (load_postprocess_save), nnU-Net's own functions with the arguments its commands give them,
    so the result is the manual chain's, voxel for voxel. Runs in an export helper."""
    with open(combine.plans_json) as f:
        plans_manager = PlansManager(json.load(f))
    segmentation = output_base + file_ending
    if combine.ensemble:
        with open(combine.dataset_json) as f:
            label_manager = plans_manager.get_label_manager(json.load(f))
        rw = plans_manager.image_reader_writer_class()
        # merge_files unpickles the first member's properties: they lie in OUT, so they are checked
        # first (safe_pickle), and a planted file fails the case instead of running code
        safe_pickle.load_data(combine.inputs[0][: -len(".npz")] + ".pkl")
        merge_files(list(combine.inputs), output_base, file_ending, rw, label_manager, save_probabilities)
    else:  # one member, postprocessed: its probabilities (if asked for) are the final ones
        segmentation = combine.inputs[0]
        if save_probabilities:
            member_base = segmentation[: -len(file_ending)]
            for suffix in (".npz", ".pkl"):
                shutil.copyfile(member_base + suffix, output_base + suffix)
    if combine.pp_pkl is not None:
        with open(combine.pp_plans_json) as f:
            rw = PlansManager(json.load(f)).image_reader_writer_class()
        pp_fns, pp_fn_kwargs = load_postprocessing(combine.pp_pkl)
        load_postprocess_save(segmentation, output_base + file_ending, rw, pp_fns, pp_fn_kwargs)


def load_backends(settings: PredictSettings) -> dict:
    """One backend per model the worker serves, each loaded once for the worker's life, all on
    the worker's one device."""
    device = for_worker(settings.device, settings.deterministic)
    configure_process(settings.threads, device.accelerator)
    if not settings.members:
        return {None: NnunetBackend(settings, settings.model_folder, device)}
    return {name: NnunetBackend(settings, folder, device) for name, folder in settings.members}


class NnunetBackend:
    preprocess = staticmethod(_preprocess)
    combine = staticmethod(_combine)

    def __init__(self, settings: PredictSettings, model_folder: str, device: Device):
        self.settings, self.device = settings, device
        self.fast = settings.profile == "fast"
        # fast: an accelerator's worker exports on its device; a CPU worker leaves it to its helpers
        self.export_in_worker = self.fast and device.accelerator
        self.choices: list[str] = []  # how the fast profile did the current case (the worker's log)
        self.fallbacks: list[str] = []  # what it could not do as planned (also the supervisor's log)
        self.predictor = nnUNetPredictor(
            tile_step_size=settings.step_size,
            use_gaussian=True,
            use_mirroring=not settings.disable_tta,
            perform_everything_on_device=device.accelerator,
            device=device.torch,
            verbose=settings.verbose,
            verbose_preprocessing=settings.verbose,
            allow_tqdm=False,
        )
        self.predictor.initialize_from_trained_model_folder(
            model_folder, [f if f == "all" else int(f) for f in settings.folds], settings.checkpoint
        )
        device.configure_predictor(self.predictor)
        self.file_ending = self.predictor.dataset_json["file_ending"]
        self.label_manager = self.predictor.plans_manager.get_label_manager(self.predictor.dataset_json)
        self.mirroring = None
        if self.fast and device.accelerator:  # on the CPU a batch adds memory, not parallelism
            p = self.predictor
            self.mirroring = fast_profile.BatchedMirroring(
                p, p._internal_maybe_mirror_and_predict, self.fallbacks, device
            )
            p._internal_maybe_mirror_and_predict = self.mirroring
        if self.fast and fast_profile.input_resampling(self.predictor.configuration_manager) is None:
            print(
                f"--profile fast: {os.path.basename(model_folder)}'s plans resample the inputs with "
                f"{self.predictor.configuration_manager.configuration['resampling_fn_data']}, which the launcher "
                "does not reproduce on the device: nnU-Net's own resamples them",
                flush=True,
            )
        self._count_sliding_window_steps()

    @staticmethod
    def preprocess_initializer(backends: dict) -> tuple:
        """The preprocessing helpers' set-up, for every model the worker serves."""
        models = {
            key: (b.predictor.plans_manager.plans, b.predictor.configuration_manager, b.predictor.dataset_json)
            for key, b in backends.items()
        }
        first = next(iter(backends.values()))
        input_on_device = first.device.accelerator if first.fast else None
        return _init_preprocessing, (models, first.settings.verbose, 1, input_on_device)

    def _count_sliding_window_steps(self) -> None:
        """Progress during a prediction: nnU-Net calls _internal_maybe_mirror_and_predict once per
        sliding-window tile (each fold, mirroring included), after getting the tiles from
        _internal_get_sliding_window_slicers. Both are wrapped on this instance only."""
        p = self.predictor
        get_slicers, mirror_and_predict = p._internal_get_sliding_window_slicers, p._internal_maybe_mirror_and_predict
        self.steps, self.total_steps, self.on_step = 0, 0, None

        def counted_slicers(*args, **kwargs):
            slicers = get_slicers(*args, **kwargs)
            if self.total_steps == 0:  # the first fold tells the number of tiles per fold
                self.total_steps = len(slicers) * len(p.list_of_parameters)
            return slicers

        def counted_predict(x):
            result = mirror_and_predict(x)
            self.steps += 1
            if self.on_step is not None:
                self.on_step(self.steps, max(self.total_steps, self.steps))
            return result

        p._internal_get_sliding_window_slicers = counted_slicers
        p._internal_maybe_mirror_and_predict = counted_predict

    def predict(self, case_id: str, data: np.ndarray, on_step):
        """The case's logits: a host array, or with the fast profile on a GPU a device tensor."""
        self.steps, self.total_steps, self.on_step = 0, 0, on_step
        self.choices, self.fallbacks[:] = [], []
        try:
            if isinstance(data, fast_profile.Unresampled):
                data = fast_profile.resample_input(data, self.device, self.fallbacks, self.choices)
            else:
                data = torch.from_numpy(data)
            tensor = data.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            if not self.fast:
                return self.predictor.predict_logits_from_preprocessed_data(tensor).cpu().detach().numpy()
            logits = fast_profile.predict_logits(self.predictor, tensor, self.fallbacks, self.device)
            if len(self.predictor.list_of_parameters) > 1:
                where = self.device.describe() if self.device.holds(logits) else "the host"
                self.choices.append(f"{len(self.predictor.list_of_parameters)} folds summed on {where}")
            if self.mirroring is not None and not self.settings.disable_tta:
                self.choices.append(f"mirrored passes {'batched' if self.mirroring.batched else 'one at a time'}")
            return logits if self.export_in_worker else self.device.to_host(logits).numpy()
        finally:
            self.on_step = None

    @staticmethod
    def prediction_error_kind(exc: BaseException) -> Failure:
        """nnU-Net 2.8.1 already catches a RuntimeError of the on-device sliding window and redoes
        it with the results on the CPU (predict_sliding_window_return_logits), so out of memory
        that reaches us happened on that fallback too: retrying in this process would repeat it.
        A fresh worker (OOM) starts with all of its GPU memory free. Any other CUDA error leaves
        the context unusable (DEVICE)."""
        if out_of_memory(exc):  # before the markers below: cuBLAS's reads "CUDA error: ..._ALLOC_FAILED"
            return Failure.OOM
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and any(marker in text for marker in CUDA_CONTEXT_ERRORS):
            return Failure.DEVICE
        return Failure.RETRY

    def export_job(self, logits, properties, output_base: str, save_probabilities: bool) -> tuple:
        """(function, arguments) for an export helper. Exact: nnU-Net's own export. Fast: the torch
        export in the helper, or on an accelerator the segmentation made here on the device and
        only its writing in the helper."""
        p = self.predictor
        whole = (p.configuration_manager, p.plans_manager, p.dataset_json, output_base, save_probabilities)
        if not self.fast:
            return export_prediction_from_logits, (logits, properties, *whole)  # plain's thread count: same bits
        if not self.export_in_worker:
            self.choices.append("export in a helper on the CPU")
            return fast_profile.export_from_logits, (logits, properties, *whole, self._helper_threads())
        host_job = fast_profile.export_from_logits, (self._host(logits), properties, *whole, self._helper_threads())
        if not self.device.holds(logits):  # one core of this worker would export while the device idles
            self.fallbacks.append("exported on the CPU in a helper: nnU-Net left the results in host memory")
            return host_job
        out_shape = properties["shape_after_cropping_and_before_resampling"]
        segment = partial(
            fast_profile.segment,
            logits,
            properties,
            p.configuration_manager,
            p.plans_manager,
            self.label_manager,
            save_probabilities,
            self.settings.threads,
            self.device,
        )
        need = fast_profile.export_memory_bytes(logits.shape[0], logits.shape[1:], out_shape, save_probabilities)
        done = self._segment_here(segment, need)
        if done is None:
            return host_job
        return fast_profile.write_segmentation, (*done, properties, p.plans_manager, p.dataset_json, output_base)

    def fused_export_job(self, predictions: list[tuple], combine: Combine, output_base: str, save: bool) -> tuple:
        """A fused ensemble (--profile fast): `predictions` holds (backend, logits, properties) per
        member, in the ensemble's order; their average and its segmentation made here on the
        device (an accelerator's worker), else in an export helper; then the postprocessing, in the
        helper."""
        members = [
            (logits, props, b.predictor.configuration_manager, b.predictor.plans_manager)
            for b, logits, props in predictions
        ]
        postprocessing = (combine.pp_pkl, combine.pp_plans_json) if combine.pp_pkl else None
        tail = (self.predictor.dataset_json, output_base, save, self._helper_threads(), postprocessing)
        if self.export_in_worker and all(self.device.holds(logits) for logits, *_ in members):
            segment = partial(
                fast_profile.segment_ensemble, members, self.label_manager, save, self.settings.threads, self.device
            )
            done = self._segment_here(segment, fast_profile.ensemble_memory_bytes(members, save))
            if done is not None:
                _, properties, _, plans_manager = members[0]
                args = (*done, properties, plans_manager, self.predictor.dataset_json, output_base, postprocessing)
                return fast_profile.write_segmentation, args
        elif self.export_in_worker:  # nnU-Net left a member's results on the host (out of device memory)
            self.fallbacks.append("ensemble averaged on the CPU in a helper: a member's results are on the host")
        else:
            self.choices.append("ensemble averaged in a helper on the CPU")
        host = [(self._host(logits), *rest) for logits, *rest in members]
        return fast_profile.export_ensemble, (host, *tail)

    def _helper_threads(self) -> int:
        """Torch threads of a fast export in a helper: the worker's share of the cores split over
        its -nps helpers, which export while the worker predicts. With the worker's own count each
        (2 + 2 + 2 threads on 2 cores) idle threads spun between the running argmax's small steps:
        the launcher's fast run took 33.5 s for 4 cases of the 104-label benchmark, 29.3 s so.
        The voxels do not depend on it (every output voxel is computed alone)."""
        return max(1, self.settings.threads // max(1, self.settings.nps))

    def _host(self, logits) -> np.ndarray:
        return self.device.to_host(logits).numpy() if isinstance(logits, torch.Tensor) else logits

    def _segment_here(self, segment, need: int):
        """segment() in this process (an accelerator's export), or None when the device lacks the
        memory: the caller then sends the logits to an export helper (the same code on the CPU)."""
        started = time.monotonic()
        free, short = self.device.free_bytes(), None
        if free is not None and need + self.device.slack_bytes > free:
            short = f"it needs about {need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free"
        else:
            try:
                done = segment()
            except RuntimeError as exc:
                if not out_of_memory(exc):
                    raise
                short = f"the device ran out of memory ({str(exc).splitlines()[0]})"
        if short is not None:  # out of the except block: the failed attempt's tensors are freed first
            self.device.empty_cache()
            self.fallbacks.append(f"exported on the CPU in a helper: {short}")
            return None
        self.choices.append(f"export on {self.device.describe()} in {time.monotonic() - started:.2f} s")
        return done

    def read_output(self, path: str) -> None:
        if path.endswith(".npz"):
            with np.load(path) as npz:
                for key in npz.files:
                    npz[key]
        elif path.endswith(".pkl"):  # found in OUT: it must not run code (safe_pickle)
            safe_pickle.load_data(path)
        else:
            self.predictor.plans_manager.image_reader_writer_class().read_seg(path)
