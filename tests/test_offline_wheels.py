"""The GPU check's offline install path, proved here on the CPU.

The lent GPU machine reaches no network. scripts/gpu_wheels.sh (run online) packs the wheels
it lacks into .whl/; there scripts/gpu_check.sh installs them with `pip install --no-index
--no-deps --target` into a temporary site and puts that site and the repository on PYTHONPATH.
This test builds the same wheel set for this machine's Python and runs gpu_check.sh's CPU steps
through it: the install, the imports (nnU-Net's inference path and its trainer lookup, the
launcher's backend), the tiny model, plain nnU-Net, and a launcher run with two workers
compared voxel by voxel, so that the device call does not fail on a missing module.

What "preinstalled" means here. The GPU machine's python3 has torch, numpy, scipy, pandas,
scikit-image, scikit-learn, matplotlib, seaborn, tifffile, einops, psutil, click, rich,
nvidia-ml-py, pytest and pip installed system-wide (with what they require). We emulate that
python with a fresh virtual environment made from the base interpreter (standard library only)
whose site-packages holds symlinks to exactly those distributions of the project's .venv (every
top-level entry their RECORD names) and nothing else: no nnunetv2, SimpleITK, nibabel, blosc2,
tqdm... A module the wheel set misses fails to import here as it would there, and children
(spawned workers, nnU-Net's pools) use the same interpreter because sys.executable is that
environment's python. What still differs from the GPU machine: Python 3.11 instead of 3.12 (the
wheels are built for the Python in use, as gpu_wheels.sh --python-version does for 3.12), torch's
CPU build, and the versions of the preinstalled packages.

Needs PyPI (the wheels are downloaded): skipped, saying so, when it cannot be reached. About two
minutes (the download is cached by pip; packing with xz takes most of the rest).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
# the GPU machine's preinstalled packages (the device tool's documentation), pip included
PREINSTALLED = (
    "torch numpy scipy pandas scikit-image scikit-learn matplotlib seaborn tifffile einops psutil click rich "
    "nvidia-ml-py pytest pip"
).split()
# what the GPU machine lacks: none of it may be reachable except through the wheels
MUST_COME_FROM_WHEELS = ("nnunetv2", "SimpleITK", "nibabel", "blosc2")


def _pypi_reachable() -> str | None:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/tqdm/", timeout=10) as response:
            response.read(1)
        return None
    except Exception as exc:  # offline, DNS, proxy, TLS: the reason goes into the skip
        return f"PyPI cannot be reached ({type(exc).__name__}: {exc}); the wheels cannot be downloaded"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names: list[str]) -> list[importlib.metadata.Distribution]:
    """The distributions named and everything they require (markers for this Python, no extras)."""
    from packaging.requirements import Requirement

    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [_normalize(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional requirement this venv does not have: neither would that python
        found[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_normalize(req.name))
    return list(found.values())


def _gpu_machine_python(base: Path) -> Path:
    """A python with only the standard library and the preinstalled distributions (symlinked)."""
    env_dir = base / "gpu-machine-python"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = env_dir / "lib" / f"python{PYVER}" / "site-packages"
    assert site.is_dir(), site
    linked = set()
    for dist in _closure(PREINSTALLED):
        root = Path(dist.locate_file(""))
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__") or top in linked:
                continue
            if (root / top).exists():
                (site / top).symlink_to(root / top)
                linked.add(top)
    return env_dir / "bin" / "python"


def test_gpu_check_installs_the_wheels_offline_and_the_launcher_matches_plain_nnunet(tmp_path):
    reason = _pypi_reachable()
    if reason:
        pytest.skip(reason)
    wheels = tmp_path / "wheels"
    made = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_wheels.sh"), "--python-version", PYVER, "--dest", str(wheels)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert made.returncode == 0, made.stdout + made.stderr
    manifest = json.loads((wheels / "MANIFEST.json").read_text())
    assert manifest["python"] == PYVER and (wheels / manifest["archive"]).exists()
    names = {w["file"].split("-")[0].lower() for w in manifest["wheels"]}
    assert {"nnunetv2", "simpleitk", "nibabel", "blosc2"} <= names and "imagecodecs" not in names

    python = _gpu_machine_python(tmp_path)
    probe = (
        "import importlib.util, json, sys\n"
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))"
    )
    wanted = (*MUST_COME_FROM_WHEELS, "launcher", "torch", "numpy", "scipy", "skimage", "psutil", "pynvml", "pip")
    found = json.loads(subprocess.run([str(python), "-c", probe, *wanted], capture_output=True, cwd=tmp_path).stdout)
    assert not any(found[m] for m in (*MUST_COME_FROM_WHEELS, "launcher")), f"importable without the wheels: {found}"
    assert all(found[m] for m in wanted[len(MUST_COME_FROM_WHEELS) + 1 :]), f"preinstalled ones missing: {found}"

    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHON=str(python))
    steps = "preflight,install,imports,tiny,reference,k2"
    command = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--steps", steps]
    command += ["--wheels", str(wheels), "--results", str(results), "--cases", "4", "--budget-s", "400"]
    check = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = check.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(check.pid, signal.SIGTERM)  # gpu_check stops what it started and writes its JSON
        output, _ = check.communicate(timeout=60)
        pytest.fail("gpu_check.sh --device cpu timed out\n" + output)
    summary = json.loads((results / "gpu_check.json").read_text())
    print({name: step.get("seconds") for name, step in summary["steps"].items()})
    steps_json = json.dumps(summary["steps"], indent=1)[-6000:]
    assert check.returncode == 0 and summary["result"] == "passed", output + steps_json

    install, imports = summary["steps"]["install"], summary["steps"]["imports"]
    assert len(install["wheels"]) == len(manifest["wheels"])
    site = install["site"]
    for module in ("nnunetv2.inference.predict_from_raw_data", "SimpleITK", "nibabel", "blosc2"):
        assert imports["modules"][module].startswith(site), (module, imports["modules"][module])
    assert imports["modules"]["launcher.nnunet"] == str(ROOT / "launcher" / "nnunet.py")
    assert imports["modules"]["click"].startswith(str(python.parent.parent)), "preinstalled, from that python"
    assert imports["trainer_lookup"].endswith(".nnUNetTrainer")

    k2 = summary["steps"]["k2"]
    assert k2["compare"]["identical"] and k2["compare"]["cases"] == 4
    assert [p["done"] for p in k2["summary"]["parts"]] and k2["summary"]["done"] == 4
    assert k2["launcher"]["left_behind"] == [], "no process of the run is left"
