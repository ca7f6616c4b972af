"""The accelerator path, run on the CPU: real nnU-Net on a simulated accelerator (launcher.device:
CPU tensors, a memory budget that raises torch.OutOfMemoryError past it). What a worker does on a
GPU (results kept on the device, the export there, batched mirroring, fold sums, every
out-of-memory fallback, several models in one worker) runs here in every CI run.

`pytest -m accelerator` selects these and the other tests that run the accelerator path; with
NNUNET_LAUNCH_TEST_REAL_ACCELERATOR=1 (scripts/gpu_check.sh) the whole runs use `-device cuda`."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, PickledCall, assert_same_predictions, cli, model_args, plain_nnunet, run_args

sys.path.insert(0, str(ROOT / "scripts"))
import make_tiny_model as tiny_model  # noqa: E402
from gpu_check import DETERMINISTIC_NNUNET, PLAIN_NNUNET  # noqa: E402

from launcher import fast_profile, safe_pickle  # noqa: E402
from launcher.device import (  # noqa: E402
    SIMULATED_ACCELERATOR_DIR_ENV,
    SIMULATED_ACCELERATOR_ENV,
    CudaDevice,
    Device,
    SimulatedAccelerator,
    for_worker,
)
from launcher.spec import Failure, PredictSettings  # noqa: E402

pytestmark = pytest.mark.accelerator

MiB = 2**20
BIG = 2**30  # everything fits
REAL = os.environ.get("NNUNET_LAUNCH_TEST_REAL_ACCELERATOR") == "1"
# out of memory as cuBLAS says it on a GPU: a plain RuntimeError
CUBLAS_ALLOC_FAILED = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
# a budget set by the test: only the simulated device has one (the GPU check runs on the real one)
simulated_only = pytest.mark.skipif(REAL, reason="limits the device's memory: the simulated accelerator's")


def accelerator_args(data: dict, out: Path, *extra: str) -> list[str]:
    """A run on the accelerator: the real GPU in the GPU check, else CPU workers on a simulated one."""
    if REAL:
        return ["run", *model_args(data, out), "-device", "cuda", "--disable_tta", *extra]
    return run_args(data, out, *extra)


def simulated(budget: int | str, **more: str) -> dict:
    return {} if REAL else {SIMULATED_ACCELERATOR_ENV: str(budget), **more}


def worker_logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / ".nnunet-launch" / "logs").glob("*part*.log")))


# --- whole runs --------------------------------------------------------------------------------
def test_exact_profile_on_the_accelerator_is_identical_to_plain_nnunet(small, tmp_path):
    """Results kept on the device (nnU-Net's perform_everything_on_device), two workers. On a GPU
    both with deterministic kernels (nnU-Net's autotuning alone changes a few voxels run to run);
    the workers say they took --deterministic, and the summary records it."""
    reference = small["reference"]
    if REAL:  # plain nnU-Net on the same GPU
        reference = tmp_path / "reference"
        plain_nnunet(
            small["inputs"], reference, small["model"], device="cuda", script=DETERMINISTIC_NNUNET + PLAIN_NNUNET
        )
    out = tmp_path / "out"
    workers = ["--workers-per-gpu", "2"] if REAL else ["--workers", "2"]
    result = cli(*accelerator_args(small, out, *workers, "--deterministic"), env=simulated(BIG), timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, reference)
    assert worker_logs(out).count("--deterministic: cuDNN autotuning off") == 2
    assert json.loads((out / ".nnunet-launch" / "summary.json").read_text())["deterministic"] is True


@simulated_only
def test_a_worker_that_runs_out_of_device_memory_restarts_and_its_case_is_predicted(small, tmp_path):
    """The first worker's device is too small for one tile (another program holds its memory): the
    case fails with OOM, the worker restarts with its device's memory free, and every output is
    nnU-Net's."""
    out, turns = tmp_path / "out", tmp_path / "turns"
    turns.mkdir()
    env = simulated(f"{int(1.5 * MiB)},{BIG}", **{SIMULATED_ACCELERATOR_DIR_ENV: str(turns)})
    result = cli(*run_args(small, out, "--workers", "1"), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, small["reference"])
    supervisor = (out / ".nnunet-launch" / "logs" / "supervisor.log").read_text()
    assert "prediction failed: OutOfMemoryError: simulated accelerator out of memory: a forward pass" in supervisor
    assert "(will retry alone in a new worker" in supervisor
    assert sorted(p.name for p in (out / ".nnunet-launch" / "logs").glob("*part*.log")) == [
        "run-1.part-0.attempt-1.log",
        "run-1.part-0.attempt-2.log",
    ]


def test_kept_outputs_a_cut_input_and_probabilities_on_the_accelerator(small, tmp_path):
    """--continue_prediction keeps a whole output it finds (read back first), a cut input fails
    alone and for good, and the rest are predicted with nnU-Net's .npz/.pkl beside them."""
    import shutil

    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    for case_id in small["ids"][:3]:
        shutil.copy(small["inputs"] / f"{case_id}_0000.nii.gz", inputs)
    cut = inputs / "case_002_0000.nii.gz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    first = tmp_path / "first"  # case_000 and _001 predicted by a run whose journal is then gone
    first.mkdir()
    for case_id in ("case_000", "case_001"):
        shutil.copy(inputs / f"{case_id}_0000.nii.gz", first)
    args = accelerator_args({**small, "inputs": first}, out, "--save_probabilities")
    assert cli(*args, env=simulated(BIG), timeout=300).returncode == 0
    shutil.rmtree(out / ".nnunet-launch")
    # a planted properties file whose unpickling runs a command: never unpickled, predicted again
    marker = tmp_path / "ran"
    (out / "case_001.pkl").write_bytes(pickle.dumps(PickledCall(os.system, f"touch {marker}")))
    data = {**small, "inputs": inputs}
    args = accelerator_args(data, out, "--continue_prediction", "--save_probabilities", "--case-retries", "0")
    result = cli(*args, env=simulated(BIG), timeout=300)
    assert result.returncode == 1, result.stderr
    assert "case_002" in result.stderr and "truncated or corrupt" in result.stderr
    assert result.stdout.count("kept (existing output verified)") == 1
    assert not marker.exists()
    assert safe_pickle.load_data(str(out / "case_001.pkl"))["spacing"] is not None
    assert sorted(p.name for p in out.glob("case_*")) == [
        "case_000.nii.gz",
        "case_000.npz",
        "case_000.pkl",
        "case_001.nii.gz",
        "case_001.npz",
        "case_001.pkl",
    ]


@simulated_only
def test_tight_device_memory_falls_back_stage_by_stage_and_still_gives_the_fast_outputs(small, tmp_path):
    """A device of 3.5 MiB (1.3 MiB of weights): the largest case's forward does not fit beside its
    results (nnU-Net redoes it with results on the host, and a helper exports them), some cases'
    exports do not fit (a helper exports them), the smallest export fits. Every output is the fast
    profile's (batched mirroring's fallback: test_batched_mirroring_that_does_not_fit_...)."""
    from test_fast_profile import MIN_EQUAL_VOXELS, RESAMPLED, _seg

    out = tmp_path / "out"
    result = cli(*run_args(small, out, "--profile", "fast", "--workers", "2"), env=simulated(int(3.5 * MiB)))
    assert result.returncode == 0, result.stderr
    logs = worker_logs(out)
    assert "Prediction on device was unsuccessful" in logs
    assert "exported on the CPU in a helper: nnU-Net left the results in host memory" in result.stdout
    assert "exported on the CPU in a helper: it needs about" in result.stdout
    assert "export on a simulated accelerator (4 MiB)" in logs
    for case_id in small["ids"]:
        plain, fast = _seg(small["reference"] / f"{case_id}.nii.gz"), _seg(out / f"{case_id}.nii.gz")
        assert np.array_equal(plain, fast) if case_id not in RESAMPLED else np.mean(plain == fast) >= MIN_EQUAL_VOXELS


@simulated_only  # on a GPU: gpu_check.py's stages step runs nnU-Net's own chain there
def test_best_on_the_accelerator_matches_nnunets_own_chain(stages, manual, tmp_path, monkeypatch):
    """`run --best` (2d + 3d_fullres, ensembled and postprocessed): every worker loads both models
    on its device (torch's inter-op threads are set once per process, not once per model)."""
    from test_stages import FAST, assert_same_segmentations

    monkeypatch.setenv("nnUNet_results", stages["env"]["nnUNet_results"])
    out = tmp_path / "out"
    args = ["run", "-i", str(stages["inputs"]), "-o", str(out), "-d", "998", "--best", *FAST, "--workers", "2"]
    result = cli(*args, env=simulated(BIG), timeout=600)
    assert result.returncode == 0, result.stderr
    assert_same_segmentations(out, manual / "postprocessed", ("dataset.json", "plans.json"))


@simulated_only  # on a GPU: gpu_check.py's stages step runs nnU-Net's own chain there
def test_a_cascade_on_the_accelerator_matches_nnunets_own_chain(stages, manual, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", stages["env"]["nnUNet_results"])
    out = tmp_path / "out"
    args = ["run", "-i", str(stages["inputs"]), "-o", str(out), "-d", "998", "-c", "3d_cascade_fullres"]
    args += ["-device", "cpu", "--workers", "2"]
    result = cli(*args, "-f", "0", "--disable_tta", "-npp", "1", "-nps", "1", env=simulated(BIG), timeout=600)
    assert result.returncode == 0, result.stderr
    assert_same_predictions(out, manual / "cascade")


def test_a_worker_serving_three_models_starts_on_the_accelerator(tiny, tmp_path):
    """A worker loads every member of a multi-stage run; on an accelerator each used to set torch's
    inter-op threads again, which torch refuses once set (the worker died before "ready")."""
    code = (
        "import sys\n"
        "from launcher.nnunet import load_backends\n"
        "from launcher.spec import PredictSettings\n"
        "settings = PredictSettings(model_folder='', folds=('0',), checkpoint='checkpoint_final.pth', "
        "step_size=0.5, disable_tta=True, verbose=False, save_probabilities=False, device=sys.argv[1], "
        "threads=1, npp=1, nps=1, members=tuple((m, sys.argv[2]) for m in 'abc'))\n"
        "backends = load_backends(settings)\n"
        "print(sorted(backends), {b.device.describe() for b in backends.values()})\n"
    )
    device = "cuda" if REAL else "cpu"
    result = subprocess.run(
        [sys.executable, "-c", code, device, str(tiny["model"])],
        capture_output=True,
        text=True,
        env={**os.environ, **simulated(BIG)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "['a', 'b', 'c']" in result.stdout


# --- the decisions, in this process (real nnU-Net, one case at a time) -------------------------
def _settings(folder: Path, profile: str, tta: bool = False, folds=("0",)) -> PredictSettings:
    return PredictSettings(
        model_folder=str(folder),
        folds=folds,
        checkpoint="checkpoint_final.pth",
        step_size=0.5,
        disable_tta=not tta,
        verbose=False,
        save_probabilities=False,
        device="cpu",
        threads=1,
        npp=1,
        nps=1,
        profile=profile,
    )


def _backend(folder: Path, device, profile="fast", **kwargs):
    from launcher.nnunet import NnunetBackend

    return NnunetBackend(_settings(folder, profile, **kwargs), str(folder), device)


def _prepared(backend, files: list[Path], previous_stage: Path | None = None):
    from launcher import nnunet

    init, args = backend.preprocess_initializer({None: backend})
    init(*args)
    return nnunet._preprocess(None, tuple(str(f) for f in files), previous_stage and str(previous_stage))


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("accelerator-two-folds") / "model"
    torch.set_num_threads(1)
    tiny_model.make_model(str(folder), folds=(0, 1))
    return folder


@pytest.fixture(scope="module")
def case_001(tiny):
    """61x49x57 voxels, no resampling: results 1.9 MiB on the device, export 5.2 MiB."""
    return [tiny["inputs"] / "case_001_0000.nii.gz"]


def _host_prediction(folder: Path, files, **kwargs) -> torch.Tensor:
    backend = _backend(folder, Device(torch.device("cpu")), profile="exact", **kwargs)
    data, _ = _prepared(backend, files)
    return torch.from_numpy(backend.predict("c", data, None)).float()


@simulated_only
def test_exact_prediction_on_the_accelerator_equals_the_cpus_bit_for_bit(tiny, case_001):
    device = SimulatedAccelerator(BIG)
    backend = _backend(tiny["model"], device, profile="exact")
    data, _ = _prepared(backend, case_001)
    logits = backend.predict("c", data, None)
    assert isinstance(logits, np.ndarray)
    assert np.array_equal(logits, _host_prediction(tiny["model"], case_001).numpy())
    assert device.used == device._weights.nbytes  # the results went to the host


@simulated_only
def test_batched_mirroring_that_does_not_fit_goes_back_to_single_passes_once_the_failed_batch_is_freed(tiny, case_001):
    """6 MiB: the case's results (1.9 MiB) and one tile's forward (0.5 MiB) fit beside the weights,
    a batch of 8 mirrored tiles (4 MiB) does not. The failed batch held what was free while its
    error lived: a fallback inside the `except` block ran out of memory again."""
    device = SimulatedAccelerator(6 * MiB)
    backend = _backend(tiny["model"], device, tta=True)
    data, _ = _prepared(backend, case_001)
    logits = backend.predict("c", data, None)
    assert device.holds(logits) and not backend.mirroring.batched
    assert backend.fallbacks == [
        "mirrored passes one at a time from now on: a batch of 8 tiles does not fit on the device"
    ]
    expected = _host_prediction(tiny["model"], case_001, tta=True)
    assert torch.allclose(logits.float(), expected, atol=2e-3)
    assert np.array_equal(logits.argmax(0).numpy(), expected.argmax(0).numpy())


@simulated_only
def test_results_nnunet_leaves_on_the_host_are_exported_by_a_helper_not_the_worker(tiny, case_001, tmp_path):
    """3 MiB: the results arrays do not fit beside the weights; nnU-Net redoes the case with its
    results on the host. Their export goes to a helper: in the worker it would run on one core
    while the device idles."""
    device = SimulatedAccelerator(3 * MiB)
    backend = _backend(tiny["model"], device)
    data, properties = _prepared(backend, case_001)
    logits = backend.predict("c", data, None)
    assert not device.holds(logits)
    function, args = backend.export_job(logits, properties, str(tmp_path / "c"), False)
    assert function is fast_profile.export_from_logits and isinstance(args[0], np.ndarray)
    assert backend.fallbacks == ["exported on the CPU in a helper: nnU-Net left the results in host memory"]
    assert np.array_equal(args[0], _host_prediction(tiny["model"], case_001).numpy())


@simulated_only
def test_the_export_runs_on_the_device_and_its_result_equals_the_helpers(tiny, case_001, tmp_path):
    device = SimulatedAccelerator(BIG)
    backend = _backend(tiny["model"], device)
    data, properties = _prepared(backend, case_001)
    logits = backend.predict("c", data, None)
    function, args = backend.export_job(logits, properties, str(tmp_path / "c"), False)
    assert function is fast_profile.write_segmentation
    assert backend.choices[-1].startswith("export on a simulated accelerator (1024 MiB) in")
    p = backend.predictor
    on_host = fast_profile.segment(
        device.to_host(logits).numpy(),
        properties,
        p.configuration_manager,
        p.plans_manager,
        backend.label_manager,
        False,
        1,
    )
    assert np.array_equal(args[0], on_host[0])
    function(*args)
    assert (tmp_path / "c.nii.gz").is_file()


@simulated_only
def test_an_export_that_runs_out_of_memory_at_a_chunk_goes_to_a_helper_and_frees_the_device(
    tiny, case_001, tmp_path, monkeypatch
):
    """The estimate said it fits (here: made to say so), the first chunk did not: the case is
    exported by a helper, and the device holds only what it held before the attempt."""
    device = SimulatedAccelerator(6 * MiB)
    backend = _backend(tiny["model"], device)
    data, properties = _prepared(backend, case_001)
    logits = backend.predict("c", data, None)
    before = device.used
    monkeypatch.setattr(fast_profile, "export_memory_bytes", lambda *args: 0)
    function, args = backend.export_job(logits, properties, str(tmp_path / "c"), False)
    assert function is fast_profile.export_from_logits
    assert backend.fallbacks[-1].startswith(
        "exported on the CPU in a helper: the device ran out of memory (simulated accelerator out of memory: "
        "the export's chunk of channels"
    )
    assert device.used == before


@simulated_only
@pytest.mark.parametrize(
    "error, helper",
    [(RuntimeError(CUBLAS_ALLOC_FAILED), True), (RuntimeError("CUDA error: an illegal memory access"), False)],
    ids=["cuBLAS out of memory: a helper exports", "a broken CUDA context: raised"],
)
def test_an_export_chunk_that_cublas_cannot_allocate_goes_to_a_helper_and_other_cuda_errors_are_raised(
    tiny, case_001, tmp_path, monkeypatch, error, helper
):
    """On a GPU a cuBLAS or cuDNN allocation failure is a plain RuntimeError, not torch's
    OutOfMemoryError: it is out of memory all the same (the helper exports); any other error of
    the device is not swallowed by the fallback."""
    device = SimulatedAccelerator(6 * MiB)
    backend = _backend(tiny["model"], device)
    data, properties = _prepared(backend, case_001)
    logits = backend.predict("c", data, None)
    monkeypatch.setattr(fast_profile, "export_memory_bytes", lambda *args: 0)
    monkeypatch.setattr(device, "_out_of_memory", lambda *args: error)
    if not helper:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            backend.export_job(logits, properties, str(tmp_path / "c"), False)
        return
    function, _ = backend.export_job(logits, properties, str(tmp_path / "c"), False)
    assert function is fast_profile.export_from_logits
    fallback = f"exported on the CPU in a helper: the device ran out of memory ({CUBLAS_ALLOC_FAILED})"
    assert backend.fallbacks[-1] == fallback


@pytest.fixture(scope="module")
def case_002(tiny):
    """1.5 x 1 x 1 mm to the model's 1 mm: the input is resampled (cubic spline, order 3)."""
    return [tiny["inputs"] / "case_002_0000.nii.gz"]


def _nnunets_preprocessing(folder: Path, files) -> np.ndarray:
    data, _ = _prepared(_backend(folder, Device(torch.device("cpu")), profile="exact"), files)
    return data


@simulated_only
def test_the_fast_profile_resamples_the_input_on_the_device_as_nnunets_preprocessing_does(tiny, case_002):
    """The helper reads, crops and normalizes; the worker resamples on its device, within 1e-5 of
    nnU-Net's own cubic spline (skimage, float64), and predicts from there."""
    device = SimulatedAccelerator(BIG)
    backend = _backend(tiny["model"], device)
    item, _ = _prepared(backend, case_002)
    assert isinstance(item, fast_profile.Unresampled) and item.data.shape[1:] != item.new_shape
    notes, choices = [], []
    resampled = fast_profile.resample_input(item, device, notes, choices)
    expected = _nnunets_preprocessing(tiny["model"], case_002)
    assert resampled.shape == expected.shape and float(np.abs(resampled.numpy() - expected).max()) < 1e-5
    assert choices == ["input resampled on a simulated accelerator (1024 MiB)"] and notes == []
    logits = backend.predict("c", item, None)
    assert backend.choices[0] == "input resampled on a simulated accelerator (1024 MiB)"
    assert logits.shape[1:] == expected.shape[1:]


@simulated_only
def test_an_input_whose_resampling_does_not_fit_on_the_device_is_resampled_on_the_cpu(tiny, case_002, monkeypatch):
    device = SimulatedAccelerator(BIG)
    backend = _backend(tiny["model"], device)
    item, _ = _prepared(backend, case_002)
    device.budget = device.used + item.memory_bytes() - 1
    notes, choices = [], []
    resampled = fast_profile.resample_input(item, device, notes, choices)
    assert choices == [] and notes == [
        f"input resampled on the CPU: simulated accelerator out of memory: the input's resampling needs "
        f"{item.memory_bytes() / MiB:.1f} MiB, {(item.memory_bytes() - 1) / MiB:.1f} MiB free of "
        f"{device.budget / MiB:.1f} MiB"
    ]
    assert float(np.abs(resampled.numpy() - _nnunets_preprocessing(tiny["model"], case_002)).max()) < 1e-5
    # cuDNN's way of saying it: the same fallback
    monkeypatch.setattr(device, "_out_of_memory", lambda *args: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    notes = []
    fast_profile.resample_input(item, device, notes, choices)
    assert notes == ["input resampled on the CPU: cuDNN error: CUDNN_STATUS_ALLOC_FAILED"]


@simulated_only
def test_a_cascades_input_is_resampled_in_the_helper_to_meet_the_previous_stage_there(stages, manual):
    """A cascade's input carries the previous stage's one-hot segmentation at the model's shape, so
    the fast profile resamples it in the helper, on the CPU, before stacking them (as nnU-Net does)."""
    folder = (
        Path(stages["env"]["nnUNet_results"]) / "Dataset998_Stages" / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"
    )
    image = sorted(stages["inputs"].glob("*_0000.nii.gz"))[0]
    previous = manual / "lowres" / image.name.replace("_0000.nii.gz", ".nii.gz")
    exact, _ = _prepared(_backend(folder, Device(torch.device("cpu")), profile="exact"), [image], previous)
    fast, _ = _prepared(_backend(folder, SimulatedAccelerator(BIG)), [image], previous)
    assert isinstance(fast, np.ndarray) and fast.shape == exact.shape and exact.shape[0] > 1
    assert float(np.abs(fast - exact).max()) < 1e-5


def test_a_fast_cpu_workers_helper_resamples_the_input_itself_and_other_plans_keep_nnunets_function(
    tiny, case_002, tmp_path
):
    backend = _backend(tiny["model"], Device(torch.device("cpu")))
    data, _ = _prepared(backend, case_002)
    expected = _nnunets_preprocessing(tiny["model"], case_002)
    assert isinstance(data, np.ndarray) and float(np.abs(data - expected).max()) < 1e-5

    folder = tmp_path / "model"
    tiny_model.make_model(str(folder))
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["resampling_fn_data"] = "resample_torch_fornnunet"
    plans["configurations"]["3d_fullres"]["resampling_fn_data_kwargs"] = {"is_seg": False, "force_separate_z": False}
    (folder / "plans.json").write_text(json.dumps(plans))
    backend = _backend(folder, SimulatedAccelerator(BIG))
    assert fast_profile.input_resampling(backend.predictor.configuration_manager) is None
    data, _ = _prepared(backend, case_002)
    assert isinstance(data, np.ndarray)  # nnU-Net's own function, in the helper


@simulated_only
def test_folds_are_summed_on_the_device_while_the_next_fold_fits(two_folds, case_001):
    device = SimulatedAccelerator(BIG)
    backend = _backend(two_folds, device, folds=("0", "1"))
    data, _ = _prepared(backend, case_001)
    logits = backend.predict("c", data, None)
    assert device.holds(logits) and backend.choices == ["2 folds summed on a simulated accelerator (1024 MiB)"]
    expected = _host_prediction(two_folds, case_001, folds=("0", "1"))
    assert torch.allclose(logits.float(), expected, atol=2e-3)


@simulated_only
@pytest.mark.parametrize(
    "budget, moved_by",
    [(4.2, "the launcher"), (4.5, "nnU-Net")],
    ids=["the sum moves before the next fold", "the next fold's results go to the host"],
)
@simulated_only
def test_the_fold_sum_meets_the_next_fold_on_the_host_when_both_do_not_fit(
    two_folds, case_001, capsys, budget, moved_by
):
    """One fold's results (1.9 MiB) and a tile's forward fit beside the weights (1.3 MiB), a kept
    sum and the next fold's do not. At 4.2 MiB the launcher sees it coming and moves the sum to
    the host; at 4.5 MiB its estimate says it fits, the next fold's forward runs out of memory, and
    nnU-Net redoes that fold with its results on the host."""
    device = SimulatedAccelerator(int(budget * MiB))
    backend = _backend(two_folds, device, folds=("0", "1"))
    data, _ = _prepared(backend, case_001)
    capsys.readouterr()
    logits = backend.predict("c", data, None)
    assert not device.holds(logits) and backend.choices == ["2 folds summed on the host"]
    if moved_by == "the launcher":
        assert backend.fallbacks[0].startswith("folds summed on the host from fold 0:")
    else:
        assert backend.fallbacks == [] and "Moving results arrays to CPU" in capsys.readouterr().out
    expected = _host_prediction(two_folds, case_001, folds=("0", "1"))
    assert torch.allclose(logits.float(), expected, atol=2e-3)
    del logits
    assert device.used == device._weights.nbytes  # nothing left on the device after the case


@simulated_only
def test_a_device_too_small_for_one_tile_fails_the_case_as_out_of_memory(tiny, case_001):
    device = SimulatedAccelerator(int(1.5 * MiB))
    backend = _backend(tiny["model"], device)
    data, _ = _prepared(backend, case_001)
    with pytest.raises(torch.OutOfMemoryError) as error:
        backend.predict("c", data, None)
    assert backend.prediction_error_kind(error.value) is Failure.OOM
    del error
    assert device.used == device._weights.nbytes


@simulated_only
def test_the_cuda_device_counts_what_the_allocator_caches_as_free_and_knows_only_its_own_tensors(monkeypatch):
    """CudaDevice, the one place that calls torch.cuda: `-device cuda` workers get it (without
    touching CUDA to make it). On a GPU (the GPU check) against the real allocator; here its
    three calls are stand-ins that record what the device asks, the GPU boundary."""
    device = for_worker("cuda")
    assert isinstance(device, CudaDevice) and device.accelerator and device.slack_bytes == 512 * MiB
    if REAL:
        on_gpu = torch.ones(4, device="cuda")
        assert device.holds(on_gpu) and not device.holds(on_gpu.cpu()) and device.free_bytes() > 0
        device.empty_cache()
        return
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: asked.append(("free", d)) or (10 * MiB, 80 * MiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: asked.append(("reserved", d)) or 6 * MiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: asked.append(("allocated", d)) or 4 * MiB)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: asked.append(("empty", None)))
    # free = the driver's free memory + what the caching allocator reserved but does not use
    assert device.free_bytes() == 12 * MiB
    assert asked == [(what, torch.device("cuda")) for what in ("free", "reserved", "allocated")]
    device.empty_cache()
    assert asked[-1] == ("empty", None)
    assert not device.holds(torch.ones(2)) and not device.holds(torch.empty(2, device="meta"))
    assert not device.holds("results as a numpy array")


def test_cuda_status_counts_usable_devices_or_gives_torchs_reason(monkeypatch):
    """launcher.device.cuda_status, what doctor reports of CUDA: torch.cuda's answers recorded by
    stand-ins here, the real ones on the GPU check."""
    from launcher.device import cuda_status

    if REAL:
        assert cuda_status()["available"] and cuda_status()["devices"] >= 1
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cuda_status() == {"cuda": torch.version.cuda, "available": True, "devices": 2}

    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system.\nPlease check ...")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", no_driver)
    assert cuda_status() == {
        "cuda": torch.version.cuda,
        "available": False,
        "why": "Found no NVIDIA driver on your system.",
    }


def test_the_simulated_device_accounts_results_while_any_view_of_them_lives():
    device = SimulatedAccelerator(10 * MiB)
    kept = device._keep(torch.zeros(MiB // 4))  # 1 MiB
    view = kept[10:]
    del kept
    assert device.used == MiB and device.holds(view) and device.free_bytes() == 9 * MiB
    host = device.to_host(view)
    assert not device.holds(host) and torch.equal(host, view)
    del view
    assert device.used == 0
    with pytest.raises(torch.OutOfMemoryError, match="needs 11.0 MiB, 10.0 MiB free"):
        device.reserve(11 * MiB, "a test")
    try:
        device.reserve(11 * MiB, "a forward pass", partial=True)
    except torch.OutOfMemoryError:
        assert device.free_bytes() == 0  # the failed forward's first layers, while its error lives
    assert device.free_bytes() == 10 * MiB
    assert json.dumps(device.describe()) == '"a simulated accelerator (10 MiB)"'


@pytest.mark.parametrize(
    "error, kind",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), Failure.OOM),
        (RuntimeError(CUBLAS_ALLOC_FAILED), Failure.OOM),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), Failure.OOM),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), Failure.DEVICE),
        (RuntimeError("Encountered inf in predicted array. Aborting..."), Failure.RETRY),
        (ValueError("the case ran out of memory? no: a ValueError"), Failure.RETRY),
    ],
    ids=["out of memory", "cuBLAS", "cuDNN", "a broken CUDA context", "anything else", "not a RuntimeError"],
)
def test_a_prediction_error_is_told_apart_by_what_it_leaves_of_the_device(error, kind):
    from launcher.nnunet import NnunetBackend

    assert NnunetBackend.prediction_error_kind(error) is kind
