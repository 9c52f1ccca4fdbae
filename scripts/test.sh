#!/usr/bin/env bash
# Runs the whole test suite: starts a throwaway PostgreSQL (unless CELLPLANE_TEST_PG_URL
# is already set) and a moto server for the AWS template tests (unless
# CELLPLANE_TEST_MOTO_URL is set), then `cargo test`. Both are stopped on exit.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-test.XXXXXX")
chmod 755 "$work"
cleanup() {
    if [ -n "${started_pg:-}" ]; then scripts/pg.sh stop "$work/pg" || true; fi
    if [ -n "${started_moto:-}" ]; then scripts/moto.sh stop "$work/moto" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# Stamping tests drive the real terraform binary (the local template needs no provider;
# the aws template uses the provider mirror in /opt/tf-plugins).
if ! command -v "${CELLPLANE__IAC__BINARY:-terraform}" >/dev/null 2>&1; then
    echo "test.sh: ${CELLPLANE__IAC__BINARY:-terraform} is not on PATH; the stamping tests need terraform (or tofu with CELLPLANE__IAC__BINARY=tofu)" >&2
    exit 1
fi

# The release tests start a real Prometheus server per test (the Debian package; installed
# here when it is missing and this is a Debian machine we may install on, as .ci/run does).
if ! command -v "${CELLPLANE_TEST_PROMETHEUS_BIN:-prometheus}" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing prometheus (the release tests start one)" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) >/dev/null
    fi
fi
if ! command -v "${CELLPLANE_TEST_PROMETHEUS_BIN:-prometheus}" >/dev/null 2>&1; then
    echo "test.sh: prometheus is not on PATH; the release tests need it (apt-get install prometheus, or set CELLPLANE_TEST_PROMETHEUS_BIN)" >&2
    exit 1
fi

if [ -z "${CELLPLANE_TEST_PG_URL:-}" ]; then
    CELLPLANE_TEST_PG_URL=$(scripts/pg.sh start "$work/pg")
    started_pg=1
    export CELLPLANE_TEST_PG_URL
    echo "test PostgreSQL at $CELLPLANE_TEST_PG_URL"
fi

if [ -z "${CELLPLANE_TEST_MOTO_URL:-}" ]; then
    CELLPLANE_TEST_MOTO_URL=$(scripts/moto.sh start "$work/moto")
    started_moto=1
    export CELLPLANE_TEST_MOTO_URL
    echo "test moto server at $CELLPLANE_TEST_MOTO_URL"
fi

# The end-to-end tests spawn the real binaries; `cargo test` alone builds only the binaries
# of packages that have integration tests, so build them all first.
cargo build --workspace --bins
cargo test --workspace "$@"
