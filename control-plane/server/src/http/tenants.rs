//! `/v1/tenants`: registry records, lifecycle actions and environments.

use super::error::{ApiError, ApiResult};
use super::extract::{decode_cursor, limit_of, page, ApiJson, ApiQuery, IfMatch, PathParams};
use super::{ctx, with_etag, with_location, AppState, CorrelationId};
use crate::auth::{Access, Principal};
use crate::persistence::TenantFilter;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use cellplane_api::{
    validate_id, CreateEnvironment, CreateTenant, Environment, Job, LifecycleAction, MoveWithJob,
    Page, PatchTenant, Problem, Tenant, TenantState,
};
use serde::Deserialize;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub state: Option<String>,
    #[param(pattern = "^[a-z][a-z0-9-]{1,62}$")]
    pub region: Option<String>,
    #[param(pattern = "^[a-z][a-z0-9-]{1,62}$")]
    pub organization_id: Option<String>,
    #[param(pattern = "^[a-z][a-z0-9-]{1,62}$")]
    pub cell_id: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ActionParams {
    /// Admins may delete before the retention period ends.
    pub force: Option<bool>,
}

#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = CreateTenant,
    params(("Idempotency-Key" = Option<String>, Header, description = "replay protection")),
    responses((status = 201, body = Tenant), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn create(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    ApiJson(req): ApiJson<CreateTenant>,
) -> ApiResult<Response> {
    p.allow(Access::Write)?;
    let t = s.service.create_tenant(&ctx(&p, &c), req).await?;
    Ok(with_etag(StatusCode::CREATED, t.version, &t))
}

fn filter_id(field: &str, v: Option<String>) -> ApiResult<Option<String>> {
    match v {
        None => Ok(None),
        Some(v) => {
            validate_id(&v).map_err(|e| ApiError::field(field, e.to_string()))?;
            Ok(Some(v))
        }
    }
}

#[utoipa::path(get, path = "/v1/tenants", tag = "tenants", params(ListParams),
    responses((status = 200, body = Page<Tenant>), (status = 400, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Tenant>>> {
    let only_tenant = match p.tenant_scope() {
        Some(t) => Some(t.to_string()),
        None => {
            p.allow(Access::Read)?;
            None
        }
    };
    if let Some(state) = &q.state {
        if TenantState::parse(state).is_none() {
            return Err(ApiError::field(
                "state",
                "must be one of draft, active, suspended, archived, deleted",
            ));
        }
    }
    let limit = limit_of(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    let filter = TenantFilter {
        state: q.state,
        region: filter_id("region", q.region)?,
        organization_id: filter_id("organization_id", q.organization_id)?,
        cell_id: filter_id("cell_id", q.cell_id)?,
        only_tenant,
    };
    let items = s.service.list_tenants(&filter, &after, limit + 1).await?;
    Ok(Json(page(items, limit, |t| t.tenant_id.clone())))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant_id}", tag = "tenants",
    params(("tenant_id" = String, Path)),
    responses((status = 200, body = Tenant, headers(("ETag" = String))), (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Response> {
    let id = path.id("tenant_id")?;
    p.allow_tenant(&id, Access::Read)?;
    let t = s.service.get_tenant(&id).await?;
    Ok(with_etag(StatusCode::OK, t.version, &t))
}

#[utoipa::path(patch, path = "/v1/tenants/{tenant_id}", tag = "tenants", request_body = PatchTenant,
    params(("tenant_id" = String, Path), ("If-Match" = Option<String>, Header, description = "expected version, quoted")),
    responses((status = 200, body = Tenant),
               (status = 202, body = MoveWithJob, description = "a profile change that moves the tenant to a dedicated cell"),
               (status = 400, body = Problem), (status = 404, body = Problem),
               (status = 409, body = Problem), (status = 412, body = Problem)))]
pub async fn patch(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    IfMatch(if_match): IfMatch,
    ApiJson(req): ApiJson<PatchTenant>,
) -> ApiResult<Response> {
    let id = path.id("tenant_id")?;
    p.allow_tenant(&id, Access::Write)?;
    if req.profile.is_some() {
        // A profile change may move the tenant between cells: operators only.
        if p.tenant_scope().is_some() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "forbidden",
                "only operators and admins change a tenant's profile",
            ));
        }
        return match s
            .service
            .change_profile(&ctx(&p, &c), &id, if_match, req)
            .await?
        {
            crate::service::ProfileChange::Changed(t) => {
                Ok(with_etag(StatusCode::OK, t.version, &t))
            }
            crate::service::ProfileChange::Moving(m) => Ok(super::with_location(
                StatusCode::ACCEPTED,
                &format!("/v1/moves/{}", m.move_.move_id),
                &m,
            )),
        };
    }
    let t = s
        .service
        .patch_tenant(&ctx(&p, &c), &id, if_match, req)
        .await?;
    Ok(with_etag(StatusCode::OK, t.version, &t))
}

#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/{action}", tag = "tenants",
    params(("tenant_id" = String, Path),
           ("action" = String, Path, description = "activate | suspend | resume | archive | delete"),
           ("If-Match" = Option<String>, Header), ("Idempotency-Key" = Option<String>, Header), ActionParams),
    responses((status = 202, body = Job), (status = 404, body = Problem), (status = 409, body = Problem),
              (status = 412, body = Problem)))]
pub async fn action(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    IfMatch(if_match): IfMatch,
    ApiQuery(q): ApiQuery<ActionParams>,
) -> ApiResult<Response> {
    let id = path.id("tenant_id")?;
    let raw = path
        .0
        .iter()
        .find(|(k, _)| k == "action")
        .map(|(_, v)| v.as_str());
    let Some(action) = raw.and_then(LifecycleAction::parse) else {
        return Err(ApiError::not_found("no such tenant action"));
    };
    p.allow_tenant(&id, Access::Write)?;
    let force = q.force.unwrap_or(false);
    if force && p.role != cellplane_api::Role::Admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "forbidden",
            "only admin tokens may force a lifecycle action",
        ));
    }
    let job = s
        .service
        .tenant_action(&ctx(&p, &c), &id, action, if_match, force)
        .await?;
    Ok(with_location(
        StatusCode::ACCEPTED,
        &format!("/v1/jobs/{}", job.job_id),
        &job,
    ))
}

#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/environments", tag = "tenants",
    request_body = CreateEnvironment, params(("tenant_id" = String, Path)),
    responses((status = 201, body = Environment), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn create_environment(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    ApiJson(req): ApiJson<CreateEnvironment>,
) -> ApiResult<(StatusCode, Json<Environment>)> {
    let id = path.id("tenant_id")?;
    p.allow_tenant(&id, Access::Write)?;
    let env = s.service.create_environment(&ctx(&p, &c), &id, req).await?;
    Ok((StatusCode::CREATED, Json(env)))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/environments", tag = "tenants",
    params(("tenant_id" = String, Path)),
    responses((status = 200, body = Page<Environment>), (status = 404, body = Problem)))]
pub async fn list_environments(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Json<Page<Environment>>> {
    let id = path.id("tenant_id")?;
    p.allow_tenant(&id, Access::Read)?;
    let items = s.service.list_environments(&id).await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}
