//! `release.rollout`: drives a release wave by wave. Its one step, `roll`, is a pass over
//! the release's row that does what is due and waits: apply the wave's cells (at most
//! `max_parallel` at once, each a `cell.apply` job enqueued in the transaction that records
//! it), bake them with the gates evaluated every interval from the cells' traffic read
//! fresh, then the next wave; on a failed gate, put back what the release changed (this
//! wave first, then earlier ones, in reverse). Everything it decides is on the row and in
//! the audit trail with its numbers, so a restarted process (or another replica) goes on
//! from where the row says.

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use super::release_gates::{self, Measured};
use super::tenant::NoState;
use crate::ctx::Ctx;
use crate::gates::{Limits, Measurement, Tally, Verdict};
use crate::persistence::{self, AuditInput, ReleaseRow, StoreError, WriteTx};
use crate::shared::Shared;
use cellplane_api::releases::{GateDecision, ReleaseState, RollbackPolicy};
use cellplane_api::{JobState, PatchCell};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub release_id: String,
}

pub struct ReleaseRollout;

impl Kind for ReleaseRollout {
    const NAME: &'static str = "release.rollout";
    type Spec = RolloutSpec;
    type State = NoState;

    fn target(spec: &RolloutSpec) -> String {
        format!("release/{}", spec.release_id)
    }
    /// The release only: its cells are held one at a time by their `cell.apply` jobs.
    fn locks(spec: &RolloutSpec) -> Vec<String> {
        vec![format!("release/{}", spec.release_id)]
    }
    fn steps(&self) -> Vec<&'static str> {
        vec!["roll"]
    }
    async fn step(
        &self,
        cx: &StepCx<'_>,
        spec: &RolloutSpec,
        _state: &mut NoState,
        _index: usize,
    ) -> Result<Next, StepError> {
        // A named point inside a wave's bake, for crash tests (`release.rollout/bake`).
        if let Ok(Some(r)) = cx.shared().store().get_release(&spec.release_id).await {
            if r.progress.phase == "bake" && r.state == ReleaseState::Running {
                let _ = cx
                    .engine
                    .failpoints()
                    .hit("release.rollout/bake", cx.job.job.attempts);
            }
        }
        tick(cx.shared(), spec, cx.correlation_id()).await
    }
    async fn finish(
        &self,
        tx: &mut WriteTx,
        cx: &FinishCx<'_>,
        spec: &RolloutSpec,
        _state: &NoState,
        end: &End,
    ) -> Result<Finished, StoreError> {
        // A rollout that ends without deciding (cancelled, out of attempts) leaves its
        // release failed, saying why; a decided one is already final.
        if *end != End::Succeeded {
            if let Some(mut r) = tx.get_release_tx(&spec.release_id).await? {
                if r.state.is_active() {
                    r.state = ReleaseState::Failed;
                    r.reason = Some(format!(
                        "the rollout job {} ended: {}",
                        cx.job.job.job_id,
                        end.error().unwrap_or("?")
                    ));
                    tx.update_release(&mut r).await?;
                }
            }
        }
        Ok(Finished::default())
    }
    /// A bake can last days; the release row says how long.
    fn wait_limit(&self, _shared: &Shared) -> Duration {
        Duration::from_secs(30 * 86_400)
    }
    fn wait_poll(&self, _shared: &Shared) -> Duration {
        Duration::from_millis(300)
    }
}

fn ctx_of(corr: Option<&str>) -> Ctx {
    Ctx {
        actor: "system:release".into(),
        correlation_id: corr
            .map(str::to_string)
            .unwrap_or_else(|| persistence::new_id("corr")),
    }
}

async fn audit(
    tx: &mut WriteTx,
    r: &ReleaseRow,
    event: &str,
    payload: serde_json::Value,
    corr: Option<&str>,
) -> Result<(), StoreError> {
    tx.audit(AuditInput {
        tenant_id: None,
        event_type: event,
        actor: "system:release",
        target: &format!("release/{}", r.release_id),
        payload,
        correlation_id: corr,
    })
    .await
    .map(|_| ())
}

/// What a pass answers when its write lost to another writer (an action): look again.
fn lost_race() -> Next {
    Next::Wait("the release changed; looking again".into())
}

/// Writes the release if it is still at its version, with its audit record, in one
/// transaction. False when another writer (an action) came first: the next pass reads it
/// again.
async fn save(
    shared: &Shared,
    r: &mut ReleaseRow,
    event: Option<(&str, serde_json::Value)>,
    corr: Option<&str>,
) -> Result<bool, StepError> {
    save_all(shared, r, event.into_iter().collect(), corr).await
}

/// [`save`] with any number of audit records.
async fn save_all(
    shared: &Shared,
    r: &mut ReleaseRow,
    events: Vec<(&str, serde_json::Value)>,
    corr: Option<&str>,
) -> Result<bool, StepError> {
    let mut tx = shared.store().write().await?;
    if !tx.update_release(r).await? {
        return Ok(false);
    }
    for (event, payload) in events {
        audit(&mut tx, r, event, payload, corr).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// One pass over the release.
async fn tick(shared: &Shared, spec: &RolloutSpec, corr: Option<&str>) -> Result<Next, StepError> {
    let store = shared.store();
    let Some(r) = store.get_release(&spec.release_id).await? else {
        return Err(StepError::Fatal(format!(
            "release {} is gone",
            spec.release_id
        )));
    };
    match r.state {
        ReleaseState::Succeeded
        | ReleaseState::Failed
        | ReleaseState::RolledBack
        | ReleaseState::Aborted => return Ok(Next::Done(format!("release {}", r.state.as_str()))),
        ReleaseState::Paused => {
            return Ok(Next::Wait(format!(
                "paused: {}",
                r.reason.as_deref().unwrap_or("")
            )))
        }
        ReleaseState::Running | ReleaseState::RollingBack => {}
    }
    let out = match r.progress.phase.as_str() {
        "apply" => apply(shared, r, corr).await?,
        "bake" => bake(shared, r, corr).await?,
        "rollback" => rollback(shared, r, corr).await?,
        other => {
            return Ok(Next::Done(format!("nothing to do in phase {other}")));
        }
    };
    Ok(out)
}

/// The job of a cell the release started: its state and error.
async fn job_state(
    shared: &Shared,
    job_id: &Option<String>,
) -> Result<Option<(JobState, Option<String>)>, StepError> {
    let Some(id) = job_id else {
        return Ok(None);
    };
    Ok(shared
        .store()
        .get_job(id)
        .await?
        .map(|j| (j.job.state, j.job.error.clone())))
}

async fn apply(shared: &Shared, mut r: ReleaseRow, corr: Option<&str>) -> Result<Next, StepError> {
    let store = shared.store();
    let w = r.progress.wave;
    if w >= r.waves.len() {
        r.state = ReleaseState::Succeeded;
        r.progress.phase = "done".into();
        r.reason = None;
        let payload = json!({"app_version": r.spec.app_version,
               "cells": r.waves.iter().flat_map(|w| w.cells.iter().map(|c| json!({"cell_id": c.cell_id, "state": c.state}))).collect::<Vec<_>>()});
        if !save(shared, &mut r, Some(("RELEASE_SUCCEEDED", payload)), corr).await? {
            return Ok(lost_race());
        }
        return Ok(Next::Done("every wave passed".into()));
    }
    // Start the wave (after its approval, when it needs one).
    if matches!(r.waves[w].state.as_str(), "pending" | "awaiting_approval") {
        let needs = r.waves[w].approval == cellplane_api::releases::Approval::Manual
            && r.progress.approved_wave != Some(w);
        let event = if needs {
            if r.waves[w].state == "awaiting_approval" {
                return Ok(Next::Wait("awaiting approval".into()));
            }
            r.waves[w].state = "awaiting_approval".into();
            r.state = ReleaseState::Paused;
            r.reason = Some(format!("wave {} awaits approval", r.waves[w].name));
            "RELEASE_WAVE_AWAITING_APPROVAL"
        } else {
            // No new wave starts inside a freeze window.
            if let Some(why) = frozen(&r, w, chrono::Utc::now()) {
                if r.reason.as_deref() != Some(why.as_str()) {
                    r.reason = Some(why.clone());
                    let payload = json!({"wave": r.waves[w].name, "reason": why});
                    if !save(shared, &mut r, Some(("RELEASE_WAVE_FROZEN", payload)), corr).await? {
                        return Ok(lost_race());
                    }
                }
                return Ok(Next::Wait(why));
            }
            // The budget of the wave's cells, read fresh, before anything is applied.
            if let Some(why) = budget_refusal(shared, &r, w).await {
                r.state = ReleaseState::Paused;
                r.reason = Some(why.clone());
                let payload = json!({"wave": r.waves[w].name, "reason": why});
                if !save(
                    shared,
                    &mut r,
                    Some(("RELEASE_WAVE_REFUSED", payload)),
                    corr,
                )
                .await?
                {
                    return Ok(lost_race());
                }
                return Ok(Next::Wait("the wave's error budget is spent".into()));
            }
            r.waves[w].state = "applying".into();
            r.reason = None;
            "RELEASE_WAVE_STARTED"
        };
        let payload = json!({"wave": r.waves[w].name,
               "cells": r.waves[w].cells.iter().map(|c| &c.cell_id).collect::<Vec<_>>()});
        if !save(shared, &mut r, Some((event, payload)), corr).await? {
            return Ok(lost_race());
        }
        return Ok(Next::Wait(format!("wave {} started", r.waves[w].name)));
    }
    // Cells being applied: their jobs' outcome, and the cell read fresh.
    let mut changed = false;
    for i in 0..r.waves[w].cells.len() {
        if r.waves[w].cells[i].state != "applying" {
            continue;
        }
        match job_state(shared, &r.waves[w].cells[i].job_id).await? {
            Some((JobState::Succeeded, _)) => {
                let cell = store.get_cell(&r.waves[w].cells[i].cell_id).await?;
                let c = &mut r.waves[w].cells[i];
                if cell.as_ref().and_then(|c| c.app_version.as_deref()) == Some(&c.to_version) {
                    c.state = "applied".into();
                } else {
                    c.state = "failed".into();
                    c.error = Some("applied, but the cell does not report the new version".into());
                }
                changed = true;
            }
            Some((JobState::Failed | JobState::Cancelled, err)) => {
                let c = &mut r.waves[w].cells[i];
                c.state = "failed".into();
                c.error = Some(err.unwrap_or_else(|| "the apply job failed".into()));
                changed = true;
            }
            _ => {}
        }
    }
    if let Some(failed) = r.waves[w].cells.iter().find(|c| c.state == "failed") {
        // A cell that cannot be applied pauses the release: retry it, skip it, or abort.
        let why = format!(
            "cell {} failed to apply: {}; retry or skip it, or abort the release",
            failed.cell_id,
            failed.error.as_deref().unwrap_or("?")
        );
        let payload = json!({"wave": r.waves[w].name, "cell_id": failed.cell_id, "reason": why});
        r.state = ReleaseState::Paused;
        r.reason = Some(why.clone());
        if !save(shared, &mut r, Some(("RELEASE_CELL_FAILED", payload)), corr).await? {
            return Ok(lost_race());
        }
        return Ok(Next::Wait(why));
    }
    let in_flight = r.waves[w]
        .cells
        .iter()
        .filter(|c| c.state == "applying")
        .count();
    let room = (r.waves[w].max_parallel as usize).saturating_sub(in_flight);
    // A dedicated cell whose tenant has change windows waits for one, read fresh.
    let mut pending = Vec::new();
    for i in 0..r.waves[w].cells.len() {
        if pending.len() >= room
            || !matches!(r.waves[w].cells[i].state.as_str(), "pending" | "waiting")
        {
            continue;
        }
        match outside_change_window(shared, &r.waves[w].cells[i].cell_id, chrono::Utc::now())
            .await?
        {
            Some(why) => {
                let c = &mut r.waves[w].cells[i];
                if c.state != "waiting" || c.error.as_deref() != Some(why.as_str()) {
                    c.state = "waiting".into();
                    c.error = Some(why);
                    changed = true;
                }
            }
            None => pending.push(i),
        }
    }
    let ctx = ctx_of(corr);
    for i in pending {
        let mut tx = store.write().await?;
        let cell_id = r.waves[w].cells[i].cell_id.clone();
        let Some(cell) = tx.get_cell_tx(&cell_id).await? else {
            let c = &mut r.waves[w].cells[i];
            c.state = "failed".into();
            c.error = Some("the cell is gone".into());
            changed = true;
            continue;
        };
        if cell.pending_job_id.is_some() {
            continue; // Its own job first; looked at again on the next pass.
        }
        let template = crate::validate::load_template(
            &shared.settings().templates,
            &cell.template,
            "template",
        )
        .ok();
        let from_vars = super::user_vars_of(&cell, template.as_ref());
        let mut vars = from_vars.clone();
        vars.extend(r.spec.vars.clone());
        let patch = PatchCell {
            vars: Some(vars),
            app_version: Some(r.spec.app_version.clone()),
            ..Default::default()
        };
        // A retried cell was started before: its record already holds the release, and
        // what it ran before is what the first start recorded.
        let retried = r.waves[w].cells[i].job_id.is_some();
        let started = match super::patch_cell_in(shared, &mut tx, &ctx, &cell_id, None, patch).await
        {
            Ok((_, None)) if retried => reapply_in(shared, &mut tx, &ctx, &cell_id).await,
            Ok((_, job)) => Ok(job),
            Err(e) => Err(e),
        };
        let job = match started {
            Ok(job) => job,
            Err(e) => {
                let c = &mut r.waves[w].cells[i];
                c.state = "failed".into();
                c.error = Some(e.to_string());
                changed = true;
                continue;
            }
        };
        let c = &mut r.waves[w].cells[i];
        if !retried {
            c.from_vars = from_vars;
            c.from_version = cell.app_version.clone();
        }
        c.error = None;
        match job {
            Some(j) => {
                c.state = "applying".into();
                c.job_id = Some(j.job_id);
            }
            // Already at this version with these variables.
            None => c.state = "applied".into(),
        }
        if !tx.update_release(&mut r).await? {
            return Ok(lost_race());
        }
        tx.commit().await?;
        shared.job_notify.notify_waiters();
    }
    let done = r.waves[w]
        .cells
        .iter()
        .all(|c| matches!(c.state.as_str(), "applied" | "skipped"));
    if done {
        r.waves[w].state = "baking".into();
        r.waves[w].bake_started_at = Some(persistence::now());
        r.progress.phase = "bake".into();
        r.progress.tallies.clear();
        r.progress.last_eval_at = Some(persistence::now());
        changed = true;
    }
    if changed {
        save(shared, &mut r, None, corr).await?;
    }
    Ok(Next::Wait(format!(
        "wave {}: {} applying",
        r.waves[w].name,
        r.waves[w]
            .cells
            .iter()
            .filter(|c| c.state == "applying")
            .count()
    )))
}

/// Why wave `w` may not start at `now`: a freeze window of the release covers it.
fn frozen(r: &ReleaseRow, w: usize, now: chrono::DateTime<chrono::Utc>) -> Option<String> {
    r.spec.freeze_windows.iter().find_map(|f| {
        let (start, end) = (
            persistence::parse_time(&f.start)?,
            persistence::parse_time(&f.end)?,
        );
        (start <= now && now < end).then(|| {
            format!(
                "wave {} waits: freeze window {} to {}{}",
                r.waves[w].name,
                f.start,
                f.end,
                f.reason
                    .as_deref()
                    .map(|x| format!(" ({x})"))
                    .unwrap_or_default()
            )
        })
    })
}

/// Why a cell may not be applied at `now`: it is dedicated and a tenant on it has change
/// windows (`policies.changeWindows`), none of which is open.
async fn outside_change_window(
    shared: &Shared,
    cell_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<String>, StepError> {
    use chrono::{Datelike, Timelike};
    let store = shared.store();
    let Some(cell) = store.get_cell(cell_id).await? else {
        return Ok(None);
    };
    if cell.tier != cellplane_api::Tier::Dedicated {
        return Ok(None);
    }
    let (day, minute) = (
        now.weekday().num_days_from_monday(),
        now.hour() * 60 + now.minute(),
    );
    for env in store.environments_on_cell(cell_id).await? {
        let Some(t) = store.get_tenant(&env.tenant_id).await? else {
            continue;
        };
        let Some(windows) = t.policies.change_windows.filter(|w| !w.is_empty()) else {
            continue;
        };
        if !windows.iter().any(|x| x.contains(day, minute)) {
            let list: Vec<String> = windows
                .iter()
                .map(|x| {
                    format!(
                        "{}{}-{}",
                        x.days
                            .as_ref()
                            .map(|d| format!("{} ", d.join(",")))
                            .unwrap_or_default(),
                        x.start,
                        x.end
                    )
                })
                .collect();
            return Ok(Some(format!(
                "waiting for tenant {}'s change window ({} UTC)",
                t.tenant_id,
                list.join("; ")
            )));
        }
    }
    Ok(None)
}

/// Applies a cell again as it is recorded (a retried cell whose earlier apply failed
/// after its record took the release).
async fn reapply_in(
    shared: &Shared,
    tx: &mut WriteTx,
    ctx: &Ctx,
    cell_id: &str,
) -> crate::error::Result<Option<cellplane_api::Job>> {
    use crate::error::ServiceError;
    let mut cell = tx
        .get_cell_tx(cell_id)
        .await?
        .ok_or_else(|| crate::error::not_found("cell", cell_id))?;
    if !matches!(
        cell.state,
        cellplane_api::CellState::Active
            | cellplane_api::CellState::Draining
            | cellplane_api::CellState::Drained
            | cellplane_api::CellState::Failed
    ) {
        return Err(ServiceError::Conflict(format!(
            "cannot apply cell {cell_id:?} in state {}",
            cell.state.as_str()
        )));
    }
    let job = super::enqueue_cell_job(
        tx,
        shared.settings.job_max_attempts,
        ctx,
        &mut cell,
        crate::stamping::CellAction::Apply,
    )
    .await?;
    cell.version += 1;
    if !tx.update_cell(&cell).await? {
        return Err(ServiceError::Conflict(format!(
            "cell {cell_id:?} changed concurrently"
        )));
    }
    Ok(Some(job))
}

/// Before a wave starts: a wave whose cells' remaining error budget (over the last
/// `budget_window_secs`) is below `min_budget` does not start.
async fn budget_refusal(shared: &Shared, r: &ReleaseRow, w: usize) -> Option<String> {
    let g = &r.spec.gates;
    let (min, target, window) = (g.min_budget?, g.slo_target?, g.budget_window_secs);
    let cells: Vec<String> = r.waves[w].cells.iter().map(|c| c.cell_id.clone()).collect();
    let read = shared
        .routing()
        .cell_windows_since(&cells, window, "")
        .await;
    let windows = match read {
        Ok(w) => w,
        Err(e) => {
            return Some(format!(
                "wave {} does not start: its cells' error budget could not be read ({e}); \
                 resume to check again",
                r.waves[w].name
            ))
        }
    };
    for c in &r.waves[w].cells {
        let Some((win, _)) = windows.get(&c.cell_id) else {
            continue;
        };
        if let Some(left) = crate::gates::remaining_budget(win, target) {
            if left < min {
                return Some(format!(
                    "wave {} does not start: cell {} has {:.0} % of its error budget left over \
                     the last {window} s ({} errors in {} requests against an SLO of {target}), \
                     below the {:.0} % the release requires",
                    r.waves[w].name,
                    c.cell_id,
                    left.max(0.0) * 100.0,
                    win.errors,
                    win.total,
                    min * 100.0
                ));
            }
        }
    }
    None
}

async fn bake(shared: &Shared, mut r: ReleaseRow, corr: Option<&str>) -> Result<Next, StepError> {
    let w = r.progress.wave;
    let g = r.spec.gates.clone();
    let now = chrono::Utc::now();
    let last = r
        .progress
        .last_eval_at
        .as_deref()
        .and_then(persistence::parse_time)
        .unwrap_or(now);
    if now - last < chrono::Duration::seconds(g.interval_secs) {
        return Ok(Next::Wait(format!("baking wave {}", r.waves[w].name)));
    }
    // `settle_secs` after the cells were applied lets them settle (processes replaced,
    // routers' health checks passing again): nothing before it is measured.
    let started = r.waves[w]
        .bake_started_at
        .as_deref()
        .and_then(persistence::parse_time)
        .unwrap_or(now);
    let settled = started + chrono::Duration::seconds(g.settle_secs);
    if now < settled + chrono::Duration::seconds(g.interval_secs) {
        return Ok(Next::Wait(format!("wave {} settling", r.waves[w].name)));
    }
    let limits = Limits {
        failure_limit: g.failure_limit,
        consecutive_error_limit: g.consecutive_error_limit,
        inconclusive_limit: g.inconclusive_limit,
    };
    let at = persistence::fmt_time(now);
    let mut verdict = Verdict::Continue;
    let mut cause = None;
    let window = g.window_secs.max(1) as u64;
    let cells: Vec<String> = r.waves[w]
        .cells
        .iter()
        .filter(|c| c.state == "applied")
        .map(|c| c.cell_id.clone())
        .collect();
    let provider = shared.metrics.get(g.provider);
    // Every measurement of this round: per cell, then the wave against its baseline.
    let mut round: Vec<(String, Measured)> = Vec::new();
    for (cell, m) in release_gates::measure_cells(&provider, &cells, &g, settled).await {
        round.push((format!("{}/{cell}", m.gate), m));
    }
    // The comparison needs its whole window of samples after the cells settled.
    if g.baseline.is_some() && now - settled >= chrono::Duration::seconds(window as i64) {
        let baseline = baseline_cells(shared, &r).await?;
        match release_gates::measure_baseline(&provider, &cells, &baseline, &g, settled).await {
            Some(m) => round.push((format!("baseline/{}", r.waves[w].name), m)),
            None => {
                let key = format!("baseline/{}", r.waves[w].name);
                if let std::collections::btree_map::Entry::Vacant(e) = r.progress.tallies.entry(key)
                {
                    // Recorded once per bake; never counted as a pass.
                    e.insert(Tally::default());
                    r.decisions.push(GateDecision {
                        at: at.clone(),
                        wave: r.waves[w].name.clone(),
                        cell_id: None,
                        gate: "baseline".into(),
                        result: "not_applicable".into(),
                        measurements: json!({"reason": "no cell outside this release is left on the old version"}),
                        dry_run: g.dry_run,
                    });
                }
            }
        }
    }
    for (key, m) in round {
        let cell = key
            .split_once('/')
            .map(|(_, c)| c.to_string())
            .unwrap_or_default();
        r.decisions.push(GateDecision {
            at: at.clone(),
            wave: r.waves[w].name.clone(),
            cell_id: (m.gate != "baseline").then(|| cell.clone()),
            gate: m.gate.into(),
            result: match m.result {
                Measurement::Success => "success",
                Measurement::Failure => "failure",
                Measurement::Inconclusive => "inconclusive",
                Measurement::Error => "error",
            }
            .into(),
            measurements: m.numbers.clone(),
            dry_run: g.dry_run,
        });
        if g.dry_run {
            continue;
        }
        let v = r
            .progress
            .tallies
            .entry(key)
            .or_default()
            .record(m.result, &limits);
        let rank = |v: Verdict| match v {
            Verdict::Fail => 3,
            Verdict::Halt => 2,
            Verdict::Pause => 1,
            Verdict::Continue => 0,
        };
        if rank(v) > rank(verdict) {
            verdict = v;
            cause = Some((m.gate.to_string(), cell, m.numbers));
        }
    }
    r.progress.last_eval_at = Some(at.clone());
    let wave_name = r.waves[w].name.clone();
    let (event, payload, next): (&str, serde_json::Value, Next) = match verdict {
        Verdict::Fail => {
            let (gate, cell, m) = cause.clone().unwrap_or_default();
            let why = format!("gate {gate} failed on cell {cell} in wave {wave_name}: {m}");
            r.waves[w].state = "failed".into();
            match r.spec.rollback {
                RollbackPolicy::Auto => {
                    r.state = ReleaseState::RollingBack;
                    r.progress.phase = "rollback".into();
                }
                RollbackPolicy::Manual => r.state = ReleaseState::Paused,
                RollbackPolicy::Never => r.state = ReleaseState::Failed,
            }
            r.reason = Some(if r.spec.rollback == RollbackPolicy::Never {
                format!("{why}; halted without rollback (rollback: never): page the owner")
            } else {
                why.clone()
            });
            (
                "RELEASE_GATE_FAILED",
                json!({"wave": wave_name, "gate": gate, "cell_id": cell, "measurements": m,
                       "rollback": r.spec.rollback}),
                Next::Wait(why),
            )
        }
        Verdict::Halt => {
            let (gate, cell, m) = cause.clone().unwrap_or_default();
            let why = format!(
                "halted: the metrics of gate {gate} could not be read {} times in a row (cell {cell}): {m}",
                g.consecutive_error_limit
            );
            r.state = ReleaseState::Failed;
            r.reason = Some(why.clone());
            (
                "RELEASE_HALTED",
                json!({"wave": wave_name, "gate": gate, "cell_id": cell, "measurements": m,
                       "reason": why}),
                Next::Wait(why),
            )
        }
        Verdict::Pause => {
            let (gate, cell, m) = cause.clone().unwrap_or_default();
            let why = format!(
                "paused: gate {gate} is inconclusive on cell {cell} (fewer than {} requests in \
                 {window} s); resume to measure again, or abort",
                g.min_requests
            );
            r.state = ReleaseState::Paused;
            r.reason = Some(why.clone());
            (
                "RELEASE_GATE_INCONCLUSIVE",
                json!({"wave": wave_name, "gate": gate, "cell_id": cell, "measurements": m}),
                Next::Wait(why),
            )
        }
        Verdict::Continue => {
            let baked = now - started >= chrono::Duration::seconds(r.waves[w].bake_seconds);
            // Every gate turned on has passed on every cell (and the wave against its
            // baseline, unless no baseline was left: that one never counts).
            let baseline_key = format!("baseline/{wave_name}");
            let baseline_ok = g.baseline.is_none()
                || r.progress
                    .tallies
                    .get(&baseline_key)
                    .is_some_and(|t| t.passed(&limits) || t == &Tally::default());
            let passed = g.dry_run
                || (baseline_ok
                    && cells.iter().all(|cell| {
                        release_gates::cell_gates(&g).iter().all(|gate| {
                            r.progress
                                .tallies
                                .get(&format!("{gate}/{cell}"))
                                .is_some_and(|t: &Tally| t.passed(&limits))
                        })
                    }));
            if baked && passed {
                r.waves[w].state = "passed".into();
                r.progress.wave += 1;
                r.progress.phase = "apply".into();
                let tallies = std::mem::take(&mut r.progress.tallies);
                (
                    "RELEASE_GATE_PASSED",
                    json!({"wave": wave_name, "tallies": tallies, "bake_seconds": r.waves[w].bake_seconds}),
                    Next::Wait(format!("wave {wave_name} passed")),
                )
            } else {
                if !save(shared, &mut r, None, corr).await? {
                    return Ok(lost_race());
                }
                return Ok(Next::Wait(format!("baking wave {wave_name}")));
            }
        }
    };
    let mut events = vec![(event, payload)];
    // `rollback: never`: the release halts with nothing rolled back; the halt is its own
    // event (`dev.cellplane.release.halted.v1`) for whoever is paged on it.
    if verdict == Verdict::Fail && r.spec.rollback == RollbackPolicy::Never {
        let (_, cell, _) = cause.unwrap_or_default();
        events.push((
            "RELEASE_HALTED",
            json!({"wave": wave_name, "cell_id": cell, "reason": r.reason}),
        ));
    }
    if !save_all(shared, &mut r, events, corr).await? {
        return Ok(lost_race());
    }
    Ok(next)
}

/// The cells a wave is compared against: active cells outside this release that still
/// run another version than the release's.
async fn baseline_cells(shared: &Shared, r: &ReleaseRow) -> Result<Vec<String>, StepError> {
    let mine: std::collections::BTreeSet<&str> = r
        .waves
        .iter()
        .flat_map(|w| w.cells.iter())
        .filter(|c| c.state != "pending" && c.state != "waiting")
        .map(|c| c.cell_id.as_str())
        .collect();
    Ok(shared
        .store()
        .all_cells()
        .await?
        .into_iter()
        .filter(|c| {
            c.state == cellplane_api::CellState::Active
                && !mine.contains(c.cell_id.as_str())
                && c.app_version.as_deref() != Some(r.spec.app_version.as_str())
        })
        .map(|c| c.cell_id)
        .collect())
}

/// Puts back what the release changed: the current wave's cells first, then earlier
/// waves', each in reverse order of application, one at a time.
async fn rollback(
    shared: &Shared,
    mut r: ReleaseRow,
    corr: Option<&str>,
) -> Result<Next, StepError> {
    let last = r.progress.wave.min(r.waves.len().saturating_sub(1));
    let order: Vec<(usize, usize)> = (0..=last)
        .rev()
        .flat_map(|w| (0..r.waves[w].cells.len()).rev().map(move |i| (w, i)))
        .collect();
    for (w, i) in order {
        let state = r.waves[w].cells[i].state.clone();
        match state.as_str() {
            "applying" | "reverting" => {
                let ended = match job_state(shared, &r.waves[w].cells[i].job_id).await? {
                    Some((s, _)) if !s.is_terminal() => {
                        return Ok(Next::Wait(format!(
                            "waiting for cell {}'s job",
                            r.waves[w].cells[i].cell_id
                        )));
                    }
                    other => other,
                };
                if state == "reverting" {
                    if let Some((JobState::Failed | JobState::Cancelled, err)) = ended {
                        // A revert that failed (after its job's own retries) halts the
                        // release: the cell is left for a human, never counted reverted.
                        let cell_id = r.waves[w].cells[i].cell_id.clone();
                        let err = err.unwrap_or_else(|| "the apply job failed".into());
                        let why = format!(
                            "rolling back cell {cell_id} failed: {err}; repair the cell \
                             (cellplane cell apply {cell_id}) and check what it runs"
                        );
                        let c = &mut r.waves[w].cells[i];
                        c.state = "failed".into();
                        c.error = Some(format!("rollback failed: {err}"));
                        r.state = ReleaseState::Failed;
                        r.reason = Some(why.clone());
                        let payload = json!({"cell_id": cell_id, "error": err, "reason": why});
                        if !save(
                            shared,
                            &mut r,
                            Some(("RELEASE_ROLLBACK_FAILED", payload)),
                            corr,
                        )
                        .await?
                        {
                            return Ok(lost_race());
                        }
                        return Ok(Next::Wait(why));
                    }
                    r.waves[w].cells[i].state = "reverted".into();
                    save(shared, &mut r, None, corr).await?;
                    return Ok(Next::Wait("cell reverted".into()));
                }
                // An apply that ended: put the cell back like an applied one.
                r.waves[w].cells[i].state = "applied".into();
                return revert(shared, r, w, i, corr).await;
            }
            "applied" | "failed" if r.waves[w].cells[i].job_id.is_some() => {
                return revert(shared, r, w, i, corr).await;
            }
            _ => {}
        }
    }
    let reverted: Vec<String> = r
        .waves
        .iter()
        .flat_map(|w| {
            w.cells
                .iter()
                .filter(|c| c.state == "reverted")
                .map(|c| c.cell_id.clone())
        })
        .collect();
    r.state = if r.progress.aborting {
        ReleaseState::Aborted
    } else {
        ReleaseState::RolledBack
    };
    r.progress.phase = "done".into();
    for w in r.waves.iter_mut() {
        if w.cells.iter().any(|c| c.state == "reverted") {
            w.state = "rolled_back".into();
        }
    }
    let event = if r.progress.aborting {
        "RELEASE_ABORTED"
    } else {
        "RELEASE_ROLLED_BACK"
    };
    let payload = json!({"reverted": reverted, "reason": r.reason});
    if !save(shared, &mut r, Some((event, payload)), corr).await? {
        return Ok(lost_race());
    }
    Ok(Next::Done(format!(
        "rolled back {} cell(s)",
        reverted.len()
    )))
}

/// Puts one cell back to what it ran before the release.
async fn revert(
    shared: &Shared,
    mut r: ReleaseRow,
    w: usize,
    i: usize,
    corr: Option<&str>,
) -> Result<Next, StepError> {
    let store = shared.store();
    let cell_id = r.waves[w].cells[i].cell_id.clone();
    let mut tx = store.write().await?;
    let Some(cell) = tx.get_cell_tx(&cell_id).await? else {
        r.waves[w].cells[i].state = "reverted".into();
        if tx.update_release(&mut r).await? {
            tx.commit().await?;
        }
        return Ok(Next::Wait(format!("cell {cell_id} is gone")));
    };
    if cell.pending_job_id.is_some() {
        return Ok(Next::Wait(format!("cell {cell_id} has a job running")));
    }
    let c = &r.waves[w].cells[i];
    let patch = PatchCell {
        vars: Some(c.from_vars.clone()),
        app_version: c.from_version.clone(),
        ..Default::default()
    };
    let ctx = ctx_of(corr);
    let job = super::patch_cell_in(shared, &mut tx, &ctx, &cell_id, None, patch)
        .await
        .map_err(|e| StepError::Retryable(format!("reverting cell {cell_id}: {e}")))?
        .1;
    let c = &mut r.waves[w].cells[i];
    match job {
        Some(j) => {
            c.state = "reverting".into();
            c.job_id = Some(j.job_id);
        }
        None => c.state = "reverted".into(),
    }
    if !tx.update_release(&mut r).await? {
        return Ok(lost_race());
    }
    tx.commit().await?;
    shared.job_notify.notify_waiters();
    Ok(Next::Wait(format!("reverting cell {cell_id}")))
}
