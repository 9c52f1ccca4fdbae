//! The job engine: workers claim durable jobs with a lease, renew it while they run, and
//! walk the job's step pipeline from the step after the last one recorded, so a job
//! resumed after a crash does not redo finished steps. The final state change of the
//! target and the job's success commit in one transaction: a job finishes once.
//!
//! Steps must be idempotent. Failures are retried with capped, jittered exponential
//! backoff until `max_attempts`; cancellation is checked between steps.
//!
//! Cell jobs (`cell.*`) run through [`crate::stamping`] instead of a step list: each attempt
//! re-renders and re-plans from terraform's state, and a cancel interrupts terraform itself.

use crate::config::JobsConfig;
use crate::iac::{ExecEvent, IacError, RunCtx};
use crate::persistence::{self, AuditInput, JobRow, Store};
use crate::placement::Placement;
use crate::service::Service;
use crate::stamping::{CellAction, CellEffect, StampError, Stamper, PHASES};
use cellplane_api::{CellState, JobState, LifecycleAction, RouteMode, TenantState};
use rand::Rng;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
pub use tokio_util::sync::CancellationToken;
/// The token that stops job workers.
pub type Shutdown = CancellationToken;
use tracing::Instrument;

/// One step of a job's pipeline. Later capabilities (placement, route publication,
/// stamping) add variants here and to [`pipeline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The tenant still exists and is reserved for this job.
    CheckTenant,
    /// The tenant is active (a `tenant.place` job); otherwise the job ends here with nothing
    /// to do: a suspended tenant's environments are placed when it resumes.
    CheckActive,
    /// Every environment of the tenant has its resource mapping recorded.
    PrepareEnvironments,
    /// Every environment holds capacity on a cell (pooled, or its dedicated cell).
    Place,
    /// Every placed environment has a `serve` route.
    PublishServe,
    /// Every placed environment has a `suspended` route.
    PublishSuspended,
    /// Every placed environment without a route gets a `serve` route; others stay as they are.
    PublishMissing,
    /// The tenant has no routes.
    RemoveRoutes,
    /// The tenant's environments hold no capacity (they keep their cell: the data is there).
    ReleaseCapacity,
    /// The tenant's environments hold no capacity and point at no cell.
    ForgetCells,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::CheckTenant => "check-tenant",
            Step::CheckActive => "check-active",
            Step::PrepareEnvironments => "prepare-environments",
            Step::Place => "place",
            Step::PublishServe => "publish-routes",
            Step::PublishSuspended => "suspend-routes",
            Step::PublishMissing => "publish-new-routes",
            Step::RemoveRoutes => "remove-routes",
            Step::ReleaseCapacity => "release-capacity",
            Step::ForgetCells => "forget-cells",
        }
    }
}

/// The steps of each job kind, in order; the commit of the end state follows the last.
pub fn pipeline(kind: &str) -> Option<&'static [Step]> {
    match kind {
        "tenant.activate" => Some(&[
            Step::CheckTenant,
            Step::PrepareEnvironments,
            Step::Place,
            Step::PublishServe,
        ]),
        // An environment created on an active tenant: place what is unplaced and publish.
        "tenant.place" => Some(&[Step::CheckActive, Step::Place, Step::PublishMissing]),
        "tenant.suspend" => Some(&[Step::CheckTenant, Step::PublishSuspended]),
        "tenant.resume" => Some(&[Step::CheckTenant, Step::Place, Step::PublishServe]),
        "tenant.archive" => Some(&[Step::CheckTenant, Step::RemoveRoutes, Step::ReleaseCapacity]),
        "tenant.delete" => Some(&[Step::CheckTenant, Step::RemoveRoutes, Step::ForgetCells]),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    /// Worth another attempt (store hiccup, busy dependency).
    #[error("{0}")]
    Retryable(String),
    /// Will not get better by retrying.
    #[error("{0}")]
    Fatal(String),
    /// Waiting on something that takes time (a cell being stamped): look again later
    /// without spending an attempt.
    #[error("{0}")]
    Wait(String),
    /// Nothing (more) to do: the job succeeds without running its remaining steps.
    #[error("{0}")]
    Skip(String),
}

impl From<crate::service::ServiceError> for StepError {
    fn from(e: crate::service::ServiceError) -> Self {
        match e {
            crate::service::ServiceError::Store(e) => StepError::Retryable(e.to_string()),
            other => StepError::Fatal(other.to_string()),
        }
    }
}

impl From<persistence::StoreError> for StepError {
    fn from(e: persistence::StoreError) -> Self {
        StepError::Retryable(e.to_string())
    }
}

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
    pub metrics: Arc<JobMetrics>,
}

enum Outcome {
    Succeeded(Option<CellEffect>),
    Failed(String),
    Cancelled,
    Retry(String),
    /// Waiting on something slow; requeue without spending an attempt.
    Defer(String),
    /// The lease was lost or the process is stopping: leave the job to whoever holds it.
    Abandoned,
}

impl JobEngine {
    pub fn new(service: Service, cfg: JobsConfig, stamper: Stamper) -> Self {
        Self {
            service,
            cfg: Arc::new(cfg),
            owner: persistence::new_id("worker"),
            metrics: Arc::new(JobMetrics {
                terraform_running: stamper.terraform().running_counter(),
                ..Default::default()
            }),
            stamper,
        }
    }

    fn store(&self) -> &Store {
        self.service.store()
    }

    fn lease_until(&self) -> String {
        persistence::fmt_time(
            chrono::Utc::now() + chrono::Duration::seconds(self.cfg.lease_secs.max(1) as i64),
        )
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
            match self
                .store()
                .claim_job(&self.owner, &self.lease_until())
                .await
            {
                Ok(Some(job)) => {
                    self.metrics.claimed.fetch_add(1, Ordering::Relaxed);
                    self.run(job, &shutdown).await;
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "claiming a job failed"),
            }
            let poll = Duration::from_millis(self.cfg.poll_ms.max(10));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = notify.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        tracing::debug!(worker = index, "job worker stopped");
    }

    async fn run(&self, job: JobRow, shutdown: &CancellationToken) {
        let span = tracing::info_span!("job", job_id = %job.job.job_id, kind = %job.job.kind,
            target = %job.job.target, attempt = job.job.attempts,
            correlation_id = job.job.correlation_id.as_deref().unwrap_or(""));
        self.run_in_span(job, shutdown).instrument(span).await
    }

    async fn run_in_span(&self, job: JobRow, shutdown: &CancellationToken) {
        tracing::info!(from_step = job.step_index, "job started");
        let cancel = CancellationToken::new();
        // Cancelled when the lease is lost or the process stops: terraform is left running
        // for the next lease holder instead of being interrupted.
        let detach = shutdown.child_token();
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renewer = {
            let store = self.store().clone();
            let (id, owner) = (job.job.job_id.clone(), self.owner.clone());
            let (cancel, lost, detach) = (cancel.clone(), lost.clone(), detach.clone());
            let cfg = self.cfg.clone();
            let every = Duration::from_millis((cfg.lease_secs.max(1) * 1000) / 3);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let until = persistence::fmt_time(
                        chrono::Utc::now()
                            + chrono::Duration::seconds(cfg.lease_secs.max(1) as i64),
                    );
                    match store.renew_lease(&id, &owner, &until).await {
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
        let outcome = if let Some(action) = CellAction::from_kind(&job.job.kind) {
            self.execute_cell(&job, action, &cancel, &detach, &lost)
                .await
        } else {
            self.execute(&job, &cancel, &detach, &lost).await
        };
        renewer.abort();
        self.conclude(&job, outcome).await;
    }

    async fn execute(
        &self,
        job: &JobRow,
        cancel: &CancellationToken,
        shutdown: &CancellationToken,
        lost: &std::sync::atomic::AtomicBool,
    ) -> Outcome {
        let Some(steps) = pipeline(&job.job.kind) else {
            return Outcome::Failed(format!("unknown job kind {:?}", job.job.kind));
        };
        if job.job.cancel_requested {
            return Outcome::Cancelled;
        }
        let total = steps.len() as f64 + 1.0;
        let start = job.step_index.max(0) as usize;
        for (i, step) in steps.iter().enumerate().skip(start) {
            if lost.load(Ordering::SeqCst) || shutdown.is_cancelled() {
                return Outcome::Abandoned;
            }
            if cancel.is_cancelled() {
                return Outcome::Cancelled;
            }
            let line = match self.run_step(*step, job).await {
                Ok(line) => line,
                Err(StepError::Fatal(e)) => {
                    return Outcome::Failed(format!("{}: {e}", step.name()))
                }
                Err(StepError::Retryable(e)) => {
                    return Outcome::Retry(format!("{}: {e}", step.name()))
                }
                Err(StepError::Wait(e)) => return self.defer_or_give_up(job, *step, e),
                Err(StepError::Skip(why)) => {
                    let log = format!(
                        "{} step {} ends the job: {why}\n",
                        persistence::now(),
                        step.name()
                    );
                    let recorded = self
                        .store()
                        .job_progress(
                            &job.job.job_id,
                            &self.owner,
                            1.0 - 1.0 / total,
                            steps.len() as i64,
                            step.name(),
                            &log,
                        )
                        .await;
                    return match recorded {
                        Ok(true) => Outcome::Succeeded(None),
                        Ok(false) => Outcome::Abandoned,
                        Err(e) => Outcome::Retry(format!("recording progress: {e}")),
                    };
                }
            };
            let log = format!("{} step {} done: {line}\n", persistence::now(), step.name());
            match self
                .store()
                .job_progress(
                    &job.job.job_id,
                    &self.owner,
                    (i as f64 + 1.0) / total,
                    i as i64 + 1,
                    step.name(),
                    &log,
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => return Outcome::Abandoned,
                Err(e) => return Outcome::Retry(format!("recording progress: {e}")),
            }
            if self.cfg.step_delay_ms > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(self.cfg.step_delay_ms)) => {}
                    _ = cancel.cancelled() => {}
                    _ = shutdown.cancelled() => return Outcome::Abandoned,
                }
            }
        }
        if lost.load(Ordering::SeqCst) {
            return Outcome::Abandoned;
        }
        if cancel.is_cancelled() {
            return Outcome::Cancelled;
        }
        Outcome::Succeeded(None)
    }

    /// Runs a cell job through the stamper while a reporter task turns terraform's events
    /// into progress and log lines on the job.
    async fn execute_cell(
        &self,
        job: &JobRow,
        action: CellAction,
        cancel: &CancellationToken,
        detach: &CancellationToken,
        lost: &std::sync::atomic::AtomicBool,
    ) -> Outcome {
        if job.job.cancel_requested {
            return Outcome::Cancelled;
        }
        let Some(cell_id) = job.payload["cell_id"].as_str() else {
            return Outcome::Failed("job payload has no cell_id".into());
        };
        if action.reserves() {
            if let Err(e) = self.begin_cell_job(job, cell_id, action).await {
                return Outcome::Retry(format!("marking the cell busy: {e}"));
            }
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let reporter = tokio::spawn(report(
            self.store().clone(),
            self.service.job_changed(),
            job.job.job_id.clone(),
            self.owner.clone(),
            rx,
            detach.clone(),
        ));
        let ctx = RunCtx {
            cell_id: cell_id.to_string(),
            job_id: job.job.job_id.clone(),
            attempt: job.job.attempts,
            cancel: cancel.clone(),
            detach: detach.clone(),
            events: tx.clone(),
            secrets: Vec::new(),
        };
        if job.job.attempts > 1 {
            let _ = tx.send(ExecEvent::Log(format!(
                "attempt {}: re-planning from the recorded state",
                job.job.attempts
            )));
        }
        let result = self.stamper.run(action, cell_id, &ctx).await;
        if let Err(e) = &result {
            let _ = tx.send(ExecEvent::Log(format!("error: {e}")));
        }
        drop(ctx);
        drop(tx);
        let _ = reporter.await;
        if lost.load(Ordering::SeqCst) {
            return Outcome::Abandoned;
        }
        match result {
            Ok(effect) => {
                if cancel.is_cancelled() {
                    Outcome::Cancelled
                } else {
                    Outcome::Succeeded(Some(effect))
                }
            }
            Err(StampError::Iac(IacError::Cancelled { .. })) => Outcome::Cancelled,
            Err(StampError::Iac(IacError::Detached { .. })) => Outcome::Abandoned,
            Err(StampError::Iac(IacError::Terraform {
                lock_busy: true,
                diagnostics,
                phase,
            })) => Outcome::Retry(format!("terraform {phase}: {diagnostics}")),
            Err(StampError::Store(e)) => Outcome::Retry(e.to_string()),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// Moves a cell whose job starts into its working state (`provisioning` for a stamp or
    /// the repair of a failed cell); a job resumed after a crash finds it there already.
    async fn begin_cell_job(
        &self,
        job: &JobRow,
        cell_id: &str,
        action: CellAction,
    ) -> Result<(), persistence::StoreError> {
        let mut tx = self.store().write().await?;
        let Some(mut cell) = tx.get_cell_tx(cell_id).await? else {
            return Ok(());
        };
        let to = match (action, cell.state) {
            (CellAction::Stamp, CellState::Pending) => CellState::Provisioning,
            (CellAction::Apply, CellState::Failed) => CellState::Provisioning,
            _ => return Ok(()),
        };
        if cell.pending_job_id.as_deref() != Some(job.job.job_id.as_str()) {
            return Ok(());
        }
        cell.state = to;
        cell.version += 1;
        if tx.update_cell(&cell).await? {
            tx.audit(AuditInput {
                tenant_id: None,
                event_type: "CELL_PROVISIONING",
                actor: "system:jobs",
                target: &job.job.target,
                payload: json!({"job_id": job.job.job_id, "action": action.as_str()}),
                correlation_id: job.job.correlation_id.as_deref(),
            })
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// A waiting step is retried until the placement deadline, counted from the job's
    /// first start.
    fn defer_or_give_up(&self, job: &JobRow, step: Step, why: String) -> Outcome {
        let limit = chrono::Duration::seconds(
            self.service.settings().placement.stamp_wait_secs.max(1) as i64,
        );
        let started = job
            .job
            .started_at
            .as_deref()
            .and_then(persistence::parse_time)
            .unwrap_or_else(chrono::Utc::now);
        if chrono::Utc::now() - started > limit {
            return Outcome::Failed(format!(
                "{}: gave up after {} s: {why}",
                step.name(),
                limit.num_seconds()
            ));
        }
        Outcome::Defer(format!("{}: {why}", step.name()))
    }

    async fn run_step(&self, step: Step, job: &JobRow) -> Result<String, StepError> {
        let tenant_id = job.payload["tenant_id"]
            .as_str()
            .ok_or_else(|| StepError::Fatal("job payload has no tenant_id".into()))?;
        match step {
            Step::CheckTenant => {
                let t = self
                    .store()
                    .get_tenant(tenant_id)
                    .await?
                    .ok_or_else(|| StepError::Fatal(format!("tenant {tenant_id} is gone")))?;
                if t.pending_job_id.as_deref() != Some(job.job.job_id.as_str()) {
                    return Err(StepError::Fatal(format!(
                        "tenant {tenant_id} is no longer reserved for this job"
                    )));
                }
                Ok(format!("tenant {tenant_id} is {}", t.state.as_str()))
            }
            Step::CheckActive => {
                let t = self
                    .store()
                    .get_tenant(tenant_id)
                    .await?
                    .ok_or_else(|| StepError::Skip(format!("tenant {tenant_id} is gone")))?;
                if t.state != TenantState::Active {
                    return Err(StepError::Skip(format!(
                        "tenant {tenant_id} is {}: its environments are placed when it is active",
                        t.state.as_str()
                    )));
                }
                Ok(format!("tenant {tenant_id} is active"))
            }
            Step::PrepareEnvironments => {
                let envs = self.store().list_environments(tenant_id).await?;
                let names: Vec<&str> = envs.iter().map(|e| e.name.as_str()).collect();
                Ok(format!("environments ready: {}", names.join(", ")))
            }
            Step::Place => {
                let corr = job.job.correlation_id.as_deref();
                let envs = self.store().list_environments(tenant_id).await?;
                let mut done = Vec::new();
                for e in &envs {
                    match self
                        .service
                        .place_environment(tenant_id, &e.name, corr)
                        .await?
                    {
                        Placement::Placed(d) => {
                            done.push(format!("{} → {} ({})", e.name, d.cell_id, d.reason))
                        }
                        Placement::AlreadyPlaced(c) => done.push(format!("{} on {c}", e.name)),
                        Placement::Waiting(why) => return Err(StepError::Wait(why)),
                        Placement::Impossible(why) => {
                            self.service
                                .record_placement_failure(tenant_id, &e.name, &why, corr)
                                .await?;
                            return Err(StepError::Fatal(format!(
                                "cannot place {tenant_id}/{}: {why}",
                                e.name
                            )));
                        }
                    }
                }
                Ok(format!("placed: {}", done.join("; ")))
            }
            Step::PublishServe | Step::PublishSuspended | Step::PublishMissing => {
                let mode = if step == Step::PublishSuspended {
                    RouteMode::Suspended
                } else {
                    RouteMode::Serve
                };
                let corr = job.job.correlation_id.as_deref();
                let changed = if step == Step::PublishMissing {
                    self.service
                        .publish_missing_routes(tenant_id, mode, corr)
                        .await?
                } else {
                    self.service
                        .publish_tenant_routes(tenant_id, mode, corr)
                        .await?
                };
                Ok(format!(
                    "routes {}: {}",
                    mode.as_str(),
                    if changed.is_empty() {
                        "already published".to_string()
                    } else {
                        changed.join(", ")
                    }
                ))
            }
            Step::RemoveRoutes => {
                let removed = self
                    .service
                    .remove_tenant_routes(tenant_id, job.job.correlation_id.as_deref())
                    .await?;
                Ok(format!("routes removed: {}", removed.join(", ")))
            }
            Step::ReleaseCapacity | Step::ForgetCells => {
                let released = self
                    .service
                    .release_tenant(
                        tenant_id,
                        step == Step::ForgetCells,
                        job.job.correlation_id.as_deref(),
                    )
                    .await?;
                Ok(format!("capacity released: {}", released.join(", ")))
            }
        }
    }

    fn count(&self, state: JobState) {
        match state {
            JobState::Succeeded => self.metrics.succeeded.fetch_add(1, Ordering::Relaxed),
            JobState::Cancelled => self.metrics.cancelled.fetch_add(1, Ordering::Relaxed),
            _ => self.metrics.failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn backoff(&self, attempt: i64) -> Duration {
        backoff_for(&self.cfg, attempt)
    }

    async fn conclude(&self, job: &JobRow, outcome: Outcome) {
        self.conclude_inner(job, outcome).await;
        self.service.job_changed().notify_waiters();
    }

    async fn conclude_inner(&self, job: &JobRow, outcome: Outcome) {
        let id = &job.job.job_id;
        let result = match outcome {
            Outcome::Abandoned => {
                tracing::info!("job left to its next lease holder");
                return;
            }
            Outcome::Retry(err) if job.job.attempts < job.job.max_attempts => {
                let after = self.backoff(job.job.attempts);
                tracing::warn!(error = %err, retry_in_ms = after.as_millis() as u64, "job attempt failed, retrying");
                self.metrics.retried.fetch_add(1, Ordering::Relaxed);
                let at = chrono::Utc::now()
                    + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(1));
                self.store()
                    .requeue_job(id, &self.owner, &err, at)
                    .await
                    .map(|_| ())
            }
            Outcome::Retry(err) => self.finalize(job, JobState::Failed, Some(&err)).await,
            Outcome::Defer(why) => {
                // Look again soon at first, then less often (at most every 2 s).
                let poll = self.service.settings().placement.stamp_poll_ms.max(50);
                let waited = job
                    .job
                    .started_at
                    .as_deref()
                    .and_then(persistence::parse_time)
                    .map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as u64)
                    .unwrap_or(0);
                let after = Duration::from_millis((waited / 10).clamp(poll, poll.max(2000)));
                tracing::debug!(reason = %why, "job waits");
                let at = chrono::Utc::now()
                    + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(1));
                self.store()
                    .defer_job(id, &self.owner, &why, at)
                    .await
                    .map(|_| ())
            }
            Outcome::Failed(err) => self.finalize(job, JobState::Failed, Some(&err)).await,
            Outcome::Cancelled => {
                self.finalize(job, JobState::Cancelled, Some("cancelled"))
                    .await
            }
            Outcome::Succeeded(effect) => {
                self.finalize_with(job, JobState::Succeeded, None, effect)
                    .await
            }
        };
        if let Err(e) = result {
            // The lease will expire and the job will be picked up again.
            tracing::error!(error = %e, "recording the job's outcome failed");
        }
    }

    async fn finalize(
        &self,
        job: &JobRow,
        state: JobState,
        error: Option<&str>,
    ) -> Result<(), persistence::StoreError> {
        self.finalize_with(job, state, error, None).await
    }

    /// Commits the job's end and its effect on the target in one transaction.
    async fn finalize_with(
        &self,
        job: &JobRow,
        state: JobState,
        error: Option<&str>,
        effect: Option<CellEffect>,
    ) -> Result<(), persistence::StoreError> {
        if let Some(action) = CellAction::from_kind(&job.job.kind) {
            let mut tx = self.store().write().await?;
            if !tx
                .finish_job(&job.job.job_id, &self.owner, state, error)
                .await?
            {
                tracing::info!("job lease lost before it could finish; leaving it");
                return Ok(());
            }
            finish_cell_job(&mut tx, job, action, state, error, effect.as_ref()).await?;
            tx.commit().await?;
            self.count(state);
            tracing::info!(
                state = state.as_str(),
                error = error.unwrap_or(""),
                "job finished"
            );
            return Ok(());
        }
        let tenant_id = job.payload["tenant_id"].as_str().unwrap_or_default();
        let action = job.payload["action"]
            .as_str()
            .and_then(LifecycleAction::parse);
        let to: Option<TenantState> =
            serde_json::from_value(job.payload["to"].clone()).unwrap_or(None);
        // An activation that did not finish gives back what its steps took.
        let undo_envs = if action == Some(LifecycleAction::Activate) && state != JobState::Succeeded
        {
            self.store().list_environments(tenant_id).await?
        } else {
            Vec::new()
        };
        let history_limit = self.service.settings().routing.history_limit;
        let mut last_revision = None;
        let mut tx = self.store().write().await?;
        if !tx
            .finish_job(&job.job.job_id, &self.owner, state, error)
            .await?
        {
            tracing::info!("job lease lost before it could finish; leaving it");
            return Ok(());
        }
        if let Some(action) = action {
            let end = if state == JobState::Succeeded {
                to
            } else {
                None
            };
            let changed = tx
                .finish_tenant_transition(tenant_id, &job.job.job_id, end)
                .await?;
            let mut undone = Vec::new();
            if changed {
                for e in &undo_envs {
                    if let persistence::RouteWrite::Changed(rev) =
                        tx.remove_route(tenant_id, &e.name, history_limit).await?
                    {
                        last_revision = Some(rev);
                    }
                    if let Some(r) = tx.release_environment(tenant_id, &e.name, true).await? {
                        undone.push(json!({"env": e.name, "cell_id": r.cell_id, "units": r.units}));
                    }
                }
            }
            let event = match (state, action) {
                (JobState::Succeeded, LifecycleAction::Activate) => "TENANCY_ACTIVATED".into(),
                (JobState::Succeeded, LifecycleAction::Suspend) => "TENANCY_SUSPENDED".into(),
                (JobState::Succeeded, LifecycleAction::Resume) => "TENANCY_RESUMED".into(),
                (JobState::Succeeded, LifecycleAction::Archive) => "TENANCY_ARCHIVED".into(),
                (JobState::Succeeded, LifecycleAction::Delete) => "TENANCY_DELETED".into(),
                (JobState::Cancelled, a) => {
                    format!("TENANCY_{}_CANCELLED", a.as_str().to_uppercase())
                }
                (_, a) => format!("TENANCY_{}_FAILED", a.as_str().to_uppercase()),
            };
            if changed {
                tx.audit(AuditInput {
                    tenant_id: Some(tenant_id),
                    event_type: &event,
                    actor: "system:jobs",
                    target: &job.job.target,
                    payload: json!({"job_id": job.job.job_id, "state": to, "error": error,
                                    "attempts": job.job.attempts, "released": undone,
                                    "routes_revision": last_revision}),
                    correlation_id: job.job.correlation_id.as_deref(),
                })
                .await?;
            }
        }
        tx.commit().await?;
        if let Some(rev) = last_revision {
            self.service.route_revisions().observe(rev);
        }
        self.count(state);
        tracing::info!(
            state = state.as_str(),
            error = error.unwrap_or(""),
            "job finished"
        );
        Ok(())
    }
}

/// Applies the end of a cell job to the cell inside the job's final transaction: its new
/// state, outputs and secrets, or its drift, and the audit record. Also used when a queued
/// job is cancelled before it ran (`effect` is then None and `state` cancelled).
pub async fn finish_cell_job(
    tx: &mut persistence::WriteTx,
    job: &JobRow,
    action: CellAction,
    state: JobState,
    error: Option<&str>,
    effect: Option<&CellEffect>,
) -> Result<(), persistence::StoreError> {
    let Some(cell_id) = job.payload["cell_id"].as_str() else {
        return Ok(());
    };
    let Some(mut cell) = tx.get_cell_tx(cell_id).await? else {
        return Ok(());
    };
    let succeeded = state == JobState::Succeeded;
    if action == CellAction::Plan {
        let Some(drift) = effect.and_then(|e| e.drift.as_ref()) else {
            return Ok(());
        };
        let value = serde_json::to_value(drift).expect("drift serializes");
        tx.set_cell_drift(cell_id, &value).await?;
        let event = if drift.detected {
            "CELL_DRIFTED"
        } else {
            "CELL_DRIFT_CHECKED"
        };
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: event,
            actor: "system:jobs",
            target: &job.job.target,
            payload: json!({"job_id": job.job.job_id, "drift": value}),
            correlation_id: job.job.correlation_id.as_deref(),
        })
        .await?;
        return Ok(());
    }
    // A job that no longer holds the cell (it was released meanwhile) changes nothing.
    if cell.pending_job_id.as_deref() != Some(job.job.job_id.as_str()) {
        return Ok(());
    }
    let prior: CellState = job.payload["prior_state"]
        .as_str()
        .and_then(CellState::parse)
        .unwrap_or(cell.state);
    // Cancelled before any attempt recorded progress: nothing was touched.
    let never_ran = state == JobState::Cancelled
        && effect.is_none()
        && (job.job.attempts == 0 || job.job.step.is_none());
    let end = if never_ran && action != CellAction::Stamp {
        // Cancelled in the queue: nothing was touched.
        Some(prior)
    } else {
        action.end_state(succeeded, prior)
    };
    if let Some(end) = end {
        cell.state = end;
    }
    cell.pending_job_id = None;
    if let Some(e) = effect {
        cell.outputs = e.outputs.clone();
        if action == CellAction::Destroy {
            cell.outputs.clear();
            cell.drift = None;
        }
    }
    cell.version += 1;
    if !tx.update_cell(&cell).await? {
        return Err(persistence::StoreError::Corrupt(format!(
            "cell {cell_id} changed while its job finished"
        )));
    }
    if let Some(e) = effect {
        let mut secrets = tx.get_cell_secrets_tx(cell_id).await?.unwrap_or_default();
        secrets.outputs = if action == CellAction::Destroy {
            Default::default()
        } else {
            e.secret_outputs.clone()
        };
        tx.set_cell_secrets(cell_id, &secrets).await?;
    }
    let verb = match action {
        CellAction::Stamp => "STAMP",
        CellAction::Apply => "APPLY",
        CellAction::Destroy => "DESTROY",
        CellAction::Plan => "PLAN",
    };
    let event = match (action, state) {
        (CellAction::Stamp, JobState::Succeeded) => "CELL_STAMPED".to_string(),
        (CellAction::Apply, JobState::Succeeded) => "CELL_APPLIED".to_string(),
        (CellAction::Destroy, JobState::Succeeded) => "CELL_DESTROYED".to_string(),
        (_, JobState::Cancelled) => format!("CELL_{verb}_CANCELLED"),
        _ => format!("CELL_{verb}_FAILED"),
    };
    tx.audit(AuditInput {
        tenant_id: None,
        event_type: &event,
        actor: "system:jobs",
        target: &job.job.target,
        payload: json!({"job_id": job.job.job_id, "state": cell.state, "error": error,
                        "outputs": cell.outputs, "attempts": job.job.attempts}),
        correlation_id: job.job.correlation_id.as_deref(),
    })
    .await?;
    Ok(())
}

/// Turns terraform's events into job progress and log text, flushed to the store at most
/// every 200 ms (and at the end). A lost lease stops the job: terraform is detached.
async fn report(
    store: Store,
    changed: Arc<tokio::sync::Notify>,
    job_id: String,
    owner: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<ExecEvent>,
    detach: CancellationToken,
) {
    let mut phase: &'static str = "render";
    let mut planned: u64 = 0;
    let mut applied: u64 = 0;
    let mut pending = String::new();
    let mut dirty = false;
    let flush_every = Duration::from_millis(200);
    let mut last_flush = std::time::Instant::now();
    let progress_of = |phase: &str, planned: u64, applied: u64| -> f64 {
        let idx = PHASES.iter().position(|(p, _)| *p == phase).unwrap_or(0);
        let start = PHASES[idx].1;
        if phase == "apply" && planned > 0 {
            let end = PHASES.get(idx + 1).map(|p| p.1).unwrap_or(1.0);
            start + (end - start) * (applied.min(planned) as f64 / planned as f64)
        } else {
            start
        }
    };
    loop {
        let timeout = flush_every.saturating_sub(last_flush.elapsed());
        let event = tokio::time::timeout(timeout, rx.recv()).await;
        let closed = matches!(event, Ok(None));
        match event {
            Ok(Some(ExecEvent::Log(line))) => {
                pending.push_str(&format!("{} {line}\n", persistence::now()));
                dirty = true;
            }
            Ok(Some(ExecEvent::Phase(p))) => {
                phase = p;
                dirty = true;
            }
            Ok(Some(ExecEvent::Planned(n))) => planned = n,
            Ok(Some(ExecEvent::Applied(n))) => {
                applied = n;
                dirty = true;
            }
            Ok(Some(ExecEvent::Heartbeat)) | Ok(None) | Err(_) => {}
        }
        if dirty && (closed || last_flush.elapsed() >= flush_every) {
            let idx = PHASES.iter().position(|(p, _)| *p == phase).unwrap_or(0) as i64;
            let progress = progress_of(phase, planned, applied);
            match store
                .job_progress(&job_id, &owner, progress, idx, phase, &pending)
                .await
            {
                Ok(true) => {
                    pending.clear();
                    dirty = false;
                    changed.notify_waiters();
                }
                Ok(false) => detach.cancel(),
                Err(e) => tracing::warn!(error = %e, "recording job progress failed"),
            }
            last_flush = std::time::Instant::now();
        } else if !dirty {
            last_flush = std::time::Instant::now();
        }
        if closed {
            break;
        }
    }
}

/// Capped exponential backoff with jitter in [half, full] of the step.
fn backoff_for(cfg: &JobsConfig, attempt: i64) -> Duration {
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

    #[test]
    fn every_lifecycle_action_has_a_pipeline() {
        for a in LifecycleAction::ALL {
            assert!(pipeline(&format!("tenant.{}", a.as_str())).is_some());
        }
        assert!(pipeline("nope").is_none());
    }
}
