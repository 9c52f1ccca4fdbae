#!/usr/bin/env python3
"""Stamping benchmark: cellplane's stamp of a `local` cell against bare terraform on the
same rendered stack, in the same run, and 20 cells stamped at concurrency 4.

Run through ./run.sh (it builds the binaries). Prints a markdown table with the ratios.
"""
import http.client
import json
import os
import threading
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CELLPLANE = os.environ["CELLPLANE_BIN"]
SAMPLE_CELL = os.environ["SAMPLE_CELL_BIN"]
TEMPLATES = os.environ["TEMPLATES_DIR"]
REPS = int(os.environ.get("REPS", "7"))
FLEET = int(os.environ.get("FLEET", "20"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "4"))
TOKEN = "bench-admin-token-0123456789"


_conns = threading.local()


def api(base, method, path, body=None):
    """One request on a kept-alive connection (polling must not load the machine)."""
    conn = getattr(_conns, "conn", None)
    if conn is None:
        host = base.removeprefix("http://")
        conn = _conns.conn = http.client.HTTPConnection(host, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        payload = r.read()
    except (http.client.HTTPException, OSError):
        _conns.conn = None
        raise
    if r.status >= 400:
        sys.exit(f"{method} {path}: {r.status} {payload.decode(errors='replace')}")
    return json.loads(payload or b"null")


def wait_jobs(base, ids, timeout=600):
    pending = set(ids)
    deadline = time.monotonic() + timeout
    while pending:
        for j in list(pending):
            job = api(base, "GET", f"/v1/jobs/{j}")
            if job["state"] in ("succeeded", "failed", "cancelled"):
                if job["state"] != "succeeded":
                    log = urllib.request.Request(base + f"/v1/jobs/{j}/log")
                    log.add_header("Authorization", f"Bearer {TOKEN}")
                    sys.exit(f"job {j} ended {job['state']}: {job.get('error')}\n"
                             + urllib.request.urlopen(log).read().decode())
                pending.discard(j)
        if time.monotonic() > deadline:
            sys.exit(f"jobs {pending} did not finish")
        time.sleep(0.01)


def wait_job_events(base, job_id):
    """Follows the job's server-sent events until its `end` event (no polling delay)."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=600)
    conn.request("GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {TOKEN}"})
    r = conn.getresponse()
    event = None
    while True:
        line = r.fp.readline()
        if not line:
            sys.exit(f"event stream of {job_id} ended early")
        line = line.decode().rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "end":
            job = json.loads(line[5:].strip())
            conn.close()
            if job["state"] != "succeeded":
                sys.exit(f"job {job_id} ended {job['state']}: {job.get('error')}")
            return


def cell_body(cell_id):
    return {"cell_id": cell_id, "region": "eu-west-1", "tier": "pooled", "template": "local",
            "capacity": {"tenants": 10, "units": 10}}


def start_cellplane(work, extra_env):
    env = dict(os.environ)
    env.update({
        "CELLPLANE_ADMIN_TOKEN": TOKEN,
        "CELLPLANE__IAC__TEMPLATES_DIR": TEMPLATES,
        "CELLPLANE__IAC__SAMPLE_CELL_BIN": SAMPLE_CELL,
        "CELLPLANE__IAC__DRIFT_INTERVAL_SECS": "0",
        "CELLPLANE__RATE_LIMIT__AUTHORING_PER_SEC": "0",
        "CELLPLANE__JOBS__POLL_MS": "50",
        "RUST_LOG": "warn",
    })
    env.update(extra_env)
    proc = subprocess.Popen(
        [CELLPLANE, "serve", "--listen", "127.0.0.1:0", "--data-dir", os.path.join(work, "data")],
        stdout=subprocess.PIPE, stderr=open(os.path.join(work, "cellplane.log"), "w"), env=env, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        sys.exit(f"cellplane did not start: {line}")
    return proc, line.removeprefix("listening on ")


def stamp_once(base, cell_id):
    t0 = time.monotonic()
    out = api(base, "POST", "/v1/cells", cell_body(cell_id))
    wait_job_events(base, out["job"]["job_id"])
    return time.monotonic() - t0


def destroy(base, cell_id):
    out = api(base, "DELETE", f"/v1/cells/{cell_id}")
    wait_jobs(base, [out["job"]["job_id"]])


def tf_env(work):
    rc = os.path.join(work, "terraform.rc")
    with open(rc, "w") as f:
        f.write("disable_checkpoint = true\n")
    return {"PATH": os.environ["PATH"], "HOME": work, "TF_IN_AUTOMATION": "1", "TF_INPUT": "0",
            "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": rc}


def bare_render(work, name):
    d = os.path.join(work, name)
    subprocess.run([CELLPLANE, "template", "render", "local", "--cell-id", name,
                    "--out", d, "--templates-dir", TEMPLATES, "--sample-cell-bin", SAMPLE_CELL],
                   check=True, stdout=subprocess.DEVNULL)
    return d


def bare_apply(work, d):
    env = tf_env(work)
    for cmd in (["terraform", "init", "-input=false"],
                ["terraform", "plan", "-input=false", "-out=tfplan"],
                ["terraform", "apply", "-input=false", "tfplan"]):
        subprocess.run(cmd, cwd=d, env=env, check=True, stdout=subprocess.DEVNULL)


def bare_destroy(work, d):
    subprocess.run(["terraform", "apply", "-destroy", "-auto-approve", "-input=false"], cwd=d,
                   env=tf_env(work), check=True, stdout=subprocess.DEVNULL)


def bare_once(work, i):
    d = bare_render(work, f"bare-{i}")
    t0 = time.monotonic()
    bare_apply(work, d)
    elapsed = time.monotonic() - t0
    bare_destroy(work, d)
    return elapsed


def bare_fleet(work):
    """The same number of bare stacks, CONCURRENCY at a time: what the machine allows."""
    from concurrent.futures import ThreadPoolExecutor
    dirs = [bare_render(work, f"bare-fleet-{i}") for i in range(FLEET)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda d: bare_apply(work, d), dirs))
    elapsed = time.monotonic() - t0
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda d: bare_destroy(work, d), dirs))
    return elapsed


def main():
    work = tempfile.mkdtemp(prefix="cellplane-bench-")
    proc, base = start_cellplane(work, {"CELLPLANE__IAC__CONCURRENCY": str(CONCURRENCY),
                                        "CELLPLANE__JOBS__WORKERS": str(CONCURRENCY)})
    try:
        # Warm-up (page cache, first terraform start), not measured.
        stamp_once(base, "warm-0")
        destroy(base, "warm-0")
        bare_once(work, 0)
        cp, bare = [], []
        for i in range(1, REPS + 1):
            # Interleaved so that both see the same machine load.
            cp.append(stamp_once(base, f"single-{i}"))
            destroy(base, f"single-{i}")
            bare.append(bare_once(work, i))
        single_cp = statistics.median(cp)
        single_bare = statistics.median(bare)

        ids = [f"fleet-{i}" for i in range(FLEET)]
        t0 = time.monotonic()
        jobs = [api(base, "POST", "/v1/cells", cell_body(c))["job"]["job_id"] for c in ids]
        wait_jobs(base, jobs)
        fleet = time.monotonic() - t0
        ideal = FLEET * single_cp / CONCURRENCY
        jobs = [api(base, "DELETE", f"/v1/cells/{c}")["job"]["job_id"] for c in ids]
        wait_jobs(base, jobs)
        fleet_bare = bare_fleet(work)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reap(work)
        shutil.rmtree(work, ignore_errors=True)

    cpu = os.cpu_count()
    print(f"## Stamping a `local` cell ({REPS} runs each, median; {cpu} CPUs; "
          f"terraform {terraform_version()})\n")
    print("| measurement | seconds | ratio | target |")
    print("| --- | ---: | ---: | --- |")
    print(f"| bare `terraform init && plan -out && apply` of the rendered stack | {single_bare:.3f} | 1.00 | |")
    print(f"| cellplane stamp (POST /v1/cells → job succeeded) | {single_cp:.3f} | "
          f"{single_cp / single_bare:.2f} | ≤ 1.10 |")
    print(f"| {FLEET} cells at concurrency {CONCURRENCY}: wall time | {fleet:.3f} | "
          f"{fleet / ideal:.2f} | vs {FLEET} × single ÷ {CONCURRENCY} = {ideal:.3f} s |")
    print(f"| bare terraform, {FLEET} stacks {CONCURRENCY} at a time: wall time | {fleet_bare:.3f} | "
          f"{fleet_bare / ideal:.2f} | same ideal; cellplane's fleet ÷ bare fleet = "
          f"{fleet / fleet_bare:.2f} |")
    bound = FLEET * single_cp / min(CONCURRENCY, cpu)
    print(f"| {FLEET} cells: same wall time vs the CPU bound | {fleet:.3f} | "
          f"{fleet / bound:.2f} | vs {FLEET} × single ÷ min({CONCURRENCY}, {cpu} CPUs) = {bound:.3f} s |")
    print()
    print(f"cellplane runs: {', '.join(f'{x:.3f}' for x in cp)}")
    print(f"bare runs:      {', '.join(f'{x:.3f}' for x in bare)}")


def reap(work):
    """Stops every process a failed run left under its work dir (cells' sample-cells)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if work in cmdline:
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass


def terraform_version():
    out = subprocess.run(["terraform", "version", "-json"], capture_output=True, text=True)
    try:
        return json.loads(out.stdout)["terraform_version"]
    except (ValueError, KeyError):
        return "?"


if __name__ == "__main__":
    main()
