//! Webhook delivery (issue "Signed webhooks…", item 3): the dispatcher under its lease turns
//! committed events into signed deliveries with attempt rows, retries on a schedule,
//! honours `Retry-After`, disables on 410 or after failing too long, probes and re-enables,
//! keeps a subject's order, and loses nothing when the control plane is SIGKILLed. The
//! receivers are written here, from the Standard Webhooks specification.

use cellplane_api::Client;
use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Fast retries so the tests see several attempts: 0, 0.3, 0.6, 1.2, 2.4, 4.8 s.
fn options() -> AppOptions {
    AppOptions::default()
        .with("CELLPLANE__WEBHOOKS__SECRET_KEY", KEY)
        .with("CELLPLANE__WEBHOOKS__ALLOW_PRIVATE_DESTINATIONS", "true")
        .with(
            "CELLPLANE__WEBHOOKS__RETRY_SCHEDULE_MS",
            "0,300,600,1200,2400,4800",
        )
        .with("CELLPLANE__WEBHOOKS__POLL_INTERVAL_MS", "50")
        .with("CELLPLANE__JOBS__CONTROLLER_LEASE_MS", "1500")
        .with("CELLPLANE__JOBS__CONTROLLER_RENEW_MS", "200")
}

/// What a receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    at: std::time::Instant,
}

impl Received {
    fn id(&self) -> &str {
        &self.headers["webhook-id"]
    }
    fn event(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// How the receiver answers the n-th request (from 0): status, extra headers, delay.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    delay: Duration,
}

fn reply(status: u16) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        delay: Duration::ZERO,
    }
}

type Behaviour = Arc<dyn Fn(usize, &Received) -> Reply + Send + Sync>;

/// A webhook receiver written for the test: records every request and answers as told.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Listens on `port` (0: any free one).
    async fn start(port: u16, behave: Behaviour) -> Receiver {
        Self::start_into(port, behave, Arc::new(Mutex::new(Vec::new()))).await
    }

    async fn start_into(port: u16, behave: Behaviour, got: Arc<Mutex<Vec<Received>>>) -> Receiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = got.clone();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (seen, behave, n) = (seen.clone(), behave.clone(), n.clone());
                tokio::spawn(async move { serve(sock, seen, behave, n).await });
            }
        });
        Receiver { port, got, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    fn stop(self) -> Arc<Mutex<Vec<Received>>> {
        self.task.abort();
        self.got
    }
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    seen: Arc<Mutex<Vec<Received>>>,
    behave: Behaviour,
    n: Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let k = sock.read(&mut chunk).await.unwrap_or(0);
        if k == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..k]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut headers = BTreeMap::new();
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let k = sock.read(&mut chunk).await.unwrap_or(0);
        if k == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..k]);
    }
    let got = Received {
        headers,
        body: buf[head_end..].to_vec(),
        at: std::time::Instant::now(),
    };
    let r = behave(n.fetch_add(1, std::sync::atomic::Ordering::SeqCst), &got);
    seen.lock().unwrap().push(got);
    // The scripted answer time (a 20 s 200 is the behaviour under test), not a wait.
    tokio::time::sleep(r.delay).await;
    let mut out = format!(
        "HTTP/1.1 {} X\r\ncontent-length: 0\r\nconnection: close\r\n",
        r.status
    );
    for (k, v) in &r.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = sock.write_all(out.as_bytes()).await;
}

/// Standard Webhooks verification from the specification: one of the `v1,` signatures is
/// the HMAC-SHA256 of `{id}.{timestamp}.{body}` under the secret's key, and the timestamp
/// is within five minutes.
fn verifies(secret: &str, r: &Received) -> bool {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    let ts: i64 = r.headers["webhook-timestamp"].parse().unwrap();
    if (chrono::Utc::now().timestamp() - ts).abs() > 300 {
        return false;
    }
    mac.update(format!("{}.{}.", r.id(), ts).as_bytes());
    mac.update(&r.body);
    let expected = b64.encode(mac.finalize().into_bytes());
    r.headers["webhook-signature"]
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

async fn subscribe(app: &TestApp, client: &Client, body: Value) -> (String, String) {
    let r = client
        .request(Method::POST, "/v1/webhooks")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let w: Value = r.json().await.unwrap();
    assert_eq!(status, 201, "{w}");
    let _ = app;
    (
        w["webhook_id"].as_str().unwrap().to_string(),
        w["secret"].as_str().unwrap().to_string(),
    )
}

async fn deliveries(app: &TestApp, id: &str) -> Vec<Value> {
    let page: Value = app
        .admin
        .get(&format!("/v1/webhooks/{id}/deliveries?limit=1000"))
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

async fn webhook(app: &TestApp, id: &str) -> Value {
    app.admin.get(&format!("/v1/webhooks/{id}")).await.unwrap()
}

async fn events(app: &TestApp, query: &str) -> Vec<Value> {
    let page: Value = app
        .admin
        .get(&format!("/v1/events?limit=1000&{query}"))
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

/// Polls `f` until it is Ok; the last error says what was missing.
async fn until<T, F, Fut>(timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() > deadline => {
                anyhow::bail!("not within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits until the subscription has at least `n` deliveries and every one is recorded as
/// succeeded: after that nothing of theirs is sent again, so what a receiver got is final
/// (the sync point for "each once" checks, instead of a sleep).
async fn settled(app: &TestApp, hook: &str, n: usize) {
    until(Duration::from_secs(30), || async {
        let d = deliveries(app, hook).await;
        if d.len() >= n && d.iter().all(|x| x["state"] == "succeeded") {
            Ok(())
        } else {
            anyhow::bail!("{} deliveries: {d:?}", d.len())
        }
    })
    .await
    .unwrap();
}

/// Waits until `f` holds for what the receiver got.
async fn until_received(
    rx: &Receiver,
    timeout: Duration,
    what: &str,
    f: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    until(timeout, || async {
        let got = rx.got();
        if f(&got) {
            Ok(got)
        } else {
            anyhow::bail!("{what}: {} requests so far", got.len())
        }
    })
    .await
    .unwrap()
}

fn distinct_ids(got: &[Received]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    got.iter()
        .filter(|r| seen.insert(r.id().to_string()))
        .map(|r| r.id().to_string())
        .collect()
}

const LIFECYCLE: [&str; 5] = [
    "dev.cellplane.tenancy.created.v1",
    "dev.cellplane.tenancy.activated.v1",
    "dev.cellplane.tenancy.suspended.v1",
    "dev.cellplane.tenancy.resumed.v1",
    "dev.cellplane.tenancy.archived.v1",
];

/// The distinct events a receiver got about `subject`, in arrival order.
fn types_about(got: &[Received], subject: &str) -> (Vec<String>, Vec<String>) {
    let mine: Vec<Received> = got
        .iter()
        .filter(|r| r.event()["subject"] == subject)
        .cloned()
        .collect();
    let ids = distinct_ids(&mine);
    let types = ids
        .iter()
        .map(|id| {
            mine.iter().find(|r| r.id() == id).unwrap().event()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    (ids, types)
}

both_backends!(
    a_lifecycle_arrives_signed_once_each_in_order_and_a_tenant_admin_gets_only_its_tenant,
    |b| async move {
        let app = TestApp::spawn_with(b, options()).await;
        app.stamp_local("euw1-pool-1", json!({})).await;
        app.create_org("acme-corp").await;
        app.create_tenant("globex", "acme-corp").await;
        let rx = Receiver::start(0, Arc::new(|_, _| reply(200))).await;
        let (hook, secret) = subscribe(
            &app,
            &app.admin,
            json!({"url": rx.url(), "events": LIFECYCLE, "ordering": "per-subject"}),
        )
        .await;
        // A tenant-admin of globex subscribes to everything it may see.
        let t: Value = app
            .admin
            .post(
                "/v1/tokens",
                &json!({"role": "tenant-admin", "tenant_id": "globex"}),
            )
            .await
            .unwrap();
        let globex_admin = app.client(t["token"].as_str().unwrap());
        let grx = Receiver::start(0, Arc::new(|_, _| reply(204))).await;
        let (globex_hook, globex_secret) = subscribe(
            &app,
            &globex_admin,
            json!({"url": grx.url(), "events": ["*"]}),
        )
        .await;

        app.create_tenant("acme", "acme-corp").await;
        for action in ["activate", "suspend", "resume", "archive"] {
            app.lifecycle("acme", action).await;
        }
        app.lifecycle("globex", "activate").await;

        let got = until_received(&rx, Duration::from_secs(30), "acme's five", |g| {
            types_about(g, "tenant/acme").0.len() == 5
                && types_about(g, "tenant/globex").0.len() == 1
        })
        .await;
        drop(got);
        settled(&app, &hook, 6).await;
        let got = rx.got();
        for r in &got {
            assert!(verifies(&secret, r), "signature: {:?}", r.headers);
        }
        // Exactly the five, each once after dedupe on webhook-id, in commit order.
        let (ids, types) = types_about(&got, "tenant/acme");
        assert_eq!(types, LIFECYCLE, "arrival order");
        let pulled = events(
            &app,
            &format!("subject=tenant/acme&type={}", LIFECYCLE.join(",")),
        )
        .await;
        let pulled_ids: Vec<&str> = pulled.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(pulled_ids, ids, "webhooks and the pull API disagree");
        for e in &pulled {
            let r = got.iter().find(|r| r.id() == e["id"]).unwrap();
            assert_eq!(&r.event(), e, "the delivered document is the pulled one");
        }
        let d = deliveries(&app, &hook).await;
        assert_eq!(d.len(), 6, "{d:?}");
        for x in &d {
            assert_eq!(x["state"], "succeeded", "{x}");
            assert_eq!(x["attempts"][0]["outcome"], "delivered");
            assert_eq!(x["attempts"][0]["status"], 200);
        }

        // The tenant-admin's subscription: only its tenant's events, whatever the types.
        until_received(&grx, Duration::from_secs(30), "globex activated", |g| {
            g.iter()
                .any(|r| r.event()["type"] == "dev.cellplane.tenancy.activated.v1")
        })
        .await;
        settled(&app, &globex_hook, 1).await;
        let g = grx.got();
        for r in &g {
            assert!(verifies(&globex_secret, r));
            let e = r.event();
            assert_eq!(e["subject"], "tenant/globex", "{e}");
        }

        // A subscription made afterwards catches up by replaying a range: the same events,
        // the same ids.
        let late = Receiver::start(0, Arc::new(|_, _| reply(200))).await;
        let (late_hook, _) = subscribe(
            &app,
            &app.admin,
            json!({"url": late.url(), "events": LIFECYCLE, "tenant_id": "acme",
                   "ordering": "per-subject"}),
        )
        .await;
        let r: Value = app
            .admin
            .post(
                &format!("/v1/webhooks/{late_hook}/replay"),
                &json!({"since": "2020-01-01T00:00:00Z"}),
            )
            .await
            .unwrap();
        assert_eq!(r["queued"], 5, "{r}");
        assert_eq!(r["truncated"], false);
        let replayed = until_received(&late, Duration::from_secs(30), "replayed", |g| {
            distinct_ids(g).len() == 5
        })
        .await;
        assert_eq!(types_about(&replayed, "tenant/acme").0, ids);
        let bad = app
            .req(Method::POST, &format!("/v1/webhooks/{late_hook}/replay"))
            .json(&json!({"since": "yesterday"}))
            .send()
            .await
            .unwrap();
        let p = expect_problem(bad, 400).await;
        assert_eq!(p["errors"][0]["field"], "since", "{p}");
    }
);

both_backends!(
    a_receiver_that_was_down_gets_every_event_after_attempts_with_backoff,
    |b| async move {
        let app = TestApp::spawn_with(b, options()).await;
        // A port nothing listens on yet.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/hook");
        let (hook, secret) = subscribe(
            &app,
            &app.admin,
            json!({"url": url, "events": ["dev.cellplane.tenancy.created.v1"]}),
        )
        .await;
        app.create_org("acme-corp").await;
        for t in ["t1", "t2", "t3"] {
            app.create_tenant(t, "acme-corp").await;
        }
        // Three attempts each, all refused.
        until(Duration::from_secs(20), || async {
            let d = deliveries(&app, &hook).await;
            let ok = d.len() == 3
                && d.iter()
                    .all(|x| x["attempts"].as_array().unwrap().len() >= 3);
            if ok {
                Ok(())
            } else {
                anyhow::bail!("not yet: {d:?}")
            }
        })
        .await
        .unwrap();
        let w = webhook(&app, &hook).await;
        assert!(w["failing_since"].is_string(), "{w}");
        for d in deliveries(&app, &hook).await {
            let a = d["attempts"].as_array().unwrap();
            let t = |i: usize| {
                chrono::DateTime::parse_from_rfc3339(a[i]["started_at"].as_str().unwrap()).unwrap()
            };
            for x in a {
                assert_eq!(x["outcome"], "failed", "{x}");
                assert!(x["status"].is_null());
                assert!(x["error"].is_string());
                assert!(x["next_attempt_at"].is_string());
            }
            // Backoff: 0.3 s then 0.6 s (±10 %).
            let g1 = (t(1) - t(0)).num_milliseconds();
            let g2 = (t(2) - t(1)).num_milliseconds();
            assert!(g1 >= 270, "first retry after {g1} ms");
            assert!(
                g2 >= 540 && g2 > g1,
                "second retry after {g2} ms (first {g1})"
            );
        }
        // Up again: everything arrives.
        let rx = Receiver::start(port, Arc::new(|_, _| reply(200))).await;
        let got = until_received(&rx, Duration::from_secs(20), "three events", |g| {
            distinct_ids(g).len() == 3
        })
        .await;
        assert!(got.iter().all(|r| verifies(&secret, r)));
        let subjects: std::collections::BTreeSet<String> = got
            .iter()
            .map(|r| r.event()["subject"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            subjects.into_iter().collect::<Vec<_>>(),
            ["tenant/t1", "tenant/t2", "tenant/t3"]
        );
        until(Duration::from_secs(10), || async {
            let d = deliveries(&app, &hook).await;
            if d.iter().all(|x| x["state"] == "succeeded") {
                Ok(())
            } else {
                anyhow::bail!("{d:?}")
            }
        })
        .await
        .unwrap();
        // Recovered: the mark is gone and the event says since when it failed.
        let w = webhook(&app, &hook).await;
        assert!(w.get("failing_since").is_none(), "{w}");
        let rec = events(&app, &format!("subject=webhook/{hook}")).await;
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert_eq!(rec[0]["type"], "dev.cellplane.webhook.recovered.v1");
        assert_eq!(rec[0]["data"]["reenabled"], false);
        assert!(rec[0]["data"]["failing_since"].is_string());
        drop(rx.stop());
    }
);

both_backends!(
    gone_disables_retry_after_is_honoured_and_a_late_answer_is_a_failure,
    |b| async move {
        let app = TestApp::spawn_with(b, options()).await;
        // 410: disabled at once, with an event; nothing more is sent.
        let gone = Receiver::start(0, Arc::new(|_, _| reply(410))).await;
        let (gone_hook, _) = subscribe(
            &app,
            &app.admin,
            json!({"url": gone.url(), "events": ["dev.cellplane.organization.created.v1"]}),
        )
        .await;
        // 429 with Retry-After: 2 on the first request, then 200.
        let throttled = Receiver::start(
            0,
            Arc::new(|n, _| {
                if n == 0 {
                    Reply {
                        status: 429,
                        headers: vec![("retry-after".into(), "2".into())],
                        delay: Duration::ZERO,
                    }
                } else {
                    reply(200)
                }
            }),
        )
        .await;
        let (throttled_hook, _) = subscribe(
            &app,
            &app.admin,
            json!({"url": throttled.url(), "events": ["dev.cellplane.organization.created.v1"]}),
        )
        .await;
        // A 200 that takes 20 s (over the 15 s timeout), then prompt answers.
        let slow = Receiver::start(
            0,
            Arc::new(|n, _| Reply {
                status: 200,
                headers: Vec::new(),
                delay: if n == 0 {
                    Duration::from_secs(20)
                } else {
                    Duration::ZERO
                },
            }),
        )
        .await;
        let (slow_hook, _) = subscribe(
            &app,
            &app.admin,
            json!({"url": slow.url(), "events": ["dev.cellplane.organization.created.v1"]}),
        )
        .await;
        // An observer of webhook events.
        let watch = Receiver::start(0, Arc::new(|_, _| reply(200))).await;
        subscribe(
            &app,
            &app.admin,
            json!({"url": watch.url(), "events": ["dev.cellplane.webhook.disabled.v1"]}),
        )
        .await;

        app.create_org("acme-corp").await;

        let disabled = until_received(&watch, Duration::from_secs(20), "disabled", |g| {
            !g.is_empty()
        })
        .await;
        let e = disabled[0].event();
        assert_eq!(e["subject"], format!("webhook/{gone_hook}"));
        assert_eq!(e["data"]["reason"], "gone");
        let w = webhook(&app, &gone_hook).await;
        assert_eq!(w["state"], "disabled");
        assert_eq!(w["disabled_reason"], "gone");
        app.create_org("other-corp").await;

        // Retry-After: the second attempt waited 2 s, not the schedule's 0.3 s.
        let got = until_received(&throttled, Duration::from_secs(20), "retried", |g| {
            g.iter().filter(|r| r.id() == g[0].id()).count() >= 2
        })
        .await;
        let first: Vec<&Received> = got.iter().filter(|r| r.id() == got[0].id()).collect();
        let gap = first[1].at - first[0].at;
        assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
        let d = deliveries(&app, &throttled_hook).await;
        let a = &d[0]["attempts"];
        assert_eq!(a[0]["outcome"], "throttled", "{d:?}");
        assert_eq!(a[0]["status"], 429);

        // The late 200 counts as a failure (timeout) and the event is sent again.
        until_received(&slow, Duration::from_secs(40), "retried", |g| {
            g.iter().filter(|r| r.id() == g[0].id()).count() >= 2
        })
        .await;
        until(Duration::from_secs(10), || async {
            let d = deliveries(&app, &slow_hook).await;
            let a = d[0]["attempts"].as_array().unwrap().clone();
            if d[0]["state"] == "succeeded" && a.len() == 2 {
                Ok(a)
            } else {
                anyhow::bail!("{d:?}")
            }
        })
        .await
        .map(|a| {
            assert_eq!(a[0]["outcome"], "timeout", "{a:?}");
            assert!(a[0]["latency_ms"].as_i64().unwrap() >= 14_000);
            assert_eq!(a[1]["outcome"], "delivered");
        })
        .unwrap();

        // The disabled subscription got its one request and nothing after.
        assert_eq!(gone.got().len(), 1, "requests after a 410");
        let d = deliveries(&app, &gone_hook).await;
        assert_eq!(
            d.len(),
            1,
            "no delivery is made for a disabled subscription"
        );
    }
);

both_backends!(
    failing_for_too_long_disables_and_a_probe_that_is_answered_reenables,
    |b| async move {
        let app = TestApp::spawn_with(
            b,
            options()
                .with("CELLPLANE__WEBHOOKS__DISABLE_AFTER_SECS", "1")
                .with("CELLPLANE__WEBHOOKS__PROBE_INTERVAL_SECS", "1"),
        )
        .await;
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = up.clone();
        let rx = Receiver::start(
            0,
            Arc::new(move |_, _| {
                reply(if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    200
                } else {
                    500
                })
            }),
        )
        .await;
        let (hook, _) = subscribe(
            &app,
            &app.admin,
            json!({"url": rx.url(), "events": ["dev.cellplane.organization.created.v1"]}),
        )
        .await;
        app.create_org("acme-corp").await;
        until(Duration::from_secs(20), || async {
            let w = webhook(&app, &hook).await;
            if w["state"] == "disabled" {
                Ok(())
            } else {
                anyhow::bail!("{w}")
            }
        })
        .await
        .unwrap();
        let w = webhook(&app, &hook).await;
        assert_eq!(w["disabled_reason"], "failing");
        let ev = events(&app, &format!("subject=webhook/{hook}")).await;
        assert_eq!(ev[0]["type"], "dev.cellplane.webhook.disabled.v1");
        assert_eq!(ev[0]["data"]["reason"], "failing");
        // Answering again: a probe re-enables it, and the pending delivery goes out.
        up.store(true, std::sync::atomic::Ordering::SeqCst);
        until(Duration::from_secs(20), || async {
            let d = deliveries(&app, &hook).await;
            if d[0]["state"] == "succeeded" {
                Ok(())
            } else {
                anyhow::bail!("{d:?}")
            }
        })
        .await
        .unwrap();
        let w = webhook(&app, &hook).await;
        assert_eq!(w["state"], "enabled", "{w}");
        let ev = events(&app, &format!("subject=webhook/{hook}")).await;
        let types: Vec<&str> = ev.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "dev.cellplane.webhook.disabled.v1",
                "dev.cellplane.webhook.recovered.v1"
            ]
        );
        assert_eq!(ev[1]["data"]["reenabled"], true);
        let probes = rx
            .got()
            .iter()
            .filter(|r| r.event()["type"] == "dev.cellplane.webhook.ping.v1")
            .count();
        assert!(probes >= 1);
    }
);

both_backends!(
    per_subject_order_holds_while_one_subject_fails_and_redeliver_starts_over,
    |b| async move {
        let app = TestApp::spawn_with(
            b,
            options().with("CELLPLANE__WEBHOOKS__RETRY_SCHEDULE_MS", "0,200"),
        )
        .await;
        app.create_org("acme-corp").await;
        // Fails every request about t1 until told otherwise; answers the rest.
        let t1_ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let got: Arc<Mutex<Vec<Received>>> = Arc::new(Mutex::new(Vec::new()));
        let flag = t1_ok.clone();
        let rx = Receiver::start_into(
            0,
            Arc::new(move |_, r: &Received| {
                let about_t1 = r.event()["subject"] == "tenant/t1";
                reply(
                    if about_t1 && !flag.load(std::sync::atomic::Ordering::SeqCst) {
                        500
                    } else {
                        200
                    },
                )
            }),
            got.clone(),
        )
        .await;
        let (hook, _) = subscribe(
            &app,
            &app.admin,
            json!({"url": rx.url(), "ordering": "per-subject",
                   "events": ["dev.cellplane.tenancy.created.v1", "dev.cellplane.tenancy.updated.v1"]}),
        )
        .await;
        for t in ["t1", "t2"] {
            app.create_tenant(t, "acme-corp").await;
        }
        for (t, v) in [("t1", 1), ("t2", 1), ("t2", 2)] {
            let r = app
                .req(Method::PATCH, &format!("/v1/tenants/{t}"))
                .header("If-Match", format!("\"{v}\""))
                .json(&json!({"billing": {"plan": format!("p{v}")}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
        // t2's three events (created, two updates) arrive in order; t1's first fails twice
        // and is given up, and its update waited for it.
        let delivered = |g: &[Received], subject: &str| -> Vec<String> {
            distinct_ids(
                &g.iter()
                    .filter(|r| r.event()["subject"] == subject)
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        };
        if tokio::time::timeout(
            Duration::from_secs(20),
            until_received(&rx, Duration::from_secs(20), "t2's events", |g| {
                delivered(g, "tenant/t2").len() == 3
            }),
        )
        .await
        .is_err()
        {
            panic!("t2's events did not arrive:\n{}", app.log());
        }
        let d = until(Duration::from_secs(20), || async {
            let d = deliveries(&app, &hook).await;
            if d.iter().all(|x| x["state"] != "pending") {
                Ok(d)
            } else {
                anyhow::bail!("{d:?}")
            }
        })
        .await
        .unwrap();
        let t1: Vec<&Value> = d.iter().filter(|x| x["subject"] == "tenant/t1").collect();
        assert_eq!(t1[0]["state"], "failed", "{t1:?}");
        assert_eq!(t1[0]["attempts"].as_array().unwrap().len(), 2);
        // The second t1 event was attempted only after the first was given up.
        let first_done = t1[0]["attempts"][1]["started_at"]
            .as_str()
            .unwrap()
            .to_string();
        let second_start = t1[1]["attempts"][0]["started_at"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            second_start > first_done,
            "{second_start} before {first_done}"
        );
        // Every request about a subject came in seq order.
        for subject in ["tenant/t1", "tenant/t2"] {
            let seqs: Vec<i64> = rx
                .got()
                .iter()
                .map(|r| r.event())
                .filter(|e| e["subject"] == subject)
                .map(|e| e["seq"].as_i64().unwrap())
                .collect();
            assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{subject}: {seqs:?}");
        }
        // Redeliver the given-up one: a new schedule, the same webhook-id.
        t1_ok.store(true, std::sync::atomic::Ordering::SeqCst);
        let id = t1[0]["delivery_id"].as_str().unwrap();
        let r = app
            .req(
                Method::POST,
                &format!("/v1/webhooks/{hook}/deliveries/{id}/redeliver"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let event_id = t1[0]["event_id"].as_str().unwrap().to_string();
        until_received(&rx, Duration::from_secs(20), "redelivered", |g| {
            g.iter().filter(|r| r.id() == event_id).count() == 3
        })
        .await;
        let missing = app
            .req(
                Method::POST,
                &format!("/v1/webhooks/{hook}/deliveries/dlv-nope/redeliver"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
    }
);

// SIGKILL after the event committed and was fanned out, before anything was sent; and
// after the destination answered, before the attempt was recorded. Nothing is lost; the
// second case sends one event twice, with the same webhook-id.
both_backends!(
    sigkill_before_and_during_delivery_loses_no_event,
    |b| async move {
        for (point, dup) in [("send", false), ("sent", true)] {
            let mut app = TestApp::spawn_with(
                b,
                options().with(
                    "CELLPLANE__JOBS__FAILPOINTS",
                    &format!("controller.webhooks/{point}=kill@1"),
                ),
            )
            .await;
            let rx = Receiver::start(0, Arc::new(|_, _| reply(200))).await;
            let (hook, secret) = subscribe(
                &app,
                &app.admin,
                json!({"url": rx.url(), "events": ["dev.cellplane.tenancy.created.v1"]}),
            )
            .await;
            app.create_org("acme-corp").await;
            let r = app
                .req(Method::POST, "/v1/tenants")
                .json(&json!({"tenant_id": "t1", "organization_id": "acme-corp",
                              "profile": "mt-standard", "region": "eu-west-1"}))
                .send()
                .await;
            assert!(r.is_ok_and(|r| r.status() == 201), "{point}");
            assert!(
                app.wait_exit(Duration::from_secs(20)).await,
                "{point}: the failpoint did not kill the control plane"
            );
            match point {
                "send" => assert!(rx.got().is_empty(), "sent before the failpoint"),
                _ => assert_eq!(rx.got().len(), 1),
            }
            app.start().await.unwrap();
            for t in ["t2", "t3"] {
                app.create_tenant(t, "acme-corp").await;
            }
            let got = until_received(&rx, Duration::from_secs(30), point, |g| {
                distinct_ids(g).len() == 3
            })
            .await;
            drop(got);
            settled(&app, &hook, 3).await;
            let got = rx.got();
            assert!(got.iter().all(|r| verifies(&secret, r)));
            let dups = got.len() - distinct_ids(&got).len();
            assert_eq!(dups, usize::from(dup), "{point}: {} requests", got.len());
            let d = deliveries(&app, &hook).await;
            assert_eq!(d.len(), 3);
            assert!(d.iter().all(|x| x["state"] == "succeeded"), "{d:?}");
        }
    }
);
