//! The `aws` template applied by the real terraform binary and AWS provider to a moto
//! server (started by scripts/test.sh): stamp, outputs, drift made out of band, destroy.

use cellplane_api::{CellState, JobState};
use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

const AWS_TIMEOUT: Duration = Duration::from_secs(300);

both_backends!(aws_cell_on_moto_stamp_drift_destroy, |b| async move {
    let moto = moto_url();
    let app = TestApp::spawn_with(b, aws_options()).await;
    let id = format!("aws-{}", random_suffix(6));
    let out = app
        .create_cell(
            json!({"cell_id": id, "region": "eu-west-1", "tier": "dedicated",
            "template": "aws", "capacity": {"tenants": 1, "units": 10},
            "labels": {"team": "payments"},
            "vars": {"aws_endpoint": moto, "instance_class": "medium"}}),
        )
        .await;
    let job = out.job.expect("stamp job");
    let done = app.wait_job(&job.job_id, AWS_TIMEOUT).await;
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{}\n{}",
        app.job_log(&job.job_id).await,
        done.error.unwrap_or_default()
    );
    let cell = app.cell(&id).await;
    assert_eq!(cell.state, CellState::Active);
    let bucket = format!("data-{id}");
    assert_eq!(
        cell.outputs["bucket"],
        bucket.as_str(),
        "{:?}",
        cell.outputs
    );
    assert!(cell.outputs["vpc_id"].as_str().unwrap().starts_with("vpc-"));
    assert!(cell.outputs["kms_key_arn"]
        .as_str()
        .unwrap()
        .starts_with("arn:aws:kms:"));
    assert_eq!(
        cell.outputs["endpoint"],
        format!("https://{id}.eu-west-1.cells.example.com").as_str()
    );
    assert_eq!(cell.outputs["subnet_ids"].as_array().unwrap().len(), 2);
    // A sensitive output is kept as a secret of the cell, never returned by the API.
    assert!(
        !cell.outputs.contains_key("secret_arn"),
        "{:?}",
        cell.outputs
    );
    let stored = app
        .sql_i64(&format!(
            "SELECT COUNT(*) FROM cells WHERE cell_id = '{id}' AND secret_outputs LIKE '%arn:aws:secretsmanager%'"
        ))
        .await
        .unwrap();
    assert_eq!(stored, 1, "the sensitive output is stored as a secret");
    let raw: Value = app.admin.get(&format!("/v1/cells/{id}")).await.unwrap();
    assert!(!raw.to_string().contains("secretsmanager"), "{raw}");
    let log = app.job_log(&job.job_id).await;
    assert!(
        log.contains("aws_s3_bucket.data: Creation complete"),
        "{log}"
    );
    // The bucket really exists in moto, versioned and encrypted with the cell's key.
    let http = reqwest::Client::new();
    let r = http.head(format!("{moto}/{bucket}")).send().await.unwrap();
    assert_eq!(r.status(), 200, "bucket exists in moto");
    let v = http
        .get(format!("{moto}/{bucket}?versioning"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(v.contains("Enabled"), "{v}");
    let enc = http
        .get(format!("{moto}/{bucket}?encryption"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(enc.contains("aws:kms"), "{enc}");

    // The bucket's tags are changed behind terraform's back: the next drift check reports
    // that resource, and only it.
    let r = http
        .put(format!("{moto}/{bucket}?tagging"))
        .header("content-type", "application/xml")
        .body(
            "<Tagging xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><TagSet>\
             <Tag><Key>tampered</Key><Value>by-hand</Value></Tag></TagSet></Tagging>",
        )
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );
    let r = app
        .req(Method::POST, &format!("/v1/cells/{id}/plan"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let out: cellplane_api::CellWithJob = r.json().await.unwrap();
    let plan = out.job.expect("a drift-check job");
    assert_eq!(plan.kind, "cell.plan");
    let done = app.wait_job(&plan.job_id, AWS_TIMEOUT).await;
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{}",
        app.job_log(&plan.job_id).await
    );
    let cell = app.cell(&id).await;
    let drift = cell
        .drift
        .clone()
        .unwrap_or_else(|| panic!("{}", "no drift recorded"));
    assert_eq!(
        drift["detected"],
        true,
        "{drift}\n{}",
        plan_logs(&app, &id).await
    );
    assert_eq!(
        drift["resources"],
        json!(["aws_s3_bucket.data"]),
        "{drift}\n{}",
        plan_logs(&app, &id).await
    );
    assert_eq!(drift["job_id"], plan.job_id.as_str());
    assert!(drift["checked_at"].is_string());
    assert_eq!(
        cell.state,
        CellState::Active,
        "drift is reported, not acted on"
    );
    let audit: Value = app
        .admin
        .get(&format!("/v1/audit?target=cell/{id}"))
        .await
        .unwrap();
    assert!(audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["event_type"] == "CELL_DRIFTED"));

    // Destroy removes everything from moto.
    let r = app
        .req(Method::DELETE, &format!("/v1/cells/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    let cell = app.cell(&id).await;
    let destroy = cell.pending_job_id.expect("destroy job");
    let done = app.wait_job(&destroy, AWS_TIMEOUT).await;
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{}",
        app.job_log(&destroy).await
    );
    assert_eq!(app.cell(&id).await.state, CellState::Destroyed);
    let r = http.head(format!("{moto}/{bucket}")).send().await.unwrap();
    assert_eq!(r.status(), 404, "bucket deleted");
    assert!(terraform_processes_under(&app.data_dir).is_empty());
});

/// The logs of a cell's drift-check jobs, for failure messages.
async fn plan_logs(app: &TestApp, id: &str) -> String {
    let jobs: Value = app
        .admin
        .get(&format!("/v1/jobs?target=cell/{id}"))
        .await
        .unwrap_or_default();
    let mut out = format!("cell: {:?}\n", app.cell(id).await);
    for j in jobs["items"].as_array().cloned().unwrap_or_default() {
        if j["kind"] == "cell.plan" {
            let jid = j["job_id"].as_str().unwrap_or_default();
            out.push_str(&format!("--- {j}\n{}\n", app.job_log(jid).await));
        }
    }
    out
}

both_backends!(
    aws_cancel_mid_apply_leaves_no_provider_behind,
    |b| async move {
        let moto = moto_url();
        let app = TestApp::spawn_with(b, aws_options()).await;
        let id = format!("awsc-{}", random_suffix(6));
        let out = app
            .create_cell(
                json!({"cell_id": id, "region": "eu-west-1", "tier": "pooled",
            "template": "aws", "capacity": {"tenants": 1, "units": 1},
            "vars": {"aws_endpoint": moto}}),
            )
            .await;
        let job = out.job.expect("stamp job");
        let (admin, jid) = (app.admin.clone(), job.job_id.clone());
        eventually(AWS_TIMEOUT, || {
            let (admin, jid) = (admin.clone(), jid.clone());
            async move {
                let log = admin.get_text(&format!("/v1/jobs/{jid}/log")).await.ok()?;
                log.contains("Creating...").then_some(())
            }
        })
        .await
        .expect("the apply starts creating resources");
        let running = terraform_processes_under(&app.data_dir);
        assert!(
            running.iter().any(|p| p.name.starts_with("terraform-prov")),
            "the AWS provider runs during apply: {running:?}"
        );
        let c: Value = app
            .admin
            .post(&format!("/v1/jobs/{}/cancel", job.job_id), &json!({}))
            .await
            .unwrap();
        assert_eq!(c["cancel_requested"], true);
        let done = app.wait_job(&job.job_id, AWS_TIMEOUT).await;
        assert_eq!(
            done.state,
            JobState::Cancelled,
            "{}",
            app.job_log(&job.job_id).await
        );
        let left = terraform_processes_under(&app.data_dir);
        assert!(
            left.is_empty(),
            "terraform or provider left behind: {left:?}"
        );
        assert_eq!(app.cell(&id).await.state, CellState::Failed);
    }
);
