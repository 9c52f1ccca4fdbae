//! Controllers: reconcile loops that each run on exactly one replica at a time, under a
//! lease row (`controller_leases`: holder, term, expiry by the database clock). A reconcile
//! returns what to do next ([`Action::Requeue`] after a delay, or [`Action::AwaitChange`]);
//! a separate error policy retries failures with capped, jittered exponential backoff. Every
//! write a controller makes carries its [`Fence`] (name, holder, term) and is refused once
//! another replica has taken the lease, so a paused or partitioned holder cannot commit late.
//!
//! A controller never spawns terraform or runs SQL itself: it enqueues jobs and calls the
//! service with its fence.

pub mod drift;
pub mod tenants;
pub mod usage;
pub mod webhooks;

use crate::clock::SharedClock;
use crate::failpoints::Failpoints;
use crate::service::Service;
use rand::Rng;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reconcile again after this long.
    Requeue(Duration),
    /// Reconcile again when something changes (or after the controller's resync period).
    AwaitChange,
}

pub use crate::persistence::Fence;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
    #[error(transparent)]
    Store(#[from] crate::persistence::StoreError),
    /// The lease was lost while reconciling: the write was refused.
    #[error("the lease of controller {0} was lost; write refused")]
    Deposed(&'static str),
}

/// What a reconcile sees.
pub struct ControllerCx<'a> {
    pub service: &'a Service,
    pub fence: &'a Fence,
    pub failpoints: &'a Failpoints,
    pub clock: &'a SharedClock,
}

impl ControllerCx<'_> {
    /// A failpoint named `controller.<name>/<point>`; the term stands for the attempt, so
    /// `@1` fires only for the first holder's term.
    pub fn failpoint(&self, point: &str) -> Option<crate::failpoints::Action> {
        self.failpoints.hit(
            &format!("controller.{}/{point}", self.fence.name),
            self.fence.term,
        )
    }
}

pub trait Controller: Send + Sync + 'static {
    const NAME: &'static str;
    /// How often to reconcile without a change signal.
    fn resync(&self) -> Duration;
    /// Signalled when there may be work: the controller reconciles at once (still under
    /// its lease) instead of at its next resync.
    fn wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    /// Brings actual state towards desired; idempotent.
    fn reconcile(
        &self,
        cx: &ControllerCx<'_>,
    ) -> impl Future<Output = Result<Action, ReconcileError>> + Send;
}

/// Lease timing of every controller.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub ttl: Duration,
    /// How often a holder renews (and a standby tries to take over).
    pub renew: Duration,
}

/// Whether this replica holds a controller's lease now, and at which term (for metrics).
#[derive(Debug, Default)]
pub struct ControllerStatus {
    pub leader: AtomicBool,
    pub term: AtomicI64,
    pub reconciles: AtomicI64,
    pub errors: AtomicI64,
}

/// Per-controller status of this replica, by name.
pub type Statuses = Arc<Vec<(&'static str, Arc<ControllerStatus>)>>;

/// The error policy: capped exponential backoff with jitter in [half, full].
pub fn error_backoff(consecutive: u32) -> Duration {
    let base_ms = 500u64;
    let cap_ms = 30_000u64;
    let full = base_ms
        .saturating_mul(2u64.saturating_pow(consecutive.saturating_sub(1).min(20)))
        .min(cap_ms);
    Duration::from_millis(rand::thread_rng().gen_range(full / 2..=full.max(1)))
}

/// What every controller of a replica shares.
#[derive(Clone)]
pub struct Host {
    pub service: Service,
    /// This replica's identity: the lease holder name.
    pub replica: String,
    pub timing: LeaseTiming,
    pub failpoints: Failpoints,
    pub clock: SharedClock,
}

/// Runs `controller` under its lease until `stop`; gives the lease up on the way out.
pub fn spawn<C: Controller>(
    controller: C,
    host: Host,
    status: Arc<ControllerStatus>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { run(controller, host, status, stop).await })
}

async fn run<C: Controller>(
    controller: C,
    host: Host,
    status: Arc<ControllerStatus>,
    stop: CancellationToken,
) {
    let Host {
        service,
        replica,
        timing,
        failpoints,
        clock,
    } = host;
    let ttl_ms = timing.ttl.as_millis() as i64;
    let mut held: Option<i64> = None;
    let mut next_reconcile = tokio::time::Instant::now();
    let mut errors: u32 = 0;
    let wake = controller.wake();
    while !stop.is_cancelled() {
        match service
            .store()
            .acquire_controller_lease(C::NAME, &replica, ttl_ms)
            .await
        {
            Ok(Some(term)) => {
                if held != Some(term) {
                    tracing::info!(controller = C::NAME, term, replica = %replica, "controller lease acquired");
                    next_reconcile = tokio::time::Instant::now();
                }
                held = Some(term);
                status.leader.store(true, Ordering::SeqCst);
                status.term.store(term, Ordering::SeqCst);
            }
            Ok(None) => {
                if held.is_some() {
                    tracing::warn!(
                        controller = C::NAME,
                        "controller lease lost to another replica"
                    );
                }
                held = None;
                status.leader.store(false, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::warn!(controller = C::NAME, error = %e, "renewing the controller lease failed")
            }
        }
        if let Some(term) = held {
            if tokio::time::Instant::now() >= next_reconcile {
                let fence = Fence {
                    name: C::NAME,
                    holder: replica.clone(),
                    term,
                };
                let cx = ControllerCx {
                    service: &service,
                    fence: &fence,
                    failpoints: &failpoints,
                    clock: &clock,
                };
                status.reconciles.fetch_add(1, Ordering::Relaxed);
                let after = match controller.reconcile(&cx).await {
                    Ok(Action::Requeue(d)) => {
                        errors = 0;
                        d
                    }
                    Ok(Action::AwaitChange) => {
                        errors = 0;
                        controller.resync()
                    }
                    Err(ReconcileError::Deposed(_)) => {
                        tracing::warn!(
                            controller = C::NAME,
                            term,
                            "deposed: a write with an old term was refused"
                        );
                        held = None;
                        status.leader.store(false, Ordering::SeqCst);
                        Duration::ZERO
                    }
                    Err(e) => {
                        errors += 1;
                        status.errors.fetch_add(1, Ordering::Relaxed);
                        let d = error_backoff(errors);
                        tracing::warn!(controller = C::NAME, error = %e, retry_in_ms = d.as_millis() as u64, "reconcile failed");
                        d
                    }
                };
                next_reconcile = tokio::time::Instant::now() + after;
            }
        }
        let wait = if held.is_some() {
            timing
                .renew
                .min(next_reconcile.saturating_duration_since(tokio::time::Instant::now()))
        } else {
            timing.renew
        };
        let woken = async {
            match &wake {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
            _ = woken => {
                if held.is_some() {
                    next_reconcile = next_reconcile.min(tokio::time::Instant::now());
                }
            }
        }
    }
    if held.is_some() {
        if let Err(e) = service
            .store()
            .release_controller_lease(C::NAME, &replica)
            .await
        {
            tracing::warn!(controller = C::NAME, error = %e, "releasing the controller lease failed");
        }
    }
    status.leader.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_backoff_is_capped_and_jittered() {
        for _ in 0..50 {
            let first = error_backoff(1).as_millis();
            assert!((250..=500).contains(&first), "{first}");
            let later = error_backoff(40).as_millis();
            assert!((15_000..=30_000).contains(&later), "{later}");
        }
    }
}
