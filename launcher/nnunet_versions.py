"""The nnU-Net versions the launcher supports, and everything that differs between them, in one
place. The launcher installs into the user's own environment (their release, or an editable fork
with their trainers): pyproject.toml asks for this range, never one version that would replace
theirs. Versions are read from the installed distributions' metadata, without importing nnunetv2
(the supervisor must not: finding a trainer imports every trainer module).

What differs, from nnU-Net's history:
- 2.5.2 loads checkpoints with `weights_only=False` (earlier versions fail under torch >= 2.6):
  the oldest supported release.
- before 2.6.0 `DefaultPreprocessor.run_case_npy` returns (data, seg) and updates the properties
  in place; since, (data, seg, properties): `run_case_npy` below. (`export_prediction_from_logits`
  takes `num_threads_torch` only since 2.6.0; the exact export leaves it at its default, nnU-Net's
  `default_num_processes`, on every version, as plain nnU-Net does.)
- before 2.7.0 `resample_torch_fornnunet` raises a TypeError on anisotropic cases with the default
  `force_separate_z=None`: `--profile fast` (which resamples with it) needs 2.7.0.
- nnU-Net itself excludes torch 2.9.*.
"""

from __future__ import annotations

import re
from importlib import metadata

from launcher.errors import LauncherError

OLDEST = (2, 5, 2)
BEYOND = (2, 9)  # the first release line not tested
SUPPORTED = "nnunetv2 >= 2.5.2, < 2.9"
FAST_PROFILE_FROM = (2, 7, 0)
EXCLUDED_TORCH = (2, 9)  # excluded by nnU-Net's own requirements


def version_tuple(version: str) -> tuple[int, ...]:
    """ "2.6.4" -> (2, 6, 4); what follows the release numbers ("2.7.0.dev3", "2.6.4+fork") is cut."""
    release = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in release.group(0).split(".")) if release else ()


def installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def refusal(nnunet: str | None, torch: str | None) -> str | None:
    """Why this nnU-Net (and torch) cannot run the launcher, or None."""
    if nnunet is None:
        return f"nnunetv2 is not installed in this environment ({SUPPORTED} is supported)"
    found = version_tuple(nnunet)
    if found < OLDEST or found[:2] >= BEYOND:
        return f"nnunetv2 {nnunet} is installed; nnunet-launch supports {SUPPORTED}"
    if torch is not None and version_tuple(torch)[:2] == EXCLUDED_TORCH:
        return f"torch {torch} is installed, which nnU-Net excludes (torch 2.9.*); install another torch"
    return None


def refuse_unsupported() -> None:
    """`run`, `plan` and `slurm` refuse an environment outside the range (exit 2) before any work."""
    why = refusal(installed("nnunetv2"), installed("torch"))
    if why:
        raise LauncherError(why)


def fast_profile_refusal() -> str | None:
    """Why `--profile fast` cannot run with the installed nnU-Net, or None."""
    nnunet = installed("nnunetv2")
    if nnunet is not None and version_tuple(nnunet) < FAST_PROFILE_FROM:
        return (
            f"--profile fast needs nnunetv2 >= 2.7.0 (before it, resample_torch_fornnunet fails on anisotropic "
            f"cases); nnunetv2 {nnunet} is installed: use the exact profile"
        )
    return None


def run_case_npy(preprocessor, data, seg, properties: dict, plans_manager, configuration_manager, dataset_json):
    """nnU-Net's preprocessing of one read case: (data, seg, properties) on every supported version
    (before 2.6.0 it returns (data, seg) and updates `properties` in place)."""
    result = preprocessor.run_case_npy(data, seg, properties, plans_manager, configuration_manager, dataset_json)
    return result if len(result) == 3 else (*result, properties)
