//! The tenant lifecycle state machine, environments and the cell registry.

use cellplane_api::{JobState, TenantState};
use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

both_backends!(lifecycle_transitions_and_illegal_ones, |b| async move {
    let app = TestApp::spawn(b).await;
    app.stamp_local("euw1-pool-1", json!({})).await;
    app.create_org("acme-corp").await;
    app.create_tenant("acme", "acme-corp").await;
    let post = |action: &str| {
        app.req(Method::POST, &format!("/v1/tenants/acme/{action}"))
            .send()
    };
    // From draft only activate is legal.
    for illegal in ["suspend", "resume", "archive", "delete"] {
        expect_problem(post(illegal).await.unwrap(), 409).await;
    }
    expect_problem(post("explode").await.unwrap(), 404).await;
    let job = app.lifecycle("acme", "activate").await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.progress, 1.0);
    assert_eq!(
        app.admin.get_tenant("acme").await.unwrap().state,
        TenantState::Active
    );
    for illegal in ["activate", "resume", "delete"] {
        expect_problem(post(illegal).await.unwrap(), 409).await;
    }
    app.lifecycle("acme", "suspend").await;
    assert_eq!(
        app.admin.get_tenant("acme").await.unwrap().state,
        TenantState::Suspended
    );
    expect_problem(post("suspend").await.unwrap(), 409).await;
    app.lifecycle("acme", "resume").await;
    assert_eq!(
        app.admin.get_tenant("acme").await.unwrap().state,
        TenantState::Active
    );
    app.lifecycle("acme", "archive").await;
    assert_eq!(
        app.admin.get_tenant("acme").await.unwrap().state,
        TenantState::Archived
    );
    expect_problem(post("activate").await.unwrap(), 409).await;
    app.lifecycle("acme", "delete").await;
    let t = app.admin.get_tenant("acme").await.unwrap();
    assert_eq!(t.state, TenantState::Deleted);
    // Every step is in the audit trail, in order.
    let audit: Value = app.admin.get("/v1/audit?target=tenant/acme").await.unwrap();
    let events: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event_type"].as_str().unwrap())
        .filter(|e| !e.ends_with("_REQUESTED"))
        .collect();
    assert_eq!(
        events,
        [
            "TENANCY_CREATED",
            "TENANCY_PLACED",
            "ROUTE_CHANGED",
            "TENANCY_ACTIVATED",
            "ROUTE_CHANGED",
            "TENANCY_SUSPENDED",
            "ROUTE_CHANGED",
            "TENANCY_RESUMED",
            "ROUTE_REMOVED",
            "TENANCY_CAPACITY_RELEASED",
            "TENANCY_ARCHIVED",
            "TENANCY_CAPACITY_RELEASED",
            "TENANCY_DELETED"
        ]
    );
    // Archive gave the capacity back; delete forgot the cell.
    let cell = app.cell("euw1-pool-1").await;
    assert_eq!((cell.used.tenants, cell.used.units), (0, 0));
    assert_eq!(t.environments[0].cell_id, None);
    // A deleted tenant's id stays taken.
    let r = app
        .req(Method::POST, "/v1/tenants")
        .json(&json!({"tenant_id": "acme", "organization_id": "acme-corp",
                      "profile": "mt-standard", "region": "eu-west-1"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 409).await;
});

both_backends!(
    second_action_while_job_pending_is_a_conflict,
    |b| async move {
        let app = TestApp::spawn_with(
            b,
            AppOptions::default().with("CELLPLANE__JOBS__STEP_DELAY_MS", "500"),
        )
        .await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        let r = app
            .req(Method::POST, "/v1/tenants/acme/activate")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let r = app
            .req(Method::POST, "/v1/tenants/acme/activate")
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 409).await;
        assert!(p["detail"].as_str().unwrap().contains("in progress"), "{p}");
    }
);

both_backends!(retention_blocks_early_delete, |b| async move {
    let app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    let r = app
        .req(Method::POST, "/v1/tenants")
        .json(
            &json!({"tenant_id": "acme", "organization_id": "acme-corp", "profile": "st-dedicated",
                      "region": "eu-west-1", "policies": {"retentionDays": 30}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    app.lifecycle("acme", "activate").await;
    app.lifecycle("acme", "archive").await;
    let r = app
        .req(Method::POST, "/v1/tenants/acme/delete")
        .send()
        .await
        .unwrap();
    let p = expect_problem(r, 409).await;
    assert!(p["detail"].as_str().unwrap().contains("retention"));
    let r = app
        .req(Method::POST, "/v1/tenants/acme/delete?force=true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
});

both_backends!(environments_and_resource_mapping, |b| async move {
    let app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    let t = app.create_tenant("acme", "acme-corp").await;
    assert_eq!(t["environments"][0]["name"], "prod");
    assert_eq!(t["environments"][0]["resource_mapping"]["schema"], "t_acme");
    let r = app
        .req(Method::POST, "/v1/tenants/acme/environments")
        .json(&json!({"name": "dev", "isolation_level": "strict"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .req(Method::POST, "/v1/tenants/acme/environments")
        .json(&json!({"name": "dev"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 409).await;
    let r = app
        .req(Method::POST, "/v1/tenants/acme/environments")
        .json(&json!({"name": "qa"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    let envs: Value = app
        .admin
        .get("/v1/tenants/acme/environments")
        .await
        .unwrap();
    let names: Vec<&str> = envs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dev", "prod"]);
    // Dedicated tenants map to their own database and bucket.
    let r = app
        .req(Method::POST, "/v1/tenants")
        .json(
            &json!({"tenant_id": "globex", "organization_id": "acme-corp",
                      "profile": "st-dedicated", "region": "us-east-1"}),
        )
        .send()
        .await
        .unwrap();
    let g: Value = r.json().await.unwrap();
    assert_eq!(
        g["environments"][0]["resource_mapping"]["bucket"],
        "data-globex"
    );
    // Filters.
    let list: Value = app.admin.get("/v1/tenants?region=us-east-1").await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let list: Value = app
        .admin
        .get("/v1/tenants?organization_id=acme-corp&state=draft")
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
});

both_backends!(cell_registry, |b| async move {
    let app = TestApp::spawn(b).await;
    let body = json!({"cell_id": "euw1-pool-1", "region": "eu-west-1", "tier": "pooled",
        "template": "local", "capacity": {"tenants": 50, "units": 100},
        "labels": {"canary": "true"}, "vars": {"instance_class": "small"}});
    let r = app
        .req(Method::POST, "/v1/cells")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["cell"]["state"], "pending");
    assert_eq!(out["cell"]["used"]["tenants"], 0);
    let stamp = out["job"]["job_id"]
        .as_str()
        .expect("a stamp job")
        .to_string();
    expect_problem(
        app.req(Method::POST, "/v1/cells")
            .json(&body)
            .send()
            .await
            .unwrap(),
        409,
    )
    .await;
    let cells: Value = app
        .admin
        .get("/v1/cells?region=eu-west-1&tier=pooled")
        .await
        .unwrap();
    assert_eq!(cells["items"].as_array().unwrap().len(), 1);
    let done = app
        .wait_job(&stamp, std::time::Duration::from_secs(120))
        .await;
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{}",
        app.job_log(&stamp).await
    );
    let c = app.cell("euw1-pool-1").await;
    assert_eq!(c.state, cellplane_api::CellState::Active);
    let r = app
        .req(Method::PATCH, "/v1/cells/euw1-pool-1")
        .header("If-Match", format!("\"{}\"", c.version))
        .json(&json!({"labels": {"canary": "false"}, "capacity": {"tenants": 10, "units": 20}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let patched: Value = r.json().await.unwrap();
    assert!(
        patched["pending_job_id"].is_null(),
        "labels and capacity need no job"
    );
    let r = app
        .req(Method::POST, "/v1/cells/euw1-pool-1/drain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .req(Method::DELETE, "/v1/cells/euw1-pool-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let out: Value = r.json().await.unwrap();
    let destroy = out["job"]["job_id"].as_str().unwrap().to_string();
    app.wait_job(&destroy, std::time::Duration::from_secs(120))
        .await;
    let c: Value = app.admin.get("/v1/cells/euw1-pool-1").await.unwrap();
    assert_eq!(c["state"], "destroyed");
    let bad = json!({"cell_id": "c2", "region": "eu-west-1", "tier": "pooled", "template": "local",
        "capacity": {"tenants": 0, "units": 1}, "vars": {"Bad-Name": 1}});
    let p = expect_problem(
        app.req(Method::POST, "/v1/cells")
            .json(&bad)
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"capacity.tenants") && fields.contains(&"vars.Bad-Name"),
        "{p}"
    );
});
