//! Tracing setup and the HTTP metrics registry. Metric keys are bounded: routes are the
//! matched route templates, never raw paths.

use crate::config::LogFormat;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(use_color(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ));
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Colour escape codes only on a terminal, and never when `NO_COLOR` is set to anything
/// but the empty string (<https://no-color.org>). Logs redirected to a file stay plain.
fn use_color(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && !matches!(no_color, Some(v) if !v.is_empty())
}

const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Hist {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct HttpMetrics {
    requests: Mutex<HashMap<(String, String, u16), u64>>,
    latency: Mutex<HashMap<String, Hist>>,
}

impl HttpMetrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, took: Duration) {
        let secs = took.as_secs_f64();
        {
            let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            *r.entry((method.to_string(), route.to_string(), status))
                .or_default() += 1;
        }
        let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = l.entry(route.to_string()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP cellplane_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE cellplane_http_requests_total counter\n");
        {
            let r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            let mut keys: Vec<_> = r.iter().collect();
            keys.sort();
            for ((m, route, status), n) in keys {
                out.push_str(&format!(
                    "cellplane_http_requests_total{{method=\"{m}\",route=\"{route}\",status=\"{status}\"}} {n}\n"
                ));
            }
        }
        out.push_str(
            "# HELP cellplane_http_request_duration_seconds HTTP request latency by route.\n",
        );
        out.push_str("# TYPE cellplane_http_request_duration_seconds histogram\n");
        let l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let mut routes: Vec<_> = l.iter().collect();
        routes.sort_by(|a, b| a.0.cmp(b.0));
        for (route, h) in routes {
            for (i, b) in BUCKETS.iter().enumerate() {
                out.push_str(&format!(
                    "cellplane_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {}\n",
                    h.counts[i]
                ));
            }
            out.push_str(&format!(
                "cellplane_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n",
                h.count
            ));
            out.push_str(&format!(
                "cellplane_http_request_duration_seconds_sum{{route=\"{route}\"}} {}\n",
                h.sum
            ));
            out.push_str(&format!(
                "cellplane_http_request_duration_seconds_count{{route=\"{route}\"}} {}\n",
                h.count
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::use_color;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_color(true, None));
        assert!(use_color(true, Some(OsStr::new(""))));
        assert!(!use_color(true, Some(OsStr::new("1"))));
        assert!(!use_color(false, None));
    }
}
