//! bench/rollout (part): what one evaluation round of release gates costs the control
//! plane with a wave of `--cells` cells reported by `--routers` routers, and how large a
//! router's heartbeat is at that many cells.
//!
//! - The store gets `--samples` heartbeats per router through the real ingest path
//!   (default 13: the 12 intervals of 5 s heartbeats in the default 60 s gate window),
//!   every cell with traffic and 0.05 % errors.
//! - A round is `jobs::release_gates::measure_cells` over every cell, with the built-in
//!   provider: the default gates (error ratio + p99 latency: one batch read), and with the
//!   burn-rate gate's two default rules added (four more batch reads).
//! - The baseline, in the same run on the same store: the same round reading each cell on
//!   its own (`Routing::cell_window_since` per cell, one query per cell: how a round read
//!   before the batch read).
//! - CPU is this process's user+system time (`/proc/self/stat`) over `--rounds` rounds;
//!   on PostgreSQL also the server's (every `postgres` process in `/proc`).
//! - Heartbeat bytes: the `POST /v1/routers/{id}/heartbeat` body (`RouterHeartbeat`) with
//!   the router's default 13 latency bounds, at `--cells` cells, against the same
//!   heartbeat without per-cell counters.
//!
//! ```text
//! cargo run --release -p cellplane --example gates_bench -- \
//!     [--pg ADMIN_URL] [--cells 1000] [--routers 10] [--samples 13] [--rounds 20]
//! ```
//!
//! Prints one JSON object per measurement on stdout (bench/rollout/run.sh makes tables).

use cellplane::config::{MetricsConfig, RoutingConfig};
use cellplane::jobs::release_gates;
use cellplane::metrics::Providers;
use cellplane::persistence::Store;
use cellplane::routing::Routing;
use cellplane_api::releases::{BurnRateGate, BurnRuleSpec, Gates, LatencyGate};
use cellplane_api::{CellCounters, RouterHeartbeat};

struct Args {
    pg: Option<String>,
    cells: usize,
    routers: usize,
    samples: usize,
    rounds: usize,
    heartbeat_secs: i64,
}

fn args() -> Args {
    let mut a = Args {
        pg: None,
        cells: 1000,
        routers: 10,
        samples: 13,
        rounds: 20,
        heartbeat_secs: 5,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--pg" => a.pg = Some(v),
            "--cells" => a.cells = v.parse().expect("--cells N"),
            "--routers" => a.routers = v.parse().expect("--routers N"),
            "--samples" => a.samples = v.parse().expect("--samples N"),
            "--rounds" => a.rounds = v.parse().expect("--rounds N"),
            "--heartbeat-secs" => a.heartbeat_secs = v.parse().expect("--heartbeat-secs N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

/// The router's default latency bounds (`--latency-buckets`).
const LE: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Cumulative counters of a cell after `n` heartbeats: ~50 requests/s, 0.05 % 5xx.
fn counters(cell: &str, n: u64, heartbeat_secs: u64) -> CellCounters {
    let total = n * 50 * heartbeat_secs + 1_000_000;
    let errors = total / 2000;
    let mut buckets: Vec<u64> = LE
        .iter()
        .map(|le| ((total as f64) * (1.0 - (-le * 40.0f64).exp())) as u64)
        .collect();
    buckets.push(total);
    CellCounters {
        cell_id: cell.to_string(),
        codes: vec![0, total - errors, 0, 0, errors],
        le: LE.to_vec(),
        buckets,
    }
}

fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// User+system CPU seconds of this process, and of every `postgres` process.
fn cpu() -> (f64, f64) {
    let hz = 100.0; // USER_HZ on Linux
    let me = cpu_ticks("self").unwrap_or(0) as f64 / hz;
    let mut pg = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let comm = std::fs::read_to_string(format!("/proc/{name}/comm")).unwrap_or_default();
            if comm.trim() == "postgres" {
                pg += cpu_ticks(&name).unwrap_or(0);
            }
        }
    }
    (me, pg as f64 / hz)
}

async fn fresh_pg(admin: &str, name: &str) -> String {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(admin).await.expect("pg admin");
    for q in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(&q).execute(&mut conn).await.expect("pg");
    }
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    format!("{base}/{name}")
}

/// `--samples` heartbeats of every router through the real ingest path
/// (`Routing::router_heartbeat`: samples and the intervals between them), as fast as they
/// go: every interval lands inside the gates' 60 s window.
async fn seed(routing: &Routing, a: &Args, cells: &[String]) {
    let ctx = cellplane::ctx::Ctx {
        actor: "bench".into(),
        correlation_id: "bench".into(),
    };
    for s in 0..a.samples {
        let batch: Vec<CellCounters> = cells
            .iter()
            .map(|c| counters(c, s as u64, a.heartbeat_secs as u64))
            .collect();
        for r in 0..a.routers {
            let hb = RouterHeartbeat {
                applied_revision: 0,
                drained_revision: None,
                stats: None,
                usage: Vec::new(),
                cells: batch.clone(),
            };
            routing
                .router_heartbeat(&ctx, &format!("router-{r:02}"), hb)
                .await
                .expect("heartbeat");
        }
    }
}

fn gates(burn: bool) -> Gates {
    Gates {
        window_secs: 60,
        latency: Some(LatencyGate {
            percentile: 0.99,
            max_ms: 250.0,
        }),
        burn_rate: burn.then(|| BurnRateGate {
            slo_target: 0.999,
            latency_threshold_ms: None,
            rules: vec![
                BurnRuleSpec {
                    long_secs: 3600,
                    short_secs: 300,
                    factor: 14.4,
                },
                BurnRuleSpec {
                    long_secs: 21600,
                    short_secs: 1800,
                    factor: 6.0,
                },
            ],
        }),
        ..Gates::default()
    }
}

async fn rounds(
    routing: &Routing,
    providers: &Providers,
    cells: &[String],
    a: &Args,
    store_name: &str,
) {
    let floor = chrono::Utc::now() - chrono::Duration::hours(7);
    for (name, burn) in [
        ("error ratio + latency", false),
        ("+ burn rate (2 rules)", true),
    ] {
        let g = gates(burn);
        let p = providers.get(Default::default());
        // Warm up once (caches, prepared statements), then measure.
        let first = release_gates::measure_cells(&p, cells, &g, floor).await;
        assert!(
            first
                .iter()
                .all(|(_, m)| m.result == cellplane::gates::Measurement::Success),
            "every cell passes: {:?}",
            first
                .iter()
                .find(|(_, m)| m.result != cellplane::gates::Measurement::Success)
                .map(|(c, m)| (c, &m.numbers))
        );
        let (c0, p0) = cpu();
        let t0 = std::time::Instant::now();
        for _ in 0..a.rounds {
            let out = release_gates::measure_cells(&p, cells, &g, floor).await;
            assert_eq!(out.len(), cells.len() * if burn { 3 } else { 2 });
        }
        let wall = t0.elapsed().as_secs_f64() / a.rounds as f64;
        let (c1, p1) = cpu();
        // The baseline: each cell read on its own, as many reads as the batch round.
        let reads = if burn { 5 } else { 1 };
        let base_rounds = a.rounds.div_ceil(4).max(2);
        let (b0, q0) = cpu();
        let t1 = std::time::Instant::now();
        for _ in 0..base_rounds {
            for cell in cells {
                for _ in 0..reads {
                    let _ = routing
                        .cell_window_since(cell, 60, &cellplane::persistence::fmt_time(floor))
                        .await
                        .expect("read");
                }
            }
        }
        let base_wall = t1.elapsed().as_secs_f64() / base_rounds as f64;
        let (b1, q1) = cpu();
        let out = serde_json::json!({
            "measure": "round", "store": store_name, "gates": name, "cells": cells.len(),
            "routers": a.routers, "samples": a.samples, "rounds": a.rounds,
            "cpu_ms": (c1 - c0) * 1000.0 / a.rounds as f64,
            "db_cpu_ms": (p1 - p0) * 1000.0 / a.rounds as f64,
            "wall_ms": wall * 1000.0,
            "baseline_cpu_ms": (b1 - b0) * 1000.0 / base_rounds as f64,
            "baseline_db_cpu_ms": (q1 - q0) * 1000.0 / base_rounds as f64,
            "baseline_wall_ms": base_wall * 1000.0,
        });
        println!("{out}");
    }
}

fn heartbeat_bytes(a: &Args, cells: &[String]) {
    let base = RouterHeartbeat {
        applied_revision: 123_456,
        drained_revision: Some(123_456),
        stats: Some(
            serde_json::json!({"requests": 123_456_789u64, "errors": 1234,
            "inflight": 12, "routes": 5000, "cells": cells.len()}),
        ),
        usage: Vec::new(),
        cells: Vec::new(),
    };
    let mut full = base.clone();
    full.cells = cells
        .iter()
        .map(|c| counters(c, 10_000, a.heartbeat_secs as u64))
        .collect();
    let b = serde_json::to_vec(&base).expect("json").len();
    let f = serde_json::to_vec(&full).expect("json").len();
    println!(
        "{}",
        serde_json::json!({"measure": "heartbeat", "cells": cells.len(), "bytes": f,
            "baseline_bytes": b, "bytes_per_cell": (f - b) as f64 / cells.len() as f64,
            "heartbeat_secs": a.heartbeat_secs,
            "bytes_per_sec": f as f64 / a.heartbeat_secs as f64})
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let cells: Vec<String> = (0..a.cells).map(|i| format!("cell-{i:05}")).collect();
    heartbeat_bytes(&a, &cells);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut stores = vec![("sqlite", None)];
    if let Some(admin) = &a.pg {
        stores.push((
            "postgres",
            Some(fresh_pg(admin, "cellplane_bench_gates").await),
        ));
    }
    for (name, url) in stores {
        let data = dir.path().join(name);
        std::fs::create_dir_all(&data).expect("data dir");
        let store = Store::open(url.as_deref(), &data, 16).await.expect("store");
        let routing = Routing::new(store.clone(), RoutingConfig::default());
        let t = std::time::Instant::now();
        seed(&routing, &a, &cells).await;
        let beats = a.samples * a.routers;
        println!(
            "{}",
            serde_json::json!({"measure": "ingest", "store": name, "cells": a.cells,
                "heartbeats": beats,
                "ms_per_heartbeat": t.elapsed().as_secs_f64() * 1000.0 / beats as f64})
        );
        let providers = Providers::new(routing.clone(), &MetricsConfig::default());
        rounds(&routing, &providers, &cells, &a, name).await;
    }
}
