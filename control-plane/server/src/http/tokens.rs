//! `/v1/tokens`: admins mint and revoke API tokens. Secrets are returned once, never
//! stored in clear and never replayed (see [`WithheldOnReplay`]).

use super::error::ApiResult;
use super::extract::{decode_cursor, limit_of, page, ApiJson, ApiQuery, PathParams};
use super::{ctx, AppState, CorrelationId, WithheldOnReplay};
use crate::auth::{Access, Principal};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cellplane_api::{CreateToken, CreatedToken, Page, Problem, TokenInfo};
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

#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateToken,
    params(("Idempotency-Key" = Option<String>, Header, description = "replay protection; a replay answers without the secret")),
    responses((status = 201, body = CreatedToken), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub async fn create(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    ApiJson(req): ApiJson<CreateToken>,
) -> ApiResult<Response> {
    p.allow(Access::Admin)?;
    let t = s.service.create_token(&ctx(&p, &c), req).await?;
    let mut resp = (StatusCode::CREATED, Json(t)).into_response();
    // The secret is shown once: an idempotent replay answers without it.
    resp.extensions_mut().insert(WithheldOnReplay(&["token"]));
    Ok(resp)
}

#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", params(ListParams),
    responses((status = 200, body = Page<TokenInfo>), (status = 403, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<TokenInfo>>> {
    p.allow(Access::Admin)?;
    let limit = limit_of(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    let items = s.service.list_tokens(&after, limit + 1).await?;
    Ok(Json(page(items, limit, |t| t.token_id.clone())))
}

#[utoipa::path(delete, path = "/v1/tokens/{token_id}", tag = "tokens", params(("token_id" = String, Path)),
    responses((status = 200, body = TokenInfo), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn revoke(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
) -> ApiResult<Json<TokenInfo>> {
    let id = path.id("token_id")?;
    p.allow(Access::Admin)?;
    let info = s.service.revoke_token(&ctx(&p, &c), &id).await?;
    s.tokens.clear();
    Ok(Json(info))
}
