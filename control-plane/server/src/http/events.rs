//! `/v1/events`: the published events (CloudEvents 1.0 JSON), a pull API for consumers
//! that do not take webhooks. A tenant-admin sees only its own tenant's events.

use super::error::{ApiError, ApiResult};
use super::extract::{decode_cursor, limit_of, page, ApiQuery};
use super::AppState;
use crate::auth::{Access, Principal};
use axum::extract::State;
use axum::{Extension, Json};
use cellplane_api::{Event, EventType, Page, Problem};
use serde::Deserialize;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Events with a `seq` greater than this (default 0: from the first).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Only these types: one, or several separated by commas
    /// (e.g. `dev.cellplane.tenancy.activated.v1`).
    #[serde(rename = "type")]
    #[param(max_length = 2048)]
    pub types: Option<String>,
    /// Only events about this subject: `tenant/{id}`, `cell/{id}`, `organization/{id}`.
    #[param(max_length = 200)]
    pub subject: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(ListParams),
    responses((status = 200, body = Page<Event>), (status = 400, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Event>>> {
    let tenant_id = match p.tenant_scope() {
        Some(own) => Some(own.to_string()),
        None => {
            p.allow(Access::Read)?;
            None
        }
    };
    let mut types = Vec::new();
    if let Some(list) = &q.types {
        if list.len() > 2048 {
            return Err(ApiError::field("type", "must be at most 2048 characters"));
        }
        for name in list.split(',') {
            let t = EventType::parse(name.trim()).ok_or_else(|| {
                ApiError::field(
                    "type",
                    format!("{name:?} is not an event type (see docs/events.md)"),
                )
            })?;
            types.push(t);
        }
    }
    if let Some(subject) = &q.subject {
        let ok = subject.len() <= 200
            && subject.split_once('/').is_some_and(|(kind, id)| {
                matches!(kind, "tenant" | "cell" | "organization" | "webhook")
                    && cellplane_api::validate_id(id).is_ok()
            });
        if !ok {
            return Err(ApiError::field(
                "subject",
                "must be tenant/{id}, cell/{id}, organization/{id} or webhook/{id}",
            ));
        }
    }
    if q.after.is_some_and(|a| a < 0) {
        return Err(ApiError::field("after", "must be at least 0"));
    }
    let limit = limit_of(q.limit)?;
    let cursor = decode_cursor(q.cursor.as_deref())?;
    let after = if cursor.is_empty() {
        q.after.unwrap_or(0)
    } else {
        let c: i64 = cursor
            .parse()
            .map_err(|_| ApiError::field("cursor", "is not a cursor returned by this API"))?;
        c.max(q.after.unwrap_or(0))
    };
    let items = s
        .service
        .list_events(
            after,
            &types,
            q.subject.as_deref(),
            tenant_id.as_deref(),
            limit + 1,
        )
        .await?;
    Ok(Json(page(items, limit, |e| e.seq.to_string())))
}
