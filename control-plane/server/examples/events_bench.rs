//! Webhook delivery benchmark (bench/events/run.sh): runs a real `cellplane serve`
//! (`CELLPLANE_BIN`) on SQLite and, with `--pg`, on PostgreSQL, subscribes a receiver
//! written here, and measures
//! - commit → first delivery attempt: events are committed at a fixed rate (each
//!   `POST /v1/tenants` commits one) and the receiver notes when each `webhook-id`
//!   first arrives; latency = arrival − the event's `time` (stamped inside the committing
//!   transaction, so the measure includes the commit);
//! - deliveries/s at saturation: a replay queues `--backlog` deliveries at once; from the
//!   replay's answer to the last arrival. Baseline in the same run: a bare sender posting
//!   the same signed documents to the same receiver with the same concurrency (no store, no
//!   dispatcher).
//!
//! Prints one JSON line per scenario.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-admin-token-0123456789abcdef";

#[derive(Default)]
struct Seen {
    /// webhook-id → (arrival, the event's time)
    first: HashMap<String, (chrono::DateTime<chrono::Utc>, String)>,
    requests: u64,
    last: Option<Instant>,
}

async fn receiver(seen: Arc<Mutex<Seen>>) -> u16 {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let now = chrono::Utc::now();
                let id = headers
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let time = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["time"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let mut s = seen.lock().expect("not poisoned");
                s.requests += 1;
                s.last = Some(Instant::now());
                s.first.entry(id).or_insert((now, time));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

struct Server {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn serve(pg: Option<&str>) -> Server {
    let bin = std::env::var("CELLPLANE_BIN").unwrap_or_else(|_| "target/release/cellplane".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(dir.path())
    .env("CELLPLANE_ADMIN_TOKEN", TOKEN)
    .env(
        "CELLPLANE__WEBHOOKS__SECRET_KEY",
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    )
    .env("CELLPLANE__WEBHOOKS__ALLOW_PRIVATE_DESTINATIONS", "true")
    .env("CELLPLANE__RATE_LIMIT__AUTHORING_PER_SEC", "100000")
    .env("CELLPLANE__RATE_LIMIT__AUTHORING_BURST", "100000")
    .env("RUST_LOG", "warn")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    if let Some(pg) = pg {
        cmd.args(["--database-url", pg]);
    }
    let url = format!("http://127.0.0.1:{port}");
    // Held in the Server at once: its Drop kills and reaps the process on every path.
    let mut server = Server {
        child: cmd.spawn().expect("cellplane serve"),
        url: url.clone(),
        _dir: dir,
    };
    let c = reqwest::Client::new();
    for _ in 0..300 {
        if c.get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return server;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("cellplane serve exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cellplane serve did not become ready");
}

fn client() -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .pool_max_idle_per_host(256)
        .build()
        .expect("client")
}

async fn subscribe(c: &reqwest::Client, url: &str, port: u16) -> (String, String) {
    let w: serde_json::Value = c
        .post(format!("{url}/v1/webhooks"))
        .json(
            &serde_json::json!({"url": format!("http://127.0.0.1:{port}/hook"),
                                  "events": ["dev.cellplane.tenancy.created.v1"]}),
        )
        .send()
        .await
        .expect("subscribe")
        .json()
        .await
        .expect("json");
    (
        w["webhook_id"].as_str().expect("id").to_string(),
        w["secret"].as_str().expect("secret").to_string(),
    )
}

/// The organization the generated tenants belong to.
const ORG: &str = "bench-org";

/// Commits `n` events at `rate`/s (one tenant creation each: `tenancy.created`, through
/// the registry's group commit); the wall time it took.
async fn generate(c: &reqwest::Client, url: &str, prefix: &str, n: usize, rate: f64) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..n {
        tick.tick().await;
        let (c, url) = (c.clone(), url.to_string());
        let id = format!("{prefix}-{i}");
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(format!("{url}/v1/tenants"))
                .json(&serde_json::json!({"tenant_id": id, "organization_id": ORG,
                    "profile": "mt-standard", "region": "eu-west-1"}))
                .send()
                .await
                .expect("create");
            assert_eq!(
                r.status().as_u16(),
                201,
                "{}",
                r.text().await.unwrap_or_default()
            );
        }));
    }
    for t in tasks {
        t.await.expect("create task");
    }
    start.elapsed().as_secs_f64()
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn wait_for(seen: &Arc<Mutex<Seen>>, n: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if seen.lock().expect("not poisoned").first.len() >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The bare sender: `concurrency` tasks posting the same signed documents to the receiver.
async fn bare_sender(
    docs: &[(String, Vec<u8>)],
    secret: &str,
    port: u16,
    concurrency: usize,
) -> f64 {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client");
    let docs = Arc::new(docs.to_vec());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let secrets = vec![secret.to_string()];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, docs, next, secrets) =
            (client.clone(), docs.clone(), next.clone(), secrets.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some((id, body)) = docs.get(i) else { break };
                let ts = chrono::Utc::now().timestamp();
                let sig = cellplane::webhooks::sign(&secrets, id, ts, body);
                let r = client
                    .post(format!("http://127.0.0.1:{port}/hook"))
                    .header("content-type", "application/json")
                    .header("webhook-id", id.as_str())
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", sig)
                    .body(body.clone())
                    .send()
                    .await;
                assert!(r.is_ok_and(|r| r.status().is_success()));
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    docs.len() as f64 / start.elapsed().as_secs_f64()
}

async fn scenario(name: &str, pg: Option<&str>, rates: &[f64], secs: f64, backlog: usize) {
    let server = serve(pg).await;
    let c = client();
    let r = c
        .post(format!("{}/v1/organizations", server.url))
        .json(&serde_json::json!({"organization_id": ORG, "name": ORG}))
        .send()
        .await
        .expect("organization");
    assert_eq!(r.status().as_u16(), 201);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let port = receiver(seen.clone()).await;
    let (hook, secret) = subscribe(&c, &server.url, port).await;
    let mut latency = Vec::new();
    for (k, rate) in rates.iter().enumerate() {
        *seen.lock().expect("not poisoned") = Seen::default();
        let n = (rate * secs) as usize;
        let took = generate(&c, &server.url, &format!("r{k}"), n, *rate).await;
        let complete = wait_for(&seen, n, Duration::from_secs(120)).await;
        let s = seen.lock().expect("not poisoned");
        let mut ms: Vec<f64> = s
            .first
            .values()
            .filter_map(|(at, time)| {
                let t = chrono::DateTime::parse_from_rfc3339(time).ok()?;
                Some((*at - t.with_timezone(&chrono::Utc)).num_microseconds()? as f64 / 1000.0)
            })
            .collect();
        ms.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        latency.push(serde_json::json!({
            "rate": rate, "events": n, "achieved_rate": n as f64 / took,
            "delivered": s.first.len(), "complete": complete,
            "p50_ms": pct(&ms, 0.5), "p99_ms": pct(&ms, 0.99), "max_ms": pct(&ms, 1.0),
        }));
    }
    // Saturation: events committed while nobody is subscribed, then one replay queues
    // them all for a new subscription.
    let _ = c
        .delete(format!("{}/v1/webhooks/{hook}", server.url))
        .send()
        .await
        .expect("unsubscribe");
    let since = chrono::Utc::now() - chrono::Duration::milliseconds(500);
    generate(&c, &server.url, "backlog", backlog, 5_000.0).await;
    let until = chrono::Utc::now() + chrono::Duration::seconds(1);
    let (target, secret2) = subscribe(&c, &server.url, port).await;
    *seen.lock().expect("not poisoned") = Seen::default();
    let started = Instant::now();
    let r: serde_json::Value = c
        .post(format!("{}/v1/webhooks/{target}/replay", server.url))
        .json(&serde_json::json!({"since": since.to_rfc3339(), "until": until.to_rfc3339()}))
        .send()
        .await
        .expect("replay")
        .json()
        .await
        .expect("json");
    let queued = r["queued"].as_u64().unwrap_or(0) as usize;
    let complete = wait_for(&seen, queued, Duration::from_secs(300)).await;
    let last = seen
        .lock()
        .expect("not poisoned")
        .last
        .unwrap_or_else(Instant::now);
    let engine_per_s = queued as f64 / (last - started).as_secs_f64();
    // The same documents from the bare sender.
    let docs: Vec<(String, Vec<u8>)> = (0..queued)
        .map(|i| {
            (
                format!("bare-{i}"),
                serde_json::to_vec(&serde_json::json!({"specversion": "1.0", "id": format!("bare-{i}"),
                    "type": "dev.cellplane.organization.created.v1", "time": chrono::Utc::now().to_rfc3339(),
                    "data": {"organization_id": format!("backlog-{i}")}}))
                .expect("json"),
            )
        })
        .collect();
    *seen.lock().expect("not poisoned") = Seen::default();
    let bare_per_s = bare_sender(&docs, &secret2, port, 64).await;
    let _ = secret;
    drop(server);
    println!(
        "{}",
        serde_json::json!({
            "scenario": name,
            "latency": latency,
            "backlog": queued,
            "backlog_complete": complete,
            "engine_deliveries_per_s": engine_per_s,
            "bare_sender_per_s": bare_per_s,
        })
    );
}

/// Usage ingestion: `routers` tasks each report `tenants` tenant-minutes per minute for
/// `minutes` minutes, as routers do (batches of at most 4,000 records, one batch per
/// heartbeat, each applied once); against the same number of heartbeats without usage.
async fn ingest(name: &str, pg: Option<&str>, routers: usize, tenants: usize, minutes: usize) {
    let server = serve(pg).await;
    let c = client();
    let t: serde_json::Value = c
        .post(format!("{}/v1/tokens", server.url))
        .json(&serde_json::json!({"role": "router"}))
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    let token = t["token"].as_str().expect("token").to_string();
    let run = |with_usage: bool| {
        let (url, token) = (server.url.clone(), token.clone());
        async move {
            let start = Instant::now();
            let mut tasks = Vec::new();
            let mut heartbeats = 0;
            for r in 0..routers {
                let (url, token) = (url.clone(), token.clone());
                let mut bodies = Vec::new();
                for m in 0..minutes {
                    let minute = format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + r, m / 60, m % 60);
                    for (k, chunk) in (0..tenants).collect::<Vec<_>>().chunks(4000).enumerate() {
                        let usage = if with_usage {
                            serde_json::json!([{"batch_id": format!("b-{r}-{m}-{k}"),
                                "records": chunk.iter().map(|i| serde_json::json!({
                                    "tenant_id": format!("tenant-{i}"), "env": "prod", "minute": minute,
                                    "requests": 3, "request_bytes": 300, "response_bytes": 3000, "units": 1}))
                                    .collect::<Vec<_>>()}])
                        } else {
                            serde_json::json!([])
                        };
                        bodies.push(serde_json::json!({"applied_revision": 0, "usage": usage}));
                    }
                }
                heartbeats += bodies.len();
                tasks.push(tokio::spawn(async move {
                    let c = reqwest::Client::new();
                    for b in bodies {
                        let r = c
                            .post(format!("{url}/v1/routers/bench-{r}/heartbeat"))
                            .bearer_auth(&token)
                            .json(&b)
                            .send()
                            .await
                            .expect("heartbeat");
                        assert!(
                            r.status().is_success(),
                            "{}",
                            r.text().await.unwrap_or_default()
                        );
                    }
                }));
            }
            for t in tasks {
                t.await.expect("router task");
            }
            (heartbeats, start.elapsed().as_secs_f64())
        }
    };
    let (hb_plain, secs_plain) = run(false).await;
    let (hb, secs) = run(true).await;
    let records = routers * tenants * minutes;
    println!(
        "{}",
        serde_json::json!({
            "scenario": format!("{name}-ingest"),
            "routers": routers, "tenants": tenants, "minutes": minutes,
            "heartbeats": hb, "records": records,
            "records_per_s": records as f64 / secs,
            "heartbeat_ms": secs * 1000.0 * routers as f64 / hb as f64,
            "plain_heartbeat_ms": secs_plain * 1000.0 * routers as f64 / hb_plain as f64,
        })
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let secs: f64 = arg("--secs").and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let backlog: usize = arg("--backlog")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let rates = [100.0, 1000.0];
    let only = std::env::var("BENCH_SCENARIOS").ok();
    let run = |n: &str| only.as_deref().is_none_or(|o| o.split(',').any(|s| s == n));
    let minutes: usize = arg("--minutes").and_then(|s| s.parse().ok()).unwrap_or(3);
    if run("sqlite") {
        scenario("sqlite", None, &rates, secs, backlog).await;
    }
    if let Some(pg) = arg("--pg") {
        if run("postgres") {
            scenario("postgres", Some(&pg), &rates, secs, backlog).await;
        }
    }
    if run("ingest") {
        ingest("sqlite", None, 10, 10_000, minutes).await;
        if let Some(pg) = arg("--pg") {
            ingest("postgres", Some(&pg), 10, 10_000, minutes).await;
        }
    }
}
