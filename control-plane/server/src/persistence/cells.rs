//! Cells: the registry record of each cell. Stamping fills outputs and state later.

use super::{json_col, now, opt_json_col, to_json, Result, Store, StoreError, WriteTx};
use cellplane_api::{Capacity, Cell, CellState, Tier};
use sqlx::Row;

/// Cell rows with the job that holds the cell (from `job_locks`) as `pending_job_id`.
pub(super) const CELL_SELECT: &str = "SELECT cells.*, (SELECT l.job_id FROM job_locks l WHERE l.resource = 'cell/' || cells.cell_id) AS pending_job_id FROM cells";

pub(super) fn cell_from_row(row: &sqlx::any::AnyRow) -> Result<Cell> {
    let tier: String = row.try_get("tier")?;
    let state: String = row.try_get("state")?;
    let cap = |col: &str| -> Result<u64> {
        let v: i64 = row.try_get(col)?;
        Ok(v.max(0) as u64)
    };
    Ok(Cell {
        cell_id: row.try_get("cell_id")?,
        region: row.try_get("region")?,
        tier: Tier::parse(&tier)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown tier {tier:?}")))?,
        template: row.try_get("template")?,
        capacity: Capacity {
            tenants: cap("capacity_tenants")?,
            units: cap("capacity_units")?,
        },
        used: Capacity {
            tenants: cap("used_tenants")?,
            units: cap("used_units")?,
        },
        labels: json_col(row, "labels")?,
        vars: json_col(row, "vars")?,
        state: CellState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown cell state {state:?}")))?,
        outputs: json_col(row, "outputs")?,
        app_version: row.try_get("app_version")?,
        drift: opt_json_col(row, "drift")?,
        pending_job_id: row.try_get("pending_job_id")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// What a cell keeps out of the API: generated secret variables and sensitive outputs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CellSecrets {
    pub vars: std::collections::BTreeMap<String, serde_json::Value>,
    pub outputs: std::collections::BTreeMap<String, serde_json::Value>,
}

fn secrets_from_row(row: &sqlx::any::AnyRow) -> Result<CellSecrets> {
    Ok(CellSecrets {
        vars: json_col(row, "secret_vars")?,
        outputs: json_col(row, "secret_outputs")?,
    })
}

#[derive(Debug, Clone, Default)]
pub struct CellFilter {
    pub region: Option<String>,
    pub tier: Option<String>,
    pub state: Option<String>,
}

impl WriteTx {
    pub async fn insert_cell(&mut self, c: &Cell) -> Result<()> {
        sqlx::query(
            "INSERT INTO cells (cell_id, region, tier, template, capacity_tenants, capacity_units, used_tenants, used_units, \
             labels, vars, state, outputs, app_version, drift, version, created_at, updated_at) \
             VALUES ($1,$2,$3,$4,$5,$6,0,0,$7,$8,$9,$10,$11,NULL,$12,$13,$14)",
        )
        .bind(&c.cell_id)
        .bind(&c.region)
        .bind(c.tier.as_str())
        .bind(&c.template)
        .bind(c.capacity.tenants as i64)
        .bind(c.capacity.units as i64)
        .bind(to_json(&c.labels))
        .bind(to_json(&c.vars))
        .bind(c.state.as_str())
        .bind(to_json(&c.outputs))
        .bind(c.app_version.as_deref())
        .bind(c.version)
        .bind(&c.created_at)
        .bind(&c.updated_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn get_cell_tx(&mut self, id: &str) -> Result<Option<Cell>> {
        let row = sqlx::query(&format!("{CELL_SELECT} WHERE cell_id = $1"))
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(cell_from_row).transpose()
    }

    /// Writes the mutable registry fields of `c` if the stored version is `c.version - 1`.
    pub async fn update_cell(&mut self, c: &Cell) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE cells SET capacity_tenants = $1, capacity_units = $2, labels = $3, vars = $4, state = $5, \
             outputs = $6, app_version = $7, drift = $8, version = $9, updated_at = $10 \
             WHERE cell_id = $11 AND version = $12",
        )
        .bind(c.capacity.tenants as i64)
        .bind(c.capacity.units as i64)
        .bind(to_json(&c.labels))
        .bind(to_json(&c.vars))
        .bind(c.state.as_str())
        .bind(to_json(&c.outputs))
        .bind(c.app_version.as_deref())
        .bind(c.drift.as_ref().map(|d| d.to_string()))
        .bind(c.version)
        .bind(now())
        .bind(&c.cell_id)
        .bind(c.version - 1)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Secrets of a cell: generated variables and sensitive outputs. Never on the wire.
    pub async fn get_cell_secrets_tx(&mut self, id: &str) -> Result<Option<CellSecrets>> {
        let row = sqlx::query("SELECT secret_vars, secret_outputs FROM cells WHERE cell_id = $1")
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(secrets_from_row).transpose()
    }

    pub async fn set_cell_secrets(&mut self, id: &str, s: &CellSecrets) -> Result<()> {
        sqlx::query("UPDATE cells SET secret_vars = $1, secret_outputs = $2 WHERE cell_id = $3")
            .bind(to_json(&s.vars))
            .bind(to_json(&s.outputs))
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Records what a drift check saw. Drift is observed status, not desired state: the
    /// cell's version (and ETag) does not change.
    pub async fn set_cell_drift(&mut self, id: &str, drift: &serde_json::Value) -> Result<bool> {
        let res = sqlx::query("UPDATE cells SET drift = $1 WHERE cell_id = $2")
            .bind(drift.to_string())
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Whether a job of `kind` for `target` is queued or running.
    pub async fn has_open_job(&mut self, kind: &str, target: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT job_id FROM jobs WHERE kind = $1 AND target = $2 AND state IN ('queued', 'running') \
             ORDER BY created_at LIMIT 1",
        )
        .bind(kind)
        .bind(target)
        .fetch_optional(&mut *self.tx)
        .await?)
    }

    /// Ports held by cells that are not destroyed: the rows of `cell_ports`, and for cells
    /// registered before ports were recorded there, the port in their variable `var`.
    pub async fn cell_ports_taken(&mut self, var: &str) -> Result<std::collections::HashSet<u16>> {
        let recorded: Vec<i64> = sqlx::query_scalar(
            "SELECT p.port FROM cell_ports p WHERE EXISTS \
             (SELECT 1 FROM cells c WHERE c.cell_id = p.cell_id AND c.state <> 'destroyed')",
        )
        .fetch_all(&mut *self.tx)
        .await?;
        let mut out: std::collections::HashSet<u16> = recorded
            .into_iter()
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT vars FROM cells WHERE state <> 'destroyed'")
                .fetch_all(&mut *self.tx)
                .await?;
        for text in rows {
            let vars: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("column vars: {e}")))?;
            if let Some(p) = vars[var].as_u64().and_then(|p| u16::try_from(p).ok()) {
                out.insert(p);
            }
        }
        Ok(out)
    }

    /// Takes `port` for variable `var` of `cell_id` (registered in this transaction). A
    /// row left by a destroyed cell is taken over; false when a live
    /// cell, or a concurrent creation, holds the port: pick another.
    pub async fn take_cell_port(&mut self, port: u16, cell_id: &str, var: &str) -> Result<bool> {
        sqlx::query(
            "DELETE FROM cell_ports WHERE port = $1 AND cell_id <> $2 AND NOT EXISTS \
             (SELECT 1 FROM cells c WHERE c.cell_id = cell_ports.cell_id AND c.state <> 'destroyed')",
        )
        .bind(port as i64)
        .bind(cell_id)
        .execute(&mut *self.tx)
        .await?;
        let res = sqlx::query(
            "INSERT INTO cell_ports (port, cell_id, var, allocated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (port) DO NOTHING",
        )
        .bind(port as i64)
        .bind(cell_id)
        .bind(var)
        .bind(now())
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    pub async fn count_tenants_on_cell(&mut self, cell_id: &str) -> Result<i64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM environments WHERE cell_id = $1")
            .bind(cell_id)
            .fetch_one(&mut *self.tx)
            .await?;
        Ok(n)
    }
}

impl Store {
    pub async fn get_cell_secrets(&self, id: &str) -> Result<Option<CellSecrets>> {
        let row = sqlx::query("SELECT secret_vars, secret_outputs FROM cells WHERE cell_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(secrets_from_row).transpose()
    }

    /// Active cells with no job reserved whose last drift check is older than `before`
    /// (or that were never checked): candidates for the periodic drift check.
    pub async fn cells_due_for_drift_check(&self, before: &str, limit: i64) -> Result<Vec<Cell>> {
        let rows = sqlx::query(
            &format!("{CELL_SELECT} WHERE state = 'active' AND NOT EXISTS \
             (SELECT 1 FROM job_locks k WHERE k.resource = 'cell/' || cells.cell_id) ORDER BY cell_id LIMIT $1"),
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let c = cell_from_row(r)?;
            let checked = c
                .drift
                .as_ref()
                .and_then(|d| d["checked_at"].as_str())
                .map(str::to_string);
            let due = match checked {
                None => true,
                Some(t) => t.as_str() < before,
            };
            if due {
                out.push(c);
            }
        }
        Ok(out)
    }

    pub async fn get_cell(&self, id: &str) -> Result<Option<Cell>> {
        let row = sqlx::query(&format!("{CELL_SELECT} WHERE cell_id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(cell_from_row).transpose()
    }

    pub async fn list_cells(&self, f: &CellFilter, after: &str, limit: i64) -> Result<Vec<Cell>> {
        let mut sql = format!("{CELL_SELECT} WHERE cell_id > $1");
        let mut binds: Vec<&str> = vec![after];
        for (col, val) in [
            ("region", &f.region),
            ("tier", &f.tier),
            ("state", &f.state),
        ] {
            if let Some(v) = val {
                binds.push(v);
                sql.push_str(&format!(" AND {col} = ${}", binds.len()));
            }
        }
        sql.push_str(&format!(" ORDER BY cell_id LIMIT ${}", binds.len() + 1));
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = q.bind(b);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(cell_from_row).collect()
    }
}
