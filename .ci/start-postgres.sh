#!/usr/bin/env bash
# Starts a throw-away PostgreSQL server for the tuner tests and prints one line for the caller to eval:
#   eval "$(bash .ci/start-postgres.sh)"
#   -> export TUNER_TEST_POSTGRES_URL=... (postgresql+psycopg, role "tuner" with a password made at run time, 127.0.0.1)
# Uses Debian's postgresql package (installed if missing), a private data directory and no systemd.
# The server listens on 127.0.0.1 only. Each run sets a new random password for the test role, so
# re-running it while the server is up works and invalidates the previous URL.
# Everything except the export line goes to stderr.
set -euo pipefail

PGDATA_DIR="${TUNER_PG_DIR:-/tmp/tuner-pg}"
PORT="${TUNER_PG_PORT:-54329}"
ROLE="tuner"
DB="tuner_test"

log() { echo "start-postgres: $*" >&2; }

pg_bin_dir() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

if [ -z "$(pg_bin_dir)" ]; then
    log "installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
BIN="$(pg_bin_dir)"

# initdb and the server refuse to run as root: run them as the postgres user when we are root.
as_pg() {
    if [ "$(id -u)" = "0" ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ ! -s "$PGDATA_DIR/PG_VERSION" ]; then
    log "initialising a cluster in $PGDATA_DIR"
    mkdir -p "$PGDATA_DIR"
    if [ "$(id -u)" = "0" ]; then chown postgres:postgres "$PGDATA_DIR"; fi
    chmod 700 "$PGDATA_DIR"
    as_pg "$BIN/initdb" -D "$PGDATA_DIR" --auth-local=peer --auth-host=scram-sha-256 \
        --username=postgres >&2
fi

if ! as_pg "$BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    log "starting the server on 127.0.0.1:$PORT"
    as_pg "$BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories=$PGDATA_DIR -c max_connections=200" >&2
fi

psql_admin() {
    as_pg "$BIN/psql" -h "$PGDATA_DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"
}

PASSWORD="$(openssl rand -hex 16)"
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" = "1" ]; then
    psql_admin -c "ALTER ROLE $ROLE WITH LOGIN PASSWORD '$PASSWORD'" >/dev/null
else
    psql_admin -c "CREATE ROLE $ROLE WITH LOGIN PASSWORD '$PASSWORD'" >/dev/null
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != "1" ]; then
    psql_admin -c "CREATE DATABASE $DB OWNER $ROLE" >/dev/null
fi
log "ready: database $DB, role $ROLE, 127.0.0.1:$PORT"

echo "export TUNER_TEST_POSTGRES_URL=postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
