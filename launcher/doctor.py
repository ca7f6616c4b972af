"""`nnunet-launch doctor`: the environment in one screen, as the launcher sees it, for a user who
installed it into their own environment (their nnunetv2 release, or an editable fork with their
own trainers). One line a check, `ok`, `warning` or `problem`, with the fix for anything not ok;
exit 1 when anything is a problem.

Each check runs in a thread of its own (they run side by side): an exception in one becomes that
check's problem line, and a check still running after CHECK_SECONDS is reported as such. torch,
then torchvision, are imported in one child process killed after CHILD_SECONDS (a torchvision
built for another torch fails on import, a broken CUDA setup can hang it); this is the one module
besides device.py that asks torch about CUDA (`torch.cuda.is_available()`, in that child).
nnunetv2 is never imported: its version, origin and location come from its metadata and
`importlib.util.find_spec`, its trainers from a scan of `class X(` lines. The GPUs come from
gpus.py's NVML inventory (NNUNET_LAUNCH_FAKE_GPUS replaces it in tests, as everywhere).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from importlib import metadata, util

import click

from launcher import gpus as inventory
from launcher.nnunet_versions import (
    FAST_PROFILE_FROM,
    OLDEST,
    SUPPORTED,
    fast_profile_refusal,
    installed,
    refusal,
    version_tuple,
)

OK, WARNING, PROBLEM = "ok", "warning", "problem"
CHILD_SECONDS = 20.0  # the child importing torch and torchvision
CHECK_SECONDS = 25.0  # every check, all running at once
EXT_TRAINER_FROM = (2, 8, 0)  # the first nnU-Net release that reads nnUNet_extTrainer
NNUNET_PATHS = ("nnUNet_results", "nnUNet_raw", "nnUNet_preprocessed")
PIP_SPEC = SUPPORTED.replace(" ", "")  # "nnunetv2>=2.5.2,<2.9"
MAX_SCANNED_FILES = 5000


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warning, problem
    detail: str
    fix: str | None = None


def _ok(detail: str) -> tuple:
    return OK, detail, None


def _warning(detail: str, fix: str) -> tuple:
    return WARNING, detail, fix


def _problem(detail: str, fix: str) -> tuple:
    return PROBLEM, detail, fix


_CACHED = []


def _once(function):
    """Computed once a diagnosis, by whichever check asks first (checks run in threads)."""
    lock, memo = threading.Lock(), {}

    def cached():
        with lock:
            if "value" not in memo:
                memo["value"] = function()
            return memo["value"]

    cached.forget = memo.clear
    _CACHED.append(cached)
    return cached


# --- torch and torchvision, in a child process ---------------------------------------------------
PROBE = """
import json
import torch
from launcher.device import cuda_status
print(json.dumps({"torch": {"version": torch.__version__, **cuda_status()}}), flush=True)
import torchvision
print(json.dumps({"torchvision": {"version": torchvision.__version__}}), flush=True)
"""


@_once
def probe() -> dict:
    """{"torch": {"version", "cuda", "available", "devices" or "why"}, "torchvision": {"version"}}, each
    {"error": ...} instead where it did not import: torch, then torchvision (one import of torch), in a
    child of this Python that is killed after CHILD_SECONDS."""
    timeout = CHILD_SECONDS
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        errors = [line.strip() for line in err.splitlines() if line.strip()]
        failure = errors[-1] if errors else f"the child exited with status {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        failure = f"did not finish in {timeout:g} s"
    found = {}
    for line in out.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # whatever else an import printed
        if isinstance(item, dict):
            found.update({k: v for k, v in item.items() if k in ("torch", "torchvision")})
    return {
        "torch": found.get("torch", {"error": failure}),
        "torchvision": found.get("torchvision", {"error": failure}),
    }


def torch_probe() -> dict:
    return probe()["torch"]


@_once
def nvml() -> dict:
    """{"gpus", "skipped", "driver", "cuda"} through gpus.py, or {"error"} without NVML."""
    try:
        found, skipped = inventory._scan()
    except inventory.NvmlUnavailable as exc:
        return {"error": str(exc)}
    driver, cuda = None, None
    if not os.environ.get(inventory.FAKE_INVENTORY_ENV):
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                driver = pynvml.nvmlSystemGetDriverVersion()
                driver = driver if isinstance(driver, str) else driver.decode()
                number = pynvml.nvmlSystemGetCudaDriverVersion()
                cuda = (number // 1000, number % 1000 // 10)
            finally:
                pynvml.nvmlShutdown()
        except Exception:
            pass  # the GPUs are what matters; the versions only explain a torch that cannot use them
    return {"gpus": found, "skipped": skipped, "driver": driver, "cuda": cuda}


def visible(found: list) -> list:
    return inventory.visible_gpus(found, inventory.parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES")))


# --- install origin (PEP 610) and trainers -----------------------------------------------------------
@dataclass(frozen=True)
class Origin:
    editable: bool
    source: str | None  # the local folder it was installed from, if any
    words: str


def install_origin(direct_url: str | None) -> Origin:
    """How a distribution was installed, from its PEP 610 direct_url.json (None: none, i.e. from a
    package index): an editable install (`pip install -e`) runs its source folder's code."""
    if not direct_url:
        return Origin(False, None, "installed from a package index")
    info = json.loads(direct_url)
    url = info.get("url", "")
    parsed = urllib.parse.urlparse(url)
    path = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else None
    if "dir_info" in info:
        if info["dir_info"].get("editable"):
            return Origin(True, path, f"editable install of {path or url}")
        return Origin(False, path, f"installed from the folder {path or url} (a copy: edits there need a reinstall)")
    if "vcs_info" in info:
        vcs = info["vcs_info"]
        return Origin(False, None, f"installed from {vcs.get('vcs', 'vcs')} {url} at {vcs.get('commit_id', '?')[:12]}")
    return Origin(False, None, f"installed from {url}")


def origin_of(distribution: str) -> Origin:
    return install_origin(metadata.distribution(distribution).read_text("direct_url.json"))


CLASS_LINE = re.compile(r"^[ \t]*class[ \t]+([A-Za-z_]\w*)[ \t]*\(([^)]*)\)", re.MULTILINE)


def _modules(folder: str, limit: int):
    """The .py files nnU-Net's search imports: the folder's modules, and its packages' (folders
    with an __init__.py), recursively; at most `limit` files."""
    pending, seen = [folder], 0
    while pending and seen < limit:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or seen >= limit:
                continue
            if entry.is_file() and entry.name.endswith(".py"):
                seen += 1
                yield entry.path
            elif entry.is_dir() and "." not in entry.name and os.path.isfile(os.path.join(entry.path, "__init__.py")):
                pending.append(entry.path)


def trainer_classes(folder: str, limit: int = MAX_SCANNED_FILES) -> dict[str, str]:
    """{class name: file} of the trainer classes under `folder`, without importing anything: the
    `class X(...)` lines whose bases name a Trainer, or a class found to be one."""
    classes: dict[str, tuple[list[str], str]] = {}
    for path in _modules(folder, limit):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for match in CLASS_LINE.finditer(text):
            bases = [
                name.rsplit(".", 1)[-1]
                for name in re.findall(r"[A-Za-z_][\w.]*", match.group(2))
                if not name.startswith("metaclass")
            ]
            classes.setdefault(match.group(1), (bases, path))
    trainers: dict[str, str] = {}
    grew = True
    while grew:
        grew = False
        for name, (bases, path) in classes.items():
            if name not in trainers and any("Trainer" in base or base in trainers for base in bases):
                trainers[name], grew = path, True
    return dict(sorted(trainers.items()))


def nnunet_package_dir() -> str | None:
    """Where Python imports nnunetv2 from (found, not imported)."""
    spec = util.find_spec("nnunetv2")
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.dirname(spec.origin) if spec.origin else None


def _reads_ext_trainer(package_dir: str | None, version: str | None) -> bool:
    source = os.path.join(package_dir, "utilities", "find_objects.py") if package_dir else ""
    if os.path.isfile(source):  # a fork may have it before 2.8.0, or not after
        with open(source, encoding="utf-8", errors="replace") as f:
            return "nnUNet_extTrainer" in f.read()
    return version is not None and version_tuple(version) >= EXT_TRAINER_FROM


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath((path, folder)) == folder


# --- the checks ------------------------------------------------------------------------------------
def check_python() -> tuple:
    return _ok(f"{platform.python_version()}, {sys.executable}")


def check_torch() -> tuple:
    version = installed("torch")
    if version is None:
        return _problem("torch is not installed", "pip install torch (a CUDA build where there are GPUs)")
    probe = torch_probe()
    if "error" in probe:
        return _problem(
            f"torch {version} does not import: {probe['error']}",
            f"reinstall it: pip install --force-reinstall 'torch=={version}'",
        )
    why = refusal(".".join(map(str, OLDEST)), version)
    if why:
        return _problem(why, "pip install 'torch!=2.9.*' (with its matching torchvision)")
    build = f"a CUDA {probe['cuda']} build" if probe["cuda"] else "a CPU-only build"
    said = f"{probe['version']}, {build}"
    if probe["available"]:
        return _ok(f"{said}; CUDA available here ({probe['devices']} device(s))")
    gpus = nvml()
    if "error" in gpus or not gpus["gpus"]:
        return _ok(f"{said}; CUDA not available here (no GPU): runs on the CPU")
    if not visible(gpus["gpus"]):
        shown = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return _warning(
            f"{said}; CUDA_VISIBLE_DEVICES={shown!r} hides every GPU", "unset CUDA_VISIBLE_DEVICES to use the GPUs"
        )
    said += f"; NVML sees {len(gpus['gpus'])} GPU(s), but torch cannot use CUDA"
    said += f" ({probe['why']})" if probe.get("why") else ""
    release, driver_cuda = version.split("+")[0], gpus["cuda"]
    newest = f"CUDA {driver_cuda[0]}.{driver_cuda[1]}" if driver_cuda else "the driver's CUDA"
    if not probe["cuda"]:
        fix = (
            f"install a CUDA build of torch, for {newest} or older: pip install 'torch=={release}' --index-url "
            "https://download.pytorch.org/whl/cuXYZ (pytorch.org lists the builds)"
        )
    elif driver_cuda and version_tuple(probe["cuda"])[:2] > driver_cuda:
        said += f"; it is built for CUDA {probe['cuda']}, the driver supports {newest} at most"
        fix = f"update the NVIDIA driver, or install a torch built for {newest} or older"
    else:
        fix = "nvidia-smi must list the GPUs; python -c 'import torch; torch.cuda.init()' repeats torch's error"
    return _problem(said, fix)


def _torchvision_fix(torch_version: str) -> str:
    release = version_tuple(torch_version)
    line = f"torchvision==0.{release[1] + 15}.*" if len(release) >= 2 and release[0] == 2 else "torchvision"
    where = " --index-url https://download.pytorch.org/whl/cpu" if torch_version.endswith("+cpu") else ""
    return (
        f"install the torchvision built for torch {torch_version}: pip install '{line}'{where} (a CPU-only torch "
        "needs the CPU torchvision of its index: PyPI's Linux torchvision wheels are CUDA builds)"
    )


def check_torchvision() -> tuple:
    version, torch_version = installed("torchvision"), installed("torch")
    lookup = "without it nnU-Net's trainer lookup finds only nnUNetTrainer (not nnUNetTrainerNoMirroring, ...)"
    if version is None:
        fix = _torchvision_fix(torch_version) if torch_version else "pip install torch torchvision"
        return _problem(f"torchvision is not installed: {lookup}", fix)
    if torch_version is None:
        return _problem(f"{version}, but torch is not installed", "pip install torch (see torch)")
    if "error" in torch_probe():
        return _problem(f"{version}; torch itself does not load (see torch)", "fix torch first")
    loaded = probe()["torchvision"]
    if "error" in loaded:
        wanted = [r for r in (metadata.requires("torchvision") or []) if re.match(r"torch\s*==", r)]
        built = f" (it requires {wanted[0].split(';')[0].strip()})" if wanted else ""
        return _problem(
            f"{version} does not load with torch {torch_version}{built}: {loaded['error']}; {lookup}",
            _torchvision_fix(torch_version),
        )
    return _ok(f"{version}, loads with torch {torch_probe().get('version', torch_version)}")


def check_nnunet() -> tuple:
    version = installed("nnunetv2")
    if version is None:
        return _problem(refusal(None, None), f"pip install '{PIP_SPEC}' (or pip install -e YOUR_FORK)")
    origin = origin_of("nnunetv2")
    where = nnunet_package_dir()
    said = f"{version}, {origin.words}; imported from {where}"
    why = refusal(version, None)
    if why:
        fork = "; a fork: bring it to a release in that range" if origin.editable or origin.source else ""
        return _problem(f"{why} ({origin.words})", f"pip install '{PIP_SPEC}'{fork}")
    if where is None:
        return _problem(
            f"{version}'s metadata is installed, but Python finds no nnunetv2 package",
            f"reinstall it: pip install --force-reinstall --no-deps 'nnunetv2=={version}'",
        )
    expected = origin.source if origin.editable else str(metadata.distribution("nnunetv2").locate_file("nnunetv2"))
    if expected and not _inside(where, expected):
        return _warning(
            f"{said}, not from {expected} as the installed {version} says: another copy comes first on sys.path",
            "remove the other copy from PYTHONPATH (or the folder Python starts in), or reinstall the one you want",
        )
    return _ok(f"{said}; supported ({SUPPORTED})")


def check_fast_profile() -> tuple:
    version = installed("nnunetv2")
    needs = ".".join(map(str, FAST_PROFILE_FROM))
    if version is None:
        return _warning(f"needs nnunetv2 >= {needs}; none is installed", f"pip install '{PIP_SPEC}'")
    why = fast_profile_refusal()
    if why:
        return _warning(why, f"the default profile (exact) works; nnunetv2 >= {needs} for --profile fast")
    return _ok(f"available (nnunetv2 >= {needs})")


def check_ext_trainer() -> tuple:
    value = os.environ.get("nnUNet_extTrainer")
    version = installed("nnunetv2")
    where = nnunet_package_dir() if version else None
    if value is None:
        return _ok("not set: trainers come from nnunetv2 itself" + (f" ({where})" if where else ""))
    if version is None:
        return _warning(f"set to {value!r}, but nnunetv2 is not installed", "see nnunetv2")
    if not _reads_ext_trainer(where, version):
        inside = os.path.join(where, "training", "nnUNetTrainer") if where else "nnunetv2/training/nnUNetTrainer"
        return _warning(
            f"set to {value!r}, but nnunetv2 {version} does not read it (2.8.0 and later do)",
            f"put your trainer files in {inside}, or install nnunetv2 >= 2.8.0",
        )
    builtin = (
        (set(trainer_classes(os.path.join(where, "training", "nnUNetTrainer"))) | {"nnUNetTrainer"}) if where else set()
    )
    status, parts, fixes = OK, [], []
    for folder in [p for p in value.split(os.pathsep) if p.strip()]:
        if not os.path.isdir(folder):
            status = PROBLEM
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            parts.append(f"{folder} {what} (nnU-Net skips it without a word)")
            fixes.append(
                f"point nnUNet_extTrainer at the folder(s) holding your trainer .py files ({os.pathsep}-separated)"
            )
            continue
        found = trainer_classes(folder)
        if not found:
            status = PROBLEM if status == PROBLEM else WARNING
            parts.append(f"{folder}: no trainer class found")
            fixes.append(
                "nnU-Net imports the .py files of the folder and of its packages (subfolders with an __init__.py); "
                "a trainer is a class deriving from nnUNetTrainer"
            )
            continue
        parts.append(f"{folder}: {', '.join(found)}")
        shadowed = sorted(set(found) & builtin)
        if shadowed:
            status = PROBLEM if status == PROBLEM else WARNING
            parts.append(f"{', '.join(shadowed)} also in nnunetv2 itself, which nnU-Net uses instead")
            fixes.append("give your trainer a name of its own (nnU-Net searches its own trainers first)")
    if not parts:
        return _warning(f"set to {value!r}, which names no folder", "unset it, or name your trainers' folder")
    return status, "; ".join(parts), "; ".join(fixes) or None


def check_nnunet_paths() -> tuple:
    parts, missing = [], []
    for name in NNUNET_PATHS:
        value = os.environ.get(name)
        if value is None:
            parts.append(f"{name} not set")
        elif not os.path.isdir(value):
            parts.append(f"{name}={value} (no such folder)")
            missing.append(name)
        else:
            parts.append(f"{name}={value}")
    note = " (the launcher needs only nnUNet_results, and only for -d; -m needs none)"
    if missing:
        return _warning("; ".join(parts) + note, f"correct or unset {', '.join(missing)}")
    return _ok("; ".join(parts) + note)


def _gib(size: int) -> str:
    return f"{size / 2**30:.0f} GiB"


def check_nvidia() -> tuple:
    found = nvml()
    if "error" in found:
        return _warning(f"no NVIDIA driver: runs on the CPU only ({found['error']})", inventory.CPU_HINT)
    driver = found["driver"] or "version unknown"
    if found["cuda"]:
        driver += f" (CUDA up to {found['cuda'][0]}.{found['cuda'][1]})"
    stand_ins = (
        f" (stand-ins from {inventory.FAKE_INVENTORY_ENV})" if os.environ.get(inventory.FAKE_INVENTORY_ENV) else ""
    )
    skipped = "; ".join(f"GPU {i} skipped: {why}" for i, why in sorted(found["skipped"].items()))
    if not found["gpus"]:
        return _warning(
            f"driver {driver}, but NVML finds no GPU{'; ' + skipped if skipped else ''}", inventory.CPU_HINT
        )
    groups: dict[tuple, list[int]] = {}
    for gpu in found["gpus"]:
        groups.setdefault((gpu.name, gpu.memory_total), []).append(gpu.index)
    listed = ", ".join(
        f"{len(indices)} x {name} ({_gib(total)})" if len(indices) > 1 else f"GPU {indices[0]}: {name} ({_gib(total)})"
        for (name, total), indices in groups.items()
    )
    said = f"driver {driver}; {len(found['gpus'])} GPU(s){stand_ins}: {listed}"
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        said += f"; CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} leaves {len(visible(found['gpus']))}"
    if skipped:
        return _warning(f"{said}; {skipped}", "a GPU NVML fails on is left out of runs; nvidia-smi shows its state")
    return _ok(said)


def check_launcher() -> tuple:
    version = installed("nnunet-launch")
    if version is None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return _warning(f"not installed in this environment (running from {here})", f"pip install {here}")
    return _ok(f"{version}, {origin_of('nnunet-launch').words}")


CHECKS = (
    ("python", check_python),
    ("torch", check_torch),
    ("torchvision", check_torchvision),
    ("nnunetv2", check_nnunet),
    ("--profile fast", check_fast_profile),
    ("nnUNet_extTrainer", check_ext_trainer),
    ("nnUNet_* folders", check_nnunet_paths),
    ("NVIDIA driver", check_nvidia),
    ("nnunet-launch", check_launcher),
)


def diagnose(checks=CHECKS, seconds: float = CHECK_SECONDS) -> list[Check]:
    """Every check at once, each in its own thread: an exception is its problem line, and one not
    done after `seconds` is reported unfinished (its thread is left behind; the process ends)."""
    for cached in _CACHED:
        cached.forget()
    results: list[Check | None] = [None] * len(checks)

    def one(i: int, name: str, check) -> None:
        try:
            results[i] = Check(name, *check())
        except Exception as exc:
            results[i] = Check(
                name,
                PROBLEM,
                f"the check itself failed: {type(exc).__name__}: {exc}",
                "unless the line shows a fault of this environment, a bug of doctor's: please report it",
            )

    threads = [threading.Thread(target=one, args=(i, *c), daemon=True) for i, c in enumerate(checks)]
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    unfinished = (
        PROBLEM,
        f"did not finish in {seconds:g} s",
        "run doctor again; if it hangs again, so does this part of the environment for the launcher",
    )
    done = list(results)  # a late thread does not change what is reported
    return [r or Check(name, *unfinished) for r, (name, _) in zip(done, checks, strict=True)]


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == PROBLEM for c in checks) else 0


def summary(checks: list[Check]) -> str:
    problems = sum(c.status == PROBLEM for c in checks)
    warnings = sum(c.status == WARNING for c in checks)
    return f"{problems or 'no'} problem(s), {warnings or 'no'} warning(s): exit {exit_code(checks)}"


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<7}  {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<7}  {'':<{width}}  fix: {c.fix}")
    lines.append(summary(checks))
    return "\n".join(lines)


def to_json(checks: list[Check]) -> dict:
    return {
        "checks": [asdict(c) for c in checks],
        "problems": sum(c.status == PROBLEM for c in checks),
        "warnings": sum(c.status == WARNING for c in checks),
        "exit_code": exit_code(checks),
    }


def main(as_json: bool) -> int:
    checks = diagnose()
    click.echo(json.dumps(to_json(checks), indent=2) if as_json else render(checks))
    return exit_code(checks)
