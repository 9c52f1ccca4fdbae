//! What the cell job kinds share: their spec, the run through the stamper (terraform) with
//! its progress reporter, and the end of a cell job on the cell. Each kind names its steps
//! and its end states in its own file.

use super::kind::{End, FinishCx, Finished, Next, StepCx, StepError};
use crate::ctx::{cell_target, Ctx};
use crate::error::{check_version, invalid, not_found, ServiceError};
use crate::iac::VarSource;
use crate::iac::{ExecEvent, IacError, RunCtx};
use crate::persistence::{self, AuditInput, CellSecrets, Store, StoreError, WriteTx};
use crate::shared::Shared;
use crate::stamping::{CellAction, CellEffect, StampError, PHASES};
use crate::validate::{
    load_template, validate_app_version, validate_capacity, validate_labels, validate_vars,
};
use cellplane_api::{Capacity, Cell, CellState, CellWithJob, CreateCell, Job, PatchCell};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The spec of every cell job: the cell, and the state it had when the job was requested
/// (what a job cancelled in the queue puts back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellSpec {
    pub cell_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_state: Option<CellState>,
}

/// What a cell job carries from its terraform run to its end. The effect holds secret
/// outputs, so it is never persisted: a job resumed after a crash re-plans from terraform's
/// state (which finds nothing to change) to get it again.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CellRun {
    #[serde(skip)]
    pub effect: Option<CellEffect>,
}

pub fn target(spec: &CellSpec) -> String {
    cell_target(&spec.cell_id)
}

pub fn locks(spec: &CellSpec) -> Vec<String> {
    vec![super::cell_resource(&spec.cell_id)]
}

/// Moves a cell whose job starts into its working state (`provisioning` for a stamp or the
/// repair of a failed cell); a job resumed after a crash finds it there already.
pub async fn begin(
    cx: &StepCx<'_>,
    spec: &CellSpec,
    action: CellAction,
) -> Result<Next, StepError> {
    let job = cx.job;
    let mut tx = cx.shared().store().write().await?;
    let Some(mut cell) = tx.get_cell_tx(&spec.cell_id).await? else {
        return Err(StepError::Fatal(format!("cell {} is gone", spec.cell_id)));
    };
    let to = match (action, cell.state) {
        (CellAction::Stamp, CellState::Pending) => CellState::Provisioning,
        (CellAction::Apply, CellState::Failed) => CellState::Provisioning,
        _ => return Ok(Next::Continue(format!("cell is {}", cell.state.as_str()))),
    };
    cell.state = to;
    cell.version += 1;
    if !tx.update_cell(&cell).await? {
        return Err(StepError::Retryable("the cell changed meanwhile".into()));
    }
    tx.audit(AuditInput {
        tenant_id: None,
        event_type: "CELL_PROVISIONING",
        actor: "system:jobs",
        target: &job.job.target,
        payload: json!({"job_id": job.job.job_id, "action": action.as_str()}),
        correlation_id: job.job.correlation_id.as_deref(),
    })
    .await?;
    tx.commit().await?;
    Ok(Next::Continue("cell is provisioning".into()))
}

/// Runs terraform for the cell through the stamper while a reporter task turns its events
/// into progress and log lines on the job.
pub async fn terraform(
    cx: &StepCx<'_>,
    spec: &CellSpec,
    state: &mut CellRun,
    action: CellAction,
) -> Result<Next, StepError> {
    let engine = cx.engine;
    let job = cx.job;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let reporter = tokio::spawn(report(
        engine.shared().store().clone(),
        engine.shared().job_changed.clone(),
        job.job.job_id.clone(),
        engine.owner().to_string(),
        rx,
        cx.detach.clone(),
    ));
    let ctx = RunCtx {
        cell_id: spec.cell_id.clone(),
        job_id: job.job.job_id.clone(),
        attempt: job.job.attempts,
        cancel: cx.cancel.clone(),
        detach: cx.detach.clone(),
        events: tx.clone(),
        secrets: Vec::new(),
    };
    if job.job.attempts > 1 {
        let _ = tx.send(ExecEvent::Log(format!(
            "attempt {}: re-planning from the recorded state",
            job.job.attempts
        )));
    }
    let result = engine.stamper().run(action, &spec.cell_id, &ctx).await;
    if let Err(e) = &result {
        let _ = tx.send(ExecEvent::Log(format!("error: {e}")));
    }
    drop(ctx);
    drop(tx);
    let _ = reporter.await;
    if cx.detach.is_cancelled() {
        return Err(StepError::Abandoned);
    }
    match result {
        Ok(effect) => {
            if cx.cancel.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            state.effect = Some(effect);
            Ok(Next::Continue("terraform done".into()))
        }
        Err(StampError::Iac(IacError::Cancelled { .. })) => Err(StepError::Cancelled),
        Err(StampError::Iac(IacError::Detached { .. })) => Err(StepError::Abandoned),
        Err(StampError::Iac(IacError::Terraform {
            lock_busy: true,
            diagnostics,
            phase,
        })) => Err(StepError::Retryable(format!(
            "terraform {phase}: {diagnostics}"
        ))),
        Err(StampError::Store(e)) => Err(StepError::Retryable(e.to_string())),
        Err(StampError::Failpoint(name)) => Err(StepError::Retryable(format!("failpoint {name}"))),
        Err(e) => Err(StepError::Fatal(e.to_string())),
    }
}

/// Applies the end of a cell job to the cell inside the job's final transaction: its new
/// state, outputs and secrets, or its drift, and the audit record. Also used when a queued
/// job is cancelled before it ran (`effect` is then None).
pub async fn finish(
    tx: &mut WriteTx,
    cx: &FinishCx<'_>,
    spec: &CellSpec,
    run: &CellRun,
    action: CellAction,
    end: &End,
) -> Result<Finished, StoreError> {
    let job = cx.job;
    let cell_id = spec.cell_id.as_str();
    let effect = run.effect.as_ref();
    let error = end.error();
    let Some(mut cell) = tx.get_cell_tx(cell_id).await? else {
        return Ok(Finished::default());
    };
    // A job that no longer holds the cell (it was released meanwhile) changes nothing.
    if tx
        .lock_holder(&super::cell_resource(cell_id))
        .await?
        .as_deref()
        != Some(job.job.job_id.as_str())
    {
        return Ok(Finished::default());
    }
    if action == CellAction::Plan {
        let Some(drift) = effect.and_then(|e| e.drift.as_ref()) else {
            return Ok(Finished::default());
        };
        let value = serde_json::to_value(drift).expect("drift serializes");
        tx.set_cell_drift(cell_id, &value).await?;
        let event = if drift.detected {
            "CELL_DRIFTED"
        } else {
            "CELL_DRIFT_CHECKED"
        };
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: event,
            actor: "system:jobs",
            target: &job.job.target,
            payload: json!({"job_id": job.job.job_id, "drift": value}),
            correlation_id: job.job.correlation_id.as_deref(),
        })
        .await?;
        return Ok(Finished::default());
    }
    let prior = spec.prior_state.unwrap_or(cell.state);
    // Cancelled before any attempt recorded progress: nothing was touched.
    let never_ran = *end == End::Cancelled
        && effect.is_none()
        && (job.job.attempts == 0 || job.job.step.is_none());
    let new_state = if never_ran && action != CellAction::Stamp {
        Some(prior)
    } else {
        action.end_state(*end == End::Succeeded, prior)
    };
    if let Some(s) = new_state {
        cell.state = s;
    }
    if let Some(e) = effect {
        cell.outputs = e.outputs.clone();
        if action == CellAction::Destroy {
            cell.outputs.clear();
            cell.drift = None;
        }
    }
    cell.version += 1;
    if !tx.update_cell(&cell).await? {
        return Err(StoreError::Corrupt(format!(
            "cell {cell_id} changed while its job finished"
        )));
    }
    if let Some(e) = effect {
        let mut secrets = tx.get_cell_secrets_tx(cell_id).await?.unwrap_or_default();
        secrets.outputs = if action == CellAction::Destroy {
            Default::default()
        } else {
            e.secret_outputs.clone()
        };
        tx.set_cell_secrets(cell_id, &secrets).await?;
    }
    let verb = action.as_str().to_uppercase();
    let event = match (action, end) {
        (CellAction::Stamp, End::Succeeded) => "CELL_STAMPED".to_string(),
        (CellAction::Apply, End::Succeeded) => "CELL_APPLIED".to_string(),
        (CellAction::Destroy, End::Succeeded) => "CELL_DESTROYED".to_string(),
        (_, End::Cancelled) => format!("CELL_{verb}_CANCELLED"),
        _ => format!("CELL_{verb}_FAILED"),
    };
    tx.audit(AuditInput {
        tenant_id: None,
        event_type: &event,
        actor: "system:jobs",
        target: &job.job.target,
        payload: json!({"job_id": job.job.job_id, "state": cell.state, "error": error,
                        "outputs": cell.outputs, "attempts": job.job.attempts}),
        correlation_id: job.job.correlation_id.as_deref(),
    })
    .await?;
    Ok(Finished::default())
}

/// Turns terraform's events into job progress and log text, flushed to the store at most
/// every 200 ms (and at the end). A lost lease stops the job: terraform is detached.
async fn report(
    store: Store,
    changed: Arc<tokio::sync::Notify>,
    job_id: String,
    owner: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<ExecEvent>,
    detach: CancellationToken,
) {
    let mut phase: &'static str = "render";
    let mut planned: u64 = 0;
    let mut applied: u64 = 0;
    let mut pending = String::new();
    let mut dirty = false;
    let flush_every = Duration::from_millis(200);
    let mut last_flush = std::time::Instant::now();
    let progress_of = |phase: &str, planned: u64, applied: u64| -> f64 {
        let idx = PHASES.iter().position(|(p, _)| *p == phase).unwrap_or(0);
        let start = PHASES[idx].1;
        if phase == "apply" && planned > 0 {
            let end = PHASES.get(idx + 1).map(|p| p.1).unwrap_or(1.0);
            start + (end - start) * (applied.min(planned) as f64 / planned as f64)
        } else {
            start
        }
    };
    loop {
        let timeout = flush_every.saturating_sub(last_flush.elapsed());
        let event = tokio::time::timeout(timeout, rx.recv()).await;
        let closed = matches!(event, Ok(None));
        match event {
            Ok(Some(ExecEvent::Log(line))) => {
                pending.push_str(&format!("{} {line}\n", persistence::now()));
                dirty = true;
            }
            Ok(Some(ExecEvent::Phase(p))) => {
                phase = p;
                dirty = true;
            }
            Ok(Some(ExecEvent::Planned(n))) => planned = n,
            Ok(Some(ExecEvent::Applied(n))) => {
                applied = n;
                dirty = true;
            }
            Ok(Some(ExecEvent::Heartbeat)) | Ok(None) | Err(_) => {}
        }
        if dirty && (closed || last_flush.elapsed() >= flush_every) {
            let progress = progress_of(phase, planned, applied);
            match store
                .job_progress(&job_id, &owner, progress, None, phase, &pending, None)
                .await
            {
                Ok(true) => {
                    pending.clear();
                    dirty = false;
                    changed.notify_waiters();
                }
                Ok(false) => detach.cancel(),
                Err(e) => tracing::warn!(error = %e, "recording job progress failed"),
            }
            last_flush = std::time::Instant::now();
        } else if !dirty {
            last_flush = std::time::Instant::now();
        }
        if closed {
            break;
        }
    }
}

// ------------------------------------------------------------ registering cells

/// Registers a cell (validated, its template's secrets and ports allocated) and enqueues
/// its stamp, in one transaction with the audit record. The API's `POST /v1/cells` and
/// placement (auto-stamped pooled cells, a tenant's dedicated cell) both come here.
pub async fn register_cell(
    shared: &Shared,
    ctx: &Ctx,
    req: CreateCell,
) -> crate::error::Result<CellWithJob> {
    let prepared = prepare_cell(shared, req)?;
    let mut tx = shared.store.write().await?;
    let out = register_cell_in(&mut tx, shared, ctx, prepared).await?;
    tx.commit().await?;
    shared.job_notify.notify_waiters();
    Ok(out)
}

/// A cell checked against its template, with its secrets drawn: what
/// [`register_cell_in`] writes.
pub struct PreparedCell {
    cell: Cell,
    secrets: CellSecrets,
    template: crate::iac::Template,
}

impl PreparedCell {
    pub fn cell(&self) -> &Cell {
        &self.cell
    }
}

/// Checks a cell registration (variables, capacity, template and tier) without writing.
pub fn prepare_cell(shared: &Shared, req: CreateCell) -> crate::error::Result<PreparedCell> {
    let mut errors = Vec::new();
    validate_labels(&req.labels, &mut errors);
    validate_vars(&req.vars, &mut errors);
    if let Some(v) = &req.app_version {
        validate_app_version(v, &mut errors);
    }
    validate_capacity("capacity", &req.capacity, &mut errors);
    if !errors.is_empty() {
        return Err(ServiceError::Validation(errors));
    }
    let template = load_template(
        &shared.settings.templates,
        req.template.as_str(),
        "template",
    )?;
    if !template.manifest.tiers.contains(&req.tier) {
        return Err(invalid(
            "tier",
            format!(
                "template {:?} does not support tier {}",
                template.name,
                req.tier.as_str()
            ),
        ));
    }
    template
        .validate_vars(&req.vars)
        .map_err(ServiceError::Validation)?;
    // Values the control plane supplies: allocated once, kept for the cell's life.
    // Ports are taken below, in the transaction that registers the cell.
    let mut secrets = CellSecrets::default();
    for (name, spec) in &template.manifest.variables {
        if spec.source == Some(VarSource::Secret) {
            secrets
                .vars
                .insert(name.clone(), json!(crate::auth::new_secret()));
        }
    }
    let ts = persistence::now();
    let cell = Cell {
        cell_id: req.cell_id.into_string(),
        region: req.region.into_string(),
        tier: req.tier,
        template: req.template.into_string(),
        capacity: req.capacity,
        used: Capacity::default(),
        labels: req.labels,
        vars: req.vars,
        state: CellState::Pending,
        outputs: BTreeMap::new(),
        app_version: req.app_version,
        drift: None,
        pending_job_id: None,
        version: 1,
        created_at: ts.clone(),
        updated_at: ts,
    };
    Ok(PreparedCell {
        cell,
        secrets,
        template,
    })
}

/// Registers a prepared cell and enqueues its stamp in `tx` (the caller commits and
/// wakes the workers).
pub async fn register_cell_in(
    tx: &mut WriteTx,
    shared: &Shared,
    ctx: &Ctx,
    prepared: PreparedCell,
) -> crate::error::Result<CellWithJob> {
    let PreparedCell {
        mut cell,
        secrets,
        template,
    } = prepared;
    let mut chosen = std::collections::HashSet::new();
    for (name, spec) in &template.manifest.variables {
        if spec.source == Some(VarSource::Port) {
            let port =
                take_port(tx, shared.settings.port_range, &cell.cell_id, name, &chosen).await?;
            chosen.insert(port);
            cell.vars.insert(name.clone(), json!(port));
        }
    }
    if let Err(e) = tx.insert_cell(&cell).await {
        if e.is_unique_violation() {
            return Err(ServiceError::Conflict(format!(
                "cell {:?} already exists",
                cell.cell_id
            )));
        }
        return Err(e.into());
    }
    tx.set_cell_secrets(&cell.cell_id, &secrets).await?;
    let target = cell_target(&cell.cell_id);
    let job = enqueue_cell_job(
        tx,
        shared.settings.job_max_attempts,
        ctx,
        &mut cell,
        CellAction::Stamp,
    )
    .await?;
    let job_id = job.job_id.clone();
    tx.audit(AuditInput {
        tenant_id: None,
        event_type: "CELL_REGISTERED",
        actor: &ctx.actor,
        target: &target,
        payload: json!({"region": cell.region, "tier": cell.tier, "template": cell.template,
                        "capacity": cell.capacity, "labels": cell.labels,
                        "app_version": cell.app_version, "job_id": job_id}),
        correlation_id: Some(&ctx.correlation_id),
    })
    .await?;
    Ok(CellWithJob {
        cell,
        job: Some(job),
    })
}

/// A free port for variable `var` of the cell being registered in `tx`. The
/// `cell_ports` key refuses a port that a concurrent creation took first; then another
/// is picked from a fresh view.
async fn take_port(
    tx: &mut WriteTx,
    port_range: (u16, u16),
    cell_id: &str,
    var: &str,
    chosen: &std::collections::HashSet<u16>,
) -> crate::error::Result<u16> {
    for _ in 0..16 {
        let mut taken = tx.cell_ports_taken(var).await?;
        taken.extend(chosen);
        let port = crate::iac::allocate_port(port_range, &taken)
            .map_err(|e| ServiceError::Unavailable(format!("cannot allocate a port: {e}")))?;
        if tx.take_cell_port(port, cell_id, var).await? {
            return Ok(port);
        }
    }
    Err(ServiceError::Unavailable(
        "cannot allocate a port: concurrent creations took every candidate".into(),
    ))
}

/// Reserves the cell for a job of `action` and enqueues it, inside `tx`.
pub async fn enqueue_cell_job(
    tx: &mut WriteTx,
    max_attempts: i64,
    ctx: &Ctx,
    cell: &mut Cell,
    action: CellAction,
) -> crate::error::Result<Job> {
    let spec = CellSpec {
        cell_id: cell.cell_id.clone(),
        prior_state: Some(cell.state),
    };
    let max = max_attempts;
    let corr = Some(ctx.correlation_id.as_str());
    use super::{cell_apply, cell_destroy, cell_plan, cell_stamp, enqueue};
    let job = match action {
        CellAction::Stamp => enqueue::<cell_stamp::CellStamp>(tx, &spec, max, corr).await?,
        CellAction::Apply => enqueue::<cell_apply::CellApply>(tx, &spec, max, corr).await?,
        CellAction::Destroy => enqueue::<cell_destroy::CellDestroy>(tx, &spec, max, corr).await?,
        CellAction::Plan => enqueue::<cell_plan::CellPlan>(tx, &spec, max, corr).await?,
    };
    cell.pending_job_id = Some(job.job_id.clone());
    Ok(job)
}

/// The writes of a cell's `PATCH` in the caller's transaction (fields already checked on
/// their own): the service's, the manifests' and the release rollout's.
pub async fn patch_cell_in(
    shared: &Shared,
    tx: &mut persistence::WriteTx,
    ctx: &Ctx,
    id: &str,
    if_match: Option<i64>,
    patch: PatchCell,
) -> crate::error::Result<(Cell, Option<Job>)> {
    let mut cell = tx
        .get_cell_tx(id)
        .await?
        .ok_or_else(|| not_found("cell", id))?;
    check_version(if_match, cell.version)?;
    if matches!(cell.state, CellState::Destroying | CellState::Destroyed) {
        return Err(ServiceError::Conflict(format!(
            "cell {id:?} is {} and cannot change",
            cell.state.as_str()
        )));
    }
    // Variables are validated against the template; the managed ones are kept.
    let template = load_template(&shared.settings.templates, &cell.template, "template")?;
    let new_vars = match &patch.vars {
        Some(v) => {
            template
                .validate_vars(v)
                .map_err(ServiceError::Validation)?;
            let mut merged = v.clone();
            for (name, spec) in &template.manifest.variables {
                if spec.source.is_some() {
                    if let Some(val) = cell.vars.get(name) {
                        merged.insert(name.clone(), val.clone());
                    }
                }
            }
            Some(merged)
        }
        None => None,
    };
    let spec_changes = new_vars.as_ref().is_some_and(|v| *v != cell.vars)
        || patch
            .app_version
            .as_ref()
            .is_some_and(|v| cell.app_version.as_ref() != Some(v));
    if spec_changes {
        if let Some(job) = &cell.pending_job_id {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} has job {job} in progress; change its vars or app_version after it ends"
            )));
        }
        if !matches!(
            cell.state,
            CellState::Active | CellState::Draining | CellState::Drained | CellState::Failed
        ) {
            return Err(ServiceError::Conflict(format!(
                "cell {id:?} is {}: vars and app_version change on stamped cells",
                cell.state.as_str()
            )));
        }
    }
    let registry_changes = patch.capacity.is_some_and(|c| c != cell.capacity)
        || patch.labels.as_ref().is_some_and(|l| *l != cell.labels);
    if let Some(c) = patch.capacity {
        if c.tenants < cell.used.tenants || c.units < cell.used.units {
            return Err(invalid(
                "capacity",
                format!(
                    "must not be below what is in use ({} tenants, {} units)",
                    cell.used.tenants, cell.used.units
                ),
            ));
        }
        cell.capacity = c;
    }
    if let Some(l) = patch.labels.clone() {
        cell.labels = l;
    }
    if let Some(v) = new_vars {
        cell.vars = v;
    }
    if let Some(v) = patch.app_version.clone() {
        cell.app_version = Some(v);
    }
    let job = if spec_changes {
        Some(
            crate::jobs::enqueue_cell_job(
                tx,
                shared.settings.job_max_attempts,
                ctx,
                &mut cell,
                CellAction::Apply,
            )
            .await?,
        )
    } else {
        None
    };
    if spec_changes || registry_changes {
        tx.bump_generation(cellplane_api::manifests::Kind::Cell, id, None)
            .await?;
    }
    cell.version += 1;
    if !tx.update_cell(&cell).await? {
        return Err(ServiceError::PreconditionFailed {
            current: cell.version - 1,
        });
    }
    tx.audit(AuditInput {
        tenant_id: None,
        event_type: "CELL_UPDATED",
        actor: &ctx.actor,
        target: &cell_target(id),
        payload: json!({"changes": patch, "version": cell.version,
                        "job_id": job.as_ref().map(|j| j.job_id.clone())}),
        correlation_id: Some(&ctx.correlation_id),
    })
    .await?;
    Ok((cell, job))
}

/// A cell's own variables: those the control plane does not manage (what manifests and
/// releases speak of).
pub fn user_vars_of(
    cell: &Cell,
    template: Option<&crate::iac::Template>,
) -> BTreeMap<String, serde_json::Value> {
    let Some(t) = template else {
        return cell.vars.clone();
    };
    cell.vars
        .iter()
        .filter(|(k, _)| {
            t.manifest
                .variables
                .get(*k)
                .is_none_or(|spec| spec.source.is_none())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
