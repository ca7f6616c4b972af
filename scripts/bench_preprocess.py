"""Preprocessing-bound benchmark: every stage of a case against the network, exact vs `--profile fast`.

Fine CT-like scans at 0.7 x 0.7 x 1.0 mm (one a whole CT, 512 x 512 x 300 voxels; the others a
quarter of it) for a small network at 1.5 mm with few labels (random weights): nnU-Net's cubic
input resampling (skimage, order 3, float64, one core) costs more than the network here, as it
does next to a GPU.

Per case, in this process with one torch thread and the launcher's host memory settings
(launcher/host_memory.py, as in its worker and helpers), the seconds of each stage: read, crop
(nnU-Net's; the fast profile's, the same crop with launcher.hole_filling, and whether it is
identical), normalize, resample (nnU-Net's function, and its resampling of the crop's mask, which
inference drops and the fast profile skips; the fast profile's
launcher.spline_resample on the CPU and, with --device cuda, on the GPU), network, export (plain:
nnU-Net's export_prediction_from_logits with its write; fast: fast_profile.segment on the CPU or the
device) and the fast export's write; the preprocessed arrays' max |difference| (normalized units);
the agreement (share of equal voxels, Dice per label of at least 1,000 voxels) of the fast export
with plain's on the same logits, and of the network's result on the fast input with its result on
nnU-Net's input (both exported the fast way): each change on its own. Then the launcher over the
same cases with each profile, same workers, alternating (--launcher-repeats rounds; each profile's
best run counts): wall, cases per hour, and the fast run's outputs against the exact run's (end to
end: input resampling and export).

    python scripts/bench_preprocess.py [--quarter-cases 3] [--launcher-repeats 2] [--device cpu|cuda] [--workers 1]
                                       [--json-out FILE] [--work-dir DIR] [--deadline-s 1800]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_export  # noqa: E402
import bench_gpu  # noqa: E402
import make_tiny_model as tiny  # noqa: E402

NUM_LABELS = 5
WHOLE_CT = (300, 512, 512)  # z, y, x
QUARTER_CT = (150, 256, 256)
CASE_SPACING = (1.0, 0.7, 0.7)  # z, y, x
MODEL_SPACING = [1.5, 1.5, 1.5]


def make_model(folder: Path) -> None:
    plans = bench_gpu.ct_plans()  # CT normalisation and intensity statistics
    small = tiny.plans_dict(1)["configurations"][tiny.CONFIGURATION]
    config = plans["configurations"][tiny.CONFIGURATION]
    # a CT model's patch, with a network far thinner than a real one, so that on the CPU, as next to a GPU, it is
    # cheap beside the stages around it: 5 stages of 2-16 features, one convolution each
    architecture = small["architecture"]
    architecture["arch_kwargs"].update(
        n_stages=5,
        features_per_stage=[2, 4, 8, 16, 16],
        kernel_sizes=[[3, 3, 3]] * 5,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 4,
        n_conv_per_stage=[1] * 5,
        n_conv_per_stage_decoder=[1] * 4,
    )
    config.update(architecture=architecture, patch_size=[96, 160, 160], spacing=MODEL_SPACING)
    config["median_image_size_in_voxels"] = [200, 239, 239]
    bench_export.save_ct_model(folder, plans, CASE_SPACING, NUM_LABELS)


def make_cases(folder: Path, quarter_cases: int) -> list[str]:
    """A body (soft tissue) in air, organs of varied intensity, a spine, noise: CT-like HU."""
    folder.mkdir(parents=True)
    ids = []
    for i, shape in enumerate([WHOLE_CT] + [QUARTER_CT] * quarter_cases):
        rng = np.random.default_rng(i)
        z, y, x = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
        volume = np.full(shape, -1000.0, dtype=np.float32)
        volume[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40
        for _ in range(8):
            cz, cy, cx = rng.uniform(-0.6, 0.6, 3)
            r = rng.uniform(0.1, 0.3)
            volume[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(-100, 300)
        volume[((x - 0.1) ** 2 + (y + 0.4) ** 2) < 0.01] = 900
        volume += rng.normal(0, 20, shape).astype(np.float32)
        image = sitk.GetImageFromArray(volume.astype(np.int16))
        image.SetSpacing(CASE_SPACING[::-1])
        case_id = f"ct_{i:03d}_{'whole' if shape == WHOLE_CT else 'quarter'}"
        sitk.WriteImage(image, str(folder / f"{case_id}_0000.nii.gz"))
        ids.append(case_id)
    return ids


def _timed(row: dict, key: str, function, *args, sync: str = "cpu"):
    started = time.perf_counter()
    result = function(*args)
    bench_export._sync(sync)
    row[key] = round(time.perf_counter() - started, 3)
    return result


def crop_as_fast_helpers_do(data: np.ndarray):
    """nnU-Net's crop_to_nonzero with the hole filling a fast profile's helper gives it, in this process for
    this call only (the plain crop keeps scipy's)."""
    from nnunetv2.preprocessing.cropping import cropping

    from launcher import fast_profile

    plain = cropping.binary_fill_holes
    fast_profile.use_fast_hole_filling()
    try:
        return cropping.crop_to_nonzero(data, None)
    finally:
        cropping.binary_fill_holes = plain


def per_case(model: Path, inputs: Path, ids: list[str], work: Path, device: str) -> list[dict]:
    """Each stage by itself, in the order nnU-Net's run_case_npy and its export run them."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    from launcher import fast_profile, host_memory, spline_resample

    host_memory.reuse_freed_memory()  # as in the launcher's worker and helpers: no stage pays page faults anew
    p = bench_export.predictor(model, device)
    plans_manager, configuration_manager = p.plans_manager, p.configuration_manager
    label_manager = plans_manager.get_label_manager(p.dataset_json)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    kwargs = fast_profile.input_resampling(configuration_manager)
    folders = {name: work / name for name in ("plain", "fast", "fast_input")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for case_id in ids:
        row: dict = {"case": case_id}
        reader = plans_manager.image_reader_writer_class()
        data, props = _timed(row, "read_s", reader.read_images, [str(inputs / f"{case_id}_0000.nii.gz")])
        data = data.astype(np.float32).transpose([0, *[i + 1 for i in plans_manager.transpose_forward]])
        spacing = [props["spacing"][i] for i in plans_manager.transpose_forward]
        props["shape_before_cropping"] = data.shape[1:]
        read = data
        data, seg, bbox = _timed(row, "crop_s", crop_to_nonzero, read, None)
        fast_crop = _timed(row, "crop_fast_s", crop_as_fast_helpers_do, read)
        same = [np.array_equal(a, b) for a, b in zip(fast_crop, (data, seg, bbox), strict=True)]
        row["crop_fast_identical"] = all(same)
        props["bbox_used_for_cropping"] = bbox
        props["shape_after_cropping_and_before_resampling"] = data.shape[1:]
        new_shape = compute_new_shape(data.shape[1:], spacing, configuration_manager.spacing)
        intensities = plans_manager.foreground_intensity_properties_per_channel
        data = _timed(row, "normalize_s", preprocessor._normalize, data, seg, configuration_manager, intensities)
        resample = configuration_manager.resampling_fn_data
        plain = _timed(row, "resample_plain_s", resample, data, new_shape, spacing, configuration_manager.spacing)
        # nnU-Net then resamples the crop's mask, which inference drops; a fast profile's helper skips it
        _timed(row, "resample_mask_s", configuration_manager.resampling_fn_seg, seg, new_shape, spacing,
               configuration_manager.spacing)  # fmt: skip
        resample_fast = partial(spline_resample.resample_image, new_shape=new_shape, current_spacing=spacing,
                                new_spacing=configuration_manager.spacing, **kwargs)  # fmt: skip
        fast = _timed(row, "resample_fast_cpu_s", resample_fast, torch.from_numpy(data))
        row["resample_fast_cpu_max_abs_diff"] = float(np.abs(fast.numpy() - plain).max())
        if device == "cuda":  # the matrices built on the CPU included, as for each new shape in a run
            on_gpu = _timed(row, "resample_fast_cuda_s", resample_fast, torch.from_numpy(data).cuda(), sync="cuda")
            row["resample_fast_cuda_max_abs_diff"] = float(np.abs(on_gpu.cpu().numpy() - plain).max())
        row["shape"], row["resampled_shape"] = list(data.shape[1:]), [int(n) for n in new_shape]
        network = p.predict_logits_from_preprocessed_data
        logits = _timed(row, "network_s", network, torch.from_numpy(plain), sync=device)
        host = logits.cpu()
        whole = (configuration_manager, plans_manager, p.dataset_json)
        _timed(row, "export_plain_s", export_prediction_from_logits, host.numpy(), props, *whole,
               str(folders["plain"] / case_id), False)  # fmt: skip
        on_device = logits if device == "cuda" else host
        segmentation = _timed(row, "export_fast_s", fast_profile.segment, on_device, props, configuration_manager,
                              plans_manager, label_manager, False, 1, sync=device)  # fmt: skip
        _timed(row, "write_fast_s", fast_profile.write_segmentation, *segmentation, props, plans_manager,
               p.dataset_json, str(folders["fast"] / case_id))  # fmt: skip
        row["export_agreement"] = bench_export.agreement(
            folders["plain"] / f"{case_id}.nii.gz", folders["fast"] / f"{case_id}.nii.gz"
        )
        # the input's resampling alone: the network on the fast profile's input, exported the same way
        from_fast_input = network(fast.to(logits.device))
        segmentation = fast_profile.segment(from_fast_input, props, configuration_manager, plans_manager,
                                            label_manager, False, 1)  # fmt: skip
        fast_profile.write_segmentation(*segmentation, props, plans_manager, p.dataset_json,
                                        str(folders["fast_input"] / case_id))  # fmt: skip
        row["input_resampling_agreement"] = bench_export.agreement(
            folders["fast"] / f"{case_id}.nii.gz", folders["fast_input"] / f"{case_id}.nii.gz"
        )
        plain_stages = ("crop_s", "normalize_s", "resample_plain_s", "resample_mask_s")
        row["preprocess_plain_s"] = round(sum(row[stage] for stage in plain_stages), 3)
        row["preprocess_fast_cpu_s"] = round(row["crop_fast_s"] + row["normalize_s"] + row["resample_fast_cpu_s"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quarter-cases", type=int, default=3, help="quarter-size cases besides the whole CT")
    parser.add_argument("--launcher-repeats", type=int, default=2, help="launcher runs per profile (the best counts)")
    bench_export.launcher_arguments(parser, deadline_s=1800)
    args = parser.parse_args()
    args.cases = 1 + args.quarter_cases  # what bench_export.launcher_run counts
    start = time.perf_counter()
    base = bench_export.work_folder(args, "bench-preprocess-")
    results: dict = {
        **bench_export.where_and_when(args),
        "model": f"{NUM_LABELS} labels, 5 stages 2-16 features, patch 96x160x160, 1.5 mm; random weights; no TTA",
        "cases": f"1 x {'x'.join(map(str, WHOLE_CT))} + {args.quarter_cases} x {'x'.join(map(str, QUARTER_CT))} "
        f"voxels (z, y, x) at {'x'.join(map(str, CASE_SPACING))} mm (CT-like)",
    }

    def save() -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2))

    try:
        model, inputs = base / "model", base / "inputs"
        if not model.exists():
            make_model(model)
            make_cases(inputs, args.quarter_cases)
        ids = sorted(p.name[: -len("_0000.nii.gz")] for p in inputs.glob("*_0000.nii.gz"))
        rows = results["per_case"] = per_case(model, inputs, ids, base / "stages", args.device)
        totals = {k: round(sum(r[k] for r in rows), 2) for k in rows[0] if k.endswith("_s")}
        results["summary"] = {
            "stage_seconds_all_cases": totals,
            "preprocess_speedup_cpu": round(totals["preprocess_plain_s"] / totals["preprocess_fast_cpu_s"], 1),
            "resample_speedup_cpu": round(totals["resample_plain_s"] / totals["resample_fast_cpu_s"], 1),
            "crop_speedup": round(totals["crop_s"] / totals["crop_fast_s"], 1),
            "crop_fast_identical": all(r["crop_fast_identical"] for r in rows),
            "max_abs_diff_preprocessed": max(v for r in rows for k, v in r.items() if k.endswith("_max_abs_diff")),
            **{
                f"{what}_{key}": worst(r[what][key] for r in rows if r[what][key] is not None)
                for what in ("export_agreement", "input_resampling_agreement")
                for key, worst in (("equal_voxels_pct", min), ("min_dice", min), ("max_volume_diff_pct", max))
            },
        }
        if args.device == "cuda":
            results["summary"]["resample_speedup_cuda_vs_one_core"] = round(
                totals["resample_plain_s"] / totals["resample_fast_cuda_s"], 1
            )
        save()
        if not args.skip_launcher:
            # the profiles alternate, each run into a new OUT; each profile's best run counts (this
            # VM's speed varies between runs with its memory's state: up to 1.5x seen)
            tries = results["launcher_runs"] = []
            for attempt in range(args.launcher_repeats):
                for profile in ("exact", "fast"):
                    left = args.deadline_s - (time.perf_counter() - start)
                    out = base / f"launcher-{profile}-{attempt}"
                    shutil.rmtree(out, ignore_errors=True)
                    tries.append(
                        {"profile": profile, **bench_export.launcher_run(model, inputs, out, profile, args, left)}
                    )
                    save()
            runs = results["launcher"] = {
                profile: max((t for t in tries if t["profile"] == profile), key=lambda t: t.get("cases_per_hour") or 0)
                for profile in ("exact", "fast")
            }
            for key in ("cases_per_hour", "cases_per_hour_after_start"):
                exact, fast = runs["exact"].get(key), runs["fast"].get(key)
                results["summary"][f"launcher_fast_vs_exact_{key}"] = round(fast / exact, 2) if exact and fast else None
            results["summary"]["launcher_fast_vs_exact_agreement"] = bench_export.runs_agreement(
                base / "launcher-exact-0", base / "launcher-fast-0"
            )
            save()
    finally:
        results["total_s"] = round(time.perf_counter() - start, 1)
        save()
        if not args.work_dir:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(results.get("summary", results), indent=2))
    for name, run in results.get("launcher", {}).items():
        print(name, json.dumps({k: v for k, v in run.items() if k != "output_tail"}))


if __name__ == "__main__":
    main()
