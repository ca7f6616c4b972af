"""launcher/host_memory.py: a worker reuses the host memory it frees, its helpers too, and a helper
gives it back after each job. Measured in fresh processes by their page faults and resident size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, Linux's /proc")

# 256 MiB allocated, freed and allocated again; the page faults of each allocation, numpy's huge
# page wish, and the resident size before and after the helper's release.
PROBE = """
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from launcher import host_memory
if sys.argv[2] == "worker":
    host_memory.reuse_freed_memory()

def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

pages = 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
counted = []
for _ in range(2):
    before = faults()
    block = np.ones(256 * 2**20, dtype=np.uint8)
    counted.append((faults() - before) / pages)
    del block
held = resident()
host_memory.release_freed_memory()
try:
    from numpy._core import multiarray
except ImportError:
    from numpy.core import multiarray
print(json.dumps({"faults": counted, "released_mib": (held - resident()) / 2**20,
                  "huge_pages": multiarray._get_madvise_hugepage(),
                  "environment": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "NUMPY_MADVISE_HUGEPAGE")}}))
if sys.argv[2] == "worker":  # a helper the worker starts now
    print(__import__("subprocess").run([sys.executable, "-c", open(__file__).read(), sys.argv[1], "helper"],
                                       capture_output=True, text=True, check=True).stdout)
"""


def _probe(tmp_path, role: str, **env: str) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "NUMPY_MADVISE"))}
    result = subprocess.run(
        [sys.executable, str(script), str(ROOT), role],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_a_worker_allocates_its_freed_memory_again_without_page_faults_and_without_huge_pages(tmp_path):
    (plain,) = _probe(tmp_path, "plain", NUMPY_MADVISE_HUGEPAGE="0")  # 4 KiB pages: faults count alike
    assert plain["faults"][1] > 0.5, "glibc's default: a block over 32 MiB is new pages every time"
    worker = _probe(tmp_path, "worker")[0]
    assert worker["faults"][0] > 0.5 and worker["faults"][1] < 0.05, worker
    assert worker["huge_pages"] is False and _probe(tmp_path, "plain")[0]["huge_pages"] is True
    assert worker["released_mib"] > 200, "what it freed goes back only when it asks"


def test_the_helpers_a_worker_starts_reuse_memory_too_and_give_it_back_after_a_job(tmp_path):
    helper = _probe(tmp_path, "worker")[1]
    assert helper["environment"] == {"MALLOC_MMAP_THRESHOLD_": str(2**31 - 1), "NUMPY_MADVISE_HUGEPAGE": "0"}
    assert helper["faults"][1] < 0.05 and helper["huge_pages"] is False, helper
    assert helper["released_mib"] > 200, helper


def test_the_users_own_allocator_settings_are_kept(tmp_path):
    worker, helper = _probe(tmp_path, "worker", MALLOC_MMAP_THRESHOLD_="1048576")
    assert worker["faults"][1] > 0.5, "the user's 1 MiB threshold: a 256 MiB block is mapped anew"
    assert helper["environment"] == {"MALLOC_MMAP_THRESHOLD_": "1048576", "NUMPY_MADVISE_HUGEPAGE": "0"}
    worker, helper = _probe(tmp_path, "worker", NUMPY_MADVISE_HUGEPAGE="1")
    assert worker["huge_pages"] is True and helper["huge_pages"] is True
