//! The tenant-scoped key-value API: `PUT/GET/DELETE /v1/kv/{key}` and `GET /v1/kv`.
//!
//! The tenant always comes from `X-Tenant-ID`, never from the path or body, and every store
//! call carries it, so one tenant can never name another tenant's keys. Handlers must never
//! buffer more than the 1 MiB value limit of a request body.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{ApiQuery, AppState, HeaderTenant, PathKey};
use crate::contract::MAX_VALUE_BYTES;
use crate::error::ApiError;
use crate::ids::{Key, Prefix};

const DEFAULT_LIST_LIMIT: i64 = 100;
const MAX_LIST_LIMIT: i64 = 1000;

/// How much of an oversized body is drained before the 413 goes out.
const DRAIN_LIMIT: u64 = 16 << 20;

#[derive(Serialize)]
struct WriteResponse<'a> {
    key: &'a str,
    version: i64,
    seq: i64,
}

pub(super) async fn put(
    State(state): State<AppState>,
    HeaderTenant(tenant): HeaderTenant,
    PathKey(key): PathKey,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let value = read_limited(&headers, body, MAX_VALUE_BYTES).await?;
    let written = state.store.put(&tenant, &key, &value).await?;
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = WriteResponse {
        key: key.as_str(),
        version: written.version,
        seq: written.seq,
    };
    // Usage units: one per KiB written (at least one per write), metered by the router.
    let units = (value.len() as u64).div_ceil(1024).max(1);
    Ok((
        status,
        [
            etag(written.version),
            (
                axum::http::header::HeaderName::from_static("x-usage-units"),
                axum::http::HeaderValue::from(units),
            ),
        ],
        Json(body),
    )
        .into_response())
}

pub(super) async fn get(
    State(state): State<AppState>,
    HeaderTenant(tenant): HeaderTenant,
    PathKey(key): PathKey,
) -> Result<Response, ApiError> {
    let entry = state
        .store
        .get(&tenant, &key)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no value under key {}", key.as_str())))?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            etag(entry.version),
        ],
        entry.value,
    )
        .into_response())
}

pub(super) async fn delete(
    State(state): State<AppState>,
    HeaderTenant(tenant): HeaderTenant,
    PathKey(key): PathKey,
) -> Result<StatusCode, ApiError> {
    match state.store.delete(&tenant, &key).await? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::NotFound(format!(
            "no value under key {}",
            key.as_str()
        ))),
    }
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    #[serde(default)]
    prefix: String,
    limit: Option<i64>,
    cursor: Option<String>,
}

#[derive(Serialize)]
pub(super) struct ListItem {
    key: String,
    version: i64,
    size: i64,
}

#[derive(Serialize)]
pub(super) struct ListResponse {
    items: Vec<ListItem>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

pub(super) async fn list(
    State(state): State<AppState>,
    HeaderTenant(tenant): HeaderTenant,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<ListResponse>, ApiError> {
    let prefix =
        Prefix::parse(&query.prefix).map_err(|e| ApiError::BadRequest(format!("prefix: {e}")))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIST_LIMIT}"
        )));
    }
    let after = query
        .cursor
        .as_deref()
        .map(Key::parse)
        .transpose()
        .map_err(|_| ApiError::BadRequest("cursor must be a next_cursor of a listing".into()))?;
    // One extra row tells whether another page exists.
    let mut rows = state
        .store
        .list(&tenant, &prefix, after.as_ref(), limit + 1)
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|row| row.key.clone()))
        .flatten();
    let items = rows
        .into_iter()
        .map(|row| ListItem {
            key: row.key,
            version: row.version,
            size: row.size,
        })
        .collect();
    Ok(Json(ListResponse { items, next_cursor }))
}

fn etag(version: i64) -> (header::HeaderName, HeaderValue) {
    (
        header::ETAG,
        HeaderValue::from_str(&format!("\"{version}\"")).expect("a quoted number is a header"),
    )
}

/// Read a request body of at most `limit` bytes; a larger one is refused with 413. The rest
/// of an oversized body is read and discarded (up to [`DRAIN_LIMIT`]) before answering, so
/// the client sees the 413 instead of a connection reset.
async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > DRAIN_LIMIT) {
        return Err(ApiError::PayloadTooLarge(limit as u64));
    }
    let mut out = Vec::with_capacity(declared.map_or(0, |len| len.min(limit as u64) as usize));
    let mut seen: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("reading the body failed: {e}")))?;
        seen += chunk.len() as u64;
        if seen > DRAIN_LIMIT {
            break;
        }
        if seen <= limit as u64 {
            out.extend_from_slice(&chunk);
        }
    }
    if seen > limit as u64 {
        return Err(ApiError::PayloadTooLarge(limit as u64));
    }
    Ok(out)
}
