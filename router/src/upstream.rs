//! The connection to one cell: HTTP/1.1 keep-alive pools owned by the cell's handle, so a
//! slow or dead cell never takes connections from another. There is one pool per worker
//! thread: each worker runs its own single-threaded runtime, and a connection is only ever
//! used by the worker that opened it, so a proxied request never hops threads.

use http::uri::{Authority, Scheme};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Idle keep-alive connections kept per cell.
    pub max_idle_per_cell: usize,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Worker threads (one pool each).
    pub workers: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            max_idle_per_cell: 256,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            workers: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("endpoint must be http://host:port")]
pub struct BadEndpoint;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `i` (its requests use pool `i`).
pub fn set_worker_index(i: usize) {
    WORKER.with(|w| w.set(i));
}

pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    clients: Box<[Client<HttpConnector, Incoming>]>,
}

impl Upstream {
    pub fn new(endpoint: &str, cfg: &UpstreamConfig) -> Result<Self, BadEndpoint> {
        let uri: http::Uri = endpoint.parse().map_err(|_| BadEndpoint)?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(BadEndpoint);
        }
        let authority = uri.authority().cloned().ok_or(BadEndpoint)?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(BadEndpoint);
        }
        let clients = (0..cfg.workers.max(1))
            .map(|_| {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(cfg.connect_timeout));
                connector.set_keepalive(Some(Duration::from_secs(30)));
                Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(cfg.max_idle_per_cell)
                    .pool_idle_timeout(cfg.idle_timeout)
                    .pool_timer(hyper_util::rt::TokioTimer::new())
                    .build(connector)
            })
            .collect();
        Ok(Self {
            scheme: Scheme::HTTP,
            authority,
            clients,
        })
    }

    /// The pool of the calling worker thread.
    pub fn client(&self) -> &Client<HttpConnector, Incoming> {
        let i = WORKER.with(|w| w.get());
        &self.clients[i % self.clients.len()]
    }
}
