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
    CreateWebhook, EventType, FieldError, PatchWebhook, Webhook, WebhookOrdering, WebhookState,
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
        };
        let mut tx = self.store().write().await?;
        tx.insert_webhook(&row).await?;
        tx.audit(AuditInput {
            tenant_id: row.tenant_id.as_deref(),
            event_type: "WEBHOOK_CREATED",
            actor: &ctx.actor,
            target: &format!("webhook/{}", row.webhook_id),
            payload: json!({"host": host_of(&row.url), "events": row.events,
                            "ordering": row.ordering}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
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
        let b = self.secret_box()?;
        let open = |s: &str| {
            b.open(s).ok_or_else(|| {
                ServiceError::Unavailable(format!(
                    "webhook {id}: its secret does not open with the configured key"
                ))
            })
        };
        let mut out = vec![open(&w.secret_enc)?];
        if let (Some(prev), Some(until)) = (&w.previous_secret_enc, &w.previous_secret_until) {
            if persistence::parse_time(until).is_some_and(|t| t > chrono::Utc::now()) {
                out.push(open(prev)?);
            }
        }
        Ok(out)
    }
}
