//! Stored first responses of `Idempotency-Key` requests, replayed on retries. Keys are
//! scoped per principal and route; a stored body never holds a secret (the HTTP layer
//! removes the fields a route withholds and records their names in `withheld`).

use super::{now, Result, Store};
use sqlx::Row;

#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub request_hash: String,
    pub status: u16,
    pub body: String,
    /// Top-level fields removed from `body` before it was stored (comma-separated names).
    pub withheld: String,
    pub etag: Option<String>,
    pub location: Option<String>,
}

impl Store {
    pub async fn idempotent_response(
        &self,
        principal: &str,
        route: &str,
        key: &str,
    ) -> Result<Option<StoredResponse>> {
        let row = sqlx::query(
            "SELECT * FROM idempotency_keys WHERE principal = $1 AND route = $2 AND idem_key = $3",
        )
        .bind(principal)
        .bind(route)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| -> Result<StoredResponse> {
            let status: i64 = r.try_get("status")?;
            Ok(StoredResponse {
                request_hash: r.try_get("request_hash")?,
                status: status as u16,
                body: r.try_get("body")?,
                withheld: r.try_get("withheld")?,
                etag: r.try_get("etag")?,
                location: r.try_get("location")?,
            })
        })
        .transpose()
    }

    /// Stores the first response; returns false when another request stored one first.
    pub async fn store_idempotent_response(
        &self,
        principal: &str,
        route: &str,
        key: &str,
        resp: &StoredResponse,
    ) -> Result<bool> {
        let _guard = self.lock_writer().await;
        let res = sqlx::query(
            "INSERT INTO idempotency_keys (principal, route, idem_key, request_hash, status, body, withheld, etag, location, created_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) ON CONFLICT (principal, route, idem_key) DO NOTHING",
        )
        .bind(principal)
        .bind(route)
        .bind(key)
        .bind(&resp.request_hash)
        .bind(resp.status as i64)
        .bind(&resp.body)
        .bind(&resp.withheld)
        .bind(resp.etag.as_deref())
        .bind(resp.location.as_deref())
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Forgets keys older than `before` (RFC 3339).
    pub async fn expire_idempotency_keys(&self, before: &str) -> Result<u64> {
        let _guard = self.lock_writer().await;
        let res = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected())
    }
}
