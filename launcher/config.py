"""RunConfig: flags > --config TOML > defaults, validated before any work starts.

Never imports torch or nnunetv2: validation must be fast and must not touch a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from launcher.errors import LauncherError
from launcher.outputs import state_dir

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DEFAULT_FOLDS = ("0", "1", "2", "3", "4")  # nnUNetv2_predict's default


@dataclass
class RunConfig:
    input_folder: str = ""
    output_folder: str = ""
    model_folder: str | None = None  # -m; otherwise resolved from -d/-p/-tr/-c
    dataset: str | None = None
    plans: str = "nnUNetPlans"
    trainer: str = "nnUNetTrainer"
    configuration: str | None = None
    folds: tuple[str, ...] = DEFAULT_FOLDS
    step_size: float = 0.5
    disable_tta: bool = False
    verbose: bool = False
    save_probabilities: bool = False
    continue_prediction: bool = False
    checkpoint: str = "checkpoint_final.pth"
    npp: int | None = None  # None: a share of the cores
    nps: int | None = None
    prev_stage_predictions: str | None = None
    num_parts: int = 1  # nnU-Net's -num_parts / -part_id: predict only that part of its split
    part_id: int = 0
    device: str = "cuda"
    gpus: str = "all"
    workers: int = 1
    workers_per_gpu: int = 1
    schedule: str = "dynamic"
    max_restarts: int = 3
    case_retries: int = 2
    hang_timeout: float | None = None
    fresh: bool = False
    skip_busy: bool = False
    # set by the SLURM array script, not by users: this node's share of a K-node run
    node: int | None = None
    nodes: int = 1
    parts_per_node: int | None = None
    # filled by resolve(), not by the user
    model: ModelInfo | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ModelInfo:
    folder: str
    file_ending: str
    num_channels: int
    num_labels: int
    configuration: str | None
    previous_stage: str | None
    folds: tuple[str, ...]
    patch_size: tuple[int, ...] | None = None


# `fresh` discards outputs: a flag for one command line, never a setting a file applies every time
USER_KEYS = {f.name for f in dataclasses.fields(RunConfig)} - {"model", "node", "nodes", "parts_per_node", "fresh"}
# TOML value types accepted per annotation (without "| None")
_TOML_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "tuple[str, ...]": (list,)}
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "tuple[str, ...]": "a list like [0, 1]",
}


def _check_toml_type(path: str, key: str, value: Any) -> None:
    base = RunConfig.__annotations__[key].replace(" | None", "")
    allowed = _TOML_TYPES[base]
    ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
    if ok and base == "tuple[str, ...]":
        ok = all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise LauncherError(f"--config {path!r}: {key} must be {_TYPE_WORDS[base]}, got {value!r}")


def load_toml(path: str) -> dict[str, Any]:
    """Keys are RunConfig's field names (also accepted with dashes)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise LauncherError(f"--config {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LauncherError(f"--config {path!r}: not valid TOML ({exc})") from None
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - USER_KEYS)
    if "fresh" in unknown:
        raise LauncherError(
            f"--config {path!r}: 'fresh' cannot be a setting (it would discard outputs on every run); "
            "give --fresh on the command line once"
        )
    if unknown:
        raise LauncherError(
            f"--config {path!r}: unknown key {unknown[0]!r}; valid keys: " + ", ".join(sorted(USER_KEYS))
        )
    for key, value in values.items():
        _check_toml_type(path, key, value)
    return values


def build(cli_values: dict[str, Any], config_file: str | None) -> RunConfig:
    """Merge (flags given on the command line win over the TOML file) and validate."""
    merged = load_toml(config_file) if config_file else {}
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    if "folds" in merged:
        merged["folds"] = tuple(str(f) for f in merged["folds"])
    try:
        config = RunConfig(**merged)
    except TypeError as exc:
        raise LauncherError(f"bad configuration: {exc}") from None
    validate(config)
    return config


def run_state_dir(config: RunConfig) -> str:
    """OUT/.nnunet-launch, or node-k for a SLURM array's node k or for -part_id k: each share has
    its own journal and lock, so shares can run at once on several machines into one OUT."""
    share = config.node if config.node is not None else (config.part_id if config.num_parts > 1 else None)
    return state_dir(config.output_folder, share)


def _check_range(config: RunConfig) -> None:
    if not isinstance(config.step_size, (int, float)) or not 0 < config.step_size <= 1:
        raise LauncherError(f"-step_size must be in (0, 1], got {config.step_size}")
    for name, minimum in (
        ("nodes", 1),
        ("workers", 1),
        ("workers_per_gpu", 1),
        ("max_restarts", 0),
        ("case_retries", 0),
        ("npp", 1),
        ("nps", 1),
        ("num_parts", 1),
        ("part_id", 0),
    ):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < minimum):
            flag = f"-{name}" if name in ("num_parts", "part_id", "npp", "nps") else f"--{name.replace('_', '-')}"
            raise LauncherError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    if not config.part_id < config.num_parts:
        raise LauncherError(f"-part_id must be in 0..{config.num_parts - 1} for -num_parts {config.num_parts}")
    if config.num_parts > 1 and config.node is not None:
        raise LauncherError("-num_parts/-part_id cannot be combined with a SLURM array's node share")
    if config.node is not None and not 0 <= config.node < config.nodes:
        raise LauncherError(f"--node must be in 0..{config.nodes - 1}, got {config.node}")
    if config.hang_timeout is not None and config.hang_timeout <= 0:
        raise LauncherError(f"--hang-timeout must be > 0 seconds, got {config.hang_timeout}")
    if config.device not in ("cuda", "cpu"):
        raise LauncherError(f"-device must be cuda or cpu, got {config.device!r}")
    if config.schedule not in ("static", "dynamic"):
        raise LauncherError(f"--schedule must be static or dynamic, got {config.schedule!r}")


def validate(config: RunConfig) -> None:
    _check_range(config)
    if not config.input_folder:
        raise LauncherError("-i INPUT_FOLDER is required")
    if not config.output_folder:
        raise LauncherError("-o OUTPUT_FOLDER is required")
    inp = os.path.realpath(config.input_folder)
    out = os.path.realpath(config.output_folder)
    if not os.path.isdir(inp):
        raise LauncherError(f"input folder {config.input_folder!r} does not exist")
    if out == inp or out.startswith(inp + os.sep):
        raise LauncherError(
            f"output folder {config.output_folder!r} is inside the input folder; choose a folder outside it"
        )
    _check_writable(out)
    config.model = read_model(config)
    if config.model.previous_stage:
        _check_prev_stage(config)


def _check_writable(out: str) -> None:
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise LauncherError(f"output folder {out!r}: {existing!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LauncherError(f"output folder {out!r} is not writable")


def _check_prev_stage(config: RunConfig) -> None:
    if not config.prev_stage_predictions:
        raise LauncherError(
            f"configuration {config.model.configuration!r} is a cascade stage: it needs "
            f"-prev_stage_predictions (the {config.model.previous_stage!r} outputs)"
        )
    if not os.path.isdir(config.prev_stage_predictions):
        raise LauncherError(f"-prev_stage_predictions folder {config.prev_stage_predictions!r} does not exist")


def resolve_model_folder(config: RunConfig) -> str:
    if config.model_folder:
        if config.dataset:
            raise LauncherError("give either -m MODEL_FOLDER or -d DATASET, not both")
        return config.model_folder
    if not config.dataset or not config.configuration:
        raise LauncherError("give -m MODEL_FOLDER, or -d DATASET and -c CONFIGURATION")
    results = os.environ.get("nnUNet_results")
    if not results or not os.path.isdir(results):
        raise LauncherError(
            "-d needs the nnUNet_results environment variable to name an existing folder (or give -m MODEL_FOLDER)"
        )
    datasets = sorted(d for d in os.listdir(results) if os.path.isdir(os.path.join(results, d)))
    if config.dataset.isdigit():
        wanted = [d for d in datasets if re.fullmatch(rf"Dataset{int(config.dataset):03d}_.+", d)]
    else:
        wanted = [d for d in datasets if d == config.dataset]
    if len(wanted) != 1:
        raise LauncherError(
            f"dataset {config.dataset!r} not found in nnUNet_results={results!r} "
            f"(found: {', '.join(datasets) or 'none'})"
        )
    dataset_folder = os.path.join(results, wanted[0])
    name = f"{config.trainer}__{config.plans}__{config.configuration}"
    folder = os.path.join(dataset_folder, name)
    if not os.path.isdir(folder):
        found = sorted(os.listdir(dataset_folder))
        raise LauncherError(
            f"no model {name!r} in {dataset_folder!r} (trainer__plans__configuration "
            f"found: {', '.join(found) or 'none'})"
        )
    return folder


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LauncherError(f"model folder has no {what} ({path!r} is missing)") from None
    except (OSError, ValueError) as exc:
        raise LauncherError(f"cannot read {path!r}: {exc}") from None


def read_model(config: RunConfig) -> ModelInfo:
    folder = os.path.abspath(resolve_model_folder(config))
    if not os.path.isdir(folder):
        raise LauncherError(f"model folder {folder!r} does not exist")
    dataset = _load_json(os.path.join(folder, "dataset.json"), "dataset.json")
    plans = _load_json(os.path.join(folder, "plans.json"), "plans.json")
    channels = dataset.get("channel_names", dataset.get("modality"))
    if "file_ending" not in dataset or not channels:
        raise LauncherError(f"{folder!r}/dataset.json lacks file_ending or channel_names")
    configuration = config.configuration or _configuration_from_folder_name(folder)
    configurations = plans.get("configurations", {})
    if configuration is not None and configuration not in configurations:
        raise LauncherError(
            f"configuration {configuration!r} is not in {folder!r}/plans.json (found: {', '.join(configurations)})"
        )
    previous = _configuration_value(configurations, configuration, "previous_stage")
    patch = _configuration_value(configurations, configuration, "patch_size")
    for fold in config.folds:
        checkpoint = os.path.join(folder, f"fold_{fold}", config.checkpoint)
        if not os.path.isfile(checkpoint):
            raise LauncherError(f"fold {fold}: {checkpoint!r} not found ({_available(folder, config.checkpoint)})")
    return ModelInfo(
        folder=folder,
        file_ending=dataset["file_ending"],
        num_channels=len(channels),
        num_labels=len(dataset.get("labels", {})) or 2,
        configuration=configuration,
        previous_stage=previous,
        folds=tuple(config.folds),
        patch_size=tuple(patch) if patch else None,
    )


def _configuration_value(configurations: dict, name: str | None, key: str):
    """A configuration's value, following nnU-Net's `inherits_from`."""
    seen = set()
    while name and name not in seen:
        seen.add(name)
        entry = configurations.get(name, {})
        if key in entry:
            return entry[key]
        name = entry.get("inherits_from")
    return None


def _configuration_from_folder_name(folder: str) -> str | None:
    parts = os.path.basename(folder.rstrip(os.sep)).split("__")
    return parts[2] if len(parts) == 3 else None


def _available(folder: str, checkpoint: str) -> str:
    folds = sorted(
        d[len("fold_") :]
        for d in os.listdir(folder)
        if d.startswith("fold_") and os.path.isfile(os.path.join(folder, d, checkpoint))
    )
    if folds:
        return f"folds with {checkpoint}: {' '.join(folds)}; choose with -f"
    others = sorted(
        {
            f
            for d in os.listdir(folder)
            if d.startswith("fold_")
            for f in os.listdir(os.path.join(folder, d))
            if f.endswith(".pth")
        }
    )
    return f"checkpoints found: {', '.join(others) or 'none'}"


def output_identity(config: RunConfig) -> dict[str, Any]:
    """What decides the outputs' content: a resumed run must match it exactly."""
    return {
        "model_folder": config.model.folder,
        "configuration": config.model.configuration,
        "folds": list(config.model.folds),
        "checkpoint": config.checkpoint,
        "input_folder": os.path.realpath(config.input_folder),
        "step_size": config.step_size,
        "disable_tta": config.disable_tta,
        "save_probabilities": config.save_probabilities,
        "prev_stage_predictions": (
            os.path.realpath(config.prev_stage_predictions) if config.prev_stage_predictions else None
        ),
    }
