//! Prometheus metrics: request counters by route class and status, a latency histogram by
//! route class, injected faults, and an info gauge naming the cell and version.
//!
//! Rollout gates read these (error ratio, latency percentiles, version), so names and
//! labels are part of the cell contract. Recording must stay cheap and lock-light on the
//! request path, and this module must never label a series with a tenant id or a key
//! (unbounded cardinality).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Which part of the API a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteClass {
    /// `/v1/kv…`: tenant traffic, subject to fault injection and extra latency.
    Tenant,
    /// `/cell/v1/…`: the cell contract used by the control plane.
    Cell,
    /// `/healthz`, `/version`, `/metrics`.
    Probe,
    /// Anything else (answered 404).
    Other,
}

impl RouteClass {
    const ALL: [RouteClass; 4] = [
        RouteClass::Tenant,
        RouteClass::Cell,
        RouteClass::Probe,
        RouteClass::Other,
    ];

    pub fn of_path(path: &str) -> Self {
        if path == "/v1/kv" || path.starts_with("/v1/kv/") {
            RouteClass::Tenant
        } else if path.starts_with("/cell/v1/") {
            RouteClass::Cell
        } else if matches!(path, "/healthz" | "/version" | "/metrics") {
            RouteClass::Probe
        } else {
            RouteClass::Other
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            RouteClass::Tenant => "tenant",
            RouteClass::Cell => "cell",
            RouteClass::Probe => "probe",
            RouteClass::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds (seconds) of the latency buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    /// Per-bucket (not cumulative) counts; the last slot is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Metrics {
    cell_id: String,
    app_version: String,
    requests: Mutex<BTreeMap<(RouteClass, u16), u64>>,
    latency: [Histogram; 4],
    injected_faults: AtomicU64,
}

impl Metrics {
    pub fn new(cell_id: &str, app_version: &str) -> Self {
        Self {
            cell_id: cell_id.to_owned(),
            app_version: app_version.to_owned(),
            requests: Mutex::new(BTreeMap::new()),
            latency: Default::default(),
            injected_faults: AtomicU64::new(0),
        }
    }

    pub fn record(&self, class: RouteClass, status: u16, elapsed: Duration) {
        {
            let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            *requests.entry((class, status)).or_default() += 1;
        }
        self.latency[class.index()].observe(elapsed);
    }

    pub fn record_injected_fault(&self) {
        self.injected_faults.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP sample_cell_info Cell id and app version of this process."
        );
        let _ = writeln!(out, "# TYPE sample_cell_info gauge");
        let _ = writeln!(
            out,
            "sample_cell_info{{cell_id=\"{}\",app_version=\"{}\"}} 1",
            escape(&self.cell_id),
            escape(&self.app_version)
        );

        let _ = writeln!(
            out,
            "# HELP sample_cell_http_requests_total HTTP requests answered, by route class and status."
        );
        let _ = writeln!(out, "# TYPE sample_cell_http_requests_total counter");
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ((class, status), count) in requests {
            let _ = writeln!(
                out,
                "sample_cell_http_requests_total{{route=\"{}\",status=\"{status}\"}} {count}",
                class.as_str()
            );
        }

        let _ = writeln!(
            out,
            "# HELP sample_cell_http_request_duration_seconds Time to the response head, by route class."
        );
        let _ = writeln!(
            out,
            "# TYPE sample_cell_http_request_duration_seconds histogram"
        );
        for class in RouteClass::ALL {
            let histogram = &self.latency[class.index()];
            let route = class.as_str();
            let mut cumulative = 0;
            for (slot, bound) in BUCKETS.iter().enumerate() {
                cumulative += histogram.buckets[slot].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "sample_cell_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += histogram.buckets[BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "sample_cell_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {cumulative}"
            );
            let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "sample_cell_http_request_duration_seconds_sum{{route=\"{route}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "sample_cell_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                histogram.count.load(Ordering::Relaxed)
            );
        }

        let _ = writeln!(
            out,
            "# HELP sample_cell_injected_faults_total Tenant requests answered 500 by --fault-rate."
        );
        let _ = writeln!(out, "# TYPE sample_cell_injected_faults_total counter");
        let _ = writeln!(
            out,
            "sample_cell_injected_faults_total {}",
            self.injected_faults.load(Ordering::Relaxed)
        );
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_path() {
        assert_eq!(RouteClass::of_path("/v1/kv"), RouteClass::Tenant);
        assert_eq!(RouteClass::of_path("/v1/kv/a"), RouteClass::Tenant);
        assert_eq!(RouteClass::of_path("/v1/kvx"), RouteClass::Other);
        assert_eq!(
            RouteClass::of_path("/cell/v1/tenants/a/export"),
            RouteClass::Cell
        );
        assert_eq!(RouteClass::of_path("/metrics"), RouteClass::Probe);
    }

    #[test]
    fn render_counts_and_cumulates() {
        let metrics = Metrics::new("c1", "1.2.3");
        metrics.record(RouteClass::Tenant, 200, Duration::from_millis(3));
        metrics.record(RouteClass::Tenant, 200, Duration::from_millis(30));
        metrics.record(RouteClass::Tenant, 500, Duration::from_secs(20));
        let text = metrics.render();
        for line in [
            "sample_cell_info{cell_id=\"c1\",app_version=\"1.2.3\"} 1",
            "sample_cell_http_requests_total{route=\"tenant\",status=\"200\"} 2",
            "sample_cell_http_requests_total{route=\"tenant\",status=\"500\"} 1",
            "sample_cell_http_request_duration_seconds_bucket{route=\"tenant\",le=\"0.005\"} 1",
            "sample_cell_http_request_duration_seconds_bucket{route=\"tenant\",le=\"0.05\"} 2",
            "sample_cell_http_request_duration_seconds_bucket{route=\"tenant\",le=\"10\"} 2",
            "sample_cell_http_request_duration_seconds_bucket{route=\"tenant\",le=\"+Inf\"} 3",
            "sample_cell_http_request_duration_seconds_count{route=\"tenant\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
