//! The request path, as phases of one trait with default hooks (after pingora's
//! `ProxyHttp`): resolve the tenant → pick the route (admission: mode, rate limit, hold) →
//! filter the request for the cell → forward → log. A request reads the table once, from
//! one snapshot; only a held request looks again, after each swap, until it is released or
//! its deadline passes. Every response the router makes itself is `application/problem+json`.

use crate::h1;
use crate::metrics::RouterCounters;
use crate::resolve::{ResolveError, Resolver};
use crate::table::{RouteEntry, Snapshot, TenantEntry, TenantRuntime};
use arc_swap::ArcSwap;
use cellplane_api::RouteMode;
use http::StatusCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How long a request waits on a held route before it is answered 503.
    pub hold_deadline: Duration,
    /// Requests one tenant may have waiting on held routes at once.
    pub hold_queue: u32,
    /// Time to the response head from a cell.
    pub upstream_timeout: Duration,
    pub buckets: Arc<[f64]>,
    /// Tenants that get a latency histogram (the first ones with traffic).
    pub max_tenant_histograms: usize,
    /// Consecutive failed health probes (or connect errors) that take a cell down.
    pub health_fails: u32,
    /// Worker threads (per-worker metric copies).
    pub workers: usize,
    /// Client fields that read as a trusted header with `_` as `-`: stripped or refused.
    pub underscore_trusted_headers: crate::config::UnderscoreTrusted,
}

/// Everything the request path shares.
pub struct RouterState {
    pub table: ArcSwap<Snapshot>,
    /// The revision of each swapped-in snapshot, for held requests.
    pub swaps: watch::Sender<i64>,
    pub resolver: Resolver,
    pub cfg: ProxyConfig,
    pub counters: RouterCounters,
    pub tenant_histograms: crate::table::SeriesBudget,
    /// The revision last written to the state file (-1: none this run).
    pub persisted_revision: std::sync::atomic::AtomicI64,
    /// Where forwarded requests are counted for usage metering (none: not metered).
    pub usage: Option<crate::usage::UsageJournal>,
    corr_prefix: String,
    corr_seq: AtomicU64,
}

impl RouterState {
    pub fn new(resolver: Resolver, cfg: ProxyConfig, initial: Snapshot) -> Self {
        let max_tenant_histograms = cfg.max_tenant_histograms;
        let counters = RouterCounters::new(cfg.workers);
        use rand::Rng;
        let mut rng = rand::thread_rng();
        let corr_prefix: String = (0..8)
            .map(|_| (b'a' + rng.gen_range(0..26u8)) as char)
            .collect();
        Self {
            swaps: watch::Sender::new(initial.revision),
            table: ArcSwap::from_pointee(initial),
            resolver,
            cfg,
            counters,
            tenant_histograms: crate::table::SeriesBudget::new(max_tenant_histograms),
            persisted_revision: std::sync::atomic::AtomicI64::new(-1),
            usage: None,
            corr_prefix: format!("rt-{corr_prefix}"),
            corr_seq: AtomicU64::new(1),
        }
    }

    /// Installs a new snapshot and wakes held requests.
    pub fn swap(&self, snap: Snapshot) {
        let rev = snap.revision;
        self.table.store(Arc::new(snap));
        self.swaps.send_replace(rev);
    }

    /// `{prefix}-{sequence in hex}`, built without the formatting machinery.
    pub fn correlation_id(&self) -> String {
        let mut n = self.corr_seq.fetch_add(1, Ordering::Relaxed);
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(n & 15) as usize];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        let mut s = String::with_capacity(self.corr_prefix.len() + 1 + digits.len() - i);
        s.push_str(&self.corr_prefix);
        s.push('-');
        s.extend(digits[i..].iter().map(|&b| b as char));
        s
    }
}

/// Why the router answered a request itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
    #[error("the request head was not complete in time")]
    RequestTimeout,
    #[error(
        "the request head is too large (at most {} bytes and {} fields)",
        crate::h1::MAX_HEAD,
        crate::h1::MAX_HEADERS
    )]
    HeadTooLarge,
    #[error("no route for tenant {tenant:?} (env {env:?})")]
    UnknownTenant { tenant: String, env: String },
    #[error("{0}")]
    NoTenant(String),
    #[error("tenant {0:?} is suspended")]
    Suspended(String),
    #[error("tenant {tenant:?} is held (being moved) and was not released within {waited_ms} ms")]
    HoldTimeout { tenant: String, waited_ms: u64 },
    #[error("tenant {0:?} is held and too many of its requests are already waiting")]
    HoldOverflow(String),
    #[error("tenant {tenant:?} exceeded its rate limit of {rate} requests per second")]
    RateLimited {
        tenant: String,
        rate: u32,
        retry_after: u64,
    },
    #[error("cell {cell} is unreachable: {reason}")]
    Upstream { cell: String, reason: String },
    #[error("cell {0} did not answer in time")]
    UpstreamTimeout(String),
    #[error("cell {0} is down (failing its health checks); retry shortly")]
    CellDown(String),
}

impl ProxyError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str, Option<u64>) {
        match self {
            ProxyError::BadRequest(_) => {
                (StatusCode::BAD_REQUEST, "bad-request", "bad request", None)
            }
            ProxyError::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "request timeout",
                None,
            ),
            ProxyError::HeadTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "head-too-large",
                "request header fields too large",
                None,
            ),
            ProxyError::UnknownTenant { .. } | ProxyError::NoTenant(_) => (
                StatusCode::NOT_FOUND,
                "unknown-tenant",
                "unknown tenant",
                None,
            ),
            ProxyError::Suspended(_) => (
                StatusCode::FORBIDDEN,
                "tenant-suspended",
                "tenant suspended",
                None,
            ),
            ProxyError::HoldTimeout { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "tenant-held",
                "tenant temporarily held",
                Some(1),
            ),
            ProxyError::HoldOverflow(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "tenant-held",
                "tenant temporarily held",
                Some(1),
            ),
            ProxyError::RateLimited { retry_after, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "too many requests",
                Some(*retry_after),
            ),
            ProxyError::Upstream { .. } => (
                StatusCode::BAD_GATEWAY,
                "cell-unreachable",
                "cell unreachable",
                None,
            ),
            ProxyError::UpstreamTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "cell-timeout",
                "cell timed out",
                None,
            ),
            ProxyError::CellDown(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "cell-unavailable",
                "cell unavailable",
                Some(1),
            ),
        }
    }

    fn counter<'a>(&self, c: &'a RouterCounters) -> &'a AtomicU64 {
        match self {
            ProxyError::BadRequest(_) | ProxyError::RequestTimeout | ProxyError::HeadTooLarge => {
                &c.bad_request
            }
            ProxyError::UnknownTenant { .. } | ProxyError::NoTenant(_) => &c.unknown_tenant,
            ProxyError::Suspended(_) => &c.suspended,
            ProxyError::HoldTimeout { .. } => &c.hold_timeout,
            ProxyError::HoldOverflow(_) => &c.hold_overflow,
            ProxyError::RateLimited { .. } => &c.rate_limited,
            ProxyError::Upstream { .. } => &c.upstream_error,
            ProxyError::UpstreamTimeout(_) => &c.upstream_timeout,
            ProxyError::CellDown(_) => &c.cell_down,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// Writes the problem document the client gets, as a whole response; `close` adds
    /// `Connection: close`.
    pub fn write_response(&self, correlation_id: &str, close: bool, out: &mut Vec<u8>) {
        let (status, kind, title, retry) = self.parts();
        let body = serde_json::json!({
            "type": format!("https://cellplane.dev/problems/{kind}"),
            "title": title,
            "status": status.as_u16(),
            "detail": self.to_string(),
            "correlation_id": correlation_id,
        })
        .to_string();
        crate::h1::with_date(|date| {
            crate::h1::write_own_response(
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                "application/problem+json",
                correlation_id,
                retry,
                close,
                date,
                body.as_bytes(),
                out,
            )
        });
    }
}

impl From<ResolveError> for ProxyError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::NoTenant(_) => ProxyError::NoTenant(e.to_string()),
            other => ProxyError::BadRequest(other.to_string()),
        }
    }
}

/// Who a request is for, owned so the request can be rewritten afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tenant: String,
    pub env: String,
    /// Path and query to send to the cell when the tenant came from the path.
    pub forward_path: Option<String>,
    pub correlation_id: String,
}

/// What admission decided.
pub enum Pick {
    Forward(RouteEntry, Option<Arc<TenantRuntime>>),
    Hold(Option<Arc<TenantRuntime>>),
    Refuse(ProxyError),
}

/// The request path. Every hook has a default; a deployment can override any of them.
pub trait Phases: Send + Sync + 'static {
    /// Phase 1: which tenant and environment the request is for.
    fn resolve(
        &self,
        state: &RouterState,
        req: &h1::Request<'_, '_>,
    ) -> Result<Target, ProxyError> {
        let r = state
            .resolver
            .resolve(req.host, req.tenant_header, req.env_header, req.path)?;
        let correlation_id = req
            .correlation_id
            .filter(|c| valid_correlation_id(c))
            .map(str::to_string)
            .unwrap_or_else(|| state.correlation_id());
        Ok(Target {
            tenant: r.tenant.into_owned(),
            env: r.env.into_owned(),
            forward_path: r.forward_path.map(str::to_string),
            correlation_id,
        })
    }

    /// Phase 2: the route for the target in `snap`, and whether the request may use it now.
    fn pick(&self, state: &RouterState, snap: &Snapshot, t: &Target) -> Pick {
        let unknown = || {
            Pick::Refuse(ProxyError::UnknownTenant {
                tenant: t.tenant.clone(),
                env: t.env.clone(),
            })
        };
        let Some(tenant) = snap.tenant(&t.tenant) else {
            return unknown();
        };
        let Some(route) = tenant.get(&t.env) else {
            return unknown();
        };
        match route.mode {
            RouteMode::Suspended => Pick::Refuse(ProxyError::Suspended(t.tenant.clone())),
            RouteMode::Hold => Pick::Hold(Some(
                tenant
                    .runtime(&state.cfg.buckets, &state.tenant_histograms)
                    .clone(),
            )),
            RouteMode::Serve => {
                if !route.cell.health.is_up() {
                    return Pick::Refuse(ProxyError::CellDown(route.cell.cell_id.to_string()));
                }
                let rt = tenant
                    .runtime(&state.cfg.buckets, &state.tenant_histograms)
                    .clone();
                if let Err(retry_after) = admit(tenant, route, &rt) {
                    return Pick::Refuse(ProxyError::RateLimited {
                        tenant: t.tenant.clone(),
                        rate: route.rate_limit,
                        retry_after,
                    });
                }
                Pick::Forward(route.clone(), Some(rt))
            }
        }
    }

    /// Phase 3: writes the request head for the cell into `out`: origin-form target (the
    /// `/t/{tenant}` prefix removed when the tenant came from the path), hop-by-hop and
    /// trusted headers dropped, the router's own identity headers set (see [`h1`]).
    fn filter_request(
        &self,
        req: &h1::Request<'_, '_>,
        route: &RouteEntry,
        t: &Target,
        out: &mut Vec<u8>,
    ) {
        let path = t.forward_path.as_deref().unwrap_or(req.path);
        let id = h1::Identity {
            tenant: &t.tenant,
            env: &t.env,
            correlation_id: &t.correlation_id,
        };
        h1::write_request_head(req, path, route.cell.upstream.authority.as_str(), &id, out);
    }

    /// Phase 5: after the response head, whoever produced it.
    fn log(
        &self,
        state: &RouterState,
        route: Option<(&RouteEntry, Option<&TenantRuntime>)>,
        status: u16,
        took: Duration,
        error: Option<&ProxyError>,
    ) {
        if let Some(e) = error {
            RouterCounters::inc(e.counter(&state.counters));
        }
        if let Some((r, rt)) = route {
            r.cell.status.local().observe(status);
            r.cell.latency.local().observe(took);
            if let Some(rt) = rt {
                rt.status.observe(status);
                if let Some(h) = &rt.latency {
                    h.observe(took);
                }
            }
        }
    }
}

/// The stock phases.
pub struct DefaultPhases;
impl Phases for DefaultPhases {}

fn valid_correlation_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The per-tenant token bucket: rate = burst = the route's `rate_limit`.
fn admit(_t: &TenantEntry, route: &RouteEntry, rt: &TenantRuntime) -> Result<(), u64> {
    if route.rate_limit == 0 {
        return Ok(());
    }
    let rate = route.rate_limit as f64;
    let now = Instant::now();
    let mut b = rt.bucket.lock().unwrap_or_else(|p| p.into_inner());
    let refill = now.duration_since(b.at).as_secs_f64() * rate;
    b.tokens = (b.tokens.min(rate) + refill).min(rate);
    b.at = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        Ok(())
    } else {
        Err(((1.0 - b.tokens) / rate).ceil().max(1.0) as u64)
    }
}

/// Waits on a held route until a swap releases it or the deadline passes.
pub(crate) async fn wait_for_release<P: Phases>(
    phases: &P,
    state: &RouterState,
    t: &Target,
    rt: Option<Arc<TenantRuntime>>,
) -> Pick {
    struct Waiting(Option<Arc<TenantRuntime>>);
    impl Drop for Waiting {
        fn drop(&mut self) {
            if let Some(rt) = &self.0 {
                rt.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    if let Some(rt) = &rt {
        let n = rt.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        if n > state.cfg.hold_queue {
            rt.waiting.fetch_sub(1, Ordering::Relaxed);
            return Pick::Refuse(ProxyError::HoldOverflow(t.tenant.clone()));
        }
    }
    let _waiting = Waiting(rt);
    RouterCounters::inc(&state.counters.held);
    let started = Instant::now();
    let deadline = tokio::time::sleep(state.cfg.hold_deadline);
    tokio::pin!(deadline);
    let mut rx = state.swaps.subscribe();
    loop {
        // Look at the current table first: a swap may have happened before we subscribed.
        let pick = {
            let snap = state.table.load();
            phases.pick(state, &snap, t)
        };
        if !matches!(pick, Pick::Hold(_)) {
            return pick;
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = &mut deadline => break,
        }
    }
    Pick::Refuse(ProxyError::HoldTimeout {
        tenant: t.tenant.clone(),
        waited_ms: started.elapsed().as_millis() as u64,
    })
}
