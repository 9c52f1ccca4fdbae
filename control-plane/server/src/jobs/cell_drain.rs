//! `cell.drain`: moves every tenant environment off a draining pooled cell, at most
//! `moves.drain_parallel` moves at a time, each to the cell placement ranks best for it
//! (the same regions, strategy and room rules as a placement); then the cell is `drained`.
//! A move that rolls back is started again (to a cell chosen afresh), three times at most
//! per environment; then the drain fails naming the environment and the last error.

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use crate::ctx::{cell_target, Ctx};
use crate::error::ServiceError;
use crate::persistence::{AuditInput, MoveFilter, StoreError, WriteTx};
use cellplane_api::{CellState, MoveRequest, MoveState};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// Moves of one environment that may roll back before the drain gives up.
const MAX_TRIES: usize = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainSpec {
    pub cell_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainState {
    /// Environments moved off the cell (`tenant/env → move id`).
    pub moved: BTreeMap<String, String>,
}

pub struct CellDrain;

impl Kind for CellDrain {
    const NAME: &'static str = "cell.drain";
    type Spec = DrainSpec;
    type State = DrainState;

    fn target(spec: &DrainSpec) -> String {
        cell_target(&spec.cell_id)
    }
    fn locks(spec: &DrainSpec) -> Vec<String> {
        vec![super::cell_resource(&spec.cell_id)]
    }
    fn steps(&self) -> Vec<&'static str> {
        vec!["move-tenants", "drained"]
    }
    fn wait_limit(&self, shared: &crate::shared::Shared) -> Duration {
        Duration::from_secs(7 * 86_400 + shared.settings().moves.purge_grace_secs)
    }
    fn wait_poll(&self, shared: &crate::shared::Shared) -> Duration {
        Duration::from_millis(shared.settings().job_wait_poll_ms.clamp(10, 1_000))
    }

    async fn step(
        &self,
        cx: &StepCx<'_>,
        spec: &DrainSpec,
        state: &mut DrainState,
        index: usize,
    ) -> Result<Next, StepError> {
        let shared = cx.shared();
        let store = shared.store();
        let cell = spec.cell_id.as_str();
        if index == 1 {
            let mut tx = store.write().await?;
            let mut c = tx
                .get_cell_tx(cell)
                .await?
                .ok_or_else(|| StepError::Fatal(format!("cell {cell} is gone")))?;
            if c.state == CellState::Draining {
                c.state = CellState::Drained;
                c.version += 1;
                tx.update_cell(&c).await?;
                tx.audit(AuditInput {
                    tenant_id: None,
                    event_type: "CELL_DRAINED",
                    actor: "system:moves",
                    target: &cell_target(cell),
                    payload: json!({"version": c.version, "moved": state.moved}),
                    correlation_id: cx.correlation_id(),
                })
                .await?;
            }
            tx.commit().await?;
            return Ok(Next::Continue(format!(
                "cell {cell} drained: {} environment(s) moved",
                state.moved.len()
            )));
        }
        let c = store
            .get_cell(cell)
            .await?
            .ok_or_else(|| StepError::Fatal(format!("cell {cell} is gone")))?;
        if c.state != CellState::Draining {
            return Err(StepError::Fatal(format!(
                "cell {cell} is {}, not draining",
                c.state.as_str()
            )));
        }
        let started = cx.job.job.started_at.clone().unwrap_or_default();
        let moves = store
            .list_moves(
                &MoveFilter {
                    cell_id: Some(cell.to_string()),
                    ..Default::default()
                },
                "",
                1000,
            )
            .await?;
        let out: Vec<_> = moves
            .iter()
            .filter(|m| m.source_cell_id == cell && m.created_at >= started)
            .collect();
        // A move is out of the drain's way once it flipped (the purge may still wait).
        let running = out
            .iter()
            .filter(|m| m.state == MoveState::Running && m.hold_ms.is_none())
            .count();
        for m in out
            .iter()
            .filter(|m| m.state != MoveState::RolledBack && m.hold_ms.is_some())
        {
            state
                .moved
                .insert(format!("{}/{}", m.tenant_id, m.env), m.move_id.clone());
        }
        let left = store.environments_on_cell(cell).await?;
        if left.is_empty() && running == 0 {
            return Ok(Next::Continue(format!(
                "no environment left on {cell}; {} moved",
                state.moved.len()
            )));
        }
        let parallel = shared.settings().moves.drain_parallel.max(1);
        let mut started_now = Vec::new();
        let ctx = Ctx {
            actor: "system:moves".into(),
            correlation_id: cx.correlation_id().unwrap_or("drain").to_string(),
        };
        for e in &left {
            if running + started_now.len() >= parallel {
                break;
            }
            let moving = out.iter().any(|m| {
                m.tenant_id == e.tenant_id && m.env == e.name && m.state == MoveState::Running
            });
            if moving {
                continue;
            }
            let failed: Vec<_> = out
                .iter()
                .filter(|m| {
                    m.tenant_id == e.tenant_id
                        && m.env == e.name
                        && matches!(m.state, MoveState::RolledBack | MoveState::Failed)
                })
                .collect();
            if failed.len() >= MAX_TRIES {
                return Err(StepError::Fatal(format!(
                    "{}/{} could not be moved off {cell} in {MAX_TRIES} tries; the last: {}",
                    e.tenant_id,
                    e.name,
                    failed[0].error.as_deref().unwrap_or("rolled back")
                )));
            }
            let Some(t) = store.get_tenant(&e.tenant_id).await? else {
                continue;
            };
            // Other environments of the tenant share no cell with this one.
            let mut exclude = vec![cell.to_string()];
            exclude.extend(
                store
                    .list_environments(&e.tenant_id)
                    .await?
                    .into_iter()
                    .filter_map(|o| o.cell_id),
            );
            let units = t.quotas.units.unwrap_or(1).max(1);
            let Some(target) = shared
                .placement()
                .move_target(&t, &e.region, units, &exclude)
                .await?
            else {
                return Err(StepError::Fatal(format!(
                    "no active pooled cell in the regions of {}/{} has room for {units} unit(s)",
                    e.tenant_id, e.name
                )));
            };
            let req = MoveRequest {
                env: e.name.clone(),
                target_cell_id: Some(target.cell_id.clone()),
                target: None,
            };
            match super::move_request::request_move(shared, &ctx, &e.tenant_id, req).await {
                Ok(m) => started_now.push(format!(
                    "{}/{} → {} (move {})",
                    e.tenant_id, e.name, target.cell_id, m.move_.move_id
                )),
                // Held by another job (a lifecycle change): next round.
                Err(ServiceError::Conflict(why)) => {
                    tracing::info!(tenant_id = %e.tenant_id, reason = %why, "not moved yet");
                }
                Err(ServiceError::Store(e)) => return Err(StepError::Retryable(e.to_string())),
                Err(other) => return Err(StepError::Fatal(other.to_string())),
            }
        }
        Ok(Next::Wait(format!(
            "{} environment(s) left on {cell}, {} move(s) running{}",
            left.len(),
            running + started_now.len(),
            if started_now.is_empty() {
                String::new()
            } else {
                format!("; started {}", started_now.join(", "))
            }
        )))
    }

    async fn finish(
        &self,
        tx: &mut WriteTx,
        cx: &FinishCx<'_>,
        spec: &DrainSpec,
        state: &DrainState,
        end: &End,
    ) -> Result<Finished, StoreError> {
        if *end == End::Succeeded {
            return Ok(Finished::default());
        }
        let job = &cx.job.job;
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: "CELL_DRAIN_FAILED",
            actor: "system:moves",
            target: &cell_target(&spec.cell_id),
            payload: json!({"job_id": job.job_id, "error": end.error(), "moved": state.moved}),
            correlation_id: job.correlation_id.as_deref(),
        })
        .await?;
        Ok(Finished::default())
    }
}
