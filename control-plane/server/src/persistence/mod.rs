//! Persistence: the only module that runs SQL.
//!
//! One code path serves SQLite (embedded default) and PostgreSQL through sqlx's `Any`
//! driver: the schema uses only types both understand (TEXT, BIGINT, DOUBLE PRECISION),
//! JSON documents and timestamps are stored as text. The one backend-specific clause is
//! the job queue's `FOR UPDATE SKIP LOCKED`. Every write that changes the registry goes
//! through [`Store::write`], which appends the audit record and outbox event in the same
//! transaction; nothing here may commit a registry change without them.

mod audit;
mod cells;
mod controllers;
pub use cells::{CellFilter, CellSecrets};
pub use controllers::{ControllerLease, Fence};
mod deliveries;
mod idempotency;
mod jobs;
mod manifests;
mod metrics;
mod moves;
pub mod notify;
mod orgs;
mod placement;
mod releases;
mod routing;
mod tenants;
mod tokens;
mod usage;
mod webhooks;

pub use audit::{AuditInput, OutboxRow, OwnedAudit, VerifyOutcome};
pub use deliveries::{AttemptResult, AttemptRow, DeliveryRow, DueDelivery, NewDelivery};
pub use idempotency::StoredResponse;
pub use jobs::{JobEnd, JobRow, LastStepRecord, NewJob};
pub use manifests::ObjectBook;
pub use metrics::{CellDelta, Traffic, DELTA_BOUNDS};
pub use moves::{MoveFilter, MoveProgress, MoveRow};
pub use placement::Reservation;
pub use releases::{Progress, ReleaseRow};
pub use routing::{RouteWrite, RouterRow, RoutingHead};
pub use tenants::{
    Conditional, CreateOutcome, Desired, EnvironmentRow, NewTenant, TenantFilter, TenantRow,
};
pub use tokens::TokenRow;
pub use usage::UsageRow;
pub use webhooks::WebhookRow;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration {version} failed: {source}")]
    Migration {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A job could not take a resource because another job holds it.
    #[error("{resource} is held by job {job_id}")]
    Locked { resource: String, job_id: String },
}

impl StoreError {
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(e)) => {
                e.kind() == sqlx::error::ErrorKind::UniqueViolation
            }
            _ => false,
        }
    }
    pub fn is_foreign_key_violation(&self) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(e)) => {
                e.kind() == sqlx::error::ErrorKind::ForeignKeyViolation
            }
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// The registry store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// SQLite: one connection that runs every write transaction. SQLite drops a
    /// connection's page cache whenever another connection changed the file, so writes
    /// spread over the pool re-read their pages on every transaction; one writer keeps
    /// its cache (PostgreSQL: the pool).
    writer: AnyPool,
    backend: Backend,
    /// SQLite allows one writer: serializing writers in-process avoids busy retries and
    /// lock upgrades that a deferred transaction cannot survive.
    write_lock: Option<Arc<Mutex<()>>>,
    /// The PostgreSQL URL, for the change-notification listener. Never printed.
    pg_url: Option<Arc<str>>,
}

/// A write transaction. Registry changes made through it carry their audit record.
pub struct WriteTx {
    pub(crate) tx: Transaction<'static, Any>,
    _guard: Option<OwnedMutexGuard<()>>,
    backend: Backend,
}

impl WriteTx {
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }
}

/// A pooled connection idle for longer than this is pinged before it is handed out.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

const MIGRATIONS_SQLITE: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../../migrations/sqlite/0002_stamping.sql")),
    (3, include_str!("../../migrations/sqlite/0003_routing.sql")),
    (
        4,
        include_str!("../../migrations/sqlite/0004_ports_idempotency.sql"),
    ),
    (
        5,
        include_str!("../../migrations/sqlite/0005_job_locks.sql"),
    ),
    (
        6,
        include_str!("../../migrations/sqlite/0006_controllers.sql"),
    ),
    (
        7,
        include_str!("../../migrations/sqlite/0007_claim_order_index.sql"),
    ),
    (8, include_str!("../../migrations/sqlite/0008_webhooks.sql")),
    (
        9,
        include_str!("../../migrations/sqlite/0009_webhook_deliveries.sql"),
    ),
    (10, include_str!("../../migrations/sqlite/0010_usage.sql")),
    (11, include_str!("../../migrations/sqlite/0011_moves.sql")),
    (
        12,
        include_str!("../../migrations/sqlite/0012_manifests.sql"),
    ),
    (
        13,
        include_str!("../../migrations/sqlite/0013_cell_samples.sql"),
    ),
    (
        14,
        include_str!("../../migrations/sqlite/0014_releases.sql"),
    ),
    (
        15,
        include_str!("../../migrations/sqlite/0015_cell_slots.sql"),
    ),
];
const MIGRATIONS_POSTGRES: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_stamping.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_routing.sql"),
    ),
    (
        4,
        include_str!("../../migrations/postgres/0004_ports_idempotency.sql"),
    ),
    (
        5,
        include_str!("../../migrations/postgres/0005_job_locks.sql"),
    ),
    (
        6,
        include_str!("../../migrations/postgres/0006_controllers.sql"),
    ),
    (
        7,
        include_str!("../../migrations/postgres/0007_claim_order_index.sql"),
    ),
    (
        8,
        include_str!("../../migrations/postgres/0008_webhooks.sql"),
    ),
    (
        9,
        include_str!("../../migrations/postgres/0009_webhook_deliveries.sql"),
    ),
    (10, include_str!("../../migrations/postgres/0010_usage.sql")),
    (11, include_str!("../../migrations/postgres/0011_moves.sql")),
    (
        12,
        include_str!("../../migrations/postgres/0012_manifests.sql"),
    ),
    (
        13,
        include_str!("../../migrations/postgres/0013_cell_samples.sql"),
    ),
    (
        14,
        include_str!("../../migrations/postgres/0014_releases.sql"),
    ),
    (
        15,
        include_str!("../../migrations/postgres/0015_cell_slots.sql"),
    ),
];

impl Store {
    /// Opens `database_url` if given (PostgreSQL), else `<data_dir>/cellplane.db` (SQLite in
    /// WAL mode), and applies pending migrations.
    pub async fn open(
        database_url: Option<&str>,
        data_dir: &Path,
        max_connections: u32,
    ) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (url, backend) = match database_url {
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                (u.to_string(), Backend::Postgres)
            }
            Some(u) if u.starts_with("sqlite:") => (u.to_string(), Backend::Sqlite),
            Some(u) => {
                return Err(StoreError::Db(sqlx::Error::Configuration(
                    format!("unsupported database url scheme in {:?}", redact_url(u)).into(),
                )))
            }
            None => (
                format!(
                    "sqlite://{}?mode=rwc",
                    data_dir.join("cellplane.db").display()
                ),
                Backend::Sqlite,
            ),
        };
        let opts = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => max_connections.max(2),
                Backend::Postgres => max_connections,
            })
            .acquire_timeout(Duration::from_secs(10))
            // sqlx pings every connection on checkout by default: one extra round trip per
            // statement on PostgreSQL. Only a connection that sat idle long enough to have
            // been dropped by a server or proxy is checked; a broken busy one fails its
            // statement, which callers already handle.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > IDLE_CHECK_AFTER {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        for pragma in [
                            "PRAGMA journal_mode=WAL",
                            "PRAGMA synchronous=NORMAL",
                            "PRAGMA busy_timeout=10000",
                            "PRAGMA foreign_keys=ON",
                            // 16 MiB of page cache per connection (default 2 MiB).
                            "PRAGMA cache_size=-16384",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            });
        let pool = opts.clone().connect(&url).await?;
        let writer = match backend {
            Backend::Sqlite => opts.clone().max_connections(1).connect(&url).await?,
            Backend::Postgres => pool.clone(),
        };
        let mut store = Store {
            pool,
            writer,
            backend,
            write_lock: (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(()))),
            pg_url: (backend == Backend::Postgres).then(|| Arc::from(url.as_str())),
        };
        store.migrate().await?;
        if backend == Backend::Sqlite {
            // A connection that prepared statements before a migration altered a table can
            // keep the old column list with the new schema (sqlx caches it per statement):
            // the readers start afresh on the migrated schema.
            store.pool.close().await;
            store.pool = opts.connect(&url).await?;
        }
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    async fn migrate(&self) -> Result<()> {
        let _guard = self.lock_writer().await;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let migrations = match self.backend {
            Backend::Sqlite => MIGRATIONS_SQLITE,
            Backend::Postgres => MIGRATIONS_POSTGRES,
        };
        for (version, sql) in migrations {
            let mut tx = self.pool.begin().await?;
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&mut *tx)
                    .await?;
            if done.is_some() {
                continue;
            }
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(|source| StoreError::Migration {
                    version: *version,
                    source,
                })?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(*version)
                .bind(now())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(
                version,
                backend = self.backend.as_str(),
                "applied migration"
            );
        }
        Ok(())
    }

    async fn lock_writer(&self) -> Option<OwnedMutexGuard<()>> {
        match &self.write_lock {
            Some(m) => Some(m.clone().lock_owned().await),
            None => None,
        }
    }

    /// Begins a write transaction (serialized with other writers on SQLite).
    pub async fn write(&self) -> Result<WriteTx> {
        let guard = self.lock_writer().await;
        let tx = self.writer.begin().await?;
        Ok(WriteTx {
            tx,
            _guard: guard,
            backend: self.backend,
        })
    }

    /// `/readyz`: the store answers a trivial query.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Runs `f` on a fresh write transaction and commits it.
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }
}

/// `(…),(…)` placeholders for `rows` rows of `cols` columns, numbered from `$1`.
pub(crate) fn values_placeholders(rows: usize, cols: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 1..=cols {
            if c > 1 {
                s.push(',');
            }
            s.push('$');
            s.push_str(&(r * cols + c).to_string());
        }
        s.push(')');
    }
    s
}

/// Current time as fixed-width RFC 3339 UTC with microseconds, so text order is time order.
impl Backend {
    /// SQL for the database's clock plus `offset_ms`, in the stored time format
    /// (`2026-01-02T03:04:05.678901Z`), so leases are judged by one clock whatever each
    /// replica's says. `offset_ms` comes from code, never from input. On PostgreSQL this is
    /// `now()`, the transaction's start (stable, so a comparison with it can use an index;
    /// `clock_timestamp()` is volatile and would scan the table on every claim).
    pub fn now_sql(self, offset_ms: i64) -> String {
        match self {
            Backend::Sqlite => format!(
                "(strftime('%Y-%m-%dT%H:%M:%f', 'now', '{:+.3} seconds') || '000Z')",
                offset_ms as f64 / 1000.0
            ),
            Backend::Postgres => format!(
                "to_char((now() + interval '{offset_ms} milliseconds') AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
            ),
        }
    }
}

pub fn now() -> String {
    fmt_time(chrono::Utc::now())
}

pub fn fmt_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

pub fn parse_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// A server-generated id in the id alphabet: a prefix, a time part that sorts, and
/// randomness so replicas never collide.
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let millis = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let mut rng = rand::thread_rng();
    let rand_part: String = (0..10)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}-{millis:012x}{rand_part}")
}

pub(crate) fn redact_url(u: &str) -> String {
    // postgres://user:secret@host/db → postgres://user:***@host/db
    match (u.find("://"), u.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &u[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &u[..s + 3], &creds[..c], &u[at..]),
                None => u.to_string(),
            }
        }
        _ => u.to_string(),
    }
}

pub(crate) fn json_col<T: serde::de::DeserializeOwned>(row: &AnyRow, col: &str) -> Result<T> {
    let s: String = row.try_get(col)?;
    serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

pub(crate) fn opt_json_col<T: serde::de::DeserializeOwned>(
    row: &AnyRow,
    col: &str,
) -> Result<Option<T>> {
    let s: Option<String> = row.try_get(col)?;
    match s {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("column {col}: {e}"))),
    }
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("registry documents always serialize")
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_placeholders_number_rows_then_columns() {
        assert_eq!(super::values_placeholders(1, 1), "($1)");
        assert_eq!(super::values_placeholders(2, 3), "($1,$2,$3),($4,$5,$6)");
    }

    #[test]
    fn redacts_password() {
        assert_eq!(
            super::redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
