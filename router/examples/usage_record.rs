//! Nanoseconds per `UsageJournal::record` (one per proxied request), from one thread and
//! from two threads at once (two workers, each journaling to its own segment), and per
//! record for reading the sealed batches back (what a heartbeat does).
//! Usage: cargo run --release -p cellplane-router --example usage_record [RECORDS]
use cellplane_router::usage::UsageJournal;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(UsageJournal::open(dir.path(), 2).unwrap());
    for threads in [1u64, 2] {
        let t0 = Instant::now();
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    cellplane_router::upstream::set_worker_index(t as usize);
                    // The router passes the instant it read when the response head came.
                    let at = Instant::now();
                    for i in 0..n {
                        j.record(if i % 2 == 0 { "t1" } else { "t7" }, "prod", 0, 3, 0, at);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let wall = t0.elapsed();
        println!(
            "{threads} thread(s): {:.1} ns per record (wall, each thread busy)",
            wall.as_nanos() as f64 / n as f64
        );
        j.seal().unwrap();
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("batch-")
            {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    for _ in 0..n / 4 {
        j.record("t1", "prod", 0, 3, 0, Instant::now());
    }
    j.seal().unwrap();
    let t = Instant::now();
    let b = j.batches(usize::MAX, usize::MAX).unwrap();
    println!(
        "batches(): {:.1} ns per record ({} batches)",
        t.elapsed().as_nanos() as f64 / (n / 4) as f64,
        b.len()
    );
}
