"""GPU inventory boundary: CUDA_VISIBLE_DEVICES parsing and selection (NVML replaced by a fake
inventory file, the only boundary we cannot have here), and the real NVML path without a GPU."""

from __future__ import annotations

import json
import sys

import pytest

from launcher import gpus
from launcher.errors import LauncherError

FAKE = [
    {
        "index": 0,
        "uuid": "GPU-aaaa1111-0000-0000-0000-000000000000",
        "name": "H100",
        "memory_total": 80 << 30,
        "memory_used": 1 << 30,
        "processes": [],
    },
    {
        "index": 1,
        "uuid": "GPU-bbbb2222-0000-0000-0000-000000000000",
        "name": "H100",
        "memory_total": 80 << 30,
        "memory_used": 0,
        "processes": [{"pid": 42, "used_memory": 1 << 20}],
    },
    {
        "index": 2,
        "uuid": "GPU-cccc3333-0000-0000-0000-000000000000",
        "name": "A100",
        "memory_total": 40 << 30,
        "memory_used": 0,
        "processes": [],
    },
]
INVENTORY = [gpus.Gpu(**g) for g in FAKE]


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", []),
        ("0,2", ["0", "2"]),
        (" 1 , 0 ", ["1", "0"]),
        ("GPU-aaaa1111", ["GPU-aaaa1111"]),
        ("MIG-4f0a2e1c-1111-2222-3333-444455556666", ["MIG-4f0a2e1c-1111-2222-3333-444455556666"]),
        ("0,-1,2", ["0"]),  # CUDA stops at the first invalid entry
        ("1,foo,2", ["1"]),
        ("-1", []),
    ],
)
def test_cuda_visible_devices_is_parsed_like_cuda(value, expected):
    assert gpus.parse_visible_devices(value) == expected


def test_visible_devices_bound_the_usable_gpus_by_index_uuid_prefix_and_mig():
    assert [g.index for g in gpus.visible_gpus(INVENTORY, None)] == [0, 1, 2]
    assert [g.index for g in gpus.visible_gpus(INVENTORY, ["2", "0"])] == [2, 0]
    assert [g.index for g in gpus.visible_gpus(INVENTORY, ["GPU-bbbb"])] == [1]
    assert gpus.visible_gpus(INVENTORY, []) == []
    assert [g.index for g in gpus.visible_gpus(INVENTORY, ["0", "7", "1"])] == [0]
    mig = gpus.visible_gpus(INVENTORY, ["MIG-abc"])
    assert [g.uuid for g in mig] == ["MIG-abc"]


def test_gpus_flag_selects_within_what_is_visible():
    assert [g.index for g in gpus.select_gpus("all", INVENTORY, ["0", "2"])] == [0, 2]
    assert [g.index for g in gpus.select_gpus("2,0", INVENTORY, None)] == [2, 0]
    assert [g.index for g in gpus.select_gpus("GPU-cccc3333", INVENTORY, None)] == [2]
    with pytest.raises(LauncherError, match="hides"):
        gpus.select_gpus("1", INVENTORY, ["0"])
    with pytest.raises(LauncherError, match="not on this machine"):
        gpus.select_gpus("5", INVENTORY, None)


def test_fake_inventory_feeds_plan_with_one_part_per_gpu_pinned_by_uuid(tiny, tmp_path):
    from conftest import cli, model_args

    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps(FAKE))
    env = {gpus.FAKE_INVENTORY_ENV: str(fake), "CUDA_VISIBLE_DEVICES": "2,0"}
    result = cli("plan", *model_args(tiny, tmp_path / "out"), "--workers-per-gpu", "2", "--json", env=env)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["num_parts"] == 4
    assert [(p["gpu"], p["gpu_uuid"][:8]) for p in plan["parts"]] == [
        ("gpu2", "GPU-cccc"),
        ("gpu2", "GPU-cccc"),
        ("gpu0", "GPU-aaaa"),
        ("gpu0", "GPU-aaaa"),
    ]
    assert not (tmp_path / "out").exists(), "plan is a dry run"

    listing = cli("gpus", "--json", env=env)
    assert [g["uuid"] for g in json.loads(listing.stdout)] == [g["uuid"] for g in FAKE]
    assert json.loads(listing.stdout)[1]["processes"] == [{"pid": 42, "used_memory": 1 << 20}]


def test_without_nvml_cuda_runs_exit_2_with_a_hint_to_use_the_cpu(tiny, tmp_path):
    from conftest import cli, model_args

    for args in (["run"], ["plan"]):
        result = cli(*args, *model_args(tiny, tmp_path / "out"))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "-device cpu --workers N" in result.stderr
    assert not (tmp_path / "out").exists()
    listing = cli("gpus")  # an answer for a machine without GPUs, as with --json: exit 0
    assert listing.returncode == 0 and listing.stdout == "no GPU found\n" and "NVML" in listing.stderr
    as_json = cli("gpus", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == [], "a script gets an empty list"


class FakeNvmlError(Exception):
    pass


class FakeGpuIsLost(FakeNvmlError):
    def __str__(self):
        return "GPU is lost"


class FakePynvml:
    """The part of pynvml inventory() uses: three GPUs, `lost` ones raise from `failing_call`."""

    NVMLError = FakeNvmlError

    def __init__(self, lost=(1,), failing_call="nvmlDeviceGetHandleByIndex"):
        self.lost, self.failing_call, self.shutdowns = set(lost), failing_call, 0

    def _check(self, call, index):
        if call == self.failing_call and index in self.lost:
            raise FakeGpuIsLost()

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 3

    def nvmlDeviceGetHandleByIndex(self, index):
        self._check("nvmlDeviceGetHandleByIndex", index)
        return index  # the handle is just the index here

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._check("nvmlDeviceGetMemoryInfo", handle)
        return type("Memory", (), {"total": 80 << 30, "used": 1 << 30})()

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return []

    def nvmlDeviceGetName(self, handle):
        return b"H100"

    def nvmlDeviceGetUUID(self, handle):
        self._check("nvmlDeviceGetUUID", handle)
        return f"GPU-{handle}{handle}{handle}{handle}-0000"


@pytest.fixture
def fake_nvml(monkeypatch):
    """Installs a FakePynvml as `pynvml` (real NVML path, no GPU needed); call it to configure."""
    monkeypatch.delenv(gpus.FAKE_INVENTORY_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(**kwargs):
        fake = FakePynvml(**kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


@pytest.mark.parametrize("failing_call", ["nvmlDeviceGetHandleByIndex", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUUID"])
def test_an_nvml_error_on_one_gpu_skips_it_with_a_warning_and_keeps_the_others(fake_nvml, capsys, failing_call):
    nvml = fake_nvml(failing_call=failing_call)
    found = gpus.inventory()
    assert [(g.index, g.uuid, g.name) for g in found] == [(0, "GPU-0000-0000", "H100"), (2, "GPU-2222-0000", "H100")]
    assert nvml.shutdowns == 1
    err = capsys.readouterr().err
    assert err == "nnunet-launch: warning: GPU 1 skipped: NVML error: GPU is lost\n"


def test_gpus_flag_selection_works_around_a_skipped_gpu_and_refuses_to_name_it(fake_nvml, capsys):
    fake_nvml(lost={1})
    assert [g.index for g in gpus.usable_gpus("all")] == [0, 2]
    assert [g.index for g in gpus.usable_gpus("2,0")] == [2, 0]
    with pytest.raises(LauncherError, match=r"GPU 1, which is not usable \(NVML error: GPU is lost\)"):
        gpus.usable_gpus("0,1")
    # a UUID cannot be matched to a GPU NVML failed on: the message lists the skipped ones
    with pytest.raises(LauncherError, match=r"not on this machine .*1 skipped \(NVML error: GPU is lost\)"):
        gpus.usable_gpus("GPU-1111")
    assert "GPU 1 skipped" in capsys.readouterr().err


def test_with_every_gpu_skipped_a_cuda_run_says_none_is_usable_and_hints_at_the_cpu(fake_nvml):
    fake_nvml(lost={0, 1, 2})
    with pytest.raises(LauncherError, match=r"finds none usable \(3 skipped on NVML errors\).*-device cpu"):
        gpus.usable_gpus("all")


def test_gpus_json_prints_valid_json_on_stdout_and_the_skip_warning_on_stderr(fake_nvml):
    from click.testing import CliRunner

    from launcher.cli import cli

    fake_nvml(lost={1}, failing_call="nvmlDeviceGetMemoryInfo")
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout by default
    except TypeError:
        runner = CliRunner()  # click >= 8.2 always keeps them apart
    result = runner.invoke(cli, ["gpus", "--json"])
    assert result.exit_code == 0, result.output
    assert [g["index"] for g in json.loads(result.stdout)] == [0, 2]
    assert "GPU 1 skipped: NVML error: GPU is lost" in result.stderr


def test_plan_counts_what_the_fast_profile_keeps_on_the_gpu_when_checking_workers_per_gpu(tiny, tmp_path):
    """Batched mirroring (8 tiles), fold sums and the export on the device: a GPU with room for two
    exact workers is short for two fast ones, and plan says why."""
    import re

    from conftest import cli, model_args

    exact = gpus.estimated_bytes_per_worker((32, 32, 32), 3, 64**3)
    fast = gpus.estimated_bytes_per_worker((32, 32, 32), 3, 64**3, fast=True, folds=2)
    assert fast - exact == 2048 * 32**3 * 7 + 2 * 3 * 64**3 + gpus.EXPORT_CHUNK_BYTES + 8 * 64**3
    fake = tmp_path / "gpus.json"
    env = {gpus.FAKE_INVENTORY_ENV: str(fake)}
    args = ("plan", *model_args(tiny, tmp_path / "out"), "--workers-per-gpu", "2")

    def plan(memory_total: int, *extra: str) -> tuple[str, float]:
        fake.write_text(json.dumps([{**FAKE[2], "memory_total": memory_total}]))
        result = cli(*args, *extra, env={**env, "CUDA_VISIBLE_DEVICES": FAKE[2]["uuid"]})
        assert result.returncode == 0, result.stderr
        said = result.stdout + result.stderr
        return said, float(re.search(r"GPU memory per worker: about ([0-9.]+) GiB", said).group(1))

    said, exact_gib = plan(80 << 30)
    assert "consider fewer" not in said
    said, fast_gib = plan(80 << 30, "--profile", "fast")
    assert "(--profile fast: mirrored batches, fold sums and the export on the device)" in said
    assert fast_gib > exact_gib
    between = int((exact_gib + fast_gib) * 2**30)  # two workers: room for exact ones, not fast ones
    assert "consider fewer" not in plan(between)[0]
    said, _ = plan(between, "--profile", "fast")
    assert "--profile fast keeps mirrored batches, fold sums and the export on the device): consider fewer" in said
