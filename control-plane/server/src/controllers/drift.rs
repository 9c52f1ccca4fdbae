//! The drift controller: enqueues a drift check (`cell.plan`) for every idle active cell
//! whose last check is older than the interval. Only the lease holder enqueues, and each
//! enqueue is fenced by its term.

use super::{Action, Controller, ControllerCx, ReconcileError};
use crate::ctx::Ctx;
use crate::error::ServiceError;
use crate::persistence;
use std::time::Duration;

pub struct DriftController {
    /// How old a cell's last check may get; zero disables the checks.
    pub interval: Duration,
}

impl Controller for DriftController {
    const NAME: &'static str = "drift";

    fn resync(&self) -> Duration {
        (self.interval.min(Duration::from_secs(60)) / 2).max(Duration::from_millis(500))
    }

    async fn reconcile(&self, cx: &ControllerCx<'_>) -> Result<Action, ReconcileError> {
        if self.interval.is_zero() {
            return Ok(Action::Requeue(Duration::from_secs(3600)));
        }
        match schedule_drift_checks(self.interval, cx).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(cells = n, term = cx.fence.term, "drift checks enqueued"),
            Err(ServiceError::Fenced(_)) => return Err(ReconcileError::Deposed(Self::NAME)),
            Err(e) => return Err(e.into()),
        }
        Ok(Action::AwaitChange)
    }
}

/// Enqueues drift checks for idle active cells last checked before `interval` ago, each
/// fenced by the controller's lease. Returns how many were enqueued.
async fn schedule_drift_checks(
    interval: Duration,
    cx: &ControllerCx<'_>,
) -> crate::error::Result<usize> {
    let before = persistence::fmt_time(
        cx.clock.now() - chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::hours(1)),
    );
    let due = cx
        .service
        .store()
        .cells_due_for_drift_check(&before, 1000)
        .await?;
    let ctx = Ctx {
        actor: "system:drift".into(),
        correlation_id: persistence::new_id("corr"),
    };
    let mut n = 0;
    for cell in due {
        if cx.failpoint("write").is_some() {
            tracing::warn!("failpoint before a drift controller write");
        }
        match cx
            .service
            .plan_cell_fenced(&ctx, &cell.cell_id, Some(cx.fence))
            .await
        {
            Ok(_) => n += 1,
            Err(ServiceError::Conflict(_)) | Err(ServiceError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
