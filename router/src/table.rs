//! The routing table as the data plane holds it: an immutable [`Snapshot`] swapped
//! atomically as a whole, so a request reads one consistent table (routes and the cells
//! they point at) with one atomic load.
//!
//! Routes live in shards of copy-on-write hash maps: applying a delta copies only the
//! shards it touches, so an update to a table of a million routes costs a few thousand
//! entry copies, not a million. Cells are interned: every route to the same cell shares one
//! [`CellHandle`], which owns the cell's keep-alive connection pool and its metric handles,
//! built when the snapshot is built and never looked up per request. Per-tenant runtime
//! state (rate bucket, metrics, hold waiters) is created on a tenant's first request and
//! carried into later snapshots. Nothing here does I/O.

use crate::metrics::{Histogram, PerWorker, StatusCounters};
use cellplane_api::RouteMode;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

const SHARDS: usize = 256;

/// Slots of [`TenantRuntime::in_flight`]: one per environment, shared on a collision.
pub const ENV_SLOTS: usize = 8;

/// The in-flight slot of an environment: `prod` is 0, the others hash (FNV-1a) onto 1..8.
/// Two environments of one tenant sharing a slot only make a drain wait for both.
#[inline]
pub fn env_slot(env: &str) -> usize {
    if env == "prod" {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in env.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    1 + (h as usize) % (ENV_SLOTS - 1)
}

/// A cell as routes see it: identity, where it is, its connection pool and its metrics.
pub struct CellHandle {
    pub cell_id: Arc<str>,
    pub endpoint: Arc<str>,
    pub upstream: crate::upstream::Upstream,
    pub status: PerWorker<StatusCounters>,
    pub latency: PerWorker<Histogram>,
    /// Kept up to date by the health prober; shared by every snapshot that holds the cell.
    pub health: crate::health::CellHealth,
}

/// State of one tenant that outlives snapshots: created on its first request.
pub struct TenantRuntime {
    pub bucket: Mutex<Bucket>,
    pub status: StatusCounters,
    /// Present for the first `--max-tenant-histograms` tenants with traffic: bounds the
    /// memory and the series count of a table with a million tenants.
    pub latency: Option<Histogram>,
    /// Requests currently parked on a held route of this tenant.
    pub waiting: AtomicU32,
    /// Requests committed to a cell and not done with it, by [`env_slot`]. Raised before
    /// the request re-checks the table generation (see `proxy::commit`), lowered when its
    /// exchange with the cell ends; a drain waits for the slots of held routes to be 0.
    pub in_flight: [AtomicU32; ENV_SLOTS],
    /// Requests that finished waiting on a held route (or on the rejoin fence).
    pub held_requests: AtomicU64,
    /// Microseconds those requests spent waiting.
    pub held_micros: AtomicU64,
}

impl TenantRuntime {
    /// Requests of `env` in flight to a cell.
    pub fn in_flight_of(&self, env: &str) -> u32 {
        self.in_flight[env_slot(env)].load(Ordering::SeqCst)
    }

    pub(crate) fn any_in_flight(&self) -> bool {
        self.in_flight.iter().any(|c| c.load(Ordering::SeqCst) != 0)
    }
}

/// How many more per-tenant histograms may be created.
pub struct SeriesBudget(std::sync::atomic::AtomicUsize);

impl SeriesBudget {
    pub fn new(n: usize) -> Self {
        Self(std::sync::atomic::AtomicUsize::new(n))
    }

    /// Takes one from the budget, if any is left.
    pub fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// A token bucket: `tokens` refill at the route's rate up to a burst of the same size.
pub struct Bucket {
    pub tokens: f64,
    pub at: std::time::Instant,
}

/// One route: which cell, in which mode, at which rate.
#[derive(Clone)]
pub struct RouteEntry {
    pub cell: Arc<CellHandle>,
    pub mode: RouteMode,
    /// Requests per second; 0 means unlimited.
    pub rate_limit: u32,
}

/// A route of a non-`prod` environment.
pub type EnvRoute = (Arc<str>, RouteEntry);

/// Every route of one tenant (most tenants have only `prod`).
#[derive(Clone, Default)]
pub struct TenantEntry {
    pub prod: Option<RouteEntry>,
    pub others: Option<Arc<[EnvRoute]>>,
    /// Created on the tenant's first request. A delta copies the shard with whatever is
    /// set at that moment, so a first request racing an update of the same shard may set
    /// it in the old snapshot after the copy. [`Snapshot::relink`] (run by every swap, once
    /// the old snapshot can no longer admit requests) carries such a runtime into the new
    /// snapshot; only when the new snapshot's entry got a runtime of its own in between are
    /// there two (the old one's first counts are lost from the metrics, and its in-flight
    /// requests are tracked as an orphan by `RouterState` until they end). That is cheaper
    /// than a shared cell per tenant in a table of a million.
    pub runtime: OnceLock<Arc<TenantRuntime>>,
}

impl TenantEntry {
    pub fn get(&self, env: &str) -> Option<&RouteEntry> {
        if env == "prod" {
            return self.prod.as_ref();
        }
        self.others
            .as_ref()
            .and_then(|o| o.iter().find(|(e, _)| &**e == env).map(|(_, r)| r))
    }

    fn set(&mut self, env: &Arc<str>, route: Option<RouteEntry>) {
        if &**env == "prod" {
            self.prod = route;
            return;
        }
        let mut v: Vec<(Arc<str>, RouteEntry)> = self
            .others
            .as_ref()
            .map(|o| o.iter().filter(|(e, _)| e != env).cloned().collect())
            .unwrap_or_default();
        if let Some(r) = route {
            v.push((env.clone(), r));
        }
        self.others = if v.is_empty() { None } else { Some(v.into()) };
    }

    fn is_empty(&self) -> bool {
        self.prod.is_none() && self.others.is_none()
    }

    /// Visits every (env, route).
    pub fn each(&self, mut f: impl FnMut(&str, &RouteEntry)) {
        if let Some(p) = &self.prod {
            f("prod", p);
        }
        for (e, r) in self.others.iter().flat_map(|o| o.iter()) {
            f(e, r);
        }
    }

    /// The tenant's runtime state, created on first use.
    pub fn runtime(&self, buckets: &[f64], histograms: &SeriesBudget) -> &Arc<TenantRuntime> {
        self.runtime.get_or_init(|| {
            Arc::new(TenantRuntime {
                bucket: Mutex::new(Bucket {
                    tokens: f64::MAX,
                    at: std::time::Instant::now(),
                }),
                status: StatusCounters::default(),
                latency: histograms.take().then(|| Histogram::new(buckets)),
                waiting: AtomicU32::new(0),
                in_flight: Default::default(),
                held_requests: AtomicU64::new(0),
                held_micros: AtomicU64::new(0),
            })
        })
    }
}

type Shard = HashMap<Arc<str>, TenantEntry>;

/// A route in `hold` mode: (tenant, env).
pub type HeldRoute = (Arc<str>, Arc<str>);

/// One immutable version of the table.
pub struct Snapshot {
    pub revision: i64,
    shards: Arc<[Arc<Shard>]>,
    pub routes: usize,
    /// Every cell some route points at.
    pub cells: Arc<[Arc<CellHandle>]>,
    /// Every route in `hold` mode, sorted: kept by the draft from the base's list and the
    /// changes (never by walking the table), so a drain finds them at once.
    held: Arc<[HeldRoute]>,
    /// Set by `RouterState::swap`: which swap installed this snapshot (0: never swapped
    /// in). Unlike the revision it is never repeated (a full reload may keep a revision).
    pub(crate) generation: u64,
}

fn shard_of(hasher: &std::collections::hash_map::RandomState, tenant: &str) -> usize {
    (hasher.hash_one(tenant) as usize) % SHARDS
}

/// A random but process-wide hasher for choosing shards.
fn shard_hasher() -> &'static std::collections::hash_map::RandomState {
    static H: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    H.get_or_init(Default::default)
}

impl Snapshot {
    pub fn empty() -> Self {
        Snapshot {
            revision: 0,
            shards: (0..SHARDS).map(|_| Arc::new(Shard::new())).collect(),
            routes: 0,
            cells: Arc::from(Vec::new()),
            held: Arc::from(Vec::new()),
            generation: 0,
        }
    }

    /// The routes in `hold` mode.
    pub fn held(&self) -> &[HeldRoute] {
        &self.held
    }

    /// Carries into `self` the runtimes that requests created in `old` after the draft of
    /// `self` copied their shard (see [`TenantEntry::runtime`]). Call it once `old` can no
    /// longer admit requests (after the swap's generation store). Returns the runtimes of
    /// `old` that could not be carried because `self` already has another one for the same
    /// tenant and that still have requests in flight: the caller keeps watching those.
    pub fn relink(&self, old: &Snapshot) -> Vec<(Arc<str>, Arc<TenantRuntime>)> {
        let mut orphans = Vec::new();
        for (new, old) in self.shards.iter().zip(old.shards.iter()) {
            if Arc::ptr_eq(new, old) {
                continue;
            }
            for (tenant, entry) in old.iter() {
                let Some(rt) = entry.runtime.get() else {
                    continue;
                };
                let Some(now) = new.get(tenant) else {
                    // Gone from the table: requests still in flight are for routes that
                    // no longer exist, which no drain waits on.
                    continue;
                };
                let kept = now.runtime.get_or_init(|| rt.clone());
                if !Arc::ptr_eq(kept, rt) && rt.any_in_flight() {
                    orphans.push((tenant.clone(), rt.clone()));
                }
            }
        }
        orphans
    }

    pub fn tenant(&self, tenant: &str) -> Option<&TenantEntry> {
        self.shards[shard_of(shard_hasher(), tenant)].get(tenant)
    }

    pub fn route(&self, tenant: &str, env: &str) -> Option<&RouteEntry> {
        self.tenant(tenant).and_then(|t| t.get(env))
    }

    /// Visits every tenant.
    pub fn each_tenant(&self, mut f: impl FnMut(&str, &TenantEntry)) {
        for s in self.shards.iter() {
            for (k, v) in s.iter() {
                f(k, v);
            }
        }
    }
}

/// A route as it arrives from the control plane or the state file, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub tenant_id: String,
    pub env: String,
    pub cell_id: String,
    pub endpoint: String,
    pub mode: RouteMode,
    pub rate_limit: Option<u64>,
}

/// Builds snapshots: owns the interned cells and envs between builds.
pub struct TableBuilder {
    cells: HashMap<(Arc<str>, Arc<str>), Arc<CellHandle>>,
    envs: HashMap<String, Arc<str>>,
    buckets: Arc<[f64]>,
    upstream: crate::upstream::UpstreamConfig,
}

/// Why a route was not taken into the table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RejectedRoute {
    #[error("invalid identifier in route {0}")]
    Identifier(String),
    #[error("invalid endpoint {1:?} in route {0}")]
    Endpoint(String, String),
}

impl TableBuilder {
    pub fn new(buckets: Arc<[f64]>, upstream: crate::upstream::UpstreamConfig) -> Self {
        Self {
            cells: HashMap::new(),
            envs: HashMap::new(),
            buckets,
            upstream,
        }
    }

    fn env(&mut self, e: &str) -> Arc<str> {
        if let Some(a) = self.envs.get(e) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(e);
        self.envs.insert(e.to_string(), a.clone());
        a
    }

    fn cell(&mut self, cell_id: &str, endpoint: &str) -> Result<Arc<CellHandle>, RejectedRoute> {
        let key: (Arc<str>, Arc<str>) = (Arc::from(cell_id), Arc::from(endpoint));
        if let Some(c) = self.cells.get(&key) {
            return Ok(c.clone());
        }
        let upstream = crate::upstream::Upstream::new(endpoint, &self.upstream)
            .map_err(|_| RejectedRoute::Endpoint(cell_id.to_string(), endpoint.to_string()))?;
        let handle = Arc::new(CellHandle {
            cell_id: key.0.clone(),
            endpoint: key.1.clone(),
            upstream,
            status: PerWorker::new(self.upstream.workers, StatusCounters::default),
            latency: PerWorker::new(self.upstream.workers, || Histogram::new(&self.buckets)),
            health: Default::default(),
        });
        self.cells.insert(key, handle.clone());
        Ok(handle)
    }

    fn entry(
        &mut self,
        key: (&str, &str),
        cell_id: &str,
        endpoint: &str,
        mode: RouteMode,
        rate_limit: Option<u64>,
    ) -> Result<RouteEntry, RejectedRoute> {
        for id in [key.0, key.1, cell_id] {
            if !crate::resolve::valid_id(id) {
                return Err(RejectedRoute::Identifier(format!("{}/{}", key.0, key.1)));
            }
        }
        Ok(RouteEntry {
            cell: self.cell(cell_id, endpoint)?,
            mode,
            rate_limit: rate_limit.unwrap_or(0).min(u32::MAX as u64) as u32,
        })
    }

    /// Starts the next snapshot: on top of `base`, or empty when `full`.
    pub fn draft<'b>(&'b mut self, base: &'b Snapshot, full: bool) -> Draft<'b> {
        Draft {
            routes: if full { 0 } else { base.routes as i64 },
            shards: (0..SHARDS).map(|_| None).collect(),
            builder: self,
            base,
            full,
            rejected: Vec::new(),
            held: None,
        }
    }

    /// Applies upserts and removals on top of `base` (or on an empty table when `full`)
    /// and returns the next snapshot and the routes it refused.
    pub fn apply(
        &mut self,
        base: &Snapshot,
        revision: i64,
        full: bool,
        upserts: &[RouteSpec],
        removals: &[(String, String)],
    ) -> (Snapshot, Vec<RejectedRoute>) {
        let mut d = self.draft(base, full);
        for (t, e) in removals {
            d.remove(t, e);
        }
        for r in upserts {
            d.upsert(
                &r.tenant_id,
                &r.env,
                &r.cell_id,
                &r.endpoint,
                r.mode,
                r.rate_limit,
            );
        }
        d.finish(revision)
    }

    /// The cells routes of `snap` point at. Small tables (and full loads) are walked; for
    /// large ones a delta keeps every interned cell some snapshot still uses.
    fn live_cells(&mut self, snap: &Snapshot, walk: bool) -> Arc<[Arc<CellHandle>]> {
        self.cells.retain(|_, c| Arc::strong_count(c) > 1);
        if !walk {
            return self.cells.values().cloned().collect();
        }
        let mut used: std::collections::HashSet<*const CellHandle> = Default::default();
        snap.each_tenant(|_, t| {
            t.each(|_, r| {
                used.insert(Arc::as_ptr(&r.cell));
            })
        });
        self.cells
            .values()
            .filter(|c| used.contains(&Arc::as_ptr(c)))
            .cloned()
            .collect()
    }
}

/// The next snapshot under construction; see [`TableBuilder::draft`].
pub struct Draft<'b> {
    builder: &'b mut TableBuilder,
    base: &'b Snapshot,
    full: bool,
    shards: Vec<Option<Shard>>,
    routes: i64,
    rejected: Vec<RejectedRoute>,
    /// The held routes, once a change was made (until then the base's list stands).
    held: Option<std::collections::BTreeSet<HeldRoute>>,
}

impl Draft<'_> {
    fn held_set(&mut self) -> &mut std::collections::BTreeSet<HeldRoute> {
        let (full, base) = (self.full, self.base);
        self.held.get_or_insert_with(|| {
            if full {
                Default::default()
            } else {
                base.held.iter().cloned().collect()
            }
        })
    }

    fn mark_held(&mut self, tenant: &str, env: &Arc<str>, held: bool) {
        if !held {
            // The common case (a route served) costs a scan of the few held routes and
            // no allocation.
            let is = |(t, e): &HeldRoute| &**t == tenant && e == env;
            let present = match &self.held {
                Some(set) => set.iter().any(is),
                None => !self.full && self.base.held.iter().any(is),
            };
            if !present {
                return;
            }
        }
        let set = self.held_set();
        let key: HeldRoute = (Arc::from(tenant), env.clone());
        if held {
            set.insert(key);
        } else {
            set.remove(&key);
        }
    }

    fn shard(&mut self, tenant: &str) -> &mut Shard {
        let i = shard_of(shard_hasher(), tenant);
        let (full, base) = (self.full, &self.base.shards);
        self.shards[i].get_or_insert_with(|| {
            if full {
                Shard::new()
            } else {
                (*base[i]).clone()
            }
        })
    }

    pub fn remove(&mut self, tenant: &str, env: &str) {
        let env = self.builder.env(env);
        let shard = self.shard(tenant);
        let mut removed = false;
        if let Some(t) = shard.get_mut(tenant) {
            removed = t.get(&env).is_some();
            t.set(&env, None);
            if t.is_empty() {
                shard.remove(tenant);
            }
        }
        if removed {
            self.routes -= 1;
        }
        self.mark_held(tenant, &env, false);
    }

    pub fn upsert(
        &mut self,
        tenant: &str,
        env: &str,
        cell_id: &str,
        endpoint: &str,
        mode: RouteMode,
        rate_limit: Option<u64>,
    ) {
        let entry = match self
            .builder
            .entry((tenant, env), cell_id, endpoint, mode, rate_limit)
        {
            Ok(e) => e,
            Err(e) => {
                self.rejected.push(e);
                return;
            }
        };
        let env = self.builder.env(env);
        // Runtime state of tenants carries over a full reload.
        let carried = if self.full {
            self.base.tenant(tenant).map(|t| t.runtime.clone())
        } else {
            None
        };
        let shard = self.shard(tenant);
        let added = match shard.get_mut(tenant) {
            Some(t) => {
                let new = t.get(&env).is_none();
                t.set(&env, Some(entry));
                new
            }
            None => {
                let mut t = TenantEntry {
                    runtime: carried.unwrap_or_default(),
                    ..Default::default()
                };
                t.set(&env, Some(entry));
                shard.insert(Arc::from(tenant), t);
                true
            }
        };
        if added {
            self.routes += 1;
        }
        self.mark_held(tenant, &env, mode == RouteMode::Hold);
    }

    pub fn finish(self, revision: i64) -> (Snapshot, Vec<RejectedRoute>) {
        let (full, base) = (self.full, self.base);
        let held: Arc<[HeldRoute]> = match self.held {
            Some(set) => set.into_iter().collect(),
            None if full => Arc::from(Vec::new()),
            None => base.held.clone(),
        };
        let shards: Arc<[Arc<Shard>]> = self
            .shards
            .into_iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(mut s) => {
                    s.shrink_to_fit();
                    Arc::new(s)
                }
                None if full => Arc::new(Shard::new()),
                None => base.shards[i].clone(),
            })
            .collect();
        let mut snapshot = Snapshot {
            revision,
            shards,
            routes: self.routes.max(0) as usize,
            cells: Arc::from(Vec::new()),
            held,
            generation: 0,
        };
        let walk = full || snapshot.routes <= 100_000;
        snapshot.cells = self.builder.live_cells(&snapshot, walk);
        (snapshot, self.rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(t: &str, env: &str, cell: &str, port: u16, mode: RouteMode) -> RouteSpec {
        RouteSpec {
            tenant_id: t.into(),
            env: env.into(),
            cell_id: cell.into(),
            endpoint: format!("http://127.0.0.1:{port}"),
            mode,
            rate_limit: None,
        }
    }

    fn builder() -> TableBuilder {
        TableBuilder::new(
            Arc::from(vec![0.01, 0.1]),
            crate::upstream::UpstreamConfig::default(),
        )
    }

    #[tokio::test]
    async fn full_then_delta() {
        let mut b = builder();
        let (s1, rej) = b.apply(
            &Snapshot::empty(),
            1,
            true,
            &[
                spec("acme", "prod", "c1", 1001, RouteMode::Serve),
                spec("acme", "dev", "c2", 1002, RouteMode::Serve),
                spec("globex", "prod", "c1", 1001, RouteMode::Suspended),
            ],
            &[],
        );
        assert!(rej.is_empty());
        assert_eq!(s1.routes, 3);
        assert_eq!(s1.cells.len(), 2);
        assert_eq!(&*s1.route("acme", "dev").unwrap().cell.cell_id, "c2");
        // Same cell, same handle.
        assert!(Arc::ptr_eq(
            &s1.route("acme", "prod").unwrap().cell,
            &s1.route("globex", "prod").unwrap().cell
        ));
        let (s2, _) = b.apply(
            &s1,
            2,
            false,
            &[spec("globex", "prod", "c3", 1003, RouteMode::Serve)],
            &[("acme".into(), "dev".into())],
        );
        assert_eq!(s2.routes, 2);
        assert!(s2.route("acme", "dev").is_none());
        assert_eq!(&*s2.route("globex", "prod").unwrap().cell.cell_id, "c3");
        assert_eq!(s2.cells.len(), 2, "c2 is gone, c3 is new");
        // The old snapshot is untouched.
        assert_eq!(&*s1.route("globex", "prod").unwrap().cell.cell_id, "c1");
    }

    #[tokio::test]
    async fn invalid_routes_are_refused() {
        let mut b = builder();
        let mut bad = spec("Acme!", "prod", "c1", 1, RouteMode::Serve);
        let (s, rej) = b.apply(&Snapshot::empty(), 1, true, &[bad.clone()], &[]);
        assert_eq!(s.routes, 0);
        assert_eq!(rej.len(), 1);
        bad.tenant_id = "acme".into();
        bad.endpoint = "ftp://x".into();
        let (s, rej) = b.apply(&Snapshot::empty(), 1, true, &[bad], &[]);
        assert_eq!(s.routes, 0);
        assert_eq!(rej.len(), 1);
    }

    fn held(s: &Snapshot) -> Vec<(String, String)> {
        s.held()
            .iter()
            .map(|(t, e)| (t.to_string(), e.to_string()))
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(t, e)| (t.to_string(), e.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn the_held_list_follows_deltas_removals_full_loads_and_the_state_file() {
        let mut b = builder();
        let (s1, _) = b.apply(
            &Snapshot::empty(),
            1,
            true,
            &[
                spec("acme", "prod", "c1", 1001, RouteMode::Hold),
                spec("acme", "dev", "c1", 1001, RouteMode::Serve),
                spec("globex", "prod", "c1", 1001, RouteMode::Hold),
                spec("initech", "prod", "c1", 1001, RouteMode::Suspended),
            ],
            &[],
        );
        assert_eq!(held(&s1), pairs(&[("acme", "prod"), ("globex", "prod")]));
        // A delta that touches no held route keeps the list (shared, not rebuilt).
        let (s2, _) = b.apply(
            &s1,
            2,
            false,
            &[spec("hooli", "prod", "c2", 1002, RouteMode::Serve)],
            &[],
        );
        assert!(Arc::ptr_eq(&s1.held, &s2.held));
        // Served again, held anew, removed, and a refused upsert that changes nothing.
        let mut bad = spec("globex", "prod", "c9", 1009, RouteMode::Serve);
        bad.endpoint = "ftp://nowhere".into();
        let (s3, rej) = b.apply(
            &s2,
            3,
            false,
            &[
                spec("acme", "prod", "c2", 1002, RouteMode::Serve),
                spec("acme", "dev", "c2", 1002, RouteMode::Hold),
                spec("hooli", "prod", "c2", 1002, RouteMode::Hold),
                bad,
            ],
            &[("initech".into(), "prod".into())],
        );
        assert_eq!(rej.len(), 1);
        assert_eq!(
            held(&s3),
            pairs(&[("acme", "dev"), ("globex", "prod"), ("hooli", "prod")])
        );
        let (s4, _) = b.apply(
            &s3,
            4,
            false,
            &[],
            &[
                ("hooli".into(), "prod".into()),
                ("acme".into(), "dev".into()),
            ],
        );
        assert_eq!(held(&s4), pairs(&[("globex", "prod")]));
        // Held and removed in one delta: gone.
        let (s5, _) = b.apply(
            &s4,
            5,
            false,
            &[spec("wonka", "prod", "c1", 1001, RouteMode::Hold)],
            &[("wonka".into(), "prod".into())],
        );
        assert_eq!(held(&s5), pairs(&[("globex", "prod"), ("wonka", "prod")]));
        let (s5, _) = b.apply(&s5, 6, false, &[], &[("wonka".into(), "prod".into())]);
        assert_eq!(held(&s5), pairs(&[("globex", "prod")]));
        // Through the state file (a full load from scratch).
        let mut file = Vec::new();
        crate::wire::write_snapshot(&s5, &mut file).unwrap();
        let loaded = crate::wire::apply_changes(&file, &mut builder(), &Snapshot::empty())
            .unwrap()
            .snapshot;
        assert_eq!(held(&loaded), pairs(&[("globex", "prod")]));
        // A full load replaces the list.
        let (s6, _) = b.apply(
            &s5,
            7,
            true,
            &[
                spec("globex", "prod", "c1", 1001, RouteMode::Serve),
                spec("stark", "qa", "c1", 1001, RouteMode::Hold),
            ],
            &[],
        );
        assert_eq!(held(&s6), pairs(&[("stark", "qa")]));
        let (s7, _) = b.apply(&s6, 8, true, &[], &[]);
        assert!(s7.held().is_empty());
    }

    #[test]
    fn env_slots_put_prod_first_and_spread_the_others() {
        assert_eq!(env_slot("prod"), 0);
        for e in ["dev", "stage", "qa", "preview-1", "x"] {
            assert!((1..ENV_SLOTS).contains(&env_slot(e)), "{e}");
            assert_eq!(env_slot(e), env_slot(e));
        }
    }
}
