//! `tenant.suspend`: publishes `suspended` routes (the router answers 403) and makes the tenant `suspended`; it keeps its cells and capacity. Failing, nothing needs undoing: a route already suspended stays so until a resume.

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use super::tenant::{self, Compensation, NoState, TenantSpec, TenantStep};
use crate::persistence::{StoreError, WriteTx};
use cellplane_api::LifecycleAction;

const STEPS: &[TenantStep] = &[TenantStep::CheckTenant, TenantStep::PublishSuspended];

pub struct TenantSuspend;

impl Kind for TenantSuspend {
    const NAME: &'static str = "tenant.suspend";
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
            LifecycleAction::Suspend,
            Compensation::None,
            end,
        )
        .await
    }
}
