//! The one error type at the HTTP edge, rendered as `application/problem+json` (RFC 9457).
//!
//! Handlers return [`ApiError`]; lower layers' errors convert into it. Clients get a status,
//! a stable `type` and a clear `detail`, never internals: storage errors are logged here,
//! where they are handled, and shown only as "storage error". Bad input must map to a 4xx,
//! never to a 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::service::ServiceError;
use crate::store::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Seconds a client should wait before retrying a write to a frozen tenant.
pub const FROZEN_RETRY_AFTER_SECS: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("the cell contract routes are disabled: start sample-cell with --admin-token")]
    AdminDisabled,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    CursorMismatch(String),
    #[error("request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(u64),
    #[error("the tenant is frozen; writes are refused until it is unfrozen")]
    Frozen,
    #[error("fault injected by --fault-rate")]
    InjectedFault,
    #[error("storage error")]
    Store(#[source] StoreError),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Frozen => ApiError::Frozen,
            other => ApiError::Store(other),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::Store(err) => err.into(),
            ServiceError::CursorMismatch(detail) => ApiError::CursorMismatch(detail),
            ServiceError::InvalidLine { .. } | ServiceError::Body(_) => {
                ApiError::BadRequest(err.to_string())
            }
            ServiceError::TooLarge(limit) => ApiError::PayloadTooLarge(limit),
        }
    }
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::AdminDisabled => (StatusCode::FORBIDDEN, "admin-disabled"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::CursorMismatch(_) => (StatusCode::CONFLICT, "cursor-mismatch"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large"),
            ApiError::Frozen => (StatusCode::SERVICE_UNAVAILABLE, "tenant-frozen"),
            ApiError::InjectedFault => (StatusCode::INTERNAL_SERVER_ERROR, "injected-fault"),
            ApiError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage-error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug) = self.parts();
        if let ApiError::Store(err) = &self {
            tracing::error!(error = %err, "storage operation failed");
        }
        let mut response = problem(status, slug, &self.to_string());
        if matches!(self, ApiError::Frozen) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(FROZEN_RETRY_AFTER_SECS),
            );
        }
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

/// Prefix of every problem `type`: the one vocabulary of the control plane, the router and
/// the cells (`https://cellplane.dev/problems/tenant-frozen`).
pub const PROBLEM_TYPE_BASE: &str = "https://cellplane.dev/problems/";

/// A problem+json response; `slug` names the problem type.
pub fn problem(status: StatusCode, slug: &str, detail: &str) -> Response {
    let body = Problem {
        kind: format!("{PROBLEM_TYPE_BASE}{slug}"),
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        detail,
    };
    let json = serde_json::to_vec(&body).expect("a problem serializes infallibly");
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
        json,
    )
        .into_response()
}
