//! `cell.apply`: re-applies a cell's current spec (new vars or app version, a repair of a failed stamp, drift remediation).

use super::cell::{self, CellRun, CellSpec};
use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use crate::persistence::{StoreError, WriteTx};
use crate::stamping::CellAction;

pub struct CellApply;

impl Kind for CellApply {
    const NAME: &'static str = "cell.apply";
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
            0 => cell::begin(cx, spec, CellAction::Apply).await,
            _ => cell::terraform(cx, spec, state, CellAction::Apply).await,
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
        cell::finish(tx, cx, spec, state, CellAction::Apply, end).await
    }
}
