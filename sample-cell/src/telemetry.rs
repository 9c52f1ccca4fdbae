//! Logging setup: `tracing` to stderr, filtered by `SAMPLE_CELL_LOG` (default `info`).
//!
//! Stdout is reserved for the one `listening on http://ADDR` line a parent process reads,
//! so logs must never go to stdout. Colour only on a terminal, and never with `NO_COLOR`.

use std::ffi::OsStr;
use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_env("SAMPLE_CELL_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// Whether log lines get colour escape codes: only when stderr is a terminal, and never
/// when `NO_COLOR` is set and not empty (<https://no-color.org>).
pub fn colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && !matches!(no_color, Some(v) if !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
