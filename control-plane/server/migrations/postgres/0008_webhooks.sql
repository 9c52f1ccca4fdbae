-- Webhook subscriptions. The secret signs deliveries (HMAC), so it is kept encrypted under
-- the configured key (`webhooks.secret_key`), never hashed; after a rotation the previous
-- one also signs until `previous_secret_until`. The unused table of the first schema goes.
DROP TABLE tenant_webhooks;
CREATE TABLE webhooks (
    webhook_id TEXT PRIMARY KEY,
    tenant_id TEXT,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    ordering TEXT NOT NULL,
    state TEXT NOT NULL,
    description TEXT,
    secret_enc TEXT NOT NULL,
    previous_secret_enc TEXT,
    previous_secret_until TEXT,
    version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX webhooks_tenant ON webhooks(tenant_id, webhook_id);
