"""The command line: parsing and printing only. Errors are one line on stderr, exit 2."""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from launcher import config as run_config
from launcher.errors import LauncherError
from launcher.exits import EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_NO_SPACE, EXIT_OK, EXIT_USAGE, exit_code_of
from launcher.terminal import make_output_best_effort

# nnUNetv2_predict's flags, same spelling; (decls, click kwargs, RunConfig field)
PREDICT_OPTIONS = [
    (("-i", "input_folder"), dict(type=str, help="input folder (CASE_XXXX<file_ending> files)")),
    (("-o", "output_folder"), dict(type=str, help="output folder")),
    (("-m", "model_folder"), dict(type=str, help="trained model folder (as nnUNetv2_predict_from_modelfolder)")),
    (("-d", "dataset"), dict(type=str, help="dataset name or id (needs nnUNet_results)")),
    (("-p", "plans"), dict(type=str, multiple=True, help="plans identifier (one, or one per configuration)")),
    (("-tr", "trainer"), dict(type=str, multiple=True, help="trainer class (one, or one per configuration)")),
    (
        ("-c", "configuration"),
        dict(type=str, multiple=True, help="configuration, e.g. 3d_fullres; several: their ensemble"),
    ),
    (("-f", "folds"), dict(type=str, multiple=True, help="folds, e.g. -f 0 1 2")),
    (("-step_size", "step_size"), dict(type=float, help="sliding window step size")),
    (("--disable_tta", "disable_tta"), dict(is_flag=True, default=None, help="no mirroring")),
    (("--verbose", "verbose"), dict(is_flag=True, default=None, help="talk more; tracebacks on errors")),
    (
        ("--save_probabilities", "save_probabilities"),
        dict(is_flag=True, default=None, help="also write the softmax probabilities (.npz) and properties (.pkl)"),
    ),
    (
        ("--continue_prediction", "--c", "continue_prediction"),
        dict(is_flag=True, default=None, help="keep outputs already in OUT that decode (resume is the default)"),
    ),
    (("-chk", "checkpoint"), dict(type=str, help="checkpoint name")),
    (("-npp", "npp"), dict(type=int, help="preprocessing processes per worker [default: cores / workers, at most 3]")),
    (("-nps", "nps"), dict(type=int, help="export processes per worker [default: cores / workers, at most 3]")),
    (
        ("-prev_stage_predictions", "prev_stage_predictions"),
        dict(type=str, help="folder with the previous stage's segmentations (cascade)"),
    ),
    (
        ("-pp_pkl_file", "pp_pkl_file"),
        dict(type=str, help="apply this postprocessing.pkl to the final segmentations"),
    ),
    (
        ("-plans_json", "plans_json"),
        dict(type=str, help="plans.json for the postprocessing [default: the first model's]"),
    ),
    (
        ("-dataset_json", "dataset_json"),
        dict(type=str, help="dataset.json for the postprocessing [default: the first model's]"),
    ),
    (
        ("--best", "best"),
        dict(
            is_flag=True,
            default=None,
            help="predict what nnUNetv2_find_best_configuration chose for -d (its inference_information.json)",
        ),
    ),
    (("--inference-info", "inference_info"), dict(type=str, help="like --best, from this inference_information.json")),
    (
        ("--keep-stages", "keep_stages"),
        dict(is_flag=True, default=None, help="keep each member's predictions (in OUT/.nnunet-launch/stages)"),
    ),
    (("-num_parts", "num_parts"), dict(type=int, help="split the input into N parts as nnU-Net does...")),
    (("-part_id", "part_id"), dict(type=int, help="...and predict only part K (on every local GPU)")),
    (("-device", "device"), dict(type=click.Choice(["cuda", "cpu"]), help="where to predict")),
    (("--gpus", "gpus"), dict(type=str, help="GPUs to use: all, or NVML indices/UUIDs like 0,2")),
    (("--workers", "workers"), dict(type=int, help="parallel workers with -device cpu")),
    (("--workers-per-gpu", "workers_per_gpu"), dict(type=int, help="workers per GPU")),
    (
        ("--schedule", "schedule"),
        dict(
            type=click.Choice(["dynamic", "static"]),
            help="dynamic: largest case first to idle workers; static: nnU-Net's exact split",
        ),
    ),
    (
        ("--profile", "profile"),
        dict(
            type=click.Choice(run_config.PROFILES),
            help="exact: voxel-identical to nnUNetv2_predict [default]; fast: export with nnU-Net's torch "
            "resampling on the worker's GPU (a few voxels differ, see the README)",
        ),
    ),
    (
        ("--deterministic", "deterministic"),
        dict(
            is_flag=True,
            default=None,
            help="on a GPU, cuDNN's deterministic kernels instead of its autotuning: the same voxels run after run "
            "(nnU-Net autotunes, so two of its runs can differ in a few voxels); slower convolutions",
        ),
    ),
    (
        ("--max-restarts", "max_restarts"),
        dict(
            type=int,
            help="a part gives up when its worker died more than N times since it last finished a case "
            "(deaths charged to a case count against --case-retries instead)",
        ),
    ),
    (("--case-retries", "case_retries"), dict(type=int, help="retries of a failing case")),
    (
        ("--hang-timeout", "hang_timeout"),
        dict(
            type=float,
            help="seconds (finite, > 0) a case may show no progress before its worker counts as hung [default: 10x the "
            "slowest finished case scaled by size, at least 300; 900 before any case finished]",
        ),
    ),
    (
        ("--on-finish", "on_finish"),
        dict(
            help="a shell command run once when the run ends, with NNUNET_LAUNCH_EXIT_CODE, NNUNET_LAUNCH_SUMMARY "
            "and more in its environment (samples in configs/); its failure is logged, never the run's",
        ),
    ),
    (("--fresh", "fresh"), dict(is_flag=True, default=None, help="discard this OUT's previous run")),
    (("--skip-busy", "skip_busy"), dict(is_flag=True, default=None, help="leave out GPUs other programs use")),
    (
        ("--skip-bad-inputs", "skip_bad_inputs"),
        dict(
            is_flag=True,
            default=None,
            help="predict the cases that are fine and name the misnamed files and cases with missing channels "
            "(else refused, all listed)",
        ),
    ),
    (
        ("--disable_progress_bar", "disable_progress_bar"),
        dict(is_flag=True, default=None, help="accepted for nnUNetv2_predict's sake (no progress bar is shown)"),
    ),
]
# flags of nnUNetv2_predict the launcher accepts and ignores (a pasted command line just works)
IGNORED_FIELDS = ("disable_progress_bar",)


def normalize_args(args: list[str]) -> list[str]:
    """A pasted nnUNetv2_predict line and habits from it: `-f 0 1 2` (argparse nargs='+'),
    `--gpus 0 1` like `--gpus 0,1`, and the launcher's own long flags with underscores
    (`--workers_per_gpu`, as nnU-Net spells its flags) as well as with dashes."""
    args = [_dashed(a) for a in args]
    return _join_gpu_list(expand_nargs(args))


def _dashed(arg: str) -> str:
    flag, eq, value = arg.partition("=")
    dashed = flag.replace("_", "-")
    return dashed + eq + value if flag.startswith("--") and dashed in LAUNCHER_FLAGS else arg


def _join_gpu_list(args: list[str]) -> list[str]:
    result, i = [], 0
    while i < len(args):
        result.append(args[i])
        i += 1
        if result[-1] == "--gpus":
            values = []
            while i < len(args) and (not values or not args[i].startswith("-")):
                values.append(args[i])
                i += 1
            result.append(",".join(v.strip(",") for v in values))
    return result


NARGS_FLAGS = ("-f", "-c", "-tr", "-p")


def expand_nargs(args: list[str]) -> list[str]:
    """nnU-Net takes `-f 0 1 2` and `-c 2d 3d_fullres` (argparse nargs='+'); click takes one
    value per flag."""
    result, i = [], 0
    while i < len(args):
        result.append(args[i])
        if args[i] in NARGS_FLAGS:
            flag = args[i]
            i += 1
            first = True
            while i < len(args) and (first or not args[i].startswith("-")):
                if not first:
                    result.append(flag)
                result.append(args[i])
                first = False
                i += 1
            continue
        i += 1
    return result


LAUNCHER_FLAGS = {d for decls, _ in PREDICT_OPTIONS for d in decls[:-1] if d.startswith("--") and "-" in d[2:]} | {
    "--cpus-per-gpu",
    "--cpus-per-task",
    "--gpus-per-node",
    "--sbatch-arg",
    "--verify-partition",
    "--verify-time",
}


def _with_default(decls: tuple, kwargs: dict) -> dict:
    """Options default to None (so a --config file can fill them); the help shows the real default."""
    field = decls[-1]
    default = getattr(run_config.RunConfig(), field, None)
    if kwargs.get("is_flag") or default in (None, ""):
        return kwargs
    shown = " ".join(default) if isinstance(default, tuple) else default
    return {**kwargs, "help": f"{kwargs.get('help', '')} [default: {shown}]".strip()}


def predict_options(command):
    command = click.option(
        "--config", "config_file", type=str, help="TOML file with run settings (flags win); see configs/"
    )(command)
    for decls, kwargs in reversed(PREDICT_OPTIONS):
        command = click.option(*decls, **_with_default(decls, kwargs))(command)
    return command


def build_config(values: dict) -> run_config.RunConfig:
    for field in IGNORED_FIELDS:
        values.pop(field, None)
    config_file = values.pop("config_file")
    for field in ("folds", *run_config.MEMBER_KEYS):
        values[field] = values[field] or None
    return run_config.build(values, config_file)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nnunet-launch", prog_name="nnunet-launch")
def cli():
    """Run nnU-Net v2 inference over every GPU of this machine, unattended."""


def node_options(command):
    """Set by the generated SLURM scripts: this node's share of a K-node run."""
    command = click.option("--node", "node", type=int, hidden=True)(command)
    command = click.option("--nodes", "nodes", type=int, hidden=True)(command)
    return click.option("--parts-per-node", "parts_per_node", type=int, hidden=True)(command)


PATH_FIELDS = (
    "input_folder",
    "output_folder",
    "model_folder",
    "prev_stage_predictions",
    "config_file",
    "pp_pkl_file",
    "plans_json",
    "dataset_json",
    "inference_info",
)
# flags that act once, when given (--fresh discards outputs): `slurm` applies them itself at submit
# time and never writes them into a script that SLURM requeues and users resubmit
ONE_TIME_FIELDS = ("fresh",)


def run_argv(values: dict) -> list[str]:
    """The `run` flags the user gave, rebuilt with absolute paths (for scripts run elsewhere),
    less the one-time flags."""
    args = []
    for decls, kwargs in PREDICT_OPTIONS + [(("--config", "config_file"), {})]:
        value = values.get(decls[-1])
        if value is None or value == () or value is False or decls[-1] in ONE_TIME_FIELDS:
            continue
        if kwargs.get("is_flag"):
            args.append(decls[0])
        elif kwargs.get("multiple"):
            args += [decls[0], *value]
        else:
            args += [decls[0], os.path.abspath(value) if decls[-1] in PATH_FIELDS else str(value)]
    return args


@cli.command(context_settings={"ignore_unknown_options": False})
@predict_options
@node_options
def run(**values):
    """Predict every case of -i into -o, one worker per GPU (nnUNetv2_predict's flags)."""
    from launcher.runner import run as execute

    config = build_config(values)
    sys.exit(execute(config, sys.argv[1:]))


@cli.command()
@predict_options
@click.option("--nodes", "num_nodes", type=click.IntRange(min=1), required=True, help="array tasks (machines)")
@click.option(
    "--gpus-per-node",
    type=str,
    default="1",
    show_default=True,
    help="GPUs each task asks for: G, or TYPE:G where the site types its GPUs (a100:4 is --gres=gpu:a100:4); "
    "ignored with -device cpu",
)
@click.option("--cpus-per-gpu", type=click.IntRange(min=1), help="CPUs each task asks for per GPU [default: 8]")
@click.option(
    "--cpus-per-task",
    type=click.IntRange(min=1),
    help="CPUs each task asks for, in all [default: 8 per GPU; with -device cpu 4 per worker]",
)
@click.option("--partition", type=str, help="SLURM partition")
@click.option("--time", "time_limit", type=str, help="SLURM time limit, e.g. 12:00:00")
@click.option("--account", type=str, help="SLURM account")
@click.option("--verify-partition", type=str, help="partition of the verify job (1 CPU, no GPU) [default: --partition]")
@click.option("--verify-time", type=str, default="1:00:00", show_default=True, help="time limit of the verify job")
@click.option(
    "--prelude", type=str, help="file of shell lines run before the launcher in each job (module load, venv activation)"
)
@click.option("--sbatch-arg", "sbatch_args", multiple=True, help="extra #SBATCH option, one --key[=value] (repeatable)")
@click.option("--submit", is_flag=True, help="submit with sbatch and print the job ids")
def slurm(
    num_nodes,
    gpus_per_node,
    cpus_per_gpu,
    cpus_per_task,
    partition,
    time_limit,
    account,
    verify_partition,
    verify_time,
    prelude,
    sbatch_args,
    submit,
    **values,
):
    """Write (and with --submit, submit) a SLURM job array running `run` on K machines, plus a
    verify job after it. Checks the input first, like `run`; --fresh is applied here, once."""
    import shlex

    from launcher import slurm as jobs
    from launcher.cases import discover

    jobs.refuse_local_only(values.get("gpus"), bool(values.get("skip_busy")))
    fresh = bool(values.get("fresh"))
    forwarded = run_argv(values)
    jobs.check_argv(forwarded)
    config = build_config(values)
    # a --config file's gpus/skip_busy would reach the nodes' `run` just the same
    jobs.refuse_local_only(None if config.gpus == "all" else config.gpus, config.skip_busy)
    out = os.path.abspath(config.output_folder)
    jobs.refuse_line_breaks("output folder", out)
    model = config.model
    cases = discover(
        config.input_folder, model.file_ending, model.num_channels, config.skip_bad_inputs, model.reader_writer
    )
    job = jobs.make_job(
        device=config.device,
        workers=config.workers,
        workers_per_gpu=config.workers_per_gpu,
        nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_gpu=cpus_per_gpu,
        cpus_per_task=cpus_per_task,
        partition=partition,
        time=time_limit,
        account=account,
        verify_partition=verify_partition,
        verify_time=verify_time,
        sbatch_args=sbatch_args,
        prelude=prelude,
        environ=dict(os.environ),
        num_parts=config.num_parts,
    )
    job = jobs.with_default_memory(job, config, cases)
    ids = [c.id for c in cases]
    if not fresh:
        jobs.check_foreign_outputs(out, ids, model.file_ending, job, config.continue_prediction)
    array_text, verify_text = jobs.array_script(forwarded, job), jobs.verify_script(forwarded, job)
    if submit:
        jobs.check_with_sbatch(array_text, verify_text, job)
    for warning in [*jobs.warnings(len(ids), job), *jobs.node_local_warnings(out, job)]:
        click.echo(f"nnunet-launch: warning: {warning}", err=True)
    if fresh:
        removed = jobs.discard_previous(out, ids, model.file_ending, config.save_probabilities, model.reader_writer)
        if removed is not None:
            click.echo(
                f"nnunet-launch: --fresh: discarded the previous run's state and {removed} output file(s) in {out}"
            )
    array_path, verify_path = jobs.write_scripts(out, array_text, verify_text)
    click.echo(array_text)
    click.echo(f"# written: {array_path}\n#          {verify_path}")
    if submit:
        array_id, verify_id = jobs.submit(out, array_path, verify_path, job)
        click.echo(f"submitted: array job {array_id} ({num_nodes} task(s)), verify job {verify_id}")
        click.echo(f"status (from any host): nnunet-launch status {shlex.quote(out)}")
        click.echo(f"resume after a time limit or a cancel: {jobs.resubmit_command(out)}")
    else:
        click.echo(f"submit with: {jobs.resubmit_command(out)}")
        click.echo(f"and then: {jobs.verify_command(out, after='<array job id>')}")


@cli.command(hidden=True)
@predict_options
@click.option("--nodes", "num_nodes", type=click.IntRange(min=1), required=True)
@click.option("--parts-per-node", type=click.IntRange(min=1), required=True)
def verify(num_nodes, parts_per_node, **values):
    """After a SLURM array: every case has a complete output? (the verify job runs this)"""
    from launcher.verify import verify as check

    config = build_config(values)
    code, lines = check(config, num_nodes, parts_per_node)
    for line in lines:
        click.echo(line, err=bool(code))
    if config.on_finish:  # once per SLURM run: its tasks leave it to this job, which runs after them all
        from launcher.notify import notify_finished
        from launcher.outputs import state_dir

        notify_finished(config.on_finish, config.output_folder, state_dir(config.output_folder), code)
    sys.exit(code)


@cli.command()
@predict_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plan(as_json, **values):
    """Dry run: what `run` would do with the same arguments (the parts, their GPUs and cases,
    what OUT already holds); it refuses what `run` refuses; starts nothing, writes nothing."""
    from launcher.model_check import ModelCheck, Models
    from launcher.planning import make_plan
    from launcher.runner import FRESH_NAMES_SHOWN, describe_fresh, inspect_out, nothing_to_predict, stage_facts
    from launcher.stages import describe_stages

    config = build_config(values)
    with ModelCheck(Models.of_config(config)) as model:  # it loads in a child while the input is planned
        the_plan = make_plan(config)
        view = inspect_out(config, the_plan)
        if not nothing_to_predict(config, view):
            model.wait()
    broken = set(the_plan.broken) - view.done  # never predicted: not to do
    to_do = len(the_plan.cases) - len(view.done) - len(broken)
    kept = len(view.book.verify)
    assignment = the_plan.to_do(view.book.done | broken)
    work = {k: sum(the_plan.work.get(c, 0.0) for c in ids) for k, ids in assignment.items()}
    facts = {
        "model_folder": config.model.folder,
        "done": len(view.done),
        "to_do": to_do,
        "failed_tried_again": view.book.retried,
        "outputs_verified_and_kept_if_whole": kept,
        "broken_inputs": the_plan.broken,
        "fresh_would_delete": len(view.fresh_would_delete),
        "fresh_would_delete_files": view.fresh_would_delete,
        "assignment": "estimate" if the_plan.schedule == "dynamic" else "exact",
        **({"stages": stage_facts(the_plan, view)} if the_plan.stages else {}),
    }
    if as_json:
        click.echo(json.dumps({**the_plan.to_json(assignment), **facts}, indent=2))
        return
    for warning in the_plan.warnings:
        click.echo(f"nnunet-launch: warning: {warning}", err=True)
    click.echo(f"model folder: {config.model.folder}")
    if the_plan.stages:
        click.echo(f"stages per case: {describe_stages(the_plan.stages)}")
        for stage, counts in facts["stages"]["per_stage"].items():
            click.echo(f"  stage {stage}: {counts['done']}/{counts['total']} case(s) done")
    if nothing_to_predict(config, view):
        click.echo(f"{len(the_plan.cases)} case(s), all done in the output folder: nothing to predict")
        return
    notes = [f"{view.book.retried} that failed before are tried again"] if view.book.retried else []
    notes += [f"{kept} output(s) already in the output folder are verified and kept if whole"] if kept else []
    click.echo(
        f"{len(the_plan.cases)} case(s): {len(view.done)} already done in the output folder, {to_do} to predict"
        + (f" ({'; '.join(notes)})" if notes else "")
    )
    if the_plan.broken:
        names = sorted(the_plan.broken)
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        click.echo(f"{len(names)} case(s) with a cut or corrupt input are not predicted: {shown}")
    if config.fresh:
        listed = "plan --json" if len(view.fresh_would_delete) > FRESH_NAMES_SHOWN else None
        click.echo(f"--fresh would delete {describe_fresh(view.fresh_would_delete, listed)} and the launcher's state")
    click.echo(
        f"{the_plan.num_parts} part(s); per worker {the_plan.threads} torch thread(s), "
        f"npp={the_plan.npp}, nps={the_plan.nps}"
    )
    if the_plan.device_bytes_per_worker:
        extra = " (--profile fast: mirrored batches, fold sums and the export on the device)"
        click.echo(
            f"GPU memory per worker: about {the_plan.device_bytes_per_worker / 2**30:.1f} GiB, a rough estimate"
            + (extra if config.profile == "fast" else "")
        )
    if the_plan.schedule == "dynamic":
        click.echo(
            "dynamic schedule: idle workers take the largest case left; the split below is the launcher's own "
            "feeding with each case's time taken as proportional to its size (an estimate)"
        )
    total = sum(work.values()) or 1.0
    labels = {s.part_id: s.label for s in the_plan.slots}
    for part_id, ids in assignment.items():
        if ids:
            shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
            share = f"{100 * work[part_id] / total:.0f}% of the work"
            click.echo(f"  part {part_id} on {labels[part_id]}: {len(ids)} case(s), {share}: {shown}")
    idle = sum(1 for ids in assignment.values() if not ids)
    if idle:
        click.echo(f"  {idle} part(s) get nothing (more parts than cases to predict)")


@cli.command()
@click.argument("output_folder")
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="refresh until the run ends (or Ctrl-C)")
@click.option(
    "--every", type=click.FloatRange(min=0.5), default=2.0, show_default=True, help="seconds between --watch frames"
)
def status(output_folder, as_json, watch, every):
    """Progress of the run on OUTPUT_FOLDER (read-only; safe during a run). Exit 0 while it runs or
    when every case is predicted, 1 when cases failed or the last run stopped before the end."""
    from launcher.status import exit_code, render_status, status_dict
    from launcher.status import watch as watch_status

    if watch:
        sys.exit(watch_status(output_folder, every, as_json))
    info = status_dict(output_folder)
    click.echo(json.dumps(info, indent=2) if as_json else render_status(info))
    sys.exit(exit_code(info))


@cli.command()
@click.argument("output_folder")
def report(output_folder):
    """Draw the run on OUTPUT_FOLDER as a picture: report.html (self-contained) and report.png in
    its state folder, from the journal (read-only); prints the paths written."""
    from launcher.picture import matplotlib_missing
    from launcher.picture import report as draw

    for path in draw(output_folder):
        click.echo(path)
    if missing := matplotlib_missing():
        click.echo(f"nnunet-launch: note: {missing}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def gpus(as_json):
    """The GPUs NVML sees, with memory and compute processes."""
    from launcher import gpus as inventory

    try:
        found = inventory.inventory()
    except inventory.NvmlUnavailable as exc:  # a machine without GPUs: an answer, not an error
        print(f"nnunet-launch: {exc}; {inventory.CPU_HINT}", file=sys.stderr)
        click.echo("[]" if as_json else "no GPU found")
        return
    if as_json:
        click.echo(json.dumps([g.to_json() for g in found], indent=2))
        return
    if not found:
        click.echo("no GPU found")
        return
    from rich.console import Console
    from rich.table import Table

    rows = []
    for g in found:
        procs = ", ".join(f"{p['pid']} ({p['used_memory'] / 2**30:.1f} GiB)" for p in g.processes) or "-"
        rows.append(
            (str(g.index), g.uuid, g.name, f"{g.memory_used / 2**30:.1f} / {g.memory_total / 2**30:.1f} GiB", procs)
        )
    if not sys.stdout.isatty():  # in a pipe: whole UUIDs (what reproduces a part by hand), tab-separated
        click.echo("\t".join(("index", "UUID", "name", "memory used", "processes")))
        for row in rows:
            click.echo("\t".join(row))
        return
    table = Table("index", "UUID", "name", "memory used", "processes")
    table.columns[1].no_wrap = True
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="the same as one JSON object (checks: name, status, detail, fix)")
def doctor(as_json):
    """The environment as the launcher sees it, one line a check (ok, warning or problem, with the
    fix): Python, torch and CUDA, torchvision, nnunetv2 (version, where, editable, supported),
    nnUNet_extTrainer's trainers, the nnUNet_* folders, the NVIDIA driver and GPUs. Exit 0 when
    nothing is a problem (warnings allowed), 1 when anything is."""
    from launcher.doctor import main as diagnose

    sys.exit(diagnose(as_json))


def main(argv: list[str] | None = None) -> None:
    make_output_best_effort()  # a run outlives its terminal (launcher/terminal.py)
    args = normalize_args(list(sys.argv[1:] if argv is None else argv))
    verbose = "--verbose" in args
    try:
        cli.main(args=args, prog_name="nnunet-launch", standalone_mode=False)
    except LauncherError as exc:
        _fail(str(exc), verbose)
    except click.exceptions.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.exceptions.NoSuchOption) and exc.option_name == "--dry-run":
            hint = "; `nnunet-launch plan` with the same arguments is the dry run"
        _fail(exc.format_message() + hint, verbose)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if exit_code_of(exc) != EXIT_NO_SPACE:
            _internal_error(exc, verbose)  # a bug of ours: one line, exit 70; the traceback with --verbose
        # a full disk before the supervisor took over (journal, metadata): rerun once there is space
        print(f"nnunet-launch: stopped: {exc}", file=sys.stderr)
        sys.exit(EXIT_NO_SPACE)
    sys.exit(EXIT_OK)


def _internal_error(exc: BaseException, verbose: bool) -> None:
    if verbose:
        traceback.print_exc()
    print(
        f"nnunet-launch: internal error: {type(exc).__name__}: {exc} (a bug: the traceback is in "
        "OUT/.nnunet-launch/logs/supervisor.log when a run had started; --verbose prints it)",
        file=sys.stderr,
    )
    sys.exit(EXIT_INTERNAL_ERROR)


def _fail(message: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc()
    print(f"nnunet-launch: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
