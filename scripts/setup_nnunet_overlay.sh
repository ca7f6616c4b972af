#!/usr/bin/env bash
# Put nnunetv2==VERSION in ./.nnunet-VERSION (pip --target, no dependencies), once: a release that
# `PYTHONPATH=.nnunet-VERSION` puts before ./.venv's own, so the suite runs against it with
# ./.venv's torch and everything else (scripts/test.sh: the oldest supported release). Its
# dependencies are ./.venv's: the range's releases ask for the same packages (checked when the
# overlay is made, by importing what the launcher imports).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="$1"
DIR=".nnunet-$VERSION"
[ -f "$DIR/.installed" ] && exit 0
rm -rf "$DIR"
echo "setting up $DIR (nnunetv2==$VERSION over ./.venv)..." >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --target "$DIR" "nnunetv2==$VERSION" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
rm -rf "$DIR/bin"  # its console scripts would run ./.venv's nnunetv2: the tests call ./.venv/bin's with PYTHONPATH set
PYTHONPATH="$DIR" .venv/bin/python -W ignore -c "
import sys
from importlib import metadata
import nnunetv2, nnunetv2.inference.predict_from_raw_data, launcher.nnunet
assert metadata.version('nnunetv2') == sys.argv[1], metadata.version('nnunetv2')
assert nnunetv2.__file__.startswith(sys.argv[2]), nnunetv2.__file__
" "$VERSION" "$PWD/$DIR" >/dev/null || { echo "setup of $DIR failed" >&2; exit 1; }
touch "$DIR/.installed"
