//! The router binary on its own (no control plane): it serves from its state file, answers
//! for itself with problem documents (404 unknown or missing tenant, 400 bad environment,
//! 502 unreachable cell, 503 for a cell failing its health checks), keeps the admin
//! endpoints off the tenant listener, and on SIGTERM drains and exits cleanly.

mod common;

use common::{cell_socket, dead_port, spawn, write_state};
use std::process::Command;
use std::time::Duration;

async fn problem(r: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["status"], status);
    v
}

#[tokio::test]
async fn own_answers_are_problems_and_shutdown_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let dead = dead_port();
    std::fs::write(
        &state,
        format!(
            r#"{{"revision":3,"full":true,"upserts":[
            {{"tenant_id":"acme","env":"prod","cell_id":"gone","endpoint":"http://127.0.0.1:{dead}","mode":"serve"}}],
            "removals":[]}}"#
        ),
    )
    .unwrap();
    // Probing off: the dead cell is only found by forwarding to it.
    let mut r = spawn(&state, &["--health-interval-ms", "0"]);
    let http = reqwest::Client::new();
    let get = |host: &str, path: &str| {
        http.get(format!("{}{path}", r.url))
            .header("host", host)
            .send()
    };
    let p = problem(get("acme.example.test", "/x").await.unwrap(), 502).await;
    assert_eq!(p["type"], "https://cellplane.dev/problems/cell-unreachable");
    assert!(p["correlation_id"].as_str().unwrap().starts_with("rt-"));
    problem(get("other.example.test", "/x").await.unwrap(), 404).await;
    problem(get("example.test", "/x").await.unwrap(), 404).await;
    problem(get("Not_A_Tenant.example.test", "/x").await.unwrap(), 400).await;
    let r2 = http
        .get(format!("{}/x", r.url))
        .header("host", "acme.example.test")
        .header("x-tenant-env", "no good")
        .send()
        .await
        .unwrap();
    problem(r2, 400).await;
    // Admin routes live only on the admin listener.
    problem(
        get("acme.example.test", "/__router/healthz").await.unwrap(),
        502,
    )
    .await;
    let h = health(&http, &r.admin).await;
    assert_eq!(h["revision"], 3);
    assert_eq!(h["source"], "state-file");
    let m = metrics(&http, &r.admin).await;
    assert!(
        m.contains("cellplane_router_own_responses_total{reason=\"upstream_error\"} 2"),
        "{m}"
    );
    assert!(m.contains("cellplane_router_routes 1"));
    // SIGTERM: a clean exit, the state file still there and loadable.
    nix_kill(r.child.id());
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = r.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(status.expect("exited after SIGTERM").success());
    let again = spawn(&state, &[]);
    let h = health(&http, &again.admin).await;
    assert_eq!(h["routes"], 1);
}

fn nix_kill(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

/// A cell stand-in on `listener`: answers every request `200 ok` and closes.
fn serve_ok(listener: std::net::TcpListener) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\nx-cell-id: c-1\r\n\r\nok",
            );
        }
    });
}

async fn metrics(http: &reqwest::Client, admin: &str) -> String {
    http.get(format!("{admin}/__router/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn health(http: &reqwest::Client, admin: &str) -> serde_json::Value {
    http.get(format!("{admin}/__router/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_until<F: Fn(&serde_json::Value) -> bool>(
    http: &reqwest::Client,
    admin: &str,
    f: F,
) -> serde_json::Value {
    for _ in 0..100 {
        let h = health(http, admin).await;
        if f(&h) {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("router health never matched: {}", health(http, admin).await);
}

// Cell health is part of the table: a cell whose /healthz does not answer is marked down
// by the prober and its tenants get 503 cell-unavailable with Retry-After at once (not a
// connect error per request); when the cell answers again it is served again.
#[tokio::test]
async fn a_cell_failing_health_checks_is_refused_until_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    // Reserve a port, then free it: the cell is down from the start.
    let port = dead_port();
    write_state(&state, port);
    let r = spawn(
        &state,
        &[
            "--health-interval-ms",
            "100",
            "--health-timeout-ms",
            "200",
            "--health-fails",
            "2",
        ],
    );
    let http = reqwest::Client::new();
    let h = wait_until(&http, &r.admin, |h| {
        h["cells_down"] == serde_json::json!(["c-1"])
    })
    .await;
    assert_eq!(h["cells"], 1);
    let resp = http
        .get(format!("{}/x", r.url))
        .header("host", "acme.example.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["retry-after"], "1");
    let p = problem(resp, 503).await;
    assert_eq!(p["type"], "https://cellplane.dev/problems/cell-unavailable");
    assert!(p["detail"].as_str().unwrap().contains("c-1"), "{p}");
    let m = metrics(&http, &r.admin).await;
    assert!(
        m.contains("cellplane_router_cell_up{cell=\"c-1\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("cellplane_router_own_responses_total{reason=\"cell_down\"} 1"),
        "{m}"
    );
    // The cell comes up on its port: the next good probe brings it back.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("rebind the cell port");
    serve_ok(listener);
    wait_until(&http, &r.admin, |h| {
        h["cells_down"] == serde_json::json!([])
    })
    .await;
    let resp = http
        .get(format!("{}/x", r.url))
        .header("host", "acme.example.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cell-id"], "c-1");
    assert_eq!(resp.text().await.unwrap(), "ok");
}

/// A cell stand-in that keeps a connection open for `per_conn` requests answered `200 ok`
/// with the trusted headers it received echoed back, then closes it; counts connections.
fn serve_keep_alive(
    listener: std::net::TcpListener,
    per_conn: usize,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::{Read, Write};
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = conns.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                for _ in 0..per_conn {
                    let head = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                            buf.drain(..i + 4);
                            break head;
                        }
                        let mut chunk = [0u8; 4096];
                        match c.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let echo = |name: &str| {
                        head.lines()
                            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
                            .collect::<Vec<_>>()
                            .join("|")
                    };
                    let body = format!(
                        "{};{};{};{}",
                        echo("x-tenant-id"),
                        echo("x-tenant-env"),
                        echo("connection"),
                        echo("x-secret")
                    );
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\nx-hop: 1\r\n\r\n{body}",
                        body.len()
                    );
                    if c.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
                // Closes the connection (the router may hold it idle in its pool).
            });
        }
    });
    conns
}

// Cell connections are kept alive and reused; one the cell closes while it sits idle in
// the pool is noticed and replaced, not answered 502. Trusted and hop-by-hop headers from
// the client never reach the cell, and hop-by-hop headers of the cell never reach the client.
#[tokio::test]
async fn cell_connections_are_reused_and_replaced_when_the_cell_closes_them() {
    let (_dir, state, listener, port) = cell_socket();
    let conns = serve_keep_alive(listener, 3);
    write_state(&state, port);
    let r = spawn(&state, &["--workers", "1", "--health-interval-ms", "0"]);
    let http = reqwest::Client::new();
    for i in 0..7 {
        let resp = http
            .get(format!("{}/x", r.url))
            .header("host", "acme.example.test")
            .header("x-tenant-id", "globex")
            .header("connection", "x-secret")
            .header("x-secret", "s")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert!(resp.headers().get("keep-alive").is_none());
        assert!(resp.headers().get("connection").is_none());
        assert!(resp.headers().get("x-correlation-id").is_some());
        assert_eq!(resp.text().await.unwrap(), "acme;prod;;", "request {i}");
        // Give the cell time to close after its third answer, and the router to see it.
        tokio::time::sleep(Duration::from_millis(if i % 3 == 2 { 300 } else { 10 })).await;
    }
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
}

// A cell that takes the request and never answers gets 504 cell-timeout once the upstream
// timeout (2 s here) has passed, and a later request is bounded the same way.
#[tokio::test]
async fn a_cell_that_never_answers_times_out() {
    let (_dir, state, listener, port) = cell_socket();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(c) = conn else { return };
            held.push(c);
        }
    });
    write_state(&state, port);
    let r = spawn(&state, &["--workers", "1", "--health-interval-ms", "0"]);
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let t0 = std::time::Instant::now();
        let resp = http
            .get(format!("{}/x", r.url))
            .header("host", "acme.example.test")
            .send()
            .await
            .unwrap();
        let took = t0.elapsed();
        let p = problem(resp, 504).await;
        assert_eq!(p["type"], "https://cellplane.dev/problems/cell-timeout");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
            "{took:?}"
        );
    }
}

/// Runs the router binary with `args` under `script` (util-linux), which gives it a
/// terminal, and returns what it wrote there; `None` where `script` is not installed.
fn on_a_terminal(args: &[&str], no_color: Option<&str>) -> Option<String> {
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let line = std::iter::once(env!("CARGO_BIN_EXE_cellplane-router"))
        .chain(args.iter().copied())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .env("RUST_LOG", "info");
    match no_color {
        Some(v) => cmd.env("NO_COLOR", v),
        None => cmd.env_remove("NO_COLOR"),
    };
    match cmd.output() {
        Ok(out) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("run script: {e}"),
    }
}

// Logs piped to a file or a collector are plain text: no colour escape codes from a whole
// run (start, serving, SIGTERM, stop), NO_COLOR or not. On a terminal they are coloured,
// except when NO_COLOR is set and not empty (https://no-color.org).
#[test]
fn logs_are_coloured_only_on_a_terminal_without_no_color() {
    use std::io::{Read, Write};
    let (_dir, state, _listener, port) = cell_socket();
    write_state(&state, port);
    let mut cmd = common::command(&state, &["--workers", "1", "--health-interval-ms", "0"]);
    cmd.env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(std::process::Stdio::piped());
    let mut r = common::start(&mut cmd);
    let mut stderr = r.child.stderr.take().unwrap();
    // Serving (the admin listener answers) before SIGTERM, so the signal is handled.
    let admin = r.admin.strip_prefix("http://").unwrap().to_string();
    let mut answer = String::new();
    let mut c = std::net::TcpStream::connect(&admin).unwrap();
    c.write_all(b"GET /__router/healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    c.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    nix_kill(r.child.id());
    let status = r.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut logs = String::new();
    stderr.read_to_string(&mut logs).unwrap();
    for line in [
        "router listening",
        "shutdown signal received",
        "router stopped",
    ] {
        assert!(logs.contains(line), "{line:?} not in {logs:?}");
    }
    assert!(!logs.contains("\x1b["), "colour in piped logs: {logs:?}");

    // An invalid --router-id: the router logs "startup failed" and exits 1 at once.
    let args = [
        "--control-plane",
        "http://127.0.0.1:9",
        "--state-file",
        state.to_str().unwrap(),
        "--router-id",
        "Bad_Id",
    ];
    let Some(coloured) = on_a_terminal(&args, None) else {
        eprintln!("skipping the terminal half: `script` is not installed");
        return;
    };
    assert!(coloured.contains("startup failed"), "{coloured:?}");
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal: {coloured:?}"
    );
    for no_color in ["1", "true"] {
        let plain = on_a_terminal(&args, Some(no_color)).expect("script ran before");
        assert!(plain.contains("startup failed"), "{plain:?}");
        assert!(!plain.contains("\x1b["), "NO_COLOR={no_color}: {plain:?}");
    }
}
