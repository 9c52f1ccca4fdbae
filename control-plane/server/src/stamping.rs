//! Cell lifecycle jobs: `cell.stamp`, `cell.apply`, `cell.destroy` and `cell.plan` (drift
//! check). Each run renders the cell's stack from the registry, waits for any terraform an
//! earlier attempt left running, then `init` → `plan` → `apply` (or a refresh-only plan for
//! drift) through [`crate::iac`]. Every run starts from the top and re-plans from the
//! state, so a resumed or retried job never repeats work terraform already recorded.
//!
//! It reads the registry but never writes it: the job engine commits the effect together
//! with the job's end.

use crate::failpoints::{Action, Failpoints};
use crate::iac::{
    self, Catalog, ExecEvent, IacError, PlanMode, RenderInput, RunCtx, SystemValues, Terraform,
};
use crate::persistence::{Store, StoreError};
use cellplane_api::{Cell, CellState, DriftStatus};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

/// What a cell job does; the job kind is `cell.<action>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellAction {
    Stamp,
    Apply,
    Destroy,
    Plan,
}

impl CellAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CellAction::Stamp => "stamp",
            CellAction::Apply => "apply",
            CellAction::Destroy => "destroy",
            CellAction::Plan => "plan",
        }
    }
    pub fn kind(self) -> String {
        format!("cell.{}", self.as_str())
    }
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "cell.stamp" => Some(Self::Stamp),
            "cell.apply" => Some(Self::Apply),
            "cell.destroy" => Some(Self::Destroy),
            "cell.plan" => Some(Self::Plan),
            _ => None,
        }
    }
    /// Whether the job reserves the cell (`pending_job_id`). Drift checks do not: they
    /// only read, and the one-running-job-per-target rule keeps them apart from the rest.
    pub fn reserves(self) -> bool {
        !matches!(self, CellAction::Plan)
    }

    /// The cell's state when a job of this action ends in `outcome`, given the state it had
    /// when the job was requested. `None`: unchanged.
    pub fn end_state(self, succeeded: bool, prior: CellState) -> Option<CellState> {
        match (self, succeeded) {
            (CellAction::Plan, _) => None,
            (CellAction::Stamp, true) => Some(CellState::Active),
            (CellAction::Apply, true) => Some(if prior == CellState::Draining {
                CellState::Draining
            } else {
                CellState::Active
            }),
            (CellAction::Destroy, true) => Some(CellState::Destroyed),
            (_, false) => Some(CellState::Failed),
        }
    }
}

/// The phases of a run, with the share of the job's progress reached when each starts.
pub const PHASES: &[(&str, f64)] = &[
    ("render", 0.02),
    ("init", 0.05),
    ("plan", 0.12),
    ("apply", 0.2),
    ("outputs", 0.96),
];

#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error(transparent)]
    Iac(#[from] IacError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    /// A test failpoint asked for a retryable failure.
    #[error("failpoint {0}")]
    Failpoint(String),
}

/// What a successful run changes on the cell.
#[derive(Debug, Clone, Default)]
pub struct CellEffect {
    pub outputs: BTreeMap<String, Value>,
    pub secret_outputs: BTreeMap<String, Value>,
    pub drift: Option<DriftStatus>,
}

/// Reports a phase to the job engine.
fn phase(ctx: &RunCtx, name: &'static str) {
    let _ = ctx.events.send(ExecEvent::Log(format!("== {name}")));
    let _ = ctx.events.send(ExecEvent::Phase(name));
}

#[derive(Clone)]
pub struct Stamper {
    store: Store,
    catalog: Catalog,
    tf: Terraform,
    sample_cell_bin: Option<PathBuf>,
    /// One run per cell at a time in this process. A worker whose lease expired (a
    /// stalled process) may not have noticed yet when another worker re-claims the job:
    /// the new attempt waits here until the old one stops, then for any terraform it left
    /// running (pid file), so two attempts never drive one cell's terraform at once.
    cell_locks: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    failpoints: Failpoints,
}

impl Stamper {
    pub fn new(
        store: Store,
        catalog: Catalog,
        tf: Terraform,
        sample_cell_bin: Option<PathBuf>,
    ) -> Self {
        Self {
            store,
            catalog,
            tf,
            sample_cell_bin,
            cell_locks: Default::default(),
            failpoints: Failpoints::default(),
        }
    }

    /// Stops runs at named phases (`cell.stamp/apply`, …) in tests; see [`crate::failpoints`].
    pub fn with_failpoints(mut self, failpoints: Failpoints) -> Self {
        self.failpoints = failpoints;
        self
    }

    /// Reports a phase and applies a failpoint configured for it.
    async fn phase(
        &self,
        action: CellAction,
        ctx: &RunCtx,
        name: &'static str,
    ) -> Result<(), StampError> {
        phase(ctx, name);
        let point = format!("{}/{name}", action.kind());
        match self.failpoints.hit(&point, ctx.attempt) {
            None | Some(Action::Kill) | Some(Action::Stop) => Ok(()),
            Some(Action::Error) => Err(StampError::Failpoint(point)),
            Some(Action::Fatal) => Err(StampError::Invalid(format!("failpoint {point}"))),
            Some(Action::Wait) | Some(Action::Pause) => {
                tokio::select! {
                    _ = ctx.cancel.cancelled() => Err(IacError::Cancelled { phase: name }.into()),
                    _ = ctx.detach.cancelled() => Err(IacError::Detached { phase: name }.into()),
                }
            }
        }
    }

    fn cell_lock(&self, cell_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.cell_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(cell_id.to_string()).or_default().clone()
    }

    pub fn terraform(&self) -> &Terraform {
        &self.tf
    }

    pub async fn run(
        &self,
        action: CellAction,
        cell_id: &str,
        ctx: &RunCtx,
    ) -> Result<CellEffect, StampError> {
        let lock = self.cell_lock(cell_id);
        let _running = match lock.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) => {
                let _ = ctx.events.send(ExecEvent::Log(
                    "waiting for an earlier attempt of this cell's job to stop".into(),
                ));
                tokio::select! {
                    g = lock.lock_owned() => g,
                    _ = ctx.detach.cancelled() => {
                        return Err(IacError::Detached { phase: "wait" }.into())
                    }
                    _ = ctx.cancel.cancelled() => {
                        return Err(IacError::Cancelled { phase: "wait" }.into())
                    }
                }
            }
        };
        let cell = self
            .store
            .get_cell(cell_id)
            .await?
            .ok_or_else(|| StampError::Invalid(format!("cell {cell_id} is gone")))?;
        if action == CellAction::Plan
            && !matches!(cell.state, CellState::Active | CellState::Draining)
        {
            let _ = ctx.events.send(ExecEvent::Log(format!(
                "cell is {}: no drift check",
                cell.state.as_str()
            )));
            return Ok(CellEffect::default());
        }
        self.phase(action, ctx, "render").await?;
        let secrets = self
            .store
            .get_cell_secrets(cell_id)
            .await?
            .unwrap_or_default();
        let (ctx, fingerprint) = self.render(&cell, &secrets.vars, ctx)?;
        let ctx = &ctx;
        self.tf.wait_leftover(ctx).await?;
        self.phase(action, ctx, "init").await?;
        self.tf.init(ctx, &fingerprint).await?;
        self.phase(action, ctx, "plan").await?;
        let mode = match action {
            CellAction::Destroy => PlanMode::Destroy,
            CellAction::Plan => PlanMode::Drift,
            _ => PlanMode::Apply,
        };
        let plan = self.tf.plan(ctx, mode).await?;
        if action == CellAction::Plan {
            let mut resources: Vec<String> =
                plan.planned.iter().map(|d| d.address.clone()).collect();
            resources.sort();
            resources.dedup();
            return Ok(CellEffect {
                drift: Some(DriftStatus {
                    detected: plan.changes,
                    resources,
                    checked_at: crate::persistence::now(),
                    job_id: ctx.job_id.clone(),
                }),
                ..Default::default()
            });
        }
        self.phase(action, ctx, "apply").await?;
        let mut outputs = None;
        if plan.changes {
            outputs = self.tf.apply(ctx).await?;
        } else {
            let _ = ctx
                .events
                .send(ExecEvent::Log("no changes: nothing to apply".into()));
        }
        if action == CellAction::Destroy {
            return Ok(CellEffect::default());
        }
        self.phase(action, ctx, "outputs").await?;
        let outputs = match outputs {
            Some(o) => o,
            None => self.tf.outputs(ctx).await?,
        };
        let template = self.catalog.load(&cell.template).map_err(IacError::from)?;
        for required in &template.manifest.required_outputs {
            if !outputs.contains_key(required) {
                return Err(StampError::Invalid(format!(
                    "the stack did not produce the required output {required:?}"
                )));
            }
        }
        let mut effect = CellEffect::default();
        for (k, v) in outputs {
            if v.sensitive {
                effect.secret_outputs.insert(k, v.value);
            } else {
                effect.outputs.insert(k, v.value);
            }
        }
        Ok(effect)
    }

    /// Renders and writes the cell's stack; returns the context with the stack's secrets
    /// added to what is redacted, and the fingerprint of the stack's configuration.
    fn render(
        &self,
        cell: &Cell,
        secret_vars: &BTreeMap<String, Value>,
        ctx: &RunCtx,
    ) -> Result<(RunCtx, String), StampError> {
        let template = self.catalog.load(&cell.template).map_err(IacError::from)?;
        let dir = self.tf.cell_dir(&cell.cell_id);
        let stack = template
            .render(&RenderInput {
                cell,
                secrets: secret_vars,
                system: SystemValues {
                    cell_dir: dir.join("run"),
                    sample_cell_bin: self.sample_cell_bin.clone(),
                },
                pg_backend: matches!(self.tf.backend(), iac::StateBackend::Pg { .. }),
            })
            .map_err(IacError::from)?;
        stack.write(&dir).map_err(|e| IacError::io(&dir, e))?;
        let mut ctx = ctx.clone();
        ctx.secrets.extend(stack.secrets.iter().cloned());
        for v in secret_vars.values() {
            if let Some(s) = v.as_str() {
                ctx.secrets.push(s.to_string());
            }
        }
        let _ = ctx.events.send(ExecEvent::Log(format!(
            "rendered template {} into {}",
            template.name,
            dir.display()
        )));
        Ok((ctx, stack.config_fingerprint()))
    }
}

/// Finds the `sample-cell` binary: the configured path, else next to this executable, else
/// on PATH.
pub fn find_sample_cell(configured: Option<&PathBuf>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return Some(p.clone());
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    {
        let p = dir.join("sample-cell");
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var("PATH").ok().and_then(|path| {
        path.split(':')
            .map(|d| PathBuf::from(d).join("sample-cell"))
            .find(|p| p.is_file())
    })
}
