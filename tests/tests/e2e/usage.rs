//! Usage metering (issue "Signed webhooks…", item 4): two real routers count the requests
//! of two tenants (requests, request and response body bytes, the cell's `X-Usage-Units`),
//! report them with their heartbeats, and `GET /v1/usage` equals what the clients sent —
//! also across a router SIGKILL and restart, and heartbeats refused while the control plane
//! is down. Usage goes out as `dev.cellplane.usage.v1` events.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// What the clients saw, per tenant: requests, request body bytes, response body bytes,
/// units (one per KiB written, at least one, from sample-cell's `X-Usage-Units`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    requests: u64,
    request_bytes: u64,
    response_bytes: u64,
    units: u64,
}

async fn send(
    router: &TestRouter,
    tenant: &str,
    n: usize,
    put_bytes: Option<usize>,
    seen: &mut BTreeMap<String, Counts>,
) {
    for i in 0..n {
        let req = match put_bytes {
            Some(len) => router
                .tenant_req(Method::PUT, tenant, &format!("/v1/kv/k{i}"))
                .body(vec![b'x'; len]),
            None => router.tenant_req(Method::GET, tenant, &format!("/v1/kv/k{i}")),
        };
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        assert!(
            [200, 201, 404].contains(&status),
            "{tenant}: {status} {}",
            r.text().await.unwrap_or_default()
        );
        assert!(
            r.headers().get("x-usage-units").is_none(),
            "the router relays the cell's usage header"
        );
        let body = r.bytes().await.unwrap();
        let c = seen.entry(tenant.to_string()).or_default();
        c.requests += 1;
        c.response_bytes += body.len() as u64;
        if let Some(len) = put_bytes {
            c.request_bytes += len as u64;
            c.units += (len as u64).div_ceil(1024).max(1);
        }
    }
}

async fn usage(app: &TestApp, client: &cellplane_api::Client, query: &str) -> Value {
    let _ = app;
    client.get(&format!("/v1/usage?{query}")).await.unwrap()
}

/// The totals `GET /v1/usage` reports for a tenant.
async fn counted(app: &TestApp, tenant: &str) -> Counts {
    let u = usage(
        app,
        &app.admin,
        &format!("granularity=day&from=2020-01-01T00:00:00Z&tenant_id={tenant}"),
    )
    .await;
    let mut c = Counts::default();
    for p in u["items"].as_array().unwrap() {
        assert_eq!(p["tenant_id"], tenant);
        assert_eq!(p["env"], "prod");
        let a = p["amount"].as_u64().unwrap();
        match p["meter"].as_str().unwrap() {
            "requests" => c.requests += a,
            "request_bytes" => c.request_bytes += a,
            "response_bytes" => c.response_bytes += a,
            "units" => c.units += a,
            m => panic!("meter {m}"),
        }
    }
    c
}

async fn wait_counted(app: &TestApp, seen: &BTreeMap<String, Counts>, what: &str) {
    let last = std::sync::Mutex::new(BTreeMap::new());
    let done = eventually(Duration::from_secs(30), || async {
        let mut now = BTreeMap::new();
        for t in seen.keys() {
            now.insert(t.clone(), counted(app, t).await);
        }
        let same = &now == seen;
        *last.lock().unwrap() = now;
        same.then_some(())
    })
    .await;
    assert!(
        done.is_ok(),
        "{what}: counted {:?}, sent {seen:?}",
        last.lock().unwrap()
    );
}

/// Requests per tenant reported by `dev.cellplane.usage.v1` events so far.
async fn reported(app: &TestApp) -> (u64, u64) {
    let page: Value = app
        .admin
        .get("/v1/events?type=dev.cellplane.usage.v1&limit=1000")
        .await
        .unwrap();
    let mut requests = BTreeMap::<String, u64>::new();
    for e in page["items"].as_array().unwrap() {
        let tenant = e["data"]["tenant_id"].as_str().unwrap().to_string();
        for u in e["data"]["usage"].as_array().unwrap() {
            if u["meter"] == "requests" {
                *requests.entry(tenant.clone()).or_default() += u["amount"].as_u64().unwrap();
            }
        }
    }
    (
        requests.get("acme").copied().unwrap_or(0),
        requests.get("globex").copied().unwrap_or(0),
    )
}

both_backends!(
    usage_through_two_routers_is_exact_across_a_router_sigkill_and_a_control_plane_outage,
    |b| async move {
        let mut app = TestApp::spawn_with(
            b,
            AppOptions::default()
                .with("CELLPLANE__USAGE__EXPORT_PERIOD_SECS", "60")
                .with("CELLPLANE__USAGE__EXPORT_GRACE_SECS", "0"),
        )
        .await;
        app.stamp_cells(&[("pool-1", "eu-west-1", "pooled", 10, 10)])
            .await;
        app.create_org("acme-corp").await;
        for t in ["acme", "globex"] {
            app.create_tenant(t, "acme-corp").await;
            app.lifecycle(t, "activate").await;
        }
        let token = app.token("router").await;
        let hb = ["--heartbeat-secs", "1"];
        let mut r1 = TestRouter::spawn(&app.url, &token, &hb).await;
        let r2 = TestRouter::spawn(&app.url, &token, &hb).await;
        let rev = app.routing_revision().await;
        r1.wait_revision(rev).await;
        r2.wait_revision(rev).await;

        let mut seen = BTreeMap::new();
        send(&r1, "acme", 30, Some(10), &mut seen).await;
        send(&r1, "globex", 20, None, &mut seen).await;
        send(&r2, "acme", 10, None, &mut seen).await;
        send(&r2, "globex", 5, Some(2000), &mut seen).await;
        wait_counted(&app, &seen, "two routers").await;

        // SIGKILL of a router right after its clients got their answers, then a restart
        // on the same state file: nothing lost, nothing doubled.
        send(&r1, "acme", 7, Some(3000), &mut seen).await;
        r1.kill9();
        r1.start().await.unwrap();
        send(&r1, "acme", 3, None, &mut seen).await;
        wait_counted(&app, &seen, "after the router's SIGKILL").await;

        // The control plane down: heartbeats are refused while the routers keep serving
        // from their tables; the counts arrive once it is back.
        app.terminate();
        send(&r1, "acme", 4, Some(100), &mut seen).await;
        send(&r2, "globex", 9, None, &mut seen).await;
        // Each router sealed its counts into a batch that no heartbeat got acknowledged.
        for r in [&r1, &r2] {
            let dir = std::path::PathBuf::from(format!("{}.usage", r.state_file.display()));
            eventually(Duration::from_secs(10), || async {
                std::fs::read_dir(&dir)
                    .ok()?
                    .filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with("batch-"))
                    .then_some(())
            })
            .await
            .unwrap();
        }
        app.start_same_address().await.unwrap();
        wait_counted(&app, &seen, "after the control plane's outage").await;

        // Granularity and meter filters sum the same minutes.
        let hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let by_minute = usage(
            &app,
            &app.admin,
            &format!("tenant_id=acme&meter=requests&granularity=minute&from={hour_ago}"),
        )
        .await;
        let total: u64 = by_minute["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["amount"].as_u64().unwrap())
            .sum();
        assert_eq!(total, seen["acme"].requests);
        assert_eq!(by_minute["granularity"], "minute");

        // The CLI prints the same.
        let out = std::process::Command::new(bin_path("cellplane"))
            .args([
                "tenant",
                "usage",
                "acme",
                "--meter",
                "requests",
                "--granularity",
                "day",
            ])
            .args([
                "--from",
                "2020-01-01T00:00:00Z",
                "--url",
                &app.url,
                "--token",
                ADMIN_TOKEN,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("METER") && text.contains("requests"),
            "{text}"
        );
        let printed: u64 = text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum();
        assert_eq!(printed, seen["acme"].requests, "{text}");

        // A tenant-admin reads its own tenant's usage only.
        let t: Value = app
            .admin
            .post(
                "/v1/tokens",
                &json!({"role": "tenant-admin", "tenant_id": "globex"}),
            )
            .await
            .unwrap();
        let globex_admin = app.client(t["token"].as_str().unwrap());
        let own = usage(&app, &globex_admin, "meter=requests").await;
        assert!(!own["items"].as_array().unwrap().is_empty());
        assert!(own["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["tenant_id"] == "globex"));
        let other = app
            .client(t["token"].as_str().unwrap())
            .request(Method::GET, "/v1/usage?tenant_id=acme")
            .send()
            .await
            .unwrap();
        let p = expect_problem(other, 400).await;
        assert_eq!(p["errors"][0]["field"], "tenant_id");
        for (q, field) in [
            ("meter=bananas", "meter"),
            ("granularity=week", "granularity"),
            ("from=yesterday", "from"),
            ("from=2026-12-04T00:00:00Z&to=2026-12-03T00:00:00Z", "from"),
        ] {
            let r = app
                .req(Method::GET, &format!("/v1/usage?{q}"))
                .send()
                .await
                .unwrap();
            let p = expect_problem(r, 400).await;
            assert_eq!(p["errors"][0]["field"], field, "{q}: {p}");
        }

        // Each closed minute goes out as usage events whose sums equal the counts.
        // (A minute closes within 60 s; the usage controller looks every second.)
        let want = (seen["acme"].requests, seen["globex"].requests);
        let done = eventually(Duration::from_secs(150), || async {
            (reported(&app).await == want).then_some(())
        })
        .await;
        assert!(
            done.is_ok(),
            "usage events report {:?}, sent {seen:?}",
            reported(&app).await
        );
    }
);

// A heartbeat whose answer was lost is sent again with the same batch: applied once.
both_backends!(
    a_usage_batch_sent_twice_is_counted_once_and_bad_batches_are_refused,
    |b| async move {
        let app = TestApp::spawn(b).await;
        let token = app.token("router").await;
        let router = app.client(&token);
        let hb = json!({"applied_revision": 0, "usage": [{"batch_id": "b-1", "records": [
            {"tenant_id": "acme", "env": "prod", "minute": "2026-12-01T10:15:00Z",
             "requests": 5, "request_bytes": 50, "response_bytes": 500, "units": 2}]}]});
        for _ in 0..2 {
            let r = router
                .request(Method::POST, "/v1/routers/rt-a/heartbeat")
                .json(&hb)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
        assert_eq!(
            counted(&app, "acme").await,
            Counts {
                requests: 5,
                request_bytes: 50,
                response_bytes: 500,
                units: 2
            }
        );
        // Another router's batch of the same id is its own.
        let r = router
            .request(Method::POST, "/v1/routers/rt-b/heartbeat")
            .json(&hb)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(counted(&app, "acme").await.requests, 10);
        for (bad, field) in [
            (
                json!({"batch_id": "b 2", "records": []}),
                "usage[0].batch_id",
            ),
            (
                json!({"batch_id": "b-2", "records": [{"tenant_id": "Acme!", "env": "prod",
                  "minute": "2026-12-01T10:15:00Z", "requests": 1, "request_bytes": 0,
                  "response_bytes": 0, "units": 0}]}),
                "usage[0].records[0].tenant_id",
            ),
            (
                json!({"batch_id": "b-2", "records": [{"tenant_id": "acme", "env": "prod",
                  "minute": "2026-12-01T10:15:30Z", "requests": 1, "request_bytes": 0,
                  "response_bytes": 0, "units": 0}]}),
                "usage[0].records[0].minute",
            ),
        ] {
            let r = router
                .request(Method::POST, "/v1/routers/rt-a/heartbeat")
                .json(&json!({"applied_revision": 0, "usage": [bad]}))
                .send()
                .await
                .unwrap();
            let p = expect_problem(r, 400).await;
            assert_eq!(p["errors"][0]["field"], field, "{p}");
        }
        assert_eq!(
            counted(&app, "acme").await.requests,
            10,
            "nothing of a refused heartbeat"
        );
    }
);
