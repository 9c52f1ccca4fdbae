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
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            env: vec![
                ("CELLPLANE__JOBS__POLL_MS".into(), "50".into()),
                ("CELLPLANE__JOBS__LEASE_SECS".into(), "3".into()),
                ("CELLPLANE__JOBS__BACKOFF_BASE_MS".into(), "100".into()),
                (
                    "CELLPLANE__RATE_LIMIT__AUTHORING_PER_SEC".into(),
                    "0".into(),
                ),
            ],
        }
    }
}

impl AppOptions {
    pub fn with(mut self, k: &str, v: &str) -> Self {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.into(), v.into()));
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

    /// Starts (or restarts) the binary on the same data dir and store.
    pub async fn start(&mut self) -> Result<()> {
        let mut cmd = Command::new(bin_path("cellplane"));
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
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
                bin_path("cellplane").display()
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
