#!/usr/bin/env bash
# Register this project's deployments (prefect.yaml) with the Prefect server of scripts/stack.sh.
#
#   scripts/deploy.sh                    # the local-pool ones: train, train-mnist, train-digits-conditional,
#                                        # retrain (cron 03:00 UTC), evaluate (triggered), compare, promote, serve
#   scripts/deploy.sh --name train       # extra arguments go to `prefect deploy`
#   scripts/deploy.sh --pool docker      # train-docker, retrain-docker on the pool docker-pool
#   scripts/deploy.sh --pool kubernetes  # train-kubernetes, retrain-kubernetes on kubernetes-pool
#
# The pool is created when missing: a process pool, or a Docker / Kubernetes pool with the base
# job template of deploy/<pool>.json. MLFLOW_TRACKING_URI and DDPM_HOME are written into the job
# variables of each deployment (prefect.yaml templates them from this environment), so use the
# same values as the stack. Containers also read DDPM_IMAGE (default ddpm-pipeline:latest, built
# from ./Dockerfile); Docker DDPM_CONTAINER_USER (uid:gid the container runs as, default yours);
# Kubernetes DDPM_NAMESPACE (default) and MLFLOW_SERVER_URI (a tracking server the pods reach;
# default http://mlflow:5000).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export DDPM_HOME=$(mkdir -p "${DDPM_HOME:-$REPO/.ddpm}" && cd "${DDPM_HOME:-$REPO/.ddpm}" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$DDPM_HOME/mlflow.db}
export DDPM_JOB_HOME=${DDPM_JOB_HOME:-$DDPM_HOME}
export PREFECT_API_URL=${PREFECT_API_URL:-http://127.0.0.1:${PREFECT_PORT:-4200}/api}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true
export DDPM_IMAGE=${DDPM_IMAGE:-ddpm-pipeline:latest} DDPM_NAMESPACE=${DDPM_NAMESPACE:-default}
export MLFLOW_SERVER_URI=${MLFLOW_SERVER_URI:-http://mlflow:5000}
export DDPM_CONTAINER_USER=${DDPM_CONTAINER_USER:-$(id -u):$(id -g)}   # Docker: files in DDPM_HOME stay yours
PYTHON_BIN=${PYTHON_BIN:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || command -v python3 )}
PREFECT="$(dirname "$PYTHON_BIN")/prefect"

KIND=local
ARGS=()   # everything but --pool goes to `prefect deploy`
while [ $# -gt 0 ]; do
    case "$1" in
        --pool) KIND=${2:?--pool takes local, docker or kubernetes}; shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
set -- ${ARGS[@]+"${ARGS[@]}"}
case "$KIND" in
    local)      POOL=local-pool;      CREATE=(--type process) ;;
    docker)     POOL=docker-pool;     CREATE=(--type docker --base-job-template deploy/docker-pool.json) ;;
    kubernetes) POOL=kubernetes-pool; CREATE=(--type kubernetes --base-job-template deploy/kubernetes-pool.json) ;;
    *) echo "deploy.sh: --pool $KIND: use local, docker or kubernetes" >&2; exit 2 ;;
esac

# no server: one line saying so (prefect's own answer is a 70-line traceback)
if ! "$PYTHON_BIN" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=5)' \
        "$PREFECT_API_URL" > /dev/null 2>&1; then
    echo "deploy.sh: error: no Prefect server answers at $PREFECT_API_URL: start the stack (scripts/stack.sh start) or set PREFECT_API_URL" >&2
    exit 1
fi
"$PREFECT" work-pool inspect "$POOL" > /dev/null 2>&1 || "$PREFECT" work-pool create "$POOL" "${CREATE[@]}"
if [ $# -eq 0 ]; then   # every deployment of prefect.yaml on that pool
    NAMES=$("$PYTHON_BIN" -c 'import sys, yaml
for d in yaml.safe_load(open("prefect.yaml"))["deployments"]:
    if d["work_pool"]["name"] == sys.argv[1]:
        print(d["name"])' "$POOL")
    for name in $NAMES; do set -- "$@" --name "$name"; done
fi
"$PREFECT" --no-prompt deploy "$@"
