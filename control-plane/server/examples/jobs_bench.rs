//! bench/jobs: throughput and enqueue→start latency of the job engine with no-op jobs, on
//! SQLite and on PostgreSQL with one and two replicas (two engines in this process, each
//! with its own pool, worker identity and change listener). The baseline, measured in the
//! same run on the same store, is the bare queue: workers that only claim, finish and
//! release a job with the store's own statements, no engine around them.
//!
//!   cargo run --release --features bench-kinds -p cellplane --example jobs_bench -- \
//!       [--pg ADMIN_URL] [--jobs 10000] [--workers 4] [--idle-samples 200]
//!
//! Prints one JSON object per scenario on stdout (bench/jobs/run.sh turns them into a table).

use cellplane::config::Config;
use cellplane::jobs::noop::{Noop, NoopSpec};
use cellplane::jobs::Kind;
use cellplane::persistence::{NewJob, Store};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Args {
    pg: Option<String>,
    jobs: usize,
    workers: usize,
    idle_samples: usize,
}

fn args() -> Args {
    let mut a = Args {
        pg: None,
        jobs: 10_000,
        workers: 4,
        idle_samples: 200,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--pg" => a.pg = Some(v),
            "--jobs" => a.jobs = v.parse().expect("--jobs N"),
            "--workers" => a.workers = v.parse().expect("--workers N"),
            "--idle-samples" => a.idle_samples = v.parse().expect("--idle-samples N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

async fn fresh_pg(admin: &str, name: &str) -> String {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(admin).await.expect("pg admin");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut conn)
        .await
        .expect("drop db");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create db");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    format!("{base}/{name}")
}

async fn enqueue(store: &Store, from: usize, n: usize) {
    let batch = 500;
    let mut i = from;
    while i < from + n {
        let mut tx = store.write().await.expect("tx");
        for j in i..(i + batch).min(from + n) {
            let spec = NoopSpec {
                resource: format!("bench/{j}"),
            };
            tx.insert_job(&NewJob {
                job_id: &format!("job-{j:08}"),
                kind: Noop::NAME,
                target: &spec.resource,
                payload: serde_json::to_value(&spec).expect("spec"),
                max_attempts: 3,
                correlation_id: None,
                locks: vec![spec.resource.clone()],
            })
            .await
            .expect("insert");
        }
        tx.commit().await.expect("commit");
        i += batch;
    }
}

async fn succeeded(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'")
        .fetch_one(store.pool())
        .await
        .expect("count")
}

async fn job_succeeded(store: &Store, id: &str) -> bool {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE job_id = $1")
        .bind(id)
        .fetch_optional(store.pool())
        .await
        .expect("state");
    state.as_deref() == Some("succeeded")
}

/// enqueue→start of every succeeded job, in milliseconds, sorted.
async fn latencies(store: &Store) -> Vec<f64> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT created_at, started_at FROM jobs WHERE state = 'succeeded' AND started_at IS NOT NULL",
    )
    .fetch_all(store.pool())
    .await
    .expect("latencies");
    let mut out: Vec<f64> = rows
        .iter()
        .filter_map(|(c, s)| {
            let c = cellplane::persistence::parse_time(c)?;
            let s = cellplane::persistence::parse_time(s)?;
            Some((s - c).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    out.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    out
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn open(url: Option<&str>, dir: &std::path::Path) -> Store {
    Store::open(url, dir, 16).await.expect("store")
}

/// The baseline: `workers` tasks that claim, finish and release with the store's own
/// statements until the queue is empty.
async fn bare_queue(store: &Store, jobs: usize, workers: usize) -> f64 {
    enqueue(store, 0, jobs).await;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("bare-{w}");
            while let Some(j) = store.claim_job(&owner, 30_000).await.expect("claim") {
                let mut tx = store.write().await.expect("tx");
                tx.finish_job(
                    &j.job.job_id,
                    &owner,
                    cellplane_api::JobState::Succeeded,
                    None,
                )
                .await
                .expect("finish");
                tx.release_locks(&j.job.job_id).await.expect("release");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    jobs as f64 / busy_secs(store).await
}

/// Seconds from the first job's start to the last job's end, by the timestamps the store
/// recorded (the same measure for the engine and the baseline; no polling granularity).
async fn busy_secs(store: &Store) -> f64 {
    let (first, last): (String, String) = sqlx::query_as(
        "SELECT MIN(started_at), MAX(finished_at) FROM jobs WHERE state = 'succeeded'",
    )
    .fetch_one(store.pool())
    .await
    .expect("span");
    let first = cellplane::persistence::parse_time(&first).expect("time");
    let last = cellplane::persistence::parse_time(&last).expect("time");
    (last - first).num_microseconds().expect("span") as f64 / 1e6
}

struct Replica {
    service: cellplane::service::Service,
    stop: CancellationToken,
}

/// One engine per store: each store is a replica (its own pool, as a process would have).
async fn start_replicas(stores: Vec<Store>, workers: usize) -> Vec<Replica> {
    let mut out = Vec::new();
    for store in stores {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let mut config = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        config.jobs.workers = workers;
        if let Ok(p) = std::env::var("BENCH_POLL_MS") {
            config.jobs.poll_ms = p.parse().expect("BENCH_POLL_MS");
        }
        let (service, engine) =
            cellplane::startup::service_and_engine(&config, store.clone()).expect("engine");
        let stop = CancellationToken::new();
        engine.spawn(stop.clone());
        let s = service.clone();
        store.spawn_listener(stop.clone(), move |_| s.job_notify().notify_waiters());
        out.push(Replica { service, stop });
    }
    out
}

/// (steal, total) CPU ticks from /proc/stat: on a virtual machine, the share of time the
/// hypervisor gave to others, which makes absolute numbers swing between runs.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.get(7).copied().unwrap_or(0), v.iter().take(8).sum())
}

async fn scenario(name: &str, url: Option<String>, replicas: usize, a: &Args) {
    let ticks = cpu_ticks();
    let dir = tempfile::tempdir().expect("tempdir");
    // Baseline on its own database.
    let (base_url, engine_url) = match &url {
        Some(admin) => (
            Some(fresh_pg(admin, &format!("bench_base_{replicas}")).await),
            Some(fresh_pg(admin, &format!("bench_engine_{replicas}")).await),
        ),
        None => (None, None),
    };
    let base_dir = dir.path().join("base");
    std::fs::create_dir_all(&base_dir).expect("dir");
    let base_store = open(base_url.as_deref(), &base_dir).await;
    let bare = bare_queue(&base_store, a.jobs, a.workers * replicas).await;
    base_store.close().await;

    let eng_dir = dir.path().join("engine");
    std::fs::create_dir_all(&eng_dir).expect("dir");
    let store = open(engine_url.as_deref(), &eng_dir).await;
    // SQLite serves one process: its one replica uses the one store. On PostgreSQL each
    // replica has a pool of its own.
    let stores = if engine_url.is_some() {
        let mut v = Vec::new();
        for _ in 0..replicas {
            v.push(open(engine_url.as_deref(), &eng_dir).await);
        }
        v
    } else {
        vec![store.clone()]
    };
    // The whole backlog is in place before the first worker starts, as for the baseline.
    enqueue(&store, 0, a.jobs).await;
    let rs = start_replicas(stores, a.workers).await;
    for r in &rs {
        r.service.job_notify().notify_waiters();
    }
    while succeeded(&store).await < a.jobs as i64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let throughput = a.jobs as f64 / busy_secs(&store).await;
    let loaded = latencies(&store).await;

    // Idle: one job at a time, the engine waiting.
    let mut idle = Vec::new();
    for i in 0..a.idle_samples {
        let id = a.jobs + i;
        enqueue(&store, id, 1).await;
        rs[0].service.job_notify().notify_waiters();
        while !job_succeeded(&store, &format!("job-{id:08}")).await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let row: (String, String) =
            sqlx::query_as("SELECT created_at, started_at FROM jobs WHERE job_id = $1")
                .bind(format!("job-{id:08}"))
                .fetch_one(store.pool())
                .await
                .expect("row");
        let c = cellplane::persistence::parse_time(&row.0).expect("time");
        let s = cellplane::persistence::parse_time(&row.1).expect("time");
        idle.push((s - c).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    idle.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    for r in &rs {
        r.stop.cancel();
    }
    let (steal, total) = cpu_ticks();
    let steal_pct = 100.0 * (steal - ticks.0) as f64 / ((total - ticks.1).max(1)) as f64;
    let out = serde_json::json!({
        "scenario": name, "replicas": replicas, "workers_per_replica": a.workers, "jobs": a.jobs,
        "engine_jobs_per_s": throughput, "bare_queue_jobs_per_s": bare,
        "ratio_engine_to_bare": throughput / bare,
        "loaded_start_p50_ms": pct(&loaded, 0.5), "loaded_start_p99_ms": pct(&loaded, 0.99),
        "idle_start_p50_ms": pct(&idle, 0.5), "idle_start_p99_ms": pct(&idle, 0.99),
        "idle_samples": idle.len(),
        "cpu_steal_pct": steal_pct,
    });
    println!("{out}");
}

#[tokio::main]
async fn main() {
    let a = args();
    // BENCH_SCENARIOS=sqlite,postgres-1-replica runs only those.
    let only = std::env::var("BENCH_SCENARIOS").ok();
    let run = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|s| s == name))
    };
    if run("sqlite") {
        scenario("sqlite", None, 1, &a).await;
    }
    if let Some(pg) = a.pg.clone() {
        if run("postgres-1-replica") {
            scenario("postgres-1-replica", Some(pg.clone()), 1, &a).await;
        }
        if run("postgres-2-replicas") {
            scenario("postgres-2-replicas", Some(pg), 2, &a).await;
        }
    }
}
