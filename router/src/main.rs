//! `cellplane-router`: parses the command line, builds the application and runs it.

use clap::Parser;
use std::io::IsTerminal as _;
use tokio_util::sync::CancellationToken;

/// Control work (watch, heartbeats, state file, admin) runs here; tenant traffic runs on
/// the workers' own runtimes (see `startup`).
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cfg = cellplane_router::config::Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hyper=warn,reqwest=warn"));
    let ansi = cellplane_router::startup::log_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = if cfg.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    let exit_with_parent = cfg.exit_with_parent;
    let app = match cellplane_router::startup::Application::build(cfg).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    // Parents (tests, scripts) read these lines to learn the bound ports.
    println!("listening on http://{}", app.addr());
    println!("admin listening on http://{}", app.admin_addr());
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        cellplane_router::startup::shutdown_signal().await;
        trigger.cancel();
    });
    if exit_with_parent {
        let parent = std::os::unix::process::parent_id();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                if std::os::unix::process::parent_id() != parent {
                    tracing::info!("parent process exited; shutting down");
                    trigger.cancel();
                    break;
                }
            }
        });
    }
    app.run_until_stopped(shutdown).await;
}
