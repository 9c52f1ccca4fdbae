//! Usage rollups: batches applied once, minute rows per tenant environment and meter.

use super::{Result, Store, WriteTx};
use cellplane_api::UsageRecord;
use sqlx::Row;

/// One minute row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub tenant_id: String,
    pub env: String,
    pub meter: String,
    pub minute: String,
    pub amount: i64,
    pub exported: i64,
}

fn usage_from_row(r: &sqlx::any::AnyRow) -> Result<UsageRow> {
    Ok(UsageRow {
        tenant_id: r.try_get("tenant_id")?,
        env: r.try_get("env")?,
        meter: r.try_get("meter")?,
        minute: r.try_get("minute")?,
        amount: r.try_get("amount")?,
        exported: r.try_get("exported")?,
    })
}

impl WriteTx {
    /// Applies one batch of a router; false (nothing added) when it was applied before.
    pub async fn apply_usage_batch(
        &mut self,
        router_id: &str,
        batch_id: &str,
        records: &[UsageRecord],
        now: &str,
    ) -> Result<bool> {
        let res = sqlx::query(
            "INSERT INTO usage_batches (router_id, batch_id, received_at) VALUES ($1, $2, $3) \
             ON CONFLICT (router_id, batch_id) DO NOTHING",
        )
        .bind(router_id)
        .bind(batch_id)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        if res.rows_affected() == 0 {
            return Ok(false);
        }
        // Four meters per record, several records per statement.
        for chunk in records.chunks(100) {
            let mut sql = String::from(
                "INSERT INTO usage_minutes (tenant_id, env, meter, minute, amount) VALUES ",
            );
            let mut binds: Vec<(&str, &str, &str, &str, i64)> = Vec::new();
            for r in chunk {
                for (meter, amount) in [
                    ("requests", r.requests),
                    ("request_bytes", r.request_bytes),
                    ("response_bytes", r.response_bytes),
                    ("units", r.units),
                ] {
                    if amount > 0 {
                        binds.push((&r.tenant_id, &r.env, meter, &r.minute, amount as i64));
                    }
                }
            }
            if binds.is_empty() {
                continue;
            }
            for i in 0..binds.len() {
                if i > 0 {
                    sql.push(',');
                }
                let b = i * 5;
                sql.push_str(&format!(
                    "(${},${},${},${},${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5
                ));
            }
            sql.push_str(
                " ON CONFLICT (tenant_id, env, meter, minute) \
                 DO UPDATE SET amount = usage_minutes.amount + excluded.amount",
            );
            let mut q = sqlx::query(&sql);
            for (t, e, m, min, a) in binds {
                q = q.bind(t).bind(e).bind(m).bind(min).bind(a);
            }
            q.execute(&mut *self.tx).await?;
        }
        Ok(true)
    }

    /// Records that `exported` of a row has been reported in an event.
    pub async fn mark_usage_exported(&mut self, row: &UsageRow) -> Result<()> {
        sqlx::query(
            "UPDATE usage_minutes SET exported = $1 WHERE tenant_id = $2 AND env = $3 \
             AND meter = $4 AND minute = $5",
        )
        .bind(row.amount)
        .bind(&row.tenant_id)
        .bind(&row.env)
        .bind(&row.meter)
        .bind(&row.minute)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Forgets batch ids older than `before` (their retries are long over).
    pub async fn prune_usage_batches(&mut self, before: &str) -> Result<u64> {
        let res = sqlx::query("DELETE FROM usage_batches WHERE received_at < $1")
            .bind(before)
            .execute(&mut *self.tx)
            .await?;
        Ok(res.rows_affected())
    }
}

impl Store {
    /// Minute rows in `[from, to)`, optionally of one tenant, env and meter.
    pub async fn usage_rows(
        &self,
        tenant_id: Option<&str>,
        env: Option<&str>,
        meter: Option<&str>,
        from: &str,
        to: &str,
        limit: i64,
    ) -> Result<Vec<UsageRow>> {
        let mut sql = String::from(
            "SELECT tenant_id, env, meter, minute, amount, exported FROM usage_minutes \
             WHERE minute >= $1 AND minute < $2",
        );
        let mut n = 2;
        for (col, v) in [("tenant_id", tenant_id), ("env", env), ("meter", meter)] {
            if v.is_some() {
                n += 1;
                sql.push_str(&format!(" AND {col} = ${n}"));
            }
        }
        n += 1;
        sql.push_str(&format!(
            " ORDER BY tenant_id, env, meter, minute LIMIT ${n}"
        ));
        let mut q = sqlx::query(&sql).bind(from).bind(to);
        for v in [tenant_id, env, meter].into_iter().flatten() {
            q = q.bind(v);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(usage_from_row).collect()
    }

    /// Rows before `before` with counts not yet reported, oldest first.
    pub async fn unexported_usage(&self, before: &str, limit: i64) -> Result<Vec<UsageRow>> {
        let rows = sqlx::query(
            "SELECT tenant_id, env, meter, minute, amount, exported FROM usage_minutes \
             WHERE minute < $1 AND amount > exported ORDER BY minute, tenant_id LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(usage_from_row).collect()
    }
}
