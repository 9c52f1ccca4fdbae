//! The usage controller: publishes metered usage as `dev.cellplane.usage.v1` events, one
//! per tenant and period (`usage.export_period_secs`, hourly by default) once the period
//! ended `usage.export_grace_secs` ago. Each event reports what was counted since the last
//! one for that tenant and period (`exported` per minute row, advanced in the event's
//! transaction), so counts that arrive late — a router that was cut off — go out in a later
//! event for the same period, and nothing goes out twice. The event's `id` is the
//! idempotency key a billing system dedupes on (a Lago `transaction_id`).

use super::{Action, Controller, ControllerCx, ReconcileError};
use crate::persistence::{self, AuditInput};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

pub struct UsageExporter {
    pub period: Duration,
    pub grace: Duration,
}

/// Minute rows read per reconcile.
const BATCH: i64 = 5_000;

fn period_start(t: DateTime<Utc>, period_secs: i64) -> DateTime<Utc> {
    let s = t.timestamp();
    DateTime::from_timestamp(s - s.rem_euclid(period_secs), 0).unwrap_or(t)
}

impl Controller for UsageExporter {
    const NAME: &'static str = "usage";

    fn resync(&self) -> Duration {
        (self.period / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    async fn reconcile(&self, cx: &ControllerCx<'_>) -> Result<Action, ReconcileError> {
        let period = self.period.as_secs().max(60) as i64;
        let now = cx.clock.now();
        let grace = chrono::Duration::from_std(self.grace).unwrap_or_default();
        let cutoff = period_start(now - grace, period);
        let store = cx.service.store();
        let rows = store
            .unexported_usage(&persistence::fmt_time(cutoff), BATCH)
            .await?;
        if rows.is_empty() {
            let mut tx = store.write().await?;
            if !tx
                .fence(cx.fence.name, &cx.fence.holder, cx.fence.term)
                .await?
            {
                return Err(ReconcileError::Deposed(Self::NAME));
            }
            let before = persistence::fmt_time(now - chrono::Duration::days(7));
            tx.prune_usage_batches(&before).await?;
            tx.commit().await?;
            return Ok(Action::AwaitChange);
        }
        let full = rows.len() as i64 == BATCH;
        // (tenant, period start) → its rows.
        let mut groups: BTreeMap<(String, DateTime<Utc>), Vec<persistence::UsageRow>> =
            BTreeMap::new();
        for r in rows {
            let Some(t) = persistence::parse_time(&r.minute) else {
                continue;
            };
            groups
                .entry((r.tenant_id.clone(), period_start(t, period)))
                .or_default()
                .push(r);
        }
        let mut tx = store.write().await?;
        if !tx
            .fence(cx.fence.name, &cx.fence.holder, cx.fence.term)
            .await?
        {
            return Err(ReconcileError::Deposed(Self::NAME));
        }
        let correlation_id = persistence::new_id("corr");
        for ((tenant, start), rows) in &groups {
            let mut sums: BTreeMap<(&str, &str), i64> = BTreeMap::new();
            for r in rows {
                *sums.entry((&r.env, &r.meter)).or_default() += r.amount - r.exported;
            }
            let usage: Vec<_> = sums
                .into_iter()
                .map(|((env, meter), amount)| json!({"env": env, "meter": meter, "amount": amount}))
                .collect();
            tx.audit(AuditInput {
                tenant_id: Some(tenant),
                event_type: "USAGE_REPORTED",
                actor: "system:usage",
                target: &format!("tenant/{tenant}"),
                payload: json!({
                    "period_start": persistence::fmt_time(*start),
                    "period_end": persistence::fmt_time(*start + chrono::Duration::seconds(period)),
                    "usage": usage,
                }),
                correlation_id: Some(&correlation_id),
            })
            .await?;
            for r in rows {
                tx.mark_usage_exported(r).await?;
            }
        }
        tx.commit().await?;
        tracing::info!(reports = groups.len(), "usage reported");
        Ok(if full {
            Action::Requeue(Duration::ZERO)
        } else {
            Action::AwaitChange
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_start_on_their_boundary() {
        let t = DateTime::parse_from_rfc3339("2026-12-04T10:47:13Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            persistence::fmt_time(period_start(t, 3600)),
            "2026-12-04T10:00:00.000000Z"
        );
        assert_eq!(
            persistence::fmt_time(period_start(t, 60)),
            "2026-12-04T10:47:00.000000Z"
        );
    }
}
