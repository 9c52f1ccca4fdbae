//! Placement through the real binary with real stamped `local` cells: region preference,
//! residency, tier and capacity; the recorded reason; dedicated cells; and no over-commit
//! under 200 concurrent activations (with and without auto-stamp).

use cellplane_api::{JobState, TenantState};
use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

fn fast_placement() -> AppOptions {
    AppOptions::default()
        .with("CELLPLANE__PLACEMENT__STAMP_POLL_MS", "100")
        .with("CELLPLANE__JOBS__WORKERS", "8")
}

async fn tenant(app: &TestApp, id: &str) -> Value {
    app.admin.get(&format!("/v1/tenants/{id}")).await.unwrap()
}

both_backends!(
    placement_honours_region_residency_tier_and_capacity,
    |b| async move {
        let app = TestApp::spawn_with(b, fast_placement()).await;
        app.stamp_cells(&[
            ("euw1-pool", "eu-west-1", "pooled", 2, 3),
            ("use1-pool", "us-east-1", "pooled", 10, 10),
            ("euw1-big-ded", "eu-west-1", "dedicated", 100, 100),
        ])
        .await;
        app.create_org("acme-corp").await;
        let mk = |id: &str, region: &str, quotas: Value, policies: Value| {
            json!({"tenant_id": id, "organization_id": "acme-corp", "profile": "mt-standard",
                   "region": region, "quotas": quotas, "policies": policies})
        };
        // Home region first, even though the other region's cell is emptier.
        app.create_tenant_with(mk("home", "eu-west-1", json!({}), json!({})))
            .await;
        let j = app.lifecycle("home", "activate").await;
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        let t = tenant(&app, "home").await;
        assert_eq!(t["environments"][0]["cell_id"], "euw1-pool");
        assert!(t["environments"][0]["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"));
        let d = &t["placement"]["prod"];
        assert_eq!(d["cell_id"], "euw1-pool");
        assert_eq!(d["strategy"], "spread");
        assert_eq!(d["tier"], "pooled");
        assert!(d["reason"].as_str().unwrap().contains("home region"), "{d}");
        assert_eq!(d["candidates"], json!(["euw1-pool"]));
        // Units count: 2 units fit in the 2 left on euw1-pool.
        app.create_tenant_with(mk("big", "eu-west-1", json!({"units": 2}), json!({})))
            .await;
        assert_eq!(
            app.lifecycle("big", "activate").await.state,
            JobState::Succeeded
        );
        let cell = app.cell("euw1-pool").await;
        assert_eq!((cell.used.tenants, cell.used.units), (2, 3));
        // The home region is full. In-region-only residency: nowhere to go, even though a
        // dedicated-tier cell in the region has plenty of room.
        app.create_tenant_with(mk(
            "strict",
            "eu-west-1",
            json!({}),
            json!({"dataResidency": "in-region-only"}),
        ))
        .await;
        let j = app.lifecycle("strict", "activate").await;
        assert_eq!(j.state, JobState::Failed);
        let err = j.error.unwrap();
        assert!(
            err.contains("no active pooled cell in eu-west-1 has room"),
            "{err}"
        );
        assert!(err.contains("euw1-pool 2/2 tenants"), "{err}");
        let t = tenant(&app, "strict").await;
        assert_eq!(t["state"], "draft");
        assert_eq!(t["placement"]["prod"]["failed"], true);
        // Allowed regions: placed in the other region, and the reason says why.
        app.create_tenant_with(mk(
            "roamer",
            "eu-west-1",
            json!({}),
            json!({"dataResidency": "allowed-regions", "allowedRegions": ["eu-west-1", "us-east-1"]}),
        ))
        .await;
        let j = app.lifecycle("roamer", "activate").await;
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        let t = tenant(&app, "roamer").await;
        assert_eq!(t["environments"][0]["cell_id"], "use1-pool");
        assert!(t["placement"]["prod"]["reason"]
            .as_str()
            .unwrap()
            .contains("allowed region"));
        // Too many units for any cell.
        app.create_tenant_with(mk("huge", "us-east-1", json!({"units": 11}), json!({})))
            .await;
        let j = app.lifecycle("huge", "activate").await;
        assert_eq!(j.state, JobState::Failed);
        assert!(j.error.unwrap().contains("11 unit(s)"));
        // The dedicated-tier cell never received a pooled tenant.
        assert_eq!(app.cell("euw1-big-ded").await.used.tenants, 0);
        // A failed activation holds nothing and can be retried once there is room.
        let r = app
            .req(Method::PATCH, "/v1/cells/euw1-pool")
            .json(&json!({"capacity": {"tenants": 3, "units": 4}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let j = app.lifecycle("strict", "activate").await;
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        assert_eq!(
            tenant(&app, "strict").await["environments"][0]["cell_id"],
            "euw1-pool"
        );
        // Archive releases; the cell shows it.
        app.lifecycle("home", "archive").await;
        let cell = app.cell("euw1-pool").await;
        assert_eq!((cell.used.tenants, cell.used.units), (2, 3));
        assert!(app.audit_verify_ok().await);
    }
);

both_backends!(dedicated_profiles_get_a_stamped_cell, |b| async move {
    let app = TestApp::spawn_with(b, fast_placement()).await;
    app.create_org("acme-corp").await;
    app.create_tenant_with(json!({"tenant_id": "bigco", "organization_id": "acme-corp",
        "profile": "st-dedicated", "region": "eu-west-1",
        "policies": {"encryption": "kms-per-tenant"}}))
        .await;
    let j = app.start_action("bigco", "activate").await;
    let done = app.wait_job(&j.job_id, Duration::from_secs(180)).await;
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{done:?}\n{}",
        app.job_log(&j.job_id).await
    );
    let t = tenant(&app, "bigco").await;
    assert_eq!(t["state"], "active");
    assert_eq!(t["environments"][0]["cell_id"], "bigco-ded");
    assert_eq!(t["placement"]["prod"]["tier"], "dedicated");
    assert_eq!(t["placement"]["prod"]["stamped"], true);
    let cell = app.cell("bigco-ded").await;
    assert_eq!(cell.tier, cellplane_api::Tier::Dedicated);
    assert_eq!(cell.labels["tenant"], "bigco");
    assert_eq!(cell.used.tenants, 1);
    assert!(app.job_log(&j.job_id).await.contains("waiting: place"));
    // Its route points at its own cell.
    let route: Value = app.admin.get("/v1/routes/bigco/prod").await.unwrap();
    assert_eq!(route["cell_id"], "bigco-ded");
    assert_eq!(route["mode"], "serve");
});

/// Creates `n` tenants and activates them all at once; returns the finished jobs.
async fn activate_many(app: &TestApp, n: usize) -> Vec<cellplane_api::Job> {
    app.create_org("acme-corp").await;
    for i in 0..n {
        app.create_tenant(&format!("t{i:03}"), "acme-corp").await;
    }
    let posts = (0..n).map(|i| app.start_action_owned(format!("t{i:03}")));
    let jobs = futures_util::future::join_all(posts).await;
    let mut done = Vec::new();
    for j in jobs {
        done.push(app.wait_job(&j.job_id, Duration::from_secs(180)).await);
    }
    done
}

both_backends!(concurrent_activations_never_overcommit, |b| async move {
    let app = TestApp::spawn_with(b, fast_placement()).await;
    app.stamp_cells(&[
        ("pool-a", "eu-west-1", "pooled", 50, 50),
        ("pool-b", "eu-west-1", "pooled", 50, 50),
        ("pool-c", "eu-west-1", "pooled", 50, 50),
    ])
    .await;
    let started = std::time::Instant::now();
    let jobs = activate_many(&app, 200).await;
    let ok = jobs
        .iter()
        .filter(|j| j.state == JobState::Succeeded)
        .count();
    let failed: Vec<_> = jobs
        .iter()
        .filter(|j| j.state == JobState::Failed)
        .collect();
    assert_eq!(ok, 150, "exactly the room there is");
    assert_eq!(failed.len(), 50);
    for j in &failed {
        let e = j.error.as_deref().unwrap_or("");
        assert!(
            e.contains("no active pooled cell in eu-west-1 has room"),
            "{e}"
        );
    }
    let mut used = 0;
    for id in ["pool-a", "pool-b", "pool-c"] {
        let c = app.cell(id).await;
        assert_eq!(c.used.tenants, 50, "{id} is full, not over");
        assert_eq!(c.used.units, 50);
        used += c.used.tenants;
    }
    assert_eq!(used, 150);
    let placed = app
        .sql_i64("SELECT COUNT(*) FROM environments WHERE cell_id IS NOT NULL")
        .await
        .unwrap();
    assert_eq!(placed, 150);
    let routes: Value = app.admin.get("/v1/routes?since=0").await.unwrap();
    assert_eq!(routes["upserts"].as_array().unwrap().len(), 150);
    let active = app
        .sql_i64("SELECT COUNT(*) FROM tenants WHERE state = 'active'")
        .await
        .unwrap();
    assert_eq!(active, 150);
    eprintln!("200 activations took {:?}", started.elapsed());
});

both_backends!(
    concurrent_activations_with_auto_stamp_all_place,
    |b| async move {
        let app = TestApp::spawn_with(b, fast_placement()).await;
        app.stamp_cells(&[
            ("pool-a", "eu-west-1", "pooled", 50, 50),
            ("pool-b", "eu-west-1", "pooled", 50, 50),
            ("pool-c", "eu-west-1", "pooled", 50, 50),
        ])
        .await;
        let r = app
            .req(Method::PUT, "/v1/regions/eu-west-1")
            .json(&json!({"auto_stamp": true, "default_template": "local",
                      "pooled_capacity": {"tenants": 50, "units": 50}, "prestamp_threshold": 1.0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let jobs = activate_many(&app, 200).await;
        for j in &jobs {
            assert_eq!(
                j.state,
                JobState::Succeeded,
                "{j:?}\n{}",
                app.job_log(&j.job_id).await
            );
        }
        let active = app
            .sql_i64("SELECT COUNT(*) FROM tenants WHERE state = 'active'")
            .await
            .unwrap();
        assert_eq!(active, 200);
        // At least one cell was stamped by placement, and nothing is over capacity.
        let cells: Value = app.admin.get("/v1/cells").await.unwrap();
        let cells = cells["items"].as_array().unwrap();
        let auto: Vec<_> = cells
            .iter()
            .filter(|c| c["labels"]["origin"] == "auto-stamp")
            .collect();
        assert!(!auto.is_empty());
        let mut used = 0;
        for c in cells {
            assert!(c["used"]["tenants"].as_u64() <= c["capacity"]["tenants"].as_u64());
            used += c["used"]["tenants"].as_u64().unwrap();
        }
        assert_eq!(used, 200);
        let t: Value = app
            .admin
            .get("/v1/tenants?state=active&limit=1000")
            .await
            .unwrap();
        assert_eq!(t["items"].as_array().unwrap().len(), 200);
        assert_eq!(
            app.admin.get_tenant("t000").await.unwrap().state,
            TenantState::Active
        );
    }
);

both_backends!(pre_stamps_past_the_utilization_threshold, |b| async move {
    let app = TestApp::spawn_with(b, fast_placement()).await;
    app.stamp_cells(&[("pool-a", "eu-west-1", "pooled", 2, 2)])
        .await;
    let r = app
        .req(Method::PUT, "/v1/regions/eu-west-1")
        .json(&json!({"auto_stamp": true, "prestamp_threshold": 0.5,
                      "pooled_capacity": {"tenants": 5, "units": 5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    app.create_org("acme-corp").await;
    app.create_tenant("one", "acme-corp").await;
    assert_eq!(
        app.lifecycle("one", "activate").await.state,
        JobState::Succeeded
    );
    let cells: Value = app.admin.get("/v1/cells").await.unwrap();
    assert_eq!(
        cells["items"].as_array().unwrap().len(),
        1,
        "50% is not past 50%"
    );
    app.create_tenant("two", "acme-corp").await;
    assert_eq!(
        app.lifecycle("two", "activate").await.state,
        JobState::Succeeded
    );
    let cells: Value = app.admin.get("/v1/cells").await.unwrap();
    let cells = cells["items"].as_array().unwrap();
    assert_eq!(
        cells.len(),
        2,
        "a pooled cell is pre-stamped at 100%: {cells:?}"
    );
    let new = cells.iter().find(|c| c["cell_id"] != "pool-a").unwrap();
    assert_eq!(new["labels"]["origin"], "auto-stamp");
    assert_eq!(new["capacity"]["tenants"], 5);
    // The third tenant goes to the pre-stamped cell once it is active.
    let id = new["cell_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(120), || async {
        (app.cell(&id).await.state == cellplane_api::CellState::Active).then_some(())
    })
    .await
    .expect("the pre-stamped cell becomes active");
    app.create_tenant("three", "acme-corp").await;
    assert_eq!(
        app.lifecycle("three", "activate").await.state,
        JobState::Succeeded
    );
    assert_eq!(
        tenant(&app, "three").await["environments"][0]["cell_id"],
        id.as_str()
    );
});

// An environment created on an active tenant is placed and routed by its own job, without
// touching the routes of the tenant's other environments (an operator's hold stays). On a
// suspended tenant it waits for resume; on a draft tenant, for activate.
both_backends!(
    new_environment_of_an_active_tenant_is_placed,
    |b| async move {
        let app = TestApp::spawn_with(b, fast_placement()).await;
        app.stamp_cells(&[("euw1-pool", "eu-west-1", "pooled", 10, 10)])
            .await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        // Draft: no job; activate places both.
        let e: Value = app
            .admin
            .post(
                "/v1/tenants/acme/environments",
                &json!({"name": "stage", "isolation_level": "shared"}),
            )
            .await
            .unwrap();
        assert!(e.get("placement_job_id").is_none(), "{e}");
        assert_eq!(
            app.lifecycle("acme", "activate").await.state,
            JobState::Succeeded
        );
        let t = tenant(&app, "acme").await;
        let placed: Vec<&Value> = t["environments"].as_array().unwrap().iter().collect();
        assert!(placed.iter().all(|e| e["cell_id"] == "euw1-pool"), "{t}");
        // Active: hold prod, then add dev; dev is placed and served, prod stays held.
        let _: Value = app
            .admin
            .patch("/v1/routes/acme/prod", &json!({"mode": "hold"}))
            .await
            .unwrap();
        let e: Value = app
            .admin
            .post(
                "/v1/tenants/acme/environments",
                &json!({"name": "dev", "isolation_level": "shared"}),
            )
            .await
            .unwrap();
        let job = e["placement_job_id"]
            .as_str()
            .expect("a placement job")
            .to_string();
        let done = app.wait_job(&job, Duration::from_secs(60)).await;
        assert_eq!(
            done.state,
            JobState::Succeeded,
            "{done:?}\n{}",
            app.job_log(&job).await
        );
        let t = tenant(&app, "acme").await;
        let dev = t["environments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "dev")
            .unwrap();
        assert_eq!(dev["cell_id"], "euw1-pool", "{t}");
        assert_eq!(t["placement"]["dev"]["cell_id"], "euw1-pool", "{t}");
        let r: Value = app.admin.get("/v1/routes/acme/dev").await.unwrap();
        assert_eq!(r["mode"], "serve", "{r}");
        assert_eq!(r["endpoint"], dev["endpoint"]);
        let r: Value = app.admin.get("/v1/routes/acme/prod").await.unwrap();
        assert_eq!(r["mode"], "hold", "{r}");
        assert_eq!(app.cell("euw1-pool").await.used.tenants, 3);
        // Suspended: the new environment waits for resume, which places and routes it.
        app.create_tenant("beta", "acme-corp").await;
        assert_eq!(
            app.lifecycle("beta", "activate").await.state,
            JobState::Succeeded
        );
        assert_eq!(
            app.lifecycle("beta", "suspend").await.state,
            JobState::Succeeded
        );
        let e: Value = app
            .admin
            .post(
                "/v1/tenants/beta/environments",
                &json!({"name": "dev", "isolation_level": "shared"}),
            )
            .await
            .unwrap();
        assert!(e.get("placement_job_id").is_none(), "{e}");
        let r = app
            .req(Method::GET, "/v1/routes/beta/dev")
            .send()
            .await
            .unwrap();
        expect_problem(r, 404).await;
        assert_eq!(
            app.lifecycle("beta", "resume").await.state,
            JobState::Succeeded
        );
        let r: Value = app.admin.get("/v1/routes/beta/dev").await.unwrap();
        assert_eq!(r["mode"], "serve", "{r}");
        assert!(app.audit_verify_ok().await);
    }
);
