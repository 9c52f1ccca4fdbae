//! Building and running the server: open the store, install the bootstrap admin token,
//! bind the listener (port 0 in tests), start the job workers, serve until a shutdown
//! signal, then drain requests and stop the workers within the grace period.

use crate::config::{Config, Secret};
use crate::http::{self, AppState, RateLimiter};
use crate::iac::runner::RunnerSettings;
use crate::iac::{Catalog, StateBackend, Terraform};
use crate::jobs::JobEngine;
use crate::persistence::Backend;
use crate::persistence::Store;
use crate::service::Service;
use crate::shared::{ServiceSettings, Shared};
use crate::stamping::{find_sample_cell, Stamper};
use crate::telemetry::HttpMetrics;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {path} is in use by another cellplane process{holder}; stop it or choose another --data-dir (the embedded SQLite store serves one process: run replicas on PostgreSQL)")]
    DataDirInUse { path: PathBuf, holder: String },
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::persistence::StoreError),
    #[error("cannot install the admin token: {0}")]
    AdminToken(String),
    #[error("cannot set up terraform: {0}")]
    Iac(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

pub struct Application {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    state: AppState,
    engine: JobEngine,
    config: Config,
    admin_token_source: String,
    /// Held for the life of the process: one control plane per data directory (the cells'
    /// terraform working dirs and, on SQLite, the store live there).
    _data_dir_lock: std::fs::File,
}

/// The service and the job engine over `store`, configured from `config`. Exposed so tests
/// can run the engine in-process against a store they control.
pub fn service_and_engine(
    config: &Config,
    store: Store,
) -> Result<(Service, JobEngine), StartupError> {
    let templates = Catalog::new(templates_dir(config)?);
    let shared = Shared::new(
        store.clone(),
        ServiceSettings {
            job_max_attempts: config.jobs.max_attempts.max(1),
            job_wait_secs: config.jobs.wait_secs,
            job_wait_poll_ms: config.jobs.wait_poll_ms,
            routing: config.routing.clone(),
            placement: config.placement.clone(),
            templates: templates.clone(),
            port_range: (config.iac.port_min, config.iac.port_max),
            event_source: config.events.source.clone(),
            webhooks_allow_private: config.webhooks.allow_private_destinations,
            webhook_secrets: webhook_secrets(config, store.backend())?,
            webhook_rotation_grace_secs: config.webhooks.rotation_grace_secs,
            moves: config.moves.clone(),
            metrics: config.metrics.clone(),
        },
    );
    let terraform = Terraform::new(runner_settings(config, store.backend()))
        .map_err(|e| StartupError::Iac(e.to_string()))?;
    let sample_cell = find_sample_cell(config.iac.sample_cell_bin.as_ref());
    tracing::info!(
        templates = %templates.dir().display(),
        terraform = %config.iac.binary,
        sample_cell = %sample_cell.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "not found".into()),
        "iac configured"
    );
    let failpoints = crate::failpoints::Failpoints::parse(&config.jobs.failpoints)
        .map_err(|e| StartupError::Config(e.to_string()))?;
    if !failpoints.is_empty() {
        tracing::warn!(failpoints = %config.jobs.failpoints, "failpoints are enabled");
    }
    let stamper =
        Stamper::new(store, templates, terraform, sample_cell).with_failpoints(failpoints.clone());
    let service = Service::with_shared(shared.clone());
    let engine = JobEngine::new(
        shared,
        config.jobs.clone(),
        stamper,
        crate::clock::system(),
        failpoints,
    );
    Ok((service, engine))
}

impl Application {
    pub async fn build(mut config: Config) -> Result<Self, StartupError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartupError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        // Terraform and the processes it starts run in the cells' directories: every path
        // handed to them must be absolute.
        config.data_dir =
            std::path::absolute(&config.data_dir).map_err(|source| StartupError::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        let store = Store::open(
            config.database_url.as_ref().map(|s| s.expose()),
            &config.data_dir,
            config.database_max_connections,
        )
        .await?;
        let (service, engine) = service_and_engine(&config, store)?;
        let (secret, admin_token_source) = admin_token(&config)?;
        service
            .install_admin_token(&secret)
            .await
            .map_err(|e| StartupError::AdminToken(e.to_string()))?;
        let state = AppState {
            service,
            max_body_bytes: config.max_body_bytes,
            max_apply_bytes: config.max_apply_bytes,
            http_metrics: Arc::new(HttpMetrics::default()),
            job_metrics: engine.metrics.clone(),
            limiter: Arc::new(RateLimiter::new(
                config.rate_limit.authoring_per_sec,
                config.rate_limit.authoring_burst,
            )),
            tokens: Arc::new(crate::auth::TokenCache::new(Duration::from_secs(5))),
            replica: engine.owner().to_string(),
            controllers: Arc::new(vec![
                (
                    <crate::controllers::drift::DriftController as crate::controllers::Controller>::NAME,
                    Arc::new(crate::controllers::ControllerStatus::default()),
                ),
                (
                    <crate::controllers::webhooks::Dispatcher as crate::controllers::Controller>::NAME,
                    Arc::new(crate::controllers::ControllerStatus::default()),
                ),
                (
                    <crate::controllers::usage::UsageExporter as crate::controllers::Controller>::NAME,
                    Arc::new(crate::controllers::ControllerStatus::default()),
                ),
                (
                    <crate::controllers::tenants::TenantController as crate::controllers::Controller>::NAME,
                    Arc::new(crate::controllers::ControllerStatus::default()),
                ),
            ]),
        };
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|source| StartupError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        Ok(Self {
            listener,
            addr,
            state,
            engine,
            config,
            admin_token_source,
            _data_dir_lock: data_dir_lock,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn service(&self) -> &Service {
        &self.state.service
    }

    /// Where the admin token came from, for the startup banner.
    pub fn admin_token_source(&self) -> &str {
        &self.admin_token_source
    }

    pub fn backend(&self) -> &'static str {
        self.state.service.store().backend().as_str()
    }

    /// Serves until `shutdown` is cancelled, then drains within the grace period.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let workers_stop = CancellationToken::new();
        let workers = self.engine.spawn(workers_stop.clone());
        let housekeeping = spawn_housekeeping(self.state.service.clone(), workers_stop.clone());
        let revision_poller = crate::routing::spawn_revision_poller(
            self.state.service.routing().clone(),
            Duration::from_millis(self.config.routing.revision_poll_ms.max(50)),
            workers_stop.clone(),
        );
        {
            // Pending long polls end at shutdown so draining does not wait for them.
            let (service, shutdown) = (self.state.service.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                service.route_revisions().stop();
            });
        }
        // Writes committed by another replica wake this one's workers and route watchers.
        let listener = {
            let service = self.state.service.clone();
            self.state
                .service
                .store()
                .spawn_listener(workers_stop.clone(), move |change| {
                    use crate::persistence::notify::Change;
                    match change {
                        Change::Jobs => service.job_notify().notify_waiters(),
                        Change::Routes(rev) => service.route_revisions().observe(rev),
                        Change::Resync => service.job_notify().notify_waiters(),
                    }
                })
        };
        let timing = crate::controllers::LeaseTiming {
            ttl: Duration::from_millis(self.config.jobs.controller_lease_ms.max(100)),
            renew: Duration::from_millis(self.config.jobs.controller_renew_ms.max(10)),
        };
        let host = crate::controllers::Host {
            service: self.state.service.clone(),
            replica: self.state.replica.clone(),
            timing,
            failpoints: self.engine.failpoints().clone(),
            clock: self.engine.clock().clone(),
        };
        let drift = crate::controllers::spawn(
            crate::controllers::drift::DriftController {
                interval: Duration::from_secs(self.config.iac.drift_interval_secs),
            },
            host.clone(),
            self.state.controllers[0].1.clone(),
            workers_stop.clone(),
        );
        let dispatcher = crate::controllers::spawn(
            crate::controllers::webhooks::Dispatcher::new(
                crate::controllers::webhooks::DispatchSettings::from_config(&self.config.webhooks),
            ),
            host.clone(),
            self.state.controllers[1].1.clone(),
            workers_stop.clone(),
        );
        let usage = crate::controllers::spawn(
            crate::controllers::usage::UsageExporter {
                period: Duration::from_secs(self.config.usage.export_period_secs.max(60) / 60 * 60),
                grace: Duration::from_secs(self.config.usage.export_grace_secs),
            },
            host.clone(),
            self.state.controllers[2].1.clone(),
            workers_stop.clone(),
        );
        let tenants = crate::controllers::spawn(
            crate::controllers::tenants::TenantController {
                retry_base: Duration::from_millis(self.config.jobs.tenant_retry_base_ms.max(10)),
                retry_max: Duration::from_millis(self.config.jobs.tenant_retry_max_ms.max(10)),
                sweep: Duration::from_secs(self.config.jobs.tenant_sweep_secs.max(1)),
                poll: Duration::from_millis(self.config.jobs.tenant_poll_ms.max(10)),
                wake: self.state.service.shared().desired_changed.clone(),
                last_sweep: Default::default(),
            },
            host.clone(),
            self.state.controllers[3].1.clone(),
            workers_stop.clone(),
        );
        let app = http::router(self.state.clone());
        let grace = Duration::from_secs(self.config.shutdown_grace_secs);
        tracing::info!(addr = %self.addr, store = self.backend(), "control plane listening");
        let server_stop = shutdown.clone();
        // No Nagle: small answers (a long poll's change, a heartbeat's ack) go out at once.
        let tcp = axum::serve::ListenerExt::tap_io(self.listener, |s| {
            let _ = s.set_nodelay(true);
        });
        let server = axum::serve(tcp, app)
            .with_graceful_shutdown(async move { server_stop.cancelled().await });
        let result = server.await;
        tracing::info!("stopped accepting requests; stopping job workers");
        workers_stop.cancel();
        let join = futures_util::future::join_all(workers);
        if tokio::time::timeout(grace, join).await.is_err() {
            tracing::warn!(
                "job workers did not stop within the grace period; their leases will expire"
            );
        }
        if tokio::time::timeout(grace, drift).await.is_err() {
            tracing::warn!("the drift controller did not stop within the grace period");
        }
        if tokio::time::timeout(grace, dispatcher).await.is_err() {
            tracing::warn!("the webhook dispatcher did not stop within the grace period");
        }
        if tokio::time::timeout(grace, tenants).await.is_err() {
            tracing::warn!("the tenant controller did not stop within the grace period");
        }
        if tokio::time::timeout(grace, usage).await.is_err() {
            tracing::warn!("the usage controller did not stop within the grace period");
        }
        housekeeping.abort();
        revision_poller.abort();
        if let Some(l) = listener {
            l.abort();
        }
        self.state.service.store().close().await;
        tracing::info!("control plane stopped");
        result
    }
}

fn spawn_housekeeping(service: Service, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
            let before =
                crate::persistence::fmt_time(chrono::Utc::now() - chrono::Duration::hours(24));
            if let Err(e) = service.store().expire_idempotency_keys(&before).await {
                tracing::warn!(error = %e, "expiring idempotency keys failed");
            }
        }
    })
}

/// The template directory, first found of: the configured one (`iac.templates_dir`,
/// `CELLPLANE__IAC__TEMPLATES_DIR`); `./cell-templates` in the working directory;
/// `cell-templates` next to the binary; the built-in templates compiled into the binary,
/// written out under `<data_dir>/templates/builtin`.
fn templates_dir(config: &Config) -> Result<PathBuf, StartupError> {
    if let Some(d) = &config.iac.templates_dir {
        return Ok(d.clone());
    }
    let mut candidates = vec![PathBuf::from("cell-templates")];
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("cell-templates"));
    }
    if let Some(found) = candidates.into_iter().find(|c| c.is_dir()) {
        return Ok(found);
    }
    crate::iac::builtin::materialize(&config.data_dir).map_err(|e| {
        StartupError::Iac(format!(
            "cannot write the built-in templates under {}: {e}",
            config.data_dir.display()
        ))
    })
}

fn runner_settings(config: &Config, backend: Backend) -> RunnerSettings {
    let iac = &config.iac;
    let provider_mirror = match &iac.provider_mirror {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from("/opt/tf-plugins")).filter(|p| p.is_dir()),
    };
    let state = match backend {
        Backend::Sqlite => StateBackend::Local,
        Backend::Postgres => {
            let conn = match (&iac.state_conn_str, &config.database_url) {
                (Some(c), _) => c.expose().to_string(),
                (None, Some(u)) => pg_conn_str(u.expose()),
                (None, None) => String::new(),
            };
            StateBackend::Pg {
                conn_str: Secret::new(conn),
            }
        }
    };
    RunnerSettings {
        binary: iac.binary.clone(),
        data_dir: config.data_dir.clone(),
        provider_mirror,
        concurrency: iac.concurrency.max(1),
        lock_timeout_secs: iac.lock_timeout_secs,
        cancel_grace: Duration::from_secs(iac.cancel_grace_secs),
        path: iac.path.clone(),
        pass_env: iac
            .pass_env
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        env: iac.env.clone(),
        backend: state,
    }
}

/// The store's URL for terraform's `pg` backend (lib/pq): it defaults to requiring TLS, so
/// a URL that names no `sslmode` gets `sslmode=disable`, like a local PostgreSQL expects.
fn pg_conn_str(url: &str) -> String {
    if url.contains("sslmode=") {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode=disable")
}

/// The admin secret: from configuration (`CELLPLANE_ADMIN_TOKEN`), else the token file in
/// the data directory, else a new one written there with mode 0600.
/// The key that encrypts webhook secrets: `webhooks.secret_key`; else, with SQLite, the
/// one kept in `<data_dir>/webhook-key` (generated on first start). PostgreSQL replicas
/// must share the key, so there none is generated: subscriptions are refused until it is
/// configured.
fn webhook_secrets(
    config: &Config,
    backend: Backend,
) -> Result<Option<crate::webhooks::SecretBox>, StartupError> {
    use crate::webhooks::SecretBox;
    if let Some(k) = &config.webhooks.secret_key {
        return SecretBox::from_base64(k.expose())
            .map(Some)
            .map_err(StartupError::Config);
    }
    if backend == Backend::Postgres {
        tracing::warn!("webhooks.secret_key is not set: webhook subscriptions are refused");
        return Ok(None);
    }
    let path = config.data_dir.join("webhook-key");
    let key = match std::fs::read_to_string(&path) {
        Ok(k) => k,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = SecretBox::generate_key();
            write_private(&path, &k).map_err(|e| {
                StartupError::Config(format!("cannot write {}: {e}", path.display()))
            })?;
            k
        }
        Err(e) => {
            return Err(StartupError::Config(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    SecretBox::from_base64(&key)
        .map(Some)
        .map_err(|e| StartupError::Config(format!("{}: {e}", path.display())))
}

fn admin_token(config: &Config) -> Result<(String, String), StartupError> {
    if let Some(t) = &config.admin_token {
        let t = t.expose().trim().to_string();
        if t.len() < 16 {
            return Err(StartupError::AdminToken(
                "CELLPLANE_ADMIN_TOKEN must be at least 16 characters".into(),
            ));
        }
        return Ok((t, "the CELLPLANE_ADMIN_TOKEN environment variable".into()));
    }
    let path = config.data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => {
            return Ok((s.trim().to_string(), path.display().to_string()))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(StartupError::AdminToken(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    }
    let secret = crate::auth::new_secret();
    write_private(&path, &secret)
        .map_err(|e| StartupError::AdminToken(format!("cannot write {}: {e}", path.display())))?;
    Ok((secret, path.display().to_string()))
}

pub(crate) fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}

/// Takes an exclusive advisory lock on `<data_dir>/cellplane.lock` (released by the kernel
/// when the process exits, however it exits) and writes our pid into it.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StartupError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("cellplane.lock");
    let io_err = |source| StartupError::DataDir {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StartupError::DataDirInUse {
                path: dir.to_path_buf(),
                holder: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
    }
    file.set_len(0).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    writeln!(file, "{}", std::process::id()).map_err(io_err)?;
    Ok(file)
}
