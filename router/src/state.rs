//! The state file: the last-known table, so a router restarted while the control plane is
//! down still serves. Written to a temporary file, synced, renamed over the old one and the
//! directory synced: a crash leaves either the old or the new table, never half of one.

use crate::table::{Snapshot, TableBuilder};
use crate::wire;
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: String,
        source: wire::WireError,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Loads the table; `Ok(None)` when there is no state file yet.
pub fn load(path: &Path, builder: &mut TableBuilder) -> Result<Option<Snapshot>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let applied = wire::apply_changes(&bytes, builder, &Snapshot::empty()).map_err(|source| {
        StateError::Corrupt {
            path: path.display().to_string(),
            source,
        }
    })?;
    Ok(Some(applied.snapshot))
}

/// Replaces the state file with `snap`, atomically.
pub fn save(path: &Path, snap: &Snapshot) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("router-state")
    ));
    {
        let f = std::fs::File::create(&tmp).map_err(err)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        wire::write_snapshot(snap, &mut w).map_err(err)?;
        w.flush().map_err(err)?;
        w.get_ref().sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
