"""GPU throughput (for a lent GPU machine; must finish within 8 minutes).

A realistic model (nnU-Net's default 3d_fullres shape for CT: 6 stages, 32-320 features,
patch 128^3, CT normalisation; random weights) on 20 synthetic CT-sized cases
(256 x 256 x 64..128 voxels at the model's spacing). Plain `nnUNetv2_predict_from_modelfolder`
vs the launcher with K = 1, 2, 3 workers per GPU; GPU busy % and memory sampled through NVML;
each launcher run's segmentations compared with plain nnU-Net's. Runs by scripts/gpu_check.sh;
needs nothing installed as console scripts (nnU-Net and the launcher are run as modules).

    python scripts/bench_gpu.py [--cases 20] [--deadline-s 470] [--json-out FILE] [--ks 1,2,3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
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
    """GPU busy % (NVML utilization.gpu: the share of the last sample period in which a kernel
    ran) and memory used, every 0.5 s, averaged over the GPUs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.max_memory_used = 0
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        import pynvml

        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.error = f"NVML: {exc}"
            return
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            while not self.stop.wait(0.5):
                self.samples.append(sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles) / len(handles))
                used = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles)
                self.max_memory_used = max(self.max_memory_used, used)
        except pynvml.NVMLError as exc:  # e.g. utilisation not supported (MIG): no busy % then
            self.error = f"NVML: {exc}"
        finally:
            pynvml.nvmlShutdown()

    def report(self) -> dict:
        busy = [i for i, s in enumerate(self.samples) if s > 0]
        active = self.samples[busy[0] : busy[-1] + 1] if busy else []
        return {
            "mean_gpu_util_pct": round(float(np.mean(self.samples or [0])), 1),
            # from the first to the last sample with a kernel running: without process start-up
            "mean_gpu_util_pct_while_predicting": round(float(np.mean(active or [0])), 1),
            "max_gpu_memory_used_mib": round(self.max_memory_used / 2**20),
            "gpu_samples": len(self.samples),
            **({"nvml_error": self.error} if self.error else {}),
        }


def measure(command: list[str], cases: int, timeout: float, use_nvml: bool, log: Path) -> dict:
    """One run in its own session; on timeout SIGTERM (the launcher stops its workers), then SIGKILL."""
    sampler = UtilisationSampler() if use_nvml else None
    if sampler:
        sampler.start()
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.perf_counter() - started
    if sampler:
        sampler.stop.set()
        sampler.join()
    result = {
        "status": "timed out" if timed_out else ("done" if proc.returncode == 0 else "failed"),
        "exit_code": proc.returncode,
        "seconds": round(seconds, 1),
        "cases_per_min": round(cases * 60 / seconds, 2) if proc.returncode == 0 else None,
        **(sampler.report() if sampler else {}),
    }
    if proc.returncode != 0:
        result["output_tail"] = log.read_text(errors="replace")[-600:]
    return result


def identical_cases(out: Path, reference: Path) -> int:
    """How many cases' segmentations are voxel for voxel those of plain nnU-Net."""
    same = 0
    for ref in sorted(reference.glob("*.nii.gz")):
        mine = out / ref.name
        if mine.exists() and np.array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(ref))), sitk.GetArrayFromImage(sitk.ReadImage(str(mine)))
        ):
            same += 1
    return same


# plain nnU-Net through its own entry point: what the console script nnUNetv2_predict_from_modelfolder
# runs (an install with pip --target, as on an offline GPU machine, has no console scripts)
PLAIN_NNUNET = (
    "import sys\n"
    "from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder\n"
    "sys.argv[0] = 'nnUNetv2_predict_from_modelfolder'\n"
    "predict_entry_point_modelfolder()\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--deadline-s", type=float, default=470, help="the whole benchmark, model making included")
    parser.add_argument("--ks", default="1,2,3", help="workers per GPU to measure (default 1,2,3)")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test of this script")
    parser.add_argument("--json-out", help="also write the results here (rewritten after every run)")
    parser.add_argument("--work-dir", help="where models, cases and outputs go (default: a temp folder, removed)")
    args = parser.parse_args()
    start = time.perf_counter()
    base = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    base.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "cases": args.cases,
        "model": "3d_fullres CT: 6 stages, 32-320 features, patch 128^3, random weights; --disable_tta",
        "cpu_cores": len(os.sched_getaffinity(0)),
        "runs": {},
    }

    def save() -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2))

    # the children find the launcher and nnU-Net where this process does
    os.environ["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    )
    use_nvml = args.device == "cuda"
    try:
        model, inputs = base / "model", base / "inputs"
        make_model(model)
        make_cases(inputs, args.cases)
        results["setup_s"] = round(time.perf_counter() - start, 1)
        common = ["-i", str(inputs), "-m", str(model), "-f", "0", "-device", args.device, "--disable_tta"]
        runs = {"plain nnUNetv2_predict": [sys.executable, "-c", PLAIN_NNUNET, *common, "-o", str(base / "plain")]}
        runs["plain nnUNetv2_predict"].append("--disable_progress_bar")
        for k in (int(k) for k in args.ks.split(",")):
            per_gpu = ["--workers-per-gpu", str(k)] if args.device == "cuda" else ["--workers", str(k)]
            runs[f"launcher K={k}"] = [
                sys.executable,
                "-m",
                "launcher",
                "run",
                *common,
                "-o",
                str(base / f"k{k}"),
                *per_gpu,
            ]
        for name in runs:
            results["runs"][name] = {"status": "not run"}
        save()
        for name, command in runs.items():
            left = args.deadline_s - (time.perf_counter() - start)
            if left < 30:
                results["runs"][name] = {"status": "skipped: over the time budget"}
                continue
            log = base / f"{name.replace(' ', '_').replace('=', '')}.log"
            results["runs"][name] = measure(command, args.cases, left, use_nvml, log)
            print(name, results["runs"][name], flush=True)
            save()
        plain = results["runs"]["plain nnUNetv2_predict"]
        for name in runs:
            if name.startswith("launcher") and results["runs"][name].get("status") == "done" == plain.get("status"):
                if args.deadline_s - (time.perf_counter() - start) < 20:
                    break
                out = base / ("k" + name.split("=")[1])
                results["runs"][name]["identical_to_plain"] = f"{identical_cases(out, base / 'plain')}/{args.cases}"
                save()
        results["seconds"] = round(time.perf_counter() - start, 1)
        save()
        print(json.dumps(results, indent=2))
    finally:
        if not args.work_dir:
            shutil.rmtree(base, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
