"""Shared fixtures: a tiny real nnU-Net model, synthetic cases, a plain nnUNetv2_predict
reference, and helpers that run the launcher as a real process and clean up after it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NUM_CASES = 12
STAGE_CASES = 5
MEMBERS = ("2d", "3d_fullres")  # the ensemble inference_information.json names (make_stage_models)
# nnU-Net's default_num_processes, which sets the exact export's torch threads in plain nnU-Net and
# in the launcher alike: one, like every thread of the references below (a test that needs another
# count sets it for both sides).
os.environ["nnUNet_def_n_proc"] = "1"
sys.path.insert(0, str(ROOT / "scripts"))


def launcher_cmd(*args: str) -> list[str]:
    """The console script; where the launcher is not installed (the GPU check's offline site), its module."""
    if (BIN / "nnunet-launch").exists():
        return [str(BIN / "nnunet-launch"), *args]
    return [sys.executable, "-m", "launcher", *args]


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        launcher_cmd(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


# Session fixtures built by nnU-Net (a model, its plain predictions) take minutes on a 2-core
# machine. They are built once per test run and shared by its pytest processes (the xdist workers,
# and the sessions scripts/test.sh runs one after another): under NNUNET_LAUNCH_TEST_SHARED, which
# test.sh makes fresh for each run, else under this session's temporary folder. One folder per
# nnU-Net version (test.sh's last session runs the oldest supported one). Tests only read them.
SHARED_ENV = "NNUNET_LAUNCH_TEST_SHARED"


def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, which `build(folder)` fills: built by the first process that asks (the
    others wait on its lock), kept only once complete."""
    import fcntl
    from importlib.metadata import version

    root = os.environ.get(SHARED_ENV)
    if not root:
        base = tmp_path_factory.getbasetemp()
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest-N/popen-gwK
    root = Path(root) / f"nnunetv2-{version('nnunetv2')}"
    root.mkdir(parents=True, exist_ok=True)
    folder, complete = root / name, root / f"{name}.complete"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that did not finish
            folder.mkdir()
            build(folder)
            complete.touch()
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """A 1-channel tiny model and 12 cases of varied sizes, in folders whose names need quoting."""
    MODEL, INPUTS = "model dir 'ü'", 'in put "ß"'

    def build(base: Path) -> None:
        script = str(ROOT / "scripts" / "make_tiny_model.py")
        args = ["--model", str(base / MODEL), "--inputs", str(base / INPUTS), "--cases", str(NUM_CASES)]
        subprocess.run([sys.executable, script, *args], check=True)

    base = shared_folder(tmp_path_factory, "tiny", build)
    return {"model": base / MODEL, "inputs": base / INPUTS}


# nnUNetv2_predict itself, with torch held to the workers' one thread: on the CPU, nnU-Net's
# numbers depend on the thread count, and a random-weight model has near-ties that flip voxels.
PLAIN_NNUNET_ONE_THREAD = (
    "import os, sys, torch\n"
    "set_threads = torch.set_num_threads\n"
    "torch.set_num_threads = lambda n: set_threads(1)\n"
    "from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder\n"
    "sys.argv[0] = 'nnUNetv2_predict_from_modelfolder'\n"
    "predict_entry_point_modelfolder()\n"
)


# The same, but its export with the torch threads nnU-Net gives it (default_num_processes), as a
# launcher worker with one torch thread runs the network and its export helper exports.
PLAIN_NNUNET_EXPORT_THREADS = PLAIN_NNUNET_ONE_THREAD.replace(
    "set_threads(1)", "set_threads(n if n == int(os.environ['nnUNet_def_n_proc']) else 1)"
)


def plain_nnunet(
    inputs: Path, out: Path, model: Path, *extra: str, device: str = "cpu", script: str = PLAIN_NNUNET_ONE_THREAD
) -> None:
    common = ["-device", device, "--disable_tta", "-npp", "1", "-nps", "1", "--disable_progress_bar", *extra]
    args = ["-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0", *common]
    subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, env=unmeasured())


def unmeasured(env: dict | None = None) -> dict:
    """The environment for nnU-Net's own commands: coverage (`pytest --cov`, which measures the
    launcher's processes) is not started in them; plain nnU-Net hung under it here."""
    return {k: v for k, v in (env or os.environ).items() if k != "COVERAGE_PROCESS_CONFIG"}


@pytest.fixture(scope="session")
def reference(tiny, tmp_path_factory) -> Path:
    """One plain nnUNetv2_predict run over all cases: what the launcher must reproduce."""
    return shared_folder(tmp_path_factory, "reference", lambda out: plain_nnunet(tiny["inputs"], out, tiny["model"]))


@pytest.fixture(scope="session")
def small(tiny, reference, tmp_path_factory) -> dict:
    """The first 6 cases and their reference outputs, for the slower fault tests."""
    ids = [f"case_{i:03d}" for i in range(6)]

    def build(base: Path) -> None:
        inputs, ref = base / "inputs", base / "reference"
        inputs.mkdir()
        ref.mkdir()
        for case_id in ids:
            shutil.copy(tiny["inputs"] / f"{case_id}_0000.nii.gz", inputs)
            shutil.copy(reference / f"{case_id}.nii.gz", ref)
        for name in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
            shutil.copy(reference / name, ref)

    base = shared_folder(tmp_path_factory, "small", build)
    return {"inputs": base / "inputs", "model": tiny["model"], "reference": base / "reference", "ids": ids}


def model_args(data: dict, out: Path, *extra: str) -> list[str]:
    """-i/-o/-m/-f for a fixture's inputs and model."""
    return ["-i", str(data["inputs"]), "-o", str(out), "-m", str(data["model"]), "-f", "0", *extra]


def run_args(data: dict, out: Path, *extra: str) -> list[str]:
    return ["run", *model_args(data, out), "-device", "cpu", "--disable_tta", *extra]


def assert_same_predictions(out: Path, reference: Path, without: tuple[str, ...] = ()) -> None:
    """Voxel data and geometry identical for every case; OUT holds nothing nnU-Net would not.
    `without`: reference files that must be absent from OUT (failed cases)."""
    ref_files = sorted(p.name for p in reference.iterdir() if p.name not in without)
    out_files = sorted(p.name for p in out.iterdir() if p.name != ".nnunet-launch")
    assert out_files == ref_files
    for name in ref_files:
        if not name.endswith(".nii.gz"):
            continue
        a, b = sitk.ReadImage(str(reference / name)), sitk.ReadImage(str(out / name))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), name
        assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin(), name
        assert a.GetDirection() == b.GetDirection(), name


class LauncherProcess:
    """A launcher run in its own process; remembers every process it ever had below it, so a
    test can prove none survives and clean up by pid."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(
            launcher_cmd(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.seen: dict[int, float] = {}  # pid -> create_time

    def sample_tree(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    self.seen.setdefault(child.pid, child.create_time())
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass

    def alive_descendants(self) -> list[int]:
        alive = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def wait_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sample_tree()
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"launcher exited ({self.proc.returncode}) before: {what}\n" + self.proc.stderr.read()
                )
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for: {what}")

    def wait(self, timeout: float = 300) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill_everything(self) -> None:
        self.sample_tree()
        for pid in self.alive_descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def launch():
    started: list[LauncherProcess] = []

    def start(args: list[str], env: dict | None = None) -> LauncherProcess:
        process = LauncherProcess(args, env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill_everything()


def wait_gone(pids: list[int], seen: dict[int, float], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p, seen[p])]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def _alive(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def status_json(out: Path) -> dict | None:
    if not (out / ".nnunet-launch" / "journal.sqlite").exists():
        return None
    result = cli("status", str(out), "--json")
    return json.loads(result.stdout) if result.returncode in (0, 1) else None  # 1: cases failed


def copy_outputs_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}


# --- the fault-injecting stand-in for nnU-Net (launcher/fake_backend.py) --------------------
def fake_env(tmp_path: Path, faults: dict[str, str] | None = None, case_seconds: float = 0.05) -> dict:
    """The environment that makes a launcher use the fake backend with these faults."""
    from launcher.fake_backend import BACKEND_ENV, CASE_SECONDS_ENV, FAULT_DIR_ENV, FAULTS_ENV

    fault_dir = tmp_path / "fault-counters"
    fault_dir.mkdir(exist_ok=True)
    return {
        BACKEND_ENV: "fake",
        FAULTS_ENV: json.dumps(faults or {}),
        FAULT_DIR_ENV: str(fault_dir),
        CASE_SECONDS_ENV: str(case_seconds),
    }


def assert_fake_outputs(out: Path, inputs: Path, ids: list[str]) -> None:
    """OUT holds exactly these cases' complete fake predictions (plus nnU-Net's three files)."""
    import gzip

    from launcher.fake_backend import expected_output

    names = sorted(p.name for p in out.iterdir() if p.name != ".nnunet-launch")
    assert names == sorted(
        [f"{c}.nii.gz" for c in ids] + ["dataset.json", "plans.json", "predict_from_raw_data_args.json"]
    )
    for case_id in ids:
        with gzip.open(out / f"{case_id}.nii.gz") as f:
            assert f.read() == expected_output([str(inputs / f"{case_id}_0000.nii.gz")]), case_id


def case_rows(out: Path) -> dict[str, dict]:
    import csv

    with (out / ".nnunet-launch" / "cases.csv").open() as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def linked_cases(tiny: dict, folder: Path, count: int) -> dict:
    """`count` cases under new names, hard links of the tiny ones (the fake backend does not look
    inside them), with the tiny model: for runs with many cases."""
    folder.mkdir()
    sources = sorted(tiny["inputs"].glob("*_0000.nii.gz"))
    ids = [f"case_{i:03d}" for i in range(count)]
    for i, case_id in enumerate(ids):
        os.link(sources[i % len(sources)], folder / f"{case_id}_0000.nii.gz")
    return {"inputs": folder, "model": tiny["model"], "ids": ids}


@pytest.fixture
def short_temp():
    """A TMPDIR short enough for the helper servers' sockets (at most 107 bytes), watched for leftovers."""
    folder = Path(tempfile.mkdtemp(prefix="nl-"))
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def cases(tiny, tmp_path) -> dict:
    """24 cases for the fast stand-in backend (see linked_cases)."""
    return linked_cases(tiny, tmp_path / "inputs", 24)


# --- multi-stage inference (launcher/stages.py) ------------------------------------------------
@pytest.fixture(scope="session")
def stages(tmp_path_factory) -> dict:
    """A results tree with 2d, 3d_fullres, 3d_lowres and 3d_cascade_fullres models, a
    postprocessing.pkl and an inference_information.json naming the 2d + 3d_fullres ensemble
    (scripts/make_stage_models.py); and inputs. `env` holds the nnUNet_* variables nnU-Net's own
    commands and `-d 998` need."""
    import make_stage_models

    def build(base: Path) -> None:
        world = make_stage_models.make_stage_world(str(base), STAGE_CASES)
        (base / "world.json").write_text(json.dumps({k: v for k, v in world.items() if k != "env"}))

    base = shared_folder(tmp_path_factory, "stages", build)
    world = json.loads((base / "world.json").read_text())
    env = make_stage_models.stage_env(str(base))
    return {**world, "env": env, "base": base, "inputs": Path(world["inputs"])}


def fake_final(inputs: Path, case_id: str) -> bytes:
    """The stand-in backend's final output of a case of the 2d + 3d_fullres ensemble, postprocessed."""
    from launcher.fake_backend import combined_output, expected_output

    prediction = expected_output([str(inputs / f"{case_id}_0000.nii.gz")])
    return combined_output([prediction + f"@{m}".encode() for m in MEMBERS], postprocessed=True)


def nnunet(env: dict, *commands: tuple[str, ...]) -> None:
    """nnU-Net's commands, each a tuple of its name and arguments, side by side (none reads what
    another writes); nnUNetv2_predict with torch held to the workers' one thread."""
    import make_stage_models

    running = []
    try:
        for name, *args in commands:
            if name == "nnUNetv2_predict":
                command = [sys.executable, "-c", make_stage_models.ONE_THREAD_PREDICT, *args, "--disable_progress_bar"]
            else:
                command = [str(BIN / name), *args]
            pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
            running.append((name, subprocess.Popen(command, text=True, env=unmeasured(env), **pipes)))
        for name, process in running:
            stdout, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, f"{name} failed:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    finally:
        for _, process in running:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def manual(stages, tmp_path_factory) -> Path:
    """What nnU-Net's own commands make of the stage inputs, run by hand as its instructions say:
    the 2d + 3d_fullres ensemble postprocessed, and the cascade (the steps that need none of the
    others' outputs side by side)."""
    inputs, env, paths = stages["inputs"], stages["env"], stages
    common = ("-i", str(inputs), "-d", "998", "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1")

    def build(manual: Path) -> None:
        members = (("-c", m, "--save_probabilities", "-o", str(manual / m)) for m in MEMBERS)
        lowres = ("-c", "3d_lowres", "-o", str(manual / "lowres"))
        nnunet(env, *(("nnUNetv2_predict", *common, *args) for args in (*members, lowres)))
        ensemble = ("nnUNetv2_ensemble", "-i", *(str(manual / m) for m in MEMBERS), "-o", str(manual / "ensemble"))
        cascade = ("-c", "3d_cascade_fullres", "-prev_stage_predictions", str(manual / "lowres"))
        nnunet(env, (*ensemble, "-np", "1"), ("nnUNetv2_predict", *common, *cascade, "-o", str(manual / "cascade")))
        postprocess = ("-i", str(manual / "ensemble"), "-o", str(manual / "postprocessed"), "-np", "1")
        pp_files = ("-pp_pkl_file", paths["postprocessing_pkl"], "-plans_json", paths["plans_json"])
        nnunet(env, ("nnUNetv2_apply_postprocessing", *postprocess, *pp_files))

    return shared_folder(tmp_path_factory, "manual", build)


class PickledCall:
    """Pickles as a call of `function` with `args` (what a hostile pickle's REDUCE does)."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args
