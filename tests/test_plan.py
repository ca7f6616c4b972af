"""Case discovery and the static split are exactly nnU-Net's."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import NUM_CASES, cli, model_args
from launcher.scheduler import (
    LargestFirstQueue,
    lower_bound,
    make_slots,
    simulate_dynamic,
    simulate_feeding,
    simulate_static,
    static_parts,
)

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

    args = model_args({**tiny, "inputs": tricky_inputs}, tmp_path / "out")
    result = cli("plan", *args, "-device", "cpu", "--workers", str(num_parts), "--schedule", "static", "--json")
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


work_maps = st.dictionaries(st.text(min_size=1, max_size=5), st.floats(0.1, 1000), min_size=1, max_size=60)


@given(work_maps, st.integers(1, 8), st.integers(0, 4))
def test_dynamic_schedule_assigns_every_case_exactly_once(work, num_slots, lookahead):
    makespan, assignment = simulate_dynamic(work, num_slots, lookahead)
    assert sorted(c for part in assignment for c in part) == sorted(work)
    assert lower_bound(work, num_slots) <= makespan + 1e-9


@given(work_maps)
def test_queue_hands_out_largest_first_and_takes_back_what_a_dead_worker_held(work):
    queue = LargestFirstQueue(work)
    taken = [queue.take() for _ in range(min(3, len(work)))]
    expected = sorted(work, key=lambda c: (-work[c], c))
    assert taken == expected[: len(taken)]
    queue.give_back(taken[1:])  # a worker died holding these
    queue.give_back(taken[1:])  # given back twice: still once in the queue
    rest = list(iter(queue.take, None))
    assert rest == sorted(set(expected) - {taken[0]}, key=lambda c: (-work[c], c))


def test_dynamic_beats_the_static_split_on_a_skewed_set():
    work = {f"c_{i:03d}": 1.0 for i in range(40)}
    work["c_000"] = 30.0  # part 0 of the static split also gets c_002, c_004, ...
    assert simulate_static(work, 2) == 30 + 19
    assert lower_bound(work, 2) == 34.5
    assert simulate_dynamic(work, 2, 0)[0] == 35  # one small case above the bound
    assert simulate_dynamic(work, 2, 3)[0] == 35


def test_plan_on_more_workers_than_cases_says_in_one_line_how_many_parts_get_nothing(tiny, tmp_path):
    args = model_args(tiny, tmp_path / "out")
    result = cli("plan", *args, "-device", "cpu", "--workers", "64")
    assert result.returncode == 0, result.stderr
    part_lines = [line for line in result.stdout.splitlines() if line.startswith("  part ")]
    assert len(part_lines) == NUM_CASES, "one line per part that gets cases"
    assert f"  {64 - NUM_CASES} part(s) get nothing (more parts than cases to predict)" in result.stdout


@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 6))
def test_the_plans_dynamic_split_is_the_launchers_own_feeding_and_covers_every_case_once(sizes, slots):
    work = {f"c{i:02d}": float(s) for i, s in enumerate(sizes)}
    assignment = simulate_feeding(work, slots)
    assert sorted(c for part in assignment for c in part) == sorted(work)
    assert assignment[0][0] == min(work, key=lambda c: (-work[c], c)), "the largest case first (ties by id)"


def test_the_first_of_two_workers_takes_only_its_fair_share_of_four_cases():
    """The issue's example: the plan said 3 + 1 while the run did 1 + 3; both now feed the same way."""
    work = {"a": 10.0, "b": 4.0, "c": 3.0, "d": 3.0}
    first, second = simulate_feeding(work, 2)
    assert first[0] == "a" and sorted(second[:3]) == ["b", "c", "d"]


def test_npp_and_nps_that_oversubscribe_the_cores_get_one_warning_line(tiny, tmp_path):
    from launcher.planning import available_cores

    many = str(2 * available_cores() + 1)
    result = cli("plan", *model_args(tiny, tmp_path / "out"), "-device", "cpu", "--workers", "1", "-npp", many)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "compete for" in line]
    assert len(lines) == 1 and f"-npp {many} with 1 worker(s)" in lines[0], result.stderr
    fine = cli("plan", *model_args(tiny, tmp_path / "out"), "-device", "cpu", "--workers", "1", "-npp", "1")
    assert "compete for" not in fine.stderr
