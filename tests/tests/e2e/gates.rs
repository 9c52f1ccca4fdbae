//! The built-in metrics of release gates: routers report each cell's responses by status
//! class and its latency histogram with their heartbeats; the control plane keeps the
//! samples and answers a cell's error ratio and percentiles over a window. Real routers and
//! sample-cells, one of them injecting faults and one adding latency through its template
//! variables.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

both_backends!(
    cells_report_error_ratio_and_latency_through_router_heartbeats,
    |b| async move {
        let app = TestApp::spawn(b).await;
        app.stamp_local("healthy", json!({})).await;
        app.stamp_local("faulty", json!({"fault_rate": 0.3})).await;
        app.stamp_local("slow", json!({"extra_latency_ms": 200}))
            .await;
        app.create_org("acme-corp").await;
        // One tenant per cell: the spread placement fills the empty cells in turn.
        let mut on = std::collections::BTreeMap::new();
        for t in ["t-one", "t-two", "t-three"] {
            app.create_tenant(t, "acme-corp").await;
            app.lifecycle(t, "activate").await;
            let tenant = app.admin.get_tenant(t).await.unwrap();
            on.insert(tenant.environments[0].cell_id.clone().unwrap(), t);
        }
        assert_eq!(on.len(), 3, "{on:?}");
        let token = app.token("router").await;
        let router = TestRouter::spawn(&app.url, &token, &["--heartbeat-secs", "1"]).await;
        router.wait_revision(app.routing_revision().await).await;
        let n = 60;
        for (cell, tenant) in &on {
            let requests = if cell == "slow" { 20 } else { n };
            for i in 0..requests {
                let r = router
                    .tenant_req(Method::PUT, tenant, &format!("/v1/kv/k{i}"))
                    .body("v")
                    .send()
                    .await
                    .unwrap();
                assert!(r.status() == 201 || r.status() == 500, "{}", r.status());
            }
        }
        // The heartbeats after the traffic carry it.
        let metrics = |cell: &'static str| {
            let app = &app;
            async move {
                let m: Value = app
                    .admin
                    .get(&format!("/v1/cells/{cell}/metrics?window_secs=300"))
                    .await
                    .unwrap();
                m
            }
        };
        for (cell, want) in [("healthy", n), ("faulty", n), ("slow", 20)] {
            eventually(Duration::from_secs(20), || async {
                (metrics(cell).await["requests"] == want).then_some(())
            })
            .await
            .unwrap_or_else(|_| panic!("{cell}: {:#}", metrics_dump(&app, cell)));
        }
        let healthy = metrics("healthy").await;
        assert_eq!(healthy["errors"], 0);
        assert_eq!(healthy["error_ratio"], 0.0);
        assert_eq!(healthy["routers"], 1);
        let faulty = metrics("faulty").await;
        let ratio = faulty["error_ratio"].as_f64().unwrap();
        assert!((0.1..=0.55).contains(&ratio), "{faulty:#}");
        let slow = metrics("slow").await;
        let p99 = slow["p99_ms"].as_f64().unwrap();
        assert!(p99 >= 200.0, "{slow:#}");
        assert!(healthy["p99_ms"].as_f64().unwrap() < 200.0, "{healthy:#}");
        // A window with nothing in it: no ratio to judge by.
        let r = app
            .req(Method::GET, "/v1/cells/healthy/metrics?window_secs=0")
            .send()
            .await
            .unwrap();
        expect_problem(r, 400).await;
        let r = app
            .req(Method::GET, "/v1/cells/nowhere/metrics")
            .send()
            .await
            .unwrap();
        expect_problem(r, 404).await;
        // Malformed counters in a heartbeat are refused by field.
        let r = app
            .req(Method::POST, "/v1/routers/r-bad/heartbeat")
            .bearer_auth(&token)
            .json(&json!({"applied_revision": 0, "cells": [
            {"cell_id": "healthy", "codes": [1, 2], "le": [0.1], "buckets": [1, 2]}]}))
            .send()
            .await
            .unwrap();
        let p = expect_problem(r, 400).await;
        assert_eq!(p["errors"][0]["field"], "cells[0].codes", "{p:#}");
    }
);

/// What the metrics endpoint says, for a failure message.
fn metrics_dump(app: &TestApp, cell: &str) -> String {
    let url = format!("{}/v1/cells/{cell}/metrics?window_secs=300", app.url);
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-H",
            &format!("Authorization: Bearer {ADMIN_TOKEN}"),
            &url,
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    format!("{out}\n{}", app.log())
}
