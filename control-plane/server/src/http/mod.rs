//! The HTTP edge: routing, middleware (correlation ids, metrics, body limits,
//! authentication, authoring rate limits, the authorization gate, idempotent replay) and
//! thin handlers, one file per resource. Handlers parse, check the objects they load and
//! call [`Service`]; they never run SQL. Nothing of a request is parsed before the caller
//! is authorized for its route.

pub mod audit;
pub mod authorize;
pub mod cells;
pub mod controllers;
pub mod error;
pub mod events;
pub mod extract;
pub mod jobs;
mod manifests;
mod moves;
pub mod openapi;
pub mod ops;
pub mod organizations;
mod releases;
pub mod routes;
pub mod templates;
pub mod tenants;
pub mod tokens;
pub mod usage;
pub mod webhooks;

use crate::auth::{hash_token, Principal};
use crate::jobs::JobMetrics;
use crate::persistence::StoredResponse;
use crate::service::{Ctx, Service};
use crate::telemetry::HttpMetrics;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::{ApiError, ApiResult};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone)]
pub struct AppState {
    pub service: Service,
    pub max_body_bytes: usize,
    /// The body limit of `POST /v1/apply` (a fleet of manifests).
    pub max_apply_bytes: usize,
    pub http_metrics: Arc<HttpMetrics>,
    pub job_metrics: Arc<JobMetrics>,
    pub limiter: Arc<RateLimiter>,
    pub tokens: Arc<crate::auth::TokenCache>,
    /// This replica's identity and whether it leads each controller.
    pub replica: String,
    pub controllers: crate::controllers::Statuses,
}

/// The correlation id of the current request (accepted from the client or generated).
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

tokio::task_local! {
    /// The correlation id of the request this task serves, for problem documents and
    /// error logs built away from the handler's arguments.
    static CURRENT_CORRELATION_ID: String;
}

/// The correlation id of the request being served, if any.
pub fn current_correlation_id() -> Option<String> {
    CURRENT_CORRELATION_ID.try_with(Clone::clone).ok()
}

/// Response fields the idempotency layer never stores nor replays: secrets that are shown
/// once. A handler inserts it into its response's extensions; a replay then answers
/// without those fields and names them in `Idempotent-Replay-Withheld`.
#[derive(Debug, Clone, Copy)]
pub struct WithheldOnReplay(pub &'static [&'static str]);

pub fn ctx(p: &Principal, c: &CorrelationId) -> Ctx {
    Ctx {
        actor: p.actor(),
        correlation_id: c.0.clone(),
    }
}

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/organizations",
            post(organizations::create).get(organizations::list),
        )
        .route(
            "/v1/organizations/{organization_id}",
            get(organizations::get_one),
        )
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route(
            "/v1/tenants/{tenant_id}",
            get(tenants::get_one).patch(tenants::patch),
        )
        .route(
            "/v1/tenants/{tenant_id}/environments",
            post(tenants::create_environment).get(tenants::list_environments),
        )
        .route("/v1/tenants/{tenant_id}/move", post(moves::create))
        .route("/v1/tenants/{tenant_id}/{action}", post(tenants::action))
        .route("/v1/moves", get(moves::list))
        .route("/v1/apply", post(manifests::apply))
        .route("/v1/releases", post(releases::create).get(releases::list))
        .route("/v1/releases/{release_id}", get(releases::get_one))
        .route("/v1/releases/{release_id}/{action}", post(releases::action))
        .route("/v1/manifests/{kind}/{name}", get(manifests::get_one))
        .route("/v1/moves/{move_id}", get(moves::get_one))
        .route("/v1/cells", post(cells::create).get(cells::list))
        .route(
            "/v1/cells/{cell_id}",
            get(cells::get_one)
                .patch(cells::patch)
                .delete(cells::delete),
        )
        .route("/v1/cells/{cell_id}/drain", post(cells::drain))
        .route("/v1/cells/{cell_id}/apply", post(cells::apply))
        .route("/v1/cells/{cell_id}/plan", post(cells::plan))
        .route("/v1/cells/{cell_id}/metrics", get(cells::metrics))
        .route("/v1/templates", get(templates::list))
        .route("/v1/templates/{template}", get(templates::get_one))
        .route("/v1/jobs", get(jobs::list))
        .route("/v1/jobs/{job_id}", get(jobs::get_one))
        .route("/v1/jobs/{job_id}/log", get(jobs::log))
        .route("/v1/jobs/{job_id}/events", get(jobs::events))
        .route("/v1/jobs/{job_id}/cancel", post(jobs::cancel))
        .route("/v1/routes", get(routes::watch))
        .route("/v1/routes/history", get(routes::history))
        .route(
            "/v1/routes/{tenant_id}/{env}",
            get(routes::get_one).patch(routes::patch),
        )
        .route("/v1/routers", get(routes::list_routers))
        .route("/v1/controllers", get(controllers::list))
        .route("/v1/routers/{router_id}/heartbeat", post(routes::heartbeat))
        .route("/v1/regions", get(routes::list_regions))
        .route(
            "/v1/regions/{region}",
            get(routes::get_region).put(routes::put_region),
        )
        .route("/v1/audit", get(audit::list))
        .route("/v1/audit/verify", get(audit::verify))
        .route("/v1/events", get(events::list))
        .route("/v1/usage", get(usage::report))
        .route("/v1/webhooks", post(webhooks::create).get(webhooks::list))
        .route(
            "/v1/webhooks/{webhook_id}",
            get(webhooks::get_one)
                .patch(webhooks::patch)
                .delete(webhooks::delete),
        )
        .route(
            "/v1/webhooks/{webhook_id}/rotate-secret",
            post(webhooks::rotate_secret),
        )
        .route("/v1/webhooks/{webhook_id}/test", post(webhooks::test))
        .route(
            "/v1/webhooks/{webhook_id}/deliveries",
            get(webhooks::deliveries),
        )
        .route(
            "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver",
            post(webhooks::redeliver),
        )
        .route("/v1/webhooks/{webhook_id}/replay", post(webhooks::replay))
        .route("/v1/tokens", post(tokens::create).get(tokens::list))
        .route(
            "/v1/tokens/{token_id}",
            axum::routing::delete(tokens::revoke),
        )
        // Outermost first: authenticate, authorize the route, then replay or run.
        .layer(middleware::from_fn_with_state(state.clone(), idempotency))
        .layer(middleware::from_fn(authorize::gate))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/v1/openapi.json", get(ops::openapi))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn fallback() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "method not allowed",
        "this route does not accept that method",
    )
}

fn valid_correlation_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Outermost layer: correlation id, tracing span, metrics, early 413 on Content-Length.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let corr = req
        .headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| valid_correlation_id(s))
        .map(str::to_string)
        .unwrap_or_else(|| crate::persistence::new_id("corr"));
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    req.extensions_mut().insert(CorrelationId(corr.clone()));
    let too_large = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| {
            n > if route == "/v1/apply" {
                state.max_apply_bytes
            } else {
                state.max_body_bytes
            }
        });
    let span =
        tracing::info_span!("request", method = %method, route = %route, correlation_id = %corr);
    let mut resp = if too_large {
        let (_, body) = req.into_parts();
        let _ = extract::read_body(body, 0).await;
        CURRENT_CORRELATION_ID.sync_scope(corr.clone(), || {
            ApiError::too_large(if route == "/v1/apply" {
                state.max_apply_bytes
            } else {
                state.max_body_bytes
            })
            .into_response()
        })
    } else {
        use tracing::Instrument;
        CURRENT_CORRELATION_ID
            .scope(corr.clone(), next.run(req).instrument(span.clone()))
            .await
    };
    if let Ok(v) = HeaderValue::from_str(&corr) {
        resp.headers_mut().insert("x-correlation-id", v);
    }
    let status = resp.status();
    if status.is_server_error() {
        span.in_scope(|| tracing::warn!(status = status.as_u16(), "request failed"));
    }
    state
        .http_metrics
        .observe(method.as_str(), &route, status.as_u16(), started.elapsed());
    resp
}

/// Per-token token buckets for authoring requests (POST, PATCH, DELETE).
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_sec: f64, burst: f64) -> Self {
        Self {
            per_sec,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token; on refusal returns the seconds until one is available.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        if self.per_sec <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            buckets.clear();
        }
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        let refill = now.duration_since(*at).as_secs_f64() * self.per_sec;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_sec).ceil().max(1.0) as u64)
        }
    }
}

/// Resolves the bearer token to a [`Principal`] and applies the authoring rate limit.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token.filter(|t| !t.is_empty() && t.len() <= 256) else {
        return ApiError::unauthorized("send Authorization: Bearer <token>").into_response();
    };
    let token_hash = hash_token(token);
    let principal = match state.tokens.get(&token_hash) {
        Some(p) => p,
        None => match state.service.store().token_by_hash(&token_hash).await {
            Ok(Some(row)) => {
                let p = Principal {
                    token_id: row.info.token_id,
                    role: row.info.role,
                    tenant_id: row.info.tenant_id,
                };
                state.tokens.put(token_hash, p.clone());
                p
            }
            Ok(None) => {
                return ApiError::unauthorized("the token is unknown or revoked").into_response()
            }
            Err(e) => {
                return ApiError::from(crate::service::ServiceError::Store(e)).into_response()
            }
        },
    };
    let authoring = matches!(*req.method(), Method::POST | Method::PATCH | Method::DELETE);
    if authoring {
        if let Err(retry) = state.limiter.check(&principal.token_id) {
            return ApiError::rate_limited(retry).into_response();
        }
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Replays the first successful response of a `POST` carrying `Idempotency-Key`. A key is
/// scoped to the principal and the route (method and matched path); the request it was
/// first used with is recognised by a fingerprint of its path, query and canonical JSON
/// body (key order and whitespace do not matter).
async fn idempotency(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match idempotency_inner(state, req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn idempotency_inner(state: AppState, req: Request, next: Next) -> ApiResult<Response> {
    if req.method() != Method::POST {
        return Ok(next.run(req).await);
    }
    let Some(key) = req.headers().get("idempotency-key") else {
        return Ok(next.run(req).await);
    };
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::field("Idempotency-Key", "must be 1-255 visible ASCII characters")
        })?
        .to_string();
    let principal = req
        .extensions()
        .get::<Principal>()
        .map(|p| p.token_id.clone())
        .ok_or_else(|| {
            ApiError::internal_logged("idempotent request without a principal", &req.uri())
        })?;
    let route = match req.extensions().get::<MatchedPath>() {
        Some(m) => format!("{} {}", req.method(), m.as_str()),
        None => {
            return Err(ApiError::internal_logged(
                "idempotent request without a matched route",
                &req.uri(),
            ))
        }
    };
    let (parts, body) = req.into_parts();
    let bytes = extract::read_body(body, state.max_body_bytes).await?;
    let request_hash = request_fingerprint(&parts.method, &parts.uri, &bytes);
    let store = state.service.store();
    let stored = store
        .idempotent_response(&principal, &route, &key)
        .await
        .map_err(|e| ApiError::from(crate::service::ServiceError::Store(e)))?;
    if let Some(stored) = stored {
        return replay(stored, &request_hash);
    }
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if !resp.status().is_success() {
        return Ok(resp);
    }
    let (rparts, rbody) = resp.into_parts();
    let rbytes = axum::body::to_bytes(rbody, 16 * 1024 * 1024)
        .await
        .map_err(|e| ApiError::internal_logged("reading a response to store it failed", &e))?;
    let withheld = rparts
        .extensions
        .get::<WithheldOnReplay>()
        .map(|w| w.0)
        .unwrap_or(&[]);
    // A body whose secret fields cannot be removed is not stored at all.
    let Some(body) = storable_body(&rbytes, withheld) else {
        tracing::warn!(route = %route, "a response with withheld fields is not a JSON object; not stored for replay");
        return Ok(Response::from_parts(rparts, Body::from(rbytes)));
    };
    let header_str = |name: header::HeaderName| {
        rparts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let record = StoredResponse {
        request_hash: request_hash.clone(),
        status: rparts.status.as_u16(),
        body,
        withheld: withheld.join(","),
        etag: header_str(header::ETAG),
        location: header_str(header::LOCATION),
    };
    match store
        .store_idempotent_response(&principal, &route, &key, &record)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            // A concurrent request with the same key stored its response first.
            if let Ok(Some(first)) = store.idempotent_response(&principal, &route, &key).await {
                return replay(first, &request_hash);
            }
        }
        Err(e) => tracing::warn!(error = %e, "storing an idempotent response failed"),
    }
    Ok(Response::from_parts(rparts, Body::from(rbytes)))
}

/// The response body to store: as sent, or without the `withheld` top-level fields (then
/// it must be a JSON object, else `None`).
fn storable_body(bytes: &[u8], withheld: &[&str]) -> Option<String> {
    if withheld.is_empty() {
        return Some(String::from_utf8_lossy(bytes).into_owned());
    }
    let mut v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let obj = v.as_object_mut()?;
    for f in withheld {
        obj.remove(*f);
    }
    Some(v.to_string())
}

/// What identifies "the same request" for a key: method, path, query and the body as
/// canonical JSON (object keys sorted, no whitespace); a body that is not JSON counts as
/// its bytes (it fails validation, and failures are not stored).
fn request_fingerprint(method: &Method, uri: &axum::http::Uri, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_str());
    h.update([0]);
    h.update(uri.path());
    h.update([0]);
    h.update(uri.query().unwrap_or(""));
    h.update([0]);
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let mut canonical = String::new();
            write_canonical_json(&v, &mut canonical);
            h.update(b"json:");
            h.update(canonical.as_bytes());
        }
        Err(_) => {
            h.update(b"raw:");
            h.update(body);
        }
    }
    hex::encode(h.finalize())
}

fn write_canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical_json(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn replay(stored: StoredResponse, request_hash: &str) -> ApiResult<Response> {
    if stored.request_hash != request_hash {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "idempotency key reused",
            "this Idempotency-Key was used with a different request",
        ));
    }
    let mut resp = Response::new(Body::from(stored.body));
    *resp.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    if !stored.withheld.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&stored.withheld) {
            h.insert("idempotent-replay-withheld", v);
        }
    }
    if let Some(e) = stored.etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        h.insert(header::ETAG, e);
    }
    if let Some(l) = stored.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LOCATION, l);
    }
    Ok(resp)
}

/// A JSON response with an `ETag` of the resource's version.
pub fn with_etag<T: serde::Serialize>(status: StatusCode, version: i64, body: &T) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

pub fn with_location<T: serde::Serialize>(
    status: StatusCode,
    location: &str,
    body: &T,
) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_key_order_and_whitespace_only() {
        let uri: axum::http::Uri = "/v1/tenants".parse().expect("a uri");
        let a = request_fingerprint(&Method::POST, &uri, br#"{"a":1,"b":{"c":[1,2],"d":"x"}}"#);
        let b = request_fingerprint(
            &Method::POST,
            &uri,
            b"{ \"b\" : {\"d\":\"x\", \"c\":[1, 2]},\n \"a\": 1 }",
        );
        assert_eq!(a, b);
        let c = request_fingerprint(&Method::POST, &uri, br#"{"a":1,"b":{"c":[2,1],"d":"x"}}"#);
        assert_ne!(a, c);
        let q: axum::http::Uri = "/v1/tenants?force=true".parse().expect("a uri");
        assert_ne!(
            a,
            request_fingerprint(&Method::POST, &q, br#"{"a":1,"b":{"c":[1,2],"d":"x"}}"#)
        );
    }

    #[test]
    fn withheld_fields_never_stored() {
        let body = br#"{"token_id":"t1","token":"cp_secret"}"#;
        let stored = storable_body(body, &["token"]).expect("an object");
        assert!(!stored.contains("cp_secret"), "{stored}");
        assert!(stored.contains("t1"));
        assert_eq!(storable_body(b"[1]", &["token"]), None);
    }
}
