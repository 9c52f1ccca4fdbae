//! The routing API: the watch, heartbeats and the router registry, region policies, the
//! router token's narrow scope, and placement failing clearly when no cell fits.

use cellplane_api::JobState;
use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

both_backends!(
    router_token_reads_routes_and_heartbeats_only,
    |b| async move {
        let app = TestApp::spawn(b).await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        let router = app.client(&app.token("router").await);
        let full: Value = router.get("/v1/routes?since=0").await.unwrap();
        assert_eq!(full["full"], true);
        assert_eq!(full["revision"], 0);
        assert_eq!(full["upserts"], json!([]));
        let hb: Value = router
            .post(
                "/v1/routers/edge-1/heartbeat",
                &json!({"applied_revision": 0, "stats": {"routes": 0}}),
            )
            .await
            .unwrap();
        assert_eq!(hb["router_id"], "edge-1");
        // Everything else is out of reach.
        for (m, p) in [
            (Method::GET, "/v1/tenants"),
            (Method::GET, "/v1/tenants/acme"),
            (Method::GET, "/v1/cells"),
            (Method::GET, "/v1/routers"),
            (Method::GET, "/v1/audit"),
            (Method::POST, "/v1/tenants/acme/suspend"),
            (Method::PATCH, "/v1/routes/acme/prod"),
        ] {
            let mut rb = router.request(m.clone(), p);
            if m != Method::GET {
                rb = rb.json(&json!({"mode": "hold"}));
            }
            let r = rb.send().await.unwrap();
            assert!(
                r.status() == 403 || r.status() == 404,
                "{m} {p} answered {}",
                r.status()
            );
            expect_problem(r, 403).await;
        }
        // Tenant admins and viewers cannot watch routes or heartbeat.
        let t: Value = app
            .admin
            .post(
                "/v1/tokens",
                &json!({"role": "tenant-admin", "tenant_id": "acme"}),
            )
            .await
            .unwrap();
        let ta = app.client(t["token"].as_str().unwrap());
        let viewer = app.client(&app.token("viewer").await);
        for c in [&ta, &viewer] {
            expect_problem(
                c.request(Method::GET, "/v1/routes").send().await.unwrap(),
                403,
            )
            .await;
            let r = c
                .request(Method::POST, "/v1/routers/edge-2/heartbeat")
                .json(&json!({"applied_revision": 0}))
                .send()
                .await
                .unwrap();
            expect_problem(r, 403).await;
        }
        // Operators see the router registry.
        let routers: Value = app.admin.get("/v1/routers").await.unwrap();
        let items = routers["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["router_id"], "edge-1");
        assert_eq!(items[0]["applied_revision"], 0);
        assert_eq!(items[0]["live"], true);
        // The first heartbeat of a router is audited, later ones are not.
        router
            .post::<_, Value>(
                "/v1/routers/edge-1/heartbeat",
                &json!({"applied_revision": 0}),
            )
            .await
            .unwrap();
        let audit: Value = app
            .admin
            .get("/v1/audit?target=router/edge-1")
            .await
            .unwrap();
        assert_eq!(audit["items"].as_array().unwrap().len(), 1);
    }
);

both_backends!(watch_validates_and_long_polls, |b| async move {
    let app = TestApp::spawn(b).await;
    for q in ["since=-1", "since=x", "wait=61", "wait=-1", "nope=1"] {
        let r = app
            .req(Method::GET, &format!("/v1/routes?{q}"))
            .send()
            .await
            .unwrap();
        expect_problem(r, 400).await;
    }
    let r = app
        .req(Method::POST, "/v1/routers/edge-1/heartbeat")
        .json(&json!({"applied_revision": -3}))
        .send()
        .await
        .unwrap();
    let p = expect_problem(r, 400).await;
    assert_eq!(p["errors"][0]["field"], "applied_revision");
    let r = app
        .req(Method::POST, "/v1/routers/Bad_Id/heartbeat")
        .json(&json!({"applied_revision": 0}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    // Nothing changes: the poll waits for `wait` and returns the same revision.
    let t = Instant::now();
    let v: Value = app.admin.get("/v1/routes?since=0&wait=0").await.unwrap();
    let rev = v["revision"].as_i64().unwrap();
    let v: Value = app
        .admin
        .get(&format!("/v1/routes?since={rev}&wait=1"))
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(v["revision"], rev);
    // A revision from the future (a restored store) gets the full table.
    let v: Value = app.admin.get("/v1/routes?since=999").await.unwrap();
    assert_eq!(v["full"], true);
    // Unknown routes are 404; holding them too.
    let r = app
        .req(Method::GET, "/v1/routes/acme/prod")
        .send()
        .await
        .unwrap();
    expect_problem(r, 404).await;
    let r = app
        .req(Method::PATCH, "/v1/routes/acme/prod")
        .json(&json!({"mode": "hold"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 404).await;
    let r = app
        .req(Method::PATCH, "/v1/routes/acme/prod")
        .json(&json!({"mode": "suspended"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
});

both_backends!(region_policies, |b| async move {
    let app = TestApp::spawn(b).await;
    let r = app
        .req(Method::PUT, "/v1/regions/eu-west-1")
        .json(&json!({"auto_stamp": true, "default_template": "local",
                      "pooled_capacity": {"tenants": 10, "units": 20}, "strategy": "binpack"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "\"1\"");
    let got: Value = app.admin.get("/v1/regions/eu-west-1").await.unwrap();
    assert_eq!(got["policy"]["strategy"], "binpack");
    assert_eq!(got["policy"]["auto_stamp"], true);
    let r = app
        .req(Method::PUT, "/v1/regions/eu-west-1")
        .header("if-match", "\"7\"")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 412).await;
    for bad in [
        json!({"prestamp_threshold": 1.5}),
        json!({"pooled_capacity": {"tenants": 0, "units": 1}}),
        json!({"strategy": "random"}),
        json!({"auto_stamp": "yes"}),
        json!({"vars": {"Bad-Name": 1}}),
        json!({"surprise": 1}),
    ] {
        let r = app
            .req(Method::PUT, "/v1/regions/eu-west-1")
            .json(&bad)
            .send()
            .await
            .unwrap();
        expect_problem(r, 400).await;
    }
    let r = app
        .req(Method::GET, "/v1/regions/nowhere")
        .send()
        .await
        .unwrap();
    expect_problem(r, 404).await;
    let list: Value = app.admin.get("/v1/regions").await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
});

both_backends!(
    activation_without_room_fails_with_the_reason,
    |b| async move {
        let app = TestApp::spawn(b).await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        let job = app.lifecycle("acme", "activate").await;
        assert_eq!(job.state, JobState::Failed, "{job:?}");
        let err = job.error.unwrap_or_default();
        assert!(err.contains("no active pooled cell"), "{err}");
        assert!(err.contains("auto-stamp is off"), "{err}");
        let t: Value = app.admin.get("/v1/tenants/acme").await.unwrap();
        assert_eq!(t["state"], "draft");
        assert_eq!(t["placement"]["prod"]["failed"], true);
        assert!(t["placement"]["prod"]["reason"]
            .as_str()
            .unwrap()
            .contains("no active pooled cell"));
        assert_eq!(t["environments"][0]["cell_id"], Value::Null);
        // Nothing was published.
        let routes: Value = app.admin.get("/v1/routes?since=0").await.unwrap();
        assert_eq!(routes["upserts"], json!([]));
    }
);

both_backends!(
    watch_serves_deltas_removals_and_bounded_history,
    |b| async move {
        let app = TestApp::spawn_with(
            b,
            AppOptions::default().with("CELLPLANE__ROUTING__HISTORY_LIMIT", "2"),
        )
        .await;
        app.stamp_local("euw1-pool-1", json!({})).await;
        app.create_org("acme-corp").await;
        for t in ["acme", "globex"] {
            app.create_tenant(t, "acme-corp").await;
            assert_eq!(
                app.lifecycle(t, "activate").await.state,
                JobState::Succeeded
            );
        }
        let r1 = app.routing_revision().await;
        assert_eq!(r1, 2, "one revision per published route");
        // A delta carries only what changed since.
        let d: Value = app.admin.get("/v1/routes?since=1").await.unwrap();
        assert_eq!(d["full"], false);
        assert_eq!(d["upserts"].as_array().unwrap().len(), 1);
        assert_eq!(d["upserts"][0]["tenant_id"], "globex");
        // A waiting watch answers as soon as the table changes.
        let watcher = {
            let c = app.admin.clone();
            tokio::spawn(async move {
                c.get::<Value>(&format!("/v1/routes?since={r1}&wait=30"))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        app.lifecycle("globex", "suspend").await;
        let got = watcher.await.unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(got["revision"], r1 + 1);
        assert_eq!(got["upserts"][0]["mode"], "suspended");
        // Archive removes the route: a removal in the delta.
        app.lifecycle("globex", "archive").await;
        let d: Value = app
            .admin
            .get(&format!("/v1/routes?since={}", r1 + 1))
            .await
            .unwrap();
        assert_eq!(
            d["removals"],
            json!([{"tenant_id": "globex", "env": "prod"}])
        );
        assert_eq!(d["upserts"], json!([]));
        // Only 2 changes are kept: older watchers get the full table.
        let d: Value = app.admin.get("/v1/routes?since=1").await.unwrap();
        assert_eq!(d["full"], true);
        assert_eq!(d["upserts"].as_array().unwrap().len(), 1, "acme only");
        let h: Value = app.admin.get("/v1/routes/history").await.unwrap();
        assert_eq!(h["items"].as_array().unwrap().len(), 2);
    }
);

// A full table read while routes are rewritten must hold every route: the revision and
// the rows come from one snapshot, or a route rewritten between the two reads drops out.
both_backends!(full_table_is_one_snapshot_under_writes, |b| async move {
    let app = TestApp::spawn(b).await;
    let n = 20;
    let mut seed = String::new();
    for i in 0..n {
        seed.push_str(&format!(
            "INSERT INTO routes (tenant_id, env, cell_id, endpoint, mode, rate_limit, revision, updated_at) \
             VALUES ('t-{i}', 'prod', 'c-1', 'http://127.0.0.1:9', 'serve', NULL, 1, '2026-01-01T00:00:00Z');"
        ));
    }
    for stmt in seed.split_terminator(';') {
        app.sql(stmt).await.unwrap();
    }
    app.sql("UPDATE routing_revision SET revision = 1 WHERE id = 1")
        .await
        .unwrap();
    let writer = app.admin.clone();
    let writes = tokio::spawn(async move {
        for k in 0..200 {
            let mode = if k % 2 == 0 { "hold" } else { "serve" };
            let _: Value = writer
                .patch(
                    &format!("/v1/routes/t-{}/prod", k % n),
                    &json!({"mode": mode}),
                )
                .await
                .unwrap();
        }
    });
    let mut reads = 0;
    while !writes.is_finished() {
        let v: Value = app.admin.get("/v1/routes?since=0").await.unwrap();
        let got = v["upserts"].as_array().unwrap().len();
        assert_eq!(
            got, n,
            "full table at revision {} after {reads} reads",
            v["revision"]
        );
        reads += 1;
    }
    writes.await.unwrap();
    assert!(reads >= 5, "only {reads} reads overlapped the writes");
});
