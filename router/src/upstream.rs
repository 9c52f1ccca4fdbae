//! The connections to one cell: HTTP/1.1 keep-alive pools owned by the cell's handle, so a
//! slow or dead cell never takes connections from another. There is one pool per worker
//! thread: each worker runs its own single-threaded runtime, and a connection is only ever
//! used by the worker that opened it, so a proxied request never hops threads.
//!
//! A pooled connection is a bare TCP stream: the request path (`forward.rs`) writes the
//! request and reads the response on it itself, and hands it back only after a response
//! that left it clean (body read to the end, nothing more sent, keep-alive). Whether an idle
//! connection is still open is told without a system call: after the last response its
//! read readiness is cleared, so any readiness seen later means the cell sent something
//! (it can only be a close) and the connection is dropped.

use http::uri::{Authority, Scheme};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Idle keep-alive connections kept per cell (per worker).
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

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(String),
    /// The deadline passed while connecting.
    #[error("no response head in time")]
    Timeout,
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `i` (its requests use pool `i`).
pub fn set_worker_index(i: usize) {
    WORKER.with(|w| w.set(i));
}

pub(crate) fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// A connection to a cell, checked out for one exchange.
pub struct Conn {
    pub io: TcpStream,
    /// Taken from the pool (it served an earlier exchange): a failure before any byte of
    /// the response may be the cell having closed it meanwhile, and the request can be
    /// retried on a new connection.
    pub reused: bool,
}

struct Idle {
    io: TcpStream,
    since: Instant,
}

/// Whether an idle connection is still usable: no readiness since it was parked (the
/// common case, no system call), or readiness that turns out to be spurious.
fn still_open(io: &TcpStream) -> bool {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    match io.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut b = [0u8; 1];
            matches!(io.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

type Pool = Mutex<Vec<Idle>>;

pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    addr: String,
    pools: Arc<[Pool]>,
    cfg: UpstreamConfig,
}

impl Upstream {
    /// `host:port` of the cell.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn new(endpoint: &str, cfg: &UpstreamConfig) -> Result<Self, BadEndpoint> {
        let uri: http::Uri = endpoint.parse().map_err(|_| BadEndpoint)?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(BadEndpoint);
        }
        let authority = uri.authority().cloned().ok_or(BadEndpoint)?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(BadEndpoint);
        }
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        Ok(Self {
            scheme: Scheme::HTTP,
            authority,
            addr,
            pools: (0..cfg.workers.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            cfg: cfg.clone(),
        })
    }

    fn pool(&self) -> &Pool {
        &self.pools[worker() % self.pools.len()]
    }

    /// A new connection, within the connect timeout and what is left until `deadline`.
    pub async fn connect(&self, deadline: tokio::time::Instant) -> Result<Conn, UpstreamError> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let io = match tokio::time::timeout(
            self.cfg.connect_timeout.min(left),
            TcpStream::connect(&self.addr),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(UpstreamError::Connect {
                    addr: self.addr.clone(),
                    source,
                })
            }
            Err(_) if left < self.cfg.connect_timeout => return Err(UpstreamError::Timeout),
            Err(_) => return Err(UpstreamError::ConnectTimeout(self.addr.clone())),
        };
        let _ = io.set_nodelay(true);
        Ok(Conn { io, reused: false })
    }

    /// An idle connection of this worker's pool that is still open, or a new one.
    pub async fn checkout(&self, deadline: tokio::time::Instant) -> Result<Conn, UpstreamError> {
        let pool = self.pool();
        loop {
            let idle = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(idle) = idle else {
                // Boxed: a rare path (connect) whose state would otherwise enlarge every
                // request's future.
                return Box::pin(self.connect(deadline)).await;
            };
            // Connections idle for too long are dropped by the sweeper (once a second).
            if still_open(&idle.io) {
                return Ok(Conn {
                    io: idle.io,
                    reused: true,
                });
            }
        }
    }

    /// Parks a connection whose last exchange ended cleanly.
    pub fn checkin(&self, conn: Conn) {
        // Clears the read readiness left by the response just read (no system call), so
        // that readiness seen later means the cell sent something while it was idle.
        let _ = conn.io.try_io(Interest::READABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
        let mut pool = self.pool().lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.cfg.max_idle_per_cell {
            pool.push(Idle {
                io: conn.io,
                since: Instant::now(),
            });
        }
    }

    /// Drops this worker's idle connections that timed out or that the cell closed (so
    /// they do not linger half-closed until the next request). Run by each worker.
    pub fn sweep(&self) {
        let timeout = self.cfg.idle_timeout;
        let mut pool = self.pool().lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|i| i.since.elapsed() <= timeout && still_open(&i.io));
    }

    /// Idle connections in this worker's pool.
    pub fn idle(&self) -> usize {
        self.pool().lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
