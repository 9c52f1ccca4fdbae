//! Two `cellplane serve` replicas on one PostgreSQL: jobs finish exactly once whichever
//! replica claims them, a dead replica's jobs and controllers move to the other within one
//! lease, a deposed controller cannot commit with its old term, and route changes reach a
//! router watching the other replica at once (LISTEN/NOTIFY).

use cellplane_api::{ControllerInfo, JobState, Page};
use cellplane_tests::*;
use reqwest::Method;
use serde_json::json;
use std::time::{Duration, Instant};

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

fn replica_options() -> AppOptions {
    AppOptions::default()
        .with("CELLPLANE__JOBS__LEASE_SECS", "2")
        .with("CELLPLANE__JOBS__CONTROLLER_LEASE_MS", "2000")
        .with("CELLPLANE__JOBS__CONTROLLER_RENEW_MS", "200")
        // Route watches on one replica must learn of the other's writes by notification,
        // not by re-reading the revision.
        .with("CELLPLANE__ROUTING__REVISION_POLL_MS", "10000")
}

async fn controllers(app: &TestApp) -> Vec<ControllerInfo> {
    let page: Page<ControllerInfo> = app.admin.get("/v1/controllers").await.expect("controllers");
    page.items
}

async fn drift_holder(app: &TestApp) -> Option<ControllerInfo> {
    controllers(app)
        .await
        .into_iter()
        .find(|c| c.name == "drift" && c.live)
}

fn ran_job(app: &TestApp, id: &str) -> bool {
    app.log()
        .lines()
        .any(|l| l.contains("job started") && l.contains(id))
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_submitted_to_either_replica_finish_exactly_once() {
    let a = TestApp::spawn_with(Backend::Postgres, replica_options()).await;
    let b = a.spawn_replica(replica_options()).await;
    let apps = [&a, &b];
    // Five stamps, round-robin.
    let mut stamps = Vec::new();
    for i in 0..5 {
        let out = apps[i % 2]
            .create_cell(
                json!({"cell_id": format!("pool-{i}"), "region": "eu-west-1",
                "tier": "pooled", "template": "local", "capacity": {"tenants": 20, "units": 20}}),
            )
            .await;
        stamps.push(out.job.unwrap().job_id);
    }
    for id in &stamps {
        let done = a.wait_job(id, JOB_TIMEOUT).await;
        assert_eq!(
            done.state,
            JobState::Succeeded,
            "{done:?}\n{}",
            a.job_log(id).await
        );
    }
    a.create_org("acme-corp").await;
    let mut jobs = Vec::new();
    for i in 0..50 {
        let t = format!("t{i:02}");
        apps[i % 2].create_tenant(&t, "acme-corp").await;
        jobs.push(apps[(i + 1) % 2].start_action(&t, "activate").await.job_id);
    }
    for id in &jobs {
        let done = b.wait_job(id, JOB_TIMEOUT).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    }
    let a_ref = &a;
    let n = |sql: &'static str| async move { a_ref.sql_i64(sql).await.unwrap() };
    assert_eq!(
        n("SELECT COUNT(*) FROM tenant_audit WHERE event_type = 'TENANCY_ACTIVATED'").await,
        50
    );
    assert_eq!(
        n("SELECT COUNT(*) FROM tenant_audit WHERE event_type = 'CELL_STAMPED'").await,
        5
    );
    assert_eq!(n("SELECT COUNT(*) FROM routes").await, 50);
    assert_eq!(
        n("SELECT CAST(COALESCE(SUM(used_tenants), 0) AS BIGINT) FROM cells").await,
        50
    );
    assert_eq!(n("SELECT COUNT(*) FROM job_locks").await, 0);
    // Both replicas did work.
    for app in apps {
        let m = app.admin.get_text("/metrics").await.unwrap();
        let claimed: f64 = m
            .lines()
            .find(|l| l.starts_with("cellplane_jobs_total{outcome=\"claimed\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(claimed > 0.0, "each replica claims jobs:\n{m}");
    }
    // One holder of each controller among the two.
    let ca = controllers(&a).await;
    let cb = controllers(&b).await;
    for name in ["drift", "webhooks", "usage"] {
        let holders = ca
            .iter()
            .chain(cb.iter())
            .filter(|c| c.name == name && c.this_replica)
            .count();
        assert_eq!(holders, 1, "{name}: {ca:?} {cb:?}");
    }
    assert!(a.audit_verify_ok().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_stamp_and_controller_move_to_the_other() {
    let fp = replica_options().with("CELLPLANE__JOBS__FAILPOINTS", "cell.stamp/apply=pause@1");
    let mut a = TestApp::spawn_with(Backend::Postgres, fp.clone()).await;
    let mut b = a.spawn_replica(fp).await;
    // The stamp pauses before its apply on whichever replica claimed it.
    let out = a
        .create_cell(
            json!({"cell_id": "pool-1", "region": "eu-west-1", "tier": "pooled",
            "template": "local", "capacity": {"tenants": 5, "units": 5}}),
        )
        .await;
    let job = out.job.unwrap().job_id;
    let (admin, id) = (a.admin.clone(), job.clone());
    eventually(JOB_TIMEOUT, || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            let j = admin.get_job(&id).await.ok()?;
            (j.step.as_deref() == Some("apply")).then_some(())
        }
    })
    .await
    .expect("the stamp reaches its apply");
    let a_runs_it = ran_job(&a, &job);
    let (runner, other) = if a_runs_it {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    runner.kill9();
    let killed = Instant::now();
    let (admin, id) = (other.admin.clone(), job.clone());
    eventually(JOB_TIMEOUT, || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            let j = admin.get_job(&id).await.ok()?;
            (j.attempts >= 2).then_some(())
        }
    })
    .await
    .expect("the other replica takes the stamp over");
    let taken_over = killed.elapsed();
    assert!(
        taken_over <= Duration::from_millis(2000 + 1500),
        "re-leased within one job lease (2 s) plus polling: {taken_over:?}"
    );
    let done = other.wait_job(&job, JOB_TIMEOUT).await;
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{}",
        other.job_log(&job).await
    );
    assert_eq!(done.attempts, 2);

    // The drift controller: kill its holder, the other takes over within one lease.
    runner.start().await.unwrap();
    let holder = eventually(JOB_TIMEOUT, || async {
        for app in [&*runner, &*other] {
            if controllers(app)
                .await
                .iter()
                .any(|c| c.name == "drift" && c.this_replica)
            {
                return Some(());
            }
        }
        None
    })
    .await;
    holder.expect("a replica holds the drift controller");
    let runner_holds = controllers(runner)
        .await
        .iter()
        .any(|c| c.name == "drift" && c.this_replica);
    let (leader, standby) = if runner_holds {
        (runner, other)
    } else {
        (other, runner)
    };
    let term = drift_holder(leader).await.unwrap().term;
    leader.kill9();
    let killed = Instant::now();
    eventually(Duration::from_secs(30), || async {
        let c = drift_holder(standby).await?;
        (c.this_replica && c.term == term + 1).then_some(())
    })
    .await
    .expect("the standby takes the drift controller over");
    let failover = killed.elapsed();
    assert!(
        failover <= Duration::from_millis(2000 + 1000),
        "failover within the controller lease (2 s) + 1 s: {failover:?}"
    );
    let m = standby.admin.get_text("/metrics").await.unwrap();
    assert!(
        m.contains("cellplane_controller_leader{controller=\"drift\"} 1"),
        "{m}"
    );
}

// A holder paused (SIGSTOP) at the moment it is about to write, whose lease expires and is
// taken over, cannot commit with its old term when it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_controller_cannot_write_with_its_old_term() {
    let opts = replica_options()
        .with("CELLPLANE__IAC__DRIFT_INTERVAL_SECS", "1")
        .with(
            "CELLPLANE__JOBS__FAILPOINTS",
            "controller.drift/write=stop@1",
        );
    let a = TestApp::spawn_with(Backend::Postgres, opts.clone()).await;
    let b = a.spawn_replica(opts).await;
    a.stamp_local("pool-1", json!({})).await;
    // Term 1's holder stops itself right before its first drift write.
    let stopped = eventually(JOB_TIMEOUT, || async {
        for app in [&a, &b] {
            if app.log().contains("failpoint hit") && app.log().contains("controller.drift/write") {
                return Some(app.pid().unwrap());
            }
        }
        None
    })
    .await
    .expect("the first holder stops at its write");
    let (paused, live) = if a.pid() == Some(stopped) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    eventually(Duration::from_secs(30), || async {
        let c = drift_holder(live).await?;
        (c.this_replica && c.term >= 2).then_some(())
    })
    .await
    .expect("the other replica takes the lease over");
    eventually(Duration::from_secs(30), || async {
        let n = live
            .sql_i64(
                "SELECT COUNT(*) FROM tenant_audit WHERE event_type = 'CELL_DRIFT_CHECK_REQUESTED'",
            )
            .await
            .ok()?;
        (n >= 1).then_some(())
    })
    .await
    .expect("the new holder enqueues the drift check");
    signal(stopped, "-CONT");
    eventually(Duration::from_secs(30), || async {
        paused.log().contains("deposed").then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("the resumed holder's write is refused:\n{}", paused.log()));
    let old_term = live
        .sql_i64(
            "SELECT COUNT(*) FROM tenant_audit WHERE event_type = 'CELL_DRIFT_CHECK_REQUESTED' \
             AND payload LIKE '%\"controller_term\":1%'",
        )
        .await
        .unwrap();
    assert_eq!(old_term, 0, "no write carries the deposed term");
    assert!(live.audit_verify_ok().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_change_on_one_replica_reaches_a_router_watching_the_other_at_once() {
    let a = TestApp::spawn_with(Backend::Postgres, replica_options()).await;
    let b = a.spawn_replica(replica_options()).await;
    a.stamp_local("pool-1", json!({})).await;
    a.create_org("acme-corp").await;
    a.create_tenant("acme", "acme-corp").await;
    assert_eq!(
        a.lifecycle("acme", "activate").await.state,
        JobState::Succeeded
    );
    let token = b.token("router").await;
    let router = TestRouter::spawn(&b.url, &token, &[]).await;
    router.wait_revision(a.routing_revision().await).await;
    let mut samples = Vec::new();
    for i in 0..10 {
        let mode = if i % 2 == 0 { "hold" } else { "serve" };
        let r = a
            .req(Method::PATCH, "/v1/routes/acme/prod")
            .json(&json!({"mode": mode}))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "{}",
            r.text().await.unwrap_or_default()
        );
        let written = Instant::now();
        let rev = a.routing_revision().await;
        loop {
            let h = router.healthz().await;
            if h["revision"].as_i64().unwrap_or(-1) >= rev {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "router stuck: {h}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples.push(written.elapsed());
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    assert!(
        p50 < Duration::from_millis(100),
        "a change committed on A reaches a router watching B (revision poll 10 s) in {samples:?}"
    );
}
