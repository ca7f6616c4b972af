"""Where a worker computes, as one object: everything that differs on an accelerator is decided
here, not by `device == "cuda"` tests spread over the worker's code.

- `accelerator`: the worker keeps results on the device (nnU-Net's `perform_everything_on_device`),
  and the fast profile exports there, batches the mirrored passes and sums the folds there.
- `holds(tensor)`: whether a tensor is in the device's memory (nnU-Net may leave results on the host).
- `free_bytes()`, `slack_bytes`, `reserve()`: what fits; `empty_cache()`: after an out-of-memory error;
  `out_of_memory(exc)`: whether an error is one (torch's, or cuBLAS/cuDNN failing to allocate).
- `configure_process()`: torch's process-wide thread settings, once per process (torch refuses a
  second `set_num_interop_threads`: a worker serving several models died at start-up on CUDA).

Three kinds: the CPU, CUDA, and in tests a simulated accelerator (CPU tensors, a memory budget
that raises torch.OutOfMemoryError past it) so that the accelerator path runs on every CI machine.
The only lines that need a real GPU are CudaDevice's calls into torch.cuda (tests/GPU_ONLY.md).

Imports torch: only workers load it, after pinning their GPU.
"""

from __future__ import annotations

import os
import weakref

import torch

# Tests only: a CPU run's workers compute on a simulated accelerator with this memory budget in
# bytes ("B1,B2,...": the k-th worker process to start gets Bk, later ones the last), each
# worker claiming its turn with a file in SIMULATED_ACCELERATOR_DIR_ENV.
SIMULATED_ACCELERATOR_ENV = "NNUNET_LAUNCH_TEST_ACCELERATOR"
SIMULATED_ACCELERATOR_DIR_ENV = "NNUNET_LAUNCH_TEST_ACCELERATOR_DIR"


def cuda_status() -> dict:
    """What torch says of CUDA in this process (nnunet-launch doctor asks in a child process):
    its build's CUDA version, whether a device is usable, and how many, or why not."""
    status = {"cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if status["available"]:
        status["devices"] = torch.cuda.device_count()
        return status
    try:
        torch.cuda.init()  # raises with torch's reason (no driver, a CPU-only build, no device)
    except Exception as exc:
        status["why"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return status


# Out of device memory as CUDA's libraries report it besides torch.OutOfMemoryError: a cuBLAS or
# cuDNN handle or workspace that cannot be allocated raises a plain RuntimeError ("CUDA error:
# CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "cuDNN error:
# CUDNN_STATUS_ALLOC_FAILED"). Unlike an illegal access, it leaves the CUDA context usable.
OUT_OF_MEMORY_MARKERS = ("out of memory", "alloc_failed")


def out_of_memory(exc: BaseException) -> bool:
    """Whether an error means the device lacked the memory (a fallback or a fresh worker helps)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc).lower() for marker in OUT_OF_MEMORY_MARKERS)


def make_deterministic() -> bool:
    """cuDNN's heuristics choose deterministic kernels instead of its autotuning, for this process
    (after nnU-Net's predictor turned autotuning on); cuBLAS's reproducible workspaces (read when
    its first handle is made, at the first matrix product). Flags only: they hold on any device.
    The GPU check sets the same in plain nnU-Net. Whether this call turned them on."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if torch.are_deterministic_algorithms_enabled():
        return False
    torch.use_deterministic_algorithms(True, warn_only=True)
    return True


_threads_set: int | None = None


def configure_process(threads: int, accelerator: bool) -> None:
    """torch's thread pools for this process: `threads` intra-op threads; on an accelerator one
    inter-op thread (nnU-Net's own entry point does the same). Once: torch allows the inter-op
    setting only before any parallel work, so a second model in the worker must not repeat it."""
    global _threads_set
    if _threads_set is not None:
        return
    torch.set_num_threads(threads)
    if accelerator:
        torch.set_num_interop_threads(1)
    _threads_set = threads


class Device:
    """The CPU: results in host memory, nothing to budget."""

    accelerator = False
    slack_bytes = 0  # free memory kept aside when deciding what stays on the device

    def __init__(self, torch_device: torch.device, deterministic: bool = False):
        self.torch = torch_device
        self.deterministic = deterministic

    def describe(self) -> str:
        return self.torch.type

    def configure_predictor(self, predictor) -> None:
        """After nnU-Net built its predictor for this device (which, on a GPU, turns on cuDNN's
        autotuning: each process times the convolution kernels and keeps the fastest, so two runs
        can add up a tile's sums in different orders and flip near-ties). --deterministic: cuDNN's
        heuristics choose the kernels, deterministic ones; every process of the same GPU, software
        and shapes then computes the same numbers. Flags only: they hold on any device."""
        if self.deterministic and make_deterministic():  # the worker's log says it once
            print("--deterministic: cuDNN autotuning off, deterministic algorithms only", flush=True)

    def holds(self, tensor) -> bool:
        return False

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.cpu()

    def free_bytes(self) -> int | None:
        return None

    def reserve(self, nbytes: int, what: str, partial: bool = False) -> None:
        """Where the code is about to allocate `nbytes` on the device for `what`. A real device
        raises at the allocation itself; the simulated one raises here."""

    def empty_cache(self) -> None:
        """Give cached blocks back after an out-of-memory error, once its tensors are gone."""


class CudaDevice(Device):
    accelerator = True
    slack_bytes = 512 * 2**20  # cuDNN workspaces, the allocator's fragmentation

    def holds(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda"

    def free_bytes(self) -> int | None:
        """What the allocator holds but does not use counts as free."""
        free, _ = torch.cuda.mem_get_info(self.torch)
        return free + torch.cuda.memory_reserved(self.torch) - torch.cuda.memory_allocated(self.torch)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()


class _Held:
    """Bytes of a simulated device in use while this object lives."""

    def __init__(self, device: SimulatedAccelerator, nbytes: int):
        self.device, self.nbytes = device, nbytes
        device.used += nbytes

    def release(self) -> None:
        self.device.used -= self.nbytes
        self.nbytes = 0

    def __del__(self):
        self.release()


class SimulatedAccelerator(Device):
    """The accelerator path on the CPU, for tests: tensors stay in host memory, and the device's
    memory is a budget in bytes. It accounts what the worker keeps there (the network's weights,
    results nnU-Net leaves on the device, for as long as any view of them lives) and raises
    torch.OutOfMemoryError where a real device would run out: nnU-Net's results arrays, each
    forward (activations: ACTIVATION_BYTES per input voxel of the batch), the export's chunks.

    A forward that runs out of memory has already allocated its first layers' activations, and
    the failed call's frames keep them alive while its exception lives (inside an `except` block
    on a real GPU too): the simulated error holds what was free until it is gone."""

    accelerator = True
    ACTIVATION_BYTES = 16

    def __init__(self, budget: int, deterministic: bool = False):
        super().__init__(torch.device("cpu"), deterministic)
        self.budget, self.used = budget, 0
        self._results: set[int] = set()  # storages of results on the device (data pointers)
        self._results_to_host = False

    def describe(self) -> str:
        return f"a simulated accelerator ({self.budget / 2**20:.0f} MiB)"

    def holds(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in self._results

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone() if self.holds(tensor) else tensor

    def free_bytes(self) -> int | None:
        return self.budget - self.used

    def reserve(self, nbytes: int, what: str, partial: bool = False) -> None:
        free = self.budget - self.used
        if nbytes > free:
            raise self._out_of_memory(nbytes, what, free, partial)

    def _out_of_memory(self, nbytes: int, what: str, free: int, partial: bool) -> torch.OutOfMemoryError:
        """Made here, not in reserve()'s frame, so that no frame of the traceback refers to the error
        (a reference cycle would keep what it holds until the garbage collector runs)."""
        error = torch.OutOfMemoryError(
            f"simulated accelerator out of memory: {what} needs {nbytes / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free of {self.budget / 2**20:.1f} MiB"
        )
        if partial:
            error.held = _Held(self, free)
        return error

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` now lives on the device until its storage is freed."""
        storage = tensor.untyped_storage()
        held, key = _Held(self, storage.nbytes()), storage.data_ptr()
        self._results.add(key)

        def freed():
            held.release()
            self._results.discard(key)

        weakref.finalize(storage, freed)
        return tensor

    def configure_predictor(self, predictor) -> None:
        """What nnU-Net does on a GPU, with this budget: results on the device, its fallback to
        results on the host, the network's weights and activations in the device's memory.
        Wrapped on this predictor instance only."""
        super().configure_predictor(predictor)
        predictor.perform_everything_on_device = True  # nnU-Net turns it off for a CPU device
        weights = sum(p.numel() * p.element_size() for p in predictor.network.parameters())
        self._weights = self._keep(torch.empty(max(1, weights), dtype=torch.uint8))
        predictor.network.register_forward_pre_hook(self._forward_memory)
        internal = predictor._internal_predict_sliding_window_return_logits
        to_host = predictor.predict_logits_from_preprocessed_data

        def sliding_window(data, slicers, do_on_device: bool = True):
            if not do_on_device:
                return internal(data, slicers, False)
            # nnU-Net's predict_sliding_window_return_logits: on a device other than the CPU it
            # redoes the case with its results on the host when this raises a RuntimeError
            # (its `self.device != 'cpu'` test skips that branch for these CPU tensors)
            try:
                heads, voxels = predictor.label_manager.num_segmentation_heads, data[0].numel()
                need = data.numel() * 4 + 2 * voxels * (heads + 1)  # the image, logits and counts
                self.reserve(need, "nnU-Net's results arrays")
                arrays = _Held(self, need)
                try:
                    logits = internal(data, slicers, True)
                finally:
                    arrays.release()
            except RuntimeError:
                print(
                    "Prediction on device was unsuccessful, probably due to a lack of memory. "
                    "Moving results arrays to CPU",
                    flush=True,
                )
                self.empty_cache()
                return internal(data, slicers, False)
            return logits.clone() if self._results_to_host else self._keep(logits)

        def logits_on_host(data):
            # nnU-Net's loop moves each fold's results to the host (`.to('cpu')`, a copy)
            self._results_to_host = True
            try:
                return to_host(data)
            finally:
                self._results_to_host = False

        predictor._internal_predict_sliding_window_return_logits = sliding_window
        predictor.predict_logits_from_preprocessed_data = logits_on_host

    def _forward_memory(self, module, inputs) -> None:
        self.reserve(inputs[0].numel() * self.ACTIVATION_BYTES, "a forward pass", partial=True)


def for_worker(device: str, deterministic: bool = False) -> Device:
    """The worker's device for `-device cuda|cpu`; a CPU run becomes a simulated accelerator when
    a test sets SIMULATED_ACCELERATOR_ENV."""
    if device == "cuda":
        return CudaDevice(torch.device("cuda"), deterministic)
    budgets = os.environ.get(SIMULATED_ACCELERATOR_ENV)
    if budgets:
        return SimulatedAccelerator(_claim_budget([int(b) for b in budgets.split(",")]), deterministic)
    return Device(torch.device("cpu"), deterministic)


def _claim_budget(budgets: list[int]) -> int:
    folder = os.environ.get(SIMULATED_ACCELERATOR_DIR_ENV)
    if folder is None or len(budgets) == 1:
        return budgets[-1]
    for turn, budget in enumerate(budgets[:-1]):
        try:
            os.close(os.open(os.path.join(folder, f"worker-{turn}"), os.O_CREAT | os.O_EXCL))
            return budget
        except FileExistsError:
            continue
    return budgets[-1]
