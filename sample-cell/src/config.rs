//! Command-line and environment configuration (`SAMPLE_CELL_*`), parsed with clap.
//!
//! Every flag is validated here, so a bad value stops the process at startup with a message
//! naming the flag (clap's exit code 2) instead of failing later. Secrets (the admin token,
//! database URLs and passwords) live in [`Secret`] and must never be printed or logged.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::HeaderValue;
use clap::Parser;

use crate::ids::is_identifier;

/// A string that never prints: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// sample-cell: the reference tenant-aware workload of a cellplane cell.
#[derive(Debug, Clone, Parser)]
#[command(name = "sample-cell", version, about)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port, printed as `listening on http://ADDR`.
    #[arg(long, env = "SAMPLE_CELL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Id of the cell this process serves, echoed in `X-Cell-ID`.
    #[arg(long, env = "SAMPLE_CELL_CELL_ID", default_value = "local", value_parser = parse_cell_id)]
    pub cell_id: String,

    /// Directory of the embedded SQLite store (`<data-dir>/sample-cell.db`); ignored when
    /// `--database-url` is set.
    #[arg(long, env = "SAMPLE_CELL_DATA_DIR", default_value = ".sample-cell")]
    pub data_dir: PathBuf,

    /// `postgres://…` owner/admin URL (runs migrations and creates the service role) or
    /// `sqlite://PATH`. Default: SQLite under `--data-dir`.
    #[arg(long, env = "SAMPLE_CELL_DATABASE_URL", hide_env_values = true, value_parser = parse_database_url)]
    pub database_url: Option<DatabaseUrl>,

    /// PostgreSQL URL the service connects with (a non-owner role). Default: the
    /// `--database-url` with its user replaced by `--app-role`.
    #[arg(long, env = "SAMPLE_CELL_APP_DATABASE_URL", hide_env_values = true, value_parser = parse_app_url)]
    pub app_database_url: Option<Secret>,

    /// Name of the non-owner PostgreSQL role that serves tenant traffic.
    #[arg(long, env = "SAMPLE_CELL_APP_ROLE", default_value = "sample_cell_app", value_parser = parse_role)]
    pub app_role: String,

    /// Password set on the service role and used by the derived service URL; without it
    /// the role has no password (trust or peer authentication).
    #[arg(long, env = "SAMPLE_CELL_APP_DB_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub app_db_password: Option<Secret>,

    /// Largest number of pooled database connections.
    #[arg(long, env = "SAMPLE_CELL_MAX_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_connections: u32,

    /// Version this process reports in `X-App-Version` and `/version`.
    #[arg(long, env = "SAMPLE_CELL_APP_VERSION", default_value = env!("CARGO_PKG_VERSION"), value_parser = parse_app_version)]
    pub app_version: String,

    /// Fraction (0.0..=1.0) of tenant API requests answered 500, chosen at random.
    #[arg(long, env = "SAMPLE_CELL_FAULT_RATE", default_value_t = 0.0, value_parser = parse_fault_rate)]
    pub fault_rate: f64,

    /// Milliseconds added to every tenant API request.
    #[arg(long, env = "SAMPLE_CELL_EXTRA_LATENCY_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub extra_latency_ms: u64,

    /// Bearer token of the cell contract routes (`/cell/v1/…`). Without it those routes
    /// answer 403.
    #[arg(long, env = "SAMPLE_CELL_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub admin_token: Option<Secret>,

    /// Seconds a graceful shutdown waits for in-flight requests before it gives up.
    #[arg(long, env = "SAMPLE_CELL_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Postgres(Secret),
    Sqlite(PathBuf),
}

impl Config {
    /// The store location, resolving the `--data-dir` default.
    pub fn database(&self) -> DatabaseUrl {
        self.database_url
            .clone()
            .unwrap_or_else(|| DatabaseUrl::Sqlite(self.data_dir.join("sample-cell.db")))
    }
}

fn parse_cell_id(raw: &str) -> Result<String, String> {
    if is_identifier(raw) {
        Ok(raw.to_owned())
    } else {
        Err("must match ^[a-z][a-z0-9-]{1,62}$".into())
    }
}

fn parse_database_url(raw: &str) -> Result<DatabaseUrl, String> {
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        Ok(DatabaseUrl::Postgres(Secret::new(raw)))
    } else if let Some(path) = raw.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err("sqlite:// needs a file path".into());
        }
        Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
    } else {
        Err("must start with postgres://, postgresql:// or sqlite://".into())
    }
}

fn parse_app_url(raw: &str) -> Result<Secret, String> {
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        Ok(Secret::new(raw))
    } else {
        Err("must start with postgres:// or postgresql://".into())
    }
}

fn parse_role(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let valid = (1..=63).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    if valid {
        Ok(raw.to_owned())
    } else {
        Err("must match ^[a-z_][a-z0-9_]{0,62}$".into())
    }
}

fn parse_secret(raw: &str) -> Result<Secret, String> {
    if raw.is_empty() {
        Err("must not be empty".into())
    } else if raw.contains('\0') {
        Err("must not contain NUL".into())
    } else {
        Ok(Secret::new(raw))
    }
}

fn parse_app_version(raw: &str) -> Result<String, String> {
    if raw.is_empty() || raw.len() > 128 || HeaderValue::from_str(raw).is_err() {
        Err("must be 1..=128 visible ASCII characters".into())
    } else {
        Ok(raw.to_owned())
    }
}

fn parse_fault_rate(raw: &str) -> Result<f64, String> {
    let rate: f64 = raw
        .parse()
        .map_err(|_| format!("`{raw}` is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is outside 0.0..=1.0"))
    }
}

/// Derive the service role's URL from the admin URL: same scheme, host, port, database and
/// parameters, with the user info replaced by `user[:password]`.
pub fn derive_app_url(admin: &str, user: &str, password: Option<&str>) -> Result<String, String> {
    let (scheme, rest) = admin
        .split_once("://")
        .ok_or_else(|| "database url has no scheme".to_owned())?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let userinfo = match password {
        Some(password) => format!("{}:{}", percent_encode(user), percent_encode(password)),
        None => percent_encode(user),
    };
    Ok(format!("{scheme}://{userinfo}@{host}{tail}"))
}

fn percent_encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("sample-cell").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_use_sqlite_under_the_data_dir() {
        let config = parse(&["--data-dir", "/tmp/x"]).expect("defaults parse");
        assert_eq!(
            config.database(),
            DatabaseUrl::Sqlite(PathBuf::from("/tmp/x/sample-cell.db"))
        );
        assert_eq!(config.app_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(config.fault_rate, 0.0);
    }

    #[test]
    fn bad_fault_rate_names_the_flag() {
        let err = parse(&["--fault-rate", "1.5"]).expect_err("1.5 is out of range");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--fault-rate"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let config = parse(&[
            "--admin-token",
            "hunter2",
            "--database-url",
            "postgres://u:pw@h/db",
        ])
        .expect("parses");
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("hunter2") && !printed.contains("pw@"),
            "{printed}"
        );
    }

    #[test]
    fn app_url_replaces_the_user() {
        let derive = |admin, password| derive_app_url(admin, "sample_cell_app", password);
        assert_eq!(
            derive(
                "postgres://postgres:s3cret@127.0.0.1:5432/db?sslmode=disable",
                None
            ),
            Ok("postgres://sample_cell_app@127.0.0.1:5432/db?sslmode=disable".to_owned())
        );
        assert_eq!(
            derive("postgresql://localhost/db", Some("p@ss/word")),
            Ok("postgresql://sample_cell_app:p%40ss%2Fword@localhost/db".to_owned())
        );
        assert_eq!(
            derive("postgres://admin@h", None),
            Ok("postgres://sample_cell_app@h".to_owned())
        );
    }
}
