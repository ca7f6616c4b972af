"""Make a tiny but real nnU-Net v2 model folder and a synthetic input folder.

The model is a 4-stage 3D UNet (8-64 features, patch 32^3) with seeded random weights,
built exactly the way nnU-Net builds it for inference, so `nnUNetv2_predict_from_modelfolder`
and the launcher load it like any trained model. Inputs are NIfTI volumes of varied sizes
(and a few anisotropic spacings, so the export resamples) named like nnU-Net's raw data.

    python scripts/make_tiny_model.py --model DIR --inputs DIR [--cases 12] [--channels 1]
        [--trainer nnUNetTrainerNoMirroring] [--mirror-axes 0 1 | --mirror-axes none]

--trainer and --mirror-axes set what the checkpoint says (`trainer_name`,
`inference_allowed_mirroring_axes`), as a model trained with that trainer has them; the network
is the same (nnU-Net's trainer variants build it with nnUNetTrainer's build_network_architecture).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import SimpleITK as sitk
import torch

TRAINER = "nnUNetTrainer"  # the trainer the checkpoints name unless --trainer says otherwise
MIRROR_AXES = (0, 1, 2)  # nnUNetTrainer's inference_allowed_mirroring_axes for a 3D model
CONFIGURATION = "3d_fullres"
FILE_ENDING = ".nii.gz"


def plans_dict(num_channels: int) -> dict:
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [32, 32, 32],
        "median_image_size_in_voxels": [40, 40, 40],
        "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"] * num_channels,
        "use_mask_for_norm": [False] * num_channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": 4,
                "features_per_stage": [8, 16, 32, 64],
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * 4,
                "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                "n_conv_per_stage": [2, 2, 2, 2],
                "n_conv_per_stage_decoder": [2, 2, 2],
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    intensity = {
        "mean": 0.0,
        "std": 1.0,
        "min": -5.0,
        "max": 5.0,
        "median": 0.0,
        "percentile_00_5": -3.0,
        "percentile_99_5": 3.0,
    }
    return {
        "dataset_name": "Dataset999_Tiny",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [40, 40, 40],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): intensity for c in range(num_channels)},
    }


def dataset_dict(num_channels: int) -> dict:
    return {
        "channel_names": {str(c): f"MR{c}" for c in range(num_channels)},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": 0,
        "file_ending": FILE_ENDING,
    }


def make_model(
    folder: str,
    num_channels: int = 1,
    folds: tuple[int, ...] = (0,),
    seed: int = 0,
    trainer: str = TRAINER,
    mirror_axes: tuple[int, ...] | None = MIRROR_AXES,
) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset = plans_dict(num_channels), dataset_dict(num_channels)
    os.makedirs(folder, exist_ok=True)
    for name, content in (("plans.json", plans), ("dataset.json", dataset)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=4)
    plans_manager = PlansManager(plans)
    save_checkpoints(
        folder, plans_manager, CONFIGURATION, num_channels, len(dataset["labels"]), folds, seed, mirror_axes, trainer
    )


def save_checkpoints(
    folder: str,
    plans_manager,
    configuration: str,
    num_inputs: int,
    num_outputs: int,
    folds,
    seed: int,
    mirror_axes: tuple[int, ...] | None = MIRROR_AXES,
    trainer: str = TRAINER,
) -> None:
    """fold_K/checkpoint_final.pth with seeded random weights, the network built as nnU-Net
    builds it for inference; the checkpoint names `trainer` and allows `mirror_axes` (None: none)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    configuration_manager = plans_manager.get_configuration(configuration)
    for fold in folds:
        torch.manual_seed(seed + fold)
        try:  # nnU-Net >= 2.7
            network = nnUNetTrainer.build_network_architecture(
                plans_manager, configuration_manager, num_inputs, num_outputs, enable_deep_supervision=False
            )
        except TypeError:  # before 2.7 it takes the architecture's name and arguments
            network = nnUNetTrainer.build_network_architecture(
                configuration_manager.network_arch_class_name,
                configuration_manager.network_arch_init_kwargs,
                configuration_manager.network_arch_init_kwargs_req_import,
                num_inputs,
                num_outputs,
                enable_deep_supervision=False,
            )
        checkpoint = {
            "network_weights": network.state_dict(),
            "trainer_name": trainer,
            "init_args": {"configuration": configuration, "fold": fold},
            "inference_allowed_mirroring_axes": mirror_axes,
        }
        os.makedirs(os.path.join(folder, f"fold_{fold}"), exist_ok=True)
        torch.save(checkpoint, os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth"))


def case_shape(index: int) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Varied sizes (24^3 .. 64^3) and, for every third case, an anisotropic spacing."""
    rng = np.random.default_rng(1000 + index)
    shape = tuple(int(s) for s in rng.integers(24, 65, size=3))
    spacing = (1.5, 1.0, 1.0) if index % 3 == 2 else (1.0, 1.0, 1.0)
    return shape, spacing


def make_inputs(
    folder: str, num_cases: int, num_channels: int = 1, prefix: str = "case", big_case_edge: int | None = None
) -> list[str]:
    """Write `num_cases` synthetic cases; `big_case_edge` makes case 0 a cube of that edge."""
    os.makedirs(folder, exist_ok=True)
    ids = []
    for index in range(num_cases):
        shape, spacing = case_shape(index)
        if big_case_edge and index == 0:
            shape = (big_case_edge,) * 3
        rng = np.random.default_rng(index)
        case_id = f"{prefix}_{index:03d}"
        for channel in range(num_channels):
            z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
            blob = np.exp(-((x - 0.2) ** 2 + y**2 + (z + 0.1 * channel) ** 2) * 4)
            volume = (blob * 3 + rng.normal(0, 0.5, shape)).astype(np.float32)
            image = sitk.GetImageFromArray(volume)
            image.SetSpacing(spacing[::-1])  # SimpleITK wants x, y, z
            image.SetOrigin((1.0 * index, -2.0, 3.5))
            sitk.WriteImage(image, os.path.join(folder, f"{case_id}_{channel:04d}{FILE_ENDING}"))
        ids.append(case_id)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder to create")
    parser.add_argument("--inputs", help="input folder to create")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--trainer", default=TRAINER, help="the trainer class the checkpoint names")
    parser.add_argument(
        "--mirror-axes",
        nargs="+",
        default=[str(a) for a in MIRROR_AXES],
        help="the checkpoint's inference_allowed_mirroring_axes, e.g. 0 1; 'none' for None (no mirroring)",
    )
    parser.add_argument(
        "--big-case-edge", type=int, default=None, help="make case 0 a cube of this edge (a skewed set for benchmarks)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    mirror_axes = None if args.mirror_axes == ["none"] else tuple(int(a) for a in args.mirror_axes)
    make_model(args.model, args.channels, tuple(args.folds), trainer=args.trainer, mirror_axes=mirror_axes)
    if args.inputs:
        make_inputs(args.inputs, args.cases, args.channels, big_case_edge=args.big_case_edge)


if __name__ == "__main__":
    main()
