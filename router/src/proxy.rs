//! The request path, as phases of one trait with default hooks (after pingora's
//! `ProxyHttp`): resolve the tenant → pick the route (admission: mode, rate limit, hold) →
//! filter the request for the cell → forward → log. A request reads the table once, from
//! one snapshot; only a held request looks again, after each swap, until it is released or
//! its deadline passes (and a request that finds, when it commits to a cell, that a swap
//! happened since it read the table: see [`commit`]). Every response the router makes
//! itself is `application/problem+json`.

use crate::h1;
use crate::metrics::RouterCounters;
use crate::resolve::{ResolveError, Resolver};
use crate::table::{env_slot, RouteEntry, Snapshot, TenantEntry, TenantRuntime};
use arc_swap::ArcSwap;
use cellplane_api::RouteMode;
use http::StatusCode;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

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
    /// The control plane's router lease (`--router-lease-secs`): a router that was not
    /// running for longer (stopped, paused) fences its table until it has fetched it
    /// again. Zero turns the fence off.
    pub router_lease: Duration,
}

/// The rejoin fence. A router stopped (SIGSTOP, a paused VM) for longer than its lease was
/// dropped from the control plane's live routers, which may have moved a tenant in the
/// meantime: its table may be stale. A ticker records that the process runs
/// (`alive_at_ms`, every ~100 ms); whoever sees a gap longer than the lease since then (the
/// ticker or a request) sets `resync_needed` and wakes the watch for an immediate fetch.
/// Until a fetch that started after that succeeds, requests to served routes wait like
/// held ones (same deadline and queue), and are served from the last-known table when the
/// deadline passes (fail-static, counted in `cellplane_router_stale_served_total`).
///
/// Time is `CLOCK_MONOTONIC` (`Instant`): a pause the guest's monotonic clock does not see
/// is not detected.
pub struct Fence {
    started: Instant,
    /// Milliseconds since `started` when the process was last seen running.
    alive_at_ms: AtomicI64,
    /// 0: the fence is off.
    lease_ms: i64,
    /// `(epoch << 1) | needed`: the epoch grows with every trip, so a fetch can tell
    /// whether the flag was set before it started.
    resync: AtomicU64,
    /// Wakes the watch for an immediate (`wait=0`) fetch.
    pub wake: Notify,
    /// Times a gap was seen (the ticker and a request seeing the same gap at once may
    /// both count it).
    pub trips: AtomicU64,
}

impl Fence {
    pub fn new(lease: Duration) -> Self {
        Self {
            started: Instant::now(),
            alive_at_ms: AtomicI64::new(0),
            lease_ms: lease.as_millis().min(i64::MAX as u128) as i64,
            resync: AtomicU64::new(0),
            wake: Notify::new(),
            trips: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    /// Records that the process runs (the ticker); first trips the fence if it did not
    /// for longer than the lease. Returns whether it tripped.
    pub fn tick(&self) -> bool {
        let now = self.now_ms();
        let tripped = self.check_gap(now);
        self.alive_at_ms.fetch_max(now, Ordering::Relaxed);
        tripped
    }

    fn check_gap(&self, now: i64) -> bool {
        if self.lease_ms == 0 || now - self.alive_at_ms.load(Ordering::Relaxed) <= self.lease_ms {
            return false;
        }
        self.trip();
        // After the flag: a request that sees the new time also sees the flag.
        self.alive_at_ms.fetch_max(now, Ordering::SeqCst);
        true
    }

    /// Sets `resync_needed` (a new epoch) and wakes the watch.
    pub fn trip(&self) {
        let _ = self
            .resync
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some((((v >> 1) + 1) << 1) | 1)
            });
        self.trips.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            lease_ms = self.lease_ms,
            "the router did not run for longer than its lease; \
             holding served routes until the routing table is fetched again"
        );
        self.wake.notify_one();
    }

    /// The request path: whether served routes wait for a resync (after looking for a
    /// gap). One clock read and two loads.
    #[inline]
    pub fn blocks(&self) -> bool {
        if self.lease_ms == 0 {
            return false;
        }
        self.check_gap(self.now_ms());
        self.resync_needed()
    }

    pub fn resync_needed(&self) -> bool {
        self.resync.load(Ordering::Acquire) & 1 == 1
    }

    /// Taken when a fetch starts; hand it to [`Fence::fetched`] when it succeeds.
    pub fn fetch_started(&self) -> u64 {
        self.resync.load(Ordering::SeqCst)
    }

    /// A fetch that started at `at_start` succeeded: clears the flag if it was already set
    /// when the fetch started and has not been set again since. True when it cleared it.
    pub fn fetched(&self, at_start: u64) -> bool {
        at_start & 1 == 1
            && self
                .resync
                .compare_exchange(at_start, at_start & !1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    /// Tests: pretend the process last ran `ms` ago.
    #[doc(hidden)]
    pub fn set_alive_ago(&self, ms: u64) {
        self.alive_at_ms
            .store(self.now_ms() - ms as i64, Ordering::SeqCst);
    }
}

/// Keeps [`Fence::tick`] going every 100 ms until `stop`.
pub async fn run_alive_ticker(state: Arc<RouterState>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // After a pause, one tick at once (which sees the gap), not a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        state.fence.tick();
    }
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
    /// The generation of the snapshot in `table` ([`Snapshot::generation`]), stored
    /// (SeqCst) by every swap after the table: a request raises its in-flight count, then
    /// checks that the snapshot it picked from is still current (see [`commit`]).
    pub generation: AtomicU64,
    pub fence: Fence,
    swap_lock: Mutex<()>,
    /// Runtimes a swap could not carry into the new snapshot (see
    /// [`Snapshot::relink`]) whose requests are still in flight.
    orphans: Mutex<Vec<(Arc<str>, Arc<TenantRuntime>)>>,
    /// Drain waits in progress, and their wake-up (an in-flight count falling to 0).
    drain_waiters: AtomicU32,
    drain_notify: Notify,
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
        let fence = Fence::new(cfg.router_lease);
        Self {
            swaps: watch::Sender::new(initial.revision),
            generation: AtomicU64::new(initial.generation),
            table: ArcSwap::from_pointee(initial),
            fence,
            swap_lock: Mutex::new(()),
            orphans: Mutex::new(Vec::new()),
            drain_waiters: AtomicU32::new(0),
            drain_notify: Notify::new(),
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
    pub fn swap(&self, mut snap: Snapshot) {
        let _one = self.swap_lock.lock().unwrap_or_else(|p| p.into_inner());
        let rev = snap.revision;
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        snap.generation = generation;
        let new = Arc::new(snap);
        let old = self.table.swap(new.clone());
        // From here a request that picked from `old` finds it stale and picks again.
        self.generation.store(generation, Ordering::SeqCst);
        let orphans = new.relink(&old);
        {
            let mut o = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
            o.retain(|(_, rt)| rt.any_in_flight());
            o.extend(orphans);
        }
        drop(old);
        self.swaps.send_replace(rev);
    }

    /// Wakes held requests without a new table (the rejoin fence was lifted).
    pub fn wake_held(&self) {
        self.swaps.send_modify(|_| {});
    }

    /// Whether no route held in `snap` has a request still in flight to a cell.
    pub fn drained(&self, snap: &Snapshot) -> bool {
        let held = snap.held();
        if held.is_empty() {
            return true;
        }
        let orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        held.iter().all(|(tenant, env)| {
            let slot = env_slot(env);
            let busy = |rt: &TenantRuntime| rt.in_flight[slot].load(Ordering::SeqCst) != 0;
            let current = snap
                .tenant(tenant)
                .and_then(|e| e.runtime.get())
                .is_some_and(|rt| busy(rt));
            !current && !orphans.iter().any(|(t, rt)| t == tenant && busy(rt))
        })
    }

    /// Waits until [`RouterState::drained`] holds for `snap` or `until` passes; returns
    /// whether it drained. Woken by the request whose in-flight count falls to 0.
    pub async fn wait_drained(&self, snap: &Snapshot, until: tokio::time::Instant) -> bool {
        struct Waiter<'a>(&'a AtomicU32);
        impl Drop for Waiter<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.drain_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiter = Waiter(&self.drain_waiters);
        loop {
            let notified = self.drain_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.drained(snap) {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => return self.drained(snap),
                // Only a safety net: the notification is what wakes a drain.
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
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

/// A request committed to a cell: counted in its tenant environment's in-flight slot
/// until dropped (when its exchange with the cell ends, however it ends).
pub struct InFlight<'s> {
    state: &'s RouterState,
    rt: Arc<TenantRuntime>,
    slot: usize,
    /// The runtime came from the pick (so the request's metrics go to it).
    from_pick: bool,
}

impl<'s> InFlight<'s> {
    fn enter(state: &'s RouterState, rt: Arc<TenantRuntime>, slot: usize, from_pick: bool) -> Self {
        rt.in_flight[slot].fetch_add(1, Ordering::SeqCst);
        Self {
            state,
            rt,
            slot,
            from_pick,
        }
    }

    /// The tenant's runtime as the pick gave it (for the request's metrics).
    pub fn runtime(&self) -> Option<&TenantRuntime> {
        self.from_pick.then_some(&*self.rt)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let was = self.rt.in_flight[self.slot].fetch_sub(1, Ordering::SeqCst);
        // Dekker with `wait_drained`: it registers, then reads the counts.
        if was == 1 && self.state.drain_waiters.load(Ordering::SeqCst) != 0 {
            self.state.drain_notify.notify_waiters();
        }
    }
}

/// What admission decided, with a forwarded request counted in flight.
pub enum Admitted<'s> {
    Forward(RouteEntry, Option<InFlight<'s>>),
    /// Wait: the route is held, or (`true`) it is served but the rejoin fence is up.
    Hold(Option<Arc<TenantRuntime>>, bool),
    Refuse(ProxyError),
}

/// Picks the route for `t` from `snap` ([`Phases::pick`]) and commits a forward: the
/// request is counted in its tenant environment's in-flight slot (SeqCst), then the router's
/// generation is read again (SeqCst). If a swap happened since `snap`, the count is undone
/// and the request picks again from the new table (which may hold it now). Either the
/// request sees the swap, or the swap's drain check sees the request: a request never
/// reaches the old cell of a route once the router reported that route drained.
///
/// With `fence`, a served route waits while the rejoin fence is up.
pub fn commit<'s, P: Phases>(
    phases: &P,
    state: &'s RouterState,
    snap: &Snapshot,
    t: &Target,
    fence: bool,
) -> Admitted<'s> {
    let mut reloaded;
    let mut snap = snap;
    loop {
        let (route, rt) = match phases.pick(state, snap, t) {
            Pick::Forward(route, rt) => (route, rt),
            Pick::Hold(rt) => return Admitted::Hold(rt, false),
            Pick::Refuse(e) => return Admitted::Refuse(e),
        };
        if fence && state.fence.blocks() {
            return Admitted::Hold(rt, true);
        }
        let (rt, from_pick) = match rt {
            Some(rt) => (rt, true),
            // Phases that give no runtime: count the request on the tenant's anyway.
            None => match snap.tenant(&t.tenant) {
                Some(e) => (
                    e.runtime(&state.cfg.buckets, &state.tenant_histograms)
                        .clone(),
                    false,
                ),
                None => return Admitted::Forward(route, None),
            },
        };
        let flight = InFlight::enter(state, rt, env_slot(&t.env), from_pick);
        if state.generation.load(Ordering::SeqCst) == snap.generation {
            return Admitted::Forward(route, Some(flight));
        }
        drop(flight);
        reloaded = state.table.load();
        snap = &reloaded;
    }
}

/// Waits on a held route (or on the rejoin fence) until a swap releases it or the deadline
/// passes. A request held only by the fence is then served from the table it has.
pub(crate) async fn wait_for_release<'s, P: Phases>(
    phases: &P,
    state: &'s RouterState,
    t: &Target,
    rt: Option<Arc<TenantRuntime>>,
) -> Admitted<'s> {
    /// Leaves the queue and accounts the wait to the tenant.
    struct Waiting(Option<Arc<TenantRuntime>>, Instant);
    impl Drop for Waiting {
        fn drop(&mut self) {
            if let Some(rt) = &self.0 {
                rt.waiting.fetch_sub(1, Ordering::Relaxed);
                rt.held_requests.fetch_add(1, Ordering::Relaxed);
                rt.held_micros
                    .fetch_add(self.1.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        }
    }
    if let Some(rt) = &rt {
        let n = rt.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        if n > state.cfg.hold_queue {
            rt.waiting.fetch_sub(1, Ordering::Relaxed);
            return Admitted::Refuse(ProxyError::HoldOverflow(t.tenant.clone()));
        }
    }
    let started = Instant::now();
    let _waiting = Waiting(rt, started);
    RouterCounters::inc(&state.counters.held);
    let deadline = tokio::time::sleep(state.cfg.hold_deadline);
    tokio::pin!(deadline);
    let mut rx = state.swaps.subscribe();
    let mut fenced;
    loop {
        // Look at the current table first: a swap may have happened before we subscribed.
        let admitted = {
            let snap = state.table.load();
            commit(phases, state, &snap, t, true)
        };
        match admitted {
            Admitted::Hold(_, f) => fenced = f,
            other => return other,
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
    if fenced {
        // The control plane did not answer in time: fail-static, as when it is down.
        let admitted = {
            let snap = state.table.load();
            commit(phases, state, &snap, t, false)
        };
        match admitted {
            Admitted::Hold(..) => {}
            Admitted::Forward(r, f) => {
                RouterCounters::inc(&state.counters.stale_served);
                return Admitted::Forward(r, f);
            }
            other => return other,
        }
    }
    Admitted::Refuse(ProxyError::HoldTimeout {
        tenant: t.tenant.clone(),
        waited_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::{Resolver, Source};
    use crate::table::{RouteSpec, TableBuilder};
    use std::sync::atomic::Ordering::SeqCst;

    fn cfg(lease: Duration, hold_deadline: Duration) -> ProxyConfig {
        ProxyConfig {
            hold_deadline,
            hold_queue: 10,
            upstream_timeout: Duration::from_secs(1),
            buckets: Arc::from(vec![0.01]),
            max_tenant_histograms: 10,
            health_fails: 2,
            workers: 1,
            underscore_trusted_headers: Default::default(),
            router_lease: lease,
        }
    }

    fn spec(tenant: &str, env: &str, mode: RouteMode) -> RouteSpec {
        RouteSpec {
            tenant_id: tenant.into(),
            env: env.into(),
            cell_id: "c1".into(),
            endpoint: "http://127.0.0.1:9".into(),
            mode,
            rate_limit: None,
        }
    }

    struct Fixture {
        state: RouterState,
        builder: std::cell::RefCell<TableBuilder>,
    }

    impl Fixture {
        fn new(lease: Duration, hold_deadline: Duration) -> Self {
            Self {
                state: RouterState::new(
                    Resolver::new(vec![Source::Header], "localhost"),
                    cfg(lease, hold_deadline),
                    Snapshot::empty(),
                ),
                builder: TableBuilder::new(Arc::from(vec![0.01]), Default::default()).into(),
            }
        }

        /// Applies a delta of upserts as revision `rev` and swaps it in.
        fn set(&self, rev: i64, routes: &[(&str, &str, RouteMode)]) {
            let base = self.state.table.load_full();
            let ups: Vec<_> = routes.iter().map(|(t, e, m)| spec(t, e, *m)).collect();
            let (snap, rejected) = self
                .builder
                .borrow_mut()
                .apply(&base, rev, false, &ups, &[]);
            assert!(rejected.is_empty());
            self.state.swap(snap);
        }

        fn runtime(&self, tenant: &str) -> Arc<TenantRuntime> {
            let snap = self.state.table.load();
            snap.tenant(tenant)
                .unwrap()
                .runtime(&self.state.cfg.buckets, &self.state.tenant_histograms)
                .clone()
        }

        fn commit(&self, snap: &Snapshot, t: &Target) -> Admitted<'_> {
            commit(&DefaultPhases, &self.state, snap, t, true)
        }
    }

    fn target(tenant: &str, env: &str) -> Target {
        Target {
            tenant: tenant.into(),
            env: env.into(),
            forward_path: None,
            correlation_id: "c".into(),
        }
    }

    fn current(state: &RouterState) -> Arc<Snapshot> {
        state.table.load_full()
    }

    /// A waker that counts its wake-ups.
    struct Count(AtomicU64);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn poll_once<F: std::future::Future>(
        f: std::pin::Pin<&mut F>,
        waker: &std::task::Waker,
    ) -> std::task::Poll<F::Output> {
        f.poll(&mut std::task::Context::from_waker(waker))
    }

    #[tokio::test]
    async fn a_request_that_picked_serve_before_the_hold_swap_picks_again_and_waits() {
        let f = Fixture::new(Duration::ZERO, Duration::from_secs(5));
        f.set(1, &[("acme", "prod", RouteMode::Serve)]);
        let t = target("acme", "prod");
        // The request loaded revision 1 (serve)...
        let stale = current(&f.state);
        assert!(matches!(
            DefaultPhases.pick(&f.state, &stale, &t),
            Pick::Forward(..)
        ));
        // ...the swap to a hold lands before it counts itself in flight...
        f.set(2, &[("acme", "prod", RouteMode::Hold)]);
        // ...so its commit sees the new generation and picks again: it waits.
        match f.commit(&stale, &t) {
            Admitted::Hold(Some(_), false) => {}
            _ => panic!("expected the request to wait on the hold"),
        }
        assert_eq!(f.runtime("acme").in_flight_of("prod"), 0);
        assert!(f.state.drained(&current(&f.state)));
    }

    #[tokio::test]
    async fn a_request_in_flight_when_its_route_is_held_delays_the_drain_until_it_ends() {
        let f = Fixture::new(Duration::ZERO, Duration::from_secs(5));
        f.set(
            1,
            &[
                ("acme", "prod", RouteMode::Serve),
                ("acme", "dev", RouteMode::Serve),
            ],
        );
        let t = target("acme", "prod");
        let flight = match f.commit(&current(&f.state), &t) {
            Admitted::Forward(_, Some(flight)) => flight,
            _ => panic!("expected a forward"),
        };
        assert_eq!(f.runtime("acme").in_flight_of("prod"), 1);
        assert_eq!(f.runtime("acme").in_flight_of("dev"), 0);
        f.set(2, &[("acme", "prod", RouteMode::Hold)]);
        let held = current(&f.state);
        assert!(!f.state.drained(&held));
        // A drain wait registers, then is woken by the request's end (not by a timer).
        let wait = f
            .state
            .wait_drained(&held, tokio::time::Instant::now() + Duration::from_secs(60));
        tokio::pin!(wait);
        let count = Arc::new(Count(AtomicU64::new(0)));
        let waker = std::task::Waker::from(count.clone());
        assert!(poll_once(wait.as_mut(), &waker).is_pending());
        drop(flight);
        assert_eq!(count.0.load(SeqCst), 1, "the request's end woke the drain");
        assert_eq!(
            poll_once(wait.as_mut(), &waker),
            std::task::Poll::Ready(true)
        );
        assert!(f.state.drained(&held));
    }

    #[tokio::test]
    async fn routes_never_held_or_held_with_nothing_in_flight_are_drained_at_once() {
        let f = Fixture::new(Duration::ZERO, Duration::from_secs(5));
        f.set(1, &[("acme", "prod", RouteMode::Serve)]);
        let snap = current(&f.state);
        assert!(snap.held().is_empty());
        assert!(f.state.drained(&snap));
        // A request on another env of the same tenant does not delay a hold of prod,
        // nor one of another tenant.
        f.set(
            2,
            &[
                ("acme", "dev", RouteMode::Serve),
                ("globex", "prod", RouteMode::Serve),
            ],
        );
        let other = match f.commit(&current(&f.state), &target("acme", "dev")) {
            Admitted::Forward(_, Some(flight)) => flight,
            _ => panic!("expected a forward"),
        };
        let globex = match f.commit(&current(&f.state), &target("globex", "prod")) {
            Admitted::Forward(_, Some(flight)) => flight,
            _ => panic!("expected a forward"),
        };
        f.set(
            3,
            &[
                ("acme", "prod", RouteMode::Hold),
                // Never had a request: no runtime at all.
                ("initech", "prod", RouteMode::Hold),
            ],
        );
        let held = current(&f.state);
        assert_eq!(held.held().len(), 2);
        assert!(f.state.drained(&held));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let wait = f.state.wait_drained(&held, deadline);
        tokio::pin!(wait);
        let waker = std::task::Waker::from(Arc::new(Count(AtomicU64::new(0))));
        assert_eq!(
            poll_once(wait.as_mut(), &waker),
            std::task::Poll::Ready(true)
        );
        drop((other, globex));
    }

    #[tokio::test]
    async fn a_runtime_created_on_the_old_table_during_a_build_is_still_drained() {
        let f = Fixture::new(Duration::ZERO, Duration::from_secs(5));
        f.set(1, &[("acme", "prod", RouteMode::Serve)]);
        let t = target("acme", "prod");
        // Build the hold from revision 1 (copying acme's shard, which has no runtime yet)...
        let base = current(&f.state);
        let (held, _) = f.builder.borrow_mut().apply(
            &base,
            2,
            false,
            &[spec("acme", "prod", RouteMode::Hold)],
            &[],
        );
        // ...while acme's first request creates its runtime on revision 1 and commits.
        let flight = match f.commit(&base, &t) {
            Admitted::Forward(_, Some(flight)) => flight,
            _ => panic!("expected a forward"),
        };
        assert!(held.tenant("acme").unwrap().runtime.get().is_none());
        f.state.swap(held);
        let now = current(&f.state);
        // The swap carried the runtime over: the drain sees the request.
        assert!(!f.state.drained(&now));
        drop(flight);
        assert!(f.state.drained(&now));

        // The same race when the new table also got a runtime of its own first: the old
        // one is watched as an orphan.
        f.set(3, &[("globex", "prod", RouteMode::Serve)]);
        let base = current(&f.state);
        let (next, _) = f.builder.borrow_mut().apply(
            &base,
            4,
            false,
            &[spec("globex", "dev", RouteMode::Serve)],
            &[],
        );
        let flight = match f.commit(&base, &target("globex", "prod")) {
            Admitted::Forward(_, Some(flight)) => flight,
            _ => panic!("expected a forward"),
        };
        next.tenant("globex")
            .unwrap()
            .runtime(&f.state.cfg.buckets, &f.state.tenant_histograms);
        f.state.swap(next);
        f.set(5, &[("globex", "prod", RouteMode::Hold)]);
        let now = current(&f.state);
        assert_eq!(f.runtime("globex").in_flight_of("prod"), 0);
        assert!(!f.state.drained(&now), "the orphan's request is seen");
        drop(flight);
        assert!(f.state.drained(&now));
    }

    #[tokio::test]
    async fn after_a_gap_longer_than_the_lease_served_routes_wait_for_a_fetch() {
        let f = Fixture::new(Duration::from_secs(1), Duration::from_secs(60));
        f.set(1, &[("acme", "prod", RouteMode::Serve)]);
        let t = target("acme", "prod");
        assert!(matches!(
            f.commit(&current(&f.state), &t),
            Admitted::Forward(..)
        ));
        // A fetch that starts before the gap cannot lift the fence.
        let early = f.state.fence.fetch_started();
        // The process did not run for 5 s: the request path sees the gap itself.
        f.state.fence.set_alive_ago(5000);
        match f.commit(&current(&f.state), &t) {
            Admitted::Hold(Some(_), true) => {}
            _ => panic!("expected the fence to hold a served route"),
        }
        assert!(f.state.fence.resync_needed());
        assert_eq!(f.state.fence.trips.load(SeqCst), 1);
        let state = &f.state;
        let waiting = wait_for_release(&DefaultPhases, state, &t, Some(f.runtime("acme")));
        tokio::pin!(waiting);
        let waker = std::task::Waker::from(Arc::new(Count(AtomicU64::new(0))));
        assert!(poll_once(waiting.as_mut(), &waker).is_pending());
        assert!(
            !state.fence.fetched(early),
            "that fetch started before the gap"
        );
        state.wake_held();
        assert!(poll_once(waiting.as_mut(), &waker).is_pending());
        // A fetch that started after the flag succeeds: the waiter is released.
        let at = state.fence.fetch_started();
        assert!(state.fence.fetched(at));
        state.wake_held();
        match poll_once(waiting.as_mut(), &waker) {
            std::task::Poll::Ready(Admitted::Forward(_, Some(_))) => {}
            _ => panic!("expected the request to be forwarded"),
        }
        assert!(!state.fence.resync_needed());
        assert_eq!(state.counters.stale_served.load(SeqCst), 0);
    }

    #[tokio::test]
    async fn a_fenced_request_is_served_stale_at_the_hold_deadline_and_counted() {
        let f = Fixture::new(Duration::from_secs(1), Duration::from_millis(30));
        f.set(1, &[("acme", "prod", RouteMode::Serve)]);
        let t = target("acme", "prod");
        f.state.fence.set_alive_ago(5000);
        assert!(f.state.fence.tick());
        let rt = f.runtime("acme");
        match wait_for_release(&DefaultPhases, &f.state, &t, Some(rt.clone())).await {
            Admitted::Forward(_, Some(flight)) => drop(flight),
            _ => panic!("expected fail-static"),
        }
        assert_eq!(f.state.counters.stale_served.load(SeqCst), 1);
        assert_eq!(rt.held_requests.load(SeqCst), 1);
        assert!(rt.held_micros.load(SeqCst) >= 30_000);
        assert_eq!(rt.waiting.load(SeqCst), 0);
        let m = crate::admin::render_metrics(&f.state, &crate::sync::SyncStatus::default());
        assert!(m.contains("cellplane_router_stale_served_total 1\n"), "{m}");
        assert!(m.contains("cellplane_router_resyncs_total 1\n"), "{m}");
        assert!(
            m.contains("cellplane_router_tenant_held_requests_total{tenant=\"acme\"} 1\n"),
            "{m}"
        );
        assert!(
            m.contains("cellplane_router_tenant_hold_seconds_total{tenant=\"acme\"} 0.0"),
            "{m}"
        );
        // A held route still answers 503 at its deadline.
        f.set(2, &[("acme", "prod", RouteMode::Hold)]);
        assert!(matches!(
            wait_for_release(&DefaultPhases, &f.state, &t, Some(rt.clone())).await,
            Admitted::Refuse(ProxyError::HoldTimeout { .. })
        ));
        assert_eq!(rt.held_requests.load(SeqCst), 2);
    }
}
