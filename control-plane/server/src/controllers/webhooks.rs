//! The webhook dispatcher: under its lease, it fans each committed event out into one
//! delivery per matching subscription (the outbox cursor moves in the same transaction as
//! the deliveries it wrote), sends due deliveries signed with a fresh timestamp on every
//! attempt, and records each attempt with what it decided next (the retry schedule with
//! jitter, `Retry-After`, 410 or too long failing → disabled, a success after failures →
//! recovered). Subscriptions disabled for failing are probed with a ping and re-enabled
//! when one answers 2xx.
//!
//! Every write carries the lease's fence. Sending happens outside any transaction: an
//! attempt whose outcome is not recorded (the process died, or the lease moved) is sent
//! again with the same `webhook-id`, which is the duplicate Standard Webhooks allows.
//!
//! Failpoints (debug builds, `@N` = the lease term): `controller.webhooks/send` (a
//! delivery's event is committed and fanned out, nothing sent) and
//! `controller.webhooks/sent` (the destination answered, nothing recorded).

use super::{Action, Controller, ControllerCx, Fence, ReconcileError};
use crate::clock::SharedClock;
use crate::failpoints::Failpoints;
use crate::persistence::{
    self, AttemptResult, AuditInput, DueDelivery, NewDelivery, Store, WriteTx,
};
use crate::service::Service;
use crate::webhooks::{send, signing_secrets, subscribed, with_jitter, Outcome, SecretBox};
use serde_json::json;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Outbox records read per fan-out transaction.
const FAN_OUT_BATCH: i64 = 500;

/// The actor of the dispatcher's audit records.
const ACTOR: &str = "system:webhooks";

/// What the dispatcher runs with (`[webhooks]` in the configuration).
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub schedule_ms: Vec<u64>,
    pub attempt_timeout: Duration,
    pub disable_after: Duration,
    pub probe_interval: Duration,
    pub max_in_flight: usize,
    pub poll: Duration,
    pub max_retry_after: Duration,
    pub allow_private: bool,
}

impl DispatchSettings {
    pub fn from_config(c: &crate::config::WebhooksConfig) -> Self {
        Self {
            schedule_ms: if c.retry_schedule_ms.is_empty() {
                vec![0]
            } else {
                c.retry_schedule_ms.clone()
            },
            attempt_timeout: Duration::from_millis(c.attempt_timeout_ms.max(1)),
            disable_after: Duration::from_secs(c.disable_after_secs),
            probe_interval: Duration::from_secs(c.probe_interval_secs.max(1)),
            max_in_flight: c.max_in_flight.max(1),
            poll: Duration::from_millis(c.poll_interval_ms.max(5)),
            max_retry_after: Duration::from_secs(c.max_retry_after_secs),
            allow_private: c.allow_private_destinations,
        }
    }
}

pub struct Dispatcher {
    settings: Arc<DispatchSettings>,
    client: reqwest::Client,
    /// Deliveries (and probes, as `probe:<webhook>`) being attempted now.
    in_flight: Arc<Mutex<HashSet<String>>>,
}

impl Dispatcher {
    pub fn new(settings: DispatchSettings) -> Self {
        let client =
            crate::webhooks::delivery_client(settings.allow_private, settings.attempt_timeout);
        Self {
            settings: Arc::new(settings),
            client,
            in_flight: Arc::new(Mutex::new(HashSet::new())),
        }
    }
}

impl Controller for Dispatcher {
    const NAME: &'static str = "webhooks";

    fn resync(&self) -> Duration {
        self.settings.poll
    }

    async fn reconcile(&self, cx: &ControllerCx<'_>) -> Result<Action, ReconcileError> {
        let Some(sealer) = cx.service.settings().webhook_secrets.clone() else {
            // No key: no subscription can exist (they are refused with 503).
            return Ok(Action::Requeue(Duration::from_secs(60)));
        };
        let mut caught_up = false;
        for _ in 0..20 {
            if fan_out(cx).await? < FAN_OUT_BATCH as usize {
                caught_up = true;
                break;
            }
        }
        let task = Task {
            store: cx.service.store().clone(),
            fence: cx.fence.clone(),
            failpoints: cx.failpoints.clone(),
            clock: cx.clock.clone(),
            settings: self.settings.clone(),
            client: self.client.clone(),
            sealer: Arc::new(sealer),
            in_flight: self.in_flight.clone(),
            source: cx.service.settings().event_source.clone(),
        };
        self.dispatch(cx.service, &task).await?;
        self.probe(cx.service, &task).await?;
        Ok(Action::Requeue(if caught_up {
            self.settings.poll
        } else {
            Duration::ZERO
        }))
    }
}

/// Fans the next outbox records out into deliveries; how many records it read.
async fn fan_out(cx: &ControllerCx<'_>) -> Result<usize, ReconcileError> {
    let store = cx.service.store();
    let cursor = store.dispatch_cursor().await?;
    let rows = store.outbox_after(cursor, FAN_OUT_BATCH).await?;
    let Some(last) = rows.last().map(|r| r.seq) else {
        return Ok(0);
    };
    // Read after the records: a subscription created later starts after all of them.
    let subs = store.enabled_webhooks().await?;
    let now = persistence::fmt_time(cx.clock.now());
    let source = &cx.service.settings().event_source;
    let mut new = Vec::new();
    for row in &rows {
        let takers: Vec<_> = subs
            .iter()
            .filter(|w| w.from_seq < row.seq)
            .filter(|w| {
                crate::events::public_type(&row.event_type)
                    .is_some_and(|t| subscribed(w, t.as_str(), row.tenant_id.as_deref()))
            })
            .collect();
        if takers.is_empty() {
            continue;
        }
        let Some(event) = crate::events::to_public(row, source) else {
            continue;
        };
        let body = serde_json::to_string(&event).expect("events serialize");
        for w in takers {
            new.push(NewDelivery {
                delivery_id: persistence::new_id("dlv"),
                webhook_id: w.webhook_id.clone(),
                seq: row.seq,
                event_id: event.id.clone(),
                event_type: event.event_type.clone(),
                subject: event.subject.clone(),
                body: body.clone(),
                next_attempt_at: now.clone(),
            });
        }
    }
    let mut tx = store.write().await?;
    fenced(&mut tx, cx.fence).await?;
    tx.insert_deliveries(&new, &now).await?;
    if !tx.advance_dispatch_cursor(cursor, last).await? {
        // Another holder moved the cursor (this one was deposed in between): drop ours.
        return Err(ReconcileError::Deposed(Dispatcher::NAME));
    }
    tx.commit().await?;
    if !new.is_empty() {
        tracing::debug!(
            deliveries = new.len(),
            through_seq = last,
            "events fanned out"
        );
    }
    Ok(rows.len())
}

async fn fenced(tx: &mut WriteTx, fence: &Fence) -> Result<(), ReconcileError> {
    if tx.fence(fence.name, &fence.holder, fence.term).await? {
        Ok(())
    } else {
        Err(ReconcileError::Deposed(Dispatcher::NAME))
    }
}

impl Dispatcher {
    /// Starts attempts of due deliveries, up to the in-flight limit.
    async fn dispatch(&self, service: &Service, task: &Task) -> Result<(), ReconcileError> {
        let busy = self.in_flight.lock().expect("not poisoned").len();
        let free = self.settings.max_in_flight.saturating_sub(busy);
        if free == 0 {
            return Ok(());
        }
        let now = persistence::fmt_time(task.clock.now());
        let due = service
            .store()
            .due_deliveries(&now, (free + busy) as i64)
            .await?;
        let mut started = 0;
        for d in due {
            if started == free {
                break;
            }
            if !self
                .in_flight
                .lock()
                .expect("not poisoned")
                .insert(d.delivery.delivery_id.clone())
            {
                continue;
            }
            started += 1;
            let task = task.clone();
            tokio::spawn(async move { task.attempt(d).await });
        }
        Ok(())
    }

    /// Pings subscriptions disabled for failing whose probe is due.
    async fn probe(&self, service: &Service, task: &Task) -> Result<(), ReconcileError> {
        let now = persistence::fmt_time(task.clock.now());
        for w in service.store().webhooks_to_probe(&now).await? {
            let key = format!("probe:{}", w.webhook_id);
            if !self.in_flight.lock().expect("not poisoned").insert(key) {
                continue;
            }
            let task = task.clone();
            tokio::spawn(async move { task.probe(w).await });
        }
        Ok(())
    }
}

/// What an attempt running on its own task needs.
#[derive(Clone)]
struct Task {
    store: Store,
    fence: Fence,
    failpoints: Failpoints,
    clock: SharedClock,
    settings: Arc<DispatchSettings>,
    client: reqwest::Client,
    sealer: Arc<SecretBox>,
    in_flight: Arc<Mutex<HashSet<String>>>,
    source: String,
}

/// Takes a key out of the in-flight set when the attempt ends, however it ends.
struct InFlight(Arc<Mutex<HashSet<String>>>, String);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().expect("not poisoned").remove(&self.1);
    }
}

impl Task {
    fn failpoint(&self, point: &str) {
        self.failpoints.hit(
            &format!("controller.{}/{point}", Dispatcher::NAME),
            self.fence.term,
        );
    }

    fn ctx_id() -> String {
        persistence::new_id("corr")
    }

    async fn attempt(self, d: DueDelivery) {
        let _in_flight = InFlight(self.in_flight.clone(), d.delivery.delivery_id.clone());
        let id = d.delivery.delivery_id.clone();
        if let Err(e) = self.try_attempt(d).await {
            match e {
                ReconcileError::Deposed(_) => {
                    tracing::info!(delivery = %id, "attempt not recorded: the dispatcher lease moved")
                }
                e => {
                    tracing::warn!(delivery = %id, error = %e, "recording a delivery attempt failed")
                }
            }
        }
    }

    async fn try_attempt(&self, d: DueDelivery) -> Result<(), ReconcileError> {
        let started = self.clock.now();
        let started_at = persistence::fmt_time(started);
        let secrets = signing_secrets(
            &self.sealer,
            &d.secret_enc,
            d.previous_secret_enc.as_deref(),
            d.previous_secret_until.as_deref(),
            started,
        );
        self.failpoint("send");
        let sent = match secrets {
            Some(secrets) => {
                send(
                    &self.client,
                    &d.url,
                    self.settings.allow_private,
                    &secrets,
                    &d.delivery.event_id,
                    d.delivery.body.as_bytes(),
                )
                .await
            }
            None => crate::webhooks::Sent {
                attempt: crate::webhooks::Attempt {
                    delivered: false,
                    status: None,
                    latency_ms: 0,
                    error: Some(
                        "the subscription's secret does not open with the configured key".into(),
                    ),
                    message_id: d.delivery.event_id.clone(),
                },
                retry_after: None,
                timed_out: false,
            },
        };
        self.failpoint("sent");
        let outcome = Outcome::of(&sent);
        let now_t = self.clock.now();
        let now = persistence::fmt_time(now_t);
        let made = d.delivery.schedule_pos as usize + 1;
        let (state, next) = if outcome == Outcome::Delivered {
            ("succeeded", None)
        } else if made >= self.settings.schedule_ms.len() {
            ("failed", None)
        } else {
            let planned = Duration::from_millis(with_jitter(self.settings.schedule_ms[made]));
            let wait = match sent.retry_after {
                Some(ra) => ra.min(self.settings.max_retry_after),
                None => planned,
            };
            let at = now_t + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1));
            ("pending", Some(persistence::fmt_time(at)))
        };
        let status = sent.attempt.status.map(i64::from);
        let mut tx = self.store.write().await?;
        fenced(&mut tx, &self.fence).await?;
        let recorded = tx
            .record_attempt(&AttemptResult {
                delivery_id: &d.delivery.delivery_id,
                schedule_pos: d.delivery.schedule_pos,
                started_at: &started_at,
                outcome: outcome.as_str(),
                status,
                latency_ms: sent.attempt.latency_ms as i64,
                error: sent.attempt.error.as_deref(),
                new_state: state,
                next_attempt_at: next.as_deref(),
                now: &now,
            })
            .await?;
        if !recorded {
            return Ok(());
        }
        let webhook = &d.delivery.webhook_id;
        let audit = |event_type: &'static str, payload: serde_json::Value| (event_type, payload);
        let mut record = None;
        match outcome {
            Outcome::Delivered => {
                if let Some(since) = tx.clear_webhook_failing(webhook).await? {
                    record = Some(audit(
                        "WEBHOOK_RECOVERED",
                        json!({"failing_since": since, "reenabled": false,
                               "delivery_id": d.delivery.delivery_id}),
                    ));
                }
            }
            Outcome::Gone => {
                if tx.disable_webhook(webhook, "gone", None, &now).await? {
                    record = Some(audit(
                        "WEBHOOK_DISABLED",
                        json!({"reason": "gone", "status": 410, "failing_since": null,
                               "delivery_id": d.delivery.delivery_id}),
                    ));
                }
            }
            _ => {
                let since = tx.mark_webhook_failing(webhook, &started_at).await?;
                let failing_for = persistence::parse_time(&since)
                    .map(|t| now_t - t)
                    .and_then(|d| d.to_std().ok())
                    .unwrap_or_default();
                if failing_for >= self.settings.disable_after {
                    let probe_at = persistence::fmt_time(
                        now_t
                            + chrono::Duration::from_std(self.settings.probe_interval)
                                .unwrap_or(chrono::Duration::hours(1)),
                    );
                    if tx
                        .disable_webhook(webhook, "failing", Some(&probe_at), &now)
                        .await?
                    {
                        record = Some(audit(
                            "WEBHOOK_DISABLED",
                            json!({"reason": "failing", "failing_since": since,
                                   "delivery_id": d.delivery.delivery_id}),
                        ));
                    }
                }
            }
        }
        if let Some((event_type, payload)) = record {
            tx.audit(AuditInput {
                tenant_id: d.tenant_id.as_deref(),
                event_type,
                actor: ACTOR,
                target: &format!("webhook/{webhook}"),
                payload,
                correlation_id: Some(&Self::ctx_id()),
            })
            .await?;
        }
        tx.commit().await?;
        match outcome {
            Outcome::Delivered => {}
            Outcome::Gone => {
                tracing::warn!(webhook = %webhook, "destination answered 410: subscription disabled")
            }
            o => tracing::info!(
                webhook = %webhook,
                delivery = %d.delivery.delivery_id,
                outcome = o.as_str(),
                status = ?sent.attempt.status,
                error = ?sent.attempt.error,
                next_attempt_at = ?next,
                "delivery attempt failed"
            ),
        }
        Ok(())
    }

    async fn probe(self, w: persistence::WebhookRow) {
        let _in_flight = InFlight(self.in_flight.clone(), format!("probe:{}", w.webhook_id));
        if let Err(e) = self.try_probe(&w).await {
            tracing::warn!(webhook = %w.webhook_id, error = %e, "probing a disabled subscription failed");
        }
    }

    async fn try_probe(&self, w: &persistence::WebhookRow) -> Result<(), ReconcileError> {
        let now_t = self.clock.now();
        let Some(secrets) = signing_secrets(
            &self.sealer,
            &w.secret_enc,
            w.previous_secret_enc.as_deref(),
            w.previous_secret_until.as_deref(),
            now_t,
        ) else {
            return Ok(());
        };
        let msg_id = persistence::new_id("msg");
        let event = cellplane_api::Event {
            specversion: "1.0".into(),
            id: msg_id.clone(),
            event_type: crate::service::webhooks::PING_TYPE.into(),
            source: self.source.clone(),
            subject: format!("webhook/{}", w.webhook_id),
            time: persistence::fmt_time(now_t),
            datacontenttype: "application/json".into(),
            data: json!({"webhook_id": w.webhook_id, "probe": true}),
            correlationid: None,
            seq: 0,
        };
        let body = serde_json::to_vec(&event).expect("events serialize");
        let sent = send(
            &self.client,
            &w.url,
            self.settings.allow_private,
            &secrets,
            &msg_id,
            &body,
        )
        .await;
        let now_t = self.clock.now();
        let now = persistence::fmt_time(now_t);
        let mut tx = self.store.write().await?;
        fenced(&mut tx, &self.fence).await?;
        if sent.attempt.delivered {
            if tx.enable_probed_webhook(&w.webhook_id, &now).await? {
                tx.audit(AuditInput {
                    tenant_id: w.tenant_id.as_deref(),
                    event_type: "WEBHOOK_RECOVERED",
                    actor: ACTOR,
                    target: &format!("webhook/{}", w.webhook_id),
                    payload: json!({"failing_since": w.failing_since, "reenabled": true,
                                    "probe_message_id": msg_id}),
                    correlation_id: Some(&Self::ctx_id()),
                })
                .await?;
                tracing::info!(webhook = %w.webhook_id, "a probe was answered: subscription re-enabled");
            }
        } else {
            let next = persistence::fmt_time(
                now_t
                    + chrono::Duration::from_std(self.settings.probe_interval)
                        .unwrap_or(chrono::Duration::hours(1)),
            );
            tx.set_webhook_probe(&w.webhook_id, &next).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
