"""Export-bound many-label benchmark: plain nnU-Net's export vs the launcher's `--profile fast`.

A model with 104 labels (background and 103 organs; random weights) and a small network (4 stages,
8-64 features, patch 32^3) at 2 mm, and CT-like anisotropic cases (36 x 160 x 160 voxels at
3.0 x 0.8 x 0.8 mm): each case's logits are 104 x 54 x 64 x 64 and nnU-Net's export resamples all
of them back with separate z, so plain nnU-Net is export-bound on this CPU as a GPU run of a
many-label model is (the network is cheap next to the export).

Per case, in this process with one torch thread (as each launcher worker on 2 cores): the
network's seconds; each export's seconds and peak host RAM above what was in use before it
(Linux's VmHWM, reset per export): plain nnU-Net's export_prediction_from_logits, the fast
profile's torch export on the CPU (what a CPU worker's export helper runs) and, with
--device cuda, on the GPU (what a GPU worker runs; the writing apart); the fast outputs'
agreement with plain's (share of equal voxels, Dice per label of at least 1,000 voxels, volume
per label). Then the launcher on the same cases with the exact and the fast profile, same
workers: wall, cases per hour, per-case seconds (and GPU busy % on a GPU); on a GPU also plain
nnUNetv2_predict_from_modelfolder.

    python scripts/bench_export.py [--cases 6] [--device cpu|cuda] [--workers 1] [--json-out FILE]
                                   [--work-dir DIR] [--deadline-s 900]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _load("make_tiny_model")
bench_gpu = _load("bench_gpu")

NUM_LABELS = 104
CASE_SHAPE = (36, 160, 160)  # z, y, x
CASE_SPACING = (3.0, 0.8, 0.8)
MODEL_SPACING = [2.0, 2.0, 2.0]
MIN_DICE_VOXELS = 1000  # random weights make many labels a few voxels big: Dice only from this size


# --- the model and the cases -------------------------------------------------------------------
def make_model(folder: Path, num_labels: int = NUM_LABELS) -> None:
    plans = bench_gpu.ct_plans()  # CT normalisation and intensity statistics
    small = tiny.plans_dict(1)["configurations"][tiny.CONFIGURATION]
    config = plans["configurations"][tiny.CONFIGURATION]
    config.update(architecture=small["architecture"], patch_size=small["patch_size"], spacing=MODEL_SPACING)
    config["median_image_size_in_voxels"] = [54, 64, 64]
    save_ct_model(folder, plans, CASE_SPACING, num_labels)


def save_ct_model(folder: Path, plans: dict, case_spacing, num_labels: int) -> None:
    """A one-channel CT model with these plans: its dataset.json, plans.json and random weights (fold 0)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans["original_median_spacing_after_transp"] = list(case_spacing)
    dataset = tiny.dataset_dict(1)
    dataset["labels"] = {"background": 0, **{f"organ_{i}": i for i in range(1, num_labels)}}
    dataset["channel_names"] = {"0": "CT"}
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4))
    tiny.save_checkpoints(str(folder), PlansManager(plans), tiny.CONFIGURATION, 1, num_labels, (0,), seed=0)


def make_cases(folder: Path, count: int) -> list[str]:
    """A body (soft tissue), organs of varied intensity, bone, air around, noise: CT-like HU."""
    folder.mkdir(parents=True)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in CASE_SHAPE], indexing="ij")
    ids = []
    for i in range(count):
        rng = np.random.default_rng(i)
        volume = np.full(CASE_SHAPE, -1000.0)
        volume[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40
        for _ in range(12):
            cz, cy, cx = rng.uniform(-0.6, 0.6, 3)
            r = rng.uniform(0.1, 0.3)
            volume[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(-100, 300)
        volume[((x - 0.1) ** 2 + (y + 0.4) ** 2) < 0.01] = 900  # a spine
        volume += rng.normal(0, 20, CASE_SHAPE)
        image = sitk.GetImageFromArray(volume.astype(np.int16))
        image.SetSpacing(CASE_SPACING[::-1])
        case_id = f"ct_{i:03d}"
        sitk.WriteImage(image, str(folder / f"{case_id}_0000.nii.gz"))
        ids.append(case_id)
    return ids


# --- one export in a fresh process: its seconds and peak host memory ----------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def export_child(kind: str, model: str, logits_file: str, properties_file: str, output_base: str) -> None:
    """Runs in a fresh process (memory freed by an earlier export would hide a later one's peak):
    the logits loaded, then the export alone measured. Linux: writing 5 to clear_refs resets VmHWM."""
    import pickle

    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from launcher import fast_profile

    torch.set_num_threads(1)
    plans = PlansManager(json.loads((Path(model) / "plans.json").read_text()))
    dataset = json.loads((Path(model) / "dataset.json").read_text())
    logits = np.load(logits_file)
    with open(properties_file, "rb") as f:
        properties = pickle.load(f)
    function = export_prediction_from_logits if kind == "plain" else fast_profile.export_from_logits
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    function(logits, properties, plans.get_configuration(tiny.CONFIGURATION), plans, dataset, output_base, False, 1)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": round(seconds, 2), "peak_mib": round((_status_kib("VmHWM") - before) / 1024, 1)}))


def measure_export(kind: str, model: Path, logits_file: Path, properties_file: Path, output_base: Path) -> dict:
    command = [sys.executable, __file__, "--export-child", kind, str(model), str(logits_file), str(properties_file)]
    done = subprocess.run([*command, str(output_base)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- what both benchmarks share ----------------------------------------------------------------
def launcher_arguments(parser: argparse.ArgumentParser, deadline_s: float) -> None:
    parser.add_argument("-device", "--device", dest="device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=1, help="launcher workers with --device cpu")
    parser.add_argument("--json-out", help="also write the results here (rewritten as they come)")
    parser.add_argument("--work-dir", help="model, cases and outputs (default: a temp folder, removed)")
    parser.add_argument("--deadline-s", type=float, default=deadline_s, help="the launcher runs stop by then")
    parser.add_argument("--skip-launcher", action="store_true", help="per-case measurements only")


def work_folder(args, prefix: str) -> Path:
    """--work-dir or a temp folder; the launcher's processes import this checkout."""
    base = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix=prefix))
    base.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    )
    return base


def where_and_when(args) -> dict:
    return {
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
    }


# --- per case, in this process -----------------------------------------------------------------
def predictor(model: Path, device: str):
    """nnU-Net's predictor for the benchmark's model (fold 0, no mirroring) on one torch thread."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(1)
    p = nnUNetPredictor(
        use_mirroring=False,
        perform_everything_on_device=device == "cuda",
        device=torch.device(device),
        allow_tqdm=False,
    )
    p.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    return p


def per_case(model: Path, inputs: Path, ids: list[str], work: Path, device: str) -> list[dict]:
    import torch

    p = predictor(model, device)
    label_manager = p.plans_manager.get_label_manager(p.dataset_json)
    preprocessor = p.configuration_manager.preprocessor_class(verbose=False)
    exports = {"plain": work / "plain", "fast_cpu": work / "fast_cpu", "fast_cuda": work / "fast_cuda"}
    for folder in exports.values():
        folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for case_id in ids:
        data, _, props = preprocessor.run_case(
            [str(inputs / f"{case_id}_0000.nii.gz")], None, p.plans_manager, p.configuration_manager, p.dataset_json
        )
        row = {"case": case_id, "logits_shape": None}
        started = time.perf_counter()
        logits = p.predict_logits_from_preprocessed_data(torch.from_numpy(data))
        _sync(device)
        row["network_s"] = round(time.perf_counter() - started, 2)
        host_logits = logits.cpu().numpy()
        row["logits_shape"] = list(host_logits.shape)
        del logits
        logits_file, properties_file = work / f"{case_id}.logits.npy", work / f"{case_id}.properties.pkl"
        np.save(logits_file, host_logits)
        with properties_file.open("wb") as f:
            pickle.dump(props, f)
        for name in ("plain", "fast_cpu"):
            measured = measure_export(name, model, logits_file, properties_file, exports[name] / case_id)
            row[f"{name}_export_s"], row[f"{name}_peak_host_mib"] = measured["seconds"], measured["peak_mib"]
        if device == "cuda":
            row.update(_export_on_gpu(host_logits, props, p, label_manager, str(exports["fast_cuda"] / case_id)))
        for name in ("fast_cpu", "fast_cuda") if device == "cuda" else ("fast_cpu",):
            row[f"{name}_agreement"] = agreement(
                exports["plain"] / f"{case_id}.nii.gz", exports[name] / f"{case_id}.nii.gz"
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _export_on_gpu(host_logits, props, p, label_manager, output_base: str) -> dict:
    """What a GPU worker of the fast profile does: logits on the GPU (as its prediction leaves
    them), the segmentation made there and copied to the host; then the helper's writing."""
    import torch

    from launcher import fast_profile

    logits = torch.from_numpy(host_logits).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    segmentation, _ = fast_profile.segment(
        logits, props, p.configuration_manager, p.plans_manager, label_manager, False, 1
    )
    seconds = time.perf_counter() - started  # ends with the copy to the host: synchronised
    peak = torch.cuda.max_memory_allocated() - before
    del logits
    started = time.perf_counter()
    fast_profile.write_segmentation(segmentation, None, props, p.plans_manager, p.dataset_json, output_base)
    return {
        "fast_cuda_export_s": round(seconds, 3),
        "fast_cuda_write_s": round(time.perf_counter() - started, 2),
        "fast_cuda_peak_device_mib": round(peak / 2**20, 1),
    }


def agreement(plain: Path, fast: Path) -> dict:
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(plain)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(fast)))
    labels = np.union1d(np.unique(a), np.unique(b))
    counts_a = np.bincount(a.ravel(), minlength=int(labels.max()) + 1)
    counts_b = np.bincount(b.ravel(), minlength=int(labels.max()) + 1)
    both = np.bincount(a.ravel()[a.ravel() == b.ravel()], minlength=int(labels.max()) + 1)
    big = [int(label) for label in labels if counts_a[label] >= MIN_DICE_VOXELS]
    dice = {label: 2 * both[label] / (counts_a[label] + counts_b[label]) for label in big}
    volume = {label: abs(int(counts_b[label]) - int(counts_a[label])) / counts_a[label] for label in big}
    worst = min(dice, key=dice.get) if dice else None
    return {
        "equal_voxels_pct": round(100 * float(np.mean(a == b)), 3),
        "labels_present": int(np.count_nonzero(counts_a[1:])),
        "labels_1000_voxels": len(big),
        "min_dice": round(float(dice[worst]), 4) if dice else None,
        "min_dice_label": worst,
        "max_volume_diff_pct": round(100 * max(volume.values()), 2) if volume else None,
    }


def runs_agreement(exact_out: Path, fast_out: Path) -> dict | None:
    """End to end (input resampling and export): the fast run's outputs against the exact run's,
    over the cases both wrote; the worst case's figures."""
    pairs = [(p, fast_out / p.name) for p in sorted(exact_out.glob("*.nii.gz"))]
    found = [agreement(exact, fast) for exact, fast in pairs if fast.exists()]
    if not found:
        return None
    dice = [a["min_dice"] for a in found if a["min_dice"] is not None]
    return {
        "cases": len(found),
        "min_equal_voxels_pct": min(a["equal_voxels_pct"] for a in found),
        "min_dice": min(dice) if dice else None,
        "max_volume_diff_pct": max(a["max_volume_diff_pct"] or 0 for a in found),
    }


# --- through the launcher ------------------------------------------------------------------------
def launcher_run(model: Path, inputs: Path, out: Path, profile: str, args, timeout: float) -> dict:
    device = ["-device", args.device] + (["--workers", str(args.workers)] if args.device == "cpu" else [])
    command = [sys.executable, "-m", "launcher", "run", "-i", str(inputs), "-o", str(out), "-m", str(model)]
    command += ["-f", "0", "--disable_tta", *device, "--profile", profile]
    result = bench_gpu.measure(command, args.cases, timeout, args.device == "cuda", out.parent / f"{out.name}.log")
    result["cases_per_hour"] = round(result.pop("cases_per_min") * 60, 1) if result.get("cases_per_min") else None
    cases_csv = out / ".nnunet-launch" / "cases.csv"
    if cases_csv.exists():
        with cases_csv.open() as f:
            rows = list(csv.DictReader(f))
        seconds = [float(r["seconds"]) for r in rows if r.get("seconds")]
        result["case_seconds_mean"] = round(float(np.mean(seconds)), 2) if seconds else None
        # from the first case's start to the last case's end: the rate once the workers are up
        # (start-up, the same for both profiles, is in `seconds`)
        spans = [(_epoch(r["started"]), _epoch(r["ended"])) for r in rows if r.get("started") and r.get("ended")]
        if spans:
            busy = max(e for _, e in spans) - min(s for s, _ in spans)
            result["cases_per_hour_after_start"] = round(len(spans) * 3600 / busy, 1)
        summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
        result["profile_in_summary"] = summary.get("profile")
    return result


def _epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def plain_run(model: Path, inputs: Path, out: Path, args, timeout: float) -> dict:
    command = [sys.executable, "-c", bench_gpu.PLAIN_NNUNET, "-i", str(inputs), "-o", str(out), "-m", str(model)]
    command += ["-f", "0", "--disable_tta", "-device", args.device]
    result = bench_gpu.measure(command, args.cases, timeout, args.device == "cuda", out.parent / "plain.log")
    result["cases_per_hour"] = round(result.pop("cases_per_min") * 60, 1) if result.get("cases_per_min") else None
    return result


def summarize(rows: list[dict]) -> dict:
    def mean(key: str):
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(float(np.mean(values)), 3) if values else None

    summary = {k: mean(k) for k in rows[0] if k.endswith(("_s", "_mib"))}
    for name in ("fast_cpu", "fast_cuda"):
        found = [r[f"{name}_agreement"] for r in rows if f"{name}_agreement" in r]
        if found:
            summary[f"{name}_min_equal_voxels_pct"] = min(a["equal_voxels_pct"] for a in found)
            dice = [a["min_dice"] for a in found if a["min_dice"] is not None]
            summary[f"{name}_min_dice"] = min(dice) if dice else None
            summary[f"{name}_max_volume_diff_pct"] = max(a["max_volume_diff_pct"] or 0 for a in found)
            summary[f"{name}_export_speedup"] = round(summary["plain_export_s"] / summary[f"{name}_export_s"], 1)
            summary[f"{name}_peak_host_ratio"] = (
                round(summary[f"{name}_peak_host_mib"] / summary["plain_peak_host_mib"], 3)
                if summary.get(f"{name}_peak_host_mib") is not None
                else None
            )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--labels", type=int, default=NUM_LABELS, help="the model's labels, background included")
    launcher_arguments(parser, deadline_s=900)
    parser.add_argument("--export-child", nargs=5, help=argparse.SUPPRESS)  # see export_child
    args = parser.parse_args()
    if args.export_child:
        export_child(*args.export_child)
        return
    start = time.perf_counter()
    base = work_folder(args, "bench-export-")
    results: dict = {
        **where_and_when(args),
        "cases": args.cases,
        "model": f"{args.labels} labels, 4 stages 8-64 features, patch 32^3, 2 mm; random weights; --disable_tta",
        "case": f"{'x'.join(map(str, CASE_SHAPE))} voxels at {'x'.join(map(str, CASE_SPACING))} mm (CT-like)",
    }

    def save() -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2))

    try:
        model, inputs = base / "model", base / "inputs"
        if not model.exists():
            make_model(model, args.labels)
            make_cases(inputs, args.cases)
        ids = sorted(p.name[: -len("_0000.nii.gz")] for p in inputs.glob("*_0000.nii.gz"))[: args.cases]
        results["per_case"] = per_case(model, inputs, ids, base / "exports", args.device)
        results["summary"] = summarize(results["per_case"])
        save()
        if not args.skip_launcher:
            runs = results["launcher"] = {}
            for profile in ("exact", "fast"):
                left = args.deadline_s - (time.perf_counter() - start)
                runs[profile] = launcher_run(model, inputs, base / f"launcher-{profile}", profile, args, left)
                save()
            if args.device == "cuda":
                runs["plain_nnunet"] = plain_run(
                    model, inputs, base / "plain", args, args.deadline_s - (time.perf_counter() - start)
                )
            for key in ("cases_per_hour", "cases_per_hour_after_start"):
                exact, fast = runs["exact"].get(key), runs["fast"].get(key)
                ratio = round(fast / exact, 2) if exact and fast else None
                results["summary"][f"launcher_fast_vs_exact_{key}"] = ratio
            results["summary"]["launcher_fast_vs_exact_agreement"] = runs_agreement(
                base / "launcher-exact", base / "launcher-fast"
            )
            if "plain_nnunet" in runs:  # the GPU goal: cases per hour per GPU against plain nnU-Net
                plain, fast = runs["plain_nnunet"].get("cases_per_hour"), runs["fast"].get("cases_per_hour")
                results["summary"]["launcher_fast_vs_plain_cases_per_hour"] = (
                    round(fast / plain, 2) if plain and fast else None
                )
            save()
    finally:
        results["total_s"] = round(time.perf_counter() - start, 1)
        save()
        if not args.work_dir:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(results["summary"] if "summary" in results else results, indent=2))
    for name, run in results.get("launcher", {}).items():
        print(name, json.dumps({k: v for k, v in run.items() if k != "output_tail"}))


if __name__ == "__main__":
    main()
