#!/usr/bin/env bash
# Register this project's deployments (prefect.yaml) with the Prefect server of scripts/stack.sh.
#
#   scripts/deploy.sh                # all: train, retrain (cron 03:00 UTC), evaluate (triggered), compare
#   scripts/deploy.sh --name train   # extra arguments go to `prefect deploy`
#
# MLFLOW_TRACKING_URI and DDPM_HOME are written into the work pool job variables of each
# deployment (prefect.yaml templates them from this environment), so use the same values as the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export DDPM_HOME=$(mkdir -p "${DDPM_HOME:-$REPO/.ddpm}" && cd "${DDPM_HOME:-$REPO/.ddpm}" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$DDPM_HOME/mlflow.db}
export PREFECT_API_URL=${PREFECT_API_URL:-http://127.0.0.1:${PREFECT_PORT:-4200}/api}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true
PYTHON_BIN=${PYTHON_BIN:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || command -v python3 )}
PREFECT="$(dirname "$PYTHON_BIN")/prefect"

"$PREFECT" work-pool inspect local-pool > /dev/null 2>&1 || "$PREFECT" work-pool create local-pool --type process
if [ $# -eq 0 ]; then set -- --all; fi
"$PREFECT" --no-prompt deploy "$@"
