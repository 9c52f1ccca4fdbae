#!/usr/bin/env python3
"""Controller failover across two `cellplane serve` replicas on one PostgreSQL.

SIGKILLs the replica holding the drift controller's lease, measures the time until the
other replica reports holding it (its first reconcile runs as it takes the lease), restarts
the killed one, and repeats. Prints one JSON object: p50/p99 over the kills, and the lease
TTL they are judged against (target: failover <= TTL + 1 s).

  CELLPLANE_BIN=target/release/cellplane PG_URL=postgres://... python3 failover.py [KILLS]
"""
import json, os, signal, subprocess, sys, tempfile, time, urllib.request

BIN = os.environ["CELLPLANE_BIN"]
PG = os.environ["PG_URL"]
KILLS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
LEASE_MS = int(os.environ.get("LEASE_MS", "2000"))
RENEW_MS = int(os.environ.get("RENEW_MS", "200"))
TOKEN = "bench-failover-admin-token-0123456789abcdef"


def start(data_dir, port):
    env = dict(os.environ, CELLPLANE_ADMIN_TOKEN=TOKEN,
               CELLPLANE__JOBS__CONTROLLER_LEASE_MS=str(LEASE_MS),
               CELLPLANE__JOBS__CONTROLLER_RENEW_MS=str(RENEW_MS),
               RUST_LOG="warn")
    p = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data_dir,
                          "--database-url", PG], env=env, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(data_dir, "..", f"log-{port}"), "a"))
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            controllers(port)
            return p
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"replica on {port} did not start")


def controllers(port):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/controllers",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=2) as r:
        return json.load(r)["items"]


def holding(port):
    for c in controllers(port):
        if c["name"] == "drift" and c["this_replica"]:
            return c["term"]
    return None


def free_port():
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    return p


def main():
    root = tempfile.mkdtemp(prefix="cellplane-failover-")
    reps = []
    for i in range(2):
        d = os.path.join(root, f"r{i}", "data"); os.makedirs(d)
        port = free_port()
        reps.append({"dir": d, "port": port, "proc": start(d, port)})
    samples = []
    try:
        for _ in range(KILLS):
            # Wait for a holder.
            deadline = time.time() + 30
            leader = None
            while leader is None and time.time() < deadline:
                for i, r in enumerate(reps):
                    t = holding(r["port"])
                    if t is not None:
                        leader, term = i, t
                time.sleep(0.01)
            assert leader is not None, "no holder"
            other = reps[1 - leader]
            reps[leader]["proc"].send_signal(signal.SIGKILL)
            reps[leader]["proc"].wait()
            t0 = time.monotonic()
            while True:
                t = holding(other["port"])
                if t is not None and t > term:
                    break
                time.sleep(0.005)
            samples.append(time.monotonic() - t0)
            reps[leader]["proc"] = start(reps[leader]["dir"], reps[leader]["port"])
    finally:
        for r in reps:
            r["proc"].kill()
    samples.sort()
    pct = lambda p: samples[min(len(samples) - 1, round((len(samples) - 1) * p))]
    print(json.dumps({"scenario": "failover", "kills": len(samples), "lease_ms": LEASE_MS,
                      "renew_ms": RENEW_MS, "p50_ms": pct(0.5) * 1000, "p99_ms": pct(0.99) * 1000,
                      "max_ms": samples[-1] * 1000,
                      "target_ms": LEASE_MS + 1000}))


if __name__ == "__main__":
    main()
