"""The failure policy's pure parts, and the CUDA out-of-memory fallback at its boundary."""

from __future__ import annotations

import pytest

from launcher.cases import voxels
from launcher.planning import Plan, largest_voxels, memory_warning
from launcher.policy import DeviceHealth, InFlight, blame, hang_timeout
from launcher.scheduler import make_slots


def test_hang_timeout_is_explicit_or_the_larger_of_ten_minutes_and_ten_slowest_cases():
    assert hang_timeout(30, 500) == 30
    assert hang_timeout(None, None) == 600
    assert hang_timeout(None, 12) == 600
    assert hang_timeout(None, 90) == 900


def test_crash_is_charged_to_the_predicting_case_else_the_oldest_and_queued_cases_are_released():
    flight = [InFlight("a", "export", 1.0), InFlight("b", "predict", 2.0), InFlight("c", "preprocess", 3.0)]
    assert blame(flight) == (["b"], ["a", "c"])
    assert blame([InFlight("c", "preprocess", 3.0), InFlight("a", "export", 1.0)]) == (["a"], ["c"])
    assert blame([]) == ([], [])


def test_device_is_sick_after_three_deaths_in_a_row_without_a_finished_case():
    health = DeviceHealth()
    assert [health.worker_died("gpu-a") for _ in range(2)] == [False, False]
    health.case_finished("gpu-a")
    assert [health.worker_died("gpu-a") for _ in range(3)] == [False, False, True]
    assert health.worker_died("gpu-a") is False, "reported once"
    assert health.sick == {"gpu-a"}


def test_memory_warning_names_the_need_when_free_memory_is_short(tiny):
    from launcher.cases import discover

    cases = {c.id: c for c in discover(str(tiny["inputs"]), ".nii.gz", 1)}
    plan = Plan(
        cases=cases,
        slots=make_slots([], 1, 4),
        parts={},
        threads=1,
        npp=1,
        nps=1,
        largest_voxels=largest_voxels(list(cases.values())),
    )
    assert plan.largest_voxels == max(voxels(c) for c in cases.values()) > 0
    assert memory_warning(plan, 1, 3, available=64 << 30) is None
    warning = memory_warning(plan, 1, 3, available=1 << 20)
    assert warning.startswith("4 worker(s) may need about") and "consider fewer workers" in warning


class FakeCudaPredictor:
    """Stands in for the GPU, which this machine lacks: the first on-device try runs out of memory."""

    def __init__(self):
        import torch

        self.device = torch.device("cpu")
        self.perform_everything_on_device = True
        self.calls = []

    def predict_logits_from_preprocessed_data(self, data):
        import torch

        self.calls.append(self.perform_everything_on_device)
        if self.perform_everything_on_device:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return data * 2


def test_cuda_out_of_memory_is_retried_once_without_everything_on_device():
    import torch

    from launcher.nnunet import predict_with_memory_fallback

    predictor, notes = FakeCudaPredictor(), []
    result = predict_with_memory_fallback(predictor, torch.ones(2), notes.append)
    assert result.tolist() == [2.0, 2.0]
    assert predictor.calls == [True, False] and predictor.perform_everything_on_device is True
    assert "perform_everything_on_device=False" in notes[0]

    predictor.perform_everything_on_device = False
    predictor.predict_logits_from_preprocessed_data = lambda d: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("still too big")
    )
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predict_with_memory_fallback(predictor, torch.ones(2), notes.append)
