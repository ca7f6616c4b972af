"""The GPU check: one call on a GPU machine, offline. Started by scripts/gpu_check.sh.

    bash scripts/gpu_check.sh [--budget-s 440] [--steps preflight,install,...] [--device cuda|cpu]

Steps, each with its own timeout; a step that fails is recorded and the next one runs:
  preflight  nvidia-smi -L and NVML (pynvml): without a GPU the check stops here (exit 2)
  install    the wheels in .whl/ into a temporary site (`pip install --no-index --no-deps
             --target`), put on PYTHONPATH with the repository; without wheels, python3's own
             packages are used (the online set-up)
  imports    torch (with CUDA), nnU-Net's inference path and trainer lookup, the launcher's backend
  gpus       python3 -m launcher gpus
  tiny       scripts/make_tiny_model.py: the tiny model and its cases (one large case, so that a
             kill lands while a worker predicts)
  reference  plain nnUNetv2_predict_from_modelfolder (its own entry point) on the same GPU
  k1, k2     the launcher with --workers-per-gpu 1 and 2, compared voxel by voxel with it (on a GPU
             both with deterministic kernels: nnU-Net's autotuning alone changes a few voxels)
  kill       SIGKILL of a worker while it predicts: restart, identical outputs, no process of the
             run left, no process holding GPU memory (nvidia-smi --query-compute-apps)
  accelerator  pytest -m accelerator (tests/test_accelerator.py) with -device cuda: the tests CI runs
             on a simulated accelerator, on the real one
  stages     multi-stage inference: `run --best` (a 2d + 3d_fullres ensemble and postprocessing,
             scripts/make_stage_models.py) with every worker serving both members, against
             nnU-Net's own chain (predict --save_probabilities per member, ensemble,
             apply_postprocessing, through their entry points) on the same device
  export     scripts/bench_export.py: the export-bound 104-label case, plain nnU-Net's CPU export vs
             --profile fast's export on the GPU (seconds, device memory, agreement with plain), then
             the launcher with the exact and the fast profile and plain nnUNetv2_predict: cases per
             hour, GPU busy %; fails when the fast profile's agreement is below the README's floor
  preprocess scripts/bench_preprocess.py: a whole fine CT and a quarter one, every stage's seconds
             (the input's cubic resampling by nnU-Net on one core and by --profile fast on the GPU,
             the network, the exports), then the launcher with each profile; fails when the GPU's
             resampling differs from nnU-Net's by more than 1e-3 or the outputs' agreement is below
             the README's floor
  bench      scripts/bench_gpu.py: plain nnU-Net vs the launcher with K = 1, 2, 3 on a CT-sized
             model: cases/min, GPU busy % from NVML
Results: OUT/gpu_check.json (rewritten after every step; OUT is $OUT, else gpu-check-results/),
each step's output in OUT/logs/. Exit 0 when every step passed, 1 when one failed or was
skipped, 2 when there is no GPU. The launcher's test-only stand-ins (fake backend, fake NVML)
are switched off for every command. `--device cpu` runs the same steps on the CPU (workers
instead of workers per GPU, no NVML); tests/test_offline_wheels.py uses it to prove the offline
install path on a machine without a GPU.

Only the standard library is imported before the install step; psutil (preinstalled on the GPU
machine) samples the processes of each command so none is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = (
    "preflight",
    "install",
    "imports",
    "gpus",
    "tiny",
    "reference",
    "k1",
    "k2",
    "kill",
    "stages",
    "accelerator",
    "export",
    "preprocess",
    "bench",
)
# the fast profile's agreement with plain nnU-Net that the README publishes as its floor
FAST_MIN_EQUAL_VOXELS_PCT = 99.8
FAST_MIN_DICE = 0.99
BENCH_RESERVE_S = 200  # steps before the benchmark leave it at least this much of the budget
MIN_STEP_S = 15
MEMORY_SLACK_MIB = 256  # a CUDA context alone holds more than this
TERM_GRACE_S = 10  # the launcher gives its workers 5 s after SIGTERM

# plain nnU-Net: its console script nnUNetv2_predict_from_modelfolder, which a --target install
# does not create. On cuda it holds torch to one thread itself, as the launcher's cuda workers do.
PLAIN_NNUNET = (
    "import sys\n"
    "from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder\n"
    "sys.argv[0] = 'nnUNetv2_predict_from_modelfolder'\n"
    "predict_entry_point_modelfolder()\n"
)
# scripts/make_stage_models.py's world, its paths printed as JSON (it needs torch and nnU-Net)
MAKE_STAGES = (
    "import json, sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "import make_stage_models\n"
    "world = make_stage_models.make_stage_world(sys.argv[2], int(sys.argv[3]))\n"
    "print(json.dumps({k: v for k, v in world.items() if k != 'env'}))\n"
)
# nnU-Net's chain of commands through its entry points (a --target install has no console scripts)
NNUNET_ENTRY = (
    "import importlib, sys\n"
    "module, function, sys.argv[0] = sys.argv[1], sys.argv[2], sys.argv[2]\n"
    "del sys.argv[1:3]\n"
    "getattr(importlib.import_module(module), function)()\n"
)
# On a GPU nnU-Net turns on cuDNN's autotuning, so two of its own runs differ in a few voxels (seen
# on an H200: 3,799 of the tiny model's voxels, a random network's near-ties). For a comparison voxel
# by voxel nnU-Net runs with deterministic kernels, as the launcher does with --deterministic
# (launcher/device.make_deterministic, called right after nnU-Net's predictor set its own flags).
DETERMINISTIC_NNUNET = (
    "from launcher.device import make_deterministic\n"
    "from nnunetv2.inference import predict_from_raw_data as _predict\n"
    "_init = _predict.nnUNetPredictor.__init__\n"
    "def _deterministic_init(self, *args, **kwargs):\n"
    "    _init(self, *args, **kwargs)\n"
    "    make_deterministic()\n"
    "_predict.nnUNetPredictor.__init__ = _deterministic_init\n"
)
ONE_THREAD = "import torch\nset_threads = torch.set_num_threads\ntorch.set_num_threads = lambda n: set_threads(1)\n"

# on the CPU nnU-Net's numbers depend on torch's thread count (tests/conftest.py): one thread,
# as each launcher worker has when the launcher is held to one core per worker (see _launch)
PLAIN_NNUNET_ONE_THREAD = (
    "import torch\n"
    "set_threads = torch.set_num_threads\n"
    "torch.set_num_threads = lambda n: set_threads(1)\n" + PLAIN_NNUNET
)

IMPORT_PROBE = r"""
import importlib, json, os, sys
report = {"python": sys.version.split()[0]}
stdout, sys.stdout = sys.stdout, sys.stderr  # what the imports print goes to the stderr log
import torch
report["torch"] = torch.__version__
report["torch_cuda"] = torch.version.cuda
report["cuda_available"] = torch.cuda.is_available()
if report["cuda_available"]:
    report["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
modules = ["nnunetv2.inference.predict_from_raw_data", "nnunetv2.inference.export_prediction",
           "launcher.nnunet", "launcher.cli", "SimpleITK", "nibabel", "blosc2", "pynvml", "click", "psutil"]
report["modules"] = {m: getattr(importlib.import_module(m), "__file__", None) for m in modules}
import nnunetv2
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
found = recursive_find_python_class(folder, "nnUNetTrainer", current_module="nnunetv2.training.nnUNetTrainer")
report["trainer_lookup"] = f"{found.__module__}.{found.__name__}" if found else None
stdout.write(json.dumps(report))
"""


class StepFailed(Exception):
    def __init__(self, message: str, **detail):
        super().__init__(message)
        self.detail = detail


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cuda = args.device == "cuda"
        self.results = Path(args.results).resolve()
        self.logs = self.results / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.deadline = time.monotonic() + args.budget_s
        self.site: Path | None = None
        self.env = self._clean_env()
        self.summary: dict = {
            "check": "scripts/gpu_check.sh",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "host": platform.node(),
            "python": sys.version.split()[0],
            "device": args.device,
            "budget_s": args.budget_s,
            "result": "running",
            "steps": {},
        }
        self.tiny: dict = {}
        self.baseline: dict | None = None  # processes and memory on the GPUs before the check

    # --- environment, processes ---------------------------------------------------------
    @staticmethod
    def _clean_env() -> dict:
        """No test-only stand-in may reach the launcher: the fake backend and fake NVML are
        chosen by these variables."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NNUNET_LAUNCH_TEST_", "NNUNET_LAUNCH_FAKE_")) and k != "PYTHONPATH"
        }
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], timeout: float, log: str, json_out: bool = False, **popen) -> dict:
        """Run a command in its own session, its output into logs/<log>.log; on timeout SIGTERM
        to its group, SIGKILL after a grace; every process seen below it is killed at the end
        and the ones still alive then are reported (there should be none). json_out: stderr
        goes to logs/<log>.stderr.log and the result's "json" is stdout parsed."""
        path = self.logs / f"{log}.log"
        err_path = self.logs / f"{log}.stderr.log"
        with path.open("a") as out, err_path.open("a") if json_out else open(os.devnull) as err:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            start_offset = out.tell()
            started = time.monotonic()
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=err if json_out else subprocess.STDOUT,
                start_new_session=True,
                **{"env": self.env, **popen},
            )
            seen = Descendants(proc.pid)
            timed_out = False
            try:
                while proc.poll() is None:
                    seen.sample()
                    if time.monotonic() - started > timeout:
                        timed_out = True
                        break
                    time.sleep(0.2)
            finally:  # a timeout, or this script stopped (SIGTERM, Ctrl-C)
                if proc.poll() is None:
                    stop_group(proc, seen)
                proc.wait()
                left = seen.kill_survivors()
        result = {
            "rc": proc.returncode,
            "timed_out": timed_out,
            "seconds": round(time.monotonic() - started, 1),
            "left_behind": left,
            "tail": tail(err_path if json_out else path),
        }
        if json_out and proc.returncode == 0:
            with path.open() as f:
                f.seek(start_offset)
                try:
                    result["json"] = json.loads(f.read())
                except ValueError as exc:
                    result["json_error"] = str(exc)
        return result

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # --- steps ----------------------------------------------------------------------------
    def step(self, name: str, cap: float, fn, reserve: float = 0.0, needs: tuple[str, ...] = ()) -> bool:
        """Run one step with at most `cap` seconds, leaving `reserve` of the budget to later
        steps; skipped when a step it needs (and that was asked for) did not pass."""
        if name not in self.args.steps:
            return True
        record: dict = {"status": "running"}
        self.summary["steps"][name] = record
        failed = [n for n in needs if self.summary["steps"].get(n, {"status": "passed"})["status"] != "passed"]
        if failed:
            record.update(status="skipped", error=f"needs {', '.join(failed)}, which did not pass")
            print(f"gpu_check: {name}: skipped: {record['error']}")
            self.save()
            return False
        timeout = min(cap, self.left_s() - reserve)
        if timeout < MIN_STEP_S:
            record.update(status="skipped", error=f"no time left in the {self.args.budget_s:.0f} s budget")
            print(f"gpu_check: {name}: skipped: {record['error']}")
            self.save()
            return False
        self.save()
        print(f"gpu_check: {name} (at most {timeout:.0f} s)", flush=True)
        started = time.monotonic()
        try:
            record.update(fn(timeout) or {})
            record["status"] = "passed"
        except StepFailed as exc:
            record.update(exc.detail, status="failed", error=str(exc))
        except Exception as exc:  # a bug of this script: recorded, the next step still runs
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        record["seconds"] = round(time.monotonic() - started, 1)
        print(f"gpu_check: {name}: {record['status']}" + (f": {record['error']}" if "error" in record else ""))
        self.save()
        return record["status"] == "passed"

    def preflight(self, timeout: float) -> dict:
        detail: dict = {}
        if shutil.which("nvidia-smi"):
            r = self.run(["nvidia-smi", "-L"], min(timeout, 30), "preflight")
            detail["nvidia_smi"] = r["tail"].strip().splitlines()[1:] if r["rc"] == 0 else f"exit {r['rc']}"
        else:
            detail["nvidia_smi"] = "not found"
        probe = "import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetCount())"
        r = self.run(self.python("-c", probe), min(timeout, 30), "preflight")
        last = r["tail"].strip().splitlines()[-1] if r["tail"].strip() else ""
        detail["nvml_gpus"] = int(last) if r["rc"] == 0 and last.isdigit() else f"NVML unavailable: {last}"
        if self.cuda and not (isinstance(detail["nvml_gpus"], int) and detail["nvml_gpus"] > 0):
            raise StepFailed(
                f"NVML finds none ({detail['nvml_gpus']}); nvidia-smi: {str(detail['nvidia_smi'])[:200]}", **detail
            )
        if self.cuda and shutil.which("nvidia-smi"):  # what is on the GPUs before the check
            self.baseline = {"apps": self._query_apps(), "memory_used_mib": self._memory_used()}
            detail["gpu_before"] = self.baseline
        return detail

    def install(self, timeout: float) -> dict:
        if self.args.wheels == "none":
            return {"wheels": 0, "note": f"--wheels none: using the packages {sys.executable} has"}
        wheels_dir = Path(self.args.wheels).resolve()
        archives = sorted(wheels_dir.glob("wheels-*.tar.xz")) if wheels_dir.is_dir() else []
        loose = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
        if not archives and not loose:
            return {"wheels": 0, "note": f"no wheels in {wheels_dir}: using the packages {sys.executable} has"}
        detail: dict = {"wheels_dir": str(wheels_dir)}
        manifest_path = wheels_dir / "MANIFEST.json"
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            detail["built_for"] = manifest.get("python")
            here = f"{sys.version_info[0]}.{sys.version_info[1]}"
            if manifest.get("python") != here:
                raise StepFailed(
                    f"the wheels in {wheels_dir} are for Python {manifest.get('python')}, this is {here}: "
                    f"run scripts/gpu_wheels.sh --python-version {here}",
                    **detail,
                )
        unpacked = self.work / "wheels"
        unpacked.mkdir()
        for archive in archives:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():  # our own archive: flat wheel files only
                    if not member.isfile() or "/" in member.name or not member.name.endswith(".whl"):
                        raise StepFailed(f"unexpected member {member.name!r} in {archive}")
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(unpacked, filter="data")
                else:  # Python < 3.11.4
                    tar.extractall(unpacked)
        wheels = sorted(unpacked.glob("*.whl")) + loose
        detail["wheels"] = [w.name for w in wheels]
        site = self.work / "site"
        if self.run(self.python("-m", "pip", "--version"), 60, "install")["rc"] == 0:
            cmd = self.python("-m", "pip", "install", "--no-index", "--no-deps", "--no-compile")
            cmd += ["--disable-pip-version-check", "--target", str(site), *map(str, wheels)]
            r = self.run(cmd, timeout, "install")
            if r["rc"] != 0:
                raise StepFailed(f"pip install --target failed (exit {r['rc']})", **detail, tail=r["tail"])
        else:  # no pip on this python: a wheel is a zip of the site's files
            unzip_wheels(wheels, site)
            detail["note"] = "python3 has no pip: the wheels were unzipped into the site"
        shutil.rmtree(unpacked)
        self.site = site
        self.env["PYTHONPATH"] = os.pathsep.join([str(site), self.env["PYTHONPATH"]])
        sys.path[:0] = [str(site), str(REPO)]
        detail["site"] = str(site)
        return detail

    def imports(self, timeout: float) -> dict:
        r = self.run(self.python("-c", IMPORT_PROBE), timeout, "imports", json_out=True)
        if "json" not in r:
            hint = "" if self.site else " (no wheels were installed: run scripts/gpu_wheels.sh online, carry .whl/)"
            raise StepFailed(f"imports failed (exit {r['rc']}){hint}", tail=r["tail"])
        report = r["json"]
        if self.cuda and not report["cuda_available"]:
            raise StepFailed("torch sees no CUDA device", **report)
        if report["trainer_lookup"] is None:
            raise StepFailed("nnU-Net's trainer lookup did not find nnUNetTrainer", **report)
        return report

    def gpus(self, timeout: float) -> dict:
        r = self.run(self.python("-m", "launcher", "gpus"), timeout / 2, "gpus")
        listing = r["tail"]
        r = self.run(self.python("-m", "launcher", "gpus", "--json"), timeout / 2, "gpus-json", json_out=True)
        if "json" not in r:
            if not self.cuda:
                return {"note": "no GPU (a CPU run)", "output": listing.strip()[-300:]}
            raise StepFailed(f"launcher gpus --json: exit {r['rc']}", tail=r["tail"])
        found = r["json"]
        if self.cuda and not found:
            raise StepFailed("python3 -m launcher gpus finds no GPU", output=listing.strip()[-500:], tail=r["tail"])
        if self.cuda and not all(g["uuid"].startswith(("GPU-", "MIG-")) for g in found):
            raise StepFailed("a GPU without a GPU-/MIG- UUID", gpus=found)
        return {"gpus": found}

    def make_tiny(self, timeout: float) -> dict:
        base = self.work / "tiny"
        model, inputs = base / "model dir 'ü'", base / 'in put "ß"'  # paths that need quoting
        cmd = self.python(str(REPO / "scripts" / "make_tiny_model.py"), "--model", str(model), "--inputs", str(inputs))
        cmd += ["--cases", str(self.args.cases)]
        if self.cuda:
            cmd += ["--big-case-edge", str(self.args.big_case_edge)]
        r = self.run(cmd, timeout, "tiny")
        if r["rc"] != 0:
            raise StepFailed(f"make_tiny_model.py: exit {r['rc']}", tail=r["tail"])
        self.tiny = {"model": model, "inputs": inputs, "base": base}
        return {"cases": self.args.cases, "big_case_edge": self.args.big_case_edge if self.cuda else None}

    def reference(self, timeout: float) -> dict:
        self._need_tiny()
        out = self.tiny["base"] / "reference"
        r = self.run(self._plain_cmd(out), timeout, "reference")
        if r["rc"] != 0 or r["timed_out"]:
            raise StepFailed(
                f"plain nnU-Net: exit {r['rc']}" + (" (timed out)" if r["timed_out"] else ""), tail=r["tail"]
            )
        self.tiny["reference"] = out
        return {"seconds_plain": r["seconds"], "gpu_processes_after": self.gpu_apps()}

    def equivalence(self, k: int):
        def step(timeout: float) -> dict:
            self._need_reference()
            out = self.tiny["base"] / f"k{k}"
            r = self._launch(out, k, timeout, f"k{k}")
            detail = {"workers": k, "launcher": summarize_run(r), "gpu_processes_after": self.gpu_apps(wait_s=15)}
            if r["rc"] != 0:
                self._keep_logs(out, f"k{k}")
                raise StepFailed(f"launcher exit {r['rc']}" + (" (timed out)" if r["timed_out"] else ""), **detail)
            detail["summary"] = self._summary(out)
            detail["compare"] = compare(out, self.tiny["reference"])
            problems = self._problems(detail, r)
            if problems:
                self._keep_logs(out, f"k{k}")
                detail["noise"] = self._nnunet_noise(detail["compare"])
                raise StepFailed("; ".join(problems), **detail)
            return detail

        return step

    def kill(self, timeout: float) -> dict:
        """SIGKILL one worker while it predicts a case; the run must restart it and end with
        every output identical to plain nnU-Net's, nothing of the run left, no GPU memory held."""
        self._need_reference()
        out = self.tiny["base"] / "kill"
        k = 2
        started = time.monotonic()
        proc, seen, log = self._start_launcher(out, k, "kill")
        victim, detail = None, {"workers": k}
        try:
            while victim is None and proc.poll() is None and time.monotonic() - started < timeout:
                seen.sample()
                status = self._status(out)
                for part in (status or {}).get("parts", []):
                    if part.get("worker_pid") and part.get("current_case"):
                        victim = part["worker_pid"]
                        detail.update(killed_pid=victim, killed_part=part["part_id"], killed_case=part["current_case"])
                        detail["done_before_kill"] = status["done"]
                        os.kill(victim, signal.SIGKILL)
                        break
                else:
                    time.sleep(0.1)
            while proc.poll() is None and time.monotonic() - started < timeout:
                seen.sample()
                time.sleep(0.2)
            timed_out = proc.poll() is None
            if timed_out:
                stop_group(proc, seen)
            proc.wait()
        finally:
            if proc.poll() is None:
                stop_group(proc, seen)
            left = seen.kill_survivors()
        r = {"rc": proc.returncode, "timed_out": timed_out, "seconds": round(time.monotonic() - started, 1)}
        r.update(left_behind=left, tail=tail(log))
        detail["launcher"] = summarize_run(r)
        detail["gpu_processes_after"] = self.gpu_apps(wait_s=15)
        if victim is None:
            self._keep_logs(out, "kill")
            raise StepFailed("the run ended (or timed out) before a worker was seen predicting", **detail)
        if r["rc"] != 0:
            self._keep_logs(out, "kill")
            raise StepFailed(f"launcher exit {r['rc']}" + (" (timed out)" if timed_out else ""), **detail)
        detail["worker_died_line"] = "worker died (killed by SIGKILL" in r["tail"]
        detail["summary"] = self._summary(out)
        detail["restarts"] = sum(p.get("restarts", 0) for p in detail["summary"].get("parts", []))
        detail["compare"] = compare(out, self.tiny["reference"])
        problems = self._problems(detail, r)
        if detail["restarts"] < 1:
            problems.append("no restart recorded")
        if _alive(victim):
            problems.append(f"the killed worker {victim} is still alive")
        if problems:
            self._keep_logs(out, "kill")
            raise StepFailed("; ".join(problems), **detail)
        return detail

    def stages(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        base = self.work / "stages"
        cases = min(self.args.cases, 6)
        r = self.run(self.python("-c", MAKE_STAGES, str(REPO / "scripts"), str(base), str(cases)), 120, "stages", True)
        if r["rc"] != 0 or "json" not in r:
            raise StepFailed(f"make_stage_models: exit {r['rc']}", tail=r["tail"])
        world, manual = r["json"], base / "manual"
        self.env["nnUNet_results"] = world["dataset"].rsplit(os.sep, 1)[0]
        self.env.setdefault("nnUNet_raw", str(base))
        self.env.setdefault("nnUNet_preprocessed", str(base))
        common = ["-i", world["inputs"], "-d", "998", "-f", "0", "-device", self.args.device, "--disable_tta"]
        common += ["-npp", "1", "-nps", "1", "--disable_progress_bar"]
        predict = ("nnunetv2.inference.predict_from_raw_data", "predict_entry_point")
        chain = [
            (*predict, *common, "-c", "2d", "--save_probabilities", "-o", str(manual / "2d")),
            (*predict, *common, "-c", "3d_fullres", "--save_probabilities", "-o", str(manual / "3d_fullres")),
            ("nnunetv2.ensembling.ensemble", "entry_point_ensemble_folders", "-i", str(manual / "2d"))
            + (str(manual / "3d_fullres"), "-o", str(manual / "ensemble"), "-np", "1"),
            ("nnunetv2.postprocessing.remove_connected_components", "entry_point_apply_postprocessing")
            + ("-i", str(manual / "ensemble"), "-o", str(manual / "final"), "-pp_pkl_file", world["postprocessing_pkl"])
            + ("-plans_json", world["plans_json"], "-np", "1"),
        ]
        detail: dict = {"cases": cases, "manual_seconds": {}}
        code = DETERMINISTIC_NNUNET + NNUNET_ENTRY if self.cuda else ONE_THREAD + NNUNET_ENTRY
        labels = ("predict 2d", "predict 3d_fullres", "ensemble", "postprocessing")
        for label, command in zip(labels, chain, strict=True):
            r = self.run(self.python("-c", code, *command), max(MIN_STEP_S, deadline - time.monotonic()), "stages")
            detail["manual_seconds"][label] = r["seconds"]
            if r["rc"] != 0:
                raise StepFailed(f"nnU-Net's {label}: exit {r['rc']}", tail=r["tail"], **detail)
        out = base / "launcher"
        cmd = self.python("-m", "launcher", "run", "-i", world["inputs"], "-o", str(out), "-d", "998", "--best")
        cmd += ["-device", self.args.device, "--disable_tta", "-npp", "1", "-nps", "1"]
        cmd += ["--workers-per-gpu", "1", "--deterministic"] if self.cuda else ["--workers", "2"]
        r = self.run(cmd, max(MIN_STEP_S, deadline - time.monotonic()), "stages", **self._cpu_cores(2))
        detail["launcher"] = summarize_run(r)
        if r["rc"] != 0:
            self._keep_logs(out, "stages")
            raise StepFailed(f"launcher --best: exit {r['rc']}", **detail)
        summary = json.loads((out / ".nnunet-launch" / "summary.json").read_text())
        detail.update({k: summary.get(k) for k in ("wall_seconds", "stages", "intermediate_peak_bytes")})
        detail["compare"] = compare(out, manual / "final", extra=("dataset.json", "plans.json"))
        detail["gpu_processes_after"] = self.gpu_apps(wait_s=15)
        if not detail["compare"]["identical"]:
            self._keep_logs(out, "stages")
            raise StepFailed("the launcher's --best outputs differ from nnU-Net's chain", **detail)
        return detail

    def accelerator(self, timeout: float) -> dict:
        """The CI's accelerator tests (pytest -m accelerator) against the real device: the same
        runs with -device cuda; those that limit the device's memory run only on the simulated one."""
        cmd = self.python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "accelerator", "-x")
        cmd += ["--basetemp", str(self.work / "accelerator"), str(REPO / "tests" / "test_accelerator.py")]
        r = self.run(cmd, timeout, "accelerator", env={**self.env, "NNUNET_LAUNCH_TEST_REAL_ACCELERATOR": "1"})
        detail = {"summary": r["tail"].strip().splitlines()[-1:] if r["tail"] else [], "left_behind": r["left_behind"]}
        if r["rc"] != 0:
            raise StepFailed(
                f"pytest -m accelerator: exit {r['rc']}" + (" (timed out)" if r["timed_out"] else ""), **detail
            )
        return detail

    def export(self, timeout: float) -> dict:
        detail = self._benchmark("bench_export", "export", timeout - 20, ["--cases", str(self.args.export_cases)])
        summary, where = detail.get("summary", {}), "fast_cuda" if self.cuda else "fast_cpu"
        low = [
            f"{key} {summary.get(key)} < {floor}"
            for key, floor in (
                (f"{where}_min_equal_voxels_pct", FAST_MIN_EQUAL_VOXELS_PCT),
                (f"{where}_min_dice", FAST_MIN_DICE),
            )
            if summary.get(key) is None or summary[key] < floor
        ]
        failed = [name for name, v in detail.get("launcher", {}).items() if v.get("status") != "done"]
        if low or failed:
            raise StepFailed("; ".join(low + [f"launcher run not done: {name}" for name in failed]), **detail)
        return detail

    def preprocess(self, timeout: float) -> dict:
        detail = self._benchmark(
            "bench_preprocess", "preprocess", timeout - 20, ["--quarter-cases", "1", "--launcher-repeats", "1"]
        )
        summary = detail.get("summary", {})
        agreement = summary.get("launcher_fast_vs_exact_agreement") or {}
        difference = summary.get("max_abs_diff_preprocessed")
        equal, dice = agreement.get("min_equal_voxels_pct"), agreement.get("min_dice")
        low = [
            what
            for what, ok in (
                (f"preprocessed input differs by {difference} > 1e-3", difference is not None and difference <= 1e-3),
                (f"equal voxels {equal} < {FAST_MIN_EQUAL_VOXELS_PCT}", (equal or 0) >= FAST_MIN_EQUAL_VOXELS_PCT),
                (f"min Dice {dice} < {FAST_MIN_DICE}", (dice or 0) >= FAST_MIN_DICE),
            )
            if not ok
        ]
        if low:
            raise StepFailed("; ".join(low), **detail)
        return detail

    def bench(self, timeout: float) -> dict:
        detail = self._benchmark("bench_gpu", "bench", timeout - 10, ["--cases", str(self.args.bench_cases)])
        failed = [name for name, v in detail.get("runs", {}).items() if v.get("status") != "done"]
        if failed:
            raise StepFailed(f"not measured or failed: {', '.join(failed)}", **detail)
        return detail

    # --- helpers ----------------------------------------------------------------------------
    def _benchmark(self, script: str, step: str, deadline: float, args: list[str]) -> dict:
        """scripts/<script>.py with its own deadline inside the step's; its JSON is the detail."""
        result_file = self.results / f"{script}.json"
        cmd = self.python(str(REPO / "scripts" / f"{script}.py"), *args, "--deadline-s", str(int(deadline)))
        cmd += ["--json-out", str(result_file), "--work-dir", str(self.work / step), "-device", self.args.device]
        r = self.run(cmd, deadline + 10, step)
        detail = json.loads(result_file.read_text()) if result_file.exists() else {}
        detail["gpu_processes_after"] = self.gpu_apps(wait_s=15)
        if r["rc"] != 0:
            raise StepFailed(f"{script}.py: exit {r['rc']}" + (" (timed out)" if r["timed_out"] else ""), **detail)
        return detail

    def _need_tiny(self) -> None:
        if not self.tiny:
            raise StepFailed("no tiny model (the tiny step did not pass)")

    def _need_reference(self) -> None:
        self._need_tiny()
        if "reference" not in self.tiny:
            raise StepFailed("no reference (the reference step did not pass)")

    def _plain_cmd(self, out: Path) -> list[str]:
        code = DETERMINISTIC_NNUNET + PLAIN_NNUNET if self.cuda else PLAIN_NNUNET_ONE_THREAD
        cmd = self.python("-c", code, "-i", str(self.tiny["inputs"]), "-o", str(out), "-m", str(self.tiny["model"]))
        cmd += ["-f", "0", "-device", self.args.device, "--disable_tta", "-npp", "1", "-nps", "1"]
        return cmd + ["--disable_progress_bar"]

    def _launch_cmd(self, out: Path, k: int) -> list[str]:
        cmd = self.python("-m", "launcher", "run", "-i", str(self.tiny["inputs"]), "-o", str(out))
        cmd += ["-m", str(self.tiny["model"]), "-f", "0", "-device", self.args.device, "--disable_tta"]
        cmd += ["--workers-per-gpu", str(k), "--deterministic"] if self.cuda else ["--workers", str(k)]
        return cmd

    def _cpu_cores(self, k: int) -> dict:
        """On the CPU the launcher gives each worker its share of the cores as torch threads:
        held to k cores, that is one thread each, as the one-thread reference."""
        if self.cuda:
            return {}
        cores = sorted(os.sched_getaffinity(0))[:k]
        return {"preexec_fn": lambda: os.sched_setaffinity(0, cores)}

    def _launch(self, out: Path, k: int, timeout: float, log: str) -> dict:
        return self.run(self._launch_cmd(out, k), timeout, log, **self._cpu_cores(k))

    def _start_launcher(self, out: Path, k: int, log: str):
        path = self.logs / f"{log}.log"
        cmd = self._launch_cmd(out, k)
        with path.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, **self._cpu_cores(k)
            )
        return proc, Descendants(proc.pid), path

    def _status(self, out: Path) -> dict | None:
        if not (out / ".nnunet-launch" / "journal.sqlite").exists():
            return None
        r = subprocess.run(
            self.python("-m", "launcher", "status", str(out), "--json"),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        try:  # status exits 1 once cases failed: its JSON still says what the parts do
            return json.loads(r.stdout)
        except ValueError:
            return None

    def _summary(self, out: Path) -> dict:
        """The run's summary.json, the parts of it this check reads."""
        path = out / ".nnunet-launch" / "summary.json"
        if not path.exists():
            return {}
        full = json.loads(path.read_text())
        keep = ("part_id", "gpu", "gpu_uuid", "done", "total", "restarts", "rate_per_min")
        summary = {k: full.get(k) for k in ("exit_code", "result", "wall_seconds", "total", "done", "failed")}
        summary["parts"] = [{k: p.get(k) for k in keep} for p in full.get("parts", [])]
        return summary

    def _problems(self, detail: dict, r: dict) -> list[str]:
        problems = []
        cmp = detail["compare"]
        if not cmp["identical"]:
            problems.append(
                f"outputs differ from plain nnU-Net: {cmp['differing_voxels']} voxel(s) in "
                f"{len(cmp['differing_cases'])} case(s), missing {cmp['missing']}, extra {cmp['extra']}, "
                f"geometry {cmp['geometry_differs']}"
            )
        if detail["summary"].get("done") != self.args.cases:
            problems.append(f"summary.json: {detail['summary'].get('done')} of {self.args.cases} done")
        if self.cuda:
            uuids = [p.get("gpu_uuid") for p in detail["summary"].get("parts", [])]
            if not uuids or not all(str(u).startswith(("GPU-", "MIG-")) for u in uuids):
                problems.append(f"parts not pinned to a GPU UUID: {uuids}")
        if r["left_behind"]:
            problems.append(f"processes of the run left behind (killed now): {r['left_behind']}")
        if detail["gpu_processes_after"]:
            problems.append(f"processes still hold GPU memory: {detail['gpu_processes_after']}")
        return problems

    def _nnunet_noise(self, cmp: dict) -> dict:
        """When the launcher's outputs differ: does plain nnU-Net differ from itself on this device
        (it should not, with deterministic kernels)?"""
        if self.left_s() < 120:
            return {"note": "no time to rerun plain nnU-Net"}
        out = self.tiny["base"] / f"reference-again-{time.monotonic_ns()}"
        r = self.run(self._plain_cmd(out), 90, "reference-again")
        if r["rc"] != 0:
            return {"note": f"plain nnU-Net rerun failed: exit {r['rc']}"}
        again = compare(out, self.tiny["reference"])
        return {"plain_vs_plain_differing_voxels": again["differing_voxels"], "plain_identical": again["identical"]}

    def _keep_logs(self, out: Path, name: str) -> None:
        logs = out / ".nnunet-launch" / "logs"
        if logs.is_dir():
            shutil.copytree(logs, self.logs / f"{name}-run", dirs_exist_ok=True)

    def gpu_apps(self, wait_s: float = 0.0) -> list[str]:
        """Processes holding GPU memory now (nvidia-smi) that were not there at the start,
        waiting up to wait_s for them to go. In a container nvidia-smi may not see processes
        (another PID namespace): then GPU memory that stays above the start's counts too."""
        if not self.cuda or not shutil.which("nvidia-smi"):
            return []
        deadline = time.monotonic() + wait_s
        before = self.baseline or {"apps": [], "memory_used_mib": []}
        known = {line.split(",")[0] for line in before["apps"]}
        while True:
            apps = [line for line in self._query_apps() if line.split(",")[0] not in known]
            memory = self._memory_used()
            grown = [
                f"GPU {i}: {now} MiB used, {was} MiB at the start"
                for i, (now, was) in enumerate(zip(memory, before["memory_used_mib"], strict=False))
                if now > was + MEMORY_SLACK_MIB
            ]
            if not (apps or grown) or time.monotonic() >= deadline:
                return apps + grown
            time.sleep(1)

    @staticmethod
    def _nvidia_smi(query: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30
        )

    @classmethod
    def _query_apps(cls) -> list[str]:
        r = cls._nvidia_smi("--query-compute-apps=pid,process_name,used_memory")
        if r.returncode != 0:
            return [f"nvidia-smi exit {r.returncode}: {r.stderr.strip()[:200]}"]
        return [line.strip() for line in r.stdout.splitlines() if line.strip()]

    @classmethod
    def _memory_used(cls) -> list[int]:
        r = cls._nvidia_smi("--query-gpu=memory.used")
        return [int(x) for x in r.stdout.split() if x.isdigit()] if r.returncode == 0 else []

    def save(self) -> None:
        path = self.results / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, default=str))
        os.replace(tmp, path)

    # --- the whole check -----------------------------------------------------------------
    def main(self) -> int:
        started = time.monotonic()
        try:
            ok = self.step("preflight", 60, self.preflight)
            if not ok and self.cuda and "preflight" in self.args.steps:
                self.summary["result"] = "no GPU: " + self.summary["steps"]["preflight"]["error"]
                return 2
            reserve = min(BENCH_RESERVE_S, 0.45 * self.args.budget_s) if "bench" in self.args.steps else 0
            self.step("install", 180, self.install, reserve)
            self.step("imports", 120, self.imports, reserve, needs=("install",))
            self.step("gpus", 60, self.gpus, reserve)
            self.step("tiny", 120, self.make_tiny, reserve, needs=("imports",))
            self.step("reference", 180, self.reference, reserve, needs=("tiny",))
            self.step("k1", 180, self.equivalence(1), reserve, needs=("reference",))
            self.step("k2", 180, self.equivalence(2), reserve, needs=("reference",))
            self.step("kill", 240, self.kill, reserve, needs=("reference",))
            self.step("stages", 240, self.stages, reserve, needs=("imports",))
            self.step("accelerator", 300, self.accelerator, reserve, needs=("imports",))
            self.step("export", 240, self.export, reserve, needs=("imports",))
            self.step("preprocess", 300, self.preprocess, reserve, needs=("imports",))
            self.step("bench", 600, self.bench, needs=("imports",))
            states = [s["status"] for s in self.summary["steps"].values()]
            self.summary["result"] = "passed" if all(s == "passed" for s in states) else "failed"
            return 0 if self.summary["result"] == "passed" else 1
        except KeyboardInterrupt:
            self.summary["result"] = "interrupted (SIGTERM or Ctrl-C)"
            for record in self.summary["steps"].values():
                if record["status"] == "running":
                    record["status"] = "interrupted"
            return 130
        finally:
            self.summary["seconds"] = round(time.monotonic() - started, 1)
            self.summary["gpu_processes_at_end"] = self.gpu_apps()
            self.save()
            shutil.rmtree(self.work, ignore_errors=True)
            print(f"gpu_check: {self.summary['result']} in {self.summary['seconds']} s: {self.results}/gpu_check.json")


# --- processes -------------------------------------------------------------------------------
class Descendants:
    """Every process ever seen below a pid (pid -> create time), to kill survivors by pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.seen: dict[int, float] = {}
        try:
            import psutil

            self.psutil = psutil
        except ImportError:  # preinstalled on the GPU machine; without it, only the group is killed
            self.psutil = None

    def sample(self) -> None:
        if self.psutil is None:
            return
        try:
            for child in self.psutil.Process(self.pid).children(recursive=True):
                try:
                    self.seen.setdefault(child.pid, child.create_time())
                except self.psutil.Error:
                    pass
        except self.psutil.Error:
            pass

    def alive(self) -> list[int]:
        alive = []
        for pid, created in self.seen.items():
            try:
                p = self.psutil.Process(pid)
                if p.create_time() == created and p.status() != self.psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except self.psutil.Error:
                pass
        return alive

    def kill_survivors(self, grace_s: float = 10.0) -> list[int]:
        """The processes of the run still alive grace_s after it ended (killed, and returned)."""
        if self.psutil is None:
            return []
        deadline = time.monotonic() + grace_s
        while (alive := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return alive


def stop_group(proc: subprocess.Popen, seen: Descendants) -> None:
    """SIGTERM to the command's process group (the launcher stops its workers), SIGKILL after a
    grace to the group and to every process seen below it."""
    seen.sample()
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *seen.alive()] if seen.psutil else [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tail(path: Path, chars: int = 3000) -> str:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - chars))
        return f.read().decode(errors="replace")


def summarize_run(r: dict) -> dict:
    return {k: r[k] for k in ("rc", "timed_out", "seconds", "left_behind")} | {"tail": r["tail"][-1500:]}


def unzip_wheels(wheels: list[Path], site: Path) -> None:
    """What pip --target does with these wheels, minus console scripts: the files into the
    site, a <name>.data/purelib|platlib folder's content too."""
    import zipfile

    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    for data in site.glob("*.data"):
        for kind in ("purelib", "platlib"):
            if (data / kind).is_dir():
                shutil.copytree(data / kind, site, dirs_exist_ok=True)
        shutil.rmtree(data)


# --- outputs -----------------------------------------------------------------------------------
def compare(out: Path, reference: Path, extra: tuple[str, ...] = ()) -> dict:
    """Voxel by voxel: every case's segmentation and geometry; OUT holds exactly nnU-Net's files
    (and `extra`: those a multi-stage run writes where the manual chain's last step writes none)."""
    import numpy as np
    import SimpleITK as sitk

    ref_files = sorted(p.name for p in reference.iterdir())
    out_files = sorted(p.name for p in out.iterdir() if p.name != ".nnunet-launch" and p.name not in extra)
    result = {
        "cases": sum(n.endswith(".nii.gz") for n in ref_files),
        "missing": sorted(set(ref_files) - set(out_files)),
        "extra": sorted(set(out_files) - set(ref_files)),
        "differing_cases": {},
        "differing_voxels": 0,
        "geometry_differs": [],
    }
    for name in ref_files:
        if not name.endswith(".nii.gz") or name in result["missing"]:
            continue
        a, b = sitk.ReadImage(str(reference / name)), sitk.ReadImage(str(out / name))
        va, vb = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
        if va.shape != vb.shape:
            result["differing_cases"][name] = f"shape {vb.shape} != {va.shape}"
            continue
        differing = int(np.count_nonzero(va != vb))
        if differing:
            result["differing_cases"][name] = differing
            result["differing_voxels"] += differing
        if (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) != (b.GetSpacing(), b.GetOrigin(), b.GetDirection()):
            result["geometry_differs"].append(name)
    result["identical"] = not (
        result["missing"] or result["extra"] or result["differing_cases"] or result["geometry_differs"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--budget-s", type=float, default=440, help="the whole check, seconds (default 440)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="the folder gpu_wheels.sh filled")
    parser.add_argument("--results", default=os.environ.get("OUT") or str(REPO / "gpu-check-results"))
    parser.add_argument("--cases", type=int, default=12, help="tiny model cases")
    parser.add_argument("--big-case-edge", type=int, default=192, help="edge of the large tiny case (cuda)")
    parser.add_argument("--bench-cases", type=int, default=20)
    parser.add_argument("--export-cases", type=int, default=4, help="cases of the export step")
    args = parser.parse_args()
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; the steps: {', '.join(STEPS)}")
    # the safety net's SIGTERM (gpu_check.sh) and Ctrl-C: stop what runs, write the JSON, exit
    signal.signal(signal.SIGTERM, _stop)
    sys.exit(Check(args).main())


def _stop(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
