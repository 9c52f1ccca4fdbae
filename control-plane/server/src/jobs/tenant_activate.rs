//! `tenant.activate`: places every environment of a draft tenant (pooled cell, or a dedicated cell stamped for it), publishes `serve` routes and makes it `active`. Failing or cancelled, it gives back every placement and route it took: the tenant is `draft` and holds nothing.

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use super::tenant::{self, Compensation, NoState, TenantSpec, TenantStep};
use crate::persistence::{StoreError, WriteTx};
use cellplane_api::LifecycleAction;

const STEPS: &[TenantStep] = &[
    TenantStep::CheckTenant,
    TenantStep::PrepareEnvironments,
    TenantStep::Place,
    TenantStep::PublishServe,
];

pub struct TenantActivate;

impl Kind for TenantActivate {
    const NAME: &'static str = "tenant.activate";
    type Spec = TenantSpec;
    type State = NoState;

    fn target(spec: &TenantSpec) -> String {
        crate::ctx::tenant_target(&spec.tenant_id)
    }
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
        tenant::finish_lifecycle(
            tx,
            cx,
            spec,
            LifecycleAction::Activate,
            Compensation::Unplace,
            end,
        )
        .await
    }
    /// Placement may wait for a cell being stamped.
    fn wait_limit(&self, shared: &crate::shared::Shared) -> std::time::Duration {
        std::time::Duration::from_secs(shared.settings().placement.stamp_wait_secs.max(1))
    }
    fn wait_poll(&self, shared: &crate::shared::Shared) -> std::time::Duration {
        std::time::Duration::from_millis(shared.settings().placement.stamp_poll_ms.max(50))
    }
}
