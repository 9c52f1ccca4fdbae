#!/usr/bin/env python3
"""Release halt benchmark: how long a bad canary serves before the release halts it, and
until it is back on the old version. Run through ./run.sh (it builds the binaries).

One `cellplane serve` (SQLite) with three `local` cells (`canary-1` labelled canary=true,
`pool-1`, `pool-2`, at app version v1), a tenant on each, a real `cellplane-router`
(heartbeats every second) and steady traffic on every tenant (THREADS loops each). Then
RUNS times: a release whose vars set the sample-cell `fault_rate` to 0.2 (waves canary →
pooled; gates every INTERVAL s over a WINDOW s window, error ratio ≤ 0.05), until it is
rolled back. Per run, from the release's own record and the jobs:

- applied: the canary's apply job finished (the bad version serves);
- halt: the gate decision that failed it (`decisions[].at`);
- rolled back: the canary's revert job finished.

Baselines measured in the same runs: the target, two evaluation intervals, for the halt;
and the revert job itself (one `cell.apply`: the least a rollback can take) for the time
from the halt to rollback complete. Prints a markdown table; progress goes to stderr.

Environment: CELLPLANE_BIN, ROUTER_BIN, SAMPLE_CELL_BIN, TEMPLATES_DIR, WORK, RUNS (10),
INTERVAL (5), WINDOW (10), SETTLE (3), THREADS (4).
"""
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from cellplane_bench import Api, log, stop_cells  # noqa: E402

CELLPLANE = os.environ["CELLPLANE_BIN"]
ROUTER = os.environ["ROUTER_BIN"]
SAMPLE_CELL = os.environ["SAMPLE_CELL_BIN"]
TEMPLATES = os.environ["TEMPLATES_DIR"]
WORK = os.environ["WORK"]
RUNS = int(os.environ.get("RUNS", "10"))
INTERVAL = int(os.environ.get("INTERVAL", "5"))
WINDOW = int(os.environ.get("WINDOW", "10"))
SETTLE = int(os.environ.get("SETTLE", "3"))
THREADS = int(os.environ.get("THREADS", "4"))
TOKEN = "bench-rollout-admin-token-0123456789"
CELLS = ["canary-1", "pool-1", "pool-2"]
TENANTS = ["t-canary", "t-one", "t-two"]


def parse_time(s):
    # RFC 3339 with microseconds and Z, as the control plane writes it.
    from datetime import datetime, timezone
    return datetime.strptime(s.rstrip("Z")[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(
        tzinfo=timezone.utc).timestamp()


def start(args, env, name):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                            stderr=open(os.path.join(WORK, f"{name}.log"), "w"), env=env, text=True)
    lines = [proc.stdout.readline().strip()]
    if name == "router":
        lines.append(proc.stdout.readline().strip())
    if not lines[0].startswith("listening on "):
        proc.kill()
        sys.exit(f"{name} did not start: {lines!r}; see {WORK}/{name}.log")
    return proc, lines[0].removeprefix("listening on ")


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def traffic(router_url, tenant, stop_flag, counts):
    host = router_url.removeprefix("http://")
    conn = None
    while not stop_flag.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, timeout=10)
            conn.request("GET", "/v1/kv/probe", headers={"Host": f"{tenant}.localhost"})
            r = conn.getresponse()
            r.read()
            counts[r.status // 100] = counts.get(r.status // 100, 0) + 1
        except (http.client.HTTPException, OSError):
            conn = None
        time.sleep(0.02)


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, max(0, round((len(v) - 1) * p)))]


def main():
    data = os.path.join(WORK, "cp")
    os.makedirs(data, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLPLANE__")}
    env.pop("DATABASE_URL", None)
    env.update({
        "CELLPLANE_ADMIN_TOKEN": TOKEN,
        "CELLPLANE__IAC__TEMPLATES_DIR": TEMPLATES,
        "CELLPLANE__IAC__SAMPLE_CELL_BIN": SAMPLE_CELL,
        "CELLPLANE__IAC__DRIFT_INTERVAL_SECS": "0",
        "CELLPLANE__RATE_LIMIT__AUTHORING_PER_SEC": "0",
        # One-second slots: a WINDOW-second window holds whole slots.
        "CELLPLANE__ROUTING__CELL_SLOT_SECS": "1",
        "RUST_LOG": env.get("RUST_LOG", "warn"),
    })
    cp, url = start([CELLPLANE, "serve", "--listen", "127.0.0.1:0", "--data-dir", data], env, "cellplane")
    router = None
    stop_flag = threading.Event()
    try:
        api = Api(url, TOKEN, timeout=120)
        api.call("POST", "/v1/organizations", {"organization_id": "bench", "name": "Bench"})
        jobs = []
        for c in CELLS:
            labels = {"canary": "true"} if c == "canary-1" else {}
            out = api.call("POST", "/v1/cells", {
                "cell_id": c, "region": "eu-west-1", "tier": "pooled", "template": "local",
                "capacity": {"tenants": 5, "units": 5}, "labels": labels, "app_version": "v1"})
            jobs.append(out["job"]["job_id"])
        for j in jobs:
            api.wait_job(j)
        for t, c in zip(TENANTS, CELLS):
            api.call("POST", "/v1/tenants", {"tenant_id": t, "organization_id": "bench",
                                             "profile": "mt-standard", "region": "eu-west-1"})
            out = api.call("POST", f"/v1/tenants/{t}/activate")
            api.wait_job(out["job_id"])
            got = api.call("GET", f"/v1/tenants/{t}")
            assert got["environments"][0]["cell_id"] == c, got
        token = api.call("POST", "/v1/tokens", {"role": "router"})["token"]
        renv = dict(env, CELLPLANE_TOKEN=token)
        router, rurl = start([ROUTER, "--control-plane", url, "--listen", "127.0.0.1:0",
                              "--admin-listen", "127.0.0.1:0", "--state-file",
                              os.path.join(WORK, "router-state.json"), "--base-domain", "localhost",
                              "--heartbeat-secs", "1"], renv, "router")
        # A key on each tenant's cell, so the traffic reads it (200s).
        host = rurl.removeprefix("http://")
        for t in TENANTS:
            c = http.client.HTTPConnection(host, timeout=10)
            c.request("PUT", "/v1/kv/probe", body=b"v", headers={"Host": f"{t}.localhost"})
            c.getresponse().read()
            c.close()
        counts = {}
        threads = [threading.Thread(target=traffic, args=(rurl, t, stop_flag, counts), daemon=True)
                   for t in TENANTS for _ in range(THREADS)]
        for th in threads:
            th.start()
        time.sleep(3)  # warm-up traffic before the first release (not a measurement)
        rows = []
        for i in range(1, RUNS + 1):
            rid = f"rel-bad-{i}"
            api.call("POST", "/v1/releases", {
                "release_id": rid, "app_version": f"bad-{i}", "vars": {"fault_rate": 0.2},
                "waves": [
                    {"name": "canary", "selector": {"labels": {"canary": "true"}}, "bake_seconds": 600},
                    {"name": "pooled", "selector": {"tier": "pooled"}, "max_parallel": 2}],
                "gates": {"interval_secs": INTERVAL, "settle_secs": SETTLE, "window_secs": WINDOW,
                          "min_requests": 20, "max_error_ratio": 0.05}})
            deadline = time.monotonic() + 300
            while True:
                r = api.call("GET", f"/v1/releases/{rid}")
                if r["state"] not in ("running", "rolling_back"):
                    break
                if time.monotonic() > deadline:
                    sys.exit(f"{rid} did not end: {json.dumps(r)[:2000]}")
                time.sleep(0.2)
            if r["state"] != "rolled_back":
                sys.exit(f"{rid} ended {r['state']}: {r.get('reason')}")
            cell = r["waves"][0]["cells"][0]
            failed = next(d for d in r["decisions"] if d["result"] == "failure")
            evals = [d for d in r["decisions"] if d["gate"] == "error_ratio"]
            audit = api.call("GET", "/v1/audit?" + urllib.parse.urlencode(
                {"target": f"release/{rid}", "limit": "1000"}))["items"]
            wave_jobs = [a["payload"] for a in audit if a["event_type"] == "RELEASE_ROLLED_BACK"]
            # The canary's jobs for this release: the apply, then the revert (newest).
            cjobs = api.call("GET", "/v1/jobs?" + urllib.parse.urlencode(
                {"target": "cell/canary-1", "limit": "1000"}))["items"]
            apply_, revert = cjobs[-2], cjobs[-1]
            assert revert["job_id"] == cell["job_id"], (revert, cell)
            applied = parse_time(apply_["finished_at"])
            halt = parse_time(failed["at"])
            reverted = parse_time(revert["finished_at"])
            revert_job = reverted - parse_time(revert["started_at"])
            rows.append({"halt": halt - applied, "rollback": reverted - applied,
                         "halt_to_rollback": reverted - halt, "revert_job": revert_job,
                         "evaluations": evals.index(failed) + 1 if failed in evals else None,
                         "error_ratio": failed["measurements"].get("error_ratio")})
            assert cell["state"] == "reverted", cell
            assert wave_jobs, audit
            log(f"run {i}: halt {rows[-1]['halt']:.2f} s after the canary was applied "
                f"(evaluation {rows[-1]['evaluations']}, error ratio {rows[-1]['error_ratio']:.3f}), "
                f"rolled back {rows[-1]['rollback']:.2f} s after")
        stop_flag.set()
        target = 2 * INTERVAL
        halt50 = pct([r["halt"] for r in rows], 0.5)
        roll50 = pct([r["rollback"] for r in rows], 0.5)
        h2r50 = pct([r["halt_to_rollback"] for r in rows], 0.5)
        rev50 = pct([r["revert_job"] for r in rows], 0.5)
        print(f"\n{RUNS} runs, interval {INTERVAL} s, settle {SETTLE} s, window {WINDOW} s, "
              f"fault_rate 0.2, traffic {THREADS} loops per tenant (responses by class: {counts})\n")
        print("| measure | p50 | max | baseline | ratio |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| bad canary applied → halt decision | {halt50:.2f} s | "
              f"{max(r['halt'] for r in rows):.2f} s | target: 2 intervals = {target} s | "
              f"{halt50 / target:.2f} |")
        print(f"| halt decision → rollback complete | {h2r50:.2f} s | "
              f"{max(r['halt_to_rollback'] for r in rows):.2f} s | the revert job alone: {rev50:.2f} s | "
              f"{h2r50 / rev50:.2f} |")
        print(f"| bad canary applied → rollback complete | {roll50:.2f} s | "
              f"{max(r['rollback'] for r in rows):.2f} s | 2 intervals + the revert job: "
              f"{target + rev50:.2f} s | {roll50 / (target + rev50):.2f} |")
        print(f"| evaluations until the halt | {statistics.median([r['evaluations'] for r in rows]):.0f} | "
              f"{max(r['evaluations'] for r in rows)} | target: ≤ 2 | |")
    finally:
        stop_flag.set()
        stop(router)
        stop(cp)
        stop_cells(data)


if __name__ == "__main__":
    main()
