//! Releases: checked whole before anything is applied (selectors, variables against each
//! cell's template, one active release per cell), stored with each wave's cells and what
//! they run now, and rolled out by a `release.rollout` job. Actions change the row; the job
//! reads it fresh on each pass.

use super::*;
use crate::persistence::{Progress, ReleaseRow};
use cellplane_api::releases::{
    Approval, CreateRelease, Release, ReleaseCell, ReleaseState, ReleaseWave, ReleaseWithJob,
    Selector, WaveSpec,
};

/// The default waves: canary cells, then pooled, then dedicated.
pub fn default_waves() -> Vec<WaveSpec> {
    let wave = |name: &str, selector: Selector| WaveSpec {
        name: Id::parse(name).expect("a valid identifier"),
        selector,
        max_parallel: 1,
        bake_seconds: 300,
        approval: Approval::Auto,
    };
    vec![
        wave(
            "canary",
            Selector {
                labels: [("canary".to_string(), "true".to_string())].into(),
                ..Default::default()
            },
        ),
        wave(
            "pooled",
            Selector {
                tier: Some(Tier::Pooled),
                ..Default::default()
            },
        ),
        wave(
            "dedicated",
            Selector {
                tier: Some(Tier::Dedicated),
                ..Default::default()
            },
        ),
    ]
}

fn matches(sel: &Selector, c: &Cell) -> bool {
    sel.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v))
        && sel.tier.is_none_or(|t| t == c.tier)
        && sel.region.as_ref().is_none_or(|r| r.as_str() == c.region)
        && sel
            .cells
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|i| i.as_str() == c.cell_id))
}

pub fn release_to_wire(r: ReleaseRow) -> Release {
    Release {
        release_id: r.release_id,
        app_version: r.spec.app_version,
        vars: r.spec.vars,
        state: r.state,
        gates: r.spec.gates,
        rollback: r.spec.rollback,
        freeze_windows: r.spec.freeze_windows,
        waves: r.waves,
        decisions: r.decisions,
        reason: r.reason,
        job_id: r.job_id,
        version: r.version,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// What an action on a release does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseAction {
    Pause,
    Resume,
    Approve,
    Abort,
    Retry,
    Skip,
}

impl ReleaseAction {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "approve" => Self::Approve,
            "abort" => Self::Abort,
            "retry" => Self::Retry,
            "skip" => Self::Skip,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Approve => "approve",
            Self::Abort => "abort",
            Self::Retry => "retry",
            Self::Skip => "skip",
        }
    }
}

impl Service {
    pub async fn create_release(
        &self,
        ctx: &Ctx,
        mut req: CreateRelease,
    ) -> Result<ReleaseWithJob> {
        let mut errors = Vec::new();
        validate_app_version(&req.app_version, &mut errors);
        validate_vars(&req.vars, &mut errors);
        let g = &req.gates;
        if !(1..=86_400).contains(&g.interval_secs) {
            errors.push(FieldError {
                field: "gates.interval_secs".into(),
                message: "must be between 1 and 86400".into(),
            });
        }
        if !(0..=3_600).contains(&g.settle_secs) {
            errors.push(FieldError {
                field: "gates.settle_secs".into(),
                message: "must be between 0 and 3600".into(),
            });
        }
        if !(1..=86_400).contains(&g.window_secs) {
            errors.push(FieldError {
                field: "gates.window_secs".into(),
                message: "must be between 1 and 86400".into(),
            });
        }
        if let Some(r) = g.max_error_ratio {
            if !(0.0..=1.0).contains(&r) {
                errors.push(FieldError {
                    field: "gates.max_error_ratio".into(),
                    message: "must be between 0 and 1".into(),
                });
            }
        }
        for (field, v) in [
            ("gates.slo_target", g.slo_target),
            ("gates.min_budget", g.min_budget),
        ] {
            if v.is_some_and(|v| !(v > 0.0 && v < 1.0)) {
                errors.push(FieldError {
                    field: field.into(),
                    message: "must be between 0 and 1 (exclusive)".into(),
                });
            }
        }
        if g.min_budget.is_some() != g.slo_target.is_some() {
            errors.push(FieldError {
                field: "gates.min_budget".into(),
                message: "the budget gate needs both slo_target and min_budget".into(),
            });
        }
        if let Some(l) = &g.latency {
            if !(l.percentile > 0.0 && l.percentile < 1.0) {
                errors.push(FieldError {
                    field: "gates.latency.percentile".into(),
                    message: "must be between 0 and 1 (exclusive)".into(),
                });
            }
            if !(l.max_ms > 0.0 && l.max_ms.is_finite()) {
                errors.push(FieldError {
                    field: "gates.latency.max_ms".into(),
                    message: "must be a positive number".into(),
                });
            }
        }
        if let Some(b) = &g.burn_rate {
            if !(b.slo_target > 0.0 && b.slo_target < 1.0) {
                errors.push(FieldError {
                    field: "gates.burn_rate.slo_target".into(),
                    message: "must be between 0 and 1 (exclusive)".into(),
                });
            }
            if b.latency_threshold_ms
                .is_some_and(|t| !(t > 0.0 && t.is_finite()))
            {
                errors.push(FieldError {
                    field: "gates.burn_rate.latency_threshold_ms".into(),
                    message: "must be a positive number".into(),
                });
            }
            if b.rules.is_empty() {
                errors.push(FieldError {
                    field: "gates.burn_rate.rules".into(),
                    message: "must not be empty".into(),
                });
            }
            for (i, r) in b.rules.iter().enumerate() {
                if r.short_secs == 0 || r.long_secs < r.short_secs || r.long_secs > 30 * 86_400 {
                    errors.push(FieldError {
                        field: format!("gates.burn_rate.rules[{i}]"),
                        message: "needs 0 < short_secs <= long_secs <= 2592000".into(),
                    });
                }
                if !(r.factor > 0.0 && r.factor.is_finite()) {
                    errors.push(FieldError {
                        field: format!("gates.burn_rate.rules[{i}].factor"),
                        message: "must be a positive number".into(),
                    });
                }
            }
        }
        if let Some(b) = &g.baseline {
            if !(b.confidence > 0.5 && b.confidence < 1.0) {
                errors.push(FieldError {
                    field: "gates.baseline.confidence".into(),
                    message: "must be between 0.5 and 1 (exclusive)".into(),
                });
            }
            if !(b.percentile > 0.0 && b.percentile < 1.0) {
                errors.push(FieldError {
                    field: "gates.baseline.percentile".into(),
                    message: "must be between 0 and 1 (exclusive)".into(),
                });
            }
            if b.min_samples < 2 {
                errors.push(FieldError {
                    field: "gates.baseline.min_samples".into(),
                    message: "must be at least 2".into(),
                });
            }
            if b.step_secs == 0 || b.step_secs as i64 > g.window_secs {
                errors.push(FieldError {
                    field: "gates.baseline.step_secs".into(),
                    message: "must be between 1 and gates.window_secs".into(),
                });
            }
        }
        for (i, f) in req.freeze_windows.iter().enumerate() {
            let start = crate::persistence::parse_time(&f.start);
            let end = crate::persistence::parse_time(&f.end);
            for (what, v) in [("start", start), ("end", end)] {
                if v.is_none() {
                    errors.push(FieldError {
                        field: format!("freeze_windows[{i}].{what}"),
                        message: "must be an RFC 3339 time".into(),
                    });
                }
            }
            if let (Some(s), Some(e)) = (start, end) {
                if e <= s {
                    errors.push(FieldError {
                        field: format!("freeze_windows[{i}].end"),
                        message: "must be after start".into(),
                    });
                }
            }
            if let Some(r) = &f.reason {
                crate::validate::validate_text(
                    &format!("freeze_windows[{i}].reason"),
                    r,
                    200,
                    &mut errors,
                );
            }
        }
        let waves = req.waves.clone().unwrap_or_else(default_waves);
        let explicit = req.waves.is_some();
        if waves.is_empty() {
            errors.push(FieldError {
                field: "waves".into(),
                message: "must not be empty".into(),
            });
        }
        for (i, w) in waves.iter().enumerate() {
            if w.bake_seconds < 0 || w.bake_seconds > 7 * 86_400 {
                errors.push(FieldError {
                    field: format!("waves[{i}].bake_seconds"),
                    message: "must be between 0 and 604800".into(),
                });
            }
            if w.max_parallel == 0 || w.max_parallel > 1000 {
                errors.push(FieldError {
                    field: format!("waves[{i}].max_parallel"),
                    message: "must be between 1 and 1000".into(),
                });
            }
            if waves[..i].iter().any(|o| o.name == w.name) {
                errors.push(FieldError {
                    field: format!("waves[{i}].name"),
                    message: format!("wave {:?} is named twice", w.name.as_str()),
                });
            }
        }
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        // Each cell goes in the first wave whose selector takes it.
        let cells: Vec<Cell> = self
            .shared
            .store
            .all_cells()
            .await?
            .into_iter()
            .filter(|c| c.state == CellState::Active)
            .collect();
        let mut taken = std::collections::HashSet::new();
        let mut planned = Vec::new();
        for (i, w) in waves.iter().enumerate() {
            let mut members = Vec::new();
            for c in &cells {
                if matches(&w.selector, c) && taken.insert(c.cell_id.clone()) {
                    members.push(c.clone());
                }
            }
            if members.is_empty() && explicit {
                errors.push(FieldError {
                    field: format!("waves[{i}].selector"),
                    message: "matches no active cell (or only cells of earlier waves)".into(),
                });
            }
            if !members.is_empty() || explicit {
                planned.push((w.clone(), members));
            }
        }
        if planned.iter().all(|(_, m)| m.is_empty()) && errors.is_empty() {
            errors.push(FieldError {
                field: "waves".into(),
                message: "no active cell matches any wave".into(),
            });
        }
        // The release's variables must be valid for every cell it takes.
        for (_, members) in &planned {
            for c in members {
                let template = self.load_template(&c.template, "template")?;
                let mut merged = crate::jobs::user_vars_of(c, Some(&template));
                merged.extend(req.vars.clone());
                if let Err(errs) = template.validate_vars(&merged) {
                    for e in errs {
                        let field = format!("vars.{}", e.field.trim_start_matches("vars."));
                        if !errors.iter().any(|x| x.field == field) {
                            errors.push(FieldError {
                                field,
                                message: format!(
                                    "{} (cell {}, template {})",
                                    e.message, c.cell_id, c.template
                                ),
                            });
                        }
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        req.waves = Some(waves);
        let ts = persistence::now();
        let row_waves: Vec<ReleaseWave> = planned
            .iter()
            .map(|(w, members)| ReleaseWave {
                name: w.name.as_str().to_string(),
                state: "pending".into(),
                approval: w.approval,
                max_parallel: w.max_parallel,
                bake_seconds: w.bake_seconds,
                cells: members
                    .iter()
                    .map(|c| ReleaseCell {
                        cell_id: c.cell_id.clone(),
                        state: "pending".into(),
                        from_version: c.app_version.clone(),
                        to_version: req.app_version.clone(),
                        from_vars: BTreeMap::new(),
                        job_id: None,
                        error: None,
                    })
                    .collect(),
                bake_started_at: None,
            })
            .collect();
        let mut tx = self.shared.store.write().await?;
        if tx.get_release_tx(req.release_id.as_str()).await?.is_some() {
            return Err(ServiceError::Conflict(format!(
                "release {:?} already exists",
                req.release_id.as_str()
            )));
        }
        // At most one active release per cell.
        let mine: std::collections::HashSet<&str> = row_waves
            .iter()
            .flat_map(|w| w.cells.iter().map(|c| c.cell_id.as_str()))
            .collect();
        for other in tx.active_releases_tx().await? {
            let shared: Vec<&str> = other
                .waves
                .iter()
                .flat_map(|w| w.cells.iter().map(|c| c.cell_id.as_str()))
                .filter(|c| mine.contains(c))
                .collect();
            if !shared.is_empty() {
                return Err(ServiceError::Conflict(format!(
                    "release {:?} is {} on cells {}: one active release per cell",
                    other.release_id,
                    other.state.as_str(),
                    shared.join(", ")
                )));
            }
        }
        let spec = crate::jobs::release_rollout::RolloutSpec {
            release_id: req.release_id.as_str().to_string(),
        };
        let job = crate::jobs::enqueue::<crate::jobs::release_rollout::ReleaseRollout>(
            &mut tx,
            &spec,
            self.shared.settings.job_max_attempts,
            Some(&ctx.correlation_id),
        )
        .await?;
        let row = ReleaseRow {
            release_id: req.release_id.as_str().to_string(),
            spec: req.clone(),
            state: ReleaseState::Running,
            waves: row_waves,
            progress: Progress {
                phase: "apply".into(),
                ..Default::default()
            },
            decisions: Vec::new(),
            reason: None,
            job_id: Some(job.job_id.clone()),
            version: 1,
            created_at: ts.clone(),
            updated_at: ts,
        };
        tx.insert_release(&row).await?;
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: "RELEASE_CREATED",
            actor: &ctx.actor,
            target: &format!("release/{}", row.release_id),
            payload: json!({"app_version": req.app_version, "vars": req.vars,
                            "waves": row.waves.iter().map(|w| json!({"name": w.name,
                                "cells": w.cells.iter().map(|c| &c.cell_id).collect::<Vec<_>>()}))
                                .collect::<Vec<_>>(),
                            "gates": req.gates, "rollback": req.rollback, "job_id": job.job_id}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        self.shared.job_notify.notify_waiters();
        Ok(ReleaseWithJob {
            release: release_to_wire(row),
            job,
        })
    }

    pub async fn get_release(&self, id: &str) -> Result<Release> {
        self.shared
            .store
            .get_release(id)
            .await?
            .map(release_to_wire)
            .ok_or_else(|| not_found("release", id))
    }

    pub async fn list_releases(&self, before: &str, limit: i64) -> Result<Vec<Release>> {
        Ok(self
            .shared
            .store
            .list_releases(before, limit)
            .await?
            .into_iter()
            .map(release_to_wire)
            .collect())
    }

    /// pause, resume, approve, abort, retry (a failed cell), skip (an unavailable cell).
    pub async fn release_action(
        &self,
        ctx: &Ctx,
        id: &str,
        action: ReleaseAction,
        cell: Option<&str>,
    ) -> Result<Release> {
        let mut tx = self.shared.store.write().await?;
        let mut r = tx
            .get_release_tx(id)
            .await?
            .ok_or_else(|| not_found("release", id))?;
        let illegal = |why: &str| {
            Err(ServiceError::Conflict(format!(
                "cannot {} release {id:?} ({}): {why}",
                action.as_str(),
                r.state.as_str()
            )))
        };
        if !r.state.is_active() {
            return illegal("it has ended");
        }
        let mut detail = json!({});
        match action {
            ReleaseAction::Pause => {
                if r.state != ReleaseState::Running {
                    return illegal("only a running release pauses");
                }
                r.state = ReleaseState::Paused;
                r.reason = Some(format!("paused by {}", ctx.actor));
            }
            ReleaseAction::Resume => {
                if r.state != ReleaseState::Paused {
                    return illegal("only a paused release resumes");
                }
                r.state = ReleaseState::Running;
                r.reason = None;
                // A bake paused for inconclusive measurements starts its counts again.
                r.progress.tallies.clear();
            }
            ReleaseAction::Approve => {
                let w = r.progress.wave;
                let waiting = r
                    .waves
                    .get(w)
                    .is_some_and(|w| w.state == "awaiting_approval");
                if !waiting {
                    return illegal("no wave awaits approval");
                }
                r.progress.approved_wave = Some(w);
                r.state = ReleaseState::Running;
                r.reason = None;
                detail = json!({"wave": r.waves[w].name});
            }
            ReleaseAction::Abort => {
                if r.state == ReleaseState::RollingBack {
                    return illegal("it is already rolling back");
                }
                r.progress.aborting = true;
                r.progress.phase = "rollback".into();
                r.state = ReleaseState::RollingBack;
                r.reason = Some(format!("aborted by {}", ctx.actor));
            }
            ReleaseAction::Retry | ReleaseAction::Skip => {
                let Some(cell) = cell else {
                    return Err(invalid("cell_id", "required"));
                };
                let w = r.progress.wave;
                let Some(c) = r
                    .waves
                    .get_mut(w)
                    .and_then(|w| w.cells.iter_mut().find(|c| c.cell_id == cell))
                else {
                    return Err(invalid(
                        "cell_id",
                        format!("cell {cell:?} is not in the current wave"),
                    ));
                };
                if action == ReleaseAction::Retry {
                    if c.state != "failed" {
                        return Err(ServiceError::Conflict(format!(
                            "cell {cell:?} is {}: only a failed cell is retried",
                            c.state
                        )));
                    }
                    c.state = "pending".into();
                } else {
                    if !matches!(c.state.as_str(), "failed" | "pending") {
                        return Err(ServiceError::Conflict(format!(
                            "cell {cell:?} is {}: only a pending or failed cell is skipped",
                            c.state
                        )));
                    }
                    c.state = "skipped".into();
                }
                c.error = None;
                if r.state == ReleaseState::Paused {
                    r.state = ReleaseState::Running;
                    r.reason = None;
                }
                detail = json!({"cell_id": cell});
            }
        }
        if !tx.update_release(&mut r).await? {
            return Err(ServiceError::Conflict(format!(
                "release {id:?} changed concurrently; retry"
            )));
        }
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: &format!("RELEASE_{}", action.as_str().to_uppercase()),
            actor: &ctx.actor,
            target: &format!("release/{id}"),
            payload: json!({"state": r.state, "detail": detail}),
            correlation_id: Some(&ctx.correlation_id),
        })
        .await?;
        tx.commit().await?;
        self.shared.job_notify.notify_waiters();
        Ok(release_to_wire(r))
    }
}
