"""How a worker and its helpers allocate host memory: freed memory is reused, not given back to
the kernel and faulted in again, and no huge pages are asked for. Speed only: not one voxel changes.

Measured on the preprocessing-bound benchmark's whole CT (2 cores, scripts/bench_preprocess.py;
benchmarks/RESULTS.md):
- glibc hands every block over 32 MiB back to the kernel when it is freed, so each sliding-window
  tile's activations were new pages: 2.9 M page faults per case, as much kernel time as the
  network's own. Kept in the process, the network ran 1.7x faster on the CPU (9.4 -> 5.5 s).
- numpy asks for transparent huge pages for every array over 4 MiB. On our VM a huge page of
  fresh memory cost milliseconds to fault in: nnU-Net's preprocessing of the whole CT took 35 s,
  26 of them in the kernel; 6 s without. Kernels that compact memory to find huge pages (THP
  defrag "madvise") can stall likewise.

A helper gives its freed memory back after each job (release_freed_memory): a machine runs many
helpers, and the memory one held at its peak must not stay held. The worker keeps its own: it
needs that much again for its next case.

Only glibc's malloc has these knobs; elsewhere nothing changes. A setting the user made in the
environment is kept.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_KEEP_BYTES = 2**31 - 1  # mallopt takes an int: larger blocks are mapped and unmapped as before

_ENVIRONMENT = {  # read at a process's start: a helper spawned after this has them from its first block
    "MALLOC_MMAP_THRESHOLD_": str(_KEEP_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(_KEEP_BYTES),
    "NUMPY_MADVISE_HUGEPAGE": "0",
}


@functools.cache  # looked up once per process, not at every helper job
def _glibc():
    libc = ctypes.CDLL(None)  # the process's own symbols: its C library's among them
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def reuse_freed_memory() -> None:
    """For this process (the worker) and the helpers it starts from now on."""
    for name, value in _ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, int(os.environ["MALLOC_MMAP_THRESHOLD_"]))
        libc.mallopt(_M_TRIM_THRESHOLD, int(os.environ["MALLOC_TRIM_THRESHOLD_"]))
    if "numpy" in sys.modules:  # numpy read its variable when it was imported
        _numpy_multiarray()._set_madvise_hugepage(os.environ["NUMPY_MADVISE_HUGEPAGE"] != "0")


def _numpy_multiarray():
    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1.x, under older nnU-Net installs
        from numpy.core import multiarray
    return multiarray


def release_freed_memory() -> None:
    """Give what this process has freed back to the kernel (a helper, after each job)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
