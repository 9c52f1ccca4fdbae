-- Each cell's traffic per time slot, summed over routers as their heartbeats arrive: a
-- heartbeat's counters minus the router's previous ones (a counter that went down is a
-- router restart) are added to the slot in which that interval started
-- (`routing.cell_slot_secs`). A window of a cell's traffic is the sum of the slots that
-- start inside it: one grouped query for any number of cells, and rows that grow with
-- cells and the window, not with routers. `b00`..`b19` are the cumulative latency counts
-- at the bounds in `le` (JSON; at most 20 bounds); `total` is the +Inf bucket; `reports`
-- counts the router intervals added. Slots older than `routing.cell_sample_retention_secs`
-- are pruned.
CREATE TABLE cell_slots (
    cell_id TEXT NOT NULL,
    slot BIGINT NOT NULL,
    le TEXT NOT NULL,
    reports BIGINT NOT NULL,
    total BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    b00 BIGINT NOT NULL DEFAULT 0,
    b01 BIGINT NOT NULL DEFAULT 0,
    b02 BIGINT NOT NULL DEFAULT 0,
    b03 BIGINT NOT NULL DEFAULT 0,
    b04 BIGINT NOT NULL DEFAULT 0,
    b05 BIGINT NOT NULL DEFAULT 0,
    b06 BIGINT NOT NULL DEFAULT 0,
    b07 BIGINT NOT NULL DEFAULT 0,
    b08 BIGINT NOT NULL DEFAULT 0,
    b09 BIGINT NOT NULL DEFAULT 0,
    b10 BIGINT NOT NULL DEFAULT 0,
    b11 BIGINT NOT NULL DEFAULT 0,
    b12 BIGINT NOT NULL DEFAULT 0,
    b13 BIGINT NOT NULL DEFAULT 0,
    b14 BIGINT NOT NULL DEFAULT 0,
    b15 BIGINT NOT NULL DEFAULT 0,
    b16 BIGINT NOT NULL DEFAULT 0,
    b17 BIGINT NOT NULL DEFAULT 0,
    b18 BIGINT NOT NULL DEFAULT 0,
    b19 BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (cell_id, slot, le)
);
CREATE INDEX cell_slots_slot ON cell_slots(slot);
-- `cell_samples` now keeps only each router's newest heartbeat (the next one subtracts
-- it); a heartbeat reads it by router.
CREATE INDEX cell_samples_router ON cell_samples(router_id, at);
