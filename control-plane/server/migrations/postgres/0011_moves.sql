-- Tenant moves. One row per move of a tenant environment between cells: the public view of
-- the `tenant.move` job (its step, what was copied, the hold's duration, the evidence), and
-- the capacity it holds: `target_reserved` while the target's reservation belongs to the
-- move (from `reserve` to the flip or the rollback), `source_held` while the source's
-- capacity is still counted after the flip (until the purge). At most one running move
-- per tenant environment (`moves_running`).
CREATE TABLE moves (
    move_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    env TEXT NOT NULL,
    source_cell_id TEXT NOT NULL,
    target_cell_id TEXT NOT NULL,
    dedicated BIGINT NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    step TEXT NOT NULL,
    job_id TEXT NOT NULL,
    units BIGINT NOT NULL,
    target_reserved BIGINT NOT NULL DEFAULT 0,
    source_held BIGINT NOT NULL DEFAULT 0,
    flipped BIGINT NOT NULL DEFAULT 0,
    rows_copied BIGINT NOT NULL DEFAULT 0,
    bytes_copied BIGINT NOT NULL DEFAULT 0,
    delta_rounds BIGINT NOT NULL DEFAULT 0,
    current_delta BIGINT,
    hold_ms BIGINT,
    error TEXT,
    evidence TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX moves_tenant ON moves(tenant_id, created_at);
CREATE INDEX moves_state ON moves(state, created_at);
CREATE UNIQUE INDEX moves_running ON moves(tenant_id, env) WHERE state = 'running';

-- What a router last reported as drained (no request in flight on a held route).
ALTER TABLE routers ADD COLUMN drained_revision BIGINT NOT NULL DEFAULT 0;
