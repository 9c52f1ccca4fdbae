//! Cell samples: what routers report about each cell with their heartbeats, and the
//! traffic between two heartbeats (`cell_deltas`) that release gates sum over windows.

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

impl Store {}

/// Latency bounds a slot row holds (`b00`..`b19`).
pub const DELTA_BOUNDS: usize = 20;

/// One router's traffic to one cell between two of its heartbeats, filed under the slot
/// the interval started in.
#[derive(Debug, Clone, PartialEq)]
pub struct CellDelta {
    pub cell_id: String,
    /// The slot's start (unix seconds, a multiple of the slot length).
    pub slot: i64,
    pub total: u64,
    pub errors: u64,
    /// Bounds (seconds) and the cumulative count at each (at most [`DELTA_BOUNDS`]).
    pub le: Vec<f64>,
    pub buckets: Vec<u64>,
}

/// A cell's traffic summed over slots: requests, 5xx, cumulative buckets ending with
/// `+Inf`, and how many router intervals it came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    pub total: u64,
    pub errors: u64,
    pub buckets: Vec<(f64, u64)>,
    pub reports: u64,
}

fn bucket_cols() -> String {
    (0..DELTA_BOUNDS)
        .map(|i| format!("b{i:02}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl WriteTx {
    /// The counters of `router_id`'s newest heartbeat, by cell.
    pub async fn latest_cell_samples(
        &mut self,
        router_id: &str,
    ) -> Result<std::collections::HashMap<String, CellSample>> {
        let rows = sqlx::query(
            "SELECT * FROM cell_samples WHERE router_id = $1 AND at = \
             (SELECT MAX(at) FROM cell_samples WHERE router_id = $1)",
        )
        .bind(router_id)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| sample_from_row(r).map(|s| (s.counters.cell_id.clone(), s)))
            .collect()
    }

    /// Adds a heartbeat's intervals to their slots (one per cell; atomic per row, so
    /// routers' heartbeats may add to the same slot at once) and prunes slots that start
    /// before `keep_after` (unix seconds).
    pub async fn record_cell_deltas(
        &mut self,
        deltas: &[CellDelta],
        keep_after: i64,
    ) -> Result<()> {
        let width = 6 + DELTA_BOUNDS;
        let adds = (0..DELTA_BOUNDS)
            .map(|i| format!("b{i:02} = cell_slots.b{i:02} + excluded.b{i:02}"))
            .collect::<Vec<_>>()
            .join(", ");
        for chunk in deltas.chunks(40) {
            let sql = format!(
                "INSERT INTO cell_slots (cell_id, slot, le, reports, total, errors, {}) VALUES {} \
                 ON CONFLICT (cell_id, slot, le) DO UPDATE SET \
                 reports = cell_slots.reports + excluded.reports, \
                 total = cell_slots.total + excluded.total, \
                 errors = cell_slots.errors + excluded.errors, {adds}",
                bucket_cols(),
                super::values_placeholders(chunk.len(), width)
            );
            let mut q = sqlx::query(&sql);
            for d in chunk {
                q = q
                    .bind(d.cell_id.as_str())
                    .bind(d.slot)
                    .bind(to_json(&d.le))
                    .bind(1i64)
                    .bind(d.total as i64)
                    .bind(d.errors as i64);
                for i in 0..DELTA_BOUNDS {
                    q = q.bind(d.buckets.get(i).copied().unwrap_or(0) as i64);
                }
            }
            q.execute(&mut *self.tx).await?;
        }
        sqlx::query("DELETE FROM cell_slots WHERE slot < $1")
            .bind(keep_after)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }
}

fn traffic_part(r: &sqlx::any::AnyRow) -> Result<Traffic> {
    let le: Vec<f64> = json_col(r, "le")?;
    let total = r.try_get::<i64, _>("total")?.max(0) as u64;
    let mut buckets = Vec::with_capacity(le.len() + 1);
    for (i, bound) in le.iter().enumerate().take(DELTA_BOUNDS) {
        let n: i64 = r.try_get(format!("b{i:02}").as_str())?;
        buckets.push((*bound, n.max(0) as u64));
    }
    buckets.push((f64::INFINITY, total));
    Ok(Traffic {
        total,
        errors: r.try_get::<i64, _>("errors")?.max(0) as u64,
        buckets,
        reports: r.try_get::<i64, _>("reports")?.max(0) as u64,
    })
}

/// Two parts as one. Buckets add up when their bounds match; otherwise the part with more
/// requests keeps its buckets (routers with different bounds cannot be merged exactly).
fn add(a: Traffic, b: Traffic) -> Traffic {
    let same = a.buckets.len() == b.buckets.len()
        && a.buckets.iter().zip(&b.buckets).all(|(x, y)| x.0 == y.0);
    let buckets = if same {
        a.buckets
            .iter()
            .zip(&b.buckets)
            .map(|((le, x), (_, y))| (*le, x + y))
            .collect()
    } else if a.total >= b.total {
        a.buckets
    } else {
        b.buckets
    };
    Traffic {
        total: a.total + b.total,
        errors: a.errors + b.errors,
        buckets,
        reports: a.reports + b.reports,
    }
}

impl Store {
    /// Each of `cells`' traffic in the slots from `slot` on, one grouped query per 64
    /// cells. Cells without traffic are absent.
    pub async fn cell_traffic(
        &self,
        cells: &[String],
        slot: i64,
    ) -> Result<std::collections::HashMap<String, Traffic>> {
        let sums = (0..DELTA_BOUNDS)
            .map(|i| format!("CAST(SUM(b{i:02}) AS BIGINT) AS b{i:02}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut out = std::collections::HashMap::new();
        // Small chunks: binding a placeholder costs a lookup among all of the statement's
        // (SQLite), so a long IN list binds in quadratic time.
        for chunk in cells.chunks(64) {
            let list = (0..chunk.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT cell_id, le, CAST(SUM(reports) AS BIGINT) AS reports, \
                 CAST(SUM(total) AS BIGINT) AS total, CAST(SUM(errors) AS BIGINT) AS errors, \
                 {sums} FROM cell_slots WHERE slot >= $1 AND cell_id IN ({list}) \
                 GROUP BY cell_id, le"
            );
            let mut q = sqlx::query(&sql).bind(slot);
            for c in chunk {
                q = q.bind(c.as_str());
            }
            for r in q.fetch_all(&self.pool).await? {
                let cell: String = r.try_get("cell_id")?;
                let part = traffic_part(&r)?;
                let merged = match out.remove(&cell) {
                    Some(prev) => add(prev, part),
                    None => part,
                };
                out.insert(cell, merged);
            }
        }
        Ok(out)
    }

    /// Routers whose newest heartbeat, at or after `start`, reported `cell_id`.
    pub async fn routers_reporting(&self, cell_id: &str, start: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(DISTINCT router_id) FROM cell_samples WHERE cell_id = $1 AND at >= $2",
        )
        .bind(cell_id)
        .bind(start)
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    /// `cell_id`'s slots from `slot` on, oldest first, as `(slot, traffic)`.
    pub async fn cell_traffic_series(
        &self,
        cell_id: &str,
        slot: i64,
    ) -> Result<Vec<(i64, Traffic)>> {
        let sql = format!(
            "SELECT slot, le, reports, total, errors, {} FROM cell_slots \
             WHERE cell_id = $1 AND slot >= $2 ORDER BY slot",
            bucket_cols()
        );
        let rows = sqlx::query(&sql)
            .bind(cell_id)
            .bind(slot)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("slot")?, traffic_part(r)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_with_other_bounds_keep_the_larger_histogram() {
        let a = Traffic {
            total: 10,
            errors: 1,
            buckets: vec![(0.1, 5), (f64::INFINITY, 10)],
            reports: 1,
        };
        let b = Traffic {
            total: 30,
            errors: 2,
            buckets: vec![(0.2, 20), (f64::INFINITY, 30)],
            reports: 2,
        };
        let same = add(a.clone(), a.clone());
        assert_eq!(same.buckets, vec![(0.1, 10), (f64::INFINITY, 20)]);
        let mixed = add(a, b.clone());
        assert_eq!((mixed.total, mixed.errors), (40, 3));
        assert_eq!(mixed.buckets, b.buckets);
    }
}
