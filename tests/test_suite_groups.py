"""scripts/test.sh runs the suite in two pytest-xdist processes with --dist loadgroup: a module
marked xdist_group runs in one of them, so its module fixtures (the SLURM test cluster, a module's
models) are set up once. xdist drops the groups silently with some pytest releases (pytest-xdist
issue 1386, pytest 9.2): this proves the installed pair keeps them."""

from __future__ import annotations

import re
import subprocess
import sys


def test_a_module_marked_xdist_group_runs_in_one_xdist_process(tmp_path):
    tests = "".join(f"def test_{i}():\n    pass\n" for i in range(6))
    (tmp_path / "test_grouped.py").write_text(f'import pytest\npytestmark = pytest.mark.xdist_group("g")\n{tests}')
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup"]
    result = subprocess.run([*command, "test_grouped.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    workers = re.findall(r"\[(gw\d+)\].*PASSED test_grouped\.py::test_\d", result.stdout)
    assert len(workers) == 6 and len(set(workers)) == 1, result.stdout[-3000:]
