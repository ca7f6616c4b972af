"""The failure policy's pure parts, and how prediction errors are told apart."""

from __future__ import annotations

from launcher.planning import Plan, memory_warning, survey
from launcher.policy import (
    STALL_FLOOR_S,
    STARTUP_STALL_S,
    Blame,
    DeviceHealth,
    InFlight,
    backoff,
    blame,
    restart_delay,
    stall_timeout,
)
from launcher.scheduler import make_slots


def test_stall_timeout_is_explicit_or_scaled_by_the_case_work_with_a_floor_and_a_startup_value():
    assert stall_timeout(30, 1000.0, 2.0) == 30
    assert stall_timeout(None, 1000.0, None) == STARTUP_STALL_S
    assert stall_timeout(None, 10.0, 0.5) == STALL_FLOOR_S, "a small case never gets less than the floor"
    assert stall_timeout(None, 1000.0, 0.5) == 10 * 0.5 * 1000, "a big case gets 10x what its size predicts"


def test_a_death_blames_the_predicting_case_a_helper_death_the_oldest_in_a_helper_and_never_queued_ones():
    flight = [InFlight("a", "export", 1.0), InFlight("b", "predict", 2.0), InFlight("c", "held", 0.5)]
    assert blame(flight, solo=False) == Blame(None, "b", ("a", "c"))
    assert blame(flight, solo=False, helper_stage="export") == Blame(None, "a", ("b", "c"))
    older_preprocess = [InFlight("p", "preprocess", 0.5), InFlight("e", "export", 1.0)]
    assert blame(older_preprocess, solo=False, helper_stage="export").suspect == "e", "the dead helper's stage"
    assert blame([InFlight("c", "preprocess", 3.0), InFlight("a", "export", 1.0)], solo=False).suspect == "a"
    assert blame([InFlight("c", "held", 3.0)], solo=False) == Blame(None, None, ("c",)), "start-up: no case"
    assert blame([], solo=True) == Blame(None, None, ())


def test_only_a_case_alone_on_its_worker_is_charged_with_certainty():
    assert blame([InFlight("b", "predict", 2.0)], solo=True) == Blame("b", None, ())
    assert blame([InFlight("b", "predict", 2.0)], solo=False) == Blame(None, "b", ())


def test_device_is_suspected_for_unexplained_deaths_or_different_isolated_cases_and_rests_longer_each_time():
    health = DeviceHealth()
    assert health.death("gpu-a", "x", False, now=0.0) == 0.0, "one isolated case dying: its own fault"
    assert health.death("gpu-a", "x", False, now=0.0) == 0.0, "the same case again: still its own"
    assert health.death("gpu-a", "y", False, now=0.0) == 5.0, "a second, different case: the device"
    assert health.death("gpu-a", None, True, now=10.0) == 10.0
    assert health.rest_until["gpu-a"] == 20.0
    health.case_finished("gpu-a")
    assert health.death("gpu-a", None, True, now=30.0) == 5.0, "a finished case forgives"
    assert [backoff(n, 5.0, 300.0) for n in (1, 2, 3, 10)] == [5.0, 10.0, 20.0, 300.0]


def test_restarts_back_off_after_the_first_so_a_burst_of_kills_passes():
    assert [restart_delay(n) for n in (1, 2, 3, 4, 9)] == [0.0, 1.0, 2.0, 4.0, 30.0]


def test_memory_warning_names_the_need_when_free_memory_is_short(tiny):
    from launcher.cases import discover

    cases = discover(str(tiny["inputs"]), ".nii.gz", 1)
    voxels = survey(cases)[1]
    plan = Plan(
        cases={c.id: c for c in cases},
        slots=make_slots([], 1, 4),
        parts={},
        threads=1,
        npp=1,
        nps=1,
        largest_voxels=max(voxels.values()),
    )
    assert memory_warning(plan, 1, 3, available=64 << 30) is None
    warning = memory_warning(plan, 1, 3, available=1 << 20)
    assert warning.startswith("4 worker(s) may need about") and "consider fewer workers" in warning
    # every worker also holds every fold of every model it serves (two 5-fold members: ~2.4 GB)
    assert memory_warning(plan, 1, 3, available=8 << 30) is None
    warning = memory_warning(plan, 1, 3, available=8 << 30, model_bytes=int(2.4 * 2**30))
    assert "and 2.4 GiB of model weights each" in warning


def test_prediction_errors_out_of_memory_restarts_a_worker_other_cuda_errors_end_it_others_retry():
    import torch

    from launcher.nnunet import NnunetBackend

    kind = NnunetBackend.prediction_error_kind
    assert kind(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")) == "oom"
    assert kind(RuntimeError("CUDA error: an illegal memory access was encountered")) == "device"
    assert kind(RuntimeError("CUDA error: unspecified launch failure")) == "device"
    assert kind(RuntimeError("Encountered inf in predicted array. Aborting...")) == "retry"
    assert kind(ValueError("shapes do not match")) == "retry"
