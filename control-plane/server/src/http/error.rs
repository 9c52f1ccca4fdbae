//! The one error type at the HTTP edge. Every failure leaves as `application/problem+json`
//! with a stable `type`, a title, the status and a detail a client can act on; internals
//! (SQL, paths, stack traces) are logged here and never sent.

use crate::auth::Denied;
use crate::service::ServiceError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cellplane_api::{FieldError, Problem};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            title,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "validation",
            "invalid request",
            detail,
        )
    }
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        let mut e = Self::bad_request(format!("{field}: {message}"));
        e.errors.push(FieldError {
            field: field.into(),
            message,
        });
        e
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "authentication required",
            detail,
        )
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "not found", detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "conflict", detail)
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "request body too large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    }
    pub fn rate_limited(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "too many requests",
            format!("authoring rate limit exceeded; retry in {retry_after} s"),
        );
        e.retry_after = Some(retry_after);
        e
    }
    /// A failure of the server itself. The caller logs what happened (with
    /// [`ApiError::internal_logged`] when it has the error at hand); the client gets this
    /// stable text and the correlation id.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
            "the server failed to handle the request; it has been logged",
        )
    }

    /// Logs `error` with the request's correlation id and returns [`ApiError::internal`].
    pub fn internal_logged(context: &'static str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(correlation_id = %correlation(), error = %error, "{context}");
        Self::internal()
    }

    pub fn to_problem(&self) -> Problem {
        Problem {
            type_: format!("https://cellplane.dev/problems/{}", self.kind),
            title: self.title.to_string(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            errors: self.errors.clone(),
            correlation_id: super::current_correlation_id(),
        }
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Forbidden(msg) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", "forbidden", msg)
            }
            Denied::Hidden => Self::not_found("no such resource"),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound { .. } => Self::not_found(e.to_string()),
            ServiceError::Conflict(msg) | ServiceError::Fenced(msg) => Self::conflict(msg),
            ServiceError::PreconditionFailed { .. } => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition-failed",
                "precondition failed",
                e.to_string(),
            ),
            ServiceError::Validation(errors) => {
                let detail = errors
                    .iter()
                    .map(|f| format!("{}: {}", f.field, f.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                let mut api = Self::bad_request(detail);
                api.errors = errors;
                api
            }
            ServiceError::Unavailable(msg) => {
                // The message names files, hosts and parser output: it is for operators,
                // who find it by the correlation id the client gets.
                tracing::error!(
                    correlation_id = %correlation(),
                    error = %msg,
                    "a dependency failed"
                );
                let mut api = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "service unavailable",
                    "a dependency of the control plane failed; retry shortly, or report the \
                     correlation id if it persists",
                );
                api.retry_after = Some(5);
                api
            }
            ServiceError::Store(err) => {
                tracing::error!(
                    correlation_id = %correlation(),
                    error = %err,
                    "store operation failed"
                );
                let mut api = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store-unavailable",
                    "store unavailable",
                    "the registry store could not complete the request; retry shortly",
                );
                api.retry_after = Some(1);
                api
            }
        }
    }
}

/// The current request's correlation id, for log lines about errors clients only see by it.
fn correlation() -> String {
    super::current_correlation_id().unwrap_or_default()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.to_problem()).unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
