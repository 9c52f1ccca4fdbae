//! Controller leases: one row per controller naming the replica that runs it, a term that
//! fences a deposed holder's late writes, and an expiry judged by the database clock.

use super::{Result, Store, WriteTx};
use sqlx::Row;

/// The fencing token of a controller's writes: who holds which lease at which term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub name: &'static str,
    pub holder: String,
    pub term: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerLease {
    pub name: String,
    pub holder: String,
    pub term: i64,
    pub expires_at: String,
    pub acquired_at: String,
    pub renewed_at: String,
    /// Whether the lease had not expired when it was read (by the database clock).
    pub live: bool,
}

impl Store {
    /// Takes or renews the lease of `name` for `holder` until `ttl_ms` from now (database
    /// clock). A holder renewing keeps its term; a replica taking over an expired lease gets
    /// the next term. None: another replica holds a live lease.
    pub async fn acquire_controller_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<Option<i64>> {
        let now = self.backend.now_sql(0);
        let until = self.backend.now_sql(ttl_ms);
        let sql = format!(
            "INSERT INTO controller_leases (name, holder, term, expires_at, acquired_at, renewed_at) \
             VALUES ($1, $2, 1, {until}, {now}, {now}) \
             ON CONFLICT (name) DO UPDATE SET \
               term = CASE WHEN controller_leases.holder = excluded.holder THEN controller_leases.term \
                      ELSE controller_leases.term + 1 END, \
               acquired_at = CASE WHEN controller_leases.holder = excluded.holder \
                      THEN controller_leases.acquired_at ELSE excluded.acquired_at END, \
               holder = excluded.holder, expires_at = excluded.expires_at, renewed_at = excluded.renewed_at \
             WHERE controller_leases.holder = excluded.holder OR controller_leases.expires_at < {now} \
             RETURNING term"
        );
        let _guard = self.lock_writer().await;
        let row = sqlx::query(&sql)
            .bind(name)
            .bind(holder)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<i64, _>("term")).transpose()?)
    }

    /// Gives the lease up (a replica stopping cleanly), so another takes over at once.
    pub async fn release_controller_lease(&self, name: &str, holder: &str) -> Result<()> {
        let now = self.backend.now_sql(-1);
        let _guard = self.lock_writer().await;
        sqlx::query(&format!(
            "UPDATE controller_leases SET expires_at = {now} WHERE name = $1 AND holder = $2"
        ))
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_controller_leases(&self) -> Result<Vec<ControllerLease>> {
        let now = self.backend.now_sql(0);
        let rows = sqlx::query(&format!(
            "SELECT name, holder, term, expires_at, acquired_at, renewed_at, \
             CASE WHEN expires_at > {now} THEN 1 ELSE 0 END AS live \
             FROM controller_leases ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let live: i32 = r.try_get("live")?;
                Ok(ControllerLease {
                    name: r.try_get("name")?,
                    holder: r.try_get("holder")?,
                    term: r.try_get("term")?,
                    expires_at: r.try_get("expires_at")?,
                    acquired_at: r.try_get("acquired_at")?,
                    renewed_at: r.try_get("renewed_at")?,
                    live: live != 0,
                })
            })
            .collect()
    }
}

impl WriteTx {
    /// Checks, inside a controller's write transaction, that `holder` still holds `name` at
    /// `term` with a live lease. On PostgreSQL the update locks the lease row, so a replica
    /// taking the lease over waits for this transaction, and this one cannot commit after a
    /// takeover. False: the writer was deposed and must roll back.
    pub async fn fence(&mut self, name: &str, holder: &str, term: i64) -> Result<bool> {
        let now = self.backend.now_sql(0);
        let res = sqlx::query(&format!(
            "UPDATE controller_leases SET renewed_at = {now} \
             WHERE name = $1 AND holder = $2 AND term = $3 AND expires_at > {now}"
        ))
        .bind(name)
        .bind(holder)
        .bind(term)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }
}
