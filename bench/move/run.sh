#!/usr/bin/env bash
# Tenant move benchmark: release binaries of the control plane, two routers and the
# sample-cell cells (stamped from the `local` template by terraform), steady load on the
# moving tenant and a neighbour (~300 requests/s each, through both routers). MOVES moves
# of a KEYS-key tenant back and forth; then the same for a BIG-key tenant (BIG_MOVES
# moves). Prints markdown tables: hold p50/p99/max against the 250 ms target, failed
# requests, request latency p99 during holds against outside them (same run), snapshot
# copy rows/s against 50,000, move time.
#   bench/move/run.sh
#   MOVES=5 BIG_MOVES=1 bench/move/run.sh                   # quicker
#   BACKEND=postgres CELLPLANE_TEST_PG_URL=postgres://… bench/move/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MOVES=${MOVES:-20} KEYS=${KEYS:-10000} BIG=${BIG:-100000} BIG_MOVES=${BIG_MOVES:-5}
cargo build --release -p cellplane -p cellplane-router -p sample-cell >&2
target=${CARGO_TARGET_DIR:-$PWD/target}
export CELLPLANE_BIN="$target/release/cellplane" CELLPLANE_ROUTER_BIN="$target/release/cellplane-router" \
    SAMPLE_CELL_BIN="$target/release/sample-cell"
run() {
    # The harness (load generator, coordinator) is the debug test binary: the e2e tests
    # need debug-only job kinds; what is measured runs from the release binaries above.
    MOVES=$1 KEYS=$2 cargo test -p cellplane-tests --test e2e -- --ignored --exact \
        moves::bench_moves --nocapture --test-threads 1 2>/dev/null | grep '^|\|^###'
}
run "$MOVES" "$KEYS"
run "$BIG_MOVES" "$BIG"
