//! `cellplane down`: stops what `cellplane up` started on a data directory (its pid files
//! `up.pid` and `router.pid`), and with `--destroy` destroys that data directory's cells
//! through terraform, as `cell delete` does, then removes the directory. Only the cells
//! registered in this data directory are touched.

use crate::startup::Application;
use cellplane_api::{Cell, CellState, CellWithJob, Client, JobState, Tenant, TenantState};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `cellplane down`.
#[derive(clap::Args, Debug)]
pub struct DownArgs {
    /// The data directory `cellplane up` ran with.
    #[arg(long, default_value = ".cellplane")]
    pub data_dir: std::path::PathBuf,
    /// Also destroy every cell of this data directory (terraform destroy, after deleting
    /// their tenants) and then remove the data directory.
    #[arg(long)]
    pub destroy: bool,
}

const UP_PID: &str = "up.pid";
const ROUTER_PID: &str = "router.pid";
/// How long a stamp, destroy or lifecycle job may take before `down --destroy` gives up.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// Written by `up` once it serves: its own pid and its router's.
pub fn write_pids(data_dir: &Path, router: Option<u32>) {
    let _ = std::fs::write(data_dir.join(UP_PID), std::process::id().to_string());
    match router {
        Some(pid) => {
            let _ = std::fs::write(data_dir.join(ROUTER_PID), pid.to_string());
        }
        None => {
            let _ = std::fs::remove_file(data_dir.join(ROUTER_PID));
        }
    }
}

/// Removed by `up` when it stops.
pub fn remove_pids(data_dir: &Path) {
    let _ = std::fs::remove_file(data_dir.join(UP_PID));
    let _ = std::fs::remove_file(data_dir.join(ROUTER_PID));
}

pub async fn down(a: DownArgs) -> i32 {
    if !a.data_dir.is_dir() {
        println!("nothing to stop: {} does not exist", a.data_dir.display());
        return 0;
    }
    for (file, what) in [(UP_PID, "cellplane up"), (ROUTER_PID, "router")] {
        if let Err(e) = stop(&a.data_dir.join(file), what).await {
            eprintln!("error: {e}");
            return 1;
        }
    }
    remove_pids(&a.data_dir);
    if !a.destroy {
        return 0;
    }
    if let Err(e) = destroy(&a.data_dir).await {
        eprintln!("error: {e}");
        eprintln!(
            "{} is kept; run `cellplane down --destroy` again",
            a.data_dir.display()
        );
        return 1;
    }
    if let Err(e) = std::fs::remove_dir_all(&a.data_dir) {
        eprintln!("error: cannot remove {}: {e}", a.data_dir.display());
        return 1;
    }
    println!("removed {}", a.data_dir.display());
    0
}

/// SIGTERM to the process a pid file names (when it is still a cellplane process), then
/// waits for it to exit.
async fn stop(pid_file: &Path, what: &str) -> Result<(), String> {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return Ok(());
    };
    // A stale file may name a pid the system has since given to something else.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.trim().starts_with("cellplane") || !running(pid) {
        return Ok(());
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(60);
    while running(pid) {
        if Instant::now() > deadline {
            return Err(format!("{what} (pid {pid}) did not stop within 60s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("stopped {what} (pid {pid})");
    Ok(())
}

/// Alive and not a zombie.
fn running(pid: i32) -> bool {
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

/// Starts the control plane of `data_dir` in this process, deletes its tenants and then
/// destroys its cells through the API (each by a destroy job running terraform destroy).
async fn destroy(data_dir: &Path) -> Result<(), String> {
    let mut cfg = crate::config::load_config(None).map_err(|e| e.to_string())?;
    cfg.listen = "127.0.0.1:0".into();
    cfg.data_dir = data_dir.to_path_buf();
    if cfg.database_url.is_some() {
        // A PostgreSQL registry is shared with other replicas: its cells are not this data
        // directory's alone.
        return Err(
            "--destroy is for `cellplane up`'s embedded SQLite store; with a \
                    PostgreSQL registry delete cells with `cellplane cell delete`"
                .into(),
        );
    }
    let env_token = cfg
        .admin_token
        .as_ref()
        .map(|t| t.expose().trim().to_string());
    let app = Application::build(cfg).await.map_err(|e| e.to_string())?;
    let url = format!("http://{}", app.addr());
    let token = match env_token {
        Some(t) => t,
        None => std::fs::read_to_string(data_dir.join("admin-token"))
            .map_err(|e| format!("cannot read the admin token: {e}"))?
            .trim()
            .to_string(),
    };
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(stop.clone()));
    let c = Client::new(url, Some(token));
    let result = destroy_cells(&c).await;
    stop.cancel();
    let _ = server.await;
    result
}

async fn destroy_cells(c: &Client) -> Result<(), String> {
    // Cells refuse deletion while tenants are placed on them.
    let tenants: Vec<Tenant> = c.all("/v1/tenants").await.map_err(|e| e.to_string())?;
    for t in tenants {
        let id = t.tenant_id.to_string();
        if matches!(t.state, TenantState::Active | TenantState::Suspended) {
            run_job(
                c,
                &format!("/v1/tenants/{id}/archive"),
                &format!("archive tenant {id}"),
            )
            .await?;
        }
        // Drafts were never placed; deleted ones are gone.
        if matches!(
            t.state,
            TenantState::Active | TenantState::Suspended | TenantState::Archived
        ) {
            run_job(
                c,
                &format!("/v1/tenants/{id}/delete?force=true"),
                &format!("delete tenant {id}"),
            )
            .await?;
        }
    }
    let cells: Vec<Cell> = c.all("/v1/cells").await.map_err(|e| e.to_string())?;
    for cell in cells {
        if cell.state == CellState::Destroyed {
            continue;
        }
        let id = cell.cell_id.to_string();
        // A job still running on the cell (a stamp) ends first.
        if let Some(job) = &cell.pending_job_id {
            c.wait_job(job, JOB_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
        }
        let out: CellWithJob = c
            .delete(&format!("/v1/cells/{id}"))
            .await
            .map_err(|e| format!("delete cell {id}: {e}"))?;
        if let Some(job) = out.job {
            wait_ok(c, &job.job_id, &format!("destroy cell {id}")).await?;
        }
        println!("destroyed cell {id}");
    }
    Ok(())
}

async fn run_job(c: &Client, path: &str, what: &str) -> Result<(), String> {
    let job: cellplane_api::Job = c
        .post(path, &serde_json::json!({}))
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    wait_ok(c, &job.job_id, what).await
}

async fn wait_ok(c: &Client, job: &str, what: &str) -> Result<(), String> {
    let done = c
        .wait_job(job, JOB_TIMEOUT)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    if done.state == JobState::Succeeded {
        Ok(())
    } else {
        Err(format!(
            "{what}: job {job} ended {:?} (see `cellplane job log {job}`)",
            done.state
        ))
    }
}
