//! `tenant.move`: moves one tenant environment to another cell with a short, bounded
//! cutover (see `runbooks/move-a-tenant.md`).
//!
//! Steps, each recorded and resumable: stamp the target when it is a new dedicated cell →
//! reserve its capacity → copy a snapshot while the source serves → delta rounds until the
//! remaining delta is small (the route is never held before that; a delta that does not
//! converge in time aborts without holding) → hold the route → wait until every live
//! router acks the hold with nothing in flight on the old route → freeze the source →
//! copy the final delta → compare checksums → flip (one transaction repoints the
//! environment, routes it to the target and releases the hold) → after a grace period,
//! purge the source and give its capacity back.
//!
//! Before the flip, any failure or cancellation rolls back: [`Kind::undo`] unfreezes the
//! source and drops the partial copy on the target, then the finish releases the hold
//! (the route still points at the source) and gives the target's capacity back. After the
//! flip the move only goes forward.

use super::kind::{End, FinishCx, Finished, Kind, Next, StepCx, StepError};
use crate::cellclient::{CellEndpoint, CellError, Copied};
use crate::ctx::{tenant_target, Ctx};
use crate::persistence::{AuditInput, MoveProgress, StoreError, WriteTx};
use crate::shared::Shared;
use cellplane_api::{MoveState, PlacementDecision, Profile, RouteMode, Tier};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::{Duration, Instant};

/// What the job is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveSpec {
    pub move_id: String,
    pub tenant_id: String,
    pub env: String,
    pub source_cell_id: String,
    pub target_cell_id: String,
    /// The target is the tenant environment's dedicated cell, stamped by this job.
    #[serde(default)]
    pub dedicated: bool,
    pub units: i64,
}

/// What the job remembers between steps.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MoveJobState {
    /// The export cursor everything up to which is on the target.
    pub cursor: Option<String>,
    pub rows_copied: i64,
    pub bytes_copied: i64,
    pub delta_rounds: i64,
    pub current_delta: Option<i64>,
    /// The routing revision that held the route, and when (Unix ms).
    pub hold_revision: Option<i64>,
    pub hold_at_ms: Option<i64>,
    pub flipped_at_ms: Option<i64>,
    pub hold_ms: Option<i64>,
    /// Rounds, router acks, checksums, timings.
    pub evidence: serde_json::Map<String, serde_json::Value>,
}

const STEPS: &[&str] = &[
    "check",
    "stamp-target",
    "reserve",
    "copy",
    "catch-up",
    "hold",
    "await-acks",
    "freeze",
    "final-delta",
    "verify",
    "flip",
];
const HOLD: usize = 5;

/// Rounds kept in the evidence (the first and the latest).
const MAX_ROUNDS_KEPT: usize = 50;

pub struct TenantMove;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn cell_step(e: CellError) -> StepError {
    StepError::Fatal(e.to_string())
}

/// The cell's contract endpoint and bearer token.
pub async fn endpoint(shared: &Shared, cell_id: &str) -> Result<CellEndpoint, String> {
    let cell = shared
        .store()
        .get_cell(cell_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("cell {cell_id} is gone"))?;
    let base = crate::placement::endpoint_of(&cell)
        .ok_or_else(|| format!("cell {cell_id} has no endpoint output"))?;
    let secrets = shared
        .store()
        .get_cell_secrets(cell_id)
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let token = secrets
        .vars
        .get("admin_token")
        .or_else(|| secrets.outputs.get("admin_token"))
        .or_else(|| cell.outputs.get("admin_token"))
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            format!(
                "cell {cell_id} has no admin_token (a secret variable or output of its template): \
                 the control plane cannot call its cell contract routes"
            )
        })?;
    Ok(CellEndpoint::new(cell_id, &base, token))
}

impl TenantMove {
    async fn progress(&self, cx: &StepCx<'_>, spec: &MoveSpec, st: &MoveJobState, step: &str) {
        let evidence = serde_json::Value::Object(st.evidence.clone());
        let p = MoveProgress {
            step,
            rows_copied: st.rows_copied,
            bytes_copied: st.bytes_copied,
            delta_rounds: st.delta_rounds,
            current_delta: st.current_delta,
            hold_ms: st.hold_ms,
            evidence: &evidence,
        };
        if let Err(e) = cx.shared().store().move_progress(&spec.move_id, &p).await {
            tracing::warn!(error = %e, "recording the move's progress failed");
        }
        cx.shared().job_changed.notify_waiters();
    }

    /// Records when a step of the cutover ended, in ms since the hold (the hold's
    /// breakdown: `cutover.acked`, `.frozen`, `.final_delta`, `.verified`).
    fn mark(st: &mut MoveJobState, what: &str) {
        if let Some(at) = st.hold_at_ms {
            let cut = st.evidence.entry("cutover").or_insert_with(|| json!({}));
            cut[what] = json!((now_ms() - at).max(0));
        }
    }

    fn record_round(st: &mut MoveJobState, c: &Copied, took: Duration, phase: &str) {
        st.rows_copied += c.records;
        st.bytes_copied += c.bytes;
        st.current_delta = Some(c.records);
        st.cursor = Some(c.cursor.clone());
        let rounds = st
            .evidence
            .entry("rounds")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut rounds = rounds;
        if rounds.len() >= MAX_ROUNDS_KEPT {
            rounds.remove(1);
        }
        rounds.push(
            json!({"phase": phase, "records": c.records, "applied": c.applied,
                           "bytes": c.bytes, "ms": took.as_millis() as u64}),
        );
        st.evidence.insert("rounds".into(), json!(rounds));
    }

    async fn run(
        &self,
        cx: &StepCx<'_>,
        spec: &MoveSpec,
        st: &mut MoveJobState,
        index: usize,
    ) -> Result<Next, StepError> {
        let shared = cx.shared();
        let store = shared.store();
        let cfg = &shared.settings().moves;
        let tenant = spec.tenant_id.as_str();
        let name = STEPS[index];
        // The live view learns of each step up to the hold; from the hold to the flip the
        // steps take milliseconds and every write here would lengthen the cutover (the
        // flip records the rest).
        if index <= HOLD {
            self.progress(cx, spec, st, name).await;
        }
        match name {
            "check" => {
                let m = store
                    .get_move(&spec.move_id)
                    .await?
                    .ok_or_else(|| StepError::Fatal(format!("move {} is gone", spec.move_id)))?;
                if m.public.state != MoveState::Running {
                    return Err(StepError::Fatal(format!(
                        "move {} is {}",
                        spec.move_id,
                        m.public.state.as_str()
                    )));
                }
                if m.flipped {
                    // A restart after the flip: straight on to the purge.
                    return Ok(Next::Continue("already flipped".into()));
                }
                let envs = store.list_environments(tenant).await?;
                let e = envs.iter().find(|e| e.name == spec.env).ok_or_else(|| {
                    StepError::Fatal(format!("environment {tenant}/{} is gone", spec.env))
                })?;
                if e.cell_id.as_deref() != Some(spec.source_cell_id.as_str()) {
                    return Err(StepError::Fatal(format!(
                        "{tenant}/{} is no longer on cell {}",
                        spec.env, spec.source_cell_id
                    )));
                }
                Ok(Next::Continue(format!(
                    "{tenant}/{} on {} moves to {}",
                    spec.env, spec.source_cell_id, spec.target_cell_id
                )))
            }
            "stamp-target" => {
                if !spec.dedicated || st.hold_revision.is_some() {
                    return Ok(Next::Continue(format!(
                        "target {} exists",
                        spec.target_cell_id
                    )));
                }
                let t = store
                    .get_tenant(tenant)
                    .await?
                    .ok_or_else(|| StepError::Fatal(format!("tenant {tenant} is gone")))?;
                let e = store
                    .list_environments(tenant)
                    .await?
                    .into_iter()
                    .find(|e| e.name == spec.env)
                    .ok_or_else(|| StepError::Fatal(format!("{tenant}/{} is gone", spec.env)))?;
                let policy = shared.placement().region_policy(&e.region).await?;
                let got = shared
                    .placement()
                    .dedicated_cell(
                        &t,
                        &spec.env,
                        &e.region,
                        spec.units.max(1) as u64,
                        &policy,
                        Profile::StDedicated,
                    )
                    .await?;
                match got {
                    Ok(cell) => Ok(Next::Continue(format!(
                        "dedicated cell {} is active",
                        cell.cell_id
                    ))),
                    Err(crate::placement::Outcome::Stamp { cell, why }) => {
                        let ctx = Ctx {
                            actor: "system:moves".into(),
                            correlation_id: cx.correlation_id().unwrap_or("move").to_string(),
                        };
                        match super::register_cell(shared, &ctx, *cell).await {
                            Ok(_) | Err(crate::error::ServiceError::Conflict(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                        Ok(Next::Wait(why))
                    }
                    Err(crate::placement::Outcome::Waiting(why)) => Ok(Next::Wait(why)),
                    Err(crate::placement::Outcome::Impossible(why)) => Err(StepError::Fatal(why)),
                    Err(other) => Err(StepError::Fatal(format!(
                        "unexpected placement outcome: {other:?}"
                    ))),
                }
            }
            "reserve" => {
                let mut tx = store.write().await?;
                let m = tx
                    .get_move_tx(&spec.move_id)
                    .await?
                    .ok_or_else(|| StepError::Fatal("the move is gone".into()))?;
                if m.target_reserved || m.flipped {
                    return Ok(Next::Continue(format!(
                        "{} unit(s) held on {}",
                        spec.units, spec.target_cell_id
                    )));
                }
                if !tx
                    .reserve_capacity(&spec.target_cell_id, spec.units)
                    .await?
                {
                    return Err(StepError::Fatal(format!(
                        "cell {} has no room for {tenant}/{} ({} unit(s)) or is not active",
                        spec.target_cell_id, spec.env, spec.units
                    )));
                }
                tx.mark_target_reserved(&spec.move_id).await?;
                tx.audit(AuditInput {
                    tenant_id: Some(tenant),
                    event_type: "TENANCY_MOVE_RESERVED",
                    actor: "system:moves",
                    target: &tenant_target(tenant),
                    payload: json!({"move_id": spec.move_id, "env": spec.env,
                                    "cell_id": spec.target_cell_id, "units": spec.units}),
                    correlation_id: cx.correlation_id(),
                })
                .await?;
                tx.commit().await?;
                Ok(Next::Continue(format!(
                    "{} unit(s) reserved on {}",
                    spec.units, spec.target_cell_id
                )))
            }
            "copy" => {
                if st.cursor.is_some() {
                    return Ok(Next::Continue("snapshot already copied".into()));
                }
                let (from, to) = self.endpoints(shared, spec).await?;
                // Whatever an earlier, interrupted attempt left on the target goes first: the
                // snapshot lands on an empty tenant (no other environment of this tenant
                // lives on the target; the move was refused otherwise).
                shared.cells.purge(&to, tenant).await.map_err(cell_step)?;
                let t0 = Instant::now();
                let c = shared
                    .cells
                    .copy(&from, &to, tenant, None)
                    .await
                    .map_err(cell_step)?;
                Self::record_round(st, &c, t0.elapsed(), "snapshot");
                st.evidence
                    .insert("snapshot_ms".into(), json!(t0.elapsed().as_millis() as u64));
                Ok(Next::Continue(format!(
                    "snapshot copied: {} record(s), {} byte(s) in {} ms",
                    c.records,
                    c.bytes,
                    t0.elapsed().as_millis()
                )))
            }
            "catch-up" => {
                let (from, to) = self.endpoints(shared, spec).await?;
                let started = Instant::now();
                let limit = Duration::from_secs(cfg.converge_timeout_secs.max(1));
                loop {
                    if cx.cancel.is_cancelled() {
                        return Err(StepError::Cancelled);
                    }
                    if cx.detach.is_cancelled() {
                        return Err(StepError::Abandoned);
                    }
                    let t0 = Instant::now();
                    let c = shared
                        .cells
                        .copy(&from, &to, tenant, st.cursor.as_deref())
                        .await
                        .map_err(cell_step)?;
                    st.delta_rounds += 1;
                    Self::record_round(st, &c, t0.elapsed(), "delta");
                    self.progress(cx, spec, st, name).await;
                    if c.records < cfg.delta_threshold {
                        return Ok(Next::Continue(format!(
                            "delta converged after {} round(s): {} record(s) left (threshold {})",
                            st.delta_rounds, c.records, cfg.delta_threshold
                        )));
                    }
                    if started.elapsed() >= limit {
                        let recent: Vec<i64> = st
                            .evidence
                            .get("rounds")
                            .and_then(|r| r.as_array())
                            .map(|r| {
                                r.iter()
                                    .rev()
                                    .take(5)
                                    .filter_map(|x| x["records"].as_i64())
                                    .collect()
                            })
                            .unwrap_or_default();
                        return Err(StepError::Fatal(format!(
                            "the delta did not converge within {} s: the last rounds copied {:?} \
                             record(s), never under the threshold of {} (the tenant writes faster \
                             than the copy); the route was never held",
                            limit.as_secs(),
                            recent,
                            cfg.delta_threshold
                        )));
                    }
                }
            }
            "hold" => {
                let ctx = Ctx {
                    actor: "system:moves".into(),
                    correlation_id: cx.correlation_id().unwrap_or("move").to_string(),
                };
                let limit = shared.settings().routing.history_limit;
                let mut tx = store.write().await?;
                let (_, rev) = crate::routing::set_mode_in(
                    &mut tx,
                    &ctx,
                    tenant,
                    &spec.env,
                    RouteMode::Hold,
                    limit,
                )
                .await?;
                tx.commit().await?;
                let rev = match rev {
                    Some(r) => {
                        shared.route_revisions().observe(r);
                        r
                    }
                    // Held already (a retried step): any revision since is as good.
                    None => store.routing_head().await?.revision,
                };
                if st.hold_revision.is_none() {
                    st.hold_at_ms = Some(now_ms());
                }
                st.hold_revision = Some(rev);
                st.evidence.insert("hold_revision".into(), json!(rev));
                Ok(Next::Continue(format!("route held at revision {rev}")))
            }
            "await-acks" => {
                let rev = st
                    .hold_revision
                    .ok_or_else(|| StepError::Fatal("no hold revision recorded".into()))?;
                let hold_at = st.hold_at_ms.unwrap_or_else(now_ms);
                let timeout = cfg.ack_timeout_ms as i64;
                let live_secs = shared.settings().routing.router_live_secs as i64;
                let mut acked: std::collections::BTreeMap<String, i64> = Default::default();
                loop {
                    if cx.cancel.is_cancelled() {
                        return Err(StepError::Cancelled);
                    }
                    if cx.detach.is_cancelled() {
                        return Err(StepError::Abandoned);
                    }
                    let live_after = crate::persistence::fmt_time(
                        chrono::Utc::now() - chrono::Duration::seconds(live_secs),
                    );
                    let routers = store.live_router_acks(&live_after).await?;
                    let now = now_ms();
                    let mut waiting = Vec::new();
                    for (id, applied, drained) in &routers {
                        if *drained >= rev {
                            acked.entry(id.clone()).or_insert(now - hold_at);
                        } else {
                            waiting.push(format!("{id} (applied {applied}, drained {drained})"));
                        }
                    }
                    if waiting.is_empty() {
                        let acks: Vec<_> = routers
                            .iter()
                            .map(|(id, _, drained)| {
                                json!({"router_id": id, "drained_revision": drained,
                                       "ms": acked.get(id).copied().unwrap_or(0)})
                            })
                            .collect();
                        st.evidence.insert("router_acks".into(), json!(acks));
                        Self::mark(st, "acked");
                        return Ok(Next::Continue(format!(
                            "{} live router(s) drained revision {rev}",
                            routers.len()
                        )));
                    }
                    if now - hold_at >= timeout {
                        return Err(StepError::Fatal(format!(
                            "router(s) did not ack the hold (revision {rev}) with nothing in flight \
                             within {timeout} ms: {}; the hold is released",
                            waiting.join(", ")
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            "freeze" => {
                let (from, _) = self.endpoints(shared, spec).await?;
                let cursor = shared
                    .cells
                    .freeze(&from, tenant)
                    .await
                    .map_err(cell_step)?;
                st.evidence.insert("freeze_cursor".into(), json!(cursor));
                Self::mark(st, "frozen");
                Ok(Next::Continue(format!(
                    "source {} frozen at {cursor}",
                    spec.source_cell_id
                )))
            }
            "final-delta" => {
                let (from, to) = self.endpoints(shared, spec).await?;
                let t0 = Instant::now();
                let c = shared
                    .cells
                    .copy(&from, &to, tenant, st.cursor.as_deref())
                    .await
                    .map_err(cell_step)?;
                st.delta_rounds += 1;
                Self::record_round(st, &c, t0.elapsed(), "final");
                Self::mark(st, "final_delta");
                Ok(Next::Continue(format!(
                    "final delta: {} record(s) in {} ms",
                    c.records,
                    t0.elapsed().as_millis()
                )))
            }
            "verify" => {
                let (from, to) = self.endpoints(shared, spec).await?;
                let (a, b) = tokio::join!(
                    shared.cells.checksum(&from, tenant),
                    shared.cells.checksum(&to, tenant)
                );
                let (a, b) = (a.map_err(cell_step)?, b.map_err(cell_step)?);
                st.evidence.insert(
                    "checksums".into(),
                    json!({"source": {"rows": a.rows, "digest": a.digest},
                           "target": {"rows": b.rows, "digest": b.digest}}),
                );
                Self::mark(st, "verified");
                if a != b {
                    return Err(StepError::Fatal(format!(
                        "checksums differ: source {} rows {}, target {} rows {}",
                        a.rows, a.digest, b.rows, b.digest
                    )));
                }
                Ok(Next::Continue(format!(
                    "checksums equal: {} rows, {}",
                    a.rows, a.digest
                )))
            }
            "flip" => self.flip(cx, spec, st).await,
            other => Err(StepError::Fatal(format!("unknown step {other}"))),
        }
    }

    async fn endpoints(
        &self,
        shared: &Shared,
        spec: &MoveSpec,
    ) -> Result<(CellEndpoint, CellEndpoint), StepError> {
        let from = endpoint(shared, &spec.source_cell_id)
            .await
            .map_err(StepError::Fatal)?;
        let to = endpoint(shared, &spec.target_cell_id)
            .await
            .map_err(StepError::Fatal)?;
        Ok((from, to))
    }

    /// The cutover: one transaction repoints the environment at the target, routes it
    /// there (releasing the hold in the same revision), records the flip and audits it.
    async fn flip(
        &self,
        cx: &StepCx<'_>,
        spec: &MoveSpec,
        st: &mut MoveJobState,
    ) -> Result<Next, StepError> {
        let shared = cx.shared();
        let tenant = spec.tenant_id.as_str();
        let target = shared
            .store()
            .get_cell(&spec.target_cell_id)
            .await?
            .ok_or_else(|| StepError::Fatal(format!("cell {} is gone", spec.target_cell_id)))?;
        let endpoint = crate::placement::endpoint_of(&target).ok_or_else(|| {
            StepError::Fatal(format!("cell {} has no endpoint", spec.target_cell_id))
        })?;
        let ctx = Ctx {
            actor: "system:moves".into(),
            correlation_id: cx.correlation_id().unwrap_or("move").to_string(),
        };
        let limit = shared.settings().routing.history_limit;
        let mut tx = shared.store().write().await?;
        let m = tx
            .get_move_tx(&spec.move_id)
            .await?
            .ok_or_else(|| StepError::Fatal("the move is gone".into()))?;
        if m.flipped {
            // Committed by an earlier run of this step.
            if st.flipped_at_ms.is_none() {
                st.flipped_at_ms = Some(now_ms());
            }
            st.hold_ms = m.public.hold_ms;
            return Ok(Next::Continue("already flipped".into()));
        }
        let hold_ms = st.hold_at_ms.map(|h| (now_ms() - h).max(0));
        tx.set_environment_cell(
            tenant,
            &spec.env,
            &spec.target_cell_id,
            &endpoint,
            spec.units,
        )
        .await?;
        let (_, rev) = crate::routing::flip_in(&mut tx, &ctx, tenant, &spec.env, limit).await?;
        tx.mark_move_flipped(&spec.move_id, hold_ms).await?;
        // The tenant's placement record says where the environment lives now.
        let current = tx.get_tenant_tx(tenant).await?;
        let mut doc = match current.as_ref().and_then(|t| t.placement.clone()) {
            Some(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let decision = PlacementDecision {
            env: spec.env.clone(),
            cell_id: spec.target_cell_id.clone(),
            region: target.region.clone(),
            tier: target.tier,
            strategy: "move".into(),
            reason: format!(
                "moved from {} by move {} (job {})",
                spec.source_cell_id, spec.move_id, cx.job.job.job_id
            ),
            utilization_after: if target.capacity.units == 0 {
                1.0
            } else {
                target.used.units as f64 / target.capacity.units as f64
            },
            candidates: vec![spec.target_cell_id.clone()],
            stamped: spec.dedicated,
            units: spec.units.max(0) as u64,
            decided_at: crate::persistence::now(),
        };
        doc.insert(spec.env.clone(), json!(decision));
        tx.set_tenant_placement(tenant, &serde_json::Value::Object(doc))
            .await?;
        if spec.dedicated && target.tier == Tier::Dedicated {
            tx.set_tenant_profile(tenant, Profile::StDedicated.as_str())
                .await?;
        }
        st.hold_ms = hold_ms;
        st.evidence.insert("flip_revision".into(), json!(rev));
        st.evidence.insert("hold_ms".into(), json!(hold_ms));
        st.evidence
            .insert("hold_at_ms".into(), json!(st.hold_at_ms));
        tx.audit(AuditInput {
            tenant_id: Some(tenant),
            event_type: "TENANCY_MOVED",
            actor: "system:moves",
            target: &tenant_target(tenant),
            payload: json!({"move_id": spec.move_id, "job_id": cx.job.job.job_id, "env": spec.env,
                            "from_cell_id": spec.source_cell_id, "to_cell_id": spec.target_cell_id,
                            "dedicated": spec.dedicated, "rows_copied": st.rows_copied,
                            "bytes_copied": st.bytes_copied, "delta_rounds": st.delta_rounds,
                            "hold_ms": hold_ms, "evidence": st.evidence}),
            correlation_id: cx.correlation_id(),
        })
        .await?;
        tx.commit().await?;
        if let Some(r) = rev {
            shared.route_revisions().observe(r);
        }
        st.flipped_at_ms = Some(now_ms());
        self.progress(cx, spec, st, "flip").await;
        Ok(Next::Continue(format!(
            "flipped to {} at revision {}; held {} ms",
            spec.target_cell_id,
            rev.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            hold_ms.unwrap_or(0)
        )))
    }
}

impl Kind for TenantMove {
    const NAME: &'static str = "tenant.move";
    type Spec = MoveSpec;
    type State = MoveJobState;

    fn target(spec: &MoveSpec) -> String {
        tenant_target(&spec.tenant_id)
    }
    /// The tenant (one move, or one lifecycle job, at a time). The cells are held through
    /// the move's row: destroying either is refused while the move runs, and several
    /// moves may leave or enter one cell at once (a drain).
    fn locks(spec: &MoveSpec) -> Vec<String> {
        vec![super::tenant_resource(&spec.tenant_id)]
    }
    fn tenant(spec: &MoveSpec) -> Option<&str> {
        Some(&spec.tenant_id)
    }
    fn steps(&self) -> Vec<&'static str> {
        STEPS.to_vec()
    }
    async fn step(
        &self,
        cx: &StepCx<'_>,
        spec: &MoveSpec,
        state: &mut MoveJobState,
        index: usize,
    ) -> Result<Next, StepError> {
        self.run(cx, spec, state, index).await
    }
    fn wait_limit(&self, shared: &Shared) -> Duration {
        Duration::from_secs(
            shared.settings().placement.stamp_wait_secs
                + shared.settings().moves.purge_grace_secs
                + 3_600,
        )
    }
    fn wait_poll(&self, shared: &Shared) -> Duration {
        Duration::from_millis(shared.settings().job_wait_poll_ms.clamp(10, 1_000))
    }

    async fn undo(&self, cx: &StepCx<'_>, spec: &MoveSpec, _state: &MoveJobState, end: &End) {
        let shared = cx.shared();
        let flipped = match shared.store().get_move(&spec.move_id).await {
            Ok(Some(m)) => m.flipped,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "reading the move to undo it failed");
                return;
            }
        };
        if flipped {
            return;
        }
        tracing::info!(move_id = %spec.move_id, end = ?end, "rolling the move back");
        // The source takes writes again before the hold is released (the finish).
        match endpoint(shared, &spec.source_cell_id).await {
            Ok(from) => {
                let mut last = None;
                for i in 0..5u32 {
                    match shared.cells.unfreeze(&from, &spec.tenant_id).await {
                        Ok(()) => {
                            last = None;
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(100 * (1 << i))).await;
                }
                if let Some(e) = last {
                    tracing::error!(error = %e, cell_id = %spec.source_cell_id,
                        tenant_id = %spec.tenant_id,
                        "unfreezing the source failed: the tenant's writes there are refused until it is unfrozen (runbooks/move-a-tenant.md)");
                }
            }
            Err(why) => tracing::error!(reason = %why, "the source cannot be unfrozen"),
        }
        match endpoint(shared, &spec.target_cell_id).await {
            Ok(to) => {
                if let Err(e) = shared.cells.purge(&to, &spec.tenant_id).await {
                    tracing::warn!(error = %e, "dropping the partial copy on the target failed; the next move there drops it first");
                }
            }
            Err(why) => tracing::warn!(reason = %why, "the target's partial copy was not dropped"),
        }
    }

    async fn finish(
        &self,
        tx: &mut WriteTx,
        cx: &FinishCx<'_>,
        spec: &MoveSpec,
        state: &MoveJobState,
        end: &End,
    ) -> Result<Finished, StoreError> {
        let Some(m) = tx.get_move_tx(&spec.move_id).await? else {
            return Ok(Finished::default());
        };
        if m.public.state != MoveState::Running {
            return Ok(Finished::default());
        }
        let job = &cx.job.job;
        let corr = job.correlation_id.as_deref();
        let tenant = spec.tenant_id.as_str();
        let mut evidence = state.evidence.clone();
        evidence.insert("hold_ms".into(), json!(state.hold_ms.or(m.public.hold_ms)));
        let evidence = serde_json::Value::Object(evidence);
        if *end == End::Succeeded {
            // The tenant is on the target: the job ends here and lets go of the tenant; the
            // purge of the source waits out its grace period in a job of its own (the move
            // stays `running` until then, so the environment is not moved again before).
            let purge = PurgeSpec {
                spec: spec.clone(),
                flipped_at_ms: state.flipped_at_ms.unwrap_or_else(now_ms),
                evidence: state.evidence.clone(),
            };
            super::enqueue::<TenantMovePurge>(tx, &purge, job.max_attempts, corr).await?;
            tx.move_step(&spec.move_id, "purge-source").await?;
            return Ok(Finished::default());
        }
        let error = end.error().unwrap_or("failed").to_string();
        if m.flipped {
            // Forward only: the tenant is on the target; what is left is the purge.
            tx.end_move(&spec.move_id, MoveState::Failed, Some(&error), &evidence)
                .await?;
            tx.audit(AuditInput {
                tenant_id: Some(tenant),
                event_type: "TENANCY_MOVE_FAILED",
                actor: "system:moves",
                target: &job.target,
                payload: json!({"move_id": spec.move_id, "job_id": job.job_id, "env": spec.env,
                                "error": error, "flipped": true,
                                "source_purged": !m.source_held}),
                correlation_id: corr,
            })
            .await?;
            return Ok(Finished::default());
        }
        // Roll back: the route (still on the source) serves again; the target's capacity
        // goes back.
        let ctx = Ctx {
            actor: "system:moves".into(),
            correlation_id: corr.unwrap_or("move").to_string(),
        };
        let limit = cx.shared.settings().routing.history_limit;
        let mut revision = None;
        let held = tx
            .get_route_tx(tenant, &spec.env)
            .await?
            .is_some_and(|r| r.mode == RouteMode::Hold);
        if held {
            let (_, rev) =
                crate::routing::set_mode_in(tx, &ctx, tenant, &spec.env, RouteMode::Serve, limit)
                    .await
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            revision = rev;
        }
        let gave_back = tx.take_target_reservation(&spec.move_id).await?;
        if gave_back {
            tx.give_back_capacity(&spec.target_cell_id, spec.units)
                .await?;
        }
        tx.end_move(
            &spec.move_id,
            MoveState::RolledBack,
            Some(&error),
            &evidence,
        )
        .await?;
        tx.audit(AuditInput {
            tenant_id: Some(tenant),
            event_type: "TENANCY_MOVE_ROLLED_BACK",
            actor: "system:moves",
            target: &job.target,
            payload: json!({"move_id": spec.move_id, "job_id": job.job_id, "env": spec.env,
                            "from_cell_id": spec.source_cell_id, "to_cell_id": spec.target_cell_id,
                            "error": error, "cancelled": *end == End::Cancelled,
                            "hold_released": held, "target_units_released": gave_back,
                            "rows_copied": state.rows_copied, "bytes_copied": state.bytes_copied,
                            "delta_rounds": state.delta_rounds, "hold_ms": state.hold_at_ms.map(|h| (now_ms() - h).max(0)),
                            "evidence": evidence}),
            correlation_id: corr,
        })
        .await?;
        Ok(Finished {
            routes_revision: revision,
        })
    }
}

/// The purge that follows a move's flip.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeSpec {
    #[serde(flatten)]
    pub spec: MoveSpec,
    /// When the move flipped (Unix ms): the grace period counts from here.
    pub flipped_at_ms: i64,
    /// The move's evidence so far; the purge adds to it.
    #[serde(default)]
    pub evidence: serde_json::Map<String, serde_json::Value>,
}

/// `tenant.move-purge`: after a move's flip and its grace period, purges the tenant's
/// (frozen) copy from the source cell and gives the source's capacity back; then the move
/// has succeeded. Holds no lock: the tenant is already served by the target.
pub struct TenantMovePurge;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PurgeState {
    pub purged_rows: Option<i64>,
}

impl Kind for TenantMovePurge {
    const NAME: &'static str = "tenant.move-purge";
    type Spec = PurgeSpec;
    type State = PurgeState;

    fn target(p: &PurgeSpec) -> String {
        tenant_target(&p.spec.tenant_id)
    }
    fn locks(_p: &PurgeSpec) -> Vec<String> {
        Vec::new()
    }
    fn tenant(p: &PurgeSpec) -> Option<&str> {
        Some(&p.spec.tenant_id)
    }
    fn steps(&self) -> Vec<&'static str> {
        vec!["purge-source"]
    }
    fn wait_limit(&self, shared: &Shared) -> Duration {
        Duration::from_secs(shared.settings().moves.purge_grace_secs + 7 * 86_400)
    }
    fn wait_poll(&self, shared: &Shared) -> Duration {
        Duration::from_millis(shared.settings().job_wait_poll_ms.clamp(10, 1_000))
    }
    async fn step(
        &self,
        cx: &StepCx<'_>,
        p: &PurgeSpec,
        st: &mut PurgeState,
        _index: usize,
    ) -> Result<Next, StepError> {
        let shared = cx.shared();
        let store = shared.store();
        let cfg = &shared.settings().moves;
        let spec = &p.spec;
        let tenant = spec.tenant_id.as_str();
        let due = p.flipped_at_ms + (cfg.purge_grace_secs as i64) * 1000;
        if now_ms() < due {
            return Ok(Next::Wait(format!(
                "the source keeps its frozen copy until {} ({} s grace)",
                crate::persistence::fmt_time(
                    chrono::DateTime::from_timestamp_millis(due).unwrap_or_default()
                ),
                cfg.purge_grace_secs
            )));
        }
        // Never purge the cell the environment lives on (defensive: a move holds the
        // environment until its purge, so it cannot have come back).
        let on = store
            .list_environments(tenant)
            .await?
            .into_iter()
            .find(|e| e.name == spec.env)
            .and_then(|e| e.cell_id);
        let purged = if on.as_deref() == Some(spec.source_cell_id.as_str()) {
            tracing::warn!(tenant_id = tenant, cell_id = %spec.source_cell_id,
                "the environment is on the source again: not purged");
            None
        } else {
            match endpoint(shared, &spec.source_cell_id).await {
                Ok(f) => match shared.cells.purge(&f, tenant).await {
                    Ok(n) => Some(n),
                    Err(CellError::Unavailable { detail, .. }) => {
                        return Ok(Next::Wait(format!(
                            "purging the source: {detail}; trying again"
                        )))
                    }
                    Err(e) => return Err(StepError::Fatal(e.to_string())),
                },
                Err(why) => {
                    tracing::warn!(reason = %why, "the source cannot be purged");
                    None
                }
            }
        };
        st.purged_rows = purged;
        Ok(Next::Continue(format!(
            "source {} purged ({} record(s))",
            spec.source_cell_id,
            purged
                .map(|n| n.to_string())
                .unwrap_or_else(|| "none".into())
        )))
    }

    async fn finish(
        &self,
        tx: &mut WriteTx,
        cx: &FinishCx<'_>,
        p: &PurgeSpec,
        st: &PurgeState,
        end: &End,
    ) -> Result<Finished, StoreError> {
        let spec = &p.spec;
        let job = &cx.job.job;
        let mut evidence = p.evidence.clone();
        evidence.insert("purged_rows".into(), json!(st.purged_rows));
        let evidence = serde_json::Value::Object(evidence);
        if *end != End::Succeeded {
            let error = format!(
                "the tenant is on {}; purging the source {} failed: {}",
                spec.target_cell_id,
                spec.source_cell_id,
                end.error().unwrap_or("failed")
            );
            tx.end_move(&spec.move_id, MoveState::Failed, Some(&error), &evidence)
                .await?;
            tx.audit(AuditInput {
                tenant_id: Some(&spec.tenant_id),
                event_type: "TENANCY_MOVE_FAILED",
                actor: "system:moves",
                target: &job.target,
                payload: json!({"move_id": spec.move_id, "job_id": job.job_id, "env": spec.env,
                                "error": error, "flipped": true, "source_purged": false}),
                correlation_id: job.correlation_id.as_deref(),
            })
            .await?;
            return Ok(Finished::default());
        }
        if tx.take_source_hold(&spec.move_id).await? {
            tx.give_back_capacity(&spec.source_cell_id, spec.units)
                .await?;
            tx.audit(AuditInput {
                tenant_id: Some(&spec.tenant_id),
                event_type: "TENANCY_MOVE_SOURCE_PURGED",
                actor: "system:moves",
                target: &job.target,
                payload: json!({"move_id": spec.move_id, "env": spec.env,
                                "cell_id": spec.source_cell_id, "purged_rows": st.purged_rows,
                                "units_released": spec.units}),
                correlation_id: job.correlation_id.as_deref(),
            })
            .await?;
        }
        tx.end_move(&spec.move_id, MoveState::Succeeded, None, &evidence)
            .await?;
        Ok(Finished::default())
    }
}
