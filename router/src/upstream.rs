//! The connection to one cell: HTTP/1.1 keep-alive pools owned by the cell's handle, so a
//! slow or dead cell never takes connections from another. There is one pool per worker
//! thread: each worker runs its own single-threaded runtime, and a connection is only ever
//! used by the worker that opened it, so a proxied request never hops threads.
//!
//! A connection goes back to its pool when the response body has been read to the end (a
//! body dropped half-way closes the connection instead: it cannot carry another request).

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `i` (its requests use pool `i`).
pub fn set_worker_index(i: usize) {
    WORKER.with(|w| w.set(i));
}

fn worker() -> usize {
    WORKER.with(|w| w.get())
}

struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
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

    fn pool(&self) -> (Arc<[Pool]>, usize) {
        (self.pools.clone(), worker() % self.pools.len())
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        let stream = match tokio::time::timeout(
            self.cfg.connect_timeout,
            tokio::net::TcpStream::connect(&self.addr),
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
            Err(_) => return Err(UpstreamError::ConnectTimeout(self.addr.clone())),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "cell connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// An idle connection of this worker's pool that is still usable, or a new one.
    async fn checkout(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        let (pools, i) = self.pool();
        loop {
            let idle = pools[i].lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(mut idle) = idle else {
                return self.connect().await;
            };
            if idle.sender.is_closed() || idle.since.elapsed() > self.cfg.idle_timeout {
                continue;
            }
            if idle.sender.ready().await.is_ok() {
                return Ok(idle.sender);
            }
        }
    }

    /// Sends `req` (origin-form URI) on a pooled connection.
    pub async fn send(
        &self,
        req: http::Request<Incoming>,
    ) -> Result<http::Response<PooledBody>, UpstreamError> {
        let mut sender = self.checkout().await?;
        let resp = sender.send_request(req).await?;
        let (pools, i) = self.pool();
        let (parts, body) = resp.into_parts();
        let mut pooled = PooledBody {
            inner: body,
            back: Some(Back {
                sender,
                pools,
                index: i,
                max_idle: self.cfg.max_idle_per_cell,
            }),
        };
        if pooled.inner.is_end_stream() {
            pooled.release();
        }
        Ok(http::Response::from_parts(parts, pooled))
    }
}

struct Back {
    sender: SendRequest<Incoming>,
    pools: Arc<[Pool]>,
    index: usize,
    max_idle: usize,
}

/// A cell's response body; its connection returns to the pool when the body ends.
pub struct PooledBody {
    inner: Incoming,
    back: Option<Back>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(b) = self.back.take() {
            let mut pool = b.pools[b.index].lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < b.max_idle {
                pool.push(Idle {
                    sender: b.sender,
                    since: Instant::now(),
                });
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
