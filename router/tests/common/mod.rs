//! What the binary-level tests share: the router binary started from a state file (no
//! control plane), and the state files and sockets of hand-written cells.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub struct Router {
    pub child: Child,
    /// `http://127.0.0.1:PORT` of the tenant listener.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
}

impl Router {
    /// `127.0.0.1:PORT` of the tenant listener.
    pub fn addr(&self) -> &str {
        self.url.strip_prefix("http://").unwrap()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on (bound, then freed).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The router binary on free ports with `--base-domain example.test`, a 2 s upstream
/// timeout, an unreachable control plane and `state` as its state file; `extra` flags last.
pub fn command(state: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellplane-router"));
    cmd.args([
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
    .args(extra)
    .env("RUST_LOG", "warn");
    cmd
}

/// Starts [`command`] with its logs thrown away.
pub fn spawn(state: &std::path::Path, extra: &[&str]) -> Router {
    start(command(state, extra).stderr(Stdio::null()))
}

/// Starts the router `cmd` and reads the addresses it announces on stdout.
pub fn start(cmd: &mut Command) -> Router {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn router");
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

/// A state file with one route, `acme`/`prod` → cell `c-1` on `127.0.0.1:port`.
pub fn write_state(path: &std::path::Path, port: u16) {
    std::fs::write(
        path,
        format!(
            r#"{{"revision":1,"full":true,"upserts":[
            {{"tenant_id":"acme","env":"prod","cell_id":"c-1","endpoint":"http://127.0.0.1:{port}","mode":"serve"}}],
            "removals":[]}}"#
        ),
    )
    .unwrap();
}

/// A state file with the given `(tenant, env, port)` routes, all served; the cell on port
/// `p` is `c-p`.
pub fn write_routes(path: &std::path::Path, routes: &[(&str, &str, u16)]) {
    let upserts: Vec<_> = routes
        .iter()
        .map(|(tenant, env, port)| {
            serde_json::json!({
                "tenant_id": tenant,
                "env": env,
                "cell_id": format!("c-{port}"),
                "endpoint": format!("http://127.0.0.1:{port}"),
                "mode": "serve",
            })
        })
        .collect();
    let doc = serde_json::json!({"revision": 1, "full": true, "upserts": upserts, "removals": []});
    std::fs::write(path, serde_json::to_vec(&doc).unwrap()).unwrap();
}

/// A temp dir with the router's state-file path, and a listener on a free port for a cell.
pub fn cell_socket() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::net::TcpListener,
    u16,
) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (dir, state, listener, port)
}
