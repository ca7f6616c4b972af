"""Case discovery and the static split are exactly nnU-Net's."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import cli
from launcher.scheduler import make_slots, static_parts

# names that sort differently by number and by text, with spaces, quotes, unicode, dashes
TRICKY_IDS = ["c_10", "c_2", "c_1", "-lead", "with space", "quote'd", "ünï", "A_upper", "c_2_b", "x"]


@pytest.fixture
def tricky_inputs(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for case_id in TRICKY_IDS:
        (folder / f"{case_id}_0000.nii.gz").write_bytes(b"")
    (folder / "notes.txt").write_text("skipped: not the model's file ending")
    return folder


@pytest.mark.parametrize("num_parts", [1, 2, 3, 4])
def test_static_plan_equals_nnunet_split(tiny, tricky_inputs, tmp_path, num_parts):
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    result = cli(
        "plan",
        "-i",
        str(tricky_inputs),
        "-o",
        str(tmp_path / "out"),
        "-m",
        str(tiny["model"]),
        "-f",
        "0",
        "-device",
        "cpu",
        "--workers",
        str(num_parts),
        "--schedule",
        "static",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    lists = create_lists_from_splitted_dataset_folder(str(tricky_inputs), ".nii.gz", num_processes=1)
    nnunet_ids = [p.rsplit("/", 1)[1][: -len("_0000.nii.gz")] for [p] in lists]
    assert plan["num_parts"] == num_parts
    for part in plan["parts"]:
        assert part["cases"] == nnunet_ids[part["part_id"] :: num_parts]


@given(st.lists(st.text(min_size=1, max_size=6), max_size=40), st.integers(1, 9))
def test_static_parts_cover_every_case_once_in_nnunet_order(ids, num_parts):
    parts = static_parts(ids, num_parts)
    assert len(parts) == num_parts
    flat = sorted(c for part in parts for c in part)
    assert flat == sorted(set(ids))
    for k, part in enumerate(parts):
        assert part == sorted(set(ids))[k::num_parts]


def test_slots_put_k_workers_on_each_gpu_in_order():
    slots = make_slots([(3, "GPU-c"), (1, "GPU-a")], 2, 0)
    assert [(s.part_id, s.gpu_index, s.gpu_uuid) for s in slots] == [
        (0, 3, "GPU-c"),
        (1, 3, "GPU-c"),
        (2, 1, "GPU-a"),
        (3, 1, "GPU-a"),
    ]
    assert [s.label for s in make_slots([], 1, 3)] == ["cpu", "cpu", "cpu"]
