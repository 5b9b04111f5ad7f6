#!/bin/sh
# preStop hook of a specd worker, run before SIGTERM: the coordinator stops opening sessions
# here, the sessions it has assigned here get up to DRAIN_TIMEOUT_SECONDS to finish, then
# ENDPOINT_DELAY_SECONDS let the endpoint removal reach everyone. After SIGTERM the worker's
# own grace period covers the calls still in flight.
# Env: POD_NAME, SPECD_ADDRESS (the coordinator), DRAIN_TIMEOUT_SECONDS, ENDPOINT_DELAY_SECONDS.
open_sessions() {
  specctl --json status | python3 -c '
import json, os, sys
workers = json.load(sys.stdin)["workers"]
print(sum(w["assigned_sessions"] for w in workers if w["name"] == os.environ["POD_NAME"]))'
}
# Blank lines would carry trailing spaces once indented into the ConfigMap.
if specctl drain "$POD_NAME" >/dev/null; then
  deadline=$(( $(date +%s) + ${DRAIN_TIMEOUT_SECONDS:-60} ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    open=$(open_sessions) || break
    [ "$open" = 0 ] && break
    sleep 2
  done
  echo "drained $POD_NAME"
else
  echo "drain of $POD_NAME failed; sessions still open get only the grace period" >&2
fi
sleep "${ENDPOINT_DELAY_SECONDS:-5}"
