#!/usr/bin/env bash
# Webhook delivery benchmark: a real `cellplane serve` (release) on SQLite and on PostgreSQL,
# a receiver on loopback. Measures commit → first delivery attempt (p50/p99) at 100 and
# 1,000 events/s, and deliveries/s at saturation (one replay queues BACKLOG deliveries)
# against a bare sender posting the same signed documents to the same receiver with the
# same concurrency (64), measured in the same run; and usage ingestion: 10 routers × 10,000
# tenants reporting MINUTES minutes of counts with their heartbeats (records applied per
# second), against the same heartbeats without usage. Starts a throwaway PostgreSQL; prints
# markdown tables.
#   bench/events/run.sh
#   SECS=3 BACKLOG=2000 bench/events/run.sh          # quicker
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${SECS:-10} BACKLOG=${BACKLOG:-10000} MINUTES=${MINUTES:-3}
cargo build --release -p cellplane --example events_bench >&2
cargo build --release -p cellplane >&2
target=${CARGO_TARGET_DIR:-$PWD/target}
work=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-bench-events.XXXXXX")
chmod 755 "$work"
trap 'scripts/pg.sh stop "$work/pg" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
pg=$(scripts/pg.sh start "$work/pg")
db=$(python3 - "$pg" <<'PY'
import sys, subprocess
url = sys.argv[1]
subprocess.run(["psql", url, "-qc", "CREATE DATABASE bench_events"], check=True)
print(url.rsplit("/", 1)[0] + "/bench_events")
PY
)
out="$work/results.jsonl"
CELLPLANE_BIN="$target/release/cellplane" "$target/release/examples/events_bench" \
    --pg "$db" --secs "$SECS" --backlog "$BACKLOG" --minutes "$MINUTES" | tee "$out" >&2
python3 - "$out" <<'PY'
import json, sys
all_rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in all_rows if "latency" in r]
ingest = [r for r in all_rows if r["scenario"].endswith("-ingest")]
print("| store | events/s offered | achieved | events | delivered | commit → first attempt p50 / p99 / max (ms) | p99 / 1000 ms target | ≤ 1 s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    for l in r["latency"]:
        print(f"| {r['scenario']} | {l['rate']:.0f} | {l['achieved_rate']:.0f} | {l['events']} | {l['delivered']} | "
              f"{l['p50_ms']:.1f} / {l['p99_ms']:.1f} / {l['max_ms']:.1f} | {l['p99_ms'] / 1000:.2f} | "
              f"{'yes' if l['complete'] and l['p99_ms'] <= 1000 else 'no'} |")
print()
print("| store | backlog | dispatcher deliveries/s | bare sender/s (same receiver, 64 in flight) | dispatcher / bare |")
print("| --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['scenario']} | {r['backlog']}{'' if r['backlog_complete'] else ' (incomplete)'} | "
          f"{r['engine_deliveries_per_s']:.0f} | {r['bare_sender_per_s']:.0f} | "
          f"{r['engine_deliveries_per_s'] / r['bare_sender_per_s']:.2f} |")
print()
print("| store | routers × tenants × minutes | heartbeats | records | usage records/s | heartbeat with usage (ms) | heartbeat without (ms) | with / without |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in ingest:
    print(f"| {r['scenario'][:-7]} | {r['routers']} × {r['tenants']} × {r['minutes']} | {r['heartbeats']} | {r['records']} | "
          f"{r['records_per_s']:.0f} | {r['heartbeat_ms']:.1f} | {r['plain_heartbeat_ms']:.1f} | "
          f"{r['heartbeat_ms'] / r['plain_heartbeat_ms']:.1f} |")
PY
