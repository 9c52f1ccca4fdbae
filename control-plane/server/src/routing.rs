//! The routing table: publishing, holding, flipping and removing a tenant's routes, the
//! long-poll watch routers consume, and their heartbeats.
//!
//! The writes are functions on a write transaction ([`publish_in`], [`remove_in`],
//! [`set_mode_in`], [`flip_in`]): each bumps the global revision per route it changes and
//! appends its audit record, so a job step or an API call composes several of them with
//! placement and lifecycle writes in one commit (a move's cutover flips a route, repoints
//! the environment and releases the source's capacity at once). [`Routing`] wraps them
//! for callers that change only routes, and announces each committed revision on
//! [`RevisionWatch`] so waiting watchers answer at once. A poller re-reads the revision
//! from the store so a watch served by one replica also sees changes committed by another.
//! Nothing here knows the service or the job engine.

use crate::config::RoutingConfig;
use crate::ctx::{tenant_target, Ctx};
use crate::error::{invalid, not_found, Result, ServiceError};
use crate::persistence::{self, AuditInput, RouteWrite, Store, WriteTx};
use cellplane_api::{
    CellCounters, CellMetrics, FieldError, Route, RouteChanges, RouteHistoryEntry, RouteMode,
    RouterHeartbeat, RouterInfo,
};
use serde_json::json;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The latest routing revision this process knows of, and the stop signal that ends
/// pending long polls when the server shuts down.
#[derive(Clone)]
pub struct RevisionWatch {
    tx: watch::Sender<i64>,
    stop: CancellationToken,
}

impl Default for RevisionWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RevisionWatch {
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(0),
            stop: CancellationToken::new(),
        }
    }

    /// Announces `rev` if it is newer than what is known.
    pub fn observe(&self, rev: i64) {
        self.tx.send_if_modified(|cur| {
            if rev > *cur {
                *cur = rev;
                true
            } else {
                false
            }
        });
    }

    pub fn current(&self) -> i64 {
        *self.tx.borrow()
    }

    /// Ends every pending and future wait (server shutdown).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Re-reads the revision every `every` until `stop`.
pub fn spawn_revision_poller(
    routing: Routing,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match routing.store.routing_head().await {
                Ok(h) => routing.revisions().observe(h.revision),
                Err(e) => tracing::debug!(error = %e, "reading the routing revision failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    })
}

fn route_target(tenant_id: &str, env: &str) -> String {
    format!("route/{tenant_id}/{env}")
}

/// The routing table's operations for callers that change only routes: each opens and
/// commits its own transaction around the `*_in` functions and announces the revision.
#[derive(Clone)]
pub struct Routing {
    store: Store,
    revisions: RevisionWatch,
    config: RoutingConfig,
}

impl Routing {
    pub fn new(store: Store, config: RoutingConfig) -> Self {
        Self {
            store,
            revisions: RevisionWatch::new(),
            config,
        }
    }

    /// The routing revision as last seen by this process.
    pub fn revisions(&self) -> &RevisionWatch {
        &self.revisions
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// Route changes kept for delta watches (the `history_limit` the `*_in` writes take).
    pub fn history_limit(&self) -> i64 {
        self.config.history_limit
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn route_revisions(&self) -> &RevisionWatch {
        &self.revisions
    }

    /// `GET /v1/routes?since&wait`: answers at once when the table moved past `since`,
    /// else waits up to `wait` for a change.
    pub async fn route_changes(&self, since: i64, wait: Duration) -> Result<RouteChanges> {
        let mut rx = self.route_revisions().tx.subscribe();
        let head = self.store().routing_head().await?;
        self.route_revisions().observe(head.revision);
        if since == head.revision && !wait.is_zero() {
            let stop = self.route_revisions().stop.clone();
            let deadline = tokio::time::sleep(wait);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() || *rx.borrow_and_update() > since {
                            break;
                        }
                    }
                    _ = &mut deadline => break,
                    _ = stop.cancelled() => break,
                }
            }
        }
        Ok(self.store().route_changes(since).await?)
    }

    pub async fn route_history(
        &self,
        tenant_id: Option<&str>,
        before: i64,
        limit: i64,
    ) -> Result<Vec<RouteHistoryEntry>> {
        Ok(self.store().route_history(tenant_id, before, limit).await?)
    }

    pub async fn get_route(&self, tenant_id: &str, env: &str) -> Result<Route> {
        self.store()
            .get_route(tenant_id, env)
            .await?
            .ok_or_else(|| not_found("route", &format!("{tenant_id}/{env}")))
    }

    /// Publishes a route for every placed environment of the tenant with `mode`. Idempotent:
    /// routes that already say this are left alone and do not bump the revision.
    pub async fn publish_tenant_routes(
        &self,
        tenant_id: &str,
        mode: RouteMode,
        correlation_id: Option<&str>,
    ) -> Result<Vec<String>> {
        self.publish_routes(tenant_id, mode, false, correlation_id)
            .await
    }

    /// Publishes `mode` for the placed environments that have no route yet, leaving the
    /// others as they are (an operator's `hold` on another environment stays).
    pub async fn publish_missing_routes(
        &self,
        tenant_id: &str,
        mode: RouteMode,
        correlation_id: Option<&str>,
    ) -> Result<Vec<String>> {
        self.publish_routes(tenant_id, mode, true, correlation_id)
            .await
    }

    async fn publish_routes(
        &self,
        tenant_id: &str,
        mode: RouteMode,
        only_missing: bool,
        correlation_id: Option<&str>,
    ) -> Result<Vec<String>> {
        let limit = self.config.history_limit;
        let mut tx = self.store().write().await?;
        let (changed, last) = publish_in(
            &mut tx,
            tenant_id,
            mode,
            only_missing,
            limit,
            correlation_id,
        )
        .await?;
        if let Some(rev) = last {
            tx.commit().await?;
            self.route_revisions().observe(rev);
        }
        Ok(changed)
    }

    /// Re-publishes the tenant's routes with its current rate limit, keeping each route's
    /// mode unless it is held (a hold belongs to an operator or a move and is kept).
    pub async fn republish_rate_limit(
        &self,
        tenant_id: &str,
        mode: RouteMode,
        correlation_id: &str,
    ) -> Result<Vec<String>> {
        let held = {
            let envs = self.store().list_environments(tenant_id).await?;
            let mut any = false;
            for e in &envs {
                if let Some(r) = self.store().get_route(tenant_id, &e.name).await? {
                    any |= r.mode == RouteMode::Hold;
                }
            }
            any
        };
        if held {
            return Ok(Vec::new());
        }
        self.publish_tenant_routes(tenant_id, mode, Some(correlation_id))
            .await
    }

    /// Removes every route of the tenant.
    pub async fn remove_tenant_routes(
        &self,
        tenant_id: &str,
        correlation_id: Option<&str>,
    ) -> Result<Vec<String>> {
        let limit = self.config.history_limit;
        let mut tx = self.store().write().await?;
        let (removed, last) = remove_in(&mut tx, tenant_id, limit, correlation_id).await?;
        if let Some(rev) = last {
            tx.commit().await?;
            self.route_revisions().observe(rev);
        }
        Ok(removed)
    }

    /// Operators park a route's requests (`hold`) and let them go (`serve`).
    pub async fn set_route_mode(
        &self,
        ctx: &Ctx,
        tenant_id: &str,
        env: &str,
        mode: RouteMode,
    ) -> Result<Route> {
        if mode == RouteMode::Suspended {
            return Err(invalid(
                "mode",
                "suspend the tenant instead; routes may be set to hold or serve",
            ));
        }
        let limit = self.config.history_limit;
        let mut tx = self.store().write().await?;
        let (route, rev) = set_mode_in(&mut tx, ctx, tenant_id, env, mode, limit).await?;
        if let Some(rev) = rev {
            tx.commit().await?;
            self.route_revisions().observe(rev);
        }
        Ok(route)
    }

    /// A router reports the revision it serves. The first heartbeat of a router is
    /// audited; later ones are observations and are not.
    pub async fn router_heartbeat(
        &self,
        ctx: &Ctx,
        router_id: &str,
        hb: RouterHeartbeat,
    ) -> Result<RouterInfo> {
        let mut errors = Vec::new();
        crate::validate::validate_count("applied_revision", hb.applied_revision, 0, &mut errors);
        if let Some(d) = hb.drained_revision {
            crate::validate::validate_count("drained_revision", d, 0, &mut errors);
        }
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        if hb
            .stats
            .as_ref()
            .is_some_and(|s| s.to_string().len() > 8192)
        {
            return Err(invalid("stats", "must serialize to at most 8192 bytes"));
        }
        crate::usage::validate_batches(&hb.usage)?;
        validate_cell_counters(&hb.cells)?;
        let mut tx = self.store().write().await?;
        let new = tx.router_heartbeat(router_id, &hb).await?;
        // Usage rides on the heartbeat; each batch applies once, in this transaction.
        let now = persistence::now();
        for b in &hb.usage {
            let records: Vec<_> = b
                .records
                .iter()
                .map(|r| cellplane_api::UsageRecord {
                    minute: crate::usage::stored_minute(&r.minute),
                    ..r.clone()
                })
                .collect();
            tx.apply_usage_batch(router_id, &b.batch_id, &records, &now)
                .await?;
        }
        if !hb.cells.is_empty() {
            // The traffic since this router's previous heartbeat, per cell that had any,
            // added to the slot that interval started in (one row per cell).
            let previous = tx.latest_cell_samples(router_id).await?;
            let slot_secs = self.config.cell_slot_secs.max(1) as i64;
            let mut deltas: std::collections::BTreeMap<&str, persistence::CellDelta> =
                Default::default();
            for c in &hb.cells {
                let Some(prev) = previous.get(&c.cell_id) else {
                    continue;
                };
                let Some(since) = persistence::parse_time(&prev.at) else {
                    continue;
                };
                let d = counter_delta(&prev.counters, c);
                if d.total == 0 {
                    continue;
                }
                deltas.insert(
                    &c.cell_id,
                    persistence::CellDelta {
                        cell_id: c.cell_id.clone(),
                        slot: since.timestamp().div_euclid(slot_secs) * slot_secs,
                        total: d.total,
                        errors: d.errors,
                        le: c.le.clone(),
                        buckets: d.buckets.iter().map(|(_, n)| *n).collect(),
                    },
                );
            }
            // Only each router's newest counters are kept: the next heartbeat subtracts
            // them; windows read the slots.
            tx.record_cell_samples(router_id, &now, &hb.cells, &now)
                .await?;
            let deltas: Vec<persistence::CellDelta> = deltas.into_values().collect();
            let keep_slots = chrono::Utc::now().timestamp()
                - self
                    .config
                    .cell_sample_retention_secs
                    .min(i64::MAX as u64 / 2) as i64;
            tx.record_cell_deltas(&deltas, keep_slots).await?;
        }
        if new {
            tx.audit(AuditInput {
                tenant_id: None,
                event_type: "ROUTE_ROUTER_REGISTERED",
                actor: &ctx.actor,
                target: &format!("router/{router_id}"),
                payload: json!({"applied_revision": hb.applied_revision}),
                correlation_id: Some(&ctx.correlation_id),
            })
            .await?;
        }
        tx.commit().await?;
        let ts = persistence::now();
        let current = self.route_revisions().current();
        Ok(RouterInfo {
            router_id: router_id.to_string(),
            applied_revision: hb.applied_revision,
            drained_revision: hb.drained_revision.unwrap_or(0),
            lag: (current - hb.applied_revision).max(0),
            stats: hb.stats,
            first_seen: ts.clone(),
            last_seen: ts,
            live: true,
        })
    }

    /// A cell's traffic over the last `window_secs`, summed over the routers that reported
    /// it (the built-in metrics provider of release gates), and how many routers that is.
    pub async fn cell_window(
        &self,
        cell_id: &str,
        window_secs: u64,
    ) -> Result<(crate::gates::Window, u64)> {
        self.cell_window_since(cell_id, window_secs, "").await
    }

    /// [`Routing::cell_window`] counting nothing from before `floor` (RFC 3339; empty:
    /// no floor): a wave's bake measures only traffic after its cells settled.
    pub async fn cell_window_since(
        &self,
        cell_id: &str,
        window_secs: u64,
        floor: &str,
    ) -> Result<(crate::gates::Window, u64)> {
        let mut all = self
            .cell_windows_since(&[cell_id.to_string()], window_secs, floor)
            .await?;
        Ok(all.remove(cell_id).unwrap_or_default())
    }

    /// The first whole slot of a window that starts `window_secs` ago, or at `floor`
    /// (RFC 3339) when later: traffic from before the start is never counted.
    pub fn first_slot(&self, window_secs: u64, floor: &str) -> i64 {
        let start = window_start(window_secs, floor);
        let secs = persistence::parse_time(&start)
            .map(|t| t.timestamp())
            .unwrap_or_default();
        let slot = self.config.cell_slot_secs.max(1) as i64;
        (secs + slot - 1).div_euclid(slot) * slot
    }

    /// Several cells' windows at once (one grouped query per 64 cells): the traffic of
    /// the slots that start inside the window (`window_secs` ago, or at `floor` when
    /// later), and how many router intervals it came from.
    pub async fn cell_windows_since(
        &self,
        cells: &[String],
        window_secs: u64,
        floor: &str,
    ) -> Result<std::collections::HashMap<String, (crate::gates::Window, u64)>> {
        let slot = self.first_slot(window_secs, floor);
        let mut traffic = self.store().cell_traffic(cells, slot).await?;
        Ok(cells
            .iter()
            .map(|c| {
                let t = traffic.remove(c).unwrap_or_default();
                let w = crate::gates::Window {
                    total: t.total,
                    errors: t.errors,
                    buckets: t.buckets,
                };
                (c.clone(), (w, t.reports))
            })
            .collect())
    }

    /// `GET /v1/cells/{id}/metrics`.
    pub async fn cell_metrics(&self, cell_id: &str, window_secs: u64) -> Result<CellMetrics> {
        let (w, _) = self.cell_window(cell_id, window_secs).await?;
        let routers = self
            .store()
            .routers_reporting(cell_id, &window_start(window_secs, ""))
            .await?;
        let ms = |q| crate::gates::percentile(&w.buckets, q).map(|s| s * 1000.0);
        Ok(CellMetrics {
            cell_id: cell_id.to_string(),
            window_secs,
            routers,
            requests: w.total,
            errors: w.errors,
            error_ratio: crate::gates::error_ratio(&w),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        })
    }

    pub async fn list_routers(&self) -> Result<Vec<RouterInfo>> {
        let head = self.store().routing_head().await?;
        let live_after =
            chrono::Utc::now() - chrono::Duration::seconds(self.config.router_live_secs as i64);
        Ok(self
            .store()
            .list_routers()
            .await?
            .into_iter()
            .map(|r| RouterInfo {
                live: persistence::parse_time(&r.last_seen).is_some_and(|t| t >= live_after),
                lag: (head.revision - r.applied_revision).max(0),
                router_id: r.router_id,
                applied_revision: r.applied_revision,
                drained_revision: r.drained_revision,
                stats: r.stats,
                first_seen: r.first_seen,
                last_seen: r.last_seen,
            })
            .collect())
    }
}

/// Publishes `mode` for every placed environment of the tenant (or only those without a
/// route) in the caller's transaction, with its audit record. Idempotent: routes that
/// already say this are left alone and do not bump the revision. Returns the environments
/// changed and the last revision written.
pub async fn publish_in(
    tx: &mut WriteTx,
    tenant_id: &str,
    mode: RouteMode,
    only_missing: bool,
    history_limit: i64,
    correlation_id: Option<&str>,
) -> Result<(Vec<String>, Option<i64>)> {
    let t = tx
        .get_tenant_tx(tenant_id)
        .await?
        .ok_or_else(|| not_found("tenant", tenant_id))?;
    let envs = tx.list_environments_tx(tenant_id).await?;
    let mut changed = Vec::new();
    let mut last = None;
    for e in &envs {
        let (Some(cell), Some(endpoint)) = (&e.cell_id, &e.endpoint) else {
            continue;
        };
        if only_missing && tx.get_route_tx(tenant_id, &e.name).await?.is_some() {
            continue;
        }
        let route = Route {
            tenant_id: tenant_id.to_string(),
            env: e.name.clone(),
            cell_id: cell.clone(),
            endpoint: endpoint.clone(),
            mode,
            rate_limit: t.quotas.api_rate_limit,
        };
        if let RouteWrite::Changed(rev) = tx.put_route(&route, history_limit).await? {
            changed.push(json!({"env": e.name, "cell_id": cell, "endpoint": endpoint,
                                "mode": mode, "rate_limit": route.rate_limit, "revision": rev}));
            last = Some(rev);
        }
    }
    let envs_changed: Vec<String> = changed
        .iter()
        .filter_map(|c| c["env"].as_str().map(str::to_string))
        .collect();
    if let Some(rev) = last {
        tx.audit(AuditInput {
            tenant_id: Some(tenant_id),
            event_type: "ROUTE_CHANGED",
            actor: "system:jobs",
            target: &tenant_target(tenant_id),
            payload: json!({"routes": changed, "revision": rev}),
            correlation_id,
        })
        .await?;
    }
    Ok((envs_changed, last))
}

/// Removes every route of the tenant in the caller's transaction, with its audit record.
pub async fn remove_in(
    tx: &mut WriteTx,
    tenant_id: &str,
    history_limit: i64,
    correlation_id: Option<&str>,
) -> Result<(Vec<String>, Option<i64>)> {
    let envs = tx.list_environments_tx(tenant_id).await?;
    let mut removed = Vec::new();
    let mut last = None;
    for e in &envs {
        if let RouteWrite::Changed(rev) = tx.remove_route(tenant_id, &e.name, history_limit).await?
        {
            removed.push(e.name.clone());
            last = Some(rev);
        }
    }
    if let Some(rev) = last {
        tx.audit(AuditInput {
            tenant_id: Some(tenant_id),
            event_type: "ROUTE_REMOVED",
            actor: "system:jobs",
            target: &tenant_target(tenant_id),
            payload: json!({"envs": removed, "revision": rev}),
            correlation_id,
        })
        .await?;
    }
    Ok((removed, last))
}

/// Sets the mode of one route (an operator's or a move's `hold`, and `serve` to let its
/// requests go) in the caller's transaction, with its audit record. A suspended route
/// belongs to its tenant's lifecycle and is refused. Returns the route and the revision
/// written (none when it already had `mode`).
pub async fn set_mode_in(
    tx: &mut WriteTx,
    ctx: &Ctx,
    tenant_id: &str,
    env: &str,
    mode: RouteMode,
    history_limit: i64,
) -> Result<(Route, Option<i64>)> {
    let mut route = tx
        .get_route_tx(tenant_id, env)
        .await?
        .ok_or_else(|| not_found("route", &format!("{tenant_id}/{env}")))?;
    if route.mode == RouteMode::Suspended {
        return Err(ServiceError::Conflict(format!(
            "the route of {tenant_id}/{env} is suspended with its tenant; resume the tenant first"
        )));
    }
    let from = route.mode;
    route.mode = mode;
    let RouteWrite::Changed(rev) = tx.put_route(&route, history_limit).await? else {
        return Ok((route, None));
    };
    tx.audit(AuditInput {
        tenant_id: Some(tenant_id),
        event_type: if mode == RouteMode::Hold {
            "ROUTE_HELD"
        } else {
            "ROUTE_RELEASED"
        },
        actor: &ctx.actor,
        target: &route_target(tenant_id, env),
        payload: json!({"from": from, "to": mode, "revision": rev, "cell_id": route.cell_id}),
        correlation_id: Some(&ctx.correlation_id),
    })
    .await?;
    Ok((route, Some(rev)))
}

/// Points the route of one environment at the cell the environment now lives on and
/// serves it (a held route is released in the same revision): a move's cutover, after it
/// repointed the environment in the same transaction. Refused when the environment has
/// no cell or its tenant is suspended. Returns the route and the revision written (none
/// when the route already said this).
pub async fn flip_in(
    tx: &mut WriteTx,
    ctx: &Ctx,
    tenant_id: &str,
    env: &str,
    history_limit: i64,
) -> Result<(Route, Option<i64>)> {
    let t = tx
        .get_tenant_tx(tenant_id)
        .await?
        .ok_or_else(|| not_found("tenant", tenant_id))?;
    let e = tx
        .list_environments_tx(tenant_id)
        .await?
        .into_iter()
        .find(|e| e.name == env)
        .ok_or_else(|| not_found("environment", &format!("{tenant_id}/{env}")))?;
    let (Some(cell_id), Some(endpoint)) = (e.cell_id, e.endpoint) else {
        return Err(ServiceError::Conflict(format!(
            "{tenant_id}/{env} is not placed on a cell: nothing to route to"
        )));
    };
    let previous = tx.get_route_tx(tenant_id, env).await?;
    if previous
        .as_ref()
        .is_some_and(|r| r.mode == RouteMode::Suspended)
    {
        return Err(ServiceError::Conflict(format!(
            "the route of {tenant_id}/{env} is suspended with its tenant; resume the tenant first"
        )));
    }
    let route = Route {
        tenant_id: tenant_id.to_string(),
        env: env.to_string(),
        cell_id,
        endpoint,
        mode: RouteMode::Serve,
        rate_limit: t.quotas.api_rate_limit,
    };
    let RouteWrite::Changed(rev) = tx.put_route(&route, history_limit).await? else {
        return Ok((route, None));
    };
    tx.audit(AuditInput {
        tenant_id: Some(tenant_id),
        event_type: "ROUTE_FLIPPED",
        actor: &ctx.actor,
        target: &route_target(tenant_id, env),
        payload: json!({"from_cell_id": previous.as_ref().map(|r| &r.cell_id),
                        "from_mode": previous.as_ref().map(|r| r.mode),
                        "to_cell_id": route.cell_id, "revision": rev}),
        correlation_id: Some(&ctx.correlation_id),
    })
    .await?;
    Ok((route, Some(rev)))
}

/// What happened between two samples of one router's counters for a cell. A counter that
/// went down means the router restarted: everything in the newer sample is new.
/// A window's start: `window_secs` ago, or `floor` (RFC 3339) when later.
pub fn window_start(window_secs: u64, floor: &str) -> String {
    let start = persistence::fmt_time(
        chrono::Utc::now() - chrono::Duration::seconds(window_secs.min(i64::MAX as u64 / 2) as i64),
    );
    if floor > start.as_str() {
        floor.to_string()
    } else {
        start
    }
}

pub fn counter_delta(a: &CellCounters, b: &CellCounters) -> crate::gates::Window {
    let reset = a.le != b.le
        || a.codes.iter().zip(&b.codes).any(|(x, y)| y < x)
        || a.buckets.iter().zip(&b.buckets).any(|(x, y)| y < x);
    let sub = |x: &[u64], y: &[u64]| -> Vec<u64> {
        if reset {
            y.to_vec()
        } else {
            y.iter().zip(x).map(|(y, x)| y - x).collect()
        }
    };
    let codes = sub(&a.codes, &b.codes);
    let buckets = sub(&a.buckets, &b.buckets);
    let mut le: Vec<f64> = b.le.clone();
    le.push(f64::INFINITY);
    crate::gates::Window {
        total: codes.iter().sum(),
        errors: codes.get(4).copied().unwrap_or(0),
        buckets: le.into_iter().zip(buckets).collect(),
    }
}

/// The per-cell counters of a heartbeat: valid ids, five status classes, ascending finite
/// bounds and one more cumulative bucket than bounds.
fn validate_cell_counters(cells: &[CellCounters]) -> Result<()> {
    let mut errors = Vec::new();
    if cells.len() > 100_000 {
        errors.push(FieldError {
            field: "cells".into(),
            message: "at most 100000 cells".into(),
        });
    }
    for (i, c) in cells.iter().enumerate().take(100_000) {
        let at = |f: &str| format!("cells[{i}].{f}");
        if let Err(e) = cellplane_api::validate_id(&c.cell_id) {
            errors.push(FieldError {
                field: at("cell_id"),
                message: e.to_string(),
            });
        }
        if c.codes.len() != 5 {
            errors.push(FieldError {
                field: at("codes"),
                message: "must have 5 entries (1xx … 5xx)".into(),
            });
        }
        if c.le.len() > persistence::DELTA_BOUNDS
            || c.le.iter().any(|b| !b.is_finite() || *b <= 0.0)
            || c.le.windows(2).any(|w| w[0] >= w[1])
        {
            errors.push(FieldError {
                field: at("le"),
                message: format!(
                    "at most {} ascending positive finite bounds",
                    persistence::DELTA_BOUNDS
                ),
            });
        }
        if c.buckets.len() != c.le.len() + 1 || c.buckets.windows(2).any(|w| w[0] > w[1]) {
            errors.push(FieldError {
                field: at("buckets"),
                message: "must be cumulative with one more entry than le".into(),
            });
        }
        if errors.len() > 20 {
            break;
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ServiceError::Validation(errors))
    }
}

#[cfg(test)]
mod cell_counter_tests {
    use super::*;

    fn c(codes: [u64; 5], buckets: [u64; 3]) -> CellCounters {
        CellCounters {
            cell_id: "pool-1".into(),
            codes: codes.to_vec(),
            le: vec![0.1, 1.0],
            buckets: buckets.to_vec(),
        }
    }

    #[test]
    fn deltas_subtract_and_survive_a_router_restart() {
        let a = c([0, 90, 0, 0, 10], [80, 95, 100]);
        let b = c([0, 150, 0, 0, 50], [150, 190, 200]);
        let w = counter_delta(&a, &b);
        assert_eq!((w.total, w.errors), (100, 40));
        assert_eq!(w.buckets, vec![(0.1, 70), (1.0, 95), (f64::INFINITY, 100)]);
        // The router restarted between the samples: its counters began again.
        let restarted = c([0, 5, 0, 0, 1], [6, 6, 6]);
        let w = counter_delta(&b, &restarted);
        assert_eq!((w.total, w.errors), (6, 1));
    }

    #[test]
    fn malformed_counters_are_named() {
        let mut bad = c([0; 5], [0; 3]);
        bad.le = vec![1.0, 0.1];
        let Err(ServiceError::Validation(e)) = validate_cell_counters(&[bad]) else {
            panic!("accepted");
        };
        assert_eq!(e[0].field, "cells[0].le");
        assert!(validate_cell_counters(&[c([1, 2, 3, 4, 5], [1, 2, 3])]).is_ok());
    }
}
