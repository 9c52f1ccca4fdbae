//! Persistence: the only module that runs SQL, over SQLite (embedded default) or PostgreSQL.
//!
//! Every operation is one transaction scoped to one tenant: on PostgreSQL it first sets
//! `app.tenant_id` with `set_config(…, true)` so row-level security confines it to that
//! tenant even if a query forgot its filter, and every query still filters by `tenant_id`
//! explicitly. Both backends run the same SQL text. Writes of a tenant are serialized on
//! its `tenant_flags` row, which also holds the tenant's sequence counter and freeze flag:
//! sequence numbers are therefore handed out in commit order, which makes export cursors
//! exact, and a freeze waits for in-flight writes. This module must never build SQL from
//! user input (values are bound; identifiers are validated and quoted by the server) and
//! never decides HTTP semantics.

mod schema;

use std::str::FromStr;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};

use crate::config::{derive_app_url, Config, DatabaseUrl};
use crate::ids::{Key, Prefix, TenantId};

/// Errors of a store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("tenant is frozen")]
    Frozen,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Errors while opening the store; they stop the process.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid database url: {0}")]
    Url(String),
    #[error("cannot connect to the {what} database: {source}")]
    Connect {
        what: &'static str,
        source: sqlx::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(sqlx::Error),
    #[error("service role `{0}` is a superuser or bypasses row-level security; use a plain role")]
    InsecureRole(String),
}

/// Which backend a store runs on; shown in logs and `/version`.
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

/// A pool over one of the two backends. Deliberately not `Debug`: the pools' options hold
/// the database password.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Outcome of a tenant write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub version: i64,
    pub seq: i64,
    /// The key had no live value before this write.
    pub created: bool,
}

/// A live value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub version: i64,
    pub seq: i64,
}

/// One line of a key listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub version: i64,
    pub size: i64,
}

/// One stored row as the change feed sees it: a live value or a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub value: Vec<u8>,
    pub version: i64,
    pub seq: i64,
    pub deleted: bool,
}

/// A record to import; `version` decides whether it replaces the stored row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportItem {
    pub key: Key,
    pub value: Vec<u8>,
    pub version: i64,
    pub deleted: bool,
}

/// The per-tenant control row: freeze flag and change-feed position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flags {
    pub frozen: bool,
    /// Highest sequence number committed for this tenant.
    pub last_seq: i64,
    /// Random id of this incarnation of the tenant's history; a purge starts a new one.
    pub epoch: String,
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub rows: u64,
}

/// Runs `$body` in one transaction scoped to `$tenant`, with `$tx` bound to the
/// transaction. The body is expanded once per backend, so the same SQL text and the same
/// code serve both; an early return (or `?`) drops the transaction, which rolls it back.
macro_rules! tenant_tx {
    ($store:expr, $tenant:expr, |$tx:ident| $body:block) => {
        match $store {
            Store::Sqlite(pool) => {
                let mut $tx = pool.begin().await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
            Store::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                sqlx::query("SELECT set_config('app.tenant_id', $1, true)")
                    .bind($tenant.as_str())
                    .execute(&mut *$tx)
                    .await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}

/// Allocate the next `$count` sequence numbers of a tenant (creating its control row on
/// first use) and lock the row until commit; evaluates to `(frozen, last_seq)`.
macro_rules! reserve_seqs {
    ($tx:ident, $tenant:expr, $count:expr) => {{
        let row = sqlx::query(
            "INSERT INTO tenant_flags (tenant_id, frozen, last_seq, epoch) \
             VALUES ($1, FALSE, $2, $3) \
             ON CONFLICT (tenant_id) DO UPDATE SET last_seq = tenant_flags.last_seq + $2 \
             RETURNING frozen, last_seq",
        )
        .bind($tenant.as_str())
        .bind($count)
        .bind(new_epoch())
        .fetch_one(&mut *$tx)
        .await?;
        (
            row.try_get::<bool, _>("frozen")?,
            row.try_get::<i64, _>("last_seq")?,
        )
    }};
}

/// Rows per export chunk.
pub const EXPORT_CHUNK: i64 = 2000;

impl Store {
    /// Open the store the configuration names and bring its schema up to date.
    pub async fn connect(config: &Config) -> Result<Self, SetupError> {
        match config.database() {
            DatabaseUrl::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| SetupError::DataDir {
                        path: dir.display().to_string(),
                        source,
                    })?;
                }
                let options = SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(30));
                let pool = SqlitePoolOptions::new()
                    .max_connections(config.max_connections)
                    .connect_with(options)
                    .await
                    .map_err(|source| SetupError::Connect {
                        what: "sqlite",
                        source,
                    })?;
                schema::migrate_sqlite(&pool)
                    .await
                    .map_err(SetupError::Migrate)?;
                Ok(Store::Sqlite(pool))
            }
            DatabaseUrl::Postgres(admin_url) => {
                let admin_options = PgConnectOptions::from_str(admin_url.expose())
                    .map_err(|e| SetupError::Url(e.to_string()))?;
                let (app_url, role) = match &config.app_database_url {
                    Some(url) => {
                        let options = PgConnectOptions::from_str(url.expose())
                            .map_err(|e| SetupError::Url(e.to_string()))?;
                        (url.expose().to_owned(), options.get_username().to_owned())
                    }
                    None => {
                        let password = config.app_db_password.as_ref().map(|p| p.expose());
                        let url = derive_app_url(admin_url.expose(), &config.app_role, password)
                            .map_err(SetupError::Url)?;
                        (url, config.app_role.clone())
                    }
                };
                let admin = PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(admin_options)
                    .await
                    .map_err(|source| SetupError::Connect {
                        what: "admin",
                        source,
                    })?;
                let password = config.app_db_password.as_ref().map(|p| p.expose());
                let migrated = schema::migrate_postgres(&admin, &role, password).await;
                admin.close().await;
                migrated.map_err(SetupError::Migrate)?;

                let app_options = PgConnectOptions::from_str(&app_url)
                    .map_err(|e| SetupError::Url(e.to_string()))?;
                let pool = PgPoolOptions::new()
                    .max_connections(config.max_connections)
                    .connect_with(app_options)
                    .await
                    .map_err(|source| SetupError::Connect {
                        what: "service-role",
                        source,
                    })?;
                let bypasses: bool = sqlx::query_scalar(
                    "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
                )
                .fetch_one(&pool)
                .await
                .map_err(SetupError::Migrate)?;
                if bypasses {
                    pool.close().await;
                    return Err(SetupError::InsecureRole(role));
                }
                Ok(Store::Postgres(pool))
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Store::Sqlite(_) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    /// Close every pooled connection (after the server has drained).
    pub async fn close(&self) {
        match self {
            Store::Sqlite(pool) => pool.close().await,
            Store::Postgres(pool) => pool.close().await,
        }
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
            Store::Postgres(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
        }
        Ok(())
    }

    /// Store `value` under `key`, bumping its version; refused while the tenant is frozen.
    pub async fn put(
        &self,
        tenant: &TenantId,
        key: &Key,
        value: &[u8],
    ) -> Result<Written, StoreError> {
        tenant_tx!(self, tenant, |tx| {
            let (frozen, seq) = reserve_seqs!(tx, tenant, 1_i64);
            if frozen {
                return Err(StoreError::Frozen);
            }
            let existed: Option<bool> =
                sqlx::query_scalar("SELECT deleted FROM kv WHERE tenant_id = $1 AND key = $2")
                    .bind(tenant.as_str())
                    .bind(key.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            let version: i64 = sqlx::query_scalar(
                "INSERT INTO kv (tenant_id, key, value, version, seq, deleted) \
                 VALUES ($1, $2, $3, 1, $4, FALSE) \
                 ON CONFLICT (tenant_id, key) DO UPDATE SET value = excluded.value, \
                 version = kv.version + 1, seq = excluded.seq, deleted = FALSE \
                 RETURNING version",
            )
            .bind(tenant.as_str())
            .bind(key.as_str())
            .bind(value)
            .bind(seq)
            .fetch_one(&mut *tx)
            .await?;
            Ok(Written {
                version,
                seq,
                created: existed != Some(false),
            })
        })
    }

    /// Delete `key`, leaving a tombstone; `None` when there was no live value.
    pub async fn delete(
        &self,
        tenant: &TenantId,
        key: &Key,
    ) -> Result<Option<Written>, StoreError> {
        tenant_tx!(self, tenant, |tx| {
            let (frozen, seq) = reserve_seqs!(tx, tenant, 1_i64);
            if frozen {
                return Err(StoreError::Frozen);
            }
            let version: Option<i64> = sqlx::query_scalar(
                "UPDATE kv SET deleted = TRUE, value = $3, version = version + 1, seq = $4 \
                 WHERE tenant_id = $1 AND key = $2 AND NOT deleted RETURNING version",
            )
            .bind(tenant.as_str())
            .bind(key.as_str())
            .bind(&[] as &[u8])
            .bind(seq)
            .fetch_optional(&mut *tx)
            .await?;
            match version {
                // Nothing changed: drop the transaction so the sequence number is not spent.
                None => return Ok(None),
                Some(version) => Ok(Some(Written {
                    version,
                    seq,
                    created: false,
                })),
            }
        })
    }

    /// The live value of `key`.
    pub async fn get(&self, tenant: &TenantId, key: &Key) -> Result<Option<Entry>, StoreError> {
        tenant_tx!(self, tenant, |tx| {
            let row = sqlx::query(
                "SELECT value, version, seq FROM kv \
                 WHERE tenant_id = $1 AND key = $2 AND NOT deleted",
            )
            .bind(tenant.as_str())
            .bind(key.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                None => Ok(None),
                Some(row) => Ok(Some(Entry {
                    value: row.try_get("value")?,
                    version: row.try_get("version")?,
                    seq: row.try_get("seq")?,
                })),
            }
        })
    }

    /// Up to `limit` live keys with `prefix`, after `after` in byte order.
    pub async fn list(
        &self,
        tenant: &TenantId,
        prefix: &Prefix,
        after: Option<&Key>,
        limit: i64,
    ) -> Result<Vec<Listed>, StoreError> {
        // Every key is non-empty ASCII below 0x7f, so "" and "\x7f" are open bounds.
        let (lower, upper) = prefix
            .range()
            .unwrap_or_else(|| (String::new(), "\u{7f}".to_owned()));
        let after = after.map_or("", Key::as_str);
        tenant_tx!(self, tenant, |tx| {
            let rows = sqlx::query(
                "SELECT key, version, CAST(length(value) AS BIGINT) AS size FROM kv \
                 WHERE tenant_id = $1 AND NOT deleted AND key > $2 AND key >= $3 AND key < $4 \
                 ORDER BY key LIMIT $5",
            )
            .bind(tenant.as_str())
            .bind(after)
            .bind(&lower)
            .bind(&upper)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(Listed {
                        key: row.try_get("key")?,
                        version: row.try_get("version")?,
                        size: row.try_get("size")?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
    }

    /// The tenant's control row, if it ever wrote or was frozen.
    pub async fn flags(&self, tenant: &TenantId) -> Result<Option<Flags>, StoreError> {
        tenant_tx!(self, tenant, |tx| {
            let row = sqlx::query(
                "SELECT frozen, last_seq, epoch FROM tenant_flags WHERE tenant_id = $1",
            )
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                None => Ok(None),
                Some(row) => Ok(Some(Flags {
                    frozen: row.try_get("frozen")?,
                    last_seq: row.try_get("last_seq")?,
                    epoch: row.try_get("epoch")?,
                })),
            }
        })
    }

    /// Set or clear the freeze flag. Setting it waits for in-flight writes of the tenant
    /// (they hold its control row), so once it returns no further write can commit.
    pub async fn set_frozen(&self, tenant: &TenantId, frozen: bool) -> Result<Flags, StoreError> {
        tenant_tx!(self, tenant, |tx| {
            let row = sqlx::query(
                "INSERT INTO tenant_flags (tenant_id, frozen, last_seq, epoch) \
                 VALUES ($1, $2, 0, $3) \
                 ON CONFLICT (tenant_id) DO UPDATE SET frozen = excluded.frozen \
                 RETURNING frozen, last_seq, epoch",
            )
            .bind(tenant.as_str())
            .bind(frozen)
            .bind(new_epoch())
            .fetch_one(&mut *tx)
            .await?;
            Ok(Flags {
                frozen: row.try_get("frozen")?,
                last_seq: row.try_get("last_seq")?,
                epoch: row.try_get("epoch")?,
            })
        })
    }

    /// Up to `limit` rows and tombstones with `after < seq <= upto`, in sequence order.
    pub async fn changes(
        &self,
        tenant: &TenantId,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<Change>, StoreError> {
        tenant_tx!(self, tenant, |tx| {
            let rows = sqlx::query(
                "SELECT key, value, version, seq, deleted FROM kv \
                 WHERE tenant_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
            )
            .bind(tenant.as_str())
            .bind(after)
            .bind(upto)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(Change {
                        key: row.try_get("key")?,
                        value: row.try_get("value")?,
                        version: row.try_get("version")?,
                        seq: row.try_get("seq")?,
                        deleted: row.try_get("deleted")?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
    }

    /// Apply a batch of imported records in one transaction; a record replaces the stored
    /// row only if its version is higher, so replaying a stream changes nothing. Keys in
    /// `items` must be unique. Returns how many records were applied. Allowed while frozen:
    /// imports are the control plane's own writes.
    pub async fn import(&self, tenant: &TenantId, items: &[ImportItem]) -> Result<u64, StoreError> {
        if items.is_empty() {
            return Ok(0);
        }
        let count = i64::try_from(items.len()).expect("a batch is far below i64::MAX");
        tenant_tx!(self, tenant, |tx| {
            let (_frozen, last_seq) = reserve_seqs!(tx, tenant, count);
            let first_seq = last_seq - count + 1;
            let mut builder =
                QueryBuilder::new("INSERT INTO kv (tenant_id, key, value, version, seq, deleted) ");
            builder.push_values(items.iter().zip(first_seq..), |mut row, (item, seq)| {
                row.push_bind(tenant.as_str())
                    .push_bind(item.key.as_str())
                    .push_bind(item.value.as_slice())
                    .push_bind(item.version)
                    .push_bind(seq)
                    .push_bind(item.deleted);
            });
            builder.push(
                " ON CONFLICT (tenant_id, key) DO UPDATE SET value = excluded.value, \
                 version = excluded.version, seq = excluded.seq, deleted = excluded.deleted \
                 WHERE kv.version < excluded.version",
            );
            let applied = builder.build().execute(&mut *tx).await?.rows_affected();
            Ok(applied)
        })
    }

    /// Call `visit(key, value)` for every live row of the tenant, from one snapshot.
    pub async fn for_each_live_row(
        &self,
        tenant: &TenantId,
        mut visit: impl FnMut(&str, &[u8]) + Send,
    ) -> Result<u64, StoreError> {
        tenant_tx!(self, tenant, |tx| {
            let mut rows =
                sqlx::query("SELECT key, value FROM kv WHERE tenant_id = $1 AND NOT deleted")
                    .bind(tenant.as_str())
                    .fetch(&mut *tx);
            let mut count = 0_u64;
            while let Some(row) = rows.try_next().await? {
                let key: &str = row.try_get("key")?;
                let value: &[u8] = row.try_get("value")?;
                visit(key, value);
                count += 1;
            }
            Ok(count)
        })
    }

    /// Remove every row, tombstone and flag of the tenant.
    pub async fn purge(&self, tenant: &TenantId) -> Result<Purged, StoreError> {
        tenant_tx!(self, tenant, |tx| {
            let rows = sqlx::query("DELETE FROM kv WHERE tenant_id = $1")
                .bind(tenant.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM tenant_flags WHERE tenant_id = $1")
                .bind(tenant.as_str())
                .execute(&mut *tx)
                .await?;
            Ok(Purged { rows })
        })
    }
}

/// A fresh history id for a tenant's control row.
fn new_epoch() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}
