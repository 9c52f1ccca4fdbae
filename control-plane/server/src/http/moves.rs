//! `POST /v1/tenants/{tenant_id}/move`, `/v1/moves`

use super::error::{ApiError, ApiResult};
use super::extract::{decode_cursor, limit_of, page, ApiJson, ApiQuery, PathParams};
use super::{ctx, with_location, AppState, CorrelationId};
use crate::auth::{Access, Principal};
use crate::persistence::MoveFilter;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use cellplane_api::{Move, MoveRequest, MoveState, MoveWithJob, Page, Problem};
use serde::Deserialize;

#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/move", tag = "moves",
    request_body = MoveRequest, params(("tenant_id" = String, Path)),
    responses((status = 202, body = MoveWithJob), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
pub async fn create(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    ApiJson(req): ApiJson<MoveRequest>,
) -> ApiResult<Response> {
    let id = path.id("tenant_id")?;
    p.allow(Access::Write)?;
    let out = s.service.move_tenant(&ctx(&p, &c), &id, req).await?;
    Ok(with_location(
        StatusCode::ACCEPTED,
        &format!("/v1/moves/{}", out.move_.move_id),
        &out,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub tenant_id: Option<String>,
    /// `running`, `succeeded`, `rolled_back` or `failed`.
    pub state: Option<String>,
    /// Moves into or out of this cell.
    pub cell_id: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/moves", tag = "moves", params(ListParams),
    responses((status = 200, body = Page<Move>), (status = 400, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Move>>> {
    let mut f = MoveFilter::default();
    for (field, v) in [("tenant_id", &q.tenant_id), ("cell_id", &q.cell_id)] {
        if let Some(v) = v {
            cellplane_api::validate_id(v).map_err(|e| ApiError::field(field, e.to_string()))?;
        }
    }
    f.tenant_id = q.tenant_id.clone();
    f.cell_id = q.cell_id.clone();
    match p.tenant_scope() {
        Some(own) => {
            if f.tenant_id.as_deref().is_some_and(|t| t != own) {
                return Err(ApiError::not_found("no such resource"));
            }
            f.tenant_id = Some(own.to_string());
        }
        None => p.allow(Access::Read)?,
    }
    if let Some(st) = &q.state {
        f.state = Some(MoveState::parse(st).ok_or_else(|| {
            ApiError::field("state", "must be running, succeeded, rolled_back or failed")
        })?);
    }
    let limit = limit_of(q.limit)?;
    let before = decode_cursor(q.cursor.as_deref())?;
    let items = s.service.list_moves(&f, &before, limit + 1).await?;
    Ok(Json(page(items, limit, |m| m.move_id.clone())))
}

#[utoipa::path(get, path = "/v1/moves/{move_id}", tag = "moves", params(("move_id" = String, Path)),
    responses((status = 200, body = Move), (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Json<Move>> {
    let id = path.id("move_id")?;
    if p.tenant_scope().is_none() {
        p.allow(Access::Read)?;
    }
    let m = s.service.get_move(&id).await?;
    if p.tenant_scope().is_some_and(|t| t != m.tenant_id) {
        return Err(ApiError::not_found("no such resource"));
    }
    Ok(Json(m))
}
