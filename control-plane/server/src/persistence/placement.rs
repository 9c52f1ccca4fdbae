//! Capacity reservations. A reservation is one conditional `UPDATE` on the cell row that
//! only succeeds while the cell is active and has room, so no interleaving of concurrent
//! placements can over-commit a cell; the environment records what it holds so a release
//! is exact and happens once.

use super::{Result, Store, WriteTx};
use cellplane_api::Cell;
use sqlx::Row;

/// What an environment holds on its cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub cell_id: String,
    pub units: i64,
}

impl WriteTx {
    /// Takes one tenant slot and `units` on `cell_id` if it is active and has room.
    pub async fn reserve_capacity(&mut self, cell_id: &str, units: i64) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE cells SET used_tenants = used_tenants + 1, used_units = used_units + $1, updated_at = $2 \
             WHERE cell_id = $3 AND state = 'active' AND used_tenants + 1 <= capacity_tenants \
             AND used_units + $1 <= capacity_units",
        )
        .bind(units)
        .bind(super::now())
        .bind(cell_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Gives `units` and one tenant slot back to a cell (never below zero).
    pub async fn give_back_capacity(&mut self, cell_id: &str, units: i64) -> Result<()> {
        sqlx::query(
            "UPDATE cells SET used_tenants = CASE WHEN used_tenants > 0 THEN used_tenants - 1 ELSE 0 END, \
             used_units = CASE WHEN used_units >= $1 THEN used_units - $1 ELSE 0 END, updated_at = $2 \
             WHERE cell_id = $3",
        )
        .bind(units)
        .bind(super::now())
        .bind(cell_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Points an environment at its cell and records the units it holds there.
    pub async fn set_environment_cell(
        &mut self,
        tenant_id: &str,
        env: &str,
        cell_id: &str,
        endpoint: &str,
        units: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE environments SET cell_id = $1, endpoint = $2, reserved_units = $3 \
             WHERE tenant_id = $4 AND name = $5",
        )
        .bind(cell_id)
        .bind(endpoint)
        .bind(units)
        .bind(tenant_id)
        .bind(env)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Gives back what an environment holds (at most once) and, with `forget_cell`, clears
    /// its cell. Returns the reservation that was released, if any.
    pub async fn release_environment(
        &mut self,
        tenant_id: &str,
        env: &str,
        forget_cell: bool,
    ) -> Result<Option<Reservation>> {
        let row = sqlx::query(
            "SELECT cell_id, reserved_units FROM environments WHERE tenant_id = $1 AND name = $2",
        )
        .bind(tenant_id)
        .bind(env)
        .fetch_optional(&mut *self.tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let cell: Option<String> = row.try_get("cell_id")?;
        let units: i64 = row.try_get("reserved_units")?;
        let mut released = None;
        if let (Some(cell), true) = (&cell, units > 0) {
            // Only the environment that still holds units gives them back.
            let res = sqlx::query(
                "UPDATE environments SET reserved_units = 0 WHERE tenant_id = $1 AND name = $2 AND reserved_units > 0",
            )
            .bind(tenant_id)
            .bind(env)
            .execute(&mut *self.tx)
            .await?;
            if res.rows_affected() == 1 {
                self.give_back_capacity(cell, units).await?;
                released = Some(Reservation {
                    cell_id: cell.clone(),
                    units,
                });
            }
        }
        if forget_cell {
            sqlx::query(
                "UPDATE environments SET cell_id = NULL, endpoint = NULL WHERE tenant_id = $1 AND name = $2",
            )
            .bind(tenant_id)
            .bind(env)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(released)
    }
}

impl Store {
    /// Active cells of `tier` in `regions` (any order; placement scores them).
    pub async fn active_cells_in(&self, tier: &str, regions: &[String]) -> Result<Vec<Cell>> {
        if regions.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (0..regions.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "{} WHERE tier = $1 AND state = 'active' AND region IN ({})",
            super::cells::CELL_SELECT,
            placeholders.join(",")
        );
        let mut q = sqlx::query(&sql).bind(tier);
        for r in regions {
            q = q.bind(r);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(super::cells::cell_from_row).collect()
    }

    /// Pooled cells of a region that are on their way to active (stamped, not yet live).
    pub async fn upcoming_cells_in(&self, tier: &str, region: &str) -> Result<Vec<Cell>> {
        let rows = sqlx::query(&format!(
            "{} WHERE tier = $1 AND region = $2 AND state IN ('pending', 'provisioning')",
            super::cells::CELL_SELECT
        ))
        .bind(tier)
        .bind(region)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(super::cells::cell_from_row).collect()
    }
}
