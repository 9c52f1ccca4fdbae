//! The IaC engine: cell templates rendered with Tera into a terraform stack, and the runner
//! that drives `terraform`/`tofu` over it. This is the only module that spawns terraform.
//!
//! It must never let a user-supplied value become code: identifiers are validated before
//! they get here, template variables reach terraform only through
//! `cellplane.auto.tfvars.json`, anything a template prints goes through the HCL escaper,
//! and the rendered stack is re-parsed before it runs. It knows nothing of the registry:
//! callers hand it a cell and get back events and outputs.

pub mod builtin;
pub mod runner;
pub mod template;

pub use runner::{
    Drift, ExecEvent, OutputValue, PlanMode, PlanOutcome, RunCtx, StateBackend, Terraform,
};
pub use template::{
    hcl_escape, Catalog, RenderInput, RenderedStack, SystemValues, Template, TemplateError,
    VarSource,
};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IacError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Terraform ran and reported errors; the message carries its diagnostics.
    #[error("terraform {phase} failed: {diagnostics}")]
    Terraform {
        phase: &'static str,
        diagnostics: String,
        /// The state lock was busy: another attempt may succeed.
        lock_busy: bool,
    },
    #[error("terraform {phase} was cancelled")]
    Cancelled { phase: &'static str },
    /// The control plane is stopping: terraform keeps running and the next lease holder
    /// waits for it.
    #[error("terraform {phase} left running for the next lease holder")]
    Detached { phase: &'static str },
    #[error("terraform {phase} produced unexpected output: {message}")]
    Output {
        phase: &'static str,
        message: String,
    },
}

impl IacError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IacError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Ports the control plane hands to cells (`source = "port"`), by default below the
/// kernel's ephemeral range (32768–60999 on Linux) so that no outgoing connection can take
/// a cell's port between its allocation and the process binding it.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (20000, 29999);

/// Picks a free TCP port on 127.0.0.1 in `range` that no other cell holds (`in_use`): a
/// random candidate is bound and released. The cell keeps the port for its life.
pub fn allocate_port(
    range: (u16, u16),
    in_use: &std::collections::HashSet<u16>,
) -> std::io::Result<u16> {
    use rand::Rng;
    let (lo, hi) = (range.0.min(range.1).max(1), range.0.max(range.1).max(1));
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let port = rng.gen_range(lo..=hi);
        if in_use.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {lo}-{hi}"),
    ))
}
