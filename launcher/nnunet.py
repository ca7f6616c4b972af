"""The only module that imports nnunetv2: one long-lived prediction pipeline per worker.

A worker keeps one predictor (model loaded once), one preprocessing pool and one export pool
for its whole life. The next cases are preprocessed while the current one is predicted, and
exports overlap the next prediction, with a bounded number of cases in flight. Exports go to
the worker's temp folder and are moved into OUT only when complete.
"""

from __future__ import annotations

import gzip
import multiprocessing
import os
import pickle
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import torch
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.helpers import empty_cache
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from launcher.outputs import case_outputs, move_into_place
from launcher.worker import PredictSettings, WorkCase

POLL_S = 0.05
HEARTBEAT_S = 1.0


class PoolDied(RuntimeError):
    pass


# --- preprocessing, in the pool's processes -------------------------------------------------
_PREP: dict = {}


def _init_preprocessing(plans: dict, configuration_manager, dataset_json: dict, verbose: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    plans_manager = PlansManager(plans)
    _PREP.update(
        plans_manager=plans_manager,
        configuration_manager=configuration_manager,
        dataset_json=dataset_json,
        preprocessor=configuration_manager.preprocessor_class(verbose=verbose),
        label_manager=plans_manager.get_label_manager(dataset_json),
    )


def _preprocess(files: tuple[str, ...], prev_stage_file: str | None):
    """What nnU-Net's preprocess_fromfiles_save_to_queue does for one case."""
    data, seg, properties = _PREP["preprocessor"].run_case(
        list(files), prev_stage_file, _PREP["plans_manager"], _PREP["configuration_manager"], _PREP["dataset_json"]
    )
    if prev_stage_file is not None:
        seg_onehot = convert_labelmap_to_one_hot(seg[0], _PREP["label_manager"].foreground_labels, data.dtype)
        data = np.vstack((data, seg_onehot))
    return data, properties


class CasePipeline:
    def __init__(self, settings: PredictSettings, out_dir: str, tmp_dir: str):
        self.settings, self.out_dir, self.tmp_dir = settings, out_dir, tmp_dir
        torch.set_num_threads(settings.threads)
        if settings.device == "cuda":
            torch.set_num_interop_threads(1)
        self.predictor = nnUNetPredictor(
            tile_step_size=settings.step_size,
            use_gaussian=True,
            use_mirroring=not settings.disable_tta,
            perform_everything_on_device=settings.device == "cuda",
            device=torch.device(settings.device),
            verbose=settings.verbose,
            verbose_preprocessing=settings.verbose,
            allow_tqdm=False,
        )
        self.predictor.initialize_from_trained_model_folder(
            settings.model_folder, [f if f == "all" else int(f) for f in settings.folds], settings.checkpoint
        )
        p = self.predictor
        self.file_ending = p.dataset_json["file_ending"]
        context = multiprocessing.get_context("spawn")
        self.prep_pool = context.Pool(
            settings.npp,
            _init_preprocessing,
            (p.plans_manager.plans, p.configuration_manager, p.dataset_json, settings.verbose, 1),
        )
        self.export_pool = context.Pool(settings.nps)
        # Pool silently replaces a dead process and the task it held never returns: watch the originals.
        self.pool_processes = list(self.prep_pool._pool) + list(self.export_pool._pool)
        self.exporting: list[tuple[WorkCase, object, float]] = []
        self.last_heartbeat = 0.0

    def close(self) -> None:
        for pool in (self.prep_pool, self.export_pool):
            pool.close()
            pool.join()

    def run(self, feed, emit: Callable[[tuple], None]) -> None:
        """Predict every case the feed gives (see worker.CaseFeed) until it is exhausted."""
        self.emit, self.feed = emit, feed
        preparing: deque = deque()
        while True:
            while len(preparing) < self.settings.npp + 1 and (case := feed.take()) is not None:
                emit(("started", case.id))
                if case.verify_existing and self._existing_output_decodes(case.id):
                    emit(("done", case.id, None, True))
                    continue
                job = self.prep_pool.apply_async(_preprocess, (case.files, case.prev_stage_file))
                preparing.append((case, time.monotonic(), job))
            if not preparing:
                if feed.exhausted():
                    break
                self._wait(lambda: feed.has_cases() or feed.exhausted())
                continue
            case, started, pending = preparing.popleft()
            self._wait(pending.ready)
            try:
                data, properties = pending.get()
            except Exception as exc:
                emit(("case_error", case.id, f"preprocessing failed: {_describe(exc)}"))
                continue
            self._predict_and_export(case, started, data, properties)
        self._wait(lambda: not self.exporting)

    def _predict_and_export(self, case: WorkCase, started: float, data, properties) -> None:
        self._wait(lambda: len(self.exporting) <= self.settings.nps)  # bounded: memory!
        self.emit(("stage", case.id, "predict"))
        print(f"\nPredicting {case.id}: shape {tuple(data.shape)}", flush=True)
        try:
            tensor = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
            logits = predict_with_memory_fallback(self.predictor, tensor, lambda m: self.emit(("note", case.id, m)))
        except Exception as exc:
            self.emit(("case_error", case.id, f"prediction failed: {_describe(exc)}"))
            return
        self.emit(("stage", case.id, "export"))
        p = self.predictor
        result = self.export_pool.apply_async(
            export_prediction_from_logits,
            (
                logits,
                properties,
                p.configuration_manager,
                p.plans_manager,
                p.dataset_json,
                os.path.join(self.tmp_dir, case.id),
                self.settings.save_probabilities,
                self.settings.threads,
            ),
        )
        self.exporting.append((case, result, started))

    def _wait(self, condition: Callable[[], bool]) -> None:
        """Wait for `condition` while finishing exports, watching the pools and telling the
        supervisor that this main loop is alive (its hang watchdog listens)."""
        while True:
            if time.monotonic() - self.last_heartbeat > HEARTBEAT_S:
                self.last_heartbeat = time.monotonic()
                self.emit(("heartbeat",))
            self.feed.poll()
            self._collect_exports()
            if condition():
                return
            dead = [p for p in self.pool_processes if not p.is_alive()]
            if dead:
                raise PoolDied(
                    f"an nnU-Net helper process died (exit code {dead[0].exitcode}"
                    f"{'; killed, likely by the OOM killer' if dead[0].exitcode == -9 else ''})"
                )
            time.sleep(POLL_S)

    def _collect_exports(self) -> None:
        still = []
        for case, result, started in self.exporting:
            if not result.ready():
                still.append((case, result, started))
                continue
            try:
                result.get()
                move_into_place(
                    self.tmp_dir,
                    self.out_dir,
                    case_outputs(case.id, self.file_ending, self.settings.save_probabilities),
                )
            except Exception as exc:
                self.emit(("case_error", case.id, f"export failed: {_describe(exc)}"))
                continue
            print(f"done with {case.id}: moved into place", flush=True)
            self.emit(("done", case.id, round(time.monotonic() - started, 3), False))
        self.exporting = still

    def _existing_output_decodes(self, case_id: str) -> bool:
        names = case_outputs(case_id, self.file_ending, self.settings.save_probabilities)
        reader = self.predictor.plans_manager.image_reader_writer_class()
        try:
            for name in names:
                path = os.path.join(self.out_dir, name)
                if path.endswith(".gz"):
                    # SimpleITK returns wrong voxels from a truncated .gz without an error;
                    # the gzip stream's length and CRC check catch it.
                    with gzip.open(path, "rb") as f:
                        while f.read(1 << 20):
                            pass
                if name.endswith(".npz"):
                    with np.load(path) as npz:
                        for key in npz.files:
                            npz[key]
                elif name.endswith(".pkl"):
                    with open(path, "rb") as f:
                        pickle.load(f)
                else:
                    reader.read_seg(path)
            return True
        except Exception:
            return False


def predict_with_memory_fallback(predictor: nnUNetPredictor, data: torch.Tensor, note: Callable[[str], None]):
    """Predict the logits; on CUDA out-of-memory retry once with nnU-Net's own fallback
    (perform_everything_on_device=False keeps the full logits in host memory)."""
    try:
        return predictor.predict_logits_from_preprocessed_data(data).cpu().detach().numpy()
    except torch.cuda.OutOfMemoryError:
        if not predictor.perform_everything_on_device:
            raise
    note("CUDA out of memory: retrying with perform_everything_on_device=False")
    empty_cache(predictor.device)
    predictor.perform_everything_on_device = False
    try:
        return predictor.predict_logits_from_preprocessed_data(data).cpu().detach().numpy()
    finally:
        predictor.perform_everything_on_device = True
        empty_cache(predictor.device)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")
