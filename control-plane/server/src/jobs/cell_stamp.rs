//! `cell.stamp`: stamps a registered cell: `pending → provisioning`, then terraform `init → plan → apply → output` from its rendered stack; `active` on success, `failed` otherwise (a later `cell apply` repairs it). Every attempt re-plans from terraform's state, so a resumed stamp applies each resource once.

use super::cell::{self, CellRun, CellSpec};
use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use crate::persistence::{StoreError, WriteTx};
use crate::stamping::CellAction;

pub struct CellStamp;

impl Kind for CellStamp {
    const NAME: &'static str = "cell.stamp";
    type Spec = CellSpec;
    type State = CellRun;

    fn target(spec: &CellSpec) -> String {
        cell::target(spec)
    }
    fn locks(spec: &CellSpec) -> Vec<String> {
        cell::locks(spec)
    }
    fn steps(&self) -> Vec<&'static str> {
        vec!["begin", "terraform"]
    }
    async fn step(
        &self,
        cx: &StepCx<'_>,
        spec: &CellSpec,
        state: &mut CellRun,
        index: usize,
    ) -> Result<Next, StepError> {
        match index {
            0 => cell::begin(cx, spec, CellAction::Stamp).await,
            _ => cell::terraform(cx, spec, state, CellAction::Stamp).await,
        }
    }
    async fn finish(
        &self,
        tx: &mut WriteTx,
        cx: &FinishCx<'_>,
        spec: &CellSpec,
        state: &CellRun,
        end: &End,
    ) -> Result<Finished, StoreError> {
        cell::finish(tx, cx, spec, state, CellAction::Stamp, end).await
    }
}
