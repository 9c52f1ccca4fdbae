//! Test harness: a fresh store per test (temp SQLite file, or a fresh PostgreSQL database
//! created from `CELLPLANE_TEST_PG_URL`), an in-process sample-cell on port 0, and one
//! helper method per endpoint.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser as _;
use reqwest::{Method, Response, StatusCode};
use sample_cell::contract::Record;
use sample_cell::{Application, Config};
use sqlx::Connection;
use tokio::sync::oneshot;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const PG_ENV: &str = "CELLPLANE_TEST_PG_URL";

/// Generate one `#[tokio::test]` per backend for each scenario `async fn NAME(Backend)`:
/// `NAME::sqlite` and `NAME::postgres`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::helpers::Backend::Sqlite).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::helpers::Backend::Postgres).await;
                }
            }
        )+
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The superuser URL of the test PostgreSQL server; panics with instructions when unset,
/// so PostgreSQL variants fail loudly instead of passing silently.
pub fn pg_server_url() -> String {
    match std::env::var(PG_ENV) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{PG_ENV} is not set: the PostgreSQL variants of these tests need a PostgreSQL \
             superuser URL, e.g. {PG_ENV}=postgres://postgres@127.0.0.1:55432/postgres \
             (see docs/cell-contract.md, \"Running the tests\")"
        ),
    }
}

/// Replace the database of a PostgreSQL URL.
pub fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("url has a scheme");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |at| &tail[at..]);
    format!("{scheme}://{authority}/{database}{query}")
}

/// A store of its own for one test: dropped (database or directory) when this is dropped.
pub struct TestDb {
    pub backend: Backend,
    dir: tempfile::TempDir,
    pg_database: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pg_database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let name = format!("sc_{}", hex::encode(rand::random::<[u8; 6]>()));
                let mut conn = sqlx::PgConnection::connect(&pg_server_url())
                    .await
                    .expect("connect to the test PostgreSQL server");
                sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                conn.close().await.ok();
                Some(name)
            }
        };
        Self {
            backend,
            dir,
            pg_database,
        }
    }

    /// The `--database-url`/`--data-dir` arguments of this store.
    pub fn args(&self) -> Vec<String> {
        match &self.pg_database {
            Some(name) => vec![
                "--database-url".into(),
                with_database(&pg_server_url(), name),
            ],
            None => vec!["--data-dir".into(), self.dir.path().display().to_string()],
        }
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.path().join("sample-cell.db")
    }

    /// The service role's URL (PostgreSQL only).
    pub fn app_role_url(&self) -> String {
        let name = self.pg_database.as_deref().expect("a PostgreSQL test db");
        let server = with_database(&pg_server_url(), name);
        sample_cell::config::derive_app_url(&server, "sample_cell_app", None)
            .expect("derivable url")
    }

    /// The owner's URL (PostgreSQL only).
    pub fn owner_url(&self) -> String {
        let name = self.pg_database.as_deref().expect("a PostgreSQL test db");
        with_database(&pg_server_url(), name)
    }

    /// Rows (live or tombstone) and flag rows stored for `tenant`, counted by the owner
    /// (PostgreSQL superusers bypass row-level security).
    pub async fn stored_rows(&self, tenant: &str) -> (i64, i64) {
        const KV: &str = "SELECT COUNT(*) FROM kv WHERE tenant_id = $1";
        const FLAGS: &str = "SELECT COUNT(*) FROM tenant_flags WHERE tenant_id = $1";
        match self.backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}", self.sqlite_path().display());
                let mut conn = sqlx::SqliteConnection::connect(&url)
                    .await
                    .expect("open sqlite");
                let kv = sqlx::query_scalar(KV)
                    .bind(tenant)
                    .fetch_one(&mut conn)
                    .await;
                let flags = sqlx::query_scalar(FLAGS)
                    .bind(tenant)
                    .fetch_one(&mut conn)
                    .await;
                (kv.expect("count kv"), flags.expect("count flags"))
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.owner_url())
                    .await
                    .expect("connect as owner");
                let kv = sqlx::query_scalar(KV)
                    .bind(tenant)
                    .fetch_one(&mut conn)
                    .await;
                let flags = sqlx::query_scalar(FLAGS)
                    .bind(tenant)
                    .fetch_one(&mut conn)
                    .await;
                (kv.expect("count kv"), flags.expect("count flags"))
            }
        }
    }

    pub async fn spawn(&self) -> TestApp {
        self.spawn_with(&[]).await
    }

    pub async fn spawn_with(&self, extra: &[&str]) -> TestApp {
        let mut args: Vec<String> = vec![
            "sample-cell".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--cell-id".into(),
            "test-cell".into(),
            "--app-version".into(),
            "1.2.3-test".into(),
            "--max-connections".into(),
            "4".into(),
            "--shutdown-grace-secs".into(),
            "5".into(),
        ];
        args.extend(self.args());
        if !extra.contains(&"--no-admin-token") {
            args.extend(["--admin-token".into(), ADMIN_TOKEN.into()]);
        }
        args.extend(
            extra
                .iter()
                .filter(|a| **a != "--no-admin-token")
                .map(|a| (*a).to_owned()),
        );
        let config = Config::try_parse_from(&args).expect("test flags parse");
        let app = Application::build(config)
            .await
            .expect("application starts");
        let base = format!("http://{}", app.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        TestApp {
            base,
            client: reqwest::Client::new(),
            stop: Some(stop),
            server: Some(server),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_database.take() else {
            return;
        };
        // Dropping runs outside any runtime, on a thread of its own; FORCE ends the
        // connections the test's app may still hold.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&pg_server_url()).await {
                    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// An in-process sample-cell serving on a free port.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// A parsed export stream.
pub struct Export {
    pub records: Vec<Record>,
    pub body: String,
}

impl Export {
    /// The cursor record's `(cursor, rows, tombstones)`.
    pub fn cursor(&self) -> (String, u64, u64) {
        match self.records.last() {
            Some(Record::Cursor {
                cursor,
                rows,
                tombstones,
            }) => (cursor.clone(), *rows, *tombstones),
            other => panic!("export does not end with a cursor record: {other:?}"),
        }
    }

    /// Data records (rows and tombstones), without the cursor.
    pub fn data(&self) -> &[Record] {
        &self.records[..self.records.len() - 1]
    }
}

impl TestApp {
    /// Stop accepting, drain and close the store; waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("server stops within 10s")
                .expect("server task joins")
                .expect("server exits cleanly");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn tenant_request(
        &self,
        method: Method,
        tenant: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Response {
        let mut request = self
            .client
            .request(method, self.url(path))
            .header("X-Tenant-ID", tenant);
        if let Some(body) = body {
            request = request.body(body);
        }
        request.send().await.expect("request is answered")
    }

    pub async fn put(&self, tenant: &str, key: &str, value: &[u8]) -> Response {
        self.tenant_request(
            Method::PUT,
            tenant,
            &format!("/v1/kv/{key}"),
            Some(value.to_vec()),
        )
        .await
    }

    pub async fn put_ok(&self, tenant: &str, key: &str, value: &[u8]) {
        let response = self.put(tenant, key, value).await;
        assert!(
            response.status().is_success(),
            "PUT {tenant}/{key}: {}",
            response.status()
        );
    }

    pub async fn get(&self, tenant: &str, key: &str) -> Response {
        self.tenant_request(Method::GET, tenant, &format!("/v1/kv/{key}"), None)
            .await
    }

    /// The value under `key`, or `None` on 404.
    pub async fn value(&self, tenant: &str, key: &str) -> Option<Vec<u8>> {
        let response = self.get(tenant, key).await;
        match response.status() {
            StatusCode::OK => Some(response.bytes().await.expect("body").to_vec()),
            StatusCode::NOT_FOUND => None,
            other => panic!("GET {tenant}/{key}: {other}"),
        }
    }

    pub async fn delete(&self, tenant: &str, key: &str) -> Response {
        self.tenant_request(Method::DELETE, tenant, &format!("/v1/kv/{key}"), None)
            .await
    }

    /// `GET /v1/kv?{query}` as JSON.
    pub async fn list(&self, tenant: &str, query: &str) -> serde_json::Value {
        let response = self
            .tenant_request(Method::GET, tenant, &format!("/v1/kv?{query}"), None)
            .await;
        assert_eq!(response.status(), StatusCode::OK, "list {tenant}?{query}");
        response.json().await.expect("list json")
    }

    /// Every key of a listing, following cursors.
    pub async fn all_keys(&self, tenant: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let query = match &cursor {
                Some(cursor) => format!("limit=1000&cursor={cursor}"),
                None => "limit=1000".to_owned(),
            };
            let page = self.list(tenant, &query).await;
            for item in page["items"].as_array().expect("items") {
                keys.push(item["key"].as_str().expect("key").to_owned());
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return keys,
            }
        }
    }

    pub fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    pub async fn export_response(&self, tenant: &str, since: Option<&str>) -> Response {
        let mut path = format!("/cell/v1/tenants/{tenant}/export");
        if let Some(since) = since {
            path.push_str(&format!("?since={since}"));
        }
        self.admin(Method::GET, &path)
            .send()
            .await
            .expect("export answered")
    }

    pub async fn export(&self, tenant: &str, since: Option<&str>) -> Export {
        let response = self.export_response(tenant, since).await;
        assert_eq!(response.status(), StatusCode::OK, "export {tenant}");
        assert_eq!(
            response.headers()["content-type"],
            "application/x-ndjson",
            "export content type"
        );
        let body = response.text().await.expect("export body");
        let records = body
            .lines()
            .map(|line| serde_json::from_str(line).expect("export line is a record"))
            .collect();
        Export { records, body }
    }

    pub async fn import_response(&self, tenant: &str, body: String) -> Response {
        self.admin(Method::POST, &format!("/cell/v1/tenants/{tenant}/import"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .expect("import answered")
    }

    /// Import and return `(applied, skipped)`.
    pub async fn import(&self, tenant: &str, body: String) -> (u64, u64) {
        let response = self.import_response(tenant, body).await;
        assert_eq!(response.status(), StatusCode::OK, "import {tenant}");
        let summary: serde_json::Value = response.json().await.expect("summary json");
        (
            summary["applied"].as_u64().expect("applied"),
            summary["skipped"].as_u64().expect("skipped"),
        )
    }

    async fn admin_json(&self, method: Method, path: &str) -> serde_json::Value {
        let response = self
            .admin(method, path)
            .send()
            .await
            .expect("admin call answered");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.json().await.expect("json")
    }

    pub async fn freeze(&self, tenant: &str) -> serde_json::Value {
        self.admin_json(Method::POST, &format!("/cell/v1/tenants/{tenant}/freeze"))
            .await
    }

    pub async fn unfreeze(&self, tenant: &str) -> serde_json::Value {
        self.admin_json(Method::POST, &format!("/cell/v1/tenants/{tenant}/unfreeze"))
            .await
    }

    /// `(rows, digest)`.
    pub async fn checksum(&self, tenant: &str) -> (u64, String) {
        let json = self
            .admin_json(Method::GET, &format!("/cell/v1/tenants/{tenant}/checksum"))
            .await;
        assert_eq!(json["tenant_id"], tenant);
        (
            json["rows"].as_u64().expect("rows"),
            json["digest"].as_str().expect("digest").to_owned(),
        )
    }

    pub async fn purge(&self, tenant: &str) -> serde_json::Value {
        self.admin_json(Method::DELETE, &format!("/cell/v1/tenants/{tenant}"))
            .await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Assert a problem+json response with the given status, stamped with the cell headers;
/// returns its detail.
pub async fn assert_problem(response: Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status, "status");
    let headers = response.headers().clone();
    assert_eq!(headers["x-cell-id"], "test-cell");
    assert_eq!(headers["x-app-version"], "1.2.3-test");
    assert_eq!(headers["content-type"], "application/problem+json");
    let body: serde_json::Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    // One problem vocabulary with the control plane and the router.
    let slug = body["type"]
        .as_str()
        .and_then(|t| t.strip_prefix("https://cellplane.dev/problems/"))
        .unwrap_or_else(|| panic!("type is not a cellplane problem type: {body}"));
    assert!(
        !slug.is_empty() && slug.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
        "{body}"
    );
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    body["detail"].as_str().expect("detail").to_owned()
}
