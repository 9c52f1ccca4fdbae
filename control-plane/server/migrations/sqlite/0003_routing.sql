-- Routing table (SQLite flavour), its revision and bounded history, router heartbeats, region placement
-- policies, and the capacity an environment holds on its cell.
CREATE TABLE routes (
    tenant_id TEXT NOT NULL,
    env TEXT NOT NULL,
    cell_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    mode TEXT NOT NULL,
    rate_limit BIGINT,
    revision BIGINT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (tenant_id, env)
);
CREATE INDEX routes_cell ON routes(cell_id);

-- One row per change; rows at or below routing_revision.horizon are pruned, and a watcher
-- asking for changes since a pruned revision gets the full table instead.
CREATE TABLE route_history (
    revision BIGINT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    env TEXT NOT NULL,
    op TEXT NOT NULL,
    cell_id TEXT,
    mode TEXT,
    changed_at TEXT NOT NULL
);

-- The global revision: bumped with `UPDATE … RETURNING` in the transaction of the change,
-- which also orders concurrent route writers.
CREATE TABLE routing_revision (
    id BIGINT PRIMARY KEY,
    revision BIGINT NOT NULL,
    horizon BIGINT NOT NULL
);
INSERT INTO routing_revision (id, revision, horizon) VALUES (1, 0, 0);

CREATE TABLE routers (
    router_id TEXT PRIMARY KEY,
    applied_revision BIGINT NOT NULL,
    stats TEXT,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL
);

CREATE TABLE region_policies (
    region TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    version BIGINT NOT NULL,
    updated_at TEXT NOT NULL
);

ALTER TABLE environments ADD COLUMN reserved_units BIGINT NOT NULL DEFAULT 0;
