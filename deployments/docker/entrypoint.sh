#!/bin/sh
# The worker image's entrypoint: check the state folder, then run the given command (Prefect's
# flow-run command on Kubernetes, a worker by default).
set -eu
: "${VISIONPIPE_HOME:=/state}"
if ! mkdir -p "$VISIONPIPE_HOME/prefect" 2>/dev/null || [ ! -w "$VISIONPIPE_HOME" ]; then
  echo "error: VISIONPIPE_HOME=$VISIONPIPE_HOME is not writable by uid $(id -u)." \
       "Fix: mount a volume there that uid $(id -u) may write (fsGroup: $(id -g) on Kubernetes)." >&2
  exit 78
fi
if [ "$#" -eq 0 ]; then
  echo "error: no command given. Fix: pass one, e.g. prefect worker start --pool gpu-host" >&2
  exit 64
fi
exec "$@"
