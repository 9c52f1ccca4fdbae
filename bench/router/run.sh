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
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p cellplane -p cellplane-router --bins
cargo build --release -q -p cellplane-router --example fixed_rate
BIN=$CARGO_TARGET_DIR/release
LOADGEN=$CARGO_TARGET_DIR/release/examples/fixed_rate
W=$(mktemp -d /tmp/cellplane-bench.XXXXXX)
chmod 755 "$W"
OUT=${OUT:-$W/results.jsonl}
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
    [ -f "$W/upstream.pid" ] && kill "$(cat "$W/upstream.pid")" 2>/dev/null || true
    sleep 0.5
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_line() { # file prefix -> rest of first matching line
    for _ in $(seq 1 300); do
        l=$(grep -m1 "^$2" "$1" 2>/dev/null || true)
        if [ -n "$l" ]; then echo "${l#"$2"}"; return; fi
        sleep 0.1
    done
    echo "timeout waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}
ADMIN=bench-admin-token-0123456789
UP=$(free_port); NG=$(free_port)
echo "work dir $W; upstream :$UP nginx :$NG" >&2

# The upstream is its own nginx process (a static 200), shared by every target, so both
# proxies pay the same extra process hop; the proxy nginx is a second instance.
{
    echo "worker_processes 2; pid $W/upstream.pid; error_log $W/upstream-error.log warn; daemon on;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; keepalive_requests 100000;"
    echo "  server { listen 127.0.0.1:$UP; location / { default_type text/plain; return 200 \"ok\n\"; } } }"
} > "$W/upstream.conf"
nginx -c "$W/upstream.conf"
write_nginx() { # N
    local n=$1
    {
        echo "worker_processes 2; pid $W/nginx.pid; error_log $W/nginx-error.log warn; daemon on;"
        echo "events { worker_connections 4096; }"
        echo "http { access_log off; keepalive_requests 100000;"
        echo "  map_hash_max_size 4194304; map_hash_bucket_size 128;"
        for c in 0 1 2 3; do echo "  upstream cell$c { server 127.0.0.1:$UP; keepalive 64; }"; done
        echo "  map \$http_x_tenant_env \$tenant_env { default \$http_x_tenant_env; \"\" prod; }"
        echo "  map \$host \$tenant { ~^(?<t>[a-z][a-z0-9-]+)\\.localhost\$ \$t; }"
        echo "  map \$host \$cell { hostnames; default \"\"; include $W/nginx-map.conf; }"
        echo "  server { listen 127.0.0.1:$NG;"
        echo "    location / { if (\$cell = \"\") { return 404; }"
        echo "      proxy_http_version 1.1; proxy_set_header Connection \"\";"
        echo "      proxy_set_header X-Tenant-ID \$tenant; proxy_set_header X-Tenant-Env \$tenant_env;"
        echo "      proxy_set_header X-Correlation-ID \$request_id; proxy_pass http://\$cell; } }"
        echo "}"
    } > "$W/nginx.conf"
    python3 - "$n" "$W/nginx-map.conf" <<'PY'
import sys
n, path = int(sys.argv[1]), sys.argv[2]
with open(path, "w") as f:
    for i in range(n):
        f.write(f"t{i}.localhost cell{i % 4};\n")
PY
    if [ -f "$W/nginx.pid" ] && kill -0 "$(cat "$W/nginx.pid")" 2>/dev/null; then
        nginx -c "$W/nginx.conf" -s reload; sleep 3
    else
        nginx -c "$W/nginx.conf"
    fi
}

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

record() { echo "$1" | tee -a "$OUT"; }

for N in $SIZES; do
    echo "== $N tenants" >&2
    write_nginx "$N"
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
    CELLPLANE_TOKEN=$TOKEN "$BIN/cellplane-router" --control-plane "$CP" --listen 127.0.0.1:0 \
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
    record "{\"tenants\":$N,\"metric\":\"wrk_rps\",\"target\":\"nginx\",\"value\":$(wrk_rps "http://127.0.0.1:$NG/" "$N")}"
    record "{\"tenants\":$N,\"metric\":\"wrk_rps\",\"target\":\"router\",\"value\":$(wrk_rps "$R/" "$N")}"
    for RATE in $RATES; do
        for tgt in direct nginx router; do
            case $tgt in
                direct) url="http://127.0.0.1:$UP/v1/kv/x"; tn=0 ;;
                nginx) url="http://127.0.0.1:$NG/v1/kv/x"; tn=$N ;;
                router) url="$R/v1/kv/x"; tn=$N ;;
            esac
            res=$("$LOADGEN" "$url" "$RATE" "$DUR" 32 "$tn")
            record "{\"tenants\":$N,\"metric\":\"fixed_rate\",\"target\":\"$tgt\",\"result\":$res}"
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
