//! The manifest bookkeeping every kind shares: `generation` (moves with each change of the
//! desired spec) and `meta` (the manifest's labels and annotations), on the kind's own table.

use super::{now, opt_json_col, to_json, Result, Store, WriteTx};
use cellplane_api::manifests::Kind;
use sqlx::Row;
use std::collections::HashMap;

/// A kind's table and key column. Both are constants: nothing from a request is spliced in.
fn table(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Organization => ("organizations", "organization_id"),
        Kind::RegionPolicy => ("region_policies", "region"),
        Kind::Cell => ("cells", "cell_id"),
        Kind::Tenant => ("tenants", "tenant_id"),
    }
}

/// `generation` and `meta` of one object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectBook {
    pub generation: i64,
    pub meta: Option<serde_json::Value>,
}

impl Store {
    /// Every cell (any state), by id.
    pub async fn all_cells(&self) -> Result<Vec<cellplane_api::Cell>> {
        let mut out = Vec::new();
        loop {
            let after = out
                .last()
                .map(|c: &cellplane_api::Cell| c.cell_id.clone())
                .unwrap_or_default();
            let page = self
                .list_cells(&super::CellFilter::default(), &after, 1000)
                .await?;
            let done = page.len() < 1000;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// Every organization, by id.
    pub async fn all_organizations(&self) -> Result<Vec<cellplane_api::Organization>> {
        let mut out = Vec::new();
        loop {
            let after = out
                .last()
                .map(|o: &cellplane_api::Organization| o.organization_id.clone())
                .unwrap_or_default();
            let page = self.list_organizations(&after, 1000).await?;
            let done = page.len() < 1000;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// `generation` and `meta` of every object of `kind`, by name.
    pub async fn object_books(&self, kind: Kind) -> Result<HashMap<String, ObjectBook>> {
        let (table, key) = table(kind);
        let rows = sqlx::query(&format!(
            "SELECT {key} AS name, generation, meta FROM {table}"
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in &rows {
            out.insert(
                row.try_get("name")?,
                ObjectBook {
                    generation: row.try_get("generation")?,
                    meta: opt_json_col(row, "meta")?,
                },
            );
        }
        Ok(out)
    }
}

impl WriteTx {
    /// Records a change of an object's desired spec: `generation + 1`, and its manifest
    /// metadata when given. Returns the new generation (`None`: no such object).
    pub async fn bump_generation(
        &mut self,
        kind: Kind,
        name: &str,
        meta: Option<&serde_json::Value>,
    ) -> Result<Option<i64>> {
        let (table, key) = table(kind);
        sqlx::query(&format!(
            "UPDATE {table} SET generation = generation + 1, meta = COALESCE($1, meta) WHERE {key} = $2"
        ))
        .bind(meta.map(to_json))
        .bind(name)
        .execute(&mut *self.tx)
        .await?;
        let g: Option<i64> =
            sqlx::query_scalar(&format!("SELECT generation FROM {table} WHERE {key} = $1"))
                .bind(name)
                .fetch_optional(&mut *self.tx)
                .await?;
        Ok(g)
    }

    /// Sets an object's manifest metadata without moving its generation (a new object).
    pub async fn set_meta(
        &mut self,
        kind: Kind,
        name: &str,
        meta: &serde_json::Value,
    ) -> Result<()> {
        let (table, key) = table(kind);
        sqlx::query(&format!("UPDATE {table} SET meta = $1 WHERE {key} = $2"))
            .bind(to_json(meta))
            .bind(name)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Renames an organization (its only mutable field).
    pub async fn rename_organization(&mut self, id: &str, name: &str) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE organizations SET name = $1, version = version + 1, updated_at = $2 \
             WHERE organization_id = $3",
        )
        .bind(name)
        .bind(now())
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }
}
