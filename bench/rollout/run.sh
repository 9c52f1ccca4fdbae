#!/usr/bin/env bash
# Release rollout benchmarks (numbers in bench/rollout/README.md):
#   1. halt.py: a bad canary (fault_rate 0.2) under traffic through a real router, RUNS (10)
#      times at a 5 s evaluation interval: time from the canary applied to the halt
#      decision and to rollback complete (p50), against two intervals (the target) and the
#      revert job alone;
#   2. gates_bench: control-plane CPU per evaluation round with 1,000 cells and 10 routers
#      reporting (SQLite, and PostgreSQL unless SKIP_PG=1), against reading each cell on
#      its own; heartbeat bytes per router per interval at 1,000 cells.
#   bench/rollout/run.sh
#   RUNS=3 SKIP_PG=1 bench/rollout/run.sh                      # quicker
#   CELLPLANE_BIN=target/release/cellplane bench/rollout/run.sh   # no build: these binaries
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-$PWD/target}
if [ -n "${CELLPLANE_BIN:-}" ]; then
    CELLPLANE_BIN=$(realpath "$CELLPLANE_BIN")
    bindir=$(dirname "$CELLPLANE_BIN")
else
    cargo build --release -p cellplane -p sample-cell -p cellplane-router >&2
    cargo build --release -p cellplane --example gates_bench >&2
    bindir="$target/release"
    CELLPLANE_BIN="$bindir/cellplane"
fi
export CELLPLANE_BIN ROUTER_BIN="${ROUTER_BIN:-$bindir/cellplane-router}" \
    SAMPLE_CELL_BIN="${SAMPLE_CELL_BIN:-$bindir/sample-cell}" TEMPLATES_DIR="$PWD/cell-templates"
gates_bench="${GATES_BENCH_BIN:-$bindir/examples/gates_bench}"
work=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-bench-rollout.XXXXXX")
chmod 755 "$work"
cleanup() {
    find "$work" -name sample-cell.pid 2>/dev/null | while read -r f; do
        pid=$(cat "$f" 2>/dev/null || true)
        case "$pid" in '' | *[!0-9]*) continue ;; esac
        if grep -q sample-cell "/proc/$pid/cmdline" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    done
    scripts/pg.sh stop "$work/pg" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
export WORK="$work"

echo "## Halt and rollback of a bad canary"
python3 bench/rollout/halt.py

echo
echo "## One evaluation round at ${CELLS:-1000} cells, ${ROUTERS:-10} routers"
pg_args=()
if [ "${SKIP_PG:-0}" != 1 ]; then
    pg=$(scripts/pg.sh start "$work/pg")
    pg_args=(--pg "$pg")
fi
"$gates_bench" --cells "${CELLS:-1000}" --routers "${ROUTERS:-10}" --rounds "${ROUNDS:-20}" "${pg_args[@]}" \
    > "$work/gates.jsonl"
python3 - "$work/gates.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows:
    if r["measure"] == "heartbeat":
        print(f"\nHeartbeat of one router at {r['cells']} cells: {r['bytes']:,} bytes "
              f"({r['bytes_per_cell']:.0f} per cell; {r['bytes_per_sec']/1000:.1f} kB/s at one "
              f"heartbeat every {r['heartbeat_secs']} s) against {r['baseline_bytes']} bytes "
              f"without per-cell counters (ratio {r['bytes']/r['baseline_bytes']:.0f})")
for r in rows:
    if r["measure"] == "ingest":
        print(f"Ingest ({r['store']}): {r['ms_per_heartbeat']:.1f} ms per heartbeat of "
              f"{r['cells']} cells")
print("\n| store | gates | CPU per round (control plane + database) | wall | baseline: each cell read on its own | ratio | target ≤ 50 ms |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    if r["measure"] != "round":
        continue
    cpu = r["cpu_ms"] + r["db_cpu_ms"]
    base = r["baseline_cpu_ms"] + r["baseline_db_cpu_ms"]
    ok = "yes" if cpu <= 50 else "no"
    print(f"| {r['store']} | {r['gates']} | {cpu:.1f} ms ({r['cpu_ms']:.1f} + {r['db_cpu_ms']:.1f}) | "
          f"{r['wall_ms']:.1f} ms | {base:.1f} ms | {cpu / base:.2f} | {ok} |")
PY
