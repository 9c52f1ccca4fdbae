//! Malformed input of every kind gets a 4xx problem document, never a 500, and changes
//! nothing.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

fn tenant_body(id: Value) -> Value {
    json!({"tenant_id": id, "organization_id": "acme-corp", "profile": "mt-standard", "region": "eu-west-1"})
}

both_backends!(bad_input_table, |b| async move {
    let app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    app.create_tenant("acme", "acme-corp").await;
    let audit_before = app
        .sql_i64("SELECT COUNT(*) FROM tenant_audit")
        .await
        .unwrap();

    let long = format!("a{}", "b".repeat(63));
    // Bad ids in bodies.
    for id in [
        json!("../etc"),
        json!("Acme"),
        json!(long),
        json!("añb"),
        json!(""),
        json!("a"),
        json!("a b"),
        json!("a/b"),
        json!(42),
        json!(null),
        json!(["a"]),
    ] {
        let r = app
            .req(Method::POST, "/v1/tenants")
            .json(&tenant_body(id.clone()))
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 400).await;
        assert_eq!(p["errors"][0]["field"], "tenant_id", "{id}: {p}");
    }
    // Bad ids in paths (percent-encoded where needed).
    for path in [
        "/v1/tenants/..%2Fetc",
        "/v1/tenants/ACME",
        &format!("/v1/tenants/{long}"),
        "/v1/tenants/a%C3%B1b",
        "/v1/tenants/a_b",
        "/v1/cells/..",
        "/v1/jobs/J1",
        "/v1/organizations/%00",
    ] {
        let r = app.req(Method::GET, path).send().await.unwrap();
        let s = r.status().as_u16();
        assert!(s == 400 || s == 404, "{path}: {s}");
        expect_problem(r, s).await;
    }
    // Wrong JSON types, unknown fields, missing fields, broken JSON, wrong content type.
    let cases: Vec<(&str, String, &str)> = vec![
        ("wrong type", json!({"tenant_id": "t1", "organization_id": "acme-corp", "profile": "mt-standard", "region": "eu-west-1", "quotas": {"units": "two"}}).to_string(), "quotas.units"),
        ("negative", json!({"tenant_id": "t1", "organization_id": "acme-corp", "profile": "mt-standard", "region": "eu-west-1", "quotas": {"units": -1}}).to_string(), "quotas.units"),
        ("unknown field", json!({"tenant_id": "t1", "organization_id": "acme-corp", "profile": "mt-standard", "region": "eu-west-1", "colour": "red"}).to_string(), "body"),
        ("unknown nested", json!({"tenant_id": "t1", "organization_id": "acme-corp", "profile": "mt-standard", "region": "eu-west-1", "policies": {"nope": 1}}).to_string(), "policies"),
        ("bad enum", json!({"tenant_id": "t1", "organization_id": "acme-corp", "profile": "huge", "region": "eu-west-1"}).to_string(), "profile"),
        ("missing", json!({"tenant_id": "t1"}).to_string(), "body"),
        ("unknown org", json!({"tenant_id": "t1", "organization_id": "ghost-corp", "profile": "mt-standard", "region": "eu-west-1"}).to_string(), "organization_id"),
        ("not an object", "[1,2,3]".to_string(), "body"),
    ];
    for (name, body, field) in cases {
        let r = app
            .req(Method::POST, "/v1/tenants")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 400).await;
        let fields: Vec<String> = p["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["field"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            fields.iter().any(|f| f.starts_with(field))
                || (field == "body" && p["detail"].is_string()),
            "{name}: {p}"
        );
    }
    for body in ["{", "", "null", "{\"tenant_id\": }", "\u{0}"] {
        let r = app
            .req(Method::POST, "/v1/tenants")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        expect_problem(r, 400).await;
    }
    let r = app
        .req(Method::POST, "/v1/tenants")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    expect_problem(r, 415).await;
    // 2 MiB bodies, with and without Content-Length.
    let big = json!({"organization_id": "big", "name": "x".repeat(2 * 1024 * 1024)}).to_string();
    let r = app
        .req(Method::POST, "/v1/organizations")
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    expect_problem(r, 413).await;
    let stream = futures_util::stream::iter(
        big.into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = app
        .req(Method::POST, "/v1/organizations")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    expect_problem(r, 413).await;
    // Bad cursors and query parameters.
    for q in [
        "cursor=!!!",
        "cursor=djE6",
        "cursor=eHh4",
        "limit=-5",
        "limit=99999999999999999999",
        "state=melted",
        "region=EU",
        "nope=1",
    ] {
        let r = app
            .req(Method::GET, &format!("/v1/tenants?{q}"))
            .send()
            .await
            .unwrap();
        expect_problem(r, 400).await;
    }
    for q in ["cursor=zzz", "since=yesterday"] {
        let r = app
            .req(Method::GET, &format!("/v1/audit?{q}"))
            .send()
            .await
            .unwrap();
        expect_problem(r, 400).await;
    }
    // Bad If-Match values.
    for tag in ["1", "\"abc\"", "\"-1\"", "\"0\"", "W/", "\"1"] {
        let r = app
            .req(Method::PATCH, "/v1/tenants/acme")
            .header("If-Match", tag)
            .json(&json!({"billing": {}}))
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 400).await;
        assert_eq!(p["errors"][0]["field"], "If-Match", "{tag}");
    }
    // Bad Idempotency-Key.
    let r = app
        .req(Method::POST, "/v1/organizations")
        .header("Idempotency-Key", "x".repeat(300))
        .json(&json!({"organization_id": "o9", "name": "n"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    // Text fields with control characters or huge sizes.
    let r = app
        .req(Method::POST, "/v1/organizations")
        .json(&json!({"organization_id": "o9", "name": "a\u{7}b"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    let r = app
        .req(Method::PATCH, "/v1/tenants/acme")
        .json(&json!({"billing": {"plan": "p".repeat(500)}}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    // Cell label and variable names.
    let r = app
        .req(Method::POST, "/v1/cells")
        .json(
            &json!({"cell_id": "c1", "region": "eu-west-1", "tier": "pooled",
        "template": "../../etc", "capacity": {"tenants": 1, "units": 1}}),
        )
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    let r = app.req(Method::POST, "/v1/cells").json(&json!({"cell_id": "c1", "region": "eu-west-1", "tier": "pooled",
        "template": "local", "capacity": {"tenants": 1, "units": 1}, "vars": {"x\"\nresource": "y"}})).send().await.unwrap();
    expect_problem(r, 400).await;
    // Nothing above changed the registry.
    let audit_after = app
        .sql_i64("SELECT COUNT(*) FROM tenant_audit")
        .await
        .unwrap();
    assert_eq!(audit_before, audit_after);
    assert_eq!(app.admin.get_tenant("acme").await.unwrap().version, 1);
    assert!(!app.log().contains("panicked"), "{}", app.log());
});

// Issue 15 item 8d: `GET /v1/routes/history?before=-1` answered 200 where `since=-1` on
// the watch answered 400. A negative revision is refused on both.
both_backends!(negative_revisions_are_refused, |b| async move {
    let app = TestApp::spawn(b).await;
    for path in ["/v1/routes/history?before=-1", "/v1/routes?since=-1"] {
        let r = app.req(Method::GET, path).send().await.unwrap();
        let p = expect_problem(r, 400).await;
        let field = if path.contains("before") {
            "before"
        } else {
            "since"
        };
        assert_eq!(p["errors"][0]["field"], field, "{path}");
    }
    let r = app
        .req(Method::GET, "/v1/routes/history?before=0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
});
