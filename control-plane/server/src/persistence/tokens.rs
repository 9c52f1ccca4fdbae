//! API tokens: only the SHA-256 of a secret is stored.

use super::{now, Result, Store, StoreError, WriteTx};
use cellplane_api::{Role, TokenInfo};
use sqlx::Row;

#[derive(Debug, Clone)]
pub struct TokenRow {
    pub info: TokenInfo,
}

fn token_from_row(row: &sqlx::any::AnyRow) -> Result<TokenRow> {
    let role: String = row.try_get("role")?;
    Ok(TokenRow {
        info: TokenInfo {
            token_id: row.try_get("token_id")?,
            role: Role::parse(&role)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown role {role:?}")))?,
            tenant_id: row.try_get("tenant_id")?,
            description: row.try_get("description")?,
            created_at: row.try_get("created_at")?,
            revoked_at: row.try_get("revoked_at")?,
        },
    })
}

impl WriteTx {
    pub async fn insert_token(&mut self, info: &TokenInfo, token_hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (token_id, token_hash, role, tenant_id, description, created_at, revoked_at) \
             VALUES ($1,$2,$3,$4,$5,$6,NULL)",
        )
        .bind(&info.token_id)
        .bind(token_hash)
        .bind(info.role.as_str())
        .bind(info.tenant_id.as_deref())
        .bind(info.description.as_deref())
        .bind(&info.created_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Sets the bootstrap admin token's hash (insert or replace).
    pub async fn upsert_admin_token(&mut self, token_hash: &str) -> Result<bool> {
        let existing: Option<String> =
            sqlx::query_scalar("SELECT token_hash FROM api_tokens WHERE token_id = 'admin'")
                .fetch_optional(&mut *self.tx)
                .await?;
        match existing {
            Some(h) if h == token_hash => Ok(false),
            Some(_) => {
                sqlx::query("UPDATE api_tokens SET token_hash = $1, revoked_at = NULL WHERE token_id = 'admin'")
                    .bind(token_hash)
                    .execute(&mut *self.tx)
                    .await?;
                Ok(true)
            }
            None => {
                sqlx::query(
                    "INSERT INTO api_tokens (token_id, token_hash, role, tenant_id, description, created_at, revoked_at) \
                     VALUES ('admin', $1, 'admin', NULL, 'bootstrap admin token', $2, NULL)",
                )
                .bind(token_hash)
                .bind(now())
                .execute(&mut *self.tx)
                .await?;
                Ok(true)
            }
        }
    }

    pub async fn revoke_token(&mut self, token_id: &str) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE token_id = $2 AND revoked_at IS NULL",
        )
        .bind(now())
        .bind(token_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }
}

impl Store {
    pub async fn token_by_hash(&self, token_hash: &str) -> Result<Option<TokenRow>> {
        let row =
            sqlx::query("SELECT * FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL")
                .bind(token_hash)
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn get_token(&self, token_id: &str) -> Result<Option<TokenRow>> {
        let row = sqlx::query("SELECT * FROM api_tokens WHERE token_id = $1")
            .bind(token_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn list_tokens(&self, after: &str, limit: i64) -> Result<Vec<TokenRow>> {
        let rows =
            sqlx::query("SELECT * FROM api_tokens WHERE token_id > $1 ORDER BY token_id LIMIT $2")
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(token_from_row).collect()
    }
}
