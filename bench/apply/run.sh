#!/usr/bin/env bash
# Manifest apply benchmark (see bench.py): a real `cellplane serve` (release) on SQLite and
# on a throwaway PostgreSQL, CELLS pooled `local` cells stamped first. Measures, for N
# tenants, the plan (`POST /v1/apply?dry_run=true`, target ≤ 1 s), the apply, and the time
# until every tenant is Ready, against the same number of tenants created and activated
# through the imperative API one request at a time (the baseline) and with 16 concurrent
# clients, on the same server in the same run. Prints a markdown table per store.
#   bench/apply/run.sh
#   N=200 SKIP_PG=1 bench/apply/run.sh                       # quicker
#   CELLPLANE_BIN=target/debug/cellplane N=20 bench/apply/run.sh   # no build: that binary
set -euo pipefail
cd "$(dirname "$0")/../.."
export N=${N:-1000}
if [ -n "${CELLPLANE_BIN:-}" ]; then
    CELLPLANE_BIN=$(realpath "$CELLPLANE_BIN")
    SAMPLE_CELL_BIN=${SAMPLE_CELL_BIN:-$(dirname "$CELLPLANE_BIN")/sample-cell}
else
    cargo build --release -p cellplane -p sample-cell >&2
    target=${CARGO_TARGET_DIR:-$PWD/target}
    CELLPLANE_BIN="$target/release/cellplane"
    SAMPLE_CELL_BIN="$target/release/sample-cell"
fi
export CELLPLANE_BIN SAMPLE_CELL_BIN TEMPLATES_DIR="$PWD/cell-templates"
work=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-bench-apply.XXXXXX")
chmod 755 "$work"
cleanup() {
    # bench.py stops its cells; this catches what an interrupted run left (by pid file).
    find "$work" -name sample-cell.pid 2>/dev/null | while read -r f; do
        pid=$(cat "$f" 2>/dev/null || true)
        case "$pid" in '' | *[!0-9]*) continue ;; esac
        if grep -q sample-cell "/proc/$pid/cmdline" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    done
    scripts/pg.sh stop "$work/pg" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
pg_url=""
if [ "${SKIP_PG:-0}" != 1 ]; then
    pg=$(scripts/pg.sh start "$work/pg")
    pg_url=$(python3 - "$pg" <<'PY'
import sys, subprocess
url = sys.argv[1]
subprocess.run(["psql", url, "-qc", "CREATE DATABASE bench_apply"], check=True)
print(url.rsplit("/", 1)[0] + "/bench_apply")
PY
)
fi
WORK="$work" PG_URL="$pg_url" python3 bench/apply/bench.py
