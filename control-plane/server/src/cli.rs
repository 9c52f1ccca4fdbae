//! The `cellplane` command line: `serve` and `up` run the control plane; the other
//! commands are clients of the HTTP API (`CELLPLANE_URL`, `CELLPLANE_TOKEN`) that print
//! tables, or JSON with `--json`.

mod manifests;
mod releases;

use crate::config::{Config, LogFormat, Secret};
use crate::startup::{shutdown_signal, Application};
use cellplane_api::*;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "cellplane",
    version,
    about = "Cell-based tenancy control plane",
    after_help = "Start locally with `cellplane up`; every other command talks to the API at \
                  CELLPLANE_URL with the token in CELLPLANE_TOKEN."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the control plane.
    #[command(after_help = "Example:\n  \
        cellplane serve --listen 0.0.0.0:7480 --data-dir /var/lib/cellplane \\\n    \
        --database-url postgres://cellplane@db/cellplane")]
    Serve(ServeArgs),
    /// Run the control plane with embedded defaults (SQLite in ./.cellplane) and a local router.
    #[command(after_help = "Example:\n  \
        cellplane up\n  \
        export CELLPLANE_TOKEN=$(cat .cellplane/admin-token)\n  \
        cellplane cell create euw1-pool-1 --region eu-west-1 --template local --wait\n\
        Stop with Ctrl-C or `cellplane down`; start over with `cellplane down --destroy`.")]
    Up(UpArgs),
    /// Stop what `cellplane up` started; with --destroy also destroy its cells and data.
    #[command(after_help = "Example:\n  \
        cellplane down              # stop the control plane and router of ./.cellplane\n  \
        cellplane down --destroy    # and destroy its cells, then remove ./.cellplane")]
    Down(crate::down::DownArgs),
    /// Apply manifests (organizations, region policies, cells, tenants) with a plan.
    #[command(after_help = "Example:\n  \
        cellplane apply -f examples/fleet --dry-run   # the plan: what changes, which jobs run\n  \
        cellplane apply -f examples/fleet")]
    Apply(manifests::ApplyArgs),
    /// What applying manifests would change, field by field (a dry run).
    Diff(manifests::DiffArgs),
    /// Objects as tables or as documents that re-apply as no-ops (`-o yaml`).
    #[command(after_help = "Example:\n  \
        cellplane get tenants --wide\n  \
        cellplane get tenant acme -o yaml > acme.yaml && cellplane apply -f acme.yaml")]
    Get(manifests::GetArgs),
    /// Organizations.
    Org(ClientArgs<OrgCmd>),
    /// Tenants and their lifecycle.
    Tenant(ClientArgs<TenantCmd>),
    /// Cells.
    Cell(ClientArgs<CellCmd>),
    /// Jobs.
    Job(ClientArgs<JobCmd>),
    /// Release rollouts: start one, watch it live, act on it.
    #[command(after_help = "Example:\n  \
        cellplane release create rel-42 --app-version v42 -f release.json --watch\n  \
        cellplane release status rel-42 --watch\n  \
        cellplane release approve rel-42")]
    Release(ClientArgs<releases::ReleaseCmd>),
    /// Cell templates.
    Template(ClientArgs<TemplateCmd>),
    /// The audit trail.
    Audit(ClientArgs<AuditCmd>),
    /// API tokens.
    Token(ClientArgs<TokenCmd>),
    /// Print a shell completion script (e.g. `cellplane completion bash > /etc/bash_completion.d/cellplane`).
    Completion {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// Shells `cellplane completion` writes scripts for.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory for the SQLite database, the admin token and cell working dirs.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL (postgres://…); SQLite in the data dir when absent.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// TOML configuration file (overridden by CELLPLANE__… variables and flags).
    #[arg(long, env = "CELLPLANE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Address the API listens on.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub listen: String,
    /// Directory for the SQLite database, the admin token, cell working dirs and pid files.
    #[arg(long, default_value = ".cellplane")]
    pub data_dir: PathBuf,
    /// Where the local router takes tenant traffic.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub router_listen: String,
    /// The local router's /__router/healthz and /__router/metrics.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub router_admin_listen: String,
    /// Tenants are `{tenant}.{base_domain}` at the router.
    #[arg(long, default_value = "localhost")]
    pub base_domain: String,
    /// Do not start a router.
    #[arg(long)]
    pub no_router: bool,
}

#[derive(Args, Debug)]
pub struct ClientArgs<T: Subcommand> {
    /// Control plane URL.
    #[arg(
        long,
        env = "CELLPLANE_URL",
        default_value = "http://127.0.0.1:7480",
        global = true
    )]
    pub url: String,
    /// API token (default: ./.cellplane/admin-token when present).
    #[arg(long, env = "CELLPLANE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: T,
}

#[derive(Subcommand, Debug)]
pub enum OrgCmd {
    /// Create an organization.
    Create {
        /// Organization id (lowercase letters, digits, dashes).
        id: String,
        /// Display name.
        #[arg(long)]
        name: String,
    },
    /// List organizations.
    List,
    /// Show one organization.
    Get {
        /// Organization id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Create a tenant (in draft; `tenant activate` places and routes it).
    #[command(after_help = "Example:\n  \
        cellplane tenant create acme --org acme-corp --region eu-west-1 --quotas '{\"units\": 2}'")]
    Create {
        /// Tenant id (lowercase letters, digits, dashes; its router host is {id}.{base_domain}).
        id: String,
        /// The organization it belongs to.
        #[arg(long)]
        org: String,
        /// Tenancy profile (mt-standard, …).
        #[arg(long, default_value = "mt-standard")]
        profile: String,
        /// Home region, e.g. eu-west-1.
        #[arg(long)]
        region: String,
        /// Quotas as JSON, e.g. '{"units": 2}'.
        #[arg(long)]
        quotas: Option<String>,
        /// Policies as JSON, e.g. '{"dataResidency": "in-region-only"}'.
        #[arg(long)]
        policies: Option<String>,
        /// Billing as JSON, e.g. '{"plan": "standard"}'.
        #[arg(long)]
        billing: Option<String>,
    },
    /// List tenants, optionally filtered.
    List {
        /// Only tenants in this state (draft, active, suspended, archived, deleted).
        #[arg(long)]
        state: Option<String>,
        /// Only tenants of this region.
        #[arg(long)]
        region: Option<String>,
        /// Only tenants of this organization.
        #[arg(long)]
        org: Option<String>,
        /// Only tenants with an environment on this cell.
        #[arg(long)]
        cell: Option<String>,
    },
    /// Show one tenant with its environments and their cells.
    Get {
        /// Tenant id.
        id: String,
    },
    /// Change a tenant's quotas, policies or billing.
    Patch {
        /// Tenant id.
        id: String,
        /// New quotas as JSON.
        #[arg(long)]
        quotas: Option<String>,
        /// New policies as JSON.
        #[arg(long)]
        policies: Option<String>,
        /// New billing as JSON.
        #[arg(long)]
        billing: Option<String>,
        /// Expected version (sent as If-Match).
        #[arg(long)]
        if_match: Option<i64>,
    },
    /// Adds an environment. On an active tenant it is placed and routed by a job
    /// (`--wait` follows it); a draft or suspended tenant's is placed on activate/resume.
    EnvAdd {
        /// Tenant id.
        id: String,
        /// dev, stage or prod.
        #[arg(long)]
        name: String,
        /// Defaults to the tenant's region.
        #[arg(long)]
        region: Option<String>,
        /// shared or strict.
        #[arg(long, default_value = "shared")]
        isolation: String,
        /// Wait for the placement job to finish.
        #[arg(long)]
        wait: bool,
    },
    /// Metered usage per environment and meter (requests, request_bytes, response_bytes,
    /// units), by hour unless told otherwise.
    #[command(
        after_help = "Example:\n  cellplane tenant usage acme --meter requests --granularity day"
    )]
    Usage {
        /// Tenant id.
        id: String,
        /// requests, request_bytes, response_bytes or units (default: all).
        #[arg(long)]
        meter: Option<String>,
        /// Only this environment.
        #[arg(long)]
        env: Option<String>,
        /// minute, hour or day.
        #[arg(long, default_value = "hour")]
        granularity: String,
        /// RFC 3339 (default: a day before --to).
        #[arg(long)]
        from: Option<String>,
        /// RFC 3339 (default: now).
        #[arg(long)]
        to: Option<String>,
    },
    /// Move an environment to another cell (or to a dedicated cell stamped for it) with a
    /// short cutover; `--wait` shows the steps, rows copied and the delta until the flip.
    #[command(after_help = "Examples:\n  \
        cellplane tenant move acme --env prod --to euw1-pool-2 --wait\n  \
        cellplane tenant move acme --env prod --dedicated --wait")]
    Move {
        /// Tenant id.
        id: String,
        /// The environment to move.
        #[arg(long, default_value = "prod")]
        env: String,
        /// The target cell.
        #[arg(
            long,
            conflicts_with = "dedicated",
            required_unless_present = "dedicated"
        )]
        to: Option<String>,
        /// Stamp a dedicated cell for the environment and move there.
        #[arg(long)]
        dedicated: bool,
        /// Follow the move until the tenant is served from the target (or it rolled back).
        #[arg(long)]
        wait: bool,
    },
    /// List moves (newest first), or show one with `--id`.
    Moves {
        /// Only this tenant's moves.
        tenant: Option<String>,
        /// running, succeeded, rolled_back or failed.
        #[arg(long)]
        state: Option<String>,
        /// Moves into or out of this cell.
        #[arg(long)]
        cell: Option<String>,
        /// Show this move with its evidence.
        #[arg(long)]
        id: Option<String>,
    },
    /// Activate a draft tenant: place its environments on cells and publish its routes.
    #[command(after_help = "Example:\n  cellplane tenant activate acme --wait")]
    Activate(ActionArgs),
    /// Suspend an active tenant (the router answers 403 for it).
    Suspend(ActionArgs),
    /// Resume a suspended tenant.
    Resume(ActionArgs),
    /// Archive a tenant (starts its retention period).
    Archive(ActionArgs),
    /// Delete an archived tenant and release its placements.
    Delete(ActionArgs),
}

#[derive(Args, Debug)]
pub struct ActionArgs {
    /// Tenant id.
    pub id: String,
    /// Wait for the job to finish.
    #[arg(long)]
    pub wait: bool,
    /// Admins only: delete before the retention period ends.
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand, Debug)]
pub enum CellCmd {
    /// Create a cell and stamp it from a template (terraform apply, by a job).
    #[command(after_help = "Example:\n  \
        cellplane cell create euw1-pool-1 --region eu-west-1 --template local --wait")]
    Create {
        /// Cell id (lowercase letters, digits, dashes).
        id: String,
        /// Region the cell serves, e.g. eu-west-1.
        #[arg(long)]
        region: String,
        /// pooled (shared by tenants) or dedicated (one tenant).
        #[arg(long, default_value = "pooled")]
        tier: String,
        /// Template to stamp from (see `cellplane template list`).
        #[arg(long, default_value = "local")]
        template: String,
        /// How many tenant environments the cell takes.
        #[arg(long, default_value_t = 50)]
        capacity_tenants: u64,
        /// How many quota units the cell takes.
        #[arg(long, default_value_t = 100)]
        capacity_units: u64,
        /// key=value, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// key=value (value parsed as JSON when it is valid JSON), repeatable.
        #[arg(long = "var")]
        vars: Vec<String>,
        /// Application version to deploy on the cell.
        #[arg(long)]
        app_version: Option<String>,
        /// Follow the stamp job (progress bar and resource lines) until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// List cells, optionally filtered.
    List {
        /// Only cells of this region.
        #[arg(long)]
        region: Option<String>,
        /// Only cells of this tier (pooled or dedicated).
        #[arg(long)]
        tier: Option<String>,
        /// Only cells in this state.
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one cell: state, capacity, outputs and drift.
    Get {
        /// Cell id.
        id: String,
    },
    /// Changes labels, capacity, variables or the app version; a change of variables or
    /// app version is applied by a job.
    Update {
        /// Cell id.
        id: String,
        /// New application version.
        #[arg(long)]
        app_version: Option<String>,
        /// key=value, repeatable: replaces the cell's variables (JSON values allowed).
        #[arg(long = "var")]
        vars: Vec<String>,
        /// key=value, repeatable: replaces the cell's labels.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// New tenant capacity (never below what is in use).
        #[arg(long)]
        capacity_tenants: Option<u64>,
        /// New unit capacity (never below what is in use).
        #[arg(long)]
        capacity_units: Option<u64>,
        /// Follow the job until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Re-applies the cell's stack (repairs a failed stamp, reverts drift).
    Apply {
        /// Cell id.
        id: String,
        /// Follow the job until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Checks the cell for drift now.
    Plan {
        /// Cell id.
        id: String,
        /// Follow the job until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Stop placing new tenants on the cell; with --move, also move every tenant off it (a
    /// few at a time, to cells chosen by placement); the cell ends `drained`.
    #[command(after_help = "Example:\n  cellplane cell drain euw1-pool-1 --move --wait")]
    Drain {
        /// Cell id.
        id: String,
        /// Move every tenant environment off the cell (a `cell.drain` job).
        #[arg(long = "move")]
        move_tenants: bool,
        /// With --move: follow the drain job until it ends.
        #[arg(long, requires = "move_tenants")]
        wait: bool,
    },
    /// Destroys the cell's stack (refused while tenants are placed on it).
    Delete {
        /// Cell id.
        id: String,
        /// Follow the destroy job until it ends.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// List jobs, optionally filtered.
    List {
        /// Only jobs acting on this target (e.g. cell/euw1-pool-1, tenant/acme).
        #[arg(long)]
        target: Option<String>,
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one job.
    Get {
        /// Job id.
        id: String,
    },
    /// Print a job's log (terraform output for stamp jobs).
    Log {
        /// Job id.
        id: String,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Follow a job until it ends.
    Watch {
        /// Job id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// Templates the control plane finds in its template directory.
    List,
    /// One template: description, tiers, variables and required outputs.
    Show {
        /// Template name.
        name: String,
    },
    /// Renders a template for a cell into a directory, offline (no server): what a stamp
    /// job would run, for review or for a bare terraform run.
    Render {
        /// Template name.
        name: String,
        /// The cell id to render for.
        #[arg(long)]
        cell_id: String,
        /// The cell's region.
        #[arg(long, default_value = "eu-west-1")]
        region: String,
        /// The cell's tier (pooled or dedicated).
        #[arg(long, default_value = "pooled")]
        tier: String,
        /// key=value (value parsed as JSON when it is valid JSON), repeatable.
        #[arg(long = "var")]
        vars: Vec<String>,
        /// Application version to render with.
        #[arg(long)]
        app_version: Option<String>,
        /// Directory to write the stack into.
        #[arg(long)]
        out: PathBuf,
        /// Template directory (default: ./cell-templates, else the built-in templates).
        #[arg(long, env = "CELLPLANE__IAC__TEMPLATES_DIR")]
        templates_dir: Option<PathBuf>,
        /// The sample-cell binary for the local template.
        #[arg(long, env = "CELLPLANE__IAC__SAMPLE_CELL_BIN")]
        sample_cell_bin: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// List audit records, newest last.
    List {
        /// Only records about this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only records about this target (e.g. cell/euw1-pool-1).
        #[arg(long)]
        target: Option<String>,
        /// At most this many records.
        #[arg(long)]
        limit: Option<i64>,
    },
    /// Check the hash chain of the whole audit trail.
    Verify,
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        /// admin, operator, viewer, router or tenant-admin.
        #[arg(long)]
        role: String,
        /// The tenant a tenant-admin token is for.
        #[arg(long)]
        tenant: Option<String>,
        /// What the token is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token.
    Revoke {
        /// Token id.
        id: String,
    },
}

/// Exit codes: 0 ok, 1 the API refused or failed, 2 usage or configuration error.
pub async fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Serve(a) => return serve(a).await,
        Command::Up(a) => return up(a).await,
        Command::Down(a) => return crate::down::down(a).await,
        Command::Completion { shell } => return completion(shell),
        Command::Apply(a) => manifests::apply(a).await,
        Command::Diff(a) => manifests::diff(a).await,
        Command::Get(a) => manifests::get(a).await,
        Command::Org(a) => {
            let (conn, json) = (conn_of(&a), a.json);
            client(conn, |c| org(c, a.cmd, json)).await
        }
        Command::Tenant(a) => {
            let (conn, json) = (conn_of(&a), a.json);
            client(conn, |c| tenant(c, a.cmd, json)).await
        }
        Command::Cell(a) => {
            let (conn, json) = (conn_of(&a), a.json);
            client(conn, |c| cell(c, a.cmd, json)).await
        }
        Command::Job(a) => {
            let (conn, json) = (conn_of(&a), a.json);
            client(conn, |c| job(c, a.cmd, json)).await
        }
        Command::Release(a) => {
            let (conn, json) = (conn_of(&a), a.json);
            client(conn, |c| releases::release(c, a.cmd, json)).await
        }
        Command::Template(a) => {
            if let TemplateCmd::Render { .. } = a.cmd {
                render_offline(a.cmd)
            } else {
                let (conn, json) = (conn_of(&a), a.json);
                client(conn, |c| template(c, a.cmd, json)).await
            }
        }
        Command::Audit(a) => {
            let (conn, json) = (conn_of(&a), a.json);
            client(conn, |c| audit(c, a.cmd, json)).await
        }
        Command::Token(a) => {
            let (conn, json) = (conn_of(&a), a.json);
            client(conn, |c| token(c, a.cmd, json)).await
        }
    };
    match result {
        Ok(()) => 0,
        Err(CliError::Usage(m)) => {
            eprintln!("error: {m}");
            2
        }
        Err(CliError::Client(e)) => {
            eprintln!("error: {e}");
            if let ClientError::Api(p) = &e {
                for f in &p.errors {
                    eprintln!("  {}: {}", f.field, f.message);
                }
            }
            1
        }
    }
}

/// `cellplane completion SHELL`: the script on stdout (a closed pipe, as with `| head`,
/// is not an error).
fn completion(shell: Shell) -> i32 {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "cellplane", &mut script);
    let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
    0
}

async fn serve(a: ServeArgs) -> i32 {
    let mut cfg = match crate::config::load_config(a.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if let Some(u) = a.database_url {
        cfg.database_url = Some(Secret::new(u));
    }
    if let Some(f) = a.log_format {
        cfg.log_format = if f == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    run_server(cfg, None).await
}

async fn up(a: UpArgs) -> i32 {
    let mut cfg = match crate::config::load_config(None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    cfg.listen = a.listen.clone();
    cfg.data_dir = a.data_dir.clone();
    run_server(cfg, Some(a)).await
}

async fn run_server(cfg: Config, up: Option<UpArgs>) -> i32 {
    let banner = up.is_some();
    crate::telemetry::init_tracing(cfg.log_format);
    let data_dir = cfg.data_dir.clone();
    let app = match Application::build(cfg).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            eprintln!("error: {e}");
            return 1;
        }
    };
    // Parents (tests, scripts) read this line to learn the bound port.
    println!("listening on http://{}", app.addr());
    let url = format!("http://{}", app.addr());
    // The router stops with this process (its handle's drop sends SIGTERM; it also exits
    // when its parent disappears).
    let mut _router = None;
    if let Some(up) = up.as_ref().filter(|u| !u.no_router) {
        match crate::local_router::start(
            app.service(),
            &url,
            &data_dir,
            &up.router_listen,
            &up.router_admin_listen,
            &up.base_domain,
        )
        .await
        {
            Ok(r) => _router = Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "the local router did not start; the control plane runs without it")
            }
        }
    }
    if banner {
        // `cellplane down` stops what these name.
        crate::down::write_pids(&data_dir, _router.as_ref().map(|r| r.pid()));
        println!();
        println!(
            "cellplane is up ({} store in {})",
            app.backend(),
            data_dir.display()
        );
        println!("  API:         {url}/v1  (OpenAPI: {url}/v1/openapi.json)");
        println!("  admin token: {}", app.admin_token_source());
        let router = _router
            .as_ref()
            .map(|r| r.url.clone())
            .unwrap_or_else(|| "http://ROUTER".into());
        match &_router {
            Some(r) => println!(
                "  router:      {} (admin {}/__router/healthz, log {})",
                r.url,
                r.admin_url,
                r.log.display()
            ),
            None => println!("  router:      not running"),
        }
        println!();
        println!("In another shell, from this directory:");
        println!("  export CELLPLANE_URL={url}");
        println!(
            "  export CELLPLANE_TOKEN=$(cat {})",
            data_dir.join("admin-token").display()
        );
        println!("  cellplane cell create euw1-pool-1 --region eu-west-1 --template local --wait");
        println!("  cellplane cell create euw1-pool-2 --region eu-west-1 --template local --wait");
        println!("  cellplane org create acme-corp --name 'Acme Corp'");
        println!("  for t in acme globex initech; do");
        println!("    cellplane tenant create $t --org acme-corp --region eu-west-1");
        println!("    cellplane tenant activate $t --wait");
        println!("  done");
        println!("  curl -X PUT -H 'Host: acme.localhost' --data-binary hello {router}/v1/kv/x");
        println!("  curl -i -H 'Host: acme.localhost' {router}/v1/kv/x   # X-Cell-ID: acme's cell");
        println!("  cellplane audit verify");
        println!("Stop with Ctrl-C.");
    }
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        trigger.cancel();
    });
    let stopped = app.run_until_stopped(shutdown).await;
    if banner {
        crate::down::remove_pids(&data_dir);
    }
    match stopped {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            1
        }
    }
}

#[derive(Debug)]
enum CliError {
    Usage(String),
    Client(ClientError),
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

type CliResult = Result<(), CliError>;

fn conn_of<T: Subcommand>(a: &ClientArgs<T>) -> (String, Option<String>) {
    (a.url.clone(), a.token.clone())
}

async fn client<F, Fut>(conn: (String, Option<String>), f: F) -> CliResult
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = CliResult>,
{
    let (url, token) = conn;
    let token = match token {
        Some(t) => Some(t),
        None => std::fs::read_to_string(".cellplane/admin-token")
            .ok()
            .map(|s| s.trim().to_string()),
    };
    if token.is_none() {
        return Err(CliError::Usage(
            "no token: set CELLPLANE_TOKEN or pass --token".into(),
        ));
    }
    f(Client::new(url, token)).await
}

fn parse_json_arg<T: serde::de::DeserializeOwned>(
    flag: &str,
    s: Option<String>,
) -> Result<Option<T>, CliError> {
    s.map(|s| serde_json::from_str(&s).map_err(|e| CliError::Usage(format!("--{flag}: {e}"))))
        .transpose()
}

fn id_arg(flag: &str, s: &str) -> Result<Id, CliError> {
    Id::parse(s).map_err(|e| CliError::Usage(format!("{flag} {s:?}: {e}")))
}

fn kv_args(flag: &str, items: &[String]) -> Result<Vec<(String, String)>, CliError> {
    items
        .iter()
        .map(|i| {
            i.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::Usage(format!("--{flag} {i:?}: expected key=value")))
        })
        .collect()
}

fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let parts: Vec<(&str, &str)> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (*k, v)))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(
            "?{}",
            serde_urlencoded::to_string(parts).unwrap_or_default()
        )
    }
}

fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into())
    );
}

/// A query parameter value, percent-encoded.
fn enc(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

fn tenant_rows(ts: &[Tenant]) {
    print_table(
        &[
            "tenant",
            "organization",
            "profile",
            "state",
            "region",
            "cells",
            "version",
        ],
        ts.iter()
            .map(|t| {
                let cells: Vec<String> = t
                    .environments
                    .iter()
                    .map(|e| format!("{}={}", e.name, opt(&e.cell_id)))
                    .collect();
                vec![
                    t.tenant_id.clone(),
                    t.organization_id.clone(),
                    t.profile.as_str().into(),
                    t.state.as_str().into(),
                    t.region.clone(),
                    cells.join(","),
                    t.version.to_string(),
                ]
            })
            .collect(),
    );
}

fn job_rows(js: &[Job]) {
    print_table(
        &[
            "job", "kind", "target", "state", "progress", "attempts", "error",
        ],
        js.iter()
            .map(|j| {
                vec![
                    j.job_id.clone(),
                    j.kind.clone(),
                    j.target.clone(),
                    j.state.as_str().into(),
                    format!("{:.0}%", j.progress * 100.0),
                    j.attempts.to_string(),
                    opt(&j.error),
                ]
            })
            .collect(),
    );
}

fn cell_rows(cs: &[Cell]) {
    print_table(
        &[
            "cell", "region", "tier", "template", "state", "tenants", "units", "version",
        ],
        cs.iter()
            .map(|c| {
                vec![
                    c.cell_id.clone(),
                    c.region.clone(),
                    c.tier.as_str().into(),
                    c.template.clone(),
                    c.state.as_str().into(),
                    format!("{}/{}", c.used.tenants, c.capacity.tenants),
                    format!("{}/{}", c.used.units, c.capacity.units),
                    c.version.to_string(),
                ]
            })
            .collect(),
    );
}

async fn org(c: Client, cmd: OrgCmd, json: bool) -> CliResult {
    let orgs: Vec<Organization> = match cmd {
        OrgCmd::Create { id, name } => vec![
            c.create_organization(&CreateOrganization {
                organization_id: id_arg("organization", &id)?,
                name,
            })
            .await?,
        ],
        OrgCmd::List => c.all("/v1/organizations").await?,
        OrgCmd::Get { id } => vec![
            c.get(&format!(
                "/v1/organizations/{}",
                id_arg("organization", &id)?
            ))
            .await?,
        ],
    };
    if json {
        print_json(&orgs);
    } else {
        print_table(
            &["organization", "name", "created"],
            orgs.iter()
                .map(|o| {
                    vec![
                        o.organization_id.clone(),
                        o.name.clone(),
                        o.created_at.clone(),
                    ]
                })
                .collect(),
        );
    }
    Ok(())
}

fn move_rows(moves: &[cellplane_api::Move]) {
    print_table(
        &[
            "MOVE", "TENANT", "ENV", "FROM", "TO", "STATE", "STEP", "ROWS", "ROUNDS", "HOLD_MS",
        ],
        moves
            .iter()
            .map(|m| {
                vec![
                    m.move_id.clone(),
                    m.tenant_id.clone(),
                    m.env.clone(),
                    m.source_cell_id.clone(),
                    m.target_cell_id.clone(),
                    m.state.as_str().to_string(),
                    m.step.clone(),
                    m.rows_copied.to_string(),
                    m.delta_rounds.to_string(),
                    m.hold_ms
                        .map(|h| h.to_string())
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    );
}

/// Follows a move until the tenant is served from the target (the purge of the source
/// follows after its grace period) or the move ended; prints a line per change.
async fn follow_move(c: &Client, id: &str, json: bool) -> Result<cellplane_api::Move, CliError> {
    let mut last = String::new();
    loop {
        let m: cellplane_api::Move = c.get(&format!("/v1/moves/{id}")).await?;
        let line = format!(
            "{} · step {} · {} record(s), {} byte(s) copied · {} delta round(s){}",
            m.state.as_str(),
            m.step,
            m.rows_copied,
            m.bytes_copied,
            m.delta_rounds,
            m.current_delta
                .map(|d| format!(" · delta {d}"))
                .unwrap_or_default()
        );
        if line != last && !json {
            eprintln!("{line}");
            last = line;
        }
        let flipped = m.step == "flip" || m.step == "purge-source";
        if m.state != cellplane_api::MoveState::Running || flipped && m.hold_ms.is_some() {
            if m.state == cellplane_api::MoveState::Running && !json {
                eprintln!(
                    "moved: {}/{} is served from {} (held {} ms); the source is purged after its grace period",
                    m.tenant_id,
                    m.env,
                    m.target_cell_id,
                    m.hold_ms.unwrap_or(0)
                );
            }
            return Ok(m);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

async fn wait_and_show(c: &Client, job: Job, wait: bool, json: bool) -> CliResult {
    let job = if wait {
        watch(c, &job.job_id, json).await?
    } else {
        job
    };
    if json {
        print_json(&job);
    } else {
        job_rows(std::slice::from_ref(&job));
    }
    if wait && job.state != JobState::Succeeded {
        return Err(CliError::Usage(format!(
            "job {} ended {}: {}",
            job.job_id,
            job.state.as_str(),
            opt(&job.error)
        )));
    }
    Ok(())
}

async fn tenant(c: Client, cmd: TenantCmd, json: bool) -> CliResult {
    let action = |a: ActionArgs, action: LifecycleAction| (a, action);
    let (args, act) = match cmd {
        TenantCmd::Create {
            id,
            org,
            profile,
            region,
            quotas,
            policies,
            billing,
        } => {
            let req = CreateTenant {
                tenant_id: id_arg("tenant", &id)?,
                organization_id: id_arg("--org", &org)?,
                profile: Profile::parse(&profile).ok_or_else(|| {
                    CliError::Usage("--profile must be mt-standard, st-dedicated or st-byoc".into())
                })?,
                region: id_arg("--region", &region)?,
                quotas: parse_json_arg("quotas", quotas)?.unwrap_or_default(),
                policies: parse_json_arg("policies", policies)?.unwrap_or_default(),
                billing: parse_json_arg("billing", billing)?.unwrap_or_default(),
            };
            let t = c.create_tenant(&req).await?;
            if json {
                print_json(&t);
            } else {
                tenant_rows(&[t]);
            }
            return Ok(());
        }
        TenantCmd::List {
            state,
            region,
            org,
            cell,
        } => {
            let q = query(&[
                ("state", &state),
                ("region", &region),
                ("organization_id", &org),
                ("cell_id", &cell),
            ]);
            let ts: Vec<Tenant> = c.all(&format!("/v1/tenants{q}")).await?;
            if json {
                print_json(&ts);
            } else {
                tenant_rows(&ts);
            }
            return Ok(());
        }
        TenantCmd::Get { id } => {
            let t = c.get_tenant(id_arg("tenant", &id)?.as_str()).await?;
            if json {
                print_json(&t);
            } else {
                tenant_rows(std::slice::from_ref(&t));
                println!();
                print_table(
                    &["env", "region", "isolation", "cell", "endpoint"],
                    t.environments
                        .iter()
                        .map(|e| {
                            vec![
                                e.name.clone(),
                                e.region.clone(),
                                e.isolation_level.clone(),
                                opt(&e.cell_id),
                                opt(&e.endpoint),
                            ]
                        })
                        .collect(),
                );
            }
            return Ok(());
        }
        TenantCmd::Patch {
            id,
            quotas,
            policies,
            billing,
            if_match,
        } => {
            let body = PatchTenant {
                profile: None,
                quotas: parse_json_arg("quotas", quotas)?,
                policies: parse_json_arg("policies", policies)?,
                billing: parse_json_arg("billing", billing)?,
            };
            let mut rb = c
                .request(
                    reqwest::Method::PATCH,
                    &format!("/v1/tenants/{}", id_arg("tenant", &id)?),
                )
                .json(&body);
            if let Some(v) = if_match {
                rb = rb.header("If-Match", format!("\"{v}\""));
            }
            let resp = rb.send().await.map_err(ClientError::from)?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(ClientError::from)?;
            if !status.is_success() {
                return Err(CliError::Client(
                    match serde_json::from_slice::<Problem>(&bytes) {
                        Ok(p) => ClientError::Api(Box::new(p)),
                        Err(_) => ClientError::Unexpected {
                            status: status.as_u16(),
                            body: String::from_utf8_lossy(&bytes).into(),
                        },
                    },
                ));
            }
            let t: Tenant = serde_json::from_slice(&bytes).map_err(|e| {
                CliError::Client(ClientError::Unexpected {
                    status: status.as_u16(),
                    body: e.to_string(),
                })
            })?;
            if json {
                print_json(&t);
            } else {
                tenant_rows(&[t]);
            }
            return Ok(());
        }
        TenantCmd::EnvAdd {
            id,
            name,
            region,
            isolation,
            wait,
        } => {
            let id = id_arg("tenant", &id)?;
            let mut body = serde_json::json!({"name": name, "isolation_level": isolation});
            if let Some(r) = region {
                body["region"] = serde_json::Value::String(r);
            }
            let env: cellplane_api::Environment = c
                .post(&format!("/v1/tenants/{id}/environments"), &body)
                .await?;
            match &env.placement_job_id {
                Some(job) => {
                    if !json {
                        println!("environment {} added; placement job {job}", env.name);
                    }
                    let job = c.get_job(job).await?;
                    return wait_and_show(&c, job, wait, json).await;
                }
                None => {
                    if json {
                        print_json(&env);
                    } else {
                        println!(
                            "environment {} added; it is placed when the tenant is activated or resumed",
                            env.name
                        );
                    }
                    return Ok(());
                }
            }
        }
        TenantCmd::Usage {
            id,
            meter,
            env,
            granularity,
            from,
            to,
        } => {
            let id = id_arg("tenant", &id)?;
            let mut q = format!("/v1/usage?tenant_id={id}&granularity={}", enc(&granularity));
            for (k, v) in [
                ("meter", &meter),
                ("env", &env),
                ("from", &from),
                ("to", &to),
            ] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={}", enc(v)));
                }
            }
            let report: cellplane_api::UsageReport = c.get(&q).await?;
            if json {
                print_json(&report);
            } else {
                print_table(
                    &["START", "ENV", "METER", "AMOUNT"],
                    report
                        .items
                        .iter()
                        .map(|p| {
                            vec![
                                p.start.clone(),
                                p.env.clone(),
                                p.meter.clone(),
                                p.amount.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
            return Ok(());
        }
        TenantCmd::Move {
            id,
            env,
            to,
            dedicated,
            wait,
        } => {
            let id = id_arg("tenant", &id)?;
            let req = cellplane_api::MoveRequest {
                env: id_arg("--env", &env)?.to_string(),
                target_cell_id: to
                    .map(|t| id_arg("--to", &t).map(|i| i.to_string()))
                    .transpose()?,
                target: dedicated.then(|| "dedicated".to_string()),
            };
            let out: cellplane_api::MoveWithJob =
                c.post(&format!("/v1/tenants/{id}/move"), &req).await?;
            let m = if wait {
                follow_move(&c, &out.move_.move_id, json).await?
            } else {
                out.move_
            };
            if json {
                print_json(&m);
            } else {
                move_rows(std::slice::from_ref(&m));
            }
            return match m.state {
                cellplane_api::MoveState::RolledBack | cellplane_api::MoveState::Failed => {
                    Err(CliError::Usage(format!(
                        "move {} {}: {}",
                        m.move_id,
                        m.state.as_str(),
                        opt(&m.error)
                    )))
                }
                _ => Ok(()),
            };
        }
        TenantCmd::Moves {
            tenant,
            state,
            cell,
            id,
        } => {
            if let Some(mid) = id {
                let m: cellplane_api::Move = c.get(&format!("/v1/moves/{}", enc(&mid))).await?;
                if json {
                    print_json(&m);
                } else {
                    move_rows(std::slice::from_ref(&m));
                    println!(
                        "evidence: {}",
                        serde_json::to_string_pretty(&m.evidence).unwrap_or_default()
                    );
                }
                return Ok(());
            }
            let q = query(&[
                ("tenant_id", &tenant),
                ("state", &state),
                ("cell_id", &cell),
            ]);
            let moves: Vec<cellplane_api::Move> = c.all(&format!("/v1/moves{q}")).await?;
            if json {
                print_json(&moves);
            } else {
                move_rows(&moves);
            }
            return Ok(());
        }
        TenantCmd::Activate(a) => action(a, LifecycleAction::Activate),
        TenantCmd::Suspend(a) => action(a, LifecycleAction::Suspend),
        TenantCmd::Resume(a) => action(a, LifecycleAction::Resume),
        TenantCmd::Archive(a) => action(a, LifecycleAction::Archive),
        TenantCmd::Delete(a) => action(a, LifecycleAction::Delete),
    };
    let id = id_arg("tenant", &args.id)?;
    let path = format!(
        "/v1/tenants/{id}/{}{}",
        act.as_str(),
        if args.force { "?force=true" } else { "" }
    );
    let job: Job = c.post(&path, &serde_json::json!({})).await?;
    wait_and_show(&c, job, args.wait, json).await
}

async fn cell(c: Client, cmd: CellCmd, json: bool) -> CliResult {
    let (out, wait): (CellWithJob, bool) = match cmd {
        CellCmd::Create {
            id,
            region,
            tier,
            template,
            capacity_tenants,
            capacity_units,
            labels,
            vars,
            app_version,
            wait,
        } => {
            let req = CreateCell {
                cell_id: id_arg("cell", &id)?,
                region: id_arg("--region", &region)?,
                tier: Tier::parse(&tier)
                    .ok_or_else(|| CliError::Usage("--tier must be pooled or dedicated".into()))?,
                template: id_arg("--template", &template)?,
                capacity: Capacity {
                    tenants: capacity_tenants,
                    units: capacity_units,
                },
                labels: kv_args("label", &labels)?.into_iter().collect(),
                vars: json_vars(&vars)?,
                app_version,
            };
            (c.create_cell(&req).await?, wait)
        }
        CellCmd::List {
            region,
            tier,
            state,
        } => {
            let q = query(&[("region", &region), ("tier", &tier), ("state", &state)]);
            let cells: Vec<Cell> = c.all(&format!("/v1/cells{q}")).await?;
            if json {
                print_json(&cells);
            } else {
                cell_rows(&cells);
            }
            return Ok(());
        }
        CellCmd::Get { id } => {
            let cell: Cell = c
                .get(&format!("/v1/cells/{}", id_arg("cell", &id)?))
                .await?;
            if json {
                print_json(&cell);
            } else {
                cell_detail(&cell);
            }
            return Ok(());
        }
        CellCmd::Update {
            id,
            app_version,
            vars,
            labels,
            capacity_tenants,
            capacity_units,
            wait,
        } => {
            let capacity = if capacity_tenants.is_some() || capacity_units.is_some() {
                let current: Cell = c
                    .get(&format!("/v1/cells/{}", id_arg("cell", &id)?))
                    .await?;
                Some(Capacity {
                    tenants: capacity_tenants.unwrap_or(current.capacity.tenants),
                    units: capacity_units.unwrap_or(current.capacity.units),
                })
            } else {
                None
            };
            let body = PatchCell {
                capacity,
                labels: if labels.is_empty() {
                    None
                } else {
                    Some(kv_args("label", &labels)?.into_iter().collect())
                },
                vars: if vars.is_empty() {
                    None
                } else {
                    Some(json_vars(&vars)?)
                },
                app_version,
            };
            let cell: Cell = c
                .patch(&format!("/v1/cells/{}", id_arg("cell", &id)?), &body)
                .await?;
            let job = match &cell.pending_job_id {
                Some(j) => Some(c.get_job(j).await?),
                None => None,
            };
            (CellWithJob { cell, job }, wait)
        }
        CellCmd::Apply { id, wait } => (
            c.post(
                &format!("/v1/cells/{}/apply", id_arg("cell", &id)?),
                &serde_json::json!({}),
            )
            .await?,
            wait,
        ),
        CellCmd::Plan { id, wait } => (
            c.post(
                &format!("/v1/cells/{}/plan", id_arg("cell", &id)?),
                &serde_json::json!({}),
            )
            .await?,
            wait,
        ),
        CellCmd::Drain {
            id,
            move_tenants,
            wait,
        } => {
            let id = id_arg("cell", &id)?;
            if move_tenants {
                let out: CellWithJob = c
                    .post(
                        &format!("/v1/cells/{id}/drain?move=true"),
                        &serde_json::json!({}),
                    )
                    .await?;
                (out, wait)
            } else {
                let cell: Cell = c
                    .post(&format!("/v1/cells/{id}/drain"), &serde_json::json!({}))
                    .await?;
                (CellWithJob { cell, job: None }, false)
            }
        }
        CellCmd::Delete { id, wait } => (
            c.delete(&format!("/v1/cells/{}", id_arg("cell", &id)?))
                .await?,
            wait,
        ),
    };
    let Some(job) = out.job.clone().filter(|_| wait) else {
        if json {
            print_json(&out);
        } else {
            cell_rows(std::slice::from_ref(&out.cell));
            if let Some(j) = &out.job {
                println!();
                job_rows(std::slice::from_ref(j));
                println!();
                println!("follow it with: cellplane job watch {}", j.job_id);
            }
        }
        return Ok(());
    };
    let job = watch(&c, &job.job_id, json).await?;
    let cell: Cell = c.get(&format!("/v1/cells/{}", out.cell.cell_id)).await?;
    if json {
        print_json(&CellWithJob {
            cell: cell.clone(),
            job: Some(job.clone()),
        });
    } else {
        cell_detail(&cell);
    }
    if job.state != JobState::Succeeded {
        return Err(CliError::Usage(format!(
            "job {} ended {}: {}",
            job.job_id,
            job.state.as_str(),
            opt(&job.error)
        )));
    }
    Ok(())
}

fn json_vars(items: &[String]) -> Result<BTreeMap<String, serde_json::Value>, CliError> {
    Ok(kv_args("var", items)?
        .into_iter()
        .map(|(k, v)| {
            let val = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
            (k, val)
        })
        .collect())
}

fn cell_detail(c: &Cell) {
    cell_rows(std::slice::from_ref(c));
    if let Some(j) = &c.pending_job_id {
        println!("job in progress: {j}");
    }
    if !c.outputs.is_empty() {
        println!();
        print_table(
            &["output", "value"],
            c.outputs
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    vec![k.clone(), v]
                })
                .collect(),
        );
    }
    if let Some(d) = &c.drift {
        println!();
        let resources: Vec<String> = d["resources"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if d["detected"] == true {
            println!(
                "DRIFT detected at {}: {}",
                d["checked_at"].as_str().unwrap_or("?"),
                resources.join(", ")
            );
        } else {
            println!(
                "no drift (checked at {})",
                d["checked_at"].as_str().unwrap_or("?")
            );
        }
    }
}

/// Follows a job through its server-sent events (`/v1/jobs/{id}/events`): a progress bar
/// on a terminal, and the job's log lines (terraform's resource lines) as they come.
/// Falls back to polling when the stream is unavailable.
async fn watch(c: &Client, id: &str, json: bool) -> Result<Job, CliError> {
    use futures_util::StreamExt;
    use std::io::IsTerminal;
    let tty = !json && std::io::stderr().is_terminal();
    let bar = if tty {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos:>3}% {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_prefix(id.to_string());
        Some(b)
    } else {
        None
    };
    let say = |line: &str| {
        if json {
            return;
        }
        match &bar {
            Some(b) => b.println(format!("  {line}")),
            None => eprintln!("  {line}"),
        }
    };
    loop {
        let resp = c
            .request(reqwest::Method::GET, &format!("/v1/jobs/{id}/events"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(ClientError::from)?;
        if !resp.status().is_success() {
            return poll_watch(c, id, json).await;
        }
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let (mut event, mut data) = (String::new(), String::new());
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(nl) = buf.find('\n') {
                let line = buf[..nl].trim_end_matches('\r').to_string();
                buf.drain(..=nl);
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                } else if line.is_empty() && !event.is_empty() {
                    match event.as_str() {
                        "log" => say(data.split_once(' ').map(|(_, l)| l).unwrap_or(&data)),
                        "progress" => {
                            if let (Some(b), Ok(p)) =
                                (&bar, serde_json::from_str::<serde_json::Value>(&data))
                            {
                                b.set_position(
                                    (p["progress"].as_f64().unwrap_or(0.0) * 100.0) as u64,
                                );
                                b.set_message(format!(
                                    "{} {}",
                                    p["state"].as_str().unwrap_or(""),
                                    p["step"].as_str().unwrap_or("")
                                ));
                            }
                        }
                        "end" => {
                            if let Ok(job) = serde_json::from_str::<Job>(&data) {
                                if let Some(b) = &bar {
                                    b.finish_with_message(job.state.as_str().to_string());
                                }
                                return Ok(job);
                            }
                        }
                        _ => {}
                    }
                    event.clear();
                    data.clear();
                } else if line.is_empty() {
                    data.clear();
                }
            }
        }
        // The stream ended early (server restart): the job may have ended meanwhile.
        let job = c.get_job(id).await?;
        if job.state.is_terminal() {
            if let Some(b) = &bar {
                b.finish_with_message(job.state.as_str().to_string());
            }
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Polls a job and prints each new log line until it ends.
async fn poll_watch(c: &Client, id: &str, json: bool) -> Result<Job, CliError> {
    let mut printed = 0usize;
    loop {
        let job = c.get_job(id).await?;
        if !json {
            let log = c.get_text(&format!("/v1/jobs/{id}/log")).await?;
            let lines: Vec<&str> = log.lines().collect();
            for l in lines.iter().skip(printed) {
                eprintln!("  {l}");
            }
            printed = printed.max(lines.len());
        }
        if job.state.is_terminal() {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn job(c: Client, cmd: JobCmd, json: bool) -> CliResult {
    let jobs: Vec<Job> = match cmd {
        JobCmd::List { target, state } => {
            let q = query(&[("target", &target), ("state", &state)]);
            c.all(&format!("/v1/jobs{q}")).await?
        }
        JobCmd::Get { id } => vec![c.get_job(id_arg("job", &id)?.as_str()).await?],
        JobCmd::Log { id } => {
            print!(
                "{}",
                c.get_text(&format!("/v1/jobs/{}/log", id_arg("job", &id)?))
                    .await?
            );
            return Ok(());
        }
        JobCmd::Cancel { id } => vec![
            c.post(
                &format!("/v1/jobs/{}/cancel", id_arg("job", &id)?),
                &serde_json::json!({}),
            )
            .await?,
        ],
        JobCmd::Watch { id } => vec![watch(&c, id_arg("job", &id)?.as_str(), json).await?],
    };
    if json {
        print_json(&jobs);
    } else {
        job_rows(&jobs);
    }
    Ok(())
}

async fn template(c: Client, cmd: TemplateCmd, json: bool) -> CliResult {
    match cmd {
        TemplateCmd::List => {
            let page: Page<TemplateInfo> = c.get("/v1/templates").await?;
            if json {
                print_json(&page.items);
            } else {
                print_table(
                    &["template", "tiers", "variables", "description"],
                    page.items
                        .iter()
                        .map(|t| {
                            vec![
                                t.name.clone(),
                                t.tiers
                                    .iter()
                                    .map(|t| t.as_str())
                                    .collect::<Vec<_>>()
                                    .join(","),
                                t.variables.len().to_string(),
                                t.description.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        TemplateCmd::Show { name } => {
            let t: TemplateInfo = c
                .get(&format!("/v1/templates/{}", id_arg("template", &name)?))
                .await?;
            if json {
                print_json(&t);
            } else {
                println!("{}: {}", t.name, t.description);
                let tiers: Vec<&str> = t.tiers.iter().map(|t| t.as_str()).collect();
                println!("tiers: {}", tiers.join(", "));
                println!("required outputs: {}", t.required_outputs.join(", "));
                println!();
                print_table(
                    &["variable", "type", "default", "rule", "description"],
                    t.variables
                        .iter()
                        .map(|v| {
                            let default = match (&v.managed_by, &v.default) {
                                (Some(m), _) => format!("(managed: {m})"),
                                (None, Some(d)) => d.to_string(),
                                (None, None) => "(required)".into(),
                            };
                            vec![
                                v.name.clone(),
                                v.type_.clone(),
                                default,
                                v.validation
                                    .as_ref()
                                    .map(|r| r.to_string())
                                    .unwrap_or_default(),
                                v.description.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        TemplateCmd::Render { .. } => return render_offline(cmd),
    }
    Ok(())
}

/// `cellplane template render`: the stack a stamp job would run, without a server.
fn render_offline(cmd: TemplateCmd) -> CliResult {
    let TemplateCmd::Render {
        name,
        cell_id,
        region,
        tier,
        vars,
        app_version,
        out,
        templates_dir,
        sample_cell_bin,
    } = cmd
    else {
        return Err(CliError::Usage("not a render command".into()));
    };
    // Removes the built-in templates written out for this render.
    struct TempDir(Option<PathBuf>);
    impl Drop for TempDir {
        fn drop(&mut self) {
            if let Some(d) = &self.0 {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    let mut builtin = TempDir(None);
    let dir = match templates_dir {
        Some(d) => d,
        None if std::path::Path::new("cell-templates").is_dir() => PathBuf::from("cell-templates"),
        None => {
            let tmp = std::env::temp_dir().join(format!(
                "cellplane-render-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            builtin.0 = Some(tmp.clone());
            crate::iac::builtin::materialize(&tmp)
                .map_err(|e| CliError::Usage(format!("cannot write the built-in templates: {e}")))?
        }
    };
    let catalog = crate::iac::Catalog::new(dir);
    let template = catalog
        .load(id_arg("template", &name)?.as_str())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut user_vars: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (k, v) in kv_args("var", &vars)? {
        let val = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
        user_vars.insert(k, val);
    }
    if let Err(errors) = template.validate_vars(&user_vars) {
        let msg: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        return Err(CliError::Usage(msg.join("; ")));
    }
    let mut secrets = BTreeMap::new();
    for (k, spec) in &template.manifest.variables {
        match spec.source {
            Some(crate::iac::VarSource::Port) => {
                let port =
                    crate::iac::allocate_port(crate::iac::DEFAULT_PORT_RANGE, &Default::default())
                        .map_err(|e| CliError::Usage(format!("cannot allocate a port: {e}")))?;
                user_vars.insert(k.clone(), serde_json::json!(port));
            }
            Some(crate::iac::VarSource::Secret) => {
                secrets.insert(k.clone(), serde_json::json!(crate::auth::new_secret()));
            }
            _ => {}
        }
    }
    let now = crate::persistence::now();
    let cell = Cell {
        cell_id: id_arg("--cell-id", &cell_id)?.into_string(),
        region: id_arg("--region", &region)?.into_string(),
        tier: Tier::parse(&tier)
            .ok_or_else(|| CliError::Usage("--tier must be pooled or dedicated".into()))?,
        template: template.name.clone(),
        capacity: Capacity {
            tenants: 1,
            units: 1,
        },
        used: Capacity::default(),
        labels: BTreeMap::new(),
        vars: user_vars,
        state: CellState::Pending,
        outputs: BTreeMap::new(),
        app_version,
        drift: None,
        pending_job_id: None,
        version: 1,
        created_at: now.clone(),
        updated_at: now,
    };
    let out_abs = std::path::absolute(&out).unwrap_or(out.clone());
    let stack = template
        .render(&crate::iac::RenderInput {
            cell: &cell,
            secrets: &secrets,
            system: crate::iac::SystemValues {
                cell_dir: out_abs.join("run"),
                sample_cell_bin: crate::stamping::find_sample_cell(sample_cell_bin.as_ref()),
            },
            pg_backend: false,
        })
        .map_err(|e| CliError::Usage(e.to_string()))?;
    stack
        .write(&out)
        .map_err(|e| CliError::Usage(format!("{}: {e}", out.display())))?;
    for f in stack.files.keys() {
        println!("{}", out.join(f).display());
    }
    Ok(())
}

async fn audit(c: Client, cmd: AuditCmd, json: bool) -> CliResult {
    match cmd {
        AuditCmd::List {
            tenant,
            target,
            limit,
        } => {
            let lim = limit.map(|l| l.to_string());
            let q = query(&[("tenant_id", &tenant), ("target", &target), ("limit", &lim)]);
            let recs: Vec<AuditRecord> = if limit.is_some() {
                c.get::<Page<AuditRecord>>(&format!("/v1/audit{q}"))
                    .await?
                    .items
            } else {
                c.all(&format!("/v1/audit{q}")).await?
            };
            if json {
                print_json(&recs);
            } else {
                print_table(
                    &["seq", "time", "event", "target", "actor", "correlation"],
                    recs.iter()
                        .map(|r| {
                            vec![
                                r.seq.to_string(),
                                r.occurred_at.clone(),
                                r.event_type.clone(),
                                r.target.clone(),
                                r.actor.clone(),
                                opt(&r.correlation_id),
                            ]
                        })
                        .collect(),
                );
            }
            Ok(())
        }
        AuditCmd::Verify => {
            let v = c.audit_verify().await?;
            if json {
                print_json(&v);
            } else if v.ok {
                println!("audit chain intact: {} records", v.records);
            } else {
                println!(
                    "audit chain BROKEN at record {}: {}",
                    v.broken_seq.unwrap_or_default(),
                    v.reason.clone().unwrap_or_default()
                );
            }
            if v.ok {
                Ok(())
            } else {
                Err(CliError::Usage("audit verification failed".into()))
            }
        }
    }
}

async fn token(c: Client, cmd: TokenCmd, json: bool) -> CliResult {
    match cmd {
        TokenCmd::Create {
            role,
            tenant,
            description,
        } => {
            let req = CreateToken {
                role: Role::parse(&role).ok_or_else(|| {
                    CliError::Usage(
                        "--role must be admin, operator, viewer, router or tenant-admin".into(),
                    )
                })?,
                tenant_id: tenant.map(|t| id_arg("--tenant", &t)).transpose()?,
                description,
            };
            let t = c.create_token(&req).await?;
            if json {
                print_json(&t);
            } else {
                println!(
                    "token {} ({}) created; the secret is shown once:",
                    t.info.token_id,
                    t.info.role.as_str()
                );
                println!("{}", t.token);
            }
            Ok(())
        }
        TokenCmd::List => {
            let ts: Vec<TokenInfo> = c.all("/v1/tokens").await?;
            if json {
                print_json(&ts);
            } else {
                print_table(
                    &["token", "role", "tenant", "created", "revoked"],
                    ts.iter()
                        .map(|t| {
                            vec![
                                t.token_id.clone(),
                                t.role.as_str().into(),
                                opt(&t.tenant_id),
                                t.created_at.clone(),
                                opt(&t.revoked_at),
                            ]
                        })
                        .collect(),
                );
            }
            Ok(())
        }
        TokenCmd::Revoke { id } => {
            let t: TokenInfo = c
                .delete(&format!("/v1/tokens/{}", id_arg("token", &id)?))
                .await?;
            if json {
                print_json(&t);
            } else {
                println!("token {} revoked", t.token_id);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every command and every argument has a one-line description in `--help`.
    #[test]
    fn every_command_and_argument_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg
                    .get_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default()
                    .trim()
                    .is_empty()
                {
                    missing.push(format!("{path} <{id}>"));
                }
            }
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help"
                    && sub
                        .get_about()
                        .map(|h| h.to_string())
                        .unwrap_or_default()
                        .trim()
                        .is_empty()
                {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "cellplane", &mut missing);
        assert!(missing.is_empty(), "without a description: {missing:#?}");
    }

    #[test]
    fn main_commands_show_an_example() {
        let mut cmd = Cli::command();
        cmd.build();
        for path in [
            &["up"][..],
            &["serve"],
            &["tenant", "create"],
            &["tenant", "activate"],
            &["cell", "create"],
        ] {
            let mut c = &cmd;
            for p in path {
                c = c.find_subcommand(p).unwrap();
            }
            let after = c
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(after.contains("cellplane "), "{path:?}: {after:?}");
        }
    }
}
