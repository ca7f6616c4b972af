"""`nnunet-launch doctor` (launcher/doctor.py): the environment in one screen, each check ok,
warning or problem with its fix, exit 1 on any problem. The real command in this environment and
with nnUNet_extTrainer set; what this environment cannot show (another nnunetv2, an editable
install, GPUs, a broken torch or torchvision) through the checks themselves, in-process, with
nnunetv2's metadata faked as test_nnunet_versions.py fakes it (a dist-info folder first on the
path), gpus.py's stand-in inventory, or the torch child's output replaced."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, launcher_cmd
from launcher import doctor
from launcher.gpus import Gpu
from launcher.nnunet_versions import installed

# xdist: doctor runs once, on one xdist worker
pytestmark = pytest.mark.xdist_group("doctor")

# what the user's shell may set and these tests set themselves
OWN_VARIABLES = ("nnUNet_extTrainer", "NNUNET_LAUNCH_FAKE_GPUS", *doctor.NNUNET_PATHS)


def run_doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in OWN_VARIABLES}
    return subprocess.run(
        launcher_cmd("doctor", *args), capture_output=True, text=True, timeout=60, env={**clean, **(env or {})}
    )


def line_of(output: str, name: str) -> str:
    """The line of check `name` (its status first), with its fix line if any."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line[9:].startswith(name + " "):  # "STATUS   NAME  detail", the status 7 wide
            fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].lstrip().startswith("fix:") else ""
            return f"{line}\n{fix}".strip()
    raise AssertionError(f"no {name} line in:\n{output}")


def fake_nnunet(site: Path, version: str, direct_url: dict | None = None) -> str:
    """nnunetv2 metadata saying `version` (and how it was installed), found before the real one."""
    info = site / f"nnunetv2-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nnunetv2\nVersion: {version}\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    return str(site)


@pytest.fixture(scope="module")
def here() -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """doctor and doctor --json in this environment."""
    return run_doctor(), run_doctor("--json")


def test_this_environment_reports_the_real_torch_and_nnunetv2_and_exits_0(here):
    result = here[0]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    torch_line = line_of(result.stdout, "torch")
    assert torch_line.startswith("ok") and f" {installed('torch')}" in torch_line
    assert "CUDA available here" in torch_line or "CUDA not available here" in torch_line
    nnunet_line = line_of(result.stdout, "nnunetv2")
    assert nnunet_line.startswith(f"ok       nnunetv2           {installed('nnunetv2')}, ")
    assert "supported (nnunetv2 >= 2.5.2, < 2.9)" in nnunet_line
    assert line_of(result.stdout, "torchvision").startswith(f"ok       torchvision        {installed('torchvision')}")
    assert line_of(result.stdout, "nnunet-launch").startswith(
        f"ok       nnunet-launch      {installed('nnunet-launch')}"
    )
    assert line_of(result.stdout, "python").startswith(
        f"ok       python             {platform.python_version()}, {BIN}"
    )
    assert result.stdout.rstrip().endswith(": exit 0")


def test_json_is_one_object_with_the_same_checks_as_the_text(here):
    text, as_json = here
    info = json.loads(as_json.stdout)
    assert as_json.returncode == text.returncode == info["exit_code"] == 0
    checks = [doctor.Check(**c) for c in info["checks"]]
    assert [c.name for c in checks] == [name for name, _ in doctor.CHECKS]
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in info["checks"])
    assert doctor.render(checks) == text.stdout.rstrip("\n")


def test_an_ext_trainer_folder_lists_the_trainer_classes_nnunet_would_find_there(tmp_path):
    trainers = tmp_path / "my trainers"
    (trainers / "variants").mkdir(parents=True)
    (trainers / "notes").mkdir()
    (trainers / "mine.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n\n\n"
        "class nnUNetTrainer_Lungs(nnUNetTrainer):\n    pass\n\n\n"
        "class Helper(object):\n    pass\n"
    )
    (trainers / "variants" / "__init__.py").write_text("")
    (trainers / "variants" / "short.py").write_text(
        "from mine import nnUNetTrainer_Lungs\n\n\nclass Lungs_50epochs(\n    nnUNetTrainer_Lungs,\n):\n    pass\n"
    )
    (trainers / "notes" / "unreached.py").write_text("class NotAPackage(nnUNetTrainer):\n    pass\n")
    result = run_doctor(env={"nnUNet_extTrainer": str(trainers)})
    assert result.returncode == 0, result.stdout
    assert line_of(result.stdout, "nnUNet_extTrainer") == (
        f"ok       nnUNet_extTrainer  {trainers}: Lungs_50epochs, nnUNetTrainer_Lungs"
    )
    assert "Helper" not in result.stdout and "NotAPackage" not in result.stdout  # no package: nnU-Net skips it


def test_an_ext_trainer_folder_that_does_not_exist_is_a_problem_and_exit_1(tmp_path):
    missing = tmp_path / "trainers"
    result = run_doctor(env={"nnUNet_extTrainer": str(missing)})
    assert result.returncode == 1
    reported = line_of(result.stdout, "nnUNet_extTrainer")
    assert reported.startswith(f"problem  nnUNet_extTrainer  {missing} does not exist")
    assert "fix: point nnUNet_extTrainer at the folder" in reported
    assert result.stdout.rstrip().endswith(": exit 1")


def test_an_nnunetv2_outside_the_range_is_a_problem_naming_the_supported_range(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(fake_nnunet(tmp_path / "site", "2.4.2"))
    checks = [
        doctor.Check("nnunetv2", *doctor.check_nnunet()),
        doctor.Check("--profile fast", *doctor.check_fast_profile()),
    ]
    assert checks[0] == doctor.Check(
        "nnunetv2",
        "problem",
        "nnunetv2 2.4.2 is installed; nnunet-launch supports nnunetv2 >= 2.5.2, < 2.9 (installed from a package index)",
        "pip install 'nnunetv2>=2.5.2,<2.9'",
    )
    assert checks[1].status == "warning" and checks[1].detail.startswith("--profile fast needs nnunetv2 >= 2.7.0")
    assert doctor.exit_code(checks) == 1


def test_an_editable_install_is_reported_with_its_source_folder(tmp_path, monkeypatch):
    fork = tmp_path / "my fork"
    (fork / "nnunetv2").mkdir(parents=True)
    direct_url = {"url": fork.as_uri(), "dir_info": {"editable": True}}  # what pip install -e writes (PEP 610)
    monkeypatch.syspath_prepend(fake_nnunet(tmp_path / "site", "2.8.1", direct_url))
    monkeypatch.setattr(doctor, "nnunet_package_dir", lambda: str(fork / "nnunetv2"))  # where the fork's finder points
    assert doctor.check_nnunet() == (
        "ok",
        f"2.8.1, editable install of {fork}; imported from {fork / 'nnunetv2'}; supported (nnunetv2 >= 2.5.2, < 2.9)",
        None,
    )


def test_pep_610_direct_url_tells_editable_from_copied_and_index_installs():
    editable = doctor.install_origin('{"url": "file:///home/me/nn%20fork", "dir_info": {"editable": true}}')
    assert editable == doctor.Origin(True, "/home/me/nn fork", "editable install of /home/me/nn fork")
    copied = doctor.install_origin('{"url": "file:///home/me/fork", "dir_info": {}}')
    assert not copied.editable and copied.source == "/home/me/fork" and "edits there need a reinstall" in copied.words
    git = doctor.install_origin(
        '{"url": "https://github.com/me/nnUNet", "vcs_info": {"vcs": "git", "commit_id": "0123456789abcdef"}}'
    )
    assert git == doctor.Origin(False, None, "installed from git https://github.com/me/nnUNet at 0123456789ab")
    assert doctor.install_origin(None) == doctor.Origin(False, None, "installed from a package index")


def test_metadata_of_an_editable_install_whose_package_python_does_not_import_is_a_warning(tmp_path, monkeypatch):
    fork = tmp_path / "fork"
    monkeypatch.syspath_prepend(
        fake_nnunet(tmp_path / "site", "2.8.1", {"url": fork.as_uri(), "dir_info": {"editable": True}})
    )
    status, detail, fix = doctor.check_nnunet()
    assert status == "warning" and f"not from {fork} as the installed 2.8.1 says" in detail
    assert "PYTHONPATH" in fix


def test_only_nnunet_2_8_and_later_read_nnunet_ext_trainer(tmp_path):
    assert not doctor._reads_ext_trainer(None, "2.7.0") and doctor._reads_ext_trainer(None, "2.8.0")
    (tmp_path / "utilities").mkdir()
    (tmp_path / "utilities" / "find_objects.py").write_text("def recursive_find_trainer_class_by_name(name): ...\n")
    assert not doctor._reads_ext_trainer(str(tmp_path), "2.8.1")  # a fork's own code decides


@pytest.fixture
def fresh():
    """The per-diagnosis caches (the NVML inventory, torch's probe) forgotten before and after."""
    for cached in doctor._CACHED:
        cached.forget()
    yield
    for cached in doctor._CACHED:
        cached.forget()


def test_the_gpus_of_gpus_py_are_listed_by_name_and_memory(tmp_path, monkeypatch, fresh):
    fake = tmp_path / "gpus.json"
    gpu = {"name": "NVIDIA H200", "memory_total": 150 * 10**9, "memory_used": 0}
    fake.write_text(json.dumps([{**gpu, "index": i, "uuid": f"GPU-{i}"} for i in range(2)]))
    monkeypatch.setenv("NNUNET_LAUNCH_FAKE_GPUS", str(fake))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert doctor.check_nvidia() == (
        "ok",
        "driver version unknown; 2 GPU(s) (stand-ins from NNUNET_LAUNCH_FAKE_GPUS): 2 x NVIDIA H200 (140 GiB); "
        "CUDA_VISIBLE_DEVICES='1' leaves 1",
        None,
    )


def gpus_seen(monkeypatch, driver_cuda: tuple[int, int]) -> None:
    """NVML sees one GPU, with a driver for CUDA up to `driver_cuda`."""
    one = Gpu(index=0, uuid="GPU-0", name="NVIDIA A100", memory_total=80 * 2**30, memory_used=0)
    monkeypatch.setattr(doctor, "nvml", lambda: {"gpus": [one], "skipped": {}, "driver": "550.54", "cuda": driver_cuda})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_a_cpu_only_torch_on_a_machine_with_gpus_is_a_problem_whose_fix_is_a_cuda_build(monkeypatch):
    gpus_seen(monkeypatch, (12, 4))
    probe = {"version": "2.14.1+cpu", "cuda": None, "available": False, "why": "Torch not compiled with CUDA enabled"}
    monkeypatch.setattr(doctor, "torch_probe", lambda: probe)
    status, detail, fix = doctor.check_torch()
    assert status == "problem"
    assert detail == (
        "2.14.1+cpu, a CPU-only build; NVML sees 1 GPU(s), but torch cannot use CUDA (Torch not compiled with CUDA "
        "enabled)"
    )
    assert fix.startswith("install a CUDA build of torch, for CUDA 12.4 or older")


def test_a_torch_built_for_a_newer_cuda_than_the_driver_is_a_problem_naming_both(monkeypatch):
    gpus_seen(monkeypatch, (12, 4))
    probe = {"version": "2.14.1+cu130", "cuda": "13.0", "available": False, "why": "driver too old"}
    monkeypatch.setattr(doctor, "torch_probe", lambda: probe)
    status, detail, fix = doctor.check_torch()
    assert status == "problem" and detail.endswith("it is built for CUDA 13.0, the driver supports CUDA 12.4 at most")
    assert fix == "update the NVIDIA driver, or install a torch built for CUDA 12.4 or older"


def test_torch_2_9_is_a_problem_as_nnunet_excludes_it(monkeypatch):
    monkeypatch.setattr(doctor, "installed", lambda name: "2.9.1" if name == "torch" else None)
    monkeypatch.setattr(doctor, "torch_probe", lambda: {"version": "2.9.1", "cuda": None, "available": False})
    status, detail, _ = doctor.check_torch()
    assert status == "problem" and "torch 2.9.1 is installed, which nnU-Net excludes (torch 2.9.*)" in detail


def test_without_nvml_the_driver_check_is_a_warning_that_says_cpu_only(here):
    reported = line_of(here[0].stdout, "NVIDIA driver")
    if reported.startswith("warning"):  # a machine without a driver, like the one the suite runs on
        assert "no NVIDIA driver: runs on the CPU only" in reported
        assert "fix: use -device cpu --workers N to run on the CPU" in reported


def test_a_check_that_raises_becomes_its_problem_line_and_the_others_still_run():
    def broken():
        raise KeyError("Version")

    checks = doctor.diagnose((("broken", broken), ("python", doctor.check_python)))
    assert checks[0].status == "problem" and checks[0].detail == "the check itself failed: KeyError: 'Version'"
    assert checks[1].status == "ok"
    assert doctor.exit_code(checks) == 1


def test_a_check_that_hangs_is_reported_unfinished_at_the_deadline():
    started = time.monotonic()
    checks = doctor.diagnose((("stuck", lambda: time.sleep(30)), ("python", doctor.check_python)), seconds=0.5)
    assert time.monotonic() - started < 5
    assert (checks[0].status, checks[0].detail) == ("problem", "did not finish in 0.5 s")
    assert checks[1].status == "ok"


def test_a_torchvision_that_does_not_load_with_this_torch_is_a_problem_naming_the_trainer_lookup(monkeypatch, fresh):
    # the child's output when torchvision's compiled ops do not match torch: torch loads, torchvision does not
    torch_line = {"torch": {"version": "2.14.1+cpu", "cuda": None, "available": False}}
    monkeypatch.setattr(
        doctor,
        "PROBE",
        f"import json\nprint(json.dumps({torch_line!r}), flush=True)\n"
        "raise RuntimeError('operator torchvision::nms does not exist')\n",
    )
    monkeypatch.setattr(doctor, "installed", lambda name: {"torch": "2.14.1+cpu", "torchvision": "0.29.1"}.get(name))
    status, detail, fix = doctor.check_torchvision()
    assert status == "problem"
    assert detail.startswith("0.29.1 does not load with torch 2.14.1+cpu")
    assert "RuntimeError: operator torchvision::nms does not exist" in detail
    assert "trainer lookup finds only nnUNetTrainer" in detail
    assert fix.startswith("install the torchvision built for torch 2.14.1+cpu: pip install 'torchvision==0.29.*' ")
    assert "--index-url https://download.pytorch.org/whl/cpu" in fix
    assert doctor.check_torch()[0] == "ok"  # torch itself is fine


def test_a_torch_import_that_hangs_is_killed_after_the_childs_timeout_and_is_a_problem(monkeypatch, fresh):
    monkeypatch.setattr(doctor, "PROBE", "import time\ntime.sleep(60)\n")
    monkeypatch.setattr(doctor, "CHILD_SECONDS", 0.5)
    started = time.monotonic()
    status, detail, _ = doctor.check_torch()
    assert time.monotonic() - started < 10
    assert status == "problem" and detail.endswith("does not import: did not finish in 0.5 s")
    assert doctor.check_torchvision()[1].endswith("torch itself does not load (see torch)")
