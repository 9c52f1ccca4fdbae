//! The job-kind trait. A kind is a type: its spec and state are serde types, its locks are
//! computed from its spec, its steps run in order, and its `finish` commits what its end
//! means for its targets in the transaction that ends the job.

use super::engine::{self, JobEngine, Tokens};
use crate::error::ServiceError;
use crate::persistence::{self, JobRow, NewJob, StoreError, WriteTx};
use crate::shared::Shared;
use cellplane_api::Job;
use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a step asks for next.
#[derive(Debug)]
pub enum Next {
    /// Done; go on with the next step. The text is logged.
    Continue(String),
    /// Nothing (more) to do: the job succeeds without running its remaining steps.
    Done(String),
    /// Waiting on something that takes time (a cell being stamped): run this step again
    /// later without spending an attempt, until the kind's wait limit.
    Wait(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Worth another attempt (store hiccup, busy dependency).
    #[error("{0}")]
    Retryable(String),
    /// Will not get better by retrying.
    #[error("{0}")]
    Fatal(String),
    /// The job was cancelled while the step ran.
    #[error("cancelled")]
    Cancelled,
    /// The lease was lost or the process is stopping: leave the job to its next holder.
    #[error("abandoned")]
    Abandoned,
}

impl From<ServiceError> for StepError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Store(e) => StepError::Retryable(e.to_string()),
            other => StepError::Fatal(other.to_string()),
        }
    }
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError::Retryable(e.to_string())
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Succeeded,
    Failed(String),
    Cancelled,
}

impl End {
    pub fn job_state(&self) -> cellplane_api::JobState {
        match self {
            End::Succeeded => cellplane_api::JobState::Succeeded,
            End::Failed(_) => cellplane_api::JobState::Failed,
            End::Cancelled => cellplane_api::JobState::Cancelled,
        }
    }
    pub fn error(&self) -> Option<&str> {
        match self {
            End::Succeeded => None,
            End::Failed(e) => Some(e),
            End::Cancelled => Some("cancelled"),
        }
    }
}

/// What a finish changed that the process must hear about after the commit.
#[derive(Debug, Default)]
pub struct Finished {
    /// The last routing revision the finish wrote.
    pub routes_revision: Option<i64>,
}

/// What a step sees: the engine's collaborators, the job, and its cancel and detach tokens.
pub struct StepCx<'a> {
    pub engine: &'a JobEngine,
    pub job: &'a JobRow,
    /// Cancelled when the job's cancellation was requested.
    pub cancel: &'a tokio_util::sync::CancellationToken,
    /// Cancelled when the lease was lost or the process stops: stop without undoing.
    pub detach: &'a tokio_util::sync::CancellationToken,
}

impl StepCx<'_> {
    /// The registry, settings, placement and routing.
    pub fn shared(&self) -> &Shared {
        self.engine.shared()
    }
    pub fn correlation_id(&self) -> Option<&str> {
        self.job.job.correlation_id.as_deref()
    }
}

/// What a finish sees.
pub struct FinishCx<'a> {
    pub shared: &'a Shared,
    pub job: &'a JobRow,
}

/// A job kind. Implement it in a file of its own under `jobs/` and add one line to
/// [`super::kinds`].
pub trait Kind: Send + Sync + 'static {
    /// The kind's name, stored with each job (`tenant.activate`, `cell.stamp`, …).
    const NAME: &'static str;
    /// What the job is asked to do; stored as the job's payload.
    type Spec: Serialize + DeserializeOwned + Send + Sync;
    /// What the job remembers between steps and across restarts.
    type State: Serialize + DeserializeOwned + Default + Send + Sync;

    /// The target shown on the job (`tenant/acme`, `cell/euw1-pool-1`).
    fn target(spec: &Self::Spec) -> String;
    /// The resources the job holds from its enqueue to its end.
    fn locks(spec: &Self::Spec) -> Vec<String>;
    /// The tenant the job acts on, for audit records.
    fn tenant(_spec: &Self::Spec) -> Option<&str> {
        None
    }
    /// The step names, in order.
    fn steps(&self) -> Vec<&'static str>;
    /// Runs step `index`. Steps are idempotent: a step is re-run after a crash that came
    /// before the job recorded it.
    fn step(
        &self,
        cx: &StepCx<'_>,
        spec: &Self::Spec,
        state: &mut Self::State,
        index: usize,
    ) -> impl Future<Output = Result<Next, StepError>> + Send;
    /// Commits what the job's end means for its targets, inside the transaction that ends
    /// the job and releases its locks: the new state on success; on failure or
    /// cancellation, the compensation of whatever its steps did. Also called for a job
    /// cancelled before it ever ran.
    fn finish(
        &self,
        tx: &mut WriteTx,
        cx: &FinishCx<'_>,
        spec: &Self::Spec,
        state: &Self::State,
        end: &End,
    ) -> impl Future<Output = Result<Finished, StoreError>> + Send;
    /// Undoes what the job's steps did outside the registry (calls to cells) when it
    /// failed or was cancelled: run before [`Kind::finish`], outside its transaction, and
    /// best effort (it logs what it could not undo). Default: nothing to undo.
    fn undo(
        &self,
        _cx: &StepCx<'_>,
        _spec: &Self::Spec,
        _state: &Self::State,
        _end: &End,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// How long a waiting step may keep waiting, counted from the job's first start.
    fn wait_limit(&self, shared: &Shared) -> Duration {
        Duration::from_secs(shared.settings().job_wait_secs.max(1))
    }
    /// How soon a waiting step looks again at first (then less often, at most every 2 s).
    fn wait_poll(&self, shared: &Shared) -> Duration {
        Duration::from_millis(shared.settings().job_wait_poll_ms.max(10))
    }
}

/// The object-safe face of a [`Kind`], for the engine and the registry.
pub trait DynKind: Send + Sync {
    fn name(&self) -> &'static str;
    fn step_names(&self) -> Vec<&'static str>;
    /// The tenant a stored job acts on, if any.
    fn tenant_of(&self, job: &JobRow) -> Option<String>;
    /// Runs a claimed job to its outcome and records it; returns the next job claimed in
    /// the same commit as its end, if any.
    fn run<'a>(
        &'static self,
        engine: &'a JobEngine,
        job: &'a JobRow,
        tokens: &'a Tokens,
    ) -> BoxFuture<'a, Option<JobRow>>;
    /// Enqueues a job of this kind from a JSON spec inside `tx` (see [`enqueue`]).
    fn enqueue_json<'a>(
        &'a self,
        tx: &'a mut WriteTx,
        spec: serde_json::Value,
        max_attempts: i64,
        correlation_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Job, StoreError>>;
    /// Ends a job that never got to run (cancelled in the queue) inside `tx`.
    fn finish_unclaimed<'a>(
        &'a self,
        tx: &'a mut WriteTx,
        shared: &'a Shared,
        job: &'a JobRow,
        end: &'a End,
    ) -> BoxFuture<'a, Result<Finished, StoreError>>;
}

impl<K: Kind> DynKind for K {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn step_names(&self) -> Vec<&'static str> {
        self.steps()
    }
    fn tenant_of(&self, job: &JobRow) -> Option<String> {
        let spec: K::Spec = serde_json::from_value(job.payload.clone()).ok()?;
        K::tenant(&spec).map(str::to_string)
    }
    fn run<'a>(
        &'static self,
        engine: &'a JobEngine,
        job: &'a JobRow,
        tokens: &'a Tokens,
    ) -> BoxFuture<'a, Option<JobRow>> {
        Box::pin(engine::drive(self, engine, job, tokens))
    }
    fn enqueue_json<'a>(
        &'a self,
        tx: &'a mut WriteTx,
        spec: serde_json::Value,
        max_attempts: i64,
        correlation_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Job, StoreError>> {
        Box::pin(async move {
            let spec: K::Spec = serde_json::from_value(spec)
                .map_err(|e| StoreError::Corrupt(format!("{} spec: {e}", K::NAME)))?;
            enqueue::<K>(tx, &spec, max_attempts, correlation_id).await
        })
    }
    fn finish_unclaimed<'a>(
        &'a self,
        tx: &'a mut WriteTx,
        shared: &'a Shared,
        job: &'a JobRow,
        end: &'a End,
    ) -> BoxFuture<'a, Result<Finished, StoreError>> {
        Box::pin(async move {
            let Ok(spec) = serde_json::from_value::<K::Spec>(job.payload.clone()) else {
                return Ok(Finished::default());
            };
            let state: K::State = serde_json::from_value(job.state.clone()).unwrap_or_default();
            let cx = FinishCx { shared, job };
            self.finish(tx, &cx, &spec, &state, end).await
        })
    }
}

/// Enqueues a job of kind `K` inside `tx`, taking its locks there: a resource held by
/// another job makes it fail with [`StoreError::Locked`] naming that job.
pub async fn enqueue<K: Kind>(
    tx: &mut WriteTx,
    spec: &K::Spec,
    max_attempts: i64,
    correlation_id: Option<&str>,
) -> Result<Job, StoreError> {
    let job_id = persistence::new_id("job");
    tx.insert_job(&NewJob {
        job_id: &job_id,
        kind: K::NAME,
        target: &K::target(spec),
        payload: serde_json::to_value(spec).expect("job specs serialize"),
        max_attempts,
        correlation_id,
        locks: K::locks(spec),
    })
    .await
}
