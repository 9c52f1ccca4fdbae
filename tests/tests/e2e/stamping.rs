//! Stamping cells with the real terraform binary: the `local` template's lifecycle
//! (stamp, update, destroy), and what the job engine promises around it.

use cellplane_api::{CellState, JobState};
use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

async fn get_json(url: &str) -> Option<Value> {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

fn sample_cells_of(app: &TestApp, cell_id: &str) -> Vec<ProcInfo> {
    processes_under(&app.cell_dir(cell_id))
        .into_iter()
        .filter(|p| p.name == "sample-cell")
        .collect()
}

both_backends!(local_cell_stamp_update_destroy, |b| async move {
    let app = TestApp::spawn(b).await;
    let out = app
        .create_cell(
            json!({"cell_id": "loc-1", "region": "eu-west-1", "tier": "pooled",
            "template": "local", "capacity": {"tenants": 10, "units": 10},
            "app_version": "1.0.0"}),
        )
        .await;
    assert_eq!(out.cell.state, CellState::Pending);
    let job = out.job.expect("create returns the stamp job");
    assert_eq!(job.kind, "cell.stamp");
    assert_eq!(
        out.cell.pending_job_id.as_deref(),
        Some(job.job_id.as_str())
    );
    let done = app.wait_job(&job.job_id, JOB_TIMEOUT).await;
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{}",
        app.job_log(&job.job_id).await
    );
    assert_eq!(done.progress, 1.0);
    let cell = app.cell("loc-1").await;
    assert_eq!(cell.state, CellState::Active);
    assert!(cell.pending_job_id.is_none());
    let endpoint = cell.outputs["endpoint"]
        .as_str()
        .expect("endpoint output")
        .to_string();
    let port = cell.vars["port"]
        .as_u64()
        .expect("allocated port is recorded");
    assert_eq!(endpoint, format!("http://127.0.0.1:{port}"));
    let health = get_json(&format!("{endpoint}/healthz")).await;
    assert!(health.is_some(), "the cell answers /healthz at {endpoint}");
    let v = get_json(&format!("{endpoint}/version"))
        .await
        .expect("version");
    assert_eq!(v["app_version"], "1.0.0");
    assert_eq!(v["cell_id"], "loc-1");
    assert_eq!(sample_cells_of(&app, "loc-1").len(), 1);
    let log = app.job_log(&job.job_id).await;
    assert!(
        log.contains("terraform_data.process: Creation complete"),
        "{log}"
    );
    // The admin token of the cell is a secret: never in the API, never in the log.
    let cell_json: Value = app.admin.get("/v1/cells/loc-1").await.unwrap();
    assert!(
        cell_json.get("secret_vars").is_none() && cell_json["vars"].get("admin_token").is_none()
    );

    // A new app_version is applied by a job that replaces the process.
    let r = app
        .req(Method::PATCH, "/v1/cells/loc-1")
        .json(&json!({"app_version": "1.1.0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let patched: cellplane_api::Cell = r.json().await.unwrap();
    let apply_id = patched.pending_job_id.expect("an apply job");
    let done = app.wait_job(&apply_id, JOB_TIMEOUT).await;
    assert_eq!(done.kind, "cell.apply");
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{}",
        app.job_log(&apply_id).await
    );
    let cell = app.cell("loc-1").await;
    assert_eq!(cell.state, CellState::Active);
    assert_eq!(
        cell.outputs["endpoint"],
        endpoint.as_str(),
        "the port is kept"
    );
    let v = get_json(&format!("{endpoint}/version"))
        .await
        .expect("version after update");
    assert_eq!(v["app_version"], "1.1.0");
    assert_eq!(
        sample_cells_of(&app, "loc-1").len(),
        1,
        "the old process was stopped"
    );

    // Destroy: the process stops and the cell ends destroyed.
    let r = app
        .req(Method::DELETE, "/v1/cells/loc-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let out: cellplane_api::CellWithJob = r.json().await.unwrap();
    assert_eq!(out.cell.state, CellState::Destroying);
    let job = out.job.expect("a destroy job");
    let done = app.wait_job(&job.job_id, JOB_TIMEOUT).await;
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{}",
        app.job_log(&job.job_id).await
    );
    let cell = app.cell("loc-1").await;
    assert_eq!(cell.state, CellState::Destroyed);
    assert!(cell.outputs.is_empty());
    assert!(
        get_json(&format!("{endpoint}/healthz")).await.is_none(),
        "endpoint gone"
    );
    assert!(sample_cells_of(&app, "loc-1").is_empty());
    assert!(terraform_processes_under(&app.data_dir).is_empty());
    let events: Vec<String> = app
        .admin
        .get::<Value>("/v1/audit?target=cell/loc-1")
        .await
        .unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event_type"].as_str().unwrap().to_string())
        .collect();
    for e in [
        "CELL_REGISTERED",
        "CELL_STAMPED",
        "CELL_APPLIED",
        "CELL_DESTROYED",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} missing from {events:?}");
    }
    assert!(app.admin.audit_verify().await.unwrap().ok);
});

both_backends!(periodic_drift_check_of_idle_cells, |b| async move {
    let app = TestApp::spawn_with(
        b,
        AppOptions::default().with("CELLPLANE__IAC__DRIFT_INTERVAL_SECS", "1"),
    )
    .await;
    app.stamp_local("drift-1", json!({})).await;
    let admin = app.admin.clone();
    let drift = eventually(Duration::from_secs(60), || {
        let admin = admin.clone();
        async move {
            let c: cellplane_api::Cell = admin.get("/v1/cells/drift-1").await.ok()?;
            c.drift
        }
    })
    .await
    .expect("the scheduler checked the idle active cell");
    assert_eq!(drift["detected"], false, "{drift}");
    let job = drift["job_id"].as_str().unwrap();
    let j = app.admin.get_job(job).await.unwrap();
    assert_eq!(j.kind, "cell.plan");
    assert_eq!(j.state, JobState::Succeeded);
    // Checks keep coming while the cell stays idle, and never reserve it.
    let first = drift["checked_at"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(60), || {
        let (admin, first) = (admin.clone(), first.clone());
        async move {
            let c: cellplane_api::Cell = admin.get("/v1/cells/drift-1").await.ok()?;
            let at = c.drift?["checked_at"].as_str()?.to_string();
            (at > first).then_some(())
        }
    })
    .await
    .expect("a later check");
    let audit: Value = app
        .admin
        .get("/v1/audit?target=cell/drift-1")
        .await
        .unwrap();
    assert!(audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["event_type"] == "CELL_DRIFT_CHECKED" && r["actor"] == "system:jobs"));
});
