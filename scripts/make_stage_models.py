"""Make a tiny but real nnU-Net v2 results tree with all four configurations, an ensemble and postprocessing.

`RESULTS/Dataset998_Stages/` gets one model folder per configuration (2d, 3d_fullres, 3d_lowres and
3d_cascade_fullres, all sharing one plans.json), seeded random weights built the way nnU-Net builds
each network for inference (the cascade takes the image plus one channel per foreground label), and
what `nnUNetv2_find_best_configuration` would leave behind after picking the 2d + 3d_fullres ensemble:
`ensembles/<name>/postprocessing.pkl` (keep the largest "organ" component), a plans.json and a
dataset.json next to it, and `inference_information.json`. The Dice values in it are made up.

    python scripts/make_stage_models.py --results DIR [--inputs DIR --cases 4] [--folds 0 1]

Then, with nnUNet_results=DIR, nnU-Net's own commands work unchanged: `nnUNetv2_predict -d 998 -c 2d`
(or 3d_fullres, or 3d_lowres followed by `-c 3d_cascade_fullres -prev_stage_predictions LOWRES_OUT`),
`nnUNetv2_ensemble` and `nnUNetv2_apply_postprocessing`. The models allow mirroring like trained ones;
`--disable_tta` makes 3D prediction about 8 times faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from copy import deepcopy

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny_model as tiny  # noqa: E402

DATASET = "Dataset998_Stages"
PLANS = "nnUNetPlans"
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
ENSEMBLE_MEMBERS = ("2d", "3d_fullres")
MIRROR_AXES = {"2d": (0, 1)}  # nnU-Net stores the axes of the patch, which has two in 2d


def model_name(configuration: str) -> str:
    return f"{tiny.TRAINER}__{PLANS}__{configuration}"


def ensemble_name(first: str, second: str, folds) -> str:
    # nnunetv2.utilities.file_path_utilities.get_ensemble_name, without importing nnunetv2.paths
    return "___".join(["ensemble", model_name(first), model_name(second), "_".join(map(str, folds))])


def plans_dict(num_channels: int = 1) -> dict:
    """make_tiny_model's 3d_fullres plus the three configurations a real multi-stage plan has."""
    plans = tiny.plans_dict(num_channels)
    plans["dataset_name"] = DATASET
    fullres = plans["configurations"]["3d_fullres"]
    # Half make_tiny_model's width and one conv per stage, because Conv3d is slow on CPU and
    # mirroring runs every patch 8 times. Narrower (2 features) is faster still, but its random
    # output is one label nearly everywhere, which leaves postprocessing nothing to remove.
    # A 48^3 patch covers a 40^3 case in one tile; the bigger synthetic cases still slide.
    fullres["patch_size"] = [48, 48, 48]
    fullres["architecture"]["arch_kwargs"].update(
        features_per_stage=[4, 8, 16, 32], n_conv_per_stage=[1] * 4, n_conv_per_stage_decoder=[1] * 3
    )

    # Coarser spacing so that lowres really resamples (a 40^3 case becomes 20^3) and the cascade
    # has to bring its segmentation back to full resolution.
    lowres = deepcopy(fullres)
    lowres.update(
        data_identifier=f"{PLANS}_3d_lowres",
        patch_size=[32, 32, 32],
        spacing=[2.0, 2.0, 2.0],
        median_image_size_in_voxels=[20, 20, 20],
        next_stage="3d_cascade_fullres",
    )

    # One 64^2 tile covers a whole slice of the synthetic cases, so 2d costs one pass per slice.
    planar = deepcopy(fullres)
    arch = planar["architecture"]["arch_kwargs"]
    arch.update(
        conv_op="torch.nn.modules.conv.Conv2d",
        norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
        kernel_sizes=[[3, 3]] * 4,
        strides=[[1, 1], [2, 2], [2, 2], [2, 2]],
    )
    planar.update(
        data_identifier=f"{PLANS}_2d",
        batch_size=12,
        patch_size=[64, 64],
        median_image_size_in_voxels=[40, 40],
        spacing=[1.0, 1.0],
    )

    plans["configurations"] = {
        "2d": planar,
        "3d_fullres": fullres,
        "3d_lowres": lowres,
        # exactly what nnU-Net's ExperimentPlanner writes for the cascade
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
    }
    return plans


def make_model(folder: str, plans: dict, dataset: dict, configuration: str, folds, seed: int) -> None:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    write_json(plans, folder, "plans.json")
    write_json(dataset, folder, "dataset.json")
    plans_manager = PlansManager(plans)
    # the same two calls nnUNetPredictor.initialize_from_trained_model_folder makes
    num_inputs = determine_num_input_channels(plans_manager, plans_manager.get_configuration(configuration), dataset)
    num_outputs = plans_manager.get_label_manager(dataset).num_segmentation_heads
    axes = MIRROR_AXES.get(configuration, (0, 1, 2))
    tiny.save_checkpoints(folder, plans_manager, configuration, num_inputs, num_outputs, folds, seed, axes)


def inference_information(dataset_folder: str, ensemble_folder: str, folds) -> dict:
    """The dict find_best_configuration saves, for a run that considered all four configurations."""
    models = [{"plans": PLANS, "configuration": c, "trainer": tiny.TRAINER} for c in CONFIGURATIONS]
    all_results = {model_name(c): 0.5 + 0.05 * i for i, c in enumerate(CONFIGURATIONS)}
    for i, first in enumerate(CONFIGURATIONS):  # every pair, in find_best_configuration's order
        for second in CONFIGURATIONS[i + 1 :]:
            all_results[ensemble_name(first, second, folds)] = 0.6
    all_results[os.path.basename(ensemble_folder)] = 0.8  # the winner
    return {
        "folds": list(folds),
        "dataset_name_or_id": DATASET,  # the entry point passes the name, not the id
        "considered_models": models,
        "ensembling_allowed": True,
        "all_results": all_results,
        "best_model_or_ensemble": {
            "result_on_crossval_pre_pp": 0.8,
            "result_on_crossval_post_pp": 0.81,
            "postprocessing_file": os.path.join(ensemble_folder, "postprocessing.pkl"),
            "some_plans_file": os.path.join(ensemble_folder, "plans.json"),
            "selected_model_or_models": [
                {"configuration": c, "trainer": tiny.TRAINER, "plans_identifier": PLANS} for c in ENSEMBLE_MEMBERS
            ],
        },
    }


def make_stage_models(results_dir: str, folds=(0,), seed: int = 0) -> dict:
    """Write `results_dir/Dataset998_Stages/` and return the paths a test needs."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    folds = tuple(folds)
    # absolute, because find_best_configuration writes absolute paths into inference_information.json
    dataset_folder = os.path.join(os.path.abspath(results_dir), DATASET)
    plans, dataset = plans_dict(1), tiny.dataset_dict(1)
    models = {}
    for index, configuration in enumerate(CONFIGURATIONS):
        models[configuration] = os.path.join(dataset_folder, model_name(configuration))
        # far-apart seeds so that no two configurations (or folds) share weights
        make_model(models[configuration], plans, dataset, configuration, folds, seed + 1000 * index)

    ensemble_folder = os.path.join(dataset_folder, "ensembles", ensemble_name(*ENSEMBLE_MEMBERS, folds))
    # find_best_configuration copies the first member's plans.json and dataset.json here
    write_json(plans, ensemble_folder, "plans.json")
    write_json(dataset, ensemble_folder, "dataset.json")
    pp_pkl = os.path.join(ensemble_folder, "postprocessing.pkl")
    # pickled by reference: loading it needs nnunetv2, exactly like a real one
    # the label as numpy's int64, as determine_postprocessing takes it from the LabelManager
    pp = ([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": np.int64(1)}])
    save_pickle(pp, pp_pkl)
    info = write_json(
        inference_information(dataset_folder, ensemble_folder, folds), dataset_folder, "inference_information.json"
    )
    return {
        "dataset": dataset_folder,
        "models": models,
        "ensemble": ensemble_folder,
        "postprocessing_pkl": pp_pkl,
        "plans_json": os.path.join(ensemble_folder, "plans.json"),
        "inference_information": info,
    }


# nnUNetv2_predict with torch held to one thread: on the CPU nnU-Net sets torch to every core and
# its numbers depend on the thread count; the launcher's workers get one thread each on 2 cores
ONE_THREAD_PREDICT = (
    "import sys, torch\n"
    "set_threads = torch.set_num_threads\n"
    "torch.set_num_threads = lambda n: set_threads(1)\n"
    "from nnunetv2.inference.predict_from_raw_data import predict_entry_point\n"
    "sys.argv[0] = 'nnUNetv2_predict'\n"
    "predict_entry_point()\n"
)


def make_stage_world(base: str, cases: int) -> dict:
    """The models under `base`/results, `cases` synthetic inputs under `base`/inputs, and the
    environment nnU-Net's own commands need to find them (tests and bench_stages.py share it)."""
    paths = make_stage_models(os.path.join(base, "results"))
    inputs = os.path.join(base, "inputs")
    tiny.make_inputs(inputs, cases)
    return {**paths, "inputs": inputs, "env": stage_env(base)}


def stage_env(base: str) -> dict:
    """This process's environment with the nnUNet_* folders of make_stage_world(`base`)."""
    return {
        **os.environ,
        "nnUNet_results": os.path.join(base, "results"),
        "nnUNet_raw": base,
        "nnUNet_preprocessed": base,
        "CUDA_VISIBLE_DEVICES": "",
    }


def write_json(content: dict, folder: str, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(content, f, indent=4)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Run with nnUNet_results=RESULTS to predict with dataset 998."
    )
    parser.add_argument("--results", required=True, help=f"nnUNet_results folder; {DATASET}/ is created in it")
    parser.add_argument("--inputs", help="also write synthetic 1-channel input cases (case_000_0000.nii.gz ...) here")
    parser.add_argument("--cases", type=int, default=4, help="number of input cases with --inputs (default: 4)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0], help="folds to create in every model (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the random weights (default: 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = make_stage_models(args.results, tuple(args.folds), args.seed)
    if args.inputs:
        tiny.make_inputs(args.inputs, args.cases, 1)
    print(paths["dataset"])


if __name__ == "__main__":
    main()
