//! Wire types of the cell contract: NDJSON export/import records, export cursors and the
//! order-independent tenant checksum.
//!
//! These formats are what the control plane relies on to move tenants between cells, so
//! they are documented in `docs/cell-contract.md` and must change only compatibly (new
//! optional fields). This module is pure: it never does I/O and never talks to the store.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest value a tenant may store (the `PUT` body limit).
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// Largest import body.
pub const MAX_IMPORT_BYTES: u64 = 1 << 30;

/// Longest import line: a base64 value of [`MAX_VALUE_BYTES`] plus generous room for the
/// rest of the record.
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// Records per import transaction.
pub const IMPORT_BATCH: usize = 1000;

/// One line of an export or import stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// A live value.
    Row {
        key: String,
        value_b64: String,
        version: i64,
        #[serde(default)]
        seq: i64,
    },
    /// A deleted key; `version` is the deleting write's version.
    Tombstone {
        key: String,
        version: i64,
        #[serde(default)]
        seq: i64,
    },
    /// The last line of an export: where the next `since` export starts.
    Cursor {
        cursor: String,
        rows: u64,
        #[serde(default)]
        tombstones: u64,
    },
}

impl Record {
    pub fn row(key: &str, value: &[u8], version: i64, seq: i64) -> Self {
        Record::Row {
            key: key.to_owned(),
            value_b64: BASE64.encode(value),
            version,
            seq,
        }
    }

    /// Append this record and its newline to `out`.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(&mut *out, self).expect("records serialize to a Vec infallibly");
        out.push(b'\n');
    }
}

/// Decode the value of a row record.
pub fn decode_value(value_b64: &str) -> Result<Vec<u8>, base64::DecodeError> {
    BASE64.decode(value_b64)
}

/// A position in one tenant's change feed: `EPOCH:SEQ`, or `0` for "before anything".
/// The epoch ties the cursor to one history of the tenant on this cell, so a cursor from
/// before a purge (or from another cell) is refused instead of silently skipping changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: Option<String>,
    pub seq: i64,
}

impl Cursor {
    pub const START: Cursor = Cursor {
        epoch: None,
        seq: 0,
    };
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.epoch {
            Some(epoch) => write!(f, "{epoch}:{}", self.seq),
            None => f.write_str("0"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cursor must be `0` or `EPOCH:SEQ` as returned by an export")]
pub struct CursorError;

impl FromStr for Cursor {
    type Err = CursorError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        if raw == "0" {
            return Ok(Cursor::START);
        }
        let (epoch, seq) = raw.split_once(':').ok_or(CursorError)?;
        let valid_epoch =
            (1..=64).contains(&epoch.len()) && epoch.bytes().all(|b| b.is_ascii_hexdigit());
        let seq: i64 = seq.parse().map_err(|_| CursorError)?;
        if !valid_epoch || seq < 0 {
            return Err(CursorError);
        }
        Ok(Cursor {
            epoch: Some(epoch.to_owned()),
            seq,
        })
    }
}

/// Order-independent digest of a tenant's live rows: the sum modulo 2^256 of
/// `sha256(key ‖ 0x00 ‖ value)` read as big-endian integers. Equal data gives an equal
/// digest on any backend and in any scan order.
#[derive(Debug, Clone, Default)]
pub struct Checksum {
    sum: [u8; 32],
    rows: u64,
}

impl Checksum {
    pub fn add(&mut self, key: &str, value: &[u8]) {
        let mut hasher = Sha256::new();
        hasher.update(key.as_bytes());
        hasher.update([0u8]);
        hasher.update(value);
        let digest = hasher.finalize();
        let mut carry = 0u16;
        for i in (0..32).rev() {
            let total = u16::from(self.sum[i]) + u16::from(digest[i]) + carry;
            self.sum[i] = (total & 0xff) as u8;
            carry = total >> 8;
        }
        self.rows += 1;
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn hex(&self) -> String {
        hex::encode(self.sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_use_the_documented_shape() {
        let mut out = Vec::new();
        Record::row("k", b"hi", 2, 7).write_line(&mut out);
        Record::Tombstone {
            key: "d".into(),
            version: 3,
            seq: 8,
        }
        .write_line(&mut out);
        Record::Cursor {
            cursor: "ab:8".into(),
            rows: 1,
            tombstones: 1,
        }
        .write_line(&mut out);
        let text = String::from_utf8(out).expect("json is utf-8");
        assert_eq!(
            text,
            concat!(
                r#"{"type":"row","key":"k","value_b64":"aGk=","version":2,"seq":7}"#,
                "\n",
                r#"{"type":"tombstone","key":"d","version":3,"seq":8}"#,
                "\n",
                r#"{"type":"cursor","cursor":"ab:8","rows":1,"tombstones":1}"#,
                "\n"
            )
        );
        let row: Record =
            serde_json::from_str(r#"{"type":"row","key":"d","value_b64":"","version":1}"#)
                .expect("seq is optional on import");
        assert_eq!(row, Record::row("d", b"", 1, 0));
        assert!(serde_json::from_str::<Record>(r#"{"type":"tombstone","key":"d"}"#).is_err());
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        for raw in ["0", "00ff:0", "0123456789abcdef:42"] {
            let cursor: Cursor = raw.parse().expect("valid cursor");
            assert_eq!(cursor.to_string(), raw);
        }
        for raw in ["", "1", "x:1", "ab:", "ab:-1", "ab:1:2", ":5", "ab:1.5"] {
            assert_eq!(raw.parse::<Cursor>(), Err(CursorError), "{raw:?}");
        }
    }

    #[test]
    fn checksum_ignores_order_and_sees_every_byte() {
        let mut forward = Checksum::default();
        forward.add("a", b"1");
        forward.add("b", b"2");
        let mut backward = Checksum::default();
        backward.add("b", b"2");
        backward.add("a", b"1");
        assert_eq!(forward.hex(), backward.hex());
        assert_eq!(forward.rows(), 2);

        let mut shifted = Checksum::default();
        shifted.add("a", b"12");
        shifted.add("b", b"");
        assert_ne!(forward.hex(), shifted.hex());
        assert_eq!(Checksum::default().hex(), "0".repeat(64));
    }
}
