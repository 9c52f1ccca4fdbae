//! cellplane-router end to end: real control plane, real stamped `local` cells
//! (sample-cell processes) and the real router binary. Each tenant's requests reach its own
//! cell and no other; suspend is enforced within a second; the router keeps serving with
//! the control plane SIGKILLed, and after its own restart from its state file; held
//! requests wait for release or time out with 503; rate limits answer 429.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];

/// A control plane with two pooled cells and three active tenants, and a router. With
/// `rate_limited`, initech gets `apiRateLimit: 3`.
async fn routed(
    b: Backend,
    router_args: &[&str],
    rate_limited: bool,
) -> (TestApp, TestRouter, BTreeMap<String, String>) {
    let app = TestApp::spawn(b).await;
    app.stamp_cells(&[
        ("pool-1", "eu-west-1", "pooled", 10, 10),
        ("pool-2", "eu-west-1", "pooled", 10, 10),
    ])
    .await;
    app.create_org("acme-corp").await;
    let mut cells = BTreeMap::new();
    for t in TENANTS {
        let quotas = if t == "initech" && rate_limited {
            json!({"apiRateLimit": 3})
        } else {
            json!({})
        };
        app.create_tenant_with(json!({"tenant_id": t, "organization_id": "acme-corp",
            "profile": "mt-standard", "region": "eu-west-1", "quotas": quotas}))
            .await;
        let j = app.lifecycle(t, "activate").await;
        assert_eq!(j.state, cellplane_api::JobState::Succeeded, "{j:?}");
        let tenant = app.admin.get_tenant(t).await.unwrap();
        cells.insert(
            t.to_string(),
            tenant.environments[0].cell_id.clone().unwrap(),
        );
    }
    let token = app.token("router").await;
    let router = TestRouter::spawn(&app.url, &token, router_args).await;
    router.wait_revision(app.routing_revision().await).await;
    (app, router, cells)
}

fn cell_of(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-cell-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

both_backends!(router_sends_each_tenant_to_its_own_cell, |b| async move {
    let (app, router, cells) = routed(b, &[], true).await;
    // Spread placed the three tenants over both cells.
    assert_ne!(cells["acme"], cells["globex"], "{cells:?}");
    for t in TENANTS {
        let r = router
            .tenant_req(Method::PUT, t, "/v1/kv/owner")
            .body(t.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{t}");
        assert_eq!(cell_of(&r), cells[t], "{t} written on its own cell");
        assert!(r.headers().contains_key("x-correlation-id"));
    }
    for t in TENANTS {
        let r = router
            .tenant_req(Method::GET, t, "/v1/kv/owner")
            .send()
            .await
            .unwrap();
        assert_eq!(cell_of(&r), cells[t]);
        assert_eq!(r.text().await.unwrap(), t, "{t} reads its own value");
    }
    // A client-sent X-Tenant-ID cannot override the Host-resolved tenant.
    for (host, liar) in [("acme", "globex"), ("globex", "acme"), ("initech", "acme")] {
        let r = router
            .tenant_req(Method::GET, host, "/v1/kv/owner")
            .header("x-tenant-id", liar)
            .header("x-tenant-env", "prod")
            .send()
            .await
            .unwrap();
        assert_eq!(cell_of(&r), cells[host]);
        assert_eq!(r.text().await.unwrap(), host);
    }
    // Header and path resolution, when the Host names no tenant.
    let r = router
        .http
        .get(format!("{}/v1/kv/owner", router.url))
        .header("x-tenant-id", "globex")
        .send()
        .await
        .unwrap();
    assert_eq!(cell_of(&r), cells["globex"]);
    assert_eq!(r.text().await.unwrap(), "globex");
    let r = router
        .http
        .get(format!("{}/t/acme/v1/kv/owner", router.url))
        .send()
        .await
        .unwrap();
    assert_eq!(cell_of(&r), cells["acme"]);
    assert_eq!(r.text().await.unwrap(), "acme");
    // The router's own answers are problems.
    let r = router
        .tenant_req(Method::GET, "nobody", "/v1/kv/owner")
        .send()
        .await
        .unwrap();
    let p = expect_problem(r, 404).await;
    assert_eq!(p["type"], "https://cellplane.dev/problems/unknown-tenant");
    let r = router
        .tenant_req(Method::GET, "acme", "/v1/kv/owner")
        .header("x-tenant-env", "dev")
        .send()
        .await
        .unwrap();
    expect_problem(r, 404).await;
    let r = router
        .tenant_req(Method::GET, "acme", "/v1/kv/owner")
        .header("x-tenant-env", "NOT VALID")
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    // initech's rate limit is 3 per second: a burst gets 429s with Retry-After.
    let mut limited = 0;
    for _ in 0..10 {
        let r = router
            .tenant_req(Method::GET, "initech", "/v1/kv/owner")
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            expect_problem(r, 429).await;
            limited += 1;
        }
    }
    assert!(limited >= 5, "{limited} of 10 limited");
    // A quota change reaches the router without a lifecycle action.
    let r = app
        .req(Method::PATCH, "/v1/tenants/globex")
        .json(&json!({"quotas": {"apiRateLimit": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let route: Value = app.admin.get("/v1/routes/globex/prod").await.unwrap();
    assert_eq!(route["rate_limit"], 2);
    router.wait_revision(app.routing_revision().await).await;
    let mut limited = 0;
    for _ in 0..8 {
        let r = router
            .tenant_req(Method::GET, "globex", "/v1/kv/owner")
            .send()
            .await
            .unwrap();
        limited += (r.status() == 429) as usize;
    }
    assert!(
        limited >= 4,
        "{limited} of 8 limited after the quota change"
    );
    // Per-cell and per-tenant metrics on the admin listener.
    let m = router.metrics().await;
    for t in ["acme", "globex"] {
        assert!(
            m.contains(&format!(
                "cellplane_router_cell_requests_total{{cell=\"{}\",code=\"2xx\"}}",
                cells[t]
            )),
            "{m}"
        );
        assert!(
            m.contains(&format!(
                "cellplane_router_tenant_request_duration_seconds_count{{tenant=\"{t}\"}}"
            )),
            "{m}"
        );
    }
    assert!(m.contains("cellplane_router_own_responses_total{reason=\"rate_limited\"}"));
    // The router is registered and current.
    let rev = app.routing_revision().await;
    let routers = eventually(Duration::from_secs(10), || async {
        let v: Value = app.admin.get("/v1/routers").await.ok()?;
        let items = v["items"].as_array()?.clone();
        (items.len() == 1 && items[0]["applied_revision"] == rev).then_some(items)
    })
    .await
    .expect("router acks the current revision");
    assert_eq!(routers[0]["lag"], 0);
    assert_eq!(routers[0]["live"], true);
});

both_backends!(suspend_is_enforced_within_a_second, |b| async move {
    let (app, router, cells) = routed(b, &[], false).await;
    let t0 = Instant::now();
    app.start_action("globex", "suspend").await;
    let status = eventually(Duration::from_secs(5), || async {
        let r = router
            .tenant_req(Method::GET, "globex", "/v1/kv/x")
            .send()
            .await
            .ok()?;
        (r.status() == 403).then_some(r)
    })
    .await
    .expect("suspended through the router");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "suspend took {took:?}");
    let p = expect_problem(status, 403).await;
    assert_eq!(p["type"], "https://cellplane.dev/problems/tenant-suspended");
    // Others are unaffected.
    let r = router
        .tenant_req(Method::GET, "acme", "/v1/kv/x")
        .send()
        .await
        .unwrap();
    assert_eq!(cell_of(&r), cells["acme"]);
    app.start_action("globex", "resume").await;
    let r = eventually(Duration::from_secs(5), || async {
        let r = router
            .tenant_req(Method::GET, "globex", "/v1/kv/x")
            .send()
            .await
            .ok()?;
        (r.status() != 403).then_some(r)
    })
    .await
    .expect("served again after resume");
    assert_eq!(r.status(), 404, "the cell answers (no such key)");
    assert_eq!(cell_of(&r), cells["globex"]);
});

both_backends!(router_survives_control_plane_loss, |b| async move {
    let (mut app, mut router, cells) = routed(b, &[], false).await;
    for t in TENANTS {
        let r = router
            .tenant_req(Method::PUT, t, "/v1/kv/k")
            .body(t.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    // The last-known table is on disk before anything goes away.
    router.wait_persisted(app.routing_revision().await).await;
    app.kill9();
    // Every request is still served, by the right cell.
    for i in 0..60 {
        let t = TENANTS[i % 3];
        let r = router
            .tenant_req(Method::GET, t, "/v1/kv/k")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "request {i} for {t} with the control plane down"
        );
        assert_eq!(cell_of(&r), cells[t]);
        assert_eq!(r.text().await.unwrap(), t);
    }
    // The router restarts while the control plane is still down: state file.
    router.kill9();
    router.start().await.unwrap();
    let h = router.healthz().await;
    assert_eq!(h["source"], "state-file", "{h}");
    assert_eq!(h["routes"], 3);
    for t in TENANTS {
        let r = router
            .tenant_req(Method::GET, t, "/v1/kv/k")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "{t} after the router restart:\n{}",
            router.log()
        );
        assert_eq!(cell_of(&r), cells[t]);
    }
    // The control plane comes back; the router picks it up again.
    app.start_same_address().await.unwrap();
    eventually(Duration::from_secs(15), || async {
        let h = router.healthz().await;
        (h["source"] == "control-plane").then_some(())
    })
    .await
    .expect("router resyncs with the control plane");
});

both_backends!(held_requests_wait_for_release_or_time_out, |b| async move {
    let (app, router, cells) = routed(b, &["--hold-timeout-ms", "2500"], false).await;
    let set_mode = |mode: &'static str| {
        let app = &app;
        async move {
            let r: Value = app
                .admin
                .patch("/v1/routes/acme/prod", &json!({"mode": mode}))
                .await
                .unwrap();
            assert_eq!(r["mode"], mode);
        }
    };
    set_mode("hold").await;
    router.wait_revision(app.routing_revision().await).await;
    let req = router.tenant_req(Method::GET, "acme", "/v1/kv/x").send();
    let started = Instant::now();
    let pending = tokio::spawn(req);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "a held request waits");
    set_mode("serve").await;
    let r = pending.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(cell_of(&r), cells["acme"], "released to the route's cell");
    assert_eq!(r.status(), 404, "answered by the cell (no such key)");
    // Held past the deadline: 503 with Retry-After.
    set_mode("hold").await;
    router.wait_revision(app.routing_revision().await).await;
    let t0 = Instant::now();
    let r = router
        .tenant_req(Method::GET, "acme", "/v1/kv/x")
        .send()
        .await
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(2400),
        "{:?}",
        t0.elapsed()
    );
    assert!(r.headers().contains_key("retry-after"));
    let p = expect_problem(r, 503).await;
    assert_eq!(p["type"], "https://cellplane.dev/problems/tenant-held");
    // Other tenants are not held.
    let r = router
        .tenant_req(Method::GET, "globex", "/v1/kv/x")
        .send()
        .await
        .unwrap();
    assert_eq!(cell_of(&r), cells["globex"]);
    // Holding is audited and only operators may do it.
    let audit: Value = app
        .admin
        .get("/v1/audit?target=route/acme/prod")
        .await
        .unwrap();
    let kinds: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ROUTE_HELD", "ROUTE_RELEASED", "ROUTE_HELD"]);
    let viewer = app.client(&app.token("viewer").await);
    let r = viewer
        .request(Method::PATCH, "/v1/routes/acme/prod")
        .json(&json!({"mode": "serve"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 403).await;
});

/// Polls globex's `GET /v1/kv/x` through the router until it answers `status`.
async fn globex_answers(router: &TestRouter, status: u16) -> anyhow::Result<reqwest::Response> {
    eventually(Duration::from_secs(10), || async {
        let r = router
            .tenant_req(Method::GET, "globex", "/v1/kv/x")
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        (r.status() == status).then_some(r)
    })
    .await
}

// Cell health travels with the routes: a hung cell (its sample-cell process stopped with
// SIGSTOP: connections are accepted, nothing answers) fails its /healthz probes, and its
// tenants get 503 cell-unavailable at once instead of waiting for the upstream timeout;
// tenants on the other cell are untouched. SIGCONT brings it back.
#[tokio::test]
async fn a_hung_cell_is_taken_out_until_it_answers_again() {
    let (app, router, cells) = routed(
        Backend::Sqlite,
        &["--health-interval-ms", "100", "--health-timeout-ms", "300"],
        false,
    )
    .await;
    let hung = cells["globex"].clone();
    let pid: i32 = std::fs::read_to_string(app.cell_dir(&hung).join("run/sample-cell.pid"))
        .expect("the cell's pid file")
        .trim()
        .parse()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    struct Cont(nix::unistd::Pid);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let cont = Cont(pid);
    let r = globex_answers(&router, 503)
        .await
        .expect("the hung cell's tenant is refused");
    assert_eq!(r.headers()["retry-after"], "1");
    let p = expect_problem(r, 503).await;
    assert_eq!(p["type"], "https://cellplane.dev/problems/cell-unavailable");
    let h = router.healthz().await;
    assert_eq!(h["cells_down"], json!([hung]), "{h}");
    for t in TENANTS.iter().filter(|t| cells[**t] != hung) {
        let r = router
            .tenant_req(Method::GET, t, "/v1/kv/x")
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{t} is served by its own cell");
        assert_eq!(cell_of(&r), cells[*t]);
    }
    drop(cont);
    let r = globex_answers(&router, 404)
        .await
        .expect("served again once the cell answers");
    assert_eq!(cell_of(&r), hung);
    assert_eq!(router.healthz().await["cells_down"], json!([]));
}
