//! Command line and environment of `cellplane-router`. The control-plane token comes from
//! `CELLPLANE_TOKEN` and never prints.

use crate::resolve::Source;
use clap::Parser;
use std::path::PathBuf;

/// `--underscore-trusted-headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UnderscoreTrusted {
    /// Drop the field and forward the request.
    #[default]
    Strip,
    /// Answer 400 `bad-request`; the request never reaches the cell.
    Refuse,
}

#[derive(Parser, Clone)]
#[command(
    name = "cellplane-router",
    version,
    about = "Forwards each tenant's requests to its cell, from a routing table watched on the control plane"
)]
pub struct Config {
    /// Control plane base URL, e.g. http://127.0.0.1:7480.
    #[arg(long, env = "CELLPLANE_ROUTER_CONTROL_PLANE")]
    pub control_plane: String,
    /// Address for tenant traffic (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Address for /__router/healthz and /__router/metrics.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin_listen: String,
    /// Last-known routing table; loaded before the control plane is contacted, rewritten
    /// atomically after every change.
    #[arg(long)]
    pub state_file: PathBuf,
    /// Usage metering journal and unacknowledged batches (default: the state file's path
    /// with `.usage` appended). Keep it with the state file: it is what makes the counts
    /// survive a restart.
    #[arg(long)]
    pub usage_dir: Option<PathBuf>,
    /// Do not meter usage (no journal, nothing reported).
    #[arg(long)]
    pub no_usage: bool,
    /// Tenants are `{tenant}.{base_domain}`.
    #[arg(long, default_value = "localhost")]
    pub base_domain: String,
    /// Where the tenant comes from, in order of precedence: host, header, path.
    #[arg(long, value_delimiter = ',', default_value = "host,header,path")]
    pub tenant_from: Vec<Source>,
    /// Router id reported in heartbeats (default: derived from host, listen address and
    /// state file, so it is stable across restarts).
    #[arg(long)]
    pub router_id: Option<String>,
    /// Bearer token of a `router` role.
    #[arg(long, env = "CELLPLANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Longest a request waits on a held route before 503.
    #[arg(long, default_value_t = 5000)]
    pub hold_timeout_ms: u64,
    /// Requests per tenant that may wait on a held route at once.
    #[arg(long, default_value_t = 1000)]
    pub hold_queue: u32,
    /// Time a cell has to send the response head.
    #[arg(long, default_value_t = 30_000)]
    pub upstream_timeout_ms: u64,
    /// How long a client's keep-alive connection may sit idle between requests.
    #[arg(long, default_value_t = 75_000)]
    pub client_idle_timeout_ms: u64,
    /// Time a client has to send a whole request head once it started one (then 408).
    #[arg(long, default_value_t = 30_000)]
    pub client_header_timeout_ms: u64,
    /// Longest wait for each read or write of a body, from the client or from a cell.
    #[arg(long, default_value_t = 60_000)]
    pub body_timeout_ms: u64,
    /// What to do with a client field whose name reads as X-Tenant-ID, X-Tenant-Env or
    /// X-Correlation-ID once `_` is read as `-` (`X_Tenant_ID`; CGI-style cells cannot tell
    /// them apart): strip it, or refuse the request with 400. Never forwarded either way.
    #[arg(long, value_enum, default_value_t = UnderscoreTrusted::Strip)]
    pub underscore_trusted_headers: UnderscoreTrusted,
    /// Idle keep-alive connections kept per cell (per worker).
    #[arg(long, default_value_t = 256)]
    pub upstream_idle_per_cell: usize,
    /// Worker threads serving tenant traffic, each with its own listener (SO_REUSEPORT),
    /// runtime and cell pools (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Latency histogram bounds in seconds (at most 20); put your SLO thresholds here.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.001,0.0025,0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10"
    )]
    pub latency_buckets: Vec<f64>,
    /// Tenants that get their own latency histogram (the first ones with traffic; every
    /// tenant gets request counters). Bounds memory and series in very large tables.
    #[arg(long, default_value_t = 10_000)]
    pub max_tenant_histograms: usize,
    /// Time between health probes of each cell (`GET <endpoint><health-path>`); 0 turns
    /// probing off.
    #[arg(long, default_value_t = 1000)]
    pub health_interval_ms: u64,
    /// Time a health probe may take.
    #[arg(long, default_value_t = 500)]
    pub health_timeout_ms: u64,
    /// Path of the cells' health check (the cell contract's `/healthz`).
    #[arg(long, default_value = "/healthz")]
    pub health_path: String,
    /// Consecutive failed probes (or connect errors of forwarded requests) that take a
    /// cell down; one good probe brings it back.
    #[arg(long, default_value_t = 2)]
    pub health_fails: u32,
    /// Long-poll wait per watch request.
    #[arg(long, default_value_t = 30)]
    pub watch_wait_secs: u64,
    /// The control plane's router lease (its `--router-lease-secs`): a router not heard
    /// from for longer is left out of tenant moves. A router that finds it did not run for
    /// longer than this (SIGSTOP, a paused VM) holds requests to served routes until it
    /// has fetched the routing table again (at most `--hold-timeout-ms`, then it serves
    /// the table it has). 0 turns this off.
    #[arg(long, default_value_t = 15)]
    pub router_lease_secs: u64,
    /// Heartbeat period (a heartbeat is also sent right after each applied change).
    #[arg(long, default_value_t = 5)]
    pub heartbeat_secs: u64,
    /// Minimum spacing of state file rewrites.
    #[arg(long, default_value_t = 100)]
    pub state_flush_ms: u64,
    /// Longest backoff between failed watch attempts.
    #[arg(long, default_value_t = 5000)]
    pub max_backoff_ms: u64,
    /// How long in-flight requests get to finish on SIGTERM.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Shut down when the parent process exits (used by `cellplane up`).
    #[arg(long)]
    pub exit_with_parent: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("control_plane", &self.control_plane)
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("state_file", &self.state_file)
            .field("base_domain", &self.base_domain)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.tenant_from.is_empty() {
            return Err("--tenant-from needs at least one source".into());
        }
        if self.latency_buckets.is_empty()
            || self.latency_buckets.windows(2).any(|w| w[0] >= w[1])
            || self
                .latency_buckets
                .iter()
                .any(|b| !b.is_finite() || *b <= 0.0)
        {
            return Err("--latency-buckets must be increasing positive seconds".into());
        }
        // The control plane keeps at most 20 bounds per cell for release gates.
        if self.latency_buckets.len() > 20 {
            return Err("--latency-buckets takes at most 20 bounds".into());
        }
        if !self.health_path.starts_with('/')
            || self.health_path.parse::<http::uri::PathAndQuery>().is_err()
        {
            return Err("--health-path must be an absolute path such as /healthz".into());
        }
        if self.health_fails == 0 {
            return Err("--health-fails must be at least 1".into());
        }
        if self.watch_wait_secs > 60 {
            return Err("--watch-wait-secs must be at most 60".into());
        }
        if let Some(id) = &self.router_id {
            if !crate::resolve::valid_id(id) {
                return Err("--router-id must match ^[a-z][a-z0-9-]{1,62}$".into());
            }
        }
        Ok(())
    }

    /// The waits on a client connection.
    pub fn client_limits(&self) -> crate::forward::ClientLimits {
        use std::time::Duration;
        crate::forward::ClientLimits {
            idle: Duration::from_millis(self.client_idle_timeout_ms.max(1)),
            head: Duration::from_millis(self.client_header_timeout_ms.max(1)),
            body: Duration::from_millis(self.body_timeout_ms.max(1)),
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .clamp(1, 256)
    }

    pub fn router_id(&self) -> String {
        if let Some(id) = &self.router_id {
            return id.clone();
        }
        use std::hash::{Hash, Hasher};
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        host.trim().hash(&mut h);
        self.listen.hash(&mut h);
        self.state_file.hash(&mut h);
        format!("router-{:012x}", h.finish() & 0xffff_ffff_ffff)
    }
}
