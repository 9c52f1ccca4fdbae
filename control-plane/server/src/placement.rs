//! Placement: which cell a tenant environment lives in, and why.
//!
//! Pooled profiles go to an active pooled cell in the environment's region, or in the
//! tenant's `allowedRegions` when residency allows; candidates are ordered by region
//! preference, then by utilization after placement (`spread`: emptiest first, `binpack`:
//! fullest that fits first). The reservation is a conditional update of the cell row in
//! the transaction that also points the environment at the cell, records the decision on
//! the tenant and appends the audit record, so capacity is never over-committed. When
//! nothing fits, a region whose policy enables auto-stamp gets a new pooled cell and the
//! placement waits for it; otherwise placement fails with the reason. Dedicated profiles
//! get a cell stamped for them. Scoring is pure ([`rank`]) so it is tested on its own.
//!
//! [`Placement`] decides and reserves; it never registers or stamps a cell itself (that
//! is a job's): a placement that needs a new cell answers [`Outcome::Stamp`] with the cell
//! to register, and the caller registers it and waits. The writes are functions on a
//! write transaction ([`reserve_in`], [`release_in`], [`record_failure_in`]) so a job
//! step composes them with route and lifecycle writes in one commit.

use crate::config::PlacementConfig;
use crate::ctx::{tenant_target, Ctx};
use crate::error::{check_version, invalid, not_found, Result, ServiceError};
use crate::iac::{Catalog, TemplateError};
use crate::persistence::{AuditInput, Store, TenantRow, WriteTx};
use crate::validate::{load_template, validate_capacity, validate_vars};
use cellplane_api::{
    Capacity, Cell, CellState, CreateCell, DataResidency, Encryption, FieldError, Id,
    PlacementDecision, PlacementStrategy, Profile, Region, RegionPolicy, Tier,
};
use serde_json::json;
use std::collections::BTreeMap;

/// What one placement attempt ended with.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The environment now holds capacity on this cell. With `prestamp`, the region's
    /// pooled cells passed the pre-stamp threshold: the caller registers that cell too
    /// (best effort).
    Placed {
        decision: Box<PlacementDecision>,
        prestamp: Option<Box<CreateCell>>,
    },
    /// It already did (a retried step).
    AlreadyPlaced(String),
    /// A cell is being stamped for it; try again later.
    Waiting(String),
    /// A cell must be registered and stamped first (auto-stamp of a pooled cell, or the
    /// tenant's dedicated cell): the caller registers `cell` and waits, saying `why`.
    Stamp { cell: Box<CreateCell>, why: String },
    /// Nothing fits and nothing will: the reason.
    Impossible(String),
}

/// A cell that fits, with its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub cell_id: String,
    pub region_rank: usize,
    pub utilization_after: f64,
}

/// Regions an environment may be placed in, preferred first.
pub fn candidate_regions(
    env_region: &str,
    residency: Option<DataResidency>,
    allowed: Option<&[Id]>,
) -> Vec<String> {
    let mut out = vec![env_region.to_string()];
    if residency != Some(DataResidency::InRegionOnly) {
        for r in allowed.unwrap_or_default() {
            if !out.iter().any(|o| o == r.as_str()) {
                out.push(r.as_str().to_string());
            }
        }
    }
    out
}

fn utilization(used: u64, add: u64, cap: u64) -> f64 {
    if cap == 0 {
        return f64::INFINITY;
    }
    (used + add) as f64 / cap as f64
}

/// The cell's endpoint from its stamped outputs, if it has one.
pub fn endpoint_of(cell: &Cell) -> Option<String> {
    cell.outputs
        .get("endpoint")
        .and_then(|v| v.as_str())
        .filter(|s| s.starts_with("http://") || s.starts_with("https://"))
        .map(str::to_string)
}

/// Orders the cells that fit `units` (and one more tenant), best first.
pub fn rank(
    cells: &[Cell],
    regions: &[String],
    units: u64,
    strategy: PlacementStrategy,
) -> Vec<Ranked> {
    let mut out: Vec<Ranked> = cells
        .iter()
        .filter(|c| c.state == CellState::Active && endpoint_of(c).is_some())
        .filter(|c| c.used.tenants < c.capacity.tenants && c.used.units + units <= c.capacity.units)
        .filter_map(|c| {
            let region_rank = regions.iter().position(|r| *r == c.region)?;
            let u = utilization(c.used.tenants, 1, c.capacity.tenants).max(utilization(
                c.used.units,
                units,
                c.capacity.units,
            ));
            Some(Ranked {
                cell_id: c.cell_id.clone(),
                region_rank,
                utilization_after: u,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        a.region_rank
            .cmp(&b.region_rank)
            .then_with(|| match strategy {
                PlacementStrategy::Spread => a.utilization_after.total_cmp(&b.utilization_after),
                PlacementStrategy::Binpack => b.utilization_after.total_cmp(&a.utilization_after),
            })
            .then_with(|| a.cell_id.cmp(&b.cell_id))
    });
    out
}

/// The id of the dedicated cell of a tenant environment (valid identifier, ≤ 63 chars).
pub fn dedicated_cell_id(tenant_id: &str, env: &str) -> String {
    let suffix = if env == "prod" {
        "-ded".to_string()
    } else {
        format!("-{env}-ded")
    };
    let mut base = tenant_id.to_string();
    if base.len() + suffix.len() > 63 {
        use sha2::Digest;
        let h = hex::encode(sha2::Sha256::digest(tenant_id.as_bytes()));
        base.truncate(63 - suffix.len() - 9);
        base = format!("{}-{}", base.trim_end_matches('-'), &h[..8]);
    }
    format!("{base}{suffix}")
}

/// Who registers the cells placement asks for, on audit records and jobs.
pub fn system_ctx(correlation_id: Option<&str>) -> Ctx {
    Ctx {
        actor: "system:placement".into(),
        correlation_id: correlation_id.unwrap_or("placement").to_string(),
    }
}

/// Placement over a store: region policies, and placing, releasing and recording
/// failures for tenant environments. Cheap to clone.
#[derive(Clone)]
pub struct Placement {
    store: Store,
    templates: Catalog,
    config: PlacementConfig,
}

impl Placement {
    pub fn new(store: Store, templates: Catalog, config: PlacementConfig) -> Self {
        Self {
            store,
            templates,
            config,
        }
    }

    pub fn config(&self) -> &PlacementConfig {
        &self.config
    }

    pub async fn list_regions(&self) -> Result<Vec<Region>> {
        Ok(self
            .store
            .list_region_policies()
            .await?
            .into_iter()
            .map(|(region, policy, version, updated_at)| Region {
                region,
                policy,
                version,
                updated_at,
            })
            .collect())
    }

    pub async fn get_region(&self, region: &str) -> Result<Region> {
        let mut tx = self.store.write().await?;
        let found = tx.get_region_policy_tx(region).await?;
        drop(tx);
        let (policy, version, updated_at) =
            found.ok_or_else(|| not_found("region policy", region))?;
        Ok(Region {
            region: region.to_string(),
            policy,
            version,
            updated_at,
        })
    }

    /// Creates or replaces a region's placement policy. Returns it and whether it is new.
    pub async fn put_region(
        &self,
        ctx: &Ctx,
        region: &str,
        if_match: Option<i64>,
        policy: RegionPolicy,
    ) -> Result<(Region, bool)> {
        self.check_region_policy(&policy)?;
        let mut tx = self.store.write().await?;
        let out = put_region_in(&mut tx, ctx, region, if_match, policy).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Checks a region policy (fields and the default template's variables) without writing.
    pub fn check_region_policy(&self, policy: &RegionPolicy) -> Result<()> {
        let mut errors = Vec::new();
        if let Some(t) = policy.prestamp_threshold {
            if !(t > 0.0 && t <= 1.0) {
                errors.push(FieldError {
                    field: "prestamp_threshold".into(),
                    message: "must be in (0, 1]".into(),
                });
            }
        }
        validate_capacity("pooled_capacity", &policy.pooled_capacity, &mut errors);
        validate_vars(&policy.vars, &mut errors);
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        // Auto-stamped cells get these variables: the template must accept them now, not
        // when a placement needs the cell.
        let template = load_template(
            &self.templates,
            policy.default_template.as_str(),
            "default_template",
        )?;
        if let Err(errors) = template.validate_vars(&policy.vars) {
            return Err(ServiceError::Validation(errors));
        }
        Ok(())
    }

    /// The placement policy of a region (defaults when none was set).
    pub async fn region_policy(&self, region: &str) -> Result<RegionPolicy> {
        Ok(self
            .store
            .get_region_policy(region)
            .await?
            .unwrap_or_else(|| RegionPolicy {
                strategy: self.config.strategy,
                ..RegionPolicy::default()
            }))
    }

    /// Places one environment of a tenant. Idempotent: an environment that already holds a
    /// cell is left where it is.
    pub async fn place_environment(
        &self,
        tenant_id: &str,
        env: &str,
        correlation_id: Option<&str>,
    ) -> Result<Outcome> {
        let t = self
            .store
            .get_tenant(tenant_id)
            .await?
            .ok_or_else(|| not_found("tenant", tenant_id))?;
        let envs = self.store.list_environments(tenant_id).await?;
        let e = envs
            .iter()
            .find(|e| e.name == env)
            .ok_or_else(|| not_found("environment", &format!("{tenant_id}/{env}")))?;
        if let Some(c) = &e.cell_id {
            return Ok(Outcome::AlreadyPlaced(c.clone()));
        }
        let units = t.quotas.units.unwrap_or(1).max(1);
        let policy = self.region_policy(&e.region).await?;
        if t.profile.is_pooled() {
            self.place_pooled(&t, env, &e.region, units, &policy, correlation_id)
                .await
        } else {
            self.place_dedicated(&t, env, &e.region, units, &policy, correlation_id)
                .await
        }
    }

    async fn place_pooled(
        &self,
        t: &TenantRow,
        env: &str,
        region: &str,
        units: u64,
        policy: &RegionPolicy,
        correlation_id: Option<&str>,
    ) -> Result<Outcome> {
        let regions = candidate_regions(
            region,
            t.policies.data_residency,
            t.policies.allowed_regions.as_deref(),
        );
        let cells = self.store.active_cells_in("pooled", &regions).await?;
        let ranked = rank(&cells, &regions, units, policy.strategy);
        let by_id: BTreeMap<&str, &Cell> = cells.iter().map(|c| (c.cell_id.as_str(), c)).collect();
        let candidates: Vec<String> = ranked.iter().map(|r| r.cell_id.clone()).collect();
        for r in &ranked {
            let cell = by_id[r.cell_id.as_str()];
            let where_ = if r.region_rank == 0 {
                format!("{} (home region)", cell.region)
            } else {
                format!(
                    "{} (allowed region, home {region} had no room)",
                    cell.region
                )
            };
            let how = match policy.strategy {
                PlacementStrategy::Spread => "least utilized",
                PlacementStrategy::Binpack => "most utilized that fits",
            };
            let decision = PlacementDecision {
                env: env.to_string(),
                cell_id: cell.cell_id.clone(),
                region: cell.region.clone(),
                tier: Tier::Pooled,
                strategy: policy.strategy.as_str().to_string(),
                reason: format!(
                    "{how} active pooled cell with room for {units} unit(s) in {where_}; \
                     utilization after placement {:.2}; {} candidate(s)",
                    r.utilization_after,
                    ranked.len()
                ),
                utilization_after: r.utilization_after,
                candidates: candidates.clone(),
                stamped: false,
                units,
                decided_at: crate::persistence::now(),
            };
            if self
                .commit_placement(&t.tenant_id, cell, &decision, correlation_id)
                .await?
            {
                let prestamp = self.prestamp_request(&cell.region, policy).await;
                return Ok(Outcome::Placed {
                    decision: Box::new(decision),
                    prestamp: prestamp.map(Box::new),
                });
            }
        }
        let summary: Vec<String> = cells
            .iter()
            .map(|c| {
                format!(
                    "{} {}/{} tenants {}/{} units",
                    c.cell_id, c.used.tenants, c.capacity.tenants, c.used.units, c.capacity.units
                )
            })
            .collect();
        let scope = regions.join(", ");
        if policy.auto_stamp {
            return self.auto_stamp(region, policy, units).await;
        }
        Ok(Outcome::Impossible(format!(
            "no active pooled cell in {scope} has room for one more tenant with {units} unit(s) \
             ({}); auto-stamp is off for region {region}",
            if summary.is_empty() {
                "there are no active pooled cells".to_string()
            } else {
                summary.join("; ")
            }
        )))
    }

    /// [`reserve_in`] in a transaction of its own.
    async fn commit_placement(
        &self,
        tenant_id: &str,
        cell: &Cell,
        decision: &PlacementDecision,
        correlation_id: Option<&str>,
    ) -> Result<bool> {
        let mut tx = self.store.write().await?;
        if !reserve_in(&mut tx, tenant_id, cell, decision, correlation_id).await? {
            return Ok(false);
        }
        tx.commit().await?;
        tracing::info!(tenant_id, env = %decision.env, cell_id = %cell.cell_id,
            reason = %decision.reason, "placed tenant environment");
        Ok(true)
    }

    /// [`release_in`] in a transaction of its own.
    pub async fn release_tenant(
        &self,
        tenant_id: &str,
        forget: bool,
        correlation_id: Option<&str>,
    ) -> Result<Vec<String>> {
        let mut tx = self.store.write().await?;
        let released = release_in(&mut tx, tenant_id, forget, correlation_id).await?;
        tx.commit().await?;
        Ok(released)
    }

    /// [`record_failure_in`] in a transaction of its own.
    pub async fn record_placement_failure(
        &self,
        tenant_id: &str,
        env: &str,
        reason: &str,
        correlation_id: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.store.write().await?;
        record_failure_in(&mut tx, tenant_id, env, reason, correlation_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Asks for a pooled cell in `region` unless one is already on its way.
    async fn auto_stamp(&self, region: &str, policy: &RegionPolicy, units: u64) -> Result<Outcome> {
        let upcoming = self.store.upcoming_cells_in("pooled", region).await?;
        if let Some(c) = upcoming.iter().find(|c| c.capacity.units >= units) {
            return Ok(Outcome::Waiting(format!(
                "no pooled cell in {region} has room; waiting for cell {} ({}) to become active",
                c.cell_id,
                c.state.as_str()
            )));
        }
        let cell = pooled_cell(region, policy, units)?;
        let why = format!(
            "no pooled cell in {region} has room; auto-stamping pooled cell {}",
            cell.cell_id
        );
        Ok(Outcome::Stamp {
            cell: Box::new(cell),
            why,
        })
    }

    /// A pooled cell to pre-stamp when the region's pooled utilization passes the threshold
    /// and no pooled cell is already on its way. Best effort: failures are logged.
    async fn prestamp_request(&self, region: &str, policy: &RegionPolicy) -> Option<CreateCell> {
        if !policy.auto_stamp {
            return None;
        }
        let threshold = policy
            .prestamp_threshold
            .unwrap_or(self.config.prestamp_threshold);
        if threshold <= 0.0 {
            return None;
        }
        let run = async {
            let cells = self
                .store
                .active_cells_in("pooled", &[region.to_string()])
                .await?;
            let upcoming = self.store.upcoming_cells_in("pooled", region).await?;
            if !upcoming.is_empty() || cells.is_empty() {
                return Ok::<_, ServiceError>(None);
            }
            let (used, cap) = cells.iter().fold((0u64, 0u64), |(u, c), cell| {
                (u + cell.used.tenants, c + cell.capacity.tenants)
            });
            let (uu, cu) = cells.iter().fold((0u64, 0u64), |(u, c), cell| {
                (u + cell.used.units, c + cell.capacity.units)
            });
            let util = utilization(used, 0, cap).max(utilization(uu, 0, cu));
            if util <= threshold {
                return Ok(None);
            }
            let cell = pooled_cell(region, policy, 1)?;
            tracing::info!(region, cell_id = %cell.cell_id, utilization = util, threshold,
                "pre-stamping a pooled cell");
            Ok(Some(cell))
        };
        match run.await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(region, error = %e, "pre-stamping failed");
                None
            }
        }
    }

    async fn place_dedicated(
        &self,
        t: &TenantRow,
        env: &str,
        region: &str,
        units: u64,
        policy: &RegionPolicy,
        correlation_id: Option<&str>,
    ) -> Result<Outcome> {
        let cell = match self
            .dedicated_cell(t, env, region, units, policy, t.profile)
            .await?
        {
            Ok(cell) => cell,
            Err(outcome) => return Ok(outcome),
        };
        let cell_id = cell.cell_id.clone();
        let decision = PlacementDecision {
            env: env.to_string(),
            cell_id: cell_id.clone(),
            region: cell.region.clone(),
            tier: Tier::Dedicated,
            strategy: "dedicated".into(),
            reason: format!(
                "profile {} gets a dedicated cell: {cell_id} stamped for it in {}",
                t.profile.as_str(),
                cell.region
            ),
            utilization_after: 1.0,
            candidates: vec![cell_id.clone()],
            stamped: true,
            units,
            decided_at: crate::persistence::now(),
        };
        if self
            .commit_placement(&t.tenant_id, &cell, &decision, correlation_id)
            .await?
        {
            Ok(Outcome::Placed {
                decision: Box::new(decision),
                prestamp: None,
            })
        } else {
            Ok(Outcome::Impossible(format!(
                "dedicated cell {cell_id} has no room for {} ({} units)",
                t.tenant_id, units
            )))
        }
    }

    /// Where a move of a pooled tenant environment off `exclude`d cells should go: the best
    /// ranked active pooled cell with room in the regions the environment may live in
    /// (none when no cell can take it).
    pub async fn move_target(
        &self,
        t: &TenantRow,
        region: &str,
        units: u64,
        exclude: &[String],
    ) -> Result<Option<Ranked>> {
        let regions = candidate_regions(
            region,
            t.policies.data_residency,
            t.policies.allowed_regions.as_deref(),
        );
        let policy = self.region_policy(region).await?;
        let cells: Vec<Cell> = self
            .store
            .active_cells_in("pooled", &regions)
            .await?
            .into_iter()
            .filter(|c| !exclude.contains(&c.cell_id))
            .collect();
        Ok(rank(&cells, &regions, units, policy.strategy)
            .into_iter()
            .next())
    }

    /// The dedicated cell of a tenant environment when it is active (`Ok`), or what to do
    /// first (`Err`): stamp it, wait for it, or why it cannot be had. Reserves nothing:
    /// placement and moves reserve on the cell themselves.
    pub async fn dedicated_cell(
        &self,
        t: &TenantRow,
        env: &str,
        region: &str,
        units: u64,
        policy: &RegionPolicy,
        profile: Profile,
    ) -> Result<std::result::Result<Cell, Outcome>> {
        let cell_id = dedicated_cell_id(&t.tenant_id, env);
        let Some(cell) = self.store.get_cell(&cell_id).await? else {
            let mut vars = policy.vars.clone();
            vars.insert("tenant_id".into(), json!(t.tenant_id));
            vars.insert("env".into(), json!(env));
            vars.insert(
                "isolation".into(),
                json!(if profile == Profile::StByoc {
                    "byoc"
                } else {
                    "dedicated"
                }),
            );
            if t.policies.encryption == Some(Encryption::KmsPerTenant) {
                vars.insert(
                    "kms_key_alias".into(),
                    json!(format!("alias/cellplane-{}", t.tenant_id)),
                );
            }
            if let Some(days) = t.policies.retention_days {
                vars.insert("retention_days".into(), json!(days));
            }
            // Only what the template declares (and does not manage) reaches it.
            let name = policy.default_template.as_str();
            let declared: Vec<String> = match self.templates.load(name) {
                Ok(t) => t
                    .info()
                    .variables
                    .into_iter()
                    .filter(|v| v.managed_by.is_none())
                    .map(|v| v.name)
                    .collect(),
                Err(e) => {
                    let e = match e {
                        TemplateError::Unknown(_) => format!("template {name:?} does not exist"),
                        other => other.to_string(),
                    };
                    return Ok(Err(Outcome::Impossible(format!(
                        "cannot stamp a dedicated cell from template {name:?}: {e}"
                    ))));
                }
            };
            vars.retain(|k, _| declared.contains(k));
            let mut labels = BTreeMap::new();
            labels.insert("origin".to_string(), "dedicated".to_string());
            labels.insert("tenant".to_string(), t.tenant_id.clone());
            let cell = CreateCell {
                cell_id: Id::parse(cell_id.clone())
                    .map_err(|e| invalid("cell_id", e.to_string()))?,
                region: Id::parse(region).map_err(|e| invalid("region", e.to_string()))?,
                tier: Tier::Dedicated,
                template: policy.default_template.clone(),
                capacity: Capacity {
                    tenants: 1,
                    units: units.max(1),
                },
                labels,
                vars,
                app_version: None,
            };
            return Ok(Err(Outcome::Stamp {
                cell: Box::new(cell),
                why: format!("stamping dedicated cell {cell_id} for {}", t.tenant_id),
            }));
        };
        if cell.tier != Tier::Dedicated
            || cell.labels.get("tenant").map(String::as_str) != Some(t.tenant_id.as_str())
        {
            return Ok(Err(Outcome::Impossible(format!(
                "cell {cell_id} exists but is not the dedicated cell of {}",
                t.tenant_id
            ))));
        }
        match cell.state {
            CellState::Active if endpoint_of(&cell).is_some() => {}
            CellState::Active => {
                return Ok(Err(Outcome::Impossible(format!(
                    "dedicated cell {cell_id} is active but has no endpoint output"
                ))))
            }
            CellState::Pending | CellState::Provisioning => {
                return Ok(Err(Outcome::Waiting(format!(
                    "waiting for dedicated cell {cell_id} to become active ({})",
                    cell.state.as_str()
                ))))
            }
            other => {
                return Ok(Err(Outcome::Impossible(format!(
                    "dedicated cell {cell_id} is {}",
                    other.as_str()
                ))))
            }
        }
        Ok(Ok(cell))
    }
}

/// The registration of a new pooled cell in `region` with room for `units`.
fn pooled_cell(region: &str, policy: &RegionPolicy, units: u64) -> Result<CreateCell> {
    let suffix = crate::persistence::new_id("p");
    let mut base = format!("{region}-pool");
    base.truncate(63 - suffix.len() - 1);
    let id = format!("{base}-{suffix}");
    let mut labels = BTreeMap::new();
    labels.insert("origin".to_string(), "auto-stamp".to_string());
    Ok(CreateCell {
        cell_id: Id::parse(id.clone())
            .map_err(|e| invalid("cell_id", format!("generated id {id:?}: {e}")))?,
        region: Id::parse(region).map_err(|e| invalid("region", e.to_string()))?,
        tier: Tier::Pooled,
        template: policy.default_template.clone(),
        capacity: Capacity {
            tenants: policy.pooled_capacity.tenants.max(1),
            units: policy.pooled_capacity.units.max(units),
        },
        labels,
        vars: policy.vars.clone(),
        app_version: None,
    })
}

/// Reserves `decision.units` and one tenant on `cell` for the environment, points the
/// environment at the cell, records the decision on the tenant and audits it, all in the
/// caller's transaction. False (and nothing written) when the cell has no room any more:
/// the reservation is a conditional update, so capacity is never over-committed.
pub async fn reserve_in(
    tx: &mut WriteTx,
    tenant_id: &str,
    cell: &Cell,
    decision: &PlacementDecision,
    correlation_id: Option<&str>,
) -> Result<bool> {
    let endpoint = endpoint_of(cell).unwrap_or_default();
    let units = decision.units.min(i64::MAX as u64) as i64;
    if !tx.reserve_capacity(&cell.cell_id, units).await? {
        return Ok(false);
    }
    tx.set_environment_cell(tenant_id, &decision.env, &cell.cell_id, &endpoint, units)
        .await?;
    let current = tx.get_tenant_tx(tenant_id).await?.and_then(|t| t.placement);
    let mut doc = match current {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let value = serde_json::to_value(decision).unwrap_or_default();
    doc.insert(decision.env.clone(), value.clone());
    tx.set_tenant_placement(tenant_id, &serde_json::Value::Object(doc))
        .await?;
    tx.audit(AuditInput {
        tenant_id: Some(tenant_id),
        event_type: "TENANCY_PLACED",
        actor: "system:placement",
        target: &tenant_target(tenant_id),
        payload: value,
        correlation_id,
    })
    .await?;
    Ok(true)
}

/// Gives back the capacity the tenant's environments hold, in the caller's transaction,
/// with its audit record; with `forget`, they also stop pointing at their cells (the
/// tenant is gone). Idempotent: nothing is written when nothing was held.
pub async fn release_in(
    tx: &mut WriteTx,
    tenant_id: &str,
    forget: bool,
    correlation_id: Option<&str>,
) -> Result<Vec<String>> {
    let envs = tx.list_environments_tx(tenant_id).await?;
    let mut released = Vec::new();
    let mut payload = Vec::new();
    for e in &envs {
        if let Some(r) = tx.release_environment(tenant_id, &e.name, forget).await? {
            released.push(format!("{} from {} ({} units)", e.name, r.cell_id, r.units));
            payload.push(json!({"env": e.name, "cell_id": r.cell_id, "units": r.units}));
        }
    }
    let forgot = forget && envs.iter().any(|e| e.cell_id.is_some());
    if released.is_empty() && !forgot {
        return Ok(released);
    }
    tx.audit(AuditInput {
        tenant_id: Some(tenant_id),
        event_type: "TENANCY_CAPACITY_RELEASED",
        actor: "system:placement",
        target: &tenant_target(tenant_id),
        payload: json!({"released": payload, "cells_forgotten": forgot}),
        correlation_id,
    })
    .await?;
    Ok(released)
}

/// Records why a placement failed on the tenant, so `GET /v1/tenants/{id}` shows it, in
/// the caller's transaction with its audit record.
pub async fn record_failure_in(
    tx: &mut WriteTx,
    tenant_id: &str,
    env: &str,
    reason: &str,
    correlation_id: Option<&str>,
) -> Result<()> {
    let Some(t) = tx.get_tenant_tx(tenant_id).await? else {
        return Ok(());
    };
    let mut doc = match t.placement {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let value = json!({"env": env, "cell_id": null, "failed": true, "reason": reason,
                       "decided_at": crate::persistence::now()});
    doc.insert(env.to_string(), value.clone());
    tx.set_tenant_placement(tenant_id, &serde_json::Value::Object(doc))
        .await?;
    tx.audit(AuditInput {
        tenant_id: Some(tenant_id),
        event_type: "TENANCY_PLACEMENT_FAILED",
        actor: "system:placement",
        target: &tenant_target(tenant_id),
        payload: value,
        correlation_id,
    })
    .await?;
    Ok(())
}

/// Placement without writing: where tenant environments would go, given the cells and
/// policies there are (and those an apply is about to add), counting each preview's
/// reservation so a set of tenants is spread as placement would spread it. Used by the plan
/// of `POST /v1/apply` and by the tenant controller before it starts an activation.
#[derive(Debug, Clone, Default)]
pub struct Preview {
    cells: Vec<Cell>,
    /// Cells that are not active yet (being stamped, or added by the apply being planned).
    upcoming: std::collections::HashSet<String>,
    policies: BTreeMap<String, RegionPolicy>,
    auto_stamped: usize,
}

/// Where a preview put an environment.
#[derive(Debug, Clone, PartialEq)]
pub enum Previewed {
    /// On this cell; `ready` false when the cell is not active yet.
    Cell {
        cell_id: String,
        region: String,
        utilization_after: f64,
        ready: bool,
    },
    /// No pooled cell has room and the region auto-stamps one.
    AutoStamp { region: String },
    /// Its own dedicated cell (`exists`: registered already).
    Dedicated { cell_id: String, exists: bool },
    /// Nowhere: the reason.
    NoCapacity(String),
}

impl Previewed {
    /// The plan's words for placing `env` this way.
    pub fn describe(&self, env: &str, env_region: &str) -> String {
        match self {
            Previewed::Cell {
                cell_id,
                region,
                utilization_after,
                ready,
            } => format!(
                "place {env} in {region} (today: {cell_id}{}, utilization after {utilization_after:.2})",
                if *ready { "" } else { ", not active yet" }
            ),
            Previewed::AutoStamp { region } => format!(
                "place {env} in {region} (no pooled cell has room: a pooled cell is auto-stamped)"
            ),
            Previewed::Dedicated { cell_id, exists } => format!(
                "place {env} in {env_region} (on its dedicated cell {cell_id}{})",
                if *exists { "" } else { ", stamped for it" }
            ),
            Previewed::NoCapacity(why) => format!("cannot place {env}: {why}"),
        }
    }
}

impl Preview {
    /// A preview over `cells` (any state: only active and upcoming ones are used) and the
    /// regions' policies.
    pub fn new(cells: Vec<Cell>, policies: BTreeMap<String, RegionPolicy>) -> Self {
        let mut p = Preview {
            policies,
            ..Default::default()
        };
        for c in cells {
            p.add_cell(c);
        }
        p
    }

    /// Counts a cell: active ones as they are, pending or provisioning ones as upcoming.
    pub fn add_cell(&mut self, mut c: Cell) {
        match c.state {
            CellState::Active => {}
            CellState::Pending | CellState::Provisioning => {
                self.upcoming.insert(c.cell_id.clone());
                c.state = CellState::Active;
                c.outputs
                    .insert("endpoint".into(), json!("http://upcoming.invalid"));
            }
            _ => return,
        }
        self.cells.retain(|x| x.cell_id != c.cell_id);
        self.cells.push(c);
    }

    pub fn set_policy(&mut self, region: &str, policy: RegionPolicy) {
        self.policies.insert(region.to_string(), policy);
    }

    fn policy(&self, region: &str) -> RegionPolicy {
        self.policies.get(region).cloned().unwrap_or_default()
    }

    /// Where one environment of a tenant would go; the choice holds its room in the
    /// preview.
    #[allow(clippy::too_many_arguments)]
    pub fn place(
        &mut self,
        tenant_id: &str,
        profile: cellplane_api::Profile,
        residency: Option<DataResidency>,
        allowed: Option<&[Id]>,
        units: u64,
        env: &str,
        env_region: &str,
    ) -> Previewed {
        let policy = self.policy(env_region);
        if !profile.is_pooled() {
            let cell_id = dedicated_cell_id(tenant_id, env);
            let exists = self.cells.iter().any(|c| c.cell_id == cell_id);
            return Previewed::Dedicated { cell_id, exists };
        }
        let regions = candidate_regions(env_region, residency, allowed);
        // Active cells first, as placement sees them; cells still being stamped after.
        let pooled = |upcoming: bool| -> Vec<Cell> {
            self.cells
                .iter()
                .filter(|c| {
                    c.tier == Tier::Pooled && self.upcoming.contains(&c.cell_id) == upcoming
                })
                .cloned()
                .collect()
        };
        let mut ranked = rank(&pooled(false), &regions, units, policy.strategy);
        if ranked.is_empty() {
            ranked = rank(&pooled(true), &regions, units, policy.strategy);
        }
        if let Some(best) = ranked.first() {
            let cell = self
                .cells
                .iter_mut()
                .find(|c| c.cell_id == best.cell_id)
                .expect("ranked cells come from the preview");
            cell.used.tenants += 1;
            cell.used.units += units;
            return Previewed::Cell {
                cell_id: best.cell_id.clone(),
                region: cell.region.clone(),
                utilization_after: best.utilization_after,
                ready: !self.upcoming.contains(&best.cell_id),
            };
        }
        if policy.auto_stamp {
            // The stamped cell takes this tenant and the ones after it, as it will.
            self.auto_stamped += 1;
            if let Ok(req) = pooled_cell(env_region, &policy, units) {
                let mut cell = Cell {
                    cell_id: format!("{}-preview-{}", req.cell_id.as_str(), self.auto_stamped),
                    region: env_region.to_string(),
                    tier: Tier::Pooled,
                    template: req.template.as_str().to_string(),
                    capacity: req.capacity,
                    used: Capacity { tenants: 1, units },
                    labels: BTreeMap::new(),
                    vars: BTreeMap::new(),
                    state: CellState::Active,
                    outputs: BTreeMap::new(),
                    app_version: None,
                    drift: None,
                    pending_job_id: None,
                    version: 1,
                    created_at: String::new(),
                    updated_at: String::new(),
                };
                cell.outputs
                    .insert("endpoint".into(), json!("http://upcoming.invalid"));
                self.upcoming.insert(cell.cell_id.clone());
                self.cells.push(cell);
            }
            return Previewed::AutoStamp {
                region: env_region.to_string(),
            };
        }
        Previewed::NoCapacity(format!(
            "no capacity and auto-stamp off: no active pooled cell in {} has room for one more \
             tenant with {units} unit(s), and auto-stamp is off for region {env_region}",
            regions.join(", ")
        ))
    }
}

/// The writes of [`Placement::put_region`] in the caller's transaction (policy checked).
pub async fn put_region_in(
    tx: &mut WriteTx,
    ctx: &Ctx,
    region: &str,
    if_match: Option<i64>,
    policy: RegionPolicy,
) -> Result<(Region, bool)> {
    let current = tx.get_region_policy_tx(region).await?;
    let version = match &current {
        Some((_, v, _)) => {
            check_version(if_match, *v)?;
            v + 1
        }
        None => {
            if if_match.is_some() {
                return Err(not_found("region policy", region));
            }
            1
        }
    };
    let updated_at = tx.put_region_policy(region, &policy, version).await?;
    if current.as_ref().is_some_and(|(p, _, _)| *p != policy) {
        tx.bump_generation(cellplane_api::manifests::Kind::RegionPolicy, region, None)
            .await?;
    }
    tx.audit(AuditInput {
        tenant_id: None,
        event_type: "CELL_REGION_POLICY_SET",
        actor: &ctx.actor,
        target: &format!("region/{region}"),
        payload: json!({"policy": policy, "version": version}),
        correlation_id: Some(&ctx.correlation_id),
    })
    .await?;
    Ok((
        Region {
            region: region.to_string(),
            policy,
            version,
            updated_at,
        },
        version == 1,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(id: &str, region: &str, used: (u64, u64), cap: (u64, u64)) -> Cell {
        let mut outputs = BTreeMap::new();
        outputs.insert("endpoint".into(), json!("http://127.0.0.1:1"));
        Cell {
            cell_id: id.into(),
            region: region.into(),
            tier: Tier::Pooled,
            template: "local".into(),
            capacity: Capacity {
                tenants: cap.0,
                units: cap.1,
            },
            used: Capacity {
                tenants: used.0,
                units: used.1,
            },
            labels: BTreeMap::new(),
            vars: BTreeMap::new(),
            state: CellState::Active,
            outputs,
            app_version: None,
            drift: None,
            pending_job_id: None,
            version: 1,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn region_preference_beats_utilization() {
        let cells = [
            cell("far", "us-east-1", (0, 0), (10, 10)),
            cell("home", "eu-west-1", (8, 8), (10, 10)),
        ];
        let regions = vec!["eu-west-1".to_string(), "us-east-1".to_string()];
        let r = rank(&cells, &regions, 1, PlacementStrategy::Spread);
        assert_eq!(r[0].cell_id, "home");
        assert_eq!(r[1].cell_id, "far");
    }

    #[test]
    fn spread_and_binpack_order_by_utilization_after() {
        let cells = [
            cell("a", "r1", (1, 1), (10, 10)),
            cell("b", "r1", (5, 5), (10, 10)),
            cell("full", "r1", (10, 10), (10, 10)),
        ];
        let regions = vec!["r1".to_string()];
        let spread: Vec<_> = rank(&cells, &regions, 1, PlacementStrategy::Spread)
            .into_iter()
            .map(|r| r.cell_id)
            .collect();
        assert_eq!(spread, ["a", "b"]);
        let binpack: Vec<_> = rank(&cells, &regions, 1, PlacementStrategy::Binpack)
            .into_iter()
            .map(|r| r.cell_id)
            .collect();
        assert_eq!(binpack, ["b", "a"]);
    }

    #[test]
    fn units_must_fit_and_cells_outside_regions_are_ignored() {
        let cells = [
            cell("small", "r1", (0, 8), (10, 10)),
            cell("other", "r2", (0, 0), (10, 10)),
        ];
        assert!(rank(&cells, &["r1".to_string()], 3, PlacementStrategy::Spread).is_empty());
        assert_eq!(
            rank(&cells, &["r1".to_string()], 2, PlacementStrategy::Spread).len(),
            1
        );
    }

    #[test]
    fn residency_limits_regions() {
        let allowed = [Id::parse("us-east-1").unwrap()];
        assert_eq!(
            candidate_regions(
                "eu-west-1",
                Some(DataResidency::InRegionOnly),
                Some(&allowed)
            ),
            ["eu-west-1"]
        );
        assert_eq!(
            candidate_regions(
                "eu-west-1",
                Some(DataResidency::AllowedRegions),
                Some(&allowed)
            ),
            ["eu-west-1", "us-east-1"]
        );
    }

    #[test]
    fn dedicated_ids_are_valid_identifiers() {
        let long = "a".repeat(63);
        for (t, e) in [("acme", "prod"), ("acme", "dev"), (long.as_str(), "stage")] {
            let id = dedicated_cell_id(t, e);
            assert!(cellplane_api::validate_id(&id).is_ok(), "{id}");
        }
    }
}
