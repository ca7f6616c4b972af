#!/usr/bin/env bash
# Set up ./.venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
# The SLURM tests start a real cluster (Debian's Slurm: munged, slurmctld, slurmd); install it
# when missing and this is root on Debian. Without it those tests are skipped and say why.
# NNUNET_LAUNCH_NO_APT=1 skips the installation.
if [ "${NNUNET_LAUNCH_NO_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! command -v slurmctld >/dev/null; then
  echo "test.sh: installing Debian's SLURM packages (slurmctld slurmd slurm-client munge) with apt-get," >&2
  echo "  for the tests that run a real SLURM cluster on this machine; NNUNET_LAUNCH_NO_APT=1 skips this" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge; } >/dev/null 2>&1 \
    || echo "warning: could not install SLURM; its tests will be skipped" >&2
fi
if [ $# -gt 0 ]; then exec .venv/bin/python -m pytest -q "$@"; fi
# Two pytest processes (pytest-xdist): most tests wait on the processes they started, so two keep
# a 2-core machine busy. A group (xdist_group) runs on one of them: a module whose fixture builds
# a model or starts the SLURM cluster. NNUNET_LAUNCH_TEST_PROCESSES=N for another count.
PARALLEL=(-n "${NNUNET_LAUNCH_TEST_PROCESSES:-2}" --dist loadgroup)
# The tiny models and plain nnU-Net's predictions of them are built once for the three sessions
# below (tests/conftest.py, shared_folder).
NNUNET_LAUNCH_TEST_SHARED="$(mktemp -d -t nnunet-launch-tests.XXXXXX)"
export NNUNET_LAUNCH_TEST_SHARED
trap 'rm -rf "$NNUNET_LAUNCH_TEST_SHARED"' EXIT
# The accelerator path first (on a simulated accelerator), its coverage measured in every process
# of the launcher (tests/test_accelerator.py, README "The accelerator path without a GPU"); then
# everything else.
rm -f .coverage .coverage.*
.venv/bin/python -m pytest -q "${PARALLEL[@]}" --durations=10 -m accelerator --cov=launcher --cov-report=
.venv/bin/python scripts/accelerator_coverage.py
.venv/bin/python -m pytest -q "${PARALLEL[@]}" --durations=25 -m "not accelerator"
# The oldest supported nnU-Net release (launcher/nnunet_versions.py), over ./.venv's packages: the
# exact profile identical to its own nnUNetv2_predict (.npz bit for bit), an ensemble and a cascade
# identical to its own commands' chain, --profile fast refused, the version checks.
OLDEST=2.5.2
bash scripts/setup_nnunet_overlay.sh "$OLDEST"
export PYTHONPATH="$PWD/.nnunet-$OLDEST" NNUNET_LAUNCH_EXPECT_NNUNET="$OLDEST"
.venv/bin/python -m pytest -q "${PARALLEL[@]}" \
  tests/test_run_equivalence.py tests/test_nnunet_versions.py \
  tests/test_stages.py::test_an_ensemble_with_postprocessing_equals_the_manual_chain_and_a_rerun_does_nothing \
  tests/test_stages.py::test_a_cascade_predicts_its_lowres_stage_itself_and_equals_the_manual_cascade
