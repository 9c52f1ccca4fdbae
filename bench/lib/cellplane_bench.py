"""Helpers the Python benchmarks share: progress lines, an API client with one kept-alive
connection per thread, waiting for a job, and stopping the sample-cell processes a run's
`local` cells left behind."""
import http.client
import json
import os
import signal
import sys
import threading
import time


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Api:
    """Requests with `token` on one kept-alive connection per thread (polling must not load
    the machine with connection setup)."""

    def __init__(self, base, token, timeout=600):
        self.host = base.removeprefix("http://")
        self.token = token
        self.timeout = timeout
        self.local = threading.local()

    def call(self, method, path, body=None, content_type="application/json", ok=(200, 201, 202)):
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        for attempt in (1, 2):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(self.host, timeout=self.timeout)
            try:
                conn.request(method, path, body=data, headers=headers)
                r = conn.getresponse()
                payload = r.read()
                break
            except (http.client.HTTPException, OSError):
                self.local.conn = None
                conn.close()
                if attempt == 2:
                    raise
        if r.status not in ok:
            raise RuntimeError(f"{method} {path}: {r.status} {payload.decode(errors='replace')[:2000]}")
        return json.loads(payload or b"null")

    def wait_job(self, job_id, timeout=600):
        """Polls a job until it succeeds; exits the benchmark when it fails or takes too long."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.call("GET", f"/v1/jobs/{job_id}")
            if job["state"] == "succeeded":
                return job
            if job["state"] in ("failed", "cancelled"):
                sys.exit(f"job {job_id} ended {job['state']}: {job.get('error')}")
            if time.monotonic() > deadline:
                sys.exit(f"job {job_id} did not end in {timeout} s")
            time.sleep(0.2)


def stop_cells(data):
    """Stops the sample-cell processes of this run's cells, by the pid files the `local`
    template writes into each cell's directory (cells outlive the control plane)."""
    pids = []
    for root, _, files in os.walk(data):
        if "sample-cell.pid" in files:
            try:
                pid = int(open(os.path.join(root, "sample-cell.pid")).read().strip())
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except (OSError, ValueError):
                continue
            if "sample-cell" in cmdline and data in cmdline:
                pids.append(pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            try:
                if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
