//! Building and running the router: load the state file (before any contact with the
//! control plane), bind both listeners, start the watch, heartbeat and state writer, serve
//! until a shutdown signal, then drain in-flight requests within the grace period and
//! write the state file one last time.

use crate::config::Config;
use crate::forward::ClientLimits;
use crate::proxy::{DefaultPhases, ProxyConfig, RouterState};
use crate::resolve::Resolver;
use crate::sync::{SyncStatus, Syncer};
use crate::table::{Snapshot, TableBuilder};
use crate::upstream::UpstreamConfig;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot open the usage journal in {dir}: {source}")]
    Usage { dir: String, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

pub struct Application {
    cfg: Config,
    state: Arc<RouterState>,
    builder: Arc<Mutex<TableBuilder>>,
    status: Arc<SyncStatus>,
    /// One listener per worker, all on the same port (SO_REUSEPORT).
    listeners: Vec<std::net::TcpListener>,
    admin: TcpListener,
    addr: SocketAddr,
    admin_addr: SocketAddr,
    router_id: String,
}

async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), StartupError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let a = l.local_addr().map_err(|source| StartupError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    Ok((l, a))
}

impl Application {
    pub async fn build(cfg: Config) -> Result<Self, StartupError> {
        cfg.validate().map_err(StartupError::Config)?;
        let buckets: Arc<[f64]> = Arc::from(cfg.latency_buckets.clone());
        let mut builder = TableBuilder::new(
            buckets.clone(),
            UpstreamConfig {
                max_idle_per_cell: cfg.upstream_idle_per_cell,
                workers: cfg.workers(),
                ..UpstreamConfig::default()
            },
        );
        let status = Arc::new(SyncStatus::default());
        // The last-known table first: the router serves it even if the control plane
        // never answers.
        let initial = match crate::state::load(&cfg.state_file, &mut builder) {
            Ok(Some(s)) => {
                tracing::info!(revision = s.revision, routes = s.routes,
                    path = %cfg.state_file.display(), "loaded the last-known routing table");
                status.source.store(1, std::sync::atomic::Ordering::Relaxed);
                s
            }
            Ok(None) => Snapshot::empty(),
            Err(e) => {
                tracing::error!(error = %e, "ignoring the state file; starting with an empty table");
                Snapshot::empty()
            }
        };
        let usage_dir = cfg.usage_dir.clone().unwrap_or_else(|| {
            let mut p = cfg.state_file.clone().into_os_string();
            p.push(".usage");
            p.into()
        });
        let usage = if cfg.no_usage {
            None
        } else {
            Some(
                crate::usage::UsageJournal::open(&usage_dir, cfg.workers()).map_err(|source| {
                    StartupError::Usage {
                        dir: usage_dir.display().to_string(),
                        source,
                    }
                })?,
            )
        };
        let mut state = RouterState::new(
            Resolver::new(cfg.tenant_from.clone(), &cfg.base_domain),
            ProxyConfig {
                hold_deadline: Duration::from_millis(cfg.hold_timeout_ms),
                hold_queue: cfg.hold_queue.max(1),
                upstream_timeout: Duration::from_millis(cfg.upstream_timeout_ms.max(1)),
                buckets,
                max_tenant_histograms: cfg.max_tenant_histograms,
                health_fails: cfg.health_fails,
                workers: cfg.workers(),
                underscore_trusted_headers: cfg.underscore_trusted_headers,
                router_lease: Duration::from_secs(cfg.router_lease_secs),
            },
            initial,
        );
        state.usage = usage;
        let state = Arc::new(state);
        let (listeners, addr) = bind_workers(&cfg.listen, cfg.workers())?;
        let (admin, admin_addr) = bind(&cfg.admin_listen).await?;
        Ok(Self {
            router_id: cfg.router_id(),
            cfg,
            state,
            builder: Arc::new(Mutex::new(builder)),
            status,
            listeners,
            admin,
            addr,
            admin_addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn router_id(&self) -> &str {
        &self.router_id
    }

    pub fn state(&self) -> Arc<RouterState> {
        self.state.clone()
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let background = CancellationToken::new();
        let client =
            cellplane_api::Client::new(self.cfg.control_plane.clone(), self.cfg.token.clone());
        let syncer = Syncer {
            state: self.state.clone(),
            client: client.clone(),
            builder: self.builder.clone(),
            wait_secs: self.cfg.watch_wait_secs,
            max_backoff: Duration::from_millis(self.cfg.max_backoff_ms),
            status: self.status.clone(),
        };
        let watch = tokio::spawn(syncer.run(background.clone()));
        let persister = tokio::spawn(crate::sync::run_persister(
            self.state.clone(),
            self.cfg.state_file.clone(),
            Duration::from_millis(self.cfg.state_flush_ms),
            background.clone(),
        ));
        let prober = tokio::spawn(crate::health::run_prober(
            self.state.clone(),
            crate::health::ProbeConfig {
                interval: Duration::from_millis(self.cfg.health_interval_ms),
                timeout: Duration::from_millis(self.cfg.health_timeout_ms.max(1)),
                path: self.cfg.health_path.clone(),
                fails: self.cfg.health_fails,
            },
            background.clone(),
        ));
        let ticker = tokio::spawn(crate::proxy::run_alive_ticker(
            self.state.clone(),
            background.clone(),
        ));
        let heartbeats = tokio::spawn(crate::sync::run_heartbeats(
            self.state.clone(),
            client,
            self.router_id.clone(),
            Duration::from_secs(self.cfg.heartbeat_secs.max(1)),
            self.status.clone(),
            background.clone(),
        ));
        let admin = {
            let (state, status, id) = (
                self.state.clone(),
                self.status.clone(),
                self.router_id.clone(),
            );
            let stop = shutdown.clone();
            let listener = self.admin;
            tokio::spawn(async move {
                serve(listener, stop, Duration::from_secs(1), move |req| {
                    let r = crate::admin::handle(&state, &status, &id, req);
                    async move { r }
                })
                .await
            })
        };
        tracing::info!(addr = %self.addr, admin = %self.admin_addr, router_id = %self.router_id,
            control_plane = %self.cfg.control_plane, "router listening");
        // Tenant traffic: one thread per worker, each with a single-threaded runtime, its
        // own listener and its own cell pools, so a request and its upstream connection
        // stay on one thread.
        let grace = Duration::from_secs(self.cfg.shutdown_grace_secs);
        let mut workers = Vec::new();
        for (i, listener) in self.listeners.into_iter().enumerate() {
            let (state, stop) = (self.state.clone(), shutdown.clone());
            let limits = Arc::new(self.cfg.client_limits());
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let spawned = std::thread::Builder::new()
                .name(format!("router-worker-{i}"))
                .spawn(move || {
                    crate::upstream::set_worker_index(i);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, worker = i, "cannot start a worker runtime");
                            stop.cancel();
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let listener = match TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!(error = %e, worker = i, "cannot use the listener");
                                stop.cancel();
                                return;
                            }
                        };
                        // Idle cell connections of this worker's pools are only looked
                        // at when taken; the sweeper closes those a cell closed or that
                        // timed out in between.
                        let sweeper = {
                            let (state, stop) = (state.clone(), stop.clone());
                            tokio::spawn(async move {
                                let mut tick = tokio::time::interval(Duration::from_secs(1));
                                tick.set_missed_tick_behavior(
                                    tokio::time::MissedTickBehavior::Delay,
                                );
                                loop {
                                    tokio::select! {
                                        _ = stop.cancelled() => return,
                                        _ = tick.tick() => {}
                                    }
                                    let cells = state.table.load().cells.clone();
                                    for cell in cells.iter() {
                                        cell.upstream.sweep();
                                    }
                                }
                            })
                        };
                        serve_tenants(listener, stop, grace, state, limits).await;
                        sweeper.abort();
                    });
                    let _ = done_tx.send(());
                });
            match spawned {
                Ok(_) => workers.push(done_rx),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a worker thread");
                    shutdown.cancel();
                }
            }
        }
        for w in workers {
            let _ = w.await;
        }
        tracing::info!("stopped serving; writing the state file");
        background.cancel();
        let _ = watch.await;
        let _ = heartbeats.await;
        let _ = prober.await;
        let _ = ticker.await;
        let _ = persister.await;
        let _ = admin.await;
        tracing::info!("router stopped");
    }
}

/// Binds `n` listeners on one address with SO_REUSEPORT (the kernel spreads connections
/// over them); with port 0 the first picks the port and the others share it.
fn bind_workers(
    addr: &str,
    n: usize,
) -> Result<(Vec<std::net::TcpListener>, SocketAddr), StartupError> {
    let err = |source| StartupError::Bind {
        addr: addr.to_string(),
        source,
    };
    let mut target: SocketAddr = addr
        .parse()
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let sock = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(err)?;
        sock.set_reuseaddr(true).map_err(err)?;
        sock.set_reuseport(true).map_err(err)?;
        sock.set_nodelay(true).map_err(err)?;
        sock.bind(target).map_err(err)?;
        let l = sock.listen(4096).map_err(err)?;
        target = l.local_addr().map_err(err)?;
        out.push(l.into_std().map_err(err)?);
    }
    Ok((out, target))
}

/// The next connection (TCP_NODELAY set), or `None` once `stop` is cancelled. A failed
/// accept (say, out of file descriptors) is logged and retried after a short pause.
async fn accept(listener: &TcpListener, stop: &CancellationToken) -> Option<tokio::net::TcpStream> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some(stream);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
}

/// Accepts tenant connections until `stop`, then gives open connections `grace` to finish
/// the request they are in (idle ones close at once).
async fn serve_tenants(
    listener: TcpListener,
    stop: CancellationToken,
    grace: Duration,
    state: Arc<RouterState>,
    limits: Arc<ClientLimits>,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let Some(stream) = accept(&listener, &stop).await else {
            break;
        };
        let (state, limits, stop) = (state.clone(), limits.clone(), stop.clone());
        tracker.spawn(async move {
            crate::forward::serve_connection(&DefaultPhases, &state, &limits, &stop, stream).await
        });
    }
    drop(listener);
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("connections still open after the grace period; closing them");
        }
    }
}

/// Accepts HTTP/1.1 connections on the admin listener until `stop`, then gives open
/// connections `grace` to finish their requests.
async fn serve<F, Fut>(listener: TcpListener, stop: CancellationToken, grace: Duration, f: F)
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<crate::admin::Body>> + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true)
        .writev(false)
        .header_read_timeout(Duration::from_secs(30))
        .timer(hyper_util::rt::TokioTimer::new());
    loop {
        let Some(stream) = accept(&listener, &stop).await else {
            break;
        };
        let f = f.clone();
        let svc = service_fn(move |req| {
            let fut = f(req);
            async move { Ok::<_, std::convert::Infallible>(fut.await) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("connections still open after the grace period; closing them");
        }
    }
}

/// Whether log lines get colour escape codes: only on a terminal, and never when `NO_COLOR`
/// is set and not empty (<https://no-color.org>). Logs piped to a file or a collector stay
/// plain text.
pub fn log_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && !matches!(no_color, Some(v) if !v.is_empty())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::log_colour;
    use std::ffi::OsStr;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(log_colour(true, Some(OsStr::new(""))));
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None));
        assert!(!log_colour(false, Some(OsStr::new("1"))));
    }
}
