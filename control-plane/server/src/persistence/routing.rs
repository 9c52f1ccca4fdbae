//! The routing table: `(tenant, env) → cell, endpoint, mode, rate_limit`, a global revision
//! bumped in the transaction of every change, a bounded change history that lets watchers
//! catch up with a delta, router heartbeats, and region placement policies.
//!
//! A change that does not change anything (same cell, endpoint, mode and rate limit) does
//! not bump the revision, so idempotent job steps can publish again without churn.

use super::{json_col, now, opt_json_col, to_json, Result, Store, StoreError, WriteTx};
use cellplane_api::{
    RegionPolicy, Route, RouteChanges, RouteHistoryEntry, RouteKey, RouteMode, RouterHeartbeat,
};
use sqlx::Row;

/// The revision and the oldest `since` a delta can still be computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingHead {
    pub revision: i64,
    pub horizon: i64,
}

/// What a route write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteWrite {
    /// The table changed; this is the new revision.
    Changed(i64),
    /// The table already said this.
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct RouterRow {
    pub router_id: String,
    pub applied_revision: i64,
    pub drained_revision: i64,
    pub stats: Option<serde_json::Value>,
    pub first_seen: String,
    pub last_seen: String,
}

fn route_from_row(row: &sqlx::any::AnyRow) -> Result<Route> {
    let mode: String = row.try_get("mode")?;
    let rate: Option<i64> = row.try_get("rate_limit")?;
    Ok(Route {
        tenant_id: row.try_get("tenant_id")?,
        env: row.try_get("env")?,
        cell_id: row.try_get("cell_id")?,
        endpoint: row.try_get("endpoint")?,
        mode: RouteMode::parse(&mode)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown route mode {mode:?}")))?,
        rate_limit: rate.map(|r| r.max(0) as u64),
    })
}

impl WriteTx {
    async fn bump_revision(&mut self, history_limit: i64) -> Result<i64> {
        let rev: i64 = sqlx::query_scalar(
            "UPDATE routing_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision",
        )
        .fetch_one(&mut *self.tx)
        .await?;
        // Watchers on every replica hear of the new revision when this transaction commits.
        self.notify(super::notify::ROUTES, &rev.to_string()).await?;
        let horizon = rev - history_limit.max(1);
        if horizon > 0 {
            sqlx::query("DELETE FROM route_history WHERE revision <= $1")
                .bind(horizon)
                .execute(&mut *self.tx)
                .await?;
            sqlx::query("UPDATE routing_revision SET horizon = $1 WHERE id = 1 AND horizon < $1")
                .bind(horizon)
                .execute(&mut *self.tx)
                .await?;
        }
        Ok(rev)
    }

    async fn record_history(
        &mut self,
        rev: i64,
        key: (&str, &str),
        op: &str,
        cell: Option<&str>,
        mode: Option<RouteMode>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO route_history (revision, tenant_id, env, op, cell_id, mode, changed_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7)",
        )
        .bind(rev)
        .bind(key.0)
        .bind(key.1)
        .bind(op)
        .bind(cell)
        .bind(mode.map(|m| m.as_str()))
        .bind(now())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn get_route_tx(&mut self, tenant_id: &str, env: &str) -> Result<Option<Route>> {
        let row = sqlx::query("SELECT * FROM routes WHERE tenant_id = $1 AND env = $2")
            .bind(tenant_id)
            .bind(env)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(route_from_row).transpose()
    }

    /// Inserts or replaces a route; bumps the revision only when something changed.
    pub async fn put_route(&mut self, r: &Route, history_limit: i64) -> Result<RouteWrite> {
        if self.get_route_tx(&r.tenant_id, &r.env).await?.as_ref() == Some(r) {
            return Ok(RouteWrite::Unchanged);
        }
        let rev = self.bump_revision(history_limit).await?;
        let ts = now();
        let rate = r.rate_limit.map(|v| v.min(i64::MAX as u64) as i64);
        let updated = sqlx::query(
            "UPDATE routes SET cell_id = $1, endpoint = $2, mode = $3, rate_limit = $4, revision = $5, updated_at = $6 \
             WHERE tenant_id = $7 AND env = $8",
        )
        .bind(&r.cell_id)
        .bind(&r.endpoint)
        .bind(r.mode.as_str())
        .bind(rate)
        .bind(rev)
        .bind(&ts)
        .bind(&r.tenant_id)
        .bind(&r.env)
        .execute(&mut *self.tx)
        .await?;
        if updated.rows_affected() == 0 {
            sqlx::query(
                "INSERT INTO routes (tenant_id, env, cell_id, endpoint, mode, rate_limit, revision, updated_at) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
            )
            .bind(&r.tenant_id)
            .bind(&r.env)
            .bind(&r.cell_id)
            .bind(&r.endpoint)
            .bind(r.mode.as_str())
            .bind(rate)
            .bind(rev)
            .bind(&ts)
            .execute(&mut *self.tx)
            .await?;
        }
        self.record_history(
            rev,
            (&r.tenant_id, &r.env),
            "upsert",
            Some(&r.cell_id),
            Some(r.mode),
        )
        .await?;
        Ok(RouteWrite::Changed(rev))
    }

    /// Removes a route if present.
    pub async fn remove_route(
        &mut self,
        tenant_id: &str,
        env: &str,
        history_limit: i64,
    ) -> Result<RouteWrite> {
        let res = sqlx::query("DELETE FROM routes WHERE tenant_id = $1 AND env = $2")
            .bind(tenant_id)
            .bind(env)
            .execute(&mut *self.tx)
            .await?;
        if res.rows_affected() == 0 {
            return Ok(RouteWrite::Unchanged);
        }
        let rev = self.bump_revision(history_limit).await?;
        self.record_history(rev, (tenant_id, env), "remove", None, None)
            .await?;
        Ok(RouteWrite::Changed(rev))
    }

    /// Records a heartbeat. Returns true when this router was not known before.
    pub async fn router_heartbeat(
        &mut self,
        router_id: &str,
        hb: &RouterHeartbeat,
    ) -> Result<bool> {
        let ts = now();
        let stats = hb.stats.as_ref().map(to_json);
        let res = sqlx::query(
            "UPDATE routers SET applied_revision = $1, stats = $2, last_seen = $3, drained_revision = $4 WHERE router_id = $5",
        )
        .bind(hb.applied_revision)
        .bind(stats.as_deref())
        .bind(&ts)
        .bind(hb.drained_revision.unwrap_or(0))
        .bind(router_id)
        .execute(&mut *self.tx)
        .await?;
        if res.rows_affected() == 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO routers (router_id, applied_revision, stats, first_seen, last_seen, drained_revision) VALUES ($1,$2,$3,$4,$4,$5)",
        )
        .bind(router_id)
        .bind(hb.applied_revision)
        .bind(stats.as_deref())
        .bind(&ts)
        .bind(hb.drained_revision.unwrap_or(0))
        .execute(&mut *self.tx)
        .await?;
        Ok(true)
    }

    pub async fn get_region_policy_tx(
        &mut self,
        region: &str,
    ) -> Result<Option<(RegionPolicy, i64, String)>> {
        let row = sqlx::query("SELECT * FROM region_policies WHERE region = $1")
            .bind(region)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.map(|r| {
            Ok((
                json_col(&r, "policy")?,
                r.try_get("version")?,
                r.try_get("updated_at")?,
            ))
        })
        .transpose()
    }

    /// Writes a region policy at `version` (1 creates it).
    pub async fn put_region_policy(
        &mut self,
        region: &str,
        policy: &RegionPolicy,
        version: i64,
    ) -> Result<String> {
        let ts = now();
        if version == 1 {
            sqlx::query(
                "INSERT INTO region_policies (region, policy, version, updated_at) VALUES ($1,$2,1,$3)",
            )
            .bind(region)
            .bind(to_json(policy))
            .bind(&ts)
            .execute(&mut *self.tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE region_policies SET policy = $1, version = $2, updated_at = $3 WHERE region = $4",
            )
            .bind(to_json(policy))
            .bind(version)
            .bind(&ts)
            .bind(region)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(ts)
    }
}

impl Store {
    pub async fn routing_head(&self) -> Result<RoutingHead> {
        let row = sqlx::query("SELECT revision, horizon FROM routing_revision WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(RoutingHead {
            revision: row.try_get("revision")?,
            horizon: row.try_get("horizon")?,
        })
    }

    pub async fn get_route(&self, tenant_id: &str, env: &str) -> Result<Option<Route>> {
        let row = sqlx::query("SELECT * FROM routes WHERE tenant_id = $1 AND env = $2")
            .bind(tenant_id)
            .bind(env)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(route_from_row).transpose()
    }

    /// The changes after `since`: a delta from the history when it reaches back that far,
    /// else the full table. The revision is read first and the rows after it, so the rows
    /// are at least as new as `revision`: a change that commits in between is also in the
    /// next delta (upserts and removals are idempotent), and none is ever missed. Filtering
    /// the rows by `revision` instead would drop a route rewritten in between.
    pub async fn route_changes(&self, since: i64) -> Result<RouteChanges> {
        let mut tx = self.pool.begin().await?;
        let head = sqlx::query("SELECT revision, horizon FROM routing_revision WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let revision: i64 = head.try_get("revision")?;
        let horizon: i64 = head.try_get("horizon")?;
        // since > revision: the watcher saw a table this store never had (restored from a
        // backup, or another deployment): give it the whole table.
        let full = since <= 0 || since < horizon || since > revision;
        let mut out = RouteChanges {
            revision,
            full,
            upserts: Vec::new(),
            removals: Vec::new(),
        };
        if full {
            let rows = sqlx::query("SELECT * FROM routes ORDER BY tenant_id, env")
                .fetch_all(&mut *tx)
                .await?;
            out.upserts = rows.iter().map(route_from_row).collect::<Result<_>>()?;
        } else if since < revision {
            let rows = sqlx::query(
                "SELECT c.tenant_id AS k_tenant, c.env AS k_env, r.* FROM \
                 (SELECT DISTINCT tenant_id, env FROM route_history WHERE revision > $1 AND revision <= $2) c \
                 LEFT JOIN routes r ON r.tenant_id = c.tenant_id AND r.env = c.env \
                 ORDER BY c.tenant_id, c.env",
            )
            .bind(since)
            .bind(revision)
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                let present: Option<String> = row.try_get("cell_id")?;
                if present.is_some() {
                    out.upserts.push(route_from_row(row)?);
                } else {
                    out.removals.push(RouteKey {
                        tenant_id: row.try_get("k_tenant")?,
                        env: row.try_get("k_env")?,
                    });
                }
            }
        }
        tx.rollback().await?;
        Ok(out)
    }

    /// The retained history, newest first.
    pub async fn route_history(
        &self,
        tenant_id: Option<&str>,
        before: i64,
        limit: i64,
    ) -> Result<Vec<RouteHistoryEntry>> {
        let rows = sqlx::query(
            "SELECT * FROM route_history WHERE revision < $1 AND ($2 = '' OR tenant_id = $2) \
             ORDER BY revision DESC LIMIT $3",
        )
        .bind(before)
        .bind(tenant_id.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let mode: Option<String> = r.try_get("mode")?;
                Ok(RouteHistoryEntry {
                    revision: r.try_get("revision")?,
                    tenant_id: r.try_get("tenant_id")?,
                    env: r.try_get("env")?,
                    op: r.try_get("op")?,
                    cell_id: r.try_get("cell_id")?,
                    mode: mode.as_deref().and_then(RouteMode::parse),
                    changed_at: r.try_get("changed_at")?,
                })
            })
            .collect()
    }

    pub async fn list_routers(&self) -> Result<Vec<RouterRow>> {
        let rows = sqlx::query("SELECT * FROM routers ORDER BY router_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RouterRow {
                    router_id: r.try_get("router_id")?,
                    applied_revision: r.try_get("applied_revision")?,
                    drained_revision: r.try_get("drained_revision")?,
                    stats: opt_json_col(r, "stats")?,
                    first_seen: r.try_get("first_seen")?,
                    last_seen: r.try_get("last_seen")?,
                })
            })
            .collect()
    }

    pub async fn list_region_policies(&self) -> Result<Vec<(String, RegionPolicy, i64, String)>> {
        let rows = sqlx::query("SELECT * FROM region_policies ORDER BY region")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("region")?,
                    json_col(r, "policy")?,
                    r.try_get("version")?,
                    r.try_get("updated_at")?,
                ))
            })
            .collect()
    }

    pub async fn get_region_policy(&self, region: &str) -> Result<Option<RegionPolicy>> {
        let row = sqlx::query("SELECT policy FROM region_policies WHERE region = $1")
            .bind(region)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| json_col(&r, "policy")).transpose()
    }
}
