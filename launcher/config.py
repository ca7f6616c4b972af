"""RunConfig: flags > --config TOML > defaults, validated before any work starts.

Never imports torch or nnunetv2: validation must be fast and must not touch a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from launcher import nnunet_versions
from launcher.cases import missing_folder
from launcher.errors import LauncherError
from launcher.outputs import stages_dir, state_dir
from launcher.readers_writers import of_plans
from launcher.stages import Member, StagePlan, member_names, read_postprocessing

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DEFAULT_FOLDS = ("0", "1", "2", "3", "4")  # nnUNetv2_predict's default
PROFILES = ("exact", "fast")  # exact: voxel-identical to nnUNetv2_predict; fast: see fast_profile.py


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
    profile: str = "exact"  # "fast": opt-in, changes voxels (see fast_profile.py and the README)
    deterministic: bool = False  # GPU: deterministic cuDNN kernels instead of autotuning (device.py)
    max_restarts: int = 3
    case_retries: int = 2
    hang_timeout: float | None = None
    on_finish: str | None = None  # a shell command run once at the end (notify.py)
    fresh: bool = False
    skip_busy: bool = False
    skip_bad_inputs: bool = False  # misnamed files, cases with missing channels: left out, named
    # set by the SLURM array script, not by users: this node's share of a K-node run
    node: int | None = None
    nodes: int = 1
    parts_per_node: int | None = None
    # multi-stage inference (see stages.py): several -c/-tr/-p values make an ensemble
    pp_pkl_file: str | None = None
    plans_json: str | None = None  # for the postprocessing (nnUNetv2_apply_postprocessing's -plans_json)
    dataset_json: str | None = None
    best: bool = False  # read $nnUNet_results/<dataset>/inference_information.json
    inference_info: str | None = None  # ... or this file
    keep_stages: bool = False
    # filled by validate(), not by the user
    model: ModelInfo | None = field(default=None, compare=False)
    stages: StagePlan | None = field(default=None, compare=False)


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
    labels: str = ""  # dataset.json's labels, as JSON (members of an ensemble must agree)
    reader_writer: str | None = None  # plans.json's image_reader_writer (readers_writers.py)


# `fresh` discards outputs: a flag for one command line, never a setting a file applies every time
USER_KEYS = {f.name for f in dataclasses.fields(RunConfig)} - {
    "model",
    "stages",
    "node",
    "nodes",
    "parts_per_node",
    "fresh",
}
# one value, or one per ensemble member (nnU-Net's own spellings take several values)
MEMBER_KEYS = ("configuration", "trainer", "plans")
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
    if key in MEMBER_KEYS and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return
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
    nnunet_versions.refuse_unsupported()  # the installed nnU-Net and torch, before anything else
    merged = load_toml(config_file) if config_file else {}
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    if "folds" in merged:
        merged["folds"] = tuple(str(f) for f in merged["folds"])
    for key in MEMBER_KEYS:
        if isinstance(merged.get(key), (list, tuple)):
            values = tuple(str(v) for v in merged[key])
            merged[key] = values[0] if len(values) == 1 else values
    try:
        config = RunConfig(**merged)
    except TypeError as exc:
        raise LauncherError(f"bad configuration: {exc}") from None
    validate(config, given=set(merged))
    if config.profile == "fast" and (why := nnunet_versions.fast_profile_refusal()):
        raise LauncherError(why)
    return config


def run_state_dir(config: RunConfig) -> str:
    """OUT/.nnunet-launch, or node-k for a SLURM array's node k, or part-k for -part_id k: each
    share has its own journal and lock, so shares can run at once on several machines into one OUT."""
    part = config.part_id if config.num_parts > 1 else None
    return state_dir(config.output_folder, config.node, None if config.node is not None else part)


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
    # nan compares false with everything: "<= 0" alone let it through and the watchdog never fired
    if config.hang_timeout is not None and not (math.isfinite(config.hang_timeout) and config.hang_timeout > 0):
        raise LauncherError(f"--hang-timeout must be a finite number of seconds > 0, got {config.hang_timeout}")
    if config.device not in ("cuda", "cpu"):
        raise LauncherError(f"-device must be cuda or cpu, got {config.device!r}")
    if config.schedule not in ("static", "dynamic"):
        raise LauncherError(f"--schedule must be static or dynamic, got {config.schedule!r}")
    if config.profile not in PROFILES:
        raise LauncherError(f"--profile must be {' or '.join(PROFILES)}, got {config.profile!r}")


def validate(config: RunConfig, given: set[str] | None = None) -> None:
    """`given`: the settings the user gave (flags or file); None: every field counts as given."""
    _check_range(config)
    if not config.input_folder:
        raise LauncherError("-i INPUT_FOLDER is required")
    if not config.output_folder:
        raise LauncherError("-o OUTPUT_FOLDER is required")
    inp = os.path.realpath(config.input_folder)
    out = os.path.realpath(config.output_folder)
    if not os.path.isdir(inp):
        raise LauncherError(missing_folder("input folder", config.input_folder, "-i takes the folder of scans"))
    if out == inp or out.startswith(inp + os.sep):
        raise LauncherError(
            f"output folder {config.output_folder!r} is inside the input folder; choose a folder outside it"
        )
    _check_writable(out)
    if config.best or config.inference_info:
        _apply_inference_information(config, given)
    if (config.plans_json or config.dataset_json) and not config.pp_pkl_file:
        raise LauncherError("-plans_json and -dataset_json belong to -pp_pkl_file (the postprocessing)")
    specs = _member_specs(config)
    single = _single(config, specs[0]) if len(specs) == 1 else None
    cascade_alone = single is not None and single.previous_stage and not config.prev_stage_predictions
    if single is not None and not config.pp_pkl_file and not (cascade_alone and not config.model_folder):
        config.model = single  # one model, as nnUNetv2_predict runs it
        if config.model.previous_stage:
            _check_prev_stage(config)
        elif config.prev_stage_predictions:  # nnU-Net would ignore it without a word
            raise LauncherError(
                f"-prev_stage_predictions is for a cascade stage; configuration {config.model.configuration!r} "
                "has no previous stage: leave it out"
            )
        return
    config.model, config.stages = _stage_plan(config, specs)


def _member_specs(config: RunConfig) -> list[tuple[str, str, str]]:
    """(trainer, plans, configuration) of each member the user named: -c may take several
    values; -tr/-p one for all or one per configuration."""
    configurations = _values(config.configuration)
    if len(configurations) <= 1:
        return [(str(config.trainer), str(config.plans), config.configuration)]  # type: ignore[list-item]
    specs = []
    for flag, key in (("-tr", "trainer"), ("-p", "plans")):
        given = _values(getattr(config, key))
        if len(given) not in (1, len(configurations)):
            raise LauncherError(
                f"{flag} takes one value or one per configuration ({len(configurations)}), got {len(given)}"
            )
        specs.append(given * len(configurations) if len(given) == 1 else given)
    models = list(zip(specs[0], specs[1], configurations, strict=True))
    if len(set(models)) != len(models):
        raise LauncherError(f"-c names the same model twice: {' '.join(configurations)}")
    return models


def _values(value) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, tuple) else (() if value is None else (value,))


def _single(config: RunConfig, spec: tuple[str, str, str | None]) -> ModelInfo:
    trainer, plans, configuration = spec
    return read_model(dataclasses.replace(config, trainer=trainer, plans=plans, configuration=configuration))


def _stage_plan(config: RunConfig, specs: list[tuple[str, str, str]]) -> tuple[ModelInfo, StagePlan]:
    """The members (a cascade's previous stage added where its predictions are not given), checked
    to agree with each other, and the postprocessing."""
    if config.model_folder:
        raise LauncherError("several configurations or a postprocessing file need -d DATASET, not -m")
    if config.prev_stage_predictions:
        raise LauncherError(
            "-prev_stage_predictions works with one configuration and no postprocessing; leave it out and the "
            "launcher predicts the previous stage of a cascade itself"
        )
    if config.schedule == "static":
        raise LauncherError("a multi-stage run (ensemble, postprocessing, cascade) uses --schedule dynamic")
    models: dict[tuple[str, str, str], ModelInfo] = {}
    order: list[tuple[str, str, str]] = []  # a cascade's previous stage before the cascade
    for spec in specs:
        model = _single(config, spec)
        if model.previous_stage:  # nnU-Net's chain: the same trainer and plans, the previous configuration
            lower = (spec[0], spec[1], model.previous_stage)
            if lower not in models:
                try:
                    models[lower] = _single(config, lower)
                except LauncherError as exc:
                    raise LauncherError(
                        f"-c {spec[2]} is a cascade stage and needs its previous stage {model.previous_stage!r} "
                        f"(or -prev_stage_predictions): {exc}"
                    ) from None
                order.append(lower)
        if spec not in models:
            order.append(spec)
        models[spec] = model
    name_of = dict(zip(order, member_names(order), strict=True))
    members = []
    for spec in order:
        previous = models[spec].previous_stage
        previous_name = name_of[(spec[0], spec[1], previous)] if previous else None
        model = models[spec]
        members.append(Member(name_of[spec], model.folder, spec[2], previous_name, model.reader_writer))
    names = [name_of[spec] for spec in specs]
    by_name = {name_of[spec]: model for spec, model in models.items()}
    _check_members_agree(by_name)
    first = by_name[names[0]]
    postprocessing = None
    if config.pp_pkl_file:
        postprocessing = read_postprocessing(
            config.pp_pkl_file,
            config.plans_json or os.path.join(first.folder, "plans.json"),
            config.dataset_json or os.path.join(first.folder, "dataset.json"),
        )
    plan = StagePlan(
        members=tuple(members),
        ensemble=tuple(names),
        postprocessing=postprocessing,
        stages_dir=stages_dir(run_state_dir(config)),
        file_ending=first.file_ending,
        save_probabilities=config.save_probabilities,
        keep=config.keep_stages,
        fused=config.profile == "fast" and _can_fuse(names, members),
    )
    return by_name[plan.final_member() or names[0]], plan


def _can_fuse(ensemble: list[str], members: list[Member]) -> bool:
    """Whether --profile fast may average the ensemble in the worker: an ensemble of members none
    of which another member needs as its previous stage (that one's files must exist), all in one
    axis order (the average is taken before the axes are restored)."""
    if len(ensemble) < 2 or any(m.previous in ensemble for m in members):
        return False
    orders = set()
    for m in members:
        if m.name in ensemble:
            with open(os.path.join(m.folder, "plans.json")) as f:
                orders.add(tuple(json.load(f).get("transpose_forward", ())))
    return len(orders) == 1


def _check_members_agree(models: dict[str, ModelInfo]) -> None:
    """nnUNetv2_ensemble averages probabilities label by label: the members must predict the same
    labels from the same inputs."""
    names = list(models)
    first = models[names[0]]
    for name in names[1:]:
        model = models[name]
        for what, a, b in (
            ("labels", first.labels, model.labels),
            ("input channels", first.num_channels, model.num_channels),
            ("file ending", first.file_ending, model.file_ending),
        ):
            if a != b:
                raise LauncherError(f"members {names[0]!r} and {name!r} differ in their {what}: {a} vs {b}")


def _apply_inference_information(config: RunConfig, given: set[str] | None) -> None:
    """--best / --inference-info: the members, folds and postprocessing that
    nnUNetv2_find_best_configuration chose (its inference_information.json)."""
    flag = "--inference-info" if config.inference_info else "--best"
    chosen = {"configuration", "trainer", "plans", "folds", "pp_pkl_file"}
    if (given is None and (config.configuration or config.pp_pkl_file)) or chosen & (given or set()):
        raise LauncherError(
            f"{flag} chooses the configurations, trainers, plans, folds and postprocessing; "
            "leave out -c, -tr, -p, -f, -pp_pkl_file"
        )
    path = config.inference_info
    if path is None:
        if not config.dataset:
            raise LauncherError("--best needs -d DATASET (its nnUNet_results folder holds inference_information.json)")
        path = os.path.join(resolve_dataset_folder(config.dataset), "inference_information.json")
        if not os.path.isfile(path):
            raise LauncherError(
                f"--best: {path!r} does not exist; run nnUNetv2_find_best_configuration first "
                "(or give --inference-info FILE)"
            )
    try:
        with open(path) as f:
            info = json.load(f)
        best = info["best_model_or_ensemble"]
        selected = best["selected_model_or_models"]
        specs = [(m["trainer"], m["plans_identifier"], m["configuration"]) for m in selected]
        folds = tuple(str(f) for f in info["folds"])
    except OSError as exc:
        raise LauncherError(f"{flag} {path!r}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise LauncherError(
            f"{flag} {path!r} is not an inference_information.json of nnUNetv2_find_best_configuration ({exc!r})"
        ) from None
    if not specs:
        raise LauncherError(f"{flag} {path!r} selects no model")
    if config.dataset is None:
        config.dataset = str(info.get("dataset_name_or_id"))
    config.trainer, config.plans, config.configuration = (
        tuple(s[i] for s in specs) if len(specs) > 1 else specs[0][i] for i in range(3)
    )
    config.folds = folds
    config.pp_pkl_file = best.get("postprocessing_file")
    config.plans_json = config.plans_json or best.get("some_plans_file")
    if config.pp_pkl_file and not os.path.isfile(config.pp_pkl_file):
        raise LauncherError(f"{flag}: its postprocessing file {config.pp_pkl_file!r} does not exist")


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
            f"-prev_stage_predictions (the {config.model.previous_stage!r} outputs), or -d DATASET instead of -m "
            "so that the launcher predicts that stage too"
        )
    if not os.path.isdir(config.prev_stage_predictions):
        where = config.prev_stage_predictions
        raise LauncherError(missing_folder("-prev_stage_predictions folder", where, "it takes the folder of outputs"))


def resolve_model_folder(config: RunConfig) -> str:
    if config.model_folder:
        if config.dataset:
            raise LauncherError("give either -m MODEL_FOLDER or -d DATASET, not both")
        return config.model_folder
    if not config.dataset or not config.configuration:
        raise LauncherError("give -m MODEL_FOLDER, or -d DATASET and -c CONFIGURATION")
    dataset_folder = resolve_dataset_folder(config.dataset)
    name = f"{config.trainer}__{config.plans}__{config.configuration}"
    folder = os.path.join(dataset_folder, name)
    if not os.path.isdir(folder):
        found = sorted(  # model folders only: not ensembles/, inference_information.json, ...
            d
            for d in os.listdir(dataset_folder)
            if d.count("__") == 2 and os.path.isdir(os.path.join(dataset_folder, d))
        )
        raise LauncherError(
            f"no model {name!r} in {dataset_folder!r} (trainer__plans__configuration "
            f"found: {', '.join(found) or 'none'})"
        )
    return folder


def resolve_dataset_folder(dataset: str) -> str:
    """$nnUNet_results/DatasetXXX_Name for -d XXX or -d DatasetXXX_Name."""
    results = os.environ.get("nnUNet_results")
    if not results or not os.path.isdir(results):
        raise LauncherError(
            "-d needs the nnUNet_results environment variable to name an existing folder (or give -m MODEL_FOLDER)"
        )
    datasets = sorted(d for d in os.listdir(results) if os.path.isdir(os.path.join(results, d)))
    if dataset.isdigit():
        wanted = [d for d in datasets if re.fullmatch(rf"Dataset{int(dataset):03d}_.+", d)]
    else:
        wanted = [d for d in datasets if d == dataset]
    if len(wanted) != 1:
        raise LauncherError(
            f"dataset {dataset!r} not found in nnUNet_results={results!r} (found: {', '.join(datasets) or 'none'})"
        )
    return os.path.join(results, wanted[0])


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
        labels=json.dumps(dataset.get("labels", {}), sort_keys=True),
        reader_writer=of_plans(plans),
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


@dataclass(frozen=True)
class RunIdentity:
    """What decides the outputs' content: a resumed run must match it field for field. Every
    field is always there (None when unused); a journal written before a field existed reads as
    that field's default. The one place that says what "the same run" means."""

    model_folder: str
    configuration: str | None
    folds: tuple[str, ...]
    checkpoint: str
    input_folder: str
    step_size: float
    disable_tta: bool
    save_probabilities: bool
    prev_stage_predictions: str | None = None
    profile: str = "exact"
    # multi-stage runs (stages.StagePlan.identity)
    members: tuple[str, ...] | None = None
    ensemble: tuple[str, ...] | None = None
    postprocessing: str | None = None
    postprocessing_plans: str | None = None
    final_stage: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> RunIdentity:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in known}
        return cls(**values)

    def diff(self, other: RunIdentity) -> list[str]:
        """The fields that differ, in the schema's order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def output_identity(config: RunConfig) -> RunIdentity:
    stages = config.stages.identity() if config.stages else {}
    return RunIdentity(
        model_folder=config.model.folder,
        configuration=config.model.configuration,
        folds=tuple(config.model.folds),
        checkpoint=config.checkpoint,
        input_folder=os.path.realpath(config.input_folder),
        step_size=config.step_size,
        disable_tta=config.disable_tta,
        save_probabilities=config.save_probabilities,
        prev_stage_predictions=(
            os.path.realpath(config.prev_stage_predictions) if config.prev_stage_predictions else None
        ),
        profile=config.profile,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in stages.items()},
    )
