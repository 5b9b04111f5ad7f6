#!/bin/sh
# Sidecar of a specd worker pod: keeps this pod registered with the coordinator under its
# own name and address, so every replica is a worker of its own (a session's KV cache lives
# in one replica) and a restarted coordinator learns the workers again. Registering is
# idempotent: the coordinator keeps the entry it already has for this address.
# Env: WORKER_ROLE, WORKER_ADDRESS, POD_NAME, SPECD_ADDRESS (the coordinator),
#      REGISTER_INTERVAL_SECONDS.
trap 'exit 0' TERM INT
registered=""
while true; do
  if specctl --timeout 5 register "$WORKER_ROLE" "$WORKER_ADDRESS" --name "$POD_NAME" >/dev/null; then
    [ -z "$registered" ] && echo "registered $POD_NAME ($WORKER_ROLE) at $WORKER_ADDRESS with $SPECD_ADDRESS"
    registered=yes
  else
    echo "coordinator $SPECD_ADDRESS not reachable; retrying" >&2
    registered=""
  fi
  # Backgrounded so that SIGTERM ends the wait at once.
  sleep "${REGISTER_INTERVAL_SECONDS:-30}" &
  wait $!
done
