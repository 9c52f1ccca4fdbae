//! `POST /v1/apply` (a plan, then the desired specs stored in one transaction) and
//! `GET /v1/manifests/{kind}/{name}` (an object as a document that re-applies as a no-op).
//!
//! An apply never runs a lifecycle job itself: it stores desired specs (bumping each changed
//! object's `generation`) and the tenant controller converges through the same jobs as the
//! imperative API. Cells are the exception that proves it: registering one enqueues its
//! stamp in the same transaction, as `POST /v1/cells` does.

use super::*;
use crate::manifests::{diff, Parsed, Spec};
use crate::persistence::{MoveFilter, ObjectBook, WriteTx};
use crate::placement::{Preview, Previewed};
use cellplane_api::manifests::{
    CellSpec, DesiredState, Document, EnvironmentSpec, FieldChange, Kind, ObjectMeta,
    OrganizationSpec, PlanAction, PlannedObject, Refusal, TenantSpec, API_VERSION,
};
use std::collections::{HashMap, HashSet};

/// How an apply runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Plan only: nothing is written, no audit record.
    pub dry_run: bool,
    /// Apply the documents that can be applied and report the rest (default: all or none).
    pub partial: bool,
}

/// What an apply ended with.
pub enum ApplyOutcome {
    /// Planned (dry run) or applied.
    Done(ApplyResult),
    /// All or nothing, and something was refused: nothing was stored (409).
    Refused(ApplyResult),
}

/// The registry as an apply plans against it.
struct World {
    orgs: HashMap<String, Organization>,
    regions: HashMap<String, (RegionPolicy, i64)>,
    cells: HashMap<String, Cell>,
    tenants: HashMap<String, TenantRow>,
    envs: HashMap<String, Vec<EnvironmentRow>>,
    moving: HashSet<String>,
    books: HashMap<Kind, HashMap<String, ObjectBook>>,
}

impl World {
    fn book(&self, kind: Kind, name: &str) -> ObjectBook {
        self.books
            .get(&kind)
            .and_then(|b| b.get(name))
            .cloned()
            .unwrap_or_default()
    }
}

/// One object's write, decided by the plan.
enum Write {
    OrgCreate {
        id: String,
        name: String,
    },
    OrgUpdate {
        id: String,
        name: Option<String>,
    },
    Region {
        region: String,
        policy: Box<RegionPolicy>,
        changed: bool,
    },
    CellCreate(Box<crate::jobs::PreparedCell>),
    CellUpdate {
        id: String,
        patch: Box<PatchCell>,
    },
    TenantCreate {
        row: Box<TenantRow>,
        envs: Vec<EnvironmentRow>,
    },
    TenantUpdate {
        id: String,
        version: i64,
        spec: Box<TenantSpec>,
        /// A profile change of a tenant with nothing placed (stored as is).
        profile: Option<Profile>,
        new_envs: Vec<EnvironmentRow>,
    },
}

/// What happens after the commit.
enum After {
    /// Start the move a profile change needs.
    Move(String),
    /// Republish routes with the new rate limit.
    RateLimit(String),
}

struct Planned {
    obj: PlannedObject,
    write: Option<Write>,
    meta: Option<serde_json::Value>,
    meta_changed: bool,
    after: Option<After>,
}

fn meta_value(m: &ObjectMeta) -> Option<serde_json::Value> {
    if m.labels.is_empty() && m.annotations.is_empty() {
        None
    } else {
        Some(json!({"labels": m.labels, "annotations": m.annotations}))
    }
}

fn meta_maps(
    v: Option<&serde_json::Value>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let get = |k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .unwrap_or_default()
    };
    (get("labels"), get("annotations"))
}

fn refusal(reason: &str, message: impl Into<String>, blocking: bool) -> Refusal {
    Refusal {
        reason: reason.into(),
        message: message.into(),
        blocking,
    }
}

fn prefixed(errors: Vec<FieldError>, at: &str) -> Vec<FieldError> {
    errors
        .into_iter()
        .map(|e| FieldError {
            field: format!("{at}.{}", e.field),
            message: e.message,
        })
        .collect()
}

fn to_field_errors(
    e: ServiceError,
    at: &str,
) -> std::result::Result<Vec<FieldError>, ServiceError> {
    match e {
        ServiceError::Validation(errors) => Ok(prefixed(errors, at)),
        other => Err(other),
    }
}

pub use crate::jobs::user_vars_of;

/// A tenant's stored desired spec in manifest form.
pub fn tenant_spec_of(t: &TenantRow, envs: &[EnvironmentRow]) -> TenantSpec {
    let id = |s: &str| Id::parse(s).expect("stored ids are valid");
    TenantSpec {
        organization_id: id(&t.organization_id),
        profile: t.profile,
        region: id(&t.region),
        quotas: t.quotas.clone(),
        policies: t.policies.clone(),
        billing: t.billing.clone(),
        environments: Some(
            envs.iter()
                .filter_map(|e| {
                    Some(EnvironmentSpec {
                        name: serde_json::from_value(json!(e.name)).ok()?,
                        region: Some(id(&e.region)),
                        isolation_level: serde_json::from_value(json!(e.isolation_level)).ok(),
                    })
                })
                .collect(),
        ),
        state: DesiredState::from_tenant_state(t.desired_state()).unwrap_or_default(),
    }
}

/// One top-level field of a tenant spec, as JSON (for audit payloads).
fn spec_field(spec: &TenantSpec, field: &str) -> serde_json::Value {
    json!(spec)
        .get(field)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// `documents[10]` after `documents[2]`.
fn by_document(field: &str) -> (usize, String) {
    let n = field
        .strip_prefix("documents[")
        .and_then(|r| r.split(']').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    (n, field.to_string())
}

fn legal(from: TenantState, to: TenantState) -> bool {
    use TenantState::*;
    from == to
        || matches!(
            (from, to),
            (Draft, Active)
                | (Draft, Suspended)
                | (Active, Suspended)
                | (Active, Archived)
                | (Suspended, Active)
                | (Suspended, Archived)
        )
}

impl Service {
    /// Plans `docs` and, unless it is a dry run or something is refused (all or nothing),
    /// stores them. `errors` are the documents that could not be read or typed.
    pub async fn apply(
        &self,
        ctx: &Ctx,
        docs: Vec<Parsed>,
        mut errors: Vec<FieldError>,
        opts: ApplyOptions,
    ) -> Result<ApplyOutcome> {
        if !errors.is_empty() && !opts.partial {
            return Err(ServiceError::Validation(errors));
        }
        let world = self.load_world(&docs).await?;
        let mut docs = docs;
        docs.sort_by_key(|p| (p.doc.kind, p.index));
        let mut preview = Preview::new(
            world.cells.values().cloned().collect(),
            world
                .regions
                .iter()
                .map(|(r, (p, _))| (r.clone(), p.clone()))
                .collect(),
        );
        let orgs_in_set: HashSet<String> = docs
            .iter()
            .filter(|p| p.doc.kind == Kind::Organization)
            .map(|p| p.doc.metadata.name.as_str().to_string())
            .collect();
        let mut plans = Vec::with_capacity(docs.len());
        for p in &docs {
            let at = format!("documents[{}]", p.index);
            let planned = match &p.spec {
                Spec::Organization(s) => self.plan_org(&world, p, s),
                Spec::RegionPolicy(s) => self.plan_region(&world, &mut preview, p, s),
                Spec::Cell(s) => self.plan_cell_doc(&world, &mut preview, p, s),
                Spec::Tenant(s) => self.plan_tenant(&world, &mut preview, &orgs_in_set, p, s),
            };
            match planned {
                Ok(pl) => plans.push(pl),
                Err(e) => errors.extend(to_field_errors(e, &at)?),
            }
        }
        if !errors.is_empty() && !opts.partial {
            errors.sort_by_key(|e| by_document(&e.field));
            return Err(ServiceError::Validation(errors));
        }
        plans.sort_by_key(|p| p.obj.index);
        let blocked = plans
            .iter()
            .any(|p| p.obj.refusal.as_ref().is_some_and(|r| r.blocking));
        let finish = |plans: Vec<Planned>| ApplyResult {
            dry_run: opts.dry_run,
            partial: opts.partial,
            objects: plans.into_iter().map(|p| p.obj).collect(),
            errors: errors.clone(),
        };
        if opts.dry_run {
            return Ok(ApplyOutcome::Done(finish(plans)));
        }
        if blocked && !opts.partial {
            return Ok(ApplyOutcome::Refused(finish(plans)));
        }
        // Writes in dependency order: organizations, region policies, cells, tenants.
        let mut order: Vec<usize> = (0..plans.len()).collect();
        order.sort_by_key(|&i| (plans[i].obj.kind, plans[i].obj.index));
        let mut afters = Vec::new();
        let mut wrote_any = false;
        if opts.partial {
            for i in order {
                let pl = &mut plans[i];
                if pl.obj.refusal.as_ref().is_some_and(|r| r.blocking) {
                    continue;
                }
                if pl.write.is_none() && !pl.meta_changed {
                    continue;
                }
                let mut tx = self.shared.store.write().await?;
                match self.write_one(&mut tx, ctx, pl).await {
                    Ok(()) => {
                        tx.commit().await?;
                        wrote_any = true;
                        pl.obj.applied = true;
                        afters.extend(pl.after.take());
                    }
                    Err(e) => {
                        pl.obj.refusal = Some(refusal("Conflict", e.to_string(), true));
                    }
                }
            }
        } else {
            let mut tx = self.shared.store.write().await?;
            let mut written = Vec::new();
            for &i in &order {
                let pl = &mut plans[i];
                if pl.write.is_none() && !pl.meta_changed {
                    continue;
                }
                self.write_one(&mut tx, ctx, pl).await?;
                written.push(i);
            }
            if !written.is_empty() {
                tx.commit().await?;
                wrote_any = true;
            }
            for i in written {
                plans[i].obj.applied = true;
            }
            for pl in plans.iter_mut() {
                afters.extend(pl.after.take());
            }
        }
        if wrote_any {
            self.shared.job_notify.notify_waiters();
            self.shared.desired_changed.notify_waiters();
        }
        for a in afters {
            match a {
                After::RateLimit(id) => {
                    if let Some(t) = self.shared.store.get_tenant(&id).await? {
                        let mode = match t.state {
                            TenantState::Active => Some(RouteMode::Serve),
                            TenantState::Suspended => Some(RouteMode::Suspended),
                            _ => None,
                        };
                        if let (Some(mode), None) = (mode, &t.pending_job_id) {
                            self.shared
                                .routing
                                .republish_rate_limit(&id, mode, &ctx.correlation_id)
                                .await?;
                        }
                    }
                }
                After::Move(id) => {
                    let patch = PatchTenant {
                        profile: Some(Profile::StDedicated),
                        ..Default::default()
                    };
                    let obj = plans
                        .iter_mut()
                        .find(|p| p.obj.kind == Kind::Tenant && p.obj.name == id)
                        .map(|p| &mut p.obj);
                    match self.change_profile(ctx, &id, None, patch).await {
                        Ok(ProfileChange::Moving(m)) => {
                            if let Some(o) = obj {
                                o.jobs.push(format!("started move {}", m.move_.move_id));
                            }
                        }
                        Ok(ProfileChange::Changed(_)) => {}
                        Err(e) => {
                            if let Some(o) = obj {
                                o.jobs.push(format!("the move could not start: {e}"));
                            }
                        }
                    }
                }
            }
        }
        // Generations after the apply.
        let books: HashMap<Kind, HashMap<String, ObjectBook>> = {
            let mut b = HashMap::new();
            for kind in [
                Kind::Organization,
                Kind::RegionPolicy,
                Kind::Cell,
                Kind::Tenant,
            ] {
                if plans.iter().any(|p| p.obj.kind == kind && p.obj.applied) {
                    b.insert(kind, self.shared.store.object_books(kind).await?);
                }
            }
            b
        };
        for p in plans.iter_mut() {
            p.obj.generation = books
                .get(&p.obj.kind)
                .and_then(|b| b.get(&p.obj.name))
                .map(|b| b.generation)
                .or(p.obj.generation);
        }
        Ok(ApplyOutcome::Done(finish(plans)))
    }

    async fn load_world(&self, docs: &[Parsed]) -> Result<World> {
        let store = &self.shared.store;
        let orgs = store
            .all_organizations()
            .await?
            .into_iter()
            .map(|o| (o.organization_id.clone(), o))
            .collect();
        let cells = store
            .all_cells()
            .await?
            .into_iter()
            .map(|c| (c.cell_id.clone(), c))
            .collect();
        let regions = store
            .list_region_policies()
            .await?
            .into_iter()
            .map(|(r, p, v, _)| (r, (p, v)))
            .collect();
        let ids: Vec<String> = docs
            .iter()
            .filter(|p| p.doc.kind == Kind::Tenant)
            .map(|p| p.doc.metadata.name.as_str().to_string())
            .collect();
        let tenants: HashMap<String, TenantRow> = store
            .tenants_by_ids(&ids)
            .await?
            .into_iter()
            .map(|t| (t.tenant_id.clone(), t))
            .collect();
        let existing: Vec<String> = tenants.keys().cloned().collect();
        let mut envs: HashMap<String, Vec<EnvironmentRow>> = HashMap::new();
        for chunk in existing.chunks(500) {
            for e in store.environments_of(chunk).await? {
                envs.entry(e.tenant_id.clone()).or_default().push(e);
            }
        }
        let moving = store
            .list_moves(
                &MoveFilter {
                    state: Some(MoveState::Running),
                    ..Default::default()
                },
                "",
                1000,
            )
            .await?
            .into_iter()
            .map(|m| m.tenant_id)
            .collect();
        let mut books = HashMap::new();
        for kind in [
            Kind::Organization,
            Kind::RegionPolicy,
            Kind::Cell,
            Kind::Tenant,
        ] {
            if docs.iter().any(|p| p.doc.kind == kind) {
                books.insert(kind, store.object_books(kind).await?);
            }
        }
        Ok(World {
            orgs,
            regions,
            cells,
            tenants,
            envs,
            moving,
            books,
        })
    }

    fn object(p: &Parsed, action: PlanAction) -> PlannedObject {
        PlannedObject {
            index: p.index,
            kind: p.doc.kind,
            name: p.doc.metadata.name.as_str().to_string(),
            action,
            diff: Vec::new(),
            jobs: Vec::new(),
            refusal: None,
            applied: false,
            generation: None,
        }
    }

    /// The metadata part of a plan: the diff of labels and annotations, and whether they
    /// change. A stale `metadata.version` is a blocking refusal.
    fn plan_meta(
        world: &World,
        p: &Parsed,
        exists: bool,
        current_version: Option<i64>,
        obj: &mut PlannedObject,
    ) -> (Option<serde_json::Value>, bool) {
        let name = p.doc.metadata.name.as_str();
        let book = world.book(p.doc.kind, name);
        let meta = meta_value(&p.doc.metadata);
        if let Some(v) = p.doc.metadata.version {
            match current_version {
                Some(cur) if cur != v => {
                    obj.refusal = Some(refusal(
                        "StaleVersion",
                        format!(
                            "{} {name:?} is at version {cur}, not {v} (metadata.version): \
                             read it again and re-apply",
                            p.doc.kind.as_str()
                        ),
                        true,
                    ))
                }
                None if !exists => {
                    obj.refusal = Some(refusal(
                        "StaleVersion",
                        format!(
                            "{} {name:?} does not exist; remove metadata.version to create it",
                            p.doc.kind.as_str()
                        ),
                        true,
                    ))
                }
                _ => {}
            }
        }
        if !exists {
            return (meta, false);
        }
        let (l0, a0) = meta_maps(book.meta.as_ref());
        let mut changed = false;
        for (k, from, to) in [
            ("labels", &l0, &p.doc.metadata.labels),
            ("annotations", &a0, &p.doc.metadata.annotations),
        ] {
            if from != to {
                changed = true;
                diff(
                    &format!("metadata.{k}"),
                    &json!(from),
                    &json!(to),
                    &mut obj.diff,
                );
            }
        }
        obj.generation = Some(book.generation);
        (meta, changed)
    }

    fn plan_org(&self, world: &World, p: &Parsed, s: &OrganizationSpec) -> Result<Planned> {
        validate_org_name("spec.name", &s.name)?;
        let id = p.doc.metadata.name.as_str();
        let current = world.orgs.get(id);
        let mut obj = Self::object(
            p,
            match current {
                None => PlanAction::Create,
                Some(o) if o.name != s.name => PlanAction::Update,
                Some(_) => PlanAction::Unchanged,
            },
        );
        let (meta, meta_changed) = Self::plan_meta(
            world,
            p,
            current.is_some(),
            current.map(|o| o.version),
            &mut obj,
        );
        let write = match current {
            None => Some(Write::OrgCreate {
                id: id.to_string(),
                name: s.name.clone(),
            }),
            Some(o) if o.name != s.name => {
                diff("spec.name", &json!(o.name), &json!(s.name), &mut obj.diff);
                Some(Write::OrgUpdate {
                    id: id.to_string(),
                    name: Some(s.name.clone()),
                })
            }
            Some(_) if meta_changed => Some(Write::OrgUpdate {
                id: id.to_string(),
                name: None,
            }),
            Some(_) => None,
        };
        if meta_changed && obj.action == PlanAction::Unchanged {
            obj.action = PlanAction::Update;
        }
        Ok(Planned {
            obj,
            write,
            meta,
            meta_changed,
            after: None,
        })
    }

    fn plan_region(
        &self,
        world: &World,
        preview: &mut Preview,
        p: &Parsed,
        s: &RegionPolicy,
    ) -> Result<Planned> {
        self.shared
            .placement
            .check_region_policy(s)
            .map_err(|e| match e {
                ServiceError::Validation(errors) => {
                    ServiceError::Validation(prefixed(errors, "spec"))
                }
                other => other,
            })?;
        let region = p.doc.metadata.name.as_str();
        let current = world.regions.get(region);
        let mut obj = Self::object(
            p,
            match current {
                None => PlanAction::Create,
                Some((c, _)) if c != s => PlanAction::Update,
                Some(_) => PlanAction::Unchanged,
            },
        );
        let (meta, meta_changed) =
            Self::plan_meta(world, p, current.is_some(), current.map(|c| c.1), &mut obj);
        let changed = current.is_none_or(|(c, _)| c != s);
        if let Some((c, _)) = current {
            diff("spec", &json!(c), &json!(s), &mut obj.diff);
        }
        if meta_changed && obj.action == PlanAction::Unchanged {
            obj.action = PlanAction::Update;
        }
        preview.set_policy(region, s.clone());
        Ok(Planned {
            obj,
            write: (changed || meta_changed).then(|| Write::Region {
                region: region.to_string(),
                policy: Box::new(s.clone()),
                changed,
            }),
            meta,
            meta_changed,
            after: None,
        })
    }

    fn plan_cell_doc(
        &self,
        world: &World,
        preview: &mut Preview,
        p: &Parsed,
        s: &CellSpec,
    ) -> Result<Planned> {
        let id = p.doc.metadata.name.as_str();
        let current = world.cells.get(id);
        let Some(cell) = current else {
            let req = CreateCell {
                cell_id: p.doc.metadata.name.clone(),
                region: s.region.clone(),
                tier: s.tier,
                template: s.template.clone(),
                capacity: s.capacity,
                labels: s.labels.clone(),
                vars: s.vars.clone(),
                app_version: s.app_version.clone(),
            };
            let prepared = crate::jobs::prepare_cell(&self.shared, req).map_err(|e| match e {
                ServiceError::Validation(errors) => {
                    ServiceError::Validation(prefixed(errors, "spec"))
                }
                other => other,
            })?;
            let mut obj = Self::object(p, PlanAction::Create);
            let (meta, _) = Self::plan_meta(world, p, false, None, &mut obj);
            obj.jobs.push(format!(
                "stamp cell {id} ({} {} cell in {}, template {})",
                s.tier.as_str(),
                if s.capacity.tenants == 1 {
                    "single-tenant".to_string()
                } else {
                    format!("{}-tenant", s.capacity.tenants)
                },
                s.region.as_str(),
                s.template.as_str()
            ));
            let mut planned_cell = prepared.cell().clone();
            planned_cell.state = CellState::Pending;
            preview.add_cell(planned_cell);
            return Ok(Planned {
                obj,
                write: Some(Write::CellCreate(Box::new(prepared))),
                meta,
                meta_changed: false,
                after: None,
            });
        };
        let template = self.load_template(&cell.template, "spec.template").ok();
        let current_spec = CellSpec {
            region: Id::parse(&cell.region).expect("stored ids are valid"),
            tier: cell.tier,
            template: Id::parse(&cell.template).expect("stored ids are valid"),
            capacity: cell.capacity,
            labels: cell.labels.clone(),
            vars: user_vars_of(cell, template.as_ref()),
            app_version: cell.app_version.clone(),
        };
        let mut desired = s.clone();
        if desired.app_version.is_none() {
            desired.app_version = current_spec.app_version.clone();
        }
        let mut obj = Self::object(p, PlanAction::Unchanged);
        let (meta, meta_changed) = Self::plan_meta(world, p, true, Some(cell.version), &mut obj);
        diff("spec", &json!(current_spec), &json!(desired), &mut obj.diff);
        let mut errors = Vec::new();
        validate_labels(&desired.labels, &mut errors);
        validate_vars(&desired.vars, &mut errors);
        if let Some(v) = &desired.app_version {
            validate_app_version(v, &mut errors);
        }
        validate_capacity("capacity", &desired.capacity, &mut errors);
        if let Some(t) = &template {
            if let Err(e) = t.validate_vars(&desired.vars) {
                errors.extend(e);
            }
        }
        if !errors.is_empty() {
            return Err(ServiceError::Validation(prefixed(errors, "spec")));
        }
        let immutable: Vec<&str> = [
            ("region", current_spec.region != desired.region),
            ("tier", current_spec.tier != desired.tier),
            ("template", current_spec.template != desired.template),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(f, _)| f)
        .collect();
        let vars_changed = current_spec.vars != desired.vars;
        let version_changed = current_spec.app_version != desired.app_version;
        let mut patch = PatchCell::default();
        if current_spec.capacity != desired.capacity {
            patch.capacity = Some(desired.capacity);
            if desired.capacity.tenants < cell.used.tenants
                || desired.capacity.units < cell.used.units
            {
                obj.refusal = Some(refusal(
                    "Conflict",
                    format!(
                        "capacity must not be below what is in use ({} tenants, {} units)",
                        cell.used.tenants, cell.used.units
                    ),
                    true,
                ));
            }
        }
        if current_spec.labels != desired.labels {
            patch.labels = Some(desired.labels.clone());
        }
        if vars_changed {
            patch.vars = Some(desired.vars.clone());
        }
        if version_changed {
            patch.app_version = desired.app_version.clone();
        }
        let changed = !obj.diff.iter().all(|d| d.path.starts_with("metadata."));
        if !immutable.is_empty() {
            obj.refusal = Some(refusal(
                "Immutable",
                format!(
                    "{} of a cell cannot change (register a new cell and move its tenants)",
                    immutable.join(", ")
                ),
                true,
            ));
        } else if matches!(cell.state, CellState::Destroying | CellState::Destroyed) && changed {
            obj.refusal = Some(refusal(
                "Conflict",
                format!("cell {id:?} is {} and cannot change", cell.state.as_str()),
                true,
            ));
        } else if vars_changed || version_changed {
            if let Some(job) = &cell.pending_job_id {
                obj.refusal = Some(refusal(
                    "Conflict",
                    format!("cell {id:?} has job {job} in progress; apply again after it ends"),
                    true,
                ));
            } else if !matches!(
                cell.state,
                CellState::Active | CellState::Draining | CellState::Drained | CellState::Failed
            ) {
                obj.refusal = Some(refusal(
                    "Conflict",
                    format!(
                        "cell {id:?} is {}: vars and app_version change on stamped cells",
                        cell.state.as_str()
                    ),
                    true,
                ));
            } else {
                let mut what = Vec::new();
                if vars_changed {
                    what.push("vars");
                }
                if version_changed {
                    what.push("app_version");
                }
                obj.jobs
                    .push(format!("apply cell {id} ({} changed)", what.join(" and ")));
            }
        }
        if changed || meta_changed {
            obj.action = PlanAction::Update;
        }
        if patch.capacity.is_some() {
            let mut c = cell.clone();
            c.capacity = desired.capacity;
            preview.add_cell(c);
        }
        Ok(Planned {
            obj,
            write: changed.then(|| Write::CellUpdate {
                id: id.to_string(),
                patch: Box::new(patch),
            }),
            meta,
            meta_changed,
            after: None,
        })
    }

    fn plan_tenant(
        &self,
        world: &World,
        preview: &mut Preview,
        orgs_in_set: &HashSet<String>,
        p: &Parsed,
        s: &TenantSpec,
    ) -> Result<Planned> {
        let id = p.doc.metadata.name.as_str();
        validate_docs(s.region.as_str(), &s.quotas, &s.policies, &s.billing).map_err(
            |e| match e {
                ServiceError::Validation(errors) => {
                    ServiceError::Validation(prefixed(errors, "spec"))
                }
                other => other,
            },
        )?;
        let org = s.organization_id.as_str();
        if !world.orgs.contains_key(org) && !orgs_in_set.contains(org) {
            return Err(invalid(
                "spec.organization_id",
                format!("organization {org:?} does not exist and is not in this apply"),
            ));
        }
        if let Some(envs) = &s.environments {
            let mut seen = HashSet::new();
            for (i, e) in envs.iter().enumerate() {
                if !seen.insert(e.name) {
                    return Err(invalid(
                        &format!("spec.environments[{i}].name"),
                        format!("environment {:?} is listed twice", e.name.as_str()),
                    ));
                }
            }
        }
        let current = world.tenants.get(id);
        let current_envs = world.envs.get(id).cloned().unwrap_or_default();
        let mut obj = Self::object(
            p,
            if current.is_some() {
                PlanAction::Unchanged
            } else {
                PlanAction::Create
            },
        );
        let (meta, meta_changed) = Self::plan_meta(
            world,
            p,
            current.is_some(),
            current.map(|t| t.version),
            &mut obj,
        );
        // The desired environments, each with its region and isolation filled in.
        let default_isolation = |profile: Profile| {
            if profile.is_pooled() {
                "shared"
            } else {
                "strict"
            }
        };
        let desired_envs: Vec<(String, String, String)> = match &s.environments {
            None if !current_envs.is_empty() => current_envs
                .iter()
                .map(|e| (e.name.clone(), e.region.clone(), e.isolation_level.clone()))
                .collect(),
            None => vec![(
                "prod".into(),
                s.region.as_str().into(),
                default_isolation(s.profile).into(),
            )],
            Some(list) => list
                .iter()
                .map(|e| {
                    let name = e.name.as_str().to_string();
                    let cur = current_envs.iter().find(|c| c.name == name);
                    let region = e
                        .region
                        .as_ref()
                        .map(|r| r.as_str().to_string())
                        .or_else(|| cur.map(|c| c.region.clone()))
                        .unwrap_or_else(|| s.region.as_str().to_string());
                    let iso = e
                        .isolation_level
                        .map(|i| i.as_str().to_string())
                        .or_else(|| cur.map(|c| c.isolation_level.clone()))
                        .unwrap_or_else(|| {
                            if name == "prod" {
                                default_isolation(s.profile).to_string()
                            } else {
                                "shared".to_string()
                            }
                        });
                    (name, region, iso)
                })
                .collect(),
        };
        // Residency: every environment's region must be allowed.
        for (name, region, _) in &desired_envs {
            if s.policies.data_residency == Some(DataResidency::InRegionOnly)
                && region != s.region.as_str()
            {
                obj.refusal = Some(refusal(
                    "ResidencyViolation",
                    format!(
                        "environment {name} in {region} would violate in-region-only residency \
                         (the tenant's region is {})",
                        s.region.as_str()
                    ),
                    true,
                ));
            } else if let Some(allowed) = &s.policies.allowed_regions {
                if region != s.region.as_str() && !allowed.iter().any(|r| r.as_str() == region) {
                    obj.refusal = Some(refusal(
                        "ResidencyViolation",
                        format!(
                            "environment {name} in {region} would violate residency: not in \
                             allowedRegions"
                        ),
                        true,
                    ));
                }
            }
        }
        let mut desired_envs = desired_envs;
        desired_envs.sort_by(|a, b| a.0.cmp(&b.0));
        let desired_state = s.state.as_tenant_state();
        let mut normalized = s.clone();
        normalized.environments = Some(
            desired_envs
                .iter()
                .map(|(n, r, i)| EnvironmentSpec {
                    name: serde_json::from_value(json!(n)).expect("env names come from EnvName"),
                    region: Id::parse(r).ok(),
                    isolation_level: serde_json::from_value(json!(i)).ok(),
                })
                .collect(),
        );
        let units = s.quotas.units.unwrap_or(1).max(1);
        let Some(t) = current else {
            // A new tenant: it starts as a draft, and the controller activates it.
            if desired_state == TenantState::Archived {
                obj.refusal = Some(refusal(
                    "IllegalTransition",
                    "a new tenant starts as a draft and cannot be archived",
                    true,
                ));
            }
            if matches!(desired_state, TenantState::Active | TenantState::Suspended) {
                self.preview_activation(preview, id, s, units, &desired_envs, &mut obj);
                if desired_state == TenantState::Suspended {
                    obj.jobs.push(format!("suspend {id}"));
                }
            }
            let ts = persistence::now();
            let row = TenantRow {
                tenant_id: id.to_string(),
                organization_id: org.to_string(),
                profile: s.profile,
                state: TenantState::Draft,
                region: s.region.as_str().to_string(),
                quotas: s.quotas.clone(),
                policies: s.policies.clone(),
                billing: s.billing.clone(),
                placement: None,
                pending_job_id: None,
                archived_at: None,
                version: 1,
                created_at: ts.clone(),
                updated_at: ts.clone(),
                desired: persistence::Desired {
                    state: Some(desired_state),
                    meta: meta.clone(),
                    ..Default::default()
                },
            };
            let envs = desired_envs
                .iter()
                .map(|(n, r, i)| EnvironmentRow {
                    tenant_id: id.to_string(),
                    name: n.clone(),
                    region: r.clone(),
                    isolation_level: i.clone(),
                    cell_id: None,
                    endpoint: None,
                    created_at: ts.clone(),
                })
                .collect();
            return Ok(Planned {
                obj,
                write: Some(Write::TenantCreate {
                    row: Box::new(row),
                    envs,
                }),
                meta,
                meta_changed: false,
                after: None,
            });
        };
        if t.state == TenantState::Deleted {
            obj.refusal = Some(refusal(
                "IllegalTransition",
                format!("tenant {id:?} is deleted and cannot change"),
                true,
            ));
        }
        let current_spec = tenant_spec_of(t, &current_envs);
        let mut spec_diff = Vec::new();
        diff(
            "spec",
            &json!(current_spec),
            &json!(normalized),
            &mut spec_diff,
        );
        let moving = world.moving.contains(id);
        // A profile change that a running move is carrying out is not a change.
        if moving {
            spec_diff.retain(|d| d.path != "spec.profile");
        }
        let mut immutable = Vec::new();
        if t.organization_id != org {
            immutable.push("organization_id");
        }
        if t.region != s.region.as_str() {
            immutable.push("region");
        }
        for c in &current_envs {
            match desired_envs.iter().find(|(n, _, _)| *n == c.name) {
                None => {
                    obj.refusal = Some(refusal(
                        "Immutable",
                        format!(
                            "environment {} is not in the manifest: an apply does not remove \
                             environments (list it, or archive the tenant)",
                            c.name
                        ),
                        true,
                    ))
                }
                Some((_, r, i)) => {
                    if *r != c.region {
                        immutable.push("an environment's region (move it instead)");
                    }
                    if *i != c.isolation_level {
                        immutable.push("an environment's isolation_level");
                    }
                }
            }
        }
        if !immutable.is_empty() {
            immutable.dedup();
            obj.refusal = Some(refusal(
                "Immutable",
                format!("{} of a tenant cannot change", immutable.join(", ")),
                true,
            ));
        }
        let placed: Vec<&EnvironmentRow> = current_envs
            .iter()
            .filter(|e| e.cell_id.is_some())
            .collect();
        let mut profile_write = None;
        let mut after = None;
        if t.profile != s.profile && !moving {
            if placed.is_empty() && t.state == TenantState::Draft {
                profile_write = Some(s.profile);
            } else if t.profile == Profile::MtStandard
                && s.profile == Profile::StDedicated
                && placed.len() == 1
                && t.state == TenantState::Active
            {
                obj.jobs.push(format!(
                    "move {id}/{} from {} to its dedicated cell {} (stamped for it); the \
                     profile becomes st-dedicated at the flip",
                    placed[0].name,
                    placed[0].cell_id.as_deref().unwrap_or("?"),
                    crate::placement::dedicated_cell_id(id, &placed[0].name)
                ));
                after = Some(After::Move(id.to_string()));
            } else {
                obj.refusal = Some(refusal(
                    "NeedsMove",
                    format!(
                        "profile {} → {} of a {} tenant with {} placed environment(s) needs a \
                         move that is not done by an apply: only mt-standard → st-dedicated of \
                         an active tenant with one placed environment is",
                        t.profile.as_str(),
                        s.profile.as_str(),
                        t.state.as_str(),
                        placed.len()
                    ),
                    true,
                ));
            }
        }
        // The lifecycle: from where the tenant is now to where the manifest wants it.
        let from = t.state;
        if from != TenantState::Deleted && !legal(from, desired_state) {
            obj.refusal = Some(refusal(
                "IllegalTransition",
                format!(
                    "tenant {id:?} is {}; it cannot become {}",
                    from.as_str(),
                    desired_state.as_str()
                ),
                true,
            ));
        } else if from != desired_state {
            match (from, desired_state) {
                (TenantState::Draft, _) => {
                    self.preview_activation(preview, id, s, units, &desired_envs, &mut obj);
                    if desired_state == TenantState::Suspended {
                        obj.jobs.push(format!("suspend {id}"));
                    }
                }
                (_, TenantState::Suspended) => obj.jobs.push(format!("suspend {id}")),
                (_, TenantState::Active) => obj.jobs.push(format!("resume {id}")),
                (_, TenantState::Archived) => obj.jobs.push(format!(
                    "archive {id}: remove its routes and release its capacity"
                )),
                _ => {}
            }
        }
        // New environments of a tenant that is (or stays) active are placed now.
        let new_envs: Vec<EnvironmentRow> = desired_envs
            .iter()
            .filter(|(n, _, _)| !current_envs.iter().any(|c| c.name == *n))
            .map(|(n, r, i)| EnvironmentRow {
                tenant_id: id.to_string(),
                name: n.clone(),
                region: r.clone(),
                isolation_level: i.clone(),
                cell_id: None,
                endpoint: None,
                created_at: persistence::now(),
            })
            .collect();
        if from == TenantState::Active && desired_state == TenantState::Active {
            for e in &new_envs {
                let placed = preview.place(
                    id,
                    s.profile,
                    s.policies.data_residency,
                    s.policies.allowed_regions.as_deref(),
                    units,
                    &e.name,
                    &e.region,
                );
                if let Previewed::NoCapacity(why) = &placed {
                    obj.refusal
                        .get_or_insert(refusal("NoCapacity", why.clone(), false));
                }
                obj.jobs
                    .push(format!("{id}: {}", placed.describe(&e.name, &e.region)));
            }
        }
        if t.quotas.api_rate_limit != s.quotas.api_rate_limit
            && matches!(from, TenantState::Active | TenantState::Suspended)
            && !placed.is_empty()
        {
            obj.jobs.push(format!(
                "republish the routes of {id} with rate limit {}",
                s.quotas
                    .api_rate_limit
                    .map(|r| format!("{r}/s"))
                    .unwrap_or_else(|| "none".into())
            ));
            after.get_or_insert(After::RateLimit(id.to_string()));
        }
        let spec_changed = !spec_diff.is_empty();
        obj.diff.extend(spec_diff);
        obj.diff.sort_by(|a: &FieldChange, b| a.path.cmp(&b.path));
        if spec_changed || meta_changed {
            obj.action = PlanAction::Update;
        }
        Ok(Planned {
            obj,
            write: spec_changed.then(|| Write::TenantUpdate {
                id: id.to_string(),
                version: t.version,
                spec: Box::new(s.clone()),
                profile: profile_write,
                new_envs,
            }),
            meta,
            meta_changed,
            after: if spec_changed { after } else { None },
        })
    }

    /// The plan's words for activating a tenant: where each environment goes.
    fn preview_activation(
        &self,
        preview: &mut Preview,
        id: &str,
        s: &TenantSpec,
        units: u64,
        envs: &[(String, String, String)],
        obj: &mut PlannedObject,
    ) {
        let mut places = Vec::new();
        for (name, region, _) in envs {
            let placed = preview.place(
                id,
                s.profile,
                s.policies.data_residency,
                s.policies.allowed_regions.as_deref(),
                units,
                name,
                region,
            );
            if let Previewed::NoCapacity(why) = &placed {
                obj.refusal
                    .get_or_insert(refusal("NoCapacity", why.clone(), false));
            }
            places.push(placed.describe(name, region));
        }
        obj.jobs
            .push(format!("activate {id}: {}", places.join("; ")));
    }

    async fn write_one(&self, tx: &mut WriteTx, ctx: &Ctx, pl: &mut Planned) -> Result<()> {
        let kind = pl.obj.kind;
        let name = pl.obj.name.clone();
        let audit_diff = json!(pl.obj.diff);
        match pl.write.take() {
            None => {}
            Some(Write::OrgCreate { id, name }) => {
                if tx.organization_exists(&id).await? {
                    return Err(ServiceError::Conflict(format!(
                        "organization {id:?} was created meanwhile; apply again"
                    )));
                }
                tx.insert_organization(&id, &name).await?;
                tx.audit(AuditInput {
                    tenant_id: None,
                    event_type: "TENANCY_ORGANIZATION_CREATED",
                    actor: &ctx.actor,
                    target: &format!("organization/{id}"),
                    payload: json!({"organization_id": id, "name": name, "source": "manifest"}),
                    correlation_id: Some(&ctx.correlation_id),
                })
                .await?;
            }
            Some(Write::OrgUpdate { id, name: Some(n) }) => {
                tx.rename_organization(&id, &n).await?;
                tx.bump_generation(Kind::Organization, &id, None).await?;
                tx.audit(AuditInput {
                    tenant_id: None,
                    event_type: "TENANCY_ORGANIZATION_UPDATED",
                    actor: &ctx.actor,
                    target: &format!("organization/{id}"),
                    payload: json!({"changes": audit_diff, "source": "manifest"}),
                    correlation_id: Some(&ctx.correlation_id),
                })
                .await?;
            }
            Some(Write::OrgUpdate { name: None, .. }) => {}
            Some(Write::Region {
                region,
                policy,
                changed: true,
            }) => {
                crate::placement::put_region_in(tx, ctx, &region, None, *policy).await?;
            }
            Some(Write::Region { changed: false, .. }) => {}
            Some(Write::CellCreate(prepared)) => {
                crate::jobs::register_cell_in(tx, &self.shared, ctx, *prepared).await?;
            }
            Some(Write::CellUpdate { id, patch }) => {
                self.patch_cell_in(tx, ctx, &id, None, *patch).await?;
            }
            Some(Write::TenantCreate { row, envs }) => {
                if tx.get_tenant_tx(&row.tenant_id).await?.is_some() {
                    return Err(ServiceError::Conflict(format!(
                        "tenant {:?} was created meanwhile; apply again",
                        row.tenant_id
                    )));
                }
                tx.insert_tenant(&row).await?;
                for e in &envs {
                    tx.insert_environment(e).await?;
                }
                tx.audit(AuditInput {
                    tenant_id: Some(&row.tenant_id),
                    event_type: "TENANCY_CREATED",
                    actor: &ctx.actor,
                    target: &tenant_target(&row.tenant_id),
                    payload: json!({
                        "organization_id": row.organization_id,
                        "profile": row.profile,
                        "region": row.region,
                        "quotas": row.quotas,
                        "policies": row.policies,
                        "billing": row.billing,
                        "environments": envs.iter().map(|e| &e.name).collect::<Vec<_>>(),
                        "desired_state": row.desired.state,
                        "source": "manifest",
                    }),
                    correlation_id: Some(&ctx.correlation_id),
                })
                .await?;
            }
            Some(Write::TenantUpdate {
                id,
                version,
                spec,
                profile,
                new_envs,
            }) => {
                {
                    match tx
                        .update_tenant_docs(
                            &id,
                            Some(version),
                            &spec.quotas,
                            &spec.policies,
                            &spec.billing,
                        )
                        .await?
                    {
                        Conditional::Done => {}
                        Conditional::NotFound => return Err(not_found("tenant", &id)),
                        _ => {
                            return Err(ServiceError::Conflict(format!(
                                "tenant {id:?} changed since it was read (version {version}); \
                                 apply again"
                            )))
                        }
                    }
                    if let Some(p) = profile {
                        tx.set_profile_in_spec(&id, p).await?;
                    }
                    for e in &new_envs {
                        tx.insert_environment(e).await?;
                        tx.audit(AuditInput {
                            tenant_id: Some(&id),
                            event_type: "TENANCY_ENVIRONMENT_CREATED",
                            actor: &ctx.actor,
                            target: &tenant_target(&id),
                            payload: json!({"env": e.name, "region": e.region,
                                            "isolation_level": e.isolation_level,
                                            "source": "manifest"}),
                            correlation_id: Some(&ctx.correlation_id),
                        })
                        .await?;
                    }
                    // One generation for the whole change (update_tenant_docs moved it).
                    tx.set_desired_state(&id, spec.state.as_tenant_state())
                        .await?;
                    // `changes` by top-level field (what the public event lists), the
                    // field-level diff beside it.
                    let mut changes = serde_json::Map::new();
                    if let Some(list) = audit_diff.as_array() {
                        for d in list {
                            let path = d["path"].as_str().unwrap_or_default();
                            if let Some(field) =
                                path.strip_prefix("spec.").and_then(|p| p.split('.').next())
                            {
                                changes.insert(field.to_string(), json!(spec_field(&spec, field)));
                            }
                        }
                    }
                    let version = tx
                        .get_tenant_tx(&id)
                        .await?
                        .map(|t| t.version)
                        .unwrap_or(version + 1);
                    tx.audit(AuditInput {
                        tenant_id: Some(&id),
                        event_type: "TENANCY_UPDATED",
                        actor: &ctx.actor,
                        target: &tenant_target(&id),
                        payload: json!({"changes": changes, "diff": audit_diff,
                                        "version": version, "source": "manifest"}),
                        correlation_id: Some(&ctx.correlation_id),
                    })
                    .await?;
                }
            }
        }
        if let Some(meta) = &pl.meta {
            if pl.meta_changed || pl.obj.action == PlanAction::Create {
                tx.set_meta(kind, &name, meta).await?;
            }
        } else if pl.meta_changed {
            tx.set_meta(kind, &name, &json!({})).await?;
        }
        Ok(())
    }

    // ------------------------------------------------------------ export

    /// An object as a document: `metadata` (with `version` and `generation`), `spec` as an
    /// apply would write it, and `status`. Applying it again changes nothing.
    pub async fn export(&self, kind: Kind, name: &str) -> Result<Document> {
        let store = &self.shared.store;
        let book = store
            .object_books(kind)
            .await?
            .remove(name)
            .unwrap_or_default();
        let (labels, annotations) = meta_maps(book.meta.as_ref());
        let (spec, status, version) = match kind {
            Kind::Organization => {
                let o = self.get_organization(name).await?;
                (json!(OrganizationSpec { name: o.name }), None, o.version)
            }
            Kind::RegionPolicy => {
                let r = self.shared.placement.get_region(name).await?;
                (json!(r.policy), None, r.version)
            }
            Kind::Cell => {
                let c = self.get_cell(name).await?;
                let template = self.load_template(&c.template, "template").ok();
                let spec = CellSpec {
                    region: Id::parse(&c.region).expect("stored ids are valid"),
                    tier: c.tier,
                    template: Id::parse(&c.template).expect("stored ids are valid"),
                    capacity: c.capacity,
                    labels: c.labels.clone(),
                    vars: user_vars_of(&c, template.as_ref()),
                    app_version: c.app_version.clone(),
                };
                let status = json!({"phase": c.state, "used": c.used,
                                    "pending_job_id": c.pending_job_id,
                                    "endpoint": crate::placement::endpoint_of(&c)});
                (json!(spec), Some(status), c.version)
            }
            Kind::Tenant => {
                let t = store
                    .get_tenant(name)
                    .await?
                    .filter(|t| t.state != TenantState::Deleted)
                    .ok_or_else(|| not_found("tenant", name))?;
                let envs = store.list_environments(name).await?;
                let spec = tenant_spec_of(&t, &envs);
                (
                    json!(spec),
                    t.desired.status.as_ref().map(|s| json!(s)),
                    t.version,
                )
            }
        };
        Ok(Document {
            api_version: API_VERSION.into(),
            kind,
            metadata: ObjectMeta {
                name: Id::parse(name).map_err(|e| invalid("name", e.to_string()))?,
                labels,
                annotations,
                version: Some(version),
                generation: Some(book.generation),
            },
            spec,
            status,
        })
    }
}
