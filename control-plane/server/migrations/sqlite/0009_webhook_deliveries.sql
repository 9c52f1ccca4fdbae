-- Webhook delivery. The dispatcher (a controller under a lease) reads the outbox after its
-- cursor and writes one delivery per matching subscription; each attempt is a row. A
-- subscription receives the events after the one that created it (`from_seq`); it is
-- disabled on 410 or after failing for too long, and probed until it answers again.
ALTER TABLE webhooks ADD COLUMN from_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE webhooks ADD COLUMN failing_since TEXT;
ALTER TABLE webhooks ADD COLUMN disabled_reason TEXT;
ALTER TABLE webhooks ADD COLUMN next_probe_at TEXT;
UPDATE webhooks SET from_seq = (SELECT seq FROM chain_head WHERE id = 1);

CREATE TABLE webhook_dispatch (
    id INTEGER PRIMARY KEY,
    last_seq BIGINT NOT NULL
);
INSERT INTO webhook_dispatch (id, last_seq) SELECT 1, seq FROM chain_head WHERE id = 1;

CREATE TABLE webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    schedule_pos BIGINT NOT NULL,
    attempt_count BIGINT NOT NULL,
    next_attempt_at TEXT,
    last_status BIGINT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (webhook_id, seq)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(next_attempt_at, seq) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_subject ON webhook_deliveries(webhook_id, subject, seq) WHERE state = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    started_at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status BIGINT,
    latency_ms BIGINT NOT NULL,
    error TEXT,
    next_attempt_at TEXT,
    PRIMARY KEY (delivery_id, attempt)
);
