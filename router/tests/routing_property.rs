//! Property: over random routing tables and random sequences of full and delta updates,
//! a request is only ever forwarded to the endpoint of its own tenant's current route, with
//! its own tenant in `X-Tenant-ID`, whatever tenant a client claims in its headers. Suspended
//! routes answer 403, held ones hold, absent ones 404. Runs the router's own parsing,
//! snapshot building and proxy phases; a seeded generator keeps failures reproducible
//! (the failing seed is printed).

use cellplane_api::RouteMode;
use cellplane_router::proxy::{DefaultPhases, Phases, Pick, ProxyConfig, RouterState};
use cellplane_router::resolve::{Resolver, Source};
use cellplane_router::table::{Snapshot, TableBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

type Model = BTreeMap<(String, String), (String, String, RouteMode)>;

const TENANTS: [&str; 8] = [
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka",
];
const ENVS: [&str; 3] = ["prod", "dev", "stage"];

fn endpoint(cell: usize) -> (String, String) {
    (
        format!("cell-{cell}"),
        format!("http://127.0.0.{}:{}", 1 + cell % 3, 9000 + cell),
    )
}

fn random_route(rng: &mut StdRng) -> ((String, String), (String, String, RouteMode)) {
    let t = TENANTS[rng.gen_range(0..TENANTS.len())].to_string();
    let e = ENVS[rng.gen_range(0..ENVS.len())].to_string();
    let (c, ep) = endpoint(rng.gen_range(0..6));
    let mode = match rng.gen_range(0..10) {
        0 => RouteMode::Suspended,
        1 => RouteMode::Hold,
        _ => RouteMode::Serve,
    };
    ((t, e), (c, ep, mode))
}

fn to_json(key: &(String, String), v: &(String, String, RouteMode)) -> serde_json::Value {
    serde_json::json!({"tenant_id": key.0, "env": key.1, "cell_id": v.0, "endpoint": v.1, "mode": v.2})
}

/// One update: returns the wire document and applies it to the model.
fn random_update(rng: &mut StdRng, model: &mut Model, revision: i64) -> Vec<u8> {
    if rng.gen_range(0..6) == 0 {
        model.clear();
        for _ in 0..rng.gen_range(0..20) {
            let (k, v) = random_route(rng);
            model.insert(k, v);
        }
        let upserts: Vec<_> = model.iter().map(|(k, v)| to_json(k, v)).collect();
        return serde_json::to_vec(&serde_json::json!({"revision": revision, "full": true,
            "upserts": upserts, "removals": []}))
        .unwrap();
    }
    let mut upserts = BTreeMap::new();
    let mut removals = BTreeMap::new();
    for _ in 0..rng.gen_range(1..6) {
        if rng.gen_bool(0.3) && !model.is_empty() {
            let i = rng.gen_range(0..model.len());
            let k = model.keys().nth(i).unwrap().clone();
            model.remove(&k);
            upserts.remove(&k);
            removals.insert(k, ());
        } else {
            let (k, v) = random_route(rng);
            model.insert(k.clone(), v.clone());
            removals.remove(&k);
            upserts.insert(k, v);
        }
    }
    let ups: Vec<_> = upserts.iter().map(|(k, v)| to_json(k, v)).collect();
    let rems: Vec<_> = removals
        .keys()
        .map(|k| serde_json::json!({"tenant_id": k.0, "env": k.1}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"revision": revision, "full": false,
        "upserts": ups, "removals": rems}))
    .unwrap()
}

/// A raw request head for a random tenant, often with a lying `X-Tenant-ID`.
fn request(rng: &mut StdRng) -> (String, String, Vec<u8>) {
    let tenant = TENANTS[rng.gen_range(0..TENANTS.len())];
    let env = ENVS[rng.gen_range(0..ENVS.len())];
    let liar = TENANTS[rng.gen_range(0..TENANTS.len())];
    let mut headers = String::new();
    let send_env = env != "prod" || rng.gen_bool(0.5);
    if send_env {
        headers.push_str(&format!("X-Tenant-Env: {env}\r\n"));
    }
    let path = match rng.gen_range(0..3) {
        0 => {
            // Host: a client-sent X-Tenant-ID must not win.
            headers.push_str(&format!("Host: {tenant}.localhost:8080\r\n"));
            if rng.gen_bool(0.7) {
                headers.push_str(&format!("x-tenant-id: {liar}\r\n"));
            }
            "/v1/kv/k".to_string()
        }
        1 => {
            headers.push_str(&format!(
                "Host: 127.0.0.1:8080\r\nX-Tenant-Id: {tenant}\r\n"
            ));
            "/v1/kv/k?x=1".to_string()
        }
        _ => {
            headers.push_str("Host: 127.0.0.1:8080\r\n");
            format!("/t/{tenant}/v1/kv/k")
        }
    };
    let raw = format!("GET {path} HTTP/1.1\r\n{headers}\r\n").into_bytes();
    (tenant.to_string(), env.to_string(), raw)
}

#[tokio::test]
async fn requests_only_reach_their_own_tenants_current_route() {
    let seeds: u64 = std::env::var("ROUTER_PROPTEST_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let phases = DefaultPhases;
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut builder = TableBuilder::new(Arc::from(vec![0.01]), Default::default());
        let state = RouterState::new(
            Resolver::new(
                vec![Source::Host, Source::Header, Source::Path],
                "localhost",
            ),
            ProxyConfig {
                hold_deadline: Duration::from_millis(10),
                hold_queue: 10,
                upstream_timeout: Duration::from_secs(1),
                buckets: Arc::from(vec![0.01]),
                health_fails: 2,
                max_tenant_histograms: 100,
                workers: 1,
                underscore_trusted_headers: Default::default(),
                router_lease: Duration::ZERO,
            },
            Snapshot::empty(),
        );
        let mut model = Model::new();
        for revision in 1..=30 {
            let doc = random_update(&mut rng, &mut model, revision);
            let base = state.table.load_full();
            let applied = cellplane_router::wire::apply_changes(&doc, &mut builder, &base)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert!(applied.rejected.is_empty(), "seed {seed}");
            assert_eq!(
                applied.snapshot.routes,
                model.len(),
                "seed {seed} rev {revision}"
            );
            // The held routes the snapshot lists are exactly the model's.
            let held: Vec<(String, String)> = applied
                .snapshot
                .held()
                .iter()
                .map(|(t, e)| (t.to_string(), e.to_string()))
                .collect();
            let want: Vec<(String, String)> = model
                .iter()
                .filter(|(_, v)| v.2 == RouteMode::Hold)
                .map(|(k, _)| k.clone())
                .collect();
            assert_eq!(held, want, "seed {seed} rev {revision}");
            state.swap(applied.snapshot);
            for _ in 0..20 {
                let (tenant, env, raw) = request(&mut rng);
                let mut storage = [httparse::EMPTY_HEADER; 16];
                let req = cellplane_router::h1::parse_request(&raw, &mut storage)
                    .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
                let target = phases
                    .resolve(&state, &req)
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                assert_eq!(
                    (&target.tenant, &target.env),
                    (&tenant, &env),
                    "seed {seed}"
                );
                let snap = state.table.load();
                let expected = model.get(&(tenant.clone(), env.clone()));
                match (phases.pick(&state, &snap, &target), expected) {
                    (Pick::Forward(route, _), Some((cell, ep, RouteMode::Serve))) => {
                        assert_eq!(&*route.cell.cell_id, cell, "seed {seed}");
                        let mut out = Vec::new();
                        phases.filter_request(&req, &route, &target, &mut out);
                        let want: http::Uri = ep.parse().unwrap();
                        assert_eq!(&*route.cell.endpoint, ep.as_str(), "seed {seed}");
                        assert_eq!(
                            Some(&route.cell.upstream.authority),
                            want.authority(),
                            "seed {seed}"
                        );
                        // What the cell gets, read back as a cell would read it.
                        let mut hs = [httparse::EMPTY_HEADER; 16];
                        let mut sent = httparse::Request::new(&mut hs);
                        assert!(
                            sent.parse(&out).unwrap().is_complete(),
                            "seed {seed}: {}",
                            String::from_utf8_lossy(&out)
                        );
                        let path = sent.path.unwrap();
                        assert_eq!(path.split('?').next(), Some("/v1/kv/k"), "seed {seed}");
                        let values = |name: &str| -> Vec<&str> {
                            sent.headers
                                .iter()
                                .filter(|h| h.name.eq_ignore_ascii_case(name))
                                .map(|h| std::str::from_utf8(h.value).unwrap())
                                .collect()
                        };
                        assert_eq!(values("x-tenant-id"), [tenant.as_str()], "seed {seed}");
                        assert_eq!(values("x-tenant-env"), [env.as_str()], "seed {seed}");
                        assert_eq!(values("host").len(), 1, "seed {seed}");
                    }
                    (Pick::Refuse(e), Some((_, _, RouteMode::Suspended))) => {
                        assert_eq!(e.status(), 403, "seed {seed}")
                    }
                    (Pick::Hold(_), Some((_, _, RouteMode::Hold))) => {}
                    (Pick::Refuse(e), None) => assert_eq!(e.status(), 404, "seed {seed}"),
                    (got, want) => panic!(
                        "seed {seed} rev {revision}: {tenant}/{env} expected {want:?}, got {}",
                        match got {
                            Pick::Forward(r, _) => format!("forward to {}", r.cell.cell_id),
                            Pick::Hold(_) => "hold".into(),
                            Pick::Refuse(e) => format!("refuse {e}"),
                        }
                    ),
                }
            }
        }
    }
}
