//! Webhook deliveries: one row per (subscription, event), an attempt row per try, and the
//! dispatcher's cursor over the outbox. Times are the store's fixed-width RFC 3339 text, so
//! comparing them as strings orders them.

use super::{OutboxRow, Result, Store, WebhookRow, WriteTx};
use sqlx::Row;

/// A delivery to write when the dispatcher fans an event out.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub delivery_id: String,
    pub webhook_id: String,
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    pub subject: String,
    /// The event as delivered (JSON).
    pub body: String,
    pub next_attempt_at: String,
}

/// A delivery as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    pub delivery_id: String,
    pub webhook_id: String,
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    pub subject: String,
    pub body: String,
    /// `pending`, `succeeded` or `failed` (the schedule ran out).
    pub state: String,
    /// Attempts made in the current schedule (a redelivery starts a new one).
    pub schedule_pos: i64,
    pub attempt_count: i64,
    pub next_attempt_at: Option<String>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// A due delivery with what sending it needs from its subscription.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub delivery: DeliveryRow,
    pub tenant_id: Option<String>,
    pub url: String,
    pub secret_enc: String,
    pub previous_secret_enc: Option<String>,
    pub previous_secret_until: Option<String>,
}

/// One attempt as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub delivery_id: String,
    pub attempt: i64,
    pub started_at: String,
    /// `delivered`, `failed`, `throttled`, `timeout` or `gone`.
    pub outcome: String,
    pub status: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub next_attempt_at: Option<String>,
}

fn delivery_from_row(row: &sqlx::any::AnyRow) -> Result<DeliveryRow> {
    Ok(DeliveryRow {
        delivery_id: row.try_get("delivery_id")?,
        webhook_id: row.try_get("webhook_id")?,
        seq: row.try_get("seq")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        subject: row.try_get("subject")?,
        body: row.try_get("body")?,
        state: row.try_get("state")?,
        schedule_pos: row.try_get("schedule_pos")?,
        attempt_count: row.try_get("attempt_count")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_status: row.try_get("last_status")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn attempt_from_row(row: &sqlx::any::AnyRow) -> Result<AttemptRow> {
    Ok(AttemptRow {
        delivery_id: row.try_get("delivery_id")?,
        attempt: row.try_get("attempt")?,
        started_at: row.try_get("started_at")?,
        outcome: row.try_get("outcome")?,
        status: row.try_get("status")?,
        latency_ms: row.try_get("latency_ms")?,
        error: row.try_get("error")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
    })
}

const DELIVERY_COLUMNS: &str = "d.delivery_id, d.webhook_id, d.seq, d.event_id, d.event_type, \
     d.subject, d.body, d.state, d.schedule_pos, d.attempt_count, d.next_attempt_at, \
     d.last_status, d.last_error, d.created_at, d.updated_at";

/// Rows per multi-row insert (15 parameters each, under SQLite's limit).
const INSERT_CHUNK: usize = 400;

impl Store {
    /// The last outbox sequence number the dispatcher has fanned out.
    pub async fn dispatch_cursor(&self) -> Result<i64> {
        let row = sqlx::query("SELECT last_seq FROM webhook_dispatch WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("last_seq")?)
    }

    /// Every outbox record after `after_seq`, oldest first, with its subject.
    pub async fn outbox_after(&self, after_seq: i64, limit: i64) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT o.seq, o.event_id, o.event_type, o.tenant_id, o.payload, o.correlation_id, \
             o.created_at, a.target FROM outbox o JOIN tenant_audit a ON a.seq = o.seq \
             WHERE o.seq > $1 ORDER BY o.seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_from_row).collect()
    }

    /// Outbox records committed in `[since, until)`, oldest first, after `after_seq`.
    pub async fn outbox_between(
        &self,
        since: &str,
        until: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<OutboxRow>> {
        let sql = "SELECT o.seq, o.event_id, o.event_type, o.tenant_id, o.payload, \
                   o.correlation_id, o.created_at, a.target FROM outbox o \
                   JOIN tenant_audit a ON a.seq = o.seq \
                   WHERE o.created_at >= $1 AND o.created_at < $2 AND o.seq > $3 \
                   ORDER BY o.seq LIMIT $4";
        let rows = sqlx::query(sql)
            .bind(since)
            .bind(until)
            .bind(after_seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(outbox_from_row).collect()
    }

    /// Enabled subscriptions (the dispatcher fans events out to these).
    pub async fn enabled_webhooks(&self) -> Result<Vec<WebhookRow>> {
        let rows =
            sqlx::query("SELECT * FROM webhooks WHERE state = 'enabled' ORDER BY webhook_id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(super::webhooks::webhook_from_row).collect()
    }

    /// Subscriptions disabled for failing whose probe is due at `now`.
    pub async fn webhooks_to_probe(&self, now: &str) -> Result<Vec<WebhookRow>> {
        let rows = sqlx::query(
            "SELECT * FROM webhooks WHERE state = 'disabled' AND disabled_reason = 'failing' \
             AND next_probe_at IS NOT NULL AND next_probe_at <= $1 ORDER BY webhook_id LIMIT 100",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(super::webhooks::webhook_from_row).collect()
    }

    /// Pending deliveries due at `now` of enabled subscriptions, oldest due first. For a
    /// `per-subject` subscription only the first pending delivery of each subject is due:
    /// a later event of the subject waits until the earlier one succeeded or was given up.
    pub async fn due_deliveries(&self, now: &str, limit: i64) -> Result<Vec<DueDelivery>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS}, w.tenant_id, w.url, w.secret_enc, w.previous_secret_enc, \
             w.previous_secret_until FROM webhook_deliveries d \
             JOIN webhooks w ON w.webhook_id = d.webhook_id \
             WHERE d.state = 'pending' AND d.next_attempt_at <= $1 AND w.state = 'enabled' \
             AND (w.ordering <> 'per-subject' OR NOT EXISTS (SELECT 1 FROM webhook_deliveries e \
                  WHERE e.webhook_id = d.webhook_id AND e.subject = d.subject \
                  AND e.state = 'pending' AND e.seq < d.seq)) \
             ORDER BY d.next_attempt_at, d.seq LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(DueDelivery {
                    delivery: delivery_from_row(r)?,
                    tenant_id: r.try_get("tenant_id")?,
                    url: r.try_get("url")?,
                    secret_enc: r.try_get("secret_enc")?,
                    previous_secret_enc: r.try_get("previous_secret_enc")?,
                    previous_secret_until: r.try_get("previous_secret_until")?,
                })
            })
            .collect()
    }

    /// A subscription's deliveries after `after_seq` in event order, optionally in one
    /// state, each with its attempts.
    pub async fn list_deliveries(
        &self,
        webhook_id: &str,
        state: Option<&str>,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<(DeliveryRow, Vec<AttemptRow>)>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE d.webhook_id = $1 \
             AND d.seq > $2 {} ORDER BY d.seq LIMIT $3",
            if state.is_some() {
                "AND d.state = $4"
            } else {
                ""
            }
        );
        let mut q = sqlx::query(&sql)
            .bind(webhook_id)
            .bind(after_seq)
            .bind(limit);
        if let Some(s) = state {
            q = q.bind(s);
        }
        let deliveries: Vec<DeliveryRow> = q
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(delivery_from_row)
            .collect::<Result<_>>()?;
        let (Some(first), Some(last)) = (deliveries.first(), deliveries.last()) else {
            return Ok(Vec::new());
        };
        let attempts: Vec<AttemptRow> = sqlx::query(
            "SELECT a.* FROM webhook_attempts a JOIN webhook_deliveries d \
             ON d.delivery_id = a.delivery_id WHERE d.webhook_id = $1 AND d.seq >= $2 \
             AND d.seq <= $3 ORDER BY a.delivery_id, a.attempt",
        )
        .bind(webhook_id)
        .bind(first.seq)
        .bind(last.seq)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(attempt_from_row)
        .collect::<Result<_>>()?;
        Ok(deliveries
            .into_iter()
            .map(|d| {
                let mine = attempts
                    .iter()
                    .filter(|a| a.delivery_id == d.delivery_id)
                    .cloned()
                    .collect();
                (d, mine)
            })
            .collect())
    }

    pub async fn get_delivery(&self, delivery_id: &str) -> Result<Option<DeliveryRow>> {
        let row = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE d.delivery_id = $1"
        ))
        .bind(delivery_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(delivery_from_row).transpose()
    }
}

/// An outbox record read with its audit record's `target` (the subject).
pub(super) fn outbox_from_row(row: &sqlx::any::AnyRow) -> Result<OutboxRow> {
    let payload: String = row.try_get("payload")?;
    Ok(OutboxRow {
        seq: row.try_get("seq")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        tenant_id: row.try_get("tenant_id")?,
        subject: row.try_get("target")?,
        payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload)),
        correlation_id: row.try_get("correlation_id")?,
        created_at: row.try_get("created_at")?,
    })
}

/// What an attempt did to its delivery.
#[derive(Debug, Clone)]
pub struct AttemptResult<'a> {
    pub delivery_id: &'a str,
    /// The attempt's schedule position before it ran (the write is conditional on it, so a
    /// late result of a deposed dispatcher, or of an attempt a redelivery replaced, is
    /// dropped).
    pub schedule_pos: i64,
    pub started_at: &'a str,
    pub outcome: &'a str,
    pub status: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<&'a str>,
    /// `succeeded`, `pending` or `failed`.
    pub new_state: &'a str,
    pub next_attempt_at: Option<&'a str>,
    pub now: &'a str,
}

impl WriteTx {
    /// Writes fanned-out deliveries; one already there for the same (subscription, event)
    /// is kept.
    pub async fn insert_deliveries(&mut self, rows: &[NewDelivery], now: &str) -> Result<()> {
        for chunk in rows.chunks(INSERT_CHUNK) {
            let mut sql = String::from(
                "INSERT INTO webhook_deliveries (delivery_id, webhook_id, seq, event_id, event_type, \
                 subject, body, state, schedule_pos, attempt_count, next_attempt_at, created_at, \
                 updated_at) VALUES ",
            );
            let mut n = 0;
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${},${},${},${},${},${},${},'pending',0,0,${},${},${})",
                    n + 1,
                    n + 2,
                    n + 3,
                    n + 4,
                    n + 5,
                    n + 6,
                    n + 7,
                    n + 8,
                    n + 9,
                    n + 10
                ));
                n += 10;
            }
            sql.push_str(" ON CONFLICT (webhook_id, seq) DO NOTHING");
            let mut q = sqlx::query(&sql);
            for d in chunk {
                q = q
                    .bind(&d.delivery_id)
                    .bind(&d.webhook_id)
                    .bind(d.seq)
                    .bind(&d.event_id)
                    .bind(&d.event_type)
                    .bind(&d.subject)
                    .bind(&d.body)
                    .bind(&d.next_attempt_at)
                    .bind(now)
                    .bind(now);
            }
            q.execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    /// Writes deliveries of a replay: new ones are inserted, ones already there start a new
    /// schedule now (whatever their state). Returns how many were queued.
    pub async fn replay_deliveries(&mut self, rows: &[NewDelivery], now: &str) -> Result<u64> {
        let mut queued = 0;
        for d in rows {
            let res = sqlx::query(
                "INSERT INTO webhook_deliveries (delivery_id, webhook_id, seq, event_id, event_type, \
                 subject, body, state, schedule_pos, attempt_count, next_attempt_at, created_at, \
                 updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,'pending',0,0,$8,$9,$9) \
                 ON CONFLICT (webhook_id, seq) DO UPDATE SET state = 'pending', schedule_pos = 0, \
                 next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at",
            )
            .bind(&d.delivery_id)
            .bind(&d.webhook_id)
            .bind(d.seq)
            .bind(&d.event_id)
            .bind(&d.event_type)
            .bind(&d.subject)
            .bind(&d.body)
            .bind(&d.next_attempt_at)
            .bind(now)
            .execute(&mut *self.tx)
            .await?;
            queued += res.rows_affected();
        }
        Ok(queued)
    }

    /// Moves the dispatcher's cursor from `from` to `to`; false when it was not at `from`.
    pub async fn advance_dispatch_cursor(&mut self, from: i64, to: i64) -> Result<bool> {
        let res =
            sqlx::query("UPDATE webhook_dispatch SET last_seq = $1 WHERE id = 1 AND last_seq = $2")
                .bind(to)
                .bind(from)
                .execute(&mut *self.tx)
                .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Records an attempt and what it did to its delivery. False (nothing written) when the
    /// delivery moved on meanwhile (redelivered, replayed or recorded by another attempt).
    pub async fn record_attempt(&mut self, r: &AttemptResult<'_>) -> Result<bool> {
        if self.backend == super::Backend::Postgres {
            // One round trip: the attempt row is inserted from the update's result.
            let res = sqlx::query(
                "WITH u AS (UPDATE webhook_deliveries SET state = $1, \
                   schedule_pos = schedule_pos + 1, attempt_count = attempt_count + 1, \
                   next_attempt_at = $2, last_status = $3, last_error = $4, updated_at = $5 \
                   WHERE delivery_id = $6 AND schedule_pos = $7 AND state = 'pending' \
                   RETURNING delivery_id, attempt_count) \
                 INSERT INTO webhook_attempts (delivery_id, attempt, started_at, outcome, status, \
                   latency_ms, error, next_attempt_at) \
                 SELECT delivery_id, attempt_count, $8, $9, $3, $10, $4, $2 FROM u",
            )
            .bind(r.new_state)
            .bind(r.next_attempt_at)
            .bind(r.status)
            .bind(r.error)
            .bind(r.now)
            .bind(r.delivery_id)
            .bind(r.schedule_pos)
            .bind(r.started_at)
            .bind(r.outcome)
            .bind(r.latency_ms)
            .execute(&mut *self.tx)
            .await?;
            return Ok(res.rows_affected() == 1);
        }
        let res = sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, schedule_pos = schedule_pos + 1, \
             attempt_count = attempt_count + 1, next_attempt_at = $2, last_status = $3, \
             last_error = $4, updated_at = $5 \
             WHERE delivery_id = $6 AND schedule_pos = $7 AND state = 'pending' \
             RETURNING attempt_count",
        )
        .bind(r.new_state)
        .bind(r.next_attempt_at)
        .bind(r.status)
        .bind(r.error)
        .bind(r.now)
        .bind(r.delivery_id)
        .bind(r.schedule_pos)
        .fetch_optional(&mut *self.tx)
        .await?;
        let Some(row) = res else {
            return Ok(false);
        };
        let attempt: i64 = row.try_get("attempt_count")?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, outcome, status, \
             latency_ms, error, next_attempt_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
        )
        .bind(r.delivery_id)
        .bind(attempt)
        .bind(r.started_at)
        .bind(r.outcome)
        .bind(r.status)
        .bind(r.latency_ms)
        .bind(r.error)
        .bind(r.next_attempt_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(true)
    }

    /// Starts a new schedule for one delivery now. False when there is no such delivery
    /// of this subscription.
    pub async fn redeliver(
        &mut self,
        webhook_id: &str,
        delivery_id: &str,
        now: &str,
    ) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', schedule_pos = 0, \
             next_attempt_at = $1, updated_at = $1 WHERE delivery_id = $2 AND webhook_id = $3",
        )
        .bind(now)
        .bind(delivery_id)
        .bind(webhook_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Marks a subscription failing since `since` unless it already is; since when it is
    /// failing.
    pub async fn mark_webhook_failing(&mut self, webhook_id: &str, since: &str) -> Result<String> {
        sqlx::query(
            "UPDATE webhooks SET failing_since = $1 WHERE webhook_id = $2 AND failing_since IS NULL",
        )
        .bind(since)
        .bind(webhook_id)
        .execute(&mut *self.tx)
        .await?;
        let row = sqlx::query("SELECT failing_since FROM webhooks WHERE webhook_id = $1")
            .bind(webhook_id)
            .fetch_optional(&mut *self.tx)
            .await?;
        let current: Option<String> = match row {
            Some(r) => r.try_get("failing_since")?,
            None => None,
        };
        Ok(current.unwrap_or_else(|| since.to_string()))
    }

    /// Clears a subscription's failing mark; the time it was failing since, when this call
    /// cleared it.
    pub async fn clear_webhook_failing(&mut self, webhook_id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT failing_since FROM webhooks WHERE webhook_id = $1")
            .bind(webhook_id)
            .fetch_optional(&mut *self.tx)
            .await?;
        let since: Option<String> = match row {
            Some(r) => r.try_get("failing_since")?,
            None => None,
        };
        let Some(since) = since else {
            return Ok(None);
        };
        let res = sqlx::query(
            "UPDATE webhooks SET failing_since = NULL WHERE webhook_id = $1 AND failing_since = $2",
        )
        .bind(webhook_id)
        .bind(&since)
        .execute(&mut *self.tx)
        .await?;
        Ok((res.rows_affected() == 1).then_some(since))
    }

    /// Disables an enabled subscription (a new version); false when it was not enabled.
    pub async fn disable_webhook(
        &mut self,
        webhook_id: &str,
        reason: &str,
        next_probe_at: Option<&str>,
        now: &str,
    ) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE webhooks SET state = 'disabled', disabled_reason = $1, next_probe_at = $2, \
             version = version + 1, updated_at = $3 WHERE webhook_id = $4 AND state = 'enabled'",
        )
        .bind(reason)
        .bind(next_probe_at)
        .bind(now)
        .bind(webhook_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Re-enables a subscription a probe found answering; false when it was not disabled
    /// for failing.
    pub async fn enable_probed_webhook(&mut self, webhook_id: &str, now: &str) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE webhooks SET state = 'enabled', disabled_reason = NULL, next_probe_at = NULL, \
             failing_since = NULL, version = version + 1, updated_at = $1 \
             WHERE webhook_id = $2 AND state = 'disabled' AND disabled_reason = 'failing'",
        )
        .bind(now)
        .bind(webhook_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Sets when a disabled subscription is probed next.
    pub async fn set_webhook_probe(&mut self, webhook_id: &str, next: &str) -> Result<()> {
        sqlx::query("UPDATE webhooks SET next_probe_at = $1 WHERE webhook_id = $2")
            .bind(next)
            .bind(webhook_id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }
}
