//! Manifests end to end: `POST /v1/apply` with its plan, the tenant controller converging
//! through real jobs (terraform-stamped `local` cells, the real router), status conditions,
//! drift, re-applies that change nothing, `get -o yaml | apply` through the CLI, and bad
//! input refused by document and field.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

const FLEET: &str = r#"
apiVersion: cellplane.dev/v1
kind: Organization
metadata: {name: acme-corp, labels: {team: platform}}
spec: {name: Acme Corp}
---
apiVersion: cellplane.dev/v1
kind: Cell
metadata: {name: euw1-pool-1}
spec:
  region: eu-west-1
  tier: pooled
  template: local
  capacity: {tenants: 10, units: 10}
  labels: {canary: "true"}
---
apiVersion: cellplane.dev/v1
kind: Cell
metadata: {name: euw1-pool-2}
spec:
  region: eu-west-1
  tier: pooled
  template: local
  capacity: {tenants: 10, units: 10}
---
apiVersion: cellplane.dev/v1
kind: Tenant
metadata: {name: acme, annotations: {owner: "team-a"}}
spec:
  organization_id: acme-corp
  profile: mt-standard
  region: eu-west-1
  quotas: {apiRateLimit: 200}
---
apiVersion: cellplane.dev/v1
kind: Tenant
metadata: {name: globex}
spec:
  organization_id: acme-corp
  profile: mt-standard
  region: eu-west-1
  state: suspended
---
apiVersion: cellplane.dev/v1
kind: Tenant
metadata: {name: initech}
spec:
  organization_id: acme-corp
  profile: mt-standard
  region: eu-west-1
  environments:
    - {name: prod}
    - {name: dev}
"#;

/// Options that make the tenant controller quick: retries from 200 ms, a drift sweep
/// every second.
fn quick() -> AppOptions {
    AppOptions::default()
        .with("CELLPLANE__JOBS__TENANT_RETRY_BASE_MS", "200")
        .with("CELLPLANE__JOBS__TENANT_RETRY_MAX_MS", "1000")
        .with("CELLPLANE__JOBS__TENANT_SWEEP_SECS", "1")
        .with("CELLPLANE__JOBS__TENANT_POLL_MS", "200")
}

async fn apply(app: &TestApp, yaml: &str, query: &str) -> (u16, Value) {
    let r = app
        .req(Method::POST, &format!("/v1/apply{query}"))
        .header("content-type", "application/yaml")
        .body(yaml.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body)
}

fn object<'a>(plan: &'a Value, kind: &str, name: &str) -> &'a Value {
    plan["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == kind && o["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} in {plan:#}"))
}

fn condition<'a>(t: &'a Value, type_: &str) -> &'a Value {
    t["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// Waits until every tenant named reports `Ready=True` at its current generation.
async fn wait_ready(app: &TestApp, ids: &[&str], timeout: Duration) {
    let res = eventually(timeout, || async {
        for id in ids {
            let t: Value = app.admin.get(&format!("/v1/tenants/{id}")).await.ok()?;
            if condition(&t, "Ready")["status"] != "True"
                || t["status"]["observedGeneration"] != t["generation"]
            {
                return None;
            }
        }
        Some(())
    })
    .await;
    if res.is_err() {
        let mut dump = String::new();
        for id in ids {
            let t: Value = app.admin.get(&format!("/v1/tenants/{id}")).await.unwrap();
            dump.push_str(&format!("{id}: state {} {:#}\n", t["state"], t["status"]));
        }
        panic!("tenants not ready:\n{dump}\n{}", app.log());
    }
}

async fn counts(app: &TestApp) -> (i64, i64) {
    (
        app.sql_i64("SELECT COUNT(*) FROM jobs").await.unwrap(),
        app.sql_i64("SELECT COUNT(*) FROM tenant_audit")
            .await
            .unwrap(),
    )
}

/// Passes the tenant controller has started (`/metrics`).
async fn tenant_passes(app: &TestApp) -> i64 {
    let text = app
        .req(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("cellplane_controller_reconciles_total{controller=\"tenant\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("the tenant controller's pass counter")
}

fn cli(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    app.cli(args)
}

both_backends!(a_fleet_converges_and_reapplies_as_a_noop, |b| async move {
    let app = TestApp::spawn_with(b, quick()).await;
    let empty = counts(&app).await;
    // The plan of an empty control plane: everything is created, the cells are stamped and
    // the tenants are placed on them (the cells this apply adds count as room).
    let (status, plan) = apply(&app, FLEET, "?dry_run=true").await;
    assert_eq!(status, 200, "{plan:#}");
    for o in plan["objects"].as_array().unwrap() {
        assert_eq!(o["action"], "create", "{o:#}");
        assert!(o.get("refusal").is_none(), "{o:#}");
        assert_eq!(o["applied"], false);
    }
    let jobs = object(&plan, "Cell", "euw1-pool-1")["jobs"].to_string();
    assert!(jobs.contains("stamp cell euw1-pool-1"), "{jobs}");
    let jobs = object(&plan, "Tenant", "initech")["jobs"].to_string();
    assert!(
        jobs.contains("activate initech: place dev in eu-west-1 (today: euw1-pool-")
            && jobs.contains("place prod in eu-west-1 (today: euw1-pool-"),
        "{jobs}"
    );
    let jobs = object(&plan, "Tenant", "globex")["jobs"].to_string();
    assert!(jobs.contains("suspend globex"), "{jobs}");
    // A dry run changes nothing and writes no audit record.
    assert_eq!(counts(&app).await, empty);
    let r = app
        .req(Method::GET, "/v1/tenants/acme")
        .send()
        .await
        .unwrap();
    expect_problem(r, 404).await;

    let (status, result) = apply(&app, FLEET, "").await;
    assert_eq!(status, 200, "{result:#}");
    assert!(
        result["objects"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["applied"] == true && o["generation"] == 1),
        "{result:#}"
    );
    wait_ready(
        &app,
        &["acme", "globex", "initech"],
        Duration::from_secs(180),
    )
    .await;
    for c in ["euw1-pool-1", "euw1-pool-2"] {
        eventually(Duration::from_secs(120), || async {
            (app.cell(c).await.state == cellplane_api::CellState::Active).then_some(())
        })
        .await
        .unwrap_or_else(|_| panic!("cell {c} not active"));
    }
    let acme: Value = app.admin.get("/v1/tenants/acme").await.unwrap();
    assert_eq!(acme["state"], "active");
    assert_eq!(acme["status"]["phase"], "Ready");
    assert_eq!(condition(&acme, "Placed")["status"], "True");
    assert_eq!(condition(&acme, "Routed")["status"], "True");
    let globex: Value = app.admin.get("/v1/tenants/globex").await.unwrap();
    assert_eq!(globex["state"], "suspended");
    let initech: Value = app.admin.get("/v1/tenants/initech").await.unwrap();
    let envs: Vec<(&str, bool)> = initech["environments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["cell_id"].is_string()))
        .collect();
    assert_eq!(envs, [("dev", true), ("prod", true)]);
    let route: Value = app.admin.get("/v1/routes/initech/dev").await.unwrap();
    assert_eq!(route["mode"], "serve");

    // Routes are served through the real router; the suspended tenant gets 403.
    let token = app.token("router").await;
    let router = TestRouter::spawn(&app.url, &token, &[]).await;
    router.wait_revision(app.routing_revision().await).await;
    for (t, want) in [("acme", 201), ("initech", 201), ("globex", 403)] {
        let r = router
            .tenant_req(Method::PUT, t, "/v1/kv/k")
            .body("v")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{t}");
    }

    // The same documents again: all unchanged, no job, no audit record.
    let before = counts(&app).await;
    let (status, again) = apply(&app, FLEET, "").await;
    assert_eq!(status, 200, "{again:#}");
    for o in again["objects"].as_array().unwrap() {
        assert_eq!(o["action"], "unchanged", "{o:#}");
        assert!(o.get("jobs").is_none() && o.get("diff").is_none(), "{o:#}");
    }
    // Two passes of the tenant controller started after the apply: one ran whole.
    let passes = tenant_passes(&app).await;
    eventually(Duration::from_secs(10), || async {
        (tenant_passes(&app).await >= passes + 2).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(counts(&app).await, before);

    // One field changed in the file: the plan shows exactly that field, and after the
    // apply the router enforces the new rate.
    let changed = FLEET.replace("quotas: {apiRateLimit: 200}", "quotas: {apiRateLimit: 2}");
    let (status, plan) = apply(&app, &changed, "?dry_run=true").await;
    assert_eq!(status, 200);
    let acme_plan = object(&plan, "Tenant", "acme");
    assert_eq!(acme_plan["action"], "update");
    assert_eq!(
        acme_plan["diff"],
        json!([{"path": "spec.quotas.apiRateLimit", "from": 200, "to": 2}])
    );
    assert!(acme_plan["jobs"].to_string().contains("rate limit 2/s"));
    let others: Vec<&Value> = plan["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["action"] != "unchanged")
        .collect();
    assert_eq!(others.len(), 1, "{plan:#}");
    let (status, _) = apply(&app, &changed, "").await;
    assert_eq!(status, 200);
    let route: Value = app.admin.get("/v1/routes/acme/prod").await.unwrap();
    assert_eq!(route["rate_limit"], 2);
    let acme: Value = app.admin.get("/v1/tenants/acme").await.unwrap();
    assert_eq!(acme["generation"], 2);
    router.wait_revision(app.routing_revision().await).await;
    let mut limited = 0;
    for _ in 0..8 {
        let r = router
            .tenant_req(Method::GET, "acme", "/v1/kv/k")
            .send()
            .await
            .unwrap();
        limited += (r.status() == 429) as usize;
    }
    assert!(limited >= 4, "{limited} of 8 limited after the apply");
    wait_ready(&app, &["acme"], Duration::from_secs(30)).await;

    // `get -o yaml | apply` through the CLI is a no-op for every kind.
    let dir = tempfile::tempdir().unwrap();
    for (kind, name) in [
        ("organization", "acme-corp"),
        ("cell", "euw1-pool-1"),
        ("tenant", "acme"),
        ("tenant", "globex"),
        ("tenant", "initech"),
    ] {
        let (code, out, err) = cli(&app, &["get", kind, name, "-o", "yaml"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("apiVersion: cellplane.dev/v1"), "{out}");
        std::fs::write(dir.path().join(format!("{kind}-{name}.yaml")), out).unwrap();
    }
    // A region policy, set imperatively, exported and re-applied.
    let r = app
        .req(Method::PUT, "/v1/regions/eu-west-1")
        .json(&json!({"auto_stamp": false, "strategy": "binpack"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (code, out, err) = cli(&app, &["get", "regionpolicy", "eu-west-1", "-o", "yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::write(dir.path().join("region.yaml"), out).unwrap();
    let before = counts(&app).await;
    let (code, out, err) = cli(&app, &["apply", "-f", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("6 object(s): 0 to create, 0 to update, 6 unchanged; 0 job(s)"),
        "{out}"
    );
    assert_eq!(counts(&app).await, before);
    // `get --wide` shows every tenant ready.
    let (code, out, _) = cli(&app, &["get", "tenants", "--wide"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("Ready").count(), 3, "{out}");
    assert!(app.audit_verify_ok().await);
});

both_backends!(
    no_capacity_is_shown_then_converges_when_a_cell_arrives,
    |b| async move {
        let app = TestApp::spawn_with(b, quick()).await;
        let tenant = r#"
apiVersion: cellplane.dev/v1
kind: Organization
metadata: {name: acme-corp}
spec: {name: Acme}
---
apiVersion: cellplane.dev/v1
kind: Tenant
metadata: {name: hooli}
spec: {organization_id: acme-corp, profile: mt-standard, region: us-east-1}
"#;
        // The plan says why it will not place, and changes nothing.
        let empty = counts(&app).await;
        let (status, plan) = apply(&app, tenant, "?dry_run=true").await;
        assert_eq!(status, 200, "{plan:#}");
        let o = object(&plan, "Tenant", "hooli");
        assert_eq!(o["refusal"]["reason"], "NoCapacity", "{o:#}");
        assert_eq!(o["refusal"]["blocking"], false);
        assert!(
            o["refusal"]["message"]
                .as_str()
                .unwrap()
                .contains("auto-stamp is off for region us-east-1"),
            "{o:#}"
        );
        assert_eq!(counts(&app).await, empty);
        // Applied, the tenant is stored and waits, saying why.
        let (status, _) = apply(&app, tenant, "").await;
        assert_eq!(status, 200);
        let t = eventually(Duration::from_secs(30), || async {
            let t: Value = app.admin.get("/v1/tenants/hooli").await.ok()?;
            (condition(&t, "Placed")["reason"] == "NoCapacity").then_some(t)
        })
        .await
        .unwrap_or_else(|_| panic!("no NoCapacity condition\n{}", app.log()));
        assert_eq!(condition(&t, "Placed")["status"], "False");
        assert_eq!(condition(&t, "Ready")["status"], "False");
        assert_eq!(t["status"]["phase"], "Blocked");
        assert_eq!(t["state"], "draft");
        assert_eq!(t["desired_state"], "active");
        // No activation was started while nothing fits.
        assert_eq!(
            app.sql_i64("SELECT COUNT(*) FROM jobs WHERE kind = 'tenant.activate'")
                .await
                .unwrap(),
            0
        );
        // A later apply adds a cell; the tenant converges without being applied again.
        let cell = r#"
apiVersion: cellplane.dev/v1
kind: Cell
metadata: {name: use1-pool-1}
spec: {region: us-east-1, tier: pooled, template: local, capacity: {tenants: 5, units: 5}}
"#;
        let (status, _) = apply(&app, cell, "").await;
        assert_eq!(status, 200);
        wait_ready(&app, &["hooli"], Duration::from_secs(120)).await;
        let t: Value = app.admin.get("/v1/tenants/hooli").await.unwrap();
        assert_eq!(t["environments"][0]["cell_id"], "use1-pool-1");
        assert_eq!(t["generation"], 1, "the tenant was not applied again");

        // Drift: the cell is drained without moving its tenants; the tenant says so.
        let r = app
            .req(Method::POST, "/v1/cells/use1-pool-1/drain")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let t = eventually(Duration::from_secs(30), || async {
            let t: Value = app.admin.get("/v1/tenants/hooli").await.ok()?;
            t["status"]["drift"].is_array().then_some(t)
        })
        .await
        .unwrap_or_else(|_| panic!("no drift reported\n{}", app.log()));
        assert_eq!(t["status"]["drift"][0]["field"], "environments.prod.cell");
        assert_eq!(
            t["status"]["drift"][0]["actual"],
            "cell use1-pool-1 is draining"
        );
        assert_eq!(t["status"]["phase"], "Degraded");
        assert_eq!(condition(&t, "Ready")["reason"], "Drifted");
        let (code, out, _) = cli(&app, &["get", "tenant", "hooli", "--wide"]);
        assert_eq!(code, 0);
        assert!(out.contains("use1-pool-1 is draining"), "{out}");
    }
);

both_backends!(
    imperative_calls_write_the_same_desired_state,
    |b| async move {
        let app = TestApp::spawn_with(b, quick()).await;
        app.stamp_local("euw1-pool-1", json!({})).await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        let t: Value = app.admin.get("/v1/tenants/acme").await.unwrap();
        assert_eq!(
            (t["generation"].as_i64(), t["desired_state"].as_str()),
            (Some(1), Some("draft"))
        );
        app.lifecycle("acme", "activate").await;
        wait_ready(&app, &["acme"], Duration::from_secs(30)).await;
        let t: Value = app.admin.get("/v1/tenants/acme").await.unwrap();
        assert_eq!(t["desired_state"], "active");
        assert_eq!(t["generation"], 2);
        // PATCH and env-add move the generation; the controller observes it.
        let r = app
            .req(Method::PATCH, "/v1/tenants/acme")
            .json(&json!({"billing": {"plan": "gold"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = app
            .req(Method::POST, "/v1/tenants/acme/environments")
            .json(&json!({"name": "dev"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        wait_ready(&app, &["acme"], Duration::from_secs(60)).await;
        let t: Value = app.admin.get("/v1/tenants/acme").await.unwrap();
        assert_eq!(t["generation"], 4);
        assert_eq!(t["status"]["observedGeneration"], 4);
        // The exported document re-applies as a no-op; with a stale version it is refused
        // and the tenant is unchanged.
        let doc: Value = app.admin.get("/v1/manifests/tenant/acme").await.unwrap();
        assert_eq!(doc["spec"]["billing"]["plan"], "gold");
        assert_eq!(doc["spec"]["state"], "active");
        let r = app
            .req(Method::POST, "/v1/apply")
            .json(&json!([doc]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let plan: Value = r.json().await.unwrap();
        assert_eq!(plan["objects"][0]["action"], "unchanged", "{plan:#}");
        let mut stale = doc.clone();
        stale["metadata"]["version"] = json!(doc["metadata"]["version"].as_i64().unwrap() - 1);
        stale["spec"]["billing"]["plan"] = json!("free");
        let r = app
            .req(Method::POST, "/v1/apply")
            .json(&json!([stale]))
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 409).await;
        assert!(
            p["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("StaleVersion"),
            "{p:#}"
        );
        let t: Value = app.admin.get("/v1/tenants/acme").await.unwrap();
        assert_eq!(t["billing"]["plan"], "gold");
        // A manifest that suspends: the controller runs the same job as `suspend`.
        let mut suspend = doc.clone();
        suspend["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("version");
        suspend["spec"]["state"] = json!("suspended");
        let r = app
            .req(Method::POST, "/v1/apply")
            .json(&json!([suspend]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        wait_ready(&app, &["acme"], Duration::from_secs(60)).await;
        let t: Value = app.admin.get("/v1/tenants/acme").await.unwrap();
        assert_eq!(t["state"], "suspended");
        let suspends = app
            .sql_i64("SELECT COUNT(*) FROM jobs WHERE kind = 'tenant.suspend'")
            .await
            .unwrap();
        assert_eq!(suspends, 1);
        // Illegal transitions are refused whole: back to draft, or a profile change that is
        // not a move.
        let mut draft = suspend.clone();
        draft["spec"]["state"] = json!("draft");
        let r = app
            .req(Method::POST, "/v1/apply")
            .json(&json!([draft]))
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 409).await;
        assert!(
            p["detail"].as_str().unwrap().contains("IllegalTransition"),
            "{p:#}"
        );
        let mut byoc = suspend.clone();
        byoc["spec"]["profile"] = json!("st-byoc");
        let r = app
            .req(Method::POST, "/v1/apply?dry_run=true")
            .json(&json!([byoc]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let plan: Value = r.json().await.unwrap();
        assert_eq!(
            plan["objects"][0]["refusal"]["reason"], "NeedsMove",
            "{plan:#}"
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_are_refused_by_document_and_field() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let org = "apiVersion: cellplane.dev/v1\nkind: Organization\nmetadata: {name: acme-corp}\nspec: {name: Acme}\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("{org}---\napiVersion: cellplane.dev/v1\nkind: Tenant\nmetadata: {{name: acme\nspec: {{}}\n"),
            "documents[1]",
            "column",
        ),
        (
            format!("{org}---\napiVersion: cellplane.dev/v1\nkind: Tenant\nmetadata: {{name: acme}}\nspec: {{organization_id: acme-corp, profile: mt-standard, region: eu-west-1, quotas: {{apiRatelimit: 5}}}}\n"),
            "documents[1].spec.quotas.apiRatelimit",
            "unknown field",
        ),
        (
            format!("{org}---\napiVersion: cellplane.dev/v2\nkind: Tenant\nmetadata: {{name: acme}}\nspec: {{}}\n"),
            "documents[1].apiVersion",
            "cellplane.dev/v1",
        ),
        (
            format!("{org}---\napiVersion: cellplane.dev/v1\nkind: Pod\nmetadata: {{name: acme}}\nspec: {{}}\n"),
            "documents[1].kind",
            "unknown variant",
        ),
        (
            format!("{org}---\napiVersion: cellplane.dev/v1\nkind: Tenant\nmetadata: {{name: ../../etc}}\nspec: {{organization_id: acme-corp, profile: mt-standard, region: eu-west-1}}\n"),
            "documents[1].metadata.name",
            "",
        ),
        (
            format!("{org}---\napiVersion: cellplane.dev/v1\nkind: Organization\nmetadata: {{name: big}}\nspec: {{name: \"{}\"}}\n", "x".repeat(70 * 1024)),
            "documents[1]",
            "at most 65536",
        ),
        (
            format!("{org}---\napiVersion: cellplane.dev/v1\nkind: Cell\nmetadata: {{name: c1}}\nspec: {{region: eu-west-1, tier: pooled, template: local, capacity: {{tenants: 0, units: 1}}}}\n"),
            "documents[1].spec.capacity",
            "",
        ),
        (
            format!("{org}---\napiVersion: cellplane.dev/v1\nkind: Tenant\nmetadata: {{name: acme}}\nspec: {{organization_id: nobody, profile: mt-standard, region: eu-west-1}}\n"),
            "documents[1].spec.organization_id",
            "does not exist",
        ),
    ];
    for (yaml, field, message) in cases {
        let (status, p) = apply(&app, &yaml, "").await;
        assert_eq!(status, 400, "{field}: {p:#}");
        let errors = p["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e["field"].as_str().unwrap().starts_with(field)
                    && e["message"].as_str().unwrap().contains(message)),
            "{field} / {message}: {p:#}"
        );
        // The valid organization in the same request was not applied either.
        let r = app
            .req(Method::GET, "/v1/organizations/acme-corp")
            .send()
            .await
            .unwrap();
        expect_problem(r, 404).await;
    }
    // A residency violation and an archived new tenant are refused (409), nothing stored.
    let refused = format!("{org}---\napiVersion: cellplane.dev/v1\nkind: Tenant\nmetadata: {{name: acme}}\nspec: {{organization_id: acme-corp, profile: mt-standard, region: eu-west-1, policies: {{dataResidency: in-region-only}}, environments: [{{name: prod}}, {{name: dev, region: us-east-1}}]}}\n---\napiVersion: cellplane.dev/v1\nkind: Tenant\nmetadata: {{name: zeta}}\nspec: {{organization_id: acme-corp, profile: mt-standard, region: eu-west-1, state: archived}}\n");
    let (status, p) = apply(&app, &refused, "").await;
    assert_eq!(status, 409, "{p:#}");
    let text = p.to_string();
    assert!(
        text.contains("ResidencyViolation") && text.contains("IllegalTransition"),
        "{p:#}"
    );
    let r = app
        .req(Method::GET, "/v1/organizations/acme-corp")
        .send()
        .await
        .unwrap();
    expect_problem(r, 404).await;
    // --partial stores what it can and reports the rest.
    let (status, r) = apply(&app, &refused, "?partial=true").await;
    assert_eq!(status, 200, "{r:#}");
    assert_eq!(object(&r, "Organization", "acme-corp")["applied"], true);
    assert_eq!(object(&r, "Tenant", "acme")["applied"], false);
    assert_eq!(object(&r, "Tenant", "zeta")["applied"], false);
    // Not a list, not YAML, wrong media type.
    let r = app
        .req(Method::POST, "/v1/apply")
        .json(&json!({"kind": "Tenant"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    let r = app
        .req(Method::POST, "/v1/apply")
        .header("content-type", "text/plain")
        .body("kind: Tenant")
        .send()
        .await
        .unwrap();
    expect_problem(r, 415).await;
    let r = app
        .req(Method::POST, "/v1/apply")
        .header("content-type", "application/yaml")
        .body(vec![0xff, 0xfe, 0x00])
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    let r = app
        .req(Method::GET, "/v1/manifests/pod/acme")
        .send()
        .await
        .unwrap();
    expect_problem(r, 400).await;
    let r = app
        .req(Method::GET, "/v1/manifests/tenant/nobody")
        .send()
        .await
        .unwrap();
    expect_problem(r, 404).await;
    // A viewer may read documents but not apply them; authorization comes before the body.
    let viewer = app.token("viewer").await;
    let r = app
        .anonymous()
        .request(Method::POST, "/v1/apply")
        .bearer_auth(&viewer)
        .header("content-type", "application/yaml")
        .body("not: [yaml")
        .send()
        .await
        .unwrap();
    expect_problem(r, 403).await;
    assert!(!app.log().contains("panicked"));
}

/// A convergence that keeps failing is retried with backoff and shown, never silent: the
/// activation's last step fails every time (a failpoint), and the tenant says so with the
/// job, its error, the retry count and when the next try is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_convergence_is_retried_with_backoff_and_visible() {
    let opts = quick().with(
        "CELLPLANE__JOBS__FAILPOINTS",
        "tenant.activate/publish-routes=fatal",
    );
    let app = TestApp::spawn_with(Backend::Sqlite, opts).await;
    app.stamp_local("euw1-pool-1", json!({})).await;
    let doc = r#"
apiVersion: cellplane.dev/v1
kind: Organization
metadata: {name: acme-corp}
spec: {name: Acme}
---
apiVersion: cellplane.dev/v1
kind: Tenant
metadata: {name: acme}
spec: {organization_id: acme-corp, profile: mt-standard, region: eu-west-1}
"#;
    let (status, _) = apply(&app, doc, "").await;
    assert_eq!(status, 200);
    let t = eventually(Duration::from_secs(60), || async {
        let t: Value = app.admin.get("/v1/tenants/acme").await.ok()?;
        (t["status"]["retries"].as_i64()? >= 3).then_some(t)
    })
    .await
    .unwrap_or_else(|_| panic!("no retries counted\n{}", app.log()));
    assert_eq!(t["status"]["phase"], "Failed", "{t:#}");
    let ready = condition(&t, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "JobFailed");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("tenant.activate")
            && ready["message"].as_str().unwrap().contains("failpoint"),
        "{ready:#}"
    );
    assert!(t["status"]["nextRetryTime"].is_string(), "{t:#}");
    assert!(t["status"]["lastFailedJob"].is_string(), "{t:#}");
    // Each failure was one job, and the compensation left the tenant a draft holding
    // nothing.
    let failed = app
        .sql_i64("SELECT COUNT(*) FROM jobs WHERE kind = 'tenant.activate' AND state = 'failed'")
        .await
        .unwrap();
    let retries = t["status"]["retries"].as_i64().unwrap();
    assert!(
        failed >= retries && failed <= retries + 1,
        "{failed} jobs, {retries} retries"
    );
    assert_eq!(t["state"], "draft");
    assert_eq!(app.cell("euw1-pool-1").await.used.tenants, 0);
    // The backoff doubles: the retries are spread out, not back to back.
    let jobs: Value = app
        .admin
        .get("/v1/jobs?target=tenant/acme&limit=1000")
        .await
        .unwrap();
    let times: Vec<&str> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "tenant.activate")
        .map(|j| j["created_at"].as_str().unwrap())
        .collect();
    let mut at: Vec<chrono::DateTime<chrono::Utc>> = times
        .iter()
        .filter_map(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .collect();
    at.sort();
    assert!(at.len() >= 3, "{times:?}");
    let gap = (at[2] - at[1]).num_milliseconds();
    assert!(gap >= 150, "the second retry waited {gap} ms");
}

/// The example fleet in `examples/fleet` applies with the CLI as its README says, and
/// converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_fleet_applies_and_converges() {
    let app = TestApp::spawn_with(Backend::Sqlite, quick()).await;
    let dir = repo_root().join("examples/fleet");
    let dir = dir.to_str().unwrap();
    let (code, out, err) = cli(&app, &["apply", "-f", dir, "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("0 to update, 0 unchanged") && out.contains("0 refused"),
        "{out}"
    );
    let (code, out, err) = cli(&app, &["apply", "-f", dir]);
    assert_eq!(code, 0, "{out}{err}");
    let list: Value = app.admin.get("/v1/tenants").await.unwrap();
    let tenants: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tenant_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tenants.len(), 3, "{tenants:?}");
    let ids: Vec<&str> = tenants.iter().map(String::as_str).collect();
    wait_ready(&app, &ids, Duration::from_secs(120)).await;
    let (code, out, _) = cli(&app, &["diff", "-f", dir]);
    assert_eq!(code, 0);
    assert!(out.contains("0 to create, 0 to update"), "{out}");
}

const TENANT_DOC: &str = r#"
apiVersion: cellplane.dev/v1
kind: Organization
metadata: {name: acme-corp}
spec: {name: Acme}
---
apiVersion: cellplane.dev/v1
kind: Tenant
metadata: {name: acme}
spec: {organization_id: acme-corp, profile: mt-standard, region: eu-west-1}
"#;

/// The controller's process is SIGKILLed right before it enqueues the activation (a
/// failpoint of its first lease term); after a restart the next term converges the tenant
/// with exactly one activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_controller_killed_before_its_enqueue_converges_after_a_restart() {
    let opts = quick()
        .with("CELLPLANE__JOBS__CONTROLLER_LEASE_MS", "1500")
        .with("CELLPLANE__JOBS__CONTROLLER_RENEW_MS", "200")
        .with(
            "CELLPLANE__JOBS__FAILPOINTS",
            "controller.tenant/enqueue=kill@1",
        );
    let mut app = TestApp::spawn_with(Backend::Sqlite, opts).await;
    app.stamp_local("euw1-pool-1", json!({})).await;
    let (status, _) = apply(&app, TENANT_DOC, "").await;
    assert_eq!(status, 200);
    assert!(
        app.wait_exit(Duration::from_secs(30)).await,
        "the failpoint kills the process\n{}",
        app.log()
    );
    assert_eq!(
        app.sql_i64("SELECT COUNT(*) FROM jobs WHERE kind = 'tenant.activate'")
            .await
            .unwrap(),
        0,
        "killed before the enqueue committed"
    );
    app.start().await.unwrap();
    wait_ready(&app, &["acme"], Duration::from_secs(60)).await;
    assert_eq!(
        app.sql_i64("SELECT COUNT(*) FROM jobs WHERE kind = 'tenant.activate'")
            .await
            .unwrap(),
        1
    );
    assert!(app.audit_verify_ok().await);
}

/// Two replicas on one PostgreSQL: the replica holding the tenant controller's lease is
/// SIGKILLed; the other takes the lease over and converges what is applied through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_takes_the_tenant_controller_over() {
    let opts = quick()
        .with("CELLPLANE__JOBS__LEASE_SECS", "2")
        .with("CELLPLANE__JOBS__CONTROLLER_LEASE_MS", "1500")
        .with("CELLPLANE__JOBS__CONTROLLER_RENEW_MS", "200");
    let mut a = TestApp::spawn_with(Backend::Postgres, opts.clone()).await;
    let mut b = a.spawn_replica(opts).await;
    a.stamp_local("euw1-pool-1", json!({})).await;
    let holder_is_a = eventually(Duration::from_secs(30), || async {
        let page: Value = a.admin.get("/v1/controllers").await.ok()?;
        let c = page["items"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "tenant" && c["live"] == true)?
            .clone();
        Some(c["this_replica"] == true)
    })
    .await
    .expect("a replica holds the tenant controller");
    let (killed, survivor) = if holder_is_a {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    killed.kill9();
    let (status, _) = apply(survivor, TENANT_DOC, "").await;
    assert_eq!(status, 200);
    wait_ready(survivor, &["acme"], Duration::from_secs(90)).await;
    let page: Value = survivor.admin.get("/v1/controllers").await.unwrap();
    let c = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tenant")
        .unwrap()
        .clone();
    assert_eq!(c["this_replica"], true, "{c:#}");
    assert!(c["term"].as_i64().unwrap() >= 2, "{c:#}");
}
