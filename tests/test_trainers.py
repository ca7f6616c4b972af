"""Every trainer nnU-Net ships loads in this venv, and models trained with the trainers that change
test-time mirroring are predicted by the launcher exactly as plain nnU-Net predicts them.

nnU-Net finds the trainer class a checkpoint names by importing the modules of
nnunetv2.training.nnUNetTrainer one by one (recursive_find_python_class); a module that fails to
import (the primus trainers import timm, timm imports torchvision) ends the search, so then only
`nnUNetTrainer` itself resolves. scripts/setup_venv.sh installs a torchvision that loads with the
torch it installs; these tests fail where it does not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PLAIN_NNUNET_ONE_THREAD, ROOT, assert_same_predictions, cli

# xdist: the mirroring models and their references are built once, on one xdist worker
pytestmark = pytest.mark.xdist_group("trainers")

# Imports every module under nnunetv2/training/nnUNetTrainer (found on disk, so a package whose
# import fails still has its modules listed), then asks nnU-Net's own lookup for every trainer
# class those modules define. Runs in a child: a failed torchvision import leaves its process half
# initialised. The JSON goes to the last line of stdout; what nnU-Net prints goes to stderr.
PROBE = r"""
import contextlib, importlib, importlib.util, inspect, json, os, sys, warnings
warnings.simplefilter("ignore")
report = {"modules": {}, "trainers": {}}
with contextlib.redirect_stdout(sys.stderr):
    folder = os.path.dirname(importlib.util.find_spec("nnunetv2").origin)
    package = os.path.join(folder, "training", "nnUNetTrainer")
    names = []
    for directory, subdirs, files in os.walk(package):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        relative = os.path.relpath(directory, folder).replace(os.sep, ".")
        names += [f"nnunetv2.{relative}" + ("" if f == "__init__.py" else "." + f[:-3])
                  for f in sorted(files) if f.endswith(".py")]
    classes = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            report["modules"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            continue
        report["modules"][name] = None
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, nnUNetTrainer) and c.__module__ == name]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    for cls in classes:
        try:
            found = recursive_find_trainer_class_by_name(cls.__name__)
            report["trainers"][cls.__name__] = f"{found.__module__}.{found.__qualname__}"
        except Exception as exc:
            report["trainers"][cls.__name__] = f"{type(exc).__name__}: {exc}".splitlines()[0]
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def shipped() -> dict:
    """What importing nnU-Net's trainer package and looking up its trainers gave, in a child."""
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_every_module_of_nnunets_trainer_package_imports_variants_included(shipped):
    modules = shipped["modules"]
    assert "nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring" in modules
    assert "nnunetv2.training.nnUNetTrainer.primus.primus_trainers" in modules
    assert len([m for m in modules if ".variants." in m]) >= 20
    failed = {name: error for name, error in modules.items() if error}
    assert failed == {}, "trainer modules that do not import:\n" + "\n".join(f"{k}: {v}" for k, v in failed.items())


def test_nnunets_trainer_lookup_resolves_every_trainer_class_it_ships(shipped):
    trainers = shipped["trainers"]
    for name in ("nnUNetTrainer", "nnUNetTrainerNoMirroring", "nnUNetTrainer_onlyMirror01", "nnUNetTrainerBN"):
        assert name in trainers
    unresolved = {name: how for name, how in trainers.items() if not how.endswith(f".{name}")}
    assert unresolved == {}, "trainers nnU-Net cannot find:\n" + "\n".join(f"{k}: {v}" for k, v in unresolved.items())


# --- models trained with mirroring trainers, predicted with test-time mirroring on -------------
CASES = 4  # made; case_001 (61x49x57, the largest) is left out: mirroring multiplies the passes by 4
MIRRORING = {  # trainer -> the inference_allowed_mirroring_axes its checkpoints hold (3D)
    "nnUNetTrainerNoMirroring": None,
    "nnUNetTrainer_onlyMirror01": (0, 1),
}


def _make_model(model: Path, trainer: str, axes: tuple[int, ...] | None, inputs: Path | None = None) -> None:
    axes_args = ["none"] if axes is None else [str(a) for a in axes]
    command = [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--model", str(model)]
    command += ["--trainer", trainer, "--mirror-axes", *axes_args]
    if inputs is not None:
        command += ["--inputs", str(inputs), "--cases", str(CASES)]
    subprocess.run(command, check=True, capture_output=True)


def _plain_nnunet_with_tta(inputs: Path, out: Path, model: Path) -> None:
    """nnUNetv2_predict_from_modelfolder with test-time mirroring (no --disable_tta), one thread."""
    args = ["-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0", "-device", "cpu"]
    args += ["-npp", "1", "-nps", "1", "--disable_progress_bar"]
    result = subprocess.run([sys.executable, "-c", PLAIN_NNUNET_ONE_THREAD, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def mirroring(tmp_path_factory) -> dict:
    """A tiny model per trainer of MIRRORING (the same seeded weights: only the checkpoints'
    trainer name and mirroring axes differ), 3 cases (one anisotropic), and plain nnU-Net's
    prediction of each with test-time mirroring."""
    base = tmp_path_factory.mktemp("mirroring")
    inputs = base / "inputs"
    models = {trainer: base / f"{trainer}__nnUNetPlans__3d_fullres" for trainer in MIRRORING}
    for index, (trainer, axes) in enumerate(MIRRORING.items()):
        _make_model(models[trainer], trainer, axes, inputs if index == 0 else None)
    for path in inputs.glob("case_001_*"):
        path.unlink()
    references = {trainer: base / f"reference-{trainer}" for trainer in MIRRORING}
    for trainer in MIRRORING:
        _plain_nnunet_with_tta(inputs, references[trainer], models[trainer])
    return {"inputs": inputs, "models": models, "references": references}


def test_the_tiny_models_checkpoints_name_the_trainer_and_its_mirroring_axes(mirroring):
    import torch

    for trainer, axes in MIRRORING.items():
        path = mirroring["models"][trainer] / "fold_0" / "checkpoint_final.pth"
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert checkpoint["trainer_name"] == trainer
        assert checkpoint["inference_allowed_mirroring_axes"] == axes


def test_the_checkpoints_mirroring_axes_change_plain_nnunets_tta_prediction(mirroring):
    """Same weights, axes None vs (0, 1): some voxel differs, or the tests below prove nothing."""
    import numpy as np
    import SimpleITK as sitk

    none, axes01 = (mirroring["references"][t] for t in MIRRORING)
    differing = [
        p.name
        for p in sorted(none.glob("*.nii.gz"))
        if not np.array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(p))), sitk.GetArrayFromImage(sitk.ReadImage(str(axes01 / p.name)))
        )
    ]
    assert differing, "mirroring on axes (0, 1) gave the same segmentations as no mirroring"


@pytest.mark.parametrize("trainer", list(MIRRORING))
def test_the_launcher_predicts_a_model_of_a_mirroring_trainer_with_tta_on_like_plain_nnunet(
    mirroring, trainer, tmp_path
):
    out = tmp_path / "out"
    model, reference = mirroring["models"][trainer], mirroring["references"][trainer]
    args = ["run", "-i", str(mirroring["inputs"]), "-o", str(out), "-m", str(model), "-f", "0"]
    result = cli(*args, "-device", "cpu", "--workers", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_predictions(out, reference)
