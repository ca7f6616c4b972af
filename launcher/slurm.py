"""Many machines through SLURM: a job array whose task k runs `nnunet-launch run` on node share
k of K, and a verify job after it. SLURM is the scheduler; each task is the single-machine
launcher with everything it does (restarts, journal, resume), on its node's share.

Global num_parts = K x G (G = worker slots per node); node k owns parts k*G .. k*G+G-1 of
nnU-Net's strided split, so any part is still reproducible with plain nnUNetv2_predict.

Scripts that are safe for any path. sbatch reads `#SBATCH` lines with its own tokenizer, stops
at the first line that is not a comment, and has no escape for every character: a newline in a
value ends the directive (the rest becomes a shell line, and the directives after it are lost),
and a double quote cannot be written inside a quoted value. So no user path is ever written into
an `#SBATCH` line: the logs are named relative to the job's working folder
(OUT/.nnunet-launch/slurm, given to sbatch as `--chdir` on its command line), user paths appear
only shell-quoted in the script's body, and the other values that do go into directives
(partition, time, account, extra arguments) are checked against SLURM's syntax. Newlines and
carriage returns are refused everywhere, before anything is written.

A script is run again by SLURM (requeue, preemption) and by users (resubmission), so it holds
only what is right every time: flags that act once (--fresh) are applied by `slurm` itself at
submit time and never written into it.

The work runs as a job step (`srun`), so SLURM accounts it, binds it and signals it like any
step. srun itself turns a SIGTERM it receives into SIGKILL for its step (Slurm's srun_job.c,
_srun_signal_mgr: "forcing job termination"), which would cut the launcher's clean stop short. So
the stop signal before the time limit goes to the steps, not to the batch shell (`--signal=TERM@120`,
no `B:`), and a SIGTERM that reaches the batch shell is passed on to the step through SLURM
(`scancel --signal=TERM` of this task: its steps, not the batch shell with srun in it). A job's
end (scancel, preemption, requeue, time limit) signals the steps itself, with KillWait's grace.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from launcher.cases import Case
from launcher.config import RunConfig
from launcher.errors import LauncherError
from launcher.headers import read_header
from launcher.journal import DONE, Journal, OutLock
from launcher.outputs import (
    case_outputs,
    journal_path,
    lock_path,
    node_state_dirs,
    slurm_dir,
    state_dir,
    write_text_atomically,
)
from launcher.planning import checkpoint_bytes, helper_processes, worker_host_bytes
from launcher.readers_writers import previous_reader_writer
from launcher.scheduler import static_parts

ARRAY_SCRIPT = "array.sbatch"
VERIFY_SCRIPT = "verify.sbatch"
SUBMITTED_FILE = "submitted.json"  # the job ids of the last `slurm --submit`, for `status`
# SIGTERM this long before the time limit: the launcher stops in seconds (5 s grace for its
# workers), and SLURM may send the signal up to 60 s early. To the job's steps (the launcher's
# srun step), not to the batch shell: see the module docstring
STOP_SIGNAL = "TERM@120"
DEFAULT_CPUS_PER_GPU = 8  # a GPU worker's predictor, 3 preprocessing and 3 export processes
DEFAULT_CPUS_PER_CPU_WORKER = 4
DEFAULT_VERIFY_TIME = "1:00:00"  # it reads every output once (gzip checks) and merges journals
NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# the default --mem: per worker what planning.memory_warning estimates for the largest case and
# the model weights, plus half a GiB for each of the worker's processes (predictor, -npp, -nps:
# torch and nnU-Net imported; the launcher's supervisor alone is 350 MB, benchmarks/RESULTS.md),
# at least 8 GiB
MIN_MEMORY_PER_WORKER = 8 * 2**30
MEMORY_PER_PROCESS = 2**29
# sbatch options that set the memory request (--mem-bind does not)
MEMORY_KEYS = ("mem", "mem-per-cpu", "mem-per-gpu")
# `module load`/`ml` lines of the prelude, and the module names of GPU stacks: those are left out
# of the verify job, which runs on the CPU (a CPU partition may not have these modules at all)
MODULE_LINE = re.compile(r"(\s*(?:module\s+(?:load|add)|ml))((?:\s+[\w./+@-]+)+)\s*")
GPU_MODULE = re.compile(r"cuda|cudnn|nvhpc", re.IGNORECASE)
# sbatch's words for "no node can hold one task of this job"
RESOURCES_REFUSED = ("Requested node configuration is not available", "More processors requested than permitted")

# sbatch's --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; or no limit
TIME_FORMAT = re.compile(r"(\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE|unlimited|infinite)")
NAME_FORMAT = re.compile(r"[A-Za-z0-9_.+@-]+")
# one --key[=value] token: printable ASCII without spaces, quotes, backslashes or '#' (which
# sbatch's directive parser would split, unquote or read as a comment)
SBATCH_ARG_FORMAT = re.compile(r"--([a-z][a-z0-9-]*)(=[\x21\x24-\x26\x28-\x5b\x5d-\x7e]+)?")
# directives the scripts depend on: set by nnunet-launch itself, or by one of its options
RESERVED_SBATCH_KEYS = {
    "array": "--nodes",
    "nodes": "--nodes",
    "partition": "--partition",
    "time": "--time",
    "account": "--account",
    "cpus-per-task": "--cpus-per-task",
    "cpus-per-gpu": "--cpus-per-gpu",
    "gres": "--gpus-per-node (G, or TYPE:G for typed GPUs: a100:4)",
    "gpus": "--gpus-per-node (G, or TYPE:G for typed GPUs: a100:4)",
    "gpus-per-node": "--gpus-per-node (G, or TYPE:G for typed GPUs: a100:4)",
    "chdir": None,
    "output": None,
    "error": None,
    "open-mode": None,
    "requeue": None,
    "no-requeue": None,
    "signal": None,
    "ntasks": None,
    "job-name": None,
    "dependency": None,
    "wrap": None,
    "workdir": None,  # an old name of --chdir
}


@dataclass(frozen=True)
class JobSpec:
    """What the two scripts ask SLURM for, validated."""

    nodes: int
    parts_per_node: int
    gpus_per_node: int | None  # None: CPU workers, no GPU request
    cpus_per_task: int
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    verify_partition: str | None = None
    verify_time: str = DEFAULT_VERIFY_TIME
    sbatch_args: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()  # nnUNet_* variables to export
    prelude: str = ""
    memory_gib: int | None = None  # the default --mem; None when --sbatch-arg sets the memory
    gpu_type: str | None = None  # --gpus-per-node TYPE:G, as sites that type their GPUs require


# --- checking what goes into a script ---------------------------------------------------------
def refuse_line_breaks(what: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise LauncherError(
            f"{what} {value!r} contains a line break, which a SLURM script cannot hold safely; rename it"
        )


def check_argv(argv: list[str]) -> None:
    """Every value of the `run` flags forwarded to the scripts (each named by its flag)."""
    for i, token in enumerate(argv):
        flag = argv[i - 1] if i and argv[i - 1].startswith("-") else token
        refuse_line_breaks(flag, token)


def _check_directive_value(option: str, value: str | None, pattern: re.Pattern, example: str) -> None:
    if value is None:
        return
    refuse_line_breaks(option, value)
    if not pattern.fullmatch(value):
        raise LauncherError(f"{option} {value!r} is not a valid SLURM value (e.g. {option} {example})")


def check_sbatch_arg(arg: str) -> None:
    refuse_line_breaks("--sbatch-arg", arg)
    match = SBATCH_ARG_FORMAT.fullmatch(arg)
    if not match:
        raise LauncherError(
            f"--sbatch-arg {arg!r} must be one --key[=value] token without spaces, quotes, backslashes "
            "or '#' (e.g. --sbatch-arg=--mem=64G; repeat --sbatch-arg for several)"
        )
    # sbatch (getopt_long) takes any unambiguous prefix of an option: --arr is --array
    reserved = next((k for k in RESERVED_SBATCH_KEYS if k.startswith(match.group(1))), None)
    if reserved is not None:
        own = RESERVED_SBATCH_KEYS[reserved]
        raise LauncherError(
            f"--sbatch-arg {arg!r}: "
            + (f"use nnunet-launch's {own} instead" if own else f"nnunet-launch sets --{reserved} itself")
            + ("" if reserved == match.group(1) else f" (sbatch reads --{match.group(1)} as --{reserved})")
        )


def nnunet_environment(environ: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The nnUNet_* variables of the submitting shell, paths made absolute: a job starts in
    another folder, often from another shell (a resubmission), so the script carries them."""
    found = []
    for name in sorted(environ):
        if not name.startswith("nnUNet_") or not name.isidentifier():
            continue
        value = environ[name]
        if name in NNUNET_PATH_VARIABLES and value:
            value = os.path.abspath(value)
        refuse_line_breaks(f"environment variable {name}", value)
        found.append((name, value))
    return tuple(found)


def read_prelude(path: str) -> str:
    """The user's shell lines for every job (module loads, a venv's activation)."""
    refuse_line_breaks("--prelude", path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise LauncherError(f"--prelude {path!r}: {exc.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise LauncherError(f"--prelude {path!r} is not UTF-8 text") from None
    if "\r" in text or "\0" in text:
        raise LauncherError(
            f"--prelude {path!r} has carriage returns or NUL bytes (Windows line endings? convert it with dos2unix)"
        )
    for line in text.splitlines():
        if line.lstrip().startswith("#SBATCH"):
            raise LauncherError(
                f"--prelude {path!r} holds an #SBATCH line ({line.strip()!r}); pass SLURM options with --sbatch-arg"
            )
    return text if not text or text.endswith("\n") else text + "\n"


GPUS_PER_NODE_FORMAT = re.compile(r"(?:([A-Za-z0-9_.-]+):)?([1-9][0-9]*)")


def parse_gpus_per_node(value: str) -> tuple[str | None, int]:
    """--gpus-per-node G or TYPE:G (a100:4): (the GPU type or None, the count)."""
    match = GPUS_PER_NODE_FORMAT.fullmatch(value.strip())
    if not match:
        raise LauncherError(
            f"--gpus-per-node {value!r}: give a count (4) or a GPU type and a count as your site names them (a100:4)"
        )
    return match.group(1), int(match.group(2))


def gres(job: JobSpec) -> str:
    """The GPU request of a task: gpu:G or gpu:TYPE:G."""
    return f"gpu:{job.gpu_type}:{job.gpus_per_node}" if job.gpu_type else f"gpu:{job.gpus_per_node}"


def refuse_local_only(gpus: str | None, skip_busy: bool) -> None:
    """--gpus and --skip-busy pick GPUs by what NVML shows on this host; on a node the GPUs are
    the ones SLURM granted the task (CUDA_VISIBLE_DEVICES), which this host cannot know."""
    for flag, given in (("--gpus", gpus is not None), ("--skip-busy", skip_busy)):
        if given:
            raise LauncherError(
                f"{flag} is for one machine and is refused by `slurm`: SLURM decides which GPUs a task gets "
                "(--gpus-per-node, its gres); leave it out"
            )


def sets_memory(sbatch_args: tuple[str, ...]) -> bool:
    """Whether the user's --sbatch-arg asks for memory itself (then no default --mem is written;
    sbatch refuses --mem with --mem-per-cpu/--mem-per-gpu anyway)."""
    keys = [m.group(1) for m in map(SBATCH_ARG_FORMAT.fullmatch, sbatch_args) if m]
    # sbatch takes an unambiguous prefix (--mem-per-c), and --mem exactly is --mem
    return any(k == "mem" or (k.startswith("mem-p") and any(full.startswith(k) for full in MEMORY_KEYS)) for k in keys)


def default_memory_gib(
    workers: int,
    cpus_per_task: int,
    largest_voxels: int,
    num_channels: int,
    num_labels: int,
    model_bytes: int,
    npp: int | None,
    nps: int | None,
) -> int:
    """The default --mem of a task, in whole GiB (see MIN_MEMORY_PER_WORKER). -npp/-nps are what
    the node will use: given, or what make_plan derives from the CPUs SLURM grants."""
    share = max(1, cpus_per_task // workers)
    npp, nps = helper_processes(npp, share), helper_processes(nps, share)
    estimate = worker_host_bytes(largest_voxels, num_channels, num_labels, npp, nps, model_bytes)
    per_worker = max(MIN_MEMORY_PER_WORKER, estimate + (1 + npp + nps) * MEMORY_PER_PROCESS)
    return -(-workers * per_worker // 2**30)


def with_default_memory(job: JobSpec, config: RunConfig, cases: list[Case]) -> JobSpec:
    """The job with its default --mem, unless --sbatch-arg asks for memory itself."""
    if sets_memory(job.sbatch_args):
        return job
    # the largest case from its first channel's header (no gzip checks: run does them on the node)
    largest = max((h.voxels for c in cases if (h := read_header(c.files[0])) is not None), default=0)
    memory = default_memory_gib(
        job.parts_per_node,
        job.cpus_per_task,
        largest,
        config.model.num_channels,
        config.model.num_labels,
        checkpoint_bytes(config),
        config.npp,
        config.nps,
    )
    return replace(job, memory_gib=memory)


def make_job(
    *,
    device: str,
    workers: int,
    workers_per_gpu: int,
    nodes: int,
    gpus_per_node: str | int,
    cpus_per_gpu: int | None,
    cpus_per_task: int | None,
    partition: str | None,
    time: str | None,
    account: str | None,
    verify_partition: str | None,
    verify_time: str,
    sbatch_args: tuple[str, ...],
    prelude: str | None,
    environ: dict[str, str],
    num_parts: int = 1,
) -> JobSpec:
    """Validate the SLURM options (LauncherError names the first bad one) and size the job."""
    if num_parts > 1:
        raise LauncherError("`slurm` splits the input itself (--nodes); leave out -num_parts/-part_id")
    _check_directive_value("--partition", partition, re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"), "gpu")
    _check_directive_value("--verify-partition", verify_partition, re.compile(r"[A-Za-z0-9_.-]+"), "cpu")
    _check_directive_value("--time", time, TIME_FORMAT, "12:00:00")
    _check_directive_value("--verify-time", verify_time, TIME_FORMAT, "30:00")
    _check_directive_value("--account", account, NAME_FORMAT, "mylab")
    for arg in sbatch_args:
        check_sbatch_arg(arg)
    if cpus_per_gpu is not None and device != "cuda":
        raise LauncherError("--cpus-per-gpu needs GPUs; with -device cpu give --cpus-per-task")
    if cpus_per_gpu is not None and cpus_per_task is not None:
        raise LauncherError("give --cpus-per-gpu or --cpus-per-task, not both")
    gpu_type, count = parse_gpus_per_node(str(gpus_per_node))
    if device == "cuda":
        parts_per_node, gres = count * workers_per_gpu, count
        cpus = cpus_per_task or (cpus_per_gpu or DEFAULT_CPUS_PER_GPU) * count
    else:
        parts_per_node, gres, gpu_type = workers, None, None
        cpus = cpus_per_task or DEFAULT_CPUS_PER_CPU_WORKER * workers
    refuse_line_breaks("the Python running nnunet-launch", sys.executable)
    return JobSpec(
        nodes=nodes,
        parts_per_node=parts_per_node,
        gpus_per_node=gres,
        gpu_type=gpu_type,
        cpus_per_task=cpus,
        partition=partition,
        time=time,
        account=account,
        verify_partition=verify_partition,
        verify_time=verify_time,
        sbatch_args=tuple(sbatch_args),
        environment=nnunet_environment(environ),
        prelude=read_prelude(prelude) if prelude is not None else "",
    )


def warnings(num_cases: int, job: JobSpec) -> list[str]:
    found = []
    parts = job.nodes * job.parts_per_node
    if parts > num_cases:
        needed = max(1, -(-num_cases // job.parts_per_node))
        idle = (
            f"node(s) {needed}..{job.nodes - 1} get no case and exit 0 at once; --nodes {needed} is enough"
            if needed < job.nodes
            else f"{parts - num_cases} worker slot(s) get no case"
        )
        found.append(
            f"{parts} part(s) ({job.nodes} node(s) x {job.parts_per_node} worker slot(s)) for {num_cases} case(s): "
            + idle
        )
    if job.cpus_per_task < job.parts_per_node:
        found.append(
            f"each task asks for {job.cpus_per_task} CPU(s) for {job.parts_per_node} workers: they will share cores"
        )
    return found


def node_local_warnings(out: str, job: JobSpec) -> list[str]:
    """OUT, and the Python that runs the launcher unless a --prelude puts one on the nodes' path,
    must be seen by the compute nodes: a folder on a local filesystem of this host (a temporary or
    scratch folder) usually is not."""
    from launcher.journal import on_network_filesystem

    found = []
    paths = [("the output folder", out)]
    if not job.prelude:
        paths.append(("the Python running nnunet-launch", sys.executable))
    for what, path in paths:
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not on_network_filesystem(existing):
            found.append(
                f"{what} ({path}) is on a local filesystem of this host: the compute nodes may not see it; "
                "use a shared filesystem (or a --prelude that puts the launcher on their path)"
            )
    return found


# --- the scripts ----------------------------------------------------------------------------
def _directives(job: JobSpec, partition: str | None, time: str | None, extra: tuple[str, ...]) -> list[str]:
    lines = [f"#SBATCH --{key}={value}" for key, value in (("partition", partition), ("time", time)) if value]
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    return lines + [f"#SBATCH {arg}" for arg in extra]


def cpu_prelude(prelude: str) -> str:
    """The prelude for the verify job, on the CPU: the GPU stack's modules (cuda, cudnn, nvhpc)
    taken out of simple `module load`/`ml` lines, a line left with none dropped, each change
    noted in a comment. Anything else is kept as it is (a venv path may well contain "cuda")."""
    lines = []
    for line in prelude.rstrip("\n").split("\n") if prelude else []:
        match = MODULE_LINE.fullmatch(line)
        names = match.group(2).split() if match else []
        kept = [n for n in names if not GPU_MODULE.search(n)]
        if len(kept) == len(names):
            lines.append(line)
            continue
        lines.append(f"# GPU modules left out (this job runs on the CPU): {line.strip()}")
        if kept:
            lines.append(f"{match.group(1)} {' '.join(kept)}")
    return "".join(f"{line}\n" for line in lines)


def _launcher(prelude: str) -> tuple[list[str], str]:
    """Shell lines that make sure the launcher is there on the node, and the words that run it.
    With a prelude, the nnunet-launch of the environment it set up (the submit host's venv path
    may not exist on the node); without, the Python that ran `slurm`, by absolute path."""
    if prelude:
        missing = (
            "nnunet-launch: no nnunet-launch on PATH after the --prelude lines; they must set up the "
            "environment that has it (e.g. source /shared/venvs/nnunet/bin/activate)"
        )
        check = f"nnunet_launch=$(command -v nnunet-launch) || {{ echo {shlex.quote(missing)} >&2; exit 127; }}"
        return ["# the nnunet-launch of the environment the --prelude set up", check], '"$nnunet_launch"'
    python = shlex.quote(sys.executable)
    missing = (
        f"nnunet-launch: {sys.executable} does not exist on this node; put the environment on shared "
        "storage or pass --prelude FILE with the lines that set it up"
    )
    return [
        "# the Python that ran `nnunet-launch slurm`, by absolute path: it must exist on the node too",
        f"[ -x {python} ] || {{ echo {shlex.quote(missing)} >&2; exit 127; }}",
    ], f"{python} -m launcher"


def _body(job: JobSpec, prelude: str) -> tuple[list[str], str]:
    """The script's lines before the work, and the words that run the launcher."""
    lines = []
    if job.environment:
        lines.append("# the nnUNet_* variables of the shell that ran `nnunet-launch slurm`")
        lines += [f"export {name}={shlex.quote(value)}" for name, value in job.environment]
    if prelude:
        lines.append("# --prelude")
        lines += prelude.rstrip("\n").split("\n")
    check, launcher = _launcher(prelude)
    return lines + check, launcher


def array_script(run_args: list[str], job: JobSpec) -> str:
    """Task k runs the launcher on share k; requeue-safe because each share resumes from its own
    journal in OUT/.nnunet-launch/node-k/."""
    lines = [
        "#!/bin/bash",
        "# nnunet-launch: array task k predicts node share k of the input. Submit it with",
        "# `sbatch --chdir=<this folder> array.sbatch`: the log names are relative to that folder.",
        "#SBATCH --job-name=nnunet-launch",
        "#SBATCH --output=task-%a.log",
        "# a requeued or resubmitted task adds to its log instead of erasing the earlier attempt's",
        "#SBATCH --open-mode=append",
        f"#SBATCH --array=0-{job.nodes - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={job.cpus_per_task}",
    ]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gres={gres(job)}")
    if job.memory_gib:
        lines.append(f"#SBATCH --mem={job.memory_gib}G")
    lines += [
        "# SIGTERM (scancel, preemption, requeue; and this signal to the step before the time limit)",
        "# stops the launcher cleanly: exit 130, nothing charged; a requeued or resubmitted task resumes",
        "#SBATCH --requeue",
        f"#SBATCH --signal={STOP_SIGNAL}",
        *_directives(job, job.partition, job.time, job.sbatch_args),
        "",
    ]
    if job.gpus_per_node:
        lines.append("# SLURM's --gres sets CUDA_VISIBLE_DEVICES; the launcher uses only those GPUs.")
    body, launcher = _body(job, job.prelude)
    command = ["run", *run_args, "--nodes", str(job.nodes), "--parts-per-node", str(job.parts_per_node)]
    step = ["srun", "--ntasks=1", f"--cpus-per-task={job.cpus_per_task}"]
    step += [f"--gres={gres(job)}"] if job.gpus_per_node else []
    lines += body
    lines += [
        "# srun would turn a SIGTERM it gets into SIGKILL for the step: this shell passes one it gets",
        "# on to the step through SLURM instead (this task's steps, not the batch shell srun runs in)",
        "trap 'scancel --signal=TERM \"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\" 2>/dev/null' TERM",
        f'{shlex.join(step)} {launcher} {shlex.join(command)} --node "$SLURM_ARRAY_TASK_ID" &',
        "step=$!",
        "# wait returns early when the trap runs: wait until srun ends, and exit with its status (the launcher's)",
        'status=0; wait "$step" || status=$?',
        'while kill -0 "$step" 2>/dev/null; do status=0; wait "$step" || status=$?; done',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def verify_script(run_args: list[str], job: JobSpec) -> str:
    lines = [
        "#!/bin/bash",
        "# nnunet-launch: after the array, checks that every case has a complete output and merges",
        "# the nodes' reports. One CPU, no GPU. Submit it with `sbatch --chdir=<this folder>`.",
        "#SBATCH --job-name=nnunet-launch-verify",
        "#SBATCH --output=verify.log",
        "#SBATCH --open-mode=append",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=1",
        *_directives(job, job.verify_partition or job.partition, job.verify_time, ()),
        "",
    ]
    body, launcher = _body(job, cpu_prelude(job.prelude))
    command = ["verify", *run_args, "--nodes", str(job.nodes), "--parts-per-node", str(job.parts_per_node)]
    lines += body
    lines.append(f"exec srun --ntasks=1 --cpus-per-task=1 {launcher} {shlex.join(command)}")
    return "\n".join(lines) + "\n"


def write_scripts(out: str, array_text: str, verify_text: str) -> tuple[str, str]:
    os.makedirs(slurm_dir(out), exist_ok=True)
    try:  # new scripts: the jobs of an earlier submission are not theirs (submit() records anew)
        os.remove(os.path.join(slurm_dir(out), SUBMITTED_FILE))
    except FileNotFoundError:
        pass
    paths = []
    for name, text in ((ARRAY_SCRIPT, array_text), (VERIFY_SCRIPT, verify_text)):
        path = os.path.join(slurm_dir(out), name)
        with open(path, "w") as f:
            f.write(text)
        paths.append(path)
    return paths[0], paths[1]


def resubmit_command(out: str, nodes: list[int] | None = None) -> str:
    """The shell command that (re)submits the array, or these of its tasks, from any folder."""
    folder = slurm_dir(out)
    array = [f"--array={','.join(map(str, nodes))}"] if nodes else []
    return shlex.join(["sbatch", f"--chdir={folder}", *array, os.path.join(folder, ARRAY_SCRIPT)])


def verify_command(out: str, after: str | None = None) -> str:
    folder = slurm_dir(out)
    dependency = [f"--dependency=afterany:{after}"] if after else []
    return shlex.join(["sbatch", f"--chdir={folder}", *dependency, os.path.join(folder, VERIFY_SCRIPT)])


# --- OUT before submitting --------------------------------------------------------------------
def check_foreign_outputs(
    out: str, case_ids: list[str], file_ending: str, job: JobSpec, continue_prediction: bool
) -> None:
    """A task refuses predictions in OUT that no launcher made (as `run` does) when its node has
    no state yet: say so now, not from inside the job."""
    if continue_prediction or not os.path.isdir(out):
        return
    present = set(os.listdir(out))
    parts = static_parts(sorted(case_ids), job.nodes * job.parts_per_node)
    for node in range(job.nodes):
        if os.path.isdir(state_dir(out, node)):
            continue
        mine = [c for p in parts[node * job.parts_per_node : (node + 1) * job.parts_per_node] for c in p]
        strays = [c + file_ending for c in mine if c + file_ending in present]
        if strays:
            raise LauncherError(
                f"output folder already holds prediction(s) not made by nnunet-launch (e.g. {strays[0]!r}); "
                "add --continue_prediction to keep the ones that decode completely, or --fresh to predict "
                "everything again"
            )


def discard_previous(
    out: str, case_ids: list[str], file_ending: str, save_probabilities: bool, writer: str | None = None
) -> int | None:
    """--fresh, once, at submit time: what `run --fresh` discards (the launcher's state and the
    outputs it wrote), for a plain run's state and every node's, each under its lock (refused
    while a launcher runs there). The nodes' folders go entirely, so a smaller array leaves no
    stale node behind. Returns the number of output files removed, None when there was nothing.
    `writer`: the image reader/writer whose files go (None: the one of the run that wrote OUT)."""
    states = [s for s in (state_dir(out), *node_state_dirs(out)) if os.path.isfile(journal_path(s))]
    writer = writer or previous_reader_writer(out)
    names = {n for c in case_ids for n in case_outputs(c, file_ending, save_probabilities, writer)}
    present = set(os.listdir(out)) if os.path.isdir(out) else set()
    if not states and not names & present:
        return None
    locks = []
    try:
        for state in states:
            lock = OutLock(lock_path(state))
            lock.acquire()
            locks.append(lock)
        for state in states:
            journal = Journal.open(journal_path(state))
            try:
                names |= {n for c in journal.cases_in_state(DONE) for n in case_outputs(c, file_ending, True, writer)}
                journal.clear()
            finally:
                journal.close()
        removed = 0
        for name in sorted(names):
            try:
                os.remove(os.path.join(out, name))
                removed += 1
            except FileNotFoundError:
                pass
        for node in node_state_dirs(out):
            shutil.rmtree(node)
    finally:
        for lock in locks:
            lock.release()
    return removed


# --- sbatch -----------------------------------------------------------------------------------
def require_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LauncherError("sbatch not found: run this on a SLURM login node (or leave out --submit)")
    return sbatch


def check_with_sbatch(array_text: str, verify_text: str, job: JobSpec) -> None:
    """`sbatch --test-only` on both scripts (read from stdin: nothing is written yet), so an
    unknown partition or an impossible request is refused before OUT changes."""
    sbatch = require_sbatch()
    for text, which in ((array_text, "array"), (verify_text, "verify")):
        result = subprocess.run([sbatch, "--test-only"], input=text, capture_output=True, text=True)
        if result.returncode != 0:
            raise LauncherError(_refusal(result, job, which))


def _refusal(result: subprocess.CompletedProcess, job: JobSpec, which: str) -> str:
    """sbatch's last line; when no node could hold one task, what was asked and the flags to change."""
    output = result.stderr + result.stdout
    lines = [line for line in output.splitlines() if line.strip()]
    message = f"sbatch refuses the {which} job: {lines[-1] if lines else f'exit {result.returncode}'}"
    if not any(phrase in output for phrase in RESOURCES_REFUSED):
        return message
    if which == "verify":
        return message + " (it asks for 1 CPU and the time limit --verify-time on --verify-partition)"
    gpus = f"{job.gpus_per_node} GPU(s) (--gpus-per-node), " if job.gpus_per_node else ""
    cpu_flags = "--cpus-per-gpu or --cpus-per-task" if job.gpus_per_node else "--cpus-per-task"
    memory = (
        f"{job.memory_gib} GiB (the default --mem; set it with --sbatch-arg=--mem=...)"
        if job.memory_gib
        else "the memory your --sbatch-arg asks for"
    )
    return (
        f"{message}; no node of the partition has what one task asks for: {gpus}{job.cpus_per_task} CPU(s) "
        f"({cpu_flags}), {memory}; lower these or choose another --partition"
    )


def submit(out: str, array_path: str, verify_path: str, job: JobSpec) -> tuple[str, str]:
    """Submit the array, then the verify job after it (afterany: it runs even when tasks fail,
    to say what is missing). Records the job ids for `status` (until a task starts, OUT holds
    nothing else that says the run exists). Returns the two job ids."""
    sbatch = require_sbatch()
    chdir = f"--chdir={slurm_dir(out)}"
    array_id = _sbatch([sbatch, "--parsable", chdir, array_path], job, "array")
    verify_id = _sbatch([sbatch, "--parsable", chdir, f"--dependency=afterany:{array_id}", verify_path], job, "verify")
    record = {"array_job": array_id, "verify_job": verify_id, "nodes": job.nodes, "submitted": time.time()}
    write_text_atomically(os.path.join(slurm_dir(out), SUBMITTED_FILE), json.dumps(record), slurm_dir(out))
    return array_id, verify_id


def _sbatch(command: list[str], job: JobSpec, which: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LauncherError(_refusal(result, job, which))
    return result.stdout.strip().split(";")[0]


# --- status before the tasks start ------------------------------------------------------------
def read_submitted(out: str) -> dict | None:
    """What the last `slurm --submit` on OUT recorded, or None."""
    try:
        with open(os.path.join(slurm_dir(out), SUBMITTED_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "array_job" in record else None


def queue_states(job_id: str) -> dict[str, int] | None:
    """{state: number of tasks} of a job in squeue ({} once it left the queue); None without squeue."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        result = subprocess.run(
            [squeue, "--noheader", "--array", "--jobs", job_id, "--format=%T"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:  # "Invalid job id specified": the job ended and was purged
        return {} if "Invalid job id" in result.stderr else None
    states: dict[str, int] = {}
    for state in result.stdout.split():
        states[state] = states.get(state, 0) + 1
    return states
