//! `/v1/cells`: the cell registry and its lifecycle jobs (stamp on create, apply, drift
//! check, destroy on delete).

use super::error::{ApiError, ApiResult};
use super::extract::{decode_cursor, limit_of, page, ApiJson, ApiQuery, IfMatch, PathParams};
use super::{ctx, with_etag, AppState, CorrelationId};
use crate::auth::{Access, Principal};
use crate::persistence::CellFilter;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use cellplane_api::{
    validate_id, Cell, CellState, CellWithJob, CreateCell, Page, PatchCell, Problem, Tier,
};
use serde::Deserialize;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[param(pattern = "^[a-z][a-z0-9-]{1,62}$")]
    pub region: Option<String>,
    pub tier: Option<String>,
    pub state: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[utoipa::path(post, path = "/v1/cells", tag = "cells", request_body = CreateCell,
    params(("Idempotency-Key" = Option<String>, Header, description = "replay protection")),
    responses((status = 202, body = CellWithJob), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn create(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    ApiJson(req): ApiJson<CreateCell>,
) -> ApiResult<Response> {
    p.allow(Access::Write)?;
    let out = s.service.create_cell(&ctx(&p, &c), req).await?;
    Ok(with_etag(StatusCode::ACCEPTED, out.cell.version, &out))
}

#[utoipa::path(get, path = "/v1/cells", tag = "cells", params(ListParams),
    responses((status = 200, body = Page<Cell>), (status = 400, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Cell>>> {
    p.allow(Access::Read)?;
    if let Some(r) = &q.region {
        validate_id(r).map_err(|e| ApiError::field("region", e.to_string()))?;
    }
    if let Some(t) = &q.tier {
        Tier::parse(t).ok_or_else(|| ApiError::field("tier", "must be pooled or dedicated"))?;
    }
    if let Some(st) = &q.state {
        CellState::parse(st).ok_or_else(|| ApiError::field("state", "is not a cell state"))?;
    }
    let limit = limit_of(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    let f = CellFilter {
        region: q.region,
        tier: q.tier,
        state: q.state,
    };
    let items = s.service.list_cells(&f, &after, limit + 1).await?;
    Ok(Json(page(items, limit, |c| c.cell_id.clone())))
}

#[utoipa::path(get, path = "/v1/cells/{cell_id}", tag = "cells", params(("cell_id" = String, Path)),
    responses((status = 200, body = Cell), (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Response> {
    let id = path.id("cell_id")?;
    p.allow(Access::Read)?;
    let cell = s.service.get_cell(&id).await?;
    Ok(with_etag(StatusCode::OK, cell.version, &cell))
}

#[utoipa::path(patch, path = "/v1/cells/{cell_id}", tag = "cells", request_body = PatchCell,
    params(("cell_id" = String, Path), ("If-Match" = Option<String>, Header)),
    responses((status = 200, body = Cell), (status = 400, body = Problem), (status = 409, body = Problem),
              (status = 412, body = Problem)))]
pub async fn patch(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    IfMatch(if_match): IfMatch,
    ApiJson(req): ApiJson<PatchCell>,
) -> ApiResult<Response> {
    let id = path.id("cell_id")?;
    p.allow(Access::Write)?;
    let cell = s
        .service
        .patch_cell(&ctx(&p, &c), &id, if_match, req)
        .await?;
    Ok(with_etag(StatusCode::OK, cell.version, &cell))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DrainParams {
    /// Also move every tenant environment off the cell (a `cell.drain` job; 202).
    #[serde(rename = "move")]
    pub move_tenants: Option<bool>,
}

#[utoipa::path(post, path = "/v1/cells/{cell_id}/drain", tag = "cells",
    params(("cell_id" = String, Path), ("If-Match" = Option<String>, Header), DrainParams),
    responses((status = 200, body = Cell), (status = 202, body = CellWithJob, description = "with move=true: the cell and its drain job"),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn drain(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    IfMatch(if_match): IfMatch,
    ApiQuery(q): ApiQuery<DrainParams>,
) -> ApiResult<Response> {
    let id = path.id("cell_id")?;
    p.allow(Access::Write)?;
    let move_tenants = q.move_tenants.unwrap_or(false);
    let out = s
        .service
        .drain_cell(&ctx(&p, &c), &id, if_match, move_tenants)
        .await?;
    if move_tenants {
        return Ok(with_etag(StatusCode::ACCEPTED, out.cell.version, &out));
    }
    Ok(with_etag(StatusCode::OK, out.cell.version, &out.cell))
}

#[utoipa::path(delete, path = "/v1/cells/{cell_id}", tag = "cells",
    params(("cell_id" = String, Path), ("If-Match" = Option<String>, Header)),
    responses((status = 202, body = CellWithJob), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    IfMatch(if_match): IfMatch,
) -> ApiResult<Response> {
    let id = path.id("cell_id")?;
    p.allow(Access::Write)?;
    let out = s.service.delete_cell(&ctx(&p, &c), &id, if_match).await?;
    Ok(with_etag(StatusCode::ACCEPTED, out.cell.version, &out))
}

#[utoipa::path(post, path = "/v1/cells/{cell_id}/apply", tag = "cells",
    params(("cell_id" = String, Path), ("If-Match" = Option<String>, Header)),
    responses((status = 202, body = CellWithJob), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn apply(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    IfMatch(if_match): IfMatch,
) -> ApiResult<Response> {
    let id = path.id("cell_id")?;
    p.allow(Access::Write)?;
    let out = s.service.apply_cell(&ctx(&p, &c), &id, if_match).await?;
    Ok(with_etag(StatusCode::ACCEPTED, out.cell.version, &out))
}

#[utoipa::path(post, path = "/v1/cells/{cell_id}/plan", tag = "cells",
    params(("cell_id" = String, Path)),
    responses((status = 202, body = CellWithJob, description = "the drift-check job"),
              (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn plan(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
) -> ApiResult<Response> {
    let id = path.id("cell_id")?;
    p.allow(Access::Write)?;
    let out = s.service.plan_cell(&ctx(&p, &c), &id).await?;
    Ok(with_etag(StatusCode::ACCEPTED, out.cell.version, &out))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MetricsParams {
    /// The window, in seconds (default 60; at most `routing.cell_sample_retention_secs`).
    #[param(minimum = 1, maximum = 604800)]
    pub window_secs: Option<u64>,
}

#[utoipa::path(get, path = "/v1/cells/{cell_id}/metrics", tag = "cells",
    params(("cell_id" = String, Path), MetricsParams),
    responses((status = 200, body = cellplane_api::CellMetrics,
               description = "the cell's traffic over the window, as routers reported it"),
              (status = 404, body = Problem)))]
pub async fn metrics(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
    ApiQuery(q): ApiQuery<MetricsParams>,
) -> ApiResult<Json<cellplane_api::CellMetrics>> {
    let id = path.id("cell_id")?;
    p.allow(Access::Read)?;
    let window = q.window_secs.unwrap_or(60);
    if !(1..=604_800).contains(&window) {
        return Err(ApiError::field(
            "window_secs",
            "must be between 1 and 604800",
        ));
    }
    s.service.get_cell(&id).await?;
    Ok(Json(s.service.routing().cell_metrics(&id, window).await?))
}
