-- cellplane registry schema, PostgreSQL flavour. JSON documents and timestamps are TEXT
-- (RFC 3339 UTC, fixed width, so they sort), integers are BIGINT, booleans are 0/1.
CREATE TABLE organizations (
    organization_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE tenants (
    tenant_id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(organization_id),
    profile TEXT NOT NULL,
    state TEXT NOT NULL,
    region TEXT NOT NULL,
    quotas TEXT NOT NULL,
    policies TEXT NOT NULL,
    billing TEXT NOT NULL,
    placement TEXT,
    pending_job_id TEXT,
    archived_at TEXT,
    version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX tenants_org ON tenants(organization_id);
CREATE INDEX tenants_state ON tenants(state);

CREATE TABLE environments (
    tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
    name TEXT NOT NULL,
    region TEXT NOT NULL,
    isolation_level TEXT NOT NULL,
    cell_id TEXT,
    endpoint TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);
CREATE INDEX environments_cell ON environments(cell_id);

CREATE TABLE cells (
    cell_id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    tier TEXT NOT NULL,
    template TEXT NOT NULL,
    capacity_tenants BIGINT NOT NULL,
    capacity_units BIGINT NOT NULL,
    used_tenants BIGINT NOT NULL DEFAULT 0,
    used_units BIGINT NOT NULL DEFAULT 0,
    labels TEXT NOT NULL,
    vars TEXT NOT NULL,
    state TEXT NOT NULL,
    outputs TEXT NOT NULL,
    app_version TEXT,
    drift TEXT,
    pending_job_id TEXT,
    version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX cells_region ON cells(region, tier, state);

CREATE TABLE chain_head (
    id BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO chain_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE tenant_audit (
    seq BIGINT PRIMARY KEY,
    audit_id TEXT NOT NULL UNIQUE,
    tenant_id TEXT,
    event_type TEXT NOT NULL,
    actor TEXT NOT NULL,
    target TEXT NOT NULL,
    payload TEXT NOT NULL,
    correlation_id TEXT,
    occurred_at TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX tenant_audit_tenant ON tenant_audit(tenant_id, seq);
CREATE INDEX tenant_audit_target ON tenant_audit(target, seq);

CREATE TABLE outbox (
    seq BIGINT PRIMARY KEY,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    tenant_id TEXT,
    payload TEXT NOT NULL,
    correlation_id TEXT,
    created_at TEXT NOT NULL,
    delivered_at TEXT
);

CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    payload TEXT NOT NULL,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    step_index BIGINT NOT NULL DEFAULT 0,
    step TEXT,
    attempts BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    error TEXT,
    log TEXT NOT NULL DEFAULT '',
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at TEXT,
    run_after TEXT NOT NULL,
    correlation_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);
CREATE INDEX jobs_claim ON jobs(state, run_after);
CREATE INDEX jobs_target ON jobs(target, state);
CREATE UNIQUE INDEX jobs_one_running_per_target ON jobs(target) WHERE state = 'running';

CREATE TABLE tenant_webhooks (
    webhook_id TEXT PRIMARY KEY,
    tenant_id TEXT REFERENCES tenants(tenant_id),
    url TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    event_types TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE api_tokens (
    token_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    tenant_id TEXT,
    description TEXT,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

CREATE TABLE idempotency_keys (
    principal TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status BIGINT NOT NULL,
    body TEXT NOT NULL,
    etag TEXT,
    location TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (principal, idem_key)
);

CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

-- Appending audit records moves the chain head and queues their outbox events in the same
-- statement, so a write pays one round trip for its audit trail. Statement-level with a
-- transition table: one head update per statement, however many records it inserts.
CREATE FUNCTION cellplane_audit_after_insert() RETURNS trigger AS $$
BEGIN
    UPDATE chain_head SET hash = (SELECT n.hash FROM new_audit n ORDER BY n.seq DESC LIMIT 1)
    WHERE id = 1;
    INSERT INTO outbox (seq, event_id, event_type, tenant_id, payload, correlation_id, created_at)
    SELECT n.seq, n.audit_id, n.event_type, n.tenant_id, n.payload, n.correlation_id, n.occurred_at
    FROM new_audit n
    ON CONFLICT (seq) DO NOTHING;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER tenant_audit_after_insert AFTER INSERT ON tenant_audit
    REFERENCING NEW TABLE AS new_audit
    FOR EACH STATEMENT EXECUTE FUNCTION cellplane_audit_after_insert();
