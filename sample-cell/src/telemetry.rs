//! Logging setup: `tracing` to stderr, filtered by `SAMPLE_CELL_LOG` (default `info`).
//!
//! Stdout is reserved for the one `listening on http://ADDR` line a parent process reads,
//! so logs must never go to stdout.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_env("SAMPLE_CELL_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
