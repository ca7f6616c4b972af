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


# --- the failure-kind table (policy.FAILURE_RULES), row by row ---------------------------------
def _judge(kind, flights, solo=False, health=None, device="gpu-a"):
    from launcher.policy import DeviceHealth, judge_death

    return judge_death(kind, flights, solo, device, health or DeviceHealth(), helper_stage="preprocess")


def test_every_failure_kind_has_one_rule_and_each_death_kind_is_judged_by_it():
    from launcher.policy import FAILURE_RULES
    from launcher.spec import Failure

    assert set(FAILURE_RULES) == set(Failure)
    predicting = [InFlight("p", "predict", 1.0), InFlight("q", "held", 2.0)]
    alone = [InFlight("p", "predict", 1.0)]
    nothing_started = [InFlight("q", "held", 2.0)]
    expected = {  # kind: (charged alone, suspect with others, device suspected when no case ran, counts)
        Failure.CRASH: ("p", "p", True, True),
        Failure.HELPER: ("p", "p", True, True),
        Failure.HUNG: ("p", "p", True, True),
        Failure.HOST_OOM: ("p", "p", False, True),
        Failure.DEVICE: (None, None, True, True),  # first CUDA error: the case is deferred, the device rests
        Failure.KILLED: ("p", "p", False, False),  # an outside hand: never the device, no restart used up
        Failure.RESTART: (None, None, False, False),
        Failure.INTERRUPTED: (None, None, False, False),
        Failure.MODEL: (None, None, False, False),  # the model cannot load anywhere: nobody's, never the device
    }
    for kind, (charged, suspect, device, counts) in expected.items():
        one = _judge(kind, alone, solo=True)
        assert (one.charged, one.final) == (charged, False), kind
        other = _judge(kind, predicting)
        assert other.suspect == suspect and other.charged is None and "q" in other.released, kind
        assert other.alone == (suspect is not None), kind
        empty = _judge(kind, nothing_started)
        assert empty.suspect_device == device and empty.released == ("q",), kind
        assert empty.counts_restart == counts and empty.rests_host == (kind is Failure.HOST_OOM), kind
        assert empty.fails_rest == (kind is Failure.MODEL), kind
    case_errors = {Failure.RETRY: (False, False), Failure.PERMANENT: (True, False), Failure.OOM: (False, True)}
    for kind, (final, alone) in case_errors.items():
        rule = FAILURE_RULES[kind]
        assert (rule.final, rule.retry_alone, rule.suspect_device) == (final, alone, "never"), kind
    assert FAILURE_RULES[Failure.DISK_FULL].stops_run and not FAILURE_RULES[Failure.DISK_FULL].final
    assert set(expected) | set(case_errors) | {Failure.DISK_FULL} == set(Failure), "a test for every row"


def test_a_case_whose_cuda_errors_follow_it_is_charged_and_the_device_is_then_not_suspected():
    from launcher.policy import DeviceHealth
    from launcher.spec import Failure

    alone = [InFlight("p", "predict", 1.0)]
    health = DeviceHealth()
    first = _judge(Failure.DEVICE, alone, solo=True, health=health)
    assert (first.deferred, first.charged, first.suspect_device) == ("p", None, True)
    again = _judge(Failure.DEVICE, alone, solo=True, health=health)  # no finished case in between
    assert again.deferred == "p" and again.charged is None, "the device may still be why"
    health.case_finished("gpu-a")  # the device finished another case: it works
    proven = _judge(Failure.DEVICE, alone, solo=True, health=health)
    assert (proven.charged, proven.final, proven.suspect_device) == ("p", True, False)
    elsewhere = DeviceHealth()
    _judge(Failure.DEVICE, alone, health=elsewhere, device="gpu-a")
    moved = _judge(Failure.DEVICE, alone, health=elsewhere, device="gpu-b")
    assert (moved.charged, moved.final) == ("p", True), "errors on two devices: the case's"


def test_death_kinds_tell_an_outside_sigkill_from_the_oom_killer_and_a_crash():
    import signal

    from launcher.policy import death_kind
    from launcher.spec import Failure

    assert death_kind(None, -signal.SIGKILL, oom_killed=False, hung=False) is Failure.KILLED
    assert death_kind(None, -signal.SIGKILL, oom_killed=True, hung=False) is Failure.HOST_OOM
    assert death_kind(None, -signal.SIGSEGV, oom_killed=False, hung=False) is Failure.CRASH
    assert death_kind(None, 1, oom_killed=False, hung=False) is Failure.CRASH
    assert death_kind(None, -signal.SIGKILL, oom_killed=False, hung=True) is Failure.HUNG, "the watchdog's own kill"
    assert death_kind(Failure.DEVICE, 1, oom_killed=False, hung=False) is Failure.DEVICE
    helper = Failure.HELPER
    assert death_kind(helper, 1, False, False, helper_code=-signal.SIGKILL) is Failure.KILLED
    assert death_kind(helper, 1, True, False, helper_code=-signal.SIGKILL) is Failure.HOST_OOM
    assert death_kind(helper, 1, False, False, helper_code=-signal.SIGSEGV) is Failure.HELPER
