#!/usr/bin/env bash
# Job engine benchmark: no-op job throughput and enqueue→start latency (10,000 jobs, 4
# workers per replica) on SQLite, PostgreSQL with one replica and with two, each against
# the bare queue (claim + finish + release with the store's own statements, no engine)
# measured in the same run; then controller failover between two `cellplane serve`
# processes (SIGKILL of the lease holder → the other holds it), p50/p99 over 20 kills.
# Starts a throwaway PostgreSQL; prints a markdown table.
#   bench/jobs/run.sh
#   JOBS=2000 KILLS=5 bench/jobs/run.sh        # quicker
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${JOBS:-10000} KILLS=${KILLS:-20} WORKERS=${WORKERS:-4} IDLE=${IDLE:-200}
cargo build --release -p cellplane --features bench-kinds --example jobs_bench >&2
cargo build --release -p cellplane --features bench-kinds >&2
target=${CARGO_TARGET_DIR:-$PWD/target}
work=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-bench-jobs.XXXXXX")
chmod 755 "$work"
trap 'scripts/pg.sh stop "$work/pg" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
pg=$(scripts/pg.sh start "$work/pg")
out="$work/results.jsonl"
"$target/release/examples/jobs_bench" --pg "$pg" --jobs "$JOBS" --workers "$WORKERS" \
    --idle-samples "$IDLE" | tee -a "$out" >&2
failover_db=$(python3 - "$pg" <<'PY'
import sys, subprocess
url = sys.argv[1]
subprocess.run(["psql", url, "-qc", "DROP DATABASE IF EXISTS bench_failover"], check=True)
subprocess.run(["psql", url, "-qc", "CREATE DATABASE bench_failover"], check=True)
print(url.rsplit("/", 1)[0] + "/bench_failover")
PY
)
CELLPLANE_BIN="$target/release/cellplane" PG_URL="$failover_db" \
    python3 bench/jobs/failover.py "$KILLS" | tee -a "$out" >&2
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| scenario | engine jobs/s | bare queue jobs/s | engine / bare | ≥ 1000/s | start p50 / p99 idle (ms) | ≤ 50 ms p99 | start p50 / p99 under 10k backlog (ms) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    if r["scenario"] == "failover":
        continue
    print(f"| {r['scenario']} ({r['workers_per_replica']} workers/replica) | {r['engine_jobs_per_s']:.0f} | "
          f"{r['bare_queue_jobs_per_s']:.0f} | {r['ratio_engine_to_bare']:.2f} | "
          f"{'yes' if r['engine_jobs_per_s'] >= 1000 else 'no'} | "
          f"{r['idle_start_p50_ms']:.1f} / {r['idle_start_p99_ms']:.1f} | "
          f"{'yes' if r['idle_start_p99_ms'] <= 50 else 'no'} | "
          f"{r['loaded_start_p50_ms']:.0f} / {r['loaded_start_p99_ms']:.0f} |")
for r in rows:
    if r["scenario"] != "failover":
        continue
    print()
    print("| failover (SIGKILL of the drift lease holder → the other holds it) | p50 (ms) | p99 (ms) | max (ms) | lease TTL (ms) | p99 / (TTL + 1 s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {r['kills']} kills, renew every {r['renew_ms']} ms | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
          f"{r['max_ms']:.0f} | {r['lease_ms']} | {r['p99_ms'] / r['target_ms']:.2f} |")
PY
