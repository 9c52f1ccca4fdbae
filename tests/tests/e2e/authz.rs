//! The authorization matrix: tenant-admin scoping, viewers, routers, revoked tokens.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

async fn token(app: &TestApp, role: &str, tenant: Option<&str>) -> String {
    let mut body = json!({"role": role});
    if let Some(t) = tenant {
        body["tenant_id"] = json!(t);
    }
    let t: Value = app.admin.post("/v1/tokens", &body).await.unwrap();
    t["token"].as_str().unwrap().to_string()
}

both_backends!(tenant_admin_is_confined_to_its_tenant, |b| async move {
    let app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    app.create_tenant("tenant-a", "acme-corp").await;
    app.create_tenant("tenant-b", "acme-corp").await;
    let job_b = app.lifecycle("tenant-b", "activate").await;
    let ta = app.client(&token(&app, "tenant-admin", Some("tenant-a")).await);

    // Own tenant: readable and writable.
    let r = ta
        .request(Method::GET, "/v1/tenants/tenant-a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = ta
        .request(Method::PATCH, "/v1/tenants/tenant-a")
        .json(&json!({"billing": {"plan": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = ta.get("/v1/tenants").await.unwrap();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tenant_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tenant-a"]);

    // Every route about tenant B: 404 (hidden) or 403.
    let b_routes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/tenants/tenant-b".into(), None),
        (
            Method::PATCH,
            "/v1/tenants/tenant-b".into(),
            Some(json!({"billing": {}})),
        ),
        (Method::POST, "/v1/tenants/tenant-b/suspend".into(), None),
        (Method::POST, "/v1/tenants/tenant-b/activate".into(), None),
        (Method::POST, "/v1/tenants/tenant-b/resume".into(), None),
        (Method::POST, "/v1/tenants/tenant-b/archive".into(), None),
        (Method::POST, "/v1/tenants/tenant-b/delete".into(), None),
        (
            Method::GET,
            "/v1/tenants/tenant-b/environments".into(),
            None,
        ),
        (
            Method::POST,
            "/v1/tenants/tenant-b/environments".into(),
            Some(json!({"name": "dev"})),
        ),
        (Method::GET, format!("/v1/jobs/{}", job_b.job_id), None),
        (Method::GET, format!("/v1/jobs/{}/log", job_b.job_id), None),
        (
            Method::POST,
            format!("/v1/jobs/{}/cancel", job_b.job_id),
            None,
        ),
        (Method::GET, "/v1/jobs?target=tenant/tenant-b".into(), None),
        (Method::GET, "/v1/audit?tenant_id=tenant-b".into(), None),
    ];
    for (m, path, body) in &b_routes {
        let mut rb = ta.request(m.clone(), path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let r = rb.send().await.unwrap();
        let s = r.status().as_u16();
        assert!(
            s == 404 || s == 403,
            "{m} {path} gave {s} to tenant A's admin"
        );
        expect_problem(r, s).await;
    }
    // Admin-level routes: 403.
    let admin_routes: Vec<(Method, &str, Option<Value>)> = vec![
        (
            Method::POST,
            "/v1/tenants",
            Some(
                json!({"tenant_id": "x1", "organization_id": "acme-corp", "profile": "mt-standard", "region": "eu-west-1"}),
            ),
        ),
        (Method::GET, "/v1/organizations", None),
        (
            Method::POST,
            "/v1/organizations",
            Some(json!({"organization_id": "o1", "name": "o"})),
        ),
        (Method::GET, "/v1/organizations/acme-corp", None),
        (Method::GET, "/v1/cells", None),
        (
            Method::POST,
            "/v1/cells",
            Some(
                json!({"cell_id": "c1", "region": "eu-west-1", "tier": "pooled", "template": "local", "capacity": {"tenants": 1, "units": 1}}),
            ),
        ),
        (Method::GET, "/v1/cells/c1", None),
        (Method::DELETE, "/v1/cells/c1", None),
        (Method::GET, "/v1/tokens", None),
        (Method::POST, "/v1/tokens", Some(json!({"role": "admin"}))),
        (Method::DELETE, "/v1/tokens/admin", None),
        (Method::GET, "/v1/audit/verify", None),
    ];
    for (m, path, body) in &admin_routes {
        let mut rb = ta.request(m.clone(), path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let r = rb.send().await.unwrap();
        expect_problem(r, 403).await;
    }
    // Its own audit and jobs are visible, and only those.
    let audit: Value = ta.get("/v1/audit").await.unwrap();
    assert!(audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["tenant_id"] == "tenant-a"));
    let jobs: Value = ta.get("/v1/jobs").await.unwrap();
    assert!(jobs["items"].as_array().unwrap().is_empty());
});

both_backends!(
    viewer_reads_but_cannot_write_and_router_only_routes,
    |b| async move {
        let app = TestApp::spawn(b).await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        let viewer = app.client(&token(&app, "viewer", None).await);
        for path in [
            "/v1/tenants",
            "/v1/tenants/acme",
            "/v1/cells",
            "/v1/jobs",
            "/v1/audit",
            "/v1/audit/verify",
            "/v1/organizations",
        ] {
            let r = viewer.request(Method::GET, path).send().await.unwrap();
            assert_eq!(r.status(), 200, "viewer GET {path}");
        }
        let writes: Vec<(Method, &str, Value)> = vec![
            (
                Method::POST,
                "/v1/organizations",
                json!({"organization_id": "o2", "name": "o"}),
            ),
            (
                Method::POST,
                "/v1/tenants",
                json!({"tenant_id": "t2", "organization_id": "acme-corp", "profile": "mt-standard", "region": "eu-west-1"}),
            ),
            (Method::PATCH, "/v1/tenants/acme", json!({"billing": {}})),
            (Method::POST, "/v1/tenants/acme/activate", json!({})),
            (
                Method::POST,
                "/v1/tenants/acme/environments",
                json!({"name": "dev"}),
            ),
            (
                Method::POST,
                "/v1/cells",
                json!({"cell_id": "c1", "region": "eu-west-1", "tier": "pooled", "template": "local", "capacity": {"tenants": 1, "units": 1}}),
            ),
            (Method::POST, "/v1/tokens", json!({"role": "viewer"})),
        ];
        for (m, path, body) in &writes {
            let r = viewer
                .request(m.clone(), path)
                .json(body)
                .send()
                .await
                .unwrap();
            expect_problem(r, 403).await;
        }
        assert_eq!(
            app.admin.get_tenant("acme").await.unwrap().version,
            1,
            "nothing changed"
        );
        let router = app.client(&token(&app, "router", None).await);
        for path in ["/v1/tenants", "/v1/cells", "/v1/audit"] {
            expect_problem(router.request(Method::GET, path).send().await.unwrap(), 403).await;
        }
        let operator = app.client(&token(&app, "operator", None).await);
        expect_problem(
            operator
                .request(Method::GET, "/v1/tokens")
                .send()
                .await
                .unwrap(),
            403,
        )
        .await;
        let r = operator
            .request(Method::PATCH, "/v1/tenants/acme")
            .json(&json!({"billing": {"plan": "o"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
);

both_backends!(tokens_are_hashed_and_revocable, |b| async move {
    let app = TestApp::spawn(b).await;
    let t: Value = app
        .admin
        .post(
            "/v1/tokens",
            &json!({"role": "viewer", "description": "ci"}),
        )
        .await
        .unwrap();
    let secret = t["token"].as_str().unwrap().to_string();
    let id = t["token_id"].as_str().unwrap().to_string();
    let viewer = app.client(&secret);
    assert_eq!(
        viewer
            .request(Method::GET, "/v1/tenants")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The secret is not stored, only its hash.
    let plain = app
        .sql_i64(&format!(
            "SELECT COUNT(*) FROM api_tokens WHERE token_hash = '{secret}'"
        ))
        .await
        .unwrap();
    assert_eq!(plain, 0);
    let hashed = app
        .sql_i64(&format!(
            "SELECT COUNT(*) FROM api_tokens WHERE token_id = '{id}' AND LENGTH(token_hash) = 64"
        ))
        .await
        .unwrap();
    assert_eq!(hashed, 1);
    let list: Value = app.admin.get("/v1/tokens").await.unwrap();
    assert!(!list.to_string().contains(&secret));
    let r = app
        .req(Method::DELETE, &format!("/v1/tokens/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_problem(
        viewer
            .request(Method::GET, "/v1/tenants")
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    // tenant-admin needs a tenant; other roles must not have one.
    let r = app
        .req(Method::POST, "/v1/tokens")
        .json(&json!({"role": "tenant-admin"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    let r = app
        .req(Method::POST, "/v1/tokens")
        .json(&json!({"role": "tenant-admin", "tenant_id": "ghost"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
});
