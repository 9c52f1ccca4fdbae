//! `/v1/webhooks`: webhook subscriptions. The secret is in the answer that creates it (and
//! in a rotation's), never stored in clear, never replayed. A tenant-admin manages only its
//! own tenant's subscriptions; another's answers 404.

use super::error::{ApiError, ApiResult};
use super::extract::{decode_cursor, limit_of, page, ApiJson, ApiQuery, IfMatch, PathParams};
use super::{ctx, AppState, CorrelationId, WithheldOnReplay};
use crate::auth::{Access, Principal};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cellplane_api::{
    CreateWebhook, DeliveryState, Page, PatchWebhook, Problem, ReplayQueued, ReplayWebhook,
    Webhook, WebhookDelivery,
};
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

/// Tenant-admins act within their tenant; everyone else needs `access`.
fn scope(p: &Principal, access: Access) -> ApiResult<Option<String>> {
    match p.tenant_scope() {
        Some(own) => Ok(Some(own.to_string())),
        None => {
            p.allow(access)?;
            Ok(None)
        }
    }
}

fn with_secret(status: StatusCode, w: Webhook) -> Response {
    let mut resp = (status, Json(w)).into_response();
    // The secret is shown once: an idempotent replay answers without it.
    resp.extensions_mut().insert(WithheldOnReplay(&["secret"]));
    resp
}

#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = CreateWebhook,
    params(("Idempotency-Key" = Option<String>, Header, description = "replay protection; a replay answers without the secret")),
    responses((status = 201, body = Webhook), (status = 400, body = Problem), (status = 503, body = Problem)))]
pub async fn create(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    ApiJson(req): ApiJson<CreateWebhook>,
) -> ApiResult<Response> {
    let scope = scope(&p, Access::Write)?;
    let w = s
        .service
        .create_webhook(&ctx(&p, &c), scope.as_deref(), req)
        .await?;
    Ok(with_secret(StatusCode::CREATED, w))
}

#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", params(ListParams),
    responses((status = 200, body = Page<Webhook>), (status = 400, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Webhook>>> {
    let scope = scope(&p, Access::Read)?;
    let limit = limit_of(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    let items = s
        .service
        .list_webhooks(scope.as_deref(), &after, limit + 1)
        .await?;
    Ok(Json(page(items, limit, |w| w.webhook_id.clone())))
}

#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}", tag = "webhooks",
    params(("webhook_id" = String, Path)),
    responses((status = 200, body = Webhook), (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Json<Webhook>> {
    let id = path.id("webhook_id")?;
    let scope = scope(&p, Access::Read)?;
    Ok(Json(s.service.get_webhook(&id, scope.as_deref()).await?))
}

#[utoipa::path(patch, path = "/v1/webhooks/{webhook_id}", tag = "webhooks",
    request_body = PatchWebhook,
    params(("webhook_id" = String, Path), ("If-Match" = Option<String>, Header, description = "the version read")),
    responses((status = 200, body = Webhook), (status = 400, body = Problem), (status = 404, body = Problem), (status = 412, body = Problem)))]
pub async fn patch(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    IfMatch(if_match): IfMatch,
    ApiJson(req): ApiJson<PatchWebhook>,
) -> ApiResult<Json<Webhook>> {
    let id = path.id("webhook_id")?;
    let scope = scope(&p, Access::Write)?;
    Ok(Json(
        s.service
            .patch_webhook(&ctx(&p, &c), &id, scope.as_deref(), if_match, req)
            .await?,
    ))
}

#[utoipa::path(delete, path = "/v1/webhooks/{webhook_id}", tag = "webhooks",
    params(("webhook_id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
) -> ApiResult<StatusCode> {
    let id = path.id("webhook_id")?;
    let scope = scope(&p, Access::Write)?;
    s.service
        .delete_webhook(&ctx(&p, &c), &id, scope.as_deref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/webhooks/{webhook_id}/rotate-secret", tag = "webhooks",
    params(("webhook_id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "replay protection; a replay answers without the secret")),
    responses((status = 200, body = Webhook), (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)))]
pub async fn rotate_secret(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
) -> ApiResult<Response> {
    let id = path.id("webhook_id")?;
    let scope = scope(&p, Access::Write)?;
    let w = s
        .service
        .rotate_webhook_secret(&ctx(&p, &c), &id, scope.as_deref())
        .await?;
    Ok(with_secret(StatusCode::OK, w))
}

#[utoipa::path(post, path = "/v1/webhooks/{webhook_id}/test", tag = "webhooks",
    params(("webhook_id" = String, Path)),
    responses((status = 200, body = crate::webhooks::Attempt), (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn test(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
) -> ApiResult<Json<crate::webhooks::Attempt>> {
    let id = path.id("webhook_id")?;
    let scope = scope(&p, Access::Write)?;
    Ok(Json(
        s.service
            .ping_webhook(&ctx(&p, &c), &id, scope.as_deref())
            .await?,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    /// Only deliveries in this state.
    pub state: Option<DeliveryState>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}/deliveries", tag = "webhooks",
    params(("webhook_id" = String, Path), DeliveryParams),
    responses((status = 200, body = Page<WebhookDelivery>), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn deliveries(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
    ApiQuery(q): ApiQuery<DeliveryParams>,
) -> ApiResult<Json<Page<WebhookDelivery>>> {
    let id = path.id("webhook_id")?;
    let scope = scope(&p, Access::Read)?;
    let limit = limit_of(q.limit)?;
    let cursor = decode_cursor(q.cursor.as_deref())?;
    let after = if cursor.is_empty() {
        0
    } else {
        cursor
            .parse::<i64>()
            .map_err(|_| ApiError::field("cursor", "is not a cursor returned by this API"))?
    };
    let items = s
        .service
        .list_webhook_deliveries(&id, scope.as_deref(), q.state, after, limit + 1)
        .await?;
    Ok(Json(page(items, limit, |d| d.seq.to_string())))
}

#[utoipa::path(post, path = "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", tag = "webhooks",
    params(("webhook_id" = String, Path), ("delivery_id" = String, Path)),
    responses((status = 202, body = WebhookDelivery), (status = 404, body = Problem)))]
pub async fn redeliver(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
) -> ApiResult<(StatusCode, Json<WebhookDelivery>)> {
    let id = path.id("webhook_id")?;
    let delivery = path.id("delivery_id")?;
    let scope = scope(&p, Access::Write)?;
    let d = s
        .service
        .redeliver_webhook_delivery(&ctx(&p, &c), &id, &delivery, scope.as_deref())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(d)))
}

#[utoipa::path(post, path = "/v1/webhooks/{webhook_id}/replay", tag = "webhooks",
    request_body = ReplayWebhook,
    params(("webhook_id" = String, Path)),
    responses((status = 202, body = ReplayQueued), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn replay(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
    ApiJson(req): ApiJson<ReplayWebhook>,
) -> ApiResult<(StatusCode, Json<ReplayQueued>)> {
    let id = path.id("webhook_id")?;
    let scope = scope(&p, Access::Write)?;
    let r = s
        .service
        .replay_webhook(&ctx(&p, &c), &id, scope.as_deref(), req)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}
