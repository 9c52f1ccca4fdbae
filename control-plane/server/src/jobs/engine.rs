//! The kind-agnostic job engine: workers claim durable jobs with a lease, renew it while
//! they run, and walk the job's steps from the one after the last recorded, so a job resumed
//! after a crash does not redo finished steps. A step's log line, the job's cursor and its
//! state are recorded together; the job's end, its kind's `finish` and the release of its
//! locks commit in one transaction: a job finishes once.
//!
//! Failures are retried with capped, jittered exponential backoff until `max_attempts`;
//! waits requeue without spending an attempt until the kind's wait limit; cancellation is
//! checked between steps. A job keeps its locks through all of these. It never looks at a
//! kind's name: kinds are found in the registry ([`super::kinds`]).

use super::kind::{End, FinishCx, Kind, Next, StepCx, StepError};
use crate::clock::SharedClock;
use crate::config::JobsConfig;
use crate::failpoints::{Action, Failpoints};
use crate::persistence::{self, JobRow, Store};
use crate::service::Service;
use crate::stamping::Stamper;
use cellplane_api::JobState;
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
pub use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The token that stops job workers.
pub type Shutdown = CancellationToken;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct JobMetrics {
    pub claimed: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub cancelled: AtomicU64,
    /// Terraform processes running now (shared with the runner).
    pub terraform_running: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Clone)]
pub struct JobEngine {
    service: Service,
    cfg: Arc<JobsConfig>,
    owner: String,
    stamper: Stamper,
    clock: SharedClock,
    failpoints: Failpoints,
    pub metrics: Arc<JobMetrics>,
}

/// The tokens of one claimed job.
pub struct Tokens {
    /// Cancellation was requested: stop and undo.
    pub cancel: CancellationToken,
    /// The lease was lost or the process stops: stop, undo nothing, leave it to the next
    /// holder.
    pub detach: CancellationToken,
    pub lost: Arc<AtomicBool>,
}

impl Tokens {
    fn gone(&self) -> bool {
        self.lost.load(Ordering::SeqCst) || self.detach.is_cancelled()
    }
}

/// The last step's record, committed with the job's end.
struct LastStep {
    cursor: i64,
    name: &'static str,
    log: String,
    state: serde_json::Value,
}

enum Outcome {
    Succeeded(Option<LastStep>),
    Failed(String),
    Cancelled,
    Retry(String),
    /// Waiting on something slow; requeue without spending an attempt.
    Defer(String),
    /// The lease was lost or the process is stopping: leave the job to whoever holds it.
    Abandoned,
}

impl JobEngine {
    pub fn new(
        service: Service,
        cfg: JobsConfig,
        stamper: Stamper,
        clock: SharedClock,
        failpoints: Failpoints,
    ) -> Self {
        Self {
            service,
            cfg: Arc::new(cfg),
            owner: persistence::new_id("worker"),
            metrics: Arc::new(JobMetrics {
                terraform_running: stamper.terraform().running_counter(),
                ..Default::default()
            }),
            stamper,
            clock,
            failpoints,
        }
    }

    pub fn service(&self) -> &Service {
        &self.service
    }

    pub fn stamper(&self) -> &Stamper {
        &self.stamper
    }

    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    pub fn failpoints(&self) -> &Failpoints {
        &self.failpoints
    }

    /// This process's worker identity (the lease owner of the jobs it runs).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn store(&self) -> &Store {
        self.service.store()
    }

    fn lease_ms(&self) -> i64 {
        (self.cfg.lease_secs.max(1) * 1000) as i64
    }

    /// Starts the worker tasks; they stop when `shutdown` is cancelled.
    pub fn spawn(&self, shutdown: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.cfg.workers.max(1))
            .map(|i| {
                let engine = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { engine.worker(i, shutdown).await })
            })
            .collect()
    }

    async fn worker(self, index: usize, shutdown: CancellationToken) {
        let notify = self.service.job_notify();
        tracing::debug!(worker = index, owner = %self.owner, "job worker started");
        while !shutdown.is_cancelled() {
            // Armed before the claim, so an enqueue between the claim and the wait is seen.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.store().claim_job(&self.owner, self.lease_ms()).await {
                Ok(Some(job)) => {
                    // A job's end claims the next one in the same commit while there is
                    // work: one commit per job under load.
                    let mut next = Some(job);
                    while let Some(job) = next.take() {
                        self.metrics.claimed.fetch_add(1, Ordering::Relaxed);
                        next = self.run(job, &shutdown).await;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "claiming a job failed"),
            }
            let poll = Duration::from_millis(self.cfg.poll_ms.max(10));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = &mut notified => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        tracing::debug!(worker = index, "job worker stopped");
    }

    /// Runs a claimed job; returns the next job claimed with its end, if any.
    async fn run(&self, job: JobRow, shutdown: &CancellationToken) -> Option<JobRow> {
        let span = tracing::info_span!("job", job_id = %job.job.job_id, kind = %job.job.kind,
            target = %job.job.target, attempt = job.job.attempts,
            correlation_id = job.job.correlation_id.as_deref().unwrap_or(""));
        self.run_in_span(job, shutdown).instrument(span).await
    }

    async fn run_in_span(&self, job: JobRow, shutdown: &CancellationToken) -> Option<JobRow> {
        tracing::info!(from_step = job.step_index, "job started");
        let tokens = Tokens {
            cancel: CancellationToken::new(),
            // Cancelled when the lease is lost or the process stops: terraform is left
            // running for the next lease holder instead of being interrupted.
            detach: shutdown.child_token(),
            lost: Arc::new(AtomicBool::new(false)),
        };
        let renewer = {
            let engine = self.clone();
            let id = job.job.job_id.clone();
            let (cancel, lost, detach) = (
                tokens.cancel.clone(),
                tokens.lost.clone(),
                tokens.detach.clone(),
            );
            let every = Duration::from_millis((self.cfg.lease_secs.max(1) * 1000) / 3);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match engine
                        .store()
                        .renew_lease(&id, &engine.owner, engine.lease_ms())
                        .await
                    {
                        Ok(Some(false)) => {}
                        Ok(Some(true)) => cancel.cancel(),
                        Ok(None) => {
                            lost.store(true, Ordering::SeqCst);
                            detach.cancel();
                            break;
                        }
                        Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                    }
                }
            })
        };
        let next = match super::kind(&job.job.kind) {
            Some(kind) => kind.run(self, &job, &tokens).await,
            None => {
                let end = End::Failed(format!("unknown job kind {:?}", job.job.kind));
                if let Err(e) = self.end_without_kind(&job, &end).await {
                    tracing::error!(error = %e, "recording the job's outcome failed");
                }
                None
            }
        };
        renewer.abort();
        self.service.job_changed().notify_waiters();
        next.filter(|_| !shutdown.is_cancelled())
    }

    async fn end_without_kind(
        &self,
        job: &JobRow,
        end: &End,
    ) -> Result<(), persistence::StoreError> {
        let mut tx = self.store().write().await?;
        if tx
            .finish_job(&job.job.job_id, &self.owner, end.job_state(), end.error())
            .await?
        {
            tx.release_locks(&job.job.job_id).await?;
            tx.commit().await?;
            self.count(end.job_state());
        }
        Ok(())
    }

    fn count(&self, state: JobState) {
        match state {
            JobState::Succeeded => self.metrics.succeeded.fetch_add(1, Ordering::Relaxed),
            JobState::Cancelled => self.metrics.cancelled.fetch_add(1, Ordering::Relaxed),
            _ => self.metrics.failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// A failpoint named `name` for this job, turned into what the step loop does.
    async fn failpoint(&self, name: &str, job: &JobRow, tokens: &Tokens) -> Option<Outcome> {
        let action = self.failpoints.hit(name, job.job.attempts)?;
        Some(match action {
            Action::Kill => unreachable!("a kill failpoint does not return"),
            Action::Stop => return None,
            Action::Error => Outcome::Retry(format!("failpoint {name}")),
            Action::Fatal => Outcome::Failed(format!("failpoint {name}")),
            Action::Wait => Outcome::Defer(format!("failpoint {name}")),
            Action::Pause => {
                tokio::select! {
                    _ = tokens.cancel.cancelled() => Outcome::Cancelled,
                    _ = tokens.detach.cancelled() => Outcome::Abandoned,
                }
            }
        })
    }

    /// A waiting step is retried until the kind's wait limit, counted from the job's first
    /// start.
    fn defer_or_give_up(&self, job: &JobRow, limit: Duration, step: &str, why: String) -> Outcome {
        let started = job
            .job
            .started_at
            .as_deref()
            .and_then(persistence::parse_time);
        wait_or_give_up(self.clock.now(), started, limit, step, why)
    }
}

/// The decision of a waiting step at `now`: wait more, or fail once `limit` has passed
/// since the job first started.
fn wait_or_give_up(
    now: chrono::DateTime<chrono::Utc>,
    started: Option<chrono::DateTime<chrono::Utc>>,
    limit: Duration,
    step: &str,
    why: String,
) -> Outcome {
    let limit = chrono::Duration::from_std(limit).unwrap_or(chrono::Duration::hours(1));
    if now - started.unwrap_or(now) > limit {
        return Outcome::Failed(format!(
            "{step}: gave up after {} s: {why}",
            limit.num_seconds()
        ));
    }
    Outcome::Defer(format!("{step}: {why}"))
}

/// Runs a claimed job of kind `K` through its remaining steps and records the outcome;
/// returns the next job claimed in the same commit as its end, if any.
pub(super) async fn drive<K: Kind>(
    kind: &K,
    engine: &JobEngine,
    job: &JobRow,
    tokens: &Tokens,
) -> Option<JobRow> {
    let spec: K::Spec = match serde_json::from_value(job.payload.clone()) {
        Ok(s) => s,
        Err(e) => {
            let end = End::Failed(format!("the job's spec is invalid: {e}"));
            if let Err(e) = engine.end_without_kind(job, &end).await {
                tracing::error!(error = %e, "recording the job's outcome failed");
            }
            return None;
        }
    };
    let mut state: K::State = serde_json::from_value(job.state.clone()).unwrap_or_default();
    let outcome = if job.job.cancel_requested {
        Outcome::Cancelled
    } else {
        steps(kind, engine, job, tokens, &spec, &mut state).await
    };
    let claim_next = !tokens.gone();
    conclude(kind, engine, job, outcome, &spec, &state, claim_next).await
}

async fn steps<K: Kind>(
    kind: &K,
    engine: &JobEngine,
    job: &JobRow,
    tokens: &Tokens,
    spec: &K::Spec,
    state: &mut K::State,
) -> Outcome {
    let names = kind.steps();
    let total = names.len() as f64;
    let start = job.step_index.max(0) as usize;
    let cx = StepCx {
        engine,
        job,
        cancel: &tokens.cancel,
        detach: &tokens.detach,
    };
    for (i, name) in names.iter().enumerate().skip(start) {
        if tokens.gone() {
            return Outcome::Abandoned;
        }
        if tokens.cancel.is_cancelled() {
            return Outcome::Cancelled;
        }
        let point = format!("{}/{name}", K::NAME);
        if let Some(o) = engine.failpoint(&point, job, tokens).await {
            return match o {
                Outcome::Defer(why) => {
                    engine.defer_or_give_up(job, kind.wait_limit(engine.service()), name, why)
                }
                o => o,
            };
        }
        let (line, last) = match kind.step(&cx, spec, state, i).await {
            Ok(Next::Continue(line)) => (format!("step {name} done: {line}"), i + 1 == names.len()),
            Ok(Next::Done(why)) => (format!("step {name} ends the job: {why}"), true),
            Ok(Next::Wait(why)) => {
                return engine.defer_or_give_up(job, kind.wait_limit(engine.service()), name, why)
            }
            Err(StepError::Fatal(e)) => return Outcome::Failed(format!("{name}: {e}")),
            Err(StepError::Retryable(e)) => return Outcome::Retry(format!("{name}: {e}")),
            Err(StepError::Cancelled) => return Outcome::Cancelled,
            Err(StepError::Abandoned) => return Outcome::Abandoned,
        };
        if let Some(o) = engine
            .failpoint(&format!("{point}/after"), job, tokens)
            .await
        {
            return o;
        }
        let state_json = serde_json::to_value(&*state).expect("job states serialize");
        let log = format!("{} {line}\n", persistence::now());
        if last {
            if tokens.gone() {
                return Outcome::Abandoned;
            }
            if tokens.cancel.is_cancelled() {
                return Outcome::Cancelled;
            }
            // Recorded with the job's end, in one commit.
            return Outcome::Succeeded(Some(LastStep {
                cursor: names.len() as i64,
                name,
                log,
                state: state_json,
            }));
        }
        let progress = (i as f64 + 1.0) / (total + 1.0);
        match engine
            .store()
            .job_progress(
                &job.job.job_id,
                &engine.owner,
                progress,
                Some(i as i64 + 1),
                name,
                &log,
                Some(&state_json),
            )
            .await
        {
            Ok(true) => engine.service.job_changed().notify_waiters(),
            Ok(false) => return Outcome::Abandoned,
            Err(e) => return Outcome::Retry(format!("recording progress: {e}")),
        }
        if engine.cfg.step_delay_ms > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(engine.cfg.step_delay_ms)) => {}
                _ = tokens.cancel.cancelled() => {}
                _ = tokens.detach.cancelled() => return Outcome::Abandoned,
            }
        }
    }
    if tokens.gone() {
        return Outcome::Abandoned;
    }
    if tokens.cancel.is_cancelled() {
        return Outcome::Cancelled;
    }
    Outcome::Succeeded(None)
}

#[allow(clippy::too_many_arguments)]
async fn conclude<K: Kind>(
    kind: &K,
    engine: &JobEngine,
    job: &JobRow,
    outcome: Outcome,
    spec: &K::Spec,
    state: &K::State,
    claim_next: bool,
) -> Option<JobRow> {
    let id = &job.job.job_id;
    let end = match outcome {
        Outcome::Abandoned => {
            tracing::info!("job left to its next lease holder");
            return None;
        }
        Outcome::Retry(err) if job.job.attempts < job.job.max_attempts => {
            let after = backoff_for(&engine.cfg, job.job.attempts);
            tracing::warn!(error = %err, retry_in_ms = after.as_millis() as u64, "job attempt failed, retrying");
            engine.metrics.retried.fetch_add(1, Ordering::Relaxed);
            let at = engine.clock.now()
                + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(1));
            if let Err(e) = engine
                .store()
                .requeue_job(id, &engine.owner, &err, at)
                .await
            {
                tracing::error!(error = %e, "recording the job's outcome failed");
            }
            return None;
        }
        Outcome::Defer(why) => {
            // Look again soon at first, then less often (at most every 2 s).
            let poll = kind.wait_poll(engine.service()).as_millis() as u64;
            let now = engine.clock.now();
            let waited = job
                .job
                .started_at
                .as_deref()
                .and_then(persistence::parse_time)
                .map(|t| (now - t).num_milliseconds().max(0) as u64)
                .unwrap_or(0);
            let after = Duration::from_millis((waited / 10).clamp(poll, poll.max(2000)));
            tracing::debug!(reason = %why, "job waits");
            let at =
                now + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(1));
            if let Err(e) = engine.store().defer_job(id, &engine.owner, &why, at).await {
                tracing::error!(error = %e, "recording the job's outcome failed");
            }
            return None;
        }
        Outcome::Retry(err) | Outcome::Failed(err) => (End::Failed(err), None),
        Outcome::Cancelled => (End::Cancelled, None),
        Outcome::Succeeded(last) => (End::Succeeded, last),
    };
    let (end, last) = end;
    match finalize(kind, engine, job, spec, state, end, last, claim_next).await {
        Ok(next) => next,
        Err(e) => {
            // The lease will expire and the job will be picked up again.
            tracing::error!(error = %e, "recording the job's outcome failed");
            None
        }
    }
}

/// Commits the job's last step, its end, its kind's finish and the release of its locks in
/// one transaction, and claims the worker's next job in it too.
#[allow(clippy::too_many_arguments)]
async fn finalize<K: Kind>(
    kind: &K,
    engine: &JobEngine,
    job: &JobRow,
    spec: &K::Spec,
    state: &K::State,
    end: End,
    last: Option<LastStep>,
    claim_next: bool,
) -> Result<Option<JobRow>, persistence::StoreError> {
    let mut tx = engine.store().write().await?;
    let held = match &last {
        Some(l) => {
            tx.finish_job_with_step(
                &job.job.job_id,
                &engine.owner,
                end.job_state(),
                end.error(),
                l.cursor,
                l.name,
                &l.log,
                &l.state,
            )
            .await?
        }
        None => {
            tx.finish_job(&job.job.job_id, &engine.owner, end.job_state(), end.error())
                .await?
        }
    };
    if !held {
        tracing::info!("job lease lost before it could finish; leaving it");
        return Ok(None);
    }
    let cx = FinishCx {
        service: &engine.service,
        job,
    };
    let finished = kind.finish(&mut tx, &cx, spec, state, &end).await?;
    tx.release_locks(&job.job.job_id).await?;
    let next = if claim_next {
        tx.claim_next_job(&engine.owner, engine.lease_ms()).await?
    } else {
        None
    };
    tx.commit().await?;
    if let Some(rev) = finished.routes_revision {
        engine.service.route_revisions().observe(rev);
    }
    engine.count(end.job_state());
    tracing::info!(
        state = end.job_state().as_str(),
        error = end.error().unwrap_or(""),
        "job finished"
    );
    Ok(next)
}

/// Capped exponential backoff with jitter in [half, full] of the step.
pub fn backoff_for(cfg: &JobsConfig, attempt: i64) -> Duration {
    let exp = 2u64.saturating_pow((attempt.max(1) - 1).min(30) as u32);
    let full = cfg
        .backoff_base_ms
        .saturating_mul(exp)
        .min(cfg.backoff_cap_ms);
    let jittered = rand::thread_rng().gen_range(full / 2..=full.max(1));
    Duration::from_millis(jittered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    #[test]
    fn a_wait_gives_up_after_the_limit_by_the_injected_clock() {
        let clock = ManualClock::new(chrono::Utc::now());
        let started = Some(clock.now());
        let limit = Duration::from_secs(900);
        let wait =
            |c: &ManualClock| wait_or_give_up(c.now(), started, limit, "place", "stamping".into());
        assert!(matches!(wait(&clock), Outcome::Defer(_)));
        clock.advance(chrono::Duration::seconds(899));
        assert!(matches!(wait(&clock), Outcome::Defer(_)));
        clock.advance(chrono::Duration::seconds(2));
        match wait(&clock) {
            Outcome::Failed(e) => assert!(e.contains("gave up after 900 s"), "{e}"),
            _ => panic!("still waiting past the limit"),
        }
    }

    #[test]
    fn backoff_is_exponential_jittered_and_capped() {
        let cfg = JobsConfig {
            backoff_base_ms: 100,
            backoff_cap_ms: 1000,
            ..JobsConfig::default()
        };
        for _ in 0..50 {
            let first = backoff_for(&cfg, 1).as_millis();
            assert!((50..=100).contains(&first), "{first}");
            let third = backoff_for(&cfg, 3).as_millis();
            assert!((200..=400).contains(&third), "{third}");
            let capped = backoff_for(&cfg, 30).as_millis();
            assert!((500..=1000).contains(&capped), "{capped}");
        }
    }
}
