//! Shared harness for the end-to-end tests: spawns the real `cellplane` binary on port 0
//! with its own data directory and its own store (a temp SQLite file, or a fresh database
//! on the PostgreSQL server named by `CELLPLANE_TEST_PG_URL`), and helpers per endpoint.

use anyhow::{anyhow, bail, Context, Result};
use cellplane_api::Client;
use reqwest::Method;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs one async test body against both stores.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let f = $body;
                f($crate::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let f = $body;
                f($crate::Backend::Postgres).await;
            }
        }
    };
}

/// The superuser URL of the test PostgreSQL server; tests fail loudly without it.
pub fn pg_admin_url() -> String {
    std::env::var("CELLPLANE_TEST_PG_URL").unwrap_or_else(|_| {
        panic!(
            "CELLPLANE_TEST_PG_URL is not set: run the tests with ./scripts/test.sh, which starts \
             PostgreSQL, or point it at a superuser URL such as postgres://postgres@127.0.0.1:5432/postgres"
        )
    })
}

/// The URL of the moto server (AWS emulator) the AWS tests apply the `aws` template to;
/// tests that need it fail loudly without it.
pub fn moto_url() -> String {
    std::env::var("CELLPLANE_TEST_MOTO_URL").unwrap_or_else(|_| {
        panic!(
            "CELLPLANE_TEST_MOTO_URL is not set: run the tests with ./scripts/test.sh, which starts \
             a moto server, or start one (moto_server -H 127.0.0.1 -p 5000) and export \
             CELLPLANE_TEST_MOTO_URL=http://127.0.0.1:5000"
        )
    })
}

/// Options for a control plane that stamps `aws` cells against moto (fake credentials).
pub fn aws_options() -> AppOptions {
    AppOptions::default()
        .with("CELLPLANE__IAC__ENV__AWS_ACCESS_KEY_ID", "testing")
        .with("CELLPLANE__IAC__ENV__AWS_SECRET_ACCESS_KEY", "testing")
}

/// Creates a fresh database on the test server and returns its URL.
pub async fn fresh_pg_database() -> String {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let admin = pg_admin_url();
    let name = format!("cp_{}", random_suffix(12));
    let mut conn = sqlx::AnyConnection::connect(&admin)
        .await
        .expect("connect to CELLPLANE_TEST_PG_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let _ = conn.close().await;
    match admin.rfind('/') {
        Some(i) => format!("{}/{name}", &admin[..i]),
        None => panic!("CELLPLANE_TEST_PG_URL has no database part"),
    }
}

pub fn random_suffix(n: usize) -> String {
    use rand::Rng;
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = rand::thread_rng();
    (0..n).map(|_| A[r.gen_range(0..A.len())] as char).collect()
}

/// Path of a binary built next to the test executable (target/<profile>/NAME).
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("{}_BIN", name.to_uppercase().replace('-', "_"))) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir");
    dir.join(name)
}

/// Options for a spawned control plane.
#[derive(Debug, Clone)]
pub struct AppOptions {
    pub env: Vec<(String, String)>,
    /// The `cellplane` binary to run (default: `bin_path("cellplane")`).
    pub binary: Option<PathBuf>,
    /// The working directory of the control plane (default: the test's).
    pub current_dir: Option<PathBuf>,
}

/// The repository root (templates, scripts).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Cell ports for the next control plane: each one a range of its own (200 ports out of
/// the default 20000-29999), so cells stamped at once by the many control planes of a
/// parallel test run never draw the same port. One control plane's allocations are
/// checked in its store; two control planes know nothing of each other's.
/// In one test process (`cargo test`) the ranges go round in turn; a runner that starts a
/// process per test (`cargo nextest`) starts each process at a slot of its own pid, which
/// makes collisions between concurrent processes unlikely (not impossible).
fn next_port_range() -> (String, String) {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| std::sync::atomic::AtomicU32::new(std::process::id() % 50));
    let slot = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 50;
    let lo = 20_000 + slot * 200;
    (lo.to_string(), (lo + 199).to_string())
}

impl Default for AppOptions {
    fn default() -> Self {
        let (port_min, port_max) = next_port_range();
        Self {
            env: vec![
                ("CELLPLANE__IAC__PORT_MIN".into(), port_min),
                ("CELLPLANE__IAC__PORT_MAX".into(), port_max),
                (
                    "CELLPLANE__IAC__TEMPLATES_DIR".into(),
                    repo_root().join("cell-templates").display().to_string(),
                ),
                (
                    "CELLPLANE__IAC__SAMPLE_CELL_BIN".into(),
                    bin_path("sample-cell").display().to_string(),
                ),
                ("CELLPLANE__IAC__CANCEL_GRACE_SECS".into(), "3".into()),
                ("CELLPLANE__IAC__DRIFT_INTERVAL_SECS".into(), "0".into()),
                ("CELLPLANE__JOBS__POLL_MS".into(), "50".into()),
                ("CELLPLANE__JOBS__LEASE_SECS".into(), "10".into()),
                ("CELLPLANE__JOBS__BACKOFF_BASE_MS".into(), "100".into()),
                (
                    "CELLPLANE__RATE_LIMIT__AUTHORING_PER_SEC".into(),
                    "0".into(),
                ),
            ],
            binary: None,
            current_dir: None,
        }
    }
}

impl AppOptions {
    pub fn with(mut self, k: &str, v: &str) -> Self {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.into(), v.into()));
        self
    }

    /// Leaves `k` unset (unless the test process itself has it).
    pub fn without(mut self, k: &str) -> Self {
        self.env.retain(|(key, _)| key != k);
        self
    }
}

/// A running control plane. Killed on drop.
pub struct TestApp {
    pub backend: Backend,
    pub url: String,
    pub admin: Client,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub options: AppOptions,
    child: Option<Child>,
    _tmp: std::sync::Arc<tempfile::TempDir>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, AppOptions::default()).await
    }

    pub async fn spawn_with(backend: Backend, options: AppOptions) -> TestApp {
        let tmp = tempfile::tempdir().expect("tempdir");
        let database_url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_pg_database().await),
        };
        let data_dir = tmp.path().join("data");
        let mut app = TestApp {
            backend,
            url: String::new(),
            admin: Client::new("http://127.0.0.1:1", None),
            data_dir,
            database_url,
            options,
            child: None,
            _tmp: std::sync::Arc::new(tmp),
        };
        app.start().await.expect("control plane starts");
        app
    }

    /// A second control plane on the same PostgreSQL database (its own data directory and
    /// port), as a second replica of a deployment.
    pub async fn spawn_replica(&self, options: AppOptions) -> TestApp {
        assert!(
            self.database_url.is_some(),
            "replicas share a PostgreSQL store"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut app = TestApp {
            backend: self.backend,
            url: String::new(),
            admin: Client::new("http://127.0.0.1:1", None),
            data_dir: tmp.path().join("data"),
            database_url: self.database_url.clone(),
            options,
            child: None,
            _tmp: std::sync::Arc::new(tmp),
        };
        app.start().await.expect("replica starts");
        app
    }

    /// Starts (or restarts) the binary on the same data dir and store.
    pub async fn start(&mut self) -> Result<()> {
        self.start_at("127.0.0.1:0").await
    }

    /// Restarts on the address it had, as a control plane behind a fixed URL would.
    pub async fn start_same_address(&mut self) -> Result<()> {
        let addr = self.url.trim_start_matches("http://").to_string();
        self.start_at(&addr).await
    }

    async fn start_at(&mut self, listen: &str) -> Result<()> {
        let binary = self
            .options
            .binary
            .clone()
            .unwrap_or_else(|| bin_path("cellplane"));
        let mut cmd = Command::new(&binary);
        if let Some(d) = &self.options.current_dir {
            cmd.current_dir(d);
        }
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("CELLPLANE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info,sqlx=warn")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path())?,
            ));
        if let Some(u) = &self.database_url {
            cmd.arg("--database-url").arg(u);
        }
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "spawn {} (build the binaries first: cargo build --workspace --bins, as scripts/test.sh does)",
                binary.display()
            )
        })?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await?
            .map_err(|_| {
                anyhow!(
                    "cellplane did not report its address; log: {}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                )
            })?;
        let url = line
            .strip_prefix("listening on ")
            .ok_or_else(|| anyhow!("unexpected first line {line:?}"))?
            .to_string();
        self.url = url.clone();
        self.admin = Client::new(url, Some(ADMIN_TOKEN.to_string()));
        self.child = Some(child);
        Ok(())
    }

    pub fn log_path(&self) -> PathBuf {
        self._tmp.path().join("cellplane.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Waits until the process exits by itself (a `kill` failpoint); true when it did
    /// within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return true;
                }
            } else {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// SIGKILL: no cleanup, no lease release.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    pub fn client(&self, token: &str) -> Client {
        Client::new(self.url.clone(), Some(token.to_string()))
    }

    pub fn anonymous(&self) -> Client {
        Client::new(self.url.clone(), None)
    }

    /// A raw request with the admin token.
    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.admin.request(method, path)
    }

    /// Runs raw SQL against this app's store (for tamper tests).
    pub async fn sql(&self, statement: &str) -> Result<u64> {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let url = match &self.database_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}", self.data_dir.join("cellplane.db").display()),
        };
        let mut conn = sqlx::AnyConnection::connect(&url).await?;
        let res = sqlx::query(statement).execute(&mut conn).await?;
        let _ = conn.close().await;
        Ok(res.rows_affected())
    }

    /// Runs a query returning one integer (e.g. a COUNT) against this app's store.
    pub async fn sql_i64(&self, query: &str) -> Result<i64> {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let url = match &self.database_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}", self.data_dir.join("cellplane.db").display()),
        };
        let mut conn = sqlx::AnyConnection::connect(&url).await?;
        let v: i64 = sqlx::query_scalar(query).fetch_one(&mut conn).await?;
        let _ = conn.close().await;
        Ok(v)
    }

    /// One text value from the app's store (panics when the query fails).
    pub async fn sql_text(&self, query: &str) -> String {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let url = match &self.database_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}", self.data_dir.join("cellplane.db").display()),
        };
        let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect");
        let v: String = sqlx::query_scalar(query)
            .fetch_one(&mut conn)
            .await
            .expect("query");
        let _ = conn.close().await;
        v
    }

    pub async fn create_org(&self, id: &str) {
        let r = self
            .req(Method::POST, "/v1/organizations")
            .json(&serde_json::json!({"organization_id": id, "name": id}))
            .send()
            .await
            .expect("send");
        assert_eq!(
            r.status(),
            201,
            "create org {id}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    pub async fn create_tenant(&self, id: &str, org: &str) -> serde_json::Value {
        let r = self
            .req(Method::POST, "/v1/tenants")
            .json(&serde_json::json!({"tenant_id": id, "organization_id": org,
                "profile": "mt-standard", "region": "eu-west-1"}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 201, "create tenant {id}");
        r.json().await.expect("tenant json")
    }

    /// Posts a lifecycle action and waits for its job to end.
    pub async fn lifecycle(&self, id: &str, action: &str) -> cellplane_api::Job {
        let r = self
            .req(Method::POST, &format!("/v1/tenants/{id}/{action}"))
            .send()
            .await
            .expect("send");
        assert_eq!(
            r.status(),
            202,
            "{action} {id}: {}",
            r.text().await.unwrap_or_default()
        );
        let job: cellplane_api::Job = r.json().await.expect("job");
        self.admin
            .wait_job(&job.job_id, Duration::from_secs(30))
            .await
            .expect("job")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Cells' processes (sample-cell, a terraform left running) must not outlive a test.
        kill_processes_under(&self.data_dir);
    }
}

/// A live (not zombie) process of this machine.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: i32,
    pub pgid: i32,
    /// The executable's name (`comm`).
    pub name: String,
    pub cmdline: String,
    pub cwd: Option<PathBuf>,
}

/// Every live process on this machine.
pub fn processes() -> Vec<ProcInfo> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.first().is_some_and(|s| *s == "Z" || *s == "X") {
            continue;
        }
        let pgid = fields.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
        out.push(ProcInfo {
            pid,
            pgid,
            name,
            cmdline,
            cwd,
        });
    }
    out
}

/// Live processes that run in or name `dir` (cells' sample-cell and terraform processes).
pub fn processes_under(dir: &Path) -> Vec<ProcInfo> {
    let d = dir.display().to_string();
    let me = std::process::id() as i32;
    processes()
        .into_iter()
        .filter(|p| p.pid != me)
        .filter(|p| p.cmdline.contains(&d) || p.cwd.as_ref().is_some_and(|c| c.starts_with(dir)))
        .collect()
}

/// Live terraform processes (and their providers) working in `dir`.
pub fn terraform_processes_under(dir: &Path) -> Vec<ProcInfo> {
    processes_under(dir)
        .into_iter()
        .filter(|p| {
            p.name == "terraform" || p.name == "tofu" || p.name.starts_with("terraform-prov")
        })
        .collect()
}

/// Whether `pid` is still a live (not zombie) process.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace()
                .next()
                .map(|st| st != "Z" && st != "X")
        })
        .unwrap_or(false)
}

pub fn kill_processes_under(dir: &Path) {
    for p in processes_under(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl TestApp {
    /// Creates a cell (asserting 202) and returns the cell and its stamp job.
    pub async fn create_cell(&self, body: serde_json::Value) -> cellplane_api::CellWithJob {
        let r = self
            .req(Method::POST, "/v1/cells")
            .json(&body)
            .send()
            .await
            .expect("send");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, 202, "create cell: {text}");
        serde_json::from_str(&text).expect("cell with job")
    }

    /// Waits for a job to end, failing the test with the job's log if it does not.
    pub async fn wait_job(&self, id: &str, timeout: Duration) -> cellplane_api::Job {
        let job = self.admin.wait_job(id, timeout).await.expect("job");
        assert!(
            job.state.is_terminal(),
            "job {id} did not end within {timeout:?}: {job:?}\n{}",
            self.job_log(id).await
        );
        job
    }

    pub async fn job_log(&self, id: &str) -> String {
        self.admin
            .get_text(&format!("/v1/jobs/{id}/log"))
            .await
            .unwrap_or_default()
    }

    pub async fn cell(&self, id: &str) -> cellplane_api::Cell {
        self.admin
            .get(&format!("/v1/cells/{id}"))
            .await
            .expect("get cell")
    }

    /// Stamps a `local` cell and waits until it is active.
    pub async fn stamp_local(&self, id: &str, vars: serde_json::Value) -> cellplane_api::Cell {
        let out = self
            .create_cell(serde_json::json!({"cell_id": id, "region": "eu-west-1",
                "tier": "pooled", "template": "local", "capacity": {"tenants": 10, "units": 10},
                "vars": vars}))
            .await;
        let job = out.job.expect("a stamp job");
        let done = self.wait_job(&job.job_id, Duration::from_secs(120)).await;
        assert_eq!(
            done.state,
            cellplane_api::JobState::Succeeded,
            "{done:?}\n{}\n{}",
            self.job_log(&job.job_id).await,
            self.log()
        );
        let cell = self.cell(id).await;
        assert_eq!(cell.state, cellplane_api::CellState::Active, "{cell:?}");
        cell
    }

    /// The cell's working directory.
    pub fn cell_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("cells").join(id)
    }
}

/// Asserts a response is a problem document with `status`; returns it.
pub async fn expect_problem(resp: reqwest::Response, status: u16) -> serde_json::Value {
    let got = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(got, status, "expected {status}, got {got}: {body}");
    assert!(
        ct.starts_with("application/problem+json"),
        "expected problem+json, got {ct:?}: {body}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("problem is JSON");
    for k in ["type", "title", "status", "detail"] {
        assert!(v.get(k).is_some(), "problem lacks {k}: {body}");
    }
    assert_eq!(v["status"], status);
    v
}

/// Polls `f` until it returns Some or the timeout passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Reads `n` lines from a child's stdout (each with a timeout) and keeps draining it.
fn first_lines(child: &mut Child, n: usize, what: &str, log: &Path) -> Result<Vec<String>> {
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    let _ = tx.send(l);
                }
                Err(_) => break,
            }
        }
    });
    let mut out = Vec::new();
    for _ in 0..n {
        let l = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
            anyhow!(
                "{what} did not report its address; log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })?;
        out.push(l);
    }
    Ok(out)
}

/// A running `cellplane-router`. Killed on drop.
pub struct TestRouter {
    pub url: String,
    pub admin_url: String,
    pub state_file: PathBuf,
    pub control_plane: String,
    pub token: String,
    pub extra_args: Vec<String>,
    pub http: reqwest::Client,
    listen: String,
    child: Option<Child>,
    dir: std::sync::Arc<tempfile::TempDir>,
}

impl TestRouter {
    /// Starts a router watching `control_plane` with `token` (a `router` role token).
    pub async fn spawn(control_plane: &str, token: &str, extra_args: &[&str]) -> TestRouter {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = TestRouter {
            url: String::new(),
            admin_url: String::new(),
            state_file: dir.path().join("router-state.json"),
            control_plane: control_plane.to_string(),
            token: token.to_string(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .pool_max_idle_per_host(16)
                .build()
                .expect("client"),
            listen: "127.0.0.1:0".into(),
            child: None,
            dir: std::sync::Arc::new(dir),
        };
        r.start().await.expect("router starts");
        r
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("router.log")
    }

    /// The router process's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (or restarts, on the same port and state file) the binary.
    pub async fn start(&mut self) -> Result<()> {
        let mut cmd = Command::new(bin_path("cellplane-router"));
        cmd.arg("--control-plane")
            .arg(&self.control_plane)
            .arg("--listen")
            .arg(&self.listen)
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--state-file")
            .arg(&self.state_file)
            .arg("--base-domain")
            .arg("localhost")
            .arg("--max-backoff-ms")
            .arg("300")
            .args(&self.extra_args)
            .env("CELLPLANE_TOKEN", &self.token)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path())?,
            ));
        let mut child = cmd.spawn().context("spawn cellplane-router")?;
        let log = self.log_path();
        let lines = tokio::task::spawn_blocking(move || {
            first_lines(&mut child, 2, "router", &log).map(|l| (child, l))
        })
        .await??;
        let (child, lines) = lines;
        self.url = lines[0]
            .strip_prefix("listening on ")
            .ok_or_else(|| anyhow!("unexpected first line {:?}", lines[0]))?
            .to_string();
        self.admin_url = lines[1]
            .strip_prefix("admin listening on ")
            .ok_or_else(|| anyhow!("unexpected second line {:?}", lines[1]))?
            .to_string();
        // A restart keeps the port, as a real deployment behind a load balancer would.
        self.listen = self.url.trim_start_matches("http://").to_string();
        self.child = Some(child);
        Ok(())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// A request for `tenant` by Host subdomain.
    pub fn tenant_req(&self, method: Method, tenant: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .header("host", format!("{tenant}.localhost"))
    }

    pub async fn healthz(&self) -> serde_json::Value {
        self.http
            .get(format!("{}/__router/healthz", self.admin_url))
            .send()
            .await
            .expect("healthz")
            .json()
            .await
            .expect("healthz json")
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/__router/metrics", self.admin_url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits until the router's state file holds revision `rev` or later.
    pub async fn wait_persisted(&self, rev: i64) {
        let ok = eventually(Duration::from_secs(10), || async {
            let h = self.healthz().await;
            (h["state_file_revision"].as_i64().unwrap_or(-1) >= rev).then_some(())
        })
        .await;
        ok.unwrap_or_else(|_| {
            panic!(
                "state file never reached revision {rev}; log: {}",
                self.log()
            )
        });
    }

    /// Waits until the router serves revision `rev` or later.
    pub async fn wait_revision(&self, rev: i64) {
        let ok = eventually(Duration::from_secs(10), || async {
            let h = self.healthz().await;
            (h["revision"].as_i64().unwrap_or(-1) >= rev).then_some(())
        })
        .await;
        ok.unwrap_or_else(|_| panic!("router never reached revision {rev}; log: {}", self.log()));
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl TestApp {
    /// Mints a token of `role` with the admin token.
    pub async fn token(&self, role: &str) -> String {
        let t: serde_json::Value = self
            .admin
            .post("/v1/tokens", &serde_json::json!({"role": role}))
            .await
            .expect("create token");
        t["token"].as_str().expect("token").to_string()
    }

    /// The current routing revision, as the watch reports it.
    pub async fn routing_revision(&self) -> i64 {
        let v: serde_json::Value = self.admin.get("/v1/routes?since=0").await.expect("routes");
        v["revision"].as_i64().expect("revision")
    }

    /// Creates a tenant from a JSON document (fields beyond id/org/profile/region allowed).
    pub async fn create_tenant_with(&self, body: serde_json::Value) -> serde_json::Value {
        let r = self
            .req(Method::POST, "/v1/tenants")
            .json(&body)
            .send()
            .await
            .expect("send");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, 201, "create tenant: {text}");
        serde_json::from_str(&text).expect("tenant json")
    }
}

impl TestApp {
    /// Stamps several `local` cells at once and waits until all are active.
    /// Each item: (cell_id, region, tier, tenants, units).
    pub async fn stamp_cells(
        &self,
        cells: &[(&str, &str, &str, u64, u64)],
    ) -> Vec<cellplane_api::Cell> {
        let mut jobs = Vec::new();
        for (id, region, tier, tenants, units) in cells {
            let out = self
                .create_cell(
                    serde_json::json!({"cell_id": id, "region": region, "tier": tier,
                    "template": "local", "capacity": {"tenants": tenants, "units": units}}),
                )
                .await;
            jobs.push(out.job.expect("a stamp job").job_id);
        }
        let mut out = Vec::new();
        for (job, (id, ..)) in jobs.iter().zip(cells) {
            let done = self.wait_job(job, Duration::from_secs(180)).await;
            assert_eq!(
                done.state,
                cellplane_api::JobState::Succeeded,
                "stamping {id}: {done:?}\n{}",
                self.job_log(job).await
            );
            out.push(self.cell(id).await);
        }
        out
    }

    /// Posts an action without waiting; returns the job.
    pub async fn start_action(&self, id: &str, action: &str) -> cellplane_api::Job {
        let r = self
            .req(Method::POST, &format!("/v1/tenants/{id}/{action}"))
            .send()
            .await
            .expect("send");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, 202, "{action} {id}: {text}");
        serde_json::from_str(&text).expect("job")
    }
}

impl TestApp {
    /// Runs the `cellplane` command line against this control plane as the admin: exit
    /// code, stdout, stderr.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = std::process::Command::new(bin_path("cellplane"))
            .args(args)
            .env("CELLPLANE_URL", &self.url)
            .env("CELLPLANE_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("run cellplane");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// [`TestApp::start_action`] with an owned id, for joining many at once.
    pub async fn start_action_owned(&self, id: String) -> cellplane_api::Job {
        self.start_action(&id, "activate").await
    }

    pub async fn audit_verify_ok(&self) -> bool {
        self.admin
            .audit_verify()
            .await
            .map(|v| v.ok)
            .unwrap_or(false)
    }
}

/// A real Prometheus server (the Debian package `prometheus`; `.ci/run` installs it)
/// scraping routers' `/__router/metrics` every second, on a loopback port of its own.
pub struct TestPrometheus {
    pub url: String,
    addr: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl TestPrometheus {
    /// Picks the port (so a control plane can be told the URL before anything runs).
    pub fn reserve() -> TestPrometheus {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        TestPrometheus {
            url: format!("http://{addr}"),
            addr,
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Starts it scraping `targets` (`host:port` of routers' admin listeners) and waits
    /// until it is ready.
    pub async fn start(&mut self, targets: &[String]) {
        let bin = std::env::var("CELLPLANE_TEST_PROMETHEUS_BIN").unwrap_or("prometheus".into());
        let config = self.dir.path().join("prometheus.yml");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: router\n    metrics_path: /__router/metrics\n    \
                 static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={}", self.addr))
            .arg("--log.level=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {bin}: {e}: install the Debian package `prometheus` (.ci/run \
                     does) or set CELLPLANE_TEST_PROMETHEUS_BIN"
                )
            });
        self.child = Some(child);
        let http = reqwest::Client::new();
        let ready = eventually(Duration::from_secs(30), || async {
            let r = http
                .get(format!("{}/-/ready", self.url))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        assert!(
            ready.is_ok(),
            "prometheus never became ready:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// A PromQL instant query's `data.result`.
    pub async fn query(&self, q: &str) -> serde_json::Value {
        let r: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", q)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["data"]["result"].clone()
    }
}

impl Drop for TestPrometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
