//! Organizations.

use super::{now, Result, Store, WriteTx};
use cellplane_api::Organization;
use sqlx::Row;

fn org_from_row(row: &sqlx::any::AnyRow) -> Result<Organization> {
    Ok(Organization {
        organization_id: row.try_get("organization_id")?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl WriteTx {
    pub async fn insert_organization(&mut self, id: &str, name: &str) -> Result<Organization> {
        let ts = now();
        sqlx::query(
            "INSERT INTO organizations (organization_id, name, version, created_at, updated_at) VALUES ($1,$2,1,$3,$3)",
        )
        .bind(id)
        .bind(name)
        .bind(&ts)
        .execute(&mut *self.tx)
        .await?;
        Ok(Organization {
            organization_id: id.to_string(),
            name: name.to_string(),
            version: 1,
            created_at: ts.clone(),
            updated_at: ts,
        })
    }

    pub async fn organization_exists(&mut self, id: &str) -> Result<bool> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM organizations WHERE organization_id = $1")
                .bind(id)
                .fetch_one(&mut *self.tx)
                .await?;
        Ok(n > 0)
    }
}

impl Store {
    pub async fn get_organization(&self, id: &str) -> Result<Option<Organization>> {
        let row = sqlx::query("SELECT * FROM organizations WHERE organization_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(org_from_row).transpose()
    }

    pub async fn list_organizations(&self, after: &str, limit: i64) -> Result<Vec<Organization>> {
        let rows = sqlx::query(
            "SELECT * FROM organizations WHERE organization_id > $1 ORDER BY organization_id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(org_from_row).collect()
    }
}
