//! Usage metering: every forwarded request of a tenant environment is counted (requests,
//! request body bytes, response body bytes, and the application units its cell reported in
//! `X-Usage-Units`) and reported to the control plane with the heartbeats.
//!
//! Nothing is lost or counted twice across restarts, a SIGKILL or a heartbeat lost on the
//! way, because the counts live in files, not only in memory:
//! - each request appends one line to `usage.journal` (one `write(2)` of an `O_APPEND` file,
//!   made before the last byte of the response is written, so a request the client saw
//!   complete is in the page cache even if the process is killed the next instant);
//! - before a heartbeat the journal is *sealed*: renamed, atomically, to
//!   `batch-<id>.log`, and a new journal is opened. A batch's id never changes and is the
//!   idempotency key the control plane dedupes on;
//! - a batch file is deleted only after a heartbeat that carried it was answered 2xx. A
//!   restart re-sends the batches still there; the journal left by a killed process is
//!   sealed into a new batch.
//!
//! The one window left: a process killed between journaling a request and writing its last
//! response byte counts a request its client saw fail (at most one per connection).

use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const JOURNAL: &str = "usage.journal";

/// A journal is sealed when it reaches this many lines, so no batch outgrows a heartbeat's
/// body (a batch holds at most this many records; ~170 bytes each as JSON).
pub const SEAL_LINES: usize = 4_000;

/// One tenant environment's counts in one minute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageRecord {
    pub tenant_id: String,
    pub env: String,
    /// The minute's start, RFC 3339 (`2026-12-04T10:15:00Z`).
    pub minute: String,
    pub requests: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub units: u64,
}

/// A sealed batch: its id (the idempotency key) and its counts per tenant env and minute.
#[derive(Debug, Clone, Serialize)]
pub struct UsageBatch {
    pub batch_id: String,
    pub records: Vec<UsageRecord>,
}

pub struct UsageJournal {
    dir: PathBuf,
    /// The journal and how many lines it holds.
    file: Mutex<(std::fs::File, usize)>,
}

fn open_journal(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(JOURNAL))
}

impl UsageJournal {
    /// Opens (creating) the usage directory and its journal.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = open_journal(dir)?;
        // A journal left by an earlier process is sealed at the first heartbeat; until then
        // its size stands in for its line count.
        let lines = (file.metadata()?.len() / 16) as usize;
        Ok(Self {
            dir: dir.to_path_buf(),
            file: Mutex::new((file, lines)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counts one request.
    pub fn record(
        &self,
        tenant: &str,
        env: &str,
        request_bytes: u64,
        response_bytes: u64,
        units: u64,
    ) {
        let minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / 60)
            .unwrap_or(0);
        let line =
            format!("{minute}\t{tenant}\t{env}\t{request_bytes}\t{response_bytes}\t{units}\n");
        let mut guard = self.file.lock().expect("not poisoned");
        if let Err(e) = guard.0.write_all(line.as_bytes()) {
            tracing::error!(error = %e, tenant = %tenant, "writing the usage journal failed; this request is not metered");
            return;
        }
        guard.1 += 1;
        if guard.1 >= SEAL_LINES {
            if let Err(e) = self.seal_locked(&mut guard) {
                tracing::error!(error = %e, "sealing the usage journal failed");
            }
        }
    }

    /// Seals the journal into a batch file when it holds anything.
    pub fn seal(&self) -> std::io::Result<()> {
        let mut guard = self.file.lock().expect("not poisoned");
        self.seal_locked(&mut guard)
    }

    fn seal_locked(&self, guard: &mut (std::fs::File, usize)) -> std::io::Result<()> {
        if guard.0.metadata()?.len() == 0 {
            return Ok(());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!("{now:024x}{:08x}", rand::random::<u32>());
        std::fs::rename(
            self.dir.join(JOURNAL),
            self.dir.join(format!("batch-{id}.log")),
        )?;
        *guard = (open_journal(&self.dir)?, 0);
        Ok(())
    }

    /// The sealed batches, oldest first, at most `max` and (but for the first) at most
    /// `max_records` records in all.
    pub fn batches(&self, max: usize, max_records: usize) -> std::io::Result<Vec<UsageBatch>> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("batch-") && n.ends_with(".log"))
            .collect();
        names.sort();
        let mut out: Vec<UsageBatch> = Vec::new();
        let mut records = 0;
        for name in names.into_iter().take(max) {
            let text = std::fs::read_to_string(self.dir.join(&name))?;
            let id = name["batch-".len()..name.len() - ".log".len()].to_string();
            let batch = UsageBatch {
                batch_id: id,
                records: aggregate(&text),
            };
            records += batch.records.len();
            if !out.is_empty() && records > max_records {
                break;
            }
            out.push(batch);
        }
        Ok(out)
    }

    /// Forgets a batch the control plane acknowledged.
    pub fn ack(&self, batch_id: &str) {
        let path = self.dir.join(format!("batch-{batch_id}.log"));
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(error = %e, path = %path.display(), "removing an acknowledged usage batch failed");
        }
    }
}

/// Sums journal lines per tenant env and minute; a torn last line (a write cut short) is
/// skipped.
fn aggregate(text: &str) -> Vec<UsageRecord> {
    let mut sums: BTreeMap<(u64, &str, &str), [u64; 4]> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 6 {
            continue;
        }
        let nums: Option<Vec<u64>> = [f[0], f[3], f[4], f[5]]
            .iter()
            .map(|s| s.parse::<u64>().ok())
            .collect();
        let Some(n) = nums else { continue };
        let e = sums.entry((n[0], f[1], f[2])).or_default();
        e[0] += 1;
        e[1] += n[1];
        e[2] += n[2];
        e[3] += n[3];
    }
    sums.into_iter()
        .map(|((minute, tenant, env), c)| UsageRecord {
            tenant_id: tenant.to_string(),
            env: env.to_string(),
            minute: minute_rfc3339(minute),
            requests: c[0],
            request_bytes: c[1],
            response_bytes: c[2],
            units: c[3],
        })
        .collect()
}

/// `2026-12-04T10:15:00Z` for a minute since the epoch.
fn minute_rfc3339(minute: u64) -> String {
    let secs = minute * 60;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:00Z",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_print_as_rfc3339() {
        assert_eq!(minute_rfc3339(0), "1970-01-01T00:00:00Z");
        // 2026-12-04T10:15:00Z = 1796379300 s.
        assert_eq!(minute_rfc3339(1_796_379_300 / 60), "2026-12-04T10:15:00Z");
        assert_eq!(minute_rfc3339(951_782_400 / 60), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn sealed_batches_sum_per_tenant_env_and_minute_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let j = UsageJournal::open(dir.path()).unwrap();
        j.seal().unwrap();
        assert!(
            j.batches(10, 100).unwrap().is_empty(),
            "an empty journal seals nothing"
        );
        for _ in 0..3 {
            j.record("acme", "prod", 10, 100, 1);
        }
        j.record("globex", "prod", 0, 5, 0);
        j.seal().unwrap();
        j.record("acme", "prod", 1, 1, 0);
        // A torn line from a write cut short is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL))
            .unwrap()
            .write_all(b"123\tacme\tpr")
            .unwrap();
        drop(j);
        // What a restarted router finds: one batch, and a journal to seal.
        let j = UsageJournal::open(dir.path()).unwrap();
        j.seal().unwrap();
        let b = j.batches(10, 100).unwrap();
        assert_eq!(b.len(), 2);
        let acme: u64 = b
            .iter()
            .flat_map(|b| &b.records)
            .filter(|r| r.tenant_id == "acme")
            .map(|r| r.requests)
            .sum();
        assert_eq!(acme, 4);
        let first = &b[0].records;
        assert_eq!(first.len(), 2);
        assert_eq!(
            (
                first[0].requests,
                first[0].request_bytes,
                first[0].response_bytes,
                first[0].units
            ),
            (3, 30, 300, 3)
        );
        j.ack(&b[0].batch_id.clone());
        let left = j.batches(10, 100).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].batch_id, b[1].batch_id,
            "ids are stable until acknowledged"
        );
    }
}
