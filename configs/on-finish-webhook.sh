#!/bin/sh
# Post the run's result to a chat webhook (Slack, Mattermost, Teams and Discord accept
# {"text": ...} at an incoming-webhook URL):
#   nnunet-launch run ... --on-finish 'sh configs/on-finish-webhook.sh https://hooks.example.org/T000/B000/XXXX'
# nnunet-launch sets NNUNET_LAUNCH_EXIT_CODE, NNUNET_LAUNCH_RESULT, NNUNET_LAUNCH_OUTPUT,
# NNUNET_LAUNCH_SUMMARY, NNUNET_LAUNCH_REPORT and NNUNET_LAUNCH_HOST. The JSON is built by Python
# (paths may hold quotes). A failure here is logged; the run's exit code stays.
set -eu
url="$1"
body=$(python3 - <<'PY'
import json, os
summary = json.load(open(os.environ["NNUNET_LAUNCH_SUMMARY"]))
cases = summary.get("cases", {})
text = (
    f"nnunet-launch on {os.environ['NNUNET_LAUNCH_HOST']}: {os.environ['NNUNET_LAUNCH_RESULT']} "
    f"(exit {os.environ['NNUNET_LAUNCH_EXIT_CODE']}): {cases.get('done', '?')}/{cases.get('total', '?')} cases done, "
    f"{cases.get('failed', '?')} failed, in {summary.get('wall_seconds', '?')} s; {os.environ['NNUNET_LAUNCH_OUTPUT']}"
)
print(json.dumps({"text": text}))
PY
)
curl --silent --show-error --fail --max-time 30 -H 'Content-Type: application/json' -d "$body" "$url"
