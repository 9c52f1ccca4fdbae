#!/usr/bin/env bash
# Router benchmark: nginx (map $host + upstream keepalive) vs cellplane-router, same run,
# same upstream (a static nginx server), on loopback only. For each table size:
#   - throughput at saturation (wrk, random tenant Host per request),
#   - latency at fixed rates with coordinated-omission correction (examples/fixed_rate.rs),
#     direct to the upstream and through each proxy, so "added" latency = proxy − direct,
#   - router RSS with the table loaded (through the real control-plane watch).
# Then route-update propagation: PATCH /v1/routes/{t}/prod (hold ⇄ serve) → first request
# through the router that reflects the new route, p50/p99 over 100 updates.
# Usage: bench/router/run.sh [SIZES...]   (default: 10 10000 1000000)
# Needs: nginx, wrk, sqlite3, python3 (apt-get install -y nginx wrk sqlite3).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES=${*:-10 10000 1000000}
RATES=${RATES:-2000 8000}
DUR=${DUR:-10}
WRK_CONNS=${WRK_CONNS:-64}
ROUNDS=${ROUNDS:-3}
W=$(mktemp -d /tmp/cellplane-bench.XXXXXX)
chmod 755 "$W"
. bench/router/lib.sh
cargo build --release -q -p cellplane --bins
cargo build --profile "$PROFILE" -q -p cellplane-router --bins --example fixed_rate
BIN=$CARGO_TARGET_DIR/release
RBIN=$CARGO_TARGET_DIR/$PROFILE
LOADGEN=$RBIN/examples/fixed_rate
OUT=${OUT:-$W/results.jsonl}
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
    [ -f "$W/upstream.pid" ] && kill "$(cat "$W/upstream.pid")" 2>/dev/null || true
    sleep 0.5
}
trap cleanup EXIT
ADMIN=bench-admin-token-0123456789
UP=$(free_port); NG=$(free_port)
echo "work dir $W; upstream :$UP nginx :$NG; router profile $PROFILE" >&2
start_upstream "$UP"

cat > "$W/random-host.lua" <<'EOF_LUA'
local n = tonumber(os.getenv("TENANTS") or "0")
request = function()
  local h = "localhost"
  if n > 0 then h = "t" .. math.random(0, n - 1) .. ".localhost" end
  return wrk.format("GET", "/v1/kv/x", { Host = h })
end
EOF_LUA

wrk_rps() { # url tenants -> requests/sec
    TENANTS=$2 wrk -t2 -c"$WRK_CONNS" -d"${DUR}s" -s "$W/random-host.lua" "$1" 2>/dev/null \
        | awk '/Requests\/sec/ {print $2}'
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# Every result carries the 1-minute load average at the moment it was taken.
record() { echo "${1%\}},\"load1\":$(load1)}" | tee -a "$OUT"; }

for N in $SIZES; do
    echo "== $N tenants" >&2
    write_nginx "$N" "$NG" "$UP"
    # Control plane with N routes seeded into its store (2 of 4 cells' endpoints are the
    # same upstream; the router keeps one pool per cell, nginx one upstream block per cell).
    D=$W/cp-$N; mkdir -p "$D"
    CP_PORT=$(free_port)
    start_cp() {
        CELLPLANE_ADMIN_TOKEN=$ADMIN "$BIN/cellplane" serve --listen 127.0.0.1:$CP_PORT --data-dir "$D" \
            >"$D/cp.out" 2>"$D/cp.log" &
        CP_PID=$!; PIDS+=("$CP_PID")
        wait_line "$D/cp.out" "listening on " >/dev/null
    }
    start_cp; kill "$CP_PID"; wait "$CP_PID" 2>/dev/null || true
    sqlite3 "$D/cellplane.db" <<SQL
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < $N - 1)
INSERT INTO routes (tenant_id, env, cell_id, endpoint, mode, rate_limit, revision, updated_at)
SELECT 't' || i, 'prod', 'cell' || (i % 4), 'http://127.0.0.1:$UP', 'serve', NULL, 1, '2026-01-01T00:00:00.000000Z' FROM n;
UPDATE routing_revision SET revision = 1 WHERE id = 1;
SQL
    start_cp
    CP=http://127.0.0.1:$CP_PORT
    TOKEN=$(curl -sf -H "Authorization: Bearer $ADMIN" -H 'content-type: application/json' \
        -d '{"role":"router"}' "$CP/v1/tokens" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    T0=$(date +%s.%N)
    CELLPLANE_TOKEN=$TOKEN "$RBIN/cellplane-router" --workers 2 --control-plane "$CP" --listen 127.0.0.1:0 \
        --admin-listen 127.0.0.1:0 --state-file "$D/router-state.json" --base-domain localhost \
        --hold-timeout-ms 1 >"$D/router.out" 2>"$D/router.log" &
    R_PID=$!; PIDS+=("$R_PID")
    R=$(wait_line "$D/router.out" "listening on ")
    RA=$(wait_line "$D/router.out" "admin listening on ")
    for _ in $(seq 1 600); do
        got=$(curl -s "$RA/__router/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["routes"])' 2>/dev/null || echo 0)
        [ "$got" = "$N" ] && break; sleep 0.1
    done
    LOAD_S=$(python3 -c "import time; print(round(time.time() - $T0, 2))")
    sleep 1
    RSS_KB=$(ps -o rss= -p "$R_PID" | tr -d ' ')
    record "{\"tenants\":$N,\"metric\":\"router_table_load_s\",\"value\":$LOAD_S}"
    record "{\"tenants\":$N,\"metric\":\"router_rss_mb\",\"value\":$((RSS_KB / 1024))}"
    # Sanity: both proxies answer for a tenant, neither for an unknown one.
    curl -sf -H 'Host: t0.localhost' "$R/v1/kv/x" >/dev/null
    curl -sf -H 'Host: t0.localhost' "http://127.0.0.1:$NG/v1/kv/x" >/dev/null
    # Warm both.
    TENANTS=$N wrk -t2 -c"$WRK_CONNS" -d2s -s "$W/random-host.lua" "$R/" >/dev/null 2>&1
    TENANTS=$N wrk -t2 -c"$WRK_CONNS" -d2s -s "$W/random-host.lua" "http://127.0.0.1:$NG/" >/dev/null 2>&1
    record "{\"tenants\":$N,\"metric\":\"wrk_rps\",\"target\":\"direct\",\"value\":$(wrk_rps "http://127.0.0.1:$UP/" 0)}"
    # Saturation in alternating rounds (nginx, router, nginx, router, ...): both see the
    # same drift of the shared machine; the medians are reported.
    NG_R=(); RT_R=()
    for round in $(seq 1 "$ROUNDS"); do
        v=$(wrk_rps "http://127.0.0.1:$NG/" "$N"); NG_R+=("$v")
        record "{\"tenants\":$N,\"metric\":\"wrk_rps_round\",\"target\":\"nginx\",\"round\":$round,\"value\":$v}"
        v=$(wrk_rps "$R/" "$N"); RT_R+=("$v")
        record "{\"tenants\":$N,\"metric\":\"wrk_rps_round\",\"target\":\"router\",\"round\":$round,\"value\":$v}"
    done
    record "{\"tenants\":$N,\"metric\":\"wrk_rps\",\"target\":\"nginx\",\"value\":$(median "${NG_R[@]}")}"
    record "{\"tenants\":$N,\"metric\":\"wrk_rps\",\"target\":\"router\",\"value\":$(median "${RT_R[@]}")}"
    # Fixed rates, also in alternating rounds (direct, nginx, router, direct, ...): the
    # report takes the median of each percentile per target.
    for RATE in $RATES; do
        for round in $(seq 1 "$ROUNDS"); do
            for tgt in direct nginx router; do
                case $tgt in
                    direct) url="http://127.0.0.1:$UP/v1/kv/x"; tn=0 ;;
                    nginx) url="http://127.0.0.1:$NG/v1/kv/x"; tn=$N ;;
                    router) url="$R/v1/kv/x"; tn=$N ;;
                esac
                res=$("$LOADGEN" "$url" "$RATE" "$DUR" 32 "$tn")
                record "{\"tenants\":$N,\"metric\":\"fixed_rate\",\"target\":\"$tgt\",\"round\":$round,\"result\":$res}"
            done
        done
    done
    RSS_KB=$(ps -o rss= -p "$R_PID" | tr -d ' ')
    record "{\"tenants\":$N,\"metric\":\"router_rss_after_traffic_mb\",\"value\":$((RSS_KB / 1024))}"
    if [ "$N" = "$(echo $SIZES | awk '{print $1}')" ]; then
        python3 bench/router/propagation.py "$CP" "$ADMIN" "$R" 100 | while read -r l; do record "$l"; done
    fi
    kill "$R_PID" "$CP_PID" 2>/dev/null || true
    wait "$R_PID" "$CP_PID" 2>/dev/null || true
done
python3 bench/router/report.py "$OUT"
