//! The service's tenant move operations (`POST /v1/tenants/{id}/move`, `/v1/moves`); the
//! checks and the transaction of a new move are `jobs::move_request` (a drain starts moves
//! too).

use super::Service;
use crate::ctx::{tenant_target, Ctx};
use crate::error::{check_version, invalid, not_found, Result, ServiceError};
use crate::persistence::{AuditInput, MoveFilter};
use cellplane_api::{Move, MoveRequest, MoveWithJob, PatchTenant, Profile, Tenant, TenantState};
use serde_json::json;

/// What a profile change did.
pub enum ProfileChange {
    /// The profile changed (nothing was placed that would have to move).
    Changed(Box<Tenant>),
    /// A move to a dedicated cell started; the profile changes at its flip.
    Moving(Box<MoveWithJob>),
}

impl Service {
    /// `PATCH /v1/tenants/{id}` with a `profile`.
    pub async fn change_profile(
        &self,
        ctx: &Ctx,
        id: &str,
        if_match: Option<i64>,
        patch: PatchTenant,
    ) -> Result<ProfileChange> {
        let Some(to) = patch.profile else {
            return Err(invalid("profile", "required"));
        };
        if patch.quotas.is_some() || patch.policies.is_some() || patch.billing.is_some() {
            return Err(invalid(
                "profile",
                "a profile change goes alone in its request (it may move the tenant)",
            ));
        }
        let store = &self.shared.store;
        let t = store
            .get_tenant(id)
            .await?
            .ok_or_else(|| not_found("tenant", id))?;
        check_version(if_match, t.version)?;
        let envs = store.list_environments(id).await?;
        let placed: Vec<_> = envs.iter().filter(|e| e.cell_id.is_some()).collect();
        if to == t.profile {
            return Ok(ProfileChange::Changed(Box::new(self.get_tenant(id).await?)));
        }
        if placed.is_empty() && matches!(t.state, TenantState::Draft) {
            let mut tx = store.write().await?;
            tx.set_tenant_profile(id, to.as_str()).await?;
            tx.audit(AuditInput {
                tenant_id: Some(id),
                event_type: "TENANCY_UPDATED",
                actor: &ctx.actor,
                target: &tenant_target(id),
                payload: json!({"changes": {"profile": to}, "version": t.version + 1}),
                correlation_id: Some(&ctx.correlation_id),
            })
            .await?;
            tx.commit().await?;
            return Ok(ProfileChange::Changed(Box::new(self.get_tenant(id).await?)));
        }
        if t.profile != Profile::MtStandard || to != Profile::StDedicated {
            return Err(ServiceError::Conflict(format!(
                "tenant {id:?} is {} with placed environments: only mt-standard → st-dedicated \
                 is done by moving it (to {} it is not)",
                t.profile.as_str(),
                to.as_str()
            )));
        }
        let [env] = placed.as_slice() else {
            return Err(ServiceError::Conflict(format!(
                "tenant {id:?} has {} placed environments: move each with \"target\": \
                 \"dedicated\" (one move at a time); the profile changes with the first",
                placed.len()
            )));
        };
        let req = MoveRequest {
            env: env.name.clone(),
            target_cell_id: None,
            target: Some("dedicated".into()),
        };
        Ok(ProfileChange::Moving(Box::new(
            crate::jobs::move_request::request_move(&self.shared, ctx, id, req).await?,
        )))
    }

    pub async fn move_tenant(
        &self,
        ctx: &Ctx,
        tenant_id: &str,
        req: MoveRequest,
    ) -> Result<MoveWithJob> {
        crate::jobs::move_request::request_move(&self.shared, ctx, tenant_id, req).await
    }

    pub async fn get_move(&self, id: &str) -> Result<Move> {
        Ok(self
            .shared
            .store
            .get_move(id)
            .await?
            .ok_or_else(|| not_found("move", id))?
            .public)
    }

    pub async fn list_moves(&self, f: &MoveFilter, before: &str, limit: i64) -> Result<Vec<Move>> {
        Ok(self.shared.store.list_moves(f, before, limit).await?)
    }
}
