//! Release rollouts end to end: real terraform re-applying `local` cells with the release's
//! app version and variables, sample-cells under steady traffic through a real router, the
//! built-in metrics provider (router heartbeats), gates deciding, rollback, actions, crash
//! and bad input.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Cells: `canary-1` (labelled `canary=true`), `pool-1`, `pool-2`; one tenant on each.
const CELLS: [&str; 3] = ["canary-1", "pool-1", "pool-2"];
const TENANTS: [&str; 3] = ["t-canary", "t-one", "t-two"];

struct Fleet {
    app: TestApp,
    router: TestRouter,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// The cells at app version `v1`, the tenants placed one per cell, a router reporting
    /// every second, and traffic on `loaded` tenants (4 loops each).
    async fn start(b: Backend, options: AppOptions, loaded: &[&str]) -> Fleet {
        // Traffic summed in one-second slots: windows of a few seconds hold whole slots.
        let options = options.with("CELLPLANE__ROUTING__CELL_SLOT_SECS", "1");
        let app = TestApp::spawn_with(b, options).await;
        let mut jobs = Vec::new();
        for c in CELLS {
            let labels = if c == "canary-1" {
                json!({"canary": "true"})
            } else {
                json!({})
            };
            let out = app
                .create_cell(
                    json!({"cell_id": c, "region": "eu-west-1", "tier": "pooled",
                    "template": "local", "capacity": {"tenants": 5, "units": 5},
                    "labels": labels, "app_version": "v1"}),
                )
                .await;
            jobs.push(out.job.unwrap().job_id);
        }
        for j in jobs {
            let done = app.wait_job(&j, Duration::from_secs(120)).await;
            assert_eq!(done.state, cellplane_api::JobState::Succeeded, "{done:?}");
        }
        app.create_org("acme-corp").await;
        for (t, c) in TENANTS.iter().zip(CELLS) {
            app.create_tenant(t, "acme-corp").await;
            app.lifecycle(t, "activate").await;
            let got = app.admin.get_tenant(t).await.unwrap();
            assert_eq!(got.environments[0].cell_id.as_deref(), Some(c));
        }
        let token = app.token("router").await;
        let router = TestRouter::spawn(&app.url, &token, &["--heartbeat-secs", "1"]).await;
        router.wait_revision(app.routing_revision().await).await;
        let mut f = Fleet {
            app,
            router,
            stop: Arc::new(AtomicBool::new(false)),
            tasks: Vec::new(),
        };
        for t in loaded {
            f.load(t);
        }
        f
    }

    /// Steady traffic (4 loops) on a tenant through the router.
    fn load(&mut self, tenant: &str) {
        for _ in 0..4 {
            let (http, url, stop) = (
                self.router.http.clone(),
                self.router.url.clone(),
                self.stop.clone(),
            );
            let host = format!("{tenant}.localhost");
            self.tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = http
                        .get(format!("{url}/v1/kv/probe"))
                        .header("host", &host)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
    }

    async fn stop_traffic(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    /// The app version a tenant's requests are answered with by its cell, through the
    /// router. A cell whose process was just replaced may be answered for by the router
    /// itself (no version) until its health checks pass again: asked until the cell
    /// answers.
    async fn version_of(&self, tenant: &str) -> String {
        eventually(Duration::from_secs(30), || async {
            let r = self
                .router
                .tenant_req(Method::GET, tenant, "/v1/kv/probe")
                .send()
                .await
                .ok()?;
            r.headers()
                .get("x-app-version")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .await
        .unwrap_or_else(|_| panic!("{tenant}'s cell never answered through the router"))
    }

    /// Creates a release (201) and waits until it stops running: ended, or paused.
    async fn run(&self, body: Value) -> Value {
        let id = body["release_id"].as_str().unwrap().to_string();
        let (status, out) = self.create(body).await;
        assert_eq!(status, 201, "{out:#}");
        self.wait_state(
            &id,
            &["succeeded", "rolled_back", "failed", "paused", "aborted"],
            Duration::from_secs(180),
        )
        .await
    }

    async fn create(&self, body: Value) -> (u16, Value) {
        let r = self
            .app
            .req(Method::POST, "/v1/releases")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn release(&self, id: &str) -> Value {
        self.app
            .admin
            .get(&format!("/v1/releases/{id}"))
            .await
            .unwrap()
    }

    /// Waits until the release is in one of `states`.
    async fn wait_state(&self, id: &str, states: &[&str], timeout: Duration) -> Value {
        let got = eventually(timeout, || async {
            let r = self.release(id).await;
            states.iter().any(|s| r["state"] == *s).then_some(r)
        })
        .await;
        match got {
            Ok(r) => r,
            Err(_) => panic!(
                "release {id} not in {states:?}: {:#}\n{}",
                self.release(id).await,
                self.app.log()
            ),
        }
    }

    async fn action(&self, id: &str, action: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .app
            .req(Method::POST, &format!("/v1/releases/{id}/{action}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn audit_events(&self, id: &str) -> Vec<String> {
        let a: Value = self
            .app
            .admin
            .get(&format!("/v1/audit?target=release/{id}&limit=1000"))
            .await
            .unwrap();
        a["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["event_type"].as_str().unwrap().to_string())
            .collect()
    }

    /// `cell.apply` jobs each cell ran.
    async fn applies(&self, cell: &str) -> i64 {
        self.app
            .sql_i64(&format!(
                "SELECT COUNT(*) FROM jobs WHERE kind = 'cell.apply' AND target = 'cell/{cell}'"
            ))
            .await
            .unwrap()
    }
}

/// The public events of a release, in order, each checked against `docs/events.md`.
async fn release_events(app: &TestApp, id: &str) -> Vec<Value> {
    let schemas = crate::events::documented_schemas();
    let all = crate::events::events(&app.admin, "limit=500").await;
    let mine: Vec<Value> = all
        .into_iter()
        .filter(|e| e["subject"] == format!("release/{id}"))
        .collect();
    for e in &mine {
        crate::events::check_data(e["type"].as_str().unwrap(), &e["data"], &schemas);
    }
    mine
}

fn event_types(evs: &[Value]) -> Vec<&str> {
    evs.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// Fast gates for tests: evaluated every second over a second of traffic.
fn gates() -> Value {
    json!({"interval_secs": 1, "settle_secs": 1, "window_secs": 3, "min_requests": 5, "max_error_ratio": 0.05,
           "latency": {"percentile": 0.99, "max_ms": 150}})
}

fn waves(bake: i64, approval_second: bool) -> Value {
    json!([
        {"name": "canary", "selector": {"labels": {"canary": "true"}}, "bake_seconds": bake},
        {"name": "pooled", "selector": {"tier": "pooled"}, "bake_seconds": bake, "max_parallel": 2,
         "approval": if approval_second { "manual" } else { "auto" }}
    ])
}

both_backends!(a_healthy_release_goes_through_every_wave, |b| async move {
    let mut f = Fleet::start(b, AppOptions::default(), &TENANTS).await;
    for t in TENANTS {
        assert_eq!(f.version_of(t).await, "v1");
    }
    let (status, out) = f
        .create(
            json!({"release_id": "rel-v2", "app_version": "v2", "vars": {},
                       "waves": waves(2, false), "gates": gates()}),
        )
        .await;
    assert_eq!(status, 201, "{out:#}");
    assert_eq!(
        out["release"]["waves"][0]["cells"][0]["cell_id"],
        "canary-1"
    );
    let r = f
        .wait_state(
            "rel-v2",
            &["succeeded", "rolled_back", "failed", "paused"],
            Duration::from_secs(180),
        )
        .await;
    assert_eq!(r["state"], "succeeded", "{r:#}");
    for t in TENANTS {
        assert_eq!(f.version_of(t).await, "v2", "{t}");
    }
    for c in CELLS {
        assert_eq!(f.app.cell(c).await.app_version.as_deref(), Some("v2"));
    }
    // Every wave passed its gates with measured successes, recorded with their numbers.
    let decisions = r["decisions"].as_array().unwrap();
    assert!(decisions.iter().any(|d| d["wave"] == "pooled"
        && d["result"] == "success"
        && d["measurements"]["requests"].as_u64().unwrap() >= 5));
    let events = f.audit_events("rel-v2").await;
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "RELEASE_WAVE_STARTED" || *e == "RELEASE_GATE_PASSED")
            .count(),
        4,
        "{events:?}"
    );
    assert!(events.contains(&"RELEASE_SUCCEEDED".to_string()));
    f.stop_traffic().await;
});

// A bad release (faults, or added latency) fails its canary gate within two evaluation
// intervals; the canary goes back to the old version; no pooled cell is ever applied.
both_backends!(a_bad_canary_is_caught_and_rolled_back, |b| async move {
    let mut f = Fleet::start(b, AppOptions::default(), &TENANTS).await;
    for (id, vars, gate) in [
        ("rel-faulty", json!({"fault_rate": 0.2}), "error_ratio"),
        ("rel-slow", json!({"extra_latency_ms": 200}), "latency"),
    ] {
        let (status, out) = f
            .create(
                json!({"release_id": id, "app_version": format!("{id}-v2"), "vars": vars,
                           "waves": waves(30, false), "gates": gates()}),
            )
            .await;
        assert_eq!(status, 201, "{out:#}");
        let r = f
            .wait_state(
                id,
                &["rolled_back", "succeeded", "failed", "paused"],
                Duration::from_secs(180),
            )
            .await;
        assert_eq!(r["state"], "rolled_back", "{r:#}");
        // The failure came within two evaluations of the canary's bake.
        let canary: Vec<&Value> = r["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["wave"] == "canary" && d["gate"] == gate)
            .collect();
        let first_failure = canary
            .iter()
            .position(|d| d["result"] == "failure")
            .unwrap_or_else(|| panic!("no failure of {gate}: {r:#}"));
        assert!(
            first_failure < 2,
            "{id}: failed at evaluation {first_failure}: {r:#}"
        );
        // Added latency can cost errors too: the reason names the first gate that failed.
        assert!(
            r["reason"]
                .as_str()
                .unwrap()
                .contains("failed on cell canary-1"),
            "{r:#}"
        );
        // The canary is back on v1 with its old variables; the pooled cells never moved.
        let canary_cell = f.app.cell("canary-1").await;
        assert_eq!(canary_cell.app_version.as_deref(), Some("v1"), "{id}");
        assert_eq!(
            canary_cell.vars.get("fault_rate"),
            None,
            "{:?}",
            canary_cell.vars
        );
        assert_eq!(canary_cell.vars.get("extra_latency_ms"), None);
        assert_eq!(f.version_of("t-canary").await, "v1");
        for c in ["pool-1", "pool-2"] {
            assert_eq!(f.applies(c).await, 0, "{c} was applied");
            assert_eq!(f.app.cell(c).await.app_version.as_deref(), Some("v1"));
        }
        let events = f.audit_events(id).await;
        let wanted = [
            "RELEASE_CREATED",
            "RELEASE_WAVE_STARTED",
            "RELEASE_GATE_FAILED",
            "RELEASE_ROLLED_BACK",
        ];
        let seen: Vec<&String> = events
            .iter()
            .filter(|e| wanted.contains(&e.as_str()))
            .collect();
        assert_eq!(seen, wanted.iter().collect::<Vec<_>>(), "{events:?}");
        // Published for consumers (webhooks), with the numbers.
        let evs = release_events(&f.app, id).await;
        assert_eq!(
            event_types(&evs),
            [
                "dev.cellplane.release.wave_started.v1",
                "dev.cellplane.release.gate_failed.v1",
                "dev.cellplane.release.rolled_back.v1"
            ],
            "{evs:#?}"
        );
        assert_eq!(evs[1]["data"]["rollback"], "auto");
        assert_eq!(evs[2]["data"]["reverted"], json!(["canary-1"]));
    }
    // Two applies of the canary per release: the release, and its rollback.
    assert_eq!(f.applies("canary-1").await, 4);
    f.stop_traffic().await;
});

/// A healthy release whose canary has no traffic never passes on its own: it pauses as
/// inconclusive; manual approval, pause and resume, and abort behave as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inconclusive_pauses_and_actions_behave_as_documented() {
    // Traffic on the pooled tenants only.
    let mut f = Fleet::start(Backend::Sqlite, AppOptions::default(), &["t-one", "t-two"]).await;
    let (status, _) = f
        .create(json!({"release_id": "rel-quiet", "app_version": "v2",
                       "waves": waves(1, false), "gates": gates()}))
        .await;
    assert_eq!(status, 201);
    let r = f
        .wait_state(
            "rel-quiet",
            &["paused", "succeeded"],
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(r["state"], "paused", "{r:#}");
    assert!(
        r["reason"].as_str().unwrap().contains("inconclusive"),
        "{r:#}"
    );
    assert!(r["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["result"] != "success"));
    assert!(f
        .audit_events("rel-quiet")
        .await
        .contains(&"RELEASE_GATE_INCONCLUSIVE".to_string()));
    // Resumed, it measures again and pauses again: it never passes on its own.
    let (status, _) = f.action("rel-quiet", "resume", None).await;
    assert_eq!(status, 200);
    let r = f
        .wait_state(
            "rel-quiet",
            &["paused", "succeeded"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(r["state"], "paused");
    assert_eq!(
        r["waves"][1]["state"], "pending",
        "the pooled wave never started"
    );
    // Abort puts the canary back.
    let (status, _) = f.action("rel-quiet", "abort", None).await;
    assert_eq!(status, 200);
    let r = f
        .wait_state("rel-quiet", &["aborted"], Duration::from_secs(120))
        .await;
    assert_eq!(r["waves"][0]["cells"][0]["state"], "reverted");
    assert_eq!(
        f.app.cell("canary-1").await.app_version.as_deref(),
        Some("v1")
    );
    let (status, _) = f.action("rel-quiet", "resume", None).await;
    assert_eq!(status, 409, "an ended release takes no action");

    // Manual approval: the pooled wave waits for it; pause and resume in between.
    f.stop_traffic().await;
    let mut f2 = f;
    let r = f2
        .run(json!({"release_id": "rel-manual", "app_version": "v3",
                       "waves": waves(1, true),
                       "gates": {"interval_secs": 1, "max_error_ratio": null}}))
        .await;
    assert_eq!(r["waves"][1]["state"], "awaiting_approval", "{r:#}");
    assert_eq!(
        f2.app.cell("pool-1").await.app_version.as_deref(),
        Some("v1")
    );
    let (status, _) = f2.action("rel-manual", "pause", None).await;
    assert_eq!(status, 409, "a paused release does not pause");
    let (status, _) = f2.action("rel-manual", "approve", None).await;
    assert_eq!(status, 200);
    let r = f2
        .wait_state(
            "rel-manual",
            &["succeeded", "failed", "rolled_back", "paused"],
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(r["state"], "succeeded", "{r:#}");
    for c in CELLS {
        assert_eq!(f2.app.cell(c).await.app_version.as_deref(), Some("v3"));
    }
    let events = f2.audit_events("rel-manual").await;
    assert!(events.contains(&"RELEASE_WAVE_AWAITING_APPROVAL".to_string()));
    assert!(events.contains(&"RELEASE_APPROVE".to_string()));
    f2.stop_traffic().await;
}

/// The budget gate: a canary that already spent its error budget keeps the first wave
/// from starting, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_error_budget_keeps_the_next_wave_from_starting() {
    let mut f = Fleet::start(Backend::Sqlite, AppOptions::default(), &TENANTS).await;
    // Faults on the canary, outside any release: its budget burns.
    let r = f
        .app
        .req(Method::PATCH, "/v1/cells/canary-1")
        .json(&json!({"vars": {"fault_rate": 0.5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let job = f.app.cell("canary-1").await.pending_job_id.unwrap();
    f.app.wait_job(&job, Duration::from_secs(60)).await;
    eventually(Duration::from_secs(30), || async {
        let m: Value = f
            .app
            .admin
            .get("/v1/cells/canary-1/metrics?window_secs=60")
            .await
            .ok()?;
        (m["errors"].as_u64()? >= 20).then_some(())
    })
    .await
    .unwrap();
    let mut g = gates();
    g["slo_target"] = json!(0.99);
    g["min_budget"] = json!(0.5);
    g["budget_window_secs"] = json!(60);
    let r = f
        .run(json!({"release_id": "rel-budget", "app_version": "v2",
                       "waves": waves(1, false), "gates": g}))
        .await;
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not start") && reason.contains("error budget"),
        "{r:#}"
    );
    assert_eq!(r["waves"][0]["state"], "pending");
    assert_eq!(
        f.applies("canary-1").await,
        1,
        "only the PATCH above applied it"
    );
    assert!(f
        .audit_events("rel-budget")
        .await
        .contains(&"RELEASE_WAVE_REFUSED".to_string()));
    f.stop_traffic().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_releases_are_refused_before_anything_is_applied() {
    let mut f = Fleet::start(Backend::Sqlite, AppOptions::default(), &[]).await;
    let base = |over: Value| {
        let mut b = json!({"release_id": "rel-bad", "app_version": "v2", "waves": waves(1, false),
                           "gates": gates()});
        for (k, v) in over.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (body, field) in [
        (
            base(json!({"waves": [{"name": "nowhere", "selector": {"labels": {"zone": "mars"}}}]})),
            "waves[0].selector",
        ),
        (
            base(json!({"vars": {"no_such_var": 1}})),
            "vars.no_such_var",
        ),
        (base(json!({"vars": {"fault_rate": 2}})), "vars.fault_rate"),
        (
            base(
                json!({"waves": [{"name": "canary", "selector": {"labels": {"canary": "true"}},
                                   "bake_seconds": -5}]}),
            ),
            "waves[0].bake_seconds",
        ),
        (
            base(json!({"gates": {"interval_secs": 0}})),
            "gates.interval_secs",
        ),
        (base(json!({"release_id": "Bad_Id"})), "release_id"),
    ] {
        let (status, p) = f.create(body).await;
        assert_eq!(status, 400, "{field}: {p:#}");
        assert!(
            p["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["field"].as_str().unwrap().starts_with(field)),
            "{field}: {p:#}"
        );
    }
    // A second active release on the same cells is refused.
    let (status, _) = f
        .create(json!({"release_id": "rel-one", "app_version": "v2",
                       "waves": [{"name": "canary", "selector": {"labels": {"canary": "true"}},
                                  "bake_seconds": 600, "approval": "manual"}]}))
        .await;
    assert_eq!(status, 201);
    let (status, p) = f
        .create(json!({"release_id": "rel-two", "app_version": "v3",
                       "waves": [{"name": "all", "selector": {"tier": "pooled"}}]}))
        .await;
    assert_eq!(status, 409, "{p:#}");
    assert!(p["detail"].as_str().unwrap().contains("rel-one"), "{p:#}");
    // Nothing was applied by any of them.
    for c in CELLS {
        assert_eq!(f.applies(c).await, 0, "{c}");
    }
    let (status, _) = f.action("rel-one", "explode", None).await;
    assert_eq!(status, 404);
    let (status, _) = f
        .action("rel-one", "retry", Some(json!({"cell_id": "pool-1"})))
        .await;
    assert_eq!(status, 400);
    let (status, _) = f.action("rel-one", "abort", None).await;
    assert_eq!(status, 200);
    f.stop_traffic().await;
}

/// The first decision of `gate` on the canary that failed, by index among its decisions.
fn first_failure(r: &Value, gate: &str) -> usize {
    r["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["wave"] == "canary" && d["gate"] == gate)
        .position(|d| d["result"] == "failure")
        .unwrap_or_else(|| panic!("no failure of {gate}: {r:#}"))
}

/// The fault release of `a_bad_canary_is_caught_and_rolled_back`, read through a real
/// Prometheus scraping the router's `/__router/metrics` instead of the heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_bad_release_is_caught_through_prometheus() {
    let mut prom = TestPrometheus::reserve();
    let opts = AppOptions::default()
        .with("CELLPLANE__METRICS__PROMETHEUS_URL", &prom.url)
        .with("CELLPLANE__METRICS__PROMETHEUS_SCRAPE_SECS", "1");
    let mut f = Fleet::start(Backend::Sqlite, opts, &TENANTS).await;
    let target = f.router.admin_url.trim_start_matches("http://").to_string();
    prom.start(&[target]).await;
    // Prometheus holds the canary's traffic before the release starts.
    eventually(Duration::from_secs(30), || async {
        let r = prom
            .query("sum(increase(cellplane_router_cell_requests_total{cell=\"canary-1\"}[5s]))")
            .await;
        (r[0]["value"][1].as_str()?.parse::<f64>().ok()? > 10.0).then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("prometheus never scraped the router:\n{}", prom.log()));
    let mut g = gates();
    g["provider"] = json!("prometheus");
    g["latency"] = Value::Null;
    let r = f
        .run(json!({"release_id": "rel-prom", "app_version": "v2",
                       "vars": {"fault_rate": 0.2}, "waves": waves(30, false), "gates": g}))
        .await;
    assert_eq!(r["state"], "rolled_back", "{r:#}\n{}", prom.log());
    assert!(first_failure(&r, "error_ratio") < 2, "{r:#}");
    let failed = r["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["result"] == "failure")
        .unwrap();
    assert_eq!(
        failed["measurements"]["provider"], "prometheus",
        "{failed:#}"
    );
    assert!(failed["measurements"]["error_ratio"].as_f64().unwrap() > 0.05);
    assert_eq!(
        f.app.cell("canary-1").await.app_version.as_deref(),
        Some("v1")
    );
    for c in ["pool-1", "pool-2"] {
        assert_eq!(f.applies(c).await, 0, "{c} was applied");
    }
    // A healthy release passes through Prometheus too, the pooled wave's two cells read
    // in one query.
    let r = f
        .run(json!({"release_id": "rel-prom-ok", "app_version": "v2",
                       "waves": waves(3, false), "gates": g}))
        .await;
    assert_eq!(r["state"], "succeeded", "{r:#}");
    for c in ["pool-1", "pool-2"] {
        assert!(
            r["decisions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["cell_id"] == c
                    && d["result"] == "success"
                    && d["measurements"]["provider"] == "prometheus"
                    && d["measurements"]["requests"].as_u64().unwrap_or(0) >= 5),
            "{c}: {r:#}"
        );
    }
    f.stop_traffic().await;
}

/// A provider that cannot be read: each measurement is an error (never a success), and
/// `consecutive_error_limit` errors in a row halt the release, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_down_halts_the_release_after_the_consecutive_limit() {
    // Nothing listens on the reserved port.
    let prom = TestPrometheus::reserve();
    let opts = AppOptions::default()
        .with("CELLPLANE__METRICS__PROMETHEUS_URL", &prom.url)
        .with("CELLPLANE__METRICS__QUERY_TIMEOUT_MS", "500");
    let mut f = Fleet::start(Backend::Sqlite, opts, &TENANTS).await;
    let mut g = gates();
    g["provider"] = json!("prometheus");
    g["consecutive_error_limit"] = json!(3);
    let r = f
        .run(json!({"release_id": "rel-blind", "app_version": "v2",
                       "waves": waves(60, false), "gates": g}))
        .await;
    assert_eq!(r["state"], "failed", "{r:#}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("could not be read 3 times in a row"),
        "{reason}"
    );
    let decisions = r["decisions"].as_array().unwrap();
    let errors = decisions
        .iter()
        .filter(|d| d["gate"] == "error_ratio" && d["result"] == "error")
        .count();
    assert_eq!(errors, 3, "{r:#}");
    assert!(decisions.iter().all(|d| d["result"] == "error"), "{r:#}");
    assert!(f
        .audit_events("rel-blind")
        .await
        .contains(&"RELEASE_HALTED".to_string()));
    for c in ["pool-1", "pool-2"] {
        assert_eq!(f.applies(c).await, 0, "{c} was applied");
    }
    let evs = release_events(&f.app, "rel-blind").await;
    assert_eq!(
        event_types(&evs).last(),
        Some(&"dev.cellplane.release.halted.v1"),
        "{evs:#?}"
    );

    // `rollback: never` (a release with a migration that cannot be undone): a failed gate
    // halts the release with nothing rolled back, and the halt is published to page.
    let r = f
        .run(
            json!({"release_id": "rel-never", "app_version": "v3", "rollback": "never",
                       "vars": {"fault_rate": 0.2}, "waves": waves(30, false), "gates": gates()}),
        )
        .await;
    assert_eq!(r["state"], "failed", "{r:#}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("halted without rollback"),
        "{r:#}"
    );
    assert_eq!(r["waves"][0]["cells"][0]["state"], "applied");
    assert_eq!(
        f.app.cell("canary-1").await.app_version.as_deref(),
        Some("v3"),
        "nothing is rolled back"
    );
    let evs = release_events(&f.app, "rel-never").await;
    assert_eq!(
        event_types(&evs),
        [
            "dev.cellplane.release.wave_started.v1",
            "dev.cellplane.release.gate_failed.v1",
            "dev.cellplane.release.halted.v1"
        ],
        "{evs:#?}"
    );
    assert_eq!(evs[1]["data"]["rollback"], "never");
    f.stop_traffic().await;
}

/// The SLO burn rate (seconds-long windows) and the canary-against-baseline test catch a
/// faulty canary with the plain error-ratio gate turned off; a healthy release passes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burn_rate_and_baseline_gates_decide_with_their_numbers() {
    let mut f = Fleet::start(Backend::Sqlite, AppOptions::default(), &TENANTS).await;
    let g = json!({"interval_secs": 1, "window_secs": 4, "min_requests": 5,
        "max_error_ratio": null, "inconclusive_limit": 10,
        "burn_rate": {"slo_target": 0.99, "rules": [{"long_secs": 4, "short_secs": 2, "factor": 5}]},
        "baseline": {"step_secs": 1, "min_samples": 3, "confidence": 0.98}});
    let r = f
        .run(json!({"release_id": "rel-burn", "app_version": "v2",
                       "vars": {"fault_rate": 0.2}, "waves": waves(30, false), "gates": g}))
        .await;
    assert_eq!(r["state"], "rolled_back", "{r:#}");
    let decisions = r["decisions"].as_array().unwrap();
    let burn = decisions
        .iter()
        .find(|d| d["gate"] == "burn_rate" && d["result"] == "failure")
        .unwrap_or_else(|| panic!("{r:#}"));
    let rule = &burn["measurements"]["rules"][0];
    assert!(rule["short_burn_rate"].as_f64().unwrap() > 5.0, "{burn:#}");
    assert!(rule["long_burn_rate"].as_f64().unwrap() > 5.0, "{burn:#}");
    assert_eq!(f.applies("pool-1").await, 0);

    // The comparison alone: the faulty canary's per-second error ratios against the
    // pooled cells' (still on v1) fail the one-sided Mann-Whitney test.
    let only_baseline = json!({"interval_secs": 1, "settle_secs": 1, "window_secs": 4,
        "min_requests": 5, "max_error_ratio": null, "inconclusive_limit": 10,
        "baseline": {"step_secs": 1, "min_samples": 3, "confidence": 0.98}});
    let r = f
        .run(json!({"release_id": "rel-worse", "app_version": "v2",
                       "vars": {"fault_rate": 0.2}, "waves": waves(30, false),
                       "gates": only_baseline}))
        .await;
    assert_eq!(r["state"], "rolled_back", "{r:#}");
    let failed = r["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["gate"] == "baseline" && d["result"] == "failure")
        .unwrap_or_else(|| panic!("{r:#}"));
    let m = &failed["measurements"];
    assert!(m["p_value"].as_f64().unwrap() < 0.02, "{failed:#}");
    assert!(
        m["canary_mean"].as_f64().unwrap() > m["baseline_mean"].as_f64().unwrap(),
        "{failed:#}"
    );
    assert_eq!(
        m["baseline_cells"],
        json!(["pool-1", "pool-2"]),
        "{failed:#}"
    );
    assert_eq!(f.applies("pool-1").await, 0);

    // Healthy: both gates measure successes, the baseline against the pooled cells.
    let r = f
        .run(json!({"release_id": "rel-fine", "app_version": "v2",
                       "waves": waves(6, false), "gates": g}))
        .await;
    assert_eq!(r["state"], "succeeded", "{r:#}");
    let decisions = r["decisions"].as_array().unwrap();
    let base = decisions
        .iter()
        .find(|d| d["gate"] == "baseline" && d["wave"] == "canary" && d["result"] == "success")
        .unwrap_or_else(|| panic!("{r:#}"));
    let m = &base["measurements"];
    assert_eq!(m["baseline_cells"], json!(["pool-1", "pool-2"]), "{base:#}");
    assert!(m["canary_samples"].as_u64().unwrap() >= 3, "{base:#}");
    assert!(m["p_value"].as_f64().unwrap() >= 0.02, "{base:#}");
    // The last wave has no cell left on the old version: recorded, never a pass.
    assert!(decisions.iter().any(|d| d["gate"] == "baseline"
        && d["wave"] == "pooled"
        && d["result"] == "not_applicable"));
    assert!(decisions
        .iter()
        .any(|d| d["gate"] == "burn_rate" && d["wave"] == "pooled" && d["result"] == "success"));
    f.stop_traffic().await;
}

/// A dedicated cell waits for its tenant's change window; a freeze window on a release
/// keeps its first wave from starting. The healthy release then goes canary → pooled →
/// dedicated (the default waves) and every cell answers with the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_respects_freeze_and_change_windows_through_every_default_wave() {
    let mut f = Fleet::start(Backend::Sqlite, AppOptions::default(), &TENANTS).await;
    let now = chrono::Utc::now();
    let hhmm = |t: chrono::DateTime<chrono::Utc>| t.format("%H:%M").to_string();
    // A window that is closed now (it opens in two hours, for an hour).
    let closed = json!([{"start": hhmm(now + chrono::Duration::hours(2)),
                         "end": hhmm(now + chrono::Duration::hours(3))}]);
    f.app
        .create_tenant_with(json!({"tenant_id": "t-ded", "organization_id": "acme-corp",
            "profile": "st-dedicated", "region": "eu-west-1",
            "policies": {"changeWindows": closed}}))
        .await;
    f.app.lifecycle("t-ded", "activate").await;
    let ded_cell = f.app.admin.get_tenant("t-ded").await.unwrap().environments[0]
        .cell_id
        .clone()
        .unwrap();
    f.router.wait_revision(f.app.routing_revision().await).await;
    f.load("t-ded");
    let gates = json!({"interval_secs": 1, "window_secs": 3, "min_requests": 5});

    // Frozen: nothing starts, and the release says why.
    let (status, out) = f
        .create(
            json!({"release_id": "rel-frozen", "app_version": "v2", "gates": gates,
            "freeze_windows": [{"start": persistence_time(now - chrono::Duration::minutes(1)),
                                "end": persistence_time(now + chrono::Duration::hours(1)),
                                "reason": "end of quarter"}]}),
        )
        .await;
    assert_eq!(status, 201, "{out:#}");
    let r = eventually(Duration::from_secs(30), || async {
        let r = f.release("rel-frozen").await;
        r["reason"].as_str()?.contains("freeze window").then_some(r)
    })
    .await
    .unwrap();
    assert!(
        r["reason"].as_str().unwrap().contains("end of quarter"),
        "{r:#}"
    );
    assert_eq!(r["waves"][0]["state"], "pending");
    assert_eq!(f.applies("canary-1").await, 0);
    assert_eq!(f.action("rel-frozen", "abort", None).await.0, 200);
    f.wait_state("rel-frozen", &["aborted"], Duration::from_secs(30))
        .await;

    // The default waves, each baked two seconds.
    let mut body = json!({"release_id": "rel-all", "app_version": "v2", "gates": gates});
    body["waves"] = json!([
        {"name": "canary", "selector": {"labels": {"canary": "true"}}, "bake_seconds": 2},
        {"name": "pooled", "selector": {"tier": "pooled"}, "bake_seconds": 2, "max_parallel": 2},
        {"name": "dedicated", "selector": {"tier": "dedicated"}, "bake_seconds": 2}
    ]);
    let (status, out) = f.create(body).await;
    assert_eq!(status, 201, "{out:#}");
    let r = eventually(Duration::from_secs(180), || async {
        let r = f.release("rel-all").await;
        (r["waves"][2]["cells"][0]["state"] == "waiting").then_some(r)
    })
    .await
    .unwrap_or_else(|_| panic!("the dedicated cell never waited\n{}", f.app.log()));
    assert_eq!(r["state"], "running", "{r:#}");
    let why = r["waves"][2]["cells"][0]["error"].as_str().unwrap();
    assert!(
        why.contains("t-ded") && why.contains("change window"),
        "{why}"
    );
    assert_eq!(f.applies(&ded_cell).await, 0, "applied outside its window");
    // The window opens (now, for two hours): the dedicated cell is applied.
    let open = json!([{"start": hhmm(now - chrono::Duration::minutes(5)),
                       "end": hhmm(now + chrono::Duration::hours(2))}]);
    let resp = f
        .app
        .req(Method::PATCH, "/v1/tenants/t-ded")
        .json(&json!({"policies": {"changeWindows": open}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = f
        .wait_state(
            "rel-all",
            &["succeeded", "rolled_back", "failed", "paused"],
            Duration::from_secs(180),
        )
        .await;
    assert_eq!(r["state"], "succeeded", "{r:#}");
    let names: Vec<&str> = r["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["canary", "pooled", "dedicated"]);
    for t in TENANTS.iter().chain(["t-ded"].iter()) {
        assert_eq!(f.version_of(t).await, "v2", "{t}");
    }
    assert_eq!(f.applies(&ded_cell).await, 1);
    // A change window that is not a time of day is refused with its field.
    let resp = f
        .app
        .req(Method::PATCH, "/v1/tenants/t-ded")
        .json(&json!({"policies": {"changeWindows": [{"start": "25:00", "end": "02:00"}]}}))
        .send()
        .await
        .unwrap();
    let p = expect_problem(resp, 400).await;
    assert_eq!(
        p["errors"][0]["field"], "policies.changeWindows[0].start",
        "{p:#}"
    );
    f.stop_traffic().await;
}

fn persistence_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// SIGKILL at the named point `release.rollout/bake` (the first pass of the canary's
/// bake): the control plane restarted on its address resumes the release from its row,
/// measures the canary again, and finishes; no cell is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_killed_mid_wave_resumes_from_its_recorded_state() {
    let opts = AppOptions::default()
        .with("CELLPLANE__JOBS__LEASE_SECS", "2")
        .with("CELLPLANE__JOBS__FAILPOINTS", "release.rollout/bake=kill@1");
    let mut f = Fleet::start(Backend::Sqlite, opts, &TENANTS).await;
    let (status, out) = f
        .create(json!({"release_id": "rel-crash", "app_version": "v2",
                       "waves": waves(3, false), "gates": gates()}))
        .await;
    assert_eq!(status, 201, "{out:#}");
    assert!(
        f.app.wait_exit(Duration::from_secs(120)).await,
        "the failpoint kills the process\n{}",
        f.app.log()
    );
    // What the row recorded when the process died: the canary applied, its wave baking.
    let waves: Value = serde_json::from_str(
        &f.app
            .sql_text("SELECT waves FROM releases WHERE release_id = 'rel-crash'")
            .await,
    )
    .unwrap();
    assert_eq!(waves[0]["state"], "baking", "{waves:#}");
    assert_eq!(waves[0]["cells"][0]["state"], "applied");
    assert_eq!(waves[1]["state"], "pending");
    f.app.start_same_address().await.unwrap();
    let r = f
        .wait_state(
            "rel-crash",
            &["succeeded", "rolled_back", "failed", "paused"],
            Duration::from_secs(180),
        )
        .await;
    assert_eq!(r["state"], "succeeded", "{r:#}");
    // The canary was measured after the restart, with traffic.
    assert!(r["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["wave"] == "canary"
            && d["result"] == "success"
            && d["measurements"]["requests"].as_u64().unwrap_or(0) >= 5));
    for c in CELLS {
        assert_eq!(f.applies(c).await, 1, "{c} applied once");
    }
    for t in TENANTS {
        assert_eq!(f.version_of(t).await, "v2", "{t}");
    }
    let job = r["job_id"].as_str().unwrap();
    assert!(
        f.app.admin.get_job(job).await.unwrap().attempts >= 2,
        "the rollout job was taken again"
    );
    f.stop_traffic().await;
}

/// Two replicas on one PostgreSQL: the replica running the rollout dies at
/// `release.rollout/bake`; the other takes the job over when its lease expires and
/// finishes the release from the recorded state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_takes_a_release_over() {
    let opts = AppOptions::default()
        .with("CELLPLANE__JOBS__LEASE_SECS", "2")
        .with("CELLPLANE__JOBS__FAILPOINTS", "release.rollout/bake=kill@1");
    let mut f = Fleet::start(Backend::Postgres, opts.clone(), &[]).await;
    let mut b = f.app.spawn_replica(opts).await;
    // Gates off: the bake is the wave's time, whichever replica the routers report to.
    let (status, out) = f
        .create(
            json!({"release_id": "rel-ha", "app_version": "v2", "waves": waves(2, false),
                       "gates": {"interval_secs": 1, "max_error_ratio": null}}),
        )
        .await;
    assert_eq!(status, 201, "{out:#}");
    // Whichever replica runs the bake dies there.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let killed_a = loop {
        if f.app.wait_exit(Duration::from_millis(100)).await {
            break true;
        }
        if b.wait_exit(Duration::from_millis(100)).await {
            break false;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "neither replica died\n{}\n{}",
            f.app.log(),
            b.log()
        );
    };
    let survivor = if killed_a { &b } else { &f.app };
    let r = eventually(Duration::from_secs(180), || async {
        let r: Value = survivor.admin.get("/v1/releases/rel-ha").await.ok()?;
        (!["running", "rolling_back"].contains(&r["state"].as_str()?)).then_some(r)
    })
    .await
    .unwrap_or_else(|_| panic!("the survivor never finished\n{}", survivor.log()));
    assert_eq!(r["state"], "succeeded", "{r:#}");
    for c in CELLS {
        let cell = survivor.cell(c).await;
        assert_eq!(cell.app_version.as_deref(), Some("v2"), "{c}");
    }
    let job = survivor
        .admin
        .get_job(r["job_id"].as_str().unwrap())
        .await
        .unwrap();
    assert!(job.attempts >= 2, "{job:?}");
    f.stop_traffic().await;
}

/// Restarts the fleet's control plane on its address with `failpoints` (empty: none).
async fn restart_with_failpoints(f: &mut Fleet, failpoints: &str) {
    f.app.kill9();
    f.app.options = f
        .app
        .options
        .clone()
        .without("CELLPLANE__JOBS__FAILPOINTS")
        .with("CELLPLANE__JOBS__FAILPOINTS", failpoints);
    f.app.start_same_address().await.unwrap();
}

/// A cell that fails to apply pauses the release; `retry` applies it again (a new job,
/// though its record already holds the release) and `abort` still puts back what it ran
/// before. A revert that fails halts the release (`RELEASE_ROLLBACK_FAILED`) and leaves
/// the cell `failed`, never counted as reverted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reapplies_a_failed_cell_and_a_failed_revert_halts() {
    let opts = AppOptions::default().with("CELLPLANE__JOBS__FAILPOINTS", "cell.apply/apply=fatal");
    let mut f = Fleet::start(Backend::Sqlite, opts, &TENANTS).await;
    let r = f.run(json!({"release_id": "rel-retry", "app_version": "v2",
                       "waves": waves(1, true), "gates": {"interval_secs": 1, "max_error_ratio": null}})).await;
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("canary-1 failed to apply"),
        "{r:#}"
    );
    assert_eq!(r["waves"][0]["cells"][0]["state"], "failed");
    assert_eq!(f.applies("canary-1").await, 1);
    // The cause is gone; retry applies the cell again.
    restart_with_failpoints(&mut f, "").await;
    let (status, out) = f
        .action("rel-retry", "retry", Some(json!({"cell_id": "canary-1"})))
        .await;
    assert_eq!(status, 200, "{out:#}");
    let r = f
        .wait_state("rel-retry", &["paused"], Duration::from_secs(120))
        .await;
    assert_eq!(r["waves"][1]["state"], "awaiting_approval", "{r:#}");
    let canary = &r["waves"][0]["cells"][0];
    assert_eq!(canary["state"], "applied", "{r:#}");
    assert_eq!(canary["from_version"], "v1", "what it ran before is kept");
    assert_eq!(f.applies("canary-1").await, 2);
    assert_eq!(f.version_of("t-canary").await, "v2");
    // Abort puts back v1.
    assert_eq!(f.action("rel-retry", "abort", None).await.0, 200);
    f.wait_state("rel-retry", &["aborted"], Duration::from_secs(120))
        .await;
    assert_eq!(
        f.app.cell("canary-1").await.app_version.as_deref(),
        Some("v1")
    );
    assert_eq!(f.version_of("t-canary").await, "v1");

    // A failed gate with `rollback: manual` pauses; the revert of the abort then fails.
    let r = f
        .run(
            json!({"release_id": "rel-stuck", "app_version": "v3", "rollback": "manual",
                       "vars": {"fault_rate": 0.2}, "waves": waves(30, false), "gates": gates()}),
        )
        .await;
    assert_eq!(r["state"], "paused", "{r:#}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("failed on cell canary-1"),
        "{r:#}"
    );
    assert_eq!(
        f.app.cell("canary-1").await.app_version.as_deref(),
        Some("v3")
    );
    restart_with_failpoints(&mut f, "cell.apply/apply=fatal").await;
    assert_eq!(f.action("rel-stuck", "abort", None).await.0, 200);
    let r = f
        .wait_state(
            "rel-stuck",
            &["failed", "aborted"],
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(r["state"], "failed", "{r:#}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("rolling back cell canary-1 failed"),
        "{r:#}"
    );
    let cell = &r["waves"][0]["cells"][0];
    assert_eq!(cell["state"], "failed", "{r:#}");
    assert!(
        cell["error"]
            .as_str()
            .unwrap()
            .starts_with("rollback failed"),
        "{r:#}"
    );
    assert!(f
        .audit_events("rel-stuck")
        .await
        .contains(&"RELEASE_ROLLBACK_FAILED".to_string()));
    let evs = release_events(&f.app, "rel-stuck").await;
    let last = evs.last().unwrap();
    assert_eq!(last["type"], "dev.cellplane.release.halted.v1", "{evs:#?}");
    assert_eq!(last["data"]["cell_id"], "canary-1");
    let evs = release_events(&f.app, "rel-retry").await;
    let causes: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "dev.cellplane.release.paused.v1")
        .map(|e| e["data"]["cause"].as_str().unwrap())
        .collect();
    assert_eq!(causes, ["cell_failed", "approval"], "{evs:#?}");
    f.stop_traffic().await;
}

/// `cellplane release …`: create from a file, skip a cell that is unavailable (listed as
/// skipped, never passed), approve, follow the live view to the end (exit 0 only on
/// success), list; a bad variable is refused with its field and a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_commands_drive_a_release_with_a_live_view() {
    let mut f = Fleet::start(Backend::Sqlite, AppOptions::default(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("release.yaml");
    std::fs::write(
        &file,
        serde_json::to_string(&json!({"waves": waves(1, true),
            "gates": {"interval_secs": 1, "max_error_ratio": null}}))
        .unwrap(),
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = f.app.cli(&[
        "release",
        "create",
        "rel-cli",
        "--app-version",
        "v2",
        "-f",
        path,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("release rel-cli → v2"), "{out}");
    let r = f
        .wait_state("rel-cli", &["paused"], Duration::from_secs(120))
        .await;
    assert_eq!(r["waves"][1]["state"], "awaiting_approval", "{r:#}");
    let (code, out, err) = f
        .app
        .cli(&["release", "skip", "rel-cli", "--cell", "pool-2"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, _, err) = f.app.cli(&["release", "approve", "rel-cli"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = f.app.cli(&["release", "status", "rel-cli", "--watch"]);
    assert_eq!(code, 0, "{out}\n{err}");
    for want in ["wave canary", "wave pooled", "succeeded", "skipped"] {
        assert!(out.contains(want), "{want}: {out}");
    }
    let pool2 = out.lines().rev().find(|l| l.contains("pool-2")).unwrap();
    assert!(pool2.contains("skipped"), "{out}");
    assert_eq!(
        f.app.cell("pool-1").await.app_version.as_deref(),
        Some("v2")
    );
    assert_eq!(
        f.app.cell("pool-2").await.app_version.as_deref(),
        Some("v1")
    );
    assert_eq!(
        f.applies("pool-2").await,
        0,
        "a skipped cell is never applied"
    );
    let (code, out, _) = f.app.cli(&["release", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("rel-cli") && out.contains("succeeded"),
        "{out}"
    );
    // Refused with the field; nothing started.
    let (code, out, err) = f.app.cli(&[
        "release",
        "create",
        "rel-bad",
        "--app-version",
        "v3",
        "--var",
        "fault_rate=2",
    ]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("vars.fault_rate"), "{err}");
    let (code, _, err) = f.app.cli(&["release", "create", "rel-bad", "--var", "x=1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--app-version"), "{err}");
    f.stop_traffic().await;
}
