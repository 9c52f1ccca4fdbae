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

pub(crate) fn sample_cells_of(app: &TestApp, cell_id: &str) -> Vec<ProcInfo> {
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
    assert!(
        app.job_log(&apply_id).await.contains("already initialized"),
        "an unchanged configuration is not initialized again"
    );
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
    let metrics = app.anonymous().get_text("/metrics").await.unwrap();
    assert!(
        metrics.contains("cellplane_terraform_processes 0"),
        "{metrics}"
    );
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

/// `terraform state list` of a cell, run by hand as an SRE would (local or pg backend).
fn state_cmd(app: &TestApp, id: &str, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("terraform");
    cmd.args(args)
        .current_dir(app.cell_dir(id))
        .env(
            "TF_CLI_CONFIG_FILE",
            app.data_dir.join("terraform/terraform.rc"),
        )
        .env("TF_IN_AUTOMATION", "1");
    if let Some(u) = &app.database_url {
        cmd.env("PG_CONN_STR", format!("{u}?sslmode=disable")).env(
            "PG_SCHEMA_NAME",
            format!("cellplane_tf_{}", id.replace('-', "_")),
        );
    }
    let out = cmd.output().expect("run terraform");
    assert!(
        out.status.success(),
        "terraform {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn state_list(app: &TestApp, id: &str) -> Vec<String> {
    state_cmd(app, id, &["state", "list"])
        .lines()
        .map(str::to_string)
        .collect()
}

both_backends!(injection_is_rejected_or_inert, |b| async move {
    let app = TestApp::spawn(b).await;
    let body = |id: &str, template: &str, vars: Value| {
        json!({"cell_id": id, "region": "eu-west-1", "tier": "pooled", "template": template,
               "capacity": {"tenants": 1, "units": 1}, "vars": vars})
    };
    let post = |b: Value| app.req(Method::POST, "/v1/cells").json(&b).send();
    // Ids and template names are identifiers: never code, never a path.
    for bad in [
        "x\"\nresource \"terraform_data\" \"p\" {}",
        "${file(\"/etc/passwd\")}",
        "../../etc",
    ] {
        let p = expect_problem(post(body(bad, "local", json!({}))).await.unwrap(), 400).await;
        assert_eq!(p["errors"][0]["field"], "cell_id", "{p}");
        let p = expect_problem(post(body("inj-t", bad, json!({}))).await.unwrap(), 400).await;
        assert_eq!(p["errors"][0]["field"], "template", "{p}");
    }
    let p = expect_problem(post(body("inj-t", "nope", json!({}))).await.unwrap(), 400).await;
    assert_eq!(p["errors"][0]["field"], "template", "{p}");
    // Variables are checked against the template's declarations.
    for (vars, field) in [
        (json!({"nope": 1}), "vars.nope"),
        (json!({"../../etc": "x"}), "vars.../../etc"),
        (json!({"port": 8080}), "vars.port"),
        (json!({"admin_token": "mine"}), "vars.admin_token"),
        (json!({"fault_rate": "high"}), "vars.fault_rate"),
        (json!({"fault_rate": 2}), "vars.fault_rate"),
        (
            json!({"instance_class": "x\"\nresource \"terraform_data\" \"p\" {}"}),
            "vars.instance_class",
        ),
        (json!({"owner": "x".repeat(300)}), "vars.owner"),
    ] {
        let p = expect_problem(
            post(body("inj-v", "local", vars.clone())).await.unwrap(),
            400,
        )
        .await;
        let fields: Vec<&str> = p["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["field"].as_str())
            .collect();
        assert!(fields.contains(&field), "{vars}: {p}");
    }
    assert!(app.admin.get::<Value>("/v1/cells").await.unwrap()["items"]
        .as_array()
        .unwrap()
        .is_empty());
    // A free-text variable that tries everything stays an inert string, end to end.
    let evil = "x\"\nresource \"terraform_data\" \"p\" {}\n${file(\"/etc/passwd\")} %{ if true }y%{ endif } ../../etc \\\"";
    let cell = app.stamp_local("inj-1", json!({"owner": evil})).await;
    assert_eq!(cell.outputs["owner"], evil, "the value came back verbatim");
    let dir = app.cell_dir("inj-1");
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tf") {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            assert!(
                !text.contains("/etc/passwd"),
                "{name} holds the value:\n{text}"
            );
            assert!(!text.contains("\"p\""), "{name}:\n{text}");
        }
    }
    let tfvars: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("cellplane.auto.tfvars.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tfvars["owner"], evil);
    assert_eq!(
        state_list(&app, "inj-1"),
        vec!["terraform_data.process", "terraform_data.reaper"]
    );
    let state = state_cmd(&app, "inj-1", &["state", "pull"]);
    assert!(
        !state.contains("root:x:0:0"),
        "no file was read into the state"
    );
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["outputs"]["owner"]["value"], evil);
});

both_backends!(
    cancel_mid_apply_leaves_no_terraform_behind,
    |b| async move {
        let app = TestApp::spawn(b).await;
        let out = app
            .create_cell(
                json!({"cell_id": "cancel-1", "region": "eu-west-1", "tier": "pooled",
            "template": "local", "capacity": {"tenants": 1, "units": 1},
            "vars": {"boot_delay_secs": 120}}),
            )
            .await;
        let job = out.job.unwrap();
        let (admin, id) = (app.admin.clone(), job.job_id.clone());
        eventually(JOB_TIMEOUT, || {
            let (admin, id) = (admin.clone(), id.clone());
            async move {
                let log = admin.get_text(&format!("/v1/jobs/{id}/log")).await.ok()?;
                log.contains("boot delay").then_some(())
            }
        })
        .await
        .expect("the apply reaches the provisioner");
        assert!(
            !terraform_processes_under(&app.data_dir).is_empty(),
            "terraform is applying"
        );
        let started = std::time::Instant::now();
        let c: Value = app
            .admin
            .post(&format!("/v1/jobs/{}/cancel", job.job_id), &json!({}))
            .await
            .unwrap();
        assert_eq!(c["cancel_requested"], true);
        let done = app.wait_job(&job.job_id, Duration::from_secs(60)).await;
        assert_eq!(
            done.state,
            JobState::Cancelled,
            "{}",
            app.job_log(&job.job_id).await
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        // Nothing terraform started is left: no terraform, no provisioner shell, no sleep.
        assert!(terraform_processes_under(&app.data_dir).is_empty());
        let left = processes_under(&app.cell_dir("cancel-1"));
        assert!(left.is_empty(), "{left:?}");
        let log = app.job_log(&job.job_id).await;
        assert!(
            log.contains("cancel requested: interrupting terraform"),
            "{log}"
        );
        let cell = app.cell("cancel-1").await;
        assert_eq!(cell.state, CellState::Failed);
        assert!(cell.pending_job_id.is_none());
        // A cancelled stamp can be destroyed.
        let r = app
            .req(Method::DELETE, "/v1/cells/cancel-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let out: cellplane_api::CellWithJob = r.json().await.unwrap();
        let done = app.wait_job(&out.job.unwrap().job_id, JOB_TIMEOUT).await;
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(app.cell("cancel-1").await.state, CellState::Destroyed);
    }
);

both_backends!(sigkill_mid_apply_resumes_and_applies_once, |b| async move {
    let mut app = TestApp::spawn_with(
        b,
        AppOptions::default().with("CELLPLANE__JOBS__LEASE_SECS", "2"),
    )
    .await;
    let out = app
        .create_cell(
            json!({"cell_id": "kill-1", "region": "eu-west-1", "tier": "pooled",
                "template": "local", "capacity": {"tenants": 1, "units": 1},
                "vars": {"boot_delay_secs": 6}}),
        )
        .await;
    let job = out.job.unwrap();
    let (admin, id) = (app.admin.clone(), job.job_id.clone());
    eventually(JOB_TIMEOUT, || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            let log = admin.get_text(&format!("/v1/jobs/{id}/log")).await.ok()?;
            log.contains("boot delay").then_some(())
        }
    })
    .await
    .expect("the apply reaches the provisioner");
    app.kill9();
    assert!(
        !terraform_processes_under(&app.data_dir).is_empty(),
        "terraform outlives the killed control plane"
    );
    app.start().await.unwrap();
    let done = app.wait_job(&job.job_id, JOB_TIMEOUT).await;
    let log = app.job_log(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}\n{}", app.log());
    assert_eq!(done.attempts, 2, "resumed once");
    assert!(log.contains("left running by an earlier attempt"), "{log}");
    let cell = app.cell("kill-1").await;
    assert_eq!(cell.state, CellState::Active);
    let endpoint = cell.outputs["endpoint"].as_str().unwrap();
    assert!(get_json(&format!("{endpoint}/healthz")).await.is_some());
    assert_eq!(
        state_list(&app, "kill-1"),
        vec!["terraform_data.process", "terraform_data.reaper"]
    );
    assert_eq!(
        sample_cells_of(&app, "kill-1").len(),
        1,
        "one process, none orphaned"
    );
    assert!(terraform_processes_under(&app.data_dir).is_empty());
    let stamped = app
        .sql_i64("SELECT COUNT(*) FROM tenant_audit WHERE event_type = 'CELL_STAMPED'")
        .await
        .unwrap();
    assert_eq!(stamped, 1);
    assert!(app.admin.audit_verify().await.unwrap().ok);
});

both_backends!(
    concurrency_limit_bounds_terraform_processes,
    |b| async move {
        let app = TestApp::spawn_with(
            b,
            AppOptions::default()
                .with("CELLPLANE__IAC__CONCURRENCY", "2")
                .with("CELLPLANE__JOBS__WORKERS", "6"),
        )
        .await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (dir, stop) = (app.data_dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut max = 0;
                let mut at_max = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    // A scan of /proc is not a snapshot: count only the processes still
                    // alive when re-checked after the scan, which were all alive at once
                    // (at the moment the scan read the last of them).
                    let seen: Vec<ProcInfo> = processes_under(&dir)
                        .into_iter()
                        .filter(|p| p.name == "terraform")
                        .collect();
                    let live: Vec<ProcInfo> = seen.into_iter().filter(|p| alive(p.pid)).collect();
                    if live.len() > max {
                        max = live.len();
                        at_max = live;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (max, at_max)
            })
        };
        let mut jobs = Vec::new();
        for i in 0..6 {
            let out = app
                .create_cell(
                    json!({"cell_id": format!("conc-{i}"), "region": "eu-west-1",
                    "tier": "pooled", "template": "local", "capacity": {"tenants": 1, "units": 1},
                    "vars": {"boot_delay_secs": 1}}),
                )
                .await;
            jobs.push(out.job.unwrap().job_id);
        }
        for j in &jobs {
            let done = app.wait_job(j, JOB_TIMEOUT).await;
            assert_eq!(done.state, JobState::Succeeded, "{}", app.job_log(j).await);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (max, at_max) = sampler.join().unwrap();
        assert!(
            max <= 2,
            "saw {max} terraform processes at once with a limit of 2: {at_max:#?}\n{}",
            app.log()
                .lines()
                .filter(|l| l.contains("leaving terraform")
                    || l.contains("lease")
                    || l.contains("WARN"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(max, 2, "the six stamps did overlap up to the limit");
    }
);

both_backends!(job_events_stream_and_cli_watch, |b| async move {
    use futures_util::StreamExt;
    let app = TestApp::spawn(b).await;
    let out = app
        .create_cell(
            json!({"cell_id": "sse-1", "region": "eu-west-1", "tier": "pooled",
            "template": "local", "capacity": {"tenants": 1, "units": 1},
            "vars": {"boot_delay_secs": 1}}),
        )
        .await;
    let job = out.job.unwrap();
    let resp = app
        .req(Method::GET, &format!("/v1/jobs/{}/events", job.job_id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let deadline = std::time::Instant::now() + JOB_TIMEOUT;
    while let Ok(Some(chunk)) = tokio::time::timeout(
        deadline.saturating_duration_since(std::time::Instant::now()),
        stream.next(),
    )
    .await
    {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let mut progress = Vec::new();
    let mut logs = Vec::new();
    let mut end = None;
    for block in text.split("\n\n") {
        let event = block
            .lines()
            .find_map(|l| l.strip_prefix("event: "))
            .unwrap_or("");
        let data: String = block
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect::<Vec<_>>()
            .join("\n");
        match event {
            "progress" => progress.push(serde_json::from_str::<Value>(&data).unwrap()),
            "log" => logs.push(data),
            "end" => end = Some(serde_json::from_str::<Value>(&data).unwrap()),
            _ => {}
        }
    }
    let end = end.unwrap_or_else(|| panic!("no end event in {text}"));
    assert_eq!(end["state"], "succeeded");
    let values: Vec<f64> = progress
        .iter()
        .map(|p| p["progress"].as_f64().unwrap())
        .collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
    assert!(
        values.len() >= 3,
        "live progress, not just the end: {values:?}"
    );
    assert_eq!(values.last().copied(), Some(1.0));
    assert!(
        logs.iter()
            .any(|l| l.contains("terraform_data.process: Creation complete")),
        "{logs:?}"
    );

    // The CLI: `cell create --wait` follows the job and prints the resource lines.
    let cli = |args: &[&str]| {
        std::process::Command::new(bin_path("cellplane"))
            .args(args)
            .env("CELLPLANE_URL", &app.url)
            .env("CELLPLANE_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("run cellplane")
    };
    let o = cli(&[
        "cell",
        "create",
        "cli-1",
        "--region",
        "eu-west-1",
        "--template",
        "local",
        "--wait",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("terraform_data.process: Creation complete"),
        "{stderr}"
    );
    assert!(
        stdout.contains("endpoint") && stdout.contains("active"),
        "{stdout}"
    );
    let o = cli(&["template", "list"]);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        stdout.contains("local") && stdout.contains("aws"),
        "{stdout}"
    );
    let o = cli(&["template", "show", "local"]);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(stdout.contains("(managed: port)"), "{stdout}");
    let o = cli(&["cell", "delete", "cli-1", "--wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(app.cell("cli-1").await.state, CellState::Destroyed);
});

both_backends!(
    failed_stamp_reports_the_diagnostic_and_is_repaired,
    |b| async move {
        let mut app = TestApp::spawn_with(
            b,
            AppOptions::default().with(
                "CELLPLANE__IAC__SAMPLE_CELL_BIN",
                "/nonexistent/sample-cell",
            ),
        )
        .await;
        let out = app
            .create_cell(
                json!({"cell_id": "fail-1", "region": "eu-west-1", "tier": "pooled",
                "template": "local", "capacity": {"tenants": 1, "units": 1}}),
            )
            .await;
        let job = out.job.unwrap();
        let done = app.wait_job(&job.job_id, JOB_TIMEOUT).await;
        assert_eq!(done.state, JobState::Failed);
        let error = done.error.clone().unwrap_or_default();
        assert!(
            error.contains("terraform apply failed")
                && error.contains("local-exec provisioner error"),
            "the job error carries terraform's diagnostic: {error}"
        );
        assert_eq!(done.attempts, 1, "a configuration error is not retried");
        let cell = app.cell("fail-1").await;
        assert_eq!(cell.state, CellState::Failed);
        assert!(cell.pending_job_id.is_none());
        assert!(cell.outputs.is_empty());
        // Fix the cause (the binary), then re-apply: it re-plans from the state.
        app.terminate();
        app.options = app.options.clone().with(
            "CELLPLANE__IAC__SAMPLE_CELL_BIN",
            &bin_path("sample-cell").display().to_string(),
        );
        app.start().await.unwrap();
        let r = app
            .req(Method::POST, "/v1/cells/fail-1/apply")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let out: cellplane_api::CellWithJob = r.json().await.unwrap();
        let job = out.job.unwrap();
        assert_eq!(job.kind, "cell.apply");
        let done = app.wait_job(&job.job_id, JOB_TIMEOUT).await;
        assert_eq!(
            done.state,
            JobState::Succeeded,
            "{}",
            app.job_log(&job.job_id).await
        );
        let cell = app.cell("fail-1").await;
        assert_eq!(cell.state, CellState::Active);
        let endpoint = cell.outputs["endpoint"].as_str().unwrap();
        assert!(get_json(&format!("{endpoint}/healthz")).await.is_some());
        assert_eq!(
            state_list(&app, "fail-1"),
            vec!["terraform_data.process", "terraform_data.reaper"]
        );
        // Applying again while the cell is busy or gone is a conflict.
        let r = app
            .req(Method::POST, "/v1/cells/ghost-cell/apply")
            .send()
            .await
            .unwrap();
        expect_problem(r, 404).await;
    }
);

both_backends!(delete_is_refused_while_tenants_are_placed, |b| async move {
    let app = TestApp::spawn(b).await;
    app.stamp_local("placed-1", json!({})).await;
    app.create_org("acme-corp").await;
    app.create_tenant("acme", "acme-corp").await;
    // Placement is another capability; place the tenant's environment by hand.
    app.sql("UPDATE environments SET cell_id = 'placed-1' WHERE tenant_id = 'acme'")
        .await
        .unwrap();
    let r = app
        .req(Method::DELETE, "/v1/cells/placed-1")
        .send()
        .await
        .unwrap();
    let p = expect_problem(r, 409).await;
    assert!(p["detail"].as_str().unwrap().contains("tenant"), "{p}");
    assert_eq!(app.cell("placed-1").await.state, CellState::Active);
    let jobs: Value = app
        .admin
        .get("/v1/jobs?target=cell/placed-1")
        .await
        .unwrap();
    assert!(
        jobs["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["kind"] != "cell.destroy"),
        "no destroy job was queued"
    );
    app.sql("UPDATE environments SET cell_id = NULL WHERE tenant_id = 'acme'")
        .await
        .unwrap();
    let r = app
        .req(Method::DELETE, "/v1/cells/placed-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
});

// An installed `cellplane` (copied out of the build tree, run where there is no
// cell-templates/ and with no template setting) lists and stamps with the templates
// compiled into it, written out under <data_dir>/templates/builtin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_binary_stamps_with_builtin_templates() {
    let install = tempfile::tempdir().unwrap();
    let bin = install.path().join("bin");
    let work = install.path().join("work");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    for name in ["cellplane", "sample-cell"] {
        std::fs::copy(bin_path(name), bin.join(name)).unwrap();
    }
    let mut options = AppOptions::default()
        .without("CELLPLANE__IAC__TEMPLATES_DIR")
        .without("CELLPLANE__IAC__SAMPLE_CELL_BIN");
    options.binary = Some(bin.join("cellplane"));
    options.current_dir = Some(work.clone());
    let app = TestApp::spawn_with(Backend::Sqlite, options).await;
    let list: Value = app.admin.get("/v1/templates").await.unwrap();
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"local") && names.contains(&"aws"),
        "{list}\n{}",
        app.log()
    );
    let builtin = app.data_dir.join("templates/builtin");
    assert!(builtin.join("local/template.toml").is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(builtin.join("local/start.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "start.sh is executable");
    app.stamp_local("euw1-installed-1", json!({})).await;
    let running = sample_cells_of(&app, "euw1-installed-1");
    assert_eq!(running.len(), 1, "{running:?}");
    assert!(
        running[0]
            .cmdline
            .contains(&bin.join("sample-cell").display().to_string()),
        "the sample-cell next to the installed binary: {running:?}"
    );
}
