"""Multi-stage inference: one `nnunet-launch run` vs nnU-Net's chain of commands as a user runs it.

An ensemble of the 2d and 3d_fullres models of Dataset998_Stages (`scripts/make_stage_models.py`:
tiny random-weight nets) followed by nnU-Net's postprocessing, on the same synthetic inputs, in
one invocation, the methods alternating (--reps):

- manual chain: for each member (2d, then 3d_fullres) PARTS concurrent
  `nnUNetv2_predict -d 998 -c M -f 0 --save_probabilities -num_parts PARTS -part_id k -npp 1 -nps 1`
  (waiting for all), then `nnUNetv2_ensemble -np PARTS`, then `nnUNetv2_apply_postprocessing
  -np PARTS`; the chain and each step are timed. nnU-Net's console scripts as installed: on the CPU
  each prediction process sets torch to every core, so PARTS processes oversubscribe the cores.
- manual chain, 1 thread (CPU only): the same with torch held to one thread per prediction process
  (tests/test_stages.py's wrapper; nnU-Net's CLI has no switch for it): the chain without the
  oversubscription, threaded as the launcher's workers are (PARTS workers on PARTS cores).
- launcher: `nnunet-launch run -c 2d 3d_fullres -pp_pkl_file PKL -plans_json J --workers PARTS
  -npp 1 -nps 1` (on a GPU: one worker per GPU) into a fresh OUT; timed, with its summary.json
  (intermediate_peak_bytes) and cases.csv (time in each stage, whether final outputs were written
  while predictions were still running).

Goal: launcher <= 0.75x the manual chain's wall time (best runs). The launcher's final
segmentations are compared voxel for voxel with each chain's (on the CPU nnU-Net's numbers depend
on torch's thread count: the 1-thread chain is the one that must be identical).

Model loading: `nnUNetPredictor.initialize_from_trained_model_folder` in a fresh process for each
tiny member and for a realistic 3d_fullres model (PlainConvUNet, 6 stages, 32-320 features, patch
128^3, 5 folds, random weights, checkpoints with SGD momentum buffers as trained ones have): seconds,
checkpoint size and host RSS increase. With CUDA, GPU busy % is sampled through NVML during each run
(as in scripts/bench_gpu.py).

    python scripts/bench_stages.py [--reps 2] [--cases 16] [--tta] [--only chain|load]
        [--methods manual,manual_1_thread,launcher]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MEMBERS = ("2d", "3d_fullres")
sys.path.insert(0, str(ROOT / "scripts"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a fresh process: import, then initialize_from_trained_model_folder, with RSS before and after
LOAD_PROBE = r"""
import json, sys, time
def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
started = time.perf_counter()
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
imported = time.perf_counter()
torch.set_num_threads(1)
folder, folds, device = sys.argv[1], tuple(int(f) for f in sys.argv[2].split(",")), sys.argv[3]
before, _ = rss()
predictor = nnUNetPredictor(device=torch.device(device), verbose=False, allow_tqdm=False)
t0 = time.perf_counter()
predictor.initialize_from_trained_model_folder(folder, folds, "checkpoint_final.pth")
init_s = time.perf_counter() - t0
after, peak = rss()
result = {"import_s": imported - started, "init_s": init_s, "rss_before": before, "rss_after": after, "rss_peak": peak}
if device == "cuda":  # what a prediction does first: the net onto the GPU, then each fold's weights into it
    t0 = time.perf_counter()
    predictor.network.to(torch.device("cuda"))
    for params in predictor.list_of_parameters:
        predictor.network.load_state_dict(params)
    torch.cuda.synchronize()
    result["to_gpu_s"] = time.perf_counter() - t0
    result["gpu_allocated"] = torch.cuda.memory_allocated()
print(json.dumps(result))
"""


def setup(base: Path, cases: int, device: str) -> dict:
    import make_stage_models

    world = make_stage_models.make_stage_world(str(base), cases)
    if device != "cpu":
        del world["env"]["CUDA_VISIBLE_DEVICES"]
    return {**world, "inputs": Path(world["inputs"]), "cases": cases}


class Sampler:
    """GPU busy % through NVML during a run (scripts/bench_gpu.py's sampler); nothing on the CPU."""

    def __init__(self, use: bool):
        self.sampler = _load("bench_gpu").UtilisationSampler() if use else None

    def __enter__(self):
        if self.sampler:
            self.sampler.start()
        return self

    def __exit__(self, *exc):
        if self.sampler:
            self.sampler.stop.set()
            self.sampler.join()

    def report(self) -> dict:
        return self.sampler.report() if self.sampler else {}


def run_all(commands: list[tuple[list[str], dict]], timeout: float, log: Path) -> float:
    """Start the commands at once, each in its own session, and wait for all; their wall seconds."""
    started = time.perf_counter()
    procs = []
    with log.open("a") as out:
        for command, env in commands:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            procs.append(
                subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            )
        try:
            codes = [p.wait(timeout=max(1.0, timeout - (time.perf_counter() - started))) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            raise SystemExit(f"timed out after {timeout:.0f} s: {commands[0][0]} (log: {log})") from None
    if any(codes):
        raise SystemExit(f"failed ({codes}): {commands[0][0]}\n{log.read_text(errors='replace')[-3000:]}")
    return time.perf_counter() - started


def common(data: dict, device: str, tta: bool) -> list[str]:
    flags = ["-d", "998", "-f", "0", "-device", device, "-npp", "1", "-nps", "1"]
    return flags + ([] if tta else ["--disable_tta"])


def part_env(data: dict, device: str, part: int) -> dict:
    # on GPUs each part gets its own, as nnU-Net's instructions run them
    return data["env"] if device == "cpu" else {**data["env"], "CUDA_VISIBLE_DEVICES": str(part)}


def predict_command(data: dict, inputs: Path, out: Path, member: str, args, part: int, one_thread=False):
    flags = ["-i", str(inputs), "-o", str(out), "-c", member, *common(data, args.device, args.tta)]
    flags += ["--save_probabilities", "-num_parts", str(args.parts), "-part_id", str(part), "--disable_progress_bar"]
    if one_thread:
        return [sys.executable, "-c", _load("make_stage_models").ONE_THREAD_PREDICT, *flags]
    return [str(BIN / "nnUNetv2_predict"), *flags]


def manual_chain(data: dict, inputs: Path, out: Path, args, one_thread: bool = False) -> dict:
    """nnU-Net's commands as its instructions give them; the chain's and each step's wall seconds."""
    env, log, steps = data["env"], out.with_suffix(".log"), {}
    with Sampler(args.device == "cuda") as sampler:
        started = time.perf_counter()
        for member in MEMBERS:
            steps[f"predict {member}"] = run_all(
                [
                    (
                        predict_command(data, inputs, out / member, member, args, k, one_thread),
                        part_env(data, args.device, k),
                    )
                    for k in range(args.parts)
                ],
                args.timeout,
                log,
            )
        ensemble = [str(BIN / "nnUNetv2_ensemble"), "-i", *(str(out / m) for m in MEMBERS), "-o", str(out / "ensemble")]
        steps["ensemble"] = run_all([([*ensemble, "-np", str(args.parts)], env)], args.timeout, log)
        postprocess = [
            str(BIN / "nnUNetv2_apply_postprocessing"),
            *("-i", str(out / "ensemble"), "-o", str(out / "final")),
            *("-pp_pkl_file", data["postprocessing_pkl"], "-plans_json", data["plans_json"], "-np", str(args.parts)),
        ]
        steps["postprocessing"] = run_all([(postprocess, env)], args.timeout, log)
        total = time.perf_counter() - started
    return {"wall_s": total, "steps_s": steps, **sampler.report()}


def launcher(data: dict, out: Path, args) -> dict:
    workers = ["--workers", str(args.parts)] if args.device == "cpu" else []  # on GPUs: one worker per GPU
    command = [
        str(BIN / "nnunet-launch"),
        "run",
        *("-i", str(data["inputs"]), "-o", str(out), "-c", *MEMBERS),
        *common(data, args.device, args.tta),
        *("-pp_pkl_file", data["postprocessing_pkl"], "-plans_json", data["plans_json"]),
        *workers,
    ]
    with Sampler(args.device == "cuda") as sampler:
        wall = run_all([(command, data["env"])], args.timeout, out.with_suffix(".log"))
    state = out / ".nnunet-launch"
    summary = json.loads((state / "summary.json").read_text())
    with (state / "cases.csv").open() as f:
        rows = list(csv.DictReader(f))
    members = [r for r in rows if "/" in r["id"]]
    finals = [r for r in rows if "/" not in r["id"]]
    first_final = min(datetime.fromisoformat(r["ended"]) for r in finals)
    last_start = max(datetime.fromisoformat(r["started"]) for r in members)
    stage_s = {m: sum(float(r["seconds"]) for r in members if r["id"].startswith(m + "/")) for m in MEMBERS}
    return {
        "wall_s": wall,
        "launcher_wall_seconds": summary.get("wall_seconds"),
        "intermediate_peak_bytes": summary.get("intermediate_peak_bytes"),
        "stages": summary.get("stages"),
        # cases.csv's seconds (hand-out to done: a worker's units overlap in its pipeline), summed
        "unit_seconds_per_member": stage_s,
        "final_case_seconds_sum": sum(float(r["seconds"]) for r in finals if r["seconds"]),
        # > 0: a case's final output was in place that long before the last prediction started
        "first_final_before_last_prediction_start_s": (last_start - first_final).total_seconds(),
        **sampler.report(),
    }


def compare(mine: Path, reference: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk

    differing, voxels, differing_voxels = [], 0, 0
    names = sorted(p.name for p in reference.glob("*.nii.gz"))
    for name in names:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(mine / name))) if (mine / name).exists() else None
        voxels += a.size
        if b is None or a.shape != b.shape or not np.array_equal(a, b):
            differing.append(name.removesuffix(".nii.gz"))
            differing_voxels += a.size if b is None or a.shape != b.shape else int((a != b).sum())
    return {
        "identical_cases": f"{len(names) - len(differing)}/{len(names)}",
        "differing_cases": differing,
        "differing_voxel_fraction": differing_voxels / max(voxels, 1),
    }


METHODS = {
    "manual": "manual chain, nnU-Net's console scripts as installed",
    "manual_1_thread": "manual chain, torch held to 1 thread per prediction process",
    "launcher": "nnunet-launch run",
}


def chain_benchmark(base: Path, args) -> dict:
    data = setup(base, args.cases, args.device)
    methods = [m for m in METHODS if m in args.methods.split(",")]  # the launcher last
    if args.device == "cuda" and "manual_1_thread" in methods:  # nnU-Net runs 1 thread on GPUs anyway
        methods.remove("manual_1_thread")
    runs = {m: [] for m in methods}
    for rep in range(args.reps):
        for method in methods if rep % 2 == 0 else methods[::-1]:  # alternating order
            out = base / f"{method}-{rep}"
            if method == "launcher":
                runs[method].append(launcher(data, out, args))
            else:
                runs[method].append(manual_chain(data, data["inputs"], out, args, method == "manual_1_thread"))
            print(f"rep {rep} {METHODS[method]}: {runs[method][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    best = {m: min(r["wall_s"] for r in runs[m]) for m in methods}
    result = {
        "cases": args.cases,
        "tta": args.tta,
        "parts": args.parts,
        "methods": {m: METHODS[m] for m in methods},
        "runs": runs,
        "wall_s": {m: [round(r["wall_s"], 1) for r in runs[m]] for m in methods},
        "goal": "launcher <= 0.75 x manual",
    }
    for method in methods[:-1]:
        if "launcher" in best:
            result[f"ratio_launcher_over_{method}"] = best["launcher"] / best[method]
    # the final segmentations, voxel for voxel; on the CPU nnU-Net's numbers depend on torch's
    # thread count: the launcher's 2 workers on 2 cores run 1 thread each, like manual_1_thread
    for method in methods[:-1] if "launcher" in methods else []:
        result[f"segmentations_launcher_vs_{method}"] = compare(base / "launcher-0", base / f"{method}-0" / "final")
    return result


def make_realistic_model(folder: Path, folds: int) -> None:
    """nnU-Net's default 3d_fullres network shape (bench_gpu's CT plans) with random weights, one
    checkpoint per fold carrying SGD momentum buffers like a trained checkpoint_final.pth."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    bench_gpu, tiny = _load("bench_gpu"), _load("make_tiny_model")
    plans, dataset = bench_gpu.ct_plans(), tiny.dataset_dict(1)
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4))
    manager = PlansManager(plans)
    for fold in range(folds):
        torch.manual_seed(fold)
        network = nnUNetTrainer.build_network_architecture(
            manager, manager.get_configuration(tiny.CONFIGURATION), 1, 3, enable_deep_supervision=False
        )
        weights = network.state_dict()
        parameters = list(network.parameters())
        optimizer = {
            "state": {i: {"momentum_buffer": torch.randn_like(p) * 1e-3} for i, p in enumerate(parameters)},
            "param_groups": [{"lr": 1e-6, "momentum": 0.99, "nesterov": True, "params": list(range(len(parameters)))}],
        }
        (folder / f"fold_{fold}").mkdir()
        torch.save(
            {
                "network_weights": weights,
                "optimizer_state": optimizer,
                "trainer_name": tiny.TRAINER,
                "init_args": {"configuration": tiny.CONFIGURATION, "fold": fold},
                "inference_allowed_mirroring_axes": (0, 1, 2),
                "current_epoch": 1000,
            },
            folder / f"fold_{fold}" / "checkpoint_final.pth",
        )


def probe_load(folder: Path, folds: str, device: str, env: dict, reps: int) -> dict:
    """The fastest of `reps` fresh processes (the first also warms the page cache)."""
    runs = []
    for _ in range(reps + 1):
        done = subprocess.run(
            [sys.executable, "-c", LOAD_PROBE, str(folder), folds, device],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if done.returncode:
            raise SystemExit(f"load probe failed: {done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = min(runs[1:], key=lambda r: r["init_s"])
    checkpoints = [folder / f"fold_{f}" / "checkpoint_final.pth" for f in folds.split(",")]
    return {
        "folds": len(checkpoints),
        "checkpoint_mb_total": round(sum(c.stat().st_size for c in checkpoints) / 2**20, 1),
        "import_s": round(best["import_s"], 2),
        "init_s": round(best["init_s"], 3),
        # the first run is left out of the best: it warms the page cache (the files were just written)
        "init_s_all_runs": [round(r["init_s"], 3) for r in runs],
        "rss_increase_mb": round((best["rss_after"] - best["rss_before"]) / 2**20, 1),
        "rss_peak_mb": round(best["rss_peak"] / 2**20, 1),
        **(
            {"to_gpu_s": round(best["to_gpu_s"], 3), "gpu_allocated_mb": round(best["gpu_allocated"] / 2**20)}
            if "to_gpu_s" in best
            else {}
        ),
    }


def load_benchmark(base: Path, args) -> dict:
    env = {**os.environ}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    import make_stage_models

    results = base / "load-results"
    paths = make_stage_models.make_stage_models(str(results))
    measured = {
        f"tiny {m}": probe_load(Path(paths["models"][m]), "0", args.device, env, args.load_reps) for m in MEMBERS
    }
    realistic = base / "realistic" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    started = time.perf_counter()
    make_realistic_model(realistic, 5)
    measured["realistic 3d_fullres build_s"] = round(time.perf_counter() - started, 1)
    folds = ",".join(str(f) for f in range(5))
    measured["realistic 3d_fullres, 5 folds"] = probe_load(realistic, folds, args.device, env, args.load_reps)
    measured["realistic 3d_fullres, fold 0"] = probe_load(realistic, "0", args.device, env, args.load_reps)
    return measured


def machine() -> dict:
    facts = {
        "machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/meminfo") as f:
            facts["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each method, alternating (default 2)")
    parser.add_argument(
        "--cases", type=int, default=16, help="synthetic cases (make_tiny_model sizes, 24-64 voxels an edge)"
    )
    parser.add_argument("--tta", action="store_true", help="mirroring on (default: --disable_tta for every method)")
    parser.add_argument(
        "--parts", type=int, help="parallel processes / workers (default: 2 on the CPU, the GPUs on CUDA)"
    )
    parser.add_argument("-device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for one step or launcher run")
    parser.add_argument("--load-reps", type=int, default=2, help="fresh processes per model-load measurement")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {', '.join(METHODS)} (default: all; manual_1_thread only on the CPU)",
    )
    parser.add_argument("--only", choices=["chain", "load"], help="run one section")
    parser.add_argument("--work-dir", help="where models, cases and outputs go (default: a temp folder, removed)")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.parts = args.parts or (torch.cuda.device_count() if args.device == "cuda" else 2)
    torch.set_num_threads(1)  # this process only builds models and compares outputs
    base = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-stages-"))
    base.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {**machine(), "device": args.device}
    if not cuda:
        results["gpu"] = "no GPU (CUDA not available): no GPU busy time"
        print(results["gpu"], file=sys.stderr)
    try:
        if args.only in (None, "chain"):
            results["chain"] = chain_benchmark(base, args)
        if args.only in (None, "load"):
            results["model_load"] = load_benchmark(base, args)
        results["benchmark_s"] = round(time.perf_counter() - started, 1)
        results["load_average_at_end"] = os.getloadavg()
        print(json.dumps(results, indent=2))
    finally:
        if not args.work_dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
