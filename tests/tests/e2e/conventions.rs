//! Every convention of the HTTP contract, end to end.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

both_backends!(problem_documents_and_correlation_ids, |b| async move {
    let app = TestApp::spawn(b).await;
    // Unknown route, unknown resource, missing token: all problem+json.
    expect_problem(app.req(Method::GET, "/v1/nope").send().await.unwrap(), 404).await;
    expect_problem(
        app.req(Method::GET, "/v1/tenants/ghost")
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    expect_problem(
        app.anonymous()
            .request(Method::GET, "/v1/tenants")
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    expect_problem(
        app.client("wrong-token")
            .request(Method::GET, "/v1/tenants")
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    expect_problem(
        app.req(Method::PUT, "/v1/tenants").send().await.unwrap(),
        405,
    )
    .await;

    // Correlation id: echoed when sent, generated when not, recorded on audit and jobs.
    app.create_org("acme-corp").await;
    let r = app
        .req(Method::POST, "/v1/tenants")
        .header("X-Correlation-ID", "corr-test-123")
        .json(&json!({"tenant_id": "acme", "organization_id": "acme-corp",
                      "profile": "mt-standard", "region": "eu-west-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-correlation-id"], "corr-test-123");
    assert_eq!(r.status(), 201);
    let r = app.req(Method::GET, "/healthz").send().await.unwrap();
    assert!(r.headers().get("x-correlation-id").is_some());
    let r = app
        .req(Method::POST, "/v1/tenants/acme/activate")
        .header("X-Correlation-ID", "corr-activate-1")
        .send()
        .await
        .unwrap();
    let job: cellplane_api::Job = r.json().await.unwrap();
    assert_eq!(job.correlation_id.as_deref(), Some("corr-activate-1"));
    let audit: Value = app.admin.get("/v1/audit?tenant_id=acme").await.unwrap();
    let items = audit["items"].as_array().unwrap();
    assert!(items
        .iter()
        .any(|r| r["event_type"] == "TENANCY_CREATED" && r["correlation_id"] == "corr-test-123"));
    assert!(items
        .iter()
        .any(|r| r["event_type"] == "TENANCY_ACTIVATE_REQUESTED"
            && r["correlation_id"] == "corr-activate-1"));
    // A malformed correlation id is replaced, not echoed.
    let r = app
        .req(Method::GET, "/healthz")
        .header("X-Correlation-ID", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(r.headers()["x-correlation-id"], "bad id with spaces");
});

both_backends!(etag_and_if_match, |b| async move {
    let app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    app.create_tenant("acme", "acme-corp").await;
    let r = app
        .req(Method::GET, "/v1/tenants/acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["etag"], "\"1\"");
    let patch = |tag: &'static str| {
        app.req(Method::PATCH, "/v1/tenants/acme")
            .header("If-Match", tag)
            .json(&json!({"billing": {"plan": "gold"}}))
            .send()
    };
    let r = patch("\"1\"").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"2\"");
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["version"], 2);
    assert_eq!(t["billing"]["plan"], "gold");
    expect_problem(patch("\"1\"").await.unwrap(), 412).await;
    // Lifecycle actions honour If-Match too.
    let r = app
        .req(Method::POST, "/v1/tenants/acme/activate")
        .header("If-Match", "\"1\"")
        .send()
        .await
        .unwrap();
    expect_problem(r, 412).await;
    // No If-Match: last writer wins, version still bumps.
    let r = app
        .req(Method::PATCH, "/v1/tenants/acme")
        .json(&json!({"quotas": {"units": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"3\"");
});

both_backends!(fifty_concurrent_patches_one_wins, |b| async move {
    let app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    app.create_tenant("acme", "acme-corp").await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let rb = app
            .req(Method::PATCH, "/v1/tenants/acme")
            .header("If-Match", "\"1\"")
            .json(&json!({"billing": {"plan": format!("plan-{i}")}}));
        tasks.push(tokio::spawn(async move {
            rb.send().await.unwrap().status().as_u16()
        }));
    }
    let mut ok = 0;
    let mut failed = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            412 => failed += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, failed), (1, 49));
    let t = app.admin.get_tenant("acme").await.unwrap();
    assert_eq!(t.version, 2);
});

both_backends!(idempotency_key_replays_first_response, |b| async move {
    let app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    let body = json!({"tenant_id": "acme", "organization_id": "acme-corp",
                      "profile": "mt-standard", "region": "eu-west-1"});
    let send = |body: Value| {
        app.req(Method::POST, "/v1/tenants")
            .header("Idempotency-Key", "create-acme-1")
            .json(&body)
            .send()
    };
    let first = send(body.clone()).await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = send(body.clone()).await.unwrap();
    assert_eq!(
        again.status(),
        201,
        "a replay returns the first response, not a 409"
    );
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again);
    // Same key, different request: refused.
    let mut other = body.clone();
    other["tenant_id"] = json!("globex");
    expect_problem(send(other).await.unwrap(), 422).await;
    // Without a key a duplicate is a 409.
    let r = app
        .req(Method::POST, "/v1/tenants")
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_problem(r, 409).await;
    // Lifecycle actions replay too: one job, not two.
    let act = || {
        app.req(Method::POST, "/v1/tenants/acme/activate")
            .header("Idempotency-Key", "activate-acme")
            .send()
    };
    let j1: Value = act().await.unwrap().json().await.unwrap();
    let j2: Value = act().await.unwrap().json().await.unwrap();
    assert_eq!(j1["job_id"], j2["job_id"]);
});

both_backends!(cursor_pagination, |b| async move {
    let app = TestApp::spawn(b).await;
    for i in 0..7 {
        app.create_org(&format!("org-{i}")).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/organizations?limit=3&cursor={c}"),
            None => "/v1/organizations?limit=3".to_string(),
        };
        let page: Value = app.admin.get(&path).await.unwrap();
        pages += 1;
        for o in page["items"].as_array().unwrap() {
            seen.push(o["organization_id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..7).map(|i| format!("org-{i}")).collect();
    assert_eq!(seen, expected);
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "cursor=%%%",
        "cursor=Zm9v",
        "bogus=1",
    ] {
        let r = app
            .req(Method::GET, &format!("/v1/organizations?{bad}"))
            .send()
            .await
            .unwrap();
        expect_problem(r, 400).await;
    }
});

both_backends!(body_limit_and_rate_limit, |b| async move {
    let app = TestApp::spawn_with(
        b,
        AppOptions::default()
            .with("CELLPLANE__RATE_LIMIT__AUTHORING_PER_SEC", "1")
            .with("CELLPLANE__RATE_LIMIT__AUTHORING_BURST", "5"),
    )
    .await;
    let big = "x".repeat(2 * 1024 * 1024);
    let r = app
        .req(Method::POST, "/v1/organizations")
        .header("content-type", "application/json")
        .body(format!(
            "{{\"organization_id\":\"big\",\"name\":\"{big}\"}}"
        ))
        .send()
        .await
        .unwrap();
    expect_problem(r, 413).await;
    // Authoring requests beyond the burst get 429 with Retry-After; reads do not.
    let mut limited = None;
    for i in 0..12 {
        let r = app
            .req(Method::POST, "/v1/organizations")
            .json(&json!({"organization_id": format!("org-{i}"), "name": "x"}))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("rate limit reached within 12 writes");
    assert!(r.headers().get("retry-after").is_some());
    expect_problem(r, 429).await;
    let r = app
        .req(Method::GET, "/v1/organizations")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
});

both_backends!(operations_and_openapi, |b| async move {
    let app = TestApp::spawn(b).await;
    let r = app
        .anonymous()
        .request(Method::GET, "/healthz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .anonymous()
        .request(Method::GET, "/readyz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ready: Value = r.json().await.unwrap();
    assert_eq!(
        ready["store"],
        if b == Backend::Sqlite {
            "sqlite"
        } else {
            "postgres"
        }
    );
    app.create_org("acme-corp").await;
    let metrics = app.anonymous().get_text("/metrics").await.unwrap();
    assert!(metrics.contains("cellplane_http_requests_total{method=\"POST\",route=\"/v1/organizations\",status=\"201\"} 1"), "{metrics}");
    assert!(metrics.contains("cellplane_http_request_duration_seconds_bucket"));
    let doc: Value = app.anonymous().get("/v1/openapi.json").await.unwrap();
    let paths = doc["paths"].as_object().unwrap();
    // Every route the server serves is described, with the methods it accepts.
    for (path, methods) in [
        ("/v1/organizations", &["get", "post"][..]),
        ("/v1/organizations/{organization_id}", &["get"]),
        ("/v1/tenants", &["get", "post"]),
        ("/v1/tenants/{tenant_id}", &["get", "patch"]),
        ("/v1/tenants/{tenant_id}/{action}", &["post"]),
        ("/v1/tenants/{tenant_id}/environments", &["get", "post"]),
        ("/v1/cells", &["get", "post"]),
        ("/v1/cells/{cell_id}", &["get", "patch", "delete"]),
        ("/v1/cells/{cell_id}/drain", &["post"]),
        ("/v1/cells/{cell_id}/apply", &["post"]),
        ("/v1/cells/{cell_id}/plan", &["post"]),
        ("/v1/templates", &["get"]),
        ("/v1/templates/{template}", &["get"]),
        ("/v1/jobs/{job_id}/events", &["get"]),
        ("/v1/jobs", &["get"]),
        ("/v1/jobs/{job_id}", &["get"]),
        ("/v1/jobs/{job_id}/log", &["get"]),
        ("/v1/jobs/{job_id}/cancel", &["post"]),
        ("/v1/audit", &["get"]),
        ("/v1/audit/verify", &["get"]),
        ("/v1/tokens", &["get", "post"]),
        ("/v1/tokens/{token_id}", &["delete"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/v1/openapi.json", &["get"]),
    ] {
        let p = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from OpenAPI"));
        for m in methods {
            assert!(p.get(*m).is_some(), "{m} {path} missing from OpenAPI");
        }
        // And the server really answers it (not 404/405 from the router).
        let concrete = path
            .replace("{organization_id}", "acme-corp")
            .replace("{tenant_id}", "ghost")
            .replace("{action}", "activate")
            .replace("{cell_id}", "ghost")
            .replace("{template}", "ghost")
            .replace("{job_id}", "ghost")
            .replace("{token_id}", "ghost");
        for m in methods {
            let method = Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let r = app
                .req(method, &concrete)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_ne!(r.status(), 405, "{m} {concrete}");
            if r.status() == 404 {
                let body: Value = r.json().await.unwrap();
                assert_ne!(
                    body["detail"], "no such route",
                    "{m} {concrete} is not routed"
                );
            }
        }
    }
});

both_backends!(sigterm_shuts_down_cleanly, |b| async move {
    let mut app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    let status = app.terminate().expect("process was running");
    assert!(status.success(), "exit status {status:?}");
    assert!(app.log().contains("control plane stopped"));
});

both_backends!(concurrent_creates_each_id_once, |b| async move {
    let app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let id = format!("t-{}", i % 20);
        let org = if i % 25 == 7 {
            "ghost-corp"
        } else {
            "acme-corp"
        };
        let rb = app
            .req(Method::POST, "/v1/tenants")
            .json(&json!({"tenant_id": id,
            "organization_id": org, "profile": "mt-standard", "region": "eu-west-1"}));
        tasks.push(tokio::spawn(async move {
            rb.send().await.unwrap().status().as_u16()
        }));
    }
    let mut counts = std::collections::BTreeMap::new();
    for t in tasks {
        *counts.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts.get(&201), Some(&20), "{counts:?}");
    assert_eq!(
        counts.get(&400).copied().unwrap_or(0) + counts.get(&409).copied().unwrap_or(0),
        80,
        "{counts:?}"
    );
    let created = app
        .sql_i64("SELECT COUNT(*) FROM tenant_audit WHERE event_type = 'TENANCY_CREATED'")
        .await
        .unwrap();
    assert_eq!(created, 20);
    let envs = app
        .sql_i64("SELECT COUNT(*) FROM environments")
        .await
        .unwrap();
    assert_eq!(envs, 20);
    assert!(app.admin.audit_verify().await.unwrap().ok);
});

/// The names of the problem types a crate serves, read from its sources: the literal
/// `cellplane.dev/problems/<name>`, and the `(StatusCode::X, "<name>"` pairs every
/// crate builds its problems from (the URL is then formatted from the name).
fn problem_names(dir: &std::path::Path, names: &mut std::collections::BTreeSet<String>) {
    fn name_at(s: &str) -> Option<&str> {
        let end = s
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .unwrap_or(s.len());
        let name = &s[..end];
        (name.len() > 1 && name.starts_with(|c: char| c.is_ascii_lowercase())).then_some(name)
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            problem_names(&path, names);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        for (i, _) in src.match_indices("cellplane.dev/problems/") {
            if let Some(n) = name_at(&src[i + "cellplane.dev/problems/".len()..]) {
                names.insert(n.to_string());
            }
        }
        for (i, _) in src.match_indices("StatusCode::") {
            let rest = &src[i + "StatusCode::".len()..];
            let rest = rest.trim_start_matches(|c: char| c.is_ascii_uppercase() || c == '_');
            let Some(rest) = rest.trim_start().strip_prefix(',') else {
                continue;
            };
            let Some(rest) = rest.trim_start().strip_prefix('"') else {
                continue;
            };
            if let Some(n) = name_at(rest).filter(|n| rest[n.len()..].starts_with('"')) {
                names.insert(n.to_string());
            }
        }
    }
}

/// Issue 15 item 13: one problem vocabulary, listed in docs/problems.md. A problem type
/// served by the control plane, the router or the sample cell that the list lacks fails.
#[test]
fn problem_vocabulary_is_documented() {
    let root = repo_root();
    let doc = std::fs::read_to_string(root.join("docs/problems.md")).unwrap();
    for crate_src in ["control-plane/server/src", "router/src", "sample-cell/src"] {
        let mut names = std::collections::BTreeSet::new();
        problem_names(&root.join(crate_src), &mut names);
        assert!(
            names.len() >= 5,
            "{crate_src}: found only {names:?}; has the way problems are built changed?"
        );
        for n in &names {
            assert!(
                doc.contains(&format!("| `{n}` |")),
                "{crate_src} serves https://cellplane.dev/problems/{n}, which docs/problems.md does not list"
            );
        }
    }
}

// Issue 15 item 8: the document says what the edge does. Query parameters are optional
// query parameters (they were required path parameters, which a generated client drops),
// errors are problem+json with 401 on every authenticated operation, path ids carry the id
// pattern.
both_backends!(openapi_matches_the_edge, |b| async move {
    let app = TestApp::spawn(b).await;
    let doc: Value = app.anonymous().get("/v1/openapi.json").await.unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (path, query) in [
        ("/v1/audit", "since"),
        ("/v1/cells", "region"),
        ("/v1/jobs", "target"),
        ("/v1/organizations", "limit"),
        ("/v1/routes", "wait"),
        ("/v1/routes/history", "before"),
        ("/v1/tenants", "cursor"),
        ("/v1/tokens", "limit"),
    ] {
        let params = paths[path]["get"]["parameters"].as_array().unwrap();
        let p = params.iter().find(|p| p["name"] == query).unwrap();
        assert_eq!(p["in"], "query", "{path} {query}");
        assert_eq!(p["required"], false, "{path} {query}");
    }
    let action = &paths["/v1/tenants/{tenant_id}/{action}"]["post"]["parameters"];
    let force = action
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "force")
        .unwrap();
    assert_eq!(force["in"], "query");
    assert_eq!(force["schema"]["type"], "boolean");
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            for (status, r) in responses {
                // `/readyz` answers its 503 as a JSON status document, not a problem.
                if path.starts_with("/v1/") && (status.starts_with('4') || status.starts_with('5'))
                {
                    assert!(
                        r["content"].get("application/json").is_none()
                            && r["content"].get("application/problem+json").is_some(),
                        "{method} {path} {status}: {r}"
                    );
                }
            }
            if path.starts_with("/v1/") && path != "/v1/openapi.json" {
                assert!(responses.contains_key("401"), "{method} {path}");
            }
            if op.get("requestBody").is_some() {
                for s in ["400", "413", "415"] {
                    assert!(responses.contains_key(s), "{method} {path} {s}");
                }
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["in"] == "path" && p["name"] != "action" {
                    let pattern = match p["name"].as_str() {
                        Some("job_id") => "^job-[0-9a-f]{12}[0-9a-z]{10}$",
                        Some("token_id") => "^(admin|tok-[0-9a-f]{12}[0-9a-z]{10})$",
                        Some("webhook_id") => "^wh-[0-9a-f]{12}[0-9a-z]{10}$",
                        Some("delivery_id") => "^dlv-[0-9a-f]{12}[0-9a-z]{10}$",
                        Some("move_id") => "^mv-[0-9a-f]{12}[0-9a-z]{10}$",
                        _ => "^[a-z][a-z0-9-]{1,62}$",
                    };
                    assert_eq!(
                        p["schema"]["pattern"], pattern,
                        "{method} {path} {}",
                        p["name"]
                    );
                }
                if p["name"] == "Idempotency-Key" {
                    assert!(responses.contains_key("422"), "{method} {path}");
                }
            }
        }
    }
    let default = &doc["components"]["schemas"]["TemplateVariable"]["properties"]["default"];
    assert!(default.get("type").is_none(), "any JSON value: {default}");
    let tenants = &doc["components"]["schemas"]["Capacity"]["properties"]["tenants"];
    assert_eq!(tenants["minimum"], 1);
});
