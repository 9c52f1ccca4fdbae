//! `/v1/releases`: create, list, show, and the actions pause, resume, approve, abort,
//! retry and skip.

use super::error::{ApiError, ApiResult};
use super::extract::{decode_cursor, limit_of, page, ApiJson, ApiQuery, PathParams};
use super::{ctx, with_location, AppState, CorrelationId};
use crate::auth::{Access, Principal};
use crate::service::releases::ReleaseAction;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use cellplane_api::releases::{CreateRelease, Release, ReleaseCellAction, ReleaseWithJob};
use cellplane_api::{Page, Problem};
use serde::Deserialize;

#[utoipa::path(post, path = "/v1/releases", tag = "releases", request_body = CreateRelease,
    responses((status = 201, body = ReleaseWithJob), (status = 400, body = Problem),
        (status = 409, body = Problem)))]
pub async fn create(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    ApiJson(req): ApiJson<CreateRelease>,
) -> ApiResult<Response> {
    p.allow(Access::Write)?;
    let out = s.service.create_release(&ctx(&p, &c), req).await?;
    Ok(with_location(
        StatusCode::CREATED,
        &format!("/v1/releases/{}", out.release.release_id),
        &out,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/releases", tag = "releases", params(ListParams),
    responses((status = 200, body = Page<Release>), (status = 400, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Release>>> {
    p.allow(Access::Read)?;
    let limit = limit_of(q.limit)?;
    let before = decode_cursor(q.cursor.as_deref())?;
    let items = s.service.list_releases(&before, limit + 1).await?;
    Ok(Json(page(items, limit, |r| r.created_at.clone())))
}

#[utoipa::path(get, path = "/v1/releases/{release_id}", tag = "releases",
    params(("release_id" = String, Path)),
    responses((status = 200, body = Release), (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Json<Release>> {
    let id = path.id("release_id")?;
    p.allow(Access::Read)?;
    Ok(Json(s.service.get_release(&id).await?))
}

#[utoipa::path(post, path = "/v1/releases/{release_id}/{action}", tag = "releases",
    params(("release_id" = String, Path),
        ("action" = String, Path, description = "pause, resume, approve, abort, retry or skip")),
    request_body(content = Option<ReleaseCellAction>,
        description = "retry and skip: the cell of the current wave"),
    responses((status = 200, body = Release), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
pub async fn action(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    body: Body,
) -> ApiResult<Json<Release>> {
    let id = path.id("release_id")?;
    p.allow(Access::Write)?;
    let raw = path
        .0
        .iter()
        .find(|(k, _)| k == "action")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let action = ReleaseAction::parse(&raw).ok_or_else(|| ApiError::not_found("no such action"))?;
    let bytes = super::extract::read_body(body, s.max_body_bytes).await?;
    let cell = if matches!(action, ReleaseAction::Retry | ReleaseAction::Skip) {
        let req: ReleaseCellAction = super::extract::parse_json(&bytes)?;
        Some(req.cell_id.into_string())
    } else {
        None
    };
    Ok(Json(
        s.service
            .release_action(&ctx(&p, &c), &id, action, cell.as_deref())
            .await?,
    ))
}
