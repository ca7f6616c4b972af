"""GPU inventory boundary: CUDA_VISIBLE_DEVICES parsing and selection (NVML replaced by a fake
inventory file, the only boundary we cannot have here), and the real NVML path without a GPU."""

from __future__ import annotations

import json

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
    listing = cli("gpus")
    assert listing.returncode == 2 and "NVML" in listing.stderr
