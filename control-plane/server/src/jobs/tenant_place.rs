//! `tenant.place`: an environment added to an active tenant is placed and routed without
//! another lifecycle action. Failing or cancelled, the new environment gives back the
//! placement and route the job took (it stays, unplaced, for the next activation or
//! resume); the tenant's other environments are not touched.

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use super::tenant::{self, NoState, TenantSpec, TenantStep};
use crate::persistence::{AuditInput, RouteWrite, StoreError, WriteTx};
use serde_json::json;

const STEPS: &[TenantStep] = &[
    TenantStep::CheckActive,
    TenantStep::Place,
    TenantStep::PublishMissing,
];

pub struct TenantPlace;

impl Kind for TenantPlace {
    const NAME: &'static str = "tenant.place";
    type Spec = TenantSpec;
    type State = NoState;

    fn target(spec: &TenantSpec) -> String {
        crate::ctx::tenant_target(&spec.tenant_id)
    }
    /// The whole tenant: a suspend or archive must not run while the environment is being
    /// placed (it would publish or remove routes under the placement's feet).
    fn locks(spec: &TenantSpec) -> Vec<String> {
        vec![super::tenant_resource(&spec.tenant_id)]
    }
    fn tenant(spec: &TenantSpec) -> Option<&str> {
        Some(&spec.tenant_id)
    }
    fn steps(&self) -> Vec<&'static str> {
        tenant::names(STEPS)
    }
    async fn step(
        &self,
        cx: &StepCx<'_>,
        spec: &TenantSpec,
        _state: &mut NoState,
        index: usize,
    ) -> Result<Next, StepError> {
        tenant::run(cx, spec, STEPS[index]).await
    }
    async fn finish(
        &self,
        tx: &mut WriteTx,
        cx: &FinishCx<'_>,
        spec: &TenantSpec,
        _state: &NoState,
        end: &End,
    ) -> Result<Finished, StoreError> {
        let job = &cx.job.job;
        let (Some(env), false) = (&spec.env, *end == End::Succeeded) else {
            return Ok(Finished::default());
        };
        let limit = cx.shared.settings().routing.history_limit;
        let mut revision = None;
        if let RouteWrite::Changed(rev) = tx.remove_route(&spec.tenant_id, env, limit).await? {
            revision = Some(rev);
        }
        let released = tx.release_environment(&spec.tenant_id, env, true).await?;
        let event = if *end == End::Cancelled {
            "TENANCY_ENVIRONMENT_PLACEMENT_CANCELLED"
        } else {
            "TENANCY_ENVIRONMENT_PLACEMENT_FAILED"
        };
        tx.audit(AuditInput {
            tenant_id: Some(&spec.tenant_id),
            event_type: event,
            actor: "system:jobs",
            target: &job.target,
            payload: json!({"job_id": job.job_id, "env": env, "error": end.error(),
                            "released": released.map(|r| json!({"cell_id": r.cell_id, "units": r.units})),
                            "routes_revision": revision}),
            correlation_id: job.correlation_id.as_deref(),
        })
        .await?;
        Ok(Finished {
            routes_revision: revision,
        })
    }
    fn wait_limit(&self, shared: &crate::shared::Shared) -> std::time::Duration {
        std::time::Duration::from_secs(shared.settings().placement.stamp_wait_secs.max(1))
    }
    fn wait_poll(&self, shared: &crate::shared::Shared) -> std::time::Duration {
        std::time::Duration::from_millis(shared.settings().placement.stamp_poll_ms.max(50))
    }
}
