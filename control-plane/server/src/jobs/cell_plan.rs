//! `cell.plan`: a drift check: a refresh-only plan whose result is recorded on the cell. It holds the cell like any cell job, so it never runs beside a stamp, apply or destroy.

use super::cell::{self, CellRun, CellSpec};
use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use crate::persistence::{StoreError, WriteTx};
use crate::stamping::CellAction;

pub struct CellPlan;

impl Kind for CellPlan {
    const NAME: &'static str = "cell.plan";
    type Spec = CellSpec;
    type State = CellRun;

    fn target(spec: &CellSpec) -> String {
        cell::target(spec)
    }
    fn locks(spec: &CellSpec) -> Vec<String> {
        cell::locks(spec)
    }
    fn steps(&self) -> Vec<&'static str> {
        vec!["terraform"]
    }
    async fn step(
        &self,
        cx: &StepCx<'_>,
        spec: &CellSpec,
        state: &mut CellRun,
        index: usize,
    ) -> Result<Next, StepError> {
        let _ = index;
        cell::terraform(cx, spec, state, CellAction::Plan).await
    }
    async fn finish(
        &self,
        tx: &mut WriteTx,
        cx: &FinishCx<'_>,
        spec: &CellSpec,
        state: &CellRun,
        end: &End,
    ) -> Result<Finished, StoreError> {
        cell::finish(tx, cx, spec, state, CellAction::Plan, end).await
    }
}
