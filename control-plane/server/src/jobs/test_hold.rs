//! `test.hold` (debug builds only): holds the resources its spec names until it is
//! cancelled. Tests enqueue it to show that a job holding a tenant and several cells blocks
//! every other job on any of them, and that adding a kind needs this file and its
//! registration line only.

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use crate::persistence::{AuditInput, StoreError, WriteTx};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldSpec {
    /// Resources to hold (`tenant/acme`, `cell/euw1-pool-1`, …).
    pub resources: Vec<String>,
}

/// Counts how often the job started holding, to show that state survives a restart.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct HoldState {
    pub holds_started: u32,
}

pub struct TestHold;

impl Kind for TestHold {
    const NAME: &'static str = "test.hold";
    type Spec = HoldSpec;
    type State = HoldState;

    fn target(spec: &HoldSpec) -> String {
        spec.resources.first().cloned().unwrap_or_default()
    }
    fn locks(spec: &HoldSpec) -> Vec<String> {
        spec.resources.clone()
    }
    fn steps(&self) -> Vec<&'static str> {
        vec!["start", "hold"]
    }
    async fn step(
        &self,
        cx: &StepCx<'_>,
        _spec: &HoldSpec,
        state: &mut HoldState,
        index: usize,
    ) -> Result<Next, StepError> {
        if index == 0 {
            state.holds_started += 1;
            return Ok(Next::Continue(format!("hold {}", state.holds_started)));
        }
        tokio::select! {
            _ = cx.cancel.cancelled() => Err(StepError::Cancelled),
            _ = cx.detach.cancelled() => Err(StepError::Abandoned),
        }
    }
    async fn finish(
        &self,
        tx: &mut WriteTx,
        cx: &FinishCx<'_>,
        spec: &HoldSpec,
        state: &HoldState,
        end: &End,
    ) -> Result<Finished, StoreError> {
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: "TEST_HOLD_ENDED",
            actor: "system:jobs",
            target: &cx.job.job.target,
            payload: json!({"job_id": cx.job.job.job_id, "resources": spec.resources,
                            "holds_started": state.holds_started, "error": end.error()}),
            correlation_id: None,
        })
        .await?;
        Ok(Finished::default())
    }
}
