//! `cellplane up` runs a `cellplane-router` next to the control plane so the quick start
//! routes tenant traffic end to end. The router is a separate process (the data plane
//! never links this crate); it gets a `router` token minted here, kept in
//! `<data_dir>/router-token` (mode 0600) and reused while it stays valid, and it exits
//! with its parent.

use crate::service::{Ctx, Service};
use cellplane_api::{CreateToken, Role};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LocalRouterError {
    #[error("cellplane-router was not found next to cellplane or on PATH")]
    NotFound,
    #[error("cannot mint the router token: {0}")]
    Token(String),
    #[error("cannot start cellplane-router: {0}")]
    Spawn(std::io::Error),
    #[error("cellplane-router did not start: {0}")]
    NoAddress(String),
}

/// A running local router; stopped (SIGTERM) on drop.
pub struct LocalRouter {
    child: Child,
    pub url: String,
    pub admin_url: String,
    pub log: PathBuf,
}

impl LocalRouter {
    /// The router process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalRouter {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn router_binary() -> Option<PathBuf> {
    let name = "cellplane-router";
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let p = dir.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The router token: the one in `<data_dir>/router-token` while it is valid, else a new one.
async fn router_token(service: &Service, data_dir: &Path) -> Result<String, LocalRouterError> {
    let path = data_dir.join("router-token");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        let valid = service
            .store()
            .token_by_hash(&crate::auth::hash_token(&s))
            .await
            .ok()
            .flatten()
            .is_some_and(|t| t.info.role == Role::Router);
        if valid {
            return Ok(s);
        }
        let _ = std::fs::remove_file(&path);
    }
    let ctx = Ctx {
        actor: "system:up".into(),
        correlation_id: crate::persistence::new_id("corr"),
    };
    let created = service
        .create_token(
            &ctx,
            CreateToken {
                role: Role::Router,
                tenant_id: None,
                description: Some("router started by cellplane up".into()),
            },
        )
        .await
        .map_err(|e| LocalRouterError::Token(e.to_string()))?;
    crate::startup::write_private(&path, &created.token)
        .map_err(|e| LocalRouterError::Token(format!("{}: {e}", path.display())))?;
    Ok(created.token)
}

/// Starts the router against `control_plane` and waits for its addresses.
pub async fn start(
    service: &Service,
    control_plane: &str,
    data_dir: &Path,
    listen: &str,
    admin_listen: &str,
    base_domain: &str,
) -> Result<LocalRouter, LocalRouterError> {
    let bin = router_binary().ok_or(LocalRouterError::NotFound)?;
    let token = router_token(service, data_dir).await?;
    let log = data_dir.join("router.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(LocalRouterError::Spawn)?;
    let mut child = Command::new(bin)
        .arg("--control-plane")
        .arg(control_plane)
        .arg("--listen")
        .arg(listen)
        .arg("--admin-listen")
        .arg(admin_listen)
        .arg("--state-file")
        .arg(data_dir.join("router-state.json"))
        .arg("--base-domain")
        .arg(base_domain)
        .arg("--exit-with-parent")
        .env("CELLPLANE_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .map_err(LocalRouterError::Spawn)?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| LocalRouterError::NoAddress("no stdout".into()))?;
    let lines = tokio::task::spawn_blocking(move || {
        let mut it = BufReader::new(stdout).lines();
        let a = it.next().and_then(Result::ok);
        let b = it.next().and_then(Result::ok);
        std::thread::spawn(move || for _ in it {});
        (a, b)
    });
    let (a, b) = match tokio::time::timeout(Duration::from_secs(20), lines).await {
        Ok(Ok(x)) => x,
        _ => (None, None),
    };
    let url = a.and_then(|l| l.strip_prefix("listening on ").map(str::to_string));
    let admin_url = b.and_then(|l| l.strip_prefix("admin listening on ").map(str::to_string));
    match (url, admin_url) {
        (Some(url), Some(admin_url)) => Ok(LocalRouter {
            child,
            url,
            admin_url,
            log,
        }),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            Err(LocalRouterError::NoAddress(format!(
                "see {}",
                log.display()
            )))
        }
    }
}
