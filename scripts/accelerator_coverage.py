"""The accelerator path's coverage, per module: after `pytest -m accelerator --cov=launcher`
(scripts/test.sh), each module a worker runs on an accelerator must be covered to MIN_PCT; the
lines only a real GPU runs are listed in tests/GPU_ONLY.md. Exit 1 naming any module below."""

from __future__ import annotations

import json
import subprocess
import sys

MODULES = (
    "launcher/device.py",
    "launcher/nnunet.py",
    "launcher/fast_profile.py",
    "launcher/pipeline.py",
    "launcher/worker.py",
)
MIN_PCT = 95.0


def main() -> int:
    subprocess.run([sys.executable, "-m", "coverage", "combine", "-q"], capture_output=True)
    report = subprocess.run(
        [sys.executable, "-m", "coverage", "json", "-q", "-o", "-", "--include", ",".join(MODULES)],
        capture_output=True,
        text=True,
        check=True,
    )
    files = json.loads(report.stdout)["files"]
    low = []
    for module in MODULES:
        summary = files.get(module, {}).get("summary", {"percent_covered": 0.0, "missing_lines": "all"})
        missing = files.get(module, {}).get("missing_lines", [])
        print(f"accelerator coverage: {module} {summary['percent_covered']:.1f} % (missing lines: {missing})")
        if summary["percent_covered"] < MIN_PCT:
            low.append(module)
    if low:
        print(f"accelerator coverage below {MIN_PCT:.0f} %: {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
