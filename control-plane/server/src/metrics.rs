//! Metrics providers of release gates, behind one trait: what a cell served over a window
//! (requests, 5xx, the latency histogram) as a [`Window`], and the same per step (the
//! samples a canary-against-baseline test compares).
//!
//! - [`Builtin`]: routers send each cell's cumulative counters with their heartbeats; the
//!   control plane keeps them (`cell_samples`) and subtracts.
//! - [`Prometheus`]: PromQL over the HTTP API of a Prometheus server that scrapes the
//!   routers' `/__router/metrics` (`metrics.prometheus_url`).
//!
//! A provider that cannot answer returns [`ProviderError`]: the gate records an `error`
//! measurement (never a success), and enough of them in a row halt the release.

use crate::config::MetricsConfig;
use crate::gates::Window;
use crate::routing::Routing;
use cellplane_api::releases::MetricsSource;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Why a provider could not answer (unreachable, refused the query, answered nonsense).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderError(pub String);

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cell's traffic over a window and how many sources it came from (routers for the
/// built-in provider, series for Prometheus).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    pub window: Window,
    pub sources: u64,
}

/// Where release gates read a cell's traffic.
pub trait MetricsProvider {
    /// The provider's name in gate decisions (`builtin`, `prometheus`).
    fn name(&self) -> &'static str;

    /// The cell's traffic over the last `window_secs`, counting nothing from before
    /// `floor` (a wave's bake measures only traffic after its cells settled).
    fn window(
        &self,
        cell_id: &str,
        window_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> impl std::future::Future<Output = Result<Reading, ProviderError>> + Send;

    /// [`MetricsProvider::window`] for many cells at once (a wave's evaluation round):
    /// every cell asked for is in the answer.
    fn windows(
        &self,
        cells: &[String],
        window_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> impl std::future::Future<Output = Result<HashMap<String, Reading>, ProviderError>> + Send;

    /// The same window cut into `step_secs` steps, oldest first; steps without traffic are
    /// left out.
    fn series(
        &self,
        cell_id: &str,
        window_secs: u64,
        step_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> impl std::future::Future<Output = Result<Vec<Window>, ProviderError>> + Send;
}

/// Both providers, built once at startup.
#[derive(Clone)]
pub struct Providers {
    builtin: Builtin,
    prometheus: Prometheus,
}

impl Providers {
    pub fn new(routing: Routing, config: &MetricsConfig) -> Self {
        Self {
            builtin: Builtin { routing },
            prometheus: Prometheus::new(config),
        }
    }

    pub fn get(&self, source: MetricsSource) -> Provider<'_> {
        match source {
            MetricsSource::Builtin => Provider::Builtin(&self.builtin),
            MetricsSource::Prometheus => Provider::Prometheus(&self.prometheus),
        }
    }
}

/// The provider a release's gates use.
pub enum Provider<'a> {
    Builtin(&'a Builtin),
    Prometheus(&'a Prometheus),
}

impl MetricsProvider for Provider<'_> {
    fn name(&self) -> &'static str {
        match self {
            Provider::Builtin(p) => p.name(),
            Provider::Prometheus(p) => p.name(),
        }
    }
    async fn window(
        &self,
        cell_id: &str,
        window_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> Result<Reading, ProviderError> {
        match self {
            Provider::Builtin(p) => p.window(cell_id, window_secs, floor).await,
            Provider::Prometheus(p) => p.window(cell_id, window_secs, floor).await,
        }
    }
    async fn windows(
        &self,
        cells: &[String],
        window_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> Result<HashMap<String, Reading>, ProviderError> {
        match self {
            Provider::Builtin(p) => p.windows(cells, window_secs, floor).await,
            Provider::Prometheus(p) => p.windows(cells, window_secs, floor).await,
        }
    }
    async fn series(
        &self,
        cell_id: &str,
        window_secs: u64,
        step_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> Result<Vec<Window>, ProviderError> {
        match self {
            Provider::Builtin(p) => p.series(cell_id, window_secs, step_secs, floor).await,
            Provider::Prometheus(p) => p.series(cell_id, window_secs, step_secs, floor).await,
        }
    }
}

/// The seconds a window may look back: `window_secs`, cut at `floor`.
fn span(window_secs: u64, floor: Option<DateTime<Utc>>, now: DateTime<Utc>) -> u64 {
    let since_floor = floor
        .map(|f| (now - f).num_seconds().max(0) as u64)
        .unwrap_or(u64::MAX);
    window_secs.min(since_floor)
}

/// What routers reported with their heartbeats.
#[derive(Clone)]
pub struct Builtin {
    routing: Routing,
}

impl MetricsProvider for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }
    async fn window(
        &self,
        cell_id: &str,
        window_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> Result<Reading, ProviderError> {
        let floor = floor.map(crate::persistence::fmt_time).unwrap_or_default();
        let (window, sources) = self
            .routing
            .cell_window_since(cell_id, window_secs, &floor)
            .await
            .map_err(|e| ProviderError(format!("reading cell samples: {e}")))?;
        Ok(Reading { window, sources })
    }
    async fn windows(
        &self,
        cells: &[String],
        window_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> Result<HashMap<String, Reading>, ProviderError> {
        let floor = floor.map(crate::persistence::fmt_time).unwrap_or_default();
        Ok(self
            .routing
            .cell_windows_since(cells, window_secs, &floor)
            .await
            .map_err(|e| ProviderError(format!("reading cell samples: {e}")))?
            .into_iter()
            .map(|(c, (window, sources))| (c, Reading { window, sources }))
            .collect())
    }
    async fn series(
        &self,
        cell_id: &str,
        window_secs: u64,
        step_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> Result<Vec<Window>, ProviderError> {
        let floor = floor.map(crate::persistence::fmt_time).unwrap_or_default();
        let first = self.routing.first_slot(window_secs, &floor);
        let rows = self
            .routing
            .store()
            .cell_traffic_series(cell_id, first)
            .await
            .map_err(|e| ProviderError(format!("reading cell traffic: {e}")))?;
        // Each slot is filed under the step it starts in.
        let step = step_secs.max(1) as i64;
        let mut steps: BTreeMap<i64, Window> = BTreeMap::new();
        for (slot, t) in rows {
            let d = Window {
                total: t.total,
                errors: t.errors,
                buckets: t.buckets,
            };
            let k = (slot - first).div_euclid(step);
            let merged = steps.get(&k).map(|w| w.merge(&d)).unwrap_or(d);
            steps.insert(k, merged);
        }
        Ok(steps.into_values().collect())
    }
}

/// PromQL over a Prometheus server's HTTP API.
#[derive(Clone)]
pub struct Prometheus {
    url: Option<String>,
    /// The shortest range a query asks for: two scrape intervals.
    min_range: u64,
    client: reqwest::Client,
}

const REQUESTS: &str = "cellplane_router_cell_requests_total";
const DURATION_BUCKETS: &str = "cellplane_router_cell_request_duration_seconds_bucket";

impl Prometheus {
    fn new(config: &MetricsConfig) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.query_timeout_ms.max(100)))
            .build()
            .unwrap_or_default();
        Self {
            min_range: config.prometheus_scrape_secs.max(1) * 2,
            url: config
                .prometheus_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_string()),
            client,
        }
    }

    /// A PromQL string literal (cell ids are validated ids; escaped all the same).
    fn literal(s: &str) -> String {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    /// `GET /api/v1/{path}` with `params`: the `data.result` array.
    async fn query(
        &self,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<Vec<serde_json::Value>, ProviderError> {
        let Some(base) = &self.url else {
            return Err(ProviderError(
                "no Prometheus is configured (metrics.prometheus_url)".into(),
            ));
        };
        let url = format!("{base}/api/v1/{path}");
        let resp = self
            .client
            .get(&url)
            .query(params)
            .send()
            .await
            .map_err(|e| ProviderError(format!("querying {url}: {e}")))?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| ProviderError(format!("reading the answer of {url} ({status}): {e}")))?;
        if !status.is_success() || body["status"] != "success" {
            return Err(ProviderError(format!(
                "{url} answered {status}: {}",
                body["error"].as_str().unwrap_or("no error message")
            )));
        }
        body["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| ProviderError(format!("{url} answered without data.result")))
    }

    /// A sample value (`[ts, "12.5"]`) rounded to a count.
    fn count(v: &serde_json::Value) -> u64 {
        v.get(1)
            .and_then(|s| s.as_str())
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|f| f.is_finite() && *f > 0.0)
            .map(|f| f.round() as u64)
            .unwrap_or(0)
    }

    fn ts(v: &serde_json::Value) -> i64 {
        v.get(0).and_then(|t| t.as_f64()).unwrap_or(0.0) as i64
    }

    /// Builds a window from responses by `code` and buckets by `le`.
    fn window_of(codes: &[(String, u64)], buckets: &[(String, u64)]) -> Window {
        let total = codes.iter().map(|(_, n)| n).sum();
        let errors = codes
            .iter()
            .filter(|(c, _)| c == "5xx")
            .map(|(_, n)| n)
            .sum();
        let mut b: Vec<(f64, u64)> = buckets
            .iter()
            .filter_map(|(le, n)| {
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *n))
            })
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        Window {
            total,
            errors,
            buckets: b,
        }
    }

    fn label(v: &serde_json::Value, name: &str) -> String {
        v["metric"][name].as_str().unwrap_or("").to_string()
    }
}

impl MetricsProvider for Prometheus {
    fn name(&self) -> &'static str {
        "prometheus"
    }
    async fn window(
        &self,
        cell_id: &str,
        window_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> Result<Reading, ProviderError> {
        let mut all = self
            .windows(&[cell_id.to_string()], window_secs, floor)
            .await?;
        Ok(all.remove(cell_id).unwrap_or_default())
    }
    /// Two queries whatever the number of cells: responses by cell and code, buckets by
    /// cell and `le` (one cell: selected by name; more: every cell, picked here).
    async fn windows(
        &self,
        cells: &[String],
        window_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> Result<HashMap<String, Reading>, ProviderError> {
        let now = Utc::now();
        let range = span(window_secs, floor, now).max(self.min_range);
        let selector = match cells {
            [one] => format!("{{cell={}}}", Self::literal(one)),
            _ => String::new(),
        };
        let time = format!("{:.3}", now.timestamp_millis() as f64 / 1000.0);
        let ask = |what: &str, by: &str| {
            vec![
                (
                    "query",
                    format!("sum by (cell, {by}) (increase({what}{selector}[{range}s]))"),
                ),
                ("time", time.clone()),
            ]
        };
        let codes = self.query("query", &ask(REQUESTS, "code")).await?;
        let buckets = self.query("query", &ask(DURATION_BUCKETS, "le")).await?;
        type Parts = (Vec<(String, u64)>, Vec<(String, u64)>);
        let mut per: HashMap<String, Parts> = cells
            .iter()
            .map(|c| (c.clone(), Default::default()))
            .collect();
        for r in &codes {
            if let Some(p) = per.get_mut(&Self::label(r, "cell")) {
                p.0.push((Self::label(r, "code"), Self::count(&r["value"])));
            }
        }
        for r in &buckets {
            if let Some(p) = per.get_mut(&Self::label(r, "cell")) {
                p.1.push((Self::label(r, "le"), Self::count(&r["value"])));
            }
        }
        Ok(per
            .into_iter()
            .map(|(c, (codes, buckets))| {
                let reading = Reading {
                    sources: codes.len() as u64,
                    window: Self::window_of(&codes, &buckets),
                };
                (c, reading)
            })
            .collect())
    }
    async fn series(
        &self,
        cell_id: &str,
        window_secs: u64,
        step_secs: u64,
        floor: Option<DateTime<Utc>>,
    ) -> Result<Vec<Window>, ProviderError> {
        let now = Utc::now();
        let step = step_secs.max(self.min_range);
        let range = span(window_secs, floor, now);
        let cell = Self::literal(cell_id);
        let params = |q: String| {
            vec![
                ("query", q),
                (
                    "start",
                    (now.timestamp() - range as i64 + step as i64).to_string(),
                ),
                ("end", now.timestamp().to_string()),
                ("step", format!("{step}s")),
            ]
        };
        let codes = self
            .query(
                "query_range",
                &params(format!(
                    "sum by (code) (increase({REQUESTS}{{cell={cell}}}[{step}s]))"
                )),
            )
            .await?;
        let buckets = self
            .query(
                "query_range",
                &params(format!(
                    "sum by (le) (increase({DURATION_BUCKETS}{{cell={cell}}}[{step}s]))"
                )),
            )
            .await?;
        // Per timestamp: responses by code and buckets by le.
        type Step = (Vec<(String, u64)>, Vec<(String, u64)>);
        let mut steps: BTreeMap<i64, Step> = BTreeMap::new();
        for r in &codes {
            let code = Self::label(r, "code");
            for v in r["values"].as_array().into_iter().flatten() {
                steps
                    .entry(Self::ts(v))
                    .or_default()
                    .0
                    .push((code.clone(), Self::count(v)));
            }
        }
        for r in &buckets {
            let le = Self::label(r, "le");
            for v in r["values"].as_array().into_iter().flatten() {
                steps
                    .entry(Self::ts(v))
                    .or_default()
                    .1
                    .push((le.clone(), Self::count(v)));
            }
        }
        Ok(steps
            .into_values()
            .map(|(c, b)| Self::window_of(&c, &b))
            .filter(|w| w.total > 0)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_literals_are_escaped() {
        assert_eq!(Prometheus::literal("euw1-pool-1"), "\"euw1-pool-1\"");
        assert_eq!(Prometheus::literal("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn a_window_is_built_from_codes_and_buckets() {
        let w = Prometheus::window_of(
            &[("2xx".into(), 90), ("5xx".into(), 10)],
            &[("+Inf".into(), 100), ("0.1".into(), 80), ("0.5".into(), 95)],
        );
        assert_eq!(w.total, 100);
        assert_eq!(w.errors, 10);
        assert_eq!(w.buckets, vec![(0.1, 80), (0.5, 95), (f64::INFINITY, 100)]);
    }

    #[test]
    fn a_window_is_cut_at_its_floor() {
        let now = Utc::now();
        assert_eq!(span(60, None, now), 60);
        assert_eq!(span(60, Some(now - chrono::Duration::seconds(10)), now), 10);
        assert_eq!(span(60, Some(now + chrono::Duration::seconds(10)), now), 0);
    }
}
