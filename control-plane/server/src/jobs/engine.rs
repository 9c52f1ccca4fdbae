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

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use crate::clock::SharedClock;
use crate::config::JobsConfig;
use crate::failpoints::{Action, Failpoints};
use crate::persistence::{self, JobEnd, JobRow, LastStepRecord, Store};
use crate::shared::Shared;
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
    shared: Shared,
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
    /// The worker's way to the engine's ender (none outside the workers).
    ender: Option<Ender>,
}

/// Sends job ends to the task that commits them together.
type Ender = tokio::sync::mpsc::Sender<Ending>;

/// Most job ends one transaction takes.
const MAX_END_BATCH: usize = 64;

/// A job's end, waiting to be committed: the job (with its final state), how it ended, its
/// last step, and whether its worker wants its next job claimed in the same commit.
struct Ending {
    /// The kind's finish with the job's spec and in-memory state (which may hold what is
    /// never persisted, such as a stamp's outputs).
    finish: Box<dyn PendingFinish>,
    job: JobRow,
    end: End,
    last: Option<LastStep>,
    claim_next: bool,
    reply: tokio::sync::oneshot::Sender<Result<Ended, persistence::StoreError>>,
}

/// A kind's finish waiting for the transaction that ends its job.
trait PendingFinish: Send + Sync {
    fn finish<'a>(
        &'a self,
        tx: &'a mut persistence::WriteTx,
        shared: &'a Shared,
        job: &'a JobRow,
        end: &'a End,
    ) -> futures_util::future::BoxFuture<'a, Result<Finished, persistence::StoreError>>;
}

struct TypedFinish<K: Kind> {
    kind: &'static K,
    spec: K::Spec,
    state: K::State,
}

impl<K: Kind> PendingFinish for TypedFinish<K> {
    fn finish<'a>(
        &'a self,
        tx: &'a mut persistence::WriteTx,
        shared: &'a Shared,
        job: &'a JobRow,
        end: &'a End,
    ) -> futures_util::future::BoxFuture<'a, Result<Finished, persistence::StoreError>> {
        Box::pin(async move {
            let cx = FinishCx { shared, job };
            self.kind
                .finish(tx, &cx, &self.spec, &self.state, end)
                .await
        })
    }
}

/// What committing a job's end did.
struct Ended {
    /// False when the lease was lost before the end: nothing was changed.
    held: bool,
    finished: Finished,
    next: Option<JobRow>,
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
        shared: Shared,
        cfg: JobsConfig,
        stamper: Stamper,
        clock: SharedClock,
        failpoints: Failpoints,
    ) -> Self {
        Self {
            shared,
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

    /// The registry, settings, placement and routing the job steps work with.
    pub fn shared(&self) -> &Shared {
        &self.shared
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
        self.shared.store()
    }

    fn lease_ms(&self) -> i64 {
        (self.cfg.lease_secs.max(1) * 1000) as i64
    }

    /// Starts the worker tasks; they stop when `shutdown` is cancelled.
    pub fn spawn(&self, shutdown: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        // The ender runs until the last worker drops its sender, so ends sent while the
        // process stops are still committed.
        let (ender, rx) = tokio::sync::mpsc::channel(MAX_END_BATCH);
        tokio::spawn(self.clone().run_ender(rx));
        (0..self.cfg.workers.max(1))
            .map(|i| {
                let engine = self.clone();
                let shutdown = shutdown.clone();
                let ender = ender.clone();
                tokio::spawn(async move { engine.worker(i, shutdown, ender).await })
            })
            .collect()
    }

    /// Group commit of job ends: the ends that arrive while a transaction is committing go
    /// together in the next one, with one statement ending them all and one releasing their
    /// locks and claiming their workers' next jobs. Under no load a batch is one end, so
    /// latency is unchanged; under load one commit serves many jobs.
    async fn run_ender(self, mut rx: tokio::sync::mpsc::Receiver<Ending>) {
        // Batches in flight at once: one alone would make every job wait for the commit
        // before its own, so a few run side by side (their commits meet in the store's own
        // group commit) and the ends that arrive meanwhile wait together for a free slot.
        let slots = end_slots(self.cfg.workers);
        let free = Arc::new(tokio::sync::Semaphore::new(slots));
        while let Some(first) = rx.recv().await {
            let Ok(slot) = free.clone().acquire_owned().await else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_END_BATCH {
                match rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            let engine = self.clone();
            tokio::spawn(async move {
                engine.end_batch(batch).await;
                drop(slot);
            });
        }
        let _ = free.acquire_many(slots as u32).await;
    }

    /// Commits `batch` in one transaction; if that fails (one kind's finish failed, or the
    /// store did), each end is committed on its own so one failure touches no other job.
    async fn end_batch(&self, batch: Vec<Ending>) {
        if batch.len() > 1 {
            let all: Vec<&Ending> = batch.iter().collect();
            match self.end_together(&all).await {
                Ok(done) => {
                    for (e, d) in batch.into_iter().zip(done) {
                        let _ = e.reply.send(Ok(d));
                    }
                    return;
                }
                Err(err) => tracing::warn!(error = %err, jobs = batch.len(),
                    "ending jobs together failed; ending them one by one"),
            }
        }
        for e in batch {
            let res = self
                .end_together(&[&e])
                .await
                .map(|mut d| d.pop().expect("one end"));
            let _ = e.reply.send(res);
        }
    }

    /// One transaction: ends the jobs still held (recording their last steps), runs each
    /// kind's finish, releases their locks and claims the next jobs their workers want.
    async fn end_together(&self, batch: &[&Ending]) -> Result<Vec<Ended>, persistence::StoreError> {
        let mut tx = self.store().write().await?;
        let records: Vec<JobEnd<'_>> = batch
            .iter()
            .map(|e| JobEnd {
                job_id: &e.job.job.job_id,
                state: e.end.job_state(),
                error: e.end.error(),
                last: e.last.as_ref().map(|l| LastStepRecord {
                    step_index: l.cursor,
                    step: l.name,
                    log: &l.log,
                    state: &l.state,
                }),
            })
            .collect();
        let ended: std::collections::HashSet<String> = tx
            .end_jobs(&self.owner, &records)
            .await?
            .into_iter()
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        for e in batch {
            let held = ended.contains(&e.job.job.job_id);
            let finished = if held {
                // The tenant controller looks again at a tenant whose job ended, and at
                // tenants waiting for capacity when a cell's job ended.
                if let Some(tenant) = e.job.job.target.strip_prefix("tenant/") {
                    tx.wake_tenant(tenant).await?;
                } else if e.job.job.target.starts_with("cell/") {
                    tx.wake_waiting_tenants().await?;
                }
                e.finish
                    .finish(&mut tx, &self.shared, &e.job, &e.end)
                    .await?
            } else {
                Finished::default()
            };
            out.push(Ended {
                held,
                finished,
                next: None,
            });
        }
        let released: Vec<&str> = batch
            .iter()
            .filter(|e| ended.contains(&e.job.job.job_id))
            .map(|e| e.job.job.job_id.as_str())
            .collect();
        let want = batch
            .iter()
            .zip(&out)
            .filter(|(e, d)| e.claim_next && d.held)
            .count();
        let mut next = tx
            .release_locks_and_claim(&released, &self.owner, self.lease_ms(), want)
            .await?;
        tx.commit().await?;
        if batch.iter().zip(&out).any(|(e, d)| {
            d.held
                && (e.job.job.target.starts_with("tenant/")
                    || e.job.job.target.starts_with("cell/"))
        }) {
            // The tenant controller converges what this end made due at once.
            self.shared.desired_changed.notify_waiters();
        }
        for (e, d) in batch.iter().zip(out.iter_mut()) {
            if e.claim_next && d.held {
                d.next = next.pop();
            }
        }
        Ok(out)
    }

    async fn worker(self, index: usize, shutdown: CancellationToken, ender: Ender) {
        let notify = self.shared.job_notify.clone();
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
                        next = self.run(job, &shutdown, &ender).await;
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
    async fn run(
        &self,
        job: JobRow,
        shutdown: &CancellationToken,
        ender: &Ender,
    ) -> Option<JobRow> {
        let span = tracing::info_span!("job", job_id = %job.job.job_id, kind = %job.job.kind,
            target = %job.job.target, attempt = job.job.attempts,
            correlation_id = job.job.correlation_id.as_deref().unwrap_or(""));
        self.run_in_span(job, shutdown, ender)
            .instrument(span)
            .await
    }

    async fn run_in_span(
        &self,
        job: JobRow,
        shutdown: &CancellationToken,
        ender: &Ender,
    ) -> Option<JobRow> {
        tracing::info!(from_step = job.step_index, "job started");
        let tokens = Tokens {
            cancel: CancellationToken::new(),
            // Cancelled when the lease is lost or the process stops: terraform is left
            // running for the next lease holder instead of being interrupted.
            detach: shutdown.child_token(),
            lost: Arc::new(AtomicBool::new(false)),
            ender: Some(ender.clone()),
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
        self.shared.job_changed.notify_waiters();
        next.filter(|_| !shutdown.is_cancelled())
    }

    async fn end_without_kind(
        &self,
        job: &JobRow,
        end: &End,
    ) -> Result<(), persistence::StoreError> {
        let mut tx = self.store().write().await?;
        if tx
            .end_job(
                &job.job.job_id,
                &self.owner,
                end.job_state(),
                end.error(),
                None,
            )
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
    kind: &'static K,
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
    conclude(kind, engine, job, outcome, spec, state, claim_next, tokens).await
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
                    engine.defer_or_give_up(job, kind.wait_limit(engine.shared()), name, why)
                }
                o => o,
            };
        }
        let (line, last) = match kind.step(&cx, spec, state, i).await {
            Ok(Next::Continue(line)) => (format!("step {name} done: {line}"), i + 1 == names.len()),
            Ok(Next::Done(why)) => (format!("step {name} ends the job: {why}"), true),
            Ok(Next::Wait(why)) => {
                return engine.defer_or_give_up(job, kind.wait_limit(engine.shared()), name, why)
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
            Ok(true) => engine.shared.job_changed.notify_waiters(),
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
    kind: &'static K,
    engine: &JobEngine,
    job: &JobRow,
    outcome: Outcome,
    spec: K::Spec,
    state: K::State,
    claim_next: bool,
    tokens: &Tokens,
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
            let poll = kind.wait_poll(engine.shared()).as_millis() as u64;
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
    if end != End::Succeeded {
        // Effects outside the registry (calls to cells) are undone before the transaction
        // that ends the job; a crash here resumes the job at its recorded step.
        let cx = StepCx {
            engine,
            job,
            cancel: &tokens.cancel,
            detach: &tokens.detach,
        };
        kind.undo(&cx, &spec, &state, &end).await;
    }
    let finish = Box::new(TypedFinish { kind, spec, state });
    match finalize(
        engine,
        job,
        finish,
        end,
        last,
        claim_next,
        tokens.ender.as_ref(),
    )
    .await
    {
        Ok(next) => next,
        Err(e) => {
            // The lease will expire and the job will be picked up again.
            tracing::error!(error = %e, "recording the job's outcome failed");
            None
        }
    }
}

/// Commits the job's last step, its end, its kind's finish and the release of its locks in
/// one transaction, and claims the worker's next job in it too. Through the worker's ender,
/// that transaction is shared with other jobs ending at the same time.
async fn finalize(
    engine: &JobEngine,
    job: &JobRow,
    finish: Box<dyn PendingFinish>,
    end: End,
    last: Option<LastStep>,
    claim_next: bool,
    ender: Option<&Ender>,
) -> Result<Option<JobRow>, persistence::StoreError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let ending = Ending {
        finish,
        job: job.clone(),
        end: end.clone(),
        last,
        claim_next,
        reply,
    };
    let ended = match ender {
        Some(ender) => {
            if ender.send(ending).await.is_err() {
                return Err(persistence::StoreError::Corrupt(
                    "the job ender stopped".into(),
                ));
            }
            answer
                .await
                .map_err(|_| persistence::StoreError::Corrupt("the job ender stopped".into()))??
        }
        None => {
            engine.end_batch(vec![ending]).await;
            answer
                .await
                .map_err(|_| persistence::StoreError::Corrupt("the job ender stopped".into()))??
        }
    };
    if !ended.held {
        tracing::info!("job lease lost before it could finish; leaving it");
        return Ok(None);
    }
    if let Some(rev) = ended.finished.routes_revision {
        engine.shared.route_revisions().observe(rev);
    }
    engine.count(end.job_state());
    tracing::info!(
        state = end.job_state().as_str(),
        error = end.error().unwrap_or(""),
        "job finished"
    );
    Ok(ended.next)
}

/// How many batches of job ends commit at once for `workers` workers.
fn end_slots(workers: usize) -> usize {
    workers.div_ceil(2).max(1)
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

    /// An engine over `store` with default settings, built from its parts (no server).
    fn engine_on(store: Store, dir: &std::path::Path) -> JobEngine {
        let templates = crate::iac::Catalog::new(dir.join("templates"));
        let shared = Shared::new(
            store.clone(),
            crate::shared::ServiceSettings {
                job_max_attempts: 3,
                job_wait_secs: 60,
                job_wait_poll_ms: 100,
                routing: Default::default(),
                placement: Default::default(),
                templates: templates.clone(),
                port_range: (20_000, 21_000),
                event_source: "test".into(),
                webhooks_allow_private: false,
                webhook_secrets: None,
                webhook_rotation_grace_secs: 60,
                moves: Default::default(),
                metrics: Default::default(),
            },
        );
        let terraform = crate::iac::runner::Terraform::new(crate::iac::runner::RunnerSettings {
            binary: "terraform".into(),
            data_dir: dir.to_path_buf(),
            provider_mirror: None,
            concurrency: 1,
            lock_timeout_secs: 5,
            cancel_grace: Duration::from_secs(1),
            path: String::new(),
            pass_env: Vec::new(),
            env: Default::default(),
            backend: crate::iac::runner::StateBackend::Local,
        })
        .expect("a terraform runner");
        let stamper = Stamper::new(store, templates, terraform, None);
        JobEngine::new(
            shared,
            JobsConfig::default(),
            stamper,
            crate::clock::system(),
            Failpoints::default(),
        )
    }

    /// A finish that fails, standing for a kind whose finish hits a store error.
    struct FailingFinish;

    impl PendingFinish for FailingFinish {
        fn finish<'a>(
            &'a self,
            _tx: &'a mut persistence::WriteTx,
            _shared: &'a Shared,
            _job: &'a JobRow,
            _end: &'a End,
        ) -> futures_util::future::BoxFuture<'a, Result<Finished, persistence::StoreError>>
        {
            Box::pin(async { Err(persistence::StoreError::Corrupt("finish failed".into())) })
        }
    }

    // Ends committed together fall back to one transaction each when one of them fails,
    // so a failing finish costs no other job its end.
    #[tokio::test]
    async fn a_failing_finish_in_a_batch_spoils_no_other_end() {
        use crate::jobs::noop::{NoState, Noop, NoopSpec};
        static NOOP: Noop = Noop;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(None, dir.path(), 4).await.unwrap();
        let engine = engine_on(store.clone(), dir.path());
        let mut tx = store.write().await.unwrap();
        for r in ["bench/a", "bench/b"] {
            let spec = NoopSpec {
                resource: r.to_string(),
            };
            crate::jobs::enqueue::<Noop>(&mut tx, &spec, 3, None)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let a = store
            .claim_job(engine.owner(), 30_000)
            .await
            .unwrap()
            .unwrap();
        let b = store
            .claim_job(engine.owner(), 30_000)
            .await
            .unwrap()
            .unwrap();
        let ending = |job: &JobRow, finish: Box<dyn PendingFinish>| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let e = Ending {
                finish,
                job: job.clone(),
                end: End::Succeeded,
                last: None,
                claim_next: true,
                reply,
            };
            (e, answer)
        };
        let (ea, ra) = ending(&a, Box::new(FailingFinish));
        let spec_b: NoopSpec = serde_json::from_value(b.payload.clone()).unwrap();
        let (eb, rb) = ending(
            &b,
            Box::new(TypedFinish {
                kind: &NOOP,
                spec: spec_b,
                state: NoState::default(),
            }),
        );
        engine.end_batch(vec![ea, eb]).await;
        assert!(ra.await.unwrap().is_err(), "the failing finish is reported");
        let done = rb.await.unwrap().expect("the other end commits");
        assert!(done.held);
        let a_now = store.get_job(&a.job.job_id).await.unwrap().unwrap();
        assert_eq!(
            a_now.job.state,
            JobState::Running,
            "left for its lease to expire"
        );
        let b_now = store.get_job(&b.job.job_id).await.unwrap().unwrap();
        assert_eq!(b_now.job.state, JobState::Succeeded);
        let mut tx = store.write().await.unwrap();
        assert_eq!(
            tx.lock_holder("bench/a").await.unwrap().as_deref(),
            Some(a.job.job_id.as_str())
        );
        assert_eq!(tx.lock_holder("bench/b").await.unwrap(), None);
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
