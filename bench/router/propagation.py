#!/usr/bin/env python3
"""Route-update propagation: time from sending an API write (PATCH /v1/routes/{t}/prod,
serve -> hold and back) to the first request through the router that reflects it. The
router runs with --hold-timeout-ms 1, so a held route answers 503 at once.
Usage: propagation.py CONTROL_PLANE ADMIN_TOKEN ROUTER UPDATES"""
import http.client, json, sys, time, urllib.parse

cp, token, router, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cpu = urllib.parse.urlparse(cp)
ru = urllib.parse.urlparse(router)
api = http.client.HTTPConnection(cpu.hostname, cpu.port, timeout=10)
probe = http.client.HTTPConnection(ru.hostname, ru.port, timeout=10)

def patch(tenant, mode):
    api.request("PATCH", f"/v1/routes/{tenant}/prod", body=json.dumps({"mode": mode}),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    r = api.getresponse(); r.read()
    assert r.status == 200, r.status

def status(tenant):
    probe.request("GET", "/v1/kv/x", headers={"Host": f"{tenant}.localhost"})
    r = probe.getresponse(); r.read()
    return r.status

samples = []
for i in range(n):
    tenant = f"t{i % 10}"
    mode, want = ("hold", 503) if i % 2 == 0 else ("serve", 200)
    if i % 2 == 1:
        tenant = f"t{(i - 1) % 10}"
    t0 = time.perf_counter()
    patch(tenant, mode)
    deadline = t0 + 5
    while status(tenant) != want:
        if time.perf_counter() > deadline:
            raise SystemExit(f"update {i} not visible after 5 s")
    samples.append((time.perf_counter() - t0) * 1000)
samples.sort()
pick = lambda q: samples[min(len(samples) - 1, int(len(samples) * q))]
print(json.dumps({"metric": "propagation_ms", "updates": n, "p50": round(pick(0.5), 2),
                  "p99": round(pick(0.99), 2), "max": round(samples[-1], 2)}))
