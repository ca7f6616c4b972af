#!/usr/bin/env bash
# Fill the git-ignored .whl/ with the wheels a GPU machine without network lacks for nnU-Net
# inference, so scripts/gpu_check.sh can install them there with `pip --no-index --no-deps
# --target`. Run it here, online:
#
#   bash scripts/gpu_wheels.sh [--python-version 3.12] [--dest .whl] [--max-mib 60] [--xz-preset 1]
#
# The lent GPU machine (x86-64, python3 = 3.12) already has torch (CUDA), numpy, scipy, pandas,
# scikit-image, scikit-learn, matplotlib, seaborn, tifffile, einops, psutil, click, rich,
# nvidia-ml-py, pytest and pip; the project itself travels as the working tree (PYTHONPATH).
# What it lacks and inference imports (traced: the launcher's workers, plain nnUNetv2_predict,
# scripts/make_tiny_model.py and scripts/bench_gpu.py, every process's imports recorded):
#   nnunetv2 acvl-utils batchgenerators batchgeneratorsv2 dynamic-network-architectures
#   SimpleITK nibabel (nnU-Net's reader registry imports every reader) tqdm
#   blosc2 + ndindex msgpack numexpr (export_prediction imports the blosc2 dataset module), and
#     httpx + idna (blosc2 4.x imports httpx at import time, httpx imports idna; its httpcore,
#     anyio and certifi are imported only when a request is made)
#   connected-components-3d (cc3d: nnU-Net's trainer lookup imports the training modules)
# Left out, never imported on that path: imagecodecs (tifffile's optional codecs), graphviz,
# yacs, requests (model download only), timm/torchvision (other architectures), blosc2's
# pydantic (schemas, imported lazily), httpx's httpcore/anyio/certifi, batchgenerators' future
# and unittest2.
# tests/test_offline_wheels.py proves the set: it builds it for this machine's Python and runs
# the launcher through a python that has only the preinstalled packages plus these wheels.
#
# Versions are pinned to what nnunetv2==2.8.1 resolves to (the versions of ./.venv). Binary
# wheels are downloaded for cp<version> manylinux_2_28 x86_64 (torch 2.11 needs glibc >= 2.28
# there anyway); pure-Python packages published only as sdists are built with `pip wheel`.
#
# Size: raw, these wheels come to about 67 MiB (SimpleITK alone 50 MiB), over the 64 MiB a
# device call carries. So the wheels are re-stored uncompressed (a wheel is a zip; the files and
# RECORD stay byte-identical) and packed into one .whl/wheels-cpXY.tar.xz, which xz brings to
# about 44 MiB. gpu_check.sh unpacks it with python's tarfile. The script fails when what
# .whl/ holds is over --max-mib (default 60, leaving room for the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=3.12
DEST=.whl
MAX_MIB=60
XZ_PRESET=1 # preset 1: 7 s a 300 MB tar here, 10% larger than preset 6 at a fifth of the time
PLATFORM=manylinux_2_28_x86_64
# pip expands only the legacy aliases (manylinux2014 -> 2010 -> 1): name every glibc up to 2.28
PLATFORM_ARGS=(--platform manylinux2014_x86_64)
for minor in $(seq 17 28); do PLATFORM_ARGS+=(--platform "manylinux_2_${minor}_x86_64"); done
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    --max-mib) MAX_MIB="$2"; shift 2 ;;
    --xz-preset) XZ_PRESET="$2"; shift 2 ;;
    -h | --help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
if ! [[ "$PYVER" =~ ^3\.[0-9]+$ ]]; then
  echo "gpu_wheels.sh: --python-version wants MAJOR.MINOR, e.g. 3.12 (got '$PYVER')" >&2
  exit 2
fi
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

# binary wheels, for the target Python and platform
BINARY=(
  simpleitk==2.5.7
  blosc2==4.14.1
  ndindex==1.10.1
  msgpack==1.2.4
  numexpr==2.14.2
  connected-components-3d==4.1.1
)
# pure Python: a published py3-none-any wheel, else built from the sdist
PURE=(
  nnunetv2==2.8.1
  acvl-utils==0.2.6
  batchgenerators==0.25.5
  batchgeneratorsv2==0.3.6
  dynamic-network-architectures==0.4.4
  nibabel==5.4.2
  tqdm==4.70.1
  httpx==0.28.1
  idna==3.20
)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/w"
pip_quiet() { # pip, minus the warnings about this machine's optional file:// indexes
  "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

echo "gpu_wheels.sh: wheels for cp${PYVER/./} $PLATFORM into $DEST/ (pip: $PY)" >&2
if ! pip_quiet download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  "${PLATFORM_ARGS[@]}" -d "$tmp/w" "${BINARY[@]}"; then
  echo "gpu_wheels.sh: FAILED: a binary wheel for Python $PYVER on $PLATFORM is missing (pip said which above; is PyPI reachable?)" >&2
  exit 1
fi
if ! pip_quiet wheel --quiet --no-deps -w "$tmp/w" "${PURE[@]}"; then
  echo "gpu_wheels.sh: FAILED: could not get or build a pure-Python wheel (pip said which above; is PyPI reachable?)" >&2
  exit 1
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/wheels-*.tar.xz "$DEST"/MANIFEST.json
"$PY" - "$tmp/w" "$DEST" "$PYVER" "$PLATFORM" "$XZ_PRESET" "$MAX_MIB" "${#BINARY[@]}" "${#PURE[@]}" <<'EOF'
import hashlib, io, json, os, shutil, subprocess, sys, tarfile, time, zipfile

src, dest, pyver, platform, preset, max_mib, n_binary, n_pure = sys.argv[1:]
names = sorted(n for n in os.listdir(src) if n.endswith(".whl"))
expected = int(n_binary) + int(n_pure)
if len(names) != expected:
    sys.exit(f"gpu_wheels.sh: FAILED: expected {expected} wheels, got {len(names)}: {names}")
for name in names:  # a locally built platform wheel would be for this machine's Python
    tags = name[:-4].split("-")[-3:]
    if tags[2] != "any" and not tags[2].startswith("manylinux"):
        sys.exit(f"gpu_wheels.sh: FAILED: {name} is not a manylinux or pure-Python wheel")


def stored(path: str) -> bytes:
    """The same wheel with its members stored uncompressed, so that xz sees the raw bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr = info.external_attr
            zout.writestr(copy, zin.read(info), compress_type=zipfile.ZIP_STORED)
    return out.getvalue()


tag = "cp" + pyver.replace(".", "")
archive = os.path.join(dest, f"wheels-{tag}.tar.xz")
manifest = {"python": pyver, "platform": platform, "archive": os.path.basename(archive), "wheels": []}
raw = 0
started = time.monotonic()
def pack(tar: tarfile.TarFile) -> None:
    global raw
    for name in names:
        path = os.path.join(src, name)
        data = open(path, "rb").read()
        raw += len(data)
        manifest["wheels"].append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        body = stored(path)
        member = tarfile.TarInfo(name)
        member.size, member.mtime, member.mode = len(body), int(time.time()), 0o644
        tar.addfile(member, io.BytesIO(body))


if shutil.which("xz"):  # all cores; python's lzma uses one
    with open(archive, "wb") as out:
        xz = subprocess.Popen(["xz", "-T0", f"-{preset}", "-c"], stdin=subprocess.PIPE, stdout=out)
        with tarfile.open(fileobj=xz.stdin, mode="w|") as tar:
            pack(tar)
        xz.stdin.close()
        if xz.wait() != 0:
            sys.exit("gpu_wheels.sh: FAILED: xz failed")
else:
    with tarfile.open(archive, "w:xz", preset=int(preset)) as tar:
        pack(tar)
packed = os.path.getsize(archive)
manifest.update(raw_bytes=raw, packed_bytes=packed)
with open(os.path.join(dest, "MANIFEST.json"), "w") as f:
    json.dump(manifest, f, indent=2)
carried = sum(os.path.getsize(os.path.join(dest, n)) for n in os.listdir(dest))
mib = 1024 * 1024
for w in manifest["wheels"]:
    print(f"  {w['bytes'] / mib:7.2f} MiB  {w['file']}")
print(f"gpu_wheels.sh: {len(names)} wheels for {tag}: {raw / mib:.1f} MiB as wheels, packed into "
      f"{archive}: {packed / mib:.1f} MiB (xz -{preset}, {time.monotonic() - started:.0f} s); "
      f"{dest}/ holds {carried / mib:.1f} MiB in all")
if carried > float(max_mib) * mib:
    sys.exit(f"gpu_wheels.sh: FAILED: {dest}/ holds {carried / mib:.1f} MiB, over the {max_mib} MiB limit "
             "(a device call carries 64 MiB with the working tree)")
EOF
