//! Durable jobs through the real binary: crash and resume, cancellation.

use cellplane_api::{JobState, TenantState};
use cellplane_tests::*;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

both_backends!(
    sigkilled_job_is_re_leased_and_finishes_once,
    |b| async move {
        let opts = AppOptions::default()
            .with("CELLPLANE__JOBS__STEP_DELAY_MS", "1500")
            .with("CELLPLANE__JOBS__LEASE_SECS", "2");
        let mut app = TestApp::spawn_with(b, opts).await;
        app.stamp_local("euw1-pool-1", serde_json::json!({})).await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        let r = app
            .req(Method::POST, "/v1/tenants/acme/activate")
            .send()
            .await
            .unwrap();
        let job: cellplane_api::Job = r.json().await.unwrap();
        // Wait until the first step is recorded, then kill the server mid-run.
        let admin = app.admin.clone();
        let id = job.job_id.clone();
        eventually(Duration::from_secs(20), || {
            let admin = admin.clone();
            let id = id.clone();
            async move {
                let j = admin.get_job(&id).await.ok()?;
                (j.state == JobState::Running && j.progress > 0.0).then_some(())
            }
        })
        .await
        .expect("job reaches its first step");
        app.kill9();
        let state = app
            .sql_i64(&format!(
                "SELECT COUNT(*) FROM jobs WHERE job_id = '{id}' AND state = 'running'"
            ))
            .await
            .unwrap();
        assert_eq!(state, 1, "the killed job is left running with a lease");
        app.start().await.unwrap();
        let done = app
            .admin
            .wait_job(&id, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{}", app.log());
        assert_eq!(done.attempts, 2, "re-leased once after the crash");
        let t = app.admin.get_tenant("acme").await.unwrap();
        assert_eq!(t.state, TenantState::Active);
        assert_eq!(t.version, 2, "the transition was applied once");
        let activated = app
            .sql_i64("SELECT COUNT(*) FROM tenant_audit WHERE event_type = 'TENANCY_ACTIVATED'")
            .await
            .unwrap();
        assert_eq!(activated, 1);
        let log = app
            .admin
            .get_text(&format!("/v1/jobs/{id}/log"))
            .await
            .unwrap();
        assert_eq!(
            log.matches("step check-tenant done").count(),
            1,
            "finished steps are not redone:\n{log}"
        );
        assert_eq!(
            log.matches("step prepare-environments done").count(),
            1,
            "{log}"
        );
        assert!(app.admin.audit_verify().await.unwrap().ok);
    }
);

both_backends!(cancel_running_and_queued_jobs, |b| async move {
    let opts = AppOptions::default()
        .with("CELLPLANE__JOBS__STEP_DELAY_MS", "2000")
        .with("CELLPLANE__JOBS__WORKERS", "1");
    let app = TestApp::spawn_with(b, opts).await;
    app.create_org("acme-corp").await;
    app.create_tenant("acme", "acme-corp").await;
    app.create_tenant("globex", "acme-corp").await;
    let j1: cellplane_api::Job = app
        .req(Method::POST, "/v1/tenants/acme/activate")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let j2: cellplane_api::Job = app
        .req(Method::POST, "/v1/tenants/globex/activate")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let admin = app.admin.clone();
    let id1 = j1.job_id.clone();
    eventually(Duration::from_secs(20), || {
        let admin = admin.clone();
        let id1 = id1.clone();
        async move { (admin.get_job(&id1).await.ok()?.state == JobState::Running).then_some(()) }
    })
    .await
    .unwrap();
    // The single worker is busy: the second job is still queued and cancels at once.
    let c2: Value = app
        .admin
        .post(
            &format!("/v1/jobs/{}/cancel", j2.job_id),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(c2["state"], "cancelled");
    let c1: Value = app
        .admin
        .post(
            &format!("/v1/jobs/{}/cancel", j1.job_id),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(c1["cancel_requested"], true);
    let done = app
        .admin
        .wait_job(&j1.job_id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Cancelled, "{done:?}");
    for t in ["acme", "globex"] {
        let t = app.admin.get_tenant(t).await.unwrap();
        assert_eq!(t.state, TenantState::Draft);
        assert!(t.pending_job_id.is_none(), "cancel released the tenant");
    }
    // Cancelling an ended job is a conflict; the tenant can be activated again.
    let r = app
        .req(Method::POST, &format!("/v1/jobs/{}/cancel", j1.job_id))
        .send()
        .await
        .unwrap();
    expect_problem(r, 409).await;
    let r = app
        .req(Method::POST, "/v1/tenants/acme/activate")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
});
