-- What routers report with each heartbeat about each cell (counters since the router
-- started: responses by status class, latency histogram). The control plane computes a
-- cell's traffic over a window from the newest sample and the one at the window's start,
-- per router (a counter that went down is a router restart). Rows older than
-- `routing.cell_sample_retention_secs` are pruned.
CREATE TABLE cell_samples (
    cell_id TEXT NOT NULL,
    router_id TEXT NOT NULL,
    at TEXT NOT NULL,
    codes TEXT NOT NULL,
    le TEXT NOT NULL,
    buckets TEXT NOT NULL,
    PRIMARY KEY (cell_id, router_id, at)
);
CREATE INDEX cell_samples_at ON cell_samples(at);
