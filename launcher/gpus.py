"""GPU inventory through NVML, CUDA_VISIBLE_DEVICES parsing and GPU selection.

Never initialises CUDA: the supervisor must not hold a context on any GPU. NVML is the only
boundary replaced in tests, through NNUNET_LAUNCH_FAKE_GPUS (a JSON file with a list of GPUs).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field

from launcher.errors import LauncherError
from launcher.spec import EXPORT_ARGMAX_BYTES_PER_VOXEL, EXPORT_CHUNK_BYTES

FAKE_INVENTORY_ENV = "NNUNET_LAUNCH_FAKE_GPUS"
CPU_HINT = "use -device cpu --workers N to run on the CPU"


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total: int  # bytes
    memory_used: int  # bytes
    processes: list[dict] = field(default_factory=list)  # [{"pid", "used_memory"}]

    @property
    def memory_free(self) -> int:
        return max(0, self.memory_total - self.memory_used)

    def to_json(self) -> dict:
        return {**asdict(self), "memory_free": self.memory_free}


class NvmlUnavailable(LauncherError):
    pass


def inventory() -> list[Gpu]:
    """All GPUs NVML sees, in NVML (PCI bus) order; raises NvmlUnavailable without NVML.
    A GPU NVML fails on is left out with a warning on stderr (see _scan)."""
    return _scan()[0]


def _scan() -> tuple[list[Gpu], dict[int, str]]:
    """(GPUs NVML reads, {NVML index: why it was skipped})."""
    fake = os.environ.get(FAKE_INVENTORY_ENV)
    if fake:
        with open(fake) as f:
            return [Gpu(**entry) for entry in json.load(f)], {}
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise NvmlUnavailable(f"NVML is not available ({exc})") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML is not available ({exc})") from exc
    found, skipped = [], {}
    try:
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML cannot count the GPUs ({exc})") from exc
        for i in range(count):
            try:
                found.append(_read_gpu(pynvml, i))
            except pynvml.NVMLError as exc:
                # one lost or faulty GPU (e.g. "GPU is lost" after an Xid) must not take the
                # others down with it: leave it out, say so, and keep the reason for --gpus
                skipped[i] = f"NVML error: {exc}"
                print(f"nnunet-launch: warning: GPU {i} skipped: {skipped[i]}", file=sys.stderr)
    finally:
        pynvml.nvmlShutdown()
    return found, skipped


def _read_gpu(pynvml, index: int) -> Gpu:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        procs = [
            {"pid": p.pid, "used_memory": p.usedGpuMemory or 0}
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        ]
    except pynvml.NVMLError:
        procs = []
    name = pynvml.nvmlDeviceGetName(handle)
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    return Gpu(
        index=index,
        uuid=uuid if isinstance(uuid, str) else uuid.decode(),
        name=name if isinstance(name, str) else name.decode(),
        memory_total=int(memory.total),
        memory_used=int(memory.used),
        processes=procs,
    )


def health_report(uuid: str) -> str:
    """ECC and retired-page counters NVML offers for a GPU, as text for the log ("" if none)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return ""
    signals = []
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        for label, call in (
            (
                "uncorrected ECC errors",
                lambda: pynvml.nvmlDeviceGetTotalEccErrors(
                    handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
                ),
            ),
            ("pages pending retirement", lambda: pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle)),
            (
                "retired pages (double-bit)",
                lambda: len(
                    pynvml.nvmlDeviceGetRetiredPages(handle, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
                ),
            ),
        ):
            try:
                signals.append(f"{label}: {int(call())}")
            except pynvml.NVMLError:
                pass  # not supported on this GPU
    except Exception:
        return ""
    finally:
        pynvml.nvmlShutdown()
    return f" [NVML: {', '.join(signals)}]" if signals else ""


_TOKEN = re.compile(r"^(\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)$")


def parse_visible_devices(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: None when unset (everything visible), else the
    tokens (indices, GPU- UUIDs, MIG- ids) up to the first invalid one; "" means no device."""
    if value is None:
        return None
    tokens = []
    for raw in value.split(","):
        token = raw.strip()
        if not _TOKEN.match(token):
            break  # CUDA ignores this token and every one after it (e.g. "-1" hides the rest)
        tokens.append(token)
    return tokens


def _match(token: str, gpus: list[Gpu]) -> Gpu | None:
    if token.isdigit():
        return next((g for g in gpus if g.index == int(token)), None)
    # CUDA accepts any unique prefix of a UUID
    found = [g for g in gpus if g.uuid.startswith(token)]
    return found[0] if len(found) == 1 else None


def visible_gpus(gpus: list[Gpu], visible: list[str] | None) -> list[Gpu]:
    """The GPUs an existing CUDA_VISIBLE_DEVICES leaves us (indices mean NVML order)."""
    if visible is None:
        return list(gpus)
    chosen: list[Gpu] = []
    for token in visible:
        if token.startswith("MIG-"):
            # a MIG instance is its own device: pin to its id, memory unknown to this inventory
            chosen.append(Gpu(index=len(chosen), uuid=token, name="MIG instance", memory_total=0, memory_used=0))
            continue
        gpu = _match(token, gpus)
        if gpu is None:
            break  # CUDA stops at the first token naming no device
        if gpu not in chosen:
            chosen.append(gpu)
    return chosen


def select_gpus(
    spec: str, gpus: list[Gpu], visible: list[str] | None, skipped: dict[int, str] | None = None
) -> list[Gpu]:
    """`--gpus all` or a comma list of NVML indices / UUIDs, bounded by CUDA_VISIBLE_DEVICES;
    `skipped` ({NVML index: reason}) names GPUs the inventory could not read."""
    skipped = skipped or {}
    allowed = visible_gpus(gpus, visible)
    if spec.strip().lower() == "all":
        return allowed
    chosen: list[Gpu] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            raise LauncherError(f"--gpus {spec!r}: empty entry")
        gpu = _match(token, gpus) or _match(token, allowed)
        if gpu is None and token.isdigit() and int(token) in skipped:
            raise LauncherError(f"--gpus names GPU {token}, which is not usable ({skipped[int(token)]})")
        if gpu is None:
            names = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none"
            # a UUID of a skipped GPU may be unreadable: list the skipped ones so the user can tell
            names += "".join(f"; {i} skipped ({why})" for i, why in skipped.items())
            raise LauncherError(f"--gpus names GPU {token!r}, which is not on this machine (GPUs: {names})")
        if gpu not in allowed:
            raise LauncherError(
                f"--gpus names GPU {token!r}, which CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r} hides"
            )
        if gpu not in chosen:
            chosen.append(gpu)
    return chosen


def is_busy(gpu: Gpu) -> bool:
    """Another program computes on it (NVML lists its compute processes)."""
    return bool(gpu.processes)


def estimated_bytes_per_worker(
    patch_size: tuple[int, ...] | None, num_labels: int, largest_voxels: int, fast: bool = False, folds: int = 1
) -> int:
    """A rough GPU memory need of one nnU-Net inference worker: CUDA context, weights and
    workspace (~1.5 GiB), activations of one patch (~2 KiB a voxel for nnU-Net's default
    networks in half precision), and the whole image's logits kept on the device (fp16).
    --profile fast keeps more there: the mirrored copies of a tile in one batch (8 in 3D, 4 in
    2D), with several folds their sum beside the next fold's logits, and the export's chunk of
    channels with its running argmax (see fast_profile.py)."""
    patch_size = tuple(patch_size or (128, 128, 128))
    patch = math.prod(patch_size)
    logits = 2 * num_labels * largest_voxels
    need = 1.5 * 2**30 + 2048 * patch + logits
    if fast:
        need += 2048 * patch * (2 ** len(patch_size) - 1) + (logits if folds > 1 else 0)
        need += EXPORT_CHUNK_BYTES + EXPORT_ARGMAX_BYTES_PER_VOXEL * largest_voxels
    return int(need)


def check_gpus(chosen: list[Gpu], workers_per_gpu: int, need_per_worker: int, skip_busy: bool, fast: bool = False):
    """(GPUs to use, warnings): busy GPUs are left out with --skip-busy, else warned about, as
    are GPUs whose free memory looks short for `workers_per_gpu` workers."""
    warnings, kept = [], []
    why = "; --profile fast keeps mirrored batches, fold sums and the export on the device" if fast else ""
    for gpu in chosen:
        if is_busy(gpu):
            pids = ", ".join(str(p["pid"]) for p in gpu.processes)
            if skip_busy:
                warnings.append(f"GPU {gpu.index} is busy (processes {pids}): left out (--skip-busy)")
                continue
            warnings.append(f"GPU {gpu.index} is busy (processes {pids}); --skip-busy leaves such GPUs out")
        need = workers_per_gpu * need_per_worker
        if gpu.memory_total and gpu.memory_free < need:
            warnings.append(
                f"GPU {gpu.index} has {gpu.memory_free / 2**30:.1f} GiB free; {workers_per_gpu} worker(s) may need "
                f"about {need / 2**30:.1f} GiB (rough estimate from the patch size{why}): consider fewer "
                "--workers-per-gpu"
            )
        kept.append(gpu)
    if not kept:
        raise LauncherError("every chosen GPU is busy and --skip-busy leaves none")
    return kept, warnings


def usable_gpus(spec: str) -> list[Gpu]:
    """The GPUs a `-device cuda` run will use, or a LauncherError that says how to run without."""
    try:
        gpus, skipped = _scan()
    except NvmlUnavailable as exc:
        raise LauncherError(f"-device cuda needs a GPU, but {exc}; {CPU_HINT}") from None
    if not gpus:
        why = f" usable ({len(skipped)} skipped on NVML errors)" if skipped else ""
        raise LauncherError(f"-device cuda needs a GPU, but NVML finds none{why}; {CPU_HINT}")
    chosen = select_gpus(spec, gpus, parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES")), skipped)
    if not chosen:
        raise LauncherError(
            "-device cuda needs a GPU, but CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r} leaves none; {CPU_HINT}"
        )
    return chosen
