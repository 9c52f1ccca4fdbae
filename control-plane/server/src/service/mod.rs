//! Operations on the registry: the only thing HTTP handlers call. Each operation validates
//! what serde could not, runs one write transaction through persistence (which appends the
//! audit record and outbox event) and returns wire types. It never speaks HTTP.

pub mod manifests;
mod moves;
pub mod releases;
pub use manifests::{ApplyOptions, ApplyOutcome};
pub use moves::ProfileChange;
pub mod webhooks;

pub use crate::ctx::{cell_target, tenant_target, Ctx};
pub use crate::error::{check_version, invalid, not_found, Result, ServiceError};
use crate::iac::TemplateError;
use crate::persistence::{
    self, AuditInput, CellFilter, Conditional, EnvironmentRow, Store, StoreError, TenantFilter,
    TenantRow,
};
use crate::placement::Placement;
use crate::routing::Routing;
pub use crate::shared::{ServiceSettings, Shared};
use crate::stamping::CellAction;
use crate::validate::*;
use cellplane_api::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone)]
pub struct Service {
    shared: Shared,
    tenant_batcher: tokio::sync::mpsc::Sender<BatchItem>,
}

type BatchItem = (
    persistence::NewTenant,
    tokio::sync::oneshot::Sender<std::result::Result<persistence::CreateOutcome, String>>,
);

/// Most tenant creations one transaction takes.
const MAX_CREATE_BATCH: usize = 128;

/// Group commit for tenant creation: requests that arrive while a transaction is running
/// wait and go together in the next one. Under no load a batch is a single request, so
/// latency is unchanged; under load, one commit (and one chain-head move) serves many.
async fn run_tenant_batcher(store: Store, mut rx: tokio::sync::mpsc::Receiver<BatchItem>) {
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        while items.len() < MAX_CREATE_BATCH {
            match rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let (batch, replies): (Vec<_>, Vec<_>) = items.into_iter().unzip();
        match store.create_tenants(&batch).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batch = batch.len(), "tenant creation batch failed");
                for reply in replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// Refuses the write of a controller that lost its lease (`None`: not a controller).
pub(crate) async fn check_fence(
    tx: &mut persistence::WriteTx,
    fence: Option<&persistence::Fence>,
) -> Result<()> {
    if let Some(f) = fence {
        if !tx.fence(f.name, &f.holder, f.term).await? {
            return Err(ServiceError::Fenced(format!(
                "controller {} lost its lease (term {}); write refused",
                f.name, f.term
            )));
        }
    }
    Ok(())
}

/// Where an environment's data lives. Pooled tenants share a database and get a schema,
/// prefix and partition; dedicated tenants get their own database, bucket and queue.
pub fn resource_mapping(tenant_id: &str, env: &str, profile: Profile) -> BTreeMap<String, String> {
    let suffix = if env == "prod" {
        String::new()
    } else {
        format!("-{env}")
    };
    let ident = format!("{tenant_id}{suffix}");
    let mut m = BTreeMap::new();
    if profile.is_pooled() {
        m.insert("strategy".into(), "pooled".into());
        m.insert("database".into(), "warehouse_shared".into());
        m.insert("schema".into(), format!("t_{}", ident.replace('-', "_")));
        m.insert("object_prefix".into(), format!("tenants/{ident}"));
        m.insert("queue_partition".into(), ident);
    } else {
        m.insert("strategy".into(), "dedicated".into());
        m.insert(
            "database".into(),
            format!("warehouse_{}", ident.replace('-', "_")),
        );
        m.insert("bucket".into(), format!("data-{ident}"));
        m.insert("queue".into(), format!("jobs-{ident}"));
    }
    m
}

fn env_to_wire(e: EnvironmentRow, profile: Profile) -> Environment {
    Environment {
        resource_mapping: resource_mapping(&e.tenant_id, &e.name, profile),
        name: e.name,
        region: e.region,
        isolation_level: e.isolation_level,
        cell_id: e.cell_id,
        endpoint: e.endpoint,
        created_at: e.created_at,
        placement_job_id: None,
    }
}

fn tenant_to_wire(t: TenantRow, envs: Vec<EnvironmentRow>) -> Tenant {
    let profile = t.profile;
    Tenant {
        tenant_id: t.tenant_id,
        organization_id: t.organization_id,
        profile: t.profile,
        state: t.state,
        region: t.region,
        quotas: t.quotas,
        policies: t.policies,
        billing: t.billing,
        environments: envs.into_iter().map(|e| env_to_wire(e, profile)).collect(),
        pending_job_id: t.pending_job_id,
        placement: t.placement,
        desired_state: t.desired.state.unwrap_or(t.state),
        generation: t.desired.generation,
        status: t.desired.status,
        version: t.version,
        created_at: t.created_at,
        updated_at: t.updated_at,
    }
}

impl Service {
    /// Must be called inside a tokio runtime: it starts the tenant-creation batcher.
    pub fn new(store: Store, settings: ServiceSettings) -> Self {
        Self::with_shared(Shared::new(store, settings))
    }

    /// A service over collaborators already built (the job engine gets the same ones).
    pub fn with_shared(shared: Shared) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(4 * MAX_CREATE_BATCH);
        tokio::spawn(run_tenant_batcher(shared.store.clone(), rx));
        Self {
            shared,
            tenant_batcher: tx,
        }
    }

    /// What the service shares with the job engine and the controllers.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    pub fn settings(&self) -> &ServiceSettings {
        &self.shared.settings
    }

    /// The routing revision as last seen by this process; see [`crate::routing`].
    pub fn route_revisions(&self) -> &crate::routing::RevisionWatch {
        self.shared.routing.revisions()
    }

    /// The routing table's operations (`GET /v1/routes`, holds, heartbeats).
    pub fn routing(&self) -> &Routing {
        &self.shared.routing
    }

    /// Placement's operations (region policies).
    pub fn placement(&self) -> &Placement {
        &self.shared.placement
    }

    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Woken whenever a job of this process records progress or ends, so live followers
    /// (server-sent events) need not wait for their poll.
    pub fn job_changed(&self) -> Arc<tokio::sync::Notify> {
        self.shared.job_changed.clone()
    }

    /// Woken whenever this process enqueues a job, so workers do not wait for their poll.
    pub fn job_notify(&self) -> Arc<tokio::sync::Notify> {
        self.shared.job_notify.clone()
    }

    // ------------------------------------------------------------ organizations

    pub async fn create_organization(
        &self,
        ctx: &Ctx,
        req: CreateOrganization,
    ) -> Result<Organization> {
        validate_org_name("name", &req.name)?;
        let mut tx = self.shared.store.write().await?;
        if tx.organization_exists(req.organization_id.as_str()).await? {
            return Err(ServiceError::Conflict(format!(
                "organization {:?} already exists",
                req.organization_id.as_str()
            )));
        }
        let org = tx
            .insert_organization(req.organization_id.as_str(), &req.name)
            .await?;
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: "TENANCY_ORGANIZATION_CREATED",
            actor: &ctx.actor,
            target: &format!("organization/{}", org.organization_id),
            payload: json!({"organization_id": org.organization_id, "name": org.name}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        Ok(org)
    }

    pub async fn get_organization(&self, id: &str) -> Result<Organization> {
        self.shared
            .store
            .get_organization(id)
            .await?
            .ok_or_else(|| not_found("organization", id))
    }

    pub async fn list_organizations(&self, after: &str, limit: i64) -> Result<Vec<Organization>> {
        Ok(self.shared.store.list_organizations(after, limit).await?)
    }

    // ------------------------------------------------------------ tenants

    pub async fn create_tenant(&self, ctx: &Ctx, req: CreateTenant) -> Result<Tenant> {
        validate_docs(
            req.region.as_str(),
            &req.quotas,
            &req.policies,
            &req.billing,
        )?;
        let ts = persistence::now();
        let row = TenantRow {
            tenant_id: req.tenant_id.into_string(),
            organization_id: req.organization_id.into_string(),
            profile: req.profile,
            state: TenantState::Draft,
            region: req.region.into_string(),
            quotas: req.quotas,
            policies: req.policies,
            billing: req.billing,
            placement: None,
            pending_job_id: None,
            archived_at: None,
            version: 1,
            created_at: ts.clone(),
            updated_at: ts.clone(),
            desired: Default::default(),
        };
        let env = EnvironmentRow {
            tenant_id: row.tenant_id.clone(),
            name: "prod".into(),
            region: row.region.clone(),
            isolation_level: if row.profile.is_pooled() {
                "shared".into()
            } else {
                "strict".into()
            },
            cell_id: None,
            endpoint: None,
            created_at: ts,
        };
        let audit = persistence::OwnedAudit {
            tenant_id: Some(row.tenant_id.clone()),
            event_type: "TENANCY_CREATED".into(),
            actor: ctx.actor.clone(),
            target: tenant_target(&row.tenant_id),
            payload: json!({
                "organization_id": row.organization_id,
                "profile": row.profile,
                "region": row.region,
                "quotas": row.quotas,
                "policies": row.policies,
                "billing": row.billing,
            }),
            correlation_id: Some(ctx.correlation_id.clone()),
        };
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let item = persistence::NewTenant {
            row: row.clone(),
            env: env.clone(),
            audit,
        };
        let unavailable = || {
            ServiceError::Store(StoreError::Corrupt(
                "the tenant writer stopped; the server is shutting down".into(),
            ))
        };
        self.tenant_batcher
            .send((item, reply))
            .await
            .map_err(|_| unavailable())?;
        match outcome.await.map_err(|_| unavailable())? {
            Ok(persistence::CreateOutcome::Created) => {}
            Ok(persistence::CreateOutcome::Duplicate) => {
                return Err(ServiceError::Conflict(format!(
                    "tenant {:?} already exists",
                    row.tenant_id
                )))
            }
            Ok(persistence::CreateOutcome::UnknownOrganization) => {
                return Err(invalid(
                    "organization_id",
                    format!("organization {:?} does not exist", row.organization_id),
                ))
            }
            Err(e) => {
                return Err(ServiceError::Store(StoreError::Corrupt(format!(
                    "tenant creation failed: {e}"
                ))))
            }
        }
        Ok(tenant_to_wire(row, vec![env]))
    }

    pub async fn get_tenant(&self, id: &str) -> Result<Tenant> {
        let t = self
            .shared
            .store
            .get_tenant(id)
            .await?
            .ok_or_else(|| not_found("tenant", id))?;
        let envs = self.shared.store.list_environments(id).await?;
        Ok(tenant_to_wire(t, envs))
    }

    pub async fn list_tenants(
        &self,
        filter: &TenantFilter,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Tenant>> {
        let rows = self.shared.store.list_tenants(filter, after, limit).await?;
        let ids: Vec<String> = rows.iter().map(|t| t.tenant_id.clone()).collect();
        let mut envs: BTreeMap<String, Vec<EnvironmentRow>> = BTreeMap::new();
        for e in self.shared.store.environments_of(&ids).await? {
            envs.entry(e.tenant_id.clone()).or_default().push(e);
        }
        Ok(rows
            .into_iter()
            .map(|t| {
                let e = envs.remove(&t.tenant_id).unwrap_or_default();
                tenant_to_wire(t, e)
            })
            .collect())
    }

    pub async fn patch_tenant(
        &self,
        ctx: &Ctx,
        id: &str,
        if_match: Option<i64>,
        patch: PatchTenant,
    ) -> Result<Tenant> {
        let mut tx = self.shared.store.write().await?;
        let current = tx
            .get_tenant_tx(id)
            .await?
            .ok_or_else(|| not_found("tenant", id))?;
        check_version(if_match, current.version)?;
        if current.state == TenantState::Deleted {
            return Err(ServiceError::Conflict(format!(
                "tenant {id:?} is deleted and cannot change"
            )));
        }
        let quotas = patch.quotas.clone().unwrap_or(current.quotas.clone());
        let policies = patch.policies.clone().unwrap_or(current.policies.clone());
        let billing = patch.billing.clone().unwrap_or(current.billing.clone());
        validate_docs(&current.region, &quotas, &policies, &billing)?;
        match tx
            .update_tenant_docs(id, Some(current.version), &quotas, &policies, &billing)
            .await?
        {
            Conditional::Done => {}
            Conditional::NotFound => return Err(not_found("tenant", id)),
            _ => {
                return Err(ServiceError::PreconditionFailed {
                    current: current.version,
                })
            }
        }
        tx.audit(AuditInput {
            tenant_id: Some(id),
            event_type: "TENANCY_UPDATED",
            actor: &ctx.actor,
            target: &tenant_target(id),
            payload: json!({"changes": patch, "version": current.version + 1}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        let updated = tx
            .get_tenant_tx(id)
            .await?
            .ok_or_else(|| not_found("tenant", id))?;
        tx.commit().await?;
        // A new rate limit reaches the routers with the next revision. Routes already say
        // what the lifecycle decided, so only the rate changes here; a tenant with a
        // lifecycle job in flight gets it when that job publishes.
        if updated.quotas.api_rate_limit != current.quotas.api_rate_limit
            && updated.pending_job_id.is_none()
        {
            let mode = match updated.state {
                TenantState::Active => Some(RouteMode::Serve),
                TenantState::Suspended => Some(RouteMode::Suspended),
                _ => None,
            };
            if let Some(mode) = mode {
                self.shared
                    .routing
                    .republish_rate_limit(id, mode, &ctx.correlation_id)
                    .await?;
            }
        }
        let envs = self.shared.store.list_environments(id).await?;
        Ok(tenant_to_wire(updated, envs))
    }

    /// Requests a lifecycle transition: checks it is legal now, reserves the tenant for one
    /// job and enqueues that job. The state changes when the job's last step commits.
    pub async fn tenant_action(
        &self,
        ctx: &Ctx,
        id: &str,
        action: LifecycleAction,
        if_match: Option<i64>,
        force: bool,
    ) -> Result<Job> {
        self.lifecycle(ctx, id, action, if_match, force, None).await
    }

    /// [`Service::tenant_action`] for the tenant controller: the write carries its fence,
    /// and the desired state is left as it is (the controller converges to it).
    pub async fn converge_tenant(
        &self,
        ctx: &Ctx,
        id: &str,
        action: LifecycleAction,
        fence: &persistence::Fence,
    ) -> Result<Job> {
        self.lifecycle(ctx, id, action, None, false, Some(fence))
            .await
    }

    async fn lifecycle(
        &self,
        ctx: &Ctx,
        id: &str,
        action: LifecycleAction,
        if_match: Option<i64>,
        force: bool,
        fence: Option<&persistence::Fence>,
    ) -> Result<Job> {
        let (from, to) = action.transition();
        let mut tx = self.shared.store.write().await?;
        check_fence(&mut tx, fence).await?;
        let current = tx
            .get_tenant_tx(id)
            .await?
            .ok_or_else(|| not_found("tenant", id))?;
        check_version(if_match, current.version)?;
        if let Some(pending) = &current.pending_job_id {
            return Err(ServiceError::Conflict(format!(
                "tenant {id:?} already has job {pending} in progress"
            )));
        }
        if !from.contains(&current.state) {
            return Err(ServiceError::Conflict(format!(
                "cannot {} tenant {id:?} in state {}",
                action.as_str(),
                current.state.as_str()
            )));
        }
        if action == LifecycleAction::Delete && !force {
            let days = current.policies.retention_days.unwrap_or(0) as i64;
            if let Some(archived) = current
                .archived_at
                .as_deref()
                .and_then(persistence::parse_time)
            {
                let until = archived + chrono::Duration::days(days);
                if until > chrono::Utc::now() {
                    return Err(ServiceError::Conflict(format!(
                        "tenant {id:?} is under retention until {}; delete with force=true to override",
                        persistence::fmt_time(until)
                    )));
                }
            }
        }
        match tx
            .check_tenant_state(id, from, Some(current.version))
            .await?
        {
            Conditional::Done => {}
            Conditional::NotFound => return Err(not_found("tenant", id)),
            Conditional::VersionMismatch => {
                return Err(ServiceError::PreconditionFailed {
                    current: current.version,
                })
            }
            Conditional::StateConflict => {
                return Err(ServiceError::Conflict(format!(
                    "tenant {id:?} changed concurrently; retry"
                )))
            }
        }
        if fence.is_none() {
            // An imperative action is a change of the desired state.
            tx.touch_desired(id, Some(to), None).await?;
        }
        let target = tenant_target(id);
        let spec = crate::jobs::TenantSpec {
            tenant_id: id.to_string(),
            env: None,
        };
        let job = crate::jobs::lifecycle_kind(action)
            .enqueue_json(
                &mut tx,
                serde_json::to_value(&spec).expect("specs serialize"),
                self.shared.settings.job_max_attempts,
                Some(&ctx.correlation_id),
            )
            .await?;
        let job_id = job.job_id.clone();
        tx.audit(AuditInput {
            tenant_id: Some(id),
            event_type: &format!("TENANCY_{}_REQUESTED", action.as_str().to_uppercase()),
            actor: &ctx.actor,
            target: &target,
            payload: json!({"job_id": job_id, "from": current.state, "to": to, "force": force,
                            "controller_term": fence.map(|f| f.term)}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        self.shared.job_notify.notify_waiters();
        Ok(job)
    }

    /// For the tenant controller: enqueues the `tenant.place` job of an environment of an
    /// active tenant that is not placed (or has no route), fenced by the controller's lease.
    pub async fn converge_place(
        &self,
        ctx: &Ctx,
        tenant_id: &str,
        env: &str,
        fence: &persistence::Fence,
    ) -> Result<Job> {
        let mut tx = self.shared.store.write().await?;
        check_fence(&mut tx, Some(fence)).await?;
        let t = tx
            .get_tenant_tx(tenant_id)
            .await?
            .ok_or_else(|| not_found("tenant", tenant_id))?;
        if let Some(pending) = &t.pending_job_id {
            return Err(ServiceError::Conflict(format!(
                "tenant {tenant_id:?} already has job {pending} in progress"
            )));
        }
        if t.state != TenantState::Active {
            return Err(ServiceError::Conflict(format!(
                "tenant {tenant_id:?} is {}; its environments are placed when it is active",
                t.state.as_str()
            )));
        }
        let spec = crate::jobs::TenantSpec {
            tenant_id: tenant_id.to_string(),
            env: Some(env.to_string()),
        };
        let job = crate::jobs::enqueue::<crate::jobs::tenant_place::TenantPlace>(
            &mut tx,
            &spec,
            self.shared.settings.job_max_attempts,
            Some(&ctx.correlation_id),
        )
        .await?;
        tx.commit().await?;
        self.shared.job_notify.notify_waiters();
        Ok(job)
    }

    pub async fn create_environment(
        &self,
        ctx: &Ctx,
        tenant_id: &str,
        req: CreateEnvironment,
    ) -> Result<Environment> {
        let mut tx = self.shared.store.write().await?;
        let t = tx
            .get_tenant_tx(tenant_id)
            .await?
            .ok_or_else(|| not_found("tenant", tenant_id))?;
        // The job that holds the tenant decides where its environments go; an environment
        // added meanwhile could be missed by it, so it waits until that job ends.
        if let Some(pending) = &t.pending_job_id {
            return Err(ServiceError::Conflict(format!(
                "tenant {tenant_id:?} has job {pending} in progress; add the environment after it ends"
            )));
        }
        if matches!(t.state, TenantState::Archived | TenantState::Deleted) {
            return Err(ServiceError::Conflict(format!(
                "tenant {tenant_id:?} is {} and cannot get environments",
                t.state.as_str()
            )));
        }
        let region = req
            .region
            .map(Id::into_string)
            .unwrap_or_else(|| t.region.clone());
        if t.policies.data_residency == Some(DataResidency::InRegionOnly) && region != t.region {
            return Err(invalid(
                "region",
                "the tenant's in-region-only residency forbids another region",
            ));
        }
        if let Some(allowed) = &t.policies.allowed_regions {
            if region != t.region && !allowed.iter().any(|r| r.as_str() == region) {
                return Err(invalid("region", "not in the tenant's allowedRegions"));
            }
        }
        let env = EnvironmentRow {
            tenant_id: tenant_id.to_string(),
            name: req.name.as_str().to_string(),
            region,
            isolation_level: req.isolation_level.as_str().to_string(),
            cell_id: None,
            endpoint: None,
            created_at: persistence::now(),
        };
        if let Err(e) = tx.insert_environment(&env).await {
            if e.is_unique_violation() {
                return Err(ServiceError::Conflict(format!(
                    "tenant {tenant_id:?} already has environment {:?}",
                    env.name
                )));
            }
            return Err(e.into());
        }
        tx.touch_desired(tenant_id, None, None).await?;
        tx.audit(AuditInput {
            tenant_id: Some(tenant_id),
            event_type: "TENANCY_ENVIRONMENT_CREATED",
            actor: &ctx.actor,
            target: &tenant_target(tenant_id),
            payload: json!({"env": env.name, "region": env.region, "isolation_level": env.isolation_level}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        // An active tenant serves its new environment without another lifecycle action:
        // a `tenant.place` job holds the tenant until the environment is placed and routed.
        let mut placement_job_id = None;
        if t.state == TenantState::Active {
            let spec = crate::jobs::TenantSpec {
                tenant_id: tenant_id.to_string(),
                env: Some(env.name.clone()),
            };
            let job = crate::jobs::enqueue::<crate::jobs::tenant_place::TenantPlace>(
                &mut tx,
                &spec,
                self.shared.settings.job_max_attempts,
                Some(&ctx.correlation_id),
            )
            .await?;
            placement_job_id = Some(job.job_id);
        }
        tx.commit().await?;
        if placement_job_id.is_some() {
            self.shared.job_notify.notify_waiters();
        }
        let mut wire = env_to_wire(env, t.profile);
        wire.placement_job_id = placement_job_id;
        Ok(wire)
    }

    pub async fn list_environments(&self, tenant_id: &str) -> Result<Vec<Environment>> {
        let t = self
            .shared
            .store
            .get_tenant(tenant_id)
            .await?
            .ok_or_else(|| not_found("tenant", tenant_id))?;
        Ok(self
            .shared
            .store
            .list_environments(tenant_id)
            .await?
            .into_iter()
            .map(|e| env_to_wire(e, t.profile))
            .collect())
    }

    // ------------------------------------------------------------ cells

    /// Registers a cell and enqueues its stamp; see [`crate::jobs::register_cell`].
    pub async fn create_cell(&self, ctx: &Ctx, req: CreateCell) -> Result<CellWithJob> {
        crate::jobs::register_cell(&self.shared, ctx, req).await
    }

    pub(crate) fn load_template(&self, name: &str, field: &str) -> Result<crate::iac::Template> {
        load_template(&self.shared.settings.templates, name, field)
    }

    pub fn list_templates(&self) -> Result<Vec<TemplateInfo>> {
        let names = self
            .shared
            .settings
            .templates
            .names()
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        let mut out = Vec::new();
        for n in names {
            match self.shared.settings.templates.load(&n) {
                Ok(t) => out.push(t.info()),
                Err(e) => tracing::warn!(template = %n, error = %e, "skipping an invalid template"),
            }
        }
        Ok(out)
    }

    pub fn get_template(&self, name: &str) -> Result<TemplateInfo> {
        match self.shared.settings.templates.load(name) {
            Ok(t) => Ok(t.info()),
            Err(TemplateError::Unknown(_)) => Err(not_found("template", name)),
            Err(e) => Err(ServiceError::Unavailable(e.to_string())),
        }
    }

    /// Reserves the cell for a job of `action` and enqueues it, inside `tx`.
    async fn enqueue_cell_job(
        &self,
        tx: &mut persistence::WriteTx,
        ctx: &Ctx,
        cell: &mut Cell,
        action: CellAction,
    ) -> Result<Job> {
        crate::jobs::enqueue_cell_job(tx, self.settings().job_max_attempts, ctx, cell, action).await
    }

    pub async fn get_cell(&self, id: &str) -> Result<Cell> {
        self.shared
            .store
            .get_cell(id)
            .await?
            .ok_or_else(|| not_found("cell", id))
    }

    pub async fn list_cells(&self, f: &CellFilter, after: &str, limit: i64) -> Result<Vec<Cell>> {
        Ok(self.shared.store.list_cells(f, after, limit).await?)
    }

    pub async fn patch_cell(
        &self,
        ctx: &Ctx,
        id: &str,
        if_match: Option<i64>,
        patch: PatchCell,
    ) -> Result<Cell> {
        let mut errors = Vec::new();
        if let Some(c) = &patch.capacity {
            validate_capacity("capacity", c, &mut errors);
        }
        if let Some(l) = &patch.labels {
            validate_labels(l, &mut errors);
        }
        if let Some(v) = &patch.vars {
            validate_vars(v, &mut errors);
        }
        if let Some(v) = &patch.app_version {
            validate_app_version(v, &mut errors);
        }
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        let mut tx = self.shared.store.write().await?;
        let (cell, job) = self
            .patch_cell_in(&mut tx, ctx, id, if_match, patch)
            .await?;
        tx.commit().await?;
        if job.is_some() {
            self.shared.job_notify.notify_waiters();
        }
        Ok(cell)
    }

    /// The writes of [`Service::patch_cell`] in the caller's transaction (fields already
    /// checked on their own); returns the cell and the apply job a spec change enqueued.
    pub(crate) async fn patch_cell_in(
        &self,
        tx: &mut persistence::WriteTx,
        ctx: &Ctx,
        id: &str,
        if_match: Option<i64>,
        patch: PatchCell,
    ) -> Result<(Cell, Option<Job>)> {
        crate::jobs::patch_cell_in(&self.shared, tx, ctx, id, if_match, patch).await
    }

    /// `POST /v1/cells/{id}/apply`: re-applies the cell's current spec (repairs a failed
    /// stamp, remediates drift).
    pub async fn apply_cell(
        &self,
        ctx: &Ctx,
        id: &str,
        if_match: Option<i64>,
    ) -> Result<CellWithJob> {
        let mut tx = self.shared.store.write().await?;
        let mut cell = tx
            .get_cell_tx(id)
            .await?
            .ok_or_else(|| not_found("cell", id))?;
        check_version(if_match, cell.version)?;
        if let Some(job) = &cell.pending_job_id {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} has job {job} in progress"
            )));
        }
        if !matches!(
            cell.state,
            CellState::Active | CellState::Draining | CellState::Drained | CellState::Failed
        ) {
            return Err(ServiceError::Conflict(format!(
                "cannot apply cell {id:?} in state {}",
                cell.state.as_str()
            )));
        }
        let job = self
            .enqueue_cell_job(&mut tx, ctx, &mut cell, CellAction::Apply)
            .await?;
        cell.version += 1;
        if !tx.update_cell(&cell).await? {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} changed concurrently; retry"
            )));
        }
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: "CELL_APPLY_REQUESTED",
            actor: &ctx.actor,
            target: &cell_target(id),
            payload: json!({"job_id": job.job_id, "version": cell.version}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        self.shared.job_notify.notify_waiters();
        Ok(CellWithJob {
            cell,
            job: Some(job),
        })
    }

    /// `POST /v1/cells/{id}/plan`: a drift check now. An open drift check of the cell is
    /// returned instead of a second one.
    pub async fn plan_cell(&self, ctx: &Ctx, id: &str) -> Result<CellWithJob> {
        self.plan_cell_fenced(ctx, id, None).await
    }

    /// [`Service::plan_cell`] for a controller: the write carries its fence and is refused
    /// when another replica holds the controller's lease.
    pub async fn plan_cell_fenced(
        &self,
        ctx: &Ctx,
        id: &str,
        fence: Option<&persistence::Fence>,
    ) -> Result<CellWithJob> {
        let mut tx = self.shared.store.write().await?;
        check_fence(&mut tx, fence).await?;
        let mut cell = tx
            .get_cell_tx(id)
            .await?
            .ok_or_else(|| not_found("cell", id))?;
        if !matches!(
            cell.state,
            CellState::Active | CellState::Draining | CellState::Drained
        ) {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} is {}: only stamped cells have drift",
                cell.state.as_str()
            )));
        }
        let target = cell_target(id);
        if let Some(open) = cell.pending_job_id.clone() {
            let job = tx
                .get_job_tx(&open)
                .await?
                .ok_or_else(|| not_found("job", &open))?;
            if job.job.kind != <crate::jobs::cell_plan::CellPlan as crate::jobs::Kind>::NAME {
                return Err(ServiceError::Conflict(format!(
                    "cell {id:?} has job {open} in progress"
                )));
            }
            return Ok(CellWithJob {
                cell,
                job: Some(job.job),
            });
        }
        let job = self
            .enqueue_cell_job(&mut tx, ctx, &mut cell, CellAction::Plan)
            .await?;
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: "CELL_DRIFT_CHECK_REQUESTED",
            actor: &ctx.actor,
            target: &target,
            payload: json!({"job_id": job.job_id, "controller_term": fence.map(|f| f.term)}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        self.shared.job_notify.notify_waiters();
        Ok(CellWithJob {
            cell,
            job: Some(job),
        })
    }

    /// Stops new placements on a cell; with `move_tenants`, also starts a `cell.drain` job
    /// that moves every tenant environment off it (a draining cell may be given one).
    pub async fn drain_cell(
        &self,
        ctx: &Ctx,
        id: &str,
        if_match: Option<i64>,
        move_tenants: bool,
    ) -> Result<CellWithJob> {
        let mut tx = self.shared.store.write().await?;
        let mut cell = tx
            .get_cell_tx(id)
            .await?
            .ok_or_else(|| not_found("cell", id))?;
        check_version(if_match, cell.version)?;
        let again = move_tenants && cell.state == CellState::Draining;
        if cell.state != CellState::Active && !again {
            return Err(ServiceError::Conflict(format!(
                "cannot drain cell {id:?} in state {}",
                cell.state.as_str()
            )));
        }
        if move_tenants && cell.tier != cellplane_api::Tier::Pooled {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} is dedicated: move its tenant with \"target\": \"dedicated\" instead"
            )));
        }
        let job = if move_tenants {
            let spec = crate::jobs::cell_drain::DrainSpec {
                cell_id: id.to_string(),
            };
            Some(
                crate::jobs::enqueue::<crate::jobs::cell_drain::CellDrain>(
                    &mut tx,
                    &spec,
                    self.shared.settings.job_max_attempts,
                    Some(&ctx.correlation_id),
                )
                .await?,
            )
        } else {
            None
        };
        if again {
            tx.commit().await?;
            self.shared.job_notify.notify_waiters();
            return Ok(CellWithJob { cell, job });
        }
        cell.state = CellState::Draining;
        cell.version += 1;
        if !tx.update_cell(&cell).await? {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} changed concurrently; retry"
            )));
        }
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: "CELL_DRAINING",
            actor: &ctx.actor,
            target: &cell_target(id),
            payload: json!({"version": cell.version, "job_id": job.as_ref().map(|j| &j.job_id)}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        self.shared.job_notify.notify_waiters();
        Ok(CellWithJob { cell, job })
    }

    /// Destroys a cell: a destroy job runs `terraform destroy` on its stack. Refused while
    /// tenants are placed on it or another job holds it.
    pub async fn delete_cell(
        &self,
        ctx: &Ctx,
        id: &str,
        if_match: Option<i64>,
    ) -> Result<CellWithJob> {
        let mut tx = self.shared.store.write().await?;
        let mut cell = tx
            .get_cell_tx(id)
            .await?
            .ok_or_else(|| not_found("cell", id))?;
        check_version(if_match, cell.version)?;
        if let Some(m) = tx.running_move_on_cell(id).await? {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} takes part in move {} of {}/{} (job {}): destroy it after the move",
                m.move_id, m.tenant_id, m.env, m.job_id
            )));
        }
        if let Some(job) = tx.lock_holder(&crate::jobs::cell_resource(id)).await? {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} is held by job {job}"
            )));
        }
        let placed = tx.count_tenants_on_cell(id).await?;
        if placed > 0 {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} still has {placed} tenant environment(s) placed on it; move them first"
            )));
        }
        if let Some(job) = &cell.pending_job_id {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} has job {job} in progress"
            )));
        }
        match cell.state {
            CellState::Destroyed => {
                return Err(ServiceError::Conflict(format!(
                    "cell {id:?} is already destroyed"
                )))
            }
            CellState::Provisioning | CellState::Destroying => {
                return Err(ServiceError::Conflict(format!(
                    "cell {id:?} is {}",
                    cell.state.as_str()
                )))
            }
            CellState::Pending
            | CellState::Active
            | CellState::Draining
            | CellState::Drained
            | CellState::Failed => {}
        }
        let job = self
            .enqueue_cell_job(&mut tx, ctx, &mut cell, CellAction::Destroy)
            .await?;
        cell.state = CellState::Destroying;
        cell.version += 1;
        if !tx.update_cell(&cell).await? {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} changed concurrently; retry"
            )));
        }
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: "CELL_DESTROY_REQUESTED",
            actor: &ctx.actor,
            target: &cell_target(id),
            payload: json!({"version": cell.version, "job_id": job.job_id}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        self.shared.job_notify.notify_waiters();
        Ok(CellWithJob {
            cell,
            job: Some(job),
        })
    }

    // ------------------------------------------------------------ jobs

    pub async fn get_job(&self, id: &str) -> Result<Job> {
        Ok(self
            .shared
            .store
            .get_job(id)
            .await?
            .ok_or_else(|| not_found("job", id))?
            .job)
    }

    pub async fn job_log(&self, id: &str) -> Result<String> {
        self.shared
            .store
            .job_log(id)
            .await?
            .ok_or_else(|| not_found("job", id))
    }

    pub async fn list_jobs(
        &self,
        target: Option<&str>,
        state: Option<&str>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Job>> {
        Ok(self
            .shared
            .store
            .list_jobs(target, state, None, after, limit)
            .await?
            .into_iter()
            .map(|j| j.job)
            .collect())
    }

    pub async fn cancel_job(&self, ctx: &Ctx, id: &str) -> Result<Job> {
        let mut revision = None;
        let mut tx = self.shared.store.write().await?;
        let job = tx
            .get_job_tx(id)
            .await?
            .ok_or_else(|| not_found("job", id))?;
        if job.job.state.is_terminal() {
            return Err(ServiceError::Conflict(format!(
                "job {id} already ended as {}",
                job.job.state.as_str()
            )));
        }
        let state = tx.request_cancel(id).await?;
        let kind = crate::jobs::kind(&job.job.kind);
        let tenant_id = kind.and_then(|k| k.tenant_of(&job));
        if state == Some(JobState::Cancelled) {
            // Cancelled before it ran (or while it waited for a retry): its kind undoes what
            // earlier attempts did, and its locks go.
            if let Some(k) = kind {
                let row = tx
                    .get_job_tx(id)
                    .await?
                    .ok_or_else(|| not_found("job", id))?;
                let finished = k
                    .finish_unclaimed(&mut tx, &self.shared, &row, &crate::jobs::End::Cancelled)
                    .await?;
                revision = finished.routes_revision;
            }
            tx.release_locks(id).await?;
        }
        let prefix = if tenant_id.is_some() {
            "TENANCY"
        } else {
            "CELL"
        };
        tx.audit(AuditInput {
            tenant_id: tenant_id.as_deref(),
            event_type: &format!("{prefix}_JOB_CANCEL_REQUESTED"),
            actor: &ctx.actor,
            target: &job.job.target,
            payload: json!({"job_id": id, "kind": job.job.kind}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        let after = tx
            .get_job_tx(id)
            .await?
            .ok_or_else(|| not_found("job", id))?;
        tx.commit().await?;
        if let Some(rev) = revision {
            self.route_revisions().observe(rev);
        }
        self.shared.job_changed.notify_waiters();
        Ok(after.job)
    }

    // ------------------------------------------------------------ events

    /// Published events after `after_seq`, oldest first: of `types` (every public type when
    /// empty), about `subject`, of `tenant_id` (a tenant-admin's own tenant).
    pub async fn list_events(
        &self,
        after_seq: i64,
        types: &[EventType],
        subject: Option<&str>,
        tenant_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let internal = crate::events::internal_types(types);
        let rows = self
            .shared
            .store
            .list_outbox(after_seq, &internal, subject, tenant_id, limit)
            .await?;
        let source = &self.shared.settings.event_source;
        Ok(rows
            .iter()
            .filter_map(|r| crate::events::to_public(r, source))
            .collect())
    }

    // ------------------------------------------------------------ audit

    pub async fn list_audit(
        &self,
        tenant_id: Option<&str>,
        target: Option<&str>,
        since: Option<&str>,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>> {
        Ok(self
            .shared
            .store
            .list_audit(tenant_id, target, since, after_seq, limit)
            .await?)
    }

    pub async fn verify_audit(&self) -> Result<AuditVerify> {
        Ok(match self.shared.store.verify_audit().await? {
            persistence::VerifyOutcome::Ok { records } => AuditVerify {
                ok: true,
                records,
                broken_seq: None,
                reason: None,
            },
            persistence::VerifyOutcome::Broken {
                records,
                seq,
                reason,
            } => AuditVerify {
                ok: false,
                records,
                broken_seq: Some(seq),
                reason: Some(reason),
            },
        })
    }

    // ------------------------------------------------------------ tokens

    pub async fn create_token(&self, ctx: &Ctx, req: CreateToken) -> Result<CreatedToken> {
        match (req.role, &req.tenant_id) {
            (Role::TenantAdmin, None) => {
                return Err(invalid("tenant_id", "is required for tenant-admin tokens"))
            }
            (Role::TenantAdmin, Some(_)) => {}
            (_, Some(_)) => {
                return Err(invalid(
                    "tenant_id",
                    "only tenant-admin tokens are scoped to a tenant",
                ))
            }
            _ => {}
        }
        let mut errors = Vec::new();
        if let Some(d) = &req.description {
            validate_text("description", d, 200, &mut errors);
        }
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        let secret = crate::auth::new_secret();
        let info = TokenInfo {
            token_id: persistence::new_id("tok"),
            role: req.role,
            tenant_id: req.tenant_id.map(Id::into_string),
            description: req.description,
            created_at: persistence::now(),
            revoked_at: None,
        };
        let mut tx = self.shared.store.write().await?;
        if let Some(t) = &info.tenant_id {
            if tx.get_tenant_tx(t).await?.is_none() {
                return Err(invalid("tenant_id", format!("tenant {t:?} does not exist")));
            }
        }
        tx.insert_token(&info, &crate::auth::hash_token(&secret))
            .await?;
        tx.audit(AuditInput {
            tenant_id: info.tenant_id.as_deref(),
            event_type: "TENANCY_TOKEN_CREATED",
            actor: &ctx.actor,
            target: &format!("token/{}", info.token_id),
            payload: json!({"role": info.role, "tenant_id": info.tenant_id}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        Ok(CreatedToken {
            info,
            token: secret,
        })
    }

    pub async fn list_tokens(&self, after: &str, limit: i64) -> Result<Vec<TokenInfo>> {
        Ok(self
            .shared
            .store
            .list_tokens(after, limit)
            .await?
            .into_iter()
            .map(|t| t.info)
            .collect())
    }

    pub async fn revoke_token(&self, ctx: &Ctx, id: &str) -> Result<TokenInfo> {
        let existing = self
            .shared
            .store
            .get_token(id)
            .await?
            .ok_or_else(|| not_found("token", id))?;
        let mut tx = self.shared.store.write().await?;
        if !tx.revoke_token(id).await? {
            return Err(ServiceError::Conflict(format!(
                "token {id} is already revoked"
            )));
        }
        tx.audit(AuditInput {
            tenant_id: existing.info.tenant_id.as_deref(),
            event_type: "TENANCY_TOKEN_REVOKED",
            actor: &ctx.actor,
            target: &format!("token/{id}"),
            payload: json!({"role": existing.info.role}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        Ok(self
            .shared
            .store
            .get_token(id)
            .await?
            .map(|t| t.info)
            .unwrap_or(existing.info))
    }

    /// Installs the bootstrap admin token (from the environment or the generated file).
    pub async fn install_admin_token(&self, secret: &str) -> Result<()> {
        let mut tx = self.shared.store.write().await?;
        if tx
            .upsert_admin_token(&crate::auth::hash_token(secret))
            .await?
        {
            tx.audit(AuditInput {
                tenant_id: None,
                event_type: "TENANCY_TOKEN_CREATED",
                actor: "system",
                target: "token/admin",
                payload: json!({"role": "admin", "bootstrap": true}),
                correlation_id: None,
            })
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_differs_by_strategy_not_by_code() {
        let pooled = resource_mapping("acme", "prod", Profile::MtStandard);
        assert_eq!(pooled["schema"], "t_acme");
        assert_eq!(pooled["object_prefix"], "tenants/acme");
        let dedicated = resource_mapping("acme-co", "dev", Profile::StDedicated);
        assert_eq!(dedicated["database"], "warehouse_acme_co_dev");
        assert_eq!(dedicated["bucket"], "data-acme-co-dev");
    }
}
