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

/// One copy of `T` per worker thread, each on cache lines of its own: the workers record
/// a busy cell's requests without pulling the same lines back and forth between cores.
/// Read by summing the copies (only when metrics are rendered).
pub struct PerWorker<T> {
    slots: Box<[Padded<T>]>,
}

#[repr(align(128))]
struct Padded<T>(T);

impl<T> PerWorker<T> {
    pub fn new(workers: usize, f: impl Fn() -> T) -> Self {
        Self {
            slots: (0..workers.max(1)).map(|_| Padded(f())).collect(),
        }
    }

    /// This thread's copy (threads that are not workers share the first).
    pub fn local(&self) -> &T {
        &self.slots[crate::upstream::worker() % self.slots.len()].0
    }

    pub fn each(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|p| &p.0)
    }
}

impl PerWorker<Histogram> {
    /// The upper bounds (seconds) and the cumulative count at each, ending with the total
    /// (the `+Inf` bucket), summed over the workers.
    pub fn cumulative(&self) -> (Vec<f64>, Vec<u64>) {
        let mut bounds = Vec::new();
        let mut per = Vec::new();
        let mut total = 0u64;
        for h in self.each() {
            if bounds.is_empty() {
                bounds = h.bounds.to_vec();
                per = vec![0u64; bounds.len()];
            }
            for (p, c) in per.iter_mut().zip(h.counts.iter()) {
                *p += c.load(Ordering::Relaxed);
            }
            total += h.count.load(Ordering::Relaxed);
        }
        let mut cum = Vec::with_capacity(per.len() + 1);
        let mut acc = 0;
        for p in per {
            acc += p;
            cum.push(acc);
        }
        cum.push(total);
        (bounds, cum)
    }
}

impl PerWorker<Histogram> {
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut it = self.each();
        let Some(first) = it.next() else { return };
        let sum = Histogram::new(&first.bounds);
        for h in self.each() {
            for (a, b) in sum.counts.iter().zip(h.counts.iter()) {
                a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            sum.sum_micros
                .fetch_add(h.sum_micros.load(Ordering::Relaxed), Ordering::Relaxed);
            sum.count
                .fetch_add(h.count.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        sum.render(out, name, labels);
    }
}

impl PerWorker<StatusCounters> {
    /// Responses so far by status class (1xx … 5xx), summed over the workers.
    pub fn classes(&self) -> [u64; 5] {
        let mut out = [0u64; 5];
        for c in self.each() {
            for (o, v) in out.iter_mut().zip(c.classes.iter()) {
                *o += v.load(Ordering::Relaxed);
            }
        }
        out
    }

    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sum = StatusCounters::default();
        for c in self.each() {
            for (a, b) in sum.classes.iter().zip(c.classes.iter()) {
                a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        sum.render(out, name, labels);
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
pub struct RouterCounters {
    pub unknown_tenant: AtomicU64,
    pub bad_request: AtomicU64,
    pub suspended: AtomicU64,
    pub held: AtomicU64,
    /// Requests the rejoin fence held until the hold deadline and that were then served
    /// from the last-known table (the control plane did not answer in time).
    pub stale_served: AtomicU64,
    pub hold_timeout: AtomicU64,
    pub hold_overflow: AtomicU64,
    pub rate_limited: AtomicU64,
    pub upstream_error: AtomicU64,
    pub upstream_timeout: AtomicU64,
    pub cell_down: AtomicU64,
    /// Per worker: every forwarded request counts here.
    pub forwarded: PerWorker<AtomicU64>,
    pub sync_ok: AtomicU64,
    pub sync_errors: AtomicU64,
    pub state_writes: AtomicU64,
}

impl RouterCounters {
    pub fn new(workers: usize) -> Self {
        let z = || AtomicU64::new(0);
        Self {
            unknown_tenant: z(),
            bad_request: z(),
            suspended: z(),
            held: z(),
            stale_served: z(),
            hold_timeout: z(),
            hold_overflow: z(),
            rate_limited: z(),
            upstream_error: z(),
            upstream_timeout: z(),
            cell_down: z(),
            forwarded: PerWorker::new(workers, z),
            sync_ok: z(),
            sync_errors: z(),
            state_writes: z(),
        }
    }

    pub fn forwarded_total(&self) -> u64 {
        self.forwarded
            .each()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

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
        let forwarded = AtomicU64::new(self.forwarded_total());
        for (name, help, c) in [
            (
                "cellplane_router_forwarded_total",
                "Requests forwarded to a cell.",
                &forwarded,
            ),
            (
                "cellplane_router_held_total",
                "Requests that waited on a held route.",
                &self.held,
            ),
            (
                "cellplane_router_stale_served_total",
                "Requests the rejoin fence held (the router was not running for longer than its lease) that were served from the last-known table at the hold deadline because no fetch of the table succeeded in time.",
                &self.stale_served,
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
    fn per_worker_copies_render_as_one_series() {
        let status = std::sync::Arc::new(PerWorker::new(2, StatusCounters::default));
        let latency = std::sync::Arc::new(PerWorker::new(2, || Histogram::new(&[0.01])));
        let (s, l) = (status.clone(), latency.clone());
        std::thread::spawn(move || {
            crate::upstream::set_worker_index(1);
            s.local().observe(200);
            l.local().observe(std::time::Duration::from_millis(5));
        })
        .join()
        .unwrap();
        status.local().observe(204);
        status.local().observe(503);
        latency.local().observe(std::time::Duration::from_secs(1));
        assert_eq!(
            status.each().map(StatusCounters::total).collect::<Vec<_>>(),
            [2, 1]
        );
        let mut out = String::new();
        status.render(&mut out, "r", "cell=\"c\"");
        latency.render(&mut out, "d", "cell=\"c\"");
        assert!(out.contains("r{cell=\"c\",code=\"2xx\"} 2\n"), "{out}");
        assert!(out.contains("r{cell=\"c\",code=\"5xx\"} 1\n"), "{out}");
        assert!(
            out.contains("d_bucket{cell=\"c\",le=\"0.01\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("d_count{cell=\"c\"} 2\n"), "{out}");
    }

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
