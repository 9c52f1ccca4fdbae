//! Operational routes: liveness, readiness, Prometheus metrics and the OpenAPI document.

use super::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::atomic::Ordering;
use utoipa::OpenApi;

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "process up")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "store reachable"), (status = 503, description = "store unreachable")))]
pub async fn readyz(State(s): State<AppState>) -> Response {
    match s.service.store().ping().await {
        Ok(()) => Json(json!({"status": "ready", "store": s.service.store().backend().as_str()}))
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(
                    json!({"status": "unavailable", "store": s.service.store().backend().as_str()}),
                ),
            )
                .into_response()
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics(State(s): State<AppState>) -> Response {
    let mut out = s.http_metrics.render();
    let jm = &s.job_metrics;
    out.push_str("# HELP cellplane_jobs_total Jobs processed by this process, by outcome.\n");
    out.push_str("# TYPE cellplane_jobs_total counter\n");
    for (name, v) in [
        ("claimed", &jm.claimed),
        ("succeeded", &jm.succeeded),
        ("failed", &jm.failed),
        ("retried", &jm.retried),
        ("cancelled", &jm.cancelled),
    ] {
        out.push_str(&format!(
            "cellplane_jobs_total{{outcome=\"{name}\"}} {}\n",
            v.load(Ordering::Relaxed)
        ));
    }
    out.push_str(
        "# HELP cellplane_terraform_processes Terraform processes this control plane runs now.\n",
    );
    out.push_str("# TYPE cellplane_terraform_processes gauge\n");
    out.push_str(&format!(
        "cellplane_terraform_processes {}\n",
        jm.terraform_running.load(Ordering::Relaxed)
    ));
    out.push_str(
        "# HELP cellplane_controller_leader 1 when this replica holds the controller's lease.\n",
    );
    out.push_str("# TYPE cellplane_controller_leader gauge\n");
    for (name, st) in s.controllers.iter() {
        out.push_str(&format!(
            "cellplane_controller_leader{{controller=\"{name}\"}} {}\n",
            u8::from(st.leader.load(Ordering::Relaxed))
        ));
    }
    out.push_str("# HELP cellplane_controller_term The lease term this replica last held.\n");
    out.push_str("# TYPE cellplane_controller_term gauge\n");
    for (name, st) in s.controllers.iter() {
        out.push_str(&format!(
            "cellplane_controller_term{{controller=\"{name}\"}} {}\n",
            st.term.load(Ordering::Relaxed)
        ));
    }
    out.push_str(
        "# HELP cellplane_controller_reconciles_total Reconcile passes this replica started.\n",
    );
    out.push_str("# TYPE cellplane_controller_reconciles_total counter\n");
    for (name, st) in s.controllers.iter() {
        out.push_str(&format!(
            "cellplane_controller_reconciles_total{{controller=\"{name}\"}} {}\n",
            st.reconciles.load(Ordering::Relaxed)
        ));
    }
    out.push_str("# HELP cellplane_controller_errors_total Reconcile passes that failed.\n");
    out.push_str("# TYPE cellplane_controller_errors_total counter\n");
    for (name, st) in s.controllers.iter() {
        out.push_str(&format!(
            "cellplane_controller_errors_total{{controller=\"{name}\"}} {}\n",
            st.errors.load(Ordering::Relaxed)
        ));
    }
    if let Ok(counts) = s.service.store().job_counts().await {
        out.push_str("# HELP cellplane_jobs Jobs in the store, by state.\n");
        out.push_str("# TYPE cellplane_jobs gauge\n");
        for (state, n) in counts {
            out.push_str(&format!("cellplane_jobs{{state=\"{state}\"}} {n}\n"));
        }
    }
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "this document")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi::ApiDoc::openapi())
}
