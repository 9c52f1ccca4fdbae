//! `noop` (debug builds, or the `bench-kinds` feature): one step that does nothing, for
//! measuring the engine itself (bench/jobs): claim, lease, record, finish, release.

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use crate::persistence::{StoreError, WriteTx};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NoopSpec {
    /// A resource to hold, so a benchmark exercises the lock table like real jobs.
    pub resource: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct NoState {}

pub struct Noop;

impl Kind for Noop {
    const NAME: &'static str = "noop";
    type Spec = NoopSpec;
    type State = NoState;

    fn target(spec: &NoopSpec) -> String {
        spec.resource.clone()
    }
    fn locks(spec: &NoopSpec) -> Vec<String> {
        vec![spec.resource.clone()]
    }
    fn steps(&self) -> Vec<&'static str> {
        vec!["noop"]
    }
    async fn step(
        &self,
        _cx: &StepCx<'_>,
        _spec: &NoopSpec,
        _state: &mut NoState,
        _index: usize,
    ) -> Result<Next, StepError> {
        Ok(Next::Continue(String::new()))
    }
    async fn finish(
        &self,
        _tx: &mut WriteTx,
        _cx: &FinishCx<'_>,
        _spec: &NoopSpec,
        _state: &NoState,
        _end: &End,
    ) -> Result<Finished, StoreError> {
        Ok(Finished::default())
    }
}
