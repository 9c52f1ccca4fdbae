#!/usr/bin/env bash
# Tenant-create throughput and latency at 50 concurrent clients, on SQLite and on
# PostgreSQL, each with its audit record and outbox event in the same transaction.
# Baseline in the same run: GET /healthz on the same server (the HTTP stack's ceiling).
#
#   bench/control-plane/tenant-create.sh            # both stores
#   DURATION=20 CONNECTIONS=50 bench/control-plane/tenant-create.sh
#   BACKENDS=postgres BIN=/tmp/cellplane-old bench/control-plane/tenant-create.sh
#                                                 # one store; a prebuilt binary
#
# Needs wrk (apt-get install wrk). Starts its own PostgreSQL unless CELLPLANE_TEST_PG_URL
# names a superuser URL. Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-2}
TOKEN=bench-admin-token-0123456789

command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 2; }
BACKENDS=${BACKENDS:-sqlite postgres}
if [ -z "${BIN:-}" ]; then
    cargo build --release -p cellplane >&2
    BIN=${CARGO_TARGET_DIR:-target}/release/cellplane
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/cp-bench.XXXXXX")
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done
    if [ -n "${started_pg:-}" ]; then scripts/pg.sh stop "$work/pg" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "${CELLPLANE_TEST_PG_URL:-}" ]; then
    CELLPLANE_TEST_PG_URL=$(scripts/pg.sh start "$work/pg")
    started_pg=1
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run_wrk() { # script url -> "rps p50 p99 non2xx"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -s "$1" "$2" \
        | awk '/^RESULT/ { for (i=2;i<=NF;i++) { split($i,kv,"="); v[kv[1]]=kv[2] } print v["rps"], v["p50_ms"], v["p99_ms"], v["non2xx"] }'
}

rows=()
for backend in $BACKENDS; do
    dir="$work/$backend"; mkdir -p "$dir"
    args=()
    if [ "$backend" = postgres ]; then
        db="bench_$RANDOM$RANDOM"
        psql "$CELLPLANE_TEST_PG_URL" -qc "CREATE DATABASE $db" >/dev/null
        args=(--database-url "${CELLPLANE_TEST_PG_URL%/*}/$db")
    fi
    port=$(free_port)
    CELLPLANE_ADMIN_TOKEN=$TOKEN CELLPLANE__RATE_LIMIT__AUTHORING_PER_SEC=0 RUST_LOG=warn \
        "$BIN" serve --listen "127.0.0.1:$port" --data-dir "$dir" "${args[@]}" >"$dir/out" 2>"$dir/err" &
    pids+=($!)
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
    curl -sf -XPOST "http://127.0.0.1:$port/v1/organizations" -H "Authorization: Bearer $TOKEN" \
        -H 'content-type: application/json' -d '{"organization_id":"bench-org","name":"bench"}' >/dev/null
    read -r h_rps h_p50 h_p99 _ < <(run_wrk bench/control-plane/healthz.lua "http://127.0.0.1:$port/healthz")
    read -r c_rps c_p50 c_p99 c_err < <(CP_TOKEN=$TOKEN CP_PREFIX="r$RANDOM" run_wrk bench/control-plane/tenant-create.lua "http://127.0.0.1:$port")
    verify=$(curl -sf "http://127.0.0.1:$port/v1/audit/verify" -H "Authorization: Bearer $TOKEN")
    target=$([ "$backend" = sqlite ] && echo 2000 || echo 1000)
    rows+=("$(printf '| %s | %.0f | %.2f | %.2f | %s | %.2fx | %.0f | %.3f | %s |' \
        "$backend" "$c_rps" "$c_p50" "$c_p99" "$c_err" \
        "$(python3 -c "print($c_rps / $target)")" "$h_rps" "$(python3 -c "print($c_rps / $h_rps)")" \
        "$(echo "$verify" | python3 -c 'import json,sys; v=json.load(sys.stdin); print("ok, %d records" % v["records"] if v["ok"] else "BROKEN")')")")
    kill "${pids[-1]}" 2>/dev/null || true
    wait "${pids[-1]}" 2>/dev/null || true
done

echo
echo "Tenant create, $CONNECTIONS concurrent clients, ${DURATION}s, audit + outbox in the same transaction ($(nproc) cores, client on the same machine, load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo
echo "| store | creates/s | p50 ms | p99 ms | non-2xx | vs target (2000/s SQLite, 1000/s PG) | baseline GET /healthz req/s | creates ÷ healthz | audit chain |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
printf '%s\n' "${rows[@]}"
echo
echo "p99 target: 25 ms."
