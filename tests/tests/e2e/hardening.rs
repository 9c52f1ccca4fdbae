//! Regression tests of the edge hardening (issue 15): authorization before any parsing,
//! no internals in 5xx problems, distinct ports under concurrent cell creation, bounded
//! numbers on every way into the registry, secret-less and route-scoped idempotent
//! replay, one JSON value per body.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

/// 2^63: one past what the stores' signed 64-bit integers hold.
const TWO_POW_63: u64 = 1 << 63;
/// The largest count the registry accepts (2^53 - 1).
const MAX_COUNT: u64 = (1 << 53) - 1;

async fn token_for(app: &TestApp, role: &str, tenant: Option<&str>) -> String {
    let mut body = json!({"role": role});
    if let Some(t) = tenant {
        body["tenant_id"] = json!(t);
    }
    let t: Value = app.admin.post("/v1/tokens", &body).await.unwrap();
    t["token"].as_str().unwrap().to_string()
}

/// A control plane whose cells never reach terraform: stamp jobs fail at once, so tests
/// can create many cells and read what was registered.
fn no_terraform() -> AppOptions {
    AppOptions::default()
        .with("CELLPLANE__IAC__BINARY", "/nonexistent/terraform")
        .with("CELLPLANE__JOBS__MAX_ATTEMPTS", "1")
}

/// One kind of bad input to a write route.
struct Bad<'a> {
    kind: &'a str,
    body: &'a str,
    content_type: &'a str,
    /// Every path parameter replaced by something that is not an identifier.
    bad_ids: bool,
    query: Option<&'a str>,
    header: Option<(&'a str, &'a str)>,
}

impl<'a> Bad<'a> {
    fn body(kind: &'a str, body: &'a str) -> Self {
        Bad {
            kind,
            body,
            content_type: "application/json",
            bad_ids: false,
            query: None,
            header: None,
        }
    }
}

fn problem_fields(p: &Value) -> Vec<String> {
    p["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["field"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

// Regression: write routes answered 400 with the request schema's field names (and 415,
// 412, 422 for headers) to callers who may not use them at all: a tenant-admin posting an
// incomplete cell learned `cell_id`, `capacity`, ... instead of getting 403. Every write
// route of the OpenAPI document, with every kind of bad input, must answer 401 (anonymous),
// 403, or 404 (another tenant's resource, hidden from a tenant-admin) before anything is
// parsed.
both_backends!(
    unauthorized_writes_are_refused_before_any_validation,
    |b| async move {
        let app = TestApp::spawn(b).await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        app.create_tenant("globex", "acme-corp").await;
        let viewer = app.client(&token_for(&app, "viewer", None).await);
        let router = app.client(&token_for(&app, "router", None).await);
        let other_admin = app.client(&token_for(&app, "tenant-admin", Some("globex")).await);
        let anonymous = app.anonymous();

        let doc: Value = app.anonymous().get("/v1/openapi.json").await.unwrap();
        let mut writes: Vec<(Method, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for m in ops.as_object().unwrap().keys() {
                if ["post", "put", "patch", "delete"].contains(&m.as_str()) {
                    writes.push((
                        Method::from_bytes(m.to_uppercase().as_bytes()).unwrap(),
                        path.clone(),
                    ));
                }
            }
        }
        assert!(writes.len() >= 17, "write routes found: {writes:?}");
        for must in [
            "/v1/cells",
            "/v1/tokens",
            "/v1/tenants/{tenant_id}/{action}",
            "/v1/regions/{region}",
        ] {
            assert!(writes.iter().any(|(_, p)| p == must), "{must} not found");
        }

        let concrete = |path: &str, bad_ids: bool| {
            let mut out = path.to_string();
            for (name, good) in [
                ("{tenant_id}", "acme"),
                ("{action}", "suspend"),
                ("{cell_id}", "c-ghost"),
                ("{job_id}", "j-ghost"),
                ("{env}", "prod"),
                ("{router_id}", "r-one"),
                ("{region}", "eu-west-1"),
                ("{token_id}", "tok-ghost"),
                ("{webhook_id}", "wh-ghost"),
                ("{delivery_id}", "dlv-ghost"),
                ("{move_id}", "mv-ghost"),
                ("{release_id}", "rel-ghost"),
            ] {
                out = out.replace(name, if bad_ids { "Bad_Id!" } else { good });
            }
            assert!(!out.contains('{'), "unhandled path parameter in {path}");
            out
        };
        // Kinds of bad input; each must be refused for who is asking, not for what.
        let long_key = "k".repeat(300);
        let variants = [
            Bad::body("schema", r#"{"bogus": true}"#),
            Bad::body("missing", "{}"),
            Bad::body("syntax", r#"{"nope":"#),
            Bad::body("trailing", "{} xyz"),
            Bad {
                content_type: "text/plain",
                ..Bad::body("media type", "hello")
            },
            Bad {
                bad_ids: true,
                ..Bad::body("path ids", r#"{"bogus": true}"#)
            },
            Bad {
                query: Some("bogus=1&force=maybe"),
                header: Some(("if-match", "garbage")),
                ..Bad::body("headers and query", "[]")
            },
            Bad {
                header: Some(("idempotency-key", &long_key)),
                ..Bad::body("idempotency key", "{}")
            },
        ];
        let callers: Vec<(&str, &cellplane_api::Client)> = vec![
            ("anonymous", &anonymous),
            ("viewer", &viewer),
            ("router", &router),
            ("tenant-admin of another tenant", &other_admin),
        ];
        let mut checked = 0;
        for (method, path) in &writes {
            for (who, client) in &callers {
                if *who == "router" && path == "/v1/routers/{router_id}/heartbeat" {
                    continue; // the router's own route
                }
                for bad in &variants {
                    let kind = bad.kind;
                    // Tenant-admins may cancel their own tenant's jobs: the route is
                    // theirs, and whose job it is is known once the job is read, after
                    // the request's headers were checked.
                    if *who == "tenant-admin of another tenant"
                        && path == "/v1/jobs/{job_id}/cancel"
                        && kind == "idempotency key"
                    {
                        continue;
                    }
                    // Webhook routes are a tenant-admin's own (it manages its tenant's
                    // subscriptions): their input is not hidden from it, and another
                    // tenant's subscription answers 404 once read (tests/e2e/webhooks.rs).
                    if *who == "tenant-admin of another tenant" && path.starts_with("/v1/webhooks")
                    {
                        continue;
                    }
                    let mut url = concrete(path, bad.bad_ids);
                    if let Some(q) = bad.query {
                        url = format!("{url}?{q}");
                    }
                    let mut rb = client
                        .request(method.clone(), &url)
                        .header("content-type", bad.content_type)
                        .body(bad.body.to_string());
                    if let Some((k, v)) = bad.header {
                        rb = rb.header(k, v);
                    }
                    let r = rb.send().await.unwrap();
                    let status = r.status().as_u16();
                    let allowed: &[u16] = match *who {
                        "anonymous" => &[401],
                        "tenant-admin of another tenant" => &[403, 404],
                        _ => &[403],
                    };
                    let text = r.text().await.unwrap_or_default();
                    assert!(
                        allowed.contains(&status),
                        "{who}: {method} {url} ({kind}) gave {status}: {text}"
                    );
                    let p: Value = serde_json::from_str(&text).unwrap();
                    assert!(
                        p.get("errors").is_none(),
                        "{who}: {method} {url} ({kind}) leaked field errors: {text}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 400, "{checked}");
        // The registry is untouched and an authorized caller still gets the validation.
        assert_eq!(app.admin.get_tenant("acme").await.unwrap().version, 1);
        let r = app
            .req(Method::POST, "/v1/cells")
            .json(&json!({"bogus": true}))
            .send()
            .await
            .unwrap();
        expect_problem(r, 400).await;
    }
);

// Regression: a template that failed to load reached clients as the loader's message in the
// 503's `detail`: the template path, the TOML parser's text and the offending line. Clients
// get a stable message and the correlation id; the detail goes to the log under it. Store
// failures (also 503) carry the correlation id and no SQL.
both_backends!(
    internal_errors_stay_out_of_problem_details,
    |b| async move {
        let templates = tempfile::tempdir().unwrap();
        let broken = templates.path().join("broken");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(
            broken.join("template.toml"),
            "description = \"half a template\"\ntiers = [\"pooled\" SENTINEL-NOT-TOML\n",
        )
        .unwrap();
        let dir = templates.path().display().to_string();
        let app = TestApp::spawn_with(
            b,
            AppOptions::default().with("CELLPLANE__IAC__TEMPLATES_DIR", &dir),
        )
        .await;
        let requests: Vec<(Method, &str, Option<Value>)> = vec![
            (
                Method::POST,
                "/v1/cells",
                Some(
                    json!({"cell_id": "c1", "region": "eu-west-1", "tier": "pooled",
                    "template": "broken", "capacity": {"tenants": 1, "units": 1}}),
                ),
            ),
            (Method::GET, "/v1/templates/broken", None),
            (
                Method::PUT,
                "/v1/regions/eu-west-1",
                Some(json!({"default_template": "broken"})),
            ),
        ];
        for (i, (m, path, body)) in requests.into_iter().enumerate() {
            let corr = format!("corr-tpl-{i}");
            let mut rb = app.req(m.clone(), path).header("x-correlation-id", &corr);
            if let Some(b) = body {
                rb = rb.json(&b);
            }
            let r = rb.send().await.unwrap();
            assert!(r.headers().get("retry-after").is_some(), "{m} {path}");
            let p = expect_problem(r, 503).await;
            let text = p.to_string();
            for secret in [
                dir.as_str(),
                "template.toml",
                "SENTINEL",
                "TOML",
                "line",
                "broken",
            ] {
                assert!(
                    !text.contains(secret),
                    "{m} {path}: {secret:?} leaked: {text}"
                );
            }
            assert_eq!(p["correlation_id"], corr.as_str(), "{m} {path}: {text}");
        }
        // The operator finds the detail in the log, under the correlation id.
        let log = app.log();
        let at = log
            .find("a dependency failed")
            .unwrap_or_else(|| panic!("no error logged: {log}"));
        let entry: String = log[log[..at].rfind('\n').map_or(0, |i| i + 1)..]
            .chars()
            .take(2000)
            .collect();
        assert!(entry.contains("corr-tpl-0"), "{log}");
        assert!(
            entry.contains("SENTINEL"),
            "the detail is not logged: {log}"
        );

        // A store failure: generic text, the correlation id, no SQL.
        app.sql("ALTER TABLE organizations RENAME TO organizations_gone")
            .await
            .unwrap();
        let r = app
            .req(Method::GET, "/v1/organizations")
            .header("x-correlation-id", "corr-store-1")
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 503).await;
        let text = p.to_string();
        for secret in ["organizations", "SELECT", "does not exist", "no such table"] {
            assert!(!text.contains(secret), "{secret:?} leaked: {text}");
        }
        assert_eq!(p["correlation_id"], "corr-store-1", "{text}");
        assert!(
            app.log()
                .lines()
                .any(|l| l.contains("corr-store-1") && l.contains("store operation failed")),
            "{}",
            app.log()
        );
    }
);

// Regression: `create_cell` chose a cell's port before its write transaction opened, from
// the ports committed so far: concurrent creations were handed the same port. Twenty at
// once, from a range of thirty ports, must all differ.
both_backends!(
    concurrent_cell_creations_get_distinct_ports,
    |b| async move {
        let app = TestApp::spawn_with(
            b,
            no_terraform()
                .with("CELLPLANE__IAC__PORT_MIN", "47100")
                .with("CELLPLANE__IAC__PORT_MAX", "47129"),
        )
        .await;
        let mut tasks = Vec::new();
        for i in 0..20 {
            let rb = app.req(Method::POST, "/v1/cells").json(
                &json!({"cell_id": format!("cell-{i}"), "region": "eu-west-1",
                    "tier": "pooled", "template": "local",
                    "capacity": {"tenants": 1, "units": 1}}),
            );
            tasks.push(tokio::spawn(async move {
                let r = rb.send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }));
        }
        let mut ports = std::collections::BTreeMap::new();
        for t in tasks {
            let (status, text) = t.await.unwrap();
            assert_eq!(status, 202, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            let port = v["cell"]["vars"]["port"].as_u64().expect("a port");
            assert!((47100..=47129).contains(&port), "{port}");
            let cell = v["cell"]["cell_id"].as_str().unwrap().to_string();
            if let Some(other) = ports.insert(port, cell.clone()) {
                panic!("port {port} given to {other} and {cell}");
            }
        }
        assert_eq!(ports.len(), 20);
        // What the registry holds agrees.
        for (port, cell) in &ports {
            let c = app.cell(cell).await;
            assert_eq!(c.vars["port"], json!(port));
        }
        let recorded = app
            .sql_i64("SELECT COUNT(DISTINCT port) FROM cell_ports")
            .await
            .unwrap();
        assert_eq!(recorded, 20);
    }
);

// Regression: `PATCH /v1/cells/{id}` took a capacity of 2^63 (SQLite stored it negative, it
// read back 0) and a capacity of zero tenants, which creation refuses; `quotas.units` of
// 2^63 was accepted too. Every number into the registry goes through one check: 400 with
// the field's path.
both_backends!(numbers_into_the_registry_are_bounded, |b| async move {
    let app = TestApp::spawn_with(b, no_terraform()).await;
    app.create_org("acme-corp").await;
    app.create_tenant("acme", "acme-corp").await;
    let out = app
        .create_cell(
            json!({"cell_id": "c1", "region": "eu-west-1", "tier": "pooled",
            "template": "local", "capacity": {"tenants": 2, "units": 2}}),
        )
        .await;
    // The stamp fails at once (no terraform); its end must not race the patches below.
    let job = out.job.expect("a stamp job");
    app.wait_job(&job.job_id, std::time::Duration::from_secs(60))
        .await;
    let cases: Vec<(Method, &str, Value, &str)> = vec![
        (
            Method::PATCH,
            "/v1/cells/c1",
            json!({"capacity": {"tenants": TWO_POW_63, "units": 2}}),
            "capacity.tenants",
        ),
        (
            Method::PATCH,
            "/v1/cells/c1",
            json!({"capacity": {"tenants": 2, "units": TWO_POW_63}}),
            "capacity.units",
        ),
        (
            Method::PATCH,
            "/v1/cells/c1",
            json!({"capacity": {"tenants": 0, "units": 2}}),
            "capacity.tenants",
        ),
        (
            Method::PATCH,
            "/v1/cells/c1",
            json!({"capacity": {"tenants": MAX_COUNT + 1, "units": 2}}),
            "capacity.tenants",
        ),
        (
            Method::POST,
            "/v1/cells",
            json!({"cell_id": "c2", "region": "eu-west-1", "tier": "pooled",
                "template": "local", "capacity": {"tenants": TWO_POW_63, "units": 1}}),
            "capacity.tenants",
        ),
        (
            Method::POST,
            "/v1/cells",
            json!({"cell_id": "c2", "region": "eu-west-1", "tier": "pooled",
                "template": "local", "capacity": {"tenants": 1, "units": u64::MAX}}),
            "capacity.units",
        ),
        (
            Method::PUT,
            "/v1/regions/eu-west-1",
            json!({"pooled_capacity": {"tenants": TWO_POW_63, "units": 1}}),
            "pooled_capacity.tenants",
        ),
        (
            Method::PUT,
            "/v1/regions/eu-west-1",
            json!({"pooled_capacity": {"tenants": 1, "units": TWO_POW_63}}),
            "pooled_capacity.units",
        ),
        (
            Method::POST,
            "/v1/tenants",
            json!({"tenant_id": "t2", "organization_id": "acme-corp", "profile": "mt-standard",
                "region": "eu-west-1", "quotas": {"units": TWO_POW_63}}),
            "quotas.units",
        ),
        (
            Method::POST,
            "/v1/tenants",
            json!({"tenant_id": "t2", "organization_id": "acme-corp", "profile": "mt-standard",
                "region": "eu-west-1", "quotas": {"storageGiB": TWO_POW_63}}),
            "quotas.storageGiB",
        ),
        (
            Method::PATCH,
            "/v1/tenants/acme",
            json!({"quotas": {"apiRateLimit": TWO_POW_63}}),
            "quotas.apiRateLimit",
        ),
        (
            Method::PATCH,
            "/v1/tenants/acme",
            json!({"quotas": {"concurrentJobs": TWO_POW_63}}),
            "quotas.concurrentJobs",
        ),
        (
            Method::PATCH,
            "/v1/tenants/acme",
            json!({"quotas": {"units": 0}}),
            "quotas.units",
        ),
    ];
    for (m, path, body, field) in cases {
        let r = app.req(m.clone(), path).json(&body).send().await.unwrap();
        let p = expect_problem(r, 400).await;
        assert!(
            problem_fields(&p).iter().any(|f| f == field),
            "{m} {path} {body}: {p}"
        );
    }
    let router = app.client(&token_for(&app, "router", None).await);
    let r = router
        .request(Method::POST, "/v1/routers/r-one/heartbeat")
        .json(&json!({"applied_revision": TWO_POW_63 - 1}))
        .send()
        .await
        .unwrap();
    let p = expect_problem(r, 400).await;
    assert_eq!(problem_fields(&p), ["applied_revision"], "{p}");
    // Nothing changed; the largest accepted count reads back exactly.
    let c = app.cell("c1").await;
    assert_eq!((c.capacity.tenants, c.capacity.units), (2, 2));
    assert_eq!(app.admin.get_tenant("acme").await.unwrap().version, 1);
    let r = app
        .req(Method::PATCH, "/v1/cells/c1")
        .json(&json!({"capacity": {"tenants": MAX_COUNT, "units": MAX_COUNT}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let c = app.cell("c1").await;
    assert_eq!(
        (c.capacity.tenants, c.capacity.units),
        (MAX_COUNT, MAX_COUNT)
    );
});

// Regression: `POST /v1/tokens` with an `Idempotency-Key` stored the whole response, the
// plaintext secret included, and a replay sent the secret again, also after the token was
// revoked. The stored response has no secret; a replay answers 201 with the token's info,
// without the secret, and says so in `Idempotent-Replay-Withheld`.
both_backends!(token_secrets_are_never_stored_or_replayed, |b| async move {
    let app = TestApp::spawn(b).await;
    let send = || {
        app.req(Method::POST, "/v1/tokens")
            .header("Idempotency-Key", "mint-viewer-1")
            .json(&json!({"role": "viewer", "description": "ci"}))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let secret = first["token"].as_str().unwrap().to_string();
    let token_id = first["token_id"].as_str().unwrap().to_string();
    assert!(secret.len() > 20);
    let stored = app
        .sql_i64("SELECT COUNT(*) FROM idempotency_keys")
        .await
        .unwrap();
    assert_eq!(stored, 1, "the response is kept for replay");
    let leaked = app
        .sql_i64(&format!(
            "SELECT COUNT(*) FROM idempotency_keys WHERE body LIKE '%{secret}%'"
        ))
        .await
        .unwrap();
    assert_eq!(leaked, 0, "the secret is stored in the idempotency table");

    for round in ["before revocation", "after revocation"] {
        let again = send().await.unwrap();
        assert_eq!(again.status(), 201, "{round}");
        assert_eq!(again.headers()["idempotent-replayed"], "true", "{round}");
        assert_eq!(
            again.headers()["idempotent-replay-withheld"],
            "token",
            "{round}"
        );
        let text = again.text().await.unwrap();
        assert!(!text.contains(&secret), "{round}: secret replayed: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v.get("token").is_none(), "{round}: {text}");
        assert_eq!(v["token_id"], token_id.as_str(), "{round}");
        assert_eq!(v["role"], "viewer", "{round}");
        if round == "before revocation" {
            let r = app
                .req(Method::DELETE, &format!("/v1/tokens/{token_id}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // The typed client reads a replay as a token without its secret.
    let replay: cellplane_api::CreatedToken = send().await.unwrap().json().await.unwrap();
    assert!(replay.token.is_empty());
    assert_eq!(replay.info.token_id, token_id);
});

// Regression: idempotency keys were one key space per principal across all routes: a key
// used on `POST /v1/organizations` and then on `POST /v1/tenants` gave 422. Keys are scoped
// per principal and route (method and matched path).
both_backends!(idempotency_keys_are_scoped_per_route, |b| async move {
    let app = TestApp::spawn(b).await;
    let org = app
        .req(Method::POST, "/v1/organizations")
        .header("Idempotency-Key", "shared-key")
        .json(&json!({"organization_id": "acme-corp", "name": "Acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(org.status(), 201);
    let tenant_body = json!({"tenant_id": "acme", "organization_id": "acme-corp",
        "profile": "mt-standard", "region": "eu-west-1"});
    let tenant = app
        .req(Method::POST, "/v1/tenants")
        .header("Idempotency-Key", "shared-key")
        .json(&tenant_body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        tenant.status(),
        201,
        "{}",
        tenant.text().await.unwrap_or_default()
    );
    assert!(tenant.headers().get("idempotent-replayed").is_none());
    // Each route replays its own first response.
    let again: Value = app
        .req(Method::POST, "/v1/organizations")
        .header("Idempotency-Key", "shared-key")
        .json(&json!({"organization_id": "acme-corp", "name": "Acme"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["organization_id"], "acme-corp");
    let again = app
        .req(Method::POST, "/v1/tenants")
        .header("Idempotency-Key", "shared-key")
        .json(&tenant_body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["tenant_id"], "acme");
    // Another principal's key of the same name is its own.
    let operator = app.client(&token_for(&app, "operator", None).await);
    let r = operator
        .request(Method::POST, "/v1/organizations")
        .header("Idempotency-Key", "shared-key")
        .json(&json!({"organization_id": "globex-corp", "name": "Globex"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        app.sql_i64("SELECT COUNT(*) FROM idempotency_keys WHERE idem_key = 'shared-key'")
            .await
            .unwrap(),
        3
    );
});

// Regression: the idempotency fingerprint hashed the body's bytes: the same request with
// its JSON keys in another order (or other whitespace) got 422 instead of the replay.
both_backends!(
    idempotent_replay_ignores_json_key_order_and_whitespace,
    |b| async move {
        let app = TestApp::spawn(b).await;
        let send = |body: &'static str| {
            app.req(Method::POST, "/v1/organizations")
                .header("Idempotency-Key", "org-1")
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        let first = send(r#"{"organization_id":"acme-corp","name":"Acme"}"#)
            .await
            .unwrap();
        assert_eq!(first.status(), 201);
        let first: Value = first.json().await.unwrap();
        let again = send("{\n  \"name\" : \"Acme\",\n  \"organization_id\" : \"acme-corp\"\n}\n")
            .await
            .unwrap();
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let again: Value = again.json().await.unwrap();
        assert_eq!(first, again);
        // A different value is still a different request.
        let r = send(r#"{"name":"Acme Inc","organization_id":"acme-corp"}"#)
            .await
            .unwrap();
        expect_problem(r, 422).await;
    }
);

// Regression: `{"organization_id":"x","name":"y"} xyz` created the organization: the parser
// stopped after the first value. A body is exactly one JSON value (whitespace around it
// aside).
both_backends!(json_body_with_trailing_data_is_refused, |b| async move {
    let app = TestApp::spawn(b).await;
    for body in [
        r#"{"organization_id":"trailing-x","name":"y"} xyz"#,
        r#"{"organization_id":"trailing-x","name":"y"}{"organization_id":"other-x","name":"z"}"#,
        r#"{"organization_id":"trailing-x","name":"y"} 1"#,
        r#"{"organization_id":"trailing-x","name":"y"}]"#,
    ] {
        let r = app
            .req(Method::POST, "/v1/organizations")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 400).await;
        assert!(
            p["detail"]
                .as_str()
                .unwrap_or("")
                .contains("not valid JSON"),
            "{body}: {p}"
        );
    }
    for id in ["trailing-x", "other-x"] {
        let r = app
            .req(Method::GET, &format!("/v1/organizations/{id}"))
            .send()
            .await
            .unwrap();
        expect_problem(r, 404).await;
    }
    // Whitespace around the one value is fine.
    let r = app
        .req(Method::POST, "/v1/organizations")
        .header("content-type", "application/json")
        .body("\n  {\"organization_id\":\"trailing-x\",\"name\":\"y\"}  \n\t")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
});
