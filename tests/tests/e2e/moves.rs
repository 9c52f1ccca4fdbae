//! Tenant moves end to end (issue "Move a tenant between cells"): a real control plane,
//! `local` cells stamped by terraform (sample-cell processes), real routers, steady load.
//! Crash and failure cases stop at named steps (failpoints, SIGSTOP of a named process),
//! never after a sleep.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MOVE_TIMEOUT: Duration = Duration::from_secs(120);

/// A control plane with `pool-1` holding acme and globex, an empty `pool-2`, and routers.
struct Fleet {
    app: TestApp,
    routers: Vec<TestRouter>,
}

async fn fleet(b: Backend, options: AppOptions, routers: usize, keys: usize) -> Fleet {
    let app = TestApp::spawn_with(b, options).await;
    app.stamp_cells(&[("pool-1", "eu-west-1", "pooled", 10, 10)])
        .await;
    app.create_org("acme-corp").await;
    for t in ["acme", "globex"] {
        app.create_tenant_with(json!({"tenant_id": t, "organization_id": "acme-corp",
            "profile": "mt-standard", "region": "eu-west-1",
            "policies": {"dataResidency": "in-region-only"}}))
            .await;
        let j = app.lifecycle(t, "activate").await;
        assert_eq!(j.state, cellplane_api::JobState::Succeeded, "{j:?}");
    }
    app.stamp_cells(&[
        ("pool-2", "eu-west-1", "pooled", 10, 10),
        ("pool-us", "us-east-1", "pooled", 10, 10),
    ])
    .await;
    let token = app.token("router").await;
    let mut rs = Vec::new();
    for _ in 0..routers {
        let r = TestRouter::spawn(&app.url, &token, &["--heartbeat-secs", "1"]).await;
        r.wait_revision(app.routing_revision().await).await;
        rs.push(r);
    }
    let f = Fleet { app, routers: rs };
    f.seed("acme", keys).await;
    f
}

impl Fleet {
    /// Writes `n` keys of `tenant` through the first router, 32 at a time.
    async fn seed(&self, tenant: &str, n: usize) {
        let r = &self.routers[0];
        let mut i = 0;
        while i < n {
            let batch: Vec<_> = (i..(i + 32).min(n))
                .map(|k| {
                    r.tenant_req(Method::PUT, tenant, &format!("/v1/kv/seed-{k:06}"))
                        .body(format!("value-{k}"))
                        .send()
                })
                .collect();
            for resp in futures_util::future::join_all(batch).await {
                assert!(resp.expect("seed").status().is_success());
            }
            i += 32;
        }
    }

    async fn start_move(&self, tenant: &str, body: Value) -> cellplane_api::MoveWithJob {
        let r = self
            .app
            .req(Method::POST, &format!("/v1/tenants/{tenant}/move"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 202, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn get_move(&self, id: &str) -> cellplane_api::Move {
        self.app
            .admin
            .get(&format!("/v1/moves/{id}"))
            .await
            .unwrap()
    }

    /// Waits until the move has ended; returns it.
    async fn ended(&self, id: &str) -> cellplane_api::Move {
        let m = eventually(MOVE_TIMEOUT, || async {
            let m = self.get_move(id).await;
            (m.state != cellplane_api::MoveState::Running).then_some(m)
        })
        .await;
        match m {
            Ok(m) => m,
            Err(_) => {
                let m = self.get_move(id).await;
                panic!(
                    "move {id} still running: {m:?}\n{}",
                    self.app.job_log(&m.job_id).await
                )
            }
        }
    }

    async fn used(&self, cell: &str) -> (u64, u64) {
        let c = self.app.cell(cell).await;
        (c.used.tenants, c.used.units)
    }

    async fn cell_of(&self, tenant: &str) -> String {
        let t = self.app.admin.get_tenant(tenant).await.unwrap();
        t.environments[0].cell_id.clone().unwrap()
    }
}

#[derive(Default, Debug)]
struct Stats {
    ok: u64,
    failed: Vec<String>,
    /// key → the last value a 2xx acknowledged.
    acked: BTreeMap<String, String>,
    /// (start, Unix ms; latency, µs) of every request.
    samples: Vec<(i64, u64)>,
}

/// Steady mixed read/write load on one tenant, spread over the routers: `workers` loops,
/// each a request every `every`. Reads ask for keys already acknowledged and check the
/// value.
struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<Stats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(tenant: &str, routers: &[&TestRouter], workers: usize, every: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let r = routers[w % routers.len()];
            let (http, url) = (r.http.clone(), r.url.clone());
            let (stop, stats, tenant) = (stop.clone(), stats.clone(), tenant.to_string());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                let mut i = 0u64;
                let host = format!("{tenant}.localhost");
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    i += 1;
                    let write = i.is_multiple_of(2) || i < 4;
                    let key = format!("load-{w}-{}", i % 200);
                    let t0 = std::time::Instant::now();
                    let at = chrono::Utc::now().timestamp_millis();
                    let (result, value) = if write {
                        let value = format!("{w}:{i}");
                        let res = http
                            .put(format!("{url}/v1/kv/{key}"))
                            .header("host", &host)
                            .body(value.clone())
                            .send()
                            .await;
                        (res, Some(value))
                    } else {
                        let key = format!("load-{w}-{}", (i - 1) % 200);
                        let res = http
                            .get(format!("{url}/v1/kv/{key}"))
                            .header("host", &host)
                            .send()
                            .await;
                        (res, None)
                    };
                    let took = t0.elapsed().as_micros() as u64;
                    let mut st = stats.lock().unwrap();
                    st.samples.push((at, took));
                    match result {
                        Ok(r) if r.status().is_success() => {
                            st.ok += 1;
                            if let Some(v) = value {
                                st.acked.insert(key, v);
                            }
                        }
                        Ok(r) => {
                            let status = r.status();
                            st.failed.push(format!("{key}: {status}"));
                        }
                        Err(e) => st.failed.push(format!("{key}: {e}")),
                    }
                }
            }));
        }
        Load { stop, stats, tasks }
    }

    async fn finish(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.stats).unwrap().into_inner().unwrap()
    }
}

/// Every acknowledged write of the load, and every seeded key, read back through a router.
async fn assert_readable(r: &TestRouter, tenant: &str, stats: &Stats, seeded: usize, cell: &str) {
    let mut expect: Vec<(String, String)> = stats
        .acked
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    expect.extend((0..seeded).map(|k| (format!("seed-{k:06}"), format!("value-{k}"))));
    for chunk in expect.chunks(64) {
        let reads: Vec<_> = chunk
            .iter()
            .map(|(k, _)| {
                r.tenant_req(Method::GET, tenant, &format!("/v1/kv/{k}"))
                    .send()
            })
            .collect();
        for ((k, v), resp) in chunk
            .iter()
            .zip(futures_util::future::join_all(reads).await)
        {
            let resp = resp.unwrap();
            assert_eq!(resp.status(), 200, "{tenant}/{k}");
            assert_eq!(
                resp.headers()["x-cell-id"],
                cell,
                "{tenant}/{k} served by {cell}"
            );
            assert_eq!(&resp.text().await.unwrap(), v, "{tenant}/{k}");
        }
    }
}

fn options() -> AppOptions {
    AppOptions::default()
        .with("CELLPLANE__MOVES__PURGE_GRACE_SECS", "2")
        .with("CELLPLANE__ROUTING__ROUTER_LIVE_SECS", "30")
}

// Under steady load through two routers (the moving tenant and its neighbour on the same
// source cell, ~300 requests/s each), a pooled → pooled move of a 10,000-key tenant: no
// request fails for either tenant, every acknowledged write is read back from the target,
// checksums are equal, both routers acked the hold, and the source is purged after the
// grace period with its capacity given back.
both_backends!(a_move_under_load_fails_no_request, |b| async move {
    let f = fleet(b, options(), 2, 10_000).await;
    assert_eq!(f.cell_of("acme").await, "pool-1");
    assert_eq!(f.cell_of("globex").await, "pool-1");
    let before = (f.used("pool-1").await, f.used("pool-2").await);
    let rs: Vec<&TestRouter> = f.routers.iter().collect();
    let acme = Load::start("acme", &rs, 6, Duration::from_millis(20));
    let globex = Load::start("globex", &rs, 6, Duration::from_millis(20));
    // Load is flowing before the move starts.
    eventually(Duration::from_secs(10), || async {
        (acme.stats.lock().unwrap().ok > 100).then_some(())
    })
    .await
    .unwrap();
    let started = f
        .start_move("acme", json!({"env": "prod", "target_cell_id": "pool-2"}))
        .await;
    assert_eq!(started.move_.state, cellplane_api::MoveState::Running);
    assert_eq!(started.job.kind, "tenant.move");
    // The target's capacity is reserved at once.
    assert_eq!(f.used("pool-2").await, (before.1 .0 + 1, before.1 .1 + 1));
    let m = f.ended(&started.move_.move_id).await;
    let acme = acme.finish().await;
    let globex = globex.finish().await;
    assert_eq!(
        m.state,
        cellplane_api::MoveState::Succeeded,
        "{m:?}\n{}",
        f.app.job_log(&m.job_id).await
    );
    assert!(acme.failed.is_empty(), "acme failures: {:?}", acme.failed);
    assert!(
        globex.failed.is_empty(),
        "globex failures: {:?}",
        globex.failed
    );
    assert!(
        acme.ok > 500 && globex.ok > 500,
        "{} {}",
        acme.ok,
        globex.ok
    );
    // Evidence: rows, rounds, hold, both routers' acks, equal checksums, the purge.
    assert!(m.rows_copied >= 10_000, "{m:?}");
    assert!(m.bytes_copied > 0 && m.delta_rounds >= 2, "{m:?}");
    let hold = m.hold_ms.expect("hold measured");
    assert!(hold < 5_000, "hold {hold} ms");
    let ev = &m.evidence;
    assert_eq!(ev["router_acks"].as_array().unwrap().len(), 2, "{ev}");
    assert_eq!(ev["checksums"]["source"], ev["checksums"]["target"], "{ev}");
    assert!(ev["checksums"]["source"]["rows"].as_i64().unwrap() >= 10_000);
    assert!(ev["purged_rows"].as_i64().unwrap() >= 10_000, "{ev}");
    // Placement and capacity: acme is on pool-2; pool-1 gave its share back after the purge.
    assert_eq!(f.cell_of("acme").await, "pool-2");
    assert_eq!(f.used("pool-1").await, (before.0 .0 - 1, before.0 .1 - 1));
    assert_eq!(f.used("pool-2").await, (before.1 .0 + 1, before.1 .1 + 1));
    // Every acknowledged write is on the target, key by key; globex still on pool-1.
    assert_readable(&f.routers[1], "acme", &acme, 10_000, "pool-2").await;
    assert_readable(&f.routers[0], "globex", &globex, 0, "pool-1").await;
    // The source no longer has acme's data.
    let src = f.app.cell("pool-1").await.outputs["endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let r = reqwest::Client::new()
        .get(format!("{src}/v1/kv/seed-000001"))
        .header("x-tenant-id", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "purged from the source");
    // The audit trail tells the story with the evidence.
    let audit: Value = f
        .app
        .admin
        .get("/v1/audit?tenant_id=acme&limit=1000")
        .await
        .unwrap();
    let types: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["event_type"].as_str().unwrap())
        .collect();
    for t in [
        "TENANCY_MOVE_REQUESTED",
        "ROUTE_HELD",
        "ROUTE_FLIPPED",
        "TENANCY_MOVED",
        "TENANCY_MOVE_SOURCE_PURGED",
    ] {
        assert!(types.contains(&t), "{t} in {types:?}");
    }
    let moved = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["event_type"] == "TENANCY_MOVED")
        .unwrap();
    assert_eq!(moved["payload"]["hold_ms"], json!(hold));
    assert!(f.app.audit_verify_ok().await);
    // Consumers see it as a public event (docs/events.md), without the internal evidence.
    let events: Value = f
        .app
        .admin
        .get("/v1/events?type=dev.cellplane.tenancy.moved.v1&subject=tenant/acme")
        .await
        .unwrap();
    let data = &events["items"][0]["data"];
    assert_eq!(data["move_id"], json!(m.move_id), "{events}");
    assert_eq!(data["to_cell_id"], "pool-2");
    assert_eq!(data["hold_ms"], json!(hold));
    assert!(data.get("evidence").is_none(), "{data}");
    // The listing finds it by tenant and state.
    let list: Value = f
        .app
        .admin
        .get("/v1/moves?tenant_id=acme&state=succeeded")
        .await
        .unwrap();
    assert_eq!(list["items"][0]["move_id"], json!(m.move_id));
});

async fn stop_cont(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// True once the process is stopped (state `T` in /proc).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
        .unwrap_or(false)
}

// The target cell dies during the copy (the control plane is stopped at the named step
// `copy`, the target's process is killed, the control plane goes on): the move rolls
// back, the tenant is served from the source throughout, and no capacity leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_dies_during_the_copy_rolls_the_move_back() {
    let f = fleet(
        Backend::Sqlite,
        options().with("CELLPLANE__JOBS__FAILPOINTS", "tenant.move/copy=stop@1"),
        1,
        2_000,
    )
    .await;
    let before = (f.used("pool-1").await, f.used("pool-2").await);
    let rs: Vec<&TestRouter> = f.routers.iter().collect();
    let load = Load::start("acme", &rs, 4, Duration::from_millis(20));
    let started = f
        .start_move("acme", json!({"env": "prod", "target_cell_id": "pool-2"}))
        .await;
    let cp = f.app.pid().unwrap();
    eventually(MOVE_TIMEOUT, || async { is_stopped(cp).then_some(()) })
        .await
        .expect("the control plane stops at tenant.move/copy");
    let target_pid: i32 =
        std::fs::read_to_string(f.app.cell_dir("pool-2").join("run/sample-cell.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(target_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    stop_cont(cp, nix::sys::signal::Signal::SIGCONT).await;
    let m = f.ended(&started.move_.move_id).await;
    let stats = load.finish().await;
    assert_eq!(m.state, cellplane_api::MoveState::RolledBack, "{m:?}");
    assert!(m.error.as_deref().unwrap_or("").contains("pool-2"), "{m:?}");
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(f.cell_of("acme").await, "pool-1");
    assert_eq!(
        (f.used("pool-1").await, f.used("pool-2").await),
        before,
        "no capacity leaked"
    );
    assert_readable(&f.routers[0], "acme", &stats, 2_000, "pool-1").await;
    // The source takes writes (it was never frozen, or was unfrozen).
    let r = f.routers[0]
        .tenant_req(Method::PUT, "acme", "/v1/kv/after")
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

// A router stopped (SIGSTOP) while the route is held never acks: the move waits, then
// aborts at the ack timeout with the hold released, and once the router resumes it
// serves the tenant from the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_router_makes_the_move_abort_at_the_ack_timeout() {
    let f = fleet(
        Backend::Sqlite,
        options().with("CELLPLANE__MOVES__ACK_TIMEOUT_MS", "3000"),
        2,
        500,
    )
    .await;
    let before = (f.used("pool-1").await, f.used("pool-2").await);
    let stopped = f.routers[1].pid().unwrap();
    stop_cont(stopped, nix::sys::signal::Signal::SIGSTOP).await;
    let started = f
        .start_move("acme", json!({"env": "prod", "target_cell_id": "pool-2"}))
        .await;
    let m = f.ended(&started.move_.move_id).await;
    stop_cont(stopped, nix::sys::signal::Signal::SIGCONT).await;
    assert_eq!(m.state, cellplane_api::MoveState::RolledBack, "{m:?}");
    let err = m.error.clone().unwrap_or_default();
    assert!(
        err.contains("await-acks") && err.contains("did not ack"),
        "{err}"
    );
    assert_eq!(
        (f.used("pool-1").await, f.used("pool-2").await),
        before,
        "no capacity leaked"
    );
    let route: Value = f.app.admin.get("/v1/routes/acme/prod").await.unwrap();
    assert_eq!(route["mode"], "serve", "{route}");
    assert_eq!(route["cell_id"], "pool-1", "{route}");
    for r in &f.routers {
        r.wait_revision(f.app.routing_revision().await).await;
        let resp = r
            .tenant_req(Method::GET, "acme", "/v1/kv/seed-000001")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-cell-id"], "pool-1");
    }
}

// A delta that does not converge aborts before any hold: the route is never held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_that_does_not_converge_aborts_without_holding() {
    // A threshold of 0 is never reached: the abort path, deterministically.
    let f = fleet(
        Backend::Sqlite,
        options()
            .with("CELLPLANE__MOVES__DELTA_THRESHOLD", "0")
            .with("CELLPLANE__MOVES__CONVERGE_TIMEOUT_SECS", "2"),
        1,
        200,
    )
    .await;
    let rs: Vec<&TestRouter> = f.routers.iter().collect();
    let load = Load::start("acme", &rs, 4, Duration::from_millis(5));
    let started = f
        .start_move("acme", json!({"env": "prod", "target_cell_id": "pool-2"}))
        .await;
    let m = f.ended(&started.move_.move_id).await;
    let stats = load.finish().await;
    assert_eq!(m.state, cellplane_api::MoveState::RolledBack);
    let err = m.error.clone().unwrap_or_default();
    assert!(
        err.contains("did not converge") && err.contains("never held"),
        "{err}"
    );
    assert!(m.delta_rounds >= 1 && m.hold_ms.is_none(), "{m:?}");
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    let held = f
        .app
        .sql_i64("SELECT COUNT(*) FROM tenant_audit WHERE event_type = 'ROUTE_HELD'")
        .await
        .unwrap();
    assert_eq!(held, 0, "the route was never held");
}

// Refusals: each is a 4xx naming the reason, and reserves nothing; while a move runs, a
// second move of the environment and a destroy of either cell are 409 naming its job;
// a cancel before the flip rolls back.
both_backends!(moves_that_cannot_run_are_refused, |b| async move {
    let f = fleet(
        b,
        options().with("CELLPLANE__JOBS__FAILPOINTS", "tenant.move/copy=pause"),
        1,
        10,
    )
    .await;
    let before = (
        f.used("pool-1").await,
        f.used("pool-2").await,
        f.used("pool-us").await,
    );
    let post = |body: Value| {
        f.app
            .req(Method::POST, "/v1/tenants/acme/move")
            .json(&body)
            .send()
    };
    let r = post(json!({"env": "prod", "target_cell_id": "ghost"}))
        .await
        .unwrap();
    let p = expect_problem(r, 400).await;
    assert!(p.to_string().contains("target_cell_id"), "{p}");
    let r = post(json!({"env": "prod"})).await.unwrap();
    expect_problem(r, 400).await;
    let r = post(json!({"env": "prod", "target_cell_id": "pool-2", "target": "dedicated"}))
        .await
        .unwrap();
    expect_problem(r, 400).await;
    let r = post(json!({"env": "prod", "target_cell_id": "pool-1"}))
        .await
        .unwrap();
    expect_problem(r, 409).await;
    let r = post(json!({"env": "prod", "target_cell_id": "pool-us"}))
        .await
        .unwrap();
    let p = expect_problem(r, 409).await;
    assert!(
        p["detail"].as_str().unwrap().contains("in-region-only"),
        "{p}"
    );
    let r = post(json!({"env": "staging", "target_cell_id": "pool-2"}))
        .await
        .unwrap();
    expect_problem(r, 404).await;
    // A cell without room.
    let r = f
        .app
        .req(Method::PATCH, "/v1/cells/pool-2")
        .json(&json!({"capacity": {"tenants": 10, "units": 0}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let r = post(json!({"env": "prod", "target_cell_id": "pool-2"}))
        .await
        .unwrap();
    let p = expect_problem(r, 409).await;
    assert!(p["detail"].as_str().unwrap().contains("no room"), "{p}");
    let r = f
        .app
        .req(Method::PATCH, "/v1/cells/pool-2")
        .json(&json!({"capacity": {"tenants": 10, "units": 10}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(
        (
            f.used("pool-1").await,
            f.used("pool-2").await,
            f.used("pool-us").await
        ),
        before,
        "refusals reserve nothing"
    );
    // A running move (paused at its copy step).
    let started = f
        .start_move("acme", json!({"env": "prod", "target_cell_id": "pool-2"}))
        .await;
    let job = started.job.job_id.clone();
    let r = post(json!({"env": "prod", "target_cell_id": "pool-2"}))
        .await
        .unwrap();
    let p = expect_problem(r, 409).await;
    assert!(p["detail"].as_str().unwrap().contains(&job), "{p}");
    for cell in ["pool-1", "pool-2"] {
        let r = f
            .app
            .req(Method::DELETE, &format!("/v1/cells/{cell}"))
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 409).await;
        assert!(p["detail"].as_str().unwrap().contains(&job), "{cell}: {p}");
    }
    let r = f
        .app
        .req(Method::POST, "/v1/tenants/acme/suspend")
        .send()
        .await
        .unwrap();
    let p = expect_problem(r, 409).await;
    assert!(p["detail"].as_str().unwrap().contains(&job), "{p}");
    // A draining target is refused for the next move (another tenant).
    let r = f
        .app
        .req(Method::POST, "/v1/cells/pool-2/drain")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let r = f
        .app
        .req(Method::POST, "/v1/tenants/globex/move")
        .json(&json!({"env": "prod", "target_cell_id": "pool-2"}))
        .send()
        .await
        .unwrap();
    let p = expect_problem(r, 409).await;
    assert!(p["detail"].as_str().unwrap().contains("draining"), "{p}");
    // Cancel before the flip: rolled back, capacity given back.
    let r = f
        .app
        .req(Method::POST, &format!("/v1/jobs/{job}/cancel"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let m = f.ended(&started.move_.move_id).await;
    assert_eq!(m.state, cellplane_api::MoveState::RolledBack, "{m:?}");
    assert_eq!(
        (f.used("pool-1").await, f.used("pool-2").await),
        (before.0, before.1),
        "the cancelled move gave its reservation back"
    );
    assert_eq!(f.cell_of("acme").await, "pool-1");
});

// The control plane killed at a named step, before or after the flip, then restarted:
// the move finishes (never half-routed: the route is on the source or on the target,
// serving), and the data is whole on the tenant's cell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_killed_at_each_step_finishes_after_a_restart() {
    // Every step of the move (before it runs, or after its effect committed and before
    // the job recorded it), and the purge that follows the flip.
    let steps = [
        "tenant.move/check/after",
        "tenant.move/stamp-target/after",
        "tenant.move/reserve/after",
        "tenant.move/copy",
        "tenant.move/copy/after",
        "tenant.move/catch-up/after",
        "tenant.move/hold",
        "tenant.move/hold/after",
        "tenant.move/await-acks/after",
        "tenant.move/freeze",
        "tenant.move/freeze/after",
        "tenant.move/final-delta/after",
        "tenant.move/verify/after",
        "tenant.move/flip",
        "tenant.move/flip/after",
        "tenant.move-purge/purge-source/after",
    ];
    // A short job lease: the restarted control plane takes the killed one's job sooner.
    let mut f = fleet(
        Backend::Sqlite,
        options().with("CELLPLANE__JOBS__LEASE_SECS", "4"),
        1,
        300,
    )
    .await;
    let mut from = "pool-1";
    for step in steps {
        let to = if from == "pool-1" { "pool-2" } else { "pool-1" };
        f.app.options = f
            .app
            .options
            .clone()
            .with("CELLPLANE__JOBS__FAILPOINTS", &format!("{step}=kill@1"));
        f.app.kill9();
        f.app.start_same_address().await.unwrap();
        let started = f
            .start_move("acme", json!({"env": "prod", "target_cell_id": to}))
            .await;
        assert!(
            f.app.wait_exit(MOVE_TIMEOUT).await,
            "the control plane dies at {step}"
        );
        f.app.start_same_address().await.unwrap();
        let m = f.ended(&started.move_.move_id).await;
        assert_eq!(
            m.state,
            cellplane_api::MoveState::Succeeded,
            "killed at {step}: {m:?}\n{}",
            f.app.job_log(&m.job_id).await
        );
        let route: Value = f.app.admin.get("/v1/routes/acme/prod").await.unwrap();
        assert_eq!(route["mode"], "serve", "{step}: {route}");
        assert_eq!(route["cell_id"], to, "{step}: {route}");
        f.routers[0]
            .wait_revision(f.app.routing_revision().await)
            .await;
        assert_readable(&f.routers[0], "acme", &Stats::default(), 300, to).await;
        from = to;
    }
}

// pooled → dedicated by a profile change (`PATCH … {"profile": "st-dedicated"}`; the
// runbook does the same with `"target": "dedicated"`): the job stamps the tenant's
// dedicated cell and moves there; the tenant's profile and placement show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_a_dedicated_cell_stamps_it_in_the_same_job() {
    let f = fleet(Backend::Sqlite, options(), 1, 500).await;
    // A tenant-admin may not change its profile (it moves cells).
    let own = f
        .app
        .admin
        .post::<_, Value>(
            "/v1/tokens",
            &json!({"role": "tenant-admin", "tenant_id": "acme"}),
        )
        .await
        .unwrap();
    let r = reqwest::Client::new()
        .patch(format!("{}/v1/tenants/acme", f.app.url))
        .bearer_auth(own["token"].as_str().unwrap())
        .json(&json!({"profile": "st-dedicated"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 403).await;
    let r = f
        .app
        .req(Method::PATCH, "/v1/tenants/acme")
        .json(&json!({"profile": "st-dedicated", "billing": {"plan": "x"}}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    let r = f
        .app
        .req(Method::PATCH, "/v1/tenants/acme")
        .json(&json!({"profile": "st-dedicated"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let started: cellplane_api::MoveWithJob = r.json().await.unwrap();
    assert_eq!(started.move_.target_cell_id, "acme-ded");
    assert!(started.move_.dedicated);
    let m = f.ended(&started.move_.move_id).await;
    assert_eq!(
        m.state,
        cellplane_api::MoveState::Succeeded,
        "{m:?}\n{}",
        f.app.job_log(&m.job_id).await
    );
    let t = f.app.admin.get_tenant("acme").await.unwrap();
    assert_eq!(t.profile, cellplane_api::Profile::StDedicated);
    assert_eq!(t.environments[0].cell_id.as_deref(), Some("acme-ded"));
    let cell = f.app.cell("acme-ded").await;
    assert_eq!(cell.tier, cellplane_api::Tier::Dedicated);
    assert_eq!((cell.used.tenants, cell.used.units), (1, 1));
    let tv = serde_json::to_value(&t).unwrap();
    assert_eq!(tv["placement"]["prod"]["cell_id"], "acme-ded", "{tv}");
    f.routers[0]
        .wait_revision(f.app.routing_revision().await)
        .await;
    assert_readable(&f.routers[0], "acme", &Stats::default(), 500, "acme-ded").await;
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

// The move benchmark (bench/move/run.sh runs it with release binaries): MOVES moves of a
// KEYS-key tenant back and forth between two pooled cells under steady load through two
// routers (the moving tenant and a neighbour, ~300 requests/s each). Prints a markdown
// table: hold p50/p99/max against the 250 ms target, failed requests, request latency
// p99 during holds against outside them (the baseline, same run), copy throughput, move
// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: bench/move/run.sh"]
async fn bench_moves() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (moves, keys) = (env("MOVES", 20), env("KEYS", 10_000));
    let backend = match std::env::var("BACKEND").as_deref() {
        Ok("postgres") => Backend::Postgres,
        _ => Backend::Sqlite,
    };
    let f = fleet(backend, options(), 2, keys).await;
    let rs: Vec<&TestRouter> = f.routers.iter().collect();
    let acme = Load::start("acme", &rs, 6, Duration::from_millis(20));
    let globex = Load::start("globex", &rs, 6, Duration::from_millis(20));
    let mut done = Vec::new();
    let mut to = "pool-2";
    for _ in 0..moves {
        let t0 = std::time::Instant::now();
        let started = f
            .start_move("acme", json!({"env": "prod", "target_cell_id": to}))
            .await;
        // The tenant is moved at the flip; the purge follows after the grace period.
        let m = eventually(MOVE_TIMEOUT, || async {
            let m = f.get_move(&started.move_.move_id).await;
            (m.hold_ms.is_some() || m.state != cellplane_api::MoveState::Running).then_some(m)
        })
        .await
        .unwrap();
        let took = t0.elapsed();
        assert!(m.hold_ms.is_some(), "{m:?}");
        let m = f.ended(&m.move_id).await;
        assert_eq!(m.state, cellplane_api::MoveState::Succeeded, "{m:?}");
        done.push((m, took));
        to = if to == "pool-2" { "pool-1" } else { "pool-2" };
    }
    let acme = acme.finish().await;
    let globex = globex.finish().await;
    let holds: Vec<(i64, i64)> = done
        .iter()
        .map(|(m, _)| {
            let at = m.evidence["hold_at_ms"].as_i64().unwrap();
            (at, at + m.hold_ms.unwrap())
        })
        .collect();
    let mut during = Vec::new();
    let mut outside = Vec::new();
    for (at, us) in acme.samples.iter().chain(globex.samples.iter()) {
        if holds.iter().any(|(a, b)| at >= a && at <= b) {
            during.push(*us);
        } else {
            outside.push(*us);
        }
    }
    let mut hold: Vec<u64> = done
        .iter()
        .map(|(m, _)| m.hold_ms.unwrap() as u64)
        .collect();
    let mut total: Vec<u64> = done.iter().map(|(_, t)| t.as_millis() as u64).collect();
    let rate: Vec<f64> = done
        .iter()
        .map(|(m, _)| {
            let r = &m.evidence["rounds"][0];
            r["records"].as_f64().unwrap() / (r["ms"].as_f64().unwrap().max(1.0) / 1000.0)
        })
        .collect();
    let mut rate_sorted: Vec<u64> = rate.iter().map(|r| *r as u64).collect();
    let failed = acme.failed.len() + globex.failed.len();
    let (h50, h99, hmax) = (
        pct(&mut hold, 0.5),
        pct(&mut hold, 0.99),
        pct(&mut hold, 1.0),
    );
    let (d99, o99) = (pct(&mut during, 0.99), pct(&mut outside, 0.99));
    println!("\n### {moves} moves of a {keys}-key tenant ({backend:?}, 2 routers, ~300 req/s per tenant)\n");
    println!("| measure | value | baseline / target | ratio |");
    println!("| --- | --- | --- | --- |");
    println!("| hold p50 / p99 / max | {h50} / {h99} / {hmax} ms | target p99 ≤ 250 ms (stretch 100) | {:.2} |", h99 as f64 / 250.0);
    println!(
        "| requests failed | {failed} of {} | 0 | - |",
        acme.ok + globex.ok + failed as u64
    );
    println!("| request latency p99 during holds ({} requests) | {:.1} ms | outside holds ({} requests): {:.1} ms | {:.1}× |",
        during.len(), d99 as f64 / 1000.0, outside.len(), o99 as f64 / 1000.0, d99 as f64 / o99.max(1) as f64);
    println!(
        "| snapshot copy (rows/s) p50 / min | {} / {} | target ≥ 50,000 | {:.2} |",
        pct(&mut rate_sorted, 0.5),
        pct(&mut rate_sorted, 0.0),
        pct(&mut rate_sorted, 0.5) as f64 / 50_000.0
    );
    println!(
        "| request → flip (move time) p50 / max | {} / {} ms | - | - |",
        pct(&mut total, 0.5),
        pct(&mut total, 1.0)
    );
    // Where the hold goes: p50 of the ms from the hold to the end of each cutover step.
    let phase = |k: &str| {
        let mut v: Vec<u64> = done
            .iter()
            .filter_map(|(m, _)| m.evidence["cutover"][k].as_u64())
            .collect();
        pct(&mut v, 0.5)
    };
    println!(
        "| hold breakdown p50, ms after the hold: routers drained / source frozen / final delta copied / checksums compared / flip | {} / {} / {} / {} / {h50} | - | - |",
        phase("acked"),
        phase("frozen"),
        phase("final_delta"),
        phase("verified")
    );
    assert_eq!(failed, 0, "{:?} {:?}", acme.failed, globex.failed);
}

// `cell drain --move`: every tenant environment leaves the cell (two moves at a time, to
// cells placement chooses), requests keep being answered, and the cell ends `drained`
// with nothing left on it once the sources are purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_cell_moves_every_tenant_off_it() {
    let f = fleet(Backend::Sqlite, options(), 1, 1_000).await;
    let rs: Vec<&TestRouter> = f.routers.iter().collect();
    let load = Load::start("globex", &rs, 4, Duration::from_millis(20));
    let r = f
        .app
        .req(Method::POST, "/v1/cells/pool-1/drain?move=true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let out: cellplane_api::CellWithJob = r.json().await.unwrap();
    assert_eq!(out.cell.state, cellplane_api::CellState::Draining);
    let job = out.job.expect("a drain job");
    assert_eq!(job.kind, "cell.drain");
    // The drained cell cannot be destroyed while its drain runs.
    let r = f
        .app
        .req(Method::DELETE, "/v1/cells/pool-1")
        .send()
        .await
        .unwrap();
    let p = expect_problem(r, 409).await;
    assert!(p["detail"].as_str().unwrap().contains("job-"), "{p}");
    let done = f.app.wait_job(&job.job_id, MOVE_TIMEOUT).await;
    let stats = load.finish().await;
    assert_eq!(
        done.state,
        cellplane_api::JobState::Succeeded,
        "{done:?}\n{}",
        f.app.job_log(&job.job_id).await
    );
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(
        f.app.cell("pool-1").await.state,
        cellplane_api::CellState::Drained
    );
    for t in ["acme", "globex"] {
        // In-region-only residency: pool-2, never the us-east-1 cell.
        assert_eq!(f.cell_of(t).await, "pool-2", "{t}");
    }
    // Once the purges ran, nothing is held on the drained cell.
    eventually(MOVE_TIMEOUT, || async {
        (f.used("pool-1").await == (0, 0)).then_some(())
    })
    .await
    .unwrap();
    f.routers[0]
        .wait_revision(f.app.routing_revision().await)
        .await;
    assert_readable(&f.routers[0], "acme", &Stats::default(), 1_000, "pool-2").await;
    assert_readable(&f.routers[0], "globex", &stats, 0, "pool-2").await;
}

// A router paused for longer than its lease is excluded and the move goes on without it;
// when it resumes, its first request of the moved tenant goes to the target (it takes the
// current table before serving a route again), never to the frozen source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_back_from_a_pause_serves_the_moved_tenant_from_the_target() {
    let f = fleet(
        Backend::Sqlite,
        options()
            .with("CELLPLANE__ROUTING__ROUTER_LIVE_SECS", "3")
            .with("CELLPLANE__MOVES__PURGE_GRACE_SECS", "120"),
        1,
        200,
    )
    .await;
    let token = f.app.token("router").await;
    let paused = TestRouter::spawn(
        &f.app.url,
        &token,
        &["--heartbeat-secs", "1", "--router-lease-secs", "2"],
    )
    .await;
    paused.wait_revision(f.app.routing_revision().await).await;
    let r = paused
        .tenant_req(Method::GET, "acme", "/v1/kv/seed-000001")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cell-id"], "pool-1");
    let pid = paused.pid().unwrap();
    stop_cont(pid, nix::sys::signal::Signal::SIGSTOP).await;
    // The control plane stops counting it once its lease has run out.
    eventually(Duration::from_secs(30), || async {
        let v: Value = f.app.admin.get("/v1/routers").await.ok()?;
        let live = v["items"]
            .as_array()?
            .iter()
            .filter(|r| r["live"] == true)
            .count();
        (live == 1).then_some(())
    })
    .await
    .expect("the paused router drops out");
    let started = f
        .start_move("acme", json!({"env": "prod", "target_cell_id": "pool-2"}))
        .await;
    let m = eventually(MOVE_TIMEOUT, || async {
        let m = f.get_move(&started.move_.move_id).await;
        (m.hold_ms.is_some() || m.state != cellplane_api::MoveState::Running).then_some(m)
    })
    .await
    .unwrap();
    assert!(m.hold_ms.is_some(), "{m:?}");
    assert_eq!(m.evidence["router_acks"].as_array().unwrap().len(), 1);
    stop_cont(pid, nix::sys::signal::Signal::SIGCONT).await;
    let r = paused
        .tenant_req(Method::GET, "acme", "/v1/kv/seed-000001")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-cell-id"],
        "pool-2",
        "the first request after the pause goes to the target"
    );
    let r = paused
        .tenant_req(Method::PUT, "acme", "/v1/kv/after-pause")
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(r.headers()["x-cell-id"], "pool-2");
}
