//! Keeping the table current: a long-poll watch on `GET /v1/routes?since=REV` with capped,
//! jittered exponential backoff; heartbeats that ack the applied revision and the drained
//! one (`{"applied_revision": R, "drained_revision": D, "stats": {…}}`: D is the newest
//! revision whose held routes had no request left in flight to a cell, acked as soon as
//! the last one ends); and the writer that mirrors each applied snapshot to the state
//! file. None of this is on the request path: when the control plane is unreachable the
//! router keeps serving the table it has. The rejoin fence (`proxy::Fence`) wakes the
//! watch for an immediate fetch and is lifted by the first fetch that started after it.

use crate::proxy::RouterState;
use crate::table::TableBuilder;
use cellplane_api::Client;
use rand::Rng;
use reqwest::Method;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What the watch learned about the control plane, for healthz and heartbeats.
pub struct SyncStatus {
    started: Instant,
    /// Milliseconds since start of the last successful watch answer; -1 never.
    last_ok_ms: AtomicI64,
    /// Where the current table came from: 0 empty, 1 state file, 2 control plane.
    pub source: AtomicI64,
}

impl Default for SyncStatus {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_ok_ms: AtomicI64::new(-1),
            source: AtomicI64::new(0),
        }
    }
}

impl SyncStatus {
    fn mark_ok(&self) {
        self.mark_reachable();
        self.source.store(2, Ordering::Relaxed);
    }

    /// The control plane answered (a watch or a heartbeat).
    fn mark_reachable(&self) {
        self.last_ok_ms
            .store(self.started.elapsed().as_millis() as i64, Ordering::Relaxed);
    }

    /// Milliseconds since the control plane last answered, if it ever did.
    pub fn since_last_ok_ms(&self) -> Option<u64> {
        let at = self.last_ok_ms.load(Ordering::Relaxed);
        (at >= 0).then(|| (self.started.elapsed().as_millis() as i64 - at).max(0) as u64)
    }

    pub fn source_name(&self) -> &'static str {
        match self.source.load(Ordering::Relaxed) {
            1 => "state-file",
            2 => "control-plane",
            _ => "empty",
        }
    }
}

pub struct Syncer {
    pub state: Arc<RouterState>,
    pub client: Client,
    pub builder: Arc<Mutex<TableBuilder>>,
    pub wait_secs: u64,
    pub max_backoff: Duration,
    pub status: Arc<SyncStatus>,
}

impl Syncer {
    /// Watches until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut failures: u32 = 0;
        let mut first = true;
        loop {
            let since = self.state.table.load().revision;
            // After a start or a failure, ask without waiting: a table that changed while
            // we were away arrives at once, and an unchanged one confirms we are current.
            // The same after a gap longer than the lease (the rejoin fence).
            let fence = &self.state.fence;
            let wait = if first || failures > 0 || fence.resync_needed() {
                0
            } else {
                self.wait_secs
            };
            first = false;
            let at_start = fence.fetch_started();
            let fetch = self.fetch(since, wait);
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                r = fetch => r,
                // The fence tripped: this long poll started before; ask again at once.
                _ = fence.wake.notified() => continue,
            };
            match outcome {
                Ok(applied) => {
                    if applied && fence.fetched(at_start) {
                        tracing::info!(
                            revision = self.state.table.load().revision,
                            "routing table fetched again after the gap; serving"
                        );
                        self.state.wake_held();
                    }
                    if failures > 0 {
                        tracing::info!(failures, "control plane reachable again");
                    }
                    failures = 0;
                    self.status.mark_ok();
                    crate::metrics::RouterCounters::inc(&self.state.counters.sync_ok);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    crate::metrics::RouterCounters::inc(&self.state.counters.sync_errors);
                    // Log the first failure and then every tenth, not every retry.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(error = %e, failures, revision = since,
                            "routing table watch failed; serving the last-known table");
                    }
                    let base = 100u64.saturating_mul(1 << failures.min(10));
                    let cap = (self.max_backoff.as_millis() as u64).max(100);
                    let full = base.min(cap);
                    let wait = rand::thread_rng().gen_range(full / 2..=full);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                        _ = self.state.fence.wake.notified() => {}
                    }
                }
            }
        }
    }

    /// One watch request, applied; false when its answer was dropped because the table
    /// changed meanwhile (ask again).
    async fn fetch(&self, since: i64, wait: u64) -> Result<bool, String> {
        let resp = self
            .client
            .request(
                Method::GET,
                &format!("/v1/routes?since={since}&wait={wait}"),
            )
            .timeout(Duration::from_secs(wait + 15))
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!(
                "control plane answered {status}: {}",
                body.chars().take(300).collect::<String>()
            ));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        let (state, builder) = (self.state.clone(), self.builder.clone());
        // Parsing a large table is CPU work, and so is carrying tenants' runtime state
        // into it (the swap): keep both off the request workers and the control runtime.
        let rejected = tokio::task::spawn_blocking(move || {
            // Base, build and swap under the builder's lock: a fetch abandoned by `run`
            // (the fence woke it) may still be applying its answer here.
            let mut b = builder.lock().unwrap_or_else(|p| p.into_inner());
            let base = state.table.load_full();
            if base.revision != since {
                // That one swapped in between: this answer is relative to an older table.
                return Ok(None);
            }
            let applied = crate::wire::apply_changes(&bytes, &mut b, &base)?;
            let rev = applied.snapshot.revision;
            if rev != since || applied.full {
                tracing::debug!(
                    revision = rev,
                    full = applied.full,
                    upserts = applied.upserts,
                    removals = applied.removals,
                    routes = applied.snapshot.routes,
                    "routing table updated"
                );
                state.swap(applied.snapshot);
            }
            Ok::<_, crate::wire::WireError>(Some(applied.rejected))
        })
        .await
        .map_err(|e| format!("applying the answer panicked: {e}"))?
        .map_err(|e| e.to_string())?;
        let Some(rejected) = rejected else {
            return Ok(false);
        };
        for r in rejected.iter().take(5) {
            tracing::warn!(error = %r, "route refused");
        }
        Ok(true)
    }
}

/// Mirrors every swapped snapshot to the state file, at most once per `spacing`.
pub async fn run_persister(
    state: Arc<RouterState>,
    path: PathBuf,
    spacing: Duration,
    stop: CancellationToken,
) {
    let mut rx = state.swaps.subscribe();
    let mut written = i64::MIN;
    loop {
        let stopping = tokio::select! {
            r = rx.changed() => r.is_err(),
            _ = stop.cancelled() => true,
        };
        let snap = state.table.load_full();
        if snap.revision != written {
            let p = path.clone();
            let s = snap.clone();
            let res = tokio::task::spawn_blocking(move || crate::state::save(&p, &s)).await;
            match res {
                Ok(Ok(())) => {
                    written = snap.revision;
                    state
                        .persisted_revision
                        .store(written, std::sync::atomic::Ordering::Relaxed);
                    crate::metrics::RouterCounters::inc(&state.counters.state_writes);
                }
                Ok(Err(e)) => tracing::error!(error = %e, "writing the state file failed"),
                Err(e) => tracing::error!(error = %e, "state file writer panicked"),
            }
        }
        if stopping {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(spacing) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// Most usage batches one heartbeat carries (a backlog after an outage drains over the
/// following heartbeats).
const USAGE_BATCHES_PER_HEARTBEAT: usize = 20;

/// How long a burst of table changes may take to settle before it is acked (one ack for
/// the burst, not one per change; short, since a tenant move waits for the ack).
const ACK_SETTLE: Duration = Duration::from_millis(5);

/// Acks the applied revision and the drained one: right after each swap (once a burst
/// settled), again as soon as the held routes drain, and every `every`.
///
/// `drained_revision` is the newest revision whose held routes had no request in flight
/// to a cell (see `RouterState::drained`). A swap that leaves requests in flight on a
/// route it holds is acked at once with the previous drained revision, then again when
/// the last of them ends: a drain waits at most `drain_timeout` (the upstream timeout)
/// before it is given up with a warning; later heartbeats still report it once drained.
pub async fn run_heartbeats(
    state: Arc<RouterState>,
    client: Client,
    router_id: String,
    every: Duration,
    status: Arc<SyncStatus>,
    stop: CancellationToken,
) {
    let drain_timeout = state.cfg.upstream_timeout;
    let mut rx = state.swaps.subscribe();
    let mut failures = 0u32;
    let mut drained_rev: i64 = 0;
    // The snapshot generation a drain is awaited for, and until when.
    let mut draining: Option<(u64, tokio::time::Instant)> = None;
    loop {
        let snap = state.table.load_full();
        let (rev, routes) = (snap.revision, snap.routes);
        let drained = state.drained(&snap);
        if drained {
            drained_rev = rev;
            draining = None;
        } else if draining.is_none_or(|(g, _)| g != snap.generation) {
            draining = Some((snap.generation, tokio::time::Instant::now() + drain_timeout));
        }
        // Usage rides along: the journal is sealed into a batch first; batches stay on
        // disk until a heartbeat that carried them is answered 2xx.
        let batches = match &state.usage {
            Some(u) => {
                if let Err(e) = u.seal() {
                    tracing::error!(error = %e, "sealing the usage journal failed");
                }
                u.batches(USAGE_BATCHES_PER_HEARTBEAT, crate::usage::MAX_BATCH_RECORDS)
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "reading usage batches failed");
                        Vec::new()
                    })
            }
            None => Vec::new(),
        };
        let mut body = serde_json::json!({
            "applied_revision": rev,
            "drained_revision": drained_rev,
            "stats": {
                "routes": routes,
                "source": status.source_name(),
                "forwarded": state.counters.forwarded_total(),
            }
        });
        if !batches.is_empty() {
            body["usage"] = serde_json::to_value(&batches).unwrap_or_default();
        }
        // Per-cell counters since this router started, for the control plane's release
        // gates (it keeps the windows).
        let cells: Vec<serde_json::Value> = snap
            .cells
            .iter()
            .map(|c| {
                let (le, buckets) = c.latency.cumulative();
                serde_json::json!({"cell_id": &*c.cell_id, "codes": c.status.classes(),
                                   "le": le, "buckets": buckets})
            })
            .collect();
        if !cells.is_empty() {
            body["cells"] = serde_json::Value::Array(cells);
        }
        let res = client
            .request(Method::POST, &format!("/v1/routers/{router_id}/heartbeat"))
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let mut backlog = false;
        let carried = batches.len();
        match res {
            Ok(r) if r.status().is_success() => {
                failures = 0;
                status.mark_reachable();
                if let Some(u) = &state.usage {
                    for b in &batches {
                        u.ack(&b.batch_id);
                    }
                }
                // More may wait than one heartbeat carried: go again at once.
                backlog = carried > 0
                    && state
                        .usage
                        .as_ref()
                        .and_then(|u| u.batches(1, 0).ok())
                        .is_some_and(|b| !b.is_empty());
            }
            Ok(r) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(status = r.status().as_u16(), "heartbeat refused");
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::debug!(error = %e, "heartbeat failed");
                }
            }
        }
        // More usage batches waiting: the next heartbeat goes at once.
        let wait = if backlog { Duration::ZERO } else { every };
        // A drain still awaited for this snapshot (and not given up).
        let until = draining
            .filter(|(g, until)| {
                *g == snap.generation && !drained && *until > tokio::time::Instant::now()
            })
            .map(|(_, until)| until);
        let drain = async {
            match until {
                Some(until) => state.wait_drained(&snap, until).await,
                None => std::future::pending().await,
            }
        };
        let swapped = tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return } else { true },
            _ = tokio::time::sleep(wait) => false,
            done = drain => {
                if !done {
                    tracing::warn!(revision = rev, drained_revision = drained_rev,
                        timeout_ms = drain_timeout.as_millis() as u64,
                        "requests still in flight on held routes; acking the last drained revision");
                }
                false
            }
        };
        if swapped {
            // A burst of table changes is acked once it settles, not once per change.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(ACK_SETTLE) => {}
            }
        }
    }
}
