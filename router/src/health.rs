//! Cell health, held with the routes: every [`CellHandle`] of the current snapshot carries
//! a health flag that a prober keeps up to date by calling the cell contract's
//! `GET /healthz` (no auth) on an interval. A request for a route whose cell is down is
//! answered 503 `cell-unavailable` at once instead of waiting on a dead or hung cell.
//!
//! A cell is marked down after `fails` consecutive failed probes (a connect error, a
//! timeout, or any status but 2xx) and up again after one good probe. A connect error seen
//! by a forwarded request counts as a failed probe too, so a cell that dies is noticed
//! between two probe rounds. Cells start up: a new route is served before its first probe.

use crate::proxy::RouterState;
use crate::table::CellHandle;
use bytes::Bytes;
use http_body_util::Empty;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The health of one cell as this router sees it.
#[derive(Debug)]
pub struct CellHealth {
    up: AtomicBool,
    failures: AtomicU32,
}

impl Default for CellHealth {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
        }
    }
}

impl CellHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records a good probe; returns true when this brings the cell back up.
    pub fn success(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        !self.up.swap(true, Ordering::Relaxed)
    }

    /// Records a failed probe; returns true when this takes the cell down.
    pub fn failure(&self, fails: u32) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        n >= fails.max(1) && self.up.swap(false, Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Time between probe rounds; zero turns probing off.
    pub interval: Duration,
    pub timeout: Duration,
    pub path: String,
    /// Consecutive failures that take a cell down.
    pub fails: u32,
}

/// Probes every cell of the current snapshot each `interval` until `stop`.
pub async fn run_prober(state: Arc<RouterState>, cfg: ProbeConfig, stop: CancellationToken) {
    if cfg.interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cells = state.table.load().cells.clone();
        let mut round = tokio::task::JoinSet::new();
        for cell in cells.iter() {
            let (cell, cfg) = (Arc::clone(cell), cfg.clone());
            round.spawn(async move {
                let result = probe(&cell, &cfg).await;
                record(&cell, result, cfg.fails);
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = async { while round.join_next().await.is_some() {} } => {}
        }
    }
}

/// Applies a probe's result and logs a change of state.
pub fn record(cell: &CellHandle, result: Result<(), String>, fails: u32) {
    match result {
        Ok(()) => {
            if cell.health.success() {
                tracing::info!(cell = %cell.cell_id, endpoint = %cell.endpoint, "cell is up again");
            }
        }
        Err(reason) => {
            if cell.health.failure(fails) {
                tracing::warn!(cell = %cell.cell_id, endpoint = %cell.endpoint, %reason,
                    "cell is down; its tenants get 503 until a probe succeeds");
            }
        }
    }
}

/// One `GET {endpoint}{path}` on a fresh connection, bounded by the timeout as a whole.
async fn probe(cell: &CellHandle, cfg: &ProbeConfig) -> Result<(), String> {
    let authority = cell.upstream.authority.clone();
    let addr = cell.upstream.addr().to_string();
    let path = cfg.path.clone();
    let attempt = async move {
        let stream = tokio::net::TcpStream::connect(addr.as_str())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .header(http::header::CONNECTION, "close")
            .header(http::header::USER_AGENT, "cellplane-router-health")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("status {}", resp.status().as_u16()))
        }
    };
    match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", cfg.timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_after_consecutive_failures_up_after_one_success() {
        let h = CellHealth::default();
        assert!(h.is_up());
        assert!(!h.failure(2));
        assert!(h.is_up());
        assert!(!h.success());
        assert!(!h.failure(2), "a success resets the count");
        assert!(h.failure(2));
        assert!(!h.is_up());
        assert!(!h.failure(2), "already down: no second transition");
        assert!(h.success());
        assert!(h.is_up());
    }
}
