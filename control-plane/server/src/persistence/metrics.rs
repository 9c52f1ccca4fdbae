//! Cell samples: what routers report about each cell with their heartbeats, kept for the
//! windows release gates look at.

use super::{json_col, to_json, Result, Store, WriteTx};
use cellplane_api::CellCounters;
use sqlx::Row;

/// One router's counters for one cell at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct CellSample {
    pub router_id: String,
    pub at: String,
    pub counters: CellCounters,
}

fn sample_from_row(r: &sqlx::any::AnyRow) -> Result<CellSample> {
    Ok(CellSample {
        router_id: r.try_get("router_id")?,
        at: r.try_get("at")?,
        counters: CellCounters {
            cell_id: r.try_get("cell_id")?,
            codes: json_col(r, "codes")?,
            le: json_col(r, "le")?,
            buckets: json_col(r, "buckets")?,
        },
    })
}

impl WriteTx {
    /// Records a heartbeat's cell counters and prunes this router's samples older than
    /// `keep_after`.
    pub async fn record_cell_samples(
        &mut self,
        router_id: &str,
        at: &str,
        cells: &[CellCounters],
        keep_after: &str,
    ) -> Result<()> {
        for chunk in cells.chunks(500) {
            let sql = format!(
                "INSERT INTO cell_samples (cell_id, router_id, at, codes, le, buckets) VALUES {} \
                 ON CONFLICT DO NOTHING",
                super::values_placeholders(chunk.len(), 6)
            );
            let mut q = sqlx::query(&sql);
            for c in chunk {
                q = q
                    .bind(c.cell_id.as_str())
                    .bind(router_id)
                    .bind(at)
                    .bind(to_json(&c.codes))
                    .bind(to_json(&c.le))
                    .bind(to_json(&c.buckets));
            }
            q.execute(&mut *self.tx).await?;
        }
        sqlx::query("DELETE FROM cell_samples WHERE router_id = $1 AND at < $2")
            .bind(router_id)
            .bind(keep_after)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }
}

impl Store {
    /// Every sample of `cell_id` from `start` on, by router then time.
    pub async fn cell_samples_since(&self, cell_id: &str, start: &str) -> Result<Vec<CellSample>> {
        let rows = sqlx::query(
            "SELECT * FROM cell_samples WHERE cell_id = $1 AND at >= $2 ORDER BY router_id, at",
        )
        .bind(cell_id)
        .bind(start)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sample_from_row).collect()
    }

    /// For each router that reported `cell_id` since `start`: the sample the window starts
    /// from (the newest at or before `start` but not before `floor`, else the oldest after
    /// `start`) and the newest.
    pub async fn cell_window_samples(
        &self,
        cell_id: &str,
        start: &str,
        floor: &str,
    ) -> Result<Vec<(CellSample, CellSample)>> {
        let routers: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT router_id FROM cell_samples WHERE cell_id = $1 AND at >= $2 \
             ORDER BY router_id",
        )
        .bind(cell_id)
        .bind(start)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(routers.len());
        for router in routers {
            let newest = sqlx::query(
                "SELECT * FROM cell_samples WHERE cell_id = $1 AND router_id = $2 \
                 ORDER BY at DESC LIMIT 1",
            )
            .bind(cell_id)
            .bind(&router)
            .fetch_one(&self.pool)
            .await?;
            let before = sqlx::query(
                "SELECT * FROM cell_samples WHERE cell_id = $1 AND router_id = $2 AND at <= $3 \
                 AND at >= $4 ORDER BY at DESC LIMIT 1",
            )
            .bind(cell_id)
            .bind(&router)
            .bind(start)
            .bind(floor)
            .fetch_optional(&self.pool)
            .await?;
            let first = match before {
                Some(r) => r,
                None => {
                    sqlx::query(
                        "SELECT * FROM cell_samples WHERE cell_id = $1 AND router_id = $2 \
                         AND at > $3 ORDER BY at LIMIT 1",
                    )
                    .bind(cell_id)
                    .bind(&router)
                    .bind(start)
                    .fetch_one(&self.pool)
                    .await?
                }
            };
            out.push((sample_from_row(&first)?, sample_from_row(&newest)?));
        }
        Ok(out)
    }
}
