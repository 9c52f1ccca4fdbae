//! Tenants and their environments.

use super::{json_col, now, opt_json_col, to_json, Result, Store, StoreError, WriteTx};
use cellplane_api::{Billing, Policies, Profile, Quotas, TenantState};
use sqlx::Row;

/// Tenant rows with the job that holds the tenant (from `job_locks`) as `pending_job_id`.
pub(super) const TENANT_SELECT: &str = "SELECT tenants.*, (SELECT l.job_id FROM job_locks l WHERE l.resource = 'tenant/' || tenants.tenant_id) AS pending_job_id FROM tenants";

/// A tenant as stored, without its environments.
#[derive(Debug, Clone)]
pub struct TenantRow {
    pub tenant_id: String,
    pub organization_id: String,
    pub profile: Profile,
    pub state: TenantState,
    pub region: String,
    pub quotas: Quotas,
    pub policies: Policies,
    pub billing: Billing,
    pub placement: Option<serde_json::Value>,
    pub pending_job_id: Option<String>,
    pub archived_at: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    /// The desired spec's bookkeeping (manifests and the tenant controller).
    pub desired: Desired,
}

/// What the tenant controller and manifests keep on a tenant row (migration 0012).
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The lifecycle state asked for; `None`: whatever the tenant is now.
    pub state: Option<TenantState>,
    pub generation: i64,
    pub observed_generation: i64,
    pub status: Option<cellplane_api::TenantStatus>,
    pub settled: bool,
    pub reconcile_after: Option<String>,
    pub reconcile_failures: i64,
    /// `{"labels", "annotations"}` of the tenant's manifest.
    pub meta: Option<serde_json::Value>,
}

impl Default for Desired {
    fn default() -> Self {
        Self {
            state: None,
            generation: 1,
            observed_generation: 0,
            status: None,
            settled: false,
            reconcile_after: None,
            reconcile_failures: 0,
            meta: None,
        }
    }
}

impl TenantRow {
    /// The lifecycle state the tenant should be in.
    pub fn desired_state(&self) -> TenantState {
        self.desired.state.unwrap_or(self.state)
    }
}

#[derive(Debug, Clone)]
pub struct EnvironmentRow {
    pub tenant_id: String,
    pub name: String,
    pub region: String,
    pub isolation_level: String,
    pub cell_id: Option<String>,
    pub endpoint: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Default)]
pub struct TenantFilter {
    pub state: Option<String>,
    pub region: Option<String>,
    pub organization_id: Option<String>,
    pub cell_id: Option<String>,
    /// Restricts the list to one tenant (tenant-admin tokens).
    pub only_tenant: Option<String>,
}

fn tenant_from_row(row: &sqlx::any::AnyRow) -> Result<TenantRow> {
    let profile: String = row.try_get("profile")?;
    let state: String = row.try_get("state")?;
    Ok(TenantRow {
        tenant_id: row.try_get("tenant_id")?,
        organization_id: row.try_get("organization_id")?,
        profile: Profile::parse(&profile)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown profile {profile:?}")))?,
        state: TenantState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown tenant state {state:?}")))?,
        region: row.try_get("region")?,
        quotas: json_col(row, "quotas")?,
        policies: json_col(row, "policies")?,
        billing: json_col(row, "billing")?,
        placement: opt_json_col(row, "placement")?,
        pending_job_id: row.try_get("pending_job_id")?,
        archived_at: row.try_get("archived_at")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        desired: Desired {
            state: row
                .try_get::<Option<String>, _>("desired_state")?
                .and_then(|s| TenantState::parse(&s)),
            generation: row.try_get("generation")?,
            observed_generation: row.try_get("observed_generation")?,
            status: opt_json_col(row, "status")?,
            settled: row.try_get::<i64, _>("settled")? != 0,
            reconcile_after: row.try_get("reconcile_after")?,
            reconcile_failures: row.try_get("reconcile_failures")?,
            meta: opt_json_col(row, "meta")?,
        },
    })
}

pub(super) fn env_from_row(row: &sqlx::any::AnyRow) -> Result<EnvironmentRow> {
    Ok(EnvironmentRow {
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        region: row.try_get("region")?,
        isolation_level: row.try_get("isolation_level")?,
        cell_id: row.try_get("cell_id")?,
        endpoint: row.try_get("endpoint")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Tenants the controller has work for: a generation it has not observed, or unsettled
    /// and due (no retry time, or one that has passed). Oldest change first.
    pub async fn tenants_to_reconcile(&self, now: &str, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT tenant_id FROM tenants WHERE state <> 'deleted' AND \
             (generation <> observed_generation OR \
              (settled = 0 AND (reconcile_after IS NULL OR reconcile_after <= $1))) \
             ORDER BY updated_at, tenant_id LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("tenant_id").map_err(Into::into))
            .collect()
    }

    /// The newest lifecycle or placement job of a tenant: its id, kind, state and error.
    pub async fn latest_job_of(
        &self,
        target: &str,
    ) -> Result<Option<(String, String, String, Option<String>)>> {
        let row = sqlx::query(
            "SELECT job_id, kind, state, error FROM jobs WHERE target = $1 AND kind IN \
             ('tenant.activate', 'tenant.suspend', 'tenant.resume', 'tenant.archive', 'tenant.place') \
             ORDER BY created_at DESC, job_id DESC LIMIT 1",
        )
        .bind(target)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok((
                r.try_get("job_id")?,
                r.try_get("kind")?,
                r.try_get("state")?,
                r.try_get("error")?,
            ))
        })
        .transpose()
    }

    /// Every tenant that is not deleted, by id after `after` (the controller's drift sweep).
    pub async fn tenant_ids_after(&self, after: &str, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT tenant_id FROM tenants WHERE state <> 'deleted' AND tenant_id > $1 \
             ORDER BY tenant_id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("tenant_id").map_err(Into::into))
            .collect()
    }

    /// The tenants with these ids (any order; unknown ids are left out).
    pub async fn tenants_by_ids(&self, ids: &[String]) -> Result<Vec<TenantRow>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            if chunk.is_empty() {
                continue;
            }
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "{TENANT_SELECT} WHERE tenant_id IN ({})",
                placeholders.join(",")
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.as_str());
            }
            for row in q.fetch_all(&self.pool).await? {
                out.push(tenant_from_row(&row)?);
            }
        }
        Ok(out)
    }
}

/// Outcome of a conditional update.
#[derive(Debug, PartialEq, Eq)]
pub enum Conditional {
    Done,
    NotFound,
    VersionMismatch,
    StateConflict,
}

impl WriteTx {
    pub async fn insert_tenant(&mut self, t: &TenantRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenants (tenant_id, organization_id, profile, state, region, quotas, policies, billing, \
             placement, archived_at, version, created_at, updated_at, desired_state, generation, meta) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,NULL,NULL,$9,$10,$11,$12,$13,$14)",
        )
        .bind(&t.tenant_id)
        .bind(&t.organization_id)
        .bind(t.profile.as_str())
        .bind(t.state.as_str())
        .bind(&t.region)
        .bind(to_json(&t.quotas))
        .bind(to_json(&t.policies))
        .bind(to_json(&t.billing))
        .bind(t.version)
        .bind(&t.created_at)
        .bind(&t.updated_at)
        .bind(t.desired.state.map(|s| s.as_str()))
        .bind(t.desired.generation)
        .bind(t.desired.meta.as_ref().map(to_json))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn insert_environment(&mut self, e: &EnvironmentRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO environments (tenant_id, name, region, isolation_level, cell_id, endpoint, created_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7)",
        )
        .bind(&e.tenant_id)
        .bind(&e.name)
        .bind(&e.region)
        .bind(&e.isolation_level)
        .bind(e.cell_id.as_deref())
        .bind(e.endpoint.as_deref())
        .bind(&e.created_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn list_environments_tx(&mut self, tenant_id: &str) -> Result<Vec<EnvironmentRow>> {
        let rows = sqlx::query("SELECT * FROM environments WHERE tenant_id = $1 ORDER BY name")
            .bind(tenant_id)
            .fetch_all(&mut *self.tx)
            .await?;
        rows.iter().map(env_from_row).collect()
    }

    pub async fn get_tenant_tx(&mut self, id: &str) -> Result<Option<TenantRow>> {
        let row = sqlx::query(&format!("{TENANT_SELECT} WHERE tenant_id = $1"))
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    /// Replaces quotas/policies/billing if the version matches (`None` = any version).
    pub async fn update_tenant_docs(
        &mut self,
        id: &str,
        expected_version: Option<i64>,
        quotas: &Quotas,
        policies: &Policies,
        billing: &Billing,
    ) -> Result<Conditional> {
        let res = sqlx::query(
            "UPDATE tenants SET quotas = $1, policies = $2, billing = $3, version = version + 1, updated_at = $4, \
             generation = generation + 1, settled = 0, reconcile_after = NULL, reconcile_failures = 0 \
             WHERE tenant_id = $5 AND ($6 < 0 OR version = $6)",
        )
        .bind(to_json(quotas))
        .bind(to_json(policies))
        .bind(to_json(billing))
        .bind(now())
        .bind(id)
        .bind(expected_version.unwrap_or(-1))
        .execute(&mut *self.tx)
        .await?;
        if res.rows_affected() == 1 {
            return Ok(Conditional::Done);
        }
        Ok(match self.get_tenant_tx(id).await? {
            None => Conditional::NotFound,
            Some(_) => Conditional::VersionMismatch,
        })
    }

    /// Records a change of the desired spec outside quotas/policies/billing: the desired
    /// lifecycle state (`Some`), the manifest's metadata (`Some`), or only that the spec moved
    /// (environments). Bumps `generation` (not `version`: a lifecycle action moves the
    /// version when its transition commits, as it always has) and wakes the controller.
    pub async fn touch_desired(
        &mut self,
        id: &str,
        state: Option<TenantState>,
        meta: Option<&serde_json::Value>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE tenants SET desired_state = COALESCE($1, desired_state), meta = COALESCE($2, meta), \
             generation = generation + 1, updated_at = $3, settled = 0, \
             reconcile_after = NULL, reconcile_failures = 0 WHERE tenant_id = $4",
        )
        .bind(state.map(|s| s.as_str()))
        .bind(meta.map(to_json))
        .bind(now())
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Sets a draft tenant's profile as part of a spec change whose generation and version
    /// the caller moved.
    pub async fn set_profile_in_spec(&mut self, id: &str, profile: Profile) -> Result<()> {
        sqlx::query("UPDATE tenants SET profile = $1 WHERE tenant_id = $2")
            .bind(profile.as_str())
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Sets the desired lifecycle state without moving the generation (the caller did).
    pub async fn set_desired_state(&mut self, id: &str, state: TenantState) -> Result<()> {
        sqlx::query("UPDATE tenants SET desired_state = $1 WHERE tenant_id = $2")
            .bind(state.as_str())
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Writes what the tenant controller found at `generation`. `settled` holds only while
    /// the generation is still the one observed (a newer spec is reconciled again).
    pub async fn write_tenant_status(
        &mut self,
        id: &str,
        generation: i64,
        status: &cellplane_api::TenantStatus,
        settled: bool,
        reconcile_after: Option<&str>,
        failures: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE tenants SET status = $1, observed_generation = $2, \
             settled = CASE WHEN generation = $2 THEN $3 ELSE 0 END, \
             reconcile_after = $4, reconcile_failures = $5 WHERE tenant_id = $6",
        )
        .bind(to_json(status))
        .bind(generation)
        .bind(settled as i64)
        .bind(reconcile_after)
        .bind(failures)
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// A job that held the tenant ended: the controller looks at it again at once.
    pub async fn wake_tenant(&mut self, id: &str) -> Result<()> {
        sqlx::query("UPDATE tenants SET settled = 0, reconcile_after = NULL WHERE tenant_id = $1")
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Makes every unsettled tenant waiting for a retry due now (a cell became active: a
    /// tenant blocked on capacity may fit).
    pub async fn wake_waiting_tenants(&mut self) -> Result<u64> {
        let res = sqlx::query(
            "UPDATE tenants SET reconcile_after = NULL WHERE settled = 0 AND reconcile_after IS NOT NULL",
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected())
    }

    /// Checks that the tenant may start a lifecycle job now: it exists, is in one of
    /// `from` and, when given, at `expected_version`. The job's lock on the tenant is taken
    /// separately ([`WriteTx::acquire_locks`]).
    pub async fn check_tenant_state(
        &mut self,
        id: &str,
        from: &[TenantState],
        expected_version: Option<i64>,
    ) -> Result<Conditional> {
        Ok(match self.get_tenant_tx(id).await? {
            None => Conditional::NotFound,
            Some(t) if expected_version.is_some_and(|v| v != t.version) => {
                Conditional::VersionMismatch
            }
            Some(t) if !from.contains(&t.state) => Conditional::StateConflict,
            Some(_) => Conditional::Done,
        })
    }

    /// Applies the end state of a lifecycle job. Idempotent: it changes the tenant only
    /// while `job_id` still holds the tenant's lock, and the transaction that calls it
    /// releases that lock, so a second call after a crash changes nothing. Returns whether
    /// the job still held the tenant.
    pub async fn finish_tenant_transition(
        &mut self,
        id: &str,
        job_id: &str,
        to: Option<TenantState>,
    ) -> Result<bool> {
        let held: Option<String> =
            sqlx::query_scalar("SELECT job_id FROM job_locks WHERE resource = $1 AND job_id = $2")
                .bind(format!("tenant/{id}"))
                .bind(job_id)
                .fetch_optional(&mut *self.tx)
                .await?;
        if held.is_none() {
            return Ok(false);
        }
        if let Some(state) = to {
            sqlx::query(
                "UPDATE tenants SET state = $1, version = version + 1, updated_at = $2, \
                 archived_at = CASE WHEN $1 = 'archived' THEN $2 ELSE archived_at END \
                 WHERE tenant_id = $3",
            )
            .bind(state.as_str())
            .bind(now())
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(true)
    }

    pub async fn set_tenant_placement(
        &mut self,
        id: &str,
        placement: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query("UPDATE tenants SET placement = $1, updated_at = $2 WHERE tenant_id = $3")
            .bind(placement.to_string())
            .bind(now())
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }
}

/// One tenant creation in a batch: the tenant, its first environment and its audit record.
#[derive(Debug, Clone)]
pub struct NewTenant {
    pub row: TenantRow,
    pub env: EnvironmentRow,
    pub audit: super::audit::OwnedAudit,
}

/// What happened to one creation of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    Duplicate,
    UnknownOrganization,
}

impl Store {
    /// Creates a batch of tenants in one transaction (group commit): ids that exist, repeat
    /// within the batch or name an unknown organization are reported, the rest are inserted
    /// with multi-row statements and one chain-head move for their audit records.
    pub async fn create_tenants(&self, batch: &[NewTenant]) -> Result<Vec<CreateOutcome>> {
        let mut tx = self.write().await?;
        // One statement answers both questions for every id of the batch, each by an index
        // probe (a correlated EXISTS on a primary key), whatever plan the server caches.
        let sql = format!(
            "SELECT v.column1 AS tenant_id, v.column2 AS organization_id, \
             CASE WHEN EXISTS (SELECT 1 FROM tenants t WHERE t.tenant_id = v.column1) THEN 'y' ELSE 'n' END AS taken, \
             CASE WHEN EXISTS (SELECT 1 FROM organizations o WHERE o.organization_id = v.column2) THEN 'y' ELSE 'n' END AS org_known \
             FROM (VALUES {}) AS v",
            super::values_placeholders(batch.len(), 2)
        );
        let mut q = sqlx::query(&sql);
        for n in batch {
            q = q
                .bind(n.row.tenant_id.as_str())
                .bind(n.row.organization_id.as_str());
        }
        let mut existing = std::collections::HashSet::new();
        let mut known_orgs = std::collections::HashSet::new();
        for row in q.fetch_all(&mut *tx.tx).await? {
            let id: String = row.try_get("tenant_id")?;
            let org: String = row.try_get("organization_id")?;
            if row.try_get::<String, _>("taken")? == "y" {
                existing.insert(id);
            }
            if row.try_get::<String, _>("org_known")? == "y" {
                known_orgs.insert(org);
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut accepted: Vec<&NewTenant> = Vec::new();
        for n in batch {
            // An id is taken only by a request that creates it: a request for an unknown
            // organization must not make a valid one for the same id in this batch a
            // duplicate (regression: concurrent_creates_each_id_once lost ids that way).
            let outcome =
                if existing.contains(&n.row.tenant_id) || seen.contains(n.row.tenant_id.as_str()) {
                    CreateOutcome::Duplicate
                } else if !known_orgs.contains(&n.row.organization_id) {
                    CreateOutcome::UnknownOrganization
                } else {
                    seen.insert(n.row.tenant_id.as_str());
                    accepted.push(n);
                    CreateOutcome::Created
                };
            outcomes.push(outcome);
        }
        if accepted.is_empty() {
            // Nothing to write: end the transaction now rather than when the pool reuses
            // the connection (a dropped transaction rolls back lazily).
            tx.tx.rollback().await?;
            return Ok(outcomes);
        }
        let sql = format!(
            "INSERT INTO tenants (tenant_id, organization_id, profile, state, region, quotas, policies, billing, \
             version, created_at, updated_at) VALUES {}",
            super::values_placeholders(accepted.len(), 11)
        );
        let mut q = sqlx::query(&sql);
        for n in &accepted {
            let t = &n.row;
            q = q
                .bind(t.tenant_id.as_str())
                .bind(t.organization_id.as_str())
                .bind(t.profile.as_str())
                .bind(t.state.as_str())
                .bind(t.region.as_str())
                .bind(to_json(&t.quotas))
                .bind(to_json(&t.policies))
                .bind(to_json(&t.billing))
                .bind(t.version)
                .bind(t.created_at.as_str())
                .bind(t.updated_at.as_str());
        }
        q.execute(&mut *tx.tx).await?;
        let sql = format!(
            "INSERT INTO environments (tenant_id, name, region, isolation_level, cell_id, endpoint, created_at) VALUES {}",
            super::values_placeholders(accepted.len(), 7)
        );
        let mut q = sqlx::query(&sql);
        for n in &accepted {
            let e = &n.env;
            q = q
                .bind(e.tenant_id.as_str())
                .bind(e.name.as_str())
                .bind(e.region.as_str())
                .bind(e.isolation_level.as_str())
                .bind(e.cell_id.as_deref())
                .bind(e.endpoint.as_deref())
                .bind(e.created_at.as_str());
        }
        q.execute(&mut *tx.tx).await?;
        let audits: Vec<super::audit::OwnedAudit> =
            accepted.iter().map(|n| n.audit.clone()).collect();
        tx.audit_many(&audits).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    pub async fn get_tenant(&self, id: &str) -> Result<Option<TenantRow>> {
        let row = sqlx::query(&format!("{TENANT_SELECT} WHERE tenant_id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    pub async fn list_environments(&self, tenant_id: &str) -> Result<Vec<EnvironmentRow>> {
        let rows = sqlx::query("SELECT * FROM environments WHERE tenant_id = $1 ORDER BY name")
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(env_from_row).collect()
    }

    pub async fn list_tenants(
        &self,
        filter: &TenantFilter,
        after: &str,
        limit: i64,
    ) -> Result<Vec<TenantRow>> {
        let mut sql = String::from(
            "SELECT t.*, (SELECT l.job_id FROM job_locks l WHERE l.resource = 'tenant/' || t.tenant_id) \
             AS pending_job_id FROM tenants t WHERE t.tenant_id > $1",
        );
        let mut binds: Vec<&str> = vec![after];
        for (col, val) in [
            ("t.state", &filter.state),
            ("t.region", &filter.region),
            ("t.organization_id", &filter.organization_id),
            ("t.tenant_id", &filter.only_tenant),
        ] {
            if let Some(v) = val {
                binds.push(v);
                sql.push_str(&format!(" AND {col} = ${}", binds.len()));
            }
        }
        if let Some(cell) = &filter.cell_id {
            binds.push(cell);
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM environments e WHERE e.tenant_id = t.tenant_id AND e.cell_id = ${})",
                binds.len()
            ));
        }
        sql.push_str(&format!(" ORDER BY t.tenant_id LIMIT ${}", binds.len() + 1));
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = q.bind(b);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(tenant_from_row).collect()
    }

    /// Environments for a page of tenants in one query.
    pub async fn environments_of(&self, tenant_ids: &[String]) -> Result<Vec<EnvironmentRow>> {
        if tenant_ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=tenant_ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT * FROM environments WHERE tenant_id IN ({}) ORDER BY tenant_id, name",
            placeholders.join(",")
        );
        let mut q = sqlx::query(&sql);
        for id in tenant_ids {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(env_from_row).collect()
    }
}
