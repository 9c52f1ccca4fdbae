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
use hyper::client::conn::http1::{Connection, SendRequest};
use std::future::Future;
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
    /// No response head before the deadline.
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

fn worker() -> usize {
    WORKER.with(|w| w.get())
}

type Io = hyper_util::rt::TokioIo<tokio::net::TcpStream>;

/// One keep-alive connection to a cell: the handle requests are sent with and the
/// connection state machine itself. Nobody else polls the connection: the request task
/// that uses it drives it together with its own response (no extra task and no cross-task
/// wakeup per request), and an idle one is checked when it is taken from the pool and by
/// the worker's sweeper.
struct Link {
    sender: SendRequest<Incoming>,
    /// `None` once the connection has ended. Boxed: the connection state is large and a
    /// link moves in and out of the pool and the response body.
    conn: Option<Pin<Box<Connection<Io, Incoming>>>>,
    /// The deadline of the request in flight. One timer per connection, moved later for
    /// each request: cheaper than a timer per request (moving a registered deadline later
    /// does not touch the timer wheel).
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Link {
    /// Lets the connection make progress (read, write, parse); false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        match conn.as_mut().poll(cx) {
            Poll::Pending => true,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "cell connection ended with an error");
                }
                self.conn = None;
                false
            }
        }
    }

    /// Whether the connection can be pooled for another request.
    fn reusable(&self) -> bool {
        self.conn.is_some() && !self.sender.is_closed()
    }
}

struct Idle {
    link: Link,
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

    fn pool_index(&self) -> usize {
        worker() % self.pools.len()
    }

    async fn connect(&self, deadline: tokio::time::Instant) -> Result<Link, UpstreamError> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let stream = match tokio::time::timeout(
            self.cfg.connect_timeout.min(left),
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
            Err(_) if left < self.cfg.connect_timeout => return Err(UpstreamError::Timeout),
            Err(_) => return Err(UpstreamError::ConnectTimeout(self.addr.clone())),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .writev(false)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await?;
        Ok(Link {
            sender,
            conn: Some(Box::pin(conn)),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        })
    }

    /// An idle connection of this worker's pool that is still usable, or a new one.
    async fn checkout(&self, deadline: tokio::time::Instant) -> Result<Link, UpstreamError> {
        let pool = &self.pools[self.pool_index()];
        loop {
            let idle = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(idle) = idle else {
                // Boxed: a rare path (DNS, connect) whose state would otherwise enlarge
                // every request's future.
                return Box::pin(self.connect(deadline)).await;
            };
            if idle.since.elapsed() > self.cfg.idle_timeout {
                continue;
            }
            let mut link = idle.link;
            // Driving the connection first notices a cell that closed it while it was
            // idle and lets it finish the previous exchange; a connection that cannot take
            // a request right away (say the cell has not read all of the previous request's
            // body) is dropped rather than waited for.
            let ready = std::future::poll_fn(|cx| {
                Poll::Ready(
                    link.drive(cx) && matches!(link.sender.poll_ready(cx), Poll::Ready(Ok(()))),
                )
            })
            .await;
            if ready {
                link.timer.as_mut().reset(deadline);
                return Ok(link);
            }
        }
    }

    /// Sends `req` (origin-form URI) on a pooled connection, driving the connection from
    /// the calling task.
    ///
    /// Fails with [`UpstreamError::Timeout`] when the response head has not arrived by
    /// `deadline` (the connection is closed then).
    pub async fn send(
        &self,
        req: http::Request<Incoming>,
        deadline: tokio::time::Instant,
    ) -> Result<http::Response<PooledBody>, UpstreamError> {
        let mut link = self.checkout(deadline).await?;
        let mut resp = std::pin::pin!(link.sender.send_request(req));
        let resp = std::future::poll_fn(|cx| {
            link.drive(cx);
            match resp.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(r.map_err(UpstreamError::from)),
                Poll::Pending => match link.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(UpstreamError::Timeout)),
                    Poll::Pending => Poll::Pending,
                },
            }
        })
        .await?;
        let (parts, body) = resp.into_parts();
        let mut pooled = PooledBody {
            inner: body,
            link: Some(link),
            back: Some(Back {
                pools: self.pools.clone(),
                index: self.pool_index(),
                max_idle: self.cfg.max_idle_per_cell,
            }),
        };
        if pooled.inner.is_end_stream() {
            pooled.release();
        }
        Ok(http::Response::from_parts(parts, pooled))
    }

    /// Drops this worker's idle connections that timed out or that the cell closed (so
    /// they do not linger half-closed until the next request). Run by each worker.
    pub fn sweep(&self) {
        let timeout = self.cfg.idle_timeout;
        let waker = futures_util::task::noop_waker_ref();
        let mut cx = Context::from_waker(waker);
        let mut pool = self.pools[self.pool_index()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pool.retain_mut(|i| {
            i.since.elapsed() <= timeout && i.link.drive(&mut cx) && i.link.reusable()
        });
    }

    /// Idle connections in this worker's pool.
    pub fn idle(&self) -> usize {
        self.pools[self.pool_index()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

struct Back {
    pools: Arc<[Pool]>,
    index: usize,
    max_idle: usize,
}

/// A cell's response body. Polling it also drives the cell connection; the connection
/// returns to the pool when the body ends.
pub struct PooledBody {
    inner: Incoming,
    link: Option<Link>,
    back: Option<Back>,
}

impl PooledBody {
    fn release(&mut self) {
        let (Some(link), Some(b)) = (self.link.take(), self.back.take()) else {
            return;
        };
        if !link.reusable() {
            return;
        }
        let mut pool = b.pools[b.index].lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < b.max_idle {
            pool.push(Idle {
                link,
                since: Instant::now(),
            });
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
        if let Some(link) = self.link.as_mut() {
            link.drive(cx);
        }
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => {
                self.link = None;
                self.back = None;
            }
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
