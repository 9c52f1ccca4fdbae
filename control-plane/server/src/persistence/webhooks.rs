//! Webhook subscriptions. Secrets arrive here already encrypted (`secret_enc`): this module
//! never sees a plaintext secret.

use super::{Result, Store, WriteTx};
use sqlx::Row;

#[derive(Debug, Clone, PartialEq)]
pub struct WebhookRow {
    pub webhook_id: String,
    pub tenant_id: Option<String>,
    pub url: String,
    /// Event type names, or `["*"]`.
    pub events: Vec<String>,
    pub ordering: String,
    pub state: String,
    pub description: Option<String>,
    pub secret_enc: String,
    pub previous_secret_enc: Option<String>,
    pub previous_secret_until: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    /// The audit sequence number of its creation: it receives the events after it.
    pub from_seq: i64,
    /// Since when its deliveries fail (none while they succeed).
    pub failing_since: Option<String>,
    /// Why it was disabled: `gone` (410), `failing` (failed too long), `manual`.
    pub disabled_reason: Option<String>,
    /// When a subscription disabled for failing is probed next.
    pub next_probe_at: Option<String>,
}

pub(super) fn webhook_from_row(row: &sqlx::any::AnyRow) -> Result<WebhookRow> {
    let events: String = row.try_get("events")?;
    Ok(WebhookRow {
        webhook_id: row.try_get("webhook_id")?,
        tenant_id: row.try_get("tenant_id")?,
        url: row.try_get("url")?,
        events: serde_json::from_str(&events)
            .map_err(|e| super::StoreError::Corrupt(format!("webhook events: {e}")))?,
        ordering: row.try_get("ordering")?,
        state: row.try_get("state")?,
        description: row.try_get("description")?,
        secret_enc: row.try_get("secret_enc")?,
        previous_secret_enc: row.try_get("previous_secret_enc")?,
        previous_secret_until: row.try_get("previous_secret_until")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        from_seq: row.try_get("from_seq")?,
        failing_since: row.try_get("failing_since")?,
        disabled_reason: row.try_get("disabled_reason")?,
        next_probe_at: row.try_get("next_probe_at")?,
    })
}

impl WriteTx {
    pub async fn insert_webhook(&mut self, w: &WebhookRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO webhooks (webhook_id, tenant_id, url, events, ordering, state, description, \
             secret_enc, previous_secret_enc, previous_secret_until, version, created_at, updated_at, \
             from_seq, failing_since, disabled_reason, next_probe_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)",
        )
        .bind(&w.webhook_id)
        .bind(w.tenant_id.as_deref())
        .bind(&w.url)
        .bind(serde_json::to_string(&w.events).expect("strings serialize"))
        .bind(&w.ordering)
        .bind(&w.state)
        .bind(w.description.as_deref())
        .bind(&w.secret_enc)
        .bind(w.previous_secret_enc.as_deref())
        .bind(w.previous_secret_until.as_deref())
        .bind(w.version)
        .bind(&w.created_at)
        .bind(&w.updated_at)
        .bind(w.from_seq)
        .bind(w.failing_since.as_deref())
        .bind(w.disabled_reason.as_deref())
        .bind(w.next_probe_at.as_deref())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn get_webhook_tx(&mut self, id: &str) -> Result<Option<WebhookRow>> {
        let row = sqlx::query("SELECT * FROM webhooks WHERE webhook_id = $1")
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(webhook_from_row).transpose()
    }

    /// Writes `w` if the stored version is `w.version - 1`; false when another writer won.
    pub async fn update_webhook(&mut self, w: &WebhookRow) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE webhooks SET url = $1, events = $2, ordering = $3, state = $4, description = $5, \
             secret_enc = $6, previous_secret_enc = $7, previous_secret_until = $8, version = $9, \
             updated_at = $10, from_seq = $13, failing_since = $14, disabled_reason = $15, \
             next_probe_at = $16 WHERE webhook_id = $11 AND version = $12",
        )
        .bind(&w.url)
        .bind(serde_json::to_string(&w.events).expect("strings serialize"))
        .bind(&w.ordering)
        .bind(&w.state)
        .bind(w.description.as_deref())
        .bind(&w.secret_enc)
        .bind(w.previous_secret_enc.as_deref())
        .bind(w.previous_secret_until.as_deref())
        .bind(w.version)
        .bind(&w.updated_at)
        .bind(&w.webhook_id)
        .bind(w.version - 1)
        .bind(w.from_seq)
        .bind(w.failing_since.as_deref())
        .bind(w.disabled_reason.as_deref())
        .bind(w.next_probe_at.as_deref())
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    pub async fn set_webhook_from_seq(&mut self, id: &str, seq: i64) -> Result<()> {
        sqlx::query("UPDATE webhooks SET from_seq = $1 WHERE webhook_id = $2")
            .bind(seq)
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Deletes a subscription with its deliveries and their attempts.
    pub async fn delete_webhook(&mut self, id: &str) -> Result<bool> {
        sqlx::query(
            "DELETE FROM webhook_attempts WHERE delivery_id IN \
             (SELECT delivery_id FROM webhook_deliveries WHERE webhook_id = $1)",
        )
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = $1")
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        let res = sqlx::query("DELETE FROM webhooks WHERE webhook_id = $1")
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(res.rows_affected() == 1)
    }
}

impl Store {
    pub async fn get_webhook(&self, id: &str) -> Result<Option<WebhookRow>> {
        let row = sqlx::query("SELECT * FROM webhooks WHERE webhook_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(webhook_from_row).transpose()
    }

    /// Subscriptions after `after` by id, of one tenant when `tenant_id` is given.
    pub async fn list_webhooks(
        &self,
        tenant_id: Option<&str>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<WebhookRow>> {
        let rows = match tenant_id {
            Some(t) => {
                sqlx::query(
                    "SELECT * FROM webhooks WHERE tenant_id = $1 AND webhook_id > $2 \
                     ORDER BY webhook_id LIMIT $3",
                )
                .bind(t)
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT * FROM webhooks WHERE webhook_id > $1 ORDER BY webhook_id LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(webhook_from_row).collect()
    }
}
