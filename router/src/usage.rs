//! Usage metering: every forwarded request of a tenant environment is counted (requests,
//! request body bytes, response body bytes, and the application units its cell reported in
//! `X-Usage-Units`) and reported to the control plane with the heartbeats.
//!
//! Nothing is lost or counted twice across restarts, a SIGKILL or a heartbeat lost on the
//! way, because the counts live in files, not only in memory:
//! - each request appends one line to `usage.journal`, a file mapped into memory (shared),
//!   before the last byte of the response is written: a copy into the page cache, no system
//!   call, so a request the client saw complete is in the file even if the process is
//!   killed the next instant (the kernel keeps a killed process's dirty pages);
//! - before a heartbeat the journal is *sealed*: renamed, atomically, to
//!   `batch-<id>.log`, and a new journal is opened. A batch's id never changes and is the
//!   idempotency key the control plane dedupes on;
//! - a batch file is deleted only after a heartbeat that carried it was answered 2xx. A
//!   restart re-sends the batches still there; the journal left by a killed process is
//!   sealed into a new batch.
//!
//! The one window left: a process killed between journaling a request and writing its last
//! response byte counts a request its client saw fail (at most one per connection).

use cellplane_api::{UsageBatch, UsageRecord};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const JOURNAL: &str = "usage.journal";

/// Bytes of one journal segment. A full segment is sealed into a batch, so a batch holds at
/// most this many bytes of lines (at least 22 bytes each): at most [`MAX_BATCH_RECORDS`]
/// records, which fit a heartbeat's body.
const SEGMENT_BYTES: usize = 96 * 1024;

/// The most records one batch can hold.
pub const MAX_BATCH_RECORDS: usize = SEGMENT_BYTES / 22;

/// One mapped journal file. Writers reserve bytes with an atomic add and copy their line
/// in; `writers` counts copies under way, so a sealer can wait for them.
struct Segment {
    map: memmap2::MmapRaw,
    next: AtomicUsize,
    writers: AtomicUsize,
}

impl Segment {
    fn create(dir: &Path) -> std::io::Result<Segment> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(JOURNAL))?;
        f.set_len(SEGMENT_BYTES as u64)?;
        Ok(Segment {
            map: memmap2::MmapRaw::map_raw(&f)?,
            next: AtomicUsize::new(0),
            writers: AtomicUsize::new(0),
        })
    }

    /// Copies `line` in; false when the segment is full.
    ///
    /// The crate's one `unsafe` block (the workspace denies unsafe code): a copy into the
    /// shared mapping is what makes metering cost no system call per request. The file is
    /// the router's own (`--usage-dir`); nothing else may truncate it while it is mapped.
    #[allow(unsafe_code)]
    fn append(&self, line: &[u8]) -> bool {
        let at = self.next.fetch_add(line.len(), Ordering::SeqCst);
        if at + line.len() > SEGMENT_BYTES {
            return false;
        }
        // SAFETY: `[at, at + len)` lies inside the mapping (checked above) and was reserved
        // by the `fetch_add` for this call alone; the mapping lives as long as `self`.
        unsafe {
            std::ptr::copy_nonoverlapping(line.as_ptr(), self.map.as_mut_ptr().add(at), line.len());
        }
        true
    }

    fn used(&self) -> usize {
        self.next.load(Ordering::SeqCst).min(SEGMENT_BYTES)
    }
}

pub struct UsageJournal {
    dir: PathBuf,
    active: arc_swap::ArcSwap<Segment>,
    /// Serializes sealing.
    sealing: Mutex<()>,
}

impl UsageJournal {
    /// Opens (creating) the usage directory. A journal left by an earlier process is
    /// sealed into a batch first.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let left = dir.join(JOURNAL);
        if left.exists() {
            if std::fs::read(&left)?.contains(&b'\n') {
                std::fs::rename(&left, dir.join(format!("batch-{}.log", batch_id())))?;
            } else {
                std::fs::remove_file(&left)?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            active: arc_swap::ArcSwap::from_pointee(Segment::create(dir)?),
            sealing: Mutex::new(()),
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
        let mut buf = [0u8; 256];
        let mut w = &mut buf[..];
        if writeln!(
            w,
            "{minute}\t{tenant}\t{env}\t{request_bytes}\t{response_bytes}\t{units}"
        )
        .is_err()
        {
            tracing::error!(tenant = %tenant, "a usage line does not fit its buffer; this request is not metered");
            return;
        }
        let len = 256 - w.len();
        let line = &buf[..len];
        for _ in 0..3 {
            let seg = self.active.load_full();
            seg.writers.fetch_add(1, Ordering::SeqCst);
            // A sealer that swapped the segment out waits for writers that got in before
            // the swap; one that came after sees the swap here and moves on.
            if !Arc::ptr_eq(&seg, &self.active.load()) {
                seg.writers.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let done = seg.append(line);
            seg.writers.fetch_sub(1, Ordering::SeqCst);
            if done {
                return;
            }
            if let Err(e) = self.seal_segment(&seg) {
                tracing::error!(error = %e, "sealing the usage journal failed; this request is not metered");
                return;
            }
        }
        tracing::error!(tenant = %tenant, "the usage journal kept filling up; this request is not metered");
    }

    /// Seals the journal into a batch file when it holds anything.
    pub fn seal(&self) -> std::io::Result<()> {
        let seg = self.active.load_full();
        self.seal_segment(&seg)
    }

    /// Seals `seg` if it is still the active segment and holds anything.
    fn seal_segment(&self, seg: &Arc<Segment>) -> std::io::Result<()> {
        let _one = self.sealing.lock().expect("not poisoned");
        if !Arc::ptr_eq(seg, &self.active.load()) || seg.used() == 0 {
            return Ok(());
        }
        // The journal file becomes the batch; a new one takes its place.
        let batch = self.dir.join(format!("batch-{}.log", batch_id()));
        std::fs::rename(self.dir.join(JOURNAL), &batch)?;
        let fresh = match Segment::create(&self.dir) {
            Ok(s) => s,
            Err(e) => {
                // Put the journal back: writers keep filling it.
                std::fs::rename(&batch, self.dir.join(JOURNAL))?;
                return Err(e);
            }
        };
        self.active.store(Arc::new(fresh));
        while seg.writers.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        // Trim the unused tail (a killed process leaves it zeroed; parsing skips it).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&batch)?
            .set_len(seg.used() as u64)?;
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
            let bytes = std::fs::read(self.dir.join(&name))?;
            let text = String::from_utf8_lossy(&bytes);
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

/// A batch id: nanoseconds since the epoch and 32 random bits, so ids sort by age.
fn batch_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{now:024x}{:08x}", rand::random::<u32>())
}

/// Sums journal lines per tenant env and minute. A line torn by a kill mid-copy (missing
/// fields, zero bytes) and the zeroed tail of a mapped journal are skipped.
fn aggregate(text: &str) -> Vec<UsageRecord> {
    let mut sums: BTreeMap<(u64, &str, &str), [u64; 4]> = BTreeMap::new();
    for line in text.split('\n') {
        if line.contains('\0') {
            continue;
        }
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
        drop(j);
        // A line torn by a kill mid-copy is skipped (the rest of the file is zeroes).
        {
            let j = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join(JOURNAL))
                .unwrap();
            use std::os::unix::fs::FileExt;
            let used = std::fs::read(dir.path().join(JOURNAL))
                .unwrap()
                .iter()
                .position(|b| *b == 0)
                .unwrap();
            j.write_at(b"123\tacme\tpr\0\0\t1\n", used as u64).unwrap();
        }
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

    #[test]
    fn a_full_journal_seals_itself_and_a_heartbeat_takes_what_fits() {
        let dir = tempfile::tempdir().unwrap();
        let j = UsageJournal::open(dir.path()).unwrap();
        let n = 5_000;
        for i in 0..n {
            j.record(&format!("tenant-{i:05}"), "prod", 0, 0, 0);
        }
        j.seal().unwrap();
        let all = j.batches(100, usize::MAX).unwrap();
        assert!(all.len() >= 2, "{} batches", all.len());
        let total: usize = all.iter().map(|b| b.records.len()).sum();
        assert_eq!(total, n, "every line in exactly one batch");
        assert!(all.iter().all(|b| b.records.len() <= MAX_BATCH_RECORDS));
        // A record budget smaller than the first batch still takes the first.
        assert_eq!(j.batches(10, 5).unwrap().len(), 1);
    }

    #[test]
    fn concurrent_writers_and_seals_lose_and_double_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(UsageJournal::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        j.record("acme", "prod", 1, 2, u64::from(t == 0 && i % 2 == 0));
                    }
                })
            })
            .collect();
        let sealer = {
            let j = j.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    j.seal().unwrap();
                    std::thread::yield_now();
                }
            })
        };
        for t in threads {
            t.join().unwrap();
        }
        sealer.join().unwrap();
        j.seal().unwrap();
        let records: Vec<UsageRecord> = j
            .batches(100_000, usize::MAX)
            .unwrap()
            .into_iter()
            .flat_map(|b| b.records)
            .collect();
        let sum = |f: fn(&UsageRecord) -> u64| records.iter().map(f).sum::<u64>();
        assert_eq!(sum(|r| r.requests), 80_000);
        assert_eq!(sum(|r| r.request_bytes), 80_000);
        assert_eq!(sum(|r| r.response_bytes), 160_000);
        assert_eq!(sum(|r| r.units), 10_000);
    }
}
