#!/usr/bin/env bash
# CPU time per proxied request at a fixed rate, nginx vs cellplane-router, in alternating
# rounds (nginx, router, nginx, router, ...). On a small machine where the load generator
# shares the cores, saturation throughput swings with whatever else runs; the CPU the proxy
# itself spends per request at a rate both sustain is a steadier number.
#   CPU = utime + stime of the proxy's processes (nginx: master + workers; router: all
#   threads) from /proc, read before and after the run, divided by the requests answered.
# A second router with metering off (`--no-usage`) runs next to the first, so the table
# also shows what usage metering costs per request (target: ≤ 3 %).
# Usage: bench/router/cpu.sh [TENANTS]   (default 10; env RATE, DUR, ROUNDS, CONNS, OUT)
# The router serves from a state file (no control plane: the table does not change during
# the run); nginx gets the same configuration as in run.sh (lib.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10}
RATE=${RATE:-8000}
DUR=${DUR:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
W=$(mktemp -d /tmp/cellplane-cpu.XXXXXX)
chmod 755 "$W"
. bench/router/lib.sh
cargo build --profile "$PROFILE" -q -p cellplane-router --bins --example fixed_rate
RBIN=$CARGO_TARGET_DIR/$PROFILE
OUT=${OUT:-$W/cpu.jsonl}
R_PID=
U_PID=
cleanup() {
    [ -n "$R_PID" ] && kill "$R_PID" 2>/dev/null || true
    [ -n "$U_PID" ] && kill "$U_PID" 2>/dev/null || true
    [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
    [ -f "$W/upstream.pid" ] && kill "$(cat "$W/upstream.pid")" 2>/dev/null || true
    sleep 0.5
}
trap cleanup EXIT
UP=$(free_port); NG=$(free_port)
start_upstream "$UP"
write_nginx "$N" "$NG" "$UP"
python3 - "$N" "$UP" "$W/router-state.json" <<'PY'
import json, sys
n, up, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(path, "w") as f:
    f.write('{"revision":1,"full":true,"removals":[],"upserts":[')
    f.write(",".join(json.dumps({"tenant_id": f"t{i}", "env": "prod", "cell_id": f"cell{i % 4}",
                                 "endpoint": f"http://127.0.0.1:{up}", "mode": "serve"})
                     for i in range(n)))
    f.write("]}")
PY
DEAD=$(free_port)
"$RBIN/cellplane-router" --workers 2 --control-plane "http://127.0.0.1:$DEAD" \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --state-file "$W/router-state.json" \
    --base-domain localhost >"$W/router.out" 2>"$W/router.log" &
R_PID=$!
R=$(wait_line "$W/router.out" "listening on ")
cp "$W/router-state.json" "$W/unmetered-state.json"
"$RBIN/cellplane-router" --workers 2 --control-plane "http://127.0.0.1:$DEAD" --no-usage \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --state-file "$W/unmetered-state.json" \
    --base-domain localhost >"$W/unmetered.out" 2>"$W/unmetered.log" &
U_PID=$!
U=$(wait_line "$W/unmetered.out" "listening on ")
curl -sf -H 'Host: t0.localhost' "$U/v1/kv/x" >/dev/null
curl -sf -H 'Host: t0.localhost' "$R/v1/kv/x" >/dev/null
curl -sf -H 'Host: t0.localhost' "http://127.0.0.1:$NG/v1/kv/x" >/dev/null
TCK=$(getconf CLK_TCK)
echo "cpu per request: $N tenants, $RATE req/s for ${DUR}s, $ROUNDS rounds, router $PROFILE; work dir $W" >&2
# Warm both (connections to the upstream, page cache, CPU frequency).
"$RBIN/examples/fixed_rate" "http://127.0.0.1:$NG/v1/kv/x" "$RATE" 2 "$CONNS" "$N" >/dev/null
"$RBIN/examples/fixed_rate" "$R/v1/kv/x" "$RATE" 2 "$CONNS" "$N" >/dev/null
"$RBIN/examples/fixed_rate" "$U/v1/kv/x" "$RATE" 2 "$CONNS" "$N" >/dev/null
NG_V=(); RT_V=(); UN_V=()
for round in $(seq 1 "$ROUNDS"); do
    # The two routers swap places every round, so neither always runs right after nginx.
    if [ $((round % 2)) = 1 ]; then order="nginx router router-unmetered"; else order="nginx router-unmetered router"; fi
    for tgt in $order; do
        case $tgt in
            nginx) url="http://127.0.0.1:$NG/v1/kv/x"; pids=$(nginx_pids) ;;
            router) url="$R/v1/kv/x"; pids=$R_PID ;;
            router-unmetered) url="$U/v1/kv/x"; pids=$U_PID ;;
        esac
        # shellcheck disable=SC2086
        before=$(cpu_ticks $pids)
        res=$("$RBIN/examples/fixed_rate" "$url" "$RATE" "$DUR" "$CONNS" "$N")
        # shellcheck disable=SC2086
        after=$(cpu_ticks $pids)
        ok=$(echo "$res" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')
        us=$(python3 -c "print(round(($after - $before) * 1e6 / $TCK / max($ok, 1), 2))")
        case $tgt in
            nginx) NG_V+=("$us") ;;
            router) RT_V+=("$us") ;;
            router-unmetered) UN_V+=("$us") ;;
        esac
        echo "{\"metric\":\"cpu_us_per_req\",\"tenants\":$N,\"rate\":$RATE,\"target\":\"$tgt\",\"round\":$round,\"value\":$us,\"requests\":$ok,\"load1\":$(load1),\"result\":$res}" | tee -a "$OUT"
    done
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "{\"metric\":\"cpu_us_per_req_median\",\"tenants\":$N,\"rate\":$RATE,\"nginx\":$(median "${NG_V[@]}"),\"router\":$(median "${RT_V[@]}"),\"router_unmetered\":$(median "${UN_V[@]}"),\"load1\":$(load1)}" | tee -a "$OUT"
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
m = [r for r in rows if r["metric"] == "cpu_us_per_req_median"][-1]
per = {}
for r in rows:
    if r["metric"] == "cpu_us_per_req":
        per.setdefault(r["target"], []).append(r["value"])
print(f"| target ({m['tenants']} tenants, {m['rate']} req/s) | CPU µs per request (median) | rounds | vs nginx |")
print("| --- | --- | --- | --- |")
for name, key in [("nginx", "nginx"), ("cellplane-router, metering on", "router"), ("cellplane-router, --no-usage", "router_unmetered")]:
    target = {"nginx": "nginx", "router": "router", "router_unmetered": "router-unmetered"}[key]
    print(f"| {name} | {m[key]:.2f} | {', '.join(f'{v:.2f}' for v in per.get(target, []))} | {m[key] / m['nginx']:.2f} |")
print(f"\nmetering adds {100 * (m['router'] / m['router_unmetered'] - 1):+.1f} % CPU per proxied request (target ≤ 3 %)")
# The same per round (metered vs unmetered of the same round): mean and its standard error,
# to tell the metering cost from the drift between rounds.
d = [100 * (a / b - 1) for a, b in zip(per.get("router", []), per.get("router-unmetered", []))]
if len(d) > 1:
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    print(f"per round: {mean:+.1f} ± {se:.1f} % (mean ± standard error of {len(d)} rounds: {', '.join(f'{x:+.1f}' for x in d)})")
PY
