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
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Journal files are `journal-<id>.journal` (one per worker, a new one after each seal);
/// `usage.journal` is the name an earlier version used (sealed like the others at open).
const JOURNAL_EXT: &str = ".journal";

/// Bytes of one journal segment. A full segment is sealed into a batch, so a batch holds at
/// most this many bytes of lines (at least 22 bytes each): at most [`MAX_BATCH_RECORDS`]
/// records, which fit a heartbeat's body.
const SEGMENT_BYTES: usize = 96 * 1024;

/// The most records one batch can hold.
pub const MAX_BATCH_RECORDS: usize = SEGMENT_BYTES / 22;

/// The longest journal line (the fields of one request).
const MAX_LINE: usize = 256;

/// One mapped journal file, written by one worker at a time (under its shard's lock).
struct Segment {
    map: memmap2::MmapMut,
    used: usize,
    path: PathBuf,
    /// The wall clock (seconds since the epoch) at `since`: a request's minute is read
    /// from the instant it was answered, with no clock call per request. A segment lives
    /// until the next heartbeat at most, so the two clocks cannot drift apart meanwhile.
    epoch_secs: u64,
    since: Instant,
}

impl Segment {
    fn create(dir: &Path) -> std::io::Result<Segment> {
        let path = dir.join(format!("journal-{}{JOURNAL_EXT}", batch_id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        f.set_len(SEGMENT_BYTES as u64)?;
        let since = Instant::now();
        let epoch_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Segment {
            map: map_journal(&f)?,
            used: 0,
            path,
            epoch_secs,
            since,
        })
    }

    fn left(&self) -> usize {
        SEGMENT_BYTES - self.used
    }

    /// The minute (since the epoch) of `at`.
    fn minute(&self, at: Instant) -> u64 {
        let secs = match at.checked_duration_since(self.since) {
            Some(d) => self.epoch_secs + d.as_secs(),
            None => self
                .epoch_secs
                .saturating_sub(self.since.duration_since(at).as_secs()),
        };
        secs / 60
    }
}

/// Maps a journal file (shared, writable): a request is journaled with a copy into the page
/// cache, no system call, and survives a SIGKILL of the process.
///
/// The crate's one `unsafe` block (the workspace denies unsafe code): memmap2 cannot know
/// whether another process truncates or rewrites the file while it is mapped. This file is
/// the router's own (`--usage-dir`, a name no other process uses; created here with
/// `create_new`), nothing else truncates it, and the router only renames it (which leaves
/// the mapping intact) and trims it after unmapping it.
#[allow(unsafe_code)]
fn map_journal(f: &std::fs::File) -> std::io::Result<memmap2::MmapMut> {
    // SAFETY: see above; the mapping owns its own reference to the file.
    unsafe { memmap2::MmapMut::map_mut(f) }
}

/// One worker's segment, on cache lines of its own: a worker journals its requests
/// without touching another core's lines (the lock is uncontended but for a seal).
#[repr(align(128))]
struct Shard(Mutex<Segment>);

pub struct UsageJournal {
    dir: PathBuf,
    /// One per worker (`upstream::worker()`); threads that are not workers share the first.
    shards: Box<[Shard]>,
    /// Batches already read from their files, by batch id (batch files never change;
    /// dropped when acknowledged): a heartbeat retried during an outage reads no file
    /// twice.
    read: Mutex<HashMap<String, UsageBatch>>,
}

impl UsageJournal {
    /// Opens (creating) the usage directory with one journal per worker. Journals left by
    /// an earlier process are sealed into batches first.
    pub fn open(dir: &Path, workers: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut left: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(JOURNAL_EXT))
            })
            .collect();
        left.sort();
        for path in left {
            if std::fs::read(&path)?.contains(&b'\n') {
                std::fs::rename(&path, dir.join(format!("batch-{}.log", batch_id())))?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        let shards = (0..workers.max(1))
            .map(|_| Ok(Shard(Mutex::new(Segment::create(dir)?))))
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            read: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counts one request (`at`: when it was answered; its minute is the one counted):
    /// one line in this worker's journal.
    pub fn record(
        &self,
        tenant: &str,
        env: &str,
        request_bytes: u64,
        response_bytes: u64,
        units: u64,
        at: Instant,
    ) {
        let shard = &self.shards[crate::upstream::worker() % self.shards.len()];
        let mut seg = shard.0.lock().unwrap_or_else(|p| p.into_inner());
        if seg.left() < MAX_LINE {
            // Full: a new segment takes its place, and the full one becomes a batch.
            match Segment::create(&self.dir) {
                Ok(fresh) => {
                    let full = std::mem::replace(&mut *seg, fresh);
                    if let Err(e) = self.seal_segment(full) {
                        tracing::error!(error = %e, "sealing the usage journal failed");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "opening a new usage journal failed; this request is not metered");
                    return;
                }
            }
        }
        let minute = seg.minute(at);
        let used = seg.used;
        // Written in place: a line is at most MAX_LINE bytes, and that much is left.
        let mut line = Line {
            buf: &mut seg.map[used..used + MAX_LINE],
            len: 0,
            fits: true,
        };
        line.num(minute);
        line.text(tenant.as_bytes());
        line.text(env.as_bytes());
        line.num(request_bytes);
        line.num(response_bytes);
        line.num(units);
        line.put(b"\n");
        if !line.fits {
            // Zeroed again, so a later line starts on clean bytes.
            let len = line.len;
            seg.map[used..used + len].fill(0);
            drop(seg);
            tracing::error!(tenant = %tenant, "a usage line is too long; this request is not metered");
            return;
        }
        seg.used += line.len;
    }

    /// Seals every journal that holds anything into a batch file.
    pub fn seal(&self) -> std::io::Result<()> {
        let mut result = Ok(());
        for shard in self.shards.iter() {
            if shard.0.lock().unwrap_or_else(|p| p.into_inner()).used == 0 {
                continue;
            }
            // The new segment is made before the lock is taken again: the worker waits
            // for no file system call.
            let fresh = Segment::create(&self.dir)?;
            let mut seg = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            if seg.used == 0 {
                // A full segment was swapped meanwhile; the new one is not needed.
                drop(seg);
                let path = fresh.path.clone();
                drop(fresh);
                std::fs::remove_file(path)?;
                continue;
            }
            let full = std::mem::replace(&mut *seg, fresh);
            drop(seg);
            if let Err(e) = self.seal_segment(full) {
                result = Err(e);
            }
        }
        result
    }

    /// Turns a journal no worker writes any more into a batch file. A process killed
    /// before the rename leaves a journal, sealed at the next start.
    fn seal_segment(&self, seg: Segment) -> std::io::Result<()> {
        let Segment {
            map, used, path, ..
        } = seg;
        drop(map);
        let batch = self.dir.join(format!("batch-{}.log", batch_id()));
        std::fs::rename(&path, &batch)?;
        // Trim the unused tail (a killed process leaves it zeroed; parsing skips it).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&batch)?
            .set_len(used as u64)?;
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
        names.truncate(max);
        let mut read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        // Only the oldest batches stay read (a long outage does not fill memory).
        read.retain(|id, _| names.iter().any(|n| batch_id_of(n) == id));
        let mut out: Vec<UsageBatch> = Vec::new();
        let mut records = 0;
        for name in &names {
            let id = batch_id_of(name);
            let batch = match read.get(id) {
                Some(b) => b.clone(),
                None => {
                    let bytes = std::fs::read(self.dir.join(name))?;
                    let batch = UsageBatch {
                        batch_id: id.to_string(),
                        records: aggregate(&bytes),
                    };
                    read.insert(id.to_string(), batch.clone());
                    batch
                }
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
        self.read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(batch_id);
        let path = self.dir.join(format!("batch-{batch_id}.log"));
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(error = %e, path = %path.display(), "removing an acknowledged usage batch failed");
        }
    }
}

fn batch_id_of(name: &str) -> &str {
    &name["batch-".len()..name.len() - ".log".len()]
}

/// One journal line, `minute\ttenant\tenv\trequest_bytes\tresponse_bytes\tunits\n`,
/// formatted straight into the journal without `fmt`.
struct Line<'a> {
    buf: &'a mut [u8],
    len: usize,
    fits: bool,
}

impl Line<'_> {
    fn put(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(to) => {
                to.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.fits = false,
        }
    }

    fn sep(&mut self) {
        if self.len > 0 {
            self.put(b"\t");
        }
    }

    fn text(&mut self, s: &[u8]) {
        self.sep();
        self.put(s);
    }

    fn num(&mut self, n: u64) {
        self.sep();
        let mut buf = [0u8; 20];
        self.put(crate::h1::u64_digits(n, &mut buf));
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
fn aggregate(bytes: &[u8]) -> Vec<UsageRecord> {
    /// Minute, tenant, env.
    type Key<'a> = (u64, &'a [u8], &'a [u8]);
    let mut sums: HashMap<Key, [u64; 4]> = HashMap::new();
    for line in bytes.split(|b| *b == b'\n') {
        if line.is_empty() || line.contains(&0) {
            continue;
        }
        let mut f = line.split(|b| *b == b'\t');
        let (Some(minute), Some(tenant), Some(env), Some(req), Some(resp), Some(units), None) = (
            f.next(),
            f.next(),
            f.next(),
            f.next(),
            f.next(),
            f.next(),
            f.next(),
        ) else {
            continue;
        };
        let (Some(minute), Some(req), Some(resp), Some(units)) =
            (number(minute), number(req), number(resp), number(units))
        else {
            continue;
        };
        if std::str::from_utf8(tenant).is_err() || std::str::from_utf8(env).is_err() {
            continue;
        }
        let e = sums.entry((minute, tenant, env)).or_default();
        e[0] += 1;
        e[1] += req;
        e[2] += resp;
        e[3] += units;
    }
    let sums: BTreeMap<_, _> = sums.into_iter().collect();
    sums.into_iter()
        .map(|((minute, tenant, env), c)| UsageRecord {
            tenant_id: String::from_utf8_lossy(tenant).into_owned(),
            env: String::from_utf8_lossy(env).into_owned(),
            minute: minute_rfc3339(minute),
            requests: c[0],
            request_bytes: c[1],
            response_bytes: c[2],
            units: c[3],
        })
        .collect()
}

/// A decimal `u64` field (digits only, like `str::parse` without a sign).
fn number(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in field {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
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
    use std::sync::Arc;

    /// The one journal file in `dir`.
    fn journal_file(dir: &Path) -> PathBuf {
        let found: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(JOURNAL_EXT))
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        found.into_iter().next().unwrap()
    }

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
        let j = UsageJournal::open(dir.path(), 1).unwrap();
        j.seal().unwrap();
        assert!(
            j.batches(10, 100).unwrap().is_empty(),
            "an empty journal seals nothing"
        );
        for _ in 0..3 {
            j.record("acme", "prod", 10, 100, 1, Instant::now());
        }
        j.record("globex", "prod", 0, 5, 0, Instant::now());
        j.seal().unwrap();
        j.record("acme", "prod", 1, 1, 0, Instant::now());
        drop(j);
        // A line torn by a kill mid-copy is skipped (the rest of the file is zeroes).
        {
            let path = journal_file(dir.path());
            let j = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            use std::os::unix::fs::FileExt;
            let used = std::fs::read(&path)
                .unwrap()
                .iter()
                .position(|b| *b == 0)
                .unwrap();
            j.write_at(b"123\tacme\tpr\0\0\t1\n", used as u64).unwrap();
        }
        // What a restarted router finds: one batch, and a journal to seal.
        let j = UsageJournal::open(dir.path(), 1).unwrap();
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
        let j = UsageJournal::open(dir.path(), 1).unwrap();
        let n = 5_000;
        for i in 0..n {
            j.record(&format!("tenant-{i:05}"), "prod", 0, 0, 0, Instant::now());
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
    fn journals_of_every_worker_and_of_an_earlier_version_are_sealed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(UsageJournal::open(dir.path(), 3).unwrap());
        for w in 0..3 {
            let j = j.clone();
            std::thread::spawn(move || {
                crate::upstream::set_worker_index(w);
                for _ in 0..=w {
                    j.record("acme", "prod", 1, 1, 0, Instant::now());
                }
            })
            .join()
            .unwrap();
        }
        drop(j);
        std::fs::write(
            dir.path().join("usage.journal"),
            b"1\tacme\tprod\t1\t1\t0\n\0\0",
        )
        .unwrap();
        // Killed with three journals and the old one: a restart seals all four.
        let j = UsageJournal::open(dir.path(), 2).unwrap();
        let b = j.batches(10, 100).unwrap();
        assert_eq!(b.len(), 4);
        let n: u64 = b.iter().flat_map(|b| &b.records).map(|r| r.requests).sum();
        assert_eq!(n, 7);
        // Read once: the same again, and an acknowledged batch is gone.
        assert_eq!(j.batches(10, 100).unwrap().len(), 4);
        j.ack(&b[0].batch_id);
        assert_eq!(j.batches(10, 100).unwrap().len(), 3);
    }

    #[test]
    fn concurrent_writers_and_seals_lose_and_double_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(UsageJournal::open(dir.path(), 2).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    // Two threads per worker's journal.
                    crate::upstream::set_worker_index(t as usize % 2);
                    for i in 0..20_000 {
                        j.record(
                            "acme",
                            "prod",
                            1,
                            2,
                            u64::from(t == 0 && i % 2 == 0),
                            Instant::now(),
                        );
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
