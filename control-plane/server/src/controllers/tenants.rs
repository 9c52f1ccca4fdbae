//! The tenant controller: converges each tenant's actual state to its desired spec
//! (manifests and imperative calls write the same one) through the same jobs as the
//! imperative API, and writes `status` (`observedGeneration`, `phase`, conditions `Placed`,
//! `Routed`, `Ready`, and the drift it found).
//!
//! One pass looks at the tenants with a generation it has not observed or that are
//! unsettled and due; a job that held a tenant ends by making it due (the job engine), and
//! the end of a cell's job makes tenants waiting for capacity due. Every `sweep` it also
//! looks at every tenant, to find drift nobody announced (an environment's cell drained).
//! A failed convergence is retried with capped exponential backoff and shows as phase
//! `Failed` with the job and its error; it is never silent.

use super::{Action, Controller, ControllerCx, ReconcileError};
use crate::ctx::{tenant_target, Ctx};
use crate::error::ServiceError;
use crate::persistence::{self, EnvironmentRow, MoveFilter, TenantRow};
use crate::placement::{Preview, Previewed};
use cellplane_api::{
    Cell, CellState, Condition, Drift, LifecycleAction, MoveState, RouteMode, TenantState,
    TenantStatus,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

pub struct TenantController {
    /// First retry delay of a failed convergence; doubles up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often every tenant is looked at for drift.
    pub sweep: Duration,
    /// How often to look without a signal (other replicas' changes).
    pub poll: Duration,
    pub wake: Arc<Notify>,
    pub last_sweep: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// Most tenants one pass converges before it yields.
const BATCH: i64 = 500;

impl Controller for TenantController {
    const NAME: &'static str = "tenant";

    fn resync(&self) -> Duration {
        self.poll
    }

    fn wake(&self) -> Option<Arc<Notify>> {
        Some(self.wake.clone())
    }

    async fn reconcile(&self, cx: &ControllerCx<'_>) -> Result<Action, ReconcileError> {
        let store = cx.service.store();
        let now = persistence::fmt_time(cx.clock.now());
        let mut ids = store.tenants_to_reconcile(&now, BATCH).await?;
        let more = ids.len() as i64 == BATCH;
        let sweep_due = {
            let mut last = self.last_sweep.lock().expect("not poisoned");
            let due = last.is_none_or(|t| t.elapsed() >= self.sweep);
            if due {
                *last = Some(tokio::time::Instant::now());
            }
            due
        };
        if sweep_due {
            let mut after = String::new();
            loop {
                let page = store.tenant_ids_after(&after, 1000).await?;
                let n = page.len();
                if let Some(last) = page.last() {
                    after = last.clone();
                }
                ids.extend(page);
                if n < 1000 {
                    break;
                }
            }
            ids.sort();
            ids.dedup();
        }
        if ids.is_empty() {
            return Ok(Action::AwaitChange);
        }
        let mut pass = Pass::new(cx).await?;
        for id in ids {
            match pass.reconcile_one(self, &id).await {
                Ok(()) => {}
                Err(ReconcileError::Service(ServiceError::Fenced(_))) => {
                    return Err(ReconcileError::Deposed(Self::NAME))
                }
                Err(ReconcileError::Deposed(n)) => return Err(ReconcileError::Deposed(n)),
                Err(e) => {
                    tracing::warn!(tenant_id = %id, error = %e, "reconciling a tenant failed")
                }
            }
        }
        Ok(if more {
            Action::Requeue(Duration::ZERO)
        } else {
            Action::AwaitChange
        })
    }
}

/// What one pass shares: the cells and region policies (read once), for placement
/// previews and the drift of environments.
struct Pass<'a> {
    cx: &'a ControllerCx<'a>,
    cells: HashMap<String, Cell>,
    preview: Preview,
    ctx: Ctx,
}

fn cond(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: String::new(),
    }
}

/// What an error of a failed job means for the tenant's conditions.
fn classify(error: &str) -> &'static str {
    if error.contains("no capacity")
        || error.contains("has room")
        || error.contains("no active pooled cell")
    {
        "NoCapacity"
    } else if error.contains("residency") {
        "ResidencyViolation"
    } else {
        "JobFailed"
    }
}

fn next_action(from: TenantState, to: TenantState) -> Option<Result<LifecycleAction, ()>> {
    use TenantState::*;
    if from == to {
        return None;
    }
    Some(match (from, to) {
        (Draft, Active | Suspended) => Ok(LifecycleAction::Activate),
        (Active, Suspended) => Ok(LifecycleAction::Suspend),
        (Suspended, Active) => Ok(LifecycleAction::Resume),
        (Active | Suspended, Archived) => Ok(LifecycleAction::Archive),
        (Archived, Deleted) => Ok(LifecycleAction::Delete),
        _ => Err(()),
    })
}

impl<'a> Pass<'a> {
    async fn new(cx: &'a ControllerCx<'a>) -> Result<Pass<'a>, ReconcileError> {
        let store = cx.service.store();
        let cells: HashMap<String, Cell> = store
            .all_cells()
            .await?
            .into_iter()
            .map(|c| (c.cell_id.clone(), c))
            .collect();
        let policies: BTreeMap<_, _> = store
            .list_region_policies()
            .await?
            .into_iter()
            .map(|(r, p, _, _)| (r, p))
            .collect();
        let preview = Preview::new(cells.values().cloned().collect(), policies);
        Ok(Pass {
            cx,
            cells,
            preview,
            ctx: Ctx {
                actor: "system:tenant-controller".into(),
                correlation_id: persistence::new_id("corr"),
            },
        })
    }

    async fn reconcile_one(
        &mut self,
        ctl: &TenantController,
        id: &str,
    ) -> Result<(), ReconcileError> {
        let service = self.cx.service;
        let store = service.store();
        let Some(t) = store.get_tenant(id).await? else {
            return Ok(());
        };
        if t.state == TenantState::Deleted {
            return Ok(());
        }
        let envs = store.list_environments(id).await?;
        let now = self.cx.clock.now();
        let now_s = persistence::fmt_time(now);
        let previous = t.desired.status.clone().unwrap_or_default();
        let desired = t.desired_state();
        let actual = t.state;
        let moving = !store
            .list_moves(
                &MoveFilter {
                    tenant_id: Some(id.to_string()),
                    state: Some(MoveState::Running),
                    ..Default::default()
                },
                "",
                1,
            )
            .await?
            .is_empty();

        // What is: placement, routes, drift.
        let needs_cells = matches!(desired, TenantState::Active | TenantState::Suspended)
            || matches!(actual, TenantState::Active | TenantState::Suspended);
        let unplaced: Vec<&EnvironmentRow> = envs.iter().filter(|e| e.cell_id.is_none()).collect();
        let mut drift = Vec::new();
        let mut route_problems = Vec::new();
        let mut missing_route = None;
        let mut rate_mismatch = false;
        let expected_mode = match actual {
            TenantState::Active => Some(RouteMode::Serve),
            TenantState::Suspended => Some(RouteMode::Suspended),
            _ => None,
        };
        for e in &envs {
            if let Some(cell_id) = &e.cell_id {
                match self.cells.get(cell_id) {
                    None => drift.push(Drift {
                        field: format!("environments.{}.cell", e.name),
                        desired: "an active cell".into(),
                        actual: format!("cell {cell_id} is not registered"),
                    }),
                    Some(c)
                        if !matches!(c.state, CellState::Active)
                            && matches!(actual, TenantState::Active | TenantState::Suspended) =>
                    {
                        drift.push(Drift {
                            field: format!("environments.{}.cell", e.name),
                            desired: "an active cell".into(),
                            actual: format!("cell {cell_id} is {}", c.state.as_str()),
                        })
                    }
                    _ => {}
                }
            }
            let route = store.get_route(id, &e.name).await?;
            match (expected_mode, &route, &e.cell_id) {
                (Some(_), None, Some(_)) => {
                    route_problems.push(format!("{} has no route", e.name));
                    missing_route.get_or_insert(e.name.clone());
                }
                (Some(mode), Some(r), Some(cell)) => {
                    if r.mode == RouteMode::Hold && moving {
                        route_problems.push(format!("{} is held for a move", e.name));
                    } else if r.mode != mode {
                        drift.push(Drift {
                            field: format!("routes.{}.mode", e.name),
                            desired: mode.as_str().into(),
                            actual: r.mode.as_str().into(),
                        });
                    } else if &r.cell_id != cell && !moving {
                        drift.push(Drift {
                            field: format!("routes.{}.cell", e.name),
                            desired: cell.clone(),
                            actual: r.cell_id.clone(),
                        });
                    }
                    if r.rate_limit != t.quotas.api_rate_limit && r.mode != RouteMode::Hold {
                        rate_mismatch = true;
                    }
                }
                (None, Some(r), _) => drift.push(Drift {
                    field: format!("routes.{}", e.name),
                    desired: "no route".into(),
                    actual: format!("{} route to {}", r.mode.as_str(), r.cell_id),
                }),
                _ => {}
            }
        }

        // What to do. A new generation starts afresh: no backoff left from the old spec.
        let new_spec = t.desired.observed_generation != t.desired.generation;
        let mut failures = if new_spec {
            0
        } else {
            previous.retries.unwrap_or(0)
        };
        let mut last_failed = previous.last_failed_job.clone();
        let mut phase = "Ready";
        let mut placed = if !needs_cells {
            cond(
                "Placed",
                false,
                "NotRequested",
                format!("the tenant is {}", desired.as_str()),
            )
        } else if unplaced.is_empty() {
            cond(
                "Placed",
                true,
                "Placed",
                envs.iter()
                    .map(|e| format!("{} on {}", e.name, e.cell_id.as_deref().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        } else {
            cond(
                "Placed",
                false,
                "Pending",
                format!(
                    "not placed yet: {}",
                    unplaced
                        .iter()
                        .map(|e| e.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        };
        let mut ready_reason: Option<(String, String)> = None;
        let mut settled = false;
        let mut retry_at: Option<chrono::DateTime<chrono::Utc>> = None;
        let backoff = |n: i64| {
            let ms = (ctl.retry_base.as_millis() as u64)
                .saturating_mul(1u64 << (n.clamp(1, 16) - 1))
                .min(ctl.retry_max.as_millis() as u64);
            chrono::Duration::milliseconds(ms as i64)
        };
        let latest = store.latest_job_of(&tenant_target(id)).await?;
        // The newest job failed and this is the first time the controller sees it.
        let new_failure = latest.as_ref().and_then(|(job_id, kind, state, error)| {
            (matches!(state.as_str(), "failed" | "cancelled")
                && last_failed.as_deref() != Some(job_id.as_str()))
            .then(|| {
                (
                    job_id.clone(),
                    kind.clone(),
                    error.clone().unwrap_or_else(|| state.clone()),
                )
            })
        });
        let mut want: Option<Work> = None;
        if let Some(job) = &t.pending_job_id {
            phase = "Progressing";
            ready_reason = Some(("JobRunning".into(), format!("job {job} is running")));
            retry_at = Some(now + chrono::Duration::seconds(30));
        } else if moving {
            phase = "Progressing";
            ready_reason = Some((
                "MoveRunning".into(),
                "a move of the tenant is running".into(),
            ));
            retry_at = Some(now + chrono::Duration::seconds(30));
        } else {
            match next_action(actual, desired) {
                Some(Err(())) => {
                    phase = "Failed";
                    settled = true;
                    ready_reason = Some((
                        "IllegalTransition".into(),
                        format!(
                            "a {} tenant cannot become {}",
                            actual.as_str(),
                            desired.as_str()
                        ),
                    ));
                }
                Some(Ok(LifecycleAction::Delete)) => {
                    phase = "Progressing";
                    settled = true;
                    ready_reason = Some((
                        "DeleteRequested".into(),
                        "deletion was requested; it runs when retention allows".into(),
                    ));
                }
                Some(Ok(action)) => want = Some(Work::Lifecycle(action)),
                None => {
                    if actual == TenantState::Active && !unplaced.is_empty() {
                        want = Some(Work::Place(unplaced[0].name.clone()));
                    } else if actual == TenantState::Active {
                        if let Some(env) = &missing_route {
                            want = Some(Work::Place(env.clone()));
                        }
                    }
                }
            }
        }
        if let Some(work) = want {
            // A failed job is retried after a backoff, and shown meanwhile.
            let due = new_spec
                || previous
                    .next_retry_time
                    .as_deref()
                    .and_then(persistence::parse_time)
                    .is_none_or(|at| at <= now);
            if let Some((job_id, kind, error)) = &new_failure {
                failures += 1;
                last_failed = Some(job_id.clone());
                let reason = classify(error);
                phase = if reason == "NoCapacity" {
                    "Blocked"
                } else {
                    "Failed"
                };
                placed = if needs_cells && !unplaced.is_empty() {
                    cond(
                        "Placed",
                        false,
                        reason,
                        format!("job {job_id} ({kind}) failed: {error}"),
                    )
                } else {
                    placed
                };
                ready_reason = Some((
                    reason.into(),
                    format!("job {job_id} ({kind}) failed: {error}; retry {failures} is due then"),
                ));
                retry_at = Some(now + backoff(failures));
            } else if !due && last_failed.is_some() {
                phase = if previous.phase == "Blocked" {
                    "Blocked"
                } else {
                    "Failed"
                };
                ready_reason = previous
                    .condition("Ready")
                    .map(|c| (c.reason.clone(), c.message.clone()));
                placed = previous.condition("Placed").cloned().unwrap_or(placed);
                retry_at = previous
                    .next_retry_time
                    .as_deref()
                    .and_then(persistence::parse_time);
            } else {
                // Will the placement this work needs succeed now?
                let block = match &work {
                    Work::Lifecycle(LifecycleAction::Activate) | Work::Place(_) => {
                        let targets: Vec<&EnvironmentRow> = match &work {
                            Work::Place(env) => unplaced
                                .iter()
                                .copied()
                                .filter(|e| &e.name == env)
                                .collect(),
                            _ => unplaced.clone(),
                        };
                        self.preview_block(&t, &targets)
                    }
                    _ => None,
                };
                match block {
                    Some((reason, message)) => {
                        phase = "Blocked";
                        placed = cond("Placed", false, &reason, message.clone());
                        ready_reason = Some((reason, message));
                        failures = failures.max(1);
                        retry_at = Some(now + backoff(failures));
                    }
                    None => {
                        if self.cx.failpoint("enqueue").is_some() {
                            tracing::warn!("failpoint before a tenant controller enqueue");
                        }
                        let job = match &work {
                            Work::Lifecycle(action) => {
                                service
                                    .converge_tenant(&self.ctx, id, *action, self.cx.fence)
                                    .await
                            }
                            Work::Place(env) => {
                                service
                                    .converge_place(&self.ctx, id, env, self.cx.fence)
                                    .await
                            }
                        };
                        match job {
                            Ok(job) => {
                                tracing::info!(tenant_id = id, job_id = %job.job_id, kind = %job.kind,
                                    generation = t.desired.generation, "converging tenant");
                                phase = "Progressing";
                                ready_reason = Some((
                                    "JobRunning".into(),
                                    format!("job {} ({}) is running", job.job_id, job.kind),
                                ));
                                retry_at = Some(now + chrono::Duration::seconds(30));
                            }
                            // Someone else's job took the tenant meanwhile: look again.
                            Err(ServiceError::Conflict(msg)) => {
                                phase = "Progressing";
                                ready_reason = Some(("Conflict".into(), msg));
                                retry_at = Some(now + chrono::Duration::seconds(1));
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            }
        }
        if rate_mismatch && t.pending_job_id.is_none() && !moving {
            if let Some(mode) = expected_mode {
                service
                    .routing()
                    .republish_rate_limit(id, mode, &self.ctx.correlation_id)
                    .await?;
                tracing::info!(tenant_id = id, rate_limit = ?t.quotas.api_rate_limit,
                    "republished the tenant's routes with its rate limit");
            }
        }

        // The conditions.
        let routed = if !route_problems.is_empty() {
            cond("Routed", false, "RoutePending", route_problems.join("; "))
        } else if let Some(mode) = expected_mode {
            cond(
                "Routed",
                true,
                "Routed",
                format!("every placed environment has a {} route", mode.as_str()),
            )
        } else {
            cond(
                "Routed",
                true,
                "NoRoutes",
                format!("a {} tenant has no routes", actual.as_str()),
            )
        };
        if ready_reason.is_none() {
            if desired != actual {
                ready_reason = Some((
                    "Pending".into(),
                    format!("{} → {}", actual.as_str(), desired.as_str()),
                ));
                phase = "Progressing";
            } else if needs_cells && !unplaced.is_empty() && actual == TenantState::Active {
                ready_reason = Some(("Pending".into(), placed.message.clone()));
                phase = "Progressing";
            } else if routed.status != "True" {
                ready_reason = Some((routed.reason.clone(), routed.message.clone()));
                phase = "Progressing";
                // Nothing to start (e.g. a suspended tenant's route, restored on resume):
                // look again later, not on every pass.
                retry_at.get_or_insert(now + chrono::Duration::seconds(5));
            } else if !drift.is_empty() {
                ready_reason = Some((
                    "Drifted".into(),
                    drift
                        .iter()
                        .map(|d| format!("{}: {} (desired: {})", d.field, d.actual, d.desired))
                        .collect::<Vec<_>>()
                        .join("; "),
                ));
                phase = "Degraded";
                settled = true;
            }
        }
        let ready = match &ready_reason {
            None => {
                settled = true;
                failures = 0;
                last_failed = latest
                    .as_ref()
                    .filter(|(_, _, s, _)| s == "failed" || s == "cancelled")
                    .map(|(j, _, _, _)| j.clone())
                    .or(last_failed);
                retry_at = None;
                cond(
                    "Ready",
                    true,
                    "Converged",
                    format!("{} as desired", actual.as_str()),
                )
            }
            Some((reason, message)) => cond("Ready", false, reason, message.clone()),
        };
        if phase == "Ready" && ready.status != "True" {
            phase = "Progressing";
        }
        let mut conditions = vec![placed, routed, ready];
        for c in conditions.iter_mut() {
            c.last_transition_time = previous
                .condition(&c.type_)
                .filter(|p| p.status == c.status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now_s.clone());
        }
        let status = TenantStatus {
            observed_generation: t.desired.generation,
            phase: phase.into(),
            conditions,
            drift,
            retries: (failures > 0).then_some(failures),
            next_retry_time: retry_at.filter(|_| failures > 0).map(persistence::fmt_time),
            last_failed_job: last_failed,
        };
        let reconcile_after = if settled {
            None
        } else {
            retry_at.map(persistence::fmt_time)
        };
        if t.desired.status.as_ref() == Some(&status)
            && t.desired.observed_generation == t.desired.generation
            && t.desired.settled == settled
            && t.desired.reconcile_after == reconcile_after
        {
            return Ok(());
        }
        self.write_status(&t, &status, settled, reconcile_after.as_deref(), failures)
            .await
    }

    /// Why placing `targets` cannot start now (capacity, a cell still being stamped), if so.
    fn preview_block(
        &mut self,
        t: &TenantRow,
        targets: &[&EnvironmentRow],
    ) -> Option<(String, String)> {
        let units = t.quotas.units.unwrap_or(1).max(1);
        for e in targets {
            match self.preview.place(
                &t.tenant_id,
                t.profile,
                t.policies.data_residency,
                t.policies.allowed_regions.as_deref(),
                units,
                &e.name,
                &e.region,
            ) {
                Previewed::NoCapacity(why) => {
                    return Some(("NoCapacity".into(), format!("{}: {why}", e.name)))
                }
                Previewed::Cell {
                    cell_id,
                    ready: false,
                    ..
                } => {
                    return Some((
                        "WaitingForCell".into(),
                        format!(
                            "{}: cell {cell_id}, which has room, is not active yet",
                            e.name
                        ),
                    ))
                }
                _ => {}
            }
        }
        None
    }

    async fn write_status(
        &self,
        t: &TenantRow,
        status: &TenantStatus,
        settled: bool,
        reconcile_after: Option<&str>,
        failures: i64,
    ) -> Result<(), ReconcileError> {
        let f = self.cx.fence;
        let mut tx = self.cx.service.store().write().await?;
        if !tx.fence(f.name, &f.holder, f.term).await? {
            return Err(ReconcileError::Deposed(TenantController::NAME));
        }
        tx.write_tenant_status(
            &t.tenant_id,
            t.desired.generation,
            status,
            settled,
            reconcile_after,
            failures,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

enum Work {
    Lifecycle(LifecycleAction),
    Place(String),
}
