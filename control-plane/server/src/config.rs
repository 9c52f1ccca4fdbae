//! Layered configuration: built-in defaults, then an optional TOML file, then
//! `CELLPLANE__SECTION__KEY` environment variables, then command-line flags. Secrets live
//! in [`Secret`], which never prints its value.

use serde::Deserialize;
use std::path::PathBuf;

pub use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    pub database_url: Option<Secret>,
    pub database_max_connections: u32,
    pub admin_token: Option<Secret>,
    pub log_format: LogFormat,
    pub max_body_bytes: usize,
    /// Body limit of `POST /v1/apply`, which carries a fleet of manifests.
    pub max_apply_bytes: usize,
    pub shutdown_grace_secs: u64,
    pub rate_limit: RateLimitConfig,
    pub jobs: JobsConfig,
    pub routing: RoutingConfig,
    pub placement: PlacementConfig,
    pub iac: IacConfig,
    pub events: EventsConfig,
    pub webhooks: WebhooksConfig,
    pub usage: UsageConfig,
    pub moves: MovesConfig,
    pub metrics: MetricsConfig,
}

/// Where release gates read metrics from besides the built-in provider (routers'
/// heartbeats): a Prometheus server scraping the routers' `/__router/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// The Prometheus HTTP API base (e.g. `http://prometheus:9090`); gates with
    /// `provider: prometheus` count an `error` measurement while it is unset.
    pub prometheus_url: Option<String>,
    /// How long one PromQL query may take before it counts as an error.
    pub query_timeout_ms: u64,
    /// Prometheus' scrape interval for the routers: a window is never shorter than two
    /// of them (`increase()` needs two samples), even right after a wave's cells settled.
    pub prometheus_scrape_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            prometheus_url: None,
            query_timeout_ms: 2_000,
            prometheus_scrape_secs: 15,
        }
    }
}

/// Tenant moves (`POST /v1/tenants/{id}/move`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MovesConfig {
    /// The route is held only once a delta round copied fewer records than this: the
    /// final delta, copied while the tenant is frozen, is at most about this big.
    pub delta_threshold: i64,
    /// Delta rounds stop and the move is rolled back (never having held the route) when
    /// the delta has not shrunk under the threshold within this long.
    pub converge_timeout_secs: u64,
    /// How long the hold waits for every live router to ack it with nothing in flight on
    /// the old route; then the hold is released and the move rolled back.
    pub ack_timeout_ms: u64,
    /// How long the source keeps the tenant's (frozen) copy after the flip before it is
    /// purged and its capacity given back.
    pub purge_grace_secs: u64,
    /// Longest copy (one export streamed into one import) or checksum.
    pub copy_timeout_secs: u64,
    /// Longest freeze, unfreeze or other short call to a cell.
    pub call_timeout_ms: u64,
    /// Moves a `cell drain --move` runs at once.
    pub drain_parallel: usize,
}

impl Default for MovesConfig {
    fn default() -> Self {
        Self {
            delta_threshold: 1_000,
            converge_timeout_secs: 120,
            ack_timeout_ms: 10_000,
            purge_grace_secs: 300,
            copy_timeout_secs: 3_600,
            call_timeout_ms: 5_000,
            drain_parallel: 2,
        }
    }
}

/// Usage metering (`GET /v1/usage`, `dev.cellplane.usage.v1`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageConfig {
    /// The period one `dev.cellplane.usage.v1` event covers (a multiple of 60).
    pub export_period_secs: u64,
    /// How long after a period ends its event waits for late router reports.
    pub export_grace_secs: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            export_period_secs: 3_600,
            export_grace_secs: 300,
        }
    }
}

/// Webhook subscriptions.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Take destinations on loopback, private, link-local and metadata addresses (tests,
    /// development). Off in production: a subscription must not reach into this network.
    pub allow_private_destinations: bool,
    /// Base64 of the 32-byte key that encrypts subscription secrets. Required with
    /// PostgreSQL (every replica must read the secrets); with SQLite, a key is generated
    /// into `<data_dir>/webhook-key` when none is set.
    pub secret_key: Option<Secret>,
    /// How long the previous secret keeps signing after a rotation.
    pub rotation_grace_secs: u64,
    /// Delay before each attempt of a delivery, in milliseconds (the first is usually 0);
    /// each non-zero delay gets ±10 % jitter. When it runs out the delivery is `failed`.
    /// Default (the Svix schedule): immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
    /// In the environment: comma-separated (`CELLPLANE__WEBHOOKS__RETRY_SCHEDULE_MS=0,5000`).
    #[serde(deserialize_with = "list_of_ms")]
    pub retry_schedule_ms: Vec<u64>,
    /// An attempt that has no 2xx answer within this long failed (the answer may still
    /// come; it is ignored and the attempt is retried).
    pub attempt_timeout_ms: u64,
    /// A subscription whose deliveries have failed for this long is disabled (and emits
    /// `dev.cellplane.webhook.disabled.v1`). Default: 5 days.
    pub disable_after_secs: u64,
    /// How often a subscription disabled for failing is probed with a ping; a 2xx
    /// re-enables it (`dev.cellplane.webhook.recovered.v1`).
    pub probe_interval_secs: u64,
    /// Attempts in flight at once on the replica that dispatches.
    pub max_in_flight: usize,
    /// How often the dispatcher looks for new events and due attempts.
    pub poll_interval_ms: u64,
    /// A `Retry-After` longer than this is cut to it.
    pub max_retry_after_secs: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            allow_private_destinations: false,
            secret_key: None,
            rotation_grace_secs: 86_400,
            retry_schedule_ms: vec![
                0, 5_000, 300_000, 1_800_000, 7_200_000, 18_000_000, 36_000_000, 36_000_000,
            ],
            attempt_timeout_ms: 15_000,
            disable_after_secs: 5 * 86_400,
            probe_interval_secs: 3_600,
            max_in_flight: 256,
            poll_interval_ms: 100,
            max_retry_after_secs: 36_000,
        }
    }
}

/// A list of milliseconds: a TOML array, or a comma-separated string (environment).
fn list_of_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<u64>),
        One(u64),
        Text(String),
    }
    let list = match Either::deserialize(d)? {
        Either::List(l) => l,
        Either::One(n) => vec![n],
        Either::Text(t) => t
            .split(',')
            .map(|p| p.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| serde::de::Error::custom(format!("{t:?}: {e}")))?,
    };
    if list.is_empty() || list.len() > 50 {
        return Err(serde::de::Error::custom(
            "retry_schedule_ms needs 1 to 50 delays",
        ));
    }
    Ok(list)
}

/// Published events (`GET /v1/events`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// The CloudEvents `source` of every event this control plane publishes (a URI
    /// reference naming the deployment, e.g. `https://cellplane.example.com/eu`).
    pub source: String,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            source: "urn:cellplane:control-plane".into(),
        }
    }
}

/// How cells are stamped: the terraform binary, templates, providers and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IacConfig {
    /// `terraform` or `tofu`, or a path to either.
    pub binary: String,
    /// Directory of cell templates. Default: `./cell-templates`, else the one next to the
    /// binary, else the built-in templates (written out under `<data_dir>/templates/builtin`).
    pub templates_dir: Option<PathBuf>,
    /// Provider filesystem mirror written into terraform's CLI configuration (no direct
    /// downloads then). Default: `/opt/tf-plugins` when it exists; `""` disables.
    pub provider_mirror: Option<PathBuf>,
    /// Terraform processes that may run at once across all cells.
    pub concurrency: usize,
    /// `-lock-timeout` for plan and apply.
    pub lock_timeout_secs: u64,
    /// After the one SIGINT of a cancel, how long terraform may take before its process
    /// group is killed.
    pub cancel_grace_secs: u64,
    /// PATH for terraform and the provisioners it runs.
    pub path: String,
    /// Comma-separated names of environment variables passed to terraform (credentials).
    pub pass_env: String,
    /// Extra environment variables for terraform (names are upper-cased).
    pub env: std::collections::BTreeMap<String, String>,
    /// The `sample-cell` binary used by the `local` template. Default: next to the
    /// `cellplane` binary, else on PATH.
    pub sample_cell_bin: Option<PathBuf>,
    /// Seconds between drift checks of an idle active cell; 0 disables them.
    pub drift_interval_secs: u64,
    /// Lowest and highest port handed to cells (variables with `source = "port"`); keep
    /// the range out of the kernel's ephemeral ports.
    pub port_min: u16,
    pub port_max: u16,
    /// Connection string of terraform's `pg` state backend. Default: the store's URL
    /// (with `sslmode=disable` added when it names none).
    pub state_conn_str: Option<Secret>,
}

impl Default for IacConfig {
    fn default() -> Self {
        Self {
            binary: "terraform".into(),
            templates_dir: None,
            provider_mirror: None,
            concurrency: 4,
            lock_timeout_secs: 60,
            cancel_grace_secs: 15,
            path: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            pass_env: "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,AWS_SESSION_TOKEN".into(),
            env: Default::default(),
            sample_cell_bin: None,
            drift_interval_secs: 3600,
            port_min: crate::iac::DEFAULT_PORT_RANGE.0,
            port_max: crate::iac::DEFAULT_PORT_RANGE.1,
            state_conn_str: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained authoring requests (POST/PATCH/DELETE) per second per token; 0 disables.
    pub authoring_per_sec: f64,
    pub authoring_burst: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    pub workers: usize,
    pub lease_secs: u64,
    pub poll_ms: u64,
    pub max_attempts: i64,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Pause after each pipeline step. A debugging aid that makes crash/resume windows
    /// observable; 0 in production.
    pub step_delay_ms: u64,
    /// How long a job step may keep waiting on something slow (counted from the job's
    /// first start) before the job fails, for kinds that set no limit of their own.
    pub wait_secs: u64,
    /// How often a waiting job looks again at first (then less often, at most every 2 s).
    pub wait_poll_ms: u64,
    /// Named failpoints, `name=action[@attempt];…` (see `failpoints.rs`). Honoured only by
    /// debug builds; for crash and failure tests.
    pub failpoints: String,
    /// How long a controller's lease lasts without renewal (by the database clock): the
    /// longest a standby replica waits to take over from a dead holder.
    pub controller_lease_ms: u64,
    /// How often a controller's holder renews its lease and a standby tries to take it.
    pub controller_renew_ms: u64,
    /// The tenant controller: first retry of a failed convergence (doubling up to
    /// `tenant_retry_max_ms`), how often it looks without a signal, and how often it looks
    /// at every tenant for drift.
    pub tenant_retry_base_ms: u64,
    pub tenant_retry_max_ms: u64,
    pub tenant_poll_ms: u64,
    pub tenant_sweep_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Route changes kept for delta watches; older watchers get the full table.
    pub history_limit: i64,
    /// Upper bound of `wait` on `GET /v1/routes`.
    pub max_wait_secs: u64,
    /// How often the revision is re-read from the store, so a watch served by this
    /// replica sees changes committed by another one.
    pub revision_poll_ms: u64,
    /// A router not heard from for this long is not live.
    pub router_live_secs: u64,
    /// How long the per-cell traffic routers report with heartbeats is kept (as slots):
    /// the longest window a release gate can look at.
    pub cell_sample_retention_secs: u64,
    /// The time slots routers' per-cell traffic is summed into (release gates read whole
    /// slots: a window is cut to the slots that start inside it).
    pub cell_slot_secs: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            history_limit: 10_000,
            max_wait_secs: 60,
            revision_poll_ms: 500,
            router_live_secs: 30,
            cell_sample_retention_secs: 3600,
            cell_slot_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// Strategy for regions without a policy: `spread` or `binpack`.
    pub strategy: cellplane_api::PlacementStrategy,
    /// Give up on a placement that waits for a cell to be stamped after this long.
    pub stamp_wait_secs: u64,
    /// How often a placement waiting for a stamped cell looks again.
    pub stamp_poll_ms: u64,
    /// Default pre-stamp threshold for regions whose policy sets none (0 disables).
    pub prestamp_threshold: f64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            strategy: cellplane_api::PlacementStrategy::Spread,
            stamp_wait_secs: 900,
            stamp_poll_ms: 500,
            prestamp_threshold: 0.7,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7480".into(),
            data_dir: PathBuf::from(".cellplane"),
            database_url: None,
            database_max_connections: 16,
            admin_token: None,
            log_format: LogFormat::Text,
            max_body_bytes: 1024 * 1024,
            max_apply_bytes: 16 * 1024 * 1024,
            shutdown_grace_secs: 10,
            rate_limit: RateLimitConfig::default(),
            jobs: JobsConfig::default(),
            routing: RoutingConfig::default(),
            placement: PlacementConfig::default(),
            iac: IacConfig::default(),
            events: EventsConfig::default(),
            webhooks: WebhooksConfig::default(),
            usage: UsageConfig::default(),
            moves: MovesConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            authoring_per_sec: 200.0,
            authoring_burst: 400.0,
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            lease_secs: 30,
            poll_ms: 500,
            max_attempts: 5,
            backoff_base_ms: 1000,
            backoff_cap_ms: 60_000,
            step_delay_ms: 0,
            wait_secs: 900,
            wait_poll_ms: 500,
            failpoints: String::new(),
            controller_lease_ms: 10_000,
            controller_renew_ms: 2_000,
            tenant_retry_base_ms: 2_000,
            tenant_retry_max_ms: 60_000,
            tenant_poll_ms: 1_000,
            tenant_sweep_secs: 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid environment variable {name}: {message}")]
    Env { name: String, message: String },
}

impl Config {
    /// Defaults → `file` (if any) → `CELLPLANE__…` variables from `env`.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            doc = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("CELLPLANE__") else {
                continue;
            };
            let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
            if keys.iter().any(|k| k.is_empty()) {
                return Err(ConfigError::Env {
                    name,
                    message: "empty key segment".into(),
                });
            }
            set_path(&mut doc, &keys, env_value(&value));
        }
        let cfg: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: file
                    .map(|p| p.to_path_buf())
                    .unwrap_or_else(|| "<environment>".into()),
                message: e.to_string(),
            })?;
        Ok(cfg)
    }
}

/// Environment values are strings; numbers and booleans are recognised so typed fields parse.
fn env_value(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(f) = v.parse::<f64>() {
        return toml::Value::Float(f);
    }
    match v {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(v.to_string()),
    }
}

fn set_path(doc: &mut toml::Table, keys: &[String], value: toml::Value) {
    let (last, parents) = keys.split_last().expect("at least one key");
    let mut cur = doc;
    for k in parents {
        let entry = cur
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        cur = entry.as_table_mut().expect("just made a table");
    }
    cur.insert(last.clone(), value);
}

/// The configuration `cellplane serve` and `up` run with: defaults, then `file`, then
/// `CELLPLANE__…` variables, and the admin token from `CELLPLANE_ADMIN_TOKEN` when set.
pub fn load_config(file: Option<&std::path::Path>) -> Result<Config, ConfigError> {
    let mut cfg = Config::load(file, std::env::vars())?;
    if let Ok(t) = std::env::var("CELLPLANE_ADMIN_TOKEN") {
        if !t.is_empty() {
            cfg.admin_token = Some(Secret::new(t));
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:9\"\n[jobs]\nworkers = 2\n").expect("write");
        let cfg = Config::load(
            Some(&path),
            [
                ("CELLPLANE__JOBS__WORKERS".to_string(), "7".to_string()),
                ("CELLPLANE__LOG_FORMAT".to_string(), "json".to_string()),
                ("UNRELATED".to_string(), "x".to_string()),
            ],
        )
        .expect("config loads");
        assert_eq!(cfg.listen, "0.0.0.0:9");
        assert_eq!(cfg.jobs.workers, 7);
        assert_eq!(cfg.jobs.lease_secs, 30);
        assert_eq!(cfg.log_format, LogFormat::Json);
    }

    #[test]
    fn a_retry_schedule_comes_from_a_list_or_a_comma_separated_variable() {
        let cfg = Config::load(
            None,
            [(
                "CELLPLANE__WEBHOOKS__RETRY_SCHEDULE_MS".to_string(),
                "0, 200,1000".to_string(),
            )],
        )
        .expect("config loads");
        assert_eq!(cfg.webhooks.retry_schedule_ms, vec![0, 200, 1000]);
        assert_eq!(
            Config::load(None, [])
                .unwrap()
                .webhooks
                .retry_schedule_ms
                .len(),
            8
        );
        for bad in ["", "1,x"] {
            let err = Config::load(
                None,
                [(
                    "CELLPLANE__WEBHOOKS__RETRY_SCHEDULE_MS".to_string(),
                    bad.to_string(),
                )],
            );
            assert!(err.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = Config::load(None, [("CELLPLANE__NOPE".to_string(), "1".to_string())]);
        assert!(err.is_err());
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
