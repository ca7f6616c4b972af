"""The supported nnU-Net range (launcher/nnunet_versions.py): the launcher installs beside the
user's own nnU-Net, refuses one outside the range before any work, and adapts to what differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli, model_args
from launcher import nnunet_versions
from launcher.nnunet_versions import FAST_PROFILE_FROM, installed, refusal, version_tuple

# scripts/test.sh runs some tests again on the oldest supported release (PYTHONPATH=.nnunet-2.5.2)
ASKED_FOR = os.environ.get("NNUNET_LAUNCH_EXPECT_NNUNET")


def test_versions_in_the_range_pass_and_the_others_are_named_with_the_range():
    assert version_tuple("2.7.0.dev3") == (2, 7, 0) and version_tuple("2.6.4+myfork") == (2, 6, 4)
    for fine in ("2.5.2", "2.6.4", "2.8.1", "2.8.9+fork"):
        assert refusal(fine, "2.14.1") is None, fine
    for old_or_new in ("2.4.2", "2.5.1", "2.9.0", "3.0"):
        assert refusal(old_or_new, "2.14.1") == (
            f"nnunetv2 {old_or_new} is installed; nnunet-launch supports nnunetv2 >= 2.5.2, < 2.9"
        )
    assert "torch 2.9.1 is installed, which nnU-Net excludes" in refusal("2.8.1", "2.9.1")
    assert "nnunetv2 is not installed" in refusal(None, "2.14.1")


def _pretend_installed(folder: Path, version: str) -> dict:
    """An environment whose nnunetv2 metadata says `version` (found first on the path)."""
    info = folder / f"nnunetv2-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nnunetv2\nVersion: {version}\n")
    return {"PYTHONPATH": str(folder)}


@pytest.mark.parametrize("command", ["plan", "run"])
def test_an_unsupported_nnunet_is_refused_before_any_work_naming_it_and_the_range(tiny, tmp_path, command):
    out = tmp_path / "out"
    result = cli(command, *model_args(tiny, out), "-device", "cpu", env=_pretend_installed(tmp_path / "site", "2.4.2"))
    assert result.returncode == 2
    assert result.stderr == (
        "nnunet-launch: error: nnunetv2 2.4.2 is installed; nnunet-launch supports nnunetv2 >= 2.5.2, < 2.9\n"
    )
    assert not out.exists()


def test_the_fast_profile_is_refused_where_nnunets_torch_resampling_cannot_be_trusted(tiny, tmp_path):
    env = _pretend_installed(tmp_path / "site", "2.6.4")
    args = model_args(tiny, tmp_path / "out")
    result = cli("plan", *args, "-device", "cpu", "--profile", "fast", env=env)
    assert result.returncode == 2 and "--profile fast needs nnunetv2 >= 2.7.0" in result.stderr
    assert "nnunetv2 2.6.4 is installed" in result.stderr


def test_preprocessing_returns_the_properties_on_every_version():
    class Before26:  # 2.5: (data, seg), the properties updated in place
        def run_case_npy(self, data, seg, properties, *rest):
            properties["shape_before_cropping"] = (1, 2, 3)
            return data, seg

    data, seg, properties = nnunet_versions.run_case_npy(Before26(), "d", None, {}, None, None, None)
    assert (data, seg, properties) == ("d", None, {"shape_before_cropping": (1, 2, 3)})


@pytest.mark.skipif(ASKED_FOR is None, reason="set by scripts/test.sh's run on the oldest release")
def test_the_suite_and_the_processes_it_starts_run_the_nnunet_release_asked_for():
    import nnunetv2

    assert installed("nnunetv2") == ASKED_FOR and f".nnunet-{ASKED_FOR}" in nnunetv2.__file__
    child = "import nnunetv2; from importlib import metadata; print(metadata.version('nnunetv2'), nnunetv2.__file__)"
    said = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    assert said.startswith(f"{ASKED_FOR} ") and f".nnunet-{ASKED_FOR}" in said
    doctor = json.loads(cli("doctor", "--json").stdout)
    nnunet = next(c for c in doctor["checks"] if c["name"] == "nnunetv2")
    assert nnunet["status"] == "ok" and nnunet["detail"].startswith(f"{ASKED_FOR}, ")
    fast = next(c for c in doctor["checks"] if c["name"] == "--profile fast")
    assert (fast["status"] == "ok") == (version_tuple(ASKED_FOR) >= FAST_PROFILE_FROM)


@pytest.mark.skipif(
    version_tuple(installed("nnunetv2") or "0") >= FAST_PROFILE_FROM, reason="the installed nnunetv2 has 2.7.0's fix"
)
def test_an_installed_nnunet_before_2_7_refuses_the_fast_profile_before_any_work(tiny, tmp_path):
    out = tmp_path / "out"
    refused = cli("run", *model_args(tiny, out), "-device", "cpu", "--profile", "fast")
    assert refused.returncode == 2 and refused.stderr.startswith("nnunet-launch: error: --profile fast needs nnunetv2")
    assert not out.exists()
