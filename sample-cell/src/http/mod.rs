//! The HTTP surface: router, shared state, middleware and extractors.
//!
//! Middleware stamps `X-Cell-ID`/`X-App-Version` on every response, records metrics,
//! injects faults and latency into tenant routes only, guards the cell contract with the
//! admin token, and turns any bare error response (unknown route, wrong method, extractor
//! rejection) into problem+json. Handlers stay thin: authorize → parse → one service or
//! store call → JSON. Nothing here runs SQL or holds tenant data beyond one request.

mod cell;
mod kv;
mod probe;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::config::{Config, Secret};
use crate::error::{problem, ApiError, PROBLEM_JSON};
use crate::ids::{Key, TenantId};
use crate::metrics::{Metrics, RouteClass};
use crate::store::Store;

pub const X_CELL_ID: HeaderName = HeaderName::from_static("x-cell-id");
pub const X_APP_VERSION: HeaderName = HeaderName::from_static("x-app-version");
pub const X_TENANT_ID: HeaderName = HeaderName::from_static("x-tenant-id");

/// Everything a request may need, shared by all handlers.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    pub cell_id: String,
    pub app_version: String,
    pub metrics: Metrics,
    cell_id_header: HeaderValue,
    app_version_header: HeaderValue,
    admin_token_hash: Option<[u8; 32]>,
    fault_rate: f64,
    extra_latency: Duration,
}

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: &Config, store: Store) -> Self {
        Self(Arc::new(Inner {
            store,
            cell_id: config.cell_id.clone(),
            app_version: config.app_version.clone(),
            metrics: Metrics::new(&config.cell_id, &config.app_version),
            cell_id_header: HeaderValue::from_str(&config.cell_id)
                .expect("cell ids are validated as identifiers"),
            app_version_header: HeaderValue::from_str(&config.app_version)
                .expect("app versions are validated as header values"),
            admin_token_hash: config.admin_token.as_ref().map(token_hash),
            fault_rate: config.fault_rate,
            extra_latency: Duration::from_millis(config.extra_latency_ms),
        }))
    }
}

fn token_hash(token: &Secret) -> [u8; 32] {
    Sha256::digest(token.expose().as_bytes()).into()
}

pub fn router(state: AppState) -> Router {
    let tenant = Router::new()
        .route("/v1/kv", get(kv::list))
        .route("/v1/kv/{key}", get(kv::get).put(kv::put).delete(kv::delete))
        .route_layer(from_fn_with_state(state.clone(), inject_faults));
    let contract = Router::new()
        .route("/cell/v1/tenants/{tenant}", delete(cell::purge))
        .route("/cell/v1/tenants/{tenant}/export", get(cell::export))
        .route("/cell/v1/tenants/{tenant}/import", post(cell::import))
        .route("/cell/v1/tenants/{tenant}/freeze", post(cell::freeze))
        .route("/cell/v1/tenants/{tenant}/unfreeze", post(cell::unfreeze))
        .route("/cell/v1/tenants/{tenant}/checksum", get(cell::checksum))
        .route_layer(from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/healthz", get(probe::healthz))
        .route("/version", get(probe::version))
        .route("/metrics", get(probe::metrics))
        .merge(tenant)
        .merge(contract)
        .fallback(not_found)
        .layer(from_fn(problems_only))
        .layer(from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// Outermost: identify the answering cell on every response and record metrics.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let class = RouteClass::of_path(request.uri().path());
    let started = Instant::now();
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(X_CELL_ID, state.cell_id_header.clone());
    headers.insert(X_APP_VERSION, state.app_version_header.clone());
    state
        .metrics
        .record(class, response.status().as_u16(), started.elapsed());
    response
}

/// Rewrite error responses that are not problem+json yet (axum's own rejections, 405s)
/// into problem+json, keeping their message as the detail.
async fn problems_only(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let detail = axum::body::to_bytes(body, 16 * 1024)
        .await
        .ok()
        .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
        .filter(|text| !text.trim().is_empty())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    let slug = match status {
        StatusCode::BAD_REQUEST => "bad-request",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        _ if status.is_client_error() => "client-error",
        _ => "server-error",
    };
    let mut fixed = problem(status, slug, detail.trim());
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(value) = parts.headers.get(&name) {
            fixed.headers_mut().insert(name, value.clone());
        }
    }
    fixed
}

/// Tenant routes only: `--extra-latency-ms`, then `--fault-rate`.
async fn inject_faults(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.extra_latency.is_zero() {
        tokio::time::sleep(state.extra_latency).await;
    }
    if state.fault_rate > 0.0 && rand::random::<f64>() < state.fault_rate {
        state.metrics.record_injected_fault();
        return ApiError::InjectedFault.into_response();
    }
    next.run(request).await
}

/// Cell contract routes only: `Authorization: Bearer <--admin-token>`.
async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.admin_token_hash else {
        return ApiError::AdminDisabled.into_response();
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| -> [u8; 32] { Sha256::digest(token.trim().as_bytes()).into() });
    // Comparing fixed-size hashes keeps the comparison time independent of the token.
    let matches = presented.is_some_and(|hash| {
        hash.iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    });
    if !matches {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// The tenant of a tenant API request, from `X-Tenant-ID` (set by the router).
pub struct HeaderTenant(pub TenantId);

impl<S: Send + Sync> FromRequestParts<S> for HeaderTenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let raw = parts
            .headers
            .get(X_TENANT_ID)
            .ok_or_else(|| ApiError::BadRequest("missing X-Tenant-ID header".into()))?;
        let raw = raw
            .to_str()
            .map_err(|_| ApiError::BadRequest("X-Tenant-ID is not visible ASCII".into()))?;
        TenantId::parse(raw)
            .map(HeaderTenant)
            .map_err(|e| ApiError::BadRequest(format!("X-Tenant-ID: {e}")))
    }
}

/// The `{tenant}` path segment of a cell contract route.
pub struct PathTenant(pub TenantId);

impl<S: Send + Sync> FromRequestParts<S> for PathTenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        TenantId::parse(&raw)
            .map(PathTenant)
            .map_err(|e| ApiError::BadRequest(e.to_string()))
    }
}

/// The `{key}` path segment of a tenant API route.
pub struct PathKey(pub Key);

impl<S: Send + Sync> FromRequestParts<S> for PathKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        Key::parse(&raw)
            .map(PathKey)
            .map_err(|e| ApiError::BadRequest(e.to_string()))
    }
}

/// A query string whose parse errors are problem+json 400s.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(query)| ApiQuery(query))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}
