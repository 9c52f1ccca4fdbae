//! The router binary on its own (no control plane): it serves from its state file, answers
//! for itself with problem documents (404 unknown or missing tenant, 400 bad environment,
//! 502 unreachable cell), keeps the admin endpoints off the tenant listener, and on
//! SIGTERM drains and exits cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Router {
    child: Child,
    url: String,
    admin: String,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn spawn(state: &std::path::Path) -> Router {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellplane-router"))
        .args([
            "--control-plane",
            &format!("http://127.0.0.1:{}", dead_port()),
        ])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--state-file")
        .arg(state)
        .args([
            "--base-domain",
            "example.test",
            "--upstream-timeout-ms",
            "2000",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn router");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines.next().unwrap().unwrap();
    let admin = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    Router {
        child,
        url: url.strip_prefix("listening on ").unwrap().to_string(),
        admin: admin
            .strip_prefix("admin listening on ")
            .unwrap()
            .to_string(),
    }
}

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
    let mut r = spawn(&state);
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
    let h: serde_json::Value = http
        .get(format!("{}/__router/healthz", r.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["revision"], 3);
    assert_eq!(h["source"], "state-file");
    let m = http
        .get(format!("{}/__router/metrics", r.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
    let again = spawn(&state);
    let h: serde_json::Value = http
        .get(format!("{}/__router/healthz", again.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["routes"], 1);
}

fn nix_kill(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}
