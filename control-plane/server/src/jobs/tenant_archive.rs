//! `tenant.archive`: removes the tenant's routes and gives back its capacity (its data stays on its cells) and makes it `archived`. Failing, the next archive completes it: removed routes are not put back for a tenant on its way out.

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use super::tenant::{self, Compensation, NoState, TenantSpec, TenantStep};
use crate::persistence::{StoreError, WriteTx};
use cellplane_api::LifecycleAction;

const STEPS: &[TenantStep] = &[
    TenantStep::CheckTenant,
    TenantStep::RemoveRoutes,
    TenantStep::ReleaseCapacity,
];

pub struct TenantArchive;

impl Kind for TenantArchive {
    const NAME: &'static str = "tenant.archive";
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
            LifecycleAction::Archive,
            Compensation::None,
            end,
        )
        .await
    }
}
