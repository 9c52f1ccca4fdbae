#!/usr/bin/env python3
"""Manifest apply benchmark: N tenants declared in one `POST /v1/apply` against the same
number created and activated one by one through the imperative API, on the same server,
measured in the same run. Run through ./run.sh (it builds the binaries, starts PostgreSQL).

Per store (SQLite, then PostgreSQL when PG_URL is set), against one `cellplane serve`:
  1. CELLS pooled `local` cells are stamped (not measured);
  2. imperative, sequential (the baseline): `POST /v1/tenants` then
     `POST /v1/tenants/{id}/activate` for each tenant, one request at a time; converged when
     every tenant is `active` with no pending job;
  3. manifest: one organization + N tenants as one YAML stream: `POST /v1/apply?dry_run=true`
     (plan), `POST /v1/apply` (apply), then the time from the apply's start until every
     tenant has `Ready=True` at its current generation (and, for comparison, until every
     tenant is `active` with no pending job);
  4. imperative with CONCURRENCY clients (16): as 2.
Each step starts once the previous one's tenants are all `Ready` (their status written by
the tenant controller), so one step's tail does not load the next. Prints a markdown table
per store; progress goes to stderr.

Environment: CELLPLANE_BIN, SAMPLE_CELL_BIN, TEMPLATES_DIR, WORK (a scratch directory),
N (1000), CELLS (4), CONCURRENCY (16), PG_URL (empty: SQLite only), POLL_SECS (0.5),
TIMEOUT_SECS (3600, per wait). CELLPLANE__* variables reach the server as they are.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from cellplane_bench import Api, log, stop_cells  # noqa: E402

CELLPLANE = os.environ["CELLPLANE_BIN"]
SAMPLE_CELL = os.environ.get("SAMPLE_CELL_BIN") or os.path.join(
    os.path.dirname(CELLPLANE), "sample-cell")
TEMPLATES = os.environ["TEMPLATES_DIR"]
WORK = os.environ["WORK"]
N = int(os.environ.get("N", "1000"))
CELLS = int(os.environ.get("CELLS", "4"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "16"))
PG_URL = os.environ.get("PG_URL", "")
POLL = float(os.environ.get("POLL_SECS", "0.5"))
TIMEOUT = float(os.environ.get("TIMEOUT_SECS", "3600"))
TOKEN = "bench-apply-admin-token-0123456789"
REGION = "eu-west-1"
# Three sets of N tenants share the cells: room for all of them, with a margin.
CELL_CAPACITY = max(600, math.ceil(3 * N * 1.25 / CELLS))


def tenants(api, org):
    """Every tenant of `org`, page by page (`{items, next_cursor}`)."""
    out, cursor = [], None
    while True:
        q = {"limit": "1000", "organization_id": org}
        if cursor:
            q["cursor"] = cursor
        page = api.call("GET", "/v1/tenants?" + urllib.parse.urlencode(q))
        out.extend(page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def ready(t):
    st = t.get("status") or {}
    if st.get("observedGeneration") != t.get("generation"):
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))


def active(t):
    return t["state"] == "active" and t.get("pending_job_id") is None


def wait_for(api, org, checks, t0, what):
    """Polls the tenants of `org` until each named check holds for all N of them. Returns
    the seconds from `t0` to the poll that first saw each check hold."""
    done = {}
    deadline = time.monotonic() + TIMEOUT
    last_log = 0.0
    while True:
        ts = tenants(api, org)
        now = time.monotonic()
        for name, check in checks.items():
            if name not in done and len(ts) == N and all(check(t) for t in ts):
                done[name] = now - t0
        if len(done) == len(checks):
            return done
        if now > deadline:
            bad = [t for t in ts if not all(c(t) for c in checks.values())][:5]
            raise RuntimeError(f"{what}: {len(ts)} tenants, not converged after {TIMEOUT:.0f} s; "
                               f"for example: {json.dumps(bad)[:3000]}")
        if now - last_log > 10:
            counts = {name: sum(1 for t in ts if c(t)) for name, c in checks.items()}
            log(f"  {what}: {now - t0:.1f} s, {counts} of {N}")
            last_log = now
        time.sleep(POLL)


def start_server(name, database_url):
    data = os.path.join(WORK, name)
    os.makedirs(data, exist_ok=True)
    env = dict(os.environ)
    # The store is chosen here, not by the caller's environment.
    for k in ("DATABASE_URL", "CELLPLANE__DATABASE_URL", "CELLPLANE_CONFIG"):
        env.pop(k, None)
    env.update({
        "CELLPLANE_ADMIN_TOKEN": TOKEN,
        "CELLPLANE__IAC__TEMPLATES_DIR": TEMPLATES,
        "CELLPLANE__IAC__SAMPLE_CELL_BIN": SAMPLE_CELL,
        # No drift checks of cells (terraform plans) during the measurement.
        "CELLPLANE__IAC__DRIFT_INTERVAL_SECS": "0",
        # The imperative path sends 2N requests on one token: no authoring rate limit.
        "CELLPLANE__RATE_LIMIT__AUTHORING_PER_SEC": "0",
        "RUST_LOG": env.get("RUST_LOG", "warn"),
    })
    args = [CELLPLANE, "serve", "--listen", "127.0.0.1:0", "--data-dir", data]
    if database_url:
        args += ["--database-url", database_url]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                            stderr=open(os.path.join(WORK, f"{name}.log"), "w"), env=env, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait()
        sys.exit(f"cellplane serve ({name}) did not start: {line!r}; see {WORK}/{name}.log")
    return proc, line.removeprefix("listening on "), data


def stop_server(proc, data):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stop_cells(data)


def stamp_cells(api):
    jobs = []
    for i in range(1, CELLS + 1):
        out = api.call("POST", "/v1/cells", {
            "cell_id": f"bench-pool-{i}", "region": REGION, "tier": "pooled", "template": "local",
            "capacity": {"tenants": CELL_CAPACITY, "units": CELL_CAPACITY}})
        jobs.append(out["job"]["job_id"])
    deadline = time.monotonic() + 600
    for j in jobs:
        while True:
            job = api.call("GET", f"/v1/jobs/{j}")
            if job["state"] == "succeeded":
                break
            if job["state"] in ("failed", "cancelled"):
                sys.exit(f"stamp job {j} ended {job['state']}: {job.get('error')}")
            if time.monotonic() > deadline:
                sys.exit(f"stamp job {j} did not end in 600 s")
            time.sleep(0.2)


def tenant_ids(prefix):
    return [f"{prefix}-{i:05d}" for i in range(1, N + 1)]


def manifest_body(org, ids):
    docs = [f"apiVersion: cellplane.dev/v1\nkind: Organization\nmetadata: {{name: {org}}}\n"
            f"spec: {{name: Bench manifests}}\n"]
    for t in ids:
        docs.append("apiVersion: cellplane.dev/v1\nkind: Tenant\n"
                    f"metadata: {{name: {t}}}\n"
                    f"spec: {{organization_id: {org}, profile: mt-standard, region: {REGION}, "
                    "state: active}\n")
    return "---\n".join(docs).encode()


def run_manifest(api):
    org = "bench-manifest"
    ids = tenant_ids("m")
    body = manifest_body(org, ids)
    log(f"manifest: {N} tenants, {len(body)} bytes of YAML")
    t0 = time.monotonic()
    plan = api.call("POST", "/v1/apply?dry_run=true", body, "application/yaml")
    plan_s = time.monotonic() - t0
    objects = plan["objects"]
    refused = [o for o in objects if o.get("refusal")]
    if len(objects) != N + 1 or refused or any(o["action"] != "create" for o in objects):
        sys.exit(f"unexpected plan: {len(objects)} objects, refused {json.dumps(refused[:3])}")
    log(f"  plan: {plan_s:.3f} s")
    t0 = time.monotonic()
    result = api.call("POST", "/v1/apply", body, "application/yaml")
    apply_s = time.monotonic() - t0
    not_applied = [o["name"] for o in result["objects"] if not o["applied"]]
    if not_applied:
        log(f"  warning: {len(not_applied)} object(s) answered applied=false "
            f"(e.g. {not_applied[:3]}); the tenants are counted below as stored")
    log(f"  apply: {apply_s:.3f} s")
    done = wait_for(api, org, {"ready": ready, "active": active}, t0, "manifest")
    log(f"  converged: active {done['active']:.1f} s, Ready {done['ready']:.1f} s")
    return {"plan": plan_s, "apply": apply_s, "ready": done["ready"], "active": done["active"]}


def run_imperative(api, prefix, concurrency):
    org = f"bench-{prefix}"
    api.call("POST", "/v1/organizations", {"organization_id": org, "name": f"Bench {prefix}"})
    ids = tenant_ids(prefix)
    log(f"imperative ({'sequential' if concurrency == 1 else f'{concurrency} concurrent'}): {N} tenants")

    def one(t):
        api.call("POST", "/v1/tenants", {"tenant_id": t, "organization_id": org,
                                         "profile": "mt-standard", "region": REGION})
        api.call("POST", f"/v1/tenants/{t}/activate")

    t0 = time.monotonic()
    if concurrency == 1:
        for t in ids:
            one(t)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, ids))
    requests_s = time.monotonic() - t0
    log(f"  {2 * N} requests sent: {requests_s:.1f} s")
    done = wait_for(api, org, {"active": active}, t0, prefix)
    log(f"  converged (active, no pending job): {done['active']:.1f} s")
    # Not measured: let the controller write every status before the next step.
    wait_for(api, org, {"ready": ready}, time.monotonic(), f"{prefix} (settling)")
    return {"requests": requests_s, "active": done["active"]}


def run_store(name, database_url):
    log(f"== {name}: starting cellplane serve")
    proc, base, data = start_server(name, database_url)
    try:
        api = Api(base, TOKEN)
        log(f"stamping {CELLS} pooled cells of {CELL_CAPACITY} tenants / {CELL_CAPACITY} units")
        t0 = time.monotonic()
        stamp_cells(api)
        log(f"  stamped in {time.monotonic() - t0:.1f} s")
        seq = run_imperative(api, "seq", 1)
        man = run_manifest(api)
        # The manifest's tenants settle before the next step (they are Ready already).
        conc = run_imperative(api, "par", CONCURRENCY)
        return {"store": name, "manifest": man, "sequential": seq, "concurrent": conc}
    finally:
        stop_server(proc, data)


def table(r):
    m, s, c = r["manifest"], r["sequential"], r["concurrent"]
    print(f"### {r['store']}: {N} tenants, {CELLS} pooled cells of {CELL_CAPACITY}, "
          f"{os.cpu_count()} CPUs\n")
    print("| measurement | seconds | manifest ÷ this | target |")
    print("| --- | ---: | ---: | --- |")
    print(f"| plan: `POST /v1/apply?dry_run=true`, 1 organization + {N} tenants | {m['plan']:.3f} | | "
          f"≤ 1 s: {'yes' if m['plan'] <= 1 else 'no'} |")
    print(f"| apply: `POST /v1/apply`, same body (stored; no job run yet) | {m['apply']:.3f} | | |")
    print(f"| converged (manifest): apply start → every tenant `Ready=True` | {m['ready']:.1f} | 1.00 | |")
    print(f"| manifest: apply start → every tenant `active`, no pending job | {m['active']:.1f} | | |")
    print(f"| converged (imperative, sequential; baseline): first request → every tenant `active`, "
          f"no pending job | {s['active']:.1f} | {m['ready'] / s['active']:.2f} | |")
    print(f"| converged (imperative, {CONCURRENCY} concurrent clients) | {c['active']:.1f} | "
          f"{m['ready'] / c['active']:.2f} | |")
    print()
    print(f"Imperative requests (create + activate, {2 * N}): sequential {s['requests']:.1f} s "
          f"({2 * N / s['requests']:.0f}/s), {CONCURRENCY} concurrent {c['requests']:.1f} s "
          f"({2 * N / c['requests']:.0f}/s).")
    print()


def main():
    results = [run_store("SQLite", None)]
    if PG_URL:
        results.append(run_store("PostgreSQL", PG_URL))
    for r in results:
        table(r)


if __name__ == "__main__":
    main()
