//! The `sample-cell` binary: parse flags, start logging, build the application, announce
//! the bound address on stdout and serve until SIGTERM or Ctrl-C.
//!
//! Only wiring lives here; bad flags exit with code 2 (clap), startup failures with 1.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use sample_cell::{telemetry, Application, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    telemetry::init();
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(error = %err, "startup failed");
            eprintln!("sample-cell: {err}");
            return ExitCode::from(1);
        }
    };
    let addr = app.local_addr();
    tracing::info!(%addr, "listening");
    let mut stdout = std::io::stdout().lock();
    let announced = writeln!(stdout, "listening on http://{addr}").and_then(|()| stdout.flush());
    drop(stdout);
    if let Err(err) = announced {
        tracing::warn!(error = %err, "cannot print the listening address to stdout");
    }
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "server failed");
            ExitCode::from(1)
        }
    }
}
