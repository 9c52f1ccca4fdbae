//! Schema migrations for both backends, and the PostgreSQL service role with its grants and
//! row-level security policies.
//!
//! Migrations are idempotent and safe to run from several processes at once: tables are
//! created `IF NOT EXISTS` under a transaction-scoped advisory lock, and creating the
//! cluster-wide service role tolerates a concurrent creator. On PostgreSQL this runs over
//! the owner/admin connection only; it must never run over the service role's pool, and
//! must never splice an unquoted name into SQL (names go through the server's `format()`
//! with `%I`/`%L`).

use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    tenant_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    version INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX IF NOT EXISTS kv_tenant_seq ON kv (tenant_id, seq);
CREATE TABLE IF NOT EXISTS tenant_flags (
    tenant_id TEXT NOT NULL PRIMARY KEY,
    frozen BOOLEAN NOT NULL DEFAULT FALSE,
    last_seq INTEGER NOT NULL DEFAULT 0,
    epoch TEXT NOT NULL
);
";

/// `COLLATE "C"` keeps key order bytewise, as on SQLite, so listings and cursors agree
/// across backends.
const POSTGRES_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS kv (
    tenant_id TEXT NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    value BYTEA NOT NULL,
    version BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX IF NOT EXISTS kv_tenant_seq ON kv (tenant_id, seq);
CREATE TABLE IF NOT EXISTS tenant_flags (
    tenant_id TEXT NOT NULL PRIMARY KEY,
    frozen BOOLEAN NOT NULL DEFAULT FALSE,
    last_seq BIGINT NOT NULL DEFAULT 0,
    epoch TEXT NOT NULL
);
"#;

/// Tables that hold tenant data; each gets the same row-level security policy.
const TENANT_TABLES: [&str; 2] = ["kv", "tenant_flags"];

/// Serializes concurrent migrations of one database (advisory locks are per database).
const MIGRATION_LOCK: i64 = 0x5ce1_1000;

pub(super) async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(SQLITE_SCHEMA).execute(pool).await?;
    Ok(())
}

pub(super) async fn migrate_postgres(
    admin: &PgPool,
    role: &str,
    password: Option<&str>,
) -> Result<(), sqlx::Error> {
    ensure_role(admin, role, password).await?;

    let mut tx = admin.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(POSTGRES_SCHEMA).execute(&mut *tx).await?;
    for table in TENANT_TABLES {
        let statements: Vec<String> = sqlx::query_scalar(
            "SELECT unnest(ARRAY[ \
               format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', $1::text), \
               format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', $1::text), \
               format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE %I TO %I', $1::text, $2::text)])",
        )
        .bind(table)
        .bind(role)
        .fetch_all(&mut *tx)
        .await?;
        for statement in statements {
            sqlx::raw_sql(&statement).execute(&mut *tx).await?;
        }
        let has_policy: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_policies \
             WHERE schemaname = current_schema() AND tablename = $1 \
             AND policyname = 'tenant_isolation')",
        )
        .bind(table)
        .fetch_one(&mut *tx)
        .await?;
        if !has_policy {
            let statement: String = sqlx::query_scalar(
                "SELECT format('CREATE POLICY tenant_isolation ON %I \
                 USING (tenant_id = current_setting(''app.tenant_id'', true)) \
                 WITH CHECK (tenant_id = current_setting(''app.tenant_id'', true))', $1::text)",
            )
            .bind(table)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::raw_sql(&statement).execute(&mut *tx).await?;
        }
    }
    let grants: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(ARRAY[ \
           format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), $1::text), \
           format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), $1::text)])",
    )
    .bind(role)
    .fetch_all(&mut *tx)
    .await?;
    for statement in grants {
        sqlx::raw_sql(&statement).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Create the service role if it is missing and set its password when one is given.
/// Roles are cluster-wide and several sample-cell processes may start at once against one
/// server, so "already exists" and concurrent catalog updates are retried, not fatal.
async fn ensure_role(
    admin: &PgPool,
    role: &str,
    password: Option<&str>,
) -> Result<(), sqlx::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_ensure_role(admin, role, password).await {
            Ok(()) => return Ok(()),
            Err(err) if attempt < 5 && is_concurrent_catalog_error(&err) => {
                tracing::debug!(role, attempt, error = %err, "retrying service role setup");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

async fn try_ensure_role(
    admin: &PgPool,
    role: &str,
    password: Option<&str>,
) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(admin)
            .await?;
    if !exists {
        let statement: String = sqlx::query_scalar(
            "SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT', $1::text)",
        )
        .bind(role)
        .fetch_one(admin)
        .await?;
        match sqlx::raw_sql(&statement).execute(admin).await {
            Ok(_) => tracing::info!(role, "created service role"),
            Err(err) if is_duplicate(&err) => {}
            Err(err) => return Err(err),
        }
    }
    if let Some(password) = password {
        let statement: String = sqlx::query_scalar(
            "SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', $1::text, $2::text)",
        )
        .bind(role)
        .bind(password)
        .fetch_one(admin)
        .await?;
        sqlx::raw_sql(&statement).execute(admin).await?;
    }
    Ok(())
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|code| code.into_owned())
}

/// `duplicate_object` (the role exists) or `unique_violation` (lost a catalog race).
fn is_duplicate(err: &sqlx::Error) -> bool {
    matches!(sqlstate(err).as_deref(), Some("42710" | "23505"))
}

/// Errors a concurrent creator of the same role can cause: duplicates, "tuple concurrently
/// updated" (XX000) and serialization failures.
fn is_concurrent_catalog_error(err: &sqlx::Error) -> bool {
    is_duplicate(err) || matches!(sqlstate(err).as_deref(), Some("XX000" | "40001"))
}
