#!/bin/sh
# Mail the run's result when it ends:
#   nnunet-launch run ... --on-finish 'sh configs/on-finish-mail.sh you@example.org'
# (or in a --config TOML file: on_finish = "sh configs/on-finish-mail.sh you@example.org").
# nnunet-launch sets NNUNET_LAUNCH_EXIT_CODE, NNUNET_LAUNCH_RESULT, NNUNET_LAUNCH_OUTPUT,
# NNUNET_LAUNCH_SUMMARY (summary.json), NNUNET_LAUNCH_REPORT (report.html) and NNUNET_LAUNCH_HOST.
# Needs a working `mail` (mailutils/bsd-mailx). A failure here is logged; the run's exit code stays.
set -eu
to="$1"
{
  echo "nnunet-launch on $NNUNET_LAUNCH_HOST: $NNUNET_LAUNCH_RESULT (exit $NNUNET_LAUNCH_EXIT_CODE)"
  echo "output folder: $NNUNET_LAUNCH_OUTPUT"
  echo "picture of the run: $NNUNET_LAUNCH_REPORT"
  echo
  cat "$NNUNET_LAUNCH_SUMMARY"
} | mail -s "nnunet-launch: $NNUNET_LAUNCH_RESULT" "$to"
