#!/bin/sh
# preStop hook of a specd worker, run before SIGTERM: the coordinator stops opening sessions
# here and, with DRAIN_MIGRATE=true, moves the sessions in flight to other workers at their next
# round; the sessions it has assigned here get up to DRAIN_TIMEOUT_SECONDS to move or finish, then
# ENDPOINT_DELAY_SECONDS let the endpoint removal reach everyone. After SIGTERM the worker's
# own grace period covers the calls still in flight.
# Env: POD_NAME, SPECD_ADDRESS (the coordinator), DRAIN_MIGRATE, DRAIN_TIMEOUT_SECONDS,
# ENDPOINT_DELAY_SECONDS.
open_sessions() {
  specctl --json status | python3 -c '
import json, os, sys
workers = json.load(sys.stdin)["workers"]
print(sum(w["assigned_sessions"] for w in workers if w["name"] == os.environ["POD_NAME"]))'
}
# Blank lines would carry trailing spaces once indented into the ConfigMap.
migrate=""
[ "${DRAIN_MIGRATE:-true}" = true ] && migrate="--migrate"
# $migrate is empty or one word: unquoted on purpose.
# shellcheck disable=SC2086
if specctl drain "$POD_NAME" $migrate >/dev/null; then
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
