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
    /// Deliveries (and probes, as `probe:<webhook>`) being attempted now: from dispatch
    /// until their outcome is committed (or dropped).
    in_flight: Arc<Mutex<InFlightSet>>,
    /// Finished attempts on their way to the recorder, which commits them in groups.
    results: tokio::sync::mpsc::UnboundedSender<Finished>,
    results_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Finished>>>,
    /// Woken when an attempt's outcome is committed: a slot is free.
    freed: Arc<tokio::sync::Notify>,
}

/// An attempt whose answer is in, waiting to be recorded. Its delivery stays in flight
/// (not dispatched again) until the record commits or fails.
struct Finished {
    delivery: DueDelivery,
    sent: crate::webhooks::Sent,
    started_at: String,
    fence: Fence,
    _in_flight: InFlight,
}

/// Most outcomes one recorder transaction commits.
const RECORD_BATCH: usize = 256;

/// How long one reconcile keeps dispatching as slots free up before it returns to the
/// lease loop.
const DISPATCH_SLICE: Duration = Duration::from_millis(250);

impl Dispatcher {
    pub fn new(settings: DispatchSettings) -> Self {
        let client =
            crate::webhooks::delivery_client(settings.allow_private, settings.attempt_timeout);
        let (results, results_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            settings: Arc::new(settings),
            client,
            in_flight: Arc::new(Mutex::new(InFlightSet::default())),
            results,
            results_rx: Mutex::new(Some(results_rx)),
            freed: Arc::new(tokio::sync::Notify::new()),
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
            results: self.results.clone(),
        };
        if let Some(rx) = self.results_rx.lock().expect("not poisoned").take() {
            let (store, settings, freed) = (
                cx.service.store().clone(),
                self.settings.clone(),
                self.freed.clone(),
            );
            tokio::spawn(record_loop(rx, store, settings, freed));
        }
        self.probe(cx.service, &task).await?;
        // Dispatch, and again whenever outcomes free slots, for a slice of time; new events
        // are fanned out between rounds.
        let until = tokio::time::Instant::now() + DISPATCH_SLICE;
        loop {
            let more = self.dispatch(cx.service, &task).await?;
            let wait = if more {
                self.settings.poll.min(Duration::from_millis(20))
            } else {
                self.settings.poll
            };
            let now = tokio::time::Instant::now();
            if now + wait > until {
                break;
            }
            tokio::select! {
                _ = self.freed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            if fan_out(cx).await? == FAN_OUT_BATCH as usize {
                caught_up = false;
                break;
            }
        }
        Ok(Action::Requeue(if caught_up {
            Duration::from_millis(10)
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
    /// Starts attempts of due deliveries, up to the in-flight limit; true when due
    /// deliveries were left for lack of slots.
    async fn dispatch(&self, service: &Service, task: &Task) -> Result<bool, ReconcileError> {
        let busy = self.in_flight.lock().expect("not poisoned").settle();
        let free = self.settings.max_in_flight.saturating_sub(busy);
        if free == 0 {
            return Ok(true);
        }
        let now = persistence::fmt_time(task.clock.now());
        let due = service
            .store()
            .due_deliveries(&now, (free + busy) as i64)
            .await?;
        let mut started = 0;
        let mut left = false;
        for d in due {
            if started == free {
                left = true;
                break;
            }
            if !self
                .in_flight
                .lock()
                .expect("not poisoned")
                .live
                .insert(d.delivery.delivery_id.clone())
            {
                continue;
            }
            started += 1;
            let task = task.clone();
            tokio::spawn(async move { task.attempt(d).await });
        }
        Ok(left)
    }

    /// Pings subscriptions disabled for failing whose probe is due.
    async fn probe(&self, service: &Service, task: &Task) -> Result<(), ReconcileError> {
        self.in_flight.lock().expect("not poisoned").settle();
        let now = persistence::fmt_time(task.clock.now());
        for w in service.store().webhooks_to_probe(&now).await? {
            let key = format!("probe:{}", w.webhook_id);
            if !self
                .in_flight
                .lock()
                .expect("not poisoned")
                .live
                .insert(key)
            {
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
    in_flight: Arc<Mutex<InFlightSet>>,
    source: String,
    results: tokio::sync::mpsc::UnboundedSender<Finished>,
}

/// Takes a key out of the in-flight set when the attempt ends, however it ends.
struct InFlight(Arc<Mutex<InFlightSet>>, String);

/// What is in flight. An attempt that ends (recorded, or dropped) goes to `done`, and
/// leaves `live` only when the next dispatch starts, before it reads the due deliveries:
/// a read that began before an outcome committed must not see that delivery as free, or
/// it would be sent twice.
#[derive(Default)]
struct InFlightSet {
    live: HashSet<String>,
    done: Vec<String>,
}

impl InFlightSet {
    /// Lets go of the attempts that ended; how many are still in flight.
    fn settle(&mut self) -> usize {
        for k in std::mem::take(&mut self.done) {
            self.live.remove(&k);
        }
        self.live.len()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .lock()
            .expect("not poisoned")
            .done
            .push(std::mem::take(&mut self.1));
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

    /// Sends one attempt and hands its outcome to the recorder; the delivery stays in
    /// flight until the outcome is committed.
    async fn attempt(self, d: DueDelivery) {
        let in_flight = InFlight(self.in_flight.clone(), d.delivery.delivery_id.clone());
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
        let _ = self.results.send(Finished {
            delivery: d,
            sent,
            started_at,
            fence: self.fence.clone(),
            _in_flight: in_flight,
        });
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

/// Commits finished attempts in groups: one transaction (one fence check) for up to
/// [`RECORD_BATCH`] outcomes, so the store is not the limit of how fast deliveries go out.
/// A group that fails to commit (the lease moved, the store failed) is dropped whole: its
/// deliveries are still due and are sent again, with the same `webhook-id`.
async fn record_loop(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Finished>,
    store: Store,
    settings: Arc<DispatchSettings>,
    freed: Arc<tokio::sync::Notify>,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < RECORD_BATCH {
            match rx.try_recv() {
                Ok(f) => group.push(f),
                Err(_) => break,
            }
        }
        // One fence per transaction: a group spanning a change of term splits there.
        let mut start = 0;
        while start < group.len() {
            let term = group[start].fence.term;
            let end = group[start..]
                .iter()
                .position(|f| f.fence.term != term)
                .map(|p| start + p)
                .unwrap_or(group.len());
            if let Err(e) = record_group(&store, &settings, &group[start..end]).await {
                match e {
                    ReconcileError::Deposed(_) => tracing::info!(
                        attempts = end - start,
                        "attempts not recorded: the dispatcher lease moved; they are sent again"
                    ),
                    e => tracing::warn!(error = %e, attempts = end - start,
                        "recording delivery attempts failed; they are sent again"),
                }
            }
            start = end;
        }
        drop(group);
        freed.notify_waiters();
    }
}

async fn record_group(
    store: &Store,
    settings: &DispatchSettings,
    group: &[Finished],
) -> Result<(), ReconcileError> {
    let mut tx = store.write().await?;
    fenced(&mut tx, &group[0].fence).await?;
    let mut logs = Vec::new();
    // Subscriptions whose failing mark this group already cleared (or found clear).
    let mut clear = HashSet::new();
    for f in group {
        if let Some(log) = record_one(&mut tx, settings, f, &mut clear).await? {
            logs.push(log);
        }
    }
    tx.commit().await?;
    for (webhook, delivery, outcome, status, error, next) in logs {
        match outcome {
            Outcome::Gone => {
                tracing::warn!(webhook = %webhook, "destination answered 410: subscription disabled")
            }
            o => tracing::info!(
                webhook = %webhook,
                delivery = %delivery,
                outcome = o.as_str(),
                status = ?status,
                error = ?error,
                next_attempt_at = ?next,
                "delivery attempt failed"
            ),
        }
    }
    Ok(())
}

/// What a failed attempt logs once its record committed.
type AttemptLog = (
    String,
    String,
    Outcome,
    Option<u16>,
    Option<String>,
    Option<String>,
);

/// Records one outcome and what it decides: the delivery's next state and attempt, and
/// the subscription's failing mark, disabling or recovery (with its event).
async fn record_one(
    tx: &mut WriteTx,
    settings: &DispatchSettings,
    f: &Finished,
    clear: &mut HashSet<String>,
) -> Result<Option<AttemptLog>, ReconcileError> {
    let d = &f.delivery;
    let sent = &f.sent;
    let outcome = Outcome::of(sent);
    let now_t = chrono::Utc::now();
    let now = persistence::fmt_time(now_t);
    let made = d.delivery.schedule_pos as usize + 1;
    let (state, next) = if outcome == Outcome::Delivered {
        ("succeeded", None)
    } else if made >= settings.schedule_ms.len() {
        ("failed", None)
    } else {
        let planned = Duration::from_millis(with_jitter(settings.schedule_ms[made]));
        let wait = match sent.retry_after {
            Some(ra) => ra.min(settings.max_retry_after),
            None => planned,
        };
        let at = now_t + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1));
        ("pending", Some(persistence::fmt_time(at)))
    };
    let status = sent.attempt.status.map(i64::from);
    let recorded = tx
        .record_attempt(&AttemptResult {
            delivery_id: &d.delivery.delivery_id,
            schedule_pos: d.delivery.schedule_pos,
            started_at: &f.started_at,
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
        return Ok(None);
    }
    let webhook = &d.delivery.webhook_id;
    let mut record: Option<(&'static str, serde_json::Value)> = None;
    match outcome {
        Outcome::Delivered if clear.contains(webhook) => {}
        Outcome::Delivered => {
            clear.insert(webhook.clone());
            if let Some(since) = tx.clear_webhook_failing(webhook).await? {
                record = Some((
                    "WEBHOOK_RECOVERED",
                    json!({"failing_since": since, "reenabled": false,
                           "delivery_id": d.delivery.delivery_id}),
                ));
            }
        }
        Outcome::Gone => {
            if tx.disable_webhook(webhook, "gone", None, &now).await? {
                record = Some((
                    "WEBHOOK_DISABLED",
                    json!({"reason": "gone", "status": 410, "failing_since": null,
                           "delivery_id": d.delivery.delivery_id}),
                ));
            }
        }
        _ => {
            clear.remove(webhook);
            let since = tx.mark_webhook_failing(webhook, &f.started_at).await?;
            let failing_for = persistence::parse_time(&since)
                .map(|t| now_t - t)
                .and_then(|d| d.to_std().ok())
                .unwrap_or_default();
            if failing_for >= settings.disable_after {
                let probe_at = persistence::fmt_time(
                    now_t
                        + chrono::Duration::from_std(settings.probe_interval)
                            .unwrap_or(chrono::Duration::hours(1)),
                );
                if tx
                    .disable_webhook(webhook, "failing", Some(&probe_at), &now)
                    .await?
                {
                    record = Some((
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
            correlation_id: Some(&persistence::new_id("corr")),
        })
        .await?;
    }
    Ok((outcome != Outcome::Delivered).then(|| {
        (
            webhook.clone(),
            d.delivery.delivery_id.clone(),
            outcome,
            sent.attempt.status,
            sent.attempt.error.clone(),
            next,
        )
    }))
}
