//! `/v1/routes`, `/v1/routers` and `/v1/regions`: the routing table watch routers consume,
//! their heartbeats, operator hold/release, and region placement policies.

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery, IfMatch, PathParams};
use super::{ctx, with_etag, AppState, CorrelationId};
use crate::auth::{Access, Principal};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use cellplane_api::{
    Page, PatchRoute, Problem, Region, RegionPolicy, Route, RouteChanges, RouteHistoryEntry,
    RouterHeartbeat, RouterInfo,
};
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    /// The revision the caller has; 0 (or one older than the retained history) for the
    /// full table.
    #[param(minimum = 0)]
    pub since: Option<i64>,
    /// Seconds to wait for a change when there is none after `since` (at most the
    /// server's `routing.max_wait_secs`, 60 by default).
    #[param(minimum = 0, maximum = 60)]
    pub wait: Option<u64>,
}

#[utoipa::path(get, path = "/v1/routes", tag = "routing", params(WatchParams),
    responses((status = 200, body = RouteChanges), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub async fn watch(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<WatchParams>,
) -> ApiResult<Json<RouteChanges>> {
    p.allow(Access::Router)?;
    let since = q.since.unwrap_or(0);
    if since < 0 {
        return Err(ApiError::field("since", "must not be negative"));
    }
    let max = s.service.settings().routing.max_wait_secs;
    let wait = q.wait.unwrap_or(0);
    if wait > max {
        return Err(ApiError::field("wait", format!("must be at most {max}")));
    }
    let changes = s
        .service
        .routing()
        .route_changes(since, Duration::from_secs(wait))
        .await?;
    Ok(Json(changes))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    #[param(pattern = "^[a-z][a-z0-9-]{1,62}$")]
    pub tenant_id: Option<String>,
    /// Only changes older than this revision (paging backwards).
    #[param(minimum = 0)]
    pub before: Option<i64>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/routes/history", tag = "routing", params(HistoryParams),
    responses((status = 200, body = Page<RouteHistoryEntry>), (status = 400, body = Problem)))]
pub async fn history(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<HistoryParams>,
) -> ApiResult<Json<Page<RouteHistoryEntry>>> {
    p.allow(Access::Read)?;
    if let Some(t) = &q.tenant_id {
        cellplane_api::validate_id(t).map_err(|e| ApiError::field("tenant_id", e.to_string()))?;
    }
    let limit = super::extract::limit_of(q.limit)?;
    // Negative revisions are refused as `since` is on the watch (issue 15: `before=-1`
    // answered 200 with nothing).
    if q.before.is_some_and(|b| b < 0) {
        return Err(ApiError::field("before", "must not be negative"));
    }
    let before = q.before.unwrap_or(i64::MAX);
    let items = s
        .service
        .routing()
        .route_history(q.tenant_id.as_deref(), before, limit)
        .await?;
    Ok(Json(Page {
        next_cursor: None,
        items,
    }))
}

fn route_key(path: &PathParams) -> ApiResult<(String, String)> {
    Ok((path.id("tenant_id")?, path.id("env")?))
}

#[utoipa::path(get, path = "/v1/routes/{tenant_id}/{env}", tag = "routing",
    params(("tenant_id" = String, Path), ("env" = String, Path)),
    responses((status = 200, body = Route), (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Json<Route>> {
    let (tenant, env) = route_key(&path)?;
    if p.allow(Access::Router).is_err() {
        p.allow(Access::Read)?;
    }
    Ok(Json(s.service.routing().get_route(&tenant, &env).await?))
}

#[utoipa::path(patch, path = "/v1/routes/{tenant_id}/{env}", tag = "routing", request_body = PatchRoute,
    params(("tenant_id" = String, Path), ("env" = String, Path)),
    responses((status = 200, body = Route), (status = 400, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem)))]
pub async fn patch(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    ApiJson(req): ApiJson<PatchRoute>,
) -> ApiResult<Json<Route>> {
    let (tenant, env) = route_key(&path)?;
    p.allow(Access::Write)?;
    let r = s
        .service
        .routing()
        .set_route_mode(&ctx(&p, &c), &tenant, &env, req.mode)
        .await?;
    Ok(Json(r))
}

#[utoipa::path(post, path = "/v1/routers/{router_id}/heartbeat", tag = "routing",
    request_body = RouterHeartbeat, params(("router_id" = String, Path)),
    responses((status = 200, body = RouterInfo), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub async fn heartbeat(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    ApiJson(req): ApiJson<RouterHeartbeat>,
) -> ApiResult<Json<RouterInfo>> {
    let id = path.id("router_id")?;
    p.allow(Access::Router)?;
    Ok(Json(
        s.service
            .routing()
            .router_heartbeat(&ctx(&p, &c), &id, req)
            .await?,
    ))
}

#[utoipa::path(get, path = "/v1/routers", tag = "routing",
    responses((status = 200, body = Page<RouterInfo>), (status = 403, body = Problem)))]
pub async fn list_routers(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Page<RouterInfo>>> {
    p.allow(Access::Read)?;
    Ok(Json(Page {
        items: s.service.routing().list_routers().await?,
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/v1/regions", tag = "regions",
    responses((status = 200, body = Page<Region>)))]
pub async fn list_regions(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Page<Region>>> {
    p.allow(Access::Read)?;
    Ok(Json(Page {
        items: s.service.placement().list_regions().await?,
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/v1/regions/{region}", tag = "regions", params(("region" = String, Path)),
    responses((status = 200, body = Region), (status = 404, body = Problem)))]
pub async fn get_region(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Response> {
    let region = path.id("region")?;
    p.allow(Access::Read)?;
    let r = s.service.placement().get_region(&region).await?;
    Ok(with_etag(StatusCode::OK, r.version, &r))
}

#[utoipa::path(put, path = "/v1/regions/{region}", tag = "regions", request_body = RegionPolicy,
    params(("region" = String, Path), ("If-Match" = Option<String>, Header)),
    responses((status = 200, body = Region), (status = 201, body = Region), (status = 400, body = Problem),
              (status = 412, body = Problem)))]
pub async fn put_region(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    IfMatch(if_match): IfMatch,
    ApiJson(req): ApiJson<RegionPolicy>,
) -> ApiResult<Response> {
    let region = path.id("region")?;
    p.allow(Access::Write)?;
    let (r, created) = s
        .service
        .placement()
        .put_region(&ctx(&p, &c), &region, if_match, req)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_etag(status, r.version, &r))
}
