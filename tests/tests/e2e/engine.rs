//! Job engine v2 through the real binary: locks held from enqueue to end, compensation on
//! cancel, a test-only kind, and crash tests that stop a job at a named step (failpoints).

use super::stamping::{sample_cells_of, state_list};
use cellplane::jobs::test_hold::{HoldSpec, TestHold};
use cellplane::persistence::Store;
use cellplane_api::{CellState, JobState, TenantState};
use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

async fn post(app: &TestApp, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = app.req(Method::POST, path);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("send");
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(Value::Null);
    (status, v)
}

/// Waits until `id` is queued again after a failed attempt.
async fn wait_backing_off(app: &TestApp, id: &str) -> cellplane_api::Job {
    let (admin, id) = (app.admin.clone(), id.to_string());
    eventually(JOB_TIMEOUT, || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            let j = admin.get_job(&id).await.ok()?;
            (j.state == JobState::Queued && j.attempts >= 1 && j.error.is_some()).then_some(j)
        }
    })
    .await
    .expect("the job fails an attempt and waits for its retry")
}

async fn store_of(app: &TestApp) -> Store {
    Store::open(app.database_url.as_deref(), &app.data_dir, 2)
        .await
        .expect("open the app's store")
}

// Regression: a `tenant.place` job (an environment added to an active tenant) was enqueued
// without reserving the tenant, so a suspend or archive was accepted while the placement
// waited for a retry.
both_backends!(a_waiting_placement_holds_its_tenant, |b| async move {
    let app = TestApp::spawn_with(
        b,
        AppOptions::default().with("CELLPLANE__JOBS__FAILPOINTS", "tenant.place/place=wait"),
    )
    .await;
    app.stamp_local("euw1-pool-1", json!({})).await;
    app.create_org("acme-corp").await;
    app.create_tenant("acme", "acme-corp").await;
    let j = app.lifecycle("acme", "activate").await;
    assert_eq!(j.state, JobState::Succeeded);
    let (status, env) = post(
        &app,
        "/v1/tenants/acme/environments",
        Some(json!({"name": "dev"})),
    )
    .await;
    assert_eq!(status, 201, "{env}");
    let place = env["placement_job_id"]
        .as_str()
        .expect("a placement job")
        .to_string();
    let (admin, id) = (app.admin.clone(), place.clone());
    eventually(JOB_TIMEOUT, || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            let log = admin.get_text(&format!("/v1/jobs/{id}/log")).await.ok()?;
            log.contains("waiting: place: failpoint").then_some(())
        }
    })
    .await
    .expect("the placement waits");
    for action in ["suspend", "archive"] {
        let (status, problem) = post(&app, &format!("/v1/tenants/acme/{action}"), None).await;
        assert_eq!(status, 409, "{action} while placing: {problem}");
        assert!(
            problem["detail"].as_str().unwrap_or("").contains(&place),
            "the conflict names the holding job: {problem}"
        );
    }
    let (status, _) = post(&app, &format!("/v1/jobs/{place}/cancel"), None).await;
    assert_eq!(status, 200);
    let done = app.wait_job(&place, JOB_TIMEOUT).await;
    assert_eq!(done.state, JobState::Cancelled);
    let t = app.admin.get_tenant("acme").await.unwrap();
    let dev = t.environments.iter().find(|e| e.name == "dev").unwrap();
    assert_eq!(
        dev.cell_id, None,
        "the cancelled placement gave its cell back"
    );
    let j = app.lifecycle("acme", "suspend").await;
    assert_eq!(
        j.state,
        JobState::Succeeded,
        "the tenant is free once the job ended"
    );
    assert!(app.audit_verify_ok().await);
});

// Regression: cancelling an activation that had placed the tenant and was queued for a
// retry of `publish-routes` put the tenant back in `draft` with its cell and capacity.
both_backends!(
    a_cancelled_activation_gives_back_what_it_placed,
    |b| async move {
        let app = TestApp::spawn_with(
            b,
            AppOptions::default()
                .with(
                    "CELLPLANE__JOBS__FAILPOINTS",
                    "tenant.activate/publish-routes=error",
                )
                .with("CELLPLANE__JOBS__BACKOFF_BASE_MS", "600000")
                .with("CELLPLANE__JOBS__BACKOFF_CAP_MS", "600000"),
        )
        .await;
        app.stamp_local("euw1-pool-1", json!({})).await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        let job = app.start_action("acme", "activate").await;
        wait_backing_off(&app, &job.job_id).await;
        let placed = app.cell("euw1-pool-1").await;
        assert_eq!(placed.used.tenants, 1, "placed before the failing step");
        let (status, _) = post(&app, &format!("/v1/jobs/{}/cancel", job.job_id), None).await;
        assert_eq!(status, 200);
        let done = app.admin.get_job(&job.job_id).await.unwrap();
        assert_eq!(done.state, JobState::Cancelled);
        let t = app.admin.get_tenant("acme").await.unwrap();
        assert_eq!(t.state, TenantState::Draft);
        assert_eq!(t.pending_job_id, None);
        assert!(t.environments.iter().all(|e| e.cell_id.is_none()), "{t:?}");
        let cell = app.cell("euw1-pool-1").await;
        assert_eq!(
            (cell.used.tenants, cell.used.units),
            (0, 0),
            "capacity given back"
        );
        let routes = app
            .sql_i64("SELECT COUNT(*) FROM routes WHERE tenant_id = 'acme'")
            .await
            .unwrap();
        assert_eq!(routes, 0);
        assert!(app.audit_verify_ok().await);
    }
);

// While a stamp of a cell backs off between attempts, the cell stays held: an apply, a
// change of its spec and a delete are refused, naming the stamp.
both_backends!(a_stamp_backing_off_holds_its_cell, |b| async move {
    let app = TestApp::spawn_with(
        b,
        AppOptions::default()
            .with("CELLPLANE__JOBS__FAILPOINTS", "cell.stamp/init=error@1")
            .with("CELLPLANE__JOBS__BACKOFF_BASE_MS", "600000")
            .with("CELLPLANE__JOBS__BACKOFF_CAP_MS", "600000"),
    )
    .await;
    let out = app
        .create_cell(
            json!({"cell_id": "c1", "region": "eu-west-1", "tier": "pooled",
            "template": "local", "capacity": {"tenants": 5, "units": 5}}),
        )
        .await;
    let stamp = out.job.unwrap().job_id;
    wait_backing_off(&app, &stamp).await;
    let (status, p) = post(&app, "/v1/cells/c1/apply", None).await;
    assert_eq!(status, 409, "{p}");
    assert!(p["detail"].as_str().unwrap_or("").contains(&stamp), "{p}");
    let r = app
        .req(Method::DELETE, "/v1/cells/c1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let store = store_of(&app).await;
    let mut tx = store.write().await.unwrap();
    let e = cellplane::jobs::enqueue::<TestHold>(
        &mut tx,
        &HoldSpec {
            resources: vec!["cell/c1".into()],
        },
        1,
        None,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains(&stamp), "{e}");
});

// A job holding a tenant and two cells blocks jobs on any of them until it ends; its typed
// state survives a crash and its finished steps are not redone. `test.hold` is a kind
// registered in its own file (debug builds).
both_backends!(
    a_job_holding_a_tenant_and_two_cells_blocks_them_all,
    |b| async move {
        let mut app = TestApp::spawn_with(
            b,
            AppOptions::default().with("CELLPLANE__JOBS__LEASE_SECS", "2"),
        )
        .await;
        app.stamp_cells(&[
            ("ca", "eu-west-1", "pooled", 5, 5),
            ("cb", "eu-west-1", "pooled", 5, 5),
        ])
        .await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        let store = store_of(&app).await;
        let mut tx = store.write().await.unwrap();
        let hold = cellplane::jobs::enqueue::<TestHold>(
            &mut tx,
            &HoldSpec {
                resources: vec!["tenant/acme".into(), "cell/ca".into(), "cell/cb".into()],
            },
            3,
            None,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let id = hold.job_id.clone();
        let admin = app.admin.clone();
        eventually(JOB_TIMEOUT, || {
            let (admin, id) = (admin.clone(), id.clone());
            async move {
                let j = admin.get_job(&id).await.ok()?;
                (j.state == JobState::Running && j.step.as_deref() == Some("start")).then_some(())
            }
        })
        .await
        .expect("the hold job runs");
        for path in [
            "/v1/tenants/acme/activate",
            "/v1/cells/ca/apply",
            "/v1/cells/cb/apply",
            "/v1/cells/ca/plan",
        ] {
            let (status, p) = post(&app, path, None).await;
            assert_eq!(status, 409, "{path}: {p}");
            assert!(
                p["detail"].as_str().unwrap_or("").contains(&id),
                "{path}: {p}"
            );
        }
        let r = app
            .req(Method::PATCH, "/v1/cells/cb")
            .json(&json!({"vars": {"instance_class": "large"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409);
        // Crash while holding: the restarted engine resumes at `hold` with the state the
        // first run recorded, and the locks are still held meanwhile.
        app.kill9();
        app.start().await.unwrap();
        let (status, _) = post(&app, "/v1/cells/ca/apply", None).await;
        assert_eq!(status, 409, "locks survive the crash");
        let admin = app.admin.clone();
        let id2 = id.clone();
        eventually(JOB_TIMEOUT, || {
            let (admin, id) = (admin.clone(), id2.clone());
            async move {
                let j = admin.get_job(&id).await.ok()?;
                (j.state == JobState::Running && j.attempts == 2).then_some(())
            }
        })
        .await
        .expect("the hold job is re-leased");
        let (status, _) = post(&app, &format!("/v1/jobs/{id}/cancel"), None).await;
        assert_eq!(status, 200);
        let done = app.wait_job(&id, JOB_TIMEOUT).await;
        assert_eq!(done.state, JobState::Cancelled, "{}", app.log());
        let ended: String = app
            .sql_text("SELECT payload FROM tenant_audit WHERE event_type = 'TEST_HOLD_ENDED'")
            .await;
        let ended: Value = serde_json::from_str(&ended).unwrap();
        assert_eq!(
            ended["holds_started"], 1,
            "state kept, start not redone: {ended}"
        );
        let j = app.lifecycle("acme", "activate").await;
        assert_eq!(j.state, JobState::Succeeded);
        let (status, _) = post(&app, "/v1/cells/cb/apply", None).await;
        assert_eq!(status, 202);
        assert!(app.audit_verify_ok().await);
    }
);

/// Activation steps, each killed right after its effect and before the job recorded it.
const ACTIVATION_STEPS: &[&str] = &[
    "check-tenant",
    "prepare-environments",
    "place",
    "publish-routes",
];

// For every step of an activation: SIGKILL the control plane at that step, restart, and
// the job finishes exactly once: capacity reserved once, one route published once, one
// ACTIVATED record, the audit chain verifies.
both_backends!(
    activation_killed_at_each_step_finishes_once,
    |b| async move {
        let mut app = TestApp::spawn_with(
            b,
            AppOptions::default().with("CELLPLANE__JOBS__LEASE_SECS", "2"),
        )
        .await;
        app.stamp_local("euw1-pool-1", json!({})).await;
        app.create_org("acme-corp").await;
        let base = app.options.clone();
        for (i, step) in ACTIVATION_STEPS.iter().enumerate() {
            let tenant = format!("t{i}");
            app.create_tenant(&tenant, "acme-corp").await;
            app.kill9();
            app.options = base.clone().with(
                "CELLPLANE__JOBS__FAILPOINTS",
                &format!("tenant.activate/{step}/after=kill@1"),
            );
            app.start().await.unwrap();
            // The job may reach the failpoint before the answer is written: then the
            // request fails and the job is found in the store after the restart.
            let answered = app
                .req(
                    reqwest::Method::POST,
                    &format!("/v1/tenants/{tenant}/activate"),
                )
                .send()
                .await;
            let job_id = match answered {
                Ok(r) => {
                    assert_eq!(r.status(), 202, "{step}");
                    Some(r.json::<cellplane_api::Job>().await.unwrap().job_id)
                }
                Err(_) => None,
            };
            assert!(
                app.wait_exit(JOB_TIMEOUT).await,
                "the failpoint at {step} kills the control plane"
            );
            app.options = base.clone();
            app.start().await.unwrap();
            let job_id = match job_id {
                Some(j) => j,
                None => {
                    app.sql_text(&format!(
                        "SELECT job_id FROM jobs WHERE target = 'tenant/{tenant}'"
                    ))
                    .await
                }
            };
            let done = app.wait_job(&job_id, JOB_TIMEOUT).await;
            assert_eq!(
                done.state,
                JobState::Succeeded,
                "{step}: {done:?}\n{}",
                app.log()
            );
            assert_eq!(done.attempts, 2, "{step}: resumed once");
            let t = app.admin.get_tenant(&tenant).await.unwrap();
            assert_eq!(t.state, TenantState::Active, "{step}");
            assert_eq!(t.version, 2, "{step}: one transition");
            let count = |sql: String| {
                let app = &app;
                async move { app.sql_i64(&sql).await.unwrap() }
            };
            assert_eq!(
                count(format!(
                    "SELECT COUNT(*) FROM routes WHERE tenant_id = '{tenant}'"
                ))
                .await,
                1,
                "{step}"
            );
            assert_eq!(
            count(format!(
                "SELECT COUNT(*) FROM tenant_audit WHERE tenant_id = '{tenant}' AND event_type = 'ROUTE_CHANGED'"
            ))
            .await,
            1,
            "{step}: the route is published once"
        );
            assert_eq!(
            count(format!(
                "SELECT COUNT(*) FROM tenant_audit WHERE tenant_id = '{tenant}' AND event_type = 'TENANCY_ACTIVATED'"
            ))
            .await,
            1,
            "{step}"
        );
            let cell = app.cell("euw1-pool-1").await;
            assert_eq!(
                cell.used.tenants,
                i as u64 + 1,
                "{step}: capacity reserved once"
            );
        }
        assert!(app.audit_verify_ok().await);
    }
);

/// Where a cell stamp is killed: after its first step, at each terraform phase, and after
/// terraform before the job's end is committed.
const STAMP_POINTS: &[&str] = &[
    "begin/after",
    "render",
    "init",
    "plan",
    "apply",
    "outputs",
    "terraform/after",
];

// For every step of a cell stamp: SIGKILL at that step, restart, and the stamp finishes
// exactly once: each resource applied once (one sample-cell process, the two resources in
// the state), one CELL_STAMPED record, the audit chain verifies.
both_backends!(stamp_killed_at_each_step_finishes_once, |b| async move {
    let mut app = TestApp::spawn_with(
        b,
        AppOptions::default().with("CELLPLANE__JOBS__LEASE_SECS", "2"),
    )
    .await;
    let base = app.options.clone();
    for (i, point) in STAMP_POINTS.iter().enumerate() {
        let cell_id = format!("k{i}");
        app.kill9();
        app.options = base.clone().with(
            "CELLPLANE__JOBS__FAILPOINTS",
            &format!("cell.stamp/{point}=kill@1"),
        );
        app.start().await.unwrap();
        let out = app
            .create_cell(
                json!({"cell_id": cell_id, "region": "eu-west-1", "tier": "pooled",
                "template": "local", "capacity": {"tenants": 1, "units": 1}}),
            )
            .await;
        let job = out.job.unwrap();
        assert!(
            app.wait_exit(JOB_TIMEOUT).await,
            "the failpoint at {point} kills the control plane"
        );
        app.options = base.clone();
        app.start().await.unwrap();
        let done = app.wait_job(&job.job_id, JOB_TIMEOUT).await;
        let log = app.job_log(&job.job_id).await;
        assert_eq!(
            done.state,
            JobState::Succeeded,
            "{point}: {log}\n{}",
            app.log()
        );
        assert_eq!(done.attempts, 2, "{point}: resumed once");
        let cell = app.cell(&cell_id).await;
        assert_eq!(cell.state, CellState::Active, "{point}");
        assert_eq!(
            state_list(&app, &cell_id),
            vec!["terraform_data.process", "terraform_data.reaper"],
            "{point}"
        );
        assert_eq!(
            sample_cells_of(&app, &cell_id).len(),
            1,
            "{point}: one process"
        );
        let stamped = app
            .sql_i64(&format!(
                "SELECT COUNT(*) FROM tenant_audit WHERE event_type = 'CELL_STAMPED' AND target = 'cell/{cell_id}'"
            ))
            .await
            .unwrap();
        assert_eq!(stamped, 1, "{point}");
        // The log of an attempt killed mid-run may miss its last lines; what the second
        // attempt says is enough: it either created the process (the first never got to)
        // or found nothing to change.
        let creations = log
            .matches("terraform_data.process: Creation complete")
            .count();
        assert!(creations <= 1, "{point}: created {creations} times\n{log}");
        assert!(
            creations == 1 || log.contains("no changes: nothing to apply"),
            "{point}: the second attempt re-applied\n{log}"
        );
    }
    assert!(app.audit_verify_ok().await);
});
