//! Prometheus counters and histograms. Handles are plain atomics owned by the cell handle
//! or the tenant's runtime state, so recording a request is a few relaxed atomic adds and
//! never a registry lookup. Bucket bounds come from configuration (set them at the SLO
//! thresholds so "fraction of requests under the threshold" is exact).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latency histogram with fixed upper bounds in seconds.
pub struct Histogram {
    bounds: Box<[f64]>,
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.into(),
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        // Counts are per bucket (not cumulative) and summed when rendered.
        if let Some(i) = self.bounds.iter().position(|b| s <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the series of this histogram with `labels` (already formatted `k="v"`).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(self.counts.iter()) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cum}");
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

/// Responses by status class.
#[derive(Default)]
pub struct StatusCounters {
    classes: [AtomicU64; 5],
}

impl StatusCounters {
    pub fn observe(&self, status: u16) {
        let i = ((status / 100).clamp(1, 5) - 1) as usize;
        self.classes[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.classes.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, c) in self.classes.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(out, "{name}{{{labels},code=\"{}xx\"}} {n}", i + 1);
            }
        }
    }
}

/// Responses the router produced itself, by reason.
#[derive(Default)]
pub struct RouterCounters {
    pub unknown_tenant: AtomicU64,
    pub bad_request: AtomicU64,
    pub suspended: AtomicU64,
    pub held: AtomicU64,
    pub hold_timeout: AtomicU64,
    pub hold_overflow: AtomicU64,
    pub rate_limited: AtomicU64,
    pub upstream_error: AtomicU64,
    pub upstream_timeout: AtomicU64,
    pub cell_down: AtomicU64,
    pub forwarded: AtomicU64,
    pub sync_ok: AtomicU64,
    pub sync_errors: AtomicU64,
    pub state_writes: AtomicU64,
}

impl RouterCounters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP cellplane_router_own_responses_total Responses the router produced itself, by reason.\n");
        out.push_str("# TYPE cellplane_router_own_responses_total counter\n");
        for (reason, c) in [
            ("unknown_tenant", &self.unknown_tenant),
            ("bad_request", &self.bad_request),
            ("suspended", &self.suspended),
            ("hold_timeout", &self.hold_timeout),
            ("hold_overflow", &self.hold_overflow),
            ("rate_limited", &self.rate_limited),
            ("upstream_error", &self.upstream_error),
            ("upstream_timeout", &self.upstream_timeout),
            ("cell_down", &self.cell_down),
        ] {
            let _ = writeln!(
                out,
                "cellplane_router_own_responses_total{{reason=\"{reason}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        for (name, help, c) in [
            (
                "cellplane_router_forwarded_total",
                "Requests forwarded to a cell.",
                &self.forwarded,
            ),
            (
                "cellplane_router_held_total",
                "Requests that waited on a held route.",
                &self.held,
            ),
            (
                "cellplane_router_sync_total",
                "Routing table fetches that succeeded.",
                &self.sync_ok,
            ),
            (
                "cellplane_router_sync_errors_total",
                "Routing table fetches that failed.",
                &self.sync_errors,
            ),
            (
                "cellplane_router_state_writes_total",
                "State file rewrites.",
                &self.state_writes,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_when_rendered() {
        let h = Histogram::new(&[0.01, 0.1]);
        h.observe(std::time::Duration::from_millis(5));
        h.observe(std::time::Duration::from_millis(50));
        h.observe(std::time::Duration::from_secs(1));
        let mut out = String::new();
        h.render(&mut out, "x", "cell=\"c\"");
        assert!(out.contains("x_bucket{cell=\"c\",le=\"0.01\"} 1\n"));
        assert!(out.contains("x_bucket{cell=\"c\",le=\"0.1\"} 2\n"));
        assert!(out.contains("x_bucket{cell=\"c\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{cell=\"c\"} 3\n"));
    }
}
