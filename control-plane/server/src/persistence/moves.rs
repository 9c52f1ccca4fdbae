//! Tenant moves: the public row of each `tenant.move` job and the capacity it holds.
//! Flags that give capacity back (`target_reserved`, `source_held`) are cleared by
//! conditional updates, so a retried step or finish releases at most once.

use super::{Result, Store, WriteTx};
use cellplane_api::{Move, MoveState};
use sqlx::Row;

/// A move as stored: the public view plus the capacity flags.
#[derive(Debug, Clone)]
pub struct MoveRow {
    pub public: Move,
    /// The target's reservation belongs to the move (reserve → flip or rollback).
    pub target_reserved: bool,
    /// The source's capacity is still counted after the flip (until the purge).
    pub source_held: bool,
    pub flipped: bool,
}

/// The capacity flags of a move (column names come from here, never from input).
#[derive(Debug, Clone, Copy)]
enum Flag {
    TargetReserved,
    SourceHeld,
}

#[derive(Debug, Clone, Default)]
pub struct MoveFilter {
    pub tenant_id: Option<String>,
    pub state: Option<MoveState>,
    pub cell_id: Option<String>,
}

fn move_from_row(r: &sqlx::any::AnyRow) -> Result<MoveRow> {
    let state: String = r.try_get("state")?;
    let evidence: String = r.try_get("evidence")?;
    Ok(MoveRow {
        public: Move {
            move_id: r.try_get("move_id")?,
            tenant_id: r.try_get("tenant_id")?,
            env: r.try_get("env")?,
            source_cell_id: r.try_get("source_cell_id")?,
            target_cell_id: r.try_get("target_cell_id")?,
            dedicated: r.try_get::<i64, _>("dedicated")? != 0,
            state: MoveState::parse(&state)
                .ok_or_else(|| super::StoreError::Corrupt(format!("move state {state:?}")))?,
            step: r.try_get("step")?,
            job_id: r.try_get("job_id")?,
            units: r.try_get("units")?,
            rows_copied: r.try_get("rows_copied")?,
            bytes_copied: r.try_get("bytes_copied")?,
            delta_rounds: r.try_get("delta_rounds")?,
            current_delta: r.try_get("current_delta")?,
            hold_ms: r.try_get("hold_ms")?,
            error: r.try_get("error")?,
            evidence: serde_json::from_str(&evidence)
                .map_err(|e| super::StoreError::Corrupt(format!("move evidence: {e}")))?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            finished_at: r.try_get("finished_at")?,
        },
        target_reserved: r.try_get::<i64, _>("target_reserved")? != 0,
        source_held: r.try_get::<i64, _>("source_held")? != 0,
        flipped: r.try_get::<i64, _>("flipped")? != 0,
    })
}

/// What a step reports about the copy (progress shown while the move runs).
#[derive(Debug, Clone, Default)]
pub struct MoveProgress<'a> {
    pub step: &'a str,
    pub rows_copied: i64,
    pub bytes_copied: i64,
    pub delta_rounds: i64,
    pub current_delta: Option<i64>,
    pub hold_ms: Option<i64>,
    pub evidence: &'a serde_json::Value,
}

impl WriteTx {
    pub async fn insert_move(&mut self, m: &Move) -> Result<()> {
        sqlx::query(
            "INSERT INTO moves (move_id, tenant_id, env, source_cell_id, target_cell_id, dedicated, \
             state, step, job_id, units, evidence, created_at, updated_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$12)",
        )
        .bind(&m.move_id)
        .bind(&m.tenant_id)
        .bind(&m.env)
        .bind(&m.source_cell_id)
        .bind(&m.target_cell_id)
        .bind(m.dedicated as i64)
        .bind(m.state.as_str())
        .bind(&m.step)
        .bind(&m.job_id)
        .bind(m.units)
        .bind(super::to_json(&m.evidence))
        .bind(&m.created_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn get_move_tx(&mut self, move_id: &str) -> Result<Option<MoveRow>> {
        let row = sqlx::query("SELECT * FROM moves WHERE move_id = $1")
            .bind(move_id)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(move_from_row).transpose()
    }

    /// The running move of a tenant environment, if any.
    pub async fn running_move_of(&mut self, tenant_id: &str, env: &str) -> Result<Option<Move>> {
        let row = sqlx::query(
            "SELECT * FROM moves WHERE tenant_id = $1 AND env = $2 AND state = 'running'",
        )
        .bind(tenant_id)
        .bind(env)
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(row
            .as_ref()
            .map(move_from_row)
            .transpose()?
            .map(|m| m.public))
    }

    /// A running move into or out of `cell_id`, if any.
    pub async fn running_move_on_cell(&mut self, cell_id: &str) -> Result<Option<Move>> {
        let row = sqlx::query(
            "SELECT * FROM moves WHERE state = 'running' AND (source_cell_id = $1 OR target_cell_id = $1) \
             ORDER BY created_at LIMIT 1",
        )
        .bind(cell_id)
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(row
            .as_ref()
            .map(move_from_row)
            .transpose()?
            .map(|m| m.public))
    }

    /// Sets the target of a move whose target is stamped by the move itself.
    pub async fn set_move_target(&mut self, move_id: &str, cell_id: &str) -> Result<()> {
        sqlx::query("UPDATE moves SET target_cell_id = $1, updated_at = $2 WHERE move_id = $3")
            .bind(cell_id)
            .bind(super::now())
            .bind(move_id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Sets a capacity flag from `from` to `to`; true when this call changed it.
    async fn swap_flag(&mut self, move_id: &str, flag: Flag, from: i64, to: i64) -> Result<bool> {
        let col = match flag {
            Flag::TargetReserved => "target_reserved",
            Flag::SourceHeld => "source_held",
        };
        let res = sqlx::query(&format!(
            "UPDATE moves SET {col} = $1, updated_at = $2 WHERE move_id = $3 AND {col} = $4"
        ))
        .bind(to)
        .bind(super::now())
        .bind(move_id)
        .bind(from)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Records that the target's reservation belongs to the move; false if it already did.
    pub async fn mark_target_reserved(&mut self, move_id: &str) -> Result<bool> {
        self.swap_flag(move_id, Flag::TargetReserved, 0, 1).await
    }

    /// Clears `target_reserved`; true when this call cleared it (give the capacity back).
    pub async fn take_target_reservation(&mut self, move_id: &str) -> Result<bool> {
        self.swap_flag(move_id, Flag::TargetReserved, 1, 0).await
    }

    /// The flip: the target's reservation now belongs to the environment, the source's
    /// capacity stays counted until the purge. False when the move had already flipped.
    pub async fn mark_move_flipped(&mut self, move_id: &str, hold_ms: Option<i64>) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE moves SET flipped = 1, target_reserved = 0, source_held = 1, hold_ms = $1, \
             step = 'flip', updated_at = $2 WHERE move_id = $3 AND flipped = 0",
        )
        .bind(hold_ms)
        .bind(super::now())
        .bind(move_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Clears `source_held`; true when this call cleared it.
    pub async fn take_source_hold(&mut self, move_id: &str) -> Result<bool> {
        self.swap_flag(move_id, Flag::SourceHeld, 1, 0).await
    }

    /// Ends a move (once): its state, error and hold time.
    pub async fn end_move(
        &mut self,
        move_id: &str,
        state: MoveState,
        error: Option<&str>,
        evidence: &serde_json::Value,
    ) -> Result<bool> {
        let now = super::now();
        let res = sqlx::query(
            "UPDATE moves SET state = $1, error = $2, evidence = $3, updated_at = $4, finished_at = $4 \
             WHERE move_id = $5 AND state = 'running'",
        )
        .bind(state.as_str())
        .bind(error)
        .bind(super::to_json(evidence))
        .bind(&now)
        .bind(move_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }
}

impl Store {
    pub async fn get_move(&self, move_id: &str) -> Result<Option<MoveRow>> {
        let row = sqlx::query("SELECT * FROM moves WHERE move_id = $1")
            .bind(move_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(move_from_row).transpose()
    }

    /// The move a job runs.
    pub async fn move_of_job(&self, job_id: &str) -> Result<Option<MoveRow>> {
        let row = sqlx::query("SELECT * FROM moves WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(move_from_row).transpose()
    }

    /// Moves, newest first, after the `(created_at, move_id)` cursor `after` (empty: from
    /// the newest).
    pub async fn list_moves(&self, f: &MoveFilter, before: &str, limit: i64) -> Result<Vec<Move>> {
        let mut sql = String::from("SELECT * FROM moves WHERE 1=1");
        let mut binds: Vec<String> = Vec::new();
        if let Some(t) = &f.tenant_id {
            binds.push(t.clone());
            sql.push_str(&format!(" AND tenant_id = ${}", binds.len()));
        }
        if let Some(s) = f.state {
            binds.push(s.as_str().to_string());
            sql.push_str(&format!(" AND state = ${}", binds.len()));
        }
        if let Some(c) = &f.cell_id {
            binds.push(c.clone());
            let n = binds.len();
            sql.push_str(&format!(
                " AND (source_cell_id = ${n} OR target_cell_id = ${n})"
            ));
        }
        if !before.is_empty() {
            binds.push(before.to_string());
            sql.push_str(&format!(" AND move_id < ${}", binds.len()));
        }
        sql.push_str(&format!(
            " ORDER BY move_id DESC LIMIT {}",
            limit.clamp(1, 1000)
        ));
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| move_from_row(r).map(|m| m.public))
            .collect()
    }

    /// Records a running move's progress (its own small transaction; not a registry change).
    pub async fn move_progress(&self, move_id: &str, p: &MoveProgress<'_>) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE moves SET step = $1, rows_copied = $2, bytes_copied = $3, delta_rounds = $4, \
             current_delta = $5, hold_ms = COALESCE($6, hold_ms), evidence = $7, updated_at = $8 \
             WHERE move_id = $9 AND state = 'running'",
        )
        .bind(p.step)
        .bind(p.rows_copied)
        .bind(p.bytes_copied)
        .bind(p.delta_rounds)
        .bind(p.current_delta)
        .bind(p.hold_ms)
        .bind(super::to_json(p.evidence))
        .bind(super::now())
        .bind(move_id)
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await
    }

    /// Routers seen since `live_after` with the revision each applied and drained.
    pub async fn live_router_acks(&self, live_after: &str) -> Result<Vec<(String, i64, i64)>> {
        let rows = sqlx::query(
            "SELECT router_id, applied_revision, drained_revision FROM routers WHERE last_seen >= $1 ORDER BY router_id",
        )
        .bind(live_after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("router_id")?,
                    r.try_get("applied_revision")?,
                    r.try_get("drained_revision")?,
                ))
            })
            .collect()
    }
}

impl WriteTx {
    /// Sets a tenant's profile (a move to a dedicated cell makes it `st-dedicated`).
    pub async fn set_tenant_profile(&mut self, id: &str, profile: &str) -> Result<()> {
        sqlx::query(
            "UPDATE tenants SET profile = $1, version = version + 1, generation = generation + 1, \
             settled = 0, updated_at = $2 WHERE tenant_id = $3 AND profile <> $1",
        )
        .bind(profile)
        .bind(super::now())
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}

impl WriteTx {
    /// Records the step a move is at.
    pub async fn move_step(&mut self, move_id: &str, step: &str) -> Result<()> {
        sqlx::query(
            "UPDATE moves SET step = $1, updated_at = $2 WHERE move_id = $3 AND state = 'running'",
        )
        .bind(step)
        .bind(super::now())
        .bind(move_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}

impl Store {
    /// The environments placed on a cell.
    pub async fn environments_on_cell(&self, cell_id: &str) -> Result<Vec<super::EnvironmentRow>> {
        let rows =
            sqlx::query("SELECT * FROM environments WHERE cell_id = $1 ORDER BY tenant_id, name")
                .bind(cell_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(super::tenants::env_from_row).collect()
    }
}
