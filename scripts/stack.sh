#!/usr/bin/env bash
# The local stack: a Prefect server, the process work pool and a worker, and MLflow, all on
# 127.0.0.1. PID files and logs go to $DDPM_HOME/stack.
#
#   scripts/stack.sh start          # embedded: Prefect on sqlite, the MLflow UI on the sqlite store
#   scripts/stack.sh start --team   # a team's stack: PostgreSQL as the database of an MLflow tracking
#                                   # server with proxied artifacts and of the Prefect server; other
#                                   # hosts need only the two URLs it prints
#   scripts/stack.sh start          # again: the stack it stopped (--embedded goes back)
#   scripts/stack.sh status
#   scripts/stack.sh stop           # one SIGTERM per process group, then waits for it to end
#
# Environment (defaults): DDPM_HOME (./.ddpm), PREFECT_PORT (4200), MLFLOW_PORT (5000),
# MLFLOW_TRACKING_URI (sqlite:///$DDPM_HOME/mlflow.db; --team: the tracking server),
# PYTHON_BIN (python of .venv, else python3).
# --team only: PG_PORT (5432), PG_BIN (/usr/lib/postgresql/<newest>/bin), PG_DATA ($DDPM_HOME/stack/
# postgres; run as root, the cluster belongs to the user postgres, which must reach that folder),
# ARTIFACTS_DESTINATION ($DDPM_HOME/stack/artifacts, or s3://..., gs://...: where the tracking server
# keeps artifacts). Its password is random, kept in $DDPM_HOME/stack/pgpass (0600, PGPASSFILE): no URL,
# log or command line carries it. Needs the `team` extra (pip install -e ".[team]": psycopg2).
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
PG_PORT=${PG_PORT:-5432}
PG_DATA=${PG_DATA:-$STACK/postgres}
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
ARTIFACTS_DESTINATION=${ARTIFACTS_DESTINATION:-$STACK/artifacts}
export PGPASSFILE=$STACK/pgpass
PG_USER=ddpm

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

as_cluster_owner() {  # the PostgreSQL tools refuse root: as root they run as the user postgres
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

postgres_start() {
    [ -x "$PG_BIN/pg_ctl" ] || { echo "stack.sh: error: no PostgreSQL in ${PG_BIN:-/usr/lib/postgresql} (apt-get install postgresql, or set PG_BIN)" >&2; exit 1; }
    "$PYTHON_BIN" -c 'import psycopg2' 2>/dev/null \
        || { echo "stack.sh: error: the team stack needs the PostgreSQL driver: pip install -e \".[team]\"" >&2; exit 1; }
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        mkdir -p "$PG_DATA"
        [ "$(id -u)" = 0 ] && chown postgres: "$PG_DATA"
        as_cluster_owner test -w "$PG_DATA" \
            || { echo "stack.sh: error: the user postgres cannot write $PG_DATA: set PG_DATA to a folder it reaches" >&2; exit 1; }
        local password; password=$("$PYTHON_BIN" -c 'import secrets; print(secrets.token_urlsafe(24))')
        local pwfile; pwfile=$(mktemp)
        printf '%s\n' "$password" > "$pwfile"
        [ "$(id -u)" = 0 ] && chown postgres: "$pwfile"
        (umask 077; printf '127.0.0.1:%s:*:%s:%s\n' "$PG_PORT" "$PG_USER" "$password" > "$PGPASSFILE")
        as_cluster_owner "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" --pwfile="$pwfile" --auth-host=scram-sha-256 \
            --auth-local=scram-sha-256 -E UTF8 > "$STACK/initdb.log" 2>&1 \
            || { rm -f "$pwfile"; echo "stack.sh: error: initdb failed; see $STACK/initdb.log" >&2; exit 1; }
        rm -f "$pwfile"
    fi
    if ! as_cluster_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" status > /dev/null 2>&1; then
        as_cluster_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -t 60 -l "$PG_DATA/server.log" \
            -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PG_DATA" start > /dev/null \
            || { echo "stack.sh: error: PostgreSQL did not start on 127.0.0.1:$PG_PORT; see $PG_DATA/server.log" >&2; exit 1; }
        echo "postgres started (127.0.0.1:$PG_PORT, data $PG_DATA)"
    fi
    for database in mlflow prefect; do
        "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$database'" | grep -q 1 \
            || "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$database"
    done
}

start() {
    case "${1:-}" in   # the mode is remembered: a plain `start` starts the stack it stopped
        --team) echo team > "$STACK/mode" ;;
        --embedded) rm -f "$STACK/mode" ;;
        "") ;;
        *) echo "usage: $0 start [--team|--embedded]" >&2; exit 2 ;;
    esac
    if [ "$(cat "$STACK/mode" 2>/dev/null)" = team ]; then
        postgres_start
        # the URLs carry no password: psycopg2 and asyncpg read it from PGPASSFILE
        export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$PG_USER@127.0.0.1:$PG_PORT/prefect"
        export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
        launch prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
        # proxied artifacts: clients upload and download through the server (mlflow-artifacts:), so a
        # host needs only this URL, never the destination's credentials or path
        launch mlflow "$BIN/mlflow" server --backend-store-uri "postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/mlflow" \
            --artifacts-destination "$ARTIFACTS_DESTINATION" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
    else
        launch prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
        launch mlflow "$BIN/mlflow" ui --backend-store-uri "$MLFLOW_TRACKING_URI" \
            --default-artifact-root "$DDPM_HOME/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
    fi
    wait_for "$PREFECT_API_URL/health" prefect-server 120
    "$BIN/prefect" work-pool inspect local-pool > /dev/null 2>&1 \
        || "$BIN/prefect" work-pool create local-pool --type process > /dev/null
    # The worker's environment reaches its flow runs; the deployments' job variables add to it.
    launch worker "$BIN/prefect" worker start --pool local-pool
    wait_for "http://127.0.0.1:$MLFLOW_PORT/health" mlflow 90
    echo "Prefect UI  http://127.0.0.1:$PREFECT_PORT"
    echo "MLflow UI   http://127.0.0.1:$MLFLOW_PORT   (store $MLFLOW_TRACKING_URI; pick 'Model training' at its top left once)"
    if [ "$(cat "$STACK/mode" 2>/dev/null)" = team ]; then
        echo "every host: export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT PREFECT_API_URL=$PREFECT_API_URL"
        echo "next: MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT PREFECT_PORT=$PREFECT_PORT scripts/deploy.sh"
    else
        echo "next: PREFECT_PORT=$PREFECT_PORT scripts/deploy.sh"
    fi
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
    if [ -f "$PG_DATA/PG_VERSION" ] && as_cluster_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" status > /dev/null 2>&1; then
        as_cluster_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -m fast stop > /dev/null && echo "postgres stopped"
    fi
}

status() {
    for name in prefect-server worker mlflow; do
        if running "$name"; then echo "$name: running (pid $(cat "$STACK/$name.pid"))"; else echo "$name: stopped"; fi
    done
    if [ "$(cat "$STACK/mode" 2>/dev/null)" = team ]; then
        if as_cluster_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" status > /dev/null 2>&1; then echo "postgres: running"
        else echo "postgres: stopped"; fi
    fi
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start [--team|--embedded]|stop|status" >&2; exit 2 ;;
esac
