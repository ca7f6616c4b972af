"""SLURM: the job array and verify job, on a real SLURM cluster (Debian's Slurm 22.05 started by
the tests under a temporary folder), not a mock. The tests about preemption, requeue and
resubmission run the launcher with the fast stand-in for nnU-Net (launcher/fake_backend.py,
chosen by the environment sbatch passes on to the job); one array runs real nnU-Net end to end."""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, available

from conftest import (
    ROOT,
    assert_fake_outputs,
    assert_same_predictions,
    cli,
    copy_outputs_mtimes,
    fake_env,
    fake_final,
    linked_cases,
    run_args,
)
from launcher import slurm as jobs
from launcher.journal import lock_holder
from launcher.planning import Plan, memory_warning
from launcher.scheduler import Slot

# xdist: the module's test cluster runs once, on one xdist worker
pytestmark = pytest.mark.xdist_group("slurm")

GOLDEN = ROOT / "tests" / "golden"
# every character a shell or an #SBATCH line could trip on, but a line break
WEIRD_NAME = "-out \"dq\" 'sq' $HOME `id` ü 50%"


def slurm_args(data: dict, out: Path, *extra: str) -> list[str]:
    return [
        "slurm",
        "-i",
        str(data["inputs"]),
        "-o",
        str(out),
        "-m",
        str(data["model"]),
        "-f",
        "0",
        "--disable_tta",
        *extra,
    ]


def cpu_array(data: dict, out: Path, *extra: str) -> list[str]:
    """Two nodes, one CPU worker each, one CPU each (the test cluster has 2 CPUs per node)."""
    return slurm_args(data, out, "-device", "cpu", "--workers", "1", "--nodes", "2", "--cpus-per-task", "1", *extra)


def env_without_nnunet(**extra: str) -> dict:
    """This process's environment less any nnUNet_* variable (the scripts copy those)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}, **extra}


def launcher(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], capture_output=True, text=True, env=env, timeout=120
    )


def normalised_script(path: Path, small: dict, tmp_path: Path) -> str:
    text = path.read_text().replace(sys.executable, "PYTHON").replace(str(tmp_path), "TMP")
    return text.replace(shlex.quote(str(small["inputs"])), "INPUTS").replace(shlex.quote(str(small["model"])), "MODEL")


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_generated_scripts_match_the_golden_files(small, tmp_path, kind):
    out = tmp_path / "out 'q' 50%"
    if kind == "gpu":
        prelude = tmp_path / "prelude.sh"
        prelude.write_text("module load cuda/12.1\nsource /opt/venvs/nnunet/bin/activate\n")
        extra = [
            "-device",
            "cuda",
            "--nodes",
            "3",
            "--gpus-per-node",
            "4",
            "--cpus-per-gpu",
            "6",
            "--partition",
            "gpu-long",
            "--time",
            "12:00:00",
            "--account",
            "lab",
            "--verify-partition",
            "cpu",
            "--sbatch-arg=--mem=64G",
            "--sbatch-arg=--qos=high",
            "--prelude",
            str(prelude),
            "--fresh",  # applied now, never written into a script
        ]
        env = env_without_nnunet(nnUNet_results=str(tmp_path / "nnUNet results"), nnUNet_compile="f")
    else:
        extra = ["-device", "cpu", "--workers", "4", "--nodes", "2", "--time", "2-00:00:00"]
        env = env_without_nnunet()
    result = launcher(*slurm_args(small, out, *extra), env=env)
    assert result.returncode == 0, result.stderr
    folder = out / ".nnunet-launch" / "slurm"
    for name in ("array.sbatch", "verify.sbatch"):
        text = normalised_script(folder / name, small, tmp_path)
        golden = GOLDEN / f"{kind}-{name}"
        if os.environ.get("UPDATE_GOLDEN") == "1":  # after an intended change: review the diff
            golden.write_text(text)
        assert text == golden.read_text(), f"{name} differs from tests/golden/{golden.name}:\n{text}"


def test_slurm_checks_input_before_writing_or_submitting(small, tmp_path):
    out = tmp_path / "out"
    bad = cli(*cpu_array({**small, "inputs": tmp_path / "missing"}, out, "--submit"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    assert not out.exists()
    no_sbatch = cli(*cpu_array(small, out, "--submit"), env={"PATH": "/nonexistent"})
    assert no_sbatch.returncode == 2 and "sbatch not found" in no_sbatch.stderr
    assert no_sbatch.stderr.count("\n") == 1
    assert not out.exists()


def _prelude(tmp_path: Path, text: str) -> str:
    path = tmp_path / "prelude.sh"
    path.write_text(text)
    return str(path)


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


REFUSED = [
    ("newline in OUT", lambda t: ["-o", str(t / "out\ntouch injected")], "contains a line break"),
    ("carriage return in OUT", lambda t: ["-o", str(t / "out\rx")], "contains a line break"),
    ("newline in a partition", lambda t: ["--partition", "gpu\n#SBATCH --array=0-99"], "contains a line break"),
    ("partition with a space", lambda t: ["--partition", "gpu long"], "is not a valid SLURM value"),
    ("time in hours", lambda t: ["--time", "12h"], "--time '12h' is not a valid SLURM value"),
    ("account with a semicolon", lambda t: ["--account", "lab;id"], "is not a valid SLURM value"),
    ("gpus with a space", lambda t: ["--gpus-per-node", "a100 :4"], "give a count (4) or a GPU type and a count"),
    ("two sbatch options in one", lambda t: ["--sbatch-arg=--mem=64G --qos=high"], "one --key[=value] token"),
    ("sbatch argument with quotes", lambda t: ['--sbatch-arg=--comment="x"'], "one --key[=value] token"),
    ("short sbatch option", lambda t: ["--sbatch-arg=-p"], "one --key[=value] token"),
    ("sbatch output set by the launcher", lambda t: ["--sbatch-arg=--output=/tmp/x"], "sets --output itself"),
    ("sbatch time with its own option", lambda t: ["--sbatch-arg=--time=1:00"], "use nnunet-launch's --time"),
    ("sbatch array by abbreviation", lambda t: ["--sbatch-arg=--arr=0-99"], "sbatch reads --arr as --array"),
    ("sbatch signal by abbreviation", lambda t: ["--sbatch-arg=--sig=KILL@1"], "sets --signal itself"),
    ("sbatch no-requeue by abbreviation", lambda t: ["--sbatch-arg=--no-req"], "sets --no-requeue itself"),
    ("sbatch workdir", lambda t: ["--sbatch-arg=--workdir=/"], "sets --workdir itself"),
    ("sbatch chdir by abbreviation", lambda t: ["--sbatch-arg=--chd=/"], "sets --chdir itself"),
    ("sbatch wrap by abbreviation", lambda t: ["--sbatch-arg=--wra=ls"], "sets --wrap itself"),
    ("missing prelude", lambda t: ["--prelude", str(t / "none.sh")], "No such file or directory"),
    ("prelude with SBATCH", lambda t: ["--prelude", _prelude(t, "#SBATCH --mem=1G\n")], "holds an #SBATCH line"),
    ("prelude with CRLF", lambda t: ["--prelude", _prelude(t, "module load x\r\n")], "carriage returns"),
    ("cpus per GPU on the CPU", lambda t: ["--cpus-per-gpu", "4"], "--cpus-per-gpu needs GPUs"),
    ("nnU-Net's own split", lambda t: ["-num_parts", "2", "-part_id", "0"], "leave out -num_parts/-part_id"),
    # NVML's view of the submit host is not the node's: SLURM grants the GPUs
    (
        "local GPU choice",
        lambda t: ["--gpus", "0,1"],
        "--gpus is for one machine and is refused by `slurm`: SLURM decides which GPUs a task gets (--gpus-per-node",
    ),
    ("local busy-GPU skip", lambda t: ["--skip-busy"], "--skip-busy is for one machine and is refused by `slurm`"),
    ("GPU choice in a config file", lambda t: ["--config", _config(t, 'gpus = "1"\n')], "--gpus is for one machine"),
]


@pytest.mark.parametrize("extra, message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_unsafe_or_malformed_values_are_refused_before_anything_is_written(small, tmp_path, extra, message):
    out = tmp_path / "out"
    args = cpu_array(small, out, *extra(tmp_path))
    result = cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not list(tmp_path.rglob("*.sbatch")) and not list(tmp_path.rglob(".nnunet-launch"))
    assert not (tmp_path / "injected").exists()


def _job(prelude: str | None = None, **overrides) -> jobs.JobSpec:
    settings = dict(
        device="cpu",
        workers=1,
        workers_per_gpu=1,
        nodes=2,
        gpus_per_node=1,
        cpus_per_gpu=None,
        cpus_per_task=1,
        partition=None,
        time=None,
        account=None,
        verify_partition=None,
        verify_time="1:00:00",
        sbatch_args=(),
        prelude=prelude,
        environ={},
    )
    return jobs.make_job(**{**settings, **overrides})


def test_typed_gpus_are_asked_for_as_the_site_names_them_in_the_task_and_its_step():
    job = _job(device="cuda", gpus_per_node="a100:4", cpus_per_task=None, workers_per_gpu=2)
    assert (job.gpu_type, job.gpus_per_node, job.parts_per_node, job.cpus_per_task) == ("a100", 4, 8, 32)
    script = jobs.array_script(["-i", "in", "-o", "out"], job)
    assert "#SBATCH --gres=gpu:a100:4\n" in script and "srun --ntasks=1 --cpus-per-task=32 --gres=gpu:a100:4 " in script
    assert "#SBATCH --gres=gpu:2\n" in jobs.array_script([], _job(device="cuda", gpus_per_node="2"))


def _run_script(tmp_path: Path, text: str) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    """Run a generated script with bash outside SLURM, with a stand-in `srun` that records its
    arguments and exits 7: (the script's result, srun's arguments or None if it never ran)."""
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    srun = tools / "srun"
    srun.write_text('#!/bin/bash\nprintf \'%s\\0\' "$@" > "$SRUN_ARGS"\nexit 7\n')
    srun.chmod(0o755)
    script, recorded = tmp_path / "job.sbatch", tmp_path / "srun-args"
    script.write_text(text)
    env = {"PATH": f"{tools}:/usr/bin:/bin", "SRUN_ARGS": str(recorded), "SLURM_ARRAY_TASK_ID": "1"}
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    return result, recorded.read_text().split("\0")[:-1] if recorded.exists() else None


@pytest.mark.parametrize("kind", ["array", "verify"])
def test_without_a_prelude_a_task_whose_python_is_missing_on_the_node_stops_naming_it(tmp_path, monkeypatch, kind):
    gone = tmp_path / WEIRD_NAME / "bin" / "python"  # the submit host's venv, not on this node
    monkeypatch.setattr(sys, "executable", str(gone))
    make = jobs.array_script if kind == "array" else jobs.verify_script
    result, srun_args = _run_script(tmp_path, make(["-o", "/out"], _job()))
    assert result.returncode == 127, result.stderr
    assert result.stderr == (
        f"nnunet-launch: {gone} does not exist on this node; put the environment on shared storage or "
        "pass --prelude FILE with the lines that set it up\n"
    )
    assert srun_args is None, "nothing was started"


@pytest.mark.parametrize("kind", ["array", "verify"])
def test_with_a_prelude_a_task_runs_the_nnunet_launch_the_prelude_put_on_path_and_exits_with_its_status(tmp_path, kind):
    env_bin = tmp_path / WEIRD_NAME / "bin"  # the environment the prelude activates on the node
    env_bin.mkdir(parents=True)
    (env_bin / "nnunet-launch").write_text("#!/bin/sh\n")
    (env_bin / "nnunet-launch").chmod(0o755)
    prelude = _prelude(tmp_path, f'export PATH={shlex.quote(str(env_bin))}:"$PATH"\n')
    make = jobs.array_script if kind == "array" else jobs.verify_script
    result, srun_args = _run_script(tmp_path, make(["-o", "/out"], _job(prelude)))
    assert result.returncode == 7, "srun's status (the launcher's) is the job's"
    assert srun_args is not None and sys.executable not in srun_args
    launcher_at = srun_args.index(str(env_bin / "nnunet-launch"))
    assert srun_args[:launcher_at][0] == "--ntasks=1", srun_args
    assert srun_args[launcher_at + 1 : launcher_at + 4] == ["run" if kind == "array" else "verify", "-o", "/out"]
    if kind == "array":
        assert srun_args[-2:] == ["--node", "1"]


def test_with_a_prelude_that_leaves_nnunet_launch_off_path_the_task_stops_saying_so(tmp_path):
    prelude = _prelude(tmp_path, "module load cuda/12.1 2>/dev/null\n")  # no environment activated
    result, srun_args = _run_script(tmp_path, jobs.array_script(["-o", "/out"], _job(prelude)))
    assert result.returncode == 127 and srun_args is None
    assert "nnunet-launch: no nnunet-launch on PATH after the --prelude lines" in result.stderr


def test_verify_job_leaves_out_gpu_modules_and_keeps_every_other_prelude_line(small, tmp_path):
    lines = [
        "module load cuda/12.1",
        "module load CUDA/12.1 cuDNN/8.9 python/3.11",
        "ml nvhpc/24.1",
        "module load gcc/12",
        "source /shared/venvs/nnunet-cuda12/bin/activate",  # a venv path may say cuda: kept
        'export LD_LIBRARY_PATH=/opt/cuda/lib64:"$LD_LIBRARY_PATH"',
    ]
    out = tmp_path / "out"
    result = cli(*cpu_array(small, out, "--prelude", _prelude(tmp_path, "\n".join(lines) + "\n")))
    assert result.returncode == 0, result.stderr
    folder = out / ".nnunet-launch" / "slurm"
    array = (folder / "array.sbatch").read_text().splitlines()
    assert array[array.index("# --prelude") + 1 :][: len(lines)] == lines, "the array keeps every line"
    verify = (folder / "verify.sbatch").read_text().splitlines()
    assert verify[verify.index("# --prelude") + 1 :][:7] == [
        "# GPU modules left out (this job runs on the CPU): module load cuda/12.1",
        "# GPU modules left out (this job runs on the CPU): module load CUDA/12.1 cuDNN/8.9 python/3.11",
        "module load python/3.11",
        "# GPU modules left out (this job runs on the CPU): ml nvhpc/24.1",
        "module load gcc/12",
        "source /shared/venvs/nnunet-cuda12/bin/activate",
        'export LD_LIBRARY_PATH=/opt/cuda/lib64:"$LD_LIBRARY_PATH"',
    ]


def test_default_memory_holds_what_the_launcher_estimates_for_the_largest_case_and_its_weights():
    """The default --mem covers planning.memory_warning's estimate (so a node that has it gets no
    warning), plus the workers' processes, to the GiB."""
    workers, cpus, voxels, channels, labels, weights = 4, 16, 512**3, 2, 5, 3 * 2**30
    gib = jobs.default_memory_gib(workers, cpus, voxels, channels, labels, weights, None, None)
    npp = nps = 3  # 16 CPUs for 4 workers: 4 each, at most nnU-Net's default 3
    slots = [Slot(k, None, None) for k in range(workers)]
    plan = Plan(cases={}, slots=slots, parts={}, threads=1, npp=npp, nps=nps, largest_voxels=voxels)
    processes = workers * (1 + npp + nps) * jobs.MEMORY_PER_PROCESS
    assert memory_warning(plan, channels, labels, gib * 2**30 - processes, weights) is None
    assert memory_warning(plan, channels, labels, (gib - 1) * 2**30 - processes, weights) is not None
    # a small model and small cases: the floor of 8 GiB per worker
    assert jobs.default_memory_gib(workers, cpus, 64**3, 1, 2, 2**20, None, None) == 8 * workers


@pytest.mark.parametrize(
    "extra, directive",
    [
        ([], "#SBATCH --mem=16G"),  # 2 workers of a tiny model: the floor
        (["--sbatch-arg=--mem=64G"], "#SBATCH --mem=64G"),
        (["--sbatch-arg=--mem-per-cpu=2G"], None),
        (["--sbatch-arg=--mem-bind=local"], "#SBATCH --mem=16G"),  # binding, not an amount
    ],
    ids=["default", "mem", "mem-per-cpu", "mem-bind"],
)
def test_default_mem_is_written_unless_an_sbatch_arg_asks_for_memory(small, tmp_path, extra, directive):
    out = tmp_path / "out"
    args = slurm_args(small, out, "-device", "cpu", "--workers", "2", "--nodes", "2", *extra)
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    mem = [
        line
        for line in (out / ".nnunet-launch" / "slurm" / "array.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH --mem=")
    ]
    assert mem == ([directive] if directive else []), mem


def test_a_line_break_in_an_nnunet_variable_is_refused(small, tmp_path):
    result = cli(*cpu_array(small, tmp_path / "out"), env={"nnUNet_raw": "/data\nid"})
    assert result.returncode == 2 and "environment variable nnUNet_raw" in result.stderr
    assert not (tmp_path / "out").exists()


def test_more_parts_than_cases_warns_and_a_node_without_cases_exits_0_at_once(small, tmp_path):
    out = tmp_path / "out"
    result = cli(*slurm_args(small, out, "-device", "cpu", "--workers", "2", "--nodes", "5", "--cpus-per-task", "2"))
    assert result.returncode == 0, result.stderr
    assert "10 part(s) (5 node(s) x 2 worker slot(s)) for 6 case(s)" in result.stderr
    assert "node(s) 3..4 get no case and exit 0 at once; --nodes 3 is enough" in result.stderr
    # what array task 4 runs: nothing to predict, no worker started
    node = cli(
        *run_args(small, out, "--workers", "2", "--nodes", "5", "--parts-per-node", "2", "--node", "4"),
        env=fake_env(tmp_path),
    )
    assert node.returncode == 0, node.stderr
    assert "0 case(s), 0 already done" in node.stdout
    logs = out / ".nnunet-launch" / "node-4" / "logs"
    assert not list(logs.glob("*attempt*.log")), "no worker was started"


# --- on the test cluster ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    reason = available()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    # not under pytest's tmp folders: munged wants every folder above its socket searchable by all
    root = Path(tempfile.mkdtemp(prefix="nnunet-launch-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cases(tiny, tmp_path) -> dict:
    """8 cases: 4 per node of a 2-node array."""
    return linked_cases(tiny, tmp_path / "inputs", 8)


def _submit(cluster: SlurmCluster, args: list[str], env: dict | None = None) -> tuple[str, str, str]:
    """(array job id, verify job id, what `slurm --submit` printed)."""
    result = cluster.run(sys.executable, "-m", "launcher", *args, "--submit", env=env, check=False)
    match = re.search(r"submitted: array job (\d+) \(\d+ task\(s\)\), verify job (\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1), match.group(2), result.stdout


def _hint(text: str, prefix: str) -> list[str]:
    """The shell command printed after `prefix`, as argv."""
    line = next(line for line in text.splitlines() if prefix in line)
    return shlex.split(line.split(prefix, 1)[1])


def _sbatch(cluster: SlurmCluster, command: list[str], env: dict | None = None) -> str:
    assert command[0] == "sbatch", command
    return cluster.run("sbatch", "--parsable", *command[1:], env=env).stdout.strip().split(";")[0]


def _node_cases(out: Path, node: int) -> dict[str, tuple[str, int]]:
    """{case: (state, attempts)} from node k's journal; {} while it does not exist yet."""
    path = out / ".nnunet-launch" / f"node-{node}" / "journal.sqlite"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {c: (s, a) for c, s, a in db.execute("SELECT id, state, attempts FROM cases")}
    except sqlite3.OperationalError:  # the task is still creating its journal
        return {}
    finally:
        db.close()


def _wait_done_cases(out: Path, node: int, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(s == "done" for s, _ in _node_cases(out, node).values()) < count:
        assert time.monotonic() < deadline, f"node {node} did not finish {count} case(s) in {timeout} s"
        time.sleep(0.2)


def _wait_launcher_gone(out: Path, node: int, timeout: float) -> None:
    lock = out / ".nnunet-launch" / f"node-{node}" / "lock"
    deadline = time.monotonic() + timeout
    while lock_holder(str(lock)) is not None:
        assert time.monotonic() < deadline, f"node {node}'s launcher still holds its lock"
        time.sleep(0.2)


def _predictions(out: Path) -> dict[str, int]:
    return {n: m for n, m in copy_outputs_mtimes(out).items() if n.endswith(".nii.gz")}


def _assert_every_case_done_once_uncharged(out: Path, ids: list[str]) -> None:
    status = json.loads(cli("status", str(out), "--json").stdout)
    assert status["total"] == status["done"] == len(ids) and status["failed"] == 0, status
    assert all(p["restarts"] == 0 for p in status["parts"]), "no restart was counted"
    for node in (0, 1):
        rows = _node_cases(out, node)
        assert all(rows[c] == ("done", 1) for c in rows), f"an interrupted attempt was counted: {rows}"
        log = (out / ".nnunet-launch" / "slurm" / f"task-{node}.log").read_text()
        done = re.findall(r"\] done (case_\d+) ", log)
        assert sorted(done) == sorted(rows), f"node {node}: each case done exactly once: {done}"
        assert "worker died" not in log


def test_array_with_quotes_dollar_backtick_and_unicode_in_out_runs_end_to_end_on_the_cpus_granted(
    cluster, small, tmp_path
):
    out = tmp_path / WEIRD_NAME
    array_id, verify_id, printed = _submit(cluster, cpu_array(small, out))
    states = cluster.wait_done(array_id, 300)
    assert states == {f"{array_id}_0": ("COMPLETED", "0:0"), f"{array_id}_1": ("COMPLETED", "0:0")}, states
    assert cluster.wait_done(verify_id, 120)[verify_id] == ("COMPLETED", "0:0")
    assert_same_predictions(out, small["reference"])
    folder = out / ".nnunet-launch" / "slurm"
    assert "all 6 case(s) have complete outputs" in (folder / "verify.log").read_text()
    task = cluster.jobs(array_id)[f"{array_id}_0"]
    assert task["NumCPUs"] == "1" and task["Requeue"] == "1", "the #SBATCH lines after the comments were read"
    log = (folder / "task-0.log").read_text()  # there: sbatch's --chdir, and the relative log name
    assert "per worker: 1 torch thread(s), npp=1, nps=1" in log, "sized from the 1 CPU SLURM granted"
    status = json.loads(cli("status", str(out), "--json").stdout)
    assert status["total"] == status["done"] == 6 and status["source"] == "journal"
    assert [(n["node"], n["done"]) for n in status["nodes"]] == [(0, 3), (1, 3)]
    assert sorted(p["part_id"] for p in status["parts"]) == [0, 1]
    summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
    assert summary["done"] == 6 and summary["exit_code"] == 0
    assert f"nnunet-launch status {shlex.quote(str(out))}" in printed


def test_fresh_array_discards_once_at_submit_and_its_resubmission_keeps_every_finished_output(cluster, cases, tmp_path):
    out = tmp_path / "out"
    env = fake_env(tmp_path)
    first = cli(*run_args(cases, out, "--workers", "2"), env=env)
    assert first.returncode == 0, first.stderr
    before = _predictions(out)
    assert len(before) == 8

    # with a prelude, the tasks run the nnunet-launch of the environment it activates
    prelude = _prelude(tmp_path, f"source {shlex.quote(str(Path(sys.executable).parent / 'activate'))}\n")
    array_id, verify_id, printed = _submit(cluster, cpu_array(cases, out, "--fresh", "--prelude", prelude), env=env)
    assert "--fresh: discarded the previous run's state and 8 output file(s)" in printed
    for name in ("array.sbatch", "verify.sbatch"):
        assert "--fresh" not in (out / ".nnunet-launch" / "slurm" / name).read_text()
    states = cluster.wait_done(array_id, 120)
    assert set(states.values()) == {("COMPLETED", "0:0")}, states
    assert cluster.wait_done(verify_id, 60)[verify_id] == ("COMPLETED", "0:0")
    fresh = _predictions(out)
    assert fresh.keys() == before.keys() and all(fresh[n] != before[n] for n in before), "predicted again"

    # a resubmission of the whole array (as after a preemption) discards nothing
    again = _sbatch(cluster, _hint(printed, "resume after a time limit or a cancel: "), env=env)
    states = cluster.wait_done(again, 120)
    assert set(states.values()) == {("COMPLETED", "0:0")}, states
    assert _predictions(out) == fresh, "finished outputs were kept"
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    for node in (0, 1):
        assert (
            "nothing to predict: all 4 case(s) are done"
            in (out / ".nnunet-launch" / "slurm" / f"task-{node}.log").read_text()
        )
    _assert_every_case_done_once_uncharged(out, cases["ids"])


def test_requeued_task_resumes_with_no_case_failed_and_no_output_rewritten(cluster, cases, tmp_path):
    out, told = tmp_path / "out", tmp_path / "told"
    env = fake_env(tmp_path, case_seconds=1.5)
    on_finish = f'echo "$NNUNET_LAUNCH_EXIT_CODE $NNUNET_LAUNCH_SUMMARY" >> {shlex.quote(str(told))}'
    array_id, verify_id, _ = _submit(cluster, cpu_array(cases, out, "--on-finish", on_finish), env=env)
    task = f"{array_id}_0"
    _wait_done_cases(out, 0, 1, 120)
    cluster.requeue(task)  # SIGTERM to every process of the task, as a preemption with requeue
    _wait_launcher_gone(out, 0, 60)
    kept = _predictions(out)
    assert 1 <= len([n for n in kept if n[:-7] in _node_cases(out, 0)]) < 4, "interrupted mid-share"
    cluster.release(task)
    states = cluster.wait_done(array_id, 120)
    assert set(states.values()) == {("COMPLETED", "0:0")}, states
    assert cluster.jobs(task)[task]["Restarts"] == "1"
    assert cluster.wait_done(verify_id, 60)[verify_id] == ("COMPLETED", "0:0")
    after = _predictions(out)
    assert {n: after[n] for n in kept} == kept, "no output was written again"
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    log = (out / ".nnunet-launch" / "slurm" / "task-0.log").read_text()
    assert "interrupted" in log and log.count("resume with:") == 1, "both attempts are in the log"
    _assert_every_case_done_once_uncharged(out, cases["ids"])
    summary = out / ".nnunet-launch" / "summary.json"
    assert told.read_text() == f"0 {summary}\n", "--on-finish ran once for the run: in the verify job"
    assert json.loads(summary.read_text())["done"] == len(cases["ids"])


def test_sigterm_to_tasks_then_resubmission_completes_with_no_case_failed_and_no_output_rewritten(
    cluster, cases, tmp_path
):
    out = tmp_path / "out"
    env = fake_env(tmp_path, case_seconds=1.5)
    array_id, verify_id, _ = _submit(cluster, cpu_array(cases, out), env=env)
    _wait_done_cases(out, 0, 1, 120)
    _wait_done_cases(out, 1, 1, 120)
    # the work runs as each task's srun step, beside its batch step
    steps = cluster.run("squeue", "--steps", "--noheader", "--format=%i", "--jobs", array_id).stdout.split()
    assert {f"{array_id}_0.0", f"{array_id}_1.0"} <= set(steps), steps
    # node 0: the task's steps, as `scancel --signal=TERM` and `#SBATCH --signal=TERM@120` (before
    # the time limit) do; node 1: the batch shell alone, which passes the signal on to its step.
    # (Every process at once, the job's end, is the requeue test's.)
    cluster.run("scancel", "--signal=TERM", f"{array_id}_0")
    cluster.run("scancel", "--signal=TERM", "--batch", f"{array_id}_1")
    states = cluster.wait_done(array_id, 120)
    assert states == {f"{array_id}_0": ("FAILED", "130:0"), f"{array_id}_1": ("FAILED", "130:0")}, states
    kept = _predictions(out)
    assert len(kept) < 8

    # the verify job names what is missing and the command that finishes it
    assert cluster.wait_done(verify_id, 60)[verify_id][0] == "FAILED"
    verify_log = (out / ".nnunet-launch" / "slurm" / "verify.log").read_text()
    finish = _hint(verify_log, "finish them with: ")
    assert "--array=0,1" in finish
    again = _sbatch(cluster, finish, env=env)
    check_again = _hint(verify_log, "check again with: ")
    check = _sbatch(cluster, [*check_again[:-1], f"--dependency=afterany:{again}", check_again[-1]], env=env)
    states = cluster.wait_done(again, 120)
    assert set(states.values()) == {("COMPLETED", "0:0")}, states
    assert cluster.wait_done(check, 60)[check] == ("COMPLETED", "0:0")
    after = _predictions(out)
    assert {n: after[n] for n in kept} == kept, "no output was written again"
    assert_fake_outputs(out, cases["inputs"], cases["ids"])
    for node in (0, 1):
        log = (out / ".nnunet-launch" / "slurm" / f"task-{node}.log").read_text()
        assert "interrupted" in log and log.count("resume with:") == 1
    _assert_every_case_done_once_uncharged(out, cases["ids"])


def test_a_best_ensemble_array_predicts_each_nodes_cases_through_every_stage_and_verifies(cluster, stages, tmp_path):
    """`--best` (an ensemble and postprocessing) as a 2-node array: each node runs every stage of
    its own cases; the verify job checks the final outputs; status merges the nodes' stages."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    ids = [f"case_{i:03d}" for i in range(8)]
    for i, case_id in enumerate(ids):
        os.link(stages["inputs"] / f"case_{i % 5:03d}_0000.nii.gz", inputs / f"{case_id}_0000.nii.gz")
    out = tmp_path / "stages 'ü'"
    env = {**fake_env(tmp_path), "nnUNet_results": stages["env"]["nnUNet_results"]}
    args = ["slurm", "-i", str(inputs), "-o", str(out), "-d", "998", "--best", "-device", "cpu", "--workers", "1"]
    array_id, verify_id, _ = _submit(cluster, [*args, "--nodes", "2", "--cpus-per-task", "1"], env=env)
    states = cluster.wait_done(array_id, 300)
    assert set(states.values()) == {("COMPLETED", "0:0")}, states
    assert cluster.wait_done(verify_id, 120)[verify_id] == ("COMPLETED", "0:0")
    assert "all 8 case(s) have complete outputs" in (out / ".nnunet-launch" / "slurm" / "verify.log").read_text()
    for case_id in ids:
        with gzip.open(out / f"{case_id}.nii.gz") as f:
            assert f.read() == fake_final(inputs, case_id), case_id
    status = json.loads(cli("status", str(out), "--json").stdout)
    assert status["stages"] == {"2d": {"done": 8}, "3d_fullres": {"done": 8}, "final": {"done": 8}}
    for node in (0, 1):
        assert not list((out / ".nnunet-launch" / f"node-{node}" / "stages").rglob("*.nii.gz"))


def test_status_of_a_submitted_array_before_any_task_starts_names_its_job_and_what_squeue_says(
    cluster, small, tmp_path
):
    out = tmp_path / "out"
    # held back an hour: submitted and pending, and no task has made any state in OUT
    array_id, verify_id, _ = _submit(cluster, cpu_array(small, out, "--sbatch-arg=--begin=now+1hour"))
    try:
        pending = cli("status", str(out), env=cluster.env)
        assert pending.returncode == 0, pending.stderr
        assert pending.stdout == (
            f"launcher: not started; submitted as job {array_id} (2 pending); no task has started the launcher yet\n"
        )
        info = json.loads(cli("status", str(out), "--json", env=cluster.env).stdout)
        assert info["slurm"]["array_job"] == array_id and info["slurm"]["verify_job"] == verify_id
        assert info["slurm"]["queue"] == {"PENDING": 2} and info["total"] == 0 and not info["launcher_running"]
        blind = cli("status", str(out), env={"PATH": "/nonexistent"})
        assert blind.returncode == 0 and f"submitted as job {array_id}; squeue not available" in blind.stdout
    finally:
        cluster.run("scancel", array_id, verify_id)
    deadline = time.monotonic() + 30
    while "no longer in squeue" not in (ended := cli("status", str(out), env=cluster.env)).stdout:
        assert time.monotonic() < deadline, ended.stdout
        time.sleep(0.5)
    assert ended.returncode == 1, "the array left the queue without predicting anything"
    assert f"submitted as job {array_id}, no longer in squeue, and no task started the launcher" in ended.stdout


@pytest.mark.parametrize(
    "extra, asked",
    [
        (["--cpus-per-task", "64"], "64 CPU(s) (--cpus-per-task), 8 GiB (the default --mem; set it with --sbatch-arg"),
        (["--cpus-per-task", "1", "--sbatch-arg=--mem=100000G"], "1 CPU(s) (--cpus-per-task), the memory your"),
    ],
    ids=["cpus", "memory"],
)
def test_a_request_no_node_can_hold_is_refused_naming_the_flags_to_change(cluster, small, tmp_path, extra, asked):
    out = tmp_path / "out"
    args = slurm_args(small, out, "-device", "cpu", "--workers", "1", "--nodes", "2", *extra, "--submit")
    result = cluster.run(sys.executable, "-m", "launcher", *args, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "nnunet-launch: error: sbatch refuses the array job: allocation failure: Requested node configuration is "
        "not available; no node of the partition has what one task asks for: "
    ), result.stderr
    assert asked in result.stderr and result.stderr.endswith("; lower these or choose another --partition\n")
    assert not out.exists()


def test_an_out_or_a_python_on_a_local_filesystem_is_warned_about_and_a_shared_one_is_not(small, tmp_path):
    from launcher.journal import FILESYSTEM_ENV

    args = cpu_array(small, tmp_path / "out")
    local = cli(*args, env={FILESYSTEM_ENV: "local"})
    assert local.returncode == 0, local.stderr
    assert f"the output folder ({tmp_path / 'out'}) is on a local filesystem of this host" in local.stderr
    assert f"the Python running nnunet-launch ({sys.executable}) is on a local filesystem" in local.stderr
    shared = cli(*args, env={FILESYSTEM_ENV: "network"})
    assert shared.returncode == 0, shared.stderr
    assert "local filesystem" not in shared.stderr


def test_status_of_scripts_written_but_not_submitted_says_so_and_how_to_submit(small, tmp_path):
    out = tmp_path / "out"
    assert cli(*cpu_array(small, out)).returncode == 0
    shown = cli("status", str(out))
    assert shown.returncode == 1, shown.stderr
    assert shown.stdout.startswith("launcher: not started; SLURM scripts written (")
    assert f"not submitted; submit with: sbatch --chdir={out / '.nnunet-launch' / 'slurm'}" in shown.stdout
