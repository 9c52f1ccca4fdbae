//! Releases: the rollout's public row (`GET /v1/releases`) and its progress.

use super::{json_col, now, opt_json_col, to_json, Result, Store, WriteTx};
use cellplane_api::releases::{CreateRelease, GateDecision, ReleaseState, ReleaseWave};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::collections::BTreeMap;

/// Where a rollout is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// The wave being applied or baked (`waves.len()` when all are done).
    pub wave: usize,
    /// `apply`, `bake`, `rollback`, `done`.
    pub phase: String,
    pub last_eval_at: Option<String>,
    /// Each gate's tally during the current bake, by gate name.
    pub tallies: BTreeMap<String, crate::gates::Tally>,
    /// Set by `abort`: the rollback ends the release `aborted`.
    #[serde(default)]
    pub aborting: bool,
    /// Set by `approve`: the waiting wave may start.
    #[serde(default)]
    pub approved_wave: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ReleaseRow {
    pub release_id: String,
    pub spec: CreateRelease,
    pub state: ReleaseState,
    pub waves: Vec<ReleaseWave>,
    pub progress: Progress,
    pub decisions: Vec<GateDecision>,
    pub reason: Option<String>,
    pub job_id: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

fn release_from_row(r: &sqlx::any::AnyRow) -> Result<ReleaseRow> {
    let state: String = r.try_get("state")?;
    Ok(ReleaseRow {
        release_id: r.try_get("release_id")?,
        spec: json_col(r, "spec")?,
        state: ReleaseState::parse(&state).ok_or_else(|| {
            super::StoreError::Corrupt(format!("unknown release state {state:?}"))
        })?,
        waves: json_col(r, "waves")?,
        progress: opt_json_col(r, "progress")?.unwrap_or_default(),
        decisions: json_col(r, "decisions")?,
        reason: r.try_get("reason")?,
        job_id: r.try_get("job_id")?,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// Most decisions a release keeps (the newest).
const MAX_DECISIONS: usize = 2000;

impl WriteTx {
    pub async fn insert_release(&mut self, r: &ReleaseRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO releases (release_id, spec, state, waves, progress, decisions, reason, \
             job_id, version, created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
        )
        .bind(&r.release_id)
        .bind(to_json(&r.spec))
        .bind(r.state.as_str())
        .bind(to_json(&r.waves))
        .bind(to_json(&r.progress))
        .bind(to_json(&r.decisions))
        .bind(r.reason.as_deref())
        .bind(r.job_id.as_deref())
        .bind(r.version)
        .bind(&r.created_at)
        .bind(&r.updated_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn get_release_tx(&mut self, id: &str) -> Result<Option<ReleaseRow>> {
        let row = sqlx::query("SELECT * FROM releases WHERE release_id = $1")
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// Writes a release's state, waves, progress, decisions and reason if it is still at
    /// `version`; false when someone else wrote it first.
    pub async fn update_release(&mut self, r: &mut ReleaseRow) -> Result<bool> {
        if r.decisions.len() > MAX_DECISIONS {
            let drop = r.decisions.len() - MAX_DECISIONS;
            r.decisions.drain(..drop);
        }
        let res = sqlx::query(
            "UPDATE releases SET state = $1, waves = $2, progress = $3, decisions = $4, \
             reason = $5, job_id = $6, version = version + 1, updated_at = $7 \
             WHERE release_id = $8 AND version = $9",
        )
        .bind(r.state.as_str())
        .bind(to_json(&r.waves))
        .bind(to_json(&r.progress))
        .bind(to_json(&r.decisions))
        .bind(r.reason.as_deref())
        .bind(r.job_id.as_deref())
        .bind(now())
        .bind(&r.release_id)
        .bind(r.version)
        .execute(&mut *self.tx)
        .await?;
        if res.rows_affected() == 1 {
            r.version += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// Releases that still hold their cells.
    pub async fn active_releases_tx(&mut self) -> Result<Vec<ReleaseRow>> {
        let rows = sqlx::query(
            "SELECT * FROM releases WHERE state IN ('running', 'paused', 'rolling_back') \
             ORDER BY created_at",
        )
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(release_from_row).collect()
    }
}

impl Store {
    pub async fn get_release(&self, id: &str) -> Result<Option<ReleaseRow>> {
        let row = sqlx::query("SELECT * FROM releases WHERE release_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// Releases, newest first, created before `before` (a cursor; empty: from the newest).
    pub async fn list_releases(&self, before: &str, limit: i64) -> Result<Vec<ReleaseRow>> {
        let rows = sqlx::query(
            "SELECT * FROM releases WHERE ($1 = '' OR created_at < $1) \
             ORDER BY created_at DESC, release_id DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(release_from_row).collect()
    }
}
