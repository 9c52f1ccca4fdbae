//! The service's webhook subscription operations (`/v1/webhooks`). `scope` is a
//! tenant-admin's own tenant: it sees and manages only that tenant's subscriptions, and
//! another's is answered as not found.

use super::Service;
use crate::ctx::Ctx;
use crate::error::{check_version, invalid, not_found, Result, ServiceError};
use crate::persistence::{self, AuditInput, WebhookRow};
use crate::validate::validate_text;
use crate::webhooks::{check_url, new_secret, SecretBox};
use cellplane_api::{
    CreateWebhook, DeliveryState, EventType, FieldError, PatchWebhook, ReplayQueued, ReplayWebhook,
    Webhook, WebhookAttempt, WebhookDelivery, WebhookOrdering, WebhookState,
};
use serde_json::json;

/// The type of the ping `POST /v1/webhooks/{id}/test` sends (not a published event).
pub const PING_TYPE: &str = "dev.cellplane.webhook.ping.v1";

/// How long a ping waits for a 2xx.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Most event types one subscription names.
const MAX_EVENTS: usize = 64;

fn validate_events(events: &[String], errors: &mut Vec<FieldError>) {
    let err = |errors: &mut Vec<FieldError>, m: String| {
        errors.push(FieldError {
            field: "events".into(),
            message: m,
        })
    };
    if events.is_empty() || events.len() > MAX_EVENTS {
        err(
            errors,
            format!("must name 1 to {MAX_EVENTS} event types, or [\"*\"]"),
        );
        return;
    }
    if events.iter().any(|e| e == "*") && events.len() > 1 {
        err(
            errors,
            "\"*\" stands alone: it means every event type".into(),
        );
        return;
    }
    for e in events {
        if e != "*" && EventType::parse(e).is_none() {
            err(
                errors,
                format!("{e:?} is not an event type (see docs/events.md)"),
            );
        }
    }
}

fn to_wire(w: WebhookRow, secret: Option<String>) -> Webhook {
    Webhook {
        ordering: WebhookOrdering::parse(&w.ordering).unwrap_or_default(),
        state: WebhookState::parse(&w.state).unwrap_or(WebhookState::Disabled),
        webhook_id: w.webhook_id,
        url: w.url,
        events: w.events,
        tenant_id: w.tenant_id,
        description: w.description,
        secret,
        previous_secret_expires_at: w.previous_secret_until,
        version: w.version,
        created_at: w.created_at,
        updated_at: w.updated_at,
        failing_since: w.failing_since,
        disabled_reason: w.disabled_reason,
    }
}

fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

impl Service {
    fn secret_box(&self) -> Result<&SecretBox> {
        self.settings().webhook_secrets.as_ref().ok_or_else(|| {
            ServiceError::Unavailable(
                "webhooks.secret_key is not configured: webhook secrets cannot be stored".into(),
            )
        })
    }

    fn check_url_field(&self, url: &str, errors: &mut Vec<FieldError>) -> String {
        match check_url(url, self.settings().webhooks_allow_private) {
            Ok(u) => u,
            Err(m) => {
                errors.push(FieldError {
                    field: "url".into(),
                    message: m,
                });
                String::new()
            }
        }
    }

    /// A subscription visible to `scope`, or not found.
    async fn visible_webhook(&self, id: &str, scope: Option<&str>) -> Result<WebhookRow> {
        let w = self
            .store()
            .get_webhook(id)
            .await?
            .filter(|w| scope.is_none() || w.tenant_id.as_deref() == scope)
            .ok_or_else(|| not_found("webhook", id))?;
        Ok(w)
    }

    pub async fn create_webhook(
        &self,
        ctx: &Ctx,
        scope: Option<&str>,
        req: CreateWebhook,
    ) -> Result<Webhook> {
        let mut errors = Vec::new();
        let url = self.check_url_field(&req.url, &mut errors);
        validate_events(&req.events, &mut errors);
        if let Some(d) = &req.description {
            validate_text("description", d, 200, &mut errors);
        }
        let tenant_id = match (scope, req.tenant_id.as_ref().map(|t| t.as_str())) {
            (Some(own), None) => Some(own.to_string()),
            (Some(own), Some(t)) if t == own => Some(own.to_string()),
            (Some(_), Some(_)) => {
                errors.push(FieldError {
                    field: "tenant_id".into(),
                    message: "a tenant-admin subscribes to its own tenant's events only".into(),
                });
                None
            }
            (None, t) => t.map(str::to_string),
        };
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        if let Some(t) = &tenant_id {
            if self.store().get_tenant(t).await?.is_none() {
                return Err(invalid("tenant_id", format!("tenant {t:?} does not exist")));
            }
        }
        let secret = new_secret();
        let sealed = self.secret_box()?.seal(&secret);
        let ts = persistence::now();
        let row = WebhookRow {
            webhook_id: persistence::new_id("wh"),
            tenant_id,
            url,
            events: req.events,
            ordering: req.ordering.as_str().to_string(),
            state: WebhookState::Enabled.as_str().to_string(),
            description: req.description,
            secret_enc: sealed,
            previous_secret_enc: None,
            previous_secret_until: None,
            version: 1,
            created_at: ts.clone(),
            updated_at: ts,
            from_seq: 0,
            failing_since: None,
            disabled_reason: None,
            next_probe_at: None,
        };
        let mut tx = self.store().write().await?;
        tx.insert_webhook(&row).await?;
        // It receives the events committed after its own creation record.
        let seq = tx
            .audit(AuditInput {
                tenant_id: row.tenant_id.as_deref(),
                event_type: "WEBHOOK_CREATED",
                actor: &ctx.actor,
                target: &format!("webhook/{}", row.webhook_id),
                payload: json!({"host": host_of(&row.url), "events": row.events,
                            "ordering": row.ordering}),
                correlation_id: Some(&ctx.correlation_id),
            })
            .await?;
        tx.set_webhook_from_seq(&row.webhook_id, seq).await?;
        tx.commit().await?;
        Ok(to_wire(row, Some(secret)))
    }

    pub async fn get_webhook(&self, id: &str, scope: Option<&str>) -> Result<Webhook> {
        Ok(to_wire(self.visible_webhook(id, scope).await?, None))
    }

    pub async fn list_webhooks(
        &self,
        scope: Option<&str>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Webhook>> {
        Ok(self
            .store()
            .list_webhooks(scope, after, limit)
            .await?
            .into_iter()
            .map(|w| to_wire(w, None))
            .collect())
    }

    pub async fn patch_webhook(
        &self,
        ctx: &Ctx,
        id: &str,
        scope: Option<&str>,
        if_match: Option<i64>,
        patch: PatchWebhook,
    ) -> Result<Webhook> {
        let mut w = self.visible_webhook(id, scope).await?;
        check_version(if_match, w.version)?;
        let mut errors = Vec::new();
        if let Some(u) = &patch.url {
            w.url = self.check_url_field(u, &mut errors);
        }
        if let Some(e) = &patch.events {
            validate_events(e, &mut errors);
            w.events = e.clone();
        }
        if let Some(d) = &patch.description {
            validate_text("description", d, 200, &mut errors);
            w.description = Some(d.clone());
        }
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        if let Some(o) = patch.ordering {
            w.ordering = o.as_str().to_string();
        }
        if let Some(s) = patch.state {
            if s.as_str() != w.state {
                match s {
                    // Enabled again by hand: its failing history starts over.
                    WebhookState::Enabled => {
                        w.disabled_reason = None;
                        w.failing_since = None;
                        w.next_probe_at = None;
                    }
                    WebhookState::Disabled => w.disabled_reason = Some("manual".into()),
                }
            }
            w.state = s.as_str().to_string();
        }
        w.version += 1;
        w.updated_at = persistence::now();
        let mut tx = self.store().write().await?;
        if !tx.update_webhook(&w).await? {
            let current = tx.get_webhook_tx(id).await?.map(|w| w.version).unwrap_or(0);
            return Err(ServiceError::PreconditionFailed { current });
        }
        tx.audit(AuditInput {
            tenant_id: w.tenant_id.as_deref(),
            event_type: "WEBHOOK_UPDATED",
            actor: &ctx.actor,
            target: &format!("webhook/{id}"),
            payload: json!({"host": host_of(&w.url), "events": w.events, "ordering": w.ordering,
                            "state": w.state, "version": w.version}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        Ok(to_wire(w, None))
    }

    pub async fn delete_webhook(&self, ctx: &Ctx, id: &str, scope: Option<&str>) -> Result<()> {
        let w = self.visible_webhook(id, scope).await?;
        let mut tx = self.store().write().await?;
        if !tx.delete_webhook(id).await? {
            return Err(not_found("webhook", id));
        }
        tx.audit(AuditInput {
            tenant_id: w.tenant_id.as_deref(),
            event_type: "WEBHOOK_DELETED",
            actor: &ctx.actor,
            target: &format!("webhook/{id}"),
            payload: json!({"host": host_of(&w.url)}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A new secret; the current one keeps signing alongside it for the rotation grace
    /// period (receivers verify either), then only the new one signs.
    pub async fn rotate_webhook_secret(
        &self,
        ctx: &Ctx,
        id: &str,
        scope: Option<&str>,
    ) -> Result<Webhook> {
        let mut w = self.visible_webhook(id, scope).await?;
        let sealer = self.secret_box()?;
        let secret = new_secret();
        let grace = chrono::Duration::seconds(
            self.settings()
                .webhook_rotation_grace_secs
                .min(i64::MAX as u64) as i64,
        );
        w.previous_secret_enc = Some(std::mem::replace(&mut w.secret_enc, sealer.seal(&secret)));
        w.previous_secret_until = Some(persistence::fmt_time(chrono::Utc::now() + grace));
        w.version += 1;
        w.updated_at = persistence::now();
        let mut tx = self.store().write().await?;
        if !tx.update_webhook(&w).await? {
            return Err(ServiceError::Conflict(format!(
                "webhook {id} changed meanwhile; try again"
            )));
        }
        tx.audit(AuditInput {
            tenant_id: w.tenant_id.as_deref(),
            event_type: "WEBHOOK_SECRET_ROTATED",
            actor: &ctx.actor,
            target: &format!("webhook/{id}"),
            payload: json!({"previous_secret_until": w.previous_secret_until,
                            "version": w.version}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        Ok(to_wire(w, Some(secret)))
    }

    /// `POST /v1/webhooks/{id}/test`: sends a signed ping (`dev.cellplane.webhook.ping.v1`)
    /// to the subscription now and answers with what the destination said.
    pub async fn ping_webhook(
        &self,
        ctx: &Ctx,
        id: &str,
        scope: Option<&str>,
    ) -> Result<crate::webhooks::Attempt> {
        let w = self.visible_webhook(id, scope).await?;
        let secrets = self.webhook_signing_secrets(id).await?;
        let msg_id = persistence::new_id("msg");
        let event = cellplane_api::Event {
            specversion: "1.0".into(),
            id: msg_id.clone(),
            event_type: PING_TYPE.into(),
            source: self.settings().event_source.clone(),
            subject: format!("webhook/{id}"),
            time: persistence::now(),
            datacontenttype: "application/json".into(),
            data: json!({"webhook_id": id}),
            correlationid: Some(ctx.correlation_id.clone()),
            seq: 0,
        };
        let body = serde_json::to_vec(&event).expect("events serialize");
        let allow_private = self.settings().webhooks_allow_private;
        let client = crate::webhooks::delivery_client(allow_private, PING_TIMEOUT);
        let attempt =
            crate::webhooks::deliver(&client, &w.url, allow_private, &secrets, &msg_id, &body)
                .await;
        let mut tx = self.store().write().await?;
        tx.audit(AuditInput {
            tenant_id: w.tenant_id.as_deref(),
            event_type: "WEBHOOK_PINGED",
            actor: &ctx.actor,
            target: &format!("webhook/{id}"),
            payload: json!({"message_id": msg_id, "delivered": attempt.delivered,
                            "status": attempt.status, "latency_ms": attempt.latency_ms}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        Ok(attempt)
    }

    /// The secrets that sign a delivery now: the current one, and the previous one during
    /// its grace period (delivery uses this; tests check what is stored).
    pub async fn webhook_signing_secrets(&self, id: &str) -> Result<Vec<String>> {
        let w = self
            .store()
            .get_webhook(id)
            .await?
            .ok_or_else(|| not_found("webhook", id))?;
        crate::webhooks::signing_secrets(
            self.secret_box()?,
            &w.secret_enc,
            w.previous_secret_enc.as_deref(),
            w.previous_secret_until.as_deref(),
            chrono::Utc::now(),
        )
        .ok_or_else(|| {
            ServiceError::Unavailable(format!(
                "webhook {id}: its secret does not open with the configured key"
            ))
        })
    }
}

/// Most events one replay queues; a larger range is answered `truncated` with where to
/// go on from.
const REPLAY_MAX_EVENTS: i64 = 10_000;

fn delivery_to_wire(
    d: persistence::DeliveryRow,
    attempts: Vec<persistence::AttemptRow>,
) -> WebhookDelivery {
    WebhookDelivery {
        state: DeliveryState::parse(&d.state).unwrap_or(DeliveryState::Pending),
        delivery_id: d.delivery_id,
        webhook_id: d.webhook_id,
        event_id: d.event_id,
        event_type: d.event_type,
        subject: d.subject,
        seq: d.seq,
        next_attempt_at: d.next_attempt_at,
        attempts: attempts
            .into_iter()
            .map(|a| WebhookAttempt {
                attempt: a.attempt,
                started_at: a.started_at,
                outcome: a.outcome,
                status: a.status,
                latency_ms: a.latency_ms,
                error: a.error,
                next_attempt_at: a.next_attempt_at,
            })
            .collect(),
        created_at: d.created_at,
        updated_at: d.updated_at,
    }
}

fn parse_instant(field: &str, v: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| invalid(field, format!("{v:?} is not an RFC 3339 time")))
}

impl Service {
    /// `GET /v1/webhooks/{id}/deliveries`: deliveries in event order after `after_seq`.
    pub async fn list_webhook_deliveries(
        &self,
        id: &str,
        scope: Option<&str>,
        state: Option<DeliveryState>,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<WebhookDelivery>> {
        self.visible_webhook(id, scope).await?;
        Ok(self
            .store()
            .list_deliveries(id, state.map(|s| s.as_str()), after_seq, limit)
            .await?
            .into_iter()
            .map(|(d, a)| delivery_to_wire(d, a))
            .collect())
    }

    /// `POST /v1/webhooks/{id}/deliveries/{delivery_id}/redeliver`: a new schedule for one
    /// delivery, starting now (same `webhook-id`).
    pub async fn redeliver_webhook_delivery(
        &self,
        ctx: &Ctx,
        id: &str,
        delivery_id: &str,
        scope: Option<&str>,
    ) -> Result<WebhookDelivery> {
        let w = self.visible_webhook(id, scope).await?;
        let now = persistence::now();
        let mut tx = self.store().write().await?;
        if !tx.redeliver(id, delivery_id, &now).await? {
            return Err(not_found("delivery", delivery_id));
        }
        tx.audit(AuditInput {
            tenant_id: w.tenant_id.as_deref(),
            event_type: "WEBHOOK_REDELIVERY_REQUESTED",
            actor: &ctx.actor,
            target: &format!("webhook/{id}"),
            payload: json!({"delivery_id": delivery_id}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        let d = self
            .store()
            .get_delivery(delivery_id)
            .await?
            .ok_or_else(|| not_found("delivery", delivery_id))?;
        let attempts = self
            .store()
            .list_deliveries(id, None, d.seq - 1, 1)
            .await?
            .into_iter()
            .next()
            .map(|(_, a)| a)
            .unwrap_or_default();
        Ok(delivery_to_wire(d, attempts))
    }

    /// `POST /v1/webhooks/{id}/replay`: every event of the subscription's types (and
    /// tenant) committed in `[since, until)` is delivered again (same `webhook-id`s;
    /// `per-subject` order holds, by `seq`). Events from before the subscription existed
    /// are included: replaying is how a new consumer catches up.
    pub async fn replay_webhook(
        &self,
        ctx: &Ctx,
        id: &str,
        scope: Option<&str>,
        req: ReplayWebhook,
    ) -> Result<ReplayQueued> {
        let w = self.visible_webhook(id, scope).await?;
        let since = parse_instant("since", &req.since)?;
        let until = match &req.until {
            Some(u) => parse_instant("until", u)?,
            None => chrono::Utc::now(),
        };
        if since >= until {
            return Err(invalid("until", "must be after since"));
        }
        let (since_s, until_s) = (persistence::fmt_time(since), persistence::fmt_time(until));
        let source = &self.settings().event_source;
        let now = persistence::now();
        let mut new = Vec::new();
        let mut after = 0;
        let mut scanned = 0;
        let mut truncated = None;
        loop {
            let rows = self
                .store()
                .outbox_between(&since_s, &until_s, after, 1000)
                .await?;
            let Some(last) = rows.last() else { break };
            after = last.seq;
            for row in &rows {
                let Some(t) = crate::events::public_type(&row.event_type) else {
                    continue;
                };
                if !crate::webhooks::subscribed(&w, t.as_str(), row.tenant_id.as_deref()) {
                    continue;
                }
                if scanned == REPLAY_MAX_EVENTS {
                    truncated = Some(row.created_at.clone());
                    break;
                }
                scanned += 1;
                let Some(event) = crate::events::to_public(row, source) else {
                    continue;
                };
                new.push(persistence::NewDelivery {
                    delivery_id: persistence::new_id("dlv"),
                    webhook_id: id.to_string(),
                    seq: row.seq,
                    event_id: event.id.clone(),
                    event_type: event.event_type.clone(),
                    subject: event.subject.clone(),
                    body: serde_json::to_string(&event).expect("events serialize"),
                    next_attempt_at: now.clone(),
                });
            }
            if truncated.is_some() || rows.len() < 1000 {
                break;
            }
        }
        let mut tx = self.store().write().await?;
        let queued = tx.replay_deliveries(&new, &now).await?;
        tx.audit(AuditInput {
            tenant_id: w.tenant_id.as_deref(),
            event_type: "WEBHOOK_REPLAY_REQUESTED",
            actor: &ctx.actor,
            target: &format!("webhook/{id}"),
            payload: json!({"since": since_s, "until": until_s, "queued": queued,
                            "truncated": truncated.is_some()}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        Ok(ReplayQueued {
            queued: queued.min(new.len() as u64),
            truncated: truncated.is_some(),
            next_since: truncated,
        })
    }
}
