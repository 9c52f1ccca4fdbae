//! Unauthenticated probes: `GET /healthz`, `GET /version` and `GET /metrics`.
//!
//! These answer orchestrators, routers and rollout gates, so they must stay cheap and must
//! never expose tenant data or secrets.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::AppState;
use crate::error::problem;

#[derive(Serialize)]
pub(super) struct Health {
    status: &'static str,
}

/// Healthy when the store answers a round trip; 503 otherwise.
pub(super) async fn healthz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(Health { status: "ok" }).into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "health check failed");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "the store does not answer",
            )
        }
    }
}

#[derive(Serialize)]
pub(super) struct Version {
    cell_id: String,
    app_version: String,
    backend: &'static str,
}

pub(super) async fn version(State(state): State<AppState>) -> Json<Version> {
    Json(Version {
        cell_id: state.cell_id.clone(),
        app_version: state.app_version.clone(),
        backend: state.store.backend().as_str(),
    })
}

pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
}
