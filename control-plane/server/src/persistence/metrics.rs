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
    /// For each of `cells` and each router that reported it since `start`: the oldest
    /// sample from `start` on and the newest (the same sample when there is one). One
    /// query per 500 cells.
    pub async fn cell_window_pairs(
        &self,
        cells: &[String],
        start: &str,
    ) -> Result<Vec<(CellSample, CellSample)>> {
        let mut out = Vec::new();
        for chunk in cells.chunks(500) {
            let list = (0..chunk.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT s.cell_id, s.router_id, s.at, s.codes, s.le, s.buckets \
                 FROM cell_samples s JOIN (SELECT cell_id, router_id, MIN(at) AS a, MAX(at) AS b \
                 FROM cell_samples WHERE at >= $1 AND cell_id IN ({list}) \
                 GROUP BY cell_id, router_id) g \
                 ON s.cell_id = g.cell_id AND s.router_id = g.router_id AND (s.at = g.a OR s.at = g.b) \
                 ORDER BY s.cell_id, s.router_id, s.at"
            );
            let mut q = sqlx::query(&sql).bind(start);
            for c in chunk {
                q = q.bind(c.as_str());
            }
            let rows = q.fetch_all(&self.pool).await?;
            let samples: Vec<CellSample> =
                rows.iter().map(sample_from_row).collect::<Result<_>>()?;
            let mut i = 0;
            while i < samples.len() {
                let same = samples.get(i + 1).is_some_and(|n| {
                    n.counters.cell_id == samples[i].counters.cell_id
                        && n.router_id == samples[i].router_id
                });
                if same {
                    out.push((samples[i].clone(), samples[i + 1].clone()));
                    i += 2;
                } else {
                    out.push((samples[i].clone(), samples[i].clone()));
                    i += 1;
                }
            }
        }
        Ok(out)
    }

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
}
