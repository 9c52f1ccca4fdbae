#!/usr/bin/env bash
# Export/import throughput of sample-cell's cell contract, on SQLite and PostgreSQL.
#
# Builds the release binary, starts fresh sample-cell instances on free ports, loads a
# tenant of ROWS keys through the import endpoint, then times:
#   export           GET  /cell/v1/tenants/bench/export         (source -> file)
#   import           POST /cell/v1/tenants/bench/import         (file -> empty target)
#   import (replay)  the same stream again: idempotent, applies nothing
# and checks that source and target checksums match. Prints a markdown table against the
# target of 50,000 rows/s.
#
# PostgreSQL: uses CELLPLANE_TEST_PG_URL (a superuser URL) when set; otherwise starts a
# throwaway server (initdb/pg_ctl from PATH or /usr/lib/postgresql/*/bin) listening on a
# unix socket only, so it never collides with another server's port. Set BACKENDS=sqlite
# to skip PostgreSQL.
#
# Usage: bench/sample-cell/export-import.sh            (ROWS=100000 VALUE_BYTES=100)
#        ROWS=20000 BACKENDS="sqlite postgres" bench/sample-cell/export-import.sh
set -euo pipefail

ROWS=${ROWS:-100000}
VALUE_BYTES=${VALUE_BYTES:-100}
BACKENDS=${BACKENDS:-"sqlite postgres"}
TARGET_ROWS_PER_SEC=50000
TENANT=bench
TOKEN=bench-admin-token

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/sample-cell-bench.XXXXXX")
pids=()
pg_dir=""
pg_databases=()
pg_admin_url=""

log() { printf '%s\n' "$*" >&2; }

cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$pg_admin_url" ]]; then
        local db
        for db in "${pg_databases[@]}"; do
            psql -q "$pg_admin_url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
        done
    fi
    if [[ -n "$pg_dir" ]]; then
        run_as_postgres "pg_ctl -D '$pg_dir/data' -m fast stop" >/dev/null 2>&1 || true
    fi
    rm -rf "$work" "$pg_dir"
}
trap cleanup EXIT

run_as_postgres() {
    if [[ $(id -u) -eq 0 ]]; then
        su postgres -s /bin/sh -c "PATH='$PATH' $1"
    else
        sh -c "$1"
    fi
}

# start_cell NAME ARGS... : start an instance on a free port; sets CELL_URL.
start_cell() {
    local name=$1
    shift
    "$root/target/release/sample-cell" --listen 127.0.0.1:0 --cell-id "$name" \
        --admin-token "$TOKEN" "$@" >"$work/$name.out" 2>"$work/$name.log" &
    pids+=("$!")
    local i
    for ((i = 0; i < 300; i++)); do
        if CELL_URL=$(sed -n 's/^listening on //p' "$work/$name.out") && [[ -n "$CELL_URL" ]]; then
            return 0
        fi
        if ! kill -0 "${pids[-1]}" 2>/dev/null; then
            log "sample-cell $name failed to start:"
            cat "$work/$name.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    log "sample-cell $name did not announce its address"
    exit 1
}

# timed OUTFILE CURL_ARGS... : run curl, print its total time in seconds.
timed() {
    local out=$1
    shift
    curl -sS --fail-with-body -H "Authorization: Bearer $TOKEN" -H 'Expect:' \
        -o "$out" -w '%{time_total}' "$@"
}

checksum() {
    curl -sS --fail-with-body -H "Authorization: Bearer $TOKEN" \
        "$1/cell/v1/tenants/$TENANT/checksum"
}

# pg_url_for DB : the admin URL of database DB on the benchmark server.
pg_url_for() {
    local url=$pg_admin_url query=""
    if [[ $url == *\?* ]]; then
        query="?${url#*\?}"
        url=${url%%\?*}
    fi
    local rest=${url#*://}
    if [[ $rest == */* ]]; then
        url="${url%/*}"
    fi
    printf '%s/%s%s' "$url" "$1" "$query"
}

start_postgres() {
    if [[ -n "${CELLPLANE_TEST_PG_URL:-}" ]]; then
        pg_admin_url=$CELLPLANE_TEST_PG_URL
        log "postgres: using CELLPLANE_TEST_PG_URL"
        return
    fi
    local bindir
    bindir=$(dirname "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb | tail -n 1)")
    export PATH="$bindir:$PATH"
    pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/sample-cell-bench-pg.XXXXXX")
    chmod 755 "$pg_dir"
    [[ $(id -u) -eq 0 ]] && chown postgres "$pg_dir"
    log "postgres: starting a throwaway server in $pg_dir (unix socket only)"
    run_as_postgres "initdb -D '$pg_dir/data' -A trust -U postgres >/dev/null"
    run_as_postgres "pg_ctl -D '$pg_dir/data' -w -l '$pg_dir/log' \
        -o \"-k '$pg_dir' -c listen_addresses='' -c fsync=on -c max_connections=50\" start" >/dev/null
    pg_admin_url="postgres://postgres@localhost/postgres?host=$pg_dir"
}

generate() {
    log "generating $ROWS rows of $VALUE_BYTES-byte values"
    local i
    : >"$work/values"
    for ((i = 0; i < 64; i++)); do
        head -c "$VALUE_BYTES" /dev/urandom | base64 -w0 >>"$work/values"
        printf '\n' >>"$work/values"
    done
    awk -v rows="$ROWS" '
        NR == FNR { pool[NR - 1] = $0; next }
        END {
            for (i = 0; i < rows; i++)
                printf "{\"type\":\"row\",\"key\":\"key-%08d\",\"value_b64\":\"%s\",\"version\":1,\"seq\":%d}\n", i, pool[i % 64], i + 1
        }' "$work/values" /dev/null >"$work/load.ndjson"
}

results=()

# bench BACKEND SOURCE_ARGS TARGET_ARGS
bench() {
    local backend=$1 src_args=$2 dst_args=$3 src dst seconds
    # shellcheck disable=SC2086
    start_cell "src-$backend" $src_args
    src=$CELL_URL
    # shellcheck disable=SC2086
    start_cell "dst-$backend" $dst_args
    dst=$CELL_URL
    log "$backend: loading $ROWS rows into $src"
    timed "$work/load.json" -X POST --data-binary "@$work/load.ndjson" \
        "$src/cell/v1/tenants/$TENANT/import" >/dev/null

    log "$backend: export"
    seconds=$(timed "$work/export-$backend.ndjson" "$src/cell/v1/tenants/$TENANT/export")
    local exported
    exported=$(tail -n 1 "$work/export-$backend.ndjson" | sed -n 's/.*"rows":\([0-9]*\).*/\1/p')
    if [[ "$exported" != "$ROWS" ]]; then
        log "$backend: export carried ${exported:-?} rows, expected $ROWS"
        exit 1
    fi
    results+=("$backend|export|$ROWS|$seconds")

    log "$backend: import into an empty tenant"
    seconds=$(timed "$work/import-$backend.json" -X POST -H 'content-type: application/x-ndjson' \
        --data-binary "@$work/export-$backend.ndjson" "$dst/cell/v1/tenants/$TENANT/import")
    grep -q "\"applied\":$ROWS" "$work/import-$backend.json" || {
        log "$backend: import summary $(cat "$work/import-$backend.json")"
        exit 1
    }
    results+=("$backend|import|$ROWS|$seconds")

    log "$backend: replay the same import (idempotent)"
    seconds=$(timed "$work/replay-$backend.json" -X POST -H 'content-type: application/x-ndjson' \
        --data-binary "@$work/export-$backend.ndjson" "$dst/cell/v1/tenants/$TENANT/import")
    grep -q '"applied":0' "$work/replay-$backend.json" || {
        log "$backend: replay summary $(cat "$work/replay-$backend.json")"
        exit 1
    }
    results+=("$backend|import (replay, no-op)|$ROWS|$seconds")

    local a b
    a=$(checksum "$src")
    b=$(checksum "$dst")
    if [[ "$a" != "$b" ]]; then
        log "$backend: checksums differ: $a vs $b"
        exit 1
    fi
    log "$backend: checksums match: $a"
}

log "building the release binary"
(cd "$root" && cargo build --release -p sample-cell >&2)
generate

for backend in $BACKENDS; do
    case $backend in
    sqlite)
        bench sqlite "--data-dir $work/sqlite-src" "--data-dir $work/sqlite-dst"
        ;;
    postgres)
        start_postgres
        src_db="sc_bench_src_$$"
        dst_db="sc_bench_dst_$$"
        for db in "$src_db" "$dst_db"; do
            psql -q "$pg_admin_url" -c "CREATE DATABASE $db" >/dev/null
            pg_databases+=("$db")
        done
        bench postgres "--database-url $(pg_url_for "$src_db")" "--database-url $(pg_url_for "$dst_db")"
        ;;
    *)
        log "unknown backend $backend"
        exit 2
        ;;
    esac
done

printf '\n| backend | direction | rows | seconds | rows/s | vs target (%s rows/s) |\n' "$TARGET_ROWS_PER_SEC"
printf '| --- | --- | ---: | ---: | ---: | ---: |\n'
for row in "${results[@]}"; do
    IFS='|' read -r backend direction rows seconds <<<"$row"
    awk -v b="$backend" -v d="$direction" -v r="$rows" -v s="$seconds" -v t="$TARGET_ROWS_PER_SEC" \
        'BEGIN { rate = r / s; printf "| %s | %s | %d | %.3f | %.0f | %.2fx |\n", b, d, r, s, rate, rate / t }'
done
