//! The drift controller: enqueues a drift check (`cell.plan`) for every idle active cell
//! whose last check is older than the interval. Only the lease holder enqueues, and each
//! enqueue is fenced by its term.

use super::{Action, Controller, ControllerCx, ReconcileError};
use crate::service::ServiceError;
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
        match cx.service.schedule_drift_checks(self.interval, cx).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(cells = n, term = cx.fence.term, "drift checks enqueued"),
            Err(ServiceError::Fenced(_)) => return Err(ReconcileError::Deposed(Self::NAME)),
            Err(e) => return Err(e.into()),
        }
        Ok(Action::AwaitChange)
    }
}
