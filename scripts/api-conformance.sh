#!/usr/bin/env bash
# Checks that the control plane answers as its OpenAPI document says. Starts a throwaway
# control plane (the debug binary, SQLite, a temporary data dir), makes a viewer and a
# tenant-admin token, then runs schemathesis over every operation with the admin, viewer
# and tenant-admin tokens, failing on any 5xx, any status, content type or body the
# document does not declare, and any write a viewer gets a 2xx for. Then generates a
# Python client and fails if the generator has to skip an endpoint.
#
# Needs: target/debug/cellplane (cargo build --bin cellplane), python3 (3.10+), curl, jq.
# Tools are installed, pinned, into a venv under $CELLPLANE_CONFORMANCE_CACHE
# (default ~/.cache/cellplane-conformance). Examples per operation: $CONFORMANCE_EXAMPLES
# (default 20); generation mode: $CONFORMANCE_MODE (positive, the default, negative or all).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
OPENAPI_PYTHON_CLIENT_VERSION=0.29.1
examples=${CONFORMANCE_EXAMPLES:-20}
cache=${CELLPLANE_CONFORMANCE_CACHE:-$HOME/.cache/cellplane-conformance}
bin=${CELLPLANE_BIN:-target/debug/cellplane}

[ -x "$bin" ] || { echo "api-conformance: $bin is missing; run cargo build --bin cellplane" >&2; exit 1; }

venv="$cache/venv-st$SCHEMATHESIS_VERSION-opc$OPENAPI_PYTHON_CLIENT_VERSION"
if [ ! -x "$venv/bin/schemathesis" ] || [ ! -x "$venv/bin/openapi-python-client" ]; then
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION" \
        "openapi-python-client==$OPENAPI_PYTHON_CLIENT_VERSION"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-conformance.XXXXXX")
cleanup() {
    if [ -n "${pid:-}" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    # Cells the fuzzer created were stamped by terraform (the local template starts a
    # sample-cell each); they outlive the control plane by design, so stop them here.
    pkill -f -- "--data-dir $work/" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

admin_token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
# Long-poll watches are bounded to 1 s so a generated `wait` cannot stall the run; the
# authoring rate limit is off so writes are judged on their merits, not throttled.
CELLPLANE_ADMIN_TOKEN=$admin_token \
CELLPLANE__ROUTING__MAX_WAIT_SECS=1 \
CELLPLANE__RATE_LIMIT__AUTHORING_PER_SEC=0 \
RUST_LOG=warn \
    "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
    >"$work/stdout" 2>"$work/cellplane.log" &
pid=$!
url=
for _ in $(seq 1 600); do
    line=$(head -n1 "$work/stdout" 2>/dev/null || true)
    if [ -n "$line" ]; then url=${line#listening on }; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$url" ] || { echo "api-conformance: cellplane did not start" >&2; cat "$work/cellplane.log" >&2; exit 1; }
echo "api-conformance: control plane at $url"

api() { # method path [json]
    curl -fsS -X "$1" "$url$2" -H "Authorization: Bearer $admin_token" \
        -H 'Content-Type: application/json' ${3:+--data "$3"}
}
api POST /v1/organizations '{"organization_id":"conf-org","name":"Conformance"}' >/dev/null
api POST /v1/tenants '{"tenant_id":"conf-tenant","organization_id":"conf-org","profile":"mt-standard","region":"euw1"}' >/dev/null
# The admin pass uses its own admin token: it may revoke the bootstrap one (`admin`).
admin2_token=$(api POST /v1/tokens '{"role":"admin","description":"conformance"}' | jq -r .token)
viewer_token=$(api POST /v1/tokens '{"role":"viewer","description":"conformance"}' | jq -r .token)
tenant_token=$(api POST /v1/tokens '{"role":"tenant-admin","tenant_id":"conf-tenant","description":"conformance"}' | jq -r .token)

curl -fsS "$url/v1/openapi.json" >"$work/openapi.json"

# A viewer must never be granted a write.
mkdir -p "$work/hooks"
cat >"$work/hooks/conformance_hooks.py" <<'EOF'
import schemathesis


@schemathesis.check
def viewer_cannot_write(ctx, response, case):
    if case.method.upper() in ("POST", "PUT", "PATCH", "DELETE") and 200 <= response.status_code < 300:
        raise AssertionError(
            f"a viewer token was granted {case.method.upper()} {case.path}: {response.status_code}"
        )
EOF

checks=not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance
status=0
for who in admin viewer tenant-admin; do
    case $who in
        admin) token=$admin2_token; extra= ;;
        viewer) token=$viewer_token; extra=,viewer_cannot_write ;;
        tenant-admin) token=$tenant_token; extra= ;;
    esac
    echo "api-conformance: schemathesis as $who"
    # Run from the temp dir: schemathesis keeps a cache in the working directory.
    if ! (cd "$work" && PYTHONPATH="$work/hooks" SCHEMATHESIS_HOOKS=conformance_hooks \
        "$venv/bin/schemathesis" run "$work/openapi.json" --url "$url" \
        --header "Authorization: Bearer $token" \
        --checks "$checks$extra" \
        --mode "${CONFORMANCE_MODE:-positive}" --phases examples,coverage,fuzzing \
        --max-examples "$examples" --seed 1 --workers 2 \
        --request-timeout 10 --no-color \
        --suppress-health-check all --warnings off); then
        status=1
    fi
done

echo "api-conformance: generating a Python client"
# No post hooks: the formatter (ruff) is not needed to see what the generator skips.
echo 'post_hooks: []' >"$work/opc.yaml"
(cd "$work" && "$venv/bin/openapi-python-client" generate --path openapi.json \
    --config opc.yaml --output-path client --overwrite) >"$work/generate.log" 2>&1 || {
    cat "$work/generate.log" >&2
    echo "api-conformance: openapi-python-client failed" >&2
    exit 1
}
if grep -qi "will not be generated" "$work/generate.log"; then
    cat "$work/generate.log" >&2
    echo "api-conformance: the client generator skipped endpoints" >&2
    exit 1
fi
if grep -qi "warning" "$work/generate.log"; then cat "$work/generate.log" >&2; fi

if [ "$status" -ne 0 ]; then
    echo "api-conformance: FAILED (server log follows)" >&2
    tail -n 50 "$work/cellplane.log" >&2
    exit 1
fi
echo "api-conformance: ok"
