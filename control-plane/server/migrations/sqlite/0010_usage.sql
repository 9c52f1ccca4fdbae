-- Usage metering. Routers report counts per tenant environment and minute in batches; a
-- batch id is applied once (`usage_batches`), its counts added to the minute rollups
-- (`usage_minutes`, one row per meter). `exported` is how much of a row the hourly
-- `dev.cellplane.usage.v1` events have already reported, so counts that arrive late are
-- reported by a later event, never twice.
CREATE TABLE usage_batches (
    router_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (router_id, batch_id)
);
CREATE TABLE usage_minutes (
    tenant_id TEXT NOT NULL,
    env TEXT NOT NULL,
    meter TEXT NOT NULL,
    minute TEXT NOT NULL,
    amount BIGINT NOT NULL,
    exported BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, env, meter, minute)
);
CREATE INDEX usage_minute ON usage_minutes(minute);
