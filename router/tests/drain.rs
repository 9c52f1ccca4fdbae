//! The router against a stand-in control plane (a hand-written HTTP server that serves
//! `GET /v1/routes` long polls and records heartbeats): a route held while a request of
//! its tenant environment is in flight to the cell is acked applied at once but drained
//! only when that request ends (and promptly, not at the next periodic heartbeat); a held
//! route with nothing in flight is drained at once; after a gap longer than the router
//! lease, served routes wait until the table was fetched again.

use cellplane_router::startup::Application;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Cp {
    revision: i64,
    routes: Vec<Value>,
    heartbeats: Vec<Value>,
    /// `(since, wait)` of every watch request, in arrival order.
    fetches: Vec<(i64, u64)>,
    /// Watch requests are not answered while closed (the control plane "hangs").
    gate_closed: bool,
}

/// The stand-in control plane.
struct FakeCp {
    url: String,
    state: Mutex<Cp>,
    changed: Condvar,
}

fn route(tenant: &str, port: u16, mode: &str) -> Value {
    json!({"tenant_id": tenant, "env": "prod", "cell_id": format!("c-{port}"),
        "endpoint": format!("http://127.0.0.1:{port}"), "mode": mode})
}

impl FakeCp {
    fn start(routes: Vec<Value>) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cp = Arc::new(FakeCp {
            url: format!("http://{}", listener.local_addr().unwrap()),
            state: Mutex::new(Cp {
                revision: 1,
                routes,
                ..Default::default()
            }),
            changed: Condvar::new(),
        });
        let me = cp.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let me = me.clone();
                std::thread::spawn(move || me.serve(conn));
            }
        });
        cp
    }

    fn serve(&self, conn: TcpStream) {
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let mut start = String::new();
        if r.read_line(&mut start).is_err() {
            return;
        }
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let target = start.split(' ').nth(1).unwrap_or("").to_string();
        let answer = if let Some(q) = target.strip_prefix("/v1/routes?") {
            let arg = |name: &str| -> i64 {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(name))
                    .and_then(|v| v.strip_prefix('='))
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            self.routes(arg("since"), arg("wait") as u64)
        } else if target.ends_with("/heartbeat") {
            let hb: Value = serde_json::from_slice(&body).unwrap();
            self.state.lock().unwrap().heartbeats.push(hb);
            self.changed.notify_all();
            json!({})
        } else {
            json!({})
        };
        let body = answer.to_string();
        let mut w = conn;
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    /// A long poll: the full table once it is newer than `since`, else an empty change
    /// set after `wait` seconds.
    fn routes(&self, since: i64, wait: u64) -> Value {
        let mut s = self.state.lock().unwrap();
        s.fetches.push((since, wait));
        self.changed.notify_all();
        let until = Instant::now() + Duration::from_secs(wait);
        while s.gate_closed || (s.revision == since && Instant::now() < until) {
            let left = until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(if s.gate_closed { 50 } else { 0 }));
            s = self.changed.wait_timeout(s, left).unwrap().0;
        }
        if s.revision == since {
            json!({"revision": since, "full": false, "upserts": [], "removals": []})
        } else {
            json!({"revision": s.revision, "full": true, "upserts": s.routes, "removals": []})
        }
    }

    /// Publishes a new revision with `routes`.
    fn publish(&self, routes: Vec<Value>) -> i64 {
        let mut s = self.state.lock().unwrap();
        s.revision += 1;
        s.routes = routes;
        self.changed.notify_all();
        s.revision
    }

    fn set_gate(&self, closed: bool) {
        self.state.lock().unwrap().gate_closed = closed;
        self.changed.notify_all();
    }

    /// Waits (blocking) until `f` holds for the recorded state; panics after 10 s.
    fn wait_for<T>(&self, what: &str, f: impl Fn(&Cp) -> Option<T>) -> T {
        let until = Instant::now() + Duration::from_secs(10);
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(t) = f(&s) {
                return t;
            }
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            s = self.changed.wait_timeout(s, left).unwrap().0;
        }
    }

    /// The first heartbeat after the `skip` first ones that satisfies `f`.
    fn heartbeat(&self, skip: usize, f: impl Fn(&Value) -> bool) -> (usize, Value) {
        self.wait_for("a heartbeat", |s| {
            s.heartbeats
                .iter()
                .enumerate()
                .skip(skip)
                .find(|(_, h)| f(h))
                .map(|(i, h)| (i, h.clone()))
        })
    }
}

/// A cell stand-in: each request is reported on `arrived`, then answered `200 ok` once
/// the test sends on the returned channel (one release per request).
fn blocking_cell() -> (u16, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (arrived_tx, arrived) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = arrived_tx.send(());
            if release_rx.recv().is_err() {
                return;
            }
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (port, arrived, release)
}

/// A cell stand-in that answers every request `200 ok` at once.
fn ok_cell() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    port
}

struct Running {
    url: String,
    state: Arc<cellplane_router::proxy::RouterState>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// The router in this process, watching `cp`, with heartbeats every minute (so a prompt
/// ack can only come from a swap or a drain) and `extra` flags.
async fn router(cp: &FakeCp, extra: &[&str]) -> Running {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let mut args = vec![
        "cellplane-router".to_string(),
        "--control-plane".into(),
        cp.url.clone(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--state-file".into(),
        state_file.display().to_string(),
        "--base-domain".into(),
        "example.test".into(),
        "--router-id".into(),
        "rtest".into(),
        "--no-usage".into(),
        "--workers".into(),
        "2".into(),
        "--health-interval-ms".into(),
        "0".into(),
        "--heartbeat-secs".into(),
        "60".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let cfg = cellplane_router::config::Config::try_parse_from(args).unwrap();
    let app = Application::build(cfg).await.unwrap();
    let url = format!("http://{}", app.addr());
    let state = app.state();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    Running {
        url,
        state,
        stop,
        task,
        _dir: dir,
    }
}

fn get(url: &str, tenant: &str) -> tokio::task::JoinHandle<u16> {
    let (url, host) = (url.to_string(), format!("{tenant}.example.test"));
    tokio::spawn(async move {
        reqwest::Client::new()
            .get(format!("{url}/x"))
            .header("host", host)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

/// Runs a blocking wait off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn drained(h: &Value) -> i64 {
    h["drained_revision"].as_i64().expect("drained_revision")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_is_drained_only_once_the_request_in_flight_to_the_old_cell_ends() {
    let (port, arrived, release) = blocking_cell();
    let other = ok_cell();
    let cp = FakeCp::start(vec![
        route("acme", port, "serve"),
        route("globex", other, "serve"),
    ]);
    let r = router(&cp, &[]).await;
    let c = cp.clone();
    let (n, hb) = blocking(move || c.heartbeat(0, |h| h["applied_revision"] == 1)).await;
    assert_eq!(drained(&hb), 1, "{hb}");

    // A request of acme/prod is in flight to the cell (the cell holds it).
    let req = get(&r.url, "acme");
    blocking(move || arrived.recv().unwrap()).await;
    let rev = cp.publish(vec![
        route("acme", port, "hold"),
        route("globex", other, "serve"),
    ]);
    assert_eq!(rev, 2);
    let c = cp.clone();
    let (n2, hb) = blocking(move || c.heartbeat(n + 1, |h| h["applied_revision"] == 2)).await;
    assert_eq!(drained(&hb), 1, "applied at once, not drained yet: {hb}");
    assert_eq!(
        hb.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["applied_revision", "cells", "drained_revision", "stats"]
    );
    // Each cell's counters since the router started (release gates' built-in metrics).
    let cells = hb["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2, "{hb}");
    for c in cells {
        assert_eq!(c["codes"].as_array().unwrap().len(), 5, "{c}");
        assert_eq!(
            c["buckets"].as_array().unwrap().len(),
            c["le"].as_array().unwrap().len() + 1,
            "{c}"
        );
    }
    let snap = r.state.table.load_full();
    let rt = snap.tenant("acme").unwrap().runtime.get().unwrap().clone();
    assert_eq!(rt.in_flight_of("prod"), 1);
    assert!(!req.is_finished());

    let c = cp.clone();
    let early = blocking(move || {
        let s = c.state.lock().unwrap();
        s.heartbeats.iter().filter(|h| drained(h) >= 2).count()
    })
    .await;
    assert_eq!(
        early, 0,
        "nothing says drained while the request is in flight"
    );

    // The cell answers: the drained ack follows at once (heartbeats are a minute apart
    // and `heartbeat` gives up after 10 s).
    release.send(()).unwrap();
    let c = cp.clone();
    let (_, hb) = blocking(move || c.heartbeat(n2 + 1, |h| drained(h) == 2)).await;
    assert_eq!(hb["applied_revision"], 2);
    assert_eq!(req.await.unwrap(), 200);
    assert_eq!(rt.in_flight_of("prod"), 0);

    // A hold with nothing in flight (globex only had finished requests) is drained with
    // the first ack of its revision; acme's hold stays, drained as well.
    assert_eq!(get(&r.url, "globex").await.unwrap(), 200);
    let rev = cp.publish(vec![
        route("acme", port, "hold"),
        route("globex", other, "hold"),
    ]);
    let c = cp.clone();
    let (_, hb) = blocking(move || c.heartbeat(0, |h| h["applied_revision"] == rev)).await;
    assert_eq!(drained(&hb), rev, "{hb}");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_gap_longer_than_the_lease_served_routes_wait_for_a_fresh_fetch() {
    let port = ok_cell();
    let cp = FakeCp::start(vec![route("acme", port, "serve")]);
    let r = router(
        &cp,
        &["--router-lease-secs", "1", "--hold-timeout-ms", "20000"],
    )
    .await;
    let c = cp.clone();
    blocking(move || c.heartbeat(0, |h| h["applied_revision"] == 1)).await;
    assert_eq!(get(&r.url, "acme").await.unwrap(), 200);
    // The control plane stops answering watches; then the router "was stopped" for 5 s.
    cp.set_gate(true);
    let c = cp.clone();
    let fetches = blocking(move || c.state.lock().unwrap().fetches.len()).await;
    r.state.fence.set_alive_ago(5000);
    let req = get(&r.url, "acme");
    // The watch was woken for an immediate fetch (wait=0), which hangs behind the gate...
    let c = cp.clone();
    blocking(move || {
        c.wait_for("a wait=0 fetch", |s| {
            s.fetches[fetches..].iter().any(|f| f.1 == 0).then_some(())
        })
    })
    .await;
    // ...and the request waits on the fence.
    let state = r.state.clone();
    blocking(move || {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let snap = state.table.load_full();
            let rt = snap.tenant("acme").unwrap().runtime.get().unwrap().clone();
            if rt.waiting.load(Ordering::SeqCst) == 1 {
                return;
            }
            assert!(Instant::now() < until, "the request never waited");
            std::thread::yield_now();
        }
    })
    .await;
    assert!(r.state.fence.resync_needed());
    assert!(!req.is_finished());
    // The fetch completes: the request goes through, the fence is down.
    cp.set_gate(false);
    assert_eq!(req.await.unwrap(), 200);
    assert!(!r.state.fence.resync_needed());
    assert_eq!(r.state.counters.stale_served.load(Ordering::SeqCst), 0);
    let snap = r.state.table.load_full();
    let rt = snap.tenant("acme").unwrap().runtime.get().unwrap().clone();
    assert_eq!(rt.held_requests.load(Ordering::SeqCst), 1);
    assert_eq!(get(&r.url, "acme").await.unwrap(), 200);
    r.shutdown().await;
}
