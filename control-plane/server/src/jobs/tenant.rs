//! What the tenant job kinds share: their spec, the steps they are made of, and the end of
//! a lifecycle transition with its compensation. Each kind picks its steps in its own file.

use super::kind::{End, FinishCx, Next, StepCx, StepError};
use super::DynKind;
use crate::error::ServiceError;
use crate::persistence::{AuditInput, StoreError, WriteTx};
use crate::placement::{self, Outcome};
use cellplane_api::{LifecycleAction, RouteMode, TenantState};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The spec of every tenant job: the tenant, and for `tenant.place` the environment that
/// was added. Payloads written by earlier versions (with `action` and `to`) still read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantSpec {
    pub tenant_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

/// Tenant jobs keep nothing between steps: each step reads the registry and is idempotent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NoState {}

/// The kind that runs a lifecycle action.
pub fn lifecycle_kind(action: LifecycleAction) -> &'static dyn DynKind {
    match action {
        LifecycleAction::Activate => &super::tenant_activate::TenantActivate,
        LifecycleAction::Suspend => &super::tenant_suspend::TenantSuspend,
        LifecycleAction::Resume => &super::tenant_resume::TenantResume,
        LifecycleAction::Archive => &super::tenant_archive::TenantArchive,
        LifecycleAction::Delete => &super::tenant_delete::TenantDelete,
    }
}

/// The building blocks of tenant jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantStep {
    /// The tenant still exists and is held by this job.
    CheckTenant,
    /// The tenant is active (a `tenant.place` job); otherwise the job ends here with nothing
    /// to do: a suspended tenant's environments are placed when it resumes.
    CheckActive,
    /// Every environment of the tenant has its resource mapping recorded.
    PrepareEnvironments,
    /// Every environment holds capacity on a cell (pooled, or its dedicated cell).
    Place,
    /// Every placed environment has a `serve` route.
    PublishServe,
    /// Every placed environment has a `suspended` route.
    PublishSuspended,
    /// Every placed environment without a route gets a `serve` route; others stay as they are.
    PublishMissing,
    /// The tenant has no routes.
    RemoveRoutes,
    /// The tenant's environments hold no capacity (they keep their cell: the data is there).
    ReleaseCapacity,
    /// The tenant's environments hold no capacity and point at no cell.
    ForgetCells,
}

impl TenantStep {
    pub fn name(self) -> &'static str {
        match self {
            TenantStep::CheckTenant => "check-tenant",
            TenantStep::CheckActive => "check-active",
            TenantStep::PrepareEnvironments => "prepare-environments",
            TenantStep::Place => "place",
            TenantStep::PublishServe => "publish-routes",
            TenantStep::PublishSuspended => "suspend-routes",
            TenantStep::PublishMissing => "publish-new-routes",
            TenantStep::RemoveRoutes => "remove-routes",
            TenantStep::ReleaseCapacity => "release-capacity",
            TenantStep::ForgetCells => "forget-cells",
        }
    }
}

pub fn names(steps: &[TenantStep]) -> Vec<&'static str> {
    steps.iter().map(|s| s.name()).collect()
}

/// Runs one step for `spec`'s tenant.
pub async fn run(cx: &StepCx<'_>, spec: &TenantSpec, step: TenantStep) -> Result<Next, StepError> {
    let shared = cx.shared();
    let store = shared.store();
    let tenant_id = spec.tenant_id.as_str();
    let corr = cx.correlation_id();
    match step {
        TenantStep::CheckTenant => {
            let t = store
                .get_tenant(tenant_id)
                .await?
                .ok_or_else(|| StepError::Fatal(format!("tenant {tenant_id} is gone")))?;
            if t.pending_job_id.as_deref() != Some(cx.job.job.job_id.as_str()) {
                return Err(StepError::Fatal(format!(
                    "tenant {tenant_id} is no longer held by this job"
                )));
            }
            Ok(Next::Continue(format!(
                "tenant {tenant_id} is {}",
                t.state.as_str()
            )))
        }
        TenantStep::CheckActive => {
            let Some(t) = store.get_tenant(tenant_id).await? else {
                return Ok(Next::Done(format!("tenant {tenant_id} is gone")));
            };
            if t.state != TenantState::Active {
                return Ok(Next::Done(format!(
                    "tenant {tenant_id} is {}: its environments are placed when it is active",
                    t.state.as_str()
                )));
            }
            Ok(Next::Continue(format!("tenant {tenant_id} is active")))
        }
        TenantStep::PrepareEnvironments => {
            let envs = store.list_environments(tenant_id).await?;
            let names: Vec<&str> = envs.iter().map(|e| e.name.as_str()).collect();
            Ok(Next::Continue(format!(
                "environments ready: {}",
                names.join(", ")
            )))
        }
        TenantStep::Place => {
            let envs = store.list_environments(tenant_id).await?;
            let mut done = Vec::new();
            for e in &envs {
                match shared
                    .placement()
                    .place_environment(tenant_id, &e.name, corr)
                    .await?
                {
                    Outcome::Placed {
                        decision: d,
                        prestamp,
                    } => {
                        if let Some(cell) = prestamp {
                            // Best effort: the placement is done whatever happens here.
                            let ctx = placement::system_ctx(corr);
                            if let Err(e) = super::register_cell(shared, &ctx, *cell).await {
                                tracing::warn!(error = %e, "pre-stamping failed");
                            }
                        }
                        done.push(format!("{} → {} ({})", e.name, d.cell_id, d.reason))
                    }
                    Outcome::AlreadyPlaced(c) => done.push(format!("{} on {c}", e.name)),
                    Outcome::Waiting(why) => return Ok(Next::Wait(why)),
                    Outcome::Stamp { cell, why } => {
                        let ctx = placement::system_ctx(corr);
                        let cell_id = cell.cell_id.to_string();
                        match super::register_cell(shared, &ctx, *cell).await {
                            Ok(_) => tracing::info!(tenant_id, cell_id, "{why}"),
                            // Registered meanwhile (a retried step): wait for it all the same.
                            Err(ServiceError::Conflict(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                        return Ok(Next::Wait(why));
                    }
                    Outcome::Impossible(why) => {
                        shared
                            .placement()
                            .record_placement_failure(tenant_id, &e.name, &why, corr)
                            .await?;
                        return Err(StepError::Fatal(format!(
                            "cannot place {tenant_id}/{}: {why}",
                            e.name
                        )));
                    }
                }
            }
            Ok(Next::Continue(format!("placed: {}", done.join("; "))))
        }
        TenantStep::PublishServe | TenantStep::PublishSuspended | TenantStep::PublishMissing => {
            let mode = if step == TenantStep::PublishSuspended {
                RouteMode::Suspended
            } else {
                RouteMode::Serve
            };
            let changed = if step == TenantStep::PublishMissing {
                shared
                    .routing()
                    .publish_missing_routes(tenant_id, mode, corr)
                    .await?
            } else {
                shared
                    .routing()
                    .publish_tenant_routes(tenant_id, mode, corr)
                    .await?
            };
            Ok(Next::Continue(format!(
                "routes {}: {}",
                mode.as_str(),
                if changed.is_empty() {
                    "already published".to_string()
                } else {
                    changed.join(", ")
                }
            )))
        }
        TenantStep::RemoveRoutes => {
            let removed = shared
                .routing()
                .remove_tenant_routes(tenant_id, corr)
                .await?;
            Ok(Next::Continue(format!(
                "routes removed: {}",
                removed.join(", ")
            )))
        }
        TenantStep::ReleaseCapacity | TenantStep::ForgetCells => {
            let released = shared
                .placement()
                .release_tenant(tenant_id, step == TenantStep::ForgetCells, corr)
                .await?;
            Ok(Next::Continue(format!(
                "capacity released: {}",
                released.join(", ")
            )))
        }
    }
}

/// What undoing a lifecycle job that did not succeed means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensation {
    /// Nothing the job did needs undoing (its steps only moved the tenant further along a
    /// path the next attempt or action completes).
    None,
    /// Give back every placement and route the job took: the tenant goes back to `draft`
    /// holding nothing (an activation).
    Unplace,
    /// Put the routes back to `suspended` (a resume that may have published `serve`).
    Resuspend,
}

/// Ends a lifecycle job: on success the tenant takes `to`; otherwise the compensation runs.
/// Changes nothing when the job no longer holds the tenant (a second call after a crash).
pub async fn finish_lifecycle(
    tx: &mut WriteTx,
    cx: &FinishCx<'_>,
    spec: &TenantSpec,
    action: LifecycleAction,
    compensation: Compensation,
    end: &End,
) -> Result<super::Finished, StoreError> {
    let job = &cx.job.job;
    let tenant_id = spec.tenant_id.as_str();
    let to = action.transition().1;
    let succeeded = *end == End::Succeeded;
    let held = tx
        .finish_tenant_transition(tenant_id, &job.job_id, succeeded.then_some(to))
        .await?;
    if !held {
        return Ok(super::Finished::default());
    }
    let limit = cx.shared.settings().routing.history_limit;
    let corr = job.correlation_id.as_deref();
    let mut last_revision = None;
    let mut undone = Vec::new();
    if !succeeded {
        match compensation {
            Compensation::None => {}
            Compensation::Unplace => {
                let (_, rev) = crate::routing::remove_in(tx, tenant_id, limit, corr)
                    .await
                    .map_err(service_to_store)?;
                last_revision = rev;
                for e in tx.list_environments_tx(tenant_id).await? {
                    if let Some(r) = tx.release_environment(tenant_id, &e.name, true).await? {
                        undone.push(json!({"env": e.name, "cell_id": r.cell_id, "units": r.units}));
                    }
                }
            }
            Compensation::Resuspend => {
                let (_, rev) = crate::routing::publish_in(
                    tx,
                    tenant_id,
                    RouteMode::Suspended,
                    false,
                    limit,
                    corr,
                )
                .await
                .map_err(service_to_store)?;
                last_revision = rev;
            }
        }
    }
    let event = match end {
        End::Succeeded => format!("TENANCY_{}", past_tense(action)),
        End::Cancelled => format!("TENANCY_{}_CANCELLED", action.as_str().to_uppercase()),
        End::Failed(_) => format!("TENANCY_{}_FAILED", action.as_str().to_uppercase()),
    };
    tx.audit(AuditInput {
        tenant_id: Some(tenant_id),
        event_type: &event,
        actor: "system:jobs",
        target: &job.target,
        payload: json!({"job_id": job.job_id, "state": succeeded.then_some(to), "error": end.error(),
                        "attempts": job.attempts, "released": undone,
                        "routes_revision": last_revision}),
        correlation_id: corr,
    })
    .await?;
    Ok(super::Finished {
        routes_revision: last_revision,
    })
}

fn past_tense(action: LifecycleAction) -> &'static str {
    match action {
        LifecycleAction::Activate => "ACTIVATED",
        LifecycleAction::Suspend => "SUSPENDED",
        LifecycleAction::Resume => "RESUMED",
        LifecycleAction::Archive => "ARCHIVED",
        LifecycleAction::Delete => "DELETED",
    }
}

fn service_to_store(e: ServiceError) -> StoreError {
    match e {
        ServiceError::Store(e) => e,
        other => StoreError::Corrupt(other.to_string()),
    }
}
