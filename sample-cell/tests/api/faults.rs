//! SLO knobs and probes: fault rate, extra latency, `/version`, `/metrics`, `/healthz`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::both_backends;
use crate::helpers::{assert_problem, Backend, TestDb};

both_backends!(
    fault_rate_yields_its_ratio,
    probes_report_cell_version_and_metrics
);

async fn fault_rate_yields_its_ratio(backend: Backend) {
    const REQUESTS: usize = 2000;
    const WORKERS: usize = 16;
    let db = TestDb::new(backend).await;
    let app = Arc::new(db.spawn_with(&["--fault-rate", "0.3"]).await);

    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let app = Arc::clone(&app);
        workers.push(tokio::spawn(async move {
            let mut faults = 0;
            for _ in (worker..REQUESTS).step_by(WORKERS) {
                let response = app.get("acme", "missing").await;
                match response.status() {
                    StatusCode::INTERNAL_SERVER_ERROR => {
                        assert_eq!(
                            response.headers()["content-type"],
                            "application/problem+json"
                        );
                        faults += 1;
                    }
                    StatusCode::NOT_FOUND => {}
                    other => panic!("unexpected status {other}"),
                }
            }
            faults
        }));
    }
    let mut faults = 0;
    for worker in workers {
        faults += worker.await.expect("worker finishes");
    }
    let ratio = faults as f64 / REQUESTS as f64;
    assert!(
        (0.25..=0.35).contains(&ratio),
        "500 ratio {ratio} outside 0.25..=0.35"
    );

    // Only tenant traffic is faulted; probes and the contract never are.
    for _ in 0..50 {
        let health = app
            .client
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("answered");
        assert_eq!(health.status(), StatusCode::OK);
        app.checksum("acme").await;
    }
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("answered")
        .text()
        .await
        .expect("metrics");
    assert!(
        metrics.contains(&format!("sample_cell_injected_faults_total {faults}\n")),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "sample_cell_http_requests_total{{route=\"tenant\",status=\"500\"}} {faults}\n"
    )));
    // An injected fault looks like any other problem to the client.
    let app = Arc::into_inner(app).expect("workers are done");
    app.stop().await;
    let always = db.spawn_with(&["--fault-rate", "1"]).await;
    let detail = assert_problem(
        always.put("acme", "k", b"v").await,
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    assert!(detail.contains("fault"), "{detail}");
    always.stop().await;
    let never = db.spawn().await;
    assert_eq!(
        never.value("acme", "k").await,
        None,
        "a faulted write did not happen"
    );
}

async fn probes_report_cell_version_and_metrics(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = db.spawn_with(&["--extra-latency-ms", "150"]).await;

    let started = Instant::now();
    let health = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answered");
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.headers()["x-cell-id"], "test-cell");
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "probes get no extra latency"
    );

    let started = Instant::now();
    assert_eq!(app.value("acme", "k").await, None);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "tenant requests are delayed"
    );

    let version: serde_json::Value = app
        .client
        .get(app.url("/version"))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    assert_eq!(version["cell_id"], "test-cell");
    assert_eq!(version["app_version"], "1.2.3-test");
    let expected_backend = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(version["backend"], expected_backend);

    let response = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("answered");
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/plain"));
    let metrics = response.text().await.expect("text");
    for line in [
        "sample_cell_info{cell_id=\"test-cell\",app_version=\"1.2.3-test\"} 1",
        "sample_cell_http_requests_total{route=\"tenant\",status=\"404\"} 1",
        "sample_cell_http_requests_total{route=\"probe\",status=\"200\"} 2",
        "sample_cell_http_request_duration_seconds_bucket{route=\"tenant\",le=\"0.1\"} 0",
        "sample_cell_http_request_duration_seconds_bucket{route=\"tenant\",le=\"0.25\"} 1",
        "sample_cell_http_request_duration_seconds_count{route=\"tenant\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}\n{metrics}"
        );
    }
}
