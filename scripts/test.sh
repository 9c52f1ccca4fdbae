#!/usr/bin/env bash
# Runs the whole test suite: starts a throwaway PostgreSQL (unless CELLPLANE_TEST_PG_URL
# is already set) and a moto server when the AWS tests need one, then `cargo test`.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-test.XXXXXX")
chmod 755 "$work"
cleanup() {
    if [ -n "${started_pg:-}" ]; then scripts/pg.sh stop "$work/pg" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "${CELLPLANE_TEST_PG_URL:-}" ]; then
    CELLPLANE_TEST_PG_URL=$(scripts/pg.sh start "$work/pg")
    started_pg=1
    export CELLPLANE_TEST_PG_URL
    echo "test PostgreSQL at $CELLPLANE_TEST_PG_URL"
fi

# The end-to-end tests spawn the real binaries; `cargo test` alone builds only the binaries
# of packages that have integration tests, so build them all first.
cargo build --workspace --bins
cargo test --workspace "$@"
