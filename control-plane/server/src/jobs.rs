//! The job engine: workers claim durable jobs with a lease, renew it while they run, and
//! walk the job's step pipeline from the step after the last one recorded, so a job
//! resumed after a crash does not redo finished steps. The final state change of the
//! target and the job's success commit in one transaction: a job finishes once.
//!
//! Steps must be idempotent. Failures are retried with capped, jittered exponential
//! backoff until `max_attempts`; cancellation is checked between steps.

use crate::config::JobsConfig;
use crate::persistence::{self, AuditInput, JobRow, Store};
use crate::service::Service;
use cellplane_api::{JobState, LifecycleAction, TenantState};
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
    /// Every environment of the tenant has its resource mapping recorded.
    PrepareEnvironments,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::CheckTenant => "check-tenant",
            Step::PrepareEnvironments => "prepare-environments",
        }
    }
}

/// The steps of each job kind, in order; the commit of the end state follows the last.
pub fn pipeline(kind: &str) -> Option<&'static [Step]> {
    match kind {
        "tenant.activate" => Some(&[Step::CheckTenant, Step::PrepareEnvironments]),
        "tenant.suspend" | "tenant.resume" | "tenant.archive" | "tenant.delete" => {
            Some(&[Step::CheckTenant])
        }
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
}

#[derive(Clone)]
pub struct JobEngine {
    service: Service,
    cfg: Arc<JobsConfig>,
    owner: String,
    pub metrics: Arc<JobMetrics>,
}

enum Outcome {
    Succeeded,
    Failed(String),
    Cancelled,
    Retry(String),
    /// The lease was lost or the process is stopping: leave the job to whoever holds it.
    Abandoned,
}

impl JobEngine {
    pub fn new(service: Service, cfg: JobsConfig) -> Self {
        Self {
            service,
            cfg: Arc::new(cfg),
            owner: persistence::new_id("worker"),
            metrics: Arc::new(JobMetrics::default()),
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
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renewer = {
            let store = self.store().clone();
            let (id, owner) = (job.job.job_id.clone(), self.owner.clone());
            let (cancel, lost) = (cancel.clone(), lost.clone());
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
                            cancel.cancel();
                            break;
                        }
                        Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                    }
                }
            })
        };
        let outcome = self.execute(&job, &cancel, shutdown, &lost).await;
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
        if cancel.is_cancelled() {
            if lost.load(Ordering::SeqCst) {
                return Outcome::Abandoned;
            }
            return Outcome::Cancelled;
        }
        Outcome::Succeeded
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
            Step::PrepareEnvironments => {
                let envs = self.store().list_environments(tenant_id).await?;
                let names: Vec<&str> = envs.iter().map(|e| e.name.as_str()).collect();
                Ok(format!("environments ready: {}", names.join(", ")))
            }
        }
    }

    fn backoff(&self, attempt: i64) -> Duration {
        let exp = 2u64.saturating_pow((attempt.max(1) - 1).min(30) as u32);
        let full = self
            .cfg
            .backoff_base_ms
            .saturating_mul(exp)
            .min(self.cfg.backoff_cap_ms);
        let jittered = rand::thread_rng().gen_range(full / 2..=full.max(1));
        Duration::from_millis(jittered)
    }

    async fn conclude(&self, job: &JobRow, outcome: Outcome) {
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
            Outcome::Failed(err) => self.finalize(job, JobState::Failed, Some(&err)).await,
            Outcome::Cancelled => {
                self.finalize(job, JobState::Cancelled, Some("cancelled"))
                    .await
            }
            Outcome::Succeeded => self.finalize(job, JobState::Succeeded, None).await,
        };
        if let Err(e) = result {
            // The lease will expire and the job will be picked up again.
            tracing::error!(error = %e, "recording the job's outcome failed");
        }
    }

    /// Commits the job's end and its effect on the target in one transaction.
    async fn finalize(
        &self,
        job: &JobRow,
        state: JobState,
        error: Option<&str>,
    ) -> Result<(), persistence::StoreError> {
        let tenant_id = job.payload["tenant_id"].as_str().unwrap_or_default();
        let action = job.payload["action"]
            .as_str()
            .and_then(LifecycleAction::parse);
        let to: Option<TenantState> =
            serde_json::from_value(job.payload["to"].clone()).unwrap_or(None);
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
                                    "attempts": job.job.attempts}),
                    correlation_id: job.job.correlation_id.as_deref(),
                })
                .await?;
            }
        }
        tx.commit().await?;
        match state {
            JobState::Succeeded => self.metrics.succeeded.fetch_add(1, Ordering::Relaxed),
            JobState::Cancelled => self.metrics.cancelled.fetch_add(1, Ordering::Relaxed),
            _ => self.metrics.failed.fetch_add(1, Ordering::Relaxed),
        };
        tracing::info!(
            state = state.as_str(),
            error = error.unwrap_or(""),
            "job finished"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backoff_is_exponential_jittered_and_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::persistence::Store::open(None, dir.path(), 2)
            .await
            .expect("store");
        let service = Service::new(
            store,
            crate::service::ServiceSettings {
                job_max_attempts: 5,
            },
        );
        let cfg = JobsConfig {
            backoff_base_ms: 100,
            backoff_cap_ms: 1000,
            ..JobsConfig::default()
        };
        let engine = JobEngine::new(service, cfg);
        for _ in 0..50 {
            let first = engine.backoff(1).as_millis();
            assert!((50..=100).contains(&first), "{first}");
            let third = engine.backoff(3).as_millis();
            assert!((200..=400).contains(&third), "{third}");
            let capped = engine.backoff(30).as_millis();
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
