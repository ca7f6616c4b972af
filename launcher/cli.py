"""The command line: parsing and printing only. Errors are one line on stderr, exit 2."""

from __future__ import annotations

import json
import sys
import traceback

import click

from launcher import config as run_config
from launcher.errors import LauncherError

EXIT_USAGE = 2

# nnUNetv2_predict's flags, same spelling; (decls, click kwargs, RunConfig field)
PREDICT_OPTIONS = [
    (("-i", "input_folder"), dict(type=str, help="input folder (CASE_XXXX<file_ending> files)")),
    (("-o", "output_folder"), dict(type=str, help="output folder")),
    (("-m", "model_folder"), dict(type=str, help="trained model folder (as nnUNetv2_predict_from_modelfolder)")),
    (("-d", "dataset"), dict(type=str, help="dataset name or id (needs nnUNet_results)")),
    (("-p", "plans"), dict(type=str, help="plans identifier [nnUNetPlans]")),
    (("-tr", "trainer"), dict(type=str, help="trainer class [nnUNetTrainer]")),
    (("-c", "configuration"), dict(type=str, help="configuration, e.g. 3d_fullres")),
    (("-f", "folds"), dict(type=str, multiple=True, help="folds, e.g. -f 0 1 2 [0 1 2 3 4]")),
    (("-step_size", "step_size"), dict(type=float, help="sliding window step size [0.5]")),
    (("--disable_tta", "disable_tta"), dict(is_flag=True, default=None, help="no mirroring")),
    (("--verbose", "verbose"), dict(is_flag=True, default=None, help="talk more; tracebacks on errors")),
    (("--save_probabilities", "save_probabilities"), dict(is_flag=True, default=None)),
    (
        ("--continue_prediction", "--c", "continue_prediction"),
        dict(is_flag=True, default=None, help="keep outputs already in OUT that decode (resume is the default)"),
    ),
    (("-chk", "checkpoint"), dict(type=str, help="checkpoint name [checkpoint_final.pth]")),
    (("-npp", "npp"), dict(type=int, help="preprocessing processes per worker [cores / workers]")),
    (("-nps", "nps"), dict(type=int, help="export processes per worker [cores / workers]")),
    (("-prev_stage_predictions", "prev_stage_predictions"), dict(type=str)),
    (("-device", "device"), dict(type=str, help="cuda or cpu [cuda]")),
    (("--gpus", "gpus"), dict(type=str, help="GPUs to use: all, or NVML indices/UUIDs like 0,2 [all]")),
    (("--workers", "workers"), dict(type=int, help="parallel workers with -device cpu [1]")),
    (("--workers-per-gpu", "workers_per_gpu"), dict(type=int, help="workers per GPU [1]")),
    (
        ("--schedule", "schedule"),
        dict(type=str, help="dynamic: largest case first to idle workers; static: nnU-Net's exact split [dynamic]"),
    ),
    (("--max-restarts", "max_restarts"), dict(type=int, help="restarts per part [3]")),
    (("--case-retries", "case_retries"), dict(type=int, help="retries of a failing case [2]")),
    (("--hang-timeout", "hang_timeout"), dict(type=float, help="seconds without progress = hung")),
    (("--fresh", "fresh"), dict(is_flag=True, default=None, help="discard this OUT's previous run")),
]


def expand_nargs_folds(args: list[str]) -> list[str]:
    """nnU-Net takes `-f 0 1 2` (argparse nargs='+'); click takes one value per flag."""
    result, i = [], 0
    while i < len(args):
        result.append(args[i])
        if args[i] == "-f":
            i += 1
            first = True
            while i < len(args) and (first or not args[i].startswith("-")):
                if not first:
                    result.append("-f")
                result.append(args[i])
                first = False
                i += 1
            continue
        i += 1
    return result


def predict_options(command):
    command = click.option("--config", "config_file", type=str, help="TOML file with run settings")(command)
    for decls, kwargs in reversed(PREDICT_OPTIONS):
        command = click.option(*decls, **kwargs)(command)
    return command


def build_config(values: dict) -> run_config.RunConfig:
    config_file = values.pop("config_file")
    values["folds"] = values["folds"] or None
    return run_config.build(values, config_file)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Run nnU-Net v2 inference over every GPU of this machine, unattended."""


@cli.command(context_settings={"ignore_unknown_options": False})
@predict_options
def run(**values):
    """Predict every case of -i into -o, one worker per GPU (nnUNetv2_predict's flags)."""
    from launcher.runner import run as execute

    config = build_config(values)
    sys.exit(execute(config, sys.argv[1:]))


@cli.command()
@predict_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plan(as_json, **values):
    """Dry run: show the parts, their GPUs and cases; start nothing, write nothing."""
    from launcher.planning import make_plan

    the_plan = make_plan(build_config(values))
    if as_json:
        click.echo(json.dumps(the_plan.to_json(), indent=2))
        return
    click.echo(
        f"{len(the_plan.cases)} case(s) in {the_plan.num_parts} part(s); per worker "
        f"{the_plan.threads} torch thread(s), npp={the_plan.npp}, nps={the_plan.nps}"
    )
    for entry in the_plan.to_json()["parts"]:
        ids = entry["cases"]
        shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
        click.echo(f"  part {entry['part_id']} on {entry['gpu']}: {shown}")


@cli.command()
@click.argument("output_folder")
@click.option("--json", "as_json", is_flag=True)
def status(output_folder, as_json):
    """Progress of the run on OUTPUT_FOLDER (read-only; safe during a run)."""
    from launcher.status import render_status, status_dict

    info = status_dict(output_folder)
    click.echo(json.dumps(info, indent=2) if as_json else render_status(info))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def gpus(as_json):
    """The GPUs NVML sees, with memory and compute processes."""
    from launcher import gpus as inventory

    try:
        found = inventory.inventory()
    except inventory.NvmlUnavailable as exc:
        raise LauncherError(f"{exc}; {inventory.CPU_HINT}") from None
    if as_json:
        click.echo(json.dumps([g.to_json() for g in found], indent=2))
        return
    for g in found:
        click.echo(
            f"{g.index}  {g.uuid}  {g.name}  {g.memory_used / 2**30:.1f}/{g.memory_total / 2**30:.1f} GiB "
            f"used, {len(g.processes)} process(es)"
        )
    if not found:
        click.echo("no GPU found")


def main(argv: list[str] | None = None) -> None:
    args = expand_nargs_folds(list(sys.argv[1:] if argv is None else argv))
    verbose = "--verbose" in args
    try:
        cli.main(args=args, prog_name="nnunet-launch", standalone_mode=False)
    except LauncherError as exc:
        _fail(str(exc), verbose)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        _fail(exc.format_message(), verbose)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug of ours: still one line, the traceback with --verbose
        if verbose:
            traceback.print_exc()
        print(f"nnunet-launch: internal error: {type(exc).__name__}: {exc} (rerun with --verbose for details)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


def _fail(message: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc()
    print(f"nnunet-launch: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
