"""GPU throughput (for a lent GPU machine; must finish within 8 minutes).

A realistic model (nnU-Net's default 3d_fullres shape for CT: 6 stages, 32-320 features,
patch 128^3, CT normalisation; random weights) on 20 synthetic CT-sized cases
(256 x 256 x 64..128 voxels at the model's spacing). Plain `nnUNetv2_predict_from_modelfolder`
vs the launcher with K = 1, 2, 3 workers per GPU; GPU utilisation sampled through NVML.

    python scripts/bench_gpu.py [--cases 20] [--deadline-s 470]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
_spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def ct_plans() -> dict:
    plans = tiny.plans_dict(1)
    config = plans["configurations"][tiny.CONFIGURATION]
    config.update(
        patch_size=[128, 128, 128],
        median_image_size_in_voxels=[96, 256, 256],
        normalization_schemes=["CTNormalization"],
        batch_size=2,
    )
    features = [32, 64, 128, 256, 320, 320]
    config["architecture"]["arch_kwargs"].update(
        n_stages=6,
        features_per_stage=features,
        kernel_sizes=[[3, 3, 3]] * 6,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
        n_conv_per_stage=[2] * 6,
        n_conv_per_stage_decoder=[2] * 5,
    )
    plans["foreground_intensity_properties_per_channel"]["0"] = {
        "mean": 100.0,
        "std": 80.0,
        "min": -1000.0,
        "max": 2000.0,
        "median": 100.0,
        "percentile_00_5": -100.0,
        "percentile_99_5": 400.0,
    }
    return plans


def make_model(folder: Path) -> None:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset = ct_plans(), tiny.dataset_dict(1)
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4))
    manager = PlansManager(plans)
    torch.manual_seed(0)
    network = nnUNetTrainer.build_network_architecture(
        manager, manager.get_configuration(tiny.CONFIGURATION), 1, 3, enable_deep_supervision=False
    )
    (folder / "fold_0").mkdir()
    torch.save(
        {
            "network_weights": network.state_dict(),
            "trainer_name": tiny.TRAINER,
            "init_args": {"configuration": tiny.CONFIGURATION},
            "inference_allowed_mirroring_axes": (0, 1, 2),
        },
        folder / "fold_0" / "checkpoint_final.pth",
    )


def make_cases(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        shape = (int(rng.integers(64, 129)), 256, 256)
        volume = rng.normal(40, 300, shape).astype(np.int16)
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(image, str(folder / f"ct_{i:03d}_0000.nii.gz"))


class UtilisationSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        while not self.stop.wait(0.5):
            self.samples.append(sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles) / len(handles))
        pynvml.nvmlShutdown()


def measure(command: list[str], cases: int) -> dict:
    sampler = UtilisationSampler()
    sampler.start()
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    return {
        "seconds": round(seconds, 1),
        "cases_per_min": round(cases * 60 / seconds, 2),
        "mean_gpu_util_pct": round(float(np.mean(sampler.samples or [0])), 1),
        "exit_code": result.returncode,
        "stderr_tail": result.stderr[-300:] if result.returncode else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--deadline-s", type=float, default=470)
    args = parser.parse_args()
    start = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        model, inputs = base / "model", base / "inputs"
        make_model(model)
        make_cases(inputs, args.cases)
        common = ["-i", str(inputs), "-m", str(model), "-f", "0", "-device", "cuda", "--disable_tta"]
        runs = {
            "plain nnUNetv2_predict": [
                str(BIN / "nnUNetv2_predict_from_modelfolder"),
                *common,
                "-o",
                str(base / "plain"),
                "--disable_progress_bar",
            ]
        }
        for k in (1, 2, 3):
            runs[f"launcher K={k}"] = [
                str(BIN / "nnunet-launch"),
                "run",
                *common,
                "-o",
                str(base / f"k{k}"),
                "--workers-per-gpu",
                str(k),
            ]
        results = {"machine": platform.node(), "date": time.strftime("%Y-%m-%d"), "cases": args.cases}
        for name, command in runs.items():
            if time.perf_counter() - start > args.deadline_s:
                results[name] = "skipped: over the time budget"
                continue
            results[name] = measure(command, args.cases)
            print(name, results[name], flush=True)
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
