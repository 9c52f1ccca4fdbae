//! The control plane's side of the cell contract (`docs/cell-contract.md`): export, import,
//! freeze, unfreeze, checksum and purge of one tenant on one cell, as a tenant move uses
//! them. A copy streams the source's export straight into the target's import: memory
//! does not grow with the tenant, and the export's closing cursor record is read on the
//! way through.

use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where a cell's contract routes are and the bearer token they take.
#[derive(Clone)]
pub struct CellEndpoint {
    pub cell_id: String,
    pub base: String,
    token: String,
}

impl std::fmt::Debug for CellEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellEndpoint")
            .field("cell_id", &self.cell_id)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl CellEndpoint {
    pub fn new(cell_id: &str, base: &str, token: &str) -> Self {
        Self {
            cell_id: cell_id.to_string(),
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }
}

/// Why a call to a cell failed.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    /// The cell could not be reached or answered 5xx: it may come back.
    #[error("cell {cell}: {detail}")]
    Unavailable { cell: String, detail: String },
    /// The cell refused (4xx): retrying the same call will not help.
    #[error("cell {cell} refused: {detail}")]
    Refused {
        cell: String,
        status: u16,
        detail: String,
    },
    /// The export stream ended without its cursor record (the connection broke).
    #[error("the export from cell {cell} was incomplete: {detail}")]
    Incomplete { cell: String, detail: String },
}

/// What one export → import copy moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// Rows and tombstones in the export (what the source had changed since the cursor).
    pub records: i64,
    pub bytes: i64,
    /// Records the target applied (the rest were already there).
    pub applied: i64,
    /// The cursor to export `since` next time.
    pub cursor: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Checksum {
    pub rows: i64,
    pub digest: String,
}

#[derive(Debug, Deserialize)]
struct Frozen {
    cursor: String,
}

#[derive(Debug, Deserialize)]
struct Imported {
    applied: i64,
}

/// The closing cursor record, found while the export streams through.
#[derive(Default)]
struct Tail {
    /// Bytes after the last newline seen so far.
    partial: Vec<u8>,
    /// The last complete line.
    last: Vec<u8>,
    bytes: i64,
}

impl Tail {
    fn feed(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as i64;
        match chunk.iter().rposition(|b| *b == b'\n') {
            None => {
                // Bound what is kept: a cursor line is short; a long row line is not it.
                if self.partial.len() < 4096 {
                    self.partial.extend_from_slice(chunk);
                }
            }
            Some(nl) => {
                let before = &chunk[..nl];
                let start = before.iter().rposition(|b| *b == b'\n').map(|p| p + 1);
                self.last = match start {
                    Some(s) => before[s..].to_vec(),
                    None => {
                        let mut l = std::mem::take(&mut self.partial);
                        l.extend_from_slice(before);
                        l
                    }
                };
                self.partial.clear();
                self.partial.extend_from_slice(&chunk[nl + 1..]);
            }
        }
    }

    /// The cursor record: the last line (the final newline is optional).
    fn cursor(&self) -> Option<(String, i64)> {
        let line = if self.partial.iter().any(|b| !b.is_ascii_whitespace()) {
            &self.partial
        } else {
            &self.last
        };
        let v: serde_json::Value = serde_json::from_slice(line).ok()?;
        if v.get("type")?.as_str()? != "cursor" {
            return None;
        }
        let rows = v.get("rows").and_then(|r| r.as_i64()).unwrap_or(0);
        let tombs = v.get("tombstones").and_then(|r| r.as_i64()).unwrap_or(0);
        Some((v.get("cursor")?.as_str()?.to_string(), rows + tombs))
    }
}

/// Calls cells. Cheap to clone.
#[derive(Clone)]
pub struct CellClient {
    http: reqwest::Client,
    /// Limit of a whole copy (export + import) and of the other calls.
    copy_timeout: Duration,
    call_timeout: Duration,
}

impl CellClient {
    pub fn new(copy_timeout: Duration, call_timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client builds");
        Self {
            http,
            copy_timeout,
            call_timeout,
        }
    }

    fn url(c: &CellEndpoint, tenant: &str, tail: &str) -> String {
        // `tenant` is a validated id: it cannot leave its path segment.
        format!("{}/cell/v1/tenants/{tenant}{tail}", c.base)
    }

    fn unavailable(c: &CellEndpoint, e: impl std::fmt::Display) -> CellError {
        CellError::Unavailable {
            cell: c.cell_id.clone(),
            detail: e.to_string(),
        }
    }

    async fn check(c: &CellEndpoint, r: reqwest::Response) -> Result<reqwest::Response, CellError> {
        let status = r.status();
        if status.is_success() {
            return Ok(r);
        }
        let body: String = r
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        let detail = format!("{status}: {body}");
        if status.is_server_error() {
            Err(CellError::Unavailable {
                cell: c.cell_id.clone(),
                detail,
            })
        } else {
            Err(CellError::Refused {
                cell: c.cell_id.clone(),
                status: status.as_u16(),
                detail,
            })
        }
    }

    /// Streams `from`'s export of `tenant` (everything after `since`, or all of it) into
    /// `to`'s import.
    pub async fn copy(
        &self,
        from: &CellEndpoint,
        to: &CellEndpoint,
        tenant: &str,
        since: Option<&str>,
    ) -> Result<Copied, CellError> {
        let mut url = Self::url(from, tenant, "/export");
        if let Some(s) = since {
            url.push_str("?since=");
            url.push_str(&urlencode(s));
        }
        let export = self
            .http
            .get(&url)
            .bearer_auth(&from.token)
            .timeout(self.copy_timeout)
            .send()
            .await
            .map_err(|e| Self::unavailable(from, e))?;
        let export = Self::check(from, export).await?;
        let tail = Arc::new(Mutex::new(Tail::default()));
        let seen = tail.clone();
        let broke: Arc<Mutex<Option<String>>> = Arc::default();
        let broke_w = broke.clone();
        let body = export.bytes_stream().map(move |chunk| {
            match &chunk {
                Ok(b) => seen.lock().unwrap_or_else(|p| p.into_inner()).feed(b),
                Err(e) => *broke_w.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string()),
            }
            chunk
        });
        let import = self
            .http
            .post(Self::url(to, tenant, "/import"))
            .bearer_auth(&to.token)
            .header("content-type", "application/x-ndjson")
            .timeout(self.copy_timeout)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await;
        if let Some(e) = broke.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(CellError::Incomplete {
                cell: from.cell_id.clone(),
                detail: e,
            });
        }
        let import = import.map_err(|e| Self::unavailable(to, e))?;
        let import = Self::check(to, import).await?;
        let applied: Imported = import.json().await.map_err(|e| Self::unavailable(to, e))?;
        let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        let (cursor, records) = tail.cursor().ok_or_else(|| CellError::Incomplete {
            cell: from.cell_id.clone(),
            detail: "the stream did not end with a cursor record".into(),
        })?;
        Ok(Copied {
            records,
            bytes: tail.bytes,
            applied: applied.applied,
            cursor,
        })
    }

    async fn post_flag(
        &self,
        c: &CellEndpoint,
        tenant: &str,
        what: &str,
    ) -> Result<String, CellError> {
        let r = self
            .http
            .post(Self::url(c, tenant, what))
            .bearer_auth(&c.token)
            .timeout(self.call_timeout)
            .send()
            .await
            .map_err(|e| Self::unavailable(c, e))?;
        let f: Frozen = Self::check(c, r)
            .await?
            .json()
            .await
            .map_err(|e| Self::unavailable(c, e))?;
        Ok(f.cursor)
    }

    /// Freezes the tenant's writes; the cursor returned is final.
    pub async fn freeze(&self, c: &CellEndpoint, tenant: &str) -> Result<String, CellError> {
        self.post_flag(c, tenant, "/freeze").await
    }

    pub async fn unfreeze(&self, c: &CellEndpoint, tenant: &str) -> Result<(), CellError> {
        self.post_flag(c, tenant, "/unfreeze").await.map(|_| ())
    }

    pub async fn checksum(&self, c: &CellEndpoint, tenant: &str) -> Result<Checksum, CellError> {
        let r = self
            .http
            .get(Self::url(c, tenant, "/checksum"))
            .bearer_auth(&c.token)
            .timeout(self.copy_timeout)
            .send()
            .await
            .map_err(|e| Self::unavailable(c, e))?;
        Self::check(c, r)
            .await?
            .json()
            .await
            .map_err(|e| Self::unavailable(c, e))
    }

    /// Removes every row of the tenant from the cell; returns how many were removed.
    pub async fn purge(&self, c: &CellEndpoint, tenant: &str) -> Result<i64, CellError> {
        let r = self
            .http
            .delete(Self::url(c, tenant, ""))
            .bearer_auth(&c.token)
            .timeout(self.copy_timeout)
            .send()
            .await
            .map_err(|e| Self::unavailable(c, e))?;
        let v: serde_json::Value = Self::check(c, r)
            .await?
            .json()
            .await
            .map_err(|e| Self::unavailable(c, e))?;
        Ok(v.get("purged_rows").and_then(|n| n.as_i64()).unwrap_or(0))
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_record_is_found_across_chunk_boundaries() {
        let stream = b"{\"type\":\"row\",\"key\":\"a\",\"value_b64\":\"\",\"version\":1,\"seq\":1}\n{\"type\":\"cursor\",\"cursor\":\"e:1\",\"rows\":1,\"tombstones\":0}\n";
        for split in 0..stream.len() {
            let mut t = Tail::default();
            t.feed(&stream[..split]);
            t.feed(&stream[split..]);
            assert_eq!(t.cursor(), Some(("e:1".to_string(), 1)), "split at {split}");
            assert_eq!(t.bytes, stream.len() as i64);
        }
        // Without the final newline, and with a row as the last line (incomplete).
        let mut t = Tail::default();
        t.feed(&stream[..stream.len() - 1]);
        assert_eq!(t.cursor(), Some(("e:1".to_string(), 1)));
        let mut t = Tail::default();
        t.feed(&stream[..64]);
        assert_eq!(t.cursor(), None);
    }

    #[test]
    fn cursors_are_escaped_in_the_query() {
        assert_eq!(urlencode("8c0a:18"), "8c0a%3A18");
        assert_eq!(urlencode("a&b=c"), "a%26b%3Dc");
    }
}
