//! Operations behind the cell contract that are more than one store call: the streaming
//! export, the streaming idempotent import and the tenant checksum.
//!
//! Handlers call these and turn the results into HTTP; this module knows neither routes nor
//! status codes, and must never hold a whole tenant in memory: exports are read in chunks
//! by sequence number and imports are applied in batches as their lines arrive.

use std::collections::HashMap;
use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use crate::contract::{
    decode_value, Checksum, Cursor, Record, IMPORT_BATCH, MAX_IMPORT_BYTES, MAX_LINE_BYTES,
    MAX_VALUE_BYTES,
};
use crate::ids::{Key, TenantId};
use crate::store::{Change, ImportItem, Store, StoreError, EXPORT_CHUNK};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    CursorMismatch(String),
    #[error("line {line}: {reason} ({applied} records before it were applied)")]
    InvalidLine {
        line: u64,
        reason: String,
        applied: u64,
    },
    #[error("import body exceeds {0} bytes")]
    TooLarge(u64),
    #[error("reading the request body failed: {0}")]
    Body(String),
}

/// Result of an import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportSummary {
    /// Records that changed the store.
    pub applied: u64,
    /// Records the store already had (same or newer version).
    pub skipped: u64,
}

/// The tenant checksum report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChecksumReport {
    pub tenant_id: String,
    pub rows: u64,
    pub digest: String,
}

/// Start an export of every change after `since`. Cursor problems are reported here,
/// before any byte is sent; a storage error later ends the stream early, so a stream
/// without its final cursor record is incomplete.
pub async fn export(
    store: &Store,
    tenant: &TenantId,
    since: Cursor,
) -> Result<impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static, ServiceError> {
    let flags = store.flags(tenant).await?;
    let (epoch, upto) = match &flags {
        Some(flags) => (Some(flags.epoch.clone()), flags.last_seq),
        None => (None, 0),
    };
    if let Some(since_epoch) = &since.epoch {
        let same_history = epoch.as_deref() == Some(since_epoch.as_str()) && since.seq <= upto;
        if !same_history {
            return Err(ServiceError::CursorMismatch(
                "the cursor does not belong to this tenant's history on this cell \
                 (purged, or from another cell); start again with a full export"
                    .into(),
            ));
        }
    }
    let state = ExportState {
        store: store.clone(),
        tenant: tenant.clone(),
        after: since.seq,
        upto,
        end: Cursor { epoch, seq: upto },
        rows: 0,
        tombstones: 0,
        done: false,
    };
    Ok(futures_util::stream::unfold(
        state,
        |mut state| async move {
            if state.done {
                return None;
            }
            let chunk = state.next_chunk().await;
            Some((chunk, state))
        },
    ))
}

struct ExportState {
    store: Store,
    tenant: TenantId,
    after: i64,
    /// High-water mark read when the export started: every change up to it is committed
    /// (writes of a tenant commit in sequence order), so it is the cursor to hand out.
    upto: i64,
    end: Cursor,
    rows: u64,
    tombstones: u64,
    done: bool,
}

impl ExportState {
    async fn next_chunk(&mut self) -> Result<Bytes, io::Error> {
        let changes = if self.after < self.upto {
            match self
                .store
                .changes(&self.tenant, self.after, self.upto, EXPORT_CHUNK)
                .await
            {
                Ok(changes) => changes,
                Err(err) => {
                    self.done = true;
                    tracing::error!(tenant_id = %self.tenant, error = %err, "export aborted");
                    return Err(io::Error::other("export aborted by a storage error"));
                }
            }
        } else {
            Vec::new()
        };
        let mut out = Vec::with_capacity(changes.len() * 128 + 128);
        for change in &changes {
            self.after = change.seq;
            change_record(change).write_line(&mut out);
            if change.deleted {
                self.tombstones += 1;
            } else {
                self.rows += 1;
            }
        }
        if (changes.len() as i64) < EXPORT_CHUNK {
            self.done = true;
            Record::Cursor {
                cursor: self.end.to_string(),
                rows: self.rows,
                tombstones: self.tombstones,
            }
            .write_line(&mut out);
        }
        Ok(Bytes::from(out))
    }
}

fn change_record(change: &Change) -> Record {
    if change.deleted {
        Record::Tombstone {
            key: change.key.clone(),
            version: change.version,
            seq: change.seq,
        }
    } else {
        Record::row(&change.key, &change.value, change.version, change.seq)
    }
}

/// Apply an NDJSON stream of records, line by line, in batches of [`IMPORT_BATCH`].
/// Batches already applied stay applied if a later line is bad; replaying the whole stream
/// is always safe because a record only replaces an older version.
pub async fn import<S, E>(
    store: &Store,
    tenant: &TenantId,
    body: S,
) -> Result<ImportSummary, ServiceError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut batch = Batch::default();
    let mut summary = ImportSummary::default();
    let mut pending = BytesMut::new();
    let mut received: u64 = 0;
    let mut line_no: u64 = 0;

    loop {
        let chunk = match body.next().await {
            Some(Ok(chunk)) => Some(chunk),
            Some(Err(err)) => return Err(ServiceError::Body(err.to_string())),
            None => None,
        };
        let finished = chunk.is_none();
        if let Some(chunk) = chunk {
            received += chunk.len() as u64;
            if received > MAX_IMPORT_BYTES {
                return Err(ServiceError::TooLarge(MAX_IMPORT_BYTES));
            }
            pending.extend_from_slice(&chunk);
        }
        let mut start = 0;
        while let Some(offset) = pending[start..].iter().position(|b| *b == b'\n') {
            let line = &pending[start..start + offset];
            start += offset + 1;
            line_no += 1;
            batch
                .push(line)
                .map_err(|reason| ServiceError::InvalidLine {
                    line: line_no,
                    reason,
                    applied: summary.applied,
                })?;
            if batch.items.len() >= IMPORT_BATCH {
                batch.flush(store, tenant, &mut summary).await?;
            }
        }
        let _ = pending.split_to(start);
        if finished {
            if !pending.is_empty() {
                line_no += 1;
                let line = pending.split();
                batch
                    .push(&line)
                    .map_err(|reason| ServiceError::InvalidLine {
                        line: line_no,
                        reason,
                        applied: summary.applied,
                    })?;
            }
            batch.flush(store, tenant, &mut summary).await?;
            return Ok(summary);
        }
        if pending.len() > MAX_LINE_BYTES {
            return Err(ServiceError::InvalidLine {
                line: line_no + 1,
                reason: format!("line longer than {MAX_LINE_BYTES} bytes"),
                applied: summary.applied,
            });
        }
    }
}

/// Records waiting for their transaction, one per key (the newest version wins).
#[derive(Default)]
struct Batch {
    items: Vec<ImportItem>,
    index: HashMap<String, usize>,
    superseded: u64,
}

impl Batch {
    fn push(&mut self, line: &[u8]) -> Result<(), String> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let record: Record =
            serde_json::from_slice(line).map_err(|e| format!("not a record: {e}"))?;
        let item = match record {
            Record::Row {
                key,
                value_b64,
                version,
                ..
            } => {
                let value = decode_value(&value_b64)
                    .map_err(|e| format!("value_b64 is not base64: {e}"))?;
                if value.len() > MAX_VALUE_BYTES {
                    return Err(format!("value exceeds {MAX_VALUE_BYTES} bytes"));
                }
                item(&key, value, version, false)?
            }
            Record::Tombstone { key, version, .. } => item(&key, Vec::new(), version, true)?,
            Record::Cursor { .. } => return Ok(()),
        };
        match self.index.get(item.key.as_str()) {
            Some(&at) => {
                self.superseded += 1;
                if self.items[at].version < item.version {
                    self.items[at] = item;
                }
            }
            None => {
                self.index
                    .insert(item.key.as_str().to_owned(), self.items.len());
                self.items.push(item);
            }
        }
        Ok(())
    }

    async fn flush(
        &mut self,
        store: &Store,
        tenant: &TenantId,
        summary: &mut ImportSummary,
    ) -> Result<(), StoreError> {
        let applied = store.import(tenant, &self.items).await?;
        summary.applied += applied;
        summary.skipped += self.items.len() as u64 - applied + self.superseded;
        self.items.clear();
        self.index.clear();
        self.superseded = 0;
        Ok(())
    }
}

fn item(key: &str, value: Vec<u8>, version: i64, deleted: bool) -> Result<ImportItem, String> {
    let key = Key::parse(key).map_err(|e| e.to_string())?;
    if version < 1 {
        return Err("version must be at least 1".into());
    }
    Ok(ImportItem {
        key,
        value,
        version,
        deleted,
    })
}

/// Count and digest the tenant's live rows from one snapshot.
pub async fn checksum(store: &Store, tenant: &TenantId) -> Result<ChecksumReport, StoreError> {
    let mut checksum = Checksum::default();
    store
        .for_each_live_row(tenant, |key, value| checksum.add(key, value))
        .await?;
    Ok(ChecksumReport {
        tenant_id: tenant.to_string(),
        rows: checksum.rows(),
        digest: checksum.hex(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_the_newest_version_per_key() {
        let mut batch = Batch::default();
        for line in [
            r#"{"type":"row","key":"a","value_b64":"AQ==","version":2,"seq":1}"#,
            r#"{"type":"row","key":"a","value_b64":"Ag==","version":1,"seq":2}"#,
            r#"{"type":"tombstone","key":"b","version":3,"seq":3}"#,
            "",
            r#"{"type":"cursor","cursor":"ab:3","rows":1}"#,
        ] {
            batch.push(line.as_bytes()).expect("valid line");
        }
        assert_eq!(batch.items.len(), 2);
        assert_eq!(batch.items[0].value, vec![1]);
        assert!(batch.items[1].deleted);
        assert_eq!(batch.superseded, 1);
    }

    #[test]
    fn bad_lines_say_why() {
        let mut batch = Batch::default();
        for (line, why) in [
            ("{", "not a record"),
            (
                r#"{"type":"row","key":"a b","value_b64":"","version":1}"#,
                "key must be",
            ),
            (
                r#"{"type":"row","key":"a","value_b64":"!!","version":1}"#,
                "base64",
            ),
            (
                r#"{"type":"row","key":"a","value_b64":"","version":0}"#,
                "version",
            ),
        ] {
            let err = batch.push(line.as_bytes()).expect_err(line);
            assert!(err.contains(why), "{line}: {err}");
        }
    }
}
