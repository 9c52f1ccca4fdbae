//! Starting a move: the checks and the transaction that records it (used by
//! `POST /v1/tenants/{id}/move` and by a cell's drain).

use crate::ctx::{tenant_target, Ctx};
use crate::error::{invalid, not_found, Result, ServiceError};
use crate::jobs::tenant_move::{MoveSpec, TenantMove};
use crate::persistence::{self, AuditInput};
use crate::shared::Shared;
use cellplane_api::{
    CellState, Id, Move, MoveRequest, MoveState, MoveWithJob, Profile, TenantState, Tier,
};
use serde_json::json;

/// Checks a move whole (the environment, the target: known, active, not draining, the
/// right tier, inside the tenant's regions, with room; no other move or job holding the
/// tenant), then records it, reserves the target's capacity and enqueues its job in one
/// transaction, so a refused move reserves nothing.
pub async fn request_move(
    shared: &Shared,
    ctx: &Ctx,
    tenant_id: &str,
    req: MoveRequest,
) -> Result<MoveWithJob> {
    let env = Id::parse(req.env.clone()).map_err(|e| invalid("env", e.to_string()))?;
    let dedicated = match (req.target_cell_id.as_deref(), req.target.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "target",
                "give either target_cell_id or target, not both",
            ))
        }
        (None, None) => {
            return Err(invalid(
                "target_cell_id",
                "required: the cell to move to (or \"target\": \"dedicated\")",
            ))
        }
        (None, Some("dedicated")) => true,
        (None, Some(other)) => {
            return Err(invalid(
                "target",
                format!("must be \"dedicated\", not {other:?}"),
            ))
        }
        (Some(c), None) => {
            Id::parse(c.to_string()).map_err(|e| invalid("target_cell_id", e.to_string()))?;
            false
        }
    };
    let store = &shared.store;
    let t = store
        .get_tenant(tenant_id)
        .await?
        .ok_or_else(|| not_found("tenant", tenant_id))?;
    let envs = store.list_environments(tenant_id).await?;
    let e = envs
        .iter()
        .find(|e| e.name == env.as_str())
        .ok_or_else(|| not_found("environment", &format!("{tenant_id}/{env}")))?;
    if t.state != TenantState::Active {
        return Err(ServiceError::Conflict(format!(
            "tenant {tenant_id:?} is {}: only an active tenant is moved (its routes serve)",
            t.state.as_str()
        )));
    }
    if let Some(job) = &t.pending_job_id {
        return Err(ServiceError::Conflict(format!(
            "tenant {tenant_id:?} has job {job} in progress"
        )));
    }
    let Some(source) = e.cell_id.clone() else {
        return Err(ServiceError::Conflict(format!(
            "{tenant_id}/{env} is not placed on a cell: there is nothing to move"
        )));
    };
    let units = t.quotas.units.unwrap_or(1).max(1) as i64;
    let target_id = if dedicated {
        if t.profile == Profile::StDedicated
            && store
                .get_cell(&source)
                .await?
                .is_some_and(|c| c.tier == Tier::Dedicated)
        {
            return Err(ServiceError::Conflict(format!(
                "{tenant_id}/{env} is already on its dedicated cell {source}"
            )));
        }
        crate::placement::dedicated_cell_id(tenant_id, env.as_str())
    } else {
        req.target_cell_id.clone().unwrap_or_default()
    };
    if target_id == source {
        return Err(ServiceError::Conflict(format!(
            "{tenant_id}/{env} is already on cell {source}"
        )));
    }
    // Other environments of the tenant: the cell contract keys data by tenant, so two
    // environments of one tenant never share a cell, and the source's purge must not
    // touch another environment's data.
    for other in envs.iter().filter(|o| o.name != env.as_str()) {
        match other.cell_id.as_deref() {
            Some(c) if c == target_id => {
                return Err(ServiceError::Conflict(format!(
                    "cell {target_id} already serves {tenant_id}/{}: a cell holds one \
                     environment of a tenant (the cell contract keys data by tenant)",
                    other.name
                )))
            }
            Some(c) if c == source => {
                return Err(ServiceError::Conflict(format!(
                    "{tenant_id}/{} shares cell {source} with {tenant_id}/{env}: moving one \
                     would purge the other's data from it",
                    other.name
                )))
            }
            _ => {}
        }
    }
    let allowed = crate::placement::candidate_regions(
        &e.region,
        t.policies.data_residency,
        t.policies.allowed_regions.as_deref(),
    );
    if dedicated {
        // The dedicated cell is stamped in the environment's region by the move's job.
    } else {
        let target = store
            .get_cell(&target_id)
            .await?
            .ok_or_else(|| invalid("target_cell_id", format!("there is no cell {target_id:?}")))?;
        match target.state {
            CellState::Active => {}
            CellState::Draining => {
                return Err(ServiceError::Conflict(format!(
                    "cell {target_id} is draining: it takes no tenants"
                )))
            }
            other => {
                return Err(ServiceError::Conflict(format!(
                    "cell {target_id} is {}: a move needs an active target",
                    other.as_str()
                )))
            }
        }
        let wanted = if t.profile.is_pooled() {
            Tier::Pooled
        } else {
            Tier::Dedicated
        };
        if target.tier != wanted {
            return Err(ServiceError::Conflict(format!(
                "cell {target_id} is {}, and profile {} lives on {} cells{}",
                target.tier.as_str(),
                t.profile.as_str(),
                wanted.as_str(),
                if wanted == Tier::Pooled {
                    " (move to \"target\": \"dedicated\" to isolate the tenant)"
                } else {
                    ""
                }
            )));
        }
        if target.tier == Tier::Dedicated
            && target.labels.get("tenant").map(String::as_str) != Some(tenant_id)
        {
            return Err(ServiceError::Conflict(format!(
                "cell {target_id} is dedicated to another tenant"
            )));
        }
        if !allowed.iter().any(|r| r == &target.region) {
            return Err(ServiceError::Conflict(format!(
                "cell {target_id} is in {}, outside the regions {tenant_id}/{env} may live in \
                 ({}; data residency {})",
                target.region,
                allowed.join(", "),
                match t.policies.data_residency {
                    Some(cellplane_api::DataResidency::InRegionOnly) => "in-region-only",
                    Some(cellplane_api::DataResidency::AllowedRegions) => "allowed-regions",
                    Some(cellplane_api::DataResidency::Any) => "any",
                    None => "unset",
                }
            )));
        }
        let free_units = target.capacity.units.saturating_sub(target.used.units);
        let free_slots = target.capacity.tenants.saturating_sub(target.used.tenants);
        if free_slots < 1 || free_units < units as u64 {
            return Err(ServiceError::Conflict(format!(
                "cell {target_id} has no room for {tenant_id}/{env}: {}/{} tenants, {}/{} units \
                 used, {units} unit(s) needed",
                target.used.tenants,
                target.capacity.tenants,
                target.used.units,
                target.capacity.units
            )));
        }
        crate::jobs::tenant_move::endpoint(shared, &target_id)
            .await
            .map_err(ServiceError::Conflict)?;
    }
    crate::jobs::tenant_move::endpoint(shared, &source)
        .await
        .map_err(ServiceError::Conflict)?;

    let move_id = persistence::new_id("mv");
    let spec = MoveSpec {
        move_id: move_id.clone(),
        tenant_id: tenant_id.to_string(),
        env: env.to_string(),
        source_cell_id: source.clone(),
        target_cell_id: target_id.clone(),
        dedicated,
        units,
    };
    let mut tx = store.write().await?;
    if let Some(m) = tx.running_move_of(tenant_id, env.as_str()).await? {
        return Err(ServiceError::Conflict(format!(
            "{tenant_id}/{env} is being moved by move {} (job {})",
            m.move_id, m.job_id
        )));
    }
    let job = crate::jobs::enqueue::<TenantMove>(
        &mut tx,
        &spec,
        shared.settings.job_max_attempts,
        Some(&ctx.correlation_id),
    )
    .await?;
    let now = persistence::now();
    let mv = Move {
        move_id: move_id.clone(),
        tenant_id: tenant_id.to_string(),
        env: env.to_string(),
        source_cell_id: source.clone(),
        target_cell_id: target_id.clone(),
        dedicated,
        state: MoveState::Running,
        step: "queued".into(),
        job_id: job.job_id.clone(),
        units,
        rows_copied: 0,
        bytes_copied: 0,
        delta_rounds: 0,
        current_delta: None,
        hold_ms: None,
        error: None,
        evidence: json!({}),
        created_at: now.clone(),
        updated_at: now,
        finished_at: None,
    };
    tx.insert_move(&mv).await?;
    if !dedicated {
        // Reserved now, in the transaction that records the move: a refusal for room
        // is immediate and reserves nothing.
        if !tx.reserve_capacity(&target_id, units).await? {
            return Err(ServiceError::Conflict(format!(
                "cell {target_id} has no room for {tenant_id}/{env} ({units} unit(s)) or is \
                 no longer active"
            )));
        }
        tx.mark_target_reserved(&move_id).await?;
    }
    tx.audit(AuditInput {
        tenant_id: Some(tenant_id),
        event_type: "TENANCY_MOVE_REQUESTED",
        actor: &ctx.actor,
        target: &tenant_target(tenant_id),
        payload: json!({"move_id": move_id, "job_id": job.job_id, "env": env.as_str(),
                        "from_cell_id": source, "to_cell_id": target_id,
                        "dedicated": dedicated, "units": units,
                        "target_reserved": !dedicated}),
        correlation_id: Some(&ctx.correlation_id),
    })
    .await?;
    tx.commit().await?;
    shared.job_notify.notify_waiters();
    Ok(MoveWithJob { move_: mv, job })
}
