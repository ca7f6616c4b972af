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
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

from launcher.errors import LauncherError
from launcher.journal import DONE, Journal, OutLock
from launcher.outputs import case_outputs, journal_path, lock_path, node_state_dirs, slurm_dir, state_dir
from launcher.scheduler import static_parts

ARRAY_SCRIPT = "array.sbatch"
VERIFY_SCRIPT = "verify.sbatch"
# SIGTERM this long before the time limit: the launcher stops in seconds (5 s grace for its
# workers), and SLURM may send the signal up to 60 s early
STOP_SIGNAL = "B:TERM@120"
DEFAULT_CPUS_PER_GPU = 8  # a GPU worker's predictor, 3 preprocessing and 3 export processes
DEFAULT_CPUS_PER_CPU_WORKER = 4
DEFAULT_VERIFY_TIME = "1:00:00"  # it reads every output once (gzip checks) and merges journals
NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")

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
    "gres": "--gpus-per-node",
    "gpus": "--gpus-per-node",
    "gpus-per-node": "--gpus-per-node",
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


def refuse_local_only(gpus: str | None, skip_busy: bool) -> None:
    """--gpus and --skip-busy pick GPUs by what NVML shows on this host; on a node the GPUs are
    the ones SLURM granted the task (CUDA_VISIBLE_DEVICES), which this host cannot know."""
    for flag, given in (("--gpus", gpus is not None), ("--skip-busy", skip_busy)):
        if given:
            raise LauncherError(
                f"{flag} is for one machine and is refused by `slurm`: SLURM decides which GPUs a task gets "
                "(--gpus-per-node, its gres); leave it out"
            )


def make_job(
    *,
    device: str,
    workers: int,
    workers_per_gpu: int,
    nodes: int,
    gpus_per_node: int,
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
    if device == "cuda":
        parts_per_node, gres = gpus_per_node * workers_per_gpu, gpus_per_node
        cpus = cpus_per_task or (cpus_per_gpu or DEFAULT_CPUS_PER_GPU) * gpus_per_node
    else:
        parts_per_node, gres = workers, None
        cpus = cpus_per_task or DEFAULT_CPUS_PER_CPU_WORKER * workers
    return JobSpec(
        nodes=nodes,
        parts_per_node=parts_per_node,
        gpus_per_node=gres,
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


# --- the scripts ----------------------------------------------------------------------------
def _directives(job: JobSpec, partition: str | None, time: str | None, extra: tuple[str, ...]) -> list[str]:
    lines = [f"#SBATCH --{key}={value}" for key, value in (("partition", partition), ("time", time)) if value]
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    return lines + [f"#SBATCH {arg}" for arg in extra]


def _body(job: JobSpec, command: list[str], tail: str = "") -> list[str]:
    lines = []
    if job.environment:
        lines.append("# the nnUNet_* variables of the shell that ran `nnunet-launch slurm`")
        lines += [f"export {name}={shlex.quote(value)}" for name, value in job.environment]
    if job.prelude:
        lines.append("# --prelude")
        lines += job.prelude.rstrip("\n").split("\n")
    lines.append(f"exec {shlex.join(command)}{tail}")
    return lines


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
        lines.append(f"#SBATCH --gres=gpu:{job.gpus_per_node}")
    lines += [
        "# SIGTERM (scancel, preemption, requeue; and this signal before the time limit) stops the",
        "# launcher cleanly: exit 130, nothing charged; a requeued or resubmitted task resumes its share",
        "#SBATCH --requeue",
        f"#SBATCH --signal={STOP_SIGNAL}",
        *_directives(job, job.partition, job.time, job.sbatch_args),
        "",
    ]
    if job.gpus_per_node:
        lines.append("# SLURM's --gres sets CUDA_VISIBLE_DEVICES; the launcher uses only those GPUs.")
    command = [sys.executable, "-m", "launcher", "run", *run_args]
    command += ["--nodes", str(job.nodes), "--parts-per-node", str(job.parts_per_node)]
    lines += _body(job, command, ' --node "$SLURM_ARRAY_TASK_ID"')
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
    command = [sys.executable, "-m", "launcher", "verify", *run_args]
    command += ["--nodes", str(job.nodes), "--parts-per-node", str(job.parts_per_node)]
    lines += _body(job, command)
    return "\n".join(lines) + "\n"


def write_scripts(out: str, array_text: str, verify_text: str) -> tuple[str, str]:
    os.makedirs(slurm_dir(out), exist_ok=True)
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


def discard_previous(out: str, case_ids: list[str], file_ending: str, save_probabilities: bool) -> int | None:
    """--fresh, once, at submit time: what `run --fresh` discards (the launcher's state and the
    outputs it wrote), for a plain run's state and every node's, each under its lock (refused
    while a launcher runs there). The nodes' folders go entirely, so a smaller array leaves no
    stale node behind. Returns the number of output files removed, None when there was nothing."""
    states = [s for s in (state_dir(out), *node_state_dirs(out)) if os.path.isfile(journal_path(s))]
    names = {n for c in case_ids for n in case_outputs(c, file_ending, save_probabilities)}
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
                names |= {n for c in journal.cases_in_state(DONE) for n in case_outputs(c, file_ending, True)}
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


def check_with_sbatch(array_text: str, verify_text: str) -> None:
    """`sbatch --test-only` on both scripts (read from stdin: nothing is written yet), so an
    unknown partition or an impossible request is refused before OUT changes."""
    sbatch = require_sbatch()
    for text in (array_text, verify_text):
        result = subprocess.run([sbatch, "--test-only"], input=text, capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            raise LauncherError(f"sbatch refuses the job: {lines[-1] if lines else f'exit {result.returncode}'}")


def submit(out: str, array_path: str, verify_path: str) -> tuple[str, str]:
    """Submit the array, then the verify job after it (afterany: it runs even when tasks fail,
    to say what is missing). Returns the two job ids."""
    sbatch = require_sbatch()
    chdir = f"--chdir={slurm_dir(out)}"
    array_id = _sbatch([sbatch, "--parsable", chdir, array_path])
    verify_id = _sbatch([sbatch, "--parsable", chdir, f"--dependency=afterany:{array_id}", verify_path])
    return array_id, verify_id


def _sbatch(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LauncherError(f"sbatch failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]
