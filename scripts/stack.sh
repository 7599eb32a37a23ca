#!/usr/bin/env bash
# The local stack: a Prefect server, the process work pool and a worker, and the MLflow UI, all on
# 127.0.0.1. PID files and logs go to $DDPM_HOME/stack.
#
#   scripts/stack.sh start     # start what is not running; waits until the servers answer
#   scripts/stack.sh status
#   scripts/stack.sh stop      # one SIGTERM per process group, then waits for it to end
#
# Environment (defaults): DDPM_HOME (./.ddpm), PREFECT_PORT (4200), MLFLOW_PORT (5000),
# MLFLOW_TRACKING_URI (sqlite:///$DDPM_HOME/mlflow.db), PYTHON_BIN (python of .venv, else python3).
set -euo pipefail
set -m   # each background job in its own process group: it gets SIGTERM (a plain background
         # child of a non-interactive shell ignores SIGINT, and a worker then ignores SIGTERM)

cd "$(dirname "$0")/.."
REPO=$PWD
export DDPM_HOME=$(mkdir -p "${DDPM_HOME:-$REPO/.ddpm}" && cd "${DDPM_HOME:-$REPO/.ddpm}" && pwd)
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$DDPM_HOME/mlflow.db}
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
PYTHON_BIN=${PYTHON_BIN:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || command -v python3 )}
BIN=$(dirname "$PYTHON_BIN")
STACK=$DDPM_HOME/stack
mkdir -p "$STACK"

started_at() {  # started_at PID: the process's start time (differs for a reused PID)
    ps -o lstart= -p "$1" 2>/dev/null
}

running() {  # running NAME: its PID file names a live process, the one this script started
    [ -f "$STACK/$1.pid" ] || return 1
    local pid; pid=$(cat "$STACK/$1.pid")
    kill -0 "$pid" 2>/dev/null || return 1
    if [ "$(started_at "$pid")" != "$(cat "$STACK/$1.started" 2>/dev/null)" ]; then
        echo "$1: stale PID file (pid $pid is another process now); ignoring it" >&2
        rm -f "$STACK/$1.pid" "$STACK/$1.started"
        return 1
    fi
}

wait_for() {  # wait_for URL NAME SECONDS
    for _ in $(seq "$3"); do
        if curl -sf "$1" > /dev/null 2>&1; then return 0; fi
        if ! running "$2"; then echo "$2 exited; see $STACK/$2.log" >&2; return 1; fi
        sleep 1
    done
    echo "$2 did not answer $1 within $3 s; see $STACK/$2.log" >&2
    return 1
}

launch() {  # launch NAME COMMAND...: in the background, in its own process group
    if running "$1"; then echo "$1 already running (pid $(cat "$STACK/$1.pid"))"; return 0; fi
    local name=$1; shift
    "$@" > "$STACK/$name.log" 2>&1 &
    echo $! > "$STACK/$name.pid"
    started_at $! > "$STACK/$name.started"
    echo "$name started (pid $!, log $STACK/$name.log)"
}

start() {
    launch prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
    launch mlflow "$BIN/mlflow" ui --backend-store-uri "$MLFLOW_TRACKING_URI" \
        --default-artifact-root "$DDPM_HOME/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
    wait_for "$PREFECT_API_URL/health" prefect-server 90
    "$BIN/prefect" work-pool inspect local-pool > /dev/null 2>&1 \
        || "$BIN/prefect" work-pool create local-pool --type process > /dev/null
    # The worker's environment reaches its flow runs; the deployments' job variables add to it.
    launch worker "$BIN/prefect" worker start --pool local-pool
    wait_for "http://127.0.0.1:$MLFLOW_PORT/health" mlflow 90
    echo "Prefect UI  http://127.0.0.1:$PREFECT_PORT"
    echo "MLflow UI   http://127.0.0.1:$MLFLOW_PORT   (store $MLFLOW_TRACKING_URI; pick 'Model training' at its top left once)"
    echo "next: PREFECT_PORT=$PREFECT_PORT scripts/deploy.sh"
}

stop() {
    for name in worker mlflow prefect-server; do   # the worker first: it reports to the server
        if running "$name"; then
            local pid; pid=$(cat "$STACK/$name.pid")
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            if kill -0 "$pid" 2>/dev/null; then
                echo "$name (pid $pid) still running after 15 s; killing its group"
                kill -KILL -- "-$pid" 2>/dev/null || true
            fi
            echo "$name stopped"
        fi
        rm -f "$STACK/$name.pid" "$STACK/$name.started"
    done
}

status() {
    for name in prefect-server worker mlflow; do
        if running "$name"; then echo "$name: running (pid $(cat "$STACK/$name.pid"))"; else echo "$name: stopped"; fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
