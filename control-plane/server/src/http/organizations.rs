//! `/v1/organizations`

use super::error::ApiResult;
use super::extract::{decode_cursor, limit_of, page, ApiJson, ApiQuery, PathParams};
use super::{ctx, with_etag, AppState, CorrelationId};
use crate::auth::{Access, Principal};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use cellplane_api::{CreateOrganization, Organization, Page, Problem};
use serde::Deserialize;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[utoipa::path(post, path = "/v1/organizations", tag = "organizations",
    request_body = CreateOrganization,
    params(("Idempotency-Key" = Option<String>, Header, description = "replay protection")),
    responses((status = 201, body = Organization), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn create(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    ApiJson(req): ApiJson<CreateOrganization>,
) -> ApiResult<Response> {
    p.allow(Access::Write)?;
    let org = s.service.create_organization(&ctx(&p, &c), req).await?;
    Ok(with_etag(StatusCode::CREATED, org.version, &org))
}

#[utoipa::path(get, path = "/v1/organizations", tag = "organizations", params(ListParams),
    responses((status = 200, body = Page<Organization>), (status = 400, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Organization>>> {
    p.allow(Access::Read)?;
    let limit = limit_of(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    let items = s.service.list_organizations(&after, limit + 1).await?;
    Ok(Json(page(items, limit, |o| o.organization_id.clone())))
}

#[utoipa::path(get, path = "/v1/organizations/{organization_id}", tag = "organizations",
    params(("organization_id" = String, Path)),
    responses((status = 200, body = Organization), (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Response> {
    let id = path.id("organization_id")?;
    p.allow(Access::Read)?;
    let org = s.service.get_organization(&id).await?;
    Ok(with_etag(StatusCode::OK, org.version, &org))
}
