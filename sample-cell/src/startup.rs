//! Startup you can test: [`Application::build`] opens the store and binds the listener
//! (port 0 works), [`Application::port`] tells where, and [`Application::run_until_stopped`]
//! serves until SIGTERM or Ctrl-C, then drains in-flight requests.
//!
//! This is the only place that owns the listener and the server's lifetime; it must never
//! exit before in-flight requests finish or the grace period runs out.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::http::{router, AppState};
use crate::store::{SetupError, Store};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Store(#[from] SetupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// A bound, not yet serving, sample-cell.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    router: Router,
    store: Store,
    grace: Duration,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let store = Store::connect(&config).await?;
        let listener = match TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(source) => {
                store.close().await;
                return Err(StartupError::Bind {
                    addr: config.listen,
                    source,
                });
            }
        };
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: config.listen,
            source,
        })?;
        tracing::info!(
            cell_id = %config.cell_id,
            app_version = %config.app_version,
            backend = store.backend().as_str(),
            fault_rate = config.fault_rate,
            extra_latency_ms = config.extra_latency_ms,
            admin_api = config.admin_token.is_some(),
            "sample-cell ready"
        );
        let router = router(AppState::new(&config, store.clone()));
        Ok(Self {
            listener,
            addr,
            router,
            store,
            grace: Duration::from_secs(config.shutdown_grace_secs),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serve until SIGTERM or Ctrl-C.
    pub async fn run_until_stopped(self) -> io::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serve until `stop` completes; then stop accepting, let in-flight requests finish
    /// (at most the grace period) and close the store.
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            stop.await;
            tracing::info!("shutting down: no new connections, draining in-flight requests");
            let _ = stopping_tx.send(());
        };
        // No Nagle: an export streams its rows and then its short cursor record; with
        // Nagle on, that last write waits for the client's delayed ACK (~40 ms), which a
        // tenant move pays inside its cutover.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |s| {
            let _ = s.set_nodelay(true);
        });
        let serve = axum::serve(listener, self.router).with_graceful_shutdown(signal);
        let grace = self.grace;
        let deadline = async move {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            result = serve => result,
            () = deadline => {
                tracing::warn!(grace_secs = grace.as_secs(), "grace period over, abandoning in-flight requests");
                Ok(())
            }
        };
        self.store.close().await;
        tracing::info!("stopped");
        result
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for sigterm");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
