#!/usr/bin/env bash
# Starts or stops a throwaway PostgreSQL server for tests and benchmarks.
#   scripts/pg.sh start DIR [PORT]   prints the superuser URL on stdout
#   scripts/pg.sh stop DIR
# PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user.
set -euo pipefail

cmd=${1:?usage: pg.sh start|stop DIR [PORT]}
dir=${2:?usage: pg.sh start|stop DIR [PORT]}

find_bin() {
    local name=$1
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
    local b
    for b in /usr/lib/postgresql/*/bin/"$name"; do
        if [ -x "$b" ]; then echo "$b"; return; fi
    done
    echo "pg.sh: $name not found; install PostgreSQL (e.g. apt-get install postgresql)" >&2
    exit 1
}

as_pg() {
    if [ "$(id -u)" = 0 ]; then
        su postgres -s /bin/sh -c "$*"
    else
        sh -c "$*"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

case "$cmd" in
start)
    port=${3:-$(free_port)}
    initdb=$(find_bin initdb)
    pg_ctl=$(find_bin pg_ctl)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$dir"
        # The parent must be traversable by postgres.
        chmod o+x "$(dirname "$dir")" 2>/dev/null || true
    fi
    as_pg "'$initdb' -D '$dir/data' -A trust -U postgres -E UTF8 >'$dir/initdb.log' 2>&1"
    as_pg "'$pg_ctl' -D '$dir/data' -w -t 60 -l '$dir/server.log' -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on\" start >/dev/null"
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    pg_ctl=$(find_bin pg_ctl)
    if [ -d "$dir/data" ]; then
        as_pg "'$pg_ctl' -D '$dir/data' -m fast -w stop >/dev/null 2>&1" || true
    fi
    ;;
*)
    echo "usage: pg.sh start|stop DIR [PORT]" >&2
    exit 2
    ;;
esac
